"""How to split a layer's sizes into the modes of its tensorized cores.

A TT/TR embedding of a ``vocabulary × dimension`` table needs the vocabulary and
the dimension each written as a product of ``d`` modes. Balanced modes keep every
core small. A vocabulary size rarely factors well (25,002 = 2·3·3·463·3), so it is
padded up to the nearest size that does; the extra rows are never indexed.
"""

from __future__ import annotations

import itertools
import math

from rankbench.errors import RankbenchError


def _ratio(modes: tuple[int, ...]) -> float:
    return max(modes) / min(modes)


def balanced_modes(size: int, d: int) -> tuple[int, ...]:
    """The ``d`` factors of ``size`` (exactly) whose largest / smallest is least, in descending order,
    e.g. 256 → (8, 8, 4).

    Args:
        size: The size to factor (an embedding dimension).
        d: Number of modes.

    Returns:
        ``d`` positive factors whose product is ``size``.

    Raises:
        RankbenchError: ``size`` or ``d`` is below 1.
    """
    if size < 1 or d < 1:
        raise RankbenchError(f"cannot split {size} into {d} modes: both must be positive")

    def splits(n: int, parts: int, smallest: int) -> list[tuple[int, ...]]:
        if parts == 1:
            return [(n,)] if n >= smallest else []
        out = []
        for f in range(smallest, math.isqrt(n) + 1 if parts == 2 else int(round(n ** (1 / parts))) + 2):
            if n % f == 0:
                out += [(f, *rest) for rest in splits(n // f, parts - 1, f)]
        return out

    options = splits(size, d, 1)
    return tuple(sorted(min(options, key=_ratio), reverse=True))


def padded_modes(size: int, d: int, max_ratio: float = 2.0) -> tuple[int, ...]:
    """``d`` modes whose product is the smallest at or above ``size`` with largest / smallest at most
    ``max_ratio`` (ties: the more balanced), in descending order; e.g. 25,002 → (37, 26, 26), 25,012 rows.

    Args:
        size: The size to cover (a vocabulary); the extra rows are never indexed.
        d: Number of modes.
        max_ratio: Largest allowed ratio of the largest to the smallest mode.

    Returns:
        ``d`` modes whose product is at least ``size`` (``balanced_modes(size, d)`` when
        no padded choice meets ``max_ratio``).

    Raises:
        RankbenchError: ``size`` or ``d`` is below 1.
    """
    if size < 1 or d < 1:
        raise RankbenchError(f"cannot split {size} into {d} modes: both must be positive")
    if d == 1:
        return (size,)
    root = size ** (1 / d)
    low, high = max(1, math.floor(root / max_ratio)), math.ceil(root * max_ratio) + 1
    best: tuple[int, ...] | None = None
    for head in itertools.combinations_with_replacement(range(low, high + 1), d - 1):
        last = max(head[-1], math.ceil(size / math.prod(head)))
        modes = (*head, last)
        if _ratio(modes) > max_ratio:
            continue
        key = (math.prod(modes), _ratio(modes))
        if best is None or key < (math.prod(best), _ratio(best)):
            best = modes
    if best is None:
        return balanced_modes(size, d)
    return tuple(sorted(best, reverse=True))
