"""An external package that declares a method by entry point is installed and usable by name.

The package ``rankbench-extra-example`` is written into ``tmp_path``, installed
with pip into ``tmp_path/site`` (no network: ``--no-deps --no-build-isolation``)
and used from subprocesses that only add that folder to ``PYTHONPATH``;
rankbench itself comes from the environment.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "rankbench-extra-example"
version = "0.1.0"
description = "An example third-party rankbench method"
requires-python = ">=3.10"

[tool.setuptools]
py-modules = ["rb_extra_example"]

[project.entry-points."rankbench.methods"]
halfgate = "rb_extra_example:HalfGate"
"""

MODULE = '''\
"""A rankbench method plugin shipped as a package: every rank slice scaled by one half."""

import torch

from rankbench.plugins.method import Method
from rankbench.layers.tensorized import RankSelector


class Half(RankSelector):
    def deterministic(self):
        return 0.5 * torch.ones(self.size)


class HalfGate(Method):
    name = "halfgate"
    description = "external example: every slice multiplied by 0.5"

    def selector(self, bond):
        return Half(bond.size)
'''


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The package, pip-installed into a folder of its own; returns the working folder."""
    root = tmp_path_factory.mktemp("extra")
    package = root / "rankbench-extra-example"
    package.mkdir()
    (package / "pyproject.toml").write_text(PYPROJECT)
    (package / "rb_extra_example.py").write_text(MODULE)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q",
         "--target", str(root / "site"), str(package)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert list((root / "site").glob("rankbench_extra_example-0.1.0.dist-info/entry_points.txt"))
    return root


def rankbench(root: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(root / "site")
    env["RANKBENCH_DATA_DIR"] = str(root / "no-data")  # the embedded 5k digits, offline
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", "rankbench.cli", *args], cwd=root, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_installed_entry_point_method_is_listed(installed):
    proc = rankbench(installed, "list")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert any(line.split()[:1] == ["halfgate"] and "every slice multiplied by 0.5" in line for line in lines), \
        proc.stdout


def test_installed_entry_point_method_runs_by_name(installed):
    db = installed / "m.db"
    proc = rankbench(installed, "run", "--method", "halfgate", "--task", "mlp2", "--epochs", "1",
                     "--set", "initial_rank=3", "--tracking-uri", f"sqlite:///{db}", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "method halfgate" in out
    assert "data: mnist-embedded-5k" in out
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("method") and "test acc %" in line)
    row = lines[header + 2]  # after the header's rule: the run's row
    assert row.split()[:2] == ["halfgate", "0"], out
    assert lines[header + 3].startswith("tracking: sqlite:///"), out
    assert db.exists()


def test_installed_entry_point_method_passes_check_plugin(installed):
    proc = rankbench(installed, "check-plugin", "halfgate", "--task", "mlp2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "method halfgate on task mlp2" in proc.stdout
    assert proc.stdout.rstrip().splitlines()[-1] == "7 passed, 0 failed"
