"""The GPU check script's smoke mode: every stage at the smallest size on the CPU, so the
script cannot rot while no GPU is around."""

import importlib.util
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from conftest import REPO


def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_stage(tmp_path):
    p = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--smoke", "--budget", "600",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout + p.stderr
    rows = json.loads((tmp_path / "summary.json").read_text())
    assert {r["stage"] for r in rows} == set(gpu_check().STAGES)
    assert all(r["passed"] is not False for r in rows), [r for r in rows if r["passed"] is False]
    # nothing ran out of time: the one skip is compile, which the CPU does not check
    assert [r["check"] for r in rows if r["passed"] is None] == ["train --compile"], rows
    assert p.stdout.rstrip().splitlines()[-1].startswith("| science")  # the summary table comes last
    archive = tmp_path / "gpu_check.tar.gz"
    assert archive.stat().st_size < 16 * 2**20
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert any(n.endswith("bench.csv") for n in names) and any(n.endswith("runs.csv") for n in names)


def test_a_fused_group_that_fell_back_fails_the_check(tmp_path):
    """Its trials still finish one by one, so only the study's log shows that fusing broke
    (as it did on an H200: every fused group fell back)."""
    g = gpu_check()
    (tmp_path / "runs.csv").write_text("key,status,train_loss,diverged,top1_err\na,ok,0.5,False,20.0\n")
    (tmp_path / "log.txt").write_text("2026-12-04 18:32:48,981 1863 study optimizer shard 0/1: 1 trials\n")
    assert g.fused_run(tmp_path)({}) == (True, {"top1_err": 20.0, "trials": 1, "fused_fell_back": 0})
    with open(tmp_path / "log.txt", "a") as f:
        f.write("2026-12-04 18:32:50,333 1863 fused group ['a'] failed (RuntimeError: LSE is not correctly "
                "aligned (strideB)); its trials run one by one\n")
    assert g.fused_run(tmp_path)({}) == (False, {"top1_err": 20.0, "trials": 1, "fused_fell_back": 1})


def test_a_command_without_its_floor_of_time_is_skipped_not_started(tmp_path):
    g = gpu_check()
    c = g.Check(tmp_path, budget=100.0, smoke=True, data_dir=None)
    c.stage(c.floor - 1)
    assert c.cmd("speed", "bench x", [sys.executable, "-c", "raise SystemExit(1)"], 60) is None
    c.stage(c.floor + 30)
    r = c.cmd("speed", "exits 0, in time", [sys.executable, "-c", "pass"], 60)
    assert r["passed"] and r["log"].endswith("speed-exits_0_in_time.log")
    assert [(row["check"], row["passed"]) for row in c.rows] == [("bench x", None), ("exits 0, in time", True)]
    assert c.rows[0]["why"] == "out of time"


def test_the_kill_and_resume_check_starts_nothing_when_out_of_time(tmp_path, monkeypatch):
    g = gpu_check()
    c = g.Check(tmp_path, budget=100.0, smoke=True, data_dir=None)
    c.stage(c.floor - 1)
    monkeypatch.setattr(g.subprocess, "Popen", lambda *a, **k: pytest.fail("a training process was started"))
    g.killed_then_resumed(c, [], 60)
    assert [(r["check"], r["why"]) for r in c.rows] == [("killed, then resumed", "out of time")]


def test_only_runs_the_stages_named_in_the_run_order(tmp_path, monkeypatch):
    g = gpu_check()
    ran = []
    monkeypatch.setattr(g, "STAGES", {name: (lambda c, name=name: ran.append(name), est)
                                      for name, (_, est) in g.STAGES.items()})
    monkeypatch.setattr(g, "archive", lambda c: tmp_path / "a.tar.gz")
    assert g.main(["--smoke", "--out", str(tmp_path), "--only", "torchrun,fused"]) == 0
    assert ran == ["fused", "torchrun"]
    with pytest.raises(SystemExit) as e:
        g.main(["--out", str(tmp_path), "--only", "fusde"])
    assert e.value.code == 2


def alive(pid: int) -> bool:
    """PID runs (a zombie, ended and not yet reaped by whoever adopted it, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_a_command_past_its_cap_ends_with_everything_it_started_and_reports_what_it_wrote(tmp_path, monkeypatch):
    """SIGTERM, then SIGKILL for the group: a child that ignores SIGTERM (a worker) dies too; a
    resumable study passes on the rows it wrote; another command past its cap fails, its numbers
    still reported."""
    g = gpu_check()
    monkeypatch.setattr(g, "TERM_GRACE", 1.0)
    c = g.Check(tmp_path, budget=100.0, smoke=True, data_dir=None)
    c.floor = 1.0
    c.stage(60)
    pidfile = tmp_path / "child.pid"
    stubborn = ("import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                f"p = subprocess.Popen([sys.executable, '-c', 'import signal, time; "
                f"signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)']); "
                f"open({str(pidfile)!r}, 'w').write(str(p.pid)); "
                f"open({str(tmp_path / 'runs.csv')!r}, 'w').write('key,status\\na,ok\\n'); time.sleep(600)")
    judge = lambda r: (len(g._runs(tmp_path)) == 1, {"trials": len(g._runs(tmp_path))})  # noqa: E731
    r = c.cmd("science", "study cut short", [sys.executable, "-c", stubborn], 3, ok=judge, resumable=True)
    assert r["rc"] == "timeout" and r["passed"] and r["trials"] == 1
    assert not alive(int(pidfile.read_text()))  # ended with its parent's group
    r = c.cmd("speed", "bench cut short", [sys.executable, "-c", stubborn], 3, ok=judge)
    assert r["rc"] == "timeout" and r["passed"] is False and r["trials"] == 1
