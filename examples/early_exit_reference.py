"""ELMER's hard-exit decoding and LPLM training as they were before issue 15, kept as the reference
that tests/test_early_exit.py checks the current implementation against and that
examples/bench_early_exit.py and examples/bench_lplm.py --before time beside it. A module of its
own, beside the benchmarks, so that they import it as a sibling (a script's folder is sys.path[0])."""
import math

import torch
import torch.nn.functional as F

from elmer_fairseq.models.elmer import Decoded
from elmer_fairseq.ops import off_ramp


def encoder_tensors(encoder_out):
    enc_mask = encoder_out["encoder_padding_mask"][0] if encoder_out["encoder_padding_mask"] else None
    return encoder_out["encoder_out"][0], enc_mask


@torch.no_grad()
def reference_decode(decoder, encoder_out, length, exit_threshold=0.5, forced_exits=None) -> Decoded:
    """ElmerDecoder.decode before issue 15: every layer runs on all B x T positions and the exited
    ones' results are dropped; layers stop once every position has exited. `forced_exits` is
    the new decode's test seam, added here so that both can run one schedule."""
    enc, enc_mask = encoder_tensors(encoder_out)
    bsz = enc.size(1)
    masks = enc.new_full((bsz, length), decoder.mask_idx, dtype=torch.long)
    x = decoder.embed(masks)  # [T, B, C]
    M, L = length * bsz, decoder.num_layers
    forced = None if forced_exits is None else forced_exits.t().reshape(M)
    tokens = masks.new_full((M,), decoder.dictionary.unk())
    scores = x.new_zeros(M, dtype=torch.float)
    exit_layer = masks.new_full((M,), L)
    active = torch.arange(M, device=x.device)
    for l in range(L):
        h = decoder.layers[l](x, enc, enc_mask)[0]
        flat = h.reshape(M, -1)
        if decoder.exit_mode == "soft":
            ramp = off_ramp(flat, decoder.off_ramp_weight(l), 0.0)
            tokens, scores = ramp.token, ramp.prob
            x = decoder.fuse(tokens.view(length, bsz), h) if l < L - 1 else h
            continue
        threshold = math.inf if l == L - 1 else exit_threshold
        ramp = off_ramp(flat, decoder.off_ramp_weight(l), threshold, active, x.reshape(M, -1))
        exits = ramp.exit if forced is None or l == L - 1 else forced[active] == l + 1
        done = active[exits]
        tokens[done], scores[done] = ramp.token[exits], ramp.prob[exits]
        exit_layer[done] = l + 1
        active = active[~exits]
        x = ramp.state.view_as(h)
        if active.numel() == 0:
            break

    def batch_major(t):
        return t.view(length, bsz).t()

    return Decoded(batch_major(tokens), batch_major(scores.log()), batch_major(exit_layer))


def reference_forward_lplm(decoder, prev_output_tokens, encoder_out, exit_layers):
    """ElmerDecoder.forward_lplm before issue 15: every layer on every row of the k-fold batch."""
    enc, enc_mask = encoder_tensors(encoder_out)
    x = decoder.embed(prev_output_tokens)
    exit_layers = exit_layers.t()  # [T, B]
    for l in range(decoder.num_layers):
        h = decoder.layers[l](x, enc, enc_mask)[0]
        x = torch.where((exit_layers > l).unsqueeze(-1), h, x)
    if decoder.off_ramps is None:
        return decoder.output_layer(x).transpose(0, 1)
    logits = x.new_zeros(*x.shape[:2], len(decoder.dictionary))
    for l in range(decoder.num_layers):
        at = exit_layers == l + 1
        logits[at] = F.linear(x[at], decoder.off_ramp_weight(l))
    return logits.transpose(0, 1)


def reference_lplm_terms(model, encoder_out, prev_output_tokens, tgt_tokens, exit_layers):
    """ElmerModel.lplm_terms before issue 15: the batch repeated k times, the decoder on all of it."""
    bsz = tgt_tokens.size(0)
    k = exit_layers.size(0) // bsz
    if k > 1:
        order = torch.arange(bsz, device=tgt_tokens.device).repeat(k)
        encoder_out = model.encoder.reorder_encoder_out(encoder_out, order)
        prev_output_tokens, tgt_tokens = prev_output_tokens.repeat(k, 1), tgt_tokens.repeat(k, 1)
    logits = reference_forward_lplm(model.decoder, prev_output_tokens, encoder_out, exit_layers)
    mask = tgt_tokens.ne(model.decoder.padding_idx)
    return {"lplm": {"out": logits, "tgt": tgt_tokens, "mask": mask, "ls": model.label_smoothing, "nll_loss": True}}
