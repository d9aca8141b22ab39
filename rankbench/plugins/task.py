"""The task plugin interface: data, the dense reference model, its tensorized twin and the recipe."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Iterable, Mapping

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
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    hyperparameters: ClassVar[dict[str, Hyper]] = {}
    recipes: ClassVar[dict[str, Recipe]] = {}
    """Named defaults besides ``paper`` (the hyperparameters' own), e.g. ``embedded``."""
    recipe_keys: ClassVar[tuple[str, ...]] = ("epochs", "batch_size", "lr")
    input_shape: ClassVar[tuple[int, ...] | None] = None
    scheduler_interval: ClassVar[str] = "epoch"
    """When ``scheduler`` steps: ``"epoch"`` (once per epoch) or ``"step"`` (after every optimizer step,
    for warm-up schedules); ``scheduler`` is told how many times it will step."""
    metrics: ClassVar[tuple[Record, ...]] = ()
    """Final metrics this task records beyond every run's own (e.g. a translation task's test BLEU),
    returned by ``final_metrics``; declared here so reports and checks know their names."""

    def __init__(self, params: Mapping[str, Any]) -> None:
        self.params = dict(params)

    def load_data(self, data_dir: Path | None, download: bool) -> DataSplits:
        raise NotImplementedError

    def dense_model(self) -> nn.Module:
        raise NotImplementedError

    def tensorized_model(self, rank: int) -> nn.Module:
        raise NotImplementedError

    def example_input(self, batch_size: int, generator: torch.Generator | None = None) -> Tensor:
        """A random batch shaped like the task's inputs (export checks and benchmarks use it)."""
        if self.input_shape is None:
            raise NotImplementedError(f"task {self.name} declares no input_shape")
        return torch.randn(batch_size, *self.input_shape, generator=generator)

    def augment(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """A training batch as the model sees it (default: unchanged); draws only from ``generator``."""
        return x

    def calibrate(self, model: nn.Module, train: Split, device: torch.device) -> None:
        """Runs before every evaluation (default: nothing). Tasks whose models hold
        BatchNorm re-estimate its statistics here with ``recalibrate_batchnorm``:
        a stochastic method's eval-mode weights differ from its training ones."""

    def loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(outputs, targets)

    def correct(self, outputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, int]:
        """Top-1 hits, top-5 hits and the number of scored targets in a batch (default: one class
        label per example). Accuracy is hits / scored; a sequence task scores its tokens."""
        return classification_hits(outputs, targets)

    def expected_output_shape(self, x: Tensor, data: DataSplits) -> tuple[int, ...]:
        """The model's output shape for input batch ``x`` (the contract checks it): (batch, classes)."""
        return (len(x), data.num_classes)

    def final_metrics(self, model: nn.Module, data: DataSplits, device: torch.device) -> dict[str, float]:
        """Extra final measurements of the trained model, named as declared in ``metrics`` (default: none)."""
        return {}

    def optimizer(self, param_groups: Iterable[dict]) -> torch.optim.Optimizer:
        return torch.optim.Adam(param_groups, lr=self.params["lr"])

    def scheduler(self, optimizer: torch.optim.Optimizer, epochs: int) -> torch.optim.lr_scheduler.LRScheduler | None:
        """Stepped once per epoch, ``epochs`` times (per optimizer step with ``scheduler_interval = "step"``;
        then ``epochs`` is the number of optimizer steps)."""
        return None

    def recipe(self) -> dict[str, Any]:
        """The training recipe as printed and recorded."""
        return {k: self.params[k] for k in self.recipe_keys if k in self.params}

    @classmethod
    def adapt_to_data(cls, data: DataSplits, params: Mapping[str, Any]) -> dict[str, Any]:
        """The resolved parameters fitted to the data actually loaded (a text task lowers its vocabulary
        to the words the training split has); default: unchanged."""
        return dict(params)
