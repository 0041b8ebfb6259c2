"""The three studies as data: a resolved preset in, a list of TrainConfigs out.

- scale (ViT paper): models x nested class-balanced training-set sizes x seeds,
  one set of hyper-parameters, a fixed budget of optimisation steps (small
  subsets see more epochs, with a floor); error = best held-out error (early stopping).
- stability (EC lr/wd): per model, N (lr, wd) pairs drawn log-uniformly from
  the model's range (default: tuned / 8 .. tuned x 4), one optimizer, fixed epochs.
- optimizer (EC optimizer and training length): models x {adamw, sgd} x
  training lengths x seeds at each model's tuned lr/wd.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np

from vitexp import models as vmodels
from vitexp.config import OPTIMIZERS, TrainConfig, config_fields
from vitexp.errors import UserError, unknown
from vitexp.sweep.presets import KINDS

# the stability study's default range around the tuned value (PAPERS.md section 4)
RANGE_BELOW, RANGE_ABOVE = 8.0, 4.0
# the study-level knobs each kind understands (anything else in [study] is an error)
STUDY_KEYS = {
    "common": {"kind", "preset", "description", "models", "seeds"},
    "scale": {"sizes", "steps", "min_epochs", "epochs", "fewshot", "evals"},
    "stability": {"optimizer", "samples", "sample_seed", "epochs"},
    "optimizer": {"optimizers", "epochs"},
    "tune": {"optimizers", "samples", "sample_seed", "epochs"},
}
# the tuning search's default range around the model's current tuned value (wide: a search)
TUNE_BELOW, TUNE_ABOVE = 16.0, 16.0


def apply_overrides(preset: dict, study: dict, train: dict) -> dict:
    """A copy of the preset with command-line overrides: study-level knobs
    (models, seeds, sizes, ...) into [study], TrainConfig fields into [train]."""
    d = copy.deepcopy(preset)
    d["study"].update({k: v for k, v in study.items() if v is not None})
    d["train"].update({k: v for k, v in train.items() if v is not None})
    return d


def tuned(spec: dict, model: str, optimizer: str) -> tuple[float, float]:
    """(lr, wd) of a model: the preset's [tuned.MODEL] table, else the model zoo's."""
    t = spec.get("tuned", {}).get(model, {}).get(optimizer)
    if t is not None:
        return float(t[0]), float(t[1])
    return vmodels.tuned_hparams(model, optimizer)


def sampling_range(spec: dict, model: str, optimizer: str,
                   around: tuple[float, float] = (RANGE_BELOW, RANGE_ABOVE)) -> dict[str, tuple[float, float]]:
    """{'lr': (lo, hi), 'wd': (lo, hi)}: [ranges.MODEL] or [ranges.FAMILY] of the
    preset (the paper's per-family ranges), else tuned / AROUND[0] .. tuned x AROUND[1]."""
    ranges = spec.get("ranges", {})
    r = ranges.get(model, ranges.get(vmodels.get_spec(model).family, {})).get(optimizer)
    if r is None:
        lr, wd = tuned(spec, model, optimizer)
        below, above = around
        r = {"lr": [lr / below, lr * above], "wd": [wd / below, wd * above]}
    return _range_pair(r, f"[ranges.{model}.{optimizer}]")


def _range_pair(r, where: str) -> dict[str, tuple[float, float]]:
    """{'lr': (lo, hi), 'wd': (lo, hi)} of one ranges table, checked: two numbers each,
    0 < low < high (log-uniform sampling needs both ends positive and apart)."""
    if not isinstance(r, dict):
        raise UserError(f"{where} must be a table like {{lr = [LOW, HIGH], wd = [LOW, HIGH]}}, got {r!r}")
    out = {}
    for name in ("lr", "wd"):
        v = r.get(name)
        try:
            lo, hi = (float(x) for x in v)
        except (TypeError, ValueError):
            raise UserError(f"{where} {name} must be [LOW, HIGH] with two numbers, got {v!r}; "
                            f"e.g. {name} = [1e-4, 1e-2]") from None
        if not 0 < lo < hi:
            what = "inverted" if lo > hi > 0 else "empty" if lo == hi else "not positive"
            raise UserError(f"{where} {name} range [{lo:g}, {hi:g}] is {what}; "
                            f"give {name} = [LOW, HIGH] with 0 < LOW < HIGH")
        out[name] = (lo, hi)
    return out


def log_uniform(n: int, seed: int, dims: int = 2) -> np.ndarray:
    """n points in [0,1)^dims from a seeded PCG64: the same on every machine and
    numpy version (the stream is part of numpy's stability promise)."""
    return np.random.Generator(np.random.PCG64(seed)).random((n, dims))


def _scale(u: float, lo: float, hi: float) -> float:
    return float(math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo))))


def _ints(v, name: str) -> list[int]:
    try:
        vals = [v] if isinstance(v, (int, float)) else list(v)
        out = [int(x) for x in vals]
    except (TypeError, ValueError):
        raise UserError(f"--{name} takes integers, got {v!r}") from None
    if not out:
        raise UserError(f"--{name} is empty; give at least one value (or set [study] {name} in the preset)")
    return out


def _int(s: dict, key: str, default) -> int:
    """An integer knob of [study] (from the preset or --KEY)."""
    v = s.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v):
        raise UserError(f"--{key.replace('_', '-')} takes an integer, got {v!r}; fix [study] {key} in the preset")
    return int(v)


def _check_tables(spec: dict) -> None:
    """The preset's [tuned.MODEL] and [ranges.MODEL_OR_FAMILY] tables: known names,
    known optimizers, sensible numbers (a typo must not silently fall back to defaults)."""
    names = set(vmodels.list_models())
    for table in ("tuned", "ranges"):
        allowed = names | (set(vmodels.FAMILIES) if table == "ranges" else set())
        t = spec.get(table, {})
        if not isinstance(t, dict):
            raise UserError(f"[{table}] of the preset must hold one table per model, got {t!r}")
        for model, per_opt in t.items():
            if model not in allowed:
                raise unknown(f"[{table}] model{' or family' if table == 'ranges' else ''}", model, sorted(allowed))
            if not isinstance(per_opt, dict):
                raise UserError(f"[{table}.{model}] must hold one entry per optimizer, got {per_opt!r}")
            for opt, v in per_opt.items():
                if opt not in OPTIMIZERS:
                    raise unknown(f"optimizer in [{table}.{model}]", opt, OPTIMIZERS)
                where = f"[{table}.{model}] {opt}" if table == "tuned" else f"[ranges.{model}.{opt}]"
                if table == "ranges":
                    _range_pair(v, where)
                    continue
                try:
                    lr, wd = (float(x) for x in v)
                except (TypeError, ValueError):
                    raise UserError(f"{where} must be [LR, WD], got {v!r}; e.g. {opt} = [1e-3, 0.05]") from None
                if not (lr > 0 and wd >= 0):
                    raise UserError(f"{where} = [{lr:g}, {wd:g}]: lr must be > 0 and wd >= 0")


def _check(spec: dict) -> tuple[dict, TrainConfig]:
    s, kind = spec["study"], spec["study"].get("kind")
    if kind not in KINDS:
        raise unknown("study kind", str(kind), KINDS)
    bad = sorted(set(s) - STUDY_KEYS["common"] - STUDY_KEYS[kind])
    if bad:
        raise UserError(f"[study] of a {kind} study has unknown key '{bad[0]}'; "
                        f"allowed: {', '.join(sorted(STUDY_KEYS['common'] | STUDY_KEYS[kind]))}")
    bad = sorted(set(spec["train"]) - set(config_fields()))
    if bad:
        raise unknown("[train] field", bad[0], config_fields())
    models = s.get("models")
    if isinstance(models, str) or not isinstance(models, (list, tuple)):
        raise UserError(f"[study] models must be a list of model names, got {models!r}")
    if not models:
        raise UserError("the study has no models; give --models or set [study] models in the preset")
    for m in models:
        vmodels.get_spec(str(m))  # unknown model: one line with the closest names
    _check_tables(spec)
    # the base config takes the study's first model: every trial sets its own, and
    # model-dependent checks (patch vs image size) then run per trial
    base = TrainConfig(**{**spec["train"], "model": str(models[0])}).validate()
    return s, base


def _optimizer_list(s: dict) -> list[str]:
    opts = s.get("optimizers", list(OPTIMIZERS))
    if isinstance(opts, str) or not opts:
        raise UserError(f"--optimizers takes a comma-separated list of {', '.join(OPTIMIZERS)}, got {opts!r}")
    for o in opts:
        if o not in OPTIMIZERS:
            raise unknown("optimizer", o, OPTIMIZERS)
    return list(opts)


def trials(spec: dict) -> list[TrainConfig]:
    """Every trial of the study, in a fixed order (shards slice this order)."""
    s, base = _check(spec)
    kind = s["kind"]
    seeds = _ints(s.get("seeds", [0]), "seeds")
    out = []

    def trial(**kw) -> TrainConfig:
        extra = {"study": kind, "preset": s.get("preset", ""), **kw.pop("extra", {})}
        return dataclasses.replace(base, extra=extra, **kw).validate()

    if kind == "scale":
        if not s.get("sizes"):
            raise UserError("the scale study has no sizes; give --sizes 500,2000,... or set [study] sizes")
        sizes = _ints(s["sizes"], "sizes")
        if any(x <= 0 for x in sizes):
            raise UserError(f"--sizes must be positive, got {sizes}")
        steps, floor = _int(s, "steps", 0), _int(s, "min_epochs", 1)
        fixed_epochs = _int(s, "epochs", 0) if s.get("epochs") is not None else None
        if steps < 0:
            raise UserError(f"--steps must be >= 0, got {steps}")
        if floor <= 0 or (fixed_epochs is not None and fixed_epochs <= 0):
            raise UserError(f"--min-epochs and --epochs must be positive, got {floor} and {fixed_epochs}")
        for model in s["models"]:
            lr, wd = tuned(spec, model, base.optimizer)
            for seed in seeds:
                for n in sizes:
                    epochs = int(fixed_epochs) if fixed_epochs else max(floor, math.ceil(steps * base.batch_size / n))
                    # evaluations per trial stay ~`evals` however many epochs a small subset gets
                    every = max(1, epochs // int(s.get("evals", 10)))
                    out.append(trial(model=model, n_train=n, seed=seed, subset_seed=seed, epochs=epochs,
                                     eval_every=every,
                                     lr=base.lr or lr, wd=base.wd if base.wd is not None else wd,
                                     fewshot=list(s.get("fewshot", base.fewshot)),
                                     extra={"size": n, "budget_steps": steps}))
    elif kind == "stability":
        opt = s.get("optimizer", "adamw")
        if opt not in OPTIMIZERS:
            raise unknown("optimizer", opt, OPTIMIZERS)
        n = _int(s, "samples", 64)
        if n <= 0:
            raise UserError(f"--samples must be positive, got {n}")
        u = log_uniform(n, _int(s, "sample_seed", 0))
        epochs = _int(s, "epochs", base.epochs)
        for model in s["models"]:
            r = sampling_range(spec, model, opt)
            for i in range(n):
                lr, wd = _scale(u[i, 0], *r["lr"]), _scale(u[i, 1], *r["wd"])
                for seed in seeds:
                    out.append(trial(model=model, optimizer=opt, lr=lr, wd=wd, epochs=epochs, seed=seed,
                                     extra={"sample": i, "lr_lo": r["lr"][0], "lr_hi": r["lr"][1],
                                            "wd_lo": r["wd"][0], "wd_hi": r["wd"][1]}))
    elif kind == "tune":
        n = _int(s, "samples", 16)
        if n <= 0:
            raise UserError(f"--samples must be positive, got {n}")
        u = log_uniform(n, _int(s, "sample_seed", 0))
        epochs = _int(s, "epochs", base.epochs)
        for model in s["models"]:
            for opt in _optimizer_list(s):
                r = sampling_range(spec, model, opt, (TUNE_BELOW, TUNE_ABOVE))
                for i in range(n):
                    lr, wd = _scale(u[i, 0], *r["lr"]), _scale(u[i, 1], *r["wd"])
                    for seed in seeds:
                        out.append(trial(model=model, optimizer=opt, lr=lr, wd=wd, epochs=epochs, seed=seed,
                                         extra={"sample": i, "lr_lo": r["lr"][0], "lr_hi": r["lr"][1],
                                                "wd_lo": r["wd"][0], "wd_hi": r["wd"][1]}))
    else:
        opts = _optimizer_list(s)
        lengths = _ints(s.get("epochs", [base.epochs]), "epochs")
        if any(e <= 0 for e in lengths):
            raise UserError(f"--epochs must be positive, got {lengths}")
        for model in s["models"]:
            for o in opts:
                lr, wd = tuned(spec, model, o)
                for e in lengths:
                    for seed in seeds:
                        out.append(trial(model=model, optimizer=o, lr=lr, wd=wd, epochs=e, seed=seed))
    return out
