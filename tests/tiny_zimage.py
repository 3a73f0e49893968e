"""A small Z-Image (ComfyUI's own NextDiT, ``supported_models.ZImage``) and its inputs."""

from __future__ import annotations

import torch

from tiny_models import comfy_model, gains_near_one, meta_state_dict

# Z-Image-Turbo's layout at width 256: its head size (128 = 32 + 48 + 48 rotary axes), its feed-forward rule
# (8/3 · dim rounded up to 256: 768), two refiners of each kind, pad tokens. 256 is the narrowest width whose
# modulation reads the timestep embedding (min(dim, 256) wide) Z-Image's way.
TINY_ZIMAGE = {
    "image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 256, "cap_feat_dim": 64, "n_layers": 2,
    "n_refiner_layers": 2, "n_heads": 2, "n_kv_heads": 2, "qk_norm": True, "norm_eps": 1e-5,
    "ffn_dim_multiplier": 8.0 / 3.0, "axes_dims": [32, 48, 48], "axes_lens": [1536, 512, 512], "rope_theta": 256.0,
    "z_image_modulation": True, "time_scale": 1000.0, "pad_tokens_multiple": 32,
}


def zimage_shapes(config: dict) -> dict[str, torch.Tensor]:
    """The parameters of a Z-Image file in ComfyUI's names, shapes only (ComfyUI's NextDiT on the meta device)."""
    from comfy.ldm.lumina.model import NextDiT

    return meta_state_dict(NextDiT, **config)


def tiny_zimage(seed: int = 0, dtype: torch.dtype = torch.bfloat16, **overrides):
    """A dense ComfyUI Z-Image BaseModel (``comfy.ldm.lumina.model.NextDiT`` inside) at a small width."""
    from comfyui_svdquant.loaders.zimage import ZImageArchitecture

    config = dict(TINY_ZIMAGE, **overrides)
    model = comfy_model(ZImageArchitecture(), zimage_shapes(config), dtype, seed, hint=config)
    gains_near_one(model, seed, lambda name, p: p.ndim == 1 and "norm" in name or name == "cap_embedder.0.weight")
    return model


def zimage_inputs(seed: int, config: dict | None = None, batch: int = 1, size: int = 16, tokens: int = 8,
                  dtype: torch.dtype = torch.bfloat16) -> dict:
    """Keyword arguments of ``NextDiT.forward``: latent, timestep (sigma), text features and their count."""
    config = config or TINY_ZIMAGE
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(batch, config["in_channels"], size, size, generator=g).to(dtype),
        "timesteps": torch.rand(batch, generator=g),
        "context": torch.randn(batch, tokens, config["cap_feat_dim"], generator=g).to(dtype),
        "num_tokens": tokens,
    }


# --- the Z-Image-Turbo workflow's files (tests/tiny_pipeline.py) -----------------------------------------

# Qwen3-4B's layout (ComfyUI's comfy.text_encoders.llama.Qwen3_4B: q/k norms, a fixed 128-wide head) at width
# 64, its full vocabulary (the tokenizer's ids reach 151645) and three layers (Z-Image reads the second to
# last). Its width is the tiny Z-Image's cap_feat_dim.
QWEN3 = {"hidden_size": TINY_ZIMAGE["cap_feat_dim"], "intermediate_size": 128, "num_hidden_layers": 3,
         "num_attention_heads": 1, "num_key_value_heads": 1}


def comfy_has_z_image() -> bool:
    import comfy.supported_models

    return hasattr(comfy.supported_models, "ZImage")


def write_qwen3(path, save, init, sizes: dict = QWEN3, seed: int = 4) -> None:
    """A Qwen3-4B-architecture text encoder as ``qwen_3_4b.safetensors`` stores it (``save`` and ``init``: the
    pipeline's writer and weight initialisation). Nothing on a ComfyUI without Z-Image."""
    if not comfy_has_z_image():
        return
    import comfy.ops
    from comfy.text_encoders.llama import Qwen3_4B

    model = Qwen3_4B(dict(sizes), torch.float32, "cpu", comfy.ops.manual_cast)
    init(model, seed)
    save({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}, path)


def write_svdquant_zimage(path, rank: int = 128, seed: int = 3) -> None:
    """The authors' Z-Image-Turbo file for the tiny Z-Image (tests/zimage_fixture.py). Nothing on a ComfyUI
    without Z-Image."""
    if not comfy_has_z_image():
        return
    from zimage_fixture import zimage_checkpoint

    path.parent.mkdir(parents=True, exist_ok=True)
    zimage_checkpoint(tiny_zimage(seed), path, rank=rank)
