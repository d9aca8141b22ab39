"""``rankbench study FILE --launcher slurm``: a study's workers as Slurm jobs (rankbench.study.launcher).

The Slurm tests run on a real, throwaway Slurm cluster of one node (the ``slurm`` fixture): Debian's
``slurm-wlm`` and ``munge`` (``.ci/debian.sh`` installs them), a ``slurm.conf`` written into a temporary
folder, ``munged`` with a generated key, ``slurmctld`` and ``slurmd`` started here and stopped at the
end; ``SLURM_CONF`` points every Slurm command of the tests (and of the jobs) at it. Without the packages,
or without root (the daemons run as root, ``SlurmUser=root``), those tests skip saying why.

Trials are tiny (``mlp2`` on a random 200/40-example IDX dataset, seed 0); ``slurm_slow``
(tests/plugins_slurm) sleeps per step from its second epoch in a run's first attempt, so a worker can be
stopped mid-trial; a resumed run is fast. Slurm holds a requeued job for 120 s before it may start again
(its fixed ``BeginTime`` of a requeue); the tests release such a job at once (``scontrol update
StartTime=now``), which changes nothing else.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from helpers import assert_one_line_error, make_tiny_mnist
from rankbench.cli import main
from rankbench.errors import RankbenchError

PLUGINS = Path(__file__).resolve().parent / "plugins_slurm"
SLURM_BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "squeue", "scontrol", "scancel", "sinfo")
NO_SLURM = ("Slurm is not installed (no {}): "
            "`bash .ci/debian.sh --no-service-start /usr/sbin/slurmd slurm-wlm munge` installs them")
EPOCHS = 4
LAMBDAS = (0.1, 1.0)
TIMING = ("seconds",)
"""Metrics holding a duration: they differ between any two runs; every other metric must agree bit for bit."""


# ---------------------------------------------------------------------------- a throwaway Slurm cluster
def _binary(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_resources() -> tuple[int, int]:
    """(CPUs, RealMemory in MB) as slurmd sees this machine (``slurmd -C``), else as Python does."""
    cpus, memory = os.cpu_count() or 1, 1024
    with contextlib.suppress(Exception):
        memory = int(int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1)) / 1024)
    with contextlib.suppress(Exception):
        out = subprocess.run([_binary("slurmd"), "-C"], capture_output=True, text=True, timeout=30).stdout
        cpus = int(re.search(r"CPUs=(\d+)", out).group(1))
        memory = int(re.search(r"RealMemory=(\d+)", out).group(1))
    return cpus, max(256, int(memory * 0.9))


SLURM_CONF = """\
ClusterName=rankbench-test
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
AuthType=auth/munge
AuthInfo=socket={base}/munge/munge.sock
CredType=cred/munge
StateSaveLocation={base}/state
SlurmdSpoolDir={base}/spool
SlurmctldPidFile={base}/slurmctld.pid
SlurmdPidFile={base}/slurmd.pid
SlurmctldLogFile={base}/log/slurmctld.log
SlurmdLogFile={base}/log/slurmd.log
PlugStackConfig={base}/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
ReturnToService=2
# a short grace between SIGTERM and SIGKILL, no slack past a time limit
KillWait=5
OverTimeLimit=0
InactiveLimit=0
# ended jobs stay visible to squeue (no accounting here) for 10 minutes
MinJobAge=600
NodeName=localhost NodeHostname={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""

# Kills the daemons once its stdin closes: when the fixture ends, and also when pytest dies without running
# the fixture's teardown, so no Slurm daemon is ever left running. Only processes whose command line names
# the cluster's folder (its config, its key) are signalled.
_WATCHDOG = r"""
import os, shutil, signal, sys, time
base, pids = sys.argv[1], [int(p) for p in sys.argv[2:]]
sys.stdin.buffer.read()
def ours(pid):
    try:
        return base.encode() in open(f"/proc/{pid}/cmdline", "rb").read()
    except OSError:
        return False
for sig in (signal.SIGTERM, signal.SIGKILL):
    for pid in pids:
        if ours(pid):
            try:
                os.kill(pid, sig)
            except OSError:
                pass
    time.sleep(2)
shutil.rmtree(base, ignore_errors=True)
"""


class SlurmCluster:
    """The test cluster: its config, and the Slurm commands run against it."""

    def __init__(self, base: Path, conf: Path) -> None:
        self.base, self.conf = base, conf
        self.env = {**os.environ, "SLURM_CONF": str(conf)}

    def run(self, *cmd: str, check: bool = True) -> str:
        proc = subprocess.run([_binary(cmd[0]) or cmd[0], *cmd[1:]], capture_output=True, text=True,
                              env=self.env, timeout=60)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr}")
        return proc.stdout

    def jobs(self) -> dict[str, tuple[str, str]]:
        """Every job Slurm knows (ended ones too): id -> (state, reason)."""
        out = self.run("squeue", "-h", "-r", "--states=all", "-o", "%i|%T|%r")
        return {line.split("|")[0]: tuple(line.split("|")[1:3]) for line in out.splitlines() if line.count("|") == 2}

    def live_jobs(self) -> list[str]:
        from rankbench.study.launcher import ACTIVE_STATES

        return [job for job, (state, _) in self.jobs().items() if state in ACTIVE_STATES]

    def release_requeued(self) -> list[str]:
        """Start requeued jobs now instead of after Slurm's fixed 120 s hold (``Reason=BeginTime``)."""
        held = [job for job, (state, reason) in self.jobs().items() if state == "PENDING" and reason == "BeginTime"]
        for job in held:
            self.run("scontrol", "update", f"JobId={job}", "StartTime=now", check=False)
        return held

    def restarts(self, job: str) -> int:
        out = self.run("scontrol", "show", "job", job.split("_")[0], check=False)
        return max([int(n) for n in re.findall(r"Restarts=(\d+)", out)] or [0])

    def cancel_all(self) -> None:
        jobs = sorted({job.split("_")[0] for job in self.live_jobs()})
        if jobs:
            self.run("scancel", *jobs, check=False)
        deadline = time.monotonic() + 30
        while self.live_jobs() and time.monotonic() < deadline:
            time.sleep(0.5)


def _tail(path: Path, n: int = 3) -> str:
    with contextlib.suppress(OSError):
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
        return " | ".join(lines[-n:])
    return ""


@pytest.fixture(scope="module")
def slurm():
    """A one-node Slurm cluster (partition ``debug``) for this module, or a skip that says why not."""
    for name in SLURM_BINARIES:
        if _binary(name) is None:
            pytest.skip(NO_SLURM.format(name))
    if os.geteuid() != 0:
        pytest.skip("the Slurm daemons of the test cluster run as root (SlurmUser=root): run the tests as root")
    base = Path(tempfile.mkdtemp(prefix="rb-slurm-", dir="/tmp"))  # short: the munge socket's path is limited
    for sub in ("munge", "state", "spool", "log"):
        (base / sub).mkdir()
    os.chmod(base / "munge", 0o700)
    key = base / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    os.chmod(key, 0o400)
    (base / "plugstack.conf").write_text("")
    cpus, memory = _node_resources()
    host = socket.gethostname().split(".")[0]
    conf = base / "slurm.conf"
    conf.write_text(SLURM_CONF.format(host=host, base=base, ctld_port=_free_port(), d_port=_free_port(), cpus=cpus,
                                      memory=memory))
    cluster = SlurmCluster(base, conf)
    procs: list[subprocess.Popen] = []

    def start(*cmd: str, log: str) -> subprocess.Popen:
        with open(base / "log" / log, "wb") as out:
            proc = subprocess.Popen([_binary(cmd[0]), *cmd[1:]], stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=cluster.env, cwd=base, start_new_session=True)
        procs.append(proc)
        return proc

    watchdog = None
    try:
        start("munged", "-F", "-f", f"--key-file={key}", f"--socket={base}/munge/munge.sock",
              f"--pid-file={base}/munge/munged.pid", f"--log-file={base}/munge/munged.log",
              f"--seed-file={base}/munge/munged.seed", "--num-threads=4", log="munged.out")
        deadline = time.monotonic() + 20
        while not (base / "munge" / "munge.sock").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        if not (base / "munge" / "munge.sock").exists():
            pytest.skip(f"munged did not start: {_tail(base / 'log' / 'munged.out')}")
        start("slurmctld", "-D", "-f", str(conf), log="slurmctld.out")
        time.sleep(1)
        start("slurmd", "-D", "-N", "localhost", "-f", str(conf), log="slurmd.out")
        watchdog = subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(base), *(str(p.pid) for p in procs)],
                                    stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    start_new_session=True)
        deadline = time.monotonic() + 90
        state = ""
        while time.monotonic() < deadline:
            state = cluster.run("sinfo", "-h", "-n", "localhost", "-o", "%t", check=False).strip()
            if state == "idle" or any(p.poll() is not None for p in procs):
                break
            time.sleep(0.5)
        if state != "idle":
            dead = [Path(p.args[0]).name for p in procs if p.poll() is not None]
            logs = "; ".join(f"{name}: {_tail(base / 'log' / name, 2)}" for name in ("slurmctld.log", "slurmd.log"))
            pytest.skip(f"the test cluster's node did not become idle within 90 s (sinfo: {state or 'nothing'}; "
                        f"exited: {', '.join(dead) or 'none'}; {logs})")
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("SLURM_CONF", str(conf))
            mp.setenv("RANKBENCH_SLURM_POLL_S", "1")
            yield cluster
    finally:
        with contextlib.suppress(Exception):
            cluster.cancel_all()
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in reversed(procs):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=20)
        if watchdog is not None:
            watchdog.stdin.close()
            watchdog.wait(timeout=60)
        shutil.rmtree(base, ignore_errors=True)


# ---------------------------------------------------------------------------- studies and stores
@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_tiny_mnist(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def mlflow_template(tmp_path_factory) -> Path:
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow") / "template.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


def study_file(folder: Path, name: str, *, lambdas=LAMBDAS, method: str = "slurm_slow", extra: str = "") -> Path:
    path = folder / f"{name}.toml"
    path.write_text("\n".join([
        f'name = "{name}"', 'task = "mlp2"', f'methods = ["{method}"]', "",
        "[search.lambda]", f"grid = {json.dumps(list(lambdas))}", "",
        "[objectives]", 'val_loss = "minimize"', "",
        "[sampler]", 'name = "grid"', "",
        "[workers]", "heartbeat_interval = 2", "grace_period = 20", "", extra, ""]))
    return path


class Stores:
    """One test's stores under ``root``: a journal Optuna storage and a SQLite MLflow store (copied from the
    template); ``argv`` builds a ``rankbench study`` command line."""

    def __init__(self, root: Path, data_dir: Path, template: Path) -> None:
        self.root, self.data_dir = root, data_dir
        shutil.copyfile(template, root / "mlflow.db")
        self.uri = f"sqlite:///{root / 'mlflow.db'}"
        self.storage = f"journal://{root / 'optuna.log'}"

    def argv(self, path: Path, *extra: str, storage: str | None = None, uri: str | None = None,
             epochs: int = EPOCHS) -> list[str]:
        return ["study", str(path), "--storage", storage or self.storage, "--tracking-uri", uri or self.uri,
                "--out", str(self.root / "plots"), "--data-dir", str(self.data_dir), "--plugin-dir", str(PLUGINS),
                "--set", "val_size=40", "--set", f"epochs={epochs}", "--seeds", "0", *extra]


@pytest.fixture
def stores(tmp_path, monkeypatch, data_dir, mlflow_template) -> Stores:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return Stores(tmp_path, data_dir, mlflow_template)


def trials_of(storage: str, name: str):
    import optuna

    from rankbench.study.runner import open_storage

    return optuna.load_study(study_name=name, storage=open_storage(storage)).get_trials(deepcopy=True)


def study_attrs(storage: str, name: str) -> dict:
    import optuna

    from rankbench.study.runner import open_storage

    return optuna.load_study(study_name=name, storage=open_storage(storage)).user_attrs


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def study_runs(uri: str, study: str):
    from mlflow.entities import ViewType

    c = client(uri)
    ids = [e.experiment_id for e in c.search_experiments(view_type=ViewType.ALL)]
    runs = c.search_runs(ids, run_view_type=ViewType.ALL, max_results=1000) if ids else []
    return [r for r in runs if r.data.tags.get("study") == study]


def fingerprint(uri: str, run_id: str) -> dict:
    """A run's final metrics (durations aside) and its per-epoch losses and accuracies, to compare bit for bit."""
    c = client(uri)
    run = c.get_run(run_id)
    final = {k: v for k, v in run.data.metrics.items() if not any(t in k for t in TIMING)}
    history = {key: [(m.step, m.value) for m in sorted(c.get_metric_history(run_id, key), key=lambda m: m.step)]
               for key in ("train_loss", "val_loss", "val_accuracy", "penalty")}
    return {"final": final, "history": history}


def by_lambda(trials) -> dict[float, object]:
    return {t.params["lambda"]: t for t in trials if t.state.name == "COMPLETE"}


def run_of(trial) -> str:
    (seed,) = trial.user_attrs["seeds"]
    return seed["run_id"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir, mlflow_template) -> dict[float, dict]:
    """λ → the fingerprint of the uninterrupted run of the tests' configuration (a local study, one worker)."""
    root = tmp_path_factory.mktemp("reference")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.delenv("RANKBENCH_TEST_STEP_DELAY", raising=False)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        ref = Stores(root, data_dir, mlflow_template)
        path = study_file(root, "reference")
        assert main(ref.argv(path, storage=f"sqlite:///{root / 'optuna.db'}")) == 0
        trials = by_lambda(trials_of(f"sqlite:///{root / 'optuna.db'}", "reference"))
        assert sorted(trials) == list(LAMBDAS)
        return {lam: fingerprint(ref.uri, run_of(t)) for lam, t in trials.items()}


def checkpointed_trial(storage: str, name: str, uri: str, timeout: float = 120):
    """Wait for a running trial whose run has a checkpoint (it finished an epoch); that trial."""
    from rankbench.run.tracking import Tracker

    tracker = Tracker(uri)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            for t in trials_of(storage, name):
                run = (t.user_attrs.get("runs") or {}).get("0")
                if t.state.name == "RUNNING" and run and tracker.checkpoint_path(run).is_file():
                    return t
        time.sleep(0.5)
    raise AssertionError(f"no trial of {name} reached its first checkpoint within {timeout} s")


def subprocess_env(**extra: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def start_cli(argv: list[str], cwd: Path, tag: str, **env: str) -> tuple[subprocess.Popen, Path]:
    log = cwd / f"{tag}.log"
    with open(log, "wb") as handle:
        proc = subprocess.Popen([sys.executable, "-m", "rankbench.cli", *argv], cwd=cwd, env=subprocess_env(**env),
                                stdout=handle, stderr=subprocess.STDOUT)
    return proc, log


def wait_for(proc: subprocess.Popen, timeout: float, log: Path, every: callable | None = None) -> int:
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"the command did not end within {timeout} s:\n{log.read_text()[-3000:]}")
        if every is not None:
            every()
        time.sleep(0.5)
    return proc.returncode


def table_rows(out: str) -> dict[str, list[str]]:
    lines = out.strip().splitlines()
    start = next(i for i, line in enumerate(lines) if set(line.strip()) <= {"-", " "} and line.strip()) + 1
    rows = [re.split(r"\s{2,}", line.strip()) for line in lines[start:] if line.strip()]
    return {r[0]: r for r in rows}


# ---------------------------------------------------------------------------- options, without a cluster
def test_slurm_time_limits_in_slurm_forms_become_whole_minutes():
    from rankbench.study.spec import slurm_minutes

    assert slurm_minutes("00:01:00", "t") == 1 and slurm_minutes("90", "t") == 90
    assert slurm_minutes("1:30", "t") == 2  # MINUTES:SECONDS, rounded up
    assert slurm_minutes("2-01:30", "t") == 2 * 1440 + 90 and slurm_minutes(45, "t") == 45
    assert slurm_minutes("INFINITE", "t") is None
    for bad in ("1h", "1:2:3:4", "", 0, "00:00:00", True):
        with pytest.raises(RankbenchError):
            slurm_minutes(bad, "t")


def test_the_slurm_table_then_slurm_args_then_flags_make_the_jobs_sbatch_options(tmp_path):
    pytest.importorskip("submitit")
    from submitit.slurm.slurm import _make_sbatch_string

    from rankbench.plugins.registry import Registry
    from rankbench.study.launcher import make_executor, slurm_options
    from rankbench.study.spec import load_study_file

    path = study_file(tmp_path, "opts", extra='[slurm]\npartition = "cpu"\ntime = "00:30:00"\nmem = "2G"\n'
                                              'setup = ["module load python"]\nargs = { qos = "long" }\n')
    spec = load_study_file(path, Registry.discover(plugin_dirs=[PLUGINS]))
    assert spec.slurm["partition"] == "cpu" and spec.slurm["args"] == {"qos": "long"}
    options = slurm_options(spec.slurm, {"partition": "gpu", "time": None, "cpus_per_task": "2"},
                            ["time=01:00:00", "constraint=avx2", "signal_delay_s=120"])
    assert (options.partition, options.time, options.cpus_per_task, options.mem) == ("gpu", "01:00:00", 2, "2G")
    assert options.signal_delay() == 120 and options.minutes == 60
    executor = make_executor(tmp_path / "jobs", options, spec.name, None)
    script = _make_sbatch_string(command="true", folder=tmp_path / "jobs", **executor.parameters)
    for line in ("--partition=gpu", "--time=60", "--cpus-per-task=2", "--mem=2G", "--qos=long", "--constraint=avx2",
                 "--signal=USR2@120", "--job-name=rankbench-opts", "module load python"):
        assert line in script, (line, script)
    assert spec.digest() == load_study_file(study_file(tmp_path, "opts"), Registry.discover(
        plugin_dirs=[PLUGINS])).digest()  # [slurm] is how the study runs, not what it trains


@pytest.mark.parametrize("extra, words", [
    ('[slurm]\npartiton = "cpu"\n', ["unknown key 'partiton'", "did you mean 'partition'"]),
    ('[slurm]\ntime = "1h"\n', ["time", "HH:MM:SS"]),
    ('[slurm]\nmem = "lots"\n', ["mem", "8G"]),
    ('[slurm]\ncpus_per_task = 0\n', ["cpus_per_task"]),
])
def test_a_bad_slurm_table_is_a_one_line_error(extra, words, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    path = study_file(tmp_path, "bad", extra=extra)
    assert main(["study", str(path), "--plugin-dir", str(PLUGINS), "--storage",
                 f"journal://{tmp_path / 'o.log'}"]) == 2
    line = assert_one_line_error(capsys.readouterr().err)
    assert all(w in line for w in words), line
    assert not (tmp_path / "o.log").exists()


def _refused(argv: list[str], capsys) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    return assert_one_line_error(capsys.readouterr().err)


def _nothing_made(root: Path) -> None:
    assert not (root / "optuna.log").exists(), "the storage was created"
    assert not (root / "rankbench-runs" / "slurm").exists() or not any(
        p.name.endswith("submitted.pkl") for p in (root / "rankbench-runs" / "slurm").rglob("*")), "a job was submitted"


@pytest.mark.parametrize("storage", [None, "sqlite:///{root}/optuna.db"])
def test_sqlite_storage_with_the_slurm_launcher_is_refused_before_anything_is_submitted(storage, stores, capsys):
    argv = stores.argv(study_file(stores.root, "lite"), "--launcher", "slurm", "--workers", "2")
    if storage is None:
        i = argv.index("--storage")
        del argv[i:i + 2]
    else:
        argv[argv.index("--storage") + 1] = storage.format(root=stores.root)
    line = _refused(argv, capsys)
    assert "SQLite" in line and "not safe across machines" in line and "journal://" in line, line
    assert not (stores.root / "optuna.db").exists() and not (stores.root / "rankbench-runs" / "optuna.db").exists()
    _nothing_made(stores.root)


def test_no_sbatch_on_path_is_one_line_before_anything_is_submitted(stores, monkeypatch, capsys):
    empty = stores.root / "no-slurm-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    line = _refused(stores.argv(study_file(stores.root, "nopath"), "--launcher", "slurm"), capsys)
    assert "no sbatch on PATH" in line and "--launcher local" in line, line
    _nothing_made(stores.root)


def test_slurm_options_need_the_slurm_launcher_and_a_matched_study_is_refused(stores, capsys):
    line = _refused(stores.argv(study_file(stores.root, "loc"), "--slurm-partition", "debug"), capsys)
    assert "--slurm-partition needs --launcher slurm" in line
    line = _refused(stores.argv(study_file(stores.root, "loc"), "--detach"), capsys)
    assert "--detach needs --launcher slurm" in line
    matched = stores.root / "matched.toml"
    matched.write_text('name = "m"\ntask = "mlp2"\nmethods = ["ours"]\n\n[matched]\ntargets = [2]\n')
    line = _refused(["study", str(matched), "--launcher", "slurm", "--storage", stores.storage], capsys)
    assert "matched-compression study" in line and "--launcher local" in line, line
    _nothing_made(stores.root)


# ---------------------------------------------------------------------------- the journal storage, locally
def test_in_a_journal_storage_a_trial_whose_worker_stopped_beating_is_failed_and_retried(tmp_path):
    """Optuna's heartbeats exist for RDB storages only: in a journal the trial's own attribute serves."""
    import optuna
    from optuna.trial import TrialState

    from rankbench.study import runner

    storage = runner.open_storage(f"journal://{tmp_path / 'optuna.log'}")
    study = optuna.create_study(study_name="stale", storage=storage)
    trial = study.ask()
    trial_id = trial._trial_id
    storage.set_trial_system_attr(trial_id, runner.JOURNAL_BEAT_ATTR, time.time() - 100)
    assert runner.fail_stale_journal_trials(study, grace_period=20) == 1
    states = [t.state for t in study.get_trials()]
    assert states == [TrialState.FAIL, TrialState.WAITING]
    storage.set_trial_system_attr(study.ask()._trial_id, runner.JOURNAL_BEAT_ATTR, time.time())
    assert runner.fail_stale_journal_trials(study, grace_period=20) == 0  # alive: left alone


def test_a_journal_file_in_a_missing_folder_is_a_one_line_error(stores, capsys):
    line = _refused(stores.argv(study_file(stores.root, "nofolder"), storage="journal:///no/such/folder/o.log"), capsys)
    assert "the folder /no/such/folder does not exist" in line, line


# ---------------------------------------------------------------------------- SIGTERM -> resume, locally
def test_sigterm_to_a_local_worker_then_the_study_again_gives_the_uninterrupted_result_bit_for_bit(
        stores, reference, capsys):
    """A local worker (the study command itself, on a journal storage) stopped by SIGTERM mid-trial; the same
    command again continues its run from the checkpoint to the metrics of a run never stopped."""
    path = study_file(stores.root, "term", lambdas=LAMBDAS[:1])
    proc, log = start_cli(stores.argv(path), stores.root, "term", RANKBENCH_TEST_STEP_DELAY="5")
    trial = checkpointed_trial(stores.storage, "term", stores.uri)
    proc.send_signal(signal.SIGTERM)
    assert wait_for(proc, 60, log) == 143, log.read_text()[-2000:]
    killed = trial.user_attrs["runs"]["0"]
    assert client(stores.uri).get_run(killed).info.status == "KILLED"

    assert main(stores.argv(path)) == 0, capsys.readouterr().err  # fast now: the run resumes
    (done,) = by_lambda(trials_of(stores.storage, "term")).values()
    assert run_of(done) == killed  # the same run, continued from its checkpoint
    assert fingerprint(stores.uri, killed) == reference[LAMBDAS[0]]


# ---------------------------------------------------------------------------- on the Slurm cluster
def test_an_unknown_partition_is_one_line_before_anything_is_submitted(slurm, stores, capsys):
    line = _refused(stores.argv(study_file(stores.root, "part"), "--launcher", "slurm", "--slurm-partition", "nope"),
                    capsys)
    assert "--slurm-partition nope: no such partition" in line and "debug" in line, line
    line = _refused(stores.argv(study_file(stores.root, "part"), "--launcher", "slurm", "--slurm-arg",
                                "partition=nope"), capsys)
    assert "no such partition" in line
    assert slurm.jobs() == {}
    _nothing_made(stores.root)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """``mlflow server`` on a SQLite backend (only the server touches it); its whole process group is stopped."""
    folder = tmp_path_factory.mktemp("mlflow-server")
    mlflow_cli = Path(sys.executable).parent / "mlflow"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc, log_path = None, folder / "server.log"
    try:
        for _attempt in range(2):
            port = _free_port()
            with open(log_path, "wb") as log:
                proc = subprocess.Popen(
                    [str(mlflow_cli) if mlflow_cli.exists() else "mlflow", "server", "--backend-store-uri",
                     f"sqlite:///{folder / 'server.db'}", "--artifacts-destination", str(folder / "artifacts"),
                     "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=folder,
                    start_new_session=True)
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline and proc.poll() is None:
                with contextlib.suppress(OSError):
                    with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
                        if response.read().strip() == b"OK":
                            yield base
                            return
                time.sleep(0.5)
            _stop_group(proc)
        pytest.skip(f"mlflow server did not answer /health within 90 s: {_tail(log_path)}")
    finally:
        if proc is not None:
            _stop_group(proc)


def _stop_group(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=15)


def test_four_trials_on_two_slurm_workers_on_postgresql_finish_with_every_run_in_the_mlflow_server(
        slurm, postgres_url, mlflow_server, stores, capsys):
    import optuna

    name = f"slurm-pg-{uuid.uuid4().hex[:8]}"  # the PostgreSQL server may be a shared one
    path = study_file(stores.root, name, lambdas=(0.1, 0.2, 0.5, 1.0), method="ours")
    try:
        code = main(stores.argv(path, "--launcher", "slurm", "--workers", "2", "--slurm-time", "00:10:00",
                                storage=postgres_url, uri=mlflow_server, epochs=1))
        out, err = capsys.readouterr()
        assert code == 0, err
        assert "4 trials finished, 0 failed" in out, out
        trials = trials_of(postgres_url, name)
        assert [t.state.name for t in trials] == ["COMPLETE"] * 4
        assert sorted(t.params["lambda"] for t in trials) == [0.1, 0.2, 0.5, 1.0]
        jobs = [j["job"] for j in study_attrs(postgres_url, name)["slurm_jobs"]]
        assert len(jobs) == 2 and {t.user_attrs["slurm_job"] for t in trials} <= set(jobs)
        assert f"slurm jobs: {jobs[0]} COMPLETED, {jobs[1]} COMPLETED" in out, out

        runs = study_runs(mlflow_server, name)  # read back from the server the workers logged to
        (parent,) = [r for r in runs if r.data.tags.get("rankbench.role") == "study"]
        children = [r for r in runs if r.data.tags.get("rankbench.role") != "study"]
        assert parent.info.status == "FINISHED"
        assert sorted(r.data.tags["trial"] for r in children) == ["0", "1", "2", "3"]
        assert all(r.info.status == "FINISHED" and r.data.tags["mlflow.parentRunId"] == parent.info.run_id
                   for r in children)
        assert {run_of(t) for t in trials} == {r.info.run_id for r in children}

        assert main(["study", "--list", "--storage", postgres_url, "--tracking-uri", mlflow_server]) == 0
        row = table_rows(capsys.readouterr().out)[name]
        assert row[-1] == f"{jobs[0]} COMPLETED, {jobs[1]} COMPLETED", row
    finally:
        from rankbench.study.runner import open_storage

        storage = open_storage(postgres_url)
        with contextlib.suppress(KeyError):
            optuna.delete_study(study_name=name, storage=storage)
        storage.engine.dispose()


def test_scancel_of_a_worker_mid_trial_loses_nothing_and_the_study_command_again_resumes_its_run(
        slurm, stores, reference, monkeypatch, capsys):
    monkeypatch.setenv("RANKBENCH_TEST_STEP_DELAY", "3")  # the jobs inherit it (sbatch exports the environment)
    path = study_file(stores.root, "cancel")
    argv = stores.argv(path, "--launcher", "slurm", "--workers", "2", "--slurm-time", "00:10:00")
    assert main([*argv, "--detach"]) == 0, capsys.readouterr().err
    assert "detached" in capsys.readouterr().out
    trial = checkpointed_trial(stores.storage, "cancel", stores.uri)
    victim, killed = trial.user_attrs["slurm_job"], trial.user_attrs["runs"]["0"]
    slurm.run("scancel", victim)
    deadline = time.monotonic() + 60
    while victim in slurm.live_jobs() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert slurm.jobs()[victim][0] == "CANCELLED"
    assert client(stores.uri).get_run(killed).info.status == "KILLED"  # stopped at its checkpoint, not lost

    assert main(argv) == 0, capsys.readouterr().err  # tops the workers up to 2 and waits
    out = capsys.readouterr().out
    assert "2 trials finished" in out and "submitted 1 worker job" in out, out
    trials = trials_of(stores.storage, "cancel")
    done = by_lambda(trials)
    assert sorted(done) == list(LAMBDAS)
    resumed = done[trial.params["lambda"]]
    assert run_of(resumed) == killed  # the cancelled run was continued, not started again
    assert [s for s, _ in fingerprint(stores.uri, killed)["history"]["val_loss"]] == list(range(1, EPOCHS + 1))
    for lam, t in done.items():
        assert fingerprint(stores.uri, run_of(t)) == reference[lam]
    assert [t.user_attrs.get("failure_reason") for t in trials if t.state.name == "FAIL"] == ["Stopped: SIGTERM"]

    assert main(["study", "--list", "--storage", stores.storage, "--tracking-uri", stores.uri]) == 0
    row = table_rows(capsys.readouterr().out)["cancel"]
    assert f"{victim} CANCELLED" in row[-1] and row[-1].count("COMPLETED") == 2, row


def test_a_job_at_its_time_limit_is_requeued_and_resumes_from_its_checkpoint_to_the_uninterrupted_metrics(
        slurm, stores, reference):
    # 1 minute per job; Slurm sends SIGUSR2 10 s ahead (up to 30 s earlier: it checks every 30 s); the first
    # attempt would need over a minute, its second epoch onwards being slow
    path = study_file(stores.root, "limit", lambdas=LAMBDAS[:1], extra="[slurm]\nsignal_delay_s = 10\n")
    proc, log = start_cli(stores.argv(path, "--launcher", "slurm", "--slurm-arg", "time=00:01:00"), stores.root,
                          "limit", RANKBENCH_TEST_STEP_DELAY="10", SLURM_CONF=str(slurm.conf),
                          RANKBENCH_SLURM_POLL_S="1")
    released = []
    assert wait_for(proc, 300, log, every=lambda: released.extend(slurm.release_requeued())) == 0, log.read_text()
    text = log.read_text()
    assert "1 trials finished" in text, text
    (job,) = [j["job"] for j in study_attrs(stores.storage, "limit")["slurm_jobs"]]
    assert slurm.restarts(job) >= 1 and job in released  # requeued by itself, then ran again
    trials = trials_of(stores.storage, "limit")
    first = [t for t in trials if t.state.name == "FAIL"]
    # stopped at the limit once, or more often on a loaded machine (a resumed attempt can hit it again)
    assert first and {t.user_attrs.get("failure_reason") for t in first} == {"Stopped: SIGUSR2"}
    (done,) = by_lambda(trials).values()
    assert {t.user_attrs["runs"]["0"] for t in first} == {run_of(done)}  # one run, continued from its checkpoints
    assert fingerprint(stores.uri, run_of(done)) == reference[LAMBDAS[0]]
    folder = Path(study_attrs(stores.storage, "limit")["slurm_jobs"][0]["folder"])
    err = next(folder.glob(f"{job}_0_log.err")).read_text()
    assert "requeueing job" in err and "(restart 1)" in err, err
