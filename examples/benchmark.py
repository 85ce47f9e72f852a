#!/usr/bin/env python
"""ELMER against fairseq's CMLM, LevT and an autoregressive Transformer on one task's data.

Every system has the same size (--layers encoder and decoder layers, width --dim, FFN 4 x dim,
--heads heads, shared embeddings), the same data (examples/TASK/prepare.py, sources and targets cut at
writing time for all of them) and the same number of updates. For each system it trains with
fairseq-train (skipped when the checkpoint has reached --updates, so an interrupted run
continues), decodes the test split with fairseq-generate for quality, and times every test
sample at batch size 1 in one process, all systems alike (same thread count, warm-up, median,
torch.cuda.synchronize() before reading the clock on GPU). Systems ending in "-kd" train on the
training split re-labelled by the trained autoregressive Transformer (sequence-level knowledge
distillation, greedy decoding: fairseq's usual NAT recipe). "elmer-soft-lplm" is ELMER-Soft
fine-tuned from an ELMER pretrained with --task elmer_lplm (--pretrain-updates updates, k =
--lplm-permutations) on the task's own training text, sources and targets as documents (never
test text): the paper's recipe at the scale of the data at hand, its pretraining updates on top of
the common budget. A sweep of hard exit's delta gives the share of tokens per exit layer and the
quality at each delta. The distilled data is made once, from the Transformer as it is when the
first -kd system trains. --elmer-options trains an ELMER variant in the same harness (a deeper
decoder, more dropout, --eos-after-end): its options override the common ones for the ELMER
systems only, and the table's header names them; give a variant its own --out.

    python examples/benchmark.py --data data/bench/boolq/bin --out results/benchmark/boolq [--device cuda]

Writes OUT/results.md, OUT/results.csv, OUT/samples.md (the first outputs of every system, to
read), OUT/delta_sweep.md and OUT/delta_sweep.png. A system that fails is reported with the step
that failed; the others still get their rows. Rerunning skips trained systems and finished rows
(OUT/rows/), so an interrupted run continues. examples/benchmark_cpu.sh runs all three tasks.
"""
import argparse
import csv
import json
import logging
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

# OpenMP threads that spin at every barrier run many times slower while another process holds a
# core (docs/speed.md): sleeping waiters here and in the fairseq runs started below (they inherit
# it). Read by the OpenMP runtime once, when torch loads; a value set by the caller wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402

import elmer_fairseq.checkpoint  # noqa: F401  (fairseq checkpoints load with torch's safe default)

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from metrics import all_metrics  # noqa: E402
from score import parse_log  # noqa: E402

NAT = ["--task", "translation_lev", "--criterion", "nat_loss", "--apply-bert-init", "--encoder-learned-pos",
       "--decoder-learned-pos", "--label-smoothing", "0.1"]
NAT_GEN = ["--task", "translation_lev", "--iter-decode-eos-penalty", "0", "--beam", "1"]
NAR = ("elmer-soft", "elmer-hard", "cmlm", "levt")  # the systems that have a "-kd" twin
NAMES = ["transformer", *NAR, *(f"{n}-kd" for n in NAR), "elmer-soft-lplm"]
# the authors' fine-tuning recipe: plain cross-entropy (smoothing would also keep hard exit's
# off-ramps above delta) and, for soft exit, gold-token mixing at the model's default 0.3
ELMER_TINY = ["--arch", "elmer_tiny", "--criterion", "elmer_loss", "--label-smoothing", "0"]


def systems(args):
    """name -> (training flags, {system name: generation flags}); every output is at most T pieces."""
    length = str(args.max_target_length)
    elmer = ["--user-dir", str(HERE.parent / "elmer_fairseq"), "--task", "elmer_translation",
             "--max-target-length", length]
    elmer_train = elmer + ELMER_TINY + shlex.split(args.elmer_options)
    elmer_gen = elmer + ["--iter-decode-max-iter", "0", "--beam", "1"]
    nat_gen = NAT_GEN + ["--max-len-a", "0", "--max-len-b", length]
    ar_gen = ["--task", "translation", "--max-len-a", "0", "--max-len-b", length]
    out = {
        "transformer": (["--task", "translation", "--arch", "transformer", "--label-smoothing", "0.1",
                         "--criterion", "label_smoothed_cross_entropy"],
                        {"Transformer (AR, greedy)": ar_gen + ["--beam", "1"],
                         "Transformer (AR, beam 4)": ar_gen + ["--beam", "4"]}),
        "elmer-soft": (elmer_train + ["--exit-mode", "soft"],
                       {"ELMER-Soft": elmer_gen,
                        # reads the reference's length: comparable with the paper's rows, not a result
                        "ELMER-Soft, oracle T (authors' test protocol)": elmer_gen + ["--oracle-length"]}),
        "elmer-hard": (elmer_train + ["--exit-mode", "hard"],
                       {"ELMER-Hard (delta=0.5)": elmer_gen + ["--exit-threshold", "0.5"]}),
        "cmlm": (NAT + ["--arch", "cmlm_transformer", "--noise", "random_mask", "--length-loss-factor", "0.1"],
                 {"CMLM (0 it.)": nat_gen + ["--iter-decode-max-iter", "0"],
                  "CMLM (10 it.)": nat_gen + ["--iter-decode-max-iter", "10", "--iter-decode-force-max-iter"]}),
        "levt": (NAT + ["--arch", "levenshtein_transformer", "--noise", "random_delete",
                        "--early-exit", ",".join([str(args.layers)] * 3)],
                 {"LevT": nat_gen + ["--iter-decode-max-iter", "10"]}),
    }
    for name in NAR:
        flags, gens = out[name]
        out[f"{name}-kd"] = (flags, {f"{system} + KD": gen for system, gen in gens.items()
                                     if "--oracle-length" not in gen})
    # fairseq-train starts from the pretrained weights only while the run has no checkpoint of its own
    pretrained = last_checkpoint(args, "lplm-pretrain")
    out["elmer-soft-lplm"] = (out["elmer-soft"][0] + ["--finetune-from-model", pretrained],
                              {"ELMER-Soft + LPLM pretraining": elmer_gen})
    return out


def size_flags(args):
    return ["--encoder-layers", args.layers, "--decoder-layers", args.layers, "--encoder-embed-dim", args.dim,
            "--decoder-embed-dim", args.dim, "--encoder-ffn-embed-dim", 4 * args.dim,
            "--decoder-ffn-embed-dim", 4 * args.dim, "--encoder-attention-heads", args.heads,
            "--decoder-attention-heads", args.heads, "--share-all-embeddings"]


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


def last_checkpoint(args, name) -> Path:
    return args.out / "checkpoints" / name / "checkpoint_last.pt"


def train(name, flags, data, args, device_flags, updates=None):
    ckpt, updates = last_checkpoint(args, name), updates or args.updates
    if trained_updates(ckpt) >= updates:
        return ckpt, None
    save = ckpt.parent
    save.mkdir(parents=True, exist_ok=True)
    every = str(max(100, updates // 5))
    if "--user-dir" not in flags:  # its checkpoint allow-list lets fairseq's resume load with torch's safe default
        flags = ["--user-dir", HERE.parent / "elmer_fairseq", *flags]
    # the system's own flags last: they may override the common ones (--elmer-options)
    argv = [data, *size_flags(args), "--optimizer", "adam", "--adam-betas", "(0.9,0.98)", "--lr", args.lr,
            "--lr-scheduler", "inverse_sqrt", "--warmup-updates", args.warmup, "--clip-norm", "1.0",
            "--weight-decay", "0.01", "--dropout", "0.1", "--max-tokens", args.max_tokens,
            "--required-batch-size-multiple", "1",  # fairseq drops the samples that do not fill a multiple
            "--max-update", updates, "--save-dir", save, "--no-epoch-checkpoints",
            "--save-interval-updates", every, "--keep-interval-updates", "1", "--log-format", "simple",
            # validate and save every `every` updates and at the end, not after every (tiny) epoch
            "--validate-interval-updates", every, "--validate-interval", "10000", "--save-interval", "10000",
            "--log-interval", "100", "--seed", "1", "--num-workers", "0", *device_flags, *flags]
    log = (args.out / "logs" / f"train-{name}.log").open("w")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.train_threads), "MKL_NUM_THREADS": str(args.train_threads)}
    return ckpt, subprocess.Popen([*fairseq_cli("train"), *map(str, argv)], stdout=log, stderr=subprocess.STDOUT,
                                  env=env)


def distill(ar_ckpt, args, device_flags) -> Path:
    """The training split with targets re-written by the AR Transformer (greedy), binarized with the same dicts."""
    kd = args.out / "kd-data"
    if (kd / "bin" / "train.src-tgt.tgt.idx").exists():
        return kd / "bin"
    kd.mkdir(parents=True, exist_ok=True)
    log = args.out / "logs" / "distill.txt"
    fairseq("generate", args.data, "--path", ar_ckpt, *systems(args)["transformer"][1]["Transformer (AR, greedy)"],
            "--gen-subset", "train", "--batch-size", "128", "--required-batch-size-multiple", "1",
            "--user-dir", HERE.parent / "elmer_fairseq", *device_flags, log=log)
    hyps = {int(line[2:].split("\t")[0]): line.rstrip("\n").split("\t")[2:] for line in log.open() if line.startswith("H-")}
    sources = (args.data.parent / "train.src").read_text(encoding="utf-8").splitlines()
    targets = (args.data.parent / "train.tgt").read_text(encoding="utf-8").splitlines()
    if sorted(hyps) != list(range(len(targets))):
        raise RuntimeError(f"{log}: {len(hyps)} hypotheses for {len(targets)} training pairs")
    # an empty hypothesis would leave a NAT system nothing to learn from: keep the reference there
    new = [(hyps[i][0] if hyps[i] and hyps[i][0] else targets[i]) for i in range(len(targets))]
    print(f"distilled {len(new)} training targets ({sum(a == b for a, b in zip(new, targets))} equal to the "
          f"reference, {sum(not (hyps[i] and hyps[i][0]) for i in hyps)} empty kept as the reference)", flush=True)
    (kd / "train.src").write_text("\n".join(sources) + "\n", encoding="utf-8")
    (kd / "train.tgt").write_text("\n".join(new) + "\n", encoding="utf-8")
    fairseq("preprocess", "--source-lang", "src", "--target-lang", "tgt", "--trainpref", kd / "train",
            "--srcdict", args.data / "dict.src.txt", "--tgtdict", args.data / "dict.tgt.txt",
            "--destdir", kd / "bin", "--workers", "2", log=args.out / "logs" / "distill-preprocess.txt")
    for f in args.data.glob("*"):  # valid and test stay the real references
        if not f.name.startswith("train.") and not (kd / "bin" / f.name).exists():
            (kd / "bin" / f.name).symlink_to(f.resolve())
    return kd / "bin"


def pretrain(args, device_flags) -> Path:
    """ELMER pretrained with LPLM on the task's training (and valid) text: each distinct source and
    target line is a document, in the task's own BPE and dictionary, so the weights fine-tune as they are."""
    corpus = args.out / "lplm-data"
    if not (corpus / "bin" / "train.idx").exists():
        corpus.mkdir(parents=True, exist_ok=True)
        for split in ("train", "valid"):
            lines = dict.fromkeys(line for side in ("src", "tgt") for line in
                                  (args.data.parent / f"{split}.{side}").read_text(encoding="utf-8").splitlines()
                                  if line.strip())
            (corpus / f"{split}.ids").write_text("\n\n".join(lines) + "\n", encoding="utf-8")
        fairseq("preprocess", "--only-source", "--srcdict", args.data / "dict.src.txt", "--trainpref",
                corpus / "train.ids", "--validpref", corpus / "valid.ids", "--destdir", corpus / "bin",
                "--workers", "2", log=args.out / "logs" / "lplm-preprocess.txt")
    flags = ["--user-dir", HERE.parent / "elmer_fairseq", "--task", "elmer_lplm", "--bpe-dir", args.data.parent,
             *ELMER_TINY, "--lplm-permutations", args.lplm_permutations, "--tokens-per-sample", "128",
             "--shorten-method", "truncate"]
    ckpt, proc = train("lplm-pretrain", flags, corpus / "bin", args, device_flags, updates=args.pretrain_updates)
    if proc is not None:
        print(f"pretraining ELMER with LPLM ({args.pretrain_updates} updates, k={args.lplm_permutations})", flush=True)
        if proc.wait() != 0:
            raise RuntimeError(f"exit {proc.returncode}, see logs/train-lplm-pretrain.log")
    return ckpt


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
    return {"system": system, **all_metrics(ordered, refs, args.wordnet), "mean_exit_layer": mean_exit,
            "samples": ordered[: args.show]}


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
    hard = systems(args)["elmer-hard"][1]["ELMER-Hard (delta=0.5)"]
    for delta in args.deltas:
        row = quality(f"delta={delta}", ckpt, hard[:-1] + [str(delta)], args, device_flags, refs,
                      f"elmer-hard-delta{delta}")
        text = (args.out / "logs" / f"gen-elmer-hard-delta{delta}.txt").read_text()
        shares = re.search(r"ELMER exit layers over .*?; (.*)$", text, re.M).group(1)
        row["layer_share"] = [float(s) for s in re.findall(r"L\d+ ([\d.]+)%", shares)]
        rows.append(row)
    return rows


KEYS = ["system", "rouge1", "rouge2", "rougeL", "rougeL_collapsed", "bleu1", "bleu2", "bleu4", "meteor", "distinct1",
        "distinct2", "mean_len", "empty", "repeat", "ms_per_sample", "speedup_vs_ar", "mean_exit_layer", "error"]
HEADS = ["system", "R-1", "R-2", "R-L", "R-L, repeats collapsed", "BLEU-1", "BLEU-2", "BLEU-4", "METEOR", "Dist-1",
         "Dist-2", "mean len", "empty %", "repeat %", "ms/sample", "speed-up vs AR greedy", "mean exit layer"]


def write_tables(rows, sweep, args, header):
    with (args.out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=KEYS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    fmt = lambda v: "-" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = [header, "", "| " + " | ".join(HEADS) + " |", "|" + "---|" * len(HEADS)]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['system']} | failed: {r['error']} |" + " |" * (len(HEADS) - 2))
        else:
            lines.append("| " + " | ".join(fmt(r.get(k)) for k in KEYS[:-1]) + " |")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    refs = (args.data.parent / "test.raw.tgt").read_text(encoding="utf-8").splitlines()
    samples = [f"# First {args.show} test outputs per system\n"]
    for i, ref in enumerate(refs[: args.show]):
        samples.append(f"## Sample {i}\n\n- **reference**: {ref}")
        samples += [f"- **{r['system']}**: {r['samples'][i]}" for r in rows if len(r.get("samples", [])) > i]
        samples.append("")
    (args.out / "samples.md").write_text("\n".join(samples))
    if sweep:
        sweep_lines = ["| delta | R-1 | R-2 | R-L | METEOR | mean exit layer | share per layer (L1/L2/..., %) |",
                       "|---|---|---|---|---|---|---|"]
        for r in sweep:
            sweep_lines.append(f"| {r['system'][6:]} | {r['rouge1']:.2f} | {r['rouge2']:.2f} | {r['rougeL']:.2f} | "
                               f"{r['meteor']:.2f} | {r['mean_exit_layer']:.2f} | "
                               f"{' / '.join(f'{s:.1f}' for s in r['layer_share'])} |")
        (args.out / "delta_sweep.md").write_text("\n".join(sweep_lines) + "\n")
        plot_sweep(sweep, args.out / "delta_sweep.png")
    print((args.out / "results.md").read_text())


def plot_sweep(sweep, path):
    import matplotlib

    matplotlib.use("Agg")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # fairseq leaves the root logger verbose
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
    p.add_argument("--data", type=Path, default=Path("data/xsum-bench/bin"), help="binarized data (examples/TASK/prepare.py)")
    p.add_argument("--out", type=Path, default=Path("results/benchmark"))
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--systems", nargs="+", default=NAMES[:5], choices=NAMES,
                   help="which to train (default: the five without distillation; add e.g. elmer-soft-kd cmlm-kd)")
    p.add_argument("--layers", type=int, default=3, help="encoder and decoder layers of every system (default: 3)")
    p.add_argument("--dim", type=int, default=256, help="model width of every system, FFN 4x (default: 256)")
    p.add_argument("--heads", type=int, default=4, help="attention heads of every system (default: 4)")
    p.add_argument("--max-target-length", type=int, default=64,
                   help="longest output of every system: ELMER's T, the AR and NAT --max-len-b (default: 64)")
    p.add_argument("--updates", type=int, default=3000, help="training updates per system (default 3000)")
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--lr", type=float, default=7e-4)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--parallel", type=int, default=1, help="systems trained at the same time")
    p.add_argument("--train-threads", type=int, default=1, help="torch threads per training process (default: 1)")
    p.add_argument("--elmer-options", default="",
                   help="more fairseq-train options for the ELMER systems, overriding the common ones: a variant in the "
                        "same harness, e.g. --elmer-options='--decoder-layers 6' or --elmer-options='--dropout 0.3' "
                        "(give the variant its own --out; not with elmer-soft-lplm, whose pretraining is another task)")
    p.add_argument("--pretrain-updates", type=int, default=1000,
                   help="elmer-soft-lplm: LPLM pretraining updates before its --updates of fine-tuning (default: 1000)")
    p.add_argument("--lplm-permutations", type=int, default=2,
                   help="elmer-soft-lplm: permutations k per document (default 2: the paper's 10 costs ~2x per "
                        "update on CPU)")
    p.add_argument("--warmup-samples", type=int, default=10, help="untimed samples before timing")
    p.add_argument("--threads", type=int, default=1, help="torch threads for CPU timing (same for every system)")
    p.add_argument("--deltas", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0],
                   help="hard-exit thresholds of the sweep, in nats (default: 0 0.25 0.5 0.75 1)")
    p.add_argument("--show", type=int, default=5, help="test outputs per system written to samples.md")
    p.add_argument("--wordnet", type=Path, default=Path("data/nltk_data"), help="WordNet cache for METEOR")
    args = p.parse_args()
    if not (args.data / "dict.src.txt").exists():
        sys.exit(f"--data {args.data}: no dict.src.txt; prepare the data first (examples/TASK/prepare.py)")
    if args.elmer_options and "elmer-soft-lplm" in args.systems:
        sys.exit("--elmer-options: not with elmer-soft-lplm (its LPLM pretraining would not match); run it separately")
    if any(n.endswith("-kd") for n in args.systems) and "transformer" not in args.systems:
        sys.exit("--systems: the -kd systems learn from the autoregressive transformer; add 'transformer'")
    torch.set_num_threads(args.threads)
    for sub in ("logs", "rows"):
        (args.out / sub).mkdir(parents=True, exist_ok=True)
    refs = (args.data.parent / "test.raw.tgt").read_text(encoding="utf-8").splitlines()
    device_flags = ["--cpu"] if args.device == "cpu" else []
    table, results, errors, ckpts, running = systems(args), [], {}, {}, []
    order = [n for n in NAMES if n in args.systems]  # the AR model first: distillation needs it

    def wait(name, proc):
        if proc.wait() != 0:
            errors[name] = f"train: exit {proc.returncode}, see logs/train-{name}.log"

    for name in order:  # training, up to --parallel systems at a time
        try:
            data, step = args.data, "distill" if name.endswith("-kd") else "train"
            if name.endswith("-kd"):
                while any(n == "transformer" for n, _ in running):
                    wait(*running.pop(0))
                if "transformer" in errors or "transformer" not in ckpts:
                    raise RuntimeError("the autoregressive transformer did not train")
                data = distill(ckpts["transformer"], args, device_flags)
            # a finished fine-tuning run needs no pretrained weights, even where they were deleted
            if name == "elmer-soft-lplm" and trained_updates(last_checkpoint(args, name)) < args.updates:
                step = "pretrain"
                pretrain(args, device_flags)
                step = "train"
            ckpts[name], proc = train(name, table[name][0], data, args, device_flags)
        except Exception as e:  # noqa: BLE001 (reported in the table)
            errors[name] = f"{step}: {e}"
            continue
        if proc is not None:
            print(f"training {name} ({args.updates} updates)", flush=True)
            running.append((name, proc))
        if len(running) >= args.parallel:
            wait(*running.pop(0))
    for job in running:
        wait(*job)
    for name in order:
        updates = None if name in errors else trained_updates(ckpts[name])
        for system, gen_flags in table[name][1].items():
            if name in errors:
                results.append({"system": system, "error": errors[name]})
                continue
            done = args.out / "rows" / (re.sub(r"\W+", "-", system) + ".json")
            earlier = json.loads(done.read_text()) if done.exists() else {}
            # finished in an earlier run from the same checkpoint: an interrupted benchmark continues,
            # and one rerun with more --updates trains further and scores again
            if earlier.get("updates") == updates:
                results.append(earlier)
                continue
            step = "generate"
            try:
                row = quality(system, ckpts[name], gen_flags, args, device_flags, refs, re.sub(r"\W+", "-", system))
                step = "latency"
                row["ms_per_sample"] = latency(ckpts[name], gen_flags, args, args.device)
                row["updates"] = updates
                results.append(row)
                done.write_text(json.dumps(row))
            except Exception as e:  # noqa: BLE001
                results.append({"system": system, "error": f"{step}: {e}"})
            print(json.dumps({k: v for k, v in results[-1].items() if k != "samples"}), flush=True)
    ar = next((r for r in results if r["system"] == "Transformer (AR, greedy)" and "ms_per_sample" in r), None)
    for r in results:
        if ar and "ms_per_sample" in r:
            r["speedup_vs_ar"] = ar["ms_per_sample"] / r["ms_per_sample"]
    sweep = []
    if "elmer-hard" in ckpts and "elmer-hard" not in errors:
        try:
            sweep = delta_sweep(ckpts["elmer-hard"], args, device_flags, refs)
        except Exception as e:  # noqa: BLE001 (the table is still written)
            print(f"delta sweep failed: {e}", flush=True)
    hw = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({os.cpu_count()} cores), {args.threads} thread(s)"
    split = json.loads((args.data.parent / "splits.json").read_text()) if (args.data.parent / "splits.json").exists() else {}
    header = (f"{split.get('task', args.data.parent.name)}: test split of {len(refs)} samples "
              f"(train {split.get('pairs', {}).get('train', '?')} pairs); {args.layers}+{args.layers} layers, "
              f"d={args.dim}; {args.updates} updates of <= {args.max_tokens} tokens per system; {hw}; latency: "
              f"batch size 1, median after {args.warmup_samples} warm-up samples"
              + (f"; ELMER trained with {args.elmer_options}" if args.elmer_options else ""))
    write_tables(results, sweep, args, header)


if __name__ == "__main__":
    main()
