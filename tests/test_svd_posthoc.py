"""svd_posthoc: TR/TT-SVD rounding of trained cores behind fixed 0/1 masks (methods/svd_posthoc.py, its
rounding in rankbench/layers/rounding.py).

The rounding is checked in float64 against first principles and tensorly's reconstructions; the
rules on hand-built spectra; the schedule, the resume and the CLI on tiny data.
"""

from __future__ import annotations

import copy
import math

import pytest
import tensorly as tl
import torch
import torch.nn.functional as F
from torch import nn

from helpers import make_tiny_mnist
from rankbench.cli import main
from rankbench.errors import RankbenchError
from rankbench.layers.tensorized import TensorizedConv2d, TensorizedLinear, count_parameters, learned_ranks, prune_model
from rankbench.methods.svd_posthoc import SvdPosthoc, target_order, target_ranks
from rankbench.plugin import (
    DataSplits,
    Method,
    MethodContext,
    Split,
    TruncationMask,
    bond_spectrum,
    current_cores,
    energy_ranks,
)
from rankbench.plugins.registry import Registry
from rankbench.run.config import make_config
from rankbench.run.prepare import build_model
from rankbench.run.trainer import fit

tl.set_backend("pytorch")
CPU = MethodContext(num_train=100, device=torch.device("cpu"))
REGISTRY = Registry.discover(entry_point_groups=False)
needs_epochs_hook = pytest.mark.skipif(
    not hasattr(Method, "on_train_begin"),
    reason="the trainer does not tell methods their epochs yet (Method.on_train_begin, a core change)")


def method(**params) -> SvdPosthoc:
    return SvdPosthoc({"target_compression": None, "energy": 0.99, "finetune_epochs": None, **params})


def reconstruction(layer) -> torch.Tensor:
    """tensorly's weight of the layer's eval-gated cores (axes in core order)."""
    cores = [c.detach() for c in layer.eval().gated_cores()]
    if getattr(layer, "layout", "chain") == "matrix":
        from tensorly.tt_matrix import tt_matrix_to_tensor
        return tt_matrix_to_tensor(cores)
    flat = [c.reshape(c.shape[0], -1, c.shape[-1]) for c in cores]
    full = tl.tr_to_tensor(flat) if layer.decomposition == "tr" else tl.tt_to_tensor(flat)
    return full.reshape(*[m for core in layer.core_modes for m in core])


@torch.no_grad()
def make_low_rank(layer, k: int, seed: int = 0) -> list[int]:
    """Cores whose every gateable bond has true rank ``k``, padded to the layer's sizes and hidden by a
    random invertible gauge on every bond (dense cores, the same weight); the true ranks."""
    generator = torch.Generator().manual_seed(seed)
    d, r = len(layer.cores), layer.ranks
    true = [1 if b not in layer.gateable_bonds() else min(k, r[b]) for b in range(d)]
    for j, core in enumerate(layer.cores):
        core.zero_()
        block = core[:true[j], ..., :true[(j + 1) % d]]
        block.copy_(torch.randn(block.shape, generator=generator, dtype=core.dtype))
    for b in layer.gateable_bonds():
        gauge = torch.randn(r[b], r[b], generator=generator, dtype=torch.float64) + 3 * torch.eye(r[b],
                                                                                                  dtype=torch.float64)
        left, right = layer.cores[(b - 1) % d], layer.cores[b]
        left.copy_(torch.tensordot(left, gauge, dims=([left.dim() - 1], [0])))
        right.copy_(torch.tensordot(torch.linalg.inv(gauge), right, dims=([1], [0])))
    return true


LAYERS = {
    "tr-chain": lambda: TensorizedLinear(60, 12, (3, 4, 5), (3, 4), 6, "tr"),
    "tt-chain": lambda: TensorizedLinear(60, 12, (3, 4, 5), (3, 4), 6, "tt"),
    "tt-matrix": lambda: TensorizedLinear(84, 30, (7, 4, 3), (5, 3, 2), 6, "tt", layout="matrix"),
    "tr-conv": lambda: TensorizedConv2d(4, 6, 3, (2, 2), (2, 3), 5, "tr", padding=1),
}


def inputs(layer, n: int = 5) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    if isinstance(layer, TensorizedConv2d):
        return torch.randn(n, layer.in_channels, 6, 6, generator=generator, dtype=torch.float64)
    return torch.randn(n, layer.in_features, generator=generator, dtype=torch.float64)


# ---------------------------------------------------------------------------- the rounding


@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_exactly_low_rank_cores_round_to_their_rank_and_keep_the_outputs(kind):
    model = nn.Sequential(LAYERS[kind]().double())
    layer = model[0]
    true = make_low_rank(layer, 3)
    svd = method(energy=1.0)
    svd.attach(model, CPU)
    x = inputs(layer)
    with torch.no_grad():
        before = model.eval()(x)
    ranks = svd.truncate(model)
    assert ranks == {f"0.bond{b}": true[b] for b in layer.gateable_bonds()}
    assert learned_ranks(model)["0"] == true
    scale = before.abs().max()
    with torch.no_grad():
        torch.testing.assert_close(model(x) / scale, before / scale, rtol=0, atol=1e-10)
        pruned = prune_model(model)
        assert [tuple(c.shape[i] for i in (0, -1)) for c in pruned[0].cores] == [
            (true[k], true[(k + 1) % len(true)]) for k in range(len(true))]
        torch.testing.assert_close(pruned(x) / scale, before / scale, rtol=0, atol=1e-10)


def test_a_trains_bond_spectra_are_its_unfoldings_singular_values():
    torch.manual_seed(1)
    layer = TensorizedLinear(60, 12, (3, 4, 5), (3, 4), [1, 3, 7, 9, 4], "tt").double()
    full = reconstruction(layer)
    cores = current_cores(layer)
    for k in layer.gateable_bonds():
        unfolding = torch.linalg.svdvals(full.reshape(math.prod(full.shape[:k]), -1))
        spectrum = bond_spectrum(cores, k)
        n = spectrum.numel()
        torch.testing.assert_close(spectrum / spectrum[0], unfolding[:n] / unfolding[0], rtol=0, atol=1e-12)
        assert bool((unfolding[n:] < 1e-12 * unfolding[0]).all())


@pytest.mark.parametrize("decomposition", ["tr", "tt"])
def test_bond_spectra_do_not_depend_on_the_gauge_training_left(decomposition):
    torch.manual_seed(2)
    layer = TensorizedLinear(60, 12, (3, 4, 5), (3, 4), 5, decomposition).double()
    before = [bond_spectrum(current_cores(layer), k) for k in layer.gateable_bonds()]
    with torch.no_grad():
        d = len(layer.cores)
        for b in layer.gateable_bonds():  # an invertible P between every two cores: the same weight
            gauge = torch.randn(5, 5, dtype=torch.float64) + 2 * torch.eye(5, dtype=torch.float64)
            left, right = layer.cores[(b - 1) % d], layer.cores[b]
            left.copy_(torch.tensordot(left, gauge, dims=([2], [0])))
            right.copy_(torch.tensordot(torch.linalg.inv(gauge), right, dims=([1], [0])))
    after = [bond_spectrum(current_cores(layer), k) for k in layer.gateable_bonds()]
    for a, b in zip(before, after):
        torch.testing.assert_close(b / b[0], a / a[0], rtol=0, atol=1e-9)


@pytest.mark.parametrize("kind", ["tr-chain", "tt-chain", "tt-matrix"])
def test_truncated_weight_is_tensorlys_reconstruction_and_the_pruned_models(kind):
    torch.manual_seed(4)
    model = nn.Sequential(LAYERS[kind]().double())
    layer = model[0]
    full_before = reconstruction(layer)
    svd = method(energy=0.8)
    svd.attach(model, CPU)
    ranks = svd.truncate(model)
    assert any(r < 6 for r in ranks.values())  # the rule did cut
    truncated = reconstruction(layer)
    torch.testing.assert_close(layer.eval().full_tensor().detach(), truncated, rtol=1e-10, atol=1e-12)
    pruned = prune_model(model)[0]
    assert pruned.ranks == layer.eval_ranks()
    torch.testing.assert_close(reconstruction(pruned), truncated, rtol=1e-10, atol=1e-12)
    x = inputs(layer)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), model.eval()(x), rtol=1e-10, atol=1e-12)
    if layer.decomposition == "tt" and layer.layout == "chain":
        # Oseledets 2011, Thm 2.2: the error is at most the discarded singular values of the unfoldings
        discarded = 0.0
        for k in layer.gateable_bonds():
            s = torch.linalg.svdvals(full_before.reshape(math.prod(full_before.shape[:k]), -1))
            discarded += float((s[ranks[f"0.bond{k}"]:] ** 2).sum())
        assert float(((full_before - truncated) ** 2).sum()) <= discarded * (1 + 1e-9)


# ---------------------------------------------------------------------------- the rules


def test_energy_rule_on_a_hand_built_spectrum():
    spectrum = torch.tensor([3.0, 2.0, 1.0, 0.0])  # squares 9, 4, 1: shares 0.643, 0.929, 1
    assert energy_ranks([spectrum], 0.6) == [1]
    assert energy_ranks([spectrum], 0.9) == [2]
    assert energy_ranks([spectrum], 0.95) == [3]
    assert energy_ranks([spectrum], 1.0) == [3]  # the zero is never kept
    assert energy_ranks([spectrum], 0.0) == [1]
    assert energy_ranks([torch.zeros(4)], 0.99) == [1]  # a dead bond keeps one slice
    assert energy_ranks([torch.tensor([1.0, 1e-20])], 1.0, rtol=1e-12) == [1]  # below rtol: zero


def test_target_rule_on_hand_built_spectra_keeps_the_longest_prefix_that_meets_the_target():
    spectra = [torch.tensor([4.0, 3.0, 0.0]), torch.tensor([1.0, 0.9, 0.1])]
    # σ/‖σ‖: bond 0 [0.8, 0.6], bond 1 [0.74, 0.67, 0.074]: after the first slices, 1.1, 0.2, 1.2
    assert target_order(spectra) == [1, 0, 1]

    def compression(ranks):  # 100 dense parameters; a slice of bond 0 costs 10, of bond 1 costs 5
        return 100 / (10 * ranks[0] + 5 * ranks[1])

    assert target_ranks(spectra, compression, 100 / 15) == ([1, 1], True)
    assert target_ranks(spectra, compression, 100 / 20) == ([1, 2], True)
    assert target_ranks(spectra, compression, 100 / 29) == ([1, 2], True)  # the next slice would cost 10 more
    assert target_ranks(spectra, compression, 100 / 30) == ([2, 2], True)
    assert target_ranks(spectra, compression, 1.0) == ([2, 3], True)  # everything but the zero
    assert target_ranks(spectra, compression, 10.0) == ([1, 1], False)  # unreachable: rank 1 everywhere


def test_target_compression_is_met_on_mlp2_by_the_least_truncation():
    config = make_config(REGISTRY, "mlp2", "svd_posthoc", {"initial_rank": 8, "target_compression": 150.0})
    task = REGISTRY.task("mlp2")(config.task_params)
    svd = REGISTRY.method("svd_posthoc")(config.method_params)
    model = build_model(task, svd, 0, CPU)
    dense = count_parameters(task.dense_model())
    assert dense / count_parameters(model) < 150.0
    cores = {name: current_cores(layer) for name, layer in (("fc1", model.fc1), ("fc2", model.fc2))}
    names = [n for n in svd.selectors]
    spectra = [bond_spectrum(cores[n.split(".")[0]], int(n.split("bond")[1])) for n in names]
    ranks = svd.truncate(model, dense)
    assert svd.target_met
    assert dense / count_parameters(model) >= 150.0  # counted by rankbench, not by the method
    # the least truncation: the kept ranks are a prefix of the rule's order, and its next slice misses the target
    kept = [ranks[n] for n in names]
    order = target_order(spectra, rtol=100 * torch.finfo(torch.float32).eps)
    prefix = sum(kept) - len(kept)
    assert [1 + order[:prefix].count(b) for b in range(len(names))] == kept
    nxt = order[prefix]
    layer = model.fc1 if names[nxt].startswith("fc1") else model.fc2
    bigger = list(layer.eval_ranks())
    bigger[int(names[nxt].split("bond")[1])] += 1
    other = count_parameters(model) - layer.parameter_count()
    assert dense / (other + layer.parameter_count(bigger)) < 150.0


def test_fine_tuning_keeps_truncated_slices_out():
    torch.manual_seed(5)
    model = nn.Sequential(TensorizedLinear(60, 12, (3, 4, 5), (3, 4), 6, "tr").double())
    svd = method(energy=0.7)
    svd.attach(model, CPU)
    ranks = svd.truncate(model)
    masks = {n: s.mask.clone() for n, s in svd.selectors.items()}
    assert all(isinstance(s, TruncationMask) for s in svd.selectors.values())
    assert any(int((m == 0).sum()) > 0 for m in masks.values())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = inputs(model[0], 16), torch.randint(0, 12, (16,))
    for _ in range(5):
        model.train()
        optimizer.zero_grad()
        svd.loss(model, (x, y), F.cross_entropy).total.backward()
        optimizer.step()
    for name, selector in svd.selectors.items():
        assert torch.equal(selector.eval().deterministic(), masks[name])
    assert {f"0.bond{k}": r for k, r in enumerate(learned_ranks(model)["0"])} == ranks
    with torch.no_grad():
        torch.testing.assert_close(prune_model(model)(x), model.eval()(x), rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------- schedule, state, runs


def test_truncation_epoch_and_its_clamp():
    assert method().truncate_after(300) == 270  # a tenth, rounded up, fine-tunes
    assert method().truncate_after(30) == 27
    assert method().truncate_after(2) == 1
    assert method().truncate_after(1) == 1  # the whole run would fine-tune: truncate after the last epoch
    assert method(finetune_epochs=5).truncate_after(3) == 3
    assert method(finetune_epochs=0).truncate_after(10) == 10
    assert method(finetune_epochs=4).truncate_after(10) == 6


def test_a_trainer_that_never_gives_the_epochs_is_a_clear_error():
    model = nn.Sequential(TensorizedLinear(60, 12, (3, 4, 5), (3, 4), 3, "tr"))
    svd = method()
    svd.attach(model, CPU)
    with pytest.raises(RankbenchError, match="on_train_begin"):
        svd.on_epoch_end(model, 1, {"compression": 2.0})


def test_the_knob_is_the_target_itself():
    cls = REGISTRY.method("svd_posthoc")
    knob = cls.compression_knob
    assert (knob.name, knob.increases_compression, knob.found_by) == ("target_compression", True, "target")
    search = cls.hyperparameters["target_compression"].search
    assert search.log and 1.0 < search.low < search.high


def tiny_splits(n_train: int = 64) -> DataSplits:
    generator = torch.Generator().manual_seed(0)

    def split(n):
        return Split(torch.randn(n, 1, 28, 28, generator=generator), torch.randint(0, 10, (n,), generator=generator))

    return DataSplits("tiny", "random", split(n_train), split(16), split(16), 10)


@needs_epochs_hook
def test_state_round_trip_resumes_exactly_before_and_after_the_truncation():
    config = make_config(REGISTRY, "mlp2", "svd_posthoc",
                         {"initial_rank": 4, "batch_size": 32, "target_compression": 300.0, "finetune_epochs": 1})
    task = REGISTRY.task("mlp2")(config.task_params)
    data = tiny_splits()
    dense = count_parameters(task.dense_model())

    def run(resume=None):
        svd = REGISTRY.method("svd_posthoc")(config.method_params)
        model = build_model(task, svd, 0, CPU)
        checkpoints = []
        fit(model, svd, task, data, epochs=3, seed=0, device=torch.device("cpu"), dense_parameters=dense,
            resume=resume, on_checkpoint=lambda c: checkpoints.append(copy.deepcopy(c)))  # Adam's state is live
        return model, svd, checkpoints

    model, svd, checkpoints = run()
    assert svd.truncated and svd.truncation_epoch == 2 and svd.target_met
    assert [c.method["truncated"] for c in checkpoints] == [False, True, True]
    assert dense / count_parameters(model) >= 300.0
    for checkpoint in checkpoints[:2]:
        resumed, resumed_svd, _ = run(resume=checkpoint)
        assert resumed_svd.state_dict() == svd.state_dict()
        state, expected = resumed.state_dict(), model.state_dict()
        assert state.keys() == expected.keys()
        assert all(torch.equal(state[k], expected[k]) for k in expected), checkpoint.epoch


@needs_epochs_hook
def test_a_short_cli_run_meets_its_target_compression(tmp_path, uri):
    from mlflow.tracking import MlflowClient

    data_dir = make_tiny_mnist(tmp_path / "data")
    rc = main(["run", "--task", "mlp2", "--method", "svd_posthoc", "--set", "target_compression=40", "--epochs", "2",
               "--set", "finetune_epochs=1", "--seeds", "0", "--tracking-uri", uri, "--no-progress",
               "--data-dir", str(data_dir), "--set", "val_size=40"])
    assert rc == 0
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["compression"] >= 40.0
    history = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "compression"),
                                       key=lambda m: m.step)]
    assert history[0] < 40.0 <= history[-1]  # full rank through epoch 1, truncated at its end
