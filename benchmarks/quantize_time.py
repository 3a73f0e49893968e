"""Quantize in graph: conversion time per layer, and where it goes.

One double and one single block of ComfyUI's FLUX at increasing widths (the layers of FLUX.1 at hidden 3072
are 3072→9216 … 12288→3072) converted by the Quantize node's engine with the node's settings and without
its optional steps. Columns: the calibration sampling (ComfyUI's sampler, 2 prompts × 4 steps at 256²),
the rest of the conversion (replayed calibration forwards, statistics, quantization, assembly) per
quantized layer, and the total.

    python benchmarks/quantize_time.py                      # hidden 256, 512, 1024
    python benchmarks/quantize_time.py --hidden 3072        # FLUX.1's width (GPU)
"""

from __future__ import annotations

import argparse
import time

from quantize_common import flux, header, prompt, setup

VARIANTS = {  # name → (smoothing, GPTQ)
    "node defaults (smoothing + GPTQ)": (True, True),
    "smoothing, no GPTQ": (True, False),
    "no smoothing, GPTQ": (False, True),
    "neither": (False, False),
}
PROMPTS, STEPS = 2, 4


def convert(hidden: int, smooth: bool, gptq: bool) -> tuple[float, float, int]:
    """(calibration sampling s, the rest s, quantized layers) of one conversion."""
    from comfyui_svdquant.loaders.calibration import SamplingSettings
    from comfyui_svdquant.loaders.ops import quantized_ops
    from comfyui_svdquant.loaders.quantize import Conversion, quantize_model
    from comfyui_svdquant.svdquant.quantizer import QuantizeConfig

    model = flux(hidden, 1, 1)
    marks: list[float] = []

    def progress(done: int, _total: int) -> None:
        if done == PROMPTS * STEPS:
            marks.append(time.perf_counter())

    conversion = Conversion(QuantizeConfig(rank=32, smooth=smooth, gptq=gptq), SamplingSettings(STEPS, 256, 256, 0))
    started = time.perf_counter()
    quantized = quantize_model(model, [prompt(s, "flux") for s in range(PROMPTS)], None, conversion, progress)
    ended = time.perf_counter()
    return marks[0] - started, ended - marks[0], len(quantized_ops(quantized.model.diffusion_model))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--cpu", action="store_true")
    args = parser.parse_args()
    setup(args.cpu)
    lines = [header("Quantize in graph: conversion time per layer (benchmarks/quantize_time.py)"),
             f"FLUX of ComfyUI's class, 1 double + 1 single block (13 quantized Linears), int4 rank 32; calibration "
             f"{PROMPTS} prompts × {STEPS} steps at 256².\n",
             "| hidden | MLP layers | variant | calibration sampling s | rest s / layer | total s |",
             "|---|---|---|---|---|---|"]
    for hidden in args.hidden:
        for name, (smooth, gptq) in VARIANTS.items():
            sampling, rest, layers = convert(hidden, smooth, gptq)
            mlp = f"{hidden}→{4 * hidden}, {4 * hidden}→{hidden}"
            total = sampling + rest
            lines.append(f"| {hidden} | {mlp} | {name} | {sampling:.1f} | {rest / layers:.2f} | {total:.1f} |")
            print(lines[-1], flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
