"""Train and test loaders for a DataBundle: `make_loaders(bundle, cfg, device)`.

Both loaders are iterables with len() = batches per epoch and set_epoch(epoch),
yielding normalised float32 images and int64 labels on the device. The train
loader's order and augmentation are a pure function of (cfg.seed, epoch, rank),
so resuming from a checkpoint at an epoch boundary replays exactly.

Two pipelines:
- in-memory data: uint8 tensors live on the device (copied once per bundle),
  batches are gathered and augmented there by vectorised ops, with no DataLoader,
  no per-sample Python and no host-device sync;
- ImageFolder data: torchvision transforms in DataLoader workers; each sample's
  augmentation is seeded by (seed, epoch, index), so it does not depend on the
  number of workers or on worker persistence across epochs.

Distributed: every rank draws the same epoch permutation and takes every
world_size-th index of it (the first world_size * (N // world_size)), so shards
are disjoint, equally long and together cover all but < world_size examples
(DistributedSampler's drop_last rule, in one function for both pipelines). The
test loader is not sharded: every rank evaluates the full test set, which is
simple, always correct, and cheap next to training.
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from vitexp.data.augment import channel_tensors, normalize, random_crop_flip
from vitexp.data.datasets import DataBundle
from vitexp.seeds import AUGMENT, ORDER, derive_seed
from vitexp.errors import UserError

UNREADABLE = -1  # the label of an image file that cannot be read is UNREADABLE - its index


def epoch_shard(n: int, seed: int, epoch: int, rank: int, world_size: int,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """This rank's indices for this epoch: a strided slice of one shared permutation."""
    per_rank = n // world_size
    if per_rank == 0:
        raise UserError(f"{n} training images cannot be split over {world_size} processes")
    g = torch.Generator(device=device).manual_seed(derive_seed(seed, epoch, ORDER))
    perm = torch.randperm(n, generator=g, device=device)
    return perm[rank:per_rank * world_size:world_size]


def num_batches(n: int, batch_size: int, drop_last: bool) -> int:
    """Batches per epoch; drop_last drops the partial batch only if a full one remains."""
    return n // batch_size if drop_last and n >= batch_size else math.ceil(n / batch_size)


class InMemoryLoader:
    """Batches of device-resident uint8 tensors, cropped/flipped/normalised on the device."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, bundle: DataBundle, batch_size: int, *,
                 train: bool, seed: int = 0, crop_pad: int = 0, hflip: bool = False,
                 rank: int = 0, world_size: int = 1):
        self.x, self.y, self.batch_size, self.train = x, y, batch_size, train
        self.seed, self.crop_pad, self.hflip = seed, crop_pad, hflip
        self.rank, self.world_size = rank, world_size
        self.mean = channel_tensors(bundle.mean, x.device)
        self.std = channel_tensors(bundle.std, x.device)
        self.n = len(x) // world_size if train else len(x)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return num_batches(self.n, self.batch_size, drop_last=self.train)

    def __iter__(self):
        bs = self.batch_size
        if not self.train:
            for i in range(len(self)):
                yield normalize(self.x[i * bs:(i + 1) * bs], self.mean, self.std), self.y[i * bs:(i + 1) * bs]
            return
        dev = self.x.device
        idx = epoch_shard(len(self.x), self.seed, self.epoch, self.rank, self.world_size, dev)
        g = torch.Generator(device=dev).manual_seed(derive_seed(self.seed, self.epoch, AUGMENT, self.rank))
        for i in range(len(self)):
            b = idx[i * bs:(i + 1) * bs]
            x = random_crop_flip(self.x[b], self.crop_pad, self.hflip, g)
            yield normalize(x, self.mean, self.std), self.y[b]


class _EpochSampler(Sampler):
    """Yields (epoch, index) keys, so workers know the epoch without seeing set_epoch."""

    def __init__(self, n: int, seed: int, rank: int = 0, world_size: int = 1, shuffle: bool = True):
        self.n, self.seed, self.rank, self.world_size, self.shuffle = n, seed, rank, world_size, shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n // self.world_size if self.shuffle else self.n

    def __iter__(self):
        order = (epoch_shard(self.n, self.seed, self.epoch, self.rank, self.world_size).tolist()
                 if self.shuffle else range(self.n))
        return iter([(self.epoch, i) for i in order])


class _Transformed(Dataset):
    """base[i] through `transform`, with torch's CPU RNG seeded by (seed, epoch, i)."""

    def __init__(self, base: Dataset, transform, seed: int):
        self.base, self.transform, self.seed = base, transform, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int]):
        epoch, i = key
        try:
            img, label = self.base[i]
        except (OSError, SyntaxError, ValueError):  # a damaged file: PIL cannot decode it
            # told to the main process by a negative label (a worker's exception would arrive
            # as a traceback): it names the file and stops, or leaves the image out
            return torch.zeros(()), UNREADABLE - i
        with torch.random.fork_rng(devices=[]):  # leave the caller's RNG alone (num_workers=0)
            torch.default_generator.manual_seed(derive_seed(self.seed, epoch, AUGMENT, i))
            return self.transform(img), label


def _collate(batch):
    """torch's collate, with unreadable images (a negative label) taken out of the image stack."""
    from torch.utils.data import default_collate

    good = [b for b in batch if b[1] >= 0]
    x = default_collate([b[0] for b in good]) if good else torch.zeros(0)
    return x, torch.tensor([b[1] for b in good], dtype=torch.long), [UNREADABLE - b[1] for b in batch if b[1] < 0]


class FolderLoader:
    """A DataLoader over an ImageFolder data set, moving batches to the device. An image file
    that cannot be read stops the run with its name, or (SKIP) is left out and remembered."""

    def __init__(self, dataset: Dataset, sampler: _EpochSampler, batch_size: int, *, train: bool,
                 num_workers: int, device: torch.device, skip: bool = False):
        self.sampler, self.device, self.dataset, self.skip = sampler, device, dataset, skip
        self.skipped: set[str] = set()  # files left out so far
        self.loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                                 pin_memory=device.type == "cuda", persistent_workers=num_workers > 0,
                                 drop_last=train and len(sampler) >= batch_size, collate_fn=_collate)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for x, y, bad in self.loader:  # non_blocking: overlaps the copy of pinned memory with compute
            for i in bad:
                path = image_path(self.dataset.base, i)
                if not self.skip:
                    raise UserError(f"cannot read image {path} (damaged or not an image); delete or replace it, "
                                    f"or rerun with --skip-unreadable to leave such files out")
                self.skipped.add(path)
            if len(y):
                yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)


def image_path(dataset: Dataset, i: int) -> str:
    """The file of item I of an ImageFolder, or of a Subset of one."""
    while isinstance(dataset, torch.utils.data.Subset):
        dataset, i = dataset.dataset, dataset.indices[i]
    return str(dataset.samples[i][0])


def folder_transforms(bundle: DataBundle, cfg) -> tuple:
    """(train, test) torchvision v2 transforms: the ImageNet recipe at bundle.image_size."""
    from torchvision.transforms import v2

    size = bundle.image_size
    tail = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(bundle.mean, bundle.std)]
    train = [v2.RandomResizedCrop(size, antialias=True)]
    if cfg.hflip:
        train.append(v2.RandomHorizontalFlip())
    if cfg.augment == "autoaugment":
        train.append(v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET))
    elif cfg.augment == "randaugment":
        train.append(v2.RandAugment())
    test = [v2.Resize(int(size / 0.875), antialias=True), v2.CenterCrop(size)]
    return v2.Compose(train + tail), v2.Compose(test + tail)


def make_loaders(bundle: DataBundle, cfg, device: torch.device | str, rank: int = 0,
                 world_size: int = 1) -> tuple:
    """(train_loader, test_loader) of a resolved config; cfg.batch_size is the global
    batch, each of the world_size ranks takes its share."""
    device = torch.device(device)
    batch = cfg.batch_size // world_size
    if bundle.in_memory:
        xtr, ytr, xte, yte = bundle.on_device(device)
        train = InMemoryLoader(xtr, ytr, bundle, batch, train=True, seed=cfg.seed,
                               crop_pad=cfg.crop_pad, hflip=cfg.hflip, rank=rank, world_size=world_size)
        return train, InMemoryLoader(xte, yte, bundle, batch, train=False)
    t_train, t_test = folder_transforms(bundle, cfg)
    train = FolderLoader(_Transformed(bundle.train_set, t_train, cfg.seed),
                         _EpochSampler(len(bundle.train_set), cfg.seed, rank, world_size),
                         batch, train=True, num_workers=cfg.num_workers, device=device, skip=cfg.skip_unreadable)
    test = FolderLoader(_Transformed(bundle.test_set, t_test, cfg.seed),
                        _EpochSampler(len(bundle.test_set), cfg.seed, shuffle=False),
                        batch, train=False, num_workers=cfg.num_workers, device=device, skip=cfg.skip_unreadable)
    return train, test
