"""What a trial does beyond plain training, keyed by the config field that asks for it: the
one table the trainer reads. Each feature lives in its own module and implements the
trainer's `Feature` hooks; a config field set here without its feature would train a
plain trial silently, so every caller gets its features from this table."""

from __future__ import annotations

from vitexp.config import TrainConfig
from vitexp.distill import Teacher
from vitexp.finetune import FineTune
from vitexp.store import TrialStore

FEATURES = {"init_from": FineTune, "teacher": Teacher}  # TrainConfig field -> its feature


def trial_features(cfg: TrainConfig, store: TrialStore | None) -> list:
    """The features CFG asks for, in the table's order, reading their weights from STORE."""
    return [feature(cfg, store) for field, feature in FEATURES.items() if getattr(cfg, field)]
