"""Every change this plugin makes to fairseq's and torch's own functions, in one place.

Importing `elmer_fairseq` (which `--user-dir` does) calls `install()` once. It was written for
fairseq 0.12 (0.12.2, and fairseq-fixed 0.12.3.x on Python >= 3.11); with another version it
still patches, after a warning, because the wrapped functions may have changed. It patches:

1. torch's safe-loading allow-list (`torch.serialization.add_safe_globals`): the few plain Python
   classes fairseq 0.12 pickles into every checkpoint (`checkpoint.FAIRSEQ_CHECKPOINT_GLOBALS`),
   and the names in ELMER_TRUSTED_GLOBALS=module.Name,... (`checkpoint.trust`). torch >= 2.6
   loads with `weights_only=True`, which refuses them;
2. `fairseq.checkpoint_utils.load_checkpoint_to_cpu` (fairseq-train resuming or
   --finetune-from-model, fairseq-generate, the hub all load through it): a checkpoint that is cut
   short, or that holds objects safe loading refuses, fails with a message naming the file and
   what to do (`checkpoint.unreadable`); other errors (a missing file, no permission) pass as
   they are;
3. `fairseq.distributed.utils.call_main`: the distributed options are checked before anything
   starts, and torchrun's environment is read on CPU too (`distributed.check_distributed_options`);
   after training the process group is destroyed (left to the interpreter's exit, gloo can abort
   a finished run);
4. `fairseq.distributed.utils.distributed_init`: with `--distributed-init-method tcp://...`, a
   rendezvous with a deadline (ELMER_RENDEZVOUS_TIMEOUT) instead of a hang
   (`distributed.rendezvous`), and the warning fairseq's own init then gives is silenced;
5. `fairseq.options.parse_args_and_arch` (every fairseq CLI parses its options with it): `--bf16`
   no longer implies `--tpu`, so bf16 trains on the GPU (or with `--cpu`) instead of asking
   torch_xla for a TPU; an explicit `--tpu` still means TPU, and `--bf16` (or
   `--memory-efficient-bf16`) with `--fp16`, `--memory-efficient-fp16` or `--amp` is refused with
   an error naming them (fairseq would build a bf16 model with an fp16 or AMP optimizer);
6. LevT's decoding step (`fairseq.models.nat.levenshtein_transformer`: `LevenshteinTransformerModel
   .forward_decoder` and the `_apply_ins_masks` it calls): the placeholders it inserts are cut so
   that no output grows past the decoder's position table (`max_target_positions`). fairseq caps
   each slot's insertions (its head counts up to 255; the generator allows max(10, 2 x the source
   length)) but not their total, and a longer output failed with an IndexError in the next
   decoder pass. fairseq-generate, the
   benchmark and every other LevT decoding in a process with the plugin loaded get the cap.

ELMER_FAIRSEQ_NO_PATCHES=1 leaves fairseq and torch untouched (the models, tasks, criterion and
BPE are still registered). Then, with torch >= 2.6, no fairseq checkpoint loads (fairseq-generate,
resuming, ELMER.from_pretrained) unless safe loading is switched off with
TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 or the classes are allowed by hand; ELMER_TRUSTED_GLOBALS is
not read; damaged checkpoints fail with torch's own error; and bad distributed options fail as
fairseq 0.12 lets them (a 30-minute rendezvous wait, or an error deep inside); `--bf16` implies
`--tpu` again (training fails without torch_xla); and LevT may run past its positions again.

What was patched is logged at debug level (logger `elmer_fairseq.patches`; LOGLEVEL=DEBUG shows it).
"""
import argparse
import contextvars
import logging
import os
import warnings

import torch
import torch.distributed as dist

from . import checkpoint, distributed

logger = logging.getLogger(__name__)
# fairseq 0.12 leaves the root logger at DEBUG, which would print these lines in every command's
# output; like fairseq's own CLIs, this logger takes its level from LOGLEVEL (LOGLEVEL=DEBUG shows them)
_level = os.environ.get("LOGLEVEL", "INFO").upper()
logger.setLevel(_level if isinstance(logging.getLevelName(_level), int) else logging.INFO)

OPT_OUT_ENV = "ELMER_FAIRSEQ_NO_PATCHES"
WRITTEN_FOR = "0.12"  # fairseq's major.minor version that every wrapper below was written against

_original = {}  # "module.function" -> fairseq's function, once installed


class FairseqVersionWarning(UserWarning):
    """The installed fairseq is not the version these patches were written for."""


def opted_out() -> bool:
    return os.environ.get(OPT_OUT_ENV, "").strip().lower() not in ("", "0", "false", "no")


def check_version(version: str) -> bool:
    """Whether `version` is a fairseq 0.12.x; warns (FairseqVersionWarning) when it is not."""
    if version.split(".")[:2] == WRITTEN_FOR.split("."):
        return True
    warnings.warn(
        f"elmer_fairseq was written for fairseq {WRITTEN_FOR}.x, found fairseq {version}: its patches of "
        f"fairseq's checkpoint loading, distributed start-up and --bf16 option (elmer_fairseq/patches.py) may "
        f"not fit. If one fails, install fairseq 0.12 (fairseq-fixed==0.12.3.1 on Python >= 3.11) or set "
        f"{OPT_OUT_ENV}=1", FairseqVersionWarning, stacklevel=3)
    return False


# ---------------------------------------------------------------- the wrappers


def load_checkpoint_to_cpu(path, *args, **kwargs):
    """fairseq's loader; a damaged checkpoint, or one with objects safe loading refuses, is named
    with what to do. Any other error (I/O: missing, no permission) is raised unchanged."""
    try:
        return _original["fairseq.checkpoint_utils.load_checkpoint_to_cpu"](path, *args, **kwargs)
    except Exception as error:
        problem = checkpoint.unreadable(path, error) if os.path.isfile(path) else None
        if problem is None:
            raise
        if "safe loading does not allow" in problem:
            # from None: torch's message advises switching safe loading off; ours lists exactly the
            # objects to allow instead
            raise RuntimeError(problem) from None
        raise RuntimeError(problem) from error


def call_main(cfg, main, **kwargs):
    distributed.check_distributed_options(cfg)
    result = _original["fairseq.distributed.utils.call_main"](cfg, main, **kwargs)
    # fairseq leaves the process group to the interpreter's exit, where gloo's threads can die
    # unjoined ("terminate called without an active exception", SIGABRT after a finished run)
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    return result


def distributed_init(cfg):
    """fairseq's distributed_init, after a bounded rendezvous for tcp:// addresses."""
    from omegaconf import DictConfig

    if isinstance(cfg, DictConfig) and not cfg.common.tpu and not dist.is_initialized():
        dt = cfg.distributed_training
        url = dt.distributed_init_method or ""
        if url.startswith("tcp://"):
            rank, world = dt.distributed_rank, dt.distributed_world_size
            store = distributed.rendezvous(url, world, rank, distributed.rendezvous_timeout())
            logger.info(f"distributed init (rank {rank}): {url}, {world} processes joined")
            dist.init_process_group(backend=dt.distributed_backend, store=store, world_size=world, rank=rank)
            if dt.distributed_backend == "nccl":  # as fairseq does: set up the NCCL communicator now
                dist.all_reduce(torch.zeros(1).cuda())
    return _original["fairseq.distributed.utils.distributed_init"](cfg)


# fairseq's precision options: the ones that switch bf16 on, and those it cannot go with
BF16_OPTIONS = ("--bf16", "--memory-efficient-bf16")
NOT_WITH_BF16 = ("--fp16", "--memory-efficient-fp16", "--amp")


def given_options(input_args, options):
    """Which of the on/off `options` the command line (`input_args`, else sys.argv) gives
    explicitly: what fairseq's parsed options cannot tell (tpu=True from --tpu or from --bf16)."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)  # fairseq allows no abbreviations either
    for option in options:
        parser.add_argument(option, action="store_true")
    known, _ = parser.parse_known_args(input_args)
    return [option for option in options if getattr(known, option[2:].replace("-", "_"))]


def parse_args_and_arch(parser, input_args=None, *args, **kwargs):
    """fairseq's option parsing, where --bf16 means bfloat16 on the device that trains: fairseq
    0.12 also sets --tpu with it, and its trainer then asks torch_xla for a device, so bf16 could
    not train on a GPU. An explicit --tpu is left as fairseq reads it."""
    given = given_options(input_args, ("--tpu",) + BF16_OPTIONS + NOT_WITH_BF16)
    bf16, clash = [o for o in given if o in BF16_OPTIONS], [o for o in given if o in NOT_WITH_BF16]
    if bf16 and clash:
        # fairseq would build a bf16 model and give it an fp16 loss scaler or AMP's optimizer
        # (or, with --fp16, fail with a message about --tpu)
        raise ValueError(f"{' and '.join(bf16)} cannot be combined with {' and '.join(clash)}: pick one "
                         f"precision (bf16 needs no loss scaling)")
    parsed = _original["fairseq.options.parse_args_and_arch"](parser, input_args, *args, **kwargs)
    options = parsed[0] if isinstance(parsed, tuple) else parsed  # (args, extra) with parse_known=True
    if getattr(options, "bf16", False) and "--tpu" not in given:
        options.tpu = False
    return parsed


# the position table of the LevT model whose decoding step is running (None outside one)
_levt_positions = contextvars.ContextVar("levt_positions", default=None)
LEVT = "fairseq.models.nat.levenshtein_transformer"


def forward_decoder(self, decoder_out, encoder_out, **kwargs):
    """fairseq's LevT decoding step, which tells _apply_ins_masks below how many positions its
    decoder has (a context variable: the model itself is not changed)."""
    token = _levt_positions.set(self.decoder.max_positions())
    try:
        return _original[f"{LEVT}.LevenshteinTransformerModel.forward_decoder"](self, decoder_out, encoder_out, **kwargs)
    finally:
        _levt_positions.reset(token)


def _apply_ins_masks(in_tokens, in_scores, mask_ins_pred, padding_idx, unk_idx, eos_idx):
    """fairseq's placeholder insertion, with the insertions [B, slots] cut to what the position
    table has room for: slots keep theirs from the left until the room is used up. Applied to
    LevT's final choice (after its eos penalty and per-slot caps), so the outputs that fit are
    unchanged. Outside a LevT step (no table known), fairseq's as it is."""
    limit = _levt_positions.get()
    if limit is not None:
        mask_ins_pred = mask_ins_pred.masked_fill(in_tokens[:, 1:].eq(padding_idx), 0)  # no slots in the padding
        room = limit - in_tokens.ne(padding_idx).sum(1, keepdim=True)
        earlier = mask_ins_pred.cumsum(1) - mask_ins_pred
        mask_ins_pred = torch.minimum(mask_ins_pred, (room - earlier).clamp(min=0))
    return _original[f"{LEVT}._apply_ins_masks"](in_tokens, in_scores, mask_ins_pred, padding_idx, unk_idx, eos_idx)


# ---------------------------------------------------------------- installing them


def _wrap(module, name: str, wrapper):
    """Replaces module.name (a module's function, or a class's method) with `wrapper`."""
    owner = f"{module.__module__}.{module.__qualname__}" if isinstance(module, type) else module.__name__
    key = f"{owner}.{name}"
    original = getattr(module, name, None)
    if original is None:
        warnings.warn(f"elmer_fairseq: {key} not found in this fairseq; left unpatched", FairseqVersionWarning)
        return
    _original[key] = original
    setattr(module, name, wrapper)
    logger.debug(f"patched {key}")


def install() -> bool:
    """Installs every patch above, once per process (later calls do nothing); nothing when
    ELMER_FAIRSEQ_NO_PATCHES is set. Returns whether the patches are in place."""
    if _original:
        return True
    if opted_out():
        logger.debug(f"{OPT_OUT_ENV} is set: fairseq and torch left unpatched")
        return False
    import fairseq
    from fairseq import checkpoint_utils, options
    from fairseq.distributed import utils as fairseq_distributed
    from fairseq.models.nat import levenshtein_transformer

    check_version(getattr(fairseq, "__version__", "unknown"))
    if hasattr(torch.serialization, "add_safe_globals"):  # torch >= 2.4
        torch.serialization.add_safe_globals(checkpoint.FAIRSEQ_CHECKPOINT_GLOBALS)
        logger.debug("allowed in torch's safe loading: "
                     + ", ".join(f"{c.__module__}.{c.__qualname__}" for c in checkpoint.FAIRSEQ_CHECKPOINT_GLOBALS))
    trusted = [n for n in os.environ.get("ELMER_TRUSTED_GLOBALS", "").split(",") if n.strip()]
    if trusted:
        checkpoint.trust(*trusted)
        logger.debug(f"allowed in torch's safe loading (ELMER_TRUSTED_GLOBALS): {', '.join(trusted)}")
    _wrap(checkpoint_utils, "load_checkpoint_to_cpu", load_checkpoint_to_cpu)
    _wrap(fairseq_distributed, "call_main", call_main)
    _wrap(fairseq_distributed, "distributed_init", distributed_init)
    # fairseq's distributed_init finds the process group already built by ours
    warnings.filterwarnings("ignore", message="Distributed is already initialized, cannot initialize twice")
    _wrap(options, "parse_args_and_arch", parse_args_and_arch)
    _wrap(levenshtein_transformer.LevenshteinTransformerModel, "forward_decoder", forward_decoder)
    _wrap(levenshtein_transformer, "_apply_ins_masks", _apply_ins_masks)
    return True
