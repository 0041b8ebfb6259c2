"""Data sets by name -> DataBundle.

Small data sets (shapes, fashion-mnist, cifar10/100, svhn) are held as uint8
tensors, augmented on the device by vitexp.data.loaders; ImageFolder trees (ImageNet
style) go through torchvision transforms and a DataLoader. Subsets, resizing and
the fixed test slice are applied here, once, so every loader sees final data.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vitexp.data.shapes import make_shapes
from vitexp.data.subsets import balanced_subset
from vitexp.errors import UserError, unknown
from vitexp.seeds import HOLDOUT, derive_seed

IMAGEFOLDER = "imagefolder:"  # prefix of "imagefolder:PATH"
CLASSES = ":"  # "fashion-mnist:0-4": that data set's classes 0..4 only, relabelled 0..4 (a transfer source or target)
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
FASHION_MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                       "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
# shapes: training subsets are nested, class-balanced draws from one generated pool (more on
# request: a bigger --n-train grows the pool, prefix-stable); the defaults are sized so that a
# 3-epoch `vitexp train` of the smallest model takes well under a minute on a 2-core CPU
SHAPES_POOL = 20_000  # generated training images that every subset of up to 20k lies in
SHAPES_TRAIN, SHAPES_TEST = 5_000, 1_000  # default training set (a subset of the pool) and test set
SHAPES_TRAIN_SEED, SHAPES_TEST_SEED = 0, 1  # disjoint generator streams
SHAPES_MAX = 1_000_000  # generated images per split (3 GB at 32 px): beyond this, a typo
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGEFOLDER_SIZE = 224


@dataclass(frozen=True)
class DatasetInfo:
    """Everything vitexp knows about a named data set without loading it."""

    num_classes: int
    in_chans: int
    image_size: int
    n_train: int
    # per-channel mean/std of the training set in [0, 1] units (the usual published values;
    # None: measured on the data, as for the generated shapes)
    stats: tuple | None
    files: str  # what the loader needs on disk, for "not found" messages


DATASETS = {
    "shapes": DatasetInfo(10, 3, 32, SHAPES_TRAIN, None, "nothing: generated"),
    "fashion-mnist": DatasetInfo(10, 1, 28, 60_000, ((0.2860,), (0.3530,)), "the 4 idx .gz files"),
    "cifar10": DatasetInfo(10, 3, 32, 50_000, ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
                           "cifar-10-python.tar.gz"),
    "cifar100": DatasetInfo(100, 3, 32, 50_000, ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
                            "cifar-100-python.tar.gz"),
    "svhn": DatasetInfo(10, 3, 32, 73_257, ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
                        "train_32x32.mat and test_32x32.mat"),
}


@dataclass
class DataBundle:
    """A loaded data set: in-memory uint8 tensors, or ImageFolder datasets.

    Tensors may be shared with load_data's cache: treat them as read-only.
    """

    name: str
    num_classes: int
    in_chans: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train_x: torch.Tensor | None = None  # uint8 (N, C, H, W)
    train_y: torch.Tensor | None = None  # int64 (N,)
    test_x: torch.Tensor | None = None
    test_y: torch.Tensor | None = None
    train_set: torch.utils.data.Dataset | None = None  # yields (PIL image, int)
    test_set: torch.utils.data.Dataset | None = None
    source: str = ""  # where the images came from (a folder, or "generated")
    val_x: torch.Tensor | None = None  # the held-out part of the training images (load_data's holdout)
    val_y: torch.Tensor | None = None
    _on_device: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def in_memory(self) -> bool:
        return self.train_x is not None

    def __len__(self) -> int:
        return len(self.train_x) if self.in_memory else len(self.train_set)

    def on_device(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """(train_x, train_y, test_x, test_y) on `device`, copied once per bundle and device."""
        key = str(torch.device(device))
        if key not in self._on_device:
            self._on_device[key] = tuple(t.to(device) for t in
                                         (self.train_x, self.train_y, self.test_x, self.test_y))
        return self._on_device[key]


def default_data_dir() -> Path:
    """$VITEXP_DATA, else ~/.cache/vitexp."""
    return Path(os.environ.get("VITEXP_DATA") or Path.home() / ".cache" / "vitexp")


def data_root(data_dir: str | None) -> Path:
    """--data-dir, else the default; a path that exists but is no folder is a mistake."""
    root = Path(data_dir) if data_dir else default_data_dir()
    if root.exists() and not root.is_dir():
        raise UserError(f"--data-dir {root} is a file, not a folder; give the folder that holds your data sets")
    return root


def load_data(name: str, data_dir: str | None = None, image_size: int | None = None,
              n_train: int | None = None, n_test: int | None = None, subset_seed: int = 0,
              holdout: float = 0.0) -> DataBundle:
    """Load a data set by name, with an optional nested subset, test slice and resize.

    name: a data set of DATASETS, "imagefolder:PATH", or "NAME:CLASSES" (split_classes).
    n_train: class-balanced nested subset (balanced_subset with subset_seed).
    n_test: the first n_test of the fixed test set (never depends on subset_seed).
    holdout: this fraction of the (sub)set, class-balanced, held out of training as a
    validation split (val_x, val_y) for choosing hyper-parameters without the test set.
    """
    root = data_root(data_dir)
    if name.startswith(IMAGEFOLDER):
        if holdout:
            raise UserError("--holdout needs an in-memory data set, not an image folder; drop --holdout")
        return _imagefolder(imagefolder_path(name, root), image_size, n_train, n_test, subset_seed)
    info = dataset_info(name)
    base, classes = split_classes(name)
    if base == "shapes":  # generated natively at the asked size, as many as asked
        _check_shapes(n_train, n_test)
        n_train = n_train or SHAPES_TRAIN * info.num_classes // DATASETS[base].num_classes
        # a class selection keeps about this share of the generated images (drawn uniformly: 10% spare)
        grow = 1.0 if classes is None else 1.1 * DATASETS[base].num_classes / info.num_classes
        xtr, ytr, xte, yte, stats = _shapes(max(SHAPES_POOL, round(n_train * grow)),
                                            max(SHAPES_TEST, round((n_test or 0) * grow)), image_size or 32)
        source = "generated"
    else:
        xtr, ytr, xte, yte, source = _LOADERS[base](root)
        stats = info.stats
    if classes is not None:
        (xtr, ytr), (xte, yte) = _select(xtr, ytr, classes), _select(xte, yte, classes)
    for what, n, have in (("train", n_train, len(ytr)), ("test", n_test, len(yte))):
        if n is not None and n > have:
            raise UserError(f"--n-{what} {n} is larger than {name}'s {what} set ({have} images)")
    if n_train is not None and n_train < len(ytr):
        idx = balanced_subset(ytr, n_train, subset_seed)
        xtr, ytr = xtr[idx], ytr[idx]
    if n_test is not None:
        xte, yte = xte[:n_test], yte[:n_test]
    xva = yva = None
    if holdout:
        xtr, ytr, xva, yva = _hold_out(xtr, ytr, holdout, subset_seed)
    if image_size is not None and image_size != xtr.shape[-1]:
        xtr, xte = _resize(xtr, image_size), _resize(xte, image_size)
        xva = _resize(xva, image_size) if xva is not None else None
    return DataBundle(name=name, num_classes=info.num_classes,
                      in_chans=xtr.shape[1], image_size=xtr.shape[-1], mean=stats[0], std=stats[1],
                      train_x=xtr, train_y=ytr, test_x=xte, test_y=yte, source=source, val_x=xva, val_y=yva)


def split_classes(name: str) -> tuple[str, tuple[int, ...] | None]:
    """("fashion-mnist", (0, 1, 2, 3, 4)) from "fashion-mnist:0-4" (ranges and commas: "0-2,7");
    (name, None) without a selection. Two data sets that select disjoint classes share no image,
    which makes a transfer source and target of one data set."""
    if name.startswith(IMAGEFOLDER) or CLASSES not in name:
        return name, None
    base, text = name.split(CLASSES, 1)
    if base not in DATASETS:
        raise unknown("dataset", base, tuple(DATASETS) + (IMAGEFOLDER + "PATH",))
    k = DATASETS[base].num_classes
    try:
        classes = []
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            classes += range(int(lo), int(hi or lo) + 1)
    except ValueError:
        classes = []
    if len(classes) < 2 or len(set(classes)) != len(classes) or not all(0 <= c < k for c in classes):
        raise UserError(f"dataset {name}: after ':' give two or more distinct classes of {base}'s 0-{k - 1}, "
                        f"as ranges or a list, e.g. {base}:0-4 or {base}:0,2,4")
    return base, tuple(classes)


def chance_err(dataset) -> float:
    """Top-1 error (%) of guessing, for a named data set (NaN where the classes are unknown)."""
    try:
        base, classes = split_classes(str(dataset))
    except UserError:
        return math.nan
    info = DATASETS.get(base)
    k = len(classes) if classes else info.num_classes if info else None
    return 100.0 * (1 - 1 / k) if k else math.nan


def _select(x: torch.Tensor, y: torch.Tensor, classes: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """The images of CLASSES, their labels renumbered 0.. in the order CLASSES lists them."""
    lut = torch.full((int(y.max()) + 1,), -1, dtype=torch.long)
    lut[list(classes)] = torch.arange(len(classes))
    keep = lut[y] >= 0
    return x[keep], lut[y[keep]]


def _hold_out(x: torch.Tensor, y: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, ...]:
    """(train_x, train_y, val_x, val_y): a class-balanced FRACTION (at least one image a class)
    held out of X, chosen by the nested-subset rule from its own seed stream."""
    if not 0 < fraction < 1:
        raise UserError(f"--holdout must be a fraction in (0, 1), got {fraction}")
    k = int(y.max()) + 1
    n = max(k, round(fraction * len(y)))
    if n >= len(y):
        raise UserError(f"--holdout {fraction} of {len(y)} images leaves nothing to train on; hold out less")
    val = balanced_subset(y, n, derive_seed(HOLDOUT, seed))
    train = torch.ones(len(y), dtype=torch.bool)
    train[val] = False
    return x[train], y[train], x[val], y[val]


# --- in-memory data sets: each returns uint8 (N,C,H,W) / int64 (N,) train and test


@functools.lru_cache(maxsize=1)  # a study's trials share one generated set
def _shapes(n_train: int, n_test: int, size: int):
    xtr, ytr = make_shapes(n_train, SHAPES_TRAIN_SEED, size)
    xte, yte = make_shapes(n_test, SHAPES_TEST_SEED, size)
    return xtr, ytr, xte, yte, _channel_stats(xtr[:SHAPES_TRAIN])  # the same stats for every pool size


def _channel_stats(x: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std in [0, 1] units, accumulated in chunks (a float copy of all would be GBs)."""
    s = torch.zeros(x.shape[1], dtype=torch.float64)
    s2 = torch.zeros_like(s)
    for i in range(0, len(x), chunk):
        c = x[i:i + chunk].double().div_(255)
        s += c.sum((0, 2, 3))
        s2 += c.square_().sum((0, 2, 3))
    n = x.numel() / x.shape[1]
    mean = s / n
    return tuple(mean.tolist()), tuple((s2 / n - mean.square()).sqrt().tolist())


def _read_idx(path: Path) -> np.ndarray:
    """One idx file (the MNIST format: 0, 0, dtype 0x08, ndim, big-endian dims, bytes)."""
    try:
        data = gzip.decompress(path.read_bytes())
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise UserError(f"{path} is corrupt ({e}); delete it and fetch it again") from None
    ndim = data[3] if len(data) >= 4 and data[:3] == b"\x00\x00\x08" else 0
    head = 4 + 4 * ndim
    dims = np.frombuffer(data, ">i4", count=ndim, offset=4) if ndim and len(data) >= head else None
    if dims is None or len(data) != head + int(np.prod(dims)):
        raise UserError(f"{path} is not a valid idx file of uint8 data; delete it and fetch it again")
    return np.frombuffer(data, np.uint8, offset=head).reshape(dims)


def fashion_mnist_places(root: Path) -> list[Path]:
    """Where Fashion-MNIST is looked for, in order: the data dir, then Debian's folder."""
    return [root / "fashion-mnist", FASHION_MNIST_SYSTEM_DIR]


def fashion_mnist_dir(root: Path) -> Path | None:
    """The first folder of fashion_mnist_places that holds all four files."""
    return next((p for p in fashion_mnist_places(root) if all((p / f).is_file() for f in FASHION_MNIST_FILES)),
                None)


@functools.lru_cache(maxsize=1)
def _fashion_mnist(root: Path):
    found = fashion_mnist_dir(root)
    if found is None:
        places = fashion_mnist_places(root)
        raise UserError(f"fashion-mnist not found in {places[0]} or {places[1]}; "
                        f"`apt-get install dataset-fashion-mnist` or put the 4 idx .gz files in {places[0]}")
    xtr, ytr, xte, yte = (torch.from_numpy(_read_idx(found / f).copy()) for f in FASHION_MNIST_FILES)
    if xtr.shape[1:] != (28, 28) or len(xtr) != len(ytr) or len(xte) != len(yte):
        raise UserError(f"fashion-mnist files in {found} do not match each other; fetch them again")
    return xtr[:, None], ytr.long(), xte[:, None], yte.long(), str(found)


def _torchvision(name: str, root: Path):
    """CIFAR-10/100, SVHN via torchvision: local files first, else try a download."""
    from torchvision import datasets

    cls = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100, "svhn": datasets.SVHN}[name]
    where = root / name

    def load(split_is_train: bool, download: bool):
        split = {"train": split_is_train} if name != "svhn" else {"split": "train" if split_is_train else "test"}
        return cls(str(where), download=download, **split)

    try:
        sets = [load(True, False), load(False, False)]
    except RuntimeError:  # torchvision's "not found or corrupted"
        try:
            sets = [load(True, True), load(False, True)]
        except Exception as e:  # no network, bad checksum, ...: say where and how in one line
            reason = " ".join(str(e).split())[:160]
            raise UserError(f"{name} not found (or corrupt) in {where} and the download failed ({reason}); "
                            f"run once with network access or put {DATASETS[name].files} there") from None
    out = []
    for ds in sets:
        x = torch.from_numpy(ds.data)
        x = x if name == "svhn" else x.permute(0, 3, 1, 2)  # CIFAR stores NHWC
        y = torch.as_tensor(ds.labels if name == "svhn" else ds.targets, dtype=torch.long)
        out += [x.contiguous(), y]
    return (*out, str(where))


_LOADERS = {
    "fashion-mnist": _fashion_mnist,
    **{name: functools.lru_cache(maxsize=1)(functools.partial(_torchvision, name))
       for name in ("cifar10", "cifar100", "svhn")},
}


def _resize(x: torch.Tensor, size: int, chunk: int = 1024) -> torch.Tensor:
    """Antialiased bilinear resize of uint8 images, in chunks to bound float memory."""
    out = torch.empty(*x.shape[:2], size, size, dtype=torch.uint8)
    for i in range(0, len(x), chunk):
        y = F.interpolate(x[i:i + chunk].float(), size=(size, size), mode="bilinear",
                          antialias=True, align_corners=False)
        out[i:i + chunk] = y.round_().clamp_(0, 255).to(torch.uint8)
    return out


# --- ImageFolder trees


def imagefolder_path(name: str, root: Path) -> Path:
    """The folder of "imagefolder:PATH" (a relative PATH may live under the data dir),
    checked to hold train/ and val/."""
    path = Path(name[len(IMAGEFOLDER):]).expanduser()
    if not path.is_absolute() and not path.exists():
        path = root / path
    missing = [d for d in ("train", "val") if not (path / d).is_dir()]
    if missing:
        raise UserError(f"{name}: no {' or '.join(missing)}/ folder in {path}; "
                        "expected PATH/train/<class>/*.jpg and PATH/val/<class>/*.jpg")
    return path


def check_data(name: str, data_dir: str | None = None, n_train: int | None = None, n_test: int | None = None) -> None:
    """Fail now, in one line, where loading would fail in every trial: missing or corrupt
    files, a subset larger than the data (in-memory sets are loaded, and cached; image
    folders are only looked at; `shapes` is only counted, never generated here)."""
    root = data_root(data_dir)
    if name.startswith(IMAGEFOLDER):
        imagefolder_path(name, root)
    elif split_classes(name)[0] == "shapes":  # generating cannot fail: only the counts are checked, nothing is made
        _check_shapes(n_train, n_test)
    else:
        load_data(name, data_dir, n_train=n_train, n_test=n_test)


def _check_shapes(n_train: int | None, n_test: int | None) -> None:
    for what, n in (("train", n_train), ("test", n_test)):
        if (n or 0) > SHAPES_MAX:
            raise UserError(f"shapes generates at most {SHAPES_MAX} images per split, got --n-{what} {n}; "
                            f"ask for fewer")


def _imagefolder(path: Path, image_size: int | None, n_train: int | None, n_test: int | None,
                 subset_seed: int) -> DataBundle:
    from torchvision.datasets import ImageFolder

    name = f"{IMAGEFOLDER}{path}"
    try:
        train, test = ImageFolder(str(path / "train")), ImageFolder(str(path / "val"))
    except (FileNotFoundError, OSError) as e:
        raise UserError(f"{name}: {' '.join(str(e).split())}") from None
    if train.classes != test.classes:
        raise UserError(f"{name}: train/ and val/ have different class folders")
    sets = []
    for what, ds, n, seed in (("train", train, n_train, subset_seed), ("test", test, n_test, 0)):
        if n is not None and n > len(ds):
            raise UserError(f"--n-{what} {n} is larger than {name}'s {what} set ({len(ds)} images)")
        if n is not None and n < len(ds):
            # val/ is sorted by class, so a plain prefix would be one class: take a fixed
            # (seed 0) balanced subset instead, still independent of subset_seed
            ds = torch.utils.data.Subset(ds, balanced_subset(torch.tensor(ds.targets), n, seed).tolist())
        sets.append(ds)
    return DataBundle(name=name, num_classes=len(train.classes), in_chans=3,
                      image_size=image_size or IMAGEFOLDER_SIZE, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                      train_set=sets[0], test_set=sets[1], source=str(path))


# --- facts without loading: for cost estimates and `vitexp doctor`


def dataset_info(name: str) -> DatasetInfo:
    """What vitexp knows of a data set by name, without loading it (imagefolder:
    ImageNet-like defaults, 224 px and 1000 classes, n_train unknown = 0; a class selection:
    its classes and their share of the training images, the data set being balanced)."""
    if name.startswith(IMAGEFOLDER):
        return DatasetInfo(1000, 3, IMAGEFOLDER_SIZE, 0, (IMAGENET_MEAN, IMAGENET_STD), "train/ and val/ folders")
    base, classes = split_classes(name)
    if base not in DATASETS:
        raise unknown("dataset", name, tuple(DATASETS) + (IMAGEFOLDER + "PATH",))
    info = DATASETS[base]
    if classes is None:
        return info
    return dataclasses.replace(info, num_classes=len(classes), n_train=info.n_train * len(classes) // info.num_classes)


def locate(name: str, data_dir: str | None = None) -> str:
    """Where a data set is found, or one line on how to get it (loads nothing big)."""
    root = data_root(data_dir)
    name = split_classes(name)[0]
    if name == "shapes":
        return "built in (generated)"
    if name == "fashion-mnist":
        found = fashion_mnist_dir(root)
        return str(found) if found else (f"not found: `apt-get install dataset-fashion-mnist` or put the "
                                         f"idx .gz files in {root / name}")
    where = root / name
    if where.is_dir() and any(where.iterdir()):
        return str(where)
    return f"not found in {where}: torchvision downloads it there when the network allows"
