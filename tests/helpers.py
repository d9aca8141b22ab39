"""Shared test helpers: tiny IDX datasets (random pixels, so runs are fast) and error-line checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def interrupting_log_metrics(at: int):
    """A ``Tracker.log_metrics`` that raises ``KeyboardInterrupt`` (Ctrl-C) when epoch ``at`` is logged,
    after that epoch's checkpoint is written: monkeypatch it onto ``Tracker`` to stop a run there."""
    import rankbench.run.tracking

    real = rankbench.run.tracking.Tracker.log_metrics

    def log_metrics(self, run_id, metrics, step=None):
        if step == at:
            raise KeyboardInterrupt
        return real(self, run_id, metrics, step)

    return log_metrics


def toml_module():
    """``tomllib`` (Python 3.11+), else its backport ``tomli`` (Python 3.10)."""
    try:
        import tomllib
    except ModuleNotFoundError:
        import tomli as tomllib
    return tomllib


def write_idx(path: Path, magic: int, array: np.ndarray) -> None:
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def make_tiny_mnist(root: Path, n_train: int = 200, n_test: int = 40, *, bad_magic: str | None = None,
                    name: str = "mnist") -> Path:
    """Random IDX files under ``root/name`` (train 160 / val 40 / test 40 with val_size=40);
    ``bad_magic`` names one file written with a wrong magic number."""
    rng = np.random.default_rng(0)
    folder = root / name
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


def make_tiny_cifar10(root: Path, per_batch: int = 24, n_test: int = 24, *, learnable: bool = False) -> Path:
    """CIFAR-10 python batches under ``root/cifar10/cifar-10-batches-py``, pickled like the
    originals (protocol 2, dicts with bytes keys). ``learnable``: each class is one colour
    plus noise, so a short run can learn it."""
    import pickle

    rng = np.random.default_rng(0)
    folder = root / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)

    def batch(n: int) -> dict:
        labels = rng.integers(0, 10, n)
        if learnable:
            colours = np.linspace(20, 235, 10)
            base = np.stack([colours[labels], colours[::-1][labels], colours[(labels * 3) % 10]], 1)
            images = base[:, :, None] + rng.normal(0, 20, (n, 3, 1024))
            data = np.clip(images, 0, 255).astype(np.uint8).reshape(n, 3072)
        else:
            data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        return {b"batch_label": b"tiny", b"labels": [int(v) for v in labels], b"data": data,
                b"filenames": [b"x.png"] * n}

    for i in range(1, 6):
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch(per_batch), protocol=2))
    (folder / "test_batch").write_bytes(pickle.dumps(batch(n_test), protocol=2))
    return root
