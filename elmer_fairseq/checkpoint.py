"""Safe loading of fairseq checkpoints.

torch >= 2.6 loads with `weights_only=True`, which refuses the few plain Python objects fairseq
stores beside the weights (the argparse Namespace of the run's options, for one). Allow-listing
exactly those keeps torch's protection on instead of asking users to switch it off.

A checkpoint that holds anything else, or that is cut short, fails with a message naming the
file and what to do. Objects of a checkpoint one trusts are allowed by name with `trust(...)`, or
for a command line with ELMER_TRUSTED_GLOBALS=module.Name,... (read when the plugin is imported).
The allow-list and fairseq's loader are patched by `elmer_fairseq/patches.py`, at import.
"""
import argparse
import collections
import importlib
import os
import re

import torch

# What fairseq 0.12 pickles into a checkpoint besides tensors and builtins.
FAIRSEQ_CHECKPOINT_GLOBALS = [argparse.Namespace, collections.OrderedDict, collections.defaultdict]


def trust(*names: str):
    """Allows the named Python objects ("module.Name", as the loading error lists them) in every
    checkpoint this process loads. Only for objects of checkpoints from a source one trusts:
    unpickling an allowed class or function may run it."""
    for name in names:
        module, _, attr = name.strip().rpartition(".")
        try:
            found = getattr(importlib.import_module(module), attr)
        except (ImportError, ValueError, AttributeError) as e:
            raise ValueError(f"cannot trust {name!r} (ELMER_TRUSTED_GLOBALS or trust()): not an importable "
                             f"module.Name ({e})") from None
        torch.serialization.add_safe_globals([found])


def unreadable(path, error: Exception):
    """Why torch's safe loading could not read the checkpoint `path` (`error` is what it raised),
    or None when that is not about the file's content (an I/O error such as no permission: the
    caller raises `error` as it is)."""
    if isinstance(error, OSError):
        return None
    try:
        listed = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except OSError:
        return None
    except Exception:  # not a complete archive written by torch.save
        listed = None
    # what it lists, and what only shows once those are allowed (numpy's dtype classes)
    refused = [a or b for a, b in re.findall(r"GLOBAL ([\w.]+) was not an allowed|but got <class '([\w.]+)'>",
                                             str(error))]
    unsafe = list(dict.fromkeys((listed or []) + refused))
    if unsafe:
        return (f"checkpoint {path} holds Python objects that safe loading does not allow: "
                f"{', '.join(unsafe)}. Unpickling them may run code from the file. If you trust "
                f"the file, allow exactly these (besides any allowed before): "
                f"ELMER_TRUSTED_GLOBALS={','.join(unsafe)} before the command, or "
                f"elmer_fairseq.checkpoint.trust({', '.join(map(repr, unsafe))}) in Python")
    if listed is None:
        return (f"checkpoint {path} is truncated or corrupt ({os.path.getsize(path):,} bytes; a copy or "
                f"a training run stopped while writing leaves such a file): copy it again, or use "
                f"another checkpoint of the run (checkpoint_best.pt, checkpoint_<epoch>_<updates>.pt; "
                f"fairseq-train resumes from one with --restore-file)")
    return None
