"""Datasets as in-memory tensors: the split types every task loads into, seeded
train/validation hold-outs, batching, and a safe download helper."""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path

import numpy as np
import platformdirs
import torch

from rankbench.errors import RankbenchError

__all__ = ["DataSplits", "Split", "SYSTEM_DATA_DIRS", "dataset_folders", "default_data_dir", "download_file",
           "file_digest", "holdout_split", "iterate_batches", "make_data_folder"]

SYSTEM_DATA_DIRS: tuple[Path, ...] = (Path("/usr/share/datasets"),)
"""Where system packages install datasets, searched after the data folder: Debian's
``dataset-fashion-mnist`` puts the Fashion-MNIST IDX files in ``/usr/share/datasets/fashion-mnist/``."""


@dataclass(frozen=True, eq=False)
class Split:
    """One split: inputs ``x`` (N, ...) and targets ``y`` (N, ...), one row per example.

    Images are normalised float32 ``x``, e.g. (N, 1, 28, 28), with int64 labels ``y`` (N,);
    text is int64 token ids ``x`` (N, length) padded with 0; a translation pair is
    ``x`` (N, 2, length) (source, target input) with the target output ``y`` (N, length).
    ``eq=False`` because element-wise tensor comparison has no single truth value.

    Attributes:
        x: Inputs, one row per example.
        y: Targets, one row per example (int64 class labels for classification).

    Raises:
        ValueError: ``x`` and ``y`` do not have one row per example each.
    """

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if self.y.ndim < 1 or self.x.ndim < 1 or self.x.shape[0] != self.y.shape[0]:
            raise ValueError(
                f"Split needs x and y with one row per example, got x {tuple(self.x.shape)} "
                f"and y {tuple(self.y.shape)}"
            )

    def __len__(self) -> int:
        """The number of examples."""
        return int(self.y.shape[0])


@dataclass(frozen=True, eq=False)
class DataSplits:
    """A dataset split three ways, with where it came from so results can record it.

    What ``Task.load_data`` returns; the three splits must be disjoint and non-empty.

    Attributes:
        name: The dataset's name, recorded as ``data_name`` (e.g. ``mnist-embedded-5k``).
        source: Where the data came from (a folder and its files), recorded as
            ``dataset_source``.
        train: The training split.
        val: The validation split (model selection, studies).
        test: The test split (only reported).
        num_classes: Number of classes (the model's output width).
        embedded: True for a small offline default (the task's ``embedded`` recipe
            then applies by itself).
        note: A remark printed with the data (e.g. "not SST").
        digest: See below.
        vocabulary: See below.
    """

    name: str
    source: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    embedded: bool = False
    note: str = ""
    digest: str = ""
    """SHA-256 of the files (or arrays) the splits were made from: which bytes a result comes from."""
    vocabulary: tuple[str, ...] = ()
    """A text dataset's tokens, index = token id (0 is padding); empty for other data. Models size
    their embeddings by it, and decoders turn ids back into text with it."""

    def describe(self) -> str:
        """One line for logs and reports, e.g. ``mnist (DIR (...)): train 55,000 / val 5,000 / test 10,000``.

        Returns:
            The line.
        """
        origin = f"{self.source}, {self.note}" if self.note else self.source
        return (
            f"{self.name} ({origin}): train {len(self.train):,} / "
            f"val {len(self.val):,} / test {len(self.test):,}"
        )


def default_data_dir() -> Path:
    """Where datasets live: ``$RANKBENCH_DATA_DIR`` if set, else the user cache dir, so
    downloads are shared between runs and checkouts.

    Returns:
        The folder (``~/.cache/rankbench/data`` on Linux); it may not exist yet.
    """
    override = os.environ.get("RANKBENCH_DATA_DIR")
    if override:
        return Path(override).expanduser()
    return Path(platformdirs.user_cache_dir("rankbench")) / "data"


def dataset_folders(data_dir: Path | None, name: str) -> list[Path]:
    """The folders searched for dataset ``name``, in order: ``data_dir/name`` (default: the
    user cache, see ``default_data_dir``), then ``name`` under each of ``SYSTEM_DATA_DIRS``."""
    first = (Path(data_dir) if data_dir is not None else default_data_dir()) / name
    return [first, *(root / name for root in SYSTEM_DATA_DIRS if root / name != first)]


def file_digest(paths: Iterable[Path]) -> str:
    """SHA-256 over the files' bytes, in the given order."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def holdout_split(n_train: int, val_size: int, split_seed: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Train and validation indices: a seeded random hold-out of ``val_size`` of the
    ``n_train`` official training examples, so the official test set stays untouched.

    Args:
        n_train: Number of official training examples.
        val_size: Number of them to hold out for validation.
        split_seed: Seed of the permutation (``--set split_seed=N``).
        what: What the examples are, for the error message.

    Returns:
        ``(train_indices, val_indices)``, disjoint, covering ``range(n_train)``.

    Raises:
        RankbenchError: ``val_size`` is negative or not below ``n_train``.
    """
    if not 0 <= val_size < n_train:
        raise RankbenchError(
            f"val_size {val_size} does not fit the {n_train:,} {what}: "
            f"choose a validation size from 0 to {n_train - 1}"
        )
    perm = np.random.default_rng(split_seed).permutation(n_train)
    return perm[val_size:], perm[:val_size]


def iterate_batches(
    split: Split,
    batch_size: int,
    *,
    shuffle: bool,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x, y)`` mini-batches covering every example once, last partial batch included.

    Shuffling draws ``torch.randperm`` from ``generator`` so a seeded generator gives a
    reproducible order without touching torch's global RNG.

    Args:
        split: The split to batch.
        batch_size: Examples per batch (the last batch may be smaller).
        shuffle: Draw a random order.
        generator: The generator the order is drawn from.

    Yields:
        ``(x, y)`` batches.

    Raises:
        RankbenchError: ``batch_size`` is below 1.
    """
    if batch_size < 1:
        raise RankbenchError(f"batch size must be at least 1, got {batch_size}: pass a positive batch size")
    n = len(split)
    if shuffle:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            yield split.x[idx], split.y[idx]
    else:
        for start in range(0, n, batch_size):
            yield split.x[start : start + batch_size], split.y[start : start + batch_size]


def make_data_folder(directory: Path) -> None:
    """Create a dataset folder (and its parents); failure is a one-line error naming the fix."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RankbenchError(
            f"could not create {directory} ({exc.strerror or exc}): set RANKBENCH_DATA_DIR to a writable directory"
        ) from exc


def download_file(url: str, target: Path, timeout_s: float, md5: str | None = None, what: str | None = None) -> Path:
    """Fetch ``url`` to ``target`` via a temp file + rename, so an interrupted download never
    leaves a half-written file that looks complete; with ``md5``, a file whose digest differs
    is discarded with an error. ``what`` names what to copy by hand if it fails (default: the file's name).

    Args:
        url: What to fetch.
        target: The file to write (its folder is created).
        timeout_s: Network timeout in seconds.
        md5: Expected MD5 hex digest, or ``None``.
        what: What to copy by hand if the download fails.

    Returns:
        ``target``.

    Raises:
        RankbenchError: The download failed, its MD5 differs, or the folder cannot
            be created; the message names what to do instead.
    """
    directory = target.parent
    make_data_folder(directory)
    fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{target.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        digest = hashlib.md5()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout_s) as response:
            while chunk := response.read(1 << 20):
                out.write(chunk)
                digest.update(chunk)
        if md5 is not None and digest.hexdigest() != md5:
            raise RankbenchError(f"downloaded {url} has MD5 {digest.hexdigest()}, expected {md5}: re-run --download")
        os.replace(tmp, target)
    except (urllib.error.URLError, HTTPException, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
        raise RankbenchError(
            f"could not download {url} ({reason}): copy {what or target.name} to {directory} by hand"
        ) from exc
    finally:
        tmp.unlink(missing_ok=True)
    return target
