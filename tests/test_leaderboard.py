"""The leaderboard's tables (rankbench/report/leaderboard.py) from matched-compression curves."""

from __future__ import annotations

import pytest

from rankbench.report.board import MatchedPoint, MethodCurve, TaskBoard
from rankbench.report.curves import CurvePoint
from rankbench.report.leaderboard import comparison_table, headline_table, summary_table, target_table


def point(target: float, accuracies: list[float], reached: float | None = None) -> CurvePoint:
    return CurvePoint(target, tuple([reached or target] * len(accuracies)), tuple(accuracies))


CURVES = {
    "ours": [point(10, [95.0, 95.5, 96.0, 95.2, 95.8], 10.4), point(40, [90.0, 89.0, 91.0, 90.5, 89.5])],
    "trn": [point(10, [90.0, 90.5, 91.0, 90.2, 90.8], 9.6), point(40, [90.2, 89.4, 90.6, 90.0, 89.8])],
    "mars": [point(10, [10.0, 11.0, 9.0]), point(40, [10.0, 10.0, 10.0])],
}


def test_the_target_table_has_every_method_at_every_target_with_the_compression_it_reached():
    text = target_table(CURVES, notes={"mars": "collapses on rings (docs/mars_on_rings.md)"})
    lines = text.splitlines()
    assert "10x" in lines[0] and "40x" in lines[0]
    ours = next(line for line in lines if line.startswith("| ours"))
    assert "95.50±0.41 (10.4x)" in ours
    assert "collapses on rings" in next(line for line in lines if line.startswith("| mars"))
    partial = target_table({**CURVES, "new": [point(10, [80.0])]})
    assert "| -" in next(line for line in partial.splitlines() if line.startswith("| new"))


def test_the_headline_table_puts_the_dense_line_first_and_keeps_the_marks_but_not_the_notes():
    def matched(p: CurvePoint, hit: bool = True) -> MatchedPoint:
        return MatchedPoint(p.target, "lambda=1", hit, p, runs=())

    task = TaskBoard("mlp2", "digits", (10.0, 40.0), 0.1,
                     (MethodCurve("ours", "lambda", (matched(CURVES["ours"][0]), matched(CURVES["ours"][1], False)),
                                  note="starts at 18x"),
                      MethodCurve("trn", "rank", tuple(matched(p) for p in CURVES["trn"]))),
                     baseline="trn", reference=matched(point(1, [97.0, 97.2, 97.4])))
    lines = headline_table(task).splitlines()
    assert [c.strip() for c in lines[0].split("|")[1:-1]] == ["method", "10x", "40x"]
    assert [c.strip() for c in lines[2].split("|")[1:-1]] == ["dense reference", "97.20±0.20 (1x)", "97.20±0.20 (1x)"]
    assert [c.strip() for c in lines[3].split("|")[1:-1]] == ["ours", "95.50±0.41 (10.4x)", "90.00±0.79 (40x, missed)"]
    assert lines[4].startswith("| trn") and "starts at 18x" not in "\n".join(lines)


def test_the_summary_ranks_the_curves_over_their_common_range():
    text = summary_table(CURVES, resamples=200)
    rows = [line for line in text.splitlines() if line.startswith("| ") and "method" not in line]
    assert [row.split("|")[1].strip() for row in rows] == ["ours", "trn", "mars"]
    assert text.startswith("mean accuracy over 10.4x to 40x") or text.startswith("mean accuracy over 10x to 40x")


def test_the_comparison_names_a_winner_only_where_both_corrected_tests_agree():
    text = comparison_table(CURVES, "trn")
    ours_10 = next(line for line in text.splitlines() if line.startswith("| 10x") and "ours" in line)
    ours_40 = next(line for line in text.splitlines() if line.startswith("| 40x") and "ours" in line)
    assert ours_10.rstrip(" |").endswith("ours (both)") and "+5.00" in ours_10
    assert "no difference shown" in ours_40
    with pytest.raises(ValueError, match="baseline 'dense'"):
        comparison_table(CURVES, "dense")
