from . import elmer_translation  # noqa: F401
