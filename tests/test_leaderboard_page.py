"""A leaderboard's JSON, Markdown, HTML page and ``rankbench leaderboard`` (rankbench/report/board.py,
leaderboard.py, page.py, cli.py), on a realistic two-task board; the page is rendered by headless
Chromium where one is installed, to show it draws offline."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

import rankbench
from helpers import assert_one_line_error, toml_module
from rankbench.cli import main
from rankbench.errors import RankbenchError
from rankbench.report.board import Leaderboard, MatchedPoint, MethodCurve, SeedRun, TaskBoard
from rankbench.report.curves import CurvePoint
from rankbench.report.leaderboard import markdown, task_sections
from rankbench.report.page import FIGURE_CLASS, html_page, split_at, write_page

METHODS = ("ours", "trn", "mars")
SEEDS = (0, 1, 2)
SPREAD = (-0.3, 0.05, 0.25)  # mean 0
SCALE = {"ours": 1.0, "trn": 0.7, "mars": 1.6, "dense": 0.4}  # the seeds' spread, per method


def matched(method: str, target: float, accuracy: float, reached: float, setting: str, *, hit: bool = True,
            interpolated: bool = False) -> MatchedPoint:
    """A point of three seeds around ``accuracy`` and ``reached`` (the seeds' compressions vary by 1 %)."""
    compressions = tuple(reached * (1 + d / 30) for d in SPREAD) if reached != 1 else (1.0,) * len(SEEDS)
    accuracies = tuple(accuracy + d * SCALE.get(method, 1.0) for d in SPREAD)
    runs = tuple(SeedRun(s, f"{method}-{target:g}x-seed{s}", c, a) for s, c, a in zip(SEEDS, compressions, accuracies))
    return MatchedPoint(target, setting, hit, CurvePoint(target, compressions, accuracies), runs, interpolated)


MARS_NOTE = "collapses to chance on rings: see docs/mars_on_rings.md"


def make_board() -> Leaderboard:
    targets = (5.0, 10.0, 20.0, 40.0)
    mlp = TaskBoard("mlp2", "fmnist", targets, 0.1, (
        MethodCurve("ours", "lambda", (
            matched("ours", 5, 88.9, 5.2, "lambda=0.012"), matched("ours", 10, 88.4, 10.3, "lambda=0.031"),
            matched("ours", 20, 87.6, 19.6, "lambda=0.074"), matched("ours", 40, 86.1, 41.0, "lambda=0.18"))),
        MethodCurve("trn", "rank", (
            matched("trn", 5, 88.2, 5.1, "rank 24"), matched("trn", 10, 87.3, 10.0, "rank 12-13 interpolated",
                                                              interpolated=True),
            matched("trn", 20, 85.9, 20.4, "rank 7"), matched("trn", 40, 83.0, 39.2, "rank 4"))),
        MethodCurve("mars", "prior", (
            matched("mars", 5, 10.2, 5.3, "prior=0.5"), matched("mars", 10, 10.0, 10.6, "prior=0.2"),
            matched("mars", 20, 10.1, 21.0, "prior=0.1"), matched("mars", 40, 9.9, 52.3, "prior=0.05", hit=False)),
            MARS_NOTE),
    ), baseline="trn", reference=matched("dense", 1, 89.6, 1.0, "dense defaults"))
    lenet = TaskBoard("lenet5", "mnist", (10.0, 40.0), 0.1, (
        MethodCurve("ours", "lambda", (matched("ours", 10, 98.9, 10.1, "lambda=0.05"),
                                       matched("ours", 40, 98.1, 40.8, "lambda=0.3"))),
        MethodCurve("trn", "rank", (matched("trn", 10, 98.7, 9.8, "rank 10"),
                                    matched("trn", 40, 97.2, 38.9, "rank 5-6 interpolated", interpolated=True))),
        MethodCurve("mars", "prior", (matched("mars", 10, 10.1, 12.9, "prior=0.3", hit=False),), MARS_NOTE),
    ), baseline="trn")
    return Leaderboard("rings_matched", "Tensor-ring networks compressed to matched targets: ours, uniform-rank TRN "
                       "and MARS, three seeds each.", (mlp, lenet),
                       "Each method's knob was searched on seed 0 until a run landed within 10 % of the target "
                       "(at most 5 runs); seeds 0-2 were then trained at that setting for 3000 steps.",
                       {"runs": 66, "run_hours": 7.45, "searched": 30})


@pytest.fixture(scope="module")
def board() -> Leaderboard:
    return make_board()


@pytest.fixture(scope="module")
def page(board) -> str:
    return html_page(board, resamples=300)


# ---------------------------------------------------------------------------- JSON and Markdown


def test_the_board_round_trips_through_its_json(board):
    again = Leaderboard.from_json(board.to_json())
    assert again == board
    assert again.boards[0].curves[1].points[1].interpolated and not again.boards[0].curves[2].points[3].hit


def test_the_markdown_shows_every_method_at_every_target_with_its_marks(board):
    text = markdown(board, resamples=300)
    for method in METHODS:
        assert f"| {method}" in text
    for target in ("5x", "10x", "20x", "40x"):
        assert f" {target}" in text
    assert "## mlp2 on fmnist" in text and "## lenet5 on mnist" in text
    mars = next(line for line in text.splitlines() if line.startswith("| mars") and "52.3x" in line)
    assert "(52.3x, missed)" in mars and "collapses to chance" in mars
    assert "(10x, interpolated)" in next(line for line in text.splitlines() if line.startswith("| trn"))
    assert "p Welch (Holm)" in text and "p Mann-Whitney (Holm)" in text and "winner" in text
    assert "mean accuracy over" in text  # mlp2's curves overlap
    lenet = text[text.index("## lenet5 on mnist"):]
    assert "Left out, spanning no range: mars (fewer than two points)." in lenet  # lenet5's mars: one point
    assert "mean accuracy over 10.1x to 38.9x" in lenet
    assert "Dense reference (1x, dense defaults): 89.60±0.11 over 3 seed(s)." in text
    assert "66 runs trained (30 of them by the search seed); 7.45 run-hours" in text
    assert "searched on seed 0" in text


def test_each_task_shows_what_its_sources_published_beside_it_never_compared(board):
    text = markdown(board, resamples=300)
    published = toml_module().loads((Path(rankbench.__file__).parent / "report" / "published.toml").read_text())["row"]
    lenet = text[text.index("## lenet5 on mnist"):]
    section = lenet[lenet.index("### Published"):lenet.index("## Protocol")]
    entries = [e for e in published if e["task"] == "lenet5"]
    assert len([line for line in section.splitlines() if line.startswith("| ")]) == len(entries) + 1  # + header
    pstrn = [line for line in section.splitlines() if line.startswith("| pstrn")]
    assert len(pstrn) == 3 and any("| 99.40" in line and "16.50x" in line for line in pstrn)
    assert "PSTRN-M; error 0.57 %" in section and "never compared" in section
    mlp = text[text.index("## mlp2 on fmnist"):text.index("## lenet5 on mnist")]
    assert "MARS official notebook MNIST-2FC-soft" in mlp and "Cao et al. 2024, poster (PSTRN)" not in mlp
    lonely = TaskBoard("no_such_task", "d", (5,), 0.1, ())
    assert "Published" not in [s.title for s in task_sections(lonely)]


def test_curves_without_a_common_range_or_a_baseline_curve_are_said_not_raised():
    low = MethodCurve("a", "k", (matched("a", 2, 80, 2, "k=1"), matched("a", 3, 79, 3, "k=2")))
    high = MethodCurve("b", "k", (matched("b", 30, 70, 30, "k=1"), matched("b", 60, 60, 60, "k=2")))
    lonely = TaskBoard("t", "d", (2, 3, 30, 60), 0.1, (low, high), baseline="c")
    empty = TaskBoard("u", "d", (5,), 0.1, (), baseline="a")
    text = markdown(Leaderboard("s", "", (lonely, empty)), resamples=50)
    assert "No whole-curve summary: the curves share no range of compression" in text
    assert "No comparison: the baseline c has no curve on this task." in text
    assert "No whole-curve summary: no method has a point on this task." in text
    disjoint = TaskBoard("t", "d", (2, 3, 30, 60), 0.1, (low, high), baseline="a")
    text = markdown(Leaderboard("s", "", (disjoint,)))
    assert "No comparison: no other method has a point at a target a has." in text


def test_a_curve_stuck_at_one_compression_is_left_out_of_the_summary_not_emptying_it():
    ours = MethodCurve("ours", "lambda", (matched("ours", 10, 97, 10, "lambda=1"), matched("ours", 40, 95, 40, "l=4")))
    trn = MethodCurve("trn", "rank", (matched("trn", 10, 96.5, 9.9, "rank 16"), matched("trn", 40, 95.5, 40.2, "r 8")))
    stuck = MethodCurve("mars", "prior", (matched("mars", 10, 10, 765, "prior=0.1", hit=False),
                                          matched("mars", 40, 10, 770, "prior=0.3", hit=False)))
    (section,) = [s for s in task_sections(TaskBoard("t", "d", (10, 40), 0.1, (ours, trn, stuck)), resamples=50)
                  if s.title == "Whole curves"]
    assert section.text.startswith("Each method's mean accuracy over 10x to 40x")
    assert "Left out, spanning no range: mars (every point at 765x)." in section.text
    assert "| mars" not in section.table and "| ours" in section.table and "| trn" in section.table
    (alone,) = [s for s in task_sections(TaskBoard("t", "d", (10, 40), 0.1, (stuck,)), resamples=50)
                if s.title == "Whole curves"]
    assert alone.text == "No whole-curve summary: no curve spans a range. Left out, spanning no range: mars (every " \
                         "point at 765x)." and alone.table is None


def split(board: Leaderboard, methods: set[str]) -> Leaderboard:
    """The part of ``board`` that a ``--methods`` run of its study would write (the reference with dense)."""
    from dataclasses import replace

    return replace(board, boards=tuple(replace(t, curves=tuple(c for c in t.curves if c.method in methods),
                                               reference=t.reference if "dense" in methods else None)
                                       for t in board.boards),
                   cost={"runs": 10 * len(methods), "run_hours": 1.25 * len(methods)})


def test_the_parts_of_a_study_split_by_method_join_into_its_board(board):
    first, second = split(board, {"trn", "dense"}), split(board, {"ours", "mars"})
    joined = Leaderboard.join([first, second])
    assert [t.task for t in joined.boards] == ["mlp2", "lenet5"]
    for whole, part in zip(board.boards, joined.boards):
        assert sorted(c.method for c in part.curves) == sorted(c.method for c in whole.curves)
        assert part.baseline == "trn" and part.reference == whole.reference
        assert {c.method: c for c in part.curves} == {c.method: c for c in whole.curves}
    assert joined.cost == {"runs": 40, "run_hours": 5.0}
    assert "| ours" in markdown(joined, resamples=50).split("### Against trn")[1]


def test_joining_parts_of_different_studies_or_one_method_twice_is_refused(board):
    from dataclasses import replace

    part = split(board, {"trn"})
    with pytest.raises(RankbenchError, match="trn is in two of them"):
        Leaderboard.join([part, part])
    with pytest.raises(RankbenchError, match="study rings_matched and other: their names differ"):
        Leaderboard.join([part, replace(split(board, {"ours"}), study="other")])
    moved = replace(split(board, {"ours"}), boards=tuple(replace(t, targets=(7.0,)) for t in board.boards))
    with pytest.raises(RankbenchError, match="targets or tolerance differ"):
        Leaderboard.join([part, moved])


def test_rankbench_leaderboard_joins_the_files_it_is_given(board, tmp_path, capsys):
    a = split(board, {"trn", "dense"}).write(tmp_path / "a" / "leaderboard.json")
    b = split(board, {"ours", "mars"}).write(tmp_path / "b" / "leaderboard.json")
    assert main(["leaderboard", str(a), str(b), "--out", str(tmp_path / "joined")]) == 0
    text = capsys.readouterr().out
    assert "| ours" in text and "| mars" in text and "| trn" in text and "40 runs trained" in text
    assert Leaderboard.read(tmp_path / "joined" / "leaderboard.json") == Leaderboard.join([Leaderboard.read(a),
                                                                                       Leaderboard.read(b)])
    assert main(["leaderboard", str(a), str(a), "--out", str(tmp_path / "x")]) == 2
    assert "trn is in two of them" in assert_one_line_error(capsys.readouterr().err)


# ---------------------------------------------------------------------------- the HTML page


class PageParser(HTMLParser):
    """Every start tag's attributes, the scripts' texts (with their attributes) and the rows' data-method."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.scripts: list[tuple[dict[str, str | None], str]] = []
        self._script: dict[str, str | None] | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "script":
            self._script, self._text = dict(attrs), []

    def handle_data(self, data):
        if self._script is not None:
            self._text.append(data)

    def handle_endtag(self, tag):
        if tag == "script" and self._script is not None:
            self.scripts.append((self._script, "".join(self._text)))
            self._script = None


def parse(page: str) -> PageParser:
    parser = PageParser()
    parser.feed(page)
    parser.close()
    return parser


def test_the_page_is_self_contained_with_one_figure_per_task(board, page):
    from plotly.offline import get_plotlyjs

    parsed = parse(page)
    for tag, attrs in parsed.tags:
        for name in ("src", "href"):
            assert not (attrs.get(name) or "").lower().startswith(("http://", "https://", "//")), (tag, attrs)
        assert not (tag == "script" and "src" in attrs), attrs
    assert "<script src" not in page.lower()
    assert page.count(get_plotlyjs()[:400]) == 1
    assert sum(len(text) > 1_000_000 for _, text in parsed.scripts) == 1

    figures = [attrs for tag, attrs in parsed.tags if tag == "div" and FIGURE_CLASS in (attrs.get("class") or "")]
    assert [f["data-task"] for f in figures] == [b.task for b in board.boards]
    data = {attrs["id"]: json.loads(text) for attrs, text in parsed.scripts if attrs.get("type") == "application/json"}
    for figure in figures:
        spec = data[f"{figure['id']}-data"]
        assert {"ours", "trn", "mars"} <= {trace.get("name") for trace in spec["data"]}
        assert spec["layout"]["xaxis"]["type"] == "log"
        assert all(trace["error_y"]["visible"] for trace in spec["data"])
        assert spec["config"]["displaylogo"] is False and spec["config"]["showSendToCloud"] is False
    mlp = data["figure-1-data"]
    assert any(s.get("line", {}).get("dash") == "dash" for s in mlp["layout"]["shapes"])  # the dense reference
    assert sum(s["xref"] == "x" for s in mlp["layout"]["shapes"]) == 4  # the targets
    axes = {t["name"]: t["yaxis"] for t in mlp["data"]}
    assert axes == {"ours": "y", "trn": "y", "mars": "y2"}  # mars at chance, in a panel of its own
    trn = next(t for t in mlp["data"] if t["name"] == "trn")
    assert "rank 12-13 interpolated" in trn["text"][1] and "3 seed(s)" in trn["text"][1]

    rows = [attrs["data-method"] for tag, attrs in parsed.tags if tag == "tr" and "data-method" in attrs]
    for method in METHODS:
        assert rows.count(method) >= 2 * len(board.boards) - 1, (method, rows)  # targets, summary (where shown)
    assert "collapses to chance on rings" in page and "12.9x, missed" in page


def test_the_accuracy_axis_breaks_only_for_a_gap_wider_than_half_the_span():
    assert split_at([10.1, 9.9, 83.0, 88.9]) == pytest.approx((10.1 + 83.0) / 2)
    assert split_at([60.0, 83.0, 85.0, 88.9]) == pytest.approx(71.5)
    assert split_at([83.0, 85.0, 88.9]) is None and split_at([88.1, 88.2, 88.9]) is None  # no wide gap
    assert split_at([50.0]) is None and split_at([]) is None


def test_write_page_writes_the_html_and_the_markdown(board, tmp_path):
    paths = write_page(board, tmp_path / "out")
    assert [p.name for p in paths] == ["leaderboard.html", "leaderboard.md"]
    assert paths[0].read_text().startswith("<!DOCTYPE html>")
    assert paths[1].read_text().startswith("# rings_matched")


# ---------------------------------------------------------------------------- rankbench leaderboard


def test_the_cli_prints_the_markdown_and_writes_the_page(board, tmp_path, capsys):
    path = board.write(tmp_path / "study" / "leaderboard.json")
    out = tmp_path / "pages"
    assert main(["leaderboard", str(path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("# rings_matched") and "| mars" in printed
    assert f"wrote {out / 'leaderboard.html'}" in printed and f"wrote {out / 'leaderboard.md'}" in printed
    assert (out / "leaderboard.html").stat().st_size > 1_000_000 and (out / "leaderboard.md").exists()


def test_the_cli_refuses_what_is_not_a_leaderboard_in_one_line(board, tmp_path, uri, capsys):
    (tmp_path / "notes.json").write_text("not json at all")
    (tmp_path / "other.json").write_text(json.dumps({"format": "something/1", "rows": []}))
    cases = {
        str(tmp_path / "missing.json"): "cannot read",
        str(tmp_path / "notes.json"): "is not JSON",
        str(tmp_path / "other.json"): "is not a rankbench leaderboard",
    }
    for argument, why in cases.items():
        assert main(["leaderboard", argument, "--out", str(tmp_path / "o")]) == 2
        assert why in assert_one_line_error(capsys.readouterr().err)
    assert main(["leaderboard", "--study", "nosuch", "--tracking-uri", uri]) == 2
    assert "no matched-compression study" in assert_one_line_error(capsys.readouterr().err)
    assert main(["leaderboard", "--study", "nosuch", "--tracking-uri", f"sqlite:///{tmp_path / 'none.db'}"]) == 2
    assert "no tracking store" in assert_one_line_error(capsys.readouterr().err)
    assert main(["leaderboard"]) == 2
    assert "give the leaderboard" in assert_one_line_error(capsys.readouterr().err)
    assert not (tmp_path / "o").exists()


def test_the_cli_reads_the_newest_matched_run_of_a_study_from_mlflow(board, tmp_path, uri, capsys):
    from rankbench.run.tracking import Tracker

    tracker = Tracker(uri)
    tags = {"study": board.study, "rankbench.role": "matched"}
    older = tracker.start("rings_matched", "older", {}, tags)
    tracker.log_text(older, Leaderboard("rings_matched", "an older attempt", ()).to_json(), "leaderboard.json")
    tracker.finish(older)
    trial = tracker.start("rings_matched", "a trial", {}, {"study": board.study})  # a child run: not read
    tracker.log_text(trial, "{}", "leaderboard.json")
    newest = tracker.start("rings_matched", "parent", {}, tags)
    tracker.log_text(newest, board.to_json(), "leaderboard.json")

    assert main(["leaderboard", "--study", board.study, "--tracking-uri", uri, "--out", str(tmp_path / "o")]) == 0
    printed = capsys.readouterr().out
    assert "an older attempt" not in printed and "## mlp2 on fmnist" in printed
    assert (tmp_path / "o" / "leaderboard.html").exists()
    assert main(["leaderboard", "--study", board.study, "--tracking-uri", uri, "--format", "html"]) == 0
    assert "<table>" in capsys.readouterr().out and (tmp_path / "leaderboard" / "leaderboard.md").exists()

    bare = tracker.start("rings_matched", "unfinished", {}, tags)
    assert bare
    assert main(["leaderboard", "--study", board.study, "--tracking-uri", uri]) == 2
    assert "has no leaderboard.json yet" in assert_one_line_error(capsys.readouterr().err)


# ---------------------------------------------------------------------------- in a browser


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("no chromium or chromium-browser on PATH (Debian: apt-get install chromium): the page is "
                    "checked statically only")
    return found


def _render(chromium: str, page: Path, profile: Path, *extra: str) -> subprocess.CompletedProcess:
    """Headless Chromium with every host unresolvable, so the page can only draw from what it holds."""
    command = [chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--no-first-run", "--hide-scrollbars", f"--user-data-dir={profile}",
               "--host-resolver-rules=MAP * ~NOTFOUND", "--virtual-time-budget=5000", *extra, page.as_uri()]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


def test_chromium_draws_every_figure_offline(board, page, tmp_path):
    chromium = _chromium()
    path = tmp_path / "leaderboard.html"
    path.write_text(page, encoding="utf-8")
    dumped = _render(chromium, path, tmp_path / "profile", "--dump-dom")
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    dom = dumped.stdout
    starts = [dom.index(f'id="figure-{i}"') for i in range(1, len(board.boards) + 1)]
    for start, end in zip(starts, [*starts[1:], len(dom)]):
        drawn = dom[start:end]
        assert 'class="main-svg"' in drawn
        legend = set(re.findall(r'class="legendtext"[^>]*>([^<]*)<', drawn))
        assert set(METHODS) <= legend, legend
    for tag, attrs in parse(dom).tags:  # nor did plotly add a link or a button that leaves the page
        assert not (attrs.get("href") or attrs.get("src") or "").startswith(("http:", "https:", "//")), (tag, attrs)
        assert "share" not in (attrs.get("data-title") or "").lower(), attrs

    shot = tmp_path / "leaderboard.png"
    taken = _render(chromium, path, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1400,2400")
    assert taken.returncode == 0, taken.stderr[-2000:]
    assert shot.exists() and shot.stat().st_size > 20_000
