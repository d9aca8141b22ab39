"""A study's integrity: one configuration is trained once, a stored study runs only the study file it
was created from, SIGTERM stops every worker cleanly (and the next command resumes their runs),
pruned runs end KILLED (not "died"), and the parent run is replaced only when it is gone.

Every test works inside ``tmp_path`` with its own Optuna storage and MLflow store (a copy of the
empty migrated template, ``store_template``); trials are tiny: one or a few epochs of ``mlp2`` on a
random 200/40-example IDX dataset, seed 0.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_study import trials_of

import rankbench.study.runner
from helpers import assert_one_line_error, make_tiny_mnist
from rankbench.cli import main
from rankbench.errors import RankbenchError
from rankbench.plugins.registry import Registry
from rankbench.run.tracking import Tracker
from rankbench.study.spec import load_study_file

TINY = ["--set", "epochs=1", "--seeds", "0"]
SLOW_PLUGINS = Path(__file__).resolve().parent / "plugins_slow"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_tiny_mnist(tmp_path_factory.mktemp("data"))


class Stores:
    """One test's Optuna storage, MLflow store and plot folder under ``root``."""

    def __init__(self, root: Path, data_dir: Path, template: Path) -> None:
        self.root, self.data_dir = root, data_dir
        shutil.copyfile(template, root / "mlflow.db")
        self.uri = f"sqlite:///{root / 'mlflow.db'}"
        self.storage = f"sqlite:///{root / 'optuna.db'}"

    def argv(self, study_file: Path, *extra: str) -> list[str]:
        return ["study", str(study_file), "--storage", self.storage, "--tracking-uri", self.uri,
                "--out", str(self.root / "plots"), "--data-dir", str(self.data_dir), "--set", "val_size=40", *extra]


@pytest.fixture
def stores(tmp_path, monkeypatch, data_dir, store_template) -> Stores:
    monkeypatch.chdir(tmp_path)
    return Stores(tmp_path, data_dir, store_template)


def study_file(folder: Path, name: str, *, task: str = "mlp2", methods=("ours",), grid: dict | None = None,
               sampler: str = "grid", extra: str = "", objectives: str = 'val_accuracy = "maximize"') -> Path:
    lines = [f'name = "{name}"', f'task = "{task}"', f"methods = {json.dumps(list(methods))}", extra, ""]
    for key, values in (grid or {}).items():
        lines += [f"[search.{key}]", f"grid = {json.dumps(values)}", ""]
    lines += ["[objectives]", objectives, "", "[sampler]", f'name = "{sampler}"', ""]
    path = folder / f"{name}.toml"
    path.write_text("\n".join(lines))
    return path


def study_attrs(storage_url: str, name: str) -> dict:
    import optuna

    storage = optuna.storages.RDBStorage(storage_url)
    try:
        return optuna.load_study(study_name=name, storage=storage).user_attrs
    finally:
        storage.engine.dispose()


def all_runs(uri: str):
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    ids = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    return client.search_runs(ids, run_view_type=ViewType.ALL, max_results=10000) if ids else []


def children(uri: str) -> list:
    return [r for r in all_runs(uri) if r.data.tags.get("rankbench.role") != "study"]


def parents(uri: str) -> list:
    return [r for r in all_runs(uri) if r.data.tags.get("rankbench.role") == "study"]


def show_notes(storage_url: str, name: str, capsys) -> dict[int, str]:
    """Trial number → the note column of ``rankbench study show``."""
    capsys.readouterr()
    assert main(["study", "show", name, "--storage", storage_url]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    header, body = lines[0], lines[2:]  # lines[1] is the rule under the header
    start = header.index("note")
    return {int(line.split()[0]): line[start:].strip() for line in body}


# ---------------------------------------------------------------------------- 1. one configuration, one training


def test_a_searched_key_that_a_method_does_not_take_trains_that_method_once(stores, capsys):
    path = study_file(stores.root, "ignored", methods=("ours", "trn"), grid={"lambda": [0.1, 1.0]})
    assert main(stores.argv(path, *TINY)) == 0, capsys.readouterr().err
    trials = trials_of(stores.storage, "ignored")
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4
    runs = children(stores.uri)
    assert sorted(r.data.params["method"] for r in runs) == ["ours", "ours", "trn"]  # trn trained once

    trn = [t for t in trials if t.params["method"] == "trn"]
    first, second = sorted(trn, key=lambda t: t.number)
    assert "duplicate_of" not in first.user_attrs
    assert second.user_attrs["duplicate_of"] == first.number
    assert second.values == first.values
    assert second.user_attrs["seeds"] == first.user_attrs["seeds"]
    assert second.user_attrs["mean_test_accuracy"] == first.user_attrs["mean_test_accuracy"]
    (trn_run,) = [r for r in runs if r.data.params["method"] == "trn"]
    assert trn_run.data.tags["trial"] == str(first.number)  # the run keeps the trial that trained it
    assert [s["run_id"] for s in second.user_attrs["seeds"]] == [trn_run.info.run_id]
    assert all("duplicate_of" not in t.user_attrs for t in trials if t.params["method"] == "ours")

    notes = show_notes(stores.storage, "ignored", capsys)
    assert notes[second.number] == f"same settings as trial {first.number}"
    assert all(notes[t.number] == "" for t in trials if t.number != second.number)

    from mlflow.tracking import MlflowClient

    (parent,) = parents(stores.uri)
    best = json.loads(Path(MlflowClient(tracking_uri=stores.uri).download_artifacts(
        parent.info.run_id, "best_trials.json", str(stores.root))).read_text())
    assert second.number not in [b["number"] for b in best]  # a repeat is not a best trial of its own


def test_an_empty_search_space_trains_its_one_configuration_once(stores, capsys):
    path = study_file(stores.root, "empty", sampler="tpe", extra="[budget]\nn_trials = 3")
    assert main(stores.argv(path, *TINY)) == 0, capsys.readouterr().err
    trials = trials_of(stores.storage, "empty")
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3
    assert len(children(stores.uri)) == 1
    assert [t.user_attrs.get("duplicate_of") for t in trials] == [None, 0, 0]
    assert len({tuple(t.values) for t in trials}) == 1


# ---------------------------------------------------------------------------- 2. one study name, one study file


@pytest.fixture(scope="module")
def created(tmp_path_factory, data_dir, store_template) -> Stores:
    """Study "same" made from ``same.toml`` (mlp2, lambda grid of 2) with one finished trial. The study
    itself was created first without a digest, as a rankbench before digests did."""
    import optuna

    root = tmp_path_factory.mktemp("created")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        store = Stores(root, data_dir, store_template)
        storage = optuna.storages.RDBStorage(store.storage)
        optuna.create_study(study_name="same", storage=storage, directions=["maximize"])
        storage.engine.dispose()
        path = study_file(root, "same", grid={"lambda": [0.1, 1.0]})
        assert main(store.argv(path, "--n-trials", "1", *TINY)) == 0
    return store


def snapshot(store: Stores):
    trials = trials_of(store.storage, "same")
    return ([(t.number, t.state.name, t.params, t.values) for t in trials],
            sorted((r.info.run_id, r.info.status) for r in all_runs(store.uri)), study_attrs(store.storage, "same"))


def test_a_study_without_a_digest_records_its_files_digest(created):
    spec = load_study_file(created.root / "same.toml", Registry.discover()).with_overrides(
        seeds=(0,), fixed={"epochs": "1", "val_size": "40"}, registry=Registry.discover())
    attrs = study_attrs(created.storage, "same")
    assert attrs["spec_digest"] == spec.digest()
    assert attrs["spec"]["tasks"] == ["mlp2"]
    assert (parents(created.uri)[0].data.params["spec_digest"]) == spec.digest()


OTHER_FILES = {  # case: (change to the file, options instead of TINY, fragment of the error)
    "task": (lambda t: t.replace('task = "mlp2"', 'task = "lenet5"'), [], "(tasks lenet5 here, mlp2 in the study)"),
    "grid": (lambda t: t.replace("grid = [0.1, 1.0]", "grid = [0.1, 0.5]"), [], "search "),
    "methods": (lambda t: t.replace('["ours"]', '["ours", "trn"]'), [], "methods ours, trn here, ours in the study"),
    "objective": (lambda t: t.replace("val_accuracy =", "compression ="), [], "objectives "),
    "sampler": (lambda t: t.replace('"grid"', '"random"') + "\n[budget]\nn_trials = 2\n", [],
                "sampler random here, grid in the study"),
    "budget-steps": (lambda t: t.replace('methods = ["ours"]', 'methods = ["ours"]\nbudget_steps = 3'), [],
                     "budget_steps 3 here, none in the study"),
    "fixed": (lambda t: t + "\n[fixed]\nsigma = 0.3\n", [], "fixed epochs=1, sigma=0.3, val_size=40 here"),
    "set": (lambda t: t, ["--set", "epochs=2", "--seeds", "0"],
            "fixed epochs=2, val_size=40 here, epochs=1, val_size=40 in the study"),
    "seeds": (lambda t: t, ["--set", "epochs=1", "--seeds", "0,1"], "seeds 0, 1 here, 0 in the study"),
}


@pytest.mark.parametrize("case", sorted(OTHER_FILES))
def test_another_study_file_under_a_stored_name_is_refused_before_anything_is_written(
        case, created, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    change, extra, fragment = OTHER_FILES[case]
    other = tmp_path / "same.toml"
    other.write_text(change((created.root / "same.toml").read_text()))
    before = snapshot(created)
    capsys.readouterr()
    assert main(created.argv(other, *(extra or TINY))) == 2
    line = assert_one_line_error(capsys.readouterr().err)
    assert f"study same in {created.storage} was created from a different study file" in line, line
    assert fragment in line, line
    assert 'rename the study (name = "same_2") or use another --storage' in line, line
    if case in ("fixed", "set"):
        assert "--set" in line
    assert snapshot(created) == before  # no trial, no run, no parent run, the digest kept


def test_description_comments_and_budget_may_change_when_a_study_is_resumed(created, tmp_path, monkeypatch,
                                                                              capsys):
    monkeypatch.chdir(tmp_path)
    text = (created.root / "same.toml").read_text()
    edited = tmp_path / "same.toml"
    edited.write_text("# resumed with a smaller budget\n"
                      + text.replace('task = "mlp2"', 'task = "mlp2"\ndescription = "now described"')
                      + "\n[budget]\nn_trials = 1\ntimeout_s = 600\n\n[workers]\nheartbeat_interval = 2\n")
    before = snapshot(created)
    assert main([*created.argv(edited, *TINY), "--n-trials", "1"]) == 0, capsys.readouterr().err
    assert snapshot(created)[0] == before[0]  # the budget of one trial was already spent


def test_the_same_file_with_a_larger_budget_goes_on(created, monkeypatch, capsys):
    monkeypatch.chdir(created.root)
    assert main(created.argv(created.root / "same.toml", *TINY)) == 0, capsys.readouterr().err
    trials = trials_of(created.storage, "same")
    assert sorted(t.params["lambda"] for t in trials if t.state.name == "COMPLETE") == [0.1, 1.0]


# ---------------------------------------------------------------------------- 5. SIGTERM


def sqlite_child_runs(db: Path) -> list[tuple[str, str, int]]:
    """(run id, status, rankbench.pid) of every trial run, read straight from the MLflow sqlite file."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            return [(r[0], r[1], int(r[2])) for r in conn.execute(
                "SELECT r.run_uuid, r.status, p.value FROM runs r JOIN tags p ON p.run_uuid = r.run_uuid "
                "AND p.key = 'rankbench.pid' WHERE EXISTS (SELECT 1 FROM tags t WHERE t.run_uuid = r.run_uuid "
                "AND t.key = 'trial')")]
    except sqlite3.Error:
        return []


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    with_state = status.read_text() if status.exists() else ""
    return "State:\tZ" not in with_state  # a zombie has ended


def test_sigterm_stops_every_worker_marks_every_run_killed_and_the_next_command_resumes_them(stores, capsys):
    path = study_file(stores.root, "term", methods=("slow_ours",), grid={"lambda": [0.1, 1.0]},
                      extra="[workers]\nheartbeat_interval = 1\ngrace_period = 2")
    settings = ["--plugin-dir", str(SLOW_PLUGINS), "--seeds", "0", "--set", "epochs=6", "--set", "batch_size=16",
                "--set", "initial_rank=3"]  # an epoch of slow_ours takes about half a second
    argv = stores.argv(path, *settings)
    log = stores.root / "term.log"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "rankbench.cli", *argv, "--workers", "2"], cwd=stores.root,
                                env=env, stdout=out, stderr=subprocess.STDOUT)
    checkpoints = stores.root / "checkpoints"
    deadline = time.time() + 90
    try:  # both workers are training, each with a checkpoint to resume from
        while True:
            runs = sqlite_child_runs(stores.root / "mlflow.db")
            found = {p.stem for p in checkpoints.glob("*.pt")} if checkpoints.is_dir() else set()
            running = [r for r in runs if r[1] == "RUNNING"]
            if len(running) == 2 and {r[0] for r in running} <= found:
                break
            assert proc.poll() is None, log.read_text()
            assert time.time() < deadline, (runs, found, log.read_text())
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)  # the parent only
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == 128 + signal.SIGTERM, log.read_text()
    assert "Traceback" not in log.read_text()
    pids = {r[2] for r in running}
    assert len(pids) == 2 and proc.pid not in pids
    until = time.time() + 60
    while any(process_alive(pid) for pid in pids):
        assert time.time() < until, "a worker outlived the study command"
        time.sleep(0.1)
    statuses = {r.info.run_id: r.info.status for r in all_runs(stores.uri)}
    assert sorted(statuses[r[0]] for r in running) == ["KILLED", "KILLED"]
    assert [p.info.status for p in parents(stores.uri)] == ["KILLED"]
    assert "RUNNING" not in statuses.values()
    trials = trials_of(stores.storage, "term")
    assert [t.state.name for t in trials] == ["FAIL", "FAIL"]
    assert all(t.user_attrs["interrupted"] for t in trials)

    assert main([*argv, "--workers", "1"]) == 0, capsys.readouterr().err
    trials = trials_of(stores.storage, "term")
    assert sorted(t.state.name for t in trials) == ["COMPLETE", "COMPLETE", "FAIL", "FAIL"]
    after = children(stores.uri)
    assert sorted(r.info.run_id for r in after) == sorted(r[0] for r in running)  # continued, not restarted
    assert [r.info.status for r in after] == ["FINISHED", "FINISHED"]
    assert all(int(r.data.params["epochs"]) == 6 for r in after)
    assert [p.info.status for p in parents(stores.uri)] == ["FINISHED"]


# ---------------------------------------------------------------------------- 6. pruned runs, the parent run


def test_a_pruned_trials_run_ends_killed_tagged_with_its_epoch_and_is_not_counted_as_died(stores, monkeypatch,
                                                                                           capsys):
    import optuna

    class PruneTrialOne(optuna.pruners.BasePruner):
        """Prunes trial 1 at its first report, so the test knows which trial is pruned."""

        def prune(self, study, trial) -> bool:
            return trial.number == 1

    monkeypatch.setattr(rankbench.study.runner, "make_pruner", lambda spec: PruneTrialOne())
    path = study_file(stores.root, "pruned", grid={"lambda": [0.1, 1.0]}, extra='[pruner]\nname = "median"')
    assert main(stores.argv(path, "--set", "epochs=2", "--seeds", "0")) == 0, capsys.readouterr().err
    trials = trials_of(stores.storage, "pruned")
    assert [t.state.name for t in trials] == ["COMPLETE", "PRUNED"]
    runs = {r.data.tags["trial"]: r for r in children(stores.uri)}
    assert runs["0"].info.status == "FINISHED"
    pruned = runs["1"]
    assert pruned.info.status == "KILLED"
    assert pruned.data.tags["rankbench.pruned"] == "epoch 1"
    assert pruned.data.tags["failure_reason"] == "pruned by the study's pruner at epoch 1"
    assert trials[1].user_attrs["runs"] == {"0": pruned.info.run_id}

    capsys.readouterr()
    assert main(["study", "--list", "--storage", stores.storage, "--tracking-uri", stores.uri]) == 0
    listed = capsys.readouterr()
    row = next(line.split() for line in listed.out.splitlines() if line.startswith("pruned "))
    assert row[1:5] == ["2", "maximize", "0", "0"]  # 2 trials, 0 runs running, 0 died
    assert "had died" not in listed.err


def small_spec(tmp_path: Path):
    return load_study_file(study_file(tmp_path, "parent", grid={"lambda": [0.1]}), Registry.discover())


def test_a_parent_run_gone_from_the_store_is_replaced(uri, tmp_path):
    import optuna
    from mlflow.tracking import MlflowClient

    tracker, spec = Tracker(uri), small_spec(tmp_path)
    study = optuna.create_study(directions=["maximize"])
    study.set_user_attr("mlflow_parent_run_id", "0" * 32)  # recorded in another tracking store
    first = rankbench.study.runner.ensure_parent_run(study, spec, tracker, "sqlite:///o.db")
    assert first != "0" * 32 and study.user_attrs["mlflow_parent_run_id"] == first
    assert rankbench.study.runner.ensure_parent_run(study, spec, tracker, "sqlite:///o.db") == first
    MlflowClient(tracking_uri=uri).delete_run(first)
    second = rankbench.study.runner.ensure_parent_run(study, spec, tracker, "sqlite:///o.db")
    assert second not in ("0" * 32, first)


@pytest.mark.parametrize("failing", ["get_run", "reopen"])
def test_a_store_error_while_finding_the_parent_run_propagates_and_makes_no_second_parent(failing, uri, tmp_path,
                                                                                         monkeypatch):
    import optuna

    tracker, spec = Tracker(uri), small_spec(tmp_path)
    study = optuna.create_study(directions=["maximize"])
    parent = rankbench.study.runner.ensure_parent_run(study, spec, tracker, "sqlite:///o.db")
    tracker.terminate(parent, "KILLED")

    def broken(*args, **kwargs):
        raise RankbenchError(f"cannot read run {parent!r} from {uri} (OperationalError: database is locked): "
                             "check --tracking-uri")

    monkeypatch.setattr(tracker, failing, broken)
    with pytest.raises(RankbenchError, match="database is locked"):
        rankbench.study.runner.ensure_parent_run(study, spec, tracker, "sqlite:///o.db")
    assert [r.info.run_id for r in parents(uri)] == [parent]
    assert study.user_attrs["mlflow_parent_run_id"] == parent
