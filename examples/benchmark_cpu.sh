#!/usr/bin/env bash
# The whole benchmark at a CPU budget: question generation (QuAC), summarization (XSum) and
# dialogue (chitchat), each with ELMER-Soft/Hard, CMLM (0 and 10 iterations), LevT and the
# autoregressive Transformer (greedy and beam 4), plus ELMER-Soft and CMLM trained on the
# Transformer's distilled outputs. Tiny models (2+2 layers, d=128, 4k BPE) so that 2 cores
# get through it in about 2 hours; results/benchmark-cpu/TASK/ gets results.md/.csv, samples.md
# and the delta sweep. Resumable: rerun the same command after an interruption.
# Run it as `make benchmark-cpu` (builds .venv first). Knobs: UPDATES (per system, default 1000), PARALLEL (trainings at once, default 2), OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import fairseq, tokenizers" 2>/dev/null || { echo "run it as: make benchmark-cpu (needs .venv)"; exit 1; }
UPDATES=${UPDATES:-1000}
PARALLEL=${PARALLEL:-2}
OUT=${OUT:-results/benchmark-cpu}
export PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1

# task : prepare.py options : longest output T (pieces)
for spec in "qg:--valid 50 --max-source-tokens 128 --max-target-tokens 32:32" \
            "xsum:--max-source-tokens 128 --max-target-tokens 48:48" \
            "dialogue:--test 200 --max-train 40000 --max-source-tokens 64 --max-target-tokens 32:32"; do
  IFS=: read -r task opts length <<< "$spec"
  echo "== $task: data"
  mkdir -p "$OUT"
  # shellcheck disable=SC2086  # $opts is a list of options
  python examples/prepare.py "$task" --out "data/bench/$task" --bpe-size 4000 $opts 2> "$OUT/prepare-$task.log" \
    || { cat "$OUT/prepare-$task.log"; echo "preparing $task failed; the other tasks go on"; continue; }
  echo "== $task: train, decode, time (log: $OUT/$task/run.log)"
  mkdir -p "$OUT/$task"
  python examples/benchmark.py --data "data/bench/$task/bin" --out "$OUT/$task" --device cpu \
    --systems transformer elmer-soft elmer-hard cmlm levt elmer-soft-kd cmlm-kd \
    --layers 2 --dim 128 --max-target-length "$length" --updates "$UPDATES" --max-tokens 2048 \
    --lr 1e-3 --warmup 150 --parallel "$PARALLEL" --train-threads 1 --threads 1 2>&1 \
    | tee -a "$OUT/$task/run.log" | grep -E "^training|^distilled|^\||failed" || true
done
