"""The method plugin interface: how a rank-selection method plugs into training."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Literal, Mapping

import torch
from torch import Tensor, nn

from rankbench.layers.tensorized import Bond, RankSelector, bonds
from rankbench.hyper import Hyper, Search
from rankbench.plugins.defaults import MethodDefaults


@dataclass(frozen=True)
class MethodContext:
    """Facts about the run a method may need (e.g. MARS scales its prior by N)."""

    num_train: int
    device: torch.device


@dataclass
class StepLoss:
    """What one training step minimises, and its parts for logging."""

    total: Tensor
    task: Tensor
    penalty: Tensor
    outputs: Tensor | None = None


TaskLoss = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class Knob:
    """The hyperparameter a method's compression follows, for matched-compression studies
    (``rankbench.study.matched``): its name and whether raising it raises the compression (λ of an
    ℓ0 penalty does; a uniform rank does not). Its search interval is its ``Hyper``'s ``search``."""

    name: str
    increases_compression: bool
    found_by: Literal["training", "model", "target"] = "training"
    """How a setting that reaches a target compression is found: ``training`` (the compression is known
    after a run: the knob is searched with runs of one seed, e.g. λ), ``model`` (the knob is the uniform
    rank the task's model is built at, so every rank's compression is counted without training), or
    ``target`` (the knob is the target compression itself, e.g. a post-hoc truncation's)."""

Role = Literal["reference", "uniform", "selector"]
ROLES: tuple[Role, ...] = ("reference", "uniform", "selector")

# Declared by every method whose selectors the optimizer trains (merge into ``hyperparameters``).
SELECTOR_HYPERPARAMETERS: dict[str, Hyper] = {
    "selector_lr": Hyper(
        None, "learning rate of the selector parameters (none: the weights' rate)", type=float, minimum=0.0,
        nullable=True, search=Search(1e-4, 1e-1, log=True),
    ),
}


class Method:
    """Base class of rank-selection methods; one subclass per file in ``methods/``.

    A subclass sets ``name``, ``description`` and ``hyperparameters`` and
    overrides what it needs: ``selector`` (one per bond), ``penalty`` (already
    weighted, added to the task loss), ``loss`` (to own the whole training-step
    surrogate) and ``on_epoch_end``. The trainer never asks which method it runs.

    An instance serves one model, the one ``attach`` was last called with: its
    ``selectors`` registry (bond name → selector) is built there, and the
    ``model`` its other hooks receive is that model.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    hyperparameters: ClassVar[dict[str, Hyper]] = {}
    task_defaults: ClassVar[dict[str, Mapping[str, Any] | MethodDefaults]] = {}
    """Defaults on a task (``"lenet5": {"lambda": 1.0}``) or on one of its recipes (``"mlp2/embedded"``),
    with ``MethodDefaults(values, why)`` to say why; checked at discovery (``rankbench.plugins.defaults``)."""
    tensorized: ClassVar[bool] = True
    role: ClassVar[Role] = "selector"
    """How reports and figures treat the method: ``reference`` (the 1x model, e.g. dense),
    ``uniform`` (a fixed-rank baseline drawn as a curve over its label, e.g. trn) or
    ``selector`` (a rank-selection method, drawn as points)."""
    compression_knob: ClassVar[Knob | None] = None
    """The hyperparameter to tune when methods are matched at target compressions (None: the
    method's compression is fixed, e.g. dense)."""
    checks_tasks: ClassVar[bool] = False
    """``check-plugin TASK`` runs this method's contract on the task (the built-ins
    dense, trn and ours declare it, one method of each role)."""

    def __init__(self, params: Mapping[str, Any]) -> None:
        self.params = dict(params)
        self.context: MethodContext | None = None
        self.selectors: dict[str, RankSelector] = {}

    def initial_rank(self, task_rank: int) -> int:
        """Rank of every bond in the tensorized model this method starts from."""
        return task_rank

    def selector(self, bond: Bond) -> RankSelector | None:
        """The selector for ``bond``, or None to leave it unselected."""
        return None

    def attach(self, model: nn.Module, context: MethodContext) -> None:
        """Put a selector on every bond that ``selector`` returns one for, and record
        each in ``self.selectors`` under its bond's name (``fc1.bond2``), in bond
        order (module order, which is forward order when modules are registered in
        the order they run, as in every built-in task): the method reads its
        selectors from there instead of searching the model at every step."""
        self.context = context
        registry: dict[str, RankSelector] = {}
        for bond in bonds(model):
            selector = self.selector(bond)
            if selector is not None:
                bond.layer.set_selector(bond.index, selector)
                registry[bond.name] = selector
        self.selectors = registry

    def penalty(self, model: nn.Module) -> Tensor:
        """The regularisation term added to the task loss (λ already applied)."""
        return torch.zeros((), device=next(model.parameters()).device)

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor], task_loss: TaskLoss) -> StepLoss:
        """Task loss + penalty for one batch; override to own the surrogate."""
        x, y = batch
        outputs = model(x)
        task = task_loss(outputs, y)
        penalty = self.penalty(model)
        return StepLoss(total=task + penalty, task=task.detach(), penalty=penalty.detach(), outputs=outputs)

    def on_step_end(self, model: nn.Module, step: int) -> None:
        """Per-step action after the optimizer step ``step`` (counted from 1 over the whole training):
        a closed-form update of a selector, a periodic truncation of the cores; default none. What it
        changes outside the model belongs in ``state_dict`` so a resumed run continues it."""

    def on_epoch_end(self, model: nn.Module, epoch: int, metrics: Mapping[str, float]) -> None:
        """Per-epoch action (fix gates, anneal a temperature); default none."""

    def state_dict(self) -> dict[str, Any]:
        """What the method keeps between epochs outside the model (checkpointed every epoch so a
        run resumes exactly): e.g. whether gates are fixed, a temperature. Default: nothing."""
        return {}

    def load_state_dict(self, model: nn.Module, state: Mapping[str, Any]) -> None:
        """Restore ``state_dict()`` into a method attached to a freshly built ``model`` whose
        weights (selectors included) are already loaded."""

    def selector_lr(self, weights_lr: float) -> float:
        """The optimizer's rate for selector parameters: ``selector_lr`` when set, else the weights'."""
        value = self.params.get("selector_lr")
        return weights_lr if value is None else value
