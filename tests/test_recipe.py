"""The training recipe: label smoothing in every ELMER loss, the authors' gold-token mixing in soft
exit, and the oracle-length decode of the authors' test script."""
import math

import pytest
import torch
import torch.nn.functional as F

from elmer_fairseq.criterions.elmer_loss import ElmerLoss
from elmer_fairseq.generator import ElmerGenerator
from elmer_fairseq.models.elmer import smoothing_entropy_floor

from conftest import expect_failure, generate_args, hypotheses, run_cli, sample_batch, tiny_model, train_args

SMOOTHED = ["--criterion", "elmer_loss", "--label-smoothing", "0.1"]


def smoothed_nll(logits, target, mask, eps):
    """fairseq's label smoothing by hand: (1 - eps) NLL - eps mean(log p), over the kept positions."""
    log_p = F.log_softmax(logits[mask].double(), -1)
    nll = -log_p.gather(-1, target[mask].unsqueeze(-1)).mean()
    return (1 - eps) * nll - eps * log_p.mean()


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_label_smoothing_is_applied_to_every_layer(xsum_tiny, mode):
    task, model = tiny_model(xsum_tiny, mode, extra=[*SMOOTHED, "--gold-mix-prob", "0"])
    batch = sample_batch(task, split="train")
    loss, _, _ = ElmerLoss(task, label_smoothing=0.1)(model, batch)
    net = batch["net_input"]
    enc = model.encoder(net["src_tokens"], src_lengths=net["src_lengths"])
    layers = model.decoder(net["prev_output_tokens"], enc, batch["target"])
    mask = batch["target"].ne(task.tgt_dict.pad())
    expected = sum(smoothed_nll(l, batch["target"], mask, 0.1) for l in layers) / len(layers)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    unsmoothed = sum(smoothed_nll(l, batch["target"], mask, 0.0) for l in layers) / len(layers)
    assert abs(loss.item() - unsmoothed.item()) > 1e-3


def test_label_smoothing_is_applied_to_lplm(xsum_tiny):
    task, model = tiny_model(xsum_tiny, "soft", extra=[*SMOOTHED, "--gold-mix-prob", "0"])
    batch = sample_batch(task, split="train")
    torch.manual_seed(1)
    layers = torch.randint(1, 4, batch["target"].shape)
    terms = model(**batch["net_input"], tgt_tokens=batch["target"], exit_layers=layers)
    assert terms["lplm"]["ls"] == 0.1
    batch["net_input"]["exit_layers"] = layers
    loss, _, _ = ElmerLoss(task, label_smoothing=0.1)(model, batch)
    term = terms["lplm"]
    assert loss.item() == pytest.approx(smoothed_nll(term["out"], term["tgt"], term["mask"], 0.1).item(), rel=1e-5)


def test_smoothing_floor_warns_when_hard_exit_cannot_fire(xsum_tiny, caplog):
    assert smoothing_entropy_floor(0.0, 1000) == 0.0
    # eps = 0.1 over a 4k vocabulary: the smoothed target's entropy is above the paper's delta
    assert smoothing_entropy_floor(0.1, 4000) == pytest.approx(0.1 * math.log(40000) + 0.095, abs=0.02)
    task, model = tiny_model(xsum_tiny, "hard", extra=SMOOTHED)
    assert "hard exit will rarely fire" in caplog.text
    caplog.clear()
    # loading the trained checkpoint (fairseq-generate, the hub) is not training: no warning there
    task.build_model(model.args, from_checkpoint=True)
    assert "rarely fire" not in caplog.text
    tiny_model(xsum_tiny, "hard", extra=["--criterion", "elmer_loss", "--label-smoothing", "0"])
    assert "rarely fire" not in caplog.text


def fused_tokens(model):
    """Records the tokens every soft-exit fuse reads."""
    seen, fuse = [], model.decoder.fuse

    def recording(tokens, h):
        seen.append(tokens.clone())
        return fuse(tokens, h)

    model.decoder.fuse = recording
    return seen


def soft_exit_loss(task, model, batch, seed=0):
    torch.manual_seed(seed)
    return ElmerLoss(task, label_smoothing=0.0)(model, batch)[0]


def test_gold_mix_defaults_to_the_authors_value_for_soft_exit_only(xsum_tiny):
    assert tiny_model(xsum_tiny, "soft")[1].decoder.gold_mix_prob == 0.3
    assert tiny_model(xsum_tiny, "hard")[1].decoder.gold_mix_prob == 0.0


def test_gold_mix_one_feeds_exactly_the_gold_tokens(xsum_tiny):
    task, model = tiny_model(xsum_tiny, "soft", extra=["--gold-mix-prob", "1"])
    model.train()
    batch = sample_batch(task, split="train")
    seen = fused_tokens(model)
    soft_exit_loss(task, model, batch)
    gold = batch["target"].t()
    real = gold.ne(task.tgt_dict.pad())
    assert len(seen) == 2  # the two fused layers of three
    for tokens in seen:
        assert torch.equal(tokens[real], gold[real])


def test_gold_mix_zero_and_eval_mode_feed_the_predictions(xsum_tiny):
    task, model = tiny_model(xsum_tiny, "soft", extra=["--gold-mix-prob", "0"])
    batch = sample_batch(task, split="train")
    eval_loss = soft_exit_loss(task, model, batch)  # dropout is 0: train and eval compute alike
    model.train()
    assert soft_exit_loss(task, model, batch, seed=5).item() == eval_loss.item()

    _, mixing = tiny_model(xsum_tiny, "soft", extra=["--gold-mix-prob", "1"])
    assert soft_exit_loss(task, mixing, batch).item() == eval_loss.item()  # eval mode: no mixing
    mixing.train()  # the generator switches to eval mode itself: same outputs as without mixing
    d = task.target_dictionary
    with_mix = ElmerGenerator(d, 12, 0.5, summary=False).generate([mixing], batch)
    without = ElmerGenerator(d, 12, 0.5, summary=False).generate([model], batch)
    assert all(torch.equal(a[0]["tokens"], b[0]["tokens"]) for a, b in zip(with_mix, without))
    mixing.train()
    assert soft_exit_loss(task, mixing, batch).item() != eval_loss.item()


def test_gold_mix_changes_a_share_of_positions(xsum_tiny):
    task, model = tiny_model(xsum_tiny, "soft", extra=["--gold-mix-prob", "0.3"])
    model.train()
    batch = sample_batch(task, split="train", size=8)
    real = batch["target"].t().ne(task.tgt_dict.pad())
    torch.manual_seed(0)
    use_gold = torch.rand(real.shape) < 0.3
    predicted = torch.full_like(batch["target"].t(), task.tgt_dict.unk())
    torch.manual_seed(0)
    mixed = model.decoder.mix_gold(predicted, batch["target"])
    assert torch.equal(mixed.ne(predicted), use_gold & real)
    assert 0.15 < (use_gold & real).sum() / real.sum() < 0.45


@pytest.mark.parametrize("extra,message", [
    (["--exit-mode", "hard", "--gold-mix-prob", "0.3"], "with --exit-mode hard nothing is fused"),
    (["--gold-mix-prob", "1.5"], "--gold-mix-prob must be in [0, 1]"),
])
def test_bad_gold_mix_is_refused(xsum_tiny, tmp_path, extra, message):
    expect_failure("fairseq-train", train_args(xsum_tiny, tmp_path, *extra), message)


def test_oracle_length_decodes_each_sample_with_its_reference_length(xsum_tiny):
    task, model = tiny_model(xsum_tiny, "soft")
    batch = sample_batch(task)
    d = task.target_dictionary
    gen = ElmerGenerator(d, 12, 0.5, summary=False, oracle_length=True)
    hypos = gen.generate([model], batch)
    net = batch["net_input"]
    for i, hypo in enumerate(hypos):
        target = batch["target"][i]
        length = int(target.ne(d.pad()).sum())
        alone = model.generate(net["src_tokens"][i:i + 1], net["src_lengths"][i:i + 1], length)
        tokens = alone.tokens[0]
        eos = tokens.eq(d.eos()).nonzero()
        expected = tokens[: int(eos[0]) + 1] if len(eos) else tokens
        assert len(hypo[0]["tokens"]) <= length
        assert torch.equal(hypo[0]["tokens"], expected)
    with pytest.raises(ValueError, match="no reference"):
        gen.generate([model], {**batch, "target": None})


def test_fairseq_generate_takes_fairseqs_default_beam_and_refuses_a_real_beam(trained, xsum_tiny):
    gen = generate_args(xsum_tiny, trained["soft"])
    at = gen.index("--beam")
    without_beam = gen[:at] + gen[at + 2:]
    out = run_cli("fairseq-generate", *without_beam).stdout
    assert len(hypotheses(out)) == 8
    expect_failure("fairseq-generate", [*without_beam, "--beam", "4"], "--beam 4: ELMER has no beam search")
