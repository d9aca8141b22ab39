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

import os
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


def save_checkpoint(checkpoint: Checkpoint, path: Path) -> None:
    """Write atomically: a temporary file in the same folder, then a rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(checkpoint.__dict__, handle)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise RankbenchError(f"cannot write checkpoint {path} ({exc.strerror or exc}): check that its folder is "
                             "writable and its disk has space") from None


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
