"""Contractions planned once by opt_einsum and executed as plain matrix products, laid out so that
few operands are ever copied.

opt_einsum picks the pairwise order (its path) when a layer first sees a shape. ``ContractionPlan``
keeps that order, and decides for every pairwise step which operand goes on the left and in which
memory order each intermediate is written, so that an operand is read as a (batched) matrix, or the
transpose of one, straight from memory. ``torch.tensordot`` (opt_einsum's own executor) instead
permutes every operand into its canonical order, which copies most intermediates of a ring and
copies their gradients again in the backward pass: on a GPU each copy is one more kernel launch.
Merging two neighbouring arcs of a ring is then a plain matrix product; closing the ring copies one
operand. The run-time code is a fixed list of ``reshape``/``matmul`` calls with constant arguments,
so ``torch.compile`` traces it (Dynamo cannot trace opt_einsum's executor, whose operand list is
popped by computed indices).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import ClassVar

import opt_einsum as oe
import torch
from opt_einsum.parser import convert_to_valid_einsum_chars
from torch import Tensor


@dataclass(frozen=True)
class ContractionCost:
    """What a contraction costs: FLOPs, elements read and written (copies included) and kernels.

    ``estimate`` weighs them into FLOP-equivalents for a device: FLOPs alone pick contractions
    that are slower where memory traffic or kernel launches dominate (a GPU step is launch-bound)."""

    flops: int = 0
    traffic: int = 0
    kernels: int = 0

    WEIGHTS: ClassVar[dict[str, tuple[float, float]]] = {"cpu": (50.0, 3.7e5), "cuda": (60.0, 5e8)}
    """Per device type: FLOP-equivalents of one element moved and of one kernel. CPU: measured on 2
    cores (1.0e11 FLOP/s in a 256³ matmul, 1.0e9 elements/s copied, 3.6 µs per tiny op); CUDA: an H100's
    fp32 rate (5e13 FLOP/s) against its memory (8e11 elements/s) and the 10 µs an eager op took there."""

    def __add__(self, other: ContractionCost) -> ContractionCost:
        return ContractionCost(self.flops + other.flops, self.traffic + other.traffic, self.kernels + other.kernels)

    def estimate(self, device_type: str) -> float:
        per_element, per_kernel = self.WEIGHTS.get(device_type, self.WEIGHTS["cuda"])
        return self.flops + per_element * self.traffic + per_kernel * self.kernels


@dataclass(frozen=True)
class MatrixOperand:
    """How one operand enters a step's matrix product: ``permutation`` (a copy) if its memory order
    does not allow a view, then a reshape to ``(*batch, rows, cols)``, transposed when ``transposed``."""

    permutation: tuple[int, ...] | None
    shape: tuple[int, ...]
    transposed: bool

    def __call__(self, operand: Tensor) -> Tensor:
        if self.permutation is not None:
            operand = operand.permute(*self.permutation)
        matrix = operand.reshape(self.shape)
        return matrix.transpose(-1, -2) if self.transposed else matrix


@dataclass(frozen=True)
class ContractionStep:
    """Contract the operands at ``positions`` (popped in this order) and append the result.

    A matrix step multiplies ``left`` by ``right`` and reshapes the product to ``result_shape``; an
    ``equation`` step (a pairwise contraction that is no matrix product: a sum over an index only
    one operand has, a repeated index) calls ``torch.einsum``. ``swapped``: the left matrix is the
    second operand popped."""

    positions: tuple[int, ...]
    equation: str | None = None
    left: MatrixOperand | None = None
    right: MatrixOperand | None = None
    result_shape: tuple[int, ...] = ()
    swapped: bool = False
    cost: ContractionCost = ContractionCost()

    def __call__(self, operands: list[Tensor]) -> Tensor:
        taken = [operands.pop(i) for i in self.positions]
        if self.equation is not None:
            return torch.einsum(self.equation, *taken)
        assert self.left is not None and self.right is not None
        first, second = (taken[1], taken[0]) if self.swapped else (taken[0], taken[1])
        return torch.matmul(self.left(first), self.right(second)).reshape(self.result_shape)


class ContractionPlan:
    """``equation`` over operands of ``shapes`` (each contiguous), as a fixed sequence of steps."""

    def __init__(self, equation: str, *shapes: tuple[int, ...]) -> None:
        self.equation = equation
        inputs, output = equation.split("->")
        terms = inputs.split(",")
        sizes = {c: n for term, shape in zip(terms, shapes) for c, n in zip(term, shape)}
        path = [tuple(c[0]) for c in oe.contract_expression(equation, *shapes, optimize="auto").contraction_list]
        best: tuple[float, list] | None = None
        for orientation in itertools.product((False, True), repeat=len(path)):
            cost, steps, final = _layout(path, orientation, list(terms), output, sizes)
            cost += 1 if final != output else 0
            if best is None or cost < best[0]:
                best = (cost, steps + [final])
        assert best is not None
        *steps, final = best[1]
        self.steps: tuple[ContractionStep, ...] = tuple(steps)
        self.copies = best[0]
        """Operand copies (counted twice: their gradients are copied back) plus transposed reads."""
        self.final = None if final == output else tuple(final.index(c) for c in output)
        self.cost = sum((step.cost for step in self.steps), ContractionCost())
        """The forward contraction's cost (a result laid out out of order is not counted: its
        consumer copies it, or reads it as it lies)."""

    def __call__(self, *operands: Tensor) -> Tensor:
        remaining = list(operands)
        for step in self.steps:
            remaining.append(step(remaining))
        result = remaining[0]
        return result if self.final is None else result.permute(*self.final)


def _layout(path: list[tuple[int, ...]], orientation: tuple[bool, ...], terms: list[str], output: str,
            sizes: dict[str, int]) -> tuple[float, list, str]:
    """The steps of ``path`` with each pairwise step's operands swapped where ``orientation`` says,
    their cost (copies twice, transposed reads once) and the final index order (the last step lays
    an operand it copies out in the output's order)."""
    cost = 0.0
    steps: list = []
    for k, (positions, swap) in enumerate(zip(path, orientation)):
        taken = [terms.pop(i) for i in positions]
        later = set(output) | set("".join(terms))
        if len(taken) == 1 or swap and len(taken) != 2:
            if swap:
                return math.inf, [], output
            step, result = _einsum_step(positions, taken, later, sizes)
            steps.append(step)
            terms.append(result)
            continue
        left, right = (taken[1], taken[0]) if swap else (taken[0], taken[1])
        made = _matrix_step(positions, left, right, swap, later, sizes, output if k == len(path) - 1 else "")
        if made is None:
            if swap:
                return math.inf, [], output
            step, result = _einsum_step(positions, taken, later, sizes)
        else:
            step, result, step_cost = made
            cost += step_cost
        steps.append(step)
        terms.append(result)
    return cost, steps, terms[0]


def _einsum_step(positions: tuple[int, ...], taken: list[str], later: set[str],
                 sizes: dict[str, int]) -> tuple[ContractionStep, str]:
    present = "".join(dict.fromkeys("".join(taken)))
    result = "".join(c for c in present if c in later)
    equation = convert_to_valid_einsum_chars(",".join(taken) + "->" + result)
    cost = ContractionCost(2 * _size(present, sizes), sum(_size(t, sizes) for t in taken) + _size(result, sizes), 1)
    return ContractionStep(tuple(positions), equation=equation, cost=cost), result


def _matrix_step(positions: tuple[int, ...], left: str, right: str, swap: bool, later: set[str],
                 sizes: dict[str, int], result_order: str = "") -> tuple[ContractionStep, str, float] | None:
    """One pairwise contraction as a (batched) matrix product, or None when it is none. An operand
    that cannot be read in place is copied, its free indices laid out in ``result_order``'s order."""
    common = [c for c in left if c in right]
    if len(set(left)) != len(left) or len(set(right)) != len(right):
        return None
    if any(c not in later for c in left + right if c not in common):
        return None
    batch = [c for c in common if c in later]
    inner = [c for c in common if c not in later]
    rows = [c for c in left if c not in common]
    cols = [c for c in right if c not in common]
    cost = 0.0
    batch_order = _batch_order(left, batch) or _batch_order(right, batch) or "".join(batch)
    left_read = _read(left, batch_order, set(rows), set(inner))
    right_read = _read(right, batch_order, set(inner), set(cols))
    # the inner block must run in one order on both sides
    inner_order = None
    if left_read is not None and right_read is not None and left_read[2] != right_read[1]:
        left_read = None if _size(inner, sizes) * _size(rows, sizes) <= _size(inner, sizes) * _size(cols, sizes) \
            else left_read
        right_read = right_read if left_read is None else None
    if left_read is not None:
        inner_order = left_read[2]
    elif right_read is not None:
        inner_order = right_read[1]
    else:
        inner_order = "".join(inner)
    by_memory = {c: result_order.find(c) for c in rows + cols}
    row_order = left_read[1] if left_read is not None else "".join(sorted(rows, key=by_memory.get))
    col_order = right_read[2] if right_read is not None else "".join(sorted(cols, key=by_memory.get))
    lead = tuple(sizes[c] for c in batch_order)
    left_op, left_cost = _operand(left, left_read, batch_order + row_order + inner_order, lead,
                                  _size(row_order, sizes), _size(inner_order, sizes))
    right_op, right_cost = _operand(right, right_read, batch_order + inner_order + col_order, lead,
                                    _size(inner_order, sizes), _size(col_order, sizes))
    cost += left_cost + right_cost
    result = batch_order + row_order + col_order
    n_batch, n_rows, n_inner, n_cols = (_size(s, sizes) for s in (batch_order, row_order, inner_order, col_order))
    copied = [n_batch * n_rows * n_inner] * (left_op.permutation is not None) + \
        [n_batch * n_inner * n_cols] * (right_op.permutation is not None)
    work = ContractionCost(2 * n_batch * n_rows * n_inner * n_cols,
                            n_batch * (n_rows * n_inner + n_inner * n_cols + n_rows * n_cols) + 2 * sum(copied),
                            1 + len(copied))
    step = ContractionStep(tuple(positions), left=left_op, right=right_op,
                           result_shape=tuple(sizes[c] for c in result), swapped=swap, cost=work)
    return step, result, cost


def _operand(term: str, read: tuple[bool, str, str] | None, target: str, lead: tuple[int, ...], rows: int,
             cols: int) -> tuple[MatrixOperand, float]:
    """How ``term`` enters a product as a ``rows × cols`` matrix laid out as ``target``: read in place
    (``read``, from ``_read``; a transposed read costs 1, its gradient is copied back) or copied
    (cost 2: forward and backward)."""
    if read is None:
        return MatrixOperand(tuple(term.index(c) for c in target), (*lead, rows, cols), False), 2.0
    transposed = read[0]
    shape = (*lead, cols, rows) if transposed else (*lead, rows, cols)
    return MatrixOperand(None, shape, transposed), 1.0 if transposed else 0.0


def _size(indices, sizes: dict[str, int]) -> int:
    return math.prod(sizes[c] for c in indices)


def _batch_order(term: str, batch: list[str]) -> str | None:
    """The batch indices in ``term``'s order, when they lead it."""
    head = term[:len(batch)]
    return head if set(head) == set(batch) else None


def _read(term: str, batch_order: str, first: set[str], second: set[str]) -> tuple[bool, str, str] | None:
    """``term`` as a matrix ``first × second`` after its leading batch block ``batch_order``: whether
    that matrix is read transposed (``second`` lies first in memory), and the two blocks' orders."""
    if term[:len(batch_order)] != batch_order:
        return None
    rest = term[len(batch_order):]
    if not first and not second:
        return False, "", ""
    for transposed, (a, b) in ((False, (first, second)), (True, (second, first))):
        head, tail = rest[:len(a)], rest[len(a):]
        if set(head) == a and set(tail) == b:
            return (transposed, head, tail) if not transposed else (transposed, tail, head)
    return None
