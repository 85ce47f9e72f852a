"""Byte-level BPE whose pieces are written as ids (the files examples/TASK/prepare.py trains)."""
import os

from fairseq.data.encoders import register_bpe
from fairseq.data.encoders.hf_byte_bpe import HuggingFaceByteLevelBPE, HuggingFaceByteLevelBPEConfig


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
