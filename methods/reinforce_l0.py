"""REINFORCE-ℓ0: discrete Bernoulli gates trained with score-function gradients.

The ablation of the supplement (Sec. 2.1) of Cao et al., IJCAI 2024: the same
ℓ0 objective as ``ours`` but with exact Bernoulli gates, whose gradient only the
score-function (REINFORCE) estimator can give.
"""

from __future__ import annotations

from typing import ClassVar, Mapping

import torch
from torch import Tensor, nn

from rankbench.plugin import (SELECTOR_HYPERPARAMETERS, Bond, Hyper, Method, RankSelector, Search, StaticInput, StepLoss,
                              TaskLoss)


class BernoulliGate(RankSelector):
    """Gates ``Z_j ~ Bernoulli(π_j)``, ``π = clamp(μ + 0.55, ε, 1−ε)``, plus one
    frozen always-on slot (last) so a bond keeps rank ≥ 1.

    The method draws ``Z`` itself (``draw``), since the score-function term needs
    the sample again, and supplies ``with_fixed_slot(Z)`` to the forward pass
    (``RankSelector.supplied``); a training forward without one draws its own.
    Eval rounds: ``Z = 1[π ≥ 0.5]``.
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
    (1/M) Σ_m [log P(Z^m)·c_m + J_m] with c_m = (J_m + λ·Σ‖Z^m‖₀) detached."""

    name: ClassVar[str] = "reinforce_l0"
    description: ClassVar[str] = "discrete Bernoulli rank gates trained by REINFORCE (score-function) gradients"
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

    def selector(self, bond: Bond) -> RankSelector | None:
        return BernoulliGate(bond.size, self.params["init_probability"])

    def gates(self, model: nn.Module) -> list[BernoulliGate]:
        """The gates ``attach`` put on ``model``, in forward order (read from the registry)."""
        return [g for g in self.selectors.values() if isinstance(g, BernoulliGate)]

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor], task_loss: TaskLoss) -> StepLoss:
        """M forward passes, each with fresh gates drawn here (per gate, forward order:
        the numbers the gates would draw in the forward pass) and supplied to the model, each pass's
        in its own ``StaticInput`` (the M passes' values are all saved for one backward)."""
        x, y = batch
        gates = self.gates(model)
        losses, log_probs, l0 = [], [], []
        for sample in range(self.params["samples"]):
            drawn = [g.draw() for g in gates]
            supplied = {}
            if gates:
                values = self._drawn[sample].update(torch.cat([g.with_fixed_slot(z) for g, z in zip(gates, drawn)]))
                supplied = dict(zip(gates, values.split([g.size for g in gates]), strict=True))
            with RankSelector.supplied(supplied):
                losses.append(task_loss(model(x), y))
            log_probs.append(sum((g.log_prob(z) for g, z in zip(gates, drawn)), torch.zeros((), device=x.device)))
            l0.append(sum((z.sum() + 1.0 for z in drawn), torch.zeros((), device=x.device)))  # on the device: no sync
        task = torch.stack(losses)
        norm = torch.stack(l0)
        cost = (task + self.params["lambda"] * norm).detach()
        if self.params["baseline"] == "mean":
            cost = cost - cost.mean()
        surrogate = (torch.stack(log_probs) * cost + task).mean()
        return StepLoss(total=surrogate, task=task.mean().detach(), penalty=self.params["lambda"] * norm.mean())
