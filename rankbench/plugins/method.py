"""The method plugin interface: how a rank-selection method plugs into training."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from rankbench.hyper import Hyper, Search
from rankbench.layers.tensorized import Bond, RankSelector, bonds
from rankbench.plugins.defaults import MethodDefaults


@dataclass(frozen=True)
class MethodContext:
    """Facts about the run a method may need (e.g. MARS scales its prior by N).

    ``Method.attach`` stores it as ``self.context`` before any selector is built.

    Attributes:
        num_train: Number of training examples of the data the run loaded.
        device: The device the model trains on.
    """

    num_train: int
    device: torch.device


@dataclass
class StepLoss:
    """What one training step minimises, and its parts for logging.

    ``Method.loss`` returns one per training batch; the trainer back-propagates
    ``total`` and logs the epoch means of ``task`` and ``penalty`` as ``train_loss``
    and ``penalty``.

    Attributes:
        total: Scalar tensor that is back-propagated; it must require grad.
        task: The task loss, detached, for logging.
        penalty: The penalty (already weighted), detached, for logging.
        outputs: The model's outputs, optional.
    """

    total: Tensor
    task: Tensor
    penalty: Tensor
    outputs: Tensor | None = None


TaskLoss = Callable[[Tensor, Tensor], Tensor]
"""The task's loss function as ``Method.loss`` receives it: ``task_loss(outputs, targets)``
returns a scalar tensor (``Task.loss``, cross-entropy by default)."""


@dataclass(frozen=True)
class Knob:
    """The hyperparameter a method's compression follows, for matched-compression studies
    (``rankbench.study.matched``): its name and whether raising it raises the compression (λ of an
    ℓ0 penalty does; a uniform rank does not). Its search interval is its ``Hyper``'s ``search``.

    Declared as ``Method.compression_knob``, e.g. ``Knob("lambda", increases_compression=True)``.

    Attributes:
        name: The hyperparameter tuned; its ``Hyper`` must declare ``search=Search(low, high, ...)``.
        increases_compression: Whether a larger value gives a larger compression.
        found_by: How a setting reaching a target is found (``training``, ``model`` or ``target``).
    """

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
"""The hyperparameters every method whose selectors the optimizer trains declares:
``selector_lr``, the selectors' learning rate (``None``: the weights' rate; a study
searches 1e-4..1e-1, log). Merge it into ``hyperparameters``:
``hyperparameters = {**SELECTOR_HYPERPARAMETERS, "lambda": Hyper(...)}``."""


class Method:
    """Base class of rank-selection methods; one subclass per file in ``methods/``.

    A subclass sets ``name``, ``description`` and ``hyperparameters`` and
    overrides what it needs: ``selector`` (one per bond), ``penalty`` (already
    weighted, added to the task loss), ``loss`` (to own the whole training-step
    surrogate) and ``on_epoch_end``. The trainer never asks which method it runs.

    An instance serves one model, the one ``attach`` was last called with: its
    ``selectors`` registry (bond name → selector) is built there, and the
    ``model`` its other hooks receive is that model.

    One instance is created per run (per seed). If you override ``__init__``, call
    ``super().__init__(params)``.

    Args:
        params: A value for every declared hyperparameter, already validated
            (read them as ``self.params["lambda"]``).

    Attributes:
        params: The run's hyperparameter values, by name.
        context: The run's ``MethodContext``, set by ``attach`` (``None`` before).
        selectors: Bond name (``fc1.bond2``) → the selector installed on it, in bond
            order; filled by ``attach``.
        optimizer: The optimizer of the training the method is in, set by ``set_optimizer``
            (``None`` before, and outside a training).
    """

    name: ClassVar[str] = ""
    """Unique name, what ``--method`` takes; a class without one is not a plugin."""
    description: ClassVar[str] = ""
    """One line, shown by ``rankbench list``."""
    hyperparameters: ClassVar[dict[str, Hyper]] = {}
    """Typed, validated, searchable settings by name (``--set KEY=VALUE``, study files)."""
    task_defaults: ClassVar[dict[str, Mapping[str, Any] | MethodDefaults]] = {}
    """Defaults on a task (``"lenet5": {"lambda": 1.0}``) or on one of its recipes (``"mlp2/embedded"``),
    with ``MethodDefaults(values, why)`` to say why; checked at discovery (``rankbench.plugins.defaults``)."""
    tensorized: ClassVar[bool] = True
    """False: the run trains the task's dense model, with no selectors (``dense``)."""
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
        self.optimizer: torch.optim.Optimizer | None = None

    def initial_rank(self, task_rank: int) -> int:
        """Rank of every bond in the tensorized model this method starts from.

        Override it when the method fixes its own rank (``trn`` returns its ``rank``).

        Args:
            task_rank: The task's ``initial_rank``.

        Returns:
            The initial rank of every bond; default ``task_rank``.
        """
        return task_rank

    def selector(self, bond: Bond) -> RankSelector | None:
        """The selector for ``bond``, or None to leave it unselected.

        Called by ``attach`` once per gateable bond of the model, in bond order.

        Args:
            bond: The bond (its ``layer_name``, ``layer``, ``index``, ``size`` and ``name``).

        Returns:
            A ``RankSelector`` of size ``bond.size``, or ``None`` (the default, everywhere).
        """
        return None

    def attach(self, model: nn.Module, context: MethodContext) -> None:
        """Put a selector on every bond that ``selector`` returns one for, and record
        each in ``self.selectors`` under its bond's name (``fc1.bond2``), in bond
        order (module order, which is forward order when modules are registered in
        the order they run, as in every built-in task): the method reads its
        selectors from there instead of searching the model at every step.

        Override it only to do more, and call ``super().attach(model, context)``.

        Args:
            model: The freshly built model (``Task.tensorized_model``), not yet on its device.
            context: Facts about the run, stored as ``self.context``.
        """
        self.context = context
        registry: dict[str, RankSelector] = {}
        for bond in bonds(model):
            selector = self.selector(bond)
            if selector is not None:
                bond.layer.set_selector(bond.index, selector)
                registry[bond.name] = selector
        self.selectors = registry

    def penalty(self, model: nn.Module) -> Tensor:
        """The regularisation term added to the task loss (λ already applied).

        Find the selectors in ``self.selectors``. The default ``loss`` adds it to the
        task loss.

        Args:
            model: The model ``attach`` was called with, in ``train()`` mode.

        Returns:
            A finite scalar (0-dim) tensor on the model's device, differentiable with
            respect to what it should train (usually the selectors' parameters);
            default 0.
        """
        return torch.zeros((), device=next(model.parameters()).device)

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor], task_loss: TaskLoss) -> StepLoss:
        """Task loss + penalty for one batch; override to own the surrogate.

        Override it when the step's objective is not one forward pass plus the
        penalty: several forward passes, a score-function (REINFORCE) surrogate, or
        all selectors computed at once and supplied with ``RankSelector.supplied``.

        Args:
            model: The model, already in ``train()`` mode.
            batch: ``(x, y)``: the training inputs (after ``Task.augment``) and targets.
            task_loss: The task's loss, ``task_loss(outputs, y)`` → scalar.

        Returns:
            ``StepLoss(total=task + penalty, task, penalty, outputs)``; the trainer stops
            the run (exit 2, run ``FAILED``) when ``total`` is NaN or infinite.
        """
        x, y = batch
        outputs = model(x)
        task = task_loss(outputs, y)
        penalty = self.penalty(model)
        return StepLoss(total=task + penalty, task=task.detach(), penalty=penalty.detach(), outputs=outputs)

    def set_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """The trainer hands the method the optimizer it built (the task's, over the ``weights`` and
        ``selectors`` groups), once per training, before ``on_train_begin``; stored as ``self.optimizer``.

        For a method that edits the optimizer's per-parameter state (``optimizer.state[param]``) when it
        rewrites parameters itself, e.g. zeroing the moments of core slices it truncated. The state belongs
        to the trainer's checkpoint (it is saved after every epoch and loaded on a resume, after
        ``load_state_dict``), so what the method writes there resumes with it. Override it only to do more,
        and call ``super().set_optimizer(optimizer)``.

        Args:
            optimizer: The training's optimizer.
        """
        self.optimizer = optimizer

    def on_train_begin(self, model: nn.Module, epochs: int, steps_per_epoch: int) -> None:
        """Once per training, before its first step (and, when it resumes, before the checkpoint is
        loaded): the epochs it runs to and its optimizer steps per epoch, for a method whose schedule
        depends on them (a post-hoc truncation at ``epochs - finetune_epochs``); default none.

        Args:
            model: The model about to be trained.
            epochs: The epoch the training runs to.
            steps_per_epoch: Optimizer steps per epoch.
        """

    def on_step_end(self, model: nn.Module, step: int) -> None:
        """Per-step action after the optimizer step ``step`` (counted from 1 over the whole training):
        a closed-form update of a selector, a periodic truncation of the cores; default none. What it
        changes outside the model belongs in ``state_dict`` so a resumed run continues it.

        Args:
            model: The model being trained.
            step: Optimizer steps so far, counted from 1 over the whole training.
        """

    def on_epoch_end(self, model: nn.Module, epoch: int, metrics: Mapping[str, float]) -> None:
        """Per-epoch action (fix gates, anneal a temperature); default none.

        Called after the scheduler's step, ``Task.calibrate`` and the epoch's validation.

        Args:
            model: The model being trained.
            epoch: The epoch just finished, counted from 1.
            metrics: ``train_loss``, ``penalty``, ``val_loss``, ``val_accuracy`` (%),
                ``compression`` (dense / current parameters), ``total_rank`` and
                ``train_seconds_per_batch`` of that epoch.
        """

    def state_dict(self) -> dict[str, Any]:
        """What the method keeps between epochs outside the model (checkpointed every epoch so a
        run resumes exactly): e.g. whether gates are fixed, a temperature. Default: nothing.

        Returns:
            A dict that ``torch.save`` can store; ``load_state_dict`` receives it back.
        """
        return {}

    def load_state_dict(self, model: nn.Module, state: Mapping[str, Any]) -> None:
        """Restore ``state_dict()`` into a method attached to a freshly built ``model`` whose
        weights (selectors included) are already loaded.

        Args:
            model: The rebuilt model, its weights loaded from the checkpoint.
            state: What ``state_dict()`` returned when the checkpoint was written.
        """

    def selector_lr(self, weights_lr: float) -> float:
        """The optimizer's rate for selector parameters: ``selector_lr`` when set, else the weights'.

        Args:
            weights_lr: The task's learning rate for the weights.

        Returns:
            The learning rate of the optimizer's ``selectors`` parameter group.
        """
        value = self.params.get("selector_lr")
        return weights_lr if value is None else value
