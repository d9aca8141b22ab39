"""How a study scales: trials per hour with N local workers, and the per-trial cost of Optuna, MLflow
and the launcher as a share of a trial's wall time, measured here and extrapolated to the paper's trial.

    python benchmarks/study_scale.py [--workers 1,2] [--trials 4] [--epochs 3] [--postgres URL]
                                     [--out benchmarks/results/study_scale_cpu.txt]

1. Throughput: a grid study of ``--trials`` short LeNet-5 trials (``ours``, random 200-image MNIST
   stand-in, one torch thread per worker) with ``--workers`` N local worker processes; trials per
   hour from the trials' own start and end times.
2. Overhead, on one in-process worker: every call into the Optuna storage, into the tracker (MLflow)
   and every checkpoint write is timed; every SQL statement sent to PostgreSQL is counted (SQLAlchemy's
   ``before_cursor_execute``) and every MLflow client call (one REST request against a tracking
   server, an artifact upload being one request per file) is counted by phase: per trial, per epoch,
   per heartbeat. Calls of the heartbeat threads run beside training, not in its way: counted, not
   added to a trial's serial overhead.
3. Extrapolation to a 150-epoch LeNet-5 trial (the paper's recipe: full MNIST, 55,000 training
   digits, 430 steps of 128 per epoch) from the per-step time measured here: per-trial overhead +
   150 x per-epoch overhead against 150 x 430 steps (evaluation left out of the trial's time, so the
   share is an upper bound).
4. The launcher's own cost: a worker job's start (Python, torch, MLflow, Optuna, submitit imported and
   its pickle loaded), paid once per job and shared by the trials that job runs; the waiting command
   polls squeue and the storage every RANKBENCH_SLURM_POLL_S (10 s), off the trials' path.

PostgreSQL: ``--postgres URL``, else a throwaway server made with Debian's server binaries (the test
suite's ``postgres_url`` fixture, tests/conftest.py), else a journal file (statement counts then absent).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import inspect
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

PAPER_EPOCHS, PAPER_STEPS = 150, 430
"""LeNet-5's recipe: 150 epochs; 55,000 training digits in batches of 128 are 430 steps per epoch."""
TARGET = 0.03
QUIET_STEP_S = 0.054
"""Seconds per LeNet-5 training step of the main job on a quiet 2-core machine (benchmarks/results/NOTES.md)."""
LIMITS = """\
Optuna's documented limits of its storages (optuna 5 API reference and tutorials):
- RDBStorage: "We would never recommend SQLite3 for parallel optimization" (RDBStorage docs, FAQ
  "sqlite_concurrency"); PostgreSQL/MySQL for many processes and machines. Its heartbeat (used by
  rankbench for ask/tell workers) is one UPDATE per running trial per heartbeat_interval.
- JournalStorage + JournalFileBackend: meant for distributed optimization over NFS without an RDB
  server (tutorial "(File-based) Journal Storage"; JournalFileSymlinkLock for NFSv2+, JournalFileOpenLock
  for NFSv3+); "similar to SQLite3, this class doesn't support a high level of write concurrency ...
  the write operations are not the bottleneck as long as the objective function doesn't invoke
  report() and set_user_attr() excessively" (JournalFileBackend docs). Every process replays the whole
  log when it opens the storage. rankbench's journal heartbeat is one append per running trial per
  heartbeat_interval (10 s by default; raise [workers] heartbeat_interval for hundreds of workers).
- "If you need to perform optimization across thousands of processing nodes, you can use
  GrpcStorageProxy" (tutorial "Easy Parallelization"): beyond what this launcher was measured for."""


class Meter:
    """Times and counts calls by group; a call inside another call of its group counts once (the outer)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.by_name: dict[tuple[str, str], float] = defaultdict(float)
        self.calls: Counter = Counter()
        self.local = threading.local()
        self.main = threading.main_thread()
        self.active = False
        """Counting only while the worker loop runs: the study's set-up and summary are once per command."""

    def current(self, group: str) -> str | None:
        return (getattr(self.local, "stack", {}) or {}).get(group)

    def wrap(self, owner, name: str, group: str) -> None:
        fn = getattr(owner, name)
        meter = self

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if not meter.active:
                return fn(*args, **kwargs)
            stack = meter.local.__dict__.setdefault("stack", {})
            outer = stack.get(group)
            if outer is None:
                stack[group] = name
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if outer is None:
                    del stack[group]
                    side = "" if threading.current_thread() is meter.main else " (thread)"
                    elapsed = time.perf_counter() - start
                    meter.seconds[group + side] += elapsed
                    meter.by_name[(group + side, name)] += elapsed
                    meter.calls[(group + side, name)] += 1

        setattr(owner, name, wrapper)

    def wrap_public(self, cls, group: str) -> None:
        for name, value in list(vars(cls).items()):
            if inspect.isfunction(value) and not name.startswith("_"):  # not static or class methods
                self.wrap(cls, name, group)


def tiny_data(root: Path) -> Path:
    from helpers import make_tiny_mnist

    return make_tiny_mnist(root)


def study_spec(registry, name: str, trials: int, epochs: int):
    from rankbench.study.spec import parse_study

    grid = [round(0.1 + 0.05 * i, 2) for i in range(trials)]
    return parse_study({"name": name, "task": "lenet5", "methods": ["ours"],
                        "fixed": {"epochs": epochs, "val_size": 40}, "search": {"lambda": {"grid": grid}},
                        "objectives": {"val_accuracy": "maximize"}, "sampler": {"name": "grid"}}, registry)


@contextlib.contextmanager
def postgres(url: str | None):
    if url:
        yield url
        return
    import conftest

    bindir = conftest.find_postgres_bindir()
    try:
        import psycopg2
    except ImportError:
        psycopg2 = None
    if bindir is None or psycopg2 is None:
        yield None
        return
    with conftest._throwaway_cluster(bindir, psycopg2) as server:
        yield server


def throughput(registry, root: Path, data: Path, storage: str, workers: int, trials: int, epochs: int) -> dict:
    import optuna

    from rankbench.run.config import RunOptions
    from rankbench.study.runner import open_storage, run_study

    name = f"scale_{workers}w_{int(time.time())}"
    spec = study_spec(registry, name, trials, epochs)
    start = time.perf_counter()
    run_study(spec, storage_url=storage, workers=workers, options=RunOptions(data_dir=data, threads=1),
              tracking_uri=f"sqlite:///{root / f'{name}.db'}", out_dir=root / name)
    wall = time.perf_counter() - start
    done = optuna.load_study(study_name=name, storage=open_storage(storage)).get_trials(deepcopy=False)
    first = min(t.datetime_start for t in done).timestamp()
    last = max(t.datetime_complete for t in done).timestamp()
    walls = [(t.datetime_complete - t.datetime_start).total_seconds() for t in done]
    return {"workers": workers, "trials": len(done), "command_s": wall, "span_s": last - first,
            "per_hour": len(done) / (last - first) * 3600, "trial_s": statistics.mean(walls)}


def instrumented(registry, root: Path, data: Path, storage: str, trials: int, epochs: int) -> dict:
    """One in-process worker with every storage, tracker and checkpoint call timed, statements counted."""
    import optuna
    import sqlalchemy
    from mlflow.tracking import MlflowClient

    import rankbench.run.experiment as experiment
    from rankbench.run.config import RunOptions
    from rankbench.run.tracking import Tracker
    from rankbench.study import runner

    meter = Meter()
    for cls in (optuna.storages.RDBStorage, optuna.storages.JournalStorage):
        meter.wrap_public(cls, "optuna")
    meter.wrap_public(Tracker, "mlflow")
    meter.wrap(Tracker, "_beat", "mlflow")
    meter.wrap(experiment, "save_checkpoint", "checkpoint")
    statements: Counter = Counter()
    requests: Counter = Counter()

    def on_statement(conn, cursor, statement, parameters, context, executemany):
        if meter.active and conn.engine.dialect.name == "postgresql":
            side = "heartbeat thread" if threading.current_thread() is not meter.main else "worker"
            statements[(side, meter.current("optuna") or "(none)")] += 1

    sqlalchemy.event.listen(sqlalchemy.engine.Engine, "before_cursor_execute", on_statement)
    # requests: MLflow client calls (the outermost of nested ones), by the tracker method that made them
    depth = threading.local()
    original = {name: fn for name, fn in vars(MlflowClient).items()
                if inspect.isfunction(fn) and not name.startswith("_")}
    for name, fn in original.items():
        def counted(*args, __fn=fn, __name=name, **kwargs):
            outer = getattr(depth, "n", 0)
            depth.n = outer + 1
            try:
                if outer == 0 and meter.active:
                    side = "heartbeat thread" if threading.current_thread() is not meter.main else "worker"
                    requests[(side, meter.current("mlflow") or "(study)", __name)] += 1
                return __fn(*args, **kwargs)
            finally:
                depth.n = outer
        setattr(MlflowClient, name, functools.wraps(fn)(counted))

    loop = {}
    real_loop = runner.worker_loop

    def timed_loop(run, deadline=None):
        start = time.perf_counter()
        meter.active = True
        try:
            return real_loop(run, deadline)
        finally:
            meter.active = False
            loop["seconds"] = time.perf_counter() - start

    runner.worker_loop = timed_loop
    name = f"overhead_{int(time.time())}"
    spec = study_spec(registry, name, trials, epochs)
    uri = f"sqlite:///{root / f'{name}.db'}"
    start = time.perf_counter()
    try:
        runner.run_study(spec, storage_url=storage, workers=1, options=RunOptions(data_dir=data, threads=1),
                         tracking_uri=uri, out_dir=root / name)
    finally:
        runner.worker_loop = real_loop
        for cname, fn in original.items():
            setattr(MlflowClient, cname, fn)
        sqlalchemy.event.remove(sqlalchemy.engine.Engine, "before_cursor_execute", on_statement)
    command = time.perf_counter() - start
    tracker = Tracker(uri)
    runs = [r for r in tracker.runs(study=name) if r.data.tags.get("rankbench.role") != "study"]
    per_batch = statistics.mean(r.data.metrics["train_seconds_per_batch"] for r in runs)
    trial_walls = [(t.datetime_complete - t.datetime_start).total_seconds()
                   for t in optuna.load_study(study_name=name, storage=runner.open_storage(storage)).trials]
    return {"meter": meter, "statements": statements, "requests": requests, "loop_s": loop["seconds"],
            "command_s": command, "per_batch": per_batch, "trial_s": statistics.mean(trial_walls),
            "trials": trials, "epochs": epochs, "heartbeat_interval": spec.heartbeat_interval}


def startup_seconds() -> float:
    code = ("import time; t = time.perf_counter(); import torch, mlflow, optuna, submitit; "
            "import rankbench.study.launcher, rankbench.run.experiment; print(time.perf_counter() - t)")
    best = float("inf")
    for _ in range(2):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
        best = min(best, time.perf_counter() - start)
    return best


def report(args, results: list[dict], m: dict, pg: bool, startup: float) -> str:
    meter, trials, epochs = m["meter"], m["trials"], m["epochs"]
    calls = meter.calls
    log_metric_calls = calls[("mlflow", "log_metrics")]
    seconds = meter.seconds
    # per-epoch share of the tracker's time: the metric batches (one per epoch, and one at the end)
    serial_optuna = seconds["optuna"] / trials
    serial_mlflow = seconds["mlflow"] / trials
    checkpoint = seconds["checkpoint"] / trials
    overhead = serial_optuna + serial_mlflow + checkpoint
    compute = m["trial_s"] - overhead
    per_epoch_ckpt = seconds["checkpoint"] / max(1, calls[("checkpoint", "save_checkpoint")])
    per_epoch_log = meter.by_name[("mlflow", "log_metrics")] / max(1, log_metric_calls)
    fixed = overhead - epochs * (per_epoch_ckpt + per_epoch_log)
    paper_compute = PAPER_EPOCHS * PAPER_STEPS * m["per_batch"]
    paper_overhead = fixed + PAPER_EPOCHS * (per_epoch_ckpt + per_epoch_log)
    share = paper_overhead / (paper_overhead + paper_compute)
    measured_share = overhead / m["trial_s"]
    jobs_trials = 10
    launcher = startup / jobs_trials
    optuna_beats = calls[("optuna (thread)", "record_heartbeat")] + calls[("optuna (thread)", "set_trial_system_attr")]
    mlflow_beats = sum(n for (g, _), n in calls.items() if g == "mlflow (thread)")
    lines = [
        "rankbench study scale, measured on this machine",
        f"machine: {args.machine}; torch threads 1 per worker; task lenet5, method ours, random 200-image MNIST "
        f"stand-in (val 40), {epochs} epochs per trial; storage {'PostgreSQL' if pg else 'journal file'} for the "
        "overhead run, MLflow on a SQLite file",
        "load average (1, 5, 15 min) at the end: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())
        + ": other jobs shared the cores, so N workers competed with them",
        "",
        "1. throughput, N local workers x 1 thread (trials per hour from the trials' start and end times)",
        f"{'workers':>8} {'trials':>7} {'span s':>8} {'trials/h':>9} {'mean trial s':>13} {'command s':>10}",
    ]
    for r in results:
        lines.append(f"{r['workers']:>8} {r['trials']:>7} {r['span_s']:>8.1f} {r['per_hour']:>9.0f} "
                     f"{r['trial_s']:>13.2f} {r['command_s']:>10.1f}")
    lines += [
        "(the command's time adds process start, the study's set-up, its summary and plots: once per command)",
        "",
        f"2. one worker, {trials} trials x {epochs} epochs, every call timed",
        f"mean trial wall {m['trial_s']:.2f} s: Optuna storage {serial_optuna:.3f} s, tracker (MLflow) "
        f"{serial_mlflow:.3f} s, checkpoints {checkpoint:.3f} s per trial -> overhead {overhead:.3f} s = "
        f"{measured_share:.1%} of these short trials; training and evaluation {compute:.2f} s",
        f"per epoch: checkpoint {per_epoch_ckpt * 1000:.1f} ms, metrics batch {per_epoch_log * 1000:.1f} ms; "
        f"fixed per trial {fixed:.3f} s",
        f"heartbeat threads (beside training): Optuna {optuna_beats} calls, {seconds['optuna (thread)']:.3f} s; "
        f"MLflow {mlflow_beats} calls, {seconds['mlflow (thread)']:.3f} s",
        f"training: {m['per_batch'] * 1000:.1f} ms per step of 128 (train_seconds_per_batch)",
        "",
        f"3. extrapolated to the paper's trial: LeNet-5, {PAPER_EPOCHS} epochs x {PAPER_STEPS} steps (full MNIST, "
        "batch 128) at the step time above, evaluation not counted (an upper bound on the share)",
        f"trial compute {paper_compute / 60:.1f} min; overhead {fixed:.2f} s + {PAPER_EPOCHS} x "
        f"{(per_epoch_ckpt + per_epoch_log) * 1000:.1f} ms = {paper_overhead:.1f} s -> {share:.2%} of the trial "
        f"(target <= {TARGET:.0%}: {'PASS' if share <= TARGET else 'MISS'})",
        f"the same overhead against a quiet machine's step ({QUIET_STEP_S * 1000:.0f} ms, the docs' main-job "
        f"measurement): {paper_overhead / (paper_overhead + PAPER_EPOCHS * PAPER_STEPS * QUIET_STEP_S):.2%}",
        f"launcher (Slurm): a worker job's start {startup:.1f} s (imports + pickle), once per job: "
        f"{launcher:.1f} s per trial at {jobs_trials} trials per job "
        f"({launcher / (paper_compute + paper_overhead):.3%}); "
        "the waiting command's polls are off the trials' path",
        "",
        "4. on paper: requests per trial",
    ]
    statements = m["statements"]
    if statements:
        worker = {k[1]: n for k, n in statements.items() if k[0] == "worker"}
        beat = sum(n for k, n in statements.items() if k[0] != "worker") + worker.get("record_heartbeat", 0)
        beats = calls[("optuna (thread)", "record_heartbeat")] + calls[("optuna", "record_heartbeat")]
        lines.append(f"PostgreSQL statements, one worker: {sum(worker.values()) / trials:.0f} per trial in the worker "
                     f"loop (the budget check under the advisory lock, stale-trial check, ask, parameters, attributes, "
                     f"tell; the study's set-up and summary, once per command, excluded), {beat / max(1, beats):.1f} "
                     f"per heartbeat ({beats} heartbeats)")
        top = sorted(worker.items(), key=lambda kv: -kv[1])[:8]
        lines.append("  by storage call, per trial: " + ", ".join(f"{k} {n / trials:.1f}" for k, n in top)
                     + " ((none): the advisory lock, Optuna's private queries)")
        paper_trial_s = paper_compute + paper_overhead
        paper_beats = paper_trial_s / m["heartbeat_interval"] * beat / max(1, beats)
        lines.append(f"  a {PAPER_EPOCHS}-epoch trial ({paper_trial_s / 60:.0f} min) adds "
                     f"{paper_beats:.0f} heartbeat statements "
                     f"({m['heartbeat_interval']} s interval): a worker sends about "
                     f"{(sum(worker.values()) / trials + paper_beats) / paper_trial_s:.2f} "
                     "statements per second; 100 workers about 100 times that")
    else:
        lines.append("PostgreSQL statements: not measured (no PostgreSQL server here)")
    requests = m["requests"]
    worker_requests = {k: n for k, n in requests.items() if k[0] == "worker"}
    epoch_part = sum(n for (s, method, c), n in worker_requests.items() if method == "log_metrics")
    per_epoch = epoch_part / max(1, log_metric_calls)
    total = sum(worker_requests.values())
    beat_requests = sum(n for k, n in requests.items() if k[0] != "worker")
    lines.append(f"MLflow requests (client calls; one REST request each against a tracking server): "
                 f"{per_epoch:.1f} per epoch (one metrics batch), "
                 f"{(total - epoch_part) / trials:.0f} per trial besides "
                 f"(run creation, params, tags, dataset input, artifacts, the logged model, status), "
                 f"heartbeat {beat_requests} tag update(s) in these trials (one per 30 s of a run: "
                 f"{(paper_compute + paper_overhead) / 30:.0f} in a {PAPER_EPOCHS}-epoch trial)")
    by_call = Counter()
    for (s, method, c), n in worker_requests.items():
        by_call[c] += n
    lines.append("  by client call, per trial: "
                 + ", ".join(f"{c} {n / trials:.1f}" for c, n in by_call.most_common(8)))
    lines += ["", LIMITS, ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--postgres", default=None)
    parser.add_argument("--machine", default="2-core x86-64 VM shared with other jobs")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "study_scale_cpu.txt")
    args = parser.parse_args()

    import torch

    from rankbench.plugins.registry import Registry
    from rankbench.study.runner import quiet_optuna

    torch.set_num_threads(1)
    quiet_optuna()
    registry = Registry.discover()
    with tempfile.TemporaryDirectory() as folder, postgres(args.postgres) as pg_url:
        root = Path(folder)
        data = tiny_data(root / "data")
        journal = f"journal://{root / 'optuna.log'}"
        results = [throughput(registry, root, data, pg_url or journal, int(n), args.trials, args.epochs)
                   for n in args.workers.split(",")]
        measured = instrumented(registry, root, data, pg_url or journal, args.trials, args.epochs)
        startup = startup_seconds()
        text = report(args, results, measured, pg_url is not None, startup)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
