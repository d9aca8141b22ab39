"""Record runs in MLflow and read them back: params, metrics, dataset inputs, artifacts, models."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from rankbench.errors import MissingRecord, RankbenchError

T = TypeVar("T")
DEFAULT_DIR = Path("rankbench-runs")
PID_TAG, HOST_TAG = "rankbench.pid", "rankbench.host"
"""Tags naming the process that runs a run, so a run whose process died can be told apart."""
HEARTBEAT_TAG = "rankbench.heartbeat"
"""Unix seconds (as text) of a running run's last sign of life, so a run that died on another
machine, whose process cannot be checked from here, is found dead too."""
HEARTBEAT_INTERVAL_ENV, HEARTBEAT_GRACE_ENV = "RANKBENCH_HEARTBEAT_INTERVAL", "RANKBENCH_HEARTBEAT_GRACE"
HEARTBEAT_INTERVAL_S, HEARTBEAT_GRACE_S = 30.0, 300.0
"""Defaults: a beat every 30 s; a run whose last beat is over 300 s old is dead (a beat can be late
while the store is busy, so the grace is several intervals)."""
MAX_EXPERIMENT_NAME = 500
"""MLflow's limit on an experiment's name (``mlflow.utils.validation.MAX_EXPERIMENT_NAME_LENGTH``)."""
OPENING_HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
                       "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5", "MLFLOW_HTTP_REQUEST_TIMEOUT": "4"}
"""MLflow's HTTP retry limits while a server store is first opened: a server that is not there is
an error within seconds (MLflow's defaults retry for about 4 minutes); the run's own writes keep
MLflow's retries. A limit the user set in the environment is kept."""
PRUNED_MODEL_FOLDER = "pruned_model"
"""Where each run's exported (pruned) model is logged as an MLflow PyTorch model."""


def resolve_tracking_uri(explicit: str | None, create: bool = True) -> str:
    """``--tracking-uri`` > ``MLFLOW_TRACKING_URI`` > ``sqlite:///rankbench-runs/mlflow.db``
    (its folder is made only when ``create``: reading commands never create a store)."""
    if explicit:
        return explicit
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if create:
        DEFAULT_DIR.mkdir(parents=True, exist_ok=True)
    # absolute: MLflow caches stores by URI, and a relative one would follow the first working directory
    return f"sqlite:///{(DEFAULT_DIR / 'mlflow.db').resolve()}"


def sqlite_database(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, else None."""
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def _one_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


DAMAGED = ("file is not a database", "database disk image is malformed", "file is encrypted or is not a database")


def _damaged(uri: str, exc: BaseException) -> str | None:
    """The message for a store file that is not an MLflow SQLite store or is damaged, else None:
    its cause is the file, so "check that it is writable" would send the user the wrong way."""
    text = str(getattr(exc, "orig", None) or exc).lower()
    if not any(d in text for d in DAMAGED):
        return None
    database = sqlite_database(uri)
    what = f"{database}" if database is not None else uri
    return (f"tracking store {uri}: {what} is not an MLflow SQLite store, or it is damaged ({_one_line(exc)}): "
            "point --tracking-uri at your store (or at a new file, e.g. sqlite:///rankbench-runs/mlflow.db)")


def _writes(what: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """A write to the store whose failure (read-only file or folder, a disk I/O error, a full disk)
    is a one-line ``RankbenchError`` naming the store and the cause, not a traceback."""

    def decorate(method: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(method)
        def wrapper(self: Tracker, *args: Any, **kwargs: Any) -> T:
            try:
                with self._write_lock:  # the heartbeat thread and the run never write to the store at once
                    return method(self, *args, **kwargs)
            except RankbenchError:
                raise
            except Exception as exc:
                raise RankbenchError(_damaged(self.uri, exc) or (
                    f"cannot write {what} to tracking store {self.uri} ({_one_line(exc)}): "
                    "check that the store is writable and its disk has space")) from None

        return wrapper

    return decorate


_FLUENT = threading.Lock()


@contextlib.contextmanager
def _fluent(uri: str, experiment_id: str) -> Iterator[None]:
    """MLflow's fluent tracking URI and experiment, for one call that reads them (``log_model``).

    Both are process-wide, so two runs of one process (a study's threads) take turns, and
    everything is restored afterwards: MLflow's own restore unsets ``MLFLOW_TRACKING_URI``,
    which would send this process's next run to the default store."""
    from mlflow.tracking._tracking_service import utils

    names = ("MLFLOW_EXPERIMENT_ID", "MLFLOW_TRACKING_URI")
    with _FLUENT:
        saved_uri = utils._tracking_uri
        saved_env = {name: os.environ.get(name) for name in names}
        os.environ["MLFLOW_EXPERIMENT_ID"] = experiment_id
        try:
            utils.set_tracking_uri(uri)
            yield
        finally:
            utils.set_tracking_uri(saved_uri)
            for name, value in saved_env.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


class Tracker:
    """The one owner of MLflow in rankbench: every read and write of the tracking store goes
    through here, so store errors become one-line ``RankbenchError``s naming the store, and
    no other module depends on ``MlflowClient`` (no global active-run state either).

    ``create=False`` (report, export) opens an existing store only. A new SQLite store is
    created and migrated under a file lock beside it, so processes that start together on
    a new store do not race on its tables."""

    def __init__(self, tracking_uri: str | None = None, *, create: bool = True) -> None:
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        from mlflow.tracking import MlflowClient

        for name in ("alembic", "mlflow"):
            logging.getLogger(name).setLevel(logging.WARNING)
        # it logs a failed write with its traceback; rankbench reports the failure in one line itself
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)

        self._write_lock = threading.RLock()
        self.uri = resolve_tracking_uri(tracking_uri, create)
        database = sqlite_database(self.uri)
        if database is not None and database.is_dir():
            raise RankbenchError(f"tracking store {self.uri}: {database} is a folder: give the database file, "
                                 f"e.g. --tracking-uri sqlite:///{database / 'mlflow.db'}")
        if database is not None and not database.exists():
            if not create:
                raise RankbenchError(f"no tracking store at {database}: run `rankbench run ...` first, "
                                     "or point --tracking-uri at your store")
            if not database.parent.is_dir():
                raise RankbenchError(f"tracking store {self.uri}: the folder {database.parent} does not exist: "
                                     "create it or fix --tracking-uri")
        try:
            with _creation_lock(database), _opening_http_limits(self.uri):
                self._client = MlflowClient(tracking_uri=self.uri)
                self._client.search_experiments(max_results=1)  # creates and migrates a new store, locked
        except RankbenchError:
            raise
        except Exception as exc:
            raise RankbenchError(_opening_error(self.uri, exc)) from None

    # ------------------------------------------------------------------------ experiments
    @_writes("the experiment")
    def experiment_id(self, name: str) -> str:
        """The id of experiment ``name``, created if new. A deleted one is not used (MLflow keeps
        its name, so a new one cannot take it): the error says how to restore it."""
        if len(name) > MAX_EXPERIMENT_NAME:
            raise RankbenchError(f"--experiment: the name has {len(name)} characters, MLflow allows at most "
                                 f"{MAX_EXPERIMENT_NAME}: choose a shorter --experiment")
        experiment = self._client.get_experiment_by_name(name)
        if experiment is not None and experiment.lifecycle_stage == "deleted":
            raise RankbenchError(
                f"--experiment {name}: that MLflow experiment (id {experiment.experiment_id}) is deleted in "
                f"{self.uri}: restore it with `MLFLOW_TRACKING_URI={self.uri} mlflow experiments restore "
                f"--experiment-id {experiment.experiment_id}`, or choose another --experiment")
        if experiment is not None:
            return experiment.experiment_id
        return self._client.create_experiment(name, artifact_location=self.artifact_root())

    def experiments(self) -> list[Any]:
        """The store's active (not deleted) MLflow ``Experiment``s."""
        from mlflow.entities import ViewType

        return self._read("experiments", lambda: self._client.search_experiments(view_type=ViewType.ACTIVE_ONLY))

    def artifact_root(self) -> str | None:
        """Artifacts of a SQLite store go beside its database file (not ``./mlruns``);
        other stores (servers, databases) keep their own default."""
        if self.uri.startswith("sqlite:///"):
            database = Path(self.uri[len("sqlite:///"):])
            return (database.parent / "artifacts").resolve().as_uri()
        return None

    def checkpoint_path(self, run_id: str) -> Path:
        """Where a run's per-epoch checkpoint lives: ``checkpoints/`` beside a SQLite store's
        database, else ``rankbench-runs/checkpoints/`` (checkpoints are local files)."""
        database = sqlite_database(self.uri)
        folder = (database.parent if database is not None else DEFAULT_DIR.resolve()) / "checkpoints"
        return folder / f"{run_id}.pt"

    # ------------------------------------------------------------------------ reading
    def get_run(self, run_id: str) -> Any:
        """The MLflow ``Run`` (``.info``, ``.data.params``/``.metrics``/``.tags``); a missing run is
        a ``RankbenchError`` that names the store, since a wrong store is the usual cause."""
        return self._read(f"run {run_id!r}", lambda: self._client.get_run(run_id),
                          missing=f"no run {run_id!r} in {self.uri}: check the run id and --tracking-uri")

    def runs(self, *, task: str | None = None, method: str | None = None, study: str | None = None,
             status: str = "FINISHED") -> list[Any]:
        """Runs of every active experiment with ``status``, filtered by their task/method/study tags
        (MLflow ``Run``s, at most 50000)."""
        ids = [e.experiment_id for e in self.experiments()]
        if not ids:
            return []
        chosen = {"task": task, "method": method, "study": study}
        for name, value in chosen.items():
            if value is not None and ("'" in value or '"' in value):
                raise RankbenchError(f"--{name} {value!r}: names contain no quotes: check the name")
        filters = [f"attributes.status = '{status}'"]
        filters += [f"tags.{name} = '{value}'" for name, value in chosen.items() if value]
        return self._read("runs", lambda: self._client.search_runs(ids, filter_string=" and ".join(filters),
                                                                   max_results=50000))

    def metric_history(self, run_id: str, key: str) -> list[Any]:
        """Every logged value of ``key`` (MLflow ``Metric``s: ``.step``, ``.value``), in step order."""
        history = self._read(f"metric {key!r} of run {run_id!r}",
                             lambda: self._client.get_metric_history(run_id, key),
                             missing=f"no run {run_id!r} in {self.uri}: check the run id and --tracking-uri")
        return sorted(history, key=lambda m: m.step)

    def download_artifact(self, run_id: str, path: str, dst: Path | str | None = None) -> Path:
        """A local copy of one artifact (in ``dst`` if given, which must exist; else wherever MLflow
        puts it, which for a local store may be the store's own file)."""
        local = self._read(
            f"artifact {path!r} of run {run_id!r}",
            lambda: self._client.download_artifacts(run_id, path, None if dst is None else str(dst)),
            missing=f"no artifact {path!r} in run {run_id!r} of {self.uri}: check the run id and --tracking-uri",
        )
        return Path(local)

    def _read(self, what: str, read: Callable[[], Any], missing: str | None = None) -> Any:
        try:
            return read()
        except Exception as exc:
            if missing and getattr(exc, "error_code", None) == "RESOURCE_DOES_NOT_EXIST":
                raise MissingRecord(missing) from None
            damaged = _damaged(self.uri, exc)
            if damaged:
                raise RankbenchError(damaged) from None
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise RankbenchError(
                f"cannot read {what} from {self.uri} ({type(exc).__name__}: {reason}): check --tracking-uri"
            ) from None

    def mark_dead_runs(self, study: str | None = None) -> list[Any]:
        """Runs still RUNNING whose process is gone (killed, crashed, its machine lost): each is
        marked FAILED with the reason (``death_reason``), so none stays RUNNING forever; returns
        them as stored now (FAILED, tag ``failure_reason``; they can be resumed)."""
        dead = []
        for run in self.runs(status="RUNNING", study=study):
            reason = self.death_reason(run)
            if reason is not None:
                self.fail(run.info.run_id, reason)
                dead.append(self.get_run(run.info.run_id))
        return dead

    @staticmethod
    def process_gone(run: Any) -> bool:
        """Whether the process that runs ``run`` is known to have ended (see ``death_reason``)."""
        return Tracker.death_reason(run) is not None

    @staticmethod
    def death_reason(run: Any) -> str | None:
        """Why a RUNNING run is known to be dead, else None. A run of a process on this machine is
        dead when that process is gone; any other (another machine, or no pid tag) when its heartbeat
        is older than the grace period (``RANKBENCH_HEARTBEAT_GRACE``, default 300 s). A run without
        a heartbeat tag (an older rankbench) cannot be judged and counts as alive."""
        tags = run.data.tags
        host = tags.get(HOST_TAG) or "an unknown host"
        if tags.get(PID_TAG, "").isdigit() and tags.get(HOST_TAG) == socket.gethostname():
            return None if _alive(int(tags[PID_TAG])) else f"process {tags[PID_TAG]} on {host} is gone"
        try:
            beat = float(tags[HEARTBEAT_TAG])
        except (KeyError, ValueError):
            return None
        silent = time.time() - beat
        grace = _seconds_from_env(HEARTBEAT_GRACE_ENV, HEARTBEAT_GRACE_S)
        return f"no heartbeat from {host} for {silent:.0f} s" if silent > grace else None

    def heartbeat(self, run_id: str, interval_s: float | None = None) -> Heartbeat:
        """A context manager that keeps run ``run_id`` visibly alive: the tag ``rankbench.heartbeat``
        (unix seconds) is set on entry, then every ``interval_s`` (default ``RANKBENCH_HEARTBEAT_INTERVAL``,
        else 30 s) by a daemon thread until exit; ``death_reason`` reads it from any machine."""
        interval = _seconds_from_env(HEARTBEAT_INTERVAL_ENV, HEARTBEAT_INTERVAL_S) if interval_s is None else interval_s
        if not interval > 0:
            raise RankbenchError(f"heartbeat interval {interval!r}: give a positive number of seconds")
        return Heartbeat(self, run_id, float(interval))

    @_writes("the heartbeat")
    def _beat(self, run_id: str) -> None:
        self._client.set_tag(run_id, HEARTBEAT_TAG, f"{time.time():.3f}")

    # ------------------------------------------------------------------------ writing
    @_writes("a new run")
    def start(self, experiment: str, run_name: str, params: Mapping[str, Any], tags: Mapping[str, str]) -> str:
        from mlflow.entities import Param

        run = self._client.create_run(self.experiment_id(experiment), run_name=run_name,
                                      tags={k: str(v) for k, v in tags.items()})
        items = [Param(k, param_text(v)) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):
            self._client.log_batch(run.info.run_id, params=items[i:i + 100])
        return run.info.run_id

    @_writes("the run status")
    def reopen(self, run_id: str, tags: Mapping[str, str] | None = None) -> None:
        """Mark a finished, failed or killed run RUNNING again (a resumed run, a resumed study's
        parent run), with ``tags`` updated (the resuming process) and the ``failure_reason`` of
        the earlier attempt removed. Its heartbeat is renewed: the earlier attempt's last beat is
        old, and would make the resumed run look dead until its own heartbeat starts."""
        stored = self.get_run(run_id)
        if "failure_reason" in stored.data.tags:  # the failed attempt's reason would outlive its success
            self._client.delete_tag(run_id, "failure_reason")
        for key, value in (tags or {}).items():
            self._client.set_tag(run_id, key, value)
        if HEARTBEAT_TAG in stored.data.tags:
            self._beat(run_id)
        self._client.update_run(run_id, status="RUNNING")

    @_writes("tags")
    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        for key, value in tags.items():
            self._client.set_tag(run_id, key, str(value))

    @_writes("metrics")
    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        self._client.log_batch(run_id, metrics=batch)

    @_writes("an artifact")
    def log_dict(self, run_id: str, data: Any, name: str) -> None:
        self._client.log_dict(run_id, data, name)

    @_writes("an artifact")
    def log_text(self, run_id: str, text: str, name: str) -> None:
        self._client.log_text(run_id, text, name)

    @_writes("an artifact")
    def log_artifact(self, run_id: str, path: Path | str, folder: str | None = None) -> None:
        """Copy a local file into the run's artifacts (under ``folder`` if given)."""
        self._client.log_artifact(run_id, str(path), folder)

    @_writes("the weights")
    def log_state_dict(self, run_id: str, model) -> None:
        """The trained weights (selectors included), so ``rankbench export`` can rebuild the model."""
        import tempfile

        import torch

        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "state_dict.pt"
            torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, path)
            self.log_artifact(run_id, path, "model")

    @_writes("the pruned model")
    def log_pytorch_model(self, run_id: str, model, folder: str = PRUNED_MODEL_FOLDER, input_example=None) -> None:
        """The pruned model as an MLflow 3 logged model named ``folder`` of the run (the UI's Models tab,
        ``mlflow.search_logged_models``), with ``input_example`` (a few inputs, a tensor) and the
        signature inferred from the model's output on it, so ``mlflow.pytorch.load_model("runs:/RUN_ID/
        pruned_model")`` (or its ``models:/`` URI) loads it (rankbench must be importable: the module's
        classes are rankbench's). Pickle, not ``pt2``: a traced graph loses the tensorized layers'
        structure. MLflow's ``log_model`` reads the store and the experiment from its fluent state, so
        both are set for the call alone and restored (no active run is started)."""
        import mlflow.pytorch
        from mlflow.models import infer_signature

        logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)  # its warning about pickle, chosen above
        logging.getLogger("mlflow.models.model").setLevel(logging.ERROR)
        example = signature = None
        if input_example is not None:
            import torch

            with torch.no_grad():
                try:
                    output = model(input_example)
                except Exception:  # a model whose forward takes more than one tensor: log it without an example
                    output = None
            if isinstance(output, torch.Tensor):
                example = input_example.cpu().numpy()
                signature = infer_signature(example, output.cpu().numpy())
        experiment = self.get_run(run_id).info.experiment_id
        with _fluent(self.uri, experiment):
            mlflow.pytorch.log_model(model, name=folder, run_id=run_id, serialization_format="pickle",
                                     input_example=example, signature=signature,
                                     pip_requirements=[f"torch=={_installed_version('torch')}", "rankbench"])

    @_writes("the dataset input")
    def log_dataset(self, run_id: str, name: str, digest: str, source: str, sizes: Mapping[str, int]) -> None:
        """The run's data as an MLflow dataset input (the UI's Dataset column): its name, a digest
        of its bytes, where it came from and the split sizes (as the dataset's profile)."""
        import json

        from mlflow.entities import Dataset, DatasetInput, InputTag

        dataset = Dataset(name=name, digest=digest[:16] or "unknown", source_type="local",
                          source=json.dumps({"uri": source}), profile=json.dumps(dict(sizes)))
        inputs = [DatasetInput(dataset, [InputTag("mlflow.data.context", "training")])]
        try:
            self._client.log_inputs(run_id, inputs)
        except Exception as exc:  # two runs (a study's workers) recorded the same new dataset at once:
            text = str(exc).lower()
            if "unique constraint" not in text or "dataset" not in text:
                raise  # the one that lost the race finds it there now
            self._client.log_inputs(run_id, inputs)

    @contextlib.contextmanager
    def ends_on_error(self, run_id: str | None) -> Iterator[None]:
        """Marks the run KILLED when the block is interrupted (Ctrl-C, SIGTERM) and FAILED when it
        raises, then re-raises: a study's parent run never stays RUNNING behind a stopped command.
        ``None`` (no run yet) marks nothing."""
        try:
            yield
        except KeyboardInterrupt:
            if run_id is not None:
                self.terminate(run_id, "KILLED")
            raise
        except Exception:
            if run_id is not None:
                self.terminate(run_id, "FAILED")
            raise

    @_writes("the run status")
    def terminate(self, run_id: str, status: str) -> None:
        """End the run with an MLflow status: FINISHED, FAILED or KILLED."""
        self._client.set_terminated(run_id, status)

    def finish(self, run_id: str) -> None:
        self.terminate(run_id, "FINISHED")

    @_writes("the run status")
    def fail(self, run_id: str, reason: str, killed: bool = False) -> None:
        self._client.set_tag(run_id, "failure_reason", reason[:5000])
        self.terminate(run_id, "KILLED" if killed else "FAILED")


@contextlib.contextmanager
def _creation_lock(database: Path | None) -> Iterator[None]:
    """A file lock beside a SQLite store while it is opened (and, if new, created and migrated)."""
    if database is None:
        yield
        return
    from filelock import FileLock, Timeout

    lock = FileLock(f"{database}.lock", timeout=300)
    try:
        lock.acquire()
    except (OSError, Timeout) as exc:
        raise RankbenchError(f"cannot lock tracking store {database} ({_one_line(exc)}): "
                             "check that its folder is writable") from None
    try:
        yield
    finally:
        lock.release()


JOIN_TIMEOUT_S = 60.0


class Heartbeat:
    """``Tracker.heartbeat``'s context manager: a beat on entry, then one per interval from a daemon
    thread, stopped and joined on exit. A failed beat in the thread is ignored (the store may be
    busy for a moment; a run that stays silent past the grace period is judged dead anyway)."""

    def __init__(self, tracker: Tracker, run_id: str, interval_s: float) -> None:
        self.tracker, self.run_id, self.interval_s = tracker, run_id, interval_s
        self.beats = self.failed = 0
        """Beats written, and beats of the thread that the store refused (ignored)."""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Heartbeat:
        self.tracker._beat(self.run_id)
        self.beats += 1
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name=f"rankbench-heartbeat-{self.run_id}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=JOIN_TIMEOUT_S)  # a beat stuck in a store's retries does not hold the run
            self._thread = None

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.tracker._beat(self.run_id)
                self.beats += 1
            except Exception:  # as Optuna's heartbeat thread: the next beat may get through
                self.failed += 1


def _seconds_from_env(name: str, default: float) -> float:
    """A positive number of seconds from environment variable ``name``, else ``default``."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise RankbenchError(f"{name}={text}: give a positive number of seconds, e.g. {name}={default:g}")
    return value


@contextlib.contextmanager
def _opening_http_limits(uri: str) -> Iterator[None]:
    """``OPENING_HTTP_LIMITS`` in the environment while a server store is first opened, then as before."""
    if not uri.startswith(("http://", "https://")):
        yield
        return
    chosen = {k: v for k, v in OPENING_HTTP_LIMITS.items() if k not in os.environ}
    os.environ.update(chosen)
    try:
        yield
    finally:
        for key in chosen:
            os.environ.pop(key, None)


def _opening_error(uri: str, exc: BaseException) -> str:
    """The one line for a store that cannot be opened, naming the fix its cause calls for."""
    damaged = _damaged(uri, exc)
    if damaged:
        return damaged
    found = re.search(r"found version (\S+?),? but expected (\S+?)\)", str(exc))
    known = _known_schema_revision(found.group(1)) if found else None
    if found and known is not None:
        revision, head = found.groups()
        if not known:
            import mlflow

            return (f"tracking store {uri} was written by a newer MLflow (schema {revision}; mlflow "
                    f"{mlflow.__version__} here knows up to {head}): upgrade mlflow (pip install -U mlflow) "
                    "or point --tracking-uri at another store")
        return (f"tracking store {uri} has an older MLflow schema ({revision}; this mlflow expects {head}): back "
                f"it up, then upgrade it with `mlflow db upgrade {uri}`, or point --tracking-uri at another store")
    if uri.startswith(("http://", "https://")):
        return (f"cannot reach tracking server {uri} ({_one_line(exc)}): check --tracking-uri and that the server "
                "is running (mlflow server ...)")
    return (f"cannot open tracking store {uri} ({_one_line(exc)}): check --tracking-uri "
            "and that the store is readable and writable")


def _known_schema_revision(revision: str) -> bool | None:
    """Whether the installed MLflow's migrations know schema ``revision`` (an unknown one was written
    by a newer MLflow); None when its migrations cannot be read (then MLflow's own message stands)."""
    try:
        from alembic.script import ScriptDirectory
        from alembic.util import CommandError
        from mlflow.store.db.utils import _get_alembic_config

        script = ScriptDirectory.from_config(_get_alembic_config(""))
    except Exception:
        return None
    try:
        return script.get_revision(revision) is not None
    except CommandError:  # "Can't locate revision identified by ..."
        return False
    except Exception:
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _installed_version(package: str) -> str:
    """The version pip installed (``torch.__version__`` may carry a local ``+cu130`` that pip's metadata lacks,
    and MLflow warns on stderr at every run when the two disagree)."""
    from importlib.metadata import version

    return version(package)


def run_identity() -> dict[str, str]:
    """The tags that name this process (``PID_TAG``, ``HOST_TAG``)."""
    return {PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname()}


def param_text(value: Any) -> str:
    """A param value as MLflow stores it."""
    text = "none" if value is None else str(value)
    return text[:6000]
