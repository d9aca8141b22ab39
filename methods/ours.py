"""Probabilistic ℓ0 rank selection with approximate Bernoulli gates.

Cao, Sun, Nguyen, Mamitsuka, "Learning Low-Rank Tensor Cores with
Probabilistic ℓ0-Regularized Rank Selection for Model Compression", IJCAI 2024.
"""

from __future__ import annotations

from typing import ClassVar, Mapping

import torch
from torch import Tensor, nn

from rankbench.config import Hyper, Search
from rankbench.method import SELECTOR_HYPERPARAMETERS, Method
from rankbench.tensorized import Bond, RankSelector


class GaussianGate(RankSelector):
    """Gate ``clamp(μ + σ·ε + b, 0, 1)`` on each slice of one bond.

    ``μ`` has ``size − 1`` trainable entries plus one frozen slot placed last,
    so a bond never loses its last slice. The noise ε is drawn afresh at every
    forward pass and shared by the whole batch. In eval mode (or once the gates
    are fixed) the gate is ``clamp(μ + b, 0, 1)``.
    """

    def __init__(self, size: int, sigma: float, offset: float) -> None:
        super().__init__(size)
        self.sigma, self.offset = sigma, offset
        self.mu = nn.Parameter(torch.randn(size - 1) * 0.01)
        self.register_buffer("mu_fixed", torch.randn(1) * 0.01)
        self.fixed = False

    def _location(self) -> Tensor:
        return torch.cat([self.mu, self.mu_fixed])

    def sample(self) -> Tensor:
        if self.fixed:
            return self.deterministic()
        z = self._location() + self.sigma * torch.randn(self.size, device=self.mu_fixed.device)
        return torch.clamp(z + self.offset, 0.0, 1.0)

    def deterministic(self) -> Tensor:
        return torch.clamp(self._location() + self.offset, 0.0, 1.0)

    def open_probability(self) -> Tensor:
        """Φ((μ_j + b)/σ) for the trainable entries: P(gate j is open)."""
        return torch.special.ndtr((self.mu + self.offset) / self.sigma)

    def fix(self) -> None:
        """Freeze μ and stop the noise for the rest of training."""
        self.fixed = True
        self.mu.requires_grad_(False)


class ProbabilisticL0(Method):
    """Approximate-Bernoulli gates on every bond, expected-ℓ0 penalty (the paper's method).

    The penalty of a bond is the *mean* over its trainable entries of
    Φ((μ_j + b)/σ) by default, as in the reference implementation, so λ is a
    per-bond weight; ``penalty_reduction=sum`` uses the paper's printed sum.
    """

    name: ClassVar[str] = "ours"
    description: ClassVar[str] = "probabilistic l0 rank selection with Gaussian (approximate Bernoulli) gates"
    hyperparameters: ClassVar[dict[str, Hyper]] = {
        **SELECTOR_HYPERPARAMETERS,
        "lambda": Hyper(1.0, "weight λ of the expected-l0 penalty", minimum=0.0, search=Search(1e-3, 10.0, log=True)),
        "sigma": Hyper(0.5, "std σ of the gate noise", minimum=1e-6, search=Search(0.1, 1.0)),
        "offset": Hyper(1.2, "gate offset b: gate = clamp(mu + sigma*eps + b, 0, 1)"),
        "penalty_reduction": Hyper("mean", "per-bond reduction of the penalty", choices=("mean", "sum")),
        "target_compression": Hyper(
            None, "fix the gates once the compression ratio reaches this (none: never)",
            type=float, minimum=1.0, nullable=True,
        ),
    }

    def __init__(self, params: Mapping) -> None:
        super().__init__(params)
        self.fixed = False

    def selector(self, bond: Bond) -> RankSelector | None:
        return GaussianGate(bond.size, self.params["sigma"], self.params["offset"])

    def gates(self, model: nn.Module) -> list[GaussianGate]:
        return [m for m in model.modules() if isinstance(m, GaussianGate)]

    def penalty(self, model: nn.Module) -> Tensor:
        total = torch.zeros((), device=next(model.parameters()).device)
        if self.fixed:
            return total
        reduce = torch.mean if self.params["penalty_reduction"] == "mean" else torch.sum
        for gate in self.gates(model):
            if gate.mu.numel() > 0:
                total = total + reduce(gate.open_probability())
        return self.params["lambda"] * total

    def on_epoch_end(self, model: nn.Module, epoch: int, metrics: Mapping[str, float]) -> None:
        target = self.params["target_compression"]
        if target is not None and not self.fixed and metrics.get("compression", 0.0) >= target:
            self.fixed = True
            for gate in self.gates(model):
                gate.fix()
