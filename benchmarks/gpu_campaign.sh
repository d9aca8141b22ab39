#!/usr/bin/env bash
# The paper's Fashion-MNIST protocol on one lent GPU, in goes (issue 22, item 6).
#
# studies/fmnist_campaign.toml (LeNet-5, full Fashion-MNIST, the paper's recipe: 150 epochs, Adam 5e-4 cosine,
# batch 128; ours at lambda 0.2 and 1.0, sigma 0.5; TRN at rank 10, 15, 20; seeds 0-2: 15 runs) runs as 15
# parallel `rankbench run --device cuda --threads 1 --compile off` processes, one per (point, seed): an eager
# LeNet-5 step is launch-bound (profile_h100.txt: 1.1 ms of GPU time in a 13.6 ms step), so one process leaves
# the GPU mostly idle and 15 of them, on the machine's 16 cores, share it. (`rankbench study` would run one
# process per trial with its 3 seeds one after another: 5 processes, 3x longer.) One go fits one device call:
#
#   bash benchmarks/gpu_campaign.sh --plan     # here, no GPU: steps, steps/s needed per process, goes it takes
#   bash benchmarks/gpu_campaign.sh            # a go (device): at most DEADLINE_S=570 s from its first line
#
# A go unpacks the last go's store (.gpu-campaign/fmnist_campaign/store.tgz.NN, if carried), marks runs of a
# go that was cut by SIGKILL FAILED, skips finished runs, resumes unfinished ones from their last epoch's
# checkpoint (`rankbench run ... --resume RUN_ID`: same MLflow run, no epoch twice), starts the others, and
# SIGTERMs every process RESERVE_S=60 s before the deadline (rankbench checkpoints, marks the run KILLED, exit
# 143; one that has not stopped STOP_GRACE_S=25 s later is SIGKILLed and resumed from its last checkpoint next
# time). It then prints the runs' progress with the steps/s each process ran at and the goes left at that
# rate, `rankbench report --baseline trn` (Δ and Welch/Mann-Whitney p against TRN at the nearest compression)
# and, once all 15 runs are finished, the Fashion-MNIST answer (ours vs the TRN curve, with p-values); and
# packs the whole store (MLflow sqlite db, artifacts, checkpoints, logs, goes.jsonl) into ONE tar.gz, split
# in parts of at most 15 MiB, in $OUT: store.tgz.00 [.01 ...], summary.txt, campaign.log.
# The store lives at /tmp/rankbench-campaign/fmnist_campaign/store on every machine (CAMPAIGN_ROOT): MLflow
# records an experiment's artifact folder as an absolute path, so every go (and a report here) unpacks there.
#
# The device machine (nvidia-h200) has torch, numpy, scipy, pandas, tabulate, tqdm, opt-einsum, filelock but
# no mlflow, sqlalchemy, alembic, pydantic, ... (/work/.library/device/KINDS.md); the 22 wheels it lacks
# (benchmarks/campaign.py CARRY_PURE, CARRY_BINARY; about 15 MiB; optuna is not needed: no study runs) are
# carried as .whl files and unzipped into /tmp/rankbench-campaign/site-py312 by each go. Built here once with
#   python benchmarks/campaign.py wheels --python-version 3.12 --dest .gpu-wheels/campaign
# which runs, at the versions installed here (this checkout's mlflow then reads the stores a go returns):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation py --platform any \
#     -d .gpu-wheels/campaign mlflow-skinny==3.17.2 sqlalchemy==2.1.9 alembic==1.20.1 mako==1.4.3 \
#     sqlparse==0.6.1 cachetools==7.3.3 pydantic==2.13.4 annotated-types==0.7.0 typing-inspection==0.4.2 \
#     typing-extensions==4.16.0 importlib-metadata==9.1.0 opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 \
#     opentelemetry-proto==1.45.2 opentelemetry-semantic-conventions==0.66b2 fastapi==0.165.0 \
#     starlette==1.10.0 platformdirs==4.14.9
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .gpu-wheels/campaign pydantic-core==2.46.4 cryptography==48.0.0 cffi==2.0.0 protobuf==7.36.2
# (sqlalchemy as its pure-Python wheel; cryptography and protobuf are abi3 wheels; 22 wheels, 14.7 MiB).
# (mlflow probes importlib.util.find_spec("databricks.agents"), which raises without a databricks package: each
# go makes an empty `databricks` namespace folder instead of carrying databricks-sdk and google-auth.)
# Fashion-MNIST travels as in gpu.sh: mkdir -p .gpu-data/fashion-mnist && cp /usr/share/datasets/fashion-mnist/*.gz
# .gpu-data/fashion-mnist/  (29.4 MiB). Carried in all: 45.7 MiB with the tree, plus the store (at most ~13 MiB:
# 15 checkpoints of 0.2-1.3 MB and the db), under the 64 MiB a call takes; `--take` prints the sum.
#
# The device call (the device tool's `run`), one per session (a go plus the machine's start is ~11 of the 15
# device minutes):
#   command:   bash benchmarks/gpu_campaign.sh
#   carry:     [".gpu-wheels/campaign", ".gpu-data/fashion-mnist", ".gpu-campaign/fmnist_campaign"]
#   timeout_s: 600
# then, here, with the reply's files_at folder:
#   bash benchmarks/gpu_campaign.sh --take FILES_AT    # its store parts become the next go's; text kept beside
#   bash benchmarks/gpu_campaign.sh --report           # the report (and the answer once every run finished)
#
# Rehearsal on a CPU (tiny: the first 3,500/1,000 images of the real files, 500 for validation, 3 epochs,
# 3 processes; its own campaign fmnist_campaign-quick, so nothing here touches the real one). On the 2-core VM:
#   DEVICE=cpu QUICK=1 DEADLINE_S=120 OUT=/tmp/reh/go1 bash benchmarks/gpu_campaign.sh  # cut by its deadline
#   QUICK=1 bash benchmarks/gpu_campaign.sh --take /tmp/reh/go1
#   DEVICE=cpu QUICK=1 DEADLINE_S=600 OUT=/tmp/reh/go2 bash benchmarks/gpu_campaign.sh  # resumes, finishes
#   QUICK=1 bash benchmarks/gpu_campaign.sh --take /tmp/reh/go2
#   QUICK=1 bash benchmarks/gpu_campaign.sh --check     # each run finished once, epochs contiguous
# To prove the carry list complete, run those with PYTHON=/tmp/dev/venv/bin/python WHEELS=/tmp/wheels-py311 after
#   python benchmarks/campaign.py device-env /tmp/dev      # a venv with only the device machine's packages
#   python benchmarks/campaign.py wheels --python-version 3.11 --dest /tmp/wheels-py311   # this Python's build
# Settings (environment): DEVICE (cuda), PARALLEL (15; QUICK 3), DEADLINE_S (570), RESERVE_S (60; QUICK 25),
# STOP_GRACE_S (25; QUICK 15), MIN_START_S (30; QUICK 10), COMPILE (off), OUT (/tmp/rankbench-campaign/out),
# WHEELS (.gpu-wheels/campaign), PYTHON (python3), CAMPAIGN_STUDY (studies/fmnist_campaign.toml), CAMPAIGN_ROOT
# (/tmp/rankbench-campaign), CAMPAIGN_STATE (.gpu-campaign),
# MPS=1 (start CUDA's MPS daemon for the go; not tried on the lent machines yet).
set -euo pipefail
CAMPAIGN_T0=$(date +%s.%N)  # a go's deadline counts from here
export CAMPAIGN_T0
cd "$(dirname "$0")/.."
repo=$PWD
py=${PYTHON:-python3}
export CAMPAIGN_ROOT=${CAMPAIGN_ROOT:-/tmp/rankbench-campaign}
root=$CAMPAIGN_ROOT
mkdir -p "$root"
mode=go
case "${1:-}" in
  --plan) mode=plan; shift ;;
  --take|--report|--check|--device-env) mode=${1#--}; shift ;;
  --wheels) mode=wheels; shift ;;
  "") ;;
  *) echo "usage: bash benchmarks/gpu_campaign.sh [--plan | --take DIR | --report | --check | --wheels]" >&2; exit 2 ;;
esac
if [[ -n "${PLAN:-}" ]]; then mode=plan; fi
if [[ -n "${QUICK:-}" ]]; then
  export PARALLEL=${PARALLEL:-3} RESERVE_S=${RESERVE_S:-25} STOP_GRACE_S=${STOP_GRACE_S:-15} MIN_START_S=${MIN_START_S:-10}
fi
case $mode in
  wheels) exec "$py" benchmarks/campaign.py wheels "$@" ;;
  device-env) exec "$py" benchmarks/campaign.py device-env "$@" ;;
esac

# rankbench from this tree. Without an install (the device machine's copy), a shadow package maps
# rankbench.tasks and rankbench.methods to tasks/ and methods/ as pyproject.toml does, outside the tree.
paths=()
if ! (cd "$root" && "$py" -c "import rankbench.tasks, rankbench.methods") 2>/dev/null; then
  shadow=$root/pkg
  rm -rf "$shadow" && mkdir -p "$shadow/rankbench"
  for entry in rankbench/*; do ln -sfn "$repo/$entry" "$shadow/rankbench/$(basename "$entry")"; done
  ln -sfn "$repo/tasks" "$shadow/rankbench/tasks"
  ln -sfn "$repo/methods" "$shadow/rankbench/methods"
  paths+=("$shadow")
fi
# mlflow and the rest, from the carried wheels where this Python lacks them.
wheels=${WHEELS:-$repo/.gpu-wheels/campaign}
have() { (cd "$root" && PYTHONPATH="$(IFS=:; echo "${paths[*]-}")${PYTHONPATH:+:$PYTHONPATH}" "$py" -c "$1") 2>/dev/null; }
if ! have "import mlflow, sqlalchemy, alembic, pydantic"; then
  if ! ls "$wheels"/*.whl >/dev/null 2>&1; then
    echo "gpu_campaign: this Python has no mlflow and $wheels holds no wheels: build them (see this script's header)" >&2
    exit 3
  fi
  site=$root/site-py$("$py" -c 'import sys; print("%d%d" % sys.version_info[:2])')
  "$py" benchmarks/campaign.py unpack-wheels "$wheels" "$site"
  paths+=("$site")
  echo "gpu_campaign: $(ls "$wheels"/*.whl | wc -l) carried wheels unzipped into $site"
fi
if ((${#paths[@]})); then
  PYTHONPATH="$(IFS=:; echo "${paths[*]}")${PYTHONPATH:+:$PYTHONPATH}"
  export PYTHONPATH
fi
export PYTHONUNBUFFERED=1 PYTHON=$py

case $mode in
  plan) exec "$py" benchmarks/campaign.py plan "$@" ;;
  take) exec "$py" benchmarks/campaign.py take "$@" ;;
  report) exec "$py" benchmarks/campaign.py report "$@" ;;
  check) exec "$py" benchmarks/campaign.py check --unpack "$@" ;;
esac

# A go. First, in seconds, everything a run imports: a missing package stops here, not in 15 processes.
if ! preflight=$(cd "$root" && "$py" -c "
import sys, torch, mlflow, sqlalchemy, alembic, rankbench.cli, rankbench.tasks, rankbench.methods, mlflow.pytorch
from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
print(f'python {sys.version.split()[0]}, torch {torch.__version__} (cuda: {torch.cuda.is_available()}), '
      f'mlflow {mlflow.__version__}, sqlalchemy {sqlalchemy.__version__}, rankbench from {rankbench.cli.__file__}')
if '${DEVICE:-cuda}'.startswith('cuda') and not torch.cuda.is_available():
    raise SystemExit('DEVICE=${DEVICE:-cuda} but torch sees no CUDA device (DEVICE=cpu rehearses on the CPU)')
" 2>&1); then
  echo "gpu_campaign: cannot import what a run needs:" >&2
  echo "$preflight" | tail -5 >&2
  "$py" -m pip list 2>/dev/null | grep -i -E "mlflow|sqlalchemy|alembic|pydantic|protobuf|typing|packaging|anyio|starlette|fastapi|opentelemetry|cryptography|cffi" >&2 || true
  exit 3
fi
echo "gpu_campaign: $preflight"
export OUT=${OUT:-$root/out}
mkdir -p "$OUT"
if [[ -n "${MPS:-}" && "${DEVICE:-cuda}" == cuda* ]] && command -v nvidia-cuda-mps-control >/dev/null; then
  export CUDA_MPS_PIPE_DIRECTORY=$root/mps-pipe CUDA_MPS_LOG_DIRECTORY=$root/mps-log
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  if nvidia-cuda-mps-control -d; then
    trap 'echo quit | nvidia-cuda-mps-control || true' EXIT
    echo "gpu_campaign: CUDA MPS daemon started"
  fi
fi
set -o pipefail
"$py" benchmarks/campaign.py go "$@" 2>&1 | tee "$OUT/campaign.log"
