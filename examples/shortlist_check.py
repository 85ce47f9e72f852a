#!/usr/bin/env python
"""What ELMER's decoding shortcuts cost in outputs and save in time on a trained checkpoint:
--ramp-shortlist K, --length-cut M and --ramp-precision bf16 (each alone and combined) against the
paper's full pass, test samples at batch 1.

    python examples/shortlist_check.py --path CHECKPOINT --data data/boolq-minilm64/bin \\
        --shortlists 4 16 64 --length-cuts 2 --ramp-precisions fp32 bf16 --samples 100

Prints a markdown table: ms per sample in CPU time of this thread (time.process_time, one torch
thread: other processes on a busy machine do not count) and the share of outputs (through the
first EOS) equal to the full pass's.
"""
import argparse
import time

import torch
from fairseq import checkpoint_utils

import elmer_fairseq  # noqa: F401  (registers ELMER's task and model)
from elmer_fairseq.models.elmer import RAMP_PRECISIONS, ramp_dtype


def decode(model, samples, length: int, **shortcuts):
    outputs, seconds = [], 0.0
    for sample in samples:
        net = sample["net_input"]
        start = time.process_time()
        out = model.generate(net["src_tokens"], net["src_lengths"], length, **shortcuts)
        seconds += time.process_time() - start
        outputs.append(out.tokens[0].tolist())
    return outputs, 1000 * seconds / len(samples)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--path", required=True, help="a soft-exit ELMER checkpoint")
    p.add_argument("--data", required=True, help="its binarized data (the test split is decoded)")
    p.add_argument("--shortlists", type=int, nargs="*", default=[4, 16, 64], metavar="K")
    p.add_argument("--length-cuts", type=int, nargs="*", default=[], metavar="M")
    p.add_argument("--ramp-precisions", nargs="+", default=["fp32"], choices=list(RAMP_PRECISIONS),
                   help="each shortcut at each of these off-ramp precisions (default: fp32)")
    p.add_argument("--samples", type=int, default=100, help="test samples (default 100)")
    p.add_argument("--warmup", type=int, default=3, help="untimed passes over the samples first (default 3)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    models, _, task = checkpoint_utils.load_model_ensemble_and_task([args.path], arg_overrides={"data": args.data})
    model = models[0].eval()
    task.load_dataset("test")
    data = task.dataset("test")
    samples = [data.collater([data[i]]) for i in range(min(args.samples, len(data)))]
    length, eos = task.cfg.max_target_length, task.target_dictionary.eos()

    def ended(tokens):
        return tokens[:tokens.index(eos)] if eos in tokens else tokens

    for _ in range(args.warmup):
        decode(model, samples, length)
    full, full_ms = decode(model, samples, length)
    print(f"{args.path}: {len(samples)} test samples, T = {length}, batch 1, one thread\n")
    print("| decoding | ms/sample (CPU) | outputs equal to the full pass |\n|---|---|---|")
    print(f"| the paper's (full vocabulary at every layer) | {full_ms:.1f} | 100% |")
    for precision in args.ramp_precisions:
        for cut in [None, *args.length_cuts]:
            for k in [None, *args.shortlists]:
                if cut is None and k is None and precision == "fp32":
                    continue
                outputs, ms = decode(model, samples, length, length_cut=cut, shortlist=k,
                                     ramp_dtype=ramp_dtype(precision))
                equal = sum(ended(a) == ended(b) for a, b in zip(full, outputs)) / len(samples)
                name = " ".join(f for f in (cut is not None and f"--length-cut {cut}", k and f"--ramp-shortlist {k}",
                                            precision != "fp32" and f"--ramp-precision {precision}") if f)
                print(f"| `{name}` | {ms:.1f} | {100 * equal:.0f}% |")


if __name__ == "__main__":
    main()
