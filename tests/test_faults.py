"""Faults: SIGKILL at random moments, trials that raise, two processes on one
folder, stale claims and leftovers, and `vitexp doctor`.

The kill test is the expensive one (a study killed 6 times, then rerun); everything else
trains a handful of 1-epoch trials on 128 images.
"""

import csv
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

import vitexp.data
import vitexp.store
import vitexp.trainer
from conftest import REPO, run_cli
from vitexp.errors import StudyFailed
from vitexp.fileio import tmp_path as writer_tmp_path
from vitexp.store import RUNS, TrialStore, _start_time, read_runs
from vitexp.studies import trials
from vitexp.sweep import resolve_spec, run_study

MODEL = "vit_p_25mf"  # the smallest model: ~1 s an epoch on 256 images
# one thread per process: the killed and the uninterrupted runs must reduce in the same order
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
STUDY = ["stability", "--samples", "3", "--epochs", "3", "--n-train", "256", "--n-test", "128",
         "--batch-size", "64", "--device", "cpu", "--no-plot", "--no-progress", "--models", MODEL]
COMPARED = ("top1_err", "last_err", "train_loss", "lr", "wd", "epochs_run", "diverged")
HISTORY_COMPARED = ("train_loss", "test_err", "ema_err", "lr")
REAL_RUN_TRIAL = vitexp.trainer.run_trial


def _start(out: Path, args=STUDY, log: Path | None = None) -> subprocess.Popen:
    err = open(log, "a") if log else subprocess.DEVNULL
    return subprocess.Popen([sys.executable, "-m", "vitexp", *args, "--out", str(out)], cwd=REPO, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=err)


# -- what must hold at every moment -------------------------------------------------

def _visible_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")]


def check_readable(out: Path) -> None:
    """Cheap, for polling while a study runs: every CSV is a whole table (header and
    rows of one width), every trial json parses, no key twice in runs.csv."""
    for p in _visible_files(out) + _visible_files(out / "trials"):
        try:
            text = p.read_text()
        except FileNotFoundError:  # removed (a checkpoint, a claim) between listing and reading
            continue
        if p.suffix == ".csv":
            rows = list(csv.reader(io.StringIO(text)))
            rows = [r for r in rows if r]
            assert all(len(r) == len(rows[0]) for r in rows), f"{p} is partial:\n{text}"
            if p.name == RUNS and rows:
                keys = [r[rows[0].index("key")] for r in rows[1:]]
                assert len(keys) == len(set(keys)), f"duplicate rows in {p}:\n{text}"
        elif p.suffix == ".json":
            json.loads(text)


def check_consistent(out: Path, finished: bool = False) -> pd.DataFrame:
    """Thorough, between runs: the tables parse and agree with trials/. Every run has its
    curve; killed mid-rebuild, history.csv may hold one trial more (FINISHED: not even that)."""
    check_readable(out)
    if not (out / RUNS).exists():
        return pd.DataFrame()
    try:
        runs = pd.read_csv(out / RUNS)
    except pd.errors.EmptyDataError:
        return pd.DataFrame()
    assert runs.key.is_unique
    assert set(runs.key) <= {p.stem for p in (out / "trials").glob("*.json")}
    assert (runs.status == "ok").all()
    hist = pd.read_csv(out / "history.csv")
    assert not hist.duplicated(["key", "epoch"]).any()
    assert set(runs.key) <= set(hist.key)
    assert set(hist.key) <= {p.stem for p in (out / "trials").glob("*.json")}
    if finished:
        assert set(hist.key) == set(runs.key)
    for key, g in hist.groupby("key"):  # a finished trial has every epoch once, in order
        assert list(g.epoch) == list(range(1, len(g) + 1)), key
    return runs


# -- kills ------------------------------------------------------------------------

def _listing(folder: Path) -> dict[str, int]:
    try:
        return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    except FileNotFoundError:
        return {}


# where to kill: (folders watched, which new or changed names count). '-write' moments
# are a temporary file appearing (the write in flight; when it is too quick to catch,
# the renamed file right after), '-done' ones the file renamed into place
MOMENTS = {
    "checkpoint-write": (("checkpoints",), (".tmp", ".pt")),
    "checkpoint-done": (("checkpoints",), (".pt",)),
    "record-write": (("trials", ""), (".csv.tmp", ".json.tmp", ".json")),
    "record-done": (("trials",), (".json",)),
    "random": (("claims",), ("",)),
}


def _kill_at(proc: subprocess.Popen, out: Path, moment: str, delay: float, timeout: float = 180) -> dict:
    """Watch the running study and SIGKILL it at `moment` (MOMENTS; 'random': `delay`
    seconds after it claimed a trial). Only files new or changed since this process
    started count (a killed one leaves its own behind). Parses every table all the while."""
    folders, suffixes = MOMENTS[moment]

    def listing():
        return {(f, n): t for f in folders for n, t in _listing(out / f).items() if n.endswith(suffixes)}

    before = listing()
    t_claim, last_check, t0 = None, 0.0, time.monotonic()
    while proc.poll() is None:
        now = time.monotonic()
        assert now - t0 < timeout, f"no {moment} moment within {timeout}s"
        changed = [k for k, t in listing().items() if before.get(k) != t]
        if moment == "random":
            t_claim = now if t_claim is None and changed else t_claim
            hit = t_claim is not None and now - t_claim >= delay
        else:
            hit = bool(changed)
        if hit:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            fresh = sorted(n for f in (out, out / "trials", out / "checkpoints") for n in _listing(f)
                           if n.endswith(".tmp") and str(proc.pid) in n)
            return {"moment": moment, "killed": True, "mid_write": fresh}
        if now - last_check > 0.2:
            check_readable(out)
            last_check = now
        time.sleep(0.004)
    return {"moment": moment, "killed": False, "rc": proc.returncode}


@pytest.mark.slow
def test_sigkill_at_random_moments_then_rerun_equals_an_uninterrupted_run(tmp_path):
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    reference = _start(whole, log=tmp_path / "whole.err")  # the uninterrupted run, on the other core
    rng = random.Random(20240611)
    moments = ["checkpoint-write", "checkpoint-done", "record-write", "record-done", "random", "random"]
    rng.shuffle(moments)
    events, resumable = [], 0
    for moment in moments:
        proc = _start(killed, log=tmp_path / "killed.err")
        ev = _kill_at(proc, killed, moment, delay=rng.uniform(0.0, 3.0))
        events.append(ev)
        if not ev["killed"]:  # the study finished before this moment came
            assert ev["rc"] == 0, (tmp_path / "killed.err").read_text()
            break
        check_consistent(killed)
        resumable += any((killed / "checkpoints").glob("*.pt"))
    print("kills:", events)
    assert sum(e["killed"] for e in events) >= 5, events
    assert resumable >= 1, "no kill left a checkpoint to resume from"

    p = run_cli(*STUDY, "--out", killed, env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr
    assert reference.wait(timeout=600) == 0, (tmp_path / "whole.err").read_text()

    a, b = check_consistent(killed, finished=True), check_consistent(whole, finished=True)
    assert len(b) == 3 and sorted(a.key) == sorted(b.key)  # every trial exactly once
    a, b = a.set_index("key").sort_index(), b.set_index("key").sort_index()
    for c in COMPARED:  # resumed trials end bit for bit where uninterrupted ones do (CPU)
        assert a[c].equals(b[c]), (c, a[c], b[c])
    ha = pd.read_csv(killed / "history.csv").set_index(["key", "epoch"]).sort_index()
    hb = pd.read_csv(whole / "history.csv").set_index(["key", "epoch"]).sort_index()
    assert ha.index.equals(hb.index)
    for c in HISTORY_COMPARED:
        assert ha[c].equals(hb[c]), c
    # nothing left behind: no checkpoint, claim or half-written temporary file
    assert not list((killed / "checkpoints").iterdir())
    assert not list((killed / "claims").iterdir())
    assert not [p for p in killed.rglob("*") if p.name.endswith(".tmp")]


def _fake_trial(calls: list):
    """A run_trial that trains nothing: records a made-up row as the real one does."""

    def run_trial(cfg, store=None, progress=None, out=None):
        key = cfg.key()
        calls.append(key)
        row = {"key": key, "study": "stability", "status": "ok", "model": cfg.model, "lr": cfg.lr, "wd": cfg.wd,
               "epochs": cfg.epochs, "top1_err": 50.0, "last_err": 60.0, "diverged": False, "wall_s": 0.0}
        store.record(key, row, [{"key": key, "epoch": e + 1, "train_loss": 1.0 / (e + 1), "test_err": 50.0,
                                 "ema_err": 50.0, "lr": 0.1, "seconds": 1.0, "images_per_s": 100.0}
                                for e in range(cfg.epochs)])
        return row

    return run_trial


@pytest.mark.slow
def test_a_rerun_repairs_each_state_a_kill_can_leave_mid_record(tmp_path, monkeypatch):
    """The moments the kill test hits only by chance, set up exactly: killed (a) after
    the history file, before the json (the commit point); (b) after the json, before
    the checkpoint's removal and the tables' rebuild; (c) mid-way through writing each
    file (a temporary file left); (d) holding a claim."""
    spec = _stability(samples=3)
    keys = [t.key() for t in trials(spec)]
    calls = []
    monkeypatch.setattr(vitexp.trainer, "run_trial", _fake_trial(calls))
    run_study(spec, tmp_path)
    complete = {p.name: p.read_bytes() for p in (tmp_path / "trials").iterdir()}
    tables = {n: (tmp_path / n).read_bytes() for n in ("runs.csv", "history.csv")}
    store = TrialStore(tmp_path)
    # (a) keys[0]: history written, json not yet; (b) keys[1]: json written, the rest not
    store.trial_path(keys[0]).unlink()
    store.checkpoint_path(keys[0]).write_bytes(b"epoch 2 of 3")
    store.checkpoint_path(keys[1]).write_bytes(b"epoch 2 of 3")
    store.record(keys[2], store.result(keys[2]))
    store.rebuild()  # tables rebuilt without keys[0]
    (tmp_path / "runs.csv").write_text(pd.read_csv(tmp_path / "runs.csv").iloc[1:].to_csv(index=False))
    # (c) half-written files of the killed process; (d) its claim
    dead = _dead_pid()
    import socket

    for f in (tmp_path / "trials" / f".{keys[0]}.json", tmp_path / "runs.csv", store.checkpoint_path(keys[0])):
        f.with_name(f".{f.name.lstrip('.')}.{socket.gethostname()}.{dead}.tmp").write_text("half")
    (tmp_path / "claims" / keys[0]).write_text(json.dumps({"host": socket.gethostname(), "pid": dead}))
    check_readable(tmp_path)

    calls.clear()
    real_fake = _fake_trial(calls)

    def resume(cfg, store=None, progress=None, out=None):  # the real one resumes from the checkpoint
        assert store.checkpoint_path(cfg.key()).read_bytes() == b"epoch 2 of 3"
        return real_fake(cfg, store=store)

    monkeypatch.setattr(vitexp.trainer, "run_trial", resume)
    run_study(spec, tmp_path)
    assert calls == [keys[0]]  # only the uncommitted trial runs again
    assert {p.name: p.read_bytes() for p in (tmp_path / "trials").iterdir()} == complete
    assert {n: (tmp_path / n).read_bytes() for n in tables} == tables
    assert not list((tmp_path / "checkpoints").iterdir()) and not list((tmp_path / "claims").iterdir())
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_killed_mid_rebuild_every_run_keeps_its_curve(tmp_path, monkeypatch):
    """A kill between the two tables' writes: runs.csv never lists a trial history.csv lacks."""
    calls = []
    store, fake = TrialStore(tmp_path), _fake_trial(calls)
    first, second = (t for t in trials(_stability(samples=2)))
    fake(first, store=store)
    store.rebuild()
    real_write, tables = vitexp.store.atomic_write_csv, []

    def killed_after_one_table(path, frame):
        if Path(path).parent == tmp_path:
            tables.append(Path(path).name)
            if len(tables) == 2:
                raise SystemExit("killed")
        real_write(path, frame)

    monkeypatch.setattr(vitexp.store, "atomic_write_csv", killed_after_one_table)
    fake(second, store=store)
    with pytest.raises(SystemExit):
        store.rebuild()
    runs, hist = pd.read_csv(tmp_path / RUNS, dtype={"key": str}), pd.read_csv(tmp_path / "history.csv", dtype={"key": str})
    assert set(runs.key) == {first.key()} and set(hist.key) == {first.key(), second.key()}
    monkeypatch.setattr(vitexp.store, "atomic_write_csv", real_write)
    store.rebuild()  # the next run's rebuild brings the two together
    check_consistent(tmp_path, finished=True)


# -- failing and diverging trials ---------------------------------------------------

TINY = {"n_train": 128, "n_test": 64, "batch_size": 64, "device": "cpu"}


def _stability(samples=3, **train):
    return resolve_spec("stability", None, {"models": [MODEL], "samples": samples, "epochs": 1},
                        {**TINY, **train})


def _counting(monkeypatch, fail: dict | None = None) -> list:
    """Replace run_trial by one that records each call and raises for the keys in `fail`."""
    real, calls = REAL_RUN_TRIAL, []

    def run_trial(cfg, **kw):
        calls.append(cfg.key())
        if fail and cfg.key() in fail:
            raise fail[cfg.key()]
        return real(cfg, **kw)

    monkeypatch.setattr(vitexp.trainer, "run_trial", run_trial)
    return calls


@pytest.mark.slow
def test_a_failing_trial_is_recorded_with_its_reason_and_retried(tmp_path, monkeypatch):
    spec = _stability()
    keys = [t.key() for t in trials(spec)]
    oom = getattr(torch, "OutOfMemoryError", RuntimeError)("CUDA out of memory. Tried to allocate 2.00 GiB")
    calls = _counting(monkeypatch, {keys[0]: oom, keys[2]: OSError("image file is truncated (3 bytes not processed)")})
    runs = run_study(spec, tmp_path)
    assert calls == keys  # the study went on after each failure
    runs = pd.read_csv(tmp_path / RUNS).set_index("key")
    assert list(runs.loc[keys, "status"]) == ["failed", "ok", "failed"]
    assert "OutOfMemoryError" in runs.loc[keys[0], "error"] or "out of memory" in runs.loc[keys[0], "error"]
    assert runs.loc[keys[2], "error"].startswith("OSError: image file is truncated")
    assert runs.loc[keys[0], ["model", "lr", "wd", "epochs"]].notna().all()  # a failed row says which trial
    assert pd.isna(runs.loc[keys[0], "top1_err"])
    assert "FAILED" in (tmp_path / "log.txt").read_text()

    calls = _counting(monkeypatch)  # the cause is gone: a rerun retries exactly the failed trials
    run_study(spec, tmp_path)
    assert sorted(calls) == sorted([keys[0], keys[2]])
    runs = pd.read_csv(tmp_path / RUNS)
    assert len(runs) == 3 and runs.key.is_unique and (runs.status == "ok").all()
    calls = _counting(monkeypatch)
    run_study(spec, tmp_path)
    assert calls == []


@pytest.mark.slow
def test_a_failed_trials_checkpoint_is_dropped_so_its_retry_starts_clean(tmp_path, monkeypatch):
    spec = resolve_spec("stability", None, {"models": [MODEL], "samples": 1, "epochs": 2}, TINY)
    (key,) = [t.key() for t in trials(spec)]
    store, calls, real = TrialStore(tmp_path), [], REAL_RUN_TRIAL

    def fails_after_epoch_1(cfg, store=None, progress=None, out=None):
        def boom(event):
            if event["event"] == "epoch":
                assert store.checkpoint_path(key).exists()  # the epoch's checkpoint is written
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
        calls.append(key)
        return real(cfg, store=store, progress=boom if len(calls) == 1 else None)

    monkeypatch.setattr(vitexp.trainer, "run_trial", fails_after_epoch_1)
    with pytest.raises(StudyFailed, match="every trial failed"):
        run_study(spec, tmp_path)
    row = pd.read_csv(tmp_path / RUNS).iloc[0]
    assert row.status == "failed" and row.error.startswith("RuntimeError: CUDA error")
    assert not store.checkpoint_path(key).exists()
    run_study(spec, tmp_path)
    assert len(calls) == 2 and pd.read_csv(tmp_path / RUNS).status.tolist() == ["ok"]


@pytest.mark.slow
def test_an_unreadable_checkpoint_is_set_aside_and_the_trial_starts_afresh(tmp_path, monkeypatch):
    spec = _stability(samples=1)
    (key,) = [t.key() for t in trials(spec)]
    store = TrialStore(tmp_path)
    store.checkpoint_path(key).write_bytes(b"not a checkpoint")  # damaged, or from another code version
    calls = _counting(monkeypatch)
    run_study(spec, tmp_path)
    assert len(calls) == 1 and pd.read_csv(tmp_path / RUNS).status.tolist() == ["ok"]
    assert store.checkpoint_path(key).with_name(f"{key}.pt.corrupt").read_bytes() == b"not a checkpoint"
    assert f"{key}.pt is unreadable" in (tmp_path / "log.txt").read_text()


@pytest.mark.slow
def test_divergence_is_a_result_not_a_failure(tmp_path, monkeypatch):
    spec = resolve_spec("optimizer", None, {"models": [MODEL], "seeds": [0], "optimizers": ["sgd"], "epochs": [2]},
                        {**TINY, "n_train": 256})
    spec["tuned"] = {MODEL: {"sgd": [1e4, 0.0]}}
    calls = _counting(monkeypatch)
    run_study(spec, tmp_path)
    runs = pd.read_csv(tmp_path / RUNS)
    assert len(calls) == 1 and len(runs) == 1
    assert runs.status[0] == "ok" and bool(runs.diverged[0]) and runs.top1_err[0] == 100.0
    calls = _counting(monkeypatch)
    run_study(spec, tmp_path)
    assert calls == []  # not retried


@pytest.mark.slow
def test_bad_input_inside_a_trial_stops_the_study_without_a_failed_row(tmp_path, monkeypatch):
    from vitexp.errors import UserError

    spec = _stability(samples=2)
    keys = [t.key() for t in trials(spec)]
    _counting(monkeypatch, {keys[0]: UserError("cifar10 not found in /nowhere; copy its files there")})
    with pytest.raises(UserError, match="cifar10"):
        run_study(spec, tmp_path)
    assert not list(tmp_path.iterdir())  # the refused run left the folder as it found it: empty


# -- two processes, claims, leftovers -------------------------------------------------

@pytest.mark.slow
def test_two_processes_on_one_folder_run_every_trial_exactly_once(tmp_path):
    out = tmp_path / "shared"
    args = ["stability", "--samples", "4", "--epochs", "1", "--n-train", "128", "--n-test", "64",
            "--batch-size", "64", "--device", "cpu", "--no-plot", "--no-progress", "--models", MODEL]
    procs = [_start(out, args, log=tmp_path / f"p{i}.err") for i in range(2)]
    for i, p in enumerate(procs):
        assert p.wait(timeout=600) == 0, (tmp_path / f"p{i}.err").read_text()
    runs = check_consistent(out)
    assert len(runs) == 4 and (runs.status == "ok").all()
    # log.txt: one line per trial run ("trial KEY <label>: err ..."), from either process
    ran = [ln.split()[4] for ln in (out / "log.txt").read_text().splitlines() if ": err " in ln]
    assert sorted(ran) == sorted(runs.key), ran
    assert not list((out / "claims").iterdir())


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.mark.slow
def test_claims(tmp_path):
    import socket

    store, host = TrialStore(tmp_path), socket.gethostname()
    claim = tmp_path / "claims" / "k1"
    claim.write_text(json.dumps({"host": host, "pid": _dead_pid(), "time": time.time()}))
    assert store.claim("k1")  # a claim of a dead process is stale
    assert json.loads(claim.read_text())["pid"] == os.getpid()
    store.release("k1")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for _ in range(100):  # until the child has exec'd (its start time is final)
            if _start_time(live.pid) is not None:
                break
            time.sleep(0.01)
        claim.write_text(json.dumps({"host": host, "pid": live.pid, "start": _start_time(live.pid),
                                     "time": time.time()}))
        assert not store.claim("k1")  # a live process has it
        if _start_time(live.pid) is not None:  # the pid, reused by another process, does not hold it
            claim.write_text(json.dumps({"host": host, "pid": live.pid, "start": _start_time(live.pid) - 1,
                                         "time": time.time()}))
            assert store.claim("k1")
    finally:
        live.kill()
        live.wait()
    # another host: trusted for 24 h
    claim.write_text(json.dumps({"host": "elsewhere", "pid": 1, "time": time.time()}))
    assert not store.claim("k1")
    claim.write_text(json.dumps({"host": "elsewhere", "pid": 1, "time": time.time() - 25 * 3600}))
    assert store.claim("k1")
    store.release("k1")
    # a trial finished (by another process) since the caller planned is not claimed
    store.trial_path("k2").write_text(json.dumps({"key": "k2", "status": "ok"}))
    assert not store.claim("k2") and not store.claim("k2", seen={"key": "k2", "status": "ok"})
    failed = {"key": "k3", "status": "failed", "error": "x"}
    store.trial_path("k3").write_text(json.dumps(failed))
    assert store.claim("k3", seen=failed)  # failed when planned: retried
    store.release("k3")
    assert not store.claim("k3", seen=None)  # failed by someone else just now: not retried in this pass


def test_sweep_removes_leftovers_of_dead_writers_only(tmp_path):
    store = TrialStore(tmp_path)
    import socket

    host = tmp_path / "trials" / f".k1.json.{socket.gethostname()}.{_dead_pid()}.tmp"
    host.write_text("{")
    mine = tmp_path / f".runs.csv.{socket.gethostname()}.{os.getpid()}.tmp"
    mine.write_text("a,")
    foreign = tmp_path / "checkpoints" / ".k1.pt.otherhost.1.tmp"
    foreign.write_text("x")
    store.trial_path("k2").write_text(json.dumps({"key": "k2", "status": "ok"}))
    store.checkpoint_path("k2").write_text("stale")  # finished trial: its checkpoint is garbage
    store.checkpoint_path("k3").write_text("in flight")  # unfinished: kept for the resume
    store.weights_path("k1").parent.mkdir()
    weights = store.weights_path("k1").with_name(f".k1.pt.{socket.gethostname()}.{_dead_pid()}.tmp")
    weights.write_text("half")  # kept weights a killed process was writing
    dead_claim = tmp_path / "claims" / "k3"
    dead_claim.write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid(), "time": time.time()}))
    assert store.claim("k4")
    removed = store.sweep()
    assert sorted(removed) == sorted([host, store.checkpoint_path("k2"), dead_claim, weights])
    assert mine.exists() and foreign.exists() and store.checkpoint_path("k3").exists()
    assert (tmp_path / "claims" / "k4").exists()  # ours: we are alive
    assert writer_tmp_path(tmp_path / "runs.csv").name == mine.name  # what writers here actually use


# -- doctor ----------------------------------------------------------------------------

def test_doctor_parts():
    from vitexp import doctor

    v = doctor.versions()
    assert torch.__version__.startswith(v["torch"]) and "python" in v
    assert v["timm"] == __import__("timm").__version__  # an optional extra, installed by the test extra
    assert doctor.device_report()["cuda available"] in ("True", "False")
    step = doctor.tiny_step("cpu")
    assert step["status"] == "ok" and step["finite"] == "True" and step["device"] == "cpu"


def test_doctor_prints_extras_and_a_source_tree(monkeypatch):
    """A missing extra's hint keeps its brackets (rich once read '[slurm]' as markup and printed
    'pip install 'vitexp''), and vitexp run from a source tree shows its version, not MISSING."""
    from importlib import metadata

    from typer.testing import CliRunner

    from vitexp import __version__, doctor
    from vitexp.cli import app

    real = metadata.version

    def version(name):
        if name in ("vitexp", "submitit"):
            raise metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(doctor.metadata, "version", version)
    v = doctor.versions()
    assert v["vitexp"].startswith(f"{__version__} (not installed; from ") and v["submitit"].endswith("'vitexp[slurm]')")
    monkeypatch.setattr(doctor, "tiny_step", lambda device: {"status": "ok"})
    monkeypatch.setattr(doctor, "data_report", lambda data_dir: {})
    result = CliRunner().invoke(app, ["doctor", "--device", "cpu"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "pip install 'vitexp[slurm]'" in result.stdout


@pytest.mark.slow
def test_doctor_cli():
    p = run_cli("doctor", "--device", "cpu")
    assert p.returncode == 0, p.stderr
    for section in ("versions", "device", "data", "tiny training step", "torch", "shapes"):
        assert section in p.stdout
    assert "status           ok" in p.stdout


@pytest.mark.parametrize("key", ["054134010394", "740734e33302"])
def test_keys_that_look_like_numbers_survive_the_rebuild(tmp_path, key):
    """A hex key of digits (or digits, 'e', digits) once came back from a one-trial
    history file as 54134010394 or inf, so history.csv lost its trial."""
    store = TrialStore(tmp_path)
    store.record(key, {"key": key, "status": "ok", "model": "m", "top1_err": 50.0},
                 history=[{"key": key, "epoch": 1, "train_loss": 1.0}])
    store.rebuild()
    hist = pd.read_csv(tmp_path / "history.csv", dtype={"key": str})
    assert hist.key.tolist() == [key]
    assert pd.read_csv(tmp_path / RUNS, dtype={"key": str}).key.tolist() == [key]
    assert read_runs(tmp_path).key.tolist() == [key]  # the reader every command uses


@pytest.mark.slow
def test_a_killed_parent_takes_its_packed_workers_with_it(tmp_path):
    """On the CPU a study runs one worker process per core; SIGKILL of the study must not
    leave workers training on (they would hold claims and write after the user's rerun)."""
    out = tmp_path / "packed"
    args = ["stability", "--samples", "2", "--epochs", "50", "--n-train", "256", "--n-test", "64",
            "--batch-size", "64", "--device", "cpu", "--no-plot", "--no-progress", "--models", MODEL,
            "--workers", "2"]
    proc = _start(out, args, log=tmp_path / "err")
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / "claims").glob("*"))) < 2:
        time.sleep(0.2)
    claims = [json.loads(p.read_text()) for p in (out / "claims").glob("*")]
    assert len(claims) == 2, (tmp_path / "err").read_text()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 30
    while time.time() < deadline and any(_start_time(c["pid"]) == c["start"] for c in claims):
        time.sleep(0.2)
    assert not any(_start_time(c["pid"]) == c["start"] for c in claims), "a worker outlived its parent"


def test_train_runs_its_trial_as_a_study_does(tmp_path, monkeypatch, cli):
    """`vitexp train` goes the studies' way: a trial that raises is recorded as failed with its
    reason (no traceback, exit non-zero, the log says why), no study.toml is written, and the
    rerun trains it again and says done."""
    import vitexp.trainer

    args = ["train", "--model", "vit_p_7mf", "--epochs", "1", "--n-train", "64", "--n-test", "32", "--batch-size",
            "32", "--device", "cpu", "--out", tmp_path]
    real = vitexp.trainer.run_trial

    def broken(cfg, **kw):
        raise OSError("image file is truncated (3 bytes not processed)")

    monkeypatch.setattr(vitexp.trainer, "run_trial", broken)
    failed = cli(*args)
    assert failed.returncode not in (0, 2) and "Traceback" not in failed.stderr + failed.stdout
    assert "every trial failed" in failed.stderr and "image file is truncated" in failed.stderr
    runs = pd.read_csv(tmp_path / RUNS)
    assert list(runs.status) == ["failed"] and "FAILED" in (tmp_path / "log.txt").read_text()
    assert not (tmp_path / "study.toml").exists()
    monkeypatch.setattr(vitexp.trainer, "run_trial", real)
    done = cli(*args)
    assert done.returncode == 0 and "done: vit_p_7mf" in done.stdout
    assert list(pd.read_csv(tmp_path / RUNS).status) == ["ok"]
