"""Uniform-rank tensor ring/train (Wang et al. 2018 style baseline), optionally with its own rank per layer.

``--set ranks=conv1:10,fc1:8`` gives the named layers their own rank (every bond of the layer; a
tensor train's boundary bond stays 1) and ``conv1:6-20-14-8`` one rank per bond (in the layer's bond
order, as the run's "learned ranks per layer" column prints them); the other layers keep ``rank``. A
progressive rank search (``rankbench.study.progressive``, PSTRN) trains its candidates this way.

The task builds its model at ``rank`` (``Method.initial_rank``); ``attach`` then rebuilds each named
layer at its own ranks (``TensorizedLayer._clone_with``, the same constructor at other bond sizes, so
its cores are drawn at the variance a model built at those ranks gets). This works for every task
without changing any: the layers are found by their module path, which every report names them by.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import ClassVar

from torch import nn

from rankbench.plugin import Hyper, Knob, Method, MethodContext, RankbenchError, Search, tensorized_layers

RANKS_EXAMPLE = "ranks=conv1:10,conv2:15,fc1:8,fc2:5"
_ITEM = re.compile(r"^\s*([^\s:,]+)\s*:\s*(\d+(?:\s*-\s*\d+)*)\s*$")


def parse_layer_ranks(text: str | None) -> dict[str, tuple[int, ...]]:
    """``"conv1:10,fc1:4-6-6"`` → ``{"conv1": (10,), "fc1": (4, 6, 6)}``; None, ``""`` or ``"none"`` → ``{}``.

    One rank means every bond of the layer; several, one per bond. Each layer once, each rank >= 1.

    Raises:
        RankbenchError: A malformed item, a layer named twice or a rank below 1 (one line naming the fix).
    """
    if text is None or text.strip().lower() in ("", "none"):
        return {}
    out: dict[str, tuple[int, ...]] = {}
    for item in text.split(","):
        match = _ITEM.match(item)
        if match is None:
            raise RankbenchError(f"ranks={text}: {item.strip() or 'an empty item'!r} is not LAYER:RANK (or "
                                 f"LAYER:R1-R2-..., one per bond): write e.g. {RANKS_EXAMPLE}")
        layer, ranks = match.group(1), tuple(int(r) for r in match.group(2).split("-"))
        if layer in out:
            raise RankbenchError(f"ranks={text}: layer {layer} is named twice: give each layer once")
        if min(ranks) < 1:
            raise RankbenchError(f"ranks={text}: {layer}'s rank must be >= 1")
        out[layer] = ranks
    return out


def format_layer_ranks(ranks: Mapping[str, int | tuple[int, ...]]) -> str:
    """The inverse of ``parse_layer_ranks``: ``{"conv1": 10, "fc1": (4, 6)}`` → ``"conv1:10,fc1:4-6"``."""
    def text(value: int | tuple[int, ...]) -> str:
        return str(value) if isinstance(value, int) else "-".join(map(str, value))

    return ",".join(f"{layer}:{text(value)}" for layer, value in ranks.items())


def set_layer_ranks(model: nn.Module, ranks: Mapping[str, tuple[int, ...]]) -> None:
    """Rebuild each named tensorized layer of ``model`` at its ranks, in place (before any selector is
    attached). A layer already at those ranks is left as it is, so ``ranks=conv1:10`` with ``rank=10``
    is exactly the uniform model.

    Raises:
        RankbenchError: A name that is no tensorized layer of the model, or a per-bond list of the
            wrong length (one line listing the valid layers, or the layer's bond count).
    """
    layers = dict(tensorized_layers(model))
    for name in ranks:
        if name not in layers:
            raise RankbenchError(f"ranks: the model has no tensorized layer {name!r}: valid are "
                                 f"{', '.join(layers)} (e.g. {RANKS_EXAMPLE})")
    for name, wanted in ranks.items():
        layer = layers[name]
        bonds = len(layer.ranks)
        if len(wanted) not in (1, bonds):
            raise RankbenchError(f"ranks: {name} has {bonds} bonds: give one rank ({name}:R) or {bonds} "
                                 f"({name}:{'-'.join(['R'] * bonds)}), not {len(wanted)}")
        target = layer._normalise_ranks(wanted[0] if len(wanted) == 1 else list(wanted), bonds,
                                        layer.decomposition)
        if tuple(target) == tuple(layer.ranks):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer._clone_with(tuple(target)))


class UniformRank(Method):
    """Every bond has the same rank r; no selector, no penalty. Sweeping r gives
    the uniform-rank trade-off curve the other methods are compared against.
    ``ranks`` gives named layers their own ranks (a rank search's candidates)."""

    name: ClassVar[str] = "trn"
    description: ClassVar[str] = "uniform-rank tensor ring/train, every bond rank r, no selection"
    role: ClassVar[str] = "uniform"
    checks_tasks: ClassVar[bool] = True
    compression_knob: ClassVar[Knob | None] = Knob("rank", increases_compression=False, found_by="model")
    hyperparameters: ClassVar[dict[str, Hyper]] = {
        "rank": Hyper(10, "rank of every bond", minimum=1, search=Search(2, 30), label=True),
        "ranks": Hyper(None, "own ranks of named layers, LAYER:RANK,... or LAYER:R1-R2-... per bond (others keep "
                             "rank)", type=str, nullable=True, label=True),
    }

    def __init__(self, params: Mapping) -> None:
        super().__init__(params)
        self.layer_ranks = parse_layer_ranks(self.params.get("ranks"))

    def initial_rank(self, task_rank: int) -> int:
        return self.params["rank"]

    def attach(self, model: nn.Module, context: MethodContext) -> None:
        """Rebuild the layers ``ranks`` names at their own ranks, then attach as every method does."""
        set_layer_ranks(model, self.layer_ranks)
        super().attach(model, context)
