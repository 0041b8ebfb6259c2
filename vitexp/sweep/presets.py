"""Study presets: TOML files in experiments/, one per figure and scale.

A preset has the tables [study] (kind, models, seeds and the kind's own knobs),
[train] (TrainConfig defaults for every trial) and optional [tuned.MODEL] (lr/wd per
optimizer, overriding the model zoo's tuned values) and [ranges.MODEL_OR_FAMILY]
(lr/wd sampling ranges of the stability study and the tuning search). Any other table
is a typo and refused with the closest name.
"""

from __future__ import annotations

import os
from pathlib import Path

from vitexp import tomlfile
from vitexp.errors import UserError, unknown

TABLES = ("study", "train", "tuned", "ranges")


def experiments_dir() -> Path:
    """The presets folder: $VITEXP_EXPERIMENTS, else experiments/ beside the package."""
    return Path(os.environ.get("VITEXP_EXPERIMENTS", Path(__file__).resolve().parents[2] / "experiments"))


def list_presets(kind: str | None = None) -> list[str]:
    names = sorted(p.stem for p in experiments_dir().glob("*.toml"))
    return [n for n in names if kind is None or n.startswith(kind + "_")]


def find_preset(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix == ".toml" or p.exists():
        if p.is_dir():
            raise UserError(f"preset {p} is a folder; give a .toml file or a preset name from experiments/")
        if not p.exists():
            raise UserError(f"preset file {p} does not exist; give a path to a .toml or a name from experiments/")
        return p
    p = experiments_dir() / f"{name_or_path}.toml"
    if not p.exists():
        raise unknown("preset", name_or_path, list_presets())
    return p


def read_toml(path: Path, what: str) -> dict:
    """A TOML file as a dict, or one line saying why it cannot be read."""
    try:
        return tomlfile.loads(path.read_text(encoding="utf-8"))
    except tomlfile.TOMLDecodeError as e:
        raise UserError(f"{what} {path} is not valid TOML ({' '.join(str(e).split())}); fix the file") from None
    except UnicodeDecodeError:
        raise UserError(f"{what} {path} is not UTF-8 text; save it as UTF-8") from None
    except OSError as e:
        raise UserError(f"cannot read {what} {path} ({e.strerror}); check the path") from None


def load_preset(name_or_path: str, kinds) -> dict:
    """The preset's tables, checked for shape: known tables, a [study] table naming one of KINDS."""
    path = find_preset(name_or_path)
    d = read_toml(path, "preset")
    for name, table in d.items():
        if name not in TABLES:
            raise unknown(f"table [{name}] in preset {path}", name, TABLES)
        if not isinstance(table, dict):
            raise UserError(f"preset {path}: [{name}] must be a table, got {table!r}")
    if d.get("study", {}).get("kind") not in kinds:
        raise UserError(f"preset {path} needs [study] kind = one of {', '.join(kinds)}")
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
