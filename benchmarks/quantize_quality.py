"""Quantize in graph: what smoothing, the low-rank branch and GPTQ each do to the quantized model.

Small FLUX, SDXL, Qwen-Image and Z-Image models of ComfyUI's own classes (with the outlier channels of trained
models, see quantize_common) are quantized by the Quantize node's engine (calibration = ComfyUI's sampler on 4
prompts), one variant at a time, and measured on 2 prompts that calibration never saw:
- model output error: ‖ε̂ − ε‖ / ‖ε‖ of the diffusion model's prediction over every step of the held-out
  sampling runs (the 16-bit model's trajectory), averaged;
- sampled image: PSNR (dB) of the quantized model's final latent against the 16-bit model's, same seeds.

    python benchmarks/quantize_quality.py                   # FLUX and SDXL, int4 and nvfp4
    python benchmarks/quantize_quality.py --family flux --precision int4
    python benchmarks/quantize_quality.py --family zimage       # needs ComfyUI 0.8+
    python benchmarks/quantize_quality.py --family qwen_image
"""

from __future__ import annotations

import argparse
import time

import torch
from quantize_common import flux, header, prompt, psnr, qwen_image, sample, sdxl, setup, zimage

VARIANTS = {  # name → (rank, smoothing, GPTQ)
    "RTN W4A4 (no branch, no smoothing)": (0, False, False),
    "smoothing only": (0, True, False),
    "low-rank branch only": (32, False, False),
    "SVDQuant (smoothing + branch)": (32, True, False),
    "SVDQuant + GPTQ": (32, True, True),
}
SIZE, STEPS = 128, 4
SETTINGS = {"flux": dict(cfg=1.0, scheduler="simple"), "sdxl": dict(cfg=5.0, scheduler="normal"),
            "qwen_image": dict(cfg=1.0, scheduler="simple"), "zimage": dict(cfg=1.0, scheduler="simple")}
MODELS = {"flux": (flux, "FLUX (hidden 256, 2 double + 4 single blocks)"),
          "sdxl": (sdxl, "SDXL (64 channels, 7 transformer blocks)"),
          "qwen_image": (qwen_image, "Qwen-Image (hidden 256, 3 blocks)"),
          "zimage": (zimage, "Z-Image (dim 256, 2 context + 2 noise refiners, 2 blocks)")}


def prediction_error(quantized, reference_calls) -> float:
    """Mean relative error of the model's prediction on the 16-bit model's recorded calls. ``apply_model``
    returns x − σ·prediction for both families, so the prediction difference is the denoised difference."""
    errors = []
    with torch.no_grad():
        for call, denoised in reference_calls:
            x = call.x.to(denoised.device).float()
            errors.append(float((call.run(quantized.model).float() - denoised).norm() / (denoised - x).norm()))
    return sum(errors) / len(errors)


def reference(model, family: str, seeds: list[int]) -> tuple[list, list]:
    """The 16-bit model's held-out samples and its recorded calls (with its own outputs)."""
    from comfyui_svdquant.loaders.calibration import SamplingSettings, record_calls

    settings = SamplingSettings(STEPS, SIZE, SIZE, 1000, guidance=3.5, **SETTINGS[family])
    calls = record_calls(model.clone(), [prompt(s, family) for s in seeds], None, settings)
    with torch.no_grad():
        outputs = [(call, call().float()) for call in calls]
    samples = [sample(model, prompt(s, family), SIZE, STEPS, seed=1000 + i, **SETTINGS[family])
               for i, s in enumerate(seeds)]
    return samples, outputs


def run(family: str, precisions: list[str]) -> str:
    from comfyui_svdquant.loaders.calibration import SamplingSettings
    from comfyui_svdquant.loaders.quantize import Conversion, quantize_model
    from comfyui_svdquant.svdquant.quantizer import QuantizeConfig

    make, what = MODELS[family]
    model = make()
    held_out = [900, 901]
    dense_samples, dense_calls = reference(model, family, held_out)
    calibration = [prompt(s, family) for s in range(4)]
    settings = SamplingSettings(STEPS, SIZE, SIZE, 0, guidance=3.5, **SETTINGS[family])
    lines = [f"**{what}**, calibration 4 prompts × {STEPS} steps at {SIZE}², held-out 2 prompts", "",
             "| precision | variant | model output error | × RTN | sampled latent PSNR (dB) | s |",
             "|---|---|---|---|---|---|"]
    for precision in precisions:
        baseline = None
        for name, (rank, smooth, gptq) in VARIANTS.items():
            conversion = Conversion(QuantizeConfig(precision=precision, rank=rank, smooth=smooth, gptq=gptq), settings)
            started = time.perf_counter()
            quantized = quantize_model(model, calibration, None, conversion)
            seconds = time.perf_counter() - started
            error = prediction_error(quantized, dense_calls)
            baseline = baseline or error
            quality = sum(psnr(sample(quantized, prompt(s, family), SIZE, STEPS, seed=1000 + i, **SETTINGS[family]),
                               dense) for i, (s, dense) in enumerate(zip(held_out, dense_samples, strict=True)))
            quality /= len(held_out)
            lines.append(f"| {precision} | {name} | {error:.4f} | {error / baseline:.2f} | {quality:.1f} | "
                         f"{seconds:.0f} |")
            print(lines[-1], flush=True)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=[*MODELS, "both"], default="both", help="both: FLUX and SDXL")
    parser.add_argument("--precision", choices=["int4", "nvfp4"], nargs="+", default=["int4", "nvfp4"])
    parser.add_argument("--cpu", action="store_true")
    args = parser.parse_args()
    setup(args.cpu)
    out = [header("Quantize in graph: smoothing, low-rank branch and GPTQ (benchmarks/quantize_quality.py)")]
    for family in (["flux", "sdxl"] if args.family == "both" else [args.family]):
        out.append(run(family, args.precision))
    print("\n\n".join(out))


if __name__ == "__main__":
    main()
