"""Rounding trained TR/TT cores bond by bond: environment-weighted SVDs of merged core pairs, rank rules,
truncation written back in place behind fixed 0/1 masks, and the nuclear-norm subgradient of a bond.

What the truncating methods share (``svd_posthoc`` rounds once, a trained-rank-pruning method rounds
every few steps); plugins import it from :mod:`rankbench.plugin`.

How a bond is truncated
-----------------------
Bond ``k`` joins core ``k−1`` (``r_{k−1} × n_{k−1} × r_k``) and core ``k`` (``r_k × n_k × r_{k+1}``). The two
cores are merged over the bond into the matrix ``M`` of rows ``(r_{k−1}, n_{k−1})`` and columns
``(n_k, r_{k+1})``, which is SVD'd, cut to ``r'`` singular values, and split back as ``U√S`` and ``√S Vᵀ``.
A ring's wrap-around bond 0 (cores ``d−1`` and ``0``) is one more such merge; a train's bond 0 has size 1.

The SVD is taken in the metric of the rest of the network. The other ``d−2`` cores (the bond's
*environment*, a chain from bond ``k+1`` around to bond ``k−1``) have a Gram matrix ``Γ`` over the pair of
bonds ``(k−1, k+1)``, propagated core by core (``r⁴`` numbers; the environment's modes are never formed);
its Kronecker factors ``Γ ≈ Γ_a ⊗ Γ_b`` (the flip-flop fixed point ``Γ_a ∝ tr_b[Γ (1 ⊗ Γ_b⁺)]``,
``Γ_b ∝ tr_a[Γ (Γ_a⁺ ⊗ 1)]``) weight ``M``'s rows by ``Γ_a^½`` and its columns by ``Γ_b^½`` before the SVD,
and the split is unweighted after it. Without the weighting the spectrum of ``M`` depends on the arbitrary
gauge training leaves on bonds ``k±1``; with it, it does not. For a train the environment splits at its
size-1 bond into a left and a right chain, ``Γ`` is exactly a Kronecker product, and the weighted spectrum
is the spectrum of the weight's unfolding at that bond (TT-SVD's, Oseledets 2011, Alg. 1). A ring has no
such exact canonical form; the Kronecker factors are its best separable stand-in. Directions the
environment cannot see (the null spaces of ``Γ_a``, ``Γ_b``) are dropped. Everything runs in float64.

Masks, not new shapes
---------------------
A truncation writes the new cores back in place, zero-padded to the original bond sizes (the kept
slices first); a :class:`TruncationMask` on each bond then says which slices are kept, so eval ranks,
parameter counts, pruning and exports see the truncated ranks while no parameter changes shape (the
optimizer, ``CoreBank`` and checkpoints carry on).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from rankbench.layers.tensorized import RankSelector, TensorizedLayer

GRAM_RTOL = 1e-12
"""Eigenvalues of an environment's Gram below this fraction of the largest count as zero: directions
the rest of the network does not see (environment singular values below 1e-6 of the largest)."""


class TruncationMask(RankSelector):
    """A fixed 0/1 multiplier per slice of one bond (buffer ``mask``), for methods that truncate the cores
    themselves: all ones until a truncation, then ones on the kept slices (the first ``rank``) and zeros
    after. Nothing in it trains; the mask travels with the model's ``state_dict``.

    Training multipliers are the mask too (``sample`` is ``deterministic``): a subclass that lets cut slices
    train on overrides ``sample``.

    Args:
        size: The bond's size.
    """

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.register_buffer("mask", torch.ones(size))

    def deterministic(self) -> Tensor:
        """The mask.

        Returns:
            The 0/1 multipliers, ones on the kept slices.
        """
        return self.mask

    @torch.no_grad()
    def keep(self, rank: int) -> None:
        """Ones on the first ``rank`` slices, zeros after.

        Args:
            rank: The number of slices kept (the truncation wrote them first).
        """
        self.mask.zero_()
        self.mask[:rank] = 1.0


# ---------------------------------------------------------------------------- rank rules


def _numerical(spectrum: Tensor, rtol: float) -> Tensor:
    """The singular values above ``rtol`` of the largest (the spectrum sorted descending)."""
    if spectrum.numel() == 0 or float(spectrum[0]) <= 0.0:
        return spectrum[:0]
    return spectrum[spectrum > rtol * spectrum[0]]


def energy_ranks(spectra: Sequence[Tensor], energy: float, rtol: float = 0.0) -> list[int]:
    """Per bond, the fewest leading singular values whose squares hold ``energy`` of the squared spectrum.

    Args:
        spectra: One descending spectrum per bond (``bond_spectrum``).
        energy: The share of the squared spectrum to keep, in [0, 1].
        rtol: Values at or below this fraction of the bond's largest count as zero (never kept).

    Returns:
        One rank per bond, at least 1 (a bond whose spectrum is all zero keeps one slice).
    """
    ranks = []
    for spectrum in spectra:
        kept = _numerical(spectrum.double(), rtol)
        if kept.numel() == 0:
            ranks.append(1)
            continue
        cumulative = torch.cumsum(kept**2, 0)
        enough = cumulative >= energy * cumulative[-1]
        ranks.append(max(1, int(torch.nonzero(enough)[0]) + 1))
    return ranks


def value_ranks(spectra: Sequence[Tensor], threshold: float, rtol: float = 0.0) -> list[int]:
    """Per bond, the leading singular values at least ``threshold`` times the bond's largest.

    Args:
        spectra: One descending spectrum per bond (``bond_spectrum``).
        threshold: The kept values' least ratio to the bond's largest, in [0, 1] (1: the largest alone,
            and values equal to it).
        rtol: Values at or below this fraction of the bond's largest count as zero (never kept).

    Returns:
        One rank per bond, at least 1.
    """
    ranks = []
    for spectrum in spectra:
        kept = _numerical(spectrum.double(), rtol)
        if kept.numel() == 0:
            ranks.append(1)
            continue
        ranks.append(max(1, int((kept >= threshold * kept[0]).sum())))
    return ranks


# ---------------------------------------------------------------------------- environments


def _flat(core: Tensor) -> Tensor:
    """A core as ``(r_left, modes, r_right)``."""
    return core.reshape(core.shape[0], -1, core.shape[-1])


def _trace_normalised(x: Tensor) -> Tensor:
    trace = x.diagonal().sum()
    return x / trace if float(trace) > 0 else x


def _psd(gram: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``Γ^½``, its pseudo-inverse and ``Γ⁺`` of a PSD matrix (eigenvalues below ``GRAM_RTOL`` of the
    largest dropped)."""
    values, vectors = torch.linalg.eigh((gram + gram.T) / 2)
    top = float(values.max()) if values.numel() else 0.0
    seen = values > GRAM_RTOL * top if top > 0 else torch.zeros_like(values, dtype=torch.bool)
    safe = torch.where(seen, values, torch.ones_like(values))
    root = torch.where(seen, safe.sqrt(), torch.zeros_like(values))
    inverse_root = torch.where(seen, safe.rsqrt(), torch.zeros_like(values))
    inverse = torch.where(seen, 1.0 / safe, torch.zeros_like(values))
    return tuple((vectors * f) @ vectors.T for f in (root, inverse_root, inverse))  # type: ignore[return-value]


def _environment(cores: Sequence[Tensor], k: int) -> tuple[Tensor, float]:
    """Bond ``k``'s environment Gram scaled to max 1 (``environment_gram``), and the log of the factor
    that scaling removed (the Gram is ``exp(log_scale)`` times the one returned)."""
    d = len(cores)
    like = cores[k]
    eye = torch.eye(like.shape[-1], dtype=like.dtype, device=like.device)
    gram = eye[:, None, :, None] * eye[None, :, None, :]
    log_scale = 0.0
    for m in range(d - 2):
        core = cores[(k + 1 + m) % d]
        out = torch.zeros(*gram.shape[:2], core.shape[-1], core.shape[-1], dtype=like.dtype, device=like.device)
        for i in range(core.shape[1]):
            out += core[:, i, :].T @ gram @ core[:, i, :]
        top = out.abs().max()
        if float(top) > 0:
            gram = out / top
            log_scale += math.log(float(top))
        else:
            gram = out
    return gram, log_scale


def environment_gram(cores: Sequence[Tensor], k: int) -> Tensor:
    """``Γ[b, b', a, a'] = Σ_rest E[b, rest, a] E[b', rest, a']`` of bond ``k``'s environment ``E`` (cores
    ``k+1 … k−2``, from bond ``k+1``, index ``b``, around to bond ``k−1``, index ``a``), propagated core by
    core (``r⁴`` numbers at a time; the environment's modes are never formed); scaled to max 1."""
    return _environment(cores, k)[0]


def _kronecker_factors(gram: Tensor, iterations: int = 100) -> tuple[Tensor, Tensor]:
    """``(Γ_a, Γ_b)``, trace-normalised, with ``Γ ≈ Γ_b ⊗ Γ_a`` (``Γ[b, b', a, a']``), by the flip-flop fixed
    point; for a train, where ``Γ`` is exactly a Kronecker product, one pass reaches it."""
    inverse_b = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    gram_a = gram_b = None
    for _ in range(iterations):
        new_a = _trace_normalised(torch.einsum("pqxy,qp->xy", gram, inverse_b))
        inverse_a = _psd(new_a)[2]
        gram_b = _trace_normalised(torch.einsum("pqxy,yx->pq", gram, inverse_a))
        inverse_b = _psd(gram_b)[2]
        done = gram_a is not None and float(torch.linalg.matrix_norm(new_a - gram_a)) <= 1e-12 * float(
            torch.linalg.matrix_norm(new_a))
        gram_a = new_a
        if done:
            break
    return gram_a, gram_b


def _environment_grams(cores: Sequence[Tensor], k: int, iterations: int = 100) -> tuple[Tensor, Tensor]:
    """``(Γ_a, Γ_b)``: the Kronecker factors ``Γ ≈ Γ_a ⊗ Γ_b`` of bond ``k``'s environment Gram on bonds
    ``k−1`` and ``k+1``, by the flip-flop fixed point ``Γ_a ∝ tr_b[Γ (1 ⊗ Γ_b⁺)]``,
    ``Γ_b ∝ tr_a[Γ (Γ_a⁺ ⊗ 1)]`` (trace-normalised). The fixed point moves with any invertible change of
    basis ("gauge") on either bond, so the weighted spectrum does not depend on the gauge training left."""
    return _kronecker_factors(environment_gram(cores, k), iterations)


# ---------------------------------------------------------------------------- bond rounding


def _weighted_svd(cores: Sequence[Tensor], k: int, gram_a: Tensor, gram_b: Tensor) -> tuple[Tensor, ...]:
    """``(U, S, V, Γ_a^½, Γ_b^½, Γ_a^+½, Γ_b^+½)`` with the weighted pair ``Ã B̃ = U diag(S) Vᵀ`` (``U`` of
    rows ``(r_{k−1}, n_{k−1})``, ``V`` of rows ``(n_k, r_{k+1})``). Two QRs leave one ``r_k × r_k`` SVD."""
    d = len(cores)
    left, right = cores[(k - 1) % d], cores[k]
    root_a, inverse_a, _ = _psd(gram_a)
    root_b, inverse_b, _ = _psd(gram_b)
    weighted_left = torch.einsum("xa,aib->xib", root_a, left).reshape(-1, left.shape[-1])
    weighted_right = torch.einsum("aib,by->aiy", right, root_b).reshape(right.shape[0], -1)
    q_left, r_left = torch.linalg.qr(weighted_left)
    q_right, r_right = torch.linalg.qr(weighted_right.T)
    u, s, vh = torch.linalg.svd(r_left @ r_right.T, full_matrices=False)
    return q_left @ u, s, q_right @ vh.T, root_a, root_b, inverse_a, inverse_b


def _bond_svd(cores: Sequence[Tensor], k: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The environment-weighted SVD of the merged pair over bond ``k``: ``(U, S, V, Γ_a^+½, Γ_b^+½)``."""
    u, s, v, _, _, inverse_a, inverse_b = _weighted_svd(cores, k, *_environment_grams(cores, k))
    return u, s, v, inverse_a, inverse_b


def bond_spectrum(cores: Sequence[Tensor], k: int) -> Tensor:
    """The environment-weighted singular values of bond ``k`` (for a train: the singular values of the
    weight's unfolding at the bond, up to one positive factor per bond).

    Args:
        cores: The layer's cores as float64 ``(r, n, r')`` tensors (``current_cores``).
        k: The bond, joining cores ``k−1`` and ``k``.

    Returns:
        The spectrum, descending, of length at most ``r_k``.
    """
    return _bond_svd(cores, k)[1]


def _cut(cores: list[Tensor], k: int, svd: tuple[Tensor, Tensor, Tensor, Tensor, Tensor], rank: int) -> None:
    """Replace cores ``k−1`` and ``k`` by the weighted pair cut to ``rank``, split ``U√S``, ``√S Vᵀ`` and
    unweighted."""
    d = len(cores)
    left, right = cores[(k - 1) % d], cores[k]
    u, s, v, inverse_a, inverse_b = svd
    rank = max(1, min(rank, s.numel()))
    root_s = s[:rank].sqrt()
    new_left = (u[:, :rank] * root_s).reshape(left.shape[0], left.shape[1], rank)
    new_right = (v[:, :rank] * root_s).T.reshape(rank, right.shape[1], right.shape[2])
    cores[(k - 1) % d] = torch.einsum("xa,aib->xib", inverse_a, new_left)
    cores[k] = torch.einsum("aib,by->aiy", new_right, inverse_b)


def truncate_bond(cores: list[Tensor], k: int, rank: int) -> None:
    """Round bond ``k`` to ``rank``: the weighted merged pair cut to its ``rank`` largest singular values,
    split ``U√S``, ``√S Vᵀ`` and unweighted.

    Args:
        cores: The layer's cores as float64 ``(r, n, r')`` tensors; cores ``k−1`` and ``k`` are replaced.
        k: The bond, joining cores ``k−1`` and ``k``.
        rank: The bond's new size (clamped to 1 … the bond's numerical size).
    """
    _cut(cores, k, _bond_svd(cores, k), rank)


def nuclear_subgradient(cores: Sequence[Tensor], k: int, rtol: float = 0.0) -> tuple[Tensor, float]:
    """The subgradient, with respect to bond ``k``'s merged pair ``M`` (the rest of the ring held fixed), of
    the nuclear norm ``‖(Γ_a^½ ⊗ 1) M (1 ⊗ Γ_b^½)‖_*`` at the environment's own scale: for a train, the
    nuclear norm of the weight's unfolding at the bond (a ring: its Kronecker stand-in).

    The subgradient is ``(Γ_a^½ ⊗ 1) U_k V_kᵀ (1 ⊗ Γ_b^½)`` over the ``k`` singular vectors above ``rtol``
    of the largest: the unique one on the weight's row and column spaces (the gradient of the nuclear norm
    of a rank-``k`` matrix within its rank).

    Args:
        cores: The layer's cores as float64 ``(r, n, r')`` tensors (``current_cores``).
        k: The bond, joining cores ``k−1`` and ``k``.
        rtol: Singular values at or below this fraction of the largest count as zero.

    Returns:
        ``(G, norm)``: ``G`` of shape ``(r_{k−1}·n_{k−1}, n_k·r_{k+1})`` (rows and columns as ``M``'s), and
        the nuclear norm itself (``⟨G, M⟩``).
    """
    d = len(cores)
    left, right = cores[(k - 1) % d], cores[k]
    gram, log_scale = _environment(cores, k)
    gram_a, gram_b = _kronecker_factors(gram)
    fitted = torch.einsum("pqxy,pq,xy->", gram, gram_b, gram_a)
    fit = float(fitted) / float((gram_a * gram_a).sum() * (gram_b * gram_b).sum())
    scale = math.exp(0.5 * (log_scale + math.log(fit))) if fit > 0 else 0.0
    u, s, v, root_a, root_b, _, _ = _weighted_svd(cores, k, gram_a, gram_b)
    rows, columns = left.shape[0] * left.shape[1], right.shape[1] * right.shape[2]
    kept = _numerical(s, rtol).numel()
    if kept == 0 or scale == 0.0:
        return torch.zeros(rows, columns, dtype=left.dtype, device=left.device), 0.0
    uv = (u[:, :kept] @ v[:, :kept].T).reshape(left.shape[0], left.shape[1], right.shape[1], right.shape[2])
    g = torch.einsum("xa,xijy,yb->aijb", root_a, uv, root_b) * scale
    return g.reshape(rows, columns), scale * float(s[:kept].sum())


# ---------------------------------------------------------------------------- a layer's cores


def current_cores(layer: TensorizedLayer) -> list[Tensor]:
    """The layer's cores as float64 ``(r, n, r')``, each bond cut to the slices its selector keeps and their
    eval multipliers applied: the weight the eval-mode layer computes.

    Args:
        layer: A tensorized layer.

    Returns:
        One float64 core per position, on the layer's device, modes flattened.
    """
    d = len(layer.cores)
    keep = [_kept_slices(layer, k) for k in range(d)]
    out = []
    for k, core in enumerate(layer.cores):
        flat = _flat(core.detach().to(torch.float64))
        selector = layer.selector(k)
        if selector is not None:
            flat = flat * selector.deterministic().detach().to(torch.float64).view(-1, 1, 1)
        out.append(flat.index_select(0, keep[k]).index_select(2, keep[(k + 1) % d]))
    return out


def _kept_slices(layer: TensorizedLayer, k: int) -> Tensor:
    """Indices of bond ``k``'s slices with non-zero eval multipliers (all of them without a selector)."""
    device = layer.cores[0].device
    selector = layer.selector(k)
    if selector is None:
        return torch.arange(layer.ranks[k], device=device)
    kept = torch.nonzero(selector.deterministic().detach() != 0).flatten()
    return kept if kept.numel() > 0 else torch.zeros(1, dtype=torch.long, device=device)


@torch.no_grad()
def write_back(layer: TensorizedLayer, cores: Sequence[Tensor]) -> None:
    """Copy rounded cores into the layer's parameters in place, zero-padded to their sizes (kept slices first).

    Args:
        layer: The layer the cores came from.
        cores: One ``(r, n, r')`` core per position, each bond no larger than the parameter's.
    """
    for param, core in zip(layer.cores, cores):
        padded = torch.zeros(param.shape[0], core.shape[1], param.shape[-1], dtype=param.dtype, device=param.device)
        padded[:core.shape[0], :, :core.shape[2]] = core.to(param.dtype)
        param.copy_(padded.reshape(param.shape))
