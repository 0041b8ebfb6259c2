"""The tuning search behind every study's tuned (lr, wd): per model and optimizer, N
log-uniform (lr, wd) pairs over wide ranges ([ranges] of the preset, else the current
tuned value / 16 .. x 16), trained at the budget of the studies that use the result.
The tuned value is the best run; a best run whose lr or wd is the lowest or highest
sampled says the optimum may lie outside the range: widen it and search again."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from vitexp import analysis
from vitexp.studies.base import Knob, Study, int_knob, ints, lr_wd_samples, optimizer_list
from vitexp.studies.registry import register
from vitexp.studies.stability import best_runs, plot_lrwd

AROUND = (16.0, 16.0)  # the default range: the current tuned value / 16 .. x 16


class Tune(Study):
    kind = command = "tune"
    title = "lr/wd search (the tuned values)"
    help = "lr/wd search: N log-uniform (lr, wd) samples per model and optimizer over wide ranges; the best is tuned."
    knobs = (Knob("optimizers", str, "comma-separated, default adamw,sgd", many=True),
             Knob("samples", int, "(lr, wd) pairs per model and optimizer [preset, else 16]"),
             Knob("sample_seed", int, "seed of the (lr, wd) sampler"),
             Knob("epochs", int, "epochs of every trial [preset]"))
    needs = ("model", "optimizer", "lr", "wd", "last_err")
    plot_command = "plot-tune"
    bootstrap = True
    several = "several are concatenated (e.g. the first round of a search and its widened second round)"

    def trials(self, spec, base, trial):
        s = spec["study"]
        return lr_wd_samples(spec, s["models"], optimizer_list(s), int_knob(s, "samples", 16),
                             int_knob(s, "sample_seed", 0, 0, 2**63 - 1), ints(s.get("seeds", [0]), "seeds"), AROUND, trial,
                             int_knob(s, "epochs", base.epochs))

    def figures(self, runs, out, n_boot=2500, seed=0):
        return plot_lrwd(runs, Path(out), n_boot, seed)

    def tables(self, runs, n_boot=2500, seed=0):
        return [("h3", "The tuned values: the best run per model and optimizer (edge: its lr or wd is the lowest "
                       "or highest sampled, so the range should be widened)"), ("table", tune_best(runs))]

    def captions(self, figure: Path) -> str:
        return (f"Error vs lr (top row of each block) and wd (bottom row) per model ({figure.stem[5:]}); red x: "
                f"diverged runs. The lowest point of each panel is the tuned value.")

    def must_converge(self, runs):
        return best_runs(runs)


def tune_best(runs: pd.DataFrame) -> pd.DataFrame:
    """Per optimizer and model: the best run by `analysis.choice_column` (the held-out error
    where the runs have one), its lr, wd and errors, whether it converged, whether its lr or
    wd is the lowest or highest sampled, and the median of the choosing error."""
    rows = []
    by = analysis.choice_column(runs)
    for (opt, model), g in analysis.finished(runs).groupby(["optimizer", "model"], sort=True):
        best = g.loc[g[by].idxmin()]
        edge = {p: "low" if best[p] <= g[p].min() else "high" if best[p] >= g[p].max() else "" for p in ("lr", "wd")}
        rows.append({"optimizer": opt, "model": model, "n": len(g), "chosen_by": by, "lr": best["lr"],
                     "wd": best["wd"], "val_err": best.get("val_err", math.nan), "last_err": best["last_err"],
                     "top1_err": best["top1_err"], "converged": bool(best.get("converged", False)),
                     "lr_edge": edge["lr"], "wd_edge": edge["wd"], "median_err": g[by].median()})
    return pd.DataFrame(rows, columns=["optimizer", "model", "n", "chosen_by", "lr", "wd", "val_err", "last_err",
                                       "top1_err", "converged", "lr_edge", "wd_edge", "median_err"])


STUDY = register(Tune())
