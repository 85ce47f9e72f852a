"""`--bf16` without `--tpu` (elmer_fairseq/patches.py): fairseq 0.12 reads --bf16 as --tpu too and
then asks torch_xla for a device; with the plugin it trains in bfloat16 where the model trains, CPU
included. What fairseq's bf16 promises, checked on a real fairseq-train run: FP16Optimizer keeps
an fp32 master copy of every parameter (Adam's moments fp32 beside it) and no loss scaler, the
model's own parameters are that master rounded to bf16 after each update, and the checkpoint holds
the model's bf16 weights widened to fp32 (fairseq's move_to_cpu), which fairseq-generate decodes
in fp32. --bf16 with --fp16 or --amp is refused; ELMER_FAIRSEQ_NO_PATCHES=1 gives fairseq's reading back."""
import subprocess
import sys

import pytest
import torch
from fairseq import options

from conftest import USER_DIR, cli_env, expect_failure, generate_args, hypotheses, run_cli, train_args
from test_patches import python

pytestmark = pytest.mark.slow

# fairseq-train as its console script runs it, saving at each checkpoint (into SAVE_DIR/probe.pt)
# the optimizer's fp32 master copy and the model's parameters as they are at that moment
PROBE = """
import os
import sys

import fairseq_cli.train as train
import torch
from fairseq.trainer import Trainer

_save = Trainer.save_checkpoint


def save_checkpoint(self, filename, extra_state):
    path = _save(self, filename, extra_state)
    opt = self.optimizer
    torch.save({"optimizer": type(opt).__name__, "scaler": opt.scaler,
                "pairs": [(p.detach().clone(), p32.detach().clone()) for p, p32 in zip(opt.fp16_params, opt.fp32_params)],
                "model": {n: p.detach().clone() for n, p in self.model.named_parameters()}},
               os.path.join(os.path.dirname(filename), "probe.pt"))
    return path


Trainer.save_checkpoint = save_checkpoint
sys.argv = ["fairseq-train", *sys.argv[1:]]
train.cli_main()
"""


def parse(*extra):
    """fairseq-train's options for a tiny ELMER, parsed in this process (the plugin's patches in place)."""
    return options.parse_args_and_arch(options.get_training_parser(), [
        "data", "--user-dir", str(USER_DIR), "--task", "elmer_translation", "--arch", "elmer_tiny", *extra])


@pytest.fixture(scope="module")
def bf16_run(xsum_tiny, tmp_path_factory):
    save = tmp_path_factory.mktemp("bf16")
    argv = train_args(xsum_tiny, save, "--bf16")
    proc = subprocess.run([sys.executable, "-c", PROBE, *map(str, argv)], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, env=cli_env(), timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:]
    # the last save wrote checkpoint_best.pt or checkpoint_last.pt and copied it to the other
    return save / "checkpoint_last.pt", torch.load(save / "probe.pt", weights_only=False), proc.stdout


def test_bf16_trains_on_cpu_with_an_fp32_master_copy(bf16_run):
    ckpt, probe, log = bf16_run
    assert "num_updates=4" in log
    assert probe["optimizer"] == "FP16Optimizer" and probe["scaler"] is None  # bf16: no loss scaling
    assert probe["pairs"]
    for param, master in probe["pairs"]:
        assert param.dtype == torch.bfloat16 and master.dtype == torch.float32
        assert torch.equal(param, master.to(torch.bfloat16))  # the model is its master, rounded
    # the master holds what bf16 cannot: 4 Adam steps of about the lr, 1e-3, are finer than bf16's 8-bit mantissa
    finer = sum(int((m != m.to(torch.bfloat16).float()).sum()) for _, m in probe["pairs"])
    assert finer > 0.5 * sum(m.numel() for _, m in probe["pairs"])


def test_the_checkpoint_holds_the_bf16_weights_in_fp32_and_fp32_adam_moments(bf16_run):
    ckpt, probe, _ = bf16_run
    state = torch.load(ckpt, weights_only=False)
    assert state["cfg"]["common"]["bf16"] and not state["cfg"]["common"]["tpu"]
    assert state["optimizer_history"][-1]["optimizer_name"] == "FP16Optimizer"
    for name, param in probe["model"].items():
        saved = state["model"][name]
        assert saved.dtype == torch.float32 and torch.equal(saved, param.float()), name
    moments = [s for s in state["last_optimizer_state"]["state"].values()]
    assert len(moments) == len(probe["pairs"]) and "loss_scale" not in state["last_optimizer_state"]
    for s, (_, master) in zip(moments, probe["pairs"]):
        assert s["exp_avg"].dtype == s["exp_avg_sq"].dtype == torch.float32 and s["exp_avg"].shape == master.shape


def test_the_bf16_checkpoint_decodes_in_fp32(bf16_run, xsum_tiny):
    ckpt, _, _ = bf16_run
    out = run_cli("fairseq-generate", *generate_args(xsum_tiny, ckpt)).stdout
    assert sorted(hypotheses(out)) == list(range(8))


def test_bf16_no_longer_means_tpu_but_an_explicit_tpu_does():
    assert parse("--bf16").bf16 and not parse("--bf16").tpu
    assert parse("--memory-efficient-bf16").bf16 and not parse("--memory-efficient-bf16").tpu
    assert parse("--bf16", "--tpu").tpu and parse("--tpu").tpu
    assert not parse().tpu and not parse().bf16


@pytest.mark.parametrize("bf16,other", [("--bf16", "--fp16"), ("--bf16", "--amp"),
                                        ("--memory-efficient-bf16", "--memory-efficient-fp16")])
def test_bf16_with_another_precision_is_refused(bf16, other):
    with pytest.raises(ValueError, match=f"^{bf16} cannot be combined with {other}: pick one precision"):
        parse(bf16, other)


def test_fairseq_train_refuses_bf16_with_amp_naming_both(xsum_tiny, tmp_path):
    expect_failure("fairseq-train", train_args(xsum_tiny, tmp_path, "--bf16", "--amp"),
                   "--bf16 cannot be combined with --amp")


def test_opting_out_gives_fairseqs_own_reading_back():
    out = python("""
from fairseq import options
import elmer_fairseq

def parse(*extra):
    return options.parse_args_and_arch(options.get_training_parser(), [
        "data", "--user-dir", "elmer_fairseq", "--task", "elmer_translation", "--arch", "elmer_tiny", *extra])

assert parse("--bf16").tpu  # fairseq 0.12: --bf16 implies --tpu
try:
    parse("--bf16", "--fp16")
except ValueError as e:
    print("fairseq:", e)
""", ELMER_FAIRSEQ_NO_PATCHES="1")
    assert "fairseq: Cannot combine --fp16 and --tpu" in out
