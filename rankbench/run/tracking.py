"""Record runs in MLflow: params, per-epoch metrics, final metrics, ranks artifact."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Mapping

from rankbench.errors import RankbenchError

DEFAULT_DIR = Path("rankbench-runs")


def resolve_tracking_uri(explicit: str | None) -> str:
    """``--tracking-uri`` > ``MLFLOW_TRACKING_URI`` > ``sqlite:///rankbench-runs/mlflow.db``."""
    if explicit:
        return explicit
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    DEFAULT_DIR.mkdir(parents=True, exist_ok=True)
    # absolute: MLflow caches stores by URI, and a relative one would follow the first working directory
    return f"sqlite:///{(DEFAULT_DIR / 'mlflow.db').resolve()}"


class Tracker:
    """A thin layer over ``MlflowClient`` (no global active-run state)."""

    def __init__(self, tracking_uri: str | None = None) -> None:
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        from mlflow.tracking import MlflowClient

        for name in ("alembic", "mlflow", "mlflow.store.db.utils"):
            logging.getLogger(name).setLevel(logging.WARNING)

        self.uri = resolve_tracking_uri(tracking_uri)
        try:
            self.client = MlflowClient(tracking_uri=self.uri)
        except Exception as exc:
            raise RankbenchError(f"cannot open tracking store {self.uri} ({exc}): check --tracking-uri") from None

    def experiment_id(self, name: str) -> str:
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        return self.client.create_experiment(name, artifact_location=self.artifact_root())

    def artifact_root(self) -> str | None:
        """Artifacts of a SQLite store go beside its database file (not ``./mlruns``);
        other stores (servers, databases) keep their own default."""
        if self.uri.startswith("sqlite:///"):
            database = Path(self.uri[len("sqlite:///"):])
            return (database.parent / "artifacts").resolve().as_uri()
        return None

    def start(self, experiment: str, run_name: str, params: Mapping[str, Any], tags: Mapping[str, str]) -> str:
        from mlflow.entities import Param

        run = self.client.create_run(self.experiment_id(experiment), run_name=run_name,
                                     tags={k: str(v) for k, v in tags.items()})
        items = [Param(k, _param_text(v)) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):
            self.client.log_batch(run.info.run_id, params=items[i:i + 100])
        return run.info.run_id

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        self.client.log_batch(run_id, metrics=batch)

    def log_dict(self, run_id: str, data: Any, name: str) -> None:
        self.client.log_dict(run_id, data, name)

    def log_state_dict(self, run_id: str, model) -> None:
        """The trained weights (selectors included), so ``rankbench export`` can rebuild the model."""
        import tempfile

        import torch

        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "state_dict.pt"
            torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, path)
            self.client.log_artifact(run_id, str(path), "model")

    def finish(self, run_id: str) -> None:
        self.client.set_terminated(run_id, "FINISHED")

    def fail(self, run_id: str, reason: str, killed: bool = False) -> None:
        self.client.set_tag(run_id, "failure_reason", reason[:5000])
        self.client.set_terminated(run_id, "KILLED" if killed else "FAILED")


def _param_text(value: Any) -> str:
    text = "none" if value is None else str(value)
    return text[:6000]
