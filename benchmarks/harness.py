"""Overhead of tracking (MLflow) and study bookkeeping (Optuna) over the bare training loop.

    python benchmarks/harness.py [--task mlp2] [--epochs 5]

Runs the same configuration three ways, side by side (best of ``--repeat``): the bare loop (load the
data, build the model, ``fit``);
``rankbench.run.experiment.run`` (MLflow run, per-epoch metrics, ranks and weights
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

from rankbench.plugins.registry import Registry
from rankbench.run.config import make_config
from rankbench.run.experiment import run
from rankbench.run.prepare import prepare
from rankbench.run.trainer import fit
from rankbench.study.runner import run_study
from rankbench.study.spec import parse_study


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--task", default="mlp2")
    parser.add_argument("--method", default="ours")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    registry = Registry.discover()
    lengths = (args.epochs,)
    with tempfile.TemporaryDirectory() as folder:
        uri = f"sqlite:///{Path(folder) / 'mlflow.db'}"
        task_cls = registry.task(args.task)
        bare, tracked = {}, {}
        for epochs in lengths:
            config = make_config(registry, args.task, args.method, {"epochs": epochs}, tracking_uri=uri,
                                 progress=False)

            def bare_run() -> None:
                prepared = prepare(config, registry)
                model, method = prepared.build(seed=0)
                fit(model, method, prepared.task, prepared.data, epochs=prepared.epochs, seed=0,
                    device=prepared.device, dense_parameters=prepared.dense_parameters)

            run(prepare(config, registry))  # warm-up: creates the store and its tables
            bare[epochs] = tracked[epochs] = float("inf")
            for _ in range(args.repeat):  # interleaved, best of each, so load changes hit both
                start = time.perf_counter()
                bare_run()
                bare[epochs] = min(bare[epochs], time.perf_counter() - start)
                start = time.perf_counter()
                run(prepare(config, registry))
                tracked[epochs] = min(tracked[epochs], time.perf_counter() - start)

        spec = parse_study({"name": "overhead", "task": args.task, "methods": [args.method],
                            "fixed": {"epochs": args.epochs}, "objectives": {"val_accuracy": "maximize"},
                            "sampler": {"name": "random"}, "budget": {"n_trials": 1}}, registry)
        start = time.perf_counter()
        run_study(spec, storage_url=f"sqlite:///{Path(folder) / 'optuna.db'}", tracking_uri=uri,
                  out_dir=Path(folder) / "plots")
        studied = time.perf_counter() - start
        from rankbench.run.tracking import Tracker

        tracker = Tracker(uri)  # the per-epoch cost a tracked run adds: one metrics batch per epoch
        run_id = tracker.start("overhead", "per-epoch logging", {}, {})
        start = time.perf_counter()
        for step in range(50):
            tracker.log_metrics(run_id, {f"metric{k}": float(k) for k in range(7)}, step=step)
        per_epoch = (time.perf_counter() - start) / 50
    (e1,) = lengths
    rows = [[f"bare loop, {e1} epochs", f"{bare[e1]:.2f}", "-"],
            [f"rankbench run (MLflow), {e1} epochs", f"{tracked[e1]:.2f}",
             f"{100 * (tracked[e1] - bare[e1]) / tracked[e1]:.1f}%"],
            [f"one-trial study (Optuna + MLflow + plots), {e1} epochs", f"{studied:.2f}",
             f"{100 * (studied - bare[e1]) / studied:.1f}%"]]
    print(f"task {args.task}, method {args.method}, on the default data, threads {torch.get_num_threads()}")
    print(tabulate(rows, headers=["how", "wall s", "overhead share of wall"]))
    recipe_epochs = task_cls.hyperparameters["epochs"].default
    fixed = max(0.0, (tracked[e1] - bare[e1]) - per_epoch * e1)
    bare_epoch = bare[e1] / e1
    recipe_overhead = fixed + per_epoch * recipe_epochs
    share_recipe = recipe_overhead / (bare_epoch * recipe_epochs + recipe_overhead)
    share_short = (tracked[e1] - bare[e1]) / tracked[e1]
    print(f"overhead: {fixed:.2f} s per run (measured difference) + {per_epoch * 1e3:.1f} ms per epoch "
          f"(metrics logging, timed directly)")
    print(f"target: tracking overhead <= 3% of a run's wall time: {share_short * 100:.1f}% at {e1} epochs "
          f"{'PASS' if share_short <= 0.03 else 'MISS'}; estimated for the recipe's {recipe_epochs} epochs: "
          f"{share_recipe * 100:.1f}% {'PASS' if share_recipe <= 0.03 else 'MISS'}")


if __name__ == "__main__":
    main()
