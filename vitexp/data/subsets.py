"""Training-set subsets for data-size studies: class-balanced and nested.

Nested ([ViT]'s protocol): for one seed, the subset of n1 images is contained in
the subset of n2 > n1 images, so a bigger point on a data-size curve only ever
adds data and the curve is not noisy from resampling.
"""

from __future__ import annotations

import torch

from vitexp.errors import UserError


def balanced_subset(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Sorted indices of a class-balanced subset of size n (per-class counts differ by <= 1).

    Classes are visited round-robin (in an order fixed by the seed), each class
    giving its next example in a per-class random order fixed by the seed; the
    subset is the first n of that one sequence, hence nested across n.
    A class that runs out (imbalanced data) drops out of the rotation.
    """
    labels = torch.as_tensor(labels).cpu()
    total = len(labels)
    if not 0 < n <= total:
        raise UserError(f"asked for a subset of {n} examples but the data set has {total}")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(total, generator=g)
    classes, lab = torch.unique(labels[perm], return_inverse=True)  # lab: class index 0..K-1
    class_turn = torch.randperm(len(classes), generator=g)  # which class goes first in a round
    order = torch.argsort(lab, stable=True)  # grouped by class, each group in `perm` order
    counts = torch.bincount(lab, minlength=len(classes))
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty(total, dtype=torch.long)
    rank[order] = torch.arange(total) - starts[lab[order]]  # position within its class
    key = rank * len(classes) + class_turn[lab]  # round r, then the class's turn in it
    chosen = perm[torch.argsort(key)[:n]]
    return torch.sort(chosen).values


def subset_size(n_or_fraction: int | float, total: int) -> int:
    """A subset size from a count (int) or a fraction of `total` (float in (0, 1])."""
    if isinstance(n_or_fraction, float):
        if not 0 < n_or_fraction <= 1:
            raise UserError(f"a subset fraction must be in (0, 1], got {n_or_fraction}")
        return max(1, round(n_or_fraction * total))
    if not 0 < n_or_fraction <= total:
        raise UserError(f"a subset size must be in 1..{total}, got {n_or_fraction}")
    return int(n_or_fraction)
