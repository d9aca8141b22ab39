"""The leaderboard's tables: every method's accuracy at each matched compression target, its whole-curve
summary over the common range, and which method wins where against a baseline, with corrected p.

Input is per method a list of ``CurvePoint`` (one per target it was tuned to reach); a method that
collapses (its accuracy at chance, say) keeps its row, with the note its caller gives.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from tabulate import tabulate

from rankbench.report.curves import CurvePoint, bootstrap_area, common_range, compare_at_targets
from rankbench.report.tables import mean_std


def target_table(curves: Mapping[str, Sequence[CurvePoint]], notes: Mapping[str, str] | None = None,
                 tablefmt: str = "github") -> str:
    """Test accuracy mean±std at every target (the compression each reached, geometric mean, in
    brackets), one row per method; a method without a point at a target shows "-"."""
    targets = sorted({p.target for points in curves.values() for p in points})
    rows = []
    for method, points in curves.items():
        at = {p.target: p for p in points}
        cells = [f"{mean_std(list(at[t].accuracies))} ({at[t].compression:.3g}x)" if t in at else "-" for t in targets]
        rows.append([method, *cells, (notes or {}).get(method, "")])
    return tabulate(rows, headers=["method", *[f"{t:g}x" for t in targets], "note"], tablefmt=tablefmt,
                    disable_numparse=True)


def summary_table(curves: Mapping[str, Sequence[CurvePoint]], *, resamples: int = 2000, seed: int = 0,
                  tablefmt: str = "github") -> str:
    """Each method's mean accuracy over the compressions every curve spans, with its bootstrap interval."""
    low, high = common_range(curves)
    rows = []
    for method, points in curves.items():
        area = bootstrap_area(points, low, high, resamples=resamples, seed=seed)
        rows.append([method, f"{area.estimate:.2f}", f"[{area.low:.2f}, {area.high:.2f}]"])
    rows.sort(key=lambda row: -float(row[1]))
    return (f"mean accuracy over {low:.3g}x to {high:.3g}x (log10 compression)\n"
            + tabulate(rows, headers=["method", "mean accuracy", "95 % bootstrap CI"], tablefmt=tablefmt,
                       disable_numparse=True))


def comparison_table(curves: Mapping[str, Sequence[CurvePoint]], baseline: str, tablefmt: str = "github") -> str:
    """Every method against ``baseline`` at each shared target: the difference in mean accuracy, Welch's
    and Mann-Whitney's p Holm-corrected over targets, and the winner where both corrected tests agree."""
    if baseline not in curves:
        raise ValueError(f"baseline {baseline!r} is not among the methods {sorted(curves)}")
    rows = []
    for method in curves:
        if method == baseline:
            continue
        for c in compare_at_targets(curves, method, baseline):
            rows.append([f"{c.target:g}x", method, f"{c.difference:+.2f}", f"{c.p_welch_holm:.3g}",
                         f"{c.p_mwu_holm:.3g}", c.winner or "no difference shown"])
    return tabulate(rows, headers=["target", f"method vs {baseline}", "Δ accuracy", "p Welch (Holm)",
                                   "p Mann-Whitney (Holm)", "winner"], tablefmt=tablefmt, disable_numparse=True)
