#!/usr/bin/env bash
# Side-by-side GPU benchmark of drsformer-jax and the release's PyTorch model, one JSON.
#
#   tools/gpu_benchmark.sh PATH/TO/DRSformer-release [OUT.json]
#   TINY=1 tools/gpu_benchmark.sh PATH [OUT.json]     # tiny sizes: checks the script on CPU
#
# Needs jax (CUDA), flax, optax, orbax, einops, torch; no TensorFlow. Note: importing
# drsformer_jax.train also imports the data pipeline, which needs ml-collections (pure
# Python): on a host without it, `pip download ml-collections --no-deps -d wheels` here and
# `pip install --no-deps wheels/ml_collections-*.whl` there (it also needs absl-py, PyYAML).
#
# Prints and writes: train step at global batch 16 and 8, 128x128, ours float32 and
# bfloat16 against the release float32 and torch.autocast(bfloat16); 256x256 and
# 512x512 inference, same pairs; compile times; model FLOP utilisation (XLA's cost
# analysis over the step time, against the H100/H200 SXM dense peak of the arithmetic
# XLA runs: 990 TFLOP/s bf16, 495 TFLOP/s TF32 for float32 at the default matmul
# precision, 67 TFLOP/s for true float32 at --matmul-precision highest); the largest 128x128 train batch that fits with and without
# remat; inference memory per pixel. Each run has its own timeout (STEP_TIMEOUT s); a
# failed run is recorded, not fatal. Sized for <= 8 minutes on one H200.
set -u
REF=${1:?usage: tools/gpu_benchmark.sh PATH/TO/DRSformer-release [OUT.json]}
OUT=${2:-gpu_benchmark.json}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cd "$ROOT" || exit 1
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}

if [ "${TINY:-0}" = 1 ]; then
  ARCH=(--dim 8 --num-blocks 1 1 1 1 --heads 1 1 2 2)
  TRAIN_SIZE=16; TRAIN_BATCHES=(4 2); FWD_SIZES=(32 64); STEPS=2
  TORCH_DEVICE=${TORCH_DEVICE:-cpu}; EXTRAS=(--tiny --size 16)
else
  ARCH=()
  TRAIN_SIZE=128; TRAIN_BATCHES=(16 8); FWD_SIZES=(256 512); STEPS=5
  TORCH_DEVICE=${TORCH_DEVICE:-cuda}; EXTRAS=(--size 128)
fi
STEP_TIMEOUT=${STEP_TIMEOUT:-150}

bench() {  # name, then benchmark arguments
  local name=$1; shift
  echo "== $name" >&2
  timeout "$STEP_TIMEOUT" python -m drsformer_jax.benchmark "${ARCH[@]}" --steps "$STEPS" \
    --compare-torch --reference-repo "$REF" --torch-device "$TORCH_DEVICE" \
    --json "$WORK/$name.json" "$@" > /dev/null \
    || echo "{\"failed\": true, \"rc\": $?}" > "$WORK/$name.json"
}

for b in "${TRAIN_BATCHES[@]}"; do
  bench "train_b${b}_float32" --modes train --height "$TRAIN_SIZE" --width "$TRAIN_SIZE" \
    --batch "$b" --dtype float32
  bench "train_b${b}_bfloat16" --modes train --height "$TRAIN_SIZE" --width "$TRAIN_SIZE" \
    --batch "$b" --dtype bfloat16 --torch-autocast-bf16
done
for s in "${FWD_SIZES[@]}"; do
  bench "forward_${s}_float32" --modes forward --height "$s" --width "$s" --batch 1 \
    --dtype float32
  bench "forward_${s}_bfloat16" --modes forward --height "$s" --width "$s" --batch 1 \
    --dtype bfloat16 --torch-autocast-bf16
done
echo "== memory (largest batch, bytes per pixel)" >&2
timeout "$((2 * STEP_TIMEOUT))" python tools/gpu_extras.py "${EXTRAS[@]}" \
  --json "$WORK/memory.json" > /dev/null \
  || echo "{\"failed\": true, \"rc\": $?}" > "$WORK/memory.json"

python - "$WORK" "$OUT" <<'EOF'
import json, sys
from pathlib import Path
work, out = Path(sys.argv[1]), Path(sys.argv[2])
# Dense TFLOP/s of H100/H200 SXM for what XLA runs: float32 at the default matmul
# precision is TF32 there; only "highest" is true float32.
PEAK = {("bfloat16", "default"): 990e12, ("bfloat16", "highest"): 990e12,
        ("float32", "default"): 495e12, ("float32", "highest"): 67e12}
MACS_256 = 242.9e9                               # multiply-adds per 256x256 forward
runs = {p.stem: json.loads(p.read_text()) for p in sorted(work.glob("*.json"))}
rows = []
for name, r in runs.items():
    if name == "memory" or r.get("failed"):
        rows.append((name, "FAILED" if r.get("failed") else "", "", "", "", ""))
        continue
    mode = "train" if "train" in r else "forward"
    ours, ref = r[mode]["median_s"], r.get("torch", {}).get(mode, {}).get("median_s")
    px = r["batch"] * r["height"] * r["width"]
    flops = r[mode].get("flops_per_call") or (
        2 * MACS_256 * px / 65536 * (3 if mode == "train" else 1))
    mfu = flops / ours / PEAK[r["dtype"], r.get("matmul_precision", "default")]
    r[mode]["model_flops_utilisation"] = mfu
    rows.append((name, f"{ours * 1e3:.1f} ms", f"{ref * 1e3:.1f} ms" if ref else "-",
                 f"{ours / ref:.2f}x" if ref else "-", f"{r[mode]['compile_s']:.1f} s",
                 f"{100 * mfu:.1f} %"))
print(f"{'run':24} {'ours':>11} {'release':>11} {'ratio':>7} {'compile':>9} {'MFU':>7}")
for row in rows:
    print(f"{row[0]:24} {row[1]:>11} {row[2]:>11} {row[3]:>7} {row[4]:>9} {row[5]:>7}")
mem = runs.get("memory", {})
for key in ("largest_batch_remat_False", "largest_batch_remat_True"):
    if key in mem:
        print(key, mem[key].get("largest_fitting"), "(predicted", mem[key].get("predicted"), ")")
for m in mem.get("inference_memory", []):
    print("inference bytes/pixel", m["dtype"], round(m["bytes_per_pixel"], 1))
out.write_text(json.dumps(runs, indent=2) + "\n")
print("wrote", out)
EOF
