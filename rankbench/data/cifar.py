"""CIFAR-10 from its standard python batches, with the usual crop-and-flip augmentation.

The files are the ones the dataset's authors publish (``cifar-10-python.tar.gz``,
unpacked to ``cifar-10-batches-py/``). They are pickles, so they are read with an
unpickler that only admits the numpy array reconstructors the batches need:
a tampered file cannot run code. No torchvision dependency.
"""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import torch

from rankbench.data.splits import (
    DataSplits,
    Split,
    dataset_folders,
    default_data_dir,
    download_file,
    file_digest,
    holdout_split,
)
from rankbench.errors import RankbenchError

__all__ = ["CIFAR10_NAME", "load_cifar10", "random_crop_flip"]

CIFAR10_NAME = "cifar10"
ARCHIVE = "cifar-10-python.tar.gz"
ARCHIVE_URL = f"https://www.cs.toronto.edu/~kriz/{ARCHIVE}"
ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"
BATCHES_DIR = "cifar-10-batches-py"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"

_MEAN = (0.4914, 0.4822, 0.4465)
_STD = (0.2470, 0.2435, 0.2616)
_PIXELS = 3 * 32 * 32
_NUM_CLASSES = 10
_DOWNLOAD_TIMEOUT_S = 60

_NUMPY_CORE = "numpy._core" if hasattr(np, "_core") else "numpy.core"
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
}


class _BatchUnpickler(pickle.Unpickler):
    """Admits only what a CIFAR batch pickle holds: numpy arrays, dicts, lists, bytes."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"forbidden global {module}.{name}")
        if module.startswith("numpy.core"):
            module = module.replace("numpy.core", _NUMPY_CORE, 1)
        return super().find_class(module, name)


def _corrupt(path: Path, reason: str) -> RankbenchError:
    return RankbenchError(
        f"corrupt CIFAR-10 batch {path} ({reason}): delete {path.parent} and re-run with --download, "
        f"or unpack the original {ARCHIVE} there"
    )


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(N, 3, 32, 32)`` uint8 and labels ``(N,)`` int64 of one batch file."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise RankbenchError(f"could not read {path} ({exc.strerror or exc}): check the file's permissions") from exc
    try:
        batch = _BatchUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as exc:  # a damaged pickle raises almost anything
        raise _corrupt(path, f"{type(exc).__name__}: {exc}".strip().rstrip(":")) from exc
    if not isinstance(batch, dict):
        raise _corrupt(path, f"holds a {type(batch).__name__}, expected a dict")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise _corrupt(path, f"keys {sorted(map(str, batch))}, expected 'data' and 'labels'")
    try:
        data = np.asarray(batch["data"])
        raw_labels = np.asarray(batch["labels"])
    except (ValueError, TypeError) as exc:
        raise _corrupt(path, f"unreadable data or labels: {exc}") from exc
    if raw_labels.dtype.kind not in "iu":
        raise _corrupt(path, f"labels are {raw_labels.dtype}, expected integers")
    labels = raw_labels.astype(np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _PIXELS:
        raise _corrupt(path, f"data is {data.dtype} {data.shape}, expected uint8 (N, {_PIXELS})")
    if labels.shape != (data.shape[0],):
        raise _corrupt(path, f"{data.shape[0]} images but {labels.size} labels")
    if labels.size and (labels.min() < 0 or labels.max() >= _NUM_CLASSES):
        raise _corrupt(path, f"label outside 0..{_NUM_CLASSES - 1}")
    return data.reshape(-1, 3, 32, 32), labels


def _download(directory: Path) -> Path:
    """Fetch the archive and check its published MD5."""
    return download_file(ARCHIVE_URL, directory / ARCHIVE, _DOWNLOAD_TIMEOUT_S, md5=ARCHIVE_MD5)


def _extract(archive: Path, directory: Path) -> None:
    """Unpack the batches (and nothing outside ``directory``) from the archive."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(f"{BATCHES_DIR}/") and m.isfile()]
            tar.extractall(directory, members=members, filter="data")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise RankbenchError(
            f"could not unpack {archive} ({exc}): delete it and re-run with --download, or copy the original archive"
        ) from exc


def _batches_dir(data_dir: Path | None, download: bool) -> Path:
    """Where the batch files are: ``DIR/cifar10/cifar-10-batches-py`` (or torchvision's
    ``DIR/cifar-10-batches-py``, or a system-installed copy), unpacking or downloading the archive when asked."""
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    directory, *system = dataset_folders(data_dir, CIFAR10_NAME)
    for candidate in (directory / BATCHES_DIR, root / BATCHES_DIR, *(folder / BATCHES_DIR for folder in system)):
        if candidate.is_dir():
            return candidate
    archive = directory / ARCHIVE
    if not archive.is_file() and (root / ARCHIVE).is_file():
        archive = root / ARCHIVE
    if not archive.is_file():
        if not download:
            raise RankbenchError(
                f"CIFAR-10 not found under {directory}: unpack {ARCHIVE} ({ARCHIVE_URL}) there "
                f"(or copy the archive), or pass --download; CIFAR-10 has no embedded offline copy"
            )
        archive = _download(directory)
    _extract(archive, directory)
    return directory / BATCHES_DIR


def _make_split(images: np.ndarray, labels: np.ndarray) -> Split:
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).div_(255.0)
    mean = torch.tensor(_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(_STD).view(1, 3, 1, 1)
    return Split(x=x.sub_(mean).div_(std), y=torch.from_numpy(np.ascontiguousarray(labels)))


def load_cifar10(
    data_dir: Path | None = None, *, split_seed: int = 0, val_size: int = 5000, download: bool = False
) -> DataSplits:
    """CIFAR-10: the five training batches less ``val_size`` held-out images (seeded
    by ``split_seed``) for training and validation, the test batch untouched.
    Images are normalised per channel, shaped ``(N, 3, 32, 32)``.

    Reads the official python batches under ``DATA_DIR/cifar10/cifar-10-batches-py/``
    (or torchvision's ``DATA_DIR/cifar-10-batches-py/``), or unpacks
    ``cifar-10-python.tar.gz`` in ``DATA_DIR/cifar10/`` on first use. The pickles are
    read with an unpickler that admits only numpy's array reconstructors.

    Args:
        data_dir: The data folder (``--data-dir``); ``None``: ``default_data_dir()``.
        split_seed: Seed of the validation hold-out.
        val_size: Training images held out for validation.
        download: Fetch the archive (its published MD5 is checked) when missing.

    Returns:
        The splits, with int64 labels in ``0..9``.

    Raises:
        RankbenchError: Missing or incomplete batches (the message names the folder and
            ``--download``), a tampered or corrupt file, or a failed download.
    """
    directory = _batches_dir(data_dir, download)
    missing = [name for name in (*TRAIN_BATCHES, TEST_BATCH) if not (directory / name).is_file()]
    if missing:
        raise RankbenchError(
            f"CIFAR-10 is incomplete under {directory}: missing {', '.join(missing)}: "
            f"unpack the original {ARCHIVE} there, or delete the folder and pass --download"
        )
    parts = [_read_batch(directory / name) for name in TRAIN_BATCHES]
    train_x = np.concatenate([p[0] for p in parts])
    train_y = np.concatenate([p[1] for p in parts])
    test_x, test_y = _read_batch(directory / TEST_BATCH)
    train_idx, val_idx = holdout_split(len(train_y), val_size, split_seed, "CIFAR-10 training images")
    return DataSplits(
        name=CIFAR10_NAME,
        source=str(directory),
        train=_make_split(train_x[train_idx], train_y[train_idx]),
        val=_make_split(train_x[val_idx], train_y[val_idx]),
        test=_make_split(test_x, test_y),
        num_classes=_NUM_CLASSES,
        digest=file_digest(directory / name for name in (*TRAIN_BATCHES, TEST_BATCH)),
    )


def random_crop_flip(x: torch.Tensor, padding: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """The standard CIFAR augmentation, per image: zero-pad by ``padding``, crop back
    to the original size at a random offset, and flip horizontally with probability ½.
    Drawn from ``generator`` so one seed gives one sequence of batches.

    Args:
        x: A batch of images.
        padding: Zero-padding on every side before the crop (4 for ``resnet32``).
        generator: The generator every offset and flip is drawn from.

    Returns:
        The augmented batch, the shape of ``x``.

    Shape:
        - Input: ``(N, C, H, W)``.
        - Output: ``(N, C, H, W)``.
    """
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    cols = dx[:, None] + torch.arange(w)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    rows = dy[:, None] + torch.arange(h)
    idx = torch.arange(n)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[idx, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()
