"""The ViT paper's closed-form few-shot linear evaluation."""

import torch

from vitexp.fewshot import RIDGE_LAMBDA, ridge_fit_predict


def test_ridge_is_the_closed_form_solution():
    g = torch.Generator().manual_seed(0)
    f = torch.randn(12, 5, generator=g, dtype=torch.float64)
    y = torch.arange(12) % 3
    test = torch.randn(7, 5, generator=g, dtype=torch.float64)
    lam = 3.0
    pred = ridge_fit_predict(f, y, test, 3, lam=lam)
    # primal form by hand: standardise, append bias, solve (X'X + lam I) W = X'Y
    mu, sd = f.mean(0), f.std(0, unbiased=False) + 1e-6
    x = torch.cat([(f - mu) / sd, torch.ones(12, 1, dtype=f.dtype)], 1)
    xt = torch.cat([(test - mu) / sd, torch.ones(7, 1, dtype=f.dtype)], 1)
    t = 2 * torch.nn.functional.one_hot(y, 3).double() - 1
    w = torch.linalg.solve(x.T @ x + lam * torch.eye(6, dtype=f.dtype), x.T @ t)
    assert torch.equal(pred, (xt @ w).argmax(1))


def test_separable_features_are_classified_perfectly_with_one_shot():
    centers = torch.eye(4, dtype=torch.float64) * 10
    train_f, train_y = centers, torch.arange(4)
    test_y = torch.arange(4).repeat(5)
    test_f = centers[test_y] + 0.1 * torch.randn(20, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert torch.equal(ridge_fit_predict(train_f, train_y, test_f, 4, lam=RIDGE_LAMBDA), test_y)
