"""vitexp bench: FLOP accounting against the analytic count, a CPU run with sensible numbers."""

import pandas as pd
import pytest
import torch
from torch import nn

from conftest import run_cli
from vitexp import models as vmodels
from vitexp.bench import bench, peak_tflops, train_flops_per_image


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
    assert 1e9 * vmodels.complexity(name, num_classes=10)["gmacs"] == pytest.approx(fwd, rel=1e-9)
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
        3 * 2 * vmodels.complexity("vit_p_25mf", num_classes=10)["gmacs"], rel=0.1)
    assert row["tflops"] == pytest.approx(row["train_gflop_per_image"] * row["images_per_s"] / 1e3)
    assert row["mfu"] != row["mfu"]  # NaN: no peak for a CPU


@pytest.mark.slow
def test_bench_cli_appends_rows(tmp_path):
    csv = tmp_path / "bench.csv"
    for _ in range(2):
        p = run_cli("bench", "--model", "vit_c_25mf", "--batch-size", "16", "--steps", "2", "--warmup", "1",
                    "--device", "cpu", "--baseline", "--num-workers", "0", "--csv", csv)
        assert p.returncode == 0, p.stderr
        assert "fast / baseline" in p.stdout
    rows = pd.read_csv(csv)
    assert len(rows) == 4 and set(rows["mode"]) == {"fast", "baseline"}


@pytest.mark.slow
def test_the_cpu_layout_benchmark_times_both_layouts_and_probes_the_crash():
    """benchmarks/cpu_layout.py: a step time per layout, their ratio, and the oneDNN probe's
    outcome from a child process (its crash must not end the script)."""
    import re
    import subprocess
    import sys

    from conftest import REPO

    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "cpu_layout.py"), "--steps", "1", "--batch-size", "4"],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    times = re.findall(r"^  (default|channels_last) +([\d.]+) ms a step", p.stdout, re.M)
    assert [name for name, _ in times] == ["default", "channels_last"] and all(float(t) > 0 for _, t in times)
    assert re.search(r"channels_last / default speed: \d+\.\d\dx", p.stdout)
    assert re.search(r"64 px, channels_last: (runs|crashes \(\w+\))$", p.stdout, re.M)
