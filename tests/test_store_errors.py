"""Store trouble names the right fix, in one line, quickly: stores that are no store, damaged, of a
newer MLflow, a folder or an absent server; deleted or over-long experiments; runs that did not
finish; unwritable ``--out``; unknown ``--group-by``. And runs that died on any machine are found by
their heartbeat, not left RUNNING forever."""

from __future__ import annotations

import os
import shutil
import socket
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from helpers import assert_one_line_error, interrupting_log_metrics, make_tiny_mnist
from rankbench.cli import main
from rankbench.errors import RankbenchError
from rankbench.run.tracking import HEARTBEAT_TAG, HOST_TAG, PID_TAG, Tracker

QUICK_S = 10.0
"""Store errors come at once: a bound on correctness (MLflow's own retries took minutes), not a benchmark."""


def tiny_run(data: Path, uri: str, *extra: str, method: str = "ours") -> list[str]:
    return ["run", "--method", method, "--task", "mlp2", "--set", "val_size=40", "--set", "initial_rank=3",
            "--epochs", "1", "--seeds", "0", "--no-progress", "--device", "cpu", "--threads", "1",
            "--data-dir", str(data), "--tracking-uri", uri, *extra]


def run_id_of(err: str) -> str:
    return next(line.split()[1] for line in err.splitlines() if line.startswith("run "))


def error_of(capsys) -> str:
    return assert_one_line_error(capsys.readouterr().err)


def timed(argv: list[str]) -> tuple[int, float]:
    start = time.monotonic()
    rc = main(argv)
    return rc, time.monotonic() - start


@pytest.fixture
def data(tmp_path) -> Path:
    return make_tiny_mnist(tmp_path / "data")


@pytest.fixture(scope="module")
def finished(tmp_path_factory, store_template) -> tuple[str, str, Path]:
    """A store with one finished tiny run of ours: (uri, run id, folder)."""
    folder = tmp_path_factory.mktemp("finished")
    shutil.copyfile(store_template, folder / "m.db")
    uri = f"sqlite:///{folder / 'm.db'}"
    assert main(tiny_run(make_tiny_mnist(folder / "data"), uri)) == 0
    (run,) = Tracker(uri).runs()
    return uri, run.info.run_id, folder


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _running_run(tracker: Tracker, tags: dict[str, str], seed: int = 0) -> str:
    return tracker.start("mlp2", f"ours-seed{seed}", {"task": "mlp2", "method": "ours", "seed": seed},
                         {"task": "mlp2", "method": "ours", **tags})


def _status(tracker: Tracker, run_id: str) -> str:
    return tracker.get_run(run_id).info.status


# ---------------------------------------------------------------------------- heartbeat


def test_a_heartbeat_thread_and_metric_logging_share_one_sqlite_tracker(uri):
    tracker = Tracker(uri)
    run_id = tracker.start("exp", "beating", {}, {})
    with tracker.heartbeat(run_id, interval_s=0.05) as beat:
        first = float(tracker.get_run(run_id).data.tags[HEARTBEAT_TAG])
        start = time.monotonic()
        for step in range(200):
            tracker.log_metrics(run_id, {"loss": 1.0 / (step + 1), "acc": float(step)}, step=step)
        while beat.beats < 3 and time.monotonic() - start < 30:  # the writes take turns (one lock): a few beats
            time.sleep(0.01)
    last = float(tracker.get_run(run_id).data.tags[HEARTBEAT_TAG])
    assert beat.failed == 0 and beat.beats >= 3
    assert last > first and abs(time.time() - last) < 60
    assert len(tracker.metric_history(run_id, "loss")) == 200
    assert beat._thread is None  # stopped and joined
    time.sleep(0.2)
    assert float(tracker.get_run(run_id).data.tags[HEARTBEAT_TAG]) == last  # no beat after exit


def test_the_heartbeat_interval_comes_from_the_environment(uri, monkeypatch):
    tracker = Tracker(uri)
    run_id = tracker.start("exp", "beating", {}, {})
    assert tracker.heartbeat(run_id).interval_s == 30.0
    monkeypatch.setenv("RANKBENCH_HEARTBEAT_INTERVAL", "0.25")
    assert tracker.heartbeat(run_id).interval_s == 0.25
    assert tracker.heartbeat(run_id, interval_s=2).interval_s == 2.0
    monkeypatch.setenv("RANKBENCH_HEARTBEAT_INTERVAL", "soon")
    with pytest.raises(RankbenchError, match="RANKBENCH_HEARTBEAT_INTERVAL=soon: give a positive number"):
        tracker.heartbeat(run_id)


def test_report_marks_a_run_silent_on_another_host_failed_and_leaves_the_others_running(uri, monkeypatch,
                                                                                       capsys):
    monkeypatch.setenv("RANKBENCH_HEARTBEAT_GRACE", "60")
    tracker = Tracker(uri)
    now = time.time()
    elsewhere = {PID_TAG: "4242", HOST_TAG: "gpu-node-7"}
    stale = _running_run(tracker, {**elsewhere, HEARTBEAT_TAG: f"{now - 600:.3f}"}, seed=0)
    fresh = _running_run(tracker, {**elsewhere, HEARTBEAT_TAG: f"{now - 5:.3f}"}, seed=1)
    silent_old = _running_run(tracker, elsewhere, seed=2)  # no heartbeat tag: an older rankbench, unknown
    no_pid_here = _running_run(tracker, {HOST_TAG: socket.gethostname(), HEARTBEAT_TAG: f"{now - 600:.3f}"}, seed=3)
    alive_here = _running_run(tracker, {PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname(),
                                        HEARTBEAT_TAG: f"{now - 600:.3f}"}, seed=4)  # the pid check rules
    assert main(["report", "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    died = {line.split()[2]: line for line in err if "had died" in line}
    assert set(died) == {stale, no_pid_here}, err
    assert "no heartbeat from gpu-node-7 for 6" in died[stale] and "marked FAILED" in died[stale]
    assert f"no heartbeat from {socket.gethostname()}" in died[no_pid_here]
    assert {run_id: _status(tracker, run_id) for run_id in (stale, fresh, silent_old, no_pid_here, alive_here)} == {
        stale: "FAILED", fresh: "RUNNING", silent_old: "RUNNING", no_pid_here: "FAILED", alive_here: "RUNNING"}
    assert tracker.get_run(stale).data.tags["failure_reason"].startswith("no heartbeat from gpu-node-7 for ")


def test_a_resumed_run_is_not_judged_by_the_heartbeat_of_its_dead_attempt(uri, monkeypatch):
    monkeypatch.setenv("RANKBENCH_HEARTBEAT_GRACE", "60")
    tracker = Tracker(uri)
    run_id = _running_run(tracker, {PID_TAG: "4242", HOST_TAG: "gpu-node-7", HEARTBEAT_TAG: f"{time.time() - 600:.3f}"})
    (dead,) = tracker.mark_dead_runs()
    assert dead.info.status == "FAILED" and dead.data.tags["failure_reason"].startswith("no heartbeat from gpu-node-7")
    tracker.reopen(run_id, {PID_TAG: "77", HOST_TAG: "gpu-node-8"})  # resumed on another machine
    resumed = tracker.get_run(run_id)
    assert resumed.info.status == "RUNNING" and "failure_reason" not in resumed.data.tags
    assert Tracker.death_reason(resumed) is None and tracker.mark_dead_runs() == []


def test_a_dead_process_on_this_host_is_named_as_the_cause(uri, capsys):
    tracker = Tracker(uri)
    pid = _dead_pid()
    run_id = _running_run(tracker, {PID_TAG: str(pid), HOST_TAG: socket.gethostname()})
    assert main(["report", "--tracking-uri", uri]) == 2
    died = capsys.readouterr().err.splitlines()[0]
    assert f"run {run_id} " in died and f"process {pid} on {socket.gethostname()} is gone" in died
    assert _status(tracker, run_id) == "FAILED"


# ---------------------------------------------------------------------------- died runs: how to go on


def test_a_run_that_died_before_its_first_epoch_is_started_again_not_resumed(uri, capsys):
    tracker = Tracker(uri)
    no_epoch = _running_run(tracker, {PID_TAG: str(_dead_pid()), HOST_TAG: socket.gethostname()}, seed=0)
    with_checkpoint = _running_run(tracker, {PID_TAG: str(_dead_pid()), HOST_TAG: socket.gethostname()}, seed=1)
    tracker.log_metrics(with_checkpoint, {"val_accuracy": 10.0}, step=1)
    checkpoint = tracker.checkpoint_path(with_checkpoint)
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.write_bytes(b"epoch 1")
    assert main(["report", "--tracking-uri", uri]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    (first,) = [line for line in lines if f"run {no_epoch} " in line]
    (second,) = [line for line in lines if f"run {with_checkpoint} " in line]
    assert "it finished no epoch" in first and "without --resume" in first and "--resume " + no_epoch not in first
    assert f"--resume {with_checkpoint}" in second
    assert "no finished runs" in assert_one_line_error(lines[-1])


def test_a_resumed_run_that_finishes_keeps_no_failure_reason(tmp_path, uri, data, monkeypatch, capsys):
    import rankbench.run.tracking

    argv = tiny_run(data, uri)
    argv[argv.index("--epochs") + 1] = "2"


    with monkeypatch.context() as mp:
        mp.setattr(rankbench.run.tracking.Tracker, "log_metrics", interrupting_log_metrics(2))
        assert main(argv) != 0
    run_id = run_id_of(capsys.readouterr().err)
    tracker = Tracker(uri)
    assert tracker.get_run(run_id).data.tags["failure_reason"] == "interrupted"
    assert main([*argv, "--resume", run_id]) == 0, capsys.readouterr().err
    stored = tracker.get_run(run_id)
    assert stored.info.status == "FINISHED"
    assert "failure_reason" not in stored.data.tags


# ---------------------------------------------------------------------------- stores that are no store


def test_a_file_that_is_not_sqlite_is_named_as_such(tmp_path, data, capsys):
    database = tmp_path / "notes.db"
    database.write_text("my notes, not a database\n" * 50)
    for argv in (["report", "--tracking-uri", f"sqlite:///{database}"], tiny_run(data, f"sqlite:///{database}")):
        assert main(argv) == 2
        line = error_of(capsys)
        assert f"{database} is not an MLflow SQLite store, or it is damaged" in line
        assert "--tracking-uri" in line and "writable" not in line


def test_a_damaged_store_is_named_as_such(tmp_path, store_template, capsys):
    database = tmp_path / "m.db"
    raw = bytearray(store_template.read_bytes())
    raw[4096:] = b"\x5a" * (len(raw) - 4096)  # the header survives, every page after it is garbage
    database.write_bytes(bytes(raw))
    assert main(["report", "--tracking-uri", f"sqlite:///{database}"]) == 2
    line = error_of(capsys)
    assert "damaged" in line and "--tracking-uri" in line and "writable" not in line


def _set_schema(database: Path, revision: str) -> None:
    with sqlite3.connect(database) as db:
        db.execute("UPDATE alembic_version SET version_num = ?", (revision,))


def test_a_store_of_a_newer_mlflow_says_upgrade_mlflow_not_the_store(tmp_path, store_template, data, capsys):
    database = tmp_path / "m.db"
    shutil.copyfile(store_template, database)
    _set_schema(database, "ffffffffffff")  # no such revision in the installed MLflow: a newer one wrote it
    for argv in (["report", "--tracking-uri", f"sqlite:///{database}"], tiny_run(data, f"sqlite:///{database}")):
        assert main(argv) == 2
        line = error_of(capsys)
        assert "newer MLflow" in line and "pip install -U mlflow" in line and "another store" in line
        assert "db upgrade" not in line and "writable" not in line


def test_a_store_of_an_older_mlflow_says_upgrade_the_store(tmp_path, store_template, capsys):
    database = tmp_path / "m.db"
    shutil.copyfile(store_template, database)
    _set_schema(database, "451aebb31d03")  # MLflow 1.x's schema
    assert main(["report", "--tracking-uri", f"sqlite:///{database}"]) == 2
    line = error_of(capsys)
    assert "older MLflow schema" in line and f"mlflow db upgrade sqlite:///{database}" in line
    assert "pip install" not in line


def test_a_folder_as_sqlite_store_is_an_error_at_once(tmp_path, data, capsys):
    folder = tmp_path / "store"
    folder.mkdir()
    for argv in (["report", "--tracking-uri", f"sqlite:///{folder}"], tiny_run(data, f"sqlite:///{folder}")):
        rc, seconds = timed(argv)
        line = error_of(capsys)
        assert rc == 2 and seconds < QUICK_S, (seconds, line)
        assert f"{folder} is a folder: give the database file, e.g. --tracking-uri sqlite:///{folder / 'mlflow.db'}" \
            in line
    assert list(folder.iterdir()) == []


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_tracking_server_that_is_not_there_is_an_error_within_seconds(data, monkeypatch, capsys):
    limits = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
              "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER")
    for name in limits:
        monkeypatch.delenv(name, raising=False)
    server = f"http://127.0.0.1:{_free_port()}"
    for argv in (["report", "--tracking-uri", server], tiny_run(data, server)):
        rc, seconds = timed(argv)
        line = error_of(capsys)
        assert rc == 2 and seconds < QUICK_S, (seconds, line)
        assert f"cannot reach tracking server {server}" in line and "server is running" in line
    assert not [name for name in limits if name in os.environ]  # MLflow's own retries again for real runs


# ---------------------------------------------------------------------------- experiments


def test_a_deleted_experiment_says_how_to_restore_it(uri, data, capsys):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment("paper")
    client.delete_experiment(experiment_id)
    assert main(tiny_run(data, uri, "--experiment", "paper")) == 2
    line = error_of(capsys)
    assert f"--experiment paper: that MLflow experiment (id {experiment_id}) is deleted" in line
    assert f"MLFLOW_TRACKING_URI={uri} mlflow experiments restore --experiment-id {experiment_id}" in line
    assert "choose another --experiment" in line and "writable" not in line


def test_an_experiment_name_over_mlflows_limit_names_the_limit(uri, data, capsys):
    with pytest.raises(RankbenchError) as error:
        Tracker(uri).start("x" * 501, "a run", {}, {})
    assert "501 characters, MLflow allows at most 500" in str(error.value)
    assert "writable" not in str(error.value)
    assert main(tiny_run(data, uri, "--experiment", "x" * 501)) == 2  # the config may catch it first: either says so
    line = error_of(capsys)
    assert "500" in line and "--experiment" in line and "writable" not in line


# ---------------------------------------------------------------------------- export


@pytest.mark.parametrize("status, tags, advice", [
    ("FAILED", {}, "resume it with its own command line and --resume {run_id}"),
    ("KILLED", {}, "resume it with its own command line and --resume {run_id}"),
    ("RUNNING", {}, "resume it with its own command line and --resume {run_id}"),
    ("KILLED", {"study": "s1"}, "run its study file again (study s1)"),
])
def test_exporting_an_unfinished_run_says_it_did_not_finish(uri, capsys, status, tags, advice):
    tracker = Tracker(uri)
    run_id = tracker.start("mlp2", "ours-seed0", {"task": "mlp2", "method": "ours", "seed": 0},
                           {"task": "mlp2", "method": "ours", **tags})
    if status != "RUNNING":
        tracker.terminate(run_id, status)
    assert main(["export", run_id, "--out", "model.pt", "--tracking-uri", uri]) == 2
    line = error_of(capsys)
    assert f"run {run_id} did not finish (status {status}): only finished runs have weights" in line
    assert advice.format(run_id=run_id) in line and "0.1" not in line
    assert not Path("model.pt").exists()


def test_export_to_a_folder_or_an_unwritable_path_is_a_one_line_error(finished, tmp_path, capsys):
    uri, run_id, _ = finished
    folder = tmp_path / "models"
    folder.mkdir()
    assert main(["export", run_id, "--out", str(folder), "--tracking-uri", uri]) == 2
    line = error_of(capsys)
    assert f"--out {folder}: is a folder: name the file to write, e.g. --out {folder / f'{run_id}.pt'}" in line
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file, not a folder")
    target = blocker / "model.pt"
    assert main(["export", run_id, "--out", str(target), "--tracking-uri", uri]) == 2
    line = error_of(capsys)
    assert f"--out {target}: cannot write it ({blocker} is a file, not a folder)" in line
    assert main(["export", run_id, "--out", str(folder / "model.pt"), "--tracking-uri", uri]) == 0
    assert (folder / "model.pt").is_file()


# ---------------------------------------------------------------------------- report options


def test_report_out_naming_a_file_is_a_one_line_error(finished, tmp_path, capsys):
    uri, _, _ = finished
    existing = tmp_path / "report.txt"
    existing.write_text("keep me")
    assert main(["report", "--tracking-uri", uri, "--out", str(existing)]) == 2
    line = error_of(capsys)
    assert f"--out {existing}: is a file: name a folder for the table and the figures" in line
    assert existing.read_text() == "keep me"


def test_an_unknown_group_by_lists_the_params_close_matches_first(finished, capsys):
    uri, _, _ = finished
    assert main(["report", "--tracking-uri", uri, "--group-by", "lamda"]) == 2
    line = error_of(capsys)
    assert "--group-by lamda: no selected run has that param: choose from lambda, " in line
    assert "sigma" in line and "epochs" in line and "seed" not in line.split("choose from")[1].split(", ")
    assert main(["report", "--tracking-uri", uri, "--group-by", "lambda", "--format", "csv"]) == 0
    capsys.readouterr()


def test_two_runs_recording_the_same_new_dataset_at_once_both_succeed(uri, monkeypatch):
    """A study's workers start their first runs together: the second insert of one dataset row loses
    the race (a UNIQUE constraint) and then finds the row the first one wrote."""
    from rankbench.run.tracking import Tracker

    tracker = Tracker(uri)
    first = tracker.start("mlp2", "a", {"seed": 0}, {})
    second = tracker.start("mlp2", "b", {"seed": 1}, {})
    tracker.log_dataset(first, "tiny", "abc", "here", {"train": 1})
    real = tracker._client.log_inputs
    calls = []

    def lost_race(run_id, datasets=None, **kwargs):
        calls.append(run_id)
        if len(calls) == 1:
            raise RuntimeError("(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id, "
                               "datasets.name, datasets.digest")
        return real(run_id, datasets, **kwargs)

    monkeypatch.setattr(tracker._client, "log_inputs", lost_race)
    tracker.log_dataset(second, "tiny", "abc", "here", {"train": 1})
    assert calls == [second, second]
    assert [i.dataset.name for i in tracker.get_run(second).inputs.dataset_inputs] == ["tiny"]
    monkeypatch.setattr(tracker._client, "log_inputs", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("other")))
    with pytest.raises(RankbenchError, match="cannot write the dataset input"):
        tracker.log_dataset(second, "tiny", "abc", "here", {"train": 1})
