"""`elmer-convert`: a Hugging Face BART-style checkpoint (BART itself, or the ELMER authors' release)
as an ELMER fairseq checkpoint.

    elmer-convert path/to/bart-base out/bart-base    # a folder with config.json + model.safetensors
                                                     # (or pytorch_model.bin), or one weights file

writes out/bart-base/model.pt, the fairseq dictionary dict.txt for BART's ids (for
`fairseq-preprocess --srcdict`) and its copies dict.src.txt / dict.tgt.txt (the folder is then a
data folder for `ELMER.from_pretrained` and `fairseq-generate`), and prints the model options that
rebuild the same model in `fairseq-train --finetune-from-model`.

HF's BART is a port of fairseq's, so the two compute the same function with the same module names
below `model.`: post-norm layers, an embedding layer norm, learned positions whose first two rows
are unused (fairseq counts positions from padding_idx + 1 = 2, HF adds an offset of 2), and
fairseq's dictionary order for the special tokens. The converter maps the names, checks every
shape against the config, and refuses what ELMER cannot reproduce (untied output embeddings, a
non-zero final_logits_bias) instead of dropping it.
"""
import argparse
import json
import logging
import os
import warnings
from pathlib import Path

import torch
from fairseq import checkpoint_utils, options, utils
from fairseq.data import Dictionary
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.models import ARCH_CONFIG_REGISTRY, ARCH_MODEL_INV_REGISTRY
from omegaconf import OmegaConf

from .models.elmer import EXIT_MODES, MASK_SYMBOL
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
        raise ValueError(f"{source}: the config has no {key!r}: not a BART config")
    return config[key]


def model_options(config: dict, source: str) -> dict:
    """fairseq model options that reproduce the BART of HF config `config`."""
    def get(key):
        return config_value(config, key, source)

    if config.get("model_type", "bart") != "bart":
        raise ValueError(f"{source}: model_type {config['model_type']!r}; only BART (post-norm) checkpoints convert")
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
    flags = []
    for key, value in changed.items():
        flags += [f"--{key.replace('_', '-')}"] + ([] if value is True else [str(value)])
    return arch, flags


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
    if key == "decoder.soft_exit.weight":
        return "concat_head.weight"
    return "model." + key


def convert_hf_bart(state_dict: dict, config, exit_mode: str = "soft", exit_threshold=None,
                    source_lang: str = "src", target_lang: str = "tgt", source: str = "the state dict") -> dict:
    """A fairseq checkpoint (what fairseq-train writes, before any update) of ELMER with the weights
    of the HF BART-style `state_dict` and `config` (a config.json dict or a transformers config).
    `source` names the input in error messages."""
    config = config if isinstance(config, dict) else config.to_dict()
    model_opts = model_options(config, source)
    arch, flags = arch_and_flags(model_opts)
    argv = [".", "--user-dir", PLUGIN_DIR, "--task", "elmer_translation", "--criterion", "elmer_loss",
            "--arch", arch, *flags, "--source-lang", source_lang, "--target-lang", target_lang,
            "--exit-mode", exit_mode]
    if exit_threshold is not None:
        argv += ["--exit-threshold", str(exit_threshold)]
    with warnings.catch_warnings():  # hydra's deprecation notices about how fairseq 0.12 calls it
        warnings.simplefilter("ignore")
        cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(options.get_training_parser(), argv))
    dictionary = bart_dictionary(config_value(config, "vocab_size", source))
    dictionary.add_symbol(MASK_SYMBOL)  # as the task does on loading dict.txt
    utils.set_torch_seed(cfg.common.seed)  # as fairseq-train does: parts BART lacks start the same every time
    model = ElmerTranslationTask(cfg.task, dictionary, dictionary).build_model(cfg.model)

    # a bare BartModel's names lack the `model.` prefix of BartForConditionalGeneration's
    state = {f"model.{k}" if k.startswith(("shared.", "encoder.", "decoder.")) else k: v for k, v in state_dict.items()}
    state["model.shared.weight"] = tied_embedding(state, source)
    bias = state.pop("final_logits_bias", None)
    if bias is not None and bias.any():
        raise ValueError(f"{source}: final_logits_bias is not zero (max |b| = {bias.abs().max():.3g}); ELMER's "
                         f"off-ramps have no bias, so its logits cannot be reproduced")
    if "decoder.soft_exit.weight" not in model.state_dict() and state.pop("concat_head.weight", None) is not None:
        logger.info("concat_head.weight (soft exit's W) is not used by a hard-exit model: left out")
    weights = {}
    for key, init in model.state_dict().items():
        name = hf_name(key)
        if key.endswith(".version"):  # fairseq's format marker, not a weight
            weights[key] = init
            continue
        if key == "decoder.soft_exit.weight" and name not in state:
            logger.info(f"{source} has no concat_head.weight: soft exit's W starts from ELMER's initialisation")
            weights[key] = init
            continue
        if name not in state:
            raise ValueError(f"{source}: no {name} (for our {key}): not a BART-style checkpoint of this config")
        weight = state[name]
        if weight.shape != init.shape:
            raise ValueError(f"{source}: {name} has shape {list(weight.shape)}, but the config needs "
                             f"{list(init.shape)} (our {key})")
        if key == "decoder.soft_exit.weight":  # the authors concatenate [h; Embed(y)], we [Embed(y); h]
            weight = torch.cat(weight.chunk(2, dim=1)[::-1], dim=1)
        weights[key] = weight.to(init.dtype)
    unused = sorted(set(state) - {hf_name(key) for key in weights})
    if unused:
        raise ValueError(f"{source}: {len(unused)} weights that a BART of this config does not have: "
                         f"{', '.join(unused[:5])}{' ...' if len(unused) > 5 else ''}")
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


def save(checkpoint: dict, out_dir) -> Path:
    """Writes out_dir/model.pt and its dictionaries (dict.txt and the task's dict.<lang>.txt, so
    that out_dir is the checkpoint's data folder); returns the path of model.pt."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    task = checkpoint["cfg"]["task"]
    task["data"] = str(out.resolve())
    dictionary = bart_dictionary(checkpoint["model"]["encoder.embed_tokens.weight"].size(0))
    for name in ("dict.txt", f"dict.{task['source_lang']}.txt", f"dict.{task['target_lang']}.txt"):
        dictionary.save(str(out / name))
    path = out / "model.pt"
    checkpoint_utils.torch_persistent_save(checkpoint, str(path))
    return path


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
    if (weights.parent / "vocab.json").is_file() and "vocab_size" in config:
        check_vocab(weights.parent / "vocab.json", config["vocab_size"])
    return read_weights(weights), config, weights


def main(argv=None):
    p = argparse.ArgumentParser(prog="elmer-convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint",
                   help="HF folder (config.json + model.safetensors or pytorch_model.bin) or weights file")
    p.add_argument("out", help="output folder: model.pt, dict.txt, dict.SRC.txt, dict.TGT.txt")
    p.add_argument("--config", help="the HF config.json (default: the one beside the weights)")
    p.add_argument("--exit-mode", default="soft", choices=EXIT_MODES, help="the model's exit mode (default: soft)")
    p.add_argument("--exit-threshold", type=float, help="hard exit's delta (default 0.5)")
    p.add_argument("--source-lang", default="src", help="source suffix of the data (default: src)")
    p.add_argument("--target-lang", default="tgt", help="target suffix of the data (default: tgt)")
    args = p.parse_args(argv)
    # force: importing fairseq has set the root logger to DEBUG, which prints hydra's internals
    logging.basicConfig(format="%(levelname)s | %(name)s | %(message)s", level=logging.INFO, force=True)
    try:
        state_dict, config, weights = read_hf(args.checkpoint, args.config)
        checkpoint = convert_hf_bart(state_dict, config, args.exit_mode, args.exit_threshold,
                                     args.source_lang, args.target_lang, source=str(weights))
    except (FileNotFoundError, ImportError, ValueError) as e:
        raise SystemExit(f"elmer-convert: error: {e}")
    path = save(checkpoint, args.out)
    arch, flags = arch_and_flags(model_options(config, str(weights)))
    print(f"wrote {path} and its dictionaries; fine-tune it with fairseq-train --arch {arch} {' '.join(flags)} "
          f"--finetune-from-model {path} (data binarized with --srcdict {path.parent / 'dict.txt'})")


if __name__ == "__main__":
    main()
