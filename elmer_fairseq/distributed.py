"""Checks of fairseq's distributed options, and a rendezvous that cannot hang.

fairseq 0.12 reads its distributed options without checking them: a world size that does not match
the processes started makes rank 0 wait 30 minutes at the rendezvous; a world size > 1 without a
rendezvous address either asks for GPUs that a CPU machine lacks or, with --distributed-port,
trains every process alone; under torchrun on CPU it divides by the CUDA device count; with
--cpu, --ddp-backend c10d hands GPU ids to PyTorch's DDP. Importing this plugin (--user-dir)
wraps two functions of `fairseq.distributed.utils`, which fairseq-train calls by module
attribute (the wrappers are in `elmer_fairseq/patches.py`), so that these cases fail at once
with an error that names the option:

- `call_main`: the options are checked before anything starts; under torchrun (on CPU as on GPU)
  the rank and world size are taken from torchrun's environment, one device per process;
- `distributed_init`: with `--distributed-init-method tcp://HOST:PORT`, every rank first meets
  the others on a TCP store with a deadline of ELMER_RENDEZVOUS_TIMEOUT seconds (default 300):
  "only 1 of --distributed-world-size 2 processes joined ..." instead of a hang. The process group
  is then built on that store with PyTorch's usual (30 minute) timeout for collectives.

`python -m elmer_fairseq.launch` starts one process per rank with the right flags.
"""
import os
import time
from datetime import timedelta
from urllib.parse import urlparse

import torch
import torch.distributed as dist

RENDEZVOUS_TIMEOUT_ENV = "ELMER_RENDEZVOUS_TIMEOUT"
DEFAULT_RENDEZVOUS_TIMEOUT = 300.0
TORCHRUN_ENV = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK")
HOW_TO_LAUNCH = ("start one process per rank, e.g. `python -m elmer_fairseq.launch --nproc N -- <fairseq-train "
                 "arguments>` or torchrun")


def rendezvous_timeout() -> float:
    raw = os.environ.get(RENDEZVOUS_TIMEOUT_ENV)
    if raw is None:
        return DEFAULT_RENDEZVOUS_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise ValueError(f"{RENDEZVOUS_TIMEOUT_ENV} must be a number of seconds > 0, got {raw!r}")
    return value


def available_backends():
    """torch.distributed backends usable here (nccl only with a GPU)."""
    checks = {
        "gloo": dist.is_gloo_available,
        "nccl": lambda: dist.is_nccl_available() and torch.cuda.is_available(),
        "mpi": dist.is_mpi_available,
        "ucc": getattr(dist, "is_ucc_available", lambda: False),
    }
    return [name for name, ok in checks.items() if ok()]


def check_backend(backend: str, cpu: bool, option: str = "--distributed-backend"):
    if backend == "nccl" and cpu and torch.cuda.is_available():
        raise ValueError(f"{option} nccl needs GPUs, but --cpu is set: use {option} gloo")
    have = available_backends()
    if backend not in have:
        why = " (no GPU, or PyTorch built without NCCL; fairseq's default)" if backend == "nccl" else ""
        hint = f": pass {option} gloo" if backend == "nccl" and "gloo" in have else ""
        raise ValueError(f"{option} {backend} is not available on this machine{why}; "
                         f"available: {', '.join(have) or 'none'}{hint}")


def check_init_method(url: str):
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme == "tcp":
        parsed = urlparse(url)
        try:
            port = parsed.port
        except ValueError:
            port = None
        if not parsed.hostname or not port:
            raise ValueError(f"--distributed-init-method {url}: expected tcp://HOST:PORT (rank 0's host and a "
                             f"free port, the same on every rank)")
    elif scheme == "env":
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise ValueError(f"--distributed-init-method env:// reads the rendezvous address from the "
                             f"environment, but {' and '.join(missing)} is not set")
    elif scheme != "file":
        raise ValueError(f"--distributed-init-method {url}: expected tcp://HOST:PORT, env:// or file://PATH")


def from_torchrun(dt, cpu: bool):
    """Rank, world size and device from torchrun's environment (fairseq's own version takes the
    rank modulo the CUDA device count, which fails on CPU, and ignores torchrun when
    --distributed-world-size is left at its default of 1)."""
    dt.distributed_init_method = "env://"
    dt.distributed_world_size = int(os.environ["WORLD_SIZE"])
    dt.distributed_rank = int(os.environ["RANK"])
    dt.device_id = 0 if cpu else int(os.environ.get("LOCAL_RANK", 0))
    dt.distributed_no_spawn = True


def check_distributed_options(cfg):
    """Raise ValueError naming the option for distributed settings that fairseq would hang on,
    crash on deep inside, or silently ignore. Fills rank/world size from torchrun's environment."""
    dt, common = cfg.distributed_training, cfg.common
    if common.tpu:
        return
    cpu = common.cpu or not torch.cuda.is_available()
    if dt.distributed_init_method is None and all(k in os.environ for k in TORCHRUN_ENV) \
            and int(os.environ["WORLD_SIZE"]) > 1:
        from_torchrun(dt, cpu)
    world = dt.distributed_world_size
    if world is None or world < 1:
        raise ValueError(f"--distributed-world-size must be >= 1, got {world}")
    if world == 1 and dt.distributed_init_method is None:
        return  # one process: nothing distributed
    if dt.distributed_init_method is None:
        slurm = "SLURM_STEP_NODELIST" in os.environ or "SLURM_JOB_NODELIST" in os.environ
        spawn_on_gpus = not cpu and not dt.distributed_no_spawn and world <= torch.cuda.device_count()
        if not (slurm or spawn_on_gpus):
            raise ValueError(
                f"--distributed-world-size {world} needs a rendezvous address: pass --distributed-init-method "
                f"tcp://HOST:PORT (rank 0's host, the same on every rank) with --distributed-rank R and "
                f"--distributed-no-spawn, or {HOW_TO_LAUNCH}; for one process pass --distributed-world-size 1 "
                f"(fairseq's default is the number of visible GPUs)")
    else:
        check_init_method(dt.distributed_init_method)
        if cpu and not dt.distributed_no_spawn:
            raise ValueError("--distributed-init-method on CPU needs --distributed-no-spawn: fairseq would spawn "
                             f"one process per GPU, i.e. none; {HOW_TO_LAUNCH}")
        if dt.distributed_no_spawn and not 0 <= (dt.distributed_rank or 0) < world:
            raise ValueError(f"--distributed-rank {dt.distributed_rank} is not in 0..{world - 1} "
                             f"(--distributed-world-size {world})")
    check_backend(dt.distributed_backend, common.cpu)
    if cpu and dt.ddp_backend in ("c10d", "pytorch_ddp"):
        raise ValueError(f"--ddp-backend {dt.ddp_backend} does not work on CPU with fairseq 0.12 (it hands GPU "
                         f"device ids to PyTorch's DDP): pass --ddp-backend legacy_ddp")
    if cpu and dt.distributed_no_spawn and dt.device_id:
        raise ValueError(f"--device-id {dt.device_id} with --cpu: there are no devices to choose; pass --device-id 0")


def rendezvous(url: str, world: int, rank: int, timeout: float):
    """Every rank meets the others on a TCP store at `url` (rank 0 serves it) within `timeout`
    seconds, or fails with an error naming the option at fault. Returns the store."""
    parsed = urlparse(url)
    where = f"--distributed-init-method {url}"
    try:
        store = dist.TCPStore(parsed.hostname, parsed.port, world, is_master=rank == 0,
                              timeout=timedelta(seconds=timeout), wait_for_workers=False)
    except RuntimeError as e:
        if rank == 0:
            raise RuntimeError(f"rank 0 cannot listen at {where} ({e}); is the port taken by another job, or "
                               f"were two processes started with --distributed-rank 0?") from None
        raise RuntimeError(f"rank {rank} found no rank 0 at {where} within {timeout:.0f} s ({e}): start rank 0 "
                           f"with the same --distributed-init-method and --distributed-world-size {world}, or "
                           f"raise {RENDEZVOUS_TIMEOUT_ENV}") from None
    try:
        if store.add(f"elmer/rank{rank}", 1) > 1:
            raise RuntimeError(f"two processes were started with --distributed-rank {rank} at {where}")
        joined = store.add("elmer/joined", 1)
        deadline = time.monotonic() + timeout
        while joined < world:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"only {joined} of --distributed-world-size {world} processes joined at {where} within "
                    f"{timeout:.0f} s: start exactly one process for each --distributed-rank 0..{world - 1}, "
                    f"all with --distributed-world-size {world} (or {HOW_TO_LAUNCH}); "
                    f"{RENDEZVOUS_TIMEOUT_ENV} sets how long to wait")
            time.sleep(0.05)
            joined = store.add("elmer/joined", 0)
    except RuntimeError as e:
        if "--distributed" in str(e):
            raise
        raise RuntimeError(f"rank {rank} lost rank 0 at {where} while waiting for the other ranks ({e}); "
                           f"see rank 0's error") from None
    store.set_timeout(timedelta(minutes=30))  # PyTorch's default for what follows
    return store
