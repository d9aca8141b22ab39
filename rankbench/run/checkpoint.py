"""Per-epoch checkpoints of a run, so a crashed or killed run resumes where it stopped.

A checkpoint holds everything the next epoch depends on: the model (selectors
included), the optimizer, the scheduler, the method's own state (``Method.state_dict``:
gate fixing, MARS's temperature), every random number generator (torch's, CUDA's,
the data-order generator) and the epoch history. It is written after every epoch
with a temporary file and a rename, so a crash never leaves a half-written one; a
resumed run then ends with the same metrics, ranks and weights as an uninterrupted
one (on a CPU, bit for bit).
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rankbench.errors import RankbenchError


@dataclass
class Checkpoint:
    """The state after ``epoch`` finished epochs."""

    epoch: int
    model: dict[str, Any]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any] | None
    method: dict[str, Any]
    torch_rng: torch.Tensor
    data_rng: torch.Tensor
    cuda_rng: list[torch.Tensor] = field(default_factory=list)
    history: list[dict[str, float]] = field(default_factory=list)
    train_seconds: float = 0.0
    """Seconds spent in the training loop up to here, over every attempt (a resumed run logs the sum)."""
    wall_seconds: float = 0.0
    """Wall seconds of the run up to here, over every attempt."""
    step: int | None = None
    """Optimizer steps so far (None in checkpoints written before it was recorded: epochs × steps per epoch)."""


def save_checkpoint(checkpoint: Checkpoint, path: Path) -> None:
    """Write atomically: a temporary file in the same folder, then a rename over ``path``.

    ``torch.save`` reports a full disk as a ``RuntimeError`` (its zip writer's "enforce fail"),
    not an ``OSError``: either way the temporary file is removed, the previous checkpoint stays
    whole, and the error is one line naming the folder and its free space."""
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
        with os.fdopen(fd, "wb") as handle:
            torch.save(checkpoint.__dict__, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise RankbenchError(_write_failure(path, exc)) from None


def _write_failure(path: Path, exc: BaseException) -> str:
    free = _free_bytes(path.parent)
    if getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or (free is not None and free < 1 << 20):
        left = "" if free is None else f" ({free // 1024} KiB free)"
        return (f"cannot write checkpoint {path}: the disk holding {path.parent} is full{left}: free space there "
                "or move the store (--tracking-uri)")
    text = str(exc).strip()
    reason = getattr(exc, "strerror", None) or (text.splitlines()[0] if text else type(exc).__name__)
    return f"cannot write checkpoint {path} ({reason}): check that {path.parent} is writable"


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def load_checkpoint(path: Path) -> Checkpoint:
    if not path.is_file():
        raise RankbenchError(f"no checkpoint at {path}: the run finished, never completed an epoch, or its "
                             "checkpoint folder moved; start it again without --resume")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # a truncated or foreign file
        raise RankbenchError(f"cannot read checkpoint {path} ({type(exc).__name__}): start the run again "
                             "without --resume") from None
    return Checkpoint(**state)
