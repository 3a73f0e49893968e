"""Candidate smoothing factors λ (SmoothQuant-style migration of activation outliers into weights).

λ_k = max|x_k|^α / max|W_{·,k}|^β over the authors' grid: (0, 0), (α, 0) and (α, 1 − α) for
α = 0.05 … 0.95. The quantizer picks the candidate with the lowest output error. λ is rounded to the
16-bit storage dtype here, because the runtime divides by the stored value.
"""

from __future__ import annotations

import torch

DEFAULT_GRID = tuple(round(0.05 * i, 2) for i in range(1, 20))


def candidates(
    input_absmax: torch.Tensor, weight_absmax: torch.Tensor, grid: tuple[float, ...], dtype: torch.dtype
) -> list[tuple[float, float, torch.Tensor]]:
    """[(α, β, λ)] with λ of shape (K,) in ``dtype``; the first candidate is λ = 1 (no smoothing)."""
    pairs = [(0.0, 0.0)] + [(a, 0.0) for a in grid] + [(a, round(1.0 - a, 2)) for a in grid]
    usable = (input_absmax > 0) & (weight_absmax > 0)
    x = input_absmax.double().clamp_min(1e-12).log()
    w = weight_absmax.double().clamp_min(1e-12).log()
    out = []
    for alpha, beta in pairs:
        log_lam = torch.where(usable, alpha * x - beta * w, torch.zeros_like(x))
        # λ is defined up to a constant factor (quantization is scale-invariant per group); centre it
        # on 1 in log space so the 16-bit smooth and branch tensors stay well inside their range.
        if usable.any():
            log_lam = torch.where(usable, log_lam - log_lam[usable].mean(), log_lam)
        out.append((alpha, beta, log_lam.clamp(-20, 20).exp().to(dtype)))
    return out
