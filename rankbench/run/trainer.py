"""The training loop: one ``Trainer`` for every method and every caller, with hooks per step and per epoch."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from rankbench import records
from rankbench.data import DataSplits, Split, iterate_batches
from rankbench.errors import RankbenchError
from rankbench.layers.tensorized import selector_parameters, weight_parameters
from rankbench.plugins.method import Method, StepLoss
from rankbench.plugins.task import Task
from rankbench.run.checkpoint import Checkpoint
from rankbench.run.metrics import Evaluation, compression_ratio, evaluate, synchronize, total_rank


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


class TrainerCallback:
    """Something the trainer tells about each step and epoch (logging, checkpointing, the divergence
    check); raising stops the training. ``losses`` are the step's (total, task, penalty) where the
    device is read every step (a CPU), else None (a GPU reads them once per epoch)."""

    def on_loss(self, trainer: Trainer, epoch: int, batch: int, losses: tuple[float, float, float] | None) -> None:
        """Once batch ``batch`` of ``epoch`` has its loss, before the backward pass."""

    def on_step_end(self, trainer: Trainer, epoch: int, batch: int,
                    losses: tuple[float, float, float] | None) -> None:
        """After the optimizer step (and a per-step scheduler's) of batch ``batch`` of ``epoch``."""

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict[str, float]) -> None:
        """After the epoch's validation and ``Method.on_epoch_end``."""


class DivergenceCheck(TrainerCallback):
    """A NaN or infinite loss stops the run with a one-line error naming the fix."""

    def on_loss(self, trainer: Trainer, epoch: int, batch: int, losses: tuple[float, float, float] | None) -> None:
        if losses is not None and not math.isfinite(losses[0]):
            raise _diverged(losses[0], epoch, f", batch {batch}")

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict[str, float]) -> None:
        if not math.isfinite(trainer.epoch_total):
            raise _diverged(trainer.epoch_total, epoch, "")


class Checkpointing(TrainerCallback):
    """Hands the full training state to ``save`` after every epoch."""

    def __init__(self, save: Callable[[Checkpoint], None]) -> None:
        self.save = save

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict[str, float]) -> None:
        self.save(trainer.state_dict())


class EpochLog(TrainerCallback):
    """Hands every epoch's metrics to ``log`` (the tracker, a progress bar, a study's pruner)."""

    def __init__(self, log: EpochCallback) -> None:
        self.log = log

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict[str, float]) -> None:
        self.log(epoch, metrics)


class Trainer:
    """One training of one model, the only training loop in rankbench: ``rankbench run``, study
    trials, the contract suite and the benchmarks all train through it, so a method's per-step and
    per-epoch behaviour (``Method.on_step_end``, ``Method.on_epoch_end``) is the same everywhere.

    It owns the task's optimizer (weights and selectors at their rates; handed to the method by
    ``Method.set_optimizer``) and scheduler, the data-order
    generator seeded with ``seed``, and the step and epoch counters; ``state_dict``/``load_state_dict``
    hold all of it (and the method's own state), so a resumed training draws exactly the random numbers
    an uninterrupted one would. ``callbacks`` run in order after every step and epoch.

    ``compile`` trains and validates through ``torch.compile(model)`` (CUDA graphs on a GPU, see
    ``compile_options``): one graph per batch shape (full and last partial batch, train and eval),
    after one eager pass per shape that makes the layers' contraction plans. On a GPU the epoch's
    losses are summed on the device and read once per epoch (no host synchronisation per step), and
    the time per batch is the epoch's training time over its batches; on a CPU each step is timed."""

    def __init__(self, model: nn.Module, method: Method, task: Task, data: DataSplits, *, epochs: int, seed: int,
                 device: torch.device, dense_parameters: int, compile: bool = False,
                 callbacks: Sequence[TrainerCallback] = (), batch_size: int | None = None) -> None:
        self.batch_size = batch_size or task.params["batch_size"]
        if len(data.train) == 0 or len(data.val) == 0:
            raise RankbenchError(f"{data.name}: the training or validation split is empty: use a larger dataset")
        self.model, self.method, self.task, self.data = model, method, task, data
        self.epochs, self.device, self.dense_parameters = epochs, device, dense_parameters
        self.callbacks = list(callbacks)
        self.runner = compiled_model(model, data, self.batch_size, device) if compile else model
        self.per_step_sync = device.type != "cuda"
        lr = task.params["lr"]
        self.optimizer = task.optimizer(param_groups(model, lr, method.selector_lr(lr)))
        method.set_optimizer(self.optimizer)
        self.per_step_scheduler = task.scheduler_interval == "step"
        self.steps_per_epoch = math.ceil(len(data.train) / self.batch_size)
        method.on_train_begin(model, epochs, self.steps_per_epoch)
        self.scheduler = task.scheduler(self.optimizer,
                                        epochs * self.steps_per_epoch if self.per_step_scheduler else epochs)
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch = 0
        """Finished epochs."""
        self.step = 0
        """Finished optimizer steps, over every epoch."""
        self.history: list[dict[str, float]] = []
        self.batch = 0
        """Finished steps of the epoch in progress."""
        self.last_read: tuple[float, float, float] | None = None
        self.epoch_total = 0.0
        """The last epoch's summed training objective (the divergence check reads it)."""
        self.earlier_seconds = 0.0
        self._started: float | None = None

    # ---------------------------------------------------------------------------- steps and epochs
    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One optimizer step on a batch already on the device; returns its (total, task, penalty)
        losses, detached, on the device (read on the host too where ``per_step_sync``)."""
        losses = self.forward_backward(x, y)
        self.optimizer_step()
        return losses

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The first half of ``train_step``: the method's loss on the batch, its checks, and the backward pass."""
        epoch, batch = self.epoch + 1, self.batch + 1
        self.optimizer.zero_grad(set_to_none=True)
        step = self.method.loss(self.runner, (x, y), self.task.loss)
        if not isinstance(step, StepLoss):
            raise RankbenchError(f"method {self.method.name}: loss() returned a {type(step).__name__}, not a StepLoss")
        if not (isinstance(step.total, torch.Tensor) and step.total.numel() == 1 and step.total.requires_grad):
            raise RankbenchError(f"method {self.method.name}: StepLoss.total must be a scalar tensor that requires "
                                 "grad (the objective the optimizer minimises)")
        losses = torch.stack([step.total.detach(), step.task.detach(), step.penalty.detach().to(step.total.dtype)])
        read = tuple(losses.tolist()) if self.per_step_sync else None  # one read per step for the three numbers
        for callback in self.callbacks:
            callback.on_loss(self, epoch, batch, read)  # type: ignore[arg-type]
        step.total.backward()
        self.last_read = read
        return losses

    def optimizer_step(self) -> None:
        """The second half of ``train_step``: the optimizer (and a per-step scheduler) steps, then the hooks."""
        self.optimizer.step()
        if self.per_step_scheduler and self.scheduler is not None:
            self.scheduler.step()
        self.step += 1
        self.batch += 1
        self.method.on_step_end(self.model, self.step)
        for callback in self.callbacks:
            callback.on_step_end(self, self.epoch + 1, self.batch, self.last_read)

    def train_epoch(self) -> dict[str, float]:
        """One epoch: every training batch in the generator's order, then validation; the epoch's metrics."""
        epoch = self.epoch + 1
        device, task = self.device, self.task
        self.model.train()
        self.batch = 0
        sums = {"loss": 0.0, "penalty": 0.0}
        device_sums = torch.zeros(3, device=device, dtype=torch.float64)
        batch_seconds, total = 0.0, 0.0
        synchronize(device)
        epoch_start = time.perf_counter()
        for x, y in iterate_batches(self.data.train, self.batch_size, shuffle=True, generator=self.generator):
            x, y = task.augment(x, self.generator).to(device), y.to(device)
            t0 = time.perf_counter()
            losses = self.train_step(x, y)
            if self.last_read is not None:
                total += self.last_read[0]
                sums["loss"] += self.last_read[1]
                sums["penalty"] += self.last_read[2]
                batch_seconds += time.perf_counter() - t0
            else:
                device_sums += losses.double()
        batches = self.batch
        if not self.per_step_sync:  # one read per epoch
            synchronize(device)
            batch_seconds = time.perf_counter() - epoch_start
            total, sums["loss"], sums["penalty"] = device_sums.tolist()
        self.epoch_total = total
        if self.scheduler is not None and not self.per_step_scheduler:
            self.scheduler.step()
        task.calibrate(self.model, self.data.train, device)
        val = self.evaluate(self.data.val)
        metrics = {
            records.TRAIN_LOSS: sums["loss"] / batches,
            records.PENALTY: sums["penalty"] / batches,
            records.VAL_LOSS: val.loss,
            records.VAL_ACCURACY: val.accuracy,
            records.COMPRESSION: compression_ratio(self.dense_parameters, self.model),
            records.TOTAL_RANK: float(total_rank(self.model)),
            records.TRAIN_SECONDS_PER_BATCH: batch_seconds / batches,
        }
        self.method.on_epoch_end(self.model, epoch, metrics)
        self.epoch = epoch
        self.history.append(metrics)
        for callback in self.callbacks:
            callback.on_epoch_end(self, epoch, metrics)
        return metrics

    def evaluate(self, split: Split) -> Evaluation:
        """Loss and accuracy of the eval-mode model on ``split``."""
        return evaluate(self.runner, split, self.batch_size, self.task.loss, self.device, self.task.correct)

    def fit(self) -> TrainResult:
        """The remaining epochs, up to ``epochs``."""
        self._started = time.perf_counter()
        while self.epoch < self.epochs:
            self.train_epoch()
        result = TrainResult(history=list(self.history), train_seconds=self.train_seconds())
        if self.history:
            result.train_seconds_per_batch = self.history[-1][records.TRAIN_SECONDS_PER_BATCH]
        return result

    def train_seconds(self) -> float:
        """Seconds in ``fit`` so far, over every attempt of a resumed training."""
        elapsed = time.perf_counter() - self._started if self._started is not None else 0.0
        return self.earlier_seconds + elapsed

    # ---------------------------------------------------------------------------- state
    def state_dict(self) -> Checkpoint:
        """Everything the next epoch depends on."""
        return Checkpoint(
            epoch=self.epoch, model=_cpu(self.model.state_dict()), optimizer=self.optimizer.state_dict(),
            scheduler=None if self.scheduler is None else self.scheduler.state_dict(),
            method=self.method.state_dict(), torch_rng=torch.get_rng_state(), data_rng=self.generator.get_state(),
            cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            history=list(self.history), train_seconds=self.train_seconds(), step=self.step,
        )

    def load_state_dict(self, checkpoint: Checkpoint) -> None:
        """Continue from ``checkpoint`` (into a freshly built model and method)."""
        self.model.load_state_dict(checkpoint.model)
        self.method.load_state_dict(self.model, checkpoint.method)
        self.optimizer.load_state_dict(checkpoint.optimizer)
        if self.scheduler is not None and checkpoint.scheduler is not None:
            self.scheduler.load_state_dict(checkpoint.scheduler)
        self.generator.set_state(checkpoint.data_rng)
        torch.set_rng_state(checkpoint.torch_rng)
        if checkpoint.cuda_rng and self.device.type == "cuda":
            torch.cuda.set_rng_state_all(checkpoint.cuda_rng)
        self.epoch = checkpoint.epoch
        self.step = checkpoint.step if checkpoint.step is not None else checkpoint.epoch * self.steps_per_epoch
        self.history = list(checkpoint.history)
        self.earlier_seconds = checkpoint.train_seconds


def batch_trainer(model: nn.Module, method: Method, task: Task, x: torch.Tensor, y: torch.Tensor,
                  device: torch.device, runner: nn.Module | None = None) -> Trainer:
    """A trainer whose data is one fixed batch, for timing and profiling its ``train_step`` (the
    benchmarks); ``runner`` is what the steps call instead of ``model`` (e.g. a ``torch.compile``d one)."""
    split = Split(x.detach().cpu(), y.detach().cpu())
    num_classes = int(y.max()) + 1 if not y.is_floating_point() and y.numel() else 1
    data = DataSplits("one batch", "benchmark inputs", split, split, split, max(num_classes, 2))
    trainer = Trainer(model, method, task, data, epochs=1, seed=0, device=device, dense_parameters=1,
                      batch_size=len(x))
    if runner is not None:
        trainer.runner = runner
    return trainer


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
    """A :class:`Trainer` with the usual callbacks, run to ``epochs``: the divergence check, then
    ``on_checkpoint`` (the full state after every epoch), then ``on_epoch`` (which logs it). An epoch
    is thus recorded only once it can be resumed from, so a failed or interrupted write never makes a
    resumed run log an epoch twice; ``resume`` continues from a checkpoint."""
    callbacks: list[TrainerCallback] = [DivergenceCheck()]
    if on_checkpoint is not None:
        callbacks.append(Checkpointing(on_checkpoint))
    if on_epoch is not None:
        callbacks.append(EpochLog(on_epoch))
    trainer = Trainer(model, method, task, data, epochs=epochs, seed=seed, device=device,
                      dense_parameters=dense_parameters, compile=compile, callbacks=callbacks)
    if resume is not None:
        trainer.load_state_dict(resume)
    return trainer.fit()


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


def compile_module(model: nn.Module, **options) -> nn.Module:
    """``torch.compile(model, **options)`` with the model's forward hooks traced into its graph.

    By default a compiled module runs its hooks outside Dynamo, which then compiles each hook as a
    graph of its own: a :class:`~rankbench.layers.batched.CoreBank`'s pass (every core gated,
    same-shaped layers stacked) would be a second graph per step whose outputs the forward's graph
    reads. ``wrap_top_frame`` (torch >= 2.9) traces the whole call, hooks included, as one graph."""
    config = torch._dynamo.config
    if hasattr(config, "wrap_top_frame"):
        with config.patch(wrap_top_frame=True):
            return torch.compile(model, **options)
    return torch.compile(model, **options)


def compiled_model(model: nn.Module, data: DataSplits, batch_size: int, device: torch.device) -> nn.Module:
    """``torch.compile(model)``, after one eager forward per batch shape it will see (train and eval
    mode) so every tensorized layer has planned its contractions outside the traced code. The warm-up
    leaves every random generator and every buffer (BatchNorm's running statistics) as it found them, so a
    compiled run draws and computes what an eager one would."""
    shapes = {(split.x.shape[1:], n) for split in (data.train, data.val)
              for n in {min(batch_size, len(split)), len(split) % batch_size} if n}
    was_training = model.training
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        for training in (True, False):
            model.train(training)
            for shape, n in shapes:
                split = data.train if data.train.x.shape[1:] == shape else data.val
                model(split.x[:n].to(device))
        for name, buffer in model.named_buffers():
            buffer.copy_(buffers[name])
    model.train(was_training)
    torch.compiler.reset()  # graphs of an earlier run's model (a study worker trains one after another) would
    # count against torch's recompile limit for the same forward code, and past it training falls back to eager
    return compile_module(model, **compile_options(device))


def _cpu(state: dict) -> dict:
    return {k: v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
