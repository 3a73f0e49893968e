"""Quantize in graph: peak memory during conversion grows with one block, not with the model.

FLUX models of ComfyUI's class at one width and increasing depth are converted by the Quantize node's
engine, each in a fresh process. Before the conversion the process holds the 16-bit model and ComfyUI,
which has sampled once (so its first-use allocations are not counted as the conversion's);
the conversion adds the recorded calibration calls, the packed output (which must exist at the end)
and its working set. The table shows the peak resident memory (and, on a GPU, the peak device memory)
above that baseline, the packed output, and what is left: the working set, which should not grow with
depth. Linux only (reads /proc/self/status; the peak is reset through /proc/self/clear_refs).

    python benchmarks/quantize_memory.py                       # hidden 512, 1+2 … 8+16 blocks
    python benchmarks/quantize_memory.py --hidden 256 --depths 1 2 4
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import subprocess
import sys
import time
from pathlib import Path

MiB = 2**20


def _status(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def measure(hidden: int, depth: int, single: int, gptq: bool, cpu: bool) -> dict:
    """One conversion in this process: the numbers of one table row."""
    import torch
    from quantize_common import flux, model_bytes, prompt, sample, setup

    setup(cpu)
    from comfyui_svdquant.loaders.calibration import SamplingSettings
    from comfyui_svdquant.loaders.ops import quantized_ops
    from comfyui_svdquant.loaders.quantize import Conversion, quantize_model
    from comfyui_svdquant.svdquant.quantizer import QuantizeConfig

    model = flux(hidden, depth, single)
    prompts = [prompt(s, "flux") for s in range(2)]
    conversion = Conversion(QuantizeConfig(rank=32, smooth=False, gptq=gptq), SamplingSettings(2, 256, 256, 0))
    sample(model, prompt(99, "flux"), 64, 1, 1.0, 0, "simple")  # as in a workflow: ComfyUI has sampled before
    gc.collect()
    baseline = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    cuda = torch.cuda.is_available() and not cpu
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        device_baseline = torch.cuda.memory_allocated()
    started = time.perf_counter()
    quantized = quantize_model(model, prompts, None, conversion)
    seconds = time.perf_counter() - started
    packed = sum(b.numel() * b.element_size() for _, op in quantized_ops(quantized.model.diffusion_model)
                 for b in op.quantized.buffers())
    row = {"blocks": f"{depth}+{single}", "model": model_bytes(model), "baseline": baseline,
           "peak": _status("VmHWM") - baseline, "packed": packed, "seconds": seconds,
           "layers": len(quantized_ops(quantized.model.diffusion_model))}
    if cuda:
        row["device_peak"] = torch.cuda.max_memory_allocated() - device_baseline
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--depths", type=int, nargs="+", default=[1, 2, 4, 8], help="double blocks (single: twice)")
    parser.add_argument("--no-gptq", action="store_true", help="without GPTQ's K² statistics")
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--row", nargs=2, type=int, help=argparse.SUPPRESS)  # internal: one measurement
    args = parser.parse_args()
    if args.row:
        print(json.dumps(measure(args.hidden, *args.row, not args.no_gptq, args.cpu)))
        return
    from quantize_common import header, setup

    setup(args.cpu)
    rows = []
    for depth in args.depths:
        command = [sys.executable, __file__, "--row", str(depth), str(2 * depth), "--hidden", str(args.hidden)]
        command += ["--no-gptq"] * args.no_gptq + ["--cpu"] * args.cpu
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(rows[-1], file=sys.stderr, flush=True)
    gpu = "device_peak" in rows[0]
    print(header("Quantize in graph: peak memory vs model depth (benchmarks/quantize_memory.py)"))
    print(f"FLUX of ComfyUI's class, hidden {args.hidden}, rank 32 int4, smoothing off, GPTQ "
          f"{'off' if args.no_gptq else 'on'}; calibration 2 prompts × 2 steps at 256². MiB.\n")
    columns = ["blocks (double+single)", "16-bit model", "RSS before", "peak RSS − before", "packed output",
               "working set (peak − before − output)"] + (["device peak"] if gpu else []) + ["s / layer"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for r in rows:
        cells = [r["blocks"], f"{r['model'] / MiB:.0f}", f"{r['baseline'] / MiB:.0f}", f"{r['peak'] / MiB:.0f}",
                 f"{r['packed'] / MiB:.0f}", f"{(r['peak'] - r['packed']) / MiB:.0f}"]
        cells += [f"{r['device_peak'] / MiB:.0f}"] if gpu else []
        cells.append(f"{r['seconds'] / r['layers']:.2f}")
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
