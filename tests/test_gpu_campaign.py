"""benchmarks/gpu_campaign.sh and benchmarks/campaign.py: the GPU campaign's plan, its store packing and its
choice of what each go trains, without a GPU (about 20 s on a 2-core machine).

The whole rehearsal (two goes on a CPU, the first cut by its deadline, the second resuming the cut runs,
then the check) takes minutes: it runs only with RANKBENCH_CAMPAIGN_REHEARSAL=1.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_campaign.sh"
STUDY = ROOT / "studies" / "fmnist_campaign.toml"


def load_campaign_module():
    spec = importlib.util.spec_from_file_location("campaign", ROOT / "benchmarks" / "campaign.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["campaign"] = module
    spec.loader.exec_module(module)
    return module


campaign = load_campaign_module()


def fake_fashion_mnist(folder: Path, count: int = 60000) -> Path:
    """A training-labels file whose header says ``count`` items: all the plan reads of the data."""
    (folder / "fashion-mnist").mkdir(parents=True)
    with gzip.open(folder / "fashion-mnist" / "train-labels-idx1-ubyte.gz", "wb") as fh:
        fh.write((2049).to_bytes(4, "big") + count.to_bytes(4, "big") + bytes(16))
    return folder


def test_the_plan_counts_the_protocols_steps_from_the_study_file_and_the_task(tmp_path):
    """The plan's totals equal the study file's runs x the lenet5 task's own recipe (epochs, batch, val_size
    as rankbench declares them) over the training file's count, and its goes follow the step times given."""
    from rankbench.plugins.registry import Registry
    from rankbench.study.spec import load_study_file

    data = fake_fashion_mnist(tmp_path / "data")
    results = tmp_path / "results"
    results.mkdir()
    (results / "device_check_gpu.txt").write_text(
        "method    compile    data             val acc %  compression      train s/batch (median)\n"
        "--------  ---------  -------------  -----------  -------------  ------------------------\n"
        "dense     off        fashion-mnist         86.9  1.00x                           0.00400  1.00x\n"
        "trn       off        fashion-mnist         85.9  4.25x                           0.01000  2.50x\n"
        "ours      off        fashion-mnist         78.4  4.25x                           0.02000  5.00x\n")
    out = tmp_path / "plan.json"
    env = {**os.environ, "PYTHON": sys.executable, "CAMPAIGN_ROOT": str(tmp_path / "root")}
    done = subprocess.run(["bash", str(SCRIPT), "--plan", "--data-dir", str(data), "--results", str(results),
                           "--json", str(out), "--deadline-s", "570", "--reserve-s", "60", "--setup-s", "20",
                           "--startup-s", "15", "--finish-s", "10", "--parallel", "15"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    numbers = json.loads(out.read_text())

    registry = Registry.discover()
    spec = load_study_file(STUDY, registry)
    hyper = registry.task(spec.task).hyperparameters
    epochs, batch, val = hyper["epochs"].default, hyper["batch_size"].default, hyper["val_size"].default
    runs = len(spec.points()) * len(spec.seeds)
    per_epoch = math.ceil((60000 - val) / batch)
    assert (runs, epochs, batch, val, per_epoch) == (15, 150, 128, 5000, 430)
    assert numbers["runs"] == runs and numbers["total_steps"] == runs * epochs * per_epoch == 967_500
    assert set(numbers["steps_per_run"].values()) == {epochs * per_epoch}
    window = 570 - 60 - 20
    assert numbers["window_s"] == window
    assert numbers["required_steps_per_s"]["15"] == pytest.approx(epochs * per_epoch / (window - 15 - 10))
    assert "967,500 optimisation steps" in done.stdout and "fits in one go: no" in done.stdout

    # every run has its own process: a go trains whole epochs of floor((window - startup) / epoch) each
    def goes(step_s: float) -> int:
        epoch_s, left, n = per_epoch * step_s, epochs, 0
        while True:
            n += 1
            if left * epoch_s + 15 + 10 <= window:
                return n
            left -= int((window - 15) // epoch_s)

    expected = max(goes(0.01), goes(0.02))
    assert expected == 3  # ours: 8.6 s an epoch, 55 epochs a go: 150 epochs take 3 goes (trn: 2)
    assert numbers["goes"]["device_check_gpu.txt: each process at its single-process speed"] == expected


def test_the_store_is_one_tar_gz_in_parts_that_unpack_to_the_same_files(tmp_path):
    store = tmp_path / "work" / "store"
    (store / "checkpoints").mkdir(parents=True)
    payload = os.urandom(3 * 2**20 + 12345)  # incompressible: four parts of 1 MiB
    (store / "checkpoints" / "run.pt").write_bytes(payload)
    (store / "mlflow.db").write_bytes(b"db" * 1000)
    (store / "mlflow.db.lock").write_bytes(b"")
    parts = campaign.pack(store, tmp_path / "out", part_bytes=2**20)
    assert [p.name for p in parts] == [f"store.tgz.{i:02d}" for i in range(4)]
    assert all(p.stat().st_size <= 2**20 for p in parts)
    assert campaign.unpack(tmp_path / "out", tmp_path / "again")
    assert (tmp_path / "again" / "store" / "checkpoints" / "run.pt").read_bytes() == payload
    assert (tmp_path / "again" / "store" / "mlflow.db").read_bytes() == b"db" * 1000
    assert not (tmp_path / "again" / "store" / "mlflow.db.lock").exists()  # a lock is no state


def test_a_go_skips_finished_runs_resumes_checkpointed_ones_and_starts_the_rest(uri, tmp_path):
    """What a go does with each of the study's 15 runs, read from the store the last go left."""
    from rankbench.run.tracking import Tracker, param_text

    camp = campaign.load_campaign(STUDY)
    jobs = {j.key: j for j in camp.jobs}
    tracker = Tracker(uri)
    experiment = "fmnist_campaign"

    def run_of(key: str, status: str, epochs: int = 0, checkpoint: bool = False, **tags: str) -> str:
        job = jobs[key]
        params = {"seed": job.seed, "method": job.method, "task": job.task, "epochs": 150,
                  **{k: param_text(v) for k, v in job.settings}}
        run_id = tracker.start(experiment, key, params, {"method": job.method, "task": job.task, **tags})
        for epoch in range(1, epochs + 1):
            tracker.log_metrics(run_id, {"val_accuracy": 50.0 + epoch}, step=epoch)
        if checkpoint:
            tracker.checkpoint_path(run_id).parent.mkdir(exist_ok=True)
            tracker.checkpoint_path(run_id).write_bytes(b"checkpoint")
        if status != "RUNNING":
            tracker.terminate(run_id, status)
        return run_id

    run_of("trn-rank10-s0", "FINISHED")
    run_of("trn-rank10-s0", "FINISHED")  # a duplicate: counted, not trained again
    run_of("trn-rank10-s1", "KILLED", 4, checkpoint=True)
    furthest = run_of("trn-rank10-s1", "KILLED", 7, checkpoint=True)  # two attempts: the furthest goes on
    run_of("trn-rank10-s2", "KILLED", 0)  # stopped before its first epoch: started again
    cut = run_of("ours-lambda0.2-s0", "RUNNING", 2, checkpoint=True,
                 **{"rankbench.pid": "999999999", "rankbench.host": "gone-gpu-host", "rankbench.heartbeat": "1"})
    run_of("ours-lambda1.0-s2", "FAILED", 3, checkpoint=True, failure_reason="TrainingDiverged: NaN loss")
    run_of("trn-rank15-s0", "FINISHED")
    other = jobs["trn-rank15-s1"]
    tracker.start(experiment, "other", {"seed": other.seed, "rank": 16, "dataset": "fashion-mnist"},
                  {"method": "trn", "task": "lenet5"})  # other settings: not this job's run

    os.environ["RANKBENCH_HEARTBEAT_GRACE"] = "1"
    try:
        dead = tracker.mark_dead_runs()  # as a go does first: nothing of its store runs yet
    finally:
        del os.environ["RANKBENCH_HEARTBEAT_GRACE"]
    assert [r.info.run_id for r in dead] == [cut]
    decided = {d.job.key: d for d in campaign.decide(tracker, camp.jobs, {j: 150 for j in camp.jobs})}
    assert (decided["trn-rank10-s0"].action, decided["trn-rank10-s0"].finished) == ("done", 2)
    assert (decided["trn-rank10-s1"].action, decided["trn-rank10-s1"].run_id,
            decided["trn-rank10-s1"].epochs_done) == ("resume", furthest, 7)
    assert (decided["ours-lambda0.2-s0"].action, decided["ours-lambda0.2-s0"].run_id) == ("resume", cut)
    assert decided["trn-rank10-s2"].action == "start"
    assert decided["ours-lambda1.0-s2"].action == "diverged"
    assert decided["trn-rank15-s0"].action == "done"
    assert decided["trn-rank15-s1"].action == "start"
    assert sum(d.action == "start" for d in decided.values()) == 10
    resume = [*jobs["trn-rank10-s1"].args(), "--resume", furthest]
    assert resume[:6] == ["--method", "trn", "--task", "lenet5", "--seeds", "1"] and "rank=10" in resume


@pytest.mark.skipif(not os.environ.get("RANKBENCH_CAMPAIGN_REHEARSAL"),
                    reason="the CPU rehearsal of two goes takes minutes: RANKBENCH_CAMPAIGN_REHEARSAL=1 runs it")
def test_rehearsal_a_cut_go_is_finished_by_the_next(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "CAMPAIGN_ROOT": str(tmp_path / "root"), "DEVICE": "cpu",
           "QUICK": "1", "PARALLEL": "2", "CAMPAIGN_STATE": str(tmp_path / "state")}

    def script(*args: str, **extra: str) -> str:
        done = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env={**env, **extra},
                              timeout=900)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout

    first = script(DEADLINE_S="100", OUT=str(tmp_path / "go1"))
    assert "SIGTERM to" in first
    script("--take", str(tmp_path / "go1"))
    script(DEADLINE_S="800", OUT=str(tmp_path / "go2"))
    script("--take", str(tmp_path / "go2"))
    assert "check passed: 15 runs" in script("--check")
