"""Time of one sampling step of a whole model in ComfyUI: 16-bit against FP8 and SVDQuant INT4.

A FLUX.1-dev-size model (ComfyUI's own Flux class: width 3072, 19 double + 38 single blocks) and an SDXL-size
UNet (ComfyUI's own UNetModel), both with random weights built directly on the GPU, at 1024² (FLUX: 4096
image + 512 text tokens, batch 1, guidance-distilled so no CFG; SDXL: a 128×128 latent, the CFG batch of 2,
77 text tokens). One row per way of running the model:
  16-bit           ComfyUI's default ops, weights in --dtype
  FP8 e4m3fn       what Load Diffusion Model's weight_dtype fp8_e4m3fn builds: weights stored in FP8, cast to the
                   compute dtype ComfyUI picks (comfy.model_management.unet_manual_cast) on each call
  FP8 e4m3fn_fast  weight_dtype fp8_e4m3fn_fast: ComfyUI's fp8_ops (FP8 matmuls), offered only where
                   comfy.model_management.supports_fp8_compute says the GPU has them
  SVDQuant fused   the pack's SVDQuantOps with random packed INT4 layers (loaders/flux.py, loaders/sdxl.py list
                   them) on the fused CUDA kernels
  SVDQuant ref.    the same layers on the PyTorch reference path
Per row: milliseconds per step (BaseModel.apply_model, the call the sampler makes; median after warm-up,
CUDA events), the host time of that call (Python and launches, measured before synchronising: it hides
behind the GPU while smaller than the step), for SVDQuant the CPU time spent inside the quantized layers'
calls in one step, the peak GPU memory of a step, the bytes of the model's weights, and the seconds of one
full 20-step image through ComfyUI's sampler (comfy.sample.sample, the model in a ModelPatcher). Weights are
random: speed does not depend on their values. ComfyUI's scaled-FP8 files (per-tensor scales read from a
file's metadata) are not built here.

    python benchmarks/step_time.py                          # FLUX.1 and SDXL at 1024², every row
    python benchmarks/step_time.py --image flux --reference-iters 2
    python benchmarks/step_time.py --tiny                   # CPU: tiny models, 16-bit and reference rows
    python benchmarks/step_time.py --weights-only           # any machine: the full-size models' weight sizes

Needs ComfyUI: COMFYUI_PATH, or this repository inside ComfyUI/custom_nodes.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))
import kernel_speed  # noqa: E402, I001  (random packed layers on the device; imports the pack)
from quantize_common import comfyui_root  # noqa: E402, I001
from tiny_models import TINY_FLUX, TINY_SDXL, flux_shapes, sdxl_shapes  # noqa: E402, I001

PACK = kernel_speed.pack.__name__

FLUX_1 = dict(TINY_FLUX, in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096, hidden_size=3072,
              num_heads=24, depth=19, depth_single_blocks=38, axes_dim=[16, 56, 56])
SDXL_1 = dict(TINY_SDXL, model_channels=320, num_res_blocks=[2, 2, 2], transformer_depth=[0, 0, 2, 2, 10, 10],
              transformer_depth_middle=10, transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10],
              context_dim=2048, adm_in_channels=2816)
# --tiny: the same classes at a small width. SDXL keeps its 2816-wide ADM input: ComfyUI's SDXL conditioning
# (pooled text + size embeddings) is built for it, and the sampler builds that conditioning.
TINY = {"flux": dict(TINY_FLUX, depth=1, depth_single_blocks=1), "sdxl": dict(TINY_SDXL, adm_in_channels=2816)}


@dataclass(frozen=True)
class Case:
    """One model at one resolution: its config, the latent it samples and its text conditioning."""

    name: str
    config: dict
    latent: tuple[int, int, int]  # channels, height, width
    tokens: int
    batch: int  # the model call's batch: 2 where the sampler batches CFG's two halves
    cfg: float
    scheduler: str

    @property
    def flux(self) -> bool:
        return "vec_in_dim" in self.config

    @property
    def text_width(self) -> int:
        return self.config["context_in_dim" if self.flux else "context_dim"]


def cases(tiny: bool) -> dict[str, Case]:
    size = 16 if tiny else 128  # 1024² / 8
    flux, sdxl = (TINY["flux"], TINY["sdxl"]) if tiny else (FLUX_1, SDXL_1)
    return {"flux": Case("FLUX.1-dev" if not tiny else "FLUX (tiny)", flux, (16, size, size), 8 if tiny else 512,
                         1, 1.0, "simple"),
            "sdxl": Case("SDXL" if not tiny else "SDXL (tiny)", sdxl, (4, size, size), 77, 2, 7.0, "normal")}


VARIANTS = ["16-bit", "FP8 e4m3fn", "FP8 e4m3fn_fast", "SVDQuant INT4 fused", "SVDQuant INT4 reference"]


def setup_comfyui() -> str:
    """Import ComfyUI, on the GPU when there is one; its version."""
    sys.path.insert(0, comfyui_root())
    import comfy.cli_args

    comfy.cli_args.args.cpu = not torch.cuda.is_available()
    import comfy.model_management  # noqa: F401  (reads args.cpu)

    try:
        import comfyui_version

        return comfyui_version.__version__
    except ImportError:
        return "unknown"


def pack_module(name: str):
    return importlib.import_module(f"{PACK}.{name}")


# --- the models ---------------------------------------------------------------------------------------------


def architecture(case: str):
    if case == "flux":
        return pack_module("loaders.flux").FluxArchitecture()
    return pack_module("loaders.sdxl").SDXLArchitecture()


def model_config(case: Case, key: str):
    """ComfyUI's config for the case, derived by ComfyUI's detection from the parameter shapes."""
    detection = pack_module("loaders.detection")
    shapes = flux_shapes(case.config) if key == "flux" else sdxl_shapes(case.config)
    return detection.model_config(architecture(key), shapes, hint=case.config if key == "flux" else None)


def randomize(module: torch.nn.Module) -> None:
    """Random weights of a trained model's scale, generated where each parameter lives (no host copy of a
    GPU model); norm weights 1. Packed SVDQuant weights (views of their layers) are left alone."""
    packed = pack_module("loaders.weight").PackedWeight
    for name, p in module.named_parameters():
        if p.is_meta or isinstance(p, packed):
            continue
        if p.ndim >= 2:
            p.copy_(torch.randn(p.shape, device=p.device) * (0.7 / p[0].numel() ** 0.5))
        elif name.endswith(("scale", "weight")):  # 1-D weights are norms (Linears and convolutions are ≥ 2-D)
            p.copy_(torch.ones(p.shape, device=p.device))
        else:
            p.copy_(torch.randn(p.shape, device=p.device) * 0.02)


def dense_model(case: Case, key: str, weight_dtype: torch.dtype, fast_fp8: bool, device: torch.device):
    """ComfyUI's model as Load Diffusion Model builds it for this weight dtype (fast: fp8_e4m3fn_fast)."""
    import comfy.model_management

    config = model_config(case, key)
    manual_cast = None
    if weight_dtype == torch.float8_e4m3fn:
        manual_cast = comfy.model_management.unet_manual_cast(weight_dtype, device, config.supported_inference_dtypes)
    config.set_inference_dtype(weight_dtype, manual_cast)
    if fast_fp8:
        config.optimizations = dict(config.optimizations, fp8=True)
    model = config.get_model({}, device=device)
    randomize(model.diffusion_model)
    return model


def random_part(part, rank: int, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """A random packed layer of the shape and kind the checkpoint stores for ``part``."""
    if part.kind == "w4a4":
        layer = kernel_speed.random_w4a4(part.in_features, part.width, rank, "int4", dtype, device)
        layer.act_unsigned = part.act_unsigned  # GELU outputs: unsigned activations, as the loader sets
        if not part.has_bias:
            layer.bias = None
        return layer
    layer = kernel_speed.random_w4a16(part.in_features, part.out_features, dtype, device)
    return pack_module("loaders.parts").InterleavedOutput(layer, part.splits) if part.splits > 1 else layer


def svdquant_model(case: Case, key: str, dtype: torch.dtype, rank: int, backend: str, device: torch.device):
    """The model as loaders/load.py assembles a loaded SVDQuant file (SVDQuantOps, a quantized body per layer,
    16-bit tensors for the rest), with random packed layers instead of the file's."""
    load, parts = pack_module("loaders.load"), pack_module("loaders.parts")
    all_layers = pack_module("loaders.architecture").all_layers
    config = model_config(case, key)
    unet_config = dict(config.unet_config)  # before get_model adds the dtype and operations
    model = load.build_config(config, dtype).get_model({}, device=device)
    diffusion_model = model.diffusion_model
    for layer in all_layers(architecture(key).blocks(unet_config)):
        body = parts.combine(layer, [random_part(p, rank, dtype, device) for p in layer.parts])
        for leaf in parts.fit_to_model(body, layer.module, dtype):
            leaf.kernel_backend = backend
        diffusion_model.get_submodule(layer.module).set_quantized(body)
    # The 16-bit Linears the file would hold (embedders, final layer) are still meta: give them tensors.
    dense = {name: torch.empty(p.shape, dtype=p.dtype, device=device)
             for name, p in diffusion_model.named_parameters() if p.is_meta}
    diffusion_model.load_state_dict(dense, strict=False)
    randomize(diffusion_model)
    return model


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of the tensors the model holds: parameters and buffers (packed 4-bit bodies as stored)."""
    packed = pack_module("loaders.weight").PackedWeight
    tensors = {id(t): t for t in (*module.parameters(), *module.buffers()) if not isinstance(t, packed)}
    return sum(t.nbytes for t in tensors.values())


def operations_of(model) -> str:
    """The ComfyUI operations class the model's Linears were built with (what pick_operations chose)."""
    for module in model.diffusion_model.modules():
        if isinstance(module, torch.nn.Linear):
            return type(module).__qualname__.removesuffix(".Linear")
    return "?"


# --- the measurements ---------------------------------------------------------------------------------------


def inputs(case: Case, model, device: torch.device, batch: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(latent, sigma, the model call's other arguments) of one mid-schedule step."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *case.latent, generator=g)
    context = torch.randn(batch, case.tokens, case.text_width, generator=g)
    vector = case.config.get("vec_in_dim", case.config.get("adm_in_channels"))
    extra = {"y": torch.randn(batch, vector, generator=g).to(device)}
    if case.flux:
        extra["guidance"] = torch.full((batch,), 3.5, device=device)
    sigma = torch.full((batch,), float(model.model_sampling.percent_to_sigma(0.5)), device=device)
    return x.to(device), sigma, dict(extra, c_crossattn=context.to(device))


def timed(fn, iters: int, warmup: int, cuda: bool) -> tuple[float, float]:
    """(median milliseconds per call, median host milliseconds per call) after ``warmup`` calls. On the GPU
    the first is CUDA-event time, the second the time until the call returned (kernels queued, not done)."""
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    times, host = [], []
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        begin = time.perf_counter()
        fn()
        host.append((time.perf_counter() - begin) * 1e3)
        if cuda:
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            times.append(host[-1])
    return statistics.median(times), statistics.median(host)


def quantized_layer_ms(model, fn, cuda: bool) -> float:
    """CPU milliseconds spent inside the SVDQuant layers' calls during one ``fn()`` (planning, checks,
    launches; on the CPU also the computation). A launch that waits for room in the GPU's queue counts."""
    quantized_ops = pack_module("loaders.ops").quantized_ops
    total, began = [0.0], {}

    def before(module, args):
        began[id(module)] = time.perf_counter()

    def after(module, args, output):
        total[0] += time.perf_counter() - began[id(module)]

    handles = []
    for _, op in quantized_ops(model.diffusion_model):
        handles += [op.register_forward_pre_hook(before), op.register_forward_hook(after)]
    try:
        if cuda:
            torch.cuda.synchronize()
        fn()
        if cuda:
            torch.cuda.synchronize()
    finally:
        for handle in handles:
            handle.remove()
    return total[0] * 1e3


def peak_gb(fn, cuda: bool, baseline: int) -> str:
    """Peak GPU memory during one ``fn()`` above ``baseline`` (what was allocated before the model was built),
    so that only this row's model and its activations count."""
    if not cuda:
        return "n/a on CPU"
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return f"{(torch.cuda.max_memory_allocated() - baseline) / 1e9:.2f}"


def image_seconds(case: Case, model, patcher_class, device: torch.device, steps: int, cuda: bool) -> float:
    """Wall seconds of one image through ComfyUI's sampler (euler, ``steps`` steps, the case's CFG)."""
    import comfy.sample

    g = torch.Generator().manual_seed(1)
    context = torch.randn(1, case.tokens, case.text_width, generator=g)
    # The conditioning a text encoder gives: FLUX's pooled vector is the model's y; SDXL's y is ComfyUI's ADM
    # (pooled CLIP-G, 1280, then six 256-wide size embeddings), built by the model from the pooled part.
    pooled = case.config["vec_in_dim"] if case.flux else case.config["adm_in_channels"] - 6 * 256
    options = {"pooled_output": torch.randn(1, pooled, generator=g)} | ({"guidance": 3.5} if case.flux else {})
    positive = [[context, options]]
    negative = [[torch.zeros_like(context), dict(options)]]
    # The model already lives on the GPU: offloading to the GPU too keeps ComfyUI from copying it to the host.
    patcher = patcher_class(model, load_device=device, offload_device=device)
    x = torch.zeros(1, *case.latent)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    begin = time.perf_counter()
    samples = comfy.sample.sample(patcher, noise, steps, case.cfg, "euler", case.scheduler, positive, negative,
                                  x, disable_pbar=True, seed=1)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - begin
    if not torch.isfinite(samples).all():
        raise RuntimeError(f"{case.name}: the sampled latent is not finite")
    return seconds


def build(case: Case, key: str, variant: str, args, device: torch.device):
    """(model, its ModelPatcher class, how its Linears run) or (None, None, why not)."""
    import comfy.model_management
    import comfy.model_patcher

    cuda, meta = device.type == "cuda", device.type == "meta"  # meta: --weights-only
    dtype = getattr(torch, args.dtype)
    if variant.startswith("FP8"):
        fast = variant.endswith("fast")
        if meta and fast:
            return None, None, "n/a with --weights-only (the weights of the FP8 e4m3fn row)"
        if not cuda and not meta:
            return None, None, "n/a on CPU"
        if fast and not comfy.model_management.supports_fp8_compute(device):
            return None, None, "n/a: ComfyUI's supports_fp8_compute is False on this GPU"
        model = dense_model(case, key, torch.float8_e4m3fn, fast, device)
        compute = "" if meta else f", compute {str(model.manual_cast_dtype).removeprefix('torch.')}"
        return model, comfy.model_patcher.ModelPatcher, f"comfy.ops.{operations_of(model)}{compute}"
    if variant == "16-bit":
        model = dense_model(case, key, dtype, False, device)
        return model, comfy.model_patcher.ModelPatcher, f"comfy.ops.{operations_of(model)}, {args.dtype}"
    backend = "cuda" if variant.endswith("fused") else "torch"
    if backend == "cuda":
        if meta:
            return None, None, "n/a with --weights-only (the weights of the reference row)"
        if not cuda:
            return None, None, "n/a on CPU"
        try:
            pack_module("kernels").enable("cuda")
        except pack_module("svdquant.errors").SVDQuantError as exc:
            return None, None, f"n/a: {exc}"
    model = svdquant_model(case, key, dtype, args.rank, backend, device)
    if meta:
        summary = f"{len(pack_module('loaders.ops').quantized_ops(model.diffusion_model))} quantized Linears"
    else:
        leaves = pack_module("loaders.parts").quantized_modules(model.diffusion_model)
        summary = pack_module("kernels.backend").path_summary(leaves, device)
    return model, pack_module("loaders.patcher").SVDQuantModelPatcher, f"{summary}, rank {args.rank}, {args.dtype}"


def measure(case: Case, key: str, variant: str, model, patcher_class, how: str, args, device: torch.device,
            baseline: int) -> str:
    cuda = device.type == "cuda"
    x, sigma, extra = inputs(case, model, device, case.batch)
    reference = variant.endswith("reference")
    iters = args.reference_iters if reference else args.iters

    def step():
        return model.apply_model(x, sigma, **extra)

    ms, host = timed(step, iters, min(args.warmup, iters), cuda)
    layers = f"{quantized_layer_ms(model, step, cuda):.1f}" if variant.startswith("SVDQuant") else "–"
    peak = peak_gb(step, cuda, baseline)
    image = "–"
    if args.image in ("all", key):
        if reference and not args.tiny and not args.image_reference:
            image = "skipped (--image-reference)"
        else:
            image = f"{image_seconds(case, model, patcher_class, device, args.steps, cuda):.2f}"
    return (f"| {case.name} | {variant} | {how} | {ms:.2f} | {iters} | {host:.2f} | {layers} | {peak} "
            f"| {weight_bytes(model.diffusion_model) / 1e6:.1f} | {image} |")


def row(case: Case, key: str, variant: str, args, device: torch.device) -> str:
    """The table row of one variant: the model is built, measured and freed (one model on the GPU at a time)."""
    import comfy.model_management

    baseline = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    model, patcher_class, how = build(case, key, variant, args, device)
    if model is None:
        return f"| {case.name} | {variant} | {how} |" + " |" * 7
    if device.type == "meta":
        megabytes = weight_bytes(model.diffusion_model) / 1e6
        return f"| {case.name} | {variant} | {how} |" + " |" * 5 + f" {megabytes:.1f} | |"
    try:
        return measure(case, key, variant, model, patcher_class, how, args, device, baseline)
    finally:
        del model
        comfy.model_management.unload_all_models()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def revision() -> str:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="small models (width 128, 1+1 blocks, 16² latent) "
                        "that run on the CPU")
    parser.add_argument("--weights-only", action="store_true", help="build the models on the meta device (no "
                        "memory, no GPU) and print only their weights: the full-size models' sizes on any machine")
    parser.add_argument("--models", nargs="+", choices=["flux", "sdxl"], default=["flux", "sdxl"])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=VARIANTS)
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--rank", type=int, default=32, help="low-rank branch of the SVDQuant layers")
    parser.add_argument("--iters", type=int, default=10, help="timed steps per row (median)")
    parser.add_argument("--reference-iters", type=int, help="timed steps of the reference rows (default --iters)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--image", choices=["all", "flux", "sdxl", "none"], default="all",
                        help="which models also sample one full image")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps of that image")
    parser.add_argument("--image-reference", action="store_true",
                        help="also sample an image on the reference path (slow at full size)")
    args = parser.parse_args(argv)
    args.reference_iters = args.reference_iters or args.iters
    comfyui = setup_comfyui()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    if args.weights_only:
        cuda, device, where = False, torch.device("meta"), "weights only (meta device)"
    elif cuda:
        props = torch.cuda.get_device_properties(device)
        where = f"{props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB)"
    else:
        where = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    command = " ".join(["python", "benchmarks/step_time.py", *(sys.argv[1:] if argv is None else argv)])
    print(f"## Step time, {where}\n")
    print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC · ComfyUI {comfyui} · torch "
          f"{torch.__version__} (CUDA {torch.version.cuda}) · Python {platform.python_version()} · pack {revision()}"
          f" · `{command}`\n")
    print("| model | variant | how it runs | ms per step | n | host ms per step | CPU ms in SVDQuant layers "
          "| peak GPU GB | weights MB | image s |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for key in args.models:
        case = cases(args.tiny)[key]
        for variant in args.variants:
            with torch.inference_mode():  # as ComfyUI's executor runs a prompt: models built and sampled in it
                print(row(case, key, variant, args, device), flush=True)
    print(f"\nOne step = one BaseModel.apply_model call (what the sampler calls per step) at batch "
          f"{', '.join(f'{cases(args.tiny)[k].name} {cases(args.tiny)[k].batch}' for k in args.models)}; "
          f"ms per step: median of n after {args.warmup} warm-up calls ({'CUDA events' if cuda else 'wall clock'}). "
          "Peak GPU GB: the most allocated during one step, model included. "
          "Host ms: until the call returned, kernels queued but not finished. CPU ms in SVDQuant layers: inside "
          "the quantized layers' calls in one step, including waits for room in the launch queue. image s: "
          f"one {args.steps}-step image through comfy.sample.sample (euler), wall clock. Random weights.")


if __name__ == "__main__":
    main()
