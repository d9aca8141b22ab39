"""The one training loop: the trainer's per-step hook, its counters across a resume, and that no other
module trains a model."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from helpers import make_tiny_mnist
from rankbench.plugins.registry import Registry
from rankbench.run.config import make_config
from rankbench.run.prepare import prepare
from rankbench.run.trainer import Trainer, TrainerCallback

ROOT = Path(__file__).resolve().parent.parent
REGISTRY = Registry.discover(entry_point_groups=False)


def tiny_run(tmp_path, method: str = "ours", epochs: int = 2):
    config = make_config(REGISTRY, "mlp2", method, {"val_size": 40, "initial_rank": 3, "batch_size": 64},
                         epochs=epochs, data_dir=make_tiny_mnist(tmp_path / "data"), device="cpu")
    return prepare(config, REGISTRY)


def trainer_for(prepared, callbacks=()) -> Trainer:
    model, method = prepared.build(0)
    return Trainer(model, method, prepared.task, prepared.data, epochs=prepared.epochs, seed=0,
                   device=prepared.device, dense_parameters=prepared.dense_parameters, callbacks=callbacks)


def test_on_step_end_sees_every_optimizer_step_counted_over_the_training_and_across_a_resume(tmp_path, monkeypatch):
    prepared = tiny_run(tmp_path, epochs=3)
    seen: list[int] = []
    monkeypatch.setattr(prepared.method_cls, "on_step_end", lambda self, model, step: seen.append(step),
                        raising=False)
    trainer = trainer_for(prepared)
    trainer.train_epoch()
    steps_per_epoch = trainer.steps_per_epoch
    assert steps_per_epoch == 3 and seen == [1, 2, 3]  # 160 examples in batches of 64
    checkpoint = trainer.state_dict()
    assert checkpoint.step == 3 and checkpoint.epoch == 1

    seen.clear()
    resumed = trainer_for(prepared)
    resumed.load_state_dict(checkpoint)
    resumed.fit()
    assert seen == [4, 5, 6, 7, 8, 9]
    assert resumed.epoch == 3 and len(resumed.history) == 3


def test_callbacks_see_the_loss_before_the_step_and_the_epochs_metrics_after_validation(tmp_path):
    events: list[tuple] = []

    class Recorder(TrainerCallback):
        def on_loss(self, trainer, epoch, batch, losses):
            events.append(("loss", epoch, batch, trainer.step))

        def on_step_end(self, trainer, epoch, batch, losses):
            events.append(("step", epoch, batch, trainer.step))

        def on_epoch_end(self, trainer, epoch, metrics):
            events.append(("epoch", epoch, round(metrics["val_accuracy"], 3) >= 0, trainer.epoch))

    trainer_for(tiny_run(tmp_path, epochs=1), [Recorder()]).fit()
    assert events == [("loss", 1, 1, 0), ("step", 1, 1, 1), ("loss", 1, 2, 1), ("step", 1, 2, 2),
                      ("loss", 1, 3, 2), ("step", 1, 3, 3), ("epoch", 1, True, 1)]


def test_the_contract_suite_trains_through_the_trainer_and_hands_on_epoch_end_real_metrics(monkeypatch):
    from rankbench.contract import check_method

    seen: list[dict] = []
    ours = REGISTRY.method("ours")
    real = ours.on_epoch_end

    def recording(self, model, epoch, metrics):
        seen.append(dict(metrics))
        return real(self, model, epoch, metrics)

    monkeypatch.setattr(ours, "on_epoch_end", recording)
    checks = {c.name: c for c in check_method(REGISTRY, "ours", "mlp2")}
    assert checks["train"].passed, checks["train"].detail
    (metrics,) = seen
    assert metrics["val_loss"] > 0 and metrics["train_seconds_per_batch"] > 0 and metrics["compression"] > 1


def test_no_module_outside_the_trainer_runs_an_optimizer():
    """One training loop: only rankbench/run/trainer.py steps an optimizer (benchmarks/layers.py times a
    single layer's forward and backward, with no optimizer)."""
    pattern = re.compile(r"\.zero_grad\(|optimizer\.step\(|\.backward\(")
    layer_timing = ROOT / "benchmarks" / "layers.py"
    offending = [f"{path.relative_to(ROOT)}:{i}" for folder in ("rankbench", "benchmarks", "methods", "tasks")
                 for path in sorted((ROOT / folder).rglob("*.py")) if path.name != "trainer.py"
                 for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
                 if pattern.search(line) and path != layer_timing]
    assert offending == []
    assert pattern.search("self.optimizer.step()") and pattern.search("optimizer.zero_grad(set_to_none=True)")
    assert "optimizer" not in layer_timing.read_text(encoding="utf-8")


def test_a_trainer_step_equals_the_same_step_written_out(tmp_path):
    """The trainer adds nothing to a step: its weights after one step equal a hand-written step's."""
    prepared = tiny_run(tmp_path, method="trn")
    trainer = trainer_for(prepared)
    model, method = prepared.build(0)
    x, y = prepared.data.train.x[:64], prepared.data.train.y[:64]
    trainer.train_step(x, y)
    optimizer = torch.optim.Adam(model.parameters(), lr=prepared.task.params["lr"])  # the reference step
    optimizer.zero_grad()
    method.loss(model, (x, y), prepared.task.loss).total.backward()
    optimizer.step()
    for (name, a), b in zip(trainer.model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name


def test_the_compile_warm_up_leaves_batchnorm_statistics_as_it_found_them(tmp_path):
    from torch import nn

    from rankbench.data import DataSplits, Split
    from rankbench.run.trainer import compiled_model

    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 26 * 26, 10))
    generator = torch.Generator().manual_seed(0)
    split = Split(torch.randn(40, 1, 28, 28, generator=generator), torch.randint(0, 10, (40,), generator=generator))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    compiled_model(model, DataSplits("tiny", "random", split, split, split, 10), 16, torch.device("cpu"))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), [k for k in before if not torch.equal(before[k],
                                                                                                    after[k])]
    assert int(after["1.num_batches_tracked"]) == 0


def test_reinforce_l0_reads_nothing_back_from_the_device_in_a_step(tmp_path):
    """Every ``float(tensor)``/``.item()`` is one ``aten._local_scalar_dense``: a host sync per call on a GPU."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class ScalarReads(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                ScalarReads.count += 1
            return func(*args, **(kwargs or {}))

    prepared = tiny_run(tmp_path, method="reinforce_l0")
    model, method = prepared.build(0)
    x, y = prepared.data.train.x[:32], prepared.data.train.y[:32]
    with ScalarReads():
        step = method.loss(model, (x, y), prepared.task.loss)
        step.total.backward()
    assert ScalarReads.count == 0
    assert step.penalty.item() > 0
