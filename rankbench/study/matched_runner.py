"""A matched-compression study: every method of every task at the same target compressions.

``rankbench study FILE`` runs a study file with a ``[matched]`` table here (ShrinkBench's protocol,
Blalock et al. 2020). Per task and method, by the kind of its compression knob (``Knob.found_by``):

- ``training`` (λ of a gate method): the knob is searched on the study's first seed, every measured
  run shared by all targets (``search_targets``), until a run lands within the tolerance; the other
  seeds then train at the value found;
- ``model`` (a uniform rank): the ranks around each target are read off the model (nothing trained);
  every seed trains at both, and the point is their interpolation in log compression, marked so;
- ``target``: the knob is the target; every seed trains at it.

Reference methods (no knob: dense) train at their defaults, the page's 1x line. Every run is an MLflow
run tagged ``study`` and ``matched.key`` (its settings), a child of the study's parent run (tag
``rankbench.role=matched``). Running the command again reads every finished run back instead of
training it, continues an interrupted one from its last checkpoint, and so replays the searches to
the same settings: it resumes after any interruption. The result is a ``Leaderboard``
(``leaderboard.json`` in the study's folder and as an artifact of the parent run).
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rankbench import records
from rankbench.errors import RankbenchError
from rankbench.plugins.method import Knob
from rankbench.plugins.registry import Registry
from rankbench.report.board import Leaderboard, MatchedPoint, MethodCurve, SeedRun, TaskBoard
from rankbench.report.curves import CurvePoint
from rankbench.run.config import RunOptions
from rankbench.run.tracking import DEFAULT_DIR, Tracker, run_identity
from rankbench.study.matched import KnobInterval, search_targets, uniform_compressions, uniform_rank_bracket
from rankbench.study.spec import StudySpec

ROLE = "matched"
KEY_TAG = "matched.key"
"""Tag of every run of a matched study: its task, method and settings, as JSON (what a resume looks up)."""


@dataclass(frozen=True)
class Job:
    """One unit of a worker's work: a knob search (``values`` None) or one run."""

    task: str
    method: str
    values: tuple[tuple[str, Any], ...] | None = None
    seed: int | None = None


@dataclass
class MatchedRun:
    """What a worker needs (picklable)."""

    spec: StudySpec
    options: RunOptions
    plugin_dirs: tuple[Path, ...]
    parent_run_id: str


def settings_key(task: str, method: str, values: dict[str, Any]) -> str:
    return json.dumps([task, method, values], sort_keys=True, default=str)


class MatchedRuns:
    """Trains (or reads back) one run of a matched study; loads each task's data once."""

    def __init__(self, run: MatchedRun, registry: Registry) -> None:
        self.run, self.registry = run, registry
        self.tracker = Tracker(run.options.tracking_uri)
        self._data: dict[str, Any] = {}

    def _runs(self, status: str) -> list[Any]:
        return self.tracker.runs(study=self.run.spec.name, status=status)

    def lookup(self, key: str, seed: int, statuses: Sequence[str] = ("FINISHED",)) -> list[str]:
        """Run ids of this study with these settings and seed, oldest first."""
        found = [r for status in statuses for r in self._runs(status)
                 if r.data.tags.get(KEY_TAG) == key and r.data.params.get(records.SEED) == str(seed)]
        return [r.info.run_id for r in sorted(found, key=lambda r: r.info.start_time)]

    def values(self, task: str, method: str, extra: dict[str, Any]) -> dict[str, Any]:
        spec = self.run.spec
        keys = set(self.registry.task(task).hyperparameters) | set(self.registry.method(method).hyperparameters)
        values = {k: v for k, v in spec.fixed.items() if k in keys}
        values.update({k: v for k, v in spec.method_fixed.get(method, {}).items() if k in keys})
        values.update(extra)
        return values

    def prepared(self, task: str, method: str, values: dict[str, Any], seed: int, tags: dict[str, str] | None = None):
        from rankbench.run.config import make_config
        from rankbench.run.prepare import prepare

        spec = self.run.spec
        options = replace(self.run.options, budget_steps=None if "epochs" in values else spec.budget_steps)
        config = make_config(self.registry, task, method, values, seeds=(seed,), progress=False, options=options,
                             tags=tags or {})
        task_cls = self.registry.task(task)
        data_key = json.dumps([task, {k: v for k, v in config.task_params.items() if k not in task_cls.recipe_keys}],
                              sort_keys=True, default=str)
        prepared = prepare(config, self.registry, data=self._data.get(data_key))
        self._data[data_key] = prepared.data
        return prepared

    def result(self, task: str, method: str, values: dict[str, Any], seed: int, train: bool = True):
        """The run's ``RunResult``: read back when finished, else trained (continuing an interrupted
        attempt from its checkpoint); None when ``train`` is False and it has not finished."""
        from rankbench.run.experiment import recorded_result
        from rankbench.run.experiment import run as run_experiment

        key = settings_key(task, method, values)
        finished = self.lookup(key, seed)
        if finished:
            return recorded_result(self.tracker, finished[-1])
        if not train:
            return None
        spec = self.run.spec
        tags = {"mlflow.parentRunId": self.run.parent_run_id, "study": spec.name, KEY_TAG: key}
        earlier = {seed: self.lookup(key, seed, ("RUNNING", "FAILED", "KILLED"))}
        results = run_experiment(self.prepared(task, method, values, seed, tags), tracker=self.tracker,
                                 earlier=earlier)
        return results[0]


def knob_of(registry: Registry, method: str) -> Knob | None:
    return registry.method(method).compression_knob


def start_value(matched: MatchedRuns, task: str, method: str, knob: Knob, interval: KnobInterval) -> float:
    """The method's resolved default for its knob (or the study's ``start``); the interval's middle when
    the default is none (decided by another option, as MARS's prior by its mode)."""
    spec = matched.run.spec
    if method in spec.matched.start:
        return float(spec.matched.start[method])
    from rankbench.run.config import make_config

    config = make_config(matched.registry, task, method, matched.values(task, method, {}))
    value = config.method_params.get(knob.name)
    if value is None:
        return math.sqrt(interval.low * interval.high) if interval.log else (interval.low + interval.high) / 2
    return float(value)


def initial_compression(matched: MatchedRuns, task: str, method: str) -> float:
    """The compression of the model ``method`` starts from on ``task`` (its ``initial_rank`` of the task's),
    counted on the ``meta`` device: a method that learns ranks by removing slices never compresses less."""
    prepared = matched.prepared(task, method, matched.values(task, method, {}), matched.run.spec.seeds[0])
    rank = prepared.method_cls(prepared.method_params).initial_rank(prepared.task.params["initial_rank"])
    return uniform_compressions(prepared.task, range(rank, rank + 1))[rank]


def measured_runs(matched: MatchedRuns, task: str, method: str, knob: Knob,
                  interval: KnobInterval) -> dict[float, float]:
    """Knob value -> compression of every finished run of the first seed of this (task, method) whose other
    settings are the study's: what a search knows before it trains anything (so a resumed search never
    retrains a value, whatever order it measured them in)."""
    seed = str(matched.run.spec.seeds[0])
    measured = {}
    for run in matched._runs("FINISHED"):
        key = run.data.tags.get(KEY_TAG)
        if key is None or run.data.params.get(records.SEED) != seed:
            continue
        run_task, run_method, values = json.loads(key)
        if (run_task, run_method) != (task, method) or knob.name not in values:
            continue
        value = float(values[knob.name])
        if values == matched.values(task, method, {knob.name: _typed(value, interval)}):
            measured[value] = float(run.data.metrics[records.COMPRESSION])
    return measured


def search(matched: MatchedRuns, task: str, method: str,
           train: bool = True) -> tuple[dict[float, Any], dict[float, float]] | None:
    """The knob search of one (task, method) on the first seed: (target -> ``KnobSearch``, target -> the
    initial model's compression for every target below it, which pruning cannot reach); with ``train``
    False a replay that trains nothing and returns None if a run it needs has not finished."""
    spec = matched.run.spec
    knob = knob_of(matched.registry, method)
    interval = KnobInterval.of(matched.registry.method(method))
    seed = spec.seeds[0]
    floor = initial_compression(matched, task, method)
    unreachable = {t: floor for t in spec.matched.targets if t * (1 + spec.matched.tolerance) < floor}
    targets = [t for t in spec.matched.targets if t not in unreachable]

    class Unfinished(Exception):
        pass

    def measure(value: float) -> float:
        result = matched.result(task, method, matched.values(task, method, {knob.name: _typed(value, interval)}),
                                seed, train=train)
        if result is None:
            raise Unfinished
        return result.compression

    try:
        searches = search_targets(measure, knob, interval, targets, start_value(matched, task, method, knob, interval),
                                  tolerance=spec.matched.tolerance, max_runs=spec.matched.max_runs,
                                  measured=measured_runs(matched, task, method, knob, interval)) if targets else {}
    except Unfinished:
        return None
    return searches, unreachable


def _typed(value: float, interval: KnobInterval) -> int | float:
    return int(value) if interval.integer else float(value)


@dataclass(frozen=True)
class Planned:
    """A point's plan: the runs (values per seed) it needs and how to combine them."""

    task: str
    method: str
    target: float
    setting: str
    hit: bool
    runs: tuple[tuple[dict[str, Any], int], ...]
    weight: float | None = None
    """For an interpolated point: the runs are (above, below) per seed, and the weight of ``below``."""


def plan_points(matched: MatchedRuns, task: str, method: str,
                searches: tuple[dict[float, Any], dict[float, float]] | None) -> tuple[list[Planned], list[str]]:
    """Every target's planned runs for one (task, method), and notes on targets it cannot reach."""
    spec = matched.run.spec
    registry = matched.registry
    knob = knob_of(registry, method)
    seeds = spec.seeds
    planned: list[Planned] = []
    notes: list[str] = []
    if knob is None:
        values = matched.values(task, method, {})
        return [Planned(task, method, 1.0, "defaults", True, tuple((values, s) for s in seeds))], notes
    if knob.found_by == "training":
        interval = KnobInterval.of(registry.method(method))
        found_at, unreachable = searches
        notes += [f"no point at {t:g}x: below the {c:.3g}x of the model it starts from (it only removes rank)"
                  for t, c in unreachable.items()]
        for target, found in found_at.items():
            value = _typed(found.best[0], interval)
            values = matched.values(task, method, {knob.name: value})
            planned.append(Planned(task, method, target, f"{knob.name}={value:g}", found.hit,
                                   tuple((values, s) for s in seeds)))
    elif knob.found_by == "target":
        for target in spec.matched.targets:
            values = matched.values(task, method, {knob.name: target})
            planned.append(Planned(task, method, target, f"{knob.name}={target:g}", True,
                                   tuple((values, s) for s in seeds)))
    else:
        interval = KnobInterval.of(registry.method(method))
        values = matched.values(task, method, {knob.name: int(interval.low)})
        prepared_task = matched.prepared(task, method, values, seeds[0]).task
        compressions = uniform_compressions(prepared_task, range(int(interval.low), int(interval.high) + 1))
        for target in spec.matched.targets:
            try:
                bracket = uniform_rank_bracket(compressions, target)
            except ValueError as exc:
                notes.append(f"no point at {target:g}x: {exc}")
                continue
            above = matched.values(task, method, {knob.name: bracket.above})
            if bracket.exact:
                planned.append(Planned(task, method, target, f"{knob.name}={bracket.above}", True,
                                       tuple((above, s) for s in seeds)))
                continue
            below = matched.values(task, method, {knob.name: bracket.below})
            runs = tuple(pair for s in seeds for pair in ((above, s), (below, s)))
            planned.append(Planned(task, method, target, f"{knob.name} {bracket.above}-{bracket.below} interpolated "
                                           f"(w={bracket.weight:.2f})", True, runs, bracket.weight))
    return planned, notes


def assemble(matched: MatchedRuns, plan: Planned, results: Sequence[Any]) -> MatchedPoint:
    """A planned point from its finished runs' ``RunResult``s (in ``plan.runs`` order)."""
    runs = tuple(SeedRun(r.seed, r.run_id, r.compression, r.test_accuracy) for r in results)
    if plan.weight is None:
        point = CurvePoint(plan.target, tuple(r.compression for r in results), tuple(r.test_accuracy for r in results))
        within = abs(point.compression / plan.target - 1) <= matched.run.spec.matched.tolerance
        return MatchedPoint(plan.target, plan.setting, plan.hit and (plan.target == 1.0 or within), point, runs)
    w = plan.weight
    pairs = list(zip(results[0::2], results[1::2]))
    compressions = tuple(10 ** ((1 - w) * math.log10(a.compression) + w * math.log10(b.compression)) for a, b in pairs)
    accuracies = tuple((1 - w) * a.test_accuracy + w * b.test_accuracy for a, b in pairs)
    return MatchedPoint(plan.target, plan.setting, True, CurvePoint(plan.target, compressions, accuracies), runs,
                        interpolated=True)


def _jobs_of(plans: dict[tuple[str, str], list[Planned]]) -> list[Job]:
    """Every distinct run the plans need, in plan order."""
    seen: dict[Job, None] = {}
    for plan_list in plans.values():
        for plan in plan_list:
            for values, seed in plan.runs:
                seen.setdefault(Job(plan.task, plan.method, tuple(sorted(values.items())), seed))
    return list(seen)


def do_job(matched: MatchedRuns, job: Job) -> None:
    if job.values is None:
        search(matched, job.task, job.method)
    else:
        matched.result(job.task, job.method, dict(job.values), job.seed)


def _worker_main(run: MatchedRun, jobs: list[Job]) -> None:
    """A worker process: its share of the jobs, one torch thread unless told; stopped by SIGINT or SIGTERM
    like the CLI (its run KILLED, continued by the next command)."""
    from rankbench.run.stopping import exit_code, graceful_stop

    with graceful_stop():
        try:
            import torch

            torch.set_num_threads(run.options.threads or 1)
            matched = MatchedRuns(run, Registry.discover(plugin_dirs=run.plugin_dirs))
            for job in jobs:
                do_job(matched, job)
        except KeyboardInterrupt as exc:
            raise SystemExit(exit_code(exc)) from None
        except RankbenchError as exc:
            print(f"rankbench: error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None


def execute(run: MatchedRun, matched: MatchedRuns, jobs: list[Job], workers: int) -> None:
    """Do ``jobs``: in this process with one worker, else round-robin over ``workers`` processes."""
    if workers == 1 or len(jobs) <= 1:
        for job in jobs:
            do_job(matched, job)
        return
    from rankbench.study.runner import run_processes

    count = min(workers, len(jobs))
    bad = run_processes(_worker_main, [(run, jobs[i::workers]) for i in range(count)])
    if bad:
        raise RankbenchError(f"{len(bad)} of {count} workers failed (exit codes {bad}): run the same command "
                             "again to resume (finished runs are kept)")


def run_settings(canonical: dict[str, Any], methods: Sequence[str]) -> dict[str, Any]:
    """What decides the runs of a matched study, from its ``canonical`` form, with the per-method
    settings of ``methods`` only: a leaderboard grows (a new method, another target, another
    baseline) without retraining what it holds, since every run is looked up by its own settings;
    the seeds, the budget, the fixed values and the search protocol must stay."""
    data = json.loads(json.dumps(canonical))
    data.pop("methods", None)
    for key in ("method_fixed", "method_search"):
        data[key] = {m: v for m, v in data.get(key, {}).items() if m in methods}
    matched = data.get("matched", {})
    for key in ("targets", "baseline", "notes"):
        matched.pop(key, None)
    matched["start"] = {m: v for m, v in (matched.get("start") or {}).items() if m in methods}
    return data


def ensure_parent(tracker: Tracker, spec: StudySpec) -> str:
    """The study's parent run: found again by its name on resume, else created. A resume may add
    methods or targets (``run_settings``); any other change of the file's settings is refused. The
    parent's ``spec.json`` and ``study.toml`` are the file's latest."""
    from rankbench.study.spec import first_difference

    found = [r for status in ("FINISHED", "RUNNING", "FAILED", "KILLED")
             for r in tracker.runs(study=spec.name, status=status)
             if r.data.tags.get("rankbench.role") == ROLE]
    if found:
        parent = max(found, key=lambda r: r.info.start_time)
        if parent.data.params.get("spec_digest") != spec.digest():
            try:
                stored = json.loads(tracker.download_artifact(parent.info.run_id, "spec.json").read_text())
            except (RankbenchError, OSError, ValueError):
                stored = {}
            common = [m for m in spec.methods if m in stored.get("methods", ())]
            new, old = run_settings(spec.canonical(), common), run_settings(stored, common) if stored else {}
            if new != old:
                _, how = first_difference(new, old)
                raise RankbenchError(f"matched study {spec.name} in {tracker.uri} was run from other settings "
                                     f"({how}): give the study another name, or use another --tracking-uri")
        tracker.reopen(parent.info.run_id, run_identity())
        _log_spec(tracker, parent.info.run_id, spec)
        return parent.info.run_id
    params = {"study": spec.name, "task": ",".join(spec.tasks), "methods": ",".join(spec.methods),
              "seeds": ",".join(map(str, spec.seeds)), "targets": ",".join(f"{t:g}" for t in spec.matched.targets),
              "tolerance": spec.matched.tolerance, "budget_steps": spec.budget_steps, "spec_digest": spec.digest()}
    run_id = tracker.start(spec.task, f"matched {spec.name}", params,
                           {"rankbench.role": ROLE, "study": spec.name, "task": spec.task, **run_identity()})
    _log_spec(tracker, run_id, spec)
    return run_id


def _log_spec(tracker: Tracker, run_id: str, spec: StudySpec) -> None:
    tracker.log_text(run_id, json.dumps(spec.canonical(), indent=1), "spec.json")
    if spec.source:
        tracker.log_text(run_id, spec.source, "study.toml")


def protocol_text(spec: StudySpec) -> str:
    m = spec.matched
    rest = ", ".join(map(str, spec.seeds[1:]))
    others = f"seed{'s' if len(spec.seeds) > 2 else ''} {rest} train at the value found" if rest else "no other seed"
    steps = f"{spec.budget_steps:,} optimizer steps per run" if spec.budget_steps else "Each task's own epochs"
    return (f"Targets {', '.join(f'{t:g}x' for t in m.targets)} within ±{m.tolerance:.0%}. A learned method's knob is "
            f"searched on seed {spec.seeds[0]} (runs shared by all targets, at most {m.max_runs} new runs per target); "
            f"{others}, and each seed reports the compression it reached. A uniform "
            "rank's point interpolates the two ranks around the target in log10 compression, per seed. "
            f"{steps}; test accuracy of the final model.")


def build_board(matched: MatchedRuns, plans: dict[tuple[str, str], list[Planned]],
                notes: dict[tuple[str, str], list[str]]) -> Leaderboard:
    spec = matched.run.spec
    registry = matched.registry
    boards = []
    used: dict[str, float] = {}
    for task in spec.tasks:
        curves, reference, dataset = [], None, ""
        for method in spec.methods:
            if (task, method) not in plans:
                continue
            points = []
            for plan in plans[(task, method)]:
                results = [matched.result(task, method, values, seed, train=False) for values, seed in plan.runs]
                if any(r is None for r in results):
                    raise RankbenchError(f"a run of {method} on {task} at {plan.target:g}x has not finished: run the "
                                         "study again to train it")
                used.update({r.run_id: r.wall_seconds for r in results})
                dataset = dataset or results[0].dataset
                points.append(assemble(matched, plan, results))
            knob = knob_of(registry, method)
            if knob is None:
                reference = points[0]
                continue
            text = "; ".join([*notes.get((task, method), []), spec.matched.notes.get(task, {}).get(method, "")])
            curves.append(MethodCurve(method, knob.name, tuple(points), text.strip("; ")))
        boards.append(TaskBoard(task, dataset, spec.matched.targets, spec.matched.tolerance, tuple(curves),
                                spec.matched.baseline, reference))
    every = [r for r in matched.tracker.runs(study=spec.name) if KEY_TAG in r.data.tags]
    cost = {"runs": len(every), "runs_in_board": len(used), "search_runs_not_in_board": len(every) - len(used),
            "run_hours": round(sum(r.data.metrics.get(records.WALL_SECONDS, 0.0) for r in every) / 3600, 2)}
    return Leaderboard(spec.name, spec.description, tuple(boards), protocol_text(spec), cost)


def _stoppable():
    from rankbench.study.runner import _stoppable as stoppable

    return stoppable()


def run_matched(spec: StudySpec, *, options: RunOptions | None = None, workers: int = 1,
                plugin_dirs: Sequence[Path] = (), out_dir: Path | None = None) -> tuple[Leaderboard, list[Path]]:
    """Run (or resume) a matched study to its end; returns its leaderboard and the files written."""
    if spec.matched is None:
        raise RankbenchError(f"study {spec.name} has no [matched] table")
    if workers < 1:
        raise RankbenchError("--workers must be >= 1")
    options = (options or RunOptions()).checked()
    if options.budget_steps is not None:
        spec, options = replace(spec, budget_steps=options.budget_steps), replace(options, budget_steps=None)
    registry = Registry.discover(plugin_dirs=plugin_dirs)
    tracker = Tracker(options.tracking_uri)
    with _stoppable():
        parent = ensure_parent(tracker, spec)
        run = MatchedRun(spec, replace(options, tracking_uri=tracker.uri), tuple(plugin_dirs), parent)
        matched = MatchedRuns(run, registry)
        with tracker.ends_on_error(parent):
            searched = [Job(t, m) for t in spec.tasks for m in spec.methods
                        if (k := knob_of(registry, m)) is not None and k.found_by == "training"]
            execute(run, matched, searched, workers)
            plans: dict[tuple[str, str], list[Planned]] = {}
            notes: dict[tuple[str, str], list[str]] = {}
            for task in spec.tasks:
                for method in spec.methods:
                    knob = knob_of(registry, method)
                    if knob is None and not spec.matched.reference:
                        continue
                    by_training = knob is not None and knob.found_by == "training"
                    searches = search(matched, task, method, train=False) if by_training else None
                    if by_training and searches is None:
                        raise RankbenchError(f"the knob search of {method} on {task} did not finish: run the study "
                                             "again to continue it")
                    plans[(task, method)], notes[(task, method)] = plan_points(matched, task, method, searches)
            execute(run, matched, _jobs_of(plans), workers)
            board = build_board(matched, plans, notes)
            folder = Path(out_dir or DEFAULT_DIR / "studies" / spec.name)
            paths = [board.write(folder / "leaderboard.json")]
            with contextlib.suppress(ImportError):
                from rankbench.report.page import write_page

                paths += write_page(board, folder)
            tracker.log_text(parent, board.to_json(), "leaderboard.json")
        tracker.finish(parent)
    return board, paths
