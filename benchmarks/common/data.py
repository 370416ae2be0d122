"""Image datasets for the benchmarks: loading, on-disk caching, splitting, noise, batching.

Everything is kept as uint8 tensors ``[N, 3, 32, 32]`` with int64 labels; conversion to
float, normalisation and augmentation happen per batch on the target device (see
:func:`iterate_batches`), so no ``torch.utils.data.DataLoader`` is involved.

Supported sources (see :func:`load_dataset` and ``benchmarks/README.md``):

* CIFAR-10 / CIFAR-100 official python pickles (``cifar-10-batches-py/``,
  ``cifar-100-python/``) or their official ``.tar.gz`` archives; optional download.
* An image-folder layout ``root/train/<class>/*.png|jpg`` and ``root/test/<class>/...``
  (classes sorted alphabetically, which is the standard CIFAR label order), or a
  ``.tar.xz``/``.tar.gz``/``.tar`` archive holding one (extracted once into the cache).
* TinyImageNet in the official ``tiny-imagenet-200`` layout (or its ``.zip``), resized
  from 64x64 to 32x32 as in the paper; its ``val`` split serves as the test set.

Decoded data is cached with ``torch.save`` in :func:`default_cache_dir`, keyed by the
source path and the size/mtime of its files, so later loads only read one file.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import tarfile
import urllib.error
import urllib.request
import warnings
import zipfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = [
    "AUGMENTATIONS",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "CIFAR_SOURCES",
    "DATASETS",
    "NUM_CLASSES",
    "TINYIMAGENET_MEAN",
    "TINYIMAGENET_STD",
    "BatchLoader",
    "ImageDataset",
    "RawData",
    "add_label_noise",
    "augment_batch",
    "default_cache_dir",
    "default_data_root",
    "MissingData",
    "download_cifar",
    "download_dataset",
    "iterate_batches",
    "load_cifar_python",
    "load_dataset",
    "load_image_folder",
    "load_tinyimagenet",
    "make_batch",
    "normalize",
    "shuffled_order",
    "split_indices",
    "split_validation",
    "subset",
    "subset_indices",
]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
TINYIMAGENET_MEAN = (0.4802, 0.4481, 0.3975)
TINYIMAGENET_STD = (0.2770, 0.2691, 0.2821)

DATASETS = ("cifar10", "cifar100", "tinyimagenet")
NUM_CLASSES = {"cifar10": 10, "cifar100": 100, "tinyimagenet": 200}
_MEAN_STD = {
    "cifar10": (CIFAR10_MEAN, CIFAR10_STD),
    "cifar100": (CIFAR100_MEAN, CIFAR100_STD),
    "tinyimagenet": (TINYIMAGENET_MEAN, TINYIMAGENET_STD),
}

#: name -> (official URL, MD5 of the archive, directory inside the archive)
CIFAR_SOURCES = {
    "cifar10": (
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "c58f30108f718f92721af3b95e74349a",
        "cifar-10-batches-py",
    ),
    "cifar100": (
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "eb9058c3a382ffc7106e4002c42a8d85",
        "cifar-100-python",
    ),
}
TINYIMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINYIMAGENET_SOURCE = (TINYIMAGENET_URL, "90528d7ca1a48142e341f4ef8d21d0de", "tiny-imagenet-200")

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".webp")
_ARCHIVE_SUFFIXES = (".tar.xz", ".tar.gz", ".tgz", ".tar", ".txz", ".zip")
_CACHE_VERSION = 1


def _check_name(name: str) -> str:
    key = name.lower().replace("-", "").replace("_", "")
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    return key


def default_data_root() -> Path:
    """``$FISHER_OPTIM_DATA`` if set, else ``~/.cache/fisher_optim/data``."""
    env = os.environ.get("FISHER_OPTIM_DATA")
    return Path(env) if env else Path.home() / ".cache" / "fisher_optim" / "data"


def default_cache_dir() -> Path:
    """``$FISHER_OPTIM_DATA/cache`` if that variable is set, else ``~/.cache/fisher_optim``."""
    env = os.environ.get("FISHER_OPTIM_DATA")
    return Path(env) / "cache" if env else Path.home() / ".cache" / "fisher_optim"


# --------------------------------------------------------------------------------------
# Raw format readers
# --------------------------------------------------------------------------------------


class RawData(NamedTuple):
    """Decoded train/test splits: uint8 images ``[N, 3, H, W]`` and int64 labels."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: list[str]


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")


def _get(d: dict, key: str):
    """Look up ``key`` in a pickle dict whose keys may be ``bytes`` or ``str``."""
    if key.encode() in d:
        return d[key.encode()]
    return d[key]


def _rows_to_images(data) -> torch.Tensor:
    arr = np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32)
    return torch.from_numpy(arr.copy())


def _is_cifar_python_dir(path: Path, name: str) -> bool:
    if name == "cifar10":
        return (path / "data_batch_1").is_file() and (path / "test_batch").is_file()
    return (path / "train").is_file() and (path / "test").is_file()


def load_cifar_python(path: str | os.PathLike, name: str) -> RawData:
    """Read the official CIFAR python pickles.

    Args:
        path: the ``cifar-10-batches-py`` (``data_batch_1..5``, ``test_batch``) or
            ``cifar-100-python`` (``train``, ``test``; ``fine_labels`` are used) directory.
        name: ``"cifar10"`` or ``"cifar100"``.
    """
    name = _check_name(name)
    path = Path(path)
    if name == "cifar10":
        train_files = [path / f"data_batch_{i}" for i in range(1, 6)]
        test_file, label_key = path / "test_batch", "labels"
        meta_file, names_key = path / "batches.meta", "label_names"
    elif name == "cifar100":
        train_files = [path / "train"]
        test_file, label_key = path / "test", "fine_labels"
        meta_file, names_key = path / "meta", "fine_label_names"
    else:
        raise ValueError(f"{name!r} has no python-pickle release; use cifar10 or cifar100")

    def read(files: Sequence[Path]) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = [], []
        for file in files:
            d = _unpickle(file)
            images.append(_rows_to_images(_get(d, "data")))
            labels.append(torch.as_tensor(np.asarray(_get(d, label_key)), dtype=torch.int64))
        return torch.cat(images), torch.cat(labels)

    tr_x, tr_y = read(train_files)
    te_x, te_y = read([test_file])
    n_cls = NUM_CLASSES[name]
    classes = [str(i) for i in range(n_cls)]
    if meta_file.is_file():
        raw = _get(_unpickle(meta_file), names_key)
        classes = [c.decode() if isinstance(c, bytes) else str(c) for c in raw]
    return RawData(tr_x, tr_y, te_x, te_y, classes)


def _decode_image(path: Path, size: int) -> np.ndarray:
    with Image.open(path) as im:
        im = im.convert("RGB")
        if im.size != (size, size):
            # PIL's bilinear resize widens its kernel when shrinking (area-like antialiasing).
            im = im.resize((size, size), Image.BILINEAR)
        return np.asarray(im, dtype=np.uint8)


def _decode_images(paths: Sequence[Path], size: int) -> torch.Tensor:
    """Decode ``paths`` into a uint8 tensor ``[N, 3, size, size]`` (threads for big sets)."""
    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)

    def work(i: int) -> None:
        out[i] = _decode_image(paths[i], size)

    if len(paths) > 512:
        workers = min(8, (os.cpu_count() or 1) + 1)
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(work, range(len(paths)), chunksize=256))
    else:
        for i in range(len(paths)):
            work(i)
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def _list_images(directory: Path) -> list[Path]:
    return sorted(
        p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def _class_dirs(split_dir: Path) -> list[str]:
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_folder_test_dir(root: Path) -> Path | None:
    for name in ("test", "val"):
        if (root / name).is_dir():
            return root / name
    return None


def load_image_folder(root: str | os.PathLike, size: int = 32) -> RawData:
    """Read ``root/train/<class>/*`` and ``root/test/<class>/*`` (``val`` also accepted).

    Class indices follow the alphabetical order of the ``train`` class directories (the
    standard label order for CIFAR-10 and CIFAR-100). Images of another size are resized
    to ``size`` x ``size``.
    """
    root = Path(root)
    test_dir = _image_folder_test_dir(root)
    if not (root / "train").is_dir() or test_dir is None:
        raise FileNotFoundError(f"{root} has no train/ and test/ (or val/) class directories")
    classes = _class_dirs(root / "train")
    index = {c: i for i, c in enumerate(classes)}
    unknown = set(_class_dirs(test_dir)) - set(classes)
    if unknown:
        raise ValueError(f"test classes not in train: {sorted(unknown)[:5]}")

    def read(split_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
        paths: list[Path] = []
        labels: list[int] = []
        for c in _class_dirs(split_dir):
            files = _list_images(split_dir / c)
            paths += files
            labels += [index[c]] * len(files)
        return _decode_images(paths, size), torch.tensor(labels, dtype=torch.int64)

    tr_x, tr_y = read(root / "train")
    te_x, te_y = read(test_dir)
    return RawData(tr_x, tr_y, te_x, te_y, classes)


def _is_tinyimagenet_dir(path: Path) -> bool:
    return (path / "wnids.txt").is_file() and (path / "train").is_dir()


def load_tinyimagenet(root: str | os.PathLike, size: int = 32) -> RawData:
    """Read the official ``tiny-imagenet-200`` layout, resizing 64x64 images to ``size``.

    Labels index the *sorted* wnids of ``wnids.txt`` (the ImageFolder convention). Train
    images come from ``train/<wnid>/images/*.JPEG``; the labelled ``val`` split
    (``val/images`` + ``val/val_annotations.txt``) is returned as the test split, as in
    the paper (which uses no validation split for TinyImageNet).
    """
    root = Path(root)
    wnids = sorted({w.strip() for w in (root / "wnids.txt").read_text().split() if w.strip()})
    index = {w: i for i, w in enumerate(wnids)}
    tr_paths: list[Path] = []
    tr_labels: list[int] = []
    for w in wnids:
        img_dir = root / "train" / w / "images"
        if not img_dir.is_dir():
            img_dir = root / "train" / w
        files = _list_images(img_dir)
        tr_paths += files
        tr_labels += [index[w]] * len(files)
    te_paths: list[Path] = []
    te_labels: list[int] = []
    for line in (root / "val" / "val_annotations.txt").read_text().splitlines():
        parts = line.split("\t") if "\t" in line else line.split()
        if len(parts) >= 2:
            te_paths.append(root / "val" / "images" / parts[0])
            te_labels.append(index[parts[1]])
    return RawData(
        _decode_images(tr_paths, size),
        torch.tensor(tr_labels, dtype=torch.int64),
        _decode_images(te_paths, size),
        torch.tensor(te_labels, dtype=torch.int64),
        wnids,
    )


# --------------------------------------------------------------------------------------
# Cache, archives, download
# --------------------------------------------------------------------------------------


def _fingerprint(source: Path, tag: str) -> str:
    """Hash of ``tag``, the resolved path, and relative path/size/mtime of every file."""
    h = hashlib.sha1(f"{_CACHE_VERSION}|{tag}|{source.resolve()}".encode())
    if source.is_file():
        st = source.stat()
        h.update(f"|{st.st_size}|{st.st_mtime_ns}".encode())
        return h.hexdigest()
    for dirpath, dirnames, filenames in os.walk(source):
        dirnames.sort()
        for fname in sorted(filenames):
            full = os.path.join(dirpath, fname)
            st = os.stat(full)
            rel = os.path.relpath(full, source)
            h.update(f"|{rel}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _cached(
    tag: str,
    source: Path,
    build: Callable[[], RawData],
    cache_dir: Path | None,
    use_cache: bool,
) -> RawData:
    """Return ``build()``, read from / written to a cache file keyed by ``source``."""
    if not use_cache:
        return build()
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    file = cache_dir / f"{tag}-{_fingerprint(source, tag)[:20]}.pt"
    if file.is_file():
        try:
            d = torch.load(file, map_location="cpu", weights_only=True)
            return RawData(*(d[k] for k in RawData._fields))
        except (OSError, RuntimeError, KeyError, pickle.UnpicklingError, EOFError) as e:
            warnings.warn(f"ignoring unreadable cache file {file}: {e}", stacklevel=3)
    data = build()
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f"{file.name}.{os.getpid()}.tmp")
    torch.save({**data._asdict(), "source": str(source)}, tmp)
    os.replace(tmp, file)  # atomic: concurrent writers cannot leave a partial file
    return data


def _extract(archive: Path, dest: Path) -> None:
    """Extract a tar (any compression) or zip archive into ``dest`` safely."""
    dest.mkdir(parents=True, exist_ok=True)
    if archive.name.lower().endswith(".zip"):
        with zipfile.ZipFile(archive) as z:
            for member in z.namelist():
                target = (dest / member).resolve()
                if not str(target).startswith(str(dest.resolve())):
                    raise RuntimeError(f"unsafe path {member!r} in {archive}")
            z.extractall(dest)
        return
    with tarfile.open(archive, "r:*") as t:
        if hasattr(tarfile, "data_filter"):
            t.extractall(dest, filter="data")
        else:  # pragma: no cover - Python < 3.11.4
            for m in t.getmembers():
                if not str((dest / m.name).resolve()).startswith(str(dest.resolve())):
                    raise RuntimeError(f"unsafe path {m.name!r} in {archive}")
            t.extractall(dest)


def _extract_once(archive: Path, cache_dir: Path | None) -> Path:
    """Extract ``archive`` into ``<cache>/extracted/<name>-<key>`` unless already done."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    stem = archive.name
    for suf in _ARCHIVE_SUFFIXES:
        if stem.lower().endswith(suf):
            stem = stem[: -len(suf)]
            break
    dest = cache_dir / "extracted" / f"{stem}-{_fingerprint(archive, 'archive')[:12]}"
    marker = dest / ".complete"
    if not marker.exists():
        if dest.exists():
            shutil.rmtree(dest)
        _extract(archive, dest)
        marker.touch()
    return dest


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class MissingData(FileNotFoundError, RuntimeError):
    """A data set that is not where it was looked for (and, with ``download``, could not be
    downloaded). ``str()`` is one paragraph for the user: the paths searched, ``--data-root``,
    ``--download`` and the URL; :meth:`exit` prints it and returns the exit code."""

    def __init__(self, name: str, root: Path, looked: Sequence[str], reason: str = "") -> None:
        url, md5, _ = _source(name)
        where = "; ".join(looked)
        text = (
            f"No {name} data was found under {root} (looked for: {where}). "
            f"Point --data-root at a folder or archive that holds it, or add --download "
            f"to fetch {url} (MD5 {md5}) into {root}."
        )
        if reason:
            text += (
                f" The download failed: {reason}. Download it manually and put the file, "
                f"or what it extracts to, in {root}."
            )
        super().__init__(text)
        self.name, self.root, self.looked, self.reason = name, root, list(looked), reason

    def exit(self) -> int:
        """Print the paragraph to stderr; the exit code of a command without its data (2)."""
        import sys
        import textwrap

        print(
            textwrap.fill(str(self), 88, break_on_hyphens=False, break_long_words=False),
            file=sys.stderr,
        )
        return 2


def _source(key: str) -> tuple[str, str, str]:
    """``(url, md5, directory inside the archive)`` of data set ``key``."""
    return CIFAR_SOURCES.get(key, TINYIMAGENET_SOURCE)


def _fetch(url: str, dest: Path) -> None:
    """``url`` into ``dest``, with a progress bar on a terminal."""
    import sys

    with urllib.request.urlopen(url, timeout=60) as response, open(dest, "wb") as f:
        total = getattr(response, "headers", {}).get("Content-Length")
        bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            bar = tqdm(
                total=int(total) if total else None,
                unit="B",
                unit_scale=True,
                desc=dest.name.removesuffix(".part"),
            )
        for chunk in iter(lambda: response.read(1 << 20), b""):
            f.write(chunk)
            if bar is not None:
                bar.update(len(chunk))
        if bar is not None:
            bar.close()


def download_dataset(name: str, root: str | os.PathLike | None = None) -> Path:
    """Download and extract the official release of ``name`` (CIFAR-10/100's python
    pickles, TinyImageNet's zip) into ``root``, with a progress bar on a terminal.

    The archive's MD5 is checked against the known value. Returns the extracted directory
    (immediately, without network access, if it already exists).

    Raises:
        MissingData: if the download fails (e.g. offline) or the checksum does not match;
            the message says where to put a manually downloaded copy.
    """
    key = _check_name(name)
    url, md5, dirname = _source(key)
    root = Path(root) if root is not None else default_data_root()
    target = root / dirname
    ready = (
        _is_tinyimagenet_dir if key == "tinyimagenet" else (lambda d: _is_cifar_python_dir(d, key))
    )
    if ready(target):
        return target
    archive = root / url.rsplit("/", 1)[1]
    looked = [f"{target}/", str(archive)]
    if not (archive.is_file() and _md5(archive) == md5):
        root.mkdir(parents=True, exist_ok=True)
        part = archive.with_name(archive.name + ".part")
        try:
            _fetch(url, part)
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            part.unlink(missing_ok=True)
            raise MissingData(key, root, looked, f"{e}") from e
        got = _md5(part)
        if got != md5:
            part.unlink(missing_ok=True)
            raise MissingData(key, root, looked, f"MD5 mismatch: expected {md5}, got {got}")
        os.replace(part, archive)
    _extract(archive, root)
    if not ready(target):
        raise MissingData(key, root, looked, f"{archive} did not contain {dirname}/")
    return target


def download_cifar(name: str, root: str | os.PathLike | None = None) -> Path:
    """:func:`download_dataset` for CIFAR-10/100 only."""
    key = _check_name(name)
    if key not in CIFAR_SOURCES:
        raise ValueError(f"download_cifar supports {', '.join(CIFAR_SOURCES)}, not {name!r}")
    return download_dataset(key, root)


# --------------------------------------------------------------------------------------
# Source discovery and the single entry point
# --------------------------------------------------------------------------------------


def _name_matches(filename: str, key: str) -> bool:
    norm = filename.lower().replace("-", "").replace("_", "")
    if key == "cifar10":
        return "cifar10" in norm and "cifar100" not in norm
    if key == "cifar100":
        return "cifar100" in norm
    return "tinyimagenet" in norm


def _detect_dir(key: str, d: Path, looked: list[str]) -> tuple[str, Path] | None:
    """Find a supported non-archive layout in ``d`` or its official sub-directory."""
    if key == "tinyimagenet":
        for c in (d, d / "tiny-imagenet-200"):
            looked.append(f"{c}/wnids.txt (+ train/, val/)")
            if _is_tinyimagenet_dir(c):
                return "tiny", c
        return None
    dirname = CIFAR_SOURCES[key][2]
    for c in (d, d / dirname):
        files = "data_batch_1..5, test_batch" if key == "cifar10" else "train, test"
        looked.append(f"{c}/{{{files}}} (python pickles)")
        if _is_cifar_python_dir(c, key):
            return "pickle", c
    for c in (d, d / key):
        looked.append(f"{c}/train/<class>/*.png|jpg + {c}/test/<class>/ (image folder)")
        if (c / "train").is_dir() and _image_folder_test_dir(c) is not None:
            n = len(_class_dirs(c / "train"))
            if n == NUM_CLASSES[key]:
                return "folder", c
            looked.append(f"  ({c}/train has {n} class directories, expected {NUM_CLASSES[key]})")
    return None


def _find_archives(key: str, root: Path, looked: list[str]) -> list[Path]:
    def is_archive(p: Path) -> bool:
        return p.is_file() and p.name.lower().endswith(_ARCHIVE_SUFFIXES)

    if root.is_file():
        looked.append(f"{root} (archive)")
        return [root] if is_archive(root) else []
    looked.append(f"{root}/*{key}*.tar.xz|.tar.gz|.tgz|.tar|.zip (archive)")
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if is_archive(p) and _name_matches(p.name, key))


def _load_layout(key: str, fmt: str, path: Path) -> RawData:
    if fmt == "pickle":
        return load_cifar_python(path, key)
    if fmt == "folder":
        return load_image_folder(path)
    return load_tinyimagenet(path)


def _detect_extracted(key: str, dest: Path) -> tuple[str, Path]:
    looked: list[str] = []
    for d in [dest, *sorted(p for p in dest.iterdir() if p.is_dir())]:
        found = _detect_dir(key, d, looked)
        if found is not None:
            return found
    raise FileNotFoundError(
        f"no {key} data found inside the extracted archive {dest}; looked for:\n  "
        + "\n  ".join(looked)
    )


def _load_raw(
    key: str, root: Path, cache_dir: Path | None, download: bool, use_cache: bool
) -> RawData:
    looked: list[str] = []
    if root.is_dir():
        found = _detect_dir(key, root, looked)
        if found is not None:
            fmt, path = found
            return _cached(
                f"{key}-{fmt}", path, lambda: _load_layout(key, fmt, path), cache_dir, use_cache
            )
    for archive in _find_archives(key, root, looked):

        def build(archive: Path = archive) -> RawData:
            fmt, path = _detect_extracted(key, _extract_once(archive, cache_dir))
            return _load_layout(key, fmt, path)

        return _cached(f"{key}-archive", archive, build, cache_dir, use_cache)
    if download:
        path = download_dataset(key, root)
        fmt = "tiny" if key == "tinyimagenet" else "pickle"
        return _cached(
            f"{key}-{fmt}", path, lambda: _load_layout(key, fmt, path), cache_dir, use_cache
        )
    raise MissingData(key, root, looked)


def load_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    download: bool = False,
    use_cache: bool = True,
) -> tuple[ImageDataset, ImageDataset]:
    """Load ``(train, test)`` for ``name`` in {"cifar10", "cifar100", "tinyimagenet"}.

    Args:
        name: dataset name (``ValueError`` lists the valid ones otherwise).
        root: directory (or archive file) holding the data in any supported format;
            defaults to :func:`default_data_root`.
        cache_dir: where decoded tensors and extracted archives are cached; defaults to
            :func:`default_cache_dir`.
        download: download the official release into ``root`` if nothing is found there
            (:func:`download_dataset`).
        use_cache: set ``False`` to decode from the source without reading/writing the cache.

    Raises:
        MissingData: (a ``FileNotFoundError``) listing every location/format that was
            looked for, the ``--download`` flag and the URL.
    """
    key = _check_name(name)
    root = Path(root) if root is not None else default_data_root()
    raw = _load_raw(key, root, Path(cache_dir) if cache_dir else None, download, use_cache)
    mean, std = _MEAN_STD[key]
    common = {"num_classes": NUM_CLASSES[key], "mean": mean, "std": std}
    classes = tuple(raw.classes)
    train = ImageDataset(
        raw.train_images, raw.train_labels, name=f"{key}-train", classes=classes, **common
    )
    test = ImageDataset(
        raw.test_images, raw.test_labels, name=f"{key}-test", classes=classes, **common
    )
    return train, test


# --------------------------------------------------------------------------------------
# Container, splits, noise, subsets
# --------------------------------------------------------------------------------------


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def split_indices(n: int, n_val: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded disjoint ``(train_idx, val_idx)`` (each sorted) of ``range(n)``."""
    if not 0 <= n_val < n:
        raise ValueError(f"n_val must be in [0, {n}), got {n_val}")
    perm = torch.randperm(n, generator=_generator(seed))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def add_label_noise(
    labels: torch.Tensor, fraction: float, num_classes: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace exactly ``round(fraction * N)`` random labels with uniform random labels.

    As in the paper ("labels replaced with labels sampled uniformly"), a replacement label
    is drawn from all ``num_classes`` classes and may coincide with the original one, so
    the fraction of *wrong* labels is about ``fraction * (1 - 1/num_classes)``.

    Returns:
        ``(new_labels, replaced)``: a new int64 tensor, and a bool mask of the examples
        whose label was replaced (``replaced.sum() == round(fraction * N)``).
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    n = labels.numel()
    k = round(fraction * n)
    g = _generator(seed)
    idx = torch.randperm(n, generator=g)[:k]
    new = labels.detach().to("cpu", torch.int64).clone()
    new[idx] = torch.randint(0, num_classes, (k,), generator=g)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[idx] = True
    return new.to(labels.device), mask.to(labels.device)


def subset_indices(
    labels: torch.Tensor, n: int, seed: int = 0, stratified: bool = True
) -> torch.Tensor:
    """Sorted indices of ``n`` examples, class-proportional if ``stratified``."""
    total = labels.numel()
    if not 0 <= n <= total:
        raise ValueError(f"n must be in [0, {total}], got {n}")
    perm = torch.randperm(total, generator=_generator(seed))
    if not stratified:
        return perm[:n].sort().values
    lab = labels.cpu()[perm]
    # rank of each (shuffled) example within its class, then interleave classes by
    # relative rank: the first n picks are (nearly exactly) class-proportional.
    order = torch.sort(lab, stable=True).indices
    counts = torch.bincount(lab)
    starts = torch.cumsum(counts, 0) - counts
    ranks = torch.empty(total, dtype=torch.int64)
    ranks[order] = torch.arange(total) - starts[lab[order]]
    key = (ranks.double() + 0.5) / counts[lab].double()
    pick = torch.sort(key, stable=True).indices[:n]
    return perm[pick].sort().values


@dataclass(repr=False)
class ImageDataset:
    """A labelled image set held as uint8 ``[N, 3, H, W]`` images and int64 labels.

    ``mean``/``std`` are the per-channel normalisation constants (in [0, 1] pixel units)
    used by :meth:`loader`. Methods return new datasets sharing storage where possible.
    """

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    mean: tuple[float, ...] = CIFAR10_MEAN
    std: tuple[float, ...] = CIFAR10_STD
    name: str = ""
    classes: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError("images must be a uint8 tensor [N, C, H, W]")
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError("labels must be a 1-D tensor with one label per image")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __repr__(self) -> str:
        return (
            f"ImageDataset(name={self.name!r}, n={len(self)}, "
            f"shape={tuple(self.images.shape[1:])}, num_classes={self.num_classes}, "
            f"device={self.images.device})"
        )

    def select(
        self, indices: torch.Tensor | Sequence[int], name: str | None = None
    ) -> ImageDataset:
        """The examples at ``indices`` (in that order)."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return replace(
            self,
            images=self.images[idx.to(self.images.device)],
            labels=self.labels[idx.to(self.labels.device)],
            name=self.name if name is None else name,
        )

    def split_validation(
        self, n_val: int = 5000, seed: int = 0
    ) -> tuple[ImageDataset, ImageDataset]:
        """Seeded ``(train, val)`` split holding out ``n_val`` examples (paper: 5,000)."""
        tr, va = split_indices(len(self), n_val, seed)
        return self.select(tr, f"{self.name}/train"), self.select(va, f"{self.name}/val")

    def subset(self, n: int, seed: int = 0, stratified: bool = True) -> ImageDataset:
        """``n`` examples (class-proportional if ``stratified``), e.g. for ``--quick`` runs."""
        return self.select(subset_indices(self.labels, n, seed, stratified))

    def with_label_noise(self, fraction: float, seed: int = 0) -> tuple[ImageDataset, torch.Tensor]:
        """Copy with noisy labels (see :func:`add_label_noise`) and the replaced mask."""
        labels, mask = add_label_noise(self.labels, fraction, self.num_classes, seed)
        return replace(self, labels=labels), mask

    def to(self, device: torch.device | str) -> ImageDataset:
        """Move images and labels to ``device``."""
        return replace(self, images=self.images.to(device), labels=self.labels.to(device))

    def batch(
        self,
        idx: torch.Tensor | slice,
        augment: str | bool = "none",
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """The normalised float inputs of the examples ``idx`` (:func:`make_batch`)."""
        return make_batch(
            self.images, idx, augment=augment, generator=generator, mean=self.mean, std=self.std
        )

    def seeded_batches(
        self, count: int, batch_size: int, seed: int = 0
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``count`` disjoint batches ``(inputs, labels)`` of ``batch_size`` examples, in the
        order of one permutation drawn by a generator seeded with ``seed`` (normalised, not
        augmented; the same batches on every call)."""
        order = shuffled_order(len(self), torch.Generator().manual_seed(seed))
        batches = [order[i * batch_size : (i + 1) * batch_size] for i in range(count)]
        return [(self.batch(idx), self.labels[idx]) for idx in batches]

    def loader(self, batch_size: int, **kwargs) -> BatchLoader:
        """A :class:`BatchLoader` over this dataset normalised with its ``mean``/``std``."""
        return BatchLoader.from_dataset(self, batch_size, **kwargs)


def split_validation(
    dataset: ImageDataset, n_val: int = 5000, seed: int = 0
) -> tuple[ImageDataset, ImageDataset]:
    """Function form of :meth:`ImageDataset.split_validation`."""
    return dataset.split_validation(n_val, seed)


def subset(dataset: ImageDataset, n: int, seed: int = 0, stratified: bool = True) -> ImageDataset:
    """Function form of :meth:`ImageDataset.subset`."""
    return dataset.subset(n, seed, stratified)


# --------------------------------------------------------------------------------------
# Batch transforms and iteration
# --------------------------------------------------------------------------------------


def normalize(
    images: torch.Tensor, mean: Sequence[float] | None, std: Sequence[float] | None
) -> torch.Tensor:
    """uint8 ``[B, C, H, W]`` -> float32 in [0, 1], then ``(x - mean) / std`` per channel.

    With ``mean``/``std`` ``None`` only the scaling to [0, 1] is applied.
    """
    x = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
    if mean is not None and std is not None:
        m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        x = (x - m) / s
    return x


def _rand_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def augment_batch(
    images: torch.Tensor,
    generator: torch.Generator | None = None,
    *,
    padding: int = 4,
    crop: bool = True,
    flip: bool = True,
) -> torch.Tensor:
    """Random crop (zero padding ``padding``, same output size) and horizontal flip.

    Applied to a whole batch ``[B, C, H, W]`` (any dtype, typically uint8 before
    normalisation, so the padding is black) at once by index arithmetic: each image gets
    offsets ``(dy, dx)`` uniform in ``[0, 2 * padding]`` into the padded image, and is
    mirrored with probability 1/2. Random numbers come from ``generator`` (on its own
    device), the gather runs on the device of ``images``.
    """
    b, _, h, w = images.shape
    dev, rdev = images.device, _rand_device(generator)
    p = padding if crop else 0
    if crop and p > 0:
        oy = torch.randint(0, 2 * p + 1, (b,), generator=generator, device=rdev).to(dev)
        ox = torch.randint(0, 2 * p + 1, (b,), generator=generator, device=rdev).to(dev)
        padded = F.pad(images, (p, p, p, p))
    else:
        oy = ox = torch.zeros(b, dtype=torch.int64, device=dev)
        padded = images
    rows = oy[:, None] + torch.arange(h, device=dev)  # [B, H]
    cols = ox[:, None] + torch.arange(w, device=dev)  # [B, W]
    if flip:
        mirror = torch.randint(0, 2, (b,), generator=generator, device=rdev).to(dev).bool()
        cols = torch.where(mirror[:, None], cols.flip(1), cols)
    bidx = torch.arange(b, device=dev)[:, None, None]
    out = padded[bidx, :, rows[:, :, None], cols[:, None, :]]  # [B, H, W, C]
    return out.permute(0, 3, 1, 2).contiguous()


#: Augmentations of a training batch: none, horizontal flip, or random crop and flip.
AUGMENTATIONS = ("none", "flip", "standard")


def make_batch(
    images: torch.Tensor,
    idx: torch.Tensor,
    *,
    augment: str | bool = "none",
    generator: torch.Generator | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> torch.Tensor:
    """The float batch of the uint8 ``images[idx]``: augmented (``augment`` one of
    :data:`AUGMENTATIONS`; ``True`` is ``"standard"``, ``False`` ``"none"``) with random
    numbers from ``generator``, then normalised (:func:`normalize`). The one batching path
    of every benchmark loop (:func:`iterate_batches` and the harness's steps)."""
    mode = {True: "standard", False: "none"}.get(augment, augment)
    if mode not in AUGMENTATIONS:
        raise ValueError(f"augment must be one of {AUGMENTATIONS}, got {augment!r}")
    xb = images[idx]
    if mode != "none":
        xb = augment_batch(xb, generator, crop=mode == "standard", flip=True)
    return normalize(xb, mean, std)


def shuffled_order(
    n: int, generator: torch.Generator | None, device: torch.device | str | None = None
) -> torch.Tensor:
    """An epoch's order of ``n`` examples: a permutation drawn from ``generator`` (on its own
    device), moved to ``device``."""
    order = torch.randperm(n, generator=generator, device=_rand_device(generator))
    return order if device is None else order.to(device)


def iterate_batches(
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    shuffle: bool = True,
    generator: torch.Generator | None = None,
    augment: bool = False,
    device: torch.device | str | None = None,
    drop_last: bool = False,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    return_indices: bool = False,
) -> Iterator[tuple[torch.Tensor, ...]]:
    """One epoch of ``(x, y)`` (or ``(x, y, idx)``) batches, all on ``device``.

    ``images`` (uint8) and ``labels`` are moved to ``device`` (default: where they are;
    move them once beforehand to avoid repeated copies). Each batch is gathered,
    optionally augmented (:func:`augment_batch`), converted to float and normalised
    (:func:`normalize` with ``mean``/``std``; ``None`` = scale to [0, 1] only). ``idx`` are
    the dataset indices of the batch, for per-example bookkeeping (e.g. noisy labels).
    """
    dev = torch.device(device) if device is not None else images.device
    images, labels = images.to(dev), labels.to(dev)
    n = images.shape[0]
    order = shuffled_order(n, generator, dev) if shuffle else torch.arange(n, device=dev)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        if drop_last and idx.numel() < batch_size:
            break
        xb = make_batch(images, idx, augment=augment, generator=generator, mean=mean, std=std)
        yield (xb, labels[idx], idx) if return_indices else (xb, labels[idx])


class BatchLoader:
    """Re-iterable epoch loader keeping the whole uint8 dataset on ``device``.

    Each ``iter()`` is one epoch (see :func:`iterate_batches`); the shuffling/augmentation
    stream is a ``torch.Generator`` seeded with ``seed`` (on ``device``), so runs are
    reproducible. ``labels`` may be reassigned (e.g. to noisy labels) between epochs.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool = True,
        augment: bool = False,
        device: torch.device | str | None = None,
        drop_last: bool = False,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        seed: int = 0,
        generator: torch.Generator | None = None,
        return_indices: bool = False,
    ) -> None:
        self.device = torch.device(device) if device is not None else images.device
        self.images = images.to(self.device)
        self.labels = labels.to(self.device)
        self.batch_size = batch_size
        self.shuffle, self.augment, self.drop_last = shuffle, augment, drop_last
        self.mean, self.std = mean, std
        self.return_indices = return_indices
        if generator is None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        self.generator = generator

    @classmethod
    def from_dataset(cls, dataset: ImageDataset, batch_size: int, **kwargs) -> BatchLoader:
        """Loader over ``dataset`` normalised with its ``mean``/``std`` (overridable)."""
        kwargs.setdefault("mean", dataset.mean)
        kwargs.setdefault("std", dataset.std)
        return cls(dataset.images, dataset.labels, batch_size, **kwargs)

    def __len__(self) -> int:
        n = self.images.shape[0]
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    @property
    def num_examples(self) -> int:
        """Number of examples per epoch (before ``drop_last``)."""
        return int(self.images.shape[0])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        return iterate_batches(
            self.images,
            self.labels.to(self.device),
            self.batch_size,
            shuffle=self.shuffle,
            generator=self.generator,
            augment=self.augment,
            device=self.device,
            drop_last=self.drop_last,
            mean=self.mean,
            std=self.std,
            return_indices=self.return_indices,
        )
