"""One-pass NAR generation for `fairseq-generate --task elmer_translation --iter-decode-max-iter 0`."""
import atexit
import math
from typing import Dict, List, Optional

import torch
from torch import Tensor

from . import ctc
from .models.elmer import ramp_dtype, target_lengths


def cut_at_first_eos(tokens: Tensor, eos: int, pad: int) -> Tensor:
    """[B, T] -> the same with every position after the first EOS set to pad (the output's end).

    fairseq strips pad, not what follows an EOS, so whatever the decoder predicted there must go.
    A row without EOS keeps all T tokens.
    """
    after_eos = tokens.eq(eos).long().cumsum(dim=1) - tokens.eq(eos).long() > 0
    return tokens.masked_fill(after_eos, pad)


def output_positions(model, tokens: Tensor, eos: int, pad: int) -> Tensor:
    """[B, T] True at the decoded positions that are output tokens: up to the first EOS (the
    paper's output), or for a CTC model the positions left after merging repeats and dropping blanks."""
    if model.blank is not None:
        return ctc.output_positions(tokens, model.blank, eos, pad)
    return cut_at_first_eos(tokens, eos, pad).ne(pad)


class ExitStats:
    """Counts how many output tokens, and how many decoder positions (every one decoded, whether
    it is written or not), exit at each layer, for the summary at the end of a run."""

    def __init__(self, num_layers: int):
        self.counts = torch.zeros(num_layers, dtype=torch.long)
        self.position_counts = torch.zeros(num_layers, dtype=torch.long)

    def add(self, exit_layer: Tensor, keep: Tensor):
        self.counts += torch.bincount(exit_layer[keep].cpu() - 1, minlength=len(self.counts))
        self.position_counts += torch.bincount(exit_layer.flatten().cpu() - 1, minlength=len(self.counts))

    @staticmethod
    def line(counts: Tensor, what: str, policy: str) -> str:
        total = int(counts.sum())
        if total == 0:
            return f"ELMER exit layers{policy}: no {what} generated"
        share = counts.double() / total
        mean = float((share * torch.arange(1, len(share) + 1)).sum())
        layers = ", ".join(f"L{l + 1} {100 * s:.1f}%" for l, s in enumerate(share.tolist()))
        return f"ELMER exit layers over {total:,} {what}{policy}: mean {mean:.2f} of {len(share)}; {layers}"

    def summary(self, policy: str = "") -> str:
        policy = f" ({policy})" if policy else ""
        return "\n".join([self.line(self.counts, "tokens", policy),
                          self.line(self.position_counts, "decoder positions", policy)])


class ElmerGenerator:
    """Encoder once, decoder once; the output ends at the first predicted EOS. No gold length."""

    def __init__(self, tgt_dict, max_target_length: int, exit_threshold: float, summary: bool = True,
                 oracle_length: bool = False, policy: str = "", length_cut: Optional[int] = None,
                 shortlist: Optional[int] = None, ramp_precision: str = "fp32", max_exit_layer: Optional[int] = None):
        self.tgt_dict = tgt_dict
        self.policy = policy  # named in the summary: which exit mode and delta decoded
        self.oracle_length = oracle_length
        self.eos = tgt_dict.eos()  # fairseq-generate strips it from the printed hypotheses
        self.length = max_target_length
        self.exit_threshold = exit_threshold
        if length_cut is not None and not length_cut >= 0:
            raise ValueError(f"--length-cut must be >= 0 (positions kept past layer 1's end), got {length_cut}")
        if length_cut is not None and oracle_length:
            raise ValueError("--length-cut and --oracle-length both choose the positions decoded: pass one")
        if shortlist is not None and oracle_length:
            raise ValueError("--ramp-shortlist is an option of ELMER's own decoding, not of the authors' --oracle-length "
                             "protocol: pass one")
        self.length_cut = length_cut
        self.shortlist = shortlist
        self.ramp_dtype = ramp_dtype(ramp_precision)
        self.max_exit_layer = max_exit_layer
        self.stats = None
        self.predicted = []  # a length head's predictions, for the summary
        if summary:
            # fairseq-generate has no end-of-run hook for generators: report when the process
            # ends, on stdout beside fairseq-generate's own closing lines
            atexit.register(self.print_summary)

    def print_summary(self):
        if self.stats is not None:
            print(self.stats.summary(self.policy), flush=True)
        if self.predicted:
            print(self.length_summary(torch.cat(self.predicted)), flush=True)

    def length_summary(self, predicted: Tensor) -> str:
        over = int((predicted > self.length).sum())
        return (f"ELMER length head: mean predicted length {predicted.double().mean():.2f} (EOS included) over "
                f"{len(predicted):,} outputs; {over:,} above --max-target-length {self.length}, decoded at {self.length}")

    @torch.no_grad()
    def generate(self, models, sample: Dict, prefix_tokens=None, constraints=None, **unused) -> List[List[Dict]]:
        if len(models) != 1:
            raise ValueError("ELMER generation takes one model; ensembles are not supported")
        if prefix_tokens is not None:
            raise ValueError("ELMER fills all positions at once; --prefix-size is not supported")
        model = models[0]
        model.eval()
        net_input = sample["net_input"]
        eos, pad = self.tgt_dict.eos(), self.tgt_dict.pad()
        if self.oracle_length:
            out = self.decode_oracle_length(model, net_input, sample.get("target"), eos, pad)
        else:
            out = model.generate(net_input["src_tokens"], net_input["src_lengths"], self.length, self.exit_threshold,
                                 self.length_cut, self.shortlist, ramp_dtype=self.ramp_dtype,
                                 max_exit_layer=self.max_exit_layer)
        tokens = out.tokens
        keep = output_positions(model, tokens, eos, pad)
        if self.stats is None:
            self.stats = ExitStats(model.decoder.num_layers)
        self.stats.add(out.exit_layer, keep)
        if out.predicted_length is not None:
            self.predicted.append(out.predicted_length.cpu())
        hypos = []
        # a CTC output ends where the blanks begin, not at a written EOS: it gets one, as fairseq's
        # hypotheses end (fairseq-generate strips it; its BLEU scorer crashes on an empty hypothesis)
        end = tokens.new_tensor([eos]) if model.blank is not None else tokens.new_zeros(0)
        for i in range(tokens.size(0)):
            scores = out.scores[i][keep[i]]
            hypos.append([{
                "tokens": torch.cat([tokens[i][keep[i]], end]),
                "score": scores.mean() if scores.numel() else scores.new_tensor(-math.inf),
                "positional_scores": scores,
                "exit_layers": out.exit_layer[i][keep[i]],
                "position_exit_layers": out.exit_layer[i],  # every decoder position's, written or not
                # what each position wrote, before the EOS cut (and CTC's merge): how the output is laid out
                "position_tokens": tokens[i],
                "attention": None,
                "alignment": None,
            }])
        return hypos

    def decode_oracle_length(self, model, net_input, target, eos: int, pad: int):
        """The ELMER authors' test protocol: every sample decoded alone with T = its reference's
        length + 1 (up to and including the first EOS), the rest of the row pad. A decoder with a
        length head is told that length instead of its prediction."""
        if target is None:
            raise ValueError("--oracle-length decodes with the reference's length, but this sample has no "
                             "reference (raw input): drop --oracle-length")
        ends = target_lengths(target, eos, pad).clamp(min=1)
        told = model.decoder.embed_length is not None
        rows = [model.generate(net_input["src_tokens"][i:i + 1], net_input["src_lengths"][i:i + 1], int(n),
                               self.exit_threshold, lengths=ends[i:i + 1] if told else None, ramp_dtype=self.ramp_dtype,
                               max_exit_layer=self.max_exit_layer)
                for i, n in enumerate(ends.tolist())]
        width = max(r.tokens.size(1) for r in rows)

        def stack(name, fill):
            return torch.cat([torch.nn.functional.pad(getattr(r, name), (0, width - r.tokens.size(1)), value=fill)
                              for r in rows])

        # the padding is pad (dropped as the output's end) with the last layer as its exit layer
        return type(rows[0])(stack("tokens", pad), stack("scores", 0.0), stack("exit_layer", model.decoder.num_layers))
