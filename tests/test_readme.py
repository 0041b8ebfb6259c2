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
        row = f"| `{r.model}` | {r.family} | {r.resolution} | {r.params_m:.2f} | {r.gmacs:.3f} | {r.acts_m:.2f} |"
        assert row in README, row


def test_every_config_field_is_documented_with_its_default_and_help():
    """The option table's row of each TrainConfig field: the field's default and its help
    text (a `|` of the help, which a Markdown cell cannot hold, written as `/`)."""
    rows = dict((name, (default, help_)) for name, default, help_ in
                re.findall(r"^\| `--([a-z-]+)` \| (.*?) \| (.*) \|$", README, flags=re.M))
    for f in dataclasses.fields(TrainConfig):
        if f.name in TrainConfig.NOT_OPTIONS:
            continue
        name = f.name.replace("_", "-")
        assert name in rows, f.name
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        assert rows[name][0] == (f"`{default}`" if default != [] else "none"), f.name
        assert rows[name][1].replace("`", "") == f.metadata["help"].replace(" | ", " / ").replace("`", ""), f.name


def test_every_command_is_listed():
    names = {c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands}
    listed = set(re.findall(r"^\| `vitexp ([a-z-]+)", README, flags=re.M))
    assert names == listed, names ^ listed


def test_quick_start_is_two_commands():
    block = README.split("## Quick start")[1].split("```bash")[1].split("```")[0]
    cmds = [ln for ln in block.strip().splitlines() if ln.strip()]
    assert len(cmds) == 2 and "scale-study" in cmds[0] and "pytest" in cmds[1]


def test_every_module_is_in_the_module_table():
    table = README.split("| module | its job |")[1].split("\n\n")[0]
    named = set(re.findall(r"`(vitexp/[a-z_/]+(?:\.py)?)`", table))
    for p in sorted((REPO / "vitexp").iterdir()):
        if p.name.startswith("_") or p.name == "py.typed" or p.name == "__pycache__":
            continue
        name = f"vitexp/{p.name}" + ("/" if p.is_dir() else "")
        assert name in named, name
