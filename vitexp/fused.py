"""Fused trials: K trials of one architecture trained as one batched model (HFTA's idea).

A small model at batch 128 leaves a GPU idle most of the time: launch overhead, not
arithmetic, sets its speed. Fusing same-shape trials turns each member's matmuls into
one batched matmul. Trials fuse when their configs differ only in lr, wd, seed and
subset seed (`fuse_key`); everything else that makes a trial stays per member.

How, and why this way: each member is an ordinary trainer `Trial` (its own model
initialised from its own seed, data order and subset, optimizer, schedule, EMA,
evaluation, checkpoint and record), so a fused member computes what its unfused trial
computes: to the last bit for the ViTs; a CNN's convs run as grouped convs under vmap, whose
float sums go in another order (~1e-5 relative in a step's gradients, grown to at most 1.6e-3
of the training loss and 3 test images in two SGD epochs: tests/test_fused.py). Only the forward and backward are fused: every step stacks the members'
parameters and BatchNorm buffers (the stack's backward hands each member its own
gradient) and runs `torch.func.functional_call` under `vmap`. The members' own torch
optimizers then step with their own lr and wd (torch's optimizers take one lr per
parameter group, so stacked parameters would need a batched optimizer of our own; per
member, the update is torch's, bit for bit). Evaluation runs per member, unbatched,
so its numbers equal the unfused ones exactly. Checkpoints are the members' own, in the
unfused format: a group resumes fused or not.

Not fusable (run one by one): dropout, mixup and CutMix (they draw from torch's global
random stream, which vmap cannot split per member as the unfused trials draw it), image
folders (DataLoader pipelines), torchrun, and members resuming from different epochs.
On the CPU fusing is slower than one trial after another (measured at K = 4: 0.51-0.89x
the one-by-one throughput, benchmarks/README.md),
so the sweep fuses only on request there; on CUDA it fuses by default.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from datetime import datetime, timezone

import torch
from torch import nn
from torch.func import functional_call, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from vitexp import runtime
from vitexp.config import TrainConfig
from vitexp.provenance import provenance
from vitexp.seeds import EPOCH, derive_seed
from vitexp.store import TrialStore
from vitexp.trainer import NAN_CHECK_EVERY, Trial, end_epoch, finish_trial, member_step, resume, setup_trial

# what may differ between the members of one fused group
MEMBER_FIELDS = ("lr", "wd", "seed", "subset_seed", "extra")
DEFAULT_CUDA_K = 8  # members per group on a GPU unless --fuse says otherwise


def default_k(device: str) -> int:
    """Members per fused group unless asked: fused on CUDA only (on the CPU fusing measured
    slower than one trial after another)."""
    return DEFAULT_CUDA_K if runtime.resolve_device(device).type == "cuda" else 1


def fuse_key(cfg: TrainConfig) -> tuple | None:
    """What fused trials share (None: this trial cannot fuse)."""
    if cfg.dropout or cfg.mixup or cfg.cutmix or cfg.teacher or cfg.dataset.startswith("imagefolder:"):
        return None
    d = cfg.to_dict()
    return tuple(sorted((k, str(v)) for k, v in d.items() if k not in MEMBER_FIELDS))


def groups(todo: list[tuple[str, TrainConfig]], k: int) -> list[list[tuple[str, TrainConfig]]]:
    """TODO split into fusable groups of at most K members, in the study's order (a group
    starts where its first member stands); trials that cannot fuse stand alone."""
    if k <= 1:
        return [[t] for t in todo]
    open_groups: dict[tuple, list] = {}
    out = []
    for key, cfg in todo:
        fk = fuse_key(cfg)
        g = open_groups.get(fk) if fk is not None else None
        if g is None or len(g) >= k:
            g = [(key, cfg)]
            out.append(g)
            if fk is not None:
                open_groups[fk] = g
        else:
            g.append((key, cfg))
    return out


@dataclasses.dataclass
class Group:
    """The members of a fused group and what their fused step needs."""

    members: list[Trial]
    names: list[str]  # parameter names of the architecture
    buffers: list[str]  # buffer names (BatchNorm statistics)
    frozen: list[bool]  # diverged members: no more updates

    @property
    def base(self) -> nn.Module:
        return self.members[0].model  # the architecture functional_call runs (with the stacked tensors)


def setup_group(cfgs: list[TrainConfig], store: TrialStore | None) -> Group:
    """Each member set up as its own trial, resumed from its own checkpoint."""
    members = []
    for cfg in cfgs:
        ckpt = store.checkpoint_path(cfg.key()) if store is not None else None
        # eager, even with --compile (an execution option: the keys stay): compiling the fused step
        # (vmap over functional_call) is untested here, and K members' compiled evals cost K compiles
        members.append(resume(setup_trial(dataclasses.replace(cfg, compile=False), store), ckpt))
    model = members[0].model
    return Group(members=members, names=[n for n, _ in model.named_parameters()],
                 buffers=[n for n, _ in model.named_buffers()], frozen=[False] * len(members))


def channels_last(stacked: torch.Tensor) -> torch.Tensor:
    """A stack of K images or conv weights (K, N, C, H, W) laid out so that each member's
    slice is channels_last, as the unfused trial's tensors are on CUDA (cuDNN's fast layout)."""
    if stacked.dim() != 5:
        return stacked
    return stacked.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)


def attention_under_vmap(device: torch.device):
    """SDPA's backends for a vmapped step: the math one on CUDA. Under vmap the memory-efficient
    kernel's backward rejects the logsumexp layout it is handed ('LSE is not correctly aligned
    (strideB)', an H200 with torch 2.11), and every fused group fell back to one by one; the math
    backend is plain matmuls and a softmax, which vmap batches. The CPU keeps torch's choice
    (the fused ViTs equal their unfused trials to the last bit there)."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


def _fused_losses(g: Group, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """Each member's loss on its own batch, (K,), in one vmapped forward; the stacked
    BatchNorm statistics are written back to the members."""
    params = {n: torch.stack([t.model.get_parameter(n) for t in g.members]) for n in g.names}
    buffers = {n: torch.stack([t.model.get_buffer(n) for t in g.members]) for n in g.buffers}
    criterion = g.members[0].criterion
    if g.members[0].channels_last:
        xs, params = channels_last(xs), {n: channels_last(p) for n, p in params.items()}

    def loss(p, b, x, y):
        return criterion(functional_call(g.base, (p, b), (x,)), y)

    t0 = g.members[0]
    with runtime.autocast(t0.device, t0.cfg.amp), attention_under_vmap(t0.device):
        losses = vmap(loss, randomness="different")(params, buffers, xs, ys)
    with torch.no_grad():
        for n, stacked in buffers.items():
            for i, t in enumerate(g.members):
                t.model.get_buffer(n).copy_(stacked[i])
    return losses


def train_epoch(g: Group, epoch: int) -> list[float]:
    """One epoch of every member; each member's mean training loss (NaN or inf once it diverged)."""
    for t in g.members:
        t.train_loader.set_epoch(epoch)
        t.net.train()
    torch.manual_seed(derive_seed(EPOCH, g.members[0].cfg.seed, epoch))  # nothing draws from it: no dropout
    steps = len(g.members[0].train_loader)
    loss_sum = torch.zeros(len(g.members), device=g.members[0].device)
    for step, batches in enumerate(zip(*(t.train_loader for t in g.members))):
        losses = _fused_losses(g, torch.stack([x for x, _ in batches]), torch.stack([y for _, y in batches]))
        for t in g.members:
            t.opt.zero_grad(set_to_none=True)
        torch.where(torch.tensor(g.frozen, device=losses.device), 0.0, losses).sum().backward()
        for i, t in enumerate(g.members):
            if not g.frozen[i]:
                member_step(t, epoch * steps + step + 1)
        loss_sum += losses.detach().float()
        if (step + 1) % NAN_CHECK_EVERY == 0:
            _freeze_diverged(g, loss_sum)
    return (loss_sum / steps).tolist()


def _freeze_diverged(g: Group, loss_sum: torch.Tensor) -> None:
    """A member whose loss is no longer finite gets no more updates (its epoch ends it)."""
    for i, ok in enumerate(torch.isfinite(loss_sum).tolist()):
        g.frozen[i] = g.frozen[i] or not ok


def train_group(g: Group, store: TrialStore | None, progress=None) -> None:
    """Epochs of the group to the end; each member's history, checkpoints and divergence as
    its unfused trial keeps them (the trainer's own `end_epoch`)."""
    epochs = {t.state.epoch for t in g.members}
    if len(epochs) != 1:
        raise ValueError("members resume from different epochs; run them one by one")
    first = g.members[0]
    images = len(first.train_loader) * first.cfg.batch_size
    for epoch in range(epochs.pop(), first.cfg.epochs):
        live = [i for i, t in enumerate(g.members) if not t.state.diverged]
        if not live:
            return
        t0 = time.perf_counter()
        losses = train_epoch(g, epoch)
        train_s = time.perf_counter() - t0
        for i in live:  # each member trained for the whole time, side by side with the others
            t = g.members[i]
            end_epoch(t, epoch, losses[i], train_s, images, store.checkpoint_path(t.key) if store else None)
        if progress is not None:
            progress({"event": "epoch", "epoch": epoch + 1, "epochs": first.cfg.epochs,
                      "train_loss": min(losses[i] for i in live)})
        g.frozen = [t.state.diverged for t in g.members]


def run_group(cfgs: list[TrainConfig], store: TrialStore | None = None, progress=None) -> list[dict]:
    """Train CFGS as one fused group; each member recorded as its unfused trial would be
    (plus `fused_k`); returns their rows."""
    cfgs = [c.validate().resolved() for c in cfgs]
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    provenance()  # read now: the commit of the code this process runs
    g = setup_group(cfgs, store)
    train_group(g, store, progress)
    return [finish_trial(t, started, store, fused_k=len(g.members)) for t in g.members]
