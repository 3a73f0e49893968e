"""Install the pack's fused CUDA kernels: CuPy for the installed PyTorch's CUDA, then compile the kernels for
every visible NVIDIA GPU into CuPy's kernel cache.

ComfyUI-Manager runs this file after installing the pack. To run it by hand, with ComfyUI's Python,
from the pack's folder:

    python install.py                      # what is missing, then compile for the GPUs of this machine
    python install.py --no-pip             # compile only
    python install.py --targets sm_89,sm_120a --check   # compile for given targets (no GPU needed)
                                           # and print each kernel's tensor-core instructions

It never changes an installed package: the kernels use the NVRTC that PyTorch's CUDA wheels bring, pip only
adds what is missing (CuPy; NVRTC where PyTorch brings none) and is told to keep every installed distribution
at its version. With nothing missing it does not run pip. It never fails the pack's installation: without
CUDA, CuPy or a working compiler the pack runs on its PyTorch reference path and says why when a model loads.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
PACKAGE = "comfyui_svdquant_install"  # private name: this file may run inside ComfyUI's process too

# Per CUDA major version of torch (CuPy is built per CUDA major; the kernels run on torch's CUDA): CuPy and its
# oldest release for that CUDA, and the NVRTC wheel, installed at torch's CUDA minor where torch brings none.
# The same as pyproject's cuda12 / cuda13 extras.
CUPY = {12: ("cupy-cuda12x", ">=13"), 13: ("cupy-cuda13x", ">=13.6")}
NVRTC = {12: "nvidia-cuda-nvrtc-cu12", 13: "nvidia-cuda-nvrtc"}
_LIBNVRTC = re.compile(r"(?:^|/)(?:libnvrtc\.so\.(\d+)|nvrtc64_(\d+)\d_0\.dll)$")
_VERSION = re.compile(r"^[0-9][0-9A-Za-z.+!_-]*$")


def load_pack(name: str = PACKAGE):
    """This folder imported as a package (as ComfyUI does), so that its relative imports work."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed() -> dict[str, importlib.metadata.Distribution]:
    """Canonical name → the distribution this Python imports (the first on sys.path)."""
    found: dict[str, importlib.metadata.Distribution] = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found.setdefault(_canonical(name), dist)
    return found


def nvrtc_majors(dists: dict[str, importlib.metadata.Distribution]) -> set[int]:
    """CUDA major versions of the libnvrtc that torch (Windows wheels bundle it) or an NVRTC wheel brings."""
    majors = set()
    for name in ("torch", *map(_canonical, NVRTC.values())):
        for file in (dists[name].files or []) if name in dists else []:
            match = _LIBNVRTC.search(str(file).replace("\\", "/"))
            if match:
                majors.add(int(match.group(1) or match.group(2)))
    return majors


def missing_wheels(cuda: str, dists: dict[str, importlib.metadata.Distribution]) -> list[str] | None:
    """What the kernels need for PyTorch's CUDA ``cuda`` that is not installed; None when no CuPy exists for
    that CUDA. Raises RuntimeError when a CuPy for another CUDA is installed (the two would overwrite
    each other's files)."""
    major = int(cuda.split(".")[0])
    if major not in CUPY:
        return None
    missing = []
    cupy, oldest = CUPY[major]
    cupys = sorted(name for name in dists if name == "cupy" or name.startswith("cupy-cuda"))
    if any(name not in (cupy, "cupy") for name in cupys):
        raise RuntimeError(f"{', '.join(cupys)} installed, but PyTorch uses CUDA {cuda}: pip uninstall "
                           f"{' '.join(cupys)}, then run install.py again")
    if not cupys:
        missing.append(cupy + oldest)
    if major not in nvrtc_majors(dists):
        missing.append(f"{NVRTC[major]}=={cuda}.*")
    return missing


def constraints(dists: dict[str, importlib.metadata.Distribution]) -> list[str]:
    """Every installed distribution pinned at its version: pip may add packages, never change one (PyTorch's
    pinned CUDA wheels above all)."""
    return [f"{name}=={dist.version}" for name, dist in sorted(dists.items()) if _VERSION.match(dist.version or "")]


def install_wheels(wheels: list[str], dists: dict[str, importlib.metadata.Distribution]) -> bool:
    print(f"[SVDQuant] installing {' '.join(wheels)} (every installed package kept at its version)")
    with tempfile.TemporaryDirectory() as tmp:
        pins = Path(tmp) / "constraints.txt"
        pins.write_text("\n".join(constraints(dists)) + "\n")
        done = subprocess.run([sys.executable, "-m", "pip", "install", "--constraint", str(pins), *wheels])
    importlib.invalidate_caches()
    if done.returncode != 0:
        print("[SVDQuant] pip could not add them without changing an installed package (see above); the PyTorch "
              "path will be used")
    return done.returncode == 0


def add_missing_wheels(cuda: str) -> bool:
    """Install what the kernels miss for PyTorch's CUDA ``cuda``, changing nothing installed; True when all is
    there now."""
    dists = installed()
    try:
        missing = missing_wheels(cuda, dists)
    except RuntimeError as exc:
        print(f"[SVDQuant] {exc}; the PyTorch path will be used until then")
        return False
    if missing is None:
        print(f"[SVDQuant] PyTorch is built for CUDA {cuda}: no CuPy for it; the PyTorch path will be used")
        return False
    if not missing:
        print(f"[SVDQuant] CuPy and NVRTC for CUDA {cuda} are installed: nothing to install")
        return True
    return install_wheels(missing, dists)


def compile_targets(targets: list[str], check: bool) -> None:
    """Compile every family for the given -arch targets (no GPU needed) and optionally show the SASS."""
    kernels = importlib.import_module(f"{load_pack().__name__}.kernels")
    build, sass = kernels.build, importlib.import_module(f"{kernels.__name__}.sass")
    tool = sass.find_tool() if check else None
    for arch in targets:
        for family, why in build.families_for(build.capability_of(arch)).items():
            if why:
                print(f"[SVDQuant] {arch} {family}: not built ({why})")
                continue
            for unit in build.FAMILIES[family]:
                program = build.compile_cubin(unit, arch)
                print(f"[SVDQuant] {arch} {family}: {unit.stem}, {len(program.cubin)} bytes")
                if tool:
                    for name, listing in sass.disassemble(program.cubin, tool).items():
                        print(f"    {name}: {sass.summary(sass.opcodes(listing))}{sass.loop_summary(listing)}")


def compile_for_gpus() -> None:
    import torch

    kernels = importlib.import_module(f"{load_pack().__name__}.kernels")
    for index in range(torch.cuda.device_count()):
        torch.cuda.set_device(index)
        print(f"[SVDQuant] cuda:{index}: {kernels.enable('auto')}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-pip", action="store_true", help="install nothing, only compile")
    parser.add_argument("--targets", help="comma-separated -arch targets to compile for instead of the local GPUs")
    parser.add_argument("--check", action="store_true", help="with --targets: print each kernel's MMA instructions")
    args = parser.parse_args(argv)
    if args.targets:
        compile_targets(args.targets.split(","), args.check)
        return 0
    try:
        import torch
    except ImportError:
        print("[SVDQuant] PyTorch is not installed in this Python; nothing to do")
        return 0
    if not torch.version.cuda:
        print("[SVDQuant] this PyTorch has no CUDA: the pack runs on its PyTorch path (nothing to install)")
        return 0
    if not args.no_pip and not add_missing_wheels(torch.version.cuda):
        return 0
    if not torch.cuda.is_available():
        print("[SVDQuant] no GPU visible now: the kernels will be compiled when a model first loads on one")
        return 0
    compile_for_gpus()
    return 0


if __name__ == "__main__":
    sys.exit(main())
