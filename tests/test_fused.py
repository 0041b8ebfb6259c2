"""Fused trials: each member equals its unfused trial, a diverging member leaves the
others alone, a killed group resumes, the sweep groups what can fuse."""

import pandas as pd
import pytest

import vitexp.fused
from conftest import run_cli
from vitexp.config import TrainConfig
from vitexp.fused import fuse_key, groups, run_group
from vitexp.store import TrialStore
from vitexp.sweep import make_plan, resolve_spec, run
from vitexp.trainer import run_trial

TINY = dict(n_train=256, n_test=128, batch_size=64, epochs=2, device="cpu", wd=0.05, warmup_epochs=0.0)
MEMBERS = [(0.01, 0), (0.03, 1), (0.02, 2)]  # (lr, seed): subsets differ with the seed too
LOSS_RTOL = 1e-4
# vmap batches the convolutions and BatchNorm of a CNN into other kernels, whose float sums
# differ in the last bits from the unbatched ones: a test error may differ by one image
ONE_IMAGE = 100 / TINY["n_test"]
# A CNN's members are not bit-equal to their trials: vmap runs each conv as a grouped conv whose
# float sums go in another order, so the first step's gradients already differ by ~1e-5 relative
# (measured; its BatchNorm statistics agree to the last bit and its loss to 1e-6: the first-step test),
# and SGD amplifies that over two epochs to at most 1.6e-3 of the training loss and 3 test images
# (measured on an AMD EPYC and an Intel Xeon). This is the real tolerance of a fused CNN.
CNN_LOSS_RTOL = 3e-3
CNN_IMAGES = 3 * ONE_IMAGE


def configs(model, lrs=MEMBERS, **kw):
    return [TrainConfig(model=model, lr=lr, seed=s, subset_seed=s, **{**TINY, **kw}) for lr, s in lrs]


def assert_same_history(a: pd.DataFrame, b: pd.DataFrame, cnn: bool = False) -> None:
    assert list(a.epoch) == list(b.epoch)
    assert ((a.train_loss - b.train_loss).abs() / a.train_loss).max() < (CNN_LOSS_RTOL if cnn else LOSS_RTOL)
    for col in ("test_err", "ema_err"):
        assert (a[col] - b[col]).abs().max() <= (CNN_IMAGES if cnn else ONE_IMAGE) + 1e-9, col


@pytest.mark.slow
@pytest.mark.parametrize("model,precise_bn", [("vit_p_7mf", 0), ("vit_c_7mf", 0), ("resnet_7mf", 0),
                                              ("resnet_7mf", 128)])  # ViT_C and ResNet: BatchNorm
def test_each_member_equals_its_unfused_trial(tmp_path, model, precise_bn):
    cfgs = configs(model, precise_bn=precise_bn)
    for c in cfgs:
        run_trial(c, out=tmp_path / "one")
    run_group(cfgs, TrialStore(tmp_path / "fused"))
    TrialStore(tmp_path / "fused").rebuild()  # the tables follow when a run ends: here, by hand
    one, fused = (pd.read_csv(tmp_path / d / "history.csv", dtype={"key": str}) for d in ("one", "fused"))
    runs = pd.read_csv(tmp_path / "fused" / "runs.csv", dtype={"key": str})
    assert sorted(runs.key) == sorted(c.key() for c in cfgs) and set(runs.fused_k) == {3}  # the unfused keys
    for key in runs.key:
        assert_same_history(one[one.key == key].reset_index(), fused[fused.key == key].reset_index(),
                            cnn=model.startswith("resnet"))


def test_a_fused_cnn_step_equals_the_unfused_one_up_to_the_order_of_float_sums():
    """Where a fused CNN member parts from its trial: not in BatchNorm (its statistics agree to
    the last bit, the loss to 1e-6) but in the conv gradients' float sums (~1e-5 relative)."""
    import torch

    from vitexp.fused import _fused_losses, setup_group
    from vitexp.trainer import setup_trial

    cfgs = [c.validate().resolved() for c in configs("resnet_7mf", MEMBERS[:2])]
    g, alone = setup_group(cfgs, None), [setup_trial(c) for c in cfgs]
    for t in g.members + alone:
        t.train_loader.set_epoch(0)
        t.net.train()
    batches = [next(iter(t.train_loader)) for t in g.members]
    losses = _fused_losses(g, torch.stack([x for x, _ in batches]), torch.stack([y for _, y in batches]))
    losses.sum().backward()
    for i, t in enumerate(alone):
        loss = t.criterion(t.net(batches[i][0]), batches[i][1])
        loss.backward()
        assert abs(losses[i].item() - loss.item()) <= 1e-6 * loss.item()
        member = g.members[i].model
        for (name, a), b in zip(member.named_buffers(), t.model.buffers()):
            assert torch.equal(a, b), name
        for (name, a), b in zip(member.named_parameters(), t.model.parameters()):
            assert (a.grad - b.grad).abs().max() <= 1e-4 * b.grad.abs().max(), name


def test_a_fused_step_keeps_cuda_attention_on_the_math_backend(monkeypatch):
    """Under vmap on CUDA the memory-efficient SDPA kernel's backward rejects the batched
    logsumexp ('LSE is not correctly aligned', an H200 run: every fused group fell back to one
    by one), so the fused step runs attention on the math backend there; the CPU keeps torch's choice."""
    import torch

    from vitexp.fused import _fused_losses, attention_under_vmap, setup_group

    b = torch.backends.cuda
    with attention_under_vmap(torch.device("cuda")):
        assert b.math_sdp_enabled() and not (b.mem_efficient_sdp_enabled() or b.flash_sdp_enabled()
                                             or b.cudnn_sdp_enabled())
    with attention_under_vmap(torch.device("cpu")):
        assert b.mem_efficient_sdp_enabled() and b.flash_sdp_enabled()
    assert b.mem_efficient_sdp_enabled()  # restored on the way out
    seen = []
    monkeypatch.setattr(vitexp.fused, "attention_under_vmap", lambda d: seen.append(d) or attention_under_vmap(d))
    g = setup_group([c.validate().resolved() for c in configs("vit_p_7mf", MEMBERS[:2])], None)
    batches = [next(iter(t.train_loader)) for t in g.members]
    losses = _fused_losses(g, torch.stack([x for x, _ in batches]), torch.stack([y for _, y in batches]))
    assert seen == [torch.device("cpu")] and losses.shape == (2,)


@pytest.mark.slow
def test_a_diverging_member_leaves_the_others_alone(tmp_path):
    cfgs = configs("vit_c_7mf", [(0.01, 0), (1e4, 1), (0.02, 2)])
    rows = {r["key"]: r for r in run_group(cfgs, TrialStore(tmp_path / "fused"))}
    bad = rows[cfgs[1].key()]
    assert bad["diverged"] and bad["top1_err"] == 100.0 and bad["fused_k"] == 3
    for c in (cfgs[0], cfgs[2]):
        alone = run_trial(c, out=tmp_path / "one")
        assert not rows[c.key()]["diverged"]
        assert abs(rows[c.key()]["train_loss"] - alone["train_loss"]) / alone["train_loss"] < LOSS_RTOL
        assert abs(rows[c.key()]["top1_err"] - alone["top1_err"]) <= ONE_IMAGE + 1e-9


@pytest.mark.slow
def test_a_killed_group_resumes_to_the_same_rows(tmp_path):
    cfgs = configs("vit_p_7mf", epochs=3)
    whole = {r["key"]: r for r in run_group(cfgs, TrialStore(tmp_path / "whole"))}

    def die_after_epoch_2(event):
        if event["event"] == "epoch" and event["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_group(cfgs, TrialStore(tmp_path / "killed"), progress=die_after_epoch_2)
    store = TrialStore(tmp_path / "killed")
    assert all(store.checkpoint_path(c.key()).exists() for c in cfgs) and not store.finished()
    resumed = {r["key"]: r for r in run_group(cfgs, store)}
    for key, row in whole.items():
        for col in ("top1_err", "last_err", "train_loss", "epochs_run"):
            assert resumed[key][col] == row[col], col


def test_what_fuses_and_how_the_sweep_groups_it():
    base = TrainConfig(model="vit_p_7mf", **TINY)
    assert fuse_key(base) == fuse_key(TrainConfig(model="vit_p_7mf", **{**TINY, "lr": 0.5, "wd": 0.1}, seed=3))
    assert fuse_key(TrainConfig(model="vit_c_7mf", **TINY)) != fuse_key(base)
    assert fuse_key(TrainConfig(model="vit_p_7mf", **{**TINY, "epochs": 3})) != fuse_key(base)
    assert fuse_key(TrainConfig(model="vit_p_7mf", dropout=0.1, **TINY)) is None  # draws from the global stream
    todo = [(str(i), TrainConfig(model=m, seed=i, **TINY)) for i, m in enumerate(["vit_p_7mf"] * 5 + ["vit_c_7mf"])]
    sizes = [[k for k, _ in g] for g in groups(todo, 3)]
    assert sizes == [["0", "1", "2"], ["3", "4"], ["5"]]
    assert groups(todo, 1) == [[t] for t in todo]


@pytest.mark.slow
def test_a_fused_study_gives_the_rows_of_an_unfused_one(tmp_path, monkeypatch):
    spec = resolve_spec("stability", None, {"samples": 4, "epochs": 2, "models": ["vit_p_7mf"]},
                        {"n_train": 128, "n_test": 64, "batch_size": 32, "device": "cpu"})
    calls = []
    real = vitexp.fused.run_group
    monkeypatch.setattr(vitexp.fused, "run_group", lambda cfgs, *a, **k: calls.append(len(cfgs)) or real(cfgs, *a, **k))
    plain = run(make_plan(spec, tmp_path / "plain"), workers=1, progress=False, fuse=1)
    fused = run(make_plan(spec, tmp_path / "fused"), workers=1, progress=False, fuse=3)
    assert calls == [3]  # 4 trials: a group of 3, the 4th alone
    a, b = (d.set_index("key").sort_index() for d in (plain, fused))
    assert list(a.index) == list(b.index) and sorted(b.fused_k) == [1, 3, 3, 3]
    assert ((a.train_loss - b.train_loss).abs() / a.train_loss).max() < LOSS_RTOL
    assert (a.top1_err - b.top1_err).abs().max() <= 100 / 64 + 1e-9


@pytest.mark.slow
def test_the_cli_fuses_on_request(tmp_path):
    args = ["stability", "--models", "vit_c_7mf", "--samples", "3", "--epochs", "1", "--n-train", "128",
            "--n-test", "64", "--batch-size", "32", "--device", "cpu", "--no-plot", "--workers", "1"]
    p = run_cli(*args, "--fuse", "3", "--out", tmp_path / "f")
    assert p.returncode == 0, p.stderr
    assert "(fused 3)" in p.stderr and set(pd.read_csv(tmp_path / "f" / "runs.csv").fused_k) == {3}
