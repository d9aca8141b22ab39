"""Contractions planned once by opt_einsum and executed as plain torch operations.

opt_einsum picks the pairwise order (its path) when a layer first sees a shape;
``ContractionPlan`` keeps that path as a fixed list of ``torch.tensordot`` /
``torch.einsum`` steps with constant arguments, the same calls opt_einsum's own
executor makes with the torch backend (so results are bit for bit the same), but
with no opt_einsum code at run time: ``torch.compile`` traces it (Dynamo cannot
trace opt_einsum's executor, whose operand list is popped by computed indices).
"""

from __future__ import annotations

from dataclasses import dataclass

import opt_einsum as oe
import torch
from opt_einsum.parser import convert_to_valid_einsum_chars
from torch import Tensor


@dataclass(frozen=True)
class ContractionStep:
    """Contract the operands at ``positions`` (popped in this order) and append the result."""

    positions: tuple[int, ...]
    equation: str
    axes: tuple[tuple[int, ...], tuple[int, ...]] | None = None
    """Tensordot axes; None: ``torch.einsum(equation)``."""
    permutation: tuple[int, ...] | None = None
    """Applied to the tensordot result, when its index order differs from the step's output."""

    def __call__(self, operands: list[Tensor]) -> Tensor:
        taken = [operands.pop(i) for i in self.positions]
        if self.axes is None:
            return torch.einsum(self.equation, *taken)
        out = torch.tensordot(taken[0], taken[1], dims=self.axes)
        return out if self.permutation is None else out.permute(*self.permutation)


class ContractionPlan:
    """``equation`` over operands of ``shapes``, as a fixed sequence of pairwise torch steps."""

    def __init__(self, equation: str, *shapes: tuple[int, ...]) -> None:
        self.equation = equation
        expression = oe.contract_expression(equation, *shapes, optimize="auto")
        self.steps = tuple(_step(c) for c in expression.contraction_list)

    def __call__(self, *operands: Tensor) -> Tensor:
        remaining = list(operands)
        for step in self.steps:
            remaining.append(step(remaining))
        return remaining[0]


def _step(contraction: tuple) -> ContractionStep:
    """One entry of opt_einsum's contraction list, decided the way its executor decides it."""
    positions, removed, equation, _, blas = contraction
    if not blas or "EINSUM" in blas:
        return ContractionStep(tuple(positions), convert_to_valid_einsum_chars(equation))
    inputs, result = equation.split("->")
    left, right = inputs.split(",")
    produced = "".join(s for s in left + right if s not in removed)
    if removed:
        pairs = sorted((left.find(s), right.find(s)) for s in removed)
        axes = (tuple(p for p, _ in pairs), tuple(q for _, q in pairs))
    else:
        axes = ((), ())
    permutation = None if produced == result else tuple(map(produced.index, result))
    return ContractionStep(tuple(positions), equation, axes, permutation)
