"""Progressive studies: PSTRN's search of one rank per layer (Li, Pan, Chen, Ding, Zhao, Xu, "Heuristic rank
selection with progressively searching tensor ring network", Complex & Intelligent Systems 2022; arXiv
2009.10580; code github.com/koala719/PSTRN).

A study file with a ``[progressive]`` table searches, with NSGA-II on (validation accuracy, compression),
one rank per tensorized layer (a gene; the method takes them as ``ranks=conv1:10,...``). The search runs
in phases of shrinking step (``steps = [5, 2, 1]``): phase 1 samples every gene on ``center +- j * 5``;
each later phase centres every gene's window on its most frequent rank among the ``top_k`` best distinct
individuals of the phase before and samples ``+- j * step`` around it. Every phase is its own Optuna study
(``NAME.phase1``, ...) run by the ordinary study machinery (``runner.worker_loop``: workers, heartbeats,
retries, resume), with Optuna's ``NSGAIISampler`` over integer windows (``suggest_int(low, high, step)``).
Proxy runs train ``budget_steps`` steps on ``[progressive] seed``. Then the best point of all phases is
trained again at full length (``[retrain]``) on the study's seeds: what a leaderboard cites.

"Best" (the narrowing and the final point) is one rule, ``selection_key``: points at or above
``min_compression`` first, by validation accuracy (then compression); below the floor, by compression.
The same command again continues: finished trials are kept, a repeated configuration (within a phase
or across phases) reuses the trial that trained it, the windows are recomputed from the stored trials
(a phase study records its window in its digest, so a changed file is refused), and finished
retraining runs are read back, interrupted ones continued from their checkpoints.

Differences from the reference (its code, ``search/evolution_search_multi.py`` and ``tensor_train.py``):

* Genes: one uniform rank per layer (LeNet-5: 4), not one per bond (its TR-LeNet-5: 20).
* Compression: the model's (dense parameters / parameters, biases included), maximised; the reference
  minimises 100 - the smallest per-layer compression.
* Selection on the validation split; the reference's ``valid_acc`` is its best test accuracy.
* Proxy runs: ``budget_steps`` optimizer steps of the task's own recipe (its schedule fitted to that
  length); the reference trains 20 epochs of Adam 2e-3 with steps at epochs 5, 10, 15.
* Windows: centred on the mode, ``c + j * step`` for ``j`` in ``-half_width..half_width``, kept in
  ``[min_rank, max_rank]``; the reference decodes codes 1..5 as ``code * step + bias`` with a table of
  biases (its phase-2 window around 15 is 12..20, even ranks only) and raises ranks below 2 to 2.
* The best individuals: the ``top_k`` best distinct ones of the phase by ``selection_key`` (a compression
  floor first); the reference keeps the 5 lowest validation errors seen in the phase, compression aside.
  A tie for the mode goes to the better individual's rank (the reference: the first in its list).
* Each phase starts a fresh NSGA-II population in its window (Optuna's: a random first generation, as
  many offspring as the population); the reference continues one pymoo NSGA-Net run (population 30, 30
  offspring, 100 generations) and re-decodes its codes at evaluations 1,500 and 2,400. Its progressive
  phase cannot run as shipped: ``best_code1`` is a local of the 1,500 branch read in the 2,400 branch.
* A repeated configuration reuses the earlier result (it counts toward the phase's trials, trains
  nothing); the reference eliminates duplicates within an offspring batch.
* The final point is the best of all phases by the same rule, retrained on the study's seeds; the paper
  reports its searched networks (PSTRN-M, multi-objective; PSTRN-S, single-objective).
"""

from __future__ import annotations

import contextlib
import json
import statistics
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from rankbench import records
from rankbench.errors import RankbenchError
from rankbench.plugins.registry import Registry
from rankbench.run.config import RunOptions
from rankbench.run.tracking import DEFAULT_DIR, Tracker
from rankbench.study.spec import (
    LAYER_RANKS_KEY,
    OBJECTIVE_METRICS,
    RECORDED_ONLY,
    ProgressiveSpec,
    SearchParam,
    StudySpec,
)

PHASE_SEED_STRIDE = 1000
"""Phase ``p``'s NSGA-II seed is the study's ``[sampler] seed`` + (p - 1) x this (its workers add 0, 1, ...)."""
ROLE_TAG, KEY_TAG = "rankbench.progressive", "progressive.key"
"""Tags of a retraining run: its role (``retrain``) and its settings (task, method, values, steps)."""
SUMMARY_FILE = "progressive.json"


def phase_name(study: str, phase: int) -> str:
    """The Optuna study of a progressive study's phase (from 1): ``NAME.phase1``."""
    return f"{study}.phase{phase}"


def say(line: str) -> None:
    print(line, flush=True)


# ---------------------------------------------------------------------------- phases and windows
def windows(progressive: ProgressiveSpec, centers: Mapping[str, int], phase: int) -> dict[str, tuple[int, int, int]]:
    """Every gene's ``(low, high, step)`` in ``phase`` (from 1) around its centre."""
    return {layer: progressive.window(centers[layer], phase - 1) for layer in progressive.layers}


def phase_spec(spec: StudySpec, phase: int, centers: Mapping[str, int], n_trials: int) -> StudySpec:
    """The Optuna study that runs ``phase`` (from 1): one integer gene per layer on its window, NSGA-II of
    the phase's population, the proxy seed, and the earlier phases to reuse configurations from."""
    progressive = spec.progressive
    search = {layer: SearchParam(layer, "int", low=low, high=high, step=step)
              for layer, (low, high, step) in windows(progressive, centers, phase).items()}
    return replace(spec, name=phase_name(spec.name, phase), search=search, seeds=(progressive.seed,),
                   n_trials=n_trials, phase=phase, genes=progressive.layers,
                   population_size=progressive.population[phase - 1],
                   sampler_seed=spec.sampler_seed + PHASE_SEED_STRIDE * (phase - 1),
                   reuse_from=tuple(phase_name(spec.name, q) for q in range(1, phase)))


@dataclass(frozen=True)
class Individual:
    """A finished proxy trial: its genes and what it measured (means over its seed)."""

    phase: int
    number: int
    ranks: dict[str, int]
    val_accuracy: float
    compression: float
    test_accuracy: float | None = None

    @property
    def label(self) -> str:
        return f"phase {self.phase} trial {self.number}"

    def ranks_text(self) -> str:
        return ",".join(f"{layer}:{rank}" for layer, rank in self.ranks.items())


def selection_key(individual: Individual, min_compression: float) -> tuple:
    """Sorts best first: at or above ``min_compression`` by validation accuracy, then compression; below
    it by compression, then accuracy (closest to the floor first); ties by phase and trial number."""
    tail = (individual.phase, individual.number)
    if individual.compression >= min_compression:
        return (0, -individual.val_accuracy, -individual.compression, *tail)
    return (1, -individual.compression, -individual.val_accuracy, *tail)


def individuals(study, phase: int, layers: Sequence[str]) -> list[Individual]:
    """The phase's COMPLETE trials, one per distinct configuration (its first), in trial order."""
    from optuna.trial import TrialState

    out, seen = [], set()
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        ranks = {layer: int(t.params[layer]) for layer in layers}
        key = tuple(ranks.values())
        if key in seen or f"mean_{records.VAL_ACCURACY}" not in t.user_attrs:
            continue
        seen.add(key)
        out.append(Individual(phase, t.number, ranks, float(t.user_attrs[f"mean_{records.VAL_ACCURACY}"]),
                              float(t.user_attrs[f"mean_{records.COMPRESSION}"]),
                              t.user_attrs.get(f"mean_{records.TEST_ACCURACY}")))
    return out


def best_individuals(found: Sequence[Individual], progressive: ProgressiveSpec) -> list[Individual]:
    """The ``top_k`` best distinct individuals by ``selection_key``."""
    return sorted(found, key=lambda i: selection_key(i, progressive.min_compression))[:progressive.top_k]


def narrowed_centers(top: Sequence[Individual], layers: Sequence[str]) -> dict[str, int]:
    """Per gene, its most frequent rank among ``top`` (best first); a tie goes to the better individual's."""
    centers = {}
    for layer in layers:
        counts = Counter(i.ranks[layer] for i in top)
        most = max(counts.values())
        centers[layer] = next(i.ranks[layer] for i in top if counts[i.ranks[layer]] == most)
    return centers


def plan(spec: StudySpec) -> list[str]:
    """What the search will run, printed before it starts: the phases, the proxy runs in all, the retraining."""
    p = spec.progressive
    steps = spec.budget_steps
    trials = p.phase_trials()
    phases = ", ".join(f"step {s}: {n} x {g} = {t}" for s, n, g, t in zip(p.steps, p.population, p.generations,
                                                                          trials))
    first = windows(p, {layer: p.center for layer in p.layers}, 1)
    length = f"{steps} steps" if steps is not None else "the recipe's epochs"
    retrain = (f"{p.retrain.budget_steps} steps" if p.retrain.budget_steps is not None
               else "full length (the task's recipe)")
    lines = [
        f"progressive study {spec.name}: NSGA-II over one rank per layer of {spec.task} ({', '.join(p.layers)}), "
        f"{len(p.steps)} phases ({phases} proxy trials)",
        f"  {p.proxy_runs()} proxy runs in all, each {length} of method {spec.methods[0]} on seed {p.seed}; phase 1 "
        f"windows {_windows_text(first)}; each later window: the mode of the top {p.top_k} +- {p.half_width} steps",
        f"  best point: the highest validation accuracy at compression >= {p.min_compression:g}x; retrained at "
        f"{retrain} on seeds {', '.join(map(str, spec.seeds))}",
    ]
    if spec.n_trials is not None and spec.n_trials < p.proxy_runs():
        lines.append(f"  --n-trials {spec.n_trials}: this command stops after {spec.n_trials} proxy trials (no "
                     "retraining); the same command without it continues")
    return lines


def _windows_text(found: Mapping[str, tuple[int, int, int]]) -> str:
    return ", ".join(f"{layer} {low}..{high}" + (f"/{step}" if step != 1 else "")
                     for layer, (low, high, step) in found.items())


# ---------------------------------------------------------------------------- the retraining
@dataclass(frozen=True)
class Retrain:
    """What a retraining process needs (picklable): the point, its settings, the parent run."""

    spec: StudySpec
    options: RunOptions
    plugin_dirs: tuple[Path, ...]
    parent_run_id: str
    ranks: str


def retrain_values(spec: StudySpec, registry: Registry, ranks: str) -> tuple[str, str, dict[str, Any]]:
    """The task, method and values of the retraining: the study's fixed settings and the point's ranks."""
    method = spec.methods[0]
    keys = set(registry.task(spec.task).hyperparameters) | set(registry.method(method).hyperparameters)
    values = {k: v for k, v in spec.fixed.items() if k in keys}
    values.update({k: v for k, v in spec.method_fixed.get(method, {}).items() if k in keys})
    values[LAYER_RANKS_KEY] = ranks
    return spec.task, method, values


def retrain_config(job: Retrain, registry: Registry, seed: int):
    """The ``RunConfig`` of one retraining seed: the recipe at full length (or ``[retrain] budget_steps``;
    an explicit ``--set epochs=`` wins, as for every study run), tagged to be found again."""
    from rankbench.run.config import make_config

    task, method, values = retrain_values(job.spec, registry, job.ranks)
    steps = None if "epochs" in values else job.spec.progressive.retrain.budget_steps
    tags = {"mlflow.parentRunId": job.parent_run_id, "study": job.spec.name, ROLE_TAG: "retrain",
            KEY_TAG: retrain_key(task, method, values, steps)}
    return make_config(registry, task, method, values, seeds=(seed,), progress=False,
                       options=replace(job.options, budget_steps=steps), tags=tags)


def retrain_key(task: str, method: str, values: Mapping[str, Any], steps: int | None) -> str:
    return json.dumps([task, method, dict(values), steps], sort_keys=True, default=str)


def _retrain_runs(tracker: Tracker, study: str, key: str, seed: int) -> list[Any]:
    found = [r for status in ("FINISHED", "RUNNING", "FAILED", "KILLED") for r in tracker.runs(study=study,
                                                                                                 status=status)
             if r.data.tags.get(KEY_TAG) == key and r.data.params.get(records.SEED) == str(seed)]
    return sorted(found, key=lambda r: r.info.start_time)


def retrain_seeds(job: Retrain, seeds: Sequence[int], poll_s: float = 10.0) -> list[Any]:
    """Train (or read back) the point on ``seeds``, one after the other: a finished run is read back, an
    interrupted one continued from its checkpoint; a seed another process is training now is waited for."""
    from rankbench.run.experiment import run as run_experiment
    from rankbench.run.prepare import prepare

    registry = Registry.discover(plugin_dirs=job.plugin_dirs)
    tracker = Tracker(job.options.tracking_uri)
    results, data = [], None
    for seed in seeds:
        config = retrain_config(job, registry, seed)
        key = config.tags[KEY_TAG]
        while True:
            runs = _retrain_runs(tracker, job.spec.name, key, seed)
            busy = [r for r in runs if r.info.status == "RUNNING" and not tracker.process_gone(r)]
            if not busy or any(r.info.status == "FINISHED" for r in runs):
                break
            time.sleep(poll_s)  # another command trains this seed: its result is read back when it ends
        prepared = prepare(config, registry, data=data)
        data = prepared.data
        results += run_experiment(prepared, tracker=tracker, earlier={seed: [r.info.run_id for r in runs]})
    return results


def _retrain_main(job: Retrain, seeds: tuple[int, ...]) -> None:
    """A retraining process (``--workers N``: the seeds spread over N processes), stopped as a study worker."""
    from rankbench.run.stopping import exit_code, graceful_stop

    with graceful_stop():
        try:
            import torch

            torch.set_num_threads(job.options.threads or 1)
            retrain_seeds(job, seeds)
        except KeyboardInterrupt as exc:
            raise SystemExit(exit_code(exc)) from None
        except RankbenchError as exc:
            import sys

            print(f"rankbench: error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None


def retrain(job: Retrain, workers: int) -> list[Any]:
    """Every seed of the study trained (or read back); with several workers, the seeds in parallel
    processes, then all read back here."""
    seeds = job.spec.seeds
    if workers > 1 and len(seeds) > 1:
        from rankbench.study.runner import run_processes

        parts = [tuple(seeds[i::workers]) for i in range(min(workers, len(seeds)))]
        bad = run_processes(_retrain_main, [(job, part) for part in parts])
        if bad:
            raise RankbenchError(f"{len(bad)} of {len(parts)} retraining processes failed (exit codes {bad}): run "
                                 "the same command again to continue")
    return retrain_seeds(job, seeds)


# ---------------------------------------------------------------------------- the study
@dataclass
class PhaseOutcome:
    """One phase as this command left it."""

    phase: int
    windows: dict[str, tuple[int, int, int]]
    trials: int
    finished: int
    failed: int
    top: list[Individual] = field(default_factory=list)
    pareto: list[dict[str, Any]] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.finished >= self.trials


def _counts(study) -> tuple[int, int]:
    from optuna.trial import TrialState

    states = [t.state for t in study.get_trials(deepcopy=False)]
    return (sum(s in (TrialState.COMPLETE, TrialState.PRUNED) for s in states),
            sum(s == TrialState.FAIL for s in states))


def run_progressive(spec: StudySpec, url: str, options: RunOptions, *, workers: int = 1,
                    plugin_dirs: Sequence[Path] = (), out_dir: Path | None = None,
                    report: Callable[[str], None] = say):
    """Run (or continue) every phase, narrowing the windows between them, then retrain the best point;
    summarise it all on the study's MLflow parent run (``progressive.json``) and return the outcome
    ``rankbench study`` prints (the retrained point, or the best proxy point when the search is unfinished)."""
    from rankbench.study import runner

    progressive = spec.progressive
    for line in plan(spec):
        report(line)
    tracker = Tracker(options.tracking_uri)
    tracker.experiment_id(spec.task)
    options = replace(options, tracking_uri=tracker.uri)
    deadline = time.time() + spec.timeout_s if spec.timeout_s else None
    folder = out_dir or DEFAULT_DIR / "studies" / spec.name
    left = spec.budget()
    centers = {layer: progressive.center for layer in progressive.layers}
    phases: list[PhaseOutcome] = []
    found: list[Individual] = []
    parent: str | None = None
    plots: list[Path] = []
    try:
        for phase in range(1, len(progressive.steps) + 1):
            trials = progressive.phase_trials()[phase - 1]
            pspec = phase_spec(spec, phase, centers, max(0, min(trials, left)))
            with runner._startup_lock(url):
                storage = runner.open_storage(url, pspec)
                study = runner.load_or_create(pspec, storage)
                if parent is None:
                    with (contextlib.nullcontext() if url.startswith("sqlite:///")
                          else runner.storage_lock(url, storage)):
                        parent = runner.ensure_parent_run(study, spec, tracker, url)
                    tracker.set_tags(parent, {ROLE_TAG: "search"})
            done, _ = _counts(study)
            report(f"phase {phase}/{len(progressive.steps)} ({pspec.name}): windows "
                   f"{_windows_text(pspec_windows(pspec))}; {trials} proxy trials, {min(done, trials)} finished before")
            run = runner.StudyRun(pspec, url, options, tuple(plugin_dirs), parent)
            if left > 0 and done < pspec.n_trials:
                if workers == 1:
                    runner.worker_loop(run, deadline)
                else:
                    runner._run_workers(run, workers, deadline)
            finished, failed = _counts(study)
            outcome = PhaseOutcome(phase, pspec_windows(pspec), trials, finished, failed)
            phases.append(outcome)
            mine = individuals(study, phase, progressive.layers)
            found += mine
            outcome.top = best_individuals(mine, progressive)
            outcome.pareto = runner.summarise(study, pspec).best
            plots += _plots(study, pspec, folder / f"phase{phase}")
            left -= min(finished, trials)
            if not outcome.complete:
                break
            if not outcome.top:
                raise RankbenchError(f"phase {phase} of study {spec.name} finished no trial (all were pruned or "
                                     "diverged): lower the proxy runs' learning rate or rename the study and start "
                                     "again")
            report(f"phase {phase}: top {len(outcome.top)}: " + "; ".join(
                f"{i.ranks_text()} ({i.val_accuracy:.2f} %, {i.compression:.1f}x)" for i in outcome.top))
            centers = narrowed_centers(outcome.top, progressive.layers)
        complete = len(phases) == len(progressive.steps) and phases[-1].complete
        best = sorted(found, key=lambda i: selection_key(i, progressive.min_compression))[0] if found else None
        retrained: list[Any] = []
        if complete and best is not None:
            if best.compression < progressive.min_compression:
                report(f"rankbench: no proxy point reached {progressive.min_compression:g}x: retraining the most "
                       f"compressed one ({best.compression:.1f}x)")
            report(f"best point: {best.ranks_text()} ({best.label}: validation {best.val_accuracy:.2f} %, "
                   f"{best.compression:.2f}x); retraining on seeds {', '.join(map(str, spec.seeds))}")
            retrained = retrain(Retrain(spec, options, tuple(plugin_dirs), parent, best.ranks_text()), workers)
        elif not complete:
            report(f"search stopped after {sum(p.finished for p in phases)} of {progressive.proxy_runs()} proxy "
                   "trials (--n-trials or the timeout): no retraining yet; run the same command again to continue")
        summary = _summary(spec, phases, best, retrained, complete)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
        tracker.log_dict(parent, summary, SUMMARY_FILE)
        outcome_rows = _outcome_rows(spec, best, retrained)
        tracker.log_dict(parent, outcome_rows, "best_trials.json")
        metrics = {"finished_trials": sum(p.finished for p in phases), "failed_trials": sum(p.failed for p in phases)}
        if retrained:
            metrics.update({f"retrained_{k}": float(v) for k, v in summary["retrain"].items()
                            if isinstance(v, (int, float)) and not isinstance(v, bool)})
        tracker.log_metrics(parent, metrics)
        for path in plots:
            tracker.log_artifact(parent, path, f"plots/{path.parent.name}")
        if retrained:
            r = summary["retrain"]
            report(f"{spec.name}: {best.ranks_text()} retrained ({r['length']}) on {len(retrained)} seed(s): test "
                   f"accuracy {r['test_accuracy']:.2f} +- {r['test_accuracy_std']:.2f} %, compression "
                   f"{r['compression']:.2f}x (validation {r['val_accuracy']:.2f} %)")
    except KeyboardInterrupt:
        if parent is not None:
            tracker.terminate(parent, "KILLED")
        raise
    except Exception:
        if parent is not None:
            tracker.terminate(parent, "FAILED")
        raise
    tracker.finish(parent)
    return runner.StudyOutcome(spec.name, sum(p.finished for p in phases), sum(p.failed for p in phases),
                               outcome_rows, plots)


def _plots(study, pspec: StudySpec, folder: Path) -> list[Path]:
    """The phase's figures (``rankbench.study.plots``), without Optuna's warnings about genes a small phase
    sampled at one value only (its importances skip them)."""
    import optuna

    from rankbench.study.plots import write_plots

    before = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        return write_plots(study, pspec, folder)
    finally:
        optuna.logging.set_verbosity(before)


def pspec_windows(pspec: StudySpec) -> dict[str, tuple[int, int, int]]:
    return {name: (int(p.low), int(p.high), p.step) for name, p in pspec.search.items()}


def _means(retrained: Sequence[Any]) -> dict[str, float]:
    from rankbench.study.runner import seed_record

    per_seed = [seed_record(r) for r in retrained]
    return {m: statistics.mean(s[m] for s in per_seed) for m in OBJECTIVE_METRICS + RECORDED_ONLY}


def _outcome_rows(spec: StudySpec, best: Individual | None, retrained: Sequence[Any]) -> list[dict[str, Any]]:
    """``rankbench study``'s "best" table: the retrained point (its means over the study's seeds), or the
    best proxy point so far (its own proxy numbers) when the search is unfinished."""
    if best is None:
        return []
    row: dict[str, Any] = {"number": f"phase{best.phase}:{best.number}",
                           "params": {LAYER_RANKS_KEY: best.ranks_text()}}
    if retrained:
        means = _means(retrained)
        row.update({m: means[m] for m in spec.objectives})
        row["test_accuracy"] = means[records.TEST_ACCURACY]
    else:
        proxy = {records.VAL_ACCURACY: best.val_accuracy, records.COMPRESSION: best.compression}
        row.update({m: proxy.get(m, float("nan")) for m in spec.objectives})
        row["test_accuracy"] = best.test_accuracy
    return [row]


def _summary(spec: StudySpec, phases: Sequence[PhaseOutcome], best: Individual | None, retrained: Sequence[Any],
             complete: bool) -> dict[str, Any]:
    """``progressive.json``: the phases (windows, trials, top individuals, Pareto front), the rule and the
    point it chose, and the retraining (every seed's run, and the means a leaderboard cites)."""
    progressive = spec.progressive

    def individual(i: Individual) -> dict[str, Any]:
        return {"phase": i.phase, "trial": i.number, LAYER_RANKS_KEY: i.ranks_text(),
                records.VAL_ACCURACY: i.val_accuracy, records.COMPRESSION: i.compression,
                "test_accuracy (recorded)": i.test_accuracy}

    out: dict[str, Any] = {
        "study": spec.name, "task": spec.task, "method": spec.methods[0], "complete": complete,
        "description": spec.description, "proxy_runs": progressive.proxy_runs(),
        "proxy_budget_steps": spec.budget_steps, "proxy_seed": progressive.seed,
        "selection": f"highest {records.VAL_ACCURACY} at {records.COMPRESSION} >= {progressive.min_compression:g} "
                     "(then compression); below it, the highest compression",
        "phases": [{"phase": p.phase, "study": phase_name(spec.name, p.phase),
                    "step": progressive.steps[p.phase - 1], "windows": {k: list(v) for k, v in p.windows.items()},
                    "trials": p.trials, "finished": p.finished, "failed": p.failed,
                    "top": [individual(i) for i in p.top], "pareto_front": p.pareto} for p in phases],
        "best": individual(best) if best is not None else None,
    }
    if retrained:
        from rankbench.study.runner import seed_record

        per_seed = [seed_record(r) for r in retrained]
        tests = [s[records.TEST_ACCURACY] for s in per_seed]
        steps, epochs = progressive.retrain.budget_steps, len(retrained[0].history)
        length = f"{steps} steps, {epochs} epochs" if steps is not None else f"full length, {epochs} epochs"
        out["retrain"] = {
            LAYER_RANKS_KEY: best.ranks_text(), "length": length, "epochs": epochs,
            "seeds": per_seed, records.TEST_ACCURACY: statistics.mean(tests),
            "test_accuracy_std": statistics.stdev(tests) if len(tests) > 1 else 0.0,
            records.COMPRESSION: statistics.mean(s[records.COMPRESSION] for s in per_seed),
            records.VAL_ACCURACY: statistics.mean(s[records.VAL_ACCURACY] for s in per_seed),
            records.PARAMETERS: statistics.mean(s[records.PARAMETERS] for s in per_seed),
        }
    return out
