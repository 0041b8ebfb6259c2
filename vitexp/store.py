"""Results on disk: one folder per study (or per `vitexp train --out`).

    DIR/trials/<key>.json          one finished trial: its runs.csv row
    DIR/trials/<key>.history.csv   its per-epoch rows
    DIR/checkpoints/<key>.pt       the checkpoint of a trial in flight
    DIR/claims/<key>               which process is running a trial (and its heartbeat)
    DIR/runs.csv, DIR/history.csv  tidy tables, rebuilt from trials/

A trial counts as finished once its json exists, and every file is written to a
temporary name and renamed (`atomic_write`), so a kill at any moment leaves either the
old or the new file, never half of one. The tables are derived data: rebuilding them
from trials/ under a lock makes concurrent writers safe. A file in the folder that
cannot be read (a foreign or damaged one) is renamed `*.corrupt`, named in the log,
and its trial runs again.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import fcntl
import json
import logging
import math
import os
import socket
import subprocess
import time
from pathlib import Path

import pandas as pd

from vitexp.errors import UserError
from vitexp.fileio import DiskFull, _tmp_owner, atomic_write, atomic_write_csv, tmp_path
from vitexp.rows import HISTORY_COLUMNS, HISTORY_IDENTITY, RUN_COLUMNS
from vitexp.rows import converged as rows_converged

RUNS = "runs.csv"
HISTORY = "history.csv"
CORRUPT_SUFFIX = ".corrupt"
# a claim's heartbeat is renewed this often while its trial runs; one older than STALE_S
# belongs to a process that is gone (killed, preempted, its node lost), on any host
HEARTBEAT_S = 10.0
STALE_S = 300.0
log = logging.getLogger("vitexp.store")


def _jsonable(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


@functools.lru_cache(maxsize=1)
def provenance() -> dict:
    """Where and with what a result was made: the commit (with -dirty when vitexp/ differs
    from it), versions, host. Read once per process, when its first trial starts: the code a
    process runs is what it loaded then, whatever is committed while it runs."""
    import torch

    from vitexp import __version__

    here = Path(__file__).parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                                cwd=here, timeout=5).stdout.strip()
        dirty = commit and subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "."], cwd=here,
                                          capture_output=True, timeout=5).returncode == 1
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", False
    return {"commit": (commit + ("-dirty" if dirty else "")) or "unknown", "vitexp": __version__,
            "torch": torch.__version__, "host": socket.gethostname()}


def set_aside(path: Path, why: str) -> None:
    """Rename a file vitexp cannot read to PATH.corrupt (kept for a look, never read again)."""
    with contextlib.suppress(OSError):
        os.replace(path, path.with_name(path.name + CORRUPT_SUFFIX))
        log.warning("%s is unreadable (%s); set aside as %s%s, its trial runs again", path, why, path.name,
                    CORRUPT_SUFFIX)


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
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise DiskFull(f"no space left on the device of {self.root}; free some space and rerun") from None
                raise UserError(f"cannot write to output folder {self.root} ({e.strerror}); "
                                f"pick a writable --out") from None
            self.sweep()  # leftovers of killed runs

    # -- locking ------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self):
        """An exclusive lock on the folder (POSIX advisory, shared file systems included)."""
        path = self.root / ".lock"
        if path.exists() and not path.is_file():
            set_aside(path, "not a file")
        with open(path, "a") as f:
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
        return self._row(self.trial_path(key))

    def _row(self, path: Path) -> dict | None:
        """A trial's recorded row; an unreadable one is set aside (None: run it again)."""
        try:
            row = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            set_aside(path, type(e).__name__)
            return None
        if not isinstance(row, dict) or not isinstance(row.get("status"), str):
            set_aside(path, "not a trial record")
            return None
        return row

    def finished(self) -> dict[str, dict]:
        """key -> row of every recorded trial (failed ones included)."""
        out = {}
        for p in sorted((self.root / "trials").glob("*.json")):
            row = self._row(p)
            if row is not None:
                out[p.stem] = row
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
        with self.lock():
            now = self.result(key)
            if now is not None and (now.get("status") == "ok" or now != seen):
                return False
            other = self._read(path) if path.exists() else None
            if other is not None and not _mine(other) and _alive(other):
                return False
            atomic_write(path, json.dumps(_me()))
            return True

    def beat(self, key: str, images: float = 0.0) -> None:
        """Renew this process's claim of KEY (its heartbeat), with the training images done."""
        path = self.root / "claims" / key
        claim = self._read(path)
        if claim is not None and _mine(claim):
            atomic_write(path, json.dumps({**claim, "beat": time.time(), "images": images}))

    def claims(self) -> dict[str, dict]:
        """key -> claim of every trial some live process is running."""
        out = {}
        for p in sorted((self.root / "claims").glob("*")):
            c = self._read(p) if _tmp_owner(p.name) is None and not p.name.startswith(".") else None
            if c is not None and _alive(c):
                out[p.name] = c
        return out

    @staticmethod
    def _read(path: Path) -> dict | None:
        try:
            d = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return d if isinstance(d, dict) else None

    def release(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.root / "claims" / key).unlink()

    def sweep(self) -> list[Path]:
        """Remove what dead processes left behind: half-written temporary files of this
        host, claims of dead processes (any host, by heartbeat), and checkpoints of
        trials that finished (a kill between the record and the checkpoint's removal)."""
        removed = []
        with self.lock():
            done = self.done_keys()
            ckpts, claims = self.root / "checkpoints", self.root / "claims"
            for sub in (self.root, self.root / "trials", ckpts, claims, self.root / "figures"):
                for p in sub.iterdir() if sub.is_dir() else ():
                    owner = _tmp_owner(p.name)
                    dead_tmp = owner is not None and not _pid_alive(owner[1])
                    done_ckpt = sub == ckpts and p.suffix == ".pt" and p.stem in done
                    claim = self._read(p) if sub == claims and owner is None else None
                    dead_claim = sub == claims and owner is None and (claim is None or not _alive(claim))
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
        atomic_write(self.trial_path(key), json.dumps({k: _jsonable(v) for k, v in row.items()}, sort_keys=True))
        with contextlib.suppress(FileNotFoundError):
            self.checkpoint_path(key).unlink()
        self.rebuild()

    def rebuild(self) -> None:
        """Regenerate runs.csv and history.csv from trials/ (each atomic, under the lock). Each
        history row carries its trial's identifying columns, so a learning curve needs no join.
        history.csv goes first: killed between the two, every run in runs.csv still has its curve
        (history.csv may hold one more trial's until the next rebuild)."""
        with self.lock():
            rows = self.finished()
            hist = {k: self._history(k, r) for k, r in rows.items()}
            rows = {k: r for k, r in rows.items() if hist[k] is not False}  # garbled history: rerun
            for key, row in rows.items():  # rows recorded before the convergence rule existed
                if "converged" not in row and row.get("status") == "ok" and hist[key] is not None and "epochs" in row:
                    row["converged"] = _converged(row, hist[key])
            runs = pd.DataFrame(list(rows.values()))
            if not runs.empty:
                first = [c for c in RUN_COLUMNS if c in runs.columns]
                runs = runs[first + sorted(c for c in runs.columns if c not in first)]
                runs = runs.sort_values(["study", "key"] if "study" in runs else ["key"], kind="stable")
            parts = [h.assign(**{c: rows[k].get(r) for c, r in HISTORY_IDENTITY.items()})
                     for k, h in hist.items() if k in rows and h is not None]
            atomic_write_csv(self.root / HISTORY, pd.concat(parts, ignore_index=True) if parts else pd.DataFrame())
            atomic_write_csv(self.root / RUNS, runs)

    def _history(self, key: str, row: dict):
        """A trial's history (None: it has none, e.g. a failed trial; False: garbled, and
        set aside with its record so the trial runs again)."""
        path = self.root / "trials" / f"{key}.history.csv"
        try:  # keys are hex strings: '054134010394' or '740734e33302' must not parse as numbers
            h = pd.read_csv(path, dtype={"key": str})
        except (FileNotFoundError, pd.errors.EmptyDataError):
            return None
        except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as e:
            h, why = None, type(e).__name__
        else:
            why = None if {"key", "epoch"} <= set(h.columns) else "no key and epoch columns"
        if why is None:
            return h.reindex(columns=HISTORY_COLUMNS)
        set_aside(path, why)
        set_aside(self.trial_path(key), f"its history is {why}")
        return False


def _converged(row: dict, history: pd.DataFrame) -> bool:
    col = "ema_err" if str(row.get("ema", True)).lower() == "true" else "test_err"
    evals = [(int(e), float(v)) for e, v in zip(history["epoch"], history[col]) if v == v]
    return str(row.get("diverged")).lower() != "true" and rows_converged(evals, int(row["epochs"]))


def _me() -> dict:
    now = time.time()
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": _start_time(os.getpid()), "time": now,
            "beat": now, "images": 0.0}


def _mine(claim: dict) -> bool:
    return claim.get("host") == socket.gethostname() and claim.get("pid") == os.getpid()


def _start_time(pid: int) -> int | None:
    """When a process started (clock ticks since boot, Linux), to tell a reused pid
    from the process that wrote a claim; None where /proc is not there."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat[stat.rindex(")") + 2:].split()[19])  # field 22 of proc(5)
    except (OSError, ValueError, IndexError):
        return None


def _pid_alive(pid) -> bool:
    """Does a process with this pid exist on this host?"""
    try:
        pid = int(pid)
        if pid <= 0:
            return False
        os.kill(pid, 0)
    except (ProcessLookupError, ValueError, TypeError, OverflowError):
        return False
    except PermissionError:
        pass
    return True


def _alive(claim: dict) -> bool:
    """Is the claiming process still running? On this host, when the claim names the
    process's start time: ask the OS (the pid exists and was not reused). Otherwise (another
    host, or no start time): its heartbeat is younger than STALE_S."""
    try:
        age = time.time() - float(claim.get("beat", claim.get("time", 0)))
    except (TypeError, ValueError):
        return False
    if claim.get("host") != socket.gethostname():
        return age < STALE_S
    if not _pid_alive(claim.get("pid")):
        return False
    start, now = claim.get("start"), _start_time(int(claim["pid"]))
    return age < STALE_S if start is None or now is None else now == start


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
