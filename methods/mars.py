"""MARS: Masked Automatic Ranks Selection (Kodryan, Kropotov, Vetrov, AISTATS 2023)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import ClassVar

import torch
from torch import Tensor, nn

from rankbench.plugin import (
    SELECTOR_HYPERPARAMETERS,
    Bond,
    CoreBank,
    Hyper,
    Knob,
    Method,
    MethodDefaults,
    RankSelector,
    Search,
    StaticInput,
    StepLoss,
    TaskLoss,
    tensorized_layers,
)

MODES = {"soft": {"prior": 0.1, "alpha": -1.5}, "hard": {"prior": 0.01, "alpha": -1.75}}


class HardConcreteMask(RankSelector):
    """Mask ``m = clamp(s·(ζ−γ) + γ, 0, 1)``, ``s = sigmoid((θ + log u − log(1−u))/τ)``,
    one sample per forward pass shared by the batch; eval ``m = 1[θ > 0]``.

    MARS allows rank 0 (``allow_zero``, the method's ``allow_rank_zero``: the bond is pruned away
    and its layer outputs its bias); by default rankbench keeps the slice with the largest θ when
    no θ is positive, so the layer stays connected. The buffer ``masking`` is 0 during a warm-up
    (MARS's ``warmup`` switch: the layer runs unmasked, every multiplier 1, in training and
    evaluation) and 1 after.
    """

    def __init__(self, size: int, alpha: float, temperature: float, gamma: float, zeta: float,
                 allow_zero: bool = False, masking: bool = True) -> None:
        super().__init__(size)
        self.theta = nn.Parameter(alpha + 0.01 * torch.randn(size))
        self.register_buffer("temperature", torch.tensor(float(temperature)))
        self.register_buffer("masking", torch.tensor(1.0 if masking else 0.0))
        self.gamma, self.zeta = gamma, zeta
        self.allows_zero = allow_zero

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        """A checkpoint from before warm-ups has no ``masking``: its masks were on."""
        state_dict.setdefault(prefix + "masking", torch.ones_like(self.masking))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def sample(self) -> Tensor:
        u = torch.rand(self.size, device=self.theta.device).clamp(1e-6, 1 - 1e-6)
        s = torch.sigmoid((self.theta + torch.log(u) - torch.log1p(-u)) / self.temperature)
        return torch.clamp(s * (self.zeta - self.gamma) + self.gamma, 0.0, 1.0)

    def deterministic(self) -> Tensor:
        """θ > 0; if no slice is on, the likeliest one unless ``allows_zero``; all ones during a
        warm-up (branch-free on tensors, so ``torch.compile`` keeps one graph)."""
        with torch.no_grad():
            mask = (self.theta > 0).to(self.theta.dtype)
            if not self.allows_zero:
                likeliest = torch.zeros_like(mask).scatter_(0, self.theta.argmax().reshape(1), 1.0)
                mask = torch.where(mask.sum() > 0, mask, likeliest)
            return torch.where(self.masking > 0, mask, torch.ones_like(mask))

    def probability(self) -> Tensor:
        """φ = sigmoid(θ): the probability that each slice is on."""
        return torch.sigmoid(self.theta)


FULL_MNIST_N = 60000
"""MARS's N on the embedded digits: full MNIST's training-set size, as in MARS's notebooks."""
PRIOR_N_WHY = ("mars weighs its priors by 1/N, and with the true N=4,000 they are 15x stronger than on full MNIST: "
               "the embedded data uses full MNIST's N=60,000 (prior_n)")


NOTEBOOK = {"mode": "soft", "tau0": 0.1, "tau_decay": 0.99, "tau_min": 0.01, "gamma": -0.1, "zeta": 1.1,
            "core_prior_inv_std": 0.1, "prior_n": FULL_MNIST_N, "selector_lr": None, "allow_rank_zero": True,
            "warmup_epochs": 0}
"""MARS as its notebooks run it (MNIST-2FC-soft.ipynb; ``--set mode=hard`` for -hard): MARSLoss(model,
len(trainset)) with trainset full MNIST's 60,000 digits (N = 60,000 on any data: on the embedded
4,000 the data's own N closes every mask, in the authors' code as in rankbench), one Adam for
weights and logits, eval masks ``logits > 0`` with nothing kept when none is (rank 0), ``warmup``
never switched on."""
NOTEBOOK_WHY = ("mlp2 is MARS's 2FC-Net, so mars runs it as MARS's notebooks do (the mars-notebook recipe, on any "
                "data; --recipe embedded or paper for rankbench's own set-up)")


class Mars(Method):
    """Hard-Concrete masks on every bond, relaxed-MAP loss with a Bernoulli prior
    π on the masks and a Gaussian prior on the cores, both scaled by 1/N.

    A training step draws every mask at once and computes the penalty over all
    masks and cores at once (``loss``): gate by gate, the masks' arithmetic cost a
    few kernel launches per bond, and ResNet-32 has 219 bonds.
    """

    name: ClassVar[str] = "mars"
    description: ClassVar[str] = "MARS: Hard-Concrete rank masks with a Bernoulli prior (relaxed MAP)"
    compression_knob: ClassVar[Knob | None] = Knob("prior", increases_compression=False)
    hyperparameters: ClassVar[dict[str, Hyper]] = {
        **SELECTOR_HYPERPARAMETERS,
        "mode": Hyper("soft", "soft: prior 0.1, alpha -1.5; hard: prior 0.01, alpha -1.75", choices=tuple(MODES),
                      label=True),
        "prior": Hyper(None, "prior probability π that a slice is on (none: by mode)", type=float,
                       minimum=1e-9, maximum=1 - 1e-9, nullable=True, search=Search(1e-3, 0.5, log=True)),
        "alpha": Hyper(None, "initial mean of the logits θ (none: by mode)", type=float, nullable=True),
        "tau0": Hyper(0.1, "initial Hard-Concrete temperature", minimum=1e-6),
        "tau_min": Hyper(0.01, "temperature floor", minimum=1e-6),
        "tau_decay": Hyper(0.99, "temperature factor applied after each epoch", minimum=0.0, maximum=1.0),
        "gamma": Hyper(-0.1, "Hard-Concrete stretch lower end γ"),
        "zeta": Hyper(1.1, "Hard-Concrete stretch upper end ζ"),
        "core_prior_inv_std": Hyper(0.1, "s^-1 of the Gaussian prior on core entries", minimum=0.0),
        "prior_n": Hyper(None, "N of the prior's 1/N weight (none: the training set's size)", type=int,
                         minimum=1, nullable=True),
        "allow_rank_zero": Hyper(False, "let a bond whose every logit is <= 0 prune to rank 0 (the layer then "
                                 "outputs its bias), as MARS's authors; false: keep its likeliest slice"),
        "warmup_epochs": Hyper(0, "epochs trained unmasked (every mask 1, MARS's warmup switch) before the masks "
                               "switch on; the priors and the temperature schedule run throughout", minimum=0),
    }
    task_defaults: ClassVar[dict[str, Mapping[str, object] | MethodDefaults]] = {
        "lenet5/embedded": MethodDefaults({"prior_n": FULL_MNIST_N}, PRIOR_N_WHY + " (measured on mlp2)"),
        "mlp2/embedded": MethodDefaults(
            {"prior_n": FULL_MNIST_N, "selector_lr": 0.03},
            PRIOR_N_WHY + "; and its masks, which start closed, get selector_lr 0.03: with 32 steps per epoch they "
            "stay closed for 60-100 of the 300 epochs at the weights' 1e-2. Test accuracy of mars, seeds 0-2: "
            "N=4,000 80.0% (seed 0, 391x); N=60,000 93.4/87.4/86.8%; N=60,000 and selector_lr 0.03 "
            "94.6/93.2/95.0% at 210/188/197x; N=4,000 and selector_lr 0.03 10% (all ranks 1)"),
        "mlp2": MethodDefaults({}, NOTEBOOK_WHY, recipe="mars-notebook"),
        "mlp2/mars-notebook": MethodDefaults(NOTEBOOK, "the notebook's MARS: " + ", ".join(
            f"{k}={'none' if v is None else v}" for k, v in NOTEBOOK.items())),
    }

    def __init__(self, params: Mapping) -> None:
        super().__init__(params)
        mode = MODES[self.params["mode"]]
        self.prior = mode["prior"] if self.params["prior"] is None else self.params["prior"]
        self.alpha = mode["alpha"] if self.params["alpha"] is None else self.params["alpha"]
        self.temperature = self.params["tau0"]
        self._drawn = StaticInput()
        self._step_inputs: tuple[Tensor, Tensor | None] | None = None
        """The θ this training step drew from and its forward's cores, read by ``penalty`` within the step."""
        self._warming_up = self.params["warmup_epochs"] > 0
        """Within the first ``warmup_epochs`` epochs: the masks are off (1)."""

    def selector(self, bond: Bond) -> RankSelector | None:
        return HardConcreteMask(bond.size, self.alpha, self.temperature, self.params["gamma"], self.params["zeta"],
                                allow_zero=self.params["allow_rank_zero"], masking=self.params["warmup_epochs"] == 0)

    def masks(self, model: nn.Module) -> list[HardConcreteMask]:
        """The masks ``attach`` put on ``model``, in bond order (read from the registry)."""
        return [m for m in self.selectors.values() if isinstance(m, HardConcreteMask)]

    def penalty(self, model: nn.Module) -> Tensor:
        """(1/N)·[−Σ (φ log π + (1−φ) log(1−π)) + ½ s⁻² Σ_cores ‖G‖²]."""
        if self._step_inputs is not None:
            return self._penalty(model, *self._step_inputs)
        masks = self.masks(model)
        theta = torch.cat([m.theta for m in masks]) if masks else torch.zeros(0, device=next(model.parameters()).device)
        return self._penalty(model, theta)

    def _penalty(self, model: nn.Module, theta: Tensor, cores: Tensor | None = None) -> Tensor:
        """``penalty`` given every mask's θ in one vector, in O(1) ops: the prior's sum is
        −Σφ·(log π − log(1−π)) − |θ|·log(1−π), and Σ‖G‖² one dot product of all cores, flattened
        (``cores``: the training forward's, from its ``CoreBank``)."""
        assert self.context is not None, "attach() first"
        n = self.context.num_train if self.params["prior_n"] is None else self.params["prior_n"]
        log_on, log_off = math.log(self.prior), math.log1p(-self.prior)
        if cores is None:
            cores = torch.cat([core.reshape(-1) for _, layer in tensorized_layers(model) for core in layer.cores])
        prior_weight = -(log_on - log_off) / n
        l2_weight = 0.5 * self.params["core_prior_inv_std"] ** 2 / n
        weighted = torch.add(torch.sigmoid(theta).sum() * prior_weight, torch.dot(cores, cores), alpha=l2_weight)
        return weighted - theta.numel() * log_off / n

    def draw(self, masks: list[HardConcreteMask], theta: Tensor) -> list[Tensor]:
        """Every mask's training multipliers in one pass over ``theta`` (all masks' θ, in
        order): one ``torch.rand`` for all of them, in θ's dtype (not the numbers of sampling mask
        by mask, the same distribution), ``logit(u)`` for ``log u − log(1−u)``, and one temperature,
        since the method keeps every mask's the same (``selector``, ``on_epoch_end``); views of
        one ``StaticInput``, so a compiled model finds them where it did last step."""
        gamma, zeta = self.params["gamma"], self.params["zeta"]
        noise = torch.logit(torch.rand(theta.numel(), dtype=theta.dtype, device=theta.device), eps=1e-6)
        s = torch.sigmoid((theta + noise) / masks[0].temperature)
        values = self._drawn.update(torch.clamp(s * (zeta - gamma) + gamma, 0.0, 1.0))
        return list(values.split([m.size for m in masks]))

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor], task_loss: TaskLoss) -> StepLoss:
        """``Method.loss`` with all masks drawn at once and supplied to them
        (``RankSelector.supplied``), the draw and the penalty reading one vector of all θ
        (two would each send every mask its own gradient, one addition per mask)."""
        masks = self.masks(model)
        if not model.training or not masks:
            return super().loss(model, batch, task_loss)
        x, y = batch
        theta = torch.cat([m.theta for m in masks])
        if self._warming_up:  # unmasked, as MARS's warmup: every multiplier 1 (the priors still count)
            values = list(self._drawn.update(torch.ones_like(theta.detach())).split([m.size for m in masks]))
        else:
            values = self.draw(masks, theta)
        with RankSelector.supplied(dict(zip(masks, values, strict=True))):
            outputs = model(x)
        task = task_loss(outputs, y)
        bank = CoreBank.of(model)
        self._step_inputs = (theta, bank.flat_cores() if bank is not None else None)
        try:
            penalty = self.penalty(model)
        finally:
            self._step_inputs = None
        return StepLoss(total=task + penalty, task=task.detach(), penalty=penalty.detach(), outputs=outputs)

    def attach(self, model: nn.Module, context) -> None:
        super().attach(model, context)
        self._warming_up = self.params["warmup_epochs"] > 0

    def _set_masking(self, model: nn.Module, on: bool) -> None:
        self._warming_up = not on
        for mask in self.masks(model):
            mask.masking.fill_(1.0 if on else 0.0)

    def state_dict(self) -> dict:
        return {"temperature": self.temperature, "masking": not self._warming_up}

    def load_state_dict(self, model: nn.Module, state: Mapping) -> None:
        self.temperature = state.get("temperature", self.temperature)
        self._set_masking(model, bool(state.get("masking", True)))

    def on_epoch_end(self, model: nn.Module, epoch: int, metrics: Mapping[str, float]) -> None:
        """Anneal the temperature; after epoch ``warmup_epochs`` (counted from 1) switch the masks on."""
        self.temperature = max(self.params["tau_min"], self.params["tau_decay"] * self.temperature)
        for mask in self.masks(model):
            mask.temperature.fill_(self.temperature)
        if self._warming_up and epoch >= self.params["warmup_epochs"]:
            self._set_masking(model, True)
