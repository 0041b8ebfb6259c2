"""Preemption and faults a cluster or a disk brings: SIGTERM and SIGINT end a study cleanly
(exit 143 / 130, one line, no claim left), a study preempted on one host finishes on
another, a dead host's claim is taken over once its heartbeat is stale, a full disk says
so, corrupt files in a study folder are set aside, a description with control
characters round-trips, report.md escapes what it prints."""

import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import REPO, run_cli
from vitexp.store import STALE_S, TrialStore
from vitexp.studies import trials
from vitexp.sweep import collect, resolve_spec, run_study

ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
STUDY = ["stability", "--samples", "2", "--epochs", "6", "--n-train", "512", "--n-test", "64", "--batch-size", "32",
         "--device", "cpu", "--no-plot", "--no-progress", "--models", "vit_p_7mf"]


def _start(out: Path, *extra, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "vitexp", *STUDY, *extra, "--out", str(out)], cwd=REPO,
                            env={**ENV, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_checkpoint(out: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not list((out / "checkpoints").glob("*.pt")):
        time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()
    assert list((out / "checkpoints").glob("*.pt")), "no trial reached its first checkpoint"


def _other_host(tmp_path: Path) -> dict:
    """An environment whose Python believes it runs on another host (a requeued SLURM job)."""
    site = tmp_path / "otherhost"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text("import socket\nsocket.gethostname = lambda: 'requeued-node'\n")
    return {"PYTHONPATH": f"{site}{os.pathsep}{REPO}"}


@pytest.mark.slow
@pytest.mark.parametrize("sig,code,workers", [(signal.SIGTERM, 143, "1"), (signal.SIGINT, 130, "1"),
                                              (signal.SIGTERM, 143, "2"), (signal.SIGINT, 130, "2")])
def test_a_signal_ends_the_study_cleanly(tmp_path, sig, code, workers):
    """The signal goes to the study's process alone (SLURM's SIGTERM, `kill -INT`): with
    worker processes the parent passes it on. The trial in flight keeps its checkpoint."""
    out = tmp_path / "st"
    proc = _start(out, "--workers", workers)
    _wait_for_checkpoint(out, proc)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr and stderr.strip().splitlines()[-1].startswith(
        f"interrupted ({signal.Signals(sig).name}); finished trials are kept: rerun the same command to resume")
    assert not list((out / "claims").iterdir()) and list((out / "checkpoints").glob("*.pt"))


@pytest.mark.slow
@pytest.mark.parametrize("when", ["starting", "training"])
def test_ctrl_c_to_the_process_group_prints_one_line_and_no_worker_traceback(tmp_path, when):
    """A terminal's Ctrl-C reaches the study and its workers at once: while the workers start
    (importing torch) or while they train. One line from the parent, exit 130, the log says so;
    the rerun says it resumed."""
    out = tmp_path / "st"
    proc = subprocess.Popen([sys.executable, "-m", "vitexp", *STUDY, "--workers", "2", "--out", str(out)], cwd=REPO,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    if when == "starting":
        deadline = time.time() + 60
        while time.time() < deadline and not (out / "log.txt").exists():
            time.sleep(0.05)
        time.sleep(1.0)
    else:
        _wait_for_checkpoint(out, proc)
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert proc.returncode == 130 and "Traceback" not in stderr and len(lines) == 1, stderr
    assert "interrupted (SIGINT)" in (out / "log.txt").read_text()
    if when == "training":
        p = subprocess.run([sys.executable, "-m", "vitexp", *STUDY, "--workers", "1", "--out", str(out)], cwd=REPO,
                           env=ENV, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0 and "resumed from epoch" in p.stderr, p.stderr
        assert re.search(r"resumed [0-9a-f]{12} from epoch \d", (out / "log.txt").read_text())


@pytest.mark.slow
def test_a_study_preempted_on_one_host_finishes_on_another_with_every_trial_once(tmp_path):
    out = tmp_path / "st"
    proc = _start(out, "--workers", "1")
    _wait_for_checkpoint(out, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143
    p = subprocess.run([sys.executable, "-m", "vitexp", *STUDY, "--out", str(out)], cwd=REPO,
                       env={**ENV, **_other_host(tmp_path)}, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == 2 and runs.key.is_unique and (runs.status == "ok").all()
    assert set(runs.host) <= {socket.gethostname(), "requeued-node"} and "requeued-node" in set(runs.host)
    log = (out / "log.txt").read_text()
    assert all(log.count(f"trial {k} ") == 1 for k in runs.key), log  # recorded exactly once


@pytest.mark.slow
def test_a_stale_claim_of_a_dead_host_is_taken_over(tmp_path):
    spec = resolve_spec("stability", None, {"samples": 1, "epochs": 1, "models": ["vit_p_7mf"]},
                        {"n_train": 64, "n_test": 32, "batch_size": 32, "device": "cpu"})
    (key,) = [t.key() for t in trials(spec)]
    store = TrialStore(tmp_path)
    claim = tmp_path / "claims" / key
    claim.write_text(json.dumps({"host": "lost-node", "pid": 123, "time": time.time() - 3600,
                                 "beat": time.time() - STALE_S - 5}))
    runs = run_study(spec, tmp_path)
    assert runs.status.tolist() == ["ok"] and not claim.exists()
    # a claim whose heartbeat is fresh is respected: the run waits, then takes the record
    store.trial_path(key).unlink()
    claim.write_text(json.dumps({"host": "busy-node", "pid": 1, "time": time.time(), "beat": time.time()}))
    assert not store.claim(key)


def test_a_live_pid_without_a_start_time_is_judged_by_its_heartbeat(tmp_path):
    store = TrialStore(tmp_path)
    claim = tmp_path / "claims" / "k"
    claim.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getppid(), "beat": time.time()}))
    assert not store.claim("k")  # fresh heartbeat: alive
    claim.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getppid(), "beat": time.time() - 2 * STALE_S}))
    assert store.claim("k")


def test_a_full_disk_is_one_line_naming_it(tmp_path, monkeypatch, capsys):
    """ENOSPC while recording (a monkeypatched write): the study stops with one line, the
    message says so, no half-written file stays."""
    import vitexp.fileio
    from vitexp.cli import main

    real = vitexp.fileio.os.fsync

    def full(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".tmp") and "trials" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(vitexp.fileio.os, "fsync", full)
    monkeypatch.setattr(sys, "argv", ["vitexp", *STUDY[:2], "1", "--epochs", "1", *STUDY[5:], "--workers", "1",
                                      "--out", str(tmp_path / "st")])
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and "no space left on the device of" in err and "Traceback" not in err
    assert not list(tmp_path.rglob("*.tmp"))


@pytest.mark.slow
def test_corrupt_files_in_a_study_folder_are_set_aside_and_their_trials_rerun(tmp_path, caplog):
    spec = resolve_spec("stability", None, {"samples": 3, "epochs": 1, "models": ["vit_p_7mf"]},
                        {"n_train": 64, "n_test": 32, "batch_size": 32, "device": "cpu"})
    keys = [t.key() for t in trials(spec)]
    run_study(spec, tmp_path / "st")
    st = tmp_path / "st"
    (st / "trials" / f"{keys[0]}.json").write_text("[1, 2]")  # a list, not a record
    (st / "trials" / f"{keys[1]}.json").write_text("null")
    (st / "trials" / f"{keys[2]}.history.csv").write_bytes(b"\xff\xfe garbled \x00")
    (st / ".lock").unlink()
    (st / ".lock").mkdir()  # a folder where the lock file belongs
    runs = run_study(spec, st)
    assert sorted(runs.key) == sorted(keys) and (runs.status == "ok").all()
    aside = sorted(p.name for p in st.rglob("*.corrupt"))
    assert aside == sorted([f"{keys[0]}.json.corrupt", f"{keys[1]}.json.corrupt", f"{keys[2]}.history.csv.corrupt",
                            f"{keys[2]}.json.corrupt", ".lock.corrupt"])
    assert "unreadable" in (st / "log.txt").read_text()
    said = [r.getMessage() for r in caplog.records if ".lock is unreadable" in r.getMessage()]
    assert said and "a new lock file takes its place" in said[0] and "trial" not in said[0]  # a lock is no trial
    assert len(collect([st], tmp_path / "merged")) == 3  # collect goes on too


@pytest.mark.slow
def test_leftovers_of_a_killed_figure_writer_are_swept(tmp_path):
    spec = resolve_spec("stability", None, {"samples": 1, "epochs": 1, "models": ["vit_p_7mf"]},
                        {"n_train": 64, "n_test": 32, "batch_size": 32, "device": "cpu"})
    left = tmp_path / "figures" / f".cdf.png.{socket.gethostname()}.999999999.tmp"
    left.parent.mkdir(parents=True)
    left.write_text("half a figure")
    run_study(spec, tmp_path)
    assert not left.exists()


@pytest.mark.slow
def test_a_description_with_control_characters_round_trips(tmp_path):
    preset = tmp_path / "p.toml"
    preset.write_text('[study]\nkind = "stability"\nmodels = ["vit_p_7mf"]\nsamples = 1\nepochs = 1\n'
                      'description = "two\\nlines,\\ta tab, a \\"quote\\" and a bell \\u0007"\n'
                      '[train]\nn_train = 64\nn_test = 32\nbatch_size = 32\ndevice = "cpu"\n')
    for _ in range(2):  # the rerun reads the study.toml the first run wrote
        p = run_cli("stability", "--preset", preset, "--out", tmp_path / "st", "--no-plot")
        assert p.returncode == 0, p.stderr
    from vitexp import tomlfile

    spec = tomlfile.loads((tmp_path / "st" / "study.toml").read_text())
    assert spec["study"]["description"] == 'two\nlines,\ta tab, a "quote" and a bell \a'
    assert run_cli("report", tmp_path / "st").returncode == 0


@pytest.mark.slow
def test_report_md_escapes_what_it_prints(tmp_path):
    spec = resolve_spec("stability", None, {"samples": 1, "epochs": 1, "models": ["vit_p_7mf"]},
                        {"n_train": 64, "n_test": 32, "batch_size": 32, "device": "cpu"})
    folder = tmp_path / "a*b|c[d]"
    run_study(spec, folder)
    p = run_cli("report", folder)
    assert p.returncode == 0, p.stderr
    md = (folder / "report.md").read_text()
    assert "a\\*b\\|c\\[d\\]" in md and "a*b|c[d]" not in md.replace("a\\*b\\|c\\[d\\]", "")


def test_a_study_whose_every_trial_fails_exits_non_zero(tmp_path, monkeypatch, capsys):
    import vitexp.trainer
    from vitexp.cli import main

    def broken(cfg, **kw):
        raise RuntimeError("CUDA error: device-side assert triggered")

    monkeypatch.setattr(vitexp.trainer, "run_trial", broken)
    monkeypatch.setattr(sys, "argv", ["vitexp", *STUDY, "--workers", "1", "--out", str(tmp_path / "st")])
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.splitlines()[-1].startswith("failed: every trial failed (2; first: RuntimeError")
    assert (pd.read_csv(tmp_path / "st" / "runs.csv").status == "failed").all()
