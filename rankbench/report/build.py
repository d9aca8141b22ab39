"""``rankbench report``: read finished runs from MLflow, group seeds into rows,
compare rows with a baseline, render paper-ready tables.

A row is one (task, dataset, method, settings) configuration; its seeds are
the runs that share it. Rows never mix datasets or splits: the dataset name,
its sizes and the split seed are part of every row's key.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
import tomllib
import warnings
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Iterable, Sequence

from rankbench.errors import RankbenchError
from rankbench.plugins.registry import Registry
from rankbench.run import records

# Params that differ between seeds of one configuration, or only describe the run.
RUN_ONLY_PARAMS = {
    records.SEED, records.GIT_COMMIT, records.THREADS, records.DEVICE, records.COMPILE, records.RANKBENCH_VERSION,
    records.TORCH_VERSION, records.DATASET_SOURCE, records.DATASET_DIGEST, records.INITIAL_RANKS,
    records.INITIAL_PARAMETERS, records.DENSE_PARAMETERS, records.VAL_SIZE_USED,
}
DATA_KEY = (records.DATASET, records.TRAIN_SIZE, records.VAL_SIZE_USED, records.TEST_SIZE, "split_seed")
SMALL_SAMPLE = 5


@dataclass
class RunRecord:
    run_id: str
    experiment_id: str
    task: str
    method: str
    dataset: str
    seed: int
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]

    @property
    def study(self) -> str | None:
        return self.tags.get("study")


@dataclass
class Row:
    """One configuration, its seeds and their statistics."""

    task: str
    dataset: str
    method: str
    settings: dict[str, str]
    runs: list[RunRecord]
    source: str = "measured"
    role: str = "selector"
    published: dict[str, Any] = field(default_factory=dict)
    full_settings: dict[str, str] = field(default_factory=dict)
    baseline: "Row | None" = None
    delta: float | None = None
    p_welch: float | None = None
    p_mwu: float | None = None
    shown: tuple[str, ...] = ()
    """The task's own final metrics (``Task.metrics``: BLEU, tensorized compression), shown as columns."""

    def values(self, metric: str) -> list[float]:
        """``metric`` of every seed (read under its legacy name in older stores, see ``records.metric``)."""
        values = (records.metric(r.metrics, records.METRICS.get(metric, metric)) for r in self.runs)
        return [v for v in values if v is not None and math.isfinite(v)]

    @property
    def n(self) -> int:
        return len(self.runs) if self.runs else int(self.published.get("n", 1))

    @property
    def label(self) -> str:
        text = ", ".join(f"{k}={v}" for k, v in self.settings.items())
        return f"{self.method} ({text})" if text else self.method


def load_runs(tracking_uri: str | None = None, *, task: str | None = None, method: str | None = None,
              study: str | None = None) -> list[RunRecord]:
    """Every FINISHED rankbench run (not study parents) in the store, filtered."""
    from rankbench.run.tracking import Tracker

    runs = Tracker(tracking_uri, create=False).runs(task=task, method=method, study=study)
    out = []
    for run in runs:
        tags, params = run.data.tags, run.data.params
        if tags.get("rankbench.role") == "study" or "method" not in tags or "test_accuracy" not in run.data.metrics:
            continue
        out.append(RunRecord(run.info.run_id, run.info.experiment_id, tags.get("task", params.get("task", "")),
                             tags["method"], tags.get("dataset", params.get("dataset", "")),
                             int(params.get("seed", 0)), dict(params), dict(run.data.metrics), dict(tags)))
    return sorted(out, key=lambda r: (r.task, r.dataset, r.method, r.seed, r.run_id))


@dataclass(frozen=True)
class MethodDeclarations:
    """What reports and figures need from the method plugins, read from a registry:
    each method's ``role`` and its ``label`` hyperparameters (in declared order)."""

    roles: dict[str, str] = field(default_factory=dict)
    labels: dict[str, tuple[str, ...]] = field(default_factory=dict)
    task_metrics: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Each task's own final metrics (``Task.metrics``), which its tables show as columns."""

    @classmethod
    def of(cls, registry: Registry | None = None) -> "MethodDeclarations":
        registry = registry or Registry.discover()
        return cls({name: m.role for name, m in registry.methods.items()},
                   {name: tuple(k for k, h in m.hyperparameters.items() if h.label)
                    for name, m in registry.methods.items()},
                   {name: tuple(str(m) for m in t.metrics) for name, t in registry.tasks.items()})

    def role(self, method: str) -> str:
        return self.roles.get(method, "selector")


def died_runs(tracking_uri: str | None) -> list[str]:
    """Runs whose process died while RUNNING, now marked FAILED: one line each, with the resume command."""
    from rankbench.run.tracking import Tracker

    def how(run) -> str:
        study = run.data.tags.get("study")
        if study:
            return f"run its study file again (study {study}) to continue it from its last checkpoint"
        return "continue it with its own command line and --resume " + run.info.run_id

    return [f"rankbench: run {r.info.run_id} ({r.data.tags.get('task', '?')}, {r.data.tags.get('method', '?')}, "
            f"seed {r.data.params.get('seed', '?')}) had died (process {r.data.tags.get('rankbench.pid')} is gone): "
            f"marked FAILED; {how(r)}"
            for r in Tracker(tracking_uri, create=False).mark_dead_runs()]


def group_rows(run_records: Iterable[RunRecord], group_by: Sequence[str] | None = None,
               declarations: MethodDeclarations | None = None) -> list[Row]:
    """Runs → rows. Default key: every param except per-run ones; ``group_by`` keeps only those
    (plus task, method and the data key, always). ``declarations`` (default: the installed
    plugins') say which settings label a row and each method's role."""
    declarations = declarations or MethodDeclarations.of()
    groups: dict[tuple, list[RunRecord]] = {}
    settings_of: dict[tuple, dict[str, str]] = {}
    for r in run_records:
        data = tuple((k, r.params.get(k, "")) for k in DATA_KEY)
        if group_by:
            settings = {k: r.params.get(k, "") for k in group_by if k in r.params}
        else:
            settings = {k: v for k, v in sorted(r.params.items())
                        if k not in RUN_ONLY_PARAMS and k not in DATA_KEY and k not in ("task", "method")}
        key = (r.task, r.method, data, tuple(sorted(settings.items())))
        groups.setdefault(key, []).append(r)
        settings_of[key] = settings
    rows = []
    for key, runs in groups.items():
        labels = declarations.labels.get(key[1], ())
        settings = _distinguishing(settings_of[key], key, settings_of, labels)
        data = dict(key[2])
        peers = [dict(k[2]) for k in groups if k[0] == key[0] and dict(k[2])["dataset"] == data["dataset"]]
        settings.update({k: v for k, v in data.items() if k != "dataset" and any(p[k] != v for p in peers)})
        rows.append(Row(key[0], runs[0].dataset, key[1], settings, sorted(runs, key=lambda r: r.seed),
                        role=declarations.role(key[1]), full_settings=settings_of[key]))
    return sorted(rows, key=lambda row: (row.task, row.dataset, row.method, tuple(row.settings.items())))


def _distinguishing(settings: dict[str, str], key: tuple, all_settings: dict[tuple, dict[str, str]],
                    labels: Sequence[str]) -> dict[str, str]:
    """The method's label hyperparameters (rank, λ, ...) and the settings that differ between rows
    of the same task and method (short labels)."""
    peers = [s for k, s in all_settings.items() if k[0] == key[0] and k[1] == key[1] and k[2] == key[2]]
    return {k: v for k, v in settings.items()
            if (k in labels and v != "none") or any(p.get(k) != v for p in peers)}


def compare(rows: list[Row], baseline: str) -> None:
    """Fill Δ test accuracy and p-values of each row against the baseline method's row
    (same task and dataset): Welch's t-test, and Mann-Whitney U when a sample is small."""
    from scipy import stats

    for row in rows:
        if row.source != "measured":
            continue
        candidates = [b for b in rows if b.source == "measured" and b.method == baseline
                      and b.task == row.task and _data_key(b) == _data_key(row)]
        if not candidates:
            continue
        base = max(candidates, key=lambda b: (_shared(row, b), -_compression_gap(row, b), len(b.runs)))
        row.baseline = base
        a, b = row.values("test_accuracy"), base.values("test_accuracy")
        row.delta = statistics.mean(a) - statistics.mean(b)
        if row is base or len(a) < 2 or len(b) < 2:
            continue
        with warnings.catch_warnings():  # a row without spread (a collapsed method): the p-value stands
            warnings.filterwarnings("ignore", "Precision loss occurred", RuntimeWarning)
            row.p_welch = float(stats.ttest_ind(a, b, equal_var=False).pvalue)
        if min(len(a), len(b)) < SMALL_SAMPLE:
            row.p_mwu = float(stats.mannwhitneyu(a, b, alternative="two-sided").pvalue)


def _data_key(row: Row) -> tuple:
    return tuple(row.runs[0].params.get(k, "") for k in DATA_KEY)


def _compression_gap(row: Row, base: Row) -> float:
    """|log(compression of row / compression of base)|: among baseline rows that share as many
    settings, the one at the nearest compression is compared (TRN's rank sweep vs a selector)."""
    a, b = row.values(records.COMPRESSION), base.values(records.COMPRESSION)
    if not a or not b:
        return 0.0
    return abs(math.log(statistics.mean(a) / statistics.mean(b)))


def _shared(row: Row, base: Row) -> int:
    """How many settings (the recipe: epochs, lr, ...) a row and a candidate baseline share."""
    keys = set(row.full_settings) & set(base.full_settings)
    return sum(row.full_settings[k] == base.full_settings[k] for k in keys)


def published_rows(tasks: Iterable[str]) -> list[Row]:
    """Numbers published by the papers (rankbench/report/published.toml), each with its source."""
    text = resources.files("rankbench.report").joinpath("published.toml").read_text()
    data = tomllib.loads(text)
    rows = []
    for entry in data["row"]:
        if entry["task"] in tasks:
            rows.append(Row(entry["task"], entry["dataset"], entry["method"], {}, [], source="published",
                            published=entry))
    return rows


def _fmt(values: list[float], digits: int) -> str:
    from rankbench.report.tables import mean_std

    return mean_std(values, digits) if values else ""


def _published_fmt(entry: dict, key: str, digits: int) -> str:
    if key not in entry:
        return ""
    std = entry.get(f"{key}_std")
    return f"{entry[key]:.{digits}f}" + (f"±{std:.{digits}f}" if std is not None else "")


HEADERS = ["method", "settings", "n", "test acc %", "compression", "total rank", "train s/batch", "infer s",
           "Δacc vs base", "p (Welch)", "p (MWU)", "source"]


def headers(shown: Sequence[str] = ()) -> list[str]:
    """The table's columns: ``HEADERS`` with a column per task-declared metric after compression."""
    from rankbench.report.tables import metric_header

    return [*HEADERS[:5], *(metric_header(_record(m)) for m in shown), *HEADERS[5:]]


def _record(name: str) -> records.Record:
    return records.METRICS.get(name) or records.Record(name, "final", "")


def _unit(name: str) -> str:
    return "x" if _record(name).unit == "x" else ""


def table_rows(rows: list[Row], shown: Sequence[str] = ()) -> list[list[str]]:
    out = []
    for row in rows:
        if row.source == "published":
            e = row.published
            extra = [_published_fmt(e, m, 2) + (_unit(m) if m in e else "") for m in shown]
            out.append([row.method, e.get("note", ""), str(e.get("n", "")), _published_fmt(e, "accuracy", 2),
                        _published_fmt(e, "compression", 2) + ("x" if "compression" in e else ""), *extra,
                        "", "", "", "", "", "", f"published ({e['dataset']}): {e['source']}"])
            continue
        n = len(row.runs)
        extra = [_fmt(row.values(m), 2) + (_unit(m) if row.values(m) else "") for m in shown]
        out.append([
            row.method, ", ".join(f"{k}={v}" for k, v in row.settings.items()),
            f"{n}" + ("*" if n == 1 else ""),
            _fmt(row.values(records.TEST_ACCURACY), 2), _fmt(row.values(records.COMPRESSION), 2) + "x", *extra,
            _fmt(row.values("total_rank"), 0) if any(row.values("total_rank")) else "-",
            _fmt(row.values("train_seconds_per_batch"), 4), _fmt(row.values("inference_seconds"), 3),
            "" if row.delta is None else f"{row.delta:+.2f}",
            "" if row.p_welch is None else f"{row.p_welch:.3g}",
            "" if row.p_mwu is None else f"{row.p_mwu:.3g}",
            "measured",
        ])
    return out


def render(rows: list[Row], tablefmt: str) -> str:
    """Tables per (task, dataset), in any tabulate format or csv, with footnotes."""
    from tabulate import tabulate, tabulate_formats

    if tablefmt != "csv" and tablefmt not in tabulate_formats:
        raise RankbenchError(f"--format {tablefmt}: choose csv or one of {', '.join(tabulate_formats)}")
    blocks = []
    keys = sorted({(r.task, r.dataset) for r in rows if r.source == "measured"})

    def group_of(task: str, dataset: str) -> list[Row]:
        return [r for r in rows if r.task == task and (r.dataset == dataset if r.source == "measured"
                                                       else dataset in r.published.get("datasets", [dataset]))]

    def shown_in(group: list[Row]) -> list[str]:
        return list(dict.fromkeys(m for r in group for m in r.shown))

    if tablefmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        shown = shown_in([r for task, dataset in keys for r in group_of(task, dataset)])
        writer.writerow(["task", "dataset", *headers(shown)])
        for task, dataset in keys:
            for line in table_rows(group_of(task, dataset), shown):
                writer.writerow([task, dataset, *line])
        return buf.getvalue().rstrip("\n")
    for task, dataset in keys:
        group = group_of(task, dataset)
        shown = shown_in(group)
        body = table_rows(group, shown)
        title = f"{task} on {dataset}"
        notes = []
        if any(len(r.runs) == 1 for r in group if r.source == "measured"):
            notes.append("* one seed: no standard deviation")
        if any(r.p_mwu is not None for r in group):
            notes.append(f"p (MWU): Mann-Whitney U, two-sided, shown when a row has fewer than {SMALL_SAMPLE} seeds")
        if any(r.p_welch is not None for r in group):
            notes.append("p (Welch): Welch's t-test on test accuracy against the baseline row; mean±std uses the "
                         "sample standard deviation")
        pairs = [f"{r.label} vs {r.baseline.label}" for r in group
                 if r.baseline is not None and r.baseline is not r and r.baseline.settings]
        if pairs:
            notes.append("Δacc and p compare each row with the baseline row at the nearest compression: "
                         + "; ".join(pairs))
        if any(r.source == "published" for r in group):
            notes.append("published rows come from the papers (rankbench/report/published.toml); their data and "
                         "compression definitions may differ from this run's")
        blocks.append("\n".join([title, tabulate(body, headers=headers(shown), tablefmt=tablefmt, disable_numparse=True),
                                 *notes]))
    return "\n\n".join(blocks)


def build_report(tracking_uri: str | None = None, *, task: str | None = None, method: str | None = None,
                 study: str | None = None, group_by: Sequence[str] | None = None, baseline: str | None = None,
                 with_published: bool = False, registry: Registry | None = None) -> list[Row]:
    found = load_runs(tracking_uri, task=task, method=method, study=study)
    if not found:
        where = ", ".join(f"{k}={v}" for k, v in (("task", task), ("method", method), ("study", study)) if v)
        raise RankbenchError(
            "no finished runs in the tracking store" + (f" matching {where}" if where else "")
            + ": run `rankbench run ...` first, or point --tracking-uri at your store"
        )
    rows = group_rows(found, group_by, MethodDeclarations.of(registry))
    if baseline:
        if not any(r.method == baseline for r in rows):
            raise RankbenchError(f"--baseline {baseline}: no finished runs of that method in the selection")
        compare(rows, baseline)
    if with_published:
        rows += published_rows({r.task for r in rows})
    declared = MethodDeclarations.of(registry).task_metrics
    for row in rows:
        row.shown = declared.get(row.task, ())
    return rows


def ranks_of(tracking_uri: str | None, run_id: str) -> dict[str, list[int]] | None:
    """The learned ranks artifact of a run."""
    from rankbench.run.tracking import Tracker

    tracker = Tracker(tracking_uri, create=False)
    try:
        path = tracker.download_artifact(run_id, "ranks.json")
    except RankbenchError:
        return None
    with open(path) as fh:
        return json.load(fh)
