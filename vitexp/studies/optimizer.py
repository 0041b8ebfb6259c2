"""[EC] optimizer and training length: models x {AdamW, SGD} x training lengths x seeds,
each at the model's tuned lr/wd; shown as the SGD - AdamW gap per schedule, the
errors vs epochs, and each model's error minus that of its longest schedule (with its
best optimizer, as the paper draws it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.lines import Line2D

from vitexp import analysis, plots
from vitexp.errors import UserError
from vitexp.studies.base import Knob, Study, ints, optimizer_list, seeds_phrase, tuned
from vitexp.studies.registry import register


class Optimizer(Study):
    kind = "optimizer"
    command = "optimizer-study"
    title = "Optimizer and training length (EC)"
    help = "EC paper: AdamW vs SGD at tuned settings over training lengths (optimizer gap and training-length figures)."
    knobs = (Knob("optimizers", str, "comma-separated, default adamw,sgd", many=True),
             Knob("epochs", int, "comma-separated training lengths [paper: 50,100,200,400]", many=True))
    needs = ("model", "optimizer", "epochs", "top1_err")
    plot_command = "plot-optimizer"

    def trials(self, spec, base, trial):
        s = spec["study"]
        lengths = ints(s.get("epochs", [base.epochs]), "epochs")
        if min(lengths) <= 0:
            raise UserError(f"--epochs must be positive, got {lengths}")
        out = []
        for model in s["models"]:
            for o in optimizer_list(s):
                lr, wd = tuned(spec, model, o)
                for e in lengths:
                    for seed in ints(s.get("seeds", [0]), "seeds"):
                        out.append(trial(model=model, optimizer=o, lr=lr, wd=wd, epochs=e, seed=seed))
        return out

    def figures(self, runs, out, n_boot=2500, seed=0):
        return plot_optimizer(runs, Path(out))

    def tables(self, runs, n_boot=2500, seed=0):
        summary = optimizer_summary(runs)
        best = best_optimizer(summary)
        errors = summary.pivot_table(index=["model", "optimizer"], columns="epochs", values="mean").reset_index()
        errors.insert(2, "best", [best[m] == o for m, o in zip(errors["model"], errors["optimizer"])])
        errors.columns = [c if isinstance(c, str) else f"{c} ep" for c in errors.columns]
        out = [("h3", f"Top-1 error (%) per model, optimizer and epochs, {seeds_phrase(summary['n'], std=False)} (best: the model's better "
                      f"optimizer at its longest schedule)"), ("table", errors)]
        gaps = optimizer_gaps(summary)
        if not gaps.empty:
            wide = gaps.pivot(index="model", columns="epochs", values="gap").reset_index()
            wide.columns = ["model"] + [f"{c} ep" for c in wide.columns[1:]]
            out += [("h3", "Optimizer gap: SGD − AdamW mean top-1 error (points)"), ("table", wide)]
        return out

    def captions(self, figure: Path) -> str:
        return ("(a) SGD minus AdamW mean top-1 error per model and schedule; (b) mean errors vs epochs, AdamW "
                "solid, SGD dashed; (c) error minus that of the longest schedule, each model with its best "
                "optimizer. A red x marks a mean that includes diverged runs (at 100%).")

    def must_converge(self, runs):
        ok = analysis.finished(runs)
        return ok[ok["epochs"] == ok.groupby(["model", "optimizer"])["epochs"].transform("max")]


def optimizer_summary(runs: pd.DataFrame) -> pd.DataFrame:
    """Per model, optimizer and epochs: mean/min/max top1_err over seeds, n, diverged."""
    ok = analysis.finished(runs)
    g = ok.groupby(["model", "optimizer", "epochs"], sort=True)
    out = g["top1_err"].agg(["mean", "min", "max", "count"]).rename(columns={"count": "n"})
    out["diverged"] = g["diverged"].sum().astype(int)
    out = out.reset_index()
    out["epochs"] = out["epochs"].astype(int)
    return out


def optimizer_gaps(summary: pd.DataFrame) -> pd.DataFrame:
    """SGD minus AdamW mean error per model and epochs, where both were run."""
    wide = summary.pivot_table(index=["model", "epochs"], columns="optimizer", values="mean")
    if not {"adamw", "sgd"} <= set(wide.columns):
        return pd.DataFrame(columns=["model", "epochs", "adamw", "sgd", "gap"])
    wide = wide[["adamw", "sgd"]].dropna().reset_index()
    wide["gap"] = wide["sgd"] - wide["adamw"]
    wide.columns.name = None
    return wide


def best_optimizer(summary: pd.DataFrame) -> dict:
    """model -> the optimizer with the lower mean error at the longest schedule both
    ran (the only one when only one ran; AdamW on a tie), as the paper picks each
    model's best optimizer."""
    best = {}
    for model, g in summary.groupby("model", sort=True):
        opts = sorted(set(g["optimizer"]))
        common = set.intersection(*(set(g.loc[g["optimizer"] == o, "epochs"]) for o in opts))
        at = g[g["epochs"] == max(common)] if common else g[g["epochs"] == g["epochs"].max()]
        best[model] = at.sort_values(["mean", "optimizer"]).iloc[0]["optimizer"]
    return best


def length_curves(summary: pd.DataFrame) -> pd.DataFrame:
    """Per model and optimizer: mean error minus that at its longest schedule, vs
    epochs; `best` marks each model's best optimizer (the paper's curves)."""
    best = best_optimizer(summary)
    out = summary[["model", "optimizer", "epochs", "mean"]].copy()
    longest = out.loc[out.groupby(["model", "optimizer"])["epochs"].idxmax()].set_index(["model", "optimizer"])["mean"]
    out["delta"] = out["mean"] - [longest[(m, o)] for m, o in zip(out["model"], out["optimizer"])]
    out["best"] = [best[m] == o for m, o in zip(out["model"], out["optimizer"])]
    return out.reset_index(drop=True)


MARK = dict(marker="x", color="crimson", s=30, zorder=5, clip_on=False)


def plot_optimizer(runs: pd.DataFrame, out: Path) -> list[Path]:
    """optimizer.*: (a) the optimizer gap, (b) mean errors vs epochs, (c) error minus the
    longest schedule's, each model with its best optimizer."""
    plots.require_results(runs)
    summary = optimizer_summary(runs)
    gaps, curves, best = optimizer_gaps(summary), length_curves(summary), best_optimizer(summary)
    models = plots.model_order(summary["model"])
    styles, labels = plots.model_styles(models), plots.model_labels(runs)
    with plots.style():
        fig, axes = plots.figure(1, 3, width=4.4, height=3.5)
        _gap_panel(axes[0][0], gaps, summary, models, styles)
        _curve_panels(axes[0][1], axes[0][2], curves, summary, models, styles, best)
        keys = [Line2D([], [], color=styles[m]["color"], marker=styles[m]["marker"],
                       label=f"{labels[m]}, best: {analysis.OPTIMIZER_NAMES.get(best[m], best[m])}") for m in models]
        marks = [Line2D([], [], color="0.3", ls=plots.OPT_LINES.get(o, ":"), label=analysis.OPTIMIZER_NAMES.get(o, o))
                 for o in plots.optimizers(summary)]
        if summary["diverged"].any():
            marks.append(Line2D([], [], ls="", marker="x", color="crimson", label="includes diverged runs (at 100%)"))
        fig.legend(handles=keys + marks, loc="outside right center")
        fig.suptitle("Optimizer and training-length stability")
        table = pd.concat([
            gaps.assign(panel="gap", optimizer="sgd-adamw").rename(columns={"gap": "value"})[
                ["panel", "model", "optimizer", "epochs", "value"]],
            summary.assign(panel="error").rename(columns={"mean": "value"}),
            curves[curves["best"]].assign(panel="delta").rename(columns={"delta": "value"}).drop(columns="mean"),
        ], ignore_index=True)
        return plots.save(fig, table, out, "optimizer")


def _gap_panel(ax, gaps, summary, models, styles) -> None:
    """(a): one bar per model and schedule; outlined, so a zero gap still shows as a line."""
    epochs = sorted(set(summary["epochs"]))
    diverged = summary.groupby(["model", "epochs"])["diverged"].sum()
    width = 0.8 / len(models)
    for i, model in enumerate(models):
        g = gaps[gaps["model"] == model]
        pos = np.array([epochs.index(e) - 0.4 + width * (i + 0.5) for e in g["epochs"]])
        ax.bar(pos, g["gap"], width=width, color=styles[model]["color"], edgecolor=styles[model]["color"], lw=1.5)
        hit = np.array([diverged[(model, e)] > 0 for e in g["epochs"]], dtype=bool)
        ax.scatter(pos[hit], np.maximum(g["gap"].to_numpy()[hit], 0), **MARK)
    if gaps.empty:
        ax.text(0.5, 0.7, "needs AdamW and SGD runs\nof the same model", ha="center", va="center",
                transform=ax.transAxes)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(range(len(epochs)), [str(e) for e in epochs])
    ax.grid(axis="x", visible=False)
    ax.set_xlabel("epochs")
    ax.set_ylabel("SGD − AdamW top-1 error (points)")
    ax.set_title("(a) optimizer gap")


def _curve_panels(ax_b, ax_c, curves, summary, models, styles, best) -> None:
    """(b) mean error vs epochs per optimizer; (c) minus the longest schedule, best optimizer only."""
    epochs = sorted(set(summary["epochs"]))
    for ax, col in ((ax_b, "mean"), (ax_c, "delta")):
        for model in models:
            for opt in plots.optimizers(summary):
                g = curves[(curves["model"] == model) & (curves["optimizer"] == opt)].sort_values("epochs")
                if g.empty or (col == "delta" and opt != best[model]):
                    continue
                ax.plot(g["epochs"], g[col], ls=plots.OPT_LINES.get(opt, ":"), color=styles[model]["color"],
                        marker=styles[model]["marker"])
                if col == "mean":
                    d = summary[(summary["model"] == model) & (summary["optimizer"] == opt)].sort_values("epochs")
                    ax.scatter(d.loc[d["diverged"] > 0, "epochs"], d.loc[d["diverged"] > 0, "mean"], **MARK)
        plots.epoch_axis(ax, epochs)
        ax.set_xlabel("epochs")
    ax_b.set_ylabel("top-1 error (%)")
    ax_b.set_title("(b) error, mean over seeds")
    ax_c.axhline(0, color="k", lw=0.8)
    ax_c.set_ylabel("Δ top-1 error (points)")
    ax_c.set_title("(c) error − error at the longest schedule\n(each model with its best optimizer)")


STUDY = register(Optimizer())
