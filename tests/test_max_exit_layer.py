"""--max-exit-layer K: decoder layers 1..K only; every position exits by layer K."""
import copy
import sys

import pytest
import torch

from conftest import (ROOT, assert_entry_points_agree, expect_failure, generate_args, hypotheses, run_cli,
                      sample_batch, tiny_model, train_args)

sys.path.insert(0, str(ROOT / "examples"))  # examples/ is a folder of scripts, as in test_benchmark
import exit_layer_check  # noqa: E402


def encode(model, batch):
    net = batch["net_input"]
    return model.encoder(net["src_tokens"], src_lengths=net["src_lengths"])


def truncated(model, k):
    """The same model with only its first k decoder layers: what --max-exit-layer k must decode as."""
    short = copy.deepcopy(model)
    short.decoder.layers, short.decoder.num_layers = short.decoder.layers[:k], k
    return short


@pytest.mark.parametrize("mode", ["soft", "hard"])
@pytest.mark.parametrize("extra", [{}, {"length_cut": 1}], ids=["full", "cut"])
def test_decodes_as_a_decoder_of_k_layers(xsum_tiny, mode, extra):
    task, model = tiny_model(xsum_tiny, mode, exit_threshold=0.0 if mode == "hard" else None)
    encoder_out = encode(model, sample_batch(task))
    L = model.decoder.num_layers
    full = model.decoder.decode(encoder_out, 12, 0.0, **extra)
    assert torch.equal(model.decoder.decode(encoder_out, 12, 0.0, max_exit_layer=L, **extra).tokens, full.tokens)
    for k in range(1, L):
        out = model.decoder.decode(encoder_out, 12, 0.0, max_exit_layer=k, **extra)
        ref = truncated(model, k).decoder.decode(encoder_out, 12, 0.0, **extra)
        for name in ("tokens", "scores", "exit_layer"):
            assert torch.equal(getattr(out, name), getattr(ref, name)), (k, name)
        assert int(out.exit_layer.max()) <= k
        if mode == "soft" and not extra:
            assert (out.exit_layer == k).all()


def test_layers_above_k_are_not_run(xsum_tiny):
    task, model = tiny_model(xsum_tiny, "soft")
    calls, real = [], model.decoder.run_layer
    model.decoder.run_layer = lambda l, *a, **k: calls.append(l) or real(l, *a, **k)
    model.decoder.decode(encode(model, sample_batch(task)), 12, 0.0, max_exit_layer=2)
    assert calls == [0, 1]


def test_bad_layers_are_refused(xsum_tiny):
    task, model = tiny_model(xsum_tiny, "soft")
    encoder_out = encode(model, sample_batch(task))
    L = model.decoder.num_layers
    for k in (0, L + 1):
        with pytest.raises(ValueError, match=rf"--max-exit-layer {k}: a decoder layer in 1..{L}"):
            model.decoder.decode(encoder_out, 12, 0.0, max_exit_layer=k)
    with pytest.raises(ValueError, match="runs >= 3 layers .*by --max-exit-layer"):
        model.decoder.decode(encoder_out, 12, 0.0, max_exit_layer=2, shortlist=4)


def test_fairseq_generate_elmer_generate_and_the_api(xsum_tiny, tmp_path, capsys):
    run_cli("fairseq-train", *train_args(xsum_tiny, tmp_path, "--exit-mode", "soft", updates=2))
    ckpt = tmp_path / "checkpoint_last.pt"
    full = run_cli("fairseq-generate", *generate_args(xsum_tiny, ckpt))
    one = run_cli("fairseq-generate", *generate_args(xsum_tiny, ckpt, "--max-exit-layer", "1"))
    layers = torch.load(ckpt, weights_only=False)["cfg"]["model"].decoder_layers
    assert f"mean {layers:.2f} of {layers}" in full.stdout and f"mean 1.00 of {layers}" in one.stdout
    assert hypotheses(one.stdout) != hypotheses(full.stdout)  # layer 1 of a 2-update model writes other tokens
    expect_failure("fairseq-generate", generate_args(xsum_tiny, ckpt, "--max-exit-layer", str(layers + 1)),
                   f"--max-exit-layer {layers + 1}: a decoder layer in 1..{layers}")
    assert_entry_points_agree(xsum_tiny, ckpt, hypotheses(one.stdout), capsys, ["--max-exit-layer", "1"],
                              max_exit_layer=1)


def test_exit_layer_check_scores_every_layer(xsum_tiny, tmp_path, capsys):
    run_cli("fairseq-train", *train_args(xsum_tiny, tmp_path, "--exit-mode", "soft", updates=2))
    ckpt = tmp_path / "checkpoint_last.pt"
    layers = torch.load(ckpt, weights_only=False)["cfg"]["model"].decoder_layers
    exit_layer_check.main(["--path", str(ckpt), "--data", str(xsum_tiny), "--samples", "4"])
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line[:3] in {f"| {k}" for k in range(10)}]
    assert [r[0] for r in rows] == [f"| {layers} (all)", *[f"| {k}" for k in range(layers - 1, 0, -1)]]
    assert rows[0][7] == "100%"  # K = L decodes as without the option
    # layer 1 alone, as fairseq-generate --max-exit-layer 1 writes it: the share equal to K = L's agrees
    one = hypotheses(run_cli("fairseq-generate", *generate_args(xsum_tiny, ckpt, "--max-exit-layer", "1")).stdout)
    full = hypotheses(run_cli("fairseq-generate", *generate_args(xsum_tiny, ckpt)).stdout)
    assert rows[-1][7] == f"{100 * sum(one[i] == full[i] for i in range(4)) / 4:.0f}%"
