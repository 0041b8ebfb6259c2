"""The one config object: everything that defines a trial.

A trial is a pure function of its TrainConfig (and the code): the trial key is a
hash of the fields that change the result, so studies can skip finished trials and
two machines agree on which trial is which. Defaults follow the EC paper's recipe
(PAPERS.md section 3) where it does not depend on the data scale; the heavy
ImageNet regularisers (mixup, cutmix, AutoAugment) default off and the ImageNet
presets switch them on, because on a few thousand 32 px images and a few epochs
they only slow learning down.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field, fields

from vitexp.errors import UserError, unknown
from vitexp.tuned import TUNED

OPTIMIZERS = ("adamw", "sgd")
AUGMENTS = ("none", "autoaugment", "randaugment")
DISTILLATIONS = ("hard", "soft")
SEED_MAX = 2**63
MAX_IMAGE, MIN_IMAGE = 1024, 8  # px: beyond what the models or memory allow
# field -> (low, high, high included, in words): the range every numeric field must lie in
RANGES = {
    "lr": (1e-12, 1e4, True, "positive and at most 1e4 (the lr at batch lr_batch_size)"),
    "wd": (0.0, 10.0, True, "in [0, 10]"),
    "epochs": (1, 1_000_000, True, "a positive number of epochs"),
    "batch_size": (1, 1 << 20, True, "in [1, 1048576]"),
    "lr_batch_size": (1, 1 << 20, True, "in [1, 1048576]"),
    "eval_every": (1, 1_000_000, True, "a positive number of epochs"),
    "warmup_epochs": (0.0, 1e6, True, "in [0, 1e6]"),
    "min_lr_frac": (0.0, 1.0, True, "in [0, 1]"),
    "momentum": (0.0, 1.0, False, "in [0, 1)"),
    "grad_clip": (1e-12, 1e12, True, "positive (or left out: no clipping)"),
    "label_smoothing": (0.0, 1.0, False, "in [0, 1)"),
    "mixup": (0.0, 1e3, True, "in [0, 1000] (0: off)"),
    "cutmix": (0.0, 1e3, True, "in [0, 1000] (0: off)"),
    "crop_pad": (0, MAX_IMAGE, True, f"in [0, {MAX_IMAGE}]"),
    "dropout": (0.0, 1.0, False, "in [0, 1)"),
    "ema_decay": (1e-12, 1.0, False, "in (0, 1)"),
    "precise_bn": (0, 1 << 40, True, "a number of training images (0: off), e.g. 8192"),
    "holdout": (0.0, 1.0, False, "a fraction in [0, 1) (0: off), e.g. 0.1"),
    "distill_tau": (1e-3, 1e3, True, "a positive temperature, e.g. 3"),
    "distill_alpha": (0.0, 1.0, True, "in [0, 1]"),
    "seed": (0, SEED_MAX, False, "in [0, 2**63)"),
    "subset_seed": (0, SEED_MAX, False, "in [0, 2**63)"),
    "n_train": (1, 1 << 40, True, "positive"),
    "n_test": (1, 1 << 40, True, "positive"),
    "image_size": (1, MAX_IMAGE, True, f"in [1, {MAX_IMAGE}] px"),
    "num_workers": (0, 1024, True, "in [0, 1024]"),
}


def _finite(v) -> bool:
    return math.isfinite(v) if isinstance(v, float) else True


def _f(default, help: str):
    """A config field with its help text (shown by the CLI and the README)."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    # what
    model: str = _f("vit_c_50mf", "a built-in model's name (`vitexp models`), a preset's [models.NAME] (with "
                                  "`--preset`), or timm:NAME")
    model_def: dict = field(default_factory=dict, metadata={
        "help": "the preset's [models.NAME] table of a model vitexp does not ship (set from the preset)"})
    dataset: str = _f("shapes", "shapes | fashion-mnist | cifar10 | cifar100 | svhn | imagefolder:PATH")
    n_train: int | None = _f(None, "class-balanced nested subset of the training set (None: all)")
    n_test: int | None = _f(None, "first n of the fixed test set (None: all)")
    image_size: int | None = _f(None, "resize to this (None: the data set's native size, or the ViT's own "
                                "resolution where its patch does not divide that)")
    subset_seed: int = _f(0, "which nested subsets; kept fixed across sizes of one study")
    seed: int = _f(0, "init, data order, augmentation")
    # optimisation (lr and wd: None takes the model's tuned value for the optimizer)
    optimizer: str = _f("adamw", "adamw (betas 0.9, 0.999) | sgd (momentum, nesterov)")
    lr: float | None = _f(None, "peak lr at batch `lr_batch_size`, scaled linearly with batch_size")
    wd: float | None = _f(None, "weight decay; never on norms, biases, pos/class embeddings")
    lr_batch_size: int = _f(2048, "the paper's reference batch for lr")
    epochs: int = _f(10, "training epochs over the (sub)set")
    batch_size: int = _f(128, "global batch size (split across ranks under torchrun)")
    eval_every: int = _f(1, "evaluate every this many epochs (and always after the last)")
    warmup_epochs: float = _f(5.0, "linear warmup, capped at a tenth of training")
    min_lr_frac: float = _f(0.005, "half-cosine ends at min_lr_frac x peak lr")
    momentum: float = _f(0.9, "SGD momentum")
    nesterov: bool = _f(True, "SGD Nesterov momentum (the paper's CNN recipe)")
    grad_clip: float | None = _f(None, "max grad norm (None: off)")
    # regularisation
    label_smoothing: float = _f(0.1, "label smoothing of the cross-entropy (paper: 0.1)")
    mixup: float = _f(0.0, "MixUp alpha (paper: 0.8); 0 = off")
    cutmix: float = _f(0.0, "CutMix alpha (paper: 1.0); one of the two per batch when both > 0")
    augment: str = _f("none", "none | autoaugment | randaugment (ImageFolder pipeline)")
    crop_pad: int | None = _f(None, "random crop with this padding (in-memory pipeline); 0 = off; "
                              "None: 4, but 0 on shapes, whose objects already sit at random places")
    hflip: bool = _f(True, "random horizontal flip")
    dropout: float = _f(0.0, "ViT dropout")
    ema: bool = _f(True, "evaluate an EMA of the weights (the papers' protocol)")
    ema_decay: float = _f(0.999, "per step; warmed up as min(decay, (1+n)/(10+n))")
    precise_bn: int = _f(0, "before each evaluation, recompute BatchNorm statistics of the model and its EMA "
                         "on this many training images (pycls: 8192; more than the training set: all of them); 0 = off")
    fewshot: list[int] = field(default_factory=list, metadata={"help": "k-shot linear eval of frozen features at the end, e.g. 1,5,10"})
    fewshot_data: str | None = _f(None, "the data set of the few-shot eval (its training images give the shots, its "
                                        "test images the error; at this trial's image size); None: the trial's own")
    holdout: float = _f(0.0, "hold out this fraction of the training images (class-balanced) and report the final "
                             "model's error on them as val_err: a split to choose hyper-parameters on; 0 = off")
    teacher: dict = field(default_factory=dict, metadata={
        "help": "the finished trial whose weights teach this ViT through a distillation token (set by --teacher)"})
    distillation: str = _f("hard", "with a teacher: hard (DeiT: the teacher's argmax as the distillation head's label) "
                                   "| soft (KL to the teacher's softened outputs)")
    distill_tau: float = _f(3.0, "soft distillation's temperature (DeiT: 3)")
    distill_alpha: float = _f(0.1, "soft distillation's weight of the KL term (DeiT: 0.1; hard: 1/2 each)")
    init_from: dict = field(default_factory=dict, metadata={
        "help": "the finished trial whose weights this one starts from (set by `vitexp finetune` and the transfer study)"})
    # execution (do not change the result's meaning; left out of the trial key)
    device: str = _f("auto", "auto | cpu | cuda | cuda:N")
    compile: bool | None = _f(None, "torch.compile the model (unset: on the CPU for trials of at least 150 steps, "
                                    "which earn the compile back; off on a GPU)")
    amp: bool = _f(True, "bf16 autocast on CUDA (never on the CPU)")
    num_workers: int = _f(4, "DataLoader workers (ImageFolder pipeline)")
    data_dir: str | None = _f(None, "where data sets live (default: $VITEXP_DATA or the user cache)")
    sync_bn: bool = _f(False, "SyncBatchNorm for CNNs under torchrun")
    tensorboard: bool = _f(False, "log each epoch to OUT/tensorboard/KEY (pip install 'vitexp[tensorboard]')")
    keep_weights: bool | None = _f(None, "write the final evaluated weights (the EMA's "
                                         "when --ema) to OUT/weights/KEY.pt (unset: for models of at most "
                                         "10M parameters)")
    skip_unreadable: bool = _f(False, "image folders: leave out image files that cannot be read (each named in "
                                      "the log) instead of stopping at the first")
    extra: dict = field(default_factory=dict, metadata={"help": "study-specific columns, carried into the row"})

    # fields that say where or how fast a trial runs, not what it computes
    EXECUTION = ("device", "compile", "amp", "num_workers", "data_dir", "sync_bn", "tensorboard", "keep_weights",
                 "skip_unreadable", "extra")
    # fields a preset or a study sets, never an option of their own
    NOT_OPTIONS = ("extra", "model_def", "init_from", "teacher")
    # fields added after results were committed: in the key only when set, so trials
    # finished before they existed keep their keys
    KEYED_WHEN_SET = ("precise_bn", "model_def", "fewshot_data", "holdout", "init_from", "teacher", "distillation",
                      "distill_tau", "distill_alpha")

    def __post_init__(self) -> None:
        """A config is checked when made (a notebook's TrainConfig(lr=-1) is refused at once):
        each field's type, range and choices, and a built-in model's name; what needs the data set
        or builds a model waits for validate()."""
        self._check_fields()
        if not self.model_def:
            from vitexp.models.registry import get_spec

            get_spec(self.model)  # an unknown name: the closest ones

    def validate(self) -> "TrainConfig":
        """Raise UserError naming the first bad field: its type, then its range (RANGES),
        then what depends on the model and the data set."""
        self._check_fields()
        self._check_model_and_data()
        return self

    def _check_fields(self) -> None:
        """Each field's type, range (RANGES) and choices."""
        self._check_types()
        for name, (lo, hi, closed, what) in RANGES.items():
            v = getattr(self, name)
            if v is not None and not (_finite(v) and lo <= v and (v <= hi if closed else v < hi)):
                raise UserError(f"--{name.replace('_', '-')} must be {what}, got {v}")
        if any(k <= 0 for k in self.fewshot):
            raise UserError(f"--fewshot shots must be positive, got {self.fewshot}")
        for name, choices in (("optimizer", OPTIMIZERS), ("augment", AUGMENTS), ("distillation", DISTILLATIONS)):
            if getattr(self, name) not in choices:
                raise unknown(name, getattr(self, name), choices)

    def _check_model_and_data(self) -> None:
        """Image size and crop within what the model allows; subset and batch within the data."""
        from vitexp.data.datasets import dataset_info
        from vitexp.models.registry import check_model

        spec = self.model_spec()  # unknown model: the closest names
        info = dataset_info(self.dataset)  # unknown data set: the closest names
        patch = spec.patch(self.image_size)
        size = self.image_size
        if self.teacher:
            self._check_teacher(spec, size or self._native_size(spec, info))
        if not spec.builtin:  # a preset's or timm's model: can it take these images at all?
            check_model(spec, size or self._native_size(spec, info), info.in_chans, info.num_classes)
        if patch and size is not None and size % patch:
            raise UserError(f"--image-size {size} is not divisible by {self.model}'s patch size {patch}; "
                            f"use a multiple of {patch}, e.g. {max(patch, size // patch * patch)}")
        if size is not None and size < max(patch or 0, MIN_IMAGE):
            raise UserError(f"--image-size {size} is too small for {self.model}; use at least {max(patch or 0, MIN_IMAGE)}")
        if self.crop_pad is not None and self.crop_pad > (size or info.image_size):
            raise UserError(f"--crop-pad {self.crop_pad} is larger than the image ({size or info.image_size} px); "
                            f"use at most a quarter of it, e.g. 4")
        if self.n_train is not None and info.n_train and self.n_train < info.num_classes:
            raise UserError(f"--n-train {self.n_train} is fewer images than {self.dataset}'s {info.num_classes} "
                            f"classes; use at least {info.num_classes}")
        n = self.n_train or info.n_train
        shots = dataset_info(self.fewshot_data) if self.fewshot_data else None  # unknown: the closest names
        if shots is not None and shots.in_chans != info.in_chans:
            raise UserError(f"--fewshot-data {self.fewshot_data} has {shots.in_chans}-channel images, {self.dataset} "
                            f"{info.in_chans}-channel ones; give a data set of the same kind")
        pool, classes = (shots.n_train, shots.num_classes) if shots is not None else (n, info.num_classes)
        if pool and self.fewshot and max(self.fewshot) > pool // classes:
            raise UserError(f"--fewshot {max(self.fewshot)} needs {max(self.fewshot)} training images per class; "
                            f"{pool} images of {classes} classes give {pool // classes}: "
                            f"use fewer shots or a larger --n-train")
        if n and self.batch_size > n:
            raise UserError(f"--batch-size {self.batch_size} is larger than the training set ({n} images); "
                            f"use at most {n}")

    def _check_teacher(self, spec, size: int) -> None:
        """A distilled student is a ViT, taught on its own data at its own image size."""
        from vitexp.models.registry import check_student

        t = self.teacher
        check_student(spec)
        if t.get("dataset") != self.dataset:
            raise UserError(f"--teacher {t.get('key')} was trained on {t.get('dataset')}, not {self.dataset}; give a "
                            f"teacher of the student's data set and classes")
        if t.get("image_size") != size:
            raise UserError(f"--teacher {t.get('key')} saw {t.get('image_size')} px images, the student {size} px; "
                            f"give --image-size {t.get('image_size')} or a teacher trained at {size} px")

    def _check_types(self) -> None:
        """Presets and notebooks can pass anything: say which field has the wrong type."""
        for f in fields(self):
            v, allowed = getattr(self, f.name), _allowed_types()[f.name]
            ok = isinstance(v, allowed) and not (isinstance(v, bool) and bool not in allowed)
            if float in allowed and isinstance(v, int) and not isinstance(v, bool):
                ok = True
            if ok and isinstance(v, list):
                ok = all(isinstance(x, int) and not isinstance(x, bool) for x in v)
            if not ok:
                names = " or ".join("None" if a is type(None) else "a list of int" if a is list else a.__name__
                                    for a in allowed)
                raise UserError(f"{f.name} must be {names}, got {v!r}; fix --{f.name.replace('_', '-')} "
                                f"(or [train] {f.name} in the preset)")

    def resolved(self) -> "TrainConfig":
        """A copy with lr/wd filled from the model's tuned values, crop_pad from the data set,
        compile decided where unset, precise_bn cut to the training images there are, and image_size where the data's own size would not fit the ViT's patches (a 7mf
        ViT's 8 px patches on 28 px Fashion-MNIST: resized to the model's 32 px)."""
        from vitexp.data.datasets import dataset_info

        spec, info = self.model_spec(), dataset_info(self.dataset)
        lr, wd = self.lr, self.wd
        if lr is None or wd is None:
            tuned_lr, tuned_wd = tuned_hparams(spec, self.optimizer)
            lr, wd = tuned_lr if lr is None else lr, tuned_wd if wd is None else wd
        pad = self.crop_pad if self.crop_pad is not None else (0 if self.dataset == "shapes" else 4)
        size = self.image_size
        if size is None and self._native_size(spec, info) != info.image_size:
            size = spec.resolution
        n = self.n_train or info.n_train
        return dataclasses.replace(self, lr=lr, wd=wd, crop_pad=pad, image_size=size,
                                   precise_bn=_precise_bn(self.precise_bn, n), compile=self._compile(n))

    def needs(self) -> list[str]:
        """The keys of the trials whose kept weights this one reads (its fine-tuning source,
        its teacher): it runs after them."""
        return [d["key"] for d in (self.init_from, self.teacher) if d]

    def model_spec(self):
        """The model's spec: from `model_def` where the preset defined the model, else the
        registry's (built-in names, timm:NAME)."""
        from vitexp.models.registry import spec_of

        return spec_of(self.model, self.model_def)

    @staticmethod
    def _native_size(spec, info) -> int:
        """The input size unless --image-size says: the data's own, except where a ViT's patch
        does not divide it or a timm model was defined with an img_size (the model's then)."""
        if spec.is_vit and info.image_size % spec.patch(info.image_size):
            return spec.resolution
        if spec.timm is not None and "img_size" in spec.kwargs:
            return spec.resolution
        return info.image_size

    def _compile(self, n: int) -> bool:
        """--compile as asked; unset: on the CPU when the trial has COMPILE_MIN_STEPS steps."""
        if self.compile is not None:
            return self.compile
        import torch

        on_cpu = self.device == "cpu" or (self.device == "auto" and not torch.cuda.is_available())
        return bool(on_cpu and n and self.epochs * (n // self.batch_size or 1) >= COMPILE_MIN_STEPS)

    def result_fields(self) -> dict:
        """The fields that define the result (everything but execution)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in self.EXECUTION
                and not (f.name in self.KEYED_WHEN_SET and getattr(self, f.name) == _default(f))}

    def key(self) -> str:
        """Stable 12-hex trial key: the same config gives the same key on every machine."""
        blob = json.dumps(self.resolved().result_fields(), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# unset --keep-weights: kept for models of at most this many parameters (40 MB in float32): every
# small-family model but the 200 MF RegNetY; the paper-scale ones only when asked
KEEP_WEIGHTS_MAX_PARAMS = 10_000_000
# unset --compile: the CPU compiles trials of at least this many steps. Measured on an Intel Xeon,
# one thread, batch 128 (benchmarks/README.md): a compiled step is 1.16-1.30x faster for the
# 7 MF models; the compile costs 28-43 s with a cold cache and about 2 s once inductor's cache
# (kept in $VITEXP_CACHE/inductor, shared by every worker and run) holds the model: break-even
# 48-91 steps warm, 846-2,079 cold. 150 steps earns it back warm with room to spare.
COMPILE_MIN_STEPS = 150
PRECISE_BN_ALL = 8192  # pycls's count; how "every training image" is keyed where that is no more


@functools.cache
def _allowed_types() -> dict[str, tuple]:
    """Field -> the types its value may have (from the annotations; read once: every config
    is checked when made)."""
    out = {}
    for name, want in typing.get_type_hints(TrainConfig).items():
        union = typing.get_origin(want) in (typing.Union, types.UnionType)
        out[name] = tuple(typing.get_origin(a) or a for a in (typing.get_args(want) if union else (want,)))
    return out


def _precise_bn(asked: int, n: int | None) -> int:
    """Precise BN's image count as keyed: asking for at least every training image means all of
    them, whatever the number (--precise-bn 100 and 1000000 on 100 images compute the same); so
    it is keyed as PRECISE_BN_ALL where the set is no larger (the committed 8192-on-5,000 trials
    keep their keys), else as the set's size."""
    if not asked or not n or asked < n:
        return asked
    return PRECISE_BN_ALL if n <= PRECISE_BN_ALL else n


def _default(f: dataclasses.Field):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def config_fields() -> list[str]:
    return [f.name for f in fields(TrainConfig)]


def tuned_hparams(model, optimizer: str) -> tuple[float, float]:
    """(lr at batch 2048, wd) tuned for MODEL (a name or its spec) and OPTIMIZER: the model zoo's
    values (a preset's [tuned.MODEL] table overrides them in a study; its own models have none)."""
    from vitexp.models.registry import get_spec

    if optimizer not in OPTIMIZERS:
        raise unknown("optimizer", optimizer, OPTIMIZERS)
    spec = get_spec(model) if isinstance(model, str) else model
    name, tuned = spec.name, TUNED.get(spec.name, {}) if spec.builtin else {}
    if optimizer not in tuned:
        table = f'"{name}"' if ":" in name else name  # a TOML key with a colon is quoted
        raise UserError(f"{name} has no tuned (lr, wd) for {optimizer}; give --lr and --wd, a [tuned.{table}] "
                        f"table in the preset ({optimizer} = [LR, WD]), or find them with `vitexp tune`")
    return tuned[optimizer]


def check_tuned(model: str, per_opt) -> None:
    """A [tuned.MODEL] table: known optimizers, each [LR, WD] with a finite lr > 0 and wd >= 0."""
    if not isinstance(per_opt, dict):
        raise UserError(f"[tuned.{model}] must hold one entry per optimizer, got {per_opt!r}")
    for opt, v in per_opt.items():
        if opt not in OPTIMIZERS:
            raise unknown(f"optimizer in [tuned.{model}]", opt, OPTIMIZERS)
        _check_tuned(v, f"[tuned.{model}] {opt}", opt)


def _check_tuned(v, where: str, opt: str) -> None:
    try:
        lr, wd = (float(x) for x in v)
    except (TypeError, ValueError):
        raise UserError(f"{where} must be [LR, WD], got {v!r}; e.g. {opt} = [1e-3, 0.05]") from None
    if not (math.isfinite(lr) and math.isfinite(wd) and lr > 0 and wd >= 0):
        raise UserError(f"{where} = [{lr:g}, {wd:g}]: lr must be finite and > 0, wd finite and >= 0")
