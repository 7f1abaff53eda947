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
# the 4 variants run as 4 processes sharing the GPU.
python -m pba.experiments imdb --protocol seed --seeds 5 --epochs 10 --device cuda --threads 1 \
    --stack-seeds true --workers 4 --out results/imdb-seed-cuda.json
echo "full seed protocol (4 variants x 5 seeds x 10 epochs) on CUDA: $(( $(date +%s) - start )) s"
