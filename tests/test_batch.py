"""The optimizer study's batch-size axis: lr scaling rules, the held-out lr choice, tables and figure."""

import math

import pandas as pd
import pytest

from vitexp.config import TrainConfig
from vitexp.errors import UserError
from vitexp.optim import peak_lr
from vitexp.studies import STUDIES, trials
from vitexp.studies.base import tuned
from vitexp.studies.optimizer import batch_tables, chosen
from vitexp.sweep import resolve_spec, run_study

MODELS = ["vit_p_7mf", "resnet_7mf"]


def spec(knobs, train=None):
    s = resolve_spec("optimizer", None, {"epochs": [2], "seeds": [0], **knobs},
                     {"n_train": 4096, "n_test": 50, "device": "cpu", **(train or {})})
    s["study"]["models"] = MODELS
    return s


def test_each_rule_gives_its_peak_lr_and_rules_that_agree_run_once():
    s = spec({"batch_sizes": [128, 512, 2048], "lr_rules": ["linear", "sqrt", "none"], "lr_rule_batch": 128},
             {"batch_size": 128, "holdout": 0.1})
    got = trials(s)
    assert len(got) == len(MODELS) * 2 * (1 + 3 + 3)  # at the tuning batch the three rules are one trial
    for cfg in got:
        lr, _ = tuned(s, cfg.model, cfg.optimizer)
        at_128 = lr * 128 / 2048  # the peak lr the search found at batch 128
        exponent = {"linear": 1.0, "sqrt": 0.5, "none": 0.0}[cfg.extra["lr_rule"]]
        assert math.isclose(peak_lr(cfg), at_128 * (cfg.batch_size / 128) ** exponent, rel_tol=1e-12)
        if cfg.extra["lr_rule"] == "linear":
            assert cfg.lr == lr  # exactly the tuned value: keys of linear trials do not drift
    assert len({c.key() for c in got}) == len(got)


def test_without_the_axis_the_trials_are_the_plain_optimizer_studys():
    plain = trials(spec({}))
    axis = trials(spec({"batch_sizes": [TrainConfig().batch_size], "lr_rules": ["linear"]}))
    assert [c.key() for c in plain] == [c.key() for c in axis]
    assert all("lr_rule" not in c.extra for c in plain)


def test_lr_factors_make_a_grid_around_each_rules_lr_and_keep_the_rule_only_keys():
    base = {"batch_sizes": [128, 512], "lr_rules": ["none"], "lr_rule_batch": 128}
    plain = trials(spec(base, {"batch_size": 128}))
    s = spec({**base, "lr_factors": [1.0, 0.25]}, {"batch_size": 128, "holdout": 0.1})
    grid = trials(s)
    assert len(grid) == 2 * len(plain)
    ones = [c for c in grid if "lr_factor" not in c.extra]
    quarters = [c for c in grid if c.extra.get("lr_factor") == 0.25]
    assert len(ones) == len(quarters) == len(plain)
    # holdout is keyed only when set: compare the factor-1 trials with a plain run that holds out too
    held = trials(spec(base, {"batch_size": 128, "holdout": 0.1}))
    assert [c.key() for c in ones] == [c.key() for c in held]
    for one, quarter in zip(ones, quarters):
        assert (one.model, one.optimizer, one.batch_size) == (quarter.model, quarter.optimizer, quarter.batch_size)
        assert math.isclose(peak_lr(quarter), 0.25 * peak_lr(one), rel_tol=1e-12)
        assert quarter.extra["lr_rule"] == "none"
    assert len({c.key() for c in grid}) == len(grid)


@pytest.mark.parametrize("knobs,train,match", [
    ({"lr_rules": ["linear", "sqrt"]}, {}, "--holdout"),
    ({"lr_factors": [1.0, 0.5]}, {}, "--holdout"),
    ({"lr_factors": [0.0]}, {}, "--lr-factors"),
    ({"lr_factors": ["half"]}, {}, "--lr-factors"),
    ({"lr_factors": [float("inf")]}, {}, "--lr-factors"),
    ({"lr_rules": ["cubic"]}, {"holdout": 0.1}, "lr rule"),
    ({"batch_sizes": [0]}, {}, "batch"),
    ({"lr_rule_batch": 0}, {}, "lr-rule-batch"),
])
def test_bad_axis_is_refused(knobs, train, match):
    with pytest.raises(UserError, match=match):
        trials(spec(knobs, train))


def test_each_seed_takes_the_lr_its_held_out_images_chose():
    rows = []
    for seed, (val_a, val_b) in enumerate([(10.0, 12.0), (15.0, 11.0), (9.0, 9.0)]):
        for lr, val, test in ((0.1, val_a, 20.0 + seed), (0.4, val_b, 30.0 + seed)):
            rows.append(dict(model="vit_p_7mf", optimizer="sgd", batch_size=2048.0, epochs=5, seed=seed, lr=lr,
                             val_err=val, top1_err=test, last_err=test, status="ok", diverged=False,
                             lr_rule="sqrt" if lr == 0.1 else "linear"))
    # batch_size is a float, as analysis.load_runs parses it: the tables still say "batch 2048"
    got = chosen(pd.DataFrame(rows)).sort_values("seed")
    assert got["lr"].tolist() == [0.1, 0.4, 0.1]  # a tie goes to the smaller lr
    assert got["last_err"].tolist() == [20.0, 31.0, 22.0]
    blocks = batch_tables(pd.DataFrame(rows))  # (h3, title), (table, frame), ...
    tables = {title: frame for (_, title), (_, frame) in zip(blocks[::2], blocks[1::2])}
    errors = next(f for t, f in tables.items() if t.startswith("Top-1"))
    picked = pd.Series([20.0, 31.0, 22.0])
    assert errors["batch 2048"].tolist() == [f"{picked.mean():.2f} ± {picked.std():.2f}"]
    rules = next(f for t, f in tables.items() if t.startswith("lr rule"))
    assert rules["batch 2048"].tolist() == ["linear x1, sqrt x2"]


def test_the_chosen_rule_names_its_factor():
    rows = [dict(model="resnet_7mf", optimizer="adamw", batch_size=128, epochs=5, seed=seed, lr=lr, val_err=val,
                 top1_err=val, last_err=val, status="ok", diverged=False, lr_rule="none", lr_factor=factor)
            for seed, vals in enumerate([(9.0, 7.0), (8.0, 7.5), (6.0, 7.0)])
            for lr, factor, val in zip((0.8, 0.2), (float("nan"), 0.25), vals)]
    assert chosen(pd.DataFrame(rows)).sort_values("seed")["lr"].tolist() == [0.2, 0.2, 0.8]
    blocks = batch_tables(pd.DataFrame(rows))
    rules = next(frame for (_, title), (_, frame) in zip(blocks[::2], blocks[1::2]) if title.startswith("lr rule"))
    assert rules["batch 128"].tolist() == ["none x1, none*0.25 x2"]
    linear = pd.DataFrame(rows).drop(columns="lr_rule")  # factors around the linear rule's lr alone
    blocks = batch_tables(linear)
    rules = next(frame for (_, title), (_, frame) in zip(blocks[::2], blocks[1::2]) if title.startswith("lr rule"))
    assert rules["batch 128"].tolist() == ["linear x1, linear*0.25 x2"]


@pytest.mark.slow
def test_a_batch_size_study_runs_and_draws_the_gap_per_batch(tmp_path):
    s = spec({"batch_sizes": [16, 32], "lr_rules": ["linear", "none"], "lr_rule_batch": 16, "epochs": [1]},
             {"batch_size": 16, "holdout": 0.25, "n_train": 64})
    runs = run_study(s, tmp_path)
    assert len(runs) == len(MODELS) * 2 * 3 and runs["val_err"].notna().all()
    assert set(runs["batch_size"]) == {16, 32}
    study = STUDIES["optimizer"]
    files = study.figures(runs, tmp_path / "fig")
    assert any(f.name == "batch.png" for f in files)
    tables = [t for kind, t in study.tables(runs) if kind == "table"]
    gap = tables[1]
    assert list(gap.columns) == ["model", "batch 16", "batch 32"] and sorted(gap["model"]) == sorted(MODELS)
    assert len(study.must_converge(runs)) == len(MODELS) * 2 * 2
