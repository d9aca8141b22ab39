"""One experiment from a prepared run: every seed built, trained, measured and tracked.

``config`` → ``prepare`` → :func:`run` → ``trainer.fit`` → ``metrics`` → ``tracking``;
the names it records are declared in ``rankbench.records``.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import rankbench
from rankbench import records
from rankbench.errors import RankbenchError
from rankbench.hyper import Hyper
from rankbench.layers.tensorized import count_parameters, learned_ranks, prune_model, tensorized_layers
from rankbench.plugins.method import Method
from rankbench.run.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from rankbench.run.metrics import evaluate, inference_seconds, total_rank
from rankbench.run.prepare import PreparedRun
from rankbench.run.stopping import signal_name
from rankbench.run.tracking import HOST_TAG, PID_TAG, Tracker, param_text, run_identity
from rankbench.run.trainer import TrainingDiverged, fit


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
    final: dict[str, float] = field(default_factory=dict)
    """Every final metric the run logged (test loss, tensorized compression, a task's own, ...)."""


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@torch.no_grad()
def contraction_choices(model: torch.nn.Module, batch: torch.Tensor) -> dict[str, str]:
    """The training contraction each tensorized layer uses on a batch like ``batch``: the rows each
    layer sees (an LSTM's embedding sees batch × length indices) are read off one eval-mode forward,
    which changes no weight, statistic or random stream."""
    rows: dict[str, int] = {}
    layers = dict(tensorized_layers(model))

    def record(name: str):
        def hook(module, args) -> None:  # a pre-hook that returns nothing leaves the input as it is
            rows.setdefault(name, module.contraction_rows(args[0]))
        return hook

    hooks = [layer.register_forward_pre_hook(record(name)) for name, layer in layers.items()]
    was_training = model.training
    try:
        with torch.random.fork_rng(devices=[batch.device] if batch.device.type == "cuda" else []):
            model.eval()(batch)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return {name: layer.training_contraction(rows.get(name, len(batch))) for name, layer in layers.items()}


def run_name(method: str, hyperparameters: Mapping[str, Hyper], params: Mapping[str, Any], seed: int) -> str:
    """``ours[lambda=0.2,sigma=0.5]-seed0``: the method and the values of its ``label`` hyperparameters."""
    keys = ",".join(f"{k}={v}" for k, v in params.items()
                    if k in hyperparameters and hyperparameters[k].label and v is not None)
    return f"{method}" + (f"[{keys}]" if keys else "") + f"-seed{seed}"


def recorded_params(prepared: PreparedRun, seed: int, model: torch.nn.Module) -> dict[str, Any]:
    """What a run records as MLflow params: the resolved hyperparameters that ran, and the run's facts."""
    data, task = prepared.data, prepared.task
    facts = {
        records.TASK: prepared.config.task, records.METHOD: prepared.config.method, records.SEED: seed,
        records.RECIPE: prepared.recipe,
        records.BUDGET_STEPS: prepared.config.budget_steps, records.STEPS_PER_EPOCH: prepared.steps_per_epoch,
        records.DATA_NAME: data.name, records.DATASET_SOURCE: data.source,
        records.DATASET_DIGEST: data.digest,
        records.TRAIN_SIZE: len(data.train), records.VAL_SIZE_USED: len(data.val), records.TEST_SIZE: len(data.test),
        records.INITIAL_RANKS: json.dumps(learned_ranks(model)),
        records.CONTRACTION: json.dumps(contraction_choices(
            model, data.train.x[:prepared.batch_size].to(prepared.device))),
        records.INITIAL_PARAMETERS: count_parameters(model), records.DENSE_PARAMETERS: prepared.dense_parameters,
        records.DEVICE: str(prepared.device), records.COMPILE: "on" if prepared.compiled else "off",
        records.THREADS: torch.get_num_threads(),
        records.RANKBENCH_VERSION: rankbench.__version__, records.TORCH_VERSION: torch.__version__,
        records.GIT_COMMIT: git_commit(),
    }
    settings = {**task.params, **prepared.method_params}
    clash = sorted(set(settings) & set(facts))
    if clash:  # discovery refuses such plugins; a plugin built by hand reaches here
        raise RankbenchError(f"hyperparameter {clash[0]!r} is a name rankbench records itself: rename it")
    return {**settings, **facts}


@dataclass(frozen=True)
class StoppedRun:
    """The run a stop signal interrupted, attached to the ``KeyboardInterrupt`` as ``stopped_run``,
    so the command line can say how to continue it."""

    run_id: str
    seed: int
    resumable: bool
    """Whether it has a checkpoint (it finished an epoch)."""
    study: str | None = None
    refused: str | None = None
    """Why the store would not mark it KILLED (it then stays RUNNING until ``report`` finds it dead)."""


def _mark_killed(tracker: Tracker, run_id: str, reason: str, tries: int = 3) -> str | None:
    """Mark a stopped run KILLED, retrying a store that is busy; None once done, else the store's refusal
    (the message then says so instead of claiming KILLED)."""
    for attempt in range(tries):
        try:
            tracker.fail(run_id, reason, killed=True)
            return None
        except RankbenchError as exc:
            refusal = str(exc)
            time.sleep(0.2 * (attempt + 1))
    return refusal


EpochListener = Callable[[int, int, dict[str, float]], None]


def run(
    prepared: PreparedRun,
    *,
    tracker: Tracker | None = None,
    on_start: Callable[[str, int, dict], None] | None = None,
    on_epoch: EpochListener | None = None,
    earlier: Mapping[int, Sequence[str]] | None = None,
) -> list[RunResult]:
    """Run every seed of a prepared run; each seed is one tracked MLflow run.

    A failing seed is marked FAILED (or KILLED on Ctrl-C) in MLflow and the
    error re-raised; seeds finished before it stay FINISHED. Every epoch ends
    with a checkpoint (``Tracker.checkpoint_path``); ``config.resume`` names a
    run to continue from its last one, in the same MLflow run. ``earlier`` maps
    seeds to runs of earlier attempts at this same run (a retried study trial):
    a finished one is read back instead of trained again, else the unfinished one
    whose checkpoint is furthest on is continued; any other (different settings,
    no checkpoint, still alive) is left alone and the seed starts afresh.
    """
    config = prepared.config
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    tracker = tracker or Tracker(config.tracking_uri)
    experiment = config.experiment or config.task
    candidates = {seed: list(runs) for seed, runs in (earlier or {}).items()}
    seeds = config.seeds
    if config.resume is not None:
        seed = _resumed_seed(prepared, tracker)
        seeds, candidates = (seed,), {seed: [config.resume]}
    results = []
    for seed in seeds:
        continuation, earlier_run = _best_continuation(prepared, tracker, candidates.get(seed, []))
        if continuation == "finished":
            if on_start is not None:
                on_start(earlier_run, seed, dict(tracker.get_run(earlier_run).data.params))
            tracker.set_tags(earlier_run, config.tags)
            results.append(recorded_result(tracker, earlier_run))
            continue
        model, method = prepared.build(seed)
        params = recorded_params(prepared, seed, model)
        checkpoint = None
        if continuation is None:
            tags = {"method": config.method, "task": config.task, "dataset": prepared.data.name,
                    "rankbench_version": rankbench.__version__, **run_identity(), **config.tags}
            name = run_name(config.method, prepared.method_cls.hyperparameters, prepared.method_params, seed)
            run_id = tracker.start(experiment, name, params, tags)
        else:
            run_id = earlier_run
            checkpoint = load_checkpoint(tracker.checkpoint_path(run_id))
            tracker.reopen(run_id, {**run_identity(), **config.tags})
        with tracker.heartbeat(run_id):  # another machine can tell this run is alive (Tracker.death_reason)
            try:
                if on_start is not None:
                    on_start(run_id, seed, params)
                results.append(_train_and_measure(prepared, method, model, seed, tracker, run_id, on_epoch,
                                                  checkpoint))
            except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM (rankbench.run.stopping)
                reason = "interrupted" if signal_name(exc) == "SIGINT" else f"interrupted by {signal_name(exc)}"
                refused = _mark_killed(tracker, run_id, reason)
                resumable = tracker.checkpoint_path(run_id).is_file()
                exc.stopped_run = StoppedRun(run_id, seed, resumable, config.tags.get("study"),  # type: ignore
                                             refused)
                raise
            except RankbenchError as exc:
                with contextlib.suppress(RankbenchError):  # the run stays RUNNING; the next report marks it dead
                    tracker.fail(run_id, f"{type(exc).__name__}: {exc}")
                resumable = tracker.checkpoint_path(run_id).is_file() and not isinstance(exc, TrainingDiverged)
                if resumable and "study" not in config.tags:
                    raise type(exc)(f"{exc}; run {run_id} is marked FAILED: then continue it with its own "
                                    f"command line and --resume {run_id}") from None
                raise
            except BaseException as exc:  # a bug, or plugin code that called sys.exit: not left RUNNING
                with contextlib.suppress(RankbenchError):
                    tracker.fail(run_id, f"{type(exc).__name__}: {exc}")
                raise
    return results


def _best_continuation(prepared: PreparedRun, tracker: Tracker, run_ids: Sequence[str]) -> tuple[str | None, str]:
    """Among earlier attempts at one seed: a finished run, else the resumable one that got furthest
    (most epochs logged), else none (``(None, "")``)."""
    best: tuple[tuple[int, int], str, str] | None = None
    for run_id in dict.fromkeys(run_ids):
        continuation = _continuation(prepared, tracker, run_id)
        if continuation is None:
            continue
        epochs = len(tracker.metric_history(run_id, records.VAL_ACCURACY)) if continuation == "resume" else 0
        rank = (continuation == "finished", epochs)
        if best is None or rank > best[0]:
            best = (rank, continuation, run_id)
    return (best[1], best[2]) if best is not None else (None, "")


def _asked(prepared: PreparedRun) -> dict[str, Any]:
    """What this prepared run would record for its settings (the dataset as the data's name)."""
    return {**prepared.task.params, **prepared.method_params, records.TASK: prepared.config.task,
            records.METHOD: prepared.config.method, records.DATA_NAME: prepared.data.name}


def _differing_setting(prepared: PreparedRun, params: Mapping[str, str]) -> str | None:
    """The first task/method setting this prepared run asks differently from a run's recorded params."""
    asked = _asked(prepared)
    if records.DATA_NAME not in params:  # a run before 0.2.0 recorded the data's name over the hyperparameter
        asked[records.LEGACY_DATA_NAME] = prepared.data.name
    differ = sorted(k for k, v in asked.items() if k in params and params[k] != param_text(v))
    return differ[0] if differ else None


def _resumed_seed(prepared: PreparedRun, tracker: Tracker) -> int:
    """The seed of the run to resume, after checking that this command asks for what it ran."""
    run_id = prepared.config.resume
    recorded = tracker.get_run(run_id)
    params, tags = recorded.data.params, recorded.data.tags
    if tags.get("rankbench.role") == "study":
        raise RankbenchError(f"--resume {run_id}: that is the parent run of study {tags.get('study', '?')}: run the "
                             "study file again (rankbench study FILE) to continue its unfinished trials")
    if records.SEED not in params or records.METHOD not in params:
        raise RankbenchError(f"--resume {run_id}: not a rankbench training run (it has no seed or method param): "
                             "give the id a `rankbench run` printed")
    if recorded.info.status == "FINISHED":
        raise RankbenchError(f"--resume {run_id}: the run has finished; nothing to resume")
    if recorded.info.status == "RUNNING" and not tracker.process_gone(recorded):
        raise RankbenchError(f"--resume {run_id}: the run is still being trained by process "
                             f"{tags.get(PID_TAG, '?')} on {tags.get(HOST_TAG, '?')}: wait for it, or stop that "
                             "process first (Ctrl-C or kill marks the run KILLED), then resume")
    key = _differing_setting(prepared, params)
    if key is not None:
        asked = _asked(prepared)
        raise RankbenchError(f"--resume {run_id}: the run was started with {key}={params[key]}, this command asks "
                             f"{key}={asked[key]}: repeat the run's own command line with --resume")
    return int(params[records.SEED])


def _continuation(prepared: PreparedRun, tracker: Tracker, run_id: str) -> str | None:
    """How this prepared run goes on from an earlier run of the same seed: ``"finished"`` (read it
    back), ``"resume"`` (continue from its checkpoint), or ``None`` (start a new run)."""
    if prepared.config.resume is not None:
        return "resume"  # checked strictly by _resumed_seed
    try:
        recorded = tracker.get_run(run_id)
    except RankbenchError:
        return None
    if _differing_setting(prepared, recorded.data.params) is not None:
        return None
    if recorded.info.status == "FINISHED":
        return "finished"
    if recorded.info.status == "RUNNING" and not tracker.process_gone(recorded):
        return None  # someone is still training it
    return "resume" if tracker.checkpoint_path(run_id).is_file() else None


def tensorized_compression(model: torch.nn.Module, dense_parameters: int) -> float:
    """Dense parameters of the tensorized layers / their pruned parameters: the dense reference's
    parameters minus every parameter outside those layers (the same in both models), over the
    layers' own. 1 for a model without tensorized layers."""
    tensorized = sum(layer.parameter_count() for _, layer in tensorized_layers(model))
    if not tensorized:
        return 1.0
    return (dense_parameters - (count_parameters(model) - tensorized)) / tensorized


def recorded_result(tracker: Tracker, run_id: str) -> RunResult:
    """A finished run's ``RunResult``, read back from the store (history from the per-epoch metrics)."""
    recorded = tracker.get_run(run_id)
    params, metrics, tags = recorded.data.params, recorded.data.metrics, recorded.data.tags
    histories = {name: {m.step: m.value for m in tracker.metric_history(run_id, name)}
                 for name in records.EPOCH_METRICS}
    steps = sorted(histories[records.VAL_ACCURACY])
    history = [{name: values[step] for name, values in histories.items() if step in values} for step in steps]
    with tempfile.TemporaryDirectory() as folder:
        ranks = json.loads(tracker.download_artifact(run_id, "ranks.json", folder).read_text())
    last = history[-1] if history else {}
    return RunResult(
        run_id=run_id, task=params[records.TASK], method=params[records.METHOD], seed=int(params[records.SEED]),
        dataset=params.get(records.DATA_NAME, params.get(records.LEGACY_DATA_NAME, tags.get("dataset", ""))),
        test_accuracy=metrics[records.TEST_ACCURACY], test_top5=metrics[records.TEST_TOP5],
        compression=records.metric(metrics, records.COMPRESSION), parameters=int(metrics[records.PARAMETERS]),
        dense_parameters=int(params[records.DENSE_PARAMETERS]), ranks=ranks,
        total_rank=sum(sum(r) for r in ranks.values()),
        train_seconds_per_batch=last.get(records.TRAIN_SECONDS_PER_BATCH, float("nan")),
        inference_seconds=metrics[records.INFERENCE_SECONDS], wall_seconds=metrics[records.WALL_SECONDS],
        history=history, final={k: v for k, v in metrics.items() if k not in records.EPOCH_METRICS},
    )


def _log_unlogged_epochs(tracker: Tracker, run_id: str, resume: Checkpoint) -> None:
    """Log the checkpoint's epochs that the store lacks: an epoch is checkpointed before it is logged,
    so a run stopped between the two has one epoch to catch up, and none is ever logged twice."""
    logged = {m.step for m in tracker.metric_history(run_id, records.VAL_ACCURACY)}
    for epoch, metrics in enumerate(resume.history, start=1):
        if epoch not in logged:
            tracker.log_metrics(run_id, metrics, step=epoch)


def _train_and_measure(prepared: PreparedRun, method: Method, model: torch.nn.Module, seed: int, tracker: Tracker,
                       run_id: str, on_epoch: EpochListener | None, resume: Checkpoint | None = None) -> RunResult:
    start = time.perf_counter() - (resume.wall_seconds if resume is not None else 0.0)  # a resumed run logs the sum
    data = prepared.data
    if resume is None:
        tracker.log_dataset(run_id, data.name, data.digest, data.source,
                            {"train": len(data.train), "validation": len(data.val), "test": len(data.test)})
    else:
        _log_unlogged_epochs(tracker, run_id, resume)
    checkpoint_path = tracker.checkpoint_path(run_id)

    def checkpoint(state: Checkpoint) -> None:
        state.wall_seconds = time.perf_counter() - start
        save_checkpoint(state, checkpoint_path)

    def epoch_done(epoch: int, metrics: dict[str, float]) -> None:
        tracker.log_metrics(run_id, metrics, step=epoch)
        if on_epoch is not None:
            on_epoch(seed, epoch, metrics)

    trained = fit(model, method, prepared.task, prepared.data, epochs=prepared.epochs, seed=seed,
                  device=prepared.device, dense_parameters=prepared.dense_parameters, on_epoch=epoch_done,
                  resume=resume, on_checkpoint=checkpoint,
                  compile=prepared.compiled)
    task = prepared.task
    test = evaluate(model, prepared.data.test, prepared.batch_size, task.loss, prepared.device, task.correct)
    ranks = learned_ranks(model)
    parameters = count_parameters(model)
    task_metrics = task.final_metrics(model, prepared.data, prepared.device)
    undeclared = sorted(set(task_metrics) - set(task.metrics))
    if undeclared:
        raise RankbenchError(f"task {prepared.config.task} returned metric(s) {', '.join(undeclared)} that it does "
                             "not declare: list them in the task's `metrics`")
    result = RunResult(
        run_id=run_id, task=prepared.config.task, method=prepared.config.method, seed=seed,
        dataset=prepared.data.name, test_accuracy=test.accuracy, test_top5=test.top5,
        compression=prepared.dense_parameters / parameters, parameters=parameters,
        dense_parameters=prepared.dense_parameters, ranks=ranks, total_rank=total_rank(model),
        train_seconds_per_batch=trained.train_seconds_per_batch,
        inference_seconds=inference_seconds(model, prepared.data.test, prepared.batch_size, prepared.device),
        wall_seconds=0.0, history=trained.history,
    )
    result.wall_seconds = time.perf_counter() - start
    final = {
        records.TEST_ACCURACY: result.test_accuracy, records.TEST_TOP5: result.test_top5,
        records.TEST_LOSS: test.loss, records.PARAMETERS: parameters,
        records.INFERENCE_SECONDS: result.inference_seconds, records.WALL_SECONDS: result.wall_seconds,
        records.TRAIN_SECONDS: trained.train_seconds,
        records.TENSORIZED_COMPRESSION: tensorized_compression(model, prepared.dense_parameters),
        **task_metrics,
    }
    if not trained.history or trained.history[-1][records.COMPRESSION] != result.compression:
        final[records.COMPRESSION] = result.compression  # a method changed ranks after its last epoch was measured
    tracker.log_metrics(run_id, final, step=prepared.epochs)
    result.final = {str(k): float(v) for k, v in final.items()}
    tracker.log_dict(run_id, ranks, "ranks.json")
    tracker.log_state_dict(run_id, model)
    tracker.log_pytorch_model(run_id, prune_model(model).cpu().eval(), input_example=prepared.data.test.x[:2].cpu())
    tracker.finish(run_id)
    checkpoint_path.unlink(missing_ok=True)  # a finished run has nothing to resume
    return result
