"""Candidate numerics for a Hopper (sm_90) kernel that runs an INT4 SVDQuant layer's tensors with one scale
per token and one per output channel, so that the K loop is a plain 8-bit GEMM and every scale is applied
once, in the epilogue. Not the default: :mod:`.int4` defines what today's kernels compute; these recipes
are measured against it (``benchmarks/hopper_recipe_quality.py``) before any kernel may use one.

Each recipe is emulated as a kernel would compute it: 8-bit operands, an exact integer sum (in float64,
exact for |sum| < 2**53: at most 127·255·K), converted once to fp32, times the token scale, times the
channel scale (two fp32 multiplications), then the layer's 16-bit branch and bias as the reference adds them.

Activations (all recipes): the input plus the GELU shift where the layer reads a GELU output, divided by
the smoothing factor (the same fp32 operations as :func:`.int4.quantize_activations`), then per token over
all K: INT8 ``absmax / 127`` in [-127, 127], or for shifted (non-negative) inputs UINT8 ``max / 255`` in
[0, 255] (``wgmma … .u8.s8``); FP8 e4m3 ``absmax / 448``.

Weights, per output channel n, from the file's codes w4 and group scales s (N, K/64):
- ``"a8-folded"`` (A): v = w4·s exactly in fp32; c[n] = max|v| / 127; w8 = round(v / c) in [-127, 127].
- ``"a8-intscale"`` (B): integer group scales q[n, g] = round(s / c[n]) in [0, qmax], c[n] = max_g s / qmax,
  qmax = 18 where the row's codes are within ±7 (7·18 = 126) and 16 where a code is -8 (-8·16 = -128);
  w8 = w4·q exactly (a byte multiply). The only new rounding is the scales'.
- ``"a8-intscale-fit"`` (B'): as B with c[n] = max s / t, t the best of 1 (B) and 64 values in [qmax / 4, 1.5·qmax]
  by the row's weight error Σ_g ‖w4_g‖² (s_g − c·q_g)² (t > qmax trades the top groups' scales, clipped
  to qmax·c, for finer steps in the small ones).
- ``"fp8"`` (C): v as in A; c[n] = max|v| / 448; w8 = e4m3(v / c). The sum is exact here; Hopper's FP8
  tensor cores accumulate with fewer bits, so C's figures are a lower bound of its error.
"""

from __future__ import annotations

import torch

from . import int4, packing

RECIPES = ("a8-folded", "a8-intscale", "a8-intscale-fit", "fp8")
FP8_MAX = 448.0
FIT_CANDIDATES = 64


def _fp8(values: torch.Tensor) -> torch.Tensor:
    """Round fp32 to e4m3 (nearest even), as fp32 values."""
    return values.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()


def quantize_activations(x: torch.Tensor, smooth: torch.Tensor, unsigned: bool, fp8: bool = False
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token 8-bit codes (M, K) as fp32 values and fp32 scales (M,)."""
    xs = x.float()
    if unsigned:
        xs = xs + int4.GELU_SHIFT
    xs = xs / smooth.float()
    if fp8:
        scales = int4.divide(xs.abs().amax(dim=-1), FP8_MAX)
        return _fp8(int4._divide_or_zero(xs, scales.unsqueeze(-1))), scales
    if unsigned:
        scales, low, high = int4.divide(xs.amax(dim=-1).clamp_min(0), 255), 0, 255
    else:
        scales, low, high = int4.divide(xs.abs().amax(dim=-1), 127), -127, 127
    return torch.round(int4._divide_or_zero(xs, scales.unsqueeze(-1))).clamp_(low, high), scales


def folded_weight(codes: torch.Tensor, scales: torch.Tensor, fp8: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Recipes A and C: per-channel 8-bit weights (N, K) as fp32 values and fp32 channel scales (N,)."""
    values = int4.dequantize_weight(codes, scales)
    top = FP8_MAX if fp8 else 127
    channel = int4.divide(values.abs().amax(dim=1), top)
    scaled = int4._divide_or_zero(values, channel.unsqueeze(1))
    return (_fp8(scaled) if fp8 else torch.round(scaled).clamp_(-127, 127)), channel


def integer_scale_limit(codes: torch.Tensor) -> torch.Tensor:
    """Per row, the largest integer group scale whose products with the row's codes fit in int8."""
    return torch.where(codes.amin(dim=1) < -7, 16.0, 18.0)


def integer_scales(codes: torch.Tensor, scales: torch.Tensor, fit: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Recipe B (B' with ``fit``): integer group scales q (N, K/64) as fp32 values, channel scales c (N,)."""
    s = scales.float()
    qmax = integer_scale_limit(codes)
    top = s.amax(dim=1)

    def rounded(channel: torch.Tensor) -> torch.Tensor:
        return torch.minimum(torch.round(int4._divide_or_zero(s, channel.unsqueeze(1))), qmax.unsqueeze(1))

    if not fit:
        channel = top / qmax
        return rounded(channel), channel
    energy = int4._grouped(codes.float(), int4.GROUP).square().sum(dim=-1)  # ‖w4_g‖², (N, G)
    best_err = torch.full_like(top, float("inf"))
    best = top / qmax
    for t in torch.cat([torch.ones(1), torch.linspace(0.25, 1.5, FIT_CANDIDATES)]):  # B's choice first
        channel = top / (qmax * t)
        err = ((s - channel.unsqueeze(1) * rounded(channel)).square() * energy).sum(dim=1)
        better = err < best_err
        best_err, best = torch.where(better, err, best_err), torch.where(better, channel, best)
    return rounded(best), best


def weight(layer, recipe: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The recipe's 8-bit weight operand (Np, Kp) as fp32 values and fp32 channel scales (Np,)."""
    codes, scales = layer.weight_codes_and_scales()
    if recipe in ("a8-folded", "fp8"):
        return folded_weight(codes, scales, fp8=recipe == "fp8")
    q, channel = integer_scales(codes, scales, fit=recipe == "a8-intscale-fit")
    return codes.float() * q.repeat_interleave(int4.GROUP, dim=1), channel


def gemm(a: torch.Tensor, a_scales: torch.Tensor, w: torch.Tensor, w_scales: torch.Tensor) -> torch.Tensor:
    """fp32 (M, N): the exact sum of 8-bit products, rounded once to fp32, times the token scale, times the
    channel scale."""
    acc = (a.double() @ w.double().T).float()
    return acc * a_scales.unsqueeze(1) * w_scales.unsqueeze(0)


def forward(layer, x: torch.Tensor, recipe: str) -> torch.Tensor:
    """What a kernel of ``recipe`` computes for an INT4 :class:`.layers.W4A4Linear` and input (M, in_features),
    in x's dtype."""
    if recipe not in RECIPES:
        raise ValueError(f"recipe = {recipe!r}: expected one of {RECIPES}")
    if layer.precision != "int4":
        raise ValueError(f"recipe {recipe} reads an INT4 layer, not {layer.precision}")
    kp = layer.qweight.shape[1] * 2
    xp = packing.pad_to(x, (x.shape[0], kp))
    smooth = packing.unpack_vector(layer.smooth_factor)
    a, a_scales = quantize_activations(xp, smooth, layer.act_unsigned, fp8=recipe == "fp8")
    y = gemm(a, a_scales, *weight(layer, recipe))
    return layer.add_branch_and_bias(y, xp)[:, : layer.out_features].to(x.dtype)
