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
    "scale": {"sizes", "steps", "min_epochs", "epochs", "fewshot"},
    "stability": {"optimizer", "samples", "sample_seed", "epochs"},
    "optimizer": {"optimizers", "epochs"},
}


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


def sampling_range(spec: dict, model: str, optimizer: str) -> dict[str, tuple[float, float]]:
    """{'lr': (lo, hi), 'wd': (lo, hi)}: [ranges.MODEL] or [ranges.FAMILY] of the
    preset (the paper's per-family ranges), else tuned / 8 .. tuned x 4."""
    ranges = spec.get("ranges", {})
    r = ranges.get(model, ranges.get(vmodels.get_spec(model).family, {})).get(optimizer)
    if r is None:
        lr, wd = tuned(spec, model, optimizer)
        r = {"lr": [lr / RANGE_BELOW, lr * RANGE_ABOVE], "wd": [wd / RANGE_BELOW, wd * RANGE_ABOVE]}
    out = {}
    for name in ("lr", "wd"):
        lo, hi = (float(v) for v in r[name])
        if not 0 < lo < hi:
            raise UserError(f"{name} range of {model} ({optimizer}) is [{lo}, {hi}]; it must be 0 < low < high")
        out[name] = (lo, hi)
    return out


def log_uniform(n: int, seed: int, dims: int = 2) -> np.ndarray:
    """n points in [0,1)^dims from a seeded PCG64: the same on every machine and
    numpy version (the stream is part of numpy's stability promise)."""
    return np.random.Generator(np.random.PCG64(seed)).random((n, dims))


def _scale(u: float, lo: float, hi: float) -> float:
    return float(math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo))))


def _ints(v, name: str) -> list[int]:
    vals = [v] if isinstance(v, (int, float)) else list(v)
    try:
        return [int(x) for x in vals]
    except (TypeError, ValueError):
        raise UserError(f"--{name} takes integers, got {v}") from None


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
    if not s.get("models"):
        raise UserError("the study has no models; give --models or set [study] models in the preset")
    for m in s["models"]:
        vmodels.get_spec(m)  # unknown model: one line with the closest names
    base = TrainConfig(**spec["train"]).validate()
    return s, base


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
        sizes = list(s.get("sizes", []))
        if not sizes:
            raise UserError("the scale study has no sizes; give --sizes 500,2000,... or set [study] sizes")
        if any(float(x) <= 0 for x in sizes):
            raise UserError(f"--sizes must be positive, got {sizes}")
        steps, floor = int(s.get("steps", 0)), int(s.get("min_epochs", 1))
        fixed_epochs = s.get("epochs")
        for model in s["models"]:
            lr, wd = tuned(spec, model, base.optimizer)
            for seed in seeds:
                for size in sizes:
                    n = int(size)
                    epochs = int(fixed_epochs) if fixed_epochs else max(floor, math.ceil(steps * base.batch_size / n))
                    out.append(trial(model=model, n_train=n, seed=seed, subset_seed=seed, epochs=epochs,
                                     lr=base.lr or lr, wd=base.wd if base.wd is not None else wd,
                                     fewshot=list(s.get("fewshot", base.fewshot)),
                                     extra={"size": n, "budget_steps": steps}))
    elif kind == "stability":
        opt = s.get("optimizer", "adamw")
        if opt not in OPTIMIZERS:
            raise unknown("optimizer", opt, OPTIMIZERS)
        n = int(s.get("samples", 64))
        if n <= 0:
            raise UserError(f"--samples must be positive, got {n}")
        u = log_uniform(n, int(s.get("sample_seed", 0)))
        epochs = int(s.get("epochs", base.epochs))
        for model in s["models"]:
            r = sampling_range(spec, model, opt)
            for i in range(n):
                lr, wd = _scale(u[i, 0], *r["lr"]), _scale(u[i, 1], *r["wd"])
                for seed in seeds:
                    out.append(trial(model=model, optimizer=opt, lr=lr, wd=wd, epochs=epochs, seed=seed,
                                     extra={"sample": i, "lr_lo": r["lr"][0], "lr_hi": r["lr"][1],
                                            "wd_lo": r["wd"][0], "wd_hi": r["wd"][1]}))
    else:
        opts = s.get("optimizers", list(OPTIMIZERS))
        for o in opts:
            if o not in OPTIMIZERS:
                raise unknown("optimizer", o, OPTIMIZERS)
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
