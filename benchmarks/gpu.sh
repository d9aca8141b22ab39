#!/usr/bin/env bash
# Every GPU check of the GPU issue, in two device calls of the 15 minutes a session gets
# (each step has a time limit; a step cut short keeps what it printed, marked "(cut at N s)"):
#
#   STEPS="models-lenet5 profile device-check" bash benchmarks/gpu.sh   # call 1: at most 500 s, timeout_s 560
#   STEPS="models-resnet32" bash benchmarks/gpu.sh                      # call 2: at most 270 s, timeout_s 290
#
# (no STEPS: every step, in that order, at most 770 s: more than one device call allows). On the first H100 run (one call, 240 s for both tasks) the
# ResNet-32 compiles did not finish, nor did device_check's eager+compiled 2 epochs in 120 s.
# models-lenet5, models-resnet32: benchmarks/models.py --compile: training steps and inference, eager and
#    torch.compile'd (CUDA graphs), all rows interleaved; the GPU targets, PASS or MISS.
# profile: benchmarks/profile_step.py: where a step's time goes (top kernels, CPU vs device time), for ours
#    on both tasks, eager and compiled, with the count of CUDA graph recordings (0 expected after warm-up):
#    the README quotes it for every MISS.
# compile-cost (not in the default list; STEPS="compile-cost", at most 240 s): benchmarks/compile_cost.py: seconds
#    to the first compiled ResNet-32 step with CUDA graphs (target <= 60 s) and the traced graphs' sizes.
# device-check: benchmarks/device_check.py: device outputs equal CPU outputs (float64), and rankbench's own
#    training loop on LeNet-5 over the full Fashion-MNIST (dense, trn, ours; compiled; 1 epoch; epochs/s;
#    the eager numbers are in benchmarks/results/device_check_h100.txt).
#
# Writes benchmarks/results/{models,profile,device_check}_<gpu>.txt (<gpu>: h100, h200, ...; ResNet-32's
# models table to models_resnet32_<gpu>.txt) and copies them to $OUT when it is set (the device tool's
# output folder).
# The device machine has torch with CUDA only: the pure-Python packages rankbench imports travel in
# .gpu-wheels/ (git-ignored), made here with
#   pip download --no-deps -d .gpu-wheels tabulate opt_einsum platformdirs filelock tqdm mlxtend
#   (cd .gpu-wheels && for w in *.whl; do python -m zipfile -e "$w" .; done && rm *.whl)
# and Fashion-MNIST in .gpu-data/fashion-mnist/ (the four IDX .gz files of Debian's dataset-fashion-mnist);
# carry both.
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
steps=" ${STEPS:-models-lenet5 profile device-check models-resnet32} "
if [[ -n "${QUICK:-}" ]]; then
  models=(--batch 8 --steps 2 --test-size 16 --compile-backend aot_eager)
  profile=(--batch 8 --steps 1 --rows 5 --compile-backend aot_eager)
  check=(--epochs 1 --compile-backend aot_eager)
  results=${OUT:-/tmp}/gpu-rehearsal
  mkdir -p "$results"
  export MODELS_S=${MODELS_S:-1200} PROFILE_S=${PROFILE_S:-300} PROFILE_COMPILED_S=${PROFILE_COMPILED_S:-600}
  export CHECK_S=${CHECK_S:-1200} MODELS_RESNET32_S=${MODELS_RESNET32_S:-1200}  # a CPU compiles far slower
else
  models=(--steps 30)
  profile=(--steps 10)
  check=(--epochs 1)
fi
data=()
if [[ -d .gpu-data/fashion-mnist ]]; then data=(--dataset fashion-mnist --data-dir .gpu-data); fi

step() {  # step LIMIT OUTFILE COMMAND...
  local limit=$1 out=$2; shift 2
  timeout --signal=INT "$limit" "$@" | tee -a "$out" || echo "(cut at $limit s, or failed: exit ${PIPESTATUS[0]})" | tee -a "$out"
}
written=()
if [[ $steps == *" models-lenet5 "* ]]; then
  rm -f "$results/models_${gpu}.txt"; written+=("$results/models_${gpu}.txt")
  step "${MODELS_S:-160}" "$results/models_${gpu}.txt" \
    python benchmarks/models.py --device "$device" --task lenet5 --compile "${models[@]}"
fi
if [[ $steps == *" profile "* ]]; then
  rm -f "$results/profile_${gpu}.txt"; written+=("$results/profile_${gpu}.txt")
  for task in lenet5 resnet32; do
    step "${PROFILE_S:-40}" "$results/profile_${gpu}.txt" \
      python benchmarks/profile_step.py --device "$device" --task "$task" --method ours "${profile[@]}"
    step "${PROFILE_COMPILED_S:-50}" "$results/profile_${gpu}.txt" \
      python benchmarks/profile_step.py --device "$device" --task "$task" --method ours --compile "${profile[@]}"
  done
fi
if [[ $steps == *" device-check "* ]]; then
  rm -f "$results/device_check_${gpu}.txt"; written+=("$results/device_check_${gpu}.txt")
  step "${CHECK_S:-160}" "$results/device_check_${gpu}.txt" \
    python benchmarks/device_check.py --device "$device" --compile on "${check[@]}" "${data[@]}"
fi
if [[ $steps == *" models-resnet32 "* ]]; then
  rm -f "$results/models_resnet32_${gpu}.txt"; written+=("$results/models_resnet32_${gpu}.txt")
  step "${MODELS_RESNET32_S:-270}" "$results/models_resnet32_${gpu}.txt" \
    python benchmarks/models.py --device "$device" --task resnet32 --compile "${models[@]}"
fi
if [[ $steps == *" compile-cost "* ]]; then
  rm -f "$results/compile_cost_${gpu}.txt"; written+=("$results/compile_cost_${gpu}.txt")
  step "${COMPILE_COST_S:-240}" "$results/compile_cost_${gpu}.txt" \
    python benchmarks/compile_cost.py --device "$device" ${QUICK:+--backend aot_eager --methods trn}
fi
if [[ -n "${OUT:-}" && "$results" != "${OUT}/gpu-rehearsal" && ${#written[@]} -gt 0 ]]; then cp "${written[@]}" "$OUT"/; fi
