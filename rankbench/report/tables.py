"""Tables a researcher can paste: per-seed rows and mean±std over seeds."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from tabulate import tabulate

from rankbench.run.experiment import RunResult
from rankbench.run.records import Record


def mean_std(values: Sequence[float], digits: int = 2) -> str:
    """``mean±std`` with the sample standard deviation; one value shows no std."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f}±{statistics.stdev(values):.{digits}f}"


def format_ranks(ranks: dict[str, list[int]], max_layers: int = 8) -> str:
    """Every layer's bond ranks, or for deep models (more than ``max_layers`` layers,
    e.g. ResNet-32's 32) a summary that fits a table cell; the run keeps ranks.json."""
    if not ranks:
        return "untensorized"
    if len(ranks) > max_layers:
        bonds = [b for r in ranks.values() for b in r]
        return (f"{len(ranks)} layers, bond ranks {min(bonds)}-{max(bonds)} "
                f"(mean {sum(bonds) / len(bonds):.1f}; all in ranks.json)")
    return "  ".join(f"{layer}:{'-'.join(map(str, r))}" for layer, r in ranks.items())


def metric_header(record: Record) -> str:
    """A column title for a task-declared metric: its name, with its unit."""
    return record.replace("_", " ") + (f" {record.unit}" if record.unit and record.unit != "x" else "")


def metric_cell(values: Sequence[float], record: Record) -> str:
    return mean_std(values) + ("x" if record.unit == "x" else "") if values else ""


def results_table(results: Sequence[RunResult], tablefmt: str = "simple", shown: Sequence[Record] = ()) -> str:
    """One row per seed, plus a mean±std row when there are several seeds; ``shown`` adds a column
    per task-declared final metric (a translation task's BLEU, a text task's tensorized compression)."""
    headers = ["method", "seed", "test acc %", "compression", *map(metric_header, shown), "params",
               "learned ranks per layer", "train s/batch", "infer s (test)", "run id"]

    def extra(group: Sequence[RunResult]) -> list[str]:
        return [metric_cell([r.final[m] for r in group if m in r.final], m) for m in shown]

    rows = [[r.method, r.seed, f"{r.test_accuracy:.2f}", f"{r.compression:.2f}x", *extra([r]), r.parameters,
             format_ranks(r.ranks), f"{r.train_seconds_per_batch:.4f}", f"{r.inference_seconds:.3f}", r.run_id]
            for r in results]
    if len(results) > 1:
        rows.append([
            results[0].method, f"mean±std (n={len(results)})",
            mean_std([r.test_accuracy for r in results]),
            mean_std([r.compression for r in results]) + "x", *extra(results),
            mean_std([r.parameters for r in results], 0), "",
            mean_std([r.train_seconds_per_batch for r in results], 4),
            mean_std([r.inference_seconds for r in results], 3), "",
        ])
    return tabulate(rows, headers=headers, tablefmt=tablefmt, disable_numparse=True)
