"""What is compiled for which GPU, and the on-disk cubin cache.

A *family* is the set of kernels one layer kind needs on one GPU: ``int4`` (kernel 1 + kernel 2 for
INT4 checkpoints), ``nvfp4`` (the same for NVFP4 checkpoints) and ``w4a16`` (the modulation GEMV).
Each family is one or more NVRTC translation units; each is compiled once per (source, target,
NVRTC version) and cached as a cubin, so the compile happens at install (install.py) or on first use.
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from . import nvrtc

SOURCE_DIR = Path(__file__).resolve().parent
HEADERS = ("common.cuh", "ptx.cuh")


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

# The targets CI builds and inspects (one per GPU generation the pack supports).
CI_TARGETS = ("sm_75", "sm_80", "sm_86", "sm_89", "sm_90a", "sm_120a")


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


def unit_source(unit: Unit) -> str:
    return (SOURCE_DIR / unit.source).read_text()


def headers() -> dict[str, str]:
    return {name: (SOURCE_DIR / name).read_text() for name in HEADERS}


def options(unit: Unit, arch: str, verbose: bool = False) -> list[str]:
    # No --use_fast_math: the quantizer relies on IEEE division (bit-identical codes).
    opts = [f"-arch={arch}", "--std=c++17"]
    if unit.define:
        opts.append(f"-D{unit.define}")
    if verbose:
        opts.append("-Xptxas=-v")  # register / spill report in the log
    return opts


def cache_dir() -> Path:
    """$SVDQUANT_KERNEL_CACHE, else the user's cache folder (never the pack folder: it may be read-only)."""
    if os.environ.get("SVDQUANT_KERNEL_CACHE"):
        return Path(os.environ["SVDQUANT_KERNEL_CACHE"])
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "comfyui-svdquant" / "cubins"


def cache_key(unit: Unit, arch: str, compiler: nvrtc.Nvrtc) -> str:
    digest = hashlib.sha256()
    for part in (unit_source(unit), *headers().values(), " ".join(options(unit, arch)),
                 f"nvrtc {compiler.version[0]}.{compiler.version[1]}"):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:20]


def compile_unit(unit: Unit, arch: str, compiler: nvrtc.Nvrtc, verbose: bool = False) -> nvrtc.Program:
    """Compile without the cache (CI, tests)."""
    return compiler.compile(unit_source(unit), unit.source, options(unit, arch, verbose), headers())


def cubin(unit: Unit, arch: str, compiler: nvrtc.Nvrtc) -> Path:
    """Path of the cached cubin for ``unit`` on ``arch``, compiling it first if needed."""
    major, minor = compiler.version
    path = cache_dir() / f"{unit.stem}-{arch}-nvrtc{major}.{minor}-{cache_key(unit, arch, compiler)}.cubin"
    if not path.exists():
        program = compile_unit(unit, arch, compiler)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(program.cubin)
        os.replace(tmp, path)  # atomic: concurrent processes never see half a file
    return path


def build_family(family: str, arch: str, compiler: nvrtc.Nvrtc) -> list[Path]:
    return [cubin(unit, arch, compiler) for unit in FAMILIES[family]]
