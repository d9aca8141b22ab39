"""The plugin contract: small, fast checks that a method or task plugin works with rankbench.

``check_method(registry, name, task)`` builds the method's model on the task at a
small rank, takes two training steps on real examples, and checks learned ranks,
pruning (export) and the parameter count that the compression ratio is made of.
``check_task(registry, name)`` checks the task's hyperparameters, data and models,
then runs ``check_method`` on it for every method that declares ``checks_tasks``
(the built-ins ``dense``, ``trn`` and ``ours``).
``rankbench check-plugin NAME`` prints the results.

Every check returns a :class:`Check`; an exception inside a check fails it with
``"<ExceptionType>: <message>"`` and the checks that depend on it are failed with
``"skipped: ..."``. A check that passes with a caveat has a detail starting with
``"warning:"``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from rankbench.data import DataSplits, Split, default_data_dir
from rankbench.errors import RankbenchError
from rankbench.hyper import Hyper, resolve
from rankbench.layers.tensorized import (
    RankSelector,
    TensorizedLayer,
    bonds,
    count_parameters,
    learned_ranks,
    prune_model,
    selector_parameters,
    tensorized_layers,
)
from rankbench.plugins.defaults import Recipe, check_declarations, recipes_of, resolve_defaults
from rankbench.plugins.method import ROLES, Method
from rankbench.plugins.registry import Registry
from rankbench.plugins.task import Task
from rankbench.records import Record

__all__ = ["Check", "check_method", "check_plugin", "check_task", "task_methods", "SMALL_RANK", "BATCH",
           "REQUIRED_TASK_KEYS"]

SMALL_RANK = 4
"""Initial rank of every bond in the checks (``initial_rank=4``; ``rank=4`` for a method that sets its own)."""
BATCH = 16
"""Examples per batch in the checks (two batches are taken from the training split)."""
REQUIRED_TASK_KEYS = ("epochs", "batch_size", "lr", "initial_rank")

_DATA_CACHE: dict[tuple, DataSplits] = {}


@dataclass
class Check:
    """The outcome of one contract check.

    ``rankbench check-plugin`` prints one row per check.

    Attributes:
        name: The check (``config``, ``data``, ``build``, ``train``, ``ranks``, ``export``,
            ``compression``; a task's method checks are prefixed ``"<method>: "``).
        passed: Whether it holds. A check whose prerequisite failed fails with a
            detail ``skipped: ...``.
        detail: What was found; a passing detail that starts with ``warning:`` has a
            caveat worth reading, a failing one names the exception or the violation.
    """

    name: str
    passed: bool
    detail: str


class _Failed(Exception):
    """A contract violation found by a check (its message is the detail, with no type prefix)."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise _Failed(message)


class _Runner:
    """Runs named checks in order, turning exceptions into failed checks and skipping dependants."""

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix
        self.checks: list[Check] = []
        self.failed: set[str] = set()

    def run(self, name: str, fn: Callable[[], str], needs: tuple[str, ...] = ()) -> bool:
        missing = [n for n in needs if n in self.failed]
        if missing:
            self.failed.add(name)
            self.checks.append(Check(self.prefix + name, False, f"skipped: {', '.join(missing)} failed"))
            return False
        try:
            detail = fn()
        except _Failed as exc:
            self.failed.add(name)
            self.checks.append(Check(self.prefix + name, False, str(exc)))
            return False
        except Exception as exc:  # noqa: BLE001 - any error of the plugin is a failed check
            self.failed.add(name)
            self.checks.append(Check(self.prefix + name, False, f"{type(exc).__name__}: {exc}"))
            return False
        self.checks.append(Check(self.prefix + name, True, detail))
        return True


# ---------------------------------------------------------------------------- helpers


def _default_params(task_cls: type[Task]) -> dict[str, Any]:
    return resolve(task_cls.hyperparameters, {}, f"task {task_cls.name}")


def _load_data(task_cls: type[Task]) -> DataSplits:
    """The task's data at its default hyperparameters, loaded once per task class and data folder.

    A task whose data is not on this machine (CIFAR-10 has no offline copy) is
    checked on random inputs of its ``example_input`` instead: the contract is
    about the plugin's code, and the stand-in says so in its name."""
    key = (task_cls, str(default_data_dir()))
    if key not in _DATA_CACHE:
        task = task_cls(_default_params(task_cls))
        try:
            _DATA_CACHE[key] = task.load_data(None, False)
        except RankbenchError as exc:
            if task_cls.input_shape is None and task_cls.example_input is Task.example_input:
                raise
            _DATA_CACHE[key] = _stand_in_data(task, str(exc))
    return _DATA_CACHE[key]


def _stand_in_data(task: Task, why: str) -> DataSplits:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        num_classes = int(task.dense_model().eval()(task.example_input(1, generator)).shape[1])

    def split(n: int) -> Split:
        return Split(task.example_input(n, generator), torch.randint(0, num_classes, (n,), generator=generator))

    return DataSplits(name=f"random stand-in data (warning: {why})", source="random inputs",
                      train=split(4 * BATCH), val=split(BATCH), test=split(BATCH), num_classes=num_classes)


def _batches(data: DataSplits) -> list[tuple[Tensor, Tensor]]:
    train = data.train
    _require(len(train) >= 2 * BATCH, f"the training split has {len(train)} examples, the checks need {2 * BATCH}")
    return [(train.x[i * BATCH:(i + 1) * BATCH], train.y[i * BATCH:(i + 1) * BATCH]) for i in range(2)]


def _head(split: Split, n: int) -> Split:
    """The first ``n`` examples of a split."""
    return replace(split, x=split.x[:n], y=split.y[:n])


def _names(names: list[str], limit: int = 3) -> str:
    """``a, b, c and 4 more``."""
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _shape(t: Any) -> str:
    return str(tuple(t.shape)) if isinstance(t, Tensor) else type(t).__name__


def _check_selector_output(where: str, selector: RankSelector, size: int) -> None:
    """Both the training sample and the eval multipliers are finite vectors of length ``size``."""
    _require(isinstance(selector, RankSelector), f"{where}: the selector is a {type(selector).__name__}, "
                                                 "not a RankSelector")
    _require(selector.size == size, f"{where}: selector.size is {selector.size} but the bond has size {size}")
    was_training = selector.training
    try:
        with torch.random.fork_rng(devices=[]):
            for mode, training in (("sample()", True), ("deterministic()", False)):
                selector.train(training)
                with torch.no_grad():
                    v = selector()
                _require(isinstance(v, Tensor) and tuple(v.shape) == (size,),
                         f"{where}: {mode} returns a vector of shape {_shape(v)}, expected ({size},) "
                         f"(the bond size)")
                _require(bool(torch.isfinite(v).all()), f"{where}: {mode} returns non-finite multipliers")
    finally:
        selector.train(was_training)


def _eval_rank(selector: RankSelector) -> int:
    with torch.no_grad():
        rank = int((selector.deterministic() != 0).sum())
        return rank if selector.allows_zero else max(1, rank)


def _hand_count(model: nn.Module) -> int:
    """Parameters of the exported model, counted from first principles: each TR/TT core at its
    eval-mode bond sizes, Σ_k r_k·prod(modes_k)·r_{k+1 mod d}, plus every parameter that is
    neither a core nor part of a rank selector (biases, norms, untensorized layers)."""
    cores: set[int] = set()
    selector_ids = {id(p) for m in model.modules() if isinstance(m, RankSelector) for p in m.parameters()}
    total = 0
    for module in model.modules():
        if not isinstance(module, TensorizedLayer):
            continue
        d = len(module.core_modes)
        r = [int(core.shape[0]) for core in module.cores]
        for key, selector in module.selectors.items():
            r[int(key)] = _eval_rank(selector)
        total += sum(r[k] * math.prod(module.core_modes[k]) * r[(k + 1) % d] for k in range(d))
        cores.update(id(c) for c in module.cores)
    return total + sum(p.numel() for p in model.parameters() if id(p) not in cores and id(p) not in selector_ids)


def _small_rank_overrides(method_cls: type[Method], method_params: dict, task_cls: type[Task]) -> dict[str, Any]:
    """``initial_rank=4``, and ``rank=4`` for a method that sets its own rank through a ``rank`` hyperparameter."""
    out: dict[str, Any] = {}
    if "initial_rank" in task_cls.hyperparameters and "initial_rank" not in method_cls.hyperparameters:
        out["initial_rank"] = SMALL_RANK
    probe = method_cls(method_params)
    if "rank" in method_cls.hyperparameters and probe.initial_rank(SMALL_RANK) != SMALL_RANK:
        out["rank"] = SMALL_RANK
    return out


# ---------------------------------------------------------------------------- methods


def check_method(registry: Registry, name: str, task: str, *, prefix: str = "") -> list[Check]:
    """Checks of method ``name`` on ``task``: config, data, build, train, ranks, export, compression.

    It builds the model at a small rank, trains two steps on 2×16 examples of the
    task's default data (random inputs of its ``input_shape`` when the data is not on
    the machine), reads the ranks, exports the pruned model and compares its outputs
    with the gated eval outputs, and compares the compression count with a count made
    by hand. A check that raises fails with ``ExceptionType: message``; nothing is
    raised to the caller.

    Args:
        registry: The plugins (``Registry.discover(...)``).
        name: The method's name.
        task: The task's name.
        prefix: Prepended to every check's name.

    Returns:
        One ``Check`` per check, in order.
    """
    from rankbench.run.config import make_config
    from rankbench.run.prepare import prepare
    from rankbench.run.trainer import Trainer, TrainerCallback

    runner = _Runner(prefix)
    state: dict[str, Any] = {}

    def config() -> str:
        method_cls, task_cls = registry.method(name), registry.task(task)
        _require(isinstance(method_cls, type) and issubclass(method_cls, Method),
                 f"{name!r} is not a Method subclass")
        _require(isinstance(method_cls.hyperparameters, dict), "hyperparameters must be a dict of name -> Hyper")
        for key, hyper in method_cls.hyperparameters.items():
            _require(isinstance(hyper, Hyper),
                     f"hyperparameter {key!r} is declared as {type(hyper).__name__}, not rankbench.plugin.Hyper")
            hyper.validate(key, hyper.default)
        defaults = make_config(registry, task, name)
        overrides = _small_rank_overrides(method_cls, defaults.method_params, task_cls)
        small = make_config(registry, task, name, overrides, device="cpu")
        state.update(method_cls=method_cls, task_cls=task_cls, config=small)
        shown = ", ".join(f"{k}={v}" for k, v in defaults.method_params.items()) or "no hyperparameters"
        checked = ", ".join(f"{k}={v}" for k, v in overrides.items()) or "the defaults"
        detail = f"defaults valid ({shown}); checked with {checked}"
        return detail if method_cls.description else "warning: no description; " + detail

    def data() -> str:
        loaded = _load_data(state["task_cls"])
        state["data"] = loaded
        state["batches"] = _batches(loaded)
        return f"{loaded.name}: train {len(loaded.train):,} / val {len(loaded.val):,} / test {len(loaded.test):,}; " \
               f"2 batches of {BATCH}"

    def build() -> str:
        prepared = prepare(state["config"], registry, data=state["data"])
        model, method = prepared.build(seed=0)
        task_obj = prepared.task
        _require(isinstance(model, nn.Module), f"build_model returned a {type(model).__name__}, not an nn.Module")
        state.update(task=task_obj, method=method, model=model)
        layers = list(tensorized_layers(model))
        n_selectors = 0
        if method.tensorized:
            _require(bool(layers), f"the method is tensorized but task {task}'s tensorized_model() "
                                   "has no TensorizedLayer")
            for bond in bonds(model):
                selector = bond.layer.selector(bond.index)
                if selector is not None:
                    _check_selector_output(bond.name, selector, bond.size)
                    n_selectors += 1
        stray = [m for m in model.modules() if isinstance(m, RankSelector)]
        _require(len(stray) == n_selectors,
                 f"{len(stray) - n_selectors} RankSelector module(s) sit outside a bond of a tensorized layer")
        if not layers:
            return f"ordinary model, {count_parameters(model):,} parameters"
        ranks = {n: list(layer.ranks) for n, layer in layers}
        return f"{len(layers)} tensorized layer(s), ranks {ranks}, {n_selectors} selector(s)"

    def train() -> str:
        model: nn.Module = state["model"]
        method: Method = state["method"]
        data: DataSplits = state["data"]
        two_batches = replace(data, train=_head(data.train, 2 * BATCH), val=_head(data.val, BATCH))
        named = dict(model.named_parameters())
        selector_ids = {id(p) for p in selector_parameters(model)}
        weights = {n: p.detach().clone() for n, p in named.items() if id(p) not in selector_ids}
        trained_selectors = {n: p for n, p in named.items()
                             if id(p) in selector_ids and p.requires_grad and p.numel() > 0}
        got_grad = {n: False for n in trained_selectors}
        nonzero = {n: False for n in trained_selectors}
        losses: list[float] = []

        class GradientChecks(TrainerCallback):
            def on_loss(self, trainer, epoch, batch, read) -> None:  # before the step: a NaN never reaches weights
                total, task_loss, penalty = read
                _require(math.isfinite(total), f"step {batch}: loss is {total} (task {task_loss:.4g}, "
                                               f"penalty {penalty:.4g})")
                losses.append(total)

            def on_step_end(self, trainer, epoch, batch, read) -> None:
                for n, p in trained_selectors.items():
                    if p.grad is None:
                        continue
                    got_grad[n] = True
                    _require(bool(torch.isfinite(p.grad).all()), f"step {batch}: selector parameter {n} has a "
                                                                 "non-finite gradient")
                    nonzero[n] = nonzero[n] or bool((p.grad != 0).any())
                for n, p in named.items():
                    if id(p) not in selector_ids and p.grad is not None:
                        _require(bool(torch.isfinite(p.grad).all()),
                                 f"step {batch}: weight {n} has a non-finite gradient")

        trainer = Trainer(model, method, state["task"], two_batches, epochs=1, seed=0, device=torch.device("cpu"),
                          dense_parameters=count_parameters(state["task"].dense_model()), batch_size=BATCH,
                          callbacks=[GradientChecks()])
        trainer.fit()  # two optimizer steps, a validation, and the method's epoch hook with real metrics
        missing = [n for n, ok in got_grad.items() if not ok]
        _require(not missing, f"selector parameter(s) {_names(missing)} require grad but receive no gradient")
        changed = [n for n, p in named.items() if n in weights and not torch.equal(p.detach(), weights[n])]
        _require(bool(changed), "no weight changed after 2 optimizer steps")
        detail = (f"loss {losses[0]:.4g} -> {losses[1]:.4g}; {len(changed)}/{len(weights)} weight tensors changed; "
                  f"{len(trained_selectors)} trainable selector parameters with finite gradients")
        zero = [n for n, ok in nonzero.items() if not ok]
        if zero:
            detail = f"warning: selector parameter(s) {_names(zero)} got exactly zero gradient; " + detail
        return detail

    def ranks() -> str:
        model: nn.Module = state["model"]
        ranks_ = learned_ranks(model)
        layers = dict(tensorized_layers(model))
        _require(set(ranks_) == set(layers), f"learned_ranks covers {sorted(ranks_)}, the model has {sorted(layers)}")
        for layer_name, values in ranks_.items():
            initial = layers[layer_name].ranks
            _require(len(values) == len(initial), f"{layer_name}: {len(values)} ranks for {len(initial)} bonds")
            for k, (r, r0) in enumerate(zip(values, initial)):
                _require(isinstance(r, int) and not isinstance(r, bool), f"{layer_name} bond {k}: rank {r!r} "
                                                                         "is not an int")
                selector = layers[layer_name].selector(k)
                low = 0 if selector is not None and selector.allows_zero else 1  # a selector may allow rank 0
                _require(low <= r <= r0, f"{layer_name} bond {k}: rank {r} outside {low}..{r0} (its initial size)")
        return f"{ranks_}" if ranks_ else "no tensorized layers"

    def export() -> str:
        model: nn.Module = state["model"]
        x = state["batches"][0][0]
        model.eval()
        with torch.no_grad():
            gated = model(x)
        pruned = prune_model(model).eval()
        left = [type(m).__name__ for m in pruned.modules() if isinstance(m, RankSelector)]
        _require(not left, f"the pruned model still has RankSelector modules: {', '.join(left)}")
        with torch.no_grad():
            out = pruned(x)
        _require(isinstance(out, Tensor) and out.shape == gated.shape,
                 f"pruned output shape {_shape(out)} != gated eval output shape {_shape(gated)}")
        diff = float((out - gated).abs().max()) if out.numel() else 0.0
        _require(torch.allclose(out, gated, rtol=1e-4, atol=1e-5),
                 f"pruned outputs differ from the gated model's eval outputs (max abs diff {diff:.3g})")
        return f"pruned model equals the gated eval model on {len(x)} examples (max abs diff {diff:.2g})"

    def compression() -> str:
        model: nn.Module = state["model"]
        model.eval()
        counted = count_parameters(model)
        hand = _hand_count(model)
        _require(counted == hand, f"count_parameters gives {counted:,}, the hand count from the eval ranks and "
                                  f"core modes gives {hand:,}")
        pruned = prune_model(model)
        exported = sum(p.numel() for p in pruned.parameters())
        _require(counted == exported, f"count_parameters gives {counted:,} but the pruned model has {exported:,} "
                                      "parameters")
        dense_model = state["task"].dense_model()
        dense = sum(p.numel() for p in dense_model.parameters())
        _require(dense == count_parameters(dense_model),
                 f"the dense model has {dense:,} parameters but count_parameters gives "
                 f"{count_parameters(dense_model):,}")
        _require(counted > 0, "the model has no parameters")
        ratio = dense / counted
        _require(math.isfinite(ratio) and ratio > 0, f"compression ratio {ratio} is not a positive number")
        return f"{counted:,} parameters (hand count and pruned model agree), dense {dense:,}, ratio {ratio:.2f}x"

    runner.run("config", config)
    runner.run("data", data, needs=("config",))
    runner.run("build", build, needs=("config", "data"))
    runner.run("train", train, needs=("build",))
    runner.run("ranks", ranks, needs=("build",))
    runner.run("export", export, needs=("build",))
    runner.run("compression", compression, needs=("build",))
    return runner.checks


# ---------------------------------------------------------------------------- tasks


def check_task(registry: Registry, name: str) -> list[Check]:
    """Checks of task ``name``: hyperparameters, data, dense and tensorized model outputs,
    then ``check_method`` of every method that declares ``checks_tasks`` (the built-ins dense, trn and
    ours) on it (names prefixed ``"<method>: "``).

    Args:
        registry: The plugins (``Registry.discover(...)``).
        name: The task's name.

    Returns:
        One ``Check`` per check, in order: ``config``, ``data``, ``dense model``,
        ``tensorized model``, then the method checks.
    """
    runner = _Runner()
    state: dict[str, Any] = {}

    def config() -> str:
        task_cls = registry.task(name)
        _require(isinstance(task_cls, type) and issubclass(task_cls, Task), f"{name!r} is not a Task subclass")
        for key, hyper in task_cls.hyperparameters.items():
            _require(isinstance(hyper, Hyper),
                     f"hyperparameter {key!r} is declared as {type(hyper).__name__}, not rankbench.plugin.Hyper")
            hyper.validate(key, hyper.default)
        absent = [k for k in REQUIRED_TASK_KEYS if k not in task_cls.hyperparameters]
        _require(not absent, f"hyperparameters {', '.join(absent)} are not declared (a task declares "
                             f"{', '.join(REQUIRED_TASK_KEYS)})")
        _require(task_cls.scheduler_interval in ("epoch", "step"),
                 f"scheduler_interval is {task_cls.scheduler_interval!r}, not 'epoch' or 'step'")
        _require(all(isinstance(m, Record) and m.kind == "final" for m in task_cls.metrics),
                 "metrics must be final-kind rankbench.plugin.Record names")
        absent = [k for k in task_cls.recipe_keys if k not in task_cls.hyperparameters]
        _require(not absent, f"recipe_keys {', '.join(absent)} are not declared hyperparameters")
        for recipe_name, recipe in task_cls.recipes.items():
            _require(isinstance(recipe, Recipe), f"recipe {recipe_name!r} is not a rankbench.plugin.Recipe")
        problem = check_declarations({name: task_cls}, {}).get(name)
        _require(problem is None, problem or "")
        for recipe_name in recipes_of(task_cls):
            for method in registry.methods:  # every method's defaults on this task resolve
                resolve_defaults(task_cls, registry.methods[method], recipe_name, {}, {})
        params = _default_params(task_cls)
        state.update(task_cls=task_cls, task=task_cls(params))
        return ", ".join(f"{k}={v}" for k, v in params.items())

    def data() -> str:
        loaded = _load_data(state["task_cls"])
        sizes = {split: len(getattr(loaded, split)) for split in ("train", "val", "test")}
        empty = [s for s, n in sizes.items() if n == 0]
        _require(not empty, f"empty split(s): {', '.join(empty)}")
        _require(isinstance(loaded.num_classes, int) and loaded.num_classes >= 2,
                 f"num_classes is {loaded.num_classes!r}")
        for split in ("train", "val", "test"):
            y = getattr(loaded, split).y
            _require(int(y.min()) >= 0 and int(y.max()) < loaded.num_classes,
                     f"{split} labels outside 0..{loaded.num_classes - 1}")
        state["data"] = loaded
        state["x"] = loaded.train.x[:BATCH]
        return (f"{loaded.name} ({loaded.source}): disjoint splits train {sizes['train']:,} / val {sizes['val']:,} / "
                f"test {sizes['test']:,}, {loaded.num_classes} classes")

    def output(model: nn.Module, what: str) -> str:
        x = state["x"]
        model.eval()
        with torch.no_grad():
            out = model(x)
        expected = tuple(state["task"].expected_output_shape(x, state["data"]))
        _require(isinstance(out, Tensor) and tuple(out.shape) == expected,
                 f"{what} output shape {_shape(out)}, expected {expected} (the task's expected_output_shape)")
        return f"output {expected}, {count_parameters(model):,} parameters"

    def dense_model() -> str:
        return output(state["task"].dense_model(), "dense model")

    def tensorized_model() -> str:
        model = state["task"].tensorized_model(SMALL_RANK)
        layers = list(tensorized_layers(model))
        _require(bool(layers), f"tensorized_model({SMALL_RANK}) has no TensorizedLayer")
        return f"rank {SMALL_RANK}: {len(layers)} tensorized layer(s), " + output(model, "tensorized model")

    runner.run("config", config)
    runner.run("data", data, needs=("config",))
    runner.run("dense model", dense_model, needs=("data",))
    runner.run("tensorized model", tensorized_model, needs=("data",))
    checks = runner.checks
    for method in task_methods(registry):
        checks += check_method(registry, method, name, prefix=f"{method}: ")
    return checks


def check_plugin(registry: Registry, name: str, task: str | None = None) -> list[tuple[str, list[Check]]]:
    """``rankbench check-plugin NAME [--task TASK]``: (title, checks) per group. A method is checked
    on ``task`` or on every registered task, a task on itself; a name that is both is checked as both."""
    is_method, is_task = name in registry.methods, name in registry.tasks
    if not (is_method or is_task):
        raise RankbenchError(
            f"unknown plugin {name!r}: no method or task of that name; methods: "
            f"{', '.join(sorted(registry.methods))}; tasks: {', '.join(sorted(registry.tasks))}"
        )
    if task is not None:
        registry.task(task)  # an unknown --task is an input error (exit 2)
    groups = []
    if is_method:
        for each in [task] if task is not None else sorted(registry.tasks):
            groups.append((f"method {name} on task {each}", check_method(registry, name, each)))
    if is_task:
        groups.append((f"task {name}", check_task(registry, name)))
    return groups


def task_methods(registry: Registry) -> list[str]:
    """The methods ``check_task`` runs on a task: those declaring ``checks_tasks``, by role
    (reference, uniform, selector), then name."""
    chosen = [m for m in registry.methods.values() if m.checks_tasks]
    return [m.name for m in sorted(chosen, key=lambda m: (ROLES.index(m.role), m.name))]
