"""Tensorized layers against tensorly's reference contractions (float64)."""


import pytest
import tensorly as tl
import torch
import torch.nn.functional as F
from torch import nn

from rankbench.errors import RankbenchError
from rankbench.layers.tensorized import (
    RankSelector,
    TensorizedConv2d,
    TensorizedLinear,
    TensorRingConv2d,
    TensorRingLinear,
    TensorTrainConv2d,
    TensorTrainLinear,
    bonds,
    count_parameters,
    learned_ranks,
    prune_model,
)

tl.set_backend("pytorch")


def reference_tensor(layer) -> torch.Tensor:
    cores = [c.detach() for c in layer.gated_cores()]
    return tl.tr_to_tensor(cores) if layer.decomposition == "tr" else tl.tt_to_tensor(cores)


class FixedMultipliers(RankSelector):
    """A selector with given multipliers (zeros prune slices)."""

    def __init__(self, values: torch.Tensor) -> None:
        super().__init__(len(values))
        self.values = nn.Parameter(values.clone())

    def deterministic(self) -> torch.Tensor:
        return self.values


@pytest.mark.parametrize("cls", [TensorRingLinear, TensorTrainLinear])
@pytest.mark.parametrize("strategy", ["weight", "input", "auto"])
def test_linear_equals_dense_layer_from_reference_weight(cls, strategy):
    torch.manual_seed(0)
    layer = cls(60, 12, (3, 4, 5), (3, 4), [3, 4, 2, 5, 3], strategy=strategy).double()
    weight = reference_tensor(layer).reshape(60, 12)
    x = torch.randn(7, 60, dtype=torch.float64)
    expected = F.linear(x, weight.T, layer.bias)
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-12)
    layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cls", [TensorRingConv2d, TensorTrainConv2d])
def test_conv_equals_dense_conv_and_modes_index_kernel_input_output(cls):
    torch.manual_seed(1)
    layer = cls(6, 10, 3, (2, 3), (5, 2), 3, padding=1, stride=2).double()
    full = reference_tensor(layer)  # modes: kernel (9), in (2,3), out (5,2)
    assert full.shape == (9, 2, 3, 5, 2)
    weight = layer.weight()
    for o, i, p, q in [(0, 0, 0, 0), (7, 4, 2, 1), (9, 5, 1, 2), (3, 2, 0, 2)]:
        expected = full[p * 3 + q, i // 3, i % 3, o // 2, o % 2]
        assert torch.allclose(weight[o, i, p, q], expected)
    x = torch.randn(2, 6, 9, 9, dtype=torch.float64)
    torch.testing.assert_close(layer(x), F.conv2d(x, weight.detach(), layer.bias, stride=2, padding=1))


def test_linear_input_modes_come_first():
    torch.manual_seed(2)
    layer = TensorRingLinear(6, 4, (2, 3), (4,), 2).double()
    full = reference_tensor(layer)
    weight = layer.weight()
    for i in range(6):
        for o in range(4):
            assert torch.allclose(weight[i, o], full[i // 3, i % 3, o])


@pytest.mark.parametrize("strategy", ["weight", "input"])
def test_gradients_reach_every_core_and_selector(strategy):
    torch.manual_seed(3)
    layer = TensorRingLinear(20, 6, (4, 5), (2, 3), 3, strategy=strategy)
    layer.set_selector(2, FixedMultipliers(torch.tensor([1.0, 0.5, 0.2])))
    layer(torch.randn(5, 20)).pow(2).sum().backward()
    for core in layer.cores:
        assert core.grad is not None and core.grad.abs().sum() > 0
    assert layer.selector(2).values.grad.abs().sum() > 0
    conv = TensorRingConv2d(2, 4, 3, (2,), (2, 2), 2)
    conv(torch.randn(1, 2, 5, 5)).sum().backward()
    assert all(c.grad is not None and c.grad.abs().sum() > 0 for c in conv.cores)


def test_auto_strategy_follows_flop_estimate():
    layer = TensorRingLinear(1250, 320, (5, 5, 5, 10), (5, 8, 8), 25)
    for batch in (1, 128, 4096):
        costs = layer._costs(batch)
        assert layer.choose_strategy(batch) == min(costs, key=costs.get)
    assert layer._costs(128)["input"] < layer._costs(128)["weight"]


def test_initial_weight_variance_matches_default_dense_init():
    torch.manual_seed(4)
    samples = [TensorRingLinear(1250, 320, (5, 5, 5, 10), (5, 8, 8), 25).weight().var().item() for _ in range(5)]
    target = 1 / (3 * 1250)
    assert abs(sum(samples) / 5 / target - 1) < 0.15
    conv_var = TensorRingConv2d(20, 50, 5, (4, 5), (5, 10), 25).weight().var().item()
    assert 0.6 < conv_var / (1 / (3 * 500)) < 1.6


def test_bad_tensorization_is_a_clear_error():
    with pytest.raises(RankbenchError, match=r"multiply to 8, not 10"):
        TensorizedLinear(10, 6, (2, 4), (2, 3), 2)
    with pytest.raises(RankbenchError, match="output modes"):
        TensorizedConv2d(4, 6, 3, (2, 2), (4,), 2)
    with pytest.raises(RankbenchError, match="one rank per bond"):
        TensorizedLinear(6, 6, (2, 3), (2, 3), [2, 2])


def test_bonds_ring_vs_train():
    ring = TensorRingLinear(6, 6, (2, 3), (2, 3), 4)
    train = TensorTrainLinear(6, 6, (2, 3), (2, 3), 4)
    assert [b.index for b in bonds(ring)] == [0, 1, 2, 3]
    assert [b.index for b in bonds(train)] == [1, 2, 3]
    assert train.ranks == (1, 4, 4, 4)
    assert train.parameter_count() == 1 * 2 * 4 + 4 * 3 * 4 + 4 * 2 * 4 + 4 * 3 * 1 + 6


def test_parameter_count_by_hand():
    layer = TensorRingLinear(1250, 320, (5, 5, 5, 10), (5, 8, 8), 25)
    assert layer.parameter_count() == 25 * 25 * (5 + 5 + 5 + 10 + 5 + 8 + 8) + 320
    assert layer.parameter_count([2, 3, 4, 5, 6, 7, 8]) == (
        2 * 5 * 3 + 3 * 5 * 4 + 4 * 5 * 5 + 5 * 10 * 6 + 6 * 5 * 7 + 7 * 8 * 8 + 8 * 8 * 2 + 320
    )
    assert layer.parameter_count() == sum(p.numel() for p in layer.parameters())


def test_pruned_layer_equals_gated_eval_layer_and_counts_its_parameters():
    torch.manual_seed(5)
    layer = TensorRingLinear(30, 8, (5, 6), (2, 4), 4).double()
    layer.set_selector(0, FixedMultipliers(torch.tensor([0.0, 0.7, 1.0, 0.0])))
    layer.set_selector(2, FixedMultipliers(torch.tensor([0.3, 0.0, 0.0, 0.0])))
    layer.set_selector(3, FixedMultipliers(torch.tensor([0.0, 0.0, 0.0, 0.0])))
    layer.double().eval()
    assert layer.eval_ranks() == (2, 4, 1, 1)
    pruned = layer.pruned()
    assert pruned.ranks == (2, 4, 1, 1)
    assert len(pruned.selectors) == 0
    x = torch.randn(3, 30, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), layer(x))
    assert sum(p.numel() for p in pruned.parameters()) == layer.parameter_count()


def test_pruned_conv_and_model_level_counts():
    torch.manual_seed(6)
    model = nn.Sequential(TensorRingConv2d(3, 4, 3, (3,), (2, 2), 3), nn.Flatten(), nn.LazyLinear(5))
    model(torch.randn(1, 3, 6, 6))
    conv = model[0]
    conv.set_selector(1, FixedMultipliers(torch.tensor([1.0, 0.0, 0.5])))
    model.eval()
    pruned = prune_model(model)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), model(x), rtol=1e-5, atol=1e-6)
    assert learned_ranks(pruned) == {"0": [3, 2, 3, 3]}
    assert count_parameters(model) == sum(p.numel() for p in pruned.parameters())
    assert count_parameters(model) == (3 * 9 * 2 + 2 * 3 * 3 + 3 * 2 * 3 + 3 * 2 * 3 + 4) + (4 * 16 * 5 + 5)


def test_eval_weight_is_cached_until_parameters_change():
    layer = TensorRingConv2d(2, 4, 3, (2,), (2, 2), 2).eval()
    with torch.no_grad():
        first = layer.weight()
        assert layer.weight() is first
        layer.cores[0].mul_(2.0)
        second = layer.weight()
    assert second is not first
    torch.testing.assert_close(second, first * 2.0)
    layer.train()
    assert layer.weight() is not layer.weight()


@pytest.mark.parametrize("strategy", ["weight", "input"])
def test_tt_matrix_linear_equals_tensorly_tt_matrix(strategy):
    from tensorly.tt_matrix import tt_matrix_to_tensor

    torch.manual_seed(7)
    layer = TensorTrainLinear(84, 30, (7, 4, 3), (5, 3, 2), [1, 4, 3, 1], layout="matrix", strategy=strategy).double()
    assert [tuple(c.shape) for c in layer.cores] == [(1, 7, 5, 4), (4, 4, 3, 3), (3, 3, 2, 1)]
    weight = tt_matrix_to_tensor([c.detach() for c in layer.cores]).reshape(84, 30)
    x = torch.randn(6, 84, dtype=torch.float64)
    torch.testing.assert_close(layer(x), x @ weight + layer.bias)
    layer(x).sum().backward()
    assert all(c.grad is not None and c.grad.abs().sum() > 0 for c in layer.cores)


def test_tt_matrix_counts_and_prunes():
    layer = TensorTrainLinear(784, 625, (7, 4, 7, 4), (5, 5, 5, 5), [1, 20, 20, 20, 1], layout="matrix").double()
    assert layer.ranks == (1, 20, 20, 20)
    assert layer.parameter_count() == 7 * 5 * 20 + 20 * 4 * 5 * 20 + 20 * 7 * 5 * 20 + 20 * 4 * 5 + 625
    values = torch.zeros(20, dtype=torch.float64)
    values[[2, 5, 11]] = torch.tensor([1.0, 0.5, 0.25], dtype=torch.float64)
    layer.set_selector(2, FixedMultipliers(values))
    layer.eval()
    pruned = layer.pruned()
    assert pruned.ranks == (1, 20, 3, 20)
    assert sum(p.numel() for p in pruned.parameters()) == layer.parameter_count()
    x = torch.randn(3, 784, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), layer(x))
    with pytest.raises(RankbenchError, match="as many input modes"):
        TensorTrainLinear(28, 10, (7, 4), (10,), 2, layout="matrix")


@pytest.mark.parametrize("layout,decomposition,ranks", [("chain", "tr", 3), ("chain", "tt", [1, 3, 2, 4, 3, 2]),
                                                        ("matrix", "tt", [1, 3, 3, 1])])
@pytest.mark.parametrize("strategy", ["weight", "gather"])
def test_embedding_equals_reference_table(layout, decomposition, ranks, strategy):
    from tensorly.tt_matrix import tt_matrix_to_tensor

    from rankbench.layers.tensorized import TensorizedEmbedding

    torch.manual_seed(8)
    layer = TensorizedEmbedding(60, 12, (3, 4, 5), (2, 2, 3), ranks, decomposition, strategy=strategy,
                                layout=layout).double()
    cores = [c.detach() for c in layer.cores]
    if layout == "matrix":
        table = tt_matrix_to_tensor(cores)
    else:
        table = tl.tr_to_tensor(cores) if decomposition == "tr" else tl.tt_to_tensor(cores)
    table = table.reshape(60, 12)
    indices = torch.tensor([[0, 59, 7], [31, 31, 12]])
    torch.testing.assert_close(layer(indices), table[indices])
    layer(indices).pow(2).sum().backward()
    assert all(c.grad is not None and c.grad.abs().sum() > 0 for c in layer.cores)


def test_embedding_prunes_counts_and_picks_gather_for_a_large_vocabulary():
    from rankbench.layers.tensorized import TensorRingEmbedding

    torch.manual_seed(9)
    layer = TensorRingEmbedding(60, 12, (3, 4, 5), (2, 2, 3), 4).double()
    assert layer.parameter_count() == 16 * (3 + 4 + 5 + 2 + 2 + 3)
    layer.set_selector(2, FixedMultipliers(torch.tensor([0.0, 1.0, 0.3, 0.0], dtype=torch.float64)))
    layer.eval()
    pruned = layer.pruned()
    indices = torch.arange(60)
    with torch.no_grad():
        torch.testing.assert_close(pruned(indices), layer(indices))
    assert sum(p.numel() for p in pruned.parameters()) == layer.parameter_count()
    big = TensorRingEmbedding(32768, 512, (32, 32, 32), (8, 8, 8), 16)
    assert big.choose_strategy(128) == "gather"
    with pytest.raises(RankbenchError, match="vocabulary modes"):
        TensorRingEmbedding(100, 8, (3, 3), (8,), 2)
