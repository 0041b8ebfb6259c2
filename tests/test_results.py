"""Committed results stay readable: every runs.csv / history.csv under results/ parses
with the current schema, every trial keeps its key, and every study folder says how it
was made."""

import json
import re
from pathlib import Path

import pandas as pd
import pytest

from conftest import REPO
from vitexp.analysis import finished
from vitexp.config import TrainConfig, config_fields
from vitexp.rows import HISTORY_COLUMNS, RUN_COLUMNS
from vitexp.store import read_runs

STUDIES = sorted(p.parent for p in (REPO / "results").rglob("runs.csv"))


def test_results_are_committed():
    assert STUDIES, "results/ holds no runs.csv"


@pytest.mark.parametrize("folder", STUDIES, ids=lambda p: str(p.relative_to(REPO)))
def test_committed_results_parse_with_the_current_schema(folder: Path):
    runs = read_runs(folder, required=RUN_COLUMNS)
    assert len(finished(runs)) == len(runs) > 0  # only finished trials are published
    assert runs.key.is_unique and pd.api.types.is_numeric_dtype(runs.top1_err)
    assert runs.top1_err.between(0, 100).all()
    for c in ("commit", "device", "torch"):
        assert runs[c].notna().all(), c  # provenance of every row
    history = pd.read_csv(folder / "history.csv", dtype={"key": str})
    assert list(history.columns[: len(HISTORY_COLUMNS)]) == HISTORY_COLUMNS
    assert set(history.key) <= set(runs.key)
    no_epoch = runs[~runs.key.isin(history.key)]  # only a trial that diverged in its first epoch has no row
    assert no_epoch.diverged.astype(str).str.lower().eq("true").all(), list(no_epoch.key)
    readme = (folder / "README.md").read_text()
    for what in ("command", "commit", "device", "wall"):
        assert what in readme.lower(), what


@pytest.mark.parametrize("folder", STUDIES, ids=lambda p: str(p.relative_to(REPO)))
def test_committed_trials_keep_their_keys(folder: Path):
    """A trial's key is a hash of its config: a change to the config or the key that moved
    a committed trial's key would make its study rerun it instead of skipping it."""
    names = set(config_fields())
    for path in sorted((folder / "trials").glob("*.json")):
        row = json.loads(path.read_text())
        shots = sorted(int(m.group(1)) for c in row if (m := re.fullmatch(r"fewshot(\d+)_err", c)))
        cfg = TrainConfig(**{k: v for k, v in row.items() if k in names and k != "fewshot"}, fewshot=shots)
        assert cfg.key() == row["key"] == path.stem, path.name
