"""A finished trial whose kept weights another trial starts from (a fine-tune) or learns from
(a distilled student's teacher): what it is, and finding it from what a user typed."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from vitexp.config import TrainConfig
from vitexp.data.datasets import dataset_info
from vitexp.errors import UserError
from vitexp.store import TrialStore, read_weights, weights_file


@dataclasses.dataclass(frozen=True)
class Source:
    """A finished trial with kept weights, and what a fine-tune records of it."""

    key: str
    model: str
    model_def: dict
    dataset: str
    n_train: int | None
    image_size: int
    in_chans: int
    weights: Path | None = None  # None: a trial still to run (the transfer study plans on it)

    @classmethod
    def planned(cls, cfg: TrainConfig) -> "Source":
        """The source a resolved trial config will be once it has run."""
        info = dataset_info(cfg.dataset)
        return cls(key=cfg.key(), model=cfg.model, model_def=cfg.model_def, dataset=cfg.dataset, n_train=cfg.n_train,
                   image_size=cfg.image_size or info.image_size, in_chans=info.in_chans)

    def init_from(self) -> dict:
        """What a fine-tune's config (and key) holds of its source."""
        return {"key": self.key, "model": self.model, "dataset": self.dataset, "n_train": self.n_train,
                "image_size": self.image_size}


def find_source(text: str, option: str = "--from") -> Source:
    """The trial SOURCE names: `DIR:KEY`, `DIR` (a folder of one finished trial, e.g. a
    `vitexp train` folder) or a kept weights file `DIR/weights/KEY.pt`; every way it can be
    unusable is one line naming the fix."""
    path, key = Path(text), None
    if weights_file(path) is not None:
        path, key = weights_file(path)
    elif not path.exists() and ":" in text:
        folder, key = text.rsplit(":", 1)
        path = Path(folder)
    if not path.is_dir():
        raise UserError(f"{option} {text}: no such folder; give a study or train folder, DIR:KEY to pick one of its "
                        f"trials, or a weights/KEY.pt file")
    store = TrialStore(path, create=False)
    done = store.finished()
    if key is None:
        ok = [k for k, r in done.items() if r.get("status") == "ok"]
        if len(ok) != 1:
            raise UserError(f"{option} {text}: the folder holds {len(ok)} finished trials; pick one as {text}:KEY "
                            f"(the key column of its runs table)")
        key = ok[0]
    row = done.get(key)
    if row is None:
        where = "is still running or was interrupted" if store.checkpoint_path(key).exists() else "is not there"
        raise UserError(f"{option} {text}: trial {key} {where}; finish it first (rerun its command) or pick "
                        f"another of {path}'s finished trials")
    if row.get("status") != "ok" or row.get("diverged"):
        why = "diverged" if row.get("diverged") else f"failed ({row.get('error', '?')})"
        raise UserError(f"{option} {text}: trial {key} {why}; nothing to start from: pick a finished trial")
    weights = store.weights_path(key)
    if not weights.exists():
        raise UserError(f"{option} {text}: trial {key} kept no weights; rerun it with --keep-weights (a new "
                        f"folder, or delete its trials/{key}.json first)")
    saved = read_weights(weights)
    return Source(key=key, weights=weights, model=saved["model"], model_def=saved.get("model_def") or {},
                  dataset=saved["dataset"], n_train=row.get("n_train"), image_size=int(saved["image_size"]),
                  in_chans=int(saved["in_chans"]))
