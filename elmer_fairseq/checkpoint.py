"""Safe loading of fairseq checkpoints.

torch >= 2.6 loads with `weights_only=True`, which refuses the few plain Python objects fairseq
stores beside the weights (the argparse Namespace of the run's options, for one). Allow-listing
exactly those keeps torch's protection on instead of asking users to switch it off.
"""
import argparse
import collections

import torch

# What fairseq 0.12 pickles into a checkpoint besides tensors and builtins.
FAIRSEQ_CHECKPOINT_GLOBALS = [argparse.Namespace, collections.OrderedDict, collections.defaultdict]

if hasattr(torch.serialization, "add_safe_globals"):
    torch.serialization.add_safe_globals(FAIRSEQ_CHECKPOINT_GLOBALS)
