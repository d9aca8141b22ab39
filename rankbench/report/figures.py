"""The paper's figures from tracked runs (matplotlib, PNG).

ranks_<task>.png       learned rank per bond, methods side by side (supplement Fig. 1)
curves_<task>.png      train loss, validation loss/accuracy, compression per epoch (Fig. 2)
tradeoff_<task>.png    test accuracy vs compression with error bars, TRN sweep as a line (Fig. 3)
sensitivity_<task>.png accuracy and compression over two label hyperparameters, e.g. λ×σ (Fig. 4)

What a figure needs from a method it reads from the method's declarations
(``Row.role``, the label hyperparameters), never from its name.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from rankbench.errors import RankbenchError
from rankbench.report.build import MethodDeclarations, Row, ranks_of
from rankbench.run import records


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
        if r.task == task and r.runs and r.role != "reference" and r.values(records.COMPRESSION):
            current = best.get(r.method)
            if current is None or statistics.mean(r.values(records.COMPRESSION)) > statistics.mean(
                    current.values(records.COMPRESSION)):
                best[r.method] = r
    chosen = sorted(best.values(), key=lambda r: (r.role != "selector", r.method))[:4]
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

    tracker = Tracker(tracking_uri, create=False)
    chosen = [r for r in rows if r.task == task and r.runs][:6]
    if not chosen:
        return None
    metrics = [(records.TRAIN_LOSS, "train loss"), (records.VAL_LOSS, "validation loss"),
               (records.VAL_ACCURACY, "validation accuracy %"), (records.COMPRESSION, "compression ratio")]
    plt = _plt()
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for row in chosen:
        run = row.runs[0]
        for ax, (key, title) in zip(axes.flat, metrics):
            history = tracker.metric_history(run.run_id, key)
            if history:
                ax.plot([m.step for m in history], [m.value for m in history], label=row.label)
            ax.set_title(title)
            ax.set_xlabel("epoch")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"{task}: training curves (first seed of each row)")
    return _save(fig, path)


def tradeoff_figure(rows: list[Row], task: str, path: Path) -> Path | None:
    chosen = [r for r in rows if r.task == task and r.values(records.TEST_ACCURACY) and r.values(records.COMPRESSION)]
    if not chosen:
        return None

    def stats(values: list[float]) -> tuple[float, float]:
        return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for method in sorted({r.method for r in chosen if r.role == "uniform"}):
        curve = sorted((r for r in chosen if r.method == method), key=lambda r: stats(r.values(records.COMPRESSION))[0])
        xs = [stats(r.values(records.COMPRESSION)) for r in curve]
        ys = [stats(r.values(records.TEST_ACCURACY)) for r in curve]
        ax.errorbar([x for x, _ in xs], [y for y, _ in ys], xerr=[e for _, e in xs], yerr=[e for _, e in ys],
                    fmt="-o", color="gray", label=f"{method} (uniform rank)")
    for row in chosen:
        if row.role == "uniform":
            continue
        (x, xe), (y, ye) = stats(row.values(records.COMPRESSION)), stats(row.values(records.TEST_ACCURACY))
        ax.errorbar([x], [y], xerr=[xe], yerr=[ye], fmt="o", capsize=3, label=row.label)
    ax.set_xscale("log")
    ax.set_xlabel("compression ratio (log scale)")
    ax.set_ylabel("test accuracy %")
    ax.set_title(f"{task}: accuracy vs compression (mean ± std over seeds)")
    ax.legend(fontsize=7)
    return _save(fig, path)


def sensitivity_axes(rows: list[Row], task: str, declarations: MethodDeclarations) -> tuple[str, str, str] | None:
    """(method, x, y): the first selector method of ``task`` with two numeric label
    hyperparameters that each take several values over its rows (ours: λ and σ)."""
    for method in sorted({r.method for r in rows if r.task == task and r.runs and r.role == "selector"}):
        params = [r.runs[0].params for r in rows if r.task == task and r.method == method and r.runs]
        varying = []
        for key in declarations.labels.get(method, ()):
            values = {p.get(key) for p in params}
            if len(values) >= 2 and all(_is_number(v) for v in values):
                varying.append(key)
        if len(varying) >= 2:
            return method, varying[0], varying[1]
    return None


def _is_number(text: str | None) -> bool:
    try:
        float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return True


def sensitivity_figure(rows: list[Row], task: str, path: Path, declarations: MethodDeclarations) -> Path | None:
    axes_keys = sensitivity_axes(rows, task, declarations)
    if axes_keys is None:
        return None
    method, x_key, y_key = axes_keys
    cells: dict[tuple[float, float], tuple[list[float], list[float]]] = {}
    for row in rows:
        if row.task != task or row.method != method or not row.runs:
            continue
        params = row.runs[0].params
        key = (float(params[x_key]), float(params[y_key]))
        acc, cr = cells.setdefault(key, ([], []))
        acc += row.values(records.TEST_ACCURACY)
        cr += row.values(records.COMPRESSION)
    xs = sorted({k[0] for k in cells})
    ys = sorted({k[1] for k in cells})
    if len(xs) < 2 or len(ys) < 2 or len(cells) < 4:
        return None
    import numpy as np

    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, index, title in ((axes[0], 0, "test accuracy %"), (axes[1], 1, "compression ratio")):
        grid = np.full((len(ys), len(xs)), np.nan)
        for (x, y), values in cells.items():
            if values[index]:
                grid[ys.index(y), xs.index(x)] = statistics.mean(values[index])
        image = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis")
        for i in range(len(ys)):
            for j in range(len(xs)):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.3g}", ha="center", va="center", color="white", fontsize=8)
        ax.set_xticks(range(len(xs)), [f"{v:g}" for v in xs])
        ax.set_yticks(range(len(ys)), [f"{v:g}" for v in ys])
        ax.set_xlabel(x_key)
        ax.set_ylabel(y_key)
        ax.set_title(title)
        fig.colorbar(image, ax=ax)
    fig.suptitle(f"{task}: sensitivity of {method} to {x_key} and {y_key}")
    return _save(fig, path)


def write_figures(rows: list[Row], tracking_uri: str | None, out: Path,
                  declarations: MethodDeclarations | None = None) -> tuple[list[Path], list[str]]:
    """Every figure the rows support; returns (written files, reasons for skipped ones)."""
    declarations = declarations or MethodDeclarations.of()
    out.mkdir(parents=True, exist_ok=True)
    written, skipped = [], []
    for task in sorted({r.task for r in rows if r.runs}):
        makers = {
            "ranks": lambda p: ranks_figure(rows, task, tracking_uri, p),
            "curves": lambda p: curves_figure(rows, task, tracking_uri, p),
            "tradeoff": lambda p: tradeoff_figure(rows, task, p),
            "sensitivity": lambda p: sensitivity_figure(rows, task, p, declarations),
        }
        for name, make in makers.items():
            path = make(out / f"{name}_{task}.png")
            if path is None:
                skipped.append(f"{name}_{task}.png: no runs of {task} carry what it needs"
                               + (" (a grid over two label hyperparameters of one method, e.g. λ×σ)"
                                  if name == "sensitivity" else ""))
            else:
                written.append(path)
    return written, skipped


REPORT_SUFFIXES = {"csv": "csv", "tsv": "tsv", "latex": "tex", "latex_raw": "tex", "latex_booktabs": "tex",
                   "latex_longtable": "tex", "github": "md", "pipe": "md", "html": "html", "unsafehtml": "html",
                   "rst": "rst", "mediawiki": "wiki", "jira": "jira", "textile": "textile", "asciidoc": "adoc",
                   "orgtbl": "org"}
"""File suffix of a report table in each format (``txt`` for the rest)."""


def check_out(out: Path) -> None:
    """``report --out`` names a folder (new or existing), not a file: checkable before any work."""
    if out.exists() and not out.is_dir():
        raise RankbenchError(f"--out {out}: is a file: name a folder for the table and the figures, "
                             f"e.g. --out {out.with_name(out.stem + '-report')}")


def write_report(rows: list[Row], text: str, tablefmt: str, tracking_uri: str | None, out: Path,
                 registry=None) -> list[str]:
    """``rankbench report --out DIR``: the rendered table and every figure the rows support,
    written into ``out``; returns one line per file written or figure skipped. ``out`` that is a
    file, or a folder that cannot be written, is a one-line error."""
    out = Path(out)
    check_out(out)
    table = out / f"report.{REPORT_SUFFIXES.get(tablefmt, 'txt')}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        table.write_text(text + "\n")
        written, skipped = write_figures(rows, tracking_uri, out, MethodDeclarations.of(registry))
    except OSError as exc:
        blocker = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
        why = (f"{blocker} is a file, not a folder" if blocker is not None
               else f"{exc.strerror or type(exc).__name__}{f': {exc.filename}' if exc.filename else ''}")
        raise RankbenchError(f"--out {out}: cannot write into it ({why}): name a folder you can write") from None
    return [f"wrote {table}", *(f"wrote {path}" for path in written), *(f"skipped {reason}" for reason in skipped)]
