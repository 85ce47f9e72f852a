"""A pretrained checkpoint's tokenizer.json as fairseq symbols: `--bpe wordpiece` detokenizes what
ELMER generates, and examples/TASK/prepare.py --tokenizer refuses a dictionary of another vocabulary."""
import argparse
import subprocess
import sys

import pytest
from fairseq.data import encoders
from tokenizers import BertWordPieceTokenizer

from conftest import ROOT, XSUM_TINY, cli_env
from elmer_fairseq.bpe import TokenizerVocab


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A WordPiece tokenizer.json with BERT's special tokens (not in fairseq's order)."""
    path = tmp_path_factory.mktemp("wordpiece") / "tokenizer.json"
    tok = BertWordPieceTokenizer(lowercase=True)
    tok.train_from_iterator(["the council reopened the road", "the councillors were reopening roads"],
                            vocab_size=60, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tok.save(str(path))
    return path


def test_symbols_are_pieces_with_fairseqs_specials(tokenizer):
    vocab = TokenizerVocab(tokenizer)
    assert vocab.tokenize(["The council [SEP] reopened Zz"]) == [
        ["the", "council", "</s>", "reopen", "##e", "##d", "<unk>"]]
    assert [vocab.ids[s] for s in ("<s>", "<pad>", "</s>", "<unk>", "<mask>")] == [2, 0, 3, 1, 4]
    dictionary = vocab.dictionary()
    assert dictionary.symbols[:4] == ["<s>", "<pad>", "</s>", "<unk>"] and "[CLS]" not in dictionary


def test_wordpiece_bpe_detokenizes(tokenizer):
    """fairseq's --bpe wordpiece (what fairseq-generate's D- lines and the Python API use): pieces
    joined into words, specials and unknown symbols leave no text."""
    bpe = encoders.build_bpe(argparse.Namespace(bpe="wordpiece", wordpiece_tokenizer=str(tokenizer)))
    assert bpe.encode("The road reopened") == "the road reopen ##e ##d"
    assert bpe.decode("the council reopen ##e ##d <unk> the road <mask> </s> <pad> madeup") == \
        "the council reopened the road"
    assert bpe.is_beginning_of_word("road") and not bpe.is_beginning_of_word("##ed")


def test_wordpiece_bpe_names_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"--wordpiece-tokenizer {tmp_path}/none.json: no such file"):
        encoders.build_bpe(argparse.Namespace(bpe="wordpiece", wordpiece_tokenizer=str(tmp_path / "none.json")))


def prepare(tmp_path, *options):
    return subprocess.run([sys.executable, ROOT / "examples" / "xsum" / "prepare.py", "--input", XSUM_TINY,
                           "--out", tmp_path / "data", "--valid", "4", "--test", "4", "--workers", "1", *options],
                          capture_output=True, text=True, env=cli_env())


def test_prepare_refuses_a_dictionary_of_another_tokenizer(tokenizer, tmp_path):
    """A dict.txt made from another vocabulary (here: one with RoBERTa's pieces) is named with its line."""
    (tmp_path / "dict.txt").write_text("the 5\nĠthe 3\n", encoding="utf-8")
    proc = prepare(tmp_path, "--tokenizer", tokenizer, "--dict", tmp_path / "dict.txt")
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[-1] == (f"{tmp_path / 'dict.txt'}:2: 'Ġthe' is not a symbol of {tokenizer}; "
                                            f"was the dictionary made with another tokenizer?")
    assert not (tmp_path / "data" / "bin").exists()


@pytest.mark.parametrize("options,message", [
    (["--trim-vocab"], "--trim-vocab picks the dictionary of --tokenizer's pieces: give --tokenizer too"),
    (["--tokenizer", "T", "--bpe-size", "100"], "--bpe-size sizes the byte-level BPE trained without --tokenizer"),
    (["--tokenizer", "T", "--dict", "D", "--trim-vocab"], "--dict gives the dictionary, --trim-vocab makes one"),
], ids=["trim-alone", "bpe-size", "both"])
def test_prepare_refuses_inconsistent_options(tmp_path, options, message):
    proc = prepare(tmp_path, *options)
    assert proc.returncode == 1 and message in proc.stderr
