"""Selector learning rates, per-data recipes and step budgets."""

import pytest
import torch

from rankbench.cli import main
from rankbench.errors import RankbenchError
from rankbench.plugins.method import MethodContext
from rankbench.plugins.registry import Registry
from rankbench.run.config import epochs_for_steps, make_config, parse_budget
from rankbench.run.experiment import run
from rankbench.run.prepare import build_model, prepare
from rankbench.run.trainer import fit

REGISTRY = Registry.discover(entry_point_groups=False)


@pytest.mark.parametrize("method", ["ours", "reinforce_l0", "mars"])
def test_every_selector_method_declares_selector_lr(method):
    hyper = REGISTRY.method(method).hyperparameters["selector_lr"]
    assert hyper.default is None and hyper.search is not None and hyper.search.log


@pytest.mark.parametrize("selector_lr", [None, 0.05])
def test_optimizer_gives_selectors_their_own_rate(selector_lr, monkeypatch):
    params = {"epochs": 1} if selector_lr is None else {"epochs": 1, "selector_lr": selector_lr}
    config = make_config(REGISTRY, "mlp2", "ours", params)
    task = REGISTRY.task("mlp2")(config.task_params)
    method = REGISTRY.method("ours")(config.method_params)
    model = build_model(task, method, 0, MethodContext(100, torch.device("cpu")))
    seen = []
    make = task.optimizer

    def spy(groups):
        optimizer = make(groups)
        seen.append(optimizer)
        return optimizer

    monkeypatch.setattr(task, "optimizer", spy)
    data = task.load_data(None, False)
    fit(model, method, task, data, epochs=1, seed=0, device=torch.device("cpu"), dense_parameters=1)
    groups = {g["name"]: g for g in seen[0].param_groups}
    assert groups["weights"]["initial_lr"] == task.params["lr"]
    assert groups["selectors"]["initial_lr"] == (task.params["lr"] if selector_lr is None else selector_lr)
    mus = {id(g.mu) for g in method.gates(model)}
    assert {id(p) for p in groups["selectors"]["params"]} == mus
    assert not mus & {id(p) for p in groups["weights"]["params"]}


def test_a_higher_selector_rate_closes_gates_in_a_short_embedded_run(tmp_path):
    config = make_config(REGISTRY, "mlp2", "ours", {"epochs": 3, "selector_lr": 0.05},
                         tracking_uri=f"sqlite:///{tmp_path / 'm.db'}", progress=False)
    (result,) = run(prepare(config, REGISTRY))
    inner = result.ranks["fc1"][1:] + result.ranks["fc2"][1:]
    assert sum(inner) < 0.75 * 4 * 20, result.ranks  # from rank 20 on each of the 4 inner bonds
    assert result.compression > 1.5 * 18.24  # the initial rank-20 network's compression
    assert result.history[-1]["val_accuracy"] > 70


def test_budget_steps_sets_epochs_from_the_training_set(tmp_path):
    assert epochs_for_steps(70_000, 4000, 128) == 2188
    assert epochs_for_steps(70_000, 55_000, 128) == 163
    assert epochs_for_steps(1, 10, 128) == 1
    assert parse_budget("steps=100") == 100
    for bad in ("100", "step=100", "steps=x", "steps=0"):
        with pytest.raises(RankbenchError):
            parse_budget(bad)
    config = make_config(REGISTRY, "mlp2", "dense", {}, tracking_uri=f"sqlite:///{tmp_path / 'm.db'}",
                         progress=False, budget_steps=40)
    (result,) = run(prepare(config, REGISTRY))
    assert len(result.history) == 2  # 4000 digits / 128 = 32 steps per epoch


def test_cli_budget_conflicts_with_epochs(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    assert main(["run", "--method", "dense", "--task", "mlp2", "--budget", "steps=10", "--epochs", "2",
                 "--tracking-uri", uri]) == 2
    assert "--budget sets the epochs" in capsys.readouterr().err


def test_mars_uses_full_mnist_prior_weight_on_the_embedded_digits_only(tmp_path):
    """MARS's priors are weighted 1/N; its defaults on the embedded recipes set N to full MNIST's 60,000.
    On mlp2 (MARS's own 2FC-Net) MARS runs its notebook's recipe on any data, N = 60,000 there too."""
    from helpers import make_tiny_mnist
    from rankbench.data.mnist import load_mnist_family
    from rankbench.methods.mars import FULL_MNIST_N
    from rankbench.run.prepare import prepare

    config = make_config(REGISTRY, "lenet5", "mars")
    assert config.method_params["prior_n"] is None and config.method_params["selector_lr"] is None  # paper
    full = load_mnist_family("mnist", make_tiny_mnist(tmp_path), val_size=40)
    on_embedded = prepare(config, REGISTRY)
    on_full = prepare(make_config(REGISTRY, "lenet5", "mars", {"val_size": 40}, data_dir=tmp_path), REGISTRY,
                      data=full)
    assert on_embedded.data.embedded and not full.embedded
    assert on_embedded.recipe == "embedded" and on_full.recipe == "paper"
    assert on_embedded.method_params["prior_n"] == FULL_MNIST_N == 60000
    assert on_full.method_params == config.method_params
    assert on_embedded.defaults.sources["prior_n"] == "mars defaults on lenet5/embedded"
    embedded = prepare(make_config(REGISTRY, "mlp2", "mars", recipe="embedded"), REGISTRY, data=on_embedded.data)
    assert embedded.recipe == "embedded" and embedded.method_params["prior_n"] == 60000
    assert embedded.method_params["selector_lr"] == 0.03
    assert embedded.defaults.sources["prior_n"] == "mars defaults on mlp2/embedded"
    for data in (on_embedded.data, full):
        notebook = prepare(make_config(REGISTRY, "mlp2", "mars", {"val_size": 40}), REGISTRY, data=data)
        assert notebook.recipe == "mars-notebook" and notebook.method_params["prior_n"] == 60000
        assert notebook.method_params["selector_lr"] is None
    ours = prepare(make_config(REGISTRY, "mlp2", "ours"), REGISTRY, data=on_embedded.data)
    assert ours.recipe == "paper" and ours.method_params == make_config(REGISTRY, "mlp2", "ours").method_params
    chosen = prepare(make_config(REGISTRY, "mlp2", "mars", {"prior_n": 4000}), REGISTRY, data=on_embedded.data)
    assert chosen.method_params["prior_n"] == 4000 and chosen.defaults.sources["prior_n"] == "set"


def test_defaults_resolve_in_the_documented_order_and_say_where_each_came_from():
    from rankbench.plugins.defaults import resolve_defaults

    lenet5, ours, mars = REGISTRY.task("lenet5"), REGISTRY.method("ours"), REGISTRY.method("mars")
    paper = resolve_defaults(lenet5, ours, "paper", {}, {})
    assert paper.method["lambda"] == 1.0 and paper.sources["lambda"] == "ours defaults on lenet5"
    assert paper.task["lr"] == 5e-4 and paper.sources["lr"] == "default" and paper.recipe == "paper"
    embedded = resolve_defaults(lenet5, ours, "embedded", {}, {})
    assert embedded.task["lr"] == 1e-3 and embedded.sources["lr"] == "recipe embedded"
    assert embedded.recipe == "embedded" and "32 steps per epoch" in embedded.why[0]
    chosen = resolve_defaults(lenet5, ours, "embedded", {"lr": 0.3}, {"lambda": 0.2})
    assert (chosen.task["lr"], chosen.method["lambda"]) == (0.3, 0.2)
    assert chosen.sources["lr"] == chosen.sources["lambda"] == "set"
    assert resolve_defaults(lenet5, mars, "embedded", {}, {}).method["prior_n"] == 60000
    with pytest.raises(RankbenchError, match="--recipe fast: task lenet5 has the recipes paper, embedded"):
        resolve_defaults(lenet5, ours, "fast", {}, {})


def test_recipe_on_the_command_line_is_used_and_recorded(tmp_path, capsys):
    from helpers import make_tiny_mnist

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    argv = ["run", "--task", "lenet5", "--method", "trn", "--set", "rank=2", "--set", "val_size=40", "--epochs", "1",
            "--no-progress", "--tracking-uri", uri, "--data-dir", str(make_tiny_mnist(tmp_path / "data"))]
    assert main([*argv, "--recipe", "embedded"]) == 0
    out = capsys.readouterr().out
    assert "lr=0.001" in out.splitlines()[0] and out.splitlines()[2].startswith("recipe embedded:")
    assert main([*argv, "--recipe", "quick"]) == 2
    assert "--recipe quick: task lenet5 has the recipes paper, embedded" in capsys.readouterr().err


@pytest.mark.parametrize("table, fragment", [
    ({"nosuch": {"lambda": 1.0}}, "task_defaults names task 'nosuch', which is not installed"),
    ({"lenet5/fast": {"lambda": 1.0}}, "task_defaults names recipe 'lenet5/fast', but task lenet5 has paper, embedded"),
    ({"lenet5": {"lamda": 1.0}}, "task_defaults['lenet5']: 'lamda' is not a declared hyperparameter"),
    ({"lenet5": {"lambda": -1.0}}, "task_defaults['lenet5']: lambda=-1.0: must be >= 0.0"),
])
def test_a_method_whose_defaults_table_is_wrong_is_broken_at_discovery(tmp_path, table, fragment):
    from rankbench.plugins.registry import Registry

    (tmp_path / "typo.py").write_text(
        "from rankbench.plugin import Hyper, Method\n"
        "class Typo(Method):\n"
        "    name = 'typo'\n"
        "    hyperparameters = {'lambda': Hyper(0.5, 'weight', minimum=0.0)}\n"
        f"    task_defaults = {table!r}\n"
    )
    registry = Registry.discover(plugin_dirs=[tmp_path], entry_point_groups=False)
    assert "typo" not in registry.methods and fragment in registry.broken["typo"]
    assert "ours" in registry.methods


def test_a_method_declaring_a_task_key_is_broken_at_discovery(tmp_path):
    from rankbench.plugins.registry import Registry

    (tmp_path / "clash.py").write_text(
        "from rankbench.plugin import Hyper, Method\n"
        "class Clash(Method):\n"
        "    name = 'clash'\n"
        "    hyperparameters = {'lr': Hyper(0.5, 'its own learning rate')}\n"
    )
    registry = Registry.discover(plugin_dirs=[tmp_path], entry_point_groups=False)
    assert registry.broken["clash"].startswith("method clash declares 'lr', which task")


def test_list_recipes_shows_every_resolved_default_and_its_source(capsys):
    assert main(["list", "--recipes"]) == 0
    out = capsys.readouterr().out
    block = out.split("lenet5, recipe embedded:")[1].split("\n\n")[0]
    rows = {line.split()[0] + (" " + line.split()[1] if line.startswith(tuple(REGISTRY.methods)) else ""):
            line.split() for line in block.splitlines()[2:]}
    assert rows["lr"][-2:] == ["recipe", "embedded"] and rows["lr"][1] == "0.001"
    assert rows["ours: lambda"][2] == "1.0" and rows["ours: lambda"][3:] == ["ours", "defaults", "on", "lenet5"]
    assert rows["mars: prior_n"][2] == "60000" and rows["mars: prior_n"][-1] == "lenet5/embedded"
    assert rows["epochs"][1:] == ["150", "default"]


def test_mars_penalty_is_divided_by_prior_n_when_set():
    config = make_config(REGISTRY, "mlp2", "mars", {"prior_n": 60000})
    task = REGISTRY.task("mlp2")(config.task_params)
    penalties = {}
    for prior_n in (None, 60000):
        method = REGISTRY.method("mars")({**config.method_params, "prior_n": prior_n})
        model = build_model(task, method, 0, MethodContext(4000, torch.device("cpu")))
        penalties[prior_n] = float(method.penalty(model).detach())
    assert penalties[60000] == pytest.approx(penalties[None] * 4000 / 60000, rel=1e-6)


def test_the_embedded_mars_run_records_and_prints_its_prior_n(tmp_path, capsys):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    assert main(["run", "--task", "mlp2", "--method", "mars", "--recipe", "embedded", "--epochs", "1",
                 "--tracking-uri", uri, "--no-progress"]) in (0, None)  # without it: the notebook's recipe
    out = capsys.readouterr().out
    assert "selector_lr=0.03" in out.splitlines()[1] and "prior_n=60000" in out.splitlines()[1]  # values used
    assert out.splitlines()[2].startswith("recipe embedded:") and "1/N" in out.splitlines()[2]
    (found,) = mlflow.MlflowClient(uri).search_runs(
        [mlflow.MlflowClient(uri).get_experiment_by_name("mlp2").experiment_id])
    assert found.data.params["prior_n"] == "60000" and found.data.params["recipe"] == "embedded"
    assert found.data.params["selector_lr"] == "0.03"


def test_the_docs_method_with_per_task_defaults_is_one_file_that_works(tmp_path):
    """docs/plugins.md's example, as written there: dropped into a plugin folder, its defaults resolve."""
    import re
    from pathlib import Path

    from rankbench.plugins.defaults import resolve_defaults

    docs = (Path(__file__).resolve().parent.parent / "docs" / "plugins.md").read_text(encoding="utf-8")
    (block,) = [b for b in re.findall(r"^```python\n(.*?)^```", docs, re.S | re.M) if "class ScaledPenalty" in b]
    (tmp_path / "scaled_penalty.py").write_text(block)
    registry = Registry.discover(plugin_dirs=[tmp_path], entry_point_groups=False)
    method = registry.method("scaled_penalty")
    assert resolve_defaults(registry.task("lenet5"), method, "paper", {}, {}).method == {"weight": 1e-3}
    on_mlp2 = resolve_defaults(registry.task("mlp2"), method, "embedded", {}, {})
    assert on_mlp2.method == {"weight": 1e-2} and on_mlp2.recipe == "embedded"
    assert on_mlp2.why[-1] == "32 steps per epoch need a stronger pull"
    assert resolve_defaults(registry.task("resnet32"), method, "paper", {}, {}).method == {"weight": 1e-4}


def test_a_hyperparameter_named_like_a_recorded_fact_is_broken_at_discovery(tmp_path):
    (tmp_path / "facts.py").write_text(
        "from rankbench.plugin import Hyper, Method\n"
        "class Facts(Method):\n"
        "    name = 'facts'\n"
        "    hyperparameters = {'train_size': Hyper(10, 'clashes with the recorded training-set size')}\n"
    )
    registry = Registry.discover(plugin_dirs=[tmp_path], entry_point_groups=False)
    assert registry.broken["facts"].startswith("method facts declares 'train_size', a name rankbench records itself")


def test_a_run_recorded_before_0_2_reads_its_data_name_from_the_old_param(uri):
    """Runs before 0.2.0 recorded the data's name over the ``dataset`` hyperparameter."""
    from rankbench.report.build import load_runs
    from rankbench.run.tracking import Tracker

    tracker = Tracker(uri)
    run_id = tracker.start("lenet5", "old", {"task": "lenet5", "method": "trn", "seed": 0,
                                             "dataset": "mnist-embedded-5k", "rank": 10},
                           {"method": "trn", "task": "lenet5"})
    tracker.log_metrics(run_id, {"test_accuracy": 90.0, "compression": 26.0}, step=1)
    tracker.finish(run_id)
    (old,) = load_runs(uri)
    assert old.params["data_name"] == "mnist-embedded-5k" and "dataset" not in old.params
