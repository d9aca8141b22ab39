"""Property-based tests (hypothesis) of the tensorized layers: for random tensorizations, ranks and
gate values, every layer kind computes what its reconstructed dense weight computes, and pruning
(closed slices removed, multipliers folded in) keeps the gated layer's eval outputs."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from rankbench.layers.tensorized import RankSelector, TensorizedConv2d, TensorizedEmbedding, TensorizedLinear

MODES = st.lists(st.integers(1, 4), min_size=1, max_size=3)
DECOMPOSITION = st.sampled_from(["tr", "tt"])


class FixedGate(RankSelector):
    """Eval multipliers given up front (zeros close slices); at least one stays non-zero."""

    def __init__(self, values: torch.Tensor) -> None:
        super().__init__(len(values))
        self.register_buffer("values", values)

    def sample(self) -> torch.Tensor:
        return self.values

    def deterministic(self) -> torch.Tensor:
        return self.values


def gate_every_bond(layer, draw_gate) -> None:
    for bond in layer.gateable_bonds():
        layer.set_selector(bond, FixedGate(draw_gate(layer.ranks[bond])))


def gates(data):
    def draw(size: int) -> torch.Tensor:
        values = data.draw(st.lists(st.sampled_from([0.0, 0.5, 1.0, 1.7]), min_size=size, max_size=size))
        values[data.draw(st.integers(0, size - 1))] = 1.0  # a bond keeps at least one slice
        return torch.tensor(values, dtype=torch.float64)

    return draw


def ranks_for(data, d: int) -> list[int]:
    return data.draw(st.lists(st.integers(1, 4), min_size=d, max_size=d))


@settings(max_examples=40, deadline=None)
@given(data=st.data(), in_modes=MODES, out_modes=MODES, decomposition=DECOMPOSITION,
       layout=st.sampled_from(["chain", "matrix"]), strategy=st.sampled_from(["weight", "input"]),
       bias=st.booleans())
def test_linear_equals_its_dense_weight_and_pruning_keeps_outputs(data, in_modes, out_modes, decomposition, layout,
                                                                  strategy, bias):
    if layout == "matrix" and len(in_modes) != len(out_modes):
        out_modes = (out_modes * 3)[:len(in_modes)]
    d = len(in_modes) if layout == "matrix" else len(in_modes) + len(out_modes)
    torch.manual_seed(0)
    layer = TensorizedLinear(math.prod(in_modes), math.prod(out_modes), in_modes, out_modes, ranks_for(data, d),
                             decomposition, bias=bias, strategy=strategy, layout=layout).double()
    gate_every_bond(layer, gates(data))
    x = torch.randn(5, layer.in_features, dtype=torch.float64)
    layer.train()
    expected = F.linear(x, layer.dense_weight().T, layer.bias)
    assert torch.allclose(layer(x), expected, atol=1e-10)
    layer.eval()
    with torch.no_grad():
        gated = layer(x)
        pruned = layer.pruned().eval()(x)
    assert torch.allclose(pruned, gated, atol=1e-10)


@settings(max_examples=25, deadline=None)
@given(data=st.data(), in_modes=MODES, out_modes=MODES, decomposition=DECOMPOSITION,
       kernel=st.sampled_from([1, 3]), bias=st.booleans())
def test_conv_equals_its_dense_kernel_and_pruning_keeps_outputs(data, in_modes, out_modes, decomposition, kernel,
                                                                bias):
    d = 1 + len(in_modes) + len(out_modes)
    torch.manual_seed(0)
    layer = TensorizedConv2d(math.prod(in_modes), math.prod(out_modes), kernel, in_modes, out_modes,
                             ranks_for(data, d), decomposition, padding=kernel // 2, bias=bias).double()
    gate_every_bond(layer, gates(data))
    x = torch.randn(2, layer.in_channels, 5, 5, dtype=torch.float64)
    layer.eval()
    with torch.no_grad():
        gated = layer(x)
        assert torch.allclose(gated, F.conv2d(x, layer.dense_weight(), layer.bias, padding=kernel // 2), atol=1e-10)
        assert torch.allclose(layer.pruned().eval()(x), gated, atol=1e-10)


@settings(max_examples=25, deadline=None)
@given(data=st.data(), vocab_modes=MODES, dim_modes=MODES, decomposition=DECOMPOSITION,
       strategy=st.sampled_from(["weight", "gather"]))
def test_embedding_equals_its_dense_table_and_pruning_keeps_outputs(data, vocab_modes, dim_modes, decomposition,
                                                                    strategy):
    d = len(vocab_modes) + len(dim_modes)
    torch.manual_seed(0)
    layer = TensorizedEmbedding(math.prod(vocab_modes), math.prod(dim_modes), vocab_modes, dim_modes,
                                ranks_for(data, d), decomposition, strategy=strategy).double()
    gate_every_bond(layer, gates(data))
    indices = torch.randint(0, layer.num_embeddings, (3, 4))
    layer.train()
    assert torch.allclose(layer(indices), layer.dense_weight()[indices], atol=1e-10)
    layer.eval()
    with torch.no_grad():
        assert torch.allclose(layer.pruned().eval()(indices), layer(indices), atol=1e-10)
