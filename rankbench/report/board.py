"""A leaderboard's data: per task, every method's accuracy-vs-compression curve at matched targets.

A matched-compression study (``rankbench.study.matched_runner``) writes one ``Leaderboard`` as JSON
(``leaderboard.json`` in its folder and as an artifact of its parent MLflow run); ``rankbench
leaderboard`` renders it as Markdown tables and one self-contained HTML page. The JSON is the
interface between the two: everything a reader of the page needs, nothing read back from the store.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
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
