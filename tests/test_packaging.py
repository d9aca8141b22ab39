"""The built-in plugins work from an installed wheel, not only from a checkout; the code passes ruff."""

import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_ships_builtin_methods_and_tasks(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
         str(ROOT)],
        check=True, capture_output=True,
    )
    wheel = next(tmp_path.glob("rankbench-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for path in ("rankbench/methods/ours.py", "rankbench/methods/dense.py", "rankbench/methods/trn.py",
                 "rankbench/methods/mars.py", "rankbench/methods/reinforce_l0.py", "rankbench/tasks/lenet5.py",
                 "rankbench/tasks/mlp2.py", "rankbench/tasks/resnet.py", "rankbench/data/cifar.py",
                 "rankbench/layers/tensorized.py", "rankbench/plugin.py", "rankbench/report/published.toml"):
        assert path in names
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    code = ("import rankbench, sys; from rankbench.plugins.registry import Registry; r = Registry.discover(); "
            "print(rankbench.__file__); print(sorted(r.methods), sorted(r.tasks))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(target), "PATH": ""},
                         check=True, capture_output=True, text=True).stdout
    assert str(target) in out.splitlines()[0]
    shipped = sorted(p.stem for p in (ROOT / "methods").glob("*.py") if p.stem != "__init__")
    assert f"{shipped} ['iwslt14', 'lenet5', 'mlp2', 'resnet110', 'resnet32', 'sst']" in out  # every methods/ file


def test_the_code_passes_ruff():
    """``ruff check`` with pyproject.toml's ``[tool.ruff]`` (line 120; pycodestyle, pyflakes, import order,
    pyupgrade) finds nothing in the checkout; .ci/run runs the same check."""
    if importlib.util.find_spec("ruff") is None:
        pytest.skip("ruff is not installed: pip install -c constraints.txt -e '.[dev]' installs it")
    done = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--quiet", "--no-cache", "--output-format", "concise", "."],
        cwd=ROOT, capture_output=True, text=True,
    )
    findings = done.stdout.strip()
    if done.returncode != 0 or findings:
        pytest.fail(f"ruff check exited {done.returncode}; its findings:\n{findings}\n{done.stderr.strip()}",
                    pytrace=False)
