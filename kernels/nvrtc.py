"""NVRTC through ctypes: CUDA C++ → cubin for any target architecture, with or without a GPU.

Only ``libnvrtc`` is needed (the ``nvidia-cuda-nvrtc`` wheel for CUDA 13, ``nvidia-cuda-nvrtc-cu12``
for CUDA 12, or a CUDA toolkit): no CuPy, no driver, no GPU, so CI builds and inspects every target.
The kernels include no CUDA header, so no include path is needed either.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path


class NvrtcError(RuntimeError):
    """NVRTC is missing, or a compilation failed (the message carries the compiler's log)."""


@dataclass(frozen=True)
class Program:
    cubin: bytes
    log: str


def _site_dirs() -> list[Path]:
    return [Path(p) for p in sys.path if p and os.path.isdir(os.path.join(p, "nvidia"))]


def _major_of(path: Path) -> int:
    """CUDA major version encoded in a libnvrtc file name (libnvrtc.so.13, nvrtc64_120_0.dll)."""
    match = re.search(r"libnvrtc\.so\.(\d+)", path.name) or re.search(r"nvrtc64_(\d+?)\d_", path.name)
    return int(match.group(1)) if match else 0


def candidates() -> list[Path]:
    """Every libnvrtc this process could load: pip wheels first, then a CUDA toolkit, then the system."""
    found: list[Path] = []
    if sys.platform == "win32":
        patterns = ["nvidia/*/bin/nvrtc64_*.dll", "nvidia/*/bin/*/nvrtc64_*.dll"]
        toolkit = ["bin/nvrtc64_*.dll", "bin/*/nvrtc64_*.dll"]
    else:
        patterns = ["nvidia/*/lib/libnvrtc.so.*"]
        toolkit = ["lib64/libnvrtc.so.*", "lib/libnvrtc.so.*", "targets/*/lib/libnvrtc.so.*"]
    for site in _site_dirs():
        for pattern in patterns:
            found += sorted(site.glob(pattern))
    roots = [os.environ.get(v) for v in ("CUDA_PATH", "CUDA_HOME")] + ["/usr/local/cuda"]
    for root in filter(None, roots):
        for pattern in toolkit:
            found += sorted(Path(root).glob(pattern))
    system = ctypes.util.find_library("nvrtc")
    if system:
        found.append(Path(system))
    keep = [p for p in found if "builtins" not in p.name and ".alt." not in p.name]
    return list(dict.fromkeys(keep))


class Nvrtc:
    """One loaded libnvrtc."""

    def __init__(self, path: Path):
        self.path = path
        if sys.platform == "win32":
            os.add_dll_directory(str(path.parent))
        else:  # libnvrtc dlopens its builtins by soname; make the one beside it visible first
            for builtins in sorted(path.parent.glob("libnvrtc-builtins.so*")):
                try:
                    ctypes.CDLL(str(builtins), mode=ctypes.RTLD_GLOBAL)
                    break
                except OSError:
                    continue
        self.lib = ctypes.CDLL(str(path))
        self.lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        major, minor = ctypes.c_int(), ctypes.c_int()
        self._check(self.lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
        self.version = (major.value, minor.value)

    def _check(self, status: int, what: str) -> None:
        if status != 0:
            raise NvrtcError(f"{what} failed: {self.lib.nvrtcGetErrorString(status).decode()}")

    def supported_archs(self) -> list[int]:
        n = ctypes.c_int()
        self._check(self.lib.nvrtcGetNumSupportedArchs(ctypes.byref(n)), "nvrtcGetNumSupportedArchs")
        archs = (ctypes.c_int * n.value)()
        self._check(self.lib.nvrtcGetSupportedArchs(archs), "nvrtcGetSupportedArchs")
        return list(archs)

    def compile(self, source: str, name: str, options: list[str], headers: dict[str, str]) -> Program:
        """Compile ``source`` (which may #include the in-memory ``headers``) to a cubin."""
        lib = self.lib
        prog = ctypes.c_void_p()
        header_src = (ctypes.c_char_p * len(headers))(*[h.encode() for h in headers.values()])
        header_names = (ctypes.c_char_p * len(headers))(*[h.encode() for h in headers])
        self._check(lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), len(headers),
                                           header_src, header_names), "nvrtcCreateProgram")
        try:
            opts = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
            status = lib.nvrtcCompileProgram(prog, len(options), opts)
            size = ctypes.c_size_t()
            self._check(lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size)), "nvrtcGetProgramLogSize")
            log_buf = ctypes.create_string_buffer(size.value)
            self._check(lib.nvrtcGetProgramLog(prog, log_buf), "nvrtcGetProgramLog")
            log = log_buf.value.decode(errors="replace")
            if status != 0:
                raise NvrtcError(f"{name} ({' '.join(options)}) did not compile:\n{log}")
            self._check(lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "nvrtcGetCUBINSize")
            cubin = ctypes.create_string_buffer(size.value)
            self._check(lib.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN")
            return Program(cubin.raw, log)
        finally:
            lib.nvrtcDestroyProgram(ctypes.byref(prog))


@functools.cache
def load(cuda_major: int | None = None) -> Nvrtc:
    """The libnvrtc to use: of CUDA ``cuda_major`` when given (it must match the driver the cubins run
    on: torch's CUDA), else the newest found. Raises :class:`NvrtcError` naming what is missing."""
    found = candidates()
    if cuda_major is not None:
        found = [p for p in found if _major_of(p) in (cuda_major, 0)]
    found.sort(key=_major_of, reverse=True)
    errors = []
    for path in found:
        try:
            nvrtc = Nvrtc(path)
        except (OSError, NvrtcError) as exc:
            errors.append(f"{path}: {exc}")
            continue
        if cuda_major is None or nvrtc.version[0] == cuda_major:
            return nvrtc
        errors.append(f"{path}: NVRTC {nvrtc.version[0]}.{nvrtc.version[1]}, need CUDA {cuda_major}")
    wheel = "nvidia-cuda-nvrtc-cu12" if cuda_major == 12 else "nvidia-cuda-nvrtc"
    detail = "; ".join(errors) if errors else "none found"
    raise NvrtcError(f"no usable libnvrtc{f' for CUDA {cuda_major}' if cuda_major else ''} ({detail}): "
                     f"pip install {wheel} (or run the pack's install.py)")
