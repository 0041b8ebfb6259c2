"""The numbers behind every figure and report table, in pandas/numpy only, so that
tests and notebooks can check each plotted value without matplotlib.

Conventions (PAPERS.md section 4):
- A run's error is ERR, `last_err`: the final evaluated model's test error, which no
  test image chose. runs.csv keeps `top1_err`, pycls's minimum over test
  evaluations (early stopping on the test images), for comparison with the papers'
  numbers; no figure, table or verdict reads it. A choice among runs (a search's best,
  a sample's best run) reads the held-out error where the runs have one (`choice_column`).
  Diverged runs count at 100% error: they are results (the recipe failed), not gaps.
  Runs with status != "ok" (crashed trials) are left out of every number and only
  counted.
- EDF: F(e) = fraction of runs with error strictly below e. It is a step function,
  continuous from the left: at a tie value e the runs at exactly e are not yet
  counted; just right of e they are (`edf_right`).
- Best lr/wd and its "good range": pycls's empirical bootstrap (see `bootstrap_best`).
"""

from __future__ import annotations

import ast
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd

from vitexp.data.datasets import chance_err
from vitexp.errors import UserError
from vitexp.rows import CHANCE_MARGIN, CONVERGENCE_RULE, DIVERGED_ERR, judged
from vitexp.store import TrialStore, read_runs

NUMERIC = ("n_train", "seed", "lr", "wd", "epochs", "batch_size", "top1_err", "last_err", "val_err", "wall_s", "params_m", "n_test")
FEWSHOT = re.compile(r"^fewshot(\d+)_err$")
OPTIMIZER_NAMES = {"adamw": "AdamW", "sgd": "SGD"}
# pycls's bootstrap draws 25% of the runs; with fewer than this many per draw the "best"
# is little more than the median sample, so no band is given
MIN_PER_DRAW = 8
ERR = "last_err"  # the reported error (see the module's conventions)


# two-sided 95% quantiles of Student's t by degrees of freedom (tabled: no scipy dependency)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
        10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


def t975(df: int) -> float:
    """The 97.5% quantile of Student's t with DF degrees of freedom (the next tabled df below)."""
    return T975[max(k for k in T975 if k <= df)] if df < 30 else 1.96 if df > 120 else T975[30]


def t_half(values) -> float:
    """Half the width of the 95% t interval of the mean of VALUES (NaN for fewer than two)."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    return t975(len(v) - 1) * float(v.std(ddof=1)) / math.sqrt(len(v)) if len(v) >= 2 else math.nan


def choice_column(runs: pd.DataFrame) -> str:
    """The error that chooses among runs (a search's best, a grid's lr): `val_err`, the final
    model's error on held-out training images, where every finished run has one; else ERR,
    the final test error, in folders from before held-out selection (the test images then chose)."""
    ok = finished(runs) if "status" in runs else runs
    if "val_err" in ok and len(ok) and ok["val_err"].notna().all():
        return "val_err"
    return ERR


def best_err(runs: pd.DataFrame) -> float:
    """The error of the best of RUNS, the best chosen by `choice_column`."""
    return float(runs.loc[runs[choice_column(runs)].idxmin(), ERR])


# -- loading ----------------------------------------------------------------------

def study_kind(folder: str | Path) -> str | None:
    """The `[study] kind` of FOLDER's study.toml, None when it has none."""
    spec = TrialStore(folder, create=False).read_spec() if Path(folder).is_dir() else None
    kind = spec.get("study", {}).get("kind") if isinstance(spec, dict) else None
    return str(kind) if kind else None


def definitions(runs: pd.DataFrame) -> dict[str, dict]:
    """model -> its [models.NAME] table, for the runs of models a preset defined (their
    `model_def`; runs.csv holds it as the repr of a dict)."""
    out = {}
    if "model_def" not in runs:
        return out
    for model, d in runs[["model", "model_def"]].drop_duplicates("model").itertuples(index=False):
        table = ast.literal_eval(d) if isinstance(d, str) and d.startswith("{") else d
        if isinstance(table, dict) and table:
            out[str(model)] = table
    return out


def model_def(rows: pd.DataFrame) -> dict:
    """The [models.NAME] table of ROWS' model (all of one model; {} for a built-in one)."""
    return definitions(rows.head(1)).get(str(rows["model"].iloc[0]), {}) if len(rows) else {}


def fewshot_columns(runs: pd.DataFrame) -> list[str]:
    """The few-shot error columns present, by shot count."""
    return sorted((c for c in runs.columns if FEWSHOT.match(c)), key=lambda c: int(FEWSHOT.match(c)[1]))


def load_runs(folders, required=("model",)) -> pd.DataFrame:
    """runs.csv of each folder, concatenated and cleaned: numbers parsed, `study`
    filled from study.toml where missing, `status` defaulting to "ok", `diverged`
    a bool, diverged runs at 100% error, `converged` by today's rule; `source` names the
    folder of each row."""
    frames = []
    for folder in folders:
        df = read_runs(folder, required)
        df["source"] = str(folder)
        kind = study_kind(folder)
        if "study" not in df:
            df["study"] = kind or "train"
        elif kind:
            df["study"] = df["study"].fillna(kind)
        frames.append(_recheck_convergence(df, Path(folder)))
    runs = pd.concat(frames, ignore_index=True)
    runs["study"] = runs["study"].fillna("train").astype(str)
    runs["status"] = runs["status"].fillna("failed").astype(str) if "status" in runs else "ok"
    runs["model"] = runs["model"].astype(str)
    if "optimizer" in runs:
        runs["optimizer"] = runs["optimizer"].astype(str).str.lower()
    for col in [c for c in NUMERIC if c in runs] + fewshot_columns(runs):
        runs[col] = _numeric(runs, col)
    runs["diverged"] = _boolean(runs, "diverged") if "diverged" in runs else False
    if "converged" in runs:
        runs["converged"] = _boolean(runs, "converged")
    if ERR not in runs and "top1_err" not in runs:
        raise UserError(f"{runs['source'].iloc[0]}/runs.csv has no {ERR} column; give a folder written by "
                        f"a vitexp study, or rerun its study to rebuild runs.csv")
    if "top1_err" in runs:  # rows from before last_err existed: their minimum is all there is
        runs[ERR] = runs[ERR].fillna(runs["top1_err"]) if ERR in runs else runs["top1_err"]
    for col in (ERR, "top1_err", "val_err"):
        if col in runs:
            runs.loc[runs["diverged"], col] = DIVERGED_ERR
    lost = (runs["status"] == "ok") & runs[ERR].isna()
    if lost.any():
        row = runs[lost].iloc[0]
        raise UserError(f"{row['source']}/runs.csv: trial {_name(row)} is ok but has no error; "
                        f"rerun the study to rebuild runs.csv")
    return runs


def _recheck_convergence(runs: pd.DataFrame, folder: Path) -> pd.DataFrame:
    """`converged` by today's rule (vitexp/rows.py), from FOLDER's history.csv, for the rows
    recorded under an earlier one (their `converged_rule` is not today's); the flag as recorded
    stays as `converged_recorded`."""
    path = TrialStore(folder, create=False).history_table
    if "converged" not in runs or "key" not in runs or not path.is_file():
        return runs
    rule = _numeric(runs, "converged_rule") if "converged_rule" in runs else pd.Series(math.nan, index=runs.index)
    old = (rule != CONVERGENCE_RULE).to_numpy()
    if not old.any():
        return runs
    try:
        hist = pd.read_csv(path, dtype={"key": str}, usecols=["key", "epoch", "train_loss"])
    except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError):
        return runs
    by_key = {k: g.to_dict("records") for k, g in hist.groupby("key")}
    again = [judged(r, by_key.get(r["key"], [])) for r in runs.to_dict("records")]
    flags = np.where(old, again, _boolean(runs, "converged"))
    return runs.assign(converged_recorded=runs["converged"], converged=flags)


def _name(row) -> str:
    return str(row.get("key", "without a key"))


def _numeric(runs: pd.DataFrame, col: str) -> pd.Series:
    raw = runs[col]
    num = pd.to_numeric(raw, errors="coerce")
    bad = raw.notna() & num.isna() & (raw.astype(str).str.strip().str.lower() != "nan")
    if bad.any():
        row = runs[bad].iloc[0]
        raise UserError(f"{row['source']}/runs.csv: column {col} has unparsable value {row[col]!r} "
                        f"(trial {_name(row)}); fix or rebuild runs.csv")
    return num.astype(float)


_TRUE, _FALSE = {"true", "1", "1.0", "yes"}, {"false", "0", "0.0", "no", "nan", ""}


def _boolean(runs: pd.DataFrame, col: str) -> pd.Series:
    text = runs[col].astype(str).str.strip().str.lower()
    bad = ~text.isin(_TRUE | _FALSE)
    if bad.any():
        row = runs[bad].iloc[0]
        raise UserError(f"{row['source']}/runs.csv: column {col} has unparsable value {row[col]!r} "
                        f"(trial {_name(row)}); expected True or False")
    return text.isin(_TRUE)


def select_study(runs: pd.DataFrame, kind: str, command: str, hints: dict | None = None) -> pd.DataFrame:
    """The rows of study KIND; single `train` runs pass for any kind (they carry no
    kind). Folders that hold only another kind are a UserError pointing at the
    right command (HINTS: kind -> its plot command)."""
    kinds = set(runs["study"])
    if kind in kinds:
        return runs[runs["study"] == kind]
    if kinds <= {"train"}:
        return runs
    other = sorted(kinds - {"train"})[0]
    where = ", ".join(sorted(set(runs.loc[runs["study"] == other, "source"])))
    hint = f" (use {hints[other]})" if hints and hints.get(other) else ""
    raise UserError(f"{where} holds {_a(other)} study; {command} needs {_a(kind)} study{hint}")


def _a(word: str) -> str:
    return f"{'an' if word[:1] in 'aeiou' else 'a'} {word}"


def finished(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs that have a result (status ok; diverged ones included at 100%)."""
    return runs[runs["status"] == "ok"]


def counts(runs: pd.DataFrame) -> dict:
    """n runs, ok, failed (no result), diverged (a result at 100%)."""
    ok = runs["status"] == "ok"
    return {"runs": len(runs), "ok": int(ok.sum()), "failed": int((~ok).sum()),
            "diverged": int((ok & runs["diverged"]).sum())}


# -- error distribution functions ---------------------------------------------------

def edf(errors, at) -> np.ndarray:
    """F(e) = fraction of ERRORS strictly below e, for each e in AT."""
    errors = np.sort(np.asarray(errors, dtype=float))
    return np.searchsorted(errors, np.asarray(at, dtype=float), side="left") / len(errors)


def edf_steps(errors) -> pd.DataFrame:
    """The corners of the EDF step function: one row per distinct error, with F at
    that error (`edf`, ties not yet counted) and just right of it (`edf_right`)."""
    errors = np.sort(np.asarray(errors, dtype=float))
    at = np.unique(errors)
    return pd.DataFrame({"error": at, "edf": edf(errors, at),
                         "edf_right": np.searchsorted(errors, at, side="right") / len(errors)})


def edf_table(runs: pd.DataFrame, n_boot: int = 0, seed: int = 0) -> pd.DataFrame:
    """EDF corners per optimizer and model, for the error itself (metric ERR) and for its
    difference to the best run of that model and optimizer (`gap`; `best_err`); with N_BOOT
    draws, the pointwise 95% percentile band of each corner's `edf_right` (`edf_lo`, `edf_hi`)."""
    parts = []
    for (opt, model), g in finished(runs).groupby(["optimizer", "model"], sort=True):
        err = g[ERR].to_numpy()
        bands = edf_bands(err, g[choice_column(g)].to_numpy(), n_boot, seed) if n_boot else {}
        for metric, values in ((ERR, err), ("gap", err - best_err(g))):
            steps = edf_steps(values)
            if n_boot:
                steps["edf_lo"], steps["edf_hi"] = bands[metric](steps["error"].to_numpy())
            steps.insert(0, "metric", metric)
            steps.insert(0, "model", model)
            steps.insert(0, "optimizer", opt)
            parts.append(steps)
    return pd.concat(parts, ignore_index=True)


def edf_bands(err: np.ndarray, choose: np.ndarray, n_boot: int, seed: int) -> dict:
    """metric -> (function of the corners x -> (lo, hi)): the 2.5 and 97.5 percentiles of
    F(x) = fraction of runs <= x over N_BOOT resamples of the runs with replacement; for the gap
    the best run is chosen again in each resample (by CHOOSE, the choosing error)."""
    idx = np.random.default_rng(seed).integers(0, len(err), size=(n_boot, len(err)))
    drawn = err[idx]
    best = drawn[np.arange(n_boot), np.argmin(choose[idx], axis=1)]
    samples = {ERR: drawn, "gap": drawn - best[:, None]}

    def band(values):
        return lambda x: tuple(np.percentile((values[:, :, None] <= x[None, None, :]).mean(axis=1), [2.5, 97.5],
                                             axis=0))
    return {metric: band(values) for metric, values in samples.items()}


TAUGHT = " taught by "  # a distilled arm's name: "vit_p_7mf taught by resnet_7mf"


def arms(runs: pd.DataFrame) -> pd.DataFrame:
    """RUNS with each distilled student's model named as its arm (TAUGHT), so that tables and
    figures show it beside the same model trained plainly."""
    if "teacher_model" not in runs or runs["teacher_model"].isna().all():
        return runs
    taught = runs["teacher_model"].notna()
    return runs.assign(model=runs["model"].where(~taught, runs["model"] + TAUGHT + runs["teacher_model"].astype(str)))


def edf_summary(runs: pd.DataFrame) -> pd.DataFrame:
    """Per optimizer and model: n (with a result), diverged, failed, at chance (finite
    but within CHANCE_MARGIN points of guessing: a run that learned nothing, which a
    diverged count alone hides), min/mean/median error (diverged at 100) and the
    fraction of runs within 4 points of the best (gap < 4, the paper's yardstick)."""
    rows = []
    for (opt, model), g in runs.groupby(["optimizer", "model"], sort=True):
        ok = finished(g)
        err = ok[ERR].to_numpy()
        chance = (ok["dataset"].map(chance_err) if "dataset" in ok else pd.Series(math.nan, ok.index)).to_numpy()
        rows.append({"optimizer": opt, "model": model, "n": len(err), "diverged": int(ok["diverged"].sum()),
                     "failed": len(g) - len(ok),
                     "at_chance": int((~ok["diverged"].to_numpy() & (err >= chance - CHANCE_MARGIN)).sum()),
                     "min": err.min() if len(err) else math.nan, "mean": err.mean() if len(err) else math.nan,
                     "median": np.median(err) if len(err) else math.nan,
                     "within_4": float(edf(err - best_err(ok), [4.0])[0]) if len(err) else math.nan})
    return pd.DataFrame(rows)


# -- best hyper-parameter by bootstrap -----------------------------------------------

def bootstrap_best(values, errors, n_boot: int = 2500, frac: float = 0.25, seed: int = 0,
                   replace: bool = True, log: bool = True) -> dict:
    """pycls's empirical bootstrap (`sweep/analysis.py: get_filters`): draw N_BOOT
    subsets of max(1, int(FRAC * n)) runs, take the VALUE (lr or wd) of the
    lowest-error run of each, and return the median (`best`) and the 2.5/97.5
    percentiles (`lo`, `hi`: the "good range"). pycls draws with replacement
    (`np.random.choice(n, k)`), hence the default. Percentiles are taken of log10
    VALUE when LOG (pycls transforms lr and wd by log10 first). Deterministic for a
    SEED; ties in error go to the first drawn run."""
    values, errors = np.asarray(values, dtype=float), np.asarray(errors, dtype=float)
    n = len(values)
    if n == 0 or n != len(errors):
        raise ValueError("bootstrap_best needs as many values as errors, at least one")
    k = max(1, int(n * frac))
    rng = np.random.default_rng(seed)
    if replace:
        idx = rng.integers(0, n, size=(n_boot, k))
    else:
        idx = np.argsort(rng.random((n_boot, n)), axis=1)[:, :k]
    winners = idx[np.arange(n_boot), np.argmin(errors[idx], axis=1)]
    picked = np.log10(values[winners]) if log else values[winners]
    lo, best, hi = np.percentile(picked, [2.5, 50, 97.5])
    if log:
        lo, best, hi = 10 ** lo, 10 ** best, 10 ** hi
    return {"lo": float(lo), "best": float(best), "hi": float(hi), "n": n, "n_sample": k}


def check_n_boot(n_boot: int) -> None:
    if n_boot < 1:
        raise UserError(f"--n-boot must be at least 1, got {n_boot}")


def hparam_bands(runs: pd.DataFrame, n_boot: int = 2500, seed: int = 0) -> pd.DataFrame:
    """Best value and good range of lr and wd per optimizer and model (runs with a
    result and a positive value; on a log scale); NaN where a draw would hold fewer
    than MIN_PER_DRAW runs."""
    check_n_boot(n_boot)
    rows = []
    for (opt, model), g in finished(runs).groupby(["optimizer", "model"], sort=True):
        for param in ("lr", "wd"):
            ok = g[np.isfinite(g[param]) & (g[param] > 0)]
            if ok.empty:
                continue
            band = bootstrap_best(ok[param], ok[choice_column(ok)], n_boot=n_boot, seed=seed)
            if band["n_sample"] < MIN_PER_DRAW:  # too few runs: the "best" would be noise
                band.update(lo=math.nan, best=math.nan, hi=math.nan)
            rows.append({"optimizer": opt, "model": model, "param": param, **band})
    return pd.DataFrame(rows, columns=["optimizer", "model", "param", "lo", "best", "hi", "n", "n_sample"])


# -- single runs --------------------------------------------------------------------------

def model_table(runs: pd.DataFrame, by=("model",)) -> pd.DataFrame:
    """Per group: n, diverged, failed, mean/min error (ERR) of the runs with a result."""
    by = [c for c in by if c in runs]
    rows = []
    for keys, g in runs.groupby(by, sort=True):
        ok = finished(g)
        keys = keys if isinstance(keys, tuple) else (keys,)
        rows.append({**dict(zip(by, keys)), "n": len(ok), "diverged": int(ok["diverged"].sum()),
                     "failed": len(g) - len(ok), "mean_err": ok[ERR].mean(), "min_err": ok[ERR].min()})
    return pd.DataFrame(rows)
