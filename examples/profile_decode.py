#!/usr/bin/env python
"""Where one decoding pass spends its time, for each system of the benchmark: the encoder, the
decoder layers, the off-ramps / output projection, and the rest (the search loop, Python,
fairseq's generator: the pass minus those three).

A row is decoded as examples/benchmark.py times it (the row's fairseq-generate options, one
`task.inference_step` per pass) while a clock wraps the encoder, every decoder layer, the output
projection and, for ELMER, the off-ramp op and soft exit's fuse (both counted as off-ramps).
Each cell is the mean over --samples passes of a batch after --warmup untimed ones, in ms per
pass: means, so that the buckets add up to the total. Next to each ELMER row is its floor: the
same model's encoder, its L decoder layers and L off-ramps, each timed on its own over the
positions the outputs need (through the first EOS; a batch's longest), with no search around them
(hard exit's positions that leave early skip layers: its pass can cost less).

    python examples/profile_decode.py --random-warm --out results/profile/random-warm
    python examples/profile_decode.py --data data/boolq-minilm64/bin --out results/profile/boolq-warm64 \
        --checkpoints elmer-soft=results/benchmark-cpu/boolq-warm64/checkpoints/elmer-soft/checkpoint_last.pt \
        transformer=results/benchmark-cpu/boolq-warm64/checkpoints/transformer/checkpoint_last.pt

--random-warm needs no training: random weights at the warm-started track's size (6+6 layers,
d = 384, 12 heads, 21,600 pieces, sources of 64 pieces, T = 32), built as benchmark.py builds each
system. Random models seldom write EOS: ELMER's floor is then at T and the AR model writes T
tokens; CMLM's and LevT's lengths are random and not bounded by T.
Writes OUT/profile.md (the table), OUT/profile.csv and OUT/profile.png.
"""
import argparse
import csv
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

# first: benchmark sets OMP_WAIT_POLICY before torch loads (docs/speed.md)
from benchmark import PLUGIN, pyplot, systems, train_flags  # noqa: I001
from benchmark import parse_args as benchmark_args
import torch
from fairseq import checkpoint_utils, options, tasks, utils
from fairseq.data import LanguagePairDataset
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.modules.transformer_layer import TransformerDecoderLayerBase

from elmer_fairseq.models import elmer
from elmer_fairseq.models.elmer import ElmerDecoder

ENCODER, LAYERS, OUTPUT, OTHER = "encoder", "decoder layers", "off-ramps / output projection", "other"
BUCKETS = (ENCODER, LAYERS, OUTPUT, OTHER)
LANGS = ["--source-lang", "src", "--target-lang", "tgt"]
CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}


def profiled_rows(names, args) -> dict:
    """{row: (system, fairseq-generate options)} of the named benchmark systems: one greedy pass as
    users run it (no beam search, no oracle length, which reads the reference)."""
    table = systems(args)
    return {row: (table[name], gen) for name in names for row, gen in table[name].rows.items()
            if "--oracle-length" not in gen and gen[gen.index("--beam") + 1] == "1"}


def load(gen_flags, data: Path, model):
    """(task, model, generator) of one row; `model`: a checkpoint, or the fairseq-train options of
    random weights (the same for every row of a system)."""
    argv = [str(data), "--user-dir", str(PLUGIN), *LANGS]
    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(
        options.get_generation_parser(), [*argv, *map(str, gen_flags)]))
    utils.import_user_module(cfg.common)
    task = tasks.setup_task(cfg.task)
    if isinstance(model, Path):
        [model], _ = checkpoint_utils.load_model_ensemble([str(model)], task=task)
    else:
        # built by fairseq-train's task: ELMER's takes the exit mode from there, not from generation's
        train = options.parse_args_and_arch(options.get_training_parser(), [*argv, *map(str, model)])
        torch.manual_seed(1)
        model = tasks.setup_task(train).build_model(train)
    model.eval()
    return task, model, task.build_generator([model], cfg.generation)


def clocked(fn, bucket, spent, clock):
    def timed(*args, **kwargs):
        start = clock()
        out = fn(*args, **kwargs)
        spent[bucket] += clock() - start
        return out

    return timed


def timed_calls(model):
    """(owner, attribute, bucket) of every call a pass is split by; none calls another."""
    decoder = model.decoder
    layers = [m for m in decoder.modules() if isinstance(m, TransformerDecoderLayerBase)]  # LevT's extra stacks too
    calls = [(model.encoder, "forward", ENCODER), (decoder.output_projection, "forward", OUTPUT),
             *((layer, "forward", LAYERS) for layer in layers)]
    if isinstance(decoder, ElmerDecoder):
        # its off-ramps are an op on the projection's weight, and hard exit runs the in-flight rows
        # of a layer through layer_rows, which calls the layer's parts, not the layer; --ramp-shortlist
        # scores layer 1 with off_ramp_top and the middle layers with shortlist_argmax
        calls += [(elmer, "off_ramp", OUTPUT), (elmer, "off_ramp_top", OUTPUT), (elmer, "shortlist_argmax", OUTPUT),
                  (elmer, "layer_rows", LAYERS), (decoder, "fuse", OUTPUT)]
    return calls


@contextmanager
def clocks(model, clock=time.perf_counter):
    """Within the block, every call of timed_calls(model) adds its seconds to the yielded
    {bucket: seconds}; afterwards the model and the elmer module are as they were. Forward hooks
    would not do: fairseq's SequenceGenerator calls encoder.forward directly, not the module."""
    spent = dict.fromkeys((ENCODER, LAYERS, OUTPUT), 0.0)
    missing = object()
    saved = []
    try:
        for owner, name, bucket in timed_calls(model):
            saved.append((owner, name, vars(owner).get(name, missing)))
            setattr(owner, name, clocked(getattr(owner, name), bucket, spent, clock))
        yield spent
    finally:
        for owner, name, before in reversed(saved):
            if before is missing:  # a method of the class: drop the instance's wrapper
                delattr(owner, name)
            else:
                setattr(owner, name, before)


@torch.no_grad()
def profile(task, model, generator, batches, warmup: int, clock=time.perf_counter):
    """Mean ms per pass over batches[warmup:], {"total", *BUCKETS} and for ELMER its "floor" over
    "floor_positions", each floor timed right after its pass (a busy machine slows both alike);
    and every pass's hypotheses."""
    with_floor = isinstance(model.decoder, ElmerDecoder)
    means = dict.fromkeys(("total", *BUCKETS, *(("floor", "floor_positions") if with_floor else ())), 0.0)
    outputs = []
    for i, batch in enumerate(batches):
        with clocks(model, clock) as spent:
            start = clock()
            outputs.append(task.inference_step(generator, [model], batch))
            total = clock() - start
        if i < warmup:
            continue
        one = {"total": total, OTHER: total - sum(spent.values()), **spent}
        one = {key: 1000 * seconds for key, seconds in one.items()}
        if with_floor:
            one["floor_positions"] = output_length(outputs[-1])
            one["floor"] = floor_ms(model, batch, one["floor_positions"], clock)
        for key, value in one.items():
            means[key] += value / (len(batches) - warmup)
    return means, outputs


def output_length(hypos) -> int:
    """The positions a batch's outputs need: its longest hypothesis, EOS included."""
    return max(1, *(len(h[0]["tokens"]) for h in hypos))


@torch.no_grad()
def floor_ms(model, batch, length: int, clock=time.perf_counter) -> float:
    """ms of the encoder, then each decoder layer and its off-ramp over `length` [MASK] positions."""
    decoder, net = model.decoder, batch["net_input"]
    start = clock()
    encoder_out = model.encoder(net["src_tokens"], src_lengths=net["src_lengths"])
    spent = clock() - start
    x = decoder.mask_input(encoder_out, length)
    for l in range(decoder.num_layers):
        # a layer reads the one below unfused: soft exit's fuse changes values, not the cost
        start = clock()
        x = decoder.run_layer(l, x, encoder_out)
        elmer.off_ramp(x.reshape(-1, x.size(-1)), decoder.off_ramp_weight(l), 0.0)
        spent += clock() - start
    return 1000 * spent


def sources(task, args):
    """The test split of --data, or random sources of --source-length pieces (EOS last)."""
    if args.data:
        task.load_dataset("test")
        return task.dataset("test")
    vocab = task.source_dictionary
    generator = torch.Generator().manual_seed(0)
    count = max(args.batch_sizes) * (args.warmup + args.samples)
    src = [torch.cat([torch.randint(vocab.nspecial, len(vocab), (args.source_length - 1,), generator=generator),
                      torch.tensor([vocab.eos()])]) for _ in range(count)]
    return LanguagePairDataset(src, [len(s) for s in src], vocab)


def batches(dataset, size: int, count: int) -> list:
    return [dataset.collater([dataset[(k * size + i) % len(dataset)] for i in range(size)]) for k in range(count)]


def run_row(row, gen_flags, data: Path, model, args) -> list:
    """One CSV record per (batch size, threads) of the row (`model` as load() takes it)."""
    task, model, generator = load(gen_flags, data, model)
    dataset = sources(task, args)
    records = []
    for size in args.batch_sizes:
        passes = batches(dataset, size, args.warmup + args.samples)
        for threads in args.threads:
            torch.set_num_threads(threads)
            means, _ = profile(task, model, generator, passes, args.warmup, CLOCKS[args.clock])
            record = {"system": row, "batch_size": size, "threads": threads, "passes": args.samples, **means}
            records.append(record)
            print(table([record], header=False)[-1], flush=True)
    return records


def run_interleaved(rows, data: Path, args) -> list:
    """run_row for every (row, gen_flags, model) at once, in turns: pass i of every row, then pass
    i + 1, so that a machine whose speed drifts (a shared VM) slows every row alike."""
    loaded = [(row, *load(gen_flags, data, model)) for row, gen_flags, model in rows]
    records = []
    for size in args.batch_sizes:
        passes = [batches(sources(task, args), size, args.warmup + args.samples) for _, task, _, _ in loaded]
        for threads in args.threads:
            torch.set_num_threads(threads)
            sums = [dict() for _ in loaded]
            for i in range(args.warmup + args.samples):
                for (_, task, model, generator), own, total in zip(loaded, passes, sums):
                    means, _ = profile(task, model, generator, [own[i]], 0, CLOCKS[args.clock])
                    for key, value in means.items():
                        total[key] = total.get(key, 0.0) + (value / args.samples if i >= args.warmup else 0.0)
            for (row, *_), means in zip(loaded, sums):
                records.append({"system": row, "batch_size": size, "threads": threads, "passes": args.samples, **means})
                print(table(records[-1:], header=False)[-1], flush=True)
    return records


KEYS = ["system", "batch_size", "threads", "passes", "total", *BUCKETS, "floor", "floor_positions"]


def table(records, header=True) -> list:
    """Markdown lines: ms per pass, each bucket's ms and share of it, ELMER's floor."""
    heads = ["system", "batch", "threads", "ms per pass", *BUCKETS, "floor ms (positions)", "pass / floor"]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)] if header else []
    for r in records:
        cells = [r["system"], r["batch_size"], r["threads"], f"{r['total']:.1f}",
                 *(f"{r[b]:.1f} ({100 * r[b] / r['total']:.0f}%)" for b in BUCKETS)]
        if "floor" in r:
            cells += [f"{r['floor']:.1f} ({r['floor_positions']:.1f})", f"{r['total'] / r['floor']:.2f}x"]
        else:
            cells += ["-", "-"]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return lines


def plot(records, path: Path):
    """One panel per (batch size, threads): a stacked bar per system, its floor as a black tick."""
    plt = pyplot()
    cells = sorted({(r["batch_size"], r["threads"]) for r in records})
    fig, axes = plt.subplots(len(cells), 1, figsize=(8, 1 + 0.4 * len(records)), squeeze=False)
    for ax, (size, threads) in zip(axes[:, 0], cells):
        rows = [r for r in records if (r["batch_size"], r["threads"]) == (size, threads)]
        names = [r["system"] for r in rows]
        left = [0.0] * len(rows)
        for bucket in BUCKETS:
            ms = [r[bucket] for r in rows]
            ax.barh(names, ms, left=left, label=bucket)
            left = [a + b for a, b in zip(left, ms)]
        floors = [(r["floor"], name) for name, r in zip(names, rows) if "floor" in r]
        if floors:
            ax.scatter(*zip(*floors), marker="|", s=300, color="black", label="ELMER's floor", zorder=3)
        ax.invert_yaxis()  # the table's order, top down
        ax.set_title(f"batch {size}, {threads} thread(s)", fontsize=10)
        ax.set_xlabel("ms per pass")
        ax.tick_params(axis="y", labelsize=8)
    axes[0, 0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_vocab(folder: Path, size: int) -> Path:
    """dict.src.txt and dict.tgt.txt of `size` symbols, fairseq's four specials included."""
    lines = "".join(f"piece{i} 1\n" for i in range(size - 4))
    for side in ("src", "tgt"):
        (folder / f"dict.{side}.txt").write_text(lines)
    return folder


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    models = p.add_mutually_exclusive_group(required=True)
    models.add_argument("--checkpoints", nargs="+", metavar="NAME=PATH",
                        help="trained checkpoints by benchmark system name (transformer, cmlm, levt, elmer-soft, "
                             "elmer-hard, ...); needs --data, the binarized set they were trained on")
    models.add_argument("--random-warm", action="store_true",
                        help="random weights at --layers/--dim/--heads, --vocab pieces: no training needed")
    p.add_argument("--data", type=Path, help="binarized data whose test sources are decoded (default with "
                                             "--random-warm: random sources of --source-length pieces)")
    p.add_argument("--systems", nargs="+", default=["transformer", "cmlm", "levt", "elmer-soft", "elmer-hard"],
                   help="--random-warm: which benchmark systems (default: %(default)s)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16], help="(default: 1 16)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch threads (default: 1 2)")
    p.add_argument("--samples", type=int, default=5, help="timed passes per cell (default: 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed passes before them (default: 1)")
    p.add_argument("--max-target-length", type=int, default=32, help="ELMER's T, the others' longest output")
    p.add_argument("--layers", type=int, default=6, help="--random-warm: encoder and decoder layers (default: 6)")
    p.add_argument("--dim", type=int, default=384, help="--random-warm: model width, FFN 4x (default: 384)")
    p.add_argument("--heads", type=int, default=12, help="--random-warm: attention heads (default: 12)")
    p.add_argument("--vocab", type=int, default=21600, help="--random-warm without --data: pieces (default: 21600)")
    p.add_argument("--source-length", type=int, default=64, help="random sources' pieces, EOS included (default: 64)")
    p.add_argument("--clock", choices=list(CLOCKS), default="wall",
                   help="wall: elapsed time (default); cpu: this thread's CPU time, which other processes on a busy "
                        "machine do not inflate (--threads 1 only: it does not count torch's other threads)")
    p.add_argument("--interleave", action="store_true",
                   help="time the rows in turns, one pass of each, instead of one row after the other: on a "
                        "machine whose speed drifts (a shared VM), compare rows from such a run (all models "
                        "are loaded at once)")
    p.add_argument("--out", type=Path, default=Path("results/profile"))
    args = p.parse_args(argv)
    if args.clock == "cpu" and args.threads != [1]:
        p.error("--clock cpu counts the calling thread only: pass --threads 1")
    if args.checkpoints:
        if not args.data:
            p.error("--checkpoints: pass --data, the binarized set the checkpoints were trained on")
        pairs = [c.partition("=") for c in args.checkpoints]
        if any(not name or not path for name, _, path in pairs):
            p.error("--checkpoints: each is NAME=PATH, e.g. elmer-soft=checkpoints/elmer-soft/checkpoint_last.pt")
        args.checkpoints = {name: Path(path) for name, _, path in pairs}
        args.systems = list(args.checkpoints)
    return args


def main(argv=None):
    args = parse_args(argv)
    bench = benchmark_args(["--layers", str(args.layers), "--dim", str(args.dim), "--heads", str(args.heads),
                            "--max-target-length", str(args.max_target_length)])
    unknown = set(args.systems) - set(systems(bench))
    if unknown:
        sys.exit(f"--systems/--checkpoints: no benchmark system {', '.join(sorted(unknown))} "
                 f"(there are {', '.join(systems(bench))})")
    args.out.mkdir(parents=True, exist_ok=True)
    records = []
    with tempfile.TemporaryDirectory() as vocab:
        data = args.data or write_vocab(Path(vocab), args.vocab)
        rows = [(row, gen_flags, args.checkpoints[system.name] if args.checkpoints else train_flags(system, bench))
                for row, (system, gen_flags) in profiled_rows(args.systems, bench).items()]
        if args.interleave:
            records = run_interleaved(rows, data, args)
        else:
            for row, gen_flags, model in rows:
                records += run_row(row, gen_flags, data, model, args)
    models = (f"random weights, {args.layers}+{args.layers} layers, d={args.dim}, {args.heads} heads"
              if args.random_warm else "checkpoints " + ", ".join(f"{n}={p}" for n, p in args.checkpoints.items()))
    header = (f"{models}; sources: {args.data or f'random, {args.source_length} pieces'}; "
              f"T = {args.max_target_length}; CPU ({os.cpu_count()} cores), torch {torch.__version__}; "
              f"{args.clock} time, mean of {args.samples} passes after {args.warmup} untimed; ms per pass of a batch")
    lines = [header, "", *table(records)]
    (args.out / "profile.md").write_text("\n".join(lines) + "\n")
    with (args.out / "profile.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=KEYS)
        writer.writeheader()
        writer.writerows(records)
    plot(records, args.out / "profile.png")
    print("\n".join(lines))
    return records


if __name__ == "__main__":
    main()
