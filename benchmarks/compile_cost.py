"""What compiling one ResNet-32 training step costs: seconds to the first compiled step and the graphs' sizes.

    python benchmarks/compile_cost.py [--task resnet32] [--methods dense,trn,ours] [--device cpu|cuda]
                                      [--backend aot_eager|inductor] [--batch 32]

Compile time grows with the traced graphs (Dynamo's, and AOTAutograd's forward and backward), which
grow with the aten ops a step runs. ``--backend aot_eager`` (the default on a CPU) traces without
generating code, so its node counts are exact and its seconds are a lower bound; on a GPU the
default is the training path's own, CUDA graphs through inductor (``compile_options``), whose target
is ResNet-32 compiled in at most 60 s.
"""

from __future__ import annotations

import argparse
import time

import torch
from functorch.compile import make_boxed_func
from tabulate import tabulate
from torch._dynamo.backends.common import aot_autograd

from rankbench.plugins.method import MethodContext
from rankbench.plugins.registry import Registry
from rankbench.run.config import make_config, resolve_device
from rankbench.run.prepare import build_model
from rankbench.run.trainer import batch_trainer, compile_module, compile_options


def counting_backend(nodes: list[int]):
    """aot_eager that records the node counts of Dynamo's graph and AOTAutograd's forward and backward."""
    def keep(graph, _):
        nodes.append(len(graph.graph.nodes))
        return make_boxed_func(graph)

    def backend(gm, example_inputs):
        nodes.append(len(gm.graph.nodes))
        return aot_autograd(fw_compiler=keep, bw_compiler=keep)(gm, example_inputs)
    return backend


def measure(registry: Registry, task_name: str, method_name: str, device: torch.device, backend: str | None,
            batch: int) -> list:
    config = make_config(registry, task_name, method_name, {})
    task = registry.task(task_name)(config.task_params)
    method = registry.method(method_name)(config.method_params)
    model = build_model(task, method, 0, MethodContext(1000, device)).train()
    generator = torch.Generator().manual_seed(0)
    x = task.example_input(batch, generator).to(device)
    y = torch.randint(0, 10, (batch,), generator=generator).to(device)
    model(x)  # plans made eagerly, as compiled_model's warm-up does
    nodes: list[int] = []
    options = {"backend": counting_backend(nodes)} if backend == "aot_eager" else compile_options(device, backend)
    torch.compiler.reset()
    compiled = compile_module(model, **options)
    trainer = batch_trainer(model, method, task, x, y, device, runner=compiled)
    start = time.perf_counter()
    trainer.forward_backward(x, y)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    graphs = len(nodes) // 3 if nodes else "-"
    counts = "/".join(str(n) for n in nodes) if nodes else "-"
    return [method_name, f"{seconds:.1f}", graphs, counts]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--task", default="resnet32")
    parser.add_argument("--methods", default="dense,trn,ours")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", default=None, help="aot_eager (default on a CPU) or inductor (default on CUDA)")
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    device = resolve_device(args.device)
    backend = args.backend or ("aot_eager" if device.type == "cpu" else None)
    registry = Registry.discover()
    print(f"device {device}, torch {torch.__version__}, backend {backend or 'the training default'}, "
          f"task {args.task}, batch {args.batch}")
    rows = [measure(registry, args.task, m.strip(), device, backend, args.batch) for m in args.methods.split(",")]
    print(tabulate(rows, headers=["method", "first compiled step s", "graphs", "nodes (dynamo/forward/backward)"]))
    if args.task == "resnet32" and device.type == "cuda" and backend is None:
        worst = max(float(r[1]) for r in rows)
        print(f"target: ResNet-32 compiled in <= 60 s: {worst:.1f} s {'PASS' if worst <= 60 else 'MISS'}")


if __name__ == "__main__":
    main()
