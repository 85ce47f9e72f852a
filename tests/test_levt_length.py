"""fairseq's LevT never decodes past its position table (elmer_fairseq/patches.py): fairseq caps
each slot's placeholder insertions (at 255, and at max(10, 2 x the source length)) but not their
total, so a LevT with fewer positions than it inserts failed with an IndexError. The plugin cuts the insertions
to the room the table has; outputs that fit are unchanged."""
import pytest
import torch
from fairseq import options, tasks
from fairseq.models.nat import levenshtein_transformer as levt

from elmer_fairseq import patches

from conftest import USER_DIR, sample_batch

POSITIONS = 8  # the decoder's table: <s>, </s> and at most 6 words
WANTED = 200  # placeholders an untrained insertion head may ask for in one slot (its classes go to 255)


def levt_model(data, positions):
    args = options.parse_args_and_arch(options.get_training_parser(), [
        str(data), "--user-dir", str(USER_DIR), "--task", "translation_lev", "--noise", "random_delete",
        "--arch", "levenshtein_transformer", "--encoder-learned-pos", "--decoder-learned-pos", "--share-all-embeddings",
        "--encoder-layers", "1", "--decoder-layers", "1", "--early-exit", "1,1,1", "--encoder-embed-dim", "32",
        "--decoder-embed-dim", "32", "--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "64",
        "--encoder-attention-heads", "2", "--decoder-attention-heads", "2", "--max-source-positions", "1024",
        "--max-target-positions", str(positions), "--cpu"])
    torch.manual_seed(0)
    task = tasks.setup_task(args)
    return task, task.build_model(args).eval(), task.build_generator(None, args)


def decode(task, model, generator, batch):
    """fairseq's iterative refinement (10 iterations) as fairseq-generate runs it: output tokens per sample."""
    with torch.no_grad():
        return [hypos[0]["tokens"] for hypos in task.inference_step(generator, [model], batch)]


def greedy_inserter(model, monkeypatch):
    """The insertion head asks for WANTED placeholders in every slot."""
    forward_mask_ins = model.decoder.forward_mask_ins

    def wants_many(**inputs):
        score, extra = forward_mask_ins(**inputs)
        return torch.full_like(score, -10.0).index_fill_(-1, torch.tensor([WANTED]), 0.0), extra

    monkeypatch.setattr(model.decoder, "forward_mask_ins", wants_many)


def unpatched(monkeypatch):
    for owner, name in ((levt.LevenshteinTransformerModel, "forward_decoder"), (levt, "_apply_ins_masks")):
        key = f"{levt.__name__}.{'LevenshteinTransformerModel.' if owner is not levt else ''}{name}"
        monkeypatch.setattr(owner, name, patches._original[key])


def test_a_levt_that_inserts_past_its_positions_stops_at_the_table(xsum_tiny, monkeypatch):
    task, model, generator = levt_model(xsum_tiny, POSITIONS)
    assert model.decoder.max_positions() == POSITIONS
    batch = sample_batch(task, size=4)
    greedy_inserter(model, monkeypatch)
    outputs = decode(task, model, generator, batch)
    assert len(outputs) == 4
    # the first step fills the one slot between <s> and </s> up to the table, which they stay at
    bos, eos = task.tgt_dict.bos(), task.tgt_dict.eos()
    assert all(len(tokens) == POSITIONS and tokens[0] == bos and tokens[-1] == eos for tokens in outputs)
    unpatched(monkeypatch)  # fairseq alone runs past the table
    with pytest.raises(IndexError):
        decode(task, model, generator, batch)


def test_outputs_that_fit_are_unchanged(xsum_tiny, monkeypatch):
    """A random LevT with the default table (1024 positions): the cap never binds, the outputs are
    fairseq's own."""
    task, model, generator = levt_model(xsum_tiny, 1024)
    batch = sample_batch(task, size=4)
    capped = decode(task, model, generator, batch)
    unpatched(monkeypatch)
    assert all(torch.equal(a, b) for a, b in zip(capped, decode(task, model, generator, batch)))


def test_insertions_are_kept_from_the_left_until_the_room_is_used():
    bos, eos, pad, unk, a = 0, 2, 1, 3, 9
    tokens = torch.tensor([[bos, a, eos, pad], [bos, eos, pad, pad]])
    wanted = torch.tensor([[3, 4, 7], [9, 5, 5]])  # the last slots of both lie in the padding
    token = patches._levt_positions.set(8)
    try:
        out, _ = patches._apply_ins_masks(tokens.clone(), None, wanted, pad, unk, eos)
    finally:
        patches._levt_positions.reset(token)
    # row 0: room 8 - 3 = 5 -> 3 + 2; row 1: room 6 -> 6
    assert out.tolist() == [[bos, unk, unk, unk, a, unk, unk, eos], [bos, *[unk] * 6, eos]]
