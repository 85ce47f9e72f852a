"""ELMER's training loss: the cross-entropy (or CTC loss) of its off-ramps.

The model returns one nat_loss term per off-ramp (soft and hard exit: every layer, weighted 1/L;
LPLM: each token at its sampled exit layer), so fairseq's generic NAT criterion sums them; this
criterion only adds what ELMER batches need. A CTC term comes with its loss computed (nat_loss's
"loss" key) and the number of targets that no alignment fits, which is logged as a sum.
"""
import functools

from fairseq import metrics, utils
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
        terms = {}

        def run(*args):
            terms.update(model(*args, exit_layers=exit_layers))
            return terms

        loss, sample_size, logging_output = super().forward(run, sample, reduce)
        unfit = [t["ctc_unalignable"] for t in terms.values() if "ctc_unalignable" in t]
        if unfit:
            logging_output["ctc_unalignable"] = sum(unfit)
        return loss, sample_size, logging_output

    def _custom_loss(self, loss, name="loss", factor=1.0):
        # a CTC term's loss is its negative log-likelihood: report it as nll_loss too
        return {"name": name, "loss": loss, "factor": factor, "nll_loss": loss / factor}

    @staticmethod
    def reduce_metrics(logging_outputs) -> None:
        LabelSmoothedDualImitationCriterion.reduce_metrics(logging_outputs)
        if any("ctc_unalignable" in log for log in logging_outputs):
            # a count over the epoch (fairseq's epoch summary), not an average per batch
            metrics.log_scalar_sum("ctc_unalignable",
                                   utils.item(sum(log.get("ctc_unalignable", 0) for log in logging_outputs)))
