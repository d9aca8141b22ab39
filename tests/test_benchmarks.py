"""The benchmark scripts run from a checkout and print their tables and targets.

Tiny sizes, so only that they work is checked here; their numbers come from
running them at their defaults (README, benchmarks/results/). No timings are
asserted.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
TARGET_LINE = re.compile(r"^(gated|exported|compiled).*\s\d+\.\d\dx\s+(PASS|MISS)$", re.M)


def run_script(name: str, *args: str, cwd: Path) -> str:
    done = subprocess.run([sys.executable, str(BENCHMARKS / name), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_models_benchmark_prints_both_tasks_and_every_target(tmp_path):
    out = run_script("models.py", "--batch", "8", "--steps", "2", "--test-size", "16", cwd=tmp_path)
    for task, rank in (("lenet5", 25), ("resnet32", 15)):
        assert f"task {task}, batch 8, rank {rank}, test inputs 16" in out
        assert f"trn r{rank} " in out and f"ours r{rank} (gated)" in out
        assert f"target ({task})" in out
    for label in ("dense", "ours exported (pruned)", "ours exported, materialised"):
        assert out.count(f"\n{label} ") == 2
    assert len(TARGET_LINE.findall(out)) == 8  # four targets per task, each PASS or MISS


def test_models_benchmark_adds_compiled_rows_and_their_targets(tmp_path):
    """``--compile`` on a CPU with the aot_eager backend (inductor takes minutes per graph here)."""
    out = run_script("models.py", "--task", "lenet5", "--batch", "8", "--steps", "2", "--test-size", "16",
                     "--compile", "--compile-backend", "aot_eager", cwd=tmp_path)
    for label in ("dense compiled", "trn r25 compiled", "ours r25 (gated) compiled", "ours exported (pruned) compiled"):
        assert f"\n{label} " in out
    assert len(TARGET_LINE.findall(out)) == 7  # four eager targets and three compiled ones


def test_layers_benchmark_marks_the_automatic_choice(tmp_path):
    out = run_script("layers.py", "--batches", "2", "--min-time", "0.001", cwd=tmp_path)
    assert "ResNet-32 stage-3 conv TR r10" in out and "ResNet-32 stage-3 conv TR r15" in out
    assert "LeNet-5 FC1 TR r25" in out and "embedding 32768x512" in out
    assert "(auto)" in out


def test_harness_benchmark_prints_the_overhead_and_its_target(tmp_path):
    out = run_script("harness.py", "--task", "mlp2", "--epochs", "1", "--repeat", "1", cwd=tmp_path)
    assert "bare loop, 1 epochs" in out and "rankbench run (MLflow), 1 epochs" in out
    assert re.search(r"^target: tracking overhead <= 3% of a run's wall time: .*(PASS|MISS)", out, re.M)


def test_the_fashion_mnist_length_answer_reads_each_ours_row_on_the_trn_curve(tmp_path):
    short = BENCHMARKS / "results" / "fmnist_tradeoff_cpu" / "report.md"
    long = tmp_path / "long.md"  # a 16,000-step table: here the TRN rows alone, and one ours row beyond them
    rows = [line for line in short.read_text().splitlines() if line.startswith("| trn ")]
    long.write_text("\n".join([*rows, "| ours     | lambda=9.0, sigma=0.5  | 3   | 70.00±1.00   | 300.00±1.00x  |"]))
    out = run_script("fmnist_length.py", "--long", str(long), cwd=tmp_path)
    lines = out.splitlines()
    short_lines = [line for line in lines if line.lstrip().startswith("4,000 steps")]
    assert len(short_lines) == 3  # ours at lambda 0.15, 0.4, 1.0
    assert "87.38±0.57 % at   9.81x" in short_lines[1] and "between 6.62x and 11.72x" in short_lines[1]
    assert "gap -2.22 points" in short_lines[1] and "p (Welch) 0.0169" in short_lines[1]
    (beyond,) = [line for line in lines if line.lstrip().startswith("16,000 steps")]
    assert "outside the curve" in beyond  # not extrapolated
