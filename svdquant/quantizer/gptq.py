"""GPTQ for the 4-bit residual: round one input channel at a time and push each rounding error onto
the channels not yet rounded, weighted by the inverse Hessian of the layer's inputs."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

RoundFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _inverse_hessian_factor(hessian: torch.Tensor, damp: float) -> torch.Tensor | None:
    """Upper Cholesky factor of H⁻¹ after damping, or None if H stays indefinite."""
    mean_diag = hessian.diagonal().double().mean().clamp_min(1e-12)
    for attempt in range(4):
        # At most two K×K float64 matrices alive at a time: K is 12288 for FLUX.1's MLP down projections.
        damped = hessian.to(torch.float64, copy=True)
        damped.diagonal().add_((damp * 10**attempt) * mean_diag)
        lower, info = torch.linalg.cholesky_ex(damped)
        del damped
        if info == 0:
            inverse = torch.cholesky_inverse(lower)
            del lower
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            del inverse
            if info == 0:
                return upper.float()
    return None


def gptq(
    residual: torch.Tensor,
    hessian: torch.Tensor,
    scales: torch.Tensor,
    group: int,
    round_fn: RoundFn,
    block: int = 128,
    damp: float = 0.01,
) -> torch.Tensor | None:
    """Dequantized GPTQ rounding of ``residual`` (N, K) with fixed per-group ``scales`` (N, K/group).

    ``hessian`` is Σ xᵀx of the inputs the residual multiplies. Returns None when the Hessian cannot be
    factored even with strong damping (the caller keeps RTN)."""
    w = residual.float().clone()
    h = hessian.float().clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    upper = _inverse_hessian_factor(h, damp)
    del h
    if upper is None:
        log.warning("GPTQ: the calibration Hessian is not positive definite; keeping round-to-nearest")
        return None
    k = w.shape[1]
    result = torch.zeros_like(w)
    for start in range(0, k, block):
        stop = min(start + block, k)
        cols = w[:, start:stop].clone()
        errors = torch.zeros_like(cols)
        factor = upper[start:stop, start:stop]
        for j in range(stop - start):
            column = cols[:, j]
            scale = scales[:, (start + j) // group]
            rounded = round_fn(column.unsqueeze(1), scale.unsqueeze(1)).squeeze(1)
            result[:, start + j] = rounded
            error = (column - rounded) / factor[j, j]
            cols[:, j:] -= error.unsqueeze(1) * factor[j, j:].unsqueeze(0)
            errors[:, j] = error
        w[:, stop:] -= errors @ upper[start:stop, stop:]
    return result
