"""Chooses the off-ramp implementation (placeholder: the PyTorch reference only)."""
from .off_ramp import off_ramp_reference as off_ramp  # noqa: F401
