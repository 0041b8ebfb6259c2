"""The figures of the three studies, in one style, from the frames of vitexp.analysis.

Every figure is written as STEM.png and STEM.pdf with the exact plotted numbers in
STEM.csv beside it (tidy: one row per plotted value), so a number in a figure can
always be looked up. Colours say the model family at a glance: ViT_P blues, ViT_C
oranges, CNNs (RegNetY, ResNet) greys, anything else greens; darker = bigger model.
Figures are made with matplotlib's object API (no pyplot), so no display or global
figure state is involved.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FixedLocator, LogLocator, NullFormatter, NullLocator

from vitexp import analysis
from vitexp.errors import UserError
from vitexp.store import atomic_write_csv

RC = {
    "font.size": 10, "axes.titlesize": 10, "axes.labelsize": 10, "legend.fontsize": 8,
    "xtick.labelsize": 9, "ytick.labelsize": 9, "figure.titlesize": 11,
    "axes.grid": True, "axes.grid.which": "major", "grid.alpha": 0.35, "grid.linewidth": 0.6,
    "axes.spines.top": False, "axes.spines.right": False,
    "lines.linewidth": 1.6, "lines.markersize": 5, "legend.frameon": False,
    "savefig.dpi": 150, "savefig.bbox": "tight", "pdf.fonttype": 42,
}
# family -> (colour map, marker)
FAMILIES = {"vit_p": ("Blues", "o"), "vit_c": ("Oranges", "s"), "cnn": ("Greys", "^"), "other": ("Greens", "D")}
OPT_LINES = {"adamw": "-", "sgd": "--"}
LRWD_COLUMNS = 4  # models per row of the lr/wd scatter figure


@contextlib.contextmanager
def style():
    """The one style of every vitexp figure."""
    with mpl.rc_context(RC):
        yield


def family(model: str) -> str:
    """vit_p | vit_c | cnn | other, from the registry's name prefixes (a plain ViT
    has the patchify stem, so it reads as ViT_P)."""
    m = model.lower().replace("-", "_")
    if m.startswith(("vit_c", "vitc")):
        return "vit_c"
    if m.startswith("vit"):
        return "vit_p"
    if m.startswith(("regnet", "resnet")):
        return "cnn"
    return "other"


def _size(model: str) -> float:
    """Sort key for the size within a family: the MF/GF in the name, else its last number."""
    m = re.search(r"(\d+(?:\.\d+)?)(mf|gf)", model.lower())
    if m:
        return float(m[1]) * (1000 if m[2] == "gf" else 1)
    digits = re.findall(r"\d+", model)
    return float(digits[-1]) if digits else 0.0


def model_order(models) -> list[str]:
    """Models by family (ViT_P, ViT_C, CNN, other), then size."""
    fams = list(FAMILIES)
    return sorted(set(models), key=lambda m: (fams.index(family(m)), _size(m), m))


def model_styles(models) -> dict[str, dict]:
    """model -> {color, marker}: the family's hue, darker for bigger models."""
    out = {}
    for fam, (cmap_name, marker) in FAMILIES.items():
        members = [m for m in model_order(models) if family(m) == fam]
        lo = 0.5 if fam == "cnn" else 0.45
        shades = np.linspace(lo, 0.95, len(members)) if len(members) > 1 else [0.8]
        cmap = mpl.colormaps[cmap_name]
        out.update({m: {"color": cmap(s), "marker": marker} for m, s in zip(members, shades)})
    return out


def model_labels(runs: pd.DataFrame) -> dict[str, str]:
    """model -> legend label, with the parameter count when runs.csv has one."""
    labels = {m: m for m in runs["model"].unique()}
    if "params_m" in runs:
        for m, p in runs.dropna(subset=["params_m"]).groupby("model")["params_m"].first().items():
            labels[m] = f"{m} ({p:.3g}M)"
    return labels


def _optimizers(runs: pd.DataFrame) -> list[str]:
    known = [o for o in analysis.OPTIMIZER_NAMES if o in set(runs["optimizer"])]
    return known + sorted(set(runs["optimizer"]) - set(known))


def _figure(nrows: int, ncols: int, width: float = 4.2, height: float = 3.2, **kw):
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    return fig, fig.subplots(nrows, ncols, squeeze=False, **kw)


def _save(fig: Figure, table: pd.DataFrame, out: Path, stem: str) -> list[Path]:
    """STEM.png, STEM.pdf and STEM.csv in OUT, each written whole or not at all."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write figures to {out} ({e.strerror}); pick a writable --out") from None
    paths = []
    for ext in ("png", "pdf"):
        path = out / f"{stem}.{ext}"
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fig.savefig(tmp, format=ext)
        os.replace(tmp, path)
        paths.append(path)
    atomic_write_csv(out / f"{stem}.csv", table)
    return paths + [out / f"{stem}.csv"]


def _require_results(runs: pd.DataFrame) -> None:
    if analysis.finished(runs).empty:
        where = ", ".join(sorted(set(runs["source"])))
        raise UserError(f"none of the {len(runs)} runs in {where} has a result (all failed); nothing to plot")


def _span(values, pad_frac: float = 0.06, min_pad: float = 0.5) -> tuple[float, float]:
    lo, hi = float(np.min(values)), float(np.max(values))
    pad = max((hi - lo) * pad_frac, min_pad)
    return lo - pad, hi + pad


def _log_axis(ax) -> None:
    """Log x axis labelled at 1, 2, 5 x 10^k in plain numbers (a sweep spans ~1.5 decades)."""
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(mpl.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _epoch_axis(ax, epochs) -> None:
    """Log-2 epochs axis labelled at the schedules that were run."""
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(sorted(set(epochs))))
    ax.xaxis.set_major_formatter(mpl.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_locator(NullLocator())


# -- lr/wd stability: EDFs and scatter plots -----------------------------------------------

def plot_cdf(runs: pd.DataFrame, out: Path, n_boot: int = 2500, seed: int = 0) -> list[Path]:
    """cdf.*: EDFs of the error and of the gap to the best run, one column per
    optimizer; lrwd_<optimizer>.*: error vs lr and wd per model, with the bootstrap
    best value and good range."""
    _require_results(runs)
    out = Path(out)
    summary = analysis.edf_summary(runs)
    table = analysis.edf_table(runs)
    bands = analysis.hparam_bands(runs, n_boot=n_boot, seed=seed)
    styles, labels = model_styles(runs["model"]), model_labels(runs)
    paths = _save_cdf(runs, table, summary, styles, labels, out)
    for opt in _optimizers(analysis.finished(runs)):
        paths += _save_lrwd(runs[runs["optimizer"] == opt], bands[bands["optimizer"] == opt], opt,
                            styles, labels, out)
    return paths


def _save_cdf(runs, table, summary, styles, labels, out) -> list[Path]:
    ok = analysis.finished(runs)
    opts = _optimizers(ok)
    alive = ok[~ok["diverged"]]
    gaps = alive["top1_err"] - alive.groupby(["optimizer", "model"])["top1_err"].transform("min")
    xlims = {"top1_err": _span(alive["top1_err"] if len(alive) else [analysis.DIVERGED_ERR]),
             "gap": (-0.5, _span(gaps if len(gaps) else [analysis.DIVERGED_ERR])[1])}
    with style():
        fig, axes = _figure(len(opts), 2, width=4.4, height=3.3)
        for i, opt in enumerate(opts):
            handles, name = [], analysis.OPTIMIZER_NAMES.get(opt, opt)
            n_opt = int(summary.loc[summary["optimizer"] == opt, "n"].sum())
            for j, metric in enumerate(("top1_err", "gap")):
                ax = axes[i][j]
                for model in model_order(summary.loc[summary["optimizer"] == opt, "model"]):
                    steps = table[(table["optimizer"] == opt) & (table["model"] == model) & (table["metric"] == metric)]
                    if steps.empty:
                        continue
                    x, y = steps["error"].to_numpy(), steps["edf_right"].to_numpy()
                    s = summary[(summary["optimizer"] == opt) & (summary["model"] == model)].iloc[0]
                    line, = ax.step(np.r_[x[0], x, max(x[-1], xlims[metric][1])], np.r_[0, y, y[-1]], where="post",
                                    color=styles[model]["color"], label=_cdf_label(labels[model], s))
                    if metric == "top1_err":
                        handles.append(line)
                ax.set_xlim(*xlims[metric])
                ax.set_ylim(0, 1.02)
                ax.set_xlabel("top-1 error e (%)" if metric == "top1_err"
                              else "error − best run of the model, e (points)")
                ax.set_ylabel("fraction of runs with error < e" if metric == "top1_err"
                              else "fraction with error − best < e")
                ax.set_title(f"{name} ({n_opt} runs): " + ("top-1 error" if metric == "top1_err"
                                                            else "difference to the best run"))
            axes[i][1].legend(handles=handles, loc="center left", bbox_to_anchor=(1.02, 0.5), handlelength=1.2)
        fig.suptitle("Error distribution functions (diverged runs count at 100% error)")
        cols = summary[["optimizer", "model", "n", "diverged", "failed"]]
        return _save(fig, table.merge(cols, on=["optimizer", "model"]), out, "cdf")


def _cdf_label(label: str, s) -> str:
    """Two legend lines: model and counts; min, mean and the share within 4 points."""
    extra = [f"{s[k]} {k}" for k in ("diverged", "failed") if s[k]]
    return (f"{label}: n={s['n']}" + (f" ({', '.join(extra)})" if extra else "")
            + f"\nmin {s['min']:.1f}, mean {s['mean']:.1f}, {s['within_4']:.0%} within 4 of best")


def _save_lrwd(runs, bands, opt, styles, labels, out) -> list[Path]:
    ok = analysis.finished(runs)
    models = model_order(ok["model"])
    alive = ok.loc[~ok["diverged"], "top1_err"]
    ylo, yhi = _span(alive if len(alive) else [analysis.DIVERGED_ERR])
    rows = []
    with style():
        ncols = min(len(models), LRWD_COLUMNS)
        blocks = -(-len(models) // ncols)  # models wrap into blocks of two rows (lr, wd)
        fig, axes = _figure(2 * blocks, ncols, width=3.4, height=3.0, sharey=True, sharex="row")
        for ax in axes[-2:, len(models) - (blocks - 1) * ncols:].ravel():
            ax.set_visible(False)
        for k, model in enumerate(models):
            block, j = divmod(k, ncols)
            g = ok[ok["model"] == model]
            for i, param in enumerate(("lr", "wd")):
                ax = axes[2 * block + i][j]
                pts = g[np.isfinite(g[param]) & (g[param] > 0)]
                good, bad = pts[~pts["diverged"]], pts[pts["diverged"]]
                color = styles[model]["color"]
                ax.scatter(good[param], good["top1_err"], s=18, color=color, alpha=0.8, edgecolor="none",
                           marker=styles[model]["marker"])
                if len(bad):
                    ax.scatter(bad[param], np.full(len(bad), yhi), marker="x", s=22, color="crimson", clip_on=False)
                band = bands[(bands["model"] == model) & (bands["param"] == param)]
                xlabel = f"{param} (log scale)"
                if len(band):
                    b = band.iloc[0]
                    ax.axvspan(b["lo"], b["hi"], color="0.5", alpha=0.15, lw=0)
                    ax.axvline(b["best"], color="k", lw=1.2)
                    xlabel = f"{param}: best {b['best']:.2g}, good [{b['lo']:.2g}, {b['hi']:.2g}]"
                    rows += [{"optimizer": opt, "model": model, "param": param, "element": e,
                              "value": b[e], "top1_err": np.nan, "diverged": False} for e in ("lo", "best", "hi")]
                rows += [{"optimizer": opt, "model": model, "param": param, "element": "run", "value": v,
                          "top1_err": e, "diverged": d}
                         for v, e, d in zip(pts[param], pts["top1_err"], pts["diverged"])]
                _log_axis(ax)
                ax.set_ylim(ylo, yhi)
                ax.set_xlabel(xlabel)
                if j == 0:
                    ax.set_ylabel("top-1 error (%)")
            n_div = int(g["diverged"].sum())
            note = f", {n_div} diverged (× at top)" if n_div else ""
            axes[2 * block][j].set_title(f"{labels[model]}\n{len(g)} runs{note}")
        fig.suptitle(f"{analysis.OPTIMIZER_NAMES.get(opt, opt)}: error vs lr and wd "
                     f"(line: bootstrap best, band: 2.5–97.5%)")
        table = pd.DataFrame(rows, columns=["optimizer", "model", "param", "element", "value", "top1_err", "diverged"])
        return _save(fig, table, out, f"lrwd_{opt}")


# -- data-size scaling ---------------------------------------------------------------------

def plot_scale(runs: pd.DataFrame, out: Path) -> list[Path]:
    """scale.*: error vs training-set size (log x), one line per model: mean over
    seeds, band min-max; one more panel per few-shot k when runs.csv has them."""
    _require_results(runs)
    summary = analysis.scale_summary(runs)
    metrics = list(dict.fromkeys(summary["metric"]))
    styles, labels = model_styles(runs["model"]), model_labels(runs)
    sizes = sorted(set(summary["n_train"]))
    with style():
        ncols = min(2, len(metrics))
        fig, axes = _figure(-(-len(metrics) // ncols), ncols, width=4.6, height=3.4)
        axes = axes.ravel()
        for ax in axes[len(metrics):]:
            ax.set_visible(False)
        for ax, metric in zip(axes, metrics):
            part = summary[summary["metric"] == metric]
            for model in model_order(part["model"]):
                g = part[part["model"] == model].sort_values("n_train")
                st = styles[model]
                ax.plot(g["n_train"], g["mean"], color=st["color"], marker=st["marker"], label=labels[model])
                ax.fill_between(g["n_train"], g["min"], g["max"], color=st["color"], alpha=0.15, lw=0)
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(FixedLocator(sizes))
            ax.xaxis.set_major_formatter(mpl.ticker.FuncFormatter(lambda v, _: _count(v)))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xlabel("training images")
            k = analysis.FEWSHOT.match(metric)
            ax.set_title(f"{k[1]}-shot linear probe (frozen features)" if k else "test error")
            ax.set_ylabel("top-1 error (%)")
        fig.legend(handles=axes[0].get_legend_handles_labels()[0], loc="outside right center")
        n = summary.loc[summary["metric"] == "top1_err", "n"]
        seeds = "one run per point" if n.max() == 1 else (
            f"mean over {n.min()}{'' if n.min() == n.max() else f'–{n.max()}'} seeds, band: min–max")
        fig.suptitle(f"Error vs training-set size ({seeds})")
        return _save(fig, summary, Path(out), "scale")


def _count(v: float) -> str:
    if v >= 1e6:
        return f"{v / 1e6:g}M"
    return f"{v / 1e3:g}k" if v >= 1e3 else f"{v:g}"


# -- optimizer and training length -----------------------------------------------------------

def plot_optimizer(runs: pd.DataFrame, out: Path) -> list[Path]:
    """optimizer.*: (a) SGD minus AdamW mean error per model and schedule; (b) the
    mean errors vs epochs (AdamW solid, SGD dashed); (c) error minus the longest
    schedule's error vs epochs, each model with its best optimizer (the paper's
    view). A red x marks a mean that includes diverged runs (at 100%)."""
    _require_results(runs)
    summary = analysis.optimizer_summary(runs)
    gaps = analysis.optimizer_gaps(summary)
    curves = analysis.length_curves(summary)
    best = analysis.best_optimizer(summary)
    models = model_order(summary["model"])
    styles, labels = model_styles(models), model_labels(runs)
    epochs = sorted(set(summary["epochs"]))
    diverged = summary.groupby(["model", "epochs"])["diverged"].sum()
    mark = dict(marker="x", color="crimson", s=30, zorder=5, clip_on=False)
    with style():
        fig, axes = _figure(1, 3, width=4.4, height=3.5)
        ax = axes[0][0]
        width = 0.8 / len(models)
        for i, model in enumerate(models):
            g = gaps[gaps["model"] == model]
            pos = np.array([epochs.index(e) - 0.4 + width * (i + 0.5) for e in g["epochs"]])
            ax.bar(pos, g["gap"], width=width, color=styles[model]["color"])
            hit = np.array([diverged[(model, e)] > 0 for e in g["epochs"]], dtype=bool)
            ax.scatter(pos[hit], np.maximum(g["gap"].to_numpy()[hit], 0), **mark)
        if gaps.empty:
            ax.text(0.5, 0.7, "needs AdamW and SGD runs\nof the same model", ha="center", va="center",
                    transform=ax.transAxes)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(range(len(epochs)), [str(e) for e in epochs])
        ax.grid(axis="x", visible=False)
        ax.set_ylabel("SGD − AdamW top-1 error (points)")
        ax.set_title("(a) optimizer gap")
        for ax, col in ((axes[0][1], "mean"), (axes[0][2], "delta")):
            for model in models:
                for opt in _optimizers(summary):
                    g = curves[(curves["model"] == model) & (curves["optimizer"] == opt)].sort_values("epochs")
                    if g.empty or (col == "delta" and opt != best[model]):
                        continue
                    ax.plot(g["epochs"], g[col], ls=OPT_LINES.get(opt, ":"), color=styles[model]["color"],
                            marker=styles[model]["marker"])
                    if col == "mean":
                        d = summary[(summary["model"] == model) & (summary["optimizer"] == opt)].sort_values("epochs")
                        ax.scatter(d.loc[d["diverged"] > 0, "epochs"], d.loc[d["diverged"] > 0, "mean"], **mark)
            _epoch_axis(ax, epochs)
        axes[0][1].set_ylabel("top-1 error (%)")
        axes[0][1].set_title("(b) error, mean over seeds")
        axes[0][2].axhline(0, color="k", lw=0.8)
        axes[0][2].set_ylabel("Δ top-1 error (points)")
        axes[0][2].set_title("(c) error − error at the longest schedule\n(each model with its best optimizer)")
        for ax in axes[0]:
            ax.set_xlabel("epochs")
        keys = [Line2D([], [], color=styles[m]["color"], marker=styles[m]["marker"],
                       label=f"{labels[m]}, best: {analysis.OPTIMIZER_NAMES.get(best[m], best[m])}")
                for m in models]
        marks = [Line2D([], [], color="0.3", ls=OPT_LINES.get(o, ":"), label=analysis.OPTIMIZER_NAMES.get(o, o))
                 for o in _optimizers(summary)]
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
        return _save(fig, table, Path(out), "optimizer")


# -- dispatch -------------------------------------------------------------------------------------

def figure_dir(folders, out: str | Path | None) -> Path:
    """--out, else DIR/figures of the one folder (several need an explicit --out)."""
    if out is not None:
        return Path(out)
    if len(folders) > 1:
        raise UserError("several folders combine into one figure set: pass --out FOLDER for it")
    return Path(folders[0]) / "figures"


def plot_runs(kind: str, runs: pd.DataFrame, out: Path, n_boot: int = 2500, seed: int = 0) -> list[Path]:
    """The figures of a study KIND from its (loaded, selected) runs; none for single runs."""
    if kind not in analysis.PLOT_COMMAND:
        return []
    analysis.check_columns(runs, kind)
    if kind in ("stability", "tune"):
        return plot_cdf(runs, out, n_boot=n_boot, seed=seed)
    if kind == "scale":
        return plot_scale(runs, out)
    return plot_optimizer(runs, out)


def plot_folders(kind: str, folders, out=None, n_boot: int = 2500, seed: int = 0) -> list[Path]:
    """Load FOLDERS, check they hold a KIND study, write its figures (the CLI's plot-*)."""
    folders = [Path(f) for f in folders]
    runs = analysis.load_runs(folders, analysis.NEEDS[kind])
    runs = analysis.select_study(runs, kind, analysis.PLOT_COMMAND[kind])
    return plot_runs(kind, runs, figure_dir(folders, out), n_boot=n_boot, seed=seed)


def plot_study(folder: str | Path, out: str | Path | None = None) -> list[Path]:
    """The figures of the study in FOLDER, by its kind (study.toml, else the
    `study` column); the study runner calls this when a study finishes."""
    kind = analysis.study_kind(folder)
    if kind is None:
        studies = analysis.load_runs([folder])["study"]
        kind = studies.mode().iloc[0]
    if kind not in analysis.PLOT_COMMAND:
        return []
    return plot_folders(kind, [folder], out)
