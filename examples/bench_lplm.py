#!/usr/bin/env python
"""LPLM training step cost against k, the number of exit-layer permutations per document.

Times one training step (forward + backward of task elmer_lplm's train_step: the encoder once,
the decoder on k permutations) on random tokens, for each k, and prints a markdown table: median
step time over --steps steps after --warmup, its ratio to the first k, and peak memory. The goal
(issues 4 and 15): k = 10 costs at most 4x k = 1, because the encoder and the decoder layers the
permutations share run once. --before also times the implementation before issue 15 (every
layer on every position of the k-fold batch; kept in examples/early_exit_reference.py) on the
same steps.

    python examples/bench_lplm.py                                  # elmer_base, V=50265, T=256, B=1
    python examples/bench_lplm.py --length 128 --device cpu        # what fits a small CPU
    python examples/bench_lplm.py --length 128 --device cpu --threads 1 --before

On CUDA the time comes from CUDA events and memory from torch.cuda.max_memory_allocated (reset
before each k). On CPU the time is wall time, or with --clock cpu the process's CPU time (what a
machine shared with other jobs inflates far less; with one thread, the wall time of an idle
machine), and memory is the process's peak RSS so far
(getrusage: ks run in increasing order, so each row's peak is its own unless a smaller k peaked
higher); it includes the model and Python, not only the step.
"""
import argparse
import functools
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch

import elmer_fairseq  # noqa: F401  (registers the task, model and criterion)
from fairseq import options, tasks

ROOT = Path(__file__).resolve().parents[1]


class Backward:
    """The one thing train_step needs from a fairseq optimizer."""

    @staticmethod
    def backward(loss):
        loss.backward()


def build(args, folder: Path):
    """Task, model and criterion through fairseq's registries, over a dictionary of --vocab symbols."""
    n_symbols = args.vocab - 5  # + <s> <pad> </s> <unk> and the task's <mask>
    (folder / "dict.txt").write_text("".join(f"{i} 1\n" for i in range(n_symbols)))
    argv = [str(folder), "--user-dir", str(ROOT / "elmer_fairseq"), "--task", "elmer_lplm", "--arch", args.arch,
            "--criterion", "elmer_loss", "--tokens-per-sample", str(args.length), "--lplm-chunk", str(args.chunk),
            *args.model_args.split()]
    if args.device == "cpu":
        argv.append("--cpu")
    parsed = options.parse_args_and_arch(options.get_training_parser(), argv)
    task = tasks.setup_task(parsed)
    model = task.build_model(parsed).to(args.device)
    return parsed, task, model, task.build_criterion(parsed)


def batch(task, args):
    """B documents of T tokens: <s> ... </s> sources, y + EOS targets, [MASK] decoder inputs."""
    d, B, T = task.dictionary, args.batch, args.length
    src = torch.randint(d.nspecial, len(d) - 1, (B, T))
    src[:, 0], src[:, -1] = d.bos(), d.eos()
    target = torch.cat([src[:, 1:], torch.full((B, 1), d.pad())], 1)
    return {
        "id": torch.arange(B), "nsentences": B, "ntokens": B * (T - 1), "target": target.to(args.device),
        "net_input": {"src_tokens": src.to(args.device), "src_lengths": torch.full((B,), T, device=args.device),
                      "prev_output_tokens": torch.full_like(target, task.mask_idx).to(args.device)},
    }


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def step_ms(task, model, criterion, sample, cuda: bool, clock: str = "wall") -> float:
    model.zero_grad(set_to_none=True)
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        task.train_step(sample, model, criterion, Backward, update_num=0)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    t0 = CLOCKS[clock]()
    task.train_step(sample, model, criterion, Backward, update_num=0)
    return 1000 * (CLOCKS[clock]() - t0)


def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="elmer_base", help="model architecture (default: elmer_base, d=768, 6+6)")
    p.add_argument("--model-args", default="", help="more model flags, e.g. '--encoder-embed-dim 512' (default: none)")
    p.add_argument("--vocab", type=int, default=50265, help="vocabulary size V (default: 50265, BART's)")
    p.add_argument("--length", type=int, default=256, help="T: source and target length (default: 256)")
    p.add_argument("--batch", type=int, default=1, help="documents per step (default: 1)")
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 5, 10], help="values of k (default: 1 2 5 10)")
    p.add_argument("--chunk", type=int, default=0, help="--lplm-chunk (default: 0 = all k at once)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per k (default: 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per k first (default: 2)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                   help="CPU timing: wall time (default) or the process's CPU time")
    p.add_argument("--before", action="store_true",
                   help="also time the implementation before issue 15 (examples/early_exit_reference.py), "
                        "alternating with the current one step by step; needs --chunk 0")
    return p


def timed_ms(args, task, model, criterion, sample, cuda: bool, implementations: dict) -> dict:
    """Median step ms of each implementation (name -> the model's lplm_terms), their steps
    interleaved so that a busy machine slows them alike."""
    times = {name: [] for name in implementations}
    for step in range(args.warmup + args.steps):
        for name, lplm_terms in implementations.items():
            model.lplm_terms = lplm_terms
            ms = step_ms(task, model, criterion, sample, cuda, args.clock)
            if step >= args.warmup:
                times[name].append(ms)
    del model.lplm_terms  # the class's own again
    return {name: statistics.median(t) for name, t in times.items()}


def main(args=None):
    args = args or parser().parse_args()
    if args.before and args.chunk:
        raise ValueError(f"--before times the reference implementation, which has no --lplm-chunk path; "
                         f"got --chunk {args.chunk} (use 0)")
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        parsed, task, model, criterion = build(args, Path(folder))
    n_params = sum(p.numel() for p in model.parameters())
    device = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads, {args.clock} time"
    print(f"{args.arch}: {n_params / 1e6:.1f}M parameters, d={parsed.encoder_embed_dim}, "
          f"{parsed.encoder_layers}+{parsed.decoder_layers} layers, V={len(task.dictionary)}, T={args.length}, "
          f"B={args.batch}, lplm-chunk={args.chunk}, fp32, {device}; median of {args.steps} steps after "
          f"{args.warmup} warm-up\n")
    memory = "peak memory (torch.cuda.max_memory_allocated)" if cuda else "peak RSS so far (getrusage)"
    implementations = {"after": model.lplm_terms}
    if args.before:
        from early_exit_reference import reference_lplm_terms  # a sibling of this script

        implementations = {"before": functools.partial(reference_lplm_terms, model), **implementations}
        print(f"| k | before: step ms (fwd+bwd) | x first k | after: step ms | x first k | after / before | {memory} |\n"
              f"|---|---|---|---|---|---|---|")
    else:
        print(f"| k | step ms (fwd+bwd) | x first k | {memory} |\n|---|---|---|---|")
    first = None
    for k in sorted(args.ks):
        task.cfg.lplm_permutations = k
        sample = batch(task, args)
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        ms = timed_ms(args, task, model, criterion, sample, cuda, implementations)
        first = first or ms
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        cells = "".join(f" {ms[name]:.1f} | {ms[name] / first[name]:.2f} |" for name in implementations)
        speedup = f" {ms['after'] / ms['before']:.2f} |" if args.before else ""
        print(f"| {k} |{cells}{speedup} {peak:.2f} GiB |", flush=True)


if __name__ == "__main__":
    main()
