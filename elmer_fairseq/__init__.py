"""ELMER for fairseq. `--user-dir` imports this package, which registers everything with fairseq."""
from . import checkpoint  # noqa: F401  (first: lets torch's safe loading open our checkpoints)
from . import bpe, criterions, models, tasks  # noqa: F401
from .hub import ELMER  # noqa: F401,E402
from .distributed import install as _install_distributed_checks  # noqa: E402

_install_distributed_checks()  # fairseq-train: clear errors for bad distributed options, no rendezvous hang
