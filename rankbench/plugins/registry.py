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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType

from rankbench.errors import RankbenchError
from rankbench.plugins.defaults import check_declarations
from rankbench.plugins.method import Method
from rankbench.plugins.task import Task

METHOD_GROUP = "rankbench.methods"
TASK_GROUP = "rankbench.tasks"


@dataclass
class Registry:
    """Name → plugin class, for methods and tasks, with where each came from.

    Build one with ``Registry.discover()``, as every ``rankbench`` command does.

    Example:
        ``registry = Registry.discover(plugin_dirs=[Path("my_plugins")])``, then
        ``registry.method("sigmoid_l1")``.

    Attributes:
        methods: Method name → class.
        tasks: Task name → class.
        origins: ``"method:NAME"`` / ``"task:NAME"`` → where it came from (``built-in ...``,
            ``entry point ...``, ``plugin file ...``).
        broken: See below.
    """

    methods: dict[str, type[Method]] = field(default_factory=dict)
    tasks: dict[str, type[Task]] = field(default_factory=dict)
    origins: dict[str, str] = field(default_factory=dict)
    broken: dict[str, str] = field(default_factory=dict)
    """Name (an entry point's, a plugin file's stem, or the clashing plugin's) → why it cannot be used."""

    @classmethod
    def discover(cls, plugin_dirs: Sequence[Path] = (), entry_point_groups: bool = True) -> Registry:
        """Every plugin: the built-ins, the entry points, then the ``--plugin-dir`` folders.

        A plugin that fails to import, is not a plugin, takes a taken name or declares
        something wrong (``task_defaults`` naming an unknown task, recipe or key) is
        recorded in ``broken``; the others still work.

        Args:
            plugin_dirs: Folders whose ``*.py`` files (not starting with ``_``) are
                imported; every ``Method`` or ``Task`` subclass with a ``name`` defined
                in such a file is a plugin.
            entry_point_groups: Also load the ``rankbench.methods`` and
                ``rankbench.tasks`` entry points of installed packages.

        Returns:
            The registry.

        Raises:
            RankbenchError: A plugin folder that does not exist.
        """
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
        """Add a plugin class, or every plugin class defined in a module (an entry point's target).

        Args:
            obj: A ``Method``/``Task`` subclass with a ``name``, or a module.
            origin: Where it came from, for messages.

        Raises:
            RankbenchError: ``obj`` is neither, or a name is taken by another plugin.
        """
        if isinstance(obj, ModuleType):
            self.add_module(obj, origin)
        elif inspect.isclass(obj) and issubclass(obj, (Method, Task)) and obj.name:
            self.add(obj, origin)
        else:
            raise RankbenchError(f"{origin} is neither a Method/Task subclass with a name nor a module")

    def add_module(self, module: ModuleType, origin: str) -> None:
        """Add every ``Method``/``Task`` subclass with a ``name`` *defined in* ``module``.

        Imported classes are not re-registered, so a file may subclass a built-in.

        Args:
            module: The module to scan.
            origin: Where it came from, for messages.

        Raises:
            RankbenchError: A name is taken by another plugin of the same kind.
        """
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if obj.__module__ == module.__name__ and issubclass(obj, (Method, Task)) and obj.name:
                self.add(obj, origin)

    def add(self, plugin: type[Method] | type[Task], origin: str) -> None:
        """Add one plugin class under its ``name``.

        Args:
            plugin: A ``Method`` or ``Task`` subclass.
            origin: Where it came from, for messages.

        Raises:
            RankbenchError: Another plugin of the same kind has that name (both origins
                are named).
        """
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
        """The method class named ``name``.

        Args:
            name: What ``--method`` takes.

        Returns:
            The class.

        Raises:
            RankbenchError: The name is unknown (the message lists the known ones) or
                the plugin is broken (the message says why).
        """
        return self._lookup("method", self.methods, name)

    def task(self, name: str) -> type[Task]:
        """The task class named ``name``.

        Args:
            name: What ``--task`` takes.

        Returns:
            The class.

        Raises:
            RankbenchError: The name is unknown or the plugin is broken.
        """
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
        digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10]
        module_name = "rankbench_plugin_" + digest + "_" + path.stem
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
