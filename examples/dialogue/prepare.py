#!/usr/bin/env python
"""Dialogue, PersonaChat-like: previous turns -> next turn.

    python examples/dialogue/prepare.py --out data/dialogue

Data: chitchat-dataset==0.9.0 from PyPI, 7,168 human-human chats (MIT); it stands in for
PersonaChat (no persona). A sample is the last --history turns (a turn = one speaker's
consecutive messages) joined by a separator -> the next turn. Split over chats; valid and test
keep one sample per chat.
"""
import json
from pathlib import Path

from elmer_fairseq import taskdata

SOURCE = ("chitchat-dataset==0.9.0", "chitchat_dataset/dataset.json")


def groups(path: Path, history: int):
    """One group per chat: [(previous turns joined by <sep>, next turn), ...]."""
    try:
        chats = json.loads(path.read_text(encoding="utf-8"))
        turns = [[" ".join(" ".join(m["text"].split()) for m in turn) for turn in chat["messages"]]
                 for _, chat in sorted(chats.items())]
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise SystemExit(f"{path}: not a chitchat dataset.json ({e})")
    sep = f" {taskdata.SEP} "
    return [[(sep.join(t[i - history: i]), t[i]) for i in range(history, len(t)) if t[i].strip()]
            for t in turns if len(t) > history]


if __name__ == "__main__":
    p = taskdata.parser("dialogue", __doc__)
    p.add_argument("--history", type=int, default=2, help="previous turns in the source (default: 2)")
    args = p.parse_args()
    taskdata.prepare("dialogue", SOURCE, lambda path: groups(path, args.history), args, one_per_group=True)
