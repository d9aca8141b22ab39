"""A method plugin whose penalty is NaN, so training diverges on the first batch.

``fail_seed`` picks the seed that diverges (-1: every seed); other seeds train
normally. The seed is read from torch's default generator, which
``rankbench.run.experiment.build_model`` seeds with the run's seed just before ``attach``.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from rankbench.plugin import Hyper, Method, MethodContext


class NanMethod(Method):
    name: ClassVar[str] = "nanmethod"
    description: ClassVar[str] = "test plugin: a NaN penalty (diverges)"
    hyperparameters: ClassVar[dict[str, Hyper]] = {
        "fail_seed": Hyper(-1, "seed whose run diverges (-1: every seed)", minimum=-1),
    }

    def attach(self, model: nn.Module, context: MethodContext) -> None:
        super().attach(model, context)
        self.diverges = self.params["fail_seed"] in (-1, torch.initial_seed())

    def penalty(self, model: nn.Module) -> Tensor:
        if self.diverges:
            return torch.tensor(float("nan"))
        return super().penalty(model)
