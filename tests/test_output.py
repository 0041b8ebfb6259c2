"""What a researcher sees: output that reads whole when piped or narrow, learning curves,
history.csv that needs no join, a dry run that predicts, `vitexp status`, help that
tells the truth."""

import pandas as pd
import pytest

from conftest import run_cli
from vitexp.rows import HISTORY_COLUMNS, HISTORY_IDENTITY

NARROW = {"COLUMNS": "80"}
TINY = ["--n-train", "64", "--n-test", "32", "--batch-size", "32", "--device", "cpu"]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("st") / "st"
    p = run_cli("stability", "--models", "vit_p_7mf,vit_c_7mf", "--samples", "2", "--epochs", "2", *TINY,
                "--workers", "2", "--out", out, env=NARROW)
    assert p.returncode == 0, p.stderr
    return out, p


@pytest.mark.slow
def test_piped_progress_keeps_count_time_and_eta_and_cuts_nothing(study):
    _, p = study
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 4 and "…" not in p.stderr + p.stdout
    for i, ln in enumerate(lines, 1):
        assert ln.startswith(f"[{i}/4 0:") and " eta " in ln and ": err " in ln
    assert "vit_p_7mf" in p.stderr and "vit_c_7mf" in p.stderr  # names whole, the twins told apart
    assert "ui.py" not in p.stderr  # plain lines, no source paths


@pytest.mark.slow
def test_dry_run_prints_whole_predicts_the_time_and_checks_the_folder(tmp_path):
    p = run_cli("scale-study", "--dry-run", *TINY[-2:], "--out", tmp_path / "s", env=NARROW)
    assert p.returncode == 0, p.stderr
    assert "…" not in p.stdout and "vit_p_7mf" in p.stdout and "vit_c_7mf" in p.stdout
    assert "estimated" in p.stdout and "min on this machine" in p.stdout and "img/s" in p.stdout
    assert all(len(ln) <= 80 for ln in p.stdout.splitlines() if str(tmp_path) not in ln), p.stdout
    assert not (tmp_path / "s").exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "study.toml").write_text('[study]\nkind = "stability"\n[train]\ndataset = "shapes"\n')
    p = run_cli("scale-study", "--dry-run", "--out", other)
    assert p.returncode == 2 and "holds a stability study" in p.stderr  # what the real run would refuse


@pytest.mark.slow
def test_bench_prints_whole_when_piped(tmp_path):
    p = run_cli("bench", "--model", "vit_c_7mf", "--batch-size", "16", "--steps", "2", "--warmup", "1",
                "--device", "cpu", "--csv", tmp_path / "b.csv", env=NARROW)
    assert p.returncode == 0, p.stderr
    assert "…" not in p.stdout and "images_per_s" in p.stdout and "data_frac" in p.stdout
    assert "mfu: not given on a CPU" in p.stdout


@pytest.mark.slow
def test_history_carries_the_identifying_columns(study):
    out, _ = study
    hist = pd.read_csv(out / "history.csv")
    runs = pd.read_csv(out / "runs.csv").set_index("key")
    assert list(hist.columns) == HISTORY_COLUMNS + list(HISTORY_IDENTITY)
    for h in hist.itertuples():
        r = runs.loc[h.key]
        assert (h.model, h.trial_lr, h.wd, h.seed, h.optimizer) == (r.model, r.lr, r.wd, r.seed, r.optimizer)


@pytest.mark.slow
def test_plot_curves_draws_the_best_trial_per_model(study, tmp_path):
    out, _ = study
    p = run_cli("plot-curves", out, "--out", tmp_path)
    assert p.returncode == 0, p.stderr
    table = pd.read_csv(tmp_path / "curves.csv")
    runs = pd.read_csv(out / "runs.csv")
    best = runs.loc[runs.groupby(["model", "optimizer"]).last_err.idxmin(), "key"]
    assert set(table.key) == set(best) and (tmp_path / "curves.png").exists()
    assert len(table) == 2 * len(best)  # every epoch of each
    p = run_cli("plot-curves", out, "--all", "--out", tmp_path / "all")
    assert set(pd.read_csv(tmp_path / "all" / "curves.csv").key) == set(runs.key)


@pytest.mark.slow
def test_status_tells_done_running_failed_left(study, tmp_path):
    out, _ = study
    p = run_cli("status", out)
    assert p.returncode == 0, p.stderr
    assert "stability study" in p.stdout and "4 trials: 4 done (4 with kept weights), 0 running, 0 failed, 0 left" in p.stdout
    p = run_cli("status", tmp_path)
    assert p.returncode == 2 and "holds no study" in p.stderr


@pytest.mark.slow
def test_help_is_plain_and_true():
    p = run_cli("stability", "--help", env=NARROW)
    assert p.returncode == 0 and "<bool>" not in p.stdout and "…" not in p.stdout
    assert "[default: runs/PRESET-OPTIMIZER]" in " ".join(p.stdout.split()).replace("- ", "-")
    p = run_cli("train", "--help")
    assert "--fewshot" in p.stdout and "1,5,10" in p.stdout and "comma-separated" in " ".join(p.stdout.split())
    helps = {c: run_cli(c, "--help").stdout for c in ("plot-scale", "plot-optimizer", "plot-cdf")}
    assert len({h.split("Options")[0] for h in helps.values()}) == 3  # each says what it draws


@pytest.mark.slow
def test_models_table_says_its_classes(tmp_path):
    p = run_cli("models", "vit_p_7mf", "--classes", "10", env={"VITEXP_CACHE": str(tmp_path)})
    assert p.returncode == 0 and "a 10-way head" in p.stdout and "0.39" in p.stdout
    p = run_cli("models", "vit_p_7mf", env={"VITEXP_CACHE": str(tmp_path)})
    assert "a 1000-way head" in p.stdout and "0.45" in p.stdout
    assert (tmp_path / "complexity.json").exists()  # counted once, then read


@pytest.mark.slow
def test_tensorboard_logs_every_epoch(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    p = run_cli("train", "--model", "vit_p_7mf", "--epochs", "2", *TINY, "--tensorboard", "--out", tmp_path)
    assert p.returncode == 0, p.stderr
    (run,) = (tmp_path / "tensorboard").iterdir()
    acc = EventAccumulator(str(run))
    acc.Reload()
    assert {"train_loss", "ema_err", "lr"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("train_loss")] == [1, 2]


def test_curve_labels_name_what_differs_between_the_curves():
    from vitexp.plots import _varying

    chosen = pd.DataFrame({"model": ["m", "m"], "n_train": [400, 1600], "lr": [0.1, 0.1], "wd": [1e-4, 1e-4],
                           "seed": [0, 0], "epochs": [64, 40]})
    assert _varying(chosen, chosen.iloc[0]) == ["n=400", "64ep"]
    # one curve: nothing to tell apart but its training images (a scale study's best is one of its sizes)
    assert _varying(chosen.iloc[:1], chosen.iloc[0]) == ["n=400"]


def test_trial_label_tells_a_distilled_or_fine_tuned_trial_from_its_plain_twin():
    from vitexp.config import TrainConfig
    from vitexp.ui import trial_label

    plain = TrainConfig(model="vit_p_7mf", dataset="shapes", n_train=400, lr=0.1, wd=0.05, epochs=3).to_dict()
    source = {"key": "abc123def456", "model": "resnet_7mf", "dataset": "shapes", "n_train": 400, "image_size": 32}
    taught = trial_label({**plain, "teacher": source})
    tuned = trial_label({**plain, "model": "resnet_7mf", "init_from": source})
    assert taught.startswith(trial_label(plain)) and taught.endswith("(teacher resnet_7mf n=400)")
    assert tuned.endswith("(from resnet_7mf n=400)")
    assert trial_label({**plain, "teacher": "{}"}) == trial_label(plain)  # a CSV row's empty teacher


def test_the_report_says_what_elapsed_and_compute_mean(tmp_path):
    from vitexp.report import write_report
    from conftest import REPO

    md = write_report([REPO / "results" / "scale_shapes"], tmp_path / "r")[0].read_text()
    assert "elapsed: from the first trial's start to the last one's end, pauses between runs included" in md
    assert "compute: the trials' own wall times summed" in md
