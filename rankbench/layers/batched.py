"""One pass over every tensorized layer of a model per forward: all cores gated by one op, and the
layers whose cores have the same shapes reconstructed by one batched contraction.

A tensorized training step on a GPU is bound by kernel launches, not arithmetic. Layer by layer,
gating a ring costs about four kernels per bond (forward and backward) and reconstructing it about
three per core; ResNet-32 has 219 bonds in 32 layers, 28 of which come in three groups of one shape.
A :class:`CoreBank` hooked on the model's forward instead

- concatenates every core of the model into one flat tensor (one kernel; its backward hands each
  parameter a slice of one gradient, so parameters and ``state_dict`` keys stay per layer),
- applies every selector's multipliers to it at once (:class:`SegmentScale`: a few kernels for the
  whole model, deterministic on every device),
- and, for each group of same-shaped layers, contracts the stacked cores along one planned batched
  path and hands each layer its slice of the result.

A layer alone in its group contracts its own cores exactly as it does without a bank, so a model of
layers of different shapes (LeNet-5) computes the same numbers either way. Outside a training or
grad-enabled forward (an eval-mode ``no_grad`` forward reuses each layer's cached weight) the bank
does nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from rankbench.layers.contraction import ContractionPlan
from rankbench.layers.tensorized import TensorizedLayer, tensorized_layers


class SegmentScale(torch.autograd.Function):
    """``x * scales[segment]`` for a flat ``x`` cut into contiguous segments, segment ``j`` of
    ``lengths[j]`` elements scaled by ``scales[j]`` (``index`` names each element's segment).

    Autograd of ``x * scales.index_select(0, index)`` would sum the scales' gradient with
    ``index_add``, whose atomics make it run to run different on a GPU; ``segment_reduce`` sums each
    segment in order."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scales: Tensor, index: Tensor, lengths: Tensor) -> Tensor:
        ctx.save_for_backward(x, scales, index, lengths)
        return x * scales.index_select(0, index)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        x, scales, index, lengths = ctx.saved_tensors
        grad_x = grad * scales.index_select(0, index) if ctx.needs_input_grad[0] else None
        grad_scales = torch.segment_reduce(grad * x, "sum", lengths=lengths) if ctx.needs_input_grad[1] else None
        return grad_x, grad_scales, None, None


@dataclass(frozen=True)
class _Group:
    """Layers whose cores have one shape per position; ``chunk`` is the index of their position-0
    stack among the bank's chunks (position ``k``'s stack is ``chunk + k``)."""

    layers: tuple[TensorizedLayer, ...]
    chunk: int
    plan: ContractionPlan | None


class _Plan:
    """The layout of one model's cores in the flat tensor, for one device and dtype."""

    def __init__(self, layers: Sequence[TensorizedLayer]) -> None:
        by_key: dict[object, list[TensorizedLayer]] = {}
        for layer in layers:
            by_key.setdefault(_group_key(layer), []).append(layer)
        self.signature = _signature(layers)
        self.layers = tuple(layers)
        self.groups: list[_Group] = []
        self.where: dict[int, tuple[int, int]] = {}
        self.core_start: list[int] = []
        """Per chunk, the index in ``cores`` of its first core."""
        self.stacked_chunks: set[int] = set()
        """The chunks of groups of more than one layer."""
        cores: list[nn.Parameter] = []
        shapes: list[tuple[int, ...]] = []
        for key, members in by_key.items():
            if key is None and len(members) > 1:
                for layer in members:
                    self._add_group([layer], cores, shapes)
            else:
                self._add_group(members, cores, shapes)
        self.cores = tuple(cores)
        self.chunk_shapes = tuple(shapes)
        self.chunk_sizes = tuple(int(torch.Size(s).numel()) for s in shapes)
        first = cores[0]
        self.device, self.dtype = first.device, first.dtype
        self._scale_layout(first.device)

    def _add_group(self, members: list[TensorizedLayer], cores: list, shapes: list) -> None:
        chunk = len(shapes)
        lead = len(members)
        for k in range(len(members[0].cores)):
            self.core_start.append(len(cores))
            if lead > 1:
                self.stacked_chunks.add(len(shapes))
            for layer in members:
                cores.append(layer.cores[k])
            shape = tuple(members[0].cores[k].shape)
            shapes.append((lead, *shape) if lead > 1 else shape)
        plan = None
        if lead > 1:
            head = members[0]
            terms, order = head._weight_letters(reserved="Z")
            equation = ",".join("Z" + t for t in terms) + "->Z" + "".join(order)
            plan = ContractionPlan(equation, *shapes[chunk:])
        for i, layer in enumerate(members):
            self.where[id(layer)] = (len(self.groups), i)
        self.groups.append(_Group(tuple(members), chunk, plan))

    def _scale_layout(self, device: torch.device) -> None:
        """Which selector scales which elements: ``self.gated`` lists, per flat-order core, its
        ``(layer, bond)`` if a selector gates it; ``index``/``lengths`` place the scales."""
        self.gated: list[tuple[TensorizedLayer, str] | None] = []
        lengths: list[int] = []
        ungated_run = 0
        for group in self.groups:
            for k in range(len(group.layers[0].cores)):
                for layer in group.layers:
                    core = layer.cores[k]
                    if str(k) in layer.selectors:
                        if ungated_run:
                            self.gated.append(None)
                            lengths.append(ungated_run)
                            ungated_run = 0
                        self.gated.append((layer, str(k)))
                        lengths += [core.numel() // core.shape[0]] * core.shape[0]
                    else:
                        ungated_run += core.numel()
        if ungated_run and len(lengths):
            self.gated.append(None)
            lengths.append(ungated_run)
        self.any_gated = any(g is not None for g in self.gated)
        counts = torch.tensor(lengths, dtype=torch.long)
        self.lengths = counts.to(device)
        self.index = torch.repeat_interleave(torch.arange(len(lengths)), counts).to(device)
        self.one = torch.ones(1, device=device, dtype=self.dtype)


def _group_key(layer: TensorizedLayer) -> object:
    """Layers with equal keys reconstruct their weights by one batched contraction (None: never grouped)."""
    layout = layer._layout_key()
    if layout is None:
        return None
    core = layer.cores[0]
    return (type(layer), tuple(tuple(c.shape) for c in layer.cores), layer.weight_order, layout,
            core.device, core.dtype)


def _signature(layers: Sequence[TensorizedLayer]) -> tuple:
    """What a plan depends on: the layers, their cores and selectors, by identity, and where the cores live."""
    return tuple((id(layer), tuple(id(s) for s in layer.selectors.values()), tuple(layer.selectors),
                  layer.cores[0].device, layer.cores[0].dtype) for layer in layers)


class BankPass:
    """One forward's gated cores and (on request, per group) reconstructed weights."""

    def __init__(self, plan: _Plan) -> None:
        self.plan = plan
        self.flat: Tensor | None = None
        """Every core of the model, flattened and concatenated (ungated), when the pass made it."""
        if plan.any_gated:
            flat = self.flat = torch.cat([c.reshape(-1) for c in plan.cores])
            values = {(id(layer), key): selector()
                      for layer in plan.layers for key, selector in layer.selectors.items()}
            scales = torch.cat([plan.one if g is None else values[(id(g[0]), g[1])] for g in plan.gated])
            flat = SegmentScale.apply(flat, scales, plan.index, plan.lengths)
            pieces = flat.split(plan.chunk_sizes)
        else:  # nothing to gate: only the cores of groups are concatenated, to be contracted together
            stacked = sorted(plan.stacked_chunks)
            grouped = iter(torch.cat([plan.cores[j].reshape(-1) for i in stacked
                                      for j in range(plan.core_start[i], plan.core_start[i] + plan.chunk_shapes[i][0])])
                           .split([plan.chunk_sizes[i] for i in stacked]) if stacked else ())
            pieces = [next(grouped) if i in plan.stacked_chunks else plan.cores[plan.core_start[i]]
                      for i in range(len(plan.chunk_shapes))]
        self.chunks = [chunk.view(shape) for chunk, shape in zip(pieces, plan.chunk_shapes)]
        self._cores: dict[int, list[tuple[Tensor, ...]]] = {}
        self._weights: dict[int, tuple[Tensor, ...]] = {}

    def cores(self, layer: TensorizedLayer) -> list[Tensor]:
        """The layer's gated cores (views of the pass's flat tensor)."""
        g, i = self.plan.where[id(layer)]
        group = self.plan.groups[g]
        d = len(group.layers[0].cores)
        stacks = self.chunks[group.chunk:group.chunk + d]
        if len(group.layers) == 1:
            return list(stacks)
        if g not in self._cores:
            self._cores[g] = [stack.unbind(0) for stack in stacks]
        return [per_layer[i] for per_layer in self._cores[g]]

    def weight(self, layer: TensorizedLayer) -> Tensor:
        """The layer's dense weight: its own contraction when alone in its group, else its slice of
        the group's batched reconstruction (computed once per pass, when the group's first layer asks)."""
        g, i = self.plan.where[id(layer)]
        group = self.plan.groups[g]
        if group.plan is None:
            return layer.dense_weight()
        if g not in self._weights:
            d = len(group.layers[0].cores)
            full = group.plan(*self.chunks[group.chunk:group.chunk + d])
            self._weights[g] = layer._dense_layout(full).unbind(0)
        return self._weights[g][i]


class CoreBank:
    """Forward hooks that give a model's tensorized layers one :class:`BankPass` per training (or
    grad-enabled) forward. ``attach`` registers them; the bank holds no reference to the model: it
    reads the model's layers at each forward and re-plans when they, their selectors, device or dtype
    change (pruning, ``set_selector``, ``.to()``).

    A model built by a run carries one (``build_model`` attaches it). Parameters and ``state_dict``
    keys stay per layer, so checkpoints, pruning and export are unchanged; a layer alone in its group
    contracts its own cores as it does without a bank.

    Example:
        ``bank = CoreBank.attach(model)``; later ``CoreBank.of(model).flat_cores()`` in a penalty.
    """

    def __init__(self) -> None:
        self._plan: _Plan | None = None
        self._active: list[TensorizedLayer] = []
        self._flat: Tensor | None = None

    @classmethod
    def attach(cls, model: nn.Module) -> CoreBank | None:
        """Hook a bank on ``model`` (none when it has no tensorized layer); ``CoreBank.of(model)`` finds it.

        Args:
            model: The model whose forward the bank hooks.

        Returns:
            The bank, or ``None`` when the model has no tensorized layer.
        """
        if not any(True for _ in tensorized_layers(model)):
            return None
        bank = cls()
        model.register_forward_pre_hook(bank.begin)
        model.register_forward_hook(bank.end, always_call=True)
        model._core_bank = bank
        return bank

    @staticmethod
    def of(model: nn.Module) -> CoreBank | None:
        """The bank ``attach`` hooked on ``model`` (or on the model a compiled module wraps), if any.

        Args:
            model: A model, or a compiled module wrapping one.

        Returns:
            Its bank, or ``None``.
        """
        bank = getattr(model, "_core_bank", None)
        return bank if isinstance(bank, CoreBank) else None

    def flat_cores(self) -> Tensor | None:
        """Every core of the latest training forward, flattened and concatenated in the bank's order,
        ungated, with its autograd graph (None when that forward made none: nothing was gated, or it was
        no training forward). A penalty on all cores computed from it, in the same step, shares the
        forward's concatenation: computed from the parameters again, each core would get two gradients
        and cost one more addition per core in the backward pass.

        Returns:
            The flat cores of the latest training forward, or ``None``.
        """
        return self._flat

    def __getstate__(self) -> dict:
        return {"_plan": None, "_active": [], "_flat": None}

    def plan(self, model: nn.Module) -> _Plan | None:
        """The layout of ``model``'s cores, re-planned when its layers, selectors, device or dtype changed.

        Args:
            model: The hooked model.

        Returns:
            The plan, or ``None`` when the model has no tensorized layer.
        """
        layers = [layer for _, layer in tensorized_layers(model)]
        if not layers:
            return None
        if self._plan is None or self._plan.signature != _signature(layers):
            self._plan = _Plan(layers)
        return self._plan

    def begin(self, model: nn.Module, args: tuple) -> None:
        """Forward pre-hook: start a pass (gate every core at once) for a training or grad-enabled forward.

        Args:
            model: The hooked model.
            args: The forward's positional arguments (unused).
        """
        self.end(model)
        self._flat = None
        if not (model.training or torch.is_grad_enabled()):
            return
        plan = self.plan(model)
        if plan is None:
            return
        active = BankPass(plan)
        for layer in plan.layers:
            layer._pass = active
        self._active = list(plan.layers)
        self._flat = active.flat

    def end(self, model: nn.Module, args: tuple = (), output: object = None) -> None:
        """Forward hook (called on exceptions too): end the pass, so every layer contracts on its own again.

        Args:
            model: The hooked model.
            args: The forward's positional arguments (unused).
            output: The forward's output (unused).
        """
        for layer in self._active:
            layer._pass = None
        self._active = []
