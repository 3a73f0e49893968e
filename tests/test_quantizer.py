"""The quantizer: each ingredient reduces the error it claims to, bad input fails clearly."""

import math

import pytest
import torch

from comfyui_svdquant.svdquant.errors import CalibrationError, ConfigError
from comfyui_svdquant.svdquant.quantizer import InputStats, QuantizeConfig, quantize_linears, record_inputs
from comfyui_svdquant.svdquant.quantizer.formats import residual_format, searched_scales


def outlier_layer(k=256, n=384, seed=0, rows=1024):
    """A layer with heavy-tailed input channels and a few large weight columns, like diffusion models."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g) * torch.exp(torch.randn(k, generator=g))
    x[:, :4] *= 25
    w = torch.randn(n, k, generator=g) / k**0.5
    w[:, 10:12] *= 8
    b = torch.randn(n, generator=g) * 0.1
    return x.bfloat16(), w, b


def stats_of(x, hessian=False, name="layer"):
    s = InputStats(name, x.shape[1], max_rows=512, hessian=hessian)
    s.update(x)
    return s


def test_error_ordering_int4_and_nvfp4():
    x, w, b = outlier_layer()
    stats = stats_of(x[:512], hessian=True)
    held_out = x[512:].float()
    ref = held_out @ w.T + b
    for precision in ("int4", "nvfp4"):
        errors = {}
        for name, cfg in {
            "rtn": QuantizeConfig(precision=precision, rank=0, smooth=False),
            "smooth": QuantizeConfig(precision=precision, rank=0, search_rows=512),
            "lowrank": QuantizeConfig(precision=precision, smooth=False),
            "svdquant": QuantizeConfig(precision=precision),
        }.items():
            (q,) = quantize_linears([("layer", w, b)], stats, cfg)
            y = q.module()(held_out.bfloat16()).float()
            errors[name] = float((y - ref).square().sum() / ref.square().sum())
            errors[name + "_calib"] = q.error
        assert errors["smooth_calib"] <= errors["rtn_calib"]  # the search includes λ = 1
        assert errors["svdquant"] < 0.5 * errors["rtn"], errors
        assert errors["lowrank"] < errors["rtn"] and errors["smooth"] < errors["rtn"], errors


def correlated_layer(k=128, n=192, seed=4, rows=1024):
    """Inputs whose channels are correlated (mixed from fewer sources), as real activations are: the Hessian
    is far from diagonal, which GPTQ exploits."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, k // 4, generator=g) @ torch.randn(k // 4, k, generator=g)
         + 0.1 * torch.randn(rows, k, generator=g))
    w = torch.randn(n, k, generator=g) / k**0.5
    return x.bfloat16(), w, torch.randn(n, generator=g) * 0.1


def test_gptq_is_kept_only_when_it_helps():
    x, w, b = outlier_layer(seed=1)
    stats = stats_of(x, hessian=True)
    (rtn,) = quantize_linears([("layer", w, b)], stats, QuantizeConfig())
    (gptq,) = quantize_linears([("layer", w, b)], stats, QuantizeConfig(gptq=True))
    assert gptq.error <= rtn.error


def test_gptq_runs_when_the_calibration_is_only_the_sampled_rows(caplog):
    # 512 calibration rows, all of them in the 512-row sample: half are held out to check GPTQ, the other
    # half (more than the 128 input channels) make its Hessian
    x, w, b = correlated_layer()
    stats = stats_of(x[:512], hessian=True)
    with caplog.at_level("INFO"):
        (rtn,) = quantize_linears([("layer", w, b)], stats, QuantizeConfig())
        (gptq,) = quantize_linears([("layer", w, b)], stats, QuantizeConfig(gptq=True))
    assert gptq.gptq, caplog.text
    assert "layer: GPTQ's Hessian sums 256 calibration rows; 256 sampled rows are held out" in caplog.text
    held_out, ref = x[512:], x[512:].float() @ w.T + b
    error = {name: float((q.module()(held_out).float() - ref).square().sum() / ref.square().sum())
             for name, q in (("rtn", rtn), ("gptq", gptq))}
    assert error["gptq"] < 0.9 * error["rtn"], error


def test_gptq_needs_more_rows_than_input_channels(caplog):
    x, w, b = outlier_layer(seed=1, rows=300)  # 256 channels for the Hessian leave 44 to check it on
    stats = stats_of(x, hessian=True)
    (rtn,) = quantize_linears([("layer", w, b)], stats, QuantizeConfig())
    with caplog.at_level("INFO"):
        (gptq,) = quantize_linears([("layer", w, b)], stats, QuantizeConfig(gptq=True))
    assert not gptq.gptq and torch.equal(gptq.tensors["qweight"], rtn.tensors["qweight"])
    assert ("layer: GPTQ skipped (round-to-nearest kept): 300 calibration rows, fewer than the layer's 256 input "
            "channels for the Hessian plus 64 held out") in caplog.text


def test_low_rank_fit_runs_until_it_stops_improving():
    x, w, b = outlier_layer(seed=5)
    stats = stats_of(x[:512])
    config = QuantizeConfig(smooth_grid=(0.5,))
    (converged,) = quantize_linears([("layer", w, b)], stats, config)
    assert 2 < converged.svd_rounds < config.svd_rounds  # stopped by the rule, not the cap
    (capped,) = quantize_linears([("layer", w, b)], stats, config.replace(svd_rounds=2))
    (loose,) = quantize_linears([("layer", w, b)], stats, config.replace(svd_tolerance=0.5))
    assert capped.svd_rounds == 2 and loose.svd_rounds == 2  # the first improvement is small beside 50%
    assert converged.error < capped.error


def test_smoothing_is_chosen_by_the_final_branch():
    x, w, b = outlier_layer(seed=6)
    stats = stats_of(x[:512])
    parts = [("q", w[:128], b[:128]), ("kv", w[128:], b[128:])]
    config = QuantizeConfig(smooth_grid=(0.2, 0.4, 0.6, 0.8))
    first = quantize_linears(parts, stats, config.replace(finalists=1))
    final = quantize_linears(parts, stats, config.replace(finalists=4))
    # the finalists include the search's first choice, so scoring them with their final branch can only help
    assert sum(q.error for q in final) <= sum(q.error for q in first)
    with pytest.raises(ConfigError, match="finalists"):
        QuantizeConfig(finalists=0)


@pytest.mark.parametrize("precision", ["int4", "nvfp4"])
def test_searched_clipping_beats_absmax_scales(precision):
    g = torch.Generator().manual_seed(7)
    residual = torch.randn(64, 256, generator=g) * torch.exp(torch.randn(256, generator=g))
    importance = torch.exp(torch.randn(256, generator=g))
    fmt = residual_format(precision, torch.bfloat16)

    def error(scales):
        return float(((fmt.dequantize(fmt.codes(residual, scales), scales) - residual).square() * importance).sum())

    absmax, searched = error(fmt.scales(residual)), error(searched_scales(fmt, residual, importance))
    assert searched < 0.9 * absmax, (searched, absmax)


def test_shared_smoothing_gives_one_smooth_factor_and_own_branches():
    x, w, b = outlier_layer(seed=2)
    stats = stats_of(x)
    parts = [("q", w[:128], b[:128]), ("k", w[128:256], None), ("v", w[256:], b[256:])]
    out = quantize_linears(parts, stats, QuantizeConfig())
    assert [q.name for q in out] == ["q", "k", "v"]
    assert all(torch.equal(q.tensors["smooth_factor"], out[0].tensors["smooth_factor"]) for q in out)
    assert not torch.equal(out[0].tensors["proj_up"], out[2].tensors["proj_up"])
    assert "bias" not in out[1].tensors and "bias" in out[0].tensors


def test_unsigned_layer_compensates_the_shift_in_its_bias():
    torch.manual_seed(3)
    k, n = 256, 128
    x = torch.nn.functional.gelu(torch.randn(1024, k) * 2, approximate="tanh").bfloat16()
    w, b = torch.randn(n, k) / k**0.5, torch.randn(n) * 0.1
    stats = stats_of(x[:512])
    (signed,) = quantize_linears([("fc2", w, b)], stats, QuantizeConfig(rank=0, smooth=False))
    (unsigned,) = quantize_linears([("fc2", w, b)], stats, QuantizeConfig(rank=0, smooth=False), act_unsigned=True)
    assert unsigned.act_unsigned
    ref = x[512:].float() @ w.T + b
    err = {}
    for name, q in (("signed", signed), ("unsigned", unsigned)):
        y = q.module()(x[512:]).float()
        err[name] = float((y - ref).square().sum() / ref.square().sum())
    dense_w, dense_b = unsigned.module().to_dense()
    weight_only = x[512:].float() @ dense_w.T + dense_b
    err["weight_only"] = float((weight_only - ref).square().sum() / ref.square().sum())
    # a missing or wrong compensation would offset every output by shift·Σw, far above weight error
    assert err["unsigned"] < 2 * err["weight_only"], err
    assert err["unsigned"] < err["signed"], err  # unsigned codes use all 16 levels on GELU outputs


def test_stats_are_bounded_and_uniform():
    stats = InputStats("layer", 8, max_rows=64, hessian=True)
    chunks = [torch.full((100, 8), float(i)) for i in range(10)]
    for c in chunks:
        stats.update(c)
    assert stats.rows.shape == (64, 8) and stats.count == 1000
    assert float(stats.absmax.max()) == 9.0
    values = stats.rows[:, 0]
    assert values.min() < 3 and values.max() > 6  # drawn from the whole stream, not the last batch
    # the Hessian holds every row; the rows held out to check GPTQ come back out of it
    full, sample = torch.cat(chunks), stats.rows
    assert stats.hessian_rows == 1000 and stats.held_out(minimum=16) == 32
    torch.testing.assert_close(stats.hessian, full.T @ full)
    shifted, held = full + 0.5, sample[:32] + 0.5
    torch.testing.assert_close(stats.shifted_hessian(0.5, held_out=32), shifted.T @ shifted - held.T @ held)
    part = stats.narrow(2, 3)
    assert part.rows.shape == (64, 3) and part.hessian.shape == (3, 3)


def test_record_inputs_hooks_and_removes():
    lin = torch.nn.Linear(8, 4)
    stats = {"lin": InputStats("lin", 8)}
    with record_inputs({"lin": lin}, stats):
        lin(torch.randn(3, 5, 8))
    lin(torch.randn(2, 8))
    assert stats["lin"].count == 15


def test_bad_input_messages_name_the_layer_or_setting():
    x, w, b = outlier_layer(k=128, n=128)
    stats = stats_of(x)
    with pytest.raises(ConfigError, match="multiple of 16"):
        QuantizeConfig(rank=24)
    with pytest.raises(ConfigError, match="precision"):
        QuantizeConfig(precision="int3")
    bad = w.clone()
    bad[3, 3] = math.nan
    with pytest.raises(ConfigError, match="blocks.0.fc1.*NaN"):
        quantize_linears([("blocks.0.fc1", bad, b)], stats, QuantizeConfig())
    with pytest.raises(ConfigError, match="rank = 160 is larger"):
        quantize_linears([("tiny", w, b)], stats, QuantizeConfig(rank=160))
    nan_stats = InputStats("blocks.1.qkv", 128)
    with pytest.raises(CalibrationError, match="blocks.1.qkv.*NaN"):
        nan_stats.update(torch.full((2, 128), math.inf))
    with pytest.raises(CalibrationError, match="never reached"):
        quantize_linears([("unused", w, b)], InputStats("unused", 128), QuantizeConfig())
    with pytest.raises(CalibrationError, match="expects 128"):
        stats.update(torch.zeros(2, 64))
