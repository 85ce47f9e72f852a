"""elmer-convert: HF BART-style and BERT-family checkpoints as ELMER fairseq checkpoints, checked
against transformers' own BART, BERT and RoBERTa (tiny random ones built here: nothing is downloaded)."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fairseq import checkpoint_utils, options, tasks
from fairseq.data import data_utils
from tokenizers import BertWordPieceTokenizer, ByteLevelBPETokenizer

from conftest import ROOT, XSUM_TINY, cli_env, expect_failure, generate_args, run_cli, write_pairs
from elmer_fairseq import ELMER
from elmer_fairseq.bpe import TokenizerVocab
from elmer_fairseq.convert import convert_bert_family, convert_hf_bart, read_hf, save

# fairseq-fixed installs a torchaudio built for another torch, which cannot load, and transformers
# imports torchaudio whenever it is installed. BART needs no audio.
sys.modules.setdefault("torchaudio", None)
from transformers import (BartConfig, BartForConditionalGeneration, BertConfig, BertModel,  # noqa: E402
                          RobertaConfig, RobertaForMaskedLM)

TOLERANCE = 1e-5  # fp32, eval mode
LENGTH = 7  # [MASK] positions the decoder fills
SOURCES = [[5, 17, 42, 9, 33, 2], [61, 8, 2], [70, 71, 12, 13, 14, 15, 16, 2]]  # BART ids, each ending in </s>


def tiny_bart(vocab_size=100, positions=64, scale_embedding=False, seed=0):
    """A random BART with unequal encoder and decoder sizes, so that a swapped option shows."""
    config = BartConfig(vocab_size=vocab_size, d_model=32, encoder_layers=2, decoder_layers=3,
                        encoder_attention_heads=2, decoder_attention_heads=4, encoder_ffn_dim=64,
                        decoder_ffn_dim=48, max_position_embeddings=positions, dropout=0.0, attention_dropout=0.0,
                        activation_dropout=0.0, scale_embedding=scale_embedding, attn_implementation="eager")
    torch.manual_seed(seed)
    model = BartForConditionalGeneration(config).eval()
    with torch.no_grad():  # HF starts biases at 0 and norms at 1: move them, so that a swapped name shows
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def hf_bart():
    return tiny_bart()


def authors_concat_head(hf):
    """The authors' soft exit W: h~ = concat_head([h; Embed(argmax lm_head(h))]), Linear(2d, d), no bias."""
    torch.manual_seed(1)
    return torch.nn.Linear(2 * hf.config.d_model, hf.config.d_model, bias=False)


@torch.no_grad()
def hf_reference(hf, concat_head=None):
    """transformers' BART with a bidirectional decoder over LENGTH [MASK]s: the encoder output of
    each source [S_i, C] and every decoder layer's output [B, T, C]. With `concat_head`, the
    authors' soft exit runs between the decoder layers."""
    src = data_utils.collate_tokens([torch.tensor(s) for s in SOURCES], pad_idx=1)  # right-padded, as HF pads
    masks = torch.full((len(SOURCES), LENGTH), hf.config.vocab_size - 1)
    layers = hf.model.decoder.layers
    states = []
    hooks = [layer.register_forward_hook(lambda m, a, out: states.append(out[0] if isinstance(out, tuple) else out))
             for layer in layers]
    if concat_head is not None:
        def fuse(module, args):
            h = args[0]
            y = hf.lm_head(h).argmax(-1)
            return (concat_head(torch.cat([h, hf.get_input_embeddings()(y)], dim=-1)),) + args[1:]
        hooks += [layer.register_forward_pre_hook(fuse) for layer in layers[1:]]
    # transformers uses a 4D decoder mask as given: zeros = every position attends to every other
    bidirectional = torch.zeros(len(SOURCES), 1, LENGTH, LENGTH)
    try:
        out = hf(input_ids=src, attention_mask=src.ne(1).long(), decoder_input_ids=masks,
                 decoder_attention_mask=bidirectional)
    finally:
        for hook in hooks:
            hook.remove()
    encoder = [out.encoder_last_hidden_state[i, : len(s)] for i, s in enumerate(SOURCES)]
    return encoder, states


def logits(hf, h):
    return hf.lm_head(h) + hf.final_logits_bias


def encode(model):
    """Our encoder on the sources left-padded, as fairseq batches them."""
    src = data_utils.collate_tokens([torch.tensor(s) for s in SOURCES], pad_idx=1, left_pad=True)
    lengths = torch.tensor([len(s) for s in SOURCES])
    return src, lengths, model.encoder(src, src_lengths=lengths)


def max_diff(ours, reference):
    return max(float((a - b).abs().max()) for a, b in zip(ours, reference))


def masks_for(model):
    return torch.full((len(SOURCES), LENGTH), model.decoder.mask_idx)


@torch.no_grad()
def assert_computes_bart(model, hf):
    """`model` (converted with hard exit, delta = 0: no position exits early) is `hf` with a
    bidirectional decoder: encoder, every decoder layer, every off-ramp, the decoded tokens."""
    hf_encoder, hf_states = hf_reference(hf)
    src, lengths, encoder_out = encode(model)
    enc = encoder_out["encoder_out"][0].transpose(0, 1)  # [B, S, C], real tokens last (left-padded)
    assert max_diff([enc[i, -len(s):] for i, s in enumerate(SOURCES)], hf_encoder) < TOLERANCE

    x = model.decoder.embed(masks_for(model))
    states = []
    for layer in range(model.decoder.num_layers):
        x = model.decoder.run_layer(layer, x, encoder_out)
        states.append(x.transpose(0, 1))
    assert len(states) == len(hf_states) == 3
    assert max_diff(states, hf_states) < TOLERANCE

    hf_logits = [logits(hf, h) for h in hf_states]
    assert max_diff(model.decoder(masks_for(model), encoder_out), hf_logits) < TOLERANCE
    decoded = model.generate(src, lengths, LENGTH, exit_threshold=0.0)
    assert torch.equal(decoded.tokens, hf_logits[-1].argmax(-1))


def test_cli_output_computes_bart(hf_bart, tmp_path):
    """The real `elmer-convert` on a save_pretrained folder; the output loads safely and is BART."""
    hf_bart.save_pretrained(tmp_path / "hf")
    proc = run_cli("elmer-convert", tmp_path / "hf", tmp_path / "out", "--exit-mode", "hard", "--exit-threshold", "0")
    path = tmp_path / "out" / "model.pt"
    state = torch.load(path, weights_only=True)  # only the classes the plugin allow-lists
    assert state["cfg"]["task"]["_name"] == "elmer_translation"
    assert f"fairseq-train --arch {state['cfg']['model'].arch} " in proc.stdout
    assert "--decoder-ffn-embed-dim 48 " in proc.stdout  # the fine-tuning options for this size
    assert f"--finetune-from-model {path}" in proc.stdout
    models, _ = checkpoint_utils.load_model_ensemble([str(path)])  # dictionaries from the checkpoint's folder
    assert models[0].decoder.mask_idx == hf_bart.config.vocab_size - 1
    assert_computes_bart(models[0].eval(), hf_bart)


def test_scaled_embeddings(tmp_path):
    hf = tiny_bart(scale_embedding=True)
    path = save(convert_hf_bart(hf.state_dict(), hf.config, exit_mode="hard", exit_threshold=0), tmp_path)
    models, _ = checkpoint_utils.load_model_ensemble([str(path)])
    assert models[0].decoder.embed_scale == hf.config.d_model ** 0.5
    assert_computes_bart(models[0].eval(), hf)


@torch.no_grad()
def test_authors_concat_head_is_soft_exit(hf_bart, tmp_path):
    """The authors' format (transformers 4 .bin with every tied name, plus concat_head) loads with
    ELMER.from_pretrained and runs soft exit as their decoder does."""
    concat_head = authors_concat_head(hf_bart)
    folder = tmp_path / "elmer-base"
    folder.mkdir()
    torch.save({**hf_bart.state_dict(), "concat_head.weight": concat_head.weight}, folder / "pytorch_model.bin")
    (folder / "config.json").write_text(hf_bart.config.to_json_string(), encoding="utf-8")
    state_dict, config, weights = read_hf(folder)
    path = save(convert_hf_bart(state_dict, config, source=str(weights)), tmp_path / "out")

    hub = ELMER.from_pretrained(path, data=path.parent, device="cpu")
    assert hub.exit_mode == "soft"
    assert len(hub.generate(["5 17 42 9"])) == 1
    model = hub.models[0]
    _, hf_states = hf_reference(hf_bart, concat_head)
    _, _, encoder_out = encode(model)
    assert max_diff(model.decoder(masks_for(model), encoder_out), [logits(hf_bart, h) for h in hf_states]) < TOLERANCE
    # the checkpoint's own W is used: an option about starting one is refused, not ignored
    expect_failure("elmer-convert", [folder, tmp_path / "again", "--soft-exit-init", "random"],
                   "has its own soft-exit W (concat_head.weight)")


def test_plain_bart_soft_exit_starts_as_pass_through_or_from_initialisation(hf_bart, caplog):
    with caplog.at_level("INFO"):
        passing = convert_hf_bart(hf_bart.state_dict(), hf_bart.config)["model"]["decoder.soft_exit.weight"]
    assert "has no soft-exit W: it starts pass-through" in caplog.text
    dim = hf_bart.config.d_model
    assert torch.equal(passing, torch.cat([torch.zeros(dim, dim), torch.eye(dim)], dim=1))
    first = convert_hf_bart(hf_bart.state_dict(), hf_bart.config, soft_exit_init="random")
    again = convert_hf_bart(hf_bart.state_dict(), hf_bart.config, soft_exit_init="random")
    assert torch.equal(first["model"]["decoder.soft_exit.weight"], again["model"]["decoder.soft_exit.weight"])  # the seed
    assert not torch.equal(first["model"]["decoder.soft_exit.weight"], passing)


def test_sharded_and_bare_checkpoints(hf_bart, tmp_path):
    """A sharded safetensors folder and a bare BartModel's names (no `model.`) give the same weights."""
    hf_bart.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    sharded, config, _ = read_hf(tmp_path / "sharded")
    expected = convert_hf_bart(hf_bart.state_dict(), hf_bart.config, exit_mode="hard")["model"]
    for state_dict in (sharded, hf_bart.model.state_dict()):
        converted = convert_hf_bart(state_dict, config, exit_mode="hard")["model"]
        assert converted.keys() == expected.keys()
        assert all(torch.equal(converted[k], expected[k]) for k in expected)


def drop(key):
    return lambda sd, cfg: sd.pop(key)


def untie(sd, cfg):
    sd["lm_head.weight"] = sd["model.shared.weight"] + 1


def bias(sd, cfg):
    sd["final_logits_bias"] = torch.ones_like(sd["final_logits_bias"])


def shrink_ffn(sd, cfg):
    cfg["decoder_ffn_dim"] = 40


def extra(sd, cfg):
    sd["classification_head.dense.weight"] = torch.zeros(2, 2)


def mbart(sd, cfg):
    cfg["model_type"] = "mbart"


@pytest.mark.parametrize("spoil,message", [
    (drop("model.decoder.layers.1.fc2.weight"),
     r"no model\.decoder\.layers\.1\.fc2\.weight \(for our decoder\.layers\.1\.fc2\.weight\)"),
    (shrink_ffn, r"model\.decoder\.layers\.0\.fc1\.weight has shape \[48, 32\], but the config needs \[40, 32\]"),
    (untie, r"lm_head\.weight differs from model\.shared\.weight"),
    (bias, r"final_logits_bias is not zero"),
    (extra, r"weights that a BART of this config does not have: classification_head\.dense\.weight"),
    (mbart, r"model_type 'mbart'"),
], ids=["missing", "shape", "untied", "bias", "unexpected", "mbart"])
def test_bad_checkpoints_name_the_file_and_the_weight(hf_bart, tmp_path, spoil, message):
    state_dict, config = dict(hf_bart.state_dict()), hf_bart.config.to_dict()
    spoil(state_dict, config)
    torch.save(state_dict, tmp_path / "weights.bin")
    (tmp_path / "config.json").write_text(json.dumps(config), encoding="utf-8")
    state_dict, config, weights = read_hf(tmp_path / "weights.bin")
    with pytest.raises(ValueError, match=re.escape(str(weights)) + ": .*" + message):
        convert_hf_bart(state_dict, config, source=str(weights))


def test_cli_error_is_one_line_and_writes_nothing(hf_bart, tmp_path):
    hf_bart.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").unlink()
    proc = run_cli("elmer-convert", tmp_path / "hf", tmp_path / "out", check=False)
    assert proc.returncode == 1
    assert proc.stdout.splitlines()[-1] == f"elmer-convert: error: {tmp_path / 'hf'}: none of model.safetensors, " \
                                           f"model.safetensors.index.json, pytorch_model.bin, pytorch_model.bin.index.json"
    assert not (tmp_path / "out").exists()


def test_tokenizer_with_other_special_ids_is_refused(hf_bart, tmp_path):
    hf_bart.save_pretrained(tmp_path)
    (tmp_path / "vocab.json").write_text(json.dumps({"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<mask>": 4}))
    with pytest.raises(ValueError, match=r"vocab\.json: special tokens at \{'<mask>': 4\}"):
        read_hf(tmp_path)


def test_fine_tune_converted_bart(tmp_path):
    """The README's recipe end to end: a BART with its own byte-level BPE, converted; text encoded
    with that BPE, binarized with the converted dict.txt; fairseq-train --finetune-from-model with
    the options elmer-convert prints; the result generates text through ELMER.from_pretrained."""
    rows = [json.loads(line) for line in XSUM_TINY.read_text(encoding="utf-8").splitlines()]
    hf_dir = tmp_path / "bart"
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([r["document"] for r in rows], vocab_size=300,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>"])
    hf_dir.mkdir()
    bpe.save_model(str(hf_dir))
    vocab = json.loads((hf_dir / "vocab.json").read_text(encoding="utf-8"))
    vocab["<mask>"] = len(vocab)  # BART's layout: <mask> is the last id
    (hf_dir / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    # positions for whole summaries: fairseq-train skips targets longer than the model's positions
    tiny_bart(vocab_size=len(vocab), positions=256).save_pretrained(hf_dir)
    out = tmp_path / "converted"
    printed = run_cli("elmer-convert", hf_dir, out).stdout
    model_options = re.search(r"fairseq-train (.*) --finetune-from-model (\S+)", printed)

    encoder = ByteLevelBPETokenizer(str(hf_dir / "vocab.json"), str(hf_dir / "merges.txt"))

    def ids(text):
        return " ".join(map(str, encoder.encode(text).ids))

    pairs = [(ids(r["document"]), ids(r["summary"])) for r in rows]
    raw = tmp_path / "raw"
    raw.mkdir()
    write_pairs(raw, "train", pairs[:8])
    write_pairs(raw, "valid", pairs[8:12])
    run_cli("fairseq-preprocess", "--source-lang", "src", "--target-lang", "tgt", "--srcdict", out / "dict.txt",
            "--joined-dictionary", "--trainpref", raw / "train", "--validpref", raw / "valid",
            "--destdir", tmp_path / "bin", "--workers", "1")
    proc = run_cli("fairseq-train", tmp_path / "bin", "--user-dir", ROOT / "elmer_fairseq",
                   "--task", "elmer_translation", *model_options.group(1).split(),
                   "--finetune-from-model", model_options.group(2),
                   "--exit-mode", "soft", "--criterion", "elmer_loss", "--optimizer", "adam", "--lr", "1e-4",
                   "--max-tokens", "2048", "--max-update", "2", "--truncate-source", "--max-target-length", "24",
                   "--save-dir", tmp_path / "ckpt", "--no-epoch-checkpoints", "--cpu", "--num-workers", "0")
    assert f"loading pretrained model from {out / 'model.pt'}" in proc.stdout
    hub = ELMER.from_pretrained(tmp_path / "ckpt", data=tmp_path / "bin", bpe_dir=hf_dir, device="cpu")
    assert len(hub.generate([rows[0]["document"]])) == 1


# BERT-family checkpoints

BERT_SPECIALS = ["[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # not fairseq's order, so a shift shows
ROBERTA_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


def xsum_texts():
    rows = [json.loads(line) for line in XSUM_TINY.read_text(encoding="utf-8").splitlines()]
    return rows, [r["document"] for r in rows] + [r["summary"] for r in rows]


def perturbed(model, seed=0):
    """HF starts biases at 0 and norms at 1: move them, so that a swapped name shows."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def tiny_bert(folder, positions=72, vocab_size=150):
    """A random BertModel (eps 1e-12, with pooler) and a WordPiece tokenizer.json of its vocabulary,
    saved in `folder` as a checkpoint folder is; returns the model."""
    tok = BertWordPieceTokenizer(lowercase=True)
    tok.train_from_iterator(xsum_texts()[1], vocab_size=vocab_size, special_tokens=BERT_SPECIALS)
    config = BertConfig(vocab_size=tok.get_vocab_size() + 3, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=48, max_position_embeddings=positions,
                        layer_norm_eps=1e-12, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        pad_token_id=0, attn_implementation="eager")
    model = perturbed(BertModel(config))
    model.save_pretrained(folder)
    tok.save(str(folder / "tokenizer.json"))
    return model


def tiny_roberta(folder):
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(xsum_texts()[1], vocab_size=300, special_tokens=ROBERTA_SPECIALS)
    config = RobertaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=48, max_position_embeddings=66,
                           type_vocab_size=1, layer_norm_eps=1e-5, hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0, pad_token_id=1, attn_implementation="eager")
    model = perturbed(RobertaForMaskedLM(config))
    model.save_pretrained(folder)
    tok.save(str(folder / "tokenizer.json"))
    return model


def converted(folder, tmp_path, **kwargs):
    """In-process conversion of a checkpoint folder, saved and loaded back as fairseq loads it."""
    state_dict, config, weights = read_hf(folder)
    vocab = TokenizerVocab(folder / "tokenizer.json")
    dictionary = kwargs.pop("dictionary", None)
    checkpoints = convert_bert_family(state_dict, config, vocab, dictionary, source=str(weights), **kwargs)
    paths = {name: save(ckpt, tmp_path / "out", dictionary or vocab.dictionary(), name)
             for name, (ckpt, _) in checkpoints.items()}
    models, _ = checkpoint_utils.load_model_ensemble([str(paths["model.pt"])])
    return models[0].eval(), vocab, checkpoints


BERT_SOURCES = ["The council said the road would reopen.", "Police closed it.",
                "Scientists have found a new species of frog in the rainforest."]


@torch.no_grad()
def assert_encoder_computes(model, hf, vocab, texts=BERT_SOURCES):
    """Every encoder layer's output (and the embeddings') equals the HF encoder's for the same pieces
    (HF right-padded with an attention mask, fairseq left-padded)."""
    pieces = [p + ["</s>"] for p in vocab.tokenize(texts)]
    d = model.encoder.dictionary
    src = data_utils.collate_tokens([torch.tensor([d.index(p) for p in ps]) for ps in pieces], d.pad(), left_pad=True)
    assert not src.eq(d.unk()).any()
    ids = data_utils.collate_tokens([torch.tensor([vocab.ids[p] for p in ps]) for ps in pieces], vocab.ids["<pad>"])
    lengths = torch.tensor([len(ps) for ps in pieces])
    ours = model.encoder(src, src_lengths=lengths, return_all_hiddens=True)["encoder_states"]
    theirs = hf(input_ids=ids, attention_mask=ids.ne(vocab.ids["<pad>"]).long(), output_hidden_states=True).hidden_states
    assert len(ours) == len(theirs) == hf.config.num_hidden_layers + 1
    for layer, (a, b) in enumerate(zip(ours, theirs)):
        a = a.transpose(0, 1)
        diff = max(float((a[i, -n:] - b[i, :n]).abs().max()) for i, n in enumerate(lengths.tolist()))
        assert diff < TOLERANCE, f"layer {layer}: {diff}"


def test_bert_layers_compute_bert(tmp_path):
    """The real elmer-convert on a save_pretrained BertModel + tokenizer.json: every encoder layer
    is BERT's, and the decoder's self-attention + FFN stack (cross-attention left out) is too."""
    hf = tiny_bert(tmp_path / "hf")
    printed = run_cli("elmer-convert", tmp_path / "hf", tmp_path / "out").stdout
    assert "--layernorm-eps 1e-12 " in printed
    assert "pooler.* (a task head of the encoder) is not used" in printed
    assert "freshly initialised: decoder.layers.*.encoder_attn.k_proj" in printed
    models, _ = checkpoint_utils.load_model_ensemble([str(tmp_path / "out" / "model.pt")])
    model = models[0].eval()
    assert model.decoder.layernorm_embedding.eps == 1e-12
    vocab = TokenizerVocab(tmp_path / "hf" / "tokenizer.json")
    assert "[unused0]" not in model.encoder.dictionary and model.decoder.mask_idx == len(model.encoder.dictionary) - 1
    assert_encoder_computes(model, hf, vocab)

    with torch.no_grad():
        tokens = torch.randint(model.encoder.dictionary.nspecial, len(model.encoder.dictionary) - 1, (2, 9))
        ids = torch.tensor([[vocab.ids[model.encoder.dictionary[t]] for t in row] for row in tokens.tolist()])
        theirs = hf(input_ids=ids, output_hidden_states=True).hidden_states
        x = model.decoder.embed(tokens)
        for layer, decoder_layer in enumerate(model.decoder.layers):
            decoder_layer.encoder_attn = None  # fairseq's layer then runs self-attention and FFN only
            x = decoder_layer(x, None, None)[0]
            assert float((x.transpose(0, 1) - theirs[layer + 1]).abs().max()) < TOLERANCE


@pytest.mark.parametrize("how", ["pass-through", "random"])
def test_soft_exit_w_passes_the_pretrained_stack_through(tmp_path, caplog, how):
    """BERT has no soft-exit W. Started as [0 | I] (the default), the converted soft-exit decoder
    computes BERT's layer stack unchanged before fine-tuning; from ELMER's random initialisation,
    every layer above the first reads a random projection of the one below."""
    tiny_bert(tmp_path / "hf")
    with caplog.at_level("INFO"):
        model, _, _ = converted(tmp_path / "hf", tmp_path, **({"soft_exit_init": how} if how == "random" else {}))
    assert f"has no soft-exit W: it starts {how}" in caplog.text
    decoder, nspecial = model.decoder, model.encoder.dictionary.nspecial
    torch.manual_seed(0)
    src = torch.randint(nspecial, len(model.encoder.dictionary) - 1, (2, 9))
    prev = torch.full((2, 7), decoder.mask_idx)
    with torch.no_grad():
        encoder_out = model.encoder(src, src_lengths=torch.tensor([9, 9]))
        soft = decoder(prev, encoder_out)
        x, plain = decoder.embed(prev), []
        for layer in range(decoder.num_layers):
            x = decoder.run_layer(layer, x, encoder_out)
            plain.append(torch.nn.functional.linear(x, decoder.off_ramp_weight(layer)).transpose(0, 1))
    diffs = [float((a - b).abs().max()) for a, b in zip(soft, plain)]
    assert diffs[0] == 0  # nothing is fused below the first layer
    if how == "pass-through":
        assert max(diffs) < TOLERANCE
    else:
        assert diffs[1] > 100 * TOLERANCE


def test_soft_exit_init_is_refused_with_hard_exit(tmp_path):
    tiny_bert(tmp_path / "hf")
    expect_failure("elmer-convert", [tmp_path / "hf", tmp_path / "out", "--exit-mode", "hard", "--soft-exit-init",
                                     "random"], "--soft-exit-init", "--exit-mode hard has no soft-exit W")
    assert not (tmp_path / "out").exists()


def test_fairseq_eps_changes_bert_outputs(tmp_path):
    """Why --layernorm-eps: with fairseq's 1e-5 the same weights are off by far more than the tolerance."""
    hf = tiny_bert(tmp_path / "hf")
    model, vocab, _ = converted(tmp_path / "hf", tmp_path)
    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.eps = 1e-5
    with pytest.raises(AssertionError, match="layer"):
        assert_encoder_computes(model, hf, vocab)


def test_roberta_mlm_computes_roberta(tmp_path, caplog):
    """RobertaForMaskedLM: `roberta.` names, positions offset by 2 as fairseq's, the MLM head named as unused."""
    hf = tiny_roberta(tmp_path / "hf")
    with caplog.at_level("WARNING"):
        model, vocab, _ = converted(tmp_path / "hf", tmp_path)
    assert "its MLM head (lm_head.*: a dense + LayerNorm transform and an output bias) is not used" in caplog.text
    assert model.encoder.embed_positions.weight.size(0) == hf.config.max_position_embeddings
    assert_encoder_computes(model, hf.roberta, vocab)


def test_dict_keeps_the_rows_of_its_symbols(tmp_path):
    """--dict: a dictionary of some pieces, in its own order; each row is BERT's row of that piece."""
    hf = tiny_bert(tmp_path / "hf")
    vocab = TokenizerVocab(tmp_path / "hf" / "tokenizer.json")
    pieces = vocab.dictionary().symbols[4:]
    kept = [pieces[40], pieces[3], pieces[-1], pieces[7]]  # not in id order
    (tmp_path / "dict.txt").write_text("".join(f"{s} 7\n" for s in kept), encoding="utf-8")
    dictionary = vocab.load_dictionary(tmp_path / "dict.txt")
    model, _, _ = converted(tmp_path / "hf", tmp_path, dictionary=dictionary)
    symbols = model.encoder.dictionary.symbols
    assert symbols == ["<s>", "<pad>", "</s>", "<unk>", *kept, "<mask>"]
    words = hf.embeddings.word_embeddings.weight
    rows = [vocab.ids[s] for s in symbols]
    assert rows[:4] + rows[-1:] == [3, 0, 4, 2, 5]  # [CLS] [PAD] [SEP] [UNK] [MASK]
    for embedding in (model.encoder.embed_tokens, model.decoder.embed_tokens, model.decoder.output_projection):
        assert torch.equal(embedding.weight, words[rows])
    assert (tmp_path / "out" / "dict.txt").read_text(encoding="utf-8").split() == [w for s in kept for w in (s, "7")]


@pytest.mark.parametrize("line,message", [
    ("zebraxyz 1", r"dict\.txt:2: 'zebraxyz' is not a symbol of .*tokenizer\.json; was the dictionary made with "
                   r"another tokenizer\?"),
    ("[CLS] 1", r"dict\.txt:2: '\[CLS\]' is not a symbol of .*tokenizer\.json \(write <s> for it\)"),
], ids=["unknown", "special"])
def test_dict_of_another_vocabulary_is_refused(tmp_path, line, message):
    tiny_bert(tmp_path / "hf")
    (tmp_path / "dict.txt").write_text(f"the 1\n{line}\n", encoding="utf-8")
    proc = run_cli("elmer-convert", tmp_path / "hf", tmp_path / "out", "--dict", tmp_path / "dict.txt", check=False)
    assert proc.returncode == 1
    assert re.fullmatch("elmer-convert: error: " + re.escape(str(tmp_path)) + "/" + message, proc.stdout.splitlines()[-1])
    assert not (tmp_path / "out").exists()


def gpt2(folder, config):
    config["model_type"] = "gpt2"


def other_pad(folder, config):
    config["pad_token_id"] = 2


def no_specials(folder, config):
    tokenizer = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    tokenizer["added_tokens"] = [t for t in tokenizer["added_tokens"] if t["content"] != "[MASK]"]
    del tokenizer["model"]["vocab"]["[MASK]"]
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer), encoding="utf-8")


def small_vocab(folder, config):
    config["vocab_size"] = 20


@pytest.mark.parametrize("spoil,message", [
    (gpt2, r"model\.safetensors: model_type 'gpt2'; elmer-convert converts BART-style \(bart\) and BERT-family "
           r"\(bert, roberta\) checkpoints"),
    (other_pad, r"tokenizer\.json: \[PAD\] has id 0, but the config of .*model\.safetensors has pad_token_id 2"),
    (no_specials, r"tokenizer\.json: lacks \[MASK\] of BERT's special tokens and <s> <pad> </s> <unk> <mask> of "
                  r"RoBERTa's"),
    (small_vocab, r"tokenizer\.json: '.*' has id \d+, beyond the vocab_size 20 of .*model\.safetensors"),
], ids=["gpt2", "pad", "specials", "vocab-size"])
def test_bad_bert_checkpoints_name_the_file(tmp_path, spoil, message):
    tiny_bert(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text(encoding="utf-8"))
    spoil(tmp_path / "hf", config)
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config), encoding="utf-8")
    state_dict, config, weights = read_hf(tmp_path / "hf")
    with pytest.raises(ValueError, match=message):
        if config["model_type"] == "gpt2":
            convert_hf_bart(state_dict, config, source=str(weights))
        convert_bert_family(state_dict, config, TokenizerVocab(tmp_path / "hf" / "tokenizer.json"), source=str(weights))


def test_bert_options_are_refused_for_bart(hf_bart, tmp_path):
    hf_bart.save_pretrained(tmp_path / "hf")
    proc = run_cli("elmer-convert", tmp_path / "hf", tmp_path / "out", "--for", "transformer", check=False)
    assert proc.stdout.splitlines()[-1] == (f"elmer-convert: error: --for: for BERT-family checkpoints; "
                                            f"{tmp_path / 'hf' / 'model.safetensors'} is model_type 'bart'")


def test_warm_start_elmer_and_baselines(tmp_path):
    """docs/converting.md end to end on a tiny BERT: data tokenized with its tokenizer.json and a
    trimmed dictionary, the checkpoint converted with that dictionary for ELMER and fairseq's three
    baselines; ELMER and CMLM fine-tune from it (strict loads) with the printed options; LevT and the
    Transformer load strictly into the models those options build; generation detokenizes."""
    tiny_bert(tmp_path / "hf")
    data = tmp_path / "data"
    subprocess.run([sys.executable, ROOT / "examples" / "xsum" / "prepare.py", "--input", XSUM_TINY, "--out", data,
                    "--tokenizer", tmp_path / "hf" / "tokenizer.json", "--trim-vocab", "--valid", "4", "--test", "4",
                    "--max-source-tokens", "60", "--max-target-tokens", "20", "--workers", "1"],
                   check=True, capture_output=True, env=cli_env())
    vocab = TokenizerVocab(data / "tokenizer.json")
    assert len(vocab.load_dictionary(data / "dict.txt")) < len(vocab.dictionary())
    printed = run_cli("elmer-convert", tmp_path / "hf", tmp_path / "out", "--dict", data / "dict.txt",
                      "--for", "transformer", "cmlm_transformer", "levenshtein_transformer").stdout
    options_of = {Path(m[2]).stem: m[1].split() for m in re.finditer(r"fairseq-train (.*) --finetune-from-model (\S+)", printed)}
    assert sorted(options_of) == ["cmlm_transformer", "levenshtein_transformer", "model", "transformer"]
    common = ["--optimizer", "adam", "--lr", "1e-4", "--max-tokens", "2048", "--max-update", "1", "--cpu",
              "--num-workers", "0", "--no-epoch-checkpoints"]

    proc = run_cli("fairseq-train", data / "bin", "--user-dir", ROOT / "elmer_fairseq", "--task", "elmer_translation",
                   *options_of["model"], "--finetune-from-model", tmp_path / "out" / "model.pt",
                   "--criterion", "elmer_loss", "--max-target-length", "24", "--save-dir", tmp_path / "elmer", *common)
    assert f"loading pretrained model from {tmp_path / 'out' / 'model.pt'}" in proc.stdout
    generated = run_cli("fairseq-generate", *generate_args(data / "bin", tmp_path / "elmer" / "checkpoint_last.pt",
                                                           "--bpe", "wordpiece", "--wordpiece-tokenizer",
                                                           data / "tokenizer.json")).stdout
    symbols = dict(re.findall(r"^H-(\d+)\t\S+\t(.*)$", generated, re.M))
    text = dict(re.findall(r"^D-(\d+)\t\S+\t(.*)$", generated, re.M))
    assert len(text) == 4 and all(text[i] == vocab.detokenize(symbols[i].split()) for i in text)
    hub = ELMER.from_pretrained(tmp_path / "elmer", data=data / "bin", bpe_dir=data, device="cpu")
    [out] = hub.generate([xsum_texts()[0][0]["document"]], return_details=True)
    assert out["text"] == vocab.detokenize([hub.tgt_dict[t] for t in out["tokens"] if t != hub.tgt_dict.eos()])

    proc = run_cli("fairseq-train", data / "bin", *options_of["cmlm_transformer"],
                   "--finetune-from-model", tmp_path / "out" / "cmlm_transformer.pt", "--criterion", "nat_loss",
                   "--noise", "random_mask", "--disable-validation", "--save-dir", tmp_path / "cmlm", *common)
    assert "loading pretrained model from" in proc.stdout and (tmp_path / "cmlm" / "checkpoint_last.pt").is_file()
    for arch in ("levenshtein_transformer", "transformer"):
        args = options.parse_args_and_arch(options.get_training_parser(), [str(data / "bin"), *options_of[arch]])
        model = tasks.setup_task(args).build_model(args)
        state = torch.load(tmp_path / "out" / f"{arch}.pt", weights_only=True)
        model.load_state_dict(state["model"], strict=True)
