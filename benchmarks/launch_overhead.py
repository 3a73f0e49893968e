"""CPU cost of one fused layer call, without a GPU: everything the Python launch path does (device and
dtype checks, planning, workspace allocation, argument packing, the stream lookup) with only CuPy's
kernel launch replaced by a no-op. This is the time a FLUX step spends in Python before any kernel
runs (about 500 quantized layer calls per step), so it is measured, not assumed.

    python benchmarks/launch_overhead.py                 # FLUX- and SDXL-shaped layers, INT4 and NVFP4
    python benchmarks/launch_overhead.py --calls 20000

What is stubbed (tests/stub_gpu.py): ``cupy`` (kernel functions that only record the call), torch's
current CUDA stream and the device probe; layers and inputs live on the CPU. Inputs are small (16 rows)
so that CPU malloc stands in for the caching allocator's cost. Prints a markdown table with the date.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import pack_import  # noqa: E402, F401, I001  (first: the pack as the package comfyui_svdquant, as the tests import it)
from stub_gpu import cuda_looking, stub_gpu  # noqa: E402, I001
from test_layers import random_w4a4  # noqa: E402, I001

from comfyui_svdquant.kernels import backend  # noqa: E402

SHAPES = {  # name: (in, out, rank); rank 32 as the published FLUX checkpoints
    "FLUX qkv 3072→9216": (3072, 9216, 32),
    "FLUX mlp 12288→3072": (12288, 3072, 32),
    "SDXL attn 640→640": (640, 640, 32),
}


def per_call_us(fn, calls: int) -> float:
    for _ in range(calls // 10):
        fn()
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        runs.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--rows", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with stub_gpu() as gpu:
        print(f"Launch-path CPU cost per layer call, {args.rows} rows, launches stubbed; {datetime.date.today()}, "
              f"{platform.processor() or platform.machine()}, Python {platform.python_version()}, torch "
              f"{torch.__version__}\n")
        print("| layer | precision | µs per call |")
        print("| --- | --- | ---: |")
        for name, (k, n, rank) in SHAPES.items():
            for precision in ("int4", "nvfp4"):
                layer = random_w4a4(k, n, rank, precision)
                x = cuda_looking(torch.randn(args.rows, k, dtype=torch.bfloat16))
                assert backend.w4a4(layer, x) is not None, "the stubbed kernel path was not taken"
                cost = per_call_us(lambda layer=layer, x=x: backend.w4a4(layer, x), args.calls)
                print(f"| {name} | {precision} | {cost:.1f} |")
                gpu.launches.clear()

if __name__ == "__main__":
    main()
