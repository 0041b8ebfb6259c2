"""Study presets: TOML files in experiments/, one per figure and scale.

A preset has the tables [study] (kind, models, seeds and the kind's own knobs),
[train] (TrainConfig defaults for every trial) and optional [models.NAME] (a model
vitexp does not ship: timm's or vitexp's own builders with other keywords; see
`registry.define`), [tuned.MODEL] (lr/wd per optimizer, overriding the model zoo's
tuned values) and [ranges.MODEL_OR_FAMILY] (lr/wd sampling ranges of the stability
study and the tuning search). Any other table is a typo and refused with the closest name.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from vitexp.errors import UserError, unknown
from vitexp.tomlfile import read_toml

TABLES = ("study", "train", "models", "tuned", "ranges")
CLAIMS_FILE = "claims.toml"  # in experiments/: the claims file (vitexp/claims.py), not a preset


def experiments_dir() -> Path:
    """The presets folder: $VITEXP_EXPERIMENTS, else experiments/ beside the package."""
    return Path(os.environ.get("VITEXP_EXPERIMENTS", Path(__file__).resolve().parents[2] / "experiments"))


def list_presets(kind: str | None = None) -> list[str]:
    names = sorted(p.stem for p in experiments_dir().glob("*.toml") if p.name != CLAIMS_FILE)
    return [n for n in names if kind is None or n.startswith(kind + "_")]


def looks_like_path(name_or_path: str) -> bool:
    """A .toml file or a path with a folder in it; a bare name is a preset's, whatever the
    working directory holds (a copied results folder may share a preset's name)."""
    return name_or_path.endswith(".toml") or any(sep in name_or_path for sep in ("/", os.sep))


def find_preset(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if looks_like_path(name_or_path):
        if p.is_dir():
            raise UserError(f"preset {p} is a folder; give a .toml file or a preset name from experiments/")
        if not p.exists():
            raise UserError(f"preset file {p} does not exist; give a path to a .toml or a name from experiments/")
        return p
    p = experiments_dir() / f"{name_or_path}.toml"
    if not p.exists() or p.name == CLAIMS_FILE:
        if not list_presets():
            raise UserError(f"unknown preset '{name_or_path}': {experiments_dir()} holds no presets "
                            f"(set VITEXP_EXPERIMENTS to vitexp's experiments/ folder, or give a .toml path)")
        raise unknown("preset", name_or_path, list_presets())
    return p


def read_preset(name_or_path: str) -> tuple[Path, dict]:
    """(path, tables) of a preset, checked for shape (known tables), its [models.NAME] defined
    in this process so that every command given the preset can name them."""
    path = find_preset(name_or_path)
    d = read_toml(path, "preset")
    for name, table in d.items():
        if name not in TABLES:
            raise unknown(f"table [{name}] in preset {path}", name, TABLES)
        if not isinstance(table, dict):
            raise UserError(f"preset {path}: [{name}] must be a table, got {table!r}")
    preset_models(d)
    return path, d


def preset_models(spec: dict) -> dict:
    """NAME -> table of a spec's [models.NAME] tables, each checked (it builds a spec) with its
    [tuned.NAME] values; whoever names one of these models passes this mapping on."""
    from vitexp.config import check_tuned
    from vitexp.models.registry import define

    tables = spec.get("models", {})
    tuned = spec.get("tuned", {})
    for name, table in tables.items():
        check_tuned(name, tuned.get(name, {}) if isinstance(tuned, dict) else {})
        define(name, table)
    return tables


def load_preset(name_or_path: str, kinds) -> dict:
    """The preset's tables, checked for shape: known tables, a [study] table naming one of KINDS."""
    path, d = read_preset(name_or_path)
    if d.get("study", {}).get("kind") not in kinds:
        raise UserError(f"preset {path} needs [study] kind = one of {', '.join(kinds)}")
    d.setdefault("train", {})
    d["study"].setdefault("preset", path.stem)
    name = d["study"]["preset"]
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise UserError(f"preset {path}: [study] preset must be a plain name (letters, digits, '.', '_', '-'; "
                        f"it names the default folder runs/NAME), got {name!r}")
    return d


def default_preset(kind: str, dataset: str | None, cpu: bool = False) -> str:
    """`<kind>_<dataset>_cpu` on a CPU and `<kind>_<dataset>` elsewhere, when such a preset
    exists (the CPU one sized for hours on two cores, the other for a GPU), else `<kind>_shapes`."""
    if dataset:
        name = f"{kind}_{dataset.split(':')[0]}"
        for pick in ([f"{name}_cpu"] if cpu else []) + [name]:
            if pick in list_presets():
                return pick
    return f"{kind}_shapes"


def preset_device(name: str, spec: dict) -> str:
    """What a preset is sized for: its [train] device, else cpu for the *_cpu and shapes presets."""
    device = spec.get("train", {}).get("device")
    if device and device != "auto":
        return str(device)
    dataset = str(spec.get("train", {}).get("dataset", "shapes")).split(":")[0]
    return "cpu" if "_cpu" in name or dataset == "shapes" else "gpu"


def preset_model(fields: dict, preset: str | None) -> dict:
    """FIELDS with the preset's definition of the model ([models.NAME]) and its [tuned.NAME]
    values for the optimizer filling --lr and --wd where not given."""
    if preset is None:
        return fields
    _, tables = read_preset(preset)
    out = {**fields, "model_def": tables.get("models", {}).get(fields["model"], {})}
    tuned = tables.get("tuned", {}).get(fields["model"], {}).get(fields.get("optimizer") or "adamw")
    if tuned is not None:
        out.update({k: v for k, v in zip(("lr", "wd"), tuned) if out.get(k) is None})
        out["extra"] = {**out.get("extra", {}), "hparams_from": f"preset {preset}"}
    return out
