"""A seed counts once: of several finished runs of one configuration and seed (a command run again),
``rankbench report`` and its figures use the newest and say how many duplicates they ignored, so n,
the std and the p-values are not inflated by copies of one sample."""

from __future__ import annotations

import csv
import io

import pytest

from helpers import make_tiny_mnist
from rankbench.cli import main
from rankbench.report.build import RunRecord, build_report, compare, group_rows, render

NOTE = "2 duplicate runs (same settings and seed) ignored: the newest run of each seed is used"


def tiny_run(method: str, seeds: str, data, uri: str, *extra: str) -> list:
    return ["run", "--method", method, "--task", "mlp2", "--epochs", "1", "--seeds", seeds, "--no-progress",
            "--device", "cpu", "--threads", "1", "--set", "val_size=40", "--data-dir", str(data),
            "--tracking-uri", uri, *extra]


def record(method: str, seed: int, accuracy: float, *, end: int, start: int = 0, run_id: str | None = None,
           **params: str) -> RunRecord:
    base = {"task": "mlp2", "method": method, "seed": str(seed), "epochs": "1", "lr": "0.01", "data_name": "mnist",
            "train_size": "160", "val_size_used": "40", "test_size": "40", "split_seed": "0",
            "git_commit": f"commit{end}", "device": "cpu", **params}
    return RunRecord(run_id or f"{method}-{seed}-{end}", "1", "mlp2", method, "mnist", seed, base,
                     {"test_accuracy": accuracy, "compression": 2.0 if method == "trn" else 1.0}, {"method": method},
                     start, end)


def test_a_command_run_three_times_is_one_seed_in_the_report(tmp_path, uri, capsys):
    data = make_tiny_mnist(tmp_path / "data")
    trn = tiny_run("trn", "0", data, uri, "--set", "initial_rank=3")
    for _ in range(3):
        assert main(trn) == 0, capsys.readouterr().err
    assert main(tiny_run("dense", "0,1", data, uri)) == 0, capsys.readouterr().err
    capsys.readouterr()

    assert main(["report", "--tracking-uri", uri, "--baseline", "dense"]) == 0
    out, err = capsys.readouterr()
    (line,) = [line for line in out.splitlines() if line.startswith("trn ")]
    cells = line.split()
    assert "1*" in cells and "3" not in cells and "±" not in line, line
    header = next(row for row in out.splitlines() if row.startswith("method "))
    assert line[header.index("p (Welch)"):].split() == ["measured"], (header, line)  # no p-values
    assert NOTE in out.splitlines()

    assert main(["report", "--tracking-uri", uri, "--baseline", "dense", "--format", "csv"]) == 0
    out, err = capsys.readouterr()
    rows = list(csv.DictReader(io.StringIO(out)))  # still plain csv: the note is not in it
    (trn_row,) = [r for r in rows if r["method"] == "trn"]
    assert (trn_row["n"], trn_row["p (Welch)"], trn_row["p (MWU)"]) == ("1*", "", "")
    assert [r["n"] for r in rows if r["method"] == "dense"] == ["2"]
    assert err.strip().splitlines() == [f"rankbench: note: {NOTE}"]

    rows = build_report(uri, baseline="dense")
    (trn_row,) = [r for r in rows if r.method == "trn"]
    assert trn_row.n == 1 and trn_row.ignored_duplicates == 2 and trn_row.p_welch is None
    newest = max([trn_row.runs[0], *trn_row.duplicates], key=lambda r: (r.end_time, r.start_time))
    assert trn_row.runs[0] is newest


def test_the_newest_run_of_a_seed_is_used_by_end_then_start_time():
    runs = [record("ours", 0, 90.0, end=100), record("ours", 0, 91.0, end=300), record("ours", 0, 92.0, end=200),
            record("ours", 1, 93.0, end=50, start=10), record("ours", 1, 94.0, end=50, start=20),
            record("ours", 2, 95.0, end=10)]
    (row,) = group_rows(runs)
    assert [(r.seed, r.metrics["test_accuracy"]) for r in row.runs] == [(0, 91.0), (1, 94.0), (2, 95.0)]
    assert row.n == 3 and row.ignored_duplicates == 3
    assert sorted(r.metrics["test_accuracy"] for r in row.duplicates) == [90.0, 92.0, 93.0]


def test_runs_of_different_settings_or_seeds_are_no_duplicates():
    runs = [record("ours", s, 90.0 + s, end=s, sigma=sig) for s in (0, 1) for sig in ("0.5", "1.0")]
    rows = group_rows(runs)
    assert [(r.n, r.ignored_duplicates) for r in rows] == [(2, 0), (2, 0)]
    # --group-by merges the sigma rows: four runs of two configurations, still no duplicates
    (merged,) = group_rows(runs, group_by=["method"])
    assert (merged.n, merged.ignored_duplicates) == (4, 0)
    assert "duplicate" not in render(rows, "simple")


def test_duplicates_get_no_p_value_and_the_table_says_how_many_were_ignored(capsys):
    runs = [record("trn", 0, 87.8, end=t, rank="10") for t in (1, 2, 3)]
    runs += [record("dense", s, 97.0 + s, end=10 + s) for s in range(3)]
    rows = group_rows(runs)
    compare(rows, "dense")
    trn = next(r for r in rows if r.method == "trn")
    assert (trn.n, trn.p_welch, trn.p_mwu, trn.ignored_duplicates) == (1, None, None, 2)
    text = render(rows, "simple")
    assert NOTE in text.splitlines() and "* one seed: no standard deviation" in text.splitlines()
    assert capsys.readouterr().err == ""
    csv_text = render(rows, "csv")
    assert "duplicate" not in csv_text
    assert capsys.readouterr().err == f"rankbench: note: {NOTE}\n"


def test_figures_plot_the_newest_run_of_each_seed(tmp_path, monkeypatch):
    import matplotlib.axes

    from rankbench.report.figures import tradeoff_figure

    runs = [record("trn", 0, acc, end=t, rank="10") for t, acc in ((1, 50.0), (3, 80.0), (2, 60.0))]
    runs += [record("ours", 0, 70.0, end=5)]
    plotted = []
    real = matplotlib.axes.Axes.errorbar

    def errorbar(self, x, y, *args, **kwargs):
        plotted.append((kwargs.get("label"), list(y), list(kwargs.get("yerr", []))))
        return real(self, x, y, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar", errorbar)
    assert tradeoff_figure(group_rows(runs), "mlp2", tmp_path / "tradeoff.png") is not None
    trn = [p for p in plotted if p[0] and p[0].startswith("trn")]
    assert trn == [(trn[0][0], [pytest.approx(80.0)], [0.0])]  # one seed: no error bar from copies
