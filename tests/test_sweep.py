"""The sweep layer: worker processes equal one process, the default worker count, figures
after a packed study, and a toy study kind defined here alone running end to end."""

import os
from pathlib import Path

import pandas as pd
import pytest

from conftest import run_cli
from vitexp import report, runtime, studies
from vitexp.studies.base import Knob, Study, int_knob, ints
from vitexp.sweep import collect, execute, make_plan, plan, pool, resolve_spec, run, run_study


@pytest.mark.slow
def test_packed_trials_equal_one_by_one(tmp_path):
    spec = resolve_spec("stability", None, {"samples": 2, "epochs": 1, "models": ["vit_p_25mf"]},
                        {"n_train": 96, "n_test": 64, "batch_size": 32, "device": "cpu"})
    one = run_study(spec, tmp_path / "one")
    packed = run(make_plan(spec, tmp_path / "packed"), workers=2, progress=False)
    a, b = (d.set_index("key").sort_index() for d in (one, packed))
    assert list(a.index) == list(b.index) and len(a) == 2
    for c in ("top1_err", "last_err", "lr", "wd"):
        assert a[c].equals(b[c]), c
    assert (b.train_loss - a.train_loss).abs().max() < 1e-4  # workers use fewer threads: float sum order


def test_the_longest_trials_start_first(tmp_path, monkeypatch):
    """Workers end together when the long trials go first (nothing trains here)."""
    order = []
    monkeypatch.setattr(execute, "run_trials", lambda store, todo, *a: order.extend(c.n_train for _, c in todo))
    monkeypatch.setattr(execute, "preflight", lambda *a: None)
    spec = resolve_spec("scale", None, {"sizes": [200, 800, 400], "steps": 1, "min_epochs": 1, "seeds": [0],
                                        "models": ["vit_p_7mf"], "fewshot": []}, {"device": "cpu", "batch_size": 32})
    run(make_plan(spec, tmp_path), workers=1, progress=False)
    assert order == [800, 400, 200]


def test_equally_long_trials_take_turns_across_models(tmp_path):
    """A stability study stopped early has as many runs of each model, longest still first."""
    spec = resolve_spec("optimizer", None, {"epochs": [1, 2], "seeds": [0, 1, 2], "optimizers": ["adamw"],
                                            "models": ["vit_p_7mf", "resnet_7mf"]},
                        {"device": "cpu", "n_train": 64, "batch_size": 32})
    order = [(c.epochs, c.model) for _, c in plan.start_order(make_plan(spec, tmp_path).pending())]
    assert order == [(2, "vit_p_7mf"), (2, "resnet_7mf")] * 3 + [(1, "vit_p_7mf"), (1, "resnet_7mf")] * 3


@pytest.mark.slow
@pytest.mark.parametrize("cores,asked,workers", [(3, None, 2), (1, None, 0), (2, 1, 0)])
def test_cpu_studies_run_one_single_thread_worker_per_core(tmp_path, monkeypatch, cores, asked, workers):
    """The default on the CPU: min(cores, trials to run) worker processes; one core or an
    explicit --workers 1: in this process (workers 0)."""
    monkeypatch.setattr(runtime, "cores", lambda: cores)
    started, watch = [], pool.watch
    monkeypatch.setattr(pool, "watch", lambda procs, *a: started.extend(procs) or watch(procs, *a))
    spec = resolve_spec("stability", None, {"samples": 2, "epochs": 1, "models": ["vit_p_7mf"]},
                        {"n_train": 64, "n_test": 32, "batch_size": 32, "device": "cpu"})
    runs = run(make_plan(spec, tmp_path), workers=asked, progress=False)
    assert len(runs) == 2 and (runs.status == "ok").all()
    assert len(started) == workers and all(p.exitcode == 0 for p in started)
    pids = {int(ln.split()[2]) for ln in (tmp_path / "log.txt").read_text().splitlines() if " trial " in ln}
    assert (pids == {os.getpid()}) if workers == 0 else (os.getpid() not in pids)


@pytest.mark.slow
def test_a_packed_study_draws_its_figure(tmp_path):
    p = run_cli("scale-study", "--sizes", "64,128", "--steps", "2", "--min-epochs", "1", "--models", "vit_p_7mf",
                "--seeds", "0", "--fewshot", "", "--n-test", "32", "--batch-size", "32", "--device", "cpu",
                "--workers", "2", "--out", tmp_path, "--no-progress")
    assert p.returncode == 0, p.stderr
    assert len(pd.read_csv(tmp_path / "runs.csv")) == 2 and (tmp_path / "figures" / "scale.png").exists()


class Toy(Study):
    """A study kind a user might add: every model at a few learning rates (the test's own)."""

    kind = "toy"
    command = "toy-study"
    title = "Toy: error vs lr"
    knobs = (Knob("lrs", float, "comma-separated learning rates", many=True), Knob("epochs", int, "epochs"))
    needs = ("model", "lr", "top1_err")

    def trials(self, spec, base, trial):
        s = spec["study"]
        return [trial(model=m, lr=float(lr), wd=0.0, epochs=int_knob(s, "epochs", 1), seed=seed,
                      extra={"lr_index": i})
                for m in s["models"] for i, lr in enumerate(s["lrs"]) for seed in ints(s.get("seeds", [0]), "seeds")]

    def tables(self, runs, n_boot=2500, seed=0):
        return [("h3", "Toy table: error by lr"), ("table", runs.pivot_table(index="model", columns="lr",
                                                                             values="top1_err").reset_index())]

    def must_converge(self, runs):
        return runs


@pytest.mark.slow
def test_a_toy_study_kind_runs_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setitem(studies.STUDIES, "toy", Toy())
    preset = tmp_path / "toy.toml"
    preset.write_text('[study]\nkind = "toy"\nmodels = ["vit_p_7mf"]\nlrs = [0.01, 0.03]\nepochs = 1\n'
                      '[train]\nn_train = 64\nn_test = 32\nbatch_size = 32\ndevice = "cpu"\n')
    for shard in ("a", "b"):
        spec = resolve_spec("toy", str(preset), {"lrs": [0.01] if shard == "a" else [0.03]}, {})
        runs = run_study(spec, tmp_path / shard)
        assert len(runs) == 1 and runs.study.iloc[0] == "toy" and runs.lr_index.iloc[0] == 0
    merged = collect([tmp_path / "a", tmp_path / "b"], tmp_path / "merged")
    assert sorted(merged.lr) == [0.01, 0.03]
    paths = report.write_report([tmp_path / "merged"])
    md = Path(paths[0]).read_text()
    assert "Toy: error vs lr" in md and "Toy table: error by lr" in md
    assert "did not converge" in md  # one epoch, one evaluation: the rule cannot call it converged
