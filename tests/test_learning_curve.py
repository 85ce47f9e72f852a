"""examples/learning_curve.py: benchmark rows of several runs, gathered per recipe against updates."""
import csv
import json
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "examples"))  # examples/ is a folder of scripts, as in test_benchmark
import learning_curve  # noqa: E402


def row(system, updates, rouge, repeat, length_r=0.5):
    r = {"system": system, "updates": updates, "rouge1": rouge + 1, "rougeL": rouge, "bleu4": rouge / 10,
         "repeat": repeat, "distinct1": 5.0, "mean_len": 8.0, "ms_per_sample": None, "samples": ["a b"]}
    if length_r is not None:
        r["length_r"] = length_r
    return r


def run_folder(root, name, *rows):
    folder = root / name
    (folder / "rows").mkdir(parents=True)
    for r in rows:
        (folder / "rows" / f"{r['system'].replace(' ', '-')}.json").write_text(json.dumps(r))
    return folder


@pytest.fixture
def runs(tmp_path):
    """Two recipes at two update counts each; the older 'paper' run predates length_r."""
    return {
        "paper-600": run_folder(tmp_path, "paper-600", row("ELMER-Soft", 600, 24.0, 97.0, length_r=None),
                                row("Transformer (AR, greedy)", 600, 30.0, 10.0)),
        "paper-1200": run_folder(tmp_path, "paper-1200", row("ELMER-Soft", 1200, 26.0, 95.0, length_r=0.1),
                                 row("Transformer (AR, greedy)", 1200, 32.0, 8.0)),
        "kd-1200": run_folder(tmp_path, "kd-1200", row("ELMER-Soft + KD", 1200, 28.0, 50.0, length_r=0.3)),
        "kd-600": run_folder(tmp_path, "kd-600", row("ELMER-Soft + KD", 600, 25.0, 70.0, length_r=0.2)),
    }


def args(runs, *extra, out):
    return ["--runs", f"paper={runs['paper-1200']}", f"paper={runs['paper-600']}", f"glance+KD={runs['kd-1200']}",
            f"glance+KD={runs['kd-600']}", "--out", str(out), *extra]


def read_csv(out):
    with (out / "learning_curve.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def test_curve_rows_sorted_by_recipe_system_updates(runs, tmp_path, capsys):
    out = tmp_path / "lc"
    learning_curve.main(args(runs, out=out))
    lines = read_csv(out)
    assert list(lines[0]) == ["recipe", "system", "updates", "rougeL", "bleu4", "repeat", "distinct1", "mean_len",
                              "length_r", "run"]
    assert [(r["recipe"], r["system"], r["updates"]) for r in lines] == [
        ("glance+KD", "ELMER-Soft + KD", "600"), ("glance+KD", "ELMER-Soft + KD", "1200"),
        ("paper", "ELMER-Soft", "600"), ("paper", "ELMER-Soft", "1200"),
        ("paper", "Transformer (AR, greedy)", "600"), ("paper", "Transformer (AR, greedy)", "1200")]
    assert [float(r["rougeL"]) for r in lines] == [25.0, 28.0, 24.0, 26.0, 30.0, 32.0]
    assert [float(r["repeat"]) for r in lines] == [70.0, 50.0, 97.0, 95.0, 10.0, 8.0]
    assert float(lines[0]["bleu4"]) == 2.5 and float(lines[0]["distinct1"]) == 5.0
    assert [r["length_r"] for r in lines[2:4]] == ["", "0.1"]  # missing in the older run, not zero
    assert [r["run"] for r in lines[2:4]] == [str(runs["paper-600"]), str(runs["paper-1200"])]
    png = (out / "learning_curve.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000
    table = capsys.readouterr().out.splitlines()
    assert table[0] == "| recipe | system | updates | rougeL | bleu4 | repeat | distinct1 | mean_len | length_r |"
    assert table[4] == "| paper | ELMER-Soft | 600 | 24.00 | 2.40 | 97.0 | 5.0 | 8.0 | - |"
    assert len(table) == 2 + 6


def test_systems_filter(runs, tmp_path):
    out = tmp_path / "lc"
    learning_curve.main(args(runs, "--systems", "ELMER-Soft", "ELMER-Soft + KD", out=out))
    assert [(r["recipe"], r["system"], r["updates"]) for r in read_csv(out)] == [
        ("glance+KD", "ELMER-Soft + KD", "600"), ("glance+KD", "ELMER-Soft + KD", "1200"),
        ("paper", "ELMER-Soft", "600"), ("paper", "ELMER-Soft", "1200")]


def test_system_in_no_run(runs, tmp_path):
    with pytest.raises(SystemExit, match=r"--systems: \['CMLM \(10 it.\)'\] in no run"):
        learning_curve.main(args(runs, "--systems", "ELMER-Soft", "CMLM (10 it.)", out=tmp_path / "lc"))


def test_run_without_label(runs, tmp_path):
    with pytest.raises(SystemExit, match="expected LABEL=DIR"):
        learning_curve.main(["--runs", str(runs["paper-600"]), "--out", str(tmp_path / "lc")])


def test_folder_without_rows(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no rows/ folder"):
        learning_curve.main(["--runs", f"paper={tmp_path / 'empty'}", "--out", str(tmp_path / "lc")])


def test_rows_folder_without_json(tmp_path):
    (tmp_path / "unfinished" / "rows").mkdir(parents=True)
    with pytest.raises(SystemExit, match=r"no \*\.json rows"):
        learning_curve.main(["--runs", f"paper={tmp_path / 'unfinished'}", "--out", str(tmp_path / "lc")])


def test_same_point_in_two_runs_names_both(runs, tmp_path):
    again = run_folder(tmp_path, "paper-600-again", row("ELMER-Soft", 600, 23.0, 98.0))
    with pytest.raises(SystemExit, match="ELMER-Soft.* at 600 updates in two runs") as failure:
        learning_curve.main(["--runs", f"paper={runs['paper-600']}", f"paper={again}", "--out", str(tmp_path / "lc")])
    assert str(runs["paper-600"]) in str(failure.value) and str(again) in str(failure.value)
    assert not (tmp_path / "lc").exists()  # nothing written on a failed run


def test_after_counts_a_second_stage_from_the_updates_it_started_from(runs, tmp_path):
    stage = run_folder(tmp_path, "then-ctc-300", row("ELMER-Soft + KD", 300, 26.3, 0.0))
    out = tmp_path / "lc"
    learning_curve.main(["--runs", f"glance+KD={runs['kd-600']}", f"glance+KD, then CTC={stage}",
                         "--after", "glance+KD, then CTC=600", "--out", str(out)])
    assert [(r["recipe"], r["updates"]) for r in read_csv(out)] == [("glance+KD", "600"),
                                                                    ("glance+KD, then CTC", "900")]
    with pytest.raises(SystemExit, match=r"--after: \['CTC'\] name no recipe"):
        learning_curve.main(["--runs", f"glance+KD={runs['kd-600']}", "--after", "CTC=600", "--out", str(out)])
    with pytest.raises(SystemExit, match="expected LABEL=N"):
        learning_curve.main(["--runs", f"glance+KD={runs['kd-600']}", "--after", "glance+KD=six", "--out", str(out)])
