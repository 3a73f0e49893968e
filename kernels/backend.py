"""The kernels as the core's dispatch sees them: one function per layer kind, and :func:`enable`.

``w4a4(layer, x)`` / ``w4a16(layer, x)`` run the fused kernels, or return None (the core then runs the
layer's reference path) when they cannot serve the call: a CPU tensor, a GPU or precision the kernels
do not cover, tensors outside the kernels' dtype rule (``svdquant.layers.to_compute_dtype``), a launch
the driver refuses. Each distinct reason is logged once. A Python error is a bug and raises; a CUDA
error that leaves the GPU unusable raises too, naming the layer and shape.

A call does only what changes per call. A *plan* (kernel handles, grids, the constant arguments packed
for the driver) is made once per set of weight tensors, input shape and device, and kept in a small
table keyed by exactly what it depends on (the tensors' addresses and layout, the input's shape), so a shallow
copy of a layer (what a LoRA call runs) shares its plan and freed weights can never be read. A call then
allocates its output and one workspace, fills in their addresses and the input's, and launches.
"""

from __future__ import annotations

import functools
import logging
import operator
import os
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..svdquant import dispatch, packing
from ..svdquant.errors import SVDQuantError
from ..svdquant.layers import compute_dtype_problem
from . import build, runtime

log = logging.getLogger(__name__)

BACKENDS = ("auto", "cuda", "torch")
W4A16_MAX_ROWS = 64  # the GEMV re-reads the weights every 4 rows; larger batches use the reference matmul
# Kernel 2's rows per CTA: gemm_w4a4.cu's and gemm_w4a4_sm90.cu's; kernel 1's outputs are padded to the one run.
_ROW_TILE, _WGMMA_ROW_TILE = 256, 128
# Kernel 1 splits K into ranges so that about this many CTAs (16 rows x one K range) share the GPU: several per
# SM on a 132-SM H100/H200 or a 128-SM RTX 4090, so that each SM has enough loads in flight and no SM waits
# for a second wave. A range is at least 2 chunks of 256 columns: the fp32 branch sums a range adds (Mp·rank
# words, written and read once) stay small against the input it reads.
_KERNEL1_CTAS = 1024
_KERNEL1_CHUNK = 256
_MAX_PLANS = 4096  # a FLUX model has ~500 quantized layers, each seeing a few input shapes
LaunchSpec = tuple  # (kernel name, grid (x, y, z), threads per block, arguments): what runtime.prepare is made from
_noted: set[str] = set()
_last_choice: str | None = None
# Opt-in: INT4 kernel 2 on wgmma (gemm_w4a4_sm90.cu) on sm_90 GPUs (H100, H200). Off by default until it is
# measured faster than the mma.sync kernel there; set to 1 before starting ComfyUI, or call use_wgmma.
WGMMA_SETTING = "SVDQUANT_WGMMA"
_wgmma = os.environ.get(WGMMA_SETTING, "0") == "1"
_WGMMA_PREFIX = "svdq_gemm_wgmma_"
_wgmma_modules: dict[int, object] = {}  # device index → the loaded wgmma module


# The launch arguments that change per call, as indices into the call's values (runtime.Launches)
X, Y, CODES, ASCALES, LORA_ACT = map(runtime.Slot, range(5))


@dataclass
class _Plan:
    device: runtime.Device
    family: str
    launches: runtime.Launches  # per-call values: x, y (W4A16); x, y, codes, ascales, lora_act (W4A4)
    workspace: int  # int32 words of the three workspaces (W4A4), 0 for none
    offsets: tuple[int, int]  # byte offsets of ascales and lora_act in it (codes start it)
    keep: list[torch.Tensor]  # weight copies made to meet the kernels' alignment, alive while the plan is


_plans: dict[tuple, _Plan | str] = {}  # key → plan, or why this layer and shape takes the reference path


def _note(reason: str, level: int = logging.INFO, kind: str | None = None) -> None:
    """Log a fallback reason the first time it (or another of its ``kind``) happens."""
    kind = kind or reason
    if kind not in _noted:
        _noted.add(kind)
        log.log(level, "SVDQuant: reference path for %s", reason)


def _label(layer: torch.nn.Module) -> str:
    name = getattr(layer, "name", "")
    return f"layer '{name}'" if name else f"a {layer.in_features}→{layer.out_features} layer"


def _aligned(t: torch.Tensor) -> bool:
    return t.data_ptr() % 16 == 0


def _ready(t: torch.Tensor) -> torch.Tensor:
    """Contiguous and 16-byte aligned (the kernels use 16-byte vector loads)."""
    t = t.contiguous()
    return t if _aligned(t) else t.clone()


def _fallback(layer: torch.nn.Module, reason: str, level: int = logging.INFO, kind: str | None = None) -> None:
    """The reference path will run this call: say so once, or refuse if the user demanded the kernels."""
    if layer.kernel_backend == "cuda":
        raise SVDQuantError(f"kernel backend 'cuda' requested, but the CUDA kernels cannot run {reason}")
    _note(reason, level, kind)


def _gpu(layer: torch.nn.Module, index: int, family: str) -> runtime.Device | str:
    """GPU ``index`` with ``family`` loaded, or why the kernels cannot run ``layer`` there."""
    try:
        device = runtime.probe(index)
    except runtime.Unavailable as exc:
        return f"cuda:{index}: {exc}"
    device.load(family)
    why = device.unsupported.get(family)
    if why:
        return f"{device.name}: {why}"
    if device.capability < (8, 0) and layer.compute_dtype == torch.bfloat16:
        return f"{device.name}: sm_75 has no bf16 tensor cores (load the model as float16)"
    return device


def _device(layer: torch.nn.Module, x: torch.Tensor, family: str, what: str) -> runtime.Device | None:
    """The GPU of ``x`` with ``family`` loaded, or None (said once) when the kernels cannot run there."""
    device = _gpu(layer, x.device.index, family)
    if isinstance(device, str):
        _fallback(layer, f"{what} on {device}")
        return None
    return device


def _padded(x: torch.Tensor, kp: int) -> torch.Tensor:
    """A contiguous, aligned copy of ``x`` zero-padded to ``kp`` columns (where the kernel needs one)."""
    return _ready(x if x.shape[1] == kp else F.pad(x, (0, kp - x.shape[1])))


def _input(x: torch.Tensor, layer: torch.nn.Module) -> tuple[torch.Tensor, int, int]:
    """``x`` as kernel 1 reads it, with its row stride and column count: a view is read in place when its
    rows are dense and 16-byte aligned (FLUX's linear2 halves and SDXL's 320-wide layers need no copy);
    anything else is copied once, padded to the layer's padded width."""
    m, k = x.shape
    row, column = x.stride()
    ldx = row if m > 1 else k
    if column == 1 and k % 8 == 0 and ldx % 8 == 0 and ldx >= k and x.data_ptr() % 16 == 0:
        return x, ldx, k
    kp = layer.qweight.shape[1] * 2
    return _padded(x, kp), kp, kp


def _output(out: torch.Tensor | None, m: int, n: int, like: torch.Tensor) -> torch.Tensor:
    if out is None:
        return like.new_empty((m, n))
    if out.shape != (m, n) or out.dtype != like.dtype or out.device != like.device or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous ({m}, {n}) {like.dtype} tensor on {like.device}")
    return out


def _dtype_name(layer: torch.nn.Module) -> str:
    return "bf16" if layer.compute_dtype == torch.bfloat16 else "fp16"


def use_wgmma(on: bool) -> None:
    """Run INT4 kernel 2 on wgmma where the GPU is sm_90 (what SVDQUANT_WGMMA=1 sets at import); plans made
    before are dropped."""
    global _wgmma
    _wgmma = on
    _plans.clear()


def _kernel1_ranges(tiles: int, kp: int) -> int:
    """How many K ranges kernel 1 splits ``kp`` columns into, for ``tiles`` CTAs per range; none empty."""
    chunks = -(-kp // _KERNEL1_CHUNK)
    ranges = max(1, min(-(-_KERNEL1_CTAS // tiles), chunks // 2))
    return -(-chunks // -(-chunks // ranges))


def _w4a4_launches(layer: torch.nn.Module, m: int, ldx: int, kx: int,
                   wgmma: bool = False) -> tuple[list[LaunchSpec], tuple[int, int, int]]:
    """Kernel 1 (with its split-K branch sum when K is split) and kernel 2 of a W4A4 forward of ``m`` rows
    (arguments: weight tensors, None, ints and the per-call slots), and the workspace words they share
    (codes, ascales, lora_act; the branch sums of a split K follow lora_act). ``wgmma``: kernel 2 of an INT4
    layer is gemm_w4a4_sm90.cu's (same arguments and block; 128-row CTAs)."""
    np_, kp, rank = layer.qweight.shape[0], layer.qweight.shape[1] * 2, layer.rank
    nvfp4 = layer.precision == "nvfp4"
    wgmma = wgmma and not nvfp4
    rows = _WGMMA_ROW_TILE if wgmma else _ROW_TILE
    mp = packing.round_up(m, rows)
    dtype = _dtype_name(layer)
    suffix = f"{'nvfp4' if nvfp4 else ('uint4' if layer.act_unsigned else 'int4')}_{dtype}"
    rank_passes = max(1, -(-rank // 64))
    ranges = _kernel1_ranges(mp // 16 * rank_passes, kp)
    summed = rank > 0 and ranges > 1
    # NVFP4 scales: the same count of u32
    workspace = (mp * kp // 8, mp * kp // 64, max(mp * rank // 2, 4) + (ranges * mp * rank if summed else 0))
    branch_sum = [(f"svdq_quantize_branch_sum_{dtype}", (-(-mp * rank // 8 // 128), 1, 1), 128,
                   [LORA_ACT, rank, mp, ranges])] if summed else []
    return [
        (f"svdq_quantize_{suffix}", (mp // 16, ranges, rank_passes), 128,
         [X, layer.smooth_factor, layer.proj_down, CODES, ASCALES, LORA_ACT, m, ldx, kx, kp, rank, mp]),
        *branch_sum,
        (f"{_WGMMA_PREFIX if wgmma else 'svdq_gemm_'}{suffix}", (np_ // 128, mp // rows, 1), 256,
         [CODES, ASCALES, layer.qweight, layer.wscales, LORA_ACT, layer.proj_up, layer.bias,
          layer.wcscales if nvfp4 else None, layer.wtscale if nvfp4 else None, Y, m, layer.out_features, kp, rank,
          mp]),
    ], workspace


def _w4a16_launches(layer: torch.nn.Module, m: int) -> list[LaunchSpec]:
    np_, kp = layer.qweight.shape[0] * 4, layer.qweight.shape[1] * 2
    rows = 1 if m == 1 else 2 if m == 2 else 4
    return [(f"svdq_gemv_w4a16_{_dtype_name(layer)}_m{rows}", (np_ // 16, -(-m // rows), 1), 128,
             [layer.qweight, layer.wscales, layer.wzeros, layer.bias, X, Y, m, layer.out_features, kp, np_])]


def _workspaces(words: tuple[int, int, int], device: torch.device) -> list[torch.Tensor]:
    """One allocation for the three workspaces (each a multiple of 16 bytes, so each stays aligned)."""
    return list(torch.empty(sum(words), dtype=torch.int32, device=device).split(words))


def _readable(launches: list[LaunchSpec], values: dict[runtime.Slot, torch.Tensor]) -> list[LaunchSpec]:
    return [(name, grid, block, [values[a] if isinstance(a, runtime.Slot) else _ready(a) if isinstance(a, torch.Tensor)
                                 else a for a in args]) for name, grid, block, args in launches]


def plan_w4a4(layer: torch.nn.Module, x: torch.Tensor, out: torch.Tensor | None = None,
              wgmma: bool = False) -> tuple[torch.Tensor, list[LaunchSpec]]:
    """The output and the two launches (kernel 1, kernel 2) of a W4A4 forward of a 2-D input with at least
    one row, with tensors (device pointers), None (null) and ints as arguments (tests, benchmarks).
    ``wgmma``: kernel 2 of an INT4 layer on wgmma (sm_90a; :func:`kernel_function` finds it)."""
    x, ldx, kx = _input(x, layer)
    launches, words = _w4a4_launches(layer, x.shape[0], ldx, kx, wgmma)
    codes, ascales, lora_act = _workspaces(words, x.device)
    y = _output(out, x.shape[0], layer.out_features, x)
    return y, _readable(launches, {X: x, Y: y, CODES: codes, ASCALES: ascales, LORA_ACT: lora_act})


def plan_w4a16(layer: torch.nn.Module, x: torch.Tensor,
               out: torch.Tensor | None = None) -> tuple[torch.Tensor, list[LaunchSpec]]:
    """The output and the launch of a W4A16 forward of a 2-D input with 1 to W4A16_MAX_ROWS rows."""
    x = _padded(x, layer.qweight.shape[1] * 2)
    y = _output(out, x.shape[0], layer.out_features, x)
    return y, _readable(_w4a16_launches(layer, x.shape[0]), {X: x, Y: y})


def _pack(arg: object, keep: list[torch.Tensor]) -> object:
    """A launch argument as runtime.Launches takes it (a weight that does not meet the kernels' alignment is
    copied once, and the copy kept)."""
    if isinstance(arg, torch.Tensor):
        ready = _ready(arg)
        if ready is not arg:
            keep.append(ready)
        arg = ready
    return runtime.packed(arg)


def kernel_function(device: runtime.Device, family: str, name: str):
    """The loaded kernel ``name`` of ``family`` on ``device``; the wgmma kernel 2 (sm_90 only) comes from its own
    module, built on first use."""
    if name.startswith(_WGMMA_PREFIX):
        module = _wgmma_modules.get(device.index)
        if module is None:
            module = _wgmma_modules[device.index] = device.variant(build.WGMMA, [])
        return module.get_function(name).kernel
    return device.function(family, name)


def _wgmma_for(layer: torch.nn.Module, index: int) -> bool:
    """Whether kernel 2 of ``layer`` on GPU ``index`` is the wgmma one: asked for (SVDQUANT_WGMMA=1), INT4, on an
    sm_90 GPU. Elsewhere the mma.sync kernel 2 runs (said once), planned as itself: its CTAs are 256 rows."""
    if not _wgmma or layer.precision == "nvfp4":
        return False
    try:
        device = runtime.probe(index)
    except runtime.Unavailable:
        return False  # no kernel at all there: the plan says why
    if device.capability == build.capability_of(build.WGMMA_ARCH):
        return True
    if WGMMA_SETTING not in _noted:
        _noted.add(WGMMA_SETTING)
        log.info("SVDQuant: %s=1 applies to sm_90 GPUs (H100, H200); %s runs the mma.sync kernel 2",
                 WGMMA_SETTING, device.name)
    return False


def _make_plan(layer: torch.nn.Module, x: torch.Tensor, family: str, what: str, launches: list[LaunchSpec],
               workspace: tuple[int, int, int] | None) -> _Plan | str:
    problem = compute_dtype_problem(layer)
    if problem is None and x.dtype != layer.compute_dtype:
        problem = f"its input is {str(x.dtype).removeprefix('torch.')}"
    if problem is None and layer.qweight.device != x.device:
        problem = f"its weights are on {layer.qweight.device}, its input on {x.device}"
    if problem:
        reason = (f"{what} whose tensors the kernels cannot read as they are (first: {_label(layer)}: {problem}; "
                  "SVDQuant's loaders put every tensor in the model's compute dtype)")
        _fallback(layer, reason, logging.WARNING, kind=f"{what}: dtype rule")
        return reason
    device = _device(layer, x, family, what)
    if device is None:
        return f"{what}: no kernel on cuda:{x.device.index}"
    keep: list[torch.Tensor] = []
    packed = runtime.Launches([(kernel_function(device, family, name), grid, block, tuple(_pack(a, keep) for a in args))
                               for name, grid, block, args in launches])
    codes, ascales, _ = workspace or (0, 0, 0)
    return _Plan(device, family, packed, sum(workspace or ()), (4 * codes, 4 * (codes + ascales)), keep)


_data_ptr, _present = torch.Tensor.data_ptr, functools.partial(operator.is_not, None)  # (C calls: this runs per call)


def _plan_key(layer: torch.nn.Module, x: torch.Tensor, *call: object) -> tuple:
    """Everything a plan depends on: ``call`` (the input's shape, the layer's kind), the input's dtype and
    device, and the addresses and layout of the layer's weights (every tensor's shape follows from qweight's,
    the kind and the call). ``layer`` is a module (read through its buffer table: a module's attribute lookup
    is slow) or a custom op's view of one (svdquant/torch_ops.py)."""
    buffers = layer._buffers
    return (*call, x.dtype, x.get_device(), layer.kernel_backend, layer.out_features, buffers["qweight"].shape,
            *map(_data_ptr, filter(_present, buffers.values())))


def _cached(key: tuple, plan: _Plan | str) -> _Plan | str:
    if len(_plans) >= _MAX_PLANS:
        _plans.pop(next(iter(_plans)))
    _plans[key] = plan
    return plan


def _run(plan: _Plan, key: tuple, layer: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> bool:
    """Launch a plan; False (said once, and this layer and shape falls back from now on) when the driver
    refuses a launch but the GPU stays usable."""
    device = plan.device
    stream = device.stream()
    try:
        if plan.workspace:  # the three workspaces in one buffer, held past the launches
            workspace = device.workspace(plan.workspace, stream, x)
            codes = workspace.data_ptr()
            ascales, lora_act = plan.offsets
            device.run(plan.launches, stream, x.data_ptr(), y.data_ptr(), codes, codes + ascales, codes + lora_act)
        else:
            device.run(plan.launches, stream, x.data_ptr(), y.data_ptr())
    except runtime.LaunchError as exc:
        where = f"{_label(layer)} with a {tuple(x.shape)} {str(x.dtype).removeprefix('torch.')} input"
        if exc.sticky:
            raise SVDQuantError(f"CUDA error on {plan.device.name} while launching the SVDQuant kernels for {where}: "
                                f"{exc}. The GPU context is no longer usable (this or an earlier GPU operation "
                                "failed); restart ComfyUI") from exc
        reason = f"{plan.family} layers on {plan.device.name}: the driver refused a launch ({exc})"
        _fallback(layer, f"{reason}, first for {where}", logging.WARNING, kind=reason)
        _plans[key] = reason  # after _fallback: a layer that demands the kernels raises on every call
        return False
    return True


def w4a4(layer: torch.nn.Module, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor | None:
    """Fused W4A4 forward of ``layer`` (svdquant.layers.W4A4Linear) for a 2-D input, into ``out`` if given."""
    if not x.is_cuda:
        return None  # CPU inference: the reference path is the only one
    m = x.shape[0]
    if m == 0:
        return x.new_empty((0, layer.out_features))
    x, ldx, kx = _input(x, layer)
    key = _plan_key(layer, x, m, ldx, kx, layer.precision, layer.act_unsigned,
                    layer._buffers["proj_down"].shape)
    plan = _plans.get(key)
    if plan is None:
        family = layer.precision  # "int4" | "nvfp4"
        plan = _cached(key, _make_plan(layer, x, family, f"{family} W4A4 layers",
                                       *_w4a4_launches(layer, m, ldx, kx, _wgmma_for(layer, x.device.index))))
    if plan.__class__ is str:
        return None
    y = _output(out, m, layer.out_features, x)
    return y if _run(plan, key, layer, x, y) else None


def w4a16(layer: torch.nn.Module, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor | None:
    """Fused W4A16 forward of ``layer`` (svdquant.layers.W4A16Linear) for a 2-D input, into ``out`` if given."""
    if not x.is_cuda:
        return None
    m = x.shape[0]
    if m > W4A16_MAX_ROWS:
        _note(f"W4A16 layers with more than {W4A16_MAX_ROWS} input rows (the kernel is a small-batch GEMV)")
        return None
    if m == 0:
        return x.new_empty((0, layer.out_features))
    x = _padded(x, layer._buffers["qweight"].shape[1] * 2)  # (the buffer table: see _plan_key)
    key = _plan_key(layer, x, m)
    plan = _plans.get(key)
    if plan is None:
        plan = _cached(key, _make_plan(layer, x, "w4a16", "W4A16 layers", _w4a16_launches(layer, m), None))
    if plan.__class__ is str:
        return None
    y = _output(out, m, layer.out_features, x)
    return y if _run(plan, key, layer, x, y) else None


def fused_path_problem(layer: torch.nn.Module, device: torch.device) -> str | None:
    """Why ``layer`` would run on the reference path on ``device`` (None: on the fused kernels), judged from
    the layer and the device as they are now: what the loader counts in its log line."""
    if layer.kernel_backend == "torch":
        return "kernel backend 'torch' chosen"
    if device.type != "cuda":
        return f"no CUDA kernels on {device.type}"
    if dispatch.installed("w4a4" if hasattr(layer, "precision") else "w4a16") is None:
        return "the CUDA kernels are not enabled"
    gpu = _gpu(layer, torch.cuda.current_device() if device.index is None else device.index,
               getattr(layer, "precision", "w4a16"))
    return gpu if isinstance(gpu, str) else compute_dtype_problem(layer)


def path_summary(layers: list[torch.nn.Module], device: torch.device) -> str:
    """'340 layers on the CUDA kernels' / '300 … , 40 on the reference path (40: reason)'."""
    reasons = Counter(fused_path_problem(layer, device) for layer in layers)
    fused = reasons.pop(None, 0)
    if not reasons:
        return f"{fused} layers on the CUDA kernels"
    why = "; ".join(f"{count}: {reason}" if len(reasons) > 1 else reason for reason, count in reasons.most_common())
    reference = sum(reasons.values())
    if not fused:
        return f"{reference} layers on the PyTorch reference path ({why})"
    return f"{fused} layers on the CUDA kernels, {reference} on the PyTorch reference path ({why})"


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
