"""Merge study folders (shards run apart, on machines without a shared file system)
into one: every trial once, an ok result preferred over a failed one."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd

from vitexp.errors import UserError
from vitexp.fileio import atomic_write, tmp_path
from vitexp.store import TrialStore
from vitexp.sweep.execute import runs_table
from vitexp.sweep.plan import check_folder, identity
from vitexp.sweep.presets import read_toml


def _specs(srcs: list[Path]) -> dict[Path, dict]:
    """The study.toml of each source folder that has one, checked to be one study."""
    specs = {f: read_toml(f / "study.toml", "study file") for f in srcs if (f / "study.toml").exists()}
    idents = {f: identity(s) for f, s in specs.items()}
    kinds = {i["kind"] for i in idents.values()}
    if len(kinds) > 1:
        raise UserError(f"cannot merge studies of different kinds ({', '.join(sorted(map(str, kinds)))}); "
                        f"collect each kind into its own --out")
    if len({tuple(sorted(i.items())) for i in idents.values()}) > 1:
        desc = "; ".join(f"{f}: {', '.join(f'{k} {v}' for k, v in i.items())}" for f, i in idents.items())
        raise UserError(f"cannot merge different studies ({desc}); collect each into its own --out")
    return specs


def collect(folders: list[str | Path], out: str | Path) -> pd.DataFrame:
    """Merge FOLDERS into OUT (which may be one of them); returns the merged runs table."""
    out, srcs = Path(out), [Path(f) for f in folders]
    for f in srcs:
        if not (f / "trials").is_dir():
            raise UserError(f"{f} is not a study folder (no trials/); give folders written by a study --out")
    specs = _specs(srcs)
    if specs:
        check_folder(out, next(iter(specs.values())))
    store = TrialStore(out)
    have = store.finished()
    for f in srcs:
        if f.resolve() == out.resolve():
            continue
        theirs = TrialStore(f, create=False)
        for key, row in theirs.finished().items():
            mine = have.get(key)
            if mine is not None and (mine.get("status") == "ok" or row.get("status") != "ok"):
                continue
            hist = f / "trials" / f"{key}.history.csv"
            if hist.exists():  # the history first: the json is the commit point
                tmp = tmp_path(out / "trials" / hist.name)
                shutil.copyfile(hist, tmp)
                tmp.replace(out / "trials" / hist.name)
            atomic_write(out / "trials" / f"{key}.json", theirs.trial_path(key).read_bytes())
            have[key] = row
        if not (out / "study.toml").exists() and (f / "study.toml").exists():
            atomic_write(out / "study.toml", (f / "study.toml").read_bytes())
    store.rebuild()
    return runs_table(out)
