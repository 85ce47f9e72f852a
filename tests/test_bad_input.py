"""Bad input: each test feeds one wrong thing (an option, a data file, a checkpoint, a raw line)
and expects a message that names it and says what was expected, with no data lost. The real
console scripts run where the mistake is made on a command line. More cases for pretraining
(--mask, --lplm-permutations, --lplm-chunk, empty documents, long sentences): tests/test_lplm.py."""
import datetime
import logging
import re
import shutil
import subprocess

import pytest
import torch
from fairseq import options

from conftest import (BIN, USER_DIR, cli_env, expect_failure, generate_args, hypotheses, preprocess, run_cli,
                      setup_task, train_args, update_losses, write_pairs)


# ---------------------------------------------------------------- options


@pytest.mark.parametrize("extra, message", [
    (["--exit-mode", "medium"], "--exit-mode must be one of soft, hard"),
    (["--exit-mode", "hard", "--exit-threshold", "-1"], "--exit-threshold must be >= 0"),
    (["--valid-subset", "nosuch"], "no binarized nosuch split"),
])
def test_fairseq_train_refuses(xsum_tiny, tmp_path, extra, message):
    expect_failure("fairseq-train", train_args(xsum_tiny, tmp_path, *extra), message)
    assert not list(tmp_path.iterdir()), "nothing written"


@pytest.mark.parametrize("extra, message", [
    (["--exit-threshold", "0.5"], "--exit-threshold applies to hard exit only"),
    (["--exit-mode", "hard"], "does not match the checkpoint"),
    (["--iter-decode-max-iter", "5"], "pass --iter-decode-max-iter 0"),
    (["--beam", "4"], "--beam 4: ELMER has no beam search"),
    (["--gen-subset", "nosuch"], "no binarized nosuch split"),
])
def test_fairseq_generate_refuses(xsum_tiny, trained, extra, message):
    expect_failure("fairseq-generate", generate_args(xsum_tiny, trained["soft"], *extra), message)


def test_missing_user_dir(xsum_tiny, tmp_path):
    argv = train_args(xsum_tiny, tmp_path)
    del argv[1:3]
    expect_failure("fairseq-train", argv, "invalid choice: 'elmer_translation'")


def test_exit_threshold_must_be_a_number(xsum_tiny, capsys):
    argv = [str(xsum_tiny), "--user-dir", str(USER_DIR), "--task", "elmer_translation", "--exit-threshold", "abc"]
    with pytest.raises(SystemExit):
        options.parse_args_and_arch(options.get_generation_parser(), argv)
    assert "argument --exit-threshold: invalid float value: 'abc'" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--max-target-length", "0"], "--max-target-length must be >= 1, got 0"),
    (["--max-target-length", "-3"], "--max-target-length must be >= 1, got -3"),
    (["--max-target-length", "2000"], "--max-target-length 2000 exceeds --max-target-positions 1024"),
])
def test_bad_target_length(xsum_tiny, extra, message):
    with pytest.raises(ValueError, match=message):
        setup_task(xsum_tiny, *extra)


@pytest.mark.parametrize("task", ["elmer_translation", "elmer_lplm"])
def test_another_architecture_is_refused(xsum_tiny, tmp_path, task):
    data = xsum_tiny
    if task == "elmer_lplm":  # its data folder needs only dict.txt before the first batch
        data = tmp_path
        shutil.copy(xsum_tiny / "dict.src.txt", data / "dict.txt")
    args, task = setup_task(data, "--arch", "transformer", task=task)
    with pytest.raises(ValueError, match=r"TransformerModel \(--arch transformer\), not an ELMER model"):
        task.build_model(args)


@pytest.mark.parametrize("extra, message", [
    (["--poisson-lambda", "0"], "--poisson-lambda must be > 0, got 0.0"),
    (["--sample-break-mode", "eos"], "--sample-break-mode eos makes every sentence a document"),
])
def test_bad_pretraining_options(xsum_tiny, tmp_path, extra, message):
    shutil.copy(xsum_tiny / "dict.src.txt", tmp_path / "dict.txt")
    with pytest.raises(ValueError, match=message):
        setup_task(tmp_path, *extra, task="elmer_lplm")


# ---------------------------------------------------------------- data


def test_missing_data_folder(tmp_path):
    expect_failure("fairseq-train", train_args(tmp_path / "nosuch", tmp_path / "ck"),
                   f"data folder {tmp_path / 'nosuch'} not found", "--destdir of fairseq-preprocess")


def test_missing_data_folder_for_the_python_api(trained, tmp_path):
    from elmer_fairseq import ELMER

    with pytest.raises(FileNotFoundError, match=re.escape(f"data folder {tmp_path / 'nosuch'} not found")):
        ELMER.from_pretrained(trained["soft"], data=tmp_path / "nosuch", device="cpu")


def test_raw_text_instead_of_binarized_data(xsum_tiny):
    with pytest.raises(FileNotFoundError, match="holds no binarized splits"):
        setup_task(xsum_tiny.parent)  # the raw train.src, train.tgt, ...


def test_missing_dictionary(xsum_tiny, tmp_path):
    data = shutil.copytree(xsum_tiny, tmp_path / "bin")
    (data / "dict.tgt.txt").unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(f"dictionary {data / 'dict.tgt.txt'} not found")):
        setup_task(data)


def test_malformed_dictionary_line(xsum_tiny, tmp_path):
    data = shutil.copytree(xsum_tiny, tmp_path / "bin")
    lines = (data / "dict.src.txt").read_text(encoding="utf-8").splitlines()
    lines[5] = "a-word-without-a-count"
    (data / "dict.src.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    message = f"{data / 'dict.src.txt'}: Incorrect dictionary format, expected '<token> <cnt> [flags]': \"a-word"
    with pytest.raises(ValueError, match=re.escape(message)):
        setup_task(data)


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


def test_empty_lines_in_the_data_are_named(tmp_path, caplog):
    write_pairs(tmp_path, "train", [("a b c", "a"), ("", "d"), ("d e", "")])
    preprocess(tmp_path, tmp_path / "bin", splits=("train",))
    _, task = setup_task(tmp_path / "bin")
    with caplog.at_level(logging.WARNING):
        task.load_dataset("train")
    assert "train: 1 of 3 sources are empty (raw line 2)" in caplog.text
    assert "train: 1 of 3 targets are empty (raw line 3)" in caplog.text
    assert len(task.dataset("train")) == 3


def test_source_longer_than_positions(xsum_tiny, tmp_path):
    expect_failure("fairseq-train", train_args(xsum_tiny, tmp_path, "--max-source-positions", "16"),
                   "longer than --max-source-positions 16", "--truncate-source")
    proc = run_cli("fairseq-train", *train_args(xsum_tiny, tmp_path, "--max-source-positions", "16",
                                               "--truncate-source", updates=1))
    assert "are cut to --max-source-positions 16" in proc.stdout


# ---------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def transformer(xsum_tiny, tmp_path_factory):
    """A stock fairseq `transformer` checkpoint (--task translation) on the same data."""
    save = tmp_path_factory.mktemp("transformer")
    run_cli("fairseq-train", xsum_tiny, "--task", "translation", "--arch", "transformer", "--share-all-embeddings",
            "--encoder-embed-dim", "32", "--decoder-embed-dim", "32", "--encoder-ffn-embed-dim", "64",
            "--decoder-ffn-embed-dim", "64", "--encoder-attention-heads", "2", "--decoder-attention-heads", "2",
            "--encoder-layers", "1", "--decoder-layers", "1", "--optimizer", "adam", "--lr", "1e-3",
            "--max-tokens", "2048", "--max-update", "1", "--save-dir", save, "--no-epoch-checkpoints",
            "--disable-validation", "--cpu", "--num-workers", "0")
    return save / "checkpoint_last.pt"


def test_transformer_checkpoint_to_fairseq_generate(xsum_tiny, transformer):
    expect_failure("fairseq-generate", generate_args(xsum_tiny, transformer),
                   "TransformerModel (--arch transformer), not an ELMER model")


def test_transformer_checkpoint_to_the_python_api(xsum_tiny, transformer):
    from elmer_fairseq import ELMER

    with pytest.raises(ValueError, match="trained with --task translation, not a fine-tuned ELMER"):
        ELMER.from_pretrained(transformer, data=xsum_tiny, device="cpu")


def test_transformer_checkpoint_to_elmer_generate(xsum_tiny, transformer, tmp_path):
    (tmp_path / "in.txt").write_text("a line\n", encoding="utf-8")
    expect_failure("elmer-generate", ["--path", transformer, "--data", xsum_tiny, "--input", tmp_path / "in.txt"],
                   "trained with --task translation, not a fine-tuned ELMER")


def test_pretrained_checkpoint_to_fairseq_generate(xsum_tiny, trained, tmp_path):
    state = torch.load(trained["soft"], map_location="cpu")
    state["cfg"]["model"].exit_mode = "lplm"  # what --task elmer_lplm writes: no exit policy, no soft-exit W
    state["cfg"]["model"].gold_mix_prob = 0.0  # nothing fused, nothing mixed
    del state["model"]["decoder.soft_exit.weight"]
    torch.save(state, tmp_path / "lplm.pt")
    expect_failure("fairseq-generate", generate_args(xsum_tiny, tmp_path / "lplm.pt"),
                   "pretrained (--task elmer_lplm); fine-tune it before decoding")


def damaged(source, dest, how):
    data = source.read_bytes()
    dest.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "garbage": bytes(range(256)) * 16}[how])
    return dest


@pytest.mark.parametrize("how", ["truncated", "empty", "garbage"])
def test_damaged_checkpoint_to_the_python_api(xsum_tiny, trained, tmp_path, how):
    from elmer_fairseq import ELMER

    bad = damaged(trained["soft"], tmp_path / "checkpoint_last.pt", how)
    message = re.escape(f"checkpoint {bad} is truncated or corrupt") + ".*use another checkpoint"
    with pytest.raises(RuntimeError, match=message):
        ELMER.from_pretrained(bad, data=xsum_tiny, device="cpu")


def test_truncated_checkpoint_to_fairseq_generate(xsum_tiny, trained, tmp_path):
    bad = damaged(trained["soft"], tmp_path / "checkpoint_last.pt", "truncated")
    expect_failure("fairseq-generate", generate_args(xsum_tiny, bad), f"checkpoint {bad} is truncated or corrupt")


def test_resuming_from_a_truncated_checkpoint(xsum_tiny, trained, tmp_path):
    bad = damaged(trained["soft"], tmp_path / "checkpoint_last.pt", "truncated")
    size = bad.stat().st_size
    expect_failure("fairseq-train", train_args(xsum_tiny, tmp_path),
                   f"checkpoint {bad} is truncated or corrupt", "--restore-file")
    assert bad.stat().st_size == size, "the checkpoint is left as it was"


def test_checkpoint_with_an_object_outside_the_allow_list(xsum_tiny, trained, tmp_path):
    state = torch.load(trained["soft"], map_location="cpu")
    state["extra_state"]["saved_on"] = datetime.date(2026, 11, 25)
    torch.save(state, tmp_path / "dated.pt")
    output = expect_failure("fairseq-generate", generate_args(xsum_tiny, tmp_path / "dated.pt"),
                            "safe loading does not allow: datetime.date", "If you trust the file",
                            "ELMER_TRUSTED_GLOBALS=datetime.date", "elmer_fairseq.checkpoint.trust('datetime.date')")
    assert "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD" not in output and "weights_only=False" not in output
    # the documented way out: allow exactly that class, with safe loading still on
    proc = run_cli("fairseq-generate", *generate_args(xsum_tiny, tmp_path / "dated.pt"),
                   env={"ELMER_TRUSTED_GLOBALS": "datetime.date"})
    assert len(hypotheses(proc.stdout)) == 8


def test_data_of_another_vocabulary_than_the_checkpoints(xsum_tiny, trained, tmp_path):
    """Fine-tuning or decoding a checkpoint on data binarized with another dictionary: the sizes
    that differ and what to do, with the checkpoint's path (fairseq names it for fine-tuning)."""
    raw = tmp_path / "raw"
    raw.mkdir()
    for split in ("train", "valid", "test"):
        write_pairs(raw, split, [("a few other words here .", "other words ."), ("more text , new words", "new")])
    preprocess(raw, raw / "bin")
    message = "the data was binarized with another vocabulary than the checkpoint's"
    expect_failure("fairseq-train", train_args(raw / "bin", tmp_path / "save", "--finetune-from-model", trained["soft"]),
                   "the checkpoint's word embedding has", message, f"from checkpoint {trained['soft']}")
    expect_failure("fairseq-generate", generate_args(raw / "bin", trained["soft"]), message)


@pytest.mark.parametrize("name", ["date", "nosuchmodule.Date", "datetime.nosuch"])
def test_trusting_a_name_that_is_not_importable(name):
    from elmer_fairseq.checkpoint import trust

    with pytest.raises(ValueError, match=f"cannot trust '{name}' .*not an importable module.Name"):
        trust(name)


# ---------------------------------------------------------------- raw text in


@pytest.fixture(scope="module")
def model(xsum_tiny, trained):
    from elmer_fairseq import ELMER

    return ELMER.from_pretrained(trained["soft"], data=xsum_tiny, device="cpu")


def test_no_inputs_give_no_outputs(model):
    assert model.generate([]) == []


def test_an_empty_input_is_named(model):
    with pytest.raises(ValueError, match=r"input 1: empty input \(1 of the 3 inputs are empty\)"):
        model.generate(["a line", "  ", "another line"])


@pytest.mark.parametrize("batch_size", [0, -1])
def test_batch_size_below_one(model, batch_size):
    with pytest.raises(ValueError, match=f"batch_size must be >= 1, got {batch_size}"):
        model.generate(["a line"], batch_size=batch_size)


def test_an_input_longer_than_the_positions_is_cut_with_a_warning(model, caplog):
    with caplog.at_level(logging.WARNING):
        out = model.generate(["a line", "the " * 2000])
    assert len(out) == 2
    assert "input 1: 2001 tokens, cut to the model's 1024 source positions" in caplog.text


def test_missing_bpe_files(xsum_tiny, trained, tmp_path):
    from elmer_fairseq import ELMER

    with pytest.raises(FileNotFoundError, match=re.escape(f"--bpe-vocab {tmp_path / 'vocab.json'}: no such file")):
        ELMER.from_pretrained(trained["soft"], data=xsum_tiny, bpe_dir=tmp_path, device="cpu")


@pytest.mark.parametrize("content, message", [(b"a b\n\nc\n", "in.txt:2: empty input line"),
                                              (b"a b\n\xff\xfe\n", "in.txt:2: not UTF-8")])
def test_elmer_generate_names_the_bad_line(xsum_tiny, trained, tmp_path, content, message):
    bad = tmp_path / "in.txt"
    bad.write_bytes(content)
    expect_failure("elmer-generate", ["--path", trained["soft"], "--data", xsum_tiny, "--input", bad], message)


def test_elmer_generate_on_an_empty_file(xsum_tiny, trained, tmp_path):
    (tmp_path / "in.txt").write_bytes(b"")
    out = subprocess.run([str(BIN / "elmer-generate"), "--path", str(trained["soft"]), "--data", str(xsum_tiny),
                          "--input", str(tmp_path / "in.txt")], capture_output=True, text=True, env=cli_env())
    assert out.returncode == 0 and out.stdout == ""
    assert f"{tmp_path / 'in.txt'} holds no input lines; nothing to do" in out.stderr


def test_elmer_generate_names_a_line_it_cuts(xsum_tiny, trained, tmp_path):
    (tmp_path / "in.txt").write_text("a line\n" + "the " * 2000 + "\n", encoding="utf-8")
    out = subprocess.run([str(BIN / "elmer-generate"), "--path", str(trained["soft"]), "--data", str(xsum_tiny),
                          "--input", str(tmp_path / "in.txt"), "--device", "cpu"],
                         capture_output=True, text=True, env=cli_env(), check=True)
    assert len(out.stdout.splitlines()) == 2
    assert f"{tmp_path / 'in.txt'}:2: 2001 tokens, cut to the model's 1024 source positions" in out.stderr


def test_elmer_generate_batch_size_below_one(xsum_tiny, trained):
    expect_failure("elmer-generate", ["--path", trained["soft"], "--data", xsum_tiny, "--batch-size", "0"],
                   "argument --batch-size: must be >= 1, got 0")


@pytest.mark.parametrize("truncate", [False, True])
def test_fairseq_interactive_input_longer_than_the_positions(xsum_tiny, trained, truncate):
    argv = [xsum_tiny, "--user-dir", USER_DIR, "--task", "elmer_translation", "--path", trained["soft"],
            "--iter-decode-max-iter", "0", "--beam", "1", "--max-target-length", "24", "--cpu",
            "--max-source-positions", "16", *(["--truncate-source"] if truncate else [])]
    proc = run_cli("fairseq-interactive", *argv, check=truncate, stdin="a line\n" + "the " * 20 + "\n")
    if truncate:
        assert "an input of 21 tokens is cut to --max-source-positions 16 (--truncate-source)" in proc.stdout
        assert sorted(hypotheses(proc.stdout)) == [0, 1]
    else:
        assert proc.returncode != 0
        assert "an input of 21 tokens is longer than --max-source-positions 16; pass --truncate-source" in proc.stdout


# ---------------------------------------------------------------- interrupted training


def test_killed_training_resumes_with_the_same_data(xsum_tiny, tmp_path):
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    argv = train_args(xsum_tiny, killed, "--save-interval-updates", "2", updates=1000)
    run = subprocess.Popen([str(BIN / "fairseq-train"), *map(str, argv)], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, env=cli_env())
    log = []
    # SIGKILL right after the first checkpoint: update 2 ends epoch 1 (2 batches), so the resumed
    # run starts in epoch 2, where fairseq alone would batch differently
    for line in run.stdout:
        log.append(line)
        if "Saved checkpoint" in line:
            run.kill()
            break
    run.wait()
    run.stdout.close()
    done = torch.load(killed / "checkpoint_last.pt", map_location="cpu")["optimizer_history"][-1]["num_updates"]
    assert done >= 2
    resumed = run_cli("fairseq-train", *train_args(xsum_tiny, killed, "--save-interval-updates", "2",
                                                   updates=done + 2))
    whole = run_cli("fairseq-train", *train_args(xsum_tiny, straight, "--save-interval-updates", "2",
                                                 updates=done + 2))
    assert "Loaded checkpoint" in resumed.stdout
    whole_losses = update_losses(whole.stdout)
    assert sorted(whole_losses) == list(range(1, done + 3))
    # the same batches in the same order: the resumed updates repeat the uninterrupted run's
    assert update_losses(resumed.stdout) == {n: whole_losses[n] for n in (done + 1, done + 2)}
    assert {n: l for n, l in update_losses("".join(log)).items() if n <= done} == {
        n: whole_losses[n] for n in range(1, done + 1)}
