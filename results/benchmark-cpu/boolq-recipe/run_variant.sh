#!/usr/bin/env bash
# One ELMER variant of the BoolQ benchmark (the options of examples/benchmark_cpu.sh), as run for
# docs/benchmark.md "The authors' recipe":  run_variant.sh NAME 'ELMER OPTIONS' SYSTEM...
# UPDATES (default 4000); writes results/benchmark-cpu/boolq-recipe/NAME/.
cd "$(dirname "$0")/../../.." || exit 1
name=$1; opts=$2; shift 2
out=results/benchmark-cpu/boolq-recipe/$name
mkdir -p "$out"
OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1 .venv/bin/python examples/benchmark.py \
  --data data/bench/boolq/bin --out "$out" --device cpu --systems "$@" \
  --layers 2 --dim 128 --max-target-length 32 --updates "${UPDATES:-4000}" --max-tokens 4096 --lr 1e-3 --warmup 150 \
  --deltas 0 0.25 0.5 0.75 1 2 3 4 --parallel 1 --train-threads 1 --threads 1 ${opts:+--elmer-options="$opts"} >> "$out/run.log" 2>&1
