"""The ``rankbench`` command line."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from rankbench.errors import RankbenchError


def _names(text: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))


def _seeds(text: str) -> tuple[int, ...]:
    from rankbench.run.config import check_seeds

    try:
        seeds = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give integers separated by commas, e.g. 0,1,2") from None
    try:
        return check_seeds(seeds)
    except RankbenchError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--seeds: ")) from None


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors as one line (exit 2), like every other input error."""

    def error(self, message: str):
        self.exit(2, f"rankbench: error: {self.prog}: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rankbench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    common = _Parser(add_help=False)
    common.add_argument("--plugin-dir", action="append", type=Path, default=[],
                        help="folder of extra method/task plugin files (repeatable)")

    options = _Parser(add_help=False)  # how and where runs run: the same for `run` and `study` (RunOptions)
    options.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    options.add_argument("--threads", type=int, default=None, help="torch CPU threads (a study's workers: 1 each)")
    options.add_argument("--compile", default="off", metavar="auto|off|on",
                         help="torch.compile the training model (CUDA graphs on a GPU); "
                              "auto: on for CUDA, off on a CPU")
    options.add_argument("--contraction", default="auto", choices=("auto", "weight", "input"),
                         help="training contraction of tensorized linear layers (auto: cheaper by FLOP count)")
    options.add_argument("--budget", default=None, metavar="steps=N",
                         help="train for N optimizer steps (sets the epochs from the training-set size)")
    options.add_argument("--data-dir", type=Path, default=None, help="folder holding the dataset files")
    options.add_argument("--download", action="store_true", help="fetch missing dataset files")
    options.add_argument("--tracking-uri", default=None, help="MLflow tracking URI")

    run = sub.add_parser("run", parents=[common, options], help="train and measure one method on one task")
    run.add_argument("--method", required=True)
    run.add_argument("--task", required=True)
    run.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE",
                     help="override a method or task hyperparameter (repeatable)")
    run.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
    run.add_argument("--recipe", default=None, metavar="NAME",
                     help="the task's named defaults (paper, embedded, ...; default: chosen for the data loaded)")
    run.add_argument("--seeds", type=_seeds, default=None, help="comma-separated seeds, one run each (default 0)")
    run.add_argument("--experiment", default=None, help="MLflow experiment (default: the task name)")
    run.add_argument("--format", default="simple", help="tabulate format of the final table")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--resume", default=None, metavar="RUN_ID",
                     help="continue that run (killed or crashed) from its last finished epoch, in the same MLflow "
                          "run; give the run's own command line")

    listing = sub.add_parser("list", parents=[common], help="list methods and tasks with their hyperparameters")
    listing.add_argument("--recipes", action="store_true",
                         help="every resolved default of every task, recipe and method, and where it came from")

    check = sub.add_parser("check-plugin", parents=[common],
                           help="run the plugin contract checks on a method or task (exit 1 if any fails)")
    check.add_argument("name", metavar="NAME", help="a method or task name")
    check.add_argument("--task", default=None,
                       help="task to check a method on (default: every registered task)")

    study = sub.add_parser("study", parents=[common, options], help="run, resume, list or show Optuna studies",
                           description="rankbench study FILE.toml | rankbench study --list | rankbench study show NAME")
    study.add_argument("target", nargs="*", metavar="FILE | show NAME")
    study.add_argument("--list", action="store_true", help="list the studies in the storage")
    study.add_argument("--storage", default=None, help="Optuna storage URL (default sqlite:///rankbench-runs/optuna.db)")
    study.add_argument("--n-trials", type=int, default=None, help="override the study's trial budget")
    study.add_argument("--workers", type=int, default=1, help="worker processes sharing the storage")
    study.add_argument("--seeds", type=_seeds, default=None, help="override the seeds run per trial")
    study.add_argument("--methods", type=_names, default=None, metavar="NAME,...",
                       help="a matched study: train only these of its methods (join the parts' boards with "
                            "rankbench leaderboard A.json B.json)")
    study.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE",
                       help="override a fixed setting for every trial (repeatable)")
    study.add_argument("--out", type=Path, default=None,
                       help="folder for the plots (default rankbench-runs/studies/NAME)")
    study.add_argument("--launcher", default="local", choices=("local", "slurm"),
                       help="local: worker processes here (default); slurm: --workers N worker jobs as one Slurm job "
                            "array (submitit), on a PostgreSQL or journal:// storage (docs/cluster.md)")
    study.add_argument("--detach", action="store_true",
                       help="with --launcher slurm: submit, print the job ids and return "
                            "(rerun the command to summarise)")
    study.add_argument("--slurm-partition", default=None, metavar="NAME", help="partition of the worker jobs")
    study.add_argument("--slurm-time", default=None, metavar="LIMIT",
                       help="time limit of each worker job (MINUTES, HH:MM:SS, D-HH:MM:SS); a job reaching it "
                            "checkpoints and requeues itself")
    study.add_argument("--slurm-cpus-per-task", default=None, metavar="N",
                       help="CPUs of each worker job (its torch threads)")
    study.add_argument("--slurm-mem", default=None, metavar="MEM", help="memory of each worker job, e.g. 8G")
    study.add_argument("--slurm-gres", default=None, metavar="GRES", help="generic resources of each job, e.g. gpu:1")
    study.add_argument("--slurm-account", default=None, metavar="NAME", help="account charged for the jobs")
    study.add_argument("--slurm-arg", action="append", default=[], metavar="KEY=VALUE",
                       help="any other sbatch option (--KEY=VALUE), or a [slurm] key, e.g. qos=long or "
                            "signal_delay_s=120 (repeatable); the file's [slurm] table < --slurm-arg < --slurm-* flags")

    export = sub.add_parser("export", parents=[common], help="write a run's pruned model")
    export.add_argument("run_id", metavar="RUN_ID")
    export.add_argument("--out", type=Path, required=True, help="file to write (torch.save)")
    export.add_argument("--tracking-uri", default=None, help="MLflow tracking URI")
    export.add_argument("--materialise", action="store_true",
                        help="store plain nn.Linear/nn.Conv2d weights instead of the pruned cores")

    report = sub.add_parser("report", parents=[common], help="mean±std tables (and figures) from tracked runs")
    report.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: the rankbench store)")
    report.add_argument("--task", default=None, help="only this task")
    report.add_argument("--method", default=None, help="only this method")
    report.add_argument("--study", default=None, help="only the runs of this study")
    report.add_argument("--group-by", default=None, help="comma-separated params that define a row "
                        "(default: every setting except the seed)")
    report.add_argument("--format", default="simple", help="csv or any tabulate format (github, latex, plain, ...)")
    report.add_argument("--baseline", default=None, help="method to compare every row with (Δ accuracy, p-values)")
    report.add_argument("--with-published", action="store_true", help="add the papers' published rows")
    report.add_argument("--out", type=Path, default=None, help="write the table and the figures into this folder")

    board = sub.add_parser("leaderboard", parents=[common],
                           help="a matched-compression study's tables (Markdown) and its HTML page",
                           description="rankbench leaderboard FILE.json | rankbench leaderboard --study NAME")
    board.add_argument("file", nargs="*", type=Path, default=[], metavar="FILE.json",
                       help="the leaderboard.json a matched study wrote; several: the parts of one study split "
                            "by --methods, joined")
    board.add_argument("--study", default=None, help="read the newest leaderboard of this matched study from MLflow")
    board.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: the rankbench store)")
    board.add_argument("--out", type=Path, default=Path("leaderboard"),
                       help="folder for leaderboard.html and leaderboard.md (default ./leaderboard)")
    board.add_argument("--format", default="github", choices=("github", "html"),
                       help="tables of the printed text: Markdown (github) or HTML")
    return parser


def cmd_export(args, registry) -> None:
    from rankbench.export import export_run
    from rankbench.report.tables import format_ranks

    result = export_run(args.run_id, args.out, registry, args.tracking_uri, materialised=args.materialise)
    print(f"wrote {args.out}: {result.parameters} parameters (pruned), ranks {format_ranks(result.ranks)}; "
          f"max |exported - gated| on a random batch: {result.max_abs_difference:.2e}")


def cmd_report(args, registry) -> None:
    from rankbench.report.build import build_report, died_runs, render
    from rankbench.report.figures import write_report

    if args.out is not None:
        from rankbench.report.figures import check_out

        check_out(args.out)
    for line in died_runs(args.tracking_uri):
        print(line, file=sys.stderr)
    group_by = [g.strip() for g in args.group_by.split(",") if g.strip()] if args.group_by else None
    rows = build_report(args.tracking_uri, task=args.task, method=args.method, study=args.study,
                        group_by=group_by, baseline=args.baseline, with_published=args.with_published,
                        registry=registry)
    text = render(rows, args.format)
    print(text)
    if args.out is not None:
        for line in write_report(rows, text, args.format, args.tracking_uri, args.out, registry):
            print(line)


def cmd_leaderboard(args, registry) -> None:
    from rankbench.report.board import Leaderboard
    from rankbench.report.leaderboard import markdown
    from rankbench.report.page import write_page

    if bool(args.file) == (args.study is not None):
        raise RankbenchError("give the leaderboard: rankbench leaderboard FILE.json [MORE.json ...], or rankbench "
                             "leaderboard --study NAME")
    if args.out.exists() and not args.out.is_dir():
        raise RankbenchError(f"--out {args.out}: is a file: name a folder for leaderboard.html and leaderboard.md")
    board = (Leaderboard.join([Leaderboard.read(path) for path in args.file]) if args.file
             else study_leaderboard(args.study, args.tracking_uri))
    print(markdown(board, args.format), end="")
    for path in [*write_page(board, args.out), board.write(args.out / "leaderboard.json")]:
        print(f"wrote {path}")


def study_leaderboard(study: str, tracking_uri: str | None):
    """The leaderboard artifact of the newest parent run of matched study ``study`` (a rerun of a study
    is a new parent run: the newest is the one to show), whatever that run's status."""
    import tempfile

    from rankbench.errors import MissingRecord
    from rankbench.report.board import Leaderboard
    from rankbench.run.tracking import Tracker

    tracker = Tracker(tracking_uri, create=False)
    runs = [run for status in ("FINISHED", "RUNNING", "KILLED", "FAILED")
            for run in tracker.runs(study=study, status=status) if run.data.tags.get("rankbench.role") == "matched"]
    if not runs:
        raise RankbenchError(f"--study {study}: no matched-compression study of that name in {tracker.uri}: check "
                             "the name and --tracking-uri, or give its leaderboard.json")
    newest = max(runs, key=lambda run: run.info.start_time or 0)
    run_id = newest.info.run_id
    with tempfile.TemporaryDirectory() as folder:
        try:
            path = tracker.download_artifact(run_id, "leaderboard.json", folder)
        except MissingRecord:
            raise RankbenchError(f"--study {study}: its newest run {run_id} ({newest.info.status}) has no "
                                 "leaderboard.json yet: let the study finish, or run it again to resume it") from None
        try:
            text = path.read_text()
        except OSError as exc:
            raise RankbenchError(f"--study {study}: cannot read the leaderboard.json of run {run_id} "
                                 f"({exc.strerror}): check --tracking-uri") from None
    return Leaderboard.from_json(text, f"the leaderboard.json of run {run_id} (study {study})")


def cmd_list(registry, recipes: bool = False) -> None:
    from rankbench.plugins.defaults import method_defaults

    if recipes:
        cmd_list_recipes(registry)
        return
    for title, table in (("methods", registry.methods), ("tasks", registry.tasks)):
        print(f"{title}:")
        for name in sorted(table):
            plugin = table[name]
            print(f"  {name:14s} {plugin.description}")
            for key, hyper in plugin.hyperparameters.items():
                print(f"      {key} = {hyper.describe():22s} {hyper.help}")
            for name, recipe in getattr(plugin, "recipes", {}).items():
                values = ", ".join(f"{k}={v}" for k, v in recipe.task.items()) or "no task values"
                when = ", chosen on the embedded default data" if recipe.on_embedded_data else ""
                print(f"      (recipe {name}{when}: {values}; {recipe.why})")
            for key in getattr(plugin, "task_defaults", {}):
                values = ", ".join(f"{k}={v}" for k, v in method_defaults(plugin, key).values.items())
                print(f"      (defaults on {key}: {values})")
        print()
    if registry.broken:
        print("broken (cannot be used; every other plugin works):")
        for name, reason in sorted(registry.broken.items()):
            print(f"  {name:14s} {reason}")
        print()


def cmd_list_recipes(registry) -> None:
    """Every resolved default of every (task, recipe, method), and where each came from."""
    from tabulate import tabulate

    from rankbench.plugins.defaults import recipes_of, resolve_defaults

    for task_name in sorted(registry.tasks):
        task_cls = registry.tasks[task_name]
        for recipe in recipes_of(task_cls):
            rows = []
            for method_name in sorted(registry.methods):
                resolved = resolve_defaults(task_cls, registry.methods[method_name], recipe, {}, {})
                if not rows:
                    rows += [[k, "none" if v is None else v, resolved.sources[k]] for k, v in resolved.task.items()]
                rows += [[f"{method_name}: {k}", "none" if v is None else v, resolved.sources[k]]
                         for k, v in resolved.method.items()]
            print(f"{task_name}, recipe {recipe}:")
            print(tabulate(rows, headers=["key", "value", "from"], disable_numparse=True))
            print()


def cmd_run(args, registry) -> None:
    from tqdm import tqdm

    from rankbench import records
    from rankbench.report.tables import results_table
    from rankbench.run.config import make_config
    from rankbench.run.experiment import run
    from rankbench.run.prepare import prepare
    from rankbench.run.tracking import Tracker

    check_table_format(args.format)
    if args.resume is not None and args.seeds is not None:
        check_resumed_seed(args.resume, args.seeds, args.tracking_uri)
    config = make_config(
        registry, args.task, args.method, args.assignments, epochs=args.epochs, seeds=args.seeds or (0,),
        options=run_options(args), experiment=args.experiment, progress=not args.no_progress, resume=args.resume,
        recipe=args.recipe,
    )
    prepared = prepare(config, registry)  # every check of the request comes before a store is created
    bars: dict[int, tqdm] = {}

    def on_start(run_id: str, seed: int, params: dict) -> None:
        if not bars:
            print(f"task {config.task}: " + ", ".join(f"{k}={params[k]}" for k in prepared.task.params))
            print(f"method {config.method}: "
                  + (", ".join(f"{k}={params[k]}" for k in prepared.method_params) or "-"))
            recipe = ", ".join(f"{k}={v}" for k, v in prepared.task.recipe().items())
            reasons = prepared.defaults.why if prepared.defaults is not None else ()
            why = f" ({'; '.join(reasons)})" if reasons else ""
            print(f"recipe {prepared.recipe}: {recipe}{why}")
            print(f"data: {prepared.data.describe()}")
            print(f"device: {params[records.DEVICE]}, threads: {params[records.THREADS]}", flush=True)
        print(f"run {run_id} (seed {seed})", file=sys.stderr)
        bars[seed] = tqdm(total=prepared.epochs, desc=f"seed {seed}", unit="epoch",
                          disable=not config.progress, file=sys.stderr, dynamic_ncols=True)

    def on_epoch(seed: int, epoch: int, m: dict) -> None:
        bar = bars[seed]
        bar.set_postfix(loss=f"{m[records.TRAIN_LOSS]:.3f}", val_acc=f"{m[records.VAL_ACCURACY]:.2f}",
                        cr=f"{m[records.COMPRESSION]:.2f}x", rank=int(m[records.TOTAL_RANK]), refresh=False)
        bar.update(1)
        if epoch == bar.total:
            bar.close()

    tracker = Tracker(config.tracking_uri)
    results = run(prepared, tracker=tracker, on_start=on_start, on_epoch=on_epoch)
    print(results_table(results, tablefmt=args.format, shown=type(prepared.task).metrics))
    print(f"tracking: {tracker.uri} (experiment {config.experiment or config.task}); "
          f"open it with: mlflow ui --backend-store-uri {tracker.uri}")


def run_options(args: argparse.Namespace):
    """The shared run options of ``run`` and ``study``, checked once."""
    from rankbench.run.config import RunOptions, parse_budget

    return RunOptions(device=args.device, threads=args.threads, compile=args.compile, contraction=args.contraction,
                      budget_steps=parse_budget(args.budget), data_dir=args.data_dir, download=args.download,
                      tracking_uri=args.tracking_uri).checked()


def check_resumed_seed(run_id: str, seeds: Sequence[int], tracking_uri: str | None) -> None:
    """``--resume`` continues one run's own seed: ``--seeds`` (from the run's own command line) must hold
    it, and any other seed it names is not run, which is said."""
    from rankbench.run.tracking import Tracker

    seed = Tracker(tracking_uri, create=False).get_run(run_id).data.params.get("seed")
    if seed is None or not seed.isdigit():
        return  # not a training run: resuming it is refused with its reason
    if int(seed) not in seeds:
        raise RankbenchError(f"--resume {run_id}: that run is seed {seed}, but --seeds asks "
                             f"{','.join(map(str, seeds))}: repeat the run's own command line, or drop --seeds")
    others = [s for s in seeds if s != int(seed)]
    if others:
        print(f"rankbench: warning: --resume continues seed {seed} only; seeds {','.join(map(str, others))} of "
              "--seeds are not run (run them without --resume)", file=sys.stderr)


def check_table_format(name: str) -> None:
    """A tabulate format the final table can be printed in, checked before any training."""
    from tabulate import tabulate_formats

    if name not in tabulate_formats:
        raise RankbenchError(f"--format {name}: choose one of {', '.join(tabulate_formats)}")


def cmd_check_plugin(args, registry) -> int:
    from tabulate import tabulate

    from rankbench.contract import check_plugin

    passed = failed = 0
    for title, checks in check_plugin(registry, args.name, args.task):
        print(f"{title}:")
        rows = [(c.name, "PASS" if c.passed else "FAIL", c.detail) for c in checks]
        print(tabulate(rows, headers=("check", "result", "detail"), tablefmt="simple"))
        print()
        passed += sum(c.passed for c in checks)
        failed += sum(not c.passed for c in checks)
    print(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


def cmd_study(args, registry) -> None:
    from tabulate import tabulate

    from rankbench.hyper import parse_assignments
    from rankbench.study import runner as studies

    slurm_flags = {"partition": args.slurm_partition, "time": args.slurm_time,
                   "cpus_per_task": args.slurm_cpus_per_task, "mem": args.slurm_mem,
                   "gres": args.slurm_gres, "account": args.slurm_account}
    if args.launcher != "slurm":
        given = [f"--slurm-{k.replace('_', '-')}" for k, v in slurm_flags.items() if v is not None]
        given += ["--slurm-arg"] * bool(args.slurm_arg) + ["--detach"] * args.detach
        if given:
            raise RankbenchError(f"{given[0]} needs --launcher slurm")
    if args.list:
        listed = studies.list_studies(args.storage, args.tracking_uri)
        for s in listed:
            for run in s["newly_dead"]:
                trial = run.data.tags.get("trial", "?")
                print(f"rankbench: run {run.info.run_id} of study {s['name']} (trial {trial}, "
                      f"seed {run.data.params.get('seed', '?')}) had died: marked FAILED; run the study again to "
                      "continue it from its last checkpoint", file=sys.stderr)
        rows = [[s["name"], s["trials"], ", ".join(s["directions"]),
                 "-" if s["running"] is None else s["running"], "-" if s["died"] is None else s["died"],
                 "; ".join(f"#{n}: {', '.join(f'{v:.4g}' for v in values)}" for n, values in s["best"][:5])]
                for s in listed]
        headers = ["study", "trials", "directions", "runs running", "runs died/failed", "best (pareto) trials"]
        if any(s.get("slurm_jobs") for s in listed):  # only then: the table stays as it was for local studies
            from rankbench.study.launcher import describe_jobs

            headers.append("slurm jobs")
            for row, s in zip(rows, listed):
                row.append(describe_jobs(s["slurm_jobs"]) if s.get("slurm_jobs") else "-")
        print(tabulate(rows, headers=headers) if rows else "no studies in the storage")
        return
    if args.target[:1] == ["show"]:
        if len(args.target) != 2:
            raise RankbenchError("write: rankbench study show NAME")
        rows = studies.trial_rows(studies.load_existing(args.target[1], args.storage))
        print(tabulate(rows, headers=studies.TRIAL_HEADERS, disable_numparse=True))
        return
    if len(args.target) != 1:
        raise RankbenchError("give one study file, e.g. rankbench study studies/lenet5_sensitivity.toml")
    from rankbench.study.spec import load_study_file

    options = run_options(args)
    spec = load_study_file(Path(args.target[0]), registry)
    if spec.matched is not None and args.launcher == "slurm":
        raise RankbenchError(f"--launcher slurm: {spec.name} is a matched-compression study; the Slurm launcher runs "
                             "Optuna studies only: run it with --launcher local")
    slurm = None
    if args.launcher == "slurm":
        from rankbench.study.launcher import slurm_options

        slurm = slurm_options(spec.slurm, slurm_flags, args.slurm_arg)
    if spec.matched is not None and args.n_trials is not None:
        raise RankbenchError(f"--n-trials: matched study {spec.name} has no trial budget (its knob searches end at "
                             "the targets): drop --n-trials")
    spec = spec.with_overrides(n_trials=args.n_trials, seeds=args.seeds, fixed=parse_assignments(args.assignments),
                               registry=registry, methods=args.methods)
    if options.budget_steps is not None:  # what every trial trains: the study's own budget, in its digest
        spec = replace(spec, budget_steps=options.budget_steps)
    if spec.matched is not None:
        from rankbench.report.leaderboard import markdown
        from rankbench.study.matched_runner import run_matched

        print(f"matched study {spec.name}: task {', '.join(spec.tasks)}, methods {', '.join(spec.methods)}, targets "
              f"{', '.join(f'{t:g}x' for t in spec.matched.targets)}, seeds {', '.join(map(str, spec.seeds))}",
              flush=True)
        board, paths = run_matched(spec, options=options, workers=args.workers, plugin_dirs=args.plugin_dir,
                                   out_dir=args.out)
        print(markdown(board))
        for path in paths:
            print(f"wrote: {path}")
        return
    print(f"study {spec.name}: task {', '.join(spec.tasks)}, methods {', '.join(spec.methods)}, "
          f"{spec.budget()} trials x "
          f"{len(spec.seeds)} seed(s), sampler {spec.sampler}, objectives "
          + ", ".join(f"{k} ({v})" for k, v in spec.objectives.items()), flush=True)
    if slurm is not None:
        from rankbench.study.launcher import describe_jobs, run_study_slurm

        launched = run_study_slurm(spec, storage_url=args.storage, workers=args.workers, options=options,
                                   plugin_dirs=args.plugin_dir, out_dir=args.out, slurm=slurm, detach=args.detach,
                                   say=lambda line: print(line, flush=True))
        if launched.outcome is None:
            return
        outcome = launched.outcome
        if launched.jobs:
            print(f"slurm jobs: {describe_jobs(launched.jobs, launched.states)}")
    else:
        outcome = studies.run_study(spec, storage_url=args.storage, workers=args.workers, options=options,
                                    plugin_dirs=args.plugin_dir, out_dir=args.out)
    rows = [[b["number"], ", ".join(f"{k}={v}" for k, v in b["params"].items()),
             *[f"{b[m]:.4g}" for m in spec.objectives],
             f"{b['test_accuracy']:.2f}" if b["test_accuracy"] is not None else ""] for b in outcome.best]
    print(f"{outcome.finished} trials finished, {outcome.failed} failed; best (validation) trials:")
    print(tabulate(rows, headers=["trial", "params", *spec.objectives, "test acc (recorded)"]))
    for path in outcome.plots or []:
        print(f"plot: {path}")


def main(argv: Sequence[str] | None = None) -> int:
    from rankbench.run.stopping import graceful_stop

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2, already printed)
        return int(exc.code or 0)
    with graceful_stop():  # SIGTERM (a scheduler's preemption) stops like Ctrl-C; a second signal waits
        return _command(args)


def _command(args: argparse.Namespace) -> int:
    try:
        from rankbench.plugins.registry import Registry

        registry = Registry.discover(plugin_dirs=args.plugin_dir)
        if args.command == "list":
            cmd_list(registry, args.recipes)
        elif args.command == "run":
            cmd_run(args, registry)
        elif args.command == "check-plugin":
            return cmd_check_plugin(args, registry)
        elif args.command == "study":
            cmd_study(args, registry)
        elif args.command == "report":
            cmd_report(args, registry)
        elif args.command == "export":
            cmd_export(args, registry)
        elif args.command == "leaderboard":
            cmd_leaderboard(args, registry)
        return 0
    except RankbenchError as exc:
        print(f"rankbench: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(interrupted_line(exc), file=sys.stderr)
        from rankbench.run.stopping import exit_code

        return exit_code(exc)
    except BrokenPipeError:  # the reader went away (rankbench list | head): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except SystemExit as exc:  # plugin code that exits: rankbench's own commands never call sys.exit
        print(f"rankbench: error: plugin code called sys.exit({exc.code!r}) during `rankbench {args.command}`: a "
              "plugin must raise an exception instead (finished runs are kept; the unfinished one is marked FAILED)",
              file=sys.stderr)
        return 2
    except Exception as exc:  # a bug, not bad input: one line, the traceback on request
        if os.environ.get("RANKBENCH_DEBUG"):
            raise
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"rankbench: internal error: {type(exc).__name__}: {text} (finished runs are kept; "
              "RANKBENCH_DEBUG=1 shows the traceback; please report it)", file=sys.stderr)
        return 1


def interrupted_line(exc: KeyboardInterrupt) -> str:
    """What a stop by Ctrl-C or SIGTERM says: which run is now KILLED and how to continue it."""
    from rankbench.run.stopping import signal_name

    by = "" if signal_name(exc) == "SIGINT" else f" by {signal_name(exc)}"
    stopped = getattr(exc, "stopped_run", None)
    if stopped is None:
        return f"rankbench: interrupted{by}; the unfinished run is marked KILLED, finished runs are kept"
    if stopped.refused is not None:
        return (f"rankbench: interrupted{by}; run {stopped.run_id} (seed {stopped.seed}) could not be marked KILLED "
                f"({stopped.refused}): it stays RUNNING until `rankbench report` finds its process gone; finished "
                "runs are kept")
    if stopped.study is not None:
        how = f"run the study file again (study {stopped.study}) to continue it"
    elif stopped.resumable:
        how = f"continue it with its own command line and --resume {stopped.run_id}"
    else:
        how = "it finished no epoch: start it again (without --resume)"
    return (f"rankbench: interrupted{by}; run {stopped.run_id} (seed {stopped.seed}) is marked KILLED, finished "
            f"runs are kept; {how}")


if __name__ == "__main__":
    sys.exit(main())
