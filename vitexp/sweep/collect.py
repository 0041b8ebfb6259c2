"""Merge study folders (shards run apart, on machines without a shared file system)
into one: every trial once, an ok result preferred over a failed one. The inputs are
only read: a damaged record in one is skipped there, never renamed."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from vitexp.errors import UserError
from vitexp.store import TrialStore
from vitexp.sweep.plan import check_folder, identity


def _specs(srcs: list[TrialStore]) -> dict[Path, dict]:
    """The study.toml of each source folder that has one, checked to be one study."""
    specs = {s.root: spec for s in srcs if (spec := s.read_spec()) is not None}
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
    srcs = [TrialStore(f, create=False, repair=False) for f in folders]
    for s in srcs:
        if not s.exists():
            raise UserError(f"{s.root} is not a study folder (no trials/); give folders written by a study --out")
    specs = _specs(srcs)
    target = TrialStore(out, create=False)
    for s in srcs:
        inside = target.root.resolve().is_relative_to(s.root.resolve())
        if inside and target.root.resolve() != s.root.resolve():
            raise UserError(f"--out {out} lies inside the input {s.root}; give a folder outside it (or the input "
                            f"itself, to merge into it)")
    if specs:
        kind = identity(next(iter(specs.values())))["kind"]
        for s in srcs:
            kinds = {str(r.get("study")) for r in s.finished().values()} - {kind}
            if s.root not in specs and kinds:
                raise UserError(f"{s.root} holds {', '.join(sorted(kinds))} runs, not a {kind} study; collect "
                                f"each kind into its own --out")
        check_folder(target, next(iter(specs.values())))
    target.create()
    have = target.finished()
    for src in srcs:
        if src.root.resolve() == target.root.resolve():
            continue
        for key, row in src.finished().items():
            mine = have.get(key)
            if mine is not None and (mine.get("status") == "ok" or row.get("status") != "ok"):
                continue
            target.import_trial(src, key)
            have[key] = row
        if target.read_spec() is None and src.spec_path.exists():
            target.write_spec(src.spec_path.read_text())
    target.rebuild()
    return target.runs()
