"""Picks the off-ramp implementation: the fused extension from csrc/ where it builds, else the reference.

`off_ramp` has `off_ramp_reference`'s signature and contract. CUDA tensors go to the CUDA kernel,
CPU tensors to the C++ path; each is JIT-built on first use (once per process, cached on disk per
torch version, CUDA version and GPU arch). The extension is inference-only: when autograd needs
gradients (grad mode on and hidden, weight or state requires grad) the reference runs instead,
and so it does in `auto` mode for dtypes other than float32 / bfloat16 / float16.

Environment:
    ELMER_OFF_RAMP        auto (default): the extension, else the reference after ONE warning;
                          torch: always the reference; cpp / cuda: the extension for CPU / CUDA
                          tensors, raising if it cannot be built or the tensors are elsewhere.
    ELMER_EXT_CACHE       build cache folder (default ~/.cache/elmer_fairseq).
    ELMER_OFF_RAMP_CHUNK  vocabulary columns per chunk (default 0: sized to a memory budget).
"""
import contextlib
import hashlib
import os
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from .off_ramp import OffRampOutput, check_signal, off_ramp_reference

MODES = ("auto", "cuda", "cpp", "torch")
_SOURCES = {"cpu": ("off_ramp.cpp",), "cuda": ("off_ramp.cpp", "off_ramp_kernel.cu")}
_HEADERS = ("off_ramp_kernel.h",)
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_STALE_LOCK_S = 600  # without flock (non-POSIX), a torch build lock this old is from a dead build

_loaded = {}  # kind -> extension module, or the exception that stopped its build
_warned = set()
_build_lock = threading.Lock()


class OffRampFallbackWarning(UserWarning):
    """The fused off-ramp extension could not be built; the PyTorch reference runs instead."""


def _mode() -> str:
    mode = os.environ.get("ELMER_OFF_RAMP", "").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"ELMER_OFF_RAMP must be one of {', '.join(MODES)}; got {mode!r}")
    return mode


def _chunk() -> int:
    value = os.environ.get("ELMER_OFF_RAMP_CHUNK", "").strip() or "0"
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"ELMER_OFF_RAMP_CHUNK must be an integer; got {value!r}") from None


def csrc_dir() -> Path:
    """csrc/ of a repository checkout (editable install), else the installed package data."""
    here = Path(__file__).resolve()
    for folder in (here.parents[2] / "csrc", here.parents[1] / "csrc"):
        if (folder / "off_ramp.cpp").is_file():
            return folder
    raise FileNotFoundError(f"off-ramp sources (csrc/off_ramp.cpp) not found near {here}")


def _build_dir(kind: str, src: Path) -> Path:
    # ninja rebuilds when the command line changes, and it names the sources' folder and the
    # interpreter's include paths: checkouts and virtualenvs must not share a folder
    digest = hashlib.sha256(f"{src.resolve()}|{sys.prefix}".encode())
    for name in _SOURCES[kind] + _HEADERS:
        digest.update((src / name).read_bytes())
    tag = f"torch{torch.__version__}"
    if kind == "cuda":
        major, minor = torch.cuda.get_device_capability()
        tag += f"-cu{torch.version.cuda}-sm{major}{minor}"
    root = Path(os.environ.get("ELMER_EXT_CACHE") or Path.home() / ".cache" / "elmer_fairseq")
    return root / f"off_ramp_{kind}-{tag}-{digest.hexdigest()[:12]}"


@contextlib.contextmanager
def builder_lock(build_dir: Path):
    """Serialises our builders with an flock, which the OS drops when its holder dies; so a torch
    `lock` file found while holding it was left by a killed build and would hang torch forever."""
    build_dir.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # no flock: fall back to the lock's age
        fcntl = None
    with open(build_dir / "builder.flock", "w") as handle:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        stale = build_dir / "lock"
        with contextlib.suppress(FileNotFoundError):
            if fcntl is not None or time.time() - stale.stat().st_mtime > _STALE_LOCK_S:
                stale.unlink()
                print(f"elmer_fairseq: removed a stale build lock {stale}", file=sys.stderr)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(handle, fcntl.LOCK_UN)


def _build(kind: str):
    from torch.utils import cpp_extension

    cuda = kind == "cuda"
    if cuda and not torch.cuda.is_available():
        raise RuntimeError("no CUDA device is available")
    if cuda and cpp_extension.CUDA_HOME is None:
        raise RuntimeError("no CUDA toolkit found: set CUDA_HOME to the folder above nvcc's bin/")
    src = csrc_dir()
    build_dir = _build_dir(kind, src)
    name = f"elmer_off_ramp_{kind}"
    arch_env = os.environ.get("TORCH_CUDA_ARCH_LIST")
    with builder_lock(build_dir):
        if not (build_dir / f"{name}.so").exists():
            print(f"elmer_fairseq: building the fused off-ramp ({kind}) extension in {build_dir}; "
                  "the first build takes a minute or two", file=sys.stderr)
        try:
            if cuda:  # build for this GPU only; the cache folder is keyed by its arch
                os.environ["TORCH_CUDA_ARCH_LIST"] = "%d.%d" % torch.cuda.get_device_capability()
            return cpp_extension.load(
                name=name,
                sources=[str(src / f) for f in _SOURCES[kind]],
                extra_cflags=["-O3"] + (["-DWITH_CUDA"] if cuda else []),
                extra_cuda_cflags=["-O3"],
                extra_include_paths=[str(src)],
                build_directory=str(build_dir),
                with_cuda=cuda,
                verbose=False,
            )
        finally:
            if cuda:
                if arch_env is None:
                    os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
                else:
                    os.environ["TORCH_CUDA_ARCH_LIST"] = arch_env


def load_extension(kind: str, strict: bool = True):
    """The built extension for `kind` ("cpu" or "cuda"), built at most once per process.

    On failure: raise if `strict`, else warn once (per kind) and return None."""
    with _build_lock:
        if kind not in _loaded:
            try:
                _loaded[kind] = _build(kind)
            except Exception as err:  # any failure means: use the reference
                _loaded[kind] = err
    ext = _loaded[kind]
    if not isinstance(ext, Exception):
        return ext
    reason = f"{type(ext).__name__}: {str(ext)[-2000:]}"
    if strict:
        raise RuntimeError(f"the fused off-ramp {kind} extension could not be built ({reason})") from ext
    if kind not in _warned:
        _warned.add(kind)
        warnings.warn(
            f"elmer_fairseq: the fused off-ramp {kind} extension could not be built ({reason}); "
            "using the PyTorch reference (slower, holds the [N, V] logits). Set ELMER_OFF_RAMP=torch "
            "to choose it silently, or ELMER_OFF_RAMP=cpp/cuda to make this an error.",
            OffRampFallbackWarning,
            stacklevel=3,
        )
    return None


def unwrap(result):
    """The extension returns (error message or None, value) rather than throwing (see csrc)."""
    error, value = result
    if error is not None:
        raise RuntimeError(error)
    return value


def _check(hidden, weight, index, state):
    # Checked here as well as in C++: on the H100 machine a C++ exception thrown inside the
    # extension killed the test process (SIGSEGV), so ordinary misuse must never reach one.
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1] or not len(weight):
        raise ValueError(f"off_ramp: need hidden [M, d] and weight [V >= 1, d]; got {tuple(hidden.shape)} "
                         f"and {tuple(weight.shape)}")
    for name, t in (("weight", weight), ("state", state)):
        if t is not None and (t.dtype != hidden.dtype or t.device != hidden.device):
            raise ValueError(f"off_ramp: {name} is {t.dtype} on {t.device}, hidden {hidden.dtype} on {hidden.device}")
    if state is not None and state.shape != hidden.shape:
        raise ValueError(f"off_ramp: state must have hidden's shape {tuple(hidden.shape)}, got {tuple(state.shape)}")
    if index is not None:
        if index.dim() != 1 or index.dtype != torch.int64 or index.device != hidden.device:
            raise ValueError(f"off_ramp: index must be [N] int64 on {hidden.device}; got {tuple(index.shape)} "
                             f"{index.dtype} on {index.device}")
        # (on CUDA, bounds are checked by a device assert, as in the reference: no host sync)
        if not index.is_cuda and len(index) and not 0 <= int(index.min()) <= int(index.max()) < len(hidden):
            raise IndexError(f"off_ramp: index out of range for {len(hidden)} rows")


def off_ramp(
    hidden: Tensor,
    weight: Tensor,
    threshold: float,
    index: Optional[Tensor] = None,
    state: Optional[Tensor] = None,
    signal: str = "entropy",
) -> OffRampOutput:
    """`off_ramp_reference` (same arguments, same result) by the fastest implementation that works:
    the CUDA kernel for CUDA tensors, the C++ path for CPU tensors, else the reference. Inference
    only: with autograd recording for an input that requires grad, the reference runs. `signal`
    ("entropy" or "max_prob") is the exit rule, applied inside the kernel either way."""
    check_signal(signal)
    mode = _mode()
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, state)
    )
    if mode == "torch" or needs_grad:
        return off_ramp_reference(hidden, weight, threshold, index, state, signal)
    kind = {"cpu": "cpu", "cuda": "cuda"}.get(hidden.device.type)
    if mode == "auto":
        if kind is None or hidden.dtype not in _DTYPES:
            return off_ramp_reference(hidden, weight, threshold, index, state, signal)
    elif kind != {"cpp": "cpu", "cuda": "cuda"}[mode]:
        raise ValueError(f"ELMER_OFF_RAMP={mode} but the off-ramp inputs are on {hidden.device}")
    _check(hidden, weight, index, state)
    ext = load_extension(kind, strict=mode != "auto")
    if ext is None:
        return off_ramp_reference(hidden, weight, threshold, index, state, signal)
    return OffRampOutput(*unwrap(ext.off_ramp(hidden, weight, float(threshold), index, state, _chunk(), signal)))


def prepare(device) -> None:
    """Builds (or loads from the cache) the extension that `off_ramp` will use for tensors on
    `device`, so that the first decoding step, often inside a timed region, does not pay for it."""
    mode = _mode()
    kind = {"cpu": "cpu", "cuda": "cuda"}.get(torch.device(device).type)
    if mode != "torch" and kind is not None:
        load_extension(kind, strict=mode != "auto")
