from . import elmer_lplm, elmer_translation  # noqa: F401
