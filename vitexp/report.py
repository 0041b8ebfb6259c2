"""One page per set of study folders: report.md (figures linked) and report.html
(figures embedded as base64, so the file stands alone and can be mailed or
archived). Both are rendered from one list of blocks, so they never disagree.

The page: an overview (runs, failed, diverged, wall time per folder), a section
per study kind with its figures (regenerated from runs.csv every time, so never
stale) and tables, the failed runs, and the provenance of every run (commits,
torch versions, devices, hosts, study.toml).
"""

from __future__ import annotations

import base64
import html
import math
import os
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from vitexp import analysis, plots
from vitexp.errors import UserError
from vitexp.store import atomic_write_text

TITLES = {"scale": "Data-size scaling (ViT)", "stability": "lr/wd stability (EC)",
          "optimizer": "Optimizer and training length (EC)",
          "tune": "lr/wd search (tuned values)", "train": "Single runs"}
CAPTIONS = {
    "cdf": "Error distribution functions: F(e) = fraction of runs with top-1 error < e, per optimizer and "
           "model (top); the same for the difference to the model's best run (bottom). Diverged runs count at 100%.",
    "lrwd": "Error vs lr and wd per model; line: bootstrap estimate of the best value, band: its 2.5–97.5% range "
            "(2500 draws of 25% of the runs). Red x: diverged runs.",
    "scale": "Top-1 error vs training-set size, mean over seeds with the min–max band; few-shot linear-probe "
             "errors of the frozen features in the further panels.",
    "optimizer": "(a) SGD minus AdamW error; (b) mean errors vs epochs; (c) error minus that of the longest "
                 "schedule, each model with its best optimizer.",
}
PROVENANCE = ("commit", "vitexp", "torch", "device", "host")
MAX_FAILED = 20


def write_report(folders, out=None, n_boot: int = 2500, seed: int = 0) -> list[Path]:
    """Write OUT/report.md, OUT/report.html and the figures in OUT/figures; OUT
    defaults to the one folder (several need an explicit OUT)."""
    folders = [Path(f) for f in folders]
    if out is None and len(folders) > 1:
        raise UserError("a report over several folders needs --out FOLDER")
    out = Path(out) if out is not None else folders[0]
    runs = analysis.load_runs(folders)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write the report to {out} ({e.strerror}); pick a writable --out") from None
    blocks = [("h1", "vitexp report"),
              ("p", f"Made {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC from {', '.join(map(str, folders))}."),
              ("h2", "Overview"), ("table", _overview(runs))]
    figures = []
    kinds = [k for k in analysis.KINDS if k in set(runs["study"])]
    for kind in kinds + sorted(set(runs["study"]) - set(kinds)):
        sub = runs[runs["study"] == kind]
        blocks.append(("h2", TITLES.get(kind, f"{kind} study")))
        try:
            paths = plots.plot_runs(kind, sub, out / "figures", n_boot=n_boot, seed=seed)
        except UserError as e:
            paths = []
            blocks.append(("p", f"No figure: {e}"))
        figures += paths
        blocks += [("img", p, CAPTIONS.get(p.stem.split("_")[0], p.stem)) for p in paths if p.suffix == ".png"]
        blocks += _tables(kind, sub, n_boot, seed)
    blocks += _failed(runs)
    blocks += _provenance(runs, folders)
    md, page = out / "report.md", out / "report.html"
    atomic_write_text(md, render_markdown(blocks, out))
    atomic_write_text(page, render_html(blocks))
    return [md, page] + figures


# -- content -------------------------------------------------------------------------------

def _overview(runs: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for (source, kind), g in runs.groupby(["source", "study"], sort=False):
        c = analysis.counts(g)
        wall = g["wall_s"].sum() / 3600 if "wall_s" in g else math.nan
        rows.append({"folder": source, "study": kind, **c, "wall time (h)": wall})
    return pd.DataFrame(rows)


def _tables(kind: str, runs: pd.DataFrame, n_boot: int, seed: int) -> list[tuple]:
    """The result tables of one study kind (columns it lacks mean fewer tables)."""
    ok = analysis.finished(runs)
    has = set(runs.columns).issuperset
    if ok.empty:
        return [("p", "No run of this study has a result yet.")]
    if kind == "scale" and has(analysis.NEEDS["scale"]):
        summary = analysis.scale_summary(runs)
        out = []
        for metric in dict.fromkeys(summary["metric"]):
            part = summary[summary["metric"] == metric]
            cell = [f"{m:.2f}" if n == 1 or not np.isfinite(s) else f"{m:.2f} ± {s:.2f}"
                    for m, s, n in zip(part["mean"], part["std"], part["n"])]
            wide = part.assign(cell=cell).pivot(index="model", columns="n_train", values="cell")
            wide = wide.reindex(plots.model_order(wide.index)).reset_index()
            wide.columns = ["model"] + [f"n={c}" for c in wide.columns[1:]]
            out += [("h3", f"{metric} (%) by training-set size: mean ± std over seeds"), ("table", wide)]
        return out
    if kind == "stability" and has(analysis.NEEDS["stability"]):
        bands = analysis.hparam_bands(runs, n_boot=n_boot, seed=seed)
        return [("h3", "Error distribution per optimizer and model (diverged at 100%; within 4: share of runs "
                       "less than 4 points from the model's best)"),
                ("table", _by_model(analysis.edf_summary(runs).assign(within_4=lambda d: 100 * d["within_4"])
                                    .rename(columns={"within_4": "within 4 (%)"}))),
                ("h3", f"Best lr and wd by bootstrap ({n_boot} draws of 25% of the runs, seed {seed}): "
                       "median and 2.5–97.5% range"),
                ("table", _by_model(bands[["optimizer", "model", "param", "best", "lo", "hi", "n"]]))]
    if kind == "tune" and has(analysis.NEEDS["tune"]):
        return [("h3", "Best run per model and optimizer: the tuned (lr, wd); an edge says the best lr or wd "
                       "is the lowest or highest sampled, so the range must be widened"),
                ("table", _by_model(analysis.tune_best(runs)))]
    if kind == "optimizer" and has(analysis.NEEDS["optimizer"]):
        summary = analysis.optimizer_summary(runs)
        gaps = analysis.optimizer_gaps(summary)
        best = analysis.best_optimizer(summary)
        errors = summary.pivot_table(index=["model", "optimizer"], columns="epochs", values="mean").reset_index()
        errors.insert(2, "best", [m_best == o for m_best, o in zip(errors["model"].map(best), errors["optimizer"])])
        errors.columns = [c if isinstance(c, str) else f"{c} ep" for c in errors.columns]
        out = [("h3", "Mean top-1 error (%) per model, optimizer and epochs (best: the model's best optimizer)"),
               ("table", _by_model(errors))]
        if not gaps.empty:
            wide = gaps.pivot(index="model", columns="epochs", values="gap").reset_index()
            wide.columns = ["model"] + [f"{c} ep" for c in wide.columns[1:]]
            out += [("h3", "Optimizer gap: SGD − AdamW mean top-1 error (points)"), ("table", _by_model(wide))]
        return out
    table = analysis.model_table(runs, by=("model", "dataset", "optimizer", "epochs", "n_train"))
    return [("h3", "Top-1 error (%) per model"), ("table", _by_model(table))]


def _failed(runs: pd.DataFrame) -> list[tuple]:
    bad = runs[runs["status"] != "ok"]
    if bad.empty:
        return []
    cols = [c for c in ("key", "study", "model", "optimizer", "lr", "wd", "epochs", "n_train", "seed", "error")
            if c in bad]
    more = f" (the first {MAX_FAILED} shown)" if len(bad) > MAX_FAILED else ""
    return [("h2", "Failed runs"),
            ("p", f"{len(bad)} run(s) ended without a result{more}; they are left out of every figure and table "
                  f"above, and a rerun of the study retries them."),
            ("table", bad[cols].head(MAX_FAILED))]


def _provenance(runs: pd.DataFrame, folders) -> list[tuple]:
    rows = []
    for col in PROVENANCE:
        if col in runs:
            seen = runs[col].fillna("?").astype(str).value_counts()
            rows.append({"field": col, "values (runs)": ", ".join(f"{v} ({n})" for v, n in seen.items())})
    if "started_at" in runs and runs["started_at"].notna().any():
        started = runs["started_at"].dropna().astype(str)
        rows.append({"field": "started", "values (runs)": f"{started.min()} .. {started.max()}"})
    c = analysis.counts(runs)
    rows.append({"field": "runs", "values (runs)": f"{c['runs']} ({c['ok']} ok, {c['failed']} failed, "
                                                   f"{c['diverged']} diverged)"})
    if "wall_s" in runs:
        rows.append({"field": "total wall time", "values (runs)": f"{runs['wall_s'].sum() / 3600:.2f} h"})
    out = [("h2", "Provenance"), ("table", pd.DataFrame(rows))]
    for folder in folders:
        toml = Path(folder) / "study.toml"
        if toml.is_file():
            out += [("h3", f"{toml}"), ("pre", toml.read_text())]
    return out


# -- rendering -------------------------------------------------------------------------------

def _fmt(v, integral: bool = False) -> str:
    """One cell: INTEGRAL columns as integers, errors (>= 1) to 2 decimals, small
    numbers (lr, wd) to 3 significant digits, missing as blank."""
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else ""
    if isinstance(v, (float, np.floating)):
        if not np.isfinite(v):
            return "" if np.isnan(v) else str(v)
        if integral:
            return str(int(v))
        return f"{v:.2f}" if abs(v) >= 1 else f"{v:.3g}"
    return "" if v is None else str(v)


def cells(df: pd.DataFrame) -> pd.DataFrame:
    """DF as strings, column by column (a float column of whole numbers reads as integers)."""
    out = {}
    for col in df.columns:
        values = df[col]
        num = pd.to_numeric(values, errors="coerce") if values.dtype.kind == "f" else None
        integral = num is not None and bool(np.all(np.mod(num.dropna(), 1) == 0))
        out[col] = [_fmt(v, integral) for v in values]
    return pd.DataFrame(out, columns=df.columns)


def _by_model(df: pd.DataFrame) -> pd.DataFrame:
    """Rows in the figures' order: optimizer (AdamW, SGD), then model family and size."""
    models = {m: i for i, m in enumerate(plots.model_order(df["model"]))}
    opts = {o: i for i, o in enumerate(analysis.OPTIMIZER_NAMES)}
    keys = pd.DataFrame({"o": df["optimizer"].map(opts).fillna(len(opts)) if "optimizer" in df else 0,
                         "m": df["model"].map(models)}, index=df.index)
    return df.loc[keys.sort_values(["o", "m"], kind="stable").index].reset_index(drop=True)


def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (pandas' to_markdown needs tabulate)."""
    def cell(text):
        return str(text).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(c) for c in df.columns) + " |",
             "|" + "|".join("---" for _ in df.columns) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in cells(df).itertuples(index=False)]
    return "\n".join(lines)


def render_markdown(blocks, base: Path) -> str:
    """Markdown; images linked relative to BASE (the folder of report.md)."""
    parts = []
    for kind, *args in blocks:
        if kind in ("h1", "h2", "h3"):
            parts.append("#" * int(kind[1]) + " " + args[0])
        elif kind == "p":
            parts.append(args[0])
        elif kind == "table":
            parts.append(markdown_table(args[0]))
        elif kind == "img":
            path, caption = args
            parts.append(f"![{path.stem}]({Path(os.path.relpath(path, base)).as_posix()})\n\n"
                         f"*{path.name}*: {caption}")
        elif kind == "pre":
            parts.append("```toml\n" + args[0].rstrip() + "\n```")
    return "\n\n".join(parts) + "\n"


CSS = """body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;max-width:1150px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}h1,h2{border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;font-size:13px;margin:.5em 0 1.5em}th,td{border:1px solid #ccc;padding:3px 8px}
td{text-align:right}th{background:#f3f3f3}figure{margin:1em 0 2em}img{max-width:100%}
figcaption{font-size:13px;color:#555}pre{background:#f6f6f6;padding:.8em;overflow:auto;font-size:12px}"""


def _text(s: str) -> str:
    return html.escape(s, quote=False)


def render_html(blocks) -> str:
    """A standalone HTML page: no external file, images inline."""
    parts = []
    for kind, *args in blocks:
        if kind in ("h1", "h2", "h3"):
            parts.append(f"<{kind}>{_text(args[0])}</{kind}>")
        elif kind == "p":
            parts.append(f"<p>{_text(args[0])}</p>")
        elif kind == "table":
            parts.append(cells(args[0]).to_html(index=False, border=0))
        elif kind == "img":
            path, caption = args
            data = base64.b64encode(path.read_bytes()).decode()
            parts.append(f'<figure><img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'
                         f"<figcaption><b>{_text(path.name)}</b>: {_text(caption)}</figcaption></figure>")
        elif kind == "pre":
            parts.append(f"<pre>{_text(args[0])}</pre>")
    title = html.escape(next((a[0] for k, *a in blocks if k == "h1"), "vitexp report"))
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
            f"<style>{CSS}</style></head>\n<body>\n" + "\n".join(parts) + "\n</body></html>\n")
