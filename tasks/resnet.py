"""ResNet-32 and ResNet-110 on CIFAR-10, dense and with every convolution as a tensor ring."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rankbench.plugin import (
    DataSplits,
    Hyper,
    Split,
    Task,
    TensorizedConv2d,
    TensorizedLinear,
    load_cifar10,
    random_crop_flip,
    recalibrate_batchnorm,
)

ConvFactory = Callable[[int, int, int, str], nn.Module]
"""(in_channels, out_channels, stride, name) -> a 3×3 convolution without bias, padding 1;
``name`` is the module path the convolution will have (``blocks.0.conv1``)."""

CHANNEL_MODES: dict[int, tuple[int, ...]] = {3: (3,), 16: (4, 2, 2), 32: (4, 4, 2), 64: (4, 4, 4)}
"""The paper's tensorization of each channel count (METHODS.md)."""


class BasicBlock(nn.Module):
    """Two 3×3 conv + BN layers with an identity shortcut; where the block halves the
    resolution and widens the channels, the shortcut subsamples and zero-pads
    (He et al.'s option A for CIFAR, no parameters). ``name`` is the block's module path."""

    def __init__(self, conv: ConvFactory, in_planes: int, planes: int, stride: int, name: str) -> None:
        super().__init__()
        self.conv1 = conv(in_planes, planes, stride, f"{name}.conv1")
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv(planes, planes, 1, f"{name}.conv2")
        self.bn2 = nn.BatchNorm2d(planes)
        self.stride = stride
        self.pad = planes - in_planes

    def shortcut(self, x: Tensor) -> Tensor:
        if self.stride == 1 and self.pad == 0:
            return x
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """He et al.'s CIFAR ResNet of depth 6n+2: conv 3→16, three stages of ``n`` blocks
    (16, 32, 64 channels; the second and third start with stride 2), global average
    pooling, fc 64→10. The blocks form one sequence, ``blocks.0`` … ``blocks.{3n-1}``,
    and the layers are named by these module paths."""

    def __init__(self, n: int, conv: ConvFactory, fc: nn.Module) -> None:
        super().__init__()
        self.conv1 = conv(3, 16, 1, "conv1")
        self.bn1 = nn.BatchNorm2d(16)
        blocks: list[nn.Module] = []
        in_planes = 16
        for stage, planes in enumerate((16, 32, 64), start=1):
            for b in range(n):
                stride = 2 if stage > 1 and b == 0 else 1
                blocks.append(BasicBlock(conv, in_planes, planes, stride, f"blocks.{len(blocks)}"))
                in_planes = planes
        self.blocks = nn.Sequential(*blocks)
        self.fc = fc

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.blocks(x)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _dense_conv(in_planes: int, planes: int, stride: int, name: str) -> nn.Module:
    conv = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv


class ResNet32Task(Task):
    """ResNet-32 (n = 5) on CIFAR-10. Tensorizations (METHODS.md): first conv
    (3)×(4,2,2); 16→16 convs (4,2,2)×(4,2,2); the 16→32 downsample (4,2,2)×(4,4,2);
    32→32 (4,4,2)×(4,4,2); 32→64 (4,4,2)×(4,4,4); 64→64 (4,4,4)×(4,4,4); FC
    (4,4,4)×(10); a kernel is its own 9-mode. Recipe: SGD momentum 0.9, weight decay
    1e-4, lr 0.1 divided by 10 at 50% and 75% of 200 epochs, batch 128, random crop
    (pad 4) and horizontal flip; ours with λ = 0.1 and gate fixing at 5×. Before
    each evaluation the BatchNorm statistics are re-estimated with the eval-mode
    model (``bn_calibration_batches``): gated training rescales every conv's output,
    and stale statistics compound over 31 layers (measured: test loss 6e7 without,
    1.26 with, after the same short run of ours).

    The paper gives no initial rank for ResNet; 15 (its largest uniform TRN rank,
    2.28×) is the default here, so ours starts from that network and prunes it."""

    name: ClassVar[str] = "resnet32"
    depth_n: ClassVar[int] = 5
    description: ClassVar[str] = "ResNet-32 on CIFAR-10 (python batches), every conv and the fc as a tensor ring"
    recipe_keys: ClassVar[tuple[str, ...]] = ("epochs", "batch_size", "lr", "momentum", "weight_decay", "augment")
    input_shape: ClassVar[tuple[int, ...]] = (3, 32, 32)
    hyperparameters: ClassVar[dict[str, Hyper]] = {
        "split_seed": Hyper(0, "seed of the train/validation split", minimum=0),
        "val_size": Hyper(5000, "validation images held out of the 50,000 training images", minimum=1),
        "epochs": Hyper(200, "training epochs", minimum=1),
        "batch_size": Hyper(128, "batch size", minimum=1),
        "lr": Hyper(0.1, "SGD learning rate, divided by 10 at 50% and 75% of the epochs", minimum=0.0),
        "momentum": Hyper(0.9, "SGD momentum", minimum=0.0, maximum=1.0),
        "weight_decay": Hyper(1e-4, "SGD weight decay", minimum=0.0),
        "augment": Hyper(True, "random crop (pad 4) and horizontal flip of training images"),
        "bn_calibration_batches": Hyper(
            50, "training batches (in order, not augmented) over which BatchNorm statistics are re-estimated "
            "with the eval-mode model before each evaluation (0: keep the training statistics)", minimum=0,
        ),
        "initial_rank": Hyper(15, "initial rank of every bond (trn sets its own)", minimum=1),
        "decomposition": Hyper("tr", "tensor ring or tensor train", choices=("tr", "tt")),
    }

    def load_data(self, data_dir: Path | None, download: bool) -> DataSplits:
        return load_cifar10(data_dir, split_seed=self.params["split_seed"], val_size=self.params["val_size"],
                            download=download)

    def dense_model(self) -> nn.Module:
        return CifarResNet(self.depth_n, _dense_conv, nn.Linear(64, 10))

    def tensorized_model(self, rank: int) -> nn.Module:
        d = self.params["decomposition"]

        def conv(in_planes: int, planes: int, stride: int, name: str) -> nn.Module:
            return TensorizedConv2d(in_planes, planes, 3, CHANNEL_MODES[in_planes], CHANNEL_MODES[planes], rank, d,
                                    stride=stride, padding=1, bias=False, name=name)

        return CifarResNet(self.depth_n, conv, TensorizedLinear(64, 10, (4, 4, 4), (10,), rank, d, name="fc"))

    def augment(self, x: Tensor, generator: torch.Generator) -> Tensor:
        return random_crop_flip(x, 4, generator) if self.params["augment"] else x

    def calibrate(self, model: nn.Module, train: Split, device: torch.device) -> None:
        recalibrate_batchnorm(model, train, self.params["batch_size"], device, self.params["bn_calibration_batches"])

    def optimizer(self, param_groups) -> torch.optim.Optimizer:
        return torch.optim.SGD(param_groups, lr=self.params["lr"], momentum=self.params["momentum"],
                               weight_decay=self.params["weight_decay"])

    def scheduler(self, optimizer, epochs: int):
        milestones = sorted({max(1, epochs // 2), max(1, (3 * epochs) // 4)})
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)


class ResNet110Task(ResNet32Task):
    """ResNet-110 (n = 18) on CIFAR-10: ResNet-32's tensorizations and recipe, gate fixing at 5.6×."""

    name: ClassVar[str] = "resnet110"
    depth_n: ClassVar[int] = 18
    description: ClassVar[str] = "ResNet-110 on CIFAR-10 (python batches), every conv and the fc as a tensor ring"
