"""elmer-calibrate: per-layer thresholds with a guarantee (Learn then Test), the thresholds file,
and decoding with it."""
import json
import math
import shutil
import sys

import numpy as np
import pytest

import torch

from elmer_fairseq import ELMER, calibrate, exit_policy

from conftest import ROOT, expect_failure, generate_args, run_cli, sample_batch, tiny_model


def test_proposed_threshold_lets_exactly_the_most_certain_positions_through():
    u = np.array([0.4, 0.1, 0.3, 0.2])
    wrong = np.array([0, 0, 1, 0])  # the position at 0.3 disagrees with the last layer
    assert calibrate.propose(u, wrong, 0.0) == 0.3  # 0.1 and 0.2 pass, 0.3 does not
    assert calibrate.propose(u, wrong, 0.25) > 0.4  # 1 of 4 wrong: all pass
    assert calibrate.propose(u, np.ones(4), 0.5) == 0.0  # even the most certain is wrong


def test_fixed_sequence_testing_stops_at_the_first_failure():
    n = 1000
    losses = [np.zeros(n), np.full(n, 0.01), np.full(n, 0.2), np.zeros(n)]
    assert calibrate.fixed_sequence_test(losses, 0.05, 0.1) == 1  # the last safe one before a failure
    assert calibrate.fixed_sequence_test([np.full(n, 0.2), np.zeros(n)], 0.05, 0.1) == -1
    assert calibrate.hoeffding_p_value(0.01, n, 0.05) == pytest.approx(math.exp(-2 * n * 0.04 ** 2))


def test_the_guarantee_holds_over_repeated_calibrations():
    """Candidates of known true risk; each trial draws fresh calibration losses. The chosen
    candidate's true risk may pass epsilon in at most alpha of the trials, and the test is not
    trivially cautious (it usually accepts candidates with some risk)."""
    rng = np.random.default_rng(0)
    true_risk = np.array([0.0, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.08, 0.1])
    epsilon, alpha, n, trials = 0.05, 0.1, 2000, 200
    chosen = np.array([calibrate.fixed_sequence_test([rng.binomial(1, r, n).astype(float) for r in true_risk],
                                                     epsilon, alpha) for _ in range(trials)])
    risk = np.where(chosen >= 0, true_risk[np.maximum(chosen, 0)], 0.0)
    assert (risk > epsilon).mean() <= alpha
    assert risk.mean() > 0.005


def test_thresholds_file_round_trips_and_bad_files_name_the_file(tmp_path):
    good = exit_policy.LayerThresholds("max_prob", (0.1, 0.25))
    good.save(tmp_path / "t.json", epsilon=0.05)
    loaded = exit_policy.LayerThresholds.load(tmp_path / "t.json", num_layers=3)
    assert (loaded.signal, loaded.values) == ("max_prob", (0.1, 0.25))
    bad = {
        "not.json": ("{thresholds: [1", "not a JSON thresholds file"),
        "no_list.json": (json.dumps({"signal": "entropy"}), 'needs a "thresholds" list'),
        "negative.json": (json.dumps({"thresholds": [0.5, -1]}), "numbers >= 0"),
        "count.json": (json.dumps({"thresholds": [0.5]}), "1 thresholds for a 3-layer decoder"),
        "signal.json": (json.dumps({"signal": "vibes", "thresholds": [0.5, 0.5]}), "signal 'vibes'"),
    }
    for name, (text, message) in bad.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=message) as err:
            exit_policy.LayerThresholds.load(tmp_path / name, num_layers=3)
        assert str(tmp_path / name) in str(err.value)
    with pytest.raises(FileNotFoundError, match="nosuch.json: no such file"):
        exit_policy.LayerThresholds.load(tmp_path / "nosuch.json")


def test_calibrate_with_too_little_data_for_the_guarantee_never_exits_early(trained, xsum_tiny, tmp_path):
    """4 test sequences cannot show a risk <= 0.05 with 90% confidence (Hoeffding): thresholds 0."""
    out = tmp_path / "thresholds.json"
    log = run_cli("elmer-calibrate", "--path", trained["hard"], "--data", xsum_tiny, "--out", out, "--device", "cpu").stdout
    assert "no thresholds pass" in log and f"wrote {out}" in log
    data = json.loads(out.read_text())
    assert data["thresholds"] == [0.0] and data["test_sequences"] == 4 and data["epsilon"] == 0.05
    gen = run_cli("fairseq-generate", *generate_args(xsum_tiny, trained["hard"], "--exit-thresholds", out)).stdout
    assert f"(hard exit, entropy thresholds from {out})" in gen and "L1 0.0%, L2 100.0%" in gen


def test_a_loose_tolerance_with_enough_confidence_slack_lets_tokens_exit(trained, xsum_tiny, tmp_path):
    out = tmp_path / "loose.json"
    run_cli("elmer-calibrate", "--path", trained["hard"], "--data", xsum_tiny, "--out", out, "--epsilon", "0.99",
            "--alpha", "0.5", "--device", "cpu")
    data = json.loads(out.read_text())
    assert data["rate"] is not None and data["test_risk"] <= 0.99 - math.sqrt(math.log(2) / 8)


@pytest.mark.parametrize("signal", ["entropy", "max_prob"])
def test_generation_uses_each_layers_threshold(trained, xsum_tiny, tmp_path, signal):
    path = tmp_path / f"{signal}.json"
    exit_policy.LayerThresholds(signal, (100.0,)).save(path)  # every position is below it at layer 1
    gen = run_cli("fairseq-generate", *generate_args(xsum_tiny, trained["hard"], "--exit-thresholds", path)).stdout
    assert "L1 100.0%, L2 0.0%" in gen


def test_thresholds_files_are_for_hard_exit_and_are_checked(trained, xsum_tiny, tmp_path):
    path = tmp_path / "t.json"
    exit_policy.LayerThresholds("entropy", (0.5,)).save(path)
    expect_failure("fairseq-generate", generate_args(xsum_tiny, trained["soft"], "--exit-thresholds", path),
                   "calibrated thresholds are for hard-exit checkpoints")
    (tmp_path / "three.json").write_text(json.dumps({"thresholds": [0.5, 0.5]}))
    expect_failure("fairseq-generate", generate_args(xsum_tiny, trained["hard"], "--exit-thresholds",
                                                     tmp_path / "three.json"),
                   f"--exit-thresholds {tmp_path / 'three.json'}: 2 thresholds for a 2-layer decoder")


def test_the_report_puts_calibrated_thresholds_next_to_fixed_ones_on_the_test_split(trained, xsum_tiny, tmp_path):
    """examples/calibration_report.py: full depth changes nothing, a δ every position passes sends all of them
    out at layer 1 with the disagreement calibrate's own risk measure finds, and each ε gets its file and row."""
    sys.path.insert(0, str(ROOT / "examples"))
    import calibration_report

    shutil.copytree(xsum_tiny, tmp_path / "task" / "bin")
    shutil.copy(xsum_tiny.parent / "test.tgt", tmp_path / "task" / "test.raw.tgt")
    out = tmp_path / "report"
    rows = calibration_report.main(["--path", str(trained["hard"]), "--data", str(tmp_path / "task" / "bin"),
                                    "--out", str(out), "--epsilons", "0.99", "--alpha", "0.5", "--deltas", "100",
                                    "--latency-samples", "2"])
    full, everything_out, calibrated = rows
    assert full["policy"] == "full depth" and full["disagreement"] == 0 and full["exit_shares"] == [0.0, 1.0]
    assert everything_out["exit_shares"] == [1.0, 0.0] and everything_out["mean_exit_layer"] == 1.0
    hub = ELMER.from_pretrained(trained["hard"], data=xsum_tiny, device="cpu")
    task = hub.task
    task.load_dataset("test")
    dataset = task.dataset("test")
    batches = [dataset.collater([dataset[i] for i in range(len(dataset))])]
    risks = calibrate.sequence_risks(hub.models[0], batches, task.cfg.max_target_length, 100.0)
    assert everything_out["disagreement"] == pytest.approx(risks.mean())
    saved = exit_policy.LayerThresholds.load(out / "exit_thresholds-eps0.99.json", 2)
    assert calibrated["policy"] == "ε = 0.99 (calibrated)" and calibrated["thresholds"] == list(saved.values)
    assert all(r["ms_per_sample"] > 0 and 0 <= r["rougeL"] <= 100 for r in rows)
    report = (out / "report.md").read_text()
    assert "| full depth |" in report and "| δ = 100 |" in report and "ε = 0.99 (calibrated)" in report
    assert json.loads((out / "report.json").read_text())["calibration"]["ε = 0.99 (calibrated)"]["epsilon"] == 0.99


def decoder_fields(decoder):
    """The decoder's own attributes (exit_threshold, exit_mode, training, ...) and its weights."""
    return ({k: v for k, v in vars(decoder).items() if not k.startswith("_")},
            {k: v.clone() for k, v in decoder.state_dict().items()})


def test_the_full_depth_pass_is_the_hard_exit_pass_with_delta_0(xsum_tiny):
    task, model = tiny_model(xsum_tiny, exit_mode="hard", exit_threshold=0.0)
    net = sample_batch(task)["net_input"]
    enc = model.encoder(net["src_tokens"], src_lengths=net["src_lengths"])
    masks = net["src_tokens"].new_full((net["src_tokens"].size(0), 12), model.decoder.mask_idx)
    with torch.no_grad():
        expected, got = model.decoder(masks, enc), calibrate.layer_logits(model.decoder, enc, 12)
    assert len(got) == len(expected) == 3 and all(torch.equal(a, b) for a, b in zip(got, expected))


def test_calibration_leaves_the_decoder_as_it_found_it_also_when_it_fails(xsum_tiny, monkeypatch):
    """Nothing of the decoder changes, not even for the length of the pass (a field set and restored
    would show inside it): calibrating a hard-exit model with delta 0.5, and a pass that raises."""
    task, model = tiny_model(xsum_tiny, exit_mode="hard", exit_threshold=0.5)
    before = decoder_fields(model.decoder)
    seen, uncertainty = [], exit_policy.uncertainty

    def watching(*args):
        seen.append(model.decoder.exit_threshold)
        return uncertainty(*args)

    monkeypatch.setattr(exit_policy, "uncertainty", watching)
    calibrate.calibrate(model, task, split="valid", epsilon=0.5, alpha=0.5)
    after = decoder_fields(model.decoder)
    assert seen and set(seen) == {0.5}
    assert after[0] == before[0] and all(torch.equal(after[1][k], v) for k, v in before[1].items())

    def failing(*args):
        seen.append(model.decoder.exit_threshold)
        raise RuntimeError("inside the pass")

    monkeypatch.setattr(exit_policy, "uncertainty", failing)
    seen.clear()
    with pytest.raises(RuntimeError, match="inside the pass"):
        calibrate.full_depth(model, [sample_batch(task, split="valid")], 12, "entropy")
    assert seen == [0.5] and decoder_fields(model.decoder)[0] == before[0]
