"""A method plugin for tests/test_study.py: its penalty is NaN when ``blowup`` is true.

So a study with a grid over ``blowup = [false, true]`` has one trial that
trains normally and one whose loss becomes NaN on the first batch.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from rankbench.plugin import Hyper, Method


class NanWhenBig(Method):
    name: ClassVar[str] = "nan_when_big"
    description: ClassVar[str] = "test plugin: a NaN penalty when blowup is true, else none"
    hyperparameters: ClassVar[dict[str, Hyper]] = {
        "blowup": Hyper(False, "make the penalty NaN (the loss diverges)"),
    }

    def penalty(self, model: nn.Module) -> Tensor:
        device = next(model.parameters()).device
        value = float("nan") if self.params["blowup"] else 0.0
        return torch.tensor(value, device=device)
