"""Verdicts as code: the claims file, the one rule, and the table the README shows."""

import math

import numpy as np
import pandas as pd
import pytest

from conftest import REPO, assert_user_error
from vitexp import claims

FLAT = [2.0, 1.2, 0.9, 0.8, 0.75, 0.72, 0.70, 0.69]  # converged by the rule in vitexp/rows.py
FALLING = [2.0, 1.8, 1.6, 1.4, 1.2, 1.0, 0.8, 0.6]  # still learning: not converged


def write_folder(path, rows):
    """A results folder: runs.csv from ROWS (model, seed, err, and optional columns) and a
    history.csv whose training loss is flat, or still falling where a row has `falling`."""
    path.mkdir(parents=True)
    runs, hist = [], []
    for i, r in enumerate(rows):
        key = f"{path.name}-{i:04d}"
        runs.append({"key": key, "status": "ok", "dataset": "shapes", "optimizer": "sgd", "n_train": 400,
                     "diverged": False, "converged": True, "top1_err": r["err"], "last_err": r["err"],
                     **{k: v for k, v in r.items() if k not in ("err", "falling")}})
        hist += [{"key": key, "epoch": e, "train_loss": v} for e, v in enumerate(FALLING if r.get("falling") else FLAT)]
    pd.DataFrame(runs).to_csv(path / "runs.csv", index=False)
    pd.DataFrame(hist).to_csv(path / "history.csv", index=False)
    return path


# per seed, the candidate's error minus the reference's (reference: 30%)
EFFECTS = {"clear": [5.0, 5.5, 4.5, 5.2, 4.8],  # reproduces: well above zero and above delta
           "against": [-3.0, -3.5, -2.5, -3.2, -2.8],  # does not: below zero
           "negligible": [0.1, -0.1, 0.2, 0.0, 0.05],  # does not: inside (-1, 1)
           "noisy": [9.0, -6.0, 4.0, -3.0, 8.0],  # inconclusive: the interval spans zero and delta
           "stuck": [5.0, 5.5, 4.5, 5.2, 4.8]}  # untested: its trials did not converge


@pytest.fixture
def results(tmp_path):
    rows = [{"model": "ref", "seed": s, "err": 30.0} for s in range(5)]
    rows += [{"model": m, "seed": s, "err": 30.0 + d, "falling": m == "stuck"}
             for m, ds in EFFECTS.items() for s, d in enumerate(ds)]
    write_folder(tmp_path / "results" / "synthetic", rows)
    return tmp_path / "results"


def claims_file(path, arms: str, defaults: str = 'min_effect = 1.0'):
    path.write_text(f"[defaults]\n{defaults}\n\n[[claim]]\nid = \"z\"\ntitle = \"test\"\n\n{arms}")
    return path


def arm(name, model, expect="positive", **more):
    extra = "".join(f"{k} = {v}\n" for k, v in more.items())
    return (f"[[claim.arms]]\nname = \"{name}\"\npaper = \"p\"\nfolders = [\"synthetic\"]\n"
            f"plus = [{{ model = \"{model}\" }}]\nminus = [{{ model = \"ref\" }}]\nexpect = \"{expect}\"\n{extra}\n")


def test_the_rule_gives_each_of_the_four_verdicts(results, tmp_path):
    path = claims_file(tmp_path / "c.toml", "".join(arm(m, m) for m in EFFECTS))
    table = claims.claims_table([results], path).set_index("arm")
    assert table["verdict"].to_dict() == {"clear": "reproduces", "against": "does not", "negligible": "does not",
                                          "noisy": "inconclusive", "stuck": "untested"}
    clear = table.loc["clear"]
    d = np.array(EFFECTS["clear"])
    half = 2.776 * d.std(ddof=1) / math.sqrt(5)  # t(0.975, 4 df)
    assert clear["effect"] == pytest.approx(d.mean()) and clear["hi"] - clear["effect"] == pytest.approx(half)
    assert (clear["seeds"], clear["converged"]) == (5, "10/10")
    assert (table.loc["stuck", "seeds"], table.loc["stuck", "converged"]) == (0, "5/10")


def test_the_paper_direction_and_a_claim_of_no_effect(results, tmp_path):
    arms = arm("neg", "against", expect="negative") + arm("none", "negligible", expect="none") + \
        arm("none but", "clear", expect="none")
    table = claims.claims_table([results], claims_file(tmp_path / "c.toml", arms)).set_index("arm")
    assert table["verdict"].to_dict() == {"neg": "reproduces", "none": "reproduces", "none but": "does not"}


def test_verdict_edges():
    assert claims.verdict(0.8, 0.2, 1.4, True, "positive", 1.0) == "inconclusive"  # beyond zero, below delta
    assert claims.verdict(0.5, 0.2, 0.9, True, "positive", 1.0) == "does not"  # inside the band
    assert claims.verdict(2.0, math.nan, math.nan, True, "positive", 1.0) == "untested"  # one seed: no interval
    assert claims.verdict(2.0, 1.0, 3.0, False, "positive", 1.0) == "untested"


def test_the_sizes_an_arm_averages_are_named_in_numeric_order(tmp_path):
    """Whatever order the runs come in (a study runs its largest sizes first)."""
    rows = [{"model": m, "seed": s, "n_train": n, "err": 30.0 + (m == "cand") * (1 + s)}
            for n in (16000, 500, 1600) for s in range(3) for m in ("ref", "cand")]
    write_folder(tmp_path / "r" / "synthetic", rows)
    row = claims.claims_table([tmp_path / "r"], claims_file(tmp_path / "c.toml", arm("by", "cand", by='["n_train"]')))
    assert row.iloc[0]["converged"] == "18/18 (3 of 3 n_train: 500, 1600, 16000)"


def test_an_lr_grid_cell_is_narrowed_by_the_held_out_error_and_sizes_are_averaged(tmp_path):
    """`choose` picks each cell's run by its held-out error, not its test error; `by` averages
    the sizes at which every seed converged (a size with one unconverged seed is left out)."""
    rows = []
    for s in range(3):
        for n in (100, 200, 300):
            rows.append({"model": "ref", "seed": s, "n_train": n, "lr": 1.0, "val_err": 30.0, "err": 30.0})
            # the test-best lr (0.1) is the held-out-worst: choosing on held-out images reads lr 1.0
            rows.append({"model": "cand", "seed": s, "n_train": n, "lr": 0.1, "val_err": 50.0, "err": 20.0})
            rows.append({"model": "cand", "seed": s, "n_train": n, "lr": 1.0, "val_err": 31.0,
                         "err": 30.0 + n / 100 + s * 0.1, "falling": n == 300 and s == 1})
    write_folder(tmp_path / "r" / "synthetic", rows)
    text = arm("grid", "cand", by='["n_train"]', choose='"val_err"')
    row = claims.claims_table([tmp_path / "r"], claims_file(tmp_path / "c.toml", text)).iloc[0]
    assert row["effect"] == pytest.approx(1.5 + 0.1)  # sizes 100 and 200: (1 + 2) / 2, plus the seeds' mean 0.1
    assert row["converged"] == "17/18 (2 of 3 n_train: 100, 200)" and row["seeds"] == 3
    # a seed added at one size only: it must not turn its mean over sizes into that size's effect
    rows += [{"model": m, "seed": 3, "n_train": 100, "lr": 1.0, "val_err": 30.0, "err": e}
             for m, e in (("ref", 30.0), ("cand", 90.0))]
    write_folder(tmp_path / "r2" / "synthetic", rows)
    row = claims.claims_table([tmp_path / "r2"], claims_file(tmp_path / "c.toml", text)).iloc[0]
    assert row["effect"] == pytest.approx(1.6) and row["seeds"] == 3 and row["of_seeds"] == 4
    several = arm("no choice", "cand")
    with pytest.raises(claims.UserError, match="matches 6 runs in one cell"):
        claims.claims_table([tmp_path / "r"], claims_file(tmp_path / "d.toml", several))


def test_an_edf_arm_is_the_share_within_delta_of_the_own_best(tmp_path):
    rows = [{"model": "steady", "seed": 0, "err": e} for e in (20, 21, 22, 23, 30)]  # 4 of 5 within 4
    rows += [{"model": "ref", "seed": 0, "err": e} for e in (20, 25, 30, 35, 40)]  # 1 of 5
    write_folder(tmp_path / "r" / "synthetic", rows)
    text = arm("edf", "steady", kind='"edf"').replace("expect", "min_effect = 10.0\nexpect")
    row = claims.claims_table([tmp_path / "r"], claims_file(tmp_path / "c.toml", text)).iloc[0]
    assert row["effect"] == pytest.approx(60.0) and row["lo"] <= 60.0 <= row["hi"] and row["interval"] == "bootstrap"
    assert row["verdict"] in ("reproduces", "inconclusive")  # five runs a model: the bootstrap decides


@pytest.mark.parametrize("edit, needle", [
    (('folders = ["synthetic"]', 'folders = ["synthetc"]'), "synthetc"),
    (("[defaults]\n", '[defaults]\nmetric = "top2_err"\n'), "top2_err"),
    (('{ model = "ref" }', '{ modle = "ref" }'), "modle"),
    (('{ model = "ref" }', '{ model = "nobody" }'), "matches no finished run"),
    (('expect = "positive"', 'expect = "upward"'), "expect"),
    (('expect = "positive"', 'expect = "positive"\nfolder = ["x"]'), "folder"),
    (("min_effect = 1.0", "min_effect = -1"), "min_effect"),
])
def test_a_bad_claims_file_is_one_line_and_exit_2(results, tmp_path, cli, edit, needle):
    text = claims_file(tmp_path / "ok.toml", arm("clear", "clear")).read_text()
    assert edit[0] in text
    path = tmp_path / "bad.toml"
    path.write_text(text.replace(edit[0], edit[1], 1))
    assert_user_error(cli("claims", str(results), "--claims", str(path), "--no-plot"), needle)


def test_the_command_prints_every_format_and_draws_the_forest_plot(results, tmp_path, cli):
    path = claims_file(tmp_path / "c.toml", "".join(arm(m, m) for m in EFFECTS))
    out = cli("claims", str(results), "--claims", str(path), "--format", "csv")
    assert out.returncode == 0, out.stderr
    table = pd.read_csv(__import__("io").StringIO(out.stdout))
    assert list(table["verdict"]) == ["reproduces", "does not", "does not", "inconclusive", "untested"]
    figure = pd.read_csv(results / "figures" / "verdicts.csv")  # the plotted data
    assert list(figure["arm"]) == list(EFFECTS) and figure["oriented_effect"].iloc[0] == pytest.approx(5.0)
    md = cli("claims", str(results), "--claims", str(path), "--format", "md", "--no-plot")
    assert md.stdout.startswith("| claim | paper says |") and "| (z) noisy |" in md.stdout
    assert cli("claims", str(results), "--claims", str(path), "--format", "json", "--no-plot").stdout.lstrip()[0] == "["
    assert_user_error(cli("claims", str(results), "--claims", str(path), "--format", "xml"), "--format")


def test_a_new_folder_named_in_the_claims_file_changes_the_verdict(results, tmp_path):
    """Two seeds leave the verdict inconclusive; a folder with three more, added to the arm's
    folders, makes it reproduce: the verdict changes through data alone."""
    rows = [{"model": "ref", "seed": s, "err": 30.0} for s in range(2)]
    rows += [{"model": "cand", "seed": s, "err": 30.0 + d} for s, d in enumerate((6.0, 2.0))]
    write_folder(results / "first", rows)
    more = [{"model": "ref", "seed": s, "err": 30.0} for s in range(2, 5)]
    more += [{"model": "cand", "seed": s, "err": 30.0 + d} for s, d in zip(range(2, 5), (4.0, 5.0, 3.5))]
    write_folder(results / "more_seeds", more)
    text = arm("grows", "cand").replace('["synthetic"]', '["first"]')
    assert claims.claims_table([results], claims_file(tmp_path / "a.toml", text)).iloc[0]["verdict"] == "inconclusive"
    text = text.replace('["first"]', '["first", "more_seeds"]')
    row = claims.claims_table([results], claims_file(tmp_path / "b.toml", text)).iloc[0]
    assert (row["verdict"], row["seeds"]) == ("reproduces", 5)


def test_the_readme_shows_the_table_of_the_committed_results():
    """The README's generated table is `vitexp claims` on the committed results (rerun
    `vitexp claims --readme README.md` after a change), and its rule is the code's."""
    readme = (REPO / "README.md").read_text()
    table = claims.claims_table([REPO / "results"])
    assert claims.readme_section(readme) == claims.markdown(table)
    assert claims.RULE in readme
    assert set(table["claim"]) == set("abcdefghijkl")


def test_the_report_of_a_folder_shows_the_claims_that_read_it(results, tmp_path):
    from vitexp.report import _claims

    blocks = _claims([REPO / "results" / "optimizer_fashion-mnist_cpu_p16_long"])
    tables = [b[1] for b in blocks if b[0] == "table"]
    assert len(tables) == 1 and list(tables[0]["claim"]) == ["(c) Fashion-MNIST, batch 2048, 16x16 stem at 64 px"]


def test_an_arm_written_before_its_study_ran_is_untested_until_its_folder_exists(results, tmp_path):
    text = arm("later", "clear").replace('["synthetic"]', '["not_yet"]').replace("expect", "planned = true\nexpect")
    path = claims_file(tmp_path / "c.toml", text)
    row = claims.claims_table([results], path).iloc[0]
    assert (row["verdict"], row["converged"]) == ("untested", "not run yet")
    (results / "synthetic").rename(results / "not_yet")
    assert claims.claims_table([results], path).iloc[0]["verdict"] == "reproduces"


def test_a_planned_arm_is_under_way_while_its_folder_lacks_a_term_and_names_the_sizes_it_averages(results, tmp_path):
    later = arm("later", "bigger", planned="true")  # the folder exists, the model has not run yet
    now = arm("now", "clear", planned="true").replace('plus = [', 'by = ["n_train"]\nplus = [')
    path = claims_file(tmp_path / "c.toml", later + now)
    table = claims.claims_table([results], path).set_index("arm")
    assert (table.loc["later", "verdict"], table.loc["later", "converged"]) == ("untested", "under way")
    assert table.loc["now", "verdict"] == "reproduces" and "1 of 1 n_train: 400" in table.loc["now", "converged"]
    # an arm not marked planned whose selector matches nothing stays an error in the claims file
    with pytest.raises(claims.UserError, match="matches no finished run"):
        claims.claims_table([results], claims_file(tmp_path / "d.toml", arm("x", "bigger")))
