"""Weights that outlive the trial: `weights/KEY.pt` holds the evaluated model (the EMA) at the
end of training (what last_err measures; no test evaluation chose it), the same after a kill and resume, written for small models unless asked not
to, counted by `status`, carried by `collect`."""

import pytest
import torch

import vitexp.trainer as trainer
from vitexp.config import TrainConfig
from vitexp.store import TrialStore
from vitexp.sweep import collect
from vitexp.trainer import run_trial

# lr high enough that the test error moves between epochs, so the final and the best evaluation differ
CFG = TrainConfig(model="vit_c_7mf", dataset="shapes", n_train=256, n_test=100, batch_size=64, epochs=4,
                  device="cpu", lr=0.2, wd=0.05, warmup_epochs=0.0, ema_decay=0.9)


class Kill(Exception):
    pass


def test_kept_weights_are_the_final_ema_not_the_best_test_evaluation(tmp_path, monkeypatch):
    snapshots = {}
    evaluate = trainer.test_epoch

    def spy(t, epoch):
        errs = evaluate(t, epoch)
        snapshots[epoch + 1] = {k: v.clone() for k, v in t.ema.module.state_dict().items()}
        return errs

    monkeypatch.setattr(trainer, "test_epoch", spy)
    row = run_trial(CFG, out=tmp_path)
    kept = torch.load(TrialStore(tmp_path).weights_path(CFG.key()), weights_only=False)
    assert kept["epoch"] == CFG.epochs and kept["last_err"] == row["last_err"] and kept["evaluated"] == "ema"
    assert "top1_err" not in kept  # the minimum over test evaluations chooses nothing
    want = snapshots[CFG.epochs]
    assert kept["state_dict"].keys() == want.keys()
    assert all(torch.equal(kept["state_dict"][k], want[k]) for k in want)
    # what a fine-tune or a teacher needs to rebuild it
    assert (kept["model"], kept["image_size"], kept["in_chans"], kept["num_classes"]) == ("vit_c_7mf", 32, 3, 10)


def test_a_killed_trial_keeps_the_same_weights_as_an_uninterrupted_one(tmp_path):
    run_trial(CFG, out=tmp_path / "whole")

    def die_after_epoch_3(ev):
        if ev["event"] == "epoch" and ev["epoch"] == 3:
            raise Kill

    with pytest.raises(Kill):
        run_trial(CFG, out=tmp_path / "killed", progress=die_after_epoch_3)
    run_trial(CFG, out=tmp_path / "killed")
    a, b = (torch.load(TrialStore(tmp_path / d).weights_path(CFG.key()), weights_only=False)["state_dict"]
            for d in ("whole", "killed"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_weights_are_kept_for_small_models_unless_asked_not_to(tmp_path, monkeypatch):
    run_trial(TrainConfig(**{**CFG.to_dict(), "keep_weights": False, "epochs": 1}), out=tmp_path / "off")
    assert not TrialStore(tmp_path / "off").kept_weights()
    monkeypatch.setattr(trainer, "KEEP_WEIGHTS_MAX_PARAMS", 1000)  # as if the model were paper-scale
    run_trial(TrainConfig(**{**CFG.to_dict(), "epochs": 1}), out=tmp_path / "big")
    assert not TrialStore(tmp_path / "big").kept_weights()
    one_epoch = TrainConfig(**{**CFG.to_dict(), "epochs": 1, "keep_weights": True})
    run_trial(one_epoch, out=tmp_path / "asked")
    assert TrialStore(tmp_path / "asked").kept_weights() == {one_epoch.key()}
    # an execution option: the key does not see it
    assert TrainConfig(**{**CFG.to_dict(), "keep_weights": True}).key() == CFG.key()


def test_collect_carries_the_weights(tmp_path):
    run_trial(TrainConfig(**{**CFG.to_dict(), "epochs": 1}), out=tmp_path / "a")
    src = TrialStore(tmp_path / "a")
    collect([tmp_path / "a"], tmp_path / "merged")
    (key,) = src.kept_weights()
    assert TrialStore(tmp_path / "merged").weights_path(key).read_bytes() == src.weights_path(key).read_bytes()


@pytest.mark.parametrize("damage", ["random", "truncated", "foreign"])
def test_damaged_kept_weights_are_one_line_and_the_source_is_untouched(tmp_path, cli, damage):
    """A weights/KEY.pt of random bytes, cut short, or a torch file that is not vitexp's:
    `finetune --from` and `train --teacher` say which file and what is wrong, exit 2, and
    leave the source folder as it was."""
    from conftest import assert_user_error

    src = tmp_path / "src"
    cfg = TrainConfig(**{**CFG.to_dict(), "epochs": 1})
    run_trial(cfg, out=src)
    path = TrialStore(src).weights_path(cfg.key())
    if damage == "random":
        path.write_bytes(bytes(range(256)) * 8)
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:300])
    else:
        torch.save({"something": torch.zeros(2)}, path)
    before = {p: p.read_bytes() for p in src.rglob("*") if p.is_file()}
    common = ["--dataset", "shapes", "--n-train", "64", "--n-test", "50", "--device", "cpu"]
    ft = cli("finetune", "--from", src, "--out", tmp_path / "ft", *common)
    assert_user_error(ft, str(path.name), "weights")
    taught = cli("train", "--model", "vit_p_7mf", "--teacher", src, "--out", tmp_path / "t", *common)
    assert_user_error(taught, str(path.name), "weights")
    assert {p: p.read_bytes() for p in src.rglob("*") if p.is_file()} == before
    assert not (tmp_path / "ft").exists() and not (tmp_path / "t").exists()


def test_the_store_stages_another_folders_weights_atomically_and_once(tmp_path, monkeypatch):
    from vitexp.store import weights_file

    src = TrialStore(tmp_path / "a")
    src.record("k" * 12, {"key": "k" * 12, "status": "ok"}, weights={"state_dict": {"w": torch.ones(2)}})
    path = src.weights_path("k" * 12)
    assert weights_file(path) == (tmp_path / "a", "k" * 12) and weights_file(tmp_path / "a" / "x.pt") is None
    before = path.read_bytes()
    dest = TrialStore(tmp_path / "b", create=False)
    dest.stage_weights(path, "k" * 12)
    assert dest.weights_path("k" * 12).read_bytes() == before == path.read_bytes()
    assert [p.name for p in dest.weights_path("k" * 12).parent.iterdir()] == ["k" * 12 + ".pt"]  # no temporary left
    written = []
    monkeypatch.setattr("vitexp.store.atomic_write", lambda p, c: written.append(p))
    dest.stage_weights(path, "k" * 12)  # already there: not copied again
    src.stage_weights(path, "k" * 12)  # its own file: nothing to do
    assert written == []
