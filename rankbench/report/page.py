"""A leaderboard as one self-contained HTML page: per task an interactive plotly figure of test
accuracy against compression, then the same tables as the Markdown (rankbench/report/leaderboard.py).

The page must open offline, years later, from an archive or an e-mail attachment: plotly.js is
inlined once in the page, nothing is fetched from the network, and each figure's data sits beside its
``<div>`` as JSON (``<script type="application/json">``), which a test or a script can read back.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from html import escape, unescape
from pathlib import Path

from rankbench.errors import RankbenchError
from rankbench.report.board import Leaderboard, MatchedPoint, MethodCurve, TaskBoard
from rankbench.report.leaderboard import Section, cost_text, markdown, task_sections

FIGURE_CLASS = "rb-figure"
CONFIG = {"displaylogo": False, "showSendToCloud": False, "plotlyServerURL": "", "typesetMath": False,
          "responsive": True}
"""No plotly logo link, no "share chart" upload button (nor a server to upload to), no MathJax: the
page never leaves the machine."""

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #222; margin: 0;
       background: #fafafa; }
main { max-width: 1280px; margin: 0 auto; padding: 1.5rem 2rem 3rem; background: #fff; }
h1 { font-size: 1.7rem; margin-bottom: .3rem; }
h2 { font-size: 1.35rem; margin-top: 2.5rem; border-bottom: 1px solid #ddd; padding-bottom: .3rem; }
h3 { font-size: 1.05rem; margin: 1.4rem 0 .4rem; }
p { line-height: 1.45; max-width: 70rem; }
p.explain { color: #555; font-size: .92rem; }
.rb-figure { width: 100%; height: 480px; }
table { border-collapse: collapse; font-size: .9rem; margin: .3rem 0 1rem; }
th, td { border: 1px solid #ddd; padding: .3rem .6rem; text-align: left; white-space: nowrap; }
td:last-child { white-space: normal; }
th { background: #f0f0f0; }
tbody tr:nth-child(even) { background: #fafafa; }
td { font-variant-numeric: tabular-nums; }
"""

RUN_FIGURES = f"""
document.querySelectorAll("div.{FIGURE_CLASS}").forEach(function (div) {{
  var spec = JSON.parse(document.getElementById(div.id + "-data").textContent);
  Plotly.newPlot(div, spec.data, spec.layout, spec.config);
}});
"""


def _palette(board: Leaderboard) -> dict[str, str]:
    """One colour per method over every task, so a method looks the same in every figure."""
    from plotly.colors import qualitative

    colours = qualitative.Plotly
    methods = list(dict.fromkeys(c.method for task in board.boards for c in task.curves))
    return {method: colours[i % len(colours)] for i, method in enumerate(methods)}


def _std(values: tuple[float, ...]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _hover(curve: MethodCurve, p: MatchedPoint) -> str:
    marks = ("" if p.hit else ", missed") + (", interpolated" if p.interpolated else "")
    return (f"<b>{escape(curve.method)}</b> at {p.target:g}x{marks}<br>{escape(p.setting)}<br>"
            f"{len(p.point.accuracies)} seed(s): {p.point.compression:.3g}x reached, "
            f"accuracy {p.point.accuracy:.2f} ± {_std(p.point.accuracies):.2f}")


def split_at(values: list[float], *, share: float = 0.75, least: float = 10.0) -> float | None:
    """Where to break the accuracy axis: the middle of the widest gap between the values when it is over
    ``share`` of their span and at least ``least`` accuracy points (a method collapsed to chance far
    below the rest, which on one axis would squeeze every other curve into a flat band), else None."""
    ordered = sorted(set(values))
    if len(ordered) < 2:
        return None
    gap, below = max((b - a, a) for a, b in zip(ordered, ordered[1:]))
    return below + gap / 2 if gap > share * (ordered[-1] - ordered[0]) and gap >= least else None


def figure(task: TaskBoard, colours: dict[str, str]) -> dict:
    """The task's accuracy-vs-compression figure as plotly JSON (data, layout, config): per method a
    trace named after it (two, one per panel, when the axis is broken), the seeds' std as error bars; a
    missed point drawn open, an interpolated one as a diamond; the targets as faint vertical lines, the
    dense reference as a dashed horizontal one. Accuracies far below the rest (``split_at``) get a lower
    panel of their own, so the curves that matter keep their resolution and no point is off the chart."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    accuracies = [p.point.accuracy for c in task.curves for p in c.points]
    reference = task.reference.point.accuracy if task.reference is not None else None
    split = split_at(accuracies + ([reference] if reference is not None else []))
    panels = [(1, lambda a: True)] if split is None else [(1, lambda a: a >= split), (2, lambda a: a < split)]
    fig = make_subplots(rows=len(panels), cols=1, shared_xaxes=True, vertical_spacing=0.07,
                        row_heights=None if split is None else [0.72, 0.28])
    for curve in task.curves:
        points = sorted(curve.points, key=lambda p: p.point.compression)
        symbols = [("diamond" if p.interpolated else "circle") + ("" if p.hit else "-open") for p in points]
        shown = False
        for row, inside in panels:
            keep = [inside(p.point.accuracy) for p in points]
            if not any(keep):
                continue
            fig.add_trace(go.Scatter(
                name=curve.method, legendgroup=curve.method, showlegend=not shown,
                x=[p.point.compression for p in points],
                y=[p.point.accuracy if k else None for p, k in zip(points, keep)],
                error_y={"type": "data", "array": [_std(p.point.accuracies) for p in points], "visible": True},
                mode="lines+markers", marker={"symbol": symbols, "size": 9, "line": {"width": 2}},
                line={"color": colours.get(curve.method)}, text=[_hover(curve, p) for p in points],
                hovertemplate="%{text}<extra></extra>"), row=row, col=1)
            shown = True
    shapes = [{"type": "line", "xref": "x", "yref": "paper", "x0": t, "x1": t, "y0": 0, "y1": 1, "layer": "below",
               "line": {"color": "rgba(0,0,0,0.15)", "width": 1, "dash": "dot"}} for t in task.targets]
    annotations = []
    if reference is not None:
        axis = "y" if split is None or reference >= split else "y2"
        shapes.append({"type": "line", "xref": "paper", "yref": axis, "x0": 0, "x1": 1, "y0": reference,
                       "y1": reference, "line": {"color": "#444", "width": 1.5, "dash": "dash"}})
        annotations.append({"xref": "paper", "yref": axis, "x": 1, "y": reference, "xanchor": "right",
                            "yanchor": "bottom", "showarrow": False, "font": {"size": 11, "color": "#444"},
                            "text": f"dense ({task.reference.point.compression:.3g}x): {reference:.2f}"})
    if split is not None:
        annotations.append({"xref": "paper", "yref": "paper", "x": 0, "y": 0.28, "xanchor": "left",
                            "yanchor": "bottom", "showarrow": False, "font": {"size": 11, "color": "#777"},
                            "text": f"axis broken at {split:.3g} % (the gap is not to scale)"})
    reached = [p.point.compression for c in task.curves for p in c.points] + list(task.targets)
    ticks = sorted(set(task.targets))
    fig.update_xaxes(type="log", **({"tickvals": ticks, "ticktext": [f"{t:g}x" for t in ticks]} if len(ticks) > 1
                                    else {}),
                     **({"range": [math.log10(min(reached)) - 0.08, math.log10(max(reached)) + 0.08]}
                        if reached else {}))
    fig.update_xaxes(title={"text": "compression (x, log scale)"}, row=len(panels), col=1)
    fig.update_yaxes(title={"text": "test accuracy (%)"}, row=1, col=1)
    fig.update_layout(
        template="plotly_white", height=480, margin={"l": 70, "r": 30, "t": 50, "b": 60},
        title={"text": f"{escape(task.task)} on {escape(task.dataset)}: test accuracy vs compression", "x": 0.01},
        legend={"title": {"text": "method"}}, shapes=shapes, annotations=annotations, hovermode="closest")
    spec = json.loads(fig.to_json())
    spec["config"] = CONFIG
    return spec


def _tag_rows(table: str, methods: set[str], column: int) -> str:
    """``data-method="NAME"`` on every body row whose ``column`` names a method, so a method's rows
    can be found (by a reader's script, by the tests) without parsing cell text."""

    def tag(match: re.Match) -> str:
        cells = re.findall(r"<td[^>]*>(.*?)</td>", match.group(1), flags=re.S)
        name = unescape(cells[column]).strip() if len(cells) > column else None
        attribute = f' data-method="{escape(name)}"' if name in methods else ""
        return f"<tr{attribute}>{match.group(1)}</tr>"

    return re.sub(r"<tr>((?:(?!</tr>).)*<td.*?)</tr>", tag, table, flags=re.S)


def _paragraphs(text: str, css: str = "") -> str:
    attribute = f' class="{css}"' if css else ""
    return "\n".join(f"<p{attribute}>{escape(part.strip())}</p>" for part in text.split("\n\n") if part.strip())


def _section_html(section: Section, methods: set[str]) -> str:
    parts = [f"<h3>{escape(section.title)}</h3>", _paragraphs(section.text, "explain")]
    if section.table is not None:
        parts.append(_tag_rows(section.table, methods, section.method_column))
    return "\n".join(parts)


def _json_script(element_id: str, data: dict) -> str:
    text = json.dumps(data).replace("<", "\\u003c")  # no "</script>" inside, still the same JSON
    return f'<script type="application/json" id="{element_id}">{text}</script>'


def html_page(board: Leaderboard, *, resamples: int = 2000) -> str:
    """The leaderboard as one HTML page that needs nothing but a browser (no network)."""
    from plotly.offline import get_plotlyjs

    colours = _palette(board)
    body = [f"<h1>{escape(board.study)}: accuracy at matched compression</h1>", _paragraphs(board.description)]
    for i, task in enumerate(board.boards, start=1):
        methods = {c.method for c in task.curves}
        element_id = f"figure-{i}"
        targets = ", ".join(f"{t:g}x" for t in task.targets)
        body += [f'<section class="task" data-task="{escape(task.task)}">',
                 f"<h2>{escape(task.task)} on {escape(task.dataset)}</h2>",
                 f'<p class="explain">Targets {escape(targets)}; hover a point for its setting, seeds and the '
                 "compression reached; click a legend entry to hide a method. Open markers: missed the target; "
                 "diamonds: interpolated.</p>",
                 f'<div class="{FIGURE_CLASS}" id="{element_id}" data-task="{escape(task.task)}"></div>',
                 _json_script(f"{element_id}-data", figure(task, colours)),
                 *(_section_html(s, methods) for s in task_sections(task, "html", resamples=resamples)),
                 "</section>"]
    body += ["<h2>Protocol</h2>", _paragraphs(board.protocol or "Not recorded."),
             "<h2>Cost</h2>", _paragraphs(cost_text(board.cost))]
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(board.study)}: leaderboard</title>", f"<style>{STYLE}</style>",
        f'<script type="text/javascript">{get_plotlyjs()}</script>', "</head>", "<body>", "<main>",
        *body, "</main>", f"<script>{RUN_FIGURES}</script>", "</body>", "</html>", ""])


def write_page(board: Leaderboard, folder: Path) -> list[Path]:
    """``leaderboard.html`` and ``leaderboard.md`` written into ``folder`` (created); their paths."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise RankbenchError(f"{folder}: is a file: name a folder for leaderboard.html and leaderboard.md")
    page, text = folder / "leaderboard.html", folder / "leaderboard.md"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        page.write_text(html_page(board), encoding="utf-8")
        text.write_text(markdown(board), encoding="utf-8")
    except OSError as exc:
        raise RankbenchError(f"{folder}: cannot write into it ({exc.strerror or type(exc).__name__}): "
                             "name a folder you can write") from None
    return [page, text]
