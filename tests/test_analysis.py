"""The numbers behind the figures, against values worked out by hand."""

import numpy as np
import pandas as pd
import pytest

from vitexp import analysis
from vitexp.studies.optimizer import best_optimizer, length_curves, optimizer_gaps, optimizer_summary
from vitexp.studies.scale import scale_summary
from vitexp.errors import UserError


def load(tmp_path, rows, kind="stability", toml=None):
    """Rows -> DIR/runs.csv (+ study.toml) -> analysis.load_runs, as the CLI reads them."""
    folder = tmp_path / kind
    folder.mkdir(exist_ok=True)
    pd.DataFrame(rows).to_csv(folder / "runs.csv", index=False)
    if toml:
        (folder / "study.toml").write_text(toml)
    return analysis.load_runs([folder])


def run(model, err, opt="adamw", status="ok", diverged=False, **kw):
    return {"key": f"{model}-{opt}-{err}-{kw}", "study": "stability", "status": status, "model": model,
            "optimizer": opt, "lr": 1e-3, "wd": 0.1, "epochs": 50, "n_train": 1000, "seed": 0, "batch_size": 128,
            "top1_err": err, "last_err": err, "diverged": diverged, "wall_s": 1.0, **kw}


# -- EDF -----------------------------------------------------------------------------------

def test_edf_counts_strictly_below_and_ties():
    errors = [10, 20, 20, 30, 100]
    # at a tie value the tied runs are not yet counted; just above it they are
    assert analysis.edf(errors, [10, 20, 20.001, 30, 100, 101]).tolist() == [0, 0.2, 0.6, 0.6, 0.8, 1.0]
    steps = analysis.edf_steps(errors)
    assert steps["error"].tolist() == [10, 20, 30, 100]
    assert steps["edf"].tolist() == [0, 0.2, 0.6, 0.8]
    assert steps["edf_right"].tolist() == [0.2, 0.6, 0.8, 1.0]


def test_edf_table_models_diverged_failed_and_gap(tmp_path):
    runs = load(tmp_path, [
        run("vit_p", 30.0), run("vit_p", 25.0), run("vit_p", 25.0),
        run("vit_p", float("nan"), diverged=True),  # a diverged run counts at 100 whatever its row says
        run("vit_p", float("nan"), status="failed"),  # no result: counted, never plotted
        run("vit_c", 40.0), run("vit_c", 50.0),
        run("vit_p", 60.0, opt="sgd"),  # its own best (per optimizer)
    ])
    table = analysis.edf_table(runs).set_index(["optimizer", "model", "metric"])
    p = table.loc[("adamw", "vit_p", "last_err")]
    assert p["error"].tolist() == [25, 30, 100]
    assert p["edf"].tolist() == [0, 0.5, 0.75]
    assert p["edf_right"].tolist() == [0.5, 0.75, 1.0]
    gap = table.loc[("adamw", "vit_p", "gap")]
    assert gap["error"].tolist() == [0, 5, 75]
    assert gap["edf_right"].tolist() == [0.5, 0.75, 1.0]
    c = table.loc[("adamw", "vit_c", "gap")]
    assert c["error"].tolist() == [0, 10] and c["edf_right"].tolist() == [0.5, 1.0]
    assert table.loc[[("sgd", "vit_p", "gap")], "error"].tolist() == [0]

    s = analysis.edf_summary(runs).set_index(["optimizer", "model"]).loc[("adamw", "vit_p")]
    assert (s["n"], s["diverged"], s["failed"]) == (4, 1, 1)
    assert s["min"] == 25 and s["mean"] == pytest.approx((30 + 25 + 25 + 100) / 4)
    assert s["within_4"] == 0.5  # gaps 5, 0, 0, 75: two of four are < 4
    assert s["at_chance"] == 0  # no data set named: chance unknown
    assert analysis.counts(runs) == {"runs": 8, "ok": 7, "failed": 1, "diverged": 1}


def test_edf_summary_counts_runs_stuck_at_chance(tmp_path):
    runs = load(tmp_path, [
        run("vit_c", 12.0, dataset="shapes"), run("vit_c", 84.9, dataset="shapes"),  # 10 classes: chance 90
        run("vit_c", 85.0, dataset="shapes"), run("vit_c", 90.1, dataset="shapes"),
        run("vit_c", float("nan"), diverged=True, dataset="shapes"),  # diverged: counted as such, not here
        run("vit_p", 95.0, dataset="cifar100"),  # 100 classes: chance 99
        run("vit_p", 94.0, dataset="imagefolder"),  # classes unknown: never at chance
    ])
    s = analysis.edf_summary(runs).set_index("model")
    assert s.loc["vit_c", "at_chance"] == 2 and s.loc["vit_c", "diverged"] == 1
    assert s.loc["vit_p", "at_chance"] == 1
    assert analysis.chance_err("cifar100") == pytest.approx(99.0)


# -- bootstrap -----------------------------------------------------------------------------

def sweep(n=64, seed=0, best=2e-3, noise=0.3):
    rng = np.random.default_rng(seed)
    lr = best * 10 ** rng.uniform(np.log10(1 / 8), np.log10(4), n)
    err = 25 + 20 * np.log10(lr / best) ** 2 + rng.normal(0, noise, n)
    return lr, err


def test_bootstrap_is_deterministic_for_a_seed():
    lr, err = sweep()
    a = analysis.bootstrap_best(lr, err, seed=3)
    assert a == analysis.bootstrap_best(lr, err, seed=3)
    # the estimates are quantiles of run values, so seeds often agree; over ten they cannot all
    assert len({analysis.bootstrap_best(lr, err, n_boot=100, seed=s)["hi"] for s in range(10)}) > 1
    assert a["n"] == 64 and a["n_sample"] == 16  # 25% of the runs per draw


@pytest.mark.parametrize("replace", [True, False])
def test_bootstrap_finds_a_clear_optimum(replace):
    lr, err = sweep(best=2e-3)
    b = analysis.bootstrap_best(lr, err, replace=replace)
    assert b["lo"] <= b["best"] <= b["hi"]
    assert 2e-3 / 1.3 < b["best"] < 2e-3 * 1.3
    assert b["lo"] > 2e-3 / 8 and b["hi"] < 2e-3 * 4  # narrower than the sampled range


def test_bootstrap_draws_follow_pycls():
    values, errors = np.array([1.0, 10.0, 100.0, 1000.0]), np.array([5.0, 1.0, 3.0, 4.0])
    # all runs in every draw and no repeats: every draw's winner is the global best
    whole = analysis.bootstrap_best(values, errors, frac=1.0, replace=False)
    assert whole["lo"] == whole["best"] == whole["hi"] == pytest.approx(10.0)
    # pycls draws with replacement, so some draws miss the best run
    assert analysis.bootstrap_best(values, errors, frac=1.0, replace=True)["hi"] > 10.0
    # one run per draw (max(1, int(n * frac))): the estimate is the median value, on a log scale
    one = analysis.bootstrap_best(values[:3], errors[:3], frac=0.25)
    assert one["n_sample"] == 1 and one["best"] == pytest.approx(10.0)


def test_hparam_bands_per_model_and_optimizer(tmp_path):
    lr, err = sweep(n=32)
    rows = [run("vit_c", e, lr=v) for v, e in zip(lr, err)] + [run("vit_c", e, opt="sgd", lr=v * 1000)
                                                             for v, e in zip(lr, err)]
    bands = analysis.hparam_bands(load(tmp_path, rows), n_boot=500).set_index(["optimizer", "param"])
    assert bands.loc[("sgd", "lr"), "best"] == pytest.approx(1000 * bands.loc[("adamw", "lr"), "best"])
    assert bands.loc[("adamw", "wd"), "best"] == pytest.approx(0.1)  # every run had wd 0.1
    with pytest.raises(UserError, match="n-boot"):
        analysis.hparam_bands(load(tmp_path, rows), n_boot=0)


# -- scale and optimizer summaries ------------------------------------------------------------

def test_scale_summary_over_seeds(tmp_path):
    rows = [run("vit_p", 40.0, n_train=1000, seed=0, fewshot5_err=60.0),
            run("vit_p", 44.0, n_train=1000, seed=1, fewshot5_err=64.0),
            run("vit_p", 20.0, n_train=8000, seed=0, fewshot5_err=30.0),
            run("vit_p", float("nan"), n_train=8000, seed=1, diverged=True)]
    s = scale_summary(load(tmp_path, rows, "scale")).set_index(["metric", "n_train"])
    small = s.loc[("last_err", 1000)]
    assert (small["mean"], small["min"], small["max"], small["n"]) == (42.0, 40.0, 44.0, 2)
    assert small["std"] == pytest.approx(np.std([40, 44], ddof=1))
    big = s.loc[("last_err", 8000)]
    assert (big["mean"], big["n"], big["diverged"]) == (60.0, 2, 1)  # the diverged seed at 100
    assert s.loc[("fewshot5_err", 8000), "n"] == 1  # no few-shot error for the diverged seed
    assert s.loc[("fewshot5_err", 1000), "mean"] == 62.0


def test_optimizer_gap_and_training_length(tmp_path):
    rows = []
    for ep, adamw, sgd in ((50, 30.0, 36.0), (100, 26.0, 30.0), (200, 24.0, 27.0)):
        rows += [run("vit_p", adamw, epochs=ep), run("vit_p", sgd, opt="sgd", epochs=ep)]
        rows += [run("regnety", adamw - 5, epochs=ep), run("regnety", adamw - 6, opt="sgd", epochs=ep)]
    runs = load(tmp_path, rows, "optimizer")
    summary = optimizer_summary(runs)
    gaps = optimizer_gaps(runs).set_index(["model", "epochs"])["gap"]
    assert gaps[("vit_p", 50)] == 6.0 and gaps[("vit_p", 200)] == 3.0 and gaps[("regnety", 100)] == -1.0
    assert best_optimizer(summary) == {"regnety": "sgd", "vit_p": "adamw"}
    curves = length_curves(summary).set_index(["model", "optimizer", "epochs"])
    assert curves.loc[("vit_p", "adamw", 50), "delta"] == 6.0  # 30 - 24 (the longest schedule)
    assert curves.loc[("vit_p", "sgd", 50), "delta"] == 9.0
    assert curves.loc[("vit_p", "adamw", 200), "delta"] == 0.0
    assert curves.loc[("regnety", "sgd", 50), "best"] and not curves.loc[("regnety", "adamw", 50), "best"]


def test_optimizer_gap_is_paired_by_seed_with_a_t_interval(tmp_path):
    # seed 2 ran AdamW only: it is in neither side of the paired gap
    rows = [run("vit_p", a, seed=k) for k, a in enumerate((30.0, 32.0, 20.0))]
    rows += [run("vit_p", s, opt="sgd", seed=k) for k, s in enumerate((34.0, 38.0))]
    gap = optimizer_gaps(load(tmp_path, rows, "optimizer")).iloc[0]
    assert (gap["gap"], gap["n"]) == (5.0, 2)  # mean of 4 and 6, not 36 - 27.33
    assert gap["half"] == pytest.approx(12.706 * np.std([4, 6], ddof=1) / np.sqrt(2))
    assert np.isnan(analysis.t_half([4.0])) and analysis.t975(200) == 1.96


def test_edf_bands_contain_the_edf_and_rechoose_the_best(tmp_path):
    runs = load(tmp_path, [run("vit_p", e, val_err=e + 1) for e in (20.0, 22.0, 25.0, 30.0, 45.0, 60.0)])
    table = analysis.edf_table(runs, n_boot=400, seed=0)
    assert (table["edf_lo"] <= table["edf_right"]).all() and (table["edf_right"] <= table["edf_hi"]).all()
    gap = table[table["metric"] == "gap"]
    # each draw chooses its own best, so F(0) >= 1/6 in every draw; with the best kept from the full
    # sample, the third of draws that miss that run would put the band's low end at 0
    assert gap["error"].iloc[0] == 0 and gap["edf_lo"].iloc[0] == pytest.approx(1 / 6)
    assert table[table["metric"] == "last_err"]["edf_lo"].iloc[0] == 0  # a draw may miss the 20
    assert analysis.edf_table(runs, n_boot=400, seed=0).equals(table)  # seeded
    assert "edf_lo" not in analysis.edf_table(runs)


# -- loading ------------------------------------------------------------------------------------

def test_load_parses_and_fills_from_study_toml(tmp_path):
    rows = [run("vit_p", 30.0, diverged="False"), run("vit_p", 31.0, diverged="True")]
    for r in rows:
        del r["study"]
    runs = load(tmp_path, rows, toml='[study]\nkind = "stability"\n')
    assert runs["study"].tolist() == ["stability"] * 2
    assert runs["diverged"].tolist() == [False, True] and runs["top1_err"].tolist() == [30.0, 100.0]


@pytest.mark.parametrize("field,value,needle", [("top1_err", "abc", "top1_err"), ("lr", "fast", "lr"),
                                                ("diverged", "maybe", "diverged")])
def test_unparsable_values_are_user_errors(tmp_path, field, value, needle):
    with pytest.raises(UserError, match=needle):
        load(tmp_path, [run("vit_p", 30.0, **{field: value})] if field != "top1_err" else
             [{**run("vit_p", 30.0), "top1_err": value}])


def test_select_study_points_at_the_right_command(tmp_path):
    runs = load(tmp_path, [run("vit_p", 30.0)])
    assert len(analysis.select_study(runs, "stability", "plot-cdf")) == 1
    with pytest.raises(UserError, match=r"holds a stability study; plot-scale needs a scale study \(use plot-cdf\)"):
        analysis.select_study(runs, "scale", "plot-scale", {"stability": "plot-cdf"})
    single = runs.assign(study="train")  # single runs carry no kind: any plot may read them
    assert len(analysis.select_study(single, "scale", "plot-scale")) == 1
