"""A GPU for the launch path, on the CPU: for the tests of kernels/backend.py and for
benchmarks/launch_overhead.py.

What is replaced: CuPy (a module whose kernel functions record their launches, or fail as told), torch's
current CUDA stream (a placeholder) and the device probe (a runtime.Device of the given capability, by
default an RTX 50's, where every kernel family runs). Inputs made with :func:`cuda_looking` say they are
CUDA tensors. Everything the backend and runtime do around a launch (planning, argument packing, error
handling) runs as it would on a GPU; the pointers the kernels would read are CPU addresses, which only
the recorder sees.
"""

from __future__ import annotations

import contextlib
import itertools
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from comfyui_svdquant.kernels import build, runtime


class LooksLikeCuda(torch.Tensor):
    """A CPU tensor whose ``is_cuda`` is True; otherwise a plain tensor (no ``__torch_function__`` cost)."""

    __torch_function__ = torch._C._disabled_torch_function_impl
    is_cuda = True


class LooksLikeCudaThroughOps(torch.Tensor):
    """The same, kept by the results of torch operations (for inputs that go through whole layers)."""

    is_cuda = True


def cuda_looking(t: torch.Tensor, through_ops: bool = False) -> torch.Tensor:
    return t.as_subclass(LooksLikeCudaThroughOps if through_ops else LooksLikeCuda)


class DriverError(Exception):
    """What CuPy raises for a failed launch (cupy.cuda.driver.CUDADriverError): a status code."""

    def __init__(self, status: int):
        super().__init__(f"CUDA driver status {status}")
        self.status = status


@dataclass
class StubGpu:
    device: runtime.Device
    launches: list[tuple[str, tuple, int, tuple]] = field(default_factory=list)  # (name, grid, block, args)
    fail: Exception | None = None  # raised by the next launches instead of recording them


class _Kernel:
    def __init__(self, name: str, gpu: StubGpu):
        self.name, self.gpu = name, gpu

    def __call__(self, grid, block, args, shared_mem=0, stream=None) -> None:
        if self.gpu.fail is not None:
            raise self.gpu.fail
        self.gpu.launches.append((self.name, grid, block[0], args))


class _Stream:
    def __enter__(self) -> _Stream:
        return self

    def __exit__(self, *exc) -> None:
        pass

    @staticmethod
    def from_external(external) -> _Stream:
        return _Stream()


def _kernel_names() -> list[str]:
    dtypes = ("bf16", "fp16")
    w4a4 = [f"svdq_{kind}_{mode}_{dt}" for kind, mode, dt in
            itertools.product(("quantize", "gemm"), ("int4", "uint4", "nvfp4"), dtypes)]
    w4a4 += [f"svdq_quantize_branch_sum_{dt}" for dt in dtypes]
    return w4a4 + [f"svdq_gemv_w4a16_{dt}_m{rows}" for dt, rows in itertools.product(dtypes, (1, 2, 4))]


@contextlib.contextmanager
def stub_gpu(capability: tuple[int, int] = (12, 0)) -> Iterator[StubGpu]:
    device = runtime.Device(0, "Stub GPU", capability, build.target(capability))
    gpu = StubGpu(device)
    for family, why in build.families_for(capability).items():
        if why:
            device.unsupported[family] = why
        else:
            device._modules[family] = []
    device._functions.update({name: _Kernel(name, gpu) for name in _kernel_names()})
    cupy = types.ModuleType("cupy")
    cupy.cuda = types.SimpleNamespace(Device=lambda index: contextlib.nullcontext(), Stream=_Stream,
                                      ExternalStream=lambda handle, index: _Stream(),
                                      driver=types.SimpleNamespace(CUDADriverError=DriverError))
    stream = types.SimpleNamespace(cuda_stream=0)
    saved = sys.modules.get("cupy"), torch.cuda.current_stream, runtime.probe
    sys.modules["cupy"] = cupy
    torch.cuda.current_stream = lambda index=None: stream
    runtime.probe = lambda index: device
    try:
        yield gpu
    finally:
        torch.cuda.current_stream, runtime.probe = saved[1], saved[2]
        if saved[0] is None:
            sys.modules.pop("cupy", None)
        else:
            sys.modules["cupy"] = saved[0]
