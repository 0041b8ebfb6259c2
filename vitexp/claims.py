"""Verdicts as code: every claim of the claims file (experiments/claims.toml) evaluated from
results folders under one rule, so that a verdict changes only when the data does.

A claim has arms (a data set, a geometry, a batch size); each arm is a row. An arm is either
- a **contrast**: `plus` and `minus` lists of row selectors whose metric is summed with signs
  within each cell (a seed, and the `by` columns such as the training-set size); a cell's
  several rows (an lr grid) are narrowed to one by `choose` (the held-out error); the arm's
  effect per seed is the mean over its cells, and its interval a t interval over seeds; or
- an **edf** statistic ([EC]'s stability measure): the share of a model's runs within
  `within` points of its own best run, `plus` minus `minus`, with a bootstrap interval over
  runs.
A trial counts only when it converged (`converged`, the rule in vitexp/rows.py), except for
selectors marked `fixed_budget` (a short schedule whose distance from convergence is what the
claim measures) and an EDF's samples (its best runs must converge). An arm averaged over `by`
uses the by-values (sizes) at which every seed's trials converged; an arm of one cell per seed,
the seeds whose trials converged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from vitexp import analysis
from vitexp.errors import UserError, unknown
from vitexp.markdown import markdown_table
from vitexp.tomlfile import read_toml

# The one rule. Effects are oriented so that the paper's direction is positive; delta is the
# arm's smallest effect that matters.
RULE = ("Effects are oriented so that the paper's direction is positive. Reproduces: the 95% interval "
        "lies above zero and the effect is at least delta, the smallest effect that matters. Does not: "
        "the interval lies below zero, or inside (-delta, delta). Inconclusive: anything else. Untested: "
        "fewer than 2 seeds left once unconverged trials are set aside (an arm averaged over sizes keeps "
        "the sizes at which every seed converged; an EDF arm needs each model's best run converged). A "
        "claim of no effect (expect none) reproduces when the interval lies inside (-delta, delta) and "
        "does not when it excludes zero with |effect| >= delta. Intervals: t over seeds; for an EDF "
        "share, a percentile bootstrap over runs.")
EXPECTS = ("positive", "negative", "none")
KINDS = ("contrast", "edf")
MIN_SEEDS = 2
N_BOOT = 2000  # bootstrap draws of an EDF arm's interval (seeded: the table is the same every run)
ARM_KEYS = ("name", "folders", "kind", "plus", "minus", "by", "pair", "choose", "metric", "expect",
            "min_effect", "within", "paper", "planned")
CLAIM_KEYS = ("id", "title", "paper", "source", "arms")
SPECIAL = ("fixed_budget",)  # selector keys that are not columns
PLANNED = "not run yet"  # an arm written before its study ran, shown before its folder exists
UNDER_WAY = "under way"  # ... and while its folder lacks a run some term needs (the study runs in parts)
COLUMNS = ["claim", "arm", "paper", "effect", "lo", "hi", "interval", "seeds", "converged", "verdict"]


@dataclass
class Arm:
    claim: str
    title: str
    name: str
    paper: str
    folders: list[str]
    plus: list[dict]
    minus: list[dict]
    expect: str
    min_effect: float
    kind: str = "contrast"
    by: list[str] = field(default_factory=list)
    pair: list[str] = field(default_factory=lambda: ["seed"])
    choose: str | None = None
    metric: str = "last_err"
    within: float = 4.0
    planned: bool = False  # written before its study ran: no folder yet is "untested", not an error

    @property
    def label(self) -> str:
        return f"({self.claim}) {self.name}"


# -- the claims file ---------------------------------------------------------------------------------

def default_claims() -> Path:
    from vitexp.sweep.presets import CLAIMS_FILE, experiments_dir

    return experiments_dir() / CLAIMS_FILE


def load_claims(path: str | Path | None = None) -> list[Arm]:
    """The arms of the claims file, each checked for what it can be without data."""
    path = Path(path) if path is not None else default_claims()
    if not path.is_file():
        raise UserError(f"claims file {path} does not exist; give --claims FILE or set VITEXP_EXPERIMENTS")
    spec = read_toml(path, "claims file")
    defaults = spec.get("defaults", {})
    extra = set(spec) - {"defaults", "claim"}
    if extra:
        raise UserError(f"claims file {path}: unknown table [{sorted(extra)[0]}]; it has [defaults] and [[claim]]")
    arms = []
    for claim in spec.get("claim", []):
        _keys(claim, CLAIM_KEYS, f"claim {claim.get('id', '?')}")
        for table in claim.get("arms", []):
            arms.append(_arm(claim, {**defaults, **table}))
    if not arms:
        raise UserError(f"claims file {path} has no [[claim.arms]]; add a claim with at least one arm")
    return arms


def _keys(table: dict, allowed, where: str) -> None:
    for k in table:
        if k not in allowed:
            raise unknown(f"key in {where}", k, allowed)


def _arm(claim: dict, t: dict) -> Arm:
    where = f"claim ({claim.get('id', '?')}) arm '{t.get('name', '?')}'"
    _keys(t, ARM_KEYS, where)
    for k in ("name", "folders", "plus", "expect", "min_effect"):
        if k not in t:
            raise UserError(f"{where} has no `{k}`; every arm names its folders, plus/minus terms, expect "
                            f"and min_effect")
    if t["expect"] not in EXPECTS:
        raise unknown(f"expect in {where}", str(t["expect"]), EXPECTS)
    if t.get("kind", "contrast") not in KINDS:
        raise unknown(f"kind in {where}", str(t["kind"]), KINDS)
    if not (isinstance(t["min_effect"], (int, float)) and t["min_effect"] > 0):
        raise UserError(f"{where}: min_effect must be a positive number of points, got {t['min_effect']!r}")
    for side in ("plus", "minus"):
        terms = t.get(side, [])
        if not isinstance(terms, list) or not all(isinstance(s, dict) and s for s in terms):
            raise UserError(f"{where}: `{side}` must be a list of selectors, e.g. [{{model = \"vit_p_7mf\"}}]")
    if t.get("kind") == "edf" and (len(t["plus"]) != 1 or len(t.get("minus", [])) != 1):
        raise UserError(f"{where}: an edf arm compares one `plus` selector with one `minus` selector")
    if not isinstance(t["folders"], list) or not t["folders"]:
        raise UserError(f"{where}: `folders` must list the results folders it reads, e.g. [\"scale_shapes\"]")
    return Arm(claim=str(claim["id"]), title=str(claim.get("title", "")), name=str(t["name"]),
               paper=str(t.get("paper", claim.get("paper", ""))), folders=[str(f) for f in t["folders"]],
               plus=t["plus"], minus=t.get("minus", []), expect=t["expect"], min_effect=float(t["min_effect"]),
               kind=t.get("kind", "contrast"), by=list(t.get("by", [])), pair=list(t.get("pair", ["seed"])),
               choose=t.get("choose"), metric=str(t.get("metric", "last_err")), within=float(t.get("within", 4.0)),
               planned=bool(t.get("planned", False)))


# -- evaluation --------------------------------------------------------------------------------------

def find_folder(name: str, roots) -> Path | None:
    """NAME under the first root that has it (a root may also be the folder itself)."""
    from vitexp.store import has_runs

    for root in roots:
        root = Path(root)
        for p in (root / name, root):
            if p.name == name and has_runs(p):
                return p
    return None


def arm_runs(arm: Arm, roots, cache: dict) -> pd.DataFrame:
    """The finished runs of ARM's folders (rows of one trial key once)."""
    frames = []
    for name in arm.folders:
        folder = find_folder(name, roots)
        if folder is None:
            raise UserError(f"{arm.label} reads results folder '{name}', which is in none of "
                            f"{', '.join(map(str, roots))}; fix the folder name or pass the results root that holds it")
        if folder not in cache:
            cache[folder] = analysis.load_runs([folder])
        frames.append(cache[folder])
    runs = pd.concat(frames, ignore_index=True).drop_duplicates("key")
    return runs[runs["status"] == "ok"]


def _check_columns(arm: Arm, runs: pd.DataFrame) -> None:
    cols = [arm.metric] + arm.by + arm.pair + ([arm.choose] if arm.choose else [])
    cols += [k for sel in arm.plus + arm.minus for k in sel if k not in SPECIAL]
    for c in cols:
        if c not in runs:
            raise UserError(f"{arm.label}: {unknown('column', c, runs.columns)} (in {', '.join(arm.folders)}'s "
                            f"runs.csv); fix the claims file")


def _select(arm: Arm, runs: pd.DataFrame, sel: dict) -> pd.DataFrame:
    """The runs matching SEL: each column equal to the value (a list: any of them; "": empty)."""
    mask = pd.Series(True, index=runs.index)
    for col, want in sel.items():
        if col in SPECIAL:
            continue
        values = want if isinstance(want, list) else [want]
        col_mask = pd.Series(False, index=runs.index)
        for v in values:
            col_mask |= runs[col].isna() | (runs[col].astype(str) == "") if v == "" else runs[col] == v
        mask &= col_mask
    out = runs[mask]
    if out.empty:
        raise UserError(f"{arm.label}: the selector {sel} matches no finished run of {', '.join(arm.folders)}; "
                        f"fix the claims file")
    return out


def _term_cells(arm: Arm, rows: pd.DataFrame, sel: dict) -> pd.DataFrame:
    """One row per cell (pair and by columns): where a cell holds several runs (an lr grid), the
    one `choose` picks; several without `choose` are an error."""
    keys = arm.pair + arm.by
    if arm.choose:
        rows = rows.loc[rows.groupby(keys)[arm.choose].idxmin()]
    elif rows.duplicated(keys).any():
        n = int(rows.groupby(keys).size().max())
        raise UserError(f"{arm.label}: the selector {sel} matches {n} runs in one cell of {keys}; narrow it "
                        f"(e.g. lr, epochs) or give `choose = \"val_err\"`")
    conv = rows["converged"].astype(bool)
    ok = conv | bool(sel.get("fixed_budget", False))  # a fixed budget's trials count as run
    return rows.assign(_ok=ok.values, _conv=conv.values).set_index(keys)[[arm.metric, "_ok", "_conv"]]


def evaluate_contrast(arm: Arm, runs: pd.DataFrame) -> dict:
    """Per seed: the mean over its cells of sum(plus) - sum(minus); a t interval over seeds. An
    arm averaged over `by` uses the by-values at which every seed's trials converged; one of a
    cell per seed, the seeds whose trials converged."""
    terms = [(1.0, s) for s in arm.plus] + [(-1.0, s) for s in arm.minus]
    cells = [(w, _term_cells(arm, _select(arm, runs, s), s)) for w, s in terms]
    index = cells[0][1].index
    for _, c in cells[1:]:
        index = index.intersection(c.index)
    if index.empty:
        raise UserError(f"{arm.label}: its plus and minus terms share no {arm.pair + arm.by} cell; "
                        f"fix the claims file")
    effect = sum(w * c.loc[index, arm.metric] for w, c in cells)
    ok = np.logical_and.reduce([c.loc[index, "_ok"].values for _, c in cells])
    per = pd.DataFrame({"effect": effect.values, "ok": ok}, index=index).reset_index()
    n_trials = sum(len(c.loc[index]) for _, c in cells)
    n_ok = sum(int(c.loc[index, "_conv"].sum()) for _, c in cells)
    fixed = sum(bool(sel.get("fixed_budget")) for sel in arm.plus + arm.minus)
    converged = f"{n_ok}/{n_trials}" + (f" ({fixed} of {len(cells)} terms a fixed budget)" if fixed else "")
    if arm.by:
        whole = per.groupby(arm.by)["ok"].transform("all")
        used = per.loc[whole, arm.by].drop_duplicates().sort_values(list(arm.by))  # sizes in numeric order
        values = ", ".join("/".join(f"{v:g}" if isinstance(v, (int, float)) else str(v) for v in row)
                           for row in used.itertuples(index=False))
        converged += f" ({len(used)} of {len(per[arm.by].drop_duplicates())} {'/'.join(arm.by)}" + (
            f": {values})" if values else ")")
        per = per.assign(ok=whole)
        # a seed counts only with every used by-value: seeds added at one size must not turn a
        # mean over sizes into that size's effect
        sizes = per[per["ok"]].groupby(arm.pair)["ok"].transform("size")
        per.loc[sizes.index, "ok"] = sizes == len(used)
    by_seed = per[per["ok"]].groupby(arm.pair)["effect"].mean()
    n = len(by_seed)
    mean = float(by_seed.mean()) if n else math.nan
    half = analysis.t_half(by_seed) if n >= MIN_SEEDS else math.nan
    return {"effect": mean, "lo": mean - half, "hi": mean + half, "interval": "t", "seeds": n,
            "of_seeds": per[arm.pair].drop_duplicates().shape[0], "converged": converged, "testable": n >= MIN_SEEDS}


def evaluate_edf(arm: Arm, runs: pd.DataFrame, seed: int = 0) -> dict:
    """Share of runs within arm.within points of their own best (plus minus minus), in points
    of percent; a percentile bootstrap over runs. The best run is the one `choose` picks (the
    held-out error), else the lowest metric; it must have converged."""
    sides, testable, n_ok = [], True, 0
    for sel in (arm.plus[0], arm.minus[0]):
        rows = _select(arm, runs, sel)
        pick = rows[arm.choose or arm.metric].to_numpy(float)
        testable &= bool(rows["converged"].iloc[int(np.argmin(pick))])
        n_ok += int(rows["converged"].astype(bool).sum())
        sides.append((rows[arm.metric].to_numpy(float), pick))
    rng = np.random.default_rng(seed)

    def share(err, pick, idx):  # idx: (draws, n) resampled runs
        best = np.take_along_axis(err[idx], np.argmin(pick[idx], axis=1)[:, None], axis=1)
        return np.mean(err[idx] - best <= arm.within, axis=1) * 100

    point = [share(e, p, np.arange(len(e))[None])[0] for e, p in sides]
    boot = [share(e, p, rng.integers(0, len(e), (N_BOOT, len(e)))) for e, p in sides]
    lo, hi = np.percentile(boot[0] - boot[1], [2.5, 97.5])
    return {"effect": point[0] - point[1], "lo": float(lo), "hi": float(hi), "interval": "bootstrap",
            "seeds": int(runs["seed"].nunique()), "of_seeds": None,
            "converged": f"{n_ok}/{sum(len(e) for e, _ in sides)}", "testable": testable}


def verdict(effect: float, lo: float, hi: float, testable: bool, expect: str, delta: float) -> str:
    """The one rule (RULE) for one arm."""
    if not testable or any(map(math.isnan, (effect, lo, hi))):
        return "untested"
    if expect == "none":
        if -delta < lo and hi < delta:
            return "reproduces"
        return "does not" if (lo > 0 or hi < 0) and abs(effect) >= delta else "inconclusive"
    s = 1.0 if expect == "positive" else -1.0
    e, lo, hi = s * effect, *sorted((s * lo, s * hi))
    if lo > 0 and e >= delta:
        return "reproduces"
    if hi < 0 or (-delta < lo and hi < delta):
        return "does not"
    return "inconclusive"


def _all_run(arm: Arm, runs: pd.DataFrame) -> bool:
    """Whether every term of ARM matches a finished run (a planned arm's study may be under way)."""
    try:
        for sel in arm.plus + arm.minus:
            _select(arm, runs, sel)
    except UserError:
        return False
    return True


def evaluate(arms: list[Arm], roots=("results",)) -> pd.DataFrame:
    """One row per arm: the measured effect, its 95% interval, the seeds and converged trials it
    rests on, and the verdict by RULE."""
    cache, rows = {}, []
    for arm in arms:
        runs = None
        if not (arm.planned and any(find_folder(f, roots) is None for f in arm.folders)):
            runs = arm_runs(arm, roots, cache)
            _check_columns(arm, runs)
        if runs is None or (arm.planned and not _all_run(arm, runs)):
            r = {"effect": math.nan, "lo": math.nan, "hi": math.nan, "interval": "t", "seeds": 0, "of_seeds": 0,
                 "converged": PLANNED if runs is None else UNDER_WAY, "testable": False}
        else:
            r = evaluate_edf(arm, runs) if arm.kind == "edf" else evaluate_contrast(arm, runs)
        rows.append({"claim": arm.claim, "arm": arm.name, "paper": arm.paper, "kind": arm.kind, "expect": arm.expect,
                     "min_effect": arm.min_effect, "folders": " ".join(arm.folders), **r,
                     "verdict": verdict(r["effect"], r["lo"], r["hi"], r["testable"], arm.expect, arm.min_effect)})
    return pd.DataFrame(rows)


def claims_table(roots=("results",), claims: str | Path | None = None, folder: str | None = None) -> pd.DataFrame:
    """The verdict table of the claims file over the results under ROOTS; FOLDER: only the
    arms that read a folder of that name."""
    arms = load_claims(claims)
    if folder is not None:
        arms = [a for a in arms if folder in a.folders]
    return evaluate(arms, roots) if arms else pd.DataFrame(columns=COLUMNS)


# -- output ------------------------------------------------------------------------------------------

def _num(v: float) -> str:
    return "n/a" if v != v else f"{v:+.2f}"


def display(table: pd.DataFrame) -> pd.DataFrame:
    """The table as a reader sees it: the effect and its 95% interval, delta, the seeds used of
    the seeds run (an EDF: its runs), the converged trials, the verdict."""
    out = []
    for r in table.itertuples():
        interval = "" if r.lo != r.lo else f" ({r.lo:+.2f} to {r.hi:+.2f})"
        runs = r.converged.split("/")[1].split()[0] if "/" in r.converged else "0"
        seeds = f"{r.seeds}/{int(r.of_seeds)}" if r.kind == "contrast" else f"{runs} runs"
        out.append({"claim": f"({r.claim}) {r.arm}", "paper says": r.paper,
                    "effect (95% interval)": f"{_num(r.effect)}{interval}", "delta": f"{r.min_effect:g}",
                    "seeds": seeds, "converged": r.converged, "verdict": r.verdict})
    return pd.DataFrame(out, columns=["claim", "paper says", "effect (95% interval)", "delta", "seeds", "converged",
                                      "verdict"])


FORMATS = ("table", "md", "csv", "json")  # `vitexp claims --format`


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise unknown("--format", fmt, FORMATS)


def render(table: pd.DataFrame, fmt: str) -> str:
    """The verdict table as text in FMT (md, csv or json), ending in a newline."""
    text = {"md": lambda: markdown(table), "csv": lambda: table.to_csv(index=False),
            "json": lambda: table.to_json(orient="records", indent=1)}[fmt]()
    return text if text.endswith("\n") else text + "\n"


def markdown(table: pd.DataFrame) -> str:

    return markdown_table(display(table))


README_START, README_END = "<!-- claims:start -->", "<!-- claims:end -->"


def readme_section(text: str) -> str:
    """The generated table between README_START and README_END of a README's TEXT."""
    if README_START not in text or README_END not in text:
        raise UserError(f"the README has no {README_START} ... {README_END} section to hold the claims table")
    return text.split(README_START, 1)[1].split(README_END, 1)[0].strip()


def write_readme(path: Path, table: pd.DataFrame) -> Path:
    """Rewrite the generated table between README_START and README_END of PATH."""
    from vitexp.fileio import atomic_write

    text = path.read_text(encoding="utf-8")
    readme_section(text)  # both markers are there
    head, rest = text.split(README_START, 1)
    tail = rest.split(README_END, 1)[1]
    atomic_write(path, f"{head}{README_START}\n{markdown(table)}\n{README_END}{tail}")
    return path


FIGURE = "verdicts"  # DIR/figures/verdicts.png
VERDICT_COLOURS = {"reproduces": "#1a9850", "does not": "#d73027", "inconclusive": "#fdae61", "untested": "#999999"}


def forest_plot(table: pd.DataFrame, out: Path) -> list[Path]:
    """OUT/verdicts.{png,pdf,csv}: each arm's effect in the paper's direction (right) with its 95%
    interval, its negligible band (-delta, delta) shaded, coloured by verdict."""
    from matplotlib.patches import Rectangle

    from vitexp import plots

    s = np.where(table["expect"] == "negative", -1.0, 1.0)
    eff, a, b = s * table["effect"], s * table["lo"], s * table["hi"]
    data = table.assign(oriented_effect=eff, oriented_lo=np.minimum(a, b), oriented_hi=np.maximum(a, b))
    n = len(data)
    with plots.style():
        fig, axes = plots.figure(1, 1, width=7.5, height=0.9 + 0.27 * n)
        ax = axes[0][0]
        for i, r in enumerate(data.itertuples()):
            y = n - 1 - i
            ax.add_patch(Rectangle((-r.min_effect, y - 0.35), 2 * r.min_effect, 0.7, color="#e6e6e6", lw=0))
            colour = VERDICT_COLOURS[r.verdict]
            if r.oriented_lo == r.oriented_lo:
                ax.plot([r.oriented_lo, r.oriented_hi], [y, y], color=colour, lw=1.6)
            if r.oriented_effect == r.oriented_effect:
                ax.plot(r.oriented_effect, y, "o" if r.kind == "contrast" else "s", color=colour, ms=4)
            else:
                why = f" {r.converged}" if r.converged in (PLANNED, UNDER_WAY) else " no converged seeds"
                ax.text(0, y, why, color=colour, fontsize=6, va="center")
        ax.axvline(0, color="black", lw=0.8)
        ax.set_yticks(range(n), [f"({r.claim}) {r.arm}" for r in data.itertuples()][::-1], fontsize=6.5)
        ax.set_ylim(-0.7, n - 0.3)
        ax.set_xscale("symlog", linthresh=2.0)
        ticks = [t for t in (-30, -10, -3, -1, 0, 1, 3, 10, 30, 100) if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_xlabel("effect in the paper's direction (right), points of error; squares: points of percent of "
                      "runs; grey: within delta", fontsize=7)
        for verdict, colour in VERDICT_COLOURS.items():
            ax.plot([], [], "o", color=colour, label=verdict)
        fig.legend(fontsize=7, loc="outside lower center", ncols=len(VERDICT_COLOURS))
        ax.set_title("Claims: measured effect and 95% interval (t over seeds; bootstrap over runs for EDFs)",
                     fontsize=8)
        cols = ["claim", "arm", "verdict", "effect", "lo", "hi", "min_effect", "expect", "seeds", "converged"]
        return plots.save(fig, data[cols + ["oriented_effect", "oriented_lo", "oriented_hi"]], out, FIGURE)

