"""The one row schema: a trial's runs.csv row and its history.csv rows.

Every row comes from `trial_row`, whether the trial finished, diverged or failed, so
runs.csv has one set of columns. The protocol (PAPERS.md sections 3-4): `top1_err` is
the minimum over evaluated epochs of the evaluated model's test error (the EMA of the
weights when `cfg.ema`; pycls's convention, chosen on the test images), `last_err` the final
one (what the claims read); a diverged trial counts at 100%.
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
# The convergence rule (one place; README "Results layout"): a trial has converged when it
# learned something, its final error more than CHANCE_MARGIN points below guessing, and its
# training loss has flattened: over the last quarter of its epochs (after epoch
# floor(CONVERGED_LATE x epochs)) it fell by at most CONVERGED_LATE_FALL of its whole fall since
# the first epoch. The training loss, not an error, so no held-out or test image decides which
# trials count; its fall over the schedule, not the last evaluations, because under the cosine
# schedule those agree once the lr has decayed whether or not the model had finished learning.
# 0.15: the committed controls show the cut (ViT_P at 60,000 Fashion-MNIST images: 0.19 at 10
# epochs, 1.6 points worse than at 20, where it is 0.13; a run at chance: ConViT on 400 `shapes`
# images, 0.15-0.41).
CONVERGENCE_RULE = 2  # recorded beside each flag (`converged_rule`); rows without it are judged again
CONVERGED_LATE = 0.75
CONVERGED_LATE_FALL = 0.15
CHANCE_MARGIN = 5.0  # points of error: a run this close to guessing learned nothing


def converged(losses: list[float], final_err: float, chance: float) -> bool:
    """Has a trial learned and stopped learning? LOSSES: its training loss per epoch, in
    order; FINAL_ERR: its reported error (held-out where it has one); CHANCE: guessing's error
    (NaN: unknown, no check). A trial of one epoch cannot show a flattening, a diverged one
    (final error NaN or 100) learned nothing."""
    losses = [v for v in losses if v == v]
    if len(losses) < 2 or not final_err == final_err or final_err >= DIVERGED_ERR:
        return False
    if chance == chance and final_err >= chance - CHANCE_MARGIN:
        return False
    fall = losses[0] - losses[-1]
    late = losses[max(math.floor(CONVERGED_LATE * len(losses)) - 1, 0)] - losses[-1]
    return fall > 0 and late <= CONVERGED_LATE_FALL * fall


def converged_from(history: list[dict], final_err: float, dataset) -> bool:
    """`converged` of a trial's history rows (train_loss by epoch) and its data set's chance."""
    from vitexp.data.datasets import chance_err

    rows = sorted(history, key=lambda h: h["epoch"])
    return converged([h["train_loss"] for h in rows], final_err, chance_err(dataset))


def judged(row: dict, history: list[dict]) -> bool:
    """`converged` of a trial's row and history rows: the rule on its held-out error where it
    has one, else its final test error; a diverged trial never. What the trainer records and
    what older folders are judged by again when read."""
    if str(row.get("diverged")).lower() == "true":
        return False
    final = row.get("val_err")
    if final is None or final != final:
        final = row.get("last_err")
    return converged_from(history, math.nan if final is None else float(final), row.get("dataset"))


def evaluated(history: list[dict], col: str) -> list[tuple[int, float]]:
    """(epoch, error) of the epochs that were evaluated."""
    return [(h["epoch"], h[col]) for h in history if not math.isnan(h[col])]


def summary(cfg: TrainConfig, history: list[dict], diverged: bool) -> dict:
    """top1_err, last_err, top1_err_model, best_epoch of a trial's history (`converged` is
    `judged` once the row has its held-out error, in trainer.summarise)."""
    col = "ema_err" if cfg.ema else "test_err"
    evals = evaluated(history, col)
    if diverged or not evals:
        return {"top1_err": DIVERGED_ERR, "last_err": DIVERGED_ERR, "top1_err_model": DIVERGED_ERR,
                "best_epoch": 0}
    errs = [e for _, e in evals]
    return {"top1_err": min(errs), "last_err": errs[-1],
            "top1_err_model": min(e for _, e in evaluated(history, "test_err")),
            "best_epoch": evals[errs.index(min(errs))][0]}


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
