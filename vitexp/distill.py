"""DeiT's distillation through attention (Touvron et al., ICML 2021): a ViT student with a
distillation token (`DistilledViT`) learns from a frozen teacher's outputs on the same
augmented batch. The teacher is a finished trial's kept weights (`vitexp.source.Source`),
in eval mode and without gradients; its key is in the student's (`TrainConfig.teacher`).
`Teacher` is the trial feature (`trainer.Feature`) that gives a student all of this.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vitexp import models as vmodels
from vitexp.config import TrainConfig
from vitexp.errors import UserError
from vitexp.source import Source
from vitexp.store import TrialStore, read_weights


class Distiller:
    """The student's loss. Hard (DeiT's default): 1/2 CE(class head, label, smoothed) + 1/2
    CE(distillation head, the teacher's argmax, not smoothed). Soft: (1 - alpha) CE(class
    head, label) + alpha tau^2 KL(teacher || student at temperature tau), summed over classes
    and averaged over the batch's logits, as DeiT's code does (sum / numel)."""

    def __init__(self, teacher: nn.Module, cfg: TrainConfig):
        self.teacher, self.kind, self.tau, self.alpha = teacher, cfg.distillation, cfg.distill_tau, cfg.distill_alpha
        self.ce = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        # how often the teacher's argmax is the label: where it is, the distillation head learns
        # nothing the class head does not (a teacher that fits its augmented training images)
        self.agreed, self.seen = torch.zeros(()), 0

    def count(self, taught: torch.Tensor, y: torch.Tensor) -> None:
        """Add a batch's teacher logits and labels to the agreement count (mixed labels are not)."""
        if y.ndim == 1:
            self.agreed = self.agreed.to(y.device) + (taught.argmax(1) == y).sum()
            self.seen += len(y)

    def agreement(self) -> float:
        """% of this epoch's training images (augmented) whose label the teacher's argmax
        matches; counting starts again (NaN where labels were mixed: mixup, cutmix; with several
        processes, this process's share of the images: a sample, not worth a sync)."""
        done = 100.0 * self.agreed.item() / self.seen if self.seen else float("nan")
        self.agreed, self.seen = torch.zeros(()), 0
        return done

    def __call__(self, out: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        cls, dist = out
        with torch.no_grad():
            taught = self.teacher(x).float()
            self.count(taught, y)
        if self.kind == "hard":
            return 0.5 * self.ce(cls, y) + 0.5 * F.cross_entropy(dist, taught.argmax(1))
        t = self.tau
        kl = F.kl_div(F.log_softmax(dist.float() / t, 1), F.log_softmax(taught / t, 1), reduction="sum",
                      log_target=True) * (t * t) / dist.numel()
        return (1 - self.alpha) * self.ce(cls, y) + self.alpha * kl


def load_teacher(path: Path, device: torch.device) -> nn.Module:
    """The teacher of kept weights at PATH: rebuilt as it was evaluated, frozen, in eval mode."""
    saved = read_weights(path)
    spec = vmodels.registry.spec_of(saved["model"], saved.get("model_def") or {})
    teacher = vmodels.build_model(spec, image_size=saved["image_size"], in_chans=saved["in_chans"],
                                  num_classes=saved["num_classes"])
    teacher.load_state_dict(saved["state_dict"])
    return teacher.to(device).eval().requires_grad_(False)


class Teacher:
    """The trial feature of a student (`trainer.Feature`): a model with a distillation token,
    the `Distiller`'s loss, and each epoch's `teacher_agree`. The teacher's kept weights are
    in the student's own folder (`vitexp train --teacher` and the studies stage them there)."""

    def __init__(self, cfg: TrainConfig, store: TrialStore | None):
        if store is None:
            raise UserError("a student with a teacher needs a results folder that holds the teacher's weights (out)")
        self.cfg, self.weights, self.distiller = cfg, store.weights_path(cfg.teacher["key"]), None

    def build_options(self) -> dict:
        return {"distilled": True}

    def init_weights(self, model: nn.Module) -> None:
        pass  # the student starts from its seed

    def loss(self, criterion: nn.Module, device: torch.device) -> Distiller:
        self.distiller = Distiller(load_teacher(self.weights, device), self.cfg)
        return self.distiller

    def epoch_columns(self) -> dict:
        return {"teacher_agree": self.distiller.agreement()}


def teacher_columns(source: Source) -> dict:
    """What a distilled trial's runs.csv row says of its teacher."""
    return {"teacher_key": source.key, "teacher_model": source.model, "teacher_n_train": source.n_train}


TEACHER_HELP = ("a finished trial (DIR:KEY, DIR or DIR/weights/KEY.pt) whose kept weights teach {} through "
                "DeiT's distillation token (--distillation hard|soft){}")


def take_teacher(text: str, fields: dict) -> Source:
    """--teacher TEXT: the finished trial it names; FIELDS (a trial's config fields) get its
    teacher table and its columns."""
    from vitexp.source import find_source

    source = find_source(text, "--teacher")
    fields.update(teacher=source.init_from(), extra={**fields.get("extra", {}), **teacher_columns(source)})
    return source
