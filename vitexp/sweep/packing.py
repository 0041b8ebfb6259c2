"""Trial packing: K worker processes on one device share a study folder.

A CIFAR-scale trial cannot fill an H100, so several run at once. Each worker is
an ordinary `run_study` over the same folder: the per-trial claims hand every
trial to exactly one worker, and each trial is the same pure function of its
config as when run alone, so the results equal a one-by-one run. (Stacking
models with torch.func would save kernel launches too, but would make every
model family's trial code a vmapped twin; processes reuse the trainer as it is.)
"""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import pandas as pd

from vitexp.errors import UserError


def _worker(spec: dict, out: str, shard: tuple[int, int], threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)  # K CPU workers must not each take every core
    from vitexp.sweep.runner import run_study

    run_study(spec, out, shard, progress=False, plot=False)


def run_packed(spec: dict, out: str | Path, shard: tuple[int, int], trials_per_device: int,
               plot: bool = True) -> pd.DataFrame:
    """Run the study with `trials_per_device` concurrent worker processes."""
    import os

    from vitexp.sweep.runner import run_study

    if trials_per_device < 1:
        raise UserError(f"--trials-per-gpu must be >= 1, got {trials_per_device}")
    if trials_per_device == 1:
        return run_study(spec, out, shard, plot=plot)
    threads = None
    if spec["train"].get("device", "auto") == "cpu" or not _has_cuda():
        threads = max(1, (os.cpu_count() or 1) // trials_per_device)
    ctx = mp.get_context("spawn")  # CUDA cannot be forked
    procs = [ctx.Process(target=_worker, args=(spec, str(out), shard, threads)) for _ in range(trials_per_device)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    bad = [p.exitcode for p in procs if p.exitcode != 0]
    if bad:
        raise UserError(f"{len(bad)} of {trials_per_device} packed workers failed (exit codes {bad}); "
                        f"see {Path(out) / 'log.txt'} and rerun to resume")
    return run_study(spec, out, shard, plot=plot)  # nothing left to run: rebuilds tables, draws figures


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
