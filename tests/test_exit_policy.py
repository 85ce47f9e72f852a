"""The exit policy (elmer_fairseq/exit_policy.py): one validation, and generation with the
checkpoint's delta unless another is given, named in the summary."""
import math
import re
from types import SimpleNamespace

import pytest
import torch

from elmer_fairseq import exit_policy

from conftest import generate_args, run_cli


def decoder(mode, threshold=None):
    return SimpleNamespace(exit_mode=mode, exit_threshold=threshold)


def test_hard_exit_decodes_with_the_checkpoints_delta_unless_given():
    assert exit_policy.for_decoding(decoder("hard", 1.5)) == ("hard", 1.5, "(from the checkpoint)")
    assert exit_policy.for_decoding(decoder("hard", 1.5), threshold=0.25) == ("hard", 0.25, "(--exit-threshold)")
    assert exit_policy.for_decoding(decoder("hard", None)).threshold == exit_policy.DEFAULT_EXIT_THRESHOLD
    assert exit_policy.for_decoding(decoder("hard", 1.5)).describe() == "hard exit, delta 1.5 (from the checkpoint)"
    assert exit_policy.for_decoding(decoder("soft")).describe() == "soft exit"


@pytest.mark.parametrize("dec, mode, threshold, message", [
    (decoder("soft"), None, 0.5, "--exit-threshold applies to hard exit only"),
    (decoder("hard", 0.5), "soft", None, "does not match the checkpoint"),
    (decoder("lplm"), None, None, "fine-tune it before decoding"),
    (decoder("hard", 0.5), None, -1.0, "--exit-threshold must be >= 0"),
    (decoder("hard", 0.5), None, math.nan, "--exit-threshold must be >= 0"),
])
def test_bad_policies_are_refused(dec, mode, threshold, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        exit_policy.for_decoding(dec, mode, threshold)


def test_the_rule_is_entropy_below_delta():
    entropy = torch.tensor([0.0, 0.49, 0.5, 2.0])
    assert exit_policy.exits(entropy, 0.5).tolist() == [True, True, False, False]
    assert not exit_policy.exits(entropy, 0.0).any()


def test_fairseq_generate_names_the_delta_it_used(xsum_tiny, trained, tmp_path):
    state = torch.load(trained["hard"], map_location="cpu")
    state["cfg"]["model"].exit_threshold = 3.0  # as if fine-tuned with --exit-threshold 3
    torch.save(state, tmp_path / "hard3.pt")
    gen = generate_args(xsum_tiny, tmp_path / "hard3.pt")
    own = run_cli("fairseq-generate", *gen).stdout
    assert "(hard exit, delta 3 (from the checkpoint))" in own
    given = run_cli("fairseq-generate", *gen, "--exit-threshold", "0").stdout
    assert "(hard exit, delta 0 (--exit-threshold))" in given
    # delta 0 never exits early: every token at the last layer
    assert "L1 0.0%, L2 100.0%" in given  # the tiny model's two decoder layers
