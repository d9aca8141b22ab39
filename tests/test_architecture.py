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
from rankbench.cli import main
from rankbench.plugins.registry import Registry

from helpers import make_tiny_mnist

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
    (prepare: recipe_for and method_params_for), handed to one method per seed, read by its penalty."""
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
    task_cls = rankbench.plugins.task.Task
    for name in ("recipe_for", "method_params_for"):
        real = getattr(task_cls, name).__func__

        def counted(cls, *args, _real=real, _name=name, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _real(cls, *args, **kwargs)

        monkeypatch.setattr(task_cls, name, classmethod(counted))
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
    assert calls == {"make_config": 1, "prepare": 1, "recipe_for": 1, "method_params_for": 1}
    assert seen_lambdas and all(v == pytest.approx(0.37) for v in seen_lambdas)
    assert "lambda=0.37" in capsys.readouterr().out
