"""Shared test helpers: tiny IDX datasets (random pixels, so runs are fast) and error-line checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_idx(path: Path, magic: int, array: np.ndarray) -> None:
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def make_tiny_mnist(root: Path, n_train: int = 200, n_test: int = 40, *, bad_magic: str | None = None) -> Path:
    """Random IDX files under ``root/mnist`` (train 160 / val 40 / test 40 with val_size=40);
    ``bad_magic`` names one file written with a wrong magic number."""
    rng = np.random.default_rng(0)
    folder = root / "mnist"
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "train-images-idx3-ubyte": (2051, rng.integers(0, 256, (n_train, 28, 28))),
        "train-labels-idx1-ubyte": (2049, rng.integers(0, 10, n_train)),
        "t10k-images-idx3-ubyte": (2051, rng.integers(0, 256, (n_test, 28, 28))),
        "t10k-labels-idx1-ubyte": (2049, rng.integers(0, 10, n_test)),
    }
    for name, (magic, array) in files.items():
        write_idx(folder / name, 1234 if name == bad_magic else magic, array)
    return root


def assert_one_line_error(err: str) -> str:
    """stderr is exactly one line, a ``rankbench: error:`` line, without a traceback."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("rankbench: error: "), err
    assert "Traceback" not in err
    return lines[0]
