"""Quantize linear layers to SVDQuant W4A4 (and the modulation layers to W4A16).

The recipe, for the layers that read one input (they share λ):
1. Smoothing: try every candidate λ and keep the one whose *layer output* error on the calibration
   rows is lowest, with the low-rank branch and both quantizers in the loop.
2. Low-rank branch: L = SVD_r(W·diag(λ)) in float64; then alternate L ← SVD_r(Ŵ − Q), Q ← RTN(Ŵ − L),
   keeping the best pair by output error and stopping at the first round that does not improve.
3. Residual: round-to-nearest, or GPTQ with the scales fixed from RTN; GPTQ's result is kept only if
   its output error is lower on the sampled rows, which its Hessian does not contain (see
   :mod:`.stats`), so it is never worse than RTN on inputs it was not fitted to. With fewer Hessian
   rows than input channels the Hessian is singular and GPTQ is not tried.
The error everywhere is ‖Y − XWᵀ‖² / ‖XWᵀ‖² on the calibration rows, Y being what the runtime
computes (:meth:`W4A4Linear.reference_forward` is the same arithmetic).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .. import int4, packing, w4a16
from ..errors import CalibrationError, ConfigError
from ..layers import PRECISIONS, SIXTEEN_BIT, W4A4Linear, W4A16Linear, check_rank, to_compute_dtype
from . import smooth as smoothing
from .formats import ResidualScales, residual_format
from .gptq import gptq
from .lowrank import branch_factors
from .stats import InputStats

log = logging.getLogger(__name__)
_few_rows_noted = False


@dataclass(frozen=True)
class QuantizeConfig:
    precision: str = "int4"
    rank: int = 32
    smooth: bool = True  # grid-search λ; False keeps λ = 1
    smooth_grid: tuple[float, ...] = smoothing.DEFAULT_GRID
    gptq: bool = False
    svd_rounds: int = 10  # most rounds of the alternating low-rank fit (it stops earlier when stuck)
    search_rows: int = 512  # calibration rows the smoothing search scores candidates on (all, by default)
    dtype: torch.dtype = torch.bfloat16  # storage dtype of every 16-bit tensor

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision = {self.precision!r}: expected one of {PRECISIONS}")
        check_rank(self.rank)
        if self.dtype not in SIXTEEN_BIT:
            raise ConfigError(f"dtype = {self.dtype}: checkpoints store bfloat16 or float16")
        if self.svd_rounds < 1 or self.search_rows < 1:
            raise ConfigError("svd_rounds and search_rows must be at least 1")

    def replace(self, **changes: object) -> QuantizeConfig:
        return dataclasses.replace(self, **changes)


@dataclass
class QuantizedLinear:
    """One quantized layer: its packed tensors (python-style names) and how it was made."""

    name: str
    in_features: int
    out_features: int
    precision: str
    act_unsigned: bool
    rank: int
    tensors: dict[str, torch.Tensor]
    error: float  # relative output error on the calibration rows
    alpha: float = 0.0
    beta: float = 0.0
    svd_rounds: int = 0
    gptq: bool = False
    seconds: float = 0.0

    def module(self, device: torch.device | str | None = None) -> W4A4Linear:
        dtype = self.tensors["smooth_factor"].dtype
        layer = W4A4Linear(
            self.in_features, self.out_features, self.rank, self.precision, self.act_unsigned,
            bias="bias" in self.tensors, dtype=dtype, device="meta",
        )
        layer.load_state_dict(self.tensors, assign=True)
        to_compute_dtype(layer, dtype)
        return layer.to(device) if device is not None else layer


def _note_few_rows(name: str, rows: int, channels: int) -> None:
    """Say once per process, loudly, that GPTQ was skipped for want of calibration rows; then quietly."""
    global _few_rows_noted
    level = logging.INFO if _few_rows_noted else logging.WARNING
    _few_rows_noted = True
    log.log(level, "%s: GPTQ skipped (round-to-nearest kept): %d calibration rows beyond the sampled ones, fewer "
            "than the layer's %d input channels. More prompts, steps or a larger calibration image give GPTQ "
            "the rows it needs.", name, rows, channels)


def check_finite(name: str, tensor: torch.Tensor) -> None:
    if not torch.isfinite(tensor).all():
        raise ConfigError(f"{name}: the weight contains NaN or Inf; this layer cannot be quantized")


def check_rank_fits(name: str, out_features: int, in_features: int, rank: int) -> None:
    """The low-rank branch of an N×K layer has at most min(N, K) directions."""
    if rank > min(out_features, in_features):
        raise ConfigError(
            f"{name}: rank = {rank} is larger than this {in_features}→{out_features} layer allows "
            f"(at most {min(out_features, in_features) // 16 * 16})"
        )


@dataclass
class _Layer:
    name: str
    weight: torch.Tensor  # fp32 (N, Kp), K zero-padded
    bias: torch.Tensor | None
    target: torch.Tensor  # fp32 (S, N) = X Wᵀ on the calibration rows
    norm: float


@dataclass
class _Fit:
    error: float
    codes: torch.Tensor  # 4-bit codes of the residual (N, Kp)
    scales: ResidualScales
    residual: torch.Tensor  # their dequantized value, in the smoothed input space
    down: torch.Tensor | None  # (R, Kp) 16-bit, raw input space
    up: torch.Tensor | None  # (N, R) 16-bit
    rounds: int = 0
    gptq: bool = False


class _Recipe:
    """The state shared by all layers of one input while the recipe runs."""

    def __init__(self, layers: list[_Layer], rows: torch.Tensor, input_absmax: torch.Tensor,
                 config: QuantizeConfig, unsigned: bool):
        self.layers, self.config, self.unsigned = layers, config, unsigned
        self.format = residual_format(config.precision, config.dtype)
        self.rows = rows  # fp32 (S, Kp) calibration rows, as the runtime sees them (16-bit values)
        self.input_absmax = input_absmax  # (Kp,) of the input the 4-bit GEMM quantizes

    def output(self, rows: torch.Tensor, quantized_rows: torch.Tensor, fit: _Fit, lam: torch.Tensor) -> torch.Tensor:
        y = quantized_rows @ fit.residual.T
        if fit.down is not None:
            lora_act = (rows.to(fit.down.dtype).float() @ fit.down.float().T).to(fit.up.dtype)
            y += lora_act.float() @ fit.up.float().T
        if self.unsigned:
            y -= int4.GELU_SHIFT * (fit.residual / lam.float()).sum(dim=1)
        return y

    def score(self, layer: _Layer, rows: torch.Tensor, quantized: torch.Tensor, fit: _Fit, lam: torch.Tensor,
              target: torch.Tensor) -> float:
        diff = self.output(rows, quantized, fit, lam) - target
        return float(diff.square().sum()) / max(float(target.square().sum()), 1e-30)

    def fit_rtn(self, layer: _Layer, lam: torch.Tensor, power_iterations: int,
                residual_from: torch.Tensor | None = None) -> _Fit:
        """Branch from ``residual_from`` (the last round's quantized residual) or from scratch, then
        RTN of what the branch leaves."""
        smoothed = layer.weight * lam.float()
        down = up = None
        if self.config.rank:
            source = smoothed if residual_from is None else smoothed - residual_from
            down, up = branch_factors(source.double(), lam.double(), self.config.rank, self.config.dtype,
                                      power_iterations)
            smoothed = (layer.weight - up.float() @ down.float()) * lam.float()
        scales = self.format.scales(smoothed)
        codes = self.format.codes(smoothed, scales)
        return _Fit(0.0, codes, scales, self.format.dequantize(codes, scales), down, up)

    def search(self) -> tuple[float, float, torch.Tensor]:
        """The smoothing candidate with the lowest summed output error on the search rows."""
        weight_absmax = torch.stack([layer.weight.abs().amax(dim=0) for layer in self.layers]).amax(dim=0)
        pool = smoothing.candidates(self.input_absmax, weight_absmax, self.config.smooth_grid, self.config.dtype)
        if not self.config.smooth:
            return pool[0]
        rows = self.rows[: self.config.search_rows]
        best, best_error = pool[0], math.inf
        for alpha, beta, lam in pool:
            quantized = self.format.fake_quantize_input(rows, lam, self.unsigned)
            error = 0.0
            for layer in self.layers:
                fit = self.fit_rtn(layer, lam, power_iterations=1)
                error += self.score(layer, rows, quantized, fit, lam, layer.target[: rows.shape[0]])
            if error < best_error:
                best, best_error = (alpha, beta, lam), error
        return best

    def refine(self, layer: _Layer, lam: torch.Tensor, hessian: torch.Tensor | None) -> _Fit:
        quantized = self.format.fake_quantize_input(self.rows, lam, self.unsigned)

        def scored(fit: _Fit) -> _Fit:
            fit.error = self.score(layer, self.rows, quantized, fit, lam, layer.target)
            return fit

        best = scored(self.fit_rtn(layer, lam, power_iterations=4))
        best.rounds = 1
        if self.config.rank:
            for round_ in range(2, self.config.svd_rounds + 1):
                candidate = scored(self.fit_rtn(layer, lam, 4, residual_from=best.residual))
                if candidate.error >= best.error:
                    break
                best, best.rounds = candidate, round_
        if hessian is not None:
            best = self._try_gptq(layer, lam, best, hessian, scored)
        return best

    def _try_gptq(self, layer: _Layer, lam: torch.Tensor, fit: _Fit, hessian: torch.Tensor, scored) -> _Fit:
        target = layer.weight * lam.float()
        if fit.down is not None:
            target = (layer.weight - fit.up.float() @ fit.down.float()) * lam.float()
        scales = self.format.scales(target)
        inv = 1.0 / lam.float()
        rounded = gptq(target, hessian * inv[:, None] * inv[None, :], scales.effective, self.format.group,
                       self.format.round)
        if rounded is None:
            return fit
        codes = self.format.codes(rounded, scales)  # exact: ``rounded`` is code × scale
        residual = self.format.dequantize(codes, scales)
        candidate = scored(_Fit(0.0, codes, scales, residual, fit.down, fit.up, fit.rounds, gptq=True))
        return candidate if candidate.error < fit.error else fit


def quantize_linears(
    layers: Sequence[tuple[str, torch.Tensor, torch.Tensor | None]],
    stats: InputStats,
    config: QuantizeConfig,
    act_unsigned: bool = False,
    device: torch.device | str | None = None,
) -> list[QuantizedLinear]:
    """Quantize the linears ``[(name, weight (N, K), bias)]`` that all read the input ``stats`` describes.

    They share one smoothing factor; each gets its own branch and residual."""
    started = time.perf_counter()
    if act_unsigned and config.precision != "int4":
        act_unsigned = False  # NVFP4 has no unsigned activations; the GELU output is quantized signed
    stats.require_data()
    device = torch.device(device) if device is not None else stats.rows.device
    k = stats.in_features
    kp = packing.round_up(k, packing.TILE)
    rows = packing.pad_to(stats.rows.to(device), (stats.rows.shape[0], kp))
    prepared = []
    for name, weight, bias in layers:
        if weight.ndim != 2 or weight.shape[1] != k:
            raise ConfigError(f"{name}: weight shape {tuple(weight.shape)} does not read {k} input channels")
        check_finite(name, weight)
        check_rank_fits(name, weight.shape[0], weight.shape[1], config.rank)
        w = packing.pad_to(weight.to(device, torch.float32), (weight.shape[0], kp))
        target = rows @ w.T
        if bias is not None:
            bias = bias.to(device, torch.float32)
        prepared.append(_Layer(name, w, bias, target, float(target.square().sum())))

    absmax = stats.shifted_absmax(int4.GELU_SHIFT) if act_unsigned else stats.absmax
    recipe = _Recipe(prepared, rows, packing.pad_to(absmax.to(device), (kp,)), config, act_unsigned)
    alpha, beta, lam = recipe.search()
    hessian = None
    if config.gptq:
        if stats.hessian is None:
            raise CalibrationError(f"{stats.name}: GPTQ needs Σxᵀx; gather statistics with hessian=True")
        if stats.hessian_rows >= k:
            full = stats.shifted_hessian(int4.GELU_SHIFT if act_unsigned else 0.0).to(device)
            hessian = packing.pad_to(full, (kp, kp))
        else:
            _note_few_rows(stats.name, stats.hessian_rows, k)

    results = []
    for layer in prepared:
        fit = recipe.refine(layer, lam, hessian)
        results.append(_pack(layer, fit, lam, recipe, k, alpha, beta))
    elapsed = (time.perf_counter() - started) / len(results)
    for r in results:
        r.seconds = elapsed
    return results


def _pack(layer: _Layer, fit: _Fit, lam: torch.Tensor, recipe: _Recipe, k: int, alpha: float, beta: float
          ) -> QuantizedLinear:
    config, fmt = recipe.config, recipe.format
    n, kp = layer.weight.shape
    np_ = packing.round_up(n, packing.TILE)
    bias = layer.bias
    if recipe.unsigned:
        shift = int4.GELU_SHIFT * (fit.residual / lam.float()).sum(dim=1)
        bias = -shift if bias is None else bias - shift
    tensors = fmt.pack(fit.codes, fit.scales, np_, kp)
    smooth = packing.pack_vector(packing.pad_to(lam, (kp,), value=1.0))
    tensors["smooth_factor"] = smooth
    tensors["smooth_factor_orig"] = smooth.clone()
    rank = config.rank
    if rank:
        tensors["proj_down"] = packing.pack_down(packing.pad_to(fit.down, (rank, kp)))
        tensors["proj_up"] = packing.pack_up(packing.pad_to(fit.up, (np_, rank)))
    else:
        tensors["proj_down"] = torch.zeros((kp, 0), dtype=config.dtype, device=lam.device)
        tensors["proj_up"] = torch.zeros((np_, 0), dtype=config.dtype, device=lam.device)
    if bias is not None:
        tensors["bias"] = packing.pack_vector(packing.pad_to(bias.to(config.dtype), (np_,)))
    tensors = {key: value.cpu() for key, value in tensors.items()}
    return QuantizedLinear(
        layer.name, k, n, config.precision, recipe.unsigned, rank, tensors, fit.error,
        alpha, beta, fit.rounds, fit.gptq,
    )


def quantize_w4a16(
    name: str, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype = torch.bfloat16
) -> W4A16Linear:
    """Round-to-nearest W4A16 (asymmetric, group 64) of one layer, as a ready module."""
    check_finite(name, weight)
    n, k = weight.shape
    kp, np_ = packing.round_up(k, packing.TILE), packing.round_up(n, packing.TILE)
    codes, scales, zeros = w4a16.quantize_weight(packing.pad_to(weight.float(), (np_, kp)), dtype)
    layer = W4A16Linear(k, n, bias=bias is not None, dtype=dtype, device="meta")
    tensors = {"qweight": packing.pack_awq_qweight(codes), "wscales": scales.T.contiguous(),
               "wzeros": zeros.T.contiguous()}
    if bias is not None:
        tensors["bias"] = packing.pad_to(bias.to(dtype), (np_,))
    layer.load_state_dict({key: value.cpu() for key, value in tensors.items()}, assign=True)
    return layer
