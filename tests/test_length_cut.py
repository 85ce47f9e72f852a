"""--length-cut: after layer 1 the decoder's upper layers run on the positions the outputs need."""
import pytest
import torch

from elmer_fairseq.generator import ElmerGenerator

from conftest import expect_failure, generate_args, hypotheses, run_cli, sample_batch, tiny_model, train_args


def encode(model, batch):
    net = batch["net_input"]
    return model.encoder(net["src_tokens"], src_lengths=net["src_lengths"])


def rows_per_layer(model):
    """The number of positions each decoder layer's FFN runs on, recorded by hooks."""
    rows, hooks = [], []
    for l, layer in enumerate(model.decoder.layers):
        hooks.append(layer.fc1.register_forward_hook(lambda m, i, o, l=l: rows.append((l, i[0].numel() // i[0].size(-1)))))
    return rows, hooks


def test_needed_length_ends_at_the_first_eos_or_the_last_written_position(xsum_tiny):
    task, model = tiny_model(xsum_tiny, "soft")
    eos, blank = task.target_dictionary.eos(), model.decoder.mask_idx
    tokens = torch.tensor([[7, 8, eos, 9, 9, 9], [7, eos, 8, 9, 9, eos]]).t()  # [T, B]
    assert model.decoder.needed_length(tokens, 0, None) == 3  # row 0 ends at its EOS, position 3
    assert model.decoder.needed_length(tokens, 2, None) == 5
    assert model.decoder.needed_length(tokens, 10, None) == 6  # at most T
    no_eos = torch.tensor([[7, 8, 9, 9, 9, 9]]).t()
    assert model.decoder.needed_length(no_eos, 0, None) == 6
    ctc_rows = torch.tensor([[blank, 7, blank, 8, blank, blank], [7, blank, blank, blank, blank, blank]]).t()
    assert model.decoder.needed_length(ctc_rows, 0, blank) == 4  # the last token written is at position 4
    assert model.decoder.needed_length(torch.full((6, 1), blank), 0, blank) == 1  # never 0 positions


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_a_cut_that_keeps_every_position_decodes_as_without_it(xsum_tiny, mode):
    task, model = tiny_model(xsum_tiny, mode, exit_threshold=0.0 if mode == "hard" else None)
    encoder_out = encode(model, sample_batch(task))
    plain = model.decoder.decode(encoder_out, 12, 0.0)
    kept_all = model.decoder.decode(encoder_out, 12, 0.0, length_cut=12)
    for name in ("tokens", "scores", "exit_layer"):
        assert torch.equal(getattr(plain, name), getattr(kept_all, name))


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_upper_layers_run_on_the_cut_positions_and_the_rest_keep_layer_one(xsum_tiny, mode, monkeypatch):
    task, model = tiny_model(xsum_tiny, mode)
    encoder_out = encode(model, sample_batch(task, size=3))
    bsz = 3
    monkeypatch.setattr(type(model.decoder), "needed_length", lambda self, tokens, margin, blank: 5)
    layer_one = model.decoder.decode(encoder_out, 12, 0.0, forced_exits=torch.ones(bsz, 12, dtype=torch.long)) \
        if mode == "hard" else None
    rows, hooks = rows_per_layer(model)
    try:
        out = model.decoder.decode(encoder_out, 12, 0.0, length_cut=0)
    finally:
        for hook in hooks:
            hook.remove()
    assert rows[0] == (0, 12 * bsz) and all(n <= 5 * bsz for l, n in rows[1:]) and len(rows) == 3
    assert (out.exit_layer[:, 5:] == 1).all()
    if mode == "hard":  # past the cut: exactly what layer 1 predicts there
        assert torch.equal(out.tokens[:, 5:], layer_one.tokens[:, 5:])
    # the kept positions never read the cut ones: the same as a batch whose upper layers only ever saw 5
    assert out.tokens.shape == (bsz, 12)


def test_bad_margin_is_refused(xsum_tiny):
    task, model = tiny_model(xsum_tiny, "soft")
    with pytest.raises(ValueError, match="--length-cut must be >= 0"):
        model.decoder.decode(encode(model, sample_batch(task)), 12, 0.0, length_cut=-1)
    with pytest.raises(ValueError, match="--length-cut and --oracle-length"):
        ElmerGenerator(task.target_dictionary, 12, 0.0, summary=False, oracle_length=True, length_cut=2)


@pytest.mark.parametrize("extra", [[], ["--output-loss", "ctc"]], ids=["ce", "ctc"])
def test_fairseq_generate_with_a_length_cut(xsum_tiny, tmp_path, extra):
    run_cli("fairseq-train", *train_args(xsum_tiny, tmp_path, "--exit-mode", "hard", *extra, updates=2))
    ckpt = tmp_path / "checkpoint_last.pt"
    full = run_cli("fairseq-generate", *generate_args(xsum_tiny, ckpt, "--length-cut", "100"))
    cut = run_cli("fairseq-generate", *generate_args(xsum_tiny, ckpt, "--length-cut", "0"))
    assert len(hypotheses(cut.stdout)) == 8
    assert hypotheses(full.stdout) == hypotheses(run_cli("fairseq-generate", *generate_args(xsum_tiny, ckpt)).stdout)
    expect_failure("fairseq-generate", generate_args(xsum_tiny, ckpt, "--length-cut", "-2"), "--length-cut must be >= 0")
