"""The plugin contract (``rankbench.contract``) and ``rankbench check-plugin``.

Every built-in method passes the contract on every built-in task; broken plugins,
written into ``tmp_path``, fail the check that should catch them; the plugin
examples of ``docs/plugins.md`` pass (so the docs cannot rot). The checks use
the embedded 5k MNIST digits (``RANKBENCH_DATA_DIR`` points at an empty folder).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from rankbench import contract
from rankbench.cli import main
from rankbench.contract import Check, check_method, check_task
from rankbench.plugins.registry import Registry

ROOT = Path(__file__).resolve().parents[1]
BUILTIN_METHODS = ("dense", "trn", "ours", "reinforce_l0", "mars", "svd_posthoc", "trp")
BUILTIN_TASKS = ("lenet5", "mlp2")
METHOD_CHECKS = ["config", "data", "build", "train", "ranks", "export", "compression"]
TASK_CHECKS = ["config", "data", "dense model", "tensorized model"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread_embedded_data(tmp_path_factory):
    """One torch thread (tiny models are fastest so), and the offline embedded data."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RANKBENCH_DATA_DIR", str(tmp_path_factory.mktemp("no-data")))
        yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def registry() -> Registry:
    return Registry.discover()


def failures(checks: list[Check]) -> list[Check]:
    return [c for c in checks if not c.passed]


def by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


# ---------------------------------------------------------------------------- built-ins pass


@pytest.mark.parametrize("task", BUILTIN_TASKS)
@pytest.mark.parametrize("method", BUILTIN_METHODS)
def test_builtin_method_passes_the_contract(registry, method, task):
    checks = check_method(registry, method, task)
    assert [c.name for c in checks] == METHOD_CHECKS
    assert not failures(checks), failures(checks)
    assert all(isinstance(c.detail, str) and c.detail for c in checks)


@pytest.mark.parametrize("task", BUILTIN_TASKS)
def test_builtin_task_passes_the_contract(registry, task):
    checks = check_task(registry, task)
    assert not failures(checks), failures(checks)
    expected = TASK_CHECKS + [f"{m}: {c}" for m in ("dense", "trn", "ours") for c in METHOD_CHECKS]
    assert [c.name for c in checks] == expected
    data = by_name(checks)["data"].detail
    assert "train 4,000 / val 500 / test 500" in data


def test_trn_is_checked_at_its_own_small_rank(registry):
    checks = by_name(check_method(registry, "trn", "lenet5"))
    assert "rank=4" in checks["config"].detail
    assert "[4, 4, 4, 4]" in checks["ranks"].detail


# ---------------------------------------------------------------------------- broken plugins fail


BROKEN = '''
import torch
from torch import nn
from rankbench.plugins.method import Method
from rankbench.layers.tensorized import RankSelector


class Short(RankSelector):
    """Claims the bond's size but returns one multiplier too few."""
    def deterministic(self):
        return torch.ones(self.size - 1)


class ShortVector(Method):
    name = "short_vector"
    description = "broken: selector vector of the wrong length"
    def selector(self, bond):
        return Short(bond.size)


class Sized(RankSelector):
    def deterministic(self):
        return torch.ones(self.size)


class WrongSize(Method):
    name = "wrong_size"
    description = "broken: selector of the wrong size"
    def selector(self, bond):
        return Sized(bond.size + 1)


class NanPenalty(Method):
    name = "nan_penalty"
    description = "broken: NaN penalty"
    def penalty(self, model):
        return torch.tensor(float("nan"))


class Noisy(RankSelector):
    """Eval multipliers that change at every call: pruning cannot reproduce them."""
    def deterministic(self):
        return torch.rand(self.size) + 0.5


class NoisyEval(Method):
    name = "noisy_eval"
    description = "broken: non-deterministic eval multipliers"
    def selector(self, bond):
        return Noisy(bond.size)


class Overcount(Sized):
    def rank(self):
        return self.size + 1


class OvercountRank(Method):
    name = "overcount_rank"
    description = "broken: rank() larger than the bond"
    def selector(self, bond):
        return Overcount(bond.size)


class Unused(RankSelector):
    def __init__(self, size):
        super().__init__(size)
        self.theta = nn.Parameter(torch.zeros(size))
    def deterministic(self):
        return torch.ones(self.size)


class UnusedParameter(Method):
    name = "unused_parameter"
    description = "broken: a trainable selector parameter that never gets a gradient"
    def selector(self, bond):
        return Unused(bond.size)


class Dead(Unused):
    def deterministic(self):
        return torch.ones(self.size) + 0.0 * self.theta


class DeadGradient(Method):
    name = "dead_gradient"
    description = "suspicious: a selector parameter whose gradient is exactly zero"
    def selector(self, bond):
        return Dead(bond.size)


class BadHyper(Method):
    name = "bad_hyper"
    description = "broken: a hyperparameter that is not a Hyper"
    hyperparameters = {"lambda": 0.1}
'''


@pytest.fixture(scope="module")
def broken_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("broken")
    (folder / "broken.py").write_text(BROKEN)
    return folder


@pytest.fixture(scope="module")
def broken(broken_dir) -> Registry:
    return Registry.discover(plugin_dirs=[broken_dir])


def assert_skipped_after(checks: dict[str, Check], names: list[str]) -> None:
    for name in names:
        assert not checks[name].passed and checks[name].detail.startswith("skipped: "), checks[name]


def test_selector_vector_of_the_wrong_length_fails_build_naming_the_shapes(broken):
    checks = by_name(check_method(broken, "short_vector", "lenet5"))
    assert checks["config"].passed and checks["data"].passed
    build = checks["build"]
    assert not build.passed
    assert "shape (3,)" in build.detail and "expected (4,)" in build.detail and "conv1.bond0" in build.detail
    assert_skipped_after(checks, ["train", "ranks", "export", "compression"])


def test_selector_of_the_wrong_size_fails_build_with_the_exception(broken):
    checks = by_name(check_method(broken, "wrong_size", "mlp2"))
    assert checks["build"].detail == "ValueError: selector of size 5 on bond of size 4"
    assert_skipped_after(checks, ["train", "ranks", "export", "compression"])


def test_nan_penalty_fails_train(broken):
    checks = by_name(check_method(broken, "nan_penalty", "lenet5"))
    assert checks["build"].passed
    train = checks["train"]
    assert not train.passed
    assert "nan" in train.detail and "penalty nan" in train.detail
    # the model was never stepped: what does not depend on training still passes
    assert checks["ranks"].passed and checks["export"].passed and checks["compression"].passed


def test_non_deterministic_eval_multipliers_fail_export(broken):
    checks = by_name(check_method(broken, "noisy_eval", "mlp2"))
    assert checks["train"].passed
    assert not checks["export"].passed
    assert "differ" in checks["export"].detail


def test_rank_larger_than_the_bond_fails_ranks_and_compression(broken):
    checks = by_name(check_method(broken, "overcount_rank", "mlp2"))
    assert not checks["ranks"].passed
    assert re.search(r"rank 5 outside 1\.\.4", checks["ranks"].detail), checks["ranks"]
    assert not checks["compression"].passed
    assert "hand count" in checks["compression"].detail


def test_selector_parameter_without_gradient_fails_train(broken):
    train = by_name(check_method(broken, "unused_parameter", "mlp2"))["train"]
    assert not train.passed
    assert "theta" in train.detail and "no gradient" in train.detail


def test_selector_parameter_with_exactly_zero_gradient_is_a_warning(broken):
    train = by_name(check_method(broken, "dead_gradient", "mlp2"))["train"]
    assert train.passed
    assert train.detail.startswith("warning: ") and "zero gradient" in train.detail


def test_hyperparameter_that_is_not_a_hyper_fails_config_and_skips_the_rest(broken):
    checks = check_method(broken, "bad_hyper", "lenet5")
    assert not checks[0].passed and "'lambda'" in checks[0].detail and "Hyper" in checks[0].detail
    assert_skipped_after(by_name(checks), METHOD_CHECKS[1:])


def test_unknown_method_fails_config_with_the_exception(registry):
    checks = check_method(registry, "nope", "lenet5")
    assert checks[0].detail.startswith("RankbenchError: unknown method 'nope'")
    assert len(failures(checks)) == len(METHOD_CHECKS)


def test_parameter_count_disagreeing_with_the_hand_count_fails_compression(registry, monkeypatch):
    real = contract.count_parameters
    monkeypatch.setattr(contract, "count_parameters", lambda model: real(model) + 1)
    compression = by_name(check_method(registry, "ours", "mlp2"))["compression"]
    assert not compression.passed and "hand count" in compression.detail


# ---------------------------------------------------------------------------- the docs' examples work


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", path.read_text(encoding="utf-8"), re.S | re.M)


@pytest.fixture(scope="module")
def docs_plugins(tmp_path_factory) -> Path:
    blocks = python_blocks(ROOT / "docs" / "plugins.md")
    folder = tmp_path_factory.mktemp("docs_plugins")
    (folder / "plugin.py").write_text(blocks[0])
    (folder / "task_plugin.py").write_text(next(b for b in blocks if "(Task):" in b))
    return folder


def test_docs_method_example_passes_the_contract(docs_plugins):
    registry = Registry.discover(plugin_dirs=[docs_plugins])
    assert "sigmoid_l1" in registry.methods
    for task in BUILTIN_TASKS:
        checks = check_method(registry, "sigmoid_l1", task)
        assert not failures(checks), (task, failures(checks))
    assert 25 <= len(python_blocks(ROOT / "docs" / "plugins.md")[0].splitlines()) <= 45


def test_docs_optimizer_example_passes_the_contract_and_its_zeroed_state_stays_zero(tmp_path):
    from rankbench.plugin import DataSplits, MethodContext, Split
    from rankbench.run.config import make_config
    from rankbench.run.prepare import build_model
    from rankbench.run.trainer import Trainer

    generator = torch.Generator().manual_seed(0)

    def split(n: int) -> Split:
        return Split(torch.randn(n, 1, 28, 28, generator=generator), torch.randint(0, 10, (n,), generator=generator))

    (block,) = [b for b in python_blocks(ROOT / "docs" / "plugins.md") if "class ZeroLastSlice" in b]
    (tmp_path / "zero_last_slice.py").write_text(block)
    registry = Registry.discover(plugin_dirs=[tmp_path])
    assert not failures(check_method(registry, "zero_last_slice", "mlp2"))
    config = make_config(registry, "mlp2", "zero_last_slice", {"initial_rank": 3})
    task = registry.task("mlp2")(config.task_params)
    method = registry.method("zero_last_slice")(config.method_params)
    model = build_model(task, method, 0, MethodContext(num_train=32, device=torch.device("cpu")))
    data = DataSplits("tiny", "random", split(32), split(8), split(8), 10)
    trainer = Trainer(model, method, task, data, epochs=1, seed=0, device=torch.device("cpu"), dense_parameters=1,
                      batch_size=16)
    trainer.fit()
    assert method.optimizer is trainer.optimizer
    for layer in (model.fc1, model.fc2):
        for k in layer.gateable_bonds():
            right = trainer.optimizer.state[layer.cores[k]]
            assert not right["exp_avg"][-1].any() and not layer.cores[k][-1].any()


def test_docs_task_example_passes_the_contract(docs_plugins):
    registry = Registry.discover(plugin_dirs=[docs_plugins])
    checks = check_task(registry, "tiny_mlp")
    assert not failures(checks), failures(checks)
    assert not failures(check_method(registry, "sigmoid_l1", "tiny_mlp"))


# ---------------------------------------------------------------------------- the command


def test_check_plugin_of_a_builtin_method_on_one_task_exits_0(capsys):
    assert main(["check-plugin", "ours", "--task", "lenet5"]) == 0
    out = capsys.readouterr().out
    assert "method ours on task lenet5" in out
    for name in METHOD_CHECKS:
        assert re.search(rf"^{name}\s+PASS\s", out, re.M), name
    assert out.rstrip().splitlines()[-1] == f"{len(METHOD_CHECKS)} passed, 0 failed"


def test_check_plugin_of_an_unknown_name_exits_2_listing_the_valid_names(capsys):
    assert main(["check-plugin", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rankbench: error: unknown plugin 'nope'")
    assert "ours" in err and "lenet5" in err


def test_check_plugin_with_an_unknown_task_exits_2(capsys):
    assert main(["check-plugin", "ours", "--task", "nope"]) == 2
    assert "unknown task 'nope'" in capsys.readouterr().err


def test_check_plugin_of_a_broken_plugin_exits_1_on_every_task(broken_dir, capsys):
    assert main(["check-plugin", "short_vector", "--plugin-dir", str(broken_dir)]) == 1
    out = capsys.readouterr().out
    tasks = sorted(Registry.discover(plugin_dirs=[broken_dir]).tasks)  # every built-in task
    assert {"lenet5", "mlp2", "resnet32", "resnet110", "sst", "iwslt14"} <= set(tasks)
    for task in tasks:
        assert f"method short_vector on task {task}" in out
    assert re.search(r"^build\s+FAIL\s+\S+: sample\(\) returns a vector of shape", out, re.M)
    assert out.rstrip().splitlines()[-1] == f"{2 * len(tasks)} passed, {5 * len(tasks)} failed"


def test_check_plugin_of_a_task_checks_the_task_and_the_builtins_on_it(docs_plugins, capsys):
    assert main(["check-plugin", "tiny_mlp", "--plugin-dir", str(docs_plugins)]) == 0
    out = capsys.readouterr().out
    assert "task tiny_mlp:" in out
    assert re.search(r"^ours: export\s+PASS", out, re.M)
    assert re.fullmatch(r"\d+ passed, 0 failed", out.rstrip().splitlines()[-1])


def test_check_plugin_of_a_name_that_is_both_a_method_and_a_task_checks_both(tmp_path, capsys):
    (tmp_path / "twin.py").write_text(
        "from rankbench.plugins.method import Method\n"
        "from rankbench.tasks.lenet5 import LeNet5Task\n"
        "class TwinMethod(Method):\n"
        "    name = 'twin'\n"
        "    description = 'a method named like a task'\n"
        "class TwinTask(LeNet5Task):\n"
        "    name = 'twin'\n"
        "    description = 'a task named like a method'\n"
    )
    assert main(["check-plugin", "twin", "--task", "lenet5", "--plugin-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "method twin on task lenet5:" in out and "task twin:" in out
    assert "method twin on task mlp2" not in out  # --task chose the task the method is checked on


def test_a_task_without_offline_data_is_checked_on_random_stand_in_inputs(tmp_path, monkeypatch) -> None:
    """CIFAR-10 has no offline copy: the contract runs on random inputs and says so."""
    from rankbench import contract

    monkeypatch.setenv("RANKBENCH_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(contract, "_DATA_CACHE", {})
    checks = contract.check_method(Registry.discover(), "ours", "resnet32")
    assert all(c.passed for c in checks), [(c.name, c.detail) for c in checks if not c.passed]
    data = next(c for c in checks if c.name == "data")
    assert data.detail.startswith("random stand-in data (warning: CIFAR-10 not found under")
    assert "--download" in data.detail
