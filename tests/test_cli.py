"""The stock fairseq command line on tiny real data: train, generate, and raw text in (Python
API, elmer-generate, fairseq-interactive). Bad input: tests/test_bad_input.py."""
import re
import subprocess

import pytest
import torch

from conftest import BIN, USER_DIR, cli_env, generate_args, hypotheses, run_cli, train_args


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_train_then_generate_every_test_sample(xsum_tiny, trained, mode):
    ckpt = trained[mode]
    # our checkpoints load with torch's safe default (run_cli drops TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD)
    state = torch.load(ckpt, map_location="cpu")
    assert state["cfg"]["model"].exit_mode == mode
    proc = run_cli("fairseq-generate", *generate_args(xsum_tiny, ckpt))
    hyps = hypotheses(proc.stdout)
    assert sorted(hyps) == list(range(8)), "every test sample is decoded exactly once"
    assert re.search(rf"ELMER exit layers over [\d,]+ tokens \({mode} exit.*\): mean [\d.]+ of 2", proc.stdout)
    for sid in hyps:
        assert re.search(rf"^P-{sid}\t", proc.stdout, re.M) and re.search(rf"^T-{sid}\t", proc.stdout, re.M)


def test_hard_exit_threshold_moves_the_exit_layers(xsum_tiny, trained):
    def mean_exit(delta):
        proc = run_cli("fairseq-generate", *generate_args(xsum_tiny, trained["hard"], "--exit-threshold", delta))
        return float(re.search(r"mean ([\d.]+) of 2", proc.stdout).group(1))

    assert mean_exit(0) == 2.0
    assert mean_exit(1e6) == 1.0


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
    # every position's token, past the output's end too: the output is their prefix up to the first EOS
    written = details[0]["position_tokens"].tolist()
    assert len(written) == model.task.cfg.max_target_length and written[:len(details[0]["tokens"])] == \
        details[0]["tokens"].tolist()
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


def test_fairseq_interactive_reads_raw_lines_like_the_python_api(xsum_tiny, trained):
    from elmer_fairseq import ELMER

    sources = (xsum_tiny.parent / "test.src").read_text(encoding="utf-8").splitlines()[:3]
    proc = run_cli("fairseq-interactive", xsum_tiny, "--user-dir", USER_DIR, "--task", "elmer_translation",
                   "--path", trained["soft"], "--iter-decode-max-iter", "0", "--beam", "1",
                   "--max-target-length", "24", "--cpu", stdin="".join(s + "\n" for s in sources))
    expected = ELMER.from_pretrained(trained["soft"], data=xsum_tiny, device="cpu").generate(sources)
    assert any(expected) and hypotheses(proc.stdout) == dict(enumerate(expected))
    detokenized = {int(m.group(1)): m.group(2) for m in re.finditer(r"^D-(\d+)\t\S+\t?(.*)$", proc.stdout, re.M)}
    assert detokenized == dict(enumerate(expected))


def scalars(event_file):
    """{tag: [(step, value)]} of a TensorBoard event file (TFRecords: length, CRC, Event, CRC)."""
    import struct

    from tensorboardX.proto import event_pb2

    data, out, at = event_file.read_bytes(), {}, 0
    while at < len(data):
        (length,) = struct.unpack("<Q", data[at: at + 8])
        event = event_pb2.Event.FromString(data[at + 12: at + 12 + length])
        at += 12 + length + 4
        for value in event.summary.value:
            out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


def test_tensorboard_logdir_writes_training_curves(xsum_tiny, tmp_path):
    """fairseq's --tensorboard-logdir works out of the box (tensorboardX is in requirements.txt)."""
    proc = run_cli("fairseq-train", *train_args(xsum_tiny, tmp_path / "ckpt", "--tensorboard-logdir", tmp_path / "tb",
                                                updates=2))
    assert "Please install tensorboardX" not in proc.stdout
    events = {p.parent.name: p for p in (tmp_path / "tb").rglob("events.out.tfevents.*")}
    assert {"train_inner", "train", "valid"} <= set(events), sorted(events)
    curve = scalars(events["train_inner"])["loss"]
    assert [step for step, _ in curve] == [1, 2] and all(loss > 0 for _, loss in curve)


@pytest.mark.parametrize("policy", [None, "ACTIVE"])
def test_console_scripts_let_idle_openmp_threads_sleep(policy):
    """elmer-generate (the package imported before torch) makes OpenMP's idle threads sleep
    instead of spinning, which is many times faster next to a busy core (docs/speed.md); a policy
    the caller sets wins. OMP_DISPLAY_ENV makes the OpenMP runtime print what it read."""
    env = {k: v for k, v in cli_env({"OMP_DISPLAY_ENV": "TRUE"}).items() if k != "OMP_WAIT_POLICY"}
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    proc = subprocess.run([str(BIN / "elmer-generate"), "--help"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"OMP_WAIT_POLICY = '{policy or 'PASSIVE'}'" in proc.stderr
