"""PSTRN (issue 24, item 5): ``trn``'s per-layer ranks and progressive studies (``[progressive]``).

Per-layer ranks are counted by hand; a bad layer name is one line (exit 2). The progressive search
runs ``tests/pstrn_tiny.toml`` (3 + 2 + 2 proxy trials of 2 steps, a 6-step retraining on seeds
0 and 1) through ``rankbench study FILE`` in stages, on random tiny digits (``--data-dir``,
``val_size=40``) with its own Optuna storage and MLflow store: ``--n-trials 3`` (phase 1 only), a
phase-2 trial enqueued with a phase-1 configuration (it must reuse it), Ctrl-C in phase 2, the same
command to the end, and once more (it must train nothing). Plots are written in one stage only.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import rankbench.study.plots
import rankbench.study.runner
from helpers import assert_one_line_error, make_tiny_mnist
from rankbench.cli import main
from rankbench.errors import RankbenchError
from rankbench.plugins.registry import Registry
from rankbench.study.progressive import (
    Individual,
    best_individuals,
    narrowed_centers,
    phase_name,
    retrain_config,
    selection_key,
)
from rankbench.study.spec import ProgressiveSpec, load_study_file, parse_study

HERE = Path(__file__).resolve().parent
TINY = HERE / "pstrn_tiny.toml"
SHIPPED = HERE.parent / "studies" / "pstrn_lenet5.toml"
REGISTRY = Registry.discover(entry_point_groups=False)
LAYERS = ("conv1", "conv2", "fc1", "fc2")
LENET5_DENSE = 429_100


# ---------------------------------------------------------------------------- trn's per-layer ranks
def lenet5_by_hand(ranks: dict[str, int]) -> int:
    """LeNet-5's TR parameters, counted from its tensorizations: a ring of cores r x m x r per mode
    (conv1: kernel 25, (1), (4, 5); conv2: 25, (4, 5), (5, 10); fc1: (5, 5, 5, 10), (5, 8, 8); fc2:
    (5, 8, 8), (10)), plus the biases."""
    modes = {"conv1": (25, 1, 4, 5), "conv2": (25, 4, 5, 5, 10), "fc1": (5, 5, 5, 10, 5, 8, 8), "fc2": (5, 8, 8, 10)}
    bias = {"conv1": 20, "conv2": 50, "fc1": 320, "fc2": 10}
    return sum(ranks[layer] ** 2 * sum(modes[layer]) + bias[layer] for layer in modes)


def built(task: str, values: dict):
    import torch

    from rankbench.plugins.method import MethodContext
    from rankbench.run.config import make_config
    from rankbench.run.prepare import build_model

    config = make_config(REGISTRY, task, "trn", values)
    method = REGISTRY.method("trn")(config.method_params)
    return build_model(REGISTRY.task(task)(config.task_params), method, 0, MethodContext(100, torch.device("cpu")))


def test_per_layer_ranks_give_the_hand_counted_parameters_and_the_others_keep_rank():
    from rankbench.layers.tensorized import count_parameters, learned_ranks

    model = built("lenet5", {"rank": 4, "ranks": "conv1:10,conv2:15,fc1:8"})
    ranks = {"conv1": 10, "conv2": 15, "fc1": 8, "fc2": 4}
    assert count_parameters(model) == lenet5_by_hand(ranks) == 3520 + 11075 + 3264 + 506
    assert learned_ranks(model) == {layer: [r] * n for (layer, r), n in zip(ranks.items(), (4, 5, 7, 4))}
    uniform = built("lenet5", {"rank": 12})
    assert count_parameters(uniform) == lenet5_by_hand(dict.fromkeys(LAYERS, 12))
    same = built("lenet5", {"rank": 12, "ranks": "conv1:12"})  # a layer already at its rank is not rebuilt
    assert all((a == b).all() for a, b in zip(uniform.state_dict().values(), same.state_dict().values()))


def test_per_bond_ranks_and_a_tensor_train_keep_their_boundary_bond():
    from rankbench.layers.tensorized import count_parameters, learned_ranks

    model = built("lenet5", {"rank": 3, "ranks": "conv1:2-3-4-5"})
    assert learned_ranks(model)["conv1"] == [2, 3, 4, 5]
    conv1 = 2 * 25 * 3 + 3 * 1 * 4 + 4 * 4 * 5 + 5 * 5 * 2 + 20  # r_k * m_k * r_k+1 around the ring
    assert count_parameters(model) == conv1 + lenet5_by_hand({"conv1": 0, "conv2": 3, "fc1": 3, "fc2": 3}) - 20
    tt = built("mlp2", {"rank": 4, "ranks": "fc1:6"})  # mlp2: TT-matrix, bond 0 is the boundary (1)
    assert learned_ranks(tt) == {"fc1": [1, 6, 6, 6], "fc2": [1, 4]}
    fc1 = 1 * 35 * 6 + 6 * 20 * 6 + 6 * 35 * 6 + 6 * 20 * 1 + 625  # (7x5)(4x5)(7x5)(4x5) cores + bias
    fc2 = 1 * 125 * 4 + 4 * 50 * 1 + 10  # (25x5)(25x2)
    assert count_parameters(tt) == fc1 + fc2


@pytest.fixture
def data_dir(tmp_path_factory) -> Path:
    return make_tiny_mnist(tmp_path_factory.mktemp("digits"))


def test_a_run_with_per_layer_ranks_records_them_and_its_hand_counted_compression(tmp_path, monkeypatch, data_dir,
                                                                                   capsys, store_template):
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    shutil.copyfile(store_template, tmp_path / "m.db")
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    ranks = "conv1:10,conv2:15,fc1:8,fc2:5"
    argv = ["run", "--method", "trn", "--task", "lenet5", "--set", f"ranks={ranks}", "--epochs", "1", "--set",
            "val_size=40", "--data-dir", str(data_dir), "--no-progress", "--tracking-uri", uri]
    assert main(argv) == 0, capsys.readouterr().err
    (run,) = MlflowClient(uri).search_runs([e.experiment_id for e in MlflowClient(uri).search_experiments()])
    assert run.info.run_name == f"trn[rank=10,ranks={ranks}]-seed0"
    hand = lenet5_by_hand({"conv1": 10, "conv2": 15, "fc1": 8, "fc2": 5})
    assert run.data.metrics["compression"] == pytest.approx(LENET5_DENSE / hand)
    assert json.loads(run.data.params["initial_ranks"])["conv2"] == [15] * 5


@pytest.mark.parametrize("ranks, words", [
    ("conv9:3", ["no tensorized layer 'conv9'", "valid are conv1, conv2, fc1, fc2"]),
    ("conv1=3", ["is not LAYER:RANK", "ranks=conv1:10"]),
    ("conv1:3,conv1:4", ["named twice"]),
    ("conv1:0", ["conv1's rank must be >= 1"]),
    ("conv1:2-3", ["conv1 has 4 bonds", "conv1:R-R-R-R"]),
])
def test_bad_per_layer_ranks_are_one_line_errors_exit_2(ranks, words, tmp_path, monkeypatch, data_dir, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["run", "--method", "trn", "--task", "lenet5", "--set", f"ranks={ranks}", "--epochs", "1", "--set",
            "val_size=40", "--data-dir", str(data_dir), "--no-progress", "--tracking-uri",
            f"sqlite:///{tmp_path / 'm.db'}"]
    assert main(argv) == 2
    line = assert_one_line_error(capsys.readouterr().err)
    for word in words:
        assert word in line


# ---------------------------------------------------------------------------- the narrowing rule
def individual(number: int, ranks: tuple[int, ...], val: float, compression: float, phase: int = 1) -> Individual:
    return Individual(phase, number, dict(zip(LAYERS, ranks)), val, compression)


def test_the_best_individuals_meet_the_floor_first_and_the_mode_centres_each_window():
    p = ProgressiveSpec(LAYERS, 15, top_k=3, min_compression=10.0)
    found = [individual(0, (25, 25, 25, 25), 99.0, 4.0),   # most accurate, below the floor
             individual(1, (10, 15, 10, 5), 97.0, 20.0), individual(2, (10, 10, 15, 5), 98.0, 25.0),
             individual(3, (15, 20, 20, 10), 96.0, 12.0), individual(4, (5, 5, 5, 5), 90.0, 80.0)]
    top = best_individuals(found, p)
    assert [i.number for i in top] == [2, 1, 3]
    # conv1 and fc2: the mode; conv2 and fc1 (three different ranks): the best individual's
    assert narrowed_centers(top, LAYERS) == {"conv1": 10, "conv2": 10, "fc1": 15, "fc2": 5}
    # nothing at the floor: the most compressed first
    assert min(found[:1] + found[3:4], key=lambda i: selection_key(i, 50.0)).number == 3


def test_a_window_is_the_centre_plus_minus_half_width_steps_within_the_rank_bounds():
    p = ProgressiveSpec(LAYERS, 15, steps=(5, 2, 1), min_rank=2, max_rank=20)
    assert p.window(15, 0) == (5, 20, 5)      # 15 +- 10, 25 > max_rank
    assert p.window(5, 1) == (3, 9, 2)        # 1 < min_rank
    assert p.window(16, 2) == (14, 18, 1)


# ---------------------------------------------------------------------------- bad study files
GOOD = TINY.read_text()


def edited(old: str, new: str) -> str:
    assert old in GOOD
    return GOOD.replace(old, new)


BAD = [
    (edited("top_k = 2", "topk = 2"), "[progressive]: unknown key 'topk': did you mean 'top_k'?"),
    (edited("steps = [5, 2, 1]", "steps = [2, 5, 1]"), "steps must not grow"),
    (edited("steps = [5, 2, 1]", "steps = []"), "give the rank step of every phase"),
    (edited("population = [3, 2, 2]", "population = [3, 2]"), "gives 2 phases, steps 3"),
    (edited("population = [3, 2, 2]", "population = 1"), "population must be a whole number >= 2"),
    (edited("generations = 1", 'generations = "one"'), "generations must be a whole number >= 1"),
    (edited('layers = ["conv1", "conv2", "fc1", "fc2"]', 'layers = ["conv1", "fc3"]'),
     "no tensorized layer 'fc3': valid are conv1, conv2, fc1, fc2"),
    (edited('layers = ["conv1", "conv2", "fc1", "fc2"]', 'layers = ["conv1", "conv1"]'), "lists 'conv1' twice"),
    (edited("center = 10", "center = 25"), "center = 25 lies outside [min_rank, max_rank] = [2, 20]"),
    (edited("center = 10\n", ""), "give center = R"),
    (edited("min_compression = 10", "min_compression = 0.5"), "min_compression = 0.5: give a compression >= 1"),
    (edited("top_k = 2", "top_k = 0"), "top_k must be a whole number >= 1"),
    (edited("max_rank = 20", "max_rank = 1"), "max_rank must be a rank >= min_rank (2)"),
    (edited('name = "nsga2"', 'name = "tpe"'), "a progressive study searches with NSGA-II"),
    (edited('methods = ["trn"]', 'methods = ["ours"]'), "through the method's 'ranks' setting"),
    (edited("[fixed]", '[fixed]\nranks = "conv1:3"'), "ranks is what a progressive study searches"),
    (GOOD + "\n[search.rank]\ngrid = [2, 3]\n", "[search] has no place in a progressive study"),
    (GOOD + "\n[budget]\nn_trials = 4\n", "a progressive study's budget is its phases"),
    (edited("budget_steps = 6", "budget_steps = 0"), "[retrain]: budget_steps = 0"),
    (edited("budget_steps = 6", "budgetsteps = 6"), "[retrain]: unknown key 'budgetsteps'"),
    (GOOD.split("[progressive]")[0] + "[retrain]\nbudget_steps = 4\n", "[retrain] belongs to a progressive study"),
]


@pytest.mark.parametrize("text, words", BAD, ids=[b[1][:40] for b in BAD])
def test_bad_progressive_tables_are_one_line_errors(text, words):
    from helpers import toml_module

    with pytest.raises(RankbenchError) as info:
        parse_study(toml_module().loads(text), REGISTRY, where="f.toml")
    message = str(info.value)
    assert "\n" not in message and words in message, message


@pytest.mark.parametrize("extra, words", [
    (["--set", "ranks=conv1:3"], "--set ranks: the study searches ranks"),
    (["--n-trials", "8"], "--n-trials 8 exceeds the 7 proxy runs"),
    (["--launcher", "slurm"], "is a progressive study"),
])
def test_a_bad_command_line_exits_2_with_one_line_before_any_store_exists(extra, words, tmp_path, monkeypatch,
                                                                         capsys):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.toml"
    bad.write_text(edited("top_k = 2", "top_k = -1"))
    argv = ["study", str(TINY), "--storage", f"sqlite:///{tmp_path / 'o.db'}", "--tracking-uri",
            f"sqlite:///{tmp_path / 'm.db'}", *extra]
    assert main(argv) == 2
    assert words in assert_one_line_error(capsys.readouterr().err)
    assert main(["study", str(bad), "--storage", f"sqlite:///{tmp_path / 'o.db'}"]) == 2
    assert "top_k must be" in assert_one_line_error(capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.toml"]


def test_the_shipped_study_states_its_budget_and_validates():
    spec = load_study_file(SHIPPED, REGISTRY)
    p = spec.progressive
    assert spec.budget() == p.proxy_runs() == 136 and p.phase_trials() == (64, 36, 36)
    assert p.steps == (5, 2, 1) and p.layers == LAYERS and p.min_compression == 16.5
    assert "136 proxy runs" in SHIPPED.read_text() and "0.57 %" in spec.description and "16.5x" in spec.description
    assert spec.progressive.retrain.budget_steps is None  # the recipe's full length
    assert spec.seeds == (0, 1, 2) and spec.budget_steps == 160


def test_the_retraining_runs_at_the_recipes_full_length_without_a_retrain_budget(data_dir):
    from dataclasses import replace

    from rankbench.run.config import RunOptions
    from rankbench.run.prepare import prepare
    from rankbench.study.progressive import Retrain

    spec = load_study_file(SHIPPED, REGISTRY)
    spec = replace(spec, fixed={**spec.fixed, "val_size": 40})
    job = Retrain(spec, RunOptions(data_dir=data_dir), (), "parent", "conv1:10,conv2:15,fc1:8,fc2:5")
    config = retrain_config(job, REGISTRY, seed=1)
    assert config.budget_steps is None and config.seeds == (1,)
    assert config.method_params["ranks"] == "conv1:10,conv2:15,fc1:8,fc2:5"
    assert prepare(config, REGISTRY).epochs == REGISTRY.task("lenet5").hyperparameters["epochs"].default == 150
    short = replace(spec, progressive=replace(spec.progressive, retrain=replace(spec.progressive.retrain,
                                                                                  budget_steps=64)))
    assert retrain_config(replace(job, spec=short), REGISTRY, seed=1).budget_steps == 64


# ---------------------------------------------------------------------------- the tiny study, end to end
def trials_of(storage_url: str, name: str):
    import optuna

    storage = optuna.storages.RDBStorage(storage_url)
    try:
        return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=True)
    finally:
        storage.engine.dispose()


def all_runs(uri: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    return client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=1000)


@pytest.fixture(scope="module")
def staged(tmp_path_factory, store_template):
    """The tiny study in five commands; what each printed, and the stores."""
    import optuna

    root = tmp_path_factory.mktemp("pstrn")
    data = make_tiny_mnist(root / "data")
    shutil.copyfile(store_template, root / "mlflow.db")
    storage, uri = f"sqlite:///{root / 'optuna.db'}", f"sqlite:///{root / 'mlflow.db'}"
    argv = ["study", str(TINY), "--storage", storage, "--tracking-uri", uri, "--out", str(root / "out"),
            "--data-dir", str(data), "--set", "val_size=40"]
    out: dict = {"root": root, "storage": storage, "uri": uri}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        real_plots = rankbench.study.plots.write_plots
        mp.setattr(rankbench.study.plots, "write_plots", lambda *a, **k: [])
        def run(*extra: str) -> int:
            return main([*argv, *extra])

        out["rc_capped"] = run("--n-trials", "3")
        out["runs_capped"] = all_runs(uri)
        # a phase-2 trial with a phase-1 configuration: the centres (top 2 with ties to the better = the best)
        spec = load_study_file(TINY, REGISTRY)
        from rankbench.study.progressive import individuals

        phase1 = optuna.load_study(study_name=phase_name("pstrn_tiny", 1), storage=storage)
        found = individuals(phase1, 1, LAYERS)
        out["centers2"] = narrowed_centers(best_individuals(found, spec.progressive), LAYERS)
        optuna.load_study(study_name=phase_name("pstrn_tiny", 2), storage=storage).enqueue_trial(out["centers2"])

        real_trial, calls = rankbench.study.runner.run_trial, []

        def interrupting(trial, run_, registry, tracker, **kwargs):
            calls.append(trial.number)
            if len(calls) == 2:
                raise KeyboardInterrupt
            return real_trial(trial, run_, registry, tracker, **kwargs)

        mp.setattr(rankbench.study.runner, "run_trial", interrupting)
        out["rc_interrupted"] = run()
        mp.setattr(rankbench.study.runner, "run_trial", real_trial)
        out["runs_interrupted"] = all_runs(uri)
        mp.setattr(rankbench.study.plots, "write_plots", real_plots)
        out["rc_finished"] = run()
        out["runs_finished"] = all_runs(uri)
        mp.setattr(rankbench.study.plots, "write_plots", lambda *a, **k: [])
        out["rc_again"] = run()
        out["runs_again"] = all_runs(uri)
    out["trials"] = {p: trials_of(storage, phase_name("pstrn_tiny", p)) for p in (1, 2, 3)}
    return out


def test_the_staged_commands_exit_as_expected(staged):
    assert (staged["rc_capped"], staged["rc_interrupted"], staged["rc_finished"], staged["rc_again"]) == (0, 130, 0, 0)


def test_a_capped_command_runs_phase_1_only_and_retrains_nothing(staged):
    proxies = [r for r in staged["runs_capped"] if r.data.tags.get("study", "").startswith("pstrn_tiny.phase")]
    assert sorted(r.data.tags["study"] for r in proxies) == ["pstrn_tiny.phase1"] * 3
    assert not [r for r in staged["runs_capped"] if r.data.tags.get("rankbench.progressive") == "retrain"]


def on_grid(value: int, center: int, step: int, half_width: int = 2, low: int = 2, high: int = 20) -> bool:
    return low <= value <= high and abs(value - center) <= half_width * step and (value - center) % step == 0


def test_each_phase_samples_on_its_step_grid_within_the_windows_around_the_best_of_the_phase_before(staged):
    trials = staged["trials"]
    phase1 = [t for t in trials[1] if t.state.name == "COMPLETE"]
    assert len(phase1) == 3
    assert all(on_grid(t.params[g], 10, 5) for t in phase1 for g in LAYERS)

    def best2(done):  # the rule, written out: at >= 10x by validation accuracy; ties by compression
        key = [(t.user_attrs["mean_compression"] < 10, -t.user_attrs["mean_val_accuracy"],
                -t.user_attrs["mean_compression"], t.number) for t in done]
        return [t for _, t in sorted(zip(key, done), key=lambda kt: kt[0])][:2]

    top1 = best2(phase1)
    centers2 = {g: top1[0].params[g] for g in LAYERS}  # top 2: agreeing genes, or the better one's
    assert centers2 == staged["centers2"]
    phase2 = [t for t in trials[2] if t.state.name == "COMPLETE"]
    assert len(phase2) == 2
    assert all(on_grid(t.params[g], centers2[g], 2) for t in phase2 for g in LAYERS)
    centers3 = {g: best2(phase2)[0].params[g] for g in LAYERS}
    phase3 = [t for t in trials[3] if t.state.name == "COMPLETE"]
    assert len(phase3) == 2
    assert all(on_grid(t.params[g], centers3[g], 1) for t in phase3 for g in LAYERS)


def test_a_configuration_of_an_earlier_phase_is_reused_not_trained_again(staged):
    (reused,) = [t for t in staged["trials"][2] if t.params == staged["centers2"] and t.state.name == "COMPLETE"]
    assert reused.user_attrs["same_as"].startswith("pstrn_tiny.phase1 trial ")
    original = [t for t in staged["trials"][1] if t.params == staged["centers2"]][0]
    assert reused.values == original.values
    trained = [r for r in staged["runs_again"] if r.data.tags.get("study") == "pstrn_tiny.phase2"]
    assert str(reused.number) not in {r.data.tags["trial"] for r in trained}


def test_ctrl_c_then_the_same_command_finishes_and_nothing_is_trained_twice(staged):
    interrupted = staged["trials"][2]
    assert [t.state.name for t in interrupted].count("FAIL") == 1  # the interrupted trial, retried after
    proxies = [r for r in staged["runs_again"] if r.data.tags.get("study", "").startswith("pstrn_tiny.phase")]
    assert all(r.info.status == "FINISHED" for r in proxies)
    configurations = [(r.data.params["ranks"], r.data.params["seed"]) for r in proxies]
    assert len(configurations) == len(set(configurations))  # no configuration trained twice
    distinct = {tuple(t.params[g] for g in LAYERS) for p in (1, 2, 3) for t in staged["trials"][p]
                if t.state.name == "COMPLETE"}
    assert len(proxies) == len(distinct)
    assert {r.info.run_id for r in staged["runs_again"]} == {r.info.run_id for r in staged["runs_finished"]}


def test_the_best_point_is_retrained_on_the_study_seeds_at_the_retraining_length(staged):
    retrained = [r for r in staged["runs_finished"] if r.data.tags.get("rankbench.progressive") == "retrain"]
    assert sorted(r.data.params["seed"] for r in retrained) == ["0", "1"]
    assert {r.data.params["epochs"] for r in retrained} == {"3"}  # [retrain] budget_steps = 6: 3 epochs of 2 steps
    proxies = [r for r in staged["runs_finished"] if r.data.tags.get("study", "").startswith("pstrn_tiny.phase")]
    assert {r.data.params["epochs"] for r in proxies} == {"1"}  # budget_steps = 2
    assert all(r.data.tags["study"] == "pstrn_tiny" and r.info.status == "FINISHED" for r in retrained)
    summary = json.loads((staged["root"] / "out" / "progressive.json").read_text())
    assert summary["complete"] and summary["proxy_runs"] == 7 and len(summary["phases"]) == 3
    best = summary["best"]
    assert {r.data.params["ranks"] for r in retrained} == {best["ranks"]}
    everything = [t for p in (1, 2, 3) for t in staged["trials"][p] if t.state.name == "COMPLETE"]
    floor = [t for t in everything if t.user_attrs["mean_compression"] >= 10] or everything
    assert best["val_accuracy"] == max(t.user_attrs["mean_val_accuracy"] for t in floor)
    tests = [r.data.metrics["test_accuracy"] for r in retrained]
    assert summary["retrain"]["test_accuracy"] == pytest.approx(sum(tests) / 2)
    assert summary["retrain"]["epochs"] == 3


def test_the_final_command_prints_the_retrained_point_and_the_phase_plots_exist(staged):
    root = staged["root"]
    (parent,) = [r for r in staged["runs_again"] if r.data.tags.get("rankbench.role") == "study"]
    assert parent.data.tags["study"] == "pstrn_tiny" and parent.info.status == "FINISHED"
    assert parent.data.metrics["retrained_compression"] > 1
    assert (root / "out" / "phase1" / "pareto_front.png").is_file()
    assert (root / "out" / "phase3" / "history.png").is_file()


def test_the_tiny_study_prints_its_plan_and_result(staged, tmp_path, monkeypatch, capsys):
    """The same command once more (nothing trains): what it prints first and last."""
    monkeypatch.setattr(rankbench.study.plots, "write_plots", lambda *a, **k: [])
    argv = ["study", str(TINY), "--storage", staged["storage"], "--tracking-uri", staged["uri"], "--out",
            str(tmp_path), "--data-dir", str(staged["root"] / "data"), "--set", "val_size=40"]
    monkeypatch.chdir(staged["root"])
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "7 proxy runs in all, each 2 steps" in out
    assert "phase 2/3 (pstrn_tiny.phase2)" in out and "2 proxy trials, 2 finished before" in out
    assert "retrained (6 steps, 3 epochs) on 2 seed(s): test accuracy" in out
    assert "7 trials finished, 1 failed" in out  # the trial Ctrl-C interrupted (then retried)
    assert "ranks=conv" in out.splitlines()[-1]
