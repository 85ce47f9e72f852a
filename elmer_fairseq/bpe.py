"""Byte-level BPE whose pieces are written as ids (the files examples/prepare_xsum.py trains)."""
from fairseq.data.encoders import register_bpe
from fairseq.data.encoders.hf_byte_bpe import HuggingFaceByteLevelBPE, HuggingFaceByteLevelBPEConfig


@register_bpe("byte_bpe_ids", dataclass=HuggingFaceByteLevelBPEConfig)
class ByteBPEIds(HuggingFaceByteLevelBPE):
    """fairseq's `hf_byte_bpe`, except that decoding skips symbols that are not BPE ids (<unk>,
    <mask>, ...) instead of failing on them: a model may predict them, the text has no bytes for them."""

    def decode(self, x: str) -> str:
        return self.bpe.decode([int(tok) for tok in x.split() if tok.isdigit()])
