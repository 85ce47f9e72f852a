"""Fine-tuning and one-pass generation of ELMER on fairseq-binarized source/target pairs."""
import logging
import os
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from fairseq import utils
from fairseq.dataclass.configs import GenerationConfig
from fairseq.data import BaseWrapperDataset, data_utils, indexed_dataset
from fairseq.tasks import register_task
from fairseq.tasks.translation import TranslationConfig, TranslationTask
from omegaconf import II

from ..generator import ElmerGenerator
from .. import exit_policy
from ..exit_policy import DEFAULT_EXIT_THRESHOLD
from ..models.elmer import MASK_SYMBOL, ElmerModel, warn_smoothing_floor
from ..ops import prepare as prepare_off_ramp

logger = logging.getLogger(__name__)

@dataclass
class ElmerTranslationConfig(TranslationConfig):
    max_target_length: int = field(
        default=64,
        metadata={"help": "T: the number of [MASK] positions the NAR decoder fills, i.e. the longest "
                          "output, EOS included. Longer training targets are cut to T (with a warning)"},
    )
    # a plain str (validated at start-up): fairseq's ChoiceEnum values do not pickle into checkpoints
    exit_mode: Optional[str] = field(
        default=None,
        metadata={"help": "early exit policy, soft or hard: soft (every layer predicts and feeds its prediction "
                          "upward) or hard (a token exits at the first layer whose off-ramp entropy "
                          "is below --exit-threshold). Training default: soft. Generation: the "
                          "checkpoint's mode; another mode is an error"},
    )
    exit_threshold: Optional[float] = field(
        default=None,
        metadata={"help": f"hard exit's delta: a token exits when its off-ramp entropy (nats) is "
                          f"below it (training default {DEFAULT_EXIT_THRESHOLD}, the paper's; generation: the "
                          f"checkpoint's; 0 = never exit early). "
                          f"Only with --exit-mode hard"},
    )
    exit_thresholds: Optional[str] = field(
        default=None,
        metadata={"help": "generation, hard exit: a JSON file of calibrated per-layer thresholds (written by "
                          "elmer-calibrate) instead of one --exit-threshold"},
    )
    eos_after_end: bool = field(
        default=False,
        metadata={"help": "train the positions after a target's EOS to predict EOS too, instead of ignoring "
                          "them: the model learns where outputs end at every position up to T (the "
                          "first EOS still ends the output)"},
    )
    oracle_length: bool = field(
        default=False,
        metadata={"help": "generation: decode each sample with T = its reference's length + 1 (EOS), as the "
                          "ELMER authors' test script does. It reads the reference, which a real system "
                          "cannot: use it to compare with the paper's numbers, never as a result"},
    )
    length_cut: Optional[int] = field(
        default=None,
        metadata={"help": "generation: after decoder layer 1, the upper layers run only on the positions that "
                          "layer 1's predictions say the batch's outputs need (through the first EOS; with "
                          "--output-loss ctc, through the last non-blank) plus this margin; the positions past "
                          "it keep layer 1's prediction. Default: off, every layer decodes all "
                          "--max-target-length positions (the paper's)"},
    )
    ramp_shortlist: Optional[int] = field(
        default=None,
        metadata={"help": "generation, soft exit: the off-ramps of decoder layers 2..L-1, whose argmax only picks the "
                          "token embedding the next layer reads, score the union of layer 1's K most likely tokens at "
                          "each position instead of the whole vocabulary (layer 1 and the last layer score it all). "
                          "Faster where an off-ramp costs its matrix's bytes (CPU, batch 1); a middle layer whose "
                          "argmax lies outside the union reads another token, so outputs can differ. Default: off"},
    )
    ramp_precision: str = field(
        default="fp32",
        metadata={"help": "generation: the dtype of the off-ramps' products, fp32 (the model's, the paper's) or bf16: "
                          "a bf16 copy of the off-ramp matrix, made once, and the layer's states rounded to bf16; "
                          "argmax, probability and entropy still in fp32. About 2x faster off-ramps on a CPU with "
                          "bf16 instructions (AVX512-BF16, AMX) and on GPUs; where two tokens are close the "
                          "argmax can differ (docs/speed.md measures how often)"},
    )
    max_exit_layer: Optional[int] = field(
        default=None,
        metadata={"help": "generation: every position exits by decoder layer K at the latest and the layers above K "
                          "are not run: soft exit writes layer K's off-ramp's prediction (every off-ramp is trained "
                          "to predict the output), hard exit makes K its last layer. Cheaper by the layers left "
                          "out; outputs can differ (docs/one-pass.md measures them). Default: all L layers (the "
                          "paper's)"},
    )
    seed: int = II("common.seed")


def require_elmer(model, cfg):
    """ELMER's tasks train and decode ELMER models only; another model (a checkpoint of fairseq's
    `transformer`, say) would fail later, deep inside loading or decoding."""
    if not isinstance(model, ElmerModel):
        arch = getattr(cfg, "arch", None) or getattr(cfg, "_name", None)
        raise ValueError(f"this is a {type(model).__name__} (--arch {arch}), not an ELMER model: the ELMER "
                         f"tasks need --arch elmer_base, elmer_tiny, ... or a checkpoint trained with one")
    return model


class ElmerBatches(BaseWrapperDataset):
    """Collates pairs for the NAR decoder: one [MASK] input per position, targets y + EOS.

    With `length` T, targets are cut (keeping a final EOS) or padded to exactly T positions, as
    at inference, with pad (ignored by the loss) or, with `eos_after_end`, with EOS (trained);
    with None, T is the batch's longest target (pretraining reconstructs it all).
    """

    def __init__(self, dataset, dictionary, mask_idx: int, length: Optional[int], seed: int,
                 eos_after_end: bool = False):
        super().__init__(dataset)
        self.pad, self.eos = dictionary.pad(), dictionary.eos()
        self.mask_idx, self.length, self.seed = mask_idx, length, seed
        self.fill = self.eos if eos_after_end else self.pad

    def ordered_indices(self):
        # fairseq draws this order (which samples share a batch) under --seed + epoch and keeps the
        # batches of the epoch a run starts in: a run resumed in epoch 2 or later would batch
        # differently from an uninterrupted one. Epoch 1's draw in every epoch batches them alike.
        with data_utils.numpy_seed(self.seed + 1):
            return self.dataset.ordered_indices()

    def collater(self, samples):
        batch = self.dataset.collater(samples)
        if not batch or batch.get("target") is None:
            return batch
        target = batch["target"]
        if self.length is not None:
            if target.size(1) > self.length:
                target = target[:, : self.length].clone()
                cut = target[:, -1].ne(self.pad) & target[:, -1].ne(self.eos)
                target[cut, -1] = self.eos
            target = torch.nn.functional.pad(target, (0, self.length - target.size(1)), value=self.pad)
            if self.fill != self.pad:  # no copy of every batch when the default leaves pad in place
                target = target.masked_fill(target.eq(self.pad), self.fill)
        batch["target"] = target
        batch["net_input"]["prev_output_tokens"] = torch.full_like(target, self.mask_idx)
        batch["ntokens"] = int(target.ne(self.pad).sum())
        return batch


class EverySampleEvaluated:
    """Task mixin: validation and generation batches keep every sample.

    fairseq's batch_by_size drops the samples of a split that do not fill a whole multiple of
    --required-batch-size-multiple (default 8): fairseq-generate would silently skip them and a
    small validation split would come out empty.
    """

    def get_batch_iterator(self, dataset, *args, **kwargs):
        if dataset is not self.datasets.get(self.cfg.train_subset):
            kwargs["required_batch_size_multiple"] = 1
        return super().get_batch_iterator(dataset, *args, **kwargs)


@register_task("elmer_translation", dataclass=ElmerTranslationConfig)
class ElmerTranslationTask(EverySampleEvaluated, TranslationTask):
    """Sequence-to-sequence fine-tuning of ELMER (summarization, question generation, dialogue)."""

    cfg: ElmerTranslationConfig

    @classmethod
    def setup_task(cls, cfg, **kwargs):
        folder = utils.split_paths(cfg.data)[0]
        # fairseq fails with a bare listdir error, or "Could not infer language pair"
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"data folder {folder} not found: pass the --destdir of fairseq-preprocess")
        if (cfg.source_lang is None or cfg.target_lang is None) and data_utils.infer_language_pair(folder)[0] is None:
            raise FileNotFoundError(f"data folder {folder} holds no binarized splits (train.src-tgt.src.bin, ...): "
                                    f"pass the --destdir of fairseq-preprocess")
        return super().setup_task(cfg, **kwargs)

    @classmethod
    def load_dictionary(cls, filename):
        if not os.path.exists(filename):
            raise FileNotFoundError(f"dictionary {filename} not found: binarize the data with "
                                    f"fairseq-preprocess (see examples/xsum/prepare.py)")
        try:
            dictionary = super().load_dictionary(filename)
        except ValueError as e:  # fairseq quotes the bad line but not the file
            raise ValueError(f"{filename}: {e}") from None
        dictionary.add_symbol(MASK_SYMBOL)
        return dictionary

    def __init__(self, cfg, src_dict, tgt_dict):
        if cfg.max_target_length < 1:
            raise ValueError(f"--max-target-length must be >= 1, got {cfg.max_target_length}")
        if cfg.max_target_length > cfg.max_target_positions:
            raise ValueError(f"--max-target-length {cfg.max_target_length} exceeds "
                             f"--max-target-positions {cfg.max_target_positions}")
        if cfg.load_alignments:
            raise ValueError("--load-alignments: ELMER has no alignment supervision; it would load the "
                             "alignments and ignore them")
        if cfg.left_pad_target:
            raise ValueError("--left-pad-target: ELMER's targets are right-padded to T, position t of the "
                             "output at [MASK] t")
        # fail before any data loads; without --exit-mode the model decides (build_model/generator)
        exit_policy.resolve(cfg.exit_mode or exit_policy.HARD, cfg.exit_threshold)
        super().__init__(cfg, src_dict, tgt_dict)

    def load_dataset(self, split, epoch=1, combine=False, **kwargs):
        paths = [os.path.join(p, f"{split}.{self.cfg.source_lang}-{self.cfg.target_lang}.{lang}")
                 for p in utils.split_paths(self.cfg.data)[:1] for lang in (self.cfg.source_lang, self.cfg.target_lang)]
        missing = [p for p in paths if not indexed_dataset.dataset_exists(p, impl=self.cfg.dataset_impl)]
        if missing:
            raise FileNotFoundError(f"no binarized {split} split: {', '.join(p + '.bin/.idx' for p in missing)} "
                                    f"missing (fairseq-preprocess --source-lang {self.cfg.source_lang} "
                                    f"--target-lang {self.cfg.target_lang} ...)")
        empty = [p for p in paths if os.path.getsize(p + ".bin") == 0]
        if empty:  # fairseq cannot even open an empty binarized file
            raise ValueError(f"{split}: {empty[0]}.bin holds no examples (was the raw file empty?)")
        src = data_utils.load_indexed_dataset(paths[0], self.src_dict, self.cfg.dataset_impl)
        tgt = data_utils.load_indexed_dataset(paths[1], self.tgt_dict, self.cfg.dataset_impl)
        if len(src) != len(tgt):
            raise ValueError(f"{split}: {len(src)} source lines ({paths[0]}) but {len(tgt)} target "
                             f"lines ({paths[1]}); the raw files must have one pair per line")
        self.check_lengths(split, src.sizes, tgt.sizes)
        super().load_dataset(split, epoch=epoch, combine=combine, **kwargs)
        self.datasets[split] = ElmerBatches(self.datasets[split], self.tgt_dict,
                                            self.tgt_dict.index(MASK_SYMBOL), self.cfg.max_target_length,
                                            self.cfg.seed, self.cfg.eos_after_end)

    def check_lengths(self, split, src_sizes, tgt_sizes):
        long_src = int((src_sizes > self.cfg.max_source_positions).sum())
        if long_src and not self.cfg.truncate_source:
            raise ValueError(f"{split}: {long_src} of {len(src_sizes)} sources are longer than "
                             f"--max-source-positions {self.cfg.max_source_positions}; pass "
                             f"--truncate-source to cut them")
        if long_src:
            logger.warning(f"{split}: {long_src} of {len(src_sizes)} sources are cut to "
                           f"--max-source-positions {self.cfg.max_source_positions} (--truncate-source)")
        long_tgt = int((tgt_sizes > self.cfg.max_target_length).sum())
        if long_tgt:
            logger.warning(f"{split}: {long_tgt} of {len(tgt_sizes)} targets are longer than "
                           f"--max-target-length {self.cfg.max_target_length} (EOS included); the "
                           f"model learns them cut to that length")
        for side, sizes in (("source", src_sizes), ("target", tgt_sizes)):
            blank = np.flatnonzero(sizes <= 1)  # only the EOS fairseq-preprocess appends: a blank raw line
            if len(blank):
                logger.warning(f"{split}: {len(blank)} of {len(sizes)} {side}s are empty (raw line "
                               f"{', '.join(str(i + 1) for i in blank[:5])}{', ...' if len(blank) > 5 else ''})")

    def max_positions(self):
        # targets never limit batching: they are cut to --max-target-length
        return (self.cfg.max_source_positions, None)

    def build_model(self, cfg, from_checkpoint=False):
        if not from_checkpoint:  # a new model takes this run's exit options; a loaded one keeps its own
            cfg.exit_mode, cfg.exit_threshold = exit_policy.resolve(self.cfg.exit_mode, self.cfg.exit_threshold)
            if getattr(cfg, "output_loss", None) == "ctc":
                refuse_with_ctc(cfg, self.cfg)
            # about training: a loaded checkpoint decodes with whatever thresholds it is given
            warn_smoothing_floor(cfg, len(self.target_dictionary))
        return require_elmer(super().build_model(cfg, from_checkpoint), cfg)

    def build_generator(self, models, args, **unused):
        if getattr(args, "iter_decode_max_iter", 0) != 0:
            raise ValueError("ELMER decodes in one pass: pass --iter-decode-max-iter 0")
        beam = getattr(args, "beam", 1)
        # fairseq's NAT generators ignore --beam too; only a width other than fairseq's default
        # (5, indistinguishable from an explicit --beam 5) is known to be the user's request
        if beam not in (1, GenerationConfig.beam):
            raise ValueError(f"--beam {beam}: ELMER has no beam search (one pass, no length predictor); "
                             f"leave --beam out")
        if self.cfg.oracle_length and models[0].blank is not None:
            raise ValueError("--oracle-length decodes T = the reference's length + 1 positions, the authors' "
                             "protocol for the paper's output; a CTC model writes blanks between tokens and "
                             "needs more positions than its output: drop --oracle-length")
        policy = exit_policy.for_decoding(models[0].decoder, self.cfg.exit_mode, self.cfg.exit_threshold,
                                          self.cfg.exit_thresholds)
        prepare_off_ramp(next(models[0].parameters()).device)  # a JIT build must not land in timed decoding
        return ElmerGenerator(self.target_dictionary, self.cfg.max_target_length, policy.threshold,
                              oracle_length=self.cfg.oracle_length, policy=policy.describe(),
                              length_cut=self.cfg.length_cut, shortlist=self.cfg.ramp_shortlist,
                              ramp_precision=self.cfg.ramp_precision, max_exit_layer=self.cfg.max_exit_layer)

    def build_dataset_for_inference(self, src_tokens, src_lengths, constraints=None):
        if constraints is not None:
            raise NotImplementedError("constrained decoding is not supported by ELMER")
        # raw text (fairseq-interactive) follows the rules of the binarized splits
        limit = self.cfg.max_source_positions
        for tokens in src_tokens:
            if len(tokens) <= limit:
                continue
            if not self.cfg.truncate_source:
                raise ValueError(f"an input of {len(tokens)} tokens is longer than --max-source-positions "
                                 f"{limit}; pass --truncate-source to cut it")
            logger.warning(f"an input of {len(tokens)} tokens is cut to --max-source-positions {limit} "
                           f"(--truncate-source)")
        src_tokens = [t if len(t) <= limit else torch.cat([t[: limit - 1], t[-1:]]) for t in src_tokens]
        return super().build_dataset_for_inference(src_tokens, [len(t) for t in src_tokens])


def refuse_with_ctc(model_cfg, task_cfg):
    """Training options that mean nothing for a CTC output: an error, not an option that is ignored."""
    smoothing = getattr(model_cfg, "label_smoothing", 0.0) or 0.0
    if smoothing > 0:
        raise ValueError(f"--label-smoothing {smoothing}: not defined for --output-loss ctc (the loss sums over "
                         f"alignments, not per position); pass --label-smoothing 0")
    if task_cfg.eos_after_end:
        raise ValueError("--eos-after-end trains EOS at the positions after the target; with --output-loss ctc "
                         "the output ends where the blanks begin and targets have no EOS: drop it")

