#!/usr/bin/env bash
# Every GPU check of the GPU issue in one call (at most about 9.3 minutes on an H100/H200, most of it compiling;
# each step has a time limit), from the repository root:
#
#   bash benchmarks/gpu.sh
#
# 1. benchmarks/models.py --compile: LeNet-5 and ResNet-32 training steps and inference, eager and
#    torch.compile'd (CUDA graphs), all rows interleaved; the GPU targets, PASS or MISS.
# 2. benchmarks/profile_step.py: where a step's time goes (top kernels, CPU vs device time), for ours
#    on both tasks, eager and compiled: the README quotes it for every MISS.
# 3. benchmarks/device_check.py: device outputs equal CPU outputs (float64), and rankbench's own training
#    loop on LeNet-5 over the full Fashion-MNIST (dense, trn, ours; eager and compiled; epochs/s).
#
# Writes benchmarks/results/{models,profile,device_check}_<gpu>.txt (<gpu>: h100, h200, ...) and copies
# them to $OUT when it is set (the device tool's output folder).
# The device machine has torch with CUDA only: the pure-Python packages rankbench imports travel in
# .gpu-wheels/ (git-ignored), made here with
#   pip download --no-deps -d .gpu-wheels tabulate opt_einsum platformdirs filelock tqdm mlxtend
#   (cd .gpu-wheels && for w in *.whl; do python -m zipfile -e "$w" .; done)
# and Fashion-MNIST in .gpu-data/fashion-mnist/ (the four IDX .gz files of Debian's dataset-fashion-mnist).
# DEVICE=cpu QUICK=1 bash benchmarks/gpu.sh rehearses every step on a CPU with tiny sizes.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD:$PWD/.gpu-wheels${PYTHONPATH:+:$PYTHONPATH}"
# Without an install (the device machine's copy of the tree), rankbench.methods and rankbench.tasks are the
# checkout's methods/ and tasks/, as pyproject.toml maps them.
if ! python -c "import rankbench.tasks" 2>/dev/null; then
  ln -sfn ../tasks rankbench/tasks
  ln -sfn ../methods rankbench/methods
fi
device=${DEVICE:-cuda}
gpu=$(python -c "import torch; print(torch.cuda.get_device_name(0).split()[1].lower() if torch.cuda.is_available() else 'cpu')")
results=benchmarks/results
if [[ -n "${QUICK:-}" ]]; then
  models=(--batch 8 --steps 2 --test-size 16 --compile-backend aot_eager)
  profile=(--batch 8 --steps 1 --rows 5 --compile-backend aot_eager)
  check=(--epochs 1 --compile-backend aot_eager)
  results=${OUT:-/tmp}/gpu-rehearsal
  mkdir -p "$results"
  MODELS_S=${MODELS_S:-1200} PROFILE_S=${PROFILE_S:-300} PROFILE_COMPILED_S=${PROFILE_COMPILED_S:-600}
  CHECK_S=${CHECK_S:-1200}  # a CPU compiles far slower than the GPU machine
else
  models=(--steps 30)
  profile=(--steps 10)
  check=(--epochs 2)
fi
data=()
if [[ -d .gpu-data/fashion-mnist ]]; then data=(--dataset fashion-mnist --data-dir .gpu-data); fi

# Each step has its own time limit (seconds: MODELS_S 240, PROFILE_S 30, PROFILE_COMPILED_S 50, CHECK_S 120; about
# 9.3 minutes in all), so one slow compile cannot eat the call (the device tool allows 600 s): a step cut short
# keeps what it printed, marked "(cut at N s)". Give the device call timeout_s=590.
step() {  # step LIMIT OUTFILE COMMAND...
  local limit=$1 out=$2; shift 2
  timeout --signal=INT "$limit" "$@" | tee -a "$out" || echo "(cut at $limit s, or failed: exit ${PIPESTATUS[0]})" | tee -a "$out"
}
rm -f "$results"/{models,profile,device_check}_"${gpu}".txt
step "${MODELS_S:-240}" "$results/models_${gpu}.txt" \
  python benchmarks/models.py --device "$device" --task lenet5,resnet32 --compile "${models[@]}"
for task in lenet5 resnet32; do
  step "${PROFILE_S:-30}" "$results/profile_${gpu}.txt" \
    python benchmarks/profile_step.py --device "$device" --task "$task" --method ours "${profile[@]}"
  step "${PROFILE_COMPILED_S:-50}" "$results/profile_${gpu}.txt" \
    python benchmarks/profile_step.py --device "$device" --task "$task" --method ours --compile "${profile[@]}"
done
step "${CHECK_S:-120}" "$results/device_check_${gpu}.txt" \
  python benchmarks/device_check.py --device "$device" --compile off,on "${check[@]}" "${data[@]}"
if [[ -n "${OUT:-}" && "$results" != "${OUT}/gpu-rehearsal" ]]; then cp "$results"/*_"${gpu}".txt "$OUT"/; fi
