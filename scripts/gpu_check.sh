#!/usr/bin/env bash
# The GPU checks in one command, for a machine with CUDA (never needed by CI or the tests):
# the attention benchmark in float32 and bfloat16, and every grid the book reports, timed: the
# IMDB seed protocol, the Tiny Shakespeare GPTs and the MNIST ViTs.
# Needs the data: PBA_IMDB_DIR, PBA_SHAKESPEARE_DIR, PBA_MNIST_DIR (or network access).
# Writes results/bench-attention-cuda.json (+ .png), results/imdb-seed-cuda.json,
# results/shakespeare-cuda.json and results/mnist-cuda.json.
#
# PBA_GPU_CHECK_SMOKE=1 runs the same commands shrunk (one small shape; two variants, two seeds,
# one epoch), and PBA_GPU_CHECK_DEVICE / PBA_GPU_CHECK_OUT choose the device and the folder for
# the files: tests/test_scripts.py runs it that way on CPU, so a typo here never costs GPU time.
set -euo pipefail
cd "$(dirname "$0")/.."
device="${PBA_GPU_CHECK_DEVICE:-cuda}"
out="${PBA_GPU_CHECK_OUT:-results}"
if [ "${PBA_GPU_CHECK_SMOKE:-0}" = 1 ]; then
  bench=(--quick --max-length 32 --repeats 1 --warmup 0)
  grid=(--seeds 2 --epochs 1 --variants standard super --workers 2)
  shakespeare=(--seeds 1 --variants standard super --iterations 20 --eval-interval 10 --val-blocks 8 --warmup-steps 5)
  mnist=(--seeds 1 --variants standard super --epochs 1 --train-size 512)
else
  bench=()
  grid=(--seeds 5 --epochs 10 --workers 4)
  shakespeare=(--seeds 3 --workers 4)
  mnist=(--seeds 3 --workers 4)
fi
if [ "$device" = cuda ]; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
fi
python benchmarks/attention_speed.py --device "$device" --dtypes float32 bfloat16 "${bench[@]}" \
    --out "$out/bench-attention-cuda.json"
start=$(date +%s)
# Each variant's seeds train together as one batched model (fewer, larger kernel launches); the
# variants run as processes sharing the GPU. If stacking fails on this GPU, the unstacked grid
# runs instead (into another file), so the device time is not lost.
if python -m pba.experiments imdb --protocol seed "${grid[@]}" --device "$device" --threads 1 \
    --stack-seeds true --out "$out/imdb-seed-cuda.json"; then
  echo "seed protocol (${grid[*]}, stacked) on $device: $(( $(date +%s) - start )) s"
else
  echo "stacked grid failed; running the seeds one by one"
  start=$(date +%s)
  python -m pba.experiments imdb --protocol seed "${grid[@]}" --device "$device" --threads 1 \
      --out "$out/imdb-seed-cuda-unstacked.json"
  echo "seed protocol (${grid[*]}, unstacked) on $device: $(( $(date +%s) - start )) s"
fi

for task in shakespeare mnist; do
  start=$(date +%s)
  declare -n flags="$task"
  python -m pba.experiments "$task" "${flags[@]}" --device "$device" --threads 1 --out "$out/$task-cuda.json"
  echo "$task grid (${flags[*]}) on $device: $(( $(date +%s) - start )) s"
done
