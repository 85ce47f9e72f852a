"""The fused off-ramp (csrc/) against its specification, `off_ramp_reference`.

The C++ path runs on every machine; the CUDA kernel where a GPU is present. Each result is checked
twice. (1) The reduction, tightly: against a float64 oracle over the very logits the extension
computes (`chunk_logits`), in every dtype: token exact (the lowest index among exact ties), prob and
entropy to REDUCTION. (2) Against `off_ramp_reference`, up to the rounding of the logits: the
chunked matmuls may round a logit differently from the reference's single matmul, by up to
u = LOGIT_ROUNDING[dtype] * max|logit| of the row; so the token may differ only where the
reference's top-2 logits are within 2u, log prob by 2u, entropy by 3uH; the state is exact.
"""
import math
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from elmer_fairseq.ops import _ext
from elmer_fairseq.ops.off_ramp import off_ramp_reference

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


def extension(device, hidden, weight, threshold, index=None, state=None, chunk=0):
    out = ext_for(device).off_ramp(hidden, weight, threshold, index, state, chunk)
    return _ext.OffRampOutput(*_ext.unwrap(out))


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


def check(out, hidden, weight, threshold, index=None, state=None, chunk=0):
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
    assert torch.equal(out.exit, out.entropy < threshold)

    # (2) the specification, up to the rounding of the logits
    ref = off_ramp_reference(hidden, weight, threshold, index, state)
    logits = (rows @ weight.t()).float()
    u = LOGIT_ROUNDING[hidden.dtype] * logits.abs().amax(dim=-1).clamp_min(1.0).double()
    top = logits.max(dim=-1).values
    ours = logits.gather(1, out.token[:, None]).squeeze(1)
    assert ((top - ours).double() <= 2 * u).all(), "argmax differs beyond the logits' rounding"
    assert ((out.prob.double().log() - ref.prob.double().log()).abs() <= 2 * u + 1e-4).all()
    _, _, ref_entropy = oracle(logits)  # (the reference's own entropy: test_reference_entropy)
    assert ((out.entropy.double() - ref_entropy).abs() <= (3 * u + 1e-4) * ref_entropy + 1e-5).all()
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
def test_all_or_none_exit(device, dtype, threshold, expect):
    hidden, weight = make(40, 24, 500, dtype, device, seed=3)
    index, state = subset(40, 30, device), torch.randn(40, 24).to(device, dtype)
    out = extension(device, hidden, weight, threshold, index, state, chunk=128)
    check(out, hidden, weight, threshold, index, state, 128)
    assert bool(out.exit.all()) if expect else not out.exit.any()


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
                      ((h.double(), w.double(), 1.0), "float32, bfloat16 or float16")]:
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
    for device in ["cpu"] + (["cuda"] if HAS_CUDA else []):
        hidden, weight = make(m, d, v, dtype, device, seed=seed)
        index = subset(m, (seed % (m + 1)), device, seed) if use_index else None
        state = torch.randn(m, d).to(device, dtype) if use_state else None
        out = extension(device, hidden, weight, threshold, index, state, chunk)
        check(out, hidden, weight, threshold, index, state, chunk)


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
