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

Warm-started track: --warm-start DIR, an `elmer-convert --for transformer cmlm_transformer
levenshtein_transformer` output (docs/converting.md), and data binarized with its dict.txt
(examples/TASK/prepare.py --tokenizer). Every system then fine-tunes from the same converted
weights (DIR/model.pt for ELMER, DIR/ARCH.pt for the baselines) at the converted model's size.
Data with a tokenizer.json is decoded to text with its WordPiece; an uncased one (MiniLM) has its
references lowercased before scoring, and the table's header says so. --elmer-from CKPT fine-tunes
the ELMER systems from a trained ELMER checkpoint instead (a second stage, e.g. CTC after ce).

    python examples/benchmark.py --data data/bench/boolq/bin --out results/benchmark/boolq [--device cuda]

Writes OUT/results.md, OUT/results.csv, OUT/samples.md (the first outputs of every system, to
read), OUT/delta_sweep.md and OUT/delta_sweep.png, OUT/loss_curves.png (training loss and validation
NLL against updates, from the training logs). A system that fails is reported with the step
that failed; the others still get their rows. Rerunning skips trained systems and finished rows
(OUT/rows/), so an interrupted run continues. examples/benchmark_cpu.sh runs all three tasks.
A system is one `System` record in systems(): a new system is one more entry there.
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
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

# OpenMP threads that spin at every barrier run many times slower while another process holds a
# core (docs/speed.md): sleeping waiters here and in the fairseq runs started below (they inherit
# it). Read by the OpenMP runtime once, when torch loads; a value set by the caller wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402
from fairseq.models import ARCH_CONFIG_REGISTRY  # noqa: E402

import elmer_fairseq.checkpoint  # noqa: F401,E402  (fairseq checkpoints load with torch's safe default)
from elmer_fairseq.convert import as_flags  # noqa: E402
# examples/ is a folder of scripts, not a package: a script's own folder is sys.path[0], so its
# siblings import by name (gpu_check.py, run as a script too, and the tests import this file so)
from distill import PLUGIN, distill, fairseq, fairseq_cli  # noqa: E402,F401  (gpu_check.py runs fairseq through here)
from metrics import all_metrics  # noqa: E402
from score import parse_log  # noqa: E402

# the architecture options elmer-convert builds a model with (those it prints): fairseq-train
# builds the model from options, then --finetune-from-model loads the converted weights strictly
ARCH_OPTIONS = ("encoder_layers", "decoder_layers", "encoder_embed_dim", "decoder_embed_dim", "encoder_ffn_embed_dim",
                "decoder_ffn_embed_dim", "encoder_attention_heads", "decoder_attention_heads", "activation_fn",
                "layernorm_embedding", "no_scale_embedding", "layernorm_eps", "max_source_positions",
                "max_target_positions", "encoder_learned_pos", "decoder_learned_pos", "share_all_embeddings",
                "early_exit")


LENGTH_CUT = 2  # the margin of ELMER's --length-cut rows
SHORTLIST = 64  # ELMER-Soft's --ramp-shortlist row: its outputs equalled the full vocabulary's (docs/one-pass.md)
# the --max-exit-layer rows: on the warm track layer 4's off-ramp writes as layer 6's, layer 2's
# nearly so (docs/one-pass.md)
EXIT_LAYERS = (4, 2)


@dataclass
class System:
    """One trained model of the table and the rows decoded from its checkpoint."""
    name: str  # --systems name; OUT/checkpoints/NAME/, OUT/logs/train-NAME.log
    arch: str  # fairseq architecture at random initialisation, sized by --layers/--dim/--heads
    converted: str  # with --warm-start DIR it fine-tunes from DIR/CONVERTED (None: it cannot)
    train: list  # fairseq-train options beyond the model's (after the common ones: they win)
    rows: dict  # {table row: fairseq-generate options}, each decoded, scored and timed
    teacher: str = None  # trains on the training split re-labelled by this system (sequence-level KD)
    relabel: list = None  # as a teacher: the fairseq-generate options it re-labels with
    pretrain: bool = False  # fine-tunes from an ELMER LPLM-pretrained on the task's training text first
    sweep: list = None  # fairseq-generate options decoded once per --deltas value (--exit-threshold D)
    speed_reference: str = None  # its row that every row's speed-up is measured against


def distilled(student: System, teacher: System) -> System:
    """`student` trained on `teacher`'s outputs: same options, its rows marked "+ KD"."""
    # an oracle-length row reads the reference's length: a protocol comparison, not repeated here
    rows = {f"{row} + KD": gen for row, gen in student.rows.items() if "--oracle-length" not in gen}
    return System(f"{student.name}-kd", student.arch, student.converted, student.train, rows, teacher=teacher.name,
                  sweep=student.sweep)


def systems(args) -> dict:
    """{name: System} in training order (a teacher before its students); ELMER's and the AR
    Transformer's outputs are at most --max-target-length pieces (fairseq's iterative refinement
    ignores --max-len-b: CMLM's length comes from its length predictor, LevT's from its insertions,
    capped by its position table)."""
    length = str(args.max_target_length)
    elmer = ["--user-dir", str(PLUGIN), "--task", "elmer_translation", "--max-target-length", length]
    # the authors' fine-tuning recipe: plain cross-entropy (smoothing would also keep hard exit's
    # off-ramps above delta) and, for soft exit, gold-token mixing at the model's default 0.3;
    # --elmer-options last: they override the common options, for ELMER only
    elmer_train = lambda mode: [*elmer, "--criterion", "elmer_loss", "--label-smoothing", "0",  # noqa: E731
                                "--exit-mode", mode, *shlex.split(args.elmer_options)]
    elmer_gen = elmer + ["--iter-decode-max-iter", "0", "--beam", "1"]
    nat_train = ["--task", "translation_lev", "--criterion", "nat_loss", "--apply-bert-init", "--encoder-learned-pos",
                 "--decoder-learned-pos", "--label-smoothing", "0.1"]
    nat_gen = ["--task", "translation_lev", "--iter-decode-eos-penalty", "0", "--beam", "1", "--max-len-a", "0",
               "--max-len-b", length]
    ar_gen = ["--task", "translation", "--max-len-a", "0", "--max-len-b", length]
    # LevT's three heads read the last decoder layer (a converted checkpoint's options say so for its depth)
    levt_heads = [] if args.warm_start else ["--early-exit", ",".join([str(args.layers)] * 3)]

    transformer = System(
        "transformer", "transformer", "transformer.pt",
        ["--task", "translation", "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1"],
        {"Transformer (AR, greedy)": ar_gen + ["--beam", "1"], "Transformer (AR, beam 4)": ar_gen + ["--beam", "4"]},
        relabel=ar_gen + ["--beam", "1"], speed_reference="Transformer (AR, greedy)")
    ctc = "ctc" in shlex.split(args.elmer_options)  # --output-loss ctc: no EOS position to set T by
    cut = ["--length-cut", str(LENGTH_CUT)]
    soft_rows = {"ELMER-Soft": elmer_gen, f"ELMER-Soft, --length-cut {LENGTH_CUT}": elmer_gen + cut}
    layers = elmer_layers(args)
    if layers is None or layers >= 3:  # a decoder of fewer has no middle off-ramp to shortlist
        shortlist = ["--ramp-shortlist", str(SHORTLIST)]
        soft_rows[f"ELMER-Soft, --ramp-shortlist {SHORTLIST}"] = elmer_gen + shortlist
        # every decoding shortcut at once: the fastest ELMER decodes (docs/speed.md)
        fast = shortlist + ["--ramp-precision", "bf16"]
        soft_rows[f"ELMER-Soft, --ramp-shortlist {SHORTLIST} --ramp-precision bf16"] = elmer_gen + fast
        soft_rows[f"ELMER-Soft, --length-cut {LENGTH_CUT} --ramp-shortlist {SHORTLIST} --ramp-precision bf16"] = \
            elmer_gen + cut + fast
    for k in EXIT_LAYERS:  # the shortcuts with the layers above k left out (a shortlist needs a middle layer)
        if layers is None or layers > k:
            listed = ["--ramp-shortlist", str(SHORTLIST)] if k >= 3 else []
            for flags in (["--max-exit-layer", str(k), *listed], ["--max-exit-layer", str(k), *cut, *listed]):
                soft_rows[f"ELMER-Soft, {' '.join(flags)}"] = elmer_gen + flags
    if not ctc:  # reads the reference's length: comparable with the paper's rows, not a result
        soft_rows["ELMER-Soft, oracle T (authors' test protocol)"] = elmer_gen + ["--oracle-length"]
    elmer_soft = System("elmer-soft", "elmer_tiny", "model.pt", elmer_train("soft"), soft_rows)
    hard = elmer_gen + ["--exit-threshold", "0.5"]
    elmer_hard = System("elmer-hard", "elmer_tiny", "model.pt", elmer_train("hard"),
                        {"ELMER-Hard (delta=0.5)": hard, f"ELMER-Hard (delta=0.5), --length-cut {LENGTH_CUT}": hard + cut},
                        sweep=elmer_gen)
    cmlm = System("cmlm", "cmlm_transformer", "cmlm_transformer.pt",
                  nat_train + ["--noise", "random_mask", "--length-loss-factor", "0.1"],
                  {"CMLM (0 it.)": nat_gen + ["--iter-decode-max-iter", "0"],
                   "CMLM (10 it.)": nat_gen + ["--iter-decode-max-iter", "10", "--iter-decode-force-max-iter"]})
    levt = System("levt", "levenshtein_transformer", "levenshtein_transformer.pt",
                  nat_train + ["--noise", "random_delete", *levt_heads],
                  {"LevT": nat_gen + ["--iter-decode-max-iter", "10"]})
    # fairseq-train starts from the pretrained weights only while the run has no checkpoint of its own
    lplm = System("elmer-soft-lplm", "elmer_tiny", None,
                  elmer_soft.train + ["--finetune-from-model", last_checkpoint(args, "lplm-pretrain")],
                  {"ELMER-Soft + LPLM pretraining": elmer_gen}, pretrain=True)
    nar = [elmer_soft, elmer_hard, cmlm, levt]
    return {s.name: s for s in [transformer, *nar, *(distilled(s, transformer) for s in nar), lplm]}


def size_flags(args):
    return ["--encoder-layers", args.layers, "--decoder-layers", args.layers, "--encoder-embed-dim", args.dim,
            "--decoder-embed-dim", args.dim, "--encoder-ffn-embed-dim", 4 * args.dim,
            "--decoder-ffn-embed-dim", 4 * args.dim, "--encoder-attention-heads", args.heads,
            "--decoder-attention-heads", args.heads, "--share-all-embeddings"]


@lru_cache(maxsize=None)
def checkpoint_cfg(path: Path) -> dict:
    """A checkpoint's fairseq config (read once: a checkpoint is hundreds of MB)."""
    if not path.is_file():
        raise FileNotFoundError(f"--warm-start {path.parent}: no {path.name} (elmer-convert --for ...)")
    return torch.load(path, map_location="cpu")["cfg"]


def converted_model(path: Path) -> argparse.Namespace:
    """The model options an elmer-convert output (or --elmer-from's checkpoint) was built with."""
    return checkpoint_cfg(path)["model"]


def elmer_layers(args) -> Optional[int]:
    """ELMER's decoder depth: --layers, or the converted model's with --warm-start (None: not known yet)."""
    if args.warm_start:
        path = weights_of("model.pt", args)
        return converted_model(path).decoder_layers if path.is_file() else None
    return args.layers


def weights_of(converted: str, args) -> Path:
    """What a system fine-tunes from with --warm-start: DIR/CONVERTED, or for ELMER --elmer-from's checkpoint."""
    return args.elmer_from if converted == "model.pt" and args.elmer_from else args.warm_start / converted


def model_flags(system: System, args) -> list:
    """The fairseq-train options that build `system`'s model: random weights at --layers/--dim/--heads,
    or with --warm-start the converted checkpoint's architecture, loaded by --finetune-from-model."""
    if not args.warm_start:
        return ["--arch", system.arch, *size_flags(args)]
    path = weights_of(system.converted, args)
    model = converted_model(path)
    defaults = argparse.Namespace()
    ARCH_CONFIG_REGISTRY[model.arch](defaults)
    # only what differs from the architecture's defaults: an option the architecture lacks stays unset
    changed = {key: getattr(model, key) for key in ARCH_OPTIONS
               if getattr(model, key, None) not in (None, False, getattr(defaults, key, None))}
    switched_off = [key for key in ARCH_OPTIONS if getattr(model, key, None) is False and getattr(defaults, key, None)]
    if switched_off:  # a store_true option cannot turn off what the architecture turns on
        raise ValueError(f"{path}: {model.arch} with {', '.join(switched_off)} off cannot be rebuilt from options")
    return ["--arch", model.arch, *as_flags(changed), "--finetune-from-model", path]


def train_flags(system: System, args) -> list:
    """Everything fairseq-train needs for `system` beyond the common options: its model, then its recipe."""
    return [*model_flags(system, args), *system.train]


def bpe_flags(folder: Path) -> list:
    """fairseq-generate's --bpe for the data prepared in `folder` (its D- lines are text then): the
    tokenizer.json of a pretrained checkpoint (prepare.py --tokenizer) or the byte-level BPE prepare.py trains."""
    if (folder / "tokenizer.json").is_file():
        return ["--bpe", "wordpiece", "--wordpiece-tokenizer", folder / "tokenizer.json"]
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return ["--bpe", "byte_bpe_ids", "--bpe-vocab", folder / "vocab.json", "--bpe-merges", folder / "merges.txt"]
    raise FileNotFoundError(f"{folder}: no tokenizer.json, nor vocab.json + merges.txt (examples/TASK/prepare.py)")


def uncased(folder: Path) -> bool:
    """Whether the data's tokenizer.json lowercases every text (MiniLM's WordPiece does): then no
    system can write a capital, and its references are scored lowercased."""
    if not (folder / "tokenizer.json").is_file():
        return False
    from tokenizers import Tokenizer

    normalizer = Tokenizer.from_file(str(folder / "tokenizer.json")).normalizer
    return normalizer is not None and normalizer.normalize_str("A") == "a"


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
        flags = ["--user-dir", PLUGIN, *flags]
    # the system's own flags last: they may override the common ones (--elmer-options)
    argv = [data, "--optimizer", "adam", "--adam-betas", "(0.9,0.98)", "--lr", args.lr,
            "--lr-scheduler", "inverse_sqrt", "--warmup-updates", args.warmup, "--clip-norm", "1.0",
            "--weight-decay", "0.01", "--dropout", "0.1", "--max-tokens", args.max_tokens,
            "--required-batch-size-multiple", "1",  # fairseq drops the samples that do not fill a multiple
            "--max-update", updates, "--save-dir", save, "--no-epoch-checkpoints",
            "--save-interval-updates", every, "--keep-interval-updates", "1", "--log-format", "simple",
            # validate and save every `every` updates and at the end, not after every (tiny) epoch
            "--validate-interval-updates", every, "--validate-interval", "10000", "--save-interval", "10000",
            "--log-interval", "100", "--seed", "1", "--num-workers", "0", *device_flags, *flags]
    log = (args.out / "logs" / f"train-{name}.log").open("a")  # a resumed run adds to its curve
    env = {**os.environ, "OMP_NUM_THREADS": str(args.train_threads), "MKL_NUM_THREADS": str(args.train_threads)}
    return ckpt, subprocess.Popen([*fairseq_cli("train"), *map(str, argv)], stdout=log, stderr=subprocess.STDOUT,
                                  env=env)



def kd_data(teacher: System, ckpt, args, device_flags) -> Path:
    """The training split re-labelled by `teacher` (examples/distill.py), made once in OUT/kd-data."""
    return distill(args.data, ckpt, args.out / "kd-data", teacher.relabel, device_flags)


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
    flags = ["--user-dir", PLUGIN, "--task", "elmer_lplm", "--bpe-dir", args.data.parent, "--arch", "elmer_tiny",
             *size_flags(args), "--criterion", "elmer_loss", "--label-smoothing", "0",
             "--lplm-permutations", args.lplm_permutations, "--tokens-per-sample", "128", "--shorten-method", "truncate"]
    ckpt, proc = train("lplm-pretrain", flags, corpus / "bin", args, device_flags, updates=args.pretrain_updates)
    if proc is not None:
        print(f"pretraining ELMER with LPLM ({args.pretrain_updates} updates, k={args.lplm_permutations})", flush=True)
        if proc.wait() != 0:
            raise RuntimeError(f"exit {proc.returncode}, see logs/train-lplm-pretrain.log")
    return ckpt


def quality(row, ckpt, gen_flags, args, device_flags, refs, log_name, uncased=False):
    """One row's scores and first outputs: fairseq-generate on the test split, D- lines against `refs`."""
    log = args.out / "logs" / f"gen-{log_name}.txt"
    fairseq("generate", args.data, "--path", ckpt, *gen_flags, "--gen-subset", "test",
            "--batch-size", "32", "--required-batch-size-multiple", "1", "--user-dir", PLUGIN,
            *bpe_flags(args.data.parent), *device_flags, log=log)
    hyps, _, _, mean_exit = parse_log(log)
    if sorted(hyps) != list(range(len(refs))):
        raise RuntimeError(f"{log}: {len(hyps)} hypotheses for {len(refs)} references")
    ordered = [hyps[i] for i in range(len(refs))]
    return {"system": row, **all_metrics(ordered, refs, args.wordnet, uncased=uncased), "mean_exit_layer": mean_exit,
            "samples": ordered[: args.show]}


def latency(ckpt, gen_flags, args, device):
    """Median ms per test sample at batch size 1, timed around task.inference_step."""
    from fairseq import checkpoint_utils, options, tasks, utils
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    parser = options.get_generation_parser()
    argv = [str(args.data), "--path", str(ckpt), "--user-dir", str(PLUGIN), *map(str, gen_flags)]
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


def delta_sweep(system: System, ckpt, args, device_flags, refs, uncased=False):
    """`system`'s checkpoint decoded at every --deltas: quality and the share of tokens per exit layer."""
    rows = []
    for delta in args.deltas:
        name = f"{system.name}-delta{delta}"
        row = quality(f"delta={delta}", ckpt, system.sweep + ["--exit-threshold", str(delta)], args, device_flags,
                      refs, name, uncased)
        text = (args.out / "logs" / f"gen-{name}.txt").read_text()
        shares = re.search(r"ELMER exit layers over .*?; (.*)$", text, re.M).group(1)
        row["layer_share"] = [float(s) for s in re.findall(r"L\d+ ([\d.]+)%", shares)]
        rows.append(row)
    return rows


KEYS = ["system", "rouge1", "rouge2", "rougeL", "rougeL_collapsed", "bleu1", "bleu2", "bleu4", "meteor", "distinct1",
        "distinct2", "mean_len", "length_r", "empty", "repeat", "ms_per_sample", "speedup_vs_ar", "mean_exit_layer",
        "error"]
HEADS = ["system", "R-1", "R-2", "R-L", "R-L, repeats collapsed", "BLEU-1", "BLEU-2", "BLEU-4", "METEOR", "Dist-1",
         "Dist-2", "mean len", "length r", "empty %", "repeat %", "ms/sample", "speed-up vs AR greedy",
         "mean exit layer"]


def write_tables(rows, sweeps, args, header):
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
    samples = ["# Output lengths per system (words: outputs)\n"]
    samples += [f"- **{r['system']}**: " + ", ".join(f"{n}: {c}" for n, c in r["length_hist"].items())
                for r in rows if r.get("length_hist")]
    samples.append(f"\n# First {args.show} test outputs per system\n")
    for i, ref in enumerate(refs[: args.show]):
        samples.append(f"## Sample {i}\n\n- **reference**: {ref}")
        samples += [f"- **{r['system']}**: {r['samples'][i]}" for r in rows if len(r.get("samples", [])) > i]
        samples.append("")
    (args.out / "samples.md").write_text("\n".join(samples))
    if sweeps:
        sweep_lines = []
        for name, sweep in sweeps.items():  # one table per swept system, one after the other
            sweep_lines += [f"| delta ({name}) | R-1 | R-2 | R-L | METEOR | mean exit layer | "
                            f"share per layer (L1/L2/..., %) |", "|---|---|---|---|---|---|---|"]
            for r in sweep:
                sweep_lines.append(f"| {r['system'][6:]} | {r['rouge1']:.2f} | {r['rouge2']:.2f} | {r['rougeL']:.2f} | "
                                   f"{r['meteor']:.2f} | {r['mean_exit_layer']:.2f} | "
                                   f"{' / '.join(f'{s:.1f}' for s in r['layer_share'])} |")
            sweep_lines.append("")
        (args.out / "delta_sweep.md").write_text("\n".join(sweep_lines))
        plot_sweeps(sweeps, args.out / "delta_sweep.png")
    print((args.out / "results.md").read_text())


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # fairseq leaves the root logger verbose
    import matplotlib.pyplot as plt

    return plt


TRAIN_LOSS = re.compile(r"\| train_inner \|.* loss=([\d.]+),.* num_updates=(\d+)")
VALID_NLL = re.compile(r"\| valid on 'valid' subset \|.*\| nll_loss ([\d.]+) \|.*\| num_updates (\d+)")


def loss_curves(log: Path):
    """(train loss, valid NLL) as [(update, value)] from a fairseq-train log (fairseq logs base 2)."""
    text = log.read_text(errors="replace")
    return [[(int(n), float(v)) for v, n in pattern.findall(text)] for pattern in (TRAIN_LOSS, VALID_NLL)]


def plot_losses(logs: Path, path: Path):
    """One panel of training loss and one of validation NLL against updates, every system trained here."""
    curves = {log.stem[len("train-"):]: loss_curves(log) for log in sorted(logs.glob("train-*.log"))}
    curves = {name: c for name, c in curves.items() if c[0] or c[1]}
    if not curves:
        return
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for name, (train_loss, valid_nll) in curves.items():
        for ax, points, style in ((axes[0], train_loss, "-"), (axes[1], valid_nll, "-o")):
            if points:
                ax.plot(*zip(*points), style, label=name, markersize=3)
    axes[0].set_title("training loss (each criterion's own terms)", fontsize=10)
    axes[1].set_title("validation NLL, output layer (bits/token)", fontsize=10)
    for ax in axes:
        ax.set_xlabel("updates")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_sweeps(sweeps, path):
    plt = pyplot()

    fig, axes = plt.subplots(1, len(sweeps), figsize=(6 * len(sweeps), 4), squeeze=False)
    for ax, (name, sweep) in zip(axes[0], sweeps.items()):
        deltas = [r["system"][6:] for r in sweep]
        bottom = [0.0] * len(sweep)
        for layer in range(len(sweep[0]["layer_share"])):
            share = [r["layer_share"][layer] for r in sweep]
            ax.bar(deltas, share, bottom=bottom, label=f"exit at layer {layer + 1}")
            bottom = [b + s for b, s in zip(bottom, share)]
        ax.set_xlabel("hard-exit threshold delta (nats)")
        ax.set_ylabel("share of output tokens (%)")
        ax.set_title(name)
        twin = ax.twinx()
        twin.plot(deltas, [r["rougeL"] for r in sweep], "k-o", label="ROUGE-L")
        twin.set_ylabel("ROUGE-L")
        ax.legend(loc="upper left", fontsize=8)
        twin.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ---------------------------------------------------------------- the run: check, train, decode and score, report


def check(chosen, args):
    """Refuses, before anything runs, a combination that could not give its rows."""
    if not (args.data / "dict.src.txt").exists():
        sys.exit(f"--data {args.data}: no dict.src.txt; prepare the data first (examples/TASK/prepare.py)")
    try:
        bpe_flags(args.data.parent)
    except FileNotFoundError as e:
        sys.exit(f"--data {args.data}: {e}")
    names = {s.name for s in chosen}
    for s in chosen:
        if s.teacher and args.kd_data:
            if not (args.kd_data / "bin" / "train.src-tgt.tgt.idx").exists():
                sys.exit(f"--kd-data {args.kd_data}: no distilled training set there (examples/distill.py --out "
                         f"{args.kd_data} makes one)")
        elif s.teacher and s.teacher not in names:
            sys.exit(f"--systems: {s.name} learns from the outputs of {s.teacher}; add '{s.teacher}'")
        if s.pretrain and args.elmer_options:
            sys.exit(f"--elmer-options: not with {s.name} (its LPLM pretraining would not match); run it separately")
        if args.warm_start and not s.converted:
            sys.exit(f"--warm-start: not with {s.name}, which starts from its own pretraining")
        weights = weights_of(s.converted, args) if args.warm_start else None
        if weights and not weights.is_file():
            if weights == args.elmer_from:
                sys.exit(f"--elmer-from {args.elmer_from}: no such checkpoint")
            sys.exit(f"--warm-start {args.warm_start}: no {s.converted} for {s.name} (elmer-convert --for ...)")
    if args.elmer_from and args.elmer_from.is_file():
        task = checkpoint_cfg(args.elmer_from)["task"]
        if task["_name"] != "elmer_translation":
            sys.exit(f"--elmer-from {args.elmer_from}: a {task['_name']} checkpoint; it takes an ELMER fine-tuned "
                     f"with --task elmer_translation")
    vocab = args.warm_start / "dict.txt" if args.warm_start else None
    if vocab and vocab.is_file() and symbols(vocab) != symbols(args.data / "dict.src.txt"):
        sys.exit(f"--warm-start {args.warm_start}: --data {args.data} was binarized with another vocabulary than "
                 f"{vocab} (examples/TASK/prepare.py --dict {vocab})")


def symbols(dict_file: Path) -> list:
    return [line.split(" ", 1)[0] for line in dict_file.read_text(encoding="utf-8").splitlines()]


def train_all(chosen, args, device_flags):
    """Trains the chosen systems, up to --parallel at a time, a teacher before its students (the
    table's order); returns ({name: checkpoint}, {name: the step that failed and why})."""
    ckpts, errors, running = {}, {}, {}  # running: {name: fairseq-train process}, oldest first

    def wait(name):
        proc = running.pop(name)
        if proc.wait() != 0:
            errors[name] = f"train: exit {proc.returncode}, see logs/train-{name}.log"

    table = {s.name: s for s in chosen}
    for system in chosen:
        data, step = args.data, "train"
        try:
            if system.teacher and args.kd_data:
                data = args.kd_data / "bin"
            elif system.teacher:
                step = "distill"
                if system.teacher in running:
                    wait(system.teacher)
                if system.teacher in errors or system.teacher not in ckpts:
                    raise RuntimeError(f"the teacher {system.teacher} did not train")
                data = kd_data(table[system.teacher], ckpts[system.teacher], args, device_flags)
            # a finished fine-tuning run needs no pretrained weights, even where they were deleted
            if system.pretrain and trained_updates(last_checkpoint(args, system.name)) < args.updates:
                step = "pretrain"
                pretrain(args, device_flags)
            step = "train"
            ckpts[system.name], proc = train(system.name, train_flags(system, args), data, args, device_flags)
        except Exception as e:  # noqa: BLE001 (reported in the table)
            errors[system.name] = f"{step}: {e}"
            continue
        if proc is not None:
            print(f"training {system.name} ({args.updates} updates)", flush=True)
            running[system.name] = proc
        if len(running) >= args.parallel:
            wait(next(iter(running)))
    for name in list(running):
        wait(name)
    return ckpts, errors


def decode_and_score(chosen, ckpts, errors, args, device_flags, refs, uncased):
    """Every row of every chosen system (a failed system's rows say which step failed), each row
    kept in OUT/rows/ with its checkpoint's update count, and the delta sweeps: (rows, {system: sweep})."""
    results, sweeps = [], {}
    for system in chosen:
        if system.name in errors:
            results += [{"system": row, "error": errors[system.name]} for row in system.rows]
            continue
        ckpt = ckpts[system.name]
        updates = trained_updates(ckpt)
        for row, gen_flags in system.rows.items():
            results.append(score_row(row, ckpt, gen_flags, updates, args, device_flags, refs, uncased))
            print(json.dumps({k: v for k, v in results[-1].items() if k != "samples"}), flush=True)
        if system.sweep:
            try:
                sweeps[system.name] = delta_sweep(system, ckpt, args, device_flags, refs, uncased)
            except Exception as e:  # noqa: BLE001 (the table is still written)
                print(f"delta sweep of {system.name} failed: {e}", flush=True)
    # the speed-up column: every row against the row that a system names as the reference (AR greedy)
    ms = {r["system"]: r.get("ms_per_sample") for r in results}
    reference = next((ms[s.speed_reference] for s in chosen if ms.get(s.speed_reference)), None)
    for r in results:
        if reference and "ms_per_sample" in r:
            r["speedup_vs_ar"] = reference / r["ms_per_sample"]
    return results, sweeps


def score_row(row, ckpt, gen_flags, updates, args, device_flags, refs, uncased):
    """A row's scores and latency, or the step that failed. A row finished in an earlier run from a
    checkpoint of the same update count is read back from OUT/rows/: an interrupted benchmark
    continues, and a rerun with more --updates trains further and scores again."""
    done = args.out / "rows" / (re.sub(r"\W+", "-", row) + ".json")
    earlier = json.loads(done.read_text()) if done.exists() else {}
    if earlier.get("updates") == updates:
        return earlier
    step = "generate"
    try:
        result = quality(row, ckpt, gen_flags, args, device_flags, refs, re.sub(r"\W+", "-", row), uncased)
        step = "latency"
        result["ms_per_sample"] = latency(ckpt, gen_flags, args, args.device)
    except Exception as e:  # noqa: BLE001 (reported in the table)
        return {"system": row, "error": f"{step}: {e}"}
    result["updates"] = updates
    done.write_text(json.dumps(result))
    return result


def report(results, sweeps, chosen, args, refs, lowercased):
    """OUT/results.md (with a header saying what was run, where), results.csv, samples.md, delta_sweep.md/.png."""
    hw = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({os.cpu_count()} cores), {args.threads} thread(s)"
    split = json.loads((args.data.parent / "splits.json").read_text()) if (args.data.parent / "splits.json").exists() else {}
    if args.warm_start:  # every converted checkpoint has the same size
        m = converted_model(args.warm_start / chosen[0].converted)
        size = (f"warm-started from {args.warm_start}, {m.encoder_layers}+{m.decoder_layers} layers, "
                f"d={m.encoder_embed_dim}")
    else:
        size = f"{args.layers}+{args.layers} layers, d={args.dim}"
    header = (f"{split.get('task', args.data.parent.name)}: test split of {len(refs)} samples "
              f"(train {split.get('pairs', {}).get('train', '?')} pairs); {size}; {args.updates} updates of "
              f"<= {args.max_tokens} tokens per system; {hw}; latency: batch size 1, median after "
              f"{args.warmup_samples} warm-up samples"
              + (f"; ELMER fine-tuned from {args.elmer_from}" if args.elmer_from else "")
              + (f"; ELMER trained with {args.elmer_options}" if args.elmer_options else "")
              + ("; references lowercased for scoring (the data's tokenizer.json is uncased)" if lowercased else ""))
    write_tables(results, sweeps, args, header)
    plot_losses(args.out / "logs", args.out / "loss_curves.png")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path("data/xsum-bench/bin"), help="binarized data (examples/TASK/prepare.py)")
    p.add_argument("--out", type=Path, default=Path("results/benchmark"))
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    names = p.add_argument("--systems", nargs="+", metavar="NAME")
    p.add_argument("--warm-start", type=Path, metavar="DIR",
                   help="fine-tune every system from an elmer-convert --for transformer cmlm_transformer "
                        "levenshtein_transformer output (DIR/model.pt, DIR/ARCH.pt), at its size; the data binarized "
                        "with its dict.txt (docs/converting.md)")
    p.add_argument("--elmer-from", type=Path, metavar="CKPT",
                   help="with --warm-start: the ELMER systems fine-tune from this trained ELMER checkpoint instead of "
                        "DIR/model.pt, the baselines still from DIR (a recipe in two stages, e.g. ce with glancing, "
                        "then --elmer-options='--output-loss ctc'; its updates come on top of CKPT's)")
    p.add_argument("--layers", type=int, help="encoder and decoder layers of every system (default: 3)")
    p.add_argument("--dim", type=int, help="model width of every system, FFN 4x (default: 256)")
    p.add_argument("--heads", type=int, help="attention heads of every system (default: 4)")
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
    p.add_argument("--kd-data", type=Path, metavar="DIR",
                   help="the -kd systems train on this distilled set (examples/distill.py --out DIR) instead of one "
                        "made from the table's own transformer in OUT/kd-data")
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
    table = systems(p.parse_args([])).values()  # the names, whatever the options
    names.choices = [s.name for s in table]
    names.default = [s.name for s in table if not s.teacher and not s.pretrain]
    names.help = (f"which to train, of {', '.join(names.choices)} (default: {' '.join(names.default)}, the ones "
                  f"without distillation or pretraining)")
    args = p.parse_args(argv)
    sizes = {"layers": 3, "dim": 256, "heads": 4}
    if args.elmer_from and not args.warm_start:
        p.error("--elmer-from: only with --warm-start (the baselines' weights and the vocabulary come from there)")
    if args.warm_start:
        given = [f"--{key}" for key in sizes if getattr(args, key) is not None]
        if given:
            p.error(f"{'/'.join(given)}: with --warm-start every system has the converted model's size")
    else:
        vars(args).update({key: value for key, value in sizes.items() if getattr(args, key) is None})
    return args


def main():
    args = parse_args()
    chosen = [s for s in systems(args).values() if s.name in args.systems]  # the table's order: teachers first
    check(chosen, args)
    torch.set_num_threads(args.threads)
    for sub in ("logs", "rows"):
        (args.out / sub).mkdir(parents=True, exist_ok=True)
    device_flags = ["--cpu"] if args.device == "cpu" else []
    refs = (args.data.parent / "test.raw.tgt").read_text(encoding="utf-8").splitlines()
    lowercased = uncased(args.data.parent)
    ckpts, errors = train_all(chosen, args, device_flags)
    results, sweeps = decode_and_score(chosen, ckpts, errors, args, device_flags, refs, lowercased)
    report(results, sweeps, chosen, args, refs, lowercased)


if __name__ == "__main__":
    main()
