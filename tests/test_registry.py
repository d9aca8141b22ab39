"""Plugin discovery: built-ins, entry points and ``--plugin-dir`` folders."""

from __future__ import annotations

import types
from pathlib import Path
from typing import ClassVar

import pytest

import rankbench.plugins.registry as registry_module
from rankbench.errors import RankbenchError
from rankbench.hyper import Hyper
from rankbench.plugins.method import Method
from rankbench.plugins.registry import METHOD_GROUP, TASK_GROUP, Registry
from rankbench.plugins.task import Task

PLUGINS = Path(__file__).parent / "plugins_example"


class EntryPointMethod(Method):
    name: ClassVar[str] = "ep_method"
    description: ClassVar[str] = "a method installed through an entry point"
    hyperparameters: ClassVar[dict[str, Hyper]] = {"alpha": Hyper(0.5, "a weight", minimum=0.0)}


class EntryPointTask(Task):
    name: ClassVar[str] = "ep_task"
    description: ClassVar[str] = "a task installed through an entry point"


class FakeEntryPoint:
    """What ``importlib.metadata.entry_points(group=...)`` yields: name, value, load()."""

    def __init__(self, name: str, value: str, obj: object = None, error: Exception | None = None) -> None:
        self.name, self.value, self._obj, self._error = name, value, obj, error
        self.loaded = 0

    def load(self) -> object:
        self.loaded += 1
        if self._error is not None:
            raise self._error
        return self._obj


def fake_entry_points(monkeypatch, by_group: dict[str, list[FakeEntryPoint]]) -> list[str]:
    """Replace the registry's ``entry_points``; return the list of groups it was asked for."""
    asked: list[str] = []

    def entry_points(*, group: str):
        asked.append(group)
        return list(by_group.get(group, []))

    monkeypatch.setattr(registry_module, "entry_points", entry_points)
    return asked


# ---------------------------------------------------------------------------- built-ins


def test_discover_finds_the_built_in_methods_and_tasks():
    registry = Registry.discover(entry_point_groups=False)
    assert {"dense", "trn", "ours", "reinforce_l0", "mars"} <= set(registry.methods)
    assert "lenet5" in registry.tasks
    for name, cls in registry.methods.items():
        assert issubclass(cls, Method) and cls.name == name
    for name, cls in registry.tasks.items():
        assert issubclass(cls, Task) and cls.name == name
    assert registry.methods["ours"].__module__ == "rankbench.methods.ours"
    assert registry.tasks["lenet5"].__module__ == "rankbench.tasks.lenet5"
    assert registry.origins["method:ours"] == "built-in rankbench.methods.ours"
    assert registry.origins["task:lenet5"] == "built-in rankbench.tasks.lenet5"
    # base classes and helper classes (GaussianGate, LeNet5) are not plugins
    assert "" not in registry.methods and "" not in registry.tasks


def test_lookup_of_an_unknown_name_lists_the_valid_ones():
    registry = Registry.discover(entry_point_groups=False)
    valid = ", ".join(sorted(registry.methods))
    with pytest.raises(RankbenchError, match=rf"unknown method 'nope': choose one of {valid}$"):
        registry.method("nope")
    with pytest.raises(RankbenchError, match=r"unknown task 'nope': choose one of .*lenet5"):
        registry.task("nope")
    assert registry.method("trn").name == "trn"
    assert registry.task("lenet5").name == "lenet5"


# ---------------------------------------------------------------------------- entry points


def test_entry_point_method_and_task_are_registered_under_their_names(monkeypatch):
    method_ep = FakeEntryPoint("ep_method", "thirdparty.methods:EntryPointMethod", EntryPointMethod)
    task_ep = FakeEntryPoint("ep_task", "thirdparty.tasks:EntryPointTask", EntryPointTask)
    asked = fake_entry_points(monkeypatch, {METHOD_GROUP: [method_ep], TASK_GROUP: [task_ep]})
    assert METHOD_GROUP == "rankbench.methods" and TASK_GROUP == "rankbench.tasks"

    registry = Registry.discover()
    assert set(asked) == {"rankbench.methods", "rankbench.tasks"}
    assert method_ep.loaded == 1 and task_ep.loaded == 1
    assert registry.method("ep_method") is EntryPointMethod
    assert registry.task("ep_task") is EntryPointTask
    assert registry.origins["method:ep_method"] == "entry point thirdparty.methods:EntryPointMethod"
    assert {"dense", "trn", "ours", "reinforce_l0", "mars"} <= set(registry.methods)  # built-ins are still there


def test_entry_point_returning_a_module_registers_its_plugins(monkeypatch):
    module = types.ModuleType("thirdparty_plugins")

    class ModuleMethod(Method):
        name: ClassVar[str] = "module_method"

    ModuleMethod.__module__ = module.__name__
    module.ModuleMethod = ModuleMethod
    module.Method = Method  # an imported base class is not a plugin of this module
    fake_entry_points(monkeypatch, {METHOD_GROUP: [FakeEntryPoint("m", "thirdparty_plugins", module)]})
    registry = Registry.discover()
    assert registry.method("module_method") is ModuleMethod


def test_entry_points_are_skipped_when_disabled(monkeypatch):
    asked = fake_entry_points(monkeypatch, {METHOD_GROUP: [FakeEntryPoint("x", "x:X", EntryPointMethod)]})
    registry = Registry.discover(entry_point_groups=False)
    assert asked == []
    assert "ep_method" not in registry.methods


def test_an_entry_point_that_fails_to_load_is_listed_broken_and_every_other_plugin_works(monkeypatch):
    broken = FakeEntryPoint("broken", "thirdparty.broken:Gone", error=ImportError("No module named 'thirdparty'"))
    fake_entry_points(monkeypatch, {METHOD_GROUP: [broken, FakeEntryPoint("x", "x:X", EntryPointMethod)]})
    registry = Registry.discover()
    assert "ep_method" in registry.methods and "ours" in registry.methods
    assert registry.broken["broken"] == ("entry point 'broken' (thirdparty.broken:Gone) in group rankbench.methods "
                                         "fails to load (ImportError: No module named 'thirdparty'): fix or "
                                         "uninstall that package")
    with pytest.raises(RankbenchError, match=r"method 'broken' is broken: entry point 'broken'.*fix or uninstall"):
        registry.method("broken")
    with pytest.raises(RankbenchError,
                       match=r"unknown method 'nope'.*\(1 plugin\(s\) are broken: see `rankbench list`\)"):
        registry.method("nope")


def test_an_entry_point_that_is_not_a_plugin_is_listed_broken(monkeypatch):
    fake_entry_points(monkeypatch, {METHOD_GROUP: [FakeEntryPoint("junk", "thirdparty:junk", 42)]})
    registry = Registry.discover()
    assert "thirdparty:junk is neither a Method/Task subclass" in registry.broken["junk"]
    assert "ours" in registry.methods


def test_an_entry_point_clashing_with_a_built_in_is_broken_and_the_built_in_stays(monkeypatch):
    class Impostor(Method):
        name: ClassVar[str] = "ours"

    fake_entry_points(monkeypatch, {METHOD_GROUP: [FakeEntryPoint("impostor", "thirdparty:Impostor", Impostor)]})
    registry = Registry.discover()
    assert registry.method("ours") is not Impostor
    assert registry.broken["impostor"].startswith("two methods named 'ours': built-in rankbench.methods.ours and "
                                                  "entry point thirdparty:Impostor")


# ---------------------------------------------------------------------------- plugin folders


def test_plugin_dir_registers_the_classes_defined_in_its_files():
    registry = Registry.discover(plugin_dirs=[PLUGINS], entry_point_groups=False)
    assert {"constant_gate", "nanmethod"} <= set(registry.methods)
    assert "badtask" in registry.tasks
    assert registry.origins["method:constant_gate"] == f"plugin file {PLUGINS / 'constant_gate.py'}"
    # badtask.py imports LeNet5Task: the import does not re-register (or clash with) the built-in
    assert registry.origins["task:lenet5"] == "built-in rankbench.tasks.lenet5"
    assert registry.task("badtask").__mro__[1] is registry.task("lenet5")
    # discovering twice gives the same classes (files are imported once)
    again = Registry.discover(plugin_dirs=[PLUGINS, PLUGINS], entry_point_groups=False)
    assert again.method("constant_gate") is registry.method("constant_gate")


def test_plugin_dir_problems_are_user_errors(tmp_path):
    with pytest.raises(RankbenchError, match="no such folder"):
        Registry.discover(plugin_dirs=[tmp_path / "absent"], entry_point_groups=False)
    (tmp_path / "boom.py").write_text("raise ValueError('boom at import')\n")
    registry = Registry.discover(plugin_dirs=[tmp_path], entry_point_groups=False)
    assert "boom.py fails to import (ValueError: boom at import)" in registry.broken["boom"]
    assert "ours" in registry.methods


OLD_PATHS = Path(__file__).parent / "plugins_v010"
SHIMS = ("rankbench.config", "rankbench.method", "rankbench.tensorized", "rankbench.task", "rankbench.registry")


def test_a_plugin_written_against_the_0_1_0_module_paths_loads_and_runs_with_a_deprecation_warning(
        monkeypatch, tmp_path, capsys):
    import sys

    from helpers import make_tiny_mnist
    from rankbench.cli import main

    for name in SHIMS:
        monkeypatch.delitem(sys.modules, name, raising=False)
    with pytest.warns(DeprecationWarning, match=r"rankbench\.config is deprecated since rankbench 0\.2\.0"):
        registry = Registry.discover(plugin_dirs=[OLD_PATHS], entry_point_groups=False)
    assert "old_paths" in registry.methods and not registry.broken
    monkeypatch.chdir(tmp_path)
    rc = main(["run", "--plugin-dir", str(OLD_PATHS), "--method", "old_paths", "--task", "mlp2", "--epochs", "1",
               "--set", "val_size=40", "--set", "initial_rank=3", "--no-progress", "--data-dir",
               str(make_tiny_mnist(tmp_path / "data")), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"])
    assert rc == 0, capsys.readouterr().err


@pytest.mark.parametrize("shim", SHIMS)
def test_every_0_1_0_module_path_warns_and_forwards(shim, monkeypatch):
    import importlib
    import sys

    monkeypatch.delitem(sys.modules, shim, raising=False)
    with pytest.warns(DeprecationWarning, match=f"{shim} is deprecated"):
        module = importlib.import_module(shim)
    for name in getattr(module, "__all__", ["TensorRingLinear", "prune_model", "learned_ranks"]):
        assert getattr(module, name) is not None


def test_a_broken_plugin_is_listed_with_its_reason_and_the_others_still_run(tmp_path, capsys):
    from rankbench.cli import main

    (tmp_path / "boom.py").write_text("from rankbench.nowhere import Thing\n")
    assert main(["list", "--plugin-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "broken (cannot be used; every other plugin works):" in out
    assert "boom           plugin file" in out and "ModuleNotFoundError: No module named 'rankbench.nowhere'" in out
    assert "  ours " in out
    assert main(["run", "--plugin-dir", str(tmp_path), "--method", "boom", "--task", "mlp2"]) == 2
    assert "method 'boom' is broken: plugin file" in capsys.readouterr().err
