"""The fused off-ramp (csrc/) against its specification, `off_ramp_reference`.

The C++ path runs on every machine; the CUDA kernel where a GPU is present. Each result is checked
twice. (1) The reduction, tightly: against a float64 oracle over the very logits the extension
computes (`chunk_logits`), in every dtype: token exact (the lowest index among exact ties), prob and
entropy to REDUCTION. (2) Against `off_ramp_reference`, up to the rounding of the logits: the
chunked matmuls may round a logit differently from the reference's single matmul, by up to
u = LOGIT_ROUNDING[dtype] * max|logit| of the row; so the token may differ only where the
reference's top-2 logits are within 2u, log prob by 2u, entropy by 3uH; the state is exact.
The exit mask follows the rule named by `signal` ("entropy": entropy < threshold; "max_prob":
1 - prob < threshold) exactly on the extension's own entropy / prob, and the reference's decision
wherever the reference's value is further from the threshold than that rounding.
The C++ path runs its AVX2 sweeps where the CPU has them, and is also tested with its scalar
sweeps, which is what a CPU without AVX2 + FMA runs, and with the vocabulary split into runs of
blocks merged at the end, which is what it does with several threads (`CPU_PATHS`).
"""
import contextlib
import math
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from elmer_fairseq import exit_policy
from elmer_fairseq.ops import _ext
from elmer_fairseq.ops.off_ramp import SIGNALS, off_ramp_reference

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device: the CUDA kernel is tested on GPU machines only")
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

REDUCTION = dict(rtol=1e-4, atol=1e-5)  # every dtype: the reductions are float32
LOGIT_ROUNDING = {  # relative difference between two matmuls' logits: fp32 accumulation order; 2 ulps
    torch.float32: 1e-5,
    torch.bfloat16: 2.0**-6,
    torch.float16: 2.0**-9,
}


def ext_for(device):
    return _ext.load_extension("cuda" if str(device).startswith("cuda") else "cpu")


def extension(device, hidden, weight, threshold, index=None, state=None, chunk=0, signal=None):
    # signal=None: the binding's default ("entropy"), as callers from before the argument get it
    extra = () if signal is None else (signal,)
    out = ext_for(device).off_ramp(hidden, weight, threshold, index, state, chunk, *extra)
    return _ext.OffRampOutput(*_ext.unwrap(out))


# the C++ path's variants: (AVX2 sweeps, runs of blocks it splits the vocabulary into; 0: one per
# thread). A split of 3 runs the per-thread runs and their merge even on one thread.
CPU_PATHS = {"simd": (1, 0), "scalar": (0, 0), "simd-split3": (1, 3)}


@contextlib.contextmanager
def cpu_path(name):
    ext = _ext.load_extension("cpu")
    simd, split = CPU_PATHS[name]
    if simd and not ext.cpu_simd():
        pytest.skip("this CPU has no AVX2 + FMA: the C++ path runs its scalar sweeps only")
    ext.cpu_simd(simd)
    ext.cpu_split(split)
    try:
        yield name
    finally:
        ext.cpu_simd(1)
        ext.cpu_split(0)


@pytest.fixture(params=list(CPU_PATHS))
def cpu_variant(request):
    """Runs a test with each variant of the C++ path: AVX2 or scalar sweeps, split or not."""
    with cpu_path(request.param) as name:
        yield name


def paths(device):
    return list(CPU_PATHS) if device == "cpu" else [None]


def make(m, d, v, dtype, device, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(m, d, generator=g)
    weight = torch.randn(v, d, generator=g) * (scale / math.sqrt(max(d, 1)))
    return hidden.to(device, dtype), weight.to(device, dtype)


def oracle(logits):
    """token, prob, entropy of float64 softmax over `logits`."""
    log_p = torch.log_softmax(logits.double(), dim=-1)
    log_prob, token = log_p.max(dim=-1)
    return token, log_prob.exp(), (-(log_p.exp() * log_p).sum(dim=-1)).clamp_min(0.0)


def rule(signal, entropy, prob, threshold):
    """The exit rule as models/elmer.py applied it outside the op (exit_policy), in float32."""
    return exit_policy.exits(exit_policy.uncertainty(signal or "entropy", entropy, prob), threshold)


def check(out, hidden, weight, threshold, index=None, state=None, chunk=0, signal=None):
    """Compare `out` with the oracle over the extension's own logits and with the reference."""
    rows = hidden if index is None else hidden.index_select(0, index)
    n = rows.shape[0]
    assert out.token.dtype == torch.int64 and out.token.shape == (n,)
    assert out.prob.dtype == torch.float32 and out.prob.shape == (n,)
    assert out.entropy.dtype == torch.float32 and out.entropy.shape == (n,)
    assert out.exit.dtype == torch.bool and out.exit.shape == (n,)
    assert out.token.device == hidden.device

    # (1) the reduction, on exactly the logits it reduced
    token, prob, entropy = oracle(_ext.unwrap(ext_for(hidden.device).chunk_logits(hidden, weight, index, chunk)))
    assert torch.equal(out.token, token)
    torch.testing.assert_close(out.prob, prob.float(), **REDUCTION)
    torch.testing.assert_close(out.entropy, entropy.float(), **REDUCTION)
    assert torch.equal(out.exit, rule(signal, out.entropy, out.prob, threshold))

    # (2) the specification, up to the rounding of the logits
    ref = off_ramp_reference(hidden, weight, threshold, index, state, signal or "entropy")
    logits = (rows @ weight.t()).float()
    u = LOGIT_ROUNDING[hidden.dtype] * logits.abs().amax(dim=-1).clamp_min(1.0).double()
    top = logits.max(dim=-1).values
    ours = logits.gather(1, out.token[:, None]).squeeze(1)
    assert ((top - ours).double() <= 2 * u).all(), "argmax differs beyond the logits' rounding"
    assert ((out.prob.double().log() - ref.prob.double().log()).abs() <= 2 * u + 1e-4).all()
    _, _, ref_entropy = oracle(logits)  # (the reference's own entropy: test_reference_entropy)
    assert ((out.entropy.double() - ref_entropy).abs() <= (3 * u + 1e-4) * ref_entropy + 1e-5).all()
    if signal == "max_prob":
        ref_prob = ref.prob.double()
        away = ((1 - ref_prob) - threshold).abs() > (2 * u + 1e-4) * ref_prob + 1e-6
        assert torch.equal(out.exit[away], ((1 - ref_prob) < threshold)[away])
    else:
        away = (ref_entropy - threshold).abs() > (3 * u + 1e-4) * ref_entropy + 1e-5
        assert torch.equal(out.exit[away], (ref_entropy < threshold)[away])
    if state is None:
        assert out.state is None
    else:
        assert out.state.dtype == state.dtype and out.state.shape == state.shape
        assert torch.equal(out.state, ref.state)
        if state.numel():
            assert out.state.data_ptr() not in (state.data_ptr(), hidden.data_ptr())
    return ref


def subset(m, n, device, seed=0):
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randperm(m, generator=g)[:n].to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("chunk", [0, 64, 333])  # 0: automatic; 333: odd, not a multiple of 8
@pytest.mark.parametrize("v", [100, 1000])  # 100: less than one chunk; 1000: ragged last chunk
@pytest.mark.parametrize("d", [16, 96])
@pytest.mark.parametrize("n", [0, 1, 7, 300])
@pytest.mark.parametrize("rows", ["all", "subset"])
@pytest.mark.parametrize("with_state", [False, True])
def test_grid(device, dtype, chunk, v, d, n, rows, with_state):
    m = n if rows == "all" else n + 5
    hidden, weight = make(m, d, v, dtype, device, seed=n * 7 + d + v)
    index = None if rows == "all" else subset(m, n, device)
    state = torch.randn(m, d).to(device, dtype) if with_state else None
    inputs = [t.clone() for t in (hidden, weight, state) if t is not None]
    out = extension(device, hidden, weight, 2.0, index, state, chunk)
    check(out, hidden, weight, 2.0, index, state, chunk)
    assert all(torch.equal(a, b) for a, b in zip(inputs, [t for t in (hidden, weight, state) if t is not None]))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "device,d,v,chunk",
    [("cpu", 16, 300, 128), pytest.param("cuda", 768, 50265, 0, marks=needs_cuda),
     pytest.param("cuda", 256, 5000, 1024, marks=needs_cuda)],
)
def test_many_rows(device, dtype, d, v, chunk):
    m = 4096 + 100
    hidden, weight = make(m, d, v, dtype, device, seed=4096)
    index, state = subset(m, 4096, device), torch.randn(m, d).to(device, dtype)
    check(extension(device, hidden, weight, 3.0, index, state, chunk), hidden, weight, 3.0, index, state, chunk)
    check(extension(device, hidden, weight, 3.0, None, None, chunk), hidden, weight, 3.0, None, None, chunk)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("chunk", [0, 64, 7])
def test_ties_take_the_lowest_index(device, dtype, chunk):
    # integer data: every logit is exact in every dtype and every summation order
    g = torch.Generator().manual_seed(5)
    v, d = 200, 32
    weight = torch.randint(-1, 2, (v, d), generator=g).float()
    winners = [5, 6, 70, 71, 128, v - 1]  # inside one chunk and across chunk boundaries
    weight[winners] = 2.0
    hidden = torch.randint(1, 3, (9, d), generator=g).float()
    hidden, weight = hidden.to(device, dtype), weight.to(device, dtype)
    out = extension(device, hidden, weight, 1.0, chunk=chunk)
    ref = check(out, hidden, weight, 1.0, chunk=chunk)
    assert (ref.token == 5).all() and (out.token == 5).all()
    torch.testing.assert_close(out.prob, torch.full_like(out.prob, 1 / len(winners)))
    # a tie whose first copy sits in a later chunk than an earlier, smaller maximum
    weight2 = weight.clone()
    weight2[winners[:2]] = 0
    out = extension(device, hidden, weight2, 1.0, chunk=chunk)
    check(out, hidden, weight2, 1.0, chunk=chunk)
    assert (out.token == 70).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("threshold,expect", [(math.inf, True), (0.0, False), (-1.0, False)])
@pytest.mark.parametrize("signal", [None, "entropy", "max_prob"])
def test_all_or_none_exit(device, dtype, threshold, expect, signal):
    hidden, weight = make(40, 24, 500, dtype, device, seed=3)
    index, state = subset(40, 30, device), torch.randn(40, 24).to(device, dtype)
    out = extension(device, hidden, weight, threshold, index, state, chunk=128, signal=signal)
    check(out, hidden, weight, threshold, index, state, 128, signal)
    assert bool(out.exit.all()) if expect else not out.exit.any()


def spread(m, d, v, dtype, device, seed=0):
    """Rows whose top-1 probabilities span (0, 1): the hidden rows scaled from 0.05 to 20."""
    hidden, weight = make(m, d, v, torch.float32, device, seed=seed)
    scale = torch.logspace(math.log10(0.05), math.log10(20.0), m, device=device)[:, None]
    return (hidden * scale).to(dtype), weight.to(dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("chunk", [0, 333])
@pytest.mark.parametrize("threshold", [0.05, 0.5, 0.95])
@pytest.mark.parametrize("rows", ["all", "subset"])
def test_max_prob_rule(device, dtype, chunk, threshold, rows):
    """The fused max-prob rule: exit where 1 - prob < threshold, as exit_policy decides it."""
    m = 300
    hidden, weight = spread(m, 32, 1000, dtype, device, seed=11)
    index = None if rows == "all" else subset(m, 200, device)
    state = torch.randn(m, 32).to(device, dtype)
    out = extension(device, hidden, weight, threshold, index, state, chunk, signal="max_prob")
    check(out, hidden, weight, threshold, index, state, chunk, "max_prob")
    assert out.exit.any() and not out.exit.all()  # the rows do straddle the threshold
    # the same op under the entropy rule differs only in `exit`
    other = extension(device, hidden, weight, threshold, index, state, chunk, signal="entropy")
    for name in ("token", "prob", "entropy", "state"):
        assert torch.equal(getattr(out, name), getattr(other, name)), name
    assert torch.equal(other.exit, other.entropy < threshold)
    assert not torch.equal(out.exit, other.exit)


@pytest.mark.parametrize("signal", SIGNALS)
def test_max_prob_rule_cpu_sweeps(cpu_variant, signal):
    hidden, weight = spread(120, 24, 700, torch.float32, "cpu", seed=13)
    for chunk in (0, 1, 8, 31, 333):
        out = extension("cpu", hidden, weight, 0.4, None, None, chunk, signal=signal)
        check(out, hidden, weight, 0.4, None, None, chunk, signal)


def test_signals_are_exit_policys():
    assert tuple(SIGNALS) == tuple(exit_policy.SIGNALS)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_and_tiny(device):
    hidden, weight = make(6, 8, 1, torch.float32, device)
    out = extension(device, hidden, weight, 0.5)  # V = 1: prob 1, entropy 0
    check(out, hidden, weight, 0.5)
    assert (out.prob == 1).all() and (out.entropy == 0).all() and out.exit.all()
    state = torch.randn(6, 8, device=device)
    empty = torch.empty(0, dtype=torch.long, device=device)
    out = extension(device, hidden, weight, 0.5, empty, state)  # N = 0: state copied as is
    check(out, hidden, weight, 0.5, empty, state)
    nothing = torch.empty(0, 8, device=device)
    check(extension(device, nothing, weight, 0.5, None, nothing), nothing, weight, 0.5, None, nothing)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_inputs(device):
    big_h, big_w = make(30, 40, 300, torch.float32, device, seed=9)
    hidden, weight = big_h[::2, :32], big_w[:, 4:36]  # neither contiguous
    state = torch.randn(32, 15, device=device).t()
    index = torch.tensor([3, 0, 14, 7], device=device)
    check(extension(device, hidden, weight, 2.0, index, state, chunk=64), hidden, weight, 2.0, index, state, 64)


@pytest.mark.parametrize("device", DEVICES)
def test_argument_errors(device, monkeypatch):
    monkeypatch.setenv("ELMER_OFF_RAMP", "cuda" if device == "cuda" else "cpp")
    hidden, weight = make(4, 8, 10, torch.float32, device)
    bad = [
        (ValueError, "weight \\[V >= 1, d\\]", (hidden, weight[:, :4], 1.0)),
        (ValueError, "weight is torch.float16", (hidden, weight.half(), 1.0)),
        (ValueError, "index must be \\[N\\] int64", (hidden, weight, 1.0, torch.tensor([0], dtype=torch.int32, device=device))),
        (ValueError, "state must have", (hidden, weight, 1.0, None, hidden[:2])),
    ]
    with pytest.raises(ValueError, match="signal must be one of entropy, max_prob"):
        _ext.off_ramp(hidden, weight, 1.0, signal="max-prob")
    with pytest.raises(ValueError, match="signal must be one of"):
        off_ramp_reference(hidden, weight, 1.0, signal="margin")
    if device == "cpu":  # on CUDA, the bounds check is a device assert (as in the reference)
        bad.append((IndexError, "out of range", (hidden, weight, 1.0, torch.tensor([4]))))
    for error, message, args in bad:
        with pytest.raises(error, match=message):
            _ext.off_ramp(*args)


_CPP_CHECKS = """
import sys, torch
from elmer_fairseq.ops import _ext
ext, device = _ext.load_extension(sys.argv[1]), sys.argv[2]
h, w = torch.randn(4, 8, device=device), torch.randn(10, 8, device=device)
for args, message in [((h, w[:, :4].contiguous(), 1.0), "same d"), ((h, w.half(), 1.0), "weight dtype"),
                      ((h, w, 1.0, torch.tensor([0], dtype=torch.int32, device=device)), "index must be int64"),
                      ((h, w, 1.0, None, h[:2]), "state must have"),
                      ((h.double(), w.double(), 1.0), "float32, bfloat16 or float16"),
                      ((h, w, 1.0, None, None, 0, "maxprob"), "signal must be")]:
    error, out = ext.off_ramp(*args)
    assert out is None and message in error, (message, error)
print("ok")
"""


@pytest.mark.parametrize("device", DEVICES)
def test_cpp_argument_checks(device):
    """The binding's own checks, returned as messages; in a subprocess, because a C++ exception
    inside the extension killed the whole process on the H100 machine (torch 2.11, g++ 13)."""
    kind = "cuda" if device == "cuda" else "cpu"
    _ext.load_extension(kind)  # built and cached
    done = subprocess.run([sys.executable, "-c", _CPP_CHECKS, kind, device], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "ok" in done.stdout, f"rc {done.returncode}: {done.stderr[-3000:]}"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    m=st.integers(0, 40), d=st.integers(1, 40), v=st.integers(1, 300), chunk=st.integers(0, 320),
    dtype=st.sampled_from(DTYPES), use_index=st.booleans(), use_state=st.booleans(),
    threshold=st.sampled_from([0.0, 0.5, 2.0, math.inf]), seed=st.integers(0, 2**16),
)
def test_fuzz(m, d, v, chunk, dtype, use_index, use_state, threshold, seed):
    signal = SIGNALS[seed % 2]
    for device in ["cpu"] + (["cuda"] if HAS_CUDA else []):
        for path in paths(device):
            with cpu_path(path) if path else contextlib.nullcontext():
                hidden, weight = make(m, d, v, dtype, device, seed=seed)
                index = subset(m, (seed % (m + 1)), device, seed) if use_index else None
                state = torch.randn(m, d).to(device, dtype) if use_state else None
                out = extension(device, hidden, weight, threshold, index, state, chunk, signal)
                check(out, hidden, weight, threshold, index, state, chunk, signal)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 12), d=st.integers(1, 6), v=st.integers(1, 700), chunk=st.integers(0, 300),
    seed=st.integers(0, 2**16),
)
def test_fuzz_ties(n, d, v, chunk, seed):
    """Integer logits in [-d, d]: exact in every dtype and every order, so ties are everywhere, within
    a vector, across the AVX2 sweep's accumulators and lanes, in its scalar tail, across blocks."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randint(0, 2, (n, d), generator=g).float()
    weight = torch.randint(-1, 2, (v, d), generator=g).float()
    logits = hidden @ weight.t()
    for device in ["cpu"] + (["cuda"] if HAS_CUDA else []):
        for path in paths(device):
            with cpu_path(path) if path else contextlib.nullcontext():
                h, w = hidden.to(device), weight.to(device)
                out = extension(device, h, w, 1.0, None, None, chunk)
                check(out, h, w, 1.0, None, None, chunk)
                assert torch.equal(out.token.cpu(), logits.argmax(dim=-1))  # the first maximum


@pytest.mark.parametrize("n", [0, 1, 33])
def test_benchmark_size_automatic_blocks(cpu_variant, n):
    """d = 384, V = 21,600 (the warm BoolQ model): V is no multiple of the automatic block."""
    hidden, weight = make(n + 3, 384, 21600, torch.float32, "cpu", seed=n)
    index, state = subset(n + 3, n, "cpu"), torch.randn(n + 3, 384)
    c = ext_for("cpu").chunk_columns(0, n, 21600, 4, False)
    assert 21600 % c or n <= 1
    for signal in SIGNALS:
        out = extension("cpu", hidden, weight, 0.5, index, state, 0, signal)
        check(out, hidden, weight, 0.5, index, state, 0, signal)


def test_cpu_blocks_fit_the_budget():
    ext = ext_for("cpu")
    budget = 256 * 1024
    for n in (0, 1, 32, 128, 512, 4096):
        for v, elem in ((21600, 4), (50265, 2), (100, 4)):
            c = ext.chunk_columns(0, n, v, elem, False)
            assert 1 <= c <= v and (c == v or c % 64 == 0)
            assert c == v or c == 256 or max(n, 1) * c * elem <= budget
            assert c >= min(v, 256)
    assert ext.chunk_columns(7, 32, 21600, 4, False) == 7  # an explicit chunk is taken as is


def test_huge_logits_underflow(cpu_variant):
    """Logits 1e3 apart: exp(l - m) underflows to 0 (the sweep's cut at -87.3), prob 1, entropy 0."""
    hidden, weight = make(20, 16, 300, torch.float32, "cpu", seed=2, scale=3000.0)
    for signal in SIGNALS:
        out = extension("cpu", hidden, weight, 0.5, None, None, 64, signal)
        check(out, hidden, weight, 0.5, None, None, 64, signal)


# ---- the loader -----------------------------------------------------------------------------


@pytest.fixture
def fresh_loader(monkeypatch):
    monkeypatch.setattr(_ext, "_loaded", {})
    monkeypatch.setattr(_ext, "_warned", set())
    monkeypatch.delenv("ELMER_OFF_RAMP", raising=False)
    return monkeypatch


def _failing_build(kind):
    raise RuntimeError("simulated compile error")


def _same_as_reference(out, ref):
    for a, b in zip(out, ref):
        assert (a is None and b is None) or torch.equal(a, b)


def test_failed_build_falls_back_with_one_warning(fresh_loader):
    fresh_loader.setattr(_ext, "_build", _failing_build)
    hidden, weight = make(10, 8, 50, torch.float32, "cpu")
    state, index = torch.randn(10, 8), torch.tensor([1, 4])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [_ext.off_ramp(hidden, weight, 1.0, index, state) for _ in range(3)]
    fallbacks = [w for w in caught if issubclass(w.category, _ext.OffRampFallbackWarning)]
    assert len(fallbacks) == 1 and "simulated compile error" in str(fallbacks[0].message)
    for out in outs:
        _same_as_reference(out, off_ramp_reference(hidden, weight, 1.0, index, state))


def test_torch_mode_never_builds(fresh_loader):
    fresh_loader.setattr(_ext, "_build", _failing_build)
    fresh_loader.setenv("ELMER_OFF_RAMP", "torch")
    hidden, weight = make(10, 8, 50, torch.bfloat16, "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = _ext.off_ramp(hidden, weight, 1.0)
    _same_as_reference(out, off_ramp_reference(hidden, weight, 1.0))
    assert _ext._loaded == {}


def test_forced_modes_fail_loudly(fresh_loader):
    fresh_loader.setattr(_ext, "_build", _failing_build)
    hidden, weight = make(10, 8, 50, torch.float32, "cpu")
    fresh_loader.setenv("ELMER_OFF_RAMP", "cpp")
    with pytest.raises(RuntimeError, match="could not be built.*simulated compile error"):
        _ext.off_ramp(hidden, weight, 1.0)
    fresh_loader.setenv("ELMER_OFF_RAMP", "cuda")
    with pytest.raises(ValueError, match="ELMER_OFF_RAMP=cuda but .* on cpu"):
        _ext.off_ramp(hidden, weight, 1.0)
    fresh_loader.setenv("ELMER_OFF_RAMP", "fast")
    with pytest.raises(ValueError, match="ELMER_OFF_RAMP must be one of"):
        _ext.off_ramp(hidden, weight, 1.0)


def test_autograd_uses_the_reference(fresh_loader):
    fresh_loader.setattr(_ext, "_build", _failing_build)
    hidden, weight = make(6, 8, 50, torch.float32, "cpu")
    hidden.requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the build is not even tried
        out = _ext.off_ramp(hidden, weight, 1.0)
    assert out.prob.requires_grad
    out.prob.sum().backward()
    assert hidden.grad is not None


def test_auto_mode_uses_the_extension(fresh_loader):
    hidden, weight = make(12, 8, 90, torch.float32, "cpu")
    fresh_loader.setenv("ELMER_OFF_RAMP_CHUNK", "32")
    check(_ext.off_ramp(hidden, weight, 2.0), hidden, weight, 2.0, chunk=32)
    assert not isinstance(_ext._loaded["cpu"], Exception)
    hidden, weight = spread(30, 8, 90, torch.float32, "cpu")
    for index, state in [(None, None), (torch.tensor([4, 0, 29]), torch.randn(30, 8))]:
        out = _ext.off_ramp(hidden, weight, 0.5, index, state, signal="max_prob")
        check(out, hidden, weight, 0.5, index, state, 32, "max_prob")


@pytest.mark.parametrize("mode", ["auto", "torch"])
def test_max_prob_rule_in_every_mode(fresh_loader, mode):
    """`signal` reaches whichever implementation runs (extension, reference, autograd's reference);
    positional callers from before it keep the entropy rule."""
    fresh_loader.setenv("ELMER_OFF_RAMP", mode)
    hidden, weight = spread(30, 8, 90, torch.float32, "cpu", seed=4)
    index, state = torch.tensor([4, 0, 29, 7]), torch.randn(30, 8)
    for threshold in (0.1, 0.6, 0.9):
        for signal in SIGNALS:
            out = _ext.off_ramp(hidden, weight, threshold, index, state, signal)
            ref = off_ramp_reference(hidden, weight, threshold, index, state, signal=signal)
            assert torch.equal(out.exit, rule(signal, out.entropy, out.prob, threshold))
            assert torch.equal(out.exit, ref.exit)
        positional = _ext.off_ramp(hidden, weight, threshold, index, state)
        assert torch.equal(positional.exit, positional.entropy < threshold)
    grad_hidden = hidden.clone().requires_grad_()
    out = _ext.off_ramp(grad_hidden, weight, 0.6, signal="max_prob")
    assert out.prob.requires_grad and torch.equal(out.exit, (1 - out.prob.detach()) < 0.6)


def test_builder_lock_clears_a_stale_lock(tmp_path):
    (tmp_path / "lock").write_text("")  # what a killed torch build leaves behind
    with _ext.builder_lock(tmp_path):
        assert not (tmp_path / "lock").exists()


def test_stale_lock_does_not_hang_the_next_run():
    _ext.load_extension("cpu")  # built and cached
    build_dir = _ext._build_dir("cpu", _ext.csrc_dir())
    (build_dir / "lock").write_text("")
    code = "from elmer_fairseq.ops import _ext; print(_ext.load_extension('cpu').with_cuda)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (build_dir / "lock").exists()


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_cuda_source_compiles_without_torch(tmp_path):
    src = _ext.csrc_dir() / "off_ramp_kernel.cu"
    done = subprocess.run(["nvcc", "-std=c++17", "-c", str(src), "-o", str(tmp_path / "k.o")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_reference_entropy():
    """The specification's entropy equals the softmax entropy (float64 oracle)."""
    hidden, weight = make(20, 16, 300, torch.float32, "cpu")
    ref = off_ramp_reference(hidden, weight, 1.0)
    torch.testing.assert_close(ref.entropy, oracle(hidden @ weight.t())[2].float(), **REDUCTION)
