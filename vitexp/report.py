"""Figures and one report page per set of study folders, drawn by each folder's study kind.

`draw` makes a study's figures (the plot-* commands, and the CLI after
a study completes); `plot_curves` its learning curves; `write_report` writes report.md
(figures linked) and report.html (figures embedded as base64, so the file stands
alone and can be mailed or archived). Both pages are rendered from one list of blocks,
so they never disagree.

The page: an overview (runs, failed, diverged, not converged, elapsed and compute time
per folder), a warning for every study whose key trials did not converge, a section
per study kind with its figures (regenerated from runs.csv every time, so never stale)
and tables, the failed runs, and the provenance of every run (commits, torch versions,
devices, hosts, study.toml).
"""

from __future__ import annotations

import base64
import html
import math
import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pandas as pd

from vitexp import analysis, plots, studies
from vitexp.errors import UserError
from vitexp.fileio import atomic_write
from vitexp.markdown import cells, markdown_table, md_escape
from vitexp.store import TrialStore

PROVENANCE = ("commit", "vitexp", "torch", "device", "host")
MAX_FAILED = 20


# -- figures ----------------------------------------------------------------------------------------

def figure_dir(folders, out: str | Path | None) -> Path:
    """--out, else DIR/figures of the one folder (several need an explicit --out)."""
    if out is not None:
        return Path(out)
    if len(folders) > 1:
        raise UserError("several folders combine into one figure set: pass --out FOLDER for it")
    return TrialStore(folders[0], create=False).figures_dir


def _hints() -> dict:
    return {k: s.plot_command for k, s in studies.STUDIES.items()}


def draw(kind: str, folders, out=None, n_boot: int = 2500, seed: int = 0) -> list[Path]:
    """Load FOLDERS, check they hold a KIND study, write its figures (the CLI's plot-*)."""
    analysis.check_n_boot(n_boot)  # before any figure is written
    study = studies.get_study(kind)
    folders = [Path(f) for f in folders]
    runs = analysis.load_runs(folders, study.needs)
    runs = analysis.select_study(runs, kind, study.plot_command or kind, _hints())
    with plots.drawing(runs):
        return study.figures(runs, figure_dir(folders, out), n_boot=n_boot, seed=seed)


def plot_curves(folders, out=None, every: bool = False) -> list[Path]:
    """Learning curves (training loss, test error per epoch) of FOLDERS' best trial per model
    (and optimizer), or of EVERY trial."""
    folders = [Path(f) for f in folders]
    runs = analysis.load_runs(folders, required=("key", "model", "last_err"))
    history = pd.concat([_history(f) for f in folders], ignore_index=True)
    with plots.drawing(runs):
        return plots.plot_curves(runs, history, figure_dir(folders, out), best_only=not every)


def _history(folder: Path) -> pd.DataFrame:
    path = TrialStore(folder, create=False).history_table
    try:
        h = pd.read_csv(path, dtype={"key": str})
    except FileNotFoundError:
        raise UserError(f"no history.csv in {folder}; run a study with --out {folder} first") from None
    except pd.errors.EmptyDataError:
        raise UserError(f"{path} is empty (no trial has finished); rerun the study to finish one") from None
    except (pd.errors.ParserError, UnicodeDecodeError):
        raise UserError(f"{path} is not a readable CSV; rerun the study to rebuild it") from None
    if "key" not in h:
        raise UserError(f"{path} lacks column key; rerun the study to rebuild it")
    return h


# -- the report -------------------------------------------------------------------------------------

def write_report(folders, out=None, n_boot: int = 2500, seed: int = 0) -> list[Path]:
    """Write OUT/report.md, OUT/report.html and the figures in OUT/figures; OUT
    defaults to the one folder (several need an explicit OUT)."""
    folders = [Path(f) for f in folders]
    analysis.check_n_boot(n_boot)  # before any figure is written
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
              ("h2", "Overview"), ("table", _overview(runs)),
              ("p", "elapsed: from the first trial's start to the last one's end, pauses between runs "
                    "included (a folder's README gives the time it ran, pauses left out); compute: the "
                    "trials' own wall times summed (two workers run two at once).")] + _convergence(runs)
    figures = []
    kinds = [k for k in studies.STUDIES if k in set(runs["study"])]
    with plots.drawing(runs):
        for kind in kinds + sorted(set(runs["study"]) - set(kinds)):
            more, paths = _section(kind, runs[runs["study"] == kind], out, n_boot, seed)
            blocks += more
            figures += paths
    blocks += _claims(folders) + _failed(runs) + _provenance(runs, folders)
    md, page = out / "report.md", out / "report.html"
    atomic_write(md, render_markdown(blocks, out))
    atomic_write(page, render_html(blocks))
    return [md, page] + figures


def _section(kind: str, runs: pd.DataFrame, out: Path, n_boot: int, seed: int) -> tuple[list, list[Path]]:
    """The blocks and figures of one study kind (single runs and unknown kinds: a table)."""
    study = studies.STUDIES.get(kind)
    blocks = [("h2", study.title if study else "Single runs" if kind == "train" else f"{kind} study")]
    if analysis.finished(runs).empty:
        return blocks + [("p", "No run of this study has a result yet.")], []
    if study is None or not set(study.needs) <= set(runs.columns):
        table = analysis.model_table(runs, by=("model", "dataset", "optimizer", "epochs", "n_train"))
        return blocks + [("h3", "Top-1 error (%) per model"), ("table", _by_model(table))], []
    try:
        paths = study.figures(runs, TrialStore(out, create=False).figures_dir, n_boot=n_boot, seed=seed)
    except UserError as e:
        paths = []
        blocks.append(("p", f"No figure: {e}"))
    blocks += [("img", p, study.captions(p)) for p in paths if p.suffix == ".png"]
    blocks += [(b[0], _by_model(b[1])) if b[0] == "table" and "model" in b[1] else b
               for b in study.tables(runs, n_boot, seed)]
    return blocks, paths


def _claims(folders) -> list[tuple]:
    """The rows of the verdict table (vitexp/claims.py) that read one of FOLDERS, each
    evaluated with the folders beside it."""
    from vitexp import claims

    if not claims.default_claims().is_file():
        return []
    blocks = []
    for folder in folders:
        try:
            table = claims.claims_table([folder.parent], folder=folder.name)
        except UserError as e:
            blocks.append(("p", f"{folder}: the claims that read it cannot be evaluated here ({e})."))
            continue
        if len(table):
            blocks.append(("table", claims.display(table)))
    if not blocks:
        return []
    return [("h2", "Claims that read these results"), ("p", claims.RULE)] + blocks


def _overview(runs: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for (source, kind), g in runs.groupby(["source", "study"], sort=False):
        c = analysis.counts(g)
        ok = analysis.finished(g)
        rows.append({"folder": source, "study": kind, **c,
                     "not converged": int((~ok["converged"]).sum()) if "converged" in ok else math.nan,
                     "elapsed (h)": _elapsed(g) / 3600,
                     "compute (h)": g["wall_s"].sum() / 3600 if "wall_s" in g else math.nan})
    return pd.DataFrame(rows)


def _elapsed(runs: pd.DataFrame) -> float:
    """Seconds from the first trial's start to the last trial's end (trials that ran side
    by side count once): the study's wall time, where compute sums the trials'."""
    if "started_at" not in runs or "wall_s" not in runs or runs["started_at"].isna().all():
        return math.nan
    start = pd.to_datetime(runs["started_at"], utc=True, errors="coerce")
    end = start + pd.to_timedelta(runs["wall_s"].fillna(0), unit="s")
    return (end.max() - start.min()) / timedelta(seconds=1)


def _convergence(runs: pd.DataFrame) -> list[tuple]:
    """A warning for each study whose key trials (its largest size, its best lr, its longest
    schedule) did not converge by vitexp's rule (vitexp/rows.py)."""
    if "converged" not in runs:
        return []
    out = []
    for (source, kind), g in runs.groupby(["source", "study"], sort=False):
        study = studies.STUDIES.get(kind)
        key = study.must_converge(analysis.finished(g)) if study else analysis.finished(g)
        bad = key[~key["converged"]]
        if len(bad):
            names = ", ".join(sorted({f"{r.model} ({r.last_err:.1f}%)" for r in bad.itertuples()}))
            out.append(("p", f"WARNING: {source}: {len(bad)} of the {len(key)} trials this {kind} study rests on "
                             f"did not converge (best error in the last quarter of the budget and still moving "
                             f"by 0.5 points or more): {names}. Train them longer before drawing conclusions."))
    return out


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
        rows.append({"field": "compute time (sum of the trials' wall times)",
                     "values (runs)": f"{runs['wall_s'].sum() / 3600:.2f} h"})
    out = [("h2", "Provenance"), ("table", pd.DataFrame(rows))]
    for folder in folders:
        toml = TrialStore(folder, create=False).spec_path
        if toml.is_file():
            out += [("h3", f"{toml}"), ("pre", toml.read_text())]
    return out


# -- rendering -------------------------------------------------------------------------------

def _by_model(df: pd.DataFrame) -> pd.DataFrame:
    """Rows in the figures' order: optimizer (AdamW, SGD), then model family and size."""
    models = {m: i for i, m in enumerate(plots.model_order(df["model"]))}
    opts = {o: i for i, o in enumerate(analysis.OPTIMIZER_NAMES)}
    keys = pd.DataFrame({"o": df["optimizer"].map(opts).fillna(len(opts)) if "optimizer" in df else 0,
                         "m": df["model"].map(models)}, index=df.index)
    return df.loc[keys.sort_values(["o", "m"], kind="stable").index].reset_index(drop=True)


def render_markdown(blocks, base: Path) -> str:
    """Markdown; images linked relative to BASE (the folder of report.md)."""
    parts = []
    for kind, *args in blocks:
        if kind in ("h1", "h2", "h3"):
            parts.append("#" * int(kind[1]) + " " + md_escape(args[0]))
        elif kind == "p":
            parts.append(md_escape(args[0]))
        elif kind == "table":
            parts.append(markdown_table(args[0]))
        elif kind == "img":
            path, caption = args
            parts.append(f"![{path.stem}]({Path(os.path.relpath(path, base)).as_posix()})\n\n"
                         f"*{md_escape(path.name)}*: {md_escape(caption)}")
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
