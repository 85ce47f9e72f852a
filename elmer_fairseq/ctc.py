"""CTC over ELMER's decoder positions (Graves et al. 2006; for one-pass generation: Libovicky &
Helcl 2018, Gu & Kong 2021): the decoder writes T >= |y| positions, each a token or the blank,
and the output is what is left after merging repeats and dropping blanks. The loss sums over
every alignment of y to the T positions, so no position has to know where the output ends.

ELMER's blank is a symbol it already has, so no dictionary changes and every checkpoint
(converted, pretrained) keeps its vocabulary: [MASK] by default (the decoder reads it at every
position and may write it back where nothing goes), or EOS (--ctc-blank eos), which an ELMER
trained with cross-entropy already writes after its output. Targets are y without EOS: length
comes from the blanks.
"""
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


def labels(tgt_tokens: Tensor, pad: int, eos: int) -> Tuple[Tensor, Tensor]:
    """The CTC labels of ELMER's collated targets [B, T] (y + EOS, then pad or EOS): [B, U] with
    pad after each row's y, and the lengths [B]. Every y is a prefix of its row."""
    is_label = tgt_tokens.ne(pad) & tgt_tokens.ne(eos)
    lengths = is_label.long().cumprod(1).sum(1)  # the prefix before the first pad or EOS
    width = max(int(lengths.max()), 1) if len(lengths) else 1
    keep = torch.arange(width, device=tgt_tokens.device) < lengths[:, None]
    return tgt_tokens[:, :width].masked_fill(~keep, pad), lengths


def min_positions(labels: Tensor, lengths: Tensor) -> Tensor:
    """[B] the fewest decoder positions that can write each row: its length plus one blank between
    every two equal neighbours (CTC merges them otherwise)."""
    within = torch.arange(labels.size(1), device=labels.device)[None, 1:] < lengths[:, None]
    repeats = (labels[:, 1:] == labels[:, :-1]) & within
    return lengths + repeats.sum(1)


def unalignable(labels: Tensor, lengths: Tensor, positions: int) -> Tensor:
    """[B] True where the target has no alignment to `positions` decoder positions (its loss is
    infinite; zero_infinity leaves it out of training)."""
    return min_positions(labels, lengths) > positions


def loss(logits: Tensor, labels: Tensor, lengths: Tensor, blank: int) -> Tensor:
    """The CTC loss of one off-ramp, averaged over the batch per target token (as ELMER's
    cross-entropy is): logits [B, T, V], labels [B, U], lengths [B]. In float32 (torch's CTC is
    unstable in half precision); an unalignable target contributes 0 (zero_infinity)."""
    log_probs = F.log_softmax(logits.float(), dim=-1).transpose(0, 1)  # [T, B, V]
    positions = torch.full_like(lengths, log_probs.size(0))
    per_sequence = F.ctc_loss(log_probs, labels, positions, lengths, blank=blank, reduction="none",
                              zero_infinity=True)
    return (per_sequence / lengths.clamp(min=1)).mean()


def best_alignment(log_probs: Tensor, labels: Tensor, lengths: Tensor, blank: int) -> Tensor:
    """The Viterbi path: for each row, the alignment of its labels to the T positions that the
    distribution log_probs [B, T, V] likes best, as [B, T] tokens (blank where the path is in a
    blank). Rows without an alignment (`unalignable`) get all blanks."""
    B, T, _ = log_probs.shape
    U = labels.size(1)
    S = 2 * U + 1  # the extended labels: blank, y1, blank, y2, ..., blank
    ext = labels.new_full((B, S), blank)
    ext[:, 1::2] = labels
    emit = log_probs.gather(2, ext[:, None, :].expand(B, T, S))  # [B, T, S]
    neg = torch.finfo(emit.dtype).min / 4
    states = torch.arange(S, device=labels.device)
    end = 2 * lengths  # the last blank; the last label is end - 1
    valid = states[None, :] <= end[:, None]
    # a label may be reached from two states back when it differs from that one (no blank between equal labels)
    skip = torch.zeros(B, S, dtype=torch.bool, device=labels.device)
    skip[:, 3::2] = ext[:, 3::2] != ext[:, 1:-2:2]
    score = torch.full((B, S), neg, dtype=emit.dtype, device=emit.device)
    score[:, :2] = emit[:, 0, :2]
    score = score.masked_fill(~valid, neg)
    back = torch.zeros(T, B, S, dtype=torch.uint8, device=labels.device)  # 0: stay, 1: one back, 2: two back
    for t in range(1, T):
        one = F.pad(score[:, :-1], (1, 0), value=neg)
        two = F.pad(score[:, :-2], (2, 0), value=neg).masked_fill(~skip, neg)
        best, step = torch.stack([score, one, two]).max(0)
        score = (best + emit[:, t]).masked_fill(~valid, neg)
        back[t] = step.to(torch.uint8)
    rows = torch.arange(B, device=labels.device)
    last_label = (end - 1).clamp(min=0)
    state = torch.where(score[rows, end] >= score[rows, last_label], end, last_label)
    path = labels.new_empty(B, T)
    for t in range(T - 1, -1, -1):
        path[:, t] = ext[rows, state]
        state = state - back[t, rows, state].long()
    return path.masked_fill(unalignable(labels, lengths, T)[:, None], blank)


def output_positions(tokens: Tensor, blank: int, eos: int, pad: int) -> Tensor:
    """[B, T] True at the positions whose token is written: merge repeats, drop blanks, and end
    before the first EOS (a model may write one; CTC targets have none) unless EOS is the blank."""
    previous = F.pad(tokens[:, :-1], (1, 0), value=-1)
    before_eos = (tokens.eq(eos).long().cumsum(1) == 0) | (blank == eos)
    return tokens.ne(blank) & tokens.ne(previous) & tokens.ne(pad) & before_eos
