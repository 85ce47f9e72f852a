"""Start fairseq-train on N processes of this machine, one per rank, with the flags fairseq 0.12
needs (plain torchrun fails with it on CPU):

    python -m elmer_fairseq.launch --nproc 2 -- data/bin --user-dir elmer_fairseq --task elmer_lplm ... --cpu

Each rank runs `python -m fairseq_cli.train <your arguments> --distributed-world-size W
--distributed-rank R --device-id D --distributed-init-method tcp://ADDR:PORT --distributed-no-spawn
--distributed-backend B`; on CPU also `--cpu --ddp-backend legacy_ddp` (fairseq's DDP wrapper
hands GPU ids to PyTorch on CPU); on GPUs the i-th process of a machine uses GPU i. The port is a free one unless --port
says otherwise. Output lines are prefixed with `[rank R]` (fairseq itself only logs warnings on
ranks > 0). If a rank fails, the others are stopped and the launcher exits with its code.
Several machines: run it on each with --nnodes, --node-rank, --master-addr and --port.
"""
import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time

# set by the launcher itself: the user's fairseq arguments must not carry them
RESERVED = ("--distributed-world-size", "--distributed-rank", "--distributed-init-method", "--distributed-no-spawn",
            "--distributed-port", "--device-id", "--distributed-backend", "--local-rank", "--local_rank")
GRACE_SECONDS = 10


class LaunchError(Exception):
    pass


def parse_args(argv):
    if "--" in argv:
        split = argv.index("--")
        own, train_args = argv[:split], argv[split + 1:]
    else:
        own, train_args = argv, []
    p = argparse.ArgumentParser(prog="python -m elmer_fairseq.launch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                usage="%(prog)s --nproc N [options] -- <fairseq-train arguments>")
    p.add_argument("--nproc", type=int, required=True,
                   help="processes (ranks) on this machine; on GPUs at most one per GPU")
    p.add_argument("--nnodes", type=int, default=1, help="machines taking part (default 1)")
    p.add_argument("--node-rank", type=int, default=0, help="this machine's index, 0..nnodes-1 (default 0)")
    p.add_argument("--master-addr", default="127.0.0.1",
                   help="address of the machine with node rank 0 (default 127.0.0.1)")
    p.add_argument("--port", type=int,
                   help="rendezvous port on --master-addr (default: a free one; required with --nnodes > 1)")
    p.add_argument("--backend", help="torch.distributed backend (default: nccl on GPUs, gloo on CPU)")
    p.add_argument("--module", default="fairseq_cli.train",
                   help="module each rank runs with `python -m` (default fairseq_cli.train, i.e. fairseq-train)")
    args = p.parse_args(own)
    args.train_args = train_args
    return args


def has_option(argv, name):
    return any(a == name or a.startswith(name + "=") for a in argv)


def option_value(argv, name):
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def free_port(addr):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


def check_port(addr, port):
    if not 0 < port < 65536:
        raise LaunchError(f"--port must be in 1..65535, got {port}")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((addr, port))
        except OSError as e:
            raise LaunchError(f"--port {port} on {addr} cannot be used ({e.strerror}): pick another or leave "
                              f"--port out for a free one") from None


def plan(args):
    """Validates the arguments; returns (per-rank fairseq argument lists, environment)."""
    import torch
    import torch.distributed as dist

    from .distributed import check_backend

    if args.nproc < 1:
        raise LaunchError(f"--nproc must be >= 1, got {args.nproc}")
    if args.nnodes < 1:
        raise LaunchError(f"--nnodes must be >= 1, got {args.nnodes}")
    if not 0 <= args.node_rank < args.nnodes:
        raise LaunchError(f"--node-rank must be in 0..{args.nnodes - 1}, got {args.node_rank}")
    train = list(args.train_args)
    if not train:
        raise LaunchError("no fairseq-train arguments: put them after `--`")
    for name in RESERVED:
        if has_option(train, name):
            raise LaunchError(f"{name} is set by the launcher for every rank: remove it from the fairseq-train "
                              f"arguments (use the launcher's --nproc/--port/--backend)")
    world = args.nproc * args.nnodes
    if world == 1:
        return [train], dict(os.environ)
    if not dist.is_available():
        raise LaunchError("this PyTorch build has no torch.distributed")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    cpu = has_option(train, "--cpu") or gpus == 0
    backend = args.backend or ("gloo" if cpu else "nccl")
    try:
        check_backend(backend, has_option(train, "--cpu"), option="--backend")
    except ValueError as e:
        raise LaunchError(str(e)) from None
    if not cpu and args.nproc > gpus:
        raise LaunchError(f"--nproc {args.nproc} but {gpus} GPU(s) are visible; one process per GPU (or pass --cpu)")
    extra = []
    if cpu:
        if not has_option(train, "--cpu"):
            extra.append("--cpu")
        ddp = option_value(train, "--ddp-backend")
        if ddp is None:
            extra += ["--ddp-backend", "legacy_ddp"]
        elif ddp in ("c10d", "pytorch_ddp"):
            raise LaunchError(f"--ddp-backend {ddp} does not work on CPU with fairseq 0.12: use --ddp-backend "
                              f"legacy_ddp (the default of this launcher on CPU)")
    if args.port is None:
        if args.nnodes > 1:
            raise LaunchError("--port is required with --nnodes > 1 (the same on every machine)")
        args.port = free_port(args.master_addr)
    elif args.node_rank == 0:
        check_port(args.master_addr, args.port)
    init = f"tcp://{args.master_addr}:{args.port}"
    ranks = []
    for local in range(args.nproc):
        rank = args.node_rank * args.nproc + local
        ranks.append(train + extra + [
            "--distributed-world-size", str(world), "--distributed-rank", str(rank),
            "--device-id", "0" if cpu else str(local), "--distributed-init-method", init,
            "--distributed-no-spawn", "--distributed-backend", backend])
    env = dict(os.environ)
    if cpu and "OMP_NUM_THREADS" not in env:  # N processes must not each spin a thread per core
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.nproc))
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle threads sleep: see docs/speed.md
    return ranks, env


def forward(stream, prefix, out, lock):
    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", errors="replace")
        with lock:
            out.write(prefix + line if line.endswith("\n") else prefix + line + "\n")
            out.flush()
    stream.close()


def stop(procs):
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + GRACE_SECONDS
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def run(args) -> int:
    ranks, env = plan(args)
    first = args.node_rank * args.nproc
    on_sigterm = signal.signal(signal.SIGTERM, interrupted)  # stop the ranks too when the launcher is stopped
    lock = threading.Lock()
    procs, threads = [], []
    world = args.nproc * args.nnodes
    if world > 1:
        print(f"elmer_fairseq.launch: {len(ranks)} processes (ranks {first}..{first + len(ranks) - 1} of "
              f"{args.nproc * args.nnodes}) at tcp://{args.master_addr}:{args.port}", file=sys.stderr, flush=True)
    try:
        for i, argv in enumerate(ranks):
            p = subprocess.Popen([sys.executable, "-u", "-m", args.module, *argv], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            procs.append(p)
            prefix = f"[rank {first + i}] " if world > 1 else ""
            t = threading.Thread(target=forward, args=(p.stdout, prefix, sys.stdout, lock), daemon=True)
            t.start()
            threads.append(t)
        code = 0
        while code == 0 and any(p.poll() is None for p in procs):
            for i, p in enumerate(procs):
                if p.poll() not in (None, 0):
                    code = p.returncode
                    print(f"elmer_fairseq.launch: rank {first + i} exited with code {code}; stopping the other ranks",
                          file=sys.stderr, flush=True)
                    break
            else:
                time.sleep(0.2)
        if code == 0:
            failed = [(i, p.returncode) for i, p in enumerate(procs) if p.returncode]
            if failed:
                i, code = failed[0]
                print(f"elmer_fairseq.launch: rank {first + i} exited with code {code}", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        code = 130
    finally:
        stop(procs)
        for t in threads:
            t.join(timeout=5)
        signal.signal(signal.SIGTERM, on_sigterm)
    return code if code >= 0 else 128 - code  # killed by signal -n: shell-style 128+n


def interrupted(signum, frame):
    raise KeyboardInterrupt


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        code = run(args)
    except LaunchError as e:
        print(f"elmer_fairseq.launch: error: {e}", file=sys.stderr)
        code = 2
    sys.exit(code)


if __name__ == "__main__":
    main()
