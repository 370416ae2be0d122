"""Tests for benchmarks/common/data.py on small generated files in every supported format."""

from __future__ import annotations

import hashlib
import importlib
import io
import os
import pickle
import sys
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

data = importlib.import_module("benchmarks.common.data")

RNG = np.random.default_rng(0)


def _images(n: int, size: int = 32) -> np.ndarray:
    return RNG.integers(0, 256, size=(n, 3, size, size), dtype=np.uint8)


def _dump(obj: dict, path: Path) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def make_cifar10(root: Path, per_batch: int = 3, n_test: int = 4) -> tuple[np.ndarray, ...]:
    """Fake ``cifar-10-batches-py`` (bytes-keyed pickles, rows of 3072 = CHW planes)."""
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    xs, ys = [], []
    for i in range(1, 6):
        x, y = _images(per_batch), RNG.integers(0, 10, per_batch).tolist()
        _dump(
            {b"batch_label": b"b", b"data": x.reshape(per_batch, -1), b"labels": y},
            d / f"data_batch_{i}",
        )
        xs.append(x)
        ys += y
    xt, yt = _images(n_test), RNG.integers(0, 10, n_test).tolist()
    _dump({b"data": xt.reshape(n_test, -1), b"labels": yt}, d / "test_batch")
    _dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, d / "batches.meta")
    return np.concatenate(xs), np.array(ys), xt, np.array(yt)


def make_cifar100(root: Path, n_train: int = 6, n_test: int = 3) -> tuple[np.ndarray, ...]:
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    out = []
    for name, n in (("train", n_train), ("test", n_test)):
        x, y = _images(n), RNG.integers(0, 100, n).tolist()
        _dump(
            {b"data": x.reshape(n, -1), b"fine_labels": y, b"coarse_labels": [v // 5 for v in y]},
            d / name,
        )
        out += [x, np.array(y)]
    _dump({b"fine_label_names": [f"f{i}".encode() for i in range(100)]}, d / "meta")
    return tuple(out)


def make_folder(root: Path, classes: list[str], per_class: int = 2) -> dict[str, list]:
    """``root/{train,test}/<class>/*.png`` (lossless) plus one JPEG per class in train."""
    truth: dict[str, list] = {"train": [], "test": []}
    for split in ("train", "test"):
        for label, c in enumerate(classes):
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                img = _images(1)[0].transpose(1, 2, 0)
                Image.fromarray(img).save(root / split / c / f"{i:04d}.png")
                truth[split].append((img.transpose(2, 0, 1), label))
        if split == "train":
            for c in classes:
                Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(
                    root / split / c / "zzzz.jpg", quality=95
                )
    return truth


def make_tinyimagenet(root: Path) -> list[str]:
    d = root / "tiny-imagenet-200"
    wnids = ["n03", "n01", "n02"]  # deliberately unsorted in wnids.txt
    (d / "val" / "images").mkdir(parents=True)
    (d / "wnids.txt").write_text("\n".join(wnids) + "\n")
    colour = {"n01": 20, "n02": 120, "n03": 220}
    for w in wnids:
        (d / "train" / w / "images").mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((64, 64, 3), colour[w], np.uint8)).save(
                d / "train" / w / "images" / f"{w}_{i}.JPEG", format="JPEG", quality=95
            )
    lines = []
    for i, w in enumerate(["n02", "n01", "n03", "n02"]):
        Image.fromarray(np.full((64, 64, 3), colour[w], np.uint8)).save(
            d / "val" / "images" / f"val_{i}.JPEG", format="JPEG", quality=95
        )
        lines.append(f"val_{i}.JPEG\t{w}\t0\t0\t63\t63")
    (d / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return sorted(wnids)


# ----------------------------------------------------------------------------- loaders


def test_cifar10_pickles(tmp_path: Path) -> None:
    x, y, xt, yt = make_cifar10(tmp_path / "data")
    train, test = data.load_dataset("cifar10", tmp_path / "data", cache_dir=tmp_path / "c")
    assert train.images.dtype == torch.uint8 and train.images.shape == (15, 3, 32, 32)
    assert train.labels.dtype == torch.int64
    assert torch.equal(train.images, torch.from_numpy(x))
    assert torch.equal(train.labels, torch.from_numpy(y))
    assert torch.equal(test.images, torch.from_numpy(xt))
    assert torch.equal(test.labels, torch.from_numpy(yt))
    assert train.classes[3] == "c3" and train.num_classes == 10
    # the pickle directory itself is also accepted as root
    tr2, _ = data.load_dataset(
        "cifar10", tmp_path / "data" / "cifar-10-batches-py", use_cache=False
    )
    assert torch.equal(tr2.images, train.images)


def test_cifar100_pickles(tmp_path: Path) -> None:
    x, y, xt, yt = make_cifar100(tmp_path)
    train, test = data.load_dataset("cifar100", tmp_path, cache_dir=tmp_path / "c")
    assert torch.equal(train.images, torch.from_numpy(x))
    assert torch.equal(train.labels, torch.from_numpy(y))  # fine labels
    assert torch.equal(test.images, torch.from_numpy(xt))
    assert torch.equal(test.labels, torch.from_numpy(yt))
    assert train.num_classes == 100 and train.classes[7] == "f7"
    assert train.mean == data.CIFAR100_MEAN


def test_image_folder_and_archive(tmp_path: Path) -> None:
    classes = [f"class{i}" for i in range(10)]
    truth = make_folder(tmp_path / "folder", classes)
    raw = data.load_image_folder(tmp_path / "folder")
    assert raw.classes == classes
    assert raw.train_images.shape == (30, 3, 32, 32) and raw.test_images.shape[0] == 20
    for k, (img, label) in enumerate(truth["test"]):
        assert torch.equal(raw.test_images[k], torch.from_numpy(img))
        assert raw.test_labels[k] == label
    # per class: 0000.png, 0001.png, zzzz.jpg (sorted); the JPEG decodes near grey 128
    assert torch.equal(raw.train_images[0], torch.from_numpy(truth["train"][0][0]))
    assert (raw.train_images[2].float() - 128).abs().max() <= 3
    assert raw.train_labels.tolist() == [c for c in range(10) for _ in range(3)]

    train, test = data.load_dataset("cifar10", tmp_path / "folder", cache_dir=tmp_path / "c")
    assert torch.equal(train.images, raw.train_images)
    assert torch.equal(test.labels, raw.test_labels)

    archive = tmp_path / "cifar10-jpg.tar.xz"
    with tarfile.open(archive, "w:xz") as t:
        t.add(tmp_path / "folder" / "train", arcname="train")
        t.add(tmp_path / "folder" / "test", arcname="test")
    for root in (archive, tmp_path):  # the archive itself, or a directory holding it
        tr, te = data.load_dataset("cifar10", root, cache_dir=tmp_path / "c2")
        assert torch.equal(tr.images, raw.train_images)
        assert torch.equal(te.images, raw.test_images)
    assert list((tmp_path / "c2" / "extracted").iterdir())  # extracted once into cache


def test_image_folder_wrong_class_count(tmp_path: Path) -> None:
    make_folder(tmp_path, ["a", "b"], per_class=1)
    with pytest.raises(FileNotFoundError, match="2 class directories"):
        data.load_dataset("cifar10", tmp_path, use_cache=False)


def test_tinyimagenet(tmp_path: Path) -> None:
    wnids = make_tinyimagenet(tmp_path)
    train, test = data.load_dataset("tinyimagenet", tmp_path, cache_dir=tmp_path / "c")
    assert train.images.shape == (6, 3, 32, 32) and test.images.shape == (4, 3, 32, 32)
    assert train.classes == tuple(wnids) and train.num_classes == 200
    assert train.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert test.labels.tolist() == [1, 0, 2, 1]
    colour = torch.tensor([20.0, 120.0, 220.0])
    for ds in (train, test):
        means = ds.images.float().mean((1, 2, 3))
        assert torch.allclose(means, colour[ds.labels], atol=3)


# ----------------------------------------------------------------------------- cache


def test_cache_reuse_and_invalidation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_cifar10(tmp_path / "data")
    cache = tmp_path / "cache"
    first, _ = data.load_dataset("cifar10", tmp_path / "data", cache_dir=cache)
    files = list(cache.glob("*.pt"))
    assert len(files) == 1

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("source decoded although the cache is valid")

    monkeypatch.setattr(data, "load_cifar_python", boom)
    again, _ = data.load_dataset("cifar10", tmp_path / "data", cache_dir=cache)
    assert torch.equal(again.images, first.images)
    # touching a source file changes the key, so the cache is rebuilt from the source
    batch = tmp_path / "data" / "cifar-10-batches-py" / "data_batch_1"
    os.utime(batch, ns=(1, 1))
    with pytest.raises(AssertionError, match="source decoded"):
        data.load_dataset("cifar10", tmp_path / "data", cache_dir=cache)


def test_default_cache_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FISHER_OPTIM_DATA", str(tmp_path))
    assert data.default_cache_dir() == tmp_path / "cache"
    assert data.default_data_root() == tmp_path
    monkeypatch.delenv("FISHER_OPTIM_DATA")
    assert data.default_cache_dir() == Path.home() / ".cache" / "fisher_optim"


# ----------------------------------------------------------------------------- download


def _fake_cifar10_targz(tmp_path: Path) -> bytes:
    make_cifar10(tmp_path / "src", per_batch=1, n_test=1)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        t.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    return buf.getvalue()


def test_download_offline_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(data.urllib.request, "urlopen", offline)
    with pytest.raises(RuntimeError, match="manually") as err:
        data.download_cifar("cifar10", tmp_path / "dl")
    assert str(tmp_path / "dl") in str(err.value)
    assert "cifar-10-python.tar.gz" in str(err.value)
    assert not list((tmp_path / "dl").glob("*.part"))
    with pytest.raises(RuntimeError, match="manually"):
        data.load_dataset("cifar10", tmp_path / "dl", download=True, use_cache=False)


def test_download_md5_mismatch_and_success(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    payload = _fake_cifar10_targz(tmp_path)
    monkeypatch.setattr(data.urllib.request, "urlopen", lambda *a, **k: io.BytesIO(payload))
    with pytest.raises(RuntimeError, match="MD5 mismatch"):
        data.download_cifar("cifar10", tmp_path / "dl")
    assert not list((tmp_path / "dl").iterdir())  # partial download removed

    url, _, dirname = data.CIFAR_SOURCES["cifar10"]
    md5 = hashlib.md5(payload).hexdigest()
    monkeypatch.setitem(data.CIFAR_SOURCES, "cifar10", (url, md5, dirname))
    train, _ = data.load_dataset("cifar10", tmp_path / "dl", download=True, use_cache=False)
    assert len(train) == 5
    assert (tmp_path / "dl" / "cifar-10-python.tar.gz").is_file()


# ----------------------------------------------------------------------------- errors


def test_bad_names_and_missing_data(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cifar10, cifar100, tinyimagenet"):
        data.load_dataset("mnist", tmp_path)
    with pytest.raises(FileNotFoundError, match="looked for") as err:
        data.load_dataset("cifar100", tmp_path, use_cache=False)
    assert "cifar-100-python" in str(err.value)
    with pytest.raises(FileNotFoundError, match="wnids.txt"):
        data.load_dataset("tinyimagenet", tmp_path, use_cache=False)


# ----------------------------------------------------------------------------- helpers


def _dataset(n: int = 200, num_classes: int = 10) -> data.ImageDataset:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    labels = torch.arange(n) % num_classes
    return data.ImageDataset(images, labels, num_classes, name="fake")


def test_split_validation() -> None:
    ds = _dataset()
    tr, va = data.split_validation(ds, n_val=50, seed=3)
    assert len(tr) == 150 and len(va) == 50
    tr_idx, va_idx = data.split_indices(200, 50, seed=3)
    assert set(tr_idx.tolist()).isdisjoint(va_idx.tolist())
    assert sorted(tr_idx.tolist() + va_idx.tolist()) == list(range(200))
    assert torch.equal(va.images, ds.images[va_idx])
    tr2, va2 = ds.split_validation(50, seed=3)
    assert torch.equal(va2.labels, va.labels) and torch.equal(tr2.images, tr.images)
    assert not torch.equal(data.split_indices(200, 50, seed=4)[1], va_idx)
    with pytest.raises(ValueError):
        ds.split_validation(200)


def test_seeded_batches_are_disjoint_normalised_and_fixed() -> None:
    ds = _dataset()
    batches = ds.seeded_batches(3, 16, seed=5)
    order = torch.randperm(200, generator=torch.Generator().manual_seed(5))
    for i, (x, y) in enumerate(batches):
        idx = order[i * 16 : (i + 1) * 16]
        want = (ds.images[idx].double() / 255 - torch.tensor(ds.mean).view(1, 3, 1, 1)) / (
            torch.tensor(ds.std).view(1, 3, 1, 1)
        )
        torch.testing.assert_close(x.double(), want, rtol=1e-6, atol=1e-6)
        assert torch.equal(y, ds.labels[idx])
    assert len({int(i) for i in order[:48]}) == 48
    again = ds.seeded_batches(3, 16, seed=5)
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(batches, again))


def test_label_noise() -> None:
    labels = torch.arange(1000) % 10
    new, mask = data.add_label_noise(labels, 0.25, 10, seed=1)
    assert mask.dtype == torch.bool and int(mask.sum()) == 250
    assert torch.equal(new[~mask], labels[~mask])
    assert new.min() >= 0 and new.max() < 10
    changed = (new != labels).sum().item()
    assert 180 <= changed <= 250  # uniform replacement may keep the label (~10%)
    new2, mask2 = data.add_label_noise(labels, 0.25, 10, seed=1)
    assert torch.equal(new2, new) and torch.equal(mask2, mask)
    _, mask3 = data.add_label_noise(labels, 0.25, 10, seed=2)
    assert not torch.equal(mask3, mask)
    assert int(data.add_label_noise(labels[:7], 0.5, 10)[1].sum()) == round(3.5)
    same, none = data.add_label_noise(labels, 0.0, 10)
    assert torch.equal(same, labels) and not none.any()
    ds = _dataset()
    before = ds.labels.clone()
    noisy, m = ds.with_label_noise(0.5, seed=0)
    assert int(m.sum()) == 100 and torch.equal(ds.labels, before)
    assert torch.equal(noisy.labels[~m], before[~m])


def test_subset() -> None:
    ds = _dataset(200)
    sub = ds.subset(50, seed=0)
    assert len(sub) == 50
    assert torch.bincount(sub.labels, minlength=10).tolist() == [5] * 10
    assert torch.equal(data.subset(ds, 50, seed=0).images, sub.images)
    assert not torch.equal(ds.subset(50, seed=1).images, sub.images)
    assert len(ds.subset(37, seed=0, stratified=False)) == 37
    # unbalanced classes stay (close to) proportional
    labels = torch.tensor([0] * 150 + [1] * 50)
    idx = data.subset_indices(labels, 20, seed=0)
    assert torch.bincount(labels[idx]).tolist() == [15, 5]


def test_normalize() -> None:
    mean, std = data.CIFAR10_MEAN, data.CIFAR10_STD
    x = torch.randint(0, 256, (4, 3, 5, 5), dtype=torch.uint8)
    y = data.normalize(x, mean, std)
    assert y.dtype == torch.float32
    expected = (x.double() / 255 - torch.tensor(mean).double().view(1, 3, 1, 1)) / torch.tensor(
        std
    ).double().view(1, 3, 1, 1)
    assert torch.allclose(y.double(), expected, atol=1e-5)
    assert torch.allclose(data.normalize(x, None, None), x.float() / 255)


def test_augment_flip_and_crop() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, 256, (64, 3, 32, 32), generator=g, dtype=torch.uint8)
    flipped = data.augment_batch(x, torch.Generator().manual_seed(1), crop=False)
    assert flipped.shape == x.shape and flipped.dtype == torch.uint8
    is_same = (flipped == x).flatten(1).all(1)
    is_flip = (flipped == x.flip(-1)).flatten(1).all(1)
    assert (is_same | is_flip).all() and is_same.any() and is_flip.any()

    cropped = data.augment_batch(x, torch.Generator().manual_seed(2), flip=False)
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    saw_padding = False
    for i in range(64):
        hits = [
            (dy, dx)
            for dy in range(9)
            for dx in range(9)
            if torch.equal(cropped[i], padded[i, :, dy : dy + 32, dx : dx + 32])
        ]
        assert len(hits) == 1
        saw_padding |= hits[0] != (4, 4)
    assert saw_padding and (cropped == 0).any()  # zero padding (x itself has no zeros)

    both = data.augment_batch(x, torch.Generator().manual_seed(3))
    again = data.augment_batch(x, torch.Generator().manual_seed(3))
    assert torch.equal(both, again)


def test_iterate_batches_covers_each_example_once() -> None:
    ds = _dataset(103)
    g = torch.Generator().manual_seed(0)
    seen = []
    batches = list(
        data.iterate_batches(
            ds.images, ds.labels, 10, generator=g, mean=ds.mean, std=ds.std, return_indices=True
        )
    )
    assert len(batches) == 11
    for xb, yb, idx in batches:
        assert xb.dtype == torch.float32 and xb.shape[1:] == (3, 32, 32)
        assert torch.equal(yb, ds.labels[idx])
        assert torch.allclose(xb, data.normalize(ds.images[idx], ds.mean, ds.std))
        seen += idx.tolist()
    assert sorted(seen) == list(range(103)) and seen != list(range(103))

    loader = ds.loader(10, drop_last=True, augment=True, seed=5, return_indices=True)
    assert len(loader) == 10
    epoch1 = torch.cat([idx for _, _, idx in loader])
    epoch2 = torch.cat([idx for _, _, idx in loader])
    assert epoch1.numel() == 100 and len(set(epoch1.tolist())) == 100
    assert not torch.equal(epoch1, epoch2)
    replay = ds.loader(10, drop_last=True, augment=True, seed=5, return_indices=True)
    x1, _, i1 = next(iter(replay))
    x2, _, i2 = next(iter(ds.loader(10, drop_last=True, augment=True, seed=5, return_indices=True)))
    assert torch.equal(i1, i2) and torch.equal(x1, x2)
    ordered = data.BatchLoader(ds.images, ds.labels, 50, shuffle=False)
    xs, ys = zip(*ordered, strict=True)
    assert torch.equal(torch.cat(ys), ds.labels)
    assert torch.allclose(torch.cat(xs), ds.images.float() / 255)
