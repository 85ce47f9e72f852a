"""examples/benchmark.py --warm-start: every system fine-tunes from one elmer-convert output (a tiny
random BERT converted with --for, nothing downloaded) on data tokenized with its uncased
WordPiece, is decoded to text with that WordPiece and scored against lowercased references."""
import csv
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, XSUM_TINY, cli_env, run_cli
from elmer_fairseq.bpe import TokenizerVocab
from test_convert import tiny_bert

BASELINES = ("transformer", "cmlm_transformer", "levenshtein_transformer")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(prepared data folder, elmer-convert output) as docs/converting.md makes them, at test size."""
    root = tmp_path_factory.mktemp("warm")
    # 2 layers, d = 32, an uncased WordPiece tokenizer.json; positions for 255 target tokens, the
    # length fairseq's LevT may insert up to (positions past the table fail with an IndexError)
    tiny_bert(root / "hf", positions=300)
    data = root / "data"
    subprocess.run([sys.executable, ROOT / "examples" / "xsum" / "prepare.py", "--input", XSUM_TINY, "--out", data,
                    "--tokenizer", root / "hf" / "tokenizer.json", "--trim-vocab", "--valid", "4", "--test", "4",
                    "--max-source-tokens", "60", "--max-target-tokens", "16", "--workers", "1"],
                   check=True, capture_output=True, env=cli_env())
    run_cli("elmer-convert", root / "hf", root / "ckpt", "--dict", data / "dict.txt", "--for", *BASELINES)
    return data, root / "ckpt"


def warm_benchmark(data, ckpt, out, *systems, wordnet, extra=()):
    cmd = [sys.executable, ROOT / "examples" / "benchmark.py", "--data", data / "bin", "--out", out, "--device", "cpu",
           "--warm-start", ckpt, "--systems", *systems, "--max-target-length", "16", "--updates", "2", "--warmup", "1",
           "--max-tokens", "1024", "--warmup-samples", "1", "--show", "2", "--wordnet", wordnet, *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_every_system_fine_tunes_from_the_converted_weights(converted, tmp_path, wordnet):
    data, ckpt = converted
    out = tmp_path / "warm"
    proc = warm_benchmark(data, ckpt, out, "transformer", "elmer-soft", "elmer-hard", "cmlm", "levt", wordnet=wordnet,
                          extra=("--deltas", "0", "100"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["system"]: r for r in csv.DictReader((out / "results.csv").open())}
    assert list(rows) == ["Transformer (AR, greedy)", "Transformer (AR, beam 4)", "ELMER-Soft",
                          "ELMER-Soft, --length-cut 2", "ELMER-Soft, oracle T (authors' test protocol)",
                          "ELMER-Hard (delta=0.5)", "ELMER-Hard (delta=0.5), --length-cut 2", "CMLM (0 it.)",
                          "CMLM (10 it.)", "LevT"]
    assert not [r["error"] for r in rows.values() if r["error"]]
    # the converted weights are soft exit's (with the fuse W); hard exit fine-tunes from them without it
    assert "not loading the checkpoint's soft-exit fuse" in (out / "logs" / "train-elmer-hard.log").read_text()
    for name, weights in [("transformer", "transformer.pt"), ("elmer-soft", "model.pt"), ("elmer-hard", "model.pt"),
                          ("cmlm", "cmlm_transformer.pt"), ("levt", "levenshtein_transformer.pt")]:
        assert f"loading pretrained model from {ckpt / weights}" in (out / "logs" / f"train-{name}.log").read_text()
        model = torch.load(out / "checkpoints" / name / "checkpoint_last.pt", weights_only=False)["cfg"]["model"]
        assert (model.encoder_layers, model.decoder_layers, model.encoder_embed_dim) == (2, 2, 32)  # the BERT's size
    header = (out / "results.md").read_text().splitlines()[0]
    assert f"warm-started from {ckpt}, 2+2 layers, d=32" in header
    assert "references lowercased for scoring" in header  # the tiny BERT's tokenizer is uncased
    # decoded with the data's WordPiece: D- lines are the H- lines' pieces joined into words
    generated = (out / "logs" / "gen-ELMER-Soft.txt").read_text()
    assert "'bpe': {'_name': 'wordpiece'" in generated
    pieces = dict(re.findall(r"^H-(\d+)\t\S+\t(.*)$", generated, re.M))
    texts = dict(re.findall(r"^D-(\d+)\t\S+\t(.*)$", generated, re.M))
    vocab = TokenizerVocab(data / "tokenizer.json")
    assert len(texts) == 4 and all(texts[i] == vocab.detokenize(pieces[i].split()) for i in texts)

def refusal(data, warm, out, *options):
    """The benchmark's last stderr line for options it must refuse before it writes anything."""
    cmd = [sys.executable, ROOT / "examples" / "benchmark.py", "--data", data / "bin", "--warm-start", warm,
           "--out", out, *options]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    return proc.stderr.splitlines()[-1]


def test_warm_start_refuses_what_it_cannot_run(converted, tmp_path):
    data, ckpt = converted
    assert refusal(data, ckpt, tmp_path / "out", "--systems", "elmer-soft", "--layers", "2").endswith(
        "--layers: with --warm-start every system has the converted model's size")
    assert refusal(data, ckpt, tmp_path / "out", "--systems", "elmer-soft-lplm") == (
        "--warm-start: not with elmer-soft-lplm, which starts from its own pretraining")
    partial = tmp_path / "converted-for-elmer-only"
    partial.mkdir()
    (partial / "model.pt").symlink_to(ckpt / "model.pt")
    assert refusal(data, partial, tmp_path / "out", "--systems", "elmer-soft", "levt") == (
        f"--warm-start {partial}: no levenshtein_transformer.pt for levt (elmer-convert --for ...)")
    (partial / "dict.txt").write_text("other 1\nwords 1\n", encoding="utf-8")
    assert refusal(data, partial, tmp_path / "out", "--systems", "elmer-soft") == (
        f"--warm-start {partial}: --data {data / 'bin'} was binarized with another vocabulary than {partial / 'dict.txt'} "
        f"(examples/TASK/prepare.py --dict {partial / 'dict.txt'})")
    assert not (tmp_path / "out").exists()


def test_elmer_from_fine_tunes_elmer_from_a_checkpoint_and_refuses_what_is_not_one(converted, tmp_path, wordnet):
    data, ckpt = converted
    trained = tmp_path / "stage-one.pt"  # any ELMER checkpoint of the converted model's vocabulary
    trained.write_bytes((ckpt / "model.pt").read_bytes())
    out = tmp_path / "two-stage"
    proc = warm_benchmark(data, ckpt, out, "elmer-soft", wordnet=wordnet,
                          extra=("--elmer-from", trained, "--elmer-options=--output-loss ctc"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (out / "logs" / "train-elmer-soft.log").read_text()
    assert f"loading pretrained model from {trained}" in log and "output_loss='ctc'" in log
    assert f"ELMER fine-tuned from {trained}" in (out / "results.md").read_text().splitlines()[0]

    assert refusal(data, ckpt, tmp_path / "out", "--systems", "elmer-soft", "--elmer-from", tmp_path / "none.pt") == (
        f"--elmer-from {tmp_path / 'none.pt'}: no such checkpoint")
    assert refusal(data, ckpt, tmp_path / "out", "--systems", "elmer-soft", "--elmer-from", ckpt / "transformer.pt") == (
        f"--elmer-from {ckpt / 'transformer.pt'}: a translation checkpoint; it takes an ELMER fine-tuned with "
        f"--task elmer_translation")
    cold = subprocess.run([sys.executable, ROOT / "examples" / "benchmark.py", "--data", data / "bin",
                           "--elmer-from", trained, "--out", tmp_path / "out"], capture_output=True, text=True)
    assert cold.returncode != 0 and cold.stderr.splitlines()[-1].endswith(
        "--elmer-from: only with --warm-start (the baselines' weights and the vocabulary come from there)")
    assert not (tmp_path / "out").exists()
