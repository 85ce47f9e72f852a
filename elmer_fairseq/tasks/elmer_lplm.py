"""ELMER pretraining: BART-style corrupted documents, reconstructed with Layer Permutation LM.

Corruption (paper section 4.2) is fairseq's own DenoisingDataset with the paper's settings:
sentences split at full stops and shuffled, then spans covering 15% of the (whole-word) tokens,
span lengths ~ Poisson(3), each replaced by one [MASK] (a length-0 span inserts one). It is
seeded by (seed, epoch, index), so a resumed run sees the same data. The NAR decoder reads one
[MASK] per target token and reconstructs the original document; LPLM samples an exit layer for
every target token, k times per document, and runs the decoder on the k permutations as one
batch over a single encoder pass.
"""
import logging
from argparse import Namespace
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from omegaconf import II
from fairseq.data import DenoisingDataset, encoders
from fairseq.data.encoders.utils import get_whole_word_mask
from fairseq.tasks import register_task
from fairseq.tasks.denoising import DenoisingConfig, DenoisingTask

from .elmer_translation import ElmerBatches, EverySampleEvaluated

logger = logging.getLogger(__name__)


@dataclass
class ElmerLPLMConfig(DenoisingConfig):
    # the paper's corruption (BART's own defaults differ: 30% masking, rotation, ...)
    mask: float = field(default=0.15, metadata={"help": "share of (whole-word) tokens covered by masked spans"})
    mask_length: str = field(default="span-poisson", metadata={"help": "span lengths: span-poisson, word or subword"})
    poisson_lambda: float = field(default=3.0, metadata={"help": "mean masked span length (Poisson lambda)"})
    replace_length: int = field(default=1, metadata={"help": "a masked span becomes this many [MASK]s (1, 0 or -1 = as many as its tokens)"})
    permute_sentences: float = field(default=1.0, metadata={"help": "share of documents whose sentences are shuffled"})
    rotate: float = field(default=0.0, metadata={"help": "share of documents rotated (BART; not used by ELMER)"})
    lplm_permutations: int = field(
        default=10, metadata={"help": "k: exit-layer permutations sampled per document; the decoder runs "
                                      "on all k as one batch after one encoder pass (paper: 10)"})
    train_subset: str = II("dataset.train_subset")
    bpe_dir: Optional[str] = field(
        default=None, metadata={"help": "folder with vocab.json and merges.txt of the byte-level BPE the "
                                        "data was written with (as ids; see examples/): masks cover whole "
                                        "words and sentences end at '.'. Without it every dictionary "
                                        "symbol is a word and sentences end at the symbol '.'"})


@register_task("elmer_lplm", dataclass=ElmerLPLMConfig)
class ElmerLPLMTask(EverySampleEvaluated, DenoisingTask):
    cfg: ElmerLPLMConfig

    def __init__(self, cfg, dictionary):
        if not 0.0 <= cfg.mask <= 1.0:
            raise ValueError(f"--mask must be in [0, 1], got {cfg.mask}")
        if not 0.0 <= cfg.permute_sentences <= 1.0:
            raise ValueError(f"--permute-sentences must be in [0, 1], got {cfg.permute_sentences}")
        if cfg.lplm_permutations < 1:
            raise ValueError(f"--lplm-permutations must be >= 1, got {cfg.lplm_permutations}")
        if cfg.poisson_lambda <= 0:
            raise ValueError(f"--poisson-lambda must be > 0, got {cfg.poisson_lambda}")
        super().__init__(cfg, dictionary)
        self.word_starts, self.full_stop = self.word_and_sentence_marks()

    def word_and_sentence_marks(self):
        """(is-word-start per dictionary symbol or None, the full stop's index)."""
        if self.cfg.bpe_dir is None:
            return None, self.dictionary.index(".")
        folder = Path(self.cfg.bpe_dir)
        missing = [f for f in ("vocab.json", "merges.txt") if not (folder / f).is_file()]
        if missing:
            raise FileNotFoundError(f"--bpe-dir {folder}: no {' or '.join(missing)}")
        bpe_cfg = Namespace(bpe="byte_bpe_ids", bpe_vocab=str(folder / "vocab.json"),
                            bpe_merges=str(folder / "merges.txt"), bpe_add_prefix_space=False)
        full_stop = encoders.build_bpe(bpe_cfg).encode(".")
        return get_whole_word_mask(bpe_cfg, self.dictionary), self.dictionary.index(full_stop)

    def load_dataset(self, split, epoch=1, combine=False, **kwargs):
        blocks = self._load_dataset_split(split, epoch, combine)
        keep = np.flatnonzero(blocks.sizes > 2)  # <s> </s> alone: an empty document
        if len(keep) == 0:
            raise ValueError(f"{split}: no non-empty documents in {self.cfg.data}")
        if len(keep) < len(blocks):
            logger.warning(f"{split}: {len(blocks) - len(keep)} empty documents skipped")
            from fairseq.data import SubsetDataset  # only needed for corpora with empty documents

            blocks = SubsetDataset(blocks, keep)
        too_long = int((blocks.sizes > self.cfg.tokens_per_sample).sum())
        if too_long:
            raise ValueError(f"{split}: {too_long} blocks hold a sentence longer than --tokens-per-sample "
                             f"{self.cfg.tokens_per_sample}; pass --shorten-method truncate")
        dataset = DenoisingDataset(
            blocks, blocks.sizes, self.dictionary, self.mask_idx, self.word_starts,
            shuffle=self.cfg.shuffle_instance, seed=self.cfg.seed, mask=self.cfg.mask,
            mask_random=self.cfg.mask_random, insert=self.cfg.insert, rotate=self.cfg.rotate,
            permute_sentences=self.cfg.permute_sentences, bpe=None,
            replace_length=self.cfg.replace_length, mask_length=self.cfg.mask_length,
            poisson_lambda=self.cfg.poisson_lambda,
            # the decoder's targets are the document and its EOS, not the <s> the encoder reads
            item_transform_func=lambda source, target: (source, target[1:]),
        )
        dataset.full_stop_index = self.full_stop  # fairseq's default (EOS) finds no sentence inside a block
        self.datasets[split] = ElmerBatches(dataset, self.dictionary, self.mask_idx, length=None)
        logger.info(f"{split}: {len(dataset)} documents")

    def exit_layers(self, sample, model, generator=None):
        """[k*B, T] exit layers, uniform in 1..L; permutation j of sequence i is row j*B + i."""
        target = sample["target"]
        size = (self.cfg.lplm_permutations * target.size(0), target.size(1))
        layers = torch.randint(1, model.decoder.num_layers + 1, size, generator=generator)
        return layers.to(target.device)

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        # fairseq seeds torch by (seed, update) before every step, so resumed runs draw the same layers
        sample["net_input"]["exit_layers"] = self.exit_layers(sample, model)
        return super().train_step(sample, model, criterion, optimizer, update_num, ignore_grad)

    def valid_step(self, sample, model, criterion):
        generator = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + int(sample["id"][0]))
        sample["net_input"]["exit_layers"] = self.exit_layers(sample, model, generator)
        return super().valid_step(sample, model, criterion)

    def build_model(self, cfg, from_checkpoint=False):
        # LPLM picks exit layers itself: no exit threshold, no soft-exit layer
        cfg.exit_mode, cfg.exit_threshold = "lplm", None
        return super().build_model(cfg, from_checkpoint)
