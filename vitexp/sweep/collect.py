"""Merge study folders (shards run apart, on machines without a shared file system)
into one: every trial once, an ok result preferred over a failed one. The inputs are
only read: a damaged record in one is skipped there, never renamed."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from vitexp.errors import UserError
from vitexp.store import TrialStore
from vitexp.sweep.plan import check_folder, identity
from vitexp.tomlfile import dumps


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


def collect(folders: list[str | Path], out: str | Path, spec: dict | None = None) -> pd.DataFrame:
    """Merge FOLDERS into OUT (which may be one of them); returns the merged runs table. With
    SPEC (a preset's), only the trials of that study, and OUT holds that study: a new study
    starts from the trials it shares with finished ones (same key: the same trial), except
    those whose weights its other trials read (a teacher, a fine-tune's source) where the
    input kept none: those the new study trains again, weights and all."""
    srcs = [TrialStore(f, create=False, repair=False) for f in folders]
    for s in srcs:
        if not s.exists():
            raise UserError(f"{s.root} is not a study folder (no trials/); give folders written by a study --out")
    specs = _specs(srcs)
    if spec is not None:
        from vitexp import studies
        from vitexp.sweep.plan import unique

        trials = unique(studies.trials(spec))
        wanted = {key for key, _ in trials}
        read = {k for _, t in trials for k in t.needs()}  # the trials whose kept weights others read
    study_spec = spec if spec is not None else next(iter(specs.values()), None)
    target = TrialStore(out, create=False)
    for s in srcs:
        inside = target.root.resolve().is_relative_to(s.root.resolve())
        if inside and target.root.resolve() != s.root.resolve():
            raise UserError(f"--out {out} lies inside the input {s.root}; give a folder outside it (or the input "
                            f"itself, to merge into it)")
    if study_spec is not None:
        kind = identity(study_spec)["kind"]
        for s in srcs:
            kinds = {str(r.get("study")) for r in s.finished().values()} - {kind}
            if (spec is not None or s.root not in specs) and kinds:
                raise UserError(f"{s.root} holds {', '.join(sorted(kinds))} runs, not a {kind} study; collect "
                                f"each kind into its own --out")
        check_folder(target, study_spec)
    target.create()
    have = target.finished()
    for src in srcs:
        if src.root.resolve() == target.root.resolve():
            continue
        for key, row in src.finished().items():
            if spec is not None and (key not in wanted or key in read and not src.weights_path(key).exists()):
                continue
            mine = have.get(key)
            if mine is not None and (mine.get("status") == "ok" or row.get("status") != "ok"):
                continue
            target.import_trial(src, key)
            have[key] = row
        if target.read_spec() is None and (spec is not None or src.spec_path.exists()):
            target.write_spec(dumps(spec) if spec is not None else src.spec_path.read_text())
        for path in src.spec_paths() if spec is None else []:  # the commands that built the input
            target.keep_spec(path.read_text())
    target.rebuild()
    return target.runs()
