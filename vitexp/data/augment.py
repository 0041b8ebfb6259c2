"""Batch augmentation on the device: random crop + flip for in-memory data,
normalisation, and mixup/CutMix for every pipeline.

Crop and flip run as one gather over the whole batch, so a GPU never waits for a
host-side loop and small images are not bottlenecked by DataLoader workers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torchvision.transforms import v2


def random_crop_flip(x: torch.Tensor, pad: int, flip: bool,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Each image its own random crop (zero padding `pad`) and its own flip coin.

    x: (N, C, H, W) of any dtype; returns the same dtype and shape. All randomness
    comes from `generator` (on x's device), so a seeded generator reproduces it.
    """
    if pad == 0 and not flip:
        return x
    n, c, h, w = x.shape
    dev = x.device
    off = torch.randint(0, 2 * pad + 1, (2, n), generator=generator, device=dev)
    rows = off[0, :, None] + torch.arange(h, device=dev)  # (N, H) rows of the padded image
    cols = off[1, :, None] + torch.arange(w, device=dev)
    if flip:  # mirrored column order where the coin says so: flip and crop in one gather
        heads = torch.rand(n, generator=generator, device=dev) < 0.5
        cols = torch.where(heads[:, None], cols.flip(1), cols)
    xp = F.pad(x, (pad, pad, pad, pad)) if pad else x
    return xp[torch.arange(n, device=dev)[:, None, None, None], torch.arange(c, device=dev)[None, :, None, None],
              rows[:, None, :, None], cols[:, None, None, :]]


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 (x/255 - mean) / std; mean/std shaped (1, C, 1, 1) on x's device."""
    return (x.float().div_(255) - mean).div_(std)


def channel_tensors(values: Sequence[float], device: torch.device) -> torch.Tensor:
    """Per-channel constants as a (1, C, 1, 1) float32 tensor for broadcasting."""
    return torch.tensor(values, dtype=torch.float32, device=device).view(1, -1, 1, 1)


def batch_mixer(cfg, num_classes: int) -> Callable | None:
    """mixup and/or CutMix as `mix(x, y) -> (x, soft targets)`; None when both are off.

    With both alphas > 0 each batch gets one of the two, chosen at random (the
    papers' recipe). Uses torch's global RNG: the trainer reseeds it per epoch.
    """
    mixers = []
    if cfg.mixup > 0:
        mixers.append(v2.MixUp(alpha=cfg.mixup, num_classes=num_classes))
    if cfg.cutmix > 0:
        mixers.append(v2.CutMix(alpha=cfg.cutmix, num_classes=num_classes))
    if not mixers:
        return None
    return mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)
