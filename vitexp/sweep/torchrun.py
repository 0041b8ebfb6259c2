"""A study under torchrun: rank 0 runs it as a run in one process does and announces
each trial it claims; the other ranks train what it announces (DDP), until it announces
the end."""

from __future__ import annotations

from typing import Callable

import pandas as pd

from vitexp import runtime
from vitexp.config import TrainConfig


def run(plan, body: Callable[..., pd.DataFrame]) -> pd.DataFrame:
    """BODY (the run of one process, given an `on_start` hook) on rank 0; followers elsewhere."""
    d, _ = runtime.init_distributed(runtime.resolve_device(plan.trials[0][1].device))
    try:
        if not d.main:
            return _follow(plan)
        try:
            return body(on_start=announce)
        finally:
            announce(None)  # the followers stop too
    finally:
        runtime.close_distributed()


def _follow(plan) -> pd.DataFrame:
    """A rank other than 0: train each announced trial until rank 0 announces the end
    (reading the checkpoints rank 0 wrote, to resume; never writing)."""
    from vitexp.trainer import run_trial

    while (cfg := announce(None)) is not None:
        run_trial(cfg, store=plan.store)
    return pd.DataFrame()


def announce(cfg: TrainConfig | None) -> TrainConfig | None:
    """Rank 0 tells the other ranks which trial comes next (None: the end); they get it back."""
    import torch.distributed as dist

    box = [cfg]
    dist.broadcast_object_list(box, src=0)
    return box[0]
