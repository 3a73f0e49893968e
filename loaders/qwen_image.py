"""Qwen-Image (text-to-image, Edit, Edit-2509 and their Lightning variants) on ComfyUI's
``comfy.ldm.qwen_image.model.QwenImageTransformer2DModel``.

Checkpoint layout (nunchaku's ``transformer_qwenimage.py``, ``NunchakuQwenImageTransformer2DModel``, which
loads the published files strictly): every tensor under its diffusers name, which is also ComfyUI's, and
the python backend's leaf names (``proj_down`` / ``proj_up`` / ``smooth_factor`` / ``smooth_factor_orig``).
In each of the 60 dual-stream blocks the quantized layers are
- ``img_mod.1`` / ``txt_mod.1``: the AdaLN modulations, W4A16 (AWQ), 6 chunks (shift, scale, gate twice)
  stored interleaved (channel s·D + d at d·6 + s) with +1 pre-added to the two scale chunks' bias
  (the engine builds its blocks with ``scale_shift=0``);
- ``attn.to_qkv`` (q ‖ k ‖ v of the image stream) and ``attn.add_qkv_proj`` (of the text stream), fused,
  with a bias; ComfyUI keeps ``to_q`` / ``to_k`` / ``to_v`` and ``add_{q,k,v}_proj`` apart, so each is a
  row slice of the fused layer;
- ``attn.to_out.0``, ``attn.to_add_out``, ``img_mlp.net.0.proj``, ``img_mlp.net.2``, ``txt_mlp.net.0.proj``,
  ``txt_mlp.net.2``: W4A4; the MLP down projections read a tanh-GELU output, unsigned in INT4 files.
The q/k RMSNorms, embedders, ``txt_norm``, ``norm_out`` and ``proj_out`` stay 16-bit. The variants share
this network; they differ in weights only (Edit reads its input image as reference latents).
"""

from __future__ import annotations

import functools
import json

import comfy.ops
import comfy.supported_models
import torch
from torch import nn

from ..svdquant.checkpoint import CheckpointReader, QuantizationInfo
from ..svdquant.errors import CheckpointError, SVDQuantError
from .architecture import Block, Part, QuantizedLayer, all_layers
from .flux import _stored

MODEL_CLASS = "NunchakuQwenImageTransformer2DModel"
PATCH = 2
MLP_RATIO = 4  # ComfyUI's FeedForward: dim → 4·dim → dim
QWEN_AXES = [16, 56, 56]  # Qwen-Image's rotary axes (head size 128)


class QwenImageArchitecture:
    name = "qwen_image"
    label = "Qwen-Image"
    python_leaf_names = True  # nunchaku's python loader reads proj_down / smooth_factor …, strictly

    def detect(self, reader: CheckpointReader) -> bool:
        comfy_config = reader.json("comfy_config", required=False) or {}
        named = "QwenImage" in reader.metadata.get("model_class", "") or comfy_config.get("model_class") == "QwenImage"
        found = "txt_norm.weight" in reader and _stored(reader, "transformer_blocks.0.attn.to_qkv") is not None
        if named and not found:
            raise CheckpointError(reader.path, "a Qwen-Image checkpoint without SVDQuant blocks: 'txt_norm.weight' "
                                  "or 'transformer_blocks.0.attn.to_qkv.qweight' is missing")
        return found

    def unet_config(self, reader: CheckpointReader) -> dict:
        for key in ("img_in.weight", "txt_in.weight", "proj_out.weight", "transformer_blocks.0.attn.norm_q.weight"):
            if key not in reader:
                raise CheckpointError(reader.path, f"required tensor '{key}' is missing (not a Qwen-Image checkpoint?)")
        hidden, in_channels = reader.shape("img_in.weight")
        head = reader.shape("transformer_blocks.0.attn.norm_q.weight")[0]
        layers = 0
        while _stored(reader, f"transformer_blocks.{layers}.attn.to_qkv") is not None:
            layers += 1
        diffusers = reader.json("config", required=False) or {}
        axes = diffusers.get("axes_dims_rope") or (QWEN_AXES if head == sum(QWEN_AXES) else None)
        if axes is None or sum(axes) != head:
            raise CheckpointError(reader.path, f"cannot tell the rotary axes of a Qwen-Image model with head size "
                                  f"{head}: the metadata entry 'config' (axes_dims_rope) is missing")
        return {
            "image_model": "qwen_image", "in_channels": in_channels,
            "out_channels": reader.shape("proj_out.weight")[0] // PATCH**2, "num_layers": layers,
            "attention_head_dim": head, "num_attention_heads": hidden // head,
            "joint_attention_dim": reader.shape("txt_in.weight")[1], "axes_dims_rope": list(axes), "patch_size": PATCH,
        }

    def fit_config(self, detected: dict, shapes: dict, hint: dict) -> dict:
        """ComfyUI's detection reads only the input channels and the depth of a Qwen-Image model (its widths
        are the class defaults); the other widths come from the tensors, the rotary axes from ``hint``
        where the default ones do not add up to the head size."""
        head = shapes["transformer_blocks.0.attn.norm_q.weight"].shape[0]
        axes = list(detected.get("axes_dims_rope") or QWEN_AXES)
        if sum(axes) != head:
            axes = list(hint.get("axes_dims_rope") or [])
        if sum(axes) != head:
            raise SVDQuantError(f"cannot tell the rotary axes of a Qwen-Image model with head size {head}")
        return dict(detected, out_channels=shapes["proj_out.weight"].shape[0] // PATCH**2, attention_head_dim=head,
                    num_attention_heads=shapes["img_in.weight"].shape[0] // head,
                    joint_attention_dim=shapes["txt_in.weight"].shape[1], axes_dims_rope=axes, patch_size=PATCH)

    def accepts(self, config_class: type) -> bool:
        return issubclass(config_class, comfy.supported_models.QwenImage)

    def config_class(self, unet_config: dict) -> type:
        return comfy.supported_models.QwenImage

    def blocks(self, unet_config: dict) -> list[Block]:
        h = unet_config["attention_head_dim"] * unet_config["num_attention_heads"]
        m = MLP_RATIO * h
        out = []
        for i in range(unet_config["num_layers"]):
            b = f"transformer_blocks.{i}"

            def w4a4(local: str, k: int, n: int, unsigned: bool = False, b: str = b) -> QuantizedLayer:
                return QuantizedLayer(f"{b}.{local}", (Part(f"{b}.{local}", "w4a4", k, n, unsigned),))

            def modulation(local: str, b: str = b) -> QuantizedLayer:
                part = Part(f"{b}.{local}", "w4a16", h, 6 * h, splits=6, scale_chunks=(1, 4))
                return QuantizedLayer(f"{b}.{local}", (part,))

            def qkv(fused: str, names: tuple[str, str, str], b: str = b) -> tuple[QuantizedLayer, ...]:
                return tuple(QuantizedLayer(f"{b}.attn.{name}", (Part(f"{b}.attn.{fused}", "w4a4", h, 3 * h,
                                                                      rows=(j * h, h)),))
                             for j, name in enumerate(names))

            image = qkv("to_qkv", ("to_q", "to_k", "to_v"))
            text = qkv("add_qkv_proj", ("add_q_proj", "add_k_proj", "add_v_proj"))
            out.append(Block(b, (
                modulation("img_mod.1"), modulation("txt_mod.1"), *image, *text,
                w4a4("attn.to_out.0", h, h), w4a4("attn.to_add_out", h, h),
                w4a4("img_mlp.net.0.proj", h, m), w4a4("img_mlp.net.2", m, h, unsigned=True),
                w4a4("txt_mlp.net.0.proj", h, m), w4a4("txt_mlp.net.2", m, h, unsigned=True),
            ), shared_inputs=(tuple(layer.module for layer in image), tuple(layer.module for layer in text))))
        return out

    def dense_key_map(self, unet_config: dict) -> dict[str, str]:
        quantized = {layer.module for layer in all_layers(self.blocks(unet_config))}
        names = _parameter_names(json.dumps(unet_config, sort_keys=True))
        return {k: k for k in names if k.rsplit(".", 1)[0] not in quantized}

    def convert_dense(self, comfy_key: str, tensor: torch.Tensor, to_file: bool) -> torch.Tensor:
        return tensor  # ComfyUI's Qwen-Image tensors are the diffusers ones, names and layouts alike

    def metadata(self, unet_config: dict, info: QuantizationInfo) -> dict[str, str]:
        config = {
            "_class_name": "QwenImageTransformer2DModel",
            "attention_head_dim": unet_config["attention_head_dim"],
            "axes_dims_rope": list(unet_config["axes_dims_rope"]),
            "guidance_embeds": False,
            "in_channels": unet_config["in_channels"],
            "joint_attention_dim": unet_config["joint_attention_dim"],
            "num_attention_heads": unet_config["num_attention_heads"],
            "num_layers": unet_config["num_layers"],
            "out_channels": unet_config["out_channels"],
            "patch_size": unet_config["patch_size"],
            "pooled_projection_dim": 768,
        }
        return {
            "config": json.dumps(config),
            "comfy_config": json.dumps({"model_class": "QwenImage", "model_config": unet_config}),
            "model_class": MODEL_CLASS,
            "quantization_config": info.to_json(),
        }

    def architecture_of(self, diffusion_model: nn.Module) -> dict | None:
        import comfy.ldm.qwen_image.model

        if type(diffusion_model) is not comfy.ldm.qwen_image.model.QwenImageTransformer2DModel:
            return None  # subclasses (other families built on it) have layers of their own
        dm = diffusion_model
        attn = dm.transformer_blocks[0].attn
        config = {
            "image_model": "qwen_image", "in_channels": dm.in_channels, "out_channels": dm.out_channels,
            "num_layers": len(dm.transformer_blocks), "attention_head_dim": attn.dim_head,
            "num_attention_heads": attn.heads, "joint_attention_dim": dm.txt_in.in_features,
            "axes_dims_rope": list(dm.pe_embedder.axes_dim), "patch_size": dm.patch_size,
        }
        # what newer ComfyUI versions detect for Qwen-Image-Edit-2511 and Qwen-Image-Layered
        if getattr(dm, "default_ref_method", "index") != "index":
            config["default_ref_method"] = dm.default_ref_method
        if getattr(dm.time_text_embed, "use_additional_t_cond", False):
            config["use_additional_t_cond"] = True
        return config


@functools.lru_cache(maxsize=4)
def _parameter_names(config_json: str) -> tuple[str, ...]:
    """Every parameter of ComfyUI's Qwen-Image model for this config (built on the meta device)."""
    from comfy.ldm.qwen_image.model import QwenImageTransformer2DModel

    config = json.loads(config_json)
    model = QwenImageTransformer2DModel(**config, device="meta", operations=comfy.ops.disable_weight_init)
    return tuple(name for name, _ in model.named_parameters())

