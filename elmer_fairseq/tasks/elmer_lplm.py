"""ELMER pretraining: BART-style corrupted documents, reconstructed with Layer Permutation LM.

Corruption (paper section 4.2) is fairseq's own DenoisingDataset with the paper's settings:
sentences split at full stops and shuffled, then spans covering 15% of the (whole-word) tokens,
span lengths ~ Poisson(3), each replaced by one [MASK] (a length-0 span inserts one). It is
seeded by (seed, epoch, index), so a resumed run sees the same data. The NAR decoder reads one
[MASK] per target token and reconstructs the original document; LPLM samples an exit layer for
every target token, k times per document, and runs the decoder on the k permutations as one
batch over a single encoder pass (or on --lplm-chunk permutations at a time, same gradients).
Training draws a document's exit layers from (seed, update, document id): distributed ranks, which
hold different documents, draw different layers, and one process draws the same ones.

Input: `fairseq-preprocess --only-source` of text with one sentence per line and a blank line
between documents. A document longer than --tokens-per-sample is cut into blocks of whole
sentences; empty documents are skipped with a warning; a single sentence longer than a block is
an error unless --shorten-method truncate cuts it.
"""
import logging
import math
import os
from argparse import Namespace
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from omegaconf import II
from fairseq import utils
from fairseq.data import (AppendTokenDataset, DenoisingDataset, PrependTokenDataset,
                          StripTokenDataset, TokenBlockDataset, data_utils, encoders)
from fairseq.data.shorten_dataset import maybe_shorten_dataset
from fairseq.data.encoders.utils import get_whole_word_mask
from fairseq.optim.amp_optimizer import AMPOptimizer
from fairseq.tasks import register_task
from fairseq.tasks.denoising import DenoisingConfig, DenoisingTask

from .. import exit_policy
from .elmer_translation import ElmerBatches, EverySampleEvaluated, require_elmer

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
    lplm_chunk: int = field(
        default=0, metadata={"help": "run the decoder on this many permutations at a time when k of them "
                                     "do not fit in memory (0 = all k at once). The encoder still runs "
                                     "once; loss and gradients equal the unchunked ones. With several "
                                     "GPUs it needs --ddp-backend legacy_ddp"})
    train_subset: str = II("dataset.train_subset")
    bpe_dir: Optional[str] = field(
        default=None, metadata={"help": "folder with vocab.json and merges.txt of the byte-level BPE the "
                                        "data was written with (as ids; see examples/): masks cover whole "
                                        "words and sentences end at '.'. Without it every dictionary "
                                        "symbol is a word and sentences end at the symbol '.'"})


class SeededDenoisingDataset(DenoisingDataset):
    """fairseq's DenoisingDataset seeds numpy by (seed, epoch, index) but draws spans and sentence
    orders from torch's global generator, i.e. from wherever the process happens to be. Seeding
    that too makes an item a function of (seed, epoch, index) alone: in a data-loader worker, in a
    resumed run, in a test."""

    def __getitem__(self, index):
        seed = np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(2, np.uint32)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed[0]) << 32 | int(seed[1]))
            return super().__getitem__(index)

    def collater(self, samples, pad_to_length=None):
        batch = super().collater(samples, pad_to_length)
        if batch:  # fairseq's counts the first source's tokens
            batch["nsentences"] = len(samples)
        return batch


class StrippedLines(StripTokenDataset):
    """The binarized lines without their EOS, and sizes that say so. fairseq's StripTokenDataset
    keeps the EOS in its sizes, so a blank line has size 1, never reads as a document break
    (size 0), and blocks pack several documents together."""

    def __init__(self, dataset, eos: int):
        super().__init__(dataset, eos)
        self._sizes = np.maximum(dataset.sizes - 1, 0)  # fairseq-preprocess ends every line with one EOS

    @property
    def sizes(self):
        return self._sizes

    def size(self, index):
        return self._sizes[index]

    def num_tokens(self, index):
        return self._sizes[index]


@register_task("elmer_lplm", dataclass=ElmerLPLMConfig)
class ElmerLPLMTask(EverySampleEvaluated, DenoisingTask):
    cfg: ElmerLPLMConfig

    def __init__(self, cfg, dictionary):
        for name, value in (("mask", cfg.mask), ("permute-sentences", cfg.permute_sentences),
                            ("mask-random", cfg.mask_random), ("insert", cfg.insert)):
            if not 0.0 <= value <= 1.0:  # also rejects NaN
                raise ValueError(f"--{name} must be in [0, 1], got {value}")
        if cfg.lplm_permutations < 1:
            raise ValueError(f"--lplm-permutations must be >= 1, got {cfg.lplm_permutations}")
        if cfg.lplm_chunk < 0:
            raise ValueError(f"--lplm-chunk must be >= 0 (0 = all permutations at once), got {cfg.lplm_chunk}")
        if cfg.sample_break_mode == "eos":
            raise ValueError("--sample-break-mode eos makes every sentence a document: nothing to shuffle; "
                             "use complete_doc (blocks of whole sentences within a document)")
        if not cfg.poisson_lambda > 0:
            raise ValueError(f"--poisson-lambda must be > 0, got {cfg.poisson_lambda}")
        # a source is its block (<= tokens-per-sample) plus at most one inserted [MASK] per masked
        # word and the --insert share
        longest = cfg.tokens_per_sample + math.ceil(cfg.tokens_per_sample * (cfg.mask + cfg.insert))
        if longest > cfg.max_source_positions or cfg.tokens_per_sample > cfg.max_target_positions:
            raise ValueError(f"--tokens-per-sample {cfg.tokens_per_sample} makes corrupted sources of up to "
                             f"{longest} tokens and targets of up to {cfg.tokens_per_sample}: more than "
                             f"--max-source-positions {cfg.max_source_positions} / --max-target-positions "
                             f"{cfg.max_target_positions}; lower --tokens-per-sample or raise the positions")
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

    def _load_dataset_split(self, split, epoch, combine):
        """<s> block </s>: blocks of whole sentences, at most --tokens-per-sample tokens, never
        across a document break (fairseq's own version merges documents: see StrippedLines)."""
        paths = utils.split_paths(self.cfg.data)
        path = os.path.join(paths[(epoch - 1) % len(paths)], split)
        lines = data_utils.load_indexed_dataset(path, self.dictionary, self.cfg.dataset_impl, combine=combine)
        if lines is None:
            raise FileNotFoundError(f"no binarized {split} split: {path}.bin/.idx (fairseq-preprocess --only-source)")
        lines = StrippedLines(lines, self.dictionary.eos())
        if not lines.sizes.any():  # fairseq's block builder would fail deep inside
            raise ValueError(f"{split}: no non-empty documents in {path}.bin (was the text empty?)")
        blank = lines.sizes == 0  # a blank line after a blank line (or first) is an empty document
        empty = int((blank & np.concatenate([[True], blank[:-1]])).sum())
        if empty:
            logger.warning(f"{split}: {empty} empty documents (consecutive blank lines) skipped")
        lines = maybe_shorten_dataset(lines, split, self.cfg.shorten_data_split_list, self.cfg.shorten_method,
                                      self.cfg.tokens_per_sample - 2, self.cfg.seed)
        blocks = TokenBlockDataset(lines, lines.sizes, self.cfg.tokens_per_sample - 2, pad=self.dictionary.pad(),
                                   eos=self.dictionary.eos(), break_mode=self.cfg.sample_break_mode,
                                   document_sep_len=0)
        return AppendTokenDataset(PrependTokenDataset(blocks, self.dictionary.bos()), self.dictionary.eos())

    def load_dataset(self, split, epoch=1, combine=False, **kwargs):
        blocks = self._load_dataset_split(split, epoch, combine)
        too_long = int((blocks.sizes > self.cfg.tokens_per_sample).sum())
        if too_long:
            raise ValueError(f"{split}: {too_long} blocks hold a sentence longer than --tokens-per-sample "
                             f"{self.cfg.tokens_per_sample}; pass --shorten-method truncate")
        dataset = SeededDenoisingDataset(
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
        self.datasets[split] = ElmerBatches(dataset, self.dictionary, self.mask_idx, length=None, seed=self.cfg.seed)
        logger.info(f"{split}: {len(dataset)} documents")

    def get_batch_iterator(self, dataset, *args, **kwargs):
        if kwargs.get("num_workers", 0) == 0:
            # without worker processes, fairseq's prefetch thread would corrupt documents with torch's
            # global generator while the training thread draws dropout and exit layers from it:
            # neither would be reproducible. Worker processes have generators of their own.
            kwargs["data_buffer_size"] = 0
        return super().get_batch_iterator(dataset, *args, **kwargs)

    def exit_layers(self, sample, model, generator=None):
        """[k*B, T] exit layers, uniform in 1..L; permutation j of sequence i is row j*B + i."""
        target = sample["target"]
        size = (self.cfg.lplm_permutations * target.size(0), target.size(1))
        layers = torch.randint(1, model.decoder.num_layers + 1, size, generator=generator)
        return layers.to(target.device)

    def document_exit_layers(self, sample, model, update_num: int):
        """exit_layers for training: a document's layers are a function of (seed, update, document
        id, permutation, position) alone (padding aside). Distributed ranks thus draw different
        layers for their different documents (fairseq seeds torch alike on every rank: the global
        generator would repeat one rank's draws on the others), a resumed run draws the same, and
        a global batch gets the same layers whether one process or several train on it."""
        target = sample["target"]
        bsz, length, k = target.size(0), target.size(1), self.cfg.lplm_permutations
        ids = sample["id"].detach().cpu().numpy().astype(np.uint64)
        key = _mix(_mix(np.full(1, self.cfg.seed % 2**64, np.uint64)) ^ np.uint64(update_num))  # [1]
        key = _mix(key ^ ids)  # [B]
        perm, pos = np.arange(k, dtype=np.uint64), np.arange(length, dtype=np.uint64)
        bits = _mix(_mix(key[None, :, None] ^ perm[:, None, None]) ^ (pos[None, None, :] * _GOLDEN))  # [k, B, T]
        layers = 1 + (bits >> np.uint64(11)) % np.uint64(model.decoder.num_layers)
        return torch.from_numpy(layers.astype(np.int64).reshape(k * bsz, length)).to(target.device)

    @property
    def chunked(self) -> bool:
        return 0 < self.cfg.lplm_chunk < self.cfg.lplm_permutations

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        sample["net_input"]["exit_layers"] = self.document_exit_layers(sample, model, update_num)
        if not self.chunked:
            return super().train_step(sample, model, criterion, optimizer, update_num, ignore_grad)
        if is_torch_ddp(model):
            raise ValueError("--lplm-chunk calls backward once per chunk, which PyTorch's DDP cannot "
                             "synchronize: use --ddp-backend legacy_ddp with several GPUs")
        model.train()
        model.set_num_updates(update_num)
        return self.chunked_lplm(sample, model, criterion, optimizer, ignore_grad)

    def valid_step(self, sample, model, criterion):
        generator = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + int(sample["id"][0]))
        sample["net_input"]["exit_layers"] = self.exit_layers(sample, model, generator)
        if not self.chunked:
            return super().valid_step(sample, model, criterion)
        model.eval()
        with torch.no_grad():
            return self.chunked_lplm(sample, model, criterion)

    def chunked_lplm(self, sample, model, criterion, optimizer=None, ignore_grad=False):
        """LPLM over --lplm-chunk permutations at a time. The encoder, and the decoder layers that
        all k permutations share (ElmerDecoder.lplm_prefix), run once; their outputs enter every
        chunk's decoder as detached leaves; each chunk's loss, weighted by its share of the k
        permutations (the loss is a mean over all k*B*T tokens), is backpropagated into the
        decoder and the leaves; the leaves' summed gradients then go through the shared layers
        and the encoder once."""
        net, bsz, c = sample["net_input"], sample["target"].size(0), self.cfg.lplm_chunk
        exit_layers = net["exit_layers"]
        k = exit_layers.size(0) // bsz
        autocast = torch.amp.autocast("cuda", enabled=isinstance(optimizer, AMPOptimizer))
        with autocast:
            encoder_out = model.encoder(net["src_tokens"], src_lengths=net["src_lengths"])
        states = encoder_out["encoder_out"][0]  # [S, B, C]
        leaf = states.detach().requires_grad_(optimizer is not None)
        encoder_out = {**encoder_out, "encoder_out": [leaf]}
        with autocast:
            prefix = model.decoder.lplm_prefix(net["prev_output_tokens"], encoder_out, exit_layers)
        shared = prefix.state.detach().requires_grad_(optimizer is not None)
        total, logging_output = 0.0, {}
        for first in range(0, k, c):
            perms = min(c, k - first)
            chunk = {**sample, "net_input": {**net, "exit_layers": exit_layers[first * bsz:(first + perms) * bsz]}}
            with autocast:
                loss, sample_size, log = criterion(lplm_decoder(model, encoder_out, prefix._replace(state=shared)), chunk)
            share = perms / k
            loss = loss * share
            if optimizer is not None:
                optimizer.backward(loss * 0 if ignore_grad else loss)
            total = total + loss.detach()
            for key, value in log.items():  # losses are weighted means; counts are the sample's
                logging_output[key] = logging_output.get(key, 0) + value * share if key.endswith("loss") else value
        if shared.grad is not None:  # adds the shared layers' part to leaf.grad
            torch.autograd.backward(prefix.state, shared.grad)
        if leaf.grad is not None:
            torch.autograd.backward(states, leaf.grad)
        return total, sample_size, logging_output

    def build_model(self, cfg, from_checkpoint=False):
        # LPLM picks exit layers itself: no exit threshold, no soft-exit layer
        cfg.exit_mode, cfg.exit_threshold = exit_policy.LPLM, None
        finetuning = {"--output-loss": getattr(cfg, "output_loss", None) not in (None, "ce"),
                      "--glance": getattr(cfg, "glance", None) is not None}
        for option, given in finetuning.items():
            if given:
                raise ValueError(f"{option}: LPLM pretraining trains each token with cross-entropy at its sampled "
                                 f"exit layer; CTC and glancing are fine-tuning options (--task elmer_translation)")
        return require_elmer(super().build_model(cfg, from_checkpoint), cfg)


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(x):
    """splitmix64's finalizer on a uint64 array (wraps modulo 2**64): a well-mixed hash."""
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint64(30))
        x = x * np.uint64(0xBF58476D1CE4E5B9)
        x = x ^ (x >> np.uint64(27))
        x = x * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def lplm_decoder(model, encoder_out, prefix):
    """A stand-in for `model` that the criterion calls on one chunk of permutations: the
    decoder part of ElmerModel.forward's LPLM branch over an encoder output and the
    permutations' shared decoder layers (`prefix`), computed once."""
    def forward(src_tokens, src_lengths, prev_output_tokens, tgt_tokens, exit_layers):
        return model.lplm_terms(encoder_out, prev_output_tokens, tgt_tokens, exit_layers, prefix)

    return forward


def is_torch_ddp(model) -> bool:
    """True when fairseq wrapped the model in PyTorch's DistributedDataParallel (--ddp-backend c10d)."""
    while model is not None:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            return True
        model = getattr(model, "module", None)
    return False
