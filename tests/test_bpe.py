"""`--bpe byte_bpe_ids` (elmer_fairseq/bpe.py ByteBPEIds): the byte-level BPE of
examples/TASK/prepare.py, its pieces written as ids. (`--bpe wordpiece`: tests/test_wordpiece.py.)"""
import argparse
import json

import pytest
from fairseq.data import encoders

from conftest import XSUM_TINY


@pytest.fixture(scope="module")
def bpe_files(tmp_path_factory):
    """vocab.json and merges.txt of a byte-level BPE trained on the XSum articles in tests/data."""
    from tokenizers import ByteLevelBPETokenizer

    folder = tmp_path_factory.mktemp("byte_bpe")
    rows = [json.loads(line) for line in XSUM_TINY.read_text(encoding="utf-8").splitlines()]
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator([" " + r["document"] for r in rows], vocab_size=600, min_frequency=2, special_tokens=[])
    tok.save_model(str(folder))
    return folder


def build(folder, name="byte_bpe_ids"):
    return encoders.build_bpe(argparse.Namespace(bpe=name, bpe_vocab=str(folder / "vocab.json"),
                                                 bpe_merges=str(folder / "merges.txt"), bpe_add_prefix_space=False))


def test_byte_bpe_ids_decode_skips_symbols_that_are_not_ids(bpe_files):
    bpe = build(bpe_files)
    text = " The council said the café – and the naïve road – would reopen on Tuesday."
    ids = bpe.encode(text)
    assert ids.split() and all(piece.isdigit() for piece in ids.split())
    assert bpe.decode(ids) == text  # multi-byte characters, split over several byte ids, come back whole
    # what a model may predict besides BPE ids has no bytes: it leaves no text
    pieces = ids.split()
    noisy = " ".join(["<s>", *pieces[:3], "<unk>", "<mask>", *pieces[3:], "</s>", "<pad>"])
    assert bpe.decode(noisy) == text
    assert bpe.decode("") == "" and bpe.decode("<unk> </s>") == ""
    with pytest.raises(ValueError):  # fairseq's own hf_byte_bpe, which byte_bpe_ids exists to replace
        build(bpe_files, "hf_byte_bpe").decode(noisy)


def test_byte_bpe_ids_names_a_missing_file(bpe_files, tmp_path):
    (tmp_path / "vocab.json").write_bytes((bpe_files / "vocab.json").read_bytes())
    with pytest.raises(FileNotFoundError, match=f"--bpe-merges {tmp_path / 'merges.txt'}: no such file"):
        build(tmp_path)
