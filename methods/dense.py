"""The uncompressed reference model (1×)."""

from typing import ClassVar

from rankbench.plugin import Method


class Dense(Method):
    """The task's ordinary model (nn.Linear / nn.Conv2d), same recipe: the 1× reference."""

    name: ClassVar[str] = "dense"
    description: ClassVar[str] = "uncompressed reference model (1x), the task's ordinary layers"
    role: ClassVar[str] = "reference"
    checks_tasks: ClassVar[bool] = True
    tensorized: ClassVar[bool] = False
