"""Where and how a trial runs: the device, bf16 autocast and the torchrun environment.

The one place that reads RANK / WORLD_SIZE / LOCAL_RANK and decides autocast, so the
trainer, the sweep, `bench` and `doctor` agree on them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os

import torch
import torch.distributed as dist

from vitexp.errors import UserError


def resolve_device(name: str) -> torch.device:
    """auto (CUDA when there), cpu, cuda or cuda:N; a missing GPU is a UserError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device '{name}'; use auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"unknown device '{name}'; use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for, but torch sees no CUDA GPU; use --device cpu")
    return dev


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def amp_enabled(device: torch.device, amp: bool) -> bool:
    """bf16 autocast runs on CUDA only: on the CPU it is slow and changes results."""
    return amp and device.type == "cuda"


def autocast(device: torch.device, amp: bool):
    # bf16 needs no loss scaling
    if amp_enabled(device, amp):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclasses.dataclass(frozen=True)
class Dist:
    """This process's place under torchrun (rank 0 of 1 without it)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


RECOMPILE_LIMIT = 64  # graphs of one function per process: a study worker's models x (train, eval)


def compile_model(net: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """torch.compile(NET) for DEVICE. On the CPU without inductor's layout optimisation: its
    channels-last rewrite of conv graphs corrupts the heap in the convolution backward of the
    64 px CIFAR ResNet (torch 2.14.1: a general-protection fault or a malloc abort that kills the
    process), a bug of torch's; without it that graph trains, ~15% slower at 32 px."""
    import torch._dynamo.config as dynamo_config

    # a worker trains trial after trial: each model (and its train and eval mode) is another graph
    # of one `forward`, so torch's default limit of 8 sends the fifth model of a process to eager
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
    if device.type == "cpu":
        import torch._inductor.config as inductor_config

        inductor_config.layout_optimization = False
    return torch.compile(net)


def dist_env() -> Dist:
    """What torchrun says about this process (from its environment variables)."""
    env = os.environ
    return Dist(int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1")), int(env.get("LOCAL_RANK", "0")))


def init_distributed(device: torch.device) -> tuple[Dist, torch.device]:
    """Join torchrun's process group (NCCL on GPUs, gloo on CPUs) and pick this rank's
    GPU; without torchrun a no-op."""
    d = dist_env()
    if d.world <= 1:
        return d, device
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
    return d, device


def close_distributed() -> None:
    """Leave torchrun's process group; a gloo group still alive when the interpreter exits
    can abort the process ("terminate called without an active exception")."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def free_memory() -> None:
    """Hand cached GPU memory back after a failed trial (its tensors are gone)."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside torch.compile / DDP wrappers."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def check_batch(batch_size: int, world: int) -> None:
    """The global batch splits evenly over the ranks (each trains batch_size / world)."""
    if batch_size % world:
        raise UserError(f"--batch-size {batch_size} is not divisible by the world size {world}; use a multiple "
                        f"of {world}")


def workers(device: str, todo: list, asked: int | None) -> tuple[int, int | None]:
    """(processes, threads per process; None: leave torch's default). Default: one
    process on a GPU and on one core; on a multi-core CPU one single-thread worker per
    core (at most one per trial; a lone trial, in this process, with torch's threads)."""
    on_cpu = resolve_device(device).type == "cpu"
    if asked is None:
        if not on_cpu or cores() == 1 or len(todo) == 1:
            return 1, None
        return min(cores(), len(todo)), 1
    return asked, (max(1, cores() // asked) if on_cpu and asked > 1 else None)
