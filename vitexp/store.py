"""Results on disk: one folder per study (or per `vitexp train --out`).

    DIR/trials/<key>.json          one finished trial: its runs.csv row
    DIR/trials/<key>.history.csv   its per-epoch rows
    DIR/checkpoints/<key>.pt       the checkpoint of a trial in flight
    DIR/claims/<key>               which process is running a trial (and its heartbeat)
    DIR/runs.csv, DIR/history.csv  tidy tables, rebuilt from trials/ when a run ends
    DIR/study.toml, DIR/log.txt    the resolved study spec (the latest command's); one line per event
    DIR/specs/<hash>.toml          every command's resolved spec (a folder several commands built)
    DIR/weights/<key>.pt           a finished trial's kept weights (the final evaluated model):
                                   written by `record`, read by `read_weights`, another
                                   folder's copied in by `stage_weights`
    DIR/tensorboard/<key>/         TensorBoard event files, when asked for
    DIR/figures/                   the figures `vitexp report` and the plot commands draw
    DIR/slurm/<job>/               submitit's logs of a `vitexp launch` job array

This module is the only code that knows these names: everything else asks the store.

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
import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pandas as pd

from vitexp.errors import UserError
from vitexp.fileio import DiskFull, _tmp_owner, atomic_write, atomic_write_csv, tmp_path
from vitexp.rows import HISTORY_COLUMNS, HISTORY_IDENTITY, RUN_COLUMNS
from vitexp.rows import CONVERGENCE_RULE, judged
from vitexp.tomlfile import read_toml

RUNS = "runs.csv"
HISTORY = "history.csv"
SPEC = "study.toml"
SPECS = "specs"  # every command's resolved study.toml, named by its hash: a folder several commands built
LOG = "log.txt"
TRIALS = "trials"
WEIGHTS = "weights"
FIGURES = "figures"
SLURM = "slurm"
CORRUPT_SUFFIX = ".corrupt"
# a claim's heartbeat is renewed this often while its trial runs; one older than STALE_S
# belongs to a process that is gone (killed, preempted, its node lost), on any host
HEARTBEAT_S = 10.0
STALE_S = 300.0
# a heartbeat further in the future than this is a clock gone wrong on its host, never a live process
FUTURE_S = 60.0
log = logging.getLogger("vitexp.store")


def _jsonable(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def is_study_folder(path: str | Path) -> bool:
    """Has PATH been written by a study or a `vitexp train` (it has a trials/ folder)?"""
    return (Path(path) / TRIALS).is_dir()


def set_aside(path: Path, why: str, then: str = "its trial runs again") -> None:
    """Rename a file vitexp cannot read to PATH.corrupt (kept for a look, never read again);
    THEN says what happens instead."""
    with contextlib.suppress(OSError):
        os.replace(path, path.with_name(path.name + CORRUPT_SUFFIX))
        log.warning("%s is unreadable (%s); set aside as %s%s, %s", path, why, path.name, CORRUPT_SUFFIX, then)


class TrialStore:
    """The trial folder of one study: which trials are done, claimed, recorded."""

    def __init__(self, root: str | Path, create: bool = True, repair: bool = True):
        self.root = Path(root)
        self.repair = repair  # False: only read, never set a damaged file aside (collect's inputs)
        if create:
            self.create()

    def create(self, done: set[str] | None = None) -> TrialStore:
        """Make the folder (checked writable) and sweep what killed runs left behind
        (DONE: the finished trials, when the caller has just listed them)."""
        try:
            for sub in (TRIALS, "checkpoints", "claims"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
            probe = tmp_path(self.root / "write-test")
            probe.write_text("")
            probe.unlink()
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFull(f"no space left on the device of {self.root}; free some space and rerun") from None
            raise UserError(f"cannot write to output folder {self.root} ({e.strerror}); "
                            f"pick a writable --out") from None
        self.sweep(done)
        return self

    def exists(self) -> bool:
        return is_study_folder(self.root)

    # -- the folder's other files ---------------------------------------------------
    @property
    def spec_path(self) -> Path:
        return self.root / SPEC

    @property
    def log_path(self) -> Path:
        return self.root / LOG

    @property
    def history_table(self) -> Path:
        return self.root / HISTORY

    def read_spec(self) -> dict | None:
        """The folder's study.toml (None: it has none), or one line saying why it cannot be read."""
        return read_toml(self.spec_path, "study file") if self.spec_path.exists() else None

    def write_spec(self, text: str) -> None:
        """study.toml (the latest command's) and a copy kept among every command's (`spec_paths`)."""
        atomic_write(self.spec_path, text)
        self.keep_spec(text)

    def keep_spec(self, text: str) -> None:
        """Keep TEXT among the folder's commands' specs (collect keeps its inputs' this way)."""
        (self.root / SPECS).mkdir(parents=True, exist_ok=True)
        atomic_write(self.root / SPECS / f"{hashlib.sha256(text.encode()).hexdigest()[:12]}.toml", text)

    def spec_paths(self) -> list[Path]:
        """The study.toml of every command that ran into the folder, oldest first (a folder from
        before they were kept: its one study.toml)."""
        kept = sorted((self.root / SPECS).glob("*.toml"), key=lambda p: p.stat().st_mtime_ns)
        return kept or ([self.spec_path] if self.spec_path.exists() else [])

    @property
    def figures_dir(self) -> Path:
        return self.root / FIGURES

    @property
    def slurm_dir(self) -> Path:
        return self.root / SLURM

    def tensorboard_dir(self, key: str) -> Path:
        return self.root / "tensorboard" / key

    def logger(self) -> logging.Logger:
        """The folder's log.txt: one line per event, with the time and the process id."""
        log = logging.getLogger(f"vitexp.study.{self.root.resolve()}")
        if not log.handlers:
            h = logging.FileHandler(self.log_path)
            h.setFormatter(logging.Formatter("%(asctime)s %(process)d %(message)s"))
            log.addHandler(h)
            log.setLevel(logging.INFO)
            log.propagate = False
            logging.getLogger("vitexp.store").addHandler(h)  # files set aside go into the log too
        return log

    def close_log(self) -> None:
        """Let go of log.txt (it may be removed; the next run opens it afresh)."""
        log = logging.getLogger(f"vitexp.study.{self.root.resolve()}")
        for h in list(log.handlers):
            h.close()
            log.removeHandler(h)
            logging.getLogger("vitexp.store").removeHandler(h)

    def snapshot(self) -> dict:
        """What the folder holds now, for `undo_on_refusal` (taken before a run writes anything)."""
        existed = self.root.is_dir()
        return {"existed": existed, "paths": set(self.root.rglob("*")) if existed else set(),
                "keep": {p: p.read_bytes() for p in (self.spec_path, self.log_path) if p.is_file()}}

    def claim_for(self, check, spec_text: str | None) -> None:
        """Make the folder and write its study.toml (SPEC_TEXT; None: a run that is no study) once
        CHECK (the folder check) passes under the folder lock: of two studies started together on
        one empty folder the second is refused.
        A refusal leaves the folder as it was (one made here goes again while it is empty)."""
        made = not self.root.is_dir()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot write to output folder {self.root} ({e.strerror}); pick a writable --out") from None
        try:
            with self.lock():
                check()
                if spec_text is not None:
                    self.write_spec(spec_text)
        except UserError:
            if made and {p.name for p in self.root.iterdir()} <= {".lock"}:
                with contextlib.suppress(OSError):
                    (self.root / ".lock").unlink()
                    self.root.rmdir()
            raise

    @contextlib.contextmanager
    def undo_on_refusal(self, before: dict | None = None):
        """Bad input found only once trials run (inside a trial, in a worker) leaves no trace,
        as long as no trial was recorded meanwhile: a folder made here is removed; an existing
        one loses what was added and gets its study.toml and log back (BEFORE: the `snapshot`
        taken before the run wrote anything). A full disk is a fault, not bad input: what was
        written (a checkpoint) stays, so the rerun resumes."""
        before = self.snapshot() if before is None else before
        try:
            yield
        except DiskFull:
            raise
        except UserError:
            self.close_log()
            if not any(p not in before["paths"] for p in (self.root / TRIALS).glob("*.json")):
                if not before["existed"]:
                    shutil.rmtree(self.root, ignore_errors=True)
                else:
                    for p in sorted(set(self.root.rglob("*")) - before["paths"], reverse=True):  # files first
                        with contextlib.suppress(OSError):
                            p.rmdir() if p.is_dir() else p.unlink()
                    for p, data in before["keep"].items():
                        atomic_write(p, data)
            raise

    # -- locking ------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self):
        """An exclusive lock on the folder (POSIX advisory, shared file systems included)."""
        path = self.root / ".lock"
        if path.exists() and not path.is_file():
            set_aside(path, "not a file", "a new lock file takes its place")
        with open(path, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    # -- state ----------------------------------------------------------------
    def trial_path(self, key: str) -> Path:
        return self.root / TRIALS / f"{key}.json"

    def history_path(self, key: str) -> Path:
        return self.root / TRIALS / f"{key}.history.csv"

    def checkpoint_path(self, key: str) -> Path:
        return self.root / "checkpoints" / f"{key}.pt"

    def weights_path(self, key: str) -> Path:
        """A finished trial's kept weights (the evaluated model at the end of training)."""
        return self.root / WEIGHTS / f"{key}.pt"

    def kept_weights(self) -> set[str]:
        """The keys whose weights this folder keeps."""
        return {p.stem for p in (self.root / WEIGHTS).glob("*.pt")}

    def result(self, key: str) -> dict | None:
        return self._row(self.trial_path(key))

    def _row(self, path: Path) -> dict | None:
        """A trial's recorded row; an unreadable one is set aside (None: run it again)."""
        try:
            row = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            self._unreadable(path, type(e).__name__)
            return None
        if not isinstance(row, dict) or not isinstance(row.get("status"), str):
            self._unreadable(path, "not a trial record")
            return None
        return row

    def _unreadable(self, path: Path, why: str) -> None:
        """Set a damaged record aside; in a folder only read (repair off), name it and leave it."""
        if self.repair:
            set_aside(path, why)
        else:
            log.warning("%s is unreadable (%s); left out (this folder is only read)", path, why)

    def finished(self) -> dict[str, dict]:
        """key -> row of every recorded trial (failed ones included)."""
        out = {}
        for p in sorted((self.root / TRIALS).glob("*.json")):
            row = self._row(p)
            if row is not None:
                out[p.stem] = row
        return out

    def done_keys(self) -> set[str]:
        """Trials that need no rerun: finished ok (diverged counts as a result)."""
        return {k for k, r in self.finished().items() if r.get("status") == "ok"}

    def new_records(self, keys, stamps: dict[str, int]) -> dict[str, dict]:
        """The records of KEYS written since STAMPS (key -> the file's mtime when last read,
        updated here): what a watcher polls, one stat per key instead of reading every record."""
        out = {}
        for key in keys:
            try:
                stamp = self.trial_path(key).stat().st_mtime_ns
            except OSError:
                continue
            if stamps.get(key) != stamp:
                stamps[key] = stamp
                row = self.result(key)
                if row is not None:
                    out[key] = row
        return out

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
            if other is not None and _future(other):
                log.warning("the claim of %s by %s pid %s has its heartbeat %.0f s in the future (a clock off on "
                            "that host?); taken as stale, the trial runs here", key, other.get("host"),
                            other.get("pid"), -claim_age(other))
            atomic_write(path, json.dumps(_me()))
            return True

    def beat(self, key: str, images: float = 0.0, resumed: int = 0) -> None:
        """Renew this process's claim of KEY (its heartbeat), with the training images done
        and the epoch the trial resumed from (0: it started afresh)."""
        path = self.root / "claims" / key
        claim = self._read(path)
        if claim is not None and _mine(claim):
            atomic_write(path, json.dumps({**claim, "beat": time.time(), "images": images, "resumed": resumed}))

    @contextlib.contextmanager
    def heartbeat(self, keys: list[str], progress):
        """Renew the claims of KEYS every HEARTBEAT_S while the block runs, with PROGRESS()
        = (training images done per trial, the epoch the trials resumed from)."""
        stop = threading.Event()

        def beat():
            while not stop.wait(HEARTBEAT_S):
                images, resumed = progress()
                for key in keys:
                    with contextlib.suppress(OSError):
                        self.beat(key, images, resumed)

        beating = threading.Thread(target=beat, daemon=True)
        beating.start()
        try:
            yield
        finally:
            stop.set()
            beating.join()  # a beat in flight must not write the claim back after its release

    def claim_of(self, key: str) -> dict | None:
        """The claim of KEY as it stands (None: nobody has it)."""
        return self._read(self.root / "claims" / key)

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

    def sweep(self, done: set[str] | None = None) -> list[Path]:
        """Remove what dead processes left behind: half-written temporary files of this
        host, claims of dead processes (any host, by heartbeat), and checkpoints of
        trials that finished (DONE, else read here; a kill between the record and the
        checkpoint's removal)."""
        removed = []
        with self.lock():
            done = self.done_keys() if done is None else done
            ckpts, claims = self.root / "checkpoints", self.root / "claims"
            for sub in (self.root, self.root / TRIALS, ckpts, claims, self.figures_dir, self.root / WEIGHTS):
                for p in sub.iterdir() if sub.is_dir() else ():
                    owner = _tmp_owner(p.name)
                    dead_tmp = owner is not None and not _pid_alive(owner[1])
                    done_ckpt = sub == ckpts and p.suffix == ".pt" and p.stem in done
                    claim = self._read(p) if sub == claims and owner is None else None
                    dead_claim = sub == claims and owner is None and (claim is None or not _alive(claim))
                    if dead_claim and claim is not None and _future(claim):
                        log.warning("the claim of %s by %s pid %s has its heartbeat %.0f s in the future (a clock "
                                    "off on that host?); taken as stale", p.name, claim.get("host"),
                                    claim.get("pid"), -claim_age(claim))
                    if (dead_tmp or done_ckpt or dead_claim) and p.is_file():
                        with contextlib.suppress(FileNotFoundError):
                            p.unlink()
                            removed.append(p)
        return removed

    # -- recording ------------------------------------------------------------
    def record(self, key: str, row: dict, history: list[dict] | None = None, weights: dict | None = None) -> None:
        """Write one finished trial's own files (its kept weights and history first: the json
        is the commit point); the tables follow when the run ends (`rebuild`)."""
        if weights is not None:
            import torch

            self.weights_path(key).parent.mkdir(exist_ok=True)
            atomic_write(self.weights_path(key), lambda f: torch.save(weights, f))
        if history is not None:
            atomic_write_csv(self.history_path(key), pd.DataFrame(history))
        atomic_write(self.trial_path(key), json.dumps({k: _jsonable(v) for k, v in row.items()}, sort_keys=True))
        with contextlib.suppress(FileNotFoundError):
            self.checkpoint_path(key).unlink()

    def stage_weights(self, src: Path, key: str) -> None:
        """Another folder's kept weights SRC copied in as KEY's, atomically, once (a fine-tune or
        a student reads its source from its own folder, so the folder moves, shards and
        collects as one)."""
        dest = self.weights_path(key)
        if dest.exists() or dest.resolve() == Path(src).resolve():
            return
        dest.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(dest, Path(src).read_bytes())

    def import_trial(self, src: TrialStore, key: str) -> None:
        """Copy another folder's finished trial here, byte for byte (its kept weights and history
        first: the json is the commit point); SRC is only read."""
        for mine, theirs in ((self.weights_path(key), src.weights_path(key)),
                             (self.history_path(key), src.history_path(key))):
            if theirs.exists():
                mine.parent.mkdir(exist_ok=True)
                atomic_write(mine, theirs.read_bytes())
        atomic_write(self.trial_path(key), src.trial_path(key).read_bytes())

    def runs(self) -> pd.DataFrame:
        """runs.csv as it stands (empty when there is none yet)."""
        try:
            return pd.read_csv(self.root / RUNS, dtype={"key": str})
        except (FileNotFoundError, pd.errors.EmptyDataError):
            return pd.DataFrame()

    def run_kinds(self) -> set[str]:
        """The study kinds runs.csv names (empty when it has none or cannot be read)."""
        try:
            return set(map(str, pd.read_csv(self.root / RUNS, usecols=["study"])["study"]))
        except (OSError, ValueError, pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError):
            return set()

    def refresh(self) -> dict[str, dict]:
        """key -> row of every record, the tables rebuilt and what dead processes left swept on
        the way where the folder can be written (a run killed outright leaves its tables behind
        its records, and its claim behind a record it had just written: a run with nothing left
        to do must clean that up too); none when there is no folder."""
        if not self.exists():
            return {}
        try:
            rows = self.rebuild()
            self.sweep({k for k, r in rows.items() if r.get("status") == "ok"})
            return rows
        except OSError:
            return self.finished()

    def rebuild(self) -> dict[str, dict]:
        """Regenerate runs.csv and history.csv from trials/ (each atomic, under the lock). Each
        history row carries its trial's identifying columns, so a learning curve needs no join.
        history.csv goes first: killed between the two, every run in runs.csv still has its curve
        (history.csv may hold one more trial's until the next rebuild). Returns key -> row of
        every readable record, as `finished` (what cannot be read is set aside here)."""
        with self.lock():
            rows = self.finished()
            hist = {k: self._history(k, r) for k, r in rows.items()}
            rows = {k: r for k, r in rows.items() if hist[k] is not False}  # garbled history: rerun
            for key, row in rows.items():  # rows recorded before the convergence rule existed
                if "converged" not in row and row.get("status") == "ok" and hist[key] is not None and "epochs" in row:
                    row["converged"] = _converged(row, hist[key])
                    row["converged_rule"] = CONVERGENCE_RULE
            runs = pd.DataFrame(list(rows.values()))
            if not runs.empty:
                first = [c for c in RUN_COLUMNS if c in runs.columns]
                runs = runs[first + sorted(c for c in runs.columns if c not in first)]
                runs = runs.sort_values(["study", "key"] if "study" in runs else ["key"], kind="stable")
            parts = [h.assign(**{c: rows[k].get(r) for c, r in HISTORY_IDENTITY.items()})
                     for k, h in hist.items() if k in rows and h is not None]
            atomic_write_csv(self.root / HISTORY, pd.concat(parts, ignore_index=True) if parts else pd.DataFrame())
            atomic_write_csv(self.root / RUNS, runs)
        return rows

    def _history(self, key: str, row: dict):
        """A trial's history (None: it has none, e.g. a failed trial; False: garbled, and
        set aside with its record so the trial runs again)."""
        path = self.history_path(key)
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
    return judged(row, history.to_dict("records"))


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


def claim_age(claim: dict) -> float:
    """Seconds since the claim's last heartbeat (inf when it has none it can read)."""
    try:
        return time.time() - float(claim.get("beat", claim.get("time", 0)))
    except (TypeError, ValueError):
        return math.inf


def _future(claim: dict) -> bool:
    return claim_age(claim) < -FUTURE_S


def _alive(claim: dict) -> bool:
    """Is the claiming process still running? On this host, when the claim names the
    process's start time: ask the OS (the pid exists and was not reused). Otherwise (another
    host, or no start time): its heartbeat is younger than STALE_S, and not in the future."""
    age = claim_age(claim)
    if not math.isfinite(age) or age < -FUTURE_S:
        return False
    if claim.get("host") != socket.gethostname():
        return age < STALE_S
    if not _pid_alive(claim.get("pid")):
        return False
    start, now = claim.get("start"), _start_time(int(claim["pid"]))
    return age < STALE_S if start is None or now is None else now == start


def _ends_mid_line(path: Path) -> bool:
    """Does a CSV end mid-line? pandas ends every file with a newline; a cut copy does not."""
    try:
        with open(path, "rb") as f:
            if f.seek(0, os.SEEK_END) == 0:
                return False
            f.seek(-1, os.SEEK_END)
            return f.read(1) != b"\n"
    except OSError:
        return False


WEIGHTS_KEYS = ("model", "state_dict", "image_size", "in_chans", "num_classes", "dataset")  # what rebuilding needs


def read_weights(path: Path) -> dict:
    """A kept weights file (the trainer's `kept_weights` dict), or one line naming the file and
    what is wrong with it: unreadable (random bytes, cut short) or not vitexp's."""
    import torch

    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and weights-only errors of every kind: the file is not usable
        why = " ".join(str(e).split())[:120] or type(e).__name__
        raise UserError(f"{path} is not a readable weights file ({type(e).__name__}: {why}); rerun the trial "
                        f"that kept it, or give another") from None
    missing = [k for k in WEIGHTS_KEYS if not isinstance(saved, dict) or k not in saved]
    if missing:
        raise UserError(f"{path} is a torch file but not vitexp's kept weights (no {', '.join(missing)}); give "
                        f"a weights/KEY.pt that a vitexp trial wrote")
    return saved


def weights_file(path: Path) -> tuple[Path, str] | None:
    """(folder, key) when PATH names a study folder's kept weights, DIR/weights/KEY.pt."""
    path = Path(path)
    return (path.parent.parent, path.stem) if path.suffix == ".pt" and path.parent.name == WEIGHTS else None


def has_runs(folder: str | Path) -> bool:
    """Does FOLDER hold a runs.csv (a results folder)?"""
    return (Path(folder) / RUNS).is_file()


def read_runs(folder: str | Path, required=("model", "top1_err")) -> pd.DataFrame:
    """runs.csv of a results folder, checked for the columns a caller needs."""
    path = Path(folder)
    path = path / RUNS if path.is_dir() else path
    if not path.exists():
        raise UserError(f"no {RUNS} in {folder}; run a study with --out {folder} first")
    if _ends_mid_line(path):
        raise UserError(f"{path} ends mid-row (a truncated copy?); rerun the study, or `vitexp status` on its "
                            f"folder, to rebuild it from trials/")
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
