"""The paper's figures from tracked runs (matplotlib, PNG).

ranks_<task>.png       learned rank per bond, methods side by side (supplement Fig. 1)
curves_<task>.png      train loss, validation loss/accuracy, compression per epoch (Fig. 2)
tradeoff_<task>.png    test accuracy vs compression with error bars, TRN sweep as a line (Fig. 3)
sensitivity_<task>.png accuracy and compression over λ×σ (Fig. 4)
"""

from __future__ import annotations

import statistics
from pathlib import Path

from rankbench.report.build import Row, ranks_of

SELECTING = ("ours", "mars", "reinforce_l0")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def ranks_figure(rows: list[Row], task: str, tracking_uri: str | None, path: Path) -> Path | None:
    best: dict[str, Row] = {}
    for r in rows:
        if r.task == task and r.runs and r.method != "dense" and r.values("compression_ratio"):
            current = best.get(r.method)
            if current is None or statistics.mean(r.values("compression_ratio")) > statistics.mean(
                    current.values("compression_ratio")):
                best[r.method] = r
    chosen = sorted(best.values(), key=lambda r: (r.method not in SELECTING, r.method))[:4]
    series = []
    for row in chosen:
        ranks = ranks_of(tracking_uri, row.runs[0].run_id)
        if ranks:
            series.append((row.label + f" seed {row.runs[0].seed}", ranks))
    if not series:
        return None
    bonds = [f"{layer}.b{i}" for layer, r in series[0][1].items() for i in range(len(r))]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(8, len(bonds) * 0.45), 4.5))
    width = 0.8 / len(series)
    for k, (label, ranks) in enumerate(series):
        values = [v for r in ranks.values() for v in r]
        ax.bar([i + k * width for i in range(len(values))], values, width=width, label=label)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(bonds))], bonds, rotation=90, fontsize=7)
    ax.set_ylabel("learned rank")
    ax.set_title(f"{task}: learned rank per bond")
    ax.legend(fontsize=8)
    return _save(fig, path)


def curves_figure(rows: list[Row], task: str, tracking_uri: str | None, path: Path) -> Path | None:
    from rankbench.run.tracking import Tracker

    client = Tracker(tracking_uri).client
    chosen = [r for r in rows if r.task == task and r.runs][:6]
    if not chosen:
        return None
    metrics = [("train_loss", "train loss"), ("val_loss", "validation loss"),
               ("val_accuracy", "validation accuracy %"), ("compression", "compression ratio")]
    plt = _plt()
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for row in chosen:
        run = row.runs[0]
        for ax, (key, title) in zip(axes.flat, metrics):
            history = sorted(client.get_metric_history(run.run_id, key), key=lambda m: m.step)
            if history:
                ax.plot([m.step for m in history], [m.value for m in history], label=row.label)
            ax.set_title(title)
            ax.set_xlabel("epoch")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"{task}: training curves (first seed of each row)")
    return _save(fig, path)


def tradeoff_figure(rows: list[Row], task: str, path: Path) -> Path | None:
    chosen = [r for r in rows if r.task == task and r.values("test_accuracy") and r.values("compression_ratio")]
    if not chosen:
        return None

    def stats(values: list[float]) -> tuple[float, float]:
        return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 5.5))
    trn = sorted((r for r in chosen if r.method == "trn"), key=lambda r: stats(r.values("compression_ratio"))[0])
    if trn:
        xs = [stats(r.values("compression_ratio")) for r in trn]
        ys = [stats(r.values("test_accuracy")) for r in trn]
        ax.errorbar([x for x, _ in xs], [y for y, _ in ys], xerr=[e for _, e in xs], yerr=[e for _, e in ys],
                    fmt="-o", color="gray", label="trn (uniform rank)")
    for row in chosen:
        if row.method == "trn":
            continue
        (x, xe), (y, ye) = stats(row.values("compression_ratio")), stats(row.values("test_accuracy"))
        ax.errorbar([x], [y], xerr=[xe], yerr=[ye], fmt="o", capsize=3, label=row.label)
    ax.set_xscale("log")
    ax.set_xlabel("compression ratio (log scale)")
    ax.set_ylabel("test accuracy %")
    ax.set_title(f"{task}: accuracy vs compression (mean ± std over seeds)")
    ax.legend(fontsize=7)
    return _save(fig, path)


def sensitivity_figure(rows: list[Row], task: str, path: Path) -> Path | None:
    cells: dict[tuple[float, float], tuple[list[float], list[float]]] = {}
    for row in rows:
        if row.task != task or not row.runs:
            continue
        params = row.runs[0].params
        if "lambda" not in params or "sigma" not in params:
            continue
        key = (float(params["lambda"]), float(params["sigma"]))
        acc, cr = cells.setdefault(key, ([], []))
        acc += row.values("test_accuracy")
        cr += row.values("compression_ratio")
    lambdas = sorted({k[0] for k in cells})
    sigmas = sorted({k[1] for k in cells})
    if len(lambdas) < 2 or len(sigmas) < 2 or len(cells) < 4:
        return None
    import numpy as np

    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, index, title in ((axes[0], 0, "test accuracy %"), (axes[1], 1, "compression ratio")):
        grid = np.full((len(sigmas), len(lambdas)), np.nan)
        for (lam, sig), values in cells.items():
            if values[index]:
                grid[sigmas.index(sig), lambdas.index(lam)] = statistics.mean(values[index])
        image = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis")
        for i in range(len(sigmas)):
            for j in range(len(lambdas)):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.3g}", ha="center", va="center", color="white", fontsize=8)
        ax.set_xticks(range(len(lambdas)), [f"{v:g}" for v in lambdas])
        ax.set_yticks(range(len(sigmas)), [f"{v:g}" for v in sigmas])
        ax.set_xlabel("λ")
        ax.set_ylabel("σ")
        ax.set_title(title)
        fig.colorbar(image, ax=ax)
    fig.suptitle(f"{task}: sensitivity to λ and σ")
    return _save(fig, path)


def write_figures(rows: list[Row], tracking_uri: str | None, out: Path) -> tuple[list[Path], list[str]]:
    """Every figure the rows support; returns (written files, reasons for skipped ones)."""
    out.mkdir(parents=True, exist_ok=True)
    written, skipped = [], []
    for task in sorted({r.task for r in rows if r.runs}):
        makers = {
            "ranks": lambda p: ranks_figure(rows, task, tracking_uri, p),
            "curves": lambda p: curves_figure(rows, task, tracking_uri, p),
            "tradeoff": lambda p: tradeoff_figure(rows, task, p),
            "sensitivity": lambda p: sensitivity_figure(rows, task, p),
        }
        for name, make in makers.items():
            path = make(out / f"{name}_{task}.png")
            if path is None:
                skipped.append(f"{name}_{task}.png: no runs of {task} carry what it needs"
                               + (" (a λ×σ grid)" if name == "sensitivity" else ""))
            else:
                written.append(path)
    return written, skipped
