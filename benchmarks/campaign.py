"""The GPU campaign behind benchmarks/gpu_campaign.sh: the paper's Fashion-MNIST protocol as many parallel
``rankbench run`` processes on one lent GPU, in goes of at most a few minutes each, continued from
checkpoints go after go. The shell script is the entry point; its header says how a go is called.

Subcommands (``python benchmarks/campaign.py SUB --help``):

  plan          the arithmetic before any GPU is lent: optimisation steps, the steps/s each process
                needs to finish in one go, and, from the measured numbers in benchmarks/results, how
                many goes the campaign takes
  go            one go: unpack the last go's store, mark runs of a dead go FAILED, skip finished runs,
                resume unfinished ones from their checkpoints (``--resume RUN_ID``), start the rest,
                stop every process with SIGTERM before the deadline, print the report, pack the store
  take DIR      put a go's returned store parts (DIR/store.tgz.NN) where the next go reads them
  report        unpack the latest store and print the report and, when every run is finished, the answer
  check         every run finished once, with contiguous per-epoch metrics (the rehearsal's proof)
  wheels        download the wheels the device machine lacks (the carry folder)
  device-env    a virtual environment with only the device machine's packages (to rehearse the carry)

Every command reads the campaign from a study file (default studies/fmnist_campaign.toml): its points x
seeds are the runs, one process each. Nothing here edits rankbench itself.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gzip
import io
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "studies" / "fmnist_campaign.toml"
RESULTS = ROOT / "benchmarks" / "results"
STATE = Path(os.environ.get("CAMPAIGN_STATE", ROOT / ".gpu-campaign"))
"""Where each campaign's latest store parts wait for the next go (carried: .gpu-campaign/NAME)."""
WORK_ROOT = Path(os.environ.get("CAMPAIGN_ROOT", "/tmp/rankbench-campaign"))
"""Where a go unpacks and runs. Fixed, on every machine: an MLflow experiment records the absolute path
of its artifact folder, so the store must live at the same path in every go (and here, to report)."""
PART_BYTES = 15 * 2**20
"""The store travels back as a tar.gz split in parts of at most this size (the device returns files of
at most 16 MiB, at most 8 of them)."""
MAX_PARTS = 5
QUICK_TRAIN, QUICK_TEST, QUICK_VAL = 3500, 1000, 500
"""QUICK=1 (a rehearsal on a CPU): the first 3,500 training and 1,000 test images of the real files,
500 of them held out for validation: 3,000 training images, 24 steps per epoch at batch 128."""
QUICK_EPOCHS = 3
FINAL_STATES = ("done", "diverged")

# The wheels a go needs that the device machine (nvidia-h200, image 'cuda') lacks, at the versions
# installed here (so that this checkout's mlflow reads the stores a go returns). Found by running a
# rehearsal in `device-env` (only the device's packages) until nothing was missing; see gpu_campaign.sh.
CARRY_PURE = (
    "mlflow-skinny", "sqlalchemy", "alembic", "mako", "sqlparse", "cachetools", "pydantic", "annotated-types",
    "typing-inspection", "typing-extensions", "importlib-metadata", "opentelemetry-api", "opentelemetry-sdk",
    "opentelemetry-proto", "opentelemetry-semantic-conventions", "fastapi", "starlette", "platformdirs",
)
CARRY_BINARY = ("pydantic-core", "cryptography", "cffi", "protobuf")
"""Compiled: pydantic-core and cffi per Python version, cryptography and protobuf as abi3 wheels."""
MANYLINUX = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64", "manylinux_2_34_x86_64", "manylinux_2_31_x86_64", "manylinux_2_24_x86_64")
STUB_NAMESPACES = ("databricks",)
"""Empty namespace folders made beside the unpacked wheels: mlflow asks
``importlib.util.find_spec("databricks.agents")``, which raises without a ``databricks`` package; an
empty namespace answers "not installed", as databricks-sdk (1.2 MB, with google-auth) would."""

# The device machine's Python packages (/work/.library/device/KINDS.md, 'Python packages already there',
# read 2026-11-17): `device-env` builds a virtual environment with only these, to rehearse the carry.
DEVICE_PACKAGES = """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio interface-meta iniconfig jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy
peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
""".split()


def say(*parts: Any, file=None) -> None:
    print(*parts, file=file or sys.stdout, flush=True)


# ---------------------------------------------------------------------------------------------- the runs
@dataclasses.dataclass(frozen=True)
class Job:
    """One run: a point of the study file and a seed, run as one ``rankbench run`` process."""

    task: str
    method: str
    settings: tuple[tuple[str, Any], ...]
    """Every ``--set`` (the file's [fixed], [method_fixed.M] and the point's own values, QUICK's val_size)."""
    seed: int
    label: str
    epochs: int | None = None
    """``--epochs`` (QUICK); None: the recipe's."""

    @property
    def key(self) -> str:
        """A file name: ``trn-rank10-s0``, ``ours-lambda0.2-s1``."""
        return "-".join(re.sub(r"[^A-Za-z0-9.]", "", part) for part in self.label.split()) + f"-s{self.seed}"

    def args(self) -> list[str]:
        out = ["--method", self.method, "--task", self.task, "--seeds", str(self.seed)]
        for k, v in self.settings:
            out += ["--set", f"{k}={v}"]
        if self.epochs is not None:
            out += ["--epochs", str(self.epochs)]
        return out


@dataclasses.dataclass
class Campaign:
    name: str
    study: Path
    jobs: list[Job]
    quick: bool

    @property
    def work(self) -> Path:
        return WORK_ROOT / self.name

    @property
    def store(self) -> Path:
        return self.work / "store"

    @property
    def uri(self) -> str:
        return f"sqlite:///{self.store / 'mlflow.db'}"

    @property
    def state(self) -> Path:
        return STATE / self.name


def registry():
    from rankbench.plugins.registry import Registry

    return Registry.discover()


def load_campaign(study: Path = STUDY, quick: bool = False, reg=None) -> Campaign:
    """The jobs of a study file: every point (``StudySpec.points``) x every seed, with the file's fixed
    settings, through rankbench's own parser (so the file is validated as `rankbench study` would)."""
    from rankbench.study.spec import load_study_file

    spec = load_study_file(study, reg or registry())
    jobs = []
    for label, (method, values) in spec.points().items():
        settings = {**spec.fixed, **spec.method_fixed.get(method, {}), **values}
        if quick:
            settings["val_size"] = QUICK_VAL
        for seed in spec.seeds:
            jobs.append(Job(spec.task, method, tuple(settings.items()), seed, label,
                            QUICK_EPOCHS if quick else None))
    if spec.budget_steps is not None:
        raise SystemExit(f"{study}: budget_steps is not supported by the campaign (give epochs in [fixed])")
    return Campaign(spec.name + ("-quick" if quick else ""), study, jobs, quick)


@dataclasses.dataclass(frozen=True)
class Shape:
    """What one job trains, resolved by rankbench's own config (``make_config``) and the data's size."""

    epochs: int
    batch_size: int
    train_images: int
    val_size: int
    steps_per_epoch: int
    params: dict
    images_source: str

    @property
    def steps(self) -> int:
        return self.epochs * self.steps_per_epoch


def idx_count(path: Path) -> int:
    """The item count in an IDX file's header (plain or .gz)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        header = fh.read(8)
    return int.from_bytes(header[4:8], "big")


def train_labels(dataset: str, data_dir: Path | None) -> Path | None:
    from rankbench.data.splits import dataset_folders

    for folder in dataset_folders(data_dir, dataset):
        for name in ("train-labels-idx1-ubyte", "train-labels-idx1-ubyte.gz"):
            if (folder / name).is_file():
                return folder / name
    return None


def epochs_of(job: Job, reg=None) -> int:
    from rankbench.run.config import make_config

    config = make_config(reg or registry(), job.task, job.method, dict(job.settings), epochs=job.epochs)
    return config.task_params["epochs"]


def shape_of(job: Job, data_dir: Path | None, reg=None) -> Shape:
    from rankbench.run.config import make_config

    config = make_config(reg or registry(), job.task, job.method, dict(job.settings), epochs=job.epochs)
    p = config.task_params
    labels = train_labels(p["dataset"], data_dir)
    if labels is not None:
        count, source = idx_count(labels), f"the header of {labels}"
    elif p["dataset"] in ("mnist", "fashion-mnist", "kmnist"):
        count, source = 60000, "the MNIST family's training file (no copy found here)"
    else:
        raise SystemExit(f"{job.label}: cannot tell the size of dataset {p['dataset']}")
    train = count - p["val_size"]
    return Shape(p["epochs"], p["batch_size"], count, p["val_size"], math.ceil(train / p["batch_size"]),
                 {**p, **config.method_params}, source)


# ----------------------------------------------------------------------------------- measured numbers
def measured_step_times(results: Path = RESULTS) -> list[dict]:
    """Single-process eager training-step times of LeNet-5 (seconds per batch of 128) found in
    benchmarks/results: rankbench's own loop (device_check_*.txt) and benchmarks/models.py (models_*.txt);
    and the GPU time of one eager step of ours (profile_*.txt)."""
    found = []
    for path in sorted(results.glob("device_check_*.txt")):
        if path.stem.endswith("_cpu"):
            continue
        times = {}
        for line in path.read_text().splitlines():
            m = re.match(r"^(dense|trn|ours)\s+off\s+\S+\s+[\d.]+\s+[\d.]+x\s+([\d.]+)\s", line)
            if m:
                times[m.group(1)] = float(m.group(2))
        if times:
            found.append({"source": path.name, "what": "rankbench's training loop, train s/batch (median)",
                          "s": times, "note": "trn at rank 25"})
    for path in sorted(results.glob("models_*.txt")):
        if "resnet" in path.name or path.stem.endswith("_cpu"):
            continue
        times, in_lenet = {}, False
        for line in path.read_text().splitlines():
            if "task lenet5" in line:
                in_lenet = True
            elif re.match(r"^task \w+", line) and "lenet5" not in line:
                in_lenet = False
            m = re.match(r"^(dense|trn r\d+|ours r\d+ \(gated\))\s+\d+\s+[\d.]+x\s+([\d.]+)\s", line)
            if in_lenet and m:
                times[m.group(1).split()[0]] = float(m.group(2)) / 1000
        if times:
            found.append({"source": path.name, "what": "benchmarks/models.py, train step", "s": times,
                          "note": "trn and ours at rank 25"})
    return found


def gpu_seconds_per_step(results: Path = RESULTS) -> tuple[float, str] | None:
    """GPU (CUDA) time of one eager training step of ours on LeNet-5, from profile_*.txt."""
    for path in sorted(results.glob("profile_*.txt")):
        block = None
        for line in path.read_text().splitlines():
            m = re.match(r"^ours on lenet5, batch \d+, (\d+) steps, eager", line)
            if m:
                block = int(m.group(1))
                continue
            m = re.match(r"^Self CUDA time total: ([\d.]+)(ms|us|s)", line)
            if m and block:
                scale = {"ms": 1e-3, "us": 1e-6, "s": 1.0}[m.group(2)]
                return float(m.group(1)) * scale / block, path.name
    return None


def simulate_goes(remaining: Sequence[tuple[int, int, float]], parallel: int, window_s: float, startup_s: float,
                  finish_s: float, max_goes: int = 99) -> int | None:
    """Goes until every job is done. ``remaining``: (epochs left, steps per epoch, seconds per step) per
    job. In a go, ``parallel`` slots take the longest jobs first; a job pays ``startup_s`` each go, keeps
    only whole epochs (SIGTERM loses the epoch in progress) and ``finish_s`` at its end (test, export)."""
    left = [[e, spe, s] for e, spe, s in remaining if e > 0]
    for go in range(1, max_goes + 1):
        left.sort(key=lambda j: -j[0] * j[1] * j[2])
        slots = [0.0] * parallel
        for job in left:
            i = min(range(parallel), key=lambda k: slots[k])
            t = slots[i] + startup_s
            epoch_s = job[1] * job[2]
            if t + epoch_s > window_s:
                continue
            can = int((window_s - t) // epoch_s)
            if can >= job[0] and t + job[0] * epoch_s + finish_s <= window_s:
                slots[i] = t + job[0] * epoch_s + finish_s
                job[0] = 0
            else:
                done = min(can, job[0])
                job[0] -= done
                slots[i] = window_s
        left = [j for j in left if j[0] > 0]
        if not left:
            return go
    return None


# ------------------------------------------------------------------------------------------------ plan
def plan(args) -> dict:
    reg = registry()
    camp = load_campaign(args.study, args.quick, reg)
    data_dir = quick_data(camp.work / "quick-data", args.data_dir) if camp.quick else args.data_dir
    shapes = {job: shape_of(job, data_dir, reg) for job in camp.jobs}
    first = shapes[camp.jobs[0]]
    total = sum(s.steps for s in shapes.values())
    window = args.deadline_s - args.reserve_s - args.setup_s
    n_jobs = len(camp.jobs)
    points = sorted({j.label for j in camp.jobs}, key=[j.label for j in camp.jobs].index)
    seeds = sorted({j.seed for j in camp.jobs})
    out: dict[str, Any] = {"campaign": camp.name, "runs": n_jobs, "total_steps": total, "window_s": window,
                           "steps_per_epoch": {j.key: shapes[j].steps_per_epoch for j in camp.jobs},
                           "steps_per_run": {j.key: shapes[j].steps for j in camp.jobs}}
    say(f"campaign {camp.name} ({camp.study.relative_to(ROOT) if camp.study.is_relative_to(ROOT) else camp.study}): "
        f"task {camp.jobs[0].task}, {len(points)} points x {len(seeds)} seeds = {n_jobs} runs, one process each")
    say("  points: " + "; ".join(points) + f"; seeds {','.join(map(str, seeds))}")
    say(f"  resolved by rankbench (make_config, recipe paper): dataset {first.params['dataset']}, epochs "
        f"{first.epochs}, batch {first.batch_size}, lr {first.params['lr']}, val_size {first.val_size}"
        + (" (QUICK: the rehearsal's subset)" if camp.quick else ""))
    say(f"  training images: {first.train_images:,} ({first.images_source}) - {first.val_size:,} held out for "
        f"validation = {first.train_images - first.val_size:,}")
    if len({(s.steps_per_epoch, s.epochs) for s in shapes.values()}) == 1:
        say(f"  steps: ceil({first.train_images - first.val_size:,} / {first.batch_size}) = "
            f"{first.steps_per_epoch} per epoch x {first.epochs} epochs = {first.steps:,} per run; "
            f"x {n_jobs} runs = {total:,} optimisation steps")
    else:
        say(f"  steps: {total:,} in all (" + ", ".join(f"{j.key} {shapes[j].steps:,}" for j in camp.jobs) + ")")
    say(f"one go: deadline {args.deadline_s:.0f} s from the script's start; "
        f"SIGTERM at {args.deadline_s - args.reserve_s:.0f} s "
        f"(reserve {args.reserve_s:.0f} s: stop, report, packing); about {args.setup_s:.0f} s before training starts "
        f"(wheels, imports, data, CUDA): a training window of {window:.0f} s")
    longest = max(s.steps for s in shapes.values())
    say(f"to finish in one go (each process {longest:,} steps per run, plus {args.startup_s:.0f} s to start and "
        f"{args.finish_s:.0f} s to finish a run):")
    rows, need = [], {}
    for n in sorted({1, 3, 5, 8, args.parallel, n_jobs}):
        if n > n_jobs:
            continue
        waves = math.ceil(n_jobs / n)
        per_process = longest * waves
        usable = window - waves * (args.startup_s + args.finish_s)
        rate = per_process / usable if usable > 0 else math.inf
        need[n] = rate
        rows.append([n, waves, f"{per_process:,}", f"{rate:.1f}", f"{1000 / rate:.2f}" if rate else "-"])
    table(["parallel processes", "runs per process", "steps per process", "steps/s per process needed",
           "ms per step"], rows)
    out["required_steps_per_s"] = need
    measured = measured_step_times(args.results)
    gpu = gpu_seconds_per_step(args.results)
    if not measured:
        say("no measured step times in benchmarks/results: run benchmarks/gpu.sh on a GPU first")
        return out
    say("measured single-process eager step times (LeNet-5, batch 128) in benchmarks/results:")
    table(["source", "measures", "dense ms", "trn ms", "ours ms", "ours / dense"],
          [[m["source"], f"{m['what']} ({m['note']})", *(f"{m['s'][k] * 1000:.2f}" if k in m["s"] else "-"
                                                         for k in ("dense", "trn", "ours")),
            f"{m['s']['ours'] / m['s']['dense']:.2f}x" if {"ours", "dense"} <= set(m["s"]) else "-"] for m in measured])
    if gpu:
        say(f"  {gpu[1]}: an eager step of ours keeps the GPU busy {gpu[0] * 1000:.2f} ms (CUDA time), "
            f"so the step is launch-bound; {args.parallel} processes ask {args.parallel * gpu[0] * 1000:.1f} ms of GPU "
            "time per step-round between them")
    say(f"estimated goes at {args.parallel} parallel processes (whole epochs only survive a stop; "
        f"window {window:.0f} s):")
    rows, goes = [], {}
    for m in measured:
        if not {"trn", "ours"} <= set(m["s"]):
            continue
        models = [("each process at its single-process speed", 1.0, False)]
        if gpu:
            shared = f"GPU time shared ({min(args.parallel, n_jobs)} x {gpu[0] * 1000:.2f} ms per step)"
            models.append((shared, 1.0, True))
        for what, _, gpu_bound in models:
            def step_s(job: Job) -> float:
                alone = m["s"].get(job.method, m["s"]["trn"])
                return max(alone, min(args.parallel, n_jobs) * gpu[0]) if gpu_bound else alone
            left = [(shapes[j].epochs, shapes[j].steps_per_epoch, step_s(j)) for j in camp.jobs]
            n = simulate_goes(left, args.parallel, window, args.startup_s, args.finish_s)
            one_run = max(shapes[j].steps * step_s(j) for j in camp.jobs)
            goes[f"{m['source']}: {what}"] = n
            ours_s = [step_s(j) for j in camp.jobs if j.method == "ours"]
            rows.append([m["source"], what, f"{1000 * step_s(camp.jobs[0]):.2f} / "
                         f"{1000 * max(ours_s) if ours_s else 0:.2f}",
                         f"{one_run:,.0f} s", n if n is not None else "> 99"])
    table(["numbers", "model", "ms/step per process (trn / ours)", "longest run", "goes"], rows)
    out["goes"] = goes
    fits = sorted({k.split(":")[0] for k, v in goes.items() if v == 1})
    if args.parallel in need:
        say(f"fits in one go: {'yes, by the numbers of ' + ', '.join(fits) if fits else 'no'}: every process must run "
            f"{need[args.parallel]:.0f} steps/s ({1000 / need[args.parallel]:.2f} ms per step) "
            f"at {args.parallel} processes")
    known = [v for v in goes.values() if v]
    if known:
        say(f"plan: {min(known)} to {max(known)} goes, one device call each (a go and the machine's start take about "
            "11 of a session's 15 device minutes); each go prints the steps/s it measured and the goes left")
    return out


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    from tabulate import tabulate

    say(tabulate(rows, headers=headers, disable_numparse=True))


# ------------------------------------------------------------------------------------------ the store
def pack(store: Path, out: Path, part_bytes: int = PART_BYTES) -> list[Path]:
    """The store folder as ONE tar.gz, split in parts of at most ``part_bytes`` (store.tgz.00, .01, ...)."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("store.tgz.*"):
        old.unlink()
    buf = out / "store.tgz.tmp"
    with tarfile.open(buf, "w:gz", compresslevel=6) as tar:
        for path in sorted(store.rglob("*")):
            if path.is_file() and not path.name.endswith((".lock", ".part")):
                tar.add(path, arcname=str(path.relative_to(store.parent)))
    parts = []
    with open(buf, "rb") as fh:
        while chunk := fh.read(part_bytes):
            parts.append(out / f"store.tgz.{len(parts):02d}")
            parts[-1].write_bytes(chunk)
    buf.unlink()
    if len(parts) > MAX_PARTS:
        say(f"campaign: warning: the store is {len(parts)} parts of {part_bytes >> 20} MiB: more than the device "
            f"returns with the text files ({MAX_PARTS}); raise CAMPAIGN_PART_MIB", file=sys.stderr)
    return parts


def unpack(parts_dir: Path, dest_parent: Path) -> bool:
    """Join store.tgz.NN in ``parts_dir`` and unpack into ``dest_parent`` (which gets ``store/``)."""
    parts = sorted(parts_dir.glob("store.tgz.[0-9][0-9]"))
    if not parts:
        return False
    joined = io.BytesIO(b"".join(p.read_bytes() for p in parts))
    with tarfile.open(fileobj=joined, mode="r:gz") as tar:
        if sys.version_info >= (3, 12) or hasattr(tarfile, "data_filter"):
            tar.extractall(dest_parent, filter="data")
        else:  # pragma: no cover
            tar.extractall(dest_parent)
    return True


# ------------------------------------------------------------------------------------- store decisions
@dataclasses.dataclass
class Decision:
    job: Job
    action: str  # done | resume | start | diverged
    run_id: str | None
    epochs_done: int
    epochs_total: int
    finished: int = 0
    why: str = ""


def runs_by_status(tracker, task: str) -> list:
    out = []
    for status in ("FINISHED", "KILLED", "FAILED", "RUNNING"):
        out += tracker.runs(task=task, status=status)
    return out


def matches(run, job: Job) -> bool:
    from rankbench.run.tracking import param_text

    p, tags = run.data.params, run.data.tags
    if tags.get("method") != job.method or tags.get("rankbench.role") == "study" or p.get("seed") != str(job.seed):
        return False
    if job.epochs is not None and p.get("epochs") != str(job.epochs):
        return False
    return all(p.get(k) == param_text(v) for k, v in job.settings)


def decide(tracker, jobs: Sequence[Job], epochs_of: dict[Job, int]) -> list[Decision]:
    """For each job: finished (skip), an unfinished run with a checkpoint (resume the furthest), or start."""
    from rankbench.run import records

    found = runs_by_status(tracker, jobs[0].task) if jobs else []
    out = []
    for job in jobs:
        mine = [r for r in found if matches(r, job)]
        finished = [r for r in mine if r.info.status == "FINISHED"]
        total = epochs_of[job]
        if finished:
            newest = max(finished, key=lambda r: (r.info.end_time or 0, r.info.start_time or 0))
            out.append(Decision(job, "done", newest.info.run_id, total, total, len(finished)))
            continue
        resumable, diverged = [], []
        for r in mine:
            if r.info.status == "RUNNING":
                continue  # a live process (or one mark_dead_runs could not judge): not ours to take
            if r.data.tags.get("failure_reason", "").startswith("TrainingDiverged"):
                diverged.append(r)  # a NaN loss: resuming repeats it (rankbench marks it not resumable)
            elif tracker.checkpoint_path(r.info.run_id).is_file():
                resumable.append((len(tracker.metric_history(r.info.run_id, records.VAL_ACCURACY)), r.info.run_id))
        if resumable:
            epochs, run_id = max(resumable)
            out.append(Decision(job, "resume", run_id, epochs, total))
        elif diverged:
            out.append(Decision(job, "diverged", diverged[0].info.run_id, 0, total,
                                why=diverged[0].data.tags.get("failure_reason", "")[:160]))
        else:
            out.append(Decision(job, "start", None, 0, total))
    return out


# --------------------------------------------------------------------------------------------------- go
@dataclasses.dataclass
class Proc:
    job: Job
    popen: subprocess.Popen
    started: float
    action: str
    run_id: str | None
    log: Any


class StopFlag:
    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self, signum, frame) -> None:
        self.signum = signum


def child_env() -> dict:
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", "1")
    return env


def go(args) -> int:
    t0 = args.t0 or time.time()
    stop_at = t0 + args.deadline_s - args.reserve_s
    flag = StopFlag()
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, flag)
    reg = registry()
    camp = load_campaign(args.study, args.quick, reg)
    data_dir = args.data_dir
    if camp.quick:
        data_dir = quick_data(camp.work / "quick-data", args.data_dir)
    shapes = {job: shape_of(job, data_dir, reg) for job in camp.jobs}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # the store: the last go's parts, else the one already here, else a new one
    parts_dir = Path(args.parts) if args.parts else camp.state
    if parts_dir.is_dir() and list(parts_dir.glob("store.tgz.[0-9][0-9]")):
        if camp.store.exists():
            shutil.rmtree(camp.store)
        camp.work.mkdir(parents=True, exist_ok=True)
        unpack(parts_dir, camp.work)
        say(f"campaign: store unpacked from {parts_dir} ({len(list(parts_dir.glob('store.tgz.*')))} part(s)) "
            f"into {camp.store}")
    elif camp.store.exists() and not args.fresh:
        say(f"campaign: continuing the store at {camp.store}")
    else:
        if camp.store.exists():
            shutil.rmtree(camp.store)
        say(f"campaign: a new store at {camp.store}")
    (camp.store / "logs").mkdir(parents=True, exist_ok=True)
    goes_file = camp.store / "goes.jsonl"
    go_no = 1 + (sum(1 for _ in goes_file.open()) if goes_file.exists() else 0)

    from rankbench.run import tracking
    from rankbench.run.tracking import Tracker

    tracker = Tracker(camp.uri)  # creates and migrates a new store here, once, before any process starts
    tracker.experiment_id(camp.name)  # likewise the experiment: 15 processes would race to create it
    os.environ[tracking.HEARTBEAT_GRACE_ENV] = "1"  # nothing of this store runs now: a RUNNING run is dead
    for run in tracker.mark_dead_runs():
        say(f"campaign: run {run.info.run_id} was RUNNING when its go ended (killed): marked FAILED")
    del os.environ[tracking.HEARTBEAT_GRACE_ENV]
    epochs_of = {j: shapes[j].epochs for j in camp.jobs}
    decisions = decide(tracker, camp.jobs, epochs_of)
    before = {d.job: d for d in decisions}
    say(f"campaign {camp.name}, go {go_no} on {socket.gethostname()} ({device_name(args.device)}): "
        f"{sum(d.action == 'done' for d in decisions)} runs finished, "
        f"{sum(d.action == 'resume' for d in decisions)} to resume, "
        f"{sum(d.action == 'start' for d in decisions)} to start; up to {args.parallel} at once; "
        f"SIGTERM in {stop_at - time.time():.0f} s")
    queue = sorted([d for d in decisions if d.action in ("resume", "start")],
                   key=lambda d: -(d.epochs_total - d.epochs_done) * shapes[d.job].steps_per_epoch
                   * (2.0 if d.job.method == "ours" else 1.0))
    running: list[Proc] = []
    ended: list[dict] = []
    retries: dict[Job, int] = {}
    starts: dict[Job, float] = {}
    python = args.python or sys.executable
    base = [python, "-m", "rankbench.cli", "run", "--device", args.device, "--threads", str(args.threads),
            "--compile", args.compile, "--tracking-uri", camp.uri, "--experiment", camp.name, "--no-progress"]
    if data_dir is not None:
        base += ["--data-dir", str(data_dir)]
    stop_reason = "every run ended"
    samples: list[dict] = []
    next_sample = time.time() + 20
    while queue or running:
        now = time.time()
        if now >= next_sample:
            samples.append(sample_machine(args.device, len(running)))
            next_sample = now + args.sample_s
        if flag.signum is not None:
            stop_reason = f"{signal.Signals(flag.signum).name} to the campaign"
            break
        if now >= stop_at:
            stop_reason = "deadline"
            break
        while queue and len(running) < args.parallel and stop_at - now > args.min_start_s:
            d = queue.pop(0)
            starts.setdefault(d.job, now)
            cmd = [*base, *d.job.args()] + (["--resume", d.run_id] if d.action == "resume" and d.run_id else [])
            log = open(camp.store / "logs" / f"{d.job.key}.log", "a")
            log.write(f"== go {go_no} {time.strftime('%Y-%m-%d %H:%M:%S')} {d.action}: {' '.join(cmd[1:])}\n")
            log.flush()
            running.append(Proc(d.job, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env(),
                                                         cwd=str(camp.work)), now, d.action, d.run_id, log))
        if queue and len(running) < args.parallel and stop_at - now <= args.min_start_s:
            for d in queue:
                ended.append({"job": d.job.key, "action": "not started", "rc": None})
            queue.clear()
        time.sleep(args.poll_s)
        for p in list(running):
            rc = p.popen.poll()
            if rc is None:
                continue
            running.remove(p)
            p.log.close()
            ended.append({"job": p.job.key, "action": p.action, "rc": rc, "seconds": round(time.time() - p.started, 1)})
            if rc != 0 and rc not in (130, 143) and retries.get(p.job, 0) < args.retries and flag.signum is None:
                retries[p.job] = retries.get(p.job, 0) + 1
                again = decide(tracker, [p.job], epochs_of)[0]
                tail = log_tail(camp.store / "logs" / f"{p.job.key}.log")
                say(f"campaign: {p.job.key} ended with exit {rc} (log: {tail}); {again.action} it again")
                if again.action in ("resume", "start"):
                    queue.insert(0, again)
            elif rc != 0:
                say(f"campaign: {p.job.key} ended with exit {rc}: {log_tail(camp.store / 'logs' / f'{p.job.key}.log')}")
    if running:
        say(f"campaign: {stop_reason}: SIGTERM to {len(running)} run(s); "
            "they checkpoint their last epoch and end KILLED")
        for p in running:
            with contextlib.suppress(ProcessLookupError):
                p.popen.send_signal(signal.SIGTERM)
        limit = time.time() + args.stop_grace_s
        while running and time.time() < limit:
            for p in list(running):
                rc = p.popen.poll()
                if rc is not None:
                    running.remove(p)
                    p.log.close()
                    ended.append({"job": p.job.key, "action": p.action, "rc": rc,
                                  "seconds": round(time.time() - p.started, 1)})
            time.sleep(0.2)
        for p in running:
            say(f"campaign: {p.job.key} did not stop within {args.stop_grace_s:.0f} s: SIGKILL (the next go "
                "resumes it from its last checkpoint)")
            with contextlib.suppress(ProcessLookupError):
                p.popen.kill()
            p.popen.wait()
            p.log.close()
            ended.append({"job": p.job.key, "action": p.action, "rc": -9, "seconds": round(time.time() - p.started, 1)})
    t_end = time.time()
    # what this go did; the store is packed before the report, which only reads it
    tracker = Tracker(camp.uri)
    os.environ[tracking.HEARTBEAT_GRACE_ENV] = "1"  # a SIGKILLed run: FAILED now, resumed next go
    tracker.mark_dead_runs()
    del os.environ[tracking.HEARTBEAT_GRACE_ENV]
    after = {d.job: d for d in decide(tracker, camp.jobs, epochs_of)}
    summary = progress_lines(tracker, camp, shapes, before, after, starts, args)
    if samples:
        summary["lines"].append(machine_line(samples))
    record = {"go": go_no, "host": socket.gethostname(), "device": device_name(args.device), "t0": t0,
              "seconds": round(t_end - t0, 1), "parallel": args.parallel, "deadline_s": args.deadline_s,
              "stop": stop_reason, "ended": ended, "rates": summary["rates"], "machine": samples,
              "finished": sum(d.action == "done" for d in after.values())}
    with goes_file.open("a") as fh:
        fh.write(json.dumps(record) + "\n")
    parts = pack(camp.store, out)
    size = sum(p.stat().st_size for p in parts)
    text = "\n".join(summary["lines"])
    (out / "summary.txt").write_text(text + "\n")
    say(text)
    say(f"campaign: store packed into {len(parts)} part(s), {size / 2**20:.1f} MiB: "
        + " ".join(str(p) for p in parts))
    left = t0 + args.deadline_s - time.time()
    if left > args.report_s:
        text += "\n\n" + report_text(camp, python, timeout=left - 5)
        if all(d.action in FINAL_STATES for d in after.values()):
            text += "\n\n" + answer_text(camp.uri, camp.quick)
        say(text[len("\n".join(summary["lines"])):].lstrip("\n"))
        (out / "summary.txt").write_text(text + "\n")
    else:
        say(f"campaign: {left:.0f} s left: no report this go "
            "(`bash benchmarks/gpu_campaign.sh --report` here prints it)")
    say(f"campaign: go {go_no} took {time.time() - t0:.0f} s of its {args.deadline_s:.0f} s")
    return 0


def sample_machine(device: str, running: int) -> dict:
    """The load average and, on a GPU, nvidia-smi's utilisation and memory: whether PARALLEL fills it."""
    out: dict[str, Any] = {"t": round(time.time(), 1), "running": running, "load": round(os.getloadavg()[0], 2)}
    if device.startswith("cuda") and shutil.which("nvidia-smi"):
        with contextlib.suppress(Exception):
            line = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used",
                                   "--format=csv,noheader,nounits"], capture_output=True, text=True,
                                  timeout=5).stdout.splitlines()[0]
            util, mem = (float(x) for x in line.split(","))
            out.update(gpu_util=util, gpu_mem_mib=mem)
    return out


def machine_line(samples: Sequence[dict]) -> str:
    busy = [s for s in samples if s["running"]]
    if not busy:
        return "machine: no sample while runs trained"
    text = (f"machine ({len(busy)} samples while runs trained): load average {min(s['load'] for s in busy):.1f}"
            f"..{max(s['load'] for s in busy):.1f}")
    util = [s["gpu_util"] for s in busy if "gpu_util" in s]
    if util:
        text += (f"; GPU utilisation (nvidia-smi) mean {sum(util) / len(util):.0f} %, max {max(util):.0f} %; "
                 f"GPU memory up to {max(s['gpu_mem_mib'] for s in busy if 'gpu_mem_mib' in s) / 1024:.1f} GiB")
    return text


def log_tail(path: Path, lines: int = 2) -> str:
    try:
        text = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "(no log)"
    return " | ".join(text[-lines:])[-400:]


def device_name(device: str) -> str:
    try:
        import torch

        if device.startswith("cuda") and torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:
        pass
    return device


def progress_lines(tracker, camp: Campaign, shapes: dict, before: dict, after: dict, starts: dict, args) -> dict:
    """Per run: its state before and after this go, the epochs this go trained, and the steps/s it ran
    at (the training loop alone, from the logged train s/batch; and overall, from its process's start to its
    last epoch); then the steps left and the goes they take at the rates measured."""
    from rankbench.run import records

    rows, rates, lines = [], {}, []
    for job in camp.jobs:
        b, a = before[job], after[job]
        run_id = a.run_id or b.run_id
        this_go, loop, wall = 0, None, None
        t0 = starts.get(job)
        if run_id and t0 is not None:
            history = tracker.metric_history(run_id, records.VAL_ACCURACY)
            new = [m for m in history if m.timestamp / 1000 >= t0]
            this_go = len(new)
            spb = [m.value for m in tracker.metric_history(run_id, records.TRAIN_SECONDS_PER_BATCH)
                   if m.timestamp / 1000 >= t0]
            if spb:
                loop = 1 / (sum(spb) / len(spb))
            if new:
                wall = this_go * shapes[job].steps_per_epoch / (max(m.timestamp for m in new) / 1000 - t0)
        rates[job.key] = {"method": job.method, "epochs": this_go, "loop_steps_per_s": loop, "wall_steps_per_s": wall}
        was = {"done": "finished", "start": "new", "resume": "resumed"}.get(b.action, b.action)
        rows.append([job.key, was, f"{b.epochs_done}/{b.epochs_total}",
                     "finished" if a.action == "done" else a.action if a.action == "diverged" else "unfinished",
                     f"{a.epochs_done}/{a.epochs_total}", this_go, f"{loop:.1f}" if loop else "-",
                     f"{wall:.1f}" if wall else "-", (run_id or "-")[:12]])
    from tabulate import tabulate

    lines.append(f"go summary ({camp.name}): epochs per run before and after this go, and the steps/s each process "
                 "ran at (loop: the training loop alone; overall: from its process's start to its last epoch)")
    lines.append(tabulate(rows, headers=["run", "was", "epochs", "now", "epochs", "this go", "loop steps/s",
                                         "overall steps/s", "run id"], disable_numparse=True))
    duplicates = [a.job.key for a in after.values() if a.finished > 1]
    if duplicates:
        lines.append("duplicated finished runs (report counts the newest): " + ", ".join(duplicates))
    left = [(a.epochs_total - a.epochs_done, shapes[j].steps_per_epoch, j) for j, a in after.items()
            if a.action not in FINAL_STATES]
    done_steps = sum(a.epochs_done * shapes[j].steps_per_epoch for j, a in after.items())
    total = sum(s.steps for s in shapes.values())
    lines.append(f"{sum(a.action == 'done' for a in after.values())} of {len(camp.jobs)} runs finished; "
                 f"{done_steps:,} of {total:,} optimisation steps done (whole epochs)")
    by_method: dict[str, list[float]] = {}
    for key, r in rates.items():
        if r["wall_steps_per_s"]:
            by_method.setdefault(r["method"], []).append(r["wall_steps_per_s"])
    if left and by_method:
        fallback = min(min(v) for v in by_method.values())
        step_s = {m: 1 / (sorted(v)[len(v) // 2]) for m, v in by_method.items()}
        window = args.deadline_s - args.reserve_s - args.setup_s
        n = simulate_goes([(e, spe, step_s.get(j.method, 1 / fallback)) for e, spe, j in left], args.parallel,
                          window, 0.0, args.finish_s)
        lines.append("measured this go (median overall steps/s per process): "
                     + ", ".join(f"{m} {1 / s:.1f}" for m, s in step_s.items())
                     + f"; at these rates the {len(left)} unfinished run(s) take {n if n else '> 99'} more go(es) "
                       f"of {window:.0f} s")
    elif left:
        lines.append(f"{len(left)} run(s) unfinished; no epoch finished this go, so no rate was measured")
    return {"lines": lines, "rates": rates}


def report_text(camp: Campaign, python: str, timeout: float | None = None) -> str:
    """`rankbench report` on the store (Δ and p against TRN at the nearest compression), as printed."""
    env = child_env()
    base = [python, "-m", "rankbench.cli", "report", "--tracking-uri", camp.uri]
    try:
        done = subprocess.run([*base, "--baseline", "trn"], capture_output=True, text=True, env=env,
                              cwd=str(camp.work), timeout=timeout)
        if done.returncode != 0 and "--baseline trn" in done.stderr:  # no finished TRN run yet
            done = subprocess.run(base, capture_output=True, text=True, env=env, cwd=str(camp.work), timeout=timeout)
    except subprocess.TimeoutExpired:
        return "rankbench report: cut by the go's deadline"
    text = (done.stdout.strip() or "") + ("\n" + done.stderr.strip() if done.stderr.strip() else "")
    return "rankbench report --tracking-uri " + camp.uri + " --baseline trn\n" + text.strip()


def answer_text(uri: str, quick: bool = False) -> str:
    """The Fashion-MNIST answer: every ours row against TRN, at TRN's nearest compression (Welch's t and
    Mann-Whitney p from `rankbench report`'s own comparison) and on the TRN curve interpolated linearly
    in log compression (extrapolated, and said so, outside TRN's range)."""
    import statistics

    from rankbench.report.build import build_report

    rows = build_report(uri, baseline="trn")
    trn = sorted([r for r in rows if r.method == "trn" and r.values("compression")],
                 key=lambda r: statistics.mean(r.values("compression")))
    ours = [r for r in rows if r.method == "ours"]
    if not trn or not ours:
        return "Fashion-MNIST answer: needs finished runs of both ours and trn"
    curve = [(math.log(statistics.mean(r.values("compression"))), statistics.mean(r.values("test_accuracy")))
             for r in trn]

    def on_curve(c: float) -> tuple[float, str]:
        x = math.log(c)
        if x <= curve[0][0]:
            (x0, y0), (x1, y1), how = curve[0], curve[1] if len(curve) > 1 else curve[0], "extrapolated"
        elif x >= curve[-1][0]:
            (x0, y0), (x1, y1), how = curve[-2] if len(curve) > 1 else curve[-1], curve[-1], "extrapolated"
        else:
            i = max(k for k in range(len(curve)) if curve[k][0] <= x)
            (x0, y0), (x1, y1), how = curve[i], curve[i + 1], "interpolated"
        y = y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
        return y, how

    epochs = sorted({r.full_settings.get("epochs", "?") for r in rows})
    lines = [("QUICK rehearsal (a 3,000-image subset, not the protocol; no answer): " if quick else
              "Fashion-MNIST answer (LeNet-5, full Fashion-MNIST, the paper's recipe): ")
             + f"{'/'.join(epochs)} epochs; test accuracy, mean±std over seeds"]
    verdicts = []
    for r in ours:
        acc, comp = r.values("test_accuracy"), r.values("compression")
        c = statistics.mean(comp)
        y, how = on_curve(c)
        base = r.baseline
        p = f"p (Welch) {r.p_welch:.3g}" if r.p_welch is not None else "p (Welch) -"
        if r.p_mwu is not None:
            p += f", p (MWU) {r.p_mwu:.3g}"
        sd = f"±{statistics.stdev(acc):.2f}" if len(acc) > 1 else ""
        bacc = base.values("test_accuracy") if base is not None else []
        bsd = f"±{statistics.stdev(bacc):.2f}" if len(bacc) > 1 else ""
        lines.append(
            f"  ours {r.label.split('(', 1)[-1].rstrip(')')}: {statistics.mean(acc):.2f}{sd} % at {c:.2f}x "
            f"(n={len(acc)}); "
            f"TRN at the nearest compression ({base.label if base else '-'}, "
            f"{statistics.mean(base.values('compression')):.2f}x): {statistics.mean(bacc):.2f}{bsd} %, "
            f"Δ {r.delta:+.2f} points, {p}; TRN curve at {c:.2f}x ({how}): {y:.2f} %, "
            f"ours {statistics.mean(acc) - y:+.2f}")
        verdicts.append(statistics.mean(acc) - y)
    above = sum(v > 0 for v in verdicts)
    lines.append(f"  ours lies above the TRN curve at {above} of {len(verdicts)} compressions"
                 + (": the supplement's claim (ours above uniform TRN at equal compression) holds here"
                    if above == len(verdicts) else ": the supplement's claim does not hold here" if above == 0
                    else ": mixed"))
    return "\n".join(lines)


def quick_data(folder: Path, data_dir: Path | None) -> Path:
    """QUICK: a small Fashion-MNIST (the real files' first images) in IDX format, in ``folder/fashion-mnist``."""
    import numpy as np

    target = folder / "fashion-mnist"
    names = {"train-images-idx3-ubyte": QUICK_TRAIN, "train-labels-idx1-ubyte": QUICK_TRAIN,
             "t10k-images-idx3-ubyte": QUICK_TEST, "t10k-labels-idx1-ubyte": QUICK_TEST}
    if all((target / f"{n}.gz").is_file() for n in names):
        return folder
    source = train_labels("fashion-mnist", data_dir)
    if source is None:
        raise SystemExit("QUICK needs Fashion-MNIST: apt-get install dataset-fashion-mnist, or .gpu-data/fashion-mnist")
    target.mkdir(parents=True, exist_ok=True)
    for name, count in names.items():
        src = source.parent / f"{name}.gz"
        if not src.is_file():
            src = source.parent / name
        opener = gzip.open if src.suffix == ".gz" else open
        with opener(src, "rb") as fh:
            data = fh.read()
        ndim = 3 if "images" in name else 1
        header = bytearray(data[:4 + 4 * ndim])
        header[4:8] = count.to_bytes(4, "big")
        dims = [int.from_bytes(data[4 + 4 * k:8 + 4 * k], "big") for k in range(1, ndim)]
        item = int(np.prod(dims)) if ndim > 1 else 1
        body = data[4 + 4 * ndim:4 + 4 * ndim + count * item]
        with gzip.open(target / f"{name}.gz", "wb") as fh:
            fh.write(bytes(header) + body)
    return folder


# ------------------------------------------------------------------------------------------ take, report
def take(args) -> int:
    camp = load_campaign(args.study, args.quick)
    src = Path(args.dir)
    parts = sorted(src.glob("store.tgz.[0-9][0-9]"))
    if not parts:
        raise SystemExit(f"no store.tgz.NN in {src}")
    camp.state.mkdir(parents=True, exist_ok=True)
    for old in camp.state.glob("store.tgz.*"):
        old.unlink()
    for p in parts:
        shutil.copyfile(p, camp.state / p.name)
    history = camp.state.parent / f"{camp.name}-goes"
    history.mkdir(exist_ok=True)
    n = len(list(history.glob("go*-summary.txt"))) + 1
    for name in ("summary.txt", "campaign.log"):
        if (src / name).is_file():
            shutil.copyfile(src / name, history / f"go{n:02d}-{name.replace('.txt', '').replace('.log', '')}"
                            f"{'.txt' if name.endswith('.txt') else '.log'}")
    size = sum(p.stat().st_size for p in parts)
    carried = camp.state.relative_to(ROOT) if camp.state.is_relative_to(ROOT) else camp.state
    say(f"took {len(parts)} part(s) ({size / 2**20:.1f} MiB) into {camp.state}; the next go unpacks them "
        f"(carry '{carried}'); text in {history}")
    say(carry_line(camp))
    return 0


def carry_line(camp: Campaign) -> str:
    """What the next device call sends: the working tree git would (tracked, and untracked files it does not
    ignore) plus the three carried folders, against the device's 64 MiB."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True).stdout.split(b"\0")
    tree = sum((ROOT / f.decode()).stat().st_size for f in listed if f and (ROOT / f.decode()).is_file())
    carried = {}
    for path in (ROOT / ".gpu-wheels" / "campaign", ROOT / ".gpu-data" / "fashion-mnist", camp.state):
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0
        carried[str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)] = size
    total = tree + sum(carried.values())
    return (f"the next device call carries {total / 2**20:.1f} MiB of 64: working tree {tree / 2**20:.1f}, "
            + ", ".join(f"{k} {v / 2**20:.1f}" for k, v in carried.items())
            + (" - OVER the limit: see the script's header" if total > 62 * 2**20 else ""))


def report(args) -> int:
    camp = load_campaign(args.study, args.quick)
    if list(camp.state.glob("store.tgz.[0-9][0-9]")):
        if camp.store.exists():
            shutil.rmtree(camp.store)
        camp.work.mkdir(parents=True, exist_ok=True)
        unpack(camp.state, camp.work)
    if not (camp.store / "mlflow.db").exists():
        raise SystemExit(f"no store: nothing in {camp.state} and none at {camp.store}")
    say(report_text(camp, sys.executable))
    from rankbench.run.tracking import Tracker

    reg = registry()
    after = decide(Tracker(camp.uri, create=False), camp.jobs, {j: epochs_of(j, reg) for j in camp.jobs})
    say(f"\n{sum(d.action == 'done' for d in after)} of {len(after)} runs finished")
    if all(d.action in FINAL_STATES for d in after):
        say(answer_text(camp.uri, camp.quick))
    return 0


def check(args) -> int:
    """Every job has exactly one FINISHED run whose per-epoch metrics are steps 1..epochs, each once;
    prints the runs that more than one go trained (resumed) with the goes that trained them."""
    from rankbench.run import records
    from rankbench.run.tracking import Tracker

    camp = load_campaign(args.study, args.quick)
    if args.unpack and list(camp.state.glob("store.tgz.[0-9][0-9]")):
        if camp.store.exists():
            shutil.rmtree(camp.store)
        unpack(camp.state, camp.work)
    tracker = Tracker(camp.uri, create=False)
    found = runs_by_status(tracker, camp.jobs[0].task)
    goes = [json.loads(line) for line in (camp.store / "goes.jsonl").read_text().splitlines()] \
        if (camp.store / "goes.jsonl").exists() else []
    rows, bad = [], []
    for job in camp.jobs:
        mine = [r for r in found if matches(r, job)]
        finished = [r for r in mine if r.info.status == "FINISHED"]
        trained_in = [g["go"] for g in goes if (g["rates"].get(job.key) or {}).get("epochs")]
        if len(finished) != 1:
            bad.append(f"{job.key}: {len(finished)} finished runs")
            rows.append([job.key, len(finished), "-", "-", "-", ",".join(map(str, trained_in))])
            continue
        run = finished[0]
        for key in (records.VAL_ACCURACY, records.TRAIN_LOSS):
            steps = [m.step for m in tracker.metric_history(run.info.run_id, key)]
            if steps != list(range(1, int(run.data.params["epochs"]) + 1)):
                bad.append(f"{job.key}: {key} steps {steps}")
        steps = [m.step for m in tracker.metric_history(run.info.run_id, records.VAL_ACCURACY)]
        contiguous = steps == list(range(1, int(run.data.params["epochs"]) + 1))
        rows.append([job.key, len(finished), len(mine), f"{steps[0]}..{steps[-1]} ({len(steps)})" if steps else "-",
                     "yes" if contiguous else "NO", ",".join(map(str, trained_in)) or "-"])
    table(["run", "finished runs", "runs of its settings", "val_accuracy steps", "contiguous, each once",
           "trained in go(s)"], rows)
    resumed = [r[0] for r in rows if "," in str(r[5])]
    say(f"{len(resumed)} run(s) were trained across goes (cut, then resumed): " + (", ".join(resumed) or "none"))
    if bad:
        say("check FAILED: " + "; ".join(bad))
        return 1
    say(f"check passed: {len(camp.jobs)} runs, each finished once, per-epoch metrics contiguous")
    return 0


# ------------------------------------------------------------------------------------ wheels, device-env
def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheels(args) -> int:
    """pip download of CARRY_PURE (any platform) and CARRY_BINARY (manylinux x86-64, this Python version),
    at the versions installed here; one version of each."""
    import importlib.metadata as md

    dest = Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("*.whl"):
        old.unlink()
    common = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
              args.python_version, "-d", str(dest), "-q"]
    pure = [f"{n}=={md.version(n)}" for n in CARRY_PURE]
    binary = [f"{n}=={md.version(n)}" for n in CARRY_BINARY]
    subprocess.run([*common, "--implementation", "py", "--platform", "any", *pure], check=True)
    platforms = [a for p in MANYLINUX for a in ("--platform", p)]
    subprocess.run([*common, "--implementation", "cp", *platforms, *binary], check=True)
    got = sorted(dest.glob("*.whl"))
    names = [_norm(w.name.split("-")[0]) for w in got]
    twice = {n for n in names if names.count(n) > 1}
    missing = {_norm(n) for n in (*CARRY_PURE, *CARRY_BINARY)} - set(names)
    size = sum(w.stat().st_size for w in got)
    for w in got:
        say(f"  {w.stat().st_size / 2**20:6.2f} MiB  {w.name}")
    say(f"{len(got)} wheels, {size / 2**20:.1f} MiB, in {dest}")
    if twice or missing:
        raise SystemExit(f"wheels: twice {sorted(twice)}, missing {sorted(missing)}")
    return 0


def unpack_wheels(src: Path, site: Path) -> None:
    import zipfile

    if site.exists():
        shutil.rmtree(site)
    site.mkdir(parents=True)
    for w in sorted(src.glob("*.whl")):
        with zipfile.ZipFile(w) as z:
            z.extractall(site)
    for name in STUB_NAMESPACES:
        (site / name).mkdir(exist_ok=True)


def device_env(args) -> int:
    """A venv (``--without-pip``) whose only third-party packages are the ones the device machine has, linked
    from this interpreter's site-packages: mlflow, optuna, sqlalchemy, ... are missing, as there."""
    import collections
    import importlib.metadata as md

    dest = Path(args.dest)
    if dest.exists():
        shutil.rmtree(dest)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(dest / "venv")], check=True)
    site = dest / "device-site"
    site.mkdir(parents=True)
    wanted = {_norm(n) for n in DEVICE_PACKAGES}
    dists = list(md.distributions())
    owners = collections.defaultdict(set)
    for d in dists:
        for f in d.files or []:
            owners[f.parts[0]].add(_norm(d.metadata["Name"]))
    linked = set()
    for d in dists:
        if _norm(d.metadata["Name"]) not in wanted:
            continue
        base = Path(d.locate_file(""))
        for f in d.files or []:
            p = f.parts
            if p[0] in ("..", "__pycache__", "bin") or p[0].endswith(".pth"):
                continue
            link = p[:2] if len(owners[p[0]]) > 1 and len(p) > 2 else p[:1]  # shared namespaces (google/)
            src, dst = base.joinpath(*link), site.joinpath(*link)
            if src.exists() and not os.path.lexists(dst):
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(src, dst)
        linked.add(d.metadata["Name"])
    pyver = f"python{sys.version_info.major}.{sys.version_info.minor}"
    (dest / "venv" / "lib" / pyver / "site-packages" / "device-site.pth").write_text(f"{site}\n")
    say(f"{dest / 'venv' / 'bin' / 'python'}: {len(linked)} of the device's {len(DEVICE_PACKAGES)} packages "
        "(those installed here), nothing else")
    return 0


# ------------------------------------------------------------------------------------------------ main
def env_float(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


def main(argv: Sequence[str] | None = None) -> int:
    quick = bool(os.environ.get("QUICK"))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--study", type=Path, default=Path(os.environ.get("CAMPAIGN_STUDY", STUDY)))
    common.add_argument("--quick", action="store_true", default=quick,
                        help=f"the CPU rehearsal: a small data subset, {QUICK_EPOCHS} epochs (QUICK=1)")
    timing = argparse.ArgumentParser(add_help=False)
    timing.add_argument("--deadline-s", type=float, default=env_float("DEADLINE_S", 570),
                        help="a go ends (packed) within this many seconds of the script's start (DEADLINE_S)")
    timing.add_argument("--reserve-s", type=float, default=env_float("RESERVE_S", 60),
                        help="SIGTERM this long before the deadline: stop grace, report, packing (RESERVE_S)")
    timing.add_argument("--setup-s", type=float, default=env_float("SETUP_S", 20),
                        help="plan: seconds from the script's start to the first training step (SETUP_S)")
    timing.add_argument("--startup-s", type=float, default=env_float("STARTUP_S", 15),
                        help="plan: seconds a process takes before its first step (STARTUP_S)")
    timing.add_argument("--finish-s", type=float, default=env_float("FINISH_S", 10),
                        help="plan: seconds a run takes after its last step: test, export (FINISH_S)")
    timing.add_argument("--parallel", type=int, default=int(os.environ.get("PARALLEL", 15)),
                        help="processes at once (PARALLEL)")
    timing.add_argument("--data-dir", type=Path, default=Path(os.environ["DATA_DIR"]) if os.environ.get("DATA_DIR")
                        else (ROOT / ".gpu-data" if (ROOT / ".gpu-data" / "fashion-mnist").is_dir() else None))
    p = sub.add_parser("plan", parents=[common, timing], help="steps, rates needed, goes")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    p.add_argument("--results", type=Path, default=RESULTS, help="where the measured GPU numbers are")
    g = sub.add_parser("go", parents=[common, timing], help="one go")
    g.add_argument("--device", default=os.environ.get("DEVICE", "cuda"))
    g.add_argument("--threads", type=int, default=1)
    g.add_argument("--compile", default=os.environ.get("COMPILE", "off"))
    g.add_argument("--out", default=os.environ.get("OUT") or str(WORK_ROOT / "out"))
    g.add_argument("--parts", default=os.environ.get("PARTS"), help="folder of the last go's store.tgz.NN "
                   "(default .gpu-campaign/NAME)")
    g.add_argument("--fresh", action="store_true", help="without parts: a new store, not the one in the work folder")
    g.add_argument("--t0", type=float,
                   default=float(os.environ["CAMPAIGN_T0"]) if os.environ.get("CAMPAIGN_T0") else None)
    g.add_argument("--stop-grace-s", type=float, default=env_float("STOP_GRACE_S", 25))
    g.add_argument("--min-start-s", type=float, default=env_float("MIN_START_S", 30),
                   help="no process starts later than this before the SIGTERM")
    g.add_argument("--retries", type=int, default=1, help="a run that fails (not stopped) is retried this often per go")
    g.add_argument("--poll-s", type=float, default=1.0)
    g.add_argument("--sample-s", type=float, default=30.0, help="load and GPU utilisation sampled this often")
    g.add_argument("--report-s", type=float, default=env_float("REPORT_S", 12),
                   help="the report runs only if this much time is left before the deadline")
    g.add_argument("--python", default=os.environ.get("PYTHON"))
    t = sub.add_parser("take", parents=[common], help="a go's returned parts, for the next go")
    t.add_argument("dir")
    sub.add_parser("report", parents=[common], help="report (and answer) from the latest parts")
    c = sub.add_parser("check", parents=[common], help="every run finished once, metrics contiguous")
    c.add_argument("--unpack", action="store_true", help="from the parts in .gpu-campaign/NAME")
    w = sub.add_parser("wheels", help="download the carry wheels")
    w.add_argument("--dest", default=str(ROOT / ".gpu-wheels" / "campaign"))
    w.add_argument("--python-version", default="3.12")
    u = sub.add_parser("unpack-wheels", help="unzip the carry wheels into a site folder")
    u.add_argument("src", type=Path)
    u.add_argument("site", type=Path)
    d = sub.add_parser("device-env", help="a venv with only the device machine's packages")
    d.add_argument("dest")
    args = parser.parse_args(argv)
    if args.command == "plan":
        numbers = plan(args)
        if args.json:
            args.json.write_text(json.dumps(numbers, indent=1, default=str))
        return 0
    if args.command == "unpack-wheels":
        unpack_wheels(args.src, args.site)
        return 0
    return {"go": go, "take": take, "report": report, "check": check, "wheels": wheels,
            "device-env": device_env}[args.command](args)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BrokenPipeError:  # `... --plan | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
