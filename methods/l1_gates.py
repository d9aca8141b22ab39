"""ℓ1 rank gates: a learnable scale per rank slice, pruned where it falls under a threshold.

Two published recipes of the same idea, as presets (``--set preset=...``):

``tensorlasso``: tensorly-torch's TensorLasso (Kossaifi, ``tltorch/tensor_hooks/_tensor_lasso.py``,
tensorly/torch at 25c915d). Scales start at 1 (l.332 ``torch.ones(1, 1, r)``, one per inner TT bond),
multiply the slices (``apply_lasso``, l.312-317), and the loss is ``penalty · Σ|w| / n_element``
(l.104-105) with ``penalty = 0.01`` (l.77) and ``n_element`` the number of *scales* (l.306-308:
``weight.numel()`` of the lasso weights, not of the network's weights), counted over every forward
since ``reset()``: with one forward per step, the mean |w| over all gated slices of the model. Before
each forward the scales are clamped to [−1, 1] (``clamp_weights=True``, l.298-299) and
``F.threshold(w, 1e-6, 0)`` zeroes them in place (``threshold=1e-6``, l.301-302); here both run after
every optimizer step (``on_step_end``), which is the same point between two forwards.

``comera``: CoMERA (Yang et al., NeurIPS 2024; ziyangjoy/CoMERA at 8583b35). Rank parameters start at 1
(``tensor_layers_CoMERA/low_rank_tensors.py`` l.27, l.160); the forward multiplies each slice by
``threshold(x, 1e-2, 0)`` (``get_rank_mask``, l.70-77; ``threshold: 1e-2`` in ``MNLI_trainer.py``
l.202); the size term is ``rank_loss`` (``MNLI_trainer.py`` l.256-268), the sum of the scales above
1e-2 divided by their count. The early stage minimises ``task + 0.01·rank_loss`` (l.324). The late
stage (l.391-400, l.614-623), from epoch ``epochs_earlystage`` (l.656; 20 of 30 epochs in
``run_MNLI.sh``), takes per step ``s = 1[(L − L*)/L < (S − S*)/S]`` with ``L`` the batch's task
loss, ``S`` the current size (``compute_size``, l.271-286), ``L* = 0.8`` and ``S* = target_ratio · S``
at the stage boundary (l.660-663, ``target_ratio=0.2`` in ``run_MNLI.sh``), and minimises
``(0.1 + 1 − s)·L + (0.01 + s)·rank_loss``: ``s = 1`` (the size term) when the loss is relatively
closer to its target than the size is. rankbench's λ (``lambda``) stands for both 0.01s.

What rankbench does differently, on purpose:

* The threshold is on |w|: a slice is pruned when ``|w| < threshold``. TensorLasso's ``F.threshold``
  also zeroes every *negative* scale and CoMERA's ``x > tol`` masks negative ones (a one-sided
  projection onto w ≥ 0); rankbench keeps a negative scale with ``|w| ≥ threshold``, whose sign folds
  into its core on export. Sub-threshold scales are zeroed in place after each step (both presets;
  TensorLasso does so, and CoMERA's mask makes them 0 in every forward), so training and eval
  multipliers are the same numbers at every forward.
* Measured consequence (mlp2 on the embedded digits, 10 epochs, Adam at 1e-2): without the sign quirk a
  scale the ℓ1 term pulls to 0 oscillates around it at |w| ~ 1e-3 (Adam's step), far above 1e-6, so
  ``tensorlasso`` prunes nothing at any λ from 0.01 to 100 (18.2x, the unpruned rank-20 model; λ=100
  collapses accuracy first). TensorLasso's own one-sided threshold pruned the same runs to 25x / 61x at
  λ = 1 / 10, and ``--set threshold=1e-2`` to 27x / 118x; ``comera`` (1e-2) reached 30x / 382x.
* TensorLasso's CP variant multiplies by ``penalty`` twice (l.165 then l.105, a squared weight);
  here λ is applied once, as its TT and Tucker variants do.
* A bond whose every |w| is under the threshold keeps its largest-|w| slice: rankbench counts and
  exports such a bond at rank 1 anyway, so this costs nothing and keeps the layer connected
  (TensorLasso zeroes the whole bond; CoMERA's ``compute_size`` then counts the layer as 0).
* comera: a pruned slice gets no gradient (CoMERA's threshold has derivative 0 below tol), so it stays
  pruned unless one optimizer step carries it past the threshold; under tensorlasso a zeroed scale
  still gets the task gradient, as TensorLasso's (its multiplier is the parameter itself).
* comera's size ``S`` and its target are the whole model's parameter count (rankbench's compression:
  dense / current), not CoMERA's tensorized factors only; ``target_compression`` sets ``S*`` to
  dense/target, and without it ``S* = target_ratio · S`` at the boundary as CoMERA. ``L*`` is
  ``target_loss``, by default the last early-stage epoch's mean training loss (CoMERA's 0.8 is MNLI's
  cross-entropy and means nothing on other tasks). The stage boundary is ``early_epochs`` (default 2/3
  of each task's paper epochs, CoMERA's 20/30); a run no longer than it never enters the late stage.
  In CoMERA's released code the late stage runs only with CUDA graphs (``train``, l.656-675: without
  them every epoch is ``_run_epoch``, and ``run_MNLI.sh`` sets ``use_cuda_graph=0``); here it always
  runs. CoMERA's separate rank learning rate (``lr_rank`` 1e-3 against ``lr_tensor`` 1e-4) is
  ``selector_lr``, default the weights' rate.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import Tensor, nn

from rankbench.plugin import (
    SELECTOR_HYPERPARAMETERS,
    Bond,
    Hyper,
    Knob,
    Method,
    MethodDefaults,
    RankbenchError,
    RankSelector,
    Search,
    StaticInput,
    StepLoss,
    TaskLoss,
    tensorized_layers,
)

PRESETS: dict[str, dict[str, object]] = {
    "tensorlasso": {"threshold": 1e-6, "clamp": True, "normalise": "all", "stages": False},
    "comera": {"threshold": 1e-2, "clamp": False, "normalise": "active", "stages": True},
}
"""Per preset: the pruning threshold on |w|, whether w is clamped to [−1, 1] after each step, what the
ℓ1 sum is divided by (``all`` scales, TensorLasso's ``n_element``; the ``active`` ones, CoMERA's
``count``), and whether the late stage runs (CoMERA)."""

LATE_TASK_WEIGHT = 0.1
"""CoMERA's late stage: ``model_loss*1e-1 + rank_loss*1e-2`` before the switched term (MNLI_trainer.py l.396)."""

EARLY_FRACTION = 2 / 3
"""CoMERA's stage boundary: 20 early epochs of 30 (run_MNLI.sh)."""


def _early(epochs: int) -> int:
    return max(1, round(EARLY_FRACTION * epochs))


EARLY_WHY = "CoMERA's stage boundary, 20 of its 30 epochs (run_MNLI.sh), is 2/3 of this task's {} epochs"


class L1Scale(RankSelector):
    """A scale ``w_j`` (init 1) on slice ``j``; eval multiplier ``w_j`` where ``|w_j| ≥ threshold``, else 0,
    the largest |w| of the bond always kept (a bond never goes below rank 1).

    ``blocks_pruned``: training multipliers are the eval ones (pruned slices get no gradient, CoMERA's
    mask); otherwise they are ``w`` itself (TensorLasso's). The method zeroes pruned scales after every
    step, so the two agree in value at every forward."""

    def __init__(self, size: int, threshold: float, blocks_pruned: bool = False) -> None:
        super().__init__(size)
        self.w = nn.Parameter(torch.ones(size))
        self.threshold = threshold
        self.blocks_pruned = blocks_pruned

    def keep(self) -> Tensor:
        """Which slices stay: ``|w| ≥ threshold``, and the bond's largest |w|."""
        a = self.w.detach().abs()
        return (a >= self.threshold) | (a == a.max())

    def sample(self) -> Tensor:
        return self.deterministic() if self.blocks_pruned else self.w

    def deterministic(self) -> Tensor:
        return torch.where(self.keep(), self.w, torch.zeros_like(self.w))


class _Segments:
    """Every scale of the model's ``L1Scale``s in one flat vector: where each bond's scales sit, and the
    model's parameter count at the ranks they give, as tensor ops (no host sync, a few kernels)."""

    def __init__(self, model: nn.Module, scales: list[L1Scale]) -> None:
        device = next(model.parameters()).device
        self.sizes = [s.size for s in scales]
        self.bond = torch.repeat_interleave(torch.arange(len(scales), device=device),
                                            torch.tensor(self.sizes, device=device))
        position = {id(s): i for i, s in enumerate(scales)}
        fixed: list[int] = []
        left: list[int] = []
        right: list[int] = []
        modes: list[int] = []
        inside: set[int] = set()
        constant = 0
        for _, layer in tensorized_layers(model):
            d = len(layer.core_modes)
            where = []
            for k in range(d):
                selector = layer.selector(k)
                if selector is not None and id(selector) in position:
                    where.append(position[id(selector)])
                else:  # an ungated bond keeps its size (a TT's boundary, or a selector of another kind)
                    rank = layer.ranks[k] if selector is None else layer.eval_ranks()[k]
                    where.append(len(scales) + len(fixed))
                    fixed.append(rank)
            for k in range(d):
                left.append(where[k])
                right.append(where[(k + 1) % d])
                modes.append(math.prod(layer.core_modes[k]))
            constant += layer.bias.numel() if layer.bias is not None else 0
            inside.update(id(p) for p in layer.parameters())
        constant += sum(p.numel() for p in model.parameters() if id(p) not in inside)  # selectors sit in layers
        self.constant = float(constant)
        self.fixed = torch.tensor(fixed, dtype=torch.float64, device=device)
        self.left = torch.tensor(left, dtype=torch.long, device=device)
        self.right = torch.tensor(right, dtype=torch.long, device=device)
        self.modes = torch.tensor(modes, dtype=torch.float64, device=device)

    def ranks(self, flat: Tensor, threshold: float) -> Tensor:
        """Each bond's eval rank: its non-zero scales with ``|w| ≥ threshold``, at least 1."""
        a = flat.detach().abs()
        active = ((a >= threshold) & (a > 0)).to(torch.float64)
        counts = torch.zeros(len(self.sizes), dtype=torch.float64, device=flat.device).index_add_(0, self.bond, active)
        return counts.clamp_(min=1.0)

    def size(self, flat: Tensor, threshold: float) -> Tensor:
        """The model's parameter count at the eval ranks (``count_parameters``), a float64 tensor."""
        r = torch.cat([self.ranks(flat, threshold), self.fixed])
        return (r[self.left] * self.modes * r[self.right]).sum() + self.constant


class L1Gates(Method):
    """A learnable scale on every rank slice with an ℓ1 penalty; slices under a threshold are pruned.
    Presets ``tensorlasso`` and ``comera`` (module docstring: values, sources, differences).

    The compression knob is λ for both presets (``found_by="training"``): it is what both sources tune,
    and raising it raises the compression (comera on mlp2: λ 0.01 / 1 / 10 → 18x / 30x / 382x in 10
    epochs). ``target_compression`` is not a ``target`` knob: the late stage only steers towards it, from
    wherever the early stage left the model, within the epochs left (mlp2, λ=1, 5 + 5 epochs: asked
    100x, reached 56x), and a run no longer than ``early_epochs`` never enters the late stage. Under
    ``tensorlasso`` at its 1e-6 threshold λ does not move the compression at all (module docstring):
    match it with ``--set threshold=1e-2`` or not at all.
    """

    name: ClassVar[str] = "l1_gates"
    description: ClassVar[str] = "l1-penalised scale per rank slice, pruned under a threshold (TensorLasso, CoMERA)"
    compression_knob: ClassVar[Knob | None] = Knob("lambda", increases_compression=True, found_by="training")
    hyperparameters: ClassVar[dict[str, Hyper]] = {
        **SELECTOR_HYPERPARAMETERS,
        "preset": Hyper("tensorlasso", "tensorlasso: threshold 1e-6, clamp to [-1, 1], l1 / all scales; comera: "
                        "threshold 1e-2, l1 / scales above it, late stage switching towards a target size",
                        choices=tuple(PRESETS), label=True),
        "lambda": Hyper(0.01, "weight λ of the normalised l1 penalty (both sources: 0.01)", minimum=0.0,
                        search=Search(1e-3, 100.0, log=True), label=True),
        "threshold": Hyper(None, "prune a slice when |w| < this (none: by preset)", type=float, minimum=0.0,
                           nullable=True),
        "clamp": Hyper(None, "clamp w to [-1, 1] after each step (none: by preset)", type=bool, nullable=True),
        "early_epochs": Hyper(20, "comera: epochs of the early stage (CoMERA's 20); the late stage follows",
                              minimum=1),
        "target_compression": Hyper(None, "comera: the late stage's target compression, dense/current parameters "
                                    "(none: target_ratio of the size at the stage boundary)", type=float,
                                    minimum=1.0, nullable=True, label=True),
        "target_ratio": Hyper(0.2, "comera without target_compression: target size / size at the stage boundary "
                              "(CoMERA's run_MNLI.sh: 0.2)", minimum=1e-9, maximum=1.0),
        "target_loss": Hyper(None, "comera: the late stage's target task loss L* (none: the last early epoch's "
                             "mean training loss; CoMERA's MNLI: 0.8)", type=float, minimum=0.0, nullable=True),
    }
    task_defaults: ClassVar[dict[str, Mapping[str, object] | MethodDefaults]] = {
        "lenet5": MethodDefaults({"early_epochs": _early(150)}, EARLY_WHY.format(150)),
        "mlp2": MethodDefaults({"early_epochs": _early(300)}, EARLY_WHY.format(300)),
        "resnet32": MethodDefaults({"early_epochs": _early(200)}, EARLY_WHY.format(200)),
        "resnet110": MethodDefaults({"early_epochs": _early(200)}, EARLY_WHY.format(200)),
        "sst": MethodDefaults({"early_epochs": _early(30)}, EARLY_WHY.format(30)),
        "iwslt14": MethodDefaults({"early_epochs": _early(30)}, EARLY_WHY.format(30)),
        "iwslt14/embedded": MethodDefaults({"early_epochs": _early(10)}, EARLY_WHY.format(10)),
    }

    def __init__(self, params: Mapping) -> None:
        super().__init__(params)
        preset = PRESETS[self.params["preset"]]
        self.threshold = float(preset["threshold"] if self.params["threshold"] is None else self.params["threshold"])
        self.clamp = bool(preset["clamp"] if self.params["clamp"] is None else self.params["clamp"])
        self.normalise = str(preset["normalise"])
        self.stages = bool(preset["stages"])
        self.blocks_pruned = self.params["preset"] == "comera"
        late_only = (self.params["target_compression"], self.params["target_loss"])
        if not self.stages and any(v is not None for v in late_only):
            raise RankbenchError("target_compression and target_loss belong to the late stage of preset=comera: "
                                 "add --set preset=comera or drop them")
        self._segments: _Segments | None = None
        self._drawn = StaticInput()
        self._reset_stage()

    def _reset_stage(self) -> None:
        self.stage = "early"
        self.target_size: float | None = None
        self.target_loss: float | None = None
        self.late_steps = 0
        self._size_steps: Tensor | float = 0.0
        self.size_term_active: Tensor | None = None
        """The last late-stage step's switch s (1: the size term was on), for inspection."""

    # ---- selectors -----------------------------------------------------------------------------------
    def selector(self, bond: Bond) -> RankSelector | None:
        return L1Scale(bond.size, self.threshold, blocks_pruned=self.blocks_pruned)

    def attach(self, model: nn.Module, context) -> None:
        super().attach(model, context)
        self._segments = None
        self._reset_stage()

    def scales(self) -> list[L1Scale]:
        """The scales ``attach`` put on the model, in bond order."""
        return [s for s in self.selectors.values() if isinstance(s, L1Scale)]

    def segments(self, model: nn.Module) -> _Segments:
        """The flat layout of the scales and the size counter, built on first use (after ``.to(device)``)
        and again if the model moved."""
        if self._segments is None or self._segments.bond.device != next(model.parameters()).device:
            self._segments = _Segments(model, self.scales())
        return self._segments

    @staticmethod
    def flat(scales: list[L1Scale]) -> Tensor:
        return torch.cat([s.w for s in scales])

    # ---- the objective -------------------------------------------------------------------------------
    def l1(self, flat: Tensor) -> Tensor:
        """The normalised ℓ1 term, unweighted: Σ|w| / (number of scales) for tensorlasso, Σ_{|w|≥t}|w| /
        #{|w|≥t} for comera (0 when no scale is above the threshold)."""
        a = flat.abs()
        if self.normalise == "all":
            return a.sum() / flat.numel()
        active = (a.detach() >= self.threshold).to(a.dtype)
        return (a * active).sum() / active.sum().clamp(min=1.0)

    def penalty(self, model: nn.Module) -> Tensor:
        """λ · the normalised ℓ1 term (the early stage's, and tensorlasso's throughout)."""
        scales = self.scales()
        if not scales:
            return torch.zeros((), device=next(model.parameters()).device)
        return self.params["lambda"] * self.l1(self.flat(scales))

    def switch(self, task: Tensor, size: Tensor) -> Tensor:
        """CoMERA's per-step switch: 1 (size term) when ``(L − L*)/L < (S − S*)/S``, else 0 (task loss)."""
        assert self.target_size is not None and self.target_loss is not None
        loss_gap = (task - self.target_loss) / task
        size_gap = (size - self.target_size) / size
        return (loss_gap < size_gap).to(task.dtype)

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor], task_loss: TaskLoss) -> StepLoss:
        """Task loss + λ·ℓ1, every scale read from one vector and supplied to the forward at once (one
        ``StaticInput``; bond by bond, a ResNet-32 step took 666 kernel ops instead of 450, by
        ``benchmarks/ops.py``); in comera's late stage ``(0.1 + 1 − s)·L + (λ + s)·ℓ1``, CoMERA's switch s."""
        scales = self.scales()
        if not model.training or not scales:
            return super().loss(model, batch, task_loss)
        x, y = batch
        flat = self.flat(scales)
        segments = self.segments(model)
        multipliers = torch.where(self._keep(flat), flat, torch.zeros_like(flat)) if self.blocks_pruned else flat
        values = self._drawn.update(multipliers)
        with RankSelector.supplied(dict(zip(scales, values.split(segments.sizes), strict=True))):
            outputs = model(x)
        task = task_loss(outputs, y)
        l1 = self.l1(flat)
        lam = self.params["lambda"]
        if self.stages and self.stage == "late":
            size = segments.size(flat, self.threshold)
            s = self.switch(task.detach(), size)
            self.size_term_active = s
            self.late_steps += 1
            self._size_steps = self._size_steps + s
            penalty = (lam + s) * l1
            total = (LATE_TASK_WEIGHT + 1.0 - s) * task + penalty
        else:
            penalty = lam * l1
            total = task + penalty
        return StepLoss(total=total, task=task.detach(), penalty=penalty.detach(), outputs=outputs)

    def _keep(self, flat: Tensor) -> Tensor:
        """``L1Scale.keep`` of every scale at once (``flat``: all scales, ``segments`` built): |w| ≥ threshold,
        or the largest |w| of its bond."""
        seg = self._segments
        assert seg is not None, "segments(model) first"
        a = flat.detach().abs()
        bond_max = torch.zeros(len(seg.sizes), device=a.device, dtype=a.dtype).scatter_reduce_(
            0, seg.bond, a, reduce="amax", include_self=False)
        return (a >= self.threshold) | (a == bond_max[seg.bond])

    # ---- after each step and epoch -------------------------------------------------------------------
    @torch.no_grad()
    def on_step_end(self, model: nn.Module, step: int) -> None:
        """Clamp to [−1, 1] (tensorlasso) and zero every scale under the threshold, the bond's largest kept."""
        scales = self.scales()
        if not scales:
            return
        self.segments(model)
        ws = [s.w for s in scales]
        flat = torch.cat(ws)
        if self.clamp:
            flat.clamp_(-1.0, 1.0)
        flat = torch.where(self._keep(flat), flat, torch.zeros_like(flat))
        torch._foreach_copy_(ws, list(flat.split(self._segments.sizes)))

    def on_epoch_end(self, model: nn.Module, epoch: int, metrics: Mapping[str, float]) -> None:
        """comera: after epoch ``early_epochs`` fix the late stage's targets S* and L* (CoMERA l.660-663)."""
        if not self.stages or self.stage == "late" or epoch < self.params["early_epochs"] or not self.scales():
            return
        with torch.no_grad():
            size = float(self.segments(model).size(self.flat(self.scales()), self.threshold))
        target = self.params["target_compression"]
        if target is None:
            self.target_size = self.params["target_ratio"] * size
        else:
            self.target_size = metrics["compression"] * size / target
        self.target_loss = (float(metrics["train_loss"]) if self.params["target_loss"] is None
                            else self.params["target_loss"])
        self.stage = "late"

    # ---- resumable state -----------------------------------------------------------------------------
    @property
    def size_steps(self) -> float:
        """Late-stage steps that took the size term (s = 1) so far."""
        return float(self._size_steps)

    def state_dict(self) -> dict:
        return {"stage": self.stage, "target_size": self.target_size, "target_loss": self.target_loss,
                "late_steps": self.late_steps, "size_steps": self.size_steps}

    def load_state_dict(self, model: nn.Module, state: Mapping) -> None:
        self.stage = str(state.get("stage", "early"))
        self.target_size = state.get("target_size")
        self.target_loss = state.get("target_loss")
        self.late_steps = int(state.get("late_steps", 0))
        self._size_steps = float(state.get("size_steps", 0.0))
