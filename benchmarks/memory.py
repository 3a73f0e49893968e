"""RAM while loading an SVDQuant checkpoint: does the loader hold one copy of the weights, or two?

A FLUX-architecture SVDQuant file of known size is written (random 4-bit layers: the numbers do not matter
here, the tensors' sizes and the loader's path do), then loaded in fresh processes, each weight read once,
and the process's peak resident memory (VmHWM, reset just before loading) compared with the file size:
- "SVDQuant loader": the pack's load_checkpoint (what Load SVDQuant Model runs);
- "ComfyUI UNETLoader, 16-bit file": ComfyUI's own loader on the same model's 16-bit file, for comparison.
Prints a markdown table: file size, peak extra memory while loading and what stays after loading, both
also as multiples of the file size (one copy of the weights = 1.0), and the load time. Linux only.

    python benchmarks/memory.py                      # FLUX layout at width 1024 (a ~100 MB SVDQuant file)
    python benchmarks/memory.py --hidden 512 --json  # smaller; one JSON line per loader (used by the tests)

Needs ComfyUI: COMFYUI_PATH, or this repository inside ComfyUI/custom_nodes.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "comfyui_svdquant"


def setup_comfyui() -> None:
    """Import ComfyUI (CPU) and this repository as the package ``comfyui_svdquant``, as the tests do."""
    from quantize_common import comfyui_root  # beside this file; imports torch, so not at the top

    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, comfyui_root())
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.model_management  # noqa: F401  (reads args.cpu)

    spec = importlib.util.spec_from_file_location(PACKAGE, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = module
    spec.loader.exec_module(module)


def memory() -> dict[str, int]:
    """This process's resident memory in bytes: VmRSS (all), VmHWM (its peak), RssAnon, RssFile."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


def reset_peak() -> None:
    """Start VmHWM afresh from the current resident size (Linux 4.0+: /proc/self/clear_refs, value 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def flux_config(hidden: int, depth: int, single: int) -> dict:
    from tiny_models import TINY_FLUX

    return dict(TINY_FLUX, hidden_size=hidden, num_heads=hidden // 128, axes_dim=[16, 56, 56], depth=depth,
                depth_single_blocks=single, context_in_dim=512, vec_in_dim=256)


def write_files(folder: Path, config: dict, rank: int) -> tuple[Path, Path]:
    """(SVDQuant file, 16-bit file) of one random FLUX-layout model."""
    import comfy.utils
    import torch

    from comfyui_svdquant.loaders import convert
    from comfyui_svdquant.loaders.save import save_checkpoint
    from comfyui_svdquant.svdquant.layers import W4A4Linear, W4A16Linear
    from tiny_models import tiny_flux

    dense = tiny_flux(0, **config)
    dense_path = folder / "flux-16bit.safetensors"
    comfy.utils.save_torch_file(dense.diffusion_model.state_dict(), str(dense_path))
    g = torch.Generator().manual_seed(0)
    modules = {}
    for block in convert.blocks_of(dense.diffusion_model)[2]:
        for part in (part for layer in block.layers for part in layer.parts):
            if part.kind == "w4a4":
                module = W4A4Linear(part.in_features, part.out_features, rank, act_unsigned=part.act_unsigned)
            else:
                module = W4A16Linear(part.in_features, part.out_features)
            for name, buffer in module.named_buffers():
                if buffer.is_floating_point():
                    buffer.copy_(torch.rand(buffer.shape, generator=g) * 0.01 + (1.0 if "smooth" in name else 0.0))
                else:
                    buffer.copy_(torch.randint(-100, 100, buffer.shape, generator=g).to(buffer.dtype))
            modules[part.prefix] = module
    svdq_path = folder / "flux-svdq-int4.safetensors"
    save_checkpoint(convert.assemble(dense, modules).diffusion_model, svdq_path)
    return svdq_path, dense_path


def measure(path: Path, how: str) -> dict:
    """Load ``path`` in this (fresh) process the way ``how`` says and read every weight once; the memory
    figures. Resident memory counts both what the process allocated and the pages of the memory-mapped
    file it touched: a loader that copies the file into new tensors shows both at its peak."""
    setup_comfyui()
    import gc

    import comfy.sd
    import comfy.utils
    import torch

    import tiny_pipeline
    from comfyui_svdquant.loaders.load import load_checkpoint

    tiny_pipeline.install_size_inference()  # ComfyUI v0.3 sizes FLUX from the file only in newer versions
    for dtype in (torch.bfloat16, torch.int8, torch.int32):  # page in the library code the checksum runs
        torch.zeros(8, dtype=dtype).float().sum()
    gc.collect()
    before = memory()
    reset_peak()
    start = time.perf_counter()
    if how == "svdquant":
        model = load_checkpoint(path, "bfloat16", "torch")
    else:
        model = comfy.sd.load_diffusion_model_state_dict(comfy.utils.load_torch_file(str(path)),
                                                         model_options={"dtype": torch.bfloat16})
    seconds = time.perf_counter() - start
    with torch.no_grad():  # every weight read once, as the first forward (or the move to the GPU) does
        checksum = sum(float(t.float().sum()) for t in model.model.state_dict().values() if t.nbytes)  # stored bytes
    gc.collect()
    after = memory()
    return {"loader": how, "file_bytes": path.stat().st_size, "seconds": seconds, "checksum": checksum,
            "peak_extra_bytes": after["VmHWM"] - before["VmRSS"], "kept_bytes": after["VmRSS"] - before["VmRSS"],
            "kept_anon_bytes": after["RssAnon"] - before["RssAnon"]}


LOADERS = {"svdquant": ("SVDQuant loader", 0), "unet": ("ComfyUI UNETLoader, 16-bit file", 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024, help="FLUX width (multiple of 128); FLUX.1 is 3072")
    parser.add_argument("--depth", type=int, default=2, help="double blocks (FLUX.1: 19)")
    parser.add_argument("--single", type=int, default=4, help="single blocks (FLUX.1: 38)")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--loaders", nargs="+", default=list(LOADERS), choices=list(LOADERS))
    parser.add_argument("--json", action="store_true", help="one JSON line per loader instead of the table")
    parser.add_argument("--measure", nargs=2, metavar=("FILE", "LOADER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(Path(args.measure[0]), args.measure[1])))
        return
    setup_comfyui()
    with tempfile.TemporaryDirectory() as tmp:
        files = write_files(Path(tmp), flux_config(args.hidden, args.depth, args.single), args.rank)
        results = []
        for loader in args.loaders:
            out = subprocess.run([sys.executable, __file__, "--measure", str(files[LOADERS[loader][1]]), loader],
                                 capture_output=True, text=True, env=os.environ, check=False)
            if out.returncode:
                sys.exit(f"measuring {loader} failed:\n{out.stdout}\n{out.stderr}")
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    if args.json:
        for result in results:
            print(json.dumps(result))
        return
    mb = 1e6
    print(f"## Loading RAM, FLUX layout width {args.hidden}, {args.depth}+{args.single} blocks, rank {args.rank} "
          f"({platform.node()}, {datetime.date.today()})\n")
    print("| loader | file MB | peak extra RSS MB | × file | kept RSS MB | × file | of it allocated MB | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        f = r["file_bytes"]
        print(f"| {LOADERS[r['loader']][0]} | {f / mb:.1f} | {r['peak_extra_bytes'] / mb:.1f} | "
              f"{r['peak_extra_bytes'] / f:.2f} | {r['kept_bytes'] / mb:.1f} | {r['kept_bytes'] / f:.2f} | "
              f"{r['kept_anon_bytes'] / mb:.1f} | {r['seconds']:.2f} |")
    print("\nRSS: resident memory, the process's own allocations plus the pages of the memory-mapped file it has "
          "touched; measured after reading every weight once. One copy of the weights is 1.00 × file; reading "
          "the file into a state dict and copying that into the model peaks near 2.00. The SVDQuant loader's "
          "weights are the file's pages themselves (mapped copy-on-write), so they are not allocated memory.")

if __name__ == "__main__":
    main()
