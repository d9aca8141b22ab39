"""The op budget (benchmarks/ops.py): kernel-launching aten ops per training step (forward + loss +
backward) of every built-in method, as a multiple of the dense model's. A tensorized step on a GPU is
bound by kernel launches, and op counts are deterministic, so CI holds them where it cannot hold
timings. Counted at the budget's batch, 128: a layer's contraction, and how its plan lays operands
out, depend on the batch size."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from rankbench.plugins.registry import Registry

SPEC = importlib.util.spec_from_file_location("benchmark_ops",
                                              Path(__file__).resolve().parents[1] / "benchmarks" / "ops.py")
ops = importlib.util.module_from_spec(SPEC)
sys.modules[SPEC.name] = ops  # dataclasses look their module up there
SPEC.loader.exec_module(ops)
REGISTRY = Registry.discover(entry_point_groups=False)
BATCH = 128


def count(task: str, method: str):
    return ops.count_step(REGISTRY, task, method, BATCH)


@pytest.fixture(scope="module")
def dense_counts() -> dict[str, int]:
    return {task: count(task, "dense").step for task in ops.BUDGETS}


@pytest.mark.parametrize("task", list(ops.BUDGETS))
@pytest.mark.parametrize("method", sorted(m for m in REGISTRY.methods if REGISTRY.method(m).role != "reference"))
def test_every_methods_training_step_stays_within_its_op_budget(task, method, dense_counts):
    counted = count(task, method)
    limit = ops.budget(REGISTRY, task, method)
    per_sample = counted.step / counted.samples
    assert per_sample <= limit * dense_counts[task], (
        f"{method} on {task}: {per_sample:.0f} kernel ops per step (per sample), "
        f"{per_sample / dense_counts[task]:.2f}x dense's {dense_counts[task]}; the budget is {limit}x")



def test_the_counter_counts_kernels_and_leaves_out_views():
    x = torch.randn(4, 4)
    with ops.OpCounter() as counted:
        (x.view(2, 8).t() * 2).sum()
    assert counted.kernels == 2 and counted.all > counted.kernels
