"""Benchmark of the fused off-ramp (not a test): prints a markdown table.

GPU: eager reference, torch.compile of the reference, the extension (CUDA kernel), and the bare
matmul `rows @ weight.T` (the floor): median time over CUDA-event-timed calls after a warm-up, and
peak memory above the inputs (torch.cuda.max_memory_allocated).
"matmul" is literally `rows @ weight.T`; with V = 50265 (odd) its output rows are not 16-byte
aligned and cuBLAS takes a slow path, so "matmul V%8" (the weight padded to a multiple of 8 rows)
is the honest floor.
CPU: eager reference, the extension (C++ path) and the matmuls; the methods' calls interleaved
(one call of each per round, so that a busy machine's load falls on all of them alike), the median
by wall clock or, with --clock cpu, by the process's CPU time (less sensitive to other jobs on a
shared machine; one thread only); peak memory as the growth of the process's RSS during one call,
sampled every ~0.2 ms by a helper process (rough).

Each call is the decoding hot path: N active rows (`index`, a random subset of M = 5N/4 rows), a
state to update, d = 768, V = 50265 (BART's vocabulary).

    python examples/bench_off_ramp.py --device cuda --out results/bench_off_ramp_gpu.md
    python examples/bench_off_ramp.py --device cpu --sizes 32,128,512
    python examples/bench_off_ramp.py --chunks 4096,8192  # + the extension at these chunk sizes
    # the warm BoolQ model's off-ramp on one CPU thread (docs/kernel.md):
    python examples/bench_off_ramp.py --device cpu --threads 1 --d 384 --vocab 21600 --sizes 32,512 \
        --dtypes fp32 --reps 21 --clock cpu
"""
import argparse
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

from elmer_fairseq.ops import _ext
from elmer_fairseq.ops.off_ramp import off_ramp_reference

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MIB = 2.0**20


def inputs(n, d, v, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = n + n // 4
    hidden = torch.randn(m, d, generator=g).to(device, dtype)
    weight = (torch.randn(v, d, generator=g) * (3.0 / d**0.5)).to(device, dtype)
    state = torch.randn(m, d, generator=g).to(device, dtype)
    index = torch.randperm(m, generator=g)[:n].to(device)
    return hidden, weight, index, state


def methods(args, hidden, weight, index, state, compiled):
    thr = args.threshold
    rows = hidden.index_select(0, index)
    v = weight.shape[0]
    padded = None
    if hidden.is_cuda:  # (V % 8 matters to cuBLAS only)
        padded = torch.zeros((v + 7) // 8 * 8, weight.shape[1], dtype=weight.dtype, device=weight.device)
        padded[:v] = weight
    ext = _ext.load_extension("cuda" if hidden.is_cuda else "cpu")
    found = {
        "eager": lambda: off_ramp_reference(hidden, weight, thr, index, state),
        "compile": (lambda: compiled(hidden, weight, thr, index, state)) if compiled else None,
        "ext": lambda: _ext.off_ramp(hidden, weight, thr, index, state),
        # the max-prob exit rule, fused in the same op (threshold 1 - p < 0.5 here)
        "ext max_prob": lambda: _ext.off_ramp(hidden, weight, 0.5, index, state, signal="max_prob"),
        "matmul": lambda: rows @ weight.t(),
        "matmul V%8": (lambda: rows @ padded.t()) if padded is not None else None,
    }
    # the matmuls of the extension's chunks alone: ext - this = the fused reduction's cost
    c_auto = ext.chunk_columns(0, rows.shape[0], v, rows.element_size(), rows.is_cuda)
    buf = torch.empty(rows.shape[0] * ((c_auto + 7) // 8 * 8), dtype=rows.dtype, device=rows.device)

    def chunk_mm():
        for v0 in range(0, v, c_auto):
            c = min(c_auto, v - v0)
            ld = (c + 7) // 8 * 8 if rows.is_cuda else c
            torch.mm(rows, weight[v0 : v0 + c].t(), out=buf[: rows.shape[0] * ld].view(-1, ld)[:, :c])
        return buf

    found["chunk mm"] = chunk_mm
    for c in args.chunks:
        found[f"ext C={c}"] = lambda c=c: _ext.unwrap(ext.off_ramp(hidden, weight, thr, index, state, c))
    return {k: f for k, f in found.items() if f is not None}


def time_cuda(fn, warmup, reps):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def peak_cuda(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak / MIB


def time_cpu(fns, warmup, reps, clock):
    """Median ms per method, the methods' calls interleaved round by round."""
    now = time.process_time if clock == "cpu" else time.perf_counter
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = now()
            fn()
            times[name].append((now() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MIB


_SAMPLER = r"""
import os, select, sys
path, page = f"/proc/{sys.argv[1]}/statm", os.sysconf("SC_PAGE_SIZE")
while sys.stdin.readline():  # "start": sample until the next line
    peak, stop = 0, False
    while not stop:
        with open(path) as f:
            peak = max(peak, int(f.read().split()[1]) * page)
        stop = bool(select.select([sys.stdin], [], [], 0.0002)[0])
    sys.stdin.readline()
    print(peak, flush=True)
"""


class RssSampler:
    """Peak RSS of this process during a call, sampled by a child process (which, unlike a
    thread, keeps sampling while a C++ call holds the GIL)."""

    def __init__(self):
        try:  # large blocks straight from mmap, so that freeing them lowers the RSS again
            import ctypes

            ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
        except (OSError, AttributeError):
            pass
        self.child = subprocess.Popen([sys.executable, "-c", _SAMPLER, str(os.getpid())],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def peak_mib(self, fn):
        base = rss_mib()
        self.child.stdin.write("start\n")
        self.child.stdin.flush()
        time.sleep(0.01)
        out = fn()
        self.child.stdin.write("stop\n")
        self.child.stdin.flush()
        peak = int(self.child.stdout.readline()) / MIB
        del out
        return max(0.0, peak - base)


def hardware(device):
    versions = f"torch {torch.__version__}"
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        return f"{p.name} ({p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB), {versions}, CUDA {torch.version.cuda}"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, {versions}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--sizes", default=None, help="N values, comma-separated (default: GPU 128,4096,32768; CPU 32,128,512)")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16, fp16")
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=50265)
    parser.add_argument("--threshold", type=float, default=2.0)
    parser.add_argument("--warmup", type=int, default=None, help="calls before timing (default: GPU 5, CPU 1)")
    parser.add_argument("--reps", type=int, default=None, help="timed calls (default: GPU 20, CPU 3)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (default on GPU only)")
    parser.add_argument("--chunks", default="", help="extra columns: the extension at these chunk sizes")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                        help="CPU timing: wall clock, or the process's CPU time (one thread only)")
    parser.add_argument("--out", default=None, help="also write the markdown here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu" and (args.device == "cuda" or torch.get_num_threads() != 1):
        parser.error("--clock cpu times CPU work of one thread: use it with --device cpu --threads 1")
    gpu = args.device == "cuda"
    args.sizes = [int(s) for s in (args.sizes or ("128,4096,32768" if gpu else "32,128,512")).split(",")]
    args.dtypes = args.dtypes.split(",")
    args.chunks = [int(c) for c in args.chunks.split(",") if c]
    args.warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    args.reps = args.reps if args.reps is not None else (20 if gpu else 3)

    torch.manual_seed(0)
    compiled, sampler = None, None if gpu else RssSampler()
    if gpu and not args.no_compile:
        torch._dynamo.config.cache_size_limit = 64
        compiled = torch.compile(off_ramp_reference, dynamic=False)
    head = [f"# Off-ramp benchmark: {hardware(args.device)}", "",
            f"d = {args.d}, V = {args.vocab}, N active rows of M = 5N/4 (index + state), threshold {args.threshold}. "
            f"Time: median of {args.reps} calls after {args.warmup} warm-up "
            + ("(CUDA events)" if gpu else f"({'process CPU time' if args.clock == 'cpu' else 'wall clock'}, calls interleaved)")
            + "; memory: peak above the inputs"
            + (" (torch.cuda.max_memory_allocated)." if gpu else " (RSS growth sampled every ~0.2 ms during one call: rough).")
            + ' "auto C": the chunk the extension picks; "chunk mm": its chunks\' matmuls alone, one after the other'
            + " (ext - chunk mm = the fused reduction). \"ext max_prob\": the extension with the max-prob"
            + " exit rule." + ("" if gpu else " Load average before: %.2f %.2f %.2f." % os.getloadavg())
            , ""]
    print("\n".join(head), flush=True)
    rows_md, names = [], None
    floor = "matmul V%8" if gpu else "matmul"  # V%8 matters to cuBLAS only
    for dname in args.dtypes:
        for n in args.sizes:
            tensors = inputs(n, args.d, args.vocab, DTYPES[dname], args.device)
            fns = methods(args, *tensors, compiled)
            names = names or list(fns)
            ms, mem = {}, {}
            if gpu:
                for name, fn in fns.items():
                    try:
                        t0 = time.perf_counter()
                        fn()
                        torch.cuda.synchronize()
                        first = time.perf_counter() - t0
                        if first > 5:
                            print(f"  ({dname} N={n} {name}: first call {first:.0f} s)", flush=True)
                        ms[name] = time_cuda(fn, args.warmup, args.reps)
                        mem[name] = f"{peak_cuda(fn):.0f}"
                    except torch.cuda.OutOfMemoryError:
                        ms[name], mem[name] = float("nan"), "OOM"
                    torch.cuda.empty_cache()
            else:
                ms = time_cpu(fns, args.warmup, args.reps, args.clock)
                mem = {name: f"{sampler.peak_mib(fn):.0f}" for name, fn in fns.items()}
            ext, ref = fns["ext"](), fns["eager"]()
            agree = 100.0 * (ext.token == ref.token).float().mean().item() if n else 100.0
            chunk = _ext.load_extension(args.device if gpu else "cpu").chunk_columns(0, n, args.vocab, tensors[0].element_size(), gpu)
            cells = [dname, str(n), str(chunk)] + [f"{ms[k]:.3f}" for k in names] + [
                f"{ms['eager'] / ms['ext']:.2f}x", f"{ms['ext'] / ms[floor]:.2f}x"
            ] + [mem[k] for k in names] + [f"{agree:.2f}"]
            rows_md.append("| " + " | ".join(cells) + " |")
            print(rows_md[-1], flush=True)
            del tensors, fns, ext, ref
    header = (["dtype", "N", "auto C"] + [f"{k} ms" for k in names] + ["eager / ext", f"ext / {floor}"]
              + [f"{k} MiB" for k in names] + ["same token %"])
    table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + rows_md
    cmd = "python " + " ".join([os.path.relpath(__file__)] + sys.argv[1:])
    tail = [] if gpu else ["", "Load average after: %.2f %.2f %.2f." % os.getloadavg()]
    text = "\n".join(head + table + tail + ["", f"Command: `{cmd}`", ""])
    print("\n" + text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
