"""Quantize linear layers to SVDQuant W4A4 (and the modulation layers to W4A16).

The recipe, for the layers that read one input (they share λ):
1. Smoothing: every candidate λ is scored by the *layer output* error on the calibration rows with a
   first, approximate branch and both quantizers in the loop; the best few (``finalists``) then run
   step 2 in full and the one with the lowest final error is kept.
2. Low-rank branch: L = SVD_r(W·diag(λ)) in float64; then alternate L ← SVD_r(Ŵ − Q), Q ← RTN(Ŵ − L),
   keeping the best pair by output error, until a round improves it by less than ``svd_tolerance``.
   RTN's scale clips each group's absmax by the ratio that rounds the group with the least error,
   weighted by the mean square of each input channel (``search_clipping``).
3. Residual: round-to-nearest, or GPTQ with the scales fixed from step 2. GPTQ's Hessian sums every
   calibration row except some sampled rows held out (half the sample, fewer when the Hessian would
   otherwise get fewer rows than input channels); its result is kept only if its output error on those
   held-out rows is lower, so it is never worse than RTN on inputs it was not fitted to. With too few
   rows for both, GPTQ is not tried.
The error everywhere is ‖Y − XWᵀ‖² / ‖XWᵀ‖² on the calibration rows, Y being what the runtime
computes (:meth:`W4A4Linear.reference_forward` is the same arithmetic).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .. import int4, packing, w4a16
from ..errors import CalibrationError, ConfigError
from ..layers import PRECISIONS, SIXTEEN_BIT, W4A4Linear, W4A16Linear, check_rank, to_compute_dtype
from . import smooth as smoothing
from .formats import ResidualScales, residual_format, searched_scales
from .gptq import gptq
from .lowrank import branch_factors
from .stats import InputStats

log = logging.getLogger(__name__)
_few_rows_noted = False
MIN_HELD_OUT = 64  # sampled rows GPTQ is checked on, at the least
SEARCH_POWER_ITERATIONS = 1  # of the smoothing search's approximate first branch
REFINE_POWER_ITERATIONS = 2  # of each later round, started from the last round's branch
# Above this many weights only the search's best candidate runs the full loop: there the finalists cost their
# count in time and gave nothing measurable (a 3072x3072 FLUX-shaped layer, rank 32, 2026-12-06: 1 finalist
# 80 s and 3 finalists 175 s for the same error, against 49 s before convergence and clipping search).
FINALISTS_MAX_WEIGHTS = 1 << 22


@dataclass(frozen=True)
class QuantizeConfig:
    precision: str = "int4"
    rank: int = 32
    smooth: bool = True  # grid-search λ; False keeps λ = 1
    smooth_grid: tuple[float, ...] = smoothing.DEFAULT_GRID
    gptq: bool = False
    # The alternating low-rank fit runs until a round improves the output error by less than
    # svd_tolerance (relative); svd_rounds only caps it, should it creep on.
    svd_rounds: int = 100
    svd_tolerance: float = 1e-4
    search_rows: int = 512  # calibration rows the smoothing search scores candidates on (all, by default)
    search_clipping: bool = True  # per group, the residual's scale clips its absmax by the best of a few ratios
    finalists: int = 3  # smoothing candidates the search passes on to be scored with their final branch
    dtype: torch.dtype = torch.bfloat16  # storage dtype of every 16-bit tensor

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision = {self.precision!r}: expected one of {PRECISIONS}")
        check_rank(self.rank)
        if self.dtype not in SIXTEEN_BIT:
            raise ConfigError(f"dtype = {self.dtype}: checkpoints store bfloat16 or float16")
        if self.svd_rounds < 1 or self.search_rows < 1 or self.finalists < 1:
            raise ConfigError("svd_rounds, search_rows and finalists must be at least 1")
        if not 0 <= self.svd_tolerance < 1:
            raise ConfigError(f"svd_tolerance = {self.svd_tolerance}: a relative improvement in [0, 1)")

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
    log.log(level, "%s: GPTQ skipped (round-to-nearest kept): %d calibration rows, fewer than the layer's %d "
            "input channels for the Hessian plus %d held out to check it. More prompts, steps or a larger "
            "calibration image give GPTQ the rows it needs.", name, rows, channels, MIN_HELD_OUT)


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

    def fit_rtn(self, layer: _Layer, lam: torch.Tensor, power_iterations: int | None,
                previous: _Fit | None = None, importance: torch.Tensor | None = None) -> _Fit:
        """Branch of what ``previous`` (the last round's fit) leaves besides its quantized residual, or of
        the whole weight, then RTN of what the branch leaves: with absmax scales, or with clipping searched
        per group when ``importance`` (the mean square of each smoothed input channel) is given."""
        smoothed = layer.weight * lam.float()
        down = up = None
        if self.config.rank:
            source, start = smoothed, None
            if previous is not None:
                source, start = smoothed - previous.residual, previous.down
            down, up = branch_factors(source.double(), lam.double(), self.config.rank, self.config.dtype,
                                      power_iterations, start)
            smoothed = (layer.weight - up.float() @ down.float()) * lam.float()
        scales = self.format.scales(smoothed) if importance is None else searched_scales(self.format, smoothed,
                                                                                             importance)
        codes = self.format.codes(smoothed, scales)
        return _Fit(0.0, codes, scales, self.format.dequantize(codes, scales), down, up)

    def search(self) -> list[tuple[float, float, torch.Tensor]]:
        """The smoothing candidates, best first by summed output error on the search rows with a first,
        approximate branch."""
        weight_absmax = torch.stack([layer.weight.abs().amax(dim=0) for layer in self.layers]).amax(dim=0)
        pool = smoothing.candidates(self.input_absmax, weight_absmax, self.config.smooth_grid, self.config.dtype)
        if not self.config.smooth:
            return pool[:1]
        rows = self.rows[: self.config.search_rows]
        errors = []
        for _alpha, _beta, lam in pool:
            quantized = self.format.fake_quantize_input(rows, lam, self.unsigned)
            error = 0.0
            for layer in self.layers:
                fit = self.fit_rtn(layer, lam, power_iterations=SEARCH_POWER_ITERATIONS)
                error += self.score(layer, rows, quantized, fit, lam, layer.target[: rows.shape[0]])
            errors.append(error)
        order = sorted(range(len(pool)), key=errors.__getitem__)
        return [pool[i] for i in order]

    def refine(self, layer: _Layer, lam: torch.Tensor) -> _Fit:
        """Alternate branch and residual until the output error stops improving by ``svd_tolerance``."""
        quantized = self.format.fake_quantize_input(self.rows, lam, self.unsigned)

        def scored(fit: _Fit) -> _Fit:
            fit.error = self.score(layer, self.rows, quantized, fit, lam, layer.target)
            return fit

        importance = (self.rows / lam.float()).square().mean(dim=0) if self.config.search_clipping else None
        best = scored(self.fit_rtn(layer, lam, power_iterations=None, importance=importance))
        best.rounds = 1
        if self.config.rank:
            for round_ in range(2, self.config.svd_rounds + 1):
                candidate = scored(self.fit_rtn(layer, lam, REFINE_POWER_ITERATIONS, best, importance))
                improved = candidate.error < best.error
                if improved:
                    candidate.rounds, previous_error, best = round_, best.error, candidate
                if not improved or best.error > previous_error * (1 - self.config.svd_tolerance):
                    break
        return best

    def try_gptq(self, layer: _Layer, lam: torch.Tensor, fit: _Fit, hessian: torch.Tensor, held: int) -> _Fit:
        """GPTQ of ``fit``'s residual against ``hessian`` (which lacks the first ``held`` rows), kept if its
        output error on those rows is lower than ``fit``'s."""
        target = layer.weight * lam.float()
        if fit.down is not None:
            target = (layer.weight - fit.up.float() @ fit.down.float()) * lam.float()
        inv = 1.0 / lam.float()
        rounded = gptq(target, hessian * inv[:, None] * inv[None, :], fit.scales.effective, self.format.group,
                       self.format.round)
        if rounded is None:
            return fit
        codes = self.format.codes(rounded, fit.scales)  # exact: ``rounded`` is code × scale
        candidate = _Fit(0.0, codes, fit.scales, self.format.dequantize(codes, fit.scales), fit.down, fit.up,
                         fit.rounds, gptq=True)
        rows = self.rows[:held]
        quantized = self.format.fake_quantize_input(rows, lam, self.unsigned)
        target_rows = layer.target[:held]
        if self.score(layer, rows, quantized, candidate, lam, target_rows) >= \
                self.score(layer, rows, quantized, fit, lam, target_rows):
            return fit
        quantized = self.format.fake_quantize_input(self.rows, lam, self.unsigned)
        candidate.error = self.score(layer, self.rows, quantized, candidate, lam, layer.target)
        return candidate


def _gptq_hessian(stats: InputStats, k: int, kp: int, unsigned: bool, device: torch.device
                  ) -> tuple[torch.Tensor | None, int]:
    """(Σxᵀx of the calibration rows less those held out, padded to Kp; how many sampled rows are held out),
    or (None, 0) when the rows are too few for both."""
    if stats.hessian is None:
        raise CalibrationError(f"{stats.name}: GPTQ needs Σxᵀx; gather statistics with hessian=True")
    held = stats.held_out(MIN_HELD_OUT)
    if not held:
        _note_few_rows(stats.name, stats.hessian_rows, k)
        return None, 0
    hessian = stats.shifted_hessian(int4.GELU_SHIFT if unsigned else 0.0, held).to(device)
    log.info("%s: GPTQ's Hessian sums %d calibration rows; %d sampled rows are held out to check it",
             stats.name, stats.hessian_rows - held, held)
    return packing.pad_to(hessian, (kp, kp)), held


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
    # The search ranks the candidates with a first branch; the finalists are scored with the final one.
    finalists = config.finalists if sum(layer.weight.numel() for layer in prepared) <= FINALISTS_MAX_WEIGHTS else 1
    chosen, fits = None, None
    for alpha, beta, lam in recipe.search()[:finalists]:
        candidate = [recipe.refine(layer, lam) for layer in prepared]
        if fits is None or sum(f.error for f in candidate) < sum(f.error for f in fits):
            chosen, fits = (alpha, beta, lam), candidate
    alpha, beta, lam = chosen
    if config.gptq:
        hessian, held = _gptq_hessian(stats, k, kp, act_unsigned, device)
        if hessian is not None:
            fits = [recipe.try_gptq(layer, lam, fit, hessian, held) for layer, fit in zip(prepared, fits, strict=True)]

    results = [_pack(layer, fit, lam, recipe, k, alpha, beta) for layer, fit in zip(prepared, fits, strict=True)]
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
