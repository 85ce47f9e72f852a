"""examples/profile_decode.py on tiny random models: buckets that add up, clocks that leave the
model as it was, ELMER's floor, and the table, CSV and PNG it writes."""
import csv
import sys
import time

import pytest
import torch

from conftest import ROOT
from elmer_fairseq import ops
from elmer_fairseq.models import elmer

sys.path.insert(0, str(ROOT / "examples"))
import profile_decode as prof  # noqa: E402

TINY = ["--layers", "2", "--dim", "32", "--heads", "2", "--max-target-length", "8"]
SYSTEMS = ["transformer", "cmlm", "levt", "elmer-soft", "elmer-hard"]
BENCH = prof.benchmark_args(TINY)


@pytest.fixture(autouse=True)
def reference_off_ramp(monkeypatch):
    """The op's PyTorch reference: what is profiled does not depend on the op's backend, and a cold
    extension cache would take minutes to build."""
    monkeypatch.setenv("ELMER_OFF_RAMP", "torch")


def test_the_rows_are_one_greedy_pass_of_each_system():
    assert list(prof.profiled_rows(SYSTEMS, BENCH)) == [
        "Transformer (AR, greedy)", "CMLM (0 it.)", "CMLM (10 it.)", "LevT", "ELMER-Soft", "ELMER-Soft, --length-cut 2",
        "ELMER-Hard (delta=0.5)", "ELMER-Hard (delta=0.5), --length-cut 2"]  # (two layers: no --ramp-shortlist row)


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    """{row: (task, model, generator, batches)}: every profiled row but the --length-cut and
    --ramp-shortlist ones (the same models), random weights, 2 batches of 2 random sources of 10 pieces."""
    args = prof.parse_args(["--random-warm", "--source-length", "10", "--batch-sizes", "2", "--samples", "1", *TINY])
    vocab = prof.write_vocab(tmp_path_factory.mktemp("vocab"), 100)
    built = {}
    for row, (system, gen_flags) in prof.profiled_rows(SYSTEMS, BENCH).items():
        if "--length-cut" not in row and "--ramp-shortlist" not in row:  # the same model as a row above it
            task, model, generator = prof.load(gen_flags, vocab, prof.train_flags(system, BENCH))
            built[row] = (task, model, generator, prof.batches(prof.sources(task, args), 2, 2))
    return built


def test_buckets_are_measured_non_negative_and_add_up_to_the_pass(rows):
    for row, (task, model, generator, batches) in rows.items():
        means, outputs = prof.profile(task, model, generator, batches, warmup=1)
        assert len(outputs) == len(batches)
        assert all(means[b] >= 0 for b in prof.BUCKETS) and means[prof.ENCODER] > 0 and means[prof.LAYERS] > 0, row
        assert sum(means[b] for b in prof.BUCKETS) == pytest.approx(means["total"]), row


def tokens(hypos):
    return [h[0]["tokens"].tolist() for h in hypos]


def test_profiling_leaves_the_model_and_its_outputs_as_they_were(rows):
    originals = (elmer.off_ramp, elmer.layer_rows)
    assert elmer.off_ramp is ops.off_ramp
    for row, (task, model, generator, batches) in rows.items():
        decode = lambda: [tokens(task.inference_step(generator, [model], b)) for b in batches]  # noqa: E731
        before = decode()
        _, outputs = prof.profile(task, model, generator, batches, warmup=0)
        assert [tokens(hypos) for hypos in outputs] == before, row
        assert decode() == before, row
        assert not any(name in vars(owner) for owner, name, _ in prof.timed_calls(model) if owner is not elmer), row
    assert (elmer.off_ramp, elmer.layer_rows) == originals
    # also when the decoding fails inside the block
    task, model, generator, batches = rows["ELMER-Soft"]
    with pytest.raises(RuntimeError, match="stop"):
        with prof.clocks(model):
            assert elmer.off_ramp is not ops.off_ramp and "fuse" in vars(model.decoder)
            raise RuntimeError("stop")
    assert elmer.off_ramp is ops.off_ramp and "fuse" not in vars(model.decoder)
    assert "forward" not in vars(model.encoder)


def test_hard_exit_in_flight_rows_are_decoder_layer_time(rows, monkeypatch):
    """Above a layer where some positions exit, hard exit runs the in-flight rows through
    layer_rows, which calls the layer's parts, not its forward: that time is the layers' too."""
    _, model, _, batches = rows["ELMER-Hard (delta=0.5)"]
    real = elmer.layer_rows

    def slow(*args):
        time.sleep(0.05)
        return real(*args)

    monkeypatch.setattr(elmer, "layer_rows", slow)
    exits = torch.ones(2, 8, dtype=torch.long)
    exits[:, 4:] = 2  # half of the positions go on to layer 2, alone
    net = batches[0]["net_input"]
    with torch.no_grad(), prof.clocks(model) as spent:
        model.decoder.decode(model.encoder(net["src_tokens"], src_lengths=net["src_lengths"]), 8, forced_exits=exits)
    assert spent[prof.LAYERS] >= 0.05


def test_elmer_floor_is_below_its_pass_and_at_the_outputs_length(rows):
    task, model, generator, _ = rows["ELMER-Soft"]
    args = prof.parse_args(["--random-warm", "--source-length", "10", "--batch-sizes", "2", "--samples", "20", *TINY])
    batches = prof.batches(prof.sources(task, args), 2, 21)
    # CPU time: on a shared machine, other processes' time slices make up much of a ~1 ms wall time
    means, outputs = prof.profile(task, model, generator, batches, warmup=1, clock=time.thread_time)
    lengths = [prof.output_length(hypos) for hypos in outputs[1:]]
    assert all(1 <= n <= 8 for n in lengths) and means["floor_positions"] == pytest.approx(sum(lengths) / 20)
    assert 0 < means["floor"] < means["total"]
    assert "floor" not in prof.profile(*rows["CMLM (0 it.)"], warmup=1)[0]


def test_the_script_writes_the_table_the_csv_and_the_plot(tmp_path):
    out = tmp_path / "profile"
    records = prof.main(["--random-warm", "--systems", "transformer", "elmer-hard", "--vocab", "100",
                         "--source-length", "10", "--batch-sizes", "1", "2", "--threads", "1", "--samples", "1",
                         "--out", str(out), *TINY])
    written = list(csv.DictReader((out / "profile.csv").open()))
    assert [(r["system"], r["batch_size"]) for r in written] == [
        (row, str(size)) for row in ("Transformer (AR, greedy)", "ELMER-Hard (delta=0.5)",
                                     "ELMER-Hard (delta=0.5), --length-cut 2") for size in (1, 2)]
    assert [bool(r["floor"]) for r in written] == [False, False, True, True, True, True]
    assert float(written[0]["total"]) == pytest.approx(records[0]["total"])
    table = (out / "profile.md").read_text()
    assert "| system | batch | threads | ms per pass | encoder |" in table
    assert "| ELMER-Hard (delta=0.5) | 2 | 1 |" in table
    assert (out / "profile.png").read_bytes()[:4] == b"\x89PNG"


def test_interleaved_rows_are_timed_in_turns_and_add_up(tmp_path, monkeypatch):
    order, real = [], prof.profile
    monkeypatch.setattr(prof, "profile", lambda task, model, *a, **k: order.append(type(model).__name__) or
                        real(task, model, *a, **k))
    records = prof.main(["--random-warm", "--systems", "transformer", "elmer-hard", "--vocab", "100",
                         "--source-length", "10", "--batch-sizes", "2", "--threads", "1", "--samples", "2",
                         "--warmup", "1", "--interleave", "--out", str(tmp_path), *TINY])
    rows = ["Transformer (AR, greedy)", "ELMER-Hard (delta=0.5)", "ELMER-Hard (delta=0.5), --length-cut 2"]
    assert [(r["system"], r["batch_size"], r["passes"]) for r in records] == [(row, 2, 2) for row in rows]
    # one pass of each row in turn, three times (one untimed): never two passes of a row in a row
    assert order == ["TransformerModel", "ElmerModel", "ElmerModel"] * 3
    for r in records:
        assert sum(r[b] for b in prof.BUCKETS) == pytest.approx(r["total"]) and r["total"] > 0
    assert "floor" not in records[0] and 0 < records[1]["floor"]


@pytest.mark.parametrize("argv, message", [
    (["--checkpoints", "elmer-soft=x.pt"], "--checkpoints: pass --data"),
    (["--checkpoints", "x.pt", "--data", "."], "--checkpoints: each is NAME=PATH"),
    (["--random-warm", "--clock", "cpu", "--threads", "1", "2"], "--clock cpu counts the calling thread only"),
])
def test_bad_options_are_refused_with_the_option_named(argv, message, capsys):
    with pytest.raises(SystemExit):
        prof.parse_args(argv)
    assert message in capsys.readouterr().err


def test_an_unknown_system_is_named(tmp_path):
    with pytest.raises(SystemExit, match="no benchmark system elmr"):
        prof.main(["--checkpoints", "elmr=x.pt", "--data", str(tmp_path), "--out", str(tmp_path)])
