import functools
import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

# with more busy threads than cores, OpenMP's spin-waiting makes torch ~100x slower;
# set before torch loads, inherited by the CLI subprocesses the tests start
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# tests share two cores with whatever else runs; keep torch from oversubscribing
torch.set_num_threads(min(2, os.cpu_count() or 1))


def run_cli(*args, cwd=None, env=None, timeout=600):
    """`python -m vitexp ARGS` in a subprocess: what a user sees, exit code included."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "vitexp", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or REPO, env=full_env, timeout=timeout)


class Ran(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


def in_process(monkeypatch, capsys, *args) -> Ran:
    """`vitexp ARGS` through main() in this process at 80 columns, without the 3-5 s start of an
    interpreter importing torch: run_cli's answer, for commands that need no process of their own."""
    from vitexp.cli import main

    capsys.readouterr()  # what came before is not this command's output
    monkeypatch.setattr(sys, "argv", ["vitexp", *map(str, args)])
    monkeypatch.setenv("COLUMNS", "80")
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code or 0
    return Ran(code, *capsys.readouterr())


@pytest.fixture
def cli(monkeypatch, capsys):
    """in_process, bound: cli("train", "--model", ...)."""
    return functools.partial(in_process, monkeypatch, capsys)


def assert_user_error(proc, *needles):
    """Bad input: exit 2, one line on stderr naming the problem, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    for n in needles:
        assert n.lower() in lines[0].lower(), (n, lines[0])


@pytest.fixture
def tiny():
    """Overrides that make any trial take a second or two on the CPU."""
    return dict(dataset="shapes", n_train=256, n_test=200, batch_size=64, epochs=2, device="cpu")
