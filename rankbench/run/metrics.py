"""What a run measures: accuracy, compression, learned ranks, latency."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from rankbench.data import Split, iterate_batches
from rankbench.layers.tensorized import count_parameters, learned_ranks
from rankbench.plugins.task import classification_hits


@dataclass(frozen=True)
class Evaluation:
    loss: float
    accuracy: float
    top5: float


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, batch_size: int, loss_fn, device: torch.device,
             score: Callable[[torch.Tensor, torch.Tensor], tuple] | None = None) -> Evaluation:
    """Mean loss, top-1 and top-5 accuracy (in %) of the eval-mode model on a split.

    ``score`` (a task's ``correct``) counts hits per batch; the default scores one class label per
    example. The loss is averaged with the same weights as the hits (per example or per token)."""
    was_training = model.training
    model.eval()
    total_loss, correct, correct5, n = 0.0, 0, 0, 0
    for x, y in iterate_batches(split, batch_size, shuffle=False):
        x, y = x.to(device), y.to(device)
        out = model(x)
        top1, top5, count = (score or classification_hits)(out, y)
        total_loss += float(loss_fn(out, y)) * count
        correct += int(top1)
        correct5 += int(top5)
        n += count
    model.train(was_training)
    return Evaluation(total_loss / n, 100.0 * correct / n, 100.0 * correct5 / n)


@torch.no_grad()
def inference_seconds(model: nn.Module, split: Split, batch_size: int, device: torch.device) -> float:
    """Wall time of one eval-mode pass over the split, after one warm-up pass
    (which also fills the layers' eval weight caches, as a deployed model would)."""
    was_training = model.training
    model.eval()
    for _ in range(2):
        synchronize(device)
        start = time.perf_counter()
        for x, _ in iterate_batches(split, batch_size, shuffle=False):
            model(x.to(device))
        synchronize(device)
        elapsed = time.perf_counter() - start
    model.train(was_training)
    return elapsed


def compression_ratio(dense_parameters: int, model: nn.Module) -> float:
    """Dense reference parameters / parameters of the pruned model (one definition for all methods)."""
    return dense_parameters / count_parameters(model)


def total_rank(model: nn.Module) -> int:
    """Sum of all eval-mode bond sizes (TT boundary bonds of size 1 included)."""
    return sum(sum(r) for r in learned_ranks(model).values())


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, split: Split, batch_size: int, device: torch.device,
                          batches: int) -> None:
    """Recompute every BatchNorm's running statistics with the model in eval mode
    (deterministic gates and masks) over the first ``batches`` training batches.

    Stochastic selectors train with noisy multipliers but evaluate with their
    deterministic ones, which rescales each gated layer's output; statistics
    gathered during training then no longer match and the error compounds
    through the layers. Re-estimating them with the eval-mode weights (a plain
    average over the batches, not a moving one) makes the evaluation measure
    the model that is evaluated. The training trajectory is unaffected: training
    normalises with batch statistics.

    Call it from ``Task.calibrate``. The model's train/eval mode is restored afterwards.

    Args:
        model: The model (nothing happens when it has no BatchNorm).
        split: The training split, read in order, without augmentation.
        batch_size: Examples per batch.
        device: The device the model is on.
        batches: How many batches to average over (``resnet32``: the
            ``bn_calibration_batches`` hyperparameter, default 50; 0 does nothing).
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or batches < 1:
        return
    was_training = model.training
    model.eval()
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    for x, _ in itertools.islice(iterate_batches(split, batch_size, shuffle=False), batches):
        model(x.to(device))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.train(was_training)
