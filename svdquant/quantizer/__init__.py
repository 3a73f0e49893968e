"""The SVDQuant quantizer: calibration statistics, the per-layer recipe, and the block-by-block driver."""

from .linear import QuantizeConfig, QuantizedLinear, quantize_linears, quantize_w4a16
from .stats import InputStats, record_inputs

__all__ = ["InputStats", "QuantizeConfig", "QuantizedLinear", "quantize_linears", "quantize_w4a16", "record_inputs"]
