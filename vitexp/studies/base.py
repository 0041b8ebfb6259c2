"""A study kind as one object: what a kind of study is, and the checks and samplers
every kind shares.

A `Study` turns a resolved preset (the spec: [study], [train], [tuned.MODEL],
[ranges.MODEL_OR_FAMILY]) into trial configs, and knows how to show its rows: its
figures, its report tables, its title, and which of its trials must have converged
for the study to count. The CLI, the sweep, the report and `launch` only ever talk to
this interface; each kind lives in one module of this package.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from vitexp import models as vmodels
from vitexp.config import OPTIMIZERS, TrainConfig, check_tuned, config_fields, tuned_hparams
from vitexp.errors import UserError, unknown

# [study] keys every kind understands
COMMON_KEYS = ("kind", "preset", "description", "models", "seeds")
# the stability study's default range around the tuned value (PAPERS.md section 4)
RANGE_BELOW, RANGE_ABOVE = 8.0, 4.0
MAX_SAMPLES = 100_000  # (lr, wd) samples per model: beyond this, a typo
MAX_LIST = 1_000  # values of one list knob (seeds, sizes, epochs, models): beyond this, a typo


@dataclasses.dataclass(frozen=True)
class Knob:
    """A [study] key of one kind, and the CLI option that overrides it."""

    name: str
    type: type  # int, float or str
    help: str
    many: bool = False  # a list: comma-separated on the CLI, a TOML array in the preset


Trial = Callable[..., TrainConfig]  # makes one trial: the base config with these fields


class Study:
    """The interface of a study kind (subclass it and `register` an instance)."""

    kind: str = ""
    command: str = ""  # the CLI command that runs it
    title: str = ""  # its report section
    help: str = ""  # one line for `--help`
    knobs: tuple[Knob, ...] = ()
    # TrainConfig fields each trial sets itself: the CLI offers no override for them
    sets: tuple[str, ...] = ("model", "seed", "subset_seed", "optimizer", "lr", "wd", "epochs", "fewshot")
    # [study] keys that, besides the kind and the data set, make two specs one study (one folder)
    identity: tuple[str, ...] = ()
    needs: tuple[str, ...] = ("model", "last_err")  # runs.csv columns its figures need
    plot_command: str | None = None  # the CLI command that draws its figures
    bootstrap: bool = False  # its figures and tables draw bootstrap samples (--n-boot, --seed)
    several: str = "several are concatenated into one figure set"  # what giving its plot command several folders does
    takes_teacher: bool = True  # its command offers --teacher (one trial that teaches every trial)

    def out_name(self, spec: dict) -> str:
        """The default study folder name under runs/."""
        return spec["study"]["preset"]

    def trials(self, spec: dict, base: TrainConfig, trial: Trial) -> list[TrainConfig]:
        """Every trial, in a fixed order (shards slice this order)."""
        raise NotImplementedError

    def figures(self, runs: pd.DataFrame, out: Path, n_boot: int = 2500, seed: int = 0) -> list[Path]:
        """Its figures (PNG, PDF and the plotted numbers as CSV) into OUT."""
        return []

    def tables(self, runs: pd.DataFrame, n_boot: int = 2500, seed: int = 0) -> list[tuple]:
        """Report blocks: ("h3", title) and ("table", DataFrame) pairs."""
        return []

    def captions(self, figure: Path) -> str:
        return figure.stem

    def must_converge(self, runs: pd.DataFrame) -> pd.DataFrame:
        """The trials whose convergence the study's claims rest on (default: all)."""
        return runs


def mean_std(diff: pd.Series) -> pd.Series:
    """Per model (the index's `model` level): signed mean ± std of DIFF over the seeds that have it."""
    agg = diff.dropna().groupby(level="model").agg(["mean", "std", "count"])
    return pd.Series([f"{m:+.2f}" if n == 1 else f"{m:+.2f} ± {s:.2f}" for m, s, n in
                      zip(agg["mean"], agg["std"], agg["count"])], index=agg.index)


def paired_table(diff: pd.Series, size: str) -> pd.DataFrame:
    """Paired differences (index model, SIZE, seed) as a table: a row per model, a column per
    size, cells mean ± std over the seeds both sides have."""
    from vitexp import plots

    sizes = sorted(set(diff.index.get_level_values(size)))
    wide = pd.DataFrame({f"n={n}": mean_std(diff.xs(n, level=size)) for n in sizes})
    return wide.reindex(plots.model_order(wide.index)).reset_index(names="model")


def seeds_phrase(n, std: bool = True) -> str:
    """What a table cell over seeds is, from the counts N of its cells: 'one seed', or
    'mean ± std over 3 seeds' ('mean over ...' without STD)."""
    lo, hi = int(min(n)), int(max(n))
    if hi == 1:
        return "one seed"
    return f"mean{' ± std' if std else ''} over {lo if lo == hi else f'{lo}–{hi}'} seeds"


# -- shared checks and samplers -------------------------------------------------------------

def ints(v, name: str) -> list[int]:
    """A list of integers from a [study] value (a number or a list of whole numbers)."""
    vals = [v] if isinstance(v, (int, float)) and not isinstance(v, bool) else v
    if not isinstance(vals, (list, tuple)) or any(isinstance(x, bool) or not isinstance(x, (int, float))
                                                  or x != int(x) for x in vals):
        raise UserError(f"--{name} takes whole numbers, got {v!r}; fix [study] {name} in the preset")
    if not vals:
        raise UserError(f"--{name} is empty; give at least one value (or set [study] {name} in the preset)")
    _check_length(vals, name)
    return [int(x) for x in vals]


def positive_floats(v, name: str) -> list[float]:
    """A list of positive numbers from a [study] value (a number or a list)."""
    vals = v if isinstance(v, (list, tuple)) else [v]
    try:
        out = [float(x) for x in vals if not isinstance(x, bool)]
    except (TypeError, ValueError):
        out = []
    if not out or len(out) != len(vals) or not all(math.isfinite(x) and x > 0 for x in out):
        raise UserError(f"--{name.replace('_', '-')} takes positive numbers, got {v!r}; "
                        f"fix [study] {name} in the preset")
    _check_length(out, name)
    return out


def _check_length(vals, name: str) -> None:
    if len(vals) > MAX_LIST:
        raise UserError(f"--{name} has {len(vals):,} values, at most {MAX_LIST:,} make sense; "
                        f"fix [study] {name} in the preset")


def int_knob(s: dict, key: str, default, low: int = 1, high: int = 10**9) -> int:
    """An integer knob of [study] (from the preset or --KEY), in [LOW, HIGH]."""
    v = s.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v):
        raise UserError(f"--{key.replace('_', '-')} takes an integer, got {v!r}; fix [study] {key} in the preset")
    if not low <= v <= high:
        raise UserError(f"--{key.replace('_', '-')} must be in [{low}, {high}], got {int(v)}")
    return int(v)


def optimizer_list(s: dict) -> list[str]:
    opts = s.get("optimizers", list(OPTIMIZERS))
    if isinstance(opts, str) or not isinstance(opts, (list, tuple)) or not opts:
        raise UserError(f"--optimizers takes a comma-separated list of {', '.join(OPTIMIZERS)}, got {opts!r}")
    for o in opts:
        if o not in OPTIMIZERS:
            raise unknown("optimizer", str(o), OPTIMIZERS)
    return list(opts)


def tuned(spec: dict, model: str, optimizer: str) -> tuple[float, float]:
    """(lr, wd) of a model: the preset's [tuned.MODEL] table, else the model zoo's."""
    t = spec.get("tuned", {}).get(model, {}).get(optimizer)
    if t is not None:
        return float(t[0]), float(t[1])
    return tuned_hparams(vmodels.get_spec(model, spec.get("models")), optimizer)


def sampling_range(spec: dict, model: str, optimizer: str,
                   around: tuple[float, float] = (RANGE_BELOW, RANGE_ABOVE)) -> dict[str, tuple[float, float]]:
    """{'lr': (lo, hi), 'wd': (lo, hi)}: [ranges.MODEL] or [ranges.FAMILY] of the
    preset (the paper's per-family ranges), else tuned / AROUND[0] .. tuned x AROUND[1]."""
    ranges = spec.get("ranges", {})
    name = model if model in ranges else vmodels.get_spec(model, spec.get("models")).family
    table = ranges.get(name, {})
    bad = sorted(set(table) - set(OPTIMIZERS)) if isinstance(table, dict) else []
    if bad:
        raise unknown(f"optimizer in [ranges.{name}]", bad[0], OPTIMIZERS)
    r = table.get(optimizer)
    if r is None:
        lr, wd = tuned(spec, model, optimizer)
        below, above = around
        r = {"lr": [lr / below, lr * above], "wd": [wd / below, wd * above]}
    return range_pair(r, f"[ranges.{model}.{optimizer}]")


def range_pair(r, where: str) -> dict[str, tuple[float, float]]:
    """{'lr': (lo, hi), 'wd': (lo, hi)} of one ranges table, checked: two finite numbers
    each, 0 < low < high (log-uniform sampling needs both ends positive and apart)."""
    if not isinstance(r, dict):
        raise UserError(f"{where} must be a table like {{lr = [LOW, HIGH], wd = [LOW, HIGH]}}, got {r!r}")
    bad = sorted(set(r) - {"lr", "wd"})
    if bad:
        raise unknown(f"key in {where}", bad[0], ["lr", "wd"])
    out = {}
    for name in ("lr", "wd"):
        v = r.get(name)
        try:
            lo, hi = (float(x) for x in v)
        except (TypeError, ValueError):
            raise UserError(f"{where} {name} must be [LOW, HIGH] with two numbers, got {v!r}; "
                            f"e.g. {name} = [1e-4, 1e-2]") from None
        if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo < hi):
            what = ("not finite" if not (math.isfinite(lo) and math.isfinite(hi)) else "inverted" if lo > hi > 0
                    else "empty" if lo == hi else "not positive")
            raise UserError(f"{where} {name} range [{lo:g}, {hi:g}] is {what}; "
                            f"give {name} = [LOW, HIGH] with 0 < LOW < HIGH")
        out[name] = (lo, hi)
    return out


def log_uniform(n: int, seed: int, dims: int = 2) -> np.ndarray:
    """n points in [0,1)^dims from a seeded PCG64: the same on every machine and
    numpy version (the stream is part of numpy's stability promise)."""
    return np.random.Generator(np.random.PCG64(seed)).random((n, dims))


def scale(u: float, lo: float, hi: float) -> float:
    """u in [0, 1) mapped log-uniformly onto [lo, hi)."""
    return float(math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo))))


def lr_wd_samples(spec: dict, models, optimizers, n: int, sample_seed: int, seeds: list[int],
                  around: tuple[float, float], trial: Trial, epochs: int) -> list[TrainConfig]:
    """Per model and optimizer, N log-uniform (lr, wd) pairs from its sampling range (the
    same N points of [0,1)^2 for every model), each trained with every seed."""
    if n > MAX_SAMPLES:
        raise UserError(f"--samples must be at most {MAX_SAMPLES}, got {n}")
    u = log_uniform(n, sample_seed)
    out = []
    for model in models:
        for opt in optimizers:
            r = sampling_range(spec, model, opt, around)
            for i in range(n):
                lr, wd = scale(u[i, 0], *r["lr"]), scale(u[i, 1], *r["wd"])
                for seed in seeds:
                    out.append(trial(model=model, optimizer=opt, lr=lr, wd=wd, epochs=epochs, seed=seed,
                                     extra={"sample": i, "lr_lo": r["lr"][0], "lr_hi": r["lr"][1],
                                            "wd_lo": r["wd"][0], "wd_hi": r["wd"][1]}))
    return out


def check_tables(spec: dict) -> None:
    """The preset's [tuned.MODEL] and [ranges.MODEL_OR_FAMILY] tables: known names,
    known optimizers, sensible numbers (a typo must not silently fall back to defaults)."""
    names = set(vmodels.list_models()) | set(spec.get("models", {}))
    for table in ("tuned", "ranges"):
        allowed = names | (set(vmodels.FAMILIES) if table == "ranges" else set())
        t = spec.get(table, {})
        if not isinstance(t, dict):
            raise UserError(f"[{table}] of the preset must hold one table per model, got {t!r}")
        for model, per_opt in t.items():
            if model not in allowed and not model.startswith("timm:"):
                raise unknown(f"[{table}] model{' or family' if table == 'ranges' else ''}", model, sorted(allowed))
            if table == "tuned":
                check_tuned(model, per_opt)
                continue
            if not isinstance(per_opt, dict):
                raise UserError(f"[{table}.{model}] must hold one entry per optimizer, got {per_opt!r}")
            for opt, v in per_opt.items():
                if opt not in OPTIMIZERS:
                    raise unknown(f"optimizer in [{table}.{model}]", opt, OPTIMIZERS)
                range_pair(v, f"[ranges.{model}.{opt}]")


def check_spec(spec: dict, study: Study) -> tuple[dict, TrainConfig]:
    """([study], base config) of a spec, every key and table checked; the base config takes
    the study's first model (each trial sets its own; model-dependent checks run per trial)."""
    s = spec["study"]
    allowed = set(COMMON_KEYS) | {k.name for k in study.knobs}
    bad = sorted(set(s) - allowed)
    if bad:
        raise unknown(f"[study] key of a {study.kind} study", bad[0], sorted(allowed))
    bad = sorted(set(spec["train"]) - set(config_fields()))
    if bad:
        raise unknown("[train] field", bad[0], config_fields())
    if "model_def" in spec["train"]:
        raise UserError("[train] model_def is set from the preset's [models.NAME] tables; define the model "
                        "there and list its NAME in [study] models")
    models = s.get("models")
    if isinstance(models, str) or not isinstance(models, (list, tuple)):
        raise UserError(f"[study] models must be a list of model names, got {models!r}")
    if not models:
        raise UserError("the study has no models; give --models or set [study] models in the preset")
    _check_length(models, "models")
    from vitexp.sweep.presets import preset_models

    defined = preset_models(spec)
    for m in models:
        vmodels.get_spec(str(m), defined)  # unknown model: one line with the closest names
    check_tables(spec)
    first = str(models[0])
    return s, TrainConfig(**{**spec["train"], "model": first, "model_def": defined.get(first, {})}).validate()
