"""Matched-compression curve statistics (rankbench/report/curves.py): whole-curve areas with bootstrap
intervals, hypervolume, and per-target tests Holm-corrected over targets."""

from __future__ import annotations

import math

import pytest

from rankbench.report.curves import (
    CurvePoint,
    area_under_curve,
    bootstrap_area,
    common_range,
    compare_at_targets,
    holm,
    hypervolume,
)


def point(target: float, accuracies: list[float], compression: float | None = None) -> CurvePoint:
    return CurvePoint(target, tuple([compression or target] * len(accuracies)), tuple(accuracies))


def test_the_area_is_the_mean_accuracy_over_log_compression():
    flat = [point(5, [90.0]), point(50, [90.0])]
    assert area_under_curve(flat, 5, 50) == pytest.approx(90.0)
    falling = [point(10, [90.0]), point(100, [80.0]), point(1000, [60.0])]
    # trapezoids in log10: (90+80)/2 over one decade, (80+60)/2 over the next
    assert area_under_curve(falling, 10, 1000) == pytest.approx((85.0 + 70.0) / 2)
    # a sub-range is read off the interpolated curve: at 10^1.5 the accuracy is 85
    assert area_under_curve(falling, 10, 10 ** 1.5) == pytest.approx((90.0 + 85.0) / 2)
    with pytest.raises(ValueError, match="outside"):
        area_under_curve(falling, 5, 100)


def test_the_common_range_is_where_every_curve_has_points():
    curves = {"a": [point(5, [1.0]), point(40, [1.0])], "b": [point(10, [1.0]), point(80, [1.0])]}
    assert common_range(curves) == pytest.approx((10, 40))
    with pytest.raises(ValueError, match="share no range"):
        common_range({"a": [point(5, [1.0]), point(8, [1.0])], "b": [point(10, [1.0]), point(80, [1.0])]})


def test_a_points_place_is_the_geometric_mean_of_its_seeds_compressions():
    p = CurvePoint(20, (10.0, 40.0), (90.0, 92.0))
    assert p.compression == pytest.approx(20.0) and p.accuracy == 91.0


def test_the_bootstrap_interval_holds_the_estimate_is_seeded_and_narrows_with_agreeing_seeds():
    noisy = [point(5, [90.0, 94.0, 86.0]), point(20, [80.0, 88.0, 84.0]), point(80, [70.0, 60.0, 65.0])]
    area = bootstrap_area(noisy, 5, 80, resamples=500, seed=3)
    assert area.low <= area.estimate <= area.high and area.high - area.low > 1.0
    assert bootstrap_area(noisy, 5, 80, resamples=500, seed=3) == area
    agreeing = [point(5, [90.0] * 3), point(80, [70.0] * 3)]
    tight = bootstrap_area(agreeing, 5, 80, resamples=200)
    assert tight.low == tight.high == pytest.approx(80.0)


def test_hypervolume_counts_only_what_the_front_dominates_above_the_reference():
    front = [(10.0, 90.0), (100.0, 80.0), (30.0, 70.0)]  # the last is dominated by (100, 80)
    # decades above 1x: 2 at accuracy 80 over 50, and 1 more decade-wide strip from 80 to 90
    assert hypervolume(front, (1.0, 50.0)) == pytest.approx(2 * 30 + 1 * 10)
    assert hypervolume([(0.5, 99.0)], (1.0, 50.0)) == 0.0


def test_holm_adjusts_step_down_and_keeps_the_input_order():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5]) == [0.5]
    assert holm([0.9, 0.8]) == [1.0, 1.0]  # 2 x 0.8 caps at 1, and no adjusted p falls below an earlier one


def test_methods_are_compared_at_every_shared_target_with_corrected_tests():
    curves = {"ours": [point(10, [95.0, 95.5, 96.0, 95.2, 95.8]), point(40, [90.0, 89.0, 91.0, 90.5, 89.5]),
                       point(80, [80.0])],
              "trn": [point(10, [90.0, 90.5, 91.0, 90.2, 90.8]), point(40, [90.2, 89.4, 90.6, 90.0, 89.8])]}
    rows = compare_at_targets(curves, "ours", "trn")
    assert [r.target for r in rows] == [10, 40]  # 80x: trn has no point there
    first, second = rows
    assert first.difference == pytest.approx(5.0) and first.p_welch < 1e-4
    assert first.p_welch_holm == pytest.approx(2 * first.p_welch)  # the smaller of two p, times 2
    assert second.p_welch_holm == pytest.approx(max(second.p_welch, first.p_welch_holm))
    assert first.winner == "ours" and first.decided_by == "both"
    assert second.winner is None and second.p_welch > 0.5
    assert all(r.p_mwu_holm >= r.p_mwu and r.p_welch_holm >= r.p_welch for r in rows)
    assert not any(math.isnan(r.p_welch) for r in rows)


def test_with_three_seeds_a_side_welch_decides_alone_since_mann_whitney_cannot_reach_5_percent():
    curves = {"ours": [point(10, [95.0, 95.2, 95.1]), point(40, [90.0, 91.0, 89.0])],
              "trn": [point(10, [90.0, 90.1, 90.2]), point(40, [90.2, 89.0, 91.2])]}
    clear, unclear = compare_at_targets(curves, "ours", "trn")
    assert clear.p_mwu == pytest.approx(0.1) and not clear.mwu_can_confirm  # 2 / C(6, 3), its smallest value
    assert clear.p_welch_holm < 0.05 and clear.winner == "ours" and clear.decided_by == "Welch only"
    assert unclear.winner is None
    five = compare_at_targets({"a": [point(10, [1.0, 2, 3, 4, 5])], "b": [point(10, [6.0, 7, 8, 9, 10])]}, "a", "b")
    assert five[0].mwu_can_confirm and five[0].decided_by == "both" and five[0].winner == "b"


def test_a_point_is_compared_with_the_curve_read_at_its_own_compression():
    from rankbench.report.curves import Summary, gap_to_curve

    trn = [Summary(6.62, 90.40, 0.19, 3), Summary(11.72, 89.24, 0.18, 3), Summary(26.01, 88.10, 0.16, 3)]
    gap = gap_to_curve(Summary(9.81, 87.38, 0.57, 3), trn)
    w = (math.log10(9.81) - math.log10(6.62)) / (math.log10(11.72) - math.log10(6.62))
    assert gap.between == (6.62, 11.72)
    assert gap.curve_mean == pytest.approx((1 - w) * 90.40 + w * 89.24)
    assert gap.curve_std == pytest.approx(math.hypot((1 - w) * 0.19, w * 0.18))
    assert gap.difference == pytest.approx(87.38 - gap.curve_mean) and gap.difference < -2
    assert 0 < gap.p_welch < 0.05
    at_a_point = gap_to_curve(Summary(11.72, 89.24, 0.18, 3), trn)
    assert at_a_point.difference == pytest.approx(0) and at_a_point.p_welch == pytest.approx(1)
    with pytest.raises(ValueError, match="outside the curve"):
        gap_to_curve(Summary(40.0, 80.0, 1.0, 3), trn)
