"""`elmer-convert`: a Hugging Face checkpoint as an ELMER fairseq checkpoint: BART-style ones (BART
itself, or the ELMER authors' release) and BERT-family encoders (BERT, MiniLM, RoBERTa).

    elmer-convert path/to/bart-base out/bart-base    # a folder with config.json + model.safetensors
                                                     # (or pytorch_model.bin), or one weights file
    elmer-convert path/to/minilm out/minilm --dict data/boolq-minilm/dict.txt \
                  --for transformer cmlm_transformer levenshtein_transformer

writes out/.../model.pt, the fairseq dictionary dict.txt (for `fairseq-preprocess --srcdict`) and
its copies dict.src.txt / dict.tgt.txt (the folder is then a data folder for `ELMER.from_pretrained`
and `fairseq-generate`), and prints the model options that rebuild the same model in
`fairseq-train --finetune-from-model`.

HF's BART is a port of fairseq's, so the two compute the same function with the same module names
below `model.`: post-norm layers, an embedding layer norm, learned positions whose first two rows
are unused (fairseq counts positions from padding_idx + 1 = 2, HF adds an offset of 2), and
fairseq's dictionary order for the special tokens. The converter maps the names, checks every
shape against the config, and refuses what ELMER cannot reproduce (untied output embeddings, a
non-zero final_logits_bias) instead of dropping it.

A BERT-family checkpoint is an encoder only (BERT2BERT, Rothe et al. 2020): its layers start both
ELMER's encoder and its bidirectional decoder, whose cross-attention starts fresh; its word
embedding is shared by encoder, decoder and off-ramps; the token-type-0 embedding is folded into
the positions; its LayerNorm eps is kept (--layernorm-eps). Its vocabulary comes from the
checkpoint's tokenizer.json (fairseq's specials are its [CLS] [PAD] [SEP] [UNK] [MASK]); `--dict`
keeps only the rows of a smaller dictionary, and `--for` also writes checkpoints of fairseq's
Transformer, CMLM and LevT with the same weights.
"""
import argparse
import copy
import json
import logging
import os
import re
import warnings
from pathlib import Path

import torch
from fairseq import checkpoint_utils, options, utils
from fairseq.data import Dictionary
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.models import ARCH_CONFIG_REGISTRY, ARCH_MODEL_INV_REGISTRY
from fairseq.tasks import TASK_REGISTRY
from omegaconf import OmegaConf

from .bpe import TokenizerVocab
from .exit_policy import DECODABLE, DEFAULT_EXIT_THRESHOLD
from .models.elmer import MASK_SYMBOL, pass_through_fuse
from .tasks.elmer_translation import ElmerTranslationTask

logger = logging.getLogger(__name__)

PLUGIN_DIR = os.path.dirname(os.path.abspath(__file__))
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
# HF's names of the one token embedding (tied: its saved files keep any one of them)
EMBEDDING_NAMES = ("model.shared.weight", "model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight",
                   "lm_head.weight")
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_accurate", "relu": "relu", "tanh": "tanh"}  # HF -> fairseq
# fairseq's Dictionary() starts <s> <pad> </s> <unk>: BART's ids, since BART came from fairseq
SPECIAL_IDS = {"bos_token_id": 0, "pad_token_id": 1, "eos_token_id": 2}
BERT_FAMILY = ("bert", "roberta")
# fairseq's names of a post-norm layer's parts -> BERT's, below encoder.layer.N.
BERT_LAYER = {"self_attn.q_proj": "attention.self.query", "self_attn.k_proj": "attention.self.key",
              "self_attn.v_proj": "attention.self.value", "self_attn.out_proj": "attention.output.dense",
              "self_attn_layer_norm": "attention.output.LayerNorm", "fc1": "intermediate.dense",
              "fc2": "output.dense", "final_layer_norm": "output.LayerNorm"}
WORDS, POSITIONS, TOKEN_TYPES = ("embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
                                 "embeddings.token_type_embeddings.weight")
# fairseq's models that `--for` warm-starts: their task, and how they are built beyond the sizes
BASELINES = {"transformer": "translation", "cmlm_transformer": "translation_lev",
             "levenshtein_transformer": "translation_lev"}
BASELINE_OPTIONS = {"encoder_learned_pos": True, "decoder_learned_pos": True, "share_all_embeddings": True}
SOFT_EXIT_W = "decoder.soft_exit.weight"
SOFT_EXIT_INITS = ("pass-through", "random")  # how W starts when the checkpoint has none; the first is the default


def bart_dictionary(vocab_size: int) -> Dictionary:
    """The dict.txt of a BART vocabulary: fairseq's four specials are BART's ids 0-3, the other ids
    follow as symbols in id order (the symbols `--bpe byte_bpe_ids` writes), and <mask>, BART's
    last id, is left to the ELMER tasks, which add it when they load a dictionary."""
    dictionary = Dictionary()
    for i in range(dictionary.nspecial, vocab_size - 1):
        dictionary.add_symbol(str(i))
    return dictionary


def config_value(config: dict, key: str, source: str):
    if key not in config:
        raise ValueError(f"{source}: the config has no {key!r}: not a {config.get('model_type', 'BART')} config")
    return config[key]


def model_options(config: dict, source: str) -> dict:
    """fairseq model options that reproduce the BART of HF config `config`."""
    def get(key):
        return config_value(config, key, source)

    if config.get("model_type", "bart") != "bart":
        raise ValueError(f"{source}: model_type {config['model_type']!r}; elmer-convert converts BART-style "
                         f"(bart) and BERT-family ({', '.join(BERT_FAMILY)}) checkpoints")
    if get("activation_function") not in ACTIVATIONS:
        raise ValueError(f"{source}: activation_function {config['activation_function']!r} is not one of "
                         f"{', '.join(ACTIVATIONS)}")
    for key, index in SPECIAL_IDS.items():
        if config.get(key, index) != index:
            raise ValueError(f"{source}: {key} is {config[key]}, but fairseq's dictionary has that token at {index}")
    positions = get("max_position_embeddings")
    return {
        "encoder_layers": get("encoder_layers"), "decoder_layers": get("decoder_layers"),
        "encoder_embed_dim": get("d_model"), "decoder_embed_dim": get("d_model"),
        "encoder_ffn_embed_dim": get("encoder_ffn_dim"), "decoder_ffn_embed_dim": get("decoder_ffn_dim"),
        "encoder_attention_heads": get("encoder_attention_heads"),
        "decoder_attention_heads": get("decoder_attention_heads"),
        "activation_fn": ACTIVATIONS[config["activation_function"]],
        "no_scale_embedding": not config.get("scale_embedding", False),
        # fairseq sizes the position tables from these: they must be BART's
        "max_source_positions": positions, "max_target_positions": positions,
    }


def arch_and_flags(model_opts: dict):
    """The registered ELMER architecture that needs the fewest options on top to give `model_opts`,
    and those options as command-line flags (what fairseq-train needs to rebuild the model)."""
    best = None
    for arch in ARCH_MODEL_INV_REGISTRY["elmer"]:
        defaults = argparse.Namespace()
        ARCH_CONFIG_REGISTRY[arch](defaults)
        changed = {key: value for key, value in model_opts.items() if getattr(defaults, key, None) != value}
        if False in changed.values():  # a store_true flag cannot switch off what the architecture switches on
            continue
        if best is None or len(changed) < len(best[1]):
            best = (arch, changed)
    arch, changed = best
    return arch, as_flags(changed)


def as_flags(opts: dict) -> list:
    flags = []
    for key, value in opts.items():
        flags += [f"--{key.replace('_', '-')}"] + ([] if value is True else [str(value)])
    return flags


def tied_embedding(state: dict, source: str) -> torch.Tensor:
    """Pops HF's names of the token embedding; ELMER ties input, output and off-ramp embeddings."""
    found = {name: state.pop(name) for name in EMBEDDING_NAMES if name in state}
    if not found:
        raise ValueError(f"{source}: no model.shared.weight (the token embedding): not a BART-style checkpoint")
    (first, embedding), *others = found.items()
    for name, weight in others:
        if weight.shape != embedding.shape or not torch.equal(weight, embedding):
            raise ValueError(f"{source}: {name} differs from {first}; ELMER ties its input, output and off-ramp "
                             f"embeddings, so an untied output layer cannot be converted")
    return embedding


def hf_name(key: str) -> str:
    """The HF name of our parameter `key`: ours minus HF's `model.` prefix, but for the tied
    embeddings and soft exit's W (the authors' `concat_head`)."""
    if key in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "decoder.output_projection.weight"):
        return "model.shared.weight"
    if key == SOFT_EXIT_W:
        return "concat_head.weight"
    return "model." + key


def start_soft_exit(weights: dict, how, source: str):
    """Soft exit's W for a checkpoint that has none. "pass-through" (also for None): W = [0 | I]
    (`models.elmer.pass_through_fuse`), so that every pretrained decoder layer first reads what it
    was trained on; "random": ELMER's initialisation, as a model trained from scratch has it."""
    how = how or SOFT_EXIT_INITS[0]
    if how not in SOFT_EXIT_INITS:
        raise ValueError(f"--soft-exit-init {how}: not one of {', '.join(SOFT_EXIT_INITS)}")
    if SOFT_EXIT_W not in weights:
        return
    logger.info(f"{source} has no soft-exit W: it starts {how}"
                + (" (W = [0 | I]: each decoder layer first reads the layer below as it is)" if how == "pass-through" else ""))
    if how == "pass-through":
        weights[SOFT_EXIT_W] = pass_through_fuse(weights[SOFT_EXIT_W].shape[0]).to(weights[SOFT_EXIT_W])


def convert_hf_bart(state_dict: dict, config, exit_mode: str = "soft", exit_threshold=None,
                    source_lang: str = "src", target_lang: str = "tgt", source: str = "the state dict",
                    soft_exit_init=None) -> dict:
    """A fairseq checkpoint (what fairseq-train writes, before any update) of ELMER with the weights
    of the HF BART-style `state_dict` and `config` (a config.json dict or a transformers config).
    `source` names the input in error messages; `soft_exit_init` says how soft exit's W starts
    where the checkpoint has none (`start_soft_exit`; default pass-through)."""
    config = config if isinstance(config, dict) else config.to_dict()
    dictionary = bart_dictionary(config_value(config, "vocab_size", source))
    cfg, model = build_elmer(model_options(config, source), dictionary, exit_mode, exit_threshold,
                             source_lang, target_lang)

    # a bare BartModel's names lack the `model.` prefix of BartForConditionalGeneration's
    state = {f"model.{k}" if k.startswith(("shared.", "encoder.", "decoder.")) else k: v for k, v in state_dict.items()}
    state["model.shared.weight"] = tied_embedding(state, source)
    bias = state.pop("final_logits_bias", None)
    if bias is not None and bias.any():
        raise ValueError(f"{source}: final_logits_bias is not zero (max |b| = {bias.abs().max():.3g}); ELMER's "
                         f"off-ramps have no bias, so its logits cannot be reproduced")
    if SOFT_EXIT_W not in model.state_dict() and state.pop("concat_head.weight", None) is not None:
        logger.info("concat_head.weight (soft exit's W) is not used by a hard-exit model: left out")
    weights = {}
    for key, init in model.state_dict().items():
        name = hf_name(key)
        if key.endswith(".version"):  # fairseq's format marker, not a weight
            weights[key] = init
            continue
        if key == SOFT_EXIT_W and name not in state:  # plain BART: see start_soft_exit below
            weights[key] = init
            continue
        if name not in state:
            raise ValueError(f"{source}: no {name} (for our {key}): not a BART-style checkpoint of this config")
        weight = state[name]
        if weight.shape != init.shape:
            raise ValueError(f"{source}: {name} has shape {list(weight.shape)}, but the config needs "
                             f"{list(init.shape)} (our {key})")
        if key == SOFT_EXIT_W:  # the authors concatenate [h; Embed(y)], we [Embed(y); h]
            weight = torch.cat(weight.chunk(2, dim=1)[::-1], dim=1)
        weights[key] = weight.to(init.dtype)
    unused = sorted(set(state) - {hf_name(key) for key in weights})
    if unused:
        raise ValueError(f"{source}: {len(unused)} weights that a BART of this config does not have: "
                         f"{', '.join(unused[:5])}{' ...' if len(unused) > 5 else ''}")
    if "concat_head.weight" not in state:
        start_soft_exit(weights, soft_exit_init, source)
    elif soft_exit_init is not None and SOFT_EXIT_W in weights:
        raise ValueError(f"--soft-exit-init {soft_exit_init}: {source} has its own soft-exit W (concat_head.weight), "
                         f"which is used as it is; leave the option out")
    return new_checkpoint(cfg, weights)


def parse_cfg(argv: list):
    with warnings.catch_warnings():  # hydra's deprecation notices about how fairseq 0.12 calls it
        warnings.simplefilter("ignore")
        return convert_namespace_to_omegaconf(options.parse_args_and_arch(options.get_training_parser(), argv))


def build_elmer(model_opts: dict, dictionary: Dictionary, exit_mode: str, exit_threshold, source_lang: str,
                target_lang: str):
    """(cfg, model): the ELMER of `model_opts` over `dictionary` (dict.txt's symbols), as fairseq-train
    builds it before loading any weights."""
    arch, flags = arch_and_flags(model_opts)
    argv = [".", "--user-dir", PLUGIN_DIR, "--task", "elmer_translation", "--criterion", "elmer_loss",
            "--arch", arch, *flags, "--source-lang", source_lang, "--target-lang", target_lang,
            "--exit-mode", exit_mode]
    if exit_threshold is not None:
        argv += ["--exit-threshold", str(exit_threshold)]
    cfg = parse_cfg(argv)
    dictionary = copy.deepcopy(dictionary)  # the caller's stays dict.txt's, without <mask>
    dictionary.add_symbol(MASK_SYMBOL)  # as the task does on loading dict.txt
    utils.set_torch_seed(cfg.common.seed)  # as fairseq-train does: parts the checkpoint lacks start the same every time
    return cfg, ElmerTranslationTask(cfg.task, dictionary, dictionary).build_model(cfg.model)


def new_checkpoint(cfg, weights: dict) -> dict:
    return {
        "args": None,
        "cfg": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
        "model": weights,
        "criterion": None,
        # nothing has been trained here: fairseq-train starts a fresh optimizer, schedule and epoch
        "optimizer_history": [{"criterion_name": None, "optimizer_name": None, "lr_scheduler_state": {},
                               "num_updates": 0}],
        "last_optimizer_state": None,
        "task_state": {},
        "extra_state": {"train_iterator": {"epoch": 1, "iterations_in_epoch": 0, "version": 2}},
    }


def save(checkpoint: dict, out_dir, dictionary: Dictionary = None, name: str = "model.pt") -> Path:
    """Writes out_dir/`name` and its dictionaries (dict.txt and the task's dict.<lang>.txt, so that
    out_dir is the checkpoint's data folder; default: BART's); returns the checkpoint's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    task = checkpoint["cfg"]["task"]
    task["data"] = str(out.resolve())
    if dictionary is None:
        dictionary = bart_dictionary(checkpoint["model"]["encoder.embed_tokens.weight"].size(0))
    for dict_name in ("dict.txt", f"dict.{task['source_lang']}.txt", f"dict.{task['target_lang']}.txt"):
        dictionary.save(str(out / dict_name))
    path = out / name
    checkpoint_utils.torch_persistent_save(checkpoint, str(path))
    return path


def bert_model_options(config: dict, source: str) -> dict:
    """ELMER's model options that reproduce the BERT-family encoder of HF config `config`."""
    def get(key):
        return config_value(config, key, source)

    if config.get("model_type") not in BERT_FAMILY:
        raise ValueError(f"{source}: model_type {config.get('model_type')!r}, not one of {', '.join(BERT_FAMILY)}")
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"{source}: position_embedding_type {config['position_embedding_type']!r}; "
                         f"fairseq's learned positions are absolute ones")
    if get("hidden_act") not in ACTIVATIONS:
        raise ValueError(f"{source}: hidden_act {config['hidden_act']!r} is not one of {', '.join(ACTIVATIONS)}")
    layers, dim, heads, ffn = (get(k) for k in ("num_hidden_layers", "hidden_size", "num_attention_heads",
                                                "intermediate_size"))
    positions = get("max_position_embeddings") - position_offset(config, source)
    return {
        "encoder_layers": layers, "decoder_layers": layers, "encoder_embed_dim": dim, "decoder_embed_dim": dim,
        "encoder_ffn_embed_dim": ffn, "decoder_ffn_embed_dim": ffn,
        "encoder_attention_heads": heads, "decoder_attention_heads": heads,
        "activation_fn": ACTIVATIONS[config["hidden_act"]], "layernorm_embedding": True, "no_scale_embedding": True,
        "layernorm_eps": get("layer_norm_eps"), "max_source_positions": positions, "max_target_positions": positions,
    }


def position_offset(config: dict, source: str) -> int:
    """Rows of the checkpoint's position table before its first position: RoBERTa counts from
    padding_idx + 1 = 2 as fairseq does (it came from fairseq), BERT from 0."""
    if config["model_type"] == "bert":
        return 0
    if config.get("pad_token_id", 1) != 1:
        raise ValueError(f"{source}: pad_token_id {config['pad_token_id']}: RoBERTa's positions start at "
                         f"pad_token_id + 1, fairseq's at 2")
    return 2


def bert_encoder(state_dict: dict, config: dict, source: str) -> dict:
    """The embeddings.* and encoder.* weights of a BERT-family state dict (BertModel's names: without
    BertForMaskedLM's `bert.`, RobertaForMaskedLM's `roberta.`); the heads, which ELMER has no place
    for, are named in the log."""
    prefix = config["model_type"] + "."
    state = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state_dict.items()}
    heads = sorted({k.split(".")[0] for k in state if not k.startswith(("embeddings.", "encoder."))})
    for head in heads:
        if head in ("cls", "lm_head"):
            logger.warning(f"{source}: its MLM head ({head}.*: a dense + LayerNorm transform and an output bias) "
                           f"is not used: ELMER's off-ramps are the tied word embedding with neither, so they "
                           f"start from the plain embedding")
        else:
            logger.info(f"{source}: {head}.* (a task head of the encoder) is not used")
    # position_ids / token_type_ids: index buffers that older transformers saved, not weights
    return {k: v for k, v in state.items() if k.startswith(("embeddings.", "encoder.")) and not k.endswith("_ids")}


def bert_name(key: str):
    """The BERT name of our parameter `key`, None for the parts BERT lacks."""
    if key in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "decoder.output_projection.weight"):
        return WORDS
    if key in ("encoder.embed_positions.weight", "decoder.embed_positions.weight"):
        return POSITIONS
    m = re.fullmatch(r"(?:encoder|decoder)\.layernorm_embedding\.(weight|bias)", key)
    if m:
        return f"embeddings.LayerNorm.{m[1]}"
    # the decoder's layers start from the encoder's: ELMER's decoder is bidirectional, as BERT is
    m = re.fullmatch(r"(?:encoder|decoder)\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
    if m and m[2] in BERT_LAYER:
        return f"encoder.layer.{m[1]}.{BERT_LAYER[m[2]]}.{m[3]}"
    return None


def load_bert(model, bert: dict, config: dict, vocab: TokenizerVocab, source: str) -> dict:
    """`model`'s state dict with the BERT-family encoder weights `bert` wherever fairseq's transformer
    has the same part (the word embedding's rows picked by the model's dictionary); the parts BERT
    lacks keep the model's initialisation, and the log names them."""
    rows = torch.tensor([vocab.ids[symbol] for symbol in model.encoder.dictionary.symbols])
    token_type = bert[TOKEN_TYPES][0] if TOKEN_TYPES in bert else 0  # fairseq has no token types: type 0 always
    unused_rows = 2 - position_offset(config, source)  # fairseq's first rows, before position 0
    state, fresh, converted = {}, set(), {}
    for key, init in model.state_dict().items():
        name = bert_name(key)
        if name is None:
            state[key] = init
            if not key.endswith(".version"):  # fairseq's format marker, not a weight
                fresh.add(re.sub(r"\.\d+\.", ".*.", key).rsplit(".", 1)[0])
            continue
        if name not in bert:
            raise ValueError(f"{source}: no {name} (for our {key}): not a {config['model_type']} checkpoint of this config")
        if name not in converted:  # one tensor per BERT weight: the saved file holds each once
            weight = bert[name]
            if name == WORDS:
                weight = weight[rows]
            elif name == POSITIONS:
                weight = torch.cat([init[:unused_rows], weight + token_type])
            converted[name] = weight.to(init.dtype)
        if converted[name].shape != init.shape:
            raise ValueError(f"{source}: {name} gives shape {list(converted[name].shape)}, but the config needs "
                             f"{list(init.shape)} (our {key})")
        state[key] = converted[name]
    unused = sorted(set(bert) - set(converted) - {TOKEN_TYPES})
    if unused:
        raise ValueError(f"{source}: {len(unused)} weights that a {config['model_type']} of this config does not have: "
                         f"{', '.join(unused[:5])}{' ...' if len(unused) > 5 else ''}")
    logger.info(f"{type(model).__name__}: not in a {config['model_type']} checkpoint, so freshly initialised: "
                f"{', '.join(sorted(fresh))}")
    return state


def check_tokenizer(vocab: TokenizerVocab, config: dict, source: str):
    """The embedding rows are picked by the tokenizer's ids: they must be the checkpoint's."""
    size = config_value(config, "vocab_size", source)
    beyond = next((t for t, i in vocab.ids.items() if i >= size), None)
    if beyond is not None:
        raise ValueError(f"{vocab.path}: {beyond!r} has id {vocab.ids[beyond]}, beyond the vocab_size {size} of "
                         f"{source}: not this checkpoint's tokenizer")
    pad = config.get("pad_token_id")
    if pad is not None and vocab.ids["<pad>"] != pad:
        raise ValueError(f"{vocab.path}: {vocab.special_tokens[1]} has id {vocab.ids['<pad>']}, but the config of "
                         f"{source} has pad_token_id {pad}: not this checkpoint's tokenizer")


def convert_bert_family(state_dict: dict, config, vocab: TokenizerVocab, dictionary: Dictionary = None,
                        exit_mode: str = "soft", exit_threshold=None, source_lang: str = "src",
                        target_lang: str = "tgt", baselines=(), source: str = "the state dict",
                        soft_exit_init=None) -> dict:
    """{file name: (checkpoint, the fairseq-train options that rebuild its model)} of a BERT-family
    encoder: ELMER's model.pt, and ARCH.pt for each fairseq architecture in `baselines`; all over
    `dictionary` (dict.txt's symbols; default: `vocab`'s every token). BERT has no soft-exit W:
    `soft_exit_init` says how it starts (`start_soft_exit`)."""
    config = config if isinstance(config, dict) else config.to_dict()
    opts = bert_model_options(config, source)
    check_tokenizer(vocab, config, source)
    bert = bert_encoder(state_dict, config, source)
    dictionary = vocab.dictionary() if dictionary is None else dictionary
    cfg, model = build_elmer(opts, dictionary, exit_mode, exit_threshold, source_lang, target_lang)
    arch, flags = arch_and_flags(opts)
    weights = load_bert(model, bert, config, vocab, source)
    start_soft_exit(weights, soft_exit_init, source)
    out = {"model.pt": (new_checkpoint(cfg, weights), ["--arch", arch, *flags])}
    if baselines:
        logger.warning(f"fairseq's {', '.join(baselines)} have no LayerNorm eps option: they compute with 1e-5, "
                       f"not the checkpoint's {opts['layernorm_eps']} (outputs move by ~1e-2 before fine-tuning)")
    for arch in baselines:
        if arch not in BASELINES:
            raise ValueError(f"--for {arch}: not one of {', '.join(BASELINES)}")
        model_opts = {k: v for k, v in opts.items() if k != "layernorm_eps"}
        model_opts.update(BASELINE_OPTIONS)
        if arch == "levenshtein_transformer":  # its three heads read these layers (default 6,6,6)
            model_opts["early_exit"] = ",".join([str(opts["decoder_layers"])] * 3)
        if BASELINES[arch] == "translation_lev":
            logger.warning(f"fairseq's {arch} decoder does not apply layernorm_embedding (its forward_embedding "
                           f"skips it): its decoder reads the embeddings without {config['model_type']}'s LayerNorm")
        flags = ["--task", BASELINES[arch], "--arch", arch, *as_flags(model_opts)]
        cfg = parse_cfg([".", *flags, "--source-lang", source_lang, "--target-lang", target_lang])
        # fairseq stores an argparse Namespace in the file: the plugin allow-lists it for torch's safe loading
        flags = ["--user-dir", PLUGIN_DIR, *flags]
        utils.set_torch_seed(cfg.common.seed)
        model = TASK_REGISTRY[BASELINES[arch]](cfg.task, dictionary, dictionary).build_model(cfg.model)
        out[f"{arch}.pt"] = (new_checkpoint(cfg, load_bert(model, bert, config, vocab, source)), flags)
    return out


def read_weights(path: Path) -> dict:
    if path.name.endswith(".index.json"):  # a sharded checkpoint: the index names its files
        shards = sorted(set(json.loads(path.read_text(encoding="utf-8"))["weight_map"].values()))
        return {k: v for shard in shards for k, v in read_weights(path.parent / shard).items()}
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ImportError(f"{path}: reading .safetensors needs the safetensors package "
                              f"(pip install safetensors)") from None
        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def check_vocab(vocab_file: Path, vocab_size: int):
    """dict.txt assumes BART's special ids; a tokenizer that disagrees would shift every token."""
    vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
    expected = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, MASK_SYMBOL: vocab_size - 1}
    wrong = {token: vocab.get(token) for token, index in expected.items() if vocab.get(token) != index}
    if wrong:
        raise ValueError(f"{vocab_file}: special tokens at {wrong}; converting needs BART's ids {expected}")


def read_hf(path, config_path=None):
    """(state dict, config dict, weights file) of an HF checkpoint folder or weights file."""
    path = Path(path)
    if path.is_dir():
        weights = next((path / name for name in WEIGHT_FILES if (path / name).is_file()), None)
        if weights is None:
            raise FileNotFoundError(f"{path}: none of {', '.join(WEIGHT_FILES)}")
    elif path.is_file():
        weights = path
    else:
        raise FileNotFoundError(f"{path} not found")
    config_file = Path(config_path) if config_path else weights.parent / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: the HF config.json gives the model's sizes (--config)")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    if config.get("model_type", "bart") == "bart" and (weights.parent / "vocab.json").is_file() and "vocab_size" in config:
        check_vocab(weights.parent / "vocab.json", config["vocab_size"])
    return read_weights(weights), config, weights


def main(argv=None):
    p = argparse.ArgumentParser(prog="elmer-convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint",
                   help="HF folder (config.json + model.safetensors or pytorch_model.bin) or weights file")
    p.add_argument("out", help="output folder: model.pt, dict.txt, dict.SRC.txt, dict.TGT.txt (and ARCH.pt with --for)")
    p.add_argument("--config", help="the HF config.json (default: the one beside the weights)")
    p.add_argument("--exit-mode", default="soft", choices=DECODABLE, help="the model's exit mode (default: soft)")
    p.add_argument("--exit-threshold", type=float, help=f"hard exit's delta (default {DEFAULT_EXIT_THRESHOLD})")
    p.add_argument("--soft-exit-init", choices=SOFT_EXIT_INITS,
                   help="how soft exit's W in W [Embed(y); h] starts when the checkpoint has none (BERT, plain "
                        "BART): pass-through (the default) starts it as [0 | I], so each pretrained decoder layer "
                        "first reads the layer below unchanged; random is ELMER's initialisation from scratch, "
                        "which feeds the pretrained layers random projections. Soft exit only")
    p.add_argument("--source-lang", default="src", help="source suffix of the data (default: src)")
    p.add_argument("--target-lang", default="tgt", help="target suffix of the data (default: tgt)")
    bert = p.add_argument_group("BERT-family checkpoints (model_type bert or roberta)")
    bert.add_argument("--tokenizer", help="the checkpoint's tokenizer.json (default: the one beside the weights)")
    bert.add_argument("--dict", help="a fairseq dict.txt of the tokenizer's pieces (e.g. examples/TASK/prepare.py "
                                     "--trim-vocab's): keep only these rows of the word embedding (default: every "
                                     "token but BERT's [unusedN])")
    bert.add_argument("--for", dest="baselines", nargs="+", default=[], choices=list(BASELINES), metavar="ARCH",
                      help=f"also write OUT/ARCH.pt, fairseq's ARCH with the same weights ({', '.join(BASELINES)})")
    args = p.parse_args(argv)
    # force: importing fairseq has set the root logger to DEBUG, which prints hydra's internals
    logging.basicConfig(format="%(levelname)s | %(name)s | %(message)s", level=logging.INFO, force=True)
    try:
        if args.soft_exit_init and args.exit_mode != "soft":
            raise ValueError(f"--soft-exit-init: --exit-mode {args.exit_mode} has no soft-exit W to start")
        state_dict, config, weights = read_hf(args.checkpoint, args.config)
        if config.get("model_type") in BERT_FAMILY:
            vocab = TokenizerVocab(args.tokenizer or weights.parent / "tokenizer.json")
            dictionary = vocab.load_dictionary(args.dict) if args.dict else vocab.dictionary()
            checkpoints = convert_bert_family(state_dict, config, vocab, dictionary, args.exit_mode,
                                              args.exit_threshold, args.source_lang, args.target_lang,
                                              args.baselines, source=str(weights), soft_exit_init=args.soft_exit_init)
        else:
            given = [o for o, v in (("--tokenizer", args.tokenizer), ("--dict", args.dict), ("--for", args.baselines)) if v]
            if given:
                raise ValueError(f"{' and '.join(given)}: for BERT-family checkpoints; {weights} is "
                                 f"model_type {config.get('model_type', 'bart')!r}")
            dictionary = None
            checkpoint = convert_hf_bart(state_dict, config, args.exit_mode, args.exit_threshold,
                                         args.source_lang, args.target_lang, source=str(weights),
                                         soft_exit_init=args.soft_exit_init)
            arch, flags = arch_and_flags(model_options(config, str(weights)))
            checkpoints = {"model.pt": (checkpoint, ["--arch", arch, *flags])}
    except (FileNotFoundError, ImportError, ValueError) as e:
        raise SystemExit(f"elmer-convert: error: {e}")
    for name, (checkpoint, flags) in checkpoints.items():
        path = save(checkpoint, args.out, dictionary, name)
        print(f"wrote {path}; fine-tune it with fairseq-train {' '.join(flags)} --finetune-from-model {path} "
              f"(data binarized with --srcdict {path.parent / 'dict.txt'})")


if __name__ == "__main__":
    main()
