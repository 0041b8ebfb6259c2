"""vitexp.data: subsets, the shapes generator, on-device augmentation, loaders, data sets."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from vitexp.config import TrainConfig
from vitexp.data import (DataBundle, balanced_subset, batch_mixer, load_data, make_loaders, make_shapes,
                         random_crop_flip, subset_size)
from vitexp.data import datasets
from vitexp.data.loaders import epoch_shard
from vitexp.errors import UserError

FMNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture
def small_shapes(monkeypatch):
    """load_data('shapes') with a small pool and defaults, so tests need not generate 52k images."""
    monkeypatch.setattr(datasets, "SHAPES_POOL", 600)
    monkeypatch.setattr(datasets, "SHAPES_TRAIN", 300)
    monkeypatch.setattr(datasets, "SHAPES_TEST", 200)


def indexed_bundle(n_train=100, n_test=30) -> DataBundle:
    """A bundle whose image i carries i in its first two pixels, to trace loader order."""
    def images(n):
        x = torch.zeros(n, 1, 8, 8, dtype=torch.uint8)
        x[:, 0, 0, 0] = torch.arange(n) % 256
        x[:, 0, 0, 1] = torch.arange(n) // 256
        return x
    return DataBundle(name="indexed", num_classes=10, in_chans=1, image_size=8, mean=(0.5,), std=(0.25,),
                      train_x=images(n_train), train_y=torch.arange(n_train) % 10,
                      test_x=images(n_test), test_y=torch.arange(n_test) % 10)


def decode(x: torch.Tensor) -> torch.Tensor:
    """The image indices of a normalised batch of `indexed_bundle` images."""
    px = ((x[:, 0, 0, :2] * 0.25 + 0.5) * 255).round().long()
    return px[:, 0] + 256 * px[:, 1]


# --- subsets


def test_balanced_subset_is_balanced_nested_and_seeded():
    labels = torch.arange(1000) % 10
    labels = labels[torch.randperm(1000, generator=torch.Generator().manual_seed(1))]
    prev = set()
    for n in (7, 10, 55, 200, 999, 1000):
        idx = balanced_subset(labels, n, seed=3)
        assert len(idx) == n == len(set(idx.tolist()))
        counts = torch.bincount(labels[idx], minlength=10)
        assert counts.max() - counts.min() <= 1
        assert prev <= set(idx.tolist())  # nested
        prev = set(idx.tolist())
    assert not torch.equal(balanced_subset(labels, 100, 3), balanced_subset(labels, 100, 4))
    assert torch.equal(balanced_subset(labels, 100, 3), balanced_subset(labels, 100, 3))


def test_balanced_subset_with_a_small_class_stays_as_balanced_as_possible():
    labels = torch.tensor([0] * 3 + [1] * 50 + [2] * 50)
    counts = torch.bincount(labels[balanced_subset(labels, 40, 0)])
    assert counts.tolist() in ([3, 18, 19], [3, 19, 18])


def test_subset_too_large_is_a_user_error(monkeypatch):
    with pytest.raises(UserError, match="100"):
        balanced_subset(torch.arange(100) % 10, 101, 0)
    monkeypatch.setattr(datasets, "SHAPES_MAX", 1000)
    with pytest.raises(UserError, match="at most 1000"):
        load_data("shapes", n_train=1001)


def test_subset_size():
    assert subset_size(0.1, 5000) == 500
    assert subset_size(1.0, 5000) == 5000
    assert subset_size(300, 5000) == 300
    for bad in (0.0, 1.5, 0, 6000):
        with pytest.raises(UserError):
            subset_size(bad, 5000)


# --- shapes


def test_shapes_deterministic_prefix_stable_and_seeded():
    x, y = make_shapes(300, 5)
    assert x.dtype == torch.uint8 and x.shape == (300, 3, 32, 32) and y.dtype == torch.int64
    x2, y2 = make_shapes(300, 5)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x3, y3 = make_shapes(2100, 5)  # crosses a chunk boundary: more data keeps the first images
    assert torch.equal(x3[:300], x) and torch.equal(y3[:300], y)
    assert not torch.equal(make_shapes(300, 6)[0], x)  # train/test streams differ by seed


def test_shapes_speed():
    t = time.perf_counter()
    make_shapes(20_000, 0)
    assert time.perf_counter() - t < 10


def test_shapes_sizes_and_channels():
    x, y = make_shapes(10, 0, image_size=64, channels=1, num_classes=4)
    assert x.shape == (10, 1, 64, 64) and int(y.max()) < 4
    with pytest.raises(UserError):
        make_shapes(10, 0, num_classes=11)


def test_shapes_class_is_not_in_global_statistics():
    x, y = make_shapes(6000, 0)
    counts = torch.bincount(y)
    assert counts.min() >= 550 and counts.max() <= 650  # balanced
    # nearest class mean on per-channel mean and std (6 numbers): near chance (10%)
    f = torch.cat([x.float().mean((2, 3)), x.float().std((2, 3))], 1)
    f = (f - f[:4000].mean(0)) / f[:4000].std(0)
    centers = torch.stack([f[:4000][y[:4000] == k].mean(0) for k in range(10)])
    acc = (torch.cdist(f[4000:], centers).argmin(1) == y[4000:]).float().mean()
    assert acc < 0.2
    # a ridge-regression linear probe on raw pixels does badly too
    a = torch.cat([x.flatten(1).float() / 255, torch.ones(6000, 1)], 1)
    t = torch.nn.functional.one_hot(y, 10).float()
    w = torch.linalg.solve(a[:4000].T @ a[:4000] + 100 * torch.eye(a.shape[1]), a[:4000].T @ t[:4000])
    assert ((a[4000:] @ w).argmax(1) == y[4000:]).float().mean() < 0.3


def test_load_shapes(small_shapes):
    b = load_data("shapes", n_train=100, n_test=50, subset_seed=1)
    assert b.in_memory and len(b) == 100 and b.num_classes == 10 and b.in_chans == 3
    assert b.train_x.shape == (100, 3, 32, 32) and b.test_x.shape == (50, 3, 32, 32)
    assert torch.bincount(b.train_y).tolist() == [10] * 10
    other = load_data("shapes", n_train=100, n_test=50, subset_seed=2)
    assert torch.equal(other.test_x, b.test_x) and not torch.equal(other.train_x, b.train_x)
    assert all(0.2 < m < 0.8 for m in b.mean) and all(0.1 < s < 0.5 for s in b.std)
    default = load_data("shapes", subset_seed=1)  # no --n-train: the default set, drawn from the pool
    assert len(default) == 300 and len(default.test_y) == 200
    inside = {bytes(x.numpy()) for x in default.train_x}
    assert all(bytes(x.numpy()) in inside for x in b.train_x)  # nested: same seed, smaller set inside


# --- augmentation


def test_random_crop_flip_per_sample_shape_and_seed():
    x = make_shapes(1, 0)[0].repeat(64, 1, 1, 1)
    out = random_crop_flip(x, 4, True, torch.Generator().manual_seed(0))
    assert out.dtype == x.dtype and out.shape == x.shape
    assert len({o.numpy().tobytes() for o in out}) > 32  # each sample its own crop and coin
    again = random_crop_flip(x, 4, True, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    assert torch.equal(random_crop_flip(x, 0, False), x)


def test_random_crop_flip_is_a_padded_crop_or_its_mirror():
    x = torch.randint(1, 256, (16, 2, 6, 6), dtype=torch.uint8)
    out = random_crop_flip(x, 2, True, torch.Generator().manual_seed(1))
    xp = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(16):
        crops = [xp[i, :, r:r + 6, c:c + 6] for r in range(5) for c in range(5)]
        assert any(torch.equal(out[i], c) or torch.equal(out[i], c.flip(-1)) for c in crops)


def test_mixer_gives_soft_targets():
    assert batch_mixer(TrainConfig(), 10) is None
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 16, 16), torch.arange(8) % 10
    for cfg in (TrainConfig(mixup=0.8), TrainConfig(cutmix=1.0), TrainConfig(mixup=0.8, cutmix=1.0)):
        xm, ym = batch_mixer(cfg, 10)(x, y)
        assert xm.shape == x.shape and ym.shape == (8, 10)
        assert torch.allclose(ym.sum(1), torch.ones(8))


# --- in-memory loaders


def test_in_memory_loader_epochs_len_and_normalisation():
    b = indexed_bundle(100, 40)
    cfg = TrainConfig(batch_size=32, seed=3, crop_pad=0, hflip=False)
    train, test = make_loaders(b, cfg, "cpu")
    assert len(train) == 3 and len(test) == 2  # train drops the partial batch, test keeps it
    assert b.on_device(torch.device("cpu"))[0] is b.on_device(torch.device("cpu"))[0]  # cached
    epoch = lambda e: (train.set_epoch(e), torch.cat([decode(x) for x, _ in train]))[1]
    e1 = epoch(1)
    assert torch.equal(e1, epoch(1)) and not torch.equal(e1, epoch(2))
    assert len(e1) == 96 == len(set(e1.tolist()))
    xs, ys = zip(*test)
    assert xs[0].dtype == torch.float32 and ys[0].dtype == torch.int64
    assert torch.allclose(torch.cat(xs), (b.test_x.float() / 255 - 0.5) / 0.25)
    assert torch.equal(torch.cat(ys), b.test_y)


def test_in_memory_loader_augmentation_is_reproducible():
    x, y = make_shapes(64, 0)
    b = DataBundle(name="shapes", num_classes=10, in_chans=3, image_size=32, mean=(0.5,) * 3,
                   std=(0.25,) * 3, train_x=x, train_y=y, test_x=x, test_y=y)
    cfg = TrainConfig(batch_size=16, seed=0, crop_pad=4)
    first = [x for x, _ in make_loaders(b, cfg, "cpu")[0]]
    train = make_loaders(b, cfg, "cpu")[0]
    train.set_epoch(0)
    assert all(torch.equal(a, c) for a, (c, _) in zip(first, train))


def test_partial_batch_kept_when_it_is_the_only_one():
    train, _ = make_loaders(indexed_bundle(20, 5), TrainConfig(batch_size=32, crop_pad=0, hflip=False), "cpu")
    assert len(train) == 1 and len(next(iter(train))[0]) == 20


def test_shards_are_disjoint_and_cover():
    shards = [epoch_shard(101, 0, 4, r, 2) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 50
    assert not set(shards[0].tolist()) & set(shards[1].tolist())
    assert len(set(torch.cat(shards).tolist())) == 100  # all but the < world_size remainder
    b, cfg = indexed_bundle(101, 10), TrainConfig(batch_size=20, crop_pad=0, hflip=False)
    seen = []
    for rank in range(2):  # the global batch of 20 is 10 per rank
        train, test = make_loaders(b, cfg, "cpu", rank=rank, world_size=2)
        train.set_epoch(4)
        assert len(train) == 5 and len(test) == 1  # the test set is not sharded
        seen.append(torch.cat([decode(x) for x, _ in train]))
    assert [s.tolist() for s in seen] == [s.tolist() for s in shards]


# --- files on disk


@pytest.mark.skipif(not FMNIST.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_from_debian(tmp_path):
    b = load_data("fashion-mnist", data_dir=str(tmp_path))
    assert b.train_x.shape == (60000, 1, 28, 28) and b.test_x.shape == (10000, 1, 28, 28)
    assert b.num_classes == 10 and b.in_chans == 1 and torch.bincount(b.train_y).tolist() == [6000] * 10
    small = load_data("fashion-mnist", data_dir=str(tmp_path), image_size=32, n_train=50, n_test=20)
    assert small.train_x.shape == (50, 1, 32, 32) and small.test_x.shape == (20, 1, 32, 32)
    with pytest.raises(UserError, match="60000"):
        load_data("fashion-mnist", data_dir=str(tmp_path), n_train=60001)


def test_missing_and_corrupt_fashion_mnist(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "system")
    with pytest.raises(UserError) as e:
        load_data("fashion-mnist", data_dir=str(tmp_path))
    assert str(tmp_path / "fashion-mnist") in str(e.value) and str(tmp_path / "system") in str(e.value)
    (tmp_path / "fashion-mnist").mkdir()
    for f in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
              "t10k-labels-idx1-ubyte"):
        (tmp_path / "fashion-mnist" / f"{f}.gz").write_bytes(b"not gzip")
    with pytest.raises(UserError, match="corrupt"):
        load_data("fashion-mnist", data_dir=str(tmp_path))


def test_unknown_dataset():
    with pytest.raises(UserError, match="cifar10"):
        load_data("cifar-10")


@pytest.fixture
def image_folder(tmp_path):
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(3):
                px = torch.randint(0, 256, (40, 40, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(px).save(tmp_path / split / cls / f"{i}.png")
    return tmp_path


def test_imagefolder_pipeline(image_folder):
    b = load_data(f"imagefolder:{image_folder}", image_size=32)
    assert not b.in_memory and len(b) == 6 and b.num_classes == 2 and b.image_size == 32
    cfg = TrainConfig(batch_size=4, num_workers=0, augment="autoaugment")
    train, test = make_loaders(b, cfg, "cpu")
    assert len(train) == 1 and len(test) == 2
    train.set_epoch(1)
    x, y = next(iter(train))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(x, next(iter(train))[0])  # seeded by (seed, epoch, index)
    train.set_epoch(2)
    assert not torch.equal(x, next(iter(train))[0])
    xt, yt = next(iter(test))
    assert xt.shape == (4, 3, 32, 32) and yt.tolist() == [0, 0, 0, 1]
    sub = load_data(f"imagefolder:{image_folder}", n_train=2, n_test=2)
    assert len(sub) == 2 and sorted(sub.test_set[i][1] for i in range(2)) == [0, 1]


def test_imagefolder_needs_train_and_val(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(UserError, match="val/"):
        load_data(f"imagefolder:{tmp_path}")


def test_missing_cifar_without_network(tmp_path, monkeypatch):
    from urllib.error import URLError

    from torchvision.datasets import CIFAR10

    def offline(self):
        raise URLError("no network")

    monkeypatch.setattr(CIFAR10, "download", offline)
    with pytest.raises(UserError, match="cifar-10-python.tar.gz") as e:
        load_data("cifar10", data_dir=str(tmp_path))
    assert str(tmp_path / "cifar10") in str(e.value) and "no network" in str(e.value)
