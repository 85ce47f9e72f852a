"""The exit policy: how a position travels through ELMER's decoder layers, in one place.

- soft: every layer predicts y^l = argmax and the next reads W [Embed(y^l); h^l]; the output is
        the last layer's (paper eqs. 11-12). No threshold.
- hard: a position exits at the first layer whose off-ramp entropy is below delta (nats; the
        paper's 0.5) and keeps that state above; the last layer predicts whatever is left.
- lplm: pretraining; every position exits at a layer the LPLM task samples. Not decodable.

Fine-tuning stores the mode and delta in the checkpoint; generation uses them unless
--exit-threshold is given, and says which delta it used.
"""
import json
import math
from pathlib import Path
from typing import NamedTuple, Optional, Sequence, Tuple, Union

from torch import Tensor

SOFT, HARD, LPLM = "soft", "hard", "lplm"
# what a hard-exit position's uncertainty is measured by: "entropy" (nats, the paper's; fused in the
# off-ramp op) or "max_prob" (1 - the top-1 probability, CALM's cheapest confidence measure)
SIGNALS = ("entropy", "max_prob")
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


class LayerThresholds(NamedTuple):
    """Per-layer hard-exit thresholds (written by `elmer-calibrate`): a position exits at layer
    l < L when its uncertainty under `signal` is below values[l - 1]; layer L predicts the rest."""
    signal: str
    values: Tuple[float, ...]
    source: str = ""

    def save(self, path, **details):
        Path(path).write_text(json.dumps({"signal": self.signal, "thresholds": list(self.values), **details},
                                         indent=1) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path, num_layers: Optional[int] = None) -> "LayerThresholds":
        """Reads a thresholds file; every problem is an error naming the file."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"--exit-thresholds {path}: no such file (elmer-calibrate writes it)") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"--exit-thresholds {path}: not a JSON thresholds file ({e})") from None
        if not isinstance(data, dict) or not isinstance(data.get("thresholds"), list):
            raise ValueError(f"--exit-thresholds {path}: needs a \"thresholds\" list (one per decoder layer "
                             f"below the last)")
        signal, values = data.get("signal", "entropy"), data["thresholds"]
        if signal not in SIGNALS:
            raise ValueError(f"--exit-thresholds {path}: signal {signal!r} is not one of {', '.join(SIGNALS)}")
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in values):
            raise ValueError(f"--exit-thresholds {path}: thresholds must be numbers >= 0, got {values}")
        if num_layers is not None and len(values) != num_layers - 1:
            raise ValueError(f"--exit-thresholds {path}: {len(values)} thresholds for a {num_layers}-layer decoder, "
                             f"which needs {num_layers - 1} (one per layer below the last)")
        return cls(signal, tuple(float(v) for v in values), str(path))


Threshold = Union[float, LayerThresholds]


class Decoding(NamedTuple):
    """The policy a generator decodes with, and where its threshold came from (for the summary)."""
    mode: str
    threshold: Threshold  # 0 for soft exit: no position leaves before the last layer
    source: str

    def describe(self) -> str:
        if self.mode == SOFT:
            return "soft exit"
        if isinstance(self.threshold, LayerThresholds):
            return f"hard exit, {self.threshold.signal} thresholds {self.source}"
        return f"hard exit, delta {self.threshold:g} {self.source}"


def for_decoding(decoder, mode: Optional[str] = None, threshold: Optional[float] = None,
                 thresholds_file=None) -> Decoding:
    """The policy to decode a fine-tuned `decoder` with: its own mode (another one is an error) and its
    own delta unless `threshold` or a calibrated `thresholds_file` is given."""
    own = decoder.exit_mode
    if own not in DECODABLE:
        raise ValueError("this checkpoint was pretrained (--task elmer_lplm); fine-tune it before decoding: "
                         "fairseq-train --task elmer_translation --finetune-from-model CHECKPOINT ...")
    if mode not in (None, own):
        raise ValueError(f"--exit-mode {mode} does not match the checkpoint, which was fine-tuned with "
                         f"--exit-mode {own}")
    if thresholds_file is not None:
        if own != HARD or threshold is not None:
            raise ValueError("--exit-thresholds: calibrated thresholds are for hard-exit checkpoints, "
                             "instead of --exit-threshold")
        loaded = LayerThresholds.load(thresholds_file, decoder.num_layers)
        return Decoding(HARD, loaded, f"from {thresholds_file}")
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


def layer_rule(threshold: Threshold, layer: int, num_layers: int) -> Tuple[str, float]:
    """(signal, threshold) at 0-based `layer`: the last layer takes every position still in flight."""
    if layer == num_layers - 1:
        return "entropy", math.inf
    if isinstance(threshold, LayerThresholds):
        return threshold.signal, threshold.values[layer]
    return "entropy", threshold


def uncertainty(signal: str, entropy: Tensor, max_prob: Tensor) -> Tensor:
    return entropy if signal == "entropy" else 1 - max_prob
