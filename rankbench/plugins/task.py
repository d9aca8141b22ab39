"""The task plugin interface: data, the dense reference model, its tensorized twin and the recipe."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rankbench.data import DataSplits, Split
from rankbench.hyper import Hyper
from rankbench.plugins.defaults import Recipe
from rankbench.records import Record


def classification_hits(outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Top-1 and top-5 hits of (batch, classes) outputs against class labels."""
    k = min(5, outputs.shape[1])
    top1 = (outputs.argmax(1) == targets).sum()
    top5 = (outputs.topk(k, dim=1).indices == targets[:, None]).any(1).sum()
    return top1, top5, int(targets.shape[0])



class Task:
    """Base class of tasks; one subclass per file in ``tasks/``.

    ``hyperparameters`` declares the training recipe (``epochs``,
    ``batch_size``, ``lr``, ``initial_rank`` at least; their defaults are the paper's) and data
    options; ``recipes`` names other sets of defaults (``embedded``, for the small embedded data).
    A task never names a method: a method's defaults for a task live with the method
    (``Method.task_defaults``; the order is in ``rankbench.plugins.defaults``).

    A subclass sets ``name``, ``description`` and ``hyperparameters`` and implements
    ``load_data``, ``dense_model`` and ``tensorized_model``; every other hook has a
    default for one-label classification.

    Args:
        params: A value for every declared hyperparameter, resolved for the data and
            validated.

    Attributes:
        params: The task's hyperparameter values, by name.
    """

    name: ClassVar[str] = ""
    """Unique name, what ``--task`` takes; a class without one is not a plugin."""
    description: ClassVar[str] = ""
    """One line, shown by ``rankbench list``."""
    hyperparameters: ClassVar[dict[str, Hyper]] = {}
    """The recipe (``epochs``, ``batch_size``, ``lr``), ``initial_rank`` and data options, by name;
    ``mnist_family_hyperparameters()`` gives the MNIST-family data options."""
    recipes: ClassVar[dict[str, Recipe]] = {}
    """Named defaults besides ``paper`` (the hyperparameters' own), e.g. ``embedded``."""
    recipe_keys: ClassVar[tuple[str, ...]] = ("epochs", "batch_size", "lr")
    """The hyperparameters printed and recorded as "the recipe"; each must be declared."""
    input_shape: ClassVar[tuple[int, ...] | None] = None
    """One example's shape, e.g. ``(3, 32, 32)``: benchmarks, ``export`` and ``check-plugin`` draw
    random inputs of it (``None``: override ``example_input``)."""
    scheduler_interval: ClassVar[str] = "epoch"
    """When ``scheduler`` steps: ``"epoch"`` (once per epoch) or ``"step"`` (after every optimizer step,
    for warm-up schedules); ``scheduler`` is told how many times it will step."""
    metrics: ClassVar[tuple[Record, ...]] = ()
    """Final metrics this task records beyond every run's own (e.g. a translation task's test BLEU),
    returned by ``final_metrics``; declared here so reports and checks know their names."""

    def __init__(self, params: Mapping[str, Any]) -> None:
        self.params = dict(params)

    def load_data(self, data_dir: Path | None, download: bool) -> DataSplits:
        """The task's data, split three ways.

        Args:
            data_dir: ``--data-dir``, or ``None`` (then the task's default place,
                e.g. ``default_data_dir()``).
            download: ``--download``: fetch missing files where the network allows.

        Returns:
            Three disjoint, non-empty splits (``y``: int64 class labels in
            ``0..num_classes-1`` for classification).

        Raises:
            RankbenchError: Missing or bad data, with the fix in the message (it
                prints as one line, exit 2).
        """
        raise NotImplementedError

    def dense_model(self) -> nn.Module:
        """The uncompressed reference model.

        The ``dense`` method trains it, and its parameter count is the numerator of
        every compression ratio.

        Returns:
            A new model whose output is ``(batch, num_classes)`` (or
            ``expected_output_shape``).
        """
        raise NotImplementedError

    def tensorized_model(self, rank: int) -> nn.Module:
        """The same network with some layers replaced by tensorized layers.

        Other layers stay ordinary and are counted as they are. A layer's name in
        ranks and reports is its module path in the model (``fc1``, ``blocks.3.conv2``).

        Args:
            rank: Initial size of every bond (``Method.initial_rank`` of the task's
                ``initial_rank``).

        Returns:
            A new model built from ``TensorizedLinear`` / ``TensorizedConv2d`` /
            ``TensorizedEmbedding`` layers (or their ``TensorRing*`` / ``TensorTrain*``
            forms).
        """
        raise NotImplementedError

    def example_input(self, batch_size: int, generator: torch.Generator | None = None) -> Tensor:
        """A random batch shaped like the task's inputs (export checks and benchmarks use it).

        Args:
            batch_size: Number of examples.
            generator: Random generator to draw from (``None``: torch's global one).

        Returns:
            ``randn(batch_size, *input_shape)`` by default; token ids for a text task.

        Raises:
            NotImplementedError: The task declares no ``input_shape`` and does not
                override this method.
        """
        if self.input_shape is None:
            raise NotImplementedError(f"task {self.name} declares no input_shape")
        return torch.randn(batch_size, *self.input_shape, generator=generator)

    def augment(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """A training batch as the model sees it (default: unchanged); draws only from ``generator``.

        Args:
            x: A training batch of inputs.
            generator: The run's seeded generator: draw every random number from it so
                one seed gives one run.

        Returns:
            The augmented batch (``resnet32`` crops and flips with ``random_crop_flip``).
        """
        return x

    def calibrate(self, model: nn.Module, train: Split, device: torch.device) -> None:
        """Runs before every evaluation (default: nothing). Tasks whose models hold
        BatchNorm re-estimate its statistics here with ``recalibrate_batchnorm``:
        a stochastic method's eval-mode weights differ from its training ones.

        Args:
            model: The model about to be evaluated.
            train: The training split.
            device: The device the model is on.
        """

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """The task loss of a batch.

        Args:
            outputs: The model's outputs, ``(batch, num_classes)`` by default.
            targets: The batch's targets (``Split.y`` rows).

        Returns:
            A scalar tensor; default: cross-entropy.
        """
        return F.cross_entropy(outputs, targets)

    def correct(self, outputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, int]:
        """Top-1 hits, top-5 hits and the number of scored targets in a batch (default: one class
        label per example). Accuracy is hits / scored; a sequence task scores its tokens.

        Args:
            outputs: The model's outputs for a batch.
            targets: The batch's targets.

        Returns:
            ``(top1, top5, n)``: top-1 hits and top-5 hits (0-dim tensors) and the
            number of scored targets.
        """
        return classification_hits(outputs, targets)

    def expected_output_shape(self, x: Tensor, data: DataSplits) -> tuple[int, ...]:
        """The model's output shape for input batch ``x`` (the contract checks it): (batch, classes).

        Args:
            x: An input batch.
            data: The task's data.

        Returns:
            The expected shape; default ``(len(x), data.num_classes)``.
        """
        return (len(x), data.num_classes)

    def final_metrics(self, model: nn.Module, data: DataSplits, device: torch.device) -> dict[str, float]:
        """Extra final measurements of the trained model, named as declared in ``metrics`` (default: none).

        Args:
            model: The trained model, in ``eval()`` mode.
            data: The task's data.
            device: The device the model is on.

        Returns:
            Metric name → value, e.g. ``{"test_bleu": 94.28}``.
        """
        return {}

    def optimizer(self, param_groups: Iterable[dict]) -> torch.optim.Optimizer:
        """The optimizer of a run.

        Args:
            param_groups: The trainer's two groups: the weights (``"name": "weights"``)
                and every selector's parameters (``"name": "selectors"``, at
                ``Method.selector_lr``).

        Returns:
            An optimizer over ``param_groups``; default ``Adam(lr=params["lr"])``.
        """
        return torch.optim.Adam(param_groups, lr=self.params["lr"])

    def scheduler(self, optimizer: torch.optim.Optimizer, epochs: int) -> torch.optim.lr_scheduler.LRScheduler | None:
        """Stepped once per epoch, ``epochs`` times (per optimizer step with ``scheduler_interval = "step"``;
        then ``epochs`` is the number of optimizer steps).

        Args:
            optimizer: The run's optimizer.
            epochs: How many times the scheduler will step.

        Returns:
            A learning-rate scheduler, or ``None`` (the default) for a constant rate.
        """
        return None

    def recipe(self) -> dict[str, Any]:
        """The training recipe as printed and recorded.

        Returns:
            The values of ``recipe_keys``, by name.
        """
        return {k: self.params[k] for k in self.recipe_keys if k in self.params}

    @classmethod
    def adapt_to_data(cls, data: DataSplits, params: Mapping[str, Any]) -> dict[str, Any]:
        """The resolved parameters fitted to the data actually loaded (a text task lowers its vocabulary
        to the words the training split has); default: unchanged.

        Args:
            data: The data the run loaded.
            params: The task's resolved hyperparameter values.

        Returns:
            The values the task is built with.
        """
        return dict(params)
