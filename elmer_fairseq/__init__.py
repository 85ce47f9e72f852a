"""ELMER for fairseq. `--user-dir` imports this package, which registers everything with fairseq
and installs the plugin's patches of fairseq (elmer_fairseq/patches.py; ELMER_FAIRSEQ_NO_PATCHES=1
leaves fairseq untouched). `elmer_fairseq.ops`, the off-ramp op, needs torch only: without
fairseq the package imports and registers nothing."""
import os
import sys

if "torch" not in sys.modules:
    # elmer-generate, elmer-convert, python -m elmer_fairseq.launch, a script that imports this
    # first: torch is about to load, and with it the OpenMP runtime, which reads this once. Idle
    # threads then sleep instead of spinning at every barrier, which made training ~3x slower
    # while another job held a core (docs/speed.md). A value set by the caller wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

try:
    import fairseq as _fairseq
except ModuleNotFoundError as e:
    if e.name != "fairseq":  # fairseq is there but something it needs is not: say what
        raise
    _fairseq = None

if _fairseq is not None:
    from . import patches

    patches.install()  # before anything loads a checkpoint
    from . import bpe, criterions, models, tasks  # noqa: F401,E402
    from .hub import ELMER  # noqa: F401,E402


def __getattr__(name):  # only reached without fairseq
    if name == "ELMER":
        raise ImportError("elmer_fairseq.ELMER needs fairseq 0.12: pip install fairseq-fixed==0.12.3.1 "
                          "(Python >= 3.11) or fairseq==0.12.2")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
