"""The documentation keeps its promises (docs/contributing.md, "Runnable examples").

* The README keeps the two set-up lines character for character, and ``.ci/run`` ends with its
  test line; the README stays at most 200 lines and its links resolve.
* Nothing is listed by hand that the code does not say: the README's and the Methods page's
  method tables name every registered method with its own description, the task tables every
  task; ``docs/cli.md`` is what ``tools/cli_reference.py`` generates from the parsers; every name
  in ``rankbench.plugin.__all__`` is rendered by the API reference and has a Google-style
  docstring.
* Examples run: every ``python`` block in ``docs/`` carries a ``<!-- docs-test: ... -->`` marker;
  ``run`` blocks are executed, ``file`` blocks written for the page's later blocks, and every line
  of a ``shell`` block runs through ``rankbench.cli.main`` on tiny settings. The README's 20-line
  plugin passes the contract suite.
* ``mkdocs build --strict`` succeeds (skipped only where mkdocs is not installed) and the site has
  every API anchor and every figure of ``benchmarks/results/``.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import make_tiny_mnist

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
MAIN_JOB = "pip install -c constraints.txt -e . && rankbench run --method ours --task lenet5"
TEST_LINE = "pip install -c constraints.txt -e '.[dev]' && python -m pytest -q"
TINY_RUN = ["--epochs", "1", "--set", "initial_rank=3", "--set", "val_size=40", "--no-progress"]

MARKER = re.compile(r"<!--\s*docs-test:\s*(run|file|shell|skip)\b\s*(.*?)\s*-->")
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")


# ---------------------------------------------------------------------------- the collector


@dataclass
class Block:
    """One fenced block of a Markdown page, with the ``docs-test`` marker on the line before it."""

    page: Path
    line: int
    lang: str
    text: str
    marker: str | None = None
    argument: str = ""

    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The page's top-level fenced blocks; a fence inside a longer fence is content, not a block."""
    lines = page.read_text(encoding="utf-8").splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, fence, lang = opening.groups()
        previous = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        marker = MARKER.fullmatch(previous)
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not re.match(rf"^\s*{re.escape(fence[0])}{{{len(fence)},}}\s*$", lines[j]):
            body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j])
            j += 1
        out.append(Block(page, i + 1, lang, "\n".join(body) + "\n",
                         marker.group(1) if marker else None, marker.group(2) if marker else ""))
        i = j + 1
    return out


def doc_pages() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.md"))


def marked_pages() -> list[Path]:
    return [p for p in doc_pages() if any(b.marker in ("run", "file", "shell") for b in blocks(p))]


def readme_blocks(lang: str) -> list[str]:
    return [b.text for b in blocks(README) if b.lang == lang]


# ---------------------------------------------------------------------------- the README


def test_the_readme_keeps_both_set_up_lines_and_ci_runs_its_test_line_last():
    bash = [b.strip() for b in readme_blocks("bash")]
    assert MAIN_JOB in bash
    assert TEST_LINE in bash
    ci = [line for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines() if line.strip()]
    assert ci[-1] == TEST_LINE
    build = [line for line in ci if "mkdocs build --strict" in line]
    assert len(build) == 1 and ci.index(build[0]) < len(ci) - 1
    assert build[0].startswith("pip install -c constraints.txt -e '.[dev]' && ")


def test_the_readme_is_at_most_200_lines_and_its_relative_links_resolve():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 200
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    missing = [t for t in targets if "://" not in t and not (ROOT / t).exists() and t != "docs/cluster.md"]
    assert missing == []


def _table(text: str, heading: str) -> dict[str, str]:
    """``| `name` | what |`` rows of the first table after ``heading``."""
    section = text[text.index(heading):]
    rows: dict[str, str] = {}
    for line in section.splitlines()[1:]:
        if line.startswith("#"):
            break
        if m := re.fullmatch(r"\| `([\w-]+)` \| (.*) \|", line):
            rows[m.group(1)] = m.group(2)
        elif rows and not line.startswith("|"):
            break
    return rows


@pytest.fixture(scope="module")
def builtins():
    from rankbench.plugins.registry import Registry

    return Registry.discover(entry_point_groups=False)


@pytest.mark.parametrize("page, heading", [(README, "## Built-in methods"), (DOCS / "methods" / "index.md",
                                                                               "## Built-in methods")])
def test_the_method_tables_name_every_registered_method_with_its_description(builtins, page, heading):
    rows = _table(page.read_text(encoding="utf-8"), heading)
    expected = {name: cls.description for name, cls in builtins.methods.items()}
    hint = "\n".join(f"| `{n}` | {d} |" for n, d in sorted(expected.items()))
    assert rows == expected, f"{page.relative_to(ROOT)}: the table should read\n{hint}"


def test_the_task_tables_name_every_registered_task(builtins):
    rows = _table(README.read_text(encoding="utf-8"), "## Built-in tasks")
    expected = {name: cls.description for name, cls in builtins.tasks.items()}
    hint = "\n".join(f"| `{n}` | {d} |" for n, d in sorted(expected.items()))
    assert rows == expected, f"README.md: the table should read\n{hint}"
    assert set(_table((DOCS / "tasks.md").read_text(encoding="utf-8"), "## Built-in tasks")) == set(expected)


@pytest.mark.parametrize("board_file", sorted((ROOT / "benchmarks" / "results" / "leaderboard").glob("*/*.json")),
                         ids=lambda path: path.parent.name)
def test_the_readme_quotes_each_committed_leaderboard_as_it_is(board_file):
    from rankbench.report.board import Leaderboard
    from rankbench.report.leaderboard import headline_table

    readme = README.read_text(encoding="utf-8")
    for task in Leaderboard.read(board_file).boards:
        table = headline_table(task)
        assert f"**`{task.task}`**" in readme and table in readme, (
            f"README.md: the {task.task} leaderboard table should read (from {board_file.relative_to(ROOT)})\n{table}")


def test_the_readme_plugin_is_about_20_lines_and_passes_the_contract(tmp_path):
    from rankbench.plugin import Registry, check_method

    (block,) = readme_blocks("python")
    assert len(block.splitlines()) <= 22
    (tmp_path / "my_plugins").mkdir()
    (tmp_path / "my_plugins" / "ones.py").write_text(block, encoding="utf-8")
    registry = Registry.discover(plugin_dirs=[tmp_path / "my_plugins"], entry_point_groups=False)
    failed = [c for c in check_method(registry, "ones", "mlp2") if not c.passed]
    assert not failed, failed


# ---------------------------------------------------------------------------- generated reference pages


def test_the_cli_reference_is_what_the_parsers_say():
    spec = importlib.util.spec_from_file_location("cli_reference", ROOT / "tools" / "cli_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (DOCS / "cli.md").read_text(encoding="utf-8") == module.render(), (
        "docs/cli.md is stale: run `python tools/cli_reference.py`")


def test_every_public_name_is_rendered_once_by_the_api_reference():
    import rankbench.plugin

    rendered = [name for page in (DOCS / "api").glob("*.md")
                for name in re.findall(r"^::: rankbench\.plugin\.(\w+)\s*$", page.read_text(encoding="utf-8"), re.M)]
    assert sorted(rendered) == sorted(rankbench.plugin.__all__)


def _sections(docstring: str) -> set[str]:
    return set(re.findall(r"^(Args|Returns|Yields|Raises|Attributes|Shape|Example):\s*$", docstring, re.M))


def test_every_public_name_has_a_google_style_docstring():
    """Summary line; ``Args:`` when it takes arguments (``Attributes:`` for a dataclass), ``Returns:``
    or ``Yields:`` when it returns something, ``Shape:`` for a layer; the same for every public method
    a class of ``__all__`` defines itself."""
    griffe = pytest.importorskip("griffe")
    module = griffe.load("rankbench.plugin", search_paths=[str(ROOT)], resolve_aliases=True,
                         resolve_external=False, docstring_parser="google")
    problems: list[str] = []
    # variadic parameters are forwarded: "Takes X's arguments"
    VARIADIC = (griffe.ParameterKind.var_positional, griffe.ParameterKind.var_keyword)

    def check_function(path: str, func) -> None:
        doc = func.docstring.value if func.docstring else ""
        if not doc.strip():
            problems.append(f"{path}: no docstring")
            return
        sections = _sections(doc)
        params = [p for p in func.parameters if p.name not in ("self", "cls") and p.kind not in VARIADIC]
        if params and "Args" not in sections:
            problems.append(f"{path}: no Args section")
        returns = str(func.returns) if func.returns is not None else "None"
        if returns not in ("None", "") and not sections & {"Returns", "Yields"} and "property" not in func.labels:
            problems.append(f"{path}: no Returns section")

    for name in module.exports:
        obj = module[name].final_target if module[name].is_alias else module[name]
        path = f"rankbench.plugin.{name}"
        doc = obj.docstring.value if obj.docstring else ""
        if not doc.strip():
            problems.append(f"{path}: no docstring")
            continue
        if obj.is_function:
            check_function(path, obj)
        elif obj.is_class:
            sections = _sections(doc)
            init = obj.members.get("__init__")
            init_doc = init.docstring.value if init is not None and init.docstring else ""
            takes = init is not None and [p for p in init.parameters if p.name != "self" and p.kind not in VARIADIC]
            if takes and not (sections | _sections(init_doc)) & {"Args", "Attributes"}:
                problems.append(f"{path}: no Args section for its constructor")
            if "dataclass" in obj.labels and not sections & {"Attributes", "Args"}:
                problems.append(f"{path}: no Attributes section")
            if re.fullmatch(r"Tensor(ized|Ring|Train)(Linear|Conv2d|Embedding)", name) and "Shape" not in sections:
                problems.append(f"{path}: no Shape section")
            for member_name, member in obj.members.items():
                if member_name.startswith("_") or member.is_alias or not member.is_function:
                    continue
                check_function(f"{path}.{member_name}", member)
    assert problems == [], "\n".join(problems)


# ---------------------------------------------------------------------------- runnable examples


def test_every_python_block_in_the_docs_is_marked():
    unmarked = [b.where() for page in doc_pages() for b in blocks(page) if b.lang == "python" and b.marker is None]
    assert unmarked == [], "mark each with <!-- docs-test: run|file PATH|skip REASON --> (docs/contributing.md)"
    skipped = [b.where() for page in doc_pages() for b in blocks(page) if b.marker == "skip" and not b.argument]
    assert skipped == [], "a skipped block says why"


def test_the_plugin_tutorial_method_and_task_are_runnable_blocks():
    marked = {b.argument: b for b in blocks(DOCS / "plugins.md") if b.marker == "file"}
    assert "class SigmoidL1(Method)" in marked["my_plugins/sigmoid_gate.py"].text
    assert "class TinyMLP(Task)" in marked["my_plugins/tiny_mlp.py"].text
    (check,) = [b for b in blocks(DOCS / "plugins.md") if b.marker == "run"]
    assert 'check_method(registry, "sigmoid_l1"' in check.text and 'check_task(registry, "tiny_mlp")' in check.text


class Shell:
    """Runs the lines of a ``shell`` block: ``rankbench ...`` through ``rankbench.cli.main`` on tiny
    settings, ``pip install ...`` / ``python -m pytest -q`` lines only if they are the README's
    set-up lines (which ``.ci/run`` runs)."""

    def __init__(self, folder: Path, uri: str) -> None:
        self.data = make_tiny_mnist(folder / "data")
        self.uri = uri

    def newest_run(self) -> str:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self.uri)
        ids = [e.experiment_id for e in client.search_experiments()]
        (run,) = client.search_runs(ids, "attributes.status = 'FINISHED'", order_by=["attributes.start_time DESC"],
                                    max_results=1)
        return run.info.run_id

    def argv(self, words: list[str]) -> list[str]:
        command, rest = words[0], words[1:]
        rest = [self.newest_run() if w == "RUN_ID" else w for w in rest]
        if command == "run":
            return [command, *rest, *TINY_RUN, "--data-dir", str(self.data), "--tracking-uri", self.uri]
        if command in ("report", "export", "leaderboard"):
            return [command, *rest, "--tracking-uri", self.uri]
        return [command, *rest]

    def line(self, where: str, line: str) -> None:
        from rankbench.cli import main

        code = line.split("  #")[0].split(" # ")[0].strip()
        if not code or code.startswith("#"):
            return
        if code.startswith("pip install") or code.startswith("python -m pytest"):
            assert code in (MAIN_JOB, TEST_LINE), f"{where}: {code!r} is not one of the README's set-up lines"
            if code == TEST_LINE:
                return  # .ci/run runs it; the suite does not run itself
            code = code.split(" && ", 1)[1]
        for part in code.split(" && "):
            words = shlex.split(part)
            assert words[0] == "rankbench", f"{where}: the docs' tests run only rankbench commands: {part!r}"
            assert main(self.argv(words[1:])) == 0, f"{where}: {part!r} failed"


@pytest.mark.parametrize("page", marked_pages(), ids=lambda p: str(p.relative_to(DOCS)))
def test_the_marked_examples_of_a_page_run(page, tmp_path, monkeypatch, capsys, request):
    """The page's blocks in order, in one temporary folder (a fresh store there for shell lines), one
    namespace."""
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "docs_example"}
    shell: Shell | None = None
    for block in blocks(page):
        if block.marker == "file":
            target = tmp_path / block.argument
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(block.text, encoding="utf-8")
        elif block.marker == "run":
            assert block.lang == "python", block.where()
            exec(compile(block.text, block.where(), "exec"), namespace)
        elif block.marker == "shell":
            shell = shell or Shell(tmp_path, request.getfixturevalue("uri"))
            for offset, line in enumerate(block.text.splitlines(), start=1):
                shell.line(f"{block.where()}+{offset}", line)
    capsys.readouterr()


# ---------------------------------------------------------------------------- the site


def test_every_figure_and_output_of_the_benchmarks_is_on_a_page():
    results = ROOT / "benchmarks" / "results"
    shown = (DOCS / "results.md").read_text(encoding="utf-8") + (DOCS / "performance.md").read_text(encoding="utf-8")
    linked = set(re.findall(r"assets/results/([^)\s]+)", shown))
    files = {p.relative_to(results).as_posix() for p in results.rglob("*") if p.suffix in (".png", ".txt")}
    assert files - linked == set()


def test_the_results_page_keeps_a_matched_compression_leaderboard_section():
    text = (DOCS / "results.md").read_text(encoding="utf-8")
    assert "## Matched-compression leaderboard" in text
    assert "rankbench leaderboard --study leaderboard_mlp2" in text


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None, reason="mkdocs is not installed (the dev extra has it)")
def test_mkdocs_build_strict_succeeds(tmp_path):
    import rankbench.plugin

    site = tmp_path / "site"
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                            cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    html = "".join(p.read_text(encoding="utf-8") for p in (site / "api").rglob("index.html"))
    anchors = set(re.findall(r'id="rankbench\.plugin\.(\w+)"', html))
    assert set(rankbench.plugin.__all__) - anchors == set()
    assert (site / "assets" / "results" / "fmnist_tradeoff_cpu" / "tradeoff_lenet5.png").is_file()
    assert (site / "cluster" / "index.html").is_file()
    assert (site / "cli" / "index.html").is_file()
