"""The shape the architecture promises (README "Architecture"): the core never names a built-in
plugin, plugin authors import one surface, and a ``--set`` value crosses each stage once."""

from __future__ import annotations

import io
import re
import tokenize
from pathlib import Path

import pytest

import rankbench.plugins.task
import rankbench.run.config
import rankbench.run.prepare
from helpers import make_tiny_mnist
from rankbench.cli import main
from rankbench.plugins.registry import Registry

ROOT = Path(__file__).resolve().parent.parent
CORE = sorted((ROOT / "rankbench").rglob("*.py"))


def string_literals(path: Path) -> list[tuple[int, str]]:
    tokens = tokenize.generate_tokens(io.StringIO(path.read_text(encoding="utf-8")).readline)
    return [(t.start[0], t.string) for t in tokens if t.type == tokenize.STRING]


def test_no_core_module_names_a_builtin_plugin():
    registry = Registry.discover(entry_point_groups=False)
    builtin = set(registry.methods) | set(registry.tasks)
    found = []
    for path in CORE:
        for line, literal in string_literals(path):
            text = literal.strip("\"'rbfRBF")
            if text in builtin:
                found.append(f"{path.relative_to(ROOT)}:{line}: {literal}")
    assert found == []


def test_the_builtin_plugins_and_the_docs_import_only_the_public_plugin_surface():
    sources = {p: p.read_text(encoding="utf-8") for p in [*(ROOT / "methods").glob("*.py"),
                                                          *(ROOT / "tasks").glob("*.py")]}
    blocks = re.findall(r"^```python\n(.*?)^```", (ROOT / "docs" / "plugins.md").read_text(encoding="utf-8"),
                        re.S | re.M)
    sources.update({Path(f"docs/plugins.md block {i}"): b for i, b in enumerate(blocks)})
    imports = re.compile(r"^\s*(?:from|import) (rankbench[\w.]*)", re.M)
    allowed = {"rankbench.plugin", "rankbench.tasks._digits"}
    offending = {str(p): m for p, text in sources.items() for m in imports.findall(text) if m not in allowed}
    assert offending == {}
    assert any("rankbench.plugin" in b for b in blocks)


def test_a_set_value_crosses_each_stage_once(tmp_path, monkeypatch, capsys):
    """``--set lambda=0.37``: parsed and validated once (make_config), resolved for the data once
    (prepare: resolve_defaults, adapt_to_data), handed to one method per seed, read by its penalty."""
    calls: dict[str, int] = {}
    seen_lambdas: list[float] = []

    def spy(owner, name):
        real = getattr(owner, name)

        def wrapper(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapper)

    spy(rankbench.run.config, "make_config")
    spy(rankbench.run.prepare, "prepare")
    spy(rankbench.run.config, "resolve_defaults")
    spy(rankbench.run.prepare, "resolve_defaults")
    task_cls = rankbench.plugins.task.Task
    real_adapt = task_cls.adapt_to_data.__func__

    def adapt(cls, *args, **kwargs):
        calls["adapt_to_data"] = calls.get("adapt_to_data", 0) + 1
        return real_adapt(cls, *args, **kwargs)

    monkeypatch.setattr(task_cls, "adapt_to_data", classmethod(adapt))
    ours = Registry.discover(entry_point_groups=False).method("ours")
    real_penalty = ours.penalty

    def penalty(self, model):
        seen_lambdas.append(self.params["lambda"])
        return real_penalty(self, model)

    monkeypatch.setattr(ours, "penalty", penalty)
    data = make_tiny_mnist(tmp_path)
    argv = ["run", "--method", "ours", "--task", "mlp2", "--set", "lambda=0.37", "--set", "val_size=40",
            "--set", "initial_rank=3", "--epochs", "1", "--seeds", "0,1", "--data-dir", str(data),
            "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--no-progress", "--device", "cpu"]
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 0, capsys.readouterr().err
    # resolved twice by one function: for the paper recipe in make_config, for the data's recipe in prepare
    assert calls == {"make_config": 1, "prepare": 1, "resolve_defaults": 2, "adapt_to_data": 1}
    assert seen_lambdas and all(v == pytest.approx(0.37) for v in seen_lambdas)
    assert "lambda=0.37" in capsys.readouterr().out


LAYERS: tuple[tuple[str, ...], ...] = (
    ("rankbench", "rankbench.errors", "rankbench.records", "rankbench.hyper"),
    ("rankbench.layers", "rankbench.data"),
    ("rankbench.plugins",),
    ("rankbench.run",),
    ("rankbench.study", "rankbench.report", "rankbench.export", "rankbench.contract"),
    ("rankbench.cli", "rankbench.plugin", "rankbench.config", "rankbench.method", "rankbench.task",
     "rankbench.tensorized", "rankbench.registry"),
)
"""The layers, lowest first: a module imports only from its own layer and the ones below it. The
package root holds only ``__version__``; the top layer is the command line, the public plugin
surface and the 0.1.0 aliases."""


def layer_of(module: str) -> int:
    matches = [(len(name), i) for i, names in enumerate(LAYERS) for name in names
               if module == name or (name != "rankbench" and module.startswith(name + "."))]
    assert matches, f"{module} is in no layer: add it to LAYERS"
    return max(matches)[1]


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """Every rankbench module a file imports (at module level or inside functions), by line."""
    import ast

    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                is_module = node.module.startswith("rankbench") and _is_module(child)
                found.append((node.lineno, child if is_module else node.module))
    return [(line, name) for line, name in found if name == "rankbench" or name.startswith("rankbench.")]


def _is_module(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # the parent is a module, not a package: ``name`` is an attribute
        return False


def test_imports_flow_one_way_through_the_layers():
    against = [f"{path.relative_to(ROOT)}:{line}: {module_name(path)} imports {target}"
               for path in CORE for line, target in imported_modules(path)
               if layer_of(target) > layer_of(module_name(path))]
    assert against == []


def test_the_layer_check_sees_an_upward_import(tmp_path):
    """The check above can fail: a data module importing the trainer is caught."""
    upward = tmp_path / "rankbench" / "data" / "_upward_probe.py"  # not in the source tree: other tests walk it
    upward.parent.mkdir(parents=True)
    upward.write_text("from rankbench.run.trainer import fit\nfrom rankbench import records\n")
    imports = imported_modules(upward)
    assert imports == [(1, "rankbench.run.trainer"), (2, "rankbench.records")]
    assert module_name(upward, tmp_path) == "rankbench.data._upward_probe"
    assert layer_of("rankbench.run.trainer") > layer_of(module_name(upward, tmp_path)) >= layer_of("rankbench.records")
