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
    pixel_normalisation,
)

NOTEBOOK = "mars-notebook"
"""The recipe of MARS's own 2FC-Net experiment (github.com/MaxBourdon/mars, notebooks/MNIST-2FC-*.ipynb)."""


class TwoLayerMLP(nn.Module):
    """784 → 625, ReLU, 625 → 10.

    ``pixels=(mean, std)`` first maps the normalised digits every MNIST loader gives back to
    their [0, 1] pixels p/255 (torchvision's ``ToTensor``, what MARS's notebooks feed): the pixels
    are 8-bit, so rounding to the 1/255 grid recovers them exactly. The data, and the input of
    every exported model, stay one format."""

    def __init__(self, fc1: nn.Module, fc2: nn.Module, pixels: tuple[float, float] | None = None) -> None:
        super().__init__()
        self.fc1, self.fc2 = fc1, fc2
        self.pixels = pixels

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(1)
        if self.pixels is not None:
            mean, std = self.pixels
            x = torch.round((x * std + mean) * 255.0) / 255.0
        return self.fc2(torch.relu(self.fc1(x)))


class Mlp2Task(Task):
    """MARS's 2FC-Net: 784→625 as TT-matrix (7,4,7,4)×(5,5,5,5) with TT ranks
    [1,20,20,20,1], ReLU, 625→10 as (25,25)×(5,2) with ranks [1,20,1]. Recipe:
    Adam 1e-2, ExponentialLR(0.99) per epoch, 300 epochs, batch 128.

    ``inputs``, ``init`` and ``bias_init`` choose between rankbench's set-up (normalised digits,
    cores at the dense layer's variance 1/(3·fan_in), biases U(±1/√fan_in), as every rankbench
    task) and the MARS authors' (the ``mars-notebook`` recipe: [0, 1] pixels, tt-pytorch's
    Glorot cores 2/(in+out), biases 1e-3·N(0, 1)); the dense model follows the same keys
    (Glorot: ``xavier_normal_``)."""

    name: ClassVar[str] = "mlp2"
    description: ClassVar[str] = "2-layer MLP (MARS 2FC-Net, 496,885 params) on MNIST-family digits, TT-matrix"
    recipe_keys: ClassVar[tuple[str, ...]] = ("epochs", "batch_size", "lr", "lr_decay", "inputs", "init",
                                              "bias_init")
    recipes: ClassVar[dict[str, Recipe]] = {
        "embedded": Recipe(
            on_embedded_data=True, why="4,000 training digits give 32 steps per epoch instead of ~470 on full MNIST"),
        NOTEBOOK: Recipe(
            {"inputs": "unit", "init": "glorot", "bias_init": "small_normal", "epochs": 300, "batch_size": 128,
             "lr": 1e-2, "lr_decay": 0.99, "initial_rank": 20, "decomposition": "tt"},
            why="MARS's notebooks (MNIST-2FC-soft/-hard.ipynb): [0, 1] pixels (ToTensor), TTLinear's tt-pytorch "
                "glorot_initializer cores and 1e-3*randn biases, one Adam at 1e-2 for every parameter, "
                "ExponentialLR(0.99), 300 epochs of batch 128, TT ranks 20"),
    }
    input_shape: ClassVar[tuple[int, ...]] = (1, 28, 28)
    hyperparameters: ClassVar[dict[str, Hyper]] = {
        **mnist_family_hyperparameters(),
        "epochs": Hyper(300, "training epochs", minimum=1),
        "batch_size": Hyper(128, "batch size", minimum=1),
        "lr": Hyper(1e-2, "Adam learning rate", minimum=0.0),
        "lr_decay": Hyper(0.99, "ExponentialLR factor per epoch", minimum=0.0, maximum=1.0),
        "initial_rank": Hyper(20, "initial rank of every inner bond (trn sets its own)", minimum=1),
        "decomposition": Hyper("tt", "tensor train (TT-matrix) or tensor ring", choices=("tt", "tr")),
        "inputs": Hyper("normalised", "what the network reads: normalised digits, or their [0, 1] pixels (unit, "
                        "as MARS's notebooks)", choices=("normalised", "unit")),
        "init": Hyper("variance", "weights: the dense layer's variance 1/(3 fan_in), or Glorot 2/(in+out) "
                      "(tt-pytorch's glorot_initializer, as MARS's notebooks)", choices=("variance", "glorot")),
        "bias_init": Hyper("uniform", "biases: U(+-1/sqrt(fan_in)) as torch's Linear, or 1e-3*N(0,1) "
                           "(small_normal, tt-pytorch's TTLinear)", choices=("uniform", "small_normal")),
    }

    def load_data(self, data_dir: Path | None, download: bool) -> DataSplits:
        return load_mnist_family_from(self.params, data_dir, download)

    def _pixels(self) -> tuple[float, float] | None:
        return pixel_normalisation(self.params["dataset"]) if self.params["inputs"] == "unit" else None

    def _init_biases(self, model: nn.Module) -> nn.Module:
        if self.params["bias_init"] == "small_normal":
            with torch.no_grad():
                for layer in (model.fc1, model.fc2):
                    layer.bias.normal_(0.0, 1e-3)
        return model

    def dense_model(self) -> nn.Module:
        model = TwoLayerMLP(nn.Linear(784, 625), nn.Linear(625, 10), self._pixels())
        if self.params["init"] == "glorot":
            for layer in (model.fc1, model.fc2):
                nn.init.xavier_normal_(layer.weight)
        return self._init_biases(model)

    def tensorized_model(self, rank: int) -> nn.Module:
        d, init = self.params["decomposition"], self.params["init"]
        return self._init_biases(TwoLayerMLP(
            TensorizedLinear(784, 625, (7, 4, 7, 4), (5, 5, 5, 5), rank, d, name="fc1", layout="matrix", init=init),
            TensorizedLinear(625, 10, (25, 25), (5, 2), rank, d, name="fc2", layout="matrix", init=init),
            self._pixels(),
        ))

    def scheduler(self, optimizer, epochs: int):
        return torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=self.params["lr_decay"])
