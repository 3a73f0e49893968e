"""Per-call choice between a fused kernel and the reference path.

The core knows no kernels: a kernel package installs one function per layer kind with
:func:`install`. The function gets the layer and a 2-D input and returns the output, or ``None``
when it cannot serve that call (CPU tensor, unsupported GPU, dtype), in which case the reference
path runs. Layers whose ``kernel_backend`` is ``"torch"`` never reach a kernel.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

Kernel = Callable[[nn.Module, torch.Tensor], torch.Tensor | None]

_kernels: dict[str, Kernel] = {}


def install(kind: str, kernel: Kernel | None) -> None:
    """Install (or with ``None`` remove) the kernel for ``kind`` ("w4a4" or "w4a16")."""
    if kernel is None:
        _kernels.pop(kind, None)
    else:
        _kernels[kind] = kernel


def installed(kind: str) -> Kernel | None:
    return _kernels.get(kind)


def _run(kind: str, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    kernel = _kernels.get(kind)
    if kernel is not None and layer.kernel_backend != "torch":
        y = kernel(layer, x)
        if y is not None:
            return y
    return layer.reference_forward(x)


def w4a4(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return _run("w4a4", layer, x)


def w4a16(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return _run("w4a16", layer, x)
