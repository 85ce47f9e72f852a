"""Glancing training (GLAT, Qian et al. 2021) for ELMER's one-pass decoder.

A first pass without gradient decodes the [MASK]s as the model would at inference; the further
its output is from the reference (Hamming distance d), the more reference tokens the training
pass sees: ratio * d positions, chosen at random, read the reference token instead of [MASK].
The model learns to write the rest from partial context, and less context as it improves. With
CTC the reference is first laid on its best alignment to the first pass (ctc.best_alignment).
Evaluation and generation never glance: only a model in training mode does.
"""
from typing import NamedTuple

import torch
from torch import Tensor


class Schedule(NamedTuple):
    """The glance ratio, annealed linearly from `start` to `end` over `updates` updates."""
    start: float
    end: float
    updates: int

    def ratio(self, num_updates: int) -> float:
        if self.updates <= 0:
            return self.start
        done = min(max(num_updates, 0) / self.updates, 1.0)
        return self.start + (self.end - self.start) * done


def parse(spec: str, max_update: int) -> Schedule:
    """--glance RATIO or START:END (annealed over --max-update updates)."""
    parts = str(spec).split(":")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or len(parts) != len(values):
        raise ValueError(f"--glance {spec}: give a ratio (0.3) or START:END (0.5:0.3, annealed over --max-update)")
    if not all(0.0 <= v <= 1.0 for v in values):  # also rejects NaN
        raise ValueError(f"--glance {spec}: ratios must be in [0, 1]")
    if len(values) == 2 and values[0] != values[1] and not max_update:
        raise ValueError(f"--glance {spec} anneals over --max-update, which is not set: set --max-update or "
                         f"give one ratio")
    return Schedule(values[0], values[-1], max_update or 0)


def reveal(predicted: Tensor, reference: Tensor, valid: Tensor, ratio: float) -> Tensor:
    """[B, T] True at the positions whose reference token the training pass reads: ratio * d of
    each row's `valid` positions, at random, where d counts the valid positions the first pass
    (`predicted`) got wrong."""
    wrong = (predicted.ne(reference) & valid).sum(1)
    count = (ratio * wrong.float()).long()  # GLAT rounds down
    # a random rank for every valid position (invalid ones last): the `count` lowest are revealed
    keys = torch.rand(valid.shape, device=valid.device).masked_fill(~valid, 2.0)
    ranks = keys.argsort(1).argsort(1)
    return ranks < count[:, None]
