"""A probe of hostile inputs, as a new user would type them: each one is either a one-line error
(``rankbench: error: ...``, exit 2) that names the fix, or a valid command. None gives a traceback,
none creates a store it then leaves behind, and none touches the finished run the store holds.

The cases are data (``CASES``): ``{tmp}`` is the test's folder, ``{store}`` a tracking store holding
one finished run (``{run}``), ``{data}`` a tiny dataset. README "Reliability" gives their count.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from helpers import assert_one_line_error, make_tiny_mnist
from rankbench.cli import main

RUN = ["run", "--method", "trn", "--task", "mlp2", "--no-progress", "--set", "val_size=40", "--set", "rank=2",
       "--data-dir", "{data}", "--tracking-uri", "{store}"]
STUDY = ["study", "{tmp}/study.toml", "--storage", "sqlite:///{tmp}/optuna.db", "--tracking-uri", "{store}",
         "--data-dir", "{data}"]
GOOD_STUDY = """name = "probe"
task = "mlp2"
methods = ["trn"]
seeds = [0]
[fixed]
epochs = 1
val_size = 40
[method_search.trn]
rank = { grid = [2] }
[objectives]
val_accuracy = "maximize"
[sampler]
name = "grid"
"""


def study(*replace: tuple[str, str], append: str = "") -> str:
    text = GOOD_STUDY
    for old, new in replace:
        assert old in text
        text = text.replace(old, new)
    return text + append


# (id, argv, study file text or None, a fragment of the error line)
CASES: list[tuple[str, list[str], str | None, str]] = [
    # ---- rankbench run: seeds
    ("seeds-repeated", [*RUN, "--seeds", "0,0,0"], None, "seed 0 is given twice"),
    ("seeds-2**63", [*RUN, "--seeds", str(2**63)], None, "out of range"),
    ("seeds-negative", [*RUN, "--seeds", "-1"], None, "out of range"),
    ("seeds-empty", [*RUN, "--seeds", ""], None, "give integers"),
    ("seeds-words", [*RUN, "--seeds", "a,b"], None, "give integers"),
    # ---- rankbench run: settings
    ("epochs-zero", [*RUN, "--epochs", "0"], None, "epochs"),
    ("epochs-twice", [*RUN, "--epochs", "1", "--set", "epochs=3"], None, "give the epochs once"),
    ("set-twice", [*RUN, "--set", "rank=3"], None, "is given twice"),
    ("set-unknown", [*RUN, "--set", "nosuch=1"], None, "unknown --set key 'nosuch'"),
    ("set-not-a-number", [*RUN, "--set", "lr=fast"], None, "expected float"),
    ("set-nan", [*RUN, "--set", "lr=nan"], None, "finite"),
    ("set-no-key", [*RUN, "--set", "=3"], None, "write key=value"),
    ("set-bad-choice", [*RUN, "--set", "decomposition=cp"], None, "choose one of"),
    ("budget-zero", [*RUN, "--budget", "steps=0"], None, "N must be >= 1"),
    ("budget-words", [*RUN, "--budget", "lots"], None, "write steps=N"),
    ("budget-and-epochs", [*RUN, "--budget", "steps=10", "--epochs", "2"], None, "drop --epochs"),
    ("threads-zero", [*RUN, "--threads", "0"], None, "--threads must be >= 1"),
    ("rank-too-large", ["run", "--method", "trn", "--task", "mlp2", "--set", "val_size=40", "--set", "rank=100000",
                        "--data-dir", "{data}", "--tracking-uri", "{store}"], None, "lower the rank"),
    # ---- rankbench run: machine and options
    ("device-cpu-index", [*RUN, "--device", "cpu:3"], None, "no numbered devices"),
    ("device-unknown", [*RUN, "--device", "tpu"], None, "choose auto, cpu, cuda"),
    ("compile-unknown", [*RUN, "--compile", "maybe"], None, "--compile maybe"),
    ("contraction-unknown", [*RUN, "--contraction", "fastest"], None, "invalid choice"),
    ("format-unknown", [*RUN, "--format", "junk"], None, "--format junk"),
    ("method-unknown", ["run", "--method", "nosuch", "--task", "mlp2"], None, "nosuch"),
    ("task-unknown", ["run", "--method", "trn", "--task", "nosuch"], None, "nosuch"),
    ("method-missing", ["run", "--task", "mlp2"], None, "--method"),
    ("data-dir-missing", [*RUN[:-4], "--data-dir", "{tmp}/nowhere", "--tracking-uri", "{store}"], None,
     "no such folder"),
    ("plugin-dir-missing", [*RUN, "--plugin-dir", "{tmp}/nowhere"], None, "nowhere"),
    # ---- rankbench run: stores and resume
    ("experiment-too-long", [*RUN, "--experiment", "x" * 501], None, "at most 500"),
    ("experiment-empty", [*RUN, "--experiment", " "], None, "non-empty name"),
    ("store-folder-missing", [*RUN[:-2], "--tracking-uri", "sqlite:///{tmp}/nowhere/m.db"], None, "does not exist"),
    ("store-is-a-folder", [*RUN[:-2], "--tracking-uri", "sqlite:///{tmp}"], None, "folder"),
    ("store-two-slashes", [*RUN[:-2], "--tracking-uri", "sqlite://m.db"], None, "three slashes"),
    ("resume-unknown-run", [*RUN, "--resume", "0" * 32], None, "no run"),
    ("resume-finished-run", [*RUN, "--resume", "{run}"], None, "has finished"),
    ("resume-other-seed", [*RUN, "--resume", "{run}", "--seeds", "5"], None, "that run is seed 0"),
    # ---- rankbench report / export
    ("report-group-by-unknown", ["report", "--tracking-uri", "{store}", "--group-by", "nosuch"], None, "nosuch"),
    ("report-format-unknown", ["report", "--tracking-uri", "{store}", "--format", "junk"], None, "--format junk"),
    ("report-baseline-unknown", ["report", "--tracking-uri", "{store}", "--baseline", "nosuch"], None, "nosuch"),
    ("report-out-is-a-file", ["report", "--tracking-uri", "{store}", "--out", "{tmp}/file.txt"], None, "file.txt"),
    ("report-store-missing", ["report", "--tracking-uri", "sqlite:///{tmp}/none.db"], None, "no tracking store"),
    ("report-quote-in-task", ["report", "--tracking-uri", "{store}", "--task", "a'b"], None, "quotes"),
    ("export-out-is-a-folder", ["export", "{run}", "--tracking-uri", "{store}", "--out", "{tmp}"], None, "folder"),
    ("export-unknown-run", ["export", "0" * 32, "--tracking-uri", "{store}", "--out", "{tmp}/m.pt"], None, "no run"),
    # ---- rankbench study
    ("study-file-missing", ["study", "{tmp}/none.toml"], None, "cannot read study file"),
    ("study-seeds-repeated", STUDY, study(("seeds = [0]", "seeds = [0, 0]")), "given twice"),
    ("study-seeds-cli-repeated", [*STUDY, "--seeds", "1,1"], GOOD_STUDY, "seed 1 is given twice"),
    ("study-sampler-typo", STUDY, study(('name = "grid"', 'nmae = "random"')), "nmae"),
    ("study-budget-typo", STUDY, study(append="[budget]\nn_trial = 1\n"), "n_trial"),
    ("study-n-trials-bool", STUDY, study(append="[budget]\nn_trials = true\n"), "n_trials"),
    ("study-sampler-seed-text", STUDY, study(append='seed = "x"\n'), "seed"),
    ("study-heartbeat-text", STUDY, study(append='[workers]\nheartbeat_interval = "fast"\n'), "heartbeat_interval"),
    ("study-heartbeat-zero", STUDY, study(append="[workers]\nheartbeat_interval = 0\n"), "heartbeat_interval"),
    ("study-absolute-name", STUDY, study(('name = "probe"', 'name = "/tmp/probe"')), "name"),
    ("study-log-not-bool", STUDY, study(("rank = { grid = [2] }", 'rank = { low = 2, high = 4, log = "no" }'),
                                        ('name = "grid"', 'name = "tpe"')), "log"),
    ("study-fixed-bad-value", STUDY, study(("val_size = 40", "val_size = -3")), "val_size"),
    ("study-workers-zero", [*STUDY, "--workers", "0"], GOOD_STUDY, "--workers must be >= 1"),
    ("study-show-unknown", ["study", "show", "nosuch", "--storage", "sqlite:///{tmp}/optuna.db"], None, ""),
    # ---- other commands
    ("check-plugin-unknown", ["check-plugin", "nosuch"], None, "nosuch"),
    ("no-command", [], None, "required"),
]


@pytest.fixture(scope="module")
def finished_store(tmp_path_factory) -> dict[str, str]:
    """A store with one finished tiny run, shared by the cases (none may change it)."""
    root = tmp_path_factory.mktemp("probe")
    data = make_tiny_mnist(root / "data")
    store = f"sqlite:///{root / 'store' / 'mlflow.db'}"
    (root / "store").mkdir()
    argv = [part.format(data=data, store=store) for part in RUN] + ["--epochs", "1", "--threads", "1"]
    assert main(argv) == 0
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store)
    (run,) = client.search_runs([client.get_experiment_by_name("mlp2").experiment_id])
    return {"data": str(data), "store": store, "run": run.info.run_id, "database": str(root / "store" / "mlflow.db")}


def store_state(database: str) -> list:
    import sqlite3

    with sqlite3.connect(database) as db:
        return db.execute("select run_uuid, status, end_time from runs order by run_uuid").fetchall()


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_a_hostile_input_is_one_line_exit_2_and_leaves_the_finished_run_alone(case, finished_store, tmp_path,
                                                                           monkeypatch, capsys):
    name, argv, study_text, fragment = case
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file.txt").write_text("not a folder")
    if study_text is not None:
        (tmp_path / "study.toml").write_text(study_text)
    values = {**finished_store, "tmp": str(tmp_path)}
    before = store_state(finished_store["database"])
    capsys.readouterr()
    rc = main([part.format(**values) for part in argv])
    err = capsys.readouterr().err
    assert rc == 2, err
    line = assert_one_line_error(err)
    assert fragment in line, line
    assert store_state(finished_store["database"]) == before
    assert not (tmp_path / "rankbench-runs").exists()  # no default store was made
    assert not (tmp_path / "optuna.db").exists() or name.startswith("study-show")


def test_the_probe_counts_at_least_forty_inputs():
    assert len(CASES) >= 40
    assert len({c[0] for c in CASES}) == len(CASES)


def test_the_probes_good_study_file_is_valid(finished_store, tmp_path, monkeypatch, capsys):
    """So every study case fails for its own change, not for the template."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "study.toml").write_text(GOOD_STUDY)
    values = {**finished_store, "tmp": str(tmp_path), "store": f"sqlite:///{tmp_path / 'own.db'}"}
    assert main([part.format(**values) for part in STUDY]) == 0, capsys.readouterr().err
    shutil.rmtree(tmp_path / "rankbench-runs", ignore_errors=True)
    assert Path(tmp_path / "optuna.db").exists()
