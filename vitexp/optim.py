"""Optimizer, lr schedule and EMA of the EC recipe (PAPERS.md section 3)."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from vitexp.config import TrainConfig

# parameters that carry no weight decay besides norms and biases (torchvision ViT names)
NO_DECAY_NAMES = ("pos_embedding", "class_token", "registers")


def param_groups(model: nn.Module, wd: float) -> list[dict]:
    """Two groups: decayed weights, and norms/biases/embeddings without decay
    (the paper excludes them; decaying a LayerNorm gain only fights the norm)."""
    decay, no_decay = [], []
    # a timm model names its own embeddings and tokens (pos_embed, cls_token, reg_token, ...)
    own = tuple(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else ()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(NO_DECAY_NAMES + own) else decay).append(p)
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


def peak_lr(cfg: TrainConfig) -> float:
    """The lr actually used: cfg.lr is given for cfg.lr_batch_size and scales linearly."""
    return cfg.lr * cfg.batch_size / cfg.lr_batch_size


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.wd)
    fused = {"fused": True} if device.type == "cuda" else {}  # one kernel for the whole update
    lr = peak_lr(cfg)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), **fused)
    return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov, **fused)


def warmup_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """Warmup length; capped at a tenth of training so a short run still reaches its peak."""
    return int(min(cfg.warmup_epochs, cfg.epochs / 10) * steps_per_epoch)


def lr_factor(step: int, total: int, warmup: int, min_frac: float) -> float:
    """Multiplier of the peak lr at `step`: half-cosine from 1 to min_frac over the run,
    times a linear warmup factor (pycls applies warmup on top of the cosine the same way)."""
    cos = min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
    return cos * min(1.0, (step + 1) / warmup) if warmup > 0 else cos


def build_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    total = cfg.epochs * steps_per_epoch
    warm = warmup_steps(cfg, steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warm, cfg.min_lr_frac))


class EMA(AveragedModel):
    """AveragedModel with an exponential average, updated every `every` steps
    (as pycls does: each update costs AveragedModel a host sync) with the per-step
    decay compounded, and warmed up as min(decay, (1+n)/(10+n)) in steps n: with a
    fixed 0.999 a 100-step run would evaluate mostly its random init. BN running
    stats are averaged too (use_buffers); integer buffers are copied."""

    def __init__(self, model: nn.Module, decay: float, every: int = 1):
        self.decay, self.every = decay, every
        super().__init__(model, multi_avg_fn=self._avg, use_buffers=True)

    def _avg(self, ema_params, params, num_averaged):
        if not ema_params[0].is_floating_point():
            return torch._foreach_copy_(ema_params, params)
        n = (int(self.n_averaged) - 1) * self.every  # steps averaged so far; n_averaged >= 1 here
        d = min(self.decay, (1 + n) / (10 + n)) ** self.every
        torch._foreach_lerp_(ema_params, params, 1 - d)
