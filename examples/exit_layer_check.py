#!/usr/bin/env python
"""What each decoder layer's off-ramp writes on its own: a trained soft-exit ELMER decoded with
--max-exit-layer K for K = L .. 1 (layers K+1 .. L not run), scored against the references.

    python examples/exit_layer_check.py --path CHECKPOINT --data data/boolq-minilm64/bin \\
        [--ramp-shortlist 64] [--length-cut 2] [--samples N]

Prints a markdown table, one row per K: ROUGE-L, BLEU-4, repeats, Distinct-1, mean length and
length r (examples/metrics.py), the share of outputs equal to K = L's, and ms per sample in CPU
time of this thread (batch 1, one torch thread: other processes on a busy machine do not count).
The test split's references are DATA/../test.raw.tgt (else DATA/../test.tgt), lowercased with
--uncased as examples/score.py does; outputs are detokenized by DATA/../tokenizer.json where an
examples/TASK/prepare.py --tokenizer run put one, else written as the dictionary's symbols.
"""
import argparse
import time
from pathlib import Path

# examples/ is a folder of scripts: a script's own folder is sys.path[0], so metrics.py imports by name
from metrics import bleu, diversity, length_agreement, rouge
import torch
from fairseq import checkpoint_utils

import elmer_fairseq  # noqa: F401  (registers ELMER's task and model)
from elmer_fairseq.bpe import WordPiece, WordPieceConfig
from elmer_fairseq.generator import ElmerGenerator


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--path", required=True, help="a soft-exit ELMER checkpoint")
    p.add_argument("--data", required=True, type=Path, help="its binarized data (the test split is decoded)")
    p.add_argument("--ramp-shortlist", type=int, metavar="K", help="decode every row with it (rows of K >= 3)")
    p.add_argument("--length-cut", type=int, metavar="M", help="decode every row with it")
    p.add_argument("--samples", type=int, help="the first N test samples (default: all)")
    p.add_argument("--uncased", action="store_true", help="lowercase the references (an uncased tokenizer's outputs)")
    args = p.parse_args(argv)
    tokenizer = args.data.parent / "tokenizer.json"
    refs_path = next((f for f in (args.data.parent / "test.raw.tgt", args.data.parent / "test.tgt") if f.is_file()), None)
    if refs_path is None:
        raise SystemExit(f"{args.data.parent}: no test.raw.tgt or test.tgt beside {args.data}: --data must be the "
                         f"bin/ folder of examples/TASK/prepare.py's output")
    torch.set_num_threads(1)
    models, _, task = checkpoint_utils.load_model_ensemble_and_task([args.path], arg_overrides={"data": str(args.data)})
    model = models[0].eval()
    if model.decoder.exit_mode != "soft":
        raise SystemExit(f"{args.path}: a {model.decoder.exit_mode}-exit model; this check decodes soft exit")
    task.load_dataset("test")
    data = task.dataset("test")
    count = len(data) if args.samples is None else min(args.samples, len(data))
    samples = [data.collater([data[i]]) for i in range(count)]
    refs = refs_path.read_text(encoding="utf-8").splitlines()
    refs = [refs[int(s["id"][0])].lower() if args.uncased else refs[int(s["id"][0])] for s in samples]
    detokenize = WordPiece(WordPieceConfig(wordpiece_tokenizer=str(tokenizer))).decode if tokenizer.is_file() else str
    L = model.decoder.num_layers
    print(f"{args.path}: {count} test samples, T = {task.cfg.max_target_length}, batch 1, one thread"
          + "".join(f", {flag} {v}" for flag, v in (("--ramp-shortlist", args.ramp_shortlist),
                                                     ("--length-cut", args.length_cut)) if v is not None) + "\n")
    print("| --max-exit-layer | ROUGE-L | BLEU-4 | repeat % | Dist-1 | mean len | length r | outputs equal to "
          f"K = {L}'s | ms/sample (CPU) |\n|---|---|---|---|---|---|---|---|---|")
    full = None
    for k in range(L, 0, -1):
        shortlist = args.ramp_shortlist if k >= 3 else None  # a shortlist needs a middle layer
        generator = ElmerGenerator(task.target_dictionary, task.cfg.max_target_length, 0.0, summary=False,
                                   length_cut=args.length_cut, shortlist=shortlist, max_exit_layer=k)
        generator.generate([model], samples[0])  # untimed: first-call allocations
        outputs, seconds = [], 0.0
        for sample in samples:
            start = time.process_time()
            hypo = generator.generate([model], sample)[0][0]
            seconds += time.process_time() - start
            outputs.append(detokenize(task.target_dictionary.string(hypo["tokens"])))
        full = full or outputs
        d = diversity(outputs)
        equal = sum(a == b for a, b in zip(outputs, full)) / count
        print(f"| {k}{' (all)' if k == L else ''} | {rouge(outputs, refs)['rougeL']:.2f} | "
              f"{bleu(outputs, refs)['bleu4']:.2f} | {d['repeat']:.0f} | {d['distinct1']:.1f} | {d['mean_len']:.1f} | "
              f"{length_agreement(outputs, refs)['length_r']:.2f} | {100 * equal:.0f}% | "
              f"{1000 * seconds / count:.1f} |", flush=True)


if __name__ == "__main__":
    main()
