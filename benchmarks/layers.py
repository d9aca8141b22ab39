"""Tensorized layers vs their dense twins, per contraction strategy, measured side by side.

    python benchmarks/layers.py [--device cpu|cuda] [--batches 1,32,128,512] [--min-time 0.2]

For each layer (the paper's shapes) and batch size: median time of forward+backward
(training) and of eval-mode inference, for the dense layer and for each contraction
strategy rankbench has, the ratio to dense, and the strategy ``auto`` picks.
"""

from __future__ import annotations

import argparse

import torch
from tabulate import tabulate
from torch import nn
from torch.utils import benchmark

from rankbench.layers.tensorized import TensorizedConv2d, TensorizedEmbedding, TensorizedLinear
from rankbench.run.config import resolve_device

# name, tensorized factory, dense factory, input shape without the batch dimension
LAYERS = [
    ("LeNet-5 FC1 TR r10", lambda: TensorizedLinear(1250, 320, (5, 5, 5, 10), (5, 8, 8), 10),
     lambda: nn.Linear(1250, 320), (1250,)),
    ("LeNet-5 FC1 TR r25", lambda: TensorizedLinear(1250, 320, (5, 5, 5, 10), (5, 8, 8), 25),
     lambda: nn.Linear(1250, 320), (1250,)),
    ("2FC-Net FC1 TT-matrix r20",
     lambda: TensorizedLinear(784, 625, (7, 4, 7, 4), (5, 5, 5, 5), [1, 20, 20, 20, 1], "tt", layout="matrix"),
     lambda: nn.Linear(784, 625), (784,)),
    ("LeNet-5 CONV2 TR r10", lambda: TensorizedConv2d(20, 50, 5, (4, 5), (5, 10), 10),
     lambda: nn.Conv2d(20, 50, 5), (20, 14, 14)),
    ("LeNet-5 CONV2 TR r25", lambda: TensorizedConv2d(20, 50, 5, (4, 5), (5, 10), 25),
     lambda: nn.Conv2d(20, 50, 5), (20, 14, 14)),
    ("ResNet-32 stage-3 conv TR r10", lambda: TensorizedConv2d(64, 64, 3, (4, 4, 4), (4, 4, 4), 10, padding=1),
     lambda: nn.Conv2d(64, 64, 3, padding=1), (64, 8, 8)),
    ("ResNet-32 stage-3 conv TR r15", lambda: TensorizedConv2d(64, 64, 3, (4, 4, 4), (4, 4, 4), 15, padding=1),
     lambda: nn.Conv2d(64, 64, 3, padding=1), (64, 8, 8)),
    ("embedding 32768x512 TR r16", lambda: TensorizedEmbedding(32768, 512, (32, 32, 32), (8, 8, 8), 16),
     lambda: nn.Embedding(32768, 512), "tokens"),
]


def median(fn, min_time: float) -> float:
    fn()
    return benchmark.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_time).median


def train_step(layer: nn.Module, x: torch.Tensor):
    def step():
        layer.zero_grad(set_to_none=True)
        layer(x).pow(2).sum().backward()
    return step


def inference(layer: nn.Module, x: torch.Tensor):
    def infer():
        with torch.no_grad():
            layer(x)
    return infer


def sync(device: torch.device, fn):
    if device.type != "cuda":
        return fn

    def wrapped():
        fn()
        torch.cuda.synchronize(device)
    return wrapped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batches", default="1,32,128,512")
    parser.add_argument("--min-time", type=float, default=0.2)
    args = parser.parse_args()
    device = resolve_device(args.device)
    batches = [int(b) for b in args.batches.split(",")]
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}; times are medians in ms")
    rows = []
    for name, make_tensorized, make_dense, shape in LAYERS:
        for batch in batches:
            torch.manual_seed(0)
            x = (torch.randint(0, 32768, (batch,), device=device) if shape == "tokens"
                 else torch.randn(batch, *shape, device=device))
            dense = make_dense().to(device)
            layer = make_tensorized().to(device)
            dense_train = median(sync(device, train_step(dense.train(), x)), args.min_time)
            dense_infer = median(sync(device, inference(dense.eval(), x)), args.min_time)
            choosing = isinstance(layer, (TensorizedLinear, TensorizedEmbedding))
            strategies = (["weight", "input"] if isinstance(layer, TensorizedLinear)
                          else ["weight", "gather"] if isinstance(layer, TensorizedEmbedding) else ["weight"])
            auto = layer.choose_strategy(batch) if choosing else "weight"
            for strategy in strategies:
                if choosing:
                    layer.strategy = strategy
                train = median(sync(device, train_step(layer.train(), x)), args.min_time)
                infer = median(sync(device, inference(layer.eval(), x)), args.min_time)
                rows.append([name, batch, strategy + (" (auto)" if strategy == auto else ""),
                             f"{dense_train * 1e3:.3f}", f"{train * 1e3:.3f}", f"{train / dense_train:.2f}x",
                             f"{dense_infer * 1e3:.3f}", f"{infer * 1e3:.3f}", f"{infer / dense_infer:.2f}x"])
    print(tabulate(rows, headers=["layer", "batch", "strategy", "dense fwd+bwd", "tensorized fwd+bwd", "ratio",
                                  "dense infer", "tensorized infer (cached W)", "ratio"]))


if __name__ == "__main__":
    main()
