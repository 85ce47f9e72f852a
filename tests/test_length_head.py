"""--length-head: a CMLM-style length prediction from the encoder whose value the decoder's [MASK]s read."""
import pytest
import torch

from elmer_fairseq import ELMER
from elmer_fairseq.criterions.elmer_loss import ElmerLoss
from elmer_fairseq.generator import ElmerGenerator
from elmer_fairseq.models.elmer import target_lengths

from conftest import expect_failure, generate_args, hypotheses, run_cli, sample_batch, tiny_model, train_args


def encode(model, batch):
    net = batch["net_input"]
    return model.encoder(net["src_tokens"], src_lengths=net["src_lengths"])


def headed(xsum_tiny, mode="soft", extra=()):
    return tiny_model(xsum_tiny, mode, extra=("--length-head", *extra))


def test_target_lengths_count_through_the_first_eos():
    eos, pad = 2, 1
    tgt = torch.tensor([[5, 6, eos, pad], [5, eos, 7, eos], [5, 6, 7, 8]])
    assert target_lengths(tgt, eos, pad).tolist() == [3, 2, 4]


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_a_new_head_decodes_as_the_model_without_it(xsum_tiny, mode):
    """The length embedding starts at zero: a warm start's decoder reads the [MASK]s it was trained on."""
    task, plain = tiny_model(xsum_tiny, mode)
    _, model = headed(xsum_tiny, mode)
    # a checkpoint without the head loads strictly: the head's parts start afresh, the embedding at zero
    model.load_state_dict(plain.state_dict())
    assert model.decoder.embed_length.weight.eq(0).all()
    encoder_out = encode(plain, sample_batch(task, size=3))
    a, b = plain.decoder.decode(encoder_out, 12, 0.5), model.decoder.decode(encoder_out, 12, 0.5)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.exit_layer, b.exit_layer)


def test_the_decoder_reads_the_length_it_is_told_or_predicts(xsum_tiny, monkeypatch):
    task, model = headed(xsum_tiny)
    with torch.no_grad():
        model.decoder.embed_length.weight.normal_(std=3.0)
    encoder_out = encode(model, sample_batch(task, size=3))
    three, nine = (model.decoder.decode(encoder_out, 12, lengths=torch.full((3,), n)) for n in (3, 9))
    assert not torch.equal(three.tokens, nine.tokens)
    # without lengths: the head's argmax over 1..T
    logits = torch.zeros(3, model.decoder.length_out.out_features)
    logits[:, 0], logits[:, 9], logits[:, 30] = 3.0, 1.0, 2.0  # 0 and 30 are likelier, but outside 1..T = 12
    monkeypatch.setattr(model.decoder, "predict_length", lambda encoder_out: logits.clone())
    predicted = model.decoder.decode(encoder_out, 12)
    assert torch.equal(predicted.tokens, nine.tokens)
    assert predicted.predicted_length.tolist() == [30, 30, 30] and three.predicted_length is None  # told: none
    summary = ElmerGenerator(task.target_dictionary, 12, 0.0, summary=False).length_summary(torch.tensor([30, 9]))
    assert "mean predicted length 19.50" in summary and "1 above --max-target-length 12, decoded at 12" in summary


def test_training_adds_the_length_loss_and_feeds_the_reference_length(xsum_tiny, monkeypatch):
    task, model = headed(xsum_tiny, extra=("--length-loss-factor", "0.5"))
    batch = sample_batch(task, split="train")
    seen = []
    real = type(model.decoder).embed
    monkeypatch.setattr(type(model.decoder), "embed", lambda self, t, lengths=None: seen.append(lengths) or real(self, t, lengths))
    terms = model.train()(**batch["net_input"], tgt_tokens=batch["target"])
    d = task.target_dictionary
    assert torch.equal(seen[0], target_lengths(batch["target"], d.eos(), d.pad()))
    assert terms["length"]["factor"] == 0.5 and torch.equal(terms["length"]["tgt"], seen[0])
    loss, _, log = ElmerLoss(task, label_smoothing=0.0)(model, batch)
    assert log["length-loss"] > 0
    # the factor weighs it: the total moves by the length term's change
    task0, model0 = headed(xsum_tiny, extra=("--length-loss-factor", "0"))
    model0.load_state_dict(model.state_dict())
    torch.manual_seed(0)
    l1 = ElmerLoss(task, label_smoothing=0.0)(model.train(), batch)[0]
    torch.manual_seed(0)
    l0 = ElmerLoss(task0, label_smoothing=0.0)(model0.train(), sample_batch(task0, split="train"))[0]
    assert l1 > l0


@pytest.mark.parametrize("flags, message", [
    (["--length-loss-factor", "0.5"], "--length-loss-factor 0.5 weighs the length head's loss: it needs --length-head"),
    (["--length-head", "--length-loss-factor", "-1"], "--length-loss-factor must be >= 0"),
    (["--length-head", "--output-loss", "ctc", "--gold-mix-prob", "0"], "--length-head tells the decoder"),
])
def test_bad_length_head_options_are_refused(xsum_tiny, flags, message):
    with pytest.raises(ValueError, match=message):
        tiny_model(xsum_tiny, "soft", extra=flags)


def test_lplm_refuses_a_length_head(xsum_tiny):
    task, model = headed(xsum_tiny)
    batch = sample_batch(task, split="train")
    exits = torch.ones_like(batch["target"])
    with pytest.raises(ValueError, match="--length-head are fine-tuning options"):
        model(**batch["net_input"], tgt_tokens=batch["target"], exit_layers=exits)


def test_fairseq_train_resume_generate_and_the_api(xsum_tiny, tmp_path):
    out = run_cli("fairseq-train", *train_args(xsum_tiny, tmp_path, "--length-head", "--glance", "0.5", updates=2)).stdout
    assert "| length " in out  # the length head's loss, logged by fairseq's nat_loss
    ckpt = tmp_path / "checkpoint_last.pt"
    resumed = run_cli("fairseq-train", *train_args(xsum_tiny, tmp_path, "--length-head", "--glance", "0.5",
                                                   updates=3)).stdout
    assert "Loaded checkpoint" in resumed and "@ 2 updates" in resumed
    stdout = run_cli("fairseq-generate", *generate_args(xsum_tiny, ckpt, "--length-cut", "1")).stdout
    gen = hypotheses(stdout)
    assert len(gen) == 8 and "ELMER length head: mean predicted length" in stdout and "over 8 outputs" in stdout
    oracle = run_cli("fairseq-generate", *generate_args(xsum_tiny, ckpt, "--oracle-length")).stdout
    assert len(hypotheses(oracle)) == 8
    model = ELMER.from_pretrained(ckpt, data=xsum_tiny, device="cpu")
    lines = (xsum_tiny.parent / "test.src").read_text(encoding="utf-8").splitlines()
    assert model.generate(lines, batch_size=3, length_cut=1) == [gen[i] for i in range(8)]
    expect_failure("fairseq-train", train_args(xsum_tiny, tmp_path / "ctc", "--length-head", "--output-loss", "ctc"),
                   "--length-head tells the decoder")
