"""[EC] optimizer and training length: models x {AdamW, SGD} x training lengths x seeds,
each at the model's tuned lr/wd; shown as the SGD - AdamW gap per schedule, the
errors vs epochs, and each model's error minus that of its longest schedule (with its
best optimizer, as the paper draws it).

Optionally a batch-size axis ([EC] trains at 2048; SGD is known to match Adam at small
batches): each batch size's lr comes from the tuned one by one or more scaling rules
(linear, square root, none; from the batch the tuned values were found at), optionally
times a few factors (a grid around the rule's lr), and where there are several, each
seed's lr is the one that did best on held-out training images, so no batch size is
judged at a wrong lr and no choice sees the test set."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.lines import Line2D

from vitexp import analysis, plots
from vitexp.errors import UserError, unknown
from vitexp.studies.base import Knob, Study, int_knob, ints, optimizer_list, positive_floats, seeds_phrase, tuned
from vitexp.studies.registry import register


class Optimizer(Study):
    kind = "optimizer"
    command = "optimizer-study"
    title = "Optimizer and training length (EC)"
    help = "EC paper: AdamW vs SGD at tuned settings over training lengths (optimizer gap and training-length figures)."
    knobs = (Knob("optimizers", str, "comma-separated, default adamw,sgd", many=True),
             Knob("epochs", int, "comma-separated training lengths [paper: 50,100,200,400]", many=True),
             Knob("batch_sizes", int, "comma-separated batch sizes (default: the [train] batch size) [paper: 2048]",
                  many=True),
             Knob("lr_rules", str, "how the tuned lr scales to each batch size, comma-separated: linear, sqrt, "
                                   "none (default linear; several: chosen per seed on --holdout images)", many=True),
             Knob("lr_factors", float, "multipliers of each rule's lr, comma-separated: a grid around it "
                                       "(default 1; several: chosen per seed on --holdout images)", many=True),
             Knob("lr_rule_batch", int, "the batch size the tuned lr was found at, that sqrt and none scale "
                                        "from (default: the [train] batch size)"))
    needs = ("model", "optimizer", "epochs", "batch_size", "last_err")
    plot_command = "plot-optimizer"

    def trials(self, spec, base, trial):
        s = spec["study"]
        lengths = ints(s.get("epochs", [base.epochs]), "epochs")
        if min(lengths) <= 0:
            raise UserError(f"--epochs must be positive, got {lengths}")
        batches = ints(s.get("batch_sizes", [base.batch_size]), "batch_sizes")
        rules, factors = lr_grid(s, base)
        from_batch = int_knob(s, "lr_rule_batch", base.batch_size, 1, 1 << 20)
        out = []
        for model in s["models"]:
            for o in optimizer_list(s):
                lr, wd = tuned(spec, model, o)
                for b in batches:
                    # rules that agree at this batch (all of them at the tuning batch) give one trial
                    scaled = {}
                    for rule in rules:
                        for f in factors:
                            scaled.setdefault(rule_lr(lr, rule, b, from_batch) * f, (rule, f))
                    for lr_at_b, (rule, f) in scaled.items():
                        for e in lengths:
                            for seed in ints(s.get("seeds", [0]), "seeds"):
                                extra = {"lr_rule": rule} if len(rules) > 1 or rule != "linear" else {}
                                if f != 1.0:  # only off the rule's lr, so the keys of rule-only trials stay
                                    extra["lr_factor"] = f
                                out.append(trial(model=model, optimizer=o, lr=lr_at_b, wd=wd, epochs=e, seed=seed,
                                                 batch_size=b, extra=extra))
        return out

    def figures(self, runs, out, n_boot=2500, seed=0):
        if analysis.finished(runs)["batch_size"].nunique() > 1:
            return plot_batch(runs, Path(out))
        return plot_optimizer(runs, Path(out))

    def tables(self, runs, n_boot=2500, seed=0):
        if analysis.finished(runs)["batch_size"].nunique() > 1:
            return batch_tables(runs)
        summary = optimizer_summary(runs)
        best = best_optimizer(summary)
        errors = summary.pivot_table(index=["model", "optimizer"], columns="epochs", values="mean").reset_index()
        errors.insert(2, "best", [best[m] == o for m, o in zip(errors["model"], errors["optimizer"])])
        errors.columns = [c if isinstance(c, str) else f"{c} ep" for c in errors.columns]
        out = [("h3", f"Top-1 error (%) per model, optimizer and epochs, {seeds_phrase(summary['n'], std=False)} (best: the model's better "
                      f"optimizer at its longest schedule)"), ("table", errors)]
        return out + gap_table(runs, summary, "epochs", "{} ep", "")

    def captions(self, figure: Path) -> str:
        if figure.stem == "batch":
            return ("At each model's longest schedule: (a) SGD minus AdamW top-1 error vs batch size, paired by "
                    "seed, with its 95% t interval; (b) "
                    "mean ± std error vs batch size, AdamW solid, SGD dashed; each seed at the lr its held-out "
                    "images chose. A red x marks a mean that includes diverged runs.")
        return ("(a) SGD minus AdamW top-1 error per model and schedule, paired by seed, with its 95% t "
                "interval; (b) mean errors vs epochs, AdamW "
                "solid, SGD dashed; (c) error minus that of the longest schedule, each model with its best "
                "optimizer. A red x marks a mean that includes diverged runs (at 100%).")

    def must_converge(self, runs):
        ok = chosen(runs)
        return ok[ok["epochs"] == ok.groupby(["model", "optimizer", "batch_size"])["epochs"].transform("max")]


LR_RULES = {"linear": 1.0, "sqrt": 0.5, "none": 0.0}  # rule -> exponent of the batch size in the peak lr


def lr_grid(s: dict, base) -> tuple[list[str], list[float]]:
    """The lr rules and the factors on each rule's lr; a grid of several needs held-out images."""
    rules = s.get("lr_rules", ["linear"])
    rules = [rules] if isinstance(rules, str) else rules
    if not isinstance(rules, (list, tuple)) or not rules:
        raise UserError(f"--lr-rules takes a comma-separated list of {', '.join(LR_RULES)}, got {rules!r}")
    for r in rules:
        if r not in LR_RULES:
            raise unknown("lr rule", str(r), LR_RULES)
    factors = positive_floats(s.get("lr_factors", [1.0]), "lr_factors")
    if len(rules) * len(factors) > 1 and not base.holdout:
        raise UserError(f"--lr-rules {','.join(rules)} with --lr-factors {','.join(f'{f:g}' for f in factors)} "
                        f"chooses each seed's lr on held-out training images; give --holdout (e.g. 0.1), "
                        f"or one rule and one factor")
    return list(rules), factors


def rule_lr(lr: float, rule: str, batch: int, from_batch: int) -> float:
    """The lr (at the reference batch, as TrainConfig.lr) whose peak at BATCH follows RULE from
    the tuned LR found at FROM_BATCH: peak = lr x from_batch/2048 x (batch/from_batch)^exponent."""
    if rule == "linear":
        return lr  # TrainConfig.lr already scales linearly; keeps the tuned value (and keys) exact
    return lr * (from_batch / batch) ** (1.0 - LR_RULES[rule])


def chosen(runs: pd.DataFrame) -> pd.DataFrame:
    """The finished runs, one per model, optimizer, batch size, epochs and seed: where an lr
    grid ran, the lr that did best on the held-out images (the smaller lr of equals)."""
    ok = analysis.finished(runs)
    if "val_err" not in ok or ok["val_err"].isna().all():
        return ok
    ok = ok.sort_values(["val_err", "lr"], na_position="last")
    return ok.groupby(["model", "optimizer", "batch_size", "epochs", "seed"], sort=False).head(1).sort_index()


def optimizer_summary(runs: pd.DataFrame) -> pd.DataFrame:
    """Per model, optimizer, batch size and epochs: mean/min/max/std error (ERR) over seeds (of
    each seed's chosen lr), n, diverged."""
    ok = chosen(runs)
    g = ok.groupby(["model", "optimizer", "batch_size", "epochs"], sort=True)
    out = g[analysis.ERR].agg(["mean", "min", "max", "std", "count"]).rename(columns={"count": "n"})
    out["diverged"] = g["diverged"].sum().astype(int)
    out = out.reset_index()
    out[["batch_size", "epochs"]] = out[["batch_size", "epochs"]].astype(int)
    return out


GAP_CELLS = ["model", "batch_size", "epochs"]


def optimizer_gaps(runs: pd.DataFrame, cells: pd.DataFrame | None = None) -> pd.DataFrame:
    """SGD minus AdamW error per model, batch size and epochs, paired by seed (each seed at its
    chosen lr), where both ran: the mean (`gap`), the 95% t half-width over seeds (`half`, NaN
    for one seed) and the seeds (`n`); with CELLS, only its (model, batch_size, epochs) rows."""
    ok = chosen(runs)
    wide = ok.pivot_table(index=GAP_CELLS + ["seed"], columns="optimizer", values=analysis.ERR)
    if ok.empty or not {"adamw", "sgd"} <= set(wide.columns):
        return pd.DataFrame(columns=GAP_CELLS + ["gap", "half", "n"])
    per_seed = (wide["sgd"] - wide["adamw"]).dropna().groupby(level=GAP_CELLS)
    out = pd.DataFrame({"gap": per_seed.mean(), "half": per_seed.agg(analysis.t_half),
                        "n": per_seed.count()}).reset_index()
    out[["batch_size", "epochs"]] = out[["batch_size", "epochs"]].astype(int)
    return out if cells is None else out.merge(cells[GAP_CELLS].drop_duplicates(), on=GAP_CELLS)


def gap_table(runs: pd.DataFrame, cells: pd.DataFrame, column: str, label: str, title: str) -> list[tuple]:
    """Report blocks of the SGD - AdamW gap per model (rows) and COLUMN (columns named LABEL),
    over CELLS' rows."""
    gaps = optimizer_gaps(runs, cells)
    if gaps.empty:
        return []
    gaps["cell"] = [f"{g:+.2f}" if n < 2 else f"{g:+.2f} ± {h:.2f}" for g, h, n in
                    zip(gaps["gap"], gaps["half"], gaps["n"])]
    wide = gaps.pivot(index="model", columns=column, values="cell").reset_index()
    wide.columns = ["model"] + [label.format(c) for c in wide.columns[1:]]
    return [("h3", f"Optimizer gap: SGD − AdamW top-1 error (points){title}, paired by seed: mean ± 95% t "
                   f"half-width over {plots.span_text(gaps['n'].tolist(), '{:g}')} seeds"), ("table", wide)]


def at_longest(summary: pd.DataFrame) -> pd.DataFrame:
    """The rows of each model and optimizer's longest schedule."""
    return summary[summary["epochs"] == summary.groupby(["model", "optimizer"])["epochs"].transform("max")]


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


def batch_tables(runs: pd.DataFrame) -> list[tuple]:
    """Report blocks of a batch-size study: errors per model, optimizer and batch size, the
    SGD - AdamW gap per batch size, and the lr each seed chose (its rule) on held-out images."""
    summary = optimizer_summary(runs)
    longest = at_longest(summary)
    cells = longest.assign(cell=[f"{m:.2f} ± {0.0 if np.isnan(sd) else sd:.2f}"
                                 for m, sd in zip(longest["mean"], longest["std"])])
    errors = cells.pivot(index=["model", "optimizer"], columns="batch_size", values="cell").reset_index()
    errors.columns = [c if isinstance(c, str) else f"batch {c}" for c in errors.columns]
    out = [("h3", f"Top-1 error (%) per model, optimizer and batch size at the longest schedule, "
                  f"{seeds_phrase(longest['n'])}"), ("table", errors)]
    out += gap_table(runs, longest, "batch_size", "batch {}", " per batch size")
    ch = chosen(runs)
    if "lr_rule" in ch or "lr_factor" in ch:
        ch = ch[ch["epochs"] == ch.groupby(["model", "optimizer", "batch_size"])["epochs"].transform("max")]
        rule = ch["lr_rule"].fillna("linear") if "lr_rule" in ch else pd.Series("linear", index=ch.index)
        if "lr_factor" in ch:
            rule = rule + ch["lr_factor"].map(lambda f: "" if pd.isna(f) or f == 1 else f"*{f:g}")
        rules = (ch.assign(rule=rule)
                 .groupby(["model", "optimizer", "batch_size"])["rule"]
                 .agg(lambda r: ", ".join(f"{k} x{n}" for k, n in r.value_counts().sort_index().items())))
        rules = rules.unstack("batch_size").reset_index()
        rules.columns = [c if isinstance(c, str) else f"batch {int(c)}" for c in rules.columns]
        out += [("h3", "lr rule (*factor) chosen on the held-out images (seeds per rule; at the tuning batch the "
                      "rules agree)"),
                ("table", rules)]
    return out


def plot_batch(runs: pd.DataFrame, out: Path) -> list[Path]:
    """batch.*: at each model's longest schedule, (a) SGD - AdamW mean error vs batch size,
    (b) the mean errors vs batch size, AdamW solid, SGD dashed."""
    plots.require_results(runs)
    summary = optimizer_summary(runs)
    longest = at_longest(summary)
    gaps = optimizer_gaps(runs, longest)
    models = plots.model_order(summary["model"])
    styles, labels = plots.model_styles(models), plots.model_labels(runs)
    batches = sorted(set(summary["batch_size"]))
    with plots.style():
        fig, axes = plots.figure(1, 2, width=4.4, height=3.5)
        ax_a, ax_b = axes[0]
        for model in models:
            st = styles[model]
            g = gaps[gaps["model"] == model].sort_values("batch_size")
            ax_a.errorbar(g["batch_size"], g["gap"], yerr=g["half"].fillna(0), color=st["color"], marker=st["marker"],
                          capsize=2)
            for opt in plots.optimizers(longest):
                d = longest[(longest["model"] == model) & (longest["optimizer"] == opt)].sort_values("batch_size")
                ax_b.errorbar(d["batch_size"], d["mean"], yerr=d["std"].fillna(0), ls=plots.OPT_LINES.get(opt, ":"),
                              color=st["color"], marker=st["marker"], capsize=2)
                hit = d[d["diverged"] > 0]
                ax_b.scatter(hit["batch_size"], hit["mean"], **MARK)
        for ax in (ax_a, ax_b):
            plots.epoch_axis(ax, batches)
            ax.set_xlabel("batch size")
        ax_a.axhline(0, color="k", lw=0.8)
        ax_a.set_ylabel("SGD − AdamW top-1 error (points)")
        ax_a.set_title("(a) optimizer gap, paired by seed\n(bars: 95% t interval)", fontsize="medium")
        ax_b.set_ylabel("top-1 error (%)")
        ax_b.set_title("(b) error, mean ± std over seeds")
        keys = [Line2D([], [], color=styles[m]["color"], marker=styles[m]["marker"], label=labels[m]) for m in models]
        keys += [Line2D([], [], color="0.3", ls=plots.OPT_LINES.get(o, ":"), label=analysis.OPTIMIZER_NAMES.get(o, o))
                 for o in plots.optimizers(longest)]
        fig.legend(handles=keys, loc="outside right center")
        fig.suptitle(f"Optimizer gap vs batch size: {plots.setting(runs)}\n(each seed at its held-out-chosen lr)")
        table = pd.concat([gaps.assign(panel="gap").rename(columns={"gap": "value"})[
                               ["panel", "model", "batch_size", "epochs", "value", "half", "n"]],
                           longest.assign(panel="error").rename(columns={"mean": "value"})], ignore_index=True)
        return plots.save(fig, table, out, "batch")


def plot_optimizer(runs: pd.DataFrame, out: Path) -> list[Path]:
    """optimizer.*: (a) the optimizer gap, (b) mean errors vs epochs, (c) error minus the
    longest schedule's, each model with its best optimizer."""
    plots.require_results(runs)
    summary = optimizer_summary(runs)
    gaps, curves, best = optimizer_gaps(runs), length_curves(summary), best_optimizer(summary)
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
        fig.suptitle(f"Optimizer and training-length stability: {plots.setting(runs)}")
        table = pd.concat([
            gaps.assign(panel="gap", optimizer="sgd-adamw").rename(columns={"gap": "value"})[
                ["panel", "model", "optimizer", "epochs", "value", "half", "n"]],
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
        ax.bar(pos, g["gap"], width=width, color=styles[model]["color"], edgecolor=styles[model]["color"], lw=1.5,
               yerr=g["half"].fillna(0), error_kw={"elinewidth": 1, "capsize": 2, "ecolor": "0.2"})
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
    ax.set_title("(a) optimizer gap, paired by seed\n(bars: 95% t interval)", fontsize="medium")


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
