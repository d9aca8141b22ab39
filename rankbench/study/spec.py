"""Study files (TOML under ``studies/``): parsed and validated before any storage is touched."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from rankbench.errors import RankbenchError
from rankbench.plugins.hyper import Hyper
from rankbench.plugins.registry import Registry
from rankbench.run import records

OBJECTIVE_METRICS = (
    records.VAL_ACCURACY, records.VAL_LOSS, records.COMPRESSION, records.TOTAL_RANK, records.PARAMETERS,
    records.TRAIN_SECONDS_PER_BATCH, records.INFERENCE_SECONDS,
)
"""Metrics a trial records (mean over its seeds) that a study may optimise."""
RECORDED_ONLY = (records.TEST_ACCURACY, records.TEST_TOP5)
"""Recorded per trial for the reader, never optimised."""
PER_EPOCH_METRICS = tuple(m for m in OBJECTIVE_METRICS if m.kind == "epoch")
"""Objectives known after every epoch (a pruner needs one)."""
SAMPLERS = ("grid", "tpe", "random", "nsga2")
PRUNERS = ("none", "median")


@dataclass(frozen=True)
class SearchParam:
    """One searched hyperparameter: a grid, a numeric range or a categorical choice."""

    name: str
    kind: str  # "grid" | "float" | "int" | "categorical"
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()

    def suggest(self, trial) -> Any:
        if self.kind in ("grid", "categorical"):
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), log=self.log)


@dataclass(frozen=True)
class StudySpec:
    """A validated study: what to search, how, on what budget."""

    name: str
    task: str
    methods: tuple[str, ...]
    objectives: dict[str, str]
    search: dict[str, SearchParam]
    fixed: dict[str, Any] = field(default_factory=dict)
    method_fixed: dict[str, dict[str, Any]] = field(default_factory=dict)
    method_search: dict[str, dict[str, SearchParam]] = field(default_factory=dict)
    budget_steps: int | None = None
    seeds: tuple[int, ...] = (0,)
    sampler: str = "tpe"
    sampler_seed: int = 0
    pruner: str = "none"
    n_trials: int | None = None
    timeout_s: float | None = None
    heartbeat_interval: int = 10
    grace_period: int = 30
    description: str = ""
    source: str = ""
    tasks: tuple[str, ...] = ()
    """Every task of the study (``task`` is the first); several make ``task`` a grid parameter."""

    @property
    def directions(self) -> list[str]:
        return list(self.objectives.values())

    def grid(self) -> dict[str, list[Any]]:
        """The GridSampler search space (the method too, when several are compared).

        With ``[method_search.NAME]`` tables the methods search different keys, so
        the grid is one categorical ``point`` over every method's own grid points
        (see ``points``), crossed with the shared ``[search]`` grids."""
        space: dict[str, list[Any]] = {}
        if len(self.tasks) > 1:
            space["task"] = list(self.tasks)
        if self.method_search:
            space["point"] = list(self.points())
        elif len(self.methods) > 1:
            space["method"] = list(self.methods)
        space.update({name: list(p.choices) for name, p in self.search.items()})
        return space

    def points(self) -> dict[str, tuple[str, dict[str, Any]]]:
        """Label → (method, values) of every method's own grid (``[method_search]``), e.g.
        ``"trn rank=5"`` → ``("trn", {"rank": 5})``; a method without a table is one point."""
        out: dict[str, tuple[str, dict[str, Any]]] = {}
        for method in self.methods:
            params = self.method_search.get(method, {})
            combos: list[dict[str, Any]] = [{}]
            for name, param in params.items():
                combos = [{**c, name: v} for c in combos for v in param.choices]
            for values in combos:
                label = " ".join([method, *(f"{k}={v}" for k, v in values.items())])
                out[label] = (method, values)
        return out

    def grid_size(self) -> int:
        size = 1
        for values in self.grid().values():
            size *= len(values)
        return size

    def budget(self) -> int:
        """Trials to finish: the file's ``n_trials``, else the grid's size."""
        if self.n_trials is not None:
            return self.n_trials
        if self.sampler == "grid":
            return self.grid_size()
        raise RankbenchError(f"study {self.name}: set [budget] n_trials (only a grid study has a natural size)")

    def with_overrides(self, *, n_trials: int | None = None, seeds: tuple[int, ...] | None = None,
                       fixed: Mapping[str, Any] | None = None, registry: Registry | None = None) -> "StudySpec":
        spec = self
        if n_trials is not None:
            if n_trials < 1:
                raise RankbenchError("--n-trials must be >= 1")
            if spec.sampler == "grid" and n_trials > spec.grid_size():
                raise RankbenchError(f"--n-trials {n_trials} exceeds the grid's {spec.grid_size()} points")
            spec = replace(spec, n_trials=n_trials)
        if seeds is not None:
            spec = replace(spec, seeds=tuple(seeds))
        if fixed:
            if registry is not None:
                _check_keys(registry, spec.tasks, spec.methods, fixed, "--set")
            spec = replace(spec, fixed={**spec.fixed, **fixed})
        return spec


def _declared(registry: Registry, tasks: str | tuple[str, ...], methods: tuple[str, ...]) -> dict[str, Hyper]:
    out: dict[str, Hyper] = {}
    for task in (tasks,) if isinstance(tasks, str) else tasks:
        out.update(registry.task(task).hyperparameters)
    for method in methods:
        out.update(registry.method(method).hyperparameters)
    return out


def _check_keys(registry: Registry, tasks: str | tuple[str, ...], methods: tuple[str, ...], keys, where: str) -> None:
    declared = _declared(registry, tasks, methods)
    named = tasks if isinstance(tasks, str) else ", ".join(tasks)
    for key in keys:
        if key not in declared:
            raise RankbenchError(
                f"{where}: unknown hyperparameter {key!r} for task {named} and methods {', '.join(methods)}: "
                f"valid are {', '.join(sorted(declared))}"
            )


def _search_param(name: str, raw: Any, declared: dict[str, Hyper], where: str) -> SearchParam:
    if not isinstance(raw, dict):
        raise RankbenchError(f"{where}.{name}: write a table, e.g. {{ grid = [0.2, 1.0] }} or {{ low = 0.1, high = 1 }}")
    hyper = declared[name]
    if "grid" in raw or "choices" in raw:
        key = "grid" if "grid" in raw else "choices"
        values = raw[key]
        if not isinstance(values, list) or not values:
            raise RankbenchError(f"{where}.{name}: {key} must be a non-empty list")
        checked = tuple(hyper.validate(name, v) for v in values)
        return SearchParam(name, "grid" if key == "grid" else "categorical", choices=checked)
    if "low" not in raw or "high" not in raw:
        raise RankbenchError(f"{where}.{name}: give grid = [...], choices = [...], or low and high")
    kind = raw.get("type", "int" if hyper.kind is int else "float")
    if kind not in ("float", "int"):
        raise RankbenchError(f"{where}.{name}: type must be float or int")
    low, high = raw["low"], raw["high"]
    if not isinstance(low, (int, float)) or not isinstance(high, (int, float)) or not low < high:
        raise RankbenchError(f"{where}.{name}: empty range low={low!r}, high={high!r}: need low < high")
    log = bool(raw.get("log", False))
    if log and low <= 0:
        raise RankbenchError(f"{where}.{name}: a log range needs low > 0")
    hyper.validate(name, float(low) if hyper.kind is float else low)
    hyper.validate(name, float(high) if hyper.kind is float else high)
    unknown = set(raw) - {"low", "high", "log", "type"}
    if unknown:
        raise RankbenchError(f"{where}.{name}: unknown keys {sorted(unknown)}")
    return SearchParam(name, kind, low=low, high=high, log=log)


def load_study_file(path: Path, registry: Registry) -> StudySpec:
    """Read and validate a study file; every error is one line naming the fix."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise RankbenchError(f"cannot read study file {path} ({exc.strerror}): check the path") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RankbenchError(f"study file {path} is not valid TOML ({exc}): fix the syntax") from None
    return parse_study(raw, registry, where=str(path), source=text)


def parse_study(raw: dict, registry: Registry, where: str = "study", source: str = "") -> StudySpec:
    allowed = {"name", "task", "tasks", "methods", "method", "seeds", "description", "fixed", "method_fixed", "search",
               "method_search", "objectives", "sampler", "pruner", "budget", "workers", "budget_steps"}
    unknown = set(raw) - allowed
    if unknown:
        raise RankbenchError(f"{where}: unknown top-level keys {sorted(unknown)}: allowed are {sorted(allowed)}")
    for table in ("fixed", "method_fixed", "search", "method_search", "objectives", "sampler", "pruner", "budget", "workers"):
        if table in raw and not isinstance(raw[table], dict):
            raise RankbenchError(f"{where}: {table} must be a table: write [{table}] and then key = value lines")
    for key in ("name", "objectives"):
        if key not in raw:
            raise RankbenchError(f"{where}: missing {key!r}")
    name = raw["name"]
    if not isinstance(name, str) or not name.strip():
        raise RankbenchError(f"{where}: name must be a non-empty string")
    if ("task" in raw) == ("tasks" in raw):
        raise RankbenchError(f"{where}: give task = \"lenet5\" or tasks = [\"lenet5\", \"mlp2\"] (one of the two)")
    tasks = raw.get("tasks", [raw.get("task")])
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
        raise RankbenchError(f"{where}: tasks must be a non-empty list of task names")
    for task in tasks:
        registry.task(task)
    tasks = tuple(tasks)
    task = tasks[0]
    methods = raw.get("methods", [raw["method"]] if "method" in raw else None)
    if not methods or not isinstance(methods, list):
        raise RankbenchError(f"{where}: give methods = [\"ours\", ...]")
    for method in methods:
        registry.method(method)
    methods = tuple(methods)
    declared = _declared(registry, tasks, methods)

    fixed = dict(raw.get("fixed", {}))
    _check_keys(registry, tasks, methods, fixed, f"{where} [fixed]")
    method_fixed = {}
    for method, values in raw.get("method_fixed", {}).items():
        if method not in methods:
            raise RankbenchError(f"{where} [method_fixed.{method}]: {method} is not in methods")
        _check_keys(registry, tasks, (method,), values, f"{where} [method_fixed.{method}]")
        method_fixed[method] = dict(values)

    search = {}
    for key, value in raw.get("search", {}).items():
        _check_keys(registry, tasks, methods, [key], f"{where} [search]")
        search[key] = _search_param(key, value, declared, f"{where} [search]")

    method_search: dict[str, dict[str, SearchParam]] = {}
    for method, values in raw.get("method_search", {}).items():
        if method not in methods:
            raise RankbenchError(f"{where} [method_search.{method}]: {method} is not in methods")
        if not isinstance(values, dict) or not values:
            raise RankbenchError(f"{where} [method_search.{method}]: give key = {{ grid = [...] }} lines")
        own = _declared(registry, tasks, (method,))
        _check_keys(registry, tasks, (method,), values, f"{where} [method_search.{method}]")
        shared = set(values) & set(search)
        if shared:
            raise RankbenchError(f"{where} [method_search.{method}]: {sorted(shared)[0]} is also in [search]: keep one")
        method_search[method] = {key: _search_param(key, value, own, f"{where} [method_search.{method}]")
                                 for key, value in values.items()}

    budget_steps = raw.get("budget_steps")
    if budget_steps is not None and (not isinstance(budget_steps, int) or isinstance(budget_steps, bool)
                                     or budget_steps < 1):
        raise RankbenchError(f"{where}: budget_steps must be a positive integer (optimizer steps per run)")

    objectives = raw["objectives"]
    if not isinstance(objectives, dict) or not objectives:
        raise RankbenchError(f"{where} [objectives]: give e.g. val_accuracy = \"maximize\"")
    for metric, direction in objectives.items():
        if metric in RECORDED_ONLY:
            raise RankbenchError(
                f"{where} [objectives]: {metric} is a test metric: studies optimise validation metrics "
                f"({', '.join(OBJECTIVE_METRICS)}); test metrics are recorded, never optimised"
            )
        if metric not in OBJECTIVE_METRICS:
            raise RankbenchError(
                f"{where} [objectives]: no run records {metric!r}: choose from {', '.join(OBJECTIVE_METRICS)}"
            )
        if direction not in ("maximize", "minimize"):
            raise RankbenchError(f"{where} [objectives]: {metric} = {direction!r}: use maximize or minimize")

    sampler_raw = raw.get("sampler", {})
    sampler = sampler_raw.get("name", "tpe")
    if sampler not in SAMPLERS:
        raise RankbenchError(f"{where} [sampler]: unknown sampler {sampler!r}: choose one of {', '.join(SAMPLERS)}")
    if sampler == "grid":
        ranged = [p.name for p in search.values() if p.kind in ("float", "int")]
        ranged += [p.name for params in method_search.values() for p in params.values() if p.kind in ("float", "int")]
        if ranged:
            raise RankbenchError(f"{where}: the grid sampler needs grid = [...] for {', '.join(ranged)}")
    pruner = raw.get("pruner", {}).get("name", "none")
    if pruner not in PRUNERS:
        raise RankbenchError(f"{where} [pruner]: unknown pruner {pruner!r}: choose one of {', '.join(PRUNERS)}")
    if pruner != "none" and len(objectives) > 1:
        raise RankbenchError(f"{where} [pruner]: Optuna cannot prune multi-objective trials: use name = \"none\"")
    if pruner != "none" and next(iter(objectives)) not in PER_EPOCH_METRICS:
        raise RankbenchError(
            f"{where} [pruner]: {next(iter(objectives))} is only known at the end of a run: prune on one of "
            f"{', '.join(PER_EPOCH_METRICS)}, or use name = \"none\""
        )

    budget = raw.get("budget", {})
    n_trials = budget.get("n_trials")
    if n_trials is not None and (not isinstance(n_trials, int) or n_trials < 1):
        raise RankbenchError(f"{where} [budget]: n_trials must be a positive integer")
    timeout = budget.get("timeout_s")
    if timeout is not None and (not isinstance(timeout, (int, float)) or timeout <= 0):
        raise RankbenchError(f"{where} [budget]: timeout_s must be a positive number")
    seeds = raw.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise RankbenchError(f"{where}: seeds must be a non-empty list of non-negative integers")
    workers = raw.get("workers", {})
    spec = StudySpec(
        name=name, task=task, methods=methods, objectives=dict(objectives), search=search, fixed=fixed,
        method_fixed=method_fixed, method_search=method_search, budget_steps=budget_steps, seeds=tuple(seeds), sampler=sampler,
        sampler_seed=int(raw.get("sampler", {}).get("seed", 0)), pruner=pruner, n_trials=n_trials,
        timeout_s=timeout, heartbeat_interval=int(workers.get("heartbeat_interval", 10)),
        grace_period=int(workers.get("grace_period", 30)), description=raw.get("description", ""),
        source=source, tasks=tasks,
    )
    if sampler == "grid" and n_trials is not None and n_trials > spec.grid_size():
        raise RankbenchError(f"{where}: n_trials {n_trials} exceeds the grid's {spec.grid_size()} points")
    return spec
