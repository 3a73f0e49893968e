"""The index formulas the CUDA kernels use to read the checkpoint's packed tensors, checked on the CPU
against svdquant/packing.py, and the arithmetic of the sm_90+/sm_120 INT4 path (4-bit codes spread
into bytes for the s8 MMA) checked against the PTX fragment definitions. No GPU, no compiler.

Lane notation as in the kernels: lane = 4·g + t.
"""

from __future__ import annotations

import torch

from comfyui_svdquant.svdquant import packing

GEN = torch.Generator().manual_seed(0)  # a private generator: the global RNG stays untouched
LANE = torch.arange(32)
G, T = LANE // 4, LANE % 4


def _nibbles(words: torch.Tensor, signed: bool) -> torch.Tensor:
    """int32 words (...,) → (..., 8) nibbles, nibble e = bits 4e..4e+3."""
    out = torch.stack([(words >> (4 * e)) & 0xF for e in range(8)], dim=-1)
    return (out ^ 8) - 8 if signed else out


def test_qweight_words_are_two_m16n8k64_b_fragments():
    # gemm_w4a4.cu: word (nh, kh) of lane (g, t) in block (nt, kt, np) is the B register kh of the MMA
    # for columns 16·np + 8·nh + g, rows (k) 8t + e + 32·kh.
    n, k = 256, 192
    codes = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=GEN)
    words = packing.pack_qweight(codes).view(torch.int32).reshape(n // 128, k // 64, 8, 32, 2, 2)
    nib = _nibbles(words, signed=True)  # [nt][kt][np][lane][nh][kh][e]
    nt, kt, np_, lane, nh, kh, e = torch.meshgrid(*[torch.arange(s) for s in nib.shape], indexing="ij")
    rows = 128 * nt + 16 * np_ + 8 * nh + G[lane]
    cols = 64 * kt + 32 * kh + 8 * T[lane] + e
    assert torch.equal(nib, codes[rows, cols].to(nib.dtype))


def test_int4_scales_and_vectors_in_lane_order():
    # gemm_w4a4.cu: the (K/64, N) wscales are 128 values per (n tile, group), contiguous; the four at
    # 16·a + 4t of such a block are columns 16·a + 8·nh + 2t + d in the order (nh, d). Bias and
    # wcscales are the same with one group.
    n, groups = 384, 3
    scales = torch.arange(n * groups, dtype=torch.float32).reshape(n, groups)
    for packed, ngroups in ((packing.pack_scales(scales).reshape(-1), groups),
                            (packing.pack_vector(scales[:, 0]), 1)):
        tile, grp, a, t, nh, d = torch.meshgrid(*[torch.arange(s) for s in (n // 128, ngroups, 8, 4, 2, 2)],
                                                indexing="ij")
        pos = (tile * ngroups + grp) * 128 + 16 * a + 4 * t + 2 * nh + d
        col = 128 * tile + 16 * a + 8 * nh + 2 * t + d
        assert torch.equal(packed[pos], scales[col, grp])


def test_smooth_pairs_in_a_256_column_chunk():
    # quantize.cu smooth_pair_pos: columns 8j + 2c + d sit at ((8j & ~15) | ((8j >> 2) & 2)) + 4c + d.
    k = 512
    packed = packing.pack_vector(torch.arange(k, dtype=torch.float32))
    chunk, j, c, d = torch.meshgrid(*[torch.arange(s) for s in (k // 256, 32, 4, 2)], indexing="ij")
    col = 8 * j
    pos = 256 * chunk + ((col & ~15) | ((col >> 2) & 2)) + 4 * c + d
    assert torch.equal(packed[pos], (256 * chunk + col + 2 * c + d).float())


def test_branch_factors_are_m16n8k16_b_fragments():
    # quantize.cu (down) and gemm_w4a4.cu (up): half e of word (nh, kh) of lane (g, t) in tile (a, b) is
    # B[k = 8·kh + 2t + e][n = 8·nh + g] of that 16x16 tile.
    r, k, n = 32, 64, 48
    down = torch.randn(r, k, generator=GEN)
    up = torch.randn(n, r, generator=GEN)
    pd = packing.pack_down(down).reshape(k // 16, r // 16, 32, 2, 2, 2)  # [kt][rt][lane][nh][kh][e]
    pu = packing.pack_up(up).reshape(n // 16, r // 16, 32, 2, 2, 2)  # [nt][rt][lane][nh][kh][e]
    kt, rt, lane, nh, kh, e = torch.meshgrid(*[torch.arange(s) for s in pd.shape], indexing="ij")
    assert torch.equal(pd, down[16 * rt + 8 * nh + G[lane], 16 * kt + 8 * kh + 2 * T[lane] + e])
    nt, rt, lane, nh, kh, e = torch.meshgrid(*[torch.arange(s) for s in pu.shape], indexing="ij")
    assert torch.equal(pu, up[16 * nt + 8 * nh + G[lane], 16 * rt + 8 * kh + 2 * T[lane] + e])


def test_nvfp4_weight_scales_match_the_scale_b_selector():
    # gemm_w4a4.cu: warp column block wn reads word wn of each lane; the MMA for its column tile
    # TB = 0..3 takes lane (g, TB)'s register: byte q must scale column 32·wn + 8·TB + g, group 4kt + q.
    n, groups = 256, 8
    scales = torch.arange(n * groups, dtype=torch.int32).reshape(n, groups) % 255
    scales8 = scales.to(torch.uint8).view(torch.float8_e4m3fn)
    packed = packing.pack_fp8_scales(scales8).view(torch.uint8).reshape(-1)
    nt, kt, lane, wn, q = torch.meshgrid(*[torch.arange(s) for s in (n // 128, groups // 4, 32, 4, 4)], indexing="ij")
    offset = (nt * (groups // 4) + kt) * 512 + 16 * lane + 4 * wn + q
    col = 128 * nt + 32 * wn + 8 * T[lane] + G[lane]
    assert torch.equal(packed[offset], scales[col, 4 * kt + q].to(torch.uint8))


def _a_fragment(a: torch.Tensor) -> torch.Tensor:
    """(16, 64) nibbles → (32 lanes, 4 words), as kernel 1 writes them (m16n8k64 A layout)."""
    words = torch.zeros(32, 4, dtype=torch.int64)
    for reg in range(4):
        rows, cols = G + 8 * (reg & 1), 8 * T + 32 * (reg >> 1)
        for e in range(8):
            words[:, reg] |= (a[rows, cols + e].long() & 0xF) << (4 * e)
    return words


def _b_fragment(b: torch.Tensor) -> torch.Tensor:
    """(64, 8) nibbles → (32 lanes, 2 words) (m16n8k64 B layout)."""
    words = torch.zeros(32, 2, dtype=torch.int64)
    for reg in range(2):
        for e in range(8):
            words[:, reg] |= (b[8 * T + 32 * reg + e, G].long() & 0xF) << (4 * e)
    return words


def _bytes(words: torch.Tensor, signed: bool) -> torch.Tensor:
    out = torch.stack([(words >> (8 * i)) & 0xFF for i in range(4)], dim=-1)
    return (out ^ 0x80) - 0x80 if signed else out


def _mma_16832(a_words: torch.Tensor, b_words: torch.Tensor, a_signed: bool) -> torch.Tensor:
    """PTX m16n8k32 .s8/.u8 x .s8 on fragment words: (32, 4) and (32, 2) → (16, 8) int."""
    a = torch.zeros(16, 32, dtype=torch.int64)
    b = torch.zeros(32, 8, dtype=torch.int64)
    for reg in range(4):  # A: row g (+8 for odd regs), columns 4t..4t+3 (+16 for regs 2, 3)
        vals = _bytes(a_words[:, reg], a_signed)
        for i in range(4):
            a[G + 8 * (reg & 1), 4 * T + 16 * (reg >> 1) + i] = vals[:, i]
    for reg in range(2):  # B: rows 4t..4t+3 (+16 for reg 1), column g
        vals = _bytes(b_words[:, reg], True)
        for i in range(4):
            b[4 * T + 16 * reg + i, G] = vals[:, i]
    return a @ b


def test_int4_as_two_s8_mmas_equals_the_s4_mma():
    # common.cuh Int4Mma on sm_90+: even nibbles → first m16n8k32, odd → second; signed A and all B
    # nibbles go to the byte's high half (×16), unsigned A stays in the low half.
    for signed, unit in ((True, 256), (False, 16)):
        a = torch.randint(-8, 8, (16, 64), generator=GEN) if signed else torch.randint(0, 16, (16, 64), generator=GEN)
        b = torch.randint(-8, 8, (64, 8), generator=GEN)
        aw, bw = _a_fragment(a), _b_fragment(b)
        m = 0xFFFFFFFF
        if signed:
            a_even, a_odd = (aw << 4) & 0xF0F0F0F0 & m, aw & 0xF0F0F0F0
        else:
            a_even, a_odd = aw & 0x0F0F0F0F, (aw >> 4) & 0x0F0F0F0F
        b_even, b_odd = (bw << 4) & 0xF0F0F0F0 & m, bw & 0xF0F0F0F0
        spread = _mma_16832(a_even, b_even, signed) + _mma_16832(a_odd, b_odd, signed)
        assert torch.equal(spread, unit * (a @ b))
        assert spread.abs().max() < 2**22  # the magic-number conversion below stays exact


def test_magic_number_conversion_is_exact():
    # gemm_w4a4.cu: the MMA adds its int32 sum x to 0x4B400000, which as fp32 is 1.5·2^23 + x; then
    # fma(bits, cs, -1.5·2^23·cs) is round(x·cs) provided -1.5·2^23·cs is exact in fp32, which holds for
    # every 16-bit scale cs below 2^100 (also divided by the s8 path's psum units 16 and 256).
    x = torch.cat([torch.arange(-5000, 5000), torch.tensor([-(2**22), 2**22 - 1, 123456, -999999])]).to(torch.int32)
    assert torch.equal((x + 0x4B400000).view(torch.float32) - 12582912.0, x.float())
    for dtype in (torch.bfloat16, torch.float16):
        bits = torch.arange(1, 0x7C00 if dtype == torch.float16 else 0x7F80, dtype=torch.int32).to(torch.int16)
        for unit in (1.0, 16.0, 256.0):
            cs = bits.view(dtype).float() / unit
            cs = cs[cs < 2.0**100]
            assert torch.equal((cs * -12582912.0).double(), cs.double() * -12582912.0)
