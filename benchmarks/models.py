"""Whole models, measured side by side: training step and test-set inference as ratios to dense.

    python benchmarks/models.py [--device cpu|cuda] [--task lenet5,resnet32] [--batch 128] [--test-size N] [--compile]

Models per task: dense, trn (uniform at the task's initial rank: 25 on LeNet-5, 15 on
ResNet-32), ours (that rank with its Gaussian gates, the
penalty included in the step; its inference is measured after 70% of its slices
were closed, as training with λ does) and that model exported (pruned), also
materialised as plain dense layers (its compression is the pruned model's). A training step is
forward + method loss + backward + the task's optimizer step. Inference is one eval-mode pass
over ``test-size`` inputs at the task's batch size, after a warm-up pass.
With ``--compile`` every model also runs through ``torch.compile`` (CUDA graphs on a GPU, as
``rankbench run --compile on`` trains), in the same interleaved rounds, and the GPU targets are
checked on the compiled rows against the compiled dense model (ours ≤ 1.5x dense on ResNet-32,
≤ 2x on LeNet-5; trn ≤ 1.15x / 1.3x; exported inference ≤ 1.05x).
The targets are checked at the end; a missed target is printed as MISS.
"""

from __future__ import annotations

import argparse
import time

import torch
from tabulate import tabulate

from rankbench.export import materialise
from rankbench.layers.tensorized import count_parameters, prune_model
from rankbench.plugins.method import MethodContext
from rankbench.plugins.registry import Registry
from rankbench.run.config import make_config, resolve_device
from rankbench.run.prepare import build_model
from rankbench.run.trainer import batch_trainer, compile_module, compile_options

COMPILED_TARGETS = {"resnet32": (1.5, 1.15, 1.05), "lenet5": (2.0, 1.3, 1.05)}
"""Per task: compiled ours step / compiled dense step, compiled trn / compiled dense, compiled exported
inference / compiled dense inference (the GPU issue's targets)."""


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(built: dict, x, y, device, steps: int, rounds: int = 5) -> dict[str, float]:
    """Median training step per model; rounds visit the models in turn (interleaved), each
    round runs ``steps // rounds`` steps per model after warm-up steps."""
    runners = {}
    for label, (model, method, task) in built.items():
        trainer = batch_trainer(getattr(model, "_orig_mod", model), method, task, x, y, device, runner=model)
        model.train()

        def one_step(trainer=trainer) -> float:
            sync(device)
            start = time.perf_counter()
            trainer.train_step(x, y)
            sync(device)
            return time.perf_counter() - start

        runners[label] = one_step
        for _ in range(3):
            one_step()
    times: dict[str, list[float]] = {label: [] for label in built}
    for _ in range(rounds):
        for label, one_step in runners.items():
            times[label] += [one_step() for _ in range(max(1, steps // rounds))]
    return {label: sorted(values)[len(values) // 2] for label, values in times.items()}


@torch.no_grad()
def time_inference(models: dict, inputs: torch.Tensor, batch: int, device, rounds: int = 5) -> dict[str, float]:
    """Best pass per model over ``rounds`` rounds that visit the models in turn (interleaved,
    so clock and load changes hit every model alike)."""
    best = {label: float("inf") for label in models}
    for model in models.values():
        model.eval()
        for i in range(0, len(inputs), batch):  # warm-up, fills the eval weight caches
            model(inputs[i:i + batch])
    for _ in range(rounds):
        for label, model in models.items():
            sync(device)
            start = time.perf_counter()
            for i in range(0, len(inputs), batch):
                model(inputs[i:i + batch])
            sync(device)
            best[label] = min(best[label], time.perf_counter() - start)
    return best


CPU_TEST_SIZE = {"resnet32": 1000, "resnet110": 500}
"""Smaller default test sets on a CPU, where one pass of a ResNet over 10,000 images takes minutes."""


def bench_task(registry: Registry, task_name: str, device: torch.device, batch: int, steps: int,
               test_size: int | None, compiled: dict | None = None) -> None:
    """Print one task's table of steps and inference times, and its targets."""
    rank = make_config(registry, task_name, "dense", {}).task_params["initial_rank"]
    if test_size is None:
        test_size = 10000 if device.type == "cuda" else CPU_TEST_SIZE.get(task_name, 10000)
    print(f"\ntask {task_name}, batch {batch}, rank {rank}, test inputs {test_size}")
    context = MethodContext(num_train=50000, device=device)
    trn_label, gated_label = f"trn r{rank}", f"ours r{rank} (gated)"
    built = {}
    for label, method_name, params in (("dense", "dense", {}), (trn_label, "trn", {"rank": rank}),
                                       (gated_label, "ours", {})):
        config = make_config(registry, task_name, method_name, params)
        task = registry.task(task_name)(config.task_params)
        method = registry.method(method_name)(config.method_params)
        built[label] = (build_model(task, method, 0, context), method, task)
    gated, method, task = built[gated_label]
    x = task.example_input(batch).to(device)
    y = torch.randint(0, 10, (batch,), device=device)
    inputs = task.example_input(test_size).to(device)
    dense_params = count_parameters(built["dense"][0])
    rows = []
    if compiled is not None:  # after the eager rows in each round, so every contraction is planned before tracing
        # three models share each forward's code: room for their train, eval and batch-shape graphs
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        built.update({f"{label} compiled": (compile_module(model, **compiled), m, t)
                      for label, (model, m, t) in list(built.items())})
    step = time_steps(built, x, y, device, steps)
    torch.manual_seed(1)
    with torch.no_grad():  # close ~70% of the slices, as training with λ does
        for gate in method.gates(gated):
            gate.mu.copy_(torch.where(torch.rand_like(gate.mu) < 0.7, -2.0, 0.0))
    exported = prune_model(gated.eval()).to(device)
    materialised = materialise(prune_model(gated.eval())).to(device)
    # compiled inference only where a target reads it (dense and the export): each graph costs compile time
    models = {k: v[0] for k, v in built.items() if not k.endswith(" compiled") or k == "dense compiled"}
    models.update({"ours exported (pruned)": exported, "ours exported, materialised": materialised})
    if compiled is not None:
        models["ours exported (pruned) compiled"] = compile_module(exported, **compiled)
    infer = time_inference(models, inputs, batch, device)
    for label, model in [*models.items(), *((k, v[0]) for k, v in built.items() if k not in models)]:
        plain = getattr(model, "_orig_mod", model)
        params = count_parameters(exported if plain is materialised else plain)
        rows.append([label, params, f"{dense_params / params:.2f}x",
                     f"{step[label] * 1e3:.2f}" if label in step else "-",
                     f"{step[label] / step['dense']:.2f}x" if label in step else "-",
                     f"{infer[label]:.3f}" if label in infer else "-",
                     f"{infer[label] / infer['dense']:.2f}x" if label in infer else "-"])
    print(tabulate(rows, headers=["model", "params", "compression", "train step ms", "vs dense",
                                  f"inference s ({test_size} inputs)", "vs dense"]))
    targets = [
        ("gated training step <= 1.5x dense", step[gated_label] / step["dense"], 1.5),
        ("gated training step <= 1.15x same-rank trn", step[gated_label] / step[trn_label], 1.15),
        ("exported inference <= 1.05x dense", infer["ours exported (pruned)"] / infer["dense"], 1.05),
        ("exported, materialised, inference <= 1.05x dense", infer["ours exported, materialised"] / infer["dense"],
         1.05),
    ]
    if compiled is not None and task_name in COMPILED_TARGETS:
        ours_limit, trn_limit, infer_limit = COMPILED_TARGETS[task_name]
        targets += [
            (f"compiled gated step <= {ours_limit}x compiled dense",
             step[f"{gated_label} compiled"] / step["dense compiled"], ours_limit),
            (f"compiled trn step <= {trn_limit}x compiled dense",
             step[f"{trn_label} compiled"] / step["dense compiled"], trn_limit),
            (f"compiled exported inference <= {infer_limit}x compiled dense",
             infer["ours exported (pruned) compiled"] / infer["dense compiled"], infer_limit),
        ]
    print()
    print(tabulate([[name, f"{value:.2f}x", "PASS" if value <= limit else "MISS"] for name, value, limit in targets],
                   headers=[f"target ({task_name})", "measured", ""]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--task", default="lenet5,resnet32", help="comma-separated task names")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--test-size", type=int, default=None,
                        help="inference inputs (default 10000; on a CPU 1000 for resnet32, 500 for resnet110)")
    parser.add_argument("--compile", action="store_true",
                        help="also time every model through torch.compile (CUDA graphs on a GPU)")
    parser.add_argument("--compile-backend", default=None,
                        help="torch.compile backend instead of rankbench's choice (aot_eager: a quick CPU check)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    registry = Registry.discover()
    print(f"device {device}{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    for task_name in args.task.split(","):
        bench_task(registry, task_name.strip(), device, args.batch, args.steps, args.test_size,
                   compile_options(device, args.compile_backend) if args.compile else None)


if __name__ == "__main__":
    main()
