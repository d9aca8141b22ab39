"""Matched compression (rankbench/study/matched.py): a uniform rank's compression read off the model
with nothing trained, and a learned method's knob searched toward each target compression."""

from __future__ import annotations

import math

import pytest

from rankbench.plugins.method import Knob
from rankbench.plugins.registry import Registry
from rankbench.run.config import make_config
from rankbench.study.matched import KnobInterval, search_targets, uniform_compressions, uniform_rank_bracket

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


def test_a_knob_is_searched_in_log_space_until_each_target_is_within_the_tolerance():
    runs = []

    def measure(lam: float) -> float:  # compression grows like sqrt(lambda), as a learned method's might
        runs.append(lam)
        return 10.0 * math.sqrt(lam / 0.1)

    knob = Knob("lambda", increases_compression=True)
    targets = [5.0, 20.0, 40.0, 80.0]
    searches = search_targets(measure, knob, KnobInterval(1e-3, 10.0, log=True, integer=False), targets, 1.0,
                              tolerance=0.05)
    assert runs[0] == 1.0  # the start (the method's default) first
    for target in targets:
        assert searches[target].hit and abs(searches[target].best[1] / target - 1) <= 0.05
    assert len(runs) == len(set(runs)) <= 3 * len(targets)  # no value trained twice, a few runs per target
    # a power law is a line in (log knob, log compression): once bracketed, one interpolation hits it
    assert len(searches[40.0].steps) <= 2


def test_measurements_are_shared_between_targets_and_with_an_earlier_search():
    runs = []

    def measure(lam: float) -> float:
        runs.append(lam)
        return 10.0 * math.sqrt(lam / 0.1)

    knob = Knob("lambda", increases_compression=True)
    interval = KnobInterval(1e-3, 10.0, log=True, integer=False)
    first = search_targets(measure, knob, interval, [20.0], 1.0, tolerance=0.05)
    measured = {v: c for s in first.values() for v, c in s.steps}
    count = len(runs)
    again = search_targets(measure, knob, interval, [20.0], 1.0, tolerance=0.05, measured=measured)
    assert len(runs) == count and again[20.0].best == first[20.0].best  # a replay trains nothing


def test_the_replay_of_a_search_that_ran_out_of_runs_asks_for_nothing_new():
    """One run per target, none hitting: had the replay seen the later targets' runs while searching the
    first, it would have asked for values never trained (what a study's board build does: it raised)."""
    runs = []

    def measure(value: float) -> float:
        runs.append(value)
        return 3.0 * value ** 0.7

    def untrained(value: float) -> float:
        raise AssertionError(f"the replay asked for lambda={value}, never trained")

    knob = Knob("lambda", increases_compression=True)
    interval = KnobInterval(1e-3, 10.0, log=True, integer=False)
    first = search_targets(measure, knob, interval, [10.0, 20.0, 40.0], 0.2, tolerance=0.01, max_runs=1)
    assert not all(s.hit for s in first.values()) and len(runs) == 4  # the start, then one run per target
    measured = {v: c for s in first.values() for v, c in s.steps}
    again = search_targets(untrained, knob, interval, [10.0, 20.0, 40.0], 0.2, tolerance=0.01, max_runs=1,
                           measured=measured)
    assert {t: (s.steps, s.chosen) for t, s in again.items()} == {t: (s.steps, s.chosen) for t, s in first.items()}


def test_a_decreasing_integer_knob_stops_when_no_new_rank_is_left_and_says_it_missed():
    compressions = uniform_compressions(lenet5(), range(2, 31))
    knob = Knob("rank", increases_compression=False)
    target = (compressions[12] * compressions[13]) ** 0.5  # between two ranks: no rank is within 1 %
    trained = []

    def measure(r: float) -> float:
        trained.append(int(r))
        return compressions[int(r)]

    search = search_targets(measure, knob, KnobInterval(2, 30, log=False, integer=True), [target], 10,
                            tolerance=0.01, max_runs=20)[target]
    assert not search.hit
    assert int(search.best[0]) in (12, 13)
    assert len(set(trained)) == len(trained)  # no rank trained twice
    assert {12, 13} <= set(trained)  # it stopped because nothing is left between the two


def test_an_unreachable_target_ends_at_the_intervals_end_and_is_not_a_hit():
    knob = Knob("lambda", increases_compression=True)
    searches = search_targets(lambda lam: min(50.0, 100 * lam), knob,
                              KnobInterval(0.01, 1.0, log=True, integer=False), [200.0], 0.1, max_runs=6)
    assert not searches[200.0].hit and searches[200.0].best[0] == 1.0
    assert len(searches[200.0].steps) < 7  # it stopped at the end, not after every run it was allowed


def test_noise_that_breaks_the_monotone_order_does_not_stall_the_search():
    values = iter([8.0, 30.0, 12.0, 26.0, 19.5])
    knob = Knob("lambda", increases_compression=True)
    searches = search_targets(lambda lam: next(values), knob, KnobInterval(1e-3, 10.0, log=True, integer=False),
                              [20.0], 0.5, tolerance=0.05, max_runs=4)
    assert searches[20.0].hit and searches[20.0].best[1] == 19.5


def test_every_built_in_method_but_the_reference_declares_a_knob_with_a_search_interval():
    for name in sorted(REGISTRY.methods):
        method = REGISTRY.method(name)
        if method.role == "reference":
            assert method.compression_knob is None
            continue
        interval = KnobInterval.of(method)
        assert interval.low < interval.high
    with pytest.raises(ValueError, match="no compression knob"):
        KnobInterval.of(REGISTRY.method("dense"))


def test_a_knob_whose_compression_moved_the_wrong_way_is_tried_at_the_intervals_end_before_giving_up():
    compressions = {0.1: 232.0, 0.4: 344.0, 0.5: 300.0}  # MARS on mlp2: a higher prior, yet more compression
    knob = Knob("prior", increases_compression=False)
    searches = search_targets(lambda p: compressions[p], knob, KnobInterval(1e-3, 0.5, log=True, integer=False),
                              [10.0], 0.1, max_runs=4)
    assert [v for v, _ in searches[10.0].steps] == [0.1, 0.4, 0.5]
    assert not searches[10.0].hit and searches[10.0].best == (0.1, 232.0)
