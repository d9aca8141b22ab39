"""trp: Trained Rank Pruning on TR/TT bonds (methods/trp.py; its rounding in rankbench/layers/rounding.py).

The update rule by hand on tiny layers (the truncation of a bond with a known spectrum, the nuclear
subgradient against the weight's SVD, the optimizer-state reset), the schedule, the final truncation,
an exact resume, the knob, the trainer's optimizer hook and a CLI run.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import make_tiny_mnist
from rankbench.cli import main
from rankbench.layers.tensorized import TensorizedLinear, count_parameters, learned_ranks, prune_model
from rankbench.methods.trp import TRP, TrainedRankMask, live_cores
from rankbench.plugin import DataSplits, Method, MethodContext, Split, current_cores, nuclear_subgradient
from rankbench.plugins.registry import Registry
from rankbench.run.config import make_config
from rankbench.run.prepare import build_model
from rankbench.run.trainer import Trainer, fit

CPU = MethodContext(num_train=100, device=torch.device("cpu"))
REGISTRY = Registry.discover(entry_point_groups=False)


def method(**params) -> TRP:
    config = make_config(REGISTRY, "mlp2", "trp", {k: str(v) for k, v in params.items()})
    return REGISTRY.method("trp")(config.method_params)


def two_core_train(spectrum: list[float], seed: int = 0) -> nn.Sequential:
    """A 6 → 4 tensor train of two cores (``W = A B``, bond 1 of size 4) whose weight has singular values
    ``spectrum``, hidden behind a random invertible gauge on the bond."""
    generator = torch.Generator().manual_seed(seed)
    layer = TensorizedLinear(6, 4, (6,), (4,), 4, "tt").double()
    u, _ = torch.linalg.qr(torch.randn(6, 4, generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(4, 4, generator=generator, dtype=torch.float64))
    gauge = torch.randn(4, 4, generator=generator, dtype=torch.float64) + 3 * torch.eye(4, dtype=torch.float64)
    s = torch.tensor(spectrum, dtype=torch.float64)
    with torch.no_grad():
        layer.cores[0].copy_((u * s @ gauge).reshape(1, 6, 4))
        layer.cores[1].copy_((torch.linalg.inv(gauge) @ v.T).reshape(4, 4, 1))
    return nn.Sequential(layer)


def weight(layer) -> torch.Tensor:
    """The layer's weight as its core-order unfolding at bond 1 (rows: core 0's modes)."""
    full = layer.full_tensor().detach()
    return full.reshape(math.prod(full.shape[:1]), -1)


# ---------------------------------------------------------------------------- the update rule by hand


def test_a_truncation_keeps_the_fewest_singular_values_holding_the_energy_and_the_weight_is_their_svd():
    model = two_core_train([3.0, 2.0, 1.0, 0.5])  # squares 9, 4, 1, 0.25: shares 0.63, 0.91, 0.98, 1
    layer = model[0]
    trp = method(energy=0.9)
    trp.attach(model, CPU)
    before = weight(layer)
    u, s, vh = torch.linalg.svd(before)
    ranks = trp.truncate(trp.energy_rule())
    assert ranks == {"0.bond1": 2}
    torch.testing.assert_close(weight(layer), u[:, :2] * s[:2] @ vh[:2], rtol=0, atol=1e-12)
    assert [tuple(c.shape) for c in layer.cores] == [(1, 6, 4), (4, 4, 1)]  # zero-padded in place
    assert torch.equal(layer.cores[0][..., 2:], torch.zeros(1, 6, 2, dtype=torch.float64))
    assert torch.equal(layer.cores[1][2:], torch.zeros(2, 4, 1, dtype=torch.float64))
    mask = trp.selectors["0.bond1"]
    assert isinstance(mask, TrainedRankMask) and mask.mask.tolist() == [1.0, 1.0, 0.0, 0.0]
    assert learned_ranks(model) == {"0": [1, 2]}
    assert torch.equal(mask.train().sample(), torch.ones(4, dtype=torch.float64))  # full-shape training
    x = torch.randn(5, 6, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(prune_model(model)(x), model.eval()(x), rtol=1e-10, atol=1e-12)


def test_the_penalty_gradient_is_the_nuclear_weight_times_u_v_transposed_of_the_truncated_weight():
    model = two_core_train([3.0, 2.0, 1.0, 0.5], seed=1)
    layer = model[0]
    trp = method(energy=0.9, nuclear_weight=0.01)
    trp.attach(model, CPU)
    trp.truncate(trp.energy_rule())
    a = layer.cores[0].detach().reshape(6, 4)
    b = layer.cores[1].detach().reshape(4, 4)
    u, s, vh = torch.linalg.svd(a @ b)
    uv = u[:, :2] @ vh[:2]  # the reference's subgradient U_k V_kᵀ over the kept singular vectors
    model.train()
    penalty = trp.penalty(model)
    torch.testing.assert_close(penalty, 0.01 * s[:2].sum(), rtol=1e-10, atol=0)  # λ‖W‖_* right after the cut
    penalty.backward()
    torch.testing.assert_close(layer.cores[0].grad.reshape(6, 4), 0.01 * uv @ b.T, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(layer.cores[1].grad.reshape(4, 4), 0.01 * a.T @ uv, rtol=1e-10, atol=1e-14)


def test_on_a_train_the_subgradient_of_every_bond_is_the_weight_unfoldings_u_v_transposed():
    """Three cores: the environment of each bond is a real chain; the subgradient with respect to each
    bond's two cores (the rest held fixed) is autograd of ⟨U_k V_kᵀ, W_(k)⟩, and its norm is ‖W_(k)‖_*."""
    torch.manual_seed(3)
    layer = TensorizedLinear(12, 4, (3, 4), (4,), [1, 3, 4], "tt").double()
    cores = current_cores(layer)
    full = layer.full_tensor().detach()
    for k in layer.gateable_bonds():
        g, norm = nuclear_subgradient(cores, k)
        w = full.reshape(math.prod(full.shape[:k]), -1)
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        rank = int((s > 1e-12 * s[0]).sum())
        assert norm == pytest.approx(float(s.sum()), rel=1e-10)
        free = [c.detach().clone().requires_grad_(i in (k - 1, k)) for i, c in enumerate(cores)]
        merged = torch.einsum("aib,bjc->aijc", free[k - 1], free[k])  # the bond's merged pair M
        (torch.einsum("aijc,aijc->", merged, g.reshape(merged.shape)).backward())
        by_hand = [c.detach().clone().requires_grad_(i in (k - 1, k)) for i, c in enumerate(cores)]
        chain = by_hand[0]
        for c in by_hand[1:]:
            chain = torch.einsum("...a,aib->...ib", chain, c)
        unfolding = chain.reshape(math.prod(full.shape[:k]), -1)
        (u[:, :rank] @ vh[:rank] * unfolding).sum().backward()
        for i in (k - 1, k):
            torch.testing.assert_close(free[i].grad, by_hand[i].grad, rtol=1e-9, atol=1e-12)


def test_the_optimizer_state_of_truncated_slices_is_zeroed_and_the_kept_slices_keep_theirs():
    for reset in (True, False):
        model = two_core_train([3.0, 2.0, 1.0, 0.5])
        layer = model[0]
        trp = method(energy=0.9, reset_optimizer=reset)
        trp.attach(model, CPU)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        trp.set_optimizer(optimizer)
        x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 4, (8,))
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        before = {id(p): {k: v.clone() for k, v in optimizer.state[p].items()} for p in layer.cores}
        trp.truncate(trp.energy_rule())
        left, right = (optimizer.state[p] for p in layer.cores)
        for name in ("exp_avg", "exp_avg_sq"):
            if reset:
                assert not left[name][..., 2:].any() and not right[name][2:].any()
            else:
                assert torch.equal(left[name], before[id(layer.cores[0])][name])
            assert torch.equal(left[name][..., :2], before[id(layer.cores[0])][name][..., :2])
            assert torch.equal(right[name][:2], before[id(layer.cores[1])][name][:2])
        assert torch.equal(left["step"], before[id(layer.cores[0])]["step"])


def test_cut_and_reset_slices_stay_exactly_zero_so_eval_computes_the_training_model():
    model = two_core_train([3.0, 2.0, 1.0, 0.5])
    layer = model[0]
    trp = method(energy=0.9, nuclear_weight=0.01)
    trp.attach(model, CPU)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    trp.set_optimizer(optimizer)
    x, y = torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 4, (16,))
    for _ in range(3):  # state on every slice, then the truncation at the next step's start
        model.train()
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    trp.steps_per_epoch, trp.step = 100, 0  # the epoch's first batch: a truncation is due
    for _ in range(5):
        model.train()
        optimizer.zero_grad()
        trp.loss(model, (x, y), F.cross_entropy).total.backward()
        optimizer.step()
        trp.on_step_end(model, trp.step + 1)
    assert trp.truncations == 1
    assert not layer.cores[0][..., 2:].any() and not layer.cores[1][2:].any()
    assert [c.shape[0] for c in live_cores(layer)] == [1, 2]
    with torch.no_grad():
        trained = model.train()(x)
        torch.testing.assert_close(model.eval()(x), trained, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------- schedule and final truncation


def test_truncations_come_at_the_reference_batch_indices_and_the_final_one_after_the_last_step():
    trp = method()
    trp.on_train_begin(nn.Linear(1, 1), 10, 7)
    due = []
    for step in range(14):
        trp.step = step
        due.append(trp.due())
    assert due == [i % 7 == 0 for i in range(14)]  # none: the first batch of every epoch
    trp = method(period=3)
    trp.on_train_begin(nn.Linear(1, 1), 10, 7)
    due = []
    for step in range(14):
        trp.step = step
        due.append(trp.due())
    assert due == [(i % 7) % 3 == 0 for i in range(14)]  # batch_idx % period == 0, batch_idx per epoch
    assert trp.final_step() == 70
    for finetune, final in ((2, 56), (10, 70), (0, 70)):
        trp = method(finetune_epochs=finetune)
        trp.on_train_begin(nn.Linear(1, 1), 10, 7)
        assert trp.final_step() == final


def test_a_second_loss_of_one_step_does_not_truncate_again():
    model = two_core_train([3.0, 1.2, 1.0, 0.5])  # shares 0.77, 0.89, 0.98: 3 kept; of those 0.79, 0.91: 2
    trp = method(energy=0.9)
    trp.attach(model, CPU)
    x, y = torch.randn(4, 6, dtype=torch.float64), torch.randint(0, 4, (4,))
    model.train()
    first = trp.loss(model, (x, y), F.cross_entropy).total
    second = trp.loss(model, (x, y), F.cross_entropy).total  # a second cut would keep 2
    assert trp.truncations == 1 and trp.ranks == {"0.bond1": 3} and torch.equal(first, second)
    trp.on_step_end(model, 1)
    trp.steps_per_epoch, trp.step = 1, 1  # the next epoch's first batch: due again
    trp.loss(model, (x, y), F.cross_entropy)
    assert trp.truncations == 2 and trp.ranks == {"0.bond1": 2}


def test_the_final_truncation_keeps_the_values_above_the_threshold_and_enforces_the_masks():
    model = two_core_train([3.0, 2.0, 1.0, 0.5])
    layer = model[0]
    trp = method(value_threshold=0.3)  # keeps σ >= 0.9: 3, 2 and 1
    trp.attach(model, CPU)
    trp.on_train_begin(model, 1, 4)
    u, s, vh = torch.linalg.svd(weight(layer))
    for step in (1, 2, 3):
        trp.on_step_end(model, step)
    assert not trp.final
    trp.on_step_end(model, 4)
    assert trp.final and trp.ranks == {"0.bond1": 3}
    torch.testing.assert_close(weight(layer), u[:, :3] * s[:3] @ vh[:3], rtol=0, atol=1e-12)
    mask = trp.selectors["0.bond1"]
    assert torch.equal(mask.train().sample(), mask.mask)  # from now on training sees the mask too
    assert not trp.due()
    model.train()
    assert float(trp.penalty(model)) == 0.0


def ring_of_rank_6() -> nn.Sequential:
    """A seeded 60 -> 12 tensor-ring layer at rank 6 (random cores: nothing truncated yet)."""
    torch.manual_seed(0)
    return nn.Sequential(TensorizedLinear(60, 12, (3, 4, 5), (3, 4), 6, "tr").double())


def test_the_final_truncation_keeps_fewer_values_as_the_threshold_rises():
    trained = ring_of_rank_6()
    counts = []
    for threshold in (0.0, 0.05, 0.2, 0.5, 0.8, 1.0):
        model = copy.deepcopy(trained)
        trp = method(value_threshold=threshold)
        trp.attach(model, CPU)
        trp.truncate(trp.value_rule(), final=True)
        counts.append(count_parameters(model))
    assert counts == sorted(counts, reverse=True) and counts[0] > counts[-1]
    assert learned_ranks(model)["0"] == [1] * 5  # threshold 1: the largest value of every bond alone


def test_the_knob_is_the_energy_and_the_compression_falls_as_it_rises():
    cls = REGISTRY.method("trp")
    knob = cls.compression_knob
    assert (knob.name, knob.increases_compression, knob.found_by) == ("energy", False, "training")
    search = cls.hyperparameters["energy"].search
    assert not search.log and 0.0 < search.low < 0.9 < search.high < 1.0
    trained = ring_of_rank_6()
    counts = []
    for energy in (0.3, 0.6, 0.9, 0.99, 0.9999):
        model = copy.deepcopy(trained)
        trp = method(energy=energy)
        trp.attach(model, CPU)
        trp.truncate(trp.energy_rule())
        counts.append(count_parameters(model))
    assert counts == sorted(counts) and counts[0] < counts[-1]


# ---------------------------------------------------------------------------- the trainer, resume, the CLI


def tiny_splits(n_train: int = 64) -> DataSplits:
    generator = torch.Generator().manual_seed(0)

    def split(n):
        return Split(torch.randn(n, 1, 28, 28, generator=generator), torch.randint(0, 10, (n,), generator=generator))

    return DataSplits("tiny", "random", split(n_train), split(16), split(16), 10)


def test_the_trainer_hands_every_method_its_optimizer_before_on_train_begin():
    seen = []

    class Probe(Method):
        name = "probe"

        def on_train_begin(self, model, epochs, steps_per_epoch):
            seen.append(self.optimizer)

    config = make_config(REGISTRY, "mlp2", "trn", {"initial_rank": 2})
    task = REGISTRY.task("mlp2")(config.task_params)
    probe = Probe({})
    assert probe.optimizer is None
    model = build_model(task, probe, 0, CPU)
    trainer = Trainer(model, probe, task, tiny_splits(), epochs=1, seed=0, device=torch.device("cpu"),
                      dense_parameters=1)
    assert seen == [trainer.optimizer] and probe.optimizer is trainer.optimizer


def test_a_resumed_run_ends_as_the_uninterrupted_one_before_and_after_the_final_truncation():
    config = make_config(REGISTRY, "mlp2", "trp", {"initial_rank": 6, "batch_size": 16, "period": "2",
                                                   "finetune_epochs": "1", "nuclear_weight": "0.01"})
    task = REGISTRY.task("mlp2")(config.task_params)
    data = tiny_splits()
    dense = count_parameters(task.dense_model())

    def run(resume=None):
        trp = REGISTRY.method("trp")(config.method_params)
        model = build_model(task, trp, 0, CPU)
        checkpoints = []
        fit(model, trp, task, data, epochs=3, seed=0, device=torch.device("cpu"), dense_parameters=dense,
            resume=resume, on_checkpoint=lambda c: checkpoints.append(copy.deepcopy(c)))
        return model, trp, checkpoints

    model, trp, checkpoints = run()
    assert trp.final and trp.truncations == 2 * 2 + 1  # 4 steps per epoch, period 2, epochs 1-2; then the final
    assert [c.method["final"] for c in checkpoints] == [False, True, True]
    assert any(r < 6 for r in trp.ranks.values())
    for checkpoint in checkpoints[:2]:
        resumed, resumed_trp, _ = run(resume=checkpoint)
        assert resumed_trp.state_dict() == trp.state_dict()
        state, expected = resumed.state_dict(), model.state_dict()
        assert state.keys() == expected.keys()
        assert all(torch.equal(state[k], expected[k]) for k in expected), checkpoint.epoch


def test_a_short_cli_run_truncates_and_finishes(tmp_path, uri):
    from mlflow.tracking import MlflowClient

    data_dir = make_tiny_mnist(tmp_path / "data")
    rc = main(["run", "--task", "mlp2", "--method", "trp", "--epochs", "2", "--seeds", "0", "--tracking-uri", uri,
               "--no-progress", "--data-dir", str(data_dir), "--set", "val_size=40", "--set", "initial_rank=8"])
    assert rc == 0
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED"
    history = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "compression"),
                                       key=lambda m: m.step)]
    assert len(history) == 2 and 1.0 < history[0] <= history[1]  # ranks only fall: cut slices never regrow
    assert run.data.metrics["compression"] == pytest.approx(history[-1])  # the final truncation: before epoch 2's
