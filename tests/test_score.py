"""examples/score.py: the demo's table from fairseq-generate logs, stutter columns included."""
import json
import sys

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "examples"))  # examples/ is a folder of scripts, as in test_benchmark
import score  # noqa: E402

LOG = """S-0\tsource
D-0\t-0.1\tIs there a season 3
D-1\t-0.2\tthe the the the
D-2\t-0.3\t
2026-12-07 | INFO | fairseq_cli.generate | Translated 3 sentences (12 tokens) in 0.3s (10.00 sentences/s, 40.00 tokens/s)
"""


def write(tmp_path, log=LOG, refs=("is there a season 3 of the show", "does the sun set", "can a dog swim")):
    (tmp_path / "gen.txt").write_text(log)
    (tmp_path / "refs.txt").write_text("\n".join(refs) + "\n")
    return tmp_path / "gen.txt", tmp_path / "refs.txt"


def test_rows_report_stutter_empties_and_length(tmp_path):
    log, refs = write(tmp_path)
    row = score.score(log, refs, "ELMER")
    assert row["repeat"] == pytest.approx(100 / 3) and row["empty"] == pytest.approx(100 / 3)
    assert row["mean_len"] == pytest.approx(3) and row["ms_per_sample"] == pytest.approx(100)
    assert row["distinct1"] == pytest.approx(100 * 6 / 9)  # 5 + 1 distinct words of 9
    # uncased: a lowercase hypothesis matches a cased reference only once the references are lowercased
    cased = score.score(log, write(tmp_path, refs=("Is There A Season 3", "x", "y"))[1], "ELMER")
    uncased = score.score(log, tmp_path / "refs.txt", "ELMER", uncased=True)
    assert cased["rougeL"] == uncased["rougeL"]  # rouge-score lowercases by itself
    write(tmp_path, log=LOG.replace("Is there", "is there"), refs=("Is There A Season 3", "x", "y"))
    assert score.score(log, tmp_path / "refs.txt", "ELMER", uncased=True)["bleu4"] > \
        score.score(log, tmp_path / "refs.txt", "ELMER")["bleu4"]


def test_main_writes_the_table_and_json(tmp_path, capsys):
    log, refs = write(tmp_path)
    score.main([str(log), "--refs", str(refs), "--names", "ELMER-Soft", "--json", str(tmp_path / "s.json")])
    table = capsys.readouterr().out
    assert "| ELMER-Soft |" in table and "repeat %" in table and "length r" in table
    assert json.loads((tmp_path / "s.json").read_text())[0]["samples"] == 3


def test_missing_hypotheses_and_unfinished_logs_are_errors(tmp_path):
    log, refs = write(tmp_path, refs=("a", "b", "c", "d"))
    with pytest.raises(SystemExit, match="3 hypotheses for 4 references"):
        score.score(log, refs, "ELMER")
    log, refs = write(tmp_path, log="D-0\t-0.1\ta b\n")
    with pytest.raises(SystemExit, match="did fairseq-generate finish"):
        score.score(log, refs, "ELMER")
