"""FLUX.1 (dev, schnell, Krea, Kontext, Fill, Depth, Canny) on ComfyUI's ``comfy.ldm.flux.model.Flux``.

Checkpoint layout (the published SVDQuant FLUX files): quantized blocks under diffusers-style block
names, every other tensor 16-bit under diffusers names. ComfyUI's fused layers map as follows:
- double block: ``img_attn.qkv`` ← ``qkv_proj``, ``img_attn.proj`` ← ``out_proj``, ``img_mlp.0/2`` ←
  ``mlp_fc1/2`` (and ``_context`` variants for the text stream); ``img_mod.lin`` ← ``norm1.linear``
  (W4A16, 6 interleaved chunks);
- single block: ``linear1`` = ``qkv_proj`` ‖ ``mlp_fc1`` (outputs concatenated); ``linear2`` =
  ``out_proj`` + ``mlp_fc2`` (input split into the attention and MLP halves); ``modulation.lin`` ←
  ``norm.linear`` (W4A16, 3 chunks).
The MLP down projections read a GELU output: INT4 checkpoints quantize them unsigned.
"""

from __future__ import annotations

import json

import comfy.supported_models
import comfy.utils
import torch
from torch import nn

from ..svdquant.checkpoint import CheckpointReader, QuantizationInfo
from ..svdquant.errors import CheckpointError
from .architecture import Block, Part, QuantizedLayer

MODEL_CLASS = "NunchakuFluxTransformer2dModel"

# Diffusers-named 16-bit norms inside the blocks, as the checkpoints name them.
_DOUBLE_NORMS = {"img_attn.norm.query_norm.scale": "norm_q.weight", "img_attn.norm.key_norm.scale": "norm_k.weight",
                 "txt_attn.norm.query_norm.scale": "norm_added_q.weight",
                 "txt_attn.norm.key_norm.scale": "norm_added_k.weight"}
_SINGLE_NORMS = {"norm.query_norm.scale": "norm_q.weight", "norm.key_norm.scale": "norm_k.weight"}


class FluxArchitecture:
    name = "flux"

    def detect(self, reader: CheckpointReader) -> bool:
        comfy_config = reader.json("comfy_config", required=False) or {}
        if comfy_config.get("model_class") in ("Flux", "FluxSchnell"):
            return True
        if "Flux" in reader.metadata.get("model_class", ""):
            return True
        return "transformer_blocks.0.qkv_proj.qweight" in reader and "x_embedder.weight" in reader

    def unet_config(self, reader: CheckpointReader) -> dict:
        comfy_config = reader.json("comfy_config", required=False)
        if comfy_config and isinstance(comfy_config.get("model_config"), dict):
            config = dict(comfy_config["model_config"])
            config.pop("disable_unet_model_creation", None)
            if config.get("image_model") != "flux":
                raise CheckpointError(reader.path, f"comfy_config describes a {config.get('image_model')!r} model, "
                                      "not FLUX")
            return config
        return self._config_from_shapes(reader)

    def _config_from_shapes(self, reader: CheckpointReader) -> dict:
        diffusers = reader.json("config", required=False) or {}
        for key in ("x_embedder.weight", "context_embedder.weight", "time_text_embed.text_embedder.linear_1.weight",
                    "transformer_blocks.0.norm_q.weight"):
            if key not in reader:
                raise CheckpointError(reader.path, f"required tensor '{key}' is missing (not a FLUX checkpoint?)")
        hidden, in_features = reader.shape("x_embedder.weight")
        head_dim = reader.shape("transformer_blocks.0.norm_q.weight")[0]
        mlp_out = reader.shape("transformer_blocks.0.mlp_fc1.qweight")[0]
        axes = diffusers.get("axes_dims_rope") or ([16, 56, 56] if head_dim == 128 else None)
        if axes is None or sum(axes) != head_dim:
            raise CheckpointError(reader.path, f"cannot tell the rotary axes of a FLUX model with head size {head_dim}: "
                                  "the metadata entry 'config' (axes_dims_rope) is missing")
        return {
            "image_model": "flux",
            "in_channels": in_features // 4,
            "out_channels": (diffusers.get("out_channels") or 64) // 4,
            "vec_in_dim": reader.shape("time_text_embed.text_embedder.linear_1.weight")[1],
            "context_in_dim": reader.shape("context_embedder.weight")[1],
            "hidden_size": hidden,
            "mlp_ratio": mlp_out / hidden,
            "num_heads": hidden // head_dim,
            "depth": _count(reader, "transformer_blocks.{}.qkv_proj.qweight"),
            "depth_single_blocks": _count(reader, "single_transformer_blocks.{}.qkv_proj.qweight"),
            "axes_dim": list(axes),
            "theta": 10000,
            "patch_size": 2,
            "qkv_bias": "transformer_blocks.0.qkv_proj.bias" in reader,
            "guidance_embed": "time_text_embed.guidance_embedder.linear_1.weight" in reader,
        }

    def model_config(self, unet_config: dict):
        if unet_config.get("in_channels") == 96:
            cls = comfy.supported_models.FluxInpaint
        elif unet_config.get("guidance_embed", True):
            cls = comfy.supported_models.Flux
        else:
            cls = comfy.supported_models.FluxSchnell
        return cls(dict(unet_config))

    def blocks(self, unet_config: dict) -> list[Block]:
        h = unet_config["hidden_size"]
        m = int(h * unet_config["mlp_ratio"])
        out: list[Block] = []
        for i in range(unet_config["depth"]):
            p = f"transformer_blocks.{i}"

            def w4a4(comfy_name: str, file_name: str, k: int, n: int, unsigned: bool = False) -> QuantizedLayer:
                return QuantizedLayer(f"double_blocks.{i}.{comfy_name}", (Part(f"{p}.{file_name}", "w4a4", k, n, unsigned),))

            def modulation(comfy_name: str, file_name: str) -> QuantizedLayer:
                return QuantizedLayer(f"double_blocks.{i}.{comfy_name}",
                                      (Part(f"{p}.{file_name}", "w4a16", h, 6 * h, splits=6, scale_chunks=(1, 4)),))

            out.append(Block(f"double_blocks.{i}", (
                modulation("img_mod.lin", "norm1.linear"),
                modulation("txt_mod.lin", "norm1_context.linear"),
                w4a4("img_attn.qkv", "qkv_proj", h, 3 * h),
                w4a4("txt_attn.qkv", "qkv_proj_context", h, 3 * h),
                w4a4("img_attn.proj", "out_proj", h, h),
                w4a4("txt_attn.proj", "out_proj_context", h, h),
                w4a4("img_mlp.0", "mlp_fc1", h, m),
                w4a4("img_mlp.2", "mlp_fc2", m, h, unsigned=True),
                w4a4("txt_mlp.0", "mlp_context_fc1", h, m),
                w4a4("txt_mlp.2", "mlp_context_fc2", m, h, unsigned=True),
            )))
        for i in range(unet_config["depth_single_blocks"]):
            p, c = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
            out.append(Block(c, (
                QuantizedLayer(f"{c}.modulation.lin",
                               (Part(f"{p}.norm.linear", "w4a16", h, 3 * h, splits=3, scale_chunks=(1,)),)),
                QuantizedLayer(f"{c}.linear1", (Part(f"{p}.qkv_proj", "w4a4", h, 3 * h),
                                                Part(f"{p}.mlp_fc1", "w4a4", h, m)), combine="concat"),
                QuantizedLayer(f"{c}.linear2", (Part(f"{p}.out_proj", "w4a4", h, h),
                                                Part(f"{p}.mlp_fc2", "w4a4", m, h, act_unsigned=True)),
                               combine="split_input"),
            )))
        return out

    def dense_key_map(self, unet_config: dict) -> dict[str, str]:
        out = {}
        for file_key, target in comfy.utils.flux_to_diffusers(unet_config).items():
            comfy_key = target if isinstance(target, str) else target[0]
            if comfy_key.startswith(("double_blocks.", "single_blocks.")) or (not isinstance(target, str) and target[1]):
                continue  # block tensors are mapped below; sliced entries belong to fused quantized layers
            if file_key.startswith("controlnet_"):
                continue
            out[comfy_key] = file_key
        if not unet_config.get("guidance_embed", True):
            out = {k: v for k, v in out.items() if not k.startswith("guidance_in.")}
        for i in range(unet_config["depth"]):
            out.update({f"double_blocks.{i}.{k}": f"transformer_blocks.{i}.{v}" for k, v in _DOUBLE_NORMS.items()})
        for i in range(unet_config["depth_single_blocks"]):
            out.update({f"single_blocks.{i}.{k}": f"single_transformer_blocks.{i}.{v}" for k, v in _SINGLE_NORMS.items()})
        return out

    def convert_dense(self, comfy_key: str, tensor: torch.Tensor, to_file: bool) -> torch.Tensor:
        # ComfyUI's final modulation is (shift, scale); the diffusers layout is (scale, shift).
        if comfy_key.startswith("final_layer.adaLN_modulation.1."):
            return comfy.utils.swap_scale_shift(tensor)
        return tensor

    def metadata(self, unet_config: dict, info: QuantizationInfo) -> dict[str, str]:
        h, heads = unet_config["hidden_size"], unet_config["num_heads"]
        config = {
            "_class_name": "FluxTransformer2DModel",
            "attention_head_dim": h // heads,
            "axes_dims_rope": list(unet_config["axes_dim"]),
            "guidance_embeds": bool(unet_config.get("guidance_embed", True)),
            "in_channels": unet_config["in_channels"] * 4,
            "joint_attention_dim": unet_config["context_in_dim"],
            "num_attention_heads": heads,
            "num_layers": unet_config["depth"],
            "num_single_layers": unet_config["depth_single_blocks"],
            "out_channels": unet_config.get("out_channels", 16) * 4,
            "patch_size": 1,
            "pooled_projection_dim": unet_config["vec_in_dim"],
        }
        model_class = "Flux" if unet_config.get("guidance_embed", True) else "FluxSchnell"
        return {
            "config": json.dumps(config),
            "comfy_config": json.dumps({"model_class": model_class, "model_config": unet_config}),
            "model_class": MODEL_CLASS,
            "quantization_config": info.to_json(),
        }

    def architecture_of(self, diffusion_model: nn.Module) -> dict | None:
        import comfy.ldm.flux.model

        if type(diffusion_model) is not comfy.ldm.flux.model.Flux:
            return None
        params = diffusion_model.params
        config = {"image_model": "flux"}
        config.update({k: getattr(params, k) for k in (
            "in_channels", "out_channels", "vec_in_dim", "context_in_dim", "hidden_size", "mlp_ratio", "num_heads",
            "depth", "depth_single_blocks", "axes_dim", "theta", "patch_size", "qkv_bias", "guidance_embed")})
        config["axes_dim"] = list(config["axes_dim"])
        return config


def _count(reader: CheckpointReader, pattern: str) -> int:
    n = 0
    while pattern.format(n) in reader:
        n += 1
    return n
