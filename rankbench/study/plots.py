"""A study's figures: Optuna's own visualisations, PNG (matplotlib) and HTML (plotly)."""

from __future__ import annotations

import warnings
from pathlib import Path

from rankbench.study.spec import StudySpec


def _figures(study, spec: StudySpec) -> dict[str, tuple[str, dict, object]]:
    """name → (function name in optuna.visualization[.matplotlib], keyword arguments, the study it plots).
    A study over several tasks gets one Pareto front per task: accuracies of different tasks on one
    set of axes compare nothing."""
    names = list(spec.objectives)
    first = (lambda t: t.values[0]) if len(names) > 1 else None
    target = {"target": first, "target_name": names[0]} if first else {"target_name": names[0]}
    figures: dict[str, tuple[str, dict, object]] = {"history": ("plot_optimization_history", target, study)}
    params = [p for p in spec.search] + (["method"] if len(spec.methods) > 1 else [])
    if len(names) > 1 and len(spec.tasks) > 1:
        for task in spec.tasks:
            figures[f"pareto_front_{task}"] = ("plot_pareto_front", {"target_names": names}, _of_task(study, task))
    elif len(names) > 1:
        figures["pareto_front"] = ("plot_pareto_front", {"target_names": names}, study)
    if len(spec.search) >= 2:
        figures["contour"] = ("plot_contour", {"params": list(spec.search)[:2], **target}, study)
    if len(params) >= 2:
        figures["importances"] = ("plot_param_importances", target, study)
    return figures


def _of_task(study, task: str):
    """An in-memory copy of ``study`` holding only the trials of ``task``."""
    import optuna

    part = optuna.create_study(directions=study.directions)
    part.add_trials([t for t in study.get_trials(deepcopy=False) if t.params.get("task") == task])
    return part


def write_plots(study, spec: StudySpec, folder: Path) -> list[Path]:
    """Write each figure that the finished trials support; skipped ones say why on stderr."""
    import sys

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization as ov
    import optuna.visualization.matplotlib as om
    from optuna.trial import TrialState

    folder.mkdir(parents=True, exist_ok=True)
    if not any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        return []
    written = []
    for name, (function, kwargs, source) in _figures(study, spec).items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = getattr(om, function)(source, **kwargs)
                figure = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
                figure.set_size_inches(8, 6)
                figure.tight_layout()
                png = folder / f"{name}.png"
                figure.savefig(png, dpi=100)
                plt.close(figure)
                written.append(png)
                try:
                    html = folder / f"{name}.html"
                    getattr(ov, function)(source, **kwargs).write_html(str(html), include_plotlyjs="directory")
                    written.append(html)
                except ImportError:
                    pass
        except Exception as exc:  # too few trials for importances, a constant parameter, ...
            print(f"rankbench: skipped the {name} plot ({type(exc).__name__}: {exc})", file=sys.stderr)
    return written
