#!/usr/bin/env python
"""The steps of examples/gpu_check.sh: every GPU measurement the project owes (issue 18, docs/gpu.md).

    python examples/gpu_check.py STEP --work WORK --out OUT [--dry-run]   # one step (gpu_check.sh runs them)
    python examples/gpu_check.py steps [--only a,b]                        # the plan: name, time limit, run?
    python examples/gpu_check.py record|summary ...                        # file a step's outcome, the summary

A step writes its tables to WORK/tables/STEP.md, prints "RESULT: <one line>" last and exits 0 (ok),
77 (skipped; the line says why) or 1 (failed). gpu_check.sh runs each under `timeout` and calls
`record`, which appends the outcome to OUT/results.jsonl and rewrites OUT/summary.md. Everything
that trains or decodes reuses examples/benchmark.py (systems, flags, training, latency) on data made
by examples/xsum/prepare.py from tests/data/xsum-tiny.jsonl: no download anywhere.
--dry-run: the same steps on CPU at tiny sizes, fp32 but for the bf16 fine-tunes (finetune_bf16,
warm_start): with the plugin, bf16 trains on CPU too; fp16 does not (fairseq 0.12 asks CUDA for it).
"""
import argparse
import datetime
import json
import os
import platform
import re
import shlex
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
# benchmark.py and score.py are imported inside the steps (they need fairseq), as this script's
# siblings: a script's own folder is sys.path[0]
SKIP_RC = 77

# name -> (time limit in seconds, steps it needs). Limits are ceilings, not estimates: the run as a
# whole also stops at gpu_check.sh's budget (8 minutes), which later steps then share.
STEPS = {
    "setup": (90, []),
    "build_ext": (180, []),
    "kernel_tests": (150, []),
    "kernel_bench": (60, []),
    "data": (40, []),
    "latency": (150, ["data"]),
    "finetune_bf16": (60, ["data"]),
    "finetune_fp16": (60, ["data"]),
    "lplm": (75, ["data"]),
    "distributed": (50, ["data"]),
    "warm_start": (300, []),
}
# GPU: every system at elmer_base's shape (6+6 layers, d = 768, 12 heads) over BART's vocabulary
# size. Dry run: seconds each on 2 CPU cores.
SIZES = {
    "gpu": dict(layers=6, dim=768, heads=12, vocab=50265, target=64, test=16, max_tokens=4096, lr=5e-4, warmup=10,
                updates=60, log_every=10, lplm_updates=20, k=10, chunk=2, warmup_samples=5, latency_updates=50),
    "dry": dict(layers=2, dim=32, heads=2, vocab=0, target=16, test=8, max_tokens=2048, lr=1e-3, warmup=2,
                updates=8, log_every=2, lplm_updates=4, k=4, chunk=2, warmup_samples=1, latency_updates=20),
}
LATENCY_SYSTEMS = ["transformer", "elmer-soft", "elmer-hard", "cmlm", "levt"]


class Skip(Exception):
    """The step does not apply here (its message says why)."""


class Failed(Exception):
    """A check of the step did not hold (its message says which)."""


def run(cmd, log=None, check=True):
    """Runs cmd; its output goes to the file `log` or to ours, and is returned. Raises Failed on failure."""
    cmd = [str(c) for c in cmd]
    print("$ " + shlex.join(cmd), flush=True)
    if log:
        with open(log, "w") as f:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
        out = Path(log).read_text(errors="replace")
    else:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
        out = proc.stdout
        print(out, flush=True)
    if check and proc.returncode != 0:
        what = cmd[2] if cmd[1] == "-m" else "python -c" if cmd[1] == "-c" else Path(cmd[1]).name
        raise Failed(f"{what} exited {proc.returncode}"
                     + (f"; see {Path(log).name}" if log else "") + f": {tail(out, 1)}")
    return out


def tail(text, n):
    return "\n".join(text.strip().splitlines()[-n:])


def write_table(a, text):
    (a.work / "tables" / f"{a.step}.md").write_text(text.rstrip() + "\n")


# ---------------------------------------------------------------- shared by the training steps


def size(a):
    return SIZES["dry" if a.dry_run else "gpu"]


def bench_args(a, **over):
    """The options examples/benchmark.py's functions read, at this run's size."""
    s = size(a)
    args = argparse.Namespace(
        out=a.work, data=a.work / "data" / "bin", layers=s["layers"], dim=s["dim"], heads=s["heads"],
        max_target_length=s["target"], max_tokens=s["max_tokens"], lr=s["lr"], warmup=s["warmup"], updates=1,
        train_threads=1 if a.dry_run else 2, elmer_options="", pretrain_updates=s["lplm_updates"],
        lplm_permutations=s["k"], warmup_samples=s["warmup_samples"], device="cpu" if a.dry_run else "cuda",
        warm_start=None)
    vars(args).update(over)
    (args.out / "logs").mkdir(parents=True, exist_ok=True)
    return args


def precision_flags(a, precision):
    """bf16 trains on CPU too (the plugin's patch of --bf16, elmer_fairseq/patches.py); fp16 needs CUDA."""
    if a.dry_run:
        return ["--cpu", "--bf16"] if precision == "bf16" else ["--cpu"]
    return [f"--{precision}"]


def train_log(args, name):
    return args.out / "logs" / f"train-{name}.log"


def finish(args, name, proc):
    """Waits for a training process of benchmark.train; raises Failed with its log's last line."""
    if proc is not None and proc.wait() != 0:
        raise Failed(f"fairseq-train {name} exited {proc.returncode}: {tail(train_log(args, name).read_text(), 1)}")


def losses(log_path):
    """fairseq-train's train_inner losses, in update order."""
    found = re.findall(r"\| train_inner \|.* loss=([\d.]+),.* num_updates=(\d+)", log_path.read_text())
    return [float(loss) for loss, _ in sorted(found, key=lambda m: int(m[1]))]


def loss_falls(values, what):
    if len(values) < 2:
        raise Failed(f"{what}: {len(values)} logged losses, need 2 to see a trend")
    if not values[-1] < values[0]:
        raise Failed(f"{what}: the loss did not fall ({values[0]} -> {values[-1]})")
    return f"{values[0]:.2f} -> {values[-1]:.2f}"


def generate(args, a, ckpt, gen_flags, device_flags, log_name, bpe_dir):
    """fairseq-generate on the test split; returns (hypotheses by id, fairseq's timer, mean exit layer)."""
    import benchmark
    from score import parse_log

    log = args.out / "logs" / f"gen-{log_name}.txt"
    bpe = []  # D- lines as text: the data's WordPiece (examples/TASK/prepare.py --tokenizer) or byte-level BPE
    if (bpe_dir / "tokenizer.json").exists():
        bpe = ["--bpe", "wordpiece", "--wordpiece-tokenizer", bpe_dir / "tokenizer.json"]
    elif (bpe_dir / "vocab.json").exists():
        bpe = ["--bpe", "byte_bpe_ids", "--bpe-vocab", bpe_dir / "vocab.json", "--bpe-merges", bpe_dir / "merges.txt"]
    benchmark.fairseq("generate", args.data, "--path", ckpt, *gen_flags, "--gen-subset", "test", "--batch-size", "16",
                      "--required-batch-size-multiple", "1", "--user-dir", ROOT / "elmer_fairseq", *bpe, *device_flags,
                      log=log)
    hyps, seconds, sentences, mean_exit = parse_log(log)
    return hyps, seconds, mean_exit, log


# ---------------------------------------------------------------- the steps


def step_env(a):
    """Machine, GPU, versions: the summary's header (also before set-up, so no fairseq here)."""
    info = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "mode": "dry run (CPU, tiny sizes)" if a.dry_run else "GPU", "python": platform.python_version(),
            "cpus": os.cpu_count(), "commit": os.environ.get("GPU_CHECK_COMMIT", "")}
    try:
        import torch

        info.update(torch=torch.__version__, cuda=torch.version.cuda or "none")
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            info["gpu"] = f"{p.name} ({p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB)"
    except Exception as e:  # noqa: BLE001 (recorded, the steps will say more)
        info["torch"] = f"not importable: {e}"
    for key, cmd in (("driver", ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
                     ("nvcc", ["nvcc", "--version"])):
        try:
            info[key] = tail(subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout, 1)
        except (OSError, subprocess.TimeoutExpired):
            pass
    (a.work / "env.json").write_text(json.dumps(info, indent=1))
    print(json.dumps(info, indent=1))


def step_setup(a):
    """fairseq and what it needs, from the wheels `make gpu-wheels` put in .whl/: no network."""
    wheels = sorted(Path(os.environ.get("GPU_CHECK_WHEELS", ROOT / ".whl")).glob("*.whl"))
    rows = [f"| {w.name} | {w.stat().st_size / 2**20:.2f} |" for w in wheels]
    total = sum(w.stat().st_size for w in wheels) / 2**20
    if a.dry_run:
        note = "dry run: nothing installed, the imports checked"
    elif wheels:
        run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
             "--upgrade", *wheels])
        note = f"installed {len(wheels)} wheels ({total:.2f} MiB)"
    else:
        note = "no wheels in .whl/ (`make gpu-wheels` on a CPU machine, then carry .whl)"
    # LevT needs fairseq's libnat; our package is the checkout itself (PYTHONPATH), never a copy of it
    check = ("import fairseq, hydra, omegaconf, bitarray, rouge_score, torch, elmer_fairseq; from fairseq import libnat; "
             "print(f'fairseq {fairseq.__version__}, hydra {hydra.__version__}, omegaconf {omegaconf.__version__}, '"
             "f'torch {torch.__version__}')")
    try:
        versions = tail(run([sys.executable, "-c", check]), 1)
    except Failed as e:
        raise Failed(f"{note}; imports fail: {e}") from None
    table = ["| wheel | MiB |", "|---|---|", *rows, f"| total | {total:.2f} |"] if wheels else []
    write_table(a, "\n".join([versions, ""] + table))
    return f"{note}; {versions}"


def step_build_ext(a):
    """The fused off-ramp's C++ and CUDA extensions, built side by side (cached per torch/GPU)."""
    code = ("import sys, time; from elmer_fairseq.ops import _ext; t = time.time(); "
            "_ext.load_extension(sys.argv[1]); print(f'{time.time() - t:.1f} s')")
    kinds = ["cpu"] if a.dry_run else ["cpu", "cuda"]
    procs = {k: subprocess.Popen([sys.executable, "-c", code, k], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True, cwd=ROOT) for k in kinds}
    results, failed = {}, []
    for kind, proc in procs.items():
        out = proc.communicate()[0]
        print(f"--- {kind}\n{out}", flush=True)
        results[kind] = tail(out, 1) if proc.returncode == 0 else "failed"
        if proc.returncode:
            failed.append(f"{kind}: {tail(out, 1)}")
    write_table(a, "\n".join(["| extension | build (or cached load) |", "|---|---|",
                              *(f"| {kind} | {result} |" for kind, result in results.items())]))
    if failed:
        raise Failed("; ".join(failed))
    return ", ".join(f"{kind} {result}" for kind, result in results.items())


def step_kernel_tests(a):
    """tests/test_off_ramp_kernel.py: reference vs kernel over shapes and dtypes, the hypothesis fuzz,
    the loader's fallbacks; on the GPU none of its CUDA tests may be skipped."""
    select = ["-k", "reference_entropy or empty_and_tiny or failed_build or torch_mode"] if a.dry_run else []
    out = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs",
               "tests/test_off_ramp_kernel.py", *select], check=False)
    final = tail(out, 1)
    problems = [line for line in out.splitlines() if line.startswith(("FAILED", "ERROR"))]
    write_table(a, "\n".join([f"`{final}`", ""] + [f"- {p}" for p in problems[:30]]))
    if problems or not re.search(r"\d+ passed", final) or re.search(r"\d+ (failed|error)", final):
        raise Failed(final)
    if not a.dry_run and "no CUDA device" in out:
        raise Failed(f"the CUDA tests were skipped: no CUDA device ({final})")
    return final.strip("= ")


def step_kernel_bench(a):
    """examples/bench_off_ramp.py's table: extension vs eager reference vs bare matmul (torch.compile
    left out: it compiles for a minute per shape)."""
    table = a.work / "tables" / "kernel_bench.md"
    sizes = (["--device", "cpu", "--sizes", "8", "--dtypes", "fp32", "--d", "16", "--vocab", "200", "--warmup", "0",
              "--reps", "1"] if a.dry_run else ["--device", "cuda", "--dtypes", "fp32,bf16,fp16", "--no-compile"])
    run([sys.executable, EXAMPLES / "bench_off_ramp.py", *sizes, "--out", table])
    return "table written"


def step_data(a):
    """tests/data/xsum-tiny.jsonl through examples/xsum/prepare.py (byte-level BPE, the benchmark's
    format); on the GPU the dictionary is padded to BART's size so every output layer has its cost."""
    s, out = size(a), a.work / "data"
    run([sys.executable, EXAMPLES / "xsum" / "prepare.py", "--input", ROOT / "tests" / "data" / "xsum-tiny.jsonl",
         "--out", out, "--valid", "8", "--test", s["test"], "--bpe-size", "4000", "--max-source-tokens", "256",
         "--max-target-tokens", s["target"], "--workers", "2"], log=a.work / "logs" / "prepare.txt")
    symbols = len((out / "bin" / "dict.src.txt").read_text().splitlines())
    # fairseq's 4 specials + the symbols + ELMER's <mask> = V; appended symbols keep every index
    filler = [f"madeupword{i:05d} 0\n" for i in range(max(0, s["vocab"] - 5 - symbols))]
    for name in ("dict.src.txt", "dict.tgt.txt"):
        with (out / "bin" / name).open("a") as f:
            f.writelines(filler)
    return f"{s['test']} test pairs, dictionary {symbols} BPE symbols + {len(filler)} unused"


def step_latency(a):
    """Every system at batch 1, synchronized, after warm-up (benchmark.latency). Quality is not the
    point, but weights cannot be quite random: LevT's insertion head would insert up to 255 tokens
    per slot (until its position table is full, where the plugin stops it), CMLM would guess
    lengths at random. So each system trains a few dozen updates first, side by side (the cost is
    mostly start-up)."""
    import benchmark

    s = size(a)
    args = bench_args(a)
    systems, device = benchmark.systems(args), ["--cpu"] if a.dry_run else []  # fp32, as benchmark.py times
    procs = {}
    for name in LATENCY_SYSTEMS:
        flags = benchmark.train_flags(systems[name], args) + ["--max-tokens", "1024", "--no-save-optimizer-state"]
        procs[name] = benchmark.train(f"latency-{name}", flags, args.data, args, device, updates=s["latency_updates"])
    rows, errors = [], []
    for name in LATENCY_SYSTEMS:
        ckpt, proc = procs[name]
        try:
            finish(args, f"latency-{name}", proc)
        except Failed as e:
            errors.append(str(e))
            rows += [(system, None, str(e)) for system in systems[name].rows]
            continue
        for system, gen_flags in systems[name].rows.items():
            try:
                rows.append((system, benchmark.latency(ckpt, gen_flags, args, args.device), ""))
            except Exception as e:  # noqa: BLE001 (the other systems still get their rows)
                errors.append(f"{system}: {e}")
                rows.append((system, None, f"{type(e).__name__}: {e}"))
            print(rows[-1], flush=True)
    ar = next((ms for system, ms, _ in rows if system.startswith("Transformer (AR, greedy)") and ms), None)
    lines = [f"{s['layers']}+{s['layers']} layers, d = {s['dim']}, {s['heads']} heads, V = "
             f"{s['vocab'] or 'the BPE symbols'}, fp32, outputs <= {s['target']} tokens; {s['test']} XSum test "
             f"articles at batch size 1, median after {s['warmup_samples']} warm-up samples; each system trained "
             f"{s['latency_updates']} updates only, so output lengths are not those of trained models", "",
             "| system | ms/sample | speed-up vs AR greedy |", "|---|---|---|"]
    for system, ms, err in rows:
        speedup = f"{ar / ms:.1f}x" if ms and ar else ""
        lines.append(f"| {system} | {ms:.1f} | {speedup} |" if ms else f"| {system} | failed: {err[:200]} | |")
    write_table(a, "\n".join(lines))
    if errors:
        raise Failed("; ".join(errors)[:500])
    return ", ".join(f"{system} {ms:.1f} ms" for system, ms, _ in rows)


def step_finetune(a, precision):
    """elmer_base (ELMER-Soft) for a fixed number of updates in bf16 or fp16: it must have trained in
    that precision (bf16: on the GPU, not on a TPU), the loss must fall and the checkpoint must
    decode every test article (fp16: decoded in fp16 too; fairseq-generate has no bf16 decoding and
    would ignore --bf16)."""
    import benchmark
    import torch

    s, args = size(a), bench_args(a)
    systems, name = benchmark.systems(args), f"finetune-{precision}"
    flags = benchmark.train_flags(systems["elmer-soft"], args) + [
        "--arch", "elmer_base", "--log-interval", str(s["log_every"]), "--no-save-optimizer-state"]
    device = precision_flags(a, precision)
    start = time.time()
    ckpt, proc = benchmark.train(name, flags, args.data, args, device, updates=s["updates"])
    finish(args, name, proc)
    seconds = time.time() - start
    common = torch.load(ckpt, map_location="cpu")["cfg"]["common"]  # the options fairseq trained with
    if common["tpu"] or not all(common[flag[2:]] for flag in device if flag in ("--bf16", "--fp16")):
        raise Failed(f"{name}: trained with bf16={common['bf16']}, fp16={common['fp16']}, tpu={common['tpu']}")
    trend = loss_falls(losses(train_log(args, name)), f"{name} ({train_log(args, name).name})")
    decode = ["--cpu"] if a.dry_run else device if precision == "fp16" else []
    hyps, gen_seconds, mean_exit, log = generate(args, a, ckpt, systems["elmer-soft"].rows["ELMER-Soft"], decode, name,
                                                 args.data.parent)
    if sorted(hyps) != list(range(s["test"])):
        raise Failed(f"{log.name}: {len(hyps)} outputs for {s['test']} test articles")
    empty = sum(not h.strip() for h in hyps.values())
    shown = precision if not a.dry_run else f"{precision} (dry run: {'bf16' if '--bf16' in device else 'fp32'} on CPU)"
    write_table(a, "\n".join([
        "| precision | updates | train loss (first -> last log) | fairseq-train s | test outputs | empty | "
        "mean exit layer | decode s | first output |", "|---|---|---|---|---|---|---|---|---|",
        f"| {shown} | {s['updates']} | {trend} | {seconds:.0f} | {len(hyps)} | {empty} | "
        f"{mean_exit if mean_exit is not None else '-'} | {gen_seconds:.2f} | {hyps[0][:80]!r} |"]))
    return f"{s['updates']} updates, loss {trend}, {len(hyps)} test outputs ({empty} empty)"


def step_lplm(a):
    """LPLM pretraining (benchmark.pretrain) with --lplm-chunk, then examples/bench_lplm.py: step time
    and peak memory of k permutations at once against --lplm-chunk."""
    import benchmark

    s, args = size(a), bench_args(a)
    if not a.dry_run:
        args.max_tokens = 2048  # x k permutations in the decoder
    # pretrain() takes no extra flags; device_flags come after the common ones, so these win. fp16:
    # dynamic loss scaling across the chunks' backward calls
    extra = precision_flags(a, "fp16") + ["--lplm-chunk", str(s["chunk"]), "--log-interval", str(s["log_every"])]
    ckpt = benchmark.pretrain(args, extra)
    done = benchmark.trained_updates(ckpt)
    if done != s["lplm_updates"]:
        raise Failed(f"LPLM stopped at {done} of {s['lplm_updates']} updates")
    trend = loss_falls(losses(train_log(args, "lplm-pretrain")), "LPLM")
    lines = [f"fairseq-train --task elmer_lplm, k = {s['k']}, --lplm-chunk {s['chunk']}, "
             f"{'fp32 on CPU' if a.dry_run else 'fp16'}: {done} updates, loss {trend}", ""]
    bench = (["--arch", "elmer_tiny", "--vocab", "300", "--length", "16", "--batch", "1", "--ks", "2", "--steps", "1",
              "--warmup", "0", "--device", "cpu", "--threads", "1"] if a.dry_run
             else ["--batch", "8", "--ks", str(s["k"])])  # elmer_base, V = 50265, T = 256: README's setting
    for chunk in (1,) if a.dry_run else (0, s["chunk"]):  # the dry run: the chunked path only
        out = run([sys.executable, EXAMPLES / "bench_lplm.py", *bench, "--chunk", chunk])
        lines += [f"examples/bench_lplm.py {' '.join(bench)} --chunk {chunk}:", ""]
        lines += [line for line in out.splitlines() if line.startswith(("|", "elmer"))] + [""]
    write_table(a, "\n".join(lines))
    return f"{done} updates with --lplm-chunk {s['chunk']}, loss {trend}"


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def step_distributed(a):
    """fairseq's distributed entry point (distributed_main, our bounded rendezvous) with world size 1:
    NCCL on the GPU, gloo in the dry run; then the GPU branch of the option checks refuses nccl + --cpu."""
    import benchmark

    args = bench_args(a)
    backend = "gloo" if a.dry_run else "nccl"
    dist = ["--distributed-world-size", "1", "--distributed-rank", "0", "--device-id", "0", "--distributed-init-method",
            f"tcp://127.0.0.1:{free_port()}", "--distributed-no-spawn", "--distributed-backend", backend]
    device = ["--cpu", "--ddp-backend", "legacy_ddp"] if a.dry_run else []  # fp32: the NCCL path alone
    flags = benchmark.train_flags(benchmark.systems(args)["elmer-soft"], args)
    ckpt, proc = benchmark.train("distributed", flags, args.data, args, device + dist, updates=3)
    finish(args, "distributed", proc)
    log = train_log(args, "distributed").read_text()
    if "distributed init (rank 0)" not in log or benchmark.trained_updates(ckpt) != 3:
        raise Failed("no 'distributed init (rank 0)' in the log, or not 3 updates")
    # nccl with --cpu: on a GPU machine the check that names --cpu, elsewhere "not available"
    expected = "is not available on this machine" if a.dry_run else "nccl needs GPUs, but --cpu is set"
    out = run([*benchmark.fairseq_cli("train"), args.data, *flags, "--cpu", *dist[:-1], "nccl"], check=False)
    if expected not in out:
        raise Failed(f"--distributed-backend nccl --cpu: expected {expected!r}, got: {tail(out, 1)}")
    write_table(a, "\n".join([
        "| run | result |", "|---|---|",
        f"| fairseq-train, {backend}, world size 1 (distributed_main) | 3 updates, checkpoint written |",
        f"| --distributed-backend nccl --cpu | refused: {expected} |"]))
    return f"{backend} world size 1: 3 updates; nccl + --cpu refused"


WARM_FILES = ("ckpt/model.pt", "train.flags", "bin/dict.src.txt", "test.raw.tgt")
GENERATE_TOO = ("--max-target-length", "--max-source-positions", "--max-target-positions")  # task options


def step_warm_start(a):
    """Optional: a bf16 fine-tune of a warm-started ELMER-Soft (issue 14) for up to 3 minutes, its
    test scores, exit-layer shares and ten samples. DIR (--warm-start or GPU_CHECK_WARM_START) is a
    prepared task folder as docs/converting.md makes it (bin/, test.raw.tgt, tokenizer.json or the
    byte-level BPE files) with the converted checkpoint in ckpt/model.pt (elmer-convert --out
    DIR/ckpt) and train.flags: the model and task options elmer-convert printed, e.g.
    `--arch elmer_base --encoder-embed-dim 384 ... --max-target-length 32`."""
    folder = a.warm_start or os.environ.get("GPU_CHECK_WARM_START")
    if not folder:
        raise Skip("no warm-start folder (--warm-start DIR or GPU_CHECK_WARM_START)")
    folder = Path(folder)
    missing = [f for f in WARM_FILES if not (folder / f).exists()]
    if missing:
        raise Skip(f"{folder}: no {', '.join(missing)}")
    import benchmark  # only now: importing fairseq takes seconds
    import score

    args = bench_args(a, data=folder / "bin")
    # train for the step's time box less a minute for start-up and decoding, at most 3 minutes
    minutes = min(3.0, (float(os.environ.get("GPU_CHECK_STEP_LIMIT", 240)) - 60) / 60)
    stop = ["--max-update", "4"] if a.dry_run else ["--max-update", "1000000", "--stop-time-hours", f"{minutes / 60:.4f}"]
    task = ["--user-dir", ROOT / "elmer_fairseq", "--task", "elmer_translation"]
    model_flags = shlex.split((folder / "train.flags").read_text())
    save = a.work / "checkpoints" / "warm-start"
    # docs/converting.md's fine-tuning options, with the authors' label smoothing
    run([*benchmark.fairseq_cli("train"), args.data, *task, *model_flags, "--exit-mode", "soft",
         "--criterion", "elmer_loss", "--label-smoothing", "0.1", "--finetune-from-model", folder / "ckpt" / "model.pt",
         "--optimizer", "adam", "--adam-betas", "(0.9,0.98)", "--lr", "1e-3" if a.dry_run else "5e-5",
         "--lr-scheduler", "inverse_sqrt", "--warmup-updates", "500", "--clip-norm", "1.0", "--batch-size", "32",
         "--required-batch-size-multiple", "1", "--save-dir", save, "--no-epoch-checkpoints",
         "--no-save-optimizer-state", "--disable-validation", "--log-format", "simple", "--log-interval", "100",
         "--num-workers", "0", *stop, *precision_flags(a, "bf16")], log=train_log(args, "warm-start"))
    same = [item for flag, value in zip(model_flags, model_flags[1:]) if flag in GENERATE_TOO for item in (flag, value)]
    ckpt = save / "checkpoint_last.pt"
    hyps, _, _, log = generate(args, a, ckpt, task + ["--iter-decode-max-iter", "0", "--beam", "1", *same],
                               ["--cpu"] if a.dry_run else [], "warm-start", folder)
    row = score.score(log, folder / "test.raw.tgt", "ELMER-Soft, warm start")
    shares = re.search(r"ELMER exit layers over .*$", log.read_text(), re.M)
    refs = (folder / "test.raw.tgt").read_text(encoding="utf-8").splitlines()
    samples = [f"{i}. {hyps[i]!r}  (reference: {refs[i]!r})" for i in range(min(10, len(refs)))]
    updates = benchmark.trained_updates(ckpt)
    write_table(a, "\n".join([f"{updates} updates from {folder / 'ckpt' / 'model.pt'}", "", score.markdown([row]), "",
                              shares.group(0) if shares else "(no exit-layer line)", "", *samples]))
    return f"{updates} updates, ROUGE-L {row['rougeL']:.2f}"


# ---------------------------------------------------------------- bookkeeping


def plan(only, dry_run):
    """(name, limit, run?) per step: --only's steps, what they need, and always setup. The dry run's
    limits are 3x: they only stop hangs, on CPUs that other jobs may be using too."""
    wanted = set(STEPS) if not only else {"setup", *only.split(",")}
    unknown = wanted - set(STEPS)
    if unknown:
        sys.exit(f"--only: unknown step(s) {', '.join(sorted(unknown))}; steps: {', '.join(STEPS)}")
    for name in list(wanted):
        wanted.update(STEPS[name][1])
    return [(name, limit * (3 if dry_run else 1), name in wanted) for name, (limit, _) in STEPS.items()]


STATUS = {0: "ok", SKIP_RC: "skipped", 124: "timed out", 137: "timed out"}


def record(a):
    """Appends one step's outcome (status, seconds, its RESULT line, its table, a failure's log tail)."""
    log = a.work / "logs" / f"{a.step}.log"
    text = log.read_text(errors="replace") if log.exists() else ""
    results = re.findall(r"^RESULT: (.*)$", text, re.M)
    note = a.reason or (results[-1] if results else tail(text, 1)[:300])
    if a.rc in (124, 137):
        note = f"stopped after its {a.limit:.0f} s limit"
    table = a.work / "tables" / f"{a.step}.md"
    entry = {"step": a.step, "status": STATUS.get(a.rc, "failed"), "rc": a.rc, "seconds": round(a.seconds, 1),
             "limit": a.limit, "note": note, "table": table.read_text() if table.exists() else "",
             "log_tail": tail(text, 25) if a.rc not in (0, SKIP_RC) and not a.reason else ""}
    with (a.out / "results.jsonl").open("a") as f:
        f.write(json.dumps(entry) + "\n")
    summary(a)


def summary(a):
    """OUT/summary.md from env.json and results.jsonl; a step not yet recorded is 'not run'."""
    env_path = a.work / "env.json"
    env = json.loads(env_path.read_text()) if env_path.exists() else {}
    path = a.out / "results.jsonl"
    done = {e["step"]: e for e in map(json.loads, path.read_text().splitlines())} if path.exists() else {}
    machine = env.get("gpu") or f"no GPU ({env.get('cpus', '?')} CPUs)"
    lines = [f"# GPU check: {machine}, {env.get('date', '?')}", "",
             f"- mode: {env.get('mode', '?')}" + (f"; commit {env['commit']}" if env.get("commit") else ""),
             f"- torch {env.get('torch', '?')}, CUDA {env.get('cuda', '?')}, Python {env.get('python', '?')}"
             + (f", driver {env['driver']}" if env.get("driver") else "") + (f"; nvcc: {env['nvcc']}" if env.get("nvcc") else ""),
             f"- {'finished' if a.final else 'in progress'}: {sum(e['seconds'] for e in done.values()):.0f} s in steps"
             + (f", {a.elapsed:.0f} s wall in all" if a.elapsed else ""), "",
             "| step | status | seconds | limit | note |", "|---|---|---|---|---|"]
    for name in STEPS:
        e = done.get(name)
        if e:
            lines.append(f"| {name} | {e['status']} | {e['seconds']:.1f} | {e['limit']:.0f} | "
                         f"{e['note'].replace('|', '/')} |")
        else:
            lines.append(f"| {name} | not run | | | |")
    for name in STEPS:
        e = done.get(name)
        if e and (e["table"] or e["log_tail"]):
            lines += ["", f"## {name}", ""]
            # a table's own top heading would break the summary's outline
            lines += [re.sub(r"^# (.*)$", r"**\1**", e["table"].rstrip(), flags=re.M)] if e["table"] else []
            lines += ["", "```", e["log_tail"], "```"] if e["log_tail"] else []
    (a.out / "summary.md").write_text("\n".join(lines) + "\n")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", choices=[*STEPS, "env", "steps", "record", "summary"])
    p.add_argument("--work", type=Path, help="scratch folder: data, checkpoints, logs, tables")
    p.add_argument("--out", type=Path, help="results folder: results.jsonl, summary.md")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU")
    p.add_argument("--warm-start", help="warm_start: the folder of a converted checkpoint and its data")
    p.add_argument("--only", default="", help="steps: run these (and what they need) only")
    p.add_argument("--name", help="record: the step's name")
    p.add_argument("--rc", type=int, default=0, help="record: the step's exit code")
    p.add_argument("--seconds", type=float, default=0.0)
    p.add_argument("--limit", type=float, default=0.0)
    p.add_argument("--reason", default="", help="record: why the step did not run")
    p.add_argument("--final", action="store_true", help="summary: the run is over")
    p.add_argument("--elapsed", type=float, default=0.0, help="summary: wall seconds of the whole run")
    a = p.parse_args()
    if a.step == "steps":
        for name, limit, selected in plan(a.only, a.dry_run):
            print(name, limit, int(selected))
        return
    for folder in (a.work / "logs", a.work / "tables", a.out):
        folder.mkdir(parents=True, exist_ok=True)
    if a.step == "record":
        a.step = a.name
        return record(a)
    if a.step == "summary":
        return summary(a)
    if a.step == "env":
        return step_env(a)
    if a.step in os.environ.get("GPU_CHECK_FAIL", "").split(","):
        print("RESULT: failed on purpose (GPU_CHECK_FAIL)")  # the test of the runner's bookkeeping
        sys.exit(1)
    fn = {"finetune_bf16": lambda a: step_finetune(a, "bf16"), "finetune_fp16": lambda a: step_finetune(a, "fp16")}.get(
        a.step) or globals()[f"step_{a.step}"]
    try:
        note = fn(a)
    except Skip as e:
        print(f"RESULT: {e}")
        sys.exit(SKIP_RC)
    except Exception as e:  # noqa: BLE001 (any failure of a step is its result)
        traceback.print_exc()
        print(f"RESULT: {type(e).__name__}: {e}"[:600])
        sys.exit(1)
    print(f"RESULT: {note}")


if __name__ == "__main__":
    main()
