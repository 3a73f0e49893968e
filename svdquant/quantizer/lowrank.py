"""The 16-bit low-rank branch: top singular directions of the smoothed weight."""

from __future__ import annotations

import torch

EXACT_SVD_LIMIT = 1024  # below this smaller side a full SVD is cheap enough and exact


def top_singular(
    a: torch.Tensor, rank: int, power_iterations: int = 4, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U (N, r), S (r,), Vh (r, K)) of the best rank-``rank`` approximation of ``a``.

    Large matrices use a seeded randomized range finder with power iterations (deterministic, and
    O(N·K·r) instead of the full SVD's O(N·K·min(N, K))); small ones a full SVD.
    """
    if min(a.shape) <= EXACT_SVD_LIMIT:
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        return u[:, :rank], s[:rank], vh[:rank]
    width = min(rank + 16, min(a.shape))
    generator = torch.Generator(device=a.device).manual_seed(seed)
    probe = torch.randn(a.shape[1], width, generator=generator, device=a.device, dtype=a.dtype)
    basis, _ = torch.linalg.qr(a @ probe)
    for _ in range(power_iterations):
        basis, _ = torch.linalg.qr(a.T @ basis)
        basis, _ = torch.linalg.qr(a @ basis)
    u_small, s, vh = torch.linalg.svd(basis.T @ a, full_matrices=False)
    return (basis @ u_small)[:, :rank], s[:rank], vh[:rank]


def branch_factors(
    smoothed_weight: torch.Tensor, smooth: torch.Tensor, rank: int, dtype: torch.dtype, power_iterations: int = 4
) -> tuple[torch.Tensor, torch.Tensor]:
    """16-bit (down (R, K) for the raw input, up (N, R)) of the rank-R part of ``W·diag(smooth)``.

    The branch runs on the raw input, so down is divided by the smoothing factor here."""
    u, s, vh = top_singular(smoothed_weight, rank, power_iterations)
    up = (u * s).to(dtype)
    down = (vh / smooth.to(vh.dtype)).to(dtype)
    return down, up
