"""The exit policy: how a position travels through ELMER's decoder layers, in one place.

- soft: every layer predicts y^l = argmax and the next reads W [Embed(y^l); h^l]; the output is
        the last layer's (paper eqs. 11-12). No threshold.
- hard: a position exits at the first layer whose off-ramp entropy is below delta (nats; the
        paper's 0.5) and keeps that state above; the last layer predicts whatever is left.
- lplm: pretraining; every position exits at a layer the LPLM task samples. Not decodable.

Fine-tuning stores the mode and delta in the checkpoint; generation uses them unless
--exit-threshold is given, and says which delta it used.
"""
from typing import NamedTuple, Optional

from torch import Tensor

SOFT, HARD, LPLM = "soft", "hard", "lplm"
DECODABLE = (SOFT, HARD)  # the modes --exit-mode takes; LPLM is set by --task elmer_lplm
DEFAULT_EXIT_THRESHOLD = 0.5  # the paper's delta


def resolve(mode: Optional[str], threshold: Optional[float]):
    """--exit-mode / --exit-threshold of a run that builds a new model, checked together: (mode, threshold)."""
    mode = mode or SOFT
    if mode not in DECODABLE:
        raise ValueError(f"--exit-mode must be one of {', '.join(DECODABLE)}, got {mode!r}")
    if threshold is not None and mode != HARD:
        raise ValueError(f"--exit-threshold applies to hard exit only, but --exit-mode is {mode}")
    if threshold is None:
        threshold = DEFAULT_EXIT_THRESHOLD
    if not threshold >= 0:  # also rejects NaN
        raise ValueError(f"--exit-threshold must be >= 0 (an entropy in nats), got {threshold}")
    return mode, threshold


class Decoding(NamedTuple):
    """The policy a generator decodes with, and where its threshold came from (for the summary)."""
    mode: str
    threshold: float  # 0 for soft exit: no position leaves before the last layer
    source: str

    def describe(self) -> str:
        if self.mode == SOFT:
            return "soft exit"
        return f"hard exit, delta {self.threshold:g} {self.source}"


def for_decoding(decoder, mode: Optional[str] = None, threshold: Optional[float] = None) -> Decoding:
    """The policy to decode a fine-tuned `decoder` with: its own mode (another one is an error) and its
    own delta unless `threshold` is given."""
    own = decoder.exit_mode
    if own not in DECODABLE:
        raise ValueError("this checkpoint was pretrained (--task elmer_lplm); fine-tune it before decoding: "
                         "fairseq-train --task elmer_translation --finetune-from-model CHECKPOINT ...")
    if mode not in (None, own):
        raise ValueError(f"--exit-mode {mode} does not match the checkpoint, which was fine-tuned with "
                         f"--exit-mode {own}")
    if own == SOFT:
        resolve(own, threshold)  # refuses a threshold
        return Decoding(SOFT, 0.0, "")
    if threshold is not None:
        return Decoding(HARD, resolve(own, threshold)[1], "(--exit-threshold)")
    stored = decoder.exit_threshold
    if stored is None:  # checkpoints from before the threshold was stored
        return Decoding(HARD, DEFAULT_EXIT_THRESHOLD, "(the paper's default)")
    return Decoding(HARD, stored, "(from the checkpoint)")


def exits(entropy: Tensor, threshold: float) -> Tensor:
    """Hard exit's rule: which positions leave at this layer. The fused off-ramp op applies the same
    rule inside its kernel (tests/test_off_ramp_kernel.py holds the two together)."""
    return entropy < threshold
