"""Does ours' gap to the uniform-rank TRN curve on the full Fashion-MNIST shrink with training length?
(issue 23, item 6)

Reads two studies of LeNet-5 on the full Fashion-MNIST with the same data and weight recipe:
studies/fmnist_tradeoff_cpu.toml (4,000 steps per run; its committed table,
benchmarks/results/fmnist_tradeoff_cpu/report.md, keeps mean±std per row) and
studies/fmnist_length_cpu.toml (16,000 steps; read from its MLflow store, or from its table). For
every ours row it reads the TRN curve at ours' own compression (linear in log10 compression between
the two TRN ranks around it, ``rankbench.report.curves.gap_to_curve``) and prints the gap with
Welch's p from the summaries, at each length::

    python benchmarks/fmnist_length.py --long-uri sqlite:////work/stores/fmnist_length/mlflow.db
    python benchmarks/fmnist_length.py --long benchmarks/results/fmnist_length_cpu/report.md

A row whose compression lies outside the TRN curve is reported as such, not extrapolated.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rankbench.report.curves import Summary, gap_to_curve  # noqa: E402

SHORT = REPO / "benchmarks" / "results" / "fmnist_tradeoff_cpu" / "report.md"
ROW = re.compile(r"^\|\s*(\w+)\s*\|\s*([^|]*?)\s*\|\s*(\d+)\s*\|\s*([\d.]+)±([\d.]+)\s*\|\s*([\d.]+)±([\d.]+)x\s*\|")


def rows_from_table(path: Path) -> dict[str, list[tuple[str, Summary]]]:
    """method -> (settings, Summary) from a `rankbench report --format github` table."""
    out: dict[str, list[tuple[str, Summary]]] = {}
    for line in Path(path).read_text().splitlines():
        m = ROW.match(line)
        if m:
            method, settings, n, acc, sd, comp, _ = m.groups()
            out.setdefault(method, []).append((settings, Summary(float(comp), float(acc), float(sd), int(n))))
    if not out:
        raise SystemExit(f"no report rows in {path}: give a `rankbench report --format github` table")
    return out


def rows_from_store(uri: str) -> dict[str, list[tuple[str, Summary]]]:
    """method -> (settings, Summary) from the finished runs of a store (`rankbench report`'s rows)."""
    from rankbench.report.build import build_report

    out: dict[str, list[tuple[str, Summary]]] = {}
    for r in build_report(uri):
        acc, comp = r.values("test_accuracy"), r.values("compression")
        if not acc:
            continue
        sd = statistics.stdev(acc) if len(acc) > 1 else 0.0
        label = r.label.split("(", 1)[-1].rstrip(")") if "(" in r.label else r.label
        out.setdefault(r.method, []).append((label, Summary(statistics.mean(comp), statistics.mean(acc), sd, len(acc))))
    return out


def answer(name: str, rows: dict[str, list[tuple[str, Summary]]]) -> list[str]:
    curve = [s for _, s in rows.get("trn", [])]
    lines = []
    for settings, point in sorted(rows.get("ours", []), key=lambda r: r[1].compression):
        head = (f"{name:>13} | ours {settings:<24} | {point.mean:6.2f}±{point.std:.2f} % "
                f"at {point.compression:6.2f}x (n={point.n})")
        try:
            gap = gap_to_curve(point, curve)
        except ValueError as exc:
            lines.append(f"{head} | {exc}")
            continue
        low, high = gap.between
        lines.append(f"{head} | TRN curve {gap.curve_mean:6.2f}±{gap.curve_std:.2f} % (between {low:.2f}x and "
                     f"{high:.2f}x) | gap {gap.difference:+.2f} points | p (Welch) {gap.p_welch:.3g}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--short", type=Path, default=SHORT, help="the 4,000-step study's report table")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--long", type=Path, help="the 16,000-step study's report table")
    source.add_argument("--long-uri", help="the 16,000-step study's MLflow tracking URI")
    args = parser.parse_args(argv)
    long_rows = rows_from_table(args.long) if args.long else rows_from_store(args.long_uri)
    print("LeNet-5, full Fashion-MNIST: ours against the uniform-rank TRN curve read at ours' compression "
          "(linear in log10 compression), test accuracy mean±std over seeds")
    for line in answer("4,000 steps", rows_from_table(args.short)) + answer("16,000 steps", long_rows):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
