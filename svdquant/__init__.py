"""SVDQuant core: numerics, packed layouts, quantized layers, the quantizer and the checkpoint format.

Needs only torch and safetensors: no ComfyUI, no GPU, no compiler.
"""

from . import torch_ops  # noqa: F401  (registers torch.ops.svdquant.*, which the layers call under torch.compile)
from .errors import CalibrationError, CheckpointError, ConfigError, SVDQuantError
from .layers import ConcatLinear, SplitInputLinear, W4A4Linear, W4A16Linear

__all__ = [
    "CalibrationError",
    "CheckpointError",
    "ConcatLinear",
    "ConfigError",
    "SVDQuantError",
    "SplitInputLinear",
    "W4A4Linear",
    "W4A16Linear",
]
