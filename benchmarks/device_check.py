"""Check that rankbench trains on a device (CUDA) as on the CPU, and time it.

    python benchmarks/device_check.py [--device cuda] [--epochs 3] [--dataset fashion-mnist --data-dir DIR]
                                      [--compile off,on]

1. Tensorized layers give the same outputs (float64) on the device as on the CPU.
2. dense, trn (rank 25) and ours (rank 25) train LeNet-5 for a few epochs on the device with
   rankbench's own training loop (``trainer.fit``, as ``rankbench run`` does, without tracking),
   eager and/or ``torch.compile``'d; prints validation accuracy, compression, the median train
   seconds per batch and epochs per second, with ratios to dense measured in this run. The data
   is the embedded digits, or with ``--dataset fashion-mnist`` the full 60k/10k files.
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import time
from pathlib import Path

import torch
from tabulate import tabulate

from rankbench.layers.tensorized import TensorRingConv2d, TensorRingLinear
from rankbench.plugins.method import MethodContext
from rankbench.plugins.registry import Registry
from rankbench.run import trainer
from rankbench.run.config import make_config, resolve_device
from rankbench.run.prepare import build_model
from rankbench.run.trainer import fit


@torch.no_grad()
def layers_agree(device: torch.device) -> list[list]:
    rows = []
    torch.manual_seed(0)
    for strategy in ("weight", "input"):
        layer = TensorRingLinear(1250, 320, (5, 5, 5, 10), (5, 8, 8), 25, strategy=strategy).double()
        x = torch.randn(64, 1250, dtype=torch.float64)
        cpu = layer(x)
        dev = layer.to(device)(x.to(device)).cpu()
        rows.append([f"TR linear FC1 ({strategy})", float((cpu - dev).abs().max())])
    conv = TensorRingConv2d(20, 50, 5, (4, 5), (5, 10), 25).double()
    x = torch.randn(8, 20, 12, 12, dtype=torch.float64)
    cpu = conv(x)
    dev = conv.to(device)(x.to(device)).cpu()
    rows.append(["TR conv CONV2", float((cpu - dev).abs().max())])
    return rows


def train_rows(device: torch.device, epochs: int, dataset: str | None, data_dir: Path | None,
               compile_choices: list[str]) -> list[list]:
    registry = Registry.discover()
    rows = []
    data = None
    for compiled in compile_choices:
        dense_step = None
        for method, params in (("dense", {}), ("trn", {"rank": 25}), ("ours", {})):
            extra = {"dataset": dataset} if dataset else {}
            config = make_config(registry, "lenet5", method, {"epochs": epochs, **params, **extra})
            task = registry.task("lenet5")(config.task_params)
            data = data or task.load_data(data_dir, False)
            m = registry.method(method)(config.method_params)
            model = build_model(task, m, 0, MethodContext(len(data.train), device))
            start = time.perf_counter()
            result = fit(model, m, task, data, epochs=epochs, seed=0, device=device, dense_parameters=429_100,
                         compile=compiled == "on")
            wall = time.perf_counter() - start
            later = result.history[1:] or result.history  # epoch 1 includes compiling
            step = statistics.median(h["train_seconds_per_batch"] for h in later)
            dense_step = dense_step or step
            last = result.history[-1]
            rows.append([method, compiled, data.name, f"{last['val_accuracy']:.1f}", f"{last['compression']:.2f}x",
                         f"{step:.5f}", f"{step / dense_step:.2f}x", f"{wall:.1f}",
                         f"{1.0 / (step * math.ceil(len(data.train) / task.params['batch_size'])):.2f}"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--dataset", default=None, help="lenet5 dataset (default: the embedded digits)")
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--compile", default="off", help="comma-separated: off, on (both: side by side)")
    parser.add_argument("--compile-backend", default=None, help="instead of rankbench's (aot_eager: a CPU rehearsal)")
    args = parser.parse_args()
    if args.compile_backend is not None:  # fit compiles with trainer.compile_options(device)
        trainer.compile_options = functools.partial(trainer.compile_options, backend=args.compile_backend)
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device {device} ({name}), torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(tabulate(layers_agree(device), headers=["layer", "max |cpu - device| (float64)"]))
    print()
    print(tabulate(train_rows(device, args.epochs, args.dataset, args.data_dir, args.compile.split(",")),
                   headers=["method", "compile", "data", "val acc %", "compression", "train s/batch (median)",
                            "vs dense", "wall s", "train epochs/s (steps only)"]))


if __name__ == "__main__":
    main()
