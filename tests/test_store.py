"""The study folder has one owner: only vitexp/store.py knows its file names; the rest asks it.
And the store's reading helpers: new records by stamp, imports that leave the source as it was."""

import ast
import json

import pytest
import torch

from conftest import REPO
from vitexp.store import TrialStore
from vitexp.sweep import pool
from vitexp.ui import StudyProgress

LAYOUT = {"trials", "study.toml", "log.txt", "runs.csv", "history.csv", "checkpoints", "claims"}


def _all_names(tree) -> set[int]:
    """ids of the string constants listed in a module's __all__ (names, not paths)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            out |= {id(c) for c in ast.walk(node.value)}
    return out


def test_only_the_store_names_the_folder_layout():
    found = []
    for p in (REPO / "vitexp").rglob("*.py"):
        if p.name == "store.py":
            continue
        tree = ast.parse(p.read_text())
        skip = _all_names(tree)
        found += [f"{p.relative_to(REPO)}:{n.lineno} {n.value!r}" for n in ast.walk(tree)
                  if isinstance(n, ast.Constant) and n.value in LAYOUT and id(n) not in skip]
    assert not found, found


def _row(key, err=50.0, status="ok"):
    return {"key": key, "status": status, "model": "m", "top1_err": err, "last_err": err}


def test_new_records_reads_only_what_changed(tmp_path, monkeypatch):
    store, stamps = TrialStore(tmp_path), {}
    store.record("a", _row("a"))
    assert store.new_records(["a", "b"], stamps) == {"a": _row("a")}
    assert store.new_records(["a", "b"], stamps) == {}  # nothing new: no record read again
    reads = []
    monkeypatch.setattr(TrialStore, "result", lambda self, k: reads.append(k) or json.loads(self.trial_path(k).read_text()))
    store.record("b", _row("b", 40.0))
    assert store.new_records(["a", "b"], stamps) == {"b": _row("b", 40.0)} and reads == ["b"]


class _Proc:
    """A worker process stand-in: alive once, writing a record when first asked."""

    def __init__(self, store, key):
        self.store, self.key, self.calls = store, key, 0

    def is_alive(self):
        self.calls += 1
        if self.calls == 1:
            self.store.record(self.key, {**_row(self.key), "diverged": False, "converged": True})
            return True
        return False


def test_the_watcher_reports_new_records_without_scanning_the_folder(tmp_path, monkeypatch):
    from vitexp.config import TrainConfig

    store = TrialStore(tmp_path)
    cfg = TrainConfig(model="vit_p_7mf", n_train=64, epochs=1, lr=0.1, wd=0.0)
    store.record("old", _row("old"))  # another study's trial: never read by the watcher
    monkeypatch.setattr(TrialStore, "finished", lambda self: pytest.fail("the watcher scanned every record"))
    monkeypatch.setattr(pool, "POLL_S", 0.0)
    bar = StudyProgress(1, 64, enabled=False)
    bar.quiet = True
    pool.watch([_Proc(store, "k1")], store, {"k1": cfg}, bar)
    assert bar.done_trials == 1


def test_collect_leaves_its_inputs_byte_for_byte_and_names_what_it_left_out(tmp_path, caplog):
    from vitexp.sweep import collect

    a, b = TrialStore(tmp_path / "a"), TrialStore(tmp_path / "b")
    a.record("k1", _row("k1"), [{"key": "k1", "epoch": 1, "train_loss": 1.0}])
    b.record("k2", _row("k2"))
    b.trial_path("k3").write_text("{ damaged")
    before = {p: p.read_bytes() for p in (tmp_path / "b").rglob("*") if p.is_file()}
    runs = collect([tmp_path / "a", tmp_path / "b"], tmp_path / "c")
    assert sorted(runs.key) == ["k1", "k2"]
    assert {p: p.read_bytes() for p in (tmp_path / "b").rglob("*") if p.is_file()} == before
    assert (tmp_path / "c" / "trials" / "k1.history.csv").read_bytes() == a.history_path("k1").read_bytes()
    named = [r.getMessage() for r in caplog.records if "k3.json" in r.getMessage()]
    assert named and "left out" in named[0] and "JSONDecodeError" in named[0]


def test_fused_channels_last_keeps_values_and_lays_out_each_member():
    from vitexp.fused import channels_last

    x = torch.randn(3, 4, 5, 6, 7)
    y = channels_last(x)
    assert torch.equal(x, y)
    assert all(y[i].is_contiguous(memory_format=torch.channels_last) for i in range(3))
    assert channels_last(torch.randn(3, 8)).is_contiguous()  # not an image stack: as it was


def test_collect_refuses_a_train_folder_into_a_study_and_an_out_inside_an_input(tmp_path):
    from vitexp.errors import UserError
    from vitexp.sweep import collect

    study, train = TrialStore(tmp_path / "st"), TrialStore(tmp_path / "tr")
    study.write_spec('[study]\nkind = "stability"\n[train]\ndataset = "shapes"\n')
    study.record("k1", {**_row("k1"), "study": "stability"})
    train.record("k2", {**_row("k2"), "study": "train"})
    with pytest.raises(UserError, match="holds train runs, not a stability study"):
        collect([tmp_path / "st", tmp_path / "tr"], tmp_path / "col")
    with pytest.raises(UserError, match="lies inside the input"):
        collect([tmp_path / "st"], tmp_path / "st" / "trials")
    assert not (tmp_path / "col").exists() and not (tmp_path / "st" / "trials" / "trials").exists()


def test_a_beat_in_flight_never_writes_a_released_claim_back(tmp_path, monkeypatch):
    """The heartbeat ends before the block it guards is left: a beat that read the claim just
    before the trial ended must not write it back after the release (a claim nobody holds)."""
    import threading
    import time

    from vitexp import store as store_module

    st = TrialStore(tmp_path).create()
    assert st.claim("k")
    monkeypatch.setattr(store_module, "HEARTBEAT_S", 0.01)
    real_write, beating = store_module.atomic_write, threading.Event()

    def slow_write(path, data):  # the beat has read its claim; a slow disk: the block ends meanwhile
        beating.set()
        time.sleep(0.3)
        real_write(path, data)

    monkeypatch.setattr(store_module, "atomic_write", slow_write)
    with st.heartbeat(["k"], lambda: (0.0, 0)):
        assert beating.wait(5)
    st.release("k")
    time.sleep(0.5)
    assert st.claim_of("k") is None


def test_a_run_with_nothing_left_to_do_sweeps_the_claim_a_killed_run_left(tmp_path):
    """Killed just after writing its last record, a run leaves its claim behind; the next run
    finds nothing to train, and must still remove it (refresh, its one read, sweeps)."""
    import socket
    import subprocess
    import sys
    import time

    st = TrialStore(tmp_path).create()
    st.record("k", _row("k"))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (tmp_path / "claims" / "k").write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead),
                                                       "time": time.time(), "beat": time.time()}))
    assert set(st.refresh()) == {"k"}
    assert not (tmp_path / "claims" / "k").exists()
