"""CTC output and glancing training: the loss against a brute-force sum over alignments, the
Viterbi alignment against brute force, the collapse rules, and both through the real model,
fairseq-train and fairseq-generate."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from elmer_fairseq import ctc, glancing
from elmer_fairseq.generator import ElmerGenerator

from conftest import (expect_failure, generate_args, hypotheses, run_cli, sample_batch, tiny_model, train_args,
                      update_losses)

BLANK = 0


def collapse(path, blank=BLANK):
    out = [t for i, t in enumerate(path) if t != blank and (i == 0 or t != path[i - 1])]
    return out


def alignments(label, T, V):
    """Every path of T symbols over 0..V-1 that collapses to `label`."""
    return [p for p in itertools.product(range(V), repeat=T) if collapse(list(p)) == list(label)]


def log_probs(B, T, V, seed):
    torch.manual_seed(seed)
    return F.log_softmax(torch.randn(B, T, V, dtype=torch.float64), -1)


@pytest.mark.parametrize("label", [[1, 2], [1, 1], [2], [], [1, 2, 1], [2, 2, 2]])
def test_loss_and_gradient_equal_a_sum_over_every_alignment(label):
    T, V = 5, 3
    logits = torch.randn(1, T, V, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([label + [9] * (3 - len(label))])
    lengths = torch.tensor([len(label)])

    def brute(logits):
        lp = F.log_softmax(logits.float(), -1)[0]
        paths = alignments(label, T, V)
        total = torch.logsumexp(torch.stack([lp[torch.arange(T), torch.tensor(p)].sum() for p in paths]), 0)
        return -total / max(len(label), 1)

    loss = ctc.loss(logits, labels, lengths, BLANK)
    expected = brute(logits)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    grad, = torch.autograd.grad(loss, logits)
    ref_grad, = torch.autograd.grad(expected, logits)
    assert torch.allclose(grad, ref_grad, atol=1e-5)


def test_unalignable_targets_count_and_contribute_nothing():
    labels = torch.tensor([[1, 1, 1], [1, 2, 3], [2, 2, 9]])
    lengths = torch.tensor([3, 3, 2])
    # 1 1 1 needs 5 positions (a blank between equal neighbours), 1 2 3 needs 3, 2 2 needs 3
    assert ctc.min_positions(labels, lengths).tolist() == [5, 3, 3]
    assert ctc.unalignable(labels, lengths, 4).tolist() == [True, False, False]
    logits = torch.randn(3, 4, 4, requires_grad=True)
    loss = ctc.loss(logits, labels, lengths, BLANK)
    assert math.isfinite(loss.item())
    loss.backward()
    assert logits.grad[0].abs().max() == 0 and logits.grad[1].abs().max() > 0


def test_labels_take_the_prefix_before_eos_and_pad():
    pad, eos = 1, 2
    tgt = torch.tensor([[5, 6, 7, 2, 1, 1], [8, 2, 1, 1, 1, 1], [9, 9, 2, 2, 2, 2]])  # the last: --eos-after-end rows
    labels, lengths = ctc.labels(tgt, pad, eos)
    assert lengths.tolist() == [3, 1, 2]
    assert labels.tolist() == [[5, 6, 7], [8, 1, 1], [9, 9, 1]]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 2), min_size=0, max_size=3), st.integers(0, 10_000))
def test_best_alignment_is_the_most_likely_path(label, seed):
    T, V = 5, 3
    lp = log_probs(1, T, V, seed)
    labels = torch.tensor([label + [1] * (3 - len(label))])
    lengths = torch.tensor([len(label)])
    paths = alignments(label, T, V)
    if not paths:
        assert (ctc.best_alignment(lp, labels, lengths, BLANK) == BLANK).all()
        return
    scores = [lp[0, torch.arange(T), torch.tensor(p)].sum().item() for p in paths]
    path = ctc.best_alignment(lp, labels, lengths, BLANK)[0].tolist()
    assert collapse(path) == label
    assert lp[0, torch.arange(T), torch.tensor(path)].sum().item() == pytest.approx(max(scores), abs=1e-9)


def test_best_alignment_batched_rows_equal_single_rows():
    lp = log_probs(3, 7, 5, 1)
    labels = torch.tensor([[1, 2, 3], [4, 4, 0], [2, 0, 0]])
    lengths = torch.tensor([3, 2, 1])
    batched = ctc.best_alignment(lp, labels, lengths, BLANK)
    for i in range(3):
        single = ctc.best_alignment(lp[i:i + 1], labels[i:i + 1, :lengths[i]], lengths[i:i + 1], BLANK)
        assert batched[i].tolist() == single[0].tolist()


@pytest.mark.parametrize("tokens, kept", [
    ([0, 5, 5, 0, 5, 6], [5, 5, 6]),  # repeats merge; a blank between keeps both
    ([5, 5, 5], [5]),
    ([0, 0, 0], []),
    ([5, 2, 6, 7], [5]),  # ends before the first EOS (2)
    ([5, 1, 1], [5]),  # pad is never written
])
def test_output_positions_merge_repeats_drop_blanks_and_end_at_eos(tokens, kept):
    t = torch.tensor([tokens])
    keep = ctc.output_positions(t, blank=0, eos=2, pad=1)
    assert t[keep].tolist() == kept


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 6), max_size=12))
def test_output_positions_with_eos_as_the_blank_drop_every_eos_and_end_nowhere(tokens):
    """--ctc-blank eos: EOS (2) is CTC's blank, so an EOS is dropped and the output goes on after it."""
    t = torch.tensor([tokens], dtype=torch.long).view(1, -1)
    keep = ctc.output_positions(t, blank=2, eos=2, pad=1)
    assert t[keep].tolist() == [x for x in collapse(tokens, blank=2) if x != 1]


def test_glance_schedule_anneals_and_refuses_bad_values():
    s = glancing.parse("0.5:0.3", 100)
    assert s.ratio(0) == 0.5 and s.ratio(50) == pytest.approx(0.4) and s.ratio(1000) == pytest.approx(0.3)
    assert glancing.parse("0.3", 0).ratio(77) == 0.3
    for bad in ("1.5", "-0.1", "a", "0.5:0.3:0.1", "nan"):
        with pytest.raises(ValueError, match="--glance"):
            glancing.parse(bad, 100)
    with pytest.raises(ValueError, match="--max-update"):
        glancing.parse("0.5:0.3", 0)


def test_reveal_shows_ratio_times_the_wrong_positions_among_the_valid_ones():
    torch.manual_seed(0)
    reference = torch.tensor([[5, 6, 7, 8, 9, 1, 1], [5, 6, 7, 8, 9, 10, 11]])
    predicted = torch.tensor([[5, 0, 0, 0, 0, 0, 0], [5, 6, 7, 8, 9, 10, 11]])
    valid = reference.ne(1)
    revealed = glancing.reveal(predicted, reference, valid, 0.5)
    assert revealed.sum(1).tolist() == [2, 0]  # floor(0.5 * 4 wrong), none where all are right
    assert not (revealed & ~valid).any()
    assert glancing.reveal(predicted, reference, valid, 1.0).sum(1).tolist() == [4, 0]


# ------------------------------------------------------------------ through the model

CTC = ("--output-loss", "ctc")


@pytest.mark.parametrize("mode, blank", [("soft", "mask"), ("hard", "mask"), ("soft", "eos")])
def test_ctc_terms_train_every_layer_and_generation_collapses(xsum_tiny, mode, blank):
    task, model = tiny_model(xsum_tiny, mode, extra=(*CTC, "--ctc-blank", blank))
    d = task.target_dictionary
    assert model.blank == (d.eos() if blank == "eos" else model.decoder.mask_idx)
    batch = sample_batch(task)
    net = batch["net_input"]
    terms = model(net["src_tokens"], net["src_lengths"], net["prev_output_tokens"], batch["target"])
    assert sorted(terms) == ["layer1", "layer2", "layer3"]
    assert all(t["factor"] == pytest.approx(1 / 3) and torch.isfinite(t["loss"]) for t in terms.values())
    assert terms["layer1"]["ctc_unalignable"] >= 0 and terms["layer3"]["nll_loss"]
    sum(t["loss"] for t in terms.values()).backward()
    assert all(model.decoder.layers[l].fc1.weight.grad.abs().sum() > 0 for l in range(3))
    generator = ElmerGenerator(task.target_dictionary, 12, model.decoder.exit_threshold, summary=False)
    hypos = generator.generate([model], batch)
    out = model.generate(net["src_tokens"], net["src_lengths"], 12, model.decoder.exit_threshold)
    eos, pad = task.target_dictionary.eos(), task.target_dictionary.pad()
    for i, h in enumerate(hypos):
        keep = ctc.output_positions(out.tokens[i:i + 1], model.blank, eos, pad)[0]
        assert h[0]["tokens"].tolist() == out.tokens[i][keep].tolist() + [eos]
        assert model.blank not in h[0]["tokens"][:-1].tolist()  # the EOS that ends every hypothesis aside
        assert h[0]["exit_layers"].tolist() == out.exit_layer[i][keep].tolist()
        assert len(h[0]["position_exit_layers"]) == 12
        assert h[0]["position_tokens"].tolist() == out.tokens[i].tolist()  # before the merge, blanks included


def test_ctc_blank_eos_changes_the_loss_and_the_output(xsum_tiny):
    """The same weights with [MASK] or EOS as the blank: a different loss, and EOS is an end with
    one and is dropped, the output going on after it, with the other."""
    task, mask_model = tiny_model(xsum_tiny, "soft", extra=CTC)
    _, eos_model = tiny_model(xsum_tiny, "soft", extra=(*CTC, "--ctc-blank", "eos"))
    eos_model.load_state_dict(mask_model.state_dict())
    batch = sample_batch(task)
    net = batch["net_input"]
    eos, pad = task.target_dictionary.eos(), task.target_dictionary.pad()
    with torch.no_grad():
        losses = [m(net["src_tokens"], net["src_lengths"], net["prev_output_tokens"], batch["target"])["layer3"]["loss"]
                  for m in (mask_model, eos_model)]
        assert not torch.isclose(losses[0], losses[1])
        # the untrained model never writes EOS; scaled so, it does at about two positions of three
        eos_model.decoder.output_projection.weight[eos] *= 8
        out = eos_model.generate(net["src_tokens"], net["src_lengths"], 12, eos_model.decoder.exit_threshold)
    written = out.tokens.eq(eos)
    assert written.any()
    hypos = ElmerGenerator(task.target_dictionary, 12, eos_model.decoder.exit_threshold,
                           summary=False).generate([eos_model], batch)
    ends_at_eos = ctc.output_positions(out.tokens, mask_model.blank, eos, pad)  # EOS an end: [MASK] the blank
    goes_on = 0
    for i, h in enumerate(hypos):
        positions = out.tokens[i].tolist()
        assert h[0]["tokens"].tolist() == collapse(positions, blank=eos) + [eos]
        if eos in positions:
            assert not ends_at_eos[i, positions.index(eos):].any()
            goes_on += bool(collapse(positions[positions.index(eos):], blank=eos))
    assert goes_on  # some output has words after an EOS, which only the EOS blank keeps


def test_glancing_is_training_only_and_reveals_reference_tokens(xsum_tiny, monkeypatch):
    task, model = tiny_model(xsum_tiny, "soft", extra=("--glance", "1.0", "--gold-mix-prob", "0"))
    batch = sample_batch(task)
    net = batch["net_input"]
    seen = []
    real_forward = type(model.decoder).forward

    def recording(decoder, prev_output_tokens, *args, **kwargs):
        seen.append(prev_output_tokens.clone())
        return real_forward(decoder, prev_output_tokens, *args, **kwargs)

    monkeypatch.setattr(type(model.decoder), "forward", recording)
    mask_idx, pad = model.decoder.mask_idx, task.target_dictionary.pad()
    model.eval()  # validation: one pass over [MASK]s only
    model(net["src_tokens"], net["src_lengths"], net["prev_output_tokens"], batch["target"])
    assert len(seen) == 1 and (seen[0] == mask_idx).all()
    seen.clear()
    model.train()  # first pass on [MASK]s, then the training pass reads reference tokens where it was wrong
    terms = model(net["src_tokens"], net["src_lengths"], net["prev_output_tokens"], batch["target"])
    assert len(seen) == 2 and (seen[0] == mask_idx).all()
    shown = seen[1].ne(mask_idx)
    assert shown.any() and (seen[1][shown] == batch["target"][shown]).all()
    # glance 1.0 reveals every wrong position: the loss is on the ones the first pass got right
    assert (terms["layer1"]["mask"] == batch["target"].ne(pad) & ~shown).all()


def test_glance_loss_all_trains_every_position(xsum_tiny):
    masks = {}
    for choice in ("unrevealed", "all"):
        task, model = tiny_model(xsum_tiny, "soft", extra=("--glance", "1.0", "--glance-loss", choice))
        batch = sample_batch(task)
        net = batch["net_input"]
        torch.manual_seed(0)
        terms = model.train()(net["src_tokens"], net["src_lengths"], net["prev_output_tokens"], batch["target"])
        masks[choice] = terms["layer1"]["mask"]
    assert (masks["all"] == batch["target"].ne(task.target_dictionary.pad())).all()
    assert masks["unrevealed"].sum() < masks["all"].sum()


def test_glancing_with_ctc_reveals_the_reference_on_its_best_alignment(xsum_tiny, monkeypatch):
    task, model = tiny_model(xsum_tiny, "hard", extra=(*CTC, "--glance", "1.0"))
    batch = sample_batch(task)
    net = batch["net_input"]
    seen = []
    real = ctc.best_alignment

    def recording(*args):
        seen.append(real(*args))
        return seen[-1]

    monkeypatch.setattr(ctc, "best_alignment", recording)
    model.train()
    inputs = []
    real_forward = type(model.decoder).forward
    monkeypatch.setattr(type(model.decoder), "forward",
                        lambda d, prev, *a, **k: inputs.append(prev.clone()) or real_forward(d, prev, *a, **k))
    model(net["src_tokens"], net["src_lengths"], net["prev_output_tokens"], batch["target"])
    aligned = seen[0]
    labels, lengths = ctc.labels(batch["target"], task.target_dictionary.pad(), task.target_dictionary.eos())
    fits = ~ctc.unalignable(labels, lengths, aligned.size(1))
    for i in fits.nonzero().flatten().tolist():
        assert collapse(aligned[i].tolist(), model.blank) == labels[i, :lengths[i]].tolist()
    shown = inputs[1].ne(model.blank)
    assert shown.any() and (inputs[1][shown] == aligned[shown]).all()


def test_fairseq_train_and_generate_with_ctc_and_glancing(xsum_tiny, tmp_path):
    run = run_cli("fairseq-train", *train_args(xsum_tiny, tmp_path, "--exit-mode", "soft", *CTC,
                                               "--glance", "0.5:0.3", updates=3))
    assert "ctc_unalignable" in run.stdout
    ckpt = tmp_path / "checkpoint_last.pt"
    model_cfg = torch.load(ckpt, weights_only=False)["cfg"]["model"]
    assert model_cfg.output_loss == "ctc" and model_cfg.ctc_blank == "mask"  # the default, recorded
    # resumes: one more update from the checkpoint
    more = run_cli("fairseq-train", *train_args(xsum_tiny, tmp_path, "--exit-mode", "soft", *CTC,
                                                "--glance", "0.5:0.3", updates=4))
    assert list(update_losses(more.stdout)) == [4]
    gen = run_cli("fairseq-generate", *generate_args(xsum_tiny, ckpt))
    assert len(hypotheses(gen.stdout)) == 8
    assert "<mask>" not in "".join(hypotheses(gen.stdout).values())
    assert "ELMER exit layers over" in gen.stdout and "decoder positions" in gen.stdout


def test_ctc_stage_fine_tunes_from_a_ce_checkpoint(xsum_tiny, tmp_path):
    """The two-stage recipe (docs/one-pass.md): a ce ELMER, then CTC from its weights, EOS the blank."""
    ce = tmp_path / "ce"
    run_cli("fairseq-train", *train_args(xsum_tiny, ce, "--exit-mode", "soft", updates=2))
    stage_one = torch.load(ce / "checkpoint_last.pt", weights_only=False)
    assert stage_one["cfg"]["model"].output_loss == "ce"
    run = run_cli("fairseq-train", *train_args(xsum_tiny, tmp_path / "ctc", "--exit-mode", "soft", *CTC,
                                               "--ctc-blank", "eos", "--glance", "0.3", "--finetune-from-model",
                                               ce / "checkpoint_last.pt", updates=1))
    assert f"loading pretrained model from {ce / 'checkpoint_last.pt'}" in run.stdout
    stage_two = torch.load(tmp_path / "ctc" / "checkpoint_last.pt", weights_only=False)
    assert stage_two["cfg"]["model"].output_loss == "ctc" and stage_two["cfg"]["model"].ctc_blank == "eos"
    assert stage_two["optimizer_history"][-1]["num_updates"] == 1  # a new run, not stage one resumed
    changed = [k for k, w in stage_one["model"].items() if not torch.equal(w, stage_two["model"][k])]
    assert changed and set(stage_two["model"]) == set(stage_one["model"])  # the same parameters, trained on
    gen = run_cli("fairseq-generate", *generate_args(xsum_tiny, tmp_path / "ctc" / "checkpoint_last.pt"))
    assert len(hypotheses(gen.stdout)) == 8 and "<mask>" not in "".join(hypotheses(gen.stdout).values())


@pytest.mark.parametrize("extra, needle", [
    (("--glance", "1.5"), "--glance 1.5: ratios must be in [0, 1]"),
    (("--glance", "0.5:0.3"), "--max-update"),  # the tiny model has none to anneal over
    ((*CTC, "--gold-mix-prob", "0.3"), "--gold-mix-prob 0.3"),
    ((*CTC, "--criterion", "elmer_loss", "--label-smoothing", "0.1"),
     "--label-smoothing 0.1: not defined for --output-loss ctc"),
    ((*CTC, "--eos-after-end"), "--eos-after-end"),
    (("--ctc-blank", "eos"), "--ctc-blank eos chooses CTC's blank symbol: it needs --output-loss ctc"),
    (("--glance-loss", "all"), "--glance-loss all"),
    ((*CTC, "--glance", "0.3", "--glance-loss", "unrevealed"), "--glance-loss unrevealed"),
])
def test_bad_ctc_and_glance_options_are_refused(xsum_tiny, extra, needle):
    with pytest.raises(ValueError) as err:
        tiny_model(xsum_tiny, "soft", extra=extra)
    assert needle in str(err.value)


def test_ctc_refuses_oracle_length(xsum_tiny, tmp_path):
    run_cli("fairseq-train", *train_args(xsum_tiny, tmp_path, "--exit-mode", "soft", *CTC, updates=1))
    expect_failure("fairseq-generate", generate_args(xsum_tiny, tmp_path / "checkpoint_last.pt", "--oracle-length"),
                   "--oracle-length")
