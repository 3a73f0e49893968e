"""Convert a FLUX.1 / SDXL checkpoint file to SVDQuant 4-bit from the command line, with the engine of the
SVDQuant Quantize Model node: the prompts are encoded by the model's own text encoders (loaded by ComfyUI's
loaders), sampled by ComfyUI's sampler for calibration, and the model is quantized one block at a time on
the GPU (what does not fit stays in RAM and is streamed).

Run it with the Python that runs ComfyUI, from anywhere:

    python scripts/quantize_cli.py --comfyui ~/ComfyUI \\
        --model ~/ComfyUI/models/diffusion_models/flux1-dev.safetensors \\
        --text-encoder ~/ComfyUI/models/text_encoders/clip_l.safetensors \\
        --text-encoder ~/ComfyUI/models/text_encoders/t5xxl_fp16.safetensors \\
        --prompts prompts.txt --output ~/ComfyUI/models/diffusion_models/flux1-dev-svdq-int4_r32.safetensors

    # an SDXL single-file checkpoint carries its own text encoders:
    python scripts/quantize_cli.py --comfyui ~/ComfyUI --checkpoint sd_xl_base_1.0.safetensors \\
        --prompt "a lighthouse at dusk" --prompt "a bowl of ramen" --negative "blurry" --cfg 6 \\
        --scheduler normal --output sdxl-svdq-int4_r32.safetensors

``--prompts`` names a text file with one prompt per line. The defaults are the node's (int4, rank 32,
smoothing and GPTQ on, 20 steps at 1024×1024). ``python scripts/quantize_cli.py --help`` lists every option.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

PACKAGE = "comfyui_svdquant"
ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_argument_group("ComfyUI and the files")
    where.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"),
                       help="ComfyUI's folder (default: $COMFYUI_PATH, or the ComfyUI this pack is installed in)")
    source = where.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a diffusion model file (what UNETLoader loads: 16-bit or fp8)")
    source.add_argument("--checkpoint", help="a checkpoint with its text encoders (what CheckpointLoaderSimple loads)")
    where.add_argument("--weight-dtype", choices=["default", "fp8_e4m3fn", "fp8_e5m2"], default="default",
                       help="--model only: load the weights as (like UNETLoader's weight_dtype)")
    where.add_argument("--text-encoder", action="append", default=[],
                       help="a text encoder file (repeat: FLUX needs clip_l and t5xxl, SDXL clip_l and clip_g)")
    where.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]",
                       help="a LoRA to bake into the model before quantizing (repeatable)")
    where.add_argument("--output", required=True, help="the SVDQuant .safetensors file to write")
    where.add_argument("--cpu", action="store_true", help="run on the CPU even if a GPU is there")

    prompts = parser.add_argument_group("calibration")
    prompts.add_argument("--prompt", action="append", default=[], help="a calibration prompt (repeatable)")
    prompts.add_argument("--prompts", help="a text file of calibration prompts, one per line")
    prompts.add_argument("--negative", help="negative prompt for cfg > 1 (default: a zeroed prompt)")
    prompts.add_argument("--steps", type=int, default=20)
    prompts.add_argument("--width", type=int, default=1024)
    prompts.add_argument("--height", type=int, default=1024)
    prompts.add_argument("--seed", type=int, default=0)
    prompts.add_argument("--cfg", type=float, default=1.0)
    prompts.add_argument("--guidance", type=float, default=3.5, help="FLUX guidance embedding")
    prompts.add_argument("--sampler", default="euler")
    prompts.add_argument("--scheduler", default="simple")

    quant = parser.add_argument_group("quantization")
    quant.add_argument("--precision", choices=["int4", "nvfp4"], default="int4")
    quant.add_argument("--rank", type=int, default=32)
    quant.add_argument("--no-smoothing", action="store_true", help="no smoothing search")
    quant.add_argument("--no-gptq", action="store_true", help="round the 4-bit residual to nearest, without GPTQ")
    quant.add_argument("--keep", action="append", default=[], metavar="PATTERN",
                       help="keep matching layers 16-bit (ComfyUI or checkpoint names, * and ? wildcards)")
    return parser.parse_args(argv)


def import_comfyui(path: str | None, cpu: bool) -> None:
    """Make ComfyUI and this pack importable (the pack as the package ``comfyui_svdquant``)."""
    if "comfy.model_management" not in sys.modules:
        candidates = [Path(path)] if path else [ROOT.parent.parent]  # ComfyUI/custom_nodes/<this pack>
        found = next((c for c in candidates if (c / "comfy" / "model_management.py").exists()), None)
        if found is None:
            sys.exit(f"ComfyUI not found at {candidates[0]}: pass --comfyui (or set COMFYUI_PATH)")
        sys.path.insert(0, str(found.resolve()))
        import comfy.cli_args
        import torch

        comfy.cli_args.args.cpu = cpu or not torch.cuda.is_available()
    if PACKAGE not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACKAGE, ROOT / "__init__.py",
                                                      submodule_search_locations=[str(ROOT)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = module
        spec.loader.exec_module(module)


def load_model(args: argparse.Namespace):
    """(MODEL, CLIP) as ComfyUI's loaders give them, with the LoRAs applied."""
    import comfy.sd
    import comfy.utils
    import torch

    from comfyui_svdquant.loaders.convert import blocks_of

    if args.checkpoint:
        model, clip = comfy.sd.load_checkpoint_guess_config(args.checkpoint, output_vae=False)[:2]
    else:
        dtypes = {"fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
        options = {"dtype": dtypes[args.weight_dtype]} if args.weight_dtype in dtypes else {}
        model = comfy.sd.load_diffusion_model(args.model, model_options=options)
        clip = None
    family = blocks_of(model.model.diffusion_model)[0].name  # refuses other families before any more loading
    if args.text_encoder:
        clip_type = comfy.sd.CLIPType.FLUX if family == "flux" else comfy.sd.CLIPType.STABLE_DIFFUSION
        clip = comfy.sd.load_clip(args.text_encoder, clip_type=clip_type)
    if clip is None:
        sys.exit("no text encoders: pass --text-encoder files (or a --checkpoint that contains them)")
    for item in args.lora:
        file, _, strength = item.partition(":")
        lora = comfy.utils.load_torch_file(file, safe_load=True)
        model, _ = comfy.sd.load_lora_for_models(model, None, lora, float(strength or 1.0), 0.0)
    return model, clip


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts:
        prompts += [line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    if not prompts:
        sys.exit("no calibration prompts: pass --prompt TEXT (repeatable) or --prompts FILE")
    return prompts


def encode(clip, text: str) -> list:
    """A prompt's CONDITIONING, as CLIP Text Encode makes it."""
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import_comfyui(args.comfyui, args.cpu)
    from tqdm import tqdm

    from comfyui_svdquant.loaders.calibration import SamplingSettings
    from comfyui_svdquant.loaders.quantize import Conversion, quantize_model
    from comfyui_svdquant.loaders.save import save_checkpoint
    from comfyui_svdquant.svdquant.errors import SVDQuantError
    from comfyui_svdquant.svdquant.quantizer import QuantizeConfig

    try:
        conversion = Conversion(
            QuantizeConfig(precision=args.precision, rank=args.rank, smooth=not args.no_smoothing,
                           gptq=not args.no_gptq),
            SamplingSettings(args.steps, args.width, args.height, args.seed, args.cfg, args.guidance, args.sampler,
                             args.scheduler),
            keep=tuple(args.keep),
        )
        texts = read_prompts(args)
        model, clip = load_model(args)
        prompts = [encode(clip, text) for text in texts]
        negative = encode(clip, args.negative) if args.negative else None
        del clip
        with tqdm(desc="SVDQuant", unit="step") as bar:
            def progress(done: int, total: int) -> None:
                bar.total = total
                bar.update(done - bar.n)

            quantized = quantize_model(model, prompts, negative, conversion, progress)
        save_checkpoint(quantized.model.diffusion_model, args.output, quantized.model.svdquant_metadata)
    except SVDQuantError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
