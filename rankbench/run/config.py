"""The validated configuration of one experiment: what the CLI or a caller asks for, checked before any work."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from rankbench.errors import RankbenchError
from rankbench.hyper import parse_assignments, resolve
from rankbench.plugins.defaults import PAPER, resolve_defaults
from rankbench.plugins.registry import Registry


def parse_budget(text: str | None) -> int | None:
    """``--budget steps=N`` → N (the number of optimizer steps to train for)."""
    if text is None:
        return None
    key, sep, value = text.partition("=")
    if key.strip() != "steps" or not sep:
        raise RankbenchError(f"--budget {text!r}: write steps=N, e.g. --budget steps=70000")
    try:
        steps = int(value)
    except ValueError:
        raise RankbenchError(f"--budget {text!r}: N must be an integer") from None
    if steps < 1:
        raise RankbenchError("--budget steps=N: N must be >= 1")
    return steps


@dataclass(frozen=True)
class RunOptions:
    """How and where runs run, as opposed to what they train: one object, built once from the command
    line's shared run options (``rankbench run`` and ``rankbench study`` take the same ones) and carried
    whole to every run and study trial. :meth:`checked` validates it before any work."""

    device: str = "auto"
    threads: int | None = None
    compile: str = "off"
    """``torch.compile`` the model for training: ``on``, ``off``, or ``auto`` (on for CUDA, see ``compiles``)."""
    contraction: str = "auto"
    budget_steps: int | None = None
    """``--budget steps=N``: the epochs are set from the data's size."""
    data_dir: Path | None = None
    download: bool = False
    tracking_uri: str | None = None

    def checked(self) -> RunOptions:
        """This object, after every check that needs no data: a one-line error for the first that fails."""
        resolve_device(self.device)
        if self.compile not in COMPILE_CHOICES:
            raise RankbenchError(f"--compile {self.compile}: choose {', '.join(COMPILE_CHOICES)}")
        if self.contraction not in CONTRACTIONS:
            raise RankbenchError(f"--contraction {self.contraction}: choose {', '.join(CONTRACTIONS)}")
        if self.threads is not None and self.threads < 1:
            raise RankbenchError("--threads must be >= 1")
        if self.budget_steps is not None and self.budget_steps < 1:
            raise RankbenchError("--budget steps=N: N must be >= 1")
        check_data_dir(self.data_dir, self.download)
        check_tracking_uri(self.tracking_uri)
        return self


@dataclass(frozen=True)
class RunConfig:
    """Everything one ``rankbench run`` needs, validated before any run starts."""

    task: str
    method: str
    task_params: dict[str, Any]
    method_params: dict[str, Any]
    seeds: tuple[int, ...] = (0,)
    options: RunOptions = field(default_factory=RunOptions)
    experiment: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    progress: bool = True
    explicit: frozenset[str] = frozenset()
    resume: str | None = None
    """A run id to continue from its last checkpoint (its own seed only)."""
    recipe: str | None = None
    """``--recipe NAME``; None: chosen for the data (``embedded`` on the embedded default data)."""

    device = property(lambda self: self.options.device)
    threads = property(lambda self: self.options.threads)
    compile = property(lambda self: self.options.compile)
    contraction = property(lambda self: self.options.contraction)
    budget_steps = property(lambda self: self.options.budget_steps)
    data_dir = property(lambda self: self.options.data_dir)
    download = property(lambda self: self.options.download)
    tracking_uri = property(lambda self: self.options.tracking_uri)

    def set_values(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The task's and the method's values the user set (validated), as opposed to defaults."""
        return ({k: v for k, v in self.task_params.items() if k in self.explicit},
                {k: v for k, v in self.method_params.items() if k in self.explicit})


COMPILE_CHOICES = ("auto", "off", "on")
CONTRACTIONS = ("auto", "weight", "input")
SEED_LIMIT = 2**32
"""Seeds lie in [0, 2³²): every generator a run seeds (torch's, numpy's in the data splits) takes them."""
MAX_EXPERIMENT_NAME = 500
"""MLflow's limit on an experiment's name."""


def check_seeds(seeds: Sequence[int], option: str = "--seeds") -> tuple[int, ...]:
    """Seeds are replicates: each one once, each in [0, 2³²)."""
    seeds = tuple(seeds)
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) for s in seeds):
        raise RankbenchError(f"{option}: give integers, e.g. {option} 0,1,2")
    out_of_range = [s for s in seeds if not 0 <= s < SEED_LIMIT]
    if out_of_range:
        raise RankbenchError(f"{option}: seed {out_of_range[0]} is out of range: seeds lie in [0, 2**32)")
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise RankbenchError(f"{option}: seed {repeated[0]} is given twice: one seed is one replicate, give "
                             "each seed once (e.g. 0,1,2)")
    return seeds


def check_experiment(name: str | None) -> None:
    """An ``--experiment`` name MLflow would refuse (empty, or over its 500 characters), found before any work."""
    if name is None:
        return
    if not name.strip():
        raise RankbenchError("--experiment: give a non-empty name (default: the task name)")
    if len(name) > MAX_EXPERIMENT_NAME:
        raise RankbenchError(f"--experiment: the name has {len(name)} characters; MLflow allows at most "
                             f"{MAX_EXPERIMENT_NAME}: choose a shorter name")


def compiles(choice: str, device: torch.device) -> bool:
    """Whether ``--compile CHOICE`` compiles on ``device``: ``auto`` compiles on CUDA, where a training
    step is many small kernels that CUDA graphs replay at once; on a CPU compiling costs a minute per
    graph and eager is as fast (see the README's Performance)."""
    return choice == "on" or (choice == "auto" and device.type == "cuda")


def make_config(
    registry: Registry,
    task: str,
    method: str,
    assignments: Sequence[str] | Mapping[str, Any] = (),
    *,
    epochs: int | None = None,
    seeds: Sequence[int] = (0,),
    options: RunOptions | None = None,
    experiment: str | None = None,
    tags: Mapping[str, str] | None = None,
    progress: bool = True,
    resume: str | None = None,
    recipe: str | None = None,
    **option_values: Any,
) -> RunConfig:
    """Validate a task, a method and ``key=value`` overrides into a ``RunConfig``.

    A key belongs to the method or to the task (its recipe and data options). The params are
    resolved for the ``paper`` recipe (or ``--recipe``) in ``rankbench.plugins.defaults``' order;
    ``prepare`` resolves them again, the same way, for the recipe the loaded data chooses.
    ``option_values`` are ``RunOptions`` fields (``device="cpu"``) over ``options``; any other name
    is a ``TypeError``. Every check of the request happens here, before any data is loaded: the keys
    and their values, the seeds, the run options, and a step budget that would contradict epochs.
    """
    options = replace(options or RunOptions(), **option_values).checked()
    task_cls, method_cls = registry.task(task), registry.method(method)
    raw = dict(assignments) if isinstance(assignments, Mapping) else parse_assignments(assignments)
    if epochs is not None:
        if "epochs" in raw:
            raise RankbenchError(f"--epochs {epochs} and --set epochs={raw['epochs']}: give the epochs once")
        raw["epochs"] = task_cls.hyperparameters["epochs"].validate("--epochs", epochs)
    if options.budget_steps is not None and "epochs" in raw:
        raise RankbenchError("--budget sets the epochs: drop --epochs / --set epochs")
    check_experiment(experiment)
    both = set(method_cls.hyperparameters) & set(task_cls.hyperparameters)
    if both & set(raw):
        raise RankbenchError(f"--set {sorted(both & set(raw))[0]} is declared by both {method} and {task}")
    method_raw = {k: v for k, v in raw.items() if k in method_cls.hyperparameters}
    task_raw = {k: v for k, v in raw.items() if k not in method_cls.hyperparameters}
    unknown = set(task_raw) - set(task_cls.hyperparameters)
    if unknown:
        valid = sorted(set(method_cls.hyperparameters) | set(task_cls.hyperparameters))
        raise RankbenchError(
            f"unknown --set key {sorted(unknown)[0]!r} for method {method} on task {task}: valid are {', '.join(valid)}"
        )
    method_set = resolve(method_cls.hyperparameters, method_raw, f"method {method}")
    task_set = resolve(task_cls.hyperparameters, task_raw, f"task {task}")
    resolved = resolve_defaults(task_cls, method_cls, recipe or PAPER, {k: task_set[k] for k in task_raw},
                                {k: method_set[k] for k in method_raw})
    task_params, method_params = resolved.task, resolved.method
    seeds = check_seeds(seeds)
    return RunConfig(task=task, method=method, task_params=task_params, method_params=method_params,
                     seeds=seeds, options=options, experiment=experiment, tags=dict(tags or {}), progress=progress,
                     explicit=frozenset(raw), resume=resume, recipe=recipe)


def check_data_dir(data_dir: Path | None, download: bool) -> None:
    """A ``--data-dir`` that is not a folder is an input error, not a silent fallback to other
    data (with ``--download`` it is created)."""
    if data_dir is not None and not download and not Path(data_dir).is_dir():
        raise RankbenchError(f"--data-dir {data_dir}: no such folder: give the folder that holds the "
                             "dataset folders (e.g. DIR/fashion-mnist/), or add --download to create it")


def check_tracking_uri(uri: str | None) -> None:
    """A SQLite tracking URI whose folder does not exist is an input error, found before any work."""
    if uri and uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).parent.is_dir():
        raise RankbenchError(f"--tracking-uri {uri}: the folder {Path(uri[len('sqlite:///'):]).parent} does not "
                             "exist: create it or choose another store")
    if uri and uri.startswith("sqlite:") and not uri.startswith("sqlite:///"):
        raise RankbenchError(f"--tracking-uri {uri}: write sqlite:///PATH (three slashes, then the file's path)")


def epochs_for_steps(steps: int, train_size: int, batch_size: int) -> int:
    """Epochs that give at least ``steps`` optimizer steps (e.g. the paper's ~70k on any dataset)."""
    return max(1, math.ceil(steps / math.ceil(train_size / batch_size)))


def resolve_device(name: str) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` → a device that exists here, else a one-line error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise RankbenchError(f"--device {name}: choose auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise RankbenchError(f"--device {name}: choose auto, cpu, cuda or cuda:N")
    if device.type == "cpu" and device.index not in (None, 0):
        raise RankbenchError(f"--device {name}: the CPU has no numbered devices: use --device cpu "
                             "(and --threads N for its cores)")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RankbenchError(f"--device {name}: no CUDA device is available here; use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RankbenchError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device
