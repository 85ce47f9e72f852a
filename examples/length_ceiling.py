#!/usr/bin/env python
"""How far a task's input determines its reference's length: the ceiling on the length
correlation r (examples/metrics.py: output length against reference length, in words) that any
model of the input can reach.

    python examples/length_ceiling.py --data data/boolq-minilm64 [--encoder data/minilm/hf]

Three measures, from the prepared data's {train,test}.src (pieces) and {train,test}.raw.tgt:
- **Inputs with several references** (BoolQ: one passage, several questions). If a reference's
  length is f(input) plus noise of its own, two references of one input share only f, so the
  correlation of their lengths estimates var(f) / var(length), and its square root is the
  correlation of the best possible predictor, E[length | input], with the length: no model's
  length r can pass it, except by chance. Grouped by the source after the separator (the
  passage; BoolQ's answer word before it differs between a passage's questions).
- **r of the source's length** with the reference's: what a length-from-source rule can reach.
- **Predictors fitted on the training split**, r on the test split: ridge regression on hashed
  bag-of-pieces counts and the source length; with --encoder, also on the mean of MiniLM's last
  hidden states (the representation ELMER's length head reads). These are lower bounds on what
  is reachable.
"""
import argparse
import itertools
import statistics
import zlib
from pathlib import Path

import numpy as np

BUCKETS = 4096  # hashed piece features; the ridge system is BUCKETS + 1 wide


def read(data: Path, split: str):
    src = (data / f"{split}.src").read_text(encoding="utf-8").splitlines()
    refs = (data / f"{split}.raw.tgt").read_text(encoding="utf-8").splitlines()
    if len(src) != len(refs):
        raise SystemExit(f"{data}: {split}.src has {len(src)} lines, {split}.raw.tgt {len(refs)}")
    return [s.split() for s in src], np.array([len(r.split()) for r in refs], dtype=float)


def shared_length_r(sources, lengths, separator: str):
    """The correlation of the lengths of two references of one input, over every ordered pair of
    references that share the source after `separator`; (r, inputs with >= 2, pairs)."""
    groups = {}
    for pieces, n in zip(sources, lengths):
        key = " ".join(pieces[pieces.index(separator) + 1:] if separator in pieces else pieces)
        groups.setdefault(key, []).append(n)
    pairs = [p for g in groups.values() if len(g) > 1 for p in itertools.permutations(g, 2)]
    if len(pairs) < 3:
        return None, 0, 0
    a, b = zip(*pairs)
    return statistics.correlation(a, b), sum(len(g) > 1 for g in groups.values()), len(pairs)


def hashed(sources):
    x = np.zeros((len(sources), BUCKETS + 1))
    for i, pieces in enumerate(sources):
        for p in pieces:
            x[i, zlib.crc32(p.encode()) % BUCKETS] += 1
        x[i, BUCKETS] = len(pieces)
    return np.log1p(x)


def ridge_r(x_train, y_train, x_test, y_test, held_out: int = 1000):
    """Pearson r on the test split of ridge regression, its strength chosen on the last `held_out`
    training rows, then refitted on all of them."""
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std

    def fitter(x, y):  # the Gram matrix once; each strength is one solve
        gram, moment = x.T @ x, x.T @ (y - y.mean())
        return lambda lam: (np.linalg.solve(gram + lam * np.eye(len(gram)), moment), y.mean())

    def r(w, b, x, y):
        pred = x @ w + b
        return float(np.corrcoef(pred, y)[0, 1]) if pred.std() > 0 else 0.0

    fit, val_x, val_y = fitter(x_train[:-held_out], y_train[:-held_out]), x_train[-held_out:], y_train[-held_out:]
    lam = max((10.0 ** k for k in range(-1, 6)), key=lambda lam: r(*fit(lam), val_x, val_y))
    return r(*fitter(x_train, y_train)(lam), x_test, y_test), lam


def encoder_means(sources, encoder: Path, batch: int = 64):
    """Mean of the last hidden states of the BERT checkpoint in `encoder` (its tokenizer.json's
    vocabulary maps the pieces to ids)."""
    import json

    import torch
    from transformers import BertModel

    vocab = json.loads((encoder / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"]
    model = BertModel.from_pretrained(str(encoder)).eval()
    unk, cls, sep = vocab["[UNK]"], vocab["[CLS]"], vocab["[SEP]"]
    out = []
    with torch.no_grad():
        for i in range(0, len(sources), batch):
            ids = [[cls] + [vocab.get(p, unk) for p in s if p != "</s>"][:62] + [sep] for s in sources[i:i + batch]]
            width = max(map(len, ids))
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in ids])
            states = model(input_ids=torch.tensor([s + [0] * (width - len(s)) for s in ids]), attention_mask=mask)[0]
            out.append(((states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)).numpy())
    return np.concatenate(out)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="a folder written by a prepare.py of examples/")
    p.add_argument("--separator", default="</s>", help="the piece between a source's parts (prepare.py writes </s>)")
    p.add_argument("--encoder", type=Path, help="a BERT checkpoint folder (data/minilm/hf) for the encoder predictor")
    p.add_argument("--train-samples", type=int, default=4000,
                   help="training rows for the encoder predictor (the encoder costs ~10 ms a row on a CPU)")
    args = p.parse_args()
    train_src, train_len = read(args.data, "train")
    test_src, test_len = read(args.data, "test")
    print(f"{args.data}: {len(train_len)} training and {len(test_len)} test references; reference length "
          f"{train_len.mean():.1f} +- {train_len.std():.1f} words (train)")
    r, inputs, pairs = shared_length_r(train_src, train_len, args.separator)
    if r is None:
        print("no input with two references: the ceiling cannot be estimated this way")
    else:
        ceiling = f"{max(r, 0) ** 0.5:.2f}"
        print(f"two references of one input (training split: {inputs} inputs, {pairs} ordered pairs): length r "
              f"{r:.3f}, so the best predictor from the input reaches r = sqrt({r:.3f}) = {ceiling}")
    src_lengths = [len(s) for s in test_src]
    src_r = (f"r = {statistics.correlation(src_lengths, test_len.tolist()):.3f}" if len(set(src_lengths)) > 1
             else f"undefined, every test source has {src_lengths[0]} pieces")
    print(f"source length (pieces) against reference length, test split: {src_r}")
    test_r, lam = ridge_r(hashed(train_src), train_len, hashed(test_src), test_len)
    print(f"ridge on {BUCKETS} hashed piece counts + source length (lambda {lam:g}), test split: r = {test_r:.3f}")
    if args.encoder:
        n = min(args.train_samples, len(train_src))
        test_r, lam = ridge_r(encoder_means(train_src[:n], args.encoder), train_len[:n],
                              encoder_means(test_src, args.encoder), test_len, held_out=n // 5)
        print(f"ridge on the mean of {args.encoder}'s last hidden states ({n} training rows, lambda {lam:g}), "
              f"test split: r = {test_r:.3f}")


if __name__ == "__main__":
    main()
