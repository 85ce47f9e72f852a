"""`elmer-calibrate`: per-layer hard-exit thresholds that change at most a share ε of the tokens
of the full-depth output, with probability at least 1 - α (CALM, Schuster et al. 2022).

    elmer-calibrate --path CKPT --data BIN [--split valid] [--epsilon 0.05] [--alpha 0.1]

A user says "exit early, but change at most 5% of the tokens" instead of picking a threshold in
nats. The risk of thresholds is the mean, over sequences, of the share of a sequence's positions
(up to and including the full-depth output's EOS) whose early-exit token differs from the
full-depth token (every position through every layer). The calibration split is cut in two:
- the first half proposes, for each target per-layer error rate λ on a grid, one threshold per
  layer: the largest whose exits at that layer disagree with the last layer on at most λ of them
  (read from one full-depth pass);
- the second half tests them, most cautious λ first (Learn then Test with fixed-sequence
  testing): each λ's thresholds decode the half, their empirical risk R gives the Hoeffding
  p-value exp(-2 n (ε - R)²), and λ is accepted while p ≤ α. The least cautious accepted λ is
  the answer: with probability ≥ 1 - α over the draw of the calibration data its risk on data
  like it is ≤ ε. None accepted: thresholds of 0 (never exit early), with a warning.

Writes the thresholds (`fairseq-generate --exit-thresholds FILE`, `ELMER.generate(exit_thresholds=FILE)`)
with the numbers that chose them.
"""
import argparse
import logging
import math
from pathlib import Path
from typing import List, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import exit_policy

logger = logging.getLogger(__name__)
RATES = (0.0, 0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)


def hoeffding_p_value(risk: float, n: int, epsilon: float) -> float:
    """p-value of "the true risk is > epsilon" for a mean of n losses in [0, 1] that came out as `risk`."""
    return math.exp(-2 * n * max(epsilon - risk, 0.0) ** 2)


def fixed_sequence_test(losses: Sequence[np.ndarray], epsilon: float, alpha: float) -> int:
    """Index of the last candidate accepted by fixed-sequence testing, candidates ordered from the
    most cautious; -1 when the first already fails. losses[j]: candidate j's per-sequence losses."""
    chosen = -1
    for j, loss in enumerate(losses):
        if hoeffding_p_value(float(np.mean(loss)), len(loss), epsilon) > alpha:
            break
        chosen = j
    return chosen


def propose(uncertainty: np.ndarray, disagrees: np.ndarray, rate: float) -> float:
    """The largest threshold t such that the positions with uncertainty < t disagree with the last
    layer on at most `rate` of them (0 when even the most certain position cannot go)."""
    order = np.argsort(uncertainty, kind="stable")
    u, wrong = uncertainty[order], disagrees[order].astype(np.float64)
    share = np.cumsum(wrong) / np.arange(1, len(u) + 1)  # among the k most certain positions
    ok = np.flatnonzero(share <= rate)
    if not len(ok):
        return 0.0
    k = ok[-1]
    # strictly above the k-th value and at most the next one: exactly those k positions pass
    return float(u[k + 1]) if k + 1 < len(u) and u[k + 1] > u[k] else float(np.nextafter(u[k], np.inf))


class Positions(NamedTuple):
    """What one full-depth pass says about every output position of a split."""
    uncertainty: List[np.ndarray]  # per layer below the last: [positions]
    disagrees: List[np.ndarray]  # per layer below the last: its argmax differs from the last layer's


def layer_logits(decoder, encoder_out, length: int) -> List[torch.Tensor]:
    """Every layer's off-ramp logits [B, T, V] for T = `length` [MASK] positions, each position
    through every layer: the decoder's hard-exit forward pass with delta 0, built from its parts
    because that pass reads delta from the decoder's own field, which calibration must not change."""
    x = decoder.mask_input(encoder_out, length)
    logits = []
    for l in range(decoder.num_layers):
        x = decoder.run_layer(l, x, encoder_out)
        logits.append(F.linear(x, decoder.off_ramp_weight(l)).transpose(0, 1))
    return logits


def full_depth(model, batches, length: int, signal: str) -> Positions:
    """Every position through every layer (hard exit with delta 0): each layer's uncertainty and
    whether its prediction already equals the last layer's, for the positions of the output."""
    decoder, eos = model.decoder, model.decoder.dictionary.eos()
    uncertainty, disagrees = [[] for _ in range(decoder.num_layers - 1)], [[] for _ in range(decoder.num_layers - 1)]
    with torch.no_grad():
        for batch in batches:
            net = batch["net_input"]
            layers = layer_logits(decoder, model.encoder(net["src_tokens"], src_lengths=net["src_lengths"]), length)
            final = layers[-1].argmax(-1)
            keep = output_positions(final, eos)
            for l, logits in enumerate(layers[:-1]):
                log_p = torch.log_softmax(logits.float(), -1)
                entropy = -(log_p.exp() * log_p).sum(-1)
                u = exit_policy.uncertainty(signal, entropy, log_p.max(-1).values.exp())
                uncertainty[l].append(u[keep].numpy())
                disagrees[l].append(logits.argmax(-1).ne(final)[keep].numpy())
    return Positions([np.concatenate(u) for u in uncertainty], [np.concatenate(d) for d in disagrees])


def output_positions(tokens: torch.Tensor, eos: int) -> torch.Tensor:
    """[B, T] -> which positions are the output: up to and including the first EOS."""
    is_eos = tokens.eq(eos).long()
    return (is_eos.cumsum(1) - is_eos) == 0


def sequence_risks(model, batches, length: int, threshold) -> np.ndarray:
    """Per sequence, the share of its output positions whose token under `threshold` differs from
    the full-depth output's."""
    eos, risks = model.decoder.dictionary.eos(), []
    with torch.no_grad():
        for batch in batches:
            net = batch["net_input"]
            full = model.generate(net["src_tokens"], net["src_lengths"], length, 0.0).tokens
            early = model.generate(net["src_tokens"], net["src_lengths"], length, threshold).tokens
            risks.append(changed_share(early, full, eos).numpy())
    return np.concatenate(risks)


def changed_share(early: torch.Tensor, full: torch.Tensor, eos: int) -> torch.Tensor:
    """[B] per sequence, the share of the full-depth output's positions whose token `early` changed."""
    keep = output_positions(full, eos)
    return (early.ne(full) & keep).sum(1).double().div(keep.sum(1))


def calibrate(model, task, split: str = "valid", epsilon: float = 0.05, alpha: float = 0.1,
              signal: str = "entropy", batch_size: int = 32, seed: int = 1):
    """(LayerThresholds, details) for a hard-exit `model` of `task`, calibrated on `split`."""
    if not 0 < epsilon < 1 or not 0 < alpha < 1:
        raise ValueError(f"--epsilon and --alpha must be in (0, 1), got {epsilon} and {alpha}")
    if signal not in exit_policy.SIGNALS:
        raise ValueError(f"--signal must be one of {', '.join(exit_policy.SIGNALS)}, got {signal!r}")
    if model.decoder.exit_mode != exit_policy.HARD:
        raise ValueError(f"calibration needs a hard-exit checkpoint; this one was fine-tuned with "
                         f"--exit-mode {model.decoder.exit_mode}")
    model.eval()
    task.load_dataset(split)
    dataset = task.dataset(split)
    order = np.random.RandomState(seed).permutation(len(dataset))
    if len(order) < 4:
        raise ValueError(f"the {split} split has {len(order)} samples; calibration needs at least 4")
    halves = order[: len(order) // 2], order[len(order) // 2:]

    def batches(indices):
        return [dataset.collater([dataset[int(i)] for i in indices[k: k + batch_size]])
                for k in range(0, len(indices), batch_size)]

    length = task.cfg.max_target_length
    propose_half, test_half = batches(halves[0]), batches(halves[1])
    seen = full_depth(model, propose_half, length, signal)
    candidates = [exit_policy.LayerThresholds(signal, tuple(propose(u, d, rate) for u, d in
                                                               zip(seen.uncertainty, seen.disagrees)))
                  for rate in RATES]
    losses, risks = [], []
    for candidate in candidates:
        loss = sequence_risks(model, test_half, length, candidate)
        losses.append(loss)
        risks.append(float(loss.mean()))
        if hoeffding_p_value(risks[-1], len(loss), epsilon) > alpha:
            break  # fixed-sequence testing stops at the first failure: the rest are never tested
    chosen = fixed_sequence_test(losses, epsilon, alpha)
    if chosen < 0:
        logger.warning(f"no thresholds pass at epsilon {epsilon}, alpha {alpha} on {len(halves[1])} sequences: "
                       f"writing thresholds of 0 (never exit early)")
        result = exit_policy.LayerThresholds(signal, (0.0,) * (model.decoder.num_layers - 1))
    else:
        result = candidates[chosen]
    details = {
        "epsilon": epsilon, "alpha": alpha, "split": split, "propose_sequences": len(halves[0]),
        "test_sequences": len(halves[1]), "rate": RATES[chosen] if chosen >= 0 else None,
        "test_risk": risks[chosen] if chosen >= 0 else 0.0,
        "tested": [{"rate": RATES[j], "risk": r, "p_value": hoeffding_p_value(r, len(losses[j]), epsilon)}
                   for j, r in enumerate(risks)],
    }
    return result, details


def main(argv=None):
    p = argparse.ArgumentParser(prog="elmer-calibrate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--path", required=True, help="hard-exit checkpoint file, or the --save-dir of its run")
    p.add_argument("--data", required=True, help="its binarized data folder")
    p.add_argument("--split", default="valid", help="calibration split (default: valid; never the test split)")
    p.add_argument("--epsilon", type=float, default=0.05,
                   help="the largest share of output tokens that may differ from the full-depth output (default 0.05)")
    p.add_argument("--alpha", type=float, default=0.1,
                   help="the guarantee holds with probability 1 - alpha (default 0.1)")
    p.add_argument("--signal", default="entropy", choices=exit_policy.SIGNALS,
                   help="uncertainty measure: entropy (nats; fused in the op) or max_prob (1 - top-1 probability)")
    p.add_argument("--out", help="thresholds file (default: exit_thresholds.json beside the checkpoint)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    args = p.parse_args(argv)
    logging.basicConfig(format="%(levelname)s | %(name)s | %(message)s", level=logging.INFO, force=True)
    from .hub import ELMER  # after argument parsing: --help should not wait for fairseq

    try:
        hub = ELMER.from_pretrained(args.path, data=args.data, device=args.device)
        model = hub.models[0]
        thresholds, details = calibrate(model, hub.task, args.split, args.epsilon, args.alpha, args.signal)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"elmer-calibrate: error: {e}")
    path = Path(args.path)
    out = Path(args.out) if args.out else (path if path.is_dir() else path.parent) / "exit_thresholds.json"
    thresholds.save(out, checkpoint=str(path), **details)
    print(f"wrote {out}: {thresholds.signal} thresholds {', '.join(f'{v:.4g}' for v in thresholds.values)} "
          f"(test-half risk {details['test_risk']:.4f} <= epsilon {args.epsilon} with probability >= "
          f"{1 - args.alpha:g}); decode with fairseq-generate --exit-thresholds {out}")


if __name__ == "__main__":
    main()
