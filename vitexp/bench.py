"""`vitexp bench`: training throughput, data vs compute time, memory, FLOPs and MFU.

The fast path is the trainer's own: in-memory uint8 data augmented on the device,
bf16 autocast, fused optimizer, SDPA attention (torchvision's MultiheadAttention
dispatches to it), channels_last CNNs, optional torch.compile, and no host sync
inside the timed steps. `baseline=True` measures the same model the plain way:
fp32, a standard DataLoader with torchvision transforms on CPU workers, unfused
optimizer; the ratio of the two is what the fast path buys.
"""

from __future__ import annotations

import dataclasses
import math
import os
import resource
import time
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from vitexp import data as vdata
from vitexp import models as vmodels
from vitexp.config import TrainConfig
from vitexp.errors import UserError
from vitexp.optim import build_optimizer
from vitexp.fileio import atomic_write_csv
from vitexp.runtime import autocast, compile_model, device_name, resolve_device, sync
from vitexp.runtime import workers as workers_for
from vitexp.provenance import provenance

# dense bf16 peak TFLOP/s (no sparsity) by device-name substring, first match wins
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("A100", 312.0))


def peak_tflops(name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_TFLOPS if k in name), None)


def train_flops_per_image(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Forward + backward FLOPs of one training step per image (FlopCounterMode
    counts 2 per multiply-accumulate; norms and activations are not counted)."""
    model.train()
    counter = vmodels.flop_counter()
    with counter:
        nn.functional.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / len(x)


def _baseline_loader(bundle, cfg: TrainConfig, device: torch.device):
    """The standard way: a DataLoader over CPU tensors, per-sample torchvision transforms."""
    from torch.utils.data import DataLoader, Dataset
    from torchvision.transforms import v2

    tf = v2.Compose([v2.RandomCrop(bundle.image_size, padding=cfg.crop_pad), v2.RandomHorizontalFlip(),
                     v2.ToDtype(torch.float32, scale=True), v2.Normalize(bundle.mean, bundle.std)])

    class Images(Dataset):
        def __len__(self):
            return len(bundle.train_x)

        def __getitem__(self, i):
            return tf(bundle.train_x[i]), bundle.train_y[i]

    loader = DataLoader(Images(), batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                        num_workers=min(cfg.num_workers, 8), pin_memory=device.type == "cuda",
                        persistent_workers=cfg.num_workers > 0)

    def batches():
        while True:
            for x, y in loader:
                yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    return batches()


def _cycle(loader):
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def bench(model: str, dataset: str = "shapes", batch_size: int = 256, steps: int = 50, warmup: int = 10,
          device: str = "auto", compile: bool = False, amp: bool = True, baseline: bool = False,
          image_size: int | None = None, num_workers: int = 8, data_dir: str | None = None,
          fields: dict | None = None) -> dict:
    """Measure one configuration; returns one row (also what `vitexp bench` prints). FIELDS:
    more TrainConfig fields (a preset's model_def, lr and wd: `presets.preset_model`)."""
    dev = resolve_device(device)
    if baseline:
        amp, compile = False, False
    cfg = _config(model, dataset, batch_size, steps + warmup, dev, amp, compile, image_size, num_workers, data_dir,
                  fields)
    bundle = vdata.load_data(dataset, data_dir=data_dir, image_size=cfg.image_size, n_train=cfg.n_train,
                             n_test=cfg.n_test)
    torch.manual_seed(0)
    net = vmodels.build_model(cfg.model_spec(), image_size=bundle.image_size, in_chans=bundle.in_chans,
                              num_classes=bundle.num_classes).to(dev)
    fast_layout = dev.type == "cuda" and not vmodels.is_vit(net) and not baseline
    if fast_layout:
        net.to(memory_format=torch.channels_last)
    if baseline:
        opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
        batches = _baseline_loader(bundle, cfg, dev)
    else:
        opt = build_optimizer(net, cfg, dev)
        batches = _cycle(vdata.make_loaders(bundle, cfg, dev)[0])
    step_net = compile_model(net, dev) if compile else net
    flops = train_flops_per_image(net, *next(batches))

    def step():
        x, y = next(batches)
        if fast_layout:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(dev, amp):
            loss = nn.functional.cross_entropy(step_net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step_net.train()
    step_s, mem_gb, first_s = _timed(step, warmup, steps, dev)
    data_s = _timed(lambda: next(batches), 0, steps, dev)[0]  # the data pipeline alone: its share of a step
    mode = "baseline" if baseline else "compiled" if compile else "fast"
    return _row(cfg, bundle.image_size, mode, dev, steps, batch_size / step_s, step_s, data_s, mem_gb, flops,
                first_step_s=round(first_s, 3))


def _config(model, dataset, batch_size, steps, dev, amp, compile, image_size, num_workers, data_dir,
            fields: dict | None = None) -> TrainConfig:
    """A resolved config whose training subset holds STEPS batches (at least two)."""
    n = max(batch_size * steps, 2 * batch_size)
    size = vdata.dataset_info(dataset).n_train
    return TrainConfig(model=model, dataset=dataset, batch_size=batch_size, device=str(dev), amp=amp,
                       compile=compile, image_size=image_size, num_workers=num_workers, data_dir=data_dir,
                       n_train=min(n, size) if size else n, n_test=batch_size, **(fields or {})).validate().resolved()


def _timed(step, warmup: int, steps: int, dev: torch.device) -> tuple[float, float, float]:
    """(seconds per step, peak memory in GiB, seconds of the first step): WARMUP untimed steps
    (compilation, cuDNN autotuning, the allocator), then STEPS timed ones. The first step
    says what a compile costs, next to a step."""
    t0, first = time.perf_counter(), math.nan
    for i in range(warmup):
        step()
        if i == 0:
            sync(dev)
            first = time.perf_counter() - t0
    sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(dev)
    seconds = (time.perf_counter() - t0) / steps
    if dev.type == "cuda":
        return seconds, torch.cuda.max_memory_allocated(dev) / 2**30, first
    return seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, first  # KiB -> GiB, process peak


def _row(cfg: TrainConfig, image_size: int, mode: str, dev, steps: int, img_s: float, step_s: float,
         data_s: float, mem_gb: float, flops: float, **more) -> dict:
    name = device_name(dev)
    tflops = flops * img_s / 1e12
    peak = peak_tflops(name) if dev.type == "cuda" else None  # no MFU on a CPU: its peak is not known
    return {"model": cfg.model, "dataset": cfg.dataset, "image_size": image_size, "batch_size": cfg.batch_size,
            "mode": mode, "compile": cfg.compile, "amp": cfg.amp and dev.type == "cuda",
            "threads": torch.get_num_threads(), "device": name, "steps": steps, "images_per_s": img_s,
            "step_ms": 1e3 * step_s, "data_ms": 1e3 * data_s, "compute_ms": 1e3 * max(step_s - data_s, 0.0),
            "data_frac": min(data_s / step_s, 1.0), "peak_mem_gb": mem_gb,
            "train_gflop_per_image": flops / 1e9, "tflops": tflops, "mfu": tflops / peak if peak else float("nan"),
            **more, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), **provenance()}


def bench_fused(model: str, k: int, dataset: str = "shapes", batch_size: int = 128, steps: int = 20,
                warmup: int = 3, device: str = "auto", amp: bool = True, image_size: int | None = None,
                data_dir: str | None = None, fields: dict | None = None) -> list[dict]:
    """K trials of MODEL (seeds 0..K-1) one after another vs fused into one batched model,
    in the same run: rows "one-by-one" and "fused", images/s in total (per member: / K)."""
    from vitexp import fused

    dev = resolve_device(device)
    base = _config(model, dataset, batch_size, steps + warmup, dev, amp, False, image_size, 0, data_dir, fields)
    cfgs = [dataclasses.replace(base, seed=i, subset_seed=i) for i in range(k)]
    g = fused.setup_group(cfgs, None)
    flops = train_flops_per_image(g.members[0].model, *next(_cycle(g.members[0].train_loader)))
    streams = [_cycle(t.train_loader) for t in g.members]

    def one_by_one():
        for t, batches in zip(g.members, streams):
            x, y = next(batches)
            with autocast(dev, amp):
                loss = t.criterion(t.net(x), y)
            t.opt.zero_grad(set_to_none=True)
            loss.backward()
            t.opt.step()

    def fused_step():
        batches = [next(b) for b in streams]
        losses = fused._fused_losses(g, torch.stack([x for x, _ in batches]), torch.stack([y for _, y in batches]))
        for t in g.members:
            t.opt.zero_grad(set_to_none=True)
        losses.sum().backward()
        for t in g.members:
            t.opt.step()

    for t in g.members:
        t.net.train()
    rows = []
    for mode, step in (("one-by-one", one_by_one), ("fused", fused_step)):
        step_s, mem, _ = _timed(step, warmup, steps, dev)
        rows.append(_row(base, base.image_size or vdata.dataset_info(dataset).image_size, mode, dev, steps,
                         k * batch_size / step_s, step_s, 0.0, mem, flops, fuse=k,
                         images_per_s_member=batch_size / step_s))
    return rows


def append_row(row: dict, csv: str | Path) -> None:
    """Append one row to a CSV (atomically; columns may grow)."""
    csv = Path(csv)
    csv.parent.mkdir(parents=True, exist_ok=True)
    old = pd.read_csv(csv) if csv.exists() and csv.stat().st_size > 0 else pd.DataFrame()
    atomic_write_csv(csv, pd.concat([old, pd.DataFrame([row])], ignore_index=True))



COLUMNS = ["mode", "images_per_s", "step_ms", "data_ms", "data_frac", "peak_mem_gb", "train_gflop_per_image",
           "tflops", "mfu"]


def print_rows(rows: list[dict], console) -> None:
    """The measured rows, one block each ("name: value" lines print whole at any width and
    piped); with a baseline, the ratio; on a CPU, why there is no MFU."""
    r0 = rows[0]
    console.print(f"vitexp bench: {r0['model']} on {r0['dataset']} ({r0['image_size']} px), batch {r0['batch_size']}, "
                  f"{r0['device']}, {r0['threads']} thread(s)")
    for r in rows:
        console.print(f"  {r['mode']}: " + ", ".join(f"{c} {r[c]:.4g}" for c in COLUMNS[1:] if c in r and r[c] == r[c]))
    if len(rows) > 1 and rows[1]["mode"] == "compiled":
        eager, comp = rows[0], rows[1]
        console.print(f"compiled / eager throughput: {comp['images_per_s'] / eager['images_per_s']:.2f}x; "
                      f"the first compiled step took {comp['first_step_s']:.1f} s (the compile), "
                      f"an eager one {eager['first_step_s']:.2f} s")
        saved = (eager["step_ms"] - comp["step_ms"]) / 1e3
        if saved > 0:
            console.print(f"break-even: {(comp['first_step_s'] - eager['first_step_s']) / saved:,.0f} steps "
                          f"(the compile's cost over the seconds each compiled step saves)")
    if len(rows) > 1 and rows[-1]["mode"] == "baseline":
        console.print(f"fast / baseline throughput: {rows[0]['images_per_s'] / rows[-1]['images_per_s']:.2f}x")
    if len(rows) > 1 and rows[1]["mode"] == "fused":
        console.print(f"fused / one-by-one throughput (K = {rows[1]['fuse']}): "
                      f"{rows[1]['images_per_s'] / rows[0]['images_per_s']:.2f}x "
                      f"({rows[1]['images_per_s_member']:.4g} images/s per member)")
    if r0["mfu"] != r0["mfu"]:
        console.print("mfu: not given on a CPU (no known peak FLOP/s); TFLOP/s are measured all the same")


def speed_key(cfg: TrainConfig) -> str:
    """What a trial's speed depends on: its model, image size and batch (a transfer study's
    pre-training and its 64 px fine-tunes of one model differ)."""
    return f"{cfg.model} {cfg.image_size or vdata.dataset_info(cfg.dataset).image_size} px batch {cfg.batch_size}"


def calibrate(plan, workers: int | None, steps: int = 3) -> tuple[dict[str, float], int]:
    """(speed_key -> training images/s of one worker process here, worker processes): a few
    timed steps of each model, image size and batch of PLAN on random data (the batch at most
    32 on a CPU), in the thread count each worker will have. For `--dry-run`'s time estimate."""
    todo = plan.pending() or plan.trials
    k, threads = workers_for(todo[0][1].device, todo, workers)
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return {m: _images_per_s(c, steps) for m, c in {speed_key(c): c for _, c in todo}.items()}, k
    except (MemoryError, torch.OutOfMemoryError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and "memory" not in str(e).lower() and "alloc" not in str(e).lower():
            raise
        raise UserError(f"out of memory timing a few training steps ({str(e).splitlines()[0][:120]}); "
                        f"use a smaller --batch-size or --image-size") from None
    finally:
        torch.set_num_threads(before)


# a training step holds about this many bytes per forward activation: the float32 activation kept for
# the backward pass, its gradient, and the workspace of the layer computing it
TRAIN_BYTES_PER_ACT = 12


def free_memory(dev: torch.device) -> int:
    """Bytes free for a timing step on DEV (the GPU's free memory, else the host's available)."""
    if dev.type == "cuda":
        return int(torch.cuda.mem_get_info(dev)[0])
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def timing_batch(cfg: TrainConfig, dev: torch.device, size: int, info) -> int:
    """The batch of the dry run's timed steps: the trial's (at most 32 on a CPU), halved until its
    estimated training memory fits in half the free memory; 0 when one image would not fit."""
    batch = cfg.batch_size if dev.type == "cuda" else min(cfg.batch_size, 32)
    acts = vmodels.complexity(cfg.model_spec(), resolution=size, in_chans=info.in_chans,
                              num_classes=info.num_classes)["acts_m"] * 1e6
    budget = free_memory(dev) // 2
    while batch and batch * acts * TRAIN_BYTES_PER_ACT > budget:
        batch //= 2
    return batch


def _images_per_s(cfg: TrainConfig, steps: int) -> float:
    """Training images/s of a few timed steps on random data; NaN where one image's step would
    not fit in memory (the dry run then says its estimate is unavailable)."""
    dev = resolve_device(cfg.device)
    info = vdata.dataset_info(cfg.dataset)
    size = cfg.image_size or info.image_size
    batch = timing_batch(cfg, dev, size, info)
    if not batch:
        return math.nan
    net = vmodels.build_model(cfg.model_spec(), image_size=size, in_chans=info.in_chans,
                              num_classes=info.num_classes).to(dev)
    opt = build_optimizer(net, cfg, dev)
    x = torch.randn(batch, info.in_chans, size, size, device=dev)
    y = torch.randint(0, info.num_classes, (batch,), device=dev)
    for i in range(steps + 1):  # the first step warms up
        if i == 1:
            sync(dev)
            t0 = time.perf_counter()
        with autocast(dev, cfg.amp):
            loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync(dev)
    return batch * steps / (time.perf_counter() - t0)
