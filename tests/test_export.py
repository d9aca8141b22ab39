"""Export: the pruned model of a tracked run equals the gated model's eval outputs."""

import json

import pytest
import torch
from torch import nn

from rankbench.cli import main
from rankbench.export import export, export_run, materialise, rebuild
from rankbench.layers.tensorized import TensorizedLinear, count_parameters, selectors, tensorized_layers
from rankbench.plugins.method import MethodContext
from rankbench.plugins.registry import Registry
from rankbench.run.config import make_config
from rankbench.run.experiment import run
from rankbench.run.prepare import build_model, prepare

REGISTRY = Registry.discover(entry_point_groups=False)




@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    folder = tmp_path_factory.mktemp("export")
    uri = f"sqlite:///{folder / 'm.db'}"
    config = make_config(REGISTRY, "mlp2", "ours", {"epochs": 2, "lambda": 5.0}, tracking_uri=uri, progress=False,
                         contraction="input")
    (result,) = run(prepare(config, REGISTRY))
    return uri, result, folder


def test_run_records_the_contraction_choice(tracked):
    from mlflow.tracking import MlflowClient

    uri, result, _ = tracked
    params = MlflowClient(uri).get_run(result.run_id).data.params
    assert json.loads(params["contraction"]) == {"fc1": "input", "fc2": "input"}


def test_rebuilt_model_has_the_trained_ranks(tracked):
    uri, result, _ = tracked
    model, task = rebuild(result.run_id, REGISTRY, uri)
    assert task.name == "mlp2"
    assert count_parameters(model) == result.parameters
    assert [s.rank() for s in selectors(model)] == [r for rs in result.ranks.values() for r in rs[1:]]


@pytest.mark.parametrize("materialised", [False, True])
def test_export_run_equals_gated_outputs_and_counts(tracked, materialised):
    uri, result, folder = tracked
    out = folder / f"model-{materialised}.pt"
    exported = export_run(result.run_id, out, REGISTRY, uri, materialised=materialised)
    assert exported.parameters == result.parameters
    assert exported.ranks == result.ranks
    assert exported.max_abs_difference < 1e-5
    saved = torch.load(out, weights_only=False)
    model, _ = rebuild(result.run_id, REGISTRY, uri)
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(saved["model"].eval()(x), model(x), rtol=1e-5, atol=1e-5)
    assert not list(selectors(saved["model"]))
    if materialised:
        assert not list(tensorized_layers(saved["model"]))
    else:
        assert sum(p.numel() for p in saved["model"].parameters()) == result.parameters


def test_export_of_gated_lenet5_with_closed_slices():
    torch.manual_seed(0)
    config = make_config(REGISTRY, "lenet5", "ours")
    task = REGISTRY.task("lenet5")(config.task_params)
    method = REGISTRY.method("ours")(config.method_params)
    model = build_model(task, method, 0, MethodContext(10, torch.device("cpu")))
    with torch.no_grad():
        for gate in method.gates(model):
            gate.mu.copy_(torch.randn_like(gate.mu) - 1.0)
    x = task.example_input(4)
    exported = export(model, x)
    assert exported.max_abs_difference < 1e-5
    assert exported.parameters == count_parameters(model) < 101_025
    dense = export(model, x, materialised=True)
    assert dense.max_abs_difference < 1e-5
    assert isinstance(materialise(exported.model).fc1, torch.nn.Linear)


def test_cli_export(tracked, capsys):
    uri, result, folder = tracked
    out = folder / "cli.pt"
    assert main(["export", result.run_id, "--out", str(out), "--tracking-uri", uri]) == 0
    assert out.exists() and f"{result.parameters} parameters" in capsys.readouterr().out
    assert main(["export", "nope", "--out", str(out), "--tracking-uri", uri]) == 2
    assert "no run 'nope'" in capsys.readouterr().err


def test_contraction_option_sets_the_layer_strategy():
    config = make_config(REGISTRY, "mlp2", "trn", {"rank": 4})
    task = REGISTRY.task("mlp2")(config.task_params)
    method = REGISTRY.method("trn")(config.method_params)
    model = build_model(task, method, 0, MethodContext(10, torch.device("cpu")), contraction="weight")
    linears = [layer for _, layer in tensorized_layers(model) if isinstance(layer, TensorizedLinear)]
    assert {layer.strategy for layer in linears} == {"weight"}


def test_materialise_turns_a_tensorized_embedding_into_nn_embedding():
    from rankbench.layers.tensorized import TensorRingEmbedding

    torch.manual_seed(0)
    model = nn.Sequential(TensorRingEmbedding(60, 12, (3, 4, 5), (2, 2, 3), 4)).eval()
    indices = torch.randint(0, 60, (7, 5))
    with torch.no_grad():
        expected = model(indices)
        plain = materialise(model)
        assert isinstance(plain[0], nn.Embedding) and plain[0].weight.shape == (60, 12)
        torch.testing.assert_close(plain(indices), expected, rtol=0, atol=1e-6)
