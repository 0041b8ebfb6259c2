"""Trial packing: K worker processes on one device share a study folder.

A CIFAR-scale trial cannot fill an H100, so several run at once; on the CPU the
small models use a core each far better than they share several (two 1-thread
workers train 1.7-2.7x the images/s of one 2-thread process on a 2-core VM,
benchmarks/README.md), so there a study runs one single-thread worker per core by
default. Each worker is an ordinary `run_study` over the same folder: the per-trial
claims hand every trial to exactly one worker, and each trial is the same pure
function of its config as when run alone, so the results equal a one-by-one run.
(Stacking models with torch.func would save kernel launches too, but would make
every model family's trial code a vmapped twin; processes reuse the trainer as it is.)
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import pandas as pd

from vitexp.errors import UserError

POLL_S = 1.0  # how often the parent looks at the folder for finished trials


def _die_with_parent(parent: int) -> None:
    """A SIGKILLed parent must not leave its workers training on (Linux: PR_SET_PDEATHSIG)."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the line above took effect
        os._exit(1)


def _worker(spec: dict, out: str, shard: tuple[int, int], threads: int | None, parent: int) -> None:
    _die_with_parent(parent)
    if threads:
        import torch

        torch.set_num_threads(threads)  # K CPU workers must not each take every core
    from vitexp.sweep.runner import run_study
    from vitexp.ui import console

    console.quiet = True  # the parent reports each trial
    run_study(spec, out, shard, progress=False, plot=False)


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _on_cpu(spec: dict) -> bool:
    device = str(spec["train"].get("device", "auto"))
    return device == "cpu" or (device == "auto" and not _has_cuda())


def run_packed(spec: dict, out: str | Path, shard: tuple[int, int], trials_per_device: int | None = None,
               plot: bool = True, progress: bool | None = None) -> pd.DataFrame:
    """Run the study with `trials_per_device` concurrent worker processes.

    None (the CLI's default): one in-process run on a GPU, under torchrun and on one
    core; on a multi-core CPU one single-thread worker per core (at most one per trial
    to run), so a trial's float sums do not depend on how many trials were left when
    the study was (re)started."""
    from vitexp.store import TrialStore
    from vitexp.sweep.runner import check_folder, pending, plot_if_complete, run_study

    if trials_per_device is not None and trials_per_device < 1:
        raise UserError(f"--trials-per-gpu must be >= 1, got {trials_per_device}")
    todo = pending(spec, out, shard)  # bad input fails here, in one line, before any worker starts
    threads = None
    if trials_per_device is None:
        single = int(os.environ.get("WORLD_SIZE", "1")) > 1 or not _on_cpu(spec) or _cores() == 1 or not todo
        trials_per_device, threads = (1, None) if single else (min(_cores(), len(todo)), 1)
    elif _on_cpu(spec) and trials_per_device > 1:
        threads = max(1, _cores() // trials_per_device)
    if trials_per_device == 1 and threads is None:
        return run_study(spec, out, shard, progress=progress, plot=plot)
    check_folder(Path(out), spec)
    TrialStore(out)  # a writable folder, swept of what killed runs left
    ctx = mp.get_context("spawn")  # CUDA cannot be forked
    procs = [ctx.Process(target=_worker, args=(spec, str(out), shard, threads, os.getpid()))
             for _ in range(trials_per_device)]
    for p in procs:
        p.start()
    _watch(procs, Path(out), dict(todo), trials_per_device, progress)
    bad = [p.exitcode for p in procs if p.exitcode != 0]
    if bad:
        raise UserError(f"{len(bad)} of {trials_per_device} packed workers failed (exit codes {bad}); "
                        f"see {Path(out) / 'log.txt'} and rerun to resume")
    runs = run_study(spec, out, shard, plot=False)  # nothing left to run: rebuilds the tables
    if plot:
        plot_if_complete(spec, out)
    return runs


def _watch(procs: list, out: Path, todo: dict, workers: int, progress: bool | None) -> None:
    """The parent's progress while workers train: trials done / left and ETA, the trials in
    flight, and one line per finished (or failed) trial."""
    from vitexp.store import TrialStore
    from vitexp.sweep.runner import trial_label, trial_summary
    from vitexp.ui import StudyProgress

    store = TrialStore(out, create=False)
    seen = store.finished()
    with StudyProgress(len(todo), enabled=progress) as bar:
        bar.note(f"{workers} worker processes, {len(todo)} trials to run")
        while True:
            alive = any(p.is_alive() for p in procs)
            for key, row in store.finished().items():
                if seen.get(key) != row:
                    seen[key] = row
                    bar.end_trial(trial_summary(trial_label(row), row))
            if not alive:
                break
            claims = sorted(p.name for p in (out / "claims").glob("*")) if (out / "claims").is_dir() else []
            bar.running([trial_label(todo[k].to_dict()) for k in claims if k in todo])
            time.sleep(POLL_S)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
