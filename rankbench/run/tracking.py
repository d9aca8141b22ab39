"""Record runs in MLflow and read them back: params, metrics, dataset inputs, artifacts, models."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, TypeVar

from rankbench.errors import RankbenchError

T = TypeVar("T")
DEFAULT_DIR = Path("rankbench-runs")
PID_TAG, HOST_TAG = "rankbench.pid", "rankbench.host"
"""Tags naming the process that runs a run, so a run whose process died can be told apart."""
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


def _writes(what: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """A write to the store whose failure (read-only file or folder, a disk I/O error, a full disk)
    is a one-line ``RankbenchError`` naming the store and the cause, not a traceback."""

    def decorate(method: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(method)
        def wrapper(self: "Tracker", *args: Any, **kwargs: Any) -> T:
            try:
                return method(self, *args, **kwargs)
            except RankbenchError:
                raise
            except Exception as exc:
                raise RankbenchError(f"cannot write {what} to tracking store {self.uri} ({_one_line(exc)}): "
                                     "check that the store is writable and its disk has space") from None

        return wrapper

    return decorate


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

        self.uri = resolve_tracking_uri(tracking_uri, create)
        database = sqlite_database(self.uri)
        if database is not None and not database.exists():
            if not create:
                raise RankbenchError(f"no tracking store at {database}: run `rankbench run ...` first, "
                                     "or point --tracking-uri at your store")
            if not database.parent.is_dir():
                raise RankbenchError(f"tracking store {self.uri}: the folder {database.parent} does not exist: "
                                     "create it or fix --tracking-uri")
        try:
            with _creation_lock(database):
                self._client = MlflowClient(tracking_uri=self.uri)
                self._client.search_experiments(max_results=1)  # creates and migrates a new store, locked
        except RankbenchError:
            raise
        except Exception as exc:
            raise RankbenchError(f"cannot open tracking store {self.uri} ({_one_line(exc)}): check --tracking-uri "
                                 "and that the store is readable and writable") from None

    # ------------------------------------------------------------------------ experiments
    @_writes("the experiment")
    def experiment_id(self, name: str) -> str:
        experiment = self._client.get_experiment_by_name(name)
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
                raise RankbenchError(missing) from None
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise RankbenchError(
                f"cannot read {what} from {self.uri} ({type(exc).__name__}: {reason}): check --tracking-uri"
            ) from None

    def mark_dead_runs(self, study: str | None = None) -> list[Any]:
        """Runs still RUNNING whose process on this machine is gone (killed, crashed): each is marked
        FAILED with the reason, so none stays RUNNING forever; returns them (they can be resumed)."""
        dead = []
        for run in self.runs(status="RUNNING", study=study):
            if self.process_gone(run):
                self.fail(run.info.run_id, f"process {run.data.tags[PID_TAG]} on {run.data.tags[HOST_TAG]} died")
                dead.append(run)
        return dead

    @staticmethod
    def process_gone(run: Any) -> bool:
        """Whether the process a run's tags name is known to have ended (only a process on this
        machine can be checked; any other counts as alive)."""
        tags = run.data.tags
        return (tags.get(PID_TAG, "").isdigit() and tags.get(HOST_TAG) == socket.gethostname()
                and not _alive(int(tags[PID_TAG])))

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
        parent run), with ``tags`` updated (the resuming process)."""
        self.get_run(run_id)
        for key, value in (tags or {}).items():
            self._client.set_tag(run_id, key, value)
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
    def log_pytorch_model(self, run_id: str, model, folder: str = PRUNED_MODEL_FOLDER) -> None:
        """An MLflow PyTorch model (``MLmodel``, pickled module, requirements) in the run's artifacts,
        so ``mlflow.pytorch.load_model("runs:/RUN_ID/pruned_model")`` loads it (rankbench must be
        importable: the module's classes are rankbench's). Pickle, not ``pt2``: a traced graph would
        need an example input per task and loses the tensorized layers' structure."""
        import tempfile

        import mlflow.pytorch
        import torch

        logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)  # its warning about pickle, chosen above
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / folder
            mlflow.pytorch.save_model(model, path, serialization_format="pickle",
                                      pip_requirements=[f"torch=={torch.__version__}", "rankbench"])
            self._client.log_artifacts(run_id, str(path), folder)

    @_writes("the dataset input")
    def log_dataset(self, run_id: str, name: str, digest: str, source: str, sizes: Mapping[str, int]) -> None:
        """The run's data as an MLflow dataset input (the UI's Dataset column): its name, a digest
        of its bytes, where it came from and the split sizes (as the dataset's profile)."""
        import json

        from mlflow.entities import Dataset, DatasetInput, InputTag

        dataset = Dataset(name=name, digest=digest[:16] or "unknown", source_type="local",
                          source=json.dumps({"uri": source}), profile=json.dumps(dict(sizes)))
        self._client.log_inputs(run_id, [DatasetInput(dataset, [InputTag("mlflow.data.context", "training")])])

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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def run_identity() -> dict[str, str]:
    """The tags that name this process (``PID_TAG``, ``HOST_TAG``)."""
    return {PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname()}


def param_text(value: Any) -> str:
    """A param value as MLflow stores it."""
    text = "none" if value is None else str(value)
    return text[:6000]
