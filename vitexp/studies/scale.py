"""[ViT] data-size scaling: models x nested class-balanced training-set sizes x seeds,
one set of hyper-parameters for every size, error = the best held-out error reached
(early stopping), optionally the few-shot linear probe of the frozen features.

The budget in optimisation steps of a size n is `steps x (n / smallest size)^steps_exponent`
(exponent 0, the default: the same budget for every size), at least `min_epochs` epochs;
`epochs` instead trains every size that many epochs.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib as mpl
import pandas as pd
from matplotlib.ticker import FixedLocator, NullLocator

from vitexp import analysis, plots
from vitexp.analysis import ERR
from vitexp.data.loaders import num_batches
from vitexp.errors import UserError
from vitexp.models.registry import check_student
from vitexp import models as vmodels
from vitexp.distill import teacher_columns
from vitexp.source import Source
from vitexp.studies.base import Knob, Study, int_knob, ints, paired_table, seeds_phrase, tuned
from vitexp.studies.registry import register


class Scale(Study):
    kind = "scale"
    command = "scale-study"
    title = "Data-size scaling (ViT)"
    help = ("ViT paper: error vs training-set size for a ViT_P, its ViT_C twin and a CNN "
            "(nested subsets, early stopping).")
    knobs = (Knob("sizes", int, "comma-separated training-set sizes", many=True),
             Knob("steps", int, "optimisation budget in steps at the smallest size"),
             Knob("steps_exponent", float, "the budget grows as (size / smallest)^this (0: the same for every size)"),
             Knob("min_epochs", int, "epoch floor for the largest sizes"),
             Knob("epochs", int, "train every size this many epochs instead of the step budget"),
             Knob("evals", int, "evaluations per trial (every max(1, epochs // evals) epochs)"),
             Knob("fewshot", int, "comma-separated shots of the linear few-shot eval, e.g. 1,5,10", many=True),
             Knob("teachers", str, "distilled arms, comma-separated STUDENT=TEACHER model pairs (DeiT): each size "
                                   "and seed's STUDENT learns from that size and seed's TEACHER trial", many=True))
    sets = ("model", "seed", "subset_seed", "epochs", "fewshot", "n_train", "eval_every")  # --optimizer, --lr, --wd: overrides
    needs = ("model", "n_train", "last_err")
    plot_command = "plot-scale"

    def trials(self, spec, base, trial):
        s = spec["study"]
        if not s.get("sizes"):
            raise UserError("the scale study has no sizes; give --sizes 500,2000,... or set [study] sizes")
        sizes = ints(s["sizes"], "sizes")
        if min(sizes) <= 0:
            raise UserError(f"--sizes must be positive, got {sizes}")
        fewshot = ints(s["fewshot"], "fewshot") if s.get("fewshot") else list(base.fewshot)
        teachers = teacher_pairs(s.get("teachers"), spec.get("models"))
        seeds = ints(s.get("seeds", [0]), "seeds")

        def plain(model: str, seed: int, n: int, **more):
            lr, wd = tuned(spec, model, base.optimizer)
            epochs = self.epochs(s, n, min(sizes), base.batch_size)
            extra = {"size": n, "budget_steps": self.budget(s, n, min(sizes)), **more.pop("extra", {})}
            return trial(model=model, n_train=n, seed=seed, subset_seed=seed, epochs=epochs,
                         eval_every=max(1, epochs // int_knob(s, "evals", 10)), lr=base.lr or lr,
                         wd=base.wd if base.wd is not None else wd, fewshot=fewshot, extra=extra, **more)

        out = [plain(model, seed, n) for model in s["models"] for seed in seeds for n in sizes]
        keys = {c.key() for c in out}
        for student, teacher in teachers:  # the teacher saw this size's images, no more
            for seed in seeds:
                for n in sizes:
                    taught = plain(teacher, seed, n, keep_weights=True)
                    if taught.key() not in keys:  # a teacher the study does not train as a model of its own
                        keys.add(taught.key())
                        out.append(taught)
                    source = Source.planned(taught)
                    out.append(plain(student, seed, n, teacher=source.init_from(), extra=teacher_columns(source)))
        return out

    @staticmethod
    def budget(s: dict, n: int, smallest: int) -> int:
        """The step budget of a size-N trial: steps x (n / smallest)^steps_exponent."""
        exponent = s.get("steps_exponent", 0)
        if isinstance(exponent, bool) or not isinstance(exponent, (int, float)) or not 0 <= exponent <= 2:
            raise UserError(f"--steps-exponent takes a number in [0, 2], got {exponent!r}")
        return round(int_knob(s, "steps", 0, 0) * (n / smallest) ** exponent)

    def epochs(self, s: dict, n: int, smallest: int, batch: int) -> int:
        """Epochs of a size-N trial: [study] epochs, else its step budget, at least min_epochs."""
        if s.get("epochs") is not None:
            return int_knob(s, "epochs", 1)
        return max(int_knob(s, "min_epochs", 1), math.ceil(self.budget(s, n, smallest) * batch / n))

    def figures(self, runs, out, n_boot=2500, seed=0):
        return plot_scale(analysis.arms(runs), Path(out))

    def tables(self, runs, n_boot=2500, seed=0):
        summary = scale_summary(analysis.arms(runs))
        out = []
        for metric in dict.fromkeys(summary["metric"]):
            part = summary[summary["metric"] == metric]
            out += [("h3", f"{metric} (%) by training-set size: {seeds_phrase(part['n'])}"),
                    ("table", size_table(part, "n_train"))]
        gaps = cnn_gaps(summary)
        if not gaps.empty:
            out += [("h3", "Gap to the CNN: mean top-1 error minus the CNN's (points)"), ("table", gaps)]
        gains = distilled_minus_plain(runs)
        if not gains.empty:
            out += [("h3", "Distilled arm minus the same model trained plainly, same size and seed (top-1 error, "
                           "points, mean ± std over seeds)"), ("table", paired_table(gains, "n_train"))]
        agree = teacher_agreement(runs)
        if not agree.empty:
            out += [("h3", "How often the teacher's argmax is the label on the student's augmented training images "
                           "(last epoch, %, mean over seeds): where it always is, the label teaches the same"),
                    ("table", agree)]
        return out

    def captions(self, figure: Path) -> str:
        """Said from the figure's own numbers (its CSV): its panels and what a point is."""
        table = pd.read_csv(figure.with_suffix(".csv"))
        shots = [analysis.FEWSHOT.match(m)[1] for m in dict.fromkeys(table["metric"]) if analysis.FEWSHOT.match(m)]
        top = table[table["metric"] == ERR]
        point = "one run per point" if top["n"].max() == 1 else "the mean over seeds with a min–max band"
        return (f"Top-1 error vs training-set size (log x) per model, {point}"
                + (f"; further panels: {', '.join(shots)}-shot linear-probe errors of the frozen features." if shots
                   else "."))

    def must_converge(self, runs):
        ok = analysis.finished(runs)
        return ok[ok["n_train"] == ok.groupby("model")["n_train"].transform("max")]


def teacher_pairs(value, models: dict | None = None) -> list[tuple[str, str]]:
    """(student, teacher) pairs from [study] teachers: a table of STUDENT = TEACHER or
    STUDENT = [TEACHER, ...] (DeiT compares teachers), or STUDENT=TEACHER strings; MODELS:
    the preset's own ([models] tables)."""
    if not value:
        return []
    if isinstance(value, dict):
        pairs = [(k, t) for k, v in value.items() for t in (v if isinstance(v, (list, tuple)) else [v])]
    elif isinstance(value, (list, tuple)) and all(isinstance(v, str) and v.count("=") == 1 for v in value):
        pairs = [tuple(v.split("=")) for v in value]
    else:
        pairs = None
    if not pairs or not all(isinstance(x, str) and x for pair in pairs for x in pair):
        raise UserError(f"--teachers takes STUDENT=TEACHER pairs, e.g. vit_p_7mf=resnet_7mf, got {value!r}; or "
                        f'set [study] teachers = {{vit_p_7mf = "resnet_7mf"}} in the preset')
    for student, teacher in pairs:
        for name in (student, teacher):
            vmodels.get_spec(name, models)  # unknown: the closest names
        check_student(vmodels.get_spec(student, models))
    return list(dict.fromkeys(pairs))


def scale_summary(runs: pd.DataFrame) -> pd.DataFrame:
    """Per model, training-set size and metric (ERR and each fewshot{k}_err):
    mean, std (ddof 1; NaN for one seed), min, max and n over seeds; diverged runs
    count at 100 for ERR and are counted in `diverged`."""
    ok = analysis.finished(runs)
    rows = []
    for metric in [ERR] + analysis.fewshot_columns(ok):
        for (model, size), g in ok.groupby(["model", "n_train"], sort=True):
            v = g[metric].dropna()
            if v.empty:
                continue
            conv = g.loc[v.index, "converged"] if "converged" in g else pd.Series(True, index=v.index)
            rows.append({"model": model, "n_train": int(size), "metric": metric, "mean": v.mean(),
                         "std": v.std(), "min": v.min(), "max": v.max(), "n": len(v),
                         "diverged": int(g.loc[v.index, "diverged"].sum()),
                         "not_converged": int((~conv.fillna(False).astype(bool)).sum())})
    return pd.DataFrame(rows, columns=["model", "n_train", "metric", "mean", "std", "min", "max", "n", "diverged",
                                       "not_converged"])


def distilled_minus_plain(runs: pd.DataFrame) -> pd.Series:
    """Each distilled student's top-1 error minus its plain twin's (the same model, size and
    seed, so the same subset), indexed by (arm, n_train, seed): what the teacher adds."""
    ok = analysis.finished(runs)
    if "teacher_model" not in ok or ok["teacher_model"].isna().all():
        return pd.Series(dtype=float)
    plain = ok[ok["teacher_model"].isna()].set_index(["model", "n_train", "seed"])[ERR]
    taught = analysis.arms(ok[ok["teacher_model"].notna()])
    twin = plain.reindex(pd.MultiIndex.from_frame(ok.loc[taught.index, ["model", "n_train", "seed"]]))
    diff = pd.Series(taught[ERR].to_numpy() - twin.to_numpy(),
                     index=pd.MultiIndex.from_frame(taught[["model", "n_train", "seed"]].astype({"n_train": int})))
    return diff.dropna()


def teacher_agreement(runs: pd.DataFrame) -> pd.DataFrame:
    """Per distilled arm and size, the mean over seeds of the students' `teacher_agree`
    (empty when no student recorded it)."""
    ok = analysis.finished(runs)
    if "teacher_agree" not in ok or ok["teacher_agree"].isna().all():
        return pd.DataFrame()
    taught = analysis.arms(ok[ok["teacher_agree"].notna()])
    wide = taught.pivot_table(index="model", columns="n_train", values="teacher_agree", aggfunc="mean").round(2)
    wide.columns = [f"n={int(c)}" for c in wide.columns]
    return wide.reindex(plots.model_order(wide.index)).reset_index()


def cnn_gaps(summary: pd.DataFrame) -> pd.DataFrame:
    """Each ViT's mean error (ERR) minus the CNN's, per size (one CNN in the study)."""
    top = summary[summary["metric"] == ERR]
    cnns = [m for m in plots.model_order(top["model"]) if plots.family(m) == "cnn"]
    if len(cnns) != 1:
        return pd.DataFrame()
    wide = top.pivot(index="model", columns="n_train", values="mean")
    gaps = (wide.drop(index=cnns[0]) - wide.loc[cnns[0]]).reindex(
        [m for m in plots.model_order(wide.index) if m != cnns[0]])
    gaps.columns = [f"n={c}" for c in gaps.columns]
    return gaps.reset_index()


def plot_scale(runs: pd.DataFrame, out: Path) -> list[Path]:
    """scale.*: error vs training-set size (log x), one line per model: mean over
    seeds, band min-max; one more panel per few-shot k when runs.csv has them."""
    plots.require_results(runs)
    summary = scale_summary(runs)
    metrics = list(dict.fromkeys(summary["metric"]))
    styles, labels = plots.model_styles(runs["model"]), plots.model_labels(runs)
    with plots.style():
        ncols = min(2, len(metrics))
        fig, axes = plots.figure(-(-len(metrics) // ncols), ncols, width=4.6, height=3.4)
        axes = axes.ravel()
        for ax in axes[len(metrics):]:
            ax.set_visible(False)
        for ax, metric in zip(axes, metrics):
            _scale_panel(ax, summary[summary["metric"] == metric], metric, styles, labels)
        fig.legend(handles=axes[0].get_legend_handles_labels()[0], loc="outside right center")
        fig.suptitle(f"Error vs training-set size: {scale_caption(runs, summary)}")
        return plots.save(fig, summary, out, "scale")


def scale_caption(runs: pd.DataFrame, summary: pd.DataFrame) -> str:
    """What a reader of the figure must know: the data set, the budget rule, the seeds, and
    what an open marker means."""
    ok = analysis.finished(runs)
    data = ", ".join(sorted(set(ok["dataset"].astype(str)))) if "dataset" in ok else "?"
    budget, cols = "?", ["epochs", "batch_size", "n_train"]
    if set(cols) <= set(ok.columns) and ok[cols].notna().all().all():
        steps = [int(e) * num_batches(int(n), int(b), True) for e, b, n in ok[cols].itertuples(index=False)]
        budget = f"{plots.span_text(steps)} steps, {plots.span_text([int(e) for e in ok['epochs']])} epochs"
    n = summary.loc[summary["metric"] == ERR, "n"]
    phrase = "one run per point" if n.max() == 1 else seeds_phrase(n, std=False) + ", band: min–max"
    open_note = "; open marker: a run there not converged" if summary["not_converged"].sum() else ""
    return f"{data}, budget {budget}\n({phrase}{open_note})"


def size_table(part: pd.DataFrame, size: str) -> pd.DataFrame:
    """One summary metric as a table: a row per model, a column per SIZE, cells mean ± std."""
    cell = [f"{m:.2f}" if n == 1 or not math.isfinite(s) else f"{m:.2f} ± {s:.2f}"
            for m, s, n in zip(part["mean"], part["std"], part["n"])]
    wide = part.assign(cell=cell).pivot(index="model", columns=size, values="cell")
    wide = wide.reindex(plots.model_order(wide.index)).reset_index()
    wide.columns = ["model"] + [f"n={c}" for c in wide.columns[1:]]
    return wide


DODGE = 1.08  # bars: neighbouring models' points this factor apart on the log x axis, so bars never overlap


def size_panel(ax, part: pd.DataFrame, size: str, styles: dict, labels: dict, bars: bool = False) -> None:
    """Error vs SIZE (log x), a line per model: mean, min-max as a band (or, with BARS, as error
    bars with the models set side by side: where spreads overlap, bands tangle), open markers
    where a run there did not converge."""
    models = plots.model_order(part["model"])
    for i, model in enumerate(models):
        g = part[part["model"] == model].sort_values(size)
        st = styles[model]
        x = g[size] * (DODGE ** (i - (len(models) - 1) / 2) if bars else 1.0)
        ax.plot(x, g["mean"], color=st["color"], marker=st["marker"], label=labels[model])
        loose = g["not_converged"] > 0  # drawn open: not every run at that point converged
        ax.scatter(x[loose], g.loc[loose, "mean"], marker=st["marker"], s=40, facecolor="white",
                   edgecolor=st["color"], zorder=3)
        if bars:
            ax.errorbar(x, g["mean"], yerr=[g["mean"] - g["min"], g["max"] - g["mean"]], color=st["color"], ls="",
                        capsize=2, lw=1)
        else:
            ax.fill_between(g[size], g["min"], g["max"], color=st["color"], alpha=0.15, lw=0)
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator(sorted(set(part[size]))))
    ax.xaxis.set_major_formatter(mpl.ticker.FuncFormatter(lambda v, _: plots.count_label(v)))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_ylabel("top-1 error (%)")


def _scale_panel(ax, part, metric, styles, labels) -> None:
    size_panel(ax, part, "n_train", styles, labels)
    ax.set_xlabel("training images")
    k = analysis.FEWSHOT.match(metric)
    ax.set_title(f"{k[1]}-shot linear probe (frozen features)" if k else "test error")


STUDY = register(Scale())
