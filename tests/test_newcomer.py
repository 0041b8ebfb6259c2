"""What a newcomer meets first: tables that fit 80 columns, lists given either way, help
texts that say what each command does, a version, one line for what slipped through."""

import sys

import pytest

from vitexp.cli import main


def cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """Run vitexp in this process: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["vitexp", *map(str, args)])
    monkeypatch.setenv("COLUMNS", "80")
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code or 0
    out, err = capsys.readouterr()
    return code, out, err


def test_models_takes_comma_and_space_lists_and_fits_80_columns(monkeypatch, capsys):
    code, comma, _ = cli(monkeypatch, capsys, "models", "vit_p_7mf,vit_c_7mf", "resnet_7mf")
    assert code == 0
    _, spaced, _ = cli(monkeypatch, capsys, "models", "vit_p_7mf", "vit_c_7mf", "resnet_7mf")
    assert comma == spaced and all(m in comma for m in ("vit_p_7mf", "vit_c_7mf", "resnet_7mf"))
    _, every, _ = cli(monkeypatch, capsys, "models")
    assert max(len(ln) for ln in every.splitlines()) <= 80


def test_plot_commands_have_their_own_help(monkeypatch, capsys):
    helps = {c: cli(monkeypatch, capsys, c, "--help")[1] for c in ("plot-cdf", "plot-scale", "plot-optimizer",
                                                                       "plot-tune")}
    assert "AdamW and an SGD" in helps["plot-cdf"] and "--n-boot" in helps["plot-cdf"]
    for c in ("plot-scale", "plot-optimizer"):
        assert "AdamW and an SGD" not in helps[c] and "--n-boot" not in helps[c]
    assert "an optimizer study" in helps["plot-optimizer"] and "--n-boot" in helps["plot-tune"]


def test_study_options_name_the_presets_values_and_there_is_a_version(monkeypatch, capsys):
    _, text, _ = cli(monkeypatch, capsys, "scale-study", "--help")
    assert "KIND_DATASET" not in text and "scale_shapes: 400,1600,6400" in " ".join(text.split())
    code, out, _ = cli(monkeypatch, capsys, "--version")
    assert code == 0 and out.startswith("vitexp ")


@pytest.mark.parametrize("command", ["plot-cdf", "report"])
def test_n_boot_zero_is_refused_before_anything_is_written(monkeypatch, capsys, tmp_path, command):
    from conftest import REPO

    folder = REPO / "results" / "stability_shapes_adamw"
    out = tmp_path / "out"
    code, _, err = cli(monkeypatch, capsys, command, folder, "--out", out, "--n-boot", "0")
    assert code == 2 and "--n-boot must be at least 1" in err and not out.exists()


def test_an_empty_presets_folder_says_so(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("VITEXP_EXPERIMENTS", str(tmp_path / "none"))
    code, _, err = cli(monkeypatch, capsys, "stability", "--preset", "mine", "--dry-run")
    assert code == 2 and "holds no presets" in err and "choose from: \n" not in err


def _tiny_stability(tmp_path):
    from vitexp.sweep import resolve_spec, run_study

    spec = resolve_spec("stability", None, {"samples": 2, "epochs": 1, "models": ["vit_p_7mf"]},
                        {"n_train": 64, "n_test": 32, "batch_size": 32, "device": "cpu"})
    runs = run_study(spec, tmp_path / "st")
    return tmp_path / "st", list(runs.key)


def test_status_says_finished_stopped_with_the_resume_command_and_reads_odd_claims(monkeypatch, capsys, tmp_path):
    import json
    import shlex
    import socket
    import time

    from vitexp.store import TrialStore

    folder, keys = _tiny_stability(tmp_path)
    _, out, _ = cli(monkeypatch, capsys, "status", folder)
    assert "finished: all 2 trials done" in out and "ETA" not in out
    store = TrialStore(folder, create=False)
    store.trial_path(keys[0]).unlink()
    _, out, _ = cli(monkeypatch, capsys, "status", folder)
    resume = out.split("resume with: ")[1].strip()
    assert "stopped: 1 trial(s) left" in out and resume.startswith("vitexp stability --preset ")
    code, _, err = cli(monkeypatch, capsys, *shlex.split(resume)[1:], "--no-progress")
    assert code == 0, err
    assert "finished: all 2 trials done" in cli(monkeypatch, capsys, "status", folder)[1]
    # a claim from another host whose heartbeat says "n/a" images, one whose heartbeat lies in the future
    store.trial_path(keys[1]).unlink()
    claim = {"host": "elsewhere", "pid": 1, "time": time.time(), "beat": time.time(), "images": "n/a"}
    (folder / "claims" / keys[1]).write_text(json.dumps(claim))
    code, out, err = cli(monkeypatch, capsys, "status", folder)
    assert code == 0 and "running" in out and "0% on elsewhere" in out, err
    claim["beat"] = time.time() + 86400
    (folder / "claims" / keys[1]).write_text(json.dumps(claim))
    _, out, _ = cli(monkeypatch, capsys, "status", folder)
    assert "0 running" in out and "stopped: 1 trial(s) left" in out and socket.gethostname() != "elsewhere"
    code, _, err = cli(monkeypatch, capsys, *shlex.split(resume)[1:], "--no-progress")  # no wait for tomorrow
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
    code, _, err = cli(monkeypatch, capsys, *args)
    assert code == 2 and "no space left" in err and list((tmp_path / "t" / "checkpoints").glob("*.pt"))
    monkeypatch.setattr(vitexp.trainer, "save_checkpoint", real)
    code, out, err = cli(monkeypatch, capsys, *args)
    assert code == 0 and "resumed from epoch 1 of 3" in err, err
