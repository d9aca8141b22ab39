"""bayes_ard (Hawkins, Liu & Zhang's MAP ARD): the M-step, the prior term and its warm-up against hand
computations, eval ranks and pruning, resume, the contract, and one short CLI run."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import make_tiny_mnist
from rankbench.cli import main
from rankbench.contract import check_method
from rankbench.layers.tensorized import (
    TensorRingLinear,
    TensorTrainLinear,
    count_parameters,
    learned_ranks,
    prune_model,
)
from rankbench.methods.bayes_ard import BayesARD, warmup
from rankbench.plugins.method import MethodContext
from rankbench.plugins.registry import Registry
from rankbench.run.config import make_config
from rankbench.run.trainer import Trainer

REGISTRY = Registry.discover(entry_point_groups=False)
CPU = MethodContext(num_train=100, device=torch.device("cpu"))


def make(task: str = "mlp2", **params) -> BayesARD:
    config = make_config(REGISTRY, task, "bayes_ard", {k: str(v) for k, v in params.items()})
    return REGISTRY.method("bayes_ard")(config.method_params)


def tiny_model(decomposition: str = "tt", seed: int = 0) -> nn.Module:
    """8 -> 4 in four 1-mode cores (2, 4 | 2, 2) at ranks 3, then a dense head."""
    torch.manual_seed(seed)
    cls = TensorTrainLinear if decomposition == "tt" else TensorRingLinear
    return nn.Sequential(cls(8, 4, (2, 4), (2, 2), 3, name="fc"), nn.ReLU(), nn.Linear(4, 3))


def attached(method: BayesARD, decomposition: str = "tt") -> tuple[nn.Module, list[torch.Tensor]]:
    model = tiny_model(decomposition)
    method.attach(model, CPU)
    with torch.no_grad():  # move the cores away from where attach started each λ², so the update is visible
        for core in model[0].cores:
            core.mul_(1.0 + torch.rand_like(core))
    return model, list(model[0].cores)


def variances(model: nn.Module) -> dict[int, torch.Tensor]:
    layer = model[0]
    return {int(k): s.variance.clone() for k, s in layer.selectors.items()}


BATCH = (torch.randn(5, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 0, 1]))


# ---------------------------------------------------------------------------- the M-step by hand


def by_hand_tt(cores: list[torch.Tensor]) -> dict[int, tuple[torch.Tensor, int]]:
    """The reference's TensorTrain rule for cores G0 (1,2,3), G1 (3,4,3), G2 (3,2,3), G3 (3,2,1):
    bond k+1 governs core k along its last dim; the last bond also core 3 along its first."""
    g0, g1, g2, g3 = (c.detach() for c in cores)
    return {1: ((g0 ** 2).sum((0, 1)), 1 * 2),
            2: ((g1 ** 2).sum((0, 1)), 3 * 4),
            3: ((g2 ** 2).sum((0, 1)) + (g3 ** 2).sum((1, 2)), 3 * 2 + 2 * 1)}


def by_hand_tr(cores: list[torch.Tensor]) -> dict[int, tuple[torch.Tensor, int]]:
    """A ring: bond k governs core k-1 (mod 4) along its last dim."""
    g = [c.detach() for c in cores]
    return {k: ((g[(k - 1) % 4] ** 2).sum((0, 1)), g[(k - 1) % 4].numel() // 3) for k in range(4)}


def by_hand_both(cores: list[torch.Tensor]) -> dict[int, tuple[torch.Tensor, int]]:
    """prior_cores=both on the train: bond k governs core k-1 (last dim) and core k (first dim)."""
    g = [c.detach() for c in cores]
    return {k: ((g[k - 1] ** 2).sum((0, 1)) + (g[k] ** 2).sum((1, 2)), g[k - 1].numel() // 3 + g[k].numel() // 3)
            for k in (1, 2, 3)}


@pytest.mark.parametrize("decomposition, prior_cores, hand", [("tt", "reference", by_hand_tt),
                                                              ("tr", "reference", by_hand_tr),
                                                              ("tt", "both", by_hand_both)])
def test_one_training_forward_updates_lambda_squared_as_computed_by_hand(decomposition, prior_cores, hand):
    method = make(em_stepsize=0.3, prior_cores=prior_cores)
    model, cores = attached(method, decomposition)
    before = variances(model)
    expected = {k: 0.7 * before[k] + 0.3 * M / (D + 1) for k, (M, D) in hand(cores).items()}
    method.loss(model.train(), BATCH, F.cross_entropy)  # the M-step runs on every training forward
    after = variances(model)
    assert sorted(after) == sorted(expected)
    for k in expected:
        torch.testing.assert_close(after[k], expected[k])
    assert {p.D for p in method.priors} == {D for _, D in hand(cores).values()}


def test_lambda_starts_at_the_m_step_of_the_initial_cores_and_eval_forwards_leave_it():
    method = make()
    model = tiny_model()
    method.attach(model, CPU)
    for k, (M, D) in by_hand_tt(list(model[0].cores)).items():
        torch.testing.assert_close(model[0].selector(k).variance, M / (D + 1))
    before = variances(model)
    method.loss(model.eval(), BATCH, F.cross_entropy)
    assert all(torch.equal(before[k], v) for k, v in variances(model).items())


def test_half_cauchy_update_by_hand():
    method = make(prior="half_cauchy", eta=0.5)
    model, cores = attached(method)
    method.m_step()
    for k, (M, D) in by_hand_tt(cores).items():
        e2 = 0.25
        u = (M - e2 * D + torch.sqrt(M ** 2 + M * e2 * (2 * D + 8) + D ** 2 * e2 ** 2)) / (2 * D + 4)
        torch.testing.assert_close(model[0].selector(k).variance, u)  # em_stepsize 1 on mlp2


# ---------------------------------------------------------------------------- the prior term


def test_warmup_schedule_of_the_reference():
    assert [warmup(e, 5, 50) for e in (0, 5, 30, 55, 100)] == [0.0, 0.0, 0.5, 1.0, 1.0]
    assert warmup(6, 5, 50) == pytest.approx(0.02)
    assert [warmup(e, 3, 0) for e in (3, 4)] == [0.0, 1.0]
    method = make()
    assert method.kl_weight() == 0.0  # epoch 1
    method.epoch = 29  # training epoch 30
    assert method.kl_weight() == pytest.approx(5e-5 * 0.5)


def test_penalty_is_kl_mult_times_warmup_times_half_the_sum_of_squares_over_lambda_by_hand():
    method = make(kl_mult=1e-2, em_stepsize=0.5)
    model, cores = attached(method)
    method.epoch = 29  # training epoch 30: warm-up 0.5
    step = method.loss(model.train(), BATCH, F.cross_entropy)
    lam2 = variances(model)  # after this forward's M-step, as the reference's KL
    g0, g1, g2, g3 = cores
    terms = [(g0 ** 2 / lam2[1].view(1, 1, -1)).sum(), (g1 ** 2 / lam2[2].view(1, 1, -1)).sum(),
             (g2 ** 2 / lam2[3].view(1, 1, -1)).sum(), (g3 ** 2 / lam2[3].view(-1, 1, 1)).sum()]
    hand = 1e-2 * 0.5 * 0.5 * sum(terms)
    torch.testing.assert_close(step.penalty, hand.detach())
    task = F.cross_entropy(model(BATCH[0]), BATCH[1])
    torch.testing.assert_close(step.total.detach(), (task + hand).detach())
    torch.testing.assert_close(method.penalty(model), hand)
    # its gradient on a core is kl_mult * warmup * G / λ² (λ held constant)
    model.zero_grad()
    method.penalty(model).backward()
    torch.testing.assert_close(g0.grad, 1e-2 * 0.5 * g0.detach() / lam2[1].view(1, 1, -1))
    assert all(s.variance.grad is None for s in model[0].selectors.values())


def test_no_prior_term_before_the_warm_up():
    method = make()
    model, _ = attached(method)
    step = method.loss(model.train(), BATCH, F.cross_entropy)
    assert step.penalty.item() == 0.0 and step.total.requires_grad


# ---------------------------------------------------------------------------- eval ranks and pruning


def test_eval_ranks_drop_slices_under_the_threshold_and_pruning_keeps_the_outputs():
    method = make()
    model, _ = attached(method)
    layer = model[0]
    with torch.no_grad():
        layer.selector(1).variance.copy_(torch.tensor([1e-2, 5e-5, 2e-4]))
        layer.selector(2).variance.copy_(torch.tensor([1e-6, 1e-7, 1e-8]))  # none kept: the largest stays
        layer.selector(3).variance.copy_(torch.tensor([1e-4, 3e-4, 1e-1]))  # exactly at the threshold: dropped
    model.eval()
    assert torch.equal(layer.selector(1)(), torch.tensor([1.0, 0.0, 1.0]))
    assert torch.equal(layer.selector(2)(), torch.tensor([1.0, 0.0, 0.0]))
    assert learned_ranks(model) == {"0": [1, 2, 1, 2]}
    assert torch.equal(layer.selector(1).train()(), torch.ones(3))  # training never masks
    model.eval()

    pruned = prune_model(model)
    assert pruned[0].ranks == (1, 2, 1, 2) and not list(pruned[0].selectors)
    x = BATCH[0]
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), model(x))
        # the same as the unpruned cores with the dropped slices zeroed along each bond (the reference's masks)
        masked = copy.deepcopy(model)
        for k, keep in ((1, [0, 2]), (2, [0]), (3, [1, 2])):
            drop = torch.ones(3, dtype=torch.bool)
            drop[keep] = False
            masked[0].cores[k][drop] = 0.0
        masked[0].selectors.clear()
        torch.testing.assert_close(pruned(x), masked(x))
    assert count_parameters(model) == count_parameters(pruned)


# ---------------------------------------------------------------------------- resume


def test_state_round_trip_resumes_the_same_warm_up():
    method = make()
    method.epoch = 30
    again = make()
    again.load_state_dict(tiny_model(), method.state_dict())
    assert again.epoch == 30 and again.kl_weight() == method.kl_weight() == pytest.approx(5e-5 * 26 / 50)
    assert again.kl_weight(100) == 5e-5


def test_a_resumed_training_continues_the_uninterrupted_one_exactly(tmp_path):
    config = make_config(REGISTRY, "mlp2", "bayes_ard", {"initial_rank": "3", "val_size": "40", "no_kl_epochs": "0",
                                                         "warmup_epochs": "3", "kl_mult": "0.05",
                                                         "em_stepsize": "0.5"}, device="cpu")
    task = REGISTRY.task("mlp2")(config.task_params)
    data = task.load_data(make_tiny_mnist(tmp_path), False)

    def trainer() -> Trainer:
        torch.manual_seed(0)
        model = task.tensorized_model(3)
        method = REGISTRY.method("bayes_ard")(config.method_params)
        method.attach(model, CPU)
        return Trainer(model, method, task, data, epochs=3, seed=0, device=torch.device("cpu"),
                       dense_parameters=1, batch_size=64)

    straight = trainer()
    straight.fit()
    first = trainer()
    first.epochs = 1
    first.fit()
    checkpoint = first.state_dict()
    resumed = trainer()
    resumed.load_state_dict(checkpoint)
    assert resumed.method.epoch == 1
    resumed.fit()
    assert [h["penalty"] for h in resumed.history] == [h["penalty"] for h in straight.history]
    assert straight.history[0]["penalty"] > 0 and straight.history[2]["penalty"] > straight.history[0]["penalty"]
    for a, b in zip(resumed.model.state_dict().values(), straight.model.state_dict().values()):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------- declarations, contract, CLI


def test_defaults_per_task_and_the_knob():
    assert make("mlp2").params["em_stepsize"] == 1.0 and make("lenet5").params["em_stepsize"] == 1.0
    sst = make("sst").params
    assert sst["em_stepsize"] == 0.1 and (sst["no_kl_epochs"], sst["warmup_epochs"]) == (6, 15)
    assert make("mlp2").params["kl_mult"] == 5e-5 and make("mlp2").params["threshold"] == 1e-4
    knob = BayesARD.compression_knob
    assert knob.name == "kl_mult" and knob.increases_compression and knob.found_by == "training"
    search = BayesARD.hyperparameters["kl_mult"].search
    assert search.log and search.low < 5e-5 < search.high


@pytest.fixture
def embedded_data(tmp_path, monkeypatch):
    (tmp_path / "no-data").mkdir()
    monkeypatch.setenv("RANKBENCH_DATA_DIR", str(tmp_path / "no-data"))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("task", ["mlp2"])  # every task: rankbench check-plugin bayes_ard
def test_passes_the_plugin_contract(embedded_data, task):
    checks = check_method(REGISTRY, "bayes_ard", task)
    assert [c for c in checks if not c.passed] == []


def test_one_epoch_through_the_cli(tmp_path, uri):
    data_dir = make_tiny_mnist(tmp_path / "data")
    rc = main(["run", "--task", "mlp2", "--method", "bayes_ard", "--epochs", "1", "--seeds", "0",
               "--tracking-uri", uri, "--no-progress", "--data-dir", str(data_dir), "--set", "val_size=40"])
    assert rc == 0
