"""Worker processes that share a study folder, and the parent that watches them.

On a CPU one single-thread worker per core (small models use a core each far better
than they share several: benchmarks/README.md); on a GPU `--workers K` trials at once.
Each worker runs the same claim-train-record loop as a run in one process; the parent
trains nothing: it prints one line per finished trial, the trials in flight and the
ETA, and passes a signal on to its workers, which die with it if it is killed.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import sys
import time
import traceback

from vitexp.errors import Interrupted, StudyFailed, UserError, stop_on_signals
from vitexp.store import TrialStore
from vitexp.ui import StudyProgress, trial_images, trial_label, trial_summary

POLL_S = 1.0  # how often the parent looks at the folder


def _die_with_parent(parent: int) -> None:
    """A SIGKILLed parent must not leave its workers training on (Linux: PR_SET_PDEATHSIG)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the line above took effect
        os._exit(1)


def _worker(run_trials, out: str, todo: list, seen: dict, threads: int | None, parent: int, errors,
            fuse: int) -> None:
    """A worker process: the parent's trial loop RUN_TRIALS, quiet; errors go to the parent as one line."""
    _die_with_parent(parent)
    if threads:
        import torch

        torch.set_num_threads(threads)  # K CPU workers must not each take every core
    store = TrialStore(out, create=False)
    bar = StudyProgress(len(todo), enabled=False)
    bar.quiet = True
    try:
        with stop_on_signals():
            run_trials(store, todo, seen, bar, fuse)
    except Interrupted as e:
        sys.exit(e.exit_code)
    except UserError as e:
        errors.put(("usage", str(e)))
        sys.exit(2)
    except Exception as e:  # noqa: BLE001 - reported by the parent in one line, traceback in log.txt
        store.logger().info("worker failed:\n%s", traceback.format_exc())
        errors.put(("error", f"{type(e).__name__}: {e}"))
        sys.exit(1)


def run_pool(run_trials, store: TrialStore, todo: list, seen: dict, k: int, threads: int | None, bar: StudyProgress,
             fuse: int) -> None:
    """Train TODO in K worker processes, each running RUN_TRIALS (the sweep's trial loop, a
    module-level function: spawn pickles it by name); returns when they all have ended."""
    ctx = mp.get_context("spawn")  # CUDA cannot be forked
    errors = ctx.SimpleQueue()
    procs = [ctx.Process(target=_worker, args=(run_trials, str(store.root), todo, seen, threads, os.getpid(), errors, fuse))
             for _ in range(min(k, len(todo)))]
    ignore = signal.signal(signal.SIGINT, signal.SIG_IGN)  # workers start deaf to a terminal's Ctrl-C
    try:  # (it reaches the whole process group) until their own handler is in place: no traceback
        for p in procs:
            p.start()
    finally:
        signal.signal(signal.SIGINT, ignore)
    try:
        watch(procs, store, dict(todo), bar)
    except Interrupted as e:
        for p in procs:  # pass the signal on: each worker releases its trial and stops
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, e.signum)
        for p in procs:
            p.join(timeout=60)
        raise
    found = []
    while not errors.empty():
        found.append(errors.get())
    usage = [msg for what, msg in found if what == "usage"]
    if usage:
        raise UserError(usage[0])
    if found or any(p.exitcode for p in procs):
        codes = [p.exitcode for p in procs]
        raise StudyFailed(f"worker processes failed (exit codes {codes}; {found[0][1] if found else 'no message'}); "
                          f"see {store.log_path} and rerun to resume")


def watch(procs: list, store: TrialStore, todo: dict, bar: StudyProgress) -> None:
    """While workers train: one line per finished trial, the trials in flight, the ETA.
    It polls the claims and the records of the trials still to come, nothing else."""
    stamps: dict[str, int] = {}
    store.new_records(todo, stamps)  # what is there already (failed trials to retry)
    left = set(todo)
    bar.note(f"{len(procs)} worker processes, {len(todo)} trials to run")
    while True:
        alive = any(p.is_alive() for p in procs)
        for key, row in store.new_records(sorted(left), stamps).items():
            left.discard(key)
            bar.end_trial(trial_summary(trial_label(todo[key].to_dict()), row), trial_images(todo[key]), row)
        if not alive:
            return
        flying = {k: c for k, c in store.claims().items() if k in todo}
        bar.running([(trial_label(todo[k].to_dict()), _share(c, todo[k]), float(c.get("images") or 0))
                     for k, c in flying.items()])
        time.sleep(POLL_S)


def _share(claim: dict, cfg) -> str:
    """How far a worker's trial is, from its claim's heartbeat."""
    try:
        text = f"{float(claim.get('images') or 0) / trial_images(cfg):.0%}"
    except (TypeError, ValueError):
        return "?"
    return text + (f" (resumed at epoch {claim['resumed']})" if claim.get("resumed") else "")
