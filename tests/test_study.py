"""``rankbench study``: Optuna studies whose trials are tracked rankbench runs.

Every test works inside ``tmp_path`` and passes an explicit Optuna storage
(``--storage sqlite:///...``), MLflow store (``--tracking-uri``, a copy of an
empty migrated template) and plot folder (``--out``), so nothing is written
into the repository. Trials are tiny: one epoch of ``mlp2`` (or the shipped
study's task at ``initial_rank=4``) on a random 200/40-example IDX dataset
(``--data-dir``, ``val_size=40``), seed 0, one torch thread.

Tests of known bugs are ``xfail(strict=True)`` with the reason starting "BUG:".
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
import uuid
import warnings
from pathlib import Path

import pytest

import rankbench.run.tracking
import rankbench.study.runner
from helpers import assert_one_line_error, make_tiny_cifar10, make_tiny_mnist, toml_module
from rankbench.cli import main
from rankbench.errors import RankbenchError
from rankbench.plugins.registry import Registry
from rankbench.study.spec import load_study_file, parse_study

REPO = Path(__file__).resolve().parent.parent
STUDIES = sorted(p for p in (REPO / "studies").glob("*.toml")
                 if "\n[matched]" not in p.read_text() and "\n[progressive]" not in p.read_text())
"""The shipped Optuna studies (matched-compression ones: tests/test_matched_study.py; progressive ones:
tests/test_pstrn.py)."""
PLUGINS = Path(__file__).resolve().parent / "plugins_study"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = ["--set", "epochs=1", "--seeds", "0"]


# ---------------------------------------------------------------------------- fixtures and helpers





@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Random IDX files under ``<dir>/mnist`` and ``<dir>/fashion-mnist`` (train 160 / val 40 / test 40
    with val_size=40) and CIFAR-10 batches under ``<dir>/cifar10`` (train 80 / val 40 / test 24)."""
    root = make_tiny_mnist(tmp_path_factory.mktemp("data"))
    return make_tiny_cifar10(make_tiny_mnist(root, name="fashion-mnist"))


@pytest.fixture(scope="module")
def mlflow_template(tmp_path_factory) -> Path:
    """An empty, already migrated MLflow sqlite store (creating one costs about a second)."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow") / "template.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


class Env:
    """The stores of one test, all under ``root``; ``argv`` builds a ``rankbench study`` command line."""

    def __init__(self, root: Path, data_dir: Path, mlflow_template: Path) -> None:
        self.root = root
        self.data_dir = data_dir
        shutil.copyfile(mlflow_template, root / "mlflow.db")
        self.uri = f"sqlite:///{root / 'mlflow.db'}"
        self.storage = f"sqlite:///{root / 'optuna.db'}"
        self.out = root / "plots"

    def argv(self, study_file, *extra: str, storage: str | None = None) -> list[str]:
        return ["study", str(study_file), "--storage", storage or self.storage, "--tracking-uri", self.uri,
                "--out", str(self.out), "--data-dir", str(self.data_dir), "--set", "val_size=40", *extra]


@pytest.fixture
def env(tmp_path, monkeypatch, data_dir, mlflow_template) -> Env:
    monkeypatch.chdir(tmp_path)
    return Env(tmp_path, data_dir, mlflow_template)


def study_toml(name: str, *, grid: dict | None = None, objectives: dict | None = None, task: str = "mlp2",
               methods=("ours",), sampler: str = "grid", extra: str = "", heartbeat: tuple[int, int] | None = None
               ) -> str:
    """A small study file: a grid (by default over lambda) and one or two objectives."""
    grid = {"lambda": [0.1, 0.5, 1.0]} if grid is None else grid
    objectives = objectives or {"val_accuracy": "maximize", "compression": "maximize"}
    lines = [f'name = "{name}"', f'task = "{task}"', f"methods = {json.dumps(list(methods))}", extra, ""]
    for key, values in grid.items():
        lines += [f"[search.{key}]", f"grid = {json.dumps(values)}", ""]
    lines += ["[objectives]", *(f'{k} = "{v}"' for k, v in objectives.items()), ""]
    lines += ["[sampler]", f'name = "{sampler}"', ""]
    if heartbeat:
        lines += ["[workers]", f"heartbeat_interval = {heartbeat[0]}", f"grace_period = {heartbeat[1]}", ""]
    return "\n".join(lines)


def write_study(folder: Path, name: str, **kwargs) -> Path:
    path = folder / f"{name}.toml"
    path.write_text(study_toml(name, **kwargs))
    return path


def trials_of(storage_url: str, name: str):
    """The study's trials as Optuna stores them (a fresh connection, closed after)."""
    import optuna

    storage = optuna.storages.RDBStorage(storage_url)
    try:
        return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=True)
    finally:
        storage.engine.dispose()


def study_names(storage_url: str) -> list[str]:
    import optuna

    storage = optuna.storages.RDBStorage(storage_url)
    try:
        return sorted(s.study_name for s in optuna.get_all_study_summaries(storage))
    finally:
        storage.engine.dispose()


def states(trials) -> list[str]:
    return [t.state.name for t in trials]


def complete(trials):
    return [t for t in trials if t.state.name == "COMPLETE"]


def point(trial) -> tuple:
    return tuple(sorted(trial.params.items()))


def all_runs(uri: str):
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    ids = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    return client.search_runs(ids, run_view_type=ViewType.ALL, max_results=10000) if ids else []


def parent_and_children(uri: str, study: str):
    runs = [r for r in all_runs(uri) if r.data.tags.get("study") == study]
    parents = [r for r in runs if r.data.tags.get("rankbench.role") == "study"]
    children = [r for r in runs if r.data.tags.get("rankbench.role") != "study"]
    return parents, children


def artifact_paths(uri: str, run_id: str, path: str | None = None) -> set[str]:
    from mlflow.tracking import MlflowClient

    return {a.path for a in MlflowClient(tracking_uri=uri).list_artifacts(run_id, path)}


def quiet_main(argv: list[str]) -> int:
    """``main(argv)`` hiding Optuna's FutureWarning about ``failed_trial_callback`` (a bug of its own, see
    ``test_a_study_command_raises_no_future_warning``), so that stderr checks hold under ``-p no:warnings``."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*failed_trial_callback")
        return main(argv)




def table_rows(out: str) -> list[list[str]]:
    """The body rows of a tabulate "simple" table (split on runs of two or more spaces)."""
    import re

    lines = out.strip().splitlines()
    start = next(i for i, line in enumerate(lines) if set(line.strip()) <= {"-", " "} and line.strip()) + 1
    return [re.split(r"\s{2,}", line.strip()) for line in lines[start:] if line.strip()]


def subprocess_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def start_cli(argv: list[str], cwd: Path, tag: str, prelude: str = "") -> tuple[subprocess.Popen, Path]:
    """``python -m rankbench.cli ARGV`` (or, with a prelude, the same after running it) in the background."""
    log = cwd / f"{tag}.log"
    if prelude:
        code = prelude + "\nimport sys\nfrom rankbench.cli import main\nsys.exit(main(sys.argv[1:]))"
        cmd = [sys.executable, "-c", code, *argv]
    else:
        cmd = [sys.executable, "-m", "rankbench.cli", *argv]
    with open(log, "wb") as handle:
        proc = subprocess.Popen(cmd, cwd=cwd, env=subprocess_env(), stdout=handle, stderr=subprocess.STDOUT)
    return proc, log


def sqlite_trial_states(db: Path) -> list[tuple[int, str, bool, bool]]:
    """(number, state, has a heartbeat, has its parameters) per trial, read straight from an Optuna sqlite file."""
    if not db.exists():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            return conn.execute(
                "SELECT t.number, t.state, EXISTS(SELECT 1 FROM trial_heartbeats h WHERE h.trial_id = t.trial_id), "
                "EXISTS(SELECT 1 FROM trial_params p WHERE p.trial_id = t.trial_id) "
                "FROM trials t ORDER BY t.number").fetchall()
    except sqlite3.Error:  # the schema is being created
        return []


# ---------------------------------------------------------------------------- 1. the shipped studies


def test_every_shipped_study_file_loads_and_validates():
    registry = Registry.discover()
    names = {p.stem for p in STUDIES}
    assert names == {"fmnist_campaign", "fmnist_length_cpu", "fmnist_tradeoff", "fmnist_tradeoff_cpu", "headline",
                     "lenet5_methods", "lenet5_pareto", "lenet5_sensitivity", "mlp2_ranks", "resnet32_methods"}
    for path in STUDIES:
        spec = load_study_file(path, registry)
        assert spec.name == path.stem
        assert spec.source == path.read_text()
        assert spec.budget() >= 2
        assert set(spec.objectives) == {"val_accuracy", "compression"}


@pytest.mark.parametrize("path", STUDIES, ids=[p.stem for p in STUDIES])
def test_shipped_study_runs_end_to_end_with_a_tiny_budget(path, env, capsys):
    argv = env.argv(path, "--n-trials", "2", *TINY, "--set", "initial_rank=4")
    assert main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "2 trials finished, 0 failed" in out

    trials = trials_of(env.storage, path.stem)
    assert states(trials) == ["COMPLETE", "COMPLETE"]
    assert len({point(t) for t in trials}) == 2  # two different configurations

    (parent,) = [r for r in all_runs(env.uri) if r.data.tags.get("rankbench.role") == "study"]
    assert parent.data.tags["study"] == path.stem
    assert parent.info.status == "FINISHED"
    assert {"study.toml", "best_trials.json"} <= artifact_paths(env.uri, parent.info.run_id)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=env.uri)
    toml_text = Path(client.download_artifacts(parent.info.run_id, "study.toml", str(env.root))).read_text()
    assert toml_text == path.read_text()
    best = json.loads(Path(client.download_artifacts(parent.info.run_id, "best_trials.json",
                                                     str(env.root))).read_text())
    assert best and {b["number"] for b in best} <= {0, 1}

    _, children = parent_and_children(env.uri, path.stem)
    assert len(children) == 2  # 2 trials x 1 seed
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.tags["study"] == path.stem
        assert child.info.status == "FINISHED"
    assert sorted(c.data.tags["trial"] for c in children) == ["0", "1"]
    assert {s["run_id"] for t in trials for s in t.user_attrs["seeds"]} == {c.info.run_id for c in children}


# ---------------------------------------------------------------------------- 2. metrics over seeds


def test_trial_attrs_hold_per_seed_metrics_equal_to_the_child_runs_and_objectives_are_their_means(env, capsys):
    path = write_study(env.root, "seeds2", grid={"lambda": [0.1, 1.0]},
                       objectives={"val_loss": "minimize", "compression": "maximize"})
    assert main(env.argv(path, "--set", "epochs=1", "--seeds", "0,1")) == 0, capsys.readouterr().err

    trials = trials_of(env.storage, "seeds2")
    assert states(trials) == ["COMPLETE", "COMPLETE"]
    runs = {r.info.run_id: r for r in all_runs(env.uri)}
    for trial in trials:
        seeds = trial.user_attrs["seeds"]
        assert [s["seed"] for s in seeds] == [0, 1]
        for s in seeds:
            run = runs[s["run_id"]]
            assert run.data.tags["trial"] == str(trial.number)
            assert run.data.params["seed"] == str(s["seed"])
            assert run.data.metrics["compression"] == pytest.approx(s["compression"], rel=1e-9)
            assert run.data.metrics["test_accuracy"] == pytest.approx(s["test_accuracy"], rel=1e-9)
            assert run.data.metrics["val_loss"] == pytest.approx(s["val_loss"], rel=1e-9)
            assert run.data.metrics["val_accuracy"] == pytest.approx(s["val_accuracy"], rel=1e-9)
        assert seeds[0]["val_loss"] != seeds[1]["val_loss"]  # two seeds really differ: the mean is a mean
        assert trial.values == pytest.approx([statistics.mean(s["val_loss"] for s in seeds),
                                              statistics.mean(s["compression"] for s in seeds)])
        assert trial.user_attrs["mean_test_accuracy"] == pytest.approx(
            statistics.mean(s["test_accuracy"] for s in seeds))


PER_METHOD = """name = "per_method"
task = "mlp2"
methods = ["trn", "ours"]
budget_steps = 3

[method_search.trn]
rank = { grid = [2, 3] }

[method_search.ours]
lambda = { grid = [0.1, 0.5, 1.0] }

[objectives]
val_accuracy = "maximize"
compression = "maximize"

[sampler]
name = "grid"
"""


def test_method_search_grids_each_method_over_its_own_keys_only():
    spec = parse_study(toml_module().loads(PER_METHOD), Registry.discover())
    assert spec.points() == {
        "trn rank=2": ("trn", {"rank": 2}), "trn rank=3": ("trn", {"rank": 3}),
        "ours lambda=0.1": ("ours", {"lambda": 0.1}), "ours lambda=0.5": ("ours", {"lambda": 0.5}),
        "ours lambda=1.0": ("ours", {"lambda": 1.0}),
    }
    assert spec.budget() == 5  # 2 + 3 points, not 2 x 2 x 3


def test_a_method_search_study_runs_every_point_once_with_its_own_values_and_the_step_budget(env, capsys):
    path = env.root / "per_method.toml"
    path.write_text(PER_METHOD)
    assert main(env.argv(path, "--seeds", "0")) == 0, capsys.readouterr().err
    trials = trials_of(env.storage, "per_method")
    assert states(trials) == ["COMPLETE"] * 5
    assert sorted(t.params["point"] for t in trials) == sorted(
        ["trn rank=2", "trn rank=3", "ours lambda=0.1", "ours lambda=0.5", "ours lambda=1.0"])
    runs = {r.info.run_id: r for r in all_runs(env.uri)}
    for trial in trials:
        method, _, setting = trial.params["point"].partition(" ")
        key, _, value = setting.partition("=")
        (seed,) = trial.user_attrs["seeds"]
        params = runs[seed["run_id"]].data.params
        assert params["method"] == method and float(params[key]) == float(value)
        assert ("rank" in params) == (method == "trn")  # ours never receives trn's key
        assert (params["budget_steps"], params["steps_per_epoch"], params["epochs"]) == ("3", "2", "2")  # 160/128


@pytest.mark.parametrize("text, words", [
    (PER_METHOD.replace("[method_search.ours]", "[method_search.mars]"), ["mars is not in methods"]),
    (PER_METHOD.replace("lambda = { grid", "rank = { grid"), ["'rank'"]),
    (PER_METHOD.replace("rank = { grid = [2, 3] }", "rank = { low = 2, high = 5 }"), ["grid sampler", "rank"]),
    (PER_METHOD.replace("budget_steps = 3", "budget_steps = 0"), ["budget_steps", "positive"]),
])
def test_bad_method_search_tables_are_one_line_errors(text, words):
    with pytest.raises(RankbenchError) as info:
        parse_study(toml_module().loads(text), Registry.discover())
    assert all(w in str(info.value) for w in words), str(info.value)


TWO_TASKS = """name = "two_tasks"
tasks = ["mlp2", "lenet5"]
methods = ["trn", "ours"]

[fixed]
initial_rank = 4
val_size = 40

[method_fixed.trn]
rank = 3

[objectives]
val_accuracy = "maximize"

[sampler]
name = "grid"
"""


def test_a_study_over_several_tasks_runs_every_task_and_method_pair_in_its_task_experiment(env, capsys):
    path = env.root / "two_tasks.toml"
    path.write_text(TWO_TASKS)
    assert main(env.argv(path, "--set", "epochs=1", "--seeds", "0")) == 0, capsys.readouterr().err
    trials = trials_of(env.storage, "two_tasks")
    assert sorted((t.params["task"], t.params["method"]) for t in trials) == [
        ("lenet5", "ours"), ("lenet5", "trn"), ("mlp2", "ours"), ("mlp2", "trn")]
    _, children = parent_and_children(env.uri, "two_tasks")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=env.uri)
    for child in children:
        task = child.data.params["task"]
        assert client.get_experiment(child.info.experiment_id).name == task
        assert child.data.params["initial_rank"] == "4"
        assert (child.data.params.get("rank") == "3") == (child.data.params["method"] == "trn")


def test_a_study_over_several_tasks_gets_one_pareto_front_per_task(env, capsys):
    path = env.root / "two_tasks.toml"
    path.write_text(TWO_TASKS.replace('val_accuracy = "maximize"',
                                      'val_accuracy = "maximize"\ncompression = "maximize"'))
    out = env.root / "plots"
    assert main(env.argv(path, "--set", "epochs=1", "--seeds", "0", "--out", str(out))) == 0, capsys.readouterr().err
    assert "A new study created" not in capsys.readouterr().err
    for task in ("mlp2", "lenet5"):
        assert (out / f"pareto_front_{task}.png").read_bytes().startswith(PNG_MAGIC)
    assert not (out / "pareto_front.png").exists()
    import optuna

    from rankbench.study.plots import _of_task

    study = optuna.load_study(study_name="two_tasks", storage=env.storage)
    for task in ("mlp2", "lenet5"):
        assert sorted(t.params["method"] for t in _of_task(study, task).trials) == ["ours", "trn"]
        assert {t.params["task"] for t in _of_task(study, task).trials} == {task}


def test_task_and_tasks_together_or_neither_is_a_one_line_error():
    tomllib = toml_module()

    both = TWO_TASKS.replace('tasks = ["mlp2", "lenet5"]', 'task = "mlp2"\ntasks = ["mlp2"]')
    neither = TWO_TASKS.replace('tasks = ["mlp2", "lenet5"]\n', "")
    for text in (both, neither):
        with pytest.raises(RankbenchError, match="task = .* or tasks = "):
            parse_study(tomllib.loads(text), Registry.discover())
    with pytest.raises(RankbenchError, match="unknown task 'nope'"):
        parse_study(tomllib.loads(TWO_TASKS.replace('"lenet5"]', '"nope"]')), Registry.discover())


# ---------------------------------------------------------------------------- 3. validation errors


GOOD = """name = "existing"
task = "mlp2"
methods = ["ours"]

[search.lambda]
grid = [0.1, 1.0]

[objectives]
val_accuracy = "maximize"

[sampler]
name = "grid"
"""


@pytest.fixture(scope="module")
def existing(tmp_path_factory, data_dir, mlflow_template):
    """A store holding study "existing" with one finished trial (``--n-trials 1``)."""
    root = tmp_path_factory.mktemp("existing")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        store = Env(root, data_dir, mlflow_template)
        (root / "good.toml").write_text(GOOD)
        assert main(store.argv(root / "good.toml", "--n-trials", "1", *TINY)) == 0
    return store


def snapshot(store: Env):
    trials = trials_of(store.storage, "existing")
    return (study_names(store.storage), [(t.number, t.state.name, t.params, t.values) for t in trials],
            sorted(r.info.run_id for r in all_runs(store.uri)))


BAD_FILES = {
    "unknown-hyperparameter": (GOOD.replace("[search.lambda]", "[search.nope]"), ["'nope'", "lambda"]),
    "empty-range": (GOOD.replace("grid = [0.1, 1.0]", "low = 1.0\nhigh = 1.0").replace('"grid"', '"tpe"'),
                    ["empty range", "low < high"]),
    "reversed-range": (GOOD.replace("grid = [0.1, 1.0]", "low = 2.0\nhigh = 1.0").replace('"grid"', '"random"'),
                       ["empty range"]),
    "empty-grid": (GOOD.replace("grid = [0.1, 1.0]", "grid = []"), ["non-empty list"]),
    "unknown-sampler": (GOOD.replace('name = "grid"', 'name = "annealing"'), ["'annealing'", "tpe"]),
    "unrecorded-metric": (GOOD.replace("val_accuracy =", "val_f1 ="), ["'val_f1'", "val_accuracy"]),
    "test-metric": (GOOD.replace("val_accuracy =", "test_accuracy ="), ["test_accuracy", "never optimised"]),
    "malformed-toml": (GOOD.replace('task = "mlp2"', 'task = "mlp2'), ["not valid TOML"]),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_invalid_study_file_exits_2_with_one_line_and_leaves_the_existing_study_untouched(
        case, existing, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    text, expected = BAD_FILES[case]
    bad = tmp_path / "bad.toml"
    bad.write_text(text)
    before = snapshot(existing)
    capsys.readouterr()
    assert main(existing.argv(bad, *TINY)) == 2
    line = assert_one_line_error(capsys.readouterr().err)
    for text in expected:
        assert text in line, line
    assert snapshot(existing) == before


@pytest.mark.parametrize("case", ["missing-file", "unknown-set-key", "zero-workers", "zero-trials"])
def test_bad_command_line_exits_2_with_one_line_and_leaves_the_existing_study_untouched(
        case, existing, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    good = tmp_path / "good.toml"
    good.write_text(GOOD)
    argv, expected = {
        "missing-file": (existing.argv(tmp_path / "absent.toml", *TINY), ["absent.toml", "cannot read"]),
        "unknown-set-key": (existing.argv(good, *TINY, "--set", "nope=1"), ["'nope'", "--set"]),
        "zero-workers": (existing.argv(good, *TINY, "--workers", "0"), ["--workers"]),
        "zero-trials": (existing.argv(good, *TINY, "--n-trials", "0"), ["--n-trials"]),
    }[case]
    before = snapshot(existing)
    capsys.readouterr()
    assert main(argv) == 2
    line = assert_one_line_error(capsys.readouterr().err)
    for text in expected:
        assert text in line, line
    assert snapshot(existing) == before


def test_n_trials_beyond_the_grid_exits_2_like_the_same_budget_in_the_file(env, capsys):
    path = write_study(env.root, "overgrid", grid={"lambda": [0.1]}, objectives={"val_accuracy": "maximize"})
    assert quiet_main(env.argv(path, *TINY, "--n-trials", "2")) == 2
    line = assert_one_line_error(capsys.readouterr().err)
    assert "exceeds the grid" in line
    assert not (env.root / "optuna.db").exists() or study_names(env.storage) == []


BAD_STORAGE = "sqlite:////nonexistent-dir-rankbench/x.db"


def test_a_storage_that_cannot_be_opened_exits_2_naming_it(existing, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    good = tmp_path / "good.toml"
    good.write_text(GOOD)
    before = snapshot(existing)
    capsys.readouterr()
    assert quiet_main(existing.argv(good, *TINY, storage=BAD_STORAGE)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.startswith("rankbench: error: cannot open study storage sqlite:////nonexistent-dir-rankbench/x.db")
    assert "--storage" in err
    assert snapshot(existing) == before  # and no MLflow run was made
    assert not Path("/nonexistent-dir-rankbench").exists()


def test_a_storage_that_cannot_be_opened_is_a_one_line_error(existing, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    good = tmp_path / "good.toml"
    good.write_text(GOOD)
    assert quiet_main(existing.argv(good, *TINY, storage=BAD_STORAGE)) == 2
    assert_one_line_error(capsys.readouterr().err)


def create_existing_with_other_direction(storage_url: str) -> None:
    import optuna

    storage = optuna.storages.RDBStorage(storage_url)
    try:
        optuna.create_study(study_name="existing", storage=storage, direction="minimize")
    finally:
        storage.engine.dispose()


def test_a_study_file_whose_objectives_differ_from_the_stored_study_exits_2(env, capsys):
    create_existing_with_other_direction(env.storage)
    good = env.root / "good.toml"
    good.write_text(GOOD)
    assert quiet_main(env.argv(good, *TINY)) == 2
    line = assert_one_line_error(capsys.readouterr().err)
    assert "['minimize']" in line and "['maximize']" in line
    assert trials_of(env.storage, "existing") == []
    assert all_runs(env.uri) == []


@pytest.mark.parametrize("line", ['sampler = "grid"', 'budget = 4'])
def test_scalar_where_a_table_belongs_exits_2(line, existing, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.toml"
    text = GOOD.replace('[sampler]\nname = "grid"\n', "")
    bad.write_text(text.replace('methods = ["ours"]', f'methods = ["ours"]\n{line}'))
    before = snapshot(existing)
    rc = main(existing.argv(bad, *TINY))
    assert rc == 2
    assert_one_line_error(capsys.readouterr().err)
    assert snapshot(existing) == before


def test_pruned_study_on_a_final_only_metric_is_rejected_or_runs(env, capsys):
    path = env.root / "prune.toml"
    path.write_text(GOOD.replace('name = "existing"', 'name = "prune"')
                    .replace('val_accuracy = "maximize"', 'parameters = "minimize"')
                    + '\n[pruner]\nname = "median"\n')
    rc = main(env.argv(path, *TINY))
    err = capsys.readouterr().err
    if rc == 2:  # rejected while validating: nothing was stored
        assert_one_line_error(err)
        assert not (env.root / "optuna.db").exists() or study_names(env.storage) == []
    else:
        assert rc == 0, err
        assert states(trials_of(env.storage, "prune")) == ["COMPLETE", "COMPLETE"]


def test_a_study_command_raises_no_future_warning(env, recwarn, capsys):
    create_existing_with_other_direction(env.storage)
    good = env.root / "good.toml"
    good.write_text(GOOD)
    assert main(env.argv(good, *TINY)) == 2  # fails after opening the storage, as every study run does
    assert_one_line_error(capsys.readouterr().err)
    shown = [f"{w.category.__name__}: {w.message}" for w in recwarn if issubclass(w.category, FutureWarning)]
    assert shown == []


# ---------------------------------------------------------------------------- 4. Ctrl-C and resume


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, data_dir, mlflow_template):
    """Study "resume" (grid of 3): Ctrl-C during the 2nd trial, then the same command again."""
    root = tmp_path_factory.mktemp("resume")
    result = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        store = Env(root, data_dir, mlflow_template)
        argv = store.argv(write_study(root, "resume"), *TINY)
        real = rankbench.study.runner.run_trial
        calls = []

        def interrupting(trial, run, registry, tracker, **kwargs):
            calls.append(1)
            if len(calls) == 2:  # Ctrl-C once the trial has its configuration, as during training
                rankbench.study.runner.trial_assignments(trial, run.spec, registry)
                raise KeyboardInterrupt
            return real(trial, run, registry, tracker, **kwargs)

        mp.setattr(rankbench.study.runner, "run_trial", interrupting)
        result["rc_interrupted"] = main(argv)
        result["after_interrupt"] = trials_of(store.storage, "resume")
        result["parents_after_interrupt"] = parent_and_children(store.uri, "resume")[0]
        mp.setattr(rankbench.study.runner, "run_trial", real)
        result["rc_resumed"] = main(argv)
        result["after_resume"] = trials_of(store.storage, "resume")
        result["store"] = store
    return result


def test_ctrl_c_exits_130_and_the_rerun_retries_the_interrupted_trial(resumed):
    assert resumed["rc_interrupted"] == 130
    first = resumed["after_interrupt"]
    assert states(first) == ["COMPLETE", "FAIL"]
    assert first[1].params and first[1].params != first[0].params
    assert first[1].user_attrs["interrupted"] is True
    assert "KeyboardInterrupt" in first[1].user_attrs["failure_reason"]
    (parent,) = resumed["parents_after_interrupt"]
    assert parent.info.status == "KILLED"

    assert resumed["rc_resumed"] == 0
    trials = resumed["after_resume"]
    done = complete(trials)
    assert len(done) == 3  # the budget (the grid's 3 points), exactly
    assert len({point(t) for t in done}) == 3  # no grid point twice
    assert {t.params["lambda"] for t in done} == {0.1, 0.5, 1.0}
    assert [t.state.name for t in trials if t.state.name != "COMPLETE"] == ["FAIL"]
    (retry,) = [t for t in done if t.system_attrs.get("failed_trial") == first[1].number]
    assert retry.params == first[1].params
    assert retry.number > first[1].number

    store = resumed["store"]
    parents, children = parent_and_children(store.uri, "resume")
    assert [p.info.run_id for p in parents] == [parent.info.run_id]  # the parent run is found again
    assert parents[0].info.status == "FINISHED"
    assert sorted(int(c.data.tags["trial"]) for c in children) == sorted(t.number for t in done)


def test_the_complete_retry_does_not_carry_the_interrupt_marks(resumed, capsys):
    (retry,) = [t for t in complete(resumed["after_resume"]) if "failed_trial" in t.system_attrs]
    store = resumed["store"]
    assert main(["study", "show", "resume", "--storage", store.storage]) == 0
    rows = {int(r[0]): r for r in table_rows(capsys.readouterr().out)}
    assert rows[retry.number][1] == "COMPLETE"
    assert "KeyboardInterrupt" not in " ".join(rows[retry.number])
    assert not retry.user_attrs.get("interrupted")
    assert not retry.user_attrs.get("failure_reason")  # Optuna cannot delete a user attr: it is emptied


# ---------------------------------------------------------------------------- 5. a killed worker


def test_a_killed_worker_trial_goes_stale_and_is_retried(env, capsys):
    # epochs=80 on the tiny data: a trial takes ~2.5 s, long enough to be killed mid-trial after its first heartbeat
    path = write_study(env.root, "killed", heartbeat=(1, 2))
    proc, log = start_cli(env.argv(path, "--set", "epochs=80", "--seeds", "0"), env.root, "worker")
    db = env.root / "optuna.db"
    deadline = time.time() + 90
    try:
        while True:
            rows = sqlite_trial_states(db)
            # running, with a heartbeat recorded and its configuration drawn (so it is killed mid-training)
            running = [r for r in rows if r[1] == "RUNNING" and r[2] and r[3]]
            if any(r[1] == "COMPLETE" for r in rows) and running:
                break
            assert proc.poll() is None, f"the worker ended before it could be killed:\n{log.read_text()}"
            assert time.time() < deadline, f"no running trial to kill:\n{rows}\n{log.read_text()}"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    killed_number = running[0][0]
    assert proc.returncode == -signal.SIGKILL
    time.sleep(2.5)  # > grace_period

    # the same study again, in-process, with the same --set (a study refuses other fixed settings)
    assert main(env.argv(path, "--set", "epochs=80", "--seeds", "0")) == 0, capsys.readouterr().err
    trials = trials_of(env.storage, "killed")
    seen = [(t.number, t.state.name, t.params, t.system_attrs.get("failed_trial")) for t in trials]
    done = complete(trials)
    assert len(done) == 3, (killed_number, seen)
    assert len({point(t) for t in done}) == 3, seen
    killed = trials[killed_number]
    assert killed.state.name == "FAIL", (killed_number, seen)
    assert [t.number for t in trials if t.state.name != "COMPLETE"] == [killed_number], seen
    (retry,) = [t for t in done if t.system_attrs.get("failed_trial") == killed_number]
    assert retry.params == killed.params


SLOW_PLUGINS = Path(__file__).resolve().parent / "plugins_slow"


def sqlite_run_statuses(db: Path) -> list[str]:
    """The status of every MLflow run, read straight from the store's sqlite file."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            return [row[0] for row in conn.execute("SELECT status FROM runs")]
    except sqlite3.Error:
        return []


def seed_outcomes(uri: str, study: str) -> dict[int, dict]:
    """Per seed of a study's (one-trial) runs: run id, status, final metrics, per-epoch histories."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    out = {}
    for run in parent_and_children(uri, study)[1]:
        history = {key: [(m.step, m.value) for m in sorted(client.get_metric_history(run.info.run_id, key),
                                                             key=lambda m: m.step)]
                   for key in ("train_loss", "val_loss", "val_accuracy", "compression")}
        out[int(run.data.params["seed"])] = {
            "run_id": run.info.run_id, "status": run.info.status, "history": history,
            "final": {k: run.data.metrics.get(k) for k in ("test_accuracy", "test_loss", "parameters")}}
    return out


def test_a_killed_trial_is_listed_as_died_and_its_retry_reuses_finished_seeds_and_continues_the_killed_run(
        env, mlflow_template, capsys):
    import torch

    grid = {"lambda": [5]}
    settings = ["--plugin-dir", str(SLOW_PLUGINS), "--seeds", "0,1", "--set", "epochs=4", "--set", "batch_size=16",
                "--set", "initial_rank=3"]
    path = write_study(env.root, "cont", grid=grid, methods=("slow_ours",), heartbeat=(1, 2))
    argv = env.argv(path, *settings)
    proc, log = start_cli(argv, env.root, "cont")
    checkpoints = env.root / "checkpoints"
    deadline = time.time() + 120
    try:  # kill -9 during seed 1's epoch 3 (seed 0 has finished; an epoch takes about half a second)
        while True:
            found = list(checkpoints.glob("*.pt")) if checkpoints.is_dir() else []
            if sqlite_run_statuses(env.root / "mlflow.db").count("FINISHED") == 1 and found:
                with contextlib.suppress(FileNotFoundError):  # seed 0's, removed as it finished
                    if torch.load(found[0], weights_only=False)["epoch"] >= 2:
                        break
            assert proc.poll() is None, log.read_text()
            assert time.time() < deadline, "seed 1 never reached epoch 3"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    killed_run = found[0].stem
    before = seed_outcomes(env.uri, "cont")
    assert before[0]["status"] == "FINISHED" and before[1]["status"] == "RUNNING"
    assert before[1]["run_id"] == killed_run

    capsys.readouterr()
    assert main(["study", "--list", "--storage", env.storage, "--tracking-uri", env.uri]) == 0
    listed = capsys.readouterr()
    (row,) = table_rows(listed.out)
    assert row[:5] == ["cont", "1", "maximize, maximize", "0", "1"]  # no run running, one died
    assert f"run {killed_run} of study cont" in listed.err and "had died" in listed.err
    time.sleep(2.5)  # > grace_period: the killed trial goes stale

    assert main(argv) == 0, capsys.readouterr().err
    after = seed_outcomes(env.uri, "cont")
    assert {seed: o["run_id"] for seed, o in after.items()} == {0: before[0]["run_id"], 1: killed_run}
    assert [o["status"] for o in after.values()] == ["FINISHED", "FINISHED"]
    assert after[0] == before[0]  # the finished seed was read back, not trained again
    trials = trials_of(env.storage, "cont")
    assert states(trials) == ["FAIL", "COMPLETE"]
    assert [s["run_id"] for s in trials[1].user_attrs["seeds"]] == [before[0]["run_id"], killed_run]
    assert not list(checkpoints.glob("*.pt"))

    (env.root / "ref").mkdir()
    reference = Env(env.root / "ref", env.data_dir, mlflow_template)  # the same study, never killed
    proc, log = start_cli(reference.argv(path, *settings), reference.root, "ref")
    assert proc.wait(timeout=120) == 0, log.read_text()
    uninterrupted = seed_outcomes(reference.uri, "cont")
    for seed in (0, 1):
        assert after[seed]["history"] == uninterrupted[seed]["history"], seed
        assert after[seed]["final"] == uninterrupted[seed]["final"], seed


def test_a_retry_finds_the_earlier_attempts_runs_by_their_trial_tag_when_it_did_not_record_them(
        env, mlflow_template, monkeypatch, capsys):
    """The first attempt records no ``runs`` attribute (as rankbench before it did, or a worker that
    died first) and is interrupted (Ctrl-C) in seed 1's third epoch: the retry still reads seed 0
    back and continues seed 1 from its checkpoint, found among the study's runs by trial tag."""
    import optuna

    import rankbench.run.tracking

    path = write_study(env.root, "lineage", grid={"lambda": [0.5]})
    settings = ["--seeds", "0,1", "--set", "epochs=4", "--set", "initial_rank=3"]
    real_set = optuna.trial.Trial.set_user_attr
    real_log = rankbench.run.tracking.Tracker.log_metrics
    logged = []

    def log_then_interrupt(self, run_id, metrics, step=None):
        logged.append(run_id)
        if len(set(logged)) == 2 and logged.count(run_id) == 3:  # seed 1, epoch 3
            raise KeyboardInterrupt
        return real_log(self, run_id, metrics, step)

    with monkeypatch.context() as mp:
        mp.setattr(optuna.trial.Trial, "set_user_attr",
                   lambda self, key, value: None if key == "runs" else real_set(self, key, value))
        mp.setattr(rankbench.run.tracking.Tracker, "log_metrics", log_then_interrupt)
        assert quiet_main(env.argv(path, *settings)) == 130
    before = seed_outcomes(env.uri, "lineage")
    assert [before[s]["status"] for s in (0, 1)] == ["FINISHED", "KILLED"]
    assert "runs" not in trials_of(env.storage, "lineage")[0].user_attrs

    assert quiet_main(env.argv(path, *settings)) == 0, capsys.readouterr().err
    after = seed_outcomes(env.uri, "lineage")
    assert {s: o["run_id"] for s, o in after.items()} == {s: o["run_id"] for s, o in before.items()}
    assert after[0] == before[0] and after[1]["status"] == "FINISHED"

    (env.root / "ref").mkdir()
    reference = Env(env.root / "ref", env.data_dir, mlflow_template)
    assert quiet_main(reference.argv(path, *settings)) == 0
    uninterrupted = seed_outcomes(reference.uri, "lineage")
    for seed in (0, 1):
        assert after[seed]["history"] == uninterrupted[seed]["history"], seed
        assert after[seed]["final"] == uninterrupted[seed]["final"], seed


def test_a_worker_killed_before_its_first_heartbeat_interval_is_retried(env, capsys):
    path = write_study(env.root, "early", grid={"lambda": [0.1, 1.0]}, heartbeat=(2, 2))
    path.write_text(path.read_text() + "\n[budget]\ntimeout_s = 6\n")  # the rerun gives up after 6 s
    argv = env.argv(path, *TINY)
    # the worker dies (SIGKILL, no clean-up) 0.3 s into its first trial
    prelude = ("import os, signal, time\nimport rankbench.study.runner as s\n"
               "def die(*a, **k):\n    time.sleep(0.3)\n    os.kill(os.getpid(), signal.SIGKILL)\n"
               "s.run_trial = die")
    proc, log = start_cli(argv, env.root, "early", prelude=prelude)
    assert proc.wait(timeout=120) == -signal.SIGKILL, log.read_text()
    assert [r[1] for r in sqlite_trial_states(env.root / "optuna.db")] == ["RUNNING"]
    time.sleep(2.5)  # > grace_period

    assert main(argv) == 0, capsys.readouterr().err
    trials = trials_of(env.storage, "early")
    assert len(complete(trials)) == 2
    assert states(trials)[0] == "FAIL"


# ---------------------------------------------------------------------------- 6. and 7. several workers


def assert_four_distinct_points(storage: str, name: str) -> None:
    trials = trials_of(storage, name)
    assert states(trials) == ["COMPLETE"] * 4, states(trials)  # no extra trial in any state
    assert sorted(t.params["lambda"] for t in trials) == [0.1, 0.2, 0.5, 1.0]


FOUR = {"lambda": [0.1, 0.2, 0.5, 1.0]}


def test_two_worker_processes_finish_exactly_the_grid(env, capsys):
    path = write_study(env.root, "two", grid=FOUR, objectives={"val_accuracy": "maximize"}, heartbeat=(1, 2))
    assert main(env.argv(path, *TINY, "--workers", "2")) == 0, capsys.readouterr().err
    assert "4 trials finished, 0 failed" in capsys.readouterr().out
    assert_four_distinct_points(env.storage, "two")
    parents, children = parent_and_children(env.uri, "two")
    assert len(parents) == 1 and len(children) == 4
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}


def test_two_independent_commands_on_one_storage_finish_exactly_the_grid(env):
    path = write_study(env.root, "pair", grid=FOUR, objectives={"val_accuracy": "maximize"}, heartbeat=(1, 2))
    # Both stores exist beforehand (see the fresh-store test below for why).
    import optuna

    optuna.storages.RDBStorage(env.storage).engine.dispose()
    procs = [start_cli(env.argv(path, *TINY, "--workers", "1"), env.root, f"cmd{i}") for i in range(2)]
    for proc, log in procs:
        assert proc.wait(timeout=120) == 0, log.read_text()
    assert_four_distinct_points(env.storage, "pair")


def test_two_commands_starting_together_share_one_parent_run(env, capsys):
    path = write_study(env.root, "race", grid={"lambda": [0.1, 1.0]}, objectives={"val_accuracy": "maximize"})
    argv = env.argv(path, *TINY)
    real_start = rankbench.run.tracking.Tracker.start
    started, other, threads = [], [], []

    def start(self, experiment, run_name, params, tags):
        if tags.get("rankbench.role") == "study" and not started:
            started.append(1)
            # the other command starts while this one is between reading and writing the study's parent run
            thread = threading.Thread(target=lambda: other.append(main(argv)))
            thread.start()
            threads.append(thread)
            time.sleep(1.0)
        return real_start(self, experiment, run_name, params, tags)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rankbench.run.tracking.Tracker, "start", start)
        assert main(argv) == 0
        threads[0].join(timeout=120)
    assert other == [0]
    assert states(trials_of(env.storage, "race")) == ["COMPLETE", "COMPLETE"]
    parents, children = parent_and_children(env.uri, "race")
    assert len(parents) == 1
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}


def test_two_commands_starting_together_on_fresh_stores_both_succeed(env, monkeypatch, capsys):
    path = write_study(env.root, "fresh", grid={"lambda": [0.1]}, objectives={"val_accuracy": "maximize"})
    (env.root / "mlflow.db").unlink()  # a store nobody created yet
    argv = env.argv(path, *TINY)
    ready, go = env.root / "ready", env.root / "go"
    # Only opening the stores matters here: both commands skip the trials (worker_loop does nothing). One runs
    # in a subprocess, which imports everything, says so, and waits for the signal; the other runs in-process.
    prelude = ("import time, pathlib, optuna, mlflow.tracking, rankbench.study.runner, rankbench.run.experiment, "
               "rankbench.study.plots\n"
               "import matplotlib.pyplot, optuna.visualization, optuna.visualization.matplotlib\n"
               "rankbench.study.runner.worker_loop = lambda run, deadline=None: 0\n"
               f"pathlib.Path({str(ready)!r}).touch()\n"
               f"while not pathlib.Path({str(go)!r}).exists():\n    time.sleep(0.002)")
    monkeypatch.setattr(rankbench.study.runner, "worker_loop", lambda run, deadline=None: 0)
    proc, log = start_cli(argv, env.root, "fresh", prelude=prelude)
    try:
        deadline = time.time() + 60
        while not ready.exists():
            assert proc.poll() is None and time.time() < deadline, log.read_text()
            time.sleep(0.01)
        go.touch()
        here = quiet_main(argv)
        there = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (here, there) == (0, 0), (capsys.readouterr().err[-2000:], log.read_text()[-2000:])
    assert study_names(env.storage) == ["fresh"]


def test_two_workers_on_postgresql_finish_exactly_the_grid(postgres_url, env, capsys):
    name = f"pg-{uuid.uuid4().hex[:12]}"  # the server may be shared
    path = write_study(env.root, name, grid=FOUR, objectives={"val_accuracy": "maximize"}, heartbeat=(1, 2))
    try:
        assert main(env.argv(path, *TINY, "--workers", "2", storage=postgres_url)) == 0, capsys.readouterr().err
        assert_four_distinct_points(postgres_url, name)
    finally:
        import optuna

        storage = optuna.storages.RDBStorage(postgres_url)
        try:
            if name in [s.study_name for s in optuna.get_all_study_summaries(storage)]:
                optuna.delete_study(study_name=name, storage=storage)
        finally:
            storage.engine.dispose()


# ---------------------------------------------------------------------------- 8. a NaN loss


def test_a_trial_whose_loss_becomes_nan_is_pruned_and_the_study_finishes(env, capsys):
    path = write_study(env.root, "nan", grid={"blowup": [False, True]}, methods=("nan_when_big",),
                       objectives={"val_accuracy": "maximize"})
    rc = main([*env.argv(path, *TINY, "--set", "initial_rank=4"), "--plugin-dir", str(PLUGINS)])
    assert rc == 0, capsys.readouterr().err
    capsys.readouterr()
    by_blowup = {t.params["blowup"]: t for t in trials_of(env.storage, "nan")}
    assert set(by_blowup) == {False, True}
    assert by_blowup[False].state.name == "COMPLETE"
    assert by_blowup[True].state.name == "PRUNED"
    assert "nan" in by_blowup[True].user_attrs["failure_reason"].lower()

    runs = {r.data.tags["trial"]: r for r in parent_and_children(env.uri, "nan")[1]}
    assert runs[str(by_blowup[True].number)].info.status == "FAILED"
    assert runs[str(by_blowup[False].number)].info.status == "FINISHED"

    assert main(["study", "show", "nan", "--storage", env.storage]) == 0
    rows = {int(r[0]): r for r in table_rows(capsys.readouterr().out)}
    assert rows[by_blowup[True].number][1] == "PRUNED"
    assert "nan" in rows[by_blowup[True].number][-1]
    assert rows[by_blowup[False].number][1] == "COMPLETE"


# ---------------------------------------------------------------------------- 9.-11. list, show, plots, rerun


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data_dir, mlflow_template):
    """One store with two finished studies: "pareto" (2 objectives, grid of 3) and "single" (grid of 2)."""
    root = tmp_path_factory.mktemp("finished")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        store = Env(root, data_dir, mlflow_template)
        assert main(store.argv(write_study(root, "pareto"), *TINY)) == 0
        single = write_study(root, "single", grid={"lambda": [0.1, 1.0]}, objectives={"val_loss": "minimize"})
        assert main([*store.argv(single, *TINY), "--out", str(root / "single-plots")]) == 0
    return store


def test_list_prints_every_study_with_its_trial_count(finished, capsys):
    capsys.readouterr()
    assert main(["study", "--list", "--storage", finished.storage]) == 0
    rows = {r[0]: r for r in table_rows(capsys.readouterr().out)}
    assert set(rows) == {"pareto", "single"}
    assert rows["pareto"][1] == "3" and rows["single"][1] == "2"
    assert rows["pareto"][2] == "maximize, maximize" and rows["single"][2] == "minimize"


def test_list_of_an_empty_storage_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["study", "--list", "--storage", f"sqlite:///{tmp_path / 'empty.db'}"]) == 0
    assert "no studies" in capsys.readouterr().out


def test_show_prints_one_row_per_trial_with_its_state(finished, capsys):
    capsys.readouterr()
    assert main(["study", "show", "pareto", "--storage", finished.storage]) == 0
    rows = table_rows(capsys.readouterr().out)
    trials = trials_of(finished.storage, "pareto")
    assert [(int(r[0]), r[1]) for r in rows] == [(t.number, t.state.name) for t in trials]
    for row, trial in zip(rows, trials):
        assert row[2] == "ours"
        assert row[3] == f"lambda={trial.params['lambda']}"


def test_show_of_an_unknown_study_exits_2_listing_the_known_ones(finished, capsys):
    capsys.readouterr()
    assert main(["study", "show", "nope", "--storage", finished.storage]) == 2
    line = assert_one_line_error(capsys.readouterr().err)
    assert "'nope'" in line and "pareto" in line and "single" in line


def test_plots_are_png_files_and_artifacts_of_the_parent_run(finished):
    for name in ("pareto_front.png", "history.png"):
        data = (finished.out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000, name
    (parent,) = parent_and_children(finished.uri, "pareto")[0]
    plots = artifact_paths(finished.uri, parent.info.run_id, "plots")
    assert {"plots/pareto_front.png", "plots/history.png"} <= plots
    single = finished.root / "single-plots"
    assert (single / "history.png").read_bytes().startswith(PNG_MAGIC)
    assert not (single / "pareto_front.png").exists()  # one objective: no Pareto front


def test_rerunning_a_finished_study_runs_no_trial(finished, monkeypatch, capsys):
    monkeypatch.chdir(finished.root)
    before = [(t.number, t.state.name, t.values) for t in trials_of(finished.storage, "pareto")]
    runs_before = sorted(r.info.run_id for r in all_runs(finished.uri))
    calls = []
    real = rankbench.study.runner.run_trial
    monkeypatch.setattr(rankbench.study.runner, "run_trial", lambda *a, **k: calls.append(1) or real(*a, **k))
    capsys.readouterr()
    assert main(finished.argv(finished.root / "pareto.toml", *TINY)) == 0
    assert "3 trials finished, 0 failed" in capsys.readouterr().out
    assert calls == []
    assert [(t.number, t.state.name, t.values) for t in trials_of(finished.storage, "pareto")] == before
    assert sorted(r.info.run_id for r in all_runs(finished.uri)) == runs_before
