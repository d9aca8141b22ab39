"""The Python API of one experiment: config → registry → task/method → trainer → metrics → tracker."""

from __future__ import annotations

import json
import math
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

import rankbench
from rankbench.plugins.hyper import parse_assignments, resolve
from rankbench.run.config import KEY_HYPERPARAMETERS, RunConfig
from rankbench.errors import RankbenchError
from rankbench.plugins.method import Method, MethodContext
from rankbench.run.metrics import evaluate, inference_seconds, total_rank
from rankbench.plugins.registry import Registry
from rankbench.plugins.task import Task
from rankbench.layers.tensorized import TensorizedLinear, count_parameters, learned_ranks, tensorized_layers
from rankbench.run.tracking import Tracker
from rankbench.run.trainer import fit


@dataclass
class RunResult:
    """The final numbers of one (task, method, seed) run."""

    run_id: str
    task: str
    method: str
    seed: int
    dataset: str
    test_accuracy: float
    test_top5: float
    compression: float
    parameters: int
    dense_parameters: int
    ranks: dict[str, list[int]]
    total_rank: int
    train_seconds_per_batch: float
    inference_seconds: float
    wall_seconds: float
    history: list[dict[str, float]] = field(default_factory=list)


def make_config(
    registry: Registry,
    task: str,
    method: str,
    assignments: Sequence[str] | Mapping[str, Any] = (),
    *,
    epochs: int | None = None,
    seeds: Sequence[int] = (0,),
    **options: Any,
) -> RunConfig:
    """Validate a task, a method and ``key=value`` overrides into a ``RunConfig``.

    A key belongs to the method or to the task (its recipe and data options);
    method defaults are the method's own, then the task's ``method_defaults``.
    """
    task_cls, method_cls = registry.task(task), registry.method(method)
    raw = dict(assignments) if isinstance(assignments, Mapping) else parse_assignments(assignments)
    if epochs is not None:
        raw["epochs"] = epochs
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
    defaults = {k: v for k, v in task_cls.method_defaults.get(method, {}).items() if k not in method_raw}
    method_params = resolve(method_cls.hyperparameters, {**defaults, **method_raw}, f"method {method}")
    task_params = resolve(task_cls.hyperparameters, task_raw, f"task {task}")
    seeds = tuple(seeds)
    if not seeds or any(s < 0 for s in seeds):
        raise RankbenchError("--seeds: give non-negative integers, e.g. --seeds 0,1,2")
    return RunConfig(task=task, method=method, task_params=task_params, method_params=method_params,
                     seeds=seeds, explicit=frozenset(raw), **options)


def epochs_for_steps(steps: int, train_size: int, batch_size: int) -> int:
    """Epochs that give at least ``steps`` optimizer steps (e.g. the paper's ~70k on any dataset)."""
    return max(1, math.ceil(steps / math.ceil(train_size / batch_size)))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise RankbenchError(f"--device {name}: choose auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise RankbenchError(f"--device {name}: choose auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RankbenchError(f"--device {name}: no CUDA device is available here; use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RankbenchError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def build_model(task: Task, method: Method, seed: int, context: MethodContext,
                contraction: str = "auto") -> torch.nn.Module:
    """The task's model for this method, selectors attached, on the device.

    ``contraction`` sets every tensorized linear layer's training strategy
    (``auto`` picks per batch size by FLOP count)."""
    torch.manual_seed(seed)
    if method.tensorized:
        model = task.tensorized_model(method.initial_rank(task.params["initial_rank"]))
    else:
        model = task.dense_model()
    for _, layer in tensorized_layers(model):
        if isinstance(layer, TensorizedLinear):
            layer.strategy = contraction
    method.attach(model, context)
    return model.to(context.device)


def contraction_choices(model: torch.nn.Module, batch_size: int) -> dict[str, str]:
    """The training contraction each tensorized layer uses at this batch size."""
    return {name: layer.choose_strategy(batch_size) if isinstance(layer, TensorizedLinear) else "weight"
            for name, layer in tensorized_layers(model)}


def run_name(config: RunConfig, seed: int) -> str:
    keys = ",".join(f"{k}={v}" for k, v in config.method_params.items()
                    if k in KEY_HYPERPARAMETERS and v is not None)
    return f"{config.method}" + (f"[{keys}]" if keys else "") + f"-seed{seed}"


EpochListener = Callable[[int, int, dict[str, float]], None]


def run(
    config: RunConfig,
    registry: Registry,
    *,
    tracker: Tracker | None = None,
    on_start: Callable[[str, int, dict], None] | None = None,
    on_epoch: EpochListener | None = None,
) -> list[RunResult]:
    """Run every seed of ``config``; each seed is one tracked MLflow run.

    A failing seed is marked FAILED (or KILLED on Ctrl-C) in MLflow and the
    error re-raised; seeds finished before it stay FINISHED.
    """
    device = resolve_device(config.device)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    task_cls = registry.task(config.task)
    data = task_cls(config.task_params).load_data(config.data_dir, config.download)
    recipe_name, task_params = task_cls.recipe_for(data, config.task_params, config.explicit, config.method)
    method_params = task_cls.method_params_for(data, config.method, config.method_params, config.explicit)
    if config.budget_steps is not None:
        task_params["epochs"] = epochs_for_steps(config.budget_steps, len(data.train), task_params["batch_size"])
    task = task_cls(task_params)
    tracker = tracker or Tracker(config.tracking_uri)
    experiment = config.experiment or config.task
    dense_parameters = count_parameters(task.dense_model())
    results = []
    for seed in config.seeds:
        method = registry.method(config.method)(method_params)
        context = MethodContext(num_train=len(data.train), device=device)
        model = build_model(task, method, seed, context, config.contraction)
        params = {
            "task": config.task, "method": config.method, "seed": seed, "recipe": recipe_name, **task.params,
            "budget_steps": config.budget_steps,
            "steps_per_epoch": math.ceil(len(data.train) / task.params["batch_size"]),
            **method_params, "dataset": data.name, "dataset_source": data.source,
            "train_size": len(data.train), "val_size_used": len(data.val), "test_size": len(data.test),
            "initial_ranks": json.dumps(learned_ranks(model)),
            "contraction": json.dumps(contraction_choices(model, task.params["batch_size"])),
            "initial_parameters": count_parameters(model), "dense_parameters": dense_parameters,
            "device": str(device), "threads": torch.get_num_threads(),
            "rankbench_version": rankbench.__version__, "torch_version": torch.__version__,
            "git_commit": git_commit(),
        }
        tags = {"method": config.method, "task": config.task, "dataset": data.name,
                "rankbench_version": rankbench.__version__, **config.tags}
        run_id = tracker.start(experiment, run_name(config, seed), params, tags)
        try:
            if on_start is not None:
                on_start(run_id, seed, params)
            results.append(_train_and_measure(
                config, task, method, model, data, seed, device, dense_parameters, tracker, run_id, on_epoch,
            ))
        except KeyboardInterrupt:
            tracker.fail(run_id, "interrupted", killed=True)
            raise
        except Exception as exc:
            tracker.fail(run_id, f"{type(exc).__name__}: {exc}")
            raise
    return results


def _train_and_measure(config, task, method, model, data, seed, device, dense_parameters, tracker, run_id,
                       on_epoch) -> RunResult:
    start = time.perf_counter()

    def epoch_done(epoch: int, metrics: dict[str, float]) -> None:
        tracker.log_metrics(run_id, metrics, step=epoch)
        if on_epoch is not None:
            on_epoch(seed, epoch, metrics)

    trained = fit(model, method, task, data, epochs=task.params["epochs"], seed=seed, device=device,
                  dense_parameters=dense_parameters, on_epoch=epoch_done)
    batch_size = task.params["batch_size"]
    test = evaluate(model, data.test, batch_size, task.loss, device)
    ranks = learned_ranks(model)
    parameters = count_parameters(model)
    result = RunResult(
        run_id=run_id, task=config.task, method=config.method, seed=seed, dataset=data.name,
        test_accuracy=test.accuracy, test_top5=test.top5, compression=dense_parameters / parameters,
        parameters=parameters, dense_parameters=dense_parameters, ranks=ranks, total_rank=total_rank(model),
        train_seconds_per_batch=trained.train_seconds_per_batch,
        inference_seconds=inference_seconds(model, data.test, batch_size, device),
        wall_seconds=0.0, history=trained.history,
    )
    result.wall_seconds = time.perf_counter() - start
    tracker.log_metrics(run_id, {
        "test_accuracy": result.test_accuracy, "test_top5": result.test_top5, "test_loss": test.loss,
        "compression_ratio": result.compression, "parameters": parameters,
        "inference_seconds": result.inference_seconds, "wall_seconds": result.wall_seconds,
    }, step=task.params["epochs"])
    tracker.log_dict(run_id, ranks, "ranks.json")
    tracker.log_state_dict(run_id, model)
    tracker.finish(run_id)
    return result
