"""examples/length_ceiling.py: how far an input determines its reference's length."""
import json
import sys

import numpy as np
import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "examples"))  # examples/ is a folder of scripts, as in test_benchmark
import length_ceiling  # noqa: E402


def groups_of_two(shared: float, n: int = 3000, seed: int = 0):
    """Sources 'yes </s> passage i' / 'no </s> passage i' whose two lengths share `shared` of their variance."""
    rng = np.random.default_rng(seed)
    f = rng.normal(size=n) * shared ** 0.5
    lengths = np.concatenate([f + rng.normal(size=n) * (1 - shared) ** 0.5 for _ in range(2)])
    sources = [[answer, "</s>", "passage", str(i)] for answer in ("yes", "no") for i in range(n)]
    return sources, lengths


@pytest.mark.parametrize("shared", [0.0, 0.3, 0.7])
def test_two_references_of_one_input_estimate_the_shared_variance(shared):
    sources, lengths = groups_of_two(shared)
    r, inputs, pairs = length_ceiling.shared_length_r(sources, lengths, "</s>")
    assert inputs == 3000 and pairs == 6000  # grouped by the passage: the answer word before </s> differs
    assert r == pytest.approx(shared, abs=0.05)


def test_without_the_separator_whole_sources_are_the_groups():
    sources, lengths = groups_of_two(0.7)
    assert length_ceiling.shared_length_r(sources, lengths, "<sep>") == (None, 0, 0)  # no source repeats


def test_ridge_finds_a_length_that_follows_the_features_and_none_in_noise():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2500, 20))
    y = x[:, 0] * 3 + rng.normal(size=2500)
    assert length_ceiling.ridge_r(x[:2000], y[:2000], x[2000:], y[2000:], held_out=500)[0] > 0.9
    noise = rng.normal(size=2500)
    assert abs(length_ceiling.ridge_r(x[:2000], noise[:2000], x[2000:], noise[2000:], held_out=500)[0]) < 0.15


def test_hashed_features_count_pieces_and_length():
    x = length_ceiling.hashed([["a", "b", "a"], []])
    assert x.shape == (2, length_ceiling.BUCKETS + 1)
    assert x[0, -1] == pytest.approx(np.log1p(3)) and x[1].sum() == 0
    assert sorted(x[0, :-1][x[0, :-1] > 0]) == pytest.approx(sorted([np.log1p(1), np.log1p(2)]))


def test_encoder_means_ignore_padding(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "a", "b", "c"])}
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32)
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"vocab": vocab}}))
    alone = length_ceiling.encoder_means([["a", "</s>", "b"]], tmp_path)
    padded = length_ceiling.encoder_means([["a", "</s>", "b"], ["a", "b", "c", "c", "zzz"]], tmp_path)
    assert padded.shape == (2, 16)
    assert padded[0] == pytest.approx(alone[0], abs=1e-5)  # the longer row's padding is masked out
    assert not np.allclose(padded[0], padded[1])


def test_main_reports_every_measure_and_names_a_bad_folder(tmp_path, capsys, monkeypatch):
    sources, lengths = groups_of_two(0.5, n=800)
    lengths = np.clip(np.round(lengths * 2 + 9), 1, None).astype(int)
    for split, rows in (("train", range(1600)), ("test", range(0, 1600, 7))):
        (tmp_path / f"{split}.src").write_text("".join(" ".join(sources[i]) + "\n" for i in rows))
        (tmp_path / f"{split}.raw.tgt").write_text("".join("w " * lengths[i] + "\n" for i in rows))
    monkeypatch.setattr(sys, "argv", ["length_ceiling.py", "--data", str(tmp_path)])
    length_ceiling.main()
    out = capsys.readouterr().out
    assert "800 inputs, 1600 ordered pairs" in out and "best predictor from the input reaches r = sqrt(" in out
    assert "against reference length, test split: undefined, every test source has 4 pieces" in out
    assert "ridge on 4096 hashed" in out
    (tmp_path / "test.raw.tgt").write_text("w\n")
    with pytest.raises(SystemExit, match="test.src has 229 lines, test.raw.tgt 1"):
        length_ceiling.main()
