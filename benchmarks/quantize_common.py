"""What the quantize-in-graph benchmarks share: ComfyUI in this process, small FLUX / SDXL models of ComfyUI's
own classes (and Qwen-Image, Z-Image) with the activation outliers of trained models, prompts, sampling and the table
header.

Needs ComfyUI: set COMFYUI_PATH to its folder. Runs on the GPU when there is one (else the CPU).
"""

from __future__ import annotations

import datetime
import importlib.util
import math
import os
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "comfyui_svdquant"


def find_comfyui() -> str | None:
    """ComfyUI's folder: $COMFYUI_PATH, else the ComfyUI this repository is installed in (custom_nodes)."""
    candidates = [os.environ.get("COMFYUI_PATH"), str(ROOT.parent.parent)]
    return next((c for c in candidates if c and (Path(c) / "comfy" / "model_management.py").exists()), None)


def comfyui_root() -> str:
    """:func:`find_comfyui`, or exit saying how to point at ComfyUI."""
    root = find_comfyui()
    if root is None:
        sys.exit("ComfyUI not found: set COMFYUI_PATH to a ComfyUI checkout (or put this repository in "
                 "ComfyUI/custom_nodes) and run this with ComfyUI's Python")
    return root


def setup(cpu: bool = False) -> None:
    """Import ComfyUI and this pack (as the package ``comfyui_svdquant``)."""
    sys.path.insert(0, comfyui_root())
    sys.path.insert(0, str(ROOT / "tests"))  # tiny_models: ComfyUI's own classes at small widths
    import comfy.cli_args

    comfy.cli_args.args.cpu = cpu or not torch.cuda.is_available()
    import comfy.model_management  # noqa: F401  (reads args.cpu at import)

    if PACKAGE not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACKAGE, ROOT / "__init__.py",
                                                      submodule_search_locations=[str(ROOT)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = module
        spec.loader.exec_module(module)
    if comfy.cli_args.args.cpu:
        torch.set_num_threads(1)  # the quantizer's many small SVDs: one thread beats contended ones


def header(title: str) -> str:
    import comfy.model_management

    device = comfy.model_management.get_torch_device()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s))"
    return f"### {title}\n\n{datetime.date.today()}, {name}, torch {torch.__version__}\n"


def patcher_of(model):
    import comfy.model_management
    import comfy.model_patcher

    return comfy.model_patcher.ModelPatcher(model, comfy.model_management.get_torch_device(),
                                            comfy.model_management.unet_offload_device())


def flux(hidden: int = 256, depth: int = 2, single: int = 4, seed: int = 0, outliers: float = 8.0):
    """A FLUX MODEL of ComfyUI's class (heads of FLUX.1's size 128). ``outliers``: a few channels of every
    modulation's scale get this bias, so the attention and MLP inputs carry the massive channels trained
    FLUX has (random weights alone give Gaussian activations, which need no smoothing)."""
    from tiny_models import tiny_flux

    model = tiny_flux(seed, hidden_size=hidden, num_heads=hidden // 128, axes_dim=[16, 56, 56], depth=depth,
                      depth_single_blocks=single)
    g = torch.Generator().manual_seed(seed + 100)
    channels = torch.randperm(hidden, generator=g)[:4]
    with torch.no_grad():
        for name, module in model.diffusion_model.named_modules():
            if name.endswith(("img_mod.lin", "txt_mod.lin", "modulation.lin")):
                for chunk in ((1, 4) if name.endswith("_mod.lin") else (1,)):  # the "scale" chunks
                    module.bias[chunk * hidden + channels] += outliers
    return patcher_of(model)


SDXL_POOLED = 32


def sdxl(channels: int = 64, seed: int = 0, outliers: float = 8.0):
    """An SDXL MODEL of ComfyUI's class (3 levels, transformers at levels 2 and 3). ``outliers``: a few
    channels of the transformer blocks' LayerNorms are scaled up, as in trained UNets."""
    from tiny_models import tiny_sdxl

    model = tiny_sdxl(seed, model_channels=channels, adm_in_channels=SDXL_POOLED + 6 * 256)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, module in model.diffusion_model.named_modules():
            if ".transformer_blocks." in name and isinstance(module, torch.nn.LayerNorm):
                picked = torch.randperm(module.weight.shape[0], generator=g)[:4]
                module.weight[picked] *= outliers
    return patcher_of(model)


def qwen_image(hidden: int = 256, layers: int = 3, seed: int = 0, outliers: float = 8.0):
    """A Qwen-Image MODEL of ComfyUI's class (heads of Qwen-Image's size 128, a 64-wide text context).
    ``outliers``: a few channels of every modulation's two scale chunks get this bias, as for FLUX."""
    from tiny_qwen import tiny_qwen

    model = tiny_qwen(seed, num_layers=layers, attention_head_dim=128, num_attention_heads=hidden // 128,
                      axes_dims_rope=[16, 56, 56])
    channels = torch.randperm(hidden, generator=torch.Generator().manual_seed(seed + 100))[:4]
    with torch.no_grad():
        for name, module in model.diffusion_model.named_modules():
            if name.endswith(("img_mod.1", "txt_mod.1")):
                for chunk in (1, 4):  # the "scale" chunks
                    module.bias[chunk * hidden + channels] += outliers
    return patcher_of(model)


def zimage(seed: int = 0, outliers: float = 8.0):
    """A Z-Image MODEL of ComfyUI's class (tests/tiny_zimage.py: width 256, Z-Image-Turbo's head size, 2 + 2
    refiner blocks and 2 main blocks; needs ComfyUI 0.8+). ``outliers``: a few channels of every modulation's two
    scale chunks get this bias, as for FLUX; the context refiners, which have no modulation, get them from their
    input norms' gains."""
    from tiny_zimage import tiny_zimage

    model = tiny_zimage(seed)
    dim = model.diffusion_model.dim
    channels = torch.randperm(dim, generator=torch.Generator().manual_seed(seed + 100))[:4]
    with torch.no_grad():
        for name, module in model.diffusion_model.named_modules():
            if name.endswith("adaLN_modulation.0") and hasattr(module, "bias"):  # not the final layer's SiLU
                for chunk in (0, 2):  # scale_msa, scale_mlp
                    module.bias[chunk * dim + channels] += outliers
            elif name.startswith("context_refiner.") and name.endswith(("attention_norm1", "ffn_norm1")):
                module.weight[channels] *= outliers
    return patcher_of(model)


def prompt(seed: int, family: str) -> list:
    """A CONDITIONING as a text encoder gives it: embeddings of order one, a pooled vector."""
    g = torch.Generator().manual_seed(seed)
    width, pooled = (64, 32) if family == "flux" else (64, SDXL_POOLED)
    return [[torch.randn(1, 16, width, generator=g), {"pooled_output": torch.randn(1, pooled, generator=g)}]]


def sample(model, positive: list, size: int, steps: int, cfg: float, seed: int, scheduler: str) -> torch.Tensor:
    import comfy.sample
    import node_helpers

    latent = comfy.sample.fix_empty_latent_channels(model, torch.zeros(1, 4, size // 8, size // 8))
    positive = node_helpers.conditioning_set_values(positive, {"guidance": 3.5})
    pooled = positive[0][1]["pooled_output"]
    negative = [[torch.zeros_like(positive[0][0]), {"pooled_output": torch.zeros_like(pooled)}]]
    return comfy.sample.sample(model, comfy.sample.prepare_noise(latent, seed), steps, cfg, "euler", scheduler,
                               positive, negative, latent, seed=seed, disable_pbar=True)


def psnr(a: torch.Tensor, reference: torch.Tensor) -> float:
    mse = float((a.float() - reference.float()).square().mean())
    peak = float(reference.max() - reference.min())
    return 10 * math.log10(peak * peak / mse)


def model_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in model.model.diffusion_model.state_dict().values())
