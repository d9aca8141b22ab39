"""Optuna studies: each trial is a rankbench run over the study's seeds.

Storage is any Optuna RDB URL (SQLite by default, PostgreSQL for many
machines) or an Optuna journal file (``journal:///shared/path/study.log``, for
machines that share a filesystem). Workers are processes (or Slurm jobs,
``rankbench.study.launcher``); a lock around "is the budget spent? then
ask" keeps the total at exactly the budget, stale trials of dead workers are
failed by their heartbeat (Optuna's on an RDB, rankbench's own in a journal) and retried, and trials
interrupted by Ctrl-C or a crash are retried when the same command runs again. A study remembers the digest of
the study file it was created from (``StudySpec.digest``) and refuses another file
under its name, and never trains one configuration twice (``same_settings``).
SIGINT or SIGTERM stops every worker cleanly: their runs end KILLED and their
trials are retried by the next command.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import statistics
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rankbench import records
from rankbench.errors import MissingRecord, RankbenchError
from rankbench.plugins.registry import Registry
from rankbench.run.config import RunOptions
from rankbench.run.tracking import DEFAULT_DIR, Tracker, run_identity
from rankbench.study.spec import LAYER_RANKS_KEY, OBJECTIVE_METRICS, RECORDED_ONLY, StudySpec, first_difference

FINISHED_STATES = ("COMPLETE", "PRUNED")
DIGEST_ATTR, SPEC_ATTR = "spec_digest", "spec"
"""Study user attributes: the digest and the canonical form of the study file it was created from."""
PRUNED_TAG = "rankbench.pruned"
"""Tag of a run stopped by the study's pruner (``epoch N``); such a run ends KILLED, it did not fail."""
JOURNAL_SCHEME = "journal://"
"""``journal:///ABSOLUTE/PATH.log``: Optuna's ``JournalStorage`` on a ``JournalFileBackend`` (a file that every
worker reaches, e.g. on a cluster's shared filesystem; its locks are symlinks, safe on NFS)."""
JOURNAL_BEAT_ATTR = "rankbench_heartbeat"
"""Trial system attribute: unix seconds of a running trial's last heartbeat in a journal storage (Optuna's
heartbeats exist for RDB storages only)."""
SLURM_JOB_ATTR, SLURM_JOBS_ATTR = "slurm_job", "slurm_jobs"
"""Trial user attribute: the Slurm job that runs it; study user attribute: the worker jobs submitted for it
(``rankbench.study.launcher``)."""


def quiet_optuna() -> None:
    """Hide Optuna's experimental/heartbeat warnings: rankbench uses those features on purpose."""
    import warnings

    import optuna

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")


def default_storage(create: bool = True) -> str:
    """``sqlite:///rankbench-runs/optuna.db``; reading commands (``--list``, ``show``) never create it."""
    path = (DEFAULT_DIR / "optuna.db").resolve()
    if create:
        DEFAULT_DIR.mkdir(parents=True, exist_ok=True)
    elif not path.exists():
        raise RankbenchError(f"no study storage at {path}: run `rankbench study FILE` first, or pass --storage")
    return f"sqlite:///{path}"


def shown_url(url: str) -> str:
    """The URL without its password, for messages."""
    with contextlib.suppress(Exception):
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    return url


def journal_path(url: str) -> Path | None:
    """The file of a ``journal://`` storage URL (made absolute: workers may start elsewhere), else None."""
    if not url.startswith(JOURNAL_SCHEME):
        return None
    return Path(url[len(JOURNAL_SCHEME):]).expanduser().absolute()


def normalised_storage(url: str) -> str:
    """``url`` with a journal file's path made absolute (``journal:///...``), so every worker opens one file."""
    path = journal_path(url)
    return url if path is None else f"{JOURNAL_SCHEME}{path}"


def check_journal_storage(url: str) -> None:
    """A journal storage must name a file in a folder that exists."""
    path = journal_path(url)
    if path is None:
        return
    if not url[len(JOURNAL_SCHEME):] or url.endswith(("/", "\\")) or path.is_dir():
        raise RankbenchError(f"cannot open study storage {url}: give a journal file, e.g. "
                             f"--storage journal://{(path if path.is_dir() else path.parent) / 'optuna.log'}")
    if not path.parent.is_dir():
        raise RankbenchError(f"cannot open study storage {url}: the folder {path.parent} does not exist: "
                             "create it or fix --storage")


def check_sqlite_storage(url: str) -> None:
    """A SQLite storage that cannot be a file (a folder, or in a folder that does not exist) is an
    error at once, before any lock file is made or SQLite retries for its busy timeout. A journal
    storage is checked likewise (``check_journal_storage``)."""
    check_journal_storage(url)
    if not url.startswith("sqlite:"):
        return
    try:
        from sqlalchemy.engine import make_url

        database = make_url(url).database
    except Exception:
        return  # open_storage reports a malformed URL
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    path = Path(database)
    if database.endswith(("/", "\\")) or path.is_dir():
        raise RankbenchError(f"cannot open study storage {url}: {database} is a folder: give a database file, "
                             f"e.g. --storage sqlite:///{path / 'optuna.db'}")
    if not path.parent.is_dir():
        raise RankbenchError(f"cannot open study storage {url}: the folder {path.parent} does not exist: "
                             "create it or fix --storage")


def open_storage(url: str, spec: StudySpec | None = None):
    """An ``RDBStorage`` with heartbeats (so dead workers' trials are retried), or a ``JournalStorage`` for a
    ``journal://`` URL (its heartbeats are rankbench's: ``_Heartbeat``, ``fail_stale_journal_trials``)."""
    check_sqlite_storage(url)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    quiet_optuna()
    logging.getLogger("alembic").setLevel(logging.WARNING)
    path = journal_path(url)
    if path is not None:
        from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock

        try:
            return optuna.storages.JournalStorage(JournalFileBackend(str(path), JournalFileSymlinkLock(str(path))))
        except Exception as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise RankbenchError(f"cannot open study storage {url} ({type(exc).__name__}: {reason}): check "
                                 "--storage") from None
    kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 120}}
    if spec is not None:
        kwargs.update(
            heartbeat_interval=spec.heartbeat_interval, grace_period=spec.grace_period,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3),
        )
    try:
        return optuna.storages.RDBStorage(url, **kwargs)
    except Exception as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise RankbenchError(f"cannot open study storage {url} ({type(exc).__name__}: {reason}): "
                             "check --storage") from None


@contextlib.contextmanager
def storage_lock(url: str, storage) -> Iterator[None]:
    """Serialises 'check budget, then ask' across worker processes (and machines, on PostgreSQL or a journal
    file on a shared filesystem: a symlink lock beside it, as Optuna's own)."""
    path = journal_path(url)
    if path is not None:
        from optuna.storages.journal import JournalFileSymlinkLock

        lock = JournalFileSymlinkLock(str(path) + ".rankbench", grace_period=60)
        lock.acquire()
        try:
            yield
        finally:
            with contextlib.suppress(RuntimeError):  # released by force after its grace period
                lock.release()
    elif url.startswith("sqlite:///"):
        from filelock import FileLock

        with FileLock(url[len("sqlite:///"):] + ".lock"):
            yield
    elif url.startswith("postgresql"):
        from sqlalchemy import text

        with storage.engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(7268153)"))
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(7268153)"))
                conn.commit()
    else:
        yield


def _grid_sampler_class():
    import optuna

    class BudgetedGridSampler(optuna.samplers.GridSampler):
        """GridSampler without its ``study.stop()`` (the worker loop stops at the budget;
        ``stop`` is only allowed inside ``optimize``, and rankbench uses ask/tell)."""

        def after_trial(self, study, trial, state, values) -> None:
            return None

    return BudgetedGridSampler


def _startup_lock(url: str):
    """The SQLite storage's file lock (the same one ``storage_lock`` takes), else nothing."""
    if url.startswith("sqlite:///"):
        from filelock import FileLock

        path = Path(url[len("sqlite:///"):])
        if path.parent.is_dir():
            return FileLock(str(path) + ".lock")
    return contextlib.nullcontext()


def make_sampler(spec: StudySpec, worker: int = 0):
    import optuna

    seed = spec.sampler_seed + worker
    if spec.sampler == "grid":  # one seed for all workers: the grid's order must agree
        return _grid_sampler_class()(spec.grid(), seed=spec.sampler_seed)
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if spec.sampler == "nsga2":
        if spec.population_size is not None:
            return optuna.samplers.NSGAIISampler(seed=seed, population_size=spec.population_size)
        return optuna.samplers.NSGAIISampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, multivariate=True)


def make_pruner(spec: StudySpec):
    import optuna

    return optuna.pruners.MedianPruner() if spec.pruner == "median" else optuna.pruners.NopPruner()


def load_or_create(spec: StudySpec, storage, worker: int = 0):
    import optuna

    study = optuna.create_study(
        study_name=spec.name, storage=storage, directions=spec.directions, sampler=make_sampler(spec, worker),
        pruner=make_pruner(spec), load_if_exists=True,
    )
    existing = [d.name.lower() for d in study.directions]
    if existing != spec.directions:
        raise RankbenchError(
            f"study {spec.name} in the storage optimises {existing}, the file asks {spec.directions}: "
            "rename the study or restore its objectives"
        )
    check_study_file(study, spec, getattr(storage, "url", str(storage)))
    if study.metric_names != list(spec.objectives):  # optuna-dashboard labels its axes with these
        study.set_metric_names(list(spec.objectives))
    return study


def check_study_file(study, spec: StudySpec, url: str) -> None:
    """A stored study runs only the study file it was created from (same ``StudySpec.digest``): another
    file under its name would mix its trials with the old ones, or break Optuna's search space. A study
    without a digest (new, or made by an older rankbench) records this file's."""
    recorded = study.user_attrs.get(DIGEST_ATTR)
    if recorded is None:
        study.set_user_attr(SPEC_ATTR, spec.canonical())
        study.set_user_attr(DIGEST_ATTR, spec.digest())
        return
    if recorded == spec.digest():
        return
    key, difference = first_difference(spec.canonical(), study.user_attrs.get(SPEC_ATTR) or {})
    hint = {"fixed": ", or give the fixed settings it was created with ([fixed] and --set)",
            "method_fixed": ", or give the fixed settings it was created with ([method_fixed])",
            "seeds": ", or the seeds it was created with (seeds = [...] or --seeds)"}.get(key, "")
    raise RankbenchError(
        f"study {spec.name} in {shown_url(url)} was created from a different study file "
        f"({difference}): rename the study (name = \"{spec.name}_2\") or use another --storage{hint}"
    )


@dataclass(frozen=True)
class StudyRun:
    """Everything a worker process needs (picklable)."""

    spec: StudySpec
    storage_url: str
    options: RunOptions
    """The run options every trial runs with (``rankbench study`` takes the same as ``rankbench run``)."""
    plugin_dirs: tuple[Path, ...]
    parent_run_id: str
    worker: int = 0
    job: str | None = None
    """The Slurm job running this worker (``rankbench.study.launcher``): recorded on each trial it runs."""


# ---------------------------------------------------------------------------- one trial
def trial_assignments(trial, spec: StudySpec, registry: Registry) -> tuple[str, str, dict[str, Any]]:
    """The task, the method and the ``--set`` values of one trial.

    A study over several tasks suggests ``task`` first. A grid study with ``[method_search]`` suggests one
    ``point`` (a method and its own values); other samplers suggest the method, then that method's own keys
    (a conditional search space, which TPE, random and NSGA-II sample natively). A progressive study's
    phase suggests one rank per layer (``spec.genes``), given to the method as ``ranks=conv1:10,...``."""
    task = spec.task if len(spec.tasks) < 2 else trial.suggest_categorical("task", list(spec.tasks))
    own: dict[str, Any] = {}
    if spec.sampler == "grid" and spec.method_search:
        method, own = spec.points()[trial.suggest_categorical("point", list(spec.points()))]
    elif len(spec.methods) == 1:
        method = spec.methods[0]
    else:
        method = trial.suggest_categorical("method", list(spec.methods))
    if not own:
        own = {name: param.suggest(trial) for name, param in spec.method_search.get(method, {}).items()}
    keys = set(registry.task(task).hyperparameters) | set(registry.method(method).hyperparameters)
    values = {k: v for k, v in spec.fixed.items() if k in keys}
    values.update({k: v for k, v in spec.method_fixed.get(method, {}).items() if k in keys})
    for name, param in spec.search.items():
        value = param.suggest(trial)
        if name in keys and name not in spec.genes:
            values[name] = value
    values.update(own)
    if spec.genes:
        values[LAYER_RANKS_KEY] = ",".join(f"{layer}:{trial.params[layer]}" for layer in spec.genes)
    return task, method, values


def run_trial(trial, run: StudyRun, registry: Registry, tracker: Tracker,
              retried: Sequence[int] = ()) -> list[float]:
    """Train the trial's configuration on every seed; return the objectives (means over seeds).

    Each seed's run id is kept in the trial's ``runs`` attribute as it starts. A retried trial
    (Optuna copies the attributes) thus reads back the seeds its earlier attempt finished and
    continues the one it was training from that run's last checkpoint. Runs the attribute lacks
    (the attempt died before recording them, or an older rankbench ran it) are looked up among the
    study's runs tagged with one of the ``retried`` trial numbers; of several attempts at a seed,
    the one that got furthest is continued."""
    import optuna

    from rankbench.run.config import make_config
    from rankbench.run.experiment import run as run_experiment
    from rankbench.run.prepare import prepare

    spec = run.spec
    if trial.user_attrs.get("interrupted"):  # a retry: Optuna copied the failed trial's attributes
        trial.set_user_attr("interrupted", False)
        trial.set_user_attr("failure_reason", "")
    task, method, values = trial_assignments(trial, spec, registry)
    config = make_config(
        registry, task, method, values, seeds=spec.seeds, progress=False,
        options=replace(run.options, budget_steps=None if "epochs" in values else spec.budget_steps),  # --set
        # epochs=N wins (smoke runs)
        tags={"mlflow.parentRunId": run.parent_run_id, "study": spec.name, "trial": str(trial.number)},
    )
    trial.set_user_attr("task", task)
    trial.set_user_attr("method", method)
    trial.set_user_attr("settings", {k: v for k, v in values.items()})
    same = same_settings(trial.study, trial.number, task, method, values, spec.seeds)
    if same is not None:
        return reuse_trial(trial, same)
    for name in spec.reuse_from:  # a progressive study's earlier phases: one configuration is trained once
        other = optuna.load_study(study_name=name, storage=trial.study._storage)
        same = same_settings(other, -1, task, method, values, spec.seeds)
        if same is not None:
            return reuse_trial(trial, same, study=name)
    objective = next(iter(spec.objectives))
    pruned_at: dict[str, int] = {}

    def on_epoch(seed: int, epoch: int, metrics: dict) -> None:
        if spec.pruner != "none" and seed == spec.seeds[0]:
            trial.report(metrics[objective], epoch)
            if trial.should_prune():
                pruned_at.update(seed=seed, epoch=epoch)
                raise optuna.TrialPruned(f"pruned at epoch {epoch} ({objective}={metrics[objective]:.4g})")

    runs = {int(seed): run_id for seed, run_id in trial.user_attrs.get("runs", {}).items()}
    earlier = earlier_runs(tracker, spec.name, retried)
    for seed, run_id in runs.items():
        earlier.setdefault(seed, []).append(run_id)

    def on_start(run_id: str, seed: int, params: dict) -> None:  # a retry (which copies user attrs) finds it
        runs[seed] = run_id
        trial.set_user_attr("runs", {str(s): r for s, r in runs.items()})

    try:
        results = run_experiment(prepare(config, registry), tracker=tracker, on_start=on_start, on_epoch=on_epoch,
                                 earlier=earlier)
    except optuna.TrialPruned:
        if pruned_at.get("seed") in runs:  # the run marked it FAILED, as for any exception
            mark_pruned(tracker, runs[pruned_at["seed"]], pruned_at["epoch"])
        raise
    per_seed = [seed_record(r) for r in results]
    trial.set_user_attr("seeds", per_seed)
    for metric in OBJECTIVE_METRICS + RECORDED_ONLY:
        trial.set_user_attr(f"mean_{metric}", statistics.mean(s[metric] for s in per_seed))
    trial.set_user_attr("dataset", results[0].dataset)
    return [statistics.mean(s[m] for s in per_seed) for m in spec.objectives]


def seed_record(result: Any) -> dict[str, Any]:
    """What a trial keeps of one seed's run (``RunResult``): its id and every objective and recorded metric."""
    last = result.history[-1]
    return {
        "seed": result.seed, "run_id": result.run_id, records.VAL_ACCURACY: last[records.VAL_ACCURACY],
        records.VAL_LOSS: last[records.VAL_LOSS], records.COMPRESSION: result.compression,
        records.TOTAL_RANK: result.total_rank, records.PARAMETERS: result.parameters,
        records.TRAIN_SECONDS_PER_BATCH: result.train_seconds_per_batch,
        records.INFERENCE_SECONDS: result.inference_seconds, records.TEST_ACCURACY: result.test_accuracy,
        records.TEST_TOP5: result.test_top5,
    }


def _configuration(task: Any, method: Any, values: Any) -> str:
    return json.dumps([task, method, values], sort_keys=True, default=str)


def same_settings(study, number: int, task: str, method: str, values: dict[str, Any], seeds: Sequence[int]):
    """The first finished (COMPLETE or PRUNED) trial of ``study``, other than trial ``number``, that ran this
    task and method with these resolved settings (on these seeds), else None. Keys a method does not take
    (``[search.lambda]`` for ``trn``) or an empty search space give several trials one configuration;
    a study trains it once."""
    from optuna.trial import TrialState

    wanted = _configuration(task, method, values)
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        attrs = t.user_attrs
        if t.number == number or "settings" not in attrs:
            continue
        if _configuration(attrs.get("task"), attrs.get("method"), attrs["settings"]) != wanted:
            continue
        if t.state == TrialState.COMPLETE and [s.get("seed") for s in attrs.get("seeds", [])] != list(seeds):
            continue
        return t
    return None


def reuse_trial(trial, same, study: str | None = None) -> list[float]:
    """Give ``trial`` the outcome of ``same`` (a trial with its settings): its objectives and per-seed records,
    or its pruning; ``duplicate_of`` names the trial that trained. The runs keep their own ``trial`` tag.
    ``same`` of another ``study`` (an earlier phase of a progressive study) is named by ``same_as``
    instead (``STUDY trial N``): ``duplicate_of`` numbers trials of this study only."""
    import optuna
    from optuna.trial import TrialState

    original = same.user_attrs.get("duplicate_of", same.number)
    if study is None:
        trial.set_user_attr("duplicate_of", original)
        what = f"trial {original}"
    else:
        what = same.user_attrs.get("same_as", f"{study} trial {original}")
        trial.set_user_attr("same_as", what)
    for key, value in same.user_attrs.items():
        if key in ("seeds", "dataset") or key.startswith("mean_"):
            trial.set_user_attr(key, value)
    if same.state == TrialState.PRUNED:
        raise optuna.TrialPruned(f"same settings as {what}")
    return list(same.values)


def mark_pruned(tracker: Tracker, run_id: str, epoch: int) -> None:
    """A run the study's pruner stopped ends KILLED (it did not fail), tagged with the epoch."""
    with contextlib.suppress(RankbenchError):  # a store that cannot take it: the run stays FAILED
        tracker.set_tags(run_id, {PRUNED_TAG: f"epoch {epoch}",
                                  "failure_reason": f"pruned by the study's pruner at epoch {epoch}"})
        tracker.terminate(run_id, "KILLED")


def earlier_runs(tracker: Tracker, study: str, trials: Sequence[int]) -> dict[int, list[str]]:
    """Seed → the runs of ``study`` tagged with one of ``trials`` (earlier attempts of a trial), oldest first."""
    if not trials:
        return {}
    wanted = {str(n) for n in trials}
    found = [r for status in ("FINISHED", "RUNNING", "FAILED", "KILLED")
             for r in tracker.runs(study=study, status=status)
             if r.data.tags.get("trial") in wanted and records.SEED in r.data.params]
    out: dict[int, list[str]] = {}
    for r in sorted(found, key=lambda r: r.info.start_time):
        out.setdefault(int(r.data.params[records.SEED]), []).append(r.info.run_id)
    return out


# ---------------------------------------------------------------------------- workers
class _Heartbeat:
    """Records the trial's heartbeat while it runs, so Optuna can tell a dead worker: Optuna's own on an
    RDB storage, a trial system attribute (``JOURNAL_BEAT_ATTR``) in a journal."""

    def __init__(self, storage, trial_id: int, interval: float) -> None:
        self._storage, self._id = storage, trial_id
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(storage, trial_id, interval), daemon=True)

    @staticmethod
    def _record(storage, trial_id: int) -> None:
        if hasattr(storage, "record_heartbeat"):
            storage.record_heartbeat(trial_id)
        else:
            storage.set_trial_system_attr(trial_id, JOURNAL_BEAT_ATTR, time.time())

    def _beat(self, storage, trial_id: int, interval: float) -> None:
        while not self._stop.wait(interval):
            with contextlib.suppress(Exception):
                self._record(storage, trial_id)

    def __enter__(self) -> _Heartbeat:
        self._record(self._storage, self._id)  # a worker killed at once still goes stale
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def fail_stale_journal_trials(study, grace_period: float) -> int:
    """In a journal storage (no Optuna heartbeats): fail every running trial whose last heartbeat
    (``JOURNAL_BEAT_ATTR``, else its start) is older than ``grace_period`` seconds, and queue its retry, as
    Optuna's ``fail_stale_trials`` does on an RDB storage. Clocks of the workers' machines are compared: they
    must agree to well within the grace period (NTP)."""
    import optuna
    from optuna.trial import TrialState

    storage = study._storage
    if hasattr(storage, "record_heartbeat"):
        return 0
    now, count = time.time(), 0
    callback = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        beat = t.system_attrs.get(JOURNAL_BEAT_ATTR)
        if beat is None and t.datetime_start is not None:
            beat = t.datetime_start.timestamp()
        if beat is None or now - float(beat) <= grace_period:
            continue
        try:
            if not storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker failed it first, or it just finished
        callback(study, storage.get_trial(t._trial_id))
        count += 1
    return count


def retry_interrupted(study) -> int:
    """Queue a retry of every trial that Ctrl-C or a crash marked FAIL and that has none yet."""
    import optuna
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    retried = set()
    for t in trials:
        retried.update(t.system_attrs.get("retry_history", []))
    callback = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3)
    count = 0
    for t in trials:
        if t.state == TrialState.FAIL and t.user_attrs.get("interrupted") and t.number not in retried:
            callback(study, t)
            count += 1
    return count


def worker_loop(run: StudyRun, deadline: float | None = None) -> int:
    """Run trials until the study's budget is finished; returns how many this worker finished."""
    import optuna
    from optuna.trial import TrialState

    from rankbench.run.trainer import TrainingDiverged

    registry = Registry.discover(plugin_dirs=run.plugin_dirs)
    storage = open_storage(run.storage_url, run.spec)
    study = load_or_create(run.spec, storage, run.worker)
    tracker = Tracker(run.options.tracking_uri)
    study_id = storage.get_study_id_from_name(study.study_name)
    budget = run.spec.budget()
    finished = 0
    while True:
        with storage_lock(run.storage_url, storage):
            optuna.storages.fail_stale_trials(study)
            fail_stale_journal_trials(study, run.spec.grace_period)
            retry_interrupted(study)
            states = [t.state for t in study.get_trials(deepcopy=False)]
            done = sum(s in (TrialState.COMPLETE, TrialState.PRUNED) for s in states)
            waiting = sum(s == TrialState.WAITING for s in states)
            running = sum(s == TrialState.RUNNING for s in states)
            if done >= budget or (deadline is not None and time.time() >= deadline):
                return finished
            trial = study.ask() if waiting or done + running < budget else None
        if trial is None:
            time.sleep(min(run.spec.heartbeat_interval, 5))  # others are finishing, or are dead and go stale
            continue
        try:
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
            retried = storage.get_trial(trial_id).system_attrs.get("retry_history", [])
            if run.job is not None:
                trial.set_user_attr(SLURM_JOB_ATTR, run.job)
            with _Heartbeat(storage, trial_id, run.spec.heartbeat_interval):
                values = run_trial(trial, run, registry, tracker, retried=retried)
        except optuna.TrialPruned as exc:
            trial.set_user_attr("pruned_reason", str(exc))
            study.tell(trial, state=TrialState.PRUNED)
        except TrainingDiverged as exc:
            trial.set_user_attr("failure_reason", str(exc))
            study.tell(trial, state=TrialState.PRUNED)
        except BaseException as exc:
            trial.set_user_attr("interrupted", True)
            trial.set_user_attr("failure_reason", f"{type(exc).__name__}: {exc}")
            study.tell(trial, state=TrialState.FAIL)
            raise
        else:
            study.tell(trial, values)
        finished += 1


def _worker_main(run: StudyRun, deadline: float | None) -> None:
    """A worker process: stopped by SIGINT or SIGTERM like the CLI (its run KILLED, its trial interrupted
    for the retry), exiting with the signal's code; an input error is one line, not a traceback."""
    from rankbench.run.stopping import exit_code, graceful_stop

    with graceful_stop():
        try:
            import torch

            quiet_optuna()
            torch.set_num_threads(run.options.threads or 1)  # the workers share the cores
            worker_loop(run, deadline)
        except KeyboardInterrupt as exc:
            raise SystemExit(exit_code(exc)) from None
        except RankbenchError as exc:
            print(f"rankbench: error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None


def _stop_workers(procs: Sequence[Any], timeout: float = 30.0) -> None:
    """SIGTERM to every live worker, so each marks its run KILLED and its trial interrupted; a worker
    still alive after ``timeout`` seconds is killed."""
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()


def _stoppable():
    """``graceful_stop()`` unless SIGTERM is handled already (the CLI runs each command inside one), so that
    a caller of ``run_study`` gets its workers stopped and its runs marked too."""
    import signal

    from rankbench.run.stopping import graceful_stop

    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        return graceful_stop()
    return contextlib.nullcontext()


def _parent_exists(tracker: Tracker, run_id: str) -> bool:
    """Whether the study's parent run is still in the store; any error other than its absence propagates."""
    try:
        run = tracker.get_run(run_id)
    except MissingRecord:
        return False
    return run.info.lifecycle_stage != "deleted"


def ensure_parent_run(study, spec: StudySpec, tracker: Tracker, storage_url: str) -> str:
    """The study's MLflow parent run: created once, found again on resume; replaced only when it is
    gone from the store (a new tracking store, a deleted run)."""
    parent = study.user_attrs.get("mlflow_parent_run_id")
    if parent and _parent_exists(tracker, parent):
        tracker.reopen(parent, run_identity())
        return parent
    params = {
        "study": spec.name, "task": ",".join(spec.tasks), "methods": ",".join(spec.methods),
        "seeds": ",".join(map(str, spec.seeds)),
        "sampler": spec.sampler, "pruner": spec.pruner, "n_trials": spec.budget(),
        "objectives": json.dumps(spec.objectives), "search": json.dumps({k: v.__dict__ for k, v in spec.search.items()},
                                                                        default=str),
        "fixed": json.dumps(spec.fixed, default=str), "storage": storage_url,
        "method_search": json.dumps({m: {k: v.__dict__ for k, v in p.items()} for m, p in spec.method_search.items()},
                                    default=str),
        "budget_steps": spec.budget_steps, "spec_digest": spec.digest(),
    }
    run_id = tracker.start(spec.task, f"study {spec.name}", params,
                           {"rankbench.role": "study", "study": spec.name, "task": spec.task, **run_identity()})
    tracker.log_text(run_id, spec.source or json.dumps(params, indent=2), "study.toml")
    study.set_user_attr("mlflow_parent_run_id", run_id)
    return run_id


def run_study(
    spec: StudySpec,
    *,
    storage_url: str | None = None,
    workers: int = 1,
    options: RunOptions | None = None,
    plugin_dirs: Sequence[Path] = (),
    out_dir: Path | None = None,
    **option_values: Any,
) -> StudyOutcome:
    """Create or resume the study, run its workers to the budget, then summarise and plot (a progressive
    study: ``rankbench.study.progressive.run_progressive``, phase by phase, then the retraining).

    ``options`` are the trials' run options (``option_values``, e.g. ``tracking_uri=...``, over them);
    a step budget among them is the study's (``spec.budget_steps``) and so part of its digest."""
    if workers < 1:
        raise RankbenchError("--workers must be >= 1")
    spec, options = study_options(spec, options, **option_values)
    url = normalised_storage(storage_url or default_storage())
    check_sqlite_storage(url)
    if spec.progressive is not None and not spec.phase:  # its phases are Optuna studies; it runs them in turn
        from rankbench.study.progressive import run_progressive

        with _stoppable():
            return run_progressive(spec, url, options, workers=workers, plugin_dirs=plugin_dirs, out_dir=out_dir)
    with _stoppable():
        opened = open_study(spec, url, options, plugin_dirs)
        run, deadline = opened.run, opened.deadline
        with opened.tracker.ends_on_error(run.parent_run_id):
            if workers == 1:
                worker_loop(run, deadline)
            else:
                _run_workers(run, workers, deadline)
        return finish_study(opened, out_dir)


def study_options(spec: StudySpec, options: RunOptions | None = None,
                  **option_values: Any) -> tuple[StudySpec, RunOptions]:
    """The trials' run options, checked; a step budget among them moves into the spec (it is part of its digest)."""
    options = replace(options or RunOptions(), **option_values).checked()
    if options.budget_steps is not None:
        spec, options = replace(spec, budget_steps=options.budget_steps), replace(options, budget_steps=None)
    return spec, options


@dataclass
class OpenedStudy:
    """A study created or loaded for a command, with its MLflow parent run: what its workers run (``run``)."""

    study: Any
    storage: Any
    tracker: Tracker
    run: StudyRun
    deadline: float | None


def open_study(spec: StudySpec, url: str, options: RunOptions, plugin_dirs: Sequence[Path] = ()) -> OpenedStudy:
    """Create or load the study in the storage at ``url`` and its MLflow parent run (found again on resume)."""
    with _startup_lock(url):  # two commands starting on fresh stores must not both create tables
        storage = open_storage(url, spec)
        study = load_or_create(spec, storage)
        tracker = Tracker(options.tracking_uri)
        tracker.experiment_id(spec.task)
        with (contextlib.nullcontext() if url.startswith("sqlite:///") else storage_lock(url, storage)):
            parent = ensure_parent_run(study, spec, tracker, url)
    run = StudyRun(spec, url, replace(options, tracking_uri=tracker.uri), tuple(plugin_dirs), parent)
    deadline = time.time() + spec.timeout_s if spec.timeout_s else None
    return OpenedStudy(study, storage, tracker, run, deadline)


def finish_study(opened: OpenedStudy, out_dir: Path | None = None) -> StudyOutcome:
    """Summarise the study, write its plots and log both on its parent run, which then ends FINISHED
    (FAILED, and the error raised, when that fails)."""
    tracker, parent, spec = opened.tracker, opened.run.parent_run_id, opened.run.spec
    with tracker.ends_on_error(parent):
        outcome = summarise(opened.study, spec)
        from rankbench.study.plots import write_plots

        folder = out_dir or DEFAULT_DIR / "studies" / spec.name
        outcome.plots = write_plots(opened.study, spec, folder)
        _log_outcome(tracker, parent, outcome, folder)
    tracker.finish(parent)
    return outcome


def run_processes(target: Any, arguments: Sequence[tuple]) -> list[int]:
    """One spawned process per argument tuple, all joined; stopped (Ctrl-C, SIGTERM), each is stopped
    before this returns. Returns the non-zero exit codes."""
    ctx = multiprocessing.get_context("spawn")
    procs = []
    try:
        for args in arguments:
            proc = ctx.Process(target=target, args=args)
            proc.start()
            procs.append(proc)
        for proc in procs:
            proc.join()
    except KeyboardInterrupt:
        _stop_workers(procs)
        raise
    return [p.exitcode for p in procs if p.exitcode != 0]


def _run_workers(run: StudyRun, workers: int, deadline: float | None) -> None:
    """``workers`` processes to the budget; stopped (Ctrl-C, SIGTERM), each is stopped before this returns."""
    bad = run_processes(_worker_main, [(StudyRun(**{**run.__dict__, "worker": i}), deadline) for i in range(workers)])
    if bad:
        raise RankbenchError(
            f"{len(bad)} of {workers} workers failed (exit codes {bad}): run the same command again to resume"
        )


@dataclass
class StudyOutcome:
    name: str
    finished: int
    failed: int
    best: list[dict[str, Any]]
    plots: list[Path] | None = None


def summarise(study, spec: StudySpec) -> StudyOutcome:
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    failed = [t for t in trials if t.state == TrialState.FAIL]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best_trials = originals(study, study.best_trials) if complete else []
    best = [{"number": t.number, "params": t.params,
             **{name: value for name, value in zip(spec.objectives, t.values)},
             "test_accuracy": t.user_attrs.get("mean_test_accuracy")} for t in best_trials]
    return StudyOutcome(spec.name, len(finished), len(failed), best)


def originals(study, chosen: Sequence[Any]) -> list[Any]:
    """``chosen`` trials with each duplicate (``duplicate_of``) replaced by the trial that trained, once."""
    numbers = sorted({t.user_attrs.get("duplicate_of", t.number) for t in chosen})
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    return [by_number[n] for n in numbers if n in by_number]


def _log_outcome(tracker: Tracker, parent: str, outcome: StudyOutcome, folder: Path) -> None:
    tracker.log_dict(parent, outcome.best, "best_trials.json")
    if len(outcome.best) == 1:
        best = outcome.best[0]
        tracker.log_metrics(parent, {f"best_{k}": float(v) for k, v in best.items()
                                     if isinstance(v, (int, float)) and v is not None and k != "number"})
    tracker.log_metrics(parent, {"finished_trials": outcome.finished, "failed_trials": outcome.failed,
                                 "pareto_trials": len(outcome.best)})
    for path in outcome.plots or []:
        tracker.log_artifact(parent, path, "plots")


def list_studies(storage_url: str | None, tracking_uri: str | None = None) -> list[dict[str, Any]]:
    """Each study in the storage: trials, directions, best trials, and its runs in the tracking
    store by state (``running``, ``died``: failed or killed, resumable by running the study again; a run
    stopped by the pruner did not die), and the Slurm worker jobs submitted for it (``slurm_jobs``: dicts
    with ``job`` and ``folder``; ``rankbench.study.launcher.job_states`` tells their states).
    Runs whose process has died are marked FAILED here (as ``report`` does) and returned in
    ``newly_dead``. Without a tracking store the run counts are None; none is created."""
    import optuna

    url = storage_url or default_storage(create=False)
    storage = open_storage(url)
    try:
        tracker = Tracker(tracking_uri, create=False)
    except RankbenchError:
        tracker = None
    out = []
    for summary in optuna.get_all_study_summaries(storage):
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        entry: dict[str, Any] = {
            "name": summary.study_name, "trials": summary.n_trials,
            "directions": [d.name.lower() for d in summary.directions],
            "best": ([(t.number, t.values) for t in originals(study, study.best_trials)]
                     if _has_complete(study) else []),
            "running": None, "died": None, "newly_dead": [],
            "slurm_jobs": [j for j in study.user_attrs.get(SLURM_JOBS_ATTR, []) if isinstance(j, dict)],
        }
        if tracker is not None:
            name = summary.study_name
            entry["newly_dead"] = [r for r in tracker.mark_dead_runs(study=name) if not _is_parent(r)]
            entry["running"] = sum(not _is_parent(r) for r in tracker.runs(study=name, status="RUNNING"))
            entry["died"] = sum(not _is_parent(r) and PRUNED_TAG not in r.data.tags
                                for status in ("FAILED", "KILLED") for r in tracker.runs(study=name, status=status))
        out.append(entry)
    return out


def _is_parent(run) -> bool:
    return run.data.tags.get("rankbench.role") == "study"


def _has_complete(study) -> bool:
    from optuna.trial import TrialState

    return any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False))


TRIAL_HEADERS = ("trial", "state", "method", "params", "objectives", "test acc", "note")


def trial_rows(study) -> list[list[str]]:
    """One row per trial for ``rankbench study show``: its state, configuration, objectives, the
    mean test accuracy it recorded, and why it failed or was pruned (or which trial it repeats)."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        attrs = t.user_attrs
        note = "" if t.state.name == "COMPLETE" else attrs.get("failure_reason") or attrs.get("pruned_reason", "")
        if "duplicate_of" in attrs:
            note = f"same settings as trial {attrs['duplicate_of']}"
        elif "same_as" in attrs:
            note = f"same settings as {attrs['same_as']}"
        mean_test = attrs.get(f"mean_{records.TEST_ACCURACY}")
        rows.append([str(t.number), t.state.name, attrs.get("method", ""),
                     ", ".join(f"{k}={v}" for k, v in t.params.items() if k != "method"),
                     ", ".join(f"{v:.4g}" for v in (t.values or [])),
                     f"{mean_test:.2f}" if mean_test is not None else "", note[:60]])
    return rows


def load_existing(name: str, storage_url: str | None):
    import optuna

    storage = open_storage(storage_url or default_storage(create=False))
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        raise RankbenchError(f"no study {name!r} in the storage: known are {', '.join(names) or 'none'}") from None
