"""A matched-compression study end to end (rankbench/study/matched_runner.py): every method of a task
at the same targets, its knob searched on the first seed and the other seeds trained at the value
found, written as a leaderboard; resumed without training anything twice; bad files refused first."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from helpers import assert_one_line_error, make_tiny_mnist, toml_module
from rankbench.cli import main
from rankbench.plugins.registry import Registry
from rankbench.report.board import Leaderboard
from rankbench.study.spec import parse_study

PLUGINS = Path(__file__).parent / "plugins_matched"
REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p for p in (REPO / "studies").glob("*.toml") if "\n[matched]" in p.read_text())
STUDY = """
name = "matched_tiny"
description = "mlp2 at two matched compressions"
task = "mlp2"
methods = ["dense", "trn", "keep_fraction"]
seeds = [0, 1]

[matched]
targets = [10, 25, 60]
tolerance = 0.1
max_runs = 4
baseline = "trn"

[matched.notes.mlp2]
keep_fraction = "a test plugin"
"""


class Env:
    def __init__(self, root: Path, data_dir: Path, mlflow_template: Path) -> None:
        self.root, self.data_dir = root, data_dir
        shutil.copyfile(mlflow_template, root / "mlflow.db")
        self.uri = f"sqlite:///{root / 'mlflow.db'}"
        self.out = root / "out"

    def argv(self, study_file: Path, *extra: str) -> list[str]:
        return ["study", str(study_file), "--tracking-uri", self.uri, "--out", str(self.out), "--plugin-dir",
                str(PLUGINS), "--data-dir", str(self.data_dir), "--set", "val_size=40", "--set", "epochs=1", *extra]

    def runs(self) -> list:
        client = MlflowClient(self.uri)
        ids = [e.experiment_id for e in client.search_experiments()]
        return [r for r in client.search_runs(ids, max_results=1000) if "matched.key" in r.data.tags]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Random IDX digits under ``<dir>/mnist`` (train 160 / val 40 / test 40 with val_size=40)."""
    return make_tiny_mnist(tmp_path_factory.mktemp("data"))


@pytest.fixture
def env(tmp_path, monkeypatch, data_dir, store_template) -> Env:
    monkeypatch.chdir(tmp_path)
    return Env(tmp_path, data_dir, store_template)


def finished_pairs(env: Env) -> list[tuple[str, str]]:
    return [(r.data.tags["matched.key"], r.data.params["seed"]) for r in env.runs() if r.info.status == "FINISHED"]


def test_every_method_reaches_every_target_and_a_rerun_trains_nothing(env, capsys):
    path = env.root / "matched_tiny.toml"
    path.write_text(STUDY)
    assert main(env.argv(path)) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    board = Leaderboard.read(env.out / "leaderboard.json")
    (mlp2,) = board.boards
    assert mlp2.targets == (10.0, 25.0, 60.0) and mlp2.baseline == "trn"
    curves = {c.method: c for c in mlp2.curves}
    assert set(curves) == {"trn", "keep_fraction"}  # dense is the reference line, not a curve
    assert mlp2.reference is not None and mlp2.reference.point.compression == pytest.approx(1.0)
    assert len(mlp2.reference.runs) == 2

    keep = curves["keep_fraction"]
    assert keep.knob == "keep" and keep.note.endswith("a test plugin")
    # it starts from rank 20 (18.2x) and only removes rank: 10x is out of its reach, said, and not searched
    assert [p.target for p in keep.points] == [25.0, 60.0]
    assert "no point at 10x: below the 18.2x of the model it starts from" in keep.note
    for point in keep.points:  # found on seed 0, seed 1 trained at the same value, both within 10 %
        assert point.hit and [r.seed for r in point.runs] == [0, 1]
        assert all(abs(r.compression / point.target - 1) <= 0.1 for r in point.runs)
        assert point.setting.startswith("keep=")
    trn = curves["trn"]
    for point in trn.points:  # no rank reaches 25x or 60x within 0.5 %: both ranks around it, per seed
        assert point.interpolated and len(point.runs) == 4 and "interpolated" in point.setting
        assert point.point.compression == pytest.approx(point.target, rel=1e-9)
        above, below = point.runs[0], point.runs[1]
        assert above.compression > point.target > below.compression
        low, high = sorted((above.accuracy, below.accuracy))
        assert low - 1e-9 <= point.point.accuracies[0] <= high + 1e-9

    pairs = finished_pairs(env)
    assert len(pairs) == len(set(pairs))  # no (settings, seed) trained twice
    assert board.cost["runs"] == len(pairs) and board.cost["runs_in_board"] <= len(pairs)
    for name in ("trn", "keep_fraction", "10x", "25x", "60x"):
        assert name in out
    assert (env.out / "leaderboard.json").read_text() == board.to_json()

    assert main(env.argv(path)) == 0, capsys.readouterr().err
    assert finished_pairs(env) == pairs or sorted(finished_pairs(env)) == sorted(pairs)  # nothing trained again
    again = Leaderboard.read(env.out / "leaderboard.json")
    assert again.boards == board.boards


def test_a_lost_run_is_trained_again_and_nothing_else(env, capsys):
    path = env.root / "matched_tiny.toml"
    path.write_text(STUDY.replace('methods = ["dense", "trn", "keep_fraction"]', 'methods = ["keep_fraction"]')
                    .replace('baseline = "trn"', ""))
    assert main(env.argv(path)) == 0, capsys.readouterr().err
    board = Leaderboard.read(env.out / "leaderboard.json")
    lost = board.boards[0].curves[0].points[1].runs[1]  # a replicate seed: as if its machine died mid-run
    client = MlflowClient(env.uri)
    client.set_terminated(lost.run_id, "FAILED")
    before = {r.info.run_id for r in env.runs()}
    assert main(env.argv(path)) == 0, capsys.readouterr().err
    new = [r for r in env.runs() if r.info.run_id not in before]
    assert new == [] or len(new) <= 1  # continued in its own MLflow run (from its checkpoint) or one fresh run
    again = Leaderboard.read(env.out / "leaderboard.json").boards[0].curves[0].points[1]
    assert [r.seed for r in again.runs] == [0, 1]
    assert client.get_run(again.runs[1].run_id).info.status == "FINISHED"
    assert sorted(finished_pairs(env)) == sorted(set(finished_pairs(env)))


def test_a_leaderboard_grows_by_methods_and_targets_but_other_settings_are_refused(env, capsys):
    path = env.root / "matched_tiny.toml"
    path.write_text(STUDY.replace('methods = ["dense", "trn", "keep_fraction"]', 'methods = ["trn"]')
                    .replace("targets = [10, 25, 60]", "targets = [25]")
                    .replace("[matched.notes.mlp2]\nkeep_fraction = \"a test plugin\"", ""))
    assert main(env.argv(path)) == 0, capsys.readouterr().err
    first = {r.info.run_id: r.data.tags["matched.key"] for r in env.runs()}
    capsys.readouterr()
    path.write_text(path.read_text().replace("targets = [25]", "targets = [25, 40]")
                    .replace('methods = ["trn"]', 'methods = ["dense", "trn"]'))
    assert main(env.argv(path)) == 0, capsys.readouterr().err
    grown = Leaderboard.read(env.out / "leaderboard.json").boards[0]
    assert grown.targets == (25.0, 40.0) and grown.reference is not None
    assert [p.target for p in grown.curves[0].points] == [25.0, 40.0]
    again = {r.info.run_id: r.data.tags["matched.key"] for r in env.runs()}
    assert set(first) < set(again)  # what it held is kept, only the new points trained
    assert len(set(again.values())) > len(set(first.values()))
    assert len(finished_pairs(env)) == len(set(finished_pairs(env)))
    capsys.readouterr()
    path.write_text(path.read_text().replace("tolerance = 0.1", "tolerance = 0.2"))
    assert main(env.argv(path)) == 2
    line = assert_one_line_error(capsys.readouterr().err)
    assert "matched_tiny" in line and "another name" in line and "tolerance" in line


def test_a_study_split_by_methods_joins_into_the_board_of_the_whole(env, tmp_path, store_template, capsys):
    path = env.root / "matched_tiny.toml"
    path.write_text(STUDY)
    parts = []
    for name, methods in (("a", "trn,dense"), ("b", "keep_fraction")):
        store = tmp_path / name
        store.mkdir()
        shutil.copyfile(store_template, store / "mlflow.db")
        argv = env.argv(path, "--methods", methods)
        argv[argv.index("--tracking-uri") + 1], argv[argv.index("--out") + 1] = f"sqlite:///{store / 'mlflow.db'}", \
            str(store / "out")
        assert main(argv) == 0, capsys.readouterr().err
        assert f"methods {methods.replace(',', ', ') if name == 'b' else 'dense, trn'}" in capsys.readouterr().out
        parts.append(Leaderboard.read(store / "out" / "leaderboard.json"))
    assert [c.method for c in parts[0].boards[0].curves] == ["trn"] and parts[0].boards[0].reference is not None
    assert [c.method for c in parts[1].boards[0].curves] == ["keep_fraction"] and parts[1].boards[0].baseline == "trn"
    assert main(env.argv(path)) == 0, capsys.readouterr().err
    whole = Leaderboard.read(env.out / "leaderboard.json").boards[0]
    joined = Leaderboard.join(parts).boards[0]

    def numbers(board):
        return {c.method: [(p.target, p.setting, p.point) for p in c.points] for c in board.curves}

    assert numbers(joined) == numbers(whole)  # one seed, one result: the same points however the study is split
    assert joined.reference.point == whole.reference.point
    assert main(env.argv(path, "--methods", "ours")) == 2
    assert "name methods of study matched_tiny (dense, trn, keep_fraction)" in assert_one_line_error(
        capsys.readouterr().err)


BAD = {
    "search-table": (STUDY + "\n[search]\nlambda = { grid = [1.0] }\n", "has no place in a matched study"),
    "no-knob": (STUDY.replace('"keep_fraction"]', '"keep_fraction", "nan_when_big"]'), "declares no compression knob"),
    "bad-targets": (STUDY.replace("targets = [10, 25, 60]", "targets = [0.5]"), "compressions > 1"),
    "twice": (STUDY.replace("targets = [10, 25, 60]", "targets = [25, 25]"), "twice"),
    "tolerance": (STUDY.replace("tolerance = 0.1", "tolerance = 2"), "tolerance"),
    "baseline": (STUDY.replace('baseline = "trn"', 'baseline = "ours"'), "not in methods"),
    "reference-baseline": (STUDY.replace('baseline = "trn"', 'baseline = "dense"'), "no compression knob"),
    "typo": (STUDY.replace("max_runs = 4", "max_run = 4"), "did you mean 'max_runs'"),
    "note-task": (STUDY.replace("[matched.notes.mlp2]", "[matched.notes.lenet5]"), "notes"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_matched_table_is_one_line_exit_2_before_any_run(env, capsys, case):
    text, expected = BAD[case]
    path = env.root / "bad.toml"
    path.write_text(text)
    argv = env.argv(path, "--plugin-dir", str(Path(__file__).parent / "plugins_study"))
    assert main(argv) == 2
    assert expected in assert_one_line_error(capsys.readouterr().err)
    assert env.runs() == []


def test_n_trials_has_no_meaning_for_a_matched_study(env, capsys):
    path = env.root / "matched_tiny.toml"
    path.write_text(STUDY)
    assert main(env.argv(path, "--n-trials", "3")) == 2
    assert "--n-trials" in assert_one_line_error(capsys.readouterr().err)


def test_methods_splits_only_a_matched_study(env, capsys):
    assert main(env.argv(REPO / "studies" / "lenet5_sensitivity.toml", "--methods", "ours")) == 2
    assert "is an Optuna study" in assert_one_line_error(capsys.readouterr().err)
    spec = parse_study(toml_module().loads(STUDY), Registry.discover(plugin_dirs=[PLUGINS]))
    spec = spec.only_methods(["keep_fraction"])
    assert spec.methods == ("keep_fraction",) and spec.matched.baseline == "trn"
    assert spec.matched.notes == {"mlp2": {"keep_fraction": "a test plugin"}}


def test_the_matched_table_is_part_of_the_studys_digest():
    registry = Registry.discover(plugin_dirs=[PLUGINS])
    tomllib = toml_module()
    one = parse_study(tomllib.loads(STUDY), registry)
    other = parse_study(tomllib.loads(STUDY.replace("tolerance = 0.1", "tolerance = 0.2")), registry)
    assert one.matched.targets == (10.0, 25.0, 60.0) and one.digest() != other.digest()
    assert json.loads(json.dumps(one.canonical()))["matched"]["tolerance"] == 0.1


def test_the_shipped_matched_studies_are_the_leaderboards():
    assert {p.stem for p in SHIPPED} == {"leaderboard_lenet5", "leaderboard_mlp2"}
    registry = Registry.discover()
    for path in SHIPPED:
        spec = parse_study(toml_module().loads(path.read_text()), registry, source=path.read_text())
        assert spec.name == path.stem and spec.matched.baseline == "trn" and len(spec.seeds) == 3
        assert {"dense", "trn", "ours", "mars", "reinforce_l0"} <= set(spec.methods) <= set(registry.methods)


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_a_shipped_matched_study_runs_end_to_end_with_a_tiny_budget(path, env, capsys):
    # the file as shipped but for one new run per target (10 steps move no knob: more runs only cost time)
    text = path.read_text()
    assert "\nmax_runs = 4\n" in text
    tiny = env.root / path.name
    tiny.write_text(text.replace("\nmax_runs = 4\n", "\nmax_runs = 1\n"))
    assert main(env.argv(tiny, "--seeds", "0", "--budget", "steps=10")) == 0, capsys.readouterr().err
    board = Leaderboard.read(env.out / "leaderboard.json")
    (task,) = board.boards
    methods = toml_module().loads(path.read_text())["methods"]
    assert {c.method for c in task.curves} == set(methods) - {"dense"}
    for curve in task.curves:  # a point at every target it can reach, hit or marked missed, with its seed's run
        unreachable = [t for t in (10.0, 20.0, 40.0) if f"no point at {t:g}x" in curve.note]
        assert sorted([p.target for p in curve.points] + unreachable) == [10.0, 20.0, 40.0]
        assert all(p.runs for p in curve.points)
        assert curve.method != "trn" or not unreachable
    assert task.reference is not None
    assert (env.out / "leaderboard.html").exists()
