"""Study files (TOML under ``studies/``): parsed and validated before any storage is touched."""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

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
TOP_LEVEL_KEYS = ("name", "description", "task", "tasks", "methods", "method", "seeds", "budget_steps", "fixed",
                  "method_fixed", "search", "method_search", "objectives", "sampler", "pruner", "budget", "workers",
                  "matched", "slurm", "progressive", "retrain")
PROGRESSIVE_KEYS = ("layers", "center", "steps", "population", "generations", "top_k", "half_width", "min_rank",
                    "max_rank", "min_compression", "seed")
TABLE_KEYS = {"sampler": ("name", "seed"), "pruner": ("name",), "budget": ("n_trials", "timeout_s"),
              "workers": ("heartbeat_interval", "grace_period"),
              "matched": ("targets", "tolerance", "max_runs", "baseline", "reference", "notes", "start"),
              "progressive": PROGRESSIVE_KEYS, "retrain": ("budget_steps",)}
"""The keys each settings table takes: any other is a typo, refused (it would be ignored)."""
SLURM_KEYS = ("partition", "time", "cpus_per_task", "mem", "gres", "account", "signal_delay_s", "max_requeues",
              "setup", "args")
"""The keys of a study file's ``[slurm]`` table (``rankbench study FILE --launcher slurm``): where and how its
worker jobs run. Not part of the study's digest: they may change when a study is resumed."""
SEED_LIMIT = 2**32
"""Seeds (of the runs, and of the sampler) lie in [0, 2³²): numpy and torch take them."""


@dataclass(frozen=True)
class SearchParam:
    """One searched hyperparameter: a grid, a numeric range or a categorical choice."""

    name: str
    kind: str  # "grid" | "float" | "int" | "categorical"
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()
    step: int = 1
    """An int range's step (a progressive study's window: every ``step``-th rank from ``low`` to ``high``)."""

    def suggest(self, trial) -> Any:
        if self.kind in ("grid", "categorical"):
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=self.step, log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), log=self.log)


@dataclass(frozen=True)
class MatchedSpec:
    """A matched-compression study's ``[matched]`` table: every method's compression knob is searched
    to reach each target (within ``tolerance``, relative) on the study's first seed, at most
    ``max_runs`` new runs per target, then the other seeds train at the setting found."""

    targets: tuple[float, ...]
    tolerance: float = 0.1
    max_runs: int = 4
    baseline: str | None = None
    """The method every other is tested against at each target."""
    reference: bool = True
    """Train the study's reference methods (no knob: dense, 1x) at their defaults, for the page's line."""
    notes: dict[str, dict[str, str]] = field(default_factory=dict)
    """task -> method -> what a reader of its row must know (e.g. why it collapses)."""
    start: dict[str, float] = field(default_factory=dict)
    """method -> where its knob's search starts (default: the method's resolved default)."""


LAYER_RANKS_KEY = "ranks"
"""The hyperparameter through which a method takes its own rank per layer (``trn``'s
``ranks=conv1:10,fc1:8``): what a progressive study searches."""


@dataclass(frozen=True)
class RetrainSpec:
    """A progressive study's ``[retrain]`` table: how the selected point is trained on the study's seeds."""

    budget_steps: int | None = None
    """Optimizer steps of each retraining run; None: the task's recipe at full length (its ``epochs``)."""


@dataclass(frozen=True)
class ProgressiveSpec:
    """A progressive study's ``[progressive]`` table (PSTRN, Li et al. 2021): one rank per layer (a gene),
    searched by NSGA-II in phases whose windows narrow around the best individuals of the phase before.

    Phase ``p`` samples every gene from ``c + j * steps[p]`` for ``j`` in ``-half_width..half_width`` (kept
    in ``[min_rank, max_rank]``): ``c`` is ``center`` in phase 1, then, per gene, its most frequent rank
    among the ``top_k`` best distinct individuals of phase ``p - 1`` (a tie: the better individual's rank).
    "Best" is ``selection_key``: at or above ``min_compression`` first, then the highest validation
    accuracy, then the highest compression. Each phase runs ``population[p] * generations[p]`` proxy
    trials (``budget_steps`` each, seed ``seed``); then the best point of all phases is trained again
    (``retrain``) on the study's seeds."""

    layers: tuple[str, ...]
    center: int
    steps: tuple[int, ...] = (5, 2, 1)
    population: tuple[int, ...] = (20, 20, 20)
    generations: tuple[int, ...] = (3, 3, 3)
    top_k: int = 5
    half_width: int = 2
    min_rank: int = 1
    max_rank: int | None = None
    min_compression: float = 1.0
    seed: int = 0
    """The seed of every proxy run (the retraining trains the study's seeds)."""
    retrain: RetrainSpec = field(default_factory=RetrainSpec)

    def phase_trials(self) -> tuple[int, ...]:
        """Proxy trials per phase: population x generations."""
        return tuple(p * g for p, g in zip(self.population, self.generations))

    def proxy_runs(self) -> int:
        """Proxy trials of the whole search (a trial repeating an earlier configuration trains nothing)."""
        return sum(self.phase_trials())

    def window(self, center: int, phase: int) -> tuple[int, int, int]:
        """``(low, high, step)`` of a gene's window in ``phase`` (counted from 0) around ``center``."""
        step = self.steps[phase]
        values = [center + j * step for j in range(-self.half_width, self.half_width + 1)]
        values = [v for v in values if v >= self.min_rank and (self.max_rank is None or v <= self.max_rank)]
        return min(values), max(values), step


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
    matched: MatchedSpec | None = None
    """Set for a matched-compression study (``[matched]``): run by ``rankbench.study.matched_runner``."""
    slurm: dict[str, Any] = field(default_factory=dict)
    """The file's ``[slurm]`` table, checked (``check_slurm``): options of ``--launcher slurm``'s worker jobs."""
    progressive: ProgressiveSpec | None = None
    """Set for a progressive study (``[progressive]``): run by ``rankbench.study.progressive``, phase by phase."""
    phase: int = 0
    """A progressive study's phase (from 1) that this spec runs as an Optuna study; 0: not a phase."""
    genes: tuple[str, ...] = ()
    """Searched names that are layers: a trial gives them to the method as ``ranks`` (``LAYER_RANKS_KEY``)."""
    population_size: int | None = None
    """NSGA-II's population (default: Optuna's, 50)."""
    reuse_from: tuple[str, ...] = ()
    """Other studies in the storage (a progressive study's earlier phases) whose finished trials a trial
    with the same settings reuses instead of training them again."""

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
        """Trials to finish: the file's ``n_trials``, else the grid's size (a progressive study: its proxy
        trials, or fewer with ``--n-trials``)."""
        if self.progressive is not None and not self.phase:
            total = self.progressive.proxy_runs()
            return total if self.n_trials is None else min(self.n_trials, total)
        if self.n_trials is not None:
            return self.n_trials
        if self.sampler == "grid":
            return self.grid_size()
        raise RankbenchError(f"study {self.name}: set [budget] n_trials (only a grid study has a natural size)")

    def with_overrides(self, *, n_trials: int | None = None, seeds: tuple[int, ...] | None = None,
                       fixed: Mapping[str, Any] | None = None, registry: Registry | None = None,
                       methods: Sequence[str] | None = None) -> StudySpec:
        """The spec with the command line's ``--n-trials``, ``--seeds``, ``--set`` (strings, parsed and
        checked against the declared hyperparameters when ``registry`` is given) and ``--methods``."""
        spec = self if methods is None else self.only_methods(methods)
        if n_trials is not None:
            if isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1:
                raise RankbenchError("--n-trials must be >= 1")
            if spec.sampler == "grid" and n_trials > spec.grid_size():
                raise RankbenchError(f"--n-trials {n_trials} exceeds the grid's {spec.grid_size()} points")
            if spec.progressive is not None and n_trials > spec.progressive.proxy_runs():
                raise RankbenchError(f"--n-trials {n_trials} exceeds the {spec.progressive.proxy_runs()} proxy runs of "
                                     f"progressive study {spec.name}: give fewer (a smoke run stops early)")
            spec = replace(spec, n_trials=n_trials)
        if seeds is not None:
            from rankbench.run.config import check_seeds

            spec = replace(spec, seeds=check_seeds(seeds, "--seeds"))
        if fixed:
            searched = sorted(set(fixed) & ({*spec.search} | {k for p in spec.method_search.values() for k in p}
                                            | ({LAYER_RANKS_KEY} if spec.progressive is not None else set())))
            if searched:
                raise RankbenchError(f"--set {searched[0]}: the study searches {searched[0]}, so every trial would "
                                     "overwrite it: drop it from --set, or from the file's search tables")
            if registry is not None:
                fixed = _checked_values(registry, spec.tasks, spec.methods, fixed, "--set", parse=True)
            spec = replace(spec, fixed={**spec.fixed, **fixed})
        return spec

    def only_methods(self, methods: Sequence[str]) -> StudySpec:
        """A matched study restricted to some of its methods (``--methods``), everything else as the file
        says. Its runs are found by their own settings, so a study split over machines or sessions trains
        each method once, and ``rankbench leaderboard A.json B.json`` joins the parts' boards. The
        baseline keeps its name when it is not among them: the joined board compares against it."""
        if self.matched is None:
            raise RankbenchError(f"--methods: study {self.name} is an Optuna study, whose trials draw from all its "
                                 "methods: edit its methods list (and its name) instead")
        unknown = [m for m in methods if m not in self.methods]
        if unknown or not methods:
            raise RankbenchError(f"--methods {','.join(unknown or methods) or '(empty)'}: name methods of study "
                                 f"{self.name} ({', '.join(self.methods)})")
        keep = tuple(m for m in self.methods if m in methods)
        matched = replace(self.matched, start={m: v for m, v in self.matched.start.items() if m in keep},
                          notes={t: {m: v for m, v in by.items() if m in keep} for t, by in self.matched.notes.items()})
        return replace(self, methods=keep, matched=matched,
                       method_fixed={m: v for m, v in self.method_fixed.items() if m in keep},
                       method_search={m: v for m, v in self.method_search.items() if m in keep})

    def canonical(self) -> dict[str, Any]:
        """What decides the trials of the study, as JSON-ready data: tasks, methods, search spaces, fixed
        values (the file's ``[fixed]`` and ``[method_fixed]`` with ``--set`` applied: they change what
        every trial trains), objectives, sampler, seeds and ``budget_steps``. Not the description or
        comments, nor the budget (``n_trials``, ``timeout_s``, ``--n-trials``) or ``[workers]``: those
        may change when a study is resumed."""

        def param(p: SearchParam) -> dict[str, Any]:
            out = {"kind": p.kind, "low": p.low, "high": p.high, "log": p.log, "choices": list(p.choices)}
            return out if p.step == 1 else {**out, "step": p.step}  # the digests of older studies stay

        data = {
            "tasks": list(self.tasks or (self.task,)), "methods": list(self.methods),
            "search": {k: param(p) for k, p in sorted(self.search.items())},
            "method_search": {m: {k: param(p) for k, p in sorted(ps.items())}
                              for m, ps in sorted(self.method_search.items())},
            "fixed": dict(sorted(self.fixed.items())),
            "method_fixed": {m: dict(sorted(v.items())) for m, v in sorted(self.method_fixed.items())},
            "objectives": [[k, v] for k, v in self.objectives.items()],
            "sampler": self.sampler, "sampler_seed": self.sampler_seed,
            "seeds": list(self.seeds), "budget_steps": self.budget_steps,
        }
        if self.matched is not None:
            data["matched"] = asdict(self.matched)
        if self.progressive is not None:  # the search, not the retraining (its runs are found by their settings)
            data["progressive"] = {k: v for k, v in asdict(self.progressive).items() if k != "retrain"}
        for key in ("phase", "genes", "population_size"):
            if getattr(self, key):
                data[key] = getattr(self, key)
        return json.loads(json.dumps(data, default=str))

    def digest(self) -> str:
        """sha256 of ``canonical``: a stored study remembers the one of the file it was created from."""
        return hashlib.sha256(json.dumps(self.canonical(), sort_keys=True).encode()).hexdigest()


def first_difference(new: Mapping[str, Any], old: Mapping[str, Any]) -> tuple[str, str]:
    """The first part of two ``canonical`` forms that differs, and how, e.g.
    ``("tasks", "tasks lenet5 here, mlp2 in the study")``."""

    def show(value: Any) -> str:
        if value is None:
            return "none"
        if isinstance(value, list) and all(not isinstance(v, (list, dict)) for v in value):
            text = ", ".join(map(str, value)) or "none"
        elif isinstance(value, dict) and all(not isinstance(v, (list, dict)) for v in value.values()):
            text = ", ".join(f"{k}={v}" for k, v in value.items()) or "none"
        elif isinstance(value, (list, dict)):
            text = json.dumps(value, separators=(",", ":"))
        else:
            text = str(value)
        return text if len(text) <= 80 else text[:77] + "..."

    if not old:
        return "", "its settings differ"
    for key in new:
        if new[key] != old.get(key):
            return key, f"{key} {show(new[key])} here, {show(old.get(key))} in the study"
    return "", "its settings differ"


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


def _checked_values(registry: Registry, tasks: str | tuple[str, ...], methods: tuple[str, ...],
                    values: Mapping[str, Any], where: str, parse: bool = False) -> dict[str, Any]:
    """``values`` checked against every task or method that declares their key (``parse``: ``--set``
    strings, converted to the declared type), so a bad value is refused before any storage is touched."""
    _check_keys(registry, tasks, methods, values, where)
    owners = [registry.task(t) for t in ((tasks,) if isinstance(tasks, str) else tasks)]
    owners += [registry.method(m) for m in methods]
    out = {}
    for key, value in values.items():
        out[key] = value
        for hyper in (o.hyperparameters[key] for o in owners if key in o.hyperparameters):
            try:
                if parse and isinstance(value, str) and hyper.kind is not str:
                    out[key] = hyper.parse(key, value)
                else:
                    out[key] = hyper.validate(key, value)
            except RankbenchError as exc:
                text = str(exc)
                raise RankbenchError(f"{where} {text.removeprefix(where).lstrip()}" if parse
                                     else f"{where}: {text}") from None
    return out


def _refuse_unknown(keys: Iterable[str], allowed: Iterable[str], where: str) -> None:
    """A key nobody reads (a typo) is an error naming the closest valid key."""
    allowed = list(allowed)
    for key in keys:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise RankbenchError(f"{where}: unknown key {key!r}: {hint}valid are {', '.join(allowed)}")


def _integer(value: Any, where: str, minimum: int, what: str) -> int:
    """A TOML integer >= ``minimum`` (a boolean is not one, though Python counts it as an int)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise RankbenchError(f"{where} = {_toml(value)}: {what}")
    return value


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value, default=str) if isinstance(value, (str, list, dict)) else str(value)


def _search_param(name: str, raw: Any, declared: dict[str, Hyper], where: str) -> SearchParam:
    if not isinstance(raw, dict):
        raise RankbenchError(f"{where}.{name}: write a table, e.g. {{ grid = [0.2, 1.0] }} or "
                             "{ low = 0.1, high = 1 }")
    hyper = declared[name]
    if not raw:  # an empty table: the range the hyperparameter declares (``Hyper.search``)
        raw = _declared_search(name, hyper, where)
    if "grid" in raw or "choices" in raw:
        if "grid" in raw and "choices" in raw:
            raise RankbenchError(f"{where}.{name}: give grid = [...] or choices = [...], not both")
        key = "grid" if "grid" in raw else "choices"
        _refuse_unknown(set(raw) - {key}, [key], f"{where}.{name}")
        values = raw[key]
        if not isinstance(values, list) or not values:
            raise RankbenchError(f"{where}.{name}: {key} must be a non-empty list")
        try:
            checked = tuple(hyper.validate(name, v) for v in values)
        except RankbenchError as exc:
            raise RankbenchError(f"{where}.{name}: {exc}") from None
        repeated = [v for i, v in enumerate(checked) if v in checked[:i]]
        if repeated:
            raise RankbenchError(f"{where}.{name}: {key} lists {_toml(repeated[0])} twice: give each value once")
        return SearchParam(name, "grid" if key == "grid" else "categorical", choices=checked)
    _refuse_unknown(raw, ["low", "high", "log", "type"], f"{where}.{name}")
    if "low" not in raw or "high" not in raw:
        raise RankbenchError(f"{where}.{name}: give grid = [...], choices = [...], or low and high")
    kind = raw.get("type", "int" if hyper.kind is int else "float")
    if kind not in ("float", "int"):
        raise RankbenchError(f"{where}.{name}: type must be \"float\" or \"int\"")
    low, high = raw["low"], raw["high"]
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in (low, high)) or not low < high:
        raise RankbenchError(f"{where}.{name}: empty range low={low!r}, high={high!r}: need low < high")
    if kind == "int" and not all(float(v).is_integer() for v in (low, high)):
        raise RankbenchError(f"{where}.{name}: an int range needs whole bounds, not low={low!r}, high={high!r}")
    log = raw.get("log", False)
    if not isinstance(log, bool):
        raise RankbenchError(f"{where}.{name}: log = {_toml(log)}: write log = true or log = false")
    if log and low <= 0:
        raise RankbenchError(f"{where}.{name}: a log range needs low > 0")
    low, high = (int(low), int(high)) if kind == "int" else (float(low), float(high))
    try:
        hyper.validate(name, float(low) if hyper.kind is float else low)
        hyper.validate(name, float(high) if hyper.kind is float else high)
    except RankbenchError as exc:
        raise RankbenchError(f"{where}.{name}: {exc}") from None
    return SearchParam(name, kind, low=low, high=high, log=log)


def _declared_search(name: str, hyper: Hyper, where: str) -> dict[str, Any]:
    """``{}`` in a study file means "search it over its declared range": the ``Search`` of its ``Hyper``."""
    search = hyper.search
    if search is None:
        raise RankbenchError(f"{where}.{name}: {name} declares no search range: give grid = [...], "
                             "choices = [...], or low and high")
    if search.choices:
        return {"choices": list(search.choices)}
    return {"low": search.low, "high": search.high, "log": search.log}


def _check_name(name: Any, where: str) -> str:
    """A study's name is also a folder (``rankbench-runs/studies/NAME``): one plain folder name."""
    if not isinstance(name, str) or not name.strip():
        raise RankbenchError(f"{where}: name must be a non-empty string")
    if "/" in name or "\\" in name or ".." in name or name.strip() == "." or Path(name).is_absolute():
        raise RankbenchError(f"{where}: name = {_toml(name)}: a study's name is also its plot folder "
                             "(rankbench-runs/studies/NAME): use no /, \\ or .. (e.g. name = \"lenet5_sweep\")")
    return name


def _check_seeds(seeds: Any, where: str) -> tuple[int, ...]:
    if (not isinstance(seeds, list) or not seeds
            or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < SEED_LIMIT for s in seeds)):
        raise RankbenchError(f"{where}: seeds must be a non-empty list of integers in [0, 2**32), "
                             "e.g. seeds = [0, 1, 2]")
    repeated = [s for i, s in enumerate(seeds) if s in seeds[:i]]
    if repeated:
        raise RankbenchError(f"{where}: seeds = {_toml(seeds)}: seed {repeated[0]} is given twice: one seed is one "
                             "replicate, give each seed once (e.g. seeds = [0, 1, 2])")
    return tuple(seeds)


def _names(raw: dict, one: str, many: str, where: str, example: str) -> tuple[str, ...]:
    """``task``/``tasks`` (or ``method``/``methods``): a non-empty list of names, each once."""
    names = raw[many] if many in raw else [raw[one]] if one in raw else None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise RankbenchError(f"{where}: {many} must be a non-empty list of names, e.g. {many} = {example}")
    repeated = [n for i, n in enumerate(names) if n in names[:i]]
    if repeated:
        raise RankbenchError(f"{where}: {many} lists {repeated[0]!r} twice: give each once")
    return tuple(names)


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
    """Validate a parsed study file: every key, type, range and hyperparameter value, so that nothing
    wrong is found after the storage or a run exists."""
    _refuse_unknown(raw, TOP_LEVEL_KEYS, where)
    for table in ("fixed", "method_fixed", "search", "method_search", "objectives", "sampler", "pruner", "budget",
                  "workers", "slurm", "progressive", "retrain"):
        if table in raw and not isinstance(raw[table], dict):
            raise RankbenchError(f"{where}: {table} must be a table: write [{table}] and then key = value lines")
    for table, keys in TABLE_KEYS.items():
        _refuse_unknown(raw.get(table, {}), keys, f"{where} [{table}]")
    if "matched" in raw and "slurm" in raw:
        raise RankbenchError(f"{where}: [slurm] has no place in a matched study (the Slurm launcher runs Optuna "
                             "studies only): drop [slurm], or run the matched study with --launcher local")
    slurm = check_slurm(raw.get("slurm", {}), f"{where} [slurm]")
    refused = [k for k in MATCHED_REFUSED if k in raw] if "matched" in raw else []
    if refused:
        raise RankbenchError(f"{where}: [{refused[0]}] has no place in a matched study (it searches each method's "
                             "compression knob itself): drop it, or drop [matched] for an Optuna study")
    if "progressive" in raw:
        refused = [k for k in PROGRESSIVE_REFUSED if k in raw]
        if refused:
            raise RankbenchError(f"{where}: [{refused[0]}] has no place in a progressive study (it searches one rank "
                                 "per layer with NSGA-II, phase by phase): drop it, or drop [progressive]")
        if isinstance(raw.get("budget"), dict) and "n_trials" in raw["budget"]:
            raise RankbenchError(f"{where} [budget]: a progressive study's budget is its phases (population x "
                                 "generations each, in [progressive]): drop n_trials")
    elif "retrain" in raw:
        raise RankbenchError(f"{where}: [retrain] belongs to a progressive study: add [progressive], or drop "
                             "[retrain]")
    for key in ("name",) if "matched" in raw else ("name", "objectives"):
        if key not in raw:
            raise RankbenchError(f"{where}: missing {key!r}")
    name = _check_name(raw["name"], where)
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise RankbenchError(f"{where}: description must be a string")
    if ("task" in raw) == ("tasks" in raw):
        raise RankbenchError(f"{where}: give task = \"lenet5\" or tasks = [\"lenet5\", \"mlp2\"] (one of the two)")
    tasks = _names(raw, "task", "tasks", where, '["lenet5", "mlp2"]')
    for task in tasks:
        registry.task(task)
    task = tasks[0]
    if "method" in raw and "methods" in raw:
        raise RankbenchError(f"{where}: give method = \"ours\" or methods = [\"ours\", ...] (one of the two)")
    if "method" not in raw and "methods" not in raw:
        raise RankbenchError(f"{where}: give methods = [\"ours\", ...]")
    methods = _names(raw, "method", "methods", where, '["ours", "trn"]')
    for method in methods:
        registry.method(method)
    declared = _declared(registry, tasks, methods)

    fixed = _checked_values(registry, tasks, methods, raw.get("fixed", {}), f"{where} [fixed]")
    method_fixed = {}
    for method, values in raw.get("method_fixed", {}).items():
        if method not in methods:
            raise RankbenchError(f"{where} [method_fixed.{method}]: {method} is not in methods")
        if not isinstance(values, dict):
            raise RankbenchError(f"{where} [method_fixed.{method}]: write [method_fixed.{method}] and then "
                                 "key = value lines")
        method_fixed[method] = _checked_values(registry, tasks, (method,), values, f"{where} [method_fixed.{method}]")

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
    if budget_steps is not None:
        _integer(budget_steps, f"{where}: budget_steps", 1,
                 "budget_steps must be a positive integer (optimizer steps per run)")

    if "matched" in raw:
        matched = _matched(raw, registry, tasks, methods, where)
        return StudySpec(name=name, task=task, methods=methods, objectives={}, search={}, fixed=fixed,
                         method_fixed=method_fixed, budget_steps=budget_steps,
                         seeds=_check_seeds(raw.get("seeds", [0]), where), sampler="matched", description=description,
                         source=source, tasks=tasks, matched=matched)
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
    sampler = sampler_raw.get("name", "nsga2" if "progressive" in raw else "tpe")
    if sampler not in SAMPLERS:
        raise RankbenchError(f"{where} [sampler]: unknown sampler {sampler!r}: choose one of {', '.join(SAMPLERS)}")
    if "progressive" in raw and sampler != "nsga2":
        raise RankbenchError(f"{where} [sampler]: a progressive study searches with NSGA-II: write name = \"nsga2\" "
                             "(or leave it out)")
    sampler_seed = sampler_raw.get("seed", 0)
    if isinstance(sampler_seed, bool) or not isinstance(sampler_seed, int) or not 0 <= sampler_seed < SEED_LIMIT:
        raise RankbenchError(f"{where} [sampler]: seed = {_toml(sampler_seed)}: give an integer in [0, 2**32), "
                             "e.g. seed = 0")
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
    if n_trials is not None:
        _integer(n_trials, f"{where} [budget]: n_trials", 1, "n_trials must be a positive integer")
    timeout = budget.get("timeout_s")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0):
        raise RankbenchError(f"{where} [budget]: timeout_s = {_toml(timeout)}: timeout_s must be a positive "
                             "number of seconds")
    seeds = _check_seeds(raw.get("seeds", [0]), where)
    # Optuna's RDBStorage takes positive integers; a grace period shorter than the interval between
    # two heartbeats would fail trials whose worker is alive.
    workers = raw.get("workers", {})
    heartbeat = _integer(workers.get("heartbeat_interval", 10), f"{where} [workers]: heartbeat_interval", 1,
                         "heartbeat_interval must be a whole number of seconds >= 1")
    grace = workers.get("grace_period", max(30, 2 * heartbeat))
    _integer(grace, f"{where} [workers]: grace_period", heartbeat,
             f"grace_period must be a whole number of seconds >= heartbeat_interval ({heartbeat}): a worker "
             "is declared dead after grace_period seconds without a heartbeat")
    spec = StudySpec(
        name=name, task=task, methods=methods, objectives=dict(objectives), search=search, fixed=fixed,
        method_fixed=method_fixed, method_search=method_search, budget_steps=budget_steps, seeds=seeds, sampler=sampler,
        sampler_seed=sampler_seed, pruner=pruner, n_trials=n_trials, timeout_s=timeout, heartbeat_interval=heartbeat,
        grace_period=grace, description=description, source=source, tasks=tasks, slurm=slurm,
    )
    if sampler == "grid" and n_trials is not None and n_trials > spec.grid_size():
        raise RankbenchError(f"{where}: n_trials {n_trials} exceeds the grid's {spec.grid_size()} points")
    if "progressive" in raw:
        spec = replace(spec, progressive=_progressive(raw, registry, spec, where))
    return spec


# ---------------------------------------------------------------------------- [progressive]
PROGRESSIVE_REFUSED = ("search", "method_search", "pruner", "matched", "slurm")
"""Tables a progressive study has no use for: its genes are its search, NSGA-II is multi-objective (no
pruner), and the Slurm launcher runs Optuna studies only."""


def _per_phase(value: Any, phases: int, where: str, key: str, minimum: int, example: str) -> tuple[int, ...]:
    """An integer for every phase, or one list entry per phase."""
    values = value if isinstance(value, list) else [value] * phases
    if len(values) != phases:
        raise RankbenchError(f"{where}: {key} = {_toml(value)} gives {len(values)} phases, steps {phases}: give one "
                             f"value per phase, or one integer for all (e.g. {key} = {example})")
    for v in values:
        _integer(v, f"{where}: {key}", minimum, f"{key} must be a whole number >= {minimum} (or a list of them, one "
                                                f"per phase, e.g. {key} = {example})")
    return tuple(values)


def model_layers(registry: Registry, task: str, method: str, values: Mapping[str, Any]) -> tuple[str, ...] | None:
    """The tensorized layers (module paths) of ``task``'s model as ``method`` builds it with ``values``,
    built on the ``meta`` device (nothing allocated, no data loaded); None where it cannot be built so
    (a model that depends on its data)."""
    import torch

    from rankbench.layers.tensorized import tensorized_layers
    from rankbench.run.config import make_config

    try:
        config = make_config(registry, task, method, dict(values))
        method_obj = registry.method(method)(config.method_params)
        rank = method_obj.initial_rank(config.task_params.get("initial_rank", 1))
        with torch.device("meta"):
            model = registry.task(task)(config.task_params).tensorized_model(rank)
    except Exception:
        return None
    return tuple(name for name, _ in tensorized_layers(model))


def _progressive(raw: dict, registry: Registry, spec: StudySpec, where: str) -> ProgressiveSpec:
    """The ``[progressive]`` and ``[retrain]`` tables, checked against the task's layers."""
    table, at = raw["progressive"], f"{where} [progressive]"
    if len(spec.tasks) != 1:
        raise RankbenchError(f"{where}: a progressive study searches the layers of one task: give task = \"...\"")
    method = spec.methods[0]
    if len(spec.methods) != 1 or LAYER_RANKS_KEY not in registry.method(method).hyperparameters:
        raise RankbenchError(f"{where}: a progressive study gives each layer its rank through the method's "
                             f"{LAYER_RANKS_KEY!r} setting: give methods = [\"trn\"]")
    if LAYER_RANKS_KEY in spec.fixed or LAYER_RANKS_KEY in spec.method_fixed.get(method, {}):
        raise RankbenchError(f"{where}: {LAYER_RANKS_KEY} is what a progressive study searches: drop it from "
                             "[fixed] / [method_fixed]")
    steps = table.get("steps", [5, 2, 1])
    if not isinstance(steps, list) or not steps:
        raise RankbenchError(f"{at}: steps = {_toml(steps)}: give the rank step of every phase, e.g. steps = [5, 2, 1]")
    for step in steps:
        _integer(step, f"{at}: steps", 1, "every step must be a whole number >= 1, e.g. steps = [5, 2, 1]")
    if any(b > a for a, b in zip(steps, steps[1:])):
        raise RankbenchError(f"{at}: steps = {_toml(steps)}: each phase narrows the one before, so steps must not "
                             "grow, e.g. steps = [5, 2, 1]")
    population = _per_phase(table.get("population", 20), len(steps), at, "population", 2, "[20, 12, 12]")
    generations = _per_phase(table.get("generations", 3), len(steps), at, "generations", 1, "[4, 3, 3]")
    if "center" not in table:
        raise RankbenchError(f"{at}: give center = R, the rank the first phase's window is centred on (e.g. "
                             "center = 15 with steps = [5, 2, 1] and half_width = 2: ranks 5, 10, ..., 25)")
    center = _integer(table["center"], f"{at}: center", 1, "center must be a rank >= 1")
    top_k = _integer(table.get("top_k", 5), f"{at}: top_k", 1, "top_k must be a whole number >= 1 (the best "
                     "individuals whose ranks centre the next window)")
    half_width = _integer(table.get("half_width", 2), f"{at}: half_width", 1, "half_width must be a whole number >= 1 "
                          "(a window holds centre +- half_width steps)")
    min_rank = _integer(table.get("min_rank", 1), f"{at}: min_rank", 1, "min_rank must be a rank >= 1")
    max_rank = table.get("max_rank")
    if max_rank is not None:
        _integer(max_rank, f"{at}: max_rank", min_rank, f"max_rank must be a rank >= min_rank ({min_rank})")
    if center < min_rank or (max_rank is not None and center > max_rank):
        raise RankbenchError(f"{at}: center = {center} lies outside [min_rank, max_rank] = [{min_rank}, "
                             f"{max_rank if max_rank is not None else 'none'}]: move it inside")
    floor = table.get("min_compression", 1.0)
    if not _number(floor) or not floor >= 1:
        raise RankbenchError(f"{at}: min_compression = {_toml(floor)}: give a compression >= 1 (the best point is "
                             "the most accurate one at or above it), e.g. min_compression = 16.5")
    seed = table.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise RankbenchError(f"{at}: seed = {_toml(seed)}: give the proxy runs' seed, an integer in [0, 2**32)")

    keys = set(registry.task(spec.task).hyperparameters) | set(registry.method(method).hyperparameters)
    values = {k: v for k, v in {**spec.fixed, **spec.method_fixed.get(method, {})}.items() if k in keys}
    known = model_layers(registry, spec.task, method, values)
    layers = table.get("layers")
    if layers is None:
        if known is None:
            raise RankbenchError(f"{at}: the model of {spec.task} cannot be built without its data: name its layers, "
                                 "layers = [\"...\"]")
        layers = list(known)
    if (not isinstance(layers, list) or not layers or not all(isinstance(n, str) and n for n in layers)):
        raise RankbenchError(f"{at}: layers = {_toml(layers)}: give the layers whose ranks are searched (one gene "
                             "each), e.g. layers = [\"conv1\", \"fc1\"]")
    repeated = [n for i, n in enumerate(layers) if n in layers[:i]]
    if repeated:
        raise RankbenchError(f"{at}: layers lists {repeated[0]!r} twice: give each layer once")
    if known is not None:
        unknown = [n for n in layers if n not in known]
        if unknown:
            raise RankbenchError(f"{at}: task {spec.task} has no tensorized layer {unknown[0]!r}: valid are "
                                 f"{', '.join(known)}")
        layers = [n for n in known if n in layers]  # model order: the ranks string reads as the model does
    retrain_raw = raw.get("retrain", {})
    retrain_steps = retrain_raw.get("budget_steps")
    if retrain_steps is not None:
        _integer(retrain_steps, f"{where} [retrain]: budget_steps", 1, "budget_steps must be a positive integer "
                 "(optimizer steps of each retraining run; leave it out for the recipe's full length)")
    return ProgressiveSpec(tuple(layers), center, tuple(steps), population, generations, top_k, half_width, min_rank,
                           max_rank, float(floor), seed, RetrainSpec(retrain_steps))


MATCHED_REFUSED = ("search", "method_search", "objectives", "sampler", "pruner", "budget")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _matched(raw: dict, registry: Registry, tasks: tuple[str, ...], methods: tuple[str, ...],
             where: str) -> MatchedSpec:
    """The ``[matched]`` table, checked: a matched study searches each method's compression knob itself,
    so it takes no search tables, objectives, sampler, pruner or trial budget."""
    table = raw["matched"]
    at = f"{where} [matched]"
    targets = table.get("targets")
    if not isinstance(targets, list) or not targets or not all(_number(t) and t > 1 for t in targets):
        raise RankbenchError(f"{at}: targets must be a non-empty list of compressions > 1, e.g. targets = [5, 10, 20]")
    if len(set(targets)) != len(targets):
        raise RankbenchError(f"{at}: targets lists a compression twice: give each once")
    tolerance = table.get("tolerance", 0.1)
    if not _number(tolerance) or not 0 < tolerance < 1:
        raise RankbenchError(f"{at}: tolerance = {_toml(tolerance)}: give a relative tolerance in (0, 1), e.g. 0.1")
    max_runs = _integer(table.get("max_runs", 4), f"{at}: max_runs", 1,
                        "max_runs must be a positive integer (new runs per target in a knob's search)")
    baseline = table.get("baseline")
    if baseline is not None and baseline not in methods:
        raise RankbenchError(f"{at}: baseline = {_toml(baseline)} is not in methods ({', '.join(methods)})")
    reference = table.get("reference", True)
    if not isinstance(reference, bool):
        raise RankbenchError(f"{at}: reference = {_toml(reference)}: write reference = true or reference = false")
    for method in methods:
        cls = registry.method(method)
        knob = cls.compression_knob
        if knob is None and cls.role != "reference":
            raise RankbenchError(f"{at}: method {method} declares no compression knob (Method.compression_knob), so "
                                 "its compression cannot be matched: drop it from methods")
        if knob is not None and knob.found_by != "target":
            hyper = cls.hyperparameters.get(knob.name)
            if hyper is None or hyper.search is None or hyper.search.low is None or hyper.search.high is None:
                raise RankbenchError(f"{at}: method {method}'s knob {knob.name} declares no search interval "
                                     "(Hyper(search=Search(low, high))): its plugin must declare one")
        own = {**raw.get("fixed", {}), **raw.get("method_fixed", {}).get(method, {})}
        if knob is not None and knob.found_by == "model" and own.get(LAYER_RANKS_KEY) is not None:
            raise RankbenchError(f"{at}: method {method}'s compression is counted from its uniform {knob.name}, which "
                                 f"its own per-layer {LAYER_RANKS_KEY} would contradict: drop {LAYER_RANKS_KEY}")
    if baseline is not None and registry.method(baseline).compression_knob is None:
        raise RankbenchError(f"{at}: baseline {baseline} has no compression knob, so no point at any target: "
                             "choose a method with one")
    notes: dict[str, dict[str, str]] = {}
    for task, by_method in table.get("notes", {}).items():
        if task not in tasks or not isinstance(by_method, dict):
            raise RankbenchError(f"{at}: write notes as [matched.notes.TASK] with METHOD = \"text\" lines, TASK one "
                                 f"of {', '.join(tasks)}")
        for method, text in by_method.items():
            if method not in methods or not isinstance(text, str):
                raise RankbenchError(f"{at} notes.{task}: {method} = ...: give a method of the study "
                                     f"({', '.join(methods)}) and a string")
        notes[task] = dict(by_method)
    start: dict[str, float] = {}
    for method, value in table.get("start", {}).items():
        if method not in methods or registry.method(method).compression_knob is None:
            raise RankbenchError(f"{at} start: {method} is not a method of the study with a compression knob")
        knob = registry.method(method).compression_knob
        hyper = registry.method(method).hyperparameters[knob.name]
        try:
            start[method] = hyper.validate(knob.name, float(value) if hyper.kind is float and _number(value) else value)
        except RankbenchError as exc:
            raise RankbenchError(f"{at} start.{method}: {exc}") from None
    return MatchedSpec(tuple(float(t) for t in sorted(targets)), float(tolerance), max_runs, baseline, reference,
                       notes, start)


# ---------------------------------------------------------------------------- [slurm]
_SLURM_TIME = re.compile(r"^(?:(?P<days>\d+)-(?P<dh>\d+)(?::(?P<dm>\d+)(?::(?P<ds>\d+))?)?"
                         r"|(?P<a>\d+)(?::(?P<b>\d+)(?::(?P<c>\d+))?)?)$")
_SLURM_MEM = re.compile(r"^\d+[KMGT]?B?$", re.IGNORECASE)


def slurm_minutes(value: Any, where: str) -> int | None:
    """A Slurm time limit as whole minutes (rounded up), None for ``INFINITE``/``UNLIMITED``. Takes Slurm's
    forms: ``MINUTES``, ``MINUTES:SECONDS``, ``HOURS:MINUTES:SECONDS``, ``DAYS-HOURS``, ``DAYS-HOURS:MINUTES``,
    ``DAYS-HOURS:MINUTES:SECONDS`` (a TOML integer is minutes)."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    text = value.strip() if isinstance(value, str) else ""
    if text.upper() in ("INFINITE", "UNLIMITED"):
        return None
    match = _SLURM_TIME.match(text)
    if not match or not text:
        raise RankbenchError(f"{where} time = {_toml(value)}: give a Slurm time limit: MINUTES, HH:MM:SS or "
                             "DAYS-HH:MM:SS, e.g. time = \"04:00:00\"")
    g = {k: int(v) for k, v in match.groupdict().items() if v is not None}
    if "days" in g:
        seconds = g["days"] * 86400 + g["dh"] * 3600 + g.get("dm", 0) * 60 + g.get("ds", 0)
    elif "c" in g:
        seconds = g["a"] * 3600 + g["b"] * 60 + g["c"]
    else:
        seconds = g["a"] * 60 + g.get("b", 0)
    if seconds <= 0:
        raise RankbenchError(f"{where} time = {_toml(value)}: a time limit must be longer than 0 s")
    return -(-seconds // 60)


def check_slurm(table: Mapping[str, Any], where: str, parse: bool = False) -> dict[str, Any]:
    """A ``[slurm]`` table (or the command line's Slurm options, strings when ``parse``), checked: partition,
    account, gres and mem are strings (mem as Slurm writes it: 4G, 16000M), time a Slurm time limit,
    cpus_per_task, signal_delay_s (seconds before the time limit at which a worker checkpoints and requeues
    itself) and max_requeues whole numbers, setup a list of shell lines run before each worker (``module load
    ...``), args a table of further sbatch options (``qos = "long"`` becomes ``--qos=long``)."""
    if not isinstance(table, Mapping):
        raise RankbenchError(f"{where}: write [slurm] and then key = value lines")
    _refuse_unknown(table, SLURM_KEYS, where)
    out: dict[str, Any] = {}
    for key, value in table.items():
        if key in ("partition", "account", "gres", "mem"):
            if not isinstance(value, str) or not value.strip() or any(c.isspace() for c in value.strip()):
                raise RankbenchError(f"{where} {key} = {_toml(value)}: give a name without spaces, e.g. "
                                     + {"partition": 'partition = "gpu"', "account": 'account = "my_lab"',
                                        "gres": 'gres = "gpu:1"', "mem": 'mem = "8G"'}[key])
            if key == "mem" and not _SLURM_MEM.match(value.strip()):
                raise RankbenchError(f"{where} mem = {_toml(value)}: give memory as Slurm does, a whole number with "
                                     "K, M, G or T, e.g. mem = \"8G\"")
            out[key] = value.strip()
        elif key == "time":
            slurm_minutes(value, where)
            out[key] = value.strip() if isinstance(value, str) else value
        elif key in ("cpus_per_task", "signal_delay_s", "max_requeues"):
            if parse and isinstance(value, str) and value.strip().isdigit():
                value = int(value.strip())
            minimum = 0 if key == "max_requeues" else 1
            _integer(value, f"{where} {key}", minimum, f"{key} must be a whole number >= {minimum}")
            out[key] = value
        elif key == "setup":
            if not isinstance(value, list) or not all(isinstance(line, str) for line in value):
                raise RankbenchError(f"{where} setup = {_toml(value)}: give a list of shell lines, e.g. "
                                     "setup = [\"module load python\"]")
            out[key] = list(value)
        else:  # args
            if not isinstance(value, Mapping) or not all(
                    isinstance(v, (str, int, bool)) and not (isinstance(v, str) and not v.strip())
                    for v in value.values()):
                raise RankbenchError(f"{where} args: give sbatch options as a table of values, e.g. "
                                     "args = { qos = \"long\", constraint = \"avx2\" }")
            out[key] = {str(k).replace("_", "-"): v for k, v in value.items()}
    return out
