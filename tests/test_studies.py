"""Studies: sampler, trial keys, presets and overrides, skip/resume, shards and collect, dry-run."""

import math
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from conftest import REPO, assert_user_error, run_cli
from vitexp.config import tuned_hparams
from vitexp import models as vmodels
from vitexp.config import TrainConfig
from vitexp.errors import UserError
from vitexp.studies import STUDIES, log_uniform, sampling_range, trials
from vitexp.sweep import parse_shard, resolve_spec, run_study
from vitexp.sweep.presets import list_presets
from vitexp.sweep.presets import load_preset as _load_preset


def load_preset(name):
    return _load_preset(name, STUDIES)

TINY = dict(n_train=128, n_test=100, batch_size=64, device="cpu")


def small_trio(kind_spec):
    return kind_spec["study"]["models"]


def test_sampler_is_log_uniform_deterministic_and_in_range():
    u = log_uniform(4000, seed=3)
    assert np.array_equal(u, log_uniform(4000, seed=3))
    assert not np.array_equal(u, log_uniform(4000, seed=4))
    assert u.min() >= 0 and u.max() < 1
    # uniform in [0,1): every decile holds ~10% (log-uniform after the exp map)
    counts = np.histogram(u[:, 0], bins=10, range=(0, 1))[0]
    assert counts.min() > 320 and counts.max() < 480  # 400 +- 4 sd (binomial sd ~19)

    spec = resolve_spec("stability", None, {"samples": 200, "optimizer": "sgd"}, {})
    rows = trials(spec)
    for m in spec["study"]["models"]:
        lr, wd = tuned_hparams(m, "sgd") if m not in spec.get("tuned", {}) else spec["tuned"][m]["sgd"]
        mine = [t for t in rows if t.model == m]
        lrs = np.log([t.lr for t in mine])
        assert len(mine) == 200
        assert lrs.min() >= math.log(lr / 8) - 1e-9 and lrs.max() <= math.log(lr * 4) + 1e-9
        # log-uniform: the mean log lr sits mid-range
        assert abs(lrs.mean() - (math.log(lr / 8) + math.log(lr * 4)) / 2) < 0.25
        assert all(wd / 8 <= t.wd <= wd * 4 for t in mine)


def test_paper_preset_uses_the_papers_ranges():
    spec = load_preset("stability_imagenet")
    r = sampling_range(spec, "vit_p_4gf", "adamw")
    assert r == {"lr": (2.5e-4, 8.0e-3), "wd": (0.02, 0.8)}
    r = sampling_range(spec, "regnety_4gf", "sgd")
    assert r == {"lr": (0.25, 8.0), "wd": (3.0e-6, 8.0e-5)}


@pytest.mark.slow
def test_trial_key_is_stable_and_ignores_execution_fields():
    a = TrainConfig(model="vit_p_1gf", lr=1e-3, wd=0.1)
    assert a.key() == TrainConfig(model="vit_p_1gf", lr=1e-3, wd=0.1).key()
    assert a.key() == TrainConfig(model="vit_p_1gf", lr=1e-3, wd=0.1, device="cuda", num_workers=9).key()
    assert a.key() != TrainConfig(model="vit_p_1gf", lr=2e-3, wd=0.1).key()
    # lr/wd left to the model's tuned values give the same key as spelling them out
    lr, wd = tuned_hparams("vit_p_1gf", "adamw")
    assert TrainConfig(model="vit_p_1gf").key() == TrainConfig(model="vit_p_1gf", lr=lr, wd=wd).key()
    # the key is a pure function of the config: the same in a fresh interpreter
    code = "from vitexp.config import TrainConfig; print(TrainConfig(model='vit_p_1gf', lr=1e-3, wd=0.1).key())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO).stdout.strip()
    assert out == a.key()


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_resolves_to_valid_trials(name):
    spec = load_preset(name)
    t = trials(spec)
    assert t and all(isinstance(x, TrainConfig) for x in t)
    assert len({x.key() for x in t}) == len(t)  # no duplicate trials


def test_overrides_beat_the_preset():
    spec = resolve_spec("scale", None, {"models": ["vit_p_1gf"], "sizes": [100, 200], "seeds": [0, 1]},
                        {"batch_size": 32, "dataset": "shapes"})
    t = trials(spec)
    assert {x.model for x in t} == {"vit_p_1gf"} and {x.n_train for x in t} == {100, 200}
    assert {x.seed for x in t} == {0, 1} and all(x.batch_size == 32 for x in t)
    # the step budget: smaller subsets train more epochs, the same hyper-parameters
    by_n = {x.n_train: x.epochs for x in t}
    assert by_n[100] >= by_n[200]
    assert len({(x.lr, x.wd) for x in t}) == 1
    # subsets nest within a seed: the subset seed is the trial seed for every size
    assert all(x.subset_seed == x.seed for x in t)


def test_study_errors():
    with pytest.raises(UserError, match="unknown model"):
        trials(resolve_spec("stability", None, {"models": ["vit_zz"]}, {}))
    with pytest.raises(UserError, match="samples"):
        trials(resolve_spec("stability", None, {"samples": 0}, {}))
    with pytest.raises(UserError, match="preset"):
        resolve_spec("stability", "no_such_preset", {}, {})
    with pytest.raises(UserError, match="not a scale study"):
        resolve_spec("scale", "stability_shapes", {}, {})
    for bad in ("3/2", "1", "a/b", "-1/2"):
        with pytest.raises(UserError, match="shard"):
            parse_shard(bad)
    assert parse_shard("1/3") == (1, 3)


def test_shard_from_slurm(monkeypatch):
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "5")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "4")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "3")
    assert parse_shard(None) == (1, 3)


def _files(folder):
    return {p.relative_to(folder): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_stability_cli_example_and_rerun_changes_nothing(tmp_path):
    out = tmp_path / "st"
    p = run_cli("stability", "--optimizer", "sgd", "--dataset", "shapes", "--samples", "3", "--epochs", "1",
                "--n-train", "128", "--n-test", "100", "--device", "cpu", "--out", out, "--no-plot")
    assert p.returncode == 0, p.stderr
    runs = pd.read_csv(out / "runs.csv")
    spec = resolve_spec("stability", None, {"optimizer": "sgd"}, {})
    assert set(runs.model) == set(spec["study"]["models"])
    for m, g in runs.groupby("model"):
        assert len(g) == 3 and (g.optimizer == "sgd").all() and (g.epochs == 1).all()
        r = sampling_range(spec, m, "sgd")
        assert g.lr.between(*r["lr"]).all() and g.wd.between(*r["wd"]).all()
    assert (out / "study.toml").exists() and (out / "history.csv").exists() and (out / "log.txt").exists()
    before = _files(out)
    p = run_cli("stability", "--optimizer", "sgd", "--dataset", "shapes", "--samples", "3", "--epochs", "1",
                "--n-train", "128", "--n-test", "100", "--device", "cpu", "--out", out, "--no-plot")
    assert p.returncode == 0, p.stderr
    assert _files(out) == before  # nothing ran, no file touched


@pytest.mark.slow
def test_dry_run_trains_nothing(tmp_path):
    p = run_cli("scale-study", "--dry-run", "--out", tmp_path / "s")
    assert p.returncode == 0, p.stderr
    assert "PFLOP" in p.stdout and "todo" in p.stdout
    assert not (tmp_path / "s" / "runs.csv").exists()


@pytest.mark.slow
def test_shards_in_two_processes_then_collect_equal_one_run(tmp_path):
    small = ",".join(load_preset("optimizer_shapes")["study"]["models"][:2])
    common = ["optimizer-study", "--models", small, "--seeds", "0", "--epochs", "1", "--optimizers", "adamw,sgd",
              "--n-train", "64", "--n-test", "64", "--batch-size", "32", "--device", "cpu", "--no-plot"]
    env = {"OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "vitexp", *common, "--shard", f"{i}/2", "--out",
                               str(tmp_path / f"shard{i}")], cwd=REPO, env={**os.environ, **env},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    for pr in procs:
        _, err = pr.communicate(timeout=600)
        assert pr.returncode == 0, err
    p = run_cli("collect", tmp_path / "shard0", tmp_path / "shard1", "--out", tmp_path / "merged")
    assert p.returncode == 0, p.stderr
    p = run_cli(*common, "--out", tmp_path / "whole", env=env)  # same threads: same float sums
    assert p.returncode == 0, p.stderr
    merged = pd.read_csv(tmp_path / "merged" / "runs.csv").set_index("key").sort_index()
    whole = pd.read_csv(tmp_path / "whole" / "runs.csv").set_index("key").sort_index()
    assert list(merged.index) == list(whole.index) and len(whole) == 4
    for c in ("top1_err", "last_err", "train_loss", "lr", "wd", "optimizer", "model"):
        assert merged[c].equals(whole[c]), c
    s0 = pd.read_csv(tmp_path / "shard0" / "runs.csv")
    s1 = pd.read_csv(tmp_path / "shard1" / "runs.csv")
    assert set(s0.key).isdisjoint(s1.key) and len(s0) == len(s1) == 2


@pytest.mark.slow
def test_study_in_a_folder_of_another_kind_is_refused(tmp_path):
    out = tmp_path / "x"
    p = run_cli("stability", "--samples", "1", "--epochs", "1", "--n-train", "64", "--n-test", "64",
                "--batch-size", "32", "--device", "cpu", "--out", out, "--no-plot", "--models",
                load_preset("stability_shapes")["study"]["models"][0])
    assert p.returncode == 0, p.stderr
    assert_user_error(run_cli("scale-study", "--out", out, "--device", "cpu"), "stability")


@pytest.mark.slow
def test_scale_study_writes_fewshot_columns(tmp_path):
    spec = resolve_spec("scale", None, {"sizes": [100], "steps": 4, "min_epochs": 1, "fewshot": [1, 5]},
                        {"n_test": 100, "batch_size": 50, "device": "cpu"})
    spec["study"]["models"] = spec["study"]["models"][:1]
    spec["study"]["seeds"] = [0]
    runs = run_study(spec, tmp_path)
    assert len(runs) == 1
    assert 0 <= runs.fewshot1_err.iloc[0] <= 100 and 0 <= runs.fewshot5_err.iloc[0] <= 100


def test_scale_trials_record_their_own_step_budget():
    """budget_steps is each size's budget (steps x (n / smallest)^exponent), not the knob."""
    spec = resolve_spec("scale", None, {"sizes": [400, 1600, 6400], "steps": 200, "steps_exponent": 0.66,
                                        "models": ["vit_p_7mf"], "seeds": [0]}, {"device": "cpu"})
    budgets = {t.n_train: t.extra["budget_steps"] for t in trials(spec)}
    assert budgets == {n: round(200 * (n / 400) ** 0.66) for n in (400, 1600, 6400)}
    assert budgets[6400] > budgets[400] == 200


def test_workers_option_and_its_hidden_old_name(tmp_path):
    from vitexp.cli import workers_option

    assert workers_option({"workers": 3, "trials_per_gpu": None}) == 3
    assert workers_option({"workers": None, "trials_per_gpu": 2}) == 2
    help_ = run_cli("stability", "--help").stdout
    assert "--workers" in help_ and "--trials-per-gpu" not in help_


def test_search_chooses_on_held_out_images_not_test_images():
    """Where the runs carry a held-out error, the search's best is the run best on it, even
    when another run has the lower test error; folders without one fall back to top1_err."""
    from vitexp.studies.tune import tune_best

    runs = pd.DataFrame({"optimizer": "adamw", "model": "vit_p_7mf", "status": "ok", "diverged": False,
                         "lr": [0.01, 0.1, 1.0], "wd": [0.1, 0.2, 0.3], "converged": True,
                         "top1_err": [20.0, 30.0, 40.0], "last_err": [21.0, 31.0, 41.0],
                         "val_err": [35.0, 25.0, 45.0]})
    best = tune_best(runs).iloc[0]
    assert (best["chosen_by"], best["lr"], best["last_err"]) == ("val_err", 0.1, 31.0)
    assert best["lr_edge"] == "" and best["median_err"] == 35.0
    old = tune_best(runs.drop(columns="val_err")).iloc[0]
    assert (old["chosen_by"], old["lr"]) == ("last_err", 0.01)


def test_a_folder_built_by_several_commands_knows_them_all(tmp_path):
    """Two commands into one folder (another model the second time): status counts both
    commands' trials and says how many commands; collect carries both."""
    from vitexp.store import TrialStore
    from vitexp.sweep import collect
    from vitexp.sweep.status import study_status

    base = {"samples": 1, "epochs": 1}
    train = {"n_train": 64, "n_test": 32, "batch_size": 32, "device": "cpu"}
    for model in ("vit_p_7mf", "vit_c_7mf"):
        run_study(resolve_spec("stability", None, {**base, "models": [model]}, train), tmp_path / "st")
    assert len(TrialStore(tmp_path / "st").spec_paths()) == 2
    lines = study_status(tmp_path / "st")
    assert "2 trials: 2 done" in lines[0] and "(2 commands)" in lines[0] and lines[-1].startswith("finished")
    collect([tmp_path / "st"], tmp_path / "merged")
    assert "2 trials: 2 done" in study_status(tmp_path / "merged")[0]
