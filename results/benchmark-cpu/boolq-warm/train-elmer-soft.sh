#!/usr/bin/env bash
# ELMER-Soft warm-started from MiniLM-L6 (docs/converting.md steps 1-3 made data/boolq-minilm), BoolQ
# question generation, 1 thread. Resumable: rerun continues from checkpoint_last.pt.
cd "$(dirname "$0")/../../.."
UPDATES=${UPDATES:-1000}
OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE .venv/bin/fairseq-train data/boolq-minilm/bin \
  --user-dir elmer_fairseq --task elmer_translation --arch elmer_base \
  --encoder-embed-dim 384 --decoder-embed-dim 384 --encoder-ffn-embed-dim 1536 --decoder-ffn-embed-dim 1536 \
  --layernorm-eps 1e-12 --max-source-positions 512 --max-target-positions 512 \
  --finetune-from-model data/boolq-minilm/ckpt/model.pt --exit-mode soft --criterion elmer_loss --label-smoothing 0 \
  --max-target-length 32 --optimizer adam --adam-betas '(0.9,0.98)' --lr 1.5e-4 --lr-scheduler inverse_sqrt \
  --warmup-updates 100 --clip-norm 1.0 --weight-decay 0.01 --dropout 0.1 --max-tokens 4096 \
  --required-batch-size-multiple 1 --max-update "$UPDATES" \
  --save-dir results/benchmark-cpu/boolq-warm/checkpoints/elmer-soft --no-epoch-checkpoints \
  --save-interval-updates 100 --keep-interval-updates 1 --validate-interval-updates 100 \
  --validate-interval 10000 --save-interval 10000 --log-format simple --log-interval 10 --seed 1 --num-workers 0 --cpu
