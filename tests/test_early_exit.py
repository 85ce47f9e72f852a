"""Early exit that saves compute (issue 15): hard-exit decoding and LPLM training run each decoder
layer's queries, attention and FFN on the positions still in flight only, and LPLM runs the layers
its k permutations share once per document. They must compute what the implementation before
issue 15 computed, which examples/early_exit_reference.py keeps as the reference (`reference_*`,
also timed by examples/bench_early_exit.py and examples/bench_lplm.py --before).

Why outputs may differ at all: the new path multiplies the in-flight rows' queries (and, in LPLM,
the shared layers) in other matrix shapes than the old one, so states differ in the last float32
bits (~1e-7 relative); tokens and exit layers are compared exactly, scores, losses and gradients
within 1e-5 relative. With dropout > 0 (training only), the k permutations share the dropout masks
of the layers they share, where the old code drew one per permutation: same distribution per
permutation, other random draws; the comparisons here run with dropout 0.
"""
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from elmer_fairseq.models.elmer import layer_rows
from elmer_fairseq.ops import _ext
from fairseq import utils

from conftest import ROOT, cli_env, tiny_model
from test_lplm import Backward, corpus, lplm_task  # noqa: F401  (corpus: the LPLM fixture)

sys.path.insert(0, str(ROOT / "examples"))
from early_exit_reference import encoder_tensors, reference_decode, reference_lplm_terms  # noqa: E402

LAYERS = 4


# ------------------------------------------------------------------ the reference (before issue 15)

def reference_model(model):
    """`model` as the criterion calls it, with the reference LPLM decoder."""
    def forward(src_tokens, src_lengths, prev_output_tokens, tgt_tokens, exit_layers):
        encoder_out = model.encoder(src_tokens, src_lengths=src_lengths)
        return reference_lplm_terms(model, encoder_out, prev_output_tokens, tgt_tokens, exit_layers)

    return forward


# ------------------------------------------------------------------ one layer on a subset of rows

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def batch_of(task, size):
    """`size` test pairs; several have sources cut to different lengths, so that the encoder pads."""
    task.load_dataset("test")
    dataset = task.dataset("test")
    items = [dataset[i] for i in range(size)]
    for i, item in enumerate(items):
        cut = len(item["source"]) - 17 * i
        item["source"] = torch.cat([item["source"][:cut - 1], item["source"][-1:]])
    batch = dataset.collater(items)
    assert size == 1 or batch["net_input"]["src_tokens"].eq(task.source_dictionary.pad()).any()
    return batch


def encode(model, batch):
    net = batch["net_input"]
    return model.encoder(net["src_tokens"], src_lengths=net["src_lengths"])


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("size", [1, 4])
def test_layer_rows_equal_the_full_layer_at_those_rows(xsum_tiny, training, size):
    task, model = tiny_model(xsum_tiny, "hard", layers=LAYERS)  # dropout 0
    batch = batch_of(task, size)
    enc, enc_mask = encoder_tensors(encode(model, batch))
    model.train(training)
    gen = torch.Generator().manual_seed(size)
    x = torch.randn(7, size, 32, generator=gen, requires_grad=True)
    for layer in model.decoder.layers:
        full = layer(x, enc, enc_mask)[0].reshape(7 * size, 32)
        for rows in (torch.arange(7 * size), torch.tensor([0]), torch.randperm(7 * size, generator=gen)[:5].sort().values):
            assert torch.allclose(layer_rows(layer, x, rows, enc, enc_mask), full[rows], atol=1e-5, rtol=1e-5)
    if training:  # the gradients match as well, into the inputs (keys and values of every row) too
        rows = torch.tensor([1, 2, 6 * size])
        full_grad = torch.autograd.grad(layer(x, enc, enc_mask)[0].reshape(-1, 32)[rows].square().sum(), x)[0]
        part_grad = torch.autograd.grad(layer_rows(layer, x, rows, enc, enc_mask).square().sum(), x)[0]
        assert torch.allclose(part_grad, full_grad, atol=1e-5, rtol=1e-4)


def test_layer_rows_over_permutations_read_their_sequences_encoder_output(xsum_tiny):
    """x with k columns per sequence (LPLM): column b reads sequence b mod B's source."""
    task, model = tiny_model(xsum_tiny, "hard", layers=LAYERS)
    batch = batch_of(task, 3)
    encoder_out = encode(model, batch)
    k = 2
    repeated = model.encoder.reorder_encoder_out(encoder_out, torch.arange(3).repeat(k))
    x = torch.randn(5, 3 * k, 32)
    rows = torch.tensor([0, 4, 5, 8, 17, 29])
    layer = model.decoder.layers[1]
    full = layer(x, *encoder_tensors(repeated))[0].reshape(-1, 32)
    assert torch.allclose(layer_rows(layer, x, rows, *encoder_tensors(encoder_out)), full[rows], atol=1e-5)


# ------------------------------------------------------------------ decoding

def sharpened(model, factor=6.5):
    """Per-layer off-ramps scaled so that delta = 0.5 exits positions at several layers (an
    untrained model's entropies are all near log V)."""
    if model.decoder.off_ramps is not None:
        with torch.no_grad():
            for ramp in model.decoder.off_ramps:
                ramp.weight.mul_(factor)
    return model


@pytest.fixture(scope="module", params=[False, True], ids=["shared-ramp", "per-layer-ramps"])
def hard_model(xsum_tiny, request):
    task, model = tiny_model(xsum_tiny, "hard", layers=LAYERS, per_layer=request.param)
    return task, sharpened(model)


def median_entropy(model, encoder_out, length):
    """A delta at which about half of the positions exit at layer 1."""
    bsz = encoder_out["encoder_out"][0].size(1)
    x = model.decoder.embed(torch.full((bsz, length), model.decoder.mask_idx, device=encoder_out["encoder_out"][0].device))
    h = model.decoder.layers[0](x, *encoder_tensors(encoder_out))[0]
    log_p = torch.log_softmax(F.linear(h, model.decoder.off_ramp_weight(0)), -1)
    return torch.quantile(-(log_p.exp() * log_p).sum(-1).flatten(), 0.5).item()


def same_decoding(new, old):
    assert torch.equal(new.tokens, old.tokens)
    assert torch.equal(new.exit_layer, old.exit_layer)
    assert torch.allclose(new.scores, old.scores, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size", [1, 4])
@pytest.mark.parametrize("delta", [0.0, 0.5, math.inf, "median"])
def test_hard_exit_decodes_as_before(hard_model, size, delta):
    task, model = hard_model
    encoder_out = encode(model, batch_of(task, size))
    median = delta == "median"
    if median:
        delta = median_entropy(model, encoder_out, 12)
    new = model.decoder.decode(encoder_out, 12, delta)
    same_decoding(new, reference_decode(model.decoder, encoder_out, 12, delta))
    if delta == math.inf:
        assert new.exit_layer.eq(1).all()
    elif delta == 0:
        assert new.exit_layer.eq(LAYERS).all()
    elif median:  # some exit at layer 1, some later
        assert new.exit_layer.eq(1).any() and new.exit_layer.gt(1).any()


def test_delta_one_half_exits_at_several_layers_with_per_layer_ramps(xsum_tiny):
    """Guards the sharpening above: the fixed delta of the comparison does exercise mixed exits."""
    task, model = tiny_model(xsum_tiny, "hard", layers=LAYERS, per_layer=True)
    batch = batch_of(task, 4)
    out = sharpened(model).decoder.decode(encode(model, batch), 12, 0.5)
    assert len(out.exit_layer.unique()) >= 3


def schedules(size, length=12):
    gen = torch.Generator().manual_seed(size)
    half = torch.where(torch.rand(size, length, generator=gen) < 0.5, 1, LAYERS)
    uniform = torch.randint(1, LAYERS + 1, (size, length), generator=gen)
    one_left = torch.ones(size, length, dtype=torch.long)
    one_left[-1, -1] = LAYERS  # a single position in flight keeps every layer running
    return {"half-at-1": half, "uniform": uniform, "one-left": one_left}


@pytest.mark.parametrize("size", [1, 4])
@pytest.mark.parametrize("schedule", ["half-at-1", "uniform", "one-left"])
def test_forced_schedules_decode_as_before_and_run_the_in_flight_rows_only(hard_model, size, schedule):
    task, model = hard_model
    encoder_out = encode(model, batch_of(task, size))
    forced = schedules(size)[schedule]
    rows = []
    hooks = [layer.fc1.register_forward_hook(lambda m, i, o, l=l: rows.append((l, i[0].numel() // i[0].size(-1))))
             for l, layer in enumerate(model.decoder.layers)]
    try:
        new = model.decoder.decode(encoder_out, 12, 0.5, forced_exits=forced)
    finally:
        for hook in hooks:
            hook.remove()
    same_decoding(new, reference_decode(model.decoder, encoder_out, 12, 0.5, forced))
    assert torch.equal(new.exit_layer, forced)
    in_flight = [(l, int(forced.gt(l).sum())) for l in range(LAYERS) if forced.gt(l).any()]
    assert rows == in_flight


@pytest.mark.parametrize("backend, device", [
    ("torch", "cpu"), ("cpp", "cpu"),
    pytest.param("cuda", "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
])
def test_every_off_ramp_backend_decodes_as_before(xsum_tiny, monkeypatch, backend, device):
    """The reference, run with the same backend, is the old decode on that backend."""
    if backend == "cpp":
        try:
            _ext.load_extension("cpu")
        except RuntimeError as err:
            pytest.skip(f"the C++ off-ramp does not build here: {err}")
    monkeypatch.setenv("ELMER_OFF_RAMP", backend)
    task, model = tiny_model(xsum_tiny, "hard", layers=LAYERS, per_layer=True)
    model = sharpened(model).to(device)
    batch = utils.move_to_cuda(batch_of(task, 4)) if device == "cuda" else batch_of(task, 4)
    encoder_out = encode(model, batch)
    forced = schedules(4)["uniform"].to(device)
    for delta, schedule in ((0.5, None), (median_entropy(model, encoder_out, 12), None), (0.5, forced)):
        new = model.decoder.decode(encoder_out, 12, delta, forced_exits=schedule)
        same_decoding(new, reference_decode(model.decoder, encoder_out, 12, delta, schedule))


@pytest.mark.parametrize("per_layer", [False, True])
@pytest.mark.parametrize("size", [1, 4])
def test_soft_exit_decodes_as_before(xsum_tiny, per_layer, size):
    task, model = tiny_model(xsum_tiny, "soft", layers=LAYERS, per_layer=per_layer)
    encoder_out = encode(model, batch_of(task, size))
    same_decoding(model.decoder.decode(encoder_out, 12), reference_decode(model.decoder, encoder_out, 12))


@pytest.mark.parametrize("forced, needle", [
    (torch.ones(2, 12, dtype=torch.long), "forced_exits must be [B, T] = [4, 12]"),
    (torch.zeros(4, 12, dtype=torch.long), "exit layers in 1..4"),
    (torch.full((4, 12), LAYERS + 1), "exit layers in 1..4"),
])
def test_a_forced_schedule_that_makes_no_sense_is_refused(hard_model, forced, needle):
    task, model = hard_model
    with pytest.raises(ValueError) as err:
        model.decoder.decode(encode(model, batch_of(task, 4)), 12, 0.5, forced_exits=forced)
    assert needle in str(err.value)


@pytest.mark.parametrize("delta", [-0.1, math.nan])
def test_a_negative_or_nan_delta_is_refused(hard_model, delta):
    task, model = hard_model
    with pytest.raises(ValueError, match="--exit-threshold must be >= 0"):
        model.decoder.decode(encode(model, batch_of(task, 4)), 12, delta)


# ------------------------------------------------------------------ LPLM training

@pytest.fixture(scope="module", params=[False, True], ids=["shared-ramp", "per-layer-ramps"])
def lplm_setup(corpus, request):  # noqa: F811
    """A tiny LPLM model (1+3 layers, dropout 0) and 4 documents."""
    args, task = lplm_task(corpus, *(["--per-layer-off-ramps"] if request.param else []))
    torch.manual_seed(0)
    model = task.build_model(args)
    task.load_dataset("valid")
    dataset = task.dataset("valid")
    return task, model, task.build_criterion(args), dataset.collater([dataset[i] for i in range(4)])


def gradients(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def lplm_step(task, model, criterion, batch, k, chunk=0):
    task.cfg.lplm_permutations, task.cfg.lplm_chunk = k, chunk
    model.zero_grad(set_to_none=True)
    loss, _, _ = task.train_step({**batch, "net_input": dict(batch["net_input"])}, model, criterion, Backward, 0)
    return loss.detach(), gradients(model)


def reference_step(task, model, criterion, batch, k):
    task.cfg.lplm_permutations = k
    model.train()
    model.zero_grad(set_to_none=True)
    exit_layers = task.document_exit_layers(batch, model, 0)  # what train_step draws at update 0
    loss, _, _ = criterion(reference_model(model), {**batch, "net_input": {**batch["net_input"], "exit_layers": exit_layers}})
    loss.backward()
    return loss.detach(), gradients(model)


def float64_softmax(monkeypatch):
    """Attention softmaxes in float64 for float64 inputs. fairseq's (utils.softmax) and ours
    (models.elmer.attend) compute in float32 whatever the input: in a float64 comparison that
    rounding (~1e-7 of each attention weight) would be the only noise left, and in the nearly
    cancelling key-projection gradients it is a large share of the result, so whether a bound
    holds would depend on the machine's BLAS, not on the code."""
    real = torch.nn.functional.softmax

    def softmax(x, dim=None, _stacklevel=3, dtype=None):
        return real(x, dim=dim, dtype=torch.float64 if x.dtype == torch.float64 else dtype)

    monkeypatch.setattr(torch.nn.functional, "softmax", softmax)


@pytest.mark.parametrize("k, chunk", [(1, 0), (3, 0), (3, 2), (10, 0), (10, 4), (10, 1)])
def test_lplm_loss_and_gradients_equal_the_reference(lplm_setup, k, chunk, monkeypatch):
    """In float64 (attention softmax too: float64_softmax) every parameter's gradient equals the
    reference's to 1e-6 relative (measured: <= 2e-8 with the softmax in float64, up to 1.2e-5 in
    the self-attention projections with fairseq's float32 softmax), except the key projections' biases, whose gradient is 0 in
    exact arithmetic (a bias shifts all of a query's scores alike): there both sides are
    rounding noise, checked to be ~0. In float32 some gradients (the key projections') are sums
    that nearly cancel, with ~1e-5 relative noise of their own; the whole gradient agrees to 1e-5."""
    task, model, criterion, batch = lplm_setup
    results = {}
    try:
        for dtype in (torch.float64, torch.float32):
            model.to(dtype)
            with monkeypatch.context() as patch:
                if dtype == torch.float64:
                    float64_softmax(patch)
                results[dtype] = (reference_step(task, model, criterion, batch, k),
                                  lplm_step(task, model, criterion, batch, k, chunk))
    finally:
        task.cfg.lplm_permutations, task.cfg.lplm_chunk = 3, 0
        model.float()
    for dtype, ((ref_loss, ref_grads), (loss, grads)) in results.items():
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
        assert grads.keys() == ref_grads.keys()
        flat, ref_flat = (torch.cat([g[n].flatten() for n in sorted(ref_grads)]) for g in (grads, ref_grads))
        assert (flat - ref_flat).norm() <= 1e-5 * ref_flat.norm()
        if dtype == torch.float64:
            for name, ref in ref_grads.items():
                if name.endswith("k_proj.bias"):
                    assert max(ref.norm(), grads[name].norm()) <= 1e-6 * ref_flat.norm(), name
                else:
                    assert (grads[name] - ref).norm() <= 1e-6 * ref.norm(), name


@pytest.mark.parametrize("k", [1, 3])
def test_lplm_runs_the_first_layer_once_per_document_and_frozen_rows_nowhere(lplm_setup, k):
    task, model, criterion, batch = lplm_setup
    task.cfg.lplm_permutations = k
    exit_layers = task.document_exit_layers(batch, model, 0)
    rows = []
    hooks = [layer.fc1.register_forward_hook(lambda m, i, o, l=l: rows.append((l, i[0].numel() // i[0].size(-1))))
             for l, layer in enumerate(model.decoder.layers)]
    try:
        lplm_step(task, model, criterion, batch, k)
    finally:
        for hook in hooks:
            hook.remove()
        task.cfg.lplm_permutations = 3
    assert rows == [(l, int(exit_layers.gt(l).sum()) // (k if l == 0 else 1)) for l in range(3)]


# ------------------------------------------------------------------ the benchmark runs

def test_the_benchmark_prints_both_tables_and_writes_its_plot(tmp_path):
    png = tmp_path / "plot.png"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "bench_early_exit.py"), "--arch", "elmer_tiny", "--vocab", "300",
         "--length", "6", "--source-length", "6", "--batches", "1", "2", "--shares", "0", "0.5", "--repeats", "1",
         "--warmup", "0", "--png", str(png), "--lplm-length", "8", "--lplm-steps", "1"],
        capture_output=True, text=True, env=cli_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("| share exiting at layer 1 |") == 2 and "| 0.50 | 2.00 |" in proc.stdout
    assert "| k | before: step ms" in proc.stdout and "\n| 10 |" in proc.stdout
    assert png.stat().st_size > 0


def test_the_benchmark_refuses_a_share_outside_0_1():
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "bench_early_exit.py"), "--shares", "0.5", "1.5"],
                          capture_output=True, text=True, env=cli_env(), cwd=ROOT)
    assert proc.returncode != 0 and "--shares: each share must be in [0, 1], got 1.5" in proc.stderr
