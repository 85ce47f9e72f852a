"""examples/gpu_check.sh, the one command that runs every owed GPU measurement, in its CPU dry run:
every step is listed with a status, a step that fails or overruns is recorded and the next one
starts, the optional warm-start hook skips with a reason and runs when given a folder."""
import json
import os
import subprocess
import sys
import tarfile

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "examples"))
import gpu_check  # noqa: E402

pytestmark = pytest.mark.slow


def dry_run(out, work, *options, env=None):
    full_env = {**os.environ, "GPU_CHECK_PYTHON": sys.executable, "GPU_CHECK_WORK": str(work),
                "GPU_CHECK_COMMIT": "test", "OMP_NUM_THREADS": "1", **(env or {})}
    full_env.pop("GPU_CHECK_WARM_START", None)
    proc = subprocess.run(["bash", str(ROOT / "examples" / "gpu_check.sh"), str(out), "--dry-run", *options],
                          capture_output=True, text=True, env=full_env, timeout=1200)
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    return proc, {e["step"]: e for e in results}, (out / "summary.md").read_text()


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """One whole dry run in which kernel_bench fails on purpose."""
    root = tmp_path_factory.mktemp("gpu_check")
    proc, steps, summary = dry_run(root / "out", root / "work", env={"GPU_CHECK_FAIL": "kernel_bench"})
    return {"proc": proc, "steps": steps, "summary": summary, "out": root / "out", "work": root / "work"}


def test_every_step_is_recorded_and_listed_in_the_summary(full):
    assert list(full["steps"]) == list(gpu_check.STEPS), full["proc"].stdout[-3000:]
    for name, entry in full["steps"].items():
        assert f"| {name} | {entry['status']} | " in full["summary"]
        assert entry["status"] in ("ok", "failed", "skipped", "timed out")
    assert "- mode: dry run" in full["summary"] and "commit test" in full["summary"]
    assert (full["out"] / "logs.tar.gz").exists()
    with tarfile.open(full["out"] / "logs.tar.gz") as tar:
        assert "logs/latency.log" in tar.getnames()


def test_a_failing_step_is_recorded_and_the_later_steps_still_run(full):
    steps = full["steps"]
    assert full["proc"].returncode == 1  # a step failed
    assert steps["kernel_bench"]["status"] == "failed" and "on purpose" in steps["kernel_bench"]["note"]
    later = list(gpu_check.STEPS)[list(gpu_check.STEPS).index("kernel_bench") + 1:]
    for name in later:
        if name != "warm_start":
            assert steps[name]["status"] == "ok", f"{name}: {steps[name]['note']}\n{steps[name]['log_tail']}"
    assert steps["setup"]["status"] == steps["kernel_tests"]["status"] == "ok"
    assert steps["warm_start"]["status"] == "skipped" and "no warm-start folder" in steps["warm_start"]["note"]


def test_the_tables_hold_every_system_and_the_fine_tune_checks(full):
    latency = full["steps"]["latency"]["table"]
    for system in ("Transformer (AR, greedy)", "ELMER-Soft", "ELMER-Hard", "CMLM (0 it.)", "CMLM (10 it.)", "LevT"):
        assert f"| {system}" in latency
    for precision in ("bf16", "fp16"):
        note = full["steps"][f"finetune_{precision}"]["note"]
        assert f"{gpu_check.SIZES['dry']['test']} test outputs" in note and "loss" in note
    assert "--lplm-chunk" in full["steps"]["lplm"]["table"]
    assert "refused" in full["steps"]["distributed"]["table"]


def test_a_step_past_its_time_limit_is_recorded_as_timed_out(tmp_path):
    proc, steps, summary = dry_run(tmp_path / "out", tmp_path / "work", "--only", "kernel_bench",
                                   env={"GPU_CHECK_LIMIT_kernel_bench": "1"})
    assert proc.returncode == 1
    assert steps["kernel_bench"]["status"] == "timed out"
    assert steps["setup"]["status"] == "ok"  # set-up always runs
    assert steps["latency"]["status"] == "skipped" and "not selected" in steps["latency"]["note"]
    assert "| kernel_bench | timed out |" in summary


def test_the_warm_start_hook_runs_when_given_a_folder(full, tmp_path):
    """A stand-in for a converted checkpoint's folder (docs/converting.md's layout): the dry run's
    data, its bf16 fine-tune as ckpt/model.pt, and the options that rebuild that model."""
    warm, data, s = tmp_path / "warm", full["work"] / "data", gpu_check.SIZES["dry"]
    (warm / "ckpt").mkdir(parents=True)
    (warm / "ckpt" / "model.pt").symlink_to(full["work"] / "checkpoints" / "finetune-bf16" / "checkpoint_last.pt")
    for name in ("bin", "test.raw.tgt", "vocab.json", "merges.txt"):
        (warm / name).symlink_to(data / name)
    dim, layers = s["dim"], s["layers"]
    (warm / "train.flags").write_text(
        f"--arch elmer_base --encoder-layers {layers} --decoder-layers {layers} --encoder-embed-dim {dim} "
        f"--decoder-embed-dim {dim} --encoder-ffn-embed-dim {4 * dim} --decoder-ffn-embed-dim {4 * dim} "
        f"--encoder-attention-heads {s['heads']} --decoder-attention-heads {s['heads']} --share-all-embeddings "
        f"--max-target-length {s['target']}\n")
    proc, steps, summary = dry_run(tmp_path / "out", tmp_path / "work", "--only", "warm_start", "--warm-start", warm)
    entry = steps["warm_start"]
    assert entry["status"] == "ok", f"{entry['note']}\n{entry['log_tail']}\n{proc.stdout[-2000:]}"
    assert "ROUGE-L" in entry["table"] and "ELMER exit layers over" in entry["table"]
    assert entry["table"].count("(reference: ") == min(10, s["test"])  # ten samples, or every test pair
