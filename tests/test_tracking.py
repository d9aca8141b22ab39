"""What a run records in MLflow, where the store is, multi-seed runs and determinism.

The main run trains ``ours`` on the embedded 5k MNIST digits for one epoch at
rank 3; the other runs use a tiny random IDX dataset. Every run writes into a
temporary folder, which is also the working directory.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import rankbench
from helpers import make_tiny_mnist
from rankbench.cli import main
from rankbench.plugins.registry import Registry
from rankbench.run.config import make_config, resolve_device
from rankbench.run.experiment import run
from rankbench.run.prepare import prepare

TIMING_KEYS = {"train_seconds_per_batch"}
PER_EPOCH = ("val_accuracy", "compression", "train_loss", "penalty")
TINY_SETTINGS = ["--epochs", "1", "--set", "initial_rank=3", "--set", "val_size=40", "--no-progress"]


@pytest.fixture(scope="module")
def registry() -> Registry:
    return Registry.discover()


def tiny_config(registry: Registry, uri: str, **params):
    return make_config(registry, "lenet5", "ours", {"epochs": 1, "initial_rank": 3, **params},
                       tracking_uri=uri, progress=False)


def client_for(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def all_runs(uri: str):
    from mlflow.entities import ViewType

    client = client_for(uri)
    ids = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    return client.search_runs(ids, run_view_type=ViewType.ALL) if ids else []


@pytest.fixture
def tiny_data(tmp_path) -> Path:
    return make_tiny_mnist(tmp_path / "data")


@pytest.fixture(scope="module")
def embedded_run(tmp_path_factory, registry, store_template):
    """One tiny run through the Python API on the embedded data: (uri, RunResult)."""
    folder = tmp_path_factory.mktemp("embedded")
    shutil.copyfile(store_template, folder / "m.db")
    uri = f"sqlite:///{folder / 'm.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        (result,) = run(prepare(tiny_config(registry, uri), registry))
    return uri, result


# ---------------------------------------------------------------------------- one run


def test_every_name_a_run_records_is_declared_in_records(embedded_run, registry):
    from rankbench import records

    uri, result = embedded_run
    run = client_for(uri).get_run(result.run_id)
    hyperparameters = set(registry.task("lenet5").hyperparameters) | set(registry.method("ours").hyperparameters)
    assert set(run.data.params) == hyperparameters | set(records.PARAMS)
    assert set(run.data.metrics) <= set(records.METRICS)
    assert {str(m) for m in records.EPOCH_METRICS + records.FINAL_METRICS} - set(run.data.metrics) == set()


def test_the_run_logs_its_data_as_an_mlflow_dataset_input(embedded_run):
    uri, result = embedded_run
    run = client_for(uri).get_run(result.run_id)
    (entry,) = run.inputs.dataset_inputs
    assert entry.dataset.name == "mnist-embedded-5k" == run.data.params["data_name"]
    assert run.data.params["dataset_digest"].startswith(entry.dataset.digest) and len(entry.dataset.digest) == 16
    assert json.loads(entry.dataset.profile) == {"train": 4000, "validation": 500, "test": 500}
    assert json.loads(entry.dataset.source) == {"uri": run.data.params["dataset_source"]}
    assert [(t.key, t.value) for t in entry.tags] == [("mlflow.data.context", "training")]


def test_the_pruned_model_loads_with_mlflow_pytorch_and_matches_the_gated_eval_model(embedded_run, monkeypatch,
                                                                                    registry):
    import mlflow.pytorch
    import torch

    from rankbench.export import rebuild

    uri, result = embedded_run
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    loaded = mlflow.pytorch.load_model(f"runs:/{result.run_id}/pruned_model").eval()
    gated, _ = rebuild(result.run_id, registry, uri)
    x = torch.randn(6, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(loaded(x), gated(x), atol=1e-5)
    assert sum(p.numel() for p in loaded.parameters()) == result.parameters


def test_the_pruned_model_is_an_mlflow_logged_model_of_its_run_with_a_signature(embedded_run, monkeypatch):
    import mlflow

    uri, result = embedded_run
    client = client_for(uri)
    run = client.get_run(result.run_id)
    (model,) = client.search_logged_models(experiment_ids=[run.info.experiment_id],
                                           filter_string=f"source_run_id = '{result.run_id}'")
    assert model.name == "pruned_model" and model.status == "READY"
    assert [o.model_id for o in run.outputs.model_outputs] == [model.model_id]  # the run's Models tab links it
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    info = mlflow.models.get_model_info(f"models:/{model.model_id}")
    assert info.signature is not None
    assert tuple(info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == (-1, 1, 28, 28)
    assert info.saved_input_example_info is not None
    assert "MLFLOW_EXPERIMENT_ID" not in os.environ  # the fluent state was restored




def test_one_finished_run_in_the_task_experiment(embedded_run):
    uri, result = embedded_run
    (stored,) = all_runs(uri)
    assert stored.info.run_id == result.run_id
    assert stored.info.status == "FINISHED"
    assert client_for(uri).get_experiment(stored.info.experiment_id).name == "lenet5"
    assert stored.info.run_name == "ours[lambda=1.0,sigma=0.5]-seed0"


def test_params_and_tags(embedded_run):
    uri, result = embedded_run
    stored = client_for(uri).get_run(result.run_id)
    params = stored.data.params
    expected = {
        "task": "lenet5", "method": "ours", "seed": "0", "lambda": "1.0", "sigma": "0.5", "epochs": "1",
        "lr": "0.001", "recipe": "embedded", "batch_size": "128", "data_name": "mnist-embedded-5k", "dataset": "mnist",
        "train_size": "4000",
        "device": str(resolve_device("auto")), "threads": str(torch.get_num_threads()),
        "rankbench_version": rankbench.__version__,
    }
    assert {k: params.get(k) for k in expected} == expected
    initial = json.loads(params["initial_ranks"])
    assert set(initial) == set(result.ranks) == {"conv1", "conv2", "fc1", "fc2"}
    assert all(r == 3 for ranks in initial.values() for r in ranks)
    tags = stored.data.tags
    assert (tags["method"], tags["task"], tags["dataset"]) == ("ours", "lenet5", "mnist-embedded-5k")
    assert "failure_reason" not in tags


def test_per_epoch_metrics_have_one_point_per_epoch(embedded_run):
    uri, result = embedded_run
    client = client_for(uri)
    assert len(result.history) == 1
    for key in PER_EPOCH:
        history = client.get_metric_history(result.run_id, key)
        assert [m.step for m in history] == [1], key
        assert [m.value for m in history] == pytest.approx([result.history[0][key]]), key


def test_total_rank_history_has_one_point_per_epoch(embedded_run):
    uri, result = embedded_run
    history = client_for(uri).get_metric_history(result.run_id, "total_rank")
    assert [m.step for m in history] == [1]


def test_final_metrics_match_the_run_result(embedded_run):
    uri, result = embedded_run
    metrics = client_for(uri).get_run(result.run_id).data.metrics
    assert metrics["test_accuracy"] == pytest.approx(result.test_accuracy)
    assert metrics["compression"] == pytest.approx(result.compression)
    assert metrics["compression"] == pytest.approx(result.dense_parameters / result.parameters)
    assert metrics["parameters"] == result.parameters
    assert metrics["train_seconds_per_batch"] == pytest.approx(result.train_seconds_per_batch)
    assert metrics["inference_seconds"] == pytest.approx(result.inference_seconds)
    assert metrics["train_seconds_per_batch"] > 0 and metrics["inference_seconds"] > 0
    assert 0.0 <= metrics["test_accuracy"] <= 100.0
    assert result.dense_parameters == 429_100 and result.compression > 1.0


def test_ranks_artifact_equals_the_run_result(embedded_run, tmp_path):
    uri, result = embedded_run
    client = client_for(uri)
    # pruned_model: a logged model
    assert [a.path for a in client.list_artifacts(result.run_id)] == ["model", "ranks.json"]
    assert [a.path for a in client.list_artifacts(result.run_id, "model")] == ["model/state_dict.pt"]
    local = client.download_artifacts(result.run_id, "ranks.json", str(tmp_path))
    assert json.loads(Path(local).read_text()) == result.ranks


# ---------------------------------------------------------------------------- determinism


def test_same_seed_gives_identical_results(embedded_run, registry, uri):
    _, first = embedded_run
    (second,) = run(prepare(tiny_config(registry, uri), registry))
    assert second.run_id != first.run_id
    assert second.test_accuracy == first.test_accuracy
    assert second.ranks == first.ranks
    assert len(second.history) == len(first.history) == 1
    for a, b in zip(first.history, second.history):
        assert set(a) == set(b)
        assert {k: v for k, v in a.items() if k not in TIMING_KEYS} == {
            k: v for k, v in b.items() if k not in TIMING_KEYS
        }


# ---------------------------------------------------------------------------- where runs go


def test_mlflow_tracking_uri_environment_variable_is_respected(tmp_path, uri, tiny_data, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    rc = main(["run", "--method", "ours", "--task", "lenet5", "--data-dir", str(tiny_data), *TINY_SETTINGS])
    out, err = capsys.readouterr()
    assert rc == 0, err
    (stored,) = all_runs(uri)
    assert stored.info.status == "FINISHED"
    assert f"tracking: {uri} " in out
    assert not (tmp_path / "rankbench-runs").exists()  # the default store was not used


def test_tracking_uri_option_beats_the_environment_variable(tmp_path, uri, tiny_data, monkeypatch, capsys):
    other = tmp_path / "other"
    other.mkdir()
    shutil.copyfile(tmp_path / "m.db", other / "env.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{other / 'env.db'}")
    rc = main(["run", "--method", "ours", "--task", "lenet5", "--data-dir", str(tiny_data), "--tracking-uri", uri,
               *TINY_SETTINGS])
    assert rc == 0, capsys.readouterr().err
    assert len(all_runs(uri)) == 1
    assert all_runs(f"sqlite:///{other / 'env.db'}") == []


def test_default_store_is_rankbench_runs_in_the_working_directory(tmp_path, store_template, tiny_data, monkeypatch,
                                                                   capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = tmp_path / "rankbench-runs"
    store.mkdir()
    shutil.copyfile(store_template, store / "mlflow.db")  # an empty store there already (saves the migration)
    rc = main(["run", "--method", "trn", "--task", "lenet5", "--data-dir", str(tiny_data), "--set", "rank=2",
               *TINY_SETTINGS])
    assert rc == 0, capsys.readouterr().err
    (stored,) = all_runs(f"sqlite:///{store / 'mlflow.db'}")
    assert stored.info.status == "FINISHED"
    assert (store / "artifacts").is_dir()
    assert list(store.glob("artifacts/**/ranks.json"))
    assert not (tmp_path / "mlruns").exists()


def test_explicit_store_writes_nothing_into_the_working_directory(tmp_path, store_template, tiny_data,
                                                                  monkeypatch, capsys):
    cwd, store = tmp_path / "cwd", tmp_path / "store"
    cwd.mkdir()
    store.mkdir()
    shutil.copyfile(store_template, store / "m.db")
    monkeypatch.chdir(cwd)
    rc = main(["run", "--method", "ours", "--task", "lenet5", "--data-dir", str(tiny_data),
               "--tracking-uri", f"sqlite:///{store / 'm.db'}", *TINY_SETTINGS])
    assert rc == 0, capsys.readouterr().err
    assert list(cwd.iterdir()) == []


# ---------------------------------------------------------------------------- several seeds, failures


def test_two_seeds_give_two_runs_and_a_mean_std_row(uri, tiny_data, capsys):
    rc = main(["run", "--method", "ours", "--task", "lenet5", "--data-dir", str(tiny_data), "--seeds", "0,1",
               "--tracking-uri", uri, *TINY_SETTINGS])
    out, err = capsys.readouterr()
    assert rc == 0, err
    runs = all_runs(uri)
    assert sorted(r.data.params["seed"] for r in runs) == ["0", "1"]
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert len({r.info.experiment_id for r in runs}) == 1
    assert "mean±std (n=2)" in out
    for r in runs:
        assert r.info.run_id in out
        assert r.info.run_id in err  # "run <id> (seed s)" progress lines


def test_a_failing_on_start_callback_does_not_leave_a_running_run(registry, uri, tiny_data):
    config = make_config(registry, "lenet5", "ours", {"epochs": 1, "initial_rank": 3, "val_size": 40},
                         tracking_uri=uri, data_dir=tiny_data, progress=False)

    def on_start(run_id, seed, params):
        raise RuntimeError("listener failed")

    with pytest.raises(RuntimeError, match="listener failed"):
        run(prepare(config, registry), on_start=on_start)
    statuses = [r.info.status for r in all_runs(uri)]
    assert statuses and "RUNNING" not in statuses


# ---------------------------------------------------------------------------- recipes


def test_full_data_uses_the_paper_recipe_and_explicit_keys_win(registry, uri, tiny_data):
    config = tiny_config(registry, uri, val_size=40)
    (paper,) = run(prepare(replace(config, options=replace(config.options, data_dir=tiny_data)), registry))
    params = client_for(uri).get_run(paper.run_id).data.params
    assert (params["recipe"], params["lr"]) == ("paper", "0.0005")
    (explicit,) = run(prepare(tiny_config(registry, uri, lr=2e-3), registry))
    params = client_for(uri).get_run(explicit.run_id).data.params
    assert (params["recipe"], params["lr"]) == ("embedded", "0.002")


def test_cli_prints_the_recipe_it_used(uri, capsys):
    assert main(["run", "--method", "dense", "--task", "lenet5", "--tracking-uri", uri, *TINY_SETTINGS[:2],
                 "--no-progress", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("recipe "))
    assert line.startswith("recipe embedded: epochs=1, batch_size=128, lr=0.001 (")


# ---------------------------------------------------------------------------- Tracker reads


def test_tracker_reads_back_a_run_of_the_python_api(embedded_run, tmp_path):
    from rankbench.run.tracking import Tracker

    uri, result = embedded_run
    tracker = Tracker(uri)
    stored = tracker.get_run(result.run_id)
    assert stored.info.status == "FINISHED"
    assert (stored.data.params["task"], stored.data.tags["method"]) == ("lenet5", "ours")
    assert stored.data.metrics["test_accuracy"] == pytest.approx(result.test_accuracy)
    assert "lenet5" in [e.name for e in tracker.experiments()]
    assert [r.info.run_id for r in tracker.runs(task="lenet5", method="ours")] == [result.run_id]
    assert tracker.runs(task="lenet5", method="dense") == []
    assert tracker.runs(study="none-such") == []
    history = tracker.metric_history(result.run_id, "val_accuracy")
    assert [(m.step, m.value) for m in history] == [(1, pytest.approx(result.history[0]["val_accuracy"]))]
    local = tracker.download_artifact(result.run_id, "ranks.json", tmp_path)
    assert local.parent == tmp_path and json.loads(local.read_text()) == result.ranks


def test_tracker_writes_and_reads_a_run_of_its_own(uri, tmp_path):
    from rankbench.run.tracking import Tracker

    tracker = Tracker(uri)
    run_id = tracker.start("exp", "a run", {"task": "t", "n": 3, "none": None}, {"study": "s", "method": "m"})
    assert tracker.get_run(run_id).info.status == "RUNNING"
    tracker.log_metrics(run_id, {"loss": 2.0}, step=2)
    tracker.log_metrics(run_id, {"loss": 3.0}, step=1)
    tracker.log_text(run_id, "hello", "notes/a.txt")
    (tmp_path / "plot.png").write_bytes(b"png")
    tracker.log_artifact(run_id, tmp_path / "plot.png", "plots")
    tracker.terminate(run_id, "KILLED")
    stored = tracker.get_run(run_id)
    assert stored.info.status == "KILLED"
    assert stored.data.params == {"task": "t", "n": "3", "none": "none"}
    assert [(m.step, m.value) for m in tracker.metric_history(run_id, "loss")] == [(1, 3.0), (2, 2.0)]
    assert tracker.download_artifact(run_id, "notes/a.txt").read_text() == "hello"
    assert tracker.download_artifact(run_id, "plots/plot.png").read_bytes() == b"png"
    assert tracker.runs(study="s") == []  # only FINISHED runs
    assert [r.info.run_id for r in tracker.runs(study="s", status="KILLED")] == [run_id]
    tracker.reopen(run_id)
    assert tracker.get_run(run_id).info.status == "RUNNING"
    tracker.finish(run_id)
    assert [r.info.run_id for r in tracker.runs(study="s", method="m")] == [run_id]


def test_tracker_read_failures_are_one_line_errors_naming_the_store(uri):
    from rankbench.errors import RankbenchError
    from rankbench.run.tracking import Tracker

    tracker = Tracker(uri)
    with pytest.raises(RankbenchError) as missing:
        tracker.get_run("nope")
    assert str(missing.value) == f"no run 'nope' in {uri}: check the run id and --tracking-uri"
    with pytest.raises(RankbenchError, match="no run 'nope'"):
        tracker.reopen("nope")
    run_id = tracker.start("exp", "a run", {}, {})
    with pytest.raises(RankbenchError) as artifact:
        tracker.download_artifact(run_id, "ranks.json")
    assert "ranks.json" in str(artifact.value) and uri in str(artifact.value)
    assert "\n" not in str(artifact.value)
    with pytest.raises(RankbenchError, match="names contain no quotes"):
        tracker.runs(task="it's")


def test_only_the_tracker_talks_to_mlflow():
    """Every MLflow read and write goes through ``rankbench.run.tracking.Tracker``."""
    import re

    package = Path(rankbench.__file__).parent
    pattern = re.compile(r"MlflowClient|mlflow\.tracking|(?<!http)\.client\b|\._client\b")
    offenders = [f"{path.relative_to(package.parent)}:{number}: {line.strip()}"
                 for path in sorted(package.rglob("*.py")) if path != package / "run" / "tracking.py"
                 for number, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert offenders == []


def test_logging_models_from_several_threads_leaves_mlflows_process_state_as_it_found_it(tmp_path, monkeypatch):
    import threading

    from mlflow.tracking._tracking_service import utils

    from rankbench.run.tracking import Tracker

    user_store = f"sqlite:///{tmp_path / 'user.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", user_store)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    tracker = Tracker(f"sqlite:///{tmp_path / 'runs.db'}")
    experiment = tracker.experiment_id("threads")
    run_ids = [tracker.start("threads", f"r{i}", {}, {}) for i in range(4)]
    errors = []

    def log(run_id):
        try:
            tracker.log_pytorch_model(run_id, torch.nn.Linear(3, 2), input_example=torch.zeros(2, 3))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=log, args=(run_id,)) for run_id in run_ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == []
    assert utils._tracking_uri is None
    assert os.environ["MLFLOW_TRACKING_URI"] == user_store and "MLFLOW_EXPERIMENT_ID" not in os.environ
    models = tracker._client.search_logged_models(experiment_ids=[experiment])
    assert sorted(m.source_run_id for m in models) == sorted(run_ids)
