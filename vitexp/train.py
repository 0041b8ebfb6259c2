"""One trial, done right: `run_trial(cfg)` trains a model and returns its runs.csv row.

Protocol (PAPERS.md sections 3-4): the reported `top1_err` is the minimum over
epochs of the evaluated test error, the evaluated model being the EMA of the
weights when `cfg.ema` (else the model itself); `last_err` is the final one. A
non-finite training loss ends the trial as diverged with top1_err = last_err = 100,
it never raises.

Reproducibility: the model is initialised from `cfg.seed`, and every epoch reseeds
torch and the data order from (seed, epoch); so resuming from the checkpoint
written at an epoch boundary continues exactly as an uninterrupted run would
(bit for bit on the CPU).

Distributed: under torchrun (WORLD_SIZE > 1) the model is wrapped in
DistributedDataParallel, cfg.batch_size stays the global batch, each rank trains
on its shard of every epoch, metrics are averaged across ranks and only rank 0
writes files (every rank reads the checkpoint to resume: a shared file system).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from vitexp import data as vdata
from vitexp import models as vmodels
from vitexp.config import TrainConfig
from vitexp.errors import UserError
from vitexp import rows
from vitexp.optim import EMA, build_optimizer, build_scheduler
from vitexp.rows import trial_row
from vitexp.store import TrialStore, provenance, tmp_path

# host-side check for a non-finite loss every this many steps (each check is a sync)
NAN_CHECK_EVERY = 50
# EMA update period in steps (pycls uses 32; each update costs a host sync)
EMA_EVERY = 4

Progress = Callable[[dict], None]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device '{name}'; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for, but torch sees no CUDA GPU; use --device cpu")
    return dev


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


@dataclasses.dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> DistInfo:
    """Join the torchrun process group when launched by torchrun; else a no-op."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def _epoch_seed(seed: int, epoch: int) -> int:
    return seed * 1_000_003 + epoch


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, amp: bool) -> float:
    """Top-1 error in percent over the whole loader (one host sync at the end)."""
    model.eval()
    wrong = torch.zeros((), device=device, dtype=torch.long)
    total = 0
    for x, y in loader:
        with _autocast(device, amp):
            out = model(x)
        wrong += (out.argmax(1) != y).sum()
        total += y.numel()
    return 100.0 * wrong.item() / max(total, 1)


def _autocast(device: torch.device, amp: bool):
    # bf16 needs no loss scaling; the CPU keeps fp32 (bf16 there is slow and changes results)
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _save_atomic(obj, path: Path) -> None:
    tmp = tmp_path(path)  # a name TrialStore.sweep recognises if this process is killed
    torch.save(obj, tmp)
    os.replace(tmp, path)


def run_trial(cfg: TrainConfig, out: str | Path | None = None, progress: Progress | None = None,
              store: TrialStore | None = None) -> dict:
    """Train one trial and return its row. With `out` (or `store`), checkpoint every
    epoch, resume from a checkpoint left by a killed run, and record the row."""
    cfg = cfg.validate().resolved()
    key = cfg.key()
    device = resolve_device(cfg.device)
    di = init_distributed(device)
    if di.world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", di.local_rank)
            torch.cuda.set_device(device)
        if cfg.batch_size % di.world:
            raise UserError(f"--batch-size {cfg.batch_size} is not divisible by the world size {di.world}; "
                            f"use a multiple of {di.world}")
    if store is None and out is not None:
        store = TrialStore(out)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")

    bundle = vdata.load_data(cfg.dataset, data_dir=cfg.data_dir, image_size=cfg.image_size,
                             n_train=cfg.n_train, n_test=cfg.n_test, subset_seed=cfg.subset_seed)
    torch.manual_seed(cfg.seed)
    model = vmodels.build_model(cfg.model, image_size=bundle.image_size, in_chans=bundle.in_chans,
                                num_classes=bundle.num_classes, dropout=cfg.dropout)
    is_vit = vmodels.is_vit(model)
    n_params = sum(p.numel() for p in model.parameters())
    if cfg.sync_bn and di.world > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    if device.type == "cuda" and not is_vit:
        model.to(memory_format=torch.channels_last)  # cuDNN's fast conv layout
    ema = EMA(model, cfg.ema_decay, EMA_EVERY) if cfg.ema else None

    local_cfg = dataclasses.replace(cfg, batch_size=cfg.batch_size // di.world)
    train_loader, test_loader = vdata.make_loaders(bundle, local_cfg, device, di.rank, di.world)
    steps_per_epoch = len(train_loader)
    opt = build_optimizer(model, cfg, device)
    sched = build_scheduler(opt, cfg, steps_per_epoch)
    mixer = vdata.batch_mixer(cfg, bundle.num_classes)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    net = model
    if di.world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        net = torch.compile(net)

    state = {"epoch": 0, "history": [], "wall": 0.0, "diverged": False}
    ckpt = store.checkpoint_path(key) if store is not None else None
    if ckpt is not None and ckpt.exists():
        saved = torch.load(ckpt, map_location=device, weights_only=False)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        sched.load_state_dict(saved["sched"])
        if ema is not None:
            ema.load_state_dict(saved["ema"])
        state = saved["state"]

    n_train_seen = steps_per_epoch * cfg.batch_size
    for epoch in range(state["epoch"], cfg.epochs):
        t0 = time.perf_counter()
        torch.manual_seed(_epoch_seed(cfg.seed, epoch))  # dropout, mixup: exact on resume
        train_loader.set_epoch(epoch)
        net.train()
        loss_sum = torch.zeros((), device=device)
        for step, (x, y) in enumerate(train_loader):
            if mixer is not None:
                x, y = mixer(x, y)
            if device.type == "cuda" and not is_vit:
                x = x.contiguous(memory_format=torch.channels_last)
            with _autocast(device, cfg.amp):
                loss = criterion(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            sched.step()
            loss_sum += loss.detach()
            # counted over the whole run: an epoch of fewer than EMA_EVERY steps still updates
            if ema is not None and (epoch * steps_per_epoch + step + 1) % EMA_EVERY == 0:
                ema.update_parameters(model)
            if (step + 1) % NAN_CHECK_EVERY == 0 and not torch.isfinite(loss_sum):
                break
            if progress is not None and device.type == "cpu":
                progress({"event": "step", "step": step + 1, "steps": steps_per_epoch, "epoch": epoch})
        if di.world > 1:
            dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
        train_loss = loss_sum.item() / steps_per_epoch
        if not math.isfinite(train_loss):
            state["diverged"] = True
            state["wall"] += time.perf_counter() - t0
            break
        train_s = time.perf_counter() - t0
        test_err = ema_err = float("nan")
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            test_err = evaluate(net if di.world == 1 else model, test_loader, device, cfg.amp)
            if ema is not None:
                ema_err = evaluate(ema.module, test_loader, device, cfg.amp)
        seconds = time.perf_counter() - t0
        state["wall"] += seconds
        row = {"key": key, "epoch": epoch + 1, "train_loss": train_loss, "test_err": test_err,
               "ema_err": ema_err, "lr": sched.get_last_lr()[0], "seconds": seconds,
               "images_per_s": n_train_seen / train_s}
        state["history"].append(row)
        state["epoch"] = epoch + 1
        if ckpt is not None and di.main and epoch + 1 < cfg.epochs:
            _save_atomic({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                          "ema": ema.state_dict() if ema is not None else None, "state": state}, ckpt)
        if progress is not None:
            progress({"event": "epoch", **row, "epochs": cfg.epochs})

    result = _summarise(cfg, key, state, n_params, len(bundle), device, started)
    evaluated = ema.module if ema is not None else model
    if cfg.fewshot and not state["diverged"]:
        from vitexp.fewshot import fewshot_eval

        result.update(fewshot_eval(evaluated, bundle, cfg, device))
    if store is not None and di.main:
        store.record(key, result, state["history"])
    return result


def _summarise(cfg: TrainConfig, key: str, state: dict, n_params: int, n_train: int,
               device: torch.device, started: str) -> dict:
    hist = state["history"]
    return trial_row(cfg, key, n_train=n_train, **rows.summary(cfg, hist, state["diverged"]),
                     train_loss=hist[-1]["train_loss"] if hist else float("nan"),
                     diverged=bool(state["diverged"]), epochs_run=len(hist), wall_s=round(state["wall"], 3),
                     images_per_s=(sum(h["images_per_s"] for h in hist) / len(hist)) if hist else float("nan"),
                     params_m=n_params / 1e6, device=device_name(device), started_at=started, **provenance())
