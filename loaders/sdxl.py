"""SDXL and SDXL-Turbo on ComfyUI's ``comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel``.

Checkpoint layout (nunchaku's ``unet_sdxl.py``, ``NunchakuSDXLUNet2DConditionModel``): every tensor
under its diffusers ``UNet2DConditionModel`` name; in each transformer block the quantized (W4A4)
layers are
- ``attn1.to_qkv``: the self-attention's q, k and v fused along the output (q ‖ k ‖ v), no bias;
  ComfyUI keeps ``to_q`` / ``to_k`` / ``to_v`` apart, so each is a row slice of it;
- ``attn2.to_q`` (no bias); the cross-attention's ``to_k`` / ``to_v`` read the text context and
  stay 16-bit;
- ``attn1.to_out.0``, ``attn2.to_out.0``, ``ff.net.0.proj`` (GEGLU's input projection),
  ``ff.net.2``; all with a bias.
Every activation is signed: ``ff.net.2`` reads a GEGLU product, which has no lower bound. Resnets,
embeddings, norms and the transformers' ``proj_in`` / ``proj_out`` stay 16-bit. SDXL-Turbo is the
same network.
"""

from __future__ import annotations

import functools
import json
import re

import comfy.ops
import comfy.supported_models
import comfy.utils
import torch
from torch import nn

from ..svdquant.checkpoint import CheckpointReader, QuantizationInfo
from ..svdquant.errors import CheckpointError, SVDQuantError
from .architecture import Block, Part, QuantizedLayer, all_layers

MODEL_CLASS = "NunchakuSDXLUNet2DConditionModel"
HEAD_CHANNELS = 64  # SDXL's attention heads are 64 wide at every level
_MARKER = re.compile(r"^(down_blocks\.\d+|mid_block|up_blocks\.\d+)\.attentions\.\d+"
                     r"\.transformer_blocks\.\d+\.attn1\.to_qkv\.qweight$")


class SDXLArchitecture:
    name = "sdxl"
    label = "SDXL"
    python_leaf_names = False

    def detect(self, reader: CheckpointReader) -> bool:
        comfy_config = reader.json("comfy_config", required=False) or {}
        named = comfy_config.get("model_class") == "SDXL" or "SDXL" in reader.metadata.get("model_class", "")
        found = any(_MARKER.match(k) for k in reader.keys)
        if named and not found:
            raise CheckpointError(reader.path, "an SDXL checkpoint without SVDQuant layers: no "
                                  "'….transformer_blocks.N.attn1.to_qkv.qweight' tensor is in it")
        return found

    def unet_config(self, reader: CheckpointReader) -> dict:
        comfy_config = reader.json("comfy_config", required=False)
        if comfy_config and isinstance(comfy_config.get("model_config"), dict):
            return dict(comfy_config["model_config"])
        diffusers = reader.json("config", required=False)
        if diffusers and "block_out_channels" in diffusers:
            return _from_diffusers_config(reader, diffusers)
        raise CheckpointError(reader.path, "an SDXL checkpoint needs the metadata entry 'config' (the diffusers "
                              "UNet2DConditionModel config) to tell its shape")

    def fit_config(self, detected: dict, shapes: dict, hint: dict) -> dict:
        # ComfyUI's UNet detection reads every SDXL field from the tensors; the heads are 64 wide in every
        # version (the SDXL class's own setting).
        return detected

    def accepts(self, config_class: type) -> bool:
        return issubclass(config_class, comfy.supported_models.SDXL)

    def config_class(self, unet_config: dict) -> type:
        return comfy.supported_models.SDXL

    def blocks(self, unet_config: dict) -> list[Block]:
        out = []
        for comfy_block, file_block, d in _transformer_blocks(unet_config):
            qkv = f"{file_block}.attn1.to_qkv"
            slices = tuple(QuantizedLayer(f"{comfy_block}.attn1.to_{name}",
                                          (Part(qkv, "w4a4", d, 3 * d, has_bias=False, rows=(j * d, d)),))
                           for j, name in enumerate("qkv"))

            def w4a4(local: str, k: int, n: int, bias: bool = True, comfy_block: str = comfy_block,
                     file_block: str = file_block) -> QuantizedLayer:
                part = Part(f"{file_block}.{local}", "w4a4", k, n, has_bias=bias)
                return QuantizedLayer(f"{comfy_block}.{local}", (part,))

            out.append(Block(comfy_block, slices + (
                w4a4("attn1.to_out.0", d, d),
                w4a4("attn2.to_q", d, d, bias=False),
                w4a4("attn2.to_out.0", d, d),
                w4a4("ff.net.0.proj", d, 8 * d),
                w4a4("ff.net.2", 4 * d, d),
            ), shared_inputs=(tuple(layer.module for layer in slices),)))
        return out

    def dense_key_map(self, unet_config: dict) -> dict[str, str]:
        to_file: dict[str, str] = {}
        for file_key, comfy_key in comfy.utils.unet_to_diffusers(unet_config).items():
            if not file_key.startswith("class_embedding."):  # SDXL's label embedding is diffusers' add_embedding
                to_file[comfy_key] = file_key
        quantized = {layer.module for layer in all_layers(self.blocks(unet_config))}
        out = {}
        for comfy_key in _parameter_names(json.dumps(unet_config, sort_keys=True)):
            if comfy_key.rsplit(".", 1)[0] in quantized:
                continue
            if comfy_key not in to_file:
                raise SVDQuantError(f"ComfyUI's SDXL parameter '{comfy_key}' has no diffusers name")
            out[comfy_key] = to_file[comfy_key]
        return out

    def convert_dense(self, comfy_key: str, tensor: torch.Tensor, to_file: bool) -> torch.Tensor:
        return tensor

    def metadata(self, unet_config: dict, info: QuantizationInfo) -> dict[str, str]:
        return {
            "config": json.dumps(_diffusers_config(unet_config)),
            "comfy_config": json.dumps({"model_class": "SDXL", "model_config": unet_config}),
            "model_class": MODEL_CLASS,
            "quantization_config": info.to_json(),
        }

    def architecture_of(self, diffusion_model: nn.Module) -> dict | None:
        from comfy.ldm.modules.attention import SpatialTransformer
        from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock, UNetModel

        if type(diffusion_model) is not UNetModel or getattr(diffusion_model, "num_classes", None) != "sequential":
            return None

        def depth(block: nn.Module) -> int:
            found = [m for m in block if isinstance(m, SpatialTransformer)]
            return len(found[0].transformer_blocks) if found else 0

        transformers = [m for m in diffusion_model.modules() if isinstance(m, SpatialTransformer)]
        if not transformers or not hasattr(transformers[0].proj_in, "in_features"):
            return None  # SD1.x / 2.x style UNets (convolution projections) are not SDXL-class
        inputs = [b for b in diffusion_model.input_blocks[1:] if isinstance(b[0], ResBlock)]  # not the downsamplers
        model = diffusion_model
        return {
            "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
            "num_classes": "sequential", "adm_in_channels": model.label_emb[0][0].in_features,
            "in_channels": model.in_channels, "out_channels": model.out_channels,
            "model_channels": model.model_channels, "num_res_blocks": list(model.num_res_blocks),
            "channel_mult": list(model.channel_mult), "num_head_channels": model.num_head_channels,
            "transformer_depth": [depth(b) for b in inputs],
            "transformer_depth_middle": depth(model.middle_block),
            "transformer_depth_output": [depth(b) for b in model.output_blocks][::-1],
            "use_linear_in_transformer": True,
            "context_dim": transformers[0].transformer_blocks[0].attn2.to_k.in_features,
            "use_temporal_attention": False, "use_temporal_resblock": False,
        }


def _transformer_blocks(unet_config: dict) -> list[tuple[str, str, int]]:
    """(ComfyUI path, file path, width) of every transformer block, in forward order."""
    widths = [unet_config["model_channels"] * m for m in unet_config["channel_mult"]]
    out = []
    suffix = ".attn1.to_q.weight"
    for file_key, comfy_key in comfy.utils.unet_to_diffusers(unet_config).items():
        if not file_key.endswith(suffix):
            continue
        if file_key.startswith("down_blocks."):
            level = int(file_key.split(".")[1])
        elif file_key.startswith("up_blocks."):
            level = len(widths) - 1 - int(file_key.split(".")[1])
        else:
            level = len(widths) - 1
        out.append((comfy_key[: -len(suffix)], file_key[: -len(suffix)], widths[level]))
    return out


@functools.lru_cache(maxsize=4)
def _parameter_names(config_json: str) -> tuple[str, ...]:
    """Every parameter of ComfyUI's UNet for this config (built on the meta device: no memory)."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    config = json.loads(config_json)
    config.update(num_heads=-1, num_head_channels=config.get("num_head_channels", HEAD_CHANNELS))
    model = UNetModel(**config, device="meta", operations=comfy.ops.disable_weight_init)
    return tuple(name for name, _ in model.named_parameters())


def _from_diffusers_config(reader: CheckpointReader, config: dict) -> dict:
    """ComfyUI's unet_config for a diffusers ``UNet2DConditionModel`` config of the SDXL family."""
    try:
        channels = list(config["block_out_channels"])
        levels = len(channels)
        per_level = config.get("layers_per_block", 2)
        res_blocks = list(per_level) if isinstance(per_level, list) else [per_level] * levels
        layers = config.get("transformer_layers_per_block", 1)
        layers = list(layers) if isinstance(layers, list) else [layers] * levels
        attention = ["CrossAttn" in t for t in config["down_block_types"]]
        heads = config.get("num_attention_heads") or config.get("attention_head_dim")
        heads = list(heads) if isinstance(heads, list) else [heads] * levels
        depth = [layers[i] if attention[i] else 0 for i in range(levels)]
        widths = {channels[i] // heads[i] for i in range(levels) if attention[i]}
        if len(widths) != 1:
            raise ValueError(f"attention heads of different widths {sorted(widths)}")
        return {
            "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
            "num_classes": "sequential", "adm_in_channels": config["projection_class_embeddings_input_dim"],
            "in_channels": config["in_channels"], "out_channels": config["out_channels"],
            "model_channels": channels[0], "num_res_blocks": res_blocks,
            "channel_mult": [c // channels[0] for c in channels], "num_head_channels": widths.pop(),
            "transformer_depth": [d for i, d in enumerate(depth) for _ in range(res_blocks[i])],
            "transformer_depth_middle": layers[-1],
            "transformer_depth_output": [d for i, d in enumerate(depth) for _ in range(res_blocks[i] + 1)],
            "use_linear_in_transformer": bool(config.get("use_linear_projection", False)),
            "context_dim": config["cross_attention_dim"],
            "use_temporal_attention": False, "use_temporal_resblock": False,
        }
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
        raise CheckpointError(reader.path, f"metadata entry 'config' is not an SDXL UNet config ({exc})") from None


def _diffusers_config(unet_config: dict) -> dict:
    """The diffusers ``UNet2DConditionModel`` config nunchaku's SDXL loader builds the model from."""
    mc = unet_config["model_channels"]
    channels = [mc * m for m in unet_config["channel_mult"]]
    per_level, start = [], 0
    for n in unet_config["num_res_blocks"]:
        per_level.append(unet_config["transformer_depth"][start])
        start += n
    head = unet_config.get("num_head_channels", HEAD_CHANNELS)
    down = ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in per_level]
    return {
        "_class_name": "UNet2DConditionModel",
        "act_fn": "silu",
        "addition_embed_type": "text_time",
        "addition_embed_type_num_heads": 64,
        "addition_time_embed_dim": 256,
        "attention_head_dim": [c // head for c in channels],
        "block_out_channels": channels,
        "center_input_sample": False,
        "cross_attention_dim": unet_config["context_dim"],
        "down_block_types": down,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": unet_config["in_channels"],
        "layers_per_block": unet_config["num_res_blocks"][0],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "norm_eps": 1e-05,
        "norm_num_groups": 32,
        "out_channels": unet_config["out_channels"],
        "projection_class_embeddings_input_dim": unet_config["adm_in_channels"],
        "sample_size": 128,
        "transformer_layers_per_block": [max(d, 1) for d in per_level],
        "up_block_types": [t.replace("Down", "Up") for t in reversed(down)],
        "use_linear_projection": unet_config.get("use_linear_in_transformer", True),
    }
