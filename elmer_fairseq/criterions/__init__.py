from . import elmer_loss  # noqa: F401
