"""The kernels as the core's dispatch sees them: one function per layer kind, and :func:`enable`.

``w4a4(layer, x)`` / ``w4a16(layer, x)`` run the fused kernels, or return None (the core then runs the
layer's reference path) when this call cannot use them: a CPU tensor, a GPU or precision the kernels
do not cover, an input whose dtype differs from the layer's. Each distinct reason is logged once.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from ..svdquant import dispatch, packing
from ..svdquant.errors import SVDQuantError
from . import build, runtime

log = logging.getLogger(__name__)

BACKENDS = ("auto", "cuda", "torch")
W4A16_MAX_ROWS = 64  # the GEMV re-reads the weights every 4 rows; larger batches use the reference matmul
_ROW_TILE = 128  # kernel 2's rows per CTA: kernel 1's outputs are padded to it
Launch = tuple  # (kernel name, grid (x, y, z), threads per block, arguments)
_noted: set[str] = set()
_last_choice: str | None = None


def _note(reason: str) -> None:
    """Log a per-layer fallback reason the first time it happens."""
    if reason not in _noted:
        _noted.add(reason)
        log.info("SVDQuant: reference path for %s", reason)


def _ready(t: torch.Tensor) -> torch.Tensor:
    """Contiguous and 16-byte aligned (the kernels use 16-byte vector loads)."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _fallback(layer: torch.nn.Module, reason: str) -> None:
    """The reference path will run this call: say so once, or refuse if the user demanded the kernels."""
    if layer.kernel_backend == "cuda":
        raise SVDQuantError(f"kernel backend 'cuda' requested, but the CUDA kernels cannot run {reason}")
    _note(reason)


def _device(layer: torch.nn.Module, x: torch.Tensor, family: str, what: str) -> runtime.Device | None:
    if not x.is_cuda:
        return None  # CPU inference: the reference path is the only one
    try:
        device = runtime.probe(x.device.index)
    except runtime.Unavailable as exc:
        _fallback(layer, f"{what} on cuda:{x.device.index}: {exc}")
        return None
    device.load(family)
    why = device.unsupported.get(family)
    if why:
        _fallback(layer, f"{what} on {device.name}: {why}")
        return None
    if device.capability < (8, 0) and x.dtype == torch.bfloat16:
        _fallback(layer, f"bfloat16 {what} on {device.name}: sm_75 has no bf16 tensor cores (load the model as "
                         "float16)")
        return None
    return device


def _padded_input(x: torch.Tensor, kp: int) -> torch.Tensor:
    if x.shape[1] != kp:  # in_features is not a multiple of 128: the buffers are zero-padded, so is x
        x = F.pad(x, (0, kp - x.shape[1]))
    return _ready(x)


def _launch(layer: torch.nn.Module, device: runtime.Device, family: str, launches: list[Launch]) -> bool:
    """Run the launches; a launch the driver refuses (resources, configuration) turns the family off on
    this GPU and the call falls back, rather than failing the user's workflow."""
    try:
        for name, grid, block, args in launches:
            device.launch(family, name, grid, block, args)
    except Exception as exc:
        device.unsupported[family] = f"launch failure ({type(exc).__name__}: {exc})"
        _fallback(layer, f"{family} layers on {device.name}: {device.unsupported[family]}")
        return False
    return True


def _output(out: torch.Tensor | None, m: int, n: int, like: torch.Tensor) -> torch.Tensor:
    if out is None:
        return torch.empty((m, n), dtype=like.dtype, device=like.device)
    if out.shape != (m, n) or out.dtype != like.dtype or out.device != like.device or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous ({m}, {n}) {like.dtype} tensor on {like.device}")
    return out


def plan_w4a4(layer: torch.nn.Module, x: torch.Tensor,
              out: torch.Tensor | None = None) -> tuple[torch.Tensor, list[Launch]]:
    """The output, workspaces and the two launches (kernel 1, kernel 2) of a W4A4 forward of a 2-D input
    with at least one row. Arguments are tensors (device pointers), None (null) and ints."""
    dtype, m, n_out = layer.smooth_factor.dtype, x.shape[0], layer.out_features
    np_, kp, rank = layer.qweight.shape[0], layer.qweight.shape[1] * 2, layer.rank
    mp = packing.round_up(m, _ROW_TILE)
    x = _padded_input(x, kp)
    nvfp4 = layer.precision == "nvfp4"
    mode = "nvfp4" if nvfp4 else ("uint4" if layer.act_unsigned else "int4")
    suffix = f"{mode}_{'bf16' if dtype == torch.bfloat16 else 'fp16'}"
    codes = torch.empty(mp * kp // 8, dtype=torch.int32, device=x.device)
    ascales = torch.empty(mp * kp // 64, dtype=torch.float32, device=x.device)  # NVFP4: the same count of u32
    lora_act = torch.empty(max(mp * rank // 2, 4), dtype=torch.int32, device=x.device)
    y = _output(out, m, n_out, x)
    return y, [
        (f"svdq_quantize_{suffix}", (mp // 16, 1, max(1, -(-rank // 64))), 128,
         [x, _ready(layer.smooth_factor), _ready(layer.proj_down), codes, ascales, lora_act, m, kp, rank, mp]),
        (f"svdq_gemm_{suffix}", (np_ // 128, mp // _ROW_TILE, 1), 256,
         [codes, ascales, _ready(layer.qweight), _ready(layer.wscales), lora_act, _ready(layer.proj_up),
          None if layer.bias is None else _ready(layer.bias), _ready(layer.wcscales) if nvfp4 else None,
          _ready(layer.wtscale) if nvfp4 else None, y, m, n_out, kp, rank, mp]),
    ]


def plan_w4a16(layer: torch.nn.Module, x: torch.Tensor,
               out: torch.Tensor | None = None) -> tuple[torch.Tensor, list[Launch]]:
    """The output and the launch of a W4A16 forward of a 2-D input with 1 to W4A16_MAX_ROWS rows."""
    dtype, m, n_out = layer.wscales.dtype, x.shape[0], layer.out_features
    np_, kp = layer.qweight.shape[0] * 4, layer.qweight.shape[1] * 2
    rows = 1 if m == 1 else 2 if m == 2 else 4
    y = _output(out, m, n_out, x)
    name = f"svdq_gemv_w4a16_{'bf16' if dtype == torch.bfloat16 else 'fp16'}_m{rows}"
    return y, [(name, (np_ // 16, -(-m // rows), 1), 128,
                [_ready(layer.qweight), _ready(layer.wscales), _ready(layer.wzeros),
                 None if layer.bias is None else _ready(layer.bias), _padded_input(x, kp), y, m, n_out, kp, np_])]


def w4a4(layer: torch.nn.Module, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor | None:
    """Fused W4A4 forward of ``layer`` (svdquant.layers.W4A4Linear) for a 2-D input, into ``out`` if given."""
    family = layer.precision  # "int4" | "nvfp4"
    device = _device(layer, x, family, f"{family} W4A4 layers")
    if device is None:
        return None
    dtype = layer.smooth_factor.dtype
    sixteen = [getattr(layer, name, None) for name in ("proj_down", "proj_up", "bias", "wcscales", "wtscale")]
    sixteen = [t for t in sixteen if t is not None]
    if x.dtype != dtype or layer.qweight.device != x.device or any(t.dtype != dtype for t in sixteen):
        _fallback(layer, f"W4A4 layers whose input ({x.dtype}, {x.device}) differs from their weights ({dtype}, "
                         f"{layer.qweight.device}) or whose 16-bit tensors mix dtypes")
        return None
    if x.shape[0] == 0:
        return x.new_empty((0, layer.out_features))
    y, launches = plan_w4a4(layer, x, out)
    return y if _launch(layer, device, family, launches) else None


def w4a16(layer: torch.nn.Module, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor | None:
    """Fused W4A16 forward of ``layer`` (svdquant.layers.W4A16Linear) for a 2-D input, into ``out`` if given."""
    device = _device(layer, x, "w4a16", "W4A16 layers")
    if device is None:
        return None
    dtype = layer.wscales.dtype
    if x.dtype != dtype or layer.qweight.device != x.device:
        _fallback(layer, f"W4A16 layers whose input ({x.dtype}, {x.device}) differs from their weights ({dtype}, "
                         f"{layer.qweight.device})")
        return None
    if x.shape[0] > W4A16_MAX_ROWS:
        _note(f"W4A16 layers with more than {W4A16_MAX_ROWS} input rows (the kernel is a small-batch GEMV)")
        return None
    if x.shape[0] == 0:
        return x.new_empty((0, layer.out_features))
    y, launches = plan_w4a16(layer, x, out)
    return y if _launch(layer, device, "w4a16", launches) else None


def _install(on: bool) -> None:
    dispatch.install("w4a4", w4a4 if on else None)
    dispatch.install("w4a16", w4a16 if on else None)


def _say(choice: str) -> str:
    """Log the backend choice, once per distinct choice (loading a second model says nothing new)."""
    global _last_choice
    if choice != _last_choice:
        _last_choice = choice
        log.info("SVDQuant: %s", choice)
    return choice


def enable(backend: str = "auto") -> str:
    """Choose how SVDQuant layers run in this process and return a one-line description of the choice.

    ``auto``: the fused CUDA kernels where the GPU supports them, else the PyTorch reference path.
    ``cuda``: the kernels, or :class:`SVDQuantError` saying why they cannot run. ``torch``: always the
    reference path. The kernels are compiled (or taken from the disk cache) for the current GPU here.
    """
    if backend not in BACKENDS:
        raise SVDQuantError(f"kernel backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    if backend == "torch":  # per layer (kernel_backend): models loaded with "auto" keep their kernels
        return _say("PyTorch reference path (kernel backend 'torch' chosen)")
    try:
        index = torch.cuda.current_device() if torch.cuda.is_available() else 0
        device = runtime.probe(index)
        for family in build.FAMILIES:
            device.load(family)
        if all(family in device.unsupported for family in build.FAMILIES):
            raise runtime.Unavailable(device.unsupported["int4"])
    except runtime.Unavailable as exc:
        _install(False)
        if backend == "cuda":
            raise SVDQuantError(f"kernel backend 'cuda' requested, but the CUDA kernels cannot run: {exc}") from exc
        return _say(f"PyTorch reference path ({exc})")
    _install(True)
    running = [f for f in build.FAMILIES if f not in device.unsupported]
    others = "; ".join(f"{f}: reference path ({why})" for f, why in device.unsupported.items())
    summary = f"CUDA kernels on {device.name} ({device.arch}): {', '.join(running)}"
    return _say(f"{summary}; {others}" if others else summary)
