"""A third-party method plugin: every bond keeps all its slices (multipliers all one).

Used by tests/test_cli.py and tests/test_registry.py through ``--plugin-dir``.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from rankbench.plugin import Bond, Method, RankSelector


class OnesSelector(RankSelector):
    """A selector whose multipliers are always one: the bond keeps its full rank."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.register_buffer("ones", torch.ones(size))

    def deterministic(self) -> Tensor:
        return self.ones


class ConstantGate(Method):
    name: ClassVar[str] = "constant_gate"
    description: ClassVar[str] = "test plugin: an all-ones selector on every bond"

    def selector(self, bond: Bond) -> RankSelector | None:
        return OnesSelector(bond.size)
