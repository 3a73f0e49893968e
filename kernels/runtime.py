"""Per-GPU kernel state: why the kernels cannot run here, or the loaded modules and a launcher.

CuPy is imported here, lazily (only when a CUDA tensor meets a quantized layer or :func:`probe` is
called), so importing the pack never needs CuPy, a GPU or a compiler. The kernels are ``cupy.RawModule``s
(see build.py: NVRTC, CuPy's kernel cache), launched through the driver (CuPy's ``cuLaunchKernel`` binding)
on torch's current stream with the tensors' device pointers (zero copy), from argument buffers made once
per plan (:class:`Launches`).
"""

from __future__ import annotations

import functools
import struct
import threading
from dataclasses import dataclass, field

import numpy as np
import torch

from . import build


class Unavailable(RuntimeError):
    """The kernels cannot run in this process or on this GPU; the message says why."""


# The workspace kept per stream (int32 words, 4 MiB): kernel 1's outputs for up to 1024 tokens of FLUX's
# widest input (12288). Calls that need more run long enough on the GPU to hide an allocation.
SCRATCH_WORDS = 1 << 20

# CUDA driver errors after which the context is unusable (illegal address, hardware stack error, illegal
# instruction, misaligned address, invalid address space, invalid PC, launch failed): every later call
# fails too, so no fallback can help.
STICKY = frozenset({700, 714, 715, 716, 717, 718, 719})


class LaunchError(RuntimeError):
    """The driver refused or failed a kernel launch (CuPy's CUDADriverError, with its status)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status

    @property
    def sticky(self) -> bool:
        return self.status in STICKY


class Slot(int):
    """A per-call launch argument (the input, the output, a workspace): its index in the call's values."""


def packed(arg: torch.Tensor | int | Slot | None):
    """A launch argument as :class:`Launches` takes it: a tensor's device pointer, a null pointer, an int32, or a
    :class:`Slot` filled per call."""
    if isinstance(arg, Slot):
        return arg
    if isinstance(arg, torch.Tensor):
        return np.uint64(arg.data_ptr())
    return np.uint64(0) if arg is None else np.int32(arg)


class Launches:
    """Kernel launches that run together, in order, as ``cuLaunchKernel`` takes them: made once (per plan) and
    reused for every call.

    Each launch has one 8-byte slot per constant argument (a device pointer, or an int32 in its low half: the
    driver reads each argument's own size from the start of its slot; CUDA hosts are little-endian) and the
    array of their addresses that the driver reads as ``kernelParams``. A per-call argument's address points
    instead into ``values``, one buffer shared by every launch, so a call writes each per-call value once (one
    ``struct.pack_into``) and launches, making no Python object per argument."""

    def __init__(self, kernels: list[tuple[object, tuple[int, int, int], int, tuple]]):
        """``kernels``: (function, grid, block, arguments as :func:`packed` gives them)."""
        slots = 1 + max((a for *_, args in kernels for a in args if isinstance(a, Slot)), default=-1)
        self.values = np.zeros(max(slots, 1), dtype=np.uint64)
        self.write = struct.Struct(f"{slots}Q").pack_into  # (self.values, 0, *values)
        # per launch: cuLaunchKernel's arguments before the stream (function, grid, block, shared bytes), and
        # kernelParams
        self.calls: list[tuple[tuple[int, ...], int]] = []
        self._keep: list[np.ndarray] = []  # the arrays the driver reads
        base = self.values.ctypes.data
        for function, grid, block, args in kernels:
            function = getattr(function, "kernel", function)  # a RawModule's RawKernel → its cupy.cuda.Function
            params = np.zeros(len(args), dtype=np.uint64)
            halves = params.view(np.int32)
            pointers = params.ctypes.data + 8 * np.arange(len(args), dtype=np.uint64)
            for i, arg in enumerate(args):
                if isinstance(arg, Slot):
                    pointers[i] = base + 8 * arg
                elif isinstance(arg, np.int32):
                    halves[2 * i] = arg
                else:
                    params[i] = arg
            self._keep += [params, pointers]
            self.calls.append(((function.ptr, *grid, block, 1, 1, 0), pointers.ctypes.data))


def torch_cuda_major() -> int:
    """CUDA major version of the installed torch (which decides the NVRTC and CuPy wheels)."""
    if getattr(torch.version, "hip", None):
        raise Unavailable("this is a ROCm build of PyTorch: the CUDA kernels do not apply")
    if not torch.version.cuda:
        raise Unavailable("this PyTorch build has no CUDA")
    if not torch.cuda.is_available():
        raise Unavailable("no CUDA GPU is visible (torch.cuda.is_available() is False)")
    return int(torch.version.cuda.split(".")[0])


def import_cupy():
    try:
        import cupy
    except Exception as exc:  # ImportError, or a CuPy built for another CUDA failing at import
        raise Unavailable(f"CuPy cannot be imported ({type(exc).__name__}: {exc}); run install.py in the pack "
                          "folder to install the CuPy matching your PyTorch") from exc
    return cupy


@functools.cache
def compiler():
    """CuPy's NVRTC binding, with PyTorch's NVRTC loaded (build.nvrtc)."""
    try:
        return build.nvrtc()
    except build.CompileError as exc:
        raise Unavailable(str(exc)) from exc


@dataclass
class Device:
    """The kernels of one GPU."""

    index: int
    name: str
    capability: tuple[int, int]
    arch: str
    unsupported: dict[str, str] = field(default_factory=dict)  # family → reason
    _modules: dict[str, list] = field(default_factory=dict)  # family → its loaded cupy.RawModules
    _functions: dict[str, object] = field(default_factory=dict)  # kernel name → cupy.cuda.Function
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    _launching: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    _api: tuple | None = field(default=None, repr=False, compare=False)  # CuPy's driver calls, bound on first use
    _scratch: dict[int, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)  # stream → buffer

    def load(self, family: str) -> None:
        """Compile (or take from CuPy's kernel cache) and load a family, once however many threads ask at
        the same time; on failure record why."""
        if family in self._modules or family in self.unsupported:
            return
        with self._lock:
            if family not in self._modules and family not in self.unsupported:
                self._load(family)

    def _load(self, family: str) -> None:
        cupy = import_cupy()
        try:  # loaded now (cuModuleLoadData), so that a driver too old for the cubins is found here
            with cupy.cuda.Device(self.index):
                modules = build.build_family(family, self.arch)
        except build.CompileError as exc:
            first = next((line for line in str(exc).splitlines() if "error" in line), str(exc).splitlines()[0])
            self.unsupported[family] = f"compile failure for {self.arch}: {first.strip()}"
            return
        except OSError as exc:
            self.unsupported[family] = (f"CuPy's kernel cache is not writable ({exc}); set CUPY_CACHE_DIR to a "
                                        "writable folder")
            return
        except RuntimeError as exc:  # CuPy's CUDA errors (a driver too old for the cubins …), its missing parts
            self.unsupported[family] = f"cannot load the {self.arch} kernels ({type(exc).__name__}: {exc})"
            return
        self._modules[family] = modules

    def function(self, family: str, name: str):
        """Kernel ``name`` of a loaded family, from the translation unit that defines it (svdq_quantize_*
        in quantize.cu, svdq_gemm_* in gemm_w4a4.cu …), so no lookup ever fails at the driver."""
        fn = self._functions.get(name)
        if fn is None:
            units = build.FAMILIES[family]
            index = next((i for i, unit in enumerate(units) if name.startswith(unit.kernel_prefix)), None)
            if index is None:
                raise Unavailable(f"kernel {name} is in none of the {family} sources")
            with import_cupy().cuda.Device(self.index):
                fn = self._functions[name] = self._modules[family][index].get_function(name).kernel
        return fn

    def variant(self, unit: build.Unit, defines: list[str]):
        """``unit`` built for this GPU with extra ``-D`` defines and loaded: a code path this GPU would not
        pick, for the tests and benchmarks that compare the two. Returns the ``cupy.RawModule``."""
        with import_cupy().cuda.Device(self.index):
            return build.load_module(unit, self.arch, tuple(defines))

    def launch(self, family: str, name: str, grid: tuple[int, int, int], block: int, args: list) -> None:
        """Launch a kernel of a loaded family on torch's current stream of this device."""
        self.launch_function(self.function(family, name), grid, block, args)

    def launch_function(self, function, grid: tuple[int, int, int], block: int, args: list) -> None:
        """Launch a CuPy kernel (a Function, or a RawModule's RawKernel) on torch's current stream of this
        device. ``args``: tensors (passed as device pointers), None (a null pointer) and ints (int32)."""
        self.run(Launches([(function, grid, block, tuple(map(packed, args)))]), self.stream())

    def stream(self) -> int:
        """torch's current stream of this device (its CUDA handle)."""
        return torch._C._cuda_getCurrentRawStream(self.index)

    def workspace(self, words: int, stream: int, like: torch.Tensor) -> torch.Tensor:
        """At least ``words`` int32 of scratch, on ``like``'s device, for kernels about to run on ``stream``.
        A small workspace is one buffer per stream, made once and kept (kernels on one stream run in order, so
        each call may reuse it), which saves the small calls, whose time is mostly launch cost, an allocation
        each; a larger one, or any while a CUDA graph is being captured (the graph must own what it reads),
        comes from torch's caching allocator."""
        if words <= SCRATCH_WORDS and not torch._C._cuda_isCurrentStreamCapturing():
            scratch = self._scratch.get(stream)
            if scratch is None:
                scratch = self._scratch[stream] = like.new_empty(SCRATCH_WORDS, dtype=torch.int32)
            return scratch
        return like.new_empty(words, dtype=torch.int32)

    def run(self, launches: Launches, stream: int, *values: int) -> None:
        """Launch ``launches`` in order on ``stream`` of this device, with the per-call arguments ``values``
        (device pointers, as many as its slots); a driver error is raised as :class:`LaunchError`. Capturable in
        a CUDA graph: nothing here allocates or synchronises."""
        launch_kernel, get_device, set_device, driver_error = self._api or self._bind()
        with self._launching:  # the values are shared by every thread that runs these launches
            launches.write(launches.values, 0, *values)
            previous = get_device()
            if previous != self.index:  # the kernels were loaded into this device's context
                set_device(self.index)
            try:
                for head, kernel_params in launches.calls:
                    launch_kernel(*head, stream, kernel_params, 0)
            except driver_error as exc:
                raise LaunchError(exc.status, str(exc)) from exc
            finally:
                if previous != self.index:
                    set_device(previous)

    def _bind(self) -> tuple:
        cupy = import_cupy()
        self._api = (cupy.cuda.driver.launchKernel, cupy.cuda.runtime.getDevice, cupy.cuda.runtime.setDevice,
                     cupy.cuda.driver.CUDADriverError)
        return self._api


_devices: dict[int, Device | Unavailable] = {}
_lock = threading.Lock()


def probe(index: int) -> Device:
    """The :class:`Device` for GPU ``index``; raises :class:`Unavailable` when no kernel can run there."""
    with _lock:
        state = _devices.get(index)
        if state is None:
            state = _devices[index] = _make_device(index)
    if isinstance(state, Unavailable):
        raise state
    return state


def _make_device(index: int) -> Device | Unavailable:
    try:
        major = torch_cuda_major()
        cupy = import_cupy()
        nvrtc = compiler()
        capability = torch.cuda.get_device_capability(index)
        arch = build.target(capability)
        reasons = build.families_for(capability)
        if all(reasons.values()):
            raise Unavailable(reasons["int4"])
        with cupy.cuda.Device(index):
            driver = cupy.cuda.runtime.driverGetVersion()  # e.g. 12080 for CUDA 12.8
        if driver // 1000 < major:
            raise Unavailable(f"the NVIDIA driver supports CUDA {driver // 1000}.{driver % 1000 // 10}, older than "
                              f"PyTorch's CUDA {torch.version.cuda}: update the driver")
        if capability[0] * 10 + capability[1] not in nvrtc.getSupportedArchs():
            major, minor = nvrtc.getVersion()
            raise Unavailable(f"NVRTC {major}.{minor} cannot compile for {arch}")
    except Unavailable as exc:
        return exc
    device = Device(index, torch.cuda.get_device_name(index), capability, arch)
    device.unsupported.update({f: why for f, why in reasons.items() if why})
    return device


def reset() -> None:
    """Forget every device's state (tests; a new install)."""
    with _lock:
        _devices.clear()
    compiler.cache_clear()
