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
    """MARS's priors are weighted 1/N; the embedded recipe sets N to full MNIST's 60,000."""
    from rankbench.data.mnist import load_mnist_family
    from rankbench.tasks._digits import EMBEDDED_PRIOR_N

    from helpers import make_tiny_mnist

    task_cls = REGISTRY.task("mlp2")
    embedded = task_cls(make_config(REGISTRY, "mlp2", "mars").task_params).load_data(None, False)
    full = load_mnist_family("mnist", make_tiny_mnist(tmp_path), val_size=40)
    assert embedded.embedded and not full.embedded
    config = make_config(REGISTRY, "mlp2", "mars")
    assert config.method_params["prior_n"] is None
    assert task_cls.method_params_for(embedded, "mars", config.method_params, config.explicit)["prior_n"] \
        == EMBEDDED_PRIOR_N == 60000
    assert task_cls.method_params_for(embedded, "mars", config.method_params, config.explicit)["selector_lr"] == 0.03
    assert task_cls.method_params_for(full, "mars", config.method_params, config.explicit) == config.method_params
    assert config.method_params["prior_n"] is None and config.method_params["selector_lr"] is None
    assert task_cls.recipe_for(embedded, config.task_params, config.explicit, "mars")[0] == "embedded"
    assert task_cls.recipe_for(full, config.task_params, config.explicit, "mars")[0] == "paper"
    ours = make_config(REGISTRY, "mlp2", "ours")
    assert task_cls.method_params_for(embedded, "ours", ours.method_params, ours.explicit) == ours.method_params
    assert task_cls.recipe_for(embedded, ours.task_params, ours.explicit, "ours")[0] == "paper"
    chosen = make_config(REGISTRY, "mlp2", "mars", {"prior_n": 4000})
    assert task_cls.method_params_for(embedded, "mars", chosen.method_params, chosen.explicit)["prior_n"] == 4000


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
    assert main(["run", "--task", "mlp2", "--method", "mars", "--epochs", "1", "--tracking-uri", uri,
                 "--no-progress"]) in (0, None)
    out = capsys.readouterr().out
    assert "selector_lr=0.03" in out.splitlines()[1] and "prior_n=60000" in out.splitlines()[1]  # values used
    assert out.splitlines()[2].startswith("recipe embedded:") and "1/N" in out.splitlines()[2]
    (found,) = mlflow.MlflowClient(uri).search_runs(
        [mlflow.MlflowClient(uri).get_experiment_by_name("mlp2").experiment_id])
    assert found.data.params["prior_n"] == "60000" and found.data.params["recipe"] == "embedded"
    assert found.data.params["selector_lr"] == "0.03"
