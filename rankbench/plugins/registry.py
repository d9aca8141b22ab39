"""Find method and task plugins: built-ins, entry points and ``--plugin-dir`` folders.

Plugins are discovered, not registered: any ``Method`` or ``Task`` subclass with
a ``name`` defined in a scanned module is a plugin (benchopt-style). A plugin that
fails to import, is not a plugin, or takes a name already taken is *broken*: it is
listed with its reason (``rankbench list``), using it is a one-line error, and every
other method and task still works, so one bad package cannot stop every command.
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
from rankbench.plugins.defaults import check_declarations
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
    broken: dict[str, str] = field(default_factory=dict)
    """Name (an entry point's, a plugin file's stem, or the clashing plugin's) → why it cannot be used."""

    @classmethod
    def discover(cls, plugin_dirs: Sequence[Path] = (), entry_point_groups: bool = True) -> "Registry":
        registry = cls()
        for package in ("rankbench.methods", "rankbench.tasks"):
            for module in _package_modules(package):
                registry.add_module(module, origin=f"built-in {module.__name__}")
        if entry_point_groups:
            for group in (METHOD_GROUP, TASK_GROUP):
                for ep in entry_points(group=group):
                    origin = f"entry point {ep.value}"
                    try:
                        obj = ep.load()
                    except Exception as exc:
                        registry.broken[ep.name] = (f"entry point {ep.name!r} ({ep.value}) in group {group} fails "
                                                    f"to load ({_one_line(exc)}): fix or uninstall that package")
                        continue
                    registry._isolated(ep.name, lambda: registry.add_object(obj, origin=origin))
        for directory in plugin_dirs:
            for path, module in _directory_modules(Path(directory)):
                if isinstance(module, str):
                    registry.broken[path.stem] = module
                    continue
                registry._isolated(path.stem, lambda: registry.add_module(module, origin=f"plugin file {path}"))
        for name, reason in check_declarations(registry.tasks, registry.methods).items():
            registry.methods.pop(name, None) if name in registry.methods else registry.tasks.pop(name, None)
            registry.broken[name] = reason
        return registry

    def _isolated(self, name: str, add) -> None:
        """Run ``add``; a plugin it refuses (not a plugin, a clashing name) is broken, not fatal."""
        try:
            add()
        except RankbenchError as exc:
            self.broken[name] = str(exc)

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

    def _lookup(self, kind: str, table: dict, name: str):
        if name in table:
            return table[name]
        if name in self.broken:
            raise RankbenchError(f"{kind} {name!r} is broken: {self.broken[name]}")
        also = f" ({len(self.broken)} plugin(s) are broken: see `rankbench list`)" if self.broken else ""
        raise RankbenchError(f"unknown {kind} {name!r}: choose one of {', '.join(sorted(table))}{also}")

    def method(self, name: str) -> type[Method]:
        return self._lookup("method", self.methods, name)

    def task(self, name: str) -> type[Task]:
        return self._lookup("task", self.tasks, name)


def _package_modules(package_name: str) -> Iterable[ModuleType]:
    package = importlib.import_module(package_name)
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        if not info.name.startswith("_"):
            yield importlib.import_module(f"{package_name}.{info.name}")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _directory_modules(directory: Path) -> Iterable[tuple[Path, ModuleType | str]]:
    """Each plugin file of a folder with its module, or with why it fails to import."""
    if not directory.is_dir():
        raise RankbenchError(f"--plugin-dir {directory}: no such folder")
    for path in sorted(directory.glob("*.py")):
        if path.name.startswith("_"):
            continue
        module_name = "rankbench_plugin_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10] + "_" + path.stem
        if module_name in sys.modules:
            yield path, sys.modules[module_name]
            continue
        spec = importlib.util.spec_from_file_location(module_name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[module_name]
            yield path, f"plugin file {path} fails to import ({_one_line(exc)}): fix it"
            continue
        yield path, module
