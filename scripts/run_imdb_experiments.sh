#!/usr/bin/env bash
# Every IMDB grid the book reports, one command each (resumable: rerun to finish an interrupted grid).
# Needs the data: PBA_IMDB_DIR=/path/to/imdb-parquet (or network access to the Hub).
# Usage: bash scripts/run_imdb_experiments.sh [main|ablations|all]   (default: all)
set -euo pipefail
cd "$(dirname "$0")/.."
run() { python -m pba.experiments imdb --seeds 5 --epochs 10 --workers "${WORKERS:-2}" "$@"; }
what="${1:-all}"

if [ "$what" = main ] || [ "$what" = all ]; then
  run --protocol seed --quirks reference --out results/imdb-seed-reference.json   # the reference's table
  run --protocol seed --out results/imdb-seed.json                               # our defaults
  run --protocol paper --out results/imdb-paper.json                             # the paper's protocol
  run --protocol seed --quirks reference --stack-seeds true \
      --out results/imdb-seed-reference-stacked.json                            # the first, seeds stacked
  run --protocol seed --quirks reference --engine fused \
      --out results/imdb-seed-reference-fused.json                              # the first, pba.fused
fi

if [ "$what" = ablations ] || [ "$what" = all ]; then
  # One change at a time against results/imdb-seed.json (our defaults).
  A=results/ablations
  run --variants standard super --softmax-over queries --out $A/softmax-queries.json
  run --variants super --wa-sharing head --out $A/wa-per-head.json
  run --variants super --wa-bias true --out $A/wa-bias.json
  run --variants standard super --unknown-as-padding true --out $A/unknown-as-padding.json
  run --variants standard super --truncation tail --out $A/tail-truncation.json
  run --variants standard super --padding-mask false --masked-pooling false --out $A/no-padding-mask.json
  run --variants standard super --threshold 0.5 --out $A/threshold-0.5.json
fi
