"""Errors the pack raises for bad input. Every message names the file, key or setting at fault."""

from __future__ import annotations


class SVDQuantError(ValueError):
    """Base class: something the user gave us (a file, a setting, a model) cannot be used."""


class CheckpointError(SVDQuantError):
    """A checkpoint file is missing, corrupt, foreign or inconsistent with its own metadata."""

    def __init__(self, path: object, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class ConfigError(SVDQuantError):
    """A quantization setting is out of range or contradicts another one."""


class CalibrationError(SVDQuantError):
    """Calibration data is unusable (empty, NaN/Inf, wrong width)."""
