"""One seed is one replicate, a stop signal or a full disk loses nothing, and a run is resumed once:
the run-side promises of README "Reliability" (SIGTERM, double Ctrl-C, checkpoint write failures,
resuming a live run, time over resumed attempts, checks before any allocation)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_reliability import TINY_RUN, resume_argv, run_outcome, statuses

from helpers import assert_one_line_error, interrupting_log_metrics, make_tiny_mnist
from rankbench.cli import main
from rankbench.errors import RankbenchError

EXE = shutil.which("rankbench") or str(Path(sys.executable).parent / "rankbench")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def runs(uri: str) -> list:
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    ids = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    return client.search_runs(ids, run_view_type=ViewType.ALL) if ids else []


def start_slow_run(data: Path, uri: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([EXE, *resume_argv(data, uri)], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV)


def wait_for_checkpoint(proc: subprocess.Popen, folder: Path, epoch: int, timeout: float = 240) -> Path:
    """The run's checkpoint once it holds ``epoch`` finished epochs."""
    import torch

    deadline = time.monotonic() + timeout
    while True:
        found = list(folder.glob("*.pt")) if folder.is_dir() else []
        if found:
            try:
                if torch.load(found[0], weights_only=False)["epoch"] >= epoch:
                    return found[0]
            except Exception:  # caught mid-rename
                pass
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline, f"no checkpoint of epoch {epoch}"
        time.sleep(0.02)


# ---------------------------------------------------------------------------- one seed, one replicate


@pytest.mark.parametrize("seeds, fragment", [
    ("0,0,0", "seed 0 is given twice"),
    ("0,1,1", "seed 1 is given twice"),
    (str(2**63), "out of range"),
    (str(2**32), "out of range"),
])
def test_repeated_or_out_of_range_seeds_are_refused_before_any_run(tmp_path, seeds, fragment, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rc = main(["run", "--method", "trn", "--task", "mlp2", "--epochs", "1", "--seeds", seeds, "--no-progress",
               "--tracking-uri", uri])
    assert rc == 2
    assert fragment in assert_one_line_error(capsys.readouterr().err)
    assert not (tmp_path / "mlflow.db").exists()


def test_a_study_refuses_repeated_seeds_on_its_command_line(tmp_path, capsys):
    rc = main(["study", "studies/mlp2_ranks.toml", "--seeds", "0,0", "--storage", f"sqlite:///{tmp_path / 'o.db'}"])
    assert rc == 2
    assert "seed 0 is given twice" in assert_one_line_error(capsys.readouterr().err)
    assert not list(tmp_path.iterdir())


def test_the_python_api_checks_seeds_and_contraction_like_the_command_line():
    from rankbench.plugins.registry import Registry
    from rankbench.run.config import make_config

    registry = Registry.discover()
    with pytest.raises(RankbenchError, match="given twice"):
        make_config(registry, "mlp2", "trn", seeds=(0, 0))
    with pytest.raises(RankbenchError, match="out of range"):
        make_config(registry, "mlp2", "trn", seeds=(2**40,))
    with pytest.raises(RankbenchError, match="--contraction fastest: choose auto, weight, input"):
        make_config(registry, "mlp2", "trn", contraction="fastest")


# ---------------------------------------------------------------------------- stop signals


def test_sigterm_checkpoints_marks_the_run_killed_with_its_resume_line_and_resumes_bit_for_bit(tmp_path, capsys):
    data = make_tiny_mnist(tmp_path / "data")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = start_slow_run(data, uri, tmp_path)
    try:
        checkpoint = wait_for_checkpoint(proc, tmp_path / "checkpoints", 2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    run_id = checkpoint.stem
    assert proc.returncode == 143, err
    last = err.strip().splitlines()[-1]
    assert last == (f"rankbench: interrupted by SIGTERM; run {run_id} (seed 0) is marked KILLED, finished runs are "
                    f"kept; continue it with its own command line and --resume {run_id}")
    assert "Traceback" not in err
    (run,) = runs(uri)
    assert run.info.status == "KILLED" and run.data.tags["failure_reason"] == "interrupted by SIGTERM"
    assert checkpoint.is_file()

    assert main([*resume_argv(data, uri), "--resume", run_id]) == 0, capsys.readouterr().err
    assert main(resume_argv(data, uri)) == 0, capsys.readouterr().err
    other = next(r.info.run_id for r in runs(uri) if r.info.run_id != run_id)
    resumed, uninterrupted = run_outcome(uri, run_id, tmp_path), run_outcome(uri, other, tmp_path)
    assert resumed["status"] == uninterrupted["status"] == "FINISHED"
    assert resumed["state"] == uninterrupted["state"]  # every tensor bit for bit
    assert resumed["history"] == uninterrupted["history"]
    assert resumed["test_accuracy"] == uninterrupted["test_accuracy"]


def test_a_double_ctrl_c_never_leaves_the_run_running(tmp_path):
    data = make_tiny_mnist(tmp_path / "data")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = start_slow_run(data, uri, tmp_path)
    try:
        wait_for_checkpoint(proc, tmp_path / "checkpoints", 1)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.005)
        for _ in range(5):  # while the first one is being handled
            proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "is marked KILLED" in err.strip().splitlines()[-1] and "Traceback" not in err
    assert statuses(uri) == ["KILLED"]


def test_graceful_stop_raises_once_and_ignores_later_signals_until_it_ends():
    from rankbench.run.stopping import Stopped, graceful_stop

    before = signal.getsignal(signal.SIGTERM)
    with graceful_stop() as state:
        with pytest.raises(Stopped) as stopped:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        os.kill(os.getpid(), signal.SIGINT)  # ignored: the first stop is being handled
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
    assert stopped.value.signal_name == "SIGTERM" and isinstance(stopped.value, KeyboardInterrupt)
    assert state.signum == signal.SIGTERM and state.ignored == 2 and state.exit_code == 143
    assert signal.getsignal(signal.SIGTERM) is before


def test_plugin_code_that_calls_sys_exit_is_one_line_and_its_run_is_marked_failed(tmp_path, uri, capsys):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "exiting.py").write_text(
        "import sys\n"
        "from rankbench.plugins.method import Method\n"
        "class Exiting(Method):\n"
        "    name = 'exiting'\n"
        "    def penalty(self, model):\n"
        "        sys.exit(3)\n"
    )
    rc = main(["run", "--plugin-dir", str(plugins), "--method", "exiting", *TINY_RUN[2:], "--tracking-uri", uri,
               "--data-dir", str(make_tiny_mnist(tmp_path / "data"))])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("rankbench: error: plugin code called sys.exit(3) during")
    assert "Traceback" not in err
    assert statuses(uri) == ["FAILED"]


# ---------------------------------------------------------------------------- checkpoints that cannot be written


def _mount_tmpfs(folder: Path, kib: int) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(folder)],
                          capture_output=True).returncode == 0


def test_a_full_disk_during_the_checkpoint_is_one_line_the_run_failed_and_resumable_without_a_repeated_epoch(
        tmp_path, store_template, capsys):
    import torch

    from rankbench.run.checkpoint import Checkpoint, save_checkpoint

    data = make_tiny_mnist(tmp_path / "data")
    database = tmp_path / "store" / "mlflow.db"
    database.parent.mkdir()
    shutil.copyfile(store_template, database)
    uri = f"sqlite:///{database}"
    argv = ["run", *TINY_RUN, "--data-dir", str(data), "--tracking-uri", uri]
    argv[argv.index("--epochs") + 1] = "3"
    folder = tmp_path / "store" / "checkpoints"
    probe = tmp_path / "probe.pt"
    from rankbench.plugins.registry import Registry
    from rankbench.run.config import make_config
    from rankbench.run.prepare import prepare

    registry = Registry.discover()
    prepared = prepare(make_config(registry, "mlp2", "ours", {"val_size": 40, "initial_rank": 3}, epochs=3,
                                   data_dir=data), registry)
    model, method = prepared.build(0)
    optimizer = torch.optim.Adam(model.parameters())
    model(prepared.data.train.x[:4]).sum().backward()
    optimizer.step()
    save_checkpoint(Checkpoint(1, model.state_dict(), optimizer.state_dict(), None, method.state_dict(),
                               torch.get_rng_state(), torch.get_rng_state(), history=[{"x": 1.0}] * 3), probe)
    size_kib = probe.stat().st_size // 1024 + 1
    if not _mount_tmpfs(folder, size_kib * 3 // 2 + 8):  # room for one checkpoint, not for its successor beside it
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        rc = main(argv)
        err = capsys.readouterr().err
        assert rc == 2, err
        line = err.strip().splitlines()[-1]
        assert line.startswith("rankbench: error: cannot write checkpoint ") and "Traceback" not in err
        assert f"the disk holding {folder} is full" in line and "--resume" in line
        assert "enforce fail" not in line and "internal error" not in line
        (run,) = runs(uri)
        run_id = run.info.run_id
        assert run.info.status == "FAILED"
        assert [p.name for p in folder.iterdir()] == [f"{run_id}.pt"]  # no .part file left behind
        assert torch.load(folder / f"{run_id}.pt", weights_only=False)["epoch"] == 1
        subprocess.run(["mount", "-o", "remount,size=4m", str(folder)], check=True)  # space freed
        assert main([*argv, "--resume", run_id]) == 0, capsys.readouterr().err
    finally:
        subprocess.run(["umount", str(folder)], capture_output=True)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    assert client.get_run(run_id).info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "val_accuracy")] == [1, 2, 3]  # no epoch twice


def test_a_checkpoint_write_that_torch_reports_as_a_runtime_error_leaves_no_temporary_file(tmp_path, monkeypatch):
    import torch

    from rankbench.run import checkpoint as module

    def failing_save(obj, handle):
        handle.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(module.torch, "save", failing_save)
    path = tmp_path / "run.pt"
    with pytest.raises(RankbenchError, match=f"cannot write checkpoint {path}"):
        module.save_checkpoint(module.Checkpoint(1, {}, {}, None, {}, torch.get_rng_state(), torch.get_rng_state()),
                               path)
    assert list(tmp_path.iterdir()) == []


def test_an_epoch_stopped_between_its_checkpoint_and_its_log_is_logged_once_on_resume(tmp_path, uri, monkeypatch,
                                                                                      capsys):
    """The checkpoint comes before the epoch's metrics; a resume logs what the store lacks."""
    import rankbench.run.tracking

    argv = ["run", *TINY_RUN, "--data-dir", str(make_tiny_mnist(tmp_path / "data")), "--tracking-uri", uri]
    argv[argv.index("--epochs") + 1] = "3"


    with monkeypatch.context() as mp:
        mp.setattr(rankbench.run.tracking.Tracker, "log_metrics", interrupting_log_metrics(2))
        assert main(argv) == 130
    (run,) = runs(uri)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")] == [1]
    assert main([*argv, "--resume", run.info.run_id]) == 0, capsys.readouterr().err
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")] == [1, 2, 3]


# ---------------------------------------------------------------------------- resume


def test_resume_refuses_a_run_whose_process_is_alive_naming_the_pid_and_host(tmp_path, uri, capsys):
    import socket

    from rankbench.run.tracking import Tracker, run_identity

    data = make_tiny_mnist(tmp_path / "data")
    argv = ["run", *TINY_RUN, "--data-dir", str(data), "--tracking-uri", uri]
    assert main(argv) == 0
    capsys.readouterr()
    tracker = Tracker(uri)
    (finished,) = runs(uri)
    params = dict(finished.data.params)
    live = tracker.start("mlp2", "live", params, {"method": "ours", "task": "mlp2", **run_identity()})
    assert main([*argv, "--resume", live]) == 2
    line = assert_one_line_error(capsys.readouterr().err)
    assert f"still being trained by process {os.getpid()} on {socket.gethostname()}" in line
    assert tracker.get_run(live).info.status == "RUNNING"


def test_resume_with_seeds_must_name_the_runs_own_seed_and_says_which_seeds_it_leaves_out(tmp_path, uri, capsys):
    from rankbench.run.tracking import Tracker

    data = make_tiny_mnist(tmp_path / "data")
    argv = ["run", *TINY_RUN, "--data-dir", str(data), "--tracking-uri", uri]
    killed = Tracker(uri).start("mlp2", "killed", {"seed": 1, "method": "ours", "task": "mlp2"}, {"method": "ours"})
    Tracker(uri).fail(killed, "interrupted", killed=True)
    assert main([*argv, "--seeds", "0,2", "--resume", killed]) == 2
    assert "that run is seed 1, but --seeds asks 0,2" in assert_one_line_error(capsys.readouterr().err)
    assert main([*argv, "--seeds", "0,1", "--resume", killed]) == 2  # no checkpoint: refused after the warning
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == ("rankbench: warning: --resume continues seed 1 only; seeds 0 of --seeds are not run (run them "
                      "without --resume)")
    assert err[1].startswith("rankbench: error: ")


def test_resume_of_a_study_parent_run_names_the_study_command(tmp_path, uri, capsys):
    from rankbench.run.tracking import Tracker

    parent = Tracker(uri).start("mlp2", "study s", {"study": "s"}, {"rankbench.role": "study", "study": "s"})
    rc = main(["run", *TINY_RUN, "--tracking-uri", uri, "--resume", parent])
    assert rc == 2
    assert "parent run of study s: run the study file again" in assert_one_line_error(capsys.readouterr().err)


def test_a_resumed_run_logs_the_time_of_every_attempt(tmp_path, uri, monkeypatch, capsys):
    import torch
    from mlflow.tracking import MlflowClient

    import rankbench.run.tracking

    data = make_tiny_mnist(tmp_path / "data")
    argv = resume_argv(data, uri)


    with monkeypatch.context() as mp:
        mp.setattr(rankbench.run.tracking.Tracker, "log_metrics", interrupting_log_metrics(3))
        assert main(argv) == 130
    (run,) = runs(uri)
    state = torch.load(tmp_path / "checkpoints" / f"{run.info.run_id}.pt", weights_only=False)
    first_train, first_wall = state["train_seconds"], state["wall_seconds"]
    assert 0 < first_train <= first_wall
    assert main([*argv, "--resume", run.info.run_id]) == 0, capsys.readouterr().err
    metrics = MlflowClient(tracking_uri=uri).get_run(run.info.run_id).data.metrics
    per_epoch = first_train / 3
    assert metrics["train_seconds"] > first_train + 0.5 * per_epoch  # the fourth epoch added to the first three
    assert metrics["wall_seconds"] > first_wall + 0.5 * per_epoch
    assert metrics["wall_seconds"] >= metrics["train_seconds"]


# ---------------------------------------------------------------------------- checks before any allocation


def test_a_model_too_large_for_memory_is_refused_before_it_is_allocated(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    start = time.monotonic()
    rc = main(["run", "--method", "ours", "--task", "lenet5", "--set", "initial_rank=100000", "--set", "val_size=40",
               "--epochs", "1",
               "--no-progress", "--tracking-uri", uri, "--data-dir", str(make_tiny_mnist(tmp_path / "data"))])
    assert rc == 2
    line = assert_one_line_error(capsys.readouterr().err)
    assert "at rank 100000 is a model of 1,610,000,000,400 parameters" in line and "lower the rank" in line
    assert time.monotonic() - start < 30
    assert not (tmp_path / "mlflow.db").exists()


def test_the_memory_check_lets_a_model_that_fits_through(monkeypatch):
    from rankbench.plugins.registry import Registry
    from rankbench.run import prepare as module
    from rankbench.run.config import make_config

    registry = Registry.discover()
    config = make_config(registry, "lenet5", "ours")
    task, method = registry.task("lenet5")(config.task_params), registry.method("ours")(config.method_params)
    module.check_fits_in_memory(task, method, module.torch.device("cpu"))
    monkeypatch.setattr(module, "available_memory", lambda device: 1000)
    with pytest.raises(RankbenchError, match="GiB free: lower the rank"):
        module.check_fits_in_memory(task, method, module.torch.device("cpu"))


def test_a_stop_the_store_will_not_record_is_said_instead_of_claiming_killed(tmp_path, uri, monkeypatch, capsys):
    """A store that refuses the KILLED mark (busy, read-only) is retried, then named: never a message that
    says KILLED over a run left RUNNING."""
    import rankbench.run.tracking

    argv = ["run", *TINY_RUN, "--data-dir", str(make_tiny_mnist(tmp_path / "data")), "--tracking-uri", uri]
    argv[argv.index("--epochs") + 1] = "2"
    refusals = []


    def refuse(self, run_id, reason, killed=False):
        refusals.append(reason)
        raise RankbenchError("cannot write the run status to tracking store X (database is locked)")

    monkeypatch.setattr(rankbench.run.tracking.Tracker, "log_metrics", interrupting_log_metrics(2))
    monkeypatch.setattr(rankbench.run.tracking.Tracker, "fail", refuse)
    assert main(argv) == 130
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "could not be marked KILLED (cannot write the run status" in last and "is marked KILLED" not in last
    assert refusals == ["interrupted"] * 3
    assert statuses(uri) == ["RUNNING"]
