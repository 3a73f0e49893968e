"""The emulated Hopper recipes (svdquant/hopper_recipes.py) against an independent float64 derivation from
their definitions, on layers whose tensors the nunchaku fixture packs from known codes and scales; so the
figures of benchmarks/hopper_recipe_quality.py measure the recipes as defined."""

import pytest
import torch

import nunchaku_fixture
from comfyui_svdquant.svdquant import hopper_recipes
from comfyui_svdquant.svdquant.layers import W4A4Linear

N, K, RANK, SHIFT = 256, 384, 16, 0.171875


def layer_from(codes, scales, smooth, down, up, bias, unsigned):
    """A W4A4Linear holding exactly these tensors, packed by the fixture's own index arithmetic."""
    layer = W4A4Linear(K, N, RANK, "int4", unsigned, device="meta")
    smooth = nunchaku_fixture.pack_vector(smooth)
    state = {"qweight": nunchaku_fixture.pack_qweight(codes), "wscales": nunchaku_fixture.pack_scales(scales),
             "smooth_factor": smooth, "smooth_factor_orig": smooth,
             "proj_down": nunchaku_fixture.pack_down(down), "proj_up": nunchaku_fixture.pack_up(up),
             "bias": nunchaku_fixture.pack_vector(bias)}
    layer.load_state_dict(state, assign=True)
    return layer


@pytest.fixture(scope="module")
def parts():
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(-7, 8, (N, K), generator=g)
    codes[5, 7] = -8  # one row whose integer scales must stop at 16
    scales = (torch.rand(N, K // 64, generator=g) * 0.02 + 1e-4).bfloat16()
    smooth = (torch.rand(K, generator=g) + 0.5).bfloat16()
    down = (torch.randn(RANK, K, generator=g) * 0.05).bfloat16()
    up = (torch.randn(N, RANK, generator=g) * 0.05).bfloat16()
    bias = (torch.randn(N, generator=g) * 0.1).bfloat16()
    x = torch.randn(24, K, generator=g) * torch.exp(torch.randn(K, generator=g))
    return codes, scales, smooth, down, up, bias, x


def e4m3(values: torch.Tensor) -> torch.Tensor:
    """Nearest e4m3 value by search over every finite code (float64), ties to the even code."""
    codes = torch.arange(256, dtype=torch.uint8)
    grid = codes.view(torch.float8_e4m3fn).double()
    finite = torch.isfinite(grid)
    grid, odd = grid[finite], (codes[finite] & 1).long()
    distance = (values.unsqueeze(-1) - grid).abs()
    nearest = distance == distance.amin(dim=-1, keepdim=True)
    return grid[torch.where(nearest, odd, 2).argmin(dim=-1)]


def expected(parts, x: torch.Tensor, unsigned: bool, recipe: str) -> torch.Tensor:
    """The recipe from its definition: every scale and the division by it one fp32 operation (bf16 group
    scales make exact ties such as 63.5 common, so fp64 scales would round some codes the other way), the
    codes and the sums in float64; then the branch and bias of the reference path."""
    codes, scales, smooth, down, up, bias, _ = parts
    xs = (x.float() + (SHIFT if unsigned else 0.0)) / smooth.float()
    fp8 = recipe == "fp8"
    if fp8:
        a_scale = xs.abs().amax(1) / torch.tensor(448.0)
        a = e4m3((xs / a_scale[:, None]).double())
    else:
        a_scale = xs.amax(1) / torch.tensor(255.0) if unsigned else xs.abs().amax(1) / torch.tensor(127.0)
        a = torch.round((xs / a_scale[:, None]).double()).clamp(0 if unsigned else -127, 255 if unsigned else 127)
    s = scales.float().repeat_interleave(64, dim=1)
    if recipe in ("a8-folded", "fp8"):
        v = codes.float() * s  # exact: a 4-bit code times a bf16 scale
        c = v.abs().amax(1) / torch.tensor(448.0 if fp8 else 127.0)
        w = e4m3((v / c[:, None]).double()) if fp8 else torch.round((v / c[:, None]).double())
    else:
        qmax = torch.where(codes.amin(1) == -8, 16.0, 18.0)
        c = scales.float().amax(1) / qmax
        q = torch.minimum(torch.round((scales.float() / c[:, None]).double()), qmax.double()[:, None])
        w = codes.double() * q.repeat_interleave(64, dim=1)
    y = (a @ w.T) * a_scale.double()[:, None] * c.double()[None, :]
    lora = (x.bfloat16().double() @ down.double().T).to(torch.bfloat16).double()
    return y + lora @ up.double().T + bias.double()


@pytest.mark.parametrize("recipe", ["a8-folded", "a8-intscale", "fp8"])
@pytest.mark.parametrize("unsigned", [False, True])
def test_recipe_matches_its_float64_definition(parts, recipe, unsigned):
    layer = layer_from(*parts[:6], unsigned)
    x = torch.nn.functional.gelu(parts[6]) if unsigned else parts[6]  # unsigned layers read a GELU output
    got = hopper_recipes.forward(layer, x, recipe).double()  # fp32 in, fp32 out: no bf16 rounding
    want = expected(parts, x, unsigned, recipe)
    assert float((got - want).norm() / want.norm()) < 2e-6
    # and it is not today's path: the recipes change the numbers by a 4-bit-activation-sized amount or less
    today = layer.reference_forward(x).double()
    assert 1e-5 < float((got - today).norm() / today.norm()) < 0.2


def test_integer_group_scales_make_exact_int8_weights(parts):
    codes, scales, *_ = parts
    for fit in (False, True):
        q, c = hopper_recipes.integer_scales(codes, scales, fit)
        assert torch.equal(q, q.round()) and q.min() >= 0
        w8 = codes.double() * q.double().repeat_interleave(64, dim=1)
        assert w8.max() <= 127 and w8.min() >= -128
    qmax = hopper_recipes.integer_scale_limit(codes)
    assert qmax[5] == 16 and qmax[4] == 18
    # the fitted channel scale never has a larger weight error than B's
    energy = codes.double().view(N, -1, 64).square().sum(-1)

    def error(q, c):
        return ((scales.double() - c.double()[:, None] * q.double()).square() * energy).sum(1)

    plain, fitted = error(*hopper_recipes.integer_scales(codes, scales, False)), \
        error(*hopper_recipes.integer_scales(codes, scales, True))
    assert (fitted <= plain * (1 + 1e-6)).all() and (fitted < plain).any()


def test_gemm_sum_is_exact_at_the_int32_extremes():
    """K = 12288 (FLUX's fc2) at the largest products: the emulated accumulator is the integer sum,
    rounded to fp32 once as an I2F would."""
    g = torch.Generator().manual_seed(0)
    k = 12288
    a = torch.randint(0, 256, (4, k), generator=g).float()
    a[0] = 255
    w = torch.randint(-128, 128, (8, k), generator=g).float()
    w[0] = -128
    ones = torch.ones(4), torch.ones(8)
    got = hopper_recipes.gemm(a, ones[0], w, ones[1])
    exact = a.long() @ w.long().T
    assert int(exact[0, 0]) == 255 * -128 * k
    assert torch.equal(got, exact.float())


def test_unknown_recipe_is_refused(parts):
    layer = layer_from(*parts[:6], False)
    with pytest.raises(ValueError, match="recipe = 'int2'"):
        hopper_recipes.forward(layer, parts[6], "int2")
