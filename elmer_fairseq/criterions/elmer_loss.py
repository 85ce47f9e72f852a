"""ELMER's training loss: the cross-entropy of its off-ramps.

The model returns one nat_loss term per off-ramp (soft and hard exit: every layer, weighted 1/L;
LPLM: each token at its sampled exit layer), so fairseq's generic NAT criterion sums them; this
criterion only adds what ELMER batches need.
"""
import functools

from fairseq.criterions import register_criterion
from fairseq.criterions.nat_loss import (
    LabelSmoothedDualImitationCriterion,
    LabelSmoothedDualImitationCriterionConfig,
)


@register_criterion("elmer_loss", dataclass=LabelSmoothedDualImitationCriterionConfig)
class ElmerLoss(LabelSmoothedDualImitationCriterion):
    def forward(self, model, sample, reduce=True):
        # nat_loss reads the decoder input from "prev_target" (ELMER's is the [MASK] row its
        # tasks collate) and calls the model with four arguments: the LPLM task's sampled
        # exit layers ride along bound to the model
        sample["prev_target"] = sample["net_input"]["prev_output_tokens"]
        exit_layers = sample["net_input"].get("exit_layers")
        return super().forward(functools.partial(model, exit_layers=exit_layers), sample, reduce)
