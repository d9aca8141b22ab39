"""Probabilistic ℓ0 rank selection with approximate Bernoulli gates.

Cao, Sun, Nguyen, Mamitsuka, "Learning Low-Rank Tensor Cores with
Probabilistic ℓ0-Regularized Rank Selection for Model Compression", IJCAI 2024.
"""

from __future__ import annotations

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
    RankSelector,
    Search,
    StaticInput,
    StepLoss,
    TaskLoss,
)


class GaussianGate(RankSelector):
    """Gate ``clamp(μ + σ·ε + b, 0, 1)`` on each slice of one bond.

    ``μ`` has ``size − 1`` trainable entries plus one frozen slot placed last,
    so a bond never loses its last slice. The noise ε is drawn afresh at every
    forward pass and shared by the whole batch (unless the method supplies the
    values, see ``RankSelector.supplied``). In eval mode (or once the gates are
    fixed) the gate is ``clamp(μ + b, 0, 1)``.
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
    checks_tasks: ClassVar[bool] = True
    compression_knob: ClassVar[Knob | None] = Knob("lambda", increases_compression=True)
    hyperparameters: ClassVar[dict[str, Hyper]] = {
        **SELECTOR_HYPERPARAMETERS,
        "lambda": Hyper(1.0, "weight λ of the expected-l0 penalty", minimum=0.0, search=Search(1e-3, 10.0, log=True),
                        label=True),
        "sigma": Hyper(0.5, "std σ of the gate noise", minimum=1e-6, search=Search(0.1, 1.0), label=True),
        "offset": Hyper(1.2, "gate offset b: gate = clamp(mu + sigma*eps + b, 0, 1)"),
        "penalty_reduction": Hyper("mean", "per-bond reduction of the penalty", choices=("mean", "sum")),
        "target_compression": Hyper(
            None, "fix the gates once the compression ratio reaches this (none: never)",
            type=float, minimum=1.0, nullable=True, label=True,
        ),
    }
    task_defaults: ClassVar[dict[str, Mapping[str, object] | MethodDefaults]] = {
        "lenet5": {"lambda": 1.0, "sigma": 0.5},
        "resnet32": MethodDefaults({"lambda": 0.1, "target_compression": 5.0},
                                   "the paper fixes the gates at 5.0x on ResNet-32"),
        "resnet110": MethodDefaults({"lambda": 0.1, "target_compression": 5.6},
                                    "the paper fixes the gates at 5.6x on ResNet-110"),
        "sst": {"lambda": 0.005},
        "iwslt14": {"lambda": 0.01},
    }

    def __init__(self, params: Mapping) -> None:
        super().__init__(params)
        self._step_location: Tensor | None = None
        """The locations this training step drew from, read by ``penalty`` within the step."""
        self.fixed = False
        self._weights: tuple[tuple, Tensor] | None = None
        self._drawn = StaticInput()

    def selector(self, bond: Bond) -> RankSelector | None:
        return GaussianGate(bond.size, self.params["sigma"], self.params["offset"])

    def gates(self, model: nn.Module) -> list[GaussianGate]:
        """The gates ``attach`` put on ``model``, in forward order (read from the registry)."""
        return [g for g in self.selectors.values() if isinstance(g, GaussianGate)]

    def _penalty_weights(self, gates: list[GaussianGate], device: torch.device, dtype: torch.dtype) -> Tensor:
        """Per-entry weights of Φ over every gate's location (its μ, then its frozen slot):
        1/(R−1) for a bond's mean, 1 for its sum, 0 for the frozen slot; in the gates' dtype."""
        key = (tuple(g.size for g in gates), self.params["penalty_reduction"], device, dtype)
        if self._weights is None or self._weights[0] != key:
            mean = self.params["penalty_reduction"] == "mean"
            weights: list[float] = []
            for gate in gates:
                trainable = gate.size - 1
                weights += [1.0 / trainable if mean and trainable else 1.0] * trainable + [0.0]
            self._weights = (key, torch.tensor(weights, dtype=dtype, device=device))
        return self._weights[1]

    @staticmethod
    def location(gates: list[GaussianGate]) -> Tensor:
        """Every gate's location ``μ`` and frozen slot, in gate order, in one vector."""
        return torch.cat([t for g in gates for t in (g.mu, g.mu_fixed)])

    def penalty(self, model: nn.Module) -> Tensor:
        """λ·Σ_bonds mean_j Φ((μ_j + b)/σ), computed over all bonds' μ at once."""
        gates = self.gates(model)
        if self.fixed or not gates:
            return torch.zeros((), device=next(model.parameters()).device)
        location = self._step_location if self._step_location is not None else self.location(gates)
        return self._penalty(gates, location)

    def _penalty(self, gates: list[GaussianGate], location: Tensor) -> Tensor:
        """``penalty`` over ``location`` (``location(gates)``), the frozen slots weighted 0."""
        phi = torch.special.ndtr((location + self.params["offset"]) / self.params["sigma"])
        return self.params["lambda"] * (phi * self._penalty_weights(gates, location.device, location.dtype)).sum()

    def draw(self, gates: list[GaussianGate], location: Tensor) -> list[Tensor]:
        """Every gate's training multipliers in one pass over ``location`` (``location(gates)``):
        ε for all gates from one ``torch.randn`` (one launch instead of one per gate; not the
        numbers of drawing gate by gate, the same distribution), the rest fused over the model;
        views of one ``StaticInput``, so a compiled model finds them where it did last step."""
        if all(g.fixed for g in gates):  # the method fixes every gate at once
            z = location
        else:
            z = location + self.params["sigma"] * torch.randn(location.numel(), device=location.device)
        values = self._drawn.update(torch.clamp(z + self.params["offset"], 0.0, 1.0))
        return list(values.split([g.size for g in gates]))

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor], task_loss: TaskLoss) -> StepLoss:
        """``Method.loss`` with all gates drawn at once and supplied to them
        (``RankSelector.supplied``): per-bond gate arithmetic costs a few kernel launches
        per bond, and ResNet-32 has 219. The draw and the penalty read one vector of all
        locations (two would each send every gate its own gradient, one addition per gate)."""
        gates = self.gates(model)
        if not model.training or not gates or any(g.fixed != gates[0].fixed for g in gates):
            return super().loss(model, batch, task_loss)
        x, y = batch
        location = self.location(gates)
        with RankSelector.supplied(dict(zip(gates, self.draw(gates, location), strict=True))):
            outputs = model(x)
        task = task_loss(outputs, y)
        self._step_location = location
        try:
            penalty = self.penalty(model)
        finally:
            self._step_location = None
        return StepLoss(total=task + penalty, task=task.detach(), penalty=penalty.detach(), outputs=outputs)

    def state_dict(self) -> dict:
        return {"fixed": self.fixed}

    def load_state_dict(self, model: nn.Module, state: Mapping) -> None:
        if state.get("fixed"):
            self.fixed = True
            for gate in self.gates(model):
                gate.fix()

    def on_epoch_end(self, model: nn.Module, epoch: int, metrics: Mapping[str, float]) -> None:
        target = self.params["target_compression"]
        if target is not None and not self.fixed and metrics.get("compression", 0.0) >= target:
            self.fixed = True
            for gate in self.gates(model):
                gate.fix()
