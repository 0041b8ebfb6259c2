"""Start a trial from a finished one's kept weights: [ViT]'s transfer by fine-tuning.

A fine-tune trial is an ordinary trial whose config says where its weights come from
(`init_from`: the source trial's key, data set, size and resolution, all in its key). Its
model is built for the target (classes, image size), then takes the source's evaluated
weights (`weights/KEY.pt` in the trial's own folder) with three changes ([ViT] Sec. 3.2):
the head is a new zero-initialised linear layer, a ViT's position embeddings are
interpolated in 2D to the new token grid, and a first conv meets the target's channels.
`FINETUNE_RECIPE` is [ViT] App. B.1.1; `finetune` runs it over the lr grid of that
appendix, each lr on a held-out split of the target's training images, and reports the
test error of the lr that did best there: the test set never chooses anything.
`FineTune` is the trial feature (`trainer.Feature`) that starts a trial from its source.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from vitexp import models as vmodels
from vitexp.config import TrainConfig
from vitexp.data.datasets import dataset_info
from vitexp.errors import UserError
from vitexp.models.vit import interpolate_pos_embed
from vitexp.source import Source, find_source
from vitexp.store import TrialStore, read_weights

# [ViT] App. B.1.1: SGD with momentum 0.9, no weight decay, global grad-norm clip 1, cosine decay
# after a short linear warmup, a fixed number of steps, no label smoothing or regularisers; no EMA
# (fine-tuning evaluates the model it trained); lr at batch 512, scaled linearly with the batch
FINETUNE_RECIPE = dict(optimizer="sgd", momentum=0.9, nesterov=False, wd=0.0, grad_clip=1.0, lr_batch_size=512,
                       label_smoothing=0.0, mixup=0.0, cutmix=0.0, dropout=0.0, ema=False, precise_bn=0,
                       min_lr_frac=0.0)
FINETUNE_LRS = (0.001, 0.003, 0.01, 0.03)  # [ViT] App. B.1.1's grid, at batch 512
FINETUNE_STEPS = 500  # `vitexp finetune`'s default budget
WARMUP_SHARE = 0.05  # of the fine-tune's steps ([ViT]: 500 of 10,000)
HOLDOUT = 0.1  # [ViT]: 2-10% of the target's training images choose the lr

# `vitexp finetune`'s own options: name -> (flag, type, default (... required), help)
OPTIONS = {
    "source": ("--from", str, ..., "the finished trial to start from: DIR:KEY, DIR (a folder of one finished "
                                   "trial, e.g. a `vitexp train` folder) or DIR/weights/KEY.pt"),
    "steps": ("--steps", int | None, None, f"optimisation steps (a fixed number, [ViT] App. B.1.1) "
                                           f"[default: {FINETUNE_STEPS}]"),
    "epochs": ("--epochs", int | None, None, "or epochs of the target's training images, as every other command "
                                             "counts (instead of --steps)"),
    "lr": ("--lr", str | None, None, f"comma-separated lrs at batch 512 to choose from on the held-out split "
                                     f"[default: {','.join(map(str, FINETUNE_LRS))}]"),
    "holdout": ("--holdout", float, HOLDOUT, "fraction of the target's training images held out to choose the lr"),
    "model": ("--model", str | None, None, "check the source is this model"),
}
# the TrainConfig fields it takes as options (the trial's others are FINETUNE_RECIPE's or the
# source's), with what each means for a fine-tune where TrainConfig's help says otherwise;
# the target data set has no default
CONFIG_OPTIONS = {"dataset": "the target data set (e.g. fashion-mnist:5-9)",
                  "image_size": "fine-tune at this size (default: the source's; a ViT's position embeddings are "
                                "interpolated)",
                  "n_train": "class-balanced subset of the target's training images (None: all)",
                  "n_test": None, "batch_size": "batch size (the lr scales linearly from 512)",
                  "seed": "data order, augmentation, the held-out split", "device": None, "data_dir": None}
REQUIRED = ("dataset",)


class FineTune:
    """The trial feature of a fine-tune (`trainer.Feature`): the model starts from the source
    trial's kept weights (`load_source`), which sit in the fine-tune's own folder (`vitexp
    finetune` and the transfer study stage them there); loss and rows stay the plain trial's."""

    def __init__(self, cfg: TrainConfig, store: TrialStore | None):
        self.key = cfg.init_from["key"]
        self.weights = store.weights_path(self.key) if store is not None else None

    def build_options(self) -> dict:
        return {}

    def init_weights(self, model: nn.Module) -> None:
        if self.weights is None or not self.weights.exists():
            raise FileNotFoundError(f"no weights of source trial {self.key} at {self.weights}: it failed, "
                                    f"diverged or kept none")
        load_source(model, read_weights(self.weights))

    def loss(self, criterion: nn.Module, device: torch.device) -> None:
        return None  # the plain trial's

    def epoch_columns(self) -> dict:
        return {}


def head_keys(model: nn.Module) -> set[str]:
    """State-dict names of the classifier (what `features` reads the input of)."""
    head = vmodels.classifier(model)
    for name, module in model.named_modules():
        if module is head:
            return {f"{name}.{k}" for k in module.state_dict()}
    raise UserError(f"cannot find the classifier of {type(model).__name__}")


def load_source(model: nn.Module, source: dict) -> None:
    """MODEL (built for the target) takes SOURCE's weights (a `weights/KEY.pt`): a zero head,
    position embeddings interpolated to MODEL's grid, the first conv adapted to MODEL's channels
    (to grey: summed over colours, as a grey image is R = G = B; from grey: repeated and
    divided by the colours, timm's `adapt_input_conv` rule); anything else must fit as it is."""
    want, have, head = model.state_dict(), source["state_dict"], head_keys(model)
    missing = sorted(k for k in want if k not in head and k not in have)
    if missing:
        raise UserError(f"the source weights ({source.get('model')}) lack {missing[0]}: not this model's")
    out = {}
    for k, target in want.items():
        if k in head:
            out[k] = torch.zeros_like(target)
            continue
        w = have[k]
        if w.shape != target.shape:
            w = _fit(k, w, target, model)
        out[k] = w.to(target.dtype)
    model.load_state_dict(out)


def _fit(name: str, w: torch.Tensor, target: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """One source tensor reshaped to the target model's: position embeddings or a first conv."""
    if w.dim() == 3 and target.dim() == 3 and w.shape[-1] == target.shape[-1] and "pos_emb" in name:
        prefix = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 1)
        side = math.isqrt(target.shape[1] - prefix)
        return interpolate_pos_embed(w, (side, side), prefix)
    if w.dim() == 4 and target.dim() == 4 and w.shape[0] == target.shape[0] and w.shape[2:] == target.shape[2:]:
        if target.shape[1] == 1:
            return w.sum(1, keepdim=True)
        if w.shape[1] == 1:
            return w.repeat(1, target.shape[1], 1, 1) / target.shape[1]
    raise UserError(f"the source weights do not fit the target model at {name}: {tuple(w.shape)} vs "
                    f"{tuple(target.shape)}; fine-tune on images of the same channels (1 or 3)")


def finetune_fields(source: Source, dataset: str, n_train: int | None, batch_size: int, steps: int, lr: float,
                    holdout: float, image_size: int | None = None) -> dict:
    """The TrainConfig fields of a fine-tune of SOURCE on DATASET (N_TRAIN of its training
    images, HOLDOUT of them held out to judge the lr by) at IMAGE_SIZE (None: the source's):
    [ViT]'s recipe at LR (batch 512) for STEPS steps, evaluated halfway and at the end."""
    epochs = max(1, math.ceil(steps / steps_per_epoch(dataset, n_train, batch_size, holdout)))
    return dict(**FINETUNE_RECIPE, model=source.model, model_def=source.model_def, dataset=dataset, n_train=n_train,
                image_size=image_size or source.image_size, batch_size=batch_size, lr=lr, epochs=epochs,
                eval_every=max(1, epochs // 2), warmup_epochs=WARMUP_SHARE * epochs, holdout=holdout, fewshot=[],
                fewshot_data=None, init_from=source.init_from())


def steps_per_epoch(dataset: str, n_train: int | None, batch_size: int, holdout: float) -> int:
    """Full batches of a fine-tune's training images (its held-out share left out)."""
    n = n_train or dataset_info(dataset).n_train
    train_n = n - max(dataset_info(dataset).num_classes, round(holdout * n)) if holdout else n
    return max(1, train_n // batch_size)


def budget_steps(steps: int | None, epochs: int | None, base: TrainConfig, holdout: float) -> int:
    """A fine-tune's budget in steps from --steps or --epochs (of the target's training images
    at base's batch; one of them, default 500 steps)."""
    if steps is not None and epochs is not None:
        raise UserError("give --steps or --epochs, not both: a fine-tune's budget is one of them")
    if epochs is None:
        return FINETUNE_STEPS if steps is None else steps
    if epochs < 1:
        raise UserError(f"--epochs must be at least 1, got {epochs}")
    return epochs * steps_per_epoch(base.dataset, base.n_train, base.batch_size, holdout)


def check_target(source: Source, dataset: str) -> None:
    """A fine-tune the source cannot make (channels `load_source` cannot adapt), refused
    before anything is written."""
    chans = dataset_info(dataset).in_chans
    if chans != source.in_chans and 1 not in (chans, source.in_chans):
        raise UserError(f"--from {source.key} was trained on {source.in_chans}-channel images, {dataset} has "
                        f"{chans}; fine-tune on images of the same channels, or grey (1) from/to colour")


def plan_finetune(source_text: str, base: TrainConfig, steps: int, lrs, holdout: float,
                  model: str | None = None) -> tuple[Source, list[TrainConfig]]:
    """(source, one resolved fine-tune config per lr), every check made, nothing written."""
    source = find_source(source_text)
    if model is not None and model != source.model:
        raise UserError(f"--from {source_text} is a {source.model} trial, not {model}: a fine-tune keeps its "
                        f"source's model; leave --model out or pick a {model} trial")
    if not 1 <= steps <= 10**8:
        raise UserError(f"--steps must be in [1, 100000000], got {steps}")
    if not 0 <= holdout < 1:
        raise UserError(f"--holdout must be a fraction in [0, 1), got {holdout}")
    if len(lrs) > 1 and not holdout:
        raise UserError("choosing among several --lr values needs a held-out split; give --holdout 0.1 "
                        "(the test set never chooses)")
    check_target(source, base.dataset)
    cfgs = [dataclasses.replace(base, **finetune_fields(source, base.dataset, base.n_train, base.batch_size, steps,
                                                        float(lr), holdout, base.image_size),
                                extra={**base.extra, "study": "finetune", **source_columns(source, lr)})
            .validate().resolved() for lr in lrs]
    return source, cfgs


def source_columns(source: Source, lr: float) -> dict:
    """What a fine-tune's runs.csv row says of its source (and its lr, as chosen among)."""
    return {"source_key": source.key, "source_dataset": source.dataset, "source_n_train": source.n_train,
            "source_image_size": source.image_size, "finetune_lr": float(lr)}


def chosen(rows: list[dict]) -> dict:
    """The fine-tune whose lr did best on the held-out images (the smaller lr of equals, the
    transfer study's rule too); its final test error is the result."""
    ok = [r for r in rows if r.get("status") == "ok"]
    if not ok:
        raise UserError("every fine-tune failed; see the folder's log.txt")
    return min(ok, key=lambda r: (r.get("val_err", r["last_err"]), r["finetune_lr"]))


def chosen_line(best: dict, src: Source, holdout: float, out) -> str:
    """`vitexp finetune`'s last line: the source, the target, the lr the held-out images chose,
    its held-out and test error, where the rows are."""
    return (f"{best['model']} from {src.key} ({src.dataset}, {src.image_size} px) -> {best['dataset']} at "
            f"{best['image_size']} px: lr {best['finetune_lr']:g} chosen on {holdout:.0%} held out "
            f"(val_err {best.get('val_err', float('nan')):.2f}%), test error {best['last_err']:.2f}% -> "
            f"{out}/runs.csv")
