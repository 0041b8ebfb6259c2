"""What a newcomer meets first: tables that fit 80 columns, lists given either way, help
texts that say what each command does, a version, one line for what slipped through."""

import pytest

from conftest import in_process


def test_models_takes_comma_and_space_lists_and_fits_80_columns(monkeypatch, capsys):
    code, comma, _ = in_process(monkeypatch, capsys, "models", "vit_p_7mf,vit_c_7mf", "resnet_7mf")
    assert code == 0
    _, spaced, _ = in_process(monkeypatch, capsys, "models", "vit_p_7mf", "vit_c_7mf", "resnet_7mf")
    assert comma == spaced and all(m in comma for m in ("vit_p_7mf", "vit_c_7mf", "resnet_7mf"))
    _, every, _ = in_process(monkeypatch, capsys, "models")
    assert max(len(ln) for ln in every.splitlines()) <= 80


def test_plot_commands_have_their_own_help(monkeypatch, capsys):
    helps = {c: in_process(monkeypatch, capsys, c, "--help")[1] for c in ("plot-cdf", "plot-scale", "plot-optimizer",
                                                                       "plot-tune")}
    assert "AdamW and an SGD" in helps["plot-cdf"] and "--n-boot" in helps["plot-cdf"]
    for c in ("plot-scale", "plot-optimizer"):
        assert "AdamW and an SGD" not in helps[c] and "--n-boot" not in helps[c]
    assert "an optimizer study" in helps["plot-optimizer"] and "--n-boot" in helps["plot-tune"]


def test_study_options_name_the_presets_values_and_there_is_a_version(monkeypatch, capsys):
    _, text, _ = in_process(monkeypatch, capsys, "scale-study", "--help")
    assert "KIND_DATASET" not in text and "scale_shapes: 400,1600,6400" in " ".join(text.split())
    code, out, _ = in_process(monkeypatch, capsys, "--version")
    assert code == 0 and out.startswith("vitexp ")


@pytest.mark.parametrize("command", ["plot-cdf", "report"])
def test_n_boot_zero_is_refused_before_anything_is_written(monkeypatch, capsys, tmp_path, command):
    from conftest import REPO

    folder = REPO / "results" / "stability_shapes_adamw"
    out = tmp_path / "out"
    code, _, err = in_process(monkeypatch, capsys, command, folder, "--out", out, "--n-boot", "0")
    assert code == 2 and "--n-boot must be at least 1" in err and not out.exists()


def test_an_empty_presets_folder_says_so(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("VITEXP_EXPERIMENTS", str(tmp_path / "none"))
    code, _, err = in_process(monkeypatch, capsys, "stability", "--preset", "mine", "--dry-run")
    assert code == 2 and "holds no presets" in err and "choose from: \n" not in err


def _tiny_stability(tmp_path):
    from vitexp.sweep import resolve_spec, run_study

    spec = resolve_spec("stability", None, {"samples": 2, "epochs": 1, "models": ["vit_p_7mf"]},
                        {"n_train": 64, "n_test": 32, "batch_size": 32, "device": "cpu"})
    runs = run_study(spec, tmp_path / "st")
    return tmp_path / "st", list(runs.key)


@pytest.mark.slow
def test_status_says_finished_stopped_with_the_resume_command_and_reads_odd_claims(monkeypatch, capsys, tmp_path):
    import json
    import shlex
    import socket
    import time

    from vitexp.store import TrialStore

    folder, keys = _tiny_stability(tmp_path)
    _, out, _ = in_process(monkeypatch, capsys, "status", folder)
    assert "finished: all 2 trials done" in out and "ETA" not in out
    store = TrialStore(folder, create=False)
    store.trial_path(keys[0]).unlink()
    _, out, _ = in_process(monkeypatch, capsys, "status", folder)
    resume = out.split("resume with: ")[1].strip()
    assert "stopped: 1 trial(s) left" in out and resume.startswith("vitexp stability --preset ")
    code, _, err = in_process(monkeypatch, capsys, *shlex.split(resume)[1:], "--no-progress")
    assert code == 0, err
    assert "finished: all 2 trials done" in in_process(monkeypatch, capsys, "status", folder)[1]
    # a claim from another host whose heartbeat says "n/a" images, one whose heartbeat lies in the future
    store.trial_path(keys[1]).unlink()
    claim = {"host": "elsewhere", "pid": 1, "time": time.time(), "beat": time.time(), "images": "n/a"}
    (folder / "claims" / keys[1]).write_text(json.dumps(claim))
    code, out, err = in_process(monkeypatch, capsys, "status", folder)
    assert code == 0 and "running" in out and "0% on elsewhere" in out, err
    claim["beat"] = time.time() + 86400
    (folder / "claims" / keys[1]).write_text(json.dumps(claim))
    _, out, _ = in_process(monkeypatch, capsys, "status", folder)
    assert "0 running" in out and "stopped: 1 trial(s) left" in out and socket.gethostname() != "elsewhere"
    code, _, err = in_process(monkeypatch, capsys, *shlex.split(resume)[1:], "--no-progress")  # no wait for tomorrow
    assert code == 0 and "in the future" in (folder / "log.txt").read_text(), err


def test_two_studies_started_together_on_one_folder_the_second_is_refused(tmp_path):
    """Both plans pass the folder check on the empty folder; the one that writes second is
    refused under the lock and leaves the first's folder as it was."""
    from vitexp.errors import UserError
    from vitexp.sweep import make_plan, resolve_spec, run
    from vitexp.tomlfile import dumps

    def plan(opt):
        spec = resolve_spec("stability", None, {"samples": 1, "epochs": 1, "models": ["vit_p_7mf"], "optimizer": opt},
                            {"n_train": 64, "n_test": 32, "batch_size": 32, "device": "cpu"})
        return make_plan(spec, tmp_path / "o")

    adamw, sgd = plan("adamw"), plan("sgd")
    sgd.store.claim_for(lambda: None, dumps(sgd.spec))  # the SGD study got there first
    before = (tmp_path / "o" / "study.toml").read_bytes()
    with pytest.raises(UserError, match="holds a stability study with optimizer sgd"):
        run(adamw, workers=1, progress=False)
    assert (tmp_path / "o" / "study.toml").read_bytes() == before
    assert not list((tmp_path / "o").glob("trials/*.json"))


def test_a_full_disk_mid_trial_keeps_the_checkpoint_and_the_rerun_resumes(monkeypatch, capsys, tmp_path):
    import vitexp.trainer
    from vitexp.fileio import DiskFull

    real, calls = vitexp.trainer.save_checkpoint, []

    def full_at_the_second(t, path):
        calls.append(path)
        if len(calls) == 2:
            raise DiskFull(f"no space left on the device of {path.parent}; free some space and rerun")
        real(t, path)

    monkeypatch.setattr(vitexp.trainer, "save_checkpoint", full_at_the_second)
    args = ["train", "--model", "vit_p_7mf", "--epochs", "3", "--n-train", "64", "--n-test", "32",
            "--batch-size", "32", "--device", "cpu", "--out", tmp_path / "t"]
    code, _, err = in_process(monkeypatch, capsys, *args)
    assert code == 2 and "no space left" in err and list((tmp_path / "t" / "checkpoints").glob("*.pt"))
    monkeypatch.setattr(vitexp.trainer, "save_checkpoint", real)
    code, out, err = in_process(monkeypatch, capsys, *args)
    assert code == 0 and "resumed from epoch 1 of 3" in err, err


def _live(width: int, monkeypatch):
    """A StudyProgress drawing to a terminal of WIDTH columns, and what it drew."""
    import io

    from rich.console import Console

    from vitexp import ui

    buf = io.StringIO()
    monkeypatch.setattr(ui, "console", Console(file=buf, width=width, force_terminal=True, color_system=None))
    return ui.StudyProgress(9, 900.0, enabled=True), buf


def test_the_live_line_keeps_counter_bar_and_eta_at_80_columns(monkeypatch):
    bar, buf = _live(80, monkeypatch)
    with bar:
        bar.start_trial("vit_p_7mf n=1600 sgd lr=2.4 wd=8.9e-05 40ep s0 " * 3, 100.0, 40)
        bar({"event": "epoch", "epoch": 4, "train_loss": 1.5})
        bar.progress.refresh()
        frame = buf.getvalue().split("\r")[-1]
    line = next(ln for ln in frame.splitlines() if "trials 0/9" in ln).replace("\x1b[2K", "")
    assert len(line) <= 80 and line.endswith("…"), line  # the trial's name is what gets cut
    assert line.index("0:00:") - line.index("0/9") >= 16 and " eta " in line, line  # the bar's 16 columns


def test_an_interrupted_live_line_is_not_left_behind(monkeypatch):
    from vitexp.errors import Interrupted

    bar, buf = _live(80, monkeypatch)
    with pytest.raises(Interrupted):
        with bar:
            bar.start_trial("vit_p_7mf n=1600", 100.0, 40)
            bar.progress.refresh()
            raise Interrupted(2)
    assert buf.getvalue().endswith("\x1b[2K")  # the live line erased: the CLI's one line takes its place


def test_the_eta_counts_each_trial_at_its_models_measured_speed():
    """Longest first: a long cheap trial ends; what is left is short but 10x costlier per image.
    An average over finished trials says 1 s; each trial's cost says 10 s."""
    from vitexp.ui import Eta

    eta = Eta([("a", 1000.0, 1.0), ("b", 100.0, 10.0)], workers=1)
    assert eta.seconds(running=500.0, elapsed=5.0) == pytest.approx(5.0 * 600 / 500)  # nothing finished yet
    eta.finished("a", 1000.0, 10.0)  # 100 images/s, 100 GF-images/s
    assert eta.seconds(running=0.0, elapsed=10.0) == pytest.approx(10.0)
    assert eta.seconds(running=50.0, elapsed=15.0) == pytest.approx(5.0)
    eta.finished("b", 100.0, 12.0)
    assert eta.seconds(running=0.0, elapsed=22.0) == 0.0


def test_a_run_waiting_for_a_claim_held_elsewhere_says_whose_and_when(tmp_path, monkeypatch, capsys):
    import json
    import time

    import vitexp.store
    from vitexp.sweep import execute, make_plan, resolve_spec, run

    spec = resolve_spec("stability", None, {"samples": 1, "epochs": 1, "models": ["vit_p_7mf"]},
                        {"n_train": 64, "n_test": 32, "batch_size": 32, "device": "cpu"})
    plan = make_plan(spec, tmp_path / "st")
    (key, _), = plan.trials
    (tmp_path / "st" / "claims").mkdir(parents=True)
    now = time.time()
    (tmp_path / "st" / "claims" / key).write_text(json.dumps({"host": "node7", "pid": 42, "time": now, "beat": now}))
    monkeypatch.setattr(vitexp.store, "STALE_S", 1.5)
    monkeypatch.setattr(execute, "STALE_S", 1.5)
    monkeypatch.setattr(execute, "WAIT_S", 0.2)
    run(plan, workers=1, progress=False)
    err = capsys.readouterr().err
    assert err.count("waiting for vit_p_7mf") == 1 and "held by node7 pid 42" in err, err
    assert "waiting for vit_p_7mf" in (tmp_path / "st" / "log.txt").read_text()


def test_redrawn_figures_have_the_same_bytes(tmp_path):
    from conftest import REPO
    from vitexp.report import draw

    src = REPO / "results" / "scale_shapes"
    first = {p.name: p.read_bytes() for p in draw("scale", [src], tmp_path / "a")}
    second = {p.name: p.read_bytes() for p in draw("scale", [src], tmp_path / "b")}
    assert first == second


@pytest.mark.parametrize("skip", [False, True])
def test_an_unreadable_image_is_named_in_one_line_or_left_out(monkeypatch, capsys, tmp_path, skip):
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("a", "b"):
            (tmp_path / "img" / split / cls).mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(tmp_path / "img" / split / cls / f"{i}.png")
    bad = tmp_path / "img" / "train" / "b" / "9.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    args = ["train", "--model", "resnet_7mf", "--dataset", f"imagefolder:{tmp_path / 'img'}", "--image-size", "32",
            "--epochs", "1", "--batch-size", "4", "--num-workers", "0", "--device", "cpu",
            "--out", tmp_path / "t"] + (["--skip-unreadable"] if skip else [])
    code, _, err = in_process(monkeypatch, capsys, *args)
    if not skip:
        assert code == 2 and f"cannot read image {bad}" in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "t").exists()
    else:
        assert code == 0, err
        assert f"left out 1 unreadable image file(s): {bad}" in (tmp_path / "t" / "log.txt").read_text()


def test_checking_a_large_shapes_request_generates_nothing(monkeypatch):
    """A dry run of a million shapes checks the count; it does not make 3 GB of images."""
    from vitexp.data import datasets
    from vitexp.errors import UserError

    monkeypatch.setattr(datasets, "_shapes", lambda *a: pytest.fail("generated images to check a count"))
    datasets.check_data("shapes", None, 1_000_000, 1000)
    with pytest.raises(UserError, match="at most"):
        datasets.check_data("shapes", None, datasets.SHAPES_MAX + 1, 1000)


def test_damaged_tables_get_one_line_and_a_read_only_finished_study_reruns(monkeypatch, capsys, tmp_path):
    import errno

    import pandas as pd

    from vitexp.store import TrialStore

    folder, _ = _tiny_stability(tmp_path)
    hist = pd.read_csv(folder / "history.csv")
    hist.drop(columns=["ema_err"]).to_csv(folder / "history.csv", index=False)
    code, out, err = in_process(monkeypatch, capsys, "plot-curves", folder, "--out", tmp_path / "f1")
    assert code == 0 and "curves.png" in out, err  # the test error stands in for the EMA's
    (folder / "history.csv").write_text("")
    code, _, err = in_process(monkeypatch, capsys, "plot-curves", folder, "--out", tmp_path / "f2")
    assert code == 2 and "history.csv is empty" in err
    runs = (folder / "runs.csv").read_text()
    pd.read_csv(folder / "runs.csv").drop(columns=["key"]).to_csv(folder / "runs.csv", index=False)
    code, _, err = in_process(monkeypatch, capsys, "plot-curves", folder, "--out", tmp_path / "f3")
    assert code == 2 and "lacks column(s) key" in err
    (folder / "runs.csv").write_text(runs[:-7])
    code, _, err = in_process(monkeypatch, capsys, "plot-cdf", folder, "--out", tmp_path / "f4")
    assert code == 2 and "ends mid-row" in err and not (tmp_path / "f4").exists()

    def read_only(self):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(TrialStore, "lock", read_only)
    code, _, err = in_process(monkeypatch, capsys, "stability", "--preset", folder / "study.toml", "--out", folder,
                       "--no-progress", "--no-plot")
    assert code == 0, err  # nothing to run: the records are read, nothing is written


def test_a_dry_run_out_of_memory_is_one_line(monkeypatch, capsys, tmp_path):
    from vitexp import bench

    def oom(cfg, steps):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(bench, "_images_per_s", oom)
    code, _, err = in_process(monkeypatch, capsys, "stability", "--dry-run", "--device", "cpu", "--image-size", "1024",
                       "--models", "vit_p_7mf", "--out", tmp_path / "o")
    assert code == 2 and "out of memory timing a few training steps" in err and "--image-size" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_a_folder_named_like_a_preset_in_the_working_directory_is_not_read_as_one(monkeypatch, tmp_path):
    """A copied results folder `scale_shapes` in the cwd: plain `scale-study` still plans the
    preset; a path (with a folder or .toml) is still read as one."""
    from vitexp.sweep import resolve_spec

    (tmp_path / "scale_shapes").mkdir()
    monkeypatch.chdir(tmp_path)
    assert resolve_spec("scale", None, {}, {})["study"]["kind"] == "scale"
    assert resolve_spec("scale", "scale_shapes", {}, {})["study"]["kind"] == "scale"
    with pytest.raises(Exception, match="is a folder"):
        resolve_spec("scale", "./scale_shapes", {}, {})


def test_train_says_which_lr_and_wd_and_where_from_and_a_preset_gives_its_tuned_values(cli, tmp_path):
    args = ["train", "--model", "vit_c_7mf", "--n-train", "128", "--n-test", "50", "--epochs", "1",
            "--batch-size", "64", "--device", "cpu"]
    zoo = cli(*args, "--dataset", "fashion-mnist", "--out", tmp_path / "a")
    assert zoo.returncode == 0, zoo.stderr
    first = zoo.stdout.splitlines()[0]
    assert "lr 0.038 at the reference batch 2048 (peak 0.00119 at batch 64)" in first
    assert "tuned on shapes" in first and "for fashion-mnist give --lr and --wd" in first
    preset = cli(*args, "--dataset", "fashion-mnist", "--preset", "scale_fashion-mnist_cpu", "--out", tmp_path / "b")
    assert "lr 0.043 at the reference batch 2048" in preset.stdout and "wd 0.0051: preset" in preset.stdout
    given = cli(*args, "--dataset", "shapes", "--lr", "0.01", "--wd", "0.1", "--out", tmp_path / "c")
    assert "wd 0.1: given" in given.stdout
    done = [ln for ln in given.stdout.splitlines() if ln.strip()]
    assert all(len(ln) <= 80 for ln in done) and "err " in given.stdout


def test_the_cpu_gets_the_cpu_preset_and_presets_lists_them_all(cli):
    from vitexp.sweep import resolve_spec
    from vitexp.sweep.presets import list_presets

    assert resolve_spec("scale", None, {}, {"dataset": "fashion-mnist", "device": "cpu"})["study"]["preset"] == \
        "scale_fashion-mnist_cpu"
    assert resolve_spec("scale", None, {}, {"dataset": "fashion-mnist", "device": "cuda"})["study"]["preset"] == \
        "scale_fashion-mnist"
    out = cli("presets", "--kind", "scale")
    assert out.returncode == 0, out.stderr
    rows = {ln.split()[0]: ln.split() for ln in out.stdout.splitlines()[2:]}
    assert set(rows) == set(list_presets("scale"))
    assert rows["scale_fashion-mnist_cpu"][1:5] == ["scale", "fashion-mnist", "cpu", "45"]
    assert rows["scale_fashion-mnist"][3] == "gpu" and rows["scale_shapes"][3] == "cpu"
    assert "claims" not in " ".join(rows)  # the claims file is not a preset


def test_a_dry_run_times_a_batch_that_fits_and_says_when_none_does(monkeypatch, capsys, tmp_path):
    """The timed steps shrink their batch to what the free memory holds; where one image would
    not fit, the dry run says its estimate is unavailable instead of allocating it."""
    from vitexp import bench
    from vitexp.config import TrainConfig

    cfg = TrainConfig(model="resnet_7mf", dataset="shapes", batch_size=128, image_size=256, device="cpu")
    info = __import__("vitexp").data.dataset_info("shapes")
    acts = __import__("vitexp").models.complexity("resnet_7mf", resolution=256, in_chans=3, num_classes=10)["acts_m"]
    per_image = acts * 1e6 * bench.TRAIN_BYTES_PER_ACT
    monkeypatch.setattr(bench, "free_memory", lambda dev: int(2 * 5.5 * per_image))  # room for 5 images
    assert bench.timing_batch(cfg, __import__("torch").device("cpu"), 256, info) == 4  # 32 -> 16 -> 8 -> 4
    monkeypatch.setattr(bench, "free_memory", lambda dev: int(per_image))  # not one
    code, out, _ = in_process(monkeypatch, capsys, "stability", "--dry-run", "--device", "cpu", "--image-size", "256",
                              "--models", "resnet_7mf", "--out", tmp_path / "o")
    assert code == 0 and "no time estimate" in out and "does not fit in memory" in out
    assert not (tmp_path / "o").exists()


def test_a_config_is_checked_when_it_is_made():
    from vitexp.config import TrainConfig
    from vitexp.errors import UserError

    for kw, needle in ((dict(model="vit_zz", lr=0.1), "unknown model 'vit_zz'"), (dict(lr=-1), "--lr must be"),
                       (dict(epochs="3"), "epochs must be int"), (dict(optimizer="lamb"), "unknown optimizer")):
        with pytest.raises(UserError, match=needle):
            TrainConfig(**kw)


@pytest.mark.slow
def test_the_notebook_example_runs(tmp_path):
    import subprocess
    import sys

    from conftest import REPO

    proc = subprocess.run([sys.executable, str(REPO / "examples" / "notebook.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=600, cwd=REPO,
                          env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "MMACs a 32 px image" in proc.stdout and "one trial: final test error" in proc.stdout
    assert (tmp_path / "study" / "runs.csv").exists() and "vit_c_7mf" in proc.stdout.splitlines()[-1]


def test_train_says_each_epoch_logs_and_status_reads_its_folder(cli, tmp_path):
    out = tmp_path / "t"
    ran = cli("train", "--model", "vit_c_7mf", "--dataset", "shapes", "--n-train", "128", "--n-test", "50",
              "--epochs", "2", "--batch-size", "64", "--device", "cpu", "--out", out)
    assert ran.returncode == 0, ran.stderr
    epochs = [ln for ln in (ran.stdout + ran.stderr).splitlines() if ln.startswith("epoch ")]
    assert [ln.split(":")[0] for ln in epochs] == ["epoch 1/2", "epoch 2/2"]
    assert all("loss" in ln and "lr" in ln and "EMA" in ln and "img/s" in ln for ln in epochs)
    log = (out / "log.txt").read_text()
    assert "train " in log and "lr@2048=" in log and ": err " in log
    status = cli("status", out)
    assert status.returncode == 0 and "train folder" in status.stdout and "err " in status.stdout


def test_a_dry_run_shows_what_differs_and_times_each_model_at_each_size_and_batch(monkeypatch):
    """A transfer study's fine-tunes differ from its pre-training in data set, batch and image
    size: the table shows those columns, and the time estimate counts each trial at the speed
    of its own model, size and batch."""
    from vitexp.bench import speed_key
    from vitexp.sweep import estimate_cost, make_plan, resolve_spec

    spec = resolve_spec("transfer", "transfer_shapes", {"models": ["vit_c_7mf"], "sizes": [200], "seeds": [0]}, {})
    plan = make_plan(spec, "/tmp/never-written")
    keys = {speed_key(t) for _, t in plan.trials}
    assert len(keys) >= 2 and any("64 px" in k for k in keys)
    speeds = {k: (100.0 if "64 px" in k else 1000.0) for k in keys}
    slow = estimate_cost(plan, speeds)["seconds"]
    fast = estimate_cost(plan, {k: 1000.0 for k in keys})["seconds"]
    assert slow > fast  # the 64 px fine-tunes are counted at their own speed
