"""torchrun with gloo on the CPU: 2 processes equal 1 process at the same global batch;
SLURM arrays through submitit's local executor."""

import os
import subprocess
import sys

import pandas as pd
import pytest

from conftest import REPO, run_cli

# ViT_P (no BatchNorm), no augmentation and no dropout: then the 2-rank gradient is the mean of two half-batch
# gradients of exactly the images the 1-rank batch holds, and a LayerNorm ViT matches up to
# float summation order
ARGS = ["train", "--model", "vit_p_25mf", "--dataset", "fashion-mnist", "--n-train", "512", "--n-test", "256",
        "--batch-size", "64", "--lr", "0.064", "--epochs", "3", "--crop-pad", "0", "--no-hflip", "--device", "cpu"]
LOSS_RTOL = 1e-4  # relative difference of the per-epoch training loss
ERR_ATOL = 0.5  # top-1 error points (one or two test images may flip)


def torchrun(nproc, *args):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                           "--master_port", str(29500 + os.getpid() % 1000), "-m", "vitexp", *map(str, args)],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=600)


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process(tmp_path):
    one = run_cli(*ARGS, "--out", tmp_path / "one", env={"OMP_NUM_THREADS": "1"})
    assert one.returncode == 0, one.stderr
    two = torchrun(2, *ARGS, "--out", tmp_path / "two")
    assert two.returncode == 0, two.stderr
    r1, r2 = (pd.read_csv(tmp_path / d / "runs.csv") for d in ("one", "two"))
    assert len(r1) == len(r2) == 1  # only rank 0 wrote
    assert r1.key.iloc[0] == r2.key.iloc[0] and r2.n_train.iloc[0] == 512
    h1, h2 = (pd.read_csv(tmp_path / d / "history.csv") for d in ("one", "two"))
    assert ((h1.train_loss - h2.train_loss).abs() / h1.train_loss).max() < LOSS_RTOL
    assert abs(r1.top1_err.iloc[0] - r2.top1_err.iloc[0]) <= ERR_ATOL
    assert abs(r1.last_err.iloc[0] - r2.last_err.iloc[0]) <= ERR_ATOL


def test_close_distributed_leaves_the_process_group():
    import torch.distributed as dist

    from vitexp import runtime

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        runtime.close_distributed()
        assert not dist.is_initialized()
        runtime.close_distributed()  # without a group: nothing to do
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# each rank recomputes the BatchNorm statistics of a 1x1 conv + BN on its own shard (rank r:
# normal images shifted by 3r), then prints them as JSON
PRECISE_BN_RANK = """
import json, sys, types
import torch, torch.distributed as dist
from torch import nn
from vitexp import runtime, trainer
d, _ = runtime.init_distributed(torch.device("cpu"))
torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))
g = torch.Generator().manual_seed(d.rank)
shard = [(torch.randn(4, 1, 3, 3, generator=g) + 3 * d.rank, None) for _ in range(2)]
t = types.SimpleNamespace(train_loader=shard, cfg=types.SimpleNamespace(precise_bn=16, batch_size=8), dist=d)
trainer.precise_bn(t, model)
bn = model[1]
# one file per rank: two ranks printing to one pipe can interleave their lines
with open(f"{sys.argv[1]}/rank{d.rank}.json", "w") as f:
    f.write(json.dumps({"rank": d.rank, "mean": bn.running_mean.tolist(), "var": bn.running_var.tolist()}))
runtime.close_distributed()
"""


@pytest.mark.slow
def test_precise_bn_averages_the_ranks_statistics(tmp_path):
    """Under torchrun each rank recomputes BN statistics on its shard; all evaluate with
    their average: what one process would compute from both shards' batches."""
    import json

    import torch
    from torch import nn

    script = tmp_path / "rank.py"
    script.write_text(PRECISE_BN_RANK)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", str(29500 + os.getpid() % 1000), str(script), str(tmp_path)],
                       capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert sorted(r["rank"] for r in ranks) == [0, 1]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))
    batches = []
    for rank in (0, 1):
        g = torch.Generator().manual_seed(rank)
        batches += [torch.randn(4, 1, 3, 3, generator=g) + 3 * rank for _ in range(2)]
    with torch.no_grad():
        feats = [model[0](x) for x in batches]
    mean = torch.stack([f.mean((0, 2, 3)) for f in feats]).mean(0)
    var = torch.stack([f.var((0, 2, 3)) for f in feats]).mean(0)
    for r in ranks:  # every rank holds the same, averaged statistics
        assert torch.allclose(torch.tensor(r["mean"]), mean, atol=1e-5), r
        assert torch.allclose(torch.tensor(r["var"]), var, atol=1e-5), r


@pytest.mark.slow
def test_global_batch_not_divisible_by_world_size(tmp_path):
    args = [a if a != "64" else "63" for a in ARGS]
    p = torchrun(2, *args, "--out", tmp_path)
    # each rank prints the one line and exits 2; the traceback after it is torchrun's own report
    assert p.returncode != 0
    assert p.stderr.count("error: --batch-size 63 is not divisible by the world size 2") == 2
    assert "exitcode  : 2" in p.stderr
    assert "vitexp/train.py" not in p.stderr  # none of our frames


@pytest.mark.slow
def test_launch_runs_shards_through_submitit_local(tmp_path):
    pytest.importorskip("submitit")
    out = tmp_path / "st"
    p = run_cli("launch", "--shards", "2", "--cluster", "local", "--wait", "--", "stability",
                "--models", "vit_c_25mf", "--samples", "2", "--epochs", "1", "--n-train", "128",
                "--n-test", "64", "--batch-size", "64", "--device", "cpu", "--no-plot", "--out", out)
    assert p.returncode == 0, p.stderr
    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == 2 and runs.key.is_unique and (runs.status == "ok").all()


@pytest.mark.slow
def test_launch_needs_a_study_and_its_out(tmp_path):
    from conftest import assert_user_error

    assert_user_error(run_cli("launch", "--shards", "2", "--", "train"), "study")
    assert_user_error(run_cli("launch", "--shards", "2", "--cluster", "local", "--", "stability"), "--out")


@pytest.mark.slow
def test_a_study_under_torchrun_trains_each_trial_with_ddp(tmp_path):
    args = ["stability", "--models", "vit_p_25mf", "--samples", "2", "--epochs", "1", "--dataset", "fashion-mnist",
            "--n-train", "256", "--n-test", "128", "--batch-size", "64", "--crop-pad", "0", "--no-hflip",
            "--device", "cpu", "--no-plot"]
    one = run_cli(*args, "--out", tmp_path / "one", env={"OMP_NUM_THREADS": "1"})
    assert one.returncode == 0, one.stderr
    two = torchrun(2, *args, "--out", tmp_path / "two")
    assert two.returncode == 0, two.stderr
    r1, r2 = (pd.read_csv(tmp_path / d / "runs.csv").set_index("key").sort_index() for d in ("one", "two"))
    assert list(r1.index) == list(r2.index) and len(r2) == 2  # every trial once, written by rank 0
    assert ((r1.train_loss - r2.train_loss).abs() / r1.train_loss).max() < LOSS_RTOL
    assert (r1.top1_err - r2.top1_err).abs().max() <= ERR_ATOL
