"""A GPU for the launch path, on the CPU: for the tests of kernels/backend.py and for
benchmarks/launch_overhead.py.

What is replaced: CuPy (its ``cuLaunchKernel`` binding records each launch, reading every argument from
the memory the driver would read, through the ``kernelParams`` array; or fails as told), torch's current
CUDA stream (a placeholder) and the device probe (a runtime.Device of the given capability, by default an
RTX 50's, where every kernel family runs). Inputs made with :func:`cuda_looking` say they are CUDA tensors.
Everything the backend and runtime do around a launch (planning, argument buffers, error handling) runs as
it would on a GPU; the pointers the kernels would read are CPU addresses, which only the recorder sees.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import re
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from comfyui_svdquant.kernels import build, runtime

KERNELS = Path(build.__file__).resolve().parent


class LooksLikeCuda(torch.Tensor):
    """A CPU tensor whose ``is_cuda`` is True; otherwise a plain tensor (no ``__torch_function__`` cost)."""

    __torch_function__ = torch._C._disabled_torch_function_impl
    is_cuda = True


class LooksLikeCudaThroughOps(torch.Tensor):
    """The same, kept by the results of torch operations (for inputs that go through whole layers)."""

    is_cuda = True


def cuda_looking(t: torch.Tensor, through_ops: bool = False) -> torch.Tensor:
    return t.as_subclass(LooksLikeCudaThroughOps if through_ops else LooksLikeCuda)


@contextlib.contextmanager
def every_tensor_cuda_looking() -> Iterator[None]:
    """Every plain tensor says it is a CUDA tensor (``torch.Tensor.is_cuda`` patched): for the launch-cost
    benchmark, whose inputs then cost per method call what a GPU tensor's do. A subclass adds about 0.1 µs
    to each of a call's dozen tensor method calls; the patched ``is_cuda`` costs 0.04 µs more than the real
    one, once per call."""
    torch.Tensor.is_cuda = property(lambda self: True)
    try:
        yield
    finally:
        del torch.Tensor.is_cuda


class DriverError(Exception):
    """What CuPy raises for a failed launch (cupy.cuda.driver.CUDADriverError): a status code."""

    def __init__(self, status: int):
        super().__init__(f"CUDA driver status {status}")
        self.status = status


class _Kernel:
    """A kernel function: its handle, and its argument count as its source declares it."""

    def __init__(self, name: str, ptr: int, arity: int):
        self.name, self.ptr, self.arity = name, ptr, arity


def _arities(source: str) -> dict[str, int]:
    """Parameters of each kernel entry point a .cu file defines, by kernel name: the parameter count of each
    ``extern "C" __global__`` macro, for every name the file instantiates it with."""
    text = (KERNELS / source).read_text()
    macros = {m.group(1): m.group(2).count(",") + 1 for m in
              re.finditer(r'#define (\w+)\(NAME\b.*?extern "C" __global__ void.*?\bNAME\(([^)]*)\)', text, re.S)}
    return {m.group(2): macros[m.group(1)] for m in re.finditer(r"^(\w+)\((\w+),", text, re.M) if m.group(1) in macros}


# Arguments per kernel name: svdq_quantize_* (and kernel 1's branch sum), svdq_gemm_*, the wgmma kernel 2, …
_ARITY = {name: n for unit in (*(u for units in build.FAMILIES.values() for u in units), build.WGMMA)
          for name, n in _arities(unit.source).items()}


@dataclass
class StubGpu:
    device: runtime.Device
    launches: list[tuple[str, tuple, int, tuple]] = field(default_factory=list)  # (name, grid, block, args)
    fail: Exception | None = None  # raised by the next launches instead of recording them
    kernels: dict[int, _Kernel] = field(default_factory=dict)  # handle → function

    def kernel(self, name: str) -> _Kernel:
        """A kernel function whose launches are recorded, e.g. of a module built as a variant."""
        made = _Kernel(name, 0x1000 + len(self.kernels), _ARITY[name])
        self.kernels[made.ptr] = made
        return made


def _launcher(gpu: StubGpu, kernels: dict[int, _Kernel], record: bool):
    def launch_nothing(f, gx, gy, gz, bx, by, bz, shared, stream, kernel_params, extra) -> None:
        pass

    def launch_kernel(f, gx, gy, gz, bx, by, bz, shared, stream, kernel_params, extra) -> None:
        if gpu.fail is not None:
            raise gpu.fail
        kernel = kernels[f]
        pointers = (ctypes.c_uint64 * kernel.arity).from_address(kernel_params)
        args = tuple(ctypes.c_uint64.from_address(p).value for p in pointers)
        gpu.launches.append((kernel.name, (gx, gy, gz), bx, args))
    return launch_kernel if record else launch_nothing


def _kernel_names() -> list[str]:
    dtypes = ("bf16", "fp16")
    w4a4 = [f"svdq_{kind}_{mode}_{dt}" for kind, mode, dt in
            itertools.product(("quantize", "gemm"), ("int4", "uint4", "nvfp4"), dtypes)]
    w4a4 += [f"svdq_quantize_branch_sum_{dt}" for dt in dtypes]
    return w4a4 + [f"svdq_gemv_w4a16_{dt}_m{rows}" for dt, rows in itertools.product(dtypes, (1, 2, 4))]


@contextlib.contextmanager
def stub_gpu(capability: tuple[int, int] = (12, 0), record: bool = True) -> Iterator[StubGpu]:
    """The stubbed GPU; ``record=False``: launches do nothing at all (what the launch-cost benchmark times)."""
    device = runtime.Device(0, "Stub GPU", capability, build.target(capability))
    gpu = StubGpu(device)
    for family, why in build.families_for(capability).items():
        if why:
            device.unsupported[family] = why
        else:
            device._modules[family] = []
    device._functions.update({name: gpu.kernel(name) for name in _kernel_names()})
    cupy = types.ModuleType("cupy")
    cupy.cuda = types.SimpleNamespace(Device=lambda index: contextlib.nullcontext(),
                                      driver=types.SimpleNamespace(CUDADriverError=DriverError,
                                                                   launchKernel=_launcher(gpu, gpu.kernels, record)),
                                      runtime=types.SimpleNamespace(getDevice=lambda: 0, setDevice=lambda index: None))
    # torch's stream queries (a CPU build of torch has none): one stream, never capturing
    streams = {"_cuda_getCurrentRawStream": lambda index: 0, "_cuda_isCurrentStreamCapturing": lambda: False}
    saved = sys.modules.get("cupy"), {name: getattr(torch._C, name, None) for name in streams}, runtime.probe
    sys.modules["cupy"] = cupy
    for name, stub in streams.items():
        setattr(torch._C, name, stub)
    runtime.probe = lambda index: device
    try:
        yield gpu
    finally:
        runtime.probe = saved[2]
        for name, original in saved[1].items():
            if original is None:
                delattr(torch._C, name)
            else:
                setattr(torch._C, name, original)
        if saved[0] is None:
            sys.modules.pop("cupy", None)
        else:
            sys.modules["cupy"] = saved[0]
