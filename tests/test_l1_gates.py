"""``l1_gates``: ℓ1-penalised scales per rank slice, presets ``tensorlasso`` and ``comera``.

The update rule against hand computations on tiny tensorized layers, CoMERA's per-step switch of
its late stage, the resumable state, the contract for the ``comera`` preset, and one short CLI run
per preset on tiny random digits.
"""

from __future__ import annotations

import copy
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import make_tiny_mnist
from rankbench.cli import main
from rankbench.contract import check_method
from rankbench.errors import RankbenchError
from rankbench.layers.tensorized import TensorizedLinear, count_parameters, learned_ranks, prune_model
from rankbench.methods.l1_gates import LATE_TASK_WEIGHT, L1Gates
from rankbench.plugins.method import MethodContext
from rankbench.plugins.registry import Registry
from rankbench.run.config import make_config
from rankbench.run.prepare import prepare
from rankbench.run.trainer import Trainer

CPU = torch.device("cpu")
REGISTRY = Registry.discover(entry_point_groups=False)


def method(**overrides) -> L1Gates:
    params = {key: hyper.default for key, hyper in L1Gates.hyperparameters.items()}
    params.update(overrides)
    return L1Gates(params)


def ring(rank: int = 3, decomposition: str = "tr") -> nn.Sequential:
    """One 6→4 layer, cores (2, 3 | 2, 2): four bonds of ``rank`` in a ring, three in a train."""
    torch.manual_seed(0)
    return nn.Sequential(TensorizedLinear(6, 4, (2, 3), (2, 2), rank, decomposition, name="0"))


def attached(model: nn.Module, **overrides) -> L1Gates:
    m = method(**overrides)
    m.attach(model, MethodContext(num_train=10, device=CPU))
    return m


def set_scales(m: L1Gates, values: list[list[float]]) -> None:
    with torch.no_grad():
        for scale, v in zip(m.scales(), values, strict=True):
            scale.w.copy_(torch.tensor(v))


def batch(n: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, generator=g), torch.randint(0, 4, (n,), generator=g)


# ---------------------------------------------------------------------------- the update rule


@pytest.mark.parametrize("preset", ["tensorlasso", "comera"])
def test_training_forward_multiplies_every_slice_by_its_scale(preset):
    model = ring()
    m = attached(model, preset=preset)
    values = [[0.5, -0.7, 0.9], [1.0, 0.25, -0.3], [0.6, 0.8, 0.05], [-1.0, 0.4, 0.2]]  # all above 1e-2
    set_scales(m, values)
    by_hand = copy.deepcopy(model[0])
    by_hand.selectors = nn.ModuleDict()
    with torch.no_grad():
        for k, v in enumerate(values):  # bond k scales dim 0 of core k
            by_hand.cores[k].mul_(torch.tensor(v).view(-1, 1, 1))
    x, y = batch()
    model.train()
    assert torch.allclose(model(x), by_hand(x), atol=1e-6)
    step = m.loss(model, (x, y), F.cross_entropy)  # the method's own forward gives the same
    assert torch.allclose(step.outputs, by_hand(x), atol=1e-6)


def test_tensorlasso_penalty_is_lambda_times_the_sum_of_abs_over_the_number_of_scales():
    model = ring()
    m = attached(model, preset="tensorlasso", **{"lambda": 0.3})
    values = [[0.5, -0.7, 0.9], [1.0, 0.25, -0.3], [0.6, 0.8, 5e-7], [-1.0, 0.4, 0.0]]
    set_scales(m, values)
    by_hand = 0.3 * sum(abs(v) for bond in values for v in bond) / 12  # TensorLasso: penalty * _loss / n_element
    assert float(m.penalty(model).detach()) == pytest.approx(by_hand, rel=1e-6)


def test_comera_penalty_divides_the_scales_above_the_threshold_by_their_count():
    model = ring()
    m = attached(model, preset="comera", **{"lambda": 0.3})
    values = [[0.5, -0.7, 0.009], [1.0, 0.25, -0.3], [0.6, 0.8, 5e-7], [-1.0, 0.4, -0.005]]
    set_scales(m, values)
    active = [abs(v) for bond in values for v in bond if abs(v) >= 1e-2]  # CoMERA's rank_loss, on |w|
    assert len(active) == 9
    assert float(m.penalty(model).detach()) == pytest.approx(0.3 * sum(active) / len(active), rel=1e-6)


def test_one_sgd_step_then_clamp_and_threshold_equal_the_hand_update():
    model = ring()
    lam, lr, n = 0.01, 0.1, 12
    m = attached(model, preset="tensorlasso", **{"lambda": lam})
    shrink = lr * lam / n  # one step of the normalised l1's gradient, lr * lambda * sign(w) / N
    values = [[1.5, -1.3, -0.4], [shrink + 4e-7, 0.6, 0.3], [0.7, -0.2, 0.5], [0.9, 0.8, -0.6]]
    set_scales(m, values)
    with torch.no_grad():  # slice 0 of bond 1 carries nothing: its task gradient is exactly 0
        model[0].cores[1][0].zero_()
    x, y = batch()
    model.train()
    ws = [s.w for s in m.scales()]
    task_grad = torch.autograd.grad(F.cross_entropy(model(x), y), ws)
    assert float(task_grad[1][0]) == 0.0
    optimizer = torch.optim.SGD(ws, lr=lr)
    optimizer.zero_grad()
    m.loss(model, (x, y), F.cross_entropy).total.backward()
    optimizer.step()
    m.on_step_end(model, 1)
    for k, (w, g) in enumerate(zip(ws, task_grad)):
        before = torch.tensor(values[k])
        expected = (before - lr * (g + lam * torch.sign(before) / n)).clamp(-1.0, 1.0)
        expected = torch.where(expected.abs() >= 1e-6, expected, torch.zeros_like(expected))
        assert torch.allclose(w.detach(), expected, atol=1e-7), (k, w, expected)
    ws = [w.detach() for w in ws]
    assert float(ws[0][0]) == 1.0 and float(ws[0][1]) == -1.0  # clamped
    assert float(ws[1][0]) == 0.0  # 4e-7 after the step: under 1e-6, zeroed in place
    assert float(ws[0][2]) < 0 and float(m.scales()[0].deterministic()[2]) == float(ws[0][2])  # negative, kept


@pytest.mark.parametrize("preset, expected, ranks", [
    ("tensorlasso", [[0.5, -5e-3, -0.02], [0.0, 2e-6, 0.3], [1e-3, -4e-3, 2e-3], [0.7, 0.7, -0.7]], [3, 2, 3, 3]),
    ("comera", [[0.5, 0.0, -0.02], [0.0, 0.0, 0.3], [0.0, -4e-3, 0.0], [0.7, 0.7, -0.7]], [2, 1, 1, 3]),
])
def test_eval_multipliers_zero_exactly_the_slices_under_the_threshold(preset, expected, ranks):
    model = ring()
    m = attached(model, preset=preset)
    set_scales(m, [[0.5, -5e-3, -0.02], [-5e-7, 2e-6, 0.3], [1e-3, -4e-3, 2e-3], [0.7, 0.7, -0.7]])
    model.eval()
    for scale, want in zip(m.scales(), expected):
        assert torch.equal(scale(), torch.tensor(want))  # negative scales with |w| >= threshold stay
    assert learned_ranks(model)["0"] == ranks  # comera's bond 2: all under 1e-2, its largest |w| kept
    x, _ = batch()
    with torch.no_grad():
        assert torch.allclose(prune_model(model)(x), model(x), atol=1e-6)
    m.on_step_end(model, 1)  # zeroing in place changes nothing the eval model computes
    model.train()
    for scale, want in zip(m.scales(), expected):
        assert torch.equal(scale(), torch.tensor(want))  # and the training multipliers agree


def test_comera_blocks_the_gradient_of_pruned_slices_tensorlasso_does_not():
    for preset, blocked in (("comera", True), ("tensorlasso", False)):
        model = ring()
        m = attached(model, preset=preset, threshold=1e-2)
        set_scales(m, [[0.5, 0.0, 0.3]] * 4)
        x, y = batch()
        model.train()
        m.loss(model, (x, y), F.cross_entropy).total.backward()
        grads = [float(s.w.grad[1]) for s in m.scales()]
        assert all(g == 0.0 for g in grads) == blocked, (preset, grads)


@pytest.mark.parametrize("decomposition", ["tr", "tt"])
def test_the_size_the_late_stage_reads_is_count_parameters(decomposition):
    torch.manual_seed(0)
    model = nn.Sequential(TensorizedLinear(6, 4, (2, 3), (2, 2), 3, decomposition, name="a"), nn.ReLU(),
                          nn.Linear(4, 5), TensorizedLinear(5, 4, (5,), (2, 2), 4, "tr", bias=False, name="b"))
    m = attached(model, preset="comera")
    for trial in range(4):
        with torch.no_grad():
            for scale in m.scales():
                scale.w.copy_(torch.randn(scale.size) * 0.02)
        flat = m.flat(m.scales())
        assert float(m.segments(model).size(flat, m.threshold)) == count_parameters(model.eval()), trial


def test_late_stage_hyperparameters_are_refused_without_comera():
    with pytest.raises(RankbenchError, match="preset=comera"):
        method(preset="tensorlasso", target_compression=10.0)


# ---------------------------------------------------------------------------- comera's stages


def test_comera_enters_the_late_stage_after_early_epochs_with_its_targets():
    model = ring()
    m = attached(model, preset="comera", early_epochs=2, target_compression=4.0)
    size = count_parameters(model.eval())
    m.on_epoch_end(model, 1, {"compression": 1.5, "train_loss": 0.7})
    assert m.stage == "early"
    m.on_epoch_end(model, 2, {"compression": 1.5, "train_loss": 0.7})
    assert m.stage == "late"
    assert m.target_size == pytest.approx(1.5 * size / 4.0)  # dense / 4
    assert m.target_loss == pytest.approx(0.7)  # the last early epoch's training loss
    n = ring()
    ratio = attached(n, preset="comera", early_epochs=1, target_loss=0.8)
    ratio.on_epoch_end(n, 1, {"compression": 1.5, "train_loss": 0.7})
    assert ratio.target_size == pytest.approx(0.2 * count_parameters(n.eval())) and ratio.target_loss == 0.8


def test_comera_switches_per_step_between_the_size_term_and_the_task_loss_by_its_rule():
    model = ring()
    lam = 0.05
    m = attached(model, preset="comera", early_epochs=1, **{"lambda": lam})
    optimizer = torch.optim.SGD(list(model.parameters()), lr=0.05)
    x, y = batch(8)

    def step(expect_size_term: bool | None) -> float:
        model.train()
        with torch.no_grad():
            task = float(F.cross_entropy(model(x), y))
        size = count_parameters(copy.deepcopy(model).eval())
        if expect_size_term is not None:  # put the loss's relative gap on the chosen side of the size's
            size_gap = (size - m.target_size) / size
            m.target_loss = task * (1 - size_gap + (0.1 if expect_size_term else -0.1))
        optimizer.zero_grad()
        out = m.loss(model, (x, y), F.cross_entropy)
        assert float(out.task) == pytest.approx(task, rel=1e-5)
        scales = torch.cat([s.w.detach().abs() for s in m.scales()])
        l1 = float(scales[scales >= 1e-2].mean())
        s = 0.0
        if m.stage == "late":
            rule = (task - m.target_loss) / task < (size - m.target_size) / size  # CoMERA, MNLI_trainer.py l.398
            s = 1.0 if rule else 0.0
            assert float(m.size_term_active) == s
            total = (LATE_TASK_WEIGHT + 1 - s) * task + (lam + s) * l1
        else:
            total = task + lam * l1  # the early stage: task + lambda * rank_loss
        assert float(out.total) == pytest.approx(total, rel=1e-5)
        out.total.backward()
        optimizer.step()
        m.on_step_end(model, 1)
        return s

    step(None)
    assert m.size_term_active is None and m.late_steps == 0
    m.on_epoch_end(model, 1, {"compression": 2.0, "train_loss": 1.0})
    assert m.stage == "late"
    seen = [step(flag) for flag in (True, False, True, None, None, False)]
    assert seen[:3] == [1.0, 0.0, 1.0] and seen[5] == 0.0
    assert m.late_steps == 6 and m.size_steps == sum(seen)


# ---------------------------------------------------------------------------- state


def test_state_round_trips_through_a_fresh_method():
    model = ring()
    m = attached(model, preset="comera", early_epochs=1)
    m.on_epoch_end(model, 1, {"compression": 2.0, "train_loss": 1.0})
    m.late_steps, m._size_steps = 7, torch.tensor(3.0)
    state = m.state_dict()
    assert state == {"stage": "late", "target_size": pytest.approx(0.2 * count_parameters(model.eval())),
                     "target_loss": 1.0, "late_steps": 7, "size_steps": 3.0}
    fresh_model = ring()
    fresh = attached(fresh_model, preset="comera", early_epochs=1)
    fresh.load_state_dict(fresh_model, copy.deepcopy(state))
    assert fresh.state_dict() == state


def test_a_run_resumed_in_the_late_stage_ends_as_the_uninterrupted_one(tmp_path):
    config = make_config(REGISTRY, "mlp2", "l1_gates", {"val_size": 40, "initial_rank": 3, "batch_size": 64,
                                                         "preset": "comera", "early_epochs": 1, "lambda": 1.0},
                         epochs=3, data_dir=make_tiny_mnist(tmp_path / "data"), device="cpu")
    prepared = prepare(config, REGISTRY)

    def trainer() -> Trainer:
        model, m = prepared.build(0)
        return Trainer(model, m, prepared.task, prepared.data, epochs=prepared.epochs, seed=0, device=CPU,
                       dense_parameters=prepared.dense_parameters)

    first = trainer()
    first.train_epoch()
    first.train_epoch()
    checkpoint = copy.deepcopy(first.state_dict())
    assert checkpoint.method["stage"] == "late" and checkpoint.method["late_steps"] == 3
    first.train_epoch()
    resumed = trainer()
    resumed.load_state_dict(checkpoint)
    resumed.fit()
    assert resumed.method.state_dict() == first.method.state_dict()
    for (name, a), b in zip(first.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert [h["train_loss"] for h in resumed.history] == [h["train_loss"] for h in first.history]


# ---------------------------------------------------------------------------- contract and CLI


def test_the_comera_preset_passes_the_contract(tmp_path, monkeypatch):
    monkeypatch.setenv("RANKBENCH_DATA_DIR", str(tmp_path / "no-data"))
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "comera_default.py").write_text(textwrap.dedent('''
        from typing import ClassVar
        from rankbench.plugin import Hyper
        from rankbench.methods.l1_gates import PRESETS, L1Gates

        class ComeraDefault(L1Gates):
            name: ClassVar[str] = "l1_gates_comera"
            hyperparameters: ClassVar[dict] = {**L1Gates.hyperparameters,
                                               "preset": Hyper("comera", "preset", choices=tuple(PRESETS))}
    '''))
    registry = Registry.discover(entry_point_groups=False, plugin_dirs=[tmp_path / "plugins"])
    checks = check_method(registry, "l1_gates_comera", "mlp2")
    assert [c.name for c in checks if not c.passed] == [], checks


@pytest.mark.parametrize("preset, extra", [("tensorlasso", ["--epochs", "1"]),
                                           ("comera", ["--epochs", "2", "--set", "early_epochs=1"])])
def test_a_short_cli_run_of_each_preset_exits_0(preset, extra, tmp_path, uri):
    data = make_tiny_mnist(tmp_path / "data")
    rc = main(["run", "--task", "mlp2", "--method", "l1_gates", "--set", f"preset={preset}", *extra,
               "--seeds", "0", "--tracking-uri", uri, "--no-progress", "--data-dir", str(data),
               "--set", "val_size=40", "--set", "initial_rank=3"])
    assert rc == 0
