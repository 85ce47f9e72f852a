"""Python API: load a fine-tuned ELMER checkpoint and generate from raw text.

    from elmer_fairseq import ELMER
    model = ELMER.from_pretrained("checkpoints/demo-soft/checkpoint_last.pt",
                                  data="data/xsum/bin", bpe_dir="data/xsum")
    model.generate(["An article ...", "Another article ..."], batch_size=16)
"""
import logging
import os
from pathlib import Path
from typing import Dict, List, Optional, Union

import torch
from fairseq import hub_utils, utils
from fairseq.hub_utils import GeneratorHubInterface
from omegaconf import open_dict

from .generator import ElmerGenerator
from . import exit_policy

logger = logging.getLogger(__name__)


class ELMER(GeneratorHubInterface):
    """fairseq's hub interface with ELMER's one-pass generator (BPE applied and removed inside)."""

    @classmethod
    def from_pretrained(cls, checkpoint: Union[str, Path], data: Union[str, Path], bpe_dir: Optional[Union[str, Path]] = None,
                        device: Optional[str] = None, **overrides) -> "ELMER":
        """checkpoint: a .pt file written by fairseq-train, or its --save-dir; data: the binarized data folder (for its
        dictionary); bpe_dir: the folder with vocab.json and merges.txt of `--bpe byte_bpe_ids`, or with the
        tokenizer.json of a converted checkpoint (`--bpe wordpiece`; or that file itself)
        (None: inputs are already space-separated dictionary symbols)."""
        checkpoint = Path(checkpoint)
        if checkpoint.is_dir():  # a --save-dir: its best checkpoint, else its last
            checkpoint = next((checkpoint / f for f in ("checkpoint_best.pt", "checkpoint_last.pt")
                               if (checkpoint / f).is_file()), checkpoint / "checkpoint_best.pt")
        if not checkpoint.is_file():
            raise FileNotFoundError(f"checkpoint {checkpoint} not found")
        if not Path(data).is_dir():  # fairseq would go on with no data folder and fail obscurely
            raise FileNotFoundError(f"data folder {data} not found: pass the binarized data folder "
                                    f"(fairseq-preprocess --destdir) the model was trained on")
        if bpe_dir is not None:
            tokenizer = Path(bpe_dir) if Path(bpe_dir).is_file() else Path(bpe_dir) / "tokenizer.json"
            if tokenizer.is_file():  # examples/TASK/prepare.py --tokenizer copies it beside the data
                overrides.update(bpe="wordpiece", wordpiece_tokenizer=str(tokenizer))
            else:
                overrides.update(bpe="byte_bpe_ids", bpe_vocab=str(Path(bpe_dir) / "vocab.json"),
                                 bpe_merges=str(Path(bpe_dir) / "merges.txt"))
        loaded = hub_utils.from_pretrained(
            str(checkpoint.parent), checkpoint_file=checkpoint.name, data_name_or_path=str(Path(data).resolve()),
            user_dir=os.path.dirname(os.path.abspath(__file__)), **overrides)
        if loaded["args"].task._name != "elmer_translation":
            raise ValueError(f"{checkpoint} was trained with --task {loaded['args'].task._name}, "
                             f"not a fine-tuned ELMER (elmer_translation)")
        model = cls(loaded["args"], loaded["task"], loaded["models"])
        return model.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()

    @property
    def exit_mode(self) -> str:
        return self.models[0].decoder.exit_mode

    def truncate(self, tokens: torch.Tensor, name: str) -> torch.Tensor:
        """Cuts an input longer than the encoder's positions (keeping its EOS), with a warning."""
        limit = self.max_positions[0] if isinstance(self.max_positions, tuple) else self.max_positions
        if limit is None or tokens.numel() <= limit:
            return tokens
        logger.warning(f"{name}: {tokens.numel()} tokens, cut to the model's {limit} source positions")
        return torch.cat([tokens[: limit - 1], tokens[-1:]])

    @torch.no_grad()
    def generate(self, sentences: List[str], exit_mode: Optional[str] = None, exit_threshold: Optional[float] = None,
                 batch_size: int = 32, return_details: bool = False, exit_thresholds=None,
                 names: Optional[List[str]] = None, length_cut: Optional[int] = None,
                 shortlist: Optional[int] = None, ramp_precision: str = "fp32",
                 max_exit_layer: Optional[int] = None) -> Union[List[str], List[Dict]]:
        """Raw strings in, generated strings out (in input order), one decoder pass per batch.

        exit_mode must be the checkpoint's (or None); exit_threshold is hard exit's delta (default:
        the checkpoint's); exit_thresholds, instead of it, a file of calibrated per-layer thresholds
        (elmer-calibrate).
        With return_details, each result is a dict: text, tokens, exit_layers and scores (per output
        token), position_exit_layers and position_tokens (per decoder position, what it wrote: with CTC,
        blanks and merged repeats too; past the EOS too)).
        names: what errors and warnings call each input (default "input i", 0-based).
        length_cut: a margin: the decoder's upper layers run on the positions layer 1 says the
        outputs need plus it (None: all T positions, the paper's; see ElmerDecoder.decode).
        shortlist: K, soft exit: the middle off-ramps score layer 1's K most likely tokens per
        position only (None: the whole vocabulary, the paper's; see ElmerDecoder.decode).
        ramp_precision: "fp32" (the paper's) or "bf16": the off-ramps' products in bf16 (see ElmerDecoder.decode).
        max_exit_layer: K: decoder layers 1..K only, every position exits by K (None: all L, the paper's).
        """
        if isinstance(sentences, str):
            raise TypeError("generate takes a list of strings")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        policy = exit_policy.for_decoding(self.models[0].decoder, exit_mode, exit_threshold, exit_thresholds)
        names = names or [f"input {i}" for i in range(len(sentences))]
        if len(names) != len(sentences):
            raise ValueError(f"{len(names)} names for {len(sentences)} inputs")
        blank = [name for name, s in zip(names, sentences) if not s.strip()]
        if blank:  # the model would still write something for it
            raise ValueError(f"{blank[0]}: empty input ({len(blank)} of the {len(sentences)} inputs are empty)")
        generator = ElmerGenerator(self.tgt_dict, self.task.cfg.max_target_length, policy.threshold, summary=False,
                                   length_cut=length_cut, shortlist=shortlist, ramp_precision=ramp_precision,
                                   max_exit_layer=max_exit_layer)
        tokens = [self.truncate(self.encode(s), name) for name, s in zip(names, sentences)]
        with open_dict(self.cfg):
            self.cfg.dataset.batch_size, self.cfg.dataset.max_tokens = batch_size, None
        results = {}
        for batch in self._build_batches(tokens, skip_invalid_size_inputs=False):
            batch = utils.apply_to_sample(lambda t: t.to(self.device), batch)
            for sid, hypos in zip(batch["id"].tolist(), generator.generate(self.models, batch)):
                results[sid] = hypos[0]
        out = []
        for i in range(len(sentences)):
            hypo = results[i]
            text = self.decode(hypo["tokens"])
            out.append(text if not return_details else {
                "text": text, "tokens": hypo["tokens"].cpu(), "exit_layers": hypo["exit_layers"].cpu(),
                "scores": hypo["positional_scores"].cpu(), "position_exit_layers": hypo["position_exit_layers"].cpu(),
                "position_tokens": hypo["position_tokens"].cpu()})
        return out
