from . import elmer  # noqa: F401
