"""The one style of every vitexp figure, the helpers the study kinds draw with, and the
learning curves every study has.

Every figure is written as STEM.png and STEM.pdf with the exact plotted numbers in
STEM.csv beside it (tidy: one row per plotted value), so a number in a figure can
always be looked up. Colours say the model family at a glance: ViT_P blues, ViT_C
oranges, CNNs (RegNetY, ResNet) greys, anything else greens; darker = bigger model.
Figures are made with matplotlib's object API (no pyplot), so no display or global
figure state is involved. Each study kind's own figures live in its module
(vitexp/studies/).
"""

from __future__ import annotations

import contextlib
import contextvars
import re
from pathlib import Path

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, LogLocator, NullFormatter, NullLocator

from vitexp import analysis
from vitexp import models as vmodels
from vitexp.errors import UserError
from vitexp.fileio import atomic_write, atomic_write_csv

RC = {
    "font.size": 10, "axes.titlesize": 10, "axes.labelsize": 10, "legend.fontsize": 8,
    "xtick.labelsize": 9, "ytick.labelsize": 9, "figure.titlesize": 11,
    "axes.grid": True, "axes.grid.which": "major", "grid.alpha": 0.35, "grid.linewidth": 0.6,
    "axes.spines.top": False, "axes.spines.right": False,
    "lines.linewidth": 1.6, "lines.markersize": 5, "legend.frameon": False,
    "savefig.dpi": 150, "savefig.bbox": "tight", "pdf.fonttype": 42,
}
# colour group -> (colour map, marker); the registry's CNN families share one group
COLOURS = {"vit_p": ("Blues", "o"), "vit_c": ("Oranges", "s"), "hybrid": ("Purples", "v"), "cnn": ("Greys", "^"),
           "other": ("Greens", "D")}
OPT_LINES = {"adamw": "-", "sgd": "--"}
CSV_DIGITS = 12  # significant digits of a figure table's floats: past them, float noise (11.700000000000001)
CURVE_LINES = ["-", "--", ":", "-."]  # one per value of the field that tells a model's curves apart


@contextlib.contextmanager
def style():
    """The one style of every vitexp figure."""
    with mpl.rc_context(RC):
        yield


# the [models.NAME] tables of the runs being drawn (`drawing`): a preset's own model is
# coloured and ordered by its family; outside a drawing, only built-in models are known
_MODELS: contextvars.ContextVar[dict] = contextvars.ContextVar("models", default={})


@contextlib.contextmanager
def drawing(runs: pd.DataFrame):
    """The figures and tables drawn inside know the models RUNS' rows defined (`model_def`)."""
    token = _MODELS.set(analysis.definitions(runs))
    try:
        yield
    finally:
        _MODELS.reset(token)


def family(model: str) -> str:
    """The colour group of a model (or of a distilled arm's student): vit_p | vit_c | hybrid | cnn
    (RegNetY, ResNet), from its spec; other for a model vitexp does not know (or cannot build
    here: a timm model without timm)."""
    try:
        fam = vmodels.get_spec(model.split(analysis.TAUGHT)[0], _MODELS.get()).family
    except UserError:
        return "other"
    return fam if fam in COLOURS else "cnn"


def _size(model: str) -> float:
    """Sort key for the size within a family: the MF/GF in the name, else its last number."""
    m = re.search(r"(\d+(?:\.\d+)?)(mf|gf)", model.lower())
    if m:
        return float(m[1]) * (1000 if m[2] == "gf" else 1)
    digits = re.findall(r"\d+", model)
    return float(digits[-1]) if digits else 0.0


def model_order(models) -> list[str]:
    """Models by family (ViT_P, ViT_C, CNN, other), then size."""
    fams = list(COLOURS)
    return sorted(set(models), key=lambda m: (fams.index(family(m)), _size(m), m))


def model_styles(models) -> dict[str, dict]:
    """model -> {color, marker}: the family's hue, darker for bigger models."""
    out = {}
    for fam, (cmap_name, marker) in COLOURS.items():
        members = [m for m in model_order(models) if family(m) == fam]
        lo = 0.5 if fam == "cnn" else 0.45
        shades = np.linspace(lo, 0.95, len(members)) if len(members) > 1 else [0.8]
        cmap = mpl.colormaps[cmap_name]
        out.update({m: {"color": cmap(s), "marker": marker} for m, s in zip(members, shades)})
    return out


FAMILY_NAMES = {"vit_p": "ViT_P", "vit_c": "ViT_C", "hybrid": "hybrid", "resnet": "ResNet", "regnety": "RegNetY"}
# a built-in model's name suffix -> what it says in words
SUFFIX_NAMES = {"h": "{} heads", "p": "patch {}"}
EXACT_NAMES = {"hybrid_r50_vit_b16": "R50+ViT-B/16"}  # the ViT paper's name
_NAMED = re.compile(r"(vit_p|vit_c|hybrid|resnet|regnety)_(\d+(?:\.\d+)?)(mf|gf)((?:_[a-z]\d+)*)")


def display_name(model: str) -> str:
    """A model's name as the papers write it, for legends and titles (the tables keep the code
    name): vit_p_7mf_h4 -> 'ViT_P-7MF, 4 heads', resnet50 -> 'ResNet-50', a distilled arm
    'ViT_P-7MF taught by ResNet-7MF'; a name vitexp cannot read stays as it is."""
    if analysis.TAUGHT in model:
        return analysis.TAUGHT.join(display_name(part) for part in model.split(analysis.TAUGHT, 1))
    if model.startswith("timm:"):
        return f"{model[5:]} (timm)"
    if model in EXACT_NAMES:
        return EXACT_NAMES[model]
    if m := re.fullmatch(r"resnet(\d+)", model):
        return f"ResNet-{m[1]}"
    m = _NAMED.fullmatch(model)
    if m is None:
        return model
    words = [SUFFIX_NAMES[s[0]].format(s[1:]) for s in m[4].split("_")[1:]]
    return ", ".join([f"{FAMILY_NAMES[m[1]]}-{m[2]}{m[3].upper()}"] + words)


def model_labels(runs: pd.DataFrame) -> dict[str, str]:
    """model -> legend label: its display name, with the parameter count (of the trained
    model, its head sized for the data set's classes) when runs.csv has one."""
    labels = {m: display_name(m) for m in runs["model"].unique()}
    if "params_m" in runs:
        for m, p in runs.dropna(subset=["params_m"]).groupby("model")["params_m"].first().items():
            labels[m] = f"{labels[m]} ({p:.2g}M params)"
    return labels


def span_text(values, fmt: str = "{:,}") -> str:
    """'5,000' when every value is the same, else '500–60,000'."""
    lo, hi = min(values), max(values)
    return fmt.format(lo) if lo == hi else f"{fmt.format(lo)}–{fmt.format(hi)}"


def setting(runs: pd.DataFrame) -> str:
    """What a figure's title must say of the runs it draws: the data set, the training images
    and the budget (epochs, batch size), each a range where the runs differ:
    'fashion-mnist, 5,000 training images, 10 epochs at batch 128'."""
    ok = analysis.finished(runs)
    parts = [", ".join(sorted(set(ok["dataset"].astype(str))))] if "dataset" in ok else []
    if "n_train" in ok:
        n = ok["n_train"]
        known = [int(v) for v in n.dropna()]
        parts.append((span_text(known) if known else "all") + " training images"
                     + (" (some runs: all)" if known and n.isna().any() else ""))
    budget = []
    if "epochs" in ok and ok["epochs"].notna().any():
        budget.append(span_text([int(v) for v in ok["epochs"].dropna()], "{:g}") + " epochs")
    if "batch_size" in ok and ok["batch_size"].notna().any():
        budget.append("batch " + span_text([int(v) for v in ok["batch_size"].dropna()], "{:g}"))
    return ", ".join(parts + ([" at ".join(budget)] if budget else []))


def optimizers(runs: pd.DataFrame) -> list[str]:
    known = [o for o in analysis.OPTIMIZER_NAMES if o in set(runs["optimizer"])]
    return known + sorted(set(runs["optimizer"]) - set(known))


def figure(nrows: int, ncols: int, width: float = 4.2, height: float = 3.2, **kw):
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    return fig, fig.subplots(nrows, ncols, squeeze=False, **kw)


def save(fig: Figure, table: pd.DataFrame, out: Path, stem: str) -> list[Path]:
    """STEM.png, STEM.pdf and STEM.csv in OUT, each written whole or not at all."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write figures to {out} ({e.strerror}); pick a writable --out") from None
    paths = [out / f"{stem}.{ext}" for ext in ("png", "pdf")]
    for path in paths:  # no creation date in the PDF: the same runs give the same bytes
        meta = {"CreationDate": None} if path.suffix == ".pdf" else None
        atomic_write(path, lambda f, ext=path.suffix[1:], meta=meta: fig.savefig(f, format=ext, metadata=meta))
    atomic_write_csv(out / f"{stem}.csv", rounded(table))
    return paths + [out / f"{stem}.csv"]


def rounded(table: pd.DataFrame) -> pd.DataFrame:
    """TABLE with its floats cut to CSV_DIGITS significant digits (what a CSV reader sees)."""
    out = table.copy()
    for c in out.columns[[pd.api.types.is_float_dtype(t) for t in out.dtypes]]:
        out[c] = [float(f"{v:.{CSV_DIGITS}g}") for v in out[c]]
    return out


def require_results(runs: pd.DataFrame) -> None:
    if analysis.finished(runs).empty:
        where = ", ".join(sorted(set(runs["source"])))
        raise UserError(f"none of the {len(runs)} runs in {where} has a result (all failed); nothing to plot")


def span(values, pad_frac: float = 0.06, min_pad: float = 0.5) -> tuple[float, float]:
    lo, hi = float(np.min(values)), float(np.max(values))
    pad = max((hi - lo) * pad_frac, min_pad)
    return lo - pad, hi + pad


def log_axis(ax, lo: float, hi: float) -> None:
    """Log x axis over [lo, hi]: labelled at 1, 2, 5 x 10^k where the range spans under two
    decades, else at powers of ten only, in the shortest form (1e-05, 0.001, 2.5), so
    labels never run into each other."""
    ax.set_xscale("log")
    subs = (1.0, 2.0, 5.0) if hi / lo < 100 else (1.0,)
    ax.xaxis.set_major_locator(LogLocator(subs=subs, numticks=12))
    ax.xaxis.set_major_formatter(mpl.ticker.FuncFormatter(lambda v, _: f"{v:.0e}" if v < 1e-3 else f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlim(lo / 1.25, hi * 1.25)


def epoch_axis(ax, epochs) -> None:
    """Log-2 epochs axis labelled at the schedules that were run."""
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(sorted(set(epochs))))
    ax.xaxis.set_major_formatter(mpl.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_locator(NullLocator())


def count_label(v: float) -> str:
    if v >= 1e6:
        return f"{v / 1e6:g}M"
    return f"{v / 1e3:g}k" if v >= 1e3 else f"{v:g}"




# -- learning curves -------------------------------------------------------------------------

_CURVE_TAGS = {"n_train": "n={:,.0f}", "epochs": "{:.0f}ep", "lr": "lr={:.2g}", "wd": "wd={:.2g}", "seed": "s{:.0f}"}


def _varying(chosen: pd.DataFrame, trial: pd.Series) -> list[str]:
    """What tells this trial's curve from the others': the columns that differ among them, and
    always its training images (the best trial of a scale study is one size of several)."""
    return [tag.format(trial[c]) for c, tag in _CURVE_TAGS.items()
            if c in chosen and (chosen[c].nunique() > 1 or c == "n_train") and pd.notna(trial[c])]


def _dashes(chosen: pd.DataFrame):
    """trial -> its line style: by the first field besides the model that tells curves apart
    (a size, a length, an lr...), so one model's curves never look alike; else by optimizer."""
    field = next((c for c in _CURVE_TAGS if c in chosen and chosen[c].nunique() > 1), None)
    if field is None:
        return lambda trial: OPT_LINES.get(str(trial.get("optimizer")), "-")
    rank = {v: i for i, v in enumerate(sorted(chosen[field].dropna().unique()))}
    return lambda trial: CURVE_LINES[rank.get(trial[field], 0) % len(CURVE_LINES)]


def plot_curves(runs: pd.DataFrame, history: pd.DataFrame, out: Path, best_only: bool = True) -> list[Path]:
    """curves.*: training loss (left) and evaluated test error (right) per epoch; with
    BEST_ONLY the lowest-error trial of each model (and optimizer), else every trial.
    Evaluated epochs are marked; the error is the evaluated model's (the EMA when used)."""
    require_results(runs)
    ok = analysis.finished(runs)
    group = [c for c in ("model", "optimizer") if c in ok]
    chosen = ok.loc[ok.groupby(group)[analysis.choice_column(ok)].idxmin()] if best_only else ok
    hist = history[history["key"].astype(str).isin(set(chosen["key"].astype(str)))].copy()
    if hist.empty:
        raise UserError("history.csv holds no epochs of these runs; rerun the study to rebuild it")
    missing = [c for c in ("epoch", "train_loss") if c not in hist] + (
        [] if {"ema_err", "test_err"} & set(hist.columns) else ["test_err or ema_err"])
    if missing:
        raise UserError(f"history.csv lacks column(s) {', '.join(missing)}; rerun the study to rebuild it")
    ema = hist["ema_err"] if "ema_err" in hist else pd.Series(np.nan, index=hist.index)
    test = hist["test_err"] if "test_err" in hist else pd.Series(np.nan, index=hist.index)
    hist["error"] = np.where(ema.notna(), ema, test)
    hist["evaluated"] = np.where(ema.notna(), "ema", np.where(test.notna(), "model", ""))
    styles, dashes = model_styles(chosen["model"]), _dashes(chosen)
    with style():
        fig, axes = figure(1, 2, width=4.6, height=3.4)
        for _, trial in chosen.sort_values(group + [analysis.ERR]).iterrows():
            h = hist[hist["key"].astype(str) == str(trial["key"])].sort_values("epoch")
            st, ls = styles[trial["model"]], dashes(trial)
            label = " ".join([display_name(trial["model"]),
                              analysis.OPTIMIZER_NAMES.get(trial.get("optimizer"), str(trial.get("optimizer", "")))]
                             + _varying(chosen, trial)
                             + [f"({trial[analysis.ERR]:.1f}%)"])
            axes[0][0].plot(h["epoch"], h["train_loss"], color=st["color"], ls=ls, label=label)
            ev = h[h["error"].notna()]
            axes[0][1].plot(ev["epoch"], ev["error"], color=st["color"], ls=ls, marker=st["marker"], ms=3.5)
        axes[0][0].set_title("training loss")
        which = set(hist.loc[hist["evaluated"] != "", "evaluated"])
        of = {"ema": "the EMA's", "model": "the raw weights' (no EMA recorded)"}
        axes[0][1].set_title("test error at evaluated epochs (markers):\n" + " / ".join(of[w] for w in sorted(which)),
                             fontsize="medium")
        axes[0][1].set_ylabel("top-1 error (%)")
        for ax in axes[0]:
            ax.set_xlabel("epoch")
        fig.legend(loc="outside right center")
        fig.suptitle("Learning curves" + (": the best trial per model" + (" and optimizer" if "optimizer" in group
                                                                            else "") if best_only else "")
                     + f"\n{setting(chosen)}")
        table = hist.merge(chosen[["key"] + group].astype({"key": str}), on="key", suffixes=("_h", ""))
        return save(fig, table[["key"] + group + ["epoch", "train_loss", "error", "evaluated"]], Path(out), "curves")
