"""Results on disk: one folder per study (or per `vitexp train --out`).

    DIR/trials/<key>.json          one finished trial: its runs.csv row
    DIR/trials/<key>.history.csv   its per-epoch rows
    DIR/checkpoints/<key>.pt       the checkpoint of a trial in flight
    DIR/claims/<key>               which process is running a trial
    DIR/runs.csv, DIR/history.csv  tidy tables, rebuilt from trials/

A trial counts as finished once its json exists, and every file is written to a
temporary name and renamed, so a kill at any moment leaves either the old or the
new file, never half of one. The tables are derived data: rebuilding them from
trials/ under a lock makes concurrent writers safe.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import socket
import subprocess
import time
from pathlib import Path

import pandas as pd

from vitexp.errors import UserError
from vitexp.rows import HISTORY_COLUMNS, HISTORY_IDENTITY, RUN_COLUMNS
from vitexp.rows import converged as rows_converged

RUNS = "runs.csv"
HISTORY = "history.csv"


TMP_SUFFIX = ".tmp"


def tmp_path(path: Path) -> Path:
    """The temporary name a writer of `path` uses before its rename: hidden, and
    naming the writer (host, pid) so leftovers of a killed writer can be swept."""
    path = Path(path)
    return path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}{TMP_SUFFIX}")


def _tmp_owner(name: str) -> tuple[str, int] | None:
    """(host, pid) of a tmp_path name, None for any other name."""
    if not (name.startswith(".") and name.endswith(TMP_SUFFIX)):
        return None
    head, _, pid = name[: -len(TMP_SUFFIX)].rpartition(".")
    host = socket.gethostname()
    if not pid.isdigit() or not head.endswith("." + host):
        return None
    return host, int(pid)


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file and rename; leave an identical file untouched
    (a rerun that finds nothing to do changes no file)."""
    path = Path(path)
    if path.exists() and path.stat().st_size == len(text.encode()) and path.read_text() == text:
        return
    tmp = tmp_path(path)
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_csv(path: Path, df: pd.DataFrame) -> None:
    atomic_write_text(path, df.to_csv(index=False))


def _jsonable(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def provenance() -> dict:
    """Where and with what a result was made: commit, versions, host."""
    import torch

    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    from vitexp import __version__

    return {"commit": commit or "unknown", "vitexp": __version__, "torch": torch.__version__,
            "host": socket.gethostname()}


class TrialStore:
    """The trial folder of one study: which trials are done, claimed, recorded."""

    def __init__(self, root: str | Path, create: bool = True):
        self.root = Path(root)
        if create:
            try:
                for sub in ("trials", "checkpoints", "claims"):
                    (self.root / sub).mkdir(parents=True, exist_ok=True)
                probe = tmp_path(self.root / "write-test")
                probe.write_text("")
                probe.unlink()
            except OSError as e:
                raise UserError(f"cannot write to output folder {self.root} ({e.strerror}); "
                                f"pick a writable --out") from None
            self.sweep()  # leftovers of killed runs

    # -- locking ------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self):
        """An exclusive lock on the folder (POSIX advisory, shared file systems included)."""
        with open(self.root / ".lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    # -- state ----------------------------------------------------------------
    def trial_path(self, key: str) -> Path:
        return self.root / "trials" / f"{key}.json"

    def checkpoint_path(self, key: str) -> Path:
        return self.root / "checkpoints" / f"{key}.pt"

    def result(self, key: str) -> dict | None:
        p = self.trial_path(key)
        if not p.exists():
            return None
        return json.loads(p.read_text())

    def finished(self) -> dict[str, dict]:
        """key -> row of every recorded trial (failed ones included)."""
        out = {}
        for p in sorted((self.root / "trials").glob("*.json")):
            try:
                out[p.stem] = json.loads(p.read_text())
            except (OSError, json.JSONDecodeError):
                continue  # only a foreign file can be partial: ours are renamed into place
        return out

    def done_keys(self) -> set[str]:
        """Trials that need no rerun: finished ok (diverged counts as a result)."""
        return {k for k, r in self.finished().items() if r.get("status") == "ok"}

    # -- claims: one process per trial -----------------------------------------
    def claim(self, key: str, seen: dict | None = None) -> bool:
        """Take the trial for this process. False if another live process has it, or
        if its record changed since the caller planned its work (`seen`: the record
        it saw then, None for none): another process finished it meanwhile. Both
        checks and the claim happen under the folder lock, so no two processes
        ever run one trial."""
        path = self.root / "claims" / key
        me = {"host": socket.gethostname(), "pid": os.getpid(), "start": _start_time(os.getpid()),
              "time": time.time()}
        with self.lock():
            now = self._read(self.trial_path(key))
            if now is not None and (now.get("status") == "ok" or now != seen):
                return False
            if path.exists():
                other = self._read(path) or {}
                if other.get("pid") == os.getpid() and other.get("host") == me["host"]:
                    return True
                if _alive(other):
                    return False
            atomic_write_text(path, json.dumps(me))
            return True

    @staticmethod
    def _read(path: Path) -> dict | None:
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def release(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.root / "claims" / key).unlink()

    def sweep(self) -> list[Path]:
        """Remove what killed processes of this host left behind: half-written
        temporary files, their claims, and checkpoints of trials that finished (a
        kill between the record and the checkpoint's removal). Returns the removed paths."""
        removed = []
        with self.lock():
            done = {k for k, r in self.finished().items() if r.get("status") == "ok"}
            ckpts, claims = self.root / "checkpoints", self.root / "claims"
            for sub in (self.root, self.root / "trials", ckpts, claims):
                for p in sub.iterdir():
                    owner = _tmp_owner(p.name)
                    dead_tmp = owner is not None and not _alive({"host": owner[0], "pid": owner[1]})
                    done_ckpt = sub == ckpts and p.suffix == ".pt" and p.stem in done
                    claim = self._read(p) if sub == claims and owner is None else None
                    dead_claim = claim is not None and not _alive(claim)
                    if (dead_tmp or done_ckpt or dead_claim) and p.is_file():
                        with contextlib.suppress(FileNotFoundError):
                            p.unlink()
                            removed.append(p)
        return removed

    # -- recording ------------------------------------------------------------
    def record(self, key: str, row: dict, history: list[dict] | None = None) -> None:
        """Write one finished trial (history first: the json is the commit point)."""
        if history is not None:
            atomic_write_csv(self.root / "trials" / f"{key}.history.csv", pd.DataFrame(history))
        atomic_write_text(self.trial_path(key), json.dumps({k: _jsonable(v) for k, v in row.items()},
                                                            sort_keys=True))
        with contextlib.suppress(FileNotFoundError):
            self.checkpoint_path(key).unlink()
        self.rebuild()

    def rebuild(self) -> None:
        """Regenerate runs.csv and history.csv from trials/ (atomic, under the lock). Each
        history row carries its trial's identifying columns, so a learning curve needs no join."""
        with self.lock():
            rows = self.finished()
            hist = {k: self._history(k) for k in rows}
            for key, row in rows.items():  # rows recorded before the convergence rule existed
                if "converged" not in row and row.get("status") == "ok" and hist[key] is not None:
                    row["converged"] = _converged(row, hist[key])
            runs = pd.DataFrame(list(rows.values()))
            if not runs.empty:
                first = [c for c in RUN_COLUMNS if c in runs.columns]
                runs = runs[first + sorted(c for c in runs.columns if c not in first)]
                runs = runs.sort_values(["study", "key"] if "study" in runs else ["key"], kind="stable")
            atomic_write_csv(self.root / RUNS, runs)
            parts = [h.assign(**{c: rows[k].get(c) for c in HISTORY_IDENTITY})
                     for k, h in hist.items() if h is not None]
            atomic_write_csv(self.root / HISTORY, pd.concat(parts, ignore_index=True) if parts else pd.DataFrame())

    def _history(self, key: str) -> pd.DataFrame | None:
        path = self.root / "trials" / f"{key}.history.csv"
        try:  # keys are hex strings: '054134010394' or '740734e33302' must not parse as numbers
            h = pd.read_csv(path, dtype={"key": str})
        except (FileNotFoundError, pd.errors.EmptyDataError):
            return None
        return h[[c for c in HISTORY_COLUMNS if c in h.columns]]


def _converged(row: dict, history: pd.DataFrame) -> bool:
    col = "ema_err" if row.get("ema", True) in (True, "True", "true") else "test_err"
    evals = [(int(e), float(v)) for e, v in zip(history["epoch"], history[col]) if v == v]
    return not row.get("diverged") and rows_converged(evals, int(row["epochs"]))


def _start_time(pid: int) -> int | None:
    """When a process started (clock ticks since boot, Linux), to tell a reused pid
    from the process that wrote a claim; None where /proc is not there."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat[stat.rindex(")") + 2:].split()[19])  # field 22 of proc(5)
    except (OSError, ValueError, IndexError):
        return None


def _alive(claim: dict) -> bool:
    """Is the claiming process still running? Same host: ask the OS (and check that
    the pid was not reused since); other hosts: trust the claim for 24 h (a crashed
    remote process frees its trials after that)."""
    if claim.get("host") == socket.gethostname():
        try:
            pid = int(claim.get("pid", -1))
            if pid <= 0:
                return False
            os.kill(pid, 0)
        except (ProcessLookupError, ValueError, TypeError):
            return False
        except PermissionError:
            pass
        start = claim.get("start")
        return start is None or _start_time(pid) in (None, start)
    try:
        return time.time() - float(claim.get("time", 0)) < 24 * 3600
    except (TypeError, ValueError):
        return False


def read_runs(folder: str | Path, required=("model", "top1_err")) -> pd.DataFrame:
    """runs.csv of a results folder, checked for the columns a caller needs."""
    path = Path(folder)
    path = path / RUNS if path.is_dir() else path
    if not path.exists():
        raise UserError(f"no {RUNS} in {folder}; run a study with --out {folder} first")
    try:
        df = pd.read_csv(path, dtype={"key": str})
    except pd.errors.EmptyDataError:
        df = pd.DataFrame()
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not a readable CSV ({str(e).splitlines()[0]}); rerun the study to rebuild it")
    if df.empty:
        raise UserError(f"{path} has no runs yet; run a study into {folder} first")
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise UserError(f"{path} lacks column(s) {', '.join(missing)}; give a folder written by a vitexp "
                        f"study, or rerun its study to rebuild runs.csv")
    return df
