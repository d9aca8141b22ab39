"""Contraction plans (rankbench/layers/contraction.py): planned once by opt_einsum, executed as
plain torch calls. They give opt_einsum's own results bit for bit, and torch.compile traces them:
every layer kind and every built-in method's training step, compiled (CPU backend ``aot_eager``),
equals eager, outputs and gradients."""

from __future__ import annotations

import collections
import logging

import opt_einsum as oe
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from rankbench.layers.contraction import ContractionCost, ContractionPlan
from rankbench.layers.tensorized import TensorizedConv2d, TensorizedEmbedding, TensorizedLinear
from rankbench.plugins.method import MethodContext
from rankbench.plugins.registry import Registry
from rankbench.run.config import make_config
from rankbench.run.prepare import build_model

REGISTRY = Registry.discover(entry_point_groups=False)


@pytest.fixture(autouse=True)
def _quiet_dynamo():
    torch._logging.set_logs(dynamo=logging.ERROR)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def layers():
    torch.manual_seed(0)
    return {
        "linear tr input": TensorizedLinear(20, 12, (4, 5), (3, 4), 3, "tr", strategy="input"),
        "linear tt weight": TensorizedLinear(20, 12, (4, 5), (3, 4), 3, "tt", strategy="weight"),
        "linear tt matrix": TensorizedLinear(20, 12, (4, 5), (3, 4), 3, "tt", strategy="input", layout="matrix"),
        "conv tr": TensorizedConv2d(4, 6, 3, (2, 2), (2, 3), 3, "tr", padding=1),
        "embedding gather": TensorizedEmbedding(20, 12, (4, 5), (3, 4), 3, "tr", strategy="gather"),
        "embedding weight": TensorizedEmbedding(20, 12, (4, 5), (3, 4), 3, "tt", strategy="weight"),
    }


def example(name: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    if name.startswith("conv"):
        return torch.randn(2, 4, 5, 5, generator=generator)
    if name.startswith("embedding"):
        return torch.randint(0, 20, (3, 4), generator=generator)
    return torch.randn(8, 20, generator=generator, requires_grad=True)


@pytest.mark.parametrize("equation, shapes", [
    ("ab,bc,cd->ad", [(3, 4), (4, 5), (5, 2)]),
    ("aib,bjc,cka->ijk", [(3, 4, 2), (2, 5, 3), (3, 6, 3)]),
    ("zi,aib,bjc,cka->zjk", [(7, 4), (3, 4, 2), (2, 5, 3), (3, 6, 3)]),
    ("ab,ab->", [(3, 4), (3, 4)]),
])
def test_a_plan_gives_opt_einsums_result(equation, shapes):
    """The same path as opt_einsum's, its products laid out differently: equal to float64 rounding."""
    generator = torch.Generator().manual_seed(0)
    operands = [torch.randn(*s, generator=generator, dtype=torch.float64) for s in shapes]
    planned = ContractionPlan(equation, *shapes)(*operands)
    expected = oe.contract(equation, *operands, backend="torch", optimize="auto")
    assert planned.shape == expected.shape
    assert torch.allclose(planned, expected, rtol=1e-12, atol=1e-12)
    plan = ContractionPlan(equation, *shapes)
    _, info = oe.contract_path(equation, *shapes, shapes=True, optimize="auto")
    assert plan.cost.flops == info.opt_cost  # the cost model counts opt_einsum's FLOPs, plus traffic and kernels
    assert plan.cost.kernels >= len(plan.steps) and plan.cost.traffic > 0


def test_the_cost_estimate_weighs_traffic_and_kernels_by_device():
    """A GPU step is launch-bound: there a kernel weighs as much as a large matrix product's FLOPs."""
    few_big = ContractionCost(flops=10**8, traffic=10**5, kernels=1)
    many_small = ContractionCost(flops=10**6, traffic=10**4, kernels=8)
    assert few_big.estimate("cpu") > many_small.estimate("cpu")
    assert few_big.estimate("cuda") < many_small.estimate("cuda")
    assert (few_big + many_small).kernels == 9


def kernels(function) -> collections.Counter:
    """The aten ops ``function`` dispatches, by name (views and reshapes that copy nothing left out)."""
    seen: collections.Counter = collections.Counter()

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    with Count():
        function()
    return seen


def test_a_tensor_train_is_rebuilt_by_matrix_products_alone_and_a_ring_copies_only_where_it_closes():
    """Neighbouring arcs of a ring merge as plain matrix products read in place; only the two arcs that
    close the ring (each holding both open bonds at its ends) are copied, forward and backward, and
    the closed ring once more when its modes come out of order (opt_einsum's cheapest last split here
    is no prefix of the weight's axes). ``torch.tensordot`` made 9 copies of this ring."""
    train = TensorizedLinear(210, 60, (5, 6, 7), (3, 4, 5), 4, "tt", strategy="weight")
    ring = TensorizedLinear(210, 60, (5, 6, 7), (3, 4, 5), 4, "tr", strategy="weight")
    for layer, copies in ((train, 0), (ring, 5)):
        layer.dense_weight()
        seen = kernels(lambda: layer.dense_weight().sum().backward())
        assert seen["mm"] == 3 * (len(layer.cores) - 1)
        assert seen["clone"] + seen["copy_"] <= copies, seen


@pytest.mark.parametrize("name", list(layers()))
def test_compiled_layer_equals_eager_outputs_and_gradients(name):
    layer = layers()[name].train()
    x = example(name)
    layer(x)  # plans (and the auto choice) are made on the first eager call, outside the compiled graph

    def grads(module):
        module.zero_grad(set_to_none=True)
        inputs = x.detach().requires_grad_(x.is_floating_point())
        out = module(inputs)
        out.square().sum().backward()
        return out.detach(), [p.grad.clone() for p in layer.parameters()], inputs.grad

    eager = grads(layer)
    compiled = grads(torch.compile(layer, backend="aot_eager", fullgraph=True))
    assert torch.allclose(compiled[0], eager[0], atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(compiled[1], eager[1]))
    assert (eager[2] is None) == (compiled[2] is None)
    if eager[2] is not None:
        assert torch.allclose(compiled[2], eager[2], atol=1e-6)


@pytest.mark.parametrize("method", sorted(REGISTRY.methods))
def test_compiled_training_step_equals_eager_for_every_method(method):
    """The whole step (ours' one-pass gate draw, MARS's masks, REINFORCE's samples included),
    from the same random state: the same loss and the same gradients."""
    config = make_config(REGISTRY, "mlp2", method, {"initial_rank": 3})
    task = REGISTRY.task("mlp2")(config.task_params)
    chosen = REGISTRY.method(method)(config.method_params)
    model = build_model(task, chosen, 0, MethodContext(100, torch.device("cpu"))).train()
    generator = torch.Generator().manual_seed(2)
    x, y = torch.randn(16, 784, generator=generator), torch.randint(0, 10, (16,), generator=generator)

    def step():
        model.zero_grad(set_to_none=True)
        loss = chosen.loss(model, (x, y), F.cross_entropy)
        loss.total.backward()
        return loss.total.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    step()
    torch.manual_seed(5)
    eager_loss, eager_grads = step()
    torch.manual_seed(5)
    compiled_loss, compiled_grads = torch.compile(step, backend="aot_eager")()
    assert torch.allclose(compiled_loss, eager_loss, atol=1e-6)
    assert len(compiled_grads) == len(eager_grads)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(compiled_grads, eager_grads))
