"""REINFORCE-ℓ0: discrete Bernoulli gates trained with score-function gradients.

The ablation of the supplement (Sec. 2.1) of Cao et al., IJCAI 2024: the same
ℓ0 objective as ``ours`` but with exact Bernoulli gates, whose gradient only the
score-function (REINFORCE) estimator can give.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from rankbench.plugin import (
    Bond,
    Hyper,
    Method,
    RankSelector,
    SELECTOR_HYPERPARAMETERS,
    Search,
    StepLoss,
    TaskLoss,
)


class BernoulliGate(RankSelector):
    """Gates ``Z_j ~ Bernoulli(π_j)``, ``π = clamp(μ + 0.55, ε, 1−ε)``, plus one
    frozen always-on slot (last) so a bond keeps rank ≥ 1.

    Each training forward draws a new sample and keeps it in ``last_sample`` for
    the score-function term; eval rounds: ``Z = 1[π ≥ 0.5]``.
    """

    def __init__(self, size: int, init_probability: float = 0.55, eps: float = 1e-6) -> None:
        super().__init__(size)
        self.init_probability, self.eps = init_probability, eps
        self.mu = nn.Parameter(torch.randn(size - 1) * 0.01)
        self.last_sample: Tensor | None = None

    def probability(self) -> Tensor:
        return torch.clamp(self.mu + self.init_probability, self.eps, 1.0 - self.eps)

    def _with_fixed_slot(self, z: Tensor) -> Tensor:
        return torch.cat([z, torch.ones(1, device=z.device, dtype=z.dtype)])

    def sample(self) -> Tensor:
        with torch.no_grad():
            self.last_sample = torch.bernoulli(self.probability())
        return self._with_fixed_slot(self.last_sample)

    def deterministic(self) -> Tensor:
        return self._with_fixed_slot((self.probability() >= 0.5).to(self.mu.dtype)).detach()

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
        "lambda": Hyper(0.2, "weight λ of the l0 norm in the cost", minimum=0.0, search=Search(1e-3, 10.0, log=True)),
        "samples": Hyper(5, "gate samples M per training step", minimum=1),
        "baseline": Hyper("none", "variance reduction: subtract the mean cost of the M samples",
                          choices=("none", "mean")),
        "init_probability": Hyper(0.55, "initial gate probability π (μ + this)", minimum=0.0, maximum=1.0),
    }

    def selector(self, bond: Bond) -> RankSelector | None:
        return BernoulliGate(bond.size, self.params["init_probability"])

    def gates(self, model: nn.Module) -> list[BernoulliGate]:
        return [m for m in model.modules() if isinstance(m, BernoulliGate)]

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor], task_loss: TaskLoss) -> StepLoss:
        x, y = batch
        gates = self.gates(model)
        losses, log_probs, l0 = [], [], []
        for _ in range(self.params["samples"]):
            losses.append(task_loss(model(x), y))
            log_probs.append(sum((g.log_prob(g.last_sample) for g in gates), torch.zeros((), device=x.device)))
            l0.append(sum(float(g.last_sample.sum()) + 1.0 for g in gates))
        task = torch.stack(losses)
        norm = torch.tensor(l0, device=x.device)
        cost = (task + self.params["lambda"] * norm).detach()
        if self.params["baseline"] == "mean":
            cost = cost - cost.mean()
        surrogate = (torch.stack(log_probs) * cost + task).mean()
        return StepLoss(total=surrogate, task=task.mean().detach(), penalty=self.params["lambda"] * norm.mean())
