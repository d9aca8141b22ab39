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
from rankbench import records
from rankbench.run.checkpoint import Checkpoint
from rankbench.run.metrics import compression_ratio, evaluate, synchronize, total_rank


class TrainingDiverged(RankbenchError):
    """The loss became NaN or infinite."""


@dataclass
class TrainResult:
    history: list[dict[str, float]] = field(default_factory=list)
    train_seconds_per_batch: float = float("nan")
    train_seconds: float = 0.0
    """Seconds in the training loop, over every attempt of a resumed run."""


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
    resume: Checkpoint | None = None,
    on_checkpoint: Callable[[Checkpoint], None] | None = None,
    compile: bool = False,
) -> TrainResult:
    """Train ``model`` with the task's recipe and the method's loss; evaluate on validation each epoch.

    ``on_checkpoint`` receives the full training state after every epoch, before ``on_epoch``
    (which logs it): an epoch is recorded only once it can be resumed from, so a failed or
    interrupted write never makes a resumed run log an epoch twice. ``resume`` continues from a
    checkpoint, so the remaining epochs draw exactly the random numbers an uninterrupted run would.

    ``compile`` trains and validates through ``torch.compile(model)`` (CUDA graphs on a GPU, see
    ``compile_options``): one graph per batch shape (full and last partial batch, train and eval),
    after one eager pass per shape that makes the layers' contraction plans. On a GPU the epoch's
    losses are summed on the device and read once per epoch (no host synchronisation per step), and
    the time per batch is the epoch's training time over its batches; on a CPU each step is timed."""
    batch_size = task.params["batch_size"]
    if len(data.train) == 0 or len(data.val) == 0:
        raise RankbenchError(f"{data.name}: the training or validation split is empty: use a larger dataset")
    runner = compiled_model(model, data, batch_size, device) if compile else model
    per_step_sync = device.type != "cuda"
    lr = task.params["lr"]
    optimizer = task.optimizer(param_groups(model, lr, method.selector_lr(lr)))
    per_step = task.scheduler_interval == "step"
    scheduler = task.scheduler(optimizer, epochs * math.ceil(len(data.train) / batch_size) if per_step else epochs)
    generator = torch.Generator().manual_seed(seed)
    result = TrainResult()
    first = 1
    earlier_seconds = 0.0
    if resume is not None:
        earlier_seconds = resume.train_seconds
        first = _restore(resume, model, method, optimizer, scheduler, generator, device) + 1
        result.history = list(resume.history)
        if result.history:
            result.train_seconds_per_batch = result.history[-1][records.TRAIN_SECONDS_PER_BATCH]
    start = time.perf_counter()
    for epoch in range(first, epochs + 1):
        model.train()
        sums = {"loss": 0.0, "penalty": 0.0}
        device_sums = torch.zeros(3, device=device, dtype=torch.float64)
        batches, batch_seconds = 0, 0.0
        synchronize(device)
        epoch_start = time.perf_counter()
        for x, y in iterate_batches(data.train, batch_size, shuffle=True, generator=generator):
            x, y = task.augment(x, generator).to(device), y.to(device)
            t0 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            step = method.loss(runner, (x, y), task.loss)
            losses = torch.stack([step.total.detach(), step.task.detach(), step.penalty.detach().to(step.total.dtype)])
            if per_step_sync:  # one read per step for the three numbers
                total, task_loss, penalty = losses.tolist()
                if not math.isfinite(total):
                    raise _diverged(total, epoch, f", batch {batches + 1}")
                sums["loss"] += task_loss
                sums["penalty"] += penalty
            else:
                device_sums += losses.double()
            step.total.backward()
            optimizer.step()
            if per_step and scheduler is not None:
                scheduler.step()
            if per_step_sync:
                batch_seconds += time.perf_counter() - t0
            batches += 1
        if not per_step_sync:  # one read per epoch
            synchronize(device)
            batch_seconds = time.perf_counter() - epoch_start
            total, sums["loss"], sums["penalty"] = device_sums.tolist()
            if not math.isfinite(total):
                raise _diverged(total, epoch, "")
        if scheduler is not None and not per_step:
            scheduler.step()
        task.calibrate(model, data.train, device)
        val = evaluate(runner, data.val, batch_size, task.loss, device, task.correct)
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
        if on_checkpoint is not None:
            on_checkpoint(Checkpoint(
                epoch=epoch, model=_cpu(model.state_dict()), optimizer=optimizer.state_dict(),
                scheduler=None if scheduler is None else scheduler.state_dict(), method=method.state_dict(),
                torch_rng=torch.get_rng_state(), data_rng=generator.get_state(),
                cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                history=list(result.history), train_seconds=earlier_seconds + time.perf_counter() - start,
            ))
        if on_epoch is not None:
            on_epoch(epoch, metrics)
    result.train_seconds = earlier_seconds + time.perf_counter() - start
    return result


def _diverged(total: float, epoch: int, where: str) -> TrainingDiverged:
    return TrainingDiverged(f"loss became {total} at epoch {epoch}{where}: "
                            "lower the learning rate (--set lr=...) or the penalty weight")


def compile_options(device: torch.device, backend: str | None = None) -> dict:
    """``torch.compile`` arguments: CUDA graphs (``reduce-overhead``) on a GPU, inductor's default on a
    CPU; static shapes, so each batch shape is one graph. A ``backend`` (the benchmarks' CPU rehearsal
    uses ``aot_eager``) replaces that choice."""
    if backend is not None:
        return {"backend": backend}
    return {"mode": "reduce-overhead" if device.type == "cuda" else "default", "dynamic": False}


def compiled_model(model: nn.Module, data: DataSplits, batch_size: int, device: torch.device) -> nn.Module:
    """``torch.compile(model)``, after one eager forward per batch shape it will see (train and eval
    mode) so every tensorized layer has planned its contractions outside the traced code. The warm-up
    leaves every random generator as it found it, so a compiled run draws what an eager one would."""
    shapes = {(split.x.shape[1:], n) for split in (data.train, data.val)
              for n in {min(batch_size, len(split)), len(split) % batch_size} if n}
    was_training = model.training
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        for training in (True, False):
            model.train(training)
            for shape, n in shapes:
                split = data.train if data.train.x.shape[1:] == shape else data.val
                model(split.x[:n].to(device))
    model.train(was_training)
    torch.compiler.reset()  # graphs of an earlier run's model (a study worker trains one after another) would
    # count against torch's recompile limit for the same forward code, and past it training falls back to eager
    return torch.compile(model, **compile_options(device))


def _cpu(state: dict) -> dict:
    return {k: v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def _restore(checkpoint: Checkpoint, model: nn.Module, method: Method, optimizer, scheduler,
             generator: torch.Generator, device: torch.device) -> int:
    """Load a checkpoint into a freshly built run; returns the last finished epoch."""
    model.load_state_dict(checkpoint.model)
    method.load_state_dict(model, checkpoint.method)
    optimizer.load_state_dict(checkpoint.optimizer)
    if scheduler is not None and checkpoint.scheduler is not None:
        scheduler.load_state_dict(checkpoint.scheduler)
    generator.set_state(checkpoint.data_rng)
    torch.set_rng_state(checkpoint.torch_rng)
    if checkpoint.cuda_rng and device.type == "cuda":
        torch.cuda.set_rng_state_all(checkpoint.cuda_rng)
    return checkpoint.epoch
