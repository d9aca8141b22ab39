"""``rankbench study FILE --launcher slurm``: an Optuna study's workers as Slurm jobs, through submitit.

``--workers N`` submits N worker jobs as one job array. Each job runs the ordinary worker loop
(``runner.worker_loop``) on the study's shared storage (PostgreSQL, or an Optuna journal file on a
shared filesystem, ``journal:///path/study.log``; never SQLite, which is not safe across machines) and
logs its runs to the same MLflow tracking URI. The command then waits, showing the trials done, running
and failed and the jobs' states, until every job has ended; then it summarises and plots as a local
study does. ``--detach`` prints the job ids instead; the same command run again later (it submits only
what is missing) summarises.

Stops lose nothing, through the machinery local workers already have (a run checkpoints every epoch;
a stopped run ends KILLED with its checkpoint kept and its trial marked interrupted, which the next
worker loop retries, continuing the run from that checkpoint):

- ``SIGUSR2``, which Slurm sends ``signal_delay_s`` seconds before a job's time limit (``--signal``;
  also at preemption with ``PreemptParameters=send_user_signal``): the worker stops its run as above,
  then requeues its own job through submitit's ``Checkpointable`` (``SlurmWorker.checkpoint``
  returns a ``DelayedSubmission`` of the worker; submitit dumps it and runs ``scontrol requeue``).
  The requeued job (same job id) runs the worker loop again and continues the run.
- ``SIGTERM`` (``scancel``, a preemption that Slurm requeues or cancels itself, a time limit reached
  without the warning): the worker stops its run as above and exits. It does not requeue itself:
  ``scontrol requeue`` succeeds on a job being cancelled, so a self-requeue would undo ``scancel``.
  The interrupted trial is retried by any other worker still running, or by the next study command.

Only Optuna studies run here; a matched-compression study (``[matched]``) runs with ``--launcher local``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

from rankbench.errors import RankbenchError
from rankbench.run.config import RunOptions
from rankbench.run.tracking import DEFAULT_DIR, sqlite_database
from rankbench.study import runner
from rankbench.study.spec import SLURM_KEYS, StudySpec, check_slurm, slurm_minutes

LAUNCHERS = ("local", "slurm")
SLURM_COMMANDS = ("sbatch", "srun", "squeue", "scontrol", "sinfo")
"""What a study on Slurm needs on PATH: submitit submits with sbatch and starts each worker with srun;
the command follows its jobs with squeue (sacct where accounting is on) and checks the partition with sinfo."""
ACTIVE_STATES = frozenset({
    "PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SUSPENDED", "COMPLETING",
    "CONFIGURING", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD", "STOPPED", "SPECIAL_EXIT",
})
"""Slurm job states of a job that has not ended; any other state is final."""
DEFAULT_SIGNAL_DELAY_S = 90
"""submitit's default: ``--signal=USR2@90``, capped at a quarter of a shorter time limit."""
DEFAULT_MAX_REQUEUES = 20
"""Times a worker job may requeue itself at its time limit: a worker runs trials until the budget is
spent, so a long study hits its jobs' limits often; a job that keeps hitting it without progress stops."""
POLL_ENV = "RANKBENCH_SLURM_POLL_S"
"""Seconds between two looks at the jobs and the storage while the command waits (default 10)."""
FLAG_KEYS = ("partition", "time", "cpus_per_task", "mem", "gres", "account")
"""The Slurm options with their own flag (``--slurm-partition`` ...)."""


# ---------------------------------------------------------------------------- options
@dataclass(frozen=True)
class SlurmOptions:
    """Where and how the worker jobs run: the study file's ``[slurm]`` table, then ``--slurm-arg``,
    then the ``--slurm-*`` flags (the flags win)."""

    partition: str | None = None
    time: str | int | None = None
    cpus_per_task: int | None = None
    mem: str | None = None
    gres: str | None = None
    account: str | None = None
    signal_delay_s: int | None = None
    max_requeues: int = DEFAULT_MAX_REQUEUES
    setup: tuple[str, ...] = ()
    args: dict[str, Any] = field(default_factory=dict)

    @property
    def minutes(self) -> int | None:
        """The time limit in whole minutes (None: not given, or unlimited)."""
        return None if self.time is None else slurm_minutes(self.time, "--slurm-time")

    def signal_delay(self) -> int:
        """Seconds before the time limit at which Slurm sends ``SIGUSR2`` (the worker checkpoints and requeues)."""
        if self.signal_delay_s is not None:
            return self.signal_delay_s
        minutes = self.minutes
        return DEFAULT_SIGNAL_DELAY_S if minutes is None else max(5, min(DEFAULT_SIGNAL_DELAY_S, minutes * 15))


def slurm_options(table: Mapping[str, Any] | None = None, flags: Mapping[str, Any] | None = None,
                  extra: Sequence[str] = ()) -> SlurmOptions:
    """Merge the file's ``[slurm]`` table (checked already), ``--slurm-arg KEY=VALUE`` (a key of the table
    sets it, e.g. ``time=00:30:00``; any other is passed to sbatch as ``--KEY=VALUE``) and the flags."""
    values: dict[str, Any] = dict(table or {})
    args = dict(values.pop("args", {}))
    given: dict[str, Any] = {}
    for item in extra:
        key, sep, value = item.partition("=")
        key = key.strip().lstrip("-")
        if not sep or not key or not value.strip():
            raise RankbenchError(f"--slurm-arg {item!r}: write KEY=VALUE, e.g. --slurm-arg qos=long")
        name = key.replace("-", "_")
        if name in SLURM_KEYS and name not in ("setup", "args"):
            given[name] = value.strip()
        else:
            args[key.replace("_", "-")] = value.strip()
    values.update(check_slurm(given, "--slurm-arg", parse=True))
    chosen = {k: v for k, v in (flags or {}).items() if v is not None}
    for key, value in chosen.items():
        values.update(check_slurm({key: value}, f"--slurm-{key.replace('_', '-')}", parse=True))
    return SlurmOptions(
        partition=values.get("partition"), time=values.get("time"), cpus_per_task=values.get("cpus_per_task"),
        mem=values.get("mem"), gres=values.get("gres"), account=values.get("account"),
        signal_delay_s=values.get("signal_delay_s"), max_requeues=values.get("max_requeues", DEFAULT_MAX_REQUEUES),
        setup=tuple(values.get("setup", ())), args=args,
    )


# ---------------------------------------------------------------------------- checks before submitting
def check_slurm_storage(url: str | None) -> str:
    """The storage URL the jobs share: PostgreSQL (or another server database) or a journal file; SQLite,
    the default, is refused (its locks do not hold across machines)."""
    if url is None or url.startswith("sqlite"):
        shown = url or "the default, sqlite:///rankbench-runs/optuna.db"
        raise RankbenchError(f"--launcher slurm: SQLite storage ({shown}) is not safe across machines: give "
                             "--storage postgresql://USER@HOST/DB or --storage journal:///SHARED/PATH/optuna.log "
                             "(docs/cluster.md)")
    return runner.normalised_storage(url)


def check_commands() -> None:
    """Slurm's commands are on PATH (this runs on a login node, or a node of the cluster)."""
    missing = [c for c in SLURM_COMMANDS if shutil.which(c) is None]
    if missing:
        first = "no sbatch on PATH" if "sbatch" in missing else f"no {', '.join(missing)} on PATH"
        raise RankbenchError(f"--launcher slurm: {first}: run on a Slurm login node (or load Slurm's module, "
                             "e.g. `module load slurm`), or use --launcher local")


def _command(argv: Sequence[str], timeout: float = 60) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RankbenchError(f"`{' '.join(argv)}` failed ({type(exc).__name__}: {exc}): is Slurm's controller "
                             "reachable from here?") from None


def _first_line(text: str) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[0] if lines else ""


@dataclass(frozen=True)
class Partition:
    name: str
    default: bool
    max_time: str
    default_time: str


def partitions() -> list[Partition]:
    """The cluster's partitions (``sinfo -h -o %P|%l|%L``): name, whether default, time limit and default time."""
    proc = _command(["sinfo", "-h", "-o", "%P|%l|%L"])
    if proc.returncode != 0:
        raise RankbenchError(f"--launcher slurm: sinfo failed ({_first_line(proc.stderr) or proc.returncode}): is "
                             "Slurm's controller reachable from here?")
    out: dict[str, Partition] = {}
    for line in proc.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) != 3 or not parts[0]:
            continue
        name = parts[0].rstrip("*")
        out.setdefault(name, Partition(name, parts[0].endswith("*"), parts[1], parts[2]))
    return list(out.values())


def check_partition(options: SlurmOptions) -> Partition | None:
    """The partition the jobs go to (the cluster's default one when none is given); an unknown one is an error."""
    found = partitions()
    if options.partition is None:
        return next((p for p in found if p.default), None)
    for p in found:
        if p.name == options.partition:
            return p
    names = ", ".join(p.name for p in found) or "none"
    raise RankbenchError(f"--slurm-partition {options.partition}: no such partition on this cluster (it has "
                         f"{names}): fix [slurm] partition or --slurm-partition")


def partition_time(partition: Partition | None) -> str | None:
    """The time limit a job without ``--time`` gets: the partition's default time, else its limit."""
    if partition is None:
        return None
    for value in (partition.default_time, partition.max_time):
        if value and value.lower() not in ("n/a", "none", ""):
            return "UNLIMITED" if value.lower() in ("infinite", "unlimited") else value
    return None


# ---------------------------------------------------------------------------- the worker job
def current_job() -> str | None:
    """This process's Slurm job as squeue names it: ``ARRAY_TASK`` for a job array's task, else the job id."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID")


try:  # submitit is an optional dependency (the ``cluster`` extra): the worker class needs it, the rest does not
    from submitit.helpers import Checkpointable as _Base
    from submitit.helpers import DelayedSubmission as _Delayed
except ImportError:  # pragma: no cover - without submitit, --launcher slurm says how to install it
    _Base, _Delayed = object, None  # type: ignore


class SlurmWorker(_Base):  # type: ignore[misc, valid-type]
    """One worker job: the study's ordinary worker loop, stoppable by Slurm's signals without loss.

    A ``submitit.helpers.Checkpointable``: on ``SIGUSR2`` (time limit ahead, or preemption with the user
    signal) the run in progress is stopped (KILLED, its last epoch's checkpoint kept, the trial marked
    interrupted), then submitit calls ``checkpoint``, dumps its ``DelayedSubmission`` and requeues the job,
    which calls this worker again: its loop retries the interrupted trial and continues the run from the
    checkpoint. On ``SIGTERM`` the run is stopped the same way and the job exits (see the module's doc)."""

    def __init__(self, run: runner.StudyRun, deadline: float | None, cwd: str) -> None:
        self.run = run
        self.deadline = deadline
        self.cwd = cwd

    def checkpoint(self, *args: Any, **kwargs: Any):
        """The same worker, resubmitted: its state is the study's storage and the runs' checkpoints."""
        return _Delayed(self, *args, **kwargs)

    def __call__(self) -> int:
        import signal

        from rankbench.run.stopping import Stopped, exit_code, graceful_stop

        os.chdir(self.cwd)  # relative paths (rankbench-runs/checkpoints, the data) as on the submitting node
        import torch

        runner.quiet_optuna()
        torch.set_num_threads(self.run.options.threads or int(os.environ.get("SLURM_CPUS_PER_TASK", "1") or 1))
        run = replace(self.run, job=current_job())
        restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
        print(f"rankbench: worker {run.worker} of study {run.spec.name} in Slurm job {run.job} (restart {restarts})",
              file=sys.stderr, flush=True)
        main = threading.current_thread() is threading.main_thread()
        requeue = signal.getsignal(signal.SIGUSR2) if main else None  # submitit's checkpoint_and_try_requeue
        with graceful_stop() as state:
            if main:
                def on_usr2(signum: int, frame: Any) -> None:  # as graceful_stop's handler, for SIGUSR2
                    if state.signum is not None:
                        state.ignored += 1
                        return
                    state.signum = signum
                    raise Stopped(signum)

                signal.signal(signal.SIGUSR2, on_usr2)
            try:
                return runner.worker_loop(run, self.deadline)
            except KeyboardInterrupt as exc:
                name = getattr(exc, "signal_name", "SIGINT")
                stopped = getattr(exc, "stopped_run", None)
                what = ("no run was training" if stopped is None else
                        f"run {stopped.run_id} stopped at its last checkpoint" if stopped.resumable else
                        f"run {stopped.run_id} stopped before its first checkpoint (it starts again)")
                if getattr(exc, "signum", None) == signal.SIGUSR2 and callable(requeue):
                    print(f"rankbench: {name} (time limit or preemption ahead): {what}; requeueing job {run.job}",
                          file=sys.stderr, flush=True)
                    requeue(signal.SIGUSR2, None)  # dumps self.checkpoint(), `scontrol requeue`, exits
                print(f"rankbench: {name}: {what}; its trial is retried by another worker or the next study "
                      "command", file=sys.stderr, flush=True)
                raise SystemExit(exit_code(exc)) from None
            except RankbenchError as exc:
                print(f"rankbench: error: {exc}", file=sys.stderr, flush=True)
                raise
            finally:
                if main:
                    signal.signal(signal.SIGUSR2, requeue if requeue is not None else signal.SIG_DFL)


# ---------------------------------------------------------------------------- submitting
def _submitit():
    try:
        import submitit
    except ImportError:
        raise RankbenchError("--launcher slurm needs submitit: pip install 'rankbench[cluster]' (or pip install "
                             "submitit)") from None
    return submitit


def job_folder(spec: StudySpec) -> Path:
    """Where submitit keeps the jobs' scripts, pickles and logs: ``rankbench-runs/slurm/NAME`` (shared)."""
    return (DEFAULT_DIR / "slurm" / spec.name).resolve()


def make_executor(folder: Path, options: SlurmOptions, name: str, partition: Partition | None):
    """A ``submitit.SlurmExecutor`` with the study's Slurm options."""
    submitit = _submitit()
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=options.max_requeues)
    params: dict[str, Any] = {"job_name": f"rankbench-{name}", "signal_delay_s": options.signal_delay(),
                              "partition": options.partition, "cpus_per_task": options.cpus_per_task,
                              "account": options.account, "gres": options.gres, "setup": list(options.setup) or None}
    extra = dict(options.args)
    if options.mem is not None:
        extra["mem"] = options.mem  # as given (submitit's own mem takes GB as a number)
    minutes = options.minutes
    if minutes is not None:
        params["time"] = minutes  # submitit's time: whole minutes (it also times its requeues by it)
    else:  # submitit writes --time=5 unless told: give what Slurm would have given
        limit = options.time if options.time is not None else partition_time(partition)
        if limit is None:
            raise RankbenchError("--launcher slurm: the partition has no default time limit: give one with "
                                 "[slurm] time or --slurm-time, e.g. --slurm-time 04:00:00")
        extra["time"] = "UNLIMITED" if str(limit).upper() in ("INFINITE", "UNLIMITED") else limit
    if extra:
        params["additional_parameters"] = extra
    try:
        executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
    except ValueError as exc:
        raise RankbenchError(f"--launcher slurm: {_first_line(str(exc))}") from None
    return executor


def check_submission(executor, folder: Path) -> None:
    """``sbatch --test-only`` on a script with the jobs' options: a bad account, gres, time limit above the
    partition's or unknown option is one line now, before any job or storage exists."""
    from submitit.slurm.slurm import _make_sbatch_string

    folder.mkdir(parents=True, exist_ok=True)
    script = folder / ".rankbench-test-only.sh"
    script.write_text(_make_sbatch_string(command="true", folder=folder, **executor.parameters))
    try:
        proc = _command(["sbatch", "--test-only", str(script)])
    finally:
        script.unlink(missing_ok=True)
    if proc.returncode != 0:
        reason = _first_line(proc.stderr).removeprefix("sbatch: error: ") or f"exit {proc.returncode}"
        raise RankbenchError(f"--launcher slurm: sbatch refuses the worker jobs ({reason}): fix [slurm] or the "
                             "--slurm-* options")


def submit(executor, run: runner.StudyRun, first: int, count: int, deadline: float | None, cwd: Path) -> list[str]:
    """Submit ``count`` workers (numbered from ``first``) as one job array; their job ids."""
    submitit = _submitit()
    try:
        with executor.batch():
            jobs = [executor.submit(SlurmWorker(replace(run, worker=first + i), deadline, str(cwd)))
                    for i in range(count)]
    except (submitit.core.utils.FailedJobError, submitit.core.utils.FailedSubmissionError) as exc:
        raise RankbenchError(f"--launcher slurm: sbatch failed: {_first_line(str(exc))}") from None
    return [str(job.job_id) for job in jobs]


# ---------------------------------------------------------------------------- following the jobs
def _final_state(text: str) -> str:
    return text.split()[0].rstrip("+") if text.split() else "UNKNOWN"


def _squeue(ids: Sequence[str]) -> dict[str, str]:
    bases = sorted({i.split("_")[0] for i in ids})
    out: dict[str, str] = {}

    def ask(chunk: Sequence[str]) -> bool:
        proc = _command(["squeue", "-h", "-r", "--states=all", "-o", "%i|%T", "-j", ",".join(chunk)])
        if proc.returncode != 0:
            return False
        for line in proc.stdout.splitlines():
            job, _, state = line.strip().partition("|")
            if job and state:
                out[job] = _final_state(state)
        return True

    if bases and not ask(bases):  # an id Slurm has forgotten fails the whole query: ask one by one
        for base in bases:
            ask([base])
    return out


def _sacct(ids: Sequence[str]) -> dict[str, str]:
    if not ids or shutil.which("sacct") is None:
        return {}
    proc = _command(["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ",".join(sorted(set(ids)))])
    if proc.returncode != 0:  # accounting disabled
        return {}
    out = {}
    for line in proc.stdout.splitlines():
        job, _, state = line.strip().partition("|")
        if job and state:
            out[job] = _final_state(state)
    return out


def _result(job: Mapping[str, Any]) -> tuple[str, str] | None:
    """submitit's result file of a job that ended: ``("success", n)`` or ``("error", traceback)``."""
    with contextlib.suppress(Exception):
        from submitit.core.utils import JobPaths, pickle_load

        path = JobPaths(job["folder"], job_id=job["job"], task_id=0).result_pickle
        if path.exists():
            kind, value = pickle_load(path)
            return str(kind), str(value)
    return None


def job_states(jobs: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """Job id → its Slurm state: squeue while Slurm remembers the job, else sacct (where accounting is on),
    else submitit's result file (``COMPLETED``, ``FAILED``), else ``ENDED``; ``?`` without Slurm's commands."""
    ids = [str(j["job"]) for j in jobs]
    if not ids:
        return {}
    if shutil.which("squeue") is None:
        return {i: "?" for i in ids}
    found = _squeue(ids)
    missing = [i for i in ids if i not in found]
    found.update(_sacct(missing))
    for job in jobs:
        if str(job["job"]) not in found:
            result = _result(job)
            found[str(job["job"])] = ("ENDED" if result is None
                                      else "COMPLETED" if result[0] == "success" else "FAILED")
    return {i: found[i] for i in ids}


def job_error(job: Mapping[str, Any]) -> str:
    """Why a worker job failed, in one line: the error of its result file, else the last line of its stderr."""
    result = _result(job)
    if result is not None and result[0] == "error":
        line = [x for x in result[1].strip().splitlines() if x.strip()][-1:] or [""]
        return line[0].strip().removeprefix("rankbench.errors.RankbenchError: ")
    with contextlib.suppress(Exception):
        from submitit.core.utils import JobPaths

        lines = [x for x in JobPaths(job["folder"], job_id=job["job"], task_id=0).stderr.read_text(
            errors="replace").splitlines() if x.strip() and not x.startswith("submitit ")]
        if lines:
            return lines[-1].strip()
    return ""


def describe_states(states: Mapping[str, str]) -> str:
    """``2 RUNNING, 1 PENDING`` (counts by state, in the order first seen)."""
    counts: dict[str, int] = {}
    for state in states.values():
        counts[state] = counts.get(state, 0) + 1
    return ", ".join(f"{n} {state}" for state, n in counts.items()) or "none"


def describe_jobs(jobs: Sequence[Mapping[str, Any]], states: Mapping[str, str] | None = None) -> str:
    """``123_0 RUNNING, 123_1 CANCELLED`` (at most 6 listed, then a count by state)."""
    states = job_states(jobs) if states is None else states
    if len(states) <= 6:
        return ", ".join(f"{job} {state}" for job, state in states.items())
    return f"{len(states)} jobs: {describe_states(states)}"


def _trial_counts(study) -> tuple[int, int, int]:
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    done = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    running = sum(t.state == TrialState.RUNNING for t in trials)
    failed = sum(t.state == TrialState.FAIL for t in trials)
    return done, running, failed


def wait_for_jobs(study, jobs: Sequence[Mapping[str, Any]], budget: int, stream: TextIO | None = None,
                  poll_s: float | None = None) -> dict[str, str]:
    """Show progress (a tqdm bar on a terminal, a line per change otherwise) until every job has ended;
    the jobs' final states."""
    from tqdm import tqdm

    stream = stream or sys.stderr
    poll = poll_s if poll_s is not None else float(os.environ.get(POLL_ENV) or 10)
    tty = hasattr(stream, "isatty") and stream.isatty()
    bar = tqdm(total=budget, desc="trials", unit="trial", file=stream, disable=not tty, dynamic_ncols=True)
    last = None
    try:
        while True:
            states = job_states(jobs)
            done, running, failed = _trial_counts(study)
            text = f"{done}/{budget} trials done, {running} running, {failed} failed; jobs: {describe_states(states)}"
            bar.n = min(done, budget)
            bar.set_postfix_str(f"{running} running, {failed} failed; jobs: {describe_states(states)}", refresh=True)
            if not tty and text != last:
                print(f"rankbench: {text}", file=stream, flush=True)
                last = text
            if all(state not in ACTIVE_STATES for state in states.values()):
                time.sleep(min(poll, 3.0))  # a state between two (a requeue) must not end the wait
                again = job_states(jobs)
                if all(state not in ACTIVE_STATES for state in again.values()):
                    return again
                continue
            time.sleep(poll)
    finally:
        bar.close()


# ---------------------------------------------------------------------------- the command
@dataclass
class SlurmOutcome:
    """What ``run_study_slurm`` did: the jobs of this command (``submitted``) and all the study's jobs with
    their states; ``outcome`` once the study is summarised (None with ``--detach``)."""

    submitted: list[str]
    jobs: list[dict[str, Any]]
    states: dict[str, str]
    folder: Path
    outcome: runner.StudyOutcome | None = None
    partition: str | None = None


def preflight(spec: StudySpec, storage_url: str | None, slurm: SlurmOptions,
              workers: int) -> tuple[str, Partition | None, Any, Path]:
    """Every check that needs no storage and submits nothing: the storage kind, Slurm's commands, the
    partition, submitit and ``sbatch --test-only``; the storage URL, the partition, the executor, the job folder."""
    if spec.matched is not None:
        raise RankbenchError(f"--launcher slurm: {spec.name} is a matched-compression study: the Slurm launcher "
                             "runs Optuna studies only: run it with --launcher local")
    if spec.progressive is not None:
        raise RankbenchError(f"--launcher slurm: {spec.name} is a progressive study (its phases follow one another "
                             "in one command): run it with --launcher local")
    if workers < 1:
        raise RankbenchError("--workers must be >= 1")
    url = check_slurm_storage(storage_url)
    runner.check_sqlite_storage(url)
    check_commands()
    partition = check_partition(slurm)
    _submitit()
    folder = job_folder(spec)
    executor = make_executor(folder, slurm, spec.name, partition)
    check_submission(executor, folder)
    return url, partition, executor, folder


def run_study_slurm(spec: StudySpec, *, storage_url: str | None, workers: int, options: RunOptions | None = None,
                    plugin_dirs: Sequence[Path] = (), out_dir: Path | None = None, slurm: SlurmOptions | None = None,
                    detach: bool = False, say: Callable[[str], None] = print,
                    progress: TextIO | None = None) -> SlurmOutcome:
    """Submit the study's workers as Slurm jobs (topping up to ``workers`` live jobs), then wait for them and
    summarise, or return at once with ``detach``. Everything is checked before anything is submitted."""
    slurm = slurm or SlurmOptions()
    spec, options = runner.study_options(spec, options)
    url, partition, executor, folder = preflight(spec, storage_url, slurm, workers)
    cwd = Path.cwd()
    if options.data_dir is not None:
        options = replace(options, data_dir=Path(options.data_dir).absolute())
    plugin_dirs = tuple(Path(p).absolute() for p in plugin_dirs)
    with runner._stoppable():
        opened = runner.open_study(spec, url, options, plugin_dirs)
        tracker, parent = opened.tracker, opened.run.parent_run_id
        database = sqlite_database(tracker.uri)
        if database is not None:
            print(f"rankbench: warning: the tracking store {tracker.uri} is a SQLite file: jobs on several nodes "
                  "need it on a shared filesystem with working locks; an MLflow server is safer "
                  "(docs/cluster.md)", file=sys.stderr, flush=True)
        try:
            result = _launch(opened, executor, folder, cwd, workers, detach, partition, say, progress)
        except KeyboardInterrupt:
            tracker.terminate(parent, "KILLED")
            jobs = opened.study.user_attrs.get(runner.SLURM_JOBS_ATTR, [])
            live = [j for j, s in job_states(jobs).items() if s in ACTIVE_STATES]
            if live:
                print(f"rankbench: stopped waiting; Slurm jobs {', '.join(live)} run on (scancel "
                      f"{' '.join(sorted({j.split('_')[0] for j in live}))} stops them); run the study command again "
                      "to follow them", file=sys.stderr, flush=True)
            raise
        except Exception:
            tracker.terminate(parent, "FAILED")
            raise
        if detach:
            tracker.set_tags(parent, {"slurm_jobs": ",".join(result.submitted)[:5000]})
            tracker.terminate(parent, "KILLED")  # resumed (reopened) by the next study command
            return result
        done, _, _ = _trial_counts(opened.study)
        if done < spec.budget():
            tracker.terminate(parent, "FAILED")
            bad = [j for j in result.jobs if result.states.get(j["job"]) not in ("COMPLETED",)]
            why = next((job_error(j) for j in bad if job_error(j)), "")
            raise RankbenchError(
                f"study {spec.name}: its Slurm jobs ended ({describe_jobs(result.jobs, result.states)}) with {done} of "
                f"{spec.budget()} trials finished{f' ({why})' if why else ''}: logs in {folder}; run the same command "
                "again to resume")
        result.outcome = runner.finish_study(opened, out_dir)
        return result


def _launch(opened: runner.OpenedStudy, executor, folder: Path, cwd: Path, workers: int, detach: bool,
            partition: Partition | None, say: Callable[[str], None], progress: TextIO | None) -> SlurmOutcome:
    study, spec = opened.study, opened.run.spec
    recorded = [dict(j) for j in study.user_attrs.get(runner.SLURM_JOBS_ATTR, []) if isinstance(j, dict)]
    states = job_states(recorded)
    live = [j for j in recorded if states.get(j["job"]) in ACTIVE_STATES]
    done, _, _ = _trial_counts(study)
    budget = spec.budget()
    wanted = 0 if done >= budget else max(0, workers - len(live))
    if live:
        say(f"study {spec.name}: {len(live)} worker job(s) still live ({describe_jobs(live, states)}): "
            f"{'submitting ' + str(wanted) + ' more' if wanted else 'submitting none'}")
    submitted: list[str] = []
    if wanted:
        with runner.storage_lock(opened.run.storage_url, opened.storage):  # worker numbers (sampler seeds) unique
            first = len(recorded)
            submitted = submit(executor, opened.run, first, wanted, opened.deadline, cwd)
            recorded = [dict(j) for j in study.user_attrs.get(runner.SLURM_JOBS_ATTR, []) if isinstance(j, dict)]
            recorded += [{"job": job, "folder": str(folder), "submitted": time.time()} for job in submitted]
            study.set_user_attr(runner.SLURM_JOBS_ATTR, recorded)
        where = partition.name if partition is not None else "the default partition"
        say(f"study {spec.name}: submitted {len(submitted)} worker job(s) {', '.join(submitted)} to {where}; "
            f"logs in {folder}")
    elif done >= budget:
        say(f"study {spec.name}: all {budget} trials are finished: nothing to submit")
    jobs = live + [j for j in recorded if j["job"] in submitted]
    if detach:
        ids = " ".join(sorted({j.split("_")[0] for j in submitted})) or "-"
        say(f"detached: follow with `rankbench study --list --storage {runner.shown_url(opened.run.storage_url)}` or "
            f"`squeue -j {ids.replace(' ', ',')}`; stop with `scancel {ids}`; run this command again when they "
            "end to summarise")
        return SlurmOutcome(submitted, jobs, job_states(jobs), folder, partition=partition and partition.name)
    final = wait_for_jobs(study, jobs, budget, progress) if jobs else {}
    return SlurmOutcome(submitted, jobs, final, folder, partition=partition and partition.name)
