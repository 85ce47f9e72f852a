#!/usr/bin/env python
"""ELMER against fairseq's CMLM, LevT and an autoregressive Transformer on the same XSum data.

Every system has the same size (3+3 layers, d=256, 4 heads, FFN 1024, shared embeddings), the same
data (examples/prepare_xsum.py with sources cut to --max-source-tokens for all of them) and the
same number of updates. For each system it trains with fairseq-train (skipped when the checkpoint
has reached --updates, so an interrupted run continues), decodes the test split with
fairseq-generate for quality, and times every test sample at batch size 1 in one process, all
systems alike (warm-up, median, torch.cuda.synchronize() before reading the clock on GPU). A
sweep of hard exit's delta gives the share of tokens per exit layer and the quality at each delta.

    python examples/benchmark.py --data data/xsum-bench --out results/benchmark [--device cuda]

Writes OUT/results.md, OUT/results.csv, OUT/delta_sweep.md and OUT/delta_sweep.png. A system
that fails is reported with the step that failed; the others still get their rows. Rerunning
skips trained systems and finished rows (OUT/rows/), so an interrupted run continues.
"""
import argparse
import csv
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import elmer_fairseq.checkpoint  # noqa: F401  (fairseq checkpoints load with torch's safe default)

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from score import parse_log, rouge  # noqa: E402

SIZE = ["--encoder-layers", "3", "--decoder-layers", "3", "--encoder-embed-dim", "256",
        "--decoder-embed-dim", "256", "--encoder-ffn-embed-dim", "1024", "--decoder-ffn-embed-dim", "1024",
        "--encoder-attention-heads", "4", "--decoder-attention-heads", "4", "--share-all-embeddings"]
NAT = ["--task", "translation_lev", "--criterion", "nat_loss", "--apply-bert-init", "--encoder-learned-pos",
       "--decoder-learned-pos", "--label-smoothing", "0.1"]
ELMER = ["--user-dir", str(HERE.parent / "elmer_fairseq"), "--task", "elmer_translation", "--max-target-length", "64"]
NAT_GEN = ["--task", "translation_lev", "--iter-decode-eos-penalty", "0", "--beam", "1"]

# name -> (training flags, {system name: generation flags})
SYSTEMS = {
    "elmer-soft": (ELMER + ["--arch", "elmer_tiny", "--exit-mode", "soft", "--criterion", "elmer_loss",
                            "--label-smoothing", "0.1"],
                   {"ELMER-Soft": ELMER + ["--iter-decode-max-iter", "0", "--beam", "1"]}),
    "elmer-hard": (ELMER + ["--arch", "elmer_tiny", "--exit-mode", "hard", "--criterion", "elmer_loss",
                            "--label-smoothing", "0.1"],
                   {"ELMER-Hard (delta=0.5)": ELMER + ["--iter-decode-max-iter", "0", "--beam", "1",
                                                       "--exit-threshold", "0.5"]}),
    "cmlm": (NAT + ["--arch", "cmlm_transformer", "--noise", "random_mask", "--length-loss-factor", "0.1"],
             {"CMLM (0 it.)": NAT_GEN + ["--iter-decode-max-iter", "0"],
              "CMLM (10 it.)": NAT_GEN + ["--iter-decode-max-iter", "10", "--iter-decode-force-max-iter"]}),
    "levt": (NAT + ["--arch", "levenshtein_transformer", "--noise", "random_delete", "--early-exit", "3,3,3"],
             {"LevT": NAT_GEN + ["--iter-decode-max-iter", "10"]}),
    "transformer": (["--task", "translation", "--arch", "transformer", "--criterion", "label_smoothed_cross_entropy",
                     "--label-smoothing", "0.1"],
                    {"Transformer (AR, greedy)": ["--task", "translation", "--beam", "1", "--max-len-b", "64"],
                     "Transformer (AR, beam 4)": ["--task", "translation", "--beam", "4", "--max-len-b", "64"]}),
}
DELTAS = (0.0, 0.25, 0.5, 0.75, 1.0)


def fairseq_cli(tool):
    """The command of a fairseq console script, run by this interpreter (works without the scripts on PATH)."""
    return [sys.executable, "-m", f"fairseq_cli.{tool}"]


def fairseq(tool, *argv, log: Path):
    with log.open("w") as f:
        proc = subprocess.run([*fairseq_cli(tool), *map(str, argv)], stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"{tool} failed ({proc.returncode}); see {log}")


def trained_updates(ckpt: Path) -> int:
    if not ckpt.exists():
        return 0
    return torch.load(ckpt, map_location="cpu")["optimizer_history"][-1]["num_updates"]


def train(name, flags, args, device_flags):
    save = args.out / "checkpoints" / name
    if trained_updates(save / "checkpoint_last.pt") >= args.updates:
        return save / "checkpoint_last.pt", None
    save.mkdir(parents=True, exist_ok=True)
    argv = [args.data, *flags, *SIZE, "--optimizer", "adam", "--adam-betas", "(0.9,0.98)", "--lr", str(args.lr),
            "--lr-scheduler", "inverse_sqrt", "--warmup-updates", str(args.warmup), "--clip-norm", "1.0",
            "--weight-decay", "0.01", "--dropout", "0.1", "--max-tokens", str(args.max_tokens),
            "--max-update", str(args.updates), "--save-dir", save, "--no-epoch-checkpoints",
            "--save-interval-updates", "500", "--keep-interval-updates", "1", "--log-format", "simple",
            # validate and save every 500 updates and at the end, not after every (tiny) epoch
            "--validate-interval-updates", "500", "--validate-interval", "10000", "--save-interval", "10000",
            "--log-interval", "100", "--seed", "1", "--num-workers", "0", *device_flags]
    log = (args.out / "logs" / f"train-{name}.log").open("w")
    return save / "checkpoint_last.pt", subprocess.Popen([*fairseq_cli("train"), *map(str, argv)], stdout=log,
                                                         stderr=subprocess.STDOUT)


def extra_metrics(hyps, refs):
    import sacrebleu

    words = [h.split() for h in hyps]
    ngrams = lambda n: [tuple(w[i:i + n]) for w in words for i in range(len(w) - n + 1)]  # noqa: E731
    distinct = {n: len(set(ngrams(n))) / max(1, len(ngrams(n))) for n in (1, 2)}
    return {
        "bleu4": sacrebleu.corpus_bleu(hyps, [refs]).score,
        "distinct1": 100 * distinct[1], "distinct2": 100 * distinct[2],
        "mean_len": statistics.mean(len(w) for w in words),
        "empty": 100 * sum(not w for w in words) / len(words),
        "repeat": 100 * sum(any(a == b for a, b in zip(w, w[1:])) for w in words) / len(words),
    }


def quality(system, ckpt, gen_flags, args, device_flags, refs, log_name):
    log = args.out / "logs" / f"gen-{log_name}.txt"
    fairseq("generate", args.data, "--path", ckpt, *gen_flags, "--gen-subset", "test",
            "--batch-size", "32", "--required-batch-size-multiple", "1", "--bpe", "byte_bpe_ids",
            "--user-dir", HERE.parent / "elmer_fairseq", "--bpe-vocab", args.data.parent / "vocab.json",
            "--bpe-merges", args.data.parent / "merges.txt", *device_flags, log=log)
    hyps, _, _, mean_exit = parse_log(log)
    if sorted(hyps) != list(range(len(refs))):
        raise RuntimeError(f"{log}: {len(hyps)} hypotheses for {len(refs)} references")
    ordered = [hyps[i] for i in range(len(refs))]
    return {"system": system, **rouge(ordered, refs), **extra_metrics(ordered, refs), "mean_exit_layer": mean_exit}


def latency(ckpt, gen_flags, args, device):
    """Median ms per test sample at batch size 1, timed around task.inference_step."""
    from fairseq import checkpoint_utils, options, tasks, utils
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    parser = options.get_generation_parser()
    argv = [str(args.data), "--path", str(ckpt), "--user-dir", str(HERE.parent / "elmer_fairseq"), *gen_flags]
    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(parser, argv))
    utils.import_user_module(cfg.common)
    task = tasks.setup_task(cfg.task)
    models, _ = checkpoint_utils.load_model_ensemble([str(ckpt)], task=task)
    models = [m.to(device).eval() for m in models]
    generator = task.build_generator(models, cfg.generation)
    task.load_dataset("test")
    itr = task.get_batch_iterator(task.dataset("test"), max_sentences=1, required_batch_size_multiple=1,
                                  max_positions=utils.resolve_max_positions(task.max_positions(),
                                                                            *[m.max_positions() for m in models]))
    batches = [utils.move_to_cuda(b) if device == "cuda" else b for b in itr.next_epoch_itr(shuffle=False)]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = []
    with torch.no_grad():
        for i, batch in enumerate(batches[: args.warmup_samples] + batches):
            sync()
            start = time.perf_counter()
            task.inference_step(generator, models, batch)
            sync()
            if i >= args.warmup_samples:
                times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def delta_sweep(ckpt, args, device_flags, refs):
    rows = []
    for delta in DELTAS:
        flags = SYSTEMS["elmer-hard"][1]["ELMER-Hard (delta=0.5)"][:-1] + [str(delta)]
        row = quality(f"delta={delta}", ckpt, flags, args, device_flags, refs, f"elmer-hard-delta{delta}")
        text = (args.out / "logs" / f"gen-elmer-hard-delta{delta}.txt").read_text()
        shares = re.search(r"ELMER exit layers over .*?; (.*)$", text, re.M).group(1)
        row["layer_share"] = [float(s) for s in re.findall(r"L\d+ ([\d.]+)%", shares)]
        rows.append(row)
    return rows


def write_tables(rows, sweep, args, header):
    keys = ["system", "rouge1", "rouge2", "rougeL", "bleu4", "distinct1", "distinct2", "mean_len", "empty",
            "repeat", "ms_per_sample", "speedup_vs_ar", "mean_exit_layer", "error"]
    with (args.out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    fmt = lambda v: "-" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = [header, "", "| system | R-1 | R-2 | R-L | BLEU-4 | Dist-1 | Dist-2 | mean len | empty % | repeat % "
                         "| ms/sample | speed-up vs AR greedy | mean exit layer |", "|" + "---|" * 13]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['system']} | failed: {r['error']} |" + " |" * 11)
        else:
            lines.append("| " + " | ".join(fmt(r.get(k)) for k in keys[:-1]) + " |")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    if sweep:
        sweep_lines = ["| delta | R-1 | R-2 | R-L | mean exit layer | share per layer (L1/L2/L3, %) |", "|---|---|---|---|---|---|"]
        for r in sweep:
            sweep_lines.append(f"| {r['system'][6:]} | {r['rouge1']:.2f} | {r['rouge2']:.2f} | {r['rougeL']:.2f} | "
                               f"{r['mean_exit_layer']:.2f} | {' / '.join(f'{s:.1f}' for s in r['layer_share'])} |")
        (args.out / "delta_sweep.md").write_text("\n".join(sweep_lines) + "\n")
        plot_sweep(sweep, args.out / "delta_sweep.png")
    print((args.out / "results.md").read_text())


def plot_sweep(sweep, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    deltas = [float(r["system"][6:]) for r in sweep]
    fig, ax = plt.subplots(figsize=(6, 4))
    bottom = [0.0] * len(sweep)
    for layer in range(len(sweep[0]["layer_share"])):
        share = [r["layer_share"][layer] for r in sweep]
        ax.bar([str(d) for d in deltas], share, bottom=bottom, label=f"exit at layer {layer + 1}")
        bottom = [b + s for b, s in zip(bottom, share)]
    ax.set_xlabel("hard-exit threshold delta (nats)")
    ax.set_ylabel("share of output tokens (%)")
    twin = ax.twinx()
    twin.plot([str(d) for d in deltas], [r["rougeL"] for r in sweep], "k-o", label="ROUGE-L")
    twin.set_ylabel("ROUGE-L")
    ax.legend(loc="upper left", fontsize=8)
    twin.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path("data/xsum-bench/bin"), help="binarized XSum (prepare_xsum.py)")
    p.add_argument("--out", type=Path, default=Path("results/benchmark"))
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=list(SYSTEMS))
    p.add_argument("--updates", type=int, default=3000, help="training updates per system (default 3000)")
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--lr", type=float, default=7e-4)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--parallel", type=int, default=1, help="systems trained at the same time (a GPU fits several)")
    p.add_argument("--warmup-samples", type=int, default=10, help="untimed samples before timing")
    p.add_argument("--threads", type=int, default=2, help="torch threads for CPU timing (same for every system)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    for sub in ("logs", "rows"):
        (args.out / sub).mkdir(parents=True, exist_ok=True)
    refs = (args.data.parent / "test.raw.tgt").read_text(encoding="utf-8").splitlines()
    device_flags = ["--cpu"] if args.device == "cpu" else []
    results, errors, ckpts, running = [], {}, {}, []

    def wait(name, proc):
        if proc.wait() != 0:
            errors[name] = f"train: exit {proc.returncode}, see logs/train-{name}.log"

    for name in args.systems:  # training, up to --parallel systems at a time
        try:
            ckpts[name], proc = train(name, SYSTEMS[name][0], args, device_flags)
        except Exception as e:  # noqa: BLE001 (reported in the table)
            errors[name] = f"train: {e}"
            continue
        if proc is not None:
            print(f"training {name} ({args.updates} updates)", flush=True)
            running.append((name, proc))
        if len(running) >= args.parallel:
            wait(*running.pop(0))
    for job in running:
        wait(*job)
    for name in args.systems:
        for system, gen_flags in SYSTEMS[name][1].items():
            if name in errors:
                results.append({"system": system, "error": errors[name]})
                continue
            done = args.out / "rows" / (re.sub(r"\W+", "-", system) + ".json")
            if done.exists():  # finished in an earlier run: an interrupted benchmark continues
                results.append(json.loads(done.read_text()))
                continue
            step = "generate"
            try:
                row = quality(system, ckpts[name], gen_flags, args, device_flags, refs, re.sub(r"\W+", "-", system))
                step = "latency"
                row["ms_per_sample"] = latency(ckpts[name], gen_flags, args, args.device)
                results.append(row)
                done.write_text(json.dumps(row))
            except Exception as e:  # noqa: BLE001
                results.append({"system": system, "error": f"{step}: {e}"})
            print(json.dumps(results[-1]), flush=True)
    ar = next((r for r in results if r["system"].startswith("Transformer (AR, greedy)") and "ms_per_sample" in r), None)
    for r in results:
        if ar and "ms_per_sample" in r:
            r["speedup_vs_ar"] = ar["ms_per_sample"] / r["ms_per_sample"]
    sweep = delta_sweep(ckpts["elmer-hard"], args, device_flags, refs) if "elmer-hard" in ckpts and "elmer-hard" not in errors else []
    hw = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {args.threads} threads"
    header = (f"XSum test split ({len(refs)} articles), {args.updates} updates per system, {hw}; "
              f"latency: batch size 1, median after {args.warmup_samples} warm-up samples")
    write_tables(results, sweep, args, header)


if __name__ == "__main__":
    main()
