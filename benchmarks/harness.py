"""Overhead of tracking (MLflow) and study bookkeeping (Optuna) over the bare training loop.

    python benchmarks/harness.py [--task mlp2] [--epochs 5]

Runs the same configuration three ways, side by side: the bare loop (load the
data, build the model, ``fit``);
``rankbench.api.run`` (MLflow run, per-epoch metrics, ranks and weights
artifacts); and a one-trial study (Optuna storage, parent and child MLflow runs,
plots). Prints each wall time and the overhead as a share of the tracked run.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from tabulate import tabulate

from rankbench.api import build_model, make_config, run
from rankbench.method import MethodContext
from rankbench.registry import Registry
from rankbench.study import run_study
from rankbench.studyspec import parse_study
from rankbench.trainer import fit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--task", default="mlp2")
    parser.add_argument("--method", default="ours")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    registry = Registry.discover()
    settings = {"epochs": args.epochs}
    with tempfile.TemporaryDirectory() as folder:
        uri = f"sqlite:///{Path(folder) / 'mlflow.db'}"
        config = make_config(registry, args.task, args.method, settings, tracking_uri=uri, progress=False)
        task_cls = registry.task(args.task)

        def bare_run() -> None:
            data = task_cls(config.task_params).load_data(None, False)
            _, params = task_cls.recipe_for(data, config.task_params, config.explicit)
            task, method = task_cls(params), registry.method(args.method)(config.method_params)
            model = build_model(task, method, 0, MethodContext(len(data.train), torch.device("cpu")))
            fit(model, method, task, data, epochs=args.epochs, seed=0, device=torch.device("cpu"),
                dense_parameters=1)

        run(config, registry)  # warm-up: creates the store and its tables
        bare = tracked = float("inf")
        for _ in range(args.repeat):  # interleaved, best of each, so load changes hit both
            start = time.perf_counter()
            bare_run()
            bare = min(bare, time.perf_counter() - start)
            start = time.perf_counter()
            run(config, registry)
            tracked = min(tracked, time.perf_counter() - start)

        spec = parse_study({"name": "overhead", "task": args.task, "methods": [args.method], "fixed": settings,
                            "objectives": {"val_accuracy": "maximize"}, "sampler": {"name": "random"},
                            "budget": {"n_trials": 1}}, registry)
        start = time.perf_counter()
        run_study(spec, storage_url=f"sqlite:///{Path(folder) / 'optuna.db'}", tracking_uri=uri,
                  out_dir=Path(folder) / "plots")
        studied = time.perf_counter() - start
    rows = [["bare fit loop", f"{bare:.2f}", "-"],
            ["rankbench run (MLflow)", f"{tracked:.2f}", f"{100 * (tracked - bare) / tracked:.1f}%"],
            ["one-trial study (Optuna + MLflow + plots)", f"{studied:.2f}", f"{100 * (studied - bare) / studied:.1f}%"]]
    print(f"task {args.task}, method {args.method}, {args.epochs} epochs on the default data, "
          f"threads {torch.get_num_threads()}")
    print(tabulate(rows, headers=["how", "wall s", "overhead share of wall"]))
    share = (tracked - bare) / tracked
    print(f"target: tracking overhead <= 3% of the run's wall time: {share * 100:.1f}% "
          f"{'PASS' if share <= 0.03 else 'MISS'} (the overhead is mostly fixed per run: longer runs dilute it)")


if __name__ == "__main__":
    main()
