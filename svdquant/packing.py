"""The packed tensor layouts of SVDQuant checkpoints (the nunchaku layout), both ways.

Every layout is a reshape + permute: the permuted order is the order in which a warp's lanes read
the data for ``mma.sync`` fragments, so a kernel loads each lane's share with one wide load.
Index names: ``n`` output channel, ``k`` input channel, ``r`` rank. All packers require the padded
sizes (N and K multiples of 128, R a multiple of 16); :func:`pad_to` produces them.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

TILE = 128  # N and K of every W4A4 / W4A16 tensor are padded to this
RANK_TILE = 16  # the low-rank branch's rank is padded to this

if sys.byteorder != "little":  # int32 words are viewed as int8 bytes below
    raise ImportError("SVDQuant packing assumes a little-endian machine")


def round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


def pad_to(t: torch.Tensor, sizes: tuple[int, ...], value: float = 0.0) -> torch.Tensor:
    """Zero-pad (or ``value``-pad) the trailing end of each dimension up to ``sizes``."""
    pads: list[int] = []
    for dim in reversed(range(t.ndim)):
        pads += [0, sizes[dim] - t.shape[dim]]
    if not any(pads):
        return t
    if t.dtype == torch.float8_e4m3fn:
        byte = torch.tensor(value).to(t.dtype).view(torch.uint8).item()
        return F.pad(t.view(torch.uint8), pads, value=byte).view(t.dtype)
    return F.pad(t, pads, value=value)


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    # Permuting float8 tensors is not implemented everywhere; move their bytes instead.
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


# --- 4-bit weight codes (W4A4 qweight, INT4 and NVFP4 alike) -----------------------------------
# n = 128·nt + 16·np + 8·nh + nl        (nt tiles of 128 rows, np 8 packs, nh 2 halves, nl 8 lanes)
# k =  64·kt + 32·kh + 8·kl + e         (kt tiles of 64, kh 2 halves, kl 4 lanes, e 8 nibbles)
# Memory order (nt, kt, np, nl, kl, nh, kh, e): lane 4·nl + kl of a warp holds, for one (np, kt),
# four int32 words (nh, kh) = two m16n8k64 B fragments; nibble e = 0 is the least significant.


def pack_qweight(codes: torch.Tensor) -> torch.Tensor:
    """Integer codes (N, K) (INT4 two's complement or E2M1 codes) → int8 (N, K/2)."""
    n, k = codes.shape
    c = codes.to(torch.int32) & 0xF
    c = c.reshape(n // 128, 8, 2, 8, k // 64, 2, 4, 8).permute(0, 4, 1, 3, 6, 2, 5, 7)
    word = c[..., 0]
    for e in range(1, 8):
        word = word | (c[..., e] << (4 * e))
    return word.contiguous().view(torch.int8).reshape(n, k // 2)


def unpack_qweight(packed: torch.Tensor, signed: bool) -> torch.Tensor:
    """int8 (N, K/2) → codes (N, K): int8 in [-8, 7] if ``signed`` else uint8 in [0, 15]."""
    n, k = packed.shape[0], packed.shape[1] * 2
    words = packed.contiguous().view(torch.int32).reshape(n // 128, k // 64, 8, 8, 4, 2, 2)
    nibbles = torch.stack([(words >> (4 * e)) & 0xF for e in range(8)], dim=-1)
    if signed:
        nibbles = (nibbles ^ 8) - 8
    # (nt, kt, np, nl, kl, nh, kh, e) → (nt, np, nh, nl, kt, kh, kl, e)
    codes = nibbles.permute(0, 2, 5, 3, 1, 6, 4, 7).reshape(n, k)
    return codes.to(torch.int8 if signed else torch.uint8)


# --- 16-bit group scales and per-channel vectors (bias, smooth, wcscales) -----------------------
# n = 128·t + 16·a + 8·b + 2·c + d; memory order (t, g, a, c, b, d). Lane 4·a + c loads the four
# values n ∈ {2c, 2c+1, 8+2c, 9+2c} + 16a of a 128-row tile: the rows its accumulators hold.


def pack_scales(scales: torch.Tensor) -> torch.Tensor:
    """(N, G) → (G, N) in tile order."""
    n, g = scales.shape
    s = _as_bytes(scales).reshape(n // 128, 8, 2, 4, 2, g).permute(0, 5, 1, 3, 2, 4)
    return s.contiguous().reshape(g, n).view(scales.dtype)


def unpack_scales(packed: torch.Tensor) -> torch.Tensor:
    """(G, N) in tile order → (N, G)."""
    g, n = packed.shape
    s = _as_bytes(packed).reshape(n // 128, g, 8, 4, 2, 2).permute(0, 2, 4, 3, 5, 1)
    return s.contiguous().reshape(n, g).view(packed.dtype)


def pack_vector(v: torch.Tensor) -> torch.Tensor:
    return pack_scales(v.reshape(-1, 1)).reshape(-1)


def unpack_vector(v: torch.Tensor) -> torch.Tensor:
    return unpack_scales(v.reshape(1, -1)).reshape(-1)


# --- FP8 group scales of NVFP4 weights (one per 16 input channels) ------------------------------
# n = 128·t + 32·s + 8·a + b, group = 4·kk + q; memory order (t, kk, b, a, s, q): lane 4·b + a holds
# the four 32-bit words s of the rows the block-scaled MMA's scale-B selector assigns to it.


def pack_fp8_scales(scales: torch.Tensor) -> torch.Tensor:
    """(N, K/16) float8 → (K/16, N) float8 in tile order."""
    n, g = scales.shape
    s = _as_bytes(scales).reshape(n // 128, 4, 4, 8, g // 4, 4).permute(0, 4, 3, 2, 1, 5)
    return s.contiguous().reshape(g, n).view(scales.dtype)


def unpack_fp8_scales(packed: torch.Tensor) -> torch.Tensor:
    g, n = packed.shape
    s = _as_bytes(packed).reshape(n // 128, g // 4, 8, 4, 4, 4).permute(0, 4, 3, 2, 1, 5)
    return s.contiguous().reshape(n, g).view(packed.dtype)


# --- Low-rank branch (16-bit), as m16n8k16 B operands ------------------------------------------
# A 16×16 tile with rows i (the MMA's n) and columns j (its k): i = 8·nh + nl, j = 8·kh + 2·kl + e,
# stored in order (nl, kl, nh, kh, e): lane 4·nl + kl holds its two B fragments contiguously.
# down (R, K) is stored as (K, R) with tiles ordered [K/16][R/16] (n = r, k = k);
# up (N, R) is stored as (N, R) with tiles ordered [N/16][R/16] (n = n, k = r).


def _pack_tiles(t: torch.Tensor) -> torch.Tensor:
    # t: (tiles_a, tiles_b, 16, 16) indexed (…, i, j)
    a, b = t.shape[:2]
    t = t.reshape(a, b, 2, 8, 2, 4, 2).permute(0, 1, 3, 5, 2, 4, 6)
    return t.contiguous()


def _unpack_tiles(t: torch.Tensor, a: int, b: int) -> torch.Tensor:
    t = t.reshape(a, b, 8, 4, 2, 2, 2).permute(0, 1, 4, 2, 5, 3, 6)
    return t.reshape(a, b, 16, 16)


def pack_down(down: torch.Tensor) -> torch.Tensor:
    """Logical down projection (R, K) → packed (K, R)."""
    r, k = down.shape
    tiles = down.reshape(r // 16, 16, k // 16, 16).permute(2, 0, 1, 3)
    return _pack_tiles(tiles).reshape(k, r)


def unpack_down(packed: torch.Tensor) -> torch.Tensor:
    k, r = packed.shape
    tiles = _unpack_tiles(packed, k // 16, r // 16)
    return tiles.permute(1, 2, 0, 3).reshape(r, k)


def pack_up(up: torch.Tensor) -> torch.Tensor:
    """Logical up projection (N, R) → packed (N, R)."""
    n, r = up.shape
    tiles = up.reshape(n // 16, 16, r // 16, 16).permute(0, 2, 1, 3)
    return _pack_tiles(tiles).reshape(n, r)


def unpack_up(packed: torch.Tensor) -> torch.Tensor:
    n, r = packed.shape
    tiles = _unpack_tiles(packed, n // 16, r // 16)
    return tiles.permute(0, 2, 1, 3).reshape(n, r)


# --- W4A16 (AWQ / TinyChat GEMV layout) ---------------------------------------------------------
# Within each run of 32 input channels, int16 j (j < 8) holds channels j, 8+j, 16+j, 24+j in its
# nibbles 0..3, so one int16 dequantizes to channels 8 apart (a GEMV thread's stride). Rows are
# interleaved 4 at a time per 64 input channels: (N/4, K/64, 4 rows, 16 int16) viewed as int32.


def pack_awq_qweight(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15 (N, K) → int32 (N/4, K/2)."""
    n, k = codes.shape
    c = codes.to(torch.int32).reshape(n, k // 32, 4, 8)
    half = c[:, :, 0] | (c[:, :, 1] << 4) | (c[:, :, 2] << 8) | (c[:, :, 3] << 12)
    half = half.reshape(n // 4, 4, k // 64, 16).permute(0, 2, 1, 3).reshape(n // 4, k)
    return half.to(torch.int16).contiguous().view(torch.int32)


def unpack_awq_qweight(packed: torch.Tensor) -> torch.Tensor:
    """int32 (N/4, K/2) → uint8 codes (N, K)."""
    n, k = packed.shape[0] * 4, packed.shape[1] * 2
    half = packed.contiguous().view(torch.int16).to(torch.int32) & 0xFFFF
    half = half.reshape(n // 4, k // 64, 4, 16).permute(0, 2, 1, 3).reshape(n, k // 32, 8)
    c = torch.stack([(half >> (4 * q)) & 0xF for q in range(4)], dim=2)
    return c.reshape(n, k).to(torch.uint8)
