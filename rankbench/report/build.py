"""``rankbench report``: read finished runs from MLflow, group seeds into rows,
compare rows with a baseline, render paper-ready tables.

A row is one (task, dataset, method, settings) configuration; its seeds are
the runs that share it. Rows never mix datasets or splits: the dataset name,
its sizes and the split seed are part of every row's key. A seed counts once:
of several finished runs of one configuration and seed (a command repeated),
the newest is used and the others are reported as ignored duplicates.
"""

from __future__ import annotations

import csv
import difflib
import io
import json
import math
import socket
import statistics
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from rankbench.errors import RankbenchError
from rankbench.plugins.registry import Registry
from rankbench.run import records

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

# Params that differ between seeds of one configuration, or only describe the run.
RUN_ONLY_PARAMS = {
    records.SEED, records.GIT_COMMIT, records.THREADS, records.DEVICE, records.COMPILE, records.RANKBENCH_VERSION,
    records.TORCH_VERSION, records.DATASET_SOURCE, records.DATASET_DIGEST, records.INITIAL_RANKS,
    records.INITIAL_PARAMETERS, records.DENSE_PARAMETERS, records.VAL_SIZE_USED,
}
DATA_KEY = (records.DATA_NAME, records.TRAIN_SIZE, records.VAL_SIZE_USED, records.TEST_SIZE, "split_seed")
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
    start_time: int = 0
    end_time: int = 0
    """MLflow's start and end times (ms): the newest of duplicate runs is the one used."""

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
    baseline: Row | None = None
    delta: float | None = None
    p_welch: float | None = None
    p_mwu: float | None = None
    shown: tuple[str, ...] = ()
    """The task's own final metrics (``Task.metrics``: BLEU, tensorized compression), shown as columns."""
    duplicates: list[RunRecord] = field(default_factory=list)
    """Older finished runs of the same settings and seed as one of ``runs``: ignored, so that a
    repeated command does not count one seed several times (n and p-values stay honest)."""

    @property
    def ignored_duplicates(self) -> int:
        return len(self.duplicates)

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
        tags, params = run.data.tags, dict(run.data.params)
        if tags.get("rankbench.role") == "study" or "method" not in tags or "test_accuracy" not in run.data.metrics:
            continue
        if records.DATA_NAME not in params and records.LEGACY_DATA_NAME in params:  # a run before 0.2.0
            params[records.DATA_NAME] = params.pop(records.LEGACY_DATA_NAME)
        out.append(RunRecord(run.info.run_id, run.info.experiment_id, tags.get("task", params.get("task", "")),
                             tags["method"], tags.get("dataset", params.get(records.DATA_NAME, "")),
                             int(params.get("seed", 0)), dict(params), dict(run.data.metrics), dict(tags),
                             run.info.start_time or 0, run.info.end_time or 0))
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
    def of(cls, registry: Registry | None = None) -> MethodDeclarations:
        registry = registry or Registry.discover()
        return cls({name: m.role for name, m in registry.methods.items()},
                   {name: tuple(k for k, h in m.hyperparameters.items() if h.label)
                    for name, m in registry.methods.items()},
                   {name: tuple(str(m) for m in t.metrics) for name, t in registry.tasks.items()})

    def role(self, method: str) -> str:
        return self.roles.get(method, "selector")


def died_runs(tracking_uri: str | None) -> list[str]:
    """Runs whose process died while RUNNING, now marked FAILED: one line each, with why it was
    found dead and how to go on (``--resume`` only where a checkpoint of a finished epoch exists)."""
    from rankbench.run.tracking import HOST_TAG, Tracker

    tracker = Tracker(tracking_uri, create=False)

    def how(run) -> str:
        run_id, tags = run.info.run_id, run.data.tags
        study = tags.get("study")
        if study:
            return f"run its study file again (study {study}) to continue it from its last checkpoint"
        if tracker.checkpoint_path(run_id).is_file():
            return "continue it with its own command line and --resume " + run_id
        if records.VAL_ACCURACY not in run.data.metrics:
            return ("it finished no epoch, so there is nothing to resume: start it again with its own command line, "
                    "without --resume")
        if tags.get(HOST_TAG) and tags[HOST_TAG] != socket.gethostname():
            return (f"its checkpoint is on {tags[HOST_TAG]}: continue it there with its own command line and "
                    f"--resume {run_id}")
        return ("its checkpoint is gone, so it cannot be resumed: start it again with its own command line, "
                "without --resume")

    def why(run) -> str:
        return run.data.tags.get("failure_reason", "its process is gone")

    return [f"rankbench: run {r.info.run_id} ({r.data.tags.get('task', '?')}, {r.data.tags.get('method', '?')}, "
            f"seed {r.data.params.get('seed', '?')}) had died ({why(r)}): marked FAILED; {how(r)}"
            for r in tracker.mark_dead_runs()]


def group_rows(run_records: Iterable[RunRecord], group_by: Sequence[str] | None = None,
               declarations: MethodDeclarations | None = None) -> list[Row]:
    """Runs → rows. Default key: every param except per-run ones; ``group_by`` keeps only those
    (plus task, method and the data key, always). ``declarations`` (default: the installed
    plugins') say which settings label a row and each method's role."""
    declarations = declarations or MethodDeclarations.of()
    run_records, older = newest_per_seed(run_records)
    if group_by:
        check_group_by(group_by, run_records)
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
        peers = [dict(k[2]) for k in groups
                 if k[0] == key[0] and dict(k[2])[records.DATA_NAME] == data[records.DATA_NAME]]
        settings.update({k: v for k, v in data.items() if k != records.DATA_NAME and any(p[k] != v for p in peers)})
        rows.append(Row(key[0], runs[0].dataset, key[1], settings, sorted(runs, key=lambda r: r.seed),
                        role=declarations.role(key[1]), full_settings=settings_of[key],
                        duplicates=[d for r in runs for d in older.get(r.run_id, [])]))
    return sorted(rows, key=lambda row: (row.task, row.dataset, row.method, tuple(row.settings.items())))


def configuration(r: RunRecord) -> tuple:
    """What makes two runs replicates of one configuration: task, method, data and every setting
    except the per-run ones (``RUN_ONLY_PARAMS``), i.e. the default row key."""
    settings = tuple(sorted((k, v) for k, v in r.params.items() if k not in RUN_ONLY_PARAMS))
    return r.task, r.method, r.dataset, tuple((k, r.params.get(k, "")) for k in DATA_KEY), settings


def newest_per_seed(run_records: Iterable[RunRecord]) -> tuple[list[RunRecord], dict[str, list[RunRecord]]]:
    """One run per (configuration, seed): the newest (by end time, then start time); returns those
    and, by the id of each kept run, the older duplicates it replaces. A seed run twice is one
    sample, not two: counting both would shrink the std and the p-values."""
    by_seed: dict[tuple, list[RunRecord]] = {}
    for r in run_records:
        by_seed.setdefault((configuration(r), r.seed), []).append(r)
    kept, older = [], {}
    for runs in by_seed.values():
        runs = sorted(runs, key=lambda r: (r.end_time, r.start_time, r.run_id), reverse=True)
        kept.append(runs[0])
        if runs[1:]:
            older[runs[0].run_id] = runs[1:]
    return kept, older


def check_group_by(group_by: Sequence[str], run_records: Sequence[RunRecord]) -> None:
    """Every ``--group-by`` name is a param of some selected run, else a one-line error listing
    the params they have (close matches first)."""
    have = sorted({k for r in run_records for k in r.params} - RUN_ONLY_PARAMS)
    for name in group_by:
        if any(name in r.params for r in run_records):
            continue
        close = difflib.get_close_matches(name, have, n=3, cutoff=0.6)
        listed = [*close, *(k for k in have if k not in close)]
        raise RankbenchError(f"--group-by {name}: no selected run has that param: choose from "
                             f"{', '.join(listed) or 'none (the runs have no params)'}")


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

    from rankbench.report.curves import welch_p

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
        row.p_welch = welch_p(a, b)
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


def published_fmt(entry: dict, key: str, digits: int) -> str:
    """A published entry's ``key`` (accuracy, compression) as mean±std, or empty when the source gives none."""
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
            extra = [published_fmt(e, m, 2) + (_unit(m) if m in e else "") for m in shown]
            out.append([row.method, e.get("note", ""), str(e.get("n", "")), published_fmt(e, "accuracy", 2),
                        published_fmt(e, "compression", 2) + ("x" if "compression" in e else ""), *extra,
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


def duplicates_note(count: int) -> str:
    return (f"{count} duplicate run{'s' if count != 1 else ''} (same settings and seed) ignored: the newest run "
            "of each seed is used")


def render(rows: list[Row], tablefmt: str) -> str:
    """Tables per (task, dataset), in any tabulate format or csv, with footnotes. csv has no place
    for a footnote (a trailing line would not be csv, a column would change every table's header):
    the note on ignored duplicate runs goes to stderr instead, as ``rankbench: note: ...``."""
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
        ignored = sum(r.ignored_duplicates for r in rows)
        if ignored:
            print(f"rankbench: note: {duplicates_note(ignored)}", file=sys.stderr)
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
        ignored = sum(r.ignored_duplicates for r in group)
        if ignored:
            notes.append(duplicates_note(ignored))
        if any(r.source == "published" for r in group):
            notes.append("published rows come from the papers (rankbench/report/published.toml); their data and "
                         "compression definitions may differ from this run's")
        table = tabulate(body, headers=headers(shown), tablefmt=tablefmt, disable_numparse=True)
        blocks.append("\n".join([title, table, *notes]))
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
