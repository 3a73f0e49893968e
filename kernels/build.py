"""What is compiled for which GPU, and how: CUDA C++ through CuPy's NVRTC.

A *family* is the set of kernels one layer kind needs on one GPU: ``int4`` (kernel 1 + kernel 2 for
INT4 checkpoints), ``nvfp4`` (the same for NVFP4 checkpoints) and ``w4a16`` (the modulation GEMV).
Each family is one or more translation units, compiled two ways from the same text and options:

- on a GPU (first use, or install.py): :func:`load_module`, a ``cupy.RawModule`` (NVRTC backend), whose
  cubins CuPy keeps in its on-disk kernel cache (``$CUPY_CACHE_DIR``, else ``~/.cupy/kernel_cache``), keyed
  on the source, the options, the arch, the NVRTC version and CuPy's own build. The pack's headers are
  inlined into the source (:func:`translation_unit`), so that key covers them too.
- without a GPU (CI, ``install.py --targets``): :func:`compile_cubin`, CuPy's NVRTC binding for any target,
  giving the cubin and the compiler's log for the machine-code checks.

NVRTC is the one PyTorch's CUDA wheels bring: importing torch loads it, and CuPy then uses that library.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parent
HEADERS = ("common.cuh", "ptx.cuh")


class CompileError(RuntimeError):
    """NVRTC cannot be loaded, or a compilation failed (the message carries the compiler's log)."""


@dataclass(frozen=True)
class Program:
    cubin: bytes
    log: str


@dataclass(frozen=True)
class Unit:
    """One translation unit: a .cu file compiled with one family define."""

    source: str
    define: str | None = None

    @property
    def kernel_prefix(self) -> str:  # gemm_w4a4.cu defines svdq_gemm_*, quantize.cu svdq_quantize_*
        return "svdq_" + Path(self.source).stem.split("_")[0]

    @property
    def stem(self) -> str:  # e.g. gemm_w4a4-int4
        family = self.define.removeprefix("SVDQ_FAMILY_").lower() if self.define else ""
        return Path(self.source).stem + (f"-{family}" if family else "")


# Family → its translation units.
FAMILIES = {
    "int4": (Unit("quantize.cu", "SVDQ_FAMILY_INT4"), Unit("gemm_w4a4.cu", "SVDQ_FAMILY_INT4")),
    "nvfp4": (Unit("quantize.cu", "SVDQ_FAMILY_NVFP4"), Unit("gemm_w4a4.cu", "SVDQ_FAMILY_NVFP4")),
    "w4a16": (Unit("gemv_w4a16.cu"),),
}

# INT4 kernel 2 on Hopper's warpgroup MMA (wgmma, sm_90a only): no family of its own, since kernel 1 and the
# launch are the int4 family's; loaded only where the user opts in (backend.WGMMA_SETTING), as a variant module.
WGMMA = Unit("gemm_w4a4_sm90.cu", "SVDQ_FAMILY_INT4")
WGMMA_ARCH = "sm_90a"

# The targets CI builds and inspects (one per GPU generation the pack supports).
CI_TARGETS = ("sm_75", "sm_80", "sm_86", "sm_89", "sm_90a", "sm_120a")

# What CuPy's RawModule adds after the options it is given (CuPy 13/14): flush-to-zero, its own -arch for
# the current device (without the arch-specific 'a'), and device functions by default. NVRTC keeps the
# arch-specific target given first when the plain arch of the same number follows (sm_120a, sm_120);
# tests/test_kernels_build.py checks that the result is the machine code CI inspects.
RAWMODULE_ADDS = ("-ftz=true", "-arch=sm_{cc}", "--device-as-default-execution-space")


def target(capability: tuple[int, int]) -> str:
    """The NVRTC -arch for a device. Hopper and Blackwell-consumer parts get their arch-specific
    variant ('a'): sm_120a is what enables the block-scaled FP4 MMA."""
    major, minor = capability
    return f"sm_{major}{minor}" + ("a" if major in (9, 12) else "")


def capability_of(arch: str) -> tuple[int, int]:
    """'sm_120a' → (12, 0)."""
    digits = "".join(c for c in arch if c.isdigit())
    return int(digits[:-1]), int(digits[-1])


def families_for(capability: tuple[int, int]) -> dict[str, str | None]:
    """Family → None when it runs on this GPU, else the reason it does not."""
    cc = capability[0] * 10 + capability[1]
    old = f"sm_{cc} is older than sm_75 (Turing): no 4-bit tensor-core instruction"
    fp4 = None if capability[0] == 12 else (
        f"NVFP4 checkpoints need the block-scaled FP4 mma.sync of sm_120/121 (RTX 50, DGX Spark); this GPU is sm_{cc}")
    return {"int4": old if cc < 75 else None, "nvfp4": old if cc < 75 else fp4, "w4a16": old if cc < 75 else None}


_INCLUDE = re.compile(r'^#include "([\w.]+)"[^\n]*$', re.M)


def translation_unit(unit: Unit) -> str:
    """The unit's source with the pack's headers inlined, each once (``#line`` keeps the compiler's messages
    naming the right file and line): one self-contained text, so a cache keyed on the source covers the
    headers too, and NVRTC needs no include path."""
    seen: set[str] = set()

    def expand(name: str) -> str:
        text = (SOURCE_DIR / name).read_text().replace("#pragma once", "")

        def include(match: re.Match) -> str:
            header = match.group(1)
            if header not in HEADERS:
                raise CompileError(f"{name} includes {header}, which is not one of the pack's headers {HEADERS}")
            if header in seen:
                return ""
            seen.add(header)
            resume = text.count("\n", 0, match.start()) + 2
            return f'#line 1 "{header}"\n{expand(header)}\n#line {resume} "{name}"'

        return _INCLUDE.sub(include, text)

    return expand(unit.source)


def options(unit: Unit, arch: str, verbose: bool = False, defines: tuple[str, ...] = ()) -> list[str]:
    # No --use_fast_math: the quantizer relies on IEEE division (bit-identical codes). -ftz=true is what
    # RawModule compiles with whatever it is given (see RAWMODULE_ADDS); stated here so that the cubins CI
    # compiles and inspects are the ones that run.
    opts = [f"-arch={arch}", "--std=c++17", "-ftz=true"]
    opts += [f"-D{d}" for d in ((unit.define,) if unit.define else ()) + tuple(defines)]
    if verbose:
        opts.append("-Xptxas=-v")  # register / spill report in the log
    return opts


def nvrtc():
    """CuPy's NVRTC binding (``cupy_backends.cuda.libs.nvrtc``) with its library loaded: PyTorch's, which
    importing torch loads. Raises :class:`CompileError` saying what is missing."""
    import torch  # noqa: F401  (loads the NVRTC of PyTorch's CUDA wheels, which CuPy then finds loaded)

    try:
        from cupy_backends.cuda.libs import nvrtc as binding

        binding.getVersion()
    except Exception as exc:  # ImportError, or CuPy failing to find or load libnvrtc
        raise CompileError(f"CuPy's NVRTC cannot be loaded ({type(exc).__name__}: {exc}); run install.py in the "
                           "pack folder (it installs the CuPy that matches your PyTorch)") from exc
    return binding


def _whole_elf(cubin: bytes) -> bytes:
    """CuPy's getCUBIN drops the last byte (it strips a terminating NUL that a cubin does not have); the
    driver does not notice, the disassemblers do. Restore it when the ELF headers say one byte is missing:
    the file ends with a 64-bit header field whose top byte is zero."""
    if cubin[:5] != b"\x7fELF\x02":
        return cubin
    phoff, shoff = struct.unpack_from("<QQ", cubin, 0x20)
    phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", cubin, 0x36)
    end = max(phoff + phentsize * phnum, shoff + shentsize * shnum)
    return cubin + b"\0" if len(cubin) == end - 1 else cubin


def compile_cubin(unit: Unit, arch: str, verbose: bool = False, extra: tuple[str, ...] = ()) -> Program:
    """``unit`` compiled for ``arch`` by CuPy's NVRTC binding, with or without a GPU (CI, install.py
    --targets): the cubin and the compiler's log. ``extra``: options after the pack's own."""
    binding = nvrtc()
    opts = options(unit, arch, verbose) + list(extra)
    program = binding.createProgram(translation_unit(unit), unit.source, [], [])
    try:
        try:
            binding.compileProgram(program, opts)
        except binding.NVRTCError as exc:
            raise CompileError(f"{unit.source} ({' '.join(opts)}) did not compile:\n"
                               f"{binding.getProgramLog(program)}") from exc
        return Program(_whole_elf(binding.getCUBIN(program)), binding.getProgramLog(program))
    finally:
        binding.destroyProgram(program)


def load_module(unit: Unit, arch: str, defines: tuple[str, ...] = ()):
    """``unit`` built for ``arch`` as a ``cupy.RawModule`` (compiled by NVRTC or taken from CuPy's kernel
    cache) and loaded on CuPy's current device. Raises :class:`CompileError` with the compiler's log."""
    import cupy

    module = cupy.RawModule(code=translation_unit(unit), options=tuple(options(unit, arch, defines=defines)))
    try:
        module.compile()
    except cupy.cuda.compiler.CompileException as exc:
        raise CompileError(f"{unit.source} ({arch}) did not compile:\n{exc}") from exc
    return module


def build_family(family: str, arch: str) -> list:
    """The family's translation units as loaded ``cupy.RawModule``s, in :data:`FAMILIES` order."""
    return [load_module(unit, arch) for unit in FAMILIES[family]]
