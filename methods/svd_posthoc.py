"""Post-hoc TR-SVD / TT-SVD truncation: train at full rank, round the cores once, fine-tune.

The classic baseline every learned rank selector has to beat. The model trains at the task's
initial rank with every bond open; at the end of epoch ``epochs − finetune_epochs`` every bond is
truncated by an SVD of the trained cores, then the truncated network trains on for
``finetune_epochs`` epochs (in the tail of the task's own learning-rate schedule), so the run takes
the task's epochs like every other method.

References
----------
* TT-SVD and TT-rounding: I. V. Oseledets, "Tensor-Train Decomposition", SIAM J. Sci. Comput.
  33(5), 2011 (Alg. 1 TT-SVD, Alg. 2 TT-rounding; Thm. 2.2 bounds the error by the bonds' discarded
  singular values).
* TR-SVD: Q. Zhao, G. Zhou, S. Xie, L. Zhang, A. Cichocki, "Tensor Ring Decomposition",
  arXiv:1606.05535, 2016.

How a bond is truncated
-----------------------
Bond ``k`` joins core ``k−1`` (``r_{k−1} × n_{k−1} × r_k``) and core ``k`` (``r_k × n_k × r_{k+1}``).
The two cores are merged over the bond into the matrix ``M`` of rows ``(r_{k−1}, n_{k−1})`` and
columns ``(n_k, r_{k+1})``, which is SVD'd, cut to ``r'`` singular values, and split back as
``U√S`` and ``√S Vᵀ``. A ring's wrap-around bond 0 (cores ``d−1`` and ``0``) is one more such
merge, so every bond of a ring is rounded the same way; a train's bond 0 has size 1 and is left.

The SVD is taken in the metric of the rest of the network. The other ``d−2`` cores (the bond's
*environment*, a chain from bond ``k+1`` around to bond ``k−1``) have a Gram matrix ``Γ`` over the
pair of bonds ``(k−1, k+1)``, propagated core by core (``r⁴`` numbers; the environment's modes are
never formed); its Kronecker factors ``Γ ≈ Γ_a ⊗ Γ_b`` (the flip-flop fixed point
``Γ_a ∝ tr_b[Γ (1 ⊗ Γ_b⁺)]``, ``Γ_b ∝ tr_a[Γ (Γ_a⁺ ⊗ 1)]``) weight ``M``'s rows by ``Γ_a^½``
and its columns by ``Γ_b^½`` before the SVD, and the split is unweighted after it. Without the
weighting the spectrum of ``M`` depends on the arbitrary gauge training leaves on bonds ``k±1``
(an invertible ``P`` between two cores changes it, not the weight); with it, it does not. For a
train the environment splits at its size-1 bond into a left and a right chain, ``Γ`` is exactly a
Kronecker product, and the weighted spectrum is the spectrum of the weight's unfolding at that bond
(up to one factor per bond): what TT-SVD (Oseledets' Alg. 1) truncates, computed from the cores
without the full weight, and the sequence of truncations keeps his error bound (Thm. 2.2). A ring
has no such exact canonical form; the Kronecker factors are its best separable stand-in (on
gauge-skewed random rings cut to half their rank, 1.7-5x smaller weight error than the unweighted
two-core SVD). Directions the environment cannot see (the null spaces of ``Γ_a``, ``Γ_b``) are
dropped: they do not change the weight. Everything runs in float64. The rounding machinery (the
weighted SVD, ``truncate_bond``, ``energy_ranks``, ``TruncationMask``, ``current_cores``,
``write_back``) is rankbench's, in ``rankbench.layers.rounding``, shared with ``trp``; this file
holds the method and its target-compression rule.

Ranks are chosen from the spectra of the trained (untruncated) cores, every bond at once, then the
bonds are truncated one after another, in layer and bond order, each on the current cores:

* ``energy`` (used when ``target_compression`` is none): per bond, the fewest singular values
  whose squares hold ``energy`` of the bond's squared spectrum (relative Frobenius error of that
  bond at most ``sqrt(1 − energy)``; for a train that is TT-SVD at relative accuracy
  ``sqrt((d − 1)(1 − energy))``, Oseledets' Thm. 2.2).
* ``target_compression``: one global order of all slices. Each bond keeps its first slice; every
  other singular value ``σ_j`` of bond ``b`` is ranked by ``σ_j / ‖σ^(b)‖₂`` (normalised per
  bond: for a train every bond's spectrum has the layer's norm, so this greedily minimises the sum
  of the bonds' relative squared errors, the bound of Oseledets' Thm. 2.2, and layers of any scale
  compare), and the longest prefix of that order whose model still meets the target is kept
  (compression ≥ target; one more slice of the order would fall below it). A target no truncation
  reaches leaves every bond at rank 1 (and warns). The compression is rankbench's: dense
  parameters over the parameters of the pruned model, counted as the trainer counts them.

Numerically zero singular values (below ``100·eps`` of the cores' dtype, relative to the bond's
largest) are never kept, so a bond of true rank ``k`` rounds to ``k`` at ``energy=1``.

Masks, not new shapes
---------------------
Every bond carries a :class:`TruncationMask` from the start: a fixed 0/1 multiplier buffer, all
ones before the truncation. The truncation writes the new cores back in place, zero-padded to the
original bond sizes (the kept slices first), and sets each mask to ones on its kept slices and
zeros after; no parameter changes shape, so the optimizer, ``CoreBank`` and checkpoints carry on.
Eval ranks, parameter counts, pruning and exports then see the truncated ranks through the masks
(``deterministic()``), and no optimizer step brings a cut slice back: its multiplier stays 0.
The masks are buffers (in the model's checkpoint); whether and where the model was truncated is
``state_dict()``, so a resumed run neither truncates twice nor forgets to.

Defaults and why
----------------
* ``finetune_epochs`` none: a tenth of the run's epochs, rounded up (30 of mlp2's 300, 15 of
  lenet5's 150, 20 of resnet32's 200, 3 of sst's and iwslt14's 30). Fine-tuning, as Renda, Frankle
  and Carbin ("Comparing Rewinding and Fine-tuning in Neural Network Pruning", ICLR 2020) define the
  standard practice, trains the kept weights on at a small learning rate: the last tenth of every
  task's schedule is its low-rate tail (mlp2's ExponentialLR at 0.99^270 ≈ 0.07 of its rate,
  lenet5's cosine below 3 %, resnet32 after its last step), so the truncated network fine-tunes
  exactly where the task's schedule would have it, and the run's epochs stay the task's (the
  comparison with the other methods stays at equal training). The tenth itself is rankbench's
  choice, not a number from a paper. A ``finetune_epochs`` of at least the run's epochs (a 1-epoch
  ``check-plugin`` run, or 0) truncates at the end of the last epoch: no fine-tuning.
* ``energy`` 0.99: 99 % of every bond's squared spectrum, at most 10 % relative error per bond.
* ``target_compression`` none; a matched-compression study sets it (its knob, ``found_by="target"``).

Caveat: the optimizer's state is left as it is (``Method.set_optimizer`` would let the method reset it;
``trp`` zeroes the state of the slices it cuts), so Adam's moments of the rewritten cores (kept in the
old gauge) act for their decay time (about 1/(1−β₁) steps) on the new ones, and the cut slices' moments
move parameters their masks hold out.

What tensorly and t3nsor get wrong (checked in their code)
----------------------------------------------------------
* tensorly 0.10.0, ``tensorly/decomposition/_tr_svd.py``, ``tensor_ring`` (the file was
  ``_tr.py`` until commit 0d5af9d5, Feb 2024): the first SVD, of the mode-0 unfolding
  ``n_0 × (n_1⋯n_{d−1})``, keeps exactly ``rank[0]*rank[1]`` singular vectors
  (``svd_interface(unfolding, n_eigenvecs=rank[0] * rank[1])``) and reshapes ``U`` into
  ``(n_0, r_0, r_1)``: the rank of the first unfolding must factor as ``r_0·r_1``, the split of
  those singular vectors into the wrap-around bond and bond 1 is an arbitrary reshape of ``U``'s
  columns, not fitted, and ``r_0·r_1 > min(n_0, n_1⋯n_{d−1})`` is a ``ValueError`` (a rank-25 ring
  whose first mode is lenet5's 25-entry kernel cannot be produced from mode 0 at all). Later ranks
  are only capped (``min(n_row, n_column, rank[k+1])``); there is no accuracy or energy argument,
  and it decomposes a dense tensor, never rounds existing cores.
* t3nsor (KhrulkovV/tt-pytorch @ 3182e8d, ``t3nsor/decompositions.py``): ``to_tt_tensor(tens,
  max_tt_rank=10, epsilon=None)`` never reads ``epsilon``; every rank is
  ``min(max_tt_rank, rows, columns)``. ``to_tt_matrix(mat, shape, max_tt_rank=10, epsilon=None)``
  passes ``epsilon`` on to it, so a requested accuracy is silently the fixed-``max_tt_rank``
  truncation. t3nsor has no TR decomposition and no rounding of existing cores.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import ClassVar

import torch
from torch import Tensor, nn

from rankbench.plugin import (
    Bond,
    Hyper,
    Knob,
    Method,
    RankbenchError,
    RankSelector,
    Search,
    TruncationMask,
    bond_spectrum,
    bonds,
    current_cores,
    energy_ranks,
    tensorized_layers,
    truncate_bond,
    write_back,
)

# ---------------------------------------------------------------------------- rank rules


def _numerical(spectrum: Tensor, rtol: float) -> Tensor:
    """The singular values above ``rtol`` of the largest (the spectrum sorted descending)."""
    if spectrum.numel() == 0 or float(spectrum[0]) <= 0.0:
        return spectrum[:0]
    return spectrum[spectrum > rtol * spectrum[0]]


def target_order(spectra: Sequence[Tensor], rtol: float = 0.0) -> list[int]:
    """The global order in which slices beyond each bond's first are kept: bond indices, one entry per
    slice, by ``σ_j / ‖σ‖₂`` of their bond, largest first (ties: earlier bond, then earlier slice)."""
    candidates = []
    for b, spectrum in enumerate(spectra):
        kept = _numerical(spectrum.double(), rtol)
        if kept.numel() < 2:
            continue
        normalised = kept / torch.linalg.vector_norm(kept)
        candidates += [(-float(v), b, j) for j, v in enumerate(normalised.tolist()) if j > 0]
    return [b for _, b, _ in sorted(candidates)]


def target_ranks(spectra: Sequence[Tensor], compression: Callable[[list[int]], float], target: float,
                 rtol: float = 0.0) -> tuple[list[int], bool]:
    """Ranks for ``target``: every bond at 1, then the longest prefix of ``target_order`` whose
    ``compression(ranks)`` is still >= ``target`` (the compression falls with every slice added, so
    the prefix is bisected). Returns the ranks and whether the target is met (all ones when not)."""
    order = target_order(spectra, rtol)

    def ranks_of(prefix: int) -> list[int]:
        ranks = [1] * len(spectra)
        for b in order[:prefix]:
            ranks[b] += 1
        return ranks

    if compression(ranks_of(0)) < target:
        return ranks_of(0), False
    low, high = 0, len(order)  # compression(prefix low) >= target; find the largest such prefix
    while low < high:
        middle = (low + high + 1) // 2
        if compression(ranks_of(middle)) >= target:
            low = middle
        else:
            high = middle - 1
    return ranks_of(low), True


# ---------------------------------------------------------------------------- the method


class SvdPosthoc(Method):
    """Full-rank training, one TR-SVD/TT-SVD rounding of every bond at epoch ``epochs − finetune_epochs``
    (by ``energy`` or to ``target_compression``), then fine-tuning (see the module's docstring)."""

    name: ClassVar[str] = "svd_posthoc"
    description: ClassVar[str] = ("train at full rank, then TR/TT-SVD rounding of every bond (energy or target "
                                  "compression) and fine-tuning")
    compression_knob: ClassVar[Knob | None] = Knob("target_compression", increases_compression=True,
                                                   found_by="target")
    hyperparameters: ClassVar[dict[str, Hyper]] = {
        "target_compression": Hyper(
            None, "round to the least truncation whose compression is >= this (none: the energy rule)",
            type=float, minimum=1.0, nullable=True, search=Search(2.0, 500.0, log=True), label=True),
        "energy": Hyper(0.99, "without a target: per bond, keep the fewest singular values holding this share of "
                        "the squared spectrum", minimum=0.0, maximum=1.0, label=True),
        "finetune_epochs": Hyper(
            None, "epochs of fine-tuning after the truncation (none: a tenth of the run's epochs, rounded up; at "
            "least the run's epochs: truncate after the last)", type=int, minimum=0, nullable=True),
    }

    def __init__(self, params: Mapping) -> None:
        super().__init__(params)
        self.epochs: int | None = None
        """The epochs the training runs to (``on_train_begin``)."""
        self.truncated = False
        self.truncation_epoch: int | None = None
        """The epoch at whose end the model was truncated."""
        self.ranks: dict[str, int] = {}
        """Each bond's rank after the truncation, by bond name."""
        self.target_met: bool | None = None

    # ---- hooks
    def selector(self, bond: Bond) -> RankSelector | None:
        return TruncationMask(bond.size)

    def on_train_begin(self, model: nn.Module, epochs: int, steps_per_epoch: int) -> None:
        self.epochs = epochs

    def finetune_epochs(self, epochs: int) -> int:
        value = self.params["finetune_epochs"]
        return math.ceil(epochs / 10) if value is None else value

    def truncate_after(self, epochs: int) -> int:
        """The epoch at whose end the cores are truncated: ``epochs − finetune_epochs``, or the last
        epoch when the fine-tuning would take every epoch (or none is asked for)."""
        finetune = self.finetune_epochs(epochs)
        return epochs - finetune if 0 < finetune < epochs else epochs

    def on_epoch_end(self, model: nn.Module, epoch: int, metrics: Mapping[str, float]) -> None:
        if self.truncated:
            return
        if self.epochs is None:
            raise RankbenchError(f"method {self.name} truncates at epoch epochs - finetune_epochs, but the trainer "
                                 "never told it the epochs (Method.on_train_begin): this rankbench is too old for it")
        if epoch < self.truncate_after(self.epochs):
            return
        dense = None
        if "compression" in metrics:
            dense = round(metrics["compression"] * count_parameters_at(model, self._bond_ranks(model)))
        self.truncate(model, dense)
        self.truncation_epoch = epoch

    def state_dict(self) -> dict:
        return {"truncated": self.truncated, "truncation_epoch": self.truncation_epoch, "ranks": dict(self.ranks),
                "target_met": self.target_met}

    def load_state_dict(self, model: nn.Module, state: Mapping) -> None:
        self.truncated = bool(state.get("truncated", False))
        self.truncation_epoch = state.get("truncation_epoch")
        self.ranks = dict(state.get("ranks", {}))
        self.target_met = state.get("target_met")
        for bond_name, rank in self.ranks.items():  # the masks came back with the model; this keeps them so
            selector = self.selectors.get(bond_name)
            if isinstance(selector, TruncationMask):
                selector.keep(rank)

    # ---- truncation
    def masks(self) -> dict[str, TruncationMask]:
        return {n: s for n, s in self.selectors.items() if isinstance(s, TruncationMask)}

    @staticmethod
    def _bond_ranks(model: nn.Module) -> dict[str, tuple[int, ...]]:
        return {name: layer.eval_ranks() for name, layer in tensorized_layers(model)}

    @torch.no_grad()
    def truncate(self, model: nn.Module, dense_parameters: int | None = None) -> dict[str, int]:
        """Round every masked bond of ``model`` (the one ``attach`` saw) by the rule the parameters ask for,
        write the cores back zero-padded and set the masks; returns the ranks by bond name.
        ``dense_parameters`` (the dense model's count) is what ``target_compression`` divides."""
        masks = self.masks()
        layers = dict(tensorized_layers(model))
        cores = {name: current_cores(layer) for name, layer in layers.items()}
        chosen_bonds = [b for b in bonds(model) if b.name in masks and len(b.layer.cores) >= 2]
        rtol = 100 * max((torch.finfo(layer.cores[0].dtype).eps for layer in layers.values()),
                         default=torch.finfo(torch.float32).eps)
        spectra = [bond_spectrum(cores[b.layer_name], b.index) for b in chosen_bonds]
        if self.params["target_compression"] is None:
            chosen = energy_ranks(spectra, self.params["energy"], rtol)
            self.target_met = None
        else:
            if dense_parameters is None:
                raise RankbenchError(f"method {self.name}: target_compression needs the dense model's parameter count")
            current = {name: [c.shape[0] for c in layer_cores] for name, layer_cores in cores.items()}
            other = _other_parameters(model)

            def compression(ranks: list[int]) -> float:
                sizes = {name: list(s) for name, s in current.items()}
                for bond, rank in zip(chosen_bonds, ranks):
                    sizes[bond.layer_name][bond.index] = rank
                return dense_parameters / (other + sum(layers[n].parameter_count(s) for n, s in sizes.items()))

            target = self.params["target_compression"]
            chosen, self.target_met = target_ranks(spectra, compression, target, rtol)
            if not self.target_met:
                warnings.warn(f"{self.name}: no truncation reaches {target:g}x (every bond at rank 1 gives "
                              f"{compression(chosen):.3g}x): every bond keeps rank 1")
        for bond, rank in zip(chosen_bonds, chosen):
            layer_cores = cores[bond.layer_name]
            if rank < layer_cores[bond.index].shape[0]:
                truncate_bond(layer_cores, bond.index, rank)
        for name, layer in layers.items():
            write_back(layer, cores[name])
        self.ranks = {}
        for bond in chosen_bonds:
            rank = cores[bond.layer_name][bond.index].shape[0]
            masks[bond.name].keep(rank)
            self.ranks[bond.name] = rank
        self.truncated = True
        return dict(self.ranks)


def _other_parameters(model: nn.Module) -> int:
    """Trainable parameters outside every tensorized layer (counted as they are)."""
    inside = {id(p) for _, layer in tensorized_layers(model) for p in layer.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in inside)


def count_parameters_at(model: nn.Module, ranks: Mapping[str, Sequence[int]]) -> int:
    """The exported model's parameters with each tensorized layer at ``ranks[layer name]``."""
    layers = tensorized_layers(model)
    return _other_parameters(model) + sum(layer.parameter_count(ranks[name]) for name, layer in layers)
