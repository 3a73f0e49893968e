"""Packed layouts: bit-exact round trips, and spot checks of where an element lands, derived from the
published layout description rather than from our packer."""

import pytest
import torch

from comfyui_svdquant.svdquant import packing


@pytest.mark.parametrize("n,k", [(128, 128), (256, 384), (384, 1024)])
def test_qweight_round_trip(n, k):
    signed = torch.randint(-8, 8, (n, k), dtype=torch.int8)
    packed = packing.pack_qweight(signed)
    assert packed.dtype == torch.int8 and packed.shape == (n, k // 2)
    assert torch.equal(packing.unpack_qweight(packed, signed=True), signed)
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    assert torch.equal(packing.unpack_qweight(packing.pack_qweight(codes), signed=False), codes)


def test_qweight_element_position_follows_the_mma_fragment_layout():
    n, k = 256, 256
    words_per_row_tile = k // 64
    for (row, col) in [(0, 0), (1, 0), (8, 0), (16, 0), (0, 8), (0, 32), (127, 63), (200, 200), (255, 255)]:
        codes = torch.zeros(n, k, dtype=torch.int8)
        codes[row, col] = 5
        words = packing.pack_qweight(codes).view(torch.int32).reshape(-1)
        nt, rem = divmod(row, 128)
        np_, rem = divmod(rem, 16)
        nh, nl = divmod(rem, 8)
        kt, rem = divmod(col, 64)
        kh, rem = divmod(rem, 32)
        kl, e = divmod(rem, 8)
        lane, reg = 4 * nl + kl, 2 * nh + kh
        index = (((nt * words_per_row_tile + kt) * 8 + np_) * 32 + lane) * 4 + reg
        nonzero = torch.nonzero(words).flatten().tolist()
        assert nonzero == [index]
        assert int(words[index]) == 5 << (4 * e)


def test_scale_vectors_follow_the_lane_order():
    v = torch.arange(256, dtype=torch.float32).bfloat16()
    packed = packing.pack_vector(v)
    assert packed[:16].float().tolist() == [0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15]
    assert packed[128:132].float().tolist() == [128, 129, 136, 137]
    assert torch.equal(packing.unpack_vector(packed), v)


def test_group_scales_round_trip_and_tile_major_order():
    s = torch.randn(256, 6).half()
    packed = packing.pack_scales(s)
    assert packed.shape == (6, 256)
    assert torch.equal(packing.unpack_scales(packed), s)
    # the first 128 stored values are group 0 of the first row tile, then group 1 of that tile
    assert torch.equal(packed.reshape(-1)[:128], packing.pack_vector(s[:128, 0].contiguous())[:128])
    assert torch.equal(packed.reshape(-1)[128:256], packing.pack_vector(s[:128, 1].contiguous())[:128])


def test_fp8_scales_round_trip_and_lane_order():
    s = (torch.rand(256, 32) * 400).to(torch.float8_e4m3fn)
    packed = packing.pack_fp8_scales(s)
    assert packed.dtype == torch.float8_e4m3fn and packed.shape == (32, 256)
    assert torch.equal(packing.unpack_fp8_scales(packed).view(torch.uint8), s.view(torch.uint8))
    rows = torch.arange(128).float()
    # row index as scale; the rows checked below are exact in FP8
    s = rows.unsqueeze(1).expand(128, 4).contiguous().to(torch.float8_e4m3fn)
    packed = packing.pack_fp8_scales(s).float().reshape(-1)
    # lane 0 reads rows 0, 32, 64, 96 (four groups each), lane 1 rows 8, 40, 72, 104
    assert packed[:16].tolist() == [0.0] * 4 + [32.0] * 4 + [64.0] * 4 + [96.0] * 4
    assert packed[16:20].tolist() == [8.0] * 4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lowrank_round_trip(dtype):
    down = torch.randn(48, 384).to(dtype)
    up = torch.randn(256, 48).to(dtype)
    pd, pu = packing.pack_down(down), packing.pack_up(up)
    assert pd.shape == (384, 48) and pu.shape == (256, 48)
    assert torch.equal(packing.unpack_down(pd), down) and torch.equal(packing.unpack_up(pu), up)


def test_lowrank_tile_layout():
    up = torch.arange(16 * 16, dtype=torch.float32).reshape(16, 16).bfloat16()  # value = 16·n + r
    flat = packing.pack_up(up).float().reshape(-1)
    # lane 4·nl + kl holds (nh, kh, e) = n ∈ {nl, 8+nl}, r ∈ {2kl, 2kl+1, 8+2kl, 9+2kl}
    assert flat[:8].tolist() == [0, 1, 8, 9, 128, 129, 136, 137]
    assert flat[8:12].tolist() == [2, 3, 10, 11]


def test_awq_round_trip_and_nibble_order():
    codes = torch.randint(0, 16, (128, 256), dtype=torch.uint8)
    packed = packing.pack_awq_qweight(codes)
    assert packed.dtype == torch.int32 and packed.shape == (32, 128)
    assert torch.equal(packing.unpack_awq_qweight(packed), codes)
    one = torch.zeros(128, 256, dtype=torch.uint8)
    one[0, 8], one[0, 24] = 3, 7  # channels 8 and 24 share int16 #0 (nibbles 1 and 3)
    half = packing.pack_awq_qweight(one).view(torch.int16).reshape(-1)
    assert int(half[0]) == (3 << 4) | (7 << 12)


def test_pad_to_fills_fp8_with_the_requested_value():
    s = torch.ones(2, 2).to(torch.float8_e4m3fn)
    padded = packing.pad_to(s, (3, 4), value=1.0)
    assert padded.float().tolist() == [[1, 1, 1, 1]] * 3
