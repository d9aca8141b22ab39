"""REINFORCE-ℓ0: discrete Bernoulli gates trained with score-function gradients.

The ablation of the supplement (Sec. 2.1) of Cao et al., IJCAI 2024: the same
ℓ0 objective as ``ours`` but with exact Bernoulli gates, whose gradient only the
score-function (REINFORCE) estimator can give.
"""

from __future__ import annotations

import itertools
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
    RankSelector,
    Search,
    StaticInput,
    StepLoss,
    TaskLoss,
)


class BernoulliGate(RankSelector):
    """Gates ``Z_j ~ Bernoulli(π_j)``, ``π = clamp(μ + 0.55, ε, 1−ε)``, plus one
    frozen always-on slot (last) so a bond keeps rank ≥ 1.

    The method draws ``Z`` itself, for all gates at once (``ReinforceL0.loss``), since
    the score-function term needs the sample again, and supplies it with the slot
    to the forward pass (``RankSelector.supplied``); a training forward without one
    draws its own (``draw``). Eval rounds: ``Z = 1[π ≥ 0.5]``.
    """

    def __init__(self, size: int, init_probability: float = 0.55, eps: float = 1e-6) -> None:
        super().__init__(size)
        self.init_probability, self.eps = init_probability, eps
        self.mu = nn.Parameter(torch.randn(size - 1) * 0.01)

    def probability(self) -> Tensor:
        return torch.clamp(self.mu + self.init_probability, self.eps, 1.0 - self.eps)

    def with_fixed_slot(self, z: Tensor) -> Tensor:
        """The bond's multipliers for gates ``z``: ``z`` and the always-on slot."""
        return torch.cat([z, torch.ones(1, device=z.device, dtype=z.dtype)])

    @torch.no_grad()
    def draw(self) -> Tensor:
        """``Z ~ Bernoulli(π)`` for the trainable entries (no gradient: REINFORCE differentiates ``log_prob``)."""
        return torch.bernoulli(self.probability())

    def sample(self) -> Tensor:
        return self.with_fixed_slot(self.draw())

    def deterministic(self) -> Tensor:
        return self.with_fixed_slot((self.probability() >= 0.5).to(self.mu.dtype)).detach()

    def log_prob(self, z: Tensor) -> Tensor:
        """log P(Z = z) of the trainable entries (differentiable in μ)."""
        p = self.probability()
        return (z * torch.log(p) + (1 - z) * torch.log1p(-p)).sum()


class ReinforceL0(Method):
    """Bernoulli gates on every bond; per step, M gate samples and the surrogate
    (1/M) Σ_m [log P(Z^m)·c_m + J_m] with c_m = (J_m + λ·Σ‖Z^m‖₀) detached.

    The step's gate arithmetic runs over all gates at once (``loss``): gate by gate
    it cost a few kernel launches per bond and sample, and ResNet-32 has 219 bonds.
    """

    name: ClassVar[str] = "reinforce_l0"
    description: ClassVar[str] = "discrete Bernoulli rank gates trained by REINFORCE (score-function) gradients"
    compression_knob: ClassVar[Knob | None] = Knob("lambda", increases_compression=True)
    hyperparameters: ClassVar[dict[str, Hyper]] = {
        **SELECTOR_HYPERPARAMETERS,
        "lambda": Hyper(0.2, "weight λ of the l0 norm in the cost", minimum=0.0, search=Search(1e-3, 10.0, log=True),
                        label=True),
        "samples": Hyper(5, "gate samples M per training step", minimum=1, label=True),
        "baseline": Hyper("none", "variance reduction: subtract the mean cost of the M samples",
                          choices=("none", "mean")),
        "init_probability": Hyper(0.55, "initial gate probability π (μ + this)", minimum=0.0, maximum=1.0),
    }

    def __init__(self, params: Mapping) -> None:
        super().__init__(params)
        self._drawn = [StaticInput() for _ in range(self.params["samples"])]
        self._positions: tuple[tuple, Tensor] | None = None

    def selector(self, bond: Bond) -> RankSelector | None:
        return BernoulliGate(bond.size, self.params["init_probability"])

    def gates(self, model: nn.Module) -> list[BernoulliGate]:
        """The gates ``attach`` put on ``model``, in forward order (read from the registry)."""
        return [g for g in self.selectors.values() if isinstance(g, BernoulliGate)]

    def _trainable_positions(self, gates: list[BernoulliGate], device: torch.device) -> Tensor:
        """Where each gate's trainable entries lie among all gates' multipliers (the
        always-on slots are the rest): every gate's ``size − 1`` entries, then its slot."""
        key = (tuple(g.size for g in gates), device)
        if self._positions is None or self._positions[0] != key:
            starts = [0, *itertools.accumulate(g.size for g in gates)][:-1]
            positions = [start + j for start, g in zip(starts, gates) for j in range(g.size - 1)]
            self._positions = (key, torch.tensor(positions, dtype=torch.long, device=device))
        return self._positions[1]

    def _probability(self, gates: list[BernoulliGate], device: torch.device) -> Tensor:
        """π of every gate's trainable entries in one vector, in gate order: ``BernoulliGate.probability``
        over one cat of all μ (the gates share ``init_probability`` and ``eps``: the method makes them)."""
        if not gates:
            return torch.zeros(0, device=device)
        mu = torch.cat([g.mu for g in gates])
        return torch.clamp(mu + gates[0].init_probability, gates[0].eps, 1.0 - gates[0].eps)

    def _supplied(self, gates: list[BernoulliGate], z: Tensor) -> list[dict[RankSelector, Tensor]]:
        """Each sample's multipliers per gate (``z[m]`` with every always-on slot put in), as views
        of that sample's ``StaticInput``."""
        if not gates:
            return [{} for _ in z]
        sizes = [g.size for g in gates]
        multipliers = z.new_ones(len(z), sum(sizes)).index_copy_(1, self._trainable_positions(gates, z.device), z)
        return [dict(zip(gates, static.update(values).split(sizes), strict=True))
                for static, values in zip(self._drawn, multipliers, strict=True)]

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor], task_loss: TaskLoss) -> StepLoss:
        """M forward passes with gates drawn here, for all M samples and all gates by one
        ``torch.bernoulli`` (not the numbers of drawing gate by gate: the same distribution),
        and supplied to the model, each pass's in its own ``StaticInput`` (the M passes' values
        are all saved for one backward); log P(Z^m) and ‖Z^m‖₀ are one reduction over all gates."""
        x, y = batch
        gates = self.gates(model)
        p = self._probability(gates, x.device)
        with torch.no_grad():
            z = torch.bernoulli(p.expand(self.params["samples"], -1))
        losses = []
        for supplied in self._supplied(gates, z):
            with RankSelector.supplied(supplied):
                losses.append(task_loss(model(x), y))
        log_probs = (z * torch.log(p) + (1 - z) * torch.log1p(-p)).sum(1)
        task = torch.stack(losses)
        norm = z.sum(1) + len(gates)  # each gate's always-on slot counts
        cost = (task + self.params["lambda"] * norm).detach()
        if self.params["baseline"] == "mean":
            cost = cost - cost.mean()
        surrogate = (log_probs * cost + task).mean()
        return StepLoss(total=surrogate, task=task.mean().detach(), penalty=self.params["lambda"] * norm.mean())
