"""A method plugin written against rankbench 0.1.0's module paths (``rankbench.config``,
``rankbench.method``, ``rankbench.tensorized``), as third-party packages of that version were."""

from typing import ClassVar

from rankbench.config import Hyper
from rankbench.method import Method
from rankbench.tensorized import selectors


class OldPathsMethod(Method):
    name: ClassVar[str] = "old_paths"
    description: ClassVar[str] = "a 0.1.0-era plugin: full-rank cores without selectors"
    hyperparameters: ClassVar[dict[str, Hyper]] = {"unused": Hyper(0.0, "a declared weight", minimum=0.0)}

    def penalty(self, model):
        assert not list(selectors(model))
        return super().penalty(model)
