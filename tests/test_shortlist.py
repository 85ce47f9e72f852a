"""--ramp-shortlist K: soft exit's middle off-ramps score layer 1's K most likely tokens only."""
import sys

import pytest
import torch

from elmer_fairseq.generator import ElmerGenerator
from elmer_fairseq.models.elmer import ElmerDecoder

from conftest import (ROOT, assert_entry_points_agree, expect_failure, generate_args, hypotheses, run_cli,
                      sample_batch, tiny_model, train_args)

sys.path.insert(0, str(ROOT / "examples"))  # examples/ is a folder of scripts, as in test_benchmark
import shortlist_check  # noqa: E402


def encode(model, batch):
    net = batch["net_input"]
    return model.encoder(net["src_tokens"], src_lengths=net["src_lengths"])


def fused_tokens(monkeypatch):
    """The tokens every soft-exit fuse reads, [T, B] per layer, recorded."""
    seen, real = [], ElmerDecoder.fuse
    monkeypatch.setattr(ElmerDecoder, "fuse", lambda self, tokens, h: seen.append(tokens.clone()) or real(self, tokens, h))
    return seen


@pytest.mark.parametrize("cut", [None, 1])
def test_a_shortlist_of_the_whole_vocabulary_decodes_as_without_it(xsum_tiny, cut):
    task, model = tiny_model(xsum_tiny, "soft")
    encoder_out = encode(model, sample_batch(task, size=3))
    plain = model.decoder.decode(encoder_out, 12, 0.0, length_cut=cut)
    listed = model.decoder.decode(encoder_out, 12, 0.0, length_cut=cut, shortlist=len(task.target_dictionary))
    assert torch.equal(plain.tokens, listed.tokens) and torch.equal(plain.exit_layer, listed.exit_layer)
    torch.testing.assert_close(plain.scores, listed.scores)  # layer 1's probability from log_softmax, not the op


def test_middle_layers_pick_among_layer_one_candidates(xsum_tiny, monkeypatch):
    task, model = tiny_model(xsum_tiny, "soft", layers=4)
    encoder_out = encode(model, sample_batch(task, size=3))
    seen = fused_tokens(monkeypatch)
    model.decoder.decode(encoder_out, 12, 0.0)
    full_fused, seen[:] = list(seen), []
    k = 2
    out = model.decoder.decode(encoder_out, 12, 0.0, shortlist=k)
    assert len(seen) == 3  # layers 1, 2 and 3 fuse; layer 4 writes the output
    assert torch.equal(seen[0], full_fused[0])  # layer 1 scores the whole vocabulary either way
    # the candidates: the union of layer 1's k best tokens over the batch's positions
    with torch.no_grad():
        h = model.decoder.run_layer(0, model.decoder.embed(torch.full((3, 12), model.decoder.mask_idx)), encoder_out)
        candidates = set((h @ model.decoder.off_ramp_weight(0).t()).topk(k, dim=-1).indices.flatten().tolist())
    assert len(candidates) < len(task.target_dictionary)
    assert all(set(tokens.flatten().tolist()) <= candidates for tokens in seen[1:])
    # without the shortlist the middle layers of this model read tokens outside it: the option does something
    assert not all(set(tokens.flatten().tolist()) <= candidates for tokens in full_fused[1:])
    assert out.exit_layer.eq(4).all()


def test_bad_shortlists_are_refused(xsum_tiny):
    task, model = tiny_model(xsum_tiny, "soft")
    encoder_out = encode(model, sample_batch(task))
    with pytest.raises(ValueError, match="--ramp-shortlist 0"):
        model.decoder.decode(encoder_out, 12, 0.0, shortlist=0)
    _, hard = tiny_model(xsum_tiny, "hard")
    with pytest.raises(ValueError, match="soft-exit decoder"):
        hard.decoder.decode(encode(hard, sample_batch(task)), 12, 0.0, shortlist=4)
    _, shallow = tiny_model(xsum_tiny, "soft", extra=("--decoder-layers", "2"))
    with pytest.raises(ValueError, match="2 layers"):
        shallow.decoder.decode(encode(shallow, sample_batch(task)), 12, 0.0, shortlist=4)
    with pytest.raises(ValueError, match="--ramp-shortlist"):
        ElmerGenerator(task.target_dictionary, 12, 0.0, summary=False, oracle_length=True, shortlist=2)


def test_fairseq_generate_elmer_generate_and_the_api_with_a_shortlist(xsum_tiny, tmp_path, capsys):
    run_cli("fairseq-train", *train_args(xsum_tiny, tmp_path, "--exit-mode", "soft", "--decoder-layers", "3", updates=2))
    ckpt = tmp_path / "checkpoint_last.pt"
    plain = hypotheses(run_cli("fairseq-generate", *generate_args(xsum_tiny, ckpt)).stdout)
    listed = hypotheses(run_cli("fairseq-generate", *generate_args(xsum_tiny, ckpt, "--ramp-shortlist", "2")).stdout)
    assert len(listed) == len(plain) == 8
    expect_failure("fairseq-generate", generate_args(xsum_tiny, ckpt, "--ramp-shortlist", "0"), "--ramp-shortlist 0")
    # elmer-generate and the Python API take it too, to fairseq-generate's outputs
    assert_entry_points_agree(xsum_tiny, ckpt, listed, capsys, ["--ramp-shortlist", "2"], shortlist=2)
    # examples/shortlist_check.py: a shortlist of the whole vocabulary keeps every output
    shortlist_check.main(["--path", str(ckpt), "--data", str(xsum_tiny), "--samples", "4", "--warmup", "0",
                          "--shortlists", "100000", "--length-cuts", "100"])
    table = capsys.readouterr().out
    assert "| `--ramp-shortlist 100000` |" in table and table.count("| 100% |") == 4, table
