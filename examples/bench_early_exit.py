#!/usr/bin/env python
"""What early exit saves (issue 15): ms per sample of one decoding pass against the share of
tokens that exit before the last layer, and LPLM's training step against k.

Decoding: a random-weight ELMER (elmer_base: 6+6 layers, d=768, V=50,265 unless told otherwise)
decodes T [MASK] positions of B random sources. A forced exit schedule (ElmerDecoder.decode's
`forced_exits`, test/benchmark-only) sends a share p of each sequence's positions out at layer 1
and the rest at the last layer L, so the mean exit layer is p + (1 - p) L. For each p the table
gives the decoder's time (the encoder runs once before and is not timed) per sample for
ELMER-Soft (every layer on every position, whatever p), hard exit before issue 15 (every layer on
every position, the off-ramp on the ones in flight; examples/early_exit_reference.py keeps it),
hard exit now (a layer's queries, attention and FFN on the positions in flight only), and the
ideal line: the no-exit hard pass scaled by mean exit layer / L. Medians of --repeats passes after --warmup,
the variants interleaved pass by pass. On CPU the clock is the process's CPU time by default
(--clock cpu): on a machine shared with other jobs, wall time measures the other jobs as much
as this one; with one thread, CPU time is the wall time of an idle machine. A PNG plots it.

LPLM: examples/bench_lplm.py --before (k = 1, 2, 5, 10; before and after issue 15).

    python examples/bench_early_exit.py                        # both tables, docs/early-exit.png
    python examples/bench_early_exit.py --batches 1 --no-lplm  # decoding at batch 1 only
"""
import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch

import elmer_fairseq  # noqa: F401  (registers the task, model and criterion)
from fairseq import options, tasks

# this script's siblings (a script's own folder is sys.path[0])
import bench_lplm
from early_exit_reference import reference_decode

ROOT = Path(__file__).resolve().parents[1]


def build(args, folder: Path, exit_mode: str):
    """An elmer_translation model through fairseq's registries, over a dictionary of --vocab symbols."""
    n_symbols = args.vocab - 5  # + <s> <pad> </s> <unk> and the task's <mask>
    for lang in ("src", "tgt"):
        (folder / f"dict.{lang}.txt").write_text("".join(f"{i} 1\n" for i in range(n_symbols)))
    argv = [str(folder), "--user-dir", str(ROOT / "elmer_fairseq"), "--task", "elmer_translation",
            "--source-lang", "src", "--target-lang", "tgt", "--arch", args.arch, "--exit-mode", exit_mode,
            "--max-target-length", str(args.length), *args.model_args.split()]
    if args.device == "cpu":
        argv.append("--cpu")
    parsed = options.parse_args_and_arch(options.get_training_parser(), argv)
    torch.manual_seed(0)
    task = tasks.setup_task(parsed)
    return parsed, task, task.build_model(parsed).to(args.device).eval()


def schedule(share: float, bsz: int, length: int, layers: int, generator) -> torch.Tensor:
    """[B, T] exit layers: round(share * T) random positions of each sequence at layer 1, the rest at L."""
    early = round(share * length)
    order = torch.rand(bsz, length, generator=generator).argsort(-1)
    return torch.where(order < early, 1, layers)


def pass_ms(decode, bsz: int, cuda: bool, clock: str) -> float:
    if cuda:
        torch.cuda.synchronize()
    now = time.perf_counter if cuda else bench_lplm.CLOCKS[clock]
    t0 = now()
    decode()
    if cuda:
        torch.cuda.synchronize()
    return 1000 * (now() - t0) / bsz


def medians(variants: dict, args, bsz: int, cuda: bool) -> dict:
    """Median ms per sample of each variant (name -> a decoding call), interleaved pass by pass."""
    times = {name: [] for name in variants}
    for rep in range(args.warmup + args.repeats):
        for name, decode in variants.items():
            ms = pass_ms(decode, bsz, cuda, args.clock)
            if rep >= args.warmup:
                times[name].append(ms)
    return {name: statistics.median(t) for name, t in times.items()}


def decoding_table(args, hard, soft, bsz: int, cuda: bool):
    """Rows of (share, mean exit layer, {variant: ms per sample}) for one batch size."""
    decoder, L, T = hard.decoder, hard.decoder.num_layers, args.length
    gen = torch.Generator().manual_seed(bsz)
    src = torch.randint(4, args.vocab - 1, (bsz, args.source_length), generator=gen).to(args.device)
    lengths = torch.full((bsz,), args.source_length, device=args.device)
    with torch.no_grad():
        enc_hard = hard.encoder(src, src_lengths=lengths)
        enc_soft = soft.encoder(src, src_lengths=lengths)
    rows = []
    for share in args.shares:
        forced = schedule(share, bsz, T, L, gen).to(args.device)
        ms = medians({  # soft's cost does not depend on the share: timed again as a yardstick of the load
            "soft": lambda: soft.decoder.decode(enc_soft, T),
            "before": lambda: reference_decode(decoder, enc_hard, T, 0.5, forced),
            "after": lambda: decoder.decode(enc_hard, T, 0.5, forced_exits=forced),
        }, args, bsz, cuda)
        rows.append((share, forced.float().mean().item(), ms))
    full = next((ms["after"] for share, _, ms in rows if share == 0), None)
    for share, mean_exit, ms in rows:
        ms["ideal"] = full * mean_exit / L if full is not None else math.nan
    return rows


def print_table(bsz: int, rows):
    print(f"\n**Batch {bsz}** (ms per sample, decoder only)\n")
    print("| share exiting at layer 1 | mean exit layer | ELMER-Soft | hard, before | hard, now | ideal "
          "| now / soft | now / ideal |\n|---|---|---|---|---|---|---|---|")
    for share, mean_exit, ms in rows:
        print(f"| {share:.2f} | {mean_exit:.2f} | {ms['soft']:.1f} | {ms['before']:.1f} | {ms['after']:.1f} "
              f"| {ms['ideal']:.1f} | {ms['after'] / ms['soft']:.2f} | {ms['after'] / ms['ideal']:.2f} |", flush=True)


def plot(tables: dict, path: Path, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tables), figsize=(5.5 * len(tables), 4.2), squeeze=False)
    for ax, (bsz, rows) in zip(axes[0], tables.items()):
        shares = [share for share, _, _ in rows]
        for key, label, style in (("soft", "ELMER-Soft", "k--"), ("before", "hard, before issue 15", "s-"),
                                  ("after", "hard, now", "o-"), ("ideal", "ideal (∝ mean exit layer)", "k:")):
            ax.plot(shares, [ms[key] for _, _, ms in rows], style, label=label)
        ax.set(title=f"batch {bsz}", xlabel="share of tokens exiting at layer 1 (the rest at the last)",
               ylabel="ms per sample (decoder)", ylim=(0, None))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"\nwrote {path}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="elmer_base", help="model architecture (default: elmer_base: 6+6 layers, d=768)")
    p.add_argument("--model-args", default="", help="more model flags, e.g. '--encoder-embed-dim 512 "
                                                    "--encoder-ffn-embed-dim 2048' (default: none)")
    p.add_argument("--vocab", type=int, default=50265, help="vocabulary size V (default: 50265, BART's)")
    p.add_argument("--length", type=int, default=32, help="T: decoded positions (default: 32)")
    p.add_argument("--source-length", type=int, default=64, help="source tokens (default: 64)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16], help="batch sizes (default: 1 16)")
    p.add_argument("--shares", type=float, nargs="+", default=[0, 0.25, 0.5, 0.75, 1],
                   help="shares of each sequence's positions forced out at layer 1 (default: 0 .25 .5 .75 1)")
    p.add_argument("--repeats", type=int, default=5, help="timed passes per point (default: 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed passes per point first (default: 1)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default: 1)")
    p.add_argument("--clock", choices=sorted(bench_lplm.CLOCKS), default="cpu",
                   help="CPU timing: the process's CPU time (default) or wall time")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--png", type=Path, default=ROOT / "docs" / "early-exit.png", help="the plot (default: docs/early-exit.png)")
    p.add_argument("--no-lplm", action="store_true", help="skip the LPLM table")
    p.add_argument("--lplm-length", type=int, default=128, help="LPLM: T (default: 128)")
    p.add_argument("--lplm-steps", type=int, default=5, help="LPLM: timed steps per k (default: 5)")
    args = p.parse_args()
    for share in args.shares:
        if not 0 <= share <= 1:  # also rejects NaN
            p.error(f"--shares: each share must be in [0, 1], got {share}")
    for name in ("length", "source_length", "repeats", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if min(args.batches) < 1:
        p.error(f"--batches must be >= 1, got {args.batches}")
    torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    with tempfile.TemporaryDirectory() as folder:
        parsed, _, hard = build(args, Path(folder), "hard")
        _, _, soft = build(args, Path(folder), "soft")
    device = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} thread(s), {args.clock} time"
    title = (f"{' '.join([args.arch, *args.model_args.split()])}: d={parsed.decoder_embed_dim}, {parsed.decoder_layers} decoder layers, "
             f"V={args.vocab}, T={args.length}, S={args.source_length}, fp32, {device}; "
             f"median of {args.repeats} passes after {args.warmup} warm-up")
    print(title)
    tables = {}
    for bsz in args.batches:
        tables[bsz] = decoding_table(args, hard, soft, bsz, cuda)
        print_table(bsz, tables[bsz])
    plot(tables, args.png, title)
    if not args.no_lplm:
        print("\n**LPLM training step** (examples/bench_lplm.py --before)\n")
        bench_lplm.main(bench_lplm.parser().parse_args([
            "--arch", args.arch, "--model-args", args.model_args, "--vocab", str(args.vocab), "--length", str(args.lplm_length), "--device", args.device,
            "--threads", str(args.threads), "--clock", args.clock, "--steps", str(args.lplm_steps), "--warmup", "1", "--before"]))


if __name__ == "__main__":
    main()
