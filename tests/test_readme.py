"""The README stays true: its model table, option table and command list match the code."""

import dataclasses
import re

from conftest import REPO
from vitexp.cli import app
from vitexp.config import TrainConfig
from vitexp.models import complexity_table

README = (REPO / "README.md").read_text()


def test_model_table_matches_the_zoo():
    for r in complexity_table().itertuples():
        row = f"| `{r.model}` | {r.family} | {r.resolution} | {r.params_m:.2f} | {r.gflops:.3f} | {r.acts_m:.2f} |"
        assert row in README, row


def test_every_config_field_is_documented():
    for f in dataclasses.fields(TrainConfig):
        if f.name != "extra":
            assert f"`--{f.name.replace('_', '-')}`" in README, f.name


def test_every_command_is_listed():
    names = {c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands}
    listed = set(re.findall(r"^\| `vitexp ([a-z-]+)", README, flags=re.M))
    assert names == listed, names ^ listed


def test_quick_start_is_two_commands():
    block = README.split("## Quick start")[1].split("```bash")[1].split("```")[0]
    cmds = [ln for ln in block.strip().splitlines() if ln.strip()]
    assert len(cmds) == 2 and "scale-study" in cmds[0] and "pytest" in cmds[1]
