"""torch.compile on the CPU, as CI runs it: a compiled trial learns what the eager one
learns (within float tolerance: inductor fuses and reorders float sums), resumes after a
kill compiled or not, compiles two graphs (training, evaluation: no recompile for the last
partial test batch), keeps its key, and composes with DDP in the order torch documents."""

import dataclasses

import pandas as pd
import pytest
import torch

from vitexp.config import TrainConfig
from vitexp.store import TrialStore
from vitexp.trainer import run_trial

# n_test 100 at batch 64: the last test batch is partial, the case that would recompile
CFG = TrainConfig(model="vit_c_7mf", dataset="shapes", n_train=256, n_test=100, batch_size=64, epochs=3,
                  device="cpu", warmup_epochs=0.0)
# measured: a compiled step's loss is the eager one's to ~1e-6 relative; over three epochs
# the training loss stays within 1e-4 relative and the test errors within one image
LOSS_RTOL = 1e-4
ONE_IMAGE = 100 / CFG.n_test


class Kill(Exception):
    pass


def _history(folder) -> pd.DataFrame:
    return pd.read_csv(folder / "history.csv", dtype={"key": str})


def _close(a: pd.DataFrame, b: pd.DataFrame) -> None:
    assert list(a.epoch) == list(b.epoch)
    assert ((a.train_loss - b.train_loss).abs() / a.train_loss).max() < LOSS_RTOL
    for col in ("test_err", "ema_err"):
        assert (a[col] - b[col]).abs().max() <= ONE_IMAGE + 1e-9, col


@pytest.mark.slow
def test_a_compiled_trial_learns_what_the_eager_one_does_and_resumes_either_way(tmp_path):
    compiled = dataclasses.replace(CFG, compile=True)
    assert compiled.key() == CFG.key()  # an execution option: the same trial
    run_trial(CFG, out=tmp_path / "eager")
    row = run_trial(compiled, out=tmp_path / "compiled")
    assert row["compiled_graphs"] == 2, row["compiled_graphs"]  # training and evaluation, nothing recompiled
    _close(_history(tmp_path / "eager"), _history(tmp_path / "compiled"))

    def die_after_epoch_1(ev):
        if ev["event"] == "epoch" and ev["epoch"] == 1:
            raise Kill

    for resumed_with in (compiled, CFG):
        out = tmp_path / f"killed-{resumed_with.compile}"
        with pytest.raises(Kill):
            run_trial(compiled, out=out, progress=die_after_epoch_1)
        assert TrialStore(out, create=False).checkpoint_path(CFG.key()).exists()
        run_trial(resumed_with, out=out)
        _close(_history(tmp_path / "compiled"), _history(out))


def test_compile_wraps_ddp_as_torch_documents(monkeypatch):
    """Under torchrun the DDP-wrapped model is compiled (compile outside, DDP inside)."""
    import torch.distributed as dist

    from vitexp import runtime
    from vitexp.data import load_data
    from vitexp.trainer import setup_model

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29533")
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        bundle = load_data("shapes", n_train=64, n_test=32)
        d = runtime.Dist(rank=0, world=2, local_rank=0)  # as a rank of two sees it
        model, net, _ = setup_model(dataclasses.replace(CFG, compile=True), bundle, torch.device("cpu"), d)
        assert isinstance(net, torch._dynamo.eval_frame.OptimizedModule)
        assert isinstance(net._orig_mod, torch.nn.parallel.DistributedDataParallel)
        assert net._orig_mod.module is model
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_a_compiled_cnn_at_64_px_trains(tmp_path):
    """The 64 px CIFAR ResNet compiled on the CPU (the transfer study's 2x fine-tunes): with
    inductor's layout optimisation, or with the model in channels_last (eager too), its backward
    crashed the process (torch 2.14.1), so the test runs it in a process of its own, where a
    crash is a failure and not the end of pytest."""
    from conftest import run_cli

    proc = run_cli("train", "--model", "resnet_7mf", "--dataset", "shapes", "--image-size", "64", "--n-train", "128",
                   "--n-test", "64", "--batch-size", "64", "--epochs", "2", "--compile", "--device", "cpu",
                   "--out", tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = pd.read_csv(tmp_path / "runs.csv").iloc[0]
    assert bool(row["compile"]) and row["image_size"] == 64 and row["top1_err"] < 100


def test_a_worker_can_compile_many_models_before_torch_falls_back_to_eager():
    """A study worker compiles one model after another (each in train and eval mode): torch's
    default of 8 graphs per function sent the fifth model to eager."""
    import torch
    import torch._dynamo.config as dynamo_config

    from vitexp import runtime

    runtime.compile_model(torch.nn.Linear(2, 2), torch.device("cpu"))
    assert dynamo_config.recompile_limit >= 2 * 6 + 2  # six ViT variants in one worker, with room
