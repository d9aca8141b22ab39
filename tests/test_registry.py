"""Plugin discovery: built-ins, entry points and ``--plugin-dir`` folders."""

from __future__ import annotations

import types
from pathlib import Path
from typing import ClassVar

import pytest

import rankbench.plugins.registry as registry_module
from rankbench.errors import RankbenchError
from rankbench.plugins.hyper import Hyper
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
    with pytest.raises(RankbenchError, match=r"unknown method 'nope': choose one of dense, mars, ours, reinforce_l0, trn"):
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


def test_entry_point_that_fails_to_load_is_a_user_error(monkeypatch):
    broken = FakeEntryPoint("broken", "thirdparty.broken:Gone", error=ImportError("No module named 'thirdparty'"))
    fake_entry_points(monkeypatch, {METHOD_GROUP: [broken]})
    with pytest.raises(RankbenchError, match=r"entry point 'broken'.*thirdparty\.broken:Gone.*fix or uninstall"):
        Registry.discover()


def test_entry_point_that_is_not_a_plugin_is_a_user_error(monkeypatch):
    fake_entry_points(monkeypatch, {METHOD_GROUP: [FakeEntryPoint("junk", "thirdparty:junk", 42)]})
    with pytest.raises(RankbenchError, match=r"thirdparty:junk is neither a Method/Task subclass"):
        Registry.discover()


def test_entry_point_clashing_with_a_built_in_is_a_user_error(monkeypatch):
    class Impostor(Method):
        name: ClassVar[str] = "ours"

    fake_entry_points(monkeypatch, {METHOD_GROUP: [FakeEntryPoint("ours", "thirdparty:Impostor", Impostor)]})
    with pytest.raises(RankbenchError, match=r"two methods named 'ours'.*built-in rankbench\.methods\.ours"
                                             r".*entry point thirdparty:Impostor"):
        Registry.discover()


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
    with pytest.raises(RankbenchError, match=r"boom\.py fails to import \(ValueError: boom at import\)"):
        Registry.discover(plugin_dirs=[tmp_path], entry_point_groups=False)
