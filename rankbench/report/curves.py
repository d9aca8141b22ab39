"""Accuracy-vs-compression curves compared the way ShrinkBench asks (Blalock et al., 2020): at matched
compression targets, point by point with corrected tests, and as whole curves.

A method's curve is its seeds' test accuracies at each target it was tuned to reach. Single points at
different compressions cannot be ranked; these summaries can:

- ``area_under_curve``: the mean accuracy over a common range of log10(compression) (the area under
  the curve divided by the range's width, so it reads as an accuracy), with a bootstrap confidence
  interval that resamples each point's seeds (``bootstrap_area``);
- ``hypervolume``: the 2-D area a set of (compression, accuracy) points dominates above a stated
  reference point, compression in log10;
- ``compare_at_targets``: Welch's t and Mann-Whitney U at each target, Holm-corrected over targets.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class CurvePoint:
    """One matched target of one method: the compressions its seeds reached and their accuracies."""

    target: float
    compressions: tuple[float, ...]
    accuracies: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.compressions) != len(self.accuracies) or not self.accuracies:
            raise ValueError("a curve point needs one compression per accuracy, and at least one seed")

    @property
    def compression(self) -> float:
        """The geometric mean of the seeds' compressions (the point's place on a log axis)."""
        return float(math.exp(np.mean(np.log(self.compressions))))

    @property
    def accuracy(self) -> float:
        return float(np.mean(self.accuracies))


def _sorted(points: Sequence[CurvePoint]) -> list[CurvePoint]:
    return sorted(points, key=lambda p: p.compression)


def common_range(curves: Mapping[str, Sequence[CurvePoint]]) -> tuple[float, float]:
    """The compressions every curve spans: from the largest of the curves' lowest to the smallest of
    their highest (an error when they do not overlap)."""
    low = max(min(p.compression for p in points) for points in curves.values())
    high = min(max(p.compression for p in points) for points in curves.values())
    if not low < high:
        raise ValueError(f"the curves share no range of compression (lowest common {low:.3g}x, highest {high:.3g}x)")
    return low, high


def area_under_curve(points: Sequence[CurvePoint], low: float, high: float,
                     accuracies: Sequence[float] | None = None) -> float:
    """Mean accuracy over log10(compression) in [low, high], linear between points (trapezoids), read
    off the interpolated curve at the ends. ``accuracies`` replaces the points' means (a bootstrap draw)."""
    ordered = _sorted(points)
    x = np.log10([p.compression for p in ordered])
    y = np.array([p.accuracy for p in ordered] if accuracies is None else
                 [accuracies[points.index(p)] for p in ordered])
    a, b = math.log10(low), math.log10(high)
    if a < x[0] - 1e-12 or b > x[-1] + 1e-12:
        raise ValueError(f"[{low:.3g}x, {high:.3g}x] is outside the curve's {10 ** x[0]:.3g}x to {10 ** x[-1]:.3g}x")
    inside = x[(x > a) & (x < b)]
    grid = np.concatenate([[a], inside, [b]])
    values = np.interp(grid, x, y)
    return float(np.sum((values[1:] + values[:-1]) / 2 * np.diff(grid)) / (b - a))


@dataclass(frozen=True)
class Area:
    """A curve's mean accuracy over the common range, and its bootstrap confidence interval."""

    estimate: float
    low: float
    high: float
    level: float


def bootstrap_area(points: Sequence[CurvePoint], low: float, high: float, *, resamples: int = 2000,
                   level: float = 0.95, seed: int = 0) -> Area:
    """``area_under_curve`` with a percentile bootstrap interval: each draw resamples every point's
    seeds with replacement (seeded, so one seed gives one interval)."""
    generator = np.random.default_rng(seed)
    draws = np.empty(resamples)
    for i in range(resamples):
        means = [float(np.mean(generator.choice(p.accuracies, size=len(p.accuracies)))) for p in points]
        draws[i] = area_under_curve(points, low, high, means)
    tail = (1 - level) / 2
    return Area(area_under_curve(points, low, high), float(np.quantile(draws, tail)),
                float(np.quantile(draws, 1 - tail)), level)


def hypervolume(points: Sequence[tuple[float, float]], reference: tuple[float, float]) -> float:
    """The area the (compression, accuracy) points dominate, both maximised, above ``reference``,
    compression in log10 (an accuracy-times-decades area). Points not above the reference add nothing."""
    ref_x, ref_y = math.log10(reference[0]), reference[1]
    front = sorted(((math.log10(c), a) for c, a in points if math.log10(c) > ref_x and a > ref_y), reverse=True)
    area, best = 0.0, ref_y
    for x, y in front:
        if y > best:
            area += (x - ref_x) * (y - best)
            best = y
    return area


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment: family-wise error controlled over the tests, adjusted p in input order."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted = [0.0] * len(p_values)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


@dataclass(frozen=True)
class TargetComparison:
    """Method ``a`` against ``b`` at one target: the mean difference and the tests' p, raw and Holm-adjusted."""

    target: float
    a: str
    b: str
    difference: float
    p_welch: float
    p_mwu: float
    p_welch_holm: float
    p_mwu_holm: float
    n_a: int = 0
    n_b: int = 0

    @property
    def mwu_can_confirm(self) -> bool:
        """Whether Mann-Whitney's two-sided p can fall below 5 % at all with these seeds: its smallest
        value is 2 / C(n_a + n_b, n_a), 0.1 for 3 seeds against 3, so with so few seeds it cannot."""
        return self.n_a > 0 and self.n_b > 0 and 2 / math.comb(self.n_a + self.n_b, self.n_a) < 0.05

    @property
    def winner(self) -> str | None:
        """The better method where the corrected tests say the difference is real at 5 %: Welch's, and
        Mann-Whitney's too where it can reach 5 % with these seeds (``decided_by`` says which), else None."""
        if self.p_welch_holm < 0.05 and (self.p_mwu_holm < 0.05 or not self.mwu_can_confirm):
            return self.a if self.difference > 0 else self.b
        return None

    @property
    def decided_by(self) -> str:
        """``both`` or ``Welch only`` (Mann-Whitney cannot reach 5 % with these seeds), for a winner."""
        return "both" if self.mwu_can_confirm else "Welch only"


def welch_p(x: Sequence[float], y: Sequence[float]) -> float:
    """Welch's two-sided t-test p-value, quiet where a side has no spread (a collapsed method: every seed
    at chance), where scipy warns of precision loss but the p-value stands."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Precision loss occurred", RuntimeWarning)
        return float(stats.ttest_ind(x, y, equal_var=False).pvalue)


def compare_at_targets(curves: Mapping[str, Sequence[CurvePoint]], a: str, b: str) -> list[TargetComparison]:
    """Welch's t and Mann-Whitney U (two-sided) on the seeds' accuracies at every target both methods
    reached, each family Holm-corrected over those targets."""
    at_a = {p.target: p for p in curves[a]}
    at_b = {p.target: p for p in curves[b]}
    targets = sorted(set(at_a) & set(at_b))
    raw = []
    for target in targets:
        x, y = at_a[target].accuracies, at_b[target].accuracies
        welch = welch_p(x, y) if min(len(x), len(y)) > 1 else 1.0
        mwu = float(stats.mannwhitneyu(x, y, alternative="two-sided").pvalue)
        raw.append((target, float(np.mean(x) - np.mean(y)), 1.0 if math.isnan(welch) else welch, mwu))
    welch_holm = holm([r[2] for r in raw])
    mwu_holm = holm([r[3] for r in raw])
    return [TargetComparison(t, a, b, d, pw, pm, wh, mh, len(at_a[t].accuracies), len(at_b[t].accuracies))
            for (t, d, pw, pm), wh, mh in zip(raw, welch_holm, mwu_holm)]


@dataclass(frozen=True)
class Summary:
    """A row of a report: the mean and sample std of n seeds' accuracies at a (geometric-mean) compression."""

    compression: float
    mean: float
    std: float
    n: int


@dataclass(frozen=True)
class CurveGap:
    """A point against a curve read at the point's own compression: the curve's interpolated mean and std,
    the difference, and Welch's p from the summaries."""

    point: Summary
    curve_mean: float
    curve_std: float
    difference: float
    p_welch: float
    between: tuple[float, float]
    """The curve's compressions on both sides of the point."""


def gap_to_curve(point: Summary, curve: Sequence[Summary]) -> CurveGap:
    """``point`` against ``curve`` (e.g. uniform TRN over its ranks) interpolated linearly in log10
    compression at the point's compression: mean (1-w)·m₁ + w·m₂, std √((1-w)²s₁² + w²s₂²) (the two
    curve points' seeds taken as independent), n the smaller n of the two. Welch's t from these
    summaries (``scipy.stats.ttest_ind_from_stats``), so it also works where only mean±std was kept.
    A point outside the curve's range is an error: extrapolating a trade-off curve says nothing."""
    ordered = sorted(curve, key=lambda s: s.compression)
    for low, high in zip(ordered, ordered[1:]):
        if low.compression <= point.compression <= high.compression:
            span = math.log10(high.compression) - math.log10(low.compression)
            w = 0.0 if span == 0 else (math.log10(point.compression) - math.log10(low.compression)) / span
            mean = (1 - w) * low.mean + w * high.mean
            std = math.sqrt((1 - w) ** 2 * low.std ** 2 + w ** 2 * high.std ** 2)
            n = min(low.n, high.n)
            p = float(stats.ttest_ind_from_stats(point.mean, point.std, point.n, mean, std, n, equal_var=False).pvalue)
            return CurveGap(point, mean, std, point.mean - mean, 1.0 if math.isnan(p) else p,
                            (low.compression, high.compression))
    reach = f"{ordered[0].compression:.3g}x to {ordered[-1].compression:.3g}x" if ordered else "nothing"
    raise ValueError(f"the point at {point.compression:.3g}x lies outside the curve ({reach}): add a curve point "
                     "beyond it")
