"""What layers and selectors answer for themselves: dense twins, training contractions,
module-path names, the selector registry built at attach, and supplied multipliers."""

import pytest
import torch
from torch import nn

from rankbench.export import materialise
from rankbench.layers.tensorized import (
    RankSelector,
    TensorizedConv2d,
    TensorizedEmbedding,
    TensorizedLayer,
    TensorizedLinear,
    bonds,
    learned_ranks,
    tensorized_layers,
)
from rankbench.plugins.method import Method, MethodContext
from rankbench.plugins.registry import Registry
from rankbench.run.config import make_config

REGISTRY = Registry.discover(entry_point_groups=False)
CPU = MethodContext(num_train=100, device=torch.device("cpu"))


class FixedMultipliers(RankSelector):
    """Given eval multipliers (zeros close slices); training samples are never drawn here."""

    def __init__(self, values: torch.Tensor) -> None:
        super().__init__(len(values))
        self.values = nn.Parameter(values.clone())

    def sample(self) -> torch.Tensor:
        return self.values * 0.5

    def deterministic(self) -> torch.Tensor:
        return self.values


def gate_every_bond(layer: TensorizedLayer) -> None:
    """A selector on every gateable bond, one slice closed and one halved where the bond allows."""
    for k in layer.gateable_bonds():
        values = torch.ones(layer.ranks[k], dtype=layer.cores[0].dtype)
        if len(values) > 1:
            values[0], values[-1] = 0.0, 0.5
        layer.set_selector(k, FixedMultipliers(values))


def make_method(name: str, task: str = "lenet5", **params) -> Method:
    config = make_config(REGISTRY, task, name, params)
    return REGISTRY.method(name)(config.method_params)


# ---------------------------------------------------------------------------- to_dense


@pytest.mark.parametrize("decomposition,ranks,layout", [("tr", 3, "chain"), ("tt", [1, 3, 2, 4, 3], "chain"),
                                                        ("tt", [1, 3, 1], "matrix")])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_to_dense_equals_eval_outputs(decomposition, ranks, layout, bias):
    torch.manual_seed(0)
    in_modes, out_modes = ((3, 4, 5), (3, 4)) if layout == "chain" else ((6, 10), (3, 4))
    layer = TensorizedLinear(60, 12, in_modes, out_modes, ranks, decomposition, bias=bias, layout=layout).double()
    gate_every_bond(layer)
    layer.eval()
    dense = layer.to_dense()
    assert type(dense) is nn.Linear and (dense.bias is None) == (not bias)
    assert dense.weight.dtype == torch.float64 and not dense.training
    x = torch.randn(5, 60, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(dense(x), layer(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("decomposition,ranks", [("tr", 3), ("tt", [1, 3, 2, 4])])
@pytest.mark.parametrize("bias", [True, False])
def test_conv_to_dense_equals_eval_outputs(decomposition, ranks, bias):
    torch.manual_seed(1)
    layer = TensorizedConv2d(6, 4, 3, (2, 3), (4,), ranks, decomposition, stride=2, padding=1, bias=bias).double()
    gate_every_bond(layer)
    layer.eval()
    dense = layer.to_dense()
    assert type(dense) is nn.Conv2d and (dense.bias is None) == (not bias)
    assert (dense.stride, dense.padding, dense.kernel_size) == ((2, 2), (1, 1), (3, 3))
    x = torch.randn(2, 6, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(dense(x), layer(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("decomposition,ranks,layout", [("tr", 3, "chain"), ("tt", [1, 3, 2, 4, 3, 2], "chain"),
                                                        ("tt", [1, 3, 3, 1], "matrix")])
def test_embedding_to_dense_equals_eval_outputs(decomposition, ranks, layout):
    torch.manual_seed(2)
    layer = TensorizedEmbedding(60, 12, (3, 4, 5), (2, 2, 3), ranks, decomposition, layout=layout).double()
    gate_every_bond(layer)
    layer.eval()
    dense = layer.to_dense()
    assert type(dense) is nn.Embedding and dense.weight.shape == (60, 12)
    indices = torch.tensor([[0, 59, 7], [31, 31, 12]])
    with torch.no_grad():
        torch.testing.assert_close(dense(indices), layer(indices), rtol=1e-12, atol=1e-12)


def test_materialise_replaces_every_layer_by_its_dense_twin():
    torch.manual_seed(3)
    model = nn.Sequential(TensorizedConv2d(2, 4, 3, (2,), (2, 2), 2, padding=1), nn.Flatten(),
                          TensorizedLinear(64, 6, (8, 8), (6,), 2, bias=False)).eval()
    x = torch.randn(3, 2, 4, 4)
    with torch.no_grad():
        expected = model(x)
        twins = [layer.to_dense() for _, layer in tensorized_layers(model)]
        materialise(model)
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)
    assert not list(tensorized_layers(model))
    assert [type(model[0]), type(model[2])] == [type(t) for t in twins] == [nn.Conv2d, nn.Linear]
    assert torch.equal(model[2].weight, twins[1].weight)


# ---------------------------------------------------------------------------- strategy, bias, contraction


def test_every_layer_declares_strategy_and_bias():
    conv = TensorizedConv2d(2, 4, 3, (2,), (2, 2), 2, bias=False)
    embedding = TensorizedEmbedding(60, 12, (3, 4, 5), (2, 2, 3), 2)
    linear = TensorizedLinear(6, 4, (2, 3), (4,), 2)
    assert conv.strategy == "weight" and conv.bias is None and embedding.bias is None
    assert isinstance(linear.bias, nn.Parameter)
    assert "bias" not in conv.state_dict() and "bias" not in embedding.state_dict()
    assert [n for n, _ in linear.named_parameters()] == ["bias", "cores.0", "cores.1", "cores.2"]
    assert conv.parameter_count() == sum(p.numel() for p in conv.parameters())


def test_training_contraction_says_what_the_training_forward_contracts():
    torch.manual_seed(4)
    for strategy in ("weight", "input"):
        assert TensorizedLinear(60, 12, (3, 4, 5), (3, 4), 3, strategy=strategy).training_contraction(7) == strategy
    layer = TensorizedLinear(64, 64, (4, 4, 4), (4, 4, 4), 16)
    for batch in (1, 128):
        costs = layer._costs(batch)
        assert layer.training_contraction(batch) == min(costs, key=costs.get)
    # measured on 2 CPU cores, forward + backward: batch 1 input 0.86 ms, weight 1.61; batch 128 weight 1.01, input 1.07
    assert layer.training_contraction(1) == "input" and layer.training_contraction(128) == "weight"
    layer.train()
    rebuilt = []
    real = layer.dense_weight
    layer.dense_weight = lambda: rebuilt.append(True) or real()
    for batch in (1, 128):
        rebuilt.clear()
        layer(torch.randn(batch, 64))
        assert bool(rebuilt) == (layer.training_contraction(batch) == "weight")
    conv = TensorizedConv2d(2, 4, 3, (2,), (2, 2), 2)
    assert conv.training_contraction(128) == "weight"
    small = TensorizedEmbedding(60, 12, (3, 4, 5), (2, 2, 3), 2, strategy="weight")
    big = TensorizedEmbedding(32768, 512, (32, 32, 32), (8, 8, 8), 16)
    assert small.training_contraction(128) == "weight"
    assert big.training_contraction(128) == "gather"  # 128 indices, a few rows of a huge table


# ---------------------------------------------------------------------------- names


def test_resnet_layers_are_named_by_their_module_paths():
    task = REGISTRY.task("resnet32")(make_config(REGISTRY, "resnet32", "trn", {"rank": 2}).task_params)
    model = task.tensorized_model(2)
    paths = [n for n, m in model.named_modules() if isinstance(m, TensorizedLayer)]
    assert list(learned_ranks(model)) == [n for n, _ in tensorized_layers(model)] == paths
    assert paths[:3] == ["conv1", "blocks.0.conv1", "blocks.0.conv2"]
    assert paths[-3:] == ["blocks.14.conv1", "blocks.14.conv2", "fc"] and len(paths) == 32
    assert all(model.get_submodule(p).label == p for p in paths)
    assert bonds(model)[0].name == "conv1.bond0" and not any("stage" in b.name for b in bonds(model))


@pytest.mark.parametrize("name,expected", [("lenet5", ["conv1", "conv2", "fc1", "fc2"]), ("mlp2", ["fc1", "fc2"])])
def test_digit_task_layer_names_are_unchanged(name, expected):
    task = REGISTRY.task(name)(make_config(REGISTRY, name, "trn", {"rank": 2}).task_params)
    assert list(learned_ranks(task.tensorized_model(2))) == expected


# ---------------------------------------------------------------------------- the selector registry


@pytest.mark.parametrize("name", ["ours", "mars", "reinforce_l0"])
def test_attach_registers_each_bonds_selector_once_in_bond_order(name):
    method = make_method(name)
    task = REGISTRY.task("lenet5")(make_config(REGISTRY, "lenet5", name, {}).task_params)
    model = task.tensorized_model(4)
    method.attach(model, CPU)
    expected = [b.name for b in bonds(model)]
    assert list(method.selectors) == expected and len(expected) == 4 + 5 + 7 + 4
    assert [method.selectors[b.name] for b in bonds(model)] == [b.layer.selector(b.index) for b in bonds(model)]
    assert len({id(s) for s in method.selectors.values()}) == len(expected)
    found = method.masks(model) if name == "mars" else method.gates(model)
    assert found == list(method.selectors.values())
    other = task.tensorized_model(4)
    method.attach(other, CPU)
    assert not {id(s) for s in method.selectors.values()} & {id(s) for s in found}


def test_bonds_without_a_selector_are_not_registered():
    class EveryOtherBond(Method):
        name = "every_other_bond"

        def selector(self, bond):
            return FixedMultipliers(torch.ones(bond.size)) if bond.index % 2 == 0 else None

    model = nn.Sequential(TensorizedLinear(60, 12, (3, 4, 5), (3, 4), 2))
    method = EveryOtherBond({})
    method.attach(model, CPU)
    assert list(method.selectors) == ["0.bond0", "0.bond2", "0.bond4"]
    assert list(model[0].selectors.values()) == list(method.selectors.values())


# ---------------------------------------------------------------------------- supplied multipliers


def test_supplied_multipliers_drive_the_training_forward_and_are_cleared_after():
    torch.manual_seed(5)
    layer = TensorizedLinear(6, 4, (2, 3), (4,), 3).double()
    gate_every_bond(layer)
    selectors = [layer.selector(k) for k in layer.gateable_bonds()]
    values = {s: torch.rand(s.size, dtype=torch.float64) for s in selectors}
    reference = TensorizedLinear(6, 4, (2, 3), (4,), 3).double()
    reference.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.startswith("selectors")})
    for k, s in zip(layer.gateable_bonds(), selectors):
        reference.set_selector(k, FixedMultipliers(values[s]))
    reference.eval()
    x = torch.randn(5, 6, dtype=torch.float64)
    layer.train()
    with RankSelector.supplied(values):
        assert all(torch.equal(s(), values[s]) for s in selectors)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), reference(x))
        layer.eval()
        assert all(torch.equal(s(), s.deterministic()) for s in selectors)  # eval ignores supplied values
        layer.train()
    assert all(torch.equal(s(), s.sample()) for s in selectors)


def test_supplied_values_are_restored_on_errors_nesting_and_bad_shapes():
    gate = FixedMultipliers(torch.ones(3)).train()
    outer, inner = torch.full((3,), 0.25), torch.full((3,), 0.75)
    with pytest.raises(RuntimeError, match="boom"):
        with RankSelector.supplied({gate: outer}):
            raise RuntimeError("boom")
    assert torch.equal(gate(), gate.sample())
    with RankSelector.supplied({gate: outer}):
        with RankSelector.supplied({gate: inner}):
            assert torch.equal(gate(), inner)
        assert torch.equal(gate(), outer)
    other = FixedMultipliers(torch.ones(2)).train()
    with pytest.raises(ValueError, match="size 2"):
        with RankSelector.supplied({gate: outer, other: outer}):
            pass
    assert torch.equal(gate(), gate.sample()) and torch.equal(other(), other.sample())


def test_reinforce_runs_its_forward_passes_on_the_gates_it_drew(monkeypatch):
    """REINFORCE draws every sample's gates in ``loss``, all at once (one ``torch.bernoulli``), and
    each of its M forward passes runs on its sample, bit for bit."""
    method = make_method("reinforce_l0", samples=3)
    task = REGISTRY.task("lenet5")(make_config(REGISTRY, "lenet5", "reinforce_l0", {}).task_params)
    torch.manual_seed(6)
    model = task.tensorized_model(4).train()
    method.attach(model, CPU)
    gates = method.gates(model)
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    drawn, bernoulli = [], torch.bernoulli
    with monkeypatch.context() as patch:
        patch.setattr(torch, "bernoulli", lambda p: drawn.append(bernoulli(p)) or drawn[-1])
        step = method.loss(model, (x, y), task.loss)
    assert len(drawn) == 1 and drawn[0].shape == (3, sum(g.size - 1 for g in gates))
    by_forward = []
    for z in drawn[0]:
        values = {g: g.with_fixed_slot(zg) for g, zg in zip(gates, z.split([g.size - 1 for g in gates]), strict=True)}
        with RankSelector.supplied(values):
            by_forward.append(task.loss(model(x), y))
    assert torch.equal(step.task, torch.stack(by_forward).mean().detach())
    torch.manual_seed(8)  # after the step a training forward samples afresh: no supplied value is left
    first = [g() for g in gates]
    torch.manual_seed(8)
    assert all(torch.equal(a, g.sample()) for a, g in zip(first, gates))


def test_a_static_input_keeps_its_address_passes_gradients_and_cuts_the_last_steps_graph():
    from rankbench.plugin import StaticInput

    mu = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))
    static = StaticInput()
    addresses = []
    for step in range(3):
        held = static.update(mu * (step + 1))
        addresses.append(held.data_ptr())
        assert torch.equal(held.detach(), (mu * (step + 1)).detach())
        mu.grad = None
        (held * torch.tensor([1.0, 10.0, 100.0])).sum().backward()  # a second step backwards through its own graph only
        assert torch.equal(mu.grad, torch.tensor([1.0, 10.0, 100.0]) * (step + 1))
    assert len(set(addresses)) == 1
    assert static.update(torch.zeros(2)).shape == (2,)  # another shape: a new tensor
