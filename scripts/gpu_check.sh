#!/usr/bin/env bash
# The GPU checks in one command, for a machine with CUDA (never needed by CI or the tests):
# the attention benchmark in float32 and bfloat16, and the full IMDB seed protocol, timed.
# Needs the data: PBA_IMDB_DIR=/path/to/imdb-parquet (or network access to the Hub).
# Writes results/bench-attention-cuda.json (+ .png) and results/imdb-seed-cuda.json.
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python benchmarks/attention_speed.py --device cuda --dtypes float32 bfloat16
start=$(date +%s)
# Each variant's 5 seeds train together as one batched model (fewer, larger kernel launches);
# the 4 variants run as 4 processes sharing the GPU. Stacking is tested on CPU only: if it fails on
# this GPU, the unstacked grid runs instead (into another file), so the device time is not lost.
if python -m pba.experiments imdb --protocol seed --seeds 5 --epochs 10 --device cuda --threads 1 \
    --stack-seeds true --workers 4 --out results/imdb-seed-cuda.json; then
  echo "full seed protocol (4 variants x 5 seeds x 10 epochs, stacked) on CUDA: $(( $(date +%s) - start )) s"
else
  echo "stacked grid failed; running the seeds one by one"
  start=$(date +%s)
  python -m pba.experiments imdb --protocol seed --seeds 5 --epochs 10 --device cuda --threads 1 \
      --workers 4 --out results/imdb-seed-cuda-unstacked.json
  echo "full seed protocol (4 variants x 5 seeds x 10 epochs, unstacked) on CUDA: $(( $(date +%s) - start )) s"
fi
