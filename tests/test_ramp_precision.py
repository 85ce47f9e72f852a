"""--ramp-precision bf16: the off-ramps' products in bf16 on a cached copy of the matrix."""
import pytest
import torch

from elmer_fairseq.generator import ElmerGenerator
from elmer_fairseq.models import elmer

from conftest import (assert_entry_points_agree, expect_failure, generate_args, hypotheses, run_cli, sample_batch,
                      tiny_model, train_args)


def encode(model, batch):
    net = batch["net_input"]
    return model.encoder(net["src_tokens"], src_lengths=net["src_lengths"])


def test_the_low_precision_copy_is_made_once_and_follows_the_weight(xsum_tiny):
    _, model = tiny_model(xsum_tiny, "soft")
    decoder = model.decoder
    copy = decoder.off_ramp_weight(0, torch.bfloat16)
    assert copy.dtype == torch.bfloat16 and torch.equal(copy, decoder.off_ramp_weight(0).bfloat16())
    assert decoder.off_ramp_weight(1, torch.bfloat16) is copy  # the tied embedding: one copy for every layer
    assert decoder.off_ramp_weight(0) is decoder.output_projection.weight  # fp32: the parameter itself
    with torch.no_grad():  # a training step changes the weight in place: the next decode sees the new one
        decoder.output_projection.weight.add_(1.0)
    fresh = decoder.off_ramp_weight(0, torch.bfloat16)
    assert fresh is not copy and torch.equal(fresh, decoder.off_ramp_weight(0).bfloat16())
    assert "low_precision_ramps" not in " ".join(model.state_dict())


@pytest.mark.parametrize("mode, extra", [("soft", {}), ("soft", {"shortlist": 4}), ("hard", {"length_cut": 1})])
def test_every_off_ramp_runs_in_bf16(xsum_tiny, monkeypatch, mode, extra):
    task, model = tiny_model(xsum_tiny, mode)
    seen = []
    for name in ("off_ramp", "off_ramp_top", "shortlist_argmax"):  # every product with an off-ramp matrix
        real = getattr(elmer, name)
        monkeypatch.setattr(elmer, name, lambda h, w, *a, real=real, name=name, **k:
                            seen.append((name, h.dtype, w.dtype)) or real(h, w, *a, **k))
    out = model.decoder.decode(encode(model, sample_batch(task, size=3)), 12, 0.5, ramp_dtype=torch.bfloat16, **extra)
    assert len(seen) == 3 and all(h == w == torch.bfloat16 for _, h, w in seen)
    assert ("shortlist_argmax" in {name for name, *_ in seen}) == ("shortlist" in extra)
    assert out.scores.dtype == torch.float32  # the reductions stay float32


def test_bf16_changes_an_argmax_only_where_its_rounding_can(xsum_tiny):
    """One layer, so no change carries to another: wherever the bf16 argmax differs from the fp32
    one, the fp32 logits of the two tokens are within the bound of bf16's rounding of h and w."""
    task, model = tiny_model(xsum_tiny, "soft", layers=1)
    decoder = model.decoder
    encoder_out = encode(model, sample_batch(task, size=4))
    # a near-twin of every predicted token, 0.1% weaker: below bf16's resolution (0.4%)
    predicted = decoder.decode(encoder_out, 12).tokens.unique()
    with torch.no_grad():
        w = decoder.off_ramp_weight(0)
        twins = torch.arange(len(predicted)) + task.target_dictionary.nspecial
        w[twins] = w[predicted] * (1 - 1e-3) + 1e-4 * torch.randn(len(predicted), w.size(1))
    full = decoder.decode(encoder_out, 12)
    low = decoder.decode(encoder_out, 12, ramp_dtype=torch.bfloat16)
    with torch.no_grad():
        h = decoder.run_layer(0, decoder.mask_input(encoder_out, 12), encoder_out).transpose(0, 1)  # [B, T, d]
        w = decoder.off_ramp_weight(0)
        logits, magnitude = h @ w.t(), h.abs() @ w.abs().t()
    bound = 2 * 2.0 ** -8 * magnitude  # each of h and w rounded to 8 significant bits
    changed = full.tokens.ne(low.tokens)
    a, b = full.tokens[changed], low.tokens[changed]
    gap = logits[changed].gather(1, a[:, None]) - logits[changed].gather(1, b[:, None])
    assert (gap.squeeze(1) <= bound[changed].gather(1, a[:, None]).squeeze(1) +
            bound[changed].gather(1, b[:, None]).squeeze(1)).all()
    assert changed.any()  # the twins do flip some


def test_fairseq_generate_elmer_generate_and_the_api_in_bf16(xsum_tiny, tmp_path, capsys):
    run_cli("fairseq-train", *train_args(xsum_tiny, tmp_path, "--exit-mode", "soft", updates=2))
    ckpt = tmp_path / "checkpoint_last.pt"
    low = hypotheses(run_cli("fairseq-generate", *generate_args(xsum_tiny, ckpt, "--ramp-precision", "bf16")).stdout)
    assert len(low) == 8
    expect_failure("fairseq-generate", generate_args(xsum_tiny, ckpt, "--ramp-precision", "fp16"),
                   "--ramp-precision fp16: one of fp32, bf16")
    model = assert_entry_points_agree(xsum_tiny, ckpt, low, capsys, ["--ramp-precision", "bf16"], ramp_precision="bf16")
    with pytest.raises(ValueError, match="--ramp-precision int8"):
        ElmerGenerator(model.tgt_dict, 12, 0.0, summary=False, ramp_precision="int8")
