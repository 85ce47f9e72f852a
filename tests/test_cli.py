"""The stock fairseq command line on tiny real data: train, resume, generate, and bad input."""
import re
import subprocess

import pytest
import torch

from conftest import BIN, ROOT, preprocess, run_cli, write_pairs

USER_DIR = ROOT / "elmer_fairseq"
TINY = ["--arch", "elmer_tiny", "--encoder-embed-dim", "32", "--encoder-ffn-embed-dim", "64",
        "--encoder-attention-heads", "2", "--decoder-attention-heads", "2", "--encoder-layers", "1",
        "--decoder-layers", "2"]


def train_args(data, save_dir, *extra, updates=4):
    return [data, "--user-dir", USER_DIR, "--task", "elmer_translation", *TINY,
            "--criterion", "elmer_loss", "--optimizer", "adam", "--lr", "1e-3", "--max-tokens", "2048",
            "--max-update", updates, "--max-target-length", "24", "--save-dir", save_dir,
            "--no-epoch-checkpoints", "--cpu", "--num-workers", "0", "--log-format", "simple",
            "--log-interval", "1", *extra]


def generate_args(data, checkpoint, *extra):
    return [data, "--user-dir", USER_DIR, "--task", "elmer_translation", "--path", checkpoint,
            "--gen-subset", "test", "--iter-decode-max-iter", "0", "--beam", "1", "--batch-size", "3",
            "--max-target-length", "24", "--cpu", *extra]


@pytest.fixture(scope="module")
def trained(xsum_tiny, tmp_path_factory):
    """A soft and a hard checkpoint, each trained a few updates by the real fairseq-train."""
    out = {}
    for mode in ("soft", "hard"):
        save = tmp_path_factory.mktemp(f"ckpt_{mode}")
        run_cli("fairseq-train", *train_args(xsum_tiny, save, "--exit-mode", mode))
        out[mode] = save / "checkpoint_last.pt"
    return out


def hypotheses(stdout):
    return {int(m.group(1)): m.group(2) for m in re.finditer(r"^H-(\d+)\t\S+\t?(.*)$", stdout, re.M)}


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_train_then_generate_every_test_sample(xsum_tiny, trained, mode):
    ckpt = trained[mode]
    # our checkpoints load with torch's safe default (run_cli drops TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD)
    state = torch.load(ckpt, map_location="cpu")
    assert state["cfg"]["model"].exit_mode == mode
    proc = run_cli("fairseq-generate", *generate_args(xsum_tiny, ckpt))
    hyps = hypotheses(proc.stdout)
    assert sorted(hyps) == list(range(8)), "every test sample is decoded exactly once"
    assert re.search(r"ELMER exit layers over [\d,]+ tokens: mean [\d.]+ of 2", proc.stdout)
    for sid in hyps:
        assert re.search(rf"^P-{sid}\t", proc.stdout, re.M) and re.search(rf"^T-{sid}\t", proc.stdout, re.M)


def test_hard_exit_threshold_moves_the_exit_layers(xsum_tiny, trained):
    def mean_exit(delta):
        proc = run_cli("fairseq-generate", *generate_args(xsum_tiny, trained["hard"], "--exit-threshold", delta))
        return float(re.search(r"mean ([\d.]+) of 2", proc.stdout).group(1))

    assert mean_exit(0) == 2.0
    assert mean_exit(1e6) == 1.0


def test_killed_training_resumes_from_its_last_checkpoint(xsum_tiny, tmp_path):
    run_cli("fairseq-train", *train_args(xsum_tiny, tmp_path, "--save-interval-updates", "2", updates=2))
    first = torch.load(tmp_path / "checkpoint_last.pt", map_location="cpu")
    assert first["optimizer_history"][-1]["num_updates"] == 2
    proc = run_cli("fairseq-train", *train_args(xsum_tiny, tmp_path, "--save-interval-updates", "2", updates=4))
    assert "Loaded checkpoint" in proc.stdout and "num_updates=3" in proc.stdout
    assert torch.load(tmp_path / "checkpoint_last.pt", map_location="cpu")["optimizer_history"][-1]["num_updates"] == 4


def expect_failure(tool, argv, *needles):
    proc = run_cli(tool, *argv, check=False)
    assert proc.returncode != 0
    tail = proc.stdout[-3000:]
    for needle in needles:
        assert needle in tail, f"{needle!r} not in the error output:\n{tail}"
    return tail


def test_unknown_exit_mode(xsum_tiny, tmp_path):
    expect_failure("fairseq-train", train_args(xsum_tiny, tmp_path, "--exit-mode", "medium"),
                   "--exit-mode must be one of soft, hard")


def test_negative_threshold(xsum_tiny, tmp_path):
    expect_failure("fairseq-train", train_args(xsum_tiny, tmp_path, "--exit-mode", "hard", "--exit-threshold", "-1"),
                   "--exit-threshold must be >= 0")


def test_threshold_with_soft_exit(xsum_tiny, trained):
    expect_failure("fairseq-generate", generate_args(xsum_tiny, trained["soft"], "--exit-threshold", "0.5"),
                   "--exit-threshold applies to hard exit only")


def test_generation_mode_must_match_the_checkpoint(xsum_tiny, trained):
    expect_failure("fairseq-generate", generate_args(xsum_tiny, trained["soft"], "--exit-mode", "hard"),
                   "does not match the checkpoint")


def test_iterative_decoding_is_refused(xsum_tiny, trained):
    argv = generate_args(xsum_tiny, trained["soft"])
    argv[argv.index("--iter-decode-max-iter") + 1] = "10"
    expect_failure("fairseq-generate", argv, "pass --iter-decode-max-iter 0")


def test_missing_user_dir(xsum_tiny, tmp_path):
    argv = train_args(xsum_tiny, tmp_path)
    del argv[1:3]
    expect_failure("fairseq-train", argv, "invalid choice: 'elmer_translation'")


def test_mismatched_source_and_target(tmp_path):
    write_pairs(tmp_path, "train", [("a b c", "a"), ("d e", "d")])
    write_pairs(tmp_path, "valid", [("a b", "b")])
    (tmp_path / "train.tgt").write_text("a\n", encoding="utf-8")  # one line short
    preprocess(tmp_path, tmp_path / "bin", splits=("train", "valid"))
    expect_failure("fairseq-train", train_args(tmp_path / "bin", tmp_path / "ck"),
                   "2 source lines", "1 target lines")


def test_empty_split(tmp_path):
    write_pairs(tmp_path, "train", [("a b c", "a")])
    write_pairs(tmp_path, "valid", [])
    preprocess(tmp_path, tmp_path / "bin", splits=("train", "valid"))
    expect_failure("fairseq-train", train_args(tmp_path / "bin", tmp_path / "ck"), "holds no examples")


def test_missing_binarized_split(xsum_tiny, tmp_path):
    expect_failure("fairseq-train", train_args(xsum_tiny, tmp_path, "--valid-subset", "nosuch"),
                   "no binarized nosuch split")


def test_source_longer_than_positions(xsum_tiny, tmp_path):
    expect_failure("fairseq-train", train_args(xsum_tiny, tmp_path, "--max-source-positions", "16"),
                   "longer than --max-source-positions 16", "--truncate-source")
    proc = run_cli("fairseq-train", *train_args(xsum_tiny, tmp_path, "--max-source-positions", "16",
                                               "--truncate-source", updates=1))
    assert "are cut to --max-source-positions 16" in proc.stdout


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_python_api_returns_what_fairseq_generate_returns(xsum_tiny, trained, mode):
    from elmer_fairseq import ELMER

    proc = run_cli("fairseq-generate", *generate_args(xsum_tiny, trained[mode]))
    expected = hypotheses(proc.stdout)
    model = ELMER.from_pretrained(trained[mode].parent, data=xsum_tiny, device="cpu")
    sources = (xsum_tiny.parent / "test.src").read_text(encoding="utf-8").splitlines()
    for batch_size in (1, 3):
        assert model.generate(sources, batch_size=batch_size) == [expected[i] for i in range(len(sources))]
    details = model.generate(sources[:2], return_details=True)
    assert details[0]["exit_layers"].shape == details[0]["tokens"].shape
    with pytest.raises(ValueError, match="fine-tuned with"):
        model.generate(sources, exit_mode="hard" if mode == "soft" else "soft")


def test_elmer_generate_reads_raw_lines_and_writes_text(xsum_tiny, trained, tmp_path):
    proc = run_cli("fairseq-generate", *generate_args(xsum_tiny, trained["soft"]))
    expected = hypotheses(proc.stdout)
    sources = xsum_tiny.parent / "test.src"
    out = subprocess.run([str(BIN / "elmer-generate"), "--path", str(trained["soft"]), "--data", str(xsum_tiny),
                          "--input", str(sources), "--batch-size", "3", "--device", "cpu"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == [expected[i] for i in range(8)]  # logs and progress go to stderr


@pytest.mark.parametrize("content,message", [(b"a b\n\nc\n", ":2: empty input line"),
                                             (b"a b\n\xff\xfe\n", ":2: not UTF-8")])
def test_elmer_generate_names_the_bad_line(xsum_tiny, trained, tmp_path, content, message):
    bad = tmp_path / "in.txt"
    bad.write_bytes(content)
    expect_failure("elmer-generate", ["--path", trained["soft"], "--data", xsum_tiny, "--input", bad], f"in.txt{message}")
