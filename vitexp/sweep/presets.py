"""Study presets: TOML files in experiments/, one per figure and scale.

A preset has three tables: [study] (kind, models, seeds and the kind's own
knobs), [train] (TrainConfig defaults for every trial) and optional [tuned.MODEL]
(lr/wd per optimizer, overriding the model zoo's tuned values) and
[ranges.MODEL_OR_FAMILY] (lr/wd sampling ranges of the stability study).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from vitexp.errors import UserError, unknown

KINDS = ("scale", "stability", "optimizer", "tune")


def experiments_dir() -> Path:
    """The presets folder: $VITEXP_EXPERIMENTS, else experiments/ beside the package."""
    return Path(os.environ.get("VITEXP_EXPERIMENTS", Path(__file__).resolve().parents[2] / "experiments"))


def list_presets(kind: str | None = None) -> list[str]:
    names = sorted(p.stem for p in experiments_dir().glob("*.toml"))
    return [n for n in names if kind is None or n.startswith(kind + "_")]


def find_preset(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix == ".toml" or p.exists():
        if not p.exists():
            raise UserError(f"preset file {p} does not exist; give a path to a .toml or a name from experiments/")
        return p
    p = experiments_dir() / f"{name_or_path}.toml"
    if not p.exists():
        raise unknown("preset", name_or_path, list_presets())
    return p


def load_preset(name_or_path: str) -> dict:
    path = find_preset(name_or_path)
    try:
        d = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"preset {path} is not valid TOML ({e}); fix the file") from None
    if d.get("study", {}).get("kind") not in KINDS:
        raise UserError(f"preset {path} needs [study] kind = one of {', '.join(KINDS)}")
    d.setdefault("train", {})
    d["study"].setdefault("preset", path.stem)
    return d


def default_preset(kind: str, dataset: str | None) -> str:
    """`<kind>_<dataset>` when such a preset exists, else `<kind>_shapes`."""
    if dataset:
        name = f"{kind}_{dataset.split(':')[0]}"
        if name in list_presets():
            return name
    return f"{kind}_shapes"


# -- a minimal TOML writer for the resolved study.toml (stdlib reads TOML, not writes) --
def _value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        if isinstance(v, float) and not math.isfinite(v):
            return {math.inf: "inf", -math.inf: "-inf"}.get(v, "nan")
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_key(k)} = {_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def _key(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() else _value(k)


def dumps_toml(d: dict) -> str:
    """Tables of scalars, lists and inline tables, nested tables one level deep."""
    lines = [f"{_key(k)} = {_value(v)}" for k, v in d.items() if not isinstance(v, dict) and v is not None]
    for name, table in d.items():
        if not isinstance(table, dict):
            continue
        scalars = {k: v for k, v in table.items() if not isinstance(v, dict) and v is not None}
        subs = {k: v for k, v in table.items() if isinstance(v, dict)}
        if scalars or not subs:
            lines += ["", f"[{_key(name)}]"] + [f"{_key(k)} = {_value(v)}" for k, v in scalars.items()]
        for sub, inner in subs.items():
            lines += ["", f"[{_key(name)}.{_key(sub)}]"] + [f"{_key(k)} = {_value(v)}" for k, v in inner.items()]
    return "\n".join(lines).lstrip() + "\n"
