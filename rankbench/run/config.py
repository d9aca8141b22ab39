"""The validated configuration of one experiment: what the CLI or a caller asks for, checked before any work."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rankbench.errors import RankbenchError


# Hyperparameters that name a configuration in run names and report rows.
KEY_HYPERPARAMETERS = ("lambda", "sigma", "rank", "mode", "target_compression", "samples")


def parse_budget(text: str | None) -> int | None:
    """``--budget steps=N`` → N (the number of optimizer steps to train for)."""
    if text is None:
        return None
    key, sep, value = text.partition("=")
    if key.strip() != "steps" or not sep:
        raise RankbenchError(f"--budget {text!r}: write steps=N, e.g. --budget steps=70000")
    try:
        steps = int(value)
    except ValueError:
        raise RankbenchError(f"--budget {text!r}: N must be an integer") from None
    if steps < 1:
        raise RankbenchError("--budget steps=N: N must be >= 1")
    return steps


@dataclass(frozen=True)
class RunConfig:
    """Everything one ``rankbench run`` needs, validated before any run starts."""

    task: str
    method: str
    task_params: dict[str, Any]
    method_params: dict[str, Any]
    seeds: tuple[int, ...] = (0,)
    device: str = "auto"
    data_dir: Path | None = None
    download: bool = False
    tracking_uri: str | None = None
    experiment: str | None = None
    threads: int | None = None
    tags: dict[str, str] = field(default_factory=dict)
    progress: bool = True
    explicit: frozenset[str] = frozenset()
    contraction: str = "auto"
    budget_steps: int | None = None
