#!/usr/bin/env bash
# The whole benchmark at a CPU budget: question generation (BoolQ), summarization (XSum) and
# dialogue (chitchat), each with ELMER-Soft/Hard, CMLM (0 and 10 iterations), LevT and the
# autoregressive Transformer (greedy and beam 4), plus ELMER-Soft and CMLM trained on the
# Transformer's distilled outputs; on question generation also ELMER-Soft fine-tuned from LPLM
# pretraining. Tiny models (2+2 layers, d=128, 4k BPE); question generation, the one task with
# enough data for them, gets 4,000 updates of <= 4,096 tokens, the others 1,000 of <= 2,048.
# About 3 hours on 2 cores (question generation 2 of them); results/benchmark-cpu/TASK/ gets
# results.md/.csv, samples.md and the delta sweep (widened to 4 nats: a model this small is rarely
# confident enough to exit at delta <= 1). Resumable: rerun the same command after an
# interruption. Run it as `make benchmark-cpu` (builds .venv first).
# Knobs: UPDATES (per system, every task; default per task as above), PARALLEL (trainings at once,
# default 2), OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import fairseq, tokenizers" 2>/dev/null || { echo "run it as: make benchmark-cpu (needs .venv)"; exit 1; }
PARALLEL=${PARALLEL:-2}
OUT=${OUT:-results/benchmark-cpu}
export PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1

# task : examples/TASK/prepare.py options : longest output T (pieces) : updates : max tokens : systems beyond the 7
for spec in "boolq:--test 300 --max-source-tokens 128 --max-target-tokens 32:32:4000:4096:elmer-soft-lplm" \
            "xsum:--max-source-tokens 128 --max-target-tokens 48:48:1000:2048:" \
            "dialogue:--test 200 --max-train 40000 --max-source-tokens 64 --max-target-tokens 32:32:1000:2048:"; do
  IFS=: read -r task opts length updates tokens extra <<< "$spec"
  echo "== $task: data"
  mkdir -p "$OUT"
  # shellcheck disable=SC2086  # $opts is a list of options
  python "examples/$task/prepare.py" --out "data/bench/$task" --bpe-size 4000 $opts 2> "$OUT/prepare-$task.log" \
    || { cat "$OUT/prepare-$task.log"; echo "preparing $task failed; the other tasks go on"; continue; }
  echo "== $task: train, decode, time (log: $OUT/$task/run.log)"
  mkdir -p "$OUT/$task"
  # shellcheck disable=SC2086  # $extra is a list of systems
  python examples/benchmark.py --data "data/bench/$task/bin" --out "$OUT/$task" --device cpu \
    --systems transformer elmer-soft elmer-hard cmlm levt elmer-soft-kd cmlm-kd $extra \
    --layers 2 --dim 128 --max-target-length "$length" --updates "${UPDATES:-$updates}" --max-tokens "$tokens" \
    --lr 1e-3 --warmup 150 --deltas 0 0.25 0.5 0.75 1 2 3 4 --parallel "$PARALLEL" --train-threads 1 --threads 1 2>&1 \
    | tee -a "$OUT/$task/run.log" | grep -E "^training|^pretraining|^distilled|^\||failed" || true
done
