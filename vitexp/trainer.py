"""One trial, done right, in short steps: `setup_trial` -> `train_epoch` / `test_epoch`
-> `train_model` -> `run_trial` (the entry: resolves the config, records the row).

Protocol (PAPERS.md sections 3-4): the reported `top1_err` is the minimum over
epochs of the evaluated test error, the evaluated model being the EMA of the
weights when `cfg.ema` (else the model itself), with its BatchNorm statistics
recomputed first when `cfg.precise_bn`; `last_err` is the final one. A
non-finite training loss ends the trial as diverged with top1_err = last_err = 100,
it never raises.

Reproducibility: the model is initialised from `cfg.seed`, and every epoch reseeds
torch and the data order from (seed, epoch); so resuming from the checkpoint
written at an epoch boundary continues exactly as an uninterrupted run would
(bit for bit on the CPU).

Distributed: under torchrun the model is wrapped in DistributedDataParallel,
cfg.batch_size stays the global batch, each rank trains on its shard of every epoch,
the training loss is averaged across ranks and only rank 0 writes files (every rank
reads the checkpoint to resume: a shared file system).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import math
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.optim.swa_utils import update_bn

from vitexp import data as vdata
from vitexp import models as vmodels
from vitexp import rows, runtime
from vitexp.rows import DIVERGED_ERR
from vitexp.config import KEEP_WEIGHTS_MAX_PARAMS, TrainConfig
from vitexp.errors import UserError
from vitexp.features import trial_features
from vitexp.optim import EMA, build_optimizer, build_scheduler
from vitexp.seeds import EPOCH, derive_seed
from vitexp.fileio import atomic_write
from vitexp.provenance import provenance
from vitexp.store import TrialStore, set_aside

# host-side check for a non-finite loss every this many steps (each check is a sync)
NAN_CHECK_EVERY = 50
# EMA update period in steps (pycls uses 32; each update costs a host sync)
EMA_EVERY = 4

Progress = Callable[[dict], None]
Loss = Callable[[object, torch.Tensor, torch.Tensor], torch.Tensor]  # (model output, images, labels) -> loss
# the columns of every history row; a feature's `epoch_columns` add others, and the last
# epoch's reach the trial's runs.csv row
EPOCH_COLUMNS = ("key", "epoch", "train_loss", "test_err", "ema_err", "lr", "seconds", "images_per_s")


class Feature(Protocol):
    """What a trial feature (fine-tuning, distillation: `vitexp.features.FEATURES`) may change
    of a plain trial; the trainer calls these hooks and knows no feature by name."""

    def build_options(self) -> dict:
        """Keyword arguments `build_model` adds for this feature (a distillation token)."""

    def init_weights(self, model: nn.Module) -> None:
        """Set the freshly built, seeded model's first weights (a fine-tune's source)."""

    def loss(self, criterion: nn.Module, device: torch.device) -> Loss | None:
        """The training loss instead of CRITERION(output, labels); None: the plain one."""

    def epoch_columns(self) -> dict:
        """Columns of the epoch's history row (read once per epoch, after its training)."""


@dataclasses.dataclass
class TrialState:
    """What a checkpoint carries besides weights: where the trial stands."""

    epoch: int = 0  # epochs done
    history: list[dict] = dataclasses.field(default_factory=list)  # one history.csv row per epoch done
    wall: float = 0.0  # seconds of training and evaluation so far
    diverged: bool = False


@dataclasses.dataclass
class Trial:
    """Everything a trial trains with; `state` is what a checkpoint carries besides weights."""

    cfg: TrainConfig
    key: str
    device: torch.device
    dist: runtime.Dist
    bundle: vdata.DataBundle
    model: nn.Module  # the bare model (weights, checkpoints, EMA source)
    net: nn.Module  # what the step calls: the model, DDP-wrapped and/or compiled
    ema: EMA | None
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    train_loader: object
    test_loader: object
    mixer: Callable | None
    criterion: nn.Module  # the plain loss (a fused group's, which has no feature that changes it)
    loss: Loss  # what a step minimises: the criterion's, or a feature's
    channels_last: bool
    features: list[Feature] = dataclasses.field(default_factory=list)
    keep_weights: bool = False  # write the final evaluated weights when the trial ends
    state: TrialState = dataclasses.field(default_factory=TrialState)


def setup_model(cfg: TrainConfig, bundle: vdata.DataBundle, device: torch.device, d: runtime.Dist,
                features: list[Feature] = ()):
    """(model, net, channels_last): the model on the device, seeded by cfg.seed, built and
    first weighted as its FEATURES say; net wraps it for the step (DDP under torchrun,
    torch.compile on request)."""
    torch.manual_seed(cfg.seed)
    options = {k: v for f in features for k, v in f.build_options().items()}
    model = vmodels.build_model(cfg.model_spec(), image_size=bundle.image_size, in_chans=bundle.in_chans,
                                num_classes=bundle.num_classes, dropout=cfg.dropout, **options)
    for f in features:
        f.init_weights(model)
    if cfg.sync_bn and d.world > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    # cuDNN's fast conv layout. Not on the CPU, where it would run the 7 MF ResNet's step 1.7-2.1x
    # faster: there oneDNN's backward of a 1x1 stride-2 conv from 8 channels crashes the process
    # at 48 px and above (torch 2.14.1; the 64 px ResNet, a slow test; benchmarks/cpu_layout.py)
    channels_last = device.type == "cuda" and not vmodels.is_vit(model)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    net = model
    if d.world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:  # the DDP-wrapped model is compiled, the order torch's DDP + torch.compile notes give
        # a CPU-only machine has no CUDA runtime, and inductor's C++ builder says so on every compile
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
        net = runtime.compile_model(net, device)
    return model, net, channels_last


def setup_trial(cfg: TrainConfig, store: TrialStore | None = None, features: list[Feature] | None = None) -> Trial:
    """Device, data, model, EMA, optimizer, schedule and loss of a resolved config, with the
    features it asks for (`vitexp.features`; their weights in STORE) unless given."""
    features = trial_features(cfg, store) if features is None else features
    d, device = runtime.init_distributed(runtime.resolve_device(cfg.device))
    runtime.check_batch(cfg.batch_size, d.world)
    bundle = vdata.load_data(cfg.dataset, data_dir=cfg.data_dir, image_size=cfg.image_size,
                             n_train=cfg.n_train, n_test=cfg.n_test, subset_seed=cfg.subset_seed, holdout=cfg.holdout)
    model, net, channels_last = setup_model(cfg, bundle, device, d, features)
    train_loader, test_loader = vdata.make_loaders(bundle, cfg, device, d.rank, d.world)
    opt = build_optimizer(model, cfg, device)
    keep = cfg.keep_weights
    if keep is None:
        keep = sum(p.numel() for p in model.parameters()) <= KEEP_WEIGHTS_MAX_PARAMS
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    loss = next((f_loss for f in features if (f_loss := f.loss(criterion, device)) is not None),
                lambda out, x, y: criterion(out, y))
    return Trial(cfg=cfg, key=cfg.key(), device=device, dist=d, bundle=bundle, model=model, net=net,
                 ema=EMA(model, cfg.ema_decay, EMA_EVERY) if cfg.ema else None, opt=opt,
                 sched=build_scheduler(opt, cfg, len(train_loader)), train_loader=train_loader,
                 test_loader=test_loader, mixer=vdata.batch_mixer(cfg, bundle.num_classes),
                 criterion=criterion, loss=loss, channels_last=channels_last, features=features, keep_weights=keep)


def epoch_batches(t: Trial, epoch: int):
    """EPOCH's training batches as a step sees them: seeded, mixed, in the model's layout."""
    torch.manual_seed(derive_seed(EPOCH, t.cfg.seed, epoch))  # dropout, mixup: exact on resume
    t.train_loader.set_epoch(epoch)
    for x, y in t.train_loader:
        if t.mixer is not None:
            x, y = t.mixer(x, y)
        if t.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        yield x, y


def train_epoch(t: Trial, epoch: int, progress: Progress | None = None) -> float:
    """One epoch of training; the mean training loss (NaN or inf once it diverged)."""
    t.net.train()
    steps = len(t.train_loader)
    loss_sum = torch.zeros((), device=t.device)
    for step, (x, y) in enumerate(epoch_batches(t, epoch)):
        with runtime.autocast(t.device, t.cfg.amp):
            out = t.net(x)
            loss = t.loss(out, x, y)
        t.opt.zero_grad(set_to_none=True)
        loss.backward()
        member_step(t, epoch * steps + step + 1)
        loss_sum += loss.detach()
        if (step + 1) % NAN_CHECK_EVERY == 0 and not torch.isfinite(loss_sum):
            break
        if progress is not None and t.device.type == "cpu":  # on a GPU this would sync every step
            progress({"event": "step", "step": step + 1, "steps": steps, "epoch": epoch})
    if t.dist.world > 1:
        dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
    return loss_sum.item() / steps


def member_step(t: Trial, global_step: int) -> None:
    """The update after a backward (the same in a fused group): clip, step, schedule, EMA."""
    if t.cfg.grad_clip:
        nn.utils.clip_grad_norm_(t.model.parameters(), t.cfg.grad_clip)
    t.opt.step()
    t.sched.step()
    # counted over the whole run: an epoch of fewer than EMA_EVERY steps still updates
    if t.ema is not None and global_step % EMA_EVERY == 0:
        t.ema.update_parameters(t.model)


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, amp: bool, pad: bool = False) -> float:
    """Top-1 error in percent over the whole loader (one host sync at the end). PAD: a last,
    smaller batch is padded to the first's size (and cut after), so that a compiled model sees
    one shape and is not compiled again for it (eval mode: each image is computed alone)."""
    model.eval()
    wrong = torch.zeros((), device=device, dtype=torch.long)
    total, full = 0, None
    for x, y in loader:
        full = full or len(x)
        n = len(x)
        if pad and n < full:
            x = torch.cat([x, x.new_zeros((full - n, *x.shape[1:]))])
        with runtime.autocast(device, amp):
            out = model(x)[:n]
        wrong += (out.argmax(1) != y).sum()
        total += y.numel()
    return 100.0 * wrong.item() / max(total, 1)


def precise_bn(t: Trial, model: nn.Module) -> None:
    """Recompute MODEL's BatchNorm statistics on the first cfg.precise_bn images of this
    epoch's training batches, as pycls does before each evaluation: running averages
    trail the weights (most at a high lr, and in an EMA that averages them too). torch's
    update_bn averages per-batch variances, leaving out the spread of the batch means
    (variance / batch size: under 2% from 64 images a batch). Models without BatchNorm
    are left untouched, at no cost."""
    update_bn(itertools.islice(t.train_loader, math.ceil(t.cfg.precise_bn / t.cfg.batch_size)), model)
    if t.dist.world > 1:  # each rank saw its own shard: evaluate with their average
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                dist.all_reduce(m.running_mean, op=dist.ReduceOp.AVG)
                dist.all_reduce(m.running_var, op=dist.ReduceOp.AVG)


def test_epoch(t: Trial, epoch: int) -> tuple[float, float]:
    """(test_err, ema_err) after EPOCH (0-based), NaN where this epoch is not evaluated."""
    cfg = t.cfg
    if (epoch + 1) % cfg.eval_every and epoch + 1 != cfg.epochs:
        return math.nan, math.nan
    if cfg.precise_bn:  # eager, on the bare model: a few batches; the compiled net shares its buffers
        for model in [t.model] + ([t.ema.module] if t.ema is not None else []):
            precise_bn(t, model)
    # the model through its compiled net (one more graph, for eval mode); the EMA, evaluated as
    # often, stays eager: compiling a second module costs more than its few test batches gain
    test_err = evaluate(t.net if t.dist.world == 1 else t.model, t.test_loader, t.device, cfg.amp, pad=cfg.compile)
    ema_err = evaluate(t.ema.module, t.test_loader, t.device, cfg.amp) if t.ema is not None else math.nan
    return test_err, ema_err


def save_checkpoint(t: Trial, path: Path) -> None:
    atomic_write(path, lambda f: torch.save(
        {"model": t.model.state_dict(), "opt": t.opt.state_dict(), "sched": t.sched.state_dict(),
         "ema": t.ema.state_dict() if t.ema is not None else None, "state": dataclasses.asdict(t.state)}, f))


def load_checkpoint(t: Trial, path: Path) -> None:
    saved = torch.load(path, map_location=t.device, weights_only=False)
    t.model.load_state_dict(saved["model"])
    t.opt.load_state_dict(saved["opt"])
    t.sched.load_state_dict(saved["sched"])
    if t.ema is not None:
        t.ema.load_state_dict(saved["ema"])
    t.state = TrialState(**saved["state"])


def kept_weights(t: Trial, row: dict) -> dict | None:
    """What `weights/KEY.pt` holds (None: not kept): the final evaluated weights, the EMA's when
    cfg.ema, BatchNorm statistics included: what `last_err` and `val_err` measure, so no test
    image chose them (a fine-tune or a teacher starts from the model the study reports)."""
    if not t.keep_weights or t.state.diverged:
        return None
    evaluated = t.ema.module if t.ema is not None else t.model
    b = t.bundle
    return {"state_dict": {k: v.detach().to("cpu", copy=True) for k, v in evaluated.state_dict().items()},
            "key": t.key, "model": t.cfg.model, "model_def": t.cfg.model_def,
            "evaluated": "ema" if t.cfg.ema else "model", "epoch": row["epochs_run"], "last_err": row["last_err"],
            "dataset": t.cfg.dataset, "image_size": b.image_size, "in_chans": b.in_chans, "num_classes": b.num_classes}


def resume(t: Trial, ckpt: Path | None) -> Trial:
    """T at the checkpoint a killed run left, if any; an unreadable checkpoint (damaged, or
    from another version of the code) is set aside and the trial starts afresh."""
    if ckpt is None or not ckpt.exists():
        return t
    try:
        load_checkpoint(t, ckpt)
    except Exception as e:  # noqa: BLE001 - whatever is wrong with the file, training from scratch is right
        set_aside(ckpt, f"{type(e).__name__}: {str(e)[:80]}")
        return setup_trial(t.cfg, features=t.features)
    return t


def end_epoch(t: Trial, epoch: int, train_loss: float, train_s: float, images: int, ckpt: Path | None) -> dict | None:
    """After EPOCH's training (also of a fused member): divergence, evaluation, the history
    row, the state and a checkpoint (by rank 0, not after the last epoch); the row, None
    once diverged."""
    if not math.isfinite(train_loss):
        t.state.diverged = True
        t.state.wall += train_s
        return None
    e0 = time.perf_counter()
    test_err, ema_err = test_epoch(t, epoch)
    seconds = train_s + time.perf_counter() - e0
    row = {"key": t.key, "epoch": epoch + 1, "train_loss": train_loss, "test_err": test_err, "ema_err": ema_err,
           "lr": t.sched.get_last_lr()[0], "seconds": seconds, "images_per_s": images / train_s}
    for f in t.features:
        row.update(f.epoch_columns())
    t.state.history.append(row)
    t.state.epoch = epoch + 1
    t.state.wall += seconds
    if ckpt is not None and t.dist.main and epoch + 1 < t.cfg.epochs:
        save_checkpoint(t, ckpt)
    return row


def train_model(t: Trial, ckpt: Path | None = None, progress: Progress | None = None) -> None:
    """Epochs from T's state to the end, or to divergence; a checkpoint after every epoch
    but the last."""
    images = len(t.train_loader) * t.cfg.batch_size
    for epoch in range(t.state.epoch, t.cfg.epochs):
        t0 = time.perf_counter()
        train_loss = train_epoch(t, epoch, progress)
        row = end_epoch(t, epoch, train_loss, time.perf_counter() - t0, images, ckpt)
        if row is None:
            return
        if progress is not None:
            progress({"event": "epoch", **row, "epochs": t.cfg.epochs})


def summarise(t: Trial, started: str) -> dict:
    """The trial's runs.csv row (few-shot errors added when asked)."""
    hist, cfg = t.state.history, t.cfg
    row = rows.trial_row(
        cfg, t.key, **rows.summary(cfg, hist, t.state.diverged), n_train=cfg.n_train or len(t.bundle),
        train_loss=hist[-1]["train_loss"] if hist else math.nan, diverged=bool(t.state.diverged),
        epochs_run=len(hist), wall_s=round(t.state.wall, 3),
        images_per_s=(sum(h["images_per_s"] for h in hist) / len(hist)) if hist else math.nan,
        params_m=sum(p.numel() for p in t.model.parameters()) / 1e6, device=runtime.device_name(t.device),
        amp=runtime.amp_enabled(t.device, cfg.amp), data_dir=t.bundle.source, started_at=started, fused_k=1,
        **provenance())
    if hist:  # the features' columns of the last epoch
        row.update({k: v for k, v in hist[-1].items() if k not in EPOCH_COLUMNS})
    evaluated = t.ema.module if t.ema is not None else t.model
    if t.bundle.val_x is not None:  # the final model on the held-out images: what chooses hyper-parameters
        val = vdata.loaders.InMemoryLoader(t.bundle.val_x.to(t.device), t.bundle.val_y.to(t.device), t.bundle,
                                           cfg.batch_size, train=False)
        row["val_err"] = DIVERGED_ERR if t.state.diverged else evaluate(evaluated, val, t.device, cfg.amp)
        row["n_holdout"] = len(t.bundle.val_y)  # n_train stays the config's (the key's): these came out of it
    row["converged"] = rows.judged(row, hist)
    row["converged_rule"] = rows.CONVERGENCE_RULE
    if cfg.fewshot and not t.state.diverged:  # eager even when compiled: once per trial, not worth a compile
        from vitexp.fewshot import fewshot_eval

        shots = t.bundle
        if cfg.fewshot_data:  # the shots and the test images of another data set, at this trial's size
            shots = vdata.load_data(cfg.fewshot_data, data_dir=cfg.data_dir, image_size=t.bundle.image_size)
        row.update(fewshot_eval(evaluated, shots, cfg, t.device))
    return row


@contextlib.contextmanager
def tensorboard(cfg: TrainConfig, store: TrialStore | None, progress: Progress | None):
    """PROGRESS, also writing every epoch's numbers to STORE/tensorboard/KEY when cfg.tensorboard."""
    if not cfg.tensorboard or store is None or not runtime.dist_env().main:
        yield progress
        return
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("--tensorboard needs the tensorboard package; pip install 'vitexp[tensorboard]'") from None
    writer = SummaryWriter(str(store.tensorboard_dir(cfg.key())))

    def log(event: dict) -> None:
        if event["event"] == "epoch":
            for name in ("train_loss", "test_err", "ema_err", "lr", "images_per_s"):
                if event[name] == event[name]:  # NaN: not evaluated this epoch
                    writer.add_scalar(name, event[name], event["epoch"])
        if progress is not None:
            progress(event)

    try:
        yield log
    finally:
        writer.close()


def compiled_graphs() -> int:
    """Graphs torch.compile has made in this process so far (torch._dynamo's own counter): a
    compiled trial makes two at most, training and evaluation (none where an earlier trial of
    the process compiled the same model); more would mean recompiles."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def finish_trial(t: Trial, started: str, store: TrialStore | None, **more) -> dict:
    """A trial's end (also a fused member's): its row (with MORE), recorded by rank 0."""
    row = {**summarise(t, started), **more}
    if store is not None and t.dist.main:
        store.record(t.key, row, t.state.history, kept_weights(t, row))
    return row


def run_trial(cfg: TrainConfig, out: str | Path | None = None, progress: Progress | None = None,
              store: TrialStore | None = None) -> dict:
    """Train one trial and return its row. With `out` (or `store`): a trial already
    finished there is not trained again (its row comes back); otherwise checkpoint every
    epoch, resume from a checkpoint a killed run left, and record the row (with `out`,
    runs.csv and history.csv follow; a `store`'s owner rebuilds them when its run ends)."""
    cfg = cfg.validate().resolved()
    own = store is None and out is not None
    if own:
        store = TrialStore(out)
    done = store.result(cfg.key()) if store is not None else None
    if done is not None and done.get("status") == "ok":
        return done
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    provenance()  # read now: the commit of the code this process runs
    ckpt = store.checkpoint_path(cfg.key()) if store is not None else None
    t = resume(setup_trial(cfg, store), ckpt)
    if progress is not None and t.state.epoch:
        progress({"event": "resumed", "epoch": t.state.epoch, "epochs": cfg.epochs})
    graphs = compiled_graphs()
    with tensorboard(cfg, store, progress) as progress:
        train_model(t, ckpt, progress)
    row = finish_trial(t, started, store, **({"compiled_graphs": compiled_graphs() - graphs} if cfg.compile else {}))
    skipped = sorted(getattr(t.train_loader, "skipped", set()) | getattr(t.test_loader, "skipped", set()))
    if skipped and store is not None:
        store.logger().info("trial %s left out %d unreadable image file(s): %s", t.key, len(skipped),
                            ", ".join(skipped))
    if own and t.dist.main:
        store.rebuild()
    return row
