"""The training loop: one path for every method, hooks for penalty and per-epoch actions."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from rankbench.data import DataSplits, iterate_batches
from rankbench.errors import RankbenchError
from rankbench.layers.tensorized import selector_parameters, weight_parameters
from rankbench.plugins.method import Method
from rankbench.plugins.task import Task
from rankbench.run import records
from rankbench.run.metrics import compression_ratio, evaluate, synchronize, total_rank


class TrainingDiverged(RankbenchError):
    """The loss became NaN or infinite."""


@dataclass
class TrainResult:
    history: list[dict[str, float]] = field(default_factory=list)
    train_seconds_per_batch: float = float("nan")
    train_seconds: float = 0.0


EpochCallback = Callable[[int, dict[str, float]], None]


def param_groups(model: nn.Module, lr: float, selector_lr: float | None = None) -> list[dict]:
    """Weights and selector parameters as separate optimizer groups (selectors at ``selector_lr``)."""
    groups = [{"params": weight_parameters(model), "lr": lr, "name": "weights"}]
    selectors = selector_parameters(model)
    if selectors:
        groups.append({"params": selectors, "lr": lr if selector_lr is None else selector_lr, "name": "selectors"})
    return groups


def fit(
    model: nn.Module,
    method: Method,
    task: Task,
    data: DataSplits,
    *,
    epochs: int,
    seed: int,
    device: torch.device,
    dense_parameters: int,
    on_epoch: EpochCallback | None = None,
) -> TrainResult:
    """Train ``model`` with the task's recipe and the method's loss; evaluate on validation each epoch."""
    batch_size = task.params["batch_size"]
    if len(data.train) == 0 or len(data.val) == 0:
        raise RankbenchError(f"{data.name}: the training or validation split is empty: use a larger dataset")
    lr = task.params["lr"]
    optimizer = task.optimizer(param_groups(model, lr, method.selector_lr(lr)))
    scheduler = task.scheduler(optimizer, epochs)
    generator = torch.Generator().manual_seed(seed)
    result = TrainResult()
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        model.train()
        sums = {"loss": 0.0, "penalty": 0.0}
        batches, batch_seconds = 0, 0.0
        for x, y in iterate_batches(data.train, batch_size, shuffle=True, generator=generator):
            x, y = task.augment(x, generator).to(device), y.to(device)
            synchronize(device)
            t0 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            step = method.loss(model, (x, y), task.loss)
            # one device sync per step for the three numbers
            total, task_loss, penalty = torch.stack(
                [step.total.detach(), step.task.detach(), step.penalty.detach().to(step.total.dtype)]
            ).tolist()
            if not math.isfinite(total):
                raise TrainingDiverged(
                    f"loss became {total} at epoch {epoch}, batch {batches + 1}: "
                    "lower the learning rate (--set lr=...) or the penalty weight"
                )
            step.total.backward()
            optimizer.step()
            synchronize(device)
            batch_seconds += time.perf_counter() - t0
            sums["loss"] += task_loss
            sums["penalty"] += penalty
            batches += 1
        if scheduler is not None:
            scheduler.step()
        task.calibrate(model, data.train, device)
        val = evaluate(model, data.val, batch_size, task.loss, device)
        metrics = {
            records.TRAIN_LOSS: sums["loss"] / batches,
            records.PENALTY: sums["penalty"] / batches,
            records.VAL_LOSS: val.loss,
            records.VAL_ACCURACY: val.accuracy,
            records.COMPRESSION: compression_ratio(dense_parameters, model),
            records.TOTAL_RANK: float(total_rank(model)),
            records.TRAIN_SECONDS_PER_BATCH: batch_seconds / batches,
        }
        method.on_epoch_end(model, epoch, metrics)
        result.history.append(metrics)
        result.train_seconds_per_batch = metrics[records.TRAIN_SECONDS_PER_BATCH]
        if on_epoch is not None:
            on_epoch(epoch, metrics)
    result.train_seconds = time.perf_counter() - start
    return result
