"""Matched compression (rankbench/study/matched.py): a uniform rank's compression read off the model
with nothing trained, and a learned method's knob bisected toward a target compression."""

from __future__ import annotations

import math

import pytest

from rankbench.plugins.method import Knob
from rankbench.plugins.registry import Registry
from rankbench.run.config import make_config
from rankbench.study.matched import KnobInterval, search_knob, uniform_compressions, uniform_rank_bracket

REGISTRY = Registry.discover(entry_point_groups=False)


def lenet5():
    return REGISTRY.task("lenet5")(make_config(REGISTRY, "lenet5", "trn").task_params)


def test_uniform_ranks_compressions_are_read_off_the_model_and_bracket_a_target():
    compressions = uniform_compressions(lenet5(), range(2, 31))
    assert compressions[25] == pytest.approx(4.25, abs=0.01)  # the README's trn r25 row: 429,100 / 101,025
    assert all(compressions[r] > compressions[r + 1] for r in range(2, 30))  # lower rank, more compression
    bracket = uniform_rank_bracket(compressions, 20.0)
    assert bracket.below == bracket.above + 1 and bracket.above_compression >= 20.0 > bracket.below_compression
    assert 0.0 <= bracket.weight <= 1.0
    lerp = 10 ** (math.log10(bracket.above_compression) * (1 - bracket.weight)
                  + math.log10(bracket.below_compression) * bracket.weight)
    assert lerp == pytest.approx(20.0)
    exact = uniform_rank_bracket(compressions, compressions[10])
    assert exact.exact and exact.above == 10 and exact.weight == 0.0
    with pytest.raises(ValueError, match="brackets 5000x"):
        uniform_rank_bracket(compressions, 5000.0)


def test_a_knob_is_bisected_in_log_space_until_the_compression_is_within_the_tolerance():
    runs = []

    def measure(lam: float) -> float:  # compression grows like sqrt(lambda), as a learned method's might
        runs.append(lam)
        return 10.0 * math.sqrt(lam / 0.1)

    knob = Knob("lambda", increases_compression=True)
    search = search_knob(measure, knob, KnobInterval(1e-3, 10.0, log=True, integer=False), 40.0, tolerance=0.05)
    assert search.hit and abs(search.best[1] / 40.0 - 1) <= 0.05
    assert runs[0] == pytest.approx(math.sqrt(1e-3 * 10.0))  # the interval's geometric middle first
    assert len(search.steps) == len(runs) <= 8


def test_a_decreasing_integer_knob_stops_when_no_new_rank_is_left_and_says_it_missed():
    compressions = uniform_compressions(lenet5(), range(2, 31))
    knob = Knob("rank", increases_compression=False)
    target = (compressions[12] * compressions[13]) ** 0.5  # between two ranks: no rank is within 1 %
    search = search_knob(lambda r: compressions[int(r)], knob, KnobInterval(2, 30, log=False, integer=True),
                         target, tolerance=0.01)
    assert not search.hit
    assert int(search.best[0]) in (12, 13)
    assert len({v for v, _ in search.steps}) == len(search.steps)  # no rank trained twice


def test_an_unreachable_target_ends_near_the_intervals_end_and_is_not_a_hit():
    knob = Knob("lambda", increases_compression=True)
    search = search_knob(lambda lam: min(50.0, 100 * lam), knob, KnobInterval(0.01, 1.0, log=True, integer=False),
                         200.0, max_steps=6)
    assert not search.hit and len(search.steps) == 6 and search.best[0] > 0.5


def test_every_built_in_method_but_the_reference_declares_a_knob_with_a_search_interval():
    for name in sorted(REGISTRY.methods):
        method = REGISTRY.method(name)
        if method.role == "reference":
            assert method.compression_knob is None
            continue
        if method.compression_knob is None:
            continue  # declared as its plugin lands (mars: its prior)
        interval = KnobInterval.of(method)
        assert interval.low < interval.high
    with pytest.raises(ValueError, match="no compression knob"):
        KnobInterval.of(REGISTRY.method("dense"))
