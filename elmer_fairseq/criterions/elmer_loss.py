"""ELMER's training loss: the cross-entropy (or CTC loss) of its off-ramps.

The model returns one nat_loss term per off-ramp (soft and hard exit: every layer, weighted 1/L;
LPLM: each token at its sampled exit layer), so fairseq's generic NAT criterion sums them; this
criterion only adds what ELMER batches need. A CTC term comes with its loss computed (nat_loss's
"loss" key) and the number of targets that no alignment fits, which is logged as a sum.

Without gradients (validation) the cross-entropy is computed a block of rows at a time: fairseq's
version holds the logits, their masked copy and its log-softmax at once, three tensors of the
logits' size (LPLM's are [k*B, T, V]: 3 x 4 k B T V bytes), although nothing is kept for a
backward pass. The blocks hold the logits and at most LOSS_BLOCK_BYTES more; the values are
fairseq's (label smoothing included) up to the order of the float sums.
"""
import torch
import torch.nn.functional as F
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

    def _compute_loss(self, outputs, targets, masks=None, label_smoothing=0.0, name="loss", factor=1.0):
        soft_labels = targets.dim() == outputs.dim()  # (nat_loss's kl_div branch; ELMER's targets are tokens)
        if (torch.is_grad_enabled() and outputs.requires_grad) or soft_labels:
            return super()._compute_loss(outputs, targets, masks, label_smoothing, name, factor)
        return blockwise_loss(outputs, targets, masks, label_smoothing, name, factor)

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


# the most bytes a block of the no-grad cross-entropy allocates per tensor (its rows' logits and
# their log-softmax: twice this in all)
LOSS_BLOCK_BYTES = 32 * 2**20


def blockwise_loss(outputs, targets, masks=None, label_smoothing=0.0, name="loss", factor=1.0, block_bytes=None):
    """fairseq nat_loss's _compute_loss (hard targets) without its full-size copies: the rows
    `masks` selects from `outputs` [..., V] go through log-softmax a block of at most
    `block_bytes` (default LOSS_BLOCK_BYTES) at a time; for a loss without gradient."""
    vocab = outputs.size(-1)
    if masks is None:
        masks = torch.ones(outputs.shape[:-1], dtype=torch.bool, device=outputs.device)
    where = masks.nonzero(as_tuple=True)  # indexes the (possibly transposed) logits without a copy
    count = where[0].numel()
    if count == 0:
        nll_loss = loss = torch.tensor(0)
    else:
        targets = targets[masks].to(outputs.device)
        rows = max(1, (block_bytes or LOSS_BLOCK_BYTES) // (vocab * outputs.element_size()))
        total = torch.float if outputs.device.type == "mps" else torch.float64  # sums over blocks
        nll_sum, logp_sum = outputs.new_zeros((), dtype=total), outputs.new_zeros((), dtype=total)
        for start in range(0, count, rows):
            block = slice(start, start + rows)
            log_p = F.log_softmax(outputs[tuple(i[block] for i in where)], dim=-1)
            nll_sum += F.nll_loss(log_p.float(), targets[block], reduction="sum")
            if label_smoothing > 0:
                logp_sum += log_p.float().sum()
            del log_p  # before the next block's
        # nat_loss's mean_ds: a mean in float, cast back to the logits' type
        nll_loss = (nll_sum / count).type_as(outputs)
        if label_smoothing > 0:
            loss = nll_loss * (1 - label_smoothing) - (logp_sum / (count * vocab)).type_as(outputs) * label_smoothing
        else:
            loss = nll_loss
    return {"name": name, "loss": loss * factor, "nll_loss": nll_loss, "factor": factor}
