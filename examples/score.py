#!/usr/bin/env python
"""Scores a fairseq-generate log against raw references: ROUGE-1/2/L (rouge-score), BLEU-4
(sacrebleu), and what tells a writing model from a stuttering one: the share of outputs that repeat
a word (two equal neighbours), Distinct-1, the mean length and its correlation with the reference's
(r near 0: one length for every input), empty outputs; and ms/sample.

    python examples/score.py gen.log --refs data/xsum/test.raw.tgt --names ELMER-Soft [--json out.json]

Hypotheses are the D- lines (detokenized: run fairseq-generate with the data's --bpe); references
are the raw target lines, matched by sample id (fairseq's T- lines are the model's cut targets).
ms/sample is fairseq-generate's own generation timer (model time only, no I/O) divided by the
number of samples; run it with --batch-size 1 for per-sample latency.
"""
import argparse
import json
import re
import sys
from pathlib import Path

# examples/ is a folder of scripts: a script's own folder is sys.path[0], so metrics.py imports by name
from metrics import bleu, diversity, length_agreement, rouge

TIMER = re.compile(r"Translated ([\d,]+) sentences \(([\d,]+) tokens\) in ([\d.]+)s")
EXITS = re.compile(r"ELMER exit layers over .*: mean ([\d.]+) of (\d+)")


def parse_log(path: Path):
    hyps, seconds, sentences, mean_exit = {}, None, None, None
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("D-"):
            sid, _score, *text = line[2:].split("\t")
            hyps[int(sid)] = text[0] if text else ""
        elif m := TIMER.search(line):
            sentences, seconds = int(m.group(1).replace(",", "")), float(m.group(3))
        elif m := EXITS.search(line):
            mean_exit = float(m.group(1))
    if seconds is None:
        raise SystemExit(f"{path}: no 'Translated N sentences' line: did fairseq-generate finish?")
    return hyps, seconds, sentences, mean_exit


def score(log: Path, refs_path: Path, name: str, uncased: bool = False):
    refs = refs_path.read_text(encoding="utf-8").splitlines()
    if uncased:
        refs = [r.lower() for r in refs]
    hyps, seconds, sentences, mean_exit = parse_log(log)
    if sorted(hyps) != list(range(len(refs))):
        raise SystemExit(f"{log}: {len(hyps)} hypotheses for {len(refs)} references in {refs_path}; "
                         f"every test sample must be decoded once")
    ordered = [hyps[i] for i in range(len(refs))]
    return {
        "system": name, **rouge(ordered, refs), "bleu4": bleu(ordered, refs)["bleu4"], **diversity(ordered),
        "length_r": length_agreement(ordered, refs)["length_r"], "ms_per_sample": 1000 * seconds / sentences,
        "mean_exit_layer": mean_exit, "samples": len(refs),
    }


def markdown(rows):
    out = ["| system | ROUGE-1 | ROUGE-2 | ROUGE-L | BLEU-4 | repeat % | Dist-1 | mean len | length r | empty % "
           "| ms/sample | mean exit layer |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        exit_layer = "-" if r["mean_exit_layer"] is None else f"{r['mean_exit_layer']:.2f}"
        out.append(f"| {r['system']} | {r['rouge1']:.2f} | {r['rouge2']:.2f} | {r['rougeL']:.2f} | {r['bleu4']:.2f} | "
                   f"{r['repeat']:.0f} | {r['distinct1']:.1f} | {r['mean_len']:.1f} | {r['length_r']:.2f} | "
                   f"{r['empty']:.0f} | {r['ms_per_sample']:.1f} | {exit_layer} |")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("logs", nargs="+", type=Path, help="fairseq-generate outputs (one per system)")
    p.add_argument("--refs", type=Path, required=True, help="raw reference file, one per line")
    p.add_argument("--names", nargs="+", help="system names, one per log (default: file names)")
    p.add_argument("--json", type=Path, help="also write the rows as JSON here")
    p.add_argument("--uncased", action="store_true",
                   help="lowercase the references (for a model that writes lowercase only, as MiniLM's WordPiece)")
    args = p.parse_args(argv)
    names = args.names or [log.stem for log in args.logs]
    if len(names) != len(args.logs):
        sys.exit(f"--names: {len(names)} names for {len(args.logs)} logs")
    rows = [score(log, args.refs, name, args.uncased) for log, name in zip(args.logs, names)]
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    print(markdown(rows))


if __name__ == "__main__":
    main()
