"""The ViT paper's few-shot linear evaluation of frozen features (PAPERS.md section 1).

Regularised least squares from features to {-1, 1}^K targets, solved in closed
form, prediction by argmax. As in the later public implementation the features are
whitened (standardised with the few-shot set's statistics), a bias feature is
appended and the ridge lambda is 2^10; the error is averaged over DRAWS random
choices of the k shots per class.
"""

from __future__ import annotations

import torch
from torch import nn

from vitexp import models as vmodels
from vitexp.errors import UserError
from vitexp.seeds import FEWSHOT, derive_seed

RIDGE_LAMBDA = 2.0**10
DRAWS = 3
BATCH = 512


@torch.no_grad()
def extract(model: nn.Module, x_uint8: torch.Tensor, mean, std, device) -> torch.Tensor:
    """Penultimate features of uint8 images, in float64 on the CPU for the solve."""
    model.eval()
    m = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=device).view(1, -1, 1, 1)
    out = []
    for i in range(0, len(x_uint8), BATCH):
        x = (x_uint8[i:i + BATCH].to(device).float() / 255 - m) / s
        out.append(vmodels.features(model, x).double().cpu())
    return torch.cat(out)


def ridge_fit_predict(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor,
                      num_classes: int, lam: float = RIDGE_LAMBDA) -> torch.Tensor:
    """Closed-form ridge to {-1,1} targets; returns predicted classes of test_f."""
    mu, sd = train_f.mean(0), train_f.std(0, unbiased=False) + 1e-6
    xtr = torch.cat([(train_f - mu) / sd, torch.ones(len(train_f), 1, dtype=train_f.dtype)], 1)
    xte = torch.cat([(test_f - mu) / sd, torch.ones(len(test_f), 1, dtype=test_f.dtype)], 1)
    y = 2 * nn.functional.one_hot(train_y, num_classes).to(xtr.dtype) - 1
    # dual form: with few shots n << d, the n x n system is the cheap one
    w = xtr.T @ torch.linalg.solve(xtr @ xtr.T + lam * torch.eye(len(xtr), dtype=xtr.dtype), y)
    return (xte @ w).argmax(1)


def fewshot_eval(model: nn.Module, bundle, cfg, device) -> dict:
    """{f'fewshot{k}_err': error in percent} for each k in cfg.fewshot."""
    if not bundle.in_memory:
        raise UserError("few-shot evaluation needs an in-memory data set (not imagefolder); drop --fewshot")
    counts = torch.bincount(bundle.train_y, minlength=bundle.num_classes)
    test_f = extract(model, bundle.test_x, bundle.mean, bundle.std, device)
    out = {}
    for k in sorted({int(k) for k in cfg.fewshot}):
        if k > int(counts.min()):
            raise UserError(f"--fewshot {k} needs {k} training images per class, the subset has "
                            f"{int(counts.min())}; use fewer shots or a larger --n-train")
        errs = []
        for draw in range(DRAWS):
            g = torch.Generator().manual_seed(derive_seed(FEWSHOT, cfg.seed, draw))
            idx = torch.cat([torch.nonzero(bundle.train_y == c).flatten()[
                torch.randperm(int(counts[c]), generator=g)[:k]] for c in range(bundle.num_classes)])
            f = extract(model, bundle.train_x[idx], bundle.mean, bundle.std, device)
            pred = ridge_fit_predict(f, bundle.train_y[idx], test_f, bundle.num_classes)
            errs.append(100.0 * (pred != bundle.test_y).double().mean().item())
        out[f"fewshot{k}_err"] = sum(errs) / len(errs)
    return out
