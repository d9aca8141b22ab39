"""``rankbench study FILE``: every mistake in a study file or on its command line is one line on
stderr (exit 2) found before any store exists: no Optuna storage, no MLflow store, no lock file,
no plot folder. Also storages that cannot be a SQLite file fail at once."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from helpers import assert_one_line_error, make_tiny_mnist
from rankbench.cli import main
from rankbench.errors import RankbenchError
from rankbench.plugins.registry import Registry
from rankbench.study.spec import load_study_file

GOOD = """name = "checked"
task = "mlp2"
methods = ["ours"]

[search.lambda]
grid = [0.1, 1.0]

[objectives]
val_accuracy = "maximize"

[sampler]
name = "grid"
"""


def with_table(table: str, *lines: str, text: str = GOOD) -> str:
    """GOOD with ``lines`` added to ``[table]`` (a new table at the end if GOOD has none)."""
    header = f"[{table}]\n"
    if header in text:
        return text.replace(header, header + "".join(f"{line}\n" for line in lines))
    return text + "\n" + header + "".join(f"{line}\n" for line in lines)


BAD_FILES = [
    # a string (or a list) where an integer belongs
    (with_table("sampler", 'seed = "x"'), '[sampler]: seed = "x"'),
    (with_table("sampler", "seed = [1]"), "[sampler]: seed = [1]"),
    (with_table("sampler", "seed = -1"), "[sampler]: seed = -1"),
    (with_table("sampler", "seed = true"), "[sampler]: seed = true"),
    (with_table("workers", 'heartbeat_interval = "fast"'), 'heartbeat_interval = "fast"'),
    (with_table("workers", "grace_period = 2.5"), "grace_period = 2.5"),
    (GOOD.replace('methods = ["ours"]', 'methods = ["ours"]\nseed = [1]'), "did you mean 'seeds'?"),
    # unknown keys in the settings tables, with the key meant
    (GOOD.replace('name = "grid"', 'nmae = "random"'), "[sampler]: unknown key 'nmae': did you mean 'name'?"),
    (with_table("budget", "n_trial = 1"), "[budget]: unknown key 'n_trial': did you mean 'n_trials'?"),
    (with_table("budget", "timeout = 60"), "did you mean 'timeout_s'?"),
    (with_table("pruner", 'nam = "median"'), "[pruner]: unknown key 'nam': did you mean 'name'?"),
    (with_table("workers", "heartbeat = 2"), "[workers]: unknown key 'heartbeat': did you mean 'heartbeat_interval'?"),
    # ranges Optuna's heartbeat needs
    (with_table("workers", "heartbeat_interval = 0"), "heartbeat_interval = 0: heartbeat_interval must be"),
    (with_table("workers", "heartbeat_interval = -3"), "heartbeat_interval = -3"),
    (with_table("workers", "grace_period = -1"), "grace_period = -1: grace_period must be"),
    (with_table("workers", "grace_period = 0"), "grace_period = 0"),
    (with_table("workers", "heartbeat_interval = 5", "grace_period = 2"), ">= heartbeat_interval (5)"),
    # booleans are not numbers
    (with_table("budget", "n_trials = true"), "n_trials = true: n_trials must be a positive integer"),
    (with_table("budget", "timeout_s = true"), "timeout_s = true"),
    (GOOD.replace('methods = ["ours"]', 'methods = ["ours"]\nbudget_steps = true'), "budget_steps = true"),
    # values of fixed settings, checked against the declared hyperparameter, naming the table
    (with_table("fixed", "lambda = -1.0"), "[fixed]: lambda=-1.0: must be >= 0"),
    (with_table("fixed", 'epochs = "many"'), "[fixed]: epochs='many': expected int"),
    (with_table("fixed", "epochs = 0"), "[fixed]: epochs=0: must be >= 1"),
    (with_table("fixed", 'penalty_reduction = "max"'), "[fixed]: penalty_reduction='max': choose one of mean, sum"),
    (with_table("method_fixed.ours", "sigma = 0.0"), "[method_fixed.ours]: sigma=0.0: must be >= 1e-06"),
    (with_table("method_fixed", "ours = 3"), "[method_fixed.ours]: write [method_fixed.ours]"),
    # search tables
    (GOOD.replace("grid = [0.1, 1.0]", 'low = 0.1\nhigh = 1.0\nlog = "no"').replace('"grid"', '"tpe"')
     + "\n[budget]\nn_trials = 2\n", 'log = "no": write log = true or log = false'),
    (GOOD.replace("grid = [0.1, 1.0]", "grid = [0.1, 1.0]\nstep = 0.1"),
     "[search].lambda: unknown key 'step'"),
    (GOOD.replace("grid = [0.1, 1.0]", "choices = [0.1, 1.0]\nlog = true").replace('"grid"', '"tpe"'),
     "[search].lambda: unknown key 'log'"),
    (GOOD.replace("grid = [0.1, 1.0]", "grid = [0.1, 1.0]\nchoices = [0.5]"),
     "grid = [...] or choices = [...], not both"),
    (GOOD.replace("grid = [0.1, 1.0]", "grid = [0.1, 0.1]"), "lists 0.1 twice"),
    (GOOD.replace("grid = [0.1, 1.0]", "grid = [0.1, -1.0]"), "[search].lambda: lambda=-1.0: must be >= 0"),
    (GOOD.replace("grid = [0.1, 1.0]", "low = 0.1\nhigh = 1.0\nlow_ = 1").replace('"grid"', '"tpe"'),
     "did you mean 'low'?"),
    # a name that is not one folder name: the plots go to rankbench-runs/studies/NAME
    (GOOD.replace('name = "checked"', 'name = "/tmp/rankbench-x"'), 'name = "/tmp/rankbench-x": a study\'s name'),
    (GOOD.replace('name = "checked"', 'name = "a/b"'), 'name = "a/b"'),
    (GOOD.replace('name = "checked"', 'name = "../up"'), 'name = "../up"'),
    (GOOD.replace('name = "checked"', 'name = ".."'), "use no /"),
    (GOOD.replace('name = "checked"', 'name = "a\\\\b"'), "use no /"),
    # replicates
    (GOOD.replace('methods = ["ours"]', 'methods = ["ours"]\nseeds = [0, 0]'), "seeds = [0, 0]: seed 0 is given twice"),
    (GOOD.replace('methods = ["ours"]', 'methods = ["ours"]\nseeds = [true]'), "seeds must be a non-empty list"),
    (GOOD.replace('methods = ["ours"]', 'methods = ["ours", "ours"]'), "methods lists 'ours' twice"),
]


@pytest.fixture(scope="module")
def broken_data(tmp_path_factory) -> Path:
    """A data folder whose MNIST training images are corrupt: a check that lets a study through fails
    at its first trial, at once, instead of training on the embedded digits."""
    return make_tiny_mnist(tmp_path_factory.mktemp("data"), bad_magic="train-images-idx3-ubyte")


@pytest.fixture
def stores(tmp_path, monkeypatch, broken_data) -> dict[str, Path]:
    """Paths of the stores a study command would create (none exists), with the test inside tmp_path."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in").mkdir()
    return {"optuna": tmp_path / "optuna.db", "mlflow": tmp_path / "mlflow.db", "data": broken_data}


def run_study_cli(study: Path, stores: dict[str, Path], *extra: str) -> int:
    return main(["study", str(study), "--storage", f"sqlite:///{stores['optuna']}",
                 "--tracking-uri", f"sqlite:///{stores['mlflow']}", "--data-dir", str(stores["data"]), *extra])


def assert_nothing_written(root: Path) -> None:
    """Only the folder holding the study file: no store, lock file, plot or run folder."""
    assert sorted(p.name for p in root.iterdir()) == ["in"]
    assert [p.name for p in (root / "in").iterdir()] == ["study.toml"]


@pytest.mark.parametrize("text, fragment", BAD_FILES, ids=[f"{i}-{frag[:30]}" for i, (_, frag) in enumerate(BAD_FILES)])
def test_a_bad_study_file_is_one_line_exit_2_before_any_store_exists(text, fragment, stores, tmp_path, capsys):
    study = tmp_path / "in" / "study.toml"
    study.write_text(text)
    assert run_study_cli(study, stores) == 2
    line = assert_one_line_error(capsys.readouterr().err)
    assert fragment in line, line
    assert str(study) in line or "--" in line, line  # names the file (or the option)
    assert_nothing_written(tmp_path)


BAD_OPTIONS = [
    (["--set", "sigma=abc"], "--set sigma=abc: expected float"),
    (["--set", "sigma=-1"], "--set sigma=-1.0: must be >= 1e-06"),
    (["--set", "lambda=2"], "--set lambda: the study searches lambda"),
    (["--set", "epochs=0"], "--set epochs=0: must be >= 1"),
    (["--set", "penalty_reduction=max"], "--set penalty_reduction='max': choose one of mean, sum"),
    (["--seeds", "0,0"], "--seeds: seed 0 is given twice"),
    (["--seeds", "0,-1"], "--seeds: seed -1 is out of range"),
]


@pytest.mark.parametrize("extra, fragment", BAD_OPTIONS, ids=[" ".join(e) for e, _ in BAD_OPTIONS])
def test_a_bad_set_or_seeds_option_is_one_line_exit_2_before_any_store_exists(extra, fragment, stores, tmp_path,
                                                                                 capsys):
    study = tmp_path / "in" / "study.toml"
    study.write_text(GOOD)
    assert run_study_cli(study, stores, *extra) == 2
    line = assert_one_line_error(capsys.readouterr().err)
    assert fragment in line, line
    assert_nothing_written(tmp_path)


def test_with_overrides_parses_set_strings_to_the_declared_types_and_refuses_repeated_seeds(tmp_path):
    registry = Registry.discover()
    path = tmp_path / "study.toml"
    path.write_text(GOOD)
    spec = load_study_file(path, registry)
    assert spec.with_overrides(fixed={"epochs": "2", "sigma": "1"}, registry=registry).fixed == {"epochs": 2,
                                                                                                "sigma": 1.0}
    with pytest.raises(RankbenchError, match="seed 3 is given twice"):
        spec.with_overrides(seeds=(3, 1, 3))
    with pytest.raises(RankbenchError, match="--set sigma=x: expected float"):
        spec.with_overrides(fixed={"sigma": "x"}, registry=registry)


def test_search_bounds_take_the_hyperparameters_type_and_log_a_boolean(tmp_path):
    path = tmp_path / "study.toml"
    path.write_text(GOOD.replace("grid = [0.1, 1.0]", "low = 1\nhigh = 2\nlog = true").replace('"grid"', '"tpe"')
                    + "\n[budget]\nn_trials = 2\n")
    (param,) = load_study_file(path, Registry.discover()).search.values()
    assert (param.kind, param.low, param.high, param.log) == ("float", 1.0, 2.0, True)
    assert isinstance(param.low, float)


STORAGES = {
    "a-folder": (lambda root: f"sqlite:///{root / 'folder.db'}", "is a folder: give a database file"),
    "a-folder-with-slash": (lambda root: f"sqlite:///{root / 'folder.db'}/", "is a folder"),
    "no-such-folder": (lambda root: f"sqlite:///{root / 'absent' / 'x.db'}",
                       "does not exist: create it or fix --storage"),
}


@pytest.mark.parametrize("case", sorted(STORAGES))
@pytest.mark.parametrize("command", ["run", "list", "show"])
def test_a_sqlite_storage_that_cannot_be_a_file_fails_at_once_in_one_line(case, command, stores, tmp_path, capsys):
    (tmp_path / "folder.db").mkdir()
    url_of, fragment = STORAGES[case]
    url = url_of(tmp_path)
    study = tmp_path / "in" / "study.toml"
    study.write_text(GOOD)
    argv = {"run": ["study", str(study)], "list": ["study", "--list"], "show": ["study", "show", "checked"]}[command]
    main(["list"])  # the plugins are imported before the clock starts
    capsys.readouterr()
    start = time.monotonic()
    assert main([*argv, "--storage", url, "--tracking-uri", f"sqlite:///{stores['mlflow']}"]) == 2
    elapsed = time.monotonic() - start
    line = assert_one_line_error(capsys.readouterr().err)
    assert line.startswith(f"rankbench: error: cannot open study storage {url}: "), line
    assert fragment in line, line
    assert elapsed < 1.0, elapsed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder.db", "in"]  # no lock file, no store
    assert list((tmp_path / "folder.db").iterdir()) == []


def test_an_empty_search_table_samples_the_hyperparameters_declared_range():
    from rankbench.plugins.registry import Registry
    from rankbench.study.spec import parse_study

    registry = Registry.discover(entry_point_groups=False)
    base = {"name": "s", "task": "lenet5", "methods": ["ours"], "objectives": {"val_accuracy": "maximize"},
            "sampler": {"name": "tpe"}, "budget": {"n_trials": 2}}
    spec = parse_study({**base, "search": {"lambda": {}, "selector_lr": {}}}, registry)
    declared = registry.method("ours").hyperparameters
    for key in ("lambda", "selector_lr"):
        param, search = spec.search[key], declared[key].search
        assert (param.kind, param.low, param.high, param.log) == ("float", search.low, search.high, search.log)
    spec = parse_study({**base, "method_search": {"ours": {"sigma": {}}}}, registry)
    assert spec.method_search["ours"]["sigma"].low == declared["sigma"].search.low
    with pytest.raises(RankbenchError, match="offset declares no search range: give grid"):
        parse_study({**base, "search": {"offset": {}}}, registry)
    with pytest.raises(RankbenchError, match="the grid sampler needs grid"):
        parse_study({**base, "sampler": {"name": "grid"}, "search": {"lambda": {}}}, registry)


def test_a_set_of_a_searched_key_is_refused_instead_of_silently_overwritten():
    from rankbench.study.spec import parse_study

    registry = Registry.discover(entry_point_groups=False)
    spec = parse_study({"name": "s", "task": "lenet5", "methods": ["ours", "trn"],
                        "objectives": {"val_accuracy": "maximize"}, "sampler": {"name": "grid"},
                        "search": {"lambda": {"grid": [0.1, 1.0]}},
                        "method_search": {"trn": {"rank": {"grid": [2, 3]}}}}, registry)
    for key in ("lambda", "rank"):
        with pytest.raises(RankbenchError, match=f"--set {key}: the study searches {key}"):
            spec.with_overrides(fixed={key: "2"}, registry=registry)
    assert spec.with_overrides(fixed={"epochs": "1"}, registry=registry).fixed["epochs"] == 1
