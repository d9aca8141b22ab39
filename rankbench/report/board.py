"""A leaderboard's data: per task, every method's accuracy-vs-compression curve at matched targets.

A matched-compression study (``rankbench.study.matched_runner``) writes one ``Leaderboard`` as JSON
(``leaderboard.json`` in its folder and as an artifact of its parent MLflow run); ``rankbench
leaderboard`` renders it as Markdown tables and one self-contained HTML page. The JSON is the
interface between the two: everything a reader of the page needs, nothing read back from the store.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from rankbench.errors import RankbenchError
from rankbench.report.curves import CurvePoint

FORMAT = "rankbench-leaderboard/1"


@dataclass(frozen=True)
class SeedRun:
    """One seed's run behind a point: its MLflow run id, the compression it reached, its test accuracy."""

    seed: int
    run_id: str
    compression: float
    accuracy: float


@dataclass(frozen=True)
class MatchedPoint:
    """One method at one target: how it was reached (``setting``, e.g. ``lambda=0.31`` or ``rank 12-13
    interpolated``), whether within the tolerance (``hit``), and the seeds' runs. An interpolated point
    (a uniform rank between two ranks) lists both ranks' runs and gives each seed's interpolated numbers
    in ``point``."""

    target: float
    setting: str
    hit: bool
    point: CurvePoint
    runs: tuple[SeedRun, ...]
    interpolated: bool = False


@dataclass(frozen=True)
class MethodCurve:
    method: str
    knob: str
    points: tuple[MatchedPoint, ...]
    note: str = ""
    """What a reader must know about the row (e.g. "collapses to chance on rings: see docs/mars_on_rings.md")."""

    def curve(self) -> list[CurvePoint]:
        return [p.point for p in self.points]


@dataclass(frozen=True)
class TaskBoard:
    task: str
    dataset: str
    targets: tuple[float, ...]
    tolerance: float
    curves: tuple[MethodCurve, ...]
    baseline: str | None = None
    """The method the others are tested against at each target."""
    reference: MatchedPoint | None = None
    """The uncompressed model (1x) at its defaults, when the study trains one."""


@dataclass(frozen=True)
class Leaderboard:
    study: str
    description: str
    boards: tuple[TaskBoard, ...]
    protocol: str = ""
    """How the points were found (search seed, replicate seeds, step budget), in words."""
    cost: dict[str, Any] = field(default_factory=dict)
    """``runs`` trained, ``run_hours`` (the sum of their wall times), ``searched`` runs of the search seed."""

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, **asdict(self)}, indent=1, sort_keys=False)

    def write(self, path: Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json())
        return path

    @classmethod
    def from_json(cls, text: str, where: str = "leaderboard") -> Leaderboard:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RankbenchError(f"{where} is not JSON ({exc}): "
                                 "give the leaderboard.json a matched study wrote") from None
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise RankbenchError(f"{where} is not a rankbench leaderboard ({FORMAT}): give the leaderboard.json a "
                                 "matched study wrote")
        try:
            return cls(raw["study"], raw["description"], tuple(_board(b) for b in raw["boards"]),
                       raw.get("protocol", ""), dict(raw.get("cost", {})))
        except (KeyError, TypeError, ValueError) as exc:
            raise RankbenchError(f"{where} is damaged ({type(exc).__name__}: {exc}): run the study again to "
                                 "rewrite it") from None

    @classmethod
    def join(cls, parts: Sequence[Leaderboard]) -> Leaderboard:
        """One leaderboard from the parts of a study split by method (``rankbench study FILE --methods
        ...`` on different machines or in different sessions): per task, every part's curves, the
        reference and baseline where a part has them, and the summed cost. The parts must be one study
        (name, protocol) with the same targets and tolerance per task, each method in one part only."""
        if not parts:
            raise RankbenchError("give at least one leaderboard to join")
        first = parts[0]
        for other in parts[1:]:
            if (other.study, other.protocol) != (first.study, first.protocol):
                what = "names" if other.study != first.study else "protocols"
                raise RankbenchError(f"cannot join leaderboards of study {first.study} and {other.study}: their "
                                     f"{what} differ; join only the parts of one study")
        tasks: dict[tuple[str, str], TaskBoard] = {}
        for part in parts:
            for board in part.boards:
                key = (board.task, board.dataset)
                if key not in tasks:
                    tasks[key] = board
                    continue
                held = tasks[key]
                if (board.targets, board.tolerance) != (held.targets, held.tolerance):
                    raise RankbenchError(f"cannot join the {board.task} boards of study {first.study}: their targets "
                                         "or tolerance differ; run every part from the same study file")
                twice = sorted({c.method for c in held.curves} & {c.method for c in board.curves})
                if twice:
                    raise RankbenchError(f"cannot join the {board.task} boards of study {first.study}: {twice[0]} is "
                                         "in two of them; give each method's part once")
                if held.baseline and board.baseline and held.baseline != board.baseline:
                    raise RankbenchError(f"cannot join the {board.task} boards of study {first.study}: their "
                                         f"baselines differ ({held.baseline}, {board.baseline})")
                tasks[key] = replace(held, curves=held.curves + board.curves,
                                     baseline=held.baseline or board.baseline,
                                     reference=held.reference or board.reference)
        cost: dict[str, Any] = {}
        for part in parts:
            for name, value in part.cost.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    cost[name] = round(cost.get(name, 0) + value, 2)
        return cls(first.study, first.description, tuple(tasks.values()), first.protocol, cost)

    @classmethod
    def read(cls, path: Path) -> Leaderboard:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise RankbenchError(f"cannot read {path} ({exc.strerror}): check the path") from None
        return cls.from_json(text, str(path))


def _point(raw: dict) -> MatchedPoint:
    p = raw["point"]
    return MatchedPoint(float(raw["target"]), str(raw["setting"]), bool(raw["hit"]),
                        CurvePoint(float(p["target"]), tuple(map(float, p["compressions"])),
                                   tuple(map(float, p["accuracies"]))),
                        tuple(SeedRun(int(r["seed"]), str(r["run_id"]), float(r["compression"]), float(r["accuracy"]))
                              for r in raw["runs"]),
                        bool(raw.get("interpolated", False)))


def _board(raw: dict) -> TaskBoard:
    curves = tuple(MethodCurve(c["method"], c["knob"], tuple(_point(p) for p in c["points"]), c.get("note", ""))
                   for c in raw["curves"])
    reference = _point(raw["reference"]) if raw.get("reference") else None
    return TaskBoard(raw["task"], raw["dataset"], tuple(map(float, raw["targets"])), float(raw["tolerance"]), curves,
                     raw.get("baseline"), reference)
