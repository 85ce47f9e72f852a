"""The off-ramp op: ELMER's per-layer exit classifier on the decoding hot path.

`off_ramp_reference` is the specification. The C++ (CPU) and CUDA implementations in csrc/
promise exactly its contract and are tested against it; `off_ramp` picks the fastest one that
works (see `elmer_fairseq/ops/_ext.py`).
"""
from typing import NamedTuple, Optional

import torch
from torch import Tensor

# what `exit` compares with the threshold (exit_policy.SIGNALS): the entropy in nats (the paper's
# rule), or 1 - prob, the top-1 probability's complement (CALM's max-prob confidence)
SIGNALS = ("entropy", "max_prob")


def check_signal(signal: str) -> str:
    if signal not in SIGNALS:
        raise ValueError(f"off_ramp: signal must be one of {', '.join(SIGNALS)}; got {signal!r}")
    return signal


class OffRampOutput(NamedTuple):
    token: Tensor  # [N] int64: argmax of the off-ramp (the lowest index among ties)
    prob: Tensor  # [N] float32: probability of `token`
    entropy: Tensor  # [N] float32: entropy of the softmax, in nats, clamped at >= 0
    exit: Tensor  # [N] bool: entropy < threshold (signal "entropy"), or 1 - prob < threshold ("max_prob")
    state: Optional[Tensor]  # [M, d]: the next layer's input, or None when no `state` was given


def off_ramp_reference(
    hidden: Tensor,
    weight: Tensor,
    threshold: float,
    index: Optional[Tensor] = None,
    state: Optional[Tensor] = None,
    signal: str = "entropy",
) -> OffRampOutput:
    """Off-ramp of the N active positions of one decoder layer (paper eqs. 8 and 10).

    hidden:    [M, d] the layer's output for all M = batch x T positions (fp32, bf16 or fp16).
    weight:    [V, d] the off-ramp's projection (the tied embedding), same dtype as `hidden`.
    threshold: delta; an active position exits when its uncertainty under `signal` is < delta.
               Both are >= 0 (the entropy is clamped at 0), so delta = 0 never exits and
               delta = inf always does.
    index:     [N] int64 rows of `hidden` that are still active (N may be 0); None means all M.
    state:     [M, d] this layer's input, same dtype as `hidden`, or None. When given, the
               returned `state` is a new tensor equal to it except that the active rows take
               their value from `hidden`: positions that exited at a lower layer keep the state
               they exited with (it is copied upward), the others move on to this layer's output.
               The input tensors are never modified.
    signal:    "entropy" (default): exit when the entropy of the softmax is < delta;
               "max_prob": exit when 1 - prob is < delta (prob: the top-1 probability),
               i.e. exit_policy.uncertainty(signal, entropy, prob) < delta, in float32.

    The logits are `hidden[index] @ weight.T` in the input dtype; every reduction over the
    vocabulary (max, softmax, entropy) is done in float32.
    """
    check_signal(signal)
    rows = hidden if index is None else hidden.index_select(0, index)
    logits = (rows @ weight.t()).float()  # [N, V]
    log_p = torch.log_softmax(logits, dim=-1)
    log_prob, token = log_p.max(dim=-1)
    entropy = (-(log_p.exp() * log_p).sum(dim=-1)).clamp_min(0.0)
    upward = None
    if state is not None:
        upward = hidden.clone() if index is None else state.index_copy(0, index, rows)
    prob = log_prob.exp()
    uncertainty = entropy if signal == "entropy" else 1 - prob
    return OffRampOutput(token, prob, entropy, uncertainty < threshold, upward)
