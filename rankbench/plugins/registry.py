"""Find method and task plugins: built-ins, entry points and ``--plugin-dir`` folders.

Plugins are discovered, not registered: any ``Method`` or ``Task`` subclass with
a ``name`` defined in a scanned module is a plugin (benchopt-style).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import pkgutil
import sys
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType
from typing import Iterable, Sequence

from rankbench.errors import RankbenchError
from rankbench.plugins.method import Method
from rankbench.plugins.task import Task

METHOD_GROUP = "rankbench.methods"
TASK_GROUP = "rankbench.tasks"


@dataclass
class Registry:
    """Name → plugin class, for methods and tasks, with where each came from."""

    methods: dict[str, type[Method]] = field(default_factory=dict)
    tasks: dict[str, type[Task]] = field(default_factory=dict)
    origins: dict[str, str] = field(default_factory=dict)

    @classmethod
    def discover(cls, plugin_dirs: Sequence[Path] = (), entry_point_groups: bool = True) -> "Registry":
        registry = cls()
        for package in ("rankbench.methods", "rankbench.tasks"):
            for module in _package_modules(package):
                registry.add_module(module, origin=f"built-in {module.__name__}")
        if entry_point_groups:
            for group in (METHOD_GROUP, TASK_GROUP):
                for ep in entry_points(group=group):
                    try:
                        obj = ep.load()
                    except Exception as exc:
                        raise RankbenchError(
                            f"entry point {ep.name!r} ({ep.value}) in group {group} fails to load ({exc}): "
                            "fix or uninstall that package"
                        ) from None
                    registry.add_object(obj, origin=f"entry point {ep.value}")
        for directory in plugin_dirs:
            for module in _directory_modules(Path(directory)):
                registry.add_module(module, origin=f"plugin file {module.__file__}")
        return registry

    def add_object(self, obj: object, origin: str) -> None:
        if isinstance(obj, ModuleType):
            self.add_module(obj, origin)
        elif inspect.isclass(obj) and issubclass(obj, (Method, Task)) and obj.name:
            self.add(obj, origin)
        else:
            raise RankbenchError(f"{origin} is neither a Method/Task subclass with a name nor a module")

    def add_module(self, module: ModuleType, origin: str) -> None:
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if obj.__module__ == module.__name__ and issubclass(obj, (Method, Task)) and obj.name:
                self.add(obj, origin)

    def add(self, plugin: type[Method] | type[Task], origin: str) -> None:
        table: dict = self.methods if issubclass(plugin, Method) else self.tasks
        kind = "method" if table is self.methods else "task"
        key = f"{kind}:{plugin.name}"
        if plugin.name in table and table[plugin.name] is not plugin:
            raise RankbenchError(
                f"two {kind}s named {plugin.name!r}: {self.origins[key]} and {origin}: rename one"
            )
        table[plugin.name] = plugin
        self.origins[key] = origin

    def method(self, name: str) -> type[Method]:
        if name not in self.methods:
            raise RankbenchError(f"unknown method {name!r}: choose one of {', '.join(sorted(self.methods))}")
        return self.methods[name]

    def task(self, name: str) -> type[Task]:
        if name not in self.tasks:
            raise RankbenchError(f"unknown task {name!r}: choose one of {', '.join(sorted(self.tasks))}")
        return self.tasks[name]


def _package_modules(package_name: str) -> Iterable[ModuleType]:
    package = importlib.import_module(package_name)
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):
            yield importlib.import_module(f"{package_name}.{info.name}")


def _directory_modules(directory: Path) -> Iterable[ModuleType]:
    if not directory.is_dir():
        raise RankbenchError(f"--plugin-dir {directory}: no such folder")
    for path in sorted(directory.glob("*.py")):
        if path.name.startswith("_"):
            continue
        module_name = "rankbench_plugin_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10] + "_" + path.stem
        if module_name in sys.modules:
            yield sys.modules[module_name]
            continue
        spec = importlib.util.spec_from_file_location(module_name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[module_name]
            raise RankbenchError(f"plugin file {path} fails to import ({type(exc).__name__}: {exc}): fix it") from None
        yield module
