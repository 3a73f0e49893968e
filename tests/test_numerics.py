"""The numerics contract: INT4, NVFP4 and W4A16 rounding, checked against float64 re-derivations."""

import pytest
import torch

from comfyui_svdquant.svdquant import int4, nvfp4, w4a16


def test_int4_weight_rtn_is_nearest_code_with_16bit_scales():
    w = torch.randn(64, 256, dtype=torch.float64) * 0.05
    codes, scales = int4.quantize_weight(w, torch.bfloat16)
    assert scales.dtype == torch.bfloat16 and scales.shape == (64, 4)
    assert codes.dtype == torch.int8 and int(codes.min()) >= -8 and int(codes.max()) <= 7
    s = scales.double().repeat_interleave(64, dim=1)
    expected = torch.round(w / s).clamp(-8, 7)
    assert torch.equal(codes.double(), expected)
    # every group's absmax maps to ±7 (bf16 rounding of the scale cannot push it to 8)
    assert torch.equal(codes.abs().reshape(64, 4, 64).amax(-1), torch.full((64, 4), 7, dtype=torch.int8))
    assert (int4.dequantize_weight(codes, scales).double() - w).abs().le(s / 2 + 1e-12).all()


def test_int4_all_zero_group_gives_zero_codes_not_nan():
    w = torch.zeros(128, 128)
    w[:, 64:] = torch.randn(128, 64)
    codes, scales = int4.quantize_weight(w, torch.float16)
    assert torch.equal(codes[:, :64], torch.zeros(128, 64, dtype=torch.int8))
    assert torch.isfinite(int4.dequantize_weight(codes, scales)).all()


@pytest.mark.parametrize("unsigned", [False, True])
def test_int4_activations_match_float64_derivation(unsigned):
    torch.manual_seed(1)
    x = torch.randn(33, 192).bfloat16()
    if unsigned:
        x = torch.nn.functional.gelu(x.float(), approximate="tanh").bfloat16()
    smooth = (torch.rand(192) + 0.5).bfloat16()
    codes, scales = int4.quantize_activations(x, smooth, unsigned)
    xs = x.double()
    if unsigned:
        xs = xs + 0.171875
    xs = (xs / smooth.double()).reshape(33, 3, 64)
    if unsigned:
        assert xs.min() >= 0
        ref_scales = xs.amax(-1) / 15
        low, high = 0, 15
    else:
        ref_scales = xs.abs().amax(-1) / 7
        low, high = -8, 7
    torch.testing.assert_close(scales.double(), ref_scales, rtol=1e-6, atol=0)
    ref_codes = torch.round(xs / ref_scales.unsqueeze(-1)).clamp(low, high).reshape(33, 192)
    assert (codes.double() != ref_codes).sum() == 0
    assert int(codes.min()) >= low and int(codes.max()) <= high


def test_e2m1_rounds_to_nearest_with_ties_to_even_and_saturates():
    magnitudes = torch.tensor(nvfp4.E2M1_MAGNITUDES)
    for i, m in enumerate(nvfp4.E2M1_MAGNITUDES):
        assert int(nvfp4.encode_e2m1(torch.tensor([m]))) == i
        if m:
            assert int(nvfp4.encode_e2m1(torch.tensor([-m]))) == i | 8
    ties = {0.25: 0.0, 0.75: 1.0, 1.25: 1.0, 1.75: 2.0, 2.5: 2.0, 3.5: 4.0, 5.0: 4.0}
    for value, expected in ties.items():
        assert float(nvfp4.decode_e2m1(nvfp4.encode_e2m1(torch.tensor([value])))) == expected
        assert float(nvfp4.decode_e2m1(nvfp4.encode_e2m1(torch.tensor([-value])))) == -expected
    assert float(nvfp4.decode_e2m1(nvfp4.encode_e2m1(torch.tensor([100.0])))) == 6.0
    x = torch.randn(10000) * 3
    decoded = nvfp4.decode_e2m1(nvfp4.encode_e2m1(x))
    nearest = magnitudes[(x.abs().unsqueeze(1) - magnitudes).abs().argmin(1)] * x.sign()
    assert torch.equal(decoded, nearest)  # random values never hit an exact tie


def test_fp8_scale_conversion_saturates_at_448():
    s = nvfp4.to_fp8(torch.tensor([1e6, 448.0, 0.0, 3.3]))
    assert s.dtype == torch.float8_e4m3fn
    assert s.float().tolist()[:3] == [448.0, 448.0, 0.0]


def test_nvfp4_weight_scales_use_channel_and_tensor_factors():
    torch.manual_seed(2)
    w = torch.randn(128, 256) * torch.logspace(-3, 0, 128).unsqueeze(1)
    codes, group_scales, wcscales, wtscale = nvfp4.quantize_weight(w, torch.bfloat16)
    assert group_scales.dtype == torch.float8_e4m3fn and group_scales.shape == (128, 16)
    assert wcscales.dtype == torch.bfloat16 and wtscale.shape == (1,)
    eff = nvfp4.effective_weight_scales(group_scales, wcscales, wtscale)
    deq = nvfp4.dequantize_weight(codes, eff)
    # per-row factors keep small rows accurate: relative error per row stays bounded
    row_err = (deq - w).norm(dim=1) / w.norm(dim=1)
    assert row_err.max() < 0.15
    # the largest group scale of the largest row uses the top of FP8's range
    assert float(group_scales.float().max()) > 300


def test_nvfp4_activations_match_float64_derivation():
    torch.manual_seed(3)
    x = torch.randn(17, 64).half() * 4
    smooth = torch.ones(64).half()
    codes, scales = nvfp4.quantize_activations(x, smooth)
    ref_scales = (x.double().reshape(17, 4, 16).abs().amax(-1) / 6).clamp(max=448).float().to(torch.float8_e4m3fn)
    assert torch.equal(scales.view(torch.uint8), ref_scales.view(torch.uint8))
    values = nvfp4.dequantize_activations(codes, scales)
    step = scales.float().repeat_interleave(16, dim=1) * 2  # the widest E2M1 step is 2 × scale
    assert ((values - x.float()).abs() <= step / 2 + 1e-6).all()


def test_w4a16_asymmetric_rounding():
    torch.manual_seed(4)
    w = torch.randn(128, 192) + 0.3
    codes, scales, zeros = w4a16.quantize_weight(w, torch.bfloat16)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15
    deq = w4a16.dequantize_weight(codes, scales, zeros)
    step = scales.float().repeat_interleave(64, dim=1)
    assert ((deq - w).abs() <= step / 2 + 2e-2 * step + 1e-6).all()
