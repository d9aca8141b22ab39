"""Matched compression: find, for each method, the setting of its compression knob that reaches each
target compression, so that methods are compared at the same compressions (ShrinkBench's protocol).

A method declares its knob (``Method.compression_knob``: the hyperparameter, and whether raising it
raises the compression). Two searches:

- a uniform-rank method's compression is a property of the model alone, so ``uniform_rank_bracket``
  reads it off the model built on the ``meta`` device at every rank (nothing trained, nothing
  allocated) and returns the ranks on both sides of the target with the interpolation weight in
  log10(compression); a target no rank reaches exactly is reported as such;
- a learned method's compression is known only after training, so ``search_knob`` bisects the knob
  (in log space when it is declared so) over ``measure(value) -> compression`` (one training run of
  the search seed each) until a run lands within the tolerance, or its step budget ends.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from rankbench.layers.tensorized import count_parameters
from rankbench.plugins.method import Knob, Method
from rankbench.plugins.task import Task


@dataclass(frozen=True)
class RankBracket:
    """The uniform ranks around a target: ``above`` compresses at least as much as the target (a
    lower rank), ``below`` less; ``weight`` is where the target sits between them in log10(compression),
    0 at ``above``'s compression, 1 at ``below``'s: the interpolation a report of a uniform method at
    this target uses, and says it uses."""

    target: float
    above: int
    below: int
    above_compression: float
    below_compression: float

    @property
    def exact(self) -> bool:
        return self.above == self.below

    @property
    def weight(self) -> float:
        if self.exact:
            return 0.0
        span = math.log10(self.above_compression) - math.log10(self.below_compression)
        return (math.log10(self.above_compression) - math.log10(self.target)) / span


def uniform_compressions(task: Task, ranks: range) -> dict[int, float]:
    """Compression (dense parameters / tensorized parameters) of the task's model at every rank."""
    with torch.device("meta"):
        dense = count_parameters(task.dense_model())
        return {r: dense / count_parameters(task.tensorized_model(r)) for r in ranks}


def uniform_rank_bracket(compressions: dict[int, float], target: float) -> RankBracket:
    """The ranks whose compressions enclose ``target`` (one rank when one reaches it within 0.5 %)."""
    for rank, c in compressions.items():
        if abs(c / target - 1) <= 0.005:
            return RankBracket(target, rank, rank, c, c)
    above = [(c, r) for r, c in compressions.items() if c >= target]
    below = [(c, r) for r, c in compressions.items() if c < target]
    if not above or not below:
        reach = f"{min(compressions.values()):.3g}x to {max(compressions.values()):.3g}x"
        raise ValueError(f"no uniform rank in {min(compressions)}..{max(compressions)} brackets {target:g}x "
                         f"(they reach {reach})")
    (c_above, r_above), (c_below, r_below) = min(above), max(below)
    return RankBracket(target, r_above, r_below, c_above, c_below)


@dataclass(frozen=True)
class KnobInterval:
    """Where a knob is searched: its ``Hyper``'s ``search`` interval, log or linear, integer or not."""

    low: float
    high: float
    log: bool
    integer: bool

    @classmethod
    def of(cls, method: type[Method]) -> "KnobInterval":
        knob = method.compression_knob
        if knob is None:
            raise ValueError(f"method {method.name} declares no compression knob: its compression cannot be matched")
        hyper = method.hyperparameters[knob.name]
        if hyper.search is None or hyper.search.low is None or hyper.search.high is None:
            raise ValueError(f"method {method.name}'s knob {knob.name} declares no search interval")
        return cls(float(hyper.search.low), float(hyper.search.high), hyper.search.log, hyper.kind is int)


@dataclass
class KnobSearch:
    """A bisection of one knob toward one target: every (value, compression) it measured, in order."""

    knob: Knob
    target: float
    tolerance: float
    steps: list[tuple[float, float]] = field(default_factory=list)

    @property
    def best(self) -> tuple[float, float]:
        """The measured setting closest to the target in log compression."""
        return min(self.steps, key=lambda s: abs(math.log(s[1] / self.target)))

    @property
    def hit(self) -> bool:
        return bool(self.steps) and abs(self.best[1] / self.target - 1) <= self.tolerance


def search_knob(measure: Callable[[float], float], knob: Knob, interval: KnobInterval, target: float, *,
                tolerance: float = 0.1, max_steps: int = 8) -> KnobSearch:
    """Bisect ``knob`` over ``interval`` until ``measure(value)`` (the compression a run reaches) is
    within ``tolerance`` (relative) of ``target`` or ``max_steps`` runs were made. Assumes the
    compression moves monotonically with the knob, in the declared direction; when the target lies
    outside what the interval reaches, the search ends near its end and says so (``hit`` is False)."""
    low, high = interval.low, interval.high
    if not low < high:
        raise ValueError(f"the search interval for {knob.name} must have low < high, got [{low}, {high}]")
    if interval.log and low <= 0:
        raise ValueError(f"{knob.name} is searched in log space: its interval must be positive, got [{low}, {high}]")
    search = KnobSearch(knob, target, tolerance)

    def middle(a: float, b: float) -> float:
        value = math.sqrt(a * b) if interval.log else (a + b) / 2
        return float(round(value)) if interval.integer else value

    a, b = low, high
    for _ in range(max_steps):
        value = middle(a, b)
        if search.steps and any(v == value for v, _ in search.steps):
            break  # an integer knob has nowhere left to go
        compression = measure(value)
        search.steps.append((value, compression))
        if abs(compression / target - 1) <= tolerance:
            break
        too_little = compression < target
        if too_little == knob.increases_compression:
            a = value
        else:
            b = value
    return search
