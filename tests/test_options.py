"""The option audit: every option that ELMER's model, tasks and criterion accept either changes the
computation or is refused with an error naming it. A new option (ours or fairseq's) fails
`test_every_option_is_audited` until it is put in one of the tables below."""
import argparse
import dataclasses

import pytest
import torch

from elmer_fairseq.criterions.elmer_loss import ElmerLoss
from elmer_fairseq.models.elmer import ElmerModel
from elmer_fairseq.tasks.elmer_translation import ElmerTranslationConfig
from fairseq.criterions.nat_loss import LabelSmoothedDualImitationCriterionConfig

from conftest import run_cli, sample_batch, tiny_model, train_args

# option -> (exit mode, flags that set it away from the tiny model's value): the training loss changes
CHANGES_LOSS = {
    "dropout": ("soft", ["--dropout", "0.3"]),
    "attention_dropout": ("soft", ["--attention-dropout", "0.3"]),
    "activation_dropout": ("soft", ["--activation-dropout", "0.3"]),
    "relu_dropout": ("soft", ["--relu-dropout", "0.3"]),  # fairseq uses it while --activation-dropout is 0
    "activation_fn": ("soft", ["--activation-fn", "relu"]),
    "encoder_layers": ("soft", ["--encoder-layers", "1"]),
    "decoder_layers": ("soft", ["--decoder-layers", "2"]),
    "encoder_embed_dim": ("soft", ["--encoder-embed-dim", "16", "--decoder-embed-dim", "16"]),
    "decoder_embed_dim": ("soft", ["--encoder-embed-dim", "16", "--decoder-embed-dim", "16"]),
    "encoder_ffn_embed_dim": ("soft", ["--encoder-ffn-embed-dim", "16"]),
    "decoder_ffn_embed_dim": ("soft", ["--decoder-ffn-embed-dim", "16"]),
    "encoder_attention_heads": ("soft", ["--encoder-attention-heads", "4"]),
    "decoder_attention_heads": ("soft", ["--decoder-attention-heads", "4"]),
    "encoder_normalize_before": ("soft", ["--encoder-normalize-before"]),
    "encoder_layerdrop": ("soft", ["--encoder-layerdrop", "0.9"]),
    "no_scale_embedding": ("soft", ["--no-scale-embedding"]),
    "no_token_positional_embeddings": ("soft", ["--no-token-positional-embeddings"]),
    "quant_noise_pq": ("soft", ["--quant-noise-pq", "0.5"]),
    "quant_noise_pq_block_size": ("soft", ["--quant-noise-pq", "0.5", "--quant-noise-pq-block-size", "16"]),
    "per_layer_off_ramps": ("soft", ["--per-layer-off-ramps"]),
    "gold_mix_prob": ("soft", ["--gold-mix-prob", "0.9"]),
    "layernorm_eps": ("soft", ["--layernorm-eps", "0.5"]),
    "max_target_length": ("soft", ["--max-target-length", "6"]),
    "eos_after_end": ("soft", ["--max-target-length", "40", "--eos-after-end"]),
    "exit_mode": ("soft", ["--exit-mode", "hard"]),
    "exit_threshold": ("hard", ["--exit-threshold", "100"]),  # every position frozen after layer 1
    "label_smoothing": ("soft", ["--label-smoothing", "0.1"]),
    "output_loss": ("soft", ["--output-loss", "ctc"]),
    # against ctc with the [MASK] blank too: test_ctc's test_ctc_blank_eos_changes_the_loss_and_the_output
    "ctc_blank": ("soft", ["--output-loss", "ctc", "--ctc-blank", "eos"]),
    "glance": ("soft", ["--glance", "0.9"]),
    # against glancing with the default (unrevealed) too: test_ctc's test_glance_loss_all_trains_every_position
    "glance_loss": ("soft", ["--glance", "0.9", "--glance-loss", "all"]),
    "length_head": ("soft", ["--length-head"]),
    # against the head at another factor too: test_length_head's test_training_adds_the_length_loss...
    "length_loss_factor": ("soft", ["--length-head", "--length-loss-factor", "1"]),
}
# option -> (flags, words of the error)
REFUSED = {
    "decoder_normalize_before": (["--decoder-normalize-before"], "post-norm only"),
    "no_decoder_final_norm": (["--no-decoder-final-norm"], "no final norm"),
    "no_cross_attention": (["--no-cross-attention"], "only through cross-attention"),
    "cross_self_attention": (["--cross-self-attention"], "cross-attention only"),
    "decoder_layerdrop": (["--decoder-layerdrop", "0.1"], "dropping decoder layers is not defined"),
    "adaptive_input": (["--adaptive-input"], "a plain embedding"),
    "adaptive_softmax_cutoff": (["--adaptive-softmax-cutoff", "100"], "full softmax"),
    "adaptive_softmax_dropout": (["--adaptive-softmax-dropout", "0.1"], "full softmax"),
    "adaptive_softmax_factor": (["--adaptive-softmax-factor", "2"], "full softmax"),
    "tie_adaptive_weights": (["--tie-adaptive-weights"], "full softmax"),
    "tie_adaptive_proj": (["--tie-adaptive-proj"], "full softmax"),
    "base_layers": (["--base-layers", "1"], "BASE layers"),
    "base_sublayers": (["--base-sublayers", "2"], "only with --base-layers"),
    "base_shuffle": (["--base-shuffle", "0"], "only with --base-layers"),
    "char_inputs": (["--char-inputs"], "does not implement it"),
    "quant_noise_scalar": (["--quant-noise-scalar", "0.1"], "does not implement it"),
    "decoder_xformers_att_config": (["--decoder-xformers-att-config", "{}"], "fairseq's attention modules"),
    "merge_src_tgt_embed": (["--merge-src-tgt-embed"], "--share-all-embeddings"),
    "decoder_output_dim": (["--decoder-output-dim", "64"], "--decoder-embed-dim 32"),
    "encoder_layers_to_keep": (["--encoder-layers-to-keep", "0"], "AttributeError"),
    "decoder_layers_to_keep": (["--decoder-layers-to-keep", "0,2"], "AttributeError"),
    "load_alignments": (["--load-alignments"], "no alignment supervision"),
    "left_pad_target": (["--left-pad-target"], "right-padded"),
}

# option -> why it has no effect on the values computed, and where what it does is tested
NOT_NUMERIC = {
    "data": "where the data is", "source_lang": "file names", "target_lang": "file names",
    "train_subset": "which split trains", "dataset_impl": "file format", "seed": "fairseq's seed (tested by resumes)",
    "max_source_positions": "a limit: longer sources are refused or cut (test_bad_input)",
    "max_target_positions": "a limit on --max-target-length (test_bad_input)",
    "truncate_source": "cuts long sources instead of refusing them (test_bad_input)",
    "left_pad_source": "where the source's padding sits; the encoder masks it",
    "num_batch_buckets": "batching only", "required_seq_len_multiple": "padding only",
    "upsample_primary": "repeats the first of several data folders",
    "checkpoint_activations": "recomputes activations in backward: same values, less memory (tested here)",
    "offload_activations": "checkpointing to CPU memory: same values, less memory",
    "min_params_to_wrap": "FSDP wrapping only",
    "export": "ONNX-exportable LayerNorm: the same function",
    "encoder_xformers_att_config": "fairseq's encoder; needs the xformers package, absent here",
    "encoder_learned_pos": "always on in ELMER (paper: learned positions)",
    "decoder_learned_pos": "always on in ELMER (paper: learned positions)",
    "share_decoder_input_output_embed": "always on in ELMER (the off-ramps are the tied embedding)",
    "share_all_embeddings": "always on in ELMER (one embedding for source, [MASK] inputs and off-ramps)",
    "layernorm_embedding": "on in every ELMER architecture (BART-style embeddings)",
    "encoder_embed_path": "pretrained embeddings loaded by fairseq at build (tested here)",
    "decoder_embed_path": "pretrained embeddings loaded by fairseq at build (tested here)",
    "oracle_length": "generation only (test_recipe)",
    "length_cut": "generation only (test_length_cut)",
    "ramp_shortlist": "generation only (test_shortlist)",
    "ramp_precision": "generation only (test_ramp_precision)",
    "max_exit_layer": "generation only (test_max_exit_layer)",
    "exit_thresholds": "generation only (test_calibrate)",
    "eval_bleu": "validation BLEU with ELMER's generator (tested here)",
    "eval_bleu_args": "with --eval-bleu", "eval_bleu_detok": "with --eval-bleu",
    "eval_bleu_detok_args": "with --eval-bleu", "eval_tokenized_bleu": "with --eval-bleu",
    "eval_bleu_remove_bpe": "with --eval-bleu", "eval_bleu_print_samples": "with --eval-bleu",
}


def accepted_options():
    parser = argparse.ArgumentParser()
    ElmerModel.add_args(parser)
    model = {a.dest for a in parser._actions if a.dest != "help"}
    task = {f.name for f in dataclasses.fields(ElmerTranslationConfig)} - {"_name"}
    criterion = {f.name for f in dataclasses.fields(LabelSmoothedDualImitationCriterionConfig)} - {"_name"}
    return model | task | criterion


def test_every_option_is_audited():
    audited = set(CHANGES_LOSS) | set(REFUSED) | set(NOT_NUMERIC)
    assert accepted_options() - audited == set(), "options no table says anything about"
    assert audited - accepted_options() == set(), "tables name options that no longer exist"
    assert not (set(CHANGES_LOSS) & set(REFUSED)) and not (set(REFUSED) & set(NOT_NUMERIC))


def training_loss(task, model, batch):
    model.train()
    torch.manual_seed(3)
    return ElmerLoss(task, label_smoothing=getattr(model.args, "label_smoothing", 0.0) or 0.0)(model, batch)[0].item()


def built(xsum_tiny, mode, flags):
    extra = ["--criterion", "elmer_loss", *flags]
    if "--label-smoothing" not in flags:
        extra += ["--label-smoothing", "0"]
    return tiny_model(xsum_tiny, mode, extra=extra)


@pytest.mark.parametrize("option", sorted(CHANGES_LOSS))
def test_option_changes_the_training_loss(xsum_tiny, option):
    mode, flags = CHANGES_LOSS[option]
    task, model = built(xsum_tiny, mode, flags)
    base_task, base = built(xsum_tiny, mode, [])
    batch, base_batch = sample_batch(task, split="train"), sample_batch(base_task, split="train")
    assert training_loss(task, model, batch) != pytest.approx(training_loss(base_task, base, base_batch), rel=1e-6)


@pytest.mark.parametrize("option", sorted(REFUSED))
def test_option_is_refused_naming_it(xsum_tiny, option):
    flags, words = REFUSED[option]
    with pytest.raises(ValueError) as err:
        built(xsum_tiny, "soft", flags)
    assert f"--{option.replace('_', '-')}" in str(err.value) and words in str(err.value)


def test_activation_checkpointing_keeps_loss_and_gradients(xsum_tiny):
    losses, grads = [], []
    for flags in ([], ["--checkpoint-activations"]):
        task, model = built(xsum_tiny, "soft", flags)
        loss = ElmerLoss(task, label_smoothing=0.0)(model.train(), sample_batch(task, split="train"))[0]
        loss.backward()
        losses.append(loss.item())
        grads.append(model.decoder.embed_tokens.weight.grad.clone())
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_pretrained_embedding_files_are_loaded(xsum_tiny, tmp_path):
    task, base = built(xsum_tiny, "soft", [])
    word = task.src_dict[task.src_dict.nspecial + 5]
    (tmp_path / "emb.txt").write_text(f"1 32\n{word} " + " ".join(["0.25"] * 32) + "\n", encoding="utf-8")
    _, model = built(xsum_tiny, "soft", ["--encoder-embed-path", str(tmp_path / "emb.txt")])
    row = task.src_dict.index(word)
    assert torch.equal(model.encoder.embed_tokens.weight[row], torch.full((32,), 0.25))
    assert not torch.equal(base.encoder.embed_tokens.weight[row], torch.full((32,), 0.25))


def test_eval_bleu_validates_with_elmers_generator(xsum_tiny, tmp_path):
    out = run_cli("fairseq-train", *train_args(xsum_tiny, tmp_path, "--eval-bleu", updates=2)).stdout
    assert "| valid on 'valid' subset |" in out and "| bleu " in out
