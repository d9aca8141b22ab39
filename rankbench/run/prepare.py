"""One prepared run: the config resolved against the data actually loaded, once, for every caller.

``rankbench run``, studies, ``check-plugin``, ``export``, the benchmarks and the
tests all go ``RunConfig`` → :func:`prepare` → :class:`PreparedRun` and read
what runs from it (the task's resolved recipe, the method's resolved
parameters, the epochs a step budget gives); nothing resolves a config twice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from rankbench.data import DataSplits
from rankbench.errors import RankbenchError
from rankbench.layers.batched import CoreBank
from rankbench.layers.tensorized import count_parameters, tensorized_layers
from rankbench.plugins.defaults import Resolved, automatic_recipe, resolve_defaults
from rankbench.plugins.method import Method, MethodContext
from rankbench.plugins.registry import Registry
from rankbench.plugins.task import Task
from rankbench.run.config import RunConfig, compiles, epochs_for_steps, resolve_device


@dataclass(frozen=True, eq=False)
class PreparedRun:
    """What one experiment runs: the task built with its resolved recipe, the method's
    class and resolved parameters, the loaded data and the device.

    ``config`` keeps what was asked; ``task.params`` and ``method_params`` are what
    runs (the embedded-data recipe, per-data method defaults and a step budget
    applied), and ``recipe`` names which recipe that is (``paper`` or ``embedded``)."""

    config: RunConfig
    task: Task
    method_cls: type[Method]
    method_params: dict[str, Any]
    data: DataSplits
    recipe: str
    device: torch.device
    dense_parameters: int
    defaults: Resolved | None = None
    """Where each value came from, and why (``rankbench.plugins.defaults``)."""

    @property
    def epochs(self) -> int:
        return self.task.params["epochs"]

    @property
    def batch_size(self) -> int:
        return self.task.params["batch_size"]

    @property
    def compiled(self) -> bool:
        """Whether training runs ``torch.compile``'d (``--compile`` resolved for the device)."""
        return compiles(self.config.compile, self.device)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.data.train) / self.batch_size)

    def context(self) -> MethodContext:
        return MethodContext(num_train=len(self.data.train), device=self.device)

    def build(self, seed: int) -> tuple[nn.Module, Method]:
        """A fresh method instance and its model for ``seed`` (selectors attached, on the device)."""
        method = self.method_cls(self.method_params)
        return build_model(self.task, method, seed, self.context(), self.config.contraction), method


def prepare(config: RunConfig, registry: Registry, *, data: DataSplits | None = None) -> PreparedRun:
    """Load the task's data (or take ``data`` already loaded, as the contract suite and tests do),
    then resolve the recipe, the method's per-data defaults and a step budget, once."""
    device = resolve_device(config.device)
    task_cls, method_cls = registry.task(config.task), registry.method(config.method)
    if data is None:
        data = task_cls(config.task_params).load_data(config.data_dir, config.download)
    recipe = config.recipe or automatic_recipe(task_cls, data.embedded, method_cls)
    resolved = resolve_defaults(task_cls, method_cls, recipe, *config.set_values())
    recipe, method_params = resolved.recipe, resolved.method
    task_params = task_cls.adapt_to_data(data, resolved.task)
    if config.budget_steps is not None:
        task_params["epochs"] = epochs_for_steps(config.budget_steps, len(data.train), task_params["batch_size"])
    task = task_cls(task_params)
    check_fits_in_memory(task, method_cls(method_params), device)
    return PreparedRun(config=config, task=task, method_cls=method_cls, method_params=method_params, data=data,
                       recipe=recipe, device=device, dense_parameters=count_parameters(task.dense_model()),
                       defaults=resolved)


TRAINING_COPIES = 4
"""Copies of every parameter that training with Adam holds: the weights, their gradients and its two moments."""


def check_fits_in_memory(task: Task, method: Method, device: torch.device) -> None:
    """Refuse, before anything is allocated, a model whose training state alone exceeds the memory
    the device has free (a huge ``initial_rank`` once failed on an 800 GB allocation after the data
    had loaded): the model is built on the ``meta`` device, which allocates nothing."""
    rank = method.initial_rank(task.params["initial_rank"]) if method.tensorized else None
    try:
        with torch.device("meta"):
            model = task.tensorized_model(rank) if method.tensorized else task.dense_model()
    except RankbenchError:
        raise
    except Exception:  # a plugin's model that cannot be built without memory: the check is left to torch
        return
    parameters = sum(p.numel() for p in model.parameters())
    needed = TRAINING_COPIES * sum(p.numel() * p.element_size() for p in model.parameters())
    free = available_memory(device)
    if free is not None and needed > free:
        at = "" if rank is None else f" at rank {rank}"
        raise RankbenchError(
            f"task {task.name} with method {method.name}{at} is a model of {parameters:,} parameters: training it "
            f"needs {needed / 2**30:.1f} GiB (weights, gradients, Adam's moments) but {device.type} has "
            f"{free / 2**30:.1f} GiB free: lower the rank (--set initial_rank=N, or the method's own rank setting)")


def available_memory(device: torch.device) -> int | None:
    """Bytes free for tensors on ``device``: the GPU's free memory, or the machine's available memory
    (Linux ``MemAvailable``); None where it cannot be read."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def build_model(task: Task, method: Method, seed: int, context: MethodContext,
                contraction: str = "auto") -> nn.Module:
    """The task's model for this method, selectors attached, on the device.

    Seeded with ``seed`` just before the model is built, so one seed gives one
    initialisation. ``contraction`` sets the training contraction of every
    tensorized layer that offers it (``layer.strategies``; ``auto`` picks per batch
    size by FLOP count). A :class:`CoreBank` on the model gates all cores at once and reconstructs
    same-shaped layers together in training."""
    torch.manual_seed(seed)
    if method.tensorized:
        model = task.tensorized_model(method.initial_rank(task.params["initial_rank"]))
    else:
        model = task.dense_model()
    for _, layer in tensorized_layers(model):
        if contraction in layer.strategies:
            layer.strategy = contraction
    method.attach(model, context)
    CoreBank.attach(model)
    return model.to(context.device)
