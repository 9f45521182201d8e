#!/usr/bin/env bash
# Side-by-side GPU benchmark of drsformer-jax and the release's PyTorch model, one JSON.
#
#   tools/gpu_benchmark.sh PATH/TO/DRSformer-release [OUT.json]
#   TINY=1 tools/gpu_benchmark.sh PATH [OUT.json]   # tiny model, the GPU program, on the CPU
#   DRY_RUN=1 tools/gpu_benchmark.sh PATH           # print the plan and budget, run nothing
#
# Environment: PYTHON (default python3), GPU (the one GPU both frameworks use, default
# 0), JAX_TIMEOUT / TORCH_TIMEOUT / SUMMARY_TIMEOUT (seconds per process; their sum,
# kill grace included, must stay within BUDGET, default 480 s), TORCH_DEVICE.
#
# Needs, in $PYTHON: jax with CUDA (jax[cuda12]), flax, optax, einops, numpy (what
# `import drsformer_jax.benchmark` loads: no orbax, TensorFlow or ml-collections);
# for the comparison torch (CUDA) and a checkout of the release. Without torch or the
# release the comparison is recorded as unavailable and the JAX part still runs.
#
# Three processes, one after the other, on the same single GPU (CUDA_VISIBLE_DEVICES):
# 1. JAX (tools/gpu_extras.py jax): train step at global batch 16 and 8, 128x128,
#    float32 and bfloat16; 256x256 and 512x512 forward, float32 and bfloat16. Each
#    program is compiled ahead of time and its memory (XLA's memory_analysis on this
#    device) checked against the free device memory before it runs: what cannot fit
#    is recorded as skipped. Then, from those compiled programs, the largest 128x128
#    train batch (checked by one step at the prediction, stepping down on fresh
#    arguments), the same line with remat, inference memory per pixel.
# 2. PyTorch (tools/gpu_extras.py torch): the release on the same runs, float32 and
#    torch.autocast(bfloat16), a run skipped when its peak predicted from a smaller
#    one exceeds the free memory.
# 3. The table: times, ratios, compile times, model FLOP utilisation (XLA's cost
#    analysis over the step time, against the H100/H200 SXM dense peak of what XLA
#    runs: 990 TFLOP/s bf16, 495 TFLOP/s TF32 for float32 at the default precision).
# Each process has a timeout and a deadline a little before it (no run starts that
# would likely end after it) and rewrites its JSON after every run: a timeout loses
# only the run in progress.
set -u
REF=${1:?usage: tools/gpu_benchmark.sh PATH/TO/DRSformer-release [OUT.json]}
OUT=${2:-gpu_benchmark.json}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
GPU=${GPU:-0}
BUDGET=${BUDGET:-480}
JAX_TIMEOUT=${JAX_TIMEOUT:-300}
TORCH_TIMEOUT=${TORCH_TIMEOUT:-120}
SUMMARY_TIMEOUT=${SUMMARY_TIMEOUT:-30}
KILL_AFTER=5  # a process that ignores the timeout's TERM is killed this much later
case $OUT in /*) ;; *) OUT=$PWD/$OUT ;; esac
case $REF in /*) ;; *) REF=$PWD/$REF ;; esac

if [ "${TINY:-0}" = 1 ]; then
  # The host's CPU runs the GPU's program (gpu_extras --tiny): the script checked anywhere.
  export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
  # TINY checks the program, not its speed: LLVM at -O0 cut a tiny train step's compile
  # on the 2-core host from 157 s to 92 s.
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_backend_optimization_level=0"
  MODE=(--tiny --steps 1 --warmup 0); TORCH_DEVICE=${TORCH_DEVICE:-cpu}
else
  MODE=(--steps 5); TORCH_DEVICE=${TORCH_DEVICE:-cuda}
fi
# Both frameworks see the same one GPU; JAX allocates as it goes, so PyTorch gets the
# device back after the JAX process ends.
export CUDA_VISIBLE_DEVICES=$GPU
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}

WORST=$(( JAX_TIMEOUT + TORCH_TIMEOUT + SUMMARY_TIMEOUT + 3 * KILL_AFTER ))
FITS="<="; (( WORST > BUDGET )) && FITS=">"
echo "python: $("$PYTHON" -c 'import sys; print(sys.executable, sys.version.split()[0])' \
  || echo "$PYTHON not found")"
echo "gpu: CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES, torch device $TORCH_DEVICE, tiny ${TINY:-0}"
echo "budget: jax ${JAX_TIMEOUT} s + torch ${TORCH_TIMEOUT} s + summary ${SUMMARY_TIMEOUT} s" \
     "+ 3 x ${KILL_AFTER} s kill grace = ${WORST} s ${FITS} ${BUDGET} s"
if (( WORST > BUDGET )); then
  echo "error: worst case ${WORST} s is over the budget of ${BUDGET} s" >&2
  exit 2
fi
if [ "${DRY_RUN:-0}" = 1 ]; then
  exit 0
fi

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cd "$ROOT" || exit 1
START=$SECONDS

echo "== JAX (timeout ${JAX_TIMEOUT} s)" >&2
timeout -k "$KILL_AFTER" "$JAX_TIMEOUT" "$PYTHON" tools/gpu_extras.py jax "${MODE[@]}" \
  --deadline "$(( JAX_TIMEOUT - 15 ))" --json "$WORK/jax.json" > /dev/null
echo "JAX process: exit $?, $(( SECONDS - START )) s so far" >&2

echo "== PyTorch (timeout ${TORCH_TIMEOUT} s)" >&2
JAX_PLATFORMS=cpu timeout -k "$KILL_AFTER" "$TORCH_TIMEOUT" "$PYTHON" tools/gpu_extras.py \
  torch "${MODE[@]}" --deadline "$(( TORCH_TIMEOUT - 10 ))" --reference-repo "$REF" \
  --device "$TORCH_DEVICE" --json "$WORK/torch.json" > /dev/null
echo "PyTorch process: exit $?, $(( SECONDS - START )) s so far" >&2

JAX_PLATFORMS=cpu timeout -k "$KILL_AFTER" "$SUMMARY_TIMEOUT" "$PYTHON" tools/gpu_extras.py \
  summary "$WORK/jax.json" "$WORK/torch.json" --out "$OUT"
echo "total: $(( SECONDS - START )) s (budget ${WORST} s)"
