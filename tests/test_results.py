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


# -- committed figures ----------------------------------------------------------------------------

# a figure set drawn from other folders: its README's plot command names them
PLOT_LINE = re.compile(r"vitexp (plot-[a-z]+) ([^\n]+?) --out (results/[^\s/]+)/figures")


def figure_sets(root: Path) -> list[tuple[Path, tuple]]:
    """Every folder under ROOT with committed figures -> how they are drawn: ("folder",) from
    its own runs.csv (its study's figures, and its learning curves where it has them), or
    ("plot", kind, sources) by the plot command its README gives."""
    from vitexp import studies

    kinds = {s.plot_command: k for k, s in studies.STUDIES.items() if s.plot_command}
    out = []
    for figures in sorted(root.glob("*/figures")):
        folder = figures.parent
        if (folder / "runs.csv").exists():
            out.append((folder, ("folder",)))
            continue
        lines = [m for m in PLOT_LINE.finditer((folder / "README.md").read_text())
                 if m[3] == f"results/{folder.name}"]
        if lines:
            out.append((folder, ("plot", kinds[lines[0][1]], [REPO / s for s in lines[0][2].split()])))
    return out


def redraw(folder: Path, how: tuple, out: Path) -> list[Path]:
    """Draw FOLDER's figure set again into OUT, as `figure_sets` says; the data files drawn."""
    from vitexp import analysis, report

    if how[0] == "plot":
        paths = report.draw(how[1], how[2], out)
    else:
        committed = {p.stem for p in (folder / "figures").glob("*.csv")}
        paths = report.draw(analysis.study_kind(folder), [folder], out) if committed - {"curves"} else []
        paths += report.plot_curves([folder], out) if "curves" in committed else []
    return [p for p in paths if p.suffix == ".csv"]


FIGURE_SETS = figure_sets(REPO / "results")


def test_every_committed_figure_set_is_known():
    drawn = {f for f, _ in FIGURE_SETS} | {REPO / "results"}  # results/figures: `vitexp claims` (test_claims)
    assert {p.parent for p in (REPO / "results").glob("*/figures")} | {REPO / "results"} == drawn


@pytest.mark.slow
@pytest.mark.parametrize("folder,how", FIGURE_SETS, ids=lambda v: v.name if isinstance(v, Path) else "")
def test_committed_figures_are_a_fresh_redraw(folder: Path, how: tuple, tmp_path):
    """The numbers in a committed figure's data file are what today's code draws from the
    committed runs: no figure in results/ is older than the plotting code."""
    fresh = {p.name: p for p in redraw(folder, how, tmp_path)}
    committed = {p.name: p for p in (folder / "figures").glob("*.csv")}
    assert set(fresh) == set(committed)
    for name, path in committed.items():
        old, new = pd.read_csv(path), pd.read_csv(fresh[name])
        assert list(old.columns) == list(new.columns) and len(old) == len(new), name
        for c in old.columns:
            if pd.api.types.is_numeric_dtype(old[c]) and pd.api.types.is_numeric_dtype(new[c]):
                pd.testing.assert_series_equal(old[c], new[c], check_dtype=False, rtol=1e-9, obj=f"{name}:{c}")
            else:
                assert old[c].astype(str).tolist() == new[c].astype(str).tolist(), f"{name}:{c}"
