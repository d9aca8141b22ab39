"""The fused training steps of ours, MARS and REINFORCE-l0 (all gates drawn and penalised at once)
equal the gate-by-gate formulas, in float64, given the random numbers the fused step drew."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from rankbench.layers.tensorized import RankSelector, tensorized_layers
from rankbench.plugins.method import MethodContext
from rankbench.plugins.registry import Registry
from rankbench.run.config import make_config
from rankbench.run.prepare import build_model

REGISTRY = Registry.discover(entry_point_groups=False)
CPU = MethodContext(num_train=100, device=torch.device("cpu"))


def lenet5(name: str, **params):
    """A float64 LeNet-5 (20 gated bonds) with ``name``'s selectors, in training mode; method, task, model."""
    config = make_config(REGISTRY, "lenet5", name, params)
    method, task = REGISTRY.method(name)(config.method_params), REGISTRY.task("lenet5")(config.task_params)
    torch.manual_seed(3)
    model = build_model(task, method, 0, CPU).double().train()
    return method, task, model


def batch() -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(4, 1, 28, 28, generator=generator, dtype=torch.float64)
    return x, torch.randint(0, 10, (4,), generator=generator)


def recording(monkeypatch: pytest.MonkeyPatch, name: str, step: Callable[[], object]) -> tuple[object, list[Tensor]]:
    """``step()`` with ``torch.<name>`` recording what each call returned."""
    real, calls = getattr(torch, name), []

    def spy(*args, **kwargs):
        calls.append(real(*args, **kwargs))
        return calls[-1]

    with monkeypatch.context() as patch:
        patch.setattr(torch, name, spy)
        return step(), calls


def gradients(total: Tensor, model: nn.Module) -> list[Tensor | None]:
    return list(torch.autograd.grad(total, list(model.parameters()), allow_unused=True))


def reach_every(gates, model: nn.Module, grads: list[Tensor | None], name: str) -> bool:
    """Every selector's parameter ``name`` has a non-zero gradient in ``grads``."""
    by_parameter = {id(p): g for p, g in zip(model.parameters(), grads)}
    return all(by_parameter[id(getattr(s, name))] is not None and by_parameter[id(getattr(s, name))].any()
               for s in gates)


def assert_same(fused: list[Tensor | None], reference: list[Tensor | None]) -> None:
    assert len(fused) == len(reference)
    for a, b in zip(fused, reference):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_ours_step_equals_the_gate_by_gate_formulas_given_its_one_noise_draw(monkeypatch):
    ours, task, model = lenet5("ours", **{"lambda": 0.7})
    x, y = batch()
    gates = ours.gates(model)
    step, calls = recording(monkeypatch, "randn", lambda: ours.loss(model, (x, y), task.loss))
    assert [tuple(c.shape) for c in calls] == [(sum(g.size for g in gates),)]  # one draw for every gate

    sigma, offset = ours.params["sigma"], ours.params["offset"]
    values, penalty = {}, torch.zeros((), dtype=torch.float64)
    for gate, eps in zip(gates, calls[0].split([g.size for g in gates]), strict=True):
        values[gate] = torch.clamp(torch.cat([gate.mu, gate.mu_fixed]) + sigma * eps + offset, 0.0, 1.0)
        penalty = penalty + 0.7 * torch.special.ndtr((gate.mu + offset) / sigma).mean()
    with RankSelector.supplied(values):
        outputs = model(x)
    total = task.loss(outputs, y) + penalty

    torch.testing.assert_close(step.outputs, outputs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(step.penalty, penalty.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(step.total, total, rtol=1e-12, atol=1e-12)
    fused = gradients(step.total, model)
    assert reach_every(gates, model, fused, "mu")
    assert_same(fused, gradients(total, model))


def test_ours_and_mars_samples_outside_the_fused_step_are_the_per_gate_formulas(monkeypatch):
    ours, _, model = lenet5("ours")
    gate = ours.gates(model)[1]
    sample, calls = recording(monkeypatch, "randn", gate.sample)
    location = torch.cat([gate.mu, gate.mu_fixed])
    assert torch.equal(sample, torch.clamp(location + gate.sigma * calls[0] + gate.offset, 0.0, 1.0))

    mars, _, model = lenet5("mars")
    mask = mars.masks(model)[1]
    sample, calls = recording(monkeypatch, "rand", mask.sample)
    u = calls[0].clamp(1e-6, 1 - 1e-6)
    s = torch.sigmoid((mask.theta + torch.log(u) - torch.log1p(-u)) / mask.temperature)
    assert torch.equal(sample, torch.clamp(s * (mask.zeta - mask.gamma) + mask.gamma, 0.0, 1.0))


def test_mars_step_equals_the_mask_by_mask_formulas_given_its_one_uniform_draw(monkeypatch):
    mars, task, model = lenet5("mars", prior=0.2, prior_n=250)
    for epoch in range(1, 4):  # an annealed temperature, below tau0
        mars.on_epoch_end(model, epoch, {})
    x, y = batch()
    masks = mars.masks(model)
    step, calls = recording(monkeypatch, "rand", lambda: mars.loss(model, (x, y), task.loss))
    assert [tuple(c.shape) for c in calls] == [(sum(m.size for m in masks),)]

    gamma, zeta = mars.params["gamma"], mars.params["zeta"]
    values, prior = {}, torch.zeros((), dtype=torch.float64)
    for mask, u in zip(masks, calls[0].split([m.size for m in masks]), strict=True):
        assert float(mask.temperature) == pytest.approx(0.1 * 0.99**3)
        u = u.clamp(1e-6, 1 - 1e-6)
        s = torch.sigmoid((mask.theta + torch.log(u) - torch.log1p(-u)) / mask.temperature)
        values[mask] = torch.clamp(s * (zeta - gamma) + gamma, 0.0, 1.0)
        phi = mask.probability()
        prior = prior - (phi * math.log(0.2) + (1 - phi) * math.log(0.8)).sum()
    squares = sum(core.pow(2).sum() for _, layer in tensorized_layers(model) for core in layer.cores)
    penalty = (prior + 0.5 * mars.params["core_prior_inv_std"] ** 2 * squares) / 250
    with RankSelector.supplied(values):
        outputs = model(x)
    total = task.loss(outputs, y) + penalty

    torch.testing.assert_close(step.outputs, outputs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(step.penalty, penalty.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mars.penalty(model), penalty, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(step.total, total, rtol=1e-12, atol=1e-12)
    fused = gradients(step.total, model)
    assert reach_every(masks, model, fused, "theta")
    assert_same(fused, gradients(total, model))


def test_mars_eval_step_draws_nothing_and_uses_the_deterministic_masks(monkeypatch):
    mars, task, model = lenet5("mars")
    x, y = batch()
    model.eval()
    step, calls = recording(monkeypatch, "rand", lambda: mars.loss(model, (x, y), task.loss))
    assert calls == []
    with torch.no_grad():
        torch.testing.assert_close(step.outputs, model(x), rtol=0, atol=0)
        torch.testing.assert_close(step.penalty, mars.penalty(model), rtol=0, atol=0)


@pytest.mark.parametrize("baseline", ["none", "mean"])
def test_reinforce_step_and_its_gradients_equal_the_per_gate_estimator_given_its_one_bernoulli_draw(baseline,
                                                                                                     monkeypatch):
    samples, lam = 3, 0.3
    method, task, model = lenet5("reinforce_l0", samples=samples, baseline=baseline, **{"lambda": lam})
    x, y = batch()
    gates = method.gates(model)
    step, calls = recording(monkeypatch, "bernoulli", lambda: method.loss(model, (x, y), task.loss))
    assert [tuple(c.shape) for c in calls] == [(samples, sum(g.size - 1 for g in gates))]  # every sample, every gate

    losses, log_probs, l0 = [], [], []
    for z in calls[0]:
        drawn = z.split([g.size - 1 for g in gates])
        with RankSelector.supplied({g: g.with_fixed_slot(zg) for g, zg in zip(gates, drawn, strict=True)}):
            losses.append(task.loss(model(x), y))
        log_probs.append(sum(g.log_prob(zg) for g, zg in zip(gates, drawn)))
        l0.append(sum(zg.sum() + 1.0 for zg in drawn))
    task_losses, norm = torch.stack(losses), torch.stack(l0)
    cost = (task_losses + lam * norm).detach()
    if baseline == "mean":
        cost = cost - cost.mean()
    surrogate = (torch.stack(log_probs) * cost + task_losses).mean()

    torch.testing.assert_close(step.task, task_losses.mean().detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(step.penalty, lam * norm.mean(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(step.total, surrogate, rtol=1e-12, atol=1e-12)
    fused = gradients(step.total, model)
    assert reach_every(gates, model, fused, "mu")
    assert_same(fused, gradients(surrogate, model))


def test_reinforce_supplies_each_pass_its_sample_with_every_always_on_slot(monkeypatch):
    method, task, model = lenet5("reinforce_l0", samples=2)
    x, y = batch()
    gates = method.gates(model)
    seen: list[list[Tensor]] = []
    model.register_forward_pre_hook(lambda *_: seen.append([g().clone() for g in gates]))
    _, calls = recording(monkeypatch, "bernoulli", lambda: method.loss(model, (x, y), task.loss))
    assert len(seen) == 2
    for values, z in zip(seen, calls[0], strict=True):
        drawn = z.split([g.size - 1 for g in gates])
        assert all(torch.equal(v, g.with_fixed_slot(zg)) for v, g, zg in zip(values, gates, drawn, strict=True))
    _, calls = recording(monkeypatch, "bernoulli", gates[0])  # after the step a gate samples its own again
    assert [tuple(c.shape) for c in calls] == [(gates[0].size - 1,)]
