"""The leaderboard's tables: every method's accuracy at each matched compression target, its whole-curve
summary over the common range, and which method wins where against a baseline, with corrected p.

Input is per method a list of ``CurvePoint`` (one per target it was tuned to reach); a method that
collapses (its accuracy at chance, say) keeps its row, with the note its caller gives. ``markdown``
renders a whole ``Leaderboard`` (rankbench/report/board.py); ``task_sections`` gives its pieces per
task in any tabulate format, so the HTML page (rankbench/report/page.py) shows the same tables.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from tabulate import tabulate

from rankbench.report.board import Leaderboard, MethodCurve, TaskBoard
from rankbench.report.curves import CurvePoint, bootstrap_area, common_range, compare_at_targets
from rankbench.report.tables import mean_std


def target_table(curves: Mapping[str, Sequence[CurvePoint]], notes: Mapping[str, str] | None = None,
                 tablefmt: str = "github", marks: Mapping[str, Mapping[float, str]] | None = None,
                 note_column: bool = True) -> str:
    """Test accuracy mean±std at every target (the compression each reached, geometric mean, in
    brackets), one row per method; a method without a point at a target shows "-". ``marks`` (per
    method, per target) adds a word to the brackets, e.g. "12.1x, missed": a reader must see which
    points are not at their target. ``note_column`` False drops the notes (the README's short form)."""
    targets = sorted({p.target for points in curves.values() for p in points})
    rows = []
    for method, points in curves.items():
        at = {p.target: p for p in points}
        marked = (marks or {}).get(method, {})
        cells = [f"{mean_std(list(at[t].accuracies))} ({at[t].compression:.3g}x"
                 f"{', ' + marked[t] if marked.get(t) else ''})" if t in at else "-" for t in targets]
        rows.append([method, *cells, *([(notes or {}).get(method, "")] if note_column else [])])
    headers = ["method", *[f"{t:g}x" for t in targets], *(["note"] if note_column else [])]
    return tabulate(rows, headers=headers, tablefmt=tablefmt, disable_numparse=True)


def headline_table(task: TaskBoard, tablefmt: str = "github") -> str:
    """A task's accuracy at each target without the notes, under a first row for the dense reference
    (its one 1x point): the table the README quotes (tests/test_docs.py checks the README's copy
    against the committed leaderboard.json)."""
    curves = {c.method: c.curve() for c in task.curves}
    marks = {c.method: point_marks(c) for c in task.curves}
    if task.reference is not None:
        ref = task.reference.point
        curves = {"dense reference": [replace(ref, target=t) for t in task.targets], **curves}
    return target_table(curves, tablefmt=tablefmt, marks=marks, note_column=False)


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
    and Mann-Whitney's p Holm-corrected over targets, and the winner where the corrected tests say so
    (``TargetComparison.winner``: Welch's, and Mann-Whitney's where it can reach 5 % with these seeds)."""
    if baseline not in curves:
        raise ValueError(f"baseline {baseline!r} is not among the methods {sorted(curves)}")
    rows = []
    for method in curves:
        if method == baseline:
            continue
        for c in compare_at_targets(curves, method, baseline):
            rows.append([f"{c.target:g}x", method, f"{c.difference:+.2f}", f"{c.p_welch_holm:.3g}",
                         f"{c.p_mwu_holm:.3g}",
                         (f"{c.winner} ({c.decided_by})" if c.winner else "no difference shown")])
    return tabulate(rows, headers=["target", f"method vs {baseline}", "Δ accuracy", "p Welch (Holm)",
                                   "p Mann-Whitney (Holm)", "winner"], tablefmt=tablefmt, disable_numparse=True)


@dataclass(frozen=True)
class Section:
    """One titled piece of a task's leaderboard: its explanation, and its table (None when there is
    none to show, ``text`` then says why). ``method_column`` is the column naming the method, so the
    HTML page can mark each method's rows."""

    title: str
    text: str
    table: str | None = None
    method_column: int = 0


def point_marks(curve: MethodCurve) -> dict[float, str]:
    """The words a point's cell carries: "missed" outside the tolerance, "interpolated" between two ranks."""
    marks = {}
    for p in curve.points:
        words = ([] if p.hit else ["missed"]) + (["interpolated"] if p.interpolated else [])
        if words:
            marks[p.point.target] = ", ".join(words)
    return marks


def task_sections(task: TaskBoard, tablefmt: str = "github", *, resamples: int = 2000) -> list[Section]:
    """A task's target table, whole-curve summary and comparison against its baseline. A summary or a
    comparison that cannot be made (one-point curves, curves without a common range, a baseline
    without a curve) is a sentence saying why, never an error: the other tables are still worth reading."""
    curves = {c.method: c.curve() for c in task.curves}
    text = (f"Test accuracy (%) mean±std over seeds at each target compression, the compression reached "
            f"(geometric mean over seeds) in brackets. A point hits its target within ±{task.tolerance * 100:g} %: "
            f"\"missed\" marks one that did not, \"interpolated\" a uniform rank between two ranks.")
    if task.reference is not None:
        ref = task.reference.point
        text += (f" Dense reference ({ref.compression:.3g}x, {task.reference.setting}): "
                 f"{mean_std(list(ref.accuracies))} over {len(ref.accuracies)} seed(s).")
    sections = [Section("Accuracy at each target", text,
                        target_table(curves, {c.method: c.note for c in task.curves}, tablefmt,
                                     {c.method: point_marks(c) for c in task.curves}))]
    sections.append(_summary_section(curves, tablefmt, resamples, task.tolerance))
    if task.baseline is not None:
        sections.append(_comparison_section(curves, task.baseline, tablefmt))
    published = _published_section(task.task, tablefmt)
    if published is not None:
        sections.append(published)
    return sections


def _published_section(task: str, tablefmt: str) -> Section | None:
    """What the methods' sources report on this task (rankbench/report/published.toml), beside the
    measured tables: on their own data and training length, so for orientation, never compared."""
    from rankbench.report.build import published_fmt, published_rows

    entries = [row.published for row in published_rows([task])]
    if not entries:
        return None
    rows = [[e["method"], e.get("note", ""), e["dataset"], published_fmt(e, "accuracy", 2),
             published_fmt(e, "compression", 2) + ("x" if "compression" in e else ""), str(e.get("n", "")),
             e["source"]] for e in entries]
    table = tabulate(rows, headers=["method", "setting", "data", "test acc %", "compression", "n", "source"],
                     tablefmt=tablefmt, disable_numparse=True)
    text = ("What the sources report on this task, on their own data (the full training set) and training "
            "length: for orientation beside the measured points, never compared with them.")
    return Section("Published", text, table)


def _summary_section(curves: Mapping[str, Sequence[CurvePoint]], tablefmt: str, resamples: int,
                     tolerance: float) -> Section:
    """The whole-curve summary over the range the spanning curves share. A curve with fewer than two
    points, or whose points all sit within the tolerance of one compression (a method that lands where it
    lands whatever its knob, as MARS on rings), spans no range: it is named and left out, so that it does
    not empty the common range of the others."""
    title = "Whole curves"
    if not curves:
        return Section(title, "No whole-curve summary: no method has a point on this task.")
    left_out = {}
    for method, points in curves.items():
        reached = [p.compression for p in points]
        if len(points) < 2:
            left_out[method] = "fewer than two points"
        elif max(reached) <= min(reached) * (1 + tolerance):
            left_out[method] = f"every point at {min(reached):.3g}x"
    spanning = {m: points for m, points in curves.items() if m not in left_out}
    aside = ("Left out, spanning no range: " + "; ".join(f"{m} ({why})" for m, why in left_out.items()) + "."
             if left_out else "")
    if not spanning:
        return Section(title, f"No whole-curve summary: no curve spans a range. {aside}")
    try:
        common_range(spanning)
    except ValueError as exc:
        return Section(title, f"No whole-curve summary: {exc}. {aside}".strip())
    lead, _, table = summary_table(spanning, resamples=resamples, tablefmt=tablefmt).partition("\n")
    return Section(title, f"Each method's {lead}, with its 95 % bootstrap interval over seeds. {aside}".strip(),
                   table)


def _comparison_section(curves: Mapping[str, Sequence[CurvePoint]], baseline: str, tablefmt: str) -> Section:
    title = f"Against {baseline}"
    if baseline not in curves:
        return Section(title, f"No comparison: the baseline {baseline} has no curve on this task.")
    reached = {p.target for p in curves[baseline]}
    if not any(reached & {p.target for p in points} for method, points in curves.items() if method != baseline):
        return Section(title, f"No comparison: no other method has a point at a target {baseline} has.")
    text = (f"Δ accuracy: the method's mean minus {baseline}'s at each target both have; Welch's and "
            "Mann-Whitney's p Holm-corrected over the targets; a winner only where Welch's corrected p < 0.05 and, "
            "where it can (4 or more seeds a side), Mann-Whitney's too: with 3 seeds against 3 its two-sided p is "
            "never below 0.1, so Welch's alone decides there (\"Welch only\").")
    return Section(title, text, comparison_table(curves, baseline, tablefmt), method_column=1)


def cost_text(cost: Mapping[str, Any]) -> str:
    """The study's cost in words: runs trained, their summed wall time, and the search seed's share."""
    parts = []
    if "runs" in cost:
        searched = f" ({cost['searched']} of them by the search seed)" if "searched" in cost else ""
        parts.append(f"{cost['runs']} runs trained{searched}")
    elif "searched" in cost:
        parts.append(f"{cost['searched']} runs of the search seed")
    if "run_hours" in cost:
        parts.append(f"{float(cost['run_hours']):.3g} run-hours (the sum of the runs' wall times)")
    parts += [f"{key}: {value}" for key, value in cost.items() if key not in ("runs", "searched", "run_hours")]
    return "; ".join(parts) + "." if parts else "Not recorded."


def markdown(board: Leaderboard, tablefmt: str = "github", *, resamples: int = 2000) -> str:
    """The whole leaderboard as one Markdown document: per task its tables, then how the points were
    found and what they cost (``tablefmt`` "html" gives HTML tables, which Markdown renderers show as is)."""
    parts = [f"# {board.study}: accuracy at matched compression", board.description]
    for task in board.boards:
        parts.append(f"## {task.task} on {task.dataset}")
        parts.append("Targets: " + ", ".join(f"{t:g}x" for t in task.targets) + "."
                     + (f" Baseline: {task.baseline}." if task.baseline else ""))
        for section in task_sections(task, tablefmt, resamples=resamples):
            parts += [f"### {section.title}", section.text]
            if section.table is not None:
                parts.append(section.table)
    parts += ["## Protocol", board.protocol or "Not recorded.", "## Cost", cost_text(board.cost)]
    return "\n\n".join(part for part in parts if part) + "\n"
