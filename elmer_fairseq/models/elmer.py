"""ELMER (Li et al., EMNLP 2022): a non-autoregressive Transformer whose decoder has an off-ramp at
every layer, so that confident tokens exit early and the tokens still in flight condition on them.

The encoder is fairseq's. The decoder reads T [MASK] tokens, attends bidirectionally, and predicts
every position in one pass; how a position travels through the layers is the exit policy:

- soft: every layer predicts y^l = argmax off-ramp(h^l) and the next layer reads W [Embed(y^l); h^l];
        the prediction is the last layer's (paper eqs. 11-12);
- hard: a position exits at the first layer whose off-ramp entropy is < delta; its state is then
        copied to every upper layer; once every position has exited, no further layer runs;
- lplm: (pretraining) every position exits at a layer given by the caller, sampled by LPLM.
"""
import logging
import math
from typing import List, NamedTuple, Optional

import torch
import torch.nn.functional as F
from fairseq.models import register_model, register_model_architecture
from fairseq.models.transformer import TransformerDecoder, TransformerModel, base_architecture
from torch import Tensor, nn

from .. import ctc, exit_policy, glancing
from ..ops import OffRampOutput, off_ramp

logger = logging.getLogger(__name__)
MASK_SYMBOL = "<mask>"
GOLD_MIX_PROB = 0.3  # the ELMER authors' fine-tuning code (fine-tune/modeling_bart.py); not in the paper
OUTPUT_LOSSES = ("ce", "ctc")
CTC_BLANKS = ("mask", "eos")
LENGTH_LOSS_FACTOR = 0.1
# --ramp-precision: the dtype the off-ramps' product runs in when decoding (None: the model's own)
RAMP_PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


def ramp_dtype(precision: str) -> Optional[torch.dtype]:
    if precision not in RAMP_PRECISIONS:
        raise ValueError(f"--ramp-precision {precision}: one of {', '.join(RAMP_PRECISIONS)}")
    return RAMP_PRECISIONS[precision]


class Decoded(NamedTuple):
    tokens: Tensor  # [B, T] argmax at each position's exit layer
    scores: Tensor  # [B, T] log-probability of that token
    exit_layer: Tensor  # [B, T] 1-based layer where the position exited (L when it never did)
    predicted_length: Optional[Tensor] = None  # [B] a length head's most likely length, before the cap at T


@register_model("elmer")
class ElmerModel(TransformerModel):
    """fairseq's Transformer with ELMER's decoder. `forward` returns nat_loss-style loss terms."""

    @staticmethod
    def add_args(parser):
        TransformerModel.add_args(parser)
        parser.add_argument(
            "--per-layer-off-ramps", action="store_true",
            help="give every decoder layer its own off-ramp classifier instead of sharing the "
                 "output embedding across layers (the paper shares them in pretraining)",
        )
        parser.add_argument(
            "--gold-mix-prob", type=float, metavar="P",
            help=f"soft exit, training only: at every fused layer and target position, feed the gold "
                 f"token's embedding instead of Embed(argmax) with probability P, so upper layers learn "
                 f"next to correct neighbours (the authors' fine-tuning code does this with "
                 f"{GOLD_MIX_PROB}; the paper does not say). Default {GOLD_MIX_PROB} with soft exit; "
                 f"0 turns it off; refused with hard exit, which fuses nothing",
        )
        parser.add_argument(
            "--output-loss", choices=OUTPUT_LOSSES,
            help="ce (default, the paper's): the output is the T positions up to the first EOS, position t "
                 "trained on the target's t-th token; ctc: the output is the T positions with repeats "
                 "merged and blanks ([MASK], written back) dropped, trained with CTC over every alignment, "
                 "so that the output's length comes from the blanks (set T, --max-target-length, to about "
                 "2-3x the target length). Every layer's off-ramp is trained either way. Recorded in the "
                 "checkpoint",
        )
        parser.add_argument(
            "--ctc-blank", choices=CTC_BLANKS,
            help="with --output-loss ctc, the symbol that means 'nothing here': mask (default), the [MASK] the "
                 "decoder reads at every position, written back; eos, the EOS that an ELMER trained with ce "
                 "already writes at the positions after its output, so that a ce checkpoint fine-tuned with "
                 "ctc starts from alignments that use the blank (docs/one-pass.md). With eos an EOS is no "
                 "longer an end: the output is every position, repeats merged, EOS dropped. Recorded in the "
                 "checkpoint",
        )
        parser.add_argument(
            "--glance", metavar="RATIO|START:END",
            help="glancing training (GLAT): a first pass without gradient decodes the [MASK]s; RATIO times "
                 "its number of wrong positions, chosen at random, then read the reference token (with "
                 "--output-loss ctc: the reference on its best alignment to that pass) instead of [MASK]. "
                 "START:END anneals the ratio linearly over --max-update. Training only: validation and "
                 "generation never see reference tokens. Default: off",
        )
        parser.add_argument(
            "--glance-loss", choices=("unrevealed", "all"),
            help="with --glance: train the positions the training pass did not read the reference at "
                 "(unrevealed, GLAT's choice and the default with ce) or all of them (all; the only one "
                 "with ctc, whose loss is over the whole sequence)",
        )
        parser.add_argument(
            "--length-head", action="store_true",
            help="predict the output's length (EOS included) from the mean of the encoder states, as CMLM does, and "
                 "add that length's embedding to every [MASK] the decoder reads (the reference's length in "
                 "training, the predicted one in decoding), so that where the output ends follows the input. "
                 "Decoding still runs --max-target-length positions and ends at the first EOS (with --length-cut "
                 "the upper layers stop there). The embedding starts at zero: a warm start decodes as without it. "
                 "Default: off (the paper's)",
        )
        parser.add_argument(
            "--length-loss-factor", type=float, metavar="F",
            help=f"with --length-head: the weight of the length prediction's cross-entropy next to the off-ramps' "
                 f"(default {LENGTH_LOSS_FACTOR}, fairseq's CMLM recipe)",
        )
        parser.add_argument(
            "--layernorm-eps", type=float, metavar="EPS",
            help="epsilon of every LayerNorm (default: fairseq's 1e-5); elmer-convert sets the "
                 "checkpoint's own (BERT's 1e-12), which changes the outputs by ~1e-2 otherwise",
        )

    @classmethod
    def build_model(cls, args, task):
        refuse_unsupported(args)
        if MASK_SYMBOL not in task.target_dictionary:
            raise ValueError(f"the target dictionary has no {MASK_SYMBOL} symbol; use an ELMER task")
        args.output_loss = getattr(args, "output_loss", None) or "ce"
        args.gold_mix_prob = resolve_gold_mix(getattr(args, "exit_mode", None), getattr(args, "gold_mix_prob", None),
                                              args.output_loss)
        args.ctc_blank = resolve_ctc_blank(args.output_loss, getattr(args, "ctc_blank", None))
        args.glance_loss = resolve_glance_loss(args.output_loss, getattr(args, "glance", None),
                                               getattr(args, "glance_loss", None))
        args.length_loss_factor = resolve_length_head(getattr(args, "length_head", False), args.output_loss,
                                                      getattr(args, "length_loss_factor", None))
        eps = getattr(args, "layernorm_eps", None)
        if eps is not None and not eps > 0:  # also rejects NaN
            raise ValueError(f"--layernorm-eps must be > 0, got {eps}")
        model = super().build_model(args, task)
        if eps is not None:  # fairseq's LayerNorm() takes no eps from the args: set it on every one built
            for module in model.modules():
                if isinstance(module, nn.LayerNorm):
                    module.eps = eps
        return model

    def __init__(self, args, encoder, decoder):
        super().__init__(args, encoder, decoder)
        self.output_loss = getattr(args, "output_loss", None) or "ce"  # checkpoints before CTC: ce
        self.ctc_blank = getattr(args, "ctc_blank", None) or "mask"  # CTC checkpoints before --ctc-blank: mask
        glance = getattr(args, "glance", None)
        self.glance_schedule = glancing.parse(glance, getattr(args, "max_update", 0)) if glance else None
        self.num_updates = 0

    @classmethod
    def build_decoder(cls, args, tgt_dict, embed_tokens):
        return ElmerDecoder(args, tgt_dict, embed_tokens)

    def set_num_updates(self, num_updates):
        super().set_num_updates(num_updates)
        self.num_updates = num_updates  # the glance schedule's clock

    @property
    def blank(self) -> Optional[int]:
        """The CTC blank's index ([MASK] or EOS, --ctc-blank), None when the output is not CTC's."""
        if self.output_loss != "ctc":
            return None
        return self.decoder.dictionary.eos() if self.ctc_blank == "eos" else self.decoder.mask_idx

    def forward(self, src_tokens, src_lengths, prev_output_tokens, tgt_tokens, exit_layers=None):
        """Loss terms for `elmer_loss` (fairseq's nat_loss format).

        prev_output_tokens: [B, T] [MASK]s; tgt_tokens: [B, T] y + EOS, pad after it.
        exit_layers: [K*B, T] LPLM exit layers in 1..L for K permutations of each sequence
        (sequence i's k-th permutation is row k*B + i); None fine-tunes with the model's
        `exit_mode`. The encoder runs once either way.
        """
        encoder_out = self.encoder(src_tokens, src_lengths=src_lengths)
        if exit_layers is not None:
            if self.output_loss != "ce" or self.glance_schedule is not None or self.decoder.embed_length is not None:
                raise ValueError("LPLM pretraining trains each token at its sampled exit layer with cross-entropy: "
                                 "--output-loss ctc, --glance and --length-head are fine-tuning options")
            return self.lplm_terms(encoder_out, prev_output_tokens, tgt_tokens, exit_layers)
        pad = self.decoder.padding_idx
        labels = ctc.labels(tgt_tokens, pad, self.decoder.dictionary.eos()) if self.blank is not None else None
        revealed, terms = None, {}
        lengths = None
        if self.decoder.embed_length is not None:
            lengths = target_lengths(tgt_tokens, self.decoder.dictionary.eos(), pad)
            terms["length"] = {"out": self.decoder.predict_length(encoder_out), "tgt": lengths,
                               "factor": self.args.length_loss_factor}
        ratio = self.glance_schedule.ratio(self.num_updates) if self.glance_schedule else 0.0
        if self.training and ratio > 0:
            prev_output_tokens, revealed = self.glance(prev_output_tokens, encoder_out, tgt_tokens, labels, ratio,
                                                       lengths)
        # gold mixing lays the reference on the positions as they are: only for the positional (ce) output
        layer_logits = self.decoder(prev_output_tokens, encoder_out, tgt_tokens if labels is None else None, lengths)
        num_layers = len(layer_logits)
        if labels is not None:
            unfit = int(ctc.unalignable(*labels, prev_output_tokens.size(1)).sum())
            return {
                f"layer{l + 1}": {
                    "loss": ctc.loss(logits, *labels, self.blank) / num_layers, "factor": 1.0 / num_layers,
                    "nll_loss": l == num_layers - 1, **({"ctc_unalignable": unfit} if l == 0 else {}),
                }
                for l, logits in enumerate(layer_logits)
            }
        mask = tgt_tokens.ne(pad)
        if revealed is not None and self.args.glance_loss == "unrevealed":
            mask = mask & ~revealed
        return {
            **{f"layer{l + 1}": {
                "out": logits, "tgt": tgt_tokens, "mask": mask, "ls": self.label_smoothing,
                "factor": 1.0 / num_layers, "nll_loss": l == num_layers - 1,
            } for l, logits in enumerate(layer_logits)},
            **terms,
        }

    @torch.no_grad()
    def glance(self, prev_output_tokens, encoder_out, tgt_tokens, labels, ratio: float, lengths=None):
        """GLAT's first pass (the model's exit mode, no reference tokens) and the decoder input
        with ratio * (its wrong positions) reference tokens in place of [MASK]; returns that input
        and where the reference was revealed, both [B, T]."""
        last = self.decoder(prev_output_tokens, encoder_out, lengths=lengths)[-1]
        if labels is None:
            reference, valid = tgt_tokens, tgt_tokens.ne(self.decoder.padding_idx)
        else:
            reference = ctc.best_alignment(F.log_softmax(last.float(), dim=-1), *labels, self.blank)
            valid = torch.ones_like(reference, dtype=torch.bool)
        revealed = glancing.reveal(last.argmax(-1), reference, valid, ratio)
        return torch.where(revealed, reference, prev_output_tokens), revealed

    def lplm_terms(self, encoder_out, prev_output_tokens, tgt_tokens, exit_layers, prefix=None):
        """The LPLM loss term over an encoder output computed once for the B sequences:
        `exit_layers` holds K permutations of each ([K*B, T]), decoded as one batch above the
        layers they share (`prefix`, see ElmerDecoder.lplm_prefix; computed here unless given)."""
        bsz = tgt_tokens.size(0)
        if exit_layers.size(0) % bsz:
            raise ValueError(f"exit_layers has {exit_layers.size(0)} rows, not a multiple of the batch's {bsz}")
        if prefix is None:
            prefix = self.decoder.lplm_prefix(prev_output_tokens, encoder_out, exit_layers)
        logits = self.decoder.forward_lplm(prefix, encoder_out, exit_layers)
        tgt_tokens = tgt_tokens.repeat(exit_layers.size(0) // bsz, 1)
        mask = tgt_tokens.ne(self.decoder.padding_idx)
        return {"lplm": {"out": logits, "tgt": tgt_tokens, "mask": mask, "ls": self.label_smoothing,
                         "nll_loss": True}}

    @property
    def label_smoothing(self) -> float:
        # nat_loss smooths a term by its "ls"; the criterion's --label-smoothing reaches the model
        # through the flat training args, as for fairseq's CMLM
        return getattr(self.args, "label_smoothing", 0.0) or 0.0

    def load_state_dict(self, state_dict, strict=True, model_cfg=None, args=None):
        # fairseq only says "ensure that the architectures match" (a size mismatch further up)
        rows = state_dict.get("encoder.embed_tokens.weight")
        if rows is not None and rows.size(0) != len(self.encoder.dictionary):
            raise ValueError(
                f"the checkpoint's word embedding has {rows.size(0)} rows but the data's dictionary has "
                f"{len(self.encoder.dictionary)} symbols: the data was binarized with another vocabulary than the "
                f"checkpoint's; binarize it with the checkpoint's dict.txt (fairseq-preprocess --srcdict/--tgtdict, "
                f"or examples/TASK/prepare.py --dict)")
        return super().load_state_dict(state_dict, strict, model_cfg, args)

    @torch.no_grad()
    def generate(self, src_tokens, src_lengths, length: int,
                 exit_threshold: exit_policy.Threshold = exit_policy.DEFAULT_EXIT_THRESHOLD,
                 length_cut: Optional[int] = None, shortlist: Optional[int] = None,
                 lengths: Optional[Tensor] = None, ramp_dtype: Optional[torch.dtype] = None,
                 max_exit_layer: Optional[int] = None) -> Decoded:
        """One-pass decoding of T = `length` positions: encoder once, decoder once (its upper
        layers on fewer positions with `length_cut`, its middle off-ramps on fewer tokens with
        `shortlist`, its off-ramps' products in `ramp_dtype`, layers 1..`max_exit_layer` only;
        see ElmerDecoder.decode). `lengths`
        [B]: the output lengths a length head's decoder is told instead of its own prediction (the
        reference's, for --oracle-length)."""
        encoder_out = self.encoder(src_tokens, src_lengths=src_lengths)
        return self.decoder.decode(encoder_out, length, exit_threshold, length_cut=length_cut, blank=self.blank,
                                   shortlist=shortlist, lengths=lengths, ramp_dtype=ramp_dtype,
                                   max_exit_layer=max_exit_layer)


class LPLMPrefix(NamedTuple):
    """What LPLM's K permutations of each sequence share (ElmerDecoder.lplm_prefix)."""
    state: Tensor  # [T, B, C] the decoder state after the shared layers, one column per sequence
    depth: int  # how many layers (from the first) are shared


def attend(attn, q: Tensor, k: Tensor, v: Tensor, group: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
    """The core of fairseq's MultiheadAttention `attn` (softmax in float32, attention dropout) for
    N query rows, row i over the keys and values of group[i]: q [N, C] projected and scaled,
    k and v [G, S, C] projected, key_padding_mask [G, S] (True: not a key). Returns [N, C],
    before out_proj. The rows are laid out by group, padded to the largest, so that a few
    batched matmuls serve them all; the padding's rows are computed and dropped."""
    G, S, C = k.shape
    heads, N = attn.num_heads, len(q)
    counts = torch.bincount(group, minlength=G)
    width = int(counts.max())
    order = torch.argsort(group, stable=True)
    slot = torch.empty_like(group)
    slot[order] = torch.arange(N, device=q.device) - (counts.cumsum(0) - counts)[group[order]]
    where = group * width + slot  # row i's place in the [G, width] layout

    def split(t, length):  # [G * length, C] -> [G, heads, length, C / heads]
        return t.reshape(G, length, heads, -1).transpose(1, 2)

    scores = split(q.new_zeros(G * width, C).index_copy(0, where, q), width) @ split(k, S).transpose(-1, -2)
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    probs = attn.dropout_module(F.softmax(scores, dim=-1, dtype=torch.float32).type_as(scores))
    out = (probs @ split(v, S)).transpose(1, 2).reshape(G * width, C)
    return out.index_select(0, where)


def layer_rows(layer, x: Tensor, rows: Tensor, enc: Tensor, enc_mask: Optional[Tensor]) -> Tensor:
    """`layer(x, enc, enc_mask)[0]` (a post-norm fairseq TransformerDecoderLayer without a self-
    attention mask) at the rows `rows` of x [T, B, C] viewed as [T*B, C] only, [N, C]: queries,
    attention outputs, FFN and layer norms for those rows, keys and values from every position.
    B may be a multiple of the encoder output's batch [S, B_enc, C]: column b reads sequence
    b mod B_enc (LPLM's permutations), whose cross-attention keys are computed once."""
    if layer.normalize_before or layer.cross_self_attention or any(
            getattr(layer, name) is not None for name in ("c_attn", "attn_ln", "ffn_layernorm", "w_resid")):
        raise ValueError("layer_rows implements fairseq's post-norm decoder layer without NormFormer "
                         "scales or cross+self-attention, as ELMER builds it")
    T, B, C = x.shape
    column = rows % B
    h = x.reshape(T * B, C).index_select(0, rows)

    def sublayer(h, residual, norm):  # dropout, residual, post-norm
        return norm(layer.residual_connection(layer.dropout_module(h), residual))

    attn, states = layer.self_attn, x.transpose(0, 1)  # [B, T, C]
    out = attend(attn, attn.q_proj(h) * attn.scaling, attn.k_proj(states), attn.v_proj(states), column)
    h = sublayer(attn.out_proj(out), h, layer.self_attn_layer_norm)
    attn, source = layer.encoder_attn, enc.transpose(0, 1)  # [B_enc, S, C]
    out = attend(attn, attn.q_proj(h) * attn.scaling, attn.k_proj(source), attn.v_proj(source),
                 column % len(source), enc_mask)
    h = sublayer(attn.out_proj(out), h, layer.encoder_attn_layer_norm)
    ffn = layer.activation_dropout_module(layer.activation_fn(layer.fc1(h)))
    return sublayer(layer.fc2(ffn), h, layer.final_layer_norm)


def off_ramp_top(hidden: Tensor, weight: Tensor, k: int):
    """`off_ramp(hidden, weight, 0.0)`'s token and probability, and each row's k most likely tokens
    [N, k]: one [N, V] product serves both, where the fused op would not give the top k."""
    log_p = torch.log_softmax(F.linear(hidden, weight).float(), dim=-1)
    top = log_p.topk(min(k, log_p.size(-1)), dim=-1)
    # soft exit reads the token and its probability only: no entropy, nothing exits
    return OffRampOutput(top.indices[:, 0], top.values[:, 0].exp(), None, None, None), top.indices


def shortlist_argmax(hidden: Tensor, weight: Tensor, candidates: Tensor) -> Tensor:
    """The argmax of the off-ramp over the `candidates` (sorted token ids) only, for hidden [..., d]."""
    return candidates[F.linear(hidden, weight.index_select(0, candidates)).argmax(-1)]


class ElmerDecoder(TransformerDecoder):
    """Bidirectional NAR decoder over [MASK] inputs with an off-ramp after every layer."""

    def __init__(self, args, dictionary, embed_tokens):
        super().__init__(args, dictionary, embed_tokens, no_encoder_attn=False)
        self.exit_mode = args.exit_mode
        self.exit_threshold = args.exit_threshold
        self.gold_mix_prob = getattr(args, "gold_mix_prob", None) or 0.0
        self.mask_idx = dictionary.index(MASK_SYMBOL)
        if args.per_layer_off_ramps:
            self.off_ramps = nn.ModuleList(
                nn.Linear(self.output_embed_dim, len(dictionary), bias=False) for _ in self.layers
            )
            for ramp in self.off_ramps:
                nn.init.normal_(ramp.weight, mean=0, std=self.output_embed_dim ** -0.5)
        else:
            self.off_ramps = None
        # W in h~ = W [Embed(y); h] (paper eq. 12); only soft exit has it
        self.soft_exit = nn.Linear(2 * self.embed_dim, self.embed_dim, bias=False) if self.exit_mode == "soft" else None
        self.low_precision_ramps = {}  # off_ramp_weight's copies: not parameters, not saved
        self.embed_length = self.length_out = None
        if getattr(args, "length_head", False):
            classes = args.max_target_positions + 1  # lengths 0..max, EOS included
            self.length_out = nn.Linear(args.encoder_embed_dim, classes, bias=False)
            self.embed_length = nn.Embedding(classes, self.embed_dim)
            nn.init.zeros_(self.embed_length.weight)  # the [MASK] inputs a warm start's layers were trained on

    def off_ramp_weight(self, layer: int, dtype: Optional[torch.dtype] = None) -> Tensor:
        """Layer `layer`'s off-ramp matrix [V, d], or a copy in `dtype` made once and kept while the
        weight is unchanged (decoding reads it at every layer of every batch)."""
        weight = self.output_projection.weight if self.off_ramps is None else self.off_ramps[layer].weight
        if dtype is None or dtype == weight.dtype:
            return weight
        key, stamp = (-1 if self.off_ramps is None else layer), (weight.data_ptr(), weight._version, dtype)
        cached = self.low_precision_ramps.get(key)
        if cached is None or cached[0] != stamp:  # moved, trained or another dtype since
            cached = self.low_precision_ramps[key] = (stamp, weight.detach().to(dtype))
        return cached[1]

    def embed(self, prev_output_tokens: Tensor, lengths: Optional[Tensor] = None) -> Tensor:
        """[B, T] tokens -> [T, B, C] decoder input: word + learned position embeddings, and with a
        length head the embedding of each row's output length `lengths` [B]."""
        x = self.embed_scale * self.embed_tokens(prev_output_tokens)
        if self.embed_positions is not None:
            x = x + self.embed_positions(prev_output_tokens)
        if (lengths is None) != (self.embed_length is None):
            raise ValueError("a decoder with a length head reads the output lengths, one without reads none: "
                             f"got lengths={'None' if lengths is None else 'a tensor'}")
        if lengths is not None:
            x = x + self.embed_length(lengths.clamp(max=self.embed_length.num_embeddings - 1)).unsqueeze(1)
        if self.layernorm_embedding is not None:
            x = self.layernorm_embedding(x)
        return self.dropout_module(x).transpose(0, 1)

    def predict_length(self, encoder_out) -> Tensor:
        """The length head's logits [B, lengths] from the mean of the encoder's (unpadded) states."""
        enc = encoder_out["encoder_out"][0]  # [S, B, C]
        if encoder_out["encoder_padding_mask"]:
            keep = (~encoder_out["encoder_padding_mask"][0]).t().unsqueeze(-1).type_as(enc)  # [S, B, 1]
            mean = (enc * keep).sum(0) / keep.sum(0).clamp(min=1)
        else:
            mean = enc.mean(0)
        return self.length_out(mean)

    def predicted_lengths(self, encoder_out, length: int):
        """The length head's most likely output length [B] in 1..T = `length`, and in 1..any (which
        may be above T: decoding caps it and the generator counts it)."""
        logits = self.predict_length(encoder_out)
        logits[:, 0] = -math.inf  # an output holds its EOS at least
        return logits[:, : length + 1].argmax(-1), logits.argmax(-1)

    def mask_input(self, encoder_out, length: int, lengths: Optional[Tensor] = None) -> Tensor:
        """The decoding input [T, B, C]: T = `length` [MASK]s; with a length head, told `lengths` [B]
        or, when None, the head's most likely length in 1..T."""
        enc = encoder_out["encoder_out"][0]
        if self.embed_length is not None and lengths is None:
            lengths = self.predicted_lengths(encoder_out, length)[0]
        return self.embed(enc.new_full((enc.size(1), length), self.mask_idx, dtype=torch.long), lengths)

    def fuse(self, tokens: Tensor, h: Tensor) -> Tensor:
        """Soft exit: the next layer reads W [Embed(y^l); h^l]."""
        return self.soft_exit(torch.cat([self.embed_tokens(tokens), h], dim=-1))

    def mix_gold(self, predicted: Tensor, tgt_tokens) -> Tensor:
        """Training only: each target position's prediction is replaced by the gold token with
        probability --gold-mix-prob (positions without a gold token, pad, keep the prediction)."""
        if not self.training or self.gold_mix_prob == 0 or tgt_tokens is None:
            return predicted
        gold = tgt_tokens.t()  # [T, B], as predicted
        use_gold = torch.rand(gold.shape, device=gold.device) < self.gold_mix_prob
        return torch.where(use_gold & gold.ne(self.padding_idx), gold, predicted)

    def run_layer(self, layer: int, x: Tensor, encoder_out, rows: Optional[Tensor] = None) -> Tensor:
        """Decoder layer `layer` over the states x [T, B, C]: its output [T, B, C], or with `rows`
        (indices t*B + b of the positions in flight) theirs alone, [N, C]; every position still
        serves as a key and value. B may be a multiple of the encoder's batch (LPLM's k
        permutations of each sequence, column j*B + i) when `rows` is given."""
        enc = encoder_out["encoder_out"][0]
        enc_mask = encoder_out["encoder_padding_mask"][0] if encoder_out["encoder_padding_mask"] else None
        if rows is not None:
            return layer_rows(self.layers[layer], x, rows, enc, enc_mask)
        # no self_attn_mask: the NAR decoder attends to every position, left and right
        return self.layers[layer](x, enc, enc_mask)[0]

    def forward(self, prev_output_tokens, encoder_out, tgt_tokens=None, lengths=None) -> List[Tensor]:
        """Training pass with the model's exit mode; returns every layer's off-ramp logits [B, T, V].

        Hard exit trains every off-ramp (the mean of the per-layer cross-entropies, as soft exit
        does) while the forward pass applies the same entropy rule as decoding: a position whose
        entropy falls below delta keeps its state in all upper layers. Early in training nothing
        is confident, so this is plain deep supervision that teaches the lower off-ramps; as they
        become confident, the upper layers learn to work beside frozen neighbours, as they must
        at inference. A frozen position's upper-layer loss repeats its exit-layer loss (the
        off-ramp is shared), so a token's exit layer is weighted by how many layers it spans.
        `lengths` [B]: the output lengths a length head's decoder is told (the references').
        """
        x = self.embed(prev_output_tokens, lengths)
        frozen = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)  # [T, B]
        layer_logits = []
        for l in range(self.num_layers):
            h = self.run_layer(l, x, encoder_out)
            if self.exit_mode == "hard":
                h = torch.where(frozen.unsqueeze(-1), x, h)
            logits = F.linear(h, self.off_ramp_weight(l))
            layer_logits.append(logits.transpose(0, 1))
            if self.exit_mode == "soft":
                x = self.fuse(self.mix_gold(logits.argmax(-1), tgt_tokens), h) if l < self.num_layers - 1 else h
            else:
                log_p = torch.log_softmax(logits.detach().float(), dim=-1)
                frozen = frozen | exit_policy.exits(-(log_p.exp() * log_p).sum(-1), self.exit_threshold)
                x = h
        return layer_logits

    def lplm_prefix(self, prev_output_tokens, encoder_out, exit_layers: Tensor) -> "LPLMPrefix":
        """The decoder layers that the K permutations ([K*B, T] exit layers) of each of the B
        sequences share, run once per sequence: those below the first layer where some position
        is frozen in one permutation and updated in another. That is at least the first layer,
        whose input (the [MASK] embeddings) is the same for all; with K = 1, every layer.
        In training, the shared part draws one dropout mask per sequence, not one per permutation."""
        bsz, length = prev_output_tokens.shape
        perms = exit_layers.view(-1, bsz, length)
        lowest, highest = perms.min(0).values, perms.max(0).values
        differ = lowest != highest
        depth = int(lowest[differ].min()) if differ.any() else self.num_layers
        x = self.lplm_layers(self.embed(prev_output_tokens), encoder_out, perms[0].t(), range(depth))
        return LPLMPrefix(x, depth)

    def lplm_layers(self, x: Tensor, encoder_out, exit_layers: Tensor, layers) -> Tensor:
        """x [T, B, C] through `layers`: layer l (0-based) updates the positions with exit layer
        [T, B] > l and runs their queries and FFN only; the frozen ones serve as keys and values."""
        for l in layers:
            rows = (exit_layers > l).flatten().nonzero().squeeze(1)
            if len(rows) == exit_layers.numel():
                x = self.run_layer(l, x, encoder_out)
            elif len(rows):
                flat = x.reshape(-1, x.size(-1))
                x = flat.index_copy(0, rows, self.run_layer(l, x, encoder_out, rows)).view_as(x)
        return x

    def forward_lplm(self, prefix: "LPLMPrefix", encoder_out, exit_layers: Tensor) -> Tensor:
        """LPLM: position t is updated by layers 1..l_t and frozen above; returns the logits of
        its off-ramp at l_t, [K*B, T, V], for the K permutations of `exit_layers` [K*B, T]
        (permutation j of sequence i is row j*B + i), continuing from their shared `prefix`."""
        state, depth = prefix
        k = exit_layers.size(0) // state.size(1)
        exit_layers = exit_layers.t()  # [T, K*B]
        # (above the prefix some position is always frozen, so every layer here runs on a subset
        # of rows, whose cross-attention reads the B sequences' encoder output as it is)
        x = self.lplm_layers(state.repeat(1, k, 1), encoder_out, exit_layers, range(depth, self.num_layers))
        if self.off_ramps is None:
            return self.output_layer(x).transpose(0, 1)
        logits = x.new_zeros(*x.shape[:2], len(self.dictionary))
        for l in range(self.num_layers):
            at = exit_layers == l + 1
            logits[at] = F.linear(x[at], self.off_ramp_weight(l))
        return logits.transpose(0, 1)

    @torch.no_grad()
    def decode(self, encoder_out, length: int,
               exit_threshold: exit_policy.Threshold = exit_policy.DEFAULT_EXIT_THRESHOLD,
               forced_exits: Optional[Tensor] = None, length_cut: Optional[int] = None,
               blank: Optional[int] = None, shortlist: Optional[int] = None,
               lengths: Optional[Tensor] = None, ramp_dtype: Optional[torch.dtype] = None,
               max_exit_layer: Optional[int] = None) -> Decoded:
        """One pass over T = `length` [MASK] positions with the model's exit mode (a decoder with a
        length head is told `lengths` [B], or its own prediction; see mask_input).

        `max_exit_layer` K (None: L, the paper's): every position exits by layer K at the latest,
        and layers K+1..L are not run. Soft exit writes layer K's off-ramp's prediction (each
        off-ramp is trained to predict the output: the loss averages all L); hard exit makes K its
        last layer, whose off-ramp predicts whatever is still in flight.

        `ramp_dtype` (None: the model's dtype, the paper's): every off-ramp's product runs in this
        dtype, on a copy of the matrix made once (off_ramp_weight); the reductions over the
        vocabulary stay float32 (the op's contract). On a CPU with bf16 instructions a bf16
        off-ramp costs about half of an fp32 one; outputs can differ where two tokens are close.

        Hard exit runs each layer's queries, attention and FFN on the positions still in flight
        only; the exited ones keep the state they exited with and serve as keys and values, so
        a layer costs about its in-flight share of a full one. `forced_exits` ([B, T] exit
        layers in 1..L) replaces the entropy rule, for tests and benchmarks that need exit
        schedules an untrained model's entropies do not give.

        `length_cut` (a margin >= 0; None: off, the paper's T for every layer): after layer 1,
        the upper layers run on the positions up to the last one that layer 1 says the batch's
        outputs need (`needed_length`) plus the margin; the positions past it keep layer 1's
        prediction, as if they exited there, and are no longer read. `blank`: a CTC model's blank.

        `shortlist` K (soft exit; None: off, the paper's): the off-ramps of layers 2..L-1, whose
        argmax only chooses the embedding the next layer reads, score the union of the K most
        likely tokens of layer 1 at the decoded positions instead of the whole vocabulary; layer 1
        and layer L score it all. At batch 1 an off-ramp costs the bytes of its [V, d] matrix, so
        this saves most of L - 2 of them; a middle layer whose argmax lies outside the union reads
        another token than the full argmax, so outputs can differ (docs/one-pass.md measures it)."""
        if length_cut is not None and not length_cut >= 0:
            raise ValueError(f"--length-cut must be >= 0 (positions kept past layer 1's end), got {length_cut}")
        if max_exit_layer is not None and not 1 <= max_exit_layer <= self.num_layers:
            raise ValueError(f"--max-exit-layer {max_exit_layer}: a decoder layer in 1..{self.num_layers} "
                             f"(this decoder has {self.num_layers})")
        enc = encoder_out["encoder_out"][0]
        bsz, L, full = enc.size(1), max_exit_layer or self.num_layers, length
        masks = enc.new_full((bsz, length), self.mask_idx, dtype=torch.long)
        predicted = None
        if self.embed_length is not None and lengths is None:
            lengths, predicted = self.predicted_lengths(encoder_out, length)
        x = self.embed(masks, lengths)  # [T, B, C]
        M = length * bsz
        cut = length_cut is not None and L > 1
        if shortlist is not None:
            if self.exit_mode != "soft" or not shortlist >= 1 or L < 3:
                raise ValueError(f"--ramp-shortlist {shortlist}: a number >= 1 of candidates for the middle off-ramps "
                                 f"of a soft-exit decoder that runs >= 3 layers (this one: {self.exit_mode}, {L} layers"
                                 f"{'' if L == self.num_layers else ' of ' + str(self.num_layers) + ' by --max-exit-layer'})")
        low = (lambda t: t) if ramp_dtype is None else (lambda t: t.to(ramp_dtype))
        if self.exit_mode == "soft":
            first, candidates = None, None  # layer 1's predictions at every position; the shortlist
            for l in range(L):
                h = self.run_layer(l, x, encoder_out)
                weight = self.off_ramp_weight(l, ramp_dtype)
                if candidates is not None and l < L - 1:  # the next layer reads the argmax, nothing else
                    x = self.fuse(shortlist_argmax(low(h), weight, candidates), h)
                    continue
                flat = low(h.reshape(M, -1))
                ramp, top = off_ramp_top(flat, weight, shortlist) if l == 0 and shortlist else (off_ramp(flat, weight, 0.0), None)
                tokens = ramp.token.view(length, bsz)
                if l == 0 and cut:
                    first, length = ramp, self.needed_length(tokens, length_cut, blank)
                    M, h, tokens = length * bsz, h[:length], tokens[:length]
                if top is not None:  # sorted: among tied logits the lowest index wins, as in the full argmax
                    candidates = top[:M].unique()
                x = self.fuse(tokens, h) if l < L - 1 else h
            tokens, scores, exit_layer = ramp.token, ramp.prob, masks.new_full((M,), L)
            if M < full * bsz:  # the cut positions (the last rows of the flat order): layer 1's
                tokens, scores = torch.cat([tokens, first.token[M:]]), torch.cat([scores, first.prob[M:]])
                exit_layer = torch.cat([exit_layer, masks.new_ones(full * bsz - M)])
            return self.batch_major(full, tokens, scores.log(), exit_layer)._replace(predicted_length=predicted)
        if not isinstance(exit_threshold, exit_policy.LayerThresholds) and not exit_threshold >= 0:  # also NaN
            raise ValueError(f"--exit-threshold must be >= 0 (an entropy in nats), got {exit_threshold}")
        if forced_exits is not None:
            if forced_exits.shape != masks.shape or not ((forced_exits >= 1) & (forced_exits <= L)).all():
                raise ValueError(f"forced_exits must be [B, T] = {list(masks.shape)} exit layers in 1..{L}, got "
                                 f"{list(forced_exits.shape)} in {forced_exits.min()}..{forced_exits.max()}")
            forced_exits = forced_exits.t().reshape(M)
        tokens = masks.new_full((M,), self.dictionary.unk())
        scores = x.new_zeros(M, dtype=torch.float)
        exit_layer = masks.new_full((M,), L)
        state = x.reshape(M, -1)  # row t*B + b
        active = torch.arange(M, device=x.device)
        for l in range(L):
            x = state.view(length, bsz, -1)
            if len(active) == M:
                state = self.run_layer(l, x, encoder_out).reshape(M, -1)
            else:  # the in-flight positions move on; the exited keep their state
                state.index_copy_(0, active, self.run_layer(l, x, encoder_out, active))
            # the last layer predicts whatever is left, confident or not
            signal, threshold = exit_policy.layer_rule(exit_threshold, l, L)
            ramp = off_ramp(low(state), self.off_ramp_weight(l, ramp_dtype), threshold, active, signal=signal)  # fused
            exits = ramp.exit
            if forced_exits is not None and l < L - 1:
                exits = forced_exits[active] == l + 1
            if l == 0 and cut:  # every row is in flight at layer 1: ramp.token is in the flat order
                length = self.needed_length(ramp.token.view(length, bsz), length_cut, blank)
                M = length * bsz
                exits = exits | (active >= M)
                state = state[:M]
            done = active[exits]
            tokens[done], scores[done] = ramp.token[exits], ramp.prob[exits]
            exit_layer[done] = l + 1
            active = active[~exits]
            if len(active) == 0:  # every position has exited: the upper layers would only copy
                break
        return self.batch_major(full, tokens, scores.log(), exit_layer)._replace(predicted_length=predicted)

    def needed_length(self, tokens: Tensor, margin: int, blank: Optional[int]) -> int:
        """How many positions the batch's outputs need by the predictions `tokens` [T, B], plus
        `margin` (at most T): through each row's first EOS, or with CTC (a `blank`) through its
        last written (non-blank) position."""
        T = tokens.size(0)
        if blank is None:
            ends = tokens.eq(self.dictionary.eos())
            need = torch.where(ends.any(0), ends.float().argmax(0) + 1, T)
        else:
            written = tokens.ne(blank)
            need = torch.where(written.any(0), T - written.flip(0).float().argmax(0), 0)
        return max(1, min(T, int(need.max()) + margin))

    @staticmethod
    def batch_major(length: int, tokens: Tensor, scores: Tensor, exit_layer: Tensor) -> Decoded:
        """Decoded from the decoder's flat [T*B] order."""
        def view(t):
            return t.view(length, -1).t()

        return Decoded(view(tokens), view(scores), view(exit_layer))

    def upgrade_state_dict_named(self, state_dict, name):
        """Checkpoints without this decoder's optional parts start them afresh: per-layer off-ramps
        from this model's initialisation, the soft-exit W as [0 | I] (`pass_through_fuse`: the
        checkpoint's layers were trained reading the layer below directly, as in LPLM pretraining
        or hard exit); a hard-exit decoder leaves out a soft-exit checkpoint's W, which it has no
        use for."""
        super().upgrade_state_dict_named(state_dict, name)
        prefix = name + "." if name else ""
        own = self.state_dict()
        for key, value in own.items():
            if key.startswith(("soft_exit.", "off_ramps.", "embed_length.", "length_out.")) and prefix + key not in state_dict:
                if key == "soft_exit.weight":
                    logger.info("the checkpoint has no soft-exit W: it starts as [0 | I], each layer reading the "
                                "layer below as the checkpoint's layers were trained to")
                    value = pass_through_fuse(self.embed_dim).to(value)
                state_dict[prefix + key] = value
        unused = [k for k in state_dict if k.startswith(prefix + "soft_exit.") and k[len(prefix):] not in own]
        if unused:  # e.g. elmer-convert's soft-exit weights fine-tuned with --exit-mode hard, which has no fuse
            logger.info(f"hard exit: not loading the checkpoint's soft-exit fuse ({', '.join(unused)})")
        for key in unused:
            del state_dict[key]
        return state_dict


# fairseq Transformer options that ELMER's decoder cannot honour: (option, the one value it supports, why)
UNSUPPORTED = [
    ("decoder_normalize_before", False, "the off-ramps read each layer's output directly and exited states "
                                        "are copied upward as they are (post-norm only)"),
    ("no_decoder_final_norm", False, "ELMER's post-norm decoder has no final norm to drop"),
    ("no_cross_attention", False, "ELMER's decoder reads the source only through cross-attention"),
    ("cross_self_attention", False, "ELMER's decoder layers attend to the source through cross-attention only"),
    ("decoder_layerdrop", 0, "every decoder layer has an off-ramp and a loss term, and exit layers are "
                             "layer indices: dropping decoder layers is not defined"),
    ("adaptive_input", False, "ELMER's inputs are [MASK] and its fused predictions: a plain embedding"),
    ("adaptive_softmax_cutoff", None, "every off-ramp is a full softmax over the tied embedding"),
    ("adaptive_softmax_dropout", 0, "every off-ramp is a full softmax over the tied embedding"),
    ("adaptive_softmax_factor", 4, "every off-ramp is a full softmax over the tied embedding"),
    ("tie_adaptive_weights", False, "every off-ramp is a full softmax over the tied embedding"),
    ("tie_adaptive_proj", False, "every off-ramp is a full softmax over the tied embedding"),
    ("base_layers", 0, "BASE layers would sit between the decoder layers without off-ramps"),
    ("base_sublayers", 1, "only with --base-layers, which ELMER does not support"),
    ("base_shuffle", 1, "only with --base-layers, which ELMER does not support"),
    ("char_inputs", False, "fairseq's Transformer does not implement it (it would be ignored)"),
    ("quant_noise_scalar", 0, "fairseq's Transformer does not implement it (it would be ignored)"),
    ("decoder_xformers_att_config", None, "ELMER's decoder uses fairseq's attention modules"),
    ("merge_src_tgt_embed", False, "use --share-all-embeddings over a joined dictionary"),
    ("encoder_layers_to_keep", None, "fairseq 0.12's Transformer fails on it (AttributeError); set --encoder-layers"),
    ("decoder_layers_to_keep", None, "fairseq 0.12's Transformer fails on it (AttributeError); set --decoder-layers"),
]


def refuse_unsupported(args):
    for name, supported, why in UNSUPPORTED:
        value = getattr(args, name, supported)
        if value != supported:
            raise ValueError(f"--{name.replace('_', '-')} {value}: not supported by ELMER: {why}")
    output_dim = getattr(args, "decoder_output_dim", None)
    if output_dim not in (None, args.decoder_embed_dim):
        raise ValueError(f"--decoder-output-dim {output_dim}: not supported by ELMER: the off-ramps read the "
                         f"layers' states, of --decoder-embed-dim {args.decoder_embed_dim}")


def resolve_gold_mix(exit_mode, prob, output_loss="ce"):
    """--gold-mix-prob for a new model: the authors' value with soft exit, refused where nothing is
    fused or where the reference has no position (CTC)."""
    if prob is None:
        return GOLD_MIX_PROB if exit_mode == "soft" and output_loss == "ce" else 0.0
    if not 0.0 <= prob <= 1.0:  # also rejects NaN
        raise ValueError(f"--gold-mix-prob must be in [0, 1], got {prob}")
    if prob > 0 and exit_mode != "soft":
        raise ValueError(f"--gold-mix-prob {prob} mixes gold tokens into soft exit's fused inputs; "
                         f"with --exit-mode {exit_mode} nothing is fused (pass 0 or leave it out)")
    if prob > 0 and output_loss == "ctc":
        raise ValueError(f"--gold-mix-prob {prob} puts the target's t-th token at position t; with --output-loss "
                         f"ctc a target has no fixed position (use --glance, which aligns it first)")
    return prob


def resolve_ctc_blank(output_loss: str, blank: Optional[str]) -> Optional[str]:
    """--ctc-blank for a new model: [MASK] by default with ctc, refused with ce (None then)."""
    if output_loss != "ctc":
        if blank is not None:
            raise ValueError(f"--ctc-blank {blank} chooses CTC's blank symbol: it needs --output-loss ctc")
        return None
    return blank or "mask"


def resolve_glance_loss(output_loss, glance, value):
    """--glance-loss for a new model: unrevealed with ce, all with ctc; refused without --glance
    (None then)."""
    if value is not None and not glance:
        raise ValueError(f"--glance-loss {value} chooses the positions glancing trains: it needs --glance")
    if value == "unrevealed" and output_loss == "ctc":
        raise ValueError("--glance-loss unrevealed: a CTC loss is over the whole sequence; use all (the default with ctc)")
    if not glance:
        return None
    return value or ("all" if output_loss == "ctc" else "unrevealed")


def resolve_length_head(length_head: bool, output_loss: str, factor: Optional[float]) -> Optional[float]:
    """--length-loss-factor for a new model: CMLM's with --length-head, refused without it (None then)."""
    if factor is not None and not length_head:
        raise ValueError(f"--length-loss-factor {factor} weighs the length head's loss: it needs --length-head")
    if factor is not None and not factor >= 0:  # also rejects NaN
        raise ValueError(f"--length-loss-factor must be >= 0, got {factor}")
    if length_head and output_loss == "ctc":
        raise ValueError("--length-head tells the decoder where the output's EOS is; with --output-loss ctc the "
                         "output's length comes from the blanks and T must be 2-3x the target: drop --length-head")
    if not length_head:
        return None
    return LENGTH_LOSS_FACTOR if factor is None else factor


def target_lengths(tgt_tokens: Tensor, eos: int, pad: int) -> Tensor:
    """[B, T] targets -> [B] their lengths through the first EOS (all non-pad tokens where none is)."""
    is_eos = tgt_tokens.eq(eos)
    return torch.where(is_eos.any(1), is_eos.float().argmax(1) + 1, tgt_tokens.ne(pad).sum(1))


def pass_through_fuse(dim: int) -> Tensor:
    """Soft exit's W = [0 | I]: W [Embed(y); h] = h. The start for a W that pretrained layers never
    had (a random W hands each layer above the first a random projection of its input); the
    Embed(y) half still gets gradients and learns from zero."""
    return torch.cat([torch.zeros(dim, dim), torch.eye(dim)], dim=1)


def smoothing_entropy_floor(eps: float, vocab: int) -> float:
    """The entropy (nats) of the distribution that a label-smoothed loss is minimised by: the gold
    token at 1 - eps + eps/V, every word at eps/V (fairseq's smoothing). An off-ramp trained to it
    is never more certain than this."""
    if eps <= 0:
        return 0.0
    top, rest = 1 - eps + eps / vocab, eps / vocab
    return -(top * math.log(top) + (vocab - 1) * rest * math.log(rest))


def warn_smoothing_floor(args, vocab: int):
    eps = getattr(args, "label_smoothing", 0.0) or 0.0
    threshold = getattr(args, "exit_threshold", None)
    floor = smoothing_entropy_floor(eps, vocab)
    if getattr(args, "exit_mode", None) == "hard" and threshold is not None and floor >= threshold:
        logger.warning(
            f"--label-smoothing {eps} trains the off-ramps towards an entropy of {floor:.2f} nats "
            f"(V = {vocab}), at or above --exit-threshold {threshold}: hard exit will rarely fire "
            f"before the last layer. Train hard exit with --label-smoothing 0 (the default) or a "
            f"higher threshold")


def elmer_defaults(args, **defaults):
    """Fill ELMER's fixed choices, then the architecture's sizes, then fairseq's defaults."""
    for key, value in defaults.items():
        setattr(args, key, getattr(args, key, value))
    args.encoder_learned_pos = True
    args.decoder_learned_pos = True
    args.share_all_embeddings = getattr(args, "share_all_embeddings", True)
    args.share_decoder_input_output_embed = True
    args.per_layer_off_ramps = getattr(args, "per_layer_off_ramps", False)
    base_architecture(args)


@register_model_architecture("elmer", "elmer_base")
def elmer_base(args):
    """The paper's size: 6+6 layers, d=768, 12 heads, FFN 3072, BART-style embeddings."""
    elmer_defaults(
        args, encoder_layers=6, decoder_layers=6, encoder_embed_dim=768, encoder_ffn_embed_dim=3072,
        encoder_attention_heads=12, decoder_attention_heads=12, activation_fn="gelu",
        layernorm_embedding=True, no_scale_embedding=True, dropout=0.1, attention_dropout=0.1,
    )


@register_model_architecture("elmer", "elmer_tiny")
def elmer_tiny(args):
    """3+3 layers, d=256: trains in minutes on two CPU cores (tests, demo)."""
    elmer_defaults(
        args, encoder_layers=3, decoder_layers=3, encoder_embed_dim=256, encoder_ffn_embed_dim=1024,
        encoder_attention_heads=4, decoder_attention_heads=4, activation_fn="gelu",
        layernorm_embedding=True, no_scale_embedding=False, dropout=0.1, attention_dropout=0.0,
    )


@register_model_architecture("elmer", "elmer_large")
def elmer_large(args):
    """BART-large's size (12+12 layers, d=1024, 16 heads, FFN 4096): what `elmer-convert` gives bart-large."""
    elmer_defaults(
        args, encoder_layers=12, decoder_layers=12, encoder_embed_dim=1024, encoder_ffn_embed_dim=4096,
        encoder_attention_heads=16, decoder_attention_heads=16, activation_fn="gelu",
        layernorm_embedding=True, no_scale_embedding=True, dropout=0.1, attention_dropout=0.1,
    )
