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
from collections.abc import Callable
from dataclasses import dataclass, field

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
    def of(cls, method: type[Method]) -> KnobInterval:
        knob = method.compression_knob
        if knob is None:
            raise ValueError(f"method {method.name} declares no compression knob: its compression cannot be matched")
        hyper = method.hyperparameters[knob.name]
        if hyper.search is None or hyper.search.low is None or hyper.search.high is None:
            raise ValueError(f"method {method.name}'s knob {knob.name} declares no search interval")
        return cls(float(hyper.search.low), float(hyper.search.high), hyper.search.log, hyper.kind is int)


@dataclass
class KnobSearch:
    """The search of one knob toward one target: every (value, compression) measured while it ran,
    in order, and the setting chosen (the measured one closest to the target in log compression, among
    every measurement of the method, which searches for earlier targets made too)."""

    knob: Knob
    target: float
    tolerance: float
    steps: list[tuple[float, float]] = field(default_factory=list)
    chosen: tuple[float, float] | None = None

    @property
    def best(self) -> tuple[float, float]:
        if self.chosen is not None:
            return self.chosen
        return min(self.steps, key=lambda s: abs(math.log(s[1] / self.target)))

    @property
    def hit(self) -> bool:
        return (bool(self.steps) or self.chosen is not None) and abs(self.best[1] / self.target - 1) <= self.tolerance


def _coordinate(value: float, interval: KnobInterval) -> float:
    return math.log(value) if interval.log else value


def _value(x: float, interval: KnobInterval) -> float:
    value = min(max(math.exp(x) if interval.log else x, interval.low), interval.high)
    return float(round(value)) if interval.integer else float(f"{value:.4g}")


def next_value(measured: dict[float, float], knob: Knob, interval: KnobInterval, target: float,
               step_factor: float = 4.0) -> float | None:
    """The next knob value to measure for ``target`` given every ``measured`` value → compression, or
    None when there is nowhere left to go (the interval's end is measured and misses, or an integer
    knob has no untried value between two brackets).

    Between two measured values whose compressions enclose the target, the value is interpolated
    linearly in (knob coordinate, log compression), the knob coordinate being log when the knob is
    searched in log space, and kept at least 10 % of the bracket from either end (regula falsi that
    cannot stall). Outside every measurement it extrapolates from the two nearest values (at most
    ``step_factor`` times, at least 1.5 times, further in log space; a quarter of the interval linearly),
    or steps ``step_factor`` from the only one."""
    if not measured:
        raise ValueError("next_value needs one measured value to start from")
    ordered = sorted(measured.items())
    sign = 1.0 if knob.increases_compression else -1.0
    wanted = math.log(target)
    # the knob coordinate at which each measured value's log compression sits, in the increasing direction
    points = [(_coordinate(v, interval), sign * math.log(c)) for v, c in ordered]
    goal = sign * wanted
    below = [p for p in points if p[1] < goal]
    above = [p for p in points if p[1] >= goal]
    if below and above:
        (x1, y1) = max(below, key=lambda p: p[0])
        (x2, y2) = min(above, key=lambda p: p[0])
        if x2 <= x1 or y2 == y1:  # noise broke the monotone order: halve the gap between the two
            x = (x1 + x2) / 2
        else:
            x = x1 + (goal - y1) * (x2 - x1) / (y2 - y1)
            margin = 0.1 * (x2 - x1)
            x = min(max(x, x1 + margin), x2 - margin)
    else:
        lo_c, hi_c = _coordinate(interval.low, interval), _coordinate(interval.high, interval)
        span = (hi_c - lo_c) / 4 if not interval.log else math.log(step_factor)
        if below:  # every measurement compresses too little: go up the knob's increasing direction
            (x0, y0) = max(below, key=lambda p: p[1])
            direction = 1.0
        else:
            (x0, y0) = min(above, key=lambda p: p[1])
            direction = -1.0
        step = span
        others = [p for p in points if p[0] != x0]
        if others and interval.log:
            (x1, y1) = min(others, key=lambda p: abs(p[0] - x0))
            if y1 != y0 and (x0 - x1) * (y0 - y1) > 0:  # the measured slope, where it points the right way
                step = min(max(abs((goal - y0) * (x0 - x1) / (y0 - y1)), math.log(1.5)), math.log(step_factor))
        x = x0 + direction * step
    value = _value(x, interval)
    if value in measured and interval.integer and below and above:  # the nearest untried rank inside the bracket
        ends = sorted(math.exp(e) if interval.log else e for e in (x1, x2))
        inside = [float(r) for r in range(round(ends[0]) + 1, round(ends[1])) if float(r) not in measured]
        return min(inside, key=lambda r: abs(_coordinate(r, interval) - x)) if inside else None
    if value in measured and not (below and above):  # noise pointed back: try the interval's end that way
        end = _value(_coordinate(interval.high if direction > 0 else interval.low, interval), interval)
        return None if end in measured else end
    return None if value in measured else value


def search_targets(measure: Callable[[float], float], knob: Knob, interval: KnobInterval, targets: list[float],
                   start: float, *, tolerance: float = 0.1, max_runs: int = 5,
                   measured: dict[float, float] | None = None) -> dict[float, KnobSearch]:
    """Find, for every target, the knob setting whose run reaches it within ``tolerance`` (relative):
    measure ``start``, then for each target (ascending) measure ``next_value`` until a measurement
    (of any target's search) is within the tolerance, ``max_runs`` new runs were made for it, or there
    is nowhere left to go; then choose the measurement closest to the target (``hit`` says whether it is
    within the tolerance). Assumes the compression moves monotonically with the knob, in the declared
    direction; one run's compression is noisy, so the tolerance should be wider than that noise.

    ``measured`` (knob value -> compression, e.g. read back from the store) answers ``measure`` for the
    values it holds, nothing more: the search takes the same steps as when they were first measured, so
    a resumed search, or its replay that trains nothing, ends where the first one did, even where a
    target's search ran out of ``max_runs`` before hitting it (had the values measured later for other
    targets steered it, the replay would ask for values never trained)."""
    if not interval.low < interval.high:
        raise ValueError(f"the search interval for {knob.name} must have low < high, got "
                         f"[{interval.low}, {interval.high}]")
    if interval.log and interval.low <= 0:
        raise ValueError(f"{knob.name} is searched in log space: its interval must be positive, got "
                         f"[{interval.low}, {interval.high}]")
    known = dict(measured or {})
    measured: dict[float, float] = {}
    order: list[float] = []
    start = _value(_coordinate(start, interval), interval)

    def take(value: float, search: KnobSearch) -> None:
        if value not in measured:
            measured[value] = float(known[value]) if value in known else float(measure(value))
            order.append(value)
        search.steps.append((value, measured[value]))

    searches = {}
    for target in sorted(targets):
        search = KnobSearch(knob, target, tolerance)
        searches[target] = search
        if not order:
            take(start, search)
        runs = 0
        while runs < max_runs:
            if any(abs(c / target - 1) <= tolerance for c in measured.values()):
                break
            value = next_value(measured, knob, interval, target)
            if value is None:
                break
            take(value, search)
            runs += 1
        search.chosen = min(((v, measured[v]) for v in order), key=lambda s: abs(math.log(s[1] / target)))
    return searches
