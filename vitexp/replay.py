"""A recorded trial's quantities recomputed from its folder without training it again."""

from __future__ import annotations

from pathlib import Path

import torch

from vitexp import runtime
from vitexp.config import TrainConfig, config_fields
from vitexp.distill import Teacher
from vitexp.store import TrialStore
from vitexp.trainer import epoch_batches, setup_trial


def replay_agreement(folder: str | Path, key: str) -> float:
    """Student KEY's `teacher_agree` at its last epoch, recomputed from its folder without
    training: the teacher's kept weights on that epoch's augmented batches (the same seeds).
    For students recorded before the trainer counted it, and to read a teacher before any
    student trains with it."""
    store = TrialStore(folder, create=False)
    row = store.result(key)
    if row is None or not row.get("teacher"):
        raise ValueError(f"{folder}: {key} is not a recorded distilled student")
    cfg = TrainConfig(**{f: row[f] for f in config_fields() if f in row})
    t = setup_trial(cfg, store)
    distiller = next(f for f in t.features if isinstance(f, Teacher)).distiller
    with torch.no_grad():
        for x, y in epoch_batches(t, int(row["epochs_run"]) - 1):
            with runtime.autocast(t.device, cfg.amp):
                distiller.count(distiller.teacher(x).float(), y)
    return distiller.agreement()
