"""REINFORCE-ℓ0 and MARS: estimators, samplers, schedules, penalties."""

import itertools
import math

import pytest
import torch
from torch import nn

from rankbench.layers.tensorized import RankSelector, TensorRingLinear, TensorTrainLinear
from rankbench.plugins.method import MethodContext
from rankbench.plugins.registry import Registry
from rankbench.run.config import make_config

REGISTRY = Registry.discover(entry_point_groups=False)


def make(name: str, task: str = "mlp2", **params):
    config = make_config(REGISTRY, task, name, params)
    return REGISTRY.method(name)(config.method_params)


class ToyGated(nn.Module):
    """One gated bond of size 4 (3 trainable gates + the frozen slot) feeding a weighted sum."""

    def __init__(self, gate: nn.Module) -> None:
        super().__init__()
        self.gate = gate
        self.w = nn.Parameter(torch.tensor([0.7, -0.4, 1.1, 0.3], dtype=torch.float64))

    def forward(self, x):
        return (self.gate() * self.w).sum() * x


def toy_loss(out, y):
    return ((out - y) ** 2).mean()


@pytest.mark.parametrize("baseline", ["none", "mean"])
def test_reinforce_surrogate_gradient_matches_enumerated_expectation(baseline):
    from rankbench.methods.reinforce_l0 import BernoulliGate

    torch.manual_seed(0)
    lam = 0.3
    method = make("reinforce_l0", **{"lambda": lam, "samples": 20000, "baseline": baseline})
    gate = BernoulliGate(4).double()
    with torch.no_grad():
        gate.mu.copy_(torch.tensor([0.1, -0.2, 0.25], dtype=torch.float64))
    model = ToyGated(gate).train()
    method.selectors = {"toy.bond0": gate}  # the registry attach builds on a tensorized model
    x = torch.ones(3, dtype=torch.float64)
    y = torch.full((3,), 0.5, dtype=torch.float64)

    # Exact: gradient of E_Z[J(Z) + λ‖Z‖₀] over all 8 patterns of the trainable gates.
    p = gate.probability()
    expected = torch.zeros((), dtype=torch.float64)
    for bits in itertools.product([0.0, 1.0], repeat=3):
        z = torch.tensor(bits, dtype=torch.float64)
        prob = torch.prod(torch.where(z == 1, p, 1 - p))
        full = torch.cat([z, torch.ones(1, dtype=torch.float64)])
        j = toy_loss((full * model.w).sum() * x, y)
        expected = expected + prob * (j + lam * full.sum())
    grad_mu, grad_w = torch.autograd.grad(expected, [gate.mu, model.w])

    step = method.loss(model, (x, y), toy_loss)
    est_mu, est_w = torch.autograd.grad(step.total, [gate.mu, model.w])
    torch.testing.assert_close(est_w, grad_w, atol=0.02 * grad_w.abs().max().item(), rtol=0.03)
    torch.testing.assert_close(est_mu, grad_mu, atol=0.05 * grad_mu.abs().max().item(), rtol=0.05)


def test_bernoulli_gate_eval_rounds_and_keeps_the_frozen_slot():
    from rankbench.methods.reinforce_l0 import BernoulliGate

    gate = BernoulliGate(5)
    with torch.no_grad():
        gate.mu.copy_(torch.tensor([0.2, -0.1, -0.04, -0.06]))
    gate.eval()
    assert gate().tolist() == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert gate.rank() == 3
    gate.train()
    sample = gate()
    assert set(sample.tolist()) <= {0.0, 1.0} and sample[-1] == 1.0
    assert torch.isfinite(gate.log_prob(sample[:-1]))
    z = gate.draw()
    with RankSelector.supplied({gate: gate.with_fixed_slot(z)}):  # how the method hands its draw in
        assert torch.equal(gate()[:-1], z)
    assert 0.54 < float(BernoulliGate(200).probability().detach().mean()) < 0.56


def test_reinforce_loss_runs_m_forward_passes_with_fresh_samples():
    method = make("reinforce_l0", samples=3)
    layer = TensorRingLinear(6, 4, (2, 3), (4,), 4)
    method.attach(layer, MethodContext(10, torch.device("cpu")))
    calls = []
    layer.register_forward_hook(lambda *_: calls.append(1))
    x, y = torch.randn(5, 6), torch.randint(0, 4, (5,))
    step = method.loss(layer, (x, y), nn.functional.cross_entropy)
    assert len(calls) == 3
    step.total.backward()
    assert all(g.mu.grad is not None for g in method.gates(layer))
    assert 0.2 * 3 <= float(step.penalty) <= 0.2 * 12  # λ·mean ‖Z‖₀ over 3 bonds of size 4, frozen slots on


def test_hard_concrete_samples_lie_in_unit_interval_with_predicted_exact_zeros_and_ones():
    from rankbench.methods.mars import HardConcreteMask

    torch.manual_seed(1)
    theta, tau, gamma, zeta = 0.3, 0.5, -0.1, 1.1
    mask = HardConcreteMask(20000, theta, tau, gamma, zeta)
    with torch.no_grad():
        mask.theta.fill_(theta)
    m = mask.train()()
    assert m.min() >= 0 and m.max() <= 1

    def logit(q):
        return math.log(q / (1 - q))

    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    p_zero = sig(tau * logit(-gamma / (zeta - gamma)) - theta)
    p_one = 1 - sig(tau * logit((1 - gamma) / (zeta - gamma)) - theta)
    assert float((m == 0).float().mean()) == pytest.approx(p_zero, abs=0.01)
    assert float((m == 1).float().mean()) == pytest.approx(p_one, abs=0.01)


def test_mars_eval_rank_counts_positive_logits_and_never_drops_to_zero():
    from rankbench.methods.mars import HardConcreteMask

    mask = HardConcreteMask(6, -1.0, 0.1, -0.1, 1.1).eval()
    with torch.no_grad():
        mask.theta.copy_(torch.tensor([0.5, -0.2, 1.0, -3.0, 0.01, -0.01]))
    assert mask().tolist() == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    assert mask.rank() == 3
    with torch.no_grad():
        mask.theta.copy_(torch.tensor([-0.5, -0.2, -1.0, -3.0, -0.3, -0.9]))
    assert mask().tolist() == [0.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    assert mask.rank() == 1


def test_mars_modes_and_overrides():
    soft, hard = make("mars"), make("mars", mode="hard")
    assert (soft.prior, soft.alpha) == (0.1, -1.5)
    assert (hard.prior, hard.alpha) == (0.01, -1.75)
    custom = make("mars", mode="hard", prior=0.2, alpha=-0.5, tau0=0.3)
    assert (custom.prior, custom.alpha, custom.temperature) == (0.2, -0.5, 0.3)
    layer = TensorTrainLinear(6, 6, (2, 3), (2, 3), [1, 3, 3, 3], layout="chain")
    hard.attach(layer, MethodContext(100, torch.device("cpu")))
    thetas = torch.cat([m.theta for m in hard.masks(layer)])
    assert float(thetas.mean()) == pytest.approx(-1.75, abs=0.02)


def test_mars_temperature_anneals_per_epoch_to_its_floor():
    method = make("mars")
    layer = TensorRingLinear(6, 4, (2, 3), (4,), 3)
    method.attach(layer, MethodContext(100, torch.device("cpu")))
    for epoch in range(1, 301):
        method.on_epoch_end(layer, epoch, {})
        if epoch == 10:
            assert method.temperature == pytest.approx(0.1 * 0.99**10)
            assert all(float(m.temperature) == pytest.approx(0.1 * 0.99**10) for m in method.masks(layer))
    assert method.temperature == 0.01
    assert all(float(m.temperature) == pytest.approx(0.01) for m in method.masks(layer))


def test_mars_penalty_by_hand():
    torch.manual_seed(2)
    method = make("mars", prior=0.2)
    layer = TensorRingLinear(6, 4, (2, 3), (4,), 3)
    n = 250
    method.attach(layer, MethodContext(n, torch.device("cpu")))
    prior = 0.0
    for mask in method.masks(layer):
        phi = torch.sigmoid(mask.theta.detach())
        prior -= float((phi * math.log(0.2) + (1 - phi) * math.log(0.8)).sum())
    l2 = 0.5 * 0.1**2 * sum(float(c.detach().pow(2).sum()) for c in layer.cores)
    assert float(method.penalty(layer).detach()) == pytest.approx((prior + l2) / n, rel=1e-6)
    method.penalty(layer).backward()
    assert layer.bias.grad is None
    assert all(m.theta.grad is not None for m in method.masks(layer))
