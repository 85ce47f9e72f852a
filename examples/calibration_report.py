#!/usr/bin/env python
"""Calibrated early exit next to fixed thresholds, on the test split (docs/calibration.md's report).

    python examples/calibration_report.py --path CKPT --data data/TASK/bin --out OUT \
        [--epsilons 0.01 0.05 0.1] [--alpha 0.1] [--deltas 0.5 1 2 3 4]

For each tolerance ε, `elmer-calibrate`'s thresholds are learned on the validation split
(OUT/exit_thresholds-eps{ε}.json); each policy (full depth, every fixed δ, every ε) then decodes the
test split and the table gives the share of output tokens exiting at each layer, the measured
disagreement with the full-depth output (the quantity ε bounds: per sequence, the share of the
full-depth output's positions whose token changed, averaged), whether it stayed within ε,
ROUGE-L, repeats, and ms/sample at batch 1 (median, one thread, after warm-up). OUT/report.md and
OUT/report.json.
"""
import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import torch

from elmer_fairseq import ELMER
from elmer_fairseq.calibrate import calibrate, changed_share
from elmer_fairseq.generator import cut_at_first_eos
# examples/ is a folder of scripts: a script's own folder is sys.path[0], so siblings import by name
from benchmark import uncased
from metrics import diversity, rouge

log = logging.getLogger("calibration_report")


def decode(model, batches, length, threshold):
    """Dataset order -> (tokens [N, T], exit layers [N, T]) of one decoding policy."""
    tokens, layers, ids = [], [], []
    with torch.no_grad():
        for batch in batches:
            net = batch["net_input"]
            out = model.generate(net["src_tokens"], net["src_lengths"], length, threshold)
            tokens.append(out.tokens)
            layers.append(out.exit_layer)
            ids.append(batch["id"])
    order = torch.cat(ids).argsort()
    return torch.cat(tokens)[order], torch.cat(layers)[order]


def ms_per_sample(model, dataset, length, threshold, samples: int, warmup: int = 10) -> float:
    times = []
    with torch.no_grad():
        for i in range(min(samples, len(dataset)) + warmup):
            batch = dataset.collater([dataset[i % len(dataset)]])
            start = time.perf_counter()
            model.generate(batch["net_input"]["src_tokens"], batch["net_input"]["src_lengths"], length, threshold)
            if i >= warmup:
                times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def row(name, threshold, tokens, layers, full, hub, refs, lower, model, dataset, length, args):
    eos, pad = hub.tgt_dict.eos(), hub.tgt_dict.pad()
    risk = changed_share(tokens, full, eos).mean().item()
    own = cut_at_first_eos(tokens, eos, pad).ne(pad)  # this policy's own output positions
    shares = torch.bincount(layers[own] - 1, minlength=model.decoder.num_layers).double() / max(1, int(own.sum()))
    hyps = [hub.decode(t[k]) for t, k in zip(tokens, own)]
    scores = {**rouge(hyps, [r.lower() for r in refs] if lower else refs), **diversity(hyps)}
    return {"policy": name, "thresholds": list(getattr(threshold, "values", [threshold])),
            "exit_shares": shares.tolist(), "mean_exit_layer": float((shares * torch.arange(1, len(shares) + 1)).sum()),
            "disagreement": risk, "rougeL": scores["rougeL"], "repeat": scores["repeat"],
            "distinct1": scores["distinct1"], "mean_len": scores["mean_len"],
            "ms_per_sample": ms_per_sample(model, dataset, length, threshold, args.latency_samples),
            "samples": hyps[:3]}


def markdown(rows, epsilons, header):
    layers = len(rows[0]["exit_shares"])
    lines = [header, "",
             "| policy | thresholds (layers 1..L-1) | " + " | ".join(f"L{l + 1} %" for l in range(layers))
             + " | mean exit layer | disagreement with full depth (%) | R-L | repeat % | Dist-1 | ms/sample |",
             "|---" * (layers + 8) + "|"]
    for r in rows:
        eps = epsilons.get(r["policy"])
        within = "" if eps is None else (" (within ε)" if r["disagreement"] <= eps else " (**above ε**)")
        lines.append(f"| {r['policy']} | {', '.join(f'{v:.3g}' for v in r['thresholds'])} | "
                     + " | ".join(f"{100 * s:.1f}" for s in r["exit_shares"])
                     + f" | {r['mean_exit_layer']:.2f} | {100 * r['disagreement']:.2f}{within} | {r['rougeL']:.2f}"
                     f" | {r['repeat']:.0f} | {r['distinct1']:.1f} | {r['ms_per_sample']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--path", required=True, help="hard-exit checkpoint file, or the --save-dir of its run")
    p.add_argument("--data", type=Path, required=True, help="its binarized data folder (references: ../test.raw.tgt)")
    p.add_argument("--out", type=Path, required=True, help="folder for the thresholds files and the report")
    p.add_argument("--epsilons", type=float, nargs="+", default=[0.01, 0.05, 0.1])
    p.add_argument("--alpha", type=float, default=0.1)
    p.add_argument("--deltas", type=float, nargs="*", default=[0.5, 1, 2, 3, 4], help="fixed thresholds (nats)")
    p.add_argument("--latency-samples", type=int, default=100, help="test samples timed at batch 1 per policy")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    logging.basicConfig(format="%(levelname)s | %(name)s | %(message)s", level=logging.INFO, force=True)
    torch.set_num_threads(args.threads)
    refs_file = args.data.parent / "test.raw.tgt"
    if not refs_file.is_file():
        raise SystemExit(f"calibration_report: error: no references at {refs_file} (examples/TASK/prepare.py writes them)")
    refs = refs_file.read_text(encoding="utf-8").splitlines()
    folder = args.data.parent  # prepare.py's tokenizer files sit beside bin/; without them the pieces are the words
    bpe = folder if any((folder / f).is_file() for f in ("tokenizer.json", "vocab.json")) else None
    hub = ELMER.from_pretrained(args.path, data=args.data, bpe_dir=bpe, device="cpu")
    model, task = hub.models[0], hub.task
    length = task.cfg.max_target_length
    args.out.mkdir(parents=True, exist_ok=True)

    policies = [("full depth", 0.0)] + [(f"δ = {d:g}", d) for d in args.deltas]
    epsilons, calibrations = {}, {}
    for eps in args.epsilons:
        log.info(f"calibrating at epsilon {eps}, alpha {args.alpha}")
        thresholds, details = calibrate(model, task, "valid", eps, args.alpha)
        thresholds.save(args.out / f"exit_thresholds-eps{eps:g}.json", checkpoint=str(args.path), **details)
        name = f"ε = {eps:g} (calibrated)"
        policies.append((name, thresholds))
        epsilons[name], calibrations[name] = eps, details

    task.load_dataset("test")
    dataset = task.dataset("test")
    if len(dataset) != len(refs):
        raise SystemExit(f"calibration_report: error: {len(dataset)} test samples but {len(refs)} references in {refs_file}")
    batches = [dataset.collater([dataset[i] for i in range(k, min(k + 32, len(dataset)))])
               for k in range(0, len(dataset), 32)]
    full, _ = decode(model, batches, length, 0.0)
    lower = uncased(folder)
    rows = []
    for name, threshold in policies:
        log.info(f"decoding the test split: {name}")
        tokens, layers = decode(model, batches, length, threshold)
        rows.append(row(name, threshold, tokens, layers, full, hub, refs, lower, model, dataset, length, args))
    header = (f"{args.path}; calibrated on the valid split ({len(task.dataset('valid'))} sequences, halved), "
              f"α = {args.alpha}; test split: {len(dataset)} sequences; ms/sample: batch 1, {args.threads} thread(s)")
    table = markdown(rows, epsilons, header)
    (args.out / "report.md").write_text(table, encoding="utf-8")
    (args.out / "report.json").write_text(json.dumps({"rows": rows, "calibration": calibrations}, indent=1,
                                                     ensure_ascii=False), encoding="utf-8")
    print(table)
    for name, details in calibrations.items():
        print(f"{name}: chosen rate {details['rate']}, risk {details['test_risk']:.4f} on "
              f"{details['test_sequences']} calibration-test sequences")
    return rows


if __name__ == "__main__":
    main()
