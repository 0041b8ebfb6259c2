"""The one row schema: a trial's runs.csv row and its history.csv rows.

Every row comes from `trial_row`, whether the trial finished, diverged or failed, so
runs.csv has one set of columns. The protocol (PAPERS.md sections 3-4): `top1_err` is
the minimum over evaluated epochs of the evaluated model's test error (the EMA of the
weights when `cfg.ema`), `last_err` the final one; a diverged trial counts at 100%.
"""

from __future__ import annotations

import math

from vitexp.config import TrainConfig

DIVERGED_ERR = 100.0
# the columns every runs.csv has (plots and collect rely on them)
RUN_COLUMNS = ["key", "study", "status", "model", "dataset", "n_train", "seed", "optimizer",
               "lr", "wd", "epochs", "top1_err", "last_err", "diverged", "converged", "wall_s"]
HISTORY_COLUMNS = ["key", "epoch", "train_loss", "test_err", "ema_err", "lr", "seconds", "images_per_s"]
# what history.csv repeats from runs.csv so a learning curve needs no join (history column:
# runs.csv column; history's own `lr` is the scheduled lr at the end of each epoch)
HISTORY_IDENTITY = {"model": "model", "n_train": "n_train", "seed": "seed", "optimizer": "optimizer",
                    "trial_lr": "lr", "wd": "wd", "epochs": "epochs"}
# the convergence rule: the best error came before the last quarter of the budget, or the
# last two evaluations are within half a point of each other
CONVERGED_BEFORE = 0.75
CONVERGED_DELTA = 0.5


def evaluated(history: list[dict], col: str) -> list[tuple[int, float]]:
    """(epoch, error) of the epochs that were evaluated."""
    return [(h["epoch"], h[col]) for h in history if not math.isnan(h[col])]


def converged(evals: list[tuple[int, float]], epochs: int) -> bool:
    """Has a trial stopped learning? Its best error came before the last quarter of its
    budget, or its last two evaluations differ by less than CONVERGED_DELTA points. A
    trial with one evaluation cannot show either, a diverged one (no evaluation) neither."""
    if not evals:
        return False
    errs = [e for _, e in evals]
    best_epoch = evals[errs.index(min(errs))][0]
    if best_epoch <= CONVERGED_BEFORE * epochs:
        return True
    return len(errs) >= 2 and abs(errs[-1] - errs[-2]) < CONVERGED_DELTA


def summary(cfg: TrainConfig, history: list[dict], diverged: bool) -> dict:
    """top1_err, last_err, top1_err_model, best_epoch, converged of a trial's history."""
    col = "ema_err" if cfg.ema else "test_err"
    evals = evaluated(history, col)
    if diverged or not evals:
        return {"top1_err": DIVERGED_ERR, "last_err": DIVERGED_ERR, "top1_err_model": DIVERGED_ERR,
                "best_epoch": 0, "converged": False}
    errs = [e for _, e in evals]
    return {"top1_err": min(errs), "last_err": errs[-1],
            "top1_err_model": min(e for _, e in evaluated(history, "test_err")),
            "best_epoch": evals[errs.index(min(errs))][0], "converged": converged(evals, cfg.epochs)}


def trial_row(cfg: TrainConfig, key: str, status: str = "ok", **results) -> dict:
    """A runs.csv row: the key, the study's columns, every config field, then RESULTS
    (a failed trial's `error`, or a finished one's errors, timings and provenance)."""
    from vitexp.optim import peak_lr

    fields = cfg.to_dict()
    extra = fields.pop("extra")
    fields.pop("fewshot")
    row = {"key": key, "study": extra.get("study", "train"), "status": status, **fields, **extra,
           "peak_lr": peak_lr(cfg)}
    if status != "ok":
        row.update({"top1_err": math.nan, "last_err": math.nan, "diverged": False, "converged": False})
    row.update(results)
    return row
