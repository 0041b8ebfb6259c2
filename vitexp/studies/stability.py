"""[EC] lr/wd stability: per model, N (lr, wd) pairs drawn log-uniformly from the
model's range (default: tuned / 8 .. tuned x 4, PAPERS.md section 4), one optimizer per
study, a fixed schedule; shown as error distribution functions (EDFs) of the error and
of its gap to the model's best run, and as error vs lr and wd with pycls's bootstrap
estimate of the best value."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from vitexp import analysis, plots
from vitexp.analysis import ERR
from vitexp.config import OPTIMIZERS
from vitexp.errors import unknown
from vitexp.studies.base import RANGE_ABOVE, RANGE_BELOW, Knob, Study, int_knob, ints, lr_wd_samples
from vitexp.studies.registry import register

LRWD_COLUMNS = 4  # models per row of the lr/wd scatter figure


class Stability(Study):
    kind = "stability"
    command = "stability"
    title = "lr/wd stability (EC)"
    help = "EC paper: lr/wd stability, N log-uniform (lr, wd) samples per model for one optimizer."
    knobs = (Knob("optimizer", str, "adamw | sgd [preset, else adamw]"),
             Knob("samples", int, "(lr, wd) pairs per model [preset; paper: 64]"),
             Knob("sample_seed", int, "seed of the (lr, wd) sampler"),
             Knob("epochs", int, "epochs of every trial [preset; paper: 50]"))
    identity = ("optimizer",)
    needs = ("model", "optimizer", "lr", "wd", "last_err")
    plot_command = "plot-cdf"
    bootstrap = True
    several = "several are concatenated (e.g. an AdamW and an SGD sweep, drawn side by side)"

    def out_name(self, spec: dict) -> str:
        return f"{spec['study']['preset']}-{spec['study'].get('optimizer', 'adamw')}"

    def trials(self, spec, base, trial):
        s = spec["study"]
        opt = s.get("optimizer", "adamw")
        if opt not in OPTIMIZERS:
            raise unknown("optimizer", str(opt), OPTIMIZERS)
        return lr_wd_samples(spec, s["models"], [opt], int_knob(s, "samples", 64), int_knob(s, "sample_seed", 0, 0, 2**63 - 1),
                             ints(s.get("seeds", [0]), "seeds"), (RANGE_BELOW, RANGE_ABOVE), trial,
                             int_knob(s, "epochs", base.epochs))

    def figures(self, runs, out, n_boot=2500, seed=0):
        return plot_cdf(runs, Path(out), n_boot, seed) + plot_lrwd(runs, Path(out), n_boot, seed)

    def tables(self, runs, n_boot=2500, seed=0):
        return [("h3", "Error distribution per optimizer and model (diverged at 100%; at chance: finished within "
                       f"{analysis.CHANCE_MARGIN:g} points of the error of guessing; within 4: share of runs "
                       "less than 4 points from the model's best)"),
                ("table", analysis.edf_summary(runs).assign(within_4=lambda d: 100 * d["within_4"])
                 .rename(columns={"within_4": "within 4 (%)", "at_chance": "at chance"})),
                *_bands_table(runs, n_boot, seed)]

    def captions(self, figure: Path) -> str:
        """Said from the figure's own numbers (its CSV): which rows and panels it has."""
        table = pd.read_csv(figure.with_suffix(".csv"))
        if figure.stem == "cdf":
            opts = [analysis.OPTIMIZER_NAMES.get(o, o) for o in plots.optimizers(table)]
            rows = f"one row per optimizer ({', '.join(opts)})" if len(opts) > 1 else f"{opts[0]} runs"
            return (f"Error distribution functions, {rows}: F(e) = fraction of runs with top-1 error < e (left) "
                    f"and the same for the difference to the model's best run (right); diverged runs count at 100%"
                    + ("; bands: pointwise 95% bootstrap over runs (the best run chosen again in each draw)."
                       if "edf_lo" in table else "."))
        bands = table["element"].ne("run").any()
        return (f"{analysis.OPTIMIZER_NAMES.get(figure.stem[5:], figure.stem[5:])}: top-1 error vs lr (upper "
                f"row of each block) and wd (lower row) for {', '.join(plots.model_order(table['model']))}. "
                + ("Line: bootstrap estimate of the best value, band: its 2.5–97.5% range. " if bands else
                   f"No bootstrap band: fewer than {analysis.MIN_PER_DRAW} runs per draw. ")
                + "Red x: diverged runs.")

    def must_converge(self, runs):
        return best_runs(runs)


def _bands_table(runs: pd.DataFrame, n_boot: int, seed: int) -> list[tuple]:
    """The report's bootstrap table, or a line saying why there is none (too few runs)."""
    bands = analysis.hparam_bands(runs, n_boot=n_boot, seed=seed)
    if bands["best"].isna().all():
        return [("p", f"No bootstrap of the best lr and wd: each draw takes 25% of a model's runs and needs "
                      f"{analysis.MIN_PER_DRAW}, so a model needs {analysis.MIN_PER_DRAW * 4} runs (these have "
                      f"{int(bands['n'].max()) if len(bands) else 0} at most).")]
    return [("h3", f"Best lr and wd by bootstrap ({n_boot} draws of 25% of the runs, seed {seed}): "
                   f"median and 2.5–97.5% range (blank: fewer than {analysis.MIN_PER_DRAW} runs per draw)"),
            ("table", bands[["optimizer", "model", "param", "best", "lo", "hi", "n"]])]


def best_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """The best run of each model and optimizer, chosen by `analysis.choice_column`."""
    ok = analysis.finished(runs)
    return ok.loc[ok.groupby(["optimizer", "model"])[analysis.choice_column(ok)].idxmin()] if len(ok) else ok


def plot_cdf(runs: pd.DataFrame, out: Path, n_boot: int = 2500, seed: int = 0) -> list[Path]:
    """cdf.*: EDFs of the error and of the gap to the best run, one row per optimizer."""
    plots.require_results(runs)
    summary, table = analysis.edf_summary(runs), analysis.edf_table(runs, n_boot, seed)
    styles, labels = plots.model_styles(runs["model"]), plots.model_labels(runs)
    ok = analysis.finished(runs)
    opts = plots.optimizers(ok)
    alive = ok[~ok["diverged"]]
    best = {k: analysis.best_err(g) for k, g in ok.groupby(["optimizer", "model"])}
    gaps = alive[ERR] - [best[k] for k in zip(alive["optimizer"], alive["model"])]
    xlims = {ERR: plots.span(alive[ERR] if len(alive) else [analysis.DIVERGED_ERR]),
             "gap": (-0.5, plots.span(gaps if len(gaps) else [analysis.DIVERGED_ERR])[1])}
    with plots.style():
        fig, axes = plots.figure(len(opts), 2, width=4.4, height=3.3)
        for i, opt in enumerate(opts):
            _cdf_row(axes[i], opt, table, summary, styles, labels, xlims)
        fig.suptitle(f"Error distribution functions: {plots.setting(ok)}\n(band: 95% bootstrap over runs, "
                     f"{n_boot} draws; diverged runs count at 100% error)")
        cols = summary[["optimizer", "model", "n", "diverged", "failed"]]
        return plots.save(fig, table.merge(cols, on=["optimizer", "model"]), out, "cdf")


def _cdf_row(axes, opt, table, summary, styles, labels, xlims) -> None:
    handles, name = [], analysis.OPTIMIZER_NAMES.get(opt, opt)
    n_opt = int(summary.loc[summary["optimizer"] == opt, "n"].sum())
    for j, metric in enumerate((ERR, "gap")):
        ax = axes[j]
        for model in plots.model_order(summary.loc[summary["optimizer"] == opt, "model"]):
            steps = table[(table["optimizer"] == opt) & (table["model"] == model) & (table["metric"] == metric)]
            if steps.empty:
                continue
            x, y = steps["error"].to_numpy(), steps["edf_right"].to_numpy()
            s = summary[(summary["optimizer"] == opt) & (summary["model"] == model)].iloc[0]
            xs = np.r_[x[0], x, max(x[-1], xlims[metric][1])]
            line, = ax.step(xs, np.r_[0, y, y[-1]], where="post", color=styles[model]["color"],
                            label=_cdf_label(labels[model], s))
            if "edf_lo" in steps:
                lo, hi = steps["edf_lo"].to_numpy(), steps["edf_hi"].to_numpy()
                ax.fill_between(xs, np.r_[0, lo, lo[-1]], np.r_[0, hi, hi[-1]], step="post", lw=0, alpha=0.15,
                                color=styles[model]["color"])
            handles += [line] if metric == ERR else []
        ax.set_xlim(*xlims[metric])
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("top-1 error e (%)" if metric == ERR else "error − best run of the model, e (points)")
        ax.set_ylabel("fraction of runs with error < e" if metric == ERR else "fraction with error − best < e")
        ax.set_title(f"{name} ({n_opt} runs): " + ("top-1 error" if metric == ERR
                                                    else "difference to the best run"))
    axes[1].legend(handles=handles, loc="center left", bbox_to_anchor=(1.02, 0.5), handlelength=1.2)


def _cdf_label(label: str, s) -> str:
    """Two legend lines: model and counts; min, mean and the share within 4 points."""
    extra = [f"{s[k]} {k.replace('_', ' ')}" for k in ("diverged", "at_chance", "failed") if s[k]]
    return (f"{label}: n={s['n']}" + (f" ({', '.join(extra)})" if extra else "")
            + f"\nmin {s['min']:.1f}, mean {s['mean']:.1f}, {s['within_4']:.0%} within 4 of best")


def plot_lrwd(runs: pd.DataFrame, out: Path, n_boot: int = 2500, seed: int = 0) -> list[Path]:
    """lrwd_<optimizer>.*: error vs lr and wd per model, with the bootstrap best value and
    good range (where there are enough runs for it)."""
    plots.require_results(runs)
    bands = analysis.hparam_bands(runs, n_boot=n_boot, seed=seed)
    styles, labels = plots.model_styles(runs["model"]), plots.model_labels(runs)
    paths = []
    for opt in plots.optimizers(analysis.finished(runs)):
        paths += _save_lrwd(runs[runs["optimizer"] == opt], bands[bands["optimizer"] == opt], opt, styles, labels,
                            out)
    return paths


def _save_lrwd(runs, bands, opt, styles, labels, out) -> list[Path]:
    ok = analysis.finished(runs)
    models = plots.model_order(ok["model"])
    alive = ok.loc[~ok["diverged"], ERR]
    ylim = plots.span(alive if len(alive) else [analysis.DIVERGED_ERR])
    xr = {p: (float(ok.loc[ok[p] > 0, p].min()), float(ok[p].max())) for p in ("lr", "wd")}
    rows = []
    with plots.style():
        ncols = min(len(models), LRWD_COLUMNS)
        blocks = -(-len(models) // ncols)  # models wrap into blocks of two rows (lr, wd)
        fig, axes = plots.figure(2 * blocks, ncols, width=3.4, height=3.0, sharey=True, sharex="row")
        for ax in axes[-2:, len(models) - (blocks - 1) * ncols:].ravel():
            ax.set_visible(False)
        for k, model in enumerate(models):
            block, j = divmod(k, ncols)
            g = ok[ok["model"] == model]
            for i, param in enumerate(("lr", "wd")):
                band = bands[(bands["model"] == model) & (bands["param"] == param)]
                rows += _lrwd_panel(axes[2 * block + i][j], g, band, param, opt, model, styles[model], xr[param], ylim,
                                    _reference_batch(g) if param == "lr" else None)
                if j == 0:
                    axes[2 * block + i][j].set_ylabel("top-1 error (%)")
            n_div = int(g["diverged"].sum())
            note = f", {n_div} diverged (× at top)" if n_div else ""
            axes[2 * block][j].set_title(f"{labels[model]}\n{len(g)} runs{note}")
        drawn = bands["best"].notna().any()
        fig.suptitle(f"{analysis.OPTIMIZER_NAMES.get(opt, opt)}: error vs lr and wd, {plots.setting(ok)}\n" + (
            "(line: bootstrap best, band: 2.5–97.5%)" if drawn else
            f"(too few runs per model for a bootstrap band: it needs {analysis.MIN_PER_DRAW * 4})"))
        table = pd.DataFrame(rows, columns=["optimizer", "model", "param", "element", "value", ERR, "diverged"])
        return plots.save(fig, table, out, f"lrwd_{opt}")


def _reference_batch(runs: pd.DataFrame) -> int | None:
    """The batch size the runs' lr values are given at (they are scaled linearly to the real one)."""
    if "lr_batch_size" not in runs or runs["lr_batch_size"].isna().all():
        return None
    return int(pd.to_numeric(runs["lr_batch_size"], errors="coerce").dropna().iloc[0])


def _lrwd_panel(ax, g, band, param, opt, model, st, xr, ylim, ref_batch=None) -> list[dict]:
    """One model's error vs one hyper-parameter; returns the plotted numbers. The lr is drawn as
    the runs give it, at the reference batch REF_BATCH (the paper's convention)."""
    pts = g[np.isfinite(g[param]) & (g[param] > 0)]
    good, bad = pts[~pts["diverged"]], pts[pts["diverged"]]
    ax.scatter(good[param], good[ERR], s=18, color=st["color"], alpha=0.8, edgecolor="none", marker=st["marker"])
    if len(bad):
        ax.scatter(bad[param], np.full(len(bad), ylim[1]), marker="x", s=22, color="crimson", clip_on=False)
    name = f"{param} at batch {ref_batch}" if ref_batch else param
    rows, xlabel = [], f"{name} (log scale)"
    b = band.iloc[0] if len(band) else None
    if b is not None and np.isfinite(b["best"]):
        ax.axvspan(b["lo"], b["hi"], color="0.5", alpha=0.15, lw=0)
        ax.axvline(b["best"], color="k", lw=1.2)
        xlabel = f"{name}: best {b['best']:.2g}, good [{b['lo']:.2g}, {b['hi']:.2g}]"
        rows += [{"optimizer": opt, "model": model, "param": param, "element": e, "value": b[e],
                  ERR: np.nan, "diverged": False} for e in ("lo", "best", "hi")]
    rows += [{"optimizer": opt, "model": model, "param": param, "element": "run", "value": v, ERR: e,
              "diverged": d} for v, e, d in zip(pts[param], pts[ERR], pts["diverged"])]
    plots.log_axis(ax, *xr)
    ax.set_ylim(*ylim)
    ax.set_xlabel(xlabel)
    return rows


STUDY = register(Stability())
