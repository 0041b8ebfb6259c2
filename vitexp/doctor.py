"""`vitexp doctor`: what a user runs first when something is off. It reports
versions, the device, the data sets found, and times one tiny training step."""

from __future__ import annotations

import platform
import time
from importlib import metadata
from pathlib import Path

import torch

PACKAGES = ("vitexp", "torch", "torchvision", "typer", "pandas", "matplotlib", "rich", "numpy")
OPTIONAL = {"timm": "timm", "submitit": "slurm", "tensorboard": "tensorboard"}  # package -> vitexp's extra


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for p in PACKAGES + tuple(OPTIONAL):
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = f"not installed (optional: pip install 'vitexp[{OPTIONAL[p]}]')" if p in OPTIONAL else "MISSING"
    if out["vitexp"] == "MISSING":  # imported from a source tree (PYTHONPATH), not pip-installed
        from vitexp import __file__ as where, __version__

        out["vitexp"] = f"{__version__} (not installed; from {Path(where).parent})"
    return out


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux; empty elsewhere)."""
    try:
        line = next(ln for ln in open("/proc/cpuinfo") if ln.startswith("flags"))
    except (OSError, StopIteration):
        return set()
    return set(line.split(":", 1)[1].split())


def device_report() -> dict[str, str]:
    flags = cpu_flags()
    out = {"cpu threads": str(torch.get_num_threads()),
           "cpu kernels": torch.backends.cpu.get_cpu_capability(),
           "cpu AMX (bf16)": "yes: bf16 matmuls in hardware" if {"amx_bf16", "amx_tile"} <= flags else "no",
           "cuda available": str(torch.cuda.is_available())}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
        out["bf16"] = str(torch.cuda.is_bf16_supported())
        out["gpu memory GiB"] = f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.1f}"
    return out


def data_report(data_dir: str | None = None) -> dict[str, str]:
    """Where each data set was found, or how to get it (loads nothing big)."""
    from vitexp.data import DATASETS, locate

    return {name: locate(name, data_dir) for name in DATASETS}


def tiny_step(device: str = "auto") -> dict[str, str]:
    """One forward/backward/AdamW step of the smallest ViT_C on random images."""
    from vitexp import models as vmodels
    from vitexp.runtime import autocast, resolve_device

    dev = resolve_device(device)
    name = min((n for n in vmodels.list_models() if n.startswith("vit_c_") and n.endswith("mf")),
               key=lambda n: vmodels.get_spec(n).kwargs["width"])
    model = vmodels.build_model(name, num_classes=10).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(8, 3, 32, 32, device=dev), torch.randint(0, 10, (8,), device=dev)
    t0 = time.perf_counter()
    with autocast(dev, True):
        loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    ok = bool(torch.isfinite(loss))
    return {"model": name, "device": str(dev), "loss": f"{loss.item():.3f}", "finite": str(ok),
            "seconds": f"{time.perf_counter() - t0:.2f}", "status": "ok" if ok else "FAILED"}
