"""Reliability promises (README "Reliability"): a new store survives concurrent first use, store
write failures are one-line errors that keep what was logged, argument errors come before any
work, reading commands never create a store, and no input gives a traceback."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import assert_one_line_error, make_tiny_mnist
from rankbench.cli import main

TINY_RUN = ["--method", "ours", "--task", "mlp2", "--set", "val_size=40", "--set", "initial_rank=3",
            "--epochs", "1", "--no-progress", "--device", "cpu", "--threads", "1"]


def statuses(uri: str) -> list[str]:
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    ids = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    return sorted(r.info.status for r in client.search_runs(ids, run_view_type=ViewType.ALL)) if ids else []


# ---------------------------------------------------------------------------- concurrent first use


def test_four_runs_started_together_on_a_new_store_all_finish_and_all_reach_the_report(tmp_path):
    data = make_tiny_mnist(tmp_path / "data")
    uri = f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}"
    (tmp_path / "new").mkdir()
    exe = shutil.which("rankbench") or str(Path(sys.executable).parent / "rankbench")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([exe, "run", *TINY_RUN, "--data-dir", str(data), "--tracking-uri", uri,
                               "--seeds", str(seed)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for seed in range(4)]
    outcomes = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert [rc for rc, _ in outcomes] == [0, 0, 0, 0], [err[-2000:] for _, err in outcomes]
    assert statuses(uri) == ["FINISHED"] * 4
    report = subprocess.run([exe, "report", "--tracking-uri", uri, "--format", "csv"], capture_output=True,
                            text=True, timeout=120, cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    (row,) = [line for line in report.stdout.splitlines() if line.startswith("mlp2,")]
    assert ",ours," in row and ",4," in row  # one row, four seeds


# ---------------------------------------------------------------------------- checkpoint and resume

SLOW = Path(__file__).resolve().parent / "plugins_slow"


def resume_argv(data: Path, uri: str) -> list[str]:
    return ["run", "--plugin-dir", str(SLOW), "--method", "slow_ours", "--task", "mlp2", "--set", "val_size=40",
            "--set", "batch_size=16", "--set", "initial_rank=3", "--set", "lambda=5", "--epochs", "4",
            "--seeds", "0", "--data-dir", str(data), "--tracking-uri", uri, "--no-progress", "--device", "cpu",
            "--threads", "1"]


def run_outcome(uri: str, run_id: str, root: Path) -> dict:
    import json

    import torch
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    folder = root / run_id
    folder.mkdir()
    state = torch.load(client.download_artifacts(run_id, "model/state_dict.pt", str(folder)))
    history = {key: [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]
               for key in ("val_loss", "train_loss", "compression")}
    return {"status": run.info.status, "test_accuracy": run.data.metrics["test_accuracy"],
            "ranks": json.loads(Path(client.download_artifacts(run_id, "ranks.json", str(folder))).read_text()),
            "state": {k: v.numpy().tobytes() for k, v in state.items()},
            "history": {k: sorted(set(v)) for k, v in history.items()}}


def test_a_run_killed_in_epoch_3_of_4_resumes_to_the_same_result_as_an_uninterrupted_run(tmp_path, capsys):
    import signal

    import torch

    data = make_tiny_mnist(tmp_path / "data")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exe = shutil.which("rankbench") or str(Path(sys.executable).parent / "rankbench")
    proc = subprocess.Popen([exe, *resume_argv(data, uri)], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    checkpoints = tmp_path / "checkpoints"
    deadline = time.monotonic() + 240
    try:
        while True:
            found = list(checkpoints.glob("*.pt")) if checkpoints.is_dir() else []
            if found and torch.load(found[0], weights_only=False)["epoch"] >= 2:
                break
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "no checkpoint after epoch 2"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)  # in epoch 3 (an epoch takes about half a second)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    run_id = found[0].stem
    assert torch.load(found[0], weights_only=False)["epoch"] == 2
    assert statuses(uri) == ["RUNNING"]
    capsys.readouterr()
    assert main(["report", "--tracking-uri", uri]) == 2  # no finished run yet, but the dead one is found
    died = capsys.readouterr().err.splitlines()[0]
    assert f"run {run_id} (mlp2, slow_ours, seed 0) had died" in died and f"--resume {run_id}" in died
    assert statuses(uri) == ["FAILED"]

    assert main([*resume_argv(data, uri), "--resume", run_id]) == 0, capsys.readouterr().err
    assert main(resume_argv(data, uri)) == 0, capsys.readouterr().err  # the same run, uninterrupted
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    (other,) = [r.info.run_id for r in client.search_runs([client.get_experiment_by_name("mlp2").experiment_id])
                if r.info.run_id != run_id]
    resumed, uninterrupted = run_outcome(uri, run_id, tmp_path), run_outcome(uri, other, tmp_path)
    assert resumed["status"] == uninterrupted["status"] == "FINISHED"
    assert resumed["test_accuracy"] == uninterrupted["test_accuracy"]
    assert resumed["ranks"] == uninterrupted["ranks"]
    assert resumed["state"] == uninterrupted["state"]  # every tensor bit for bit
    assert resumed["history"] == uninterrupted["history"]
    assert not list(checkpoints.glob("*.pt"))  # finished runs keep no checkpoint


def test_a_run_on_the_embedded_digits_resumes(tmp_path, uri, monkeypatch, capsys):
    """The recorded ``dataset`` is the data's name (``mnist-embedded-5k``), not the ``dataset`` setting
    (``mnist``): resuming compares like with like."""
    import rankbench.run.tracking

    real_log = rankbench.run.tracking.Tracker.log_metrics
    argv = ["run", "--method", "ours", "--task", "mlp2", "--set", "initial_rank=3", "--set", "batch_size=500",
            "--epochs", "3", "--no-progress", "--device", "cpu", "--threads", "1", "--tracking-uri", uri]

    def interrupt_in_epoch_2(self, run_id, metrics, step=None):
        if step == 2:
            raise KeyboardInterrupt
        return real_log(self, run_id, metrics, step)

    with monkeypatch.context() as mp:
        mp.setattr(rankbench.run.tracking.Tracker, "log_metrics", interrupt_in_epoch_2)
        assert main(argv) == 130
    run_id = capsys.readouterr().err.split("run ")[1].split()[0]
    assert main([*argv, "--resume", run_id]) == 0, capsys.readouterr().err
    assert statuses(uri) == ["FINISHED"]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    assert client.get_run(run_id).data.params["data_name"] == "mnist-embedded-5k"
    assert client.get_run(run_id).data.params["dataset"] == "mnist"  # the hyperparameter, not overwritten
    assert [m.step for m in client.get_metric_history(run_id, "val_accuracy")] == [1, 2, 3]


def test_of_several_interrupted_attempts_at_a_seed_the_furthest_is_continued(tmp_path, uri, monkeypatch, capsys):
    import rankbench.run.tracking
    from rankbench.plugins.registry import Registry
    from rankbench.run.config import make_config
    from rankbench.run.experiment import run
    from rankbench.run.prepare import prepare

    real_log = rankbench.run.tracking.Tracker.log_metrics
    registry = Registry.discover()
    config = make_config(registry, "mlp2", "ours", {"initial_rank": 3, "batch_size": 500}, epochs=4,
                         tracking_uri=uri, progress=False, threads=1)
    prepared = prepare(config, registry)
    attempts = []

    def interrupted_at(stop: int):
        def log_metrics(self, run_id, metrics, step=None):
            if step == stop:
                raise KeyboardInterrupt
            return real_log(self, run_id, metrics, step)
        return log_metrics

    for stop in (2, 3):  # interrupted in epoch 2 (checkpoint of epoch 1), then in epoch 3 (of epoch 2)
        with monkeypatch.context() as mp:
            mp.setattr(rankbench.run.tracking.Tracker, "log_metrics", interrupted_at(stop))
            with pytest.raises(KeyboardInterrupt):
                run(prepared, on_start=lambda run_id, seed, params: attempts.append(run_id))
    (result,) = run(prepared, earlier={0: attempts})
    assert result.run_id == attempts[1]  # two epochs logged beats one
    from mlflow.tracking import MlflowClient

    history = MlflowClient(tracking_uri=uri).get_metric_history(attempts[1], "val_accuracy")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]


def test_resume_refuses_a_finished_run_and_a_different_command(tmp_path, capsys):
    data = make_tiny_mnist(tmp_path / "data")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = ["run", *TINY_RUN, "--data-dir", str(data), "--tracking-uri", uri]
    assert main(argv) == 0
    out = capsys.readouterr()
    run_id = next(line.split()[1] for line in out.err.splitlines() if line.startswith("run "))
    assert main([*argv, "--resume", run_id]) == 2
    assert "has finished" in assert_one_line_error(capsys.readouterr().err)
    assert main([*argv, "--resume", "0" * 32]) == 2
    assert "no run" in assert_one_line_error(capsys.readouterr().err)


# ---------------------------------------------------------------------------- store write failures


def _chattr(flag: str, path: Path) -> bool:
    return shutil.which("chattr") is not None and subprocess.run(["chattr", flag, str(path)],
                                                                  capture_output=True).returncode == 0


def run_into(database: Path, tmp_path: Path, capsys) -> tuple[int, str]:
    """A tiny run tracked in ``database``: its exit code and its one-line error."""
    rc = main(["run", *TINY_RUN, "--data-dir", str(make_tiny_mnist(tmp_path / "data")),
               "--tracking-uri", f"sqlite:///{database}"])
    return rc, assert_one_line_error(capsys.readouterr().err)


def test_an_immutable_store_file_is_a_one_line_error_and_the_store_is_unchanged(tmp_path, store_template, capsys):
    database = tmp_path / "mlflow.db"
    shutil.copyfile(store_template, database)
    if not _chattr("+i", database):
        pytest.skip("chattr +i is not available here (needs root and a filesystem with file attributes)")
    try:
        before = database.read_bytes()
        rc, line = run_into(database, tmp_path, capsys)
        assert rc == 2
        assert str(database) in line and "readonly" in line.lower().replace(" ", "")
        assert database.read_bytes() == before
    finally:
        _chattr("-i", database)


def test_a_read_only_store_folder_is_a_one_line_error_naming_the_store(tmp_path, store_template, capsys):
    folder = tmp_path / "store"
    folder.mkdir()
    database = folder / "mlflow.db"
    shutil.copyfile(store_template, database)
    if not _chattr("+i", folder):
        pytest.skip("chattr +i is not available here (needs root and a filesystem with file attributes)")
    try:
        before = database.read_bytes()
        rc, line = run_into(database, tmp_path, capsys)
        assert rc == 2 and str(database) in line and "writable" in line
        assert database.read_bytes() == before
        assert sorted(p.name for p in folder.iterdir()) == ["mlflow.db"]
    finally:
        _chattr("-i", folder)


MIDRUN_PRELUDE = """
import subprocess, sys
import rankbench.run.tracking as tracking
real = tracking.Tracker.log_metrics
def log_metrics(self, run_id, metrics, step=None):  # epoch 1 is logged, then the database becomes unwritable
    real(self, run_id, metrics, step)
    subprocess.run(["chattr", "+i", self.uri[len("sqlite:///"):]], check=True)
tracking.Tracker.log_metrics = log_metrics
from rankbench.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_store_that_becomes_unwritable_mid_run_is_one_line_and_the_run_is_marked_dead_once_readable(
        tmp_path, store_template, capsys):
    database = tmp_path / "mlflow.db"
    shutil.copyfile(store_template, database)
    if not _chattr("+i", database) or not _chattr("-i", database):
        pytest.skip("chattr +i is not available here (needs root and a filesystem with file attributes)")
    uri = f"sqlite:///{database}"
    try:
        proc = subprocess.run([sys.executable, "-c", MIDRUN_PRELUDE, "run", *TINY_RUN, "--epochs", "3",
                               "--data-dir", str(make_tiny_mnist(tmp_path / "data")), "--tracking-uri", uri],
                              cwd=tmp_path, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    finally:
        _chattr("-i", database)
    started, error = proc.stderr.strip().splitlines()  # "run RUN_ID (seed 0)", then the error
    line = assert_one_line_error(error)
    assert proc.returncode == 2 and str(database) in line and "metrics" in line
    assert "disk I/O error" in line or "readonly" in line.replace(" ", "")
    assert statuses(uri) == ["RUNNING"]  # the store could not take FAILED while unwritable
    assert main(["report", "--tracking-uri", uri]) == 2  # no finished run; the dead one is found and marked
    run_id = started.split()[1]
    assert f"run {run_id} (mlp2, ours, seed 0) had died" in capsys.readouterr().err
    assert statuses(uri) == ["FAILED"]
    from mlflow.tracking import MlflowClient

    history = MlflowClient(tracking_uri=uri).get_metric_history(run_id, "val_accuracy")
    assert [m.step for m in history] == [1]  # what was logged before the failure is kept


def test_a_full_disk_while_saving_artifacts_is_a_one_line_error_and_the_run_is_marked_failed(tmp_path, capsys):
    """The store's database lives on a normal folder, its artifacts on a 256 KiB tmpfs that the
    trained weights (and pruned model) overflow."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tiny tmpfs needs root")
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(small)],
                      capture_output=True).returncode != 0:
        pytest.skip("mount -t tmpfs is not permitted here (a container without CAP_SYS_ADMIN)")
    try:
        store = tmp_path / "store"
        store.mkdir()
        (store / "artifacts").symlink_to(small, target_is_directory=True)
        uri = f"sqlite:///{store / 'mlflow.db'}"
        rc = main(["run", "--method", "ours", "--task", "lenet5", "--set", "val_size=40", "--epochs", "1",
                   "--no-progress", "--device", "cpu", "--data-dir", str(make_tiny_mnist(tmp_path / "data")),
                   "--tracking-uri", uri])
        err = capsys.readouterr().err
        started, error = err.strip().splitlines()  # "run RUN_ID (seed 0)", then the error
        assert started.startswith("run ") and "Traceback" not in err
        line = assert_one_line_error(error)
        assert rc == 2 and str(store / "mlflow.db") in line and "No space left on device" in line
        assert statuses(uri) == ["FAILED"]
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
        assert "val_accuracy" in run.data.metrics  # what was logged before the failure is kept
    finally:
        subprocess.run(["umount", str(small)], capture_output=True)


# ---------------------------------------------------------------------------- argument errors first


@pytest.mark.parametrize("extra, words", [
    (["--device", "cuda:7"], ["--device cuda:7"]),
    (["--tracking-uri", "sqlite:////nonexistent/folder/mlflow.db"], ["/nonexistent/folder", "does not exist"]),
    (["--data-dir", "/nonexistent/data"], ["--data-dir /nonexistent/data"]),
])
def test_argument_errors_come_before_any_work_and_leave_nothing_behind(extra, words, tmp_path, monkeypatch,
                                                                       capsys):
    monkeypatch.chdir(tmp_path)
    loaded = []
    import rankbench.run.prepare

    monkeypatch.setattr(rankbench.run.prepare, "prepare", lambda *a, **k: loaded.append(1))
    assert main(["run", "--method", "ours", "--task", "lenet5", *extra]) == 2
    line = assert_one_line_error(capsys.readouterr().err)
    assert all(w in line for w in words), line
    assert loaded == [] and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv", [["report"], ["export", "0123abcd", "--out", "model.pt"], ["study", "--list"],
                                  ["study", "show", "nope"]])
def test_reading_commands_never_create_a_store(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(argv) == 2
    assert "no " in assert_one_line_error(capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------- no input gives a traceback

KEYS = st.sampled_from(["lambda", "sigma", "rank", "epochs", "lr", "batch_size", "initial_rank", "decomposition",
                        "dataset", "val_size", "selector_lr", "target_compression", "nope", "", " "])
VALUES = st.one_of(st.sampled_from(["", "none", "-1", "0", "1e309", "nan", "inf", "abc", "tr", "tt", "1", "0.5",
                                    "true", "=", "1,2", "mnist", "kmnist"]),
                   st.text(max_size=12))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pairs=st.lists(st.tuples(KEYS, VALUES, st.booleans()), max_size=4))
def test_random_set_strings_exit_2_with_one_line_or_pass_validation(pairs, capsys, monkeypatch, tmp_path):
    """Every ``--set`` a user can type: a one-line error (exit 2) or a valid config; never a traceback."""
    from rankbench.errors import RankbenchError
    from rankbench.plugins.registry import Registry
    from rankbench.run.config import make_config

    registry = Registry.discover(entry_point_groups=False)
    assignments = [f"{k}={v}" if eq else f"{k}{v}" for k, v, eq in pairs]
    try:
        make_config(registry, "lenet5", "ours", assignments)
    except RankbenchError as exc:
        assert str(exc) and "\n" not in str(exc)
    monkeypatch.chdir(tmp_path)
    argv = ["run", "--method", "trn", "--task", "lenet5", "--device", "nope"]  # stops before any work
    for item in assignments:
        argv += ["--set", item]
    capsys.readouterr()
    assert main(argv) == 2
    assert_one_line_error(capsys.readouterr().err)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.sampled_from([
    'name = "x"', 'name = ""', 'task = "mlp2"', 'task = "nope"', 'tasks = []', 'methods = ["ours"]',
    'methods = "ours"', 'seeds = [-1]', 'budget_steps = 0', "budget_steps = 5", "[search.lambda]",
    "grid = []", "grid = [0.1, 1.0]", "low = 1", "high = 0", "[objectives]", 'val_accuracy = "maximize"',
    'test_accuracy = "maximize"', 'val_accuracy = "up"', "[sampler]", 'name = "grid"', 'name = "annealing"',
    "[method_search.trn]", "rank = { grid = [2, 3] }", "[budget]", "n_trials = 0", "= broken", "[[x]]",
]), max_size=10))
def test_random_study_files_are_one_line_errors_or_valid(lines, tmp_path, capsys):
    from rankbench.errors import RankbenchError
    from rankbench.plugins.registry import Registry
    from rankbench.study.spec import load_study_file

    path = tmp_path / "study.toml"
    path.write_text("\n".join(lines) + "\n")
    try:
        load_study_file(path, Registry.discover(entry_point_groups=False))
    except RankbenchError as exc:
        assert str(exc) and "\n" not in str(exc)
