"""Reference layers: exactly the arithmetic the kernels implement, checked against float64."""

import pytest
import torch

from comfyui_svdquant.svdquant import int4, nvfp4, packing
from comfyui_svdquant.svdquant.errors import ConfigError
from comfyui_svdquant.svdquant.layers import ConcatLinear, SplitInputLinear, W4A4Linear
from comfyui_svdquant.svdquant.quantizer import InputStats, QuantizeConfig, quantize_linears, quantize_w4a16


def random_w4a4(k, n, rank, precision, unsigned=False, dtype=torch.bfloat16, seed=0):
    """A layer with random codes, scales, smoothing and branch (not from the quantizer)."""
    g = torch.Generator().manual_seed(seed)
    kp, np_ = packing.round_up(k, 128), packing.round_up(n, 128)
    layer = W4A4Linear(k, n, rank, precision, unsigned, bias=True, dtype=dtype)
    if precision == "int4":
        codes = torch.randint(-8, 8, (np_, kp), generator=g, dtype=torch.int8)
        scales = (torch.rand(np_, kp // 64, generator=g) * 0.02 + 0.001).to(dtype)
        layer.wscales.copy_(packing.pack_scales(scales))
    else:
        codes = torch.randint(0, 16, (np_, kp), generator=g, dtype=torch.uint8)
        fp8 = (torch.rand(np_, kp // 16, generator=g) * 400 + 1).to(torch.float8_e4m3fn)
        layer.wscales.copy_(packing.pack_fp8_scales(fp8))
        layer.wcscales.copy_(packing.pack_vector((torch.rand(np_, generator=g) + 0.5).to(dtype)))
        layer.wtscale.fill_(3e-5)
    layer.qweight.copy_(packing.pack_qweight(codes))
    smooth = (torch.rand(kp, generator=g) + 0.5).to(dtype)
    layer.smooth_factor.copy_(packing.pack_vector(smooth))
    layer.smooth_factor_orig.copy_(layer.smooth_factor)
    if rank:
        layer.proj_down.copy_(packing.pack_down((torch.randn(rank, kp, generator=g) * 0.05).to(dtype)))
        layer.proj_up.copy_(packing.pack_up((torch.randn(np_, rank, generator=g) * 0.05).to(dtype)))
    layer.bias.copy_(packing.pack_vector(torch.randn(np_, generator=g).to(dtype)))
    return layer


def float64_forward(layer, x):
    """An independent float64 derivation from the unpacked tensors and the activation codes."""
    kp = layer.qweight.shape[1] * 2
    xp = torch.nn.functional.pad(x.double(), (0, kp - x.shape[1]))
    smooth = packing.unpack_vector(layer.smooth_factor)
    if layer.precision == "int4":
        a_codes, a_scales = int4.quantize_activations(xp.float(), smooth, layer.act_unsigned)
        a = a_codes.double() * a_scales.double().repeat_interleave(64, 1)
        w = packing.unpack_qweight(layer.qweight, True).double()
        w = w * packing.unpack_scales(layer.wscales).double().repeat_interleave(64, 1)
    else:
        a_codes, a_scales = nvfp4.quantize_activations(xp.float(), smooth)
        a = nvfp4.decode_e2m1(a_codes).double() * a_scales.double().repeat_interleave(16, 1)
        w = nvfp4.decode_e2m1(packing.unpack_qweight(layer.qweight, False)).double()
        row = packing.unpack_vector(layer.wcscales).double() * layer.wtscale.double()
        w = w * packing.unpack_fp8_scales(layer.wscales).double().repeat_interleave(16, 1) * row.unsqueeze(1)
    y = a @ w.T
    slack = torch.zeros_like(y)
    if layer.rank:
        down, up = packing.unpack_down(layer.proj_down), packing.unpack_up(layer.proj_up)
        act = (xp.to(down.dtype).double() @ down.double().T).to(up.dtype)
        y += act.double() @ up.double().T
        # the branch activation is rounded to 16 bits once; an fp32 and an fp64 sum may land on
        # either side of a rounding boundary, one unit in the last place apart
        slack = torch.finfo(up.dtype).eps * (act.double().abs() @ up.double().abs().T)
    y += packing.unpack_vector(layer.bias).double()
    return y[:, : layer.out_features], slack[:, : layer.out_features]


@pytest.mark.parametrize("precision,unsigned", [("int4", False), ("int4", True), ("nvfp4", False)])
@pytest.mark.parametrize("k,n,rank", [(256, 384, 32), (200, 100, 16), (128, 128, 0)])
def test_reference_matches_float64(precision, unsigned, k, n, rank):
    layer = random_w4a4(k, n, rank, precision, unsigned)
    x = torch.randn(37, k, generator=torch.Generator().manual_seed(k + n + rank))
    if unsigned:
        x = torch.nn.functional.gelu(x, approximate="tanh")
    y = layer(x)  # fp32 input → fp32 output: only float rounding separates the two
    ref, slack = float64_forward(layer, x)
    assert y.dtype == torch.float32 and y.shape == (37, n)
    assert ((y.double() - ref).abs() <= 1e-5 * ref.abs().max() + slack).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_any_leading_dims_and_input_dtype(dtype):
    layer = random_w4a4(256, 128, 32, "int4")
    x = torch.randn(2, 3, 5, 256).to(dtype)
    y = layer(x)
    assert y.shape == (2, 3, 5, 128) and y.dtype == dtype
    flat = layer(x.reshape(30, 256))
    assert torch.equal(y.reshape(30, 128), flat)


def test_constructor_rejects_bad_settings():
    with pytest.raises(ConfigError, match="multiple of 16"):
        W4A4Linear(128, 128, rank=20)
    with pytest.raises(ConfigError, match="precision"):
        W4A4Linear(128, 128, precision="int8")
    with pytest.raises(ConfigError, match="int4 only"):
        W4A4Linear(128, 128, precision="nvfp4", act_unsigned=True)


def quantized(k, n, precision="int4", unsigned=False, rank=32, seed=0):
    torch.manual_seed(seed)
    w, b = torch.randn(n, k) / k**0.5, torch.randn(n) * 0.1
    x = torch.randn(512, k)
    if unsigned:
        x = torch.nn.functional.gelu(x, approximate="tanh")
    stats = InputStats("layer", k)
    stats.update(x.bfloat16())
    (q,) = quantize_linears([("layer", w, b)], stats, QuantizeConfig(precision=precision, rank=rank),
                            act_unsigned=unsigned)
    return q.module(), w, b, x


@pytest.mark.parametrize("unsigned", [False, True])
def test_to_dense_is_the_layer_without_activation_quantization(unsigned):
    layer, w, b, x = quantized(192, 160, unsigned=unsigned)
    dw, db = layer.to_dense()
    assert dw.shape == w.shape and db.shape == b.shape
    # the dense equivalent is close to the original (weight-only error is small) ...
    assert (dw - w).norm() / w.norm() < 0.1
    # ... and the layer's output is that dense layer's output plus activation-quantization error
    dense_out = x @ dw.T + db
    y = layer(x)
    assert (y - dense_out).norm() / dense_out.norm() < 0.1


def test_concat_and_split_input_compose_parts():
    a = random_w4a4(128, 128, 16, "int4", seed=1)
    b = random_w4a4(128, 256, 16, "int4", seed=2)
    x = torch.randn(9, 128)
    cat = ConcatLinear([a, b])
    assert cat.out_features == 384
    torch.testing.assert_close(cat(x), torch.cat([a(x), b(x)], -1))
    c = random_w4a4(256, 128, 16, "int4", unsigned=True, seed=3)
    split = SplitInputLinear([a, c])
    x2 = torch.randn(9, 384)
    torch.testing.assert_close(split(x2), a(x2[:, :128]) + c(x2[:, 128:]))
    dw, db = split.to_dense()
    assert dw.shape == (128, 384)


def test_w4a16_reference_and_dense():
    torch.manual_seed(0)
    w, b = torch.randn(300, 200) * 0.02, torch.randn(300)
    layer = quantize_w4a16("mod", w, b, torch.bfloat16)
    x = torch.randn(3, 200).bfloat16()
    y = layer(x)
    dw, db = layer.to_dense()
    ref = x.double() @ dw.double().T + db.double()
    torch.testing.assert_close(y.double(), ref, rtol=1e-2, atol=1e-2)
    assert (dw - w).norm() / w.norm() < 0.1
