"""The 16-bit low-rank branch: top singular directions of the smoothed weight."""

from __future__ import annotations

import torch

EXACT_SVD_LIMIT = 1024  # below this smaller side an exact decomposition is cheap enough
OVERSAMPLE = 16  # extra directions of the randomized range finder


def top_singular(
    a: torch.Tensor, rank: int, power_iterations: int | None = None, seed: int = 0,
    start: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U (N, r), S (r,), Vh (r, K)) of the best rank-``rank`` approximation of ``a`` (float64).

    ``power_iterations`` None: exact for small matrices (the eigenvectors of the smaller Gram matrix,
    several times faster than a full SVD), else 4 power iterations. Otherwise, and for large matrices, a
    seeded randomized range finder with that many power iterations (deterministic, and O(N·K·r) instead
    of the full SVD's O(N·K·min(N, K))), started from the directions ``start`` (c, K) when given: a
    previous answer for a nearby matrix, from which few power iterations reach the same accuracy.
    """
    if power_iterations is None:
        if min(a.shape) <= EXACT_SVD_LIMIT:
            return _gram_top(a, rank)
        power_iterations = 4
    width = min(rank + OVERSAMPLE, min(a.shape))
    generator = torch.Generator(device=a.device).manual_seed(seed)
    probe = torch.randn(a.shape[1], width, generator=generator, device=a.device, dtype=a.dtype)
    if start is not None:
        probe[:, : start.shape[0]] = start.T.to(a.dtype)
    basis, _ = torch.linalg.qr(a @ probe)
    for _ in range(power_iterations):
        basis, _ = torch.linalg.qr(a.T @ basis)
        basis, _ = torch.linalg.qr(a @ basis)
    u_small, s, vh = torch.linalg.svd(basis.T @ a, full_matrices=False)
    return (basis @ u_small)[:, :rank], s[:rank], vh[:rank]


def _gram_top(a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top singular triplets from the eigenvectors of the smaller of AᵀA and AAᵀ (ascending order)."""
    tall = a.shape[0] >= a.shape[1]
    values, vectors = torch.linalg.eigh(a.T @ a if tall else a @ a.T)
    vectors = vectors[:, -rank:].flip(1)
    s = values[-rank:].flip(0).clamp_min(0).sqrt()
    safe = torch.where(s > 0, s, torch.ones_like(s))
    if tall:  # vectors are V: U = A V / s
        return (a @ vectors) / safe, s, vectors.T
    return vectors, s, (vectors.T @ a) / safe[:, None]


def branch_factors(
    smoothed_weight: torch.Tensor, smooth: torch.Tensor, rank: int, dtype: torch.dtype,
    power_iterations: int | None = None, start: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """16-bit (down (R, K) for the raw input, up (N, R)) of the rank-R part of ``W·diag(smooth)``.

    The branch runs on the raw input, so down is divided by the smoothing factor here. ``start``: a
    previous branch's down, to start the randomized range finder from."""
    smooth = smooth.to(smoothed_weight.dtype)
    if start is not None:
        start = start.to(smoothed_weight.dtype) * smooth
    u, s, vh = top_singular(smoothed_weight, rank, power_iterations, start=start)
    return (vh / smooth).to(dtype), (u * s).to(dtype)
