"""A task plugin whose tensorized model declares modes that do not multiply to the layer size.

It reuses LeNet-5's data and dense model (the imported ``LeNet5Task`` is not
re-registered: only classes defined in this file are plugins).
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from rankbench.plugin import TensorizedLinear
from rankbench.tasks.lenet5 import LeNet5Task


class BadTask(LeNet5Task):
    name: ClassVar[str] = "badtask"
    description: ClassVar[str] = "test plugin: a tensorization whose modes do not match"

    def tensorized_model(self, rank: int) -> nn.Module:
        # 2*4 = 8 != 10 input features
        return nn.Sequential(TensorizedLinear(10, 6, (2, 4), (2, 3), rank, name="bad"))
