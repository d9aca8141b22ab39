"""The core bank (rankbench/layers/batched.py): every core gated by one op and same-shaped layers
reconstructed by one batched contraction give what layer-by-layer training gives, in float64, with
the layers' parameters and state_dict keys untouched; the bank re-plans when the model changes and
stays out of eval-mode inference."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rankbench.layers.batched import CoreBank, SegmentScale
from rankbench.layers.tensorized import TensorizedLinear, prune_model, tensorized_layers
from rankbench.plugins.method import MethodContext
from rankbench.plugins.registry import Registry
from rankbench.run.config import make_config
from rankbench.run.prepare import build_model

REGISTRY = Registry.discover(entry_point_groups=False)


def without_bank(model: nn.Module) -> nn.Module:
    model._forward_pre_hooks.clear()
    model._forward_hooks.clear()
    return model


def built(task_name: str, method_name: str, params: dict | None = None) -> tuple[nn.Module, object]:
    config = make_config(REGISTRY, task_name, method_name, params or {})
    task = REGISTRY.task(task_name)(config.task_params)
    method = REGISTRY.method(method_name)(config.method_params)
    model = build_model(task, method, 0, MethodContext(100, torch.device("cpu"))).double().train()
    return model, method


def bank_of(model: nn.Module) -> CoreBank:
    return next(iter(model._forward_pre_hooks.values())).__self__


def step(model: nn.Module, method, x: torch.Tensor, y: torch.Tensor, seed: int) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = method.loss(model, (x, y), F.cross_entropy)
    loss.total.backward()
    return loss.total.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method_name", ["ours", "mars", "reinforce_l0", "trn"])
def test_a_resnet32_step_with_the_bank_equals_the_step_layer_by_layer_in_float64(method_name):
    """ResNet-32's three stages are three groups (10, 9 and 9 convolutions of one shape), the rest
    alone; loss and every gradient equal those of the same model without the bank."""
    params = {"initial_rank": 3} if method_name != "trn" else {"rank": 3}
    model, method = built("resnet32", method_name, params)
    assert sorted(len(g.layers) for g in bank_of(model).plan(model).groups if len(g.layers) > 1) == [9, 9, 10]
    reference, reference_method = built("resnet32", method_name, params)
    without_bank(reference)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 32, 32, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 10, (4,), generator=generator)
    banked_loss, banked = step(model, method, x, y, seed=3)
    reference_loss, expected = step(reference, reference_method, x, y, seed=3)
    assert torch.allclose(banked_loss, reference_loss, rtol=1e-12, atol=1e-12)
    assert banked.keys() == expected.keys()
    for name in expected:
        assert torch.allclose(banked[name], expected[name], rtol=1e-10, atol=1e-12), name


def test_a_model_of_layers_of_different_shapes_computes_bit_for_bit_what_it_computes_without_the_bank():
    """LeNet-5 (the main job): no layer shares a shape, so each contracts its own gated cores as it
    would alone: the same outputs bit for bit (only the gates' gradients are summed in another order)."""
    model, _ = built("lenet5", "ours")
    reference, _ = built("lenet5", "ours")
    without_bank(reference)
    for twin in (model, reference):
        torch.manual_seed(4)
        for name, parameter in twin.named_parameters():
            if name.endswith(".mu"):
                parameter.data.uniform_(-1.4, 0.0)  # gates between 0 and 1, a few shut
        twin.eval()
    x = torch.randn(3, 1, 28, 28, dtype=torch.float64)
    out = model(x)  # eval mode with gradients: the bank's pass, deterministic gates
    assert bank_of(model)._plan is not None
    assert torch.equal(out, reference(x))


def test_parameters_and_state_dict_keys_stay_per_layer_and_a_checkpoint_loads_into_a_model_without_a_bank():
    model, _ = built("resnet32", "ours", {"initial_rank": 2})
    plain = without_bank(model)
    assert list(model.state_dict()) == list(plain.state_dict())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    model(x).sum().backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for _, layer in tensorized_layers(model)
               for p in layer.cores)
    plain.load_state_dict(model.state_dict())


def test_eval_mode_inference_bypasses_the_bank_and_uses_each_layers_cached_weight():
    model, _ = built("resnet32", "trn", {"rank": 2})
    model.eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        first = model(x)
        assert all(layer._weight_cache is not None and layer._pass is None for _, layer in tensorized_layers(model))
        assert torch.equal(model(x), first)


def test_the_bank_replans_when_the_model_changes_and_survives_deepcopy_pickle_and_pruning():
    """Pruning replaces layers, ``.to`` changes dtype; a deep copy or an unpickled model (MLflow logs
    the pruned model pickled) trains on its own layers, not the original's."""
    model, method = built("resnet32", "ours", {"initial_rank": 3})
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    model(x)
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model)), prune_model(model.eval()).train()):
        out = twin(x)
        out.sum().backward()
        assert all(layer.cores[0].grad is not None for _, layer in tensorized_layers(twin))
        assert all(layer._pass is None for _, layer in tensorized_layers(twin))
    single = model.float()
    assert single(x.float()).dtype == torch.float32


def test_a_forward_that_raises_leaves_no_layer_holding_the_pass():
    model, _ = built("lenet5", "ours")
    with pytest.raises(RuntimeError):
        model(torch.randn(2, 3, 28, 28, dtype=torch.float64))  # three channels for a one-channel conv
    assert all(layer._pass is None for _, layer in tensorized_layers(model))


def test_linear_layers_of_one_shape_are_grouped_and_each_contracts_its_input_through_its_own_gated_cores():
    """A group's layers that contract their input (``input`` strategy) take their gated cores from
    the pass (one unbind per position), and never make the group reconstruct weights."""
    torch.manual_seed(0)
    model = nn.Sequential(*[TensorizedLinear(12, 12, (3, 4), (4, 3), 2, "tr", strategy="input") for _ in range(3)])
    model = model.double()
    reference = copy.deepcopy(model)
    CoreBank.attach(model)
    x = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    out = model(x)
    out.square().sum().backward()
    expected = reference(x.detach().requires_grad_())
    expected.square().sum().backward()
    assert torch.allclose(out, expected, rtol=1e-12)
    for a, b in zip(model.parameters(), reference.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-10, atol=1e-12)


def test_segment_scale_matches_its_autograd_reference_in_float64():
    x = torch.randn(10, dtype=torch.float64, requires_grad=True)
    scales = torch.randn(4, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([1, 4, 2, 3])
    index = torch.repeat_interleave(torch.arange(4), lengths)
    assert torch.autograd.gradcheck(lambda a, s: SegmentScale.apply(a, s, index, lengths), (x, scales))
