"""Tensor-Ring and Tensor-Train layers whose rank indices ("bonds") can be gated.

A layer's weight is a ring of cores ``G_k`` of shape ``(r_k, n_k, r_{k+1 mod d})``.
A tensor train is the same ring with ``r_0 = 1``: its wrap-around bond has size 1
and is never gated. Bond ``k`` is the index ``r_k`` shared by cores ``k-1`` and
``k``; a rank selector on it multiplies the slices of core ``k`` along dim 0, so
each bond is gated exactly once.

Contractions never chain the cores left to right while carrying the open ring
bond: they use opt_einsum expressions planned once per shape, and linear layers
choose between reconstructing the weight and contracting the input through the
cores by the planned FLOP count.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar, Literal

import opt_einsum as oe
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rankbench.errors import RankbenchError
from rankbench.layers.contraction import ContractionCost, ContractionPlan

Decomposition = Literal["tr", "tt"]
Strategy = Literal["auto", "weight", "input"]
Init = Literal["variance", "glorot"]
INITS: tuple[str, ...] = ("variance", "glorot")


class RankSelector(nn.Module):
    """Owned by one bond; returns the multiplier vector (length = bond size) for it.

    It lives inside the model, so optimizers, state_dict and ``.to(device)`` see
    it like any other submodule. ``forward`` samples in ``train()`` mode and is
    deterministic in ``eval()`` mode.

    Supplied values: a method may compute a training forward's multipliers itself
    (all bonds in one fused pass, or samples it needs again for a score-function
    term) and hand them in with ``RankSelector.supplied({selector: values})``.
    Inside that block a training-mode ``forward`` returns the supplied tensor
    instead of calling ``sample()``; eval mode stays ``deterministic()``. The
    block restores the previous state on exit, exceptions included, so no
    selector keeps a value past the step, and no selector writes state of its
    own during forward. Under ``--compile`` the supplied tensors are inputs a
    CUDA graph takes as static: supply views of a :class:`StaticInput`.

    A subclass declares its trainable state as ``nn.Parameter``s (they form the
    optimizer's ``selectors`` group and are never counted as model parameters),
    other state as buffers, and implements ``deterministic`` (and usually
    ``sample``). Both must return a finite 1-D tensor of shape ``(size,)`` on the
    selector's device; multiplier ``j`` scales rank slice ``j`` of the bond.

    Args:
        size: The bond's size (its rank before selection); call
            ``super().__init__(size)`` first.

    Attributes:
        size: The bond's size.

    Shape:
        - Output of ``forward()``, ``sample()`` and ``deterministic()``: ``(size,)``.
    """

    allows_zero: bool = False
    """Whether an eval rank of 0 stands (the bond is pruned away and its layer outputs its bias alone, as
    MARS's authors allow); by default a bond whose every eval multiplier is 0 counts and prunes as rank 1."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size
        self._supplied: Tensor | None = None

    @staticmethod
    @contextmanager
    def supplied(values: Mapping[RankSelector, Tensor]) -> Iterator[None]:
        """Within the block each selector's training ``forward`` returns its tensor
        in ``values`` (shape ``(size,)``, used as given, autograd graph included).
        One block for many selectors keeps the per-step cost to one attribute write
        per selector; nested blocks restore the outer values on exit.

        Args:
            values: Selector → its training multipliers, each of shape ``(size,)``.

        Yields:
            Nothing; the values are in force inside the ``with`` block.

        Raises:
            ValueError: A supplied tensor's shape is not ``(selector.size,)``.
        """
        previous: list[tuple[RankSelector, Tensor | None]] = []
        try:
            for selector, value in values.items():
                if value.shape != (selector.size,):
                    raise ValueError(f"supplied multipliers of shape {tuple(value.shape)} "
                                     f"for a selector of size {selector.size}")
                previous.append((selector, selector._supplied))
                selector._supplied = value
            yield
        finally:
            for selector, value in reversed(previous):
                selector._supplied = value

    def sample(self) -> Tensor:
        """Multipliers used during training (may be stochastic).

        Returns:
            A ``(size,)`` tensor, differentiable for the parameters meant to train;
            default ``deterministic()``.
        """
        return self.deterministic()

    def deterministic(self) -> Tensor:
        """Eval-mode multipliers: what pruning folds into the core.

        Slices whose multiplier is exactly 0 are cut when the model is pruned, the
        others are multiplied into the kept slices. Keep at least one non-zero entry
        (unless ``allows_zero``).

        Returns:
            A ``(size,)`` tensor.

        Raises:
            NotImplementedError: A subclass must implement it.
        """
        raise NotImplementedError

    def forward(self) -> Tensor:
        """Eval: ``deterministic()``; training: the supplied multipliers if any, else ``sample()``.

        Do not override it.

        Returns:
            The ``(size,)`` multipliers the layer applies to the bond's core.
        """
        if not self.training:
            return self.deterministic()
        supplied = self._supplied
        return self.sample() if supplied is None else supplied

    @torch.no_grad()
    def rank(self) -> int:
        """Number of slices whose eval-mode multiplier is non-zero.

        Returns:
            The bond's learned rank.
        """
        return int((self.deterministic() != 0).sum())


class StaticInput:
    """One tensor a method copies its supplied gate values into, step after step, at one address.

    CUDA graphs (``--compile`` on a GPU) take every tensor a compiled model reads from its modules
    as a static input and re-record the whole graph when one moves: freshly allocated values on
    every step made a compiled ``ours`` LeNet-5 step 3.6x slower than eager on an H100. ``update``
    returns the held tensor with the new values and their autograd graph, so gradients flow as
    through ``values``; the previous step's graph is cut first. Keep one per forward pass made
    before ``backward`` (REINFORCE's M samples), since a pass's values are saved for it.

    Example:
        ``values = static.update(torch.cat(per_gate))``, then split ``values`` into
        views and hand them to ``RankSelector.supplied``.
    """

    def __init__(self) -> None:
        self._held: Tensor | None = None

    def update(self, values: Tensor) -> Tensor:
        """Copy ``values`` into the held tensor, keeping its address.

        The held tensor is (re)allocated only when ``values``' shape, dtype or device
        changes.

        Args:
            values: This step's values, with their autograd graph.

        Returns:
            The held tensor, holding ``values`` and carrying their autograd graph.
        """
        held = self._held
        if held is None or held.shape != values.shape or held.dtype != values.dtype or held.device != values.device:
            held = self._held = torch.empty_like(values, requires_grad=False)
        return held.detach_().copy_(values)


@dataclass(frozen=True)
class Bond:
    """One rank index of one tensorized layer; ``layer_name`` is the layer's module path.

    ``Method.selector`` receives one per gateable bond (``bonds(model)``).

    Attributes:
        layer_name: The layer's module path in the model (``fc1``, ``blocks.3.conv2``).
        layer: The tensorized layer.
        index: The bond's index in the layer: bond ``k`` joins core ``k-1`` and core ``k``
            (bond 0 is the ring's wrap-around bond).
        size: The bond's size (its initial rank).
    """

    layer_name: str
    layer: TensorizedLayer
    index: int
    size: int

    @property
    def name(self) -> str:
        """``LAYER.bondK``, e.g. ``fc1.bond2``: the key of ``Method.selectors``."""
        return f"{self.layer_name}.bond{self.index}"


def _ring_terms(core_modes: Sequence[Sequence[int]], reserved: str = "") -> tuple[list[str], list[str]]:
    """Einsum terms of a ring of cores ``b_k <modes of core k> b_{k+1}`` and the
    mode letters of each core."""
    symbols = (oe.get_symbol(i) for i in range(1000))
    letters = iter(c for c in symbols if c not in reserved)
    d = len(core_modes)
    bonds = [next(letters) for _ in range(d)]
    modes = ["".join(next(letters) for _ in core) for core in core_modes]
    return [bonds[k] + modes[k] + bonds[(k + 1) % d] for k in range(d)], modes


class TensorizedLayer(nn.Module):
    """Shared machinery of TR/TT layers: cores, bonds, selectors, contraction plans.

    A layer's name is its module path in the model (``tensorized_layers``,
    ``bonds``, ``learned_ranks``): the layer does not know where it sits. The
    ``name`` a subclass takes is only the ``label`` of errors raised while the
    layer is built, before it has a path; tasks pass the path it will have.

    ``strategy`` is the training contraction (see ``training_contraction``), one of
    ``strategies``; a layer whose only contraction is reconstructing its weight keeps ``weight``.
    ``bias`` is registered here, as ``None``, so every layer has one.

    Core ``k`` has shape ``(r_k, *core_modes[k], r_{k+1 mod d})``; a tensor train is a
    ring whose wrap-around bond has size 1 and is never gated. Tasks use the
    subclasses (``TensorizedLinear``, ``TensorizedConv2d``, ``TensorizedEmbedding``
    and their ``TensorRing*`` / ``TensorTrain*`` forms); a new layer kind subclasses
    this and implements ``_dense_layout`` and ``_layout_key``.

    Attributes:
        cores: The cores, an ``nn.ParameterList``.
        ranks: The bond sizes (``ranks[k]``: bond ``k``, before core ``k``).
        selectors: The installed selectors, keyed by bond index (as a string).
        decomposition: ``"tr"`` (tensor ring) or ``"tt"`` (tensor train).
    """

    strategy: str = "weight"
    strategies: ClassVar[tuple[str, ...]] = ("weight",)
    _pass = None
    bias: nn.Parameter | None
    label: str

    def __init__(
        self,
        core_modes: Sequence[Sequence[int]],
        weight_order: Sequence[tuple[int, int]],
        ranks: int | Sequence[int],
        decomposition: Decomposition,
        fan_in: int,
        init: Init = "variance",
        glorot_fans: tuple[int, int] | None = None,
    ) -> None:
        """Build the cores and draw them (``reset_cores``).

        Args:
            core_modes: ``core_modes[k]`` are the physical modes core ``k`` carries (one
                mode for a ring of vectors, an (in, out) pair for a TT-matrix core).
            weight_order: ``(core, position)`` of each mode, in the order of
                ``full_tensor``'s axes.
            ranks: One rank for every bond, or one per bond (a TT's bond 0 is set to 1).
            decomposition: ``"tr"`` or ``"tt"``.
            fan_in: The dense layer's fan-in, for the default initialisation.
            init: The cores' rule, ``"variance"`` or ``"glorot"`` (``reset_cores``).
            glorot_fans: The (rows, columns) of the matrix tt-pytorch's Glorot rule sees.

        Raises:
            RankbenchError: An unknown decomposition or init, a rank count that does not
                match the cores, or a rank below 1.
        """
        super().__init__()
        if decomposition not in ("tr", "tt"):
            raise RankbenchError(f"unknown decomposition {decomposition!r}: use 'tr' or 'tt'")
        if init not in INITS:
            raise RankbenchError(f"unknown init {init!r}: use {' or '.join(map(repr, INITS))}")
        self.init: Init = init
        self.glorot_fans = glorot_fans
        self.decomposition: Decomposition = decomposition
        self.core_modes = tuple(tuple(int(m) for m in core) for core in core_modes)
        self.weight_order = tuple(weight_order)
        d = len(self.core_modes)
        self.ranks = self._normalise_ranks(ranks, d, decomposition)
        self.fan_in = fan_in
        self.cores = nn.ParameterList(
            nn.Parameter(torch.empty(self.ranks[k], *self.core_modes[k], self.ranks[(k + 1) % d]))
            for k in range(d)
        )
        self.selectors = nn.ModuleDict()
        self.register_parameter("bias", None)
        self._weight_cache: tuple[tuple, Tensor] | None = None
        self._expr_cache: dict = {}
        self._pass = None
        self.reset_cores()

    def __getstate__(self) -> dict:
        """Caches are rebuilt on demand: never pickled or deep-copied."""
        state = self.__dict__.copy()
        state["_weight_cache"] = None
        state["_expr_cache"] = {}
        state["_pass"] = None
        return state

    @staticmethod
    def _normalise_ranks(ranks: int | Sequence[int], d: int, decomposition: Decomposition) -> tuple[int, ...]:
        if isinstance(ranks, int):
            out = [ranks] * d
        else:
            out = [int(r) for r in ranks]
            if decomposition == "tt" and len(out) == d + 1 and out[0] == out[-1] == 1:
                out = out[:d]
            if len(out) != d:
                raise RankbenchError(f"{len(out)} ranks given for {d} cores: give one rank per bond")
        if decomposition == "tt":
            out[0] = 1
        if any(r < 1 for r in out):
            raise RankbenchError(f"ranks must be >= 1, got {out}")
        return tuple(out)

    def init_variance(self) -> float:
        """The variance ``reset_cores`` gives the reconstructed weight: ``variance``, 1/(3·fan_in) (a
        default-initialised dense layer's); ``glorot``, 2/(rows + columns) (tt-pytorch's
        ``glorot_initializer``, which MARS's authors use; for a conv the rows are in·k·k).

        Returns:
            The target variance of the reconstructed weight's entries.

        Raises:
            RankbenchError: ``init="glorot"`` on a layer without ``glorot_fans``.
        """
        if self.init == "glorot":
            if self.glorot_fans is None:
                raise RankbenchError(f"{type(self).__name__} has no Glorot fans: pass glorot_fans")
            return 2.0 / sum(self.glorot_fans)
        return 1.0 / (3.0 * self.fan_in)

    @torch.no_grad()
    def reset_cores(self) -> None:
        """Draw cores N(0, s²) with s chosen so the reconstructed weight has the
        variance ``init_variance`` (by default a default-initialised dense layer's, 1/(3·fan_in)).

        Each weight entry is a sum of prod(r_k) products of d independent core
        entries, so Var(W) = prod(r_k)·s^(2d). Without this rescaling a rank-25
        ring starts with several times the dense variance and trains slowly.
        Every core gets the same s, as tt-pytorch spreads its Glorot variance
        (``random_matrix``: s = σ^(1/d)·prod(r)^(-1/(2d)); for a TT exactly this;
        its ring version counts the wrap-around rank twice, a variance R times too small).
        """
        target = self.init_variance()
        log_paths = sum(math.log(r) for r in self.ranks)
        std = math.exp(0.5 * (math.log(target) - log_paths) / len(self.core_modes))
        for core in self.cores:
            core.normal_(0.0, std)
        self._weight_cache = None

    # ---- bonds and selectors -------------------------------------------------
    def gateable_bonds(self) -> list[int]:
        """Bond indices a selector may gate (a TT's boundary bond 0 never is).

        Returns:
            The gateable bond indices, in order.
        """
        return [k for k in range(len(self.core_modes)) if not (self.decomposition == "tt" and k == 0)]

    def set_selector(self, bond: int, selector: RankSelector) -> None:
        """Install ``selector`` on ``bond`` (``Method.attach`` does it for every bond).

        Args:
            bond: A gateable bond index.
            selector: A selector of the bond's size.

        Raises:
            ValueError: The bond cannot be gated, or the selector's size is not the bond's.
        """
        if bond not in self.gateable_bonds():
            raise ValueError(f"bond {bond} cannot be gated")
        if selector.size != self.ranks[bond]:
            raise ValueError(f"selector of size {selector.size} on bond of size {self.ranks[bond]}")
        self.selectors[str(bond)] = selector
        self._weight_cache = None

    def selector(self, bond: int) -> RankSelector | None:
        """The selector installed on ``bond``.

        Args:
            bond: A bond index.

        Returns:
            The selector, or ``None`` when the bond is ungated.
        """
        return self.selectors[str(bond)] if str(bond) in self.selectors else None

    def gated_cores(self) -> list[Tensor]:
        """Cores with each selector's multipliers applied along dim 0 of its core (during a
        :class:`~rankbench.layers.batched.CoreBank` pass: views of the model's gated cores).

        Returns:
            One tensor per core, shaped as the core.
        """
        if self._pass is not None:
            return self._pass.cores(self)
        cores = list(self.cores)
        for key, selector in self.selectors.items():
            k = int(key)
            cores[k] = cores[k] * selector().view(-1, *[1] * (cores[k].dim() - 1))
        return cores

    @torch.no_grad()
    def eval_ranks(self) -> tuple[int, ...]:
        """Bond sizes after pruning: selectors' eval ranks, never below 1 unless the selector
        ``allows_zero`` (then a bond of rank 0 empties its two cores and the layer outputs its bias).

        Returns:
            One size per bond, ungated bonds at their full size.
        """
        out = list(self.ranks)
        for key, selector in self.selectors.items():
            rank = selector.rank()
            out[int(key)] = rank if selector.allows_zero else max(1, rank)
        return tuple(out)

    def parameter_count(self, ranks: Sequence[int] | None = None) -> int:
        """Trainable parameters at the given bond sizes (default: eval ranks), bias included.

        Args:
            ranks: One size per bond; ``None``: ``eval_ranks()``.

        Returns:
            Σ_k r_k·prod(core_modes[k])·r_{k+1 mod d}, plus the bias's size.
        """
        r = list(self.eval_ranks() if ranks is None else ranks)
        d = len(self.core_modes)
        cores = sum(r[k] * math.prod(self.core_modes[k]) * r[(k + 1) % d] for k in range(d))
        return cores + (self.bias.numel() if self.bias is not None else 0)

    # ---- contraction ---------------------------------------------------------
    def _expression(self, key: str, equation: str, *shapes: tuple[int, ...]):
        cache_key = (key, shapes)
        expr = self._expr_cache.get(cache_key)
        if expr is None:
            expr = ContractionPlan(equation, *shapes)
            self._expr_cache[cache_key] = expr
        return expr

    def _weight_letters(self, reserved: str = "") -> tuple[list[str], list[str]]:
        """Core terms, and the letter of every mode in ``weight_order``."""
        terms, modes = _ring_terms(self.core_modes, reserved)
        return terms, [modes[k][j] for k, j in self.weight_order]

    def _full_equation(self) -> str:
        """Einsum equation reconstructing the weight from the cores."""
        terms, order = self._weight_letters()
        return ",".join(terms) + "->" + "".join(order)

    def full_tensor(self) -> Tensor:
        """The weight as a tensor whose axes follow ``weight_order`` (gated when selectors exist).

        Returns:
            The reconstructed weight, one axis per physical mode.
        """
        cores = self.gated_cores()
        shapes = tuple(tuple(c.shape) for c in cores)
        expr = self._expr_cache.get(("full", shapes))
        if expr is None:
            expr = self._expression("full", self._full_equation(), *shapes)
        return expr(*cores)

    def _reconstruction(self) -> ContractionPlan:
        shapes = tuple(tuple(c.shape) for c in self.cores)
        return self._expression("full", self._full_equation(), *shapes)

    def _reconstruction_cost(self, layout_elements: int) -> ContractionCost:
        """Rebuilding the weight, and copying it into its dense layout (``layout_elements``) when the
        plan's result lies out of that order."""
        plan = self._reconstruction()
        copy = ContractionCost(0, 2 * layout_elements, 1) if plan.final is not None else ContractionCost()
        return plan.cost + copy

    def _costs(self, batch: int) -> dict[str, float]:
        """Estimated cost of each training contraction for a batch, ``weight`` first (see ``choose_strategy``)."""
        raise NotImplementedError

    def choose_strategy(self, batch: int) -> str:
        """The training contraction for this batch size: ``strategy`` unless it is ``auto``, else the
        cheapest by ``_costs`` (``weight`` on a tie). The costs weigh FLOPs, memory traffic and kernel
        launches for the cores' device (``ContractionCost``): by FLOPs alone a TT-matrix at rank 19
        contracted its input, 23 % slower than rebuilding its weight. Cached per batch size and device.

        Args:
            batch: The rows contracted at once (``contraction_rows``).

        Returns:
            One of ``strategies`` other than ``auto``.
        """
        if self.strategy != "auto":
            return self.strategy
        key = ("choice", batch, self.cores[0].device.type)
        if key not in self._expr_cache:
            costs = self._costs(batch)
            self._expr_cache[key] = min(costs, key=costs.get)
        return self._expr_cache[key]

    def contraction_rows(self, x: Tensor) -> int:
        """The rows a forward on input ``x`` contracts at once (what ``training_contraction`` takes):
        examples times any leading dimensions (an embedding overrides it: one row per index).

        Args:
            x: The forward's input.

        Returns:
            The number of rows.
        """
        return x.numel() // x.shape[-1] if x.ndim else 1

    def training_contraction(self, batch_size: int) -> str:
        """The contraction a training-mode, grad-enabled forward uses for ``batch_size``
        rows: ``weight`` (reconstruct the weight, then the dense op) or the layer's
        cheaper alternative, ``input`` for a linear layer (the input contracted
        through the cores), ``gather`` for an embedding (only the rows the batch's
        indices select). A convolution always answers ``weight``. Rows are what the
        layer contracts at once: examples times any leading dimensions for a linear
        layer, indices (examples times sequence length) for an embedding. Eval-mode
        no-grad forwards always use the cached weight.

        Args:
            batch_size: The rows contracted at once.

        Returns:
            ``weight``, ``input`` or ``gather``.
        """
        return self.choose_strategy(batch_size)

    def _cache_key(self) -> tuple:
        tensors = list(self.cores) + [t for s in self.selectors.values() for t in (*s.parameters(), *s.buffers())]
        return tuple((t.data_ptr(), t._version) for t in tensors)

    def dense_weight(self) -> Tensor:
        """The layer's weight in its ordinary dense layout.

        Returns:
            ``(in_features, out_features)`` for a linear layer, ``(out, in, kh, kw)`` for
            a convolution, ``(num_embeddings, embedding_dim)`` for an embedding; gated
            by the selectors' current multipliers.
        """
        return self._dense_layout(self.full_tensor())

    def _dense_layout(self, full: Tensor) -> Tensor:
        """``full_tensor``'s axes (after any leading batch axes) laid out as the dense weight."""
        raise NotImplementedError

    def _layout_key(self) -> tuple | None:
        """What, beside the cores' shapes and ``weight_order``, ``_dense_layout`` depends on; layers with
        equal keys can be reconstructed together (None: this layer never is)."""
        return None

    def weight(self) -> Tensor:
        """``dense_weight``, reused across eval-mode no-grad calls until a parameter changes.

        Under ``torch.compile`` the weight is rebuilt inside the graph instead: the cache's
        pointer-and-version check is Python the compiled graph (a CUDA graph) must not run. During a
        :class:`~rankbench.layers.batched.CoreBank` pass it comes from the pass (batched with the
        layers of the same shapes).

        Returns:
            The weight in its dense layout (``dense_weight``).
        """
        if self._pass is not None:
            self._weight_cache = None
            return self._pass.weight(self)
        if torch.compiler.is_compiling():
            return self.dense_weight()
        if self.training or torch.is_grad_enabled():
            self._weight_cache = None
            return self.dense_weight()
        key = self._cache_key()
        if self._weight_cache is None or self._weight_cache[0] != key:
            self._weight_cache = (key, self.dense_weight())
        return self._weight_cache[1]

    def to_dense(self) -> nn.Module:
        """The plain torch layer (``nn.Linear``, ``nn.Conv2d``, ``nn.Embedding``) of this
        layer's current weight and bias, on its device: what exports ship. With
        stochastic selectors call it in eval mode (or on the ``pruned()`` layer),
        where its outputs equal this layer's.

        Returns:
            The dense layer, in this layer's train/eval mode.

        Raises:
            NotImplementedError: The layer kind has no dense counterpart.
        """
        raise NotImplementedError(f"{type(self).__name__} has no dense counterpart")

    # ---- pruning -------------------------------------------------------------
    def _clone_with(self, ranks: tuple[int, ...]) -> TensorizedLayer:
        raise NotImplementedError

    def _clone_at(self, ranks: tuple[int, ...]) -> TensorizedLayer:
        """``_clone_with``, where a bond may have size 0 (a constructor takes ranks >= 1): the
        clone is built at rank 1 there, then its cores are replaced by zero-filled ones of the
        real sizes (the two beside a zero bond hold no entries)."""
        new = self._clone_with(tuple(max(1, r) for r in ranks))
        if 0 in ranks:
            d = len(ranks)
            like = new.cores[0]
            new.ranks = tuple(ranks)
            new.cores = nn.ParameterList(
                nn.Parameter(torch.zeros(ranks[k], *self.core_modes[k], ranks[(k + 1) % d],
                                         device=like.device, dtype=like.dtype))
                for k in range(d))
            new._weight_cache, new._expr_cache = None, {}
        return new

    @torch.no_grad()
    def pruned(self) -> TensorizedLayer:
        """A selector-free copy whose bonds keep only slices with non-zero eval
        multipliers, the multipliers folded into the gated core. Its outputs equal
        this layer's eval-mode outputs.

        Returns:
            A new layer of the same kind at the eval ranks, without selectors.
        """
        d = len(self.core_modes)
        cores = [c.detach().clone() for c in self.cores]
        keep: list[Tensor] = [torch.arange(r, device=cores[0].device) for r in self.ranks]
        for key, selector in self.selectors.items():
            k = int(key)
            m = selector.deterministic().detach().to(cores[k].dtype)
            cores[k] = cores[k] * m.view(-1, *[1] * (cores[k].dim() - 1))
            nz = torch.nonzero(m != 0).flatten()
            keep[k] = nz if nz.numel() > 0 or selector.allows_zero else torch.zeros(1, dtype=torch.long,
                                                                                      device=m.device)
        for k in range(d):
            cores[k] = cores[k][keep[k]][..., keep[(k + 1) % d]]
        new = self._clone_at(tuple(len(i) for i in keep))
        for param, core in zip(new.cores, cores):
            param.copy_(core)
        if self.bias is not None:
            new.bias.copy_(self.bias)
        return new.train(self.training)


def _check_modes(name: str, modes: Sequence[int], size: int, what: str) -> None:
    if math.prod(modes) != size:
        raise RankbenchError(
            f"{name}: {what} modes {tuple(modes)} multiply to {math.prod(modes)}, not {size}: "
            f"choose modes whose product is {size}"
        )


def _matrix_layout(
    name: str, row_modes: tuple[int, ...], column_modes: tuple[int, ...], layout: str,
    nouns: tuple[str, str] = ("input", "output"),
) -> tuple[list[tuple[int, ...]], list[tuple[int, int]]]:
    """Core modes and weight order of a matrix ``rows × columns``: ``chain`` puts one
    mode per core (rows first), ``matrix`` (TT-matrix) pairs row and column mode k in core k."""
    p, q = len(row_modes), len(column_modes)
    if layout == "matrix":
        if p != q:
            raise RankbenchError(
                f"{name}: a TT-matrix needs as many {nouns[0]} modes as {nouns[1]} modes, got {p} and {q}"
            )
        return list(zip(row_modes, column_modes)), [(k, 0) for k in range(p)] + [(k, 1) for k in range(p)]
    if layout == "chain":
        return [(m,) for m in row_modes + column_modes], [(k, 0) for k in range(p + q)]
    raise RankbenchError(f"{name}: unknown layout {layout!r}: use 'chain' or 'matrix'")


class TensorizedLinear(TensorizedLayer):
    """``y = x W + b`` with ``W`` of shape ``in_modes × out_modes`` held as a TR/TT.

    ``layout="chain"`` (default): one core per mode, input modes first, then
    output modes. ``layout="matrix"``: the TT-matrix format, core ``k`` carries
    the pair (in_modes[k], out_modes[k]). ``strategy`` picks the
    training contraction: ``weight`` reconstructs W then multiplies, ``input``
    contracts the input through the cores, ``auto`` takes the cheaper by
    opt_einsum's FLOP count for the batch size at hand.

    Example:
        ``TensorizedLinear(784, 64, (28, 28), (8, 8), rank, decomposition="tr", name="fc1")``

    Args:
        in_features: Size of each input sample.
        out_features: Size of each output sample.
        in_modes: Factors of ``in_features`` (their product must equal it).
        out_modes: Factors of ``out_features``.
        ranks: One rank for every bond, or one per bond.
        decomposition: ``"tr"`` (tensor ring) or ``"tt"`` (tensor train).
        bias: Whether the layer adds a learned bias (initialised as ``nn.Linear``'s).
        strategy: The training contraction: ``"auto"``, ``"weight"`` or ``"input"``.
        name: Label of the errors raised while the layer is built (tasks pass its path).
        layout: ``"chain"`` (one core per mode) or ``"matrix"`` (TT-matrix cores).
        init: ``"variance"`` or ``"glorot"`` (see ``reset_cores``).

    Raises:
        RankbenchError: Modes that do not multiply out to the features, or bad ranks.

    Shape:
        - Input: ``(*, in_features)``.
        - Output: ``(*, out_features)``.
    """

    strategies: ClassVar[tuple[str, ...]] = ("auto", "weight", "input")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        in_modes: Sequence[int],
        out_modes: Sequence[int],
        ranks: int | Sequence[int],
        decomposition: Decomposition = "tr",
        bias: bool = True,
        strategy: Strategy = "auto",
        name: str = "linear",
        layout: Literal["chain", "matrix"] = "chain",
        init: Init = "variance",
    ) -> None:
        _check_modes(name, in_modes, in_features, "input")
        _check_modes(name, out_modes, out_features, "output")
        self.in_features, self.out_features = in_features, out_features
        self.in_modes, self.out_modes = tuple(in_modes), tuple(out_modes)
        self.strategy: Strategy = strategy
        self.label = name
        self.layout = layout
        core_modes, order = _matrix_layout(name, self.in_modes, self.out_modes, layout)
        super().__init__(core_modes, order, ranks, decomposition, fan_in=in_features, init=init,
                         glorot_fans=(in_features, out_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        if self.bias is not None:
            bound = 1.0 / math.sqrt(in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def _clone_with(self, ranks: tuple[int, ...]) -> TensorizedLinear:
        return type(self)(
            self.in_features, self.out_features, self.in_modes, self.out_modes, ranks,
            decomposition=self.decomposition, bias=self.bias is not None,
            strategy=self.strategy, name=self.label, layout=self.layout, init=self.init,
        ).to(self.cores[0].device, self.cores[0].dtype)

    def _dense_layout(self, full: Tensor) -> Tensor:
        """The ``(in_features, out_features)`` weight."""
        return full.reshape(*full.shape[:full.dim() - len(self.weight_order)], self.in_features, self.out_features)

    def _layout_key(self) -> tuple:
        return (self.in_features, self.out_features)

    @torch.no_grad()
    def to_dense(self) -> nn.Linear:
        """``nn.Linear`` holding the transposed weight (its ``(out, in)`` layout) and the bias.

        Returns:
            The dense layer, on this layer's device, in its train/eval mode.
        """
        weight = self.dense_weight()
        dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, dtype=weight.dtype)
        dense.weight.copy_(weight.T)
        if self.bias is not None:
            dense.bias.copy_(self.bias)
        return dense.to(weight.device).train(self.training)

    def _input_equation(self) -> str:
        terms, order = self._weight_letters(reserved="Z")
        p = len(self.in_modes)
        return "Z" + "".join(order[:p]) + "," + ",".join(terms) + "->Z" + "".join(order[p:])

    def _costs(self, batch: int) -> dict[str, float]:
        shapes = tuple(tuple(c.shape) for c in self.cores)
        inputs = self._expression("input", self._input_equation(), (batch, *self.in_modes), *shapes)
        n_in, n_out = self.in_features, self.out_features
        product = ContractionCost(2 * batch * n_in * n_out, batch * n_in + n_in * n_out + batch * n_out, 1)
        device = self.cores[0].device.type
        return {"weight": (self._reconstruction_cost(n_in * n_out) + product).estimate(device),
                "input": inputs.cost.estimate(device)}

    def forward(self, x: Tensor) -> Tensor:
        """``x W + b``, by the training contraction in training and the cached weight in eval.

        Args:
            x: Input of shape ``(*, in_features)``.

        Returns:
            Output of shape ``(*, out_features)``.
        """
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        use_weight = (not self.training and not torch.is_grad_enabled()) or (
            self.choose_strategy(x2.shape[0]) == "weight"
        )
        if use_weight:
            y = x2 @ self.weight()
        else:
            cores = self.gated_cores()
            xin = x2.reshape(x2.shape[0], *self.in_modes)
            expr = self._expression(
                "input", self._input_equation(), tuple(xin.shape), *(tuple(c.shape) for c in cores)
            )
            y = expr(xin, *cores).reshape(x2.shape[0], self.out_features)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        """Decomposition, layout, modes, ranks and strategy, for ``print(model)``.

        Returns:
            E.g. ``TR chain (28, 28)x(8, 8), ranks=(8, 8, 8, 8), strategy=auto``.
        """
        return (f"{self.decomposition.upper()} {self.layout} {self.in_modes}x{self.out_modes}, "
                f"ranks={self.ranks}, strategy={self.strategy}")


class TensorizedEmbedding(TensorizedLayer):
    """An embedding table ``W`` of shape ``vocab_modes × dim_modes`` held as a TR/TT.

    Same core layouts as ``TensorizedLinear`` (vocabulary modes play the input
    modes). In training, ``gather`` contracts only the slices of the vocabulary
    cores the batch's indices select (one planned contraction with the batch as
    a shared index); ``weight`` reconstructs the table and indexes it; ``auto``
    takes the cheaper by opt_einsum's FLOP count. In eval mode the reconstructed
    table is cached like every tensorized layer's weight.

    Args:
        num_embeddings: Vocabulary size (rows of the table).
        embedding_dim: Size of each embedding vector.
        vocab_modes: Factors of ``num_embeddings`` (see ``padded_modes``).
        dim_modes: Factors of ``embedding_dim`` (see ``balanced_modes``).
        ranks: One rank for every bond, or one per bond.
        decomposition: ``"tr"`` or ``"tt"``.
        strategy: The training contraction: ``"auto"``, ``"weight"`` or ``"gather"``.
        name: Label of the errors raised while the layer is built.
        layout: ``"chain"`` or ``"matrix"`` (TT-matrix cores).
        init: ``"variance"`` (the variance of ``nn.Embedding``'s N(0, 1)) or ``"glorot"``.

    Raises:
        RankbenchError: Modes that do not multiply out, or bad ranks.

    Shape:
        - Input: ``(*)``, int64 indices in ``0..num_embeddings-1``.
        - Output: ``(*, embedding_dim)``.
    """

    strategies: ClassVar[tuple[str, ...]] = ("auto", "weight", "gather")

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        vocab_modes: Sequence[int],
        dim_modes: Sequence[int],
        ranks: int | Sequence[int],
        decomposition: Decomposition = "tr",
        strategy: Literal["auto", "weight", "gather"] = "auto",
        name: str = "embedding",
        layout: Literal["chain", "matrix"] = "chain",
        init: Init = "variance",
    ) -> None:
        _check_modes(name, vocab_modes, num_embeddings, "vocabulary")
        _check_modes(name, dim_modes, embedding_dim, "embedding")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.vocab_modes, self.dim_modes = tuple(vocab_modes), tuple(dim_modes)
        self.strategy = strategy
        self.label = name
        self.layout = layout
        core_modes, order = _matrix_layout(name, self.vocab_modes, self.dim_modes, layout, ("vocabulary", "embedding"))
        # nn.Embedding's default init is N(0, 1): variance 1 = 1/(3·fan_in) with fan_in = 1/3
        super().__init__(core_modes, order, ranks, decomposition, fan_in=1.0 / 3.0, init=init,
                         glorot_fans=(num_embeddings, embedding_dim))

    def _clone_with(self, ranks: tuple[int, ...]) -> TensorizedEmbedding:
        return type(self)(
            self.num_embeddings, self.embedding_dim, self.vocab_modes, self.dim_modes, ranks,
            decomposition=self.decomposition, strategy=self.strategy, name=self.label, layout=self.layout,
            init=self.init,
        ).to(self.cores[0].device, self.cores[0].dtype)

    def _dense_layout(self, full: Tensor) -> Tensor:
        """The ``(num_embeddings, embedding_dim)`` table."""
        lead = full.shape[:full.dim() - len(self.weight_order)]
        return full.reshape(*lead, self.num_embeddings, self.embedding_dim)

    def _layout_key(self) -> tuple:
        return (self.num_embeddings, self.embedding_dim)

    @torch.no_grad()
    def to_dense(self) -> nn.Embedding:
        """``nn.Embedding`` holding the reconstructed table.

        Returns:
            The dense table, on this layer's device, in its train/eval mode.
        """
        dense = nn.Embedding(self.num_embeddings, self.embedding_dim, _weight=self.dense_weight().clone())
        return dense.train(self.training)

    def _gather_plan(self, batch: int) -> tuple[str, list[tuple[int, ...]]]:
        """Equation and operand shapes: vocabulary cores sliced per index (batch letter Z)."""
        terms, modes = _ring_terms(self.core_modes, reserved="Z")
        p = len(self.vocab_modes)
        vocab_positions = {k for k, j in self.weight_order[:p]}
        out = "Z" + "".join(modes[k][j] for k, j in self.weight_order[p:])
        shapes, new_terms = [], []
        for k, (term, core) in enumerate(zip(terms, self.cores)):
            shape = list(core.shape)
            if k in vocab_positions:
                term = "Z" + term[0] + term[2:]  # the vocabulary mode (position 0 of this core) → the batch
                shape = [batch, shape[0], *shape[2:]]
            new_terms.append(term)
            shapes.append(tuple(shape))
        return ",".join(new_terms) + "->" + out, shapes

    def _costs(self, batch: int) -> dict[str, float]:
        equation, shapes = self._gather_plan(batch)
        gather = self._expression("gather", equation, *shapes).cost
        p = len(self.vocab_modes)
        vocab_cores = {k for k, _ in self.weight_order[:p]}
        selected = sum(math.prod(shapes[k]) for k in vocab_cores)
        gather += ContractionCost(0, 2 * selected, len(vocab_cores))  # index_select of each vocabulary core
        size = self.num_embeddings * self.embedding_dim
        lookup = ContractionCost(0, 2 * batch * self.embedding_dim, 1)
        device = self.cores[0].device.type
        return {"weight": (self._reconstruction_cost(size) + lookup).estimate(device),
                "gather": gather.estimate(device)}

    def contraction_rows(self, x: Tensor) -> int:
        """One row per index: ``x.numel()``.

        Args:
            x: The forward's indices.

        Returns:
            The number of rows.
        """
        return x.numel()

    def forward(self, indices: Tensor) -> Tensor:
        """The embedding vectors of ``indices``.

        Args:
            indices: Int64 indices of any shape ``(*)``.

        Returns:
            Vectors of shape ``(*, embedding_dim)``.
        """
        flat = indices.reshape(-1)
        if (not self.training and not torch.is_grad_enabled()) or self.choose_strategy(flat.numel()) == "weight":
            out = F.embedding(flat, self.weight())
        else:
            cores = self.gated_cores()
            digits = []
            rest = flat
            for size in reversed(self.vocab_modes):
                digits.append(rest % size)
                rest = rest // size
            digits.reverse()
            p = len(self.vocab_modes)
            vocab_core = {k: i for i, (k, _) in enumerate(self.weight_order[:p])}
            operands = [core.index_select(1, digits[vocab_core[k]]).movedim(1, 0) if k in vocab_core else core
                        for k, core in enumerate(cores)]
            equation, shapes = self._gather_plan(flat.numel())
            expr = self._expression("gather", equation, *shapes)
            out = expr(*operands).reshape(flat.numel(), self.embedding_dim)
        return out.reshape(*indices.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        """Decomposition, layout, modes, ranks and strategy, for ``print(model)``.

        Returns:
            The one-line description.
        """
        return (f"{self.decomposition.upper()} {self.layout} {self.vocab_modes}x{self.dim_modes}, "
                f"ranks={self.ranks}, strategy={self.strategy}")


class TensorizedConv2d(TensorizedLayer):
    """2-D convolution whose ``(out, in, kh, kw)`` kernel is a TR/TT.

    Cores are ordered: the kernel as one mode of size ``kh·kw`` (row-major),
    then the input-channel modes, then the output-channel modes. The weight is
    reconstructed by one planned contraction and passed to ``F.conv2d``.

    Args:
        in_channels: Channels of the input.
        out_channels: Channels of the output.
        kernel_size: Side ``k`` of the square ``k × k`` kernel (one mode of size ``k·k``).
        in_modes: Factors of ``in_channels``.
        out_modes: Factors of ``out_channels``.
        ranks: One rank for every bond, or one per bond.
        decomposition: ``"tr"`` or ``"tt"``.
        stride: Stride of the convolution.
        padding: Zero-padding added to both sides of the input.
        bias: Whether the layer adds a learned bias.
        name: Label of the errors raised while the layer is built.
        init: ``"variance"`` or ``"glorot"``.

    Raises:
        RankbenchError: Modes that do not multiply out to the channels, or bad ranks.

    Shape:
        - Input: ``(N, in_channels, H, W)``.
        - Output: ``(N, out_channels, H_out, W_out)``, as ``nn.Conv2d`` with the same
          kernel, stride and padding.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        in_modes: Sequence[int],
        out_modes: Sequence[int],
        ranks: int | Sequence[int],
        decomposition: Decomposition = "tr",
        stride: int = 1,
        padding: int = 0,
        bias: bool = True,
        name: str = "conv",
        init: Init = "variance",
    ) -> None:
        _check_modes(name, in_modes, in_channels, "input")
        _check_modes(name, out_modes, out_channels, "output")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.in_modes, self.out_modes = tuple(in_modes), tuple(out_modes)
        self.label = name
        modes = (kernel_size * kernel_size,) + self.in_modes + self.out_modes
        super().__init__(
            [(m,) for m in modes], [(k, 0) for k in range(len(modes))], ranks, decomposition,
            fan_in=in_channels * kernel_size * kernel_size, init=init,
            glorot_fans=(in_channels * kernel_size * kernel_size, out_channels),
        )
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    def _clone_with(self, ranks: tuple[int, ...]) -> TensorizedConv2d:
        return type(self)(
            self.in_channels, self.out_channels, self.kernel_size, self.in_modes, self.out_modes, ranks,
            decomposition=self.decomposition, stride=self.stride, padding=self.padding,
            bias=self.bias is not None, name=self.label, init=self.init,
        ).to(self.cores[0].device, self.cores[0].dtype)

    def _dense_layout(self, full: Tensor) -> Tensor:
        """The ``(out, in, kh, kw)`` kernel, contiguous for ``F.conv2d``."""
        k = self.kernel_size
        lead = full.shape[:full.dim() - len(self.weight_order)]
        n = len(lead)
        full = full.reshape(*lead, k * k, self.in_channels, self.out_channels)
        order = (*range(n), n + 2, n + 1, n)
        return full.permute(*order).reshape(*lead, self.out_channels, self.in_channels, k, k).contiguous()

    def _layout_key(self) -> tuple:
        return (self.kernel_size, self.in_channels, self.out_channels)

    @torch.no_grad()
    def to_dense(self) -> nn.Conv2d:
        """``nn.Conv2d`` with this layer's kernel, bias, stride and padding.

        Returns:
            The dense layer, on this layer's device, in its train/eval mode.
        """
        weight = self.dense_weight()
        dense = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, stride=self.stride,
                          padding=self.padding, bias=self.bias is not None, dtype=weight.dtype)
        dense.weight.copy_(weight)
        if self.bias is not None:
            dense.bias.copy_(self.bias)
        return dense.to(weight.device).train(self.training)

    def forward(self, x: Tensor) -> Tensor:
        """The convolution of ``x`` with the reconstructed kernel.

        Args:
            x: Input of shape ``(N, in_channels, H, W)``.

        Returns:
            Output of shape ``(N, out_channels, H_out, W_out)``.
        """
        return F.conv2d(x, self.weight(), self.bias, stride=self.stride, padding=self.padding)

    def extra_repr(self) -> str:
        """Decomposition, kernel, modes and ranks, for ``print(model)``.

        Returns:
            The one-line description.
        """
        return (f"{self.decomposition.upper()} kernel {self.kernel_size}x{self.kernel_size}, "
                f"{self.in_modes}x{self.out_modes}, ranks={self.ranks}")


class TensorRingLinear(TensorizedLinear):
    """Tensor-Ring linear layer (every bond gateable, the ring closed).

    ``TensorizedLinear`` with ``decomposition="tr"`` by default.

    Takes ``TensorizedLinear``'s arguments.

    Shape:
        - Input: ``(*, in_features)``.
        - Output: ``(*, out_features)``.
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("decomposition", "tr")
        super().__init__(*args, **kwargs)


class TensorTrainLinear(TensorizedLinear):
    """Tensor-Train (TT-matrix) linear layer (boundary ranks 1).

    ``TensorizedLinear`` with ``decomposition="tt"`` by default; pass
    ``layout="matrix"`` for TT-matrix cores.

    Takes ``TensorizedLinear``'s arguments.

    Shape:
        - Input: ``(*, in_features)``.
        - Output: ``(*, out_features)``.
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("decomposition", "tt")
        super().__init__(*args, **kwargs)


class TensorRingEmbedding(TensorizedEmbedding):
    """Tensor-Ring embedding table.

    ``TensorizedEmbedding`` with ``decomposition="tr"`` by default.

    Takes ``TensorizedEmbedding``'s arguments.

    Shape:
        - Input: ``(*)``, int64 indices.
        - Output: ``(*, embedding_dim)``.
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("decomposition", "tr")
        super().__init__(*args, **kwargs)


class TensorTrainEmbedding(TensorizedEmbedding):
    """Tensor-Train (TT-matrix with ``layout="matrix"``) embedding table.

    ``TensorizedEmbedding`` with ``decomposition="tt"`` by default.

    Takes ``TensorizedEmbedding``'s arguments.

    Shape:
        - Input: ``(*)``, int64 indices.
        - Output: ``(*, embedding_dim)``.
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("decomposition", "tt")
        super().__init__(*args, **kwargs)


class TensorRingConv2d(TensorizedConv2d):
    """Tensor-Ring conv2d layer.

    ``TensorizedConv2d`` with ``decomposition="tr"`` by default.

    Takes ``TensorizedConv2d``'s arguments.

    Shape:
        - Input: ``(N, in_channels, H, W)``.
        - Output: ``(N, out_channels, H_out, W_out)``.
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("decomposition", "tr")
        super().__init__(*args, **kwargs)


class TensorTrainConv2d(TensorizedConv2d):
    """Tensor-Train conv2d layer.

    ``TensorizedConv2d`` with ``decomposition="tt"`` by default.

    Takes ``TensorizedConv2d``'s arguments.

    Shape:
        - Input: ``(N, in_channels, H, W)``.
        - Output: ``(N, out_channels, H_out, W_out)``.
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("decomposition", "tt")
        super().__init__(*args, **kwargs)


# ---- model-level helpers -------------------------------------------------------
def tensorized_layers(model: nn.Module) -> Iterator[tuple[str, TensorizedLayer]]:
    """Every tensorized layer with its module path, the name every report uses
    (``blocks.0.conv1``; ``""`` when ``model`` is itself the layer).

    Args:
        model: Any module.

    Yields:
        ``(path, layer)`` for every ``TensorizedLayer`` in module order.
    """
    for name, module in model.named_modules():
        if isinstance(module, TensorizedLayer):
            yield name, module


def bonds(model: nn.Module) -> list[Bond]:
    """Every gateable bond of every tensorized layer, in module order.

    Args:
        model: Any module.

    Returns:
        The bonds (a TT's boundary bond 0 excluded).
    """
    return [
        Bond(name, layer, k, layer.ranks[k])
        for name, layer in tensorized_layers(model)
        for k in layer.gateable_bonds()
    ]


def selectors(model: nn.Module) -> Iterator[RankSelector]:
    """Every ``RankSelector`` in the model, in module order.

    Args:
        model: Any module.

    Yields:
        The selectors.
    """
    for module in model.modules():
        if isinstance(module, RankSelector):
            yield module


def selector_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for s in selectors(model) for p in s.parameters()]


def weight_parameters(model: nn.Module) -> list[nn.Parameter]:
    ids = {id(p) for p in selector_parameters(model)}
    return [p for p in model.parameters() if id(p) not in ids]


def learned_ranks(model: nn.Module) -> dict[str, list[int]]:
    """Eval-mode bond sizes per tensorized layer, keyed by module path (all bonds, the TT boundary included)."""
    return {name: list(layer.eval_ranks()) for name, layer in tensorized_layers(model)}


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters of the model as it would be exported (pruned).

    Tensorized layers count their cores at eval ranks plus bias; selector
    parameters are excluded; every other trainable parameter counts.
    """
    total = 0
    skip = {id(p) for p in selector_parameters(model)}
    for _, layer in tensorized_layers(model):
        total += layer.parameter_count()
        skip.update(id(p) for p in layer.parameters())
    return total + sum(p.numel() for p in model.parameters() if id(p) not in skip)


@torch.no_grad()
def prune_model(model: nn.Module) -> nn.Module:
    """A copy of the model with every tensorized layer replaced by its pruned version."""
    import copy

    out = copy.deepcopy(model)
    for name, layer in list(tensorized_layers(out)):
        parent_name, _, child = name.rpartition(".")
        parent = out.get_submodule(parent_name) if parent_name else out
        setattr(parent, child, layer.pruned())
    return out
