"""Subword vocabularies as fairseq symbols.

- `byte_bpe_ids`: the byte-level BPE that examples/TASK/prepare.py trains, pieces written as ids;
- `wordpiece`: a pretrained checkpoint's own tokenizer.json (BERT's WordPiece, or RoBERTa's
  byte-level BPE), pieces written as strings, its special tokens as fairseq's (`TokenizerVocab`):
  the vocabulary of a checkpoint that `elmer-convert` turned into a fairseq one.
"""
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import List

from fairseq.data import Dictionary
from fairseq.data.encoders import register_bpe
from fairseq.data.encoders.hf_byte_bpe import HuggingFaceByteLevelBPE, HuggingFaceByteLevelBPEConfig
from fairseq.dataclass import FairseqDataclass

FAIRSEQ_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
# how BERT's and RoBERTa's vocabularies name fairseq's specials, in FAIRSEQ_SPECIALS' order
SPECIAL_NAMES = (("[CLS]", "[PAD]", "[SEP]", "[UNK]", "[MASK]"), FAIRSEQ_SPECIALS)
UNUSED = re.compile(r"\[unused\d+\]")  # BERT's placeholder rows: never produced by its tokenizer


@register_bpe("byte_bpe_ids", dataclass=HuggingFaceByteLevelBPEConfig)
class ByteBPEIds(HuggingFaceByteLevelBPE):
    """fairseq's `hf_byte_bpe`, except that decoding skips symbols that are not BPE ids (<unk>,
    <mask>, ...) instead of failing on them: a model may predict them, the text has no bytes for them."""

    def __init__(self, cfg):
        for option, path in (("--bpe-vocab", cfg.bpe_vocab), ("--bpe-merges", cfg.bpe_merges)):
            if not os.path.isfile(path):  # the tokenizers library's error names no file
                raise FileNotFoundError(f"{option} {path}: no such file (vocab.json and merges.txt are "
                                        f"written beside the BPE-encoded data, e.g. by examples/xsum/prepare.py)")
        super().__init__(cfg)

    def decode(self, x: str) -> str:
        return self.bpe.decode([int(tok) for tok in x.split() if tok.isdigit()])


class TokenizerVocab:
    """A Hugging Face tokenizer.json whose tokens are fairseq dictionary symbols: the tokens
    themselves, but for its special tokens, written as fairseq's <s> <pad> </s> <unk> <mask>
    (BERT's [CLS] [PAD] [SEP] [UNK] [MASK]), which are fairseq's first four ids and ELMER's <mask>."""

    def __init__(self, path):
        from tokenizers import Tokenizer

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"tokenizer {self.path} not found (the tokenizer.json beside the checkpoint)")
        try:
            self.tokenizer = Tokenizer.from_file(str(self.path))
        except Exception as e:  # the library's error names no file
            raise ValueError(f"{self.path}: not a Hugging Face tokenizer.json ({e})") from None
        # a sentence-embedding tokenizer.json cuts and pads every text to 128 pieces
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        vocab = self.tokenizer.get_vocab(with_added_tokens=True)
        names = next((n for n in SPECIAL_NAMES if all(t in vocab for t in n)), None)
        if names is None:
            missing = [" ".join(t for t in n if t not in vocab) for n in SPECIAL_NAMES]
            raise ValueError(f"{self.path}: lacks {missing[0]} of BERT's special tokens and {missing[1]} of "
                             f"RoBERTa's; fairseq's <s> <pad> </s> <unk> <mask> need one set in full")
        self.special_tokens = names
        self.to_symbol = dict(zip(names, FAIRSEQ_SPECIALS))
        self.ids = {self.to_symbol.get(t, t): i for t, i in vocab.items() if t in names or t not in FAIRSEQ_SPECIALS}
        spaced = [t for t in self.ids if not t or t.split() != [t]]
        if spaced:
            raise ValueError(f"{self.path}: token {spaced[0]!r} holds white space; fairseq's data cannot hold it")

    @property
    def separator(self) -> str:
        """The tokenizer's text for its segment separator (BERT's [SEP] = fairseq's </s>)."""
        return self.special_tokens[FAIRSEQ_SPECIALS.index("</s>")]

    def tokenize(self, texts: List[str]) -> List[List[str]]:
        """Texts as symbol lists, no specials added (fairseq appends </s>); a separator in the text stays one symbol."""
        return [[self.to_symbol.get(t, t) for t in e.tokens]
                for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def detokenize(self, symbols: List[str]) -> str:
        """Text of symbols; special and unknown symbols leave no text."""
        return self.tokenizer.decode([self.ids[s] for s in symbols if s in self.ids], skip_special_tokens=True)

    def dictionary(self, counts=None) -> Dictionary:
        """fairseq's dictionary of the vocabulary in id order, fairseq's specials first (not listed in
        its dict.txt); with `counts` ({symbol: n}), only the symbols counted, with their counts."""
        dictionary = Dictionary()
        for symbol, _ in sorted(self.ids.items(), key=lambda item: item[1]):
            if symbol in FAIRSEQ_SPECIALS or UNUSED.fullmatch(symbol) or (counts is not None and symbol not in counts):
                continue
            dictionary.add_symbol(symbol, n=1 if counts is None else counts[symbol])
        return dictionary

    def load_dictionary(self, path) -> Dictionary:
        """The fairseq dict.txt `path`, every symbol checked against this vocabulary."""
        try:
            dictionary = Dictionary.load(str(path))
        except (OSError, ValueError, RuntimeError) as e:
            raise ValueError(f"{path}: not a fairseq dict.txt ({e})") from None
        for line, symbol in enumerate(dictionary.symbols[dictionary.nspecial:], 1):
            if symbol not in self.ids:
                hint = (f" (write {self.to_symbol[symbol]} for it)" if symbol in self.to_symbol else
                        "; was the dictionary made with another tokenizer?")
                raise ValueError(f"{path}:{line}: {symbol!r} is not a symbol of {self.path}{hint}")
        return dictionary


@dataclass
class WordPieceConfig(FairseqDataclass):
    wordpiece_tokenizer: str = field(
        default="???", metadata={"help": "the checkpoint's tokenizer.json (Hugging Face tokenizers): "
                                         "the data holds its pieces as strings (examples/TASK/prepare.py --tokenizer)"})


@register_bpe("wordpiece", dataclass=WordPieceConfig)
class WordPiece:
    """Text <-> the pieces of a pretrained checkpoint's tokenizer.json, as `TokenizerVocab` writes them."""

    def __init__(self, cfg):
        if not os.path.isfile(cfg.wordpiece_tokenizer):
            raise FileNotFoundError(f"--wordpiece-tokenizer {cfg.wordpiece_tokenizer}: no such file")
        self.vocab = TokenizerVocab(cfg.wordpiece_tokenizer)

    def encode(self, x: str) -> str:
        return " ".join(self.vocab.tokenize([x])[0])

    def decode(self, x: str) -> str:
        return self.vocab.detokenize(x.split())

    def is_beginning_of_word(self, x: str) -> bool:
        return not x.startswith("##")
