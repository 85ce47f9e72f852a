"""Shared fixtures: a tiny ELMER built through fairseq's own registries, and tiny real data."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import elmer_fairseq  # noqa: F401  (registers the task, model and criterion)
from fairseq import options, tasks

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
XSUM_TINY = ROOT / "tests" / "data" / "xsum-tiny.jsonl"


def tiny_model(data_dir, exit_mode="soft", exit_threshold=None, per_layer=False, layers=3):
    """A 3-layer ELMER with fairseq's defaults for elmer_tiny, in eval mode, fixed seed."""
    parser = options.get_training_parser()
    argv = [str(data_dir), "--user-dir", str(ROOT / "elmer_fairseq"), "--task", "elmer_translation",
            "--arch", "elmer_tiny", "--exit-mode", exit_mode, "--max-target-length", "12",
            "--encoder-embed-dim", "32", "--encoder-ffn-embed-dim", "64", "--encoder-attention-heads", "2",
            "--decoder-attention-heads", "2", "--encoder-layers", "2", "--decoder-layers", str(layers),
            "--dropout", "0", "--cpu"]
    if exit_threshold is not None:
        argv += ["--exit-threshold", str(exit_threshold)]
    if per_layer:
        argv.append("--per-layer-off-ramps")
    args = options.parse_args_and_arch(parser, argv)
    torch.manual_seed(0)
    task = tasks.setup_task(args)
    model = task.build_model(args)
    return task, model.eval()


def write_pairs(folder: Path, split: str, pairs):
    (folder / f"{split}.src").write_text("".join(d + "\n" for d, _ in pairs), encoding="utf-8")
    (folder / f"{split}.tgt").write_text("".join(s + "\n" for _, s in pairs), encoding="utf-8")


def preprocess(raw: Path, dest: Path, splits=("train", "valid", "test")):
    cmd = [str(BIN / "fairseq-preprocess"), "--source-lang", "src", "--target-lang", "tgt",
           "--joined-dictionary", "--destdir", str(dest), "--workers", "1"]
    for split in splits:
        cmd += [f"--{split}pref", str(raw / split)]
    subprocess.run(cmd, check=True, capture_output=True)


@pytest.fixture(scope="session")
def xsum_tiny(tmp_path_factory):
    """Real XSum pairs (tests/data), whitespace-tokenized and binarized: 32 train, 8 valid, 8 test."""
    raw = tmp_path_factory.mktemp("xsum_raw")
    rows = [json.loads(line) for line in XSUM_TINY.read_text(encoding="utf-8").splitlines()]
    pairs = [(r["document"].lower(), r["summary"].lower()) for r in rows]
    for split, part in (("train", pairs[:32]), ("valid", pairs[32:40]), ("test", pairs[40:48])):
        write_pairs(raw, split, part)
    dest = raw / "bin"
    preprocess(raw, dest)
    return dest


def run_cli(tool: str, *argv, check=True, env=None):
    """Runs a real fairseq console script; returns the CompletedProcess (stdout+stderr merged)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    full_env.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)  # our checkpoints must load safely
    proc = subprocess.run([str(BIN / tool), *map(str, argv)], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, env=full_env, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"{tool} failed ({proc.returncode}):\n{proc.stdout[-4000:]}")
    return proc


def sample_batch(task, split="test", size=4):
    task.load_dataset(split)
    dataset = task.dataset(split)
    return dataset.collater([dataset[i] for i in range(size)])
