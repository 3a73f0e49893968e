"""Install the pack's fused CUDA kernels: the CuPy and NVRTC wheels that match the installed PyTorch,
then compile the kernels for every visible NVIDIA GPU into CuPy's kernel cache.

ComfyUI-Manager runs this file after installing the pack. To run it by hand, with ComfyUI's Python,
from the pack's folder:

    python install.py                      # wheels, then compile for the GPUs of this machine
    python install.py --no-pip             # compile only
    python install.py --targets sm_89,sm_120a --check   # compile for given targets (no GPU needed)
                                           # and print each kernel's tensor-core instructions

It never fails the pack's installation: without CUDA, CuPy or a working compiler the pack runs on its
PyTorch reference path and says why when a model loads.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
PACKAGE = "comfyui_svdquant_install"  # private name: this file may run inside ComfyUI's process too

# Per CUDA major version of torch (the cubins must match the driver torch runs on). NVRTC >= 12.8 is
# the first CUDA 12 compiler that targets sm_120 (RTX 50). Same sets as pyproject's cuda12 / cuda13 extras.
WHEELS = {
    12: ["cupy-cuda12x>=13", "nvidia-cuda-nvrtc-cu12>=12.8", "nvidia-cuda-runtime-cu12"],
    13: ["cupy-cuda13x>=13.6", "nvidia-cuda-nvrtc>=13,<14", "nvidia-cuda-runtime>=13,<14"],
}


def load_pack(name: str = PACKAGE):
    """This folder imported as a package (as ComfyUI does), so that its relative imports work."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def install_wheels(cuda: str) -> bool:
    wheels = WHEELS.get(int(cuda.split(".")[0]))
    if not wheels:
        print(f"[SVDQuant] PyTorch is built for CUDA {cuda}: no kernel wheels for it; the PyTorch path will be used")
        return False
    print(f"[SVDQuant] installing {' '.join(wheels)} (PyTorch CUDA {cuda})")
    done = subprocess.run([sys.executable, "-m", "pip", "install", *wheels]).returncode == 0
    importlib.invalidate_caches()
    if not done:
        print("[SVDQuant] pip failed; the PyTorch path will be used (run this script again to retry)")
    return done


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
                        print(f"    {name}: {sass.summary(sass.opcodes(listing))}")


def compile_for_gpus() -> None:
    import torch

    kernels = importlib.import_module(f"{load_pack().__name__}.kernels")
    for index in range(torch.cuda.device_count()):
        torch.cuda.set_device(index)
        print(f"[SVDQuant] cuda:{index}: {kernels.enable('auto')}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-pip", action="store_true", help="do not install wheels, only compile")
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
    if not args.no_pip and not install_wheels(torch.version.cuda):
        return 0
    if not torch.cuda.is_available():
        print("[SVDQuant] no GPU visible now: the kernels will be compiled when a model first loads on one")
        return 0
    compile_for_gpus()
    return 0


if __name__ == "__main__":
    sys.exit(main())
