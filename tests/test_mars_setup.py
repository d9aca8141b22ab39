"""MARS set up as its authors set it up: Glorot cores, [0, 1] inputs, small biases, the notebook
recipe, rank-0 bonds and the warm-up switch (issue 23, items 3 and 4)."""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch

from rankbench.export import export
from rankbench.layers.tensorized import (
    TensorizedConv2d,
    TensorizedEmbedding,
    TensorizedLinear,
    count_parameters,
    learned_ranks,
    prune_model,
)
from rankbench.plugins.registry import Registry
from rankbench.run.config import make_config
from rankbench.run.prepare import prepare
from rankbench.run.trainer import Trainer

REGISTRY = Registry.discover(entry_point_groups=False)
CPU = torch.device("cpu")


def mean_variance(make, draws: int) -> float:
    return sum(make().weight().var().item() for _ in range(draws)) / draws


@pytest.mark.parametrize("decomposition", ["tt", "tr"])
@pytest.mark.parametrize("init", ["variance", "glorot"])
def test_init_rules_give_the_stated_weight_variance(init, decomposition):
    torch.manual_seed(0)
    variance = {"variance": lambda fan_in, fan_out: 1 / (3 * fan_in),
                "glorot": lambda fan_in, fan_out: 2 / (fan_in + fan_out)}[init]
    linear = mean_variance(lambda: TensorizedLinear(784, 625, (7, 4, 7, 4), (5, 5, 5, 5), 20, decomposition,
                                                    layout="matrix", init=init), 6)
    assert linear / variance(784, 625) == pytest.approx(1, abs=0.1)
    conv = mean_variance(lambda: TensorizedConv2d(20, 50, 5, (4, 5), (5, 10), 10, decomposition, init=init), 8)
    assert conv / variance(500, 50) == pytest.approx(1, abs=0.2)  # tt-pytorch's TTConv2d: rows in*k*k, columns out
    if init == "glorot":
        table = mean_variance(lambda: TensorizedEmbedding(60, 12, (3, 4, 5), (2, 2, 3), 4, decomposition,
                                                          init=init), 40)
        assert table / (2 / 72) == pytest.approx(1, abs=0.2)


def test_glorot_spreads_its_variance_over_the_cores_as_tt_pytorch():
    """t3nsor.initializers.random_matrix: every core N(0, s²), s = σ^(1/d)·prod(tt_rank)^(-1/(2d))."""
    layer = TensorizedLinear(784, 625, (7, 4, 7, 4), (5, 5, 5, 5), 20, "tt", layout="matrix", init="glorot")
    tt_rank = [1, 20, 20, 20, 1]
    s = math.sqrt(2 / (784 + 625)) ** (1 / 4) * math.prod(r ** (-1 / 8) for r in tt_rank)
    for core in layer.cores:
        assert core.std().item() == pytest.approx(s, rel=0.05)
    assert layer.init_variance() == pytest.approx(2 / (784 + 625))


def test_the_init_rule_is_drawn_by_reset_cores_and_carried_by_clones():
    torch.manual_seed(1)
    layer = TensorizedLinear(784, 625, (7, 4, 7, 4), (5, 5, 5, 5), 20, "tt", layout="matrix", init="glorot")
    with torch.no_grad():
        for core in layer.cores:
            core.zero_()
    layer.reset_cores()
    assert layer.weight().var().item() / (2 / 1409) == pytest.approx(1, abs=0.3)
    assert layer.pruned().init == "glorot" and TensorizedLinear(6, 4, (2, 3), (4,), 2).init == "variance"
    with pytest.raises(Exception, match="unknown init"):
        TensorizedLinear(6, 4, (2, 3), (4,), 2, init="xavier")


@functools.cache
def embedded_digits():
    return REGISTRY.task("mlp2")(make_config(REGISTRY, "mlp2", "mars").task_params).load_data(None, False)


def mlp2(**task):
    """MARS on mlp2, the embedded digits loaded once."""
    config = make_config(REGISTRY, "mlp2", "mars", task, device="cpu")
    return prepare(config, REGISTRY, data=embedded_digits())


def test_unit_inputs_feed_the_network_the_digits_pixels_in_0_1():
    prepared = mlp2(inputs="unit", epochs=1)
    model, _ = prepared.build(0)
    seen = []
    model.fc1.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    x = prepared.data.train.x[:256]
    model.eval()
    with torch.no_grad():
        model(x)
    pixels = seen[-1]
    assert pixels.min() >= 0 and pixels.max() <= 1 and pixels.max() == 1
    assert torch.equal(pixels * 255, torch.round(pixels * 255))  # on the 8-bit grid: ToTensor's p/255
    assert torch.allclose(pixels, (x.flatten(1) * 0.3081 + 0.1307), atol=1e-6)
    normalised, _ = mlp2(inputs="normalised", epochs=1).build(0)
    normalised.fc1.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        normalised.eval()(x)
    assert torch.equal(seen[-1], x.flatten(1))


def test_small_normal_biases_and_glorot_for_the_dense_model_too():
    torch.manual_seed(0)
    task = REGISTRY.task("mlp2")(mlp2(bias_init="small_normal", init="glorot", epochs=1).task.params)
    model = task.tensorized_model(20)
    assert model.fc1.bias.std().item() == pytest.approx(1e-3, rel=0.15)
    assert model.fc1.bias.abs().max().item() < 6e-3
    dense = task.dense_model()
    assert dense.fc1.weight.var().item() == pytest.approx(2 / 1409, rel=0.05)
    assert dense.fc1.bias.std().item() == pytest.approx(1e-3, rel=0.15)


def test_mars_on_mlp2_runs_the_notebook_by_default_and_the_other_methods_keep_theirs():
    prepared = mlp2()
    assert prepared.recipe == "mars-notebook"
    task = {k: prepared.task.params[k] for k in ("inputs", "init", "bias_init", "epochs", "batch_size", "lr",
                                                 "lr_decay", "initial_rank", "decomposition")}
    assert task == {"inputs": "unit", "init": "glorot", "bias_init": "small_normal", "epochs": 300,
                    "batch_size": 128, "lr": 1e-2, "lr_decay": 0.99, "initial_rank": 20, "decomposition": "tt"}
    method = prepared.method_params
    assert (method["mode"], method["prior"], method["alpha"]) == ("soft", None, None)  # π 0.1, α −1.5
    assert {k: method[k] for k in ("tau0", "tau_decay", "tau_min", "gamma", "zeta", "core_prior_inv_std",
                                   "prior_n", "selector_lr", "allow_rank_zero", "warmup_epochs")} == {
        "tau0": 0.1, "tau_decay": 0.99, "tau_min": 0.01, "gamma": -0.1, "zeta": 1.1, "core_prior_inv_std": 0.1,
        "prior_n": 60000, "selector_lr": None, "allow_rank_zero": True, "warmup_epochs": 0}
    assert prepared.defaults.sources["init"] == "recipe mars-notebook"
    assert any("MARS's 2FC-Net" in why for why in prepared.defaults.why)
    for name in ("ours", "dense", "trn", "reinforce_l0"):
        other = prepare(make_config(REGISTRY, "mlp2", name, device="cpu"), REGISTRY, data=prepared.data)
        assert other.recipe != "mars-notebook"
        assert (other.task.params["inputs"], other.task.params["init"], other.task.params["bias_init"]) == (
            "normalised", "variance", "uniform")
    embedded = prepare(make_config(REGISTRY, "mlp2", "mars", recipe="embedded", device="cpu"), REGISTRY,
                       data=prepared.data)
    assert embedded.task.params["init"] == "variance" and embedded.method_params["allow_rank_zero"] is False
    assert (embedded.method_params["prior_n"], embedded.method_params["selector_lr"]) == (60000, 0.03)
    lenet = prepare(make_config(REGISTRY, "lenet5", "mars", device="cpu"), REGISTRY, data=prepared.data)
    assert lenet.recipe == "embedded" and lenet.method_params["allow_rank_zero"] is False


def zero_bond_model():
    """mlp2 with MARS allowing rank 0, fc1's bond 2 closed (every θ < 0) and fc2's partly closed."""
    prepared = mlp2(initial_rank=4, allow_rank_zero=True, epochs=1)
    model, method = prepared.build(0)
    with torch.no_grad():
        for mask in method.masks(model):
            mask.theta.fill_(1.0)
        method.selectors["fc1.bond2"].theta.fill_(-1.0)
        method.selectors["fc2.bond1"].theta.copy_(torch.tensor([1.0, -1.0, 0.5, -0.5]))
    return prepared, model.eval(), method


def test_a_zero_rank_bond_leaves_the_bias_prunes_and_counts():
    prepared, model, method = zero_bond_model()
    x = prepared.data.test.x[:32]
    hidden = []
    model.fc1.register_forward_hook(lambda module, args, out: hidden.append(out))
    with torch.no_grad():
        out = model(x)
    assert torch.allclose(hidden[-1], model.fc1.bias.expand(32, -1))  # fc1 outputs its bias alone
    assert learned_ranks(model) == {"fc1": [1, 4, 0, 4], "fc2": [1, 2]}
    # cores at eval ranks: fc1 (1,7,5,4) (4,4,5,0) (0,7,5,4) (4,4,5,1); fc2 (1,25,5,2) (2,25,2,1); + biases
    expected = 1 * 35 * 4 + 0 + 0 + 4 * 20 * 1 + 1 * 125 * 2 + 2 * 50 * 1 + 625 + 10
    assert count_parameters(model) == expected
    pruned = prune_model(model).eval()
    assert sum(p.numel() for p in pruned.parameters()) == expected == count_parameters(pruned)
    assert [tuple(c.shape) for c in pruned.fc1.cores] == [(1, 7, 5, 4), (4, 4, 5, 0), (0, 7, 5, 4), (4, 4, 5, 1)]
    with torch.no_grad():
        assert torch.allclose(pruned(x), out, atol=1e-6)
        assert torch.equal(pruned.fc1.dense_weight(), torch.zeros(784, 625))
    exported = export(model, x[:8], materialised=True)
    assert exported.parameters == expected and exported.max_abs_difference < 1e-9
    assert torch.equal(exported.model.fc1.weight, torch.zeros(625, 784))
    assert prepared.dense_parameters / count_parameters(model) > 300


def test_without_allow_rank_zero_a_closed_bond_keeps_its_likeliest_slice():
    prepared = mlp2(initial_rank=4, epochs=1)
    assert prepared.method_params["allow_rank_zero"] is True  # the notebook's
    prepared = mlp2(initial_rank=4, allow_rank_zero=False, epochs=1)
    model, method = prepared.build(0)
    with torch.no_grad():
        for mask in method.masks(model):
            mask.theta.fill_(1.0)
        method.selectors["fc1.bond2"].theta.copy_(torch.tensor([-1.0, -0.2, -3.0, -0.5]))
    assert learned_ranks(model.eval())["fc1"] == [1, 4, 1, 4]
    pruned = prune_model(model)
    assert pruned.fc1.cores[1].shape == (4, 4, 5, 1) and pruned.fc1.cores[2].shape == (1, 7, 5, 4)
    kept = pruned.fc1.cores[2][0]  # the likeliest slice (θ = −0.2), folded with its eval multiplier 1
    assert torch.equal(kept, model.fc1.cores[2][1].detach())


def warmup_run(tmp_path, epochs: int = 3, warmup: int = 2):
    from helpers import make_tiny_mnist

    config = make_config(REGISTRY, "mlp2", "mars", {"val_size": 40, "initial_rank": 3, "batch_size": 64,
                                                    "warmup_epochs": warmup},
                         epochs=epochs, data_dir=make_tiny_mnist(tmp_path / "data"), device="cpu")
    return prepare(config, REGISTRY)


def trainer_for(prepared) -> Trainer:
    model, method = prepared.build(0)
    return Trainer(model, method, prepared.task, prepared.data, epochs=prepared.epochs, seed=0, device=CPU,
                   dense_parameters=prepared.dense_parameters)


def test_warmup_keeps_the_masks_at_one_then_switches_them_on_and_resumes_mid_warmup(tmp_path):
    prepared = warmup_run(tmp_path)
    unpruned = count_parameters(prepared.build(0)[0].eval())
    trainer = trainer_for(prepared)
    model, method = trainer.model, trainer.method
    seen: list[list[float]] = []
    for mask in method.masks(model):
        mask.register_forward_hook(lambda module, args, out: seen.append(out.detach().clone()))
    with torch.no_grad():  # closed logits: unmasked only because of the warm-up
        for mask in method.masks(model):
            mask.theta.fill_(-2.0)
    trainer.train_epoch()
    assert seen and all(torch.equal(m, torch.ones_like(m)) for m in seen)  # training and validation
    assert count_parameters(model) == unpruned  # nothing pruned during the warm-up
    checkpoint = copy.deepcopy(trainer.state_dict())  # as saved: not the live tensors training goes on with
    assert checkpoint.method["masking"] is False
    trainer.train_epoch()  # epoch 2 = warmup_epochs: still unmasked, then on_epoch_end switches the masks on
    assert all(float(m.masking) == 1 for m in method.masks(model))
    seen.clear()
    trainer.train_epoch()
    assert seen and not all(torch.equal(m, torch.ones_like(m)) for m in seen)

    resumed = trainer_for(prepared)
    resumed.load_state_dict(checkpoint)
    assert all(float(m.masking) == 0 for m in resumed.method.masks(resumed.model))
    resumed.fit()
    assert all(float(m.masking) == 1 for m in resumed.method.masks(resumed.model))
    for (name, a), b in zip(model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    for key in ("train_loss", "penalty", "val_loss", "val_accuracy", "compression"):
        assert [h[key] for h in resumed.history] == [h[key] for h in trainer.history], key


def test_a_checkpoint_from_before_warmups_loads_with_its_masks_on():
    prepared = mlp2(initial_rank=3, epochs=1)
    model, _ = prepared.build(0)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("masking")}
    fresh, method = mlp2(initial_rank=3, epochs=1, warmup_epochs=2).build(0)
    assert all(float(m.masking) == 0 for m in method.masks(fresh))
    fresh.load_state_dict(state)
    assert all(float(m.masking) == 1 for m in method.masks(fresh))


def test_a_run_whose_bonds_close_to_zero_records_counts_and_exports(tmp_path):
    """One epoch of the notebook set-up on the embedded digits: every logit is still < 0, so every bond
    prunes to rank 0, the network outputs fc2's bias (10 %), and the run records, rebuilds and exports."""
    from rankbench.export import export_run, rebuild
    from rankbench.run.experiment import run

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    config = make_config(REGISTRY, "mlp2", "mars", {"initial_rank": 4}, epochs=1, tracking_uri=uri,
                         progress=False, device="cpu")
    (result,) = run(prepare(config, REGISTRY))
    assert result.ranks == {"fc1": [1, 0, 0, 0], "fc2": [1, 0]}
    assert result.parameters == 625 + 10  # the biases alone
    exported = export_run(result.run_id, tmp_path / "model.pt", REGISTRY, uri, materialised=True)
    assert exported.parameters == result.parameters and exported.ranks == result.ranks
    model, _ = rebuild(result.run_id, REGISTRY, uri)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(model(x), model.fc2.bias.expand(4, -1))
        assert torch.allclose(exported.model(x), model(x))


@pytest.mark.parametrize("key, recipe, fragment", [
    ("lenet5", "nosuch", "recipe='nosuch' is not a recipe of task lenet5 (paper, embedded)"),
    ("lenet5/embedded", "embedded", "recipe='embedded' belongs on the task's entry 'lenet5'"),
])
def test_a_method_naming_a_wrong_recipe_of_its_own_is_broken_at_discovery(tmp_path, key, recipe, fragment):
    (tmp_path / "own.py").write_text(
        "from rankbench.plugin import Method, MethodDefaults\n"
        "class Own(Method):\n"
        "    name = 'own'\n"
        f"    task_defaults = {{{key!r}: MethodDefaults({{}}, 'why', recipe={recipe!r})}}\n"
    )
    registry = Registry.discover(plugin_dirs=[tmp_path], entry_point_groups=False)
    assert "own" not in registry.methods and fragment in registry.broken["own"]
