"""elmer_fairseq/patches.py: what importing the plugin changes in fairseq and torch, once, with an
opt-out and a version check; the off-ramp op without fairseq; checkpoint errors that say what
went wrong."""
import os
import subprocess
import sys

import pytest
import torch
from fairseq import checkpoint_utils, options
from fairseq.distributed import utils as fairseq_distributed
from fairseq.models.nat import levenshtein_transformer as levt

from elmer_fairseq import patches

from conftest import ROOT


def python(code, *argv, **env):
    """Runs `code` in a fresh interpreter (`argv`: its arguments); returns its stdout + stderr (it
    must succeed)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    done = subprocess.run([sys.executable, "-c", code, *map(str, argv)], capture_output=True, text=True, env=full_env, cwd=ROOT,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


PATCHED = {
    "fairseq.checkpoint_utils.load_checkpoint_to_cpu": (checkpoint_utils, "load_checkpoint_to_cpu"),
    "fairseq.distributed.utils.call_main": (fairseq_distributed, "call_main"),
    "fairseq.distributed.utils.distributed_init": (fairseq_distributed, "distributed_init"),
    "fairseq.options.parse_args_and_arch": (options, "parse_args_and_arch"),
    "fairseq.models.nat.levenshtein_transformer.LevenshteinTransformerModel.forward_decoder":
        (levt.LevenshteinTransformerModel, "forward_decoder"),
    "fairseq.models.nat.levenshtein_transformer._apply_ins_masks": (levt, "_apply_ins_masks"),
}


def test_installing_twice_patches_once():
    """conftest imported the plugin (one install); another install changes nothing: each fairseq
    function is wrapped once, and the wrapper calls fairseq's own function."""
    before = {key: getattr(module, name) for key, (module, name) in PATCHED.items()}
    assert patches.install() and patches.install()
    assert set(patches._original) == set(PATCHED)
    for key, (module, name) in PATCHED.items():
        assert getattr(module, name) is before[key] is getattr(patches, name)
        assert patches._original[key].__module__.startswith("fairseq.")  # fairseq's, not a wrapper
    assert {"argparse.Namespace", "collections.OrderedDict"} <= {
        f"{c.__module__}.{c.__qualname__}" for c in torch.serialization.get_safe_globals() if isinstance(c, type)}


def test_opting_out_leaves_fairseq_and_torch_untouched(tmp_path):
    out = python("""
import argparse
import sys
import torch
from fairseq import checkpoint_utils, options, tasks
from fairseq.distributed import utils
import elmer_fairseq
from elmer_fairseq import patches
assert checkpoint_utils.load_checkpoint_to_cpu.__module__ == "fairseq.checkpoint_utils"
assert options.parse_args_and_arch.__module__ == "fairseq.options"
from fairseq.models.nat import levenshtein_transformer as levt
assert levt.LevenshteinTransformerModel.forward_decoder.__module__ == levt.__name__
assert levt._apply_ins_masks.__module__ == "fairseq.models.nat.levenshtein_utils"
assert utils.call_main.__module__ == utils.distributed_init.__module__ == "fairseq.distributed.utils"
import datetime
assert not {argparse.Namespace, datetime.date} & set(torch.serialization.get_safe_globals())
assert not patches._original
assert "elmer_translation" in tasks.TASK_REGISTRY  # the plugin itself still registers
print("untouched")
# what stops working: torch's safe loading refuses the options fairseq pickles into a checkpoint
torch.save({"args": argparse.Namespace(arch="elmer_tiny")}, sys.argv[1])
try:
    torch.load(sys.argv[1])
except Exception as e:
    print("refused:", type(e).__name__)
""", tmp_path / "options.pt", ELMER_FAIRSEQ_NO_PATCHES="1", ELMER_TRUSTED_GLOBALS="datetime.date")
    assert "untouched" in out and "refused: UnpicklingError" in out


def test_what_was_patched_is_logged_at_debug_level():
    out = python("import logging; logging.basicConfig(level=logging.DEBUG); import elmer_fairseq", LOGLEVEL="DEBUG")
    for key in PATCHED:
        assert f"DEBUG:elmer_fairseq.patches:patched {key}" in out
    assert "allowed in torch's safe loading: argparse.Namespace" in out
    quiet = python("import logging; logging.basicConfig(level=logging.DEBUG); import elmer_fairseq")
    assert "elmer_fairseq.patches" not in quiet


def test_another_fairseq_version_gets_a_warning():
    with pytest.warns(patches.FairseqVersionWarning, match=r"written for fairseq 0\.12\.x, found fairseq 0\.13\.0.*"
                                                          r"ELMER_FAIRSEQ_NO_PATCHES=1"):
        assert not patches.check_version("0.13.0")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert patches.check_version("0.12.2") and patches.check_version("0.12.3.1")


def test_the_off_ramp_op_imports_without_fairseq():
    out = python("""
import sys
sys.modules["fairseq"] = None  # fairseq cannot be imported
import torch
import elmer_fairseq.ops as ops
out = ops.off_ramp_reference(torch.randn(4, 8), torch.randn(10, 8), 1.0)
assert out.token.shape == (4,)
assert ops.prepare and ops.off_ramp
assert not [m for m in sys.modules if m.startswith("fairseq.")]
import elmer_fairseq
try:
    elmer_fairseq.ELMER
except ImportError as e:
    print("ELMER:", e)
print("ok")
""", ELMER_OFF_RAMP="torch")
    assert "ok" in out and "ELMER: elmer_fairseq.ELMER needs fairseq 0.12" in out


# ---------------------------------------------------------------- checkpoint errors


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "checkpoint_last.pt"
    torch.save({"model": {"w": torch.zeros(64)}}, path)
    return path


def test_a_missing_checkpoint_is_reported_as_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="nosuch.pt"):
        checkpoint_utils.load_checkpoint_to_cpu(str(tmp_path / "nosuch.pt"))


@pytest.mark.parametrize("error", [PermissionError(13, "Permission denied"), OSError(5, "Input/output error")])
def test_an_io_error_is_reported_as_itself_not_as_a_corrupt_file(saved, monkeypatch, error):
    """(As root, chmod cannot take the permission away: the read fails by hand.)"""
    def unreadable_file(path, *args, **kwargs):
        raise type(error)(error.errno, error.strerror, str(path))

    monkeypatch.setitem(patches._original, "fairseq.checkpoint_utils.load_checkpoint_to_cpu", unreadable_file)
    with pytest.raises(type(error), match=error.strerror) as caught:
        checkpoint_utils.load_checkpoint_to_cpu(str(saved))
    assert "truncated or corrupt" not in str(caught.value)


def test_a_truncated_checkpoint_keeps_torchs_error_as_the_cause(saved):
    data = saved.read_bytes()
    saved.write_bytes(data[: len(data) // 2])
    with pytest.raises(RuntimeError, match="is truncated or corrupt") as caught:
        checkpoint_utils.load_checkpoint_to_cpu(str(saved))
    assert "failed finding central directory" in str(caught.value.__cause__)
