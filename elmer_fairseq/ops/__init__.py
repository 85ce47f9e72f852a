from .off_ramp import OffRampOutput, off_ramp_reference
from ._ext import off_ramp, prepare

__all__ = ["OffRampOutput", "off_ramp", "off_ramp_reference", "prepare"]
