"""``--compile``: training through ``torch.compile`` gives the eager run's numbers.

On a CPU the tests compile with the ``aot_eager`` backend (the traced graphs run with eager
kernels: the same numbers, bit for bit, and seconds instead of inductor's minute per graph);
what they check is rankbench's side: the warm-up that plans contractions outside the traced
code, one graph per batch shape, the random streams left as an eager run leaves them, and the
recorded ``compile`` param. A GPU run of the compiled path is ``benchmarks/gpu.sh``.
"""

from __future__ import annotations

import pytest
import torch

import rankbench.run.trainer
from helpers import assert_one_line_error, make_tiny_mnist
from rankbench.cli import main
from rankbench.run.tracking import Tracker

RUN = ["run", "--task", "mlp2", "--set", "val_size=40", "--set", "initial_rank=3", "--set", "batch_size=48",
       "--epochs", "2", "--no-progress", "--device", "cpu", "--threads", "1"]


@pytest.fixture
def aot_eager(monkeypatch):
    monkeypatch.setattr(rankbench.run.trainer, "compile_options", lambda device: {"backend": "aot_eager"})
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def outcome(uri: str) -> dict:
    tracker = Tracker(uri, create=False)
    (run,) = tracker.runs()
    history = {k: [(m.step, m.value) for m in tracker.metric_history(run.info.run_id, k)]
               for k in ("train_loss", "val_loss", "val_accuracy", "compression")}
    state = torch.load(tracker.download_artifact(run.info.run_id, "model/state_dict.pt"))
    return {"params": run.data.params, "history": history, "test": run.data.metrics["test_accuracy"],
            "state": {k: v.numpy().tobytes() for k, v in state.items()}}


@pytest.mark.parametrize("method", ["ours", "trn", "mars"])
def test_a_compiled_run_equals_the_eager_run_bit_for_bit(method, aot_eager, tmp_path, store_template, capsys):
    import shutil

    data = make_tiny_mnist(tmp_path / "data")  # 160 training images: batches of 48, 48, 48 and 16
    results = {}
    for choice in ("off", "on"):
        shutil.copyfile(store_template, tmp_path / f"{choice}.db")
        uri = f"sqlite:///{tmp_path / f'{choice}.db'}"
        assert main([*RUN, "--method", method, "--data-dir", str(data), "--tracking-uri", uri,
                     "--compile", choice]) == 0, capsys.readouterr().err
        results[choice] = outcome(uri)
    eager, compiled = results["off"], results["on"]
    assert eager["params"]["compile"] == "off" and compiled["params"]["compile"] == "on"
    assert compiled["history"] == eager["history"]
    assert compiled["test"] == eager["test"]
    assert compiled["state"] == eager["state"]


def test_auto_compiles_on_cuda_only(uri, tmp_path, capsys):
    data = make_tiny_mnist(tmp_path / "data")
    assert main([*RUN, "--method", "ours", "--epochs", "1", "--data-dir", str(data), "--tracking-uri", uri,
                 "--compile", "auto"]) == 0, capsys.readouterr().err
    (run,) = Tracker(uri, create=False).runs()
    assert run.data.params["compile"] == "off"  # a CPU: auto leaves it eager


@pytest.mark.parametrize("extra, words", [
    (["--method", "ours", "--compile", "maybe"], "--compile maybe"),
    (["--method", "ours", "--contraction", "bogus"], "invalid choice: 'bogus'"),  # argparse's own errors, too
    ([], "required: --method"),
])
def test_bad_command_lines_are_one_line_errors(extra, words, uri, capsys):
    assert main([*RUN, *extra]) == 2
    assert words in assert_one_line_error(capsys.readouterr().err)


def test_compiled_inference_of_an_exported_model_rebuilds_weights_in_the_graph_without_the_cache(aot_eager):
    """An exported (pruned) tensorized model, compiled: the same outputs as eager, and no layer ran its
    Python weight cache (the pointer-and-version check a CUDA graph cannot contain)."""
    from rankbench.layers.tensorized import prune_model, tensorized_layers
    from rankbench.plugins.method import MethodContext
    from rankbench.plugins.registry import Registry
    from rankbench.run.config import make_config
    from rankbench.run.prepare import build_model

    registry = Registry.discover()
    config = make_config(registry, "lenet5", "ours", {"initial_rank": 4})
    task = registry.task("lenet5")(config.task_params)
    model = build_model(task, registry.method("ours")(config.method_params), 0,
                        MethodContext(num_train=100, device=torch.device("cpu")))
    exported = prune_model(model.eval()).eval()
    x = task.example_input(8, torch.Generator().manual_seed(0))
    with torch.no_grad():
        eager = exported(x)
        for _, layer in tensorized_layers(exported):
            layer._weight_cache = None
        compiled = torch.compile(exported, backend="aot_eager")(x)
    assert torch.equal(compiled, eager)
    assert all(layer._weight_cache is None for _, layer in tensorized_layers(exported))


@pytest.mark.parametrize("method, passes", [("ours", 1), ("reinforce_l0", 2), ("mars", 1)])
def test_every_tensor_a_compiled_training_step_reads_from_a_module_keeps_its_address(method, passes, monkeypatch, uri,
                                                                                      tmp_path, capsys):
    """CUDA graphs (``--compile`` on a GPU) take the tensors a graph reads from modules (parameters,
    buffers, the gate values a method supplies) as static inputs and re-record the whole graph when
    one moves: on an H100 that made a compiled ``ours`` LeNet-5 step 3.6x slower than eager. Every
    step must find those tensors where the first step found them (REINFORCE-l0's M passes per step:
    the k-th pass where the first step's k-th pass did)."""
    addresses: dict[int, list[list[int]]] = {}

    def probe(gm: torch.fx.GraphModule, example_inputs: list) -> callable:
        graph = len(addresses)
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        static = [i for i, n in enumerate(placeholders)
                  if (n.meta.get("tensor_dict") or {}).get("_dynamo_static_input_type")]
        addresses[graph] = []

        def run(*args):
            if torch.is_grad_enabled():
                addresses[graph].append([args[i].data_ptr() for i in static])
            return gm(*args)
        return run

    monkeypatch.setattr(rankbench.run.trainer, "compile_options", lambda device: {"backend": probe})
    torch._dynamo.reset()
    data = make_tiny_mnist(tmp_path / "data")
    try:
        samples = ["--set", f"samples={passes}"] if method == "reinforce_l0" else []
        assert main([*RUN, "--method", method, *samples, "--data-dir", str(data), "--tracking-uri", uri,
                     "--compile", "on"]) == 0, capsys.readouterr().err
    finally:
        torch._dynamo.reset()
    training = [calls for calls in addresses.values() if calls]
    assert sum(len(calls) for calls in training) == 2 * 4 * passes  # 2 epochs of 4 batches (3 full, 1 partial)
    for calls in training:  # the k-th pass of every step finds them where the first step's k-th did
        assert calls[0], "the probe found no static inputs"
        assert all(call == calls[i % passes] for i, call in enumerate(calls))
