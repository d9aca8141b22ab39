"""MARS's 2FC-Net: a two-layer MLP on MNIST-family digits, as a TT-matrix network."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor, nn

from rankbench.plugin import (
    DataSplits,
    Hyper,
    Recipe,
    Task,
    TensorizedLinear,
    load_mnist_family_from,
    mnist_family_hyperparameters,
)


class TwoLayerMLP(nn.Module):
    """784 → 625, ReLU, 625 → 10."""

    def __init__(self, fc1: nn.Module, fc2: nn.Module) -> None:
        super().__init__()
        self.fc1, self.fc2 = fc1, fc2

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


class Mlp2Task(Task):
    """MARS's 2FC-Net: 784→625 as TT-matrix (7,4,7,4)×(5,5,5,5) with TT ranks
    [1,20,20,20,1], ReLU, 625→10 as (25,25)×(5,2) with ranks [1,20,1]. Recipe:
    Adam 1e-2, ExponentialLR(0.99) per epoch, 300 epochs, batch 128."""

    name: ClassVar[str] = "mlp2"
    description: ClassVar[str] = "2-layer MLP (MARS 2FC-Net, 496,885 params) on MNIST-family digits, TT-matrix"
    recipe_keys: ClassVar[tuple[str, ...]] = ("epochs", "batch_size", "lr", "lr_decay")
    recipes: ClassVar[dict[str, Recipe]] = {"embedded": Recipe(
        on_embedded_data=True, why="4,000 training digits give 32 steps per epoch instead of ~470 on full MNIST")}
    input_shape: ClassVar[tuple[int, ...]] = (1, 28, 28)
    hyperparameters: ClassVar[dict[str, Hyper]] = {
        **mnist_family_hyperparameters(),
        "epochs": Hyper(300, "training epochs", minimum=1),
        "batch_size": Hyper(128, "batch size", minimum=1),
        "lr": Hyper(1e-2, "Adam learning rate", minimum=0.0),
        "lr_decay": Hyper(0.99, "ExponentialLR factor per epoch", minimum=0.0, maximum=1.0),
        "initial_rank": Hyper(20, "initial rank of every inner bond (trn sets its own)", minimum=1),
        "decomposition": Hyper("tt", "tensor train (TT-matrix) or tensor ring", choices=("tt", "tr")),
    }

    def load_data(self, data_dir: Path | None, download: bool) -> DataSplits:
        return load_mnist_family_from(self.params, data_dir, download)

    def dense_model(self) -> nn.Module:
        return TwoLayerMLP(nn.Linear(784, 625), nn.Linear(625, 10))

    def tensorized_model(self, rank: int) -> nn.Module:
        d = self.params["decomposition"]
        return TwoLayerMLP(
            TensorizedLinear(784, 625, (7, 4, 7, 4), (5, 5, 5, 5), rank, d, name="fc1", layout="matrix"),
            TensorizedLinear(625, 10, (25, 25), (5, 2), rank, d, name="fc2", layout="matrix"),
        )

    def scheduler(self, optimizer, epochs: int):
        return torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=self.params["lr_decay"])
