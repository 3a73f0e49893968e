"""A Qwen-Image model of the real architecture (ComfyUI's own ``QwenImageTransformer2DModel``) at a small
width, and its inputs (text-to-image, and Edit's reference latents)."""

from __future__ import annotations

import torch

from tiny_models import comfy_model, gains_near_one, meta_state_dict

# Two dual-stream blocks, 2 heads of 64 (hidden 128, MLP 512), a 64-wide text context. The rotary axes
# add up to the head size as Qwen-Image's (16, 56, 56) do to 128.
TINY_QWEN = {
    "image_model": "qwen_image", "in_channels": 64, "out_channels": 16, "num_layers": 2, "attention_head_dim": 64,
    "num_attention_heads": 2, "joint_attention_dim": 64, "axes_dims_rope": [16, 24, 24], "patch_size": 2,
}
# The published Qwen-Image network (ComfyUI's class defaults).
REAL_QWEN = dict(TINY_QWEN, num_layers=60, attention_head_dim=128, num_attention_heads=24,
                 joint_attention_dim=3584, axes_dims_rope=[16, 56, 56])


def qwen_shapes(config: dict) -> dict[str, torch.Tensor]:
    """The parameters of a Qwen-Image file in ComfyUI's (= diffusers') names, shapes only: ComfyUI's own class
    built on the meta device."""
    from comfy.ldm.qwen_image.model import QwenImageTransformer2DModel

    return meta_state_dict(QwenImageTransformer2DModel, **config)


def tiny_qwen(seed: int = 0, dtype: torch.dtype = torch.bfloat16, **overrides):
    """A dense ComfyUI Qwen-Image BaseModel at a small width, with deterministic weights."""
    from comfyui_svdquant.loaders.qwen_image import QwenImageArchitecture

    config = dict(TINY_QWEN, **overrides)
    model = comfy_model(QwenImageArchitecture(), qwen_shapes(config), dtype, seed, hint=config)
    gains_near_one(model, seed, lambda name, _: name.endswith(("norm_q.weight", "norm_k.weight", "norm_added_q.weight",
                                                               "norm_added_k.weight", "txt_norm.weight")))
    return model


def qwen_inputs(seed: int, config: dict | None = None, batch: int = 1, size: int = 16, tokens: int = 8,
                dtype: torch.dtype = torch.bfloat16, edit: bool = False) -> dict:
    """Keyword arguments of the model's forward: a (batch, C, 1, H, W) latent as ComfyUI passes Qwen-Image's
    (Wan) latents, the timestep, the text context and, for Edit, one reference latent of the input image."""
    config = config or TINY_QWEN
    channels = config["in_channels"] // config["patch_size"] ** 2
    g = torch.Generator().manual_seed(seed)
    out = {
        "x": torch.randn(batch, channels, 1, size, size, generator=g).to(dtype),
        "timestep": torch.rand(batch, generator=g),
        "context": torch.randn(batch, tokens, config["joint_attention_dim"], generator=g).to(dtype),
    }
    if edit:
        out["ref_latents"] = [torch.randn(batch, channels, 1, size, size, generator=g).to(dtype)]
    return out
