"""vitexp bench: FLOP accounting, a CPU run with sensible numbers; packed trials equal unpacked."""

import os

import pandas as pd
import pytest
import torch
from torch import nn

from conftest import run_cli
from vitexp import models as vmodels
from vitexp.bench import bench, peak_tflops, train_flops_per_image
from vitexp.sweep import resolve_spec
from vitexp.sweep import packing
from vitexp.sweep.packing import run_packed
from vitexp.sweep.runner import run_study


def test_train_flops_of_an_mlp_by_hand():
    i, h, o, b = 12, 20, 5, 8
    net = nn.Sequential(nn.Linear(i, h), nn.ReLU(), nn.Linear(h, o))
    x, y = torch.randn(b, i), torch.randint(0, o, (b,))
    # forward 2(ih + ho); backward: layer 2 grad input + grad weight 4ho, layer 1 grad weight only 2ih
    assert train_flops_per_image(net, x, y) == 2 * (i * h + h * o) + 4 * h * o + 2 * i * h


def vit_p_macs(image: int, patch: int, chans: int, width: int, depth: int, mlp: int, classes: int) -> tuple:
    """(forward MACs, patchify-conv MACs) of a class-token ViT_P, by hand: per block the
    qkv and output projections (4 N D^2), QK^T and PV (2 N^2 D) and the MLP (2 N D mlp)."""
    grid = (image // patch) ** 2
    n = grid + 1
    embed = grid * width * chans * patch * patch
    block = 4 * n * width**2 + 2 * n * n * width + 2 * n * width * mlp
    return embed + depth * block + width * classes, embed


@pytest.mark.parametrize("name", ["vit_p_25mf", "vit_p_7mf"])
def test_flop_counts_equal_the_analytic_count_of_the_matmuls(name):
    """Fails loudly on a torch whose FLOP counter misses (or double-counts) a kernel:
    forward = the analytic MACs; training = 3x forward less the patchify conv's input
    gradient, which nothing needs."""
    k = vmodels.get_spec(name).kwargs
    fwd, embed = vit_p_macs(32, k["patch"], 3, k["width"], k["depth"], k["mlp"], 10)
    assert 1e9 * vmodels.complexity(name, num_classes=10)["gflops"] == pytest.approx(fwd, rel=1e-9)
    net = vmodels.build_model(name, num_classes=10)
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    assert train_flops_per_image(net, x, y) == pytest.approx(2 * (3 * fwd - embed), rel=1e-9)


def test_peak_table():
    assert peak_tflops("NVIDIA H100 80GB HBM3") == pytest.approx(989.4)
    assert peak_tflops("NVIDIA H100 PCIe") == pytest.approx(756.0)
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == pytest.approx(312.0)
    assert peak_tflops("cpu") is None


def test_bench_on_cpu_gives_sensible_numbers(tmp_path):
    row = bench("vit_p_25mf", "shapes", batch_size=32, steps=3, warmup=1, device="cpu")
    assert row["images_per_s"] > 0 and row["step_ms"] > 0 and 0 <= row["data_frac"] <= 1
    assert row["train_gflop_per_image"] == pytest.approx(
        3 * 2 * vmodels.complexity("vit_p_25mf", num_classes=10)["gflops"], rel=0.1)
    assert row["tflops"] == pytest.approx(row["train_gflop_per_image"] * row["images_per_s"] / 1e3)
    assert row["mfu"] != row["mfu"]  # NaN: no peak for a CPU


def test_bench_cli_appends_rows(tmp_path):
    csv = tmp_path / "bench.csv"
    for _ in range(2):
        p = run_cli("bench", "--model", "vit_c_25mf", "--batch-size", "16", "--steps", "2", "--warmup", "1",
                    "--device", "cpu", "--baseline", "--num-workers", "0", "--csv", csv)
        assert p.returncode == 0, p.stderr
        assert "fast / baseline" in p.stdout
    rows = pd.read_csv(csv)
    assert len(rows) == 4 and set(rows["mode"]) == {"fast", "baseline"}


def test_packed_trials_equal_one_by_one(tmp_path):
    spec = resolve_spec("stability", None, {"samples": 2, "epochs": 1, "models": ["vit_p_25mf"]},
                        {"n_train": 96, "n_test": 64, "batch_size": 32, "device": "cpu"})
    one = run_study(spec, tmp_path / "one", progress=False, plot=False)
    packed = run_packed(spec, tmp_path / "packed", (0, 1), 2, plot=False)
    a, b = (d.set_index("key").sort_index() for d in (one, packed))
    assert list(a.index) == list(b.index) and len(a) == 2
    for c in ("top1_err", "last_err", "lr", "wd"):
        assert a[c].equals(b[c]), c
    assert (b.train_loss - a.train_loss).abs().max() < 1e-4  # workers use fewer threads: float sum order


@pytest.mark.parametrize("cores,asked,workers", [(3, None, 2), (1, None, 0), (2, 1, 0)])
def test_cpu_studies_run_one_single_thread_worker_per_core(tmp_path, monkeypatch, cores, asked, workers):
    """The default on the CPU: min(cores, trials to run) worker processes; one core or an
    explicit --trials-per-gpu 1: in this process (workers 0)."""
    monkeypatch.setattr(packing, "_cores", lambda: cores)
    started, watch = [], packing._watch
    monkeypatch.setattr(packing, "_watch", lambda procs, *a: started.extend(procs) or watch(procs, *a))
    spec = resolve_spec("stability", None, {"samples": 2, "epochs": 1, "models": ["vit_p_7mf"]},
                        {"n_train": 64, "n_test": 32, "batch_size": 32, "device": "cpu"})
    runs = run_packed(spec, tmp_path, (0, 1), asked, plot=False, progress=False)
    assert len(runs) == 2 and (runs.status == "ok").all()
    assert len(started) == workers and all(p.exitcode == 0 for p in started)
    pids = {int(ln.split()[2]) for ln in (tmp_path / "log.txt").read_text().splitlines() if " trial " in ln}
    assert (pids == {os.getpid()}) if workers == 0 else (os.getpid() not in pids)


def test_a_packed_study_draws_its_figure(tmp_path):
    spec = resolve_spec("scale", None, {"sizes": [64, 128], "steps": 2, "min_epochs": 1, "models": ["vit_p_7mf"],
                                        "seeds": [0], "fewshot": []}, {"n_test": 32, "batch_size": 32, "device": "cpu"})
    runs = run_packed(spec, tmp_path, (0, 1), 2, plot=True, progress=False)
    assert len(runs) == 2 and (tmp_path / "figures" / "scale.png").exists()
