"""FLUX.1 (dev, schnell, Krea, Kontext, Fill, Depth, Canny) on ComfyUI's ``comfy.ldm.flux.model.Flux``.

Checkpoint layout (the published SVDQuant FLUX files, as nunchaku's C++ ``FluxModel`` names its
parameters and deepcompressor's ``convert.py`` writes them): quantized blocks under diffusers-style
block names, every other tensor 16-bit under diffusers names. ComfyUI's fused layers map as follows:
- double block: ``img_attn.qkv`` ← ``qkv_proj``, ``img_attn.proj`` ← ``out_proj``, ``img_mlp.0/2`` ←
  ``mlp_fc1/2`` (and ``_context`` variants for the text stream); ``img_mod.lin`` ← ``norm1.linear``
  (W4A16, 6 interleaved chunks);
- single block: ``linear1`` = ``qkv_proj`` ‖ ``mlp_fc1`` (outputs concatenated); ``linear2`` =
  ``out_proj`` + ``mlp_fc2`` (input split into the attention and MLP halves; both carry a bias and
  the two are summed: deepcompressor puts the real bias on the MLP half and zeros on the other);
  ``modulation.lin`` ← ``norm.linear`` (W4A16, 3 chunks).
The MLP down projections read a GELU output: INT4 checkpoints quantize them unsigned (their stored
bias compensates the +0.171875 input shift; NVFP4 ones stay signed). The model variants differ only
outside the blocks: Fill (96 input channels), Depth / Canny (32), schnell (no guidance embedder);
Krea and Kontext are dev-shaped. The tensors decide, whatever a copied ``comfy_config`` says.

Files of the python backend name the same layers the way ``NunchakuFluxTransformer2DModelV2`` does
(``convert_flux_state_dict`` in nunchaku's ``transformer_flux_v2.py``): ``attn.to_qkv``,
``attn.add_qkv_proj``, ``attn.to_out.0`` / ``attn.to_add_out``, ``ff.net.0.proj`` / ``ff.net.2`` …,
and the single block's ``attn.to_out``; the block norms move under ``attn.``. Such a file is told
apart by its tensor names; both spellings of the leaf names (``lora_down`` / ``proj_down``) are read.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

import comfy.supported_models
import comfy.utils
import torch
from torch import nn

from ..svdquant.checkpoint import CheckpointReader, QuantizationInfo
from ..svdquant.errors import CheckpointError, SVDQuantError
from .architecture import Block, Part, QuantizedLayer
from .compat import flux_norm_leaf

log = logging.getLogger(__name__)

MODEL_CLASS = "NunchakuFluxTransformer2dModel"

# The python backend's names of the C++ engine's layers (keys: C++ local names).
PYTHON_DOUBLE = {
    "qkv_proj": "attn.to_qkv", "qkv_proj_context": "attn.add_qkv_proj", "out_proj": "attn.to_out.0",
    "out_proj_context": "attn.to_add_out", "mlp_fc1": "ff.net.0.proj", "mlp_fc2": "ff.net.2",
    "mlp_context_fc1": "ff_context.net.0.proj", "mlp_context_fc2": "ff_context.net.2", "norm_q": "attn.norm_q",
    "norm_k": "attn.norm_k", "norm_added_q": "attn.norm_added_q", "norm_added_k": "attn.norm_added_k",
}
PYTHON_SINGLE = {"qkv_proj": "attn.to_qkv", "out_proj": "attn.to_out", "norm_q": "attn.norm_q", "norm_k": "attn.norm_k"}

# 16-bit norms inside the blocks: ComfyUI name → C++ local name.
# (the leaf is this ComfyUI's parameter name: compat.flux_norm_leaf)
_DOUBLE_NORMS = {"img_attn.norm.query_norm": "norm_q", "img_attn.norm.key_norm": "norm_k",
                 "txt_attn.norm.query_norm": "norm_added_q", "txt_attn.norm.key_norm": "norm_added_k"}
_SINGLE_NORMS = {"norm.query_norm": "norm_q", "norm.key_norm": "norm_k"}

PATCH = 2  # ComfyUI's FLUX patchifies 2×2; the diffusers embedder reads the 4·C packed channels


class FluxArchitecture:
    """FLUX under one naming of the block layers: ``"cpp"`` (the published files) or ``"python"``."""

    name = "flux"
    label = "FLUX.1"
    python_leaf_names = False  # the published files follow the C++ engine's names

    def __init__(self, naming: str = "cpp"):
        if naming not in ("cpp", "python"):
            raise ValueError(f"naming = {naming!r}: expected 'cpp' or 'python'")
        self.naming = naming
        self._double = PYTHON_DOUBLE if naming == "python" else {}
        self._single = PYTHON_SINGLE if naming == "python" else {}

    def double(self, i: int | str, local: str) -> str:
        return f"transformer_blocks.{i}.{self._double.get(local, local)}"

    def single(self, i: int | str, local: str) -> str:
        return f"single_transformer_blocks.{i}.{self._single.get(local, local)}"

    def _has_blocks(self, reader: CheckpointReader) -> bool:
        return _stored(reader, self.double(0, "qkv_proj")) is not None or \
            _stored(reader, self.single(0, "qkv_proj")) is not None

    def detect(self, reader: CheckpointReader) -> bool:
        if not _is_flux(reader):
            return False
        if self._has_blocks(reader):
            return True
        if not any(FluxArchitecture(n)._has_blocks(reader) for n in ("cpp", "python")):
            raise CheckpointError(reader.path, "a FLUX checkpoint without SVDQuant blocks: neither "
                                  "'transformer_blocks.0.qkv_proj.qweight' nor "
                                  "'transformer_blocks.0.attn.to_qkv.qweight' is in it")
        return False

    def unet_config(self, reader: CheckpointReader) -> dict:
        """The config the file's tensors (and, for the rotary axes, its metadata) describe: enough to name and
        shape its tensors; ComfyUI's detection then gives the running version's config (:mod:`.detection`)."""
        comfy_config = reader.json("comfy_config", required=False)
        if not (comfy_config and isinstance(comfy_config.get("model_config"), dict)):
            return self._config_from_shapes(reader)
        config = comfy_config["model_config"]
        shapes = self._config_from_shapes(reader, config.get("axes_dim"))
        if config.get("image_model") != "flux":
            raise CheckpointError(reader.path,
                                  f"comfy_config describes a {config.get('image_model')!r} model, not FLUX")
        # Fill / Depth / Canny files widen the input embedder; some carry the dev model's comfy_config.
        for key in ("in_channels", "out_channels", "guidance_embed"):
            if config.get(key) != shapes[key]:
                log.warning("SVDQuant: %s: comfy_config says %s = %r, the tensors say %r; using the tensors",
                            reader.path, key, config.get(key), shapes[key])
        for key in ("hidden_size", "depth", "depth_single_blocks"):
            if config.get(key) != shapes[key]:
                raise CheckpointError(reader.path, f"comfy_config says {key} = {config.get(key)!r}, but the tensors "
                                      f"hold a model with {key} = {shapes[key]}")
        return shapes

    def _config_from_shapes(self, reader: CheckpointReader, axes: list[int] | None = None) -> dict:
        diffusers = reader.json("config", required=False) or {}
        def stored(prefix: str) -> bool:
            return _stored(reader, prefix) is not None

        depth = _count(stored, self.double("{}", "qkv_proj"))
        depth_single = _count(stored, self.single("{}", "qkv_proj"))
        block = (lambda local: self.double(0, local)) if depth else (lambda local: self.single(0, local))
        mlp_fc1 = _stored(reader, block("mlp_fc1")) or f"{block('mlp_fc1')}.qweight"
        for key in ("x_embedder.weight", "context_embedder.weight", "proj_out.weight",
                    "time_text_embed.text_embedder.linear_1.weight", f"{block('norm_q')}.weight", mlp_fc1):
            if key not in reader:
                raise CheckpointError(reader.path, f"required tensor '{key}' is missing (not a FLUX checkpoint?)")
        hidden, in_features = reader.shape("x_embedder.weight")
        head_dim = reader.shape(f"{block('norm_q')}.weight")[0]
        mlp_hidden = reader.shape(mlp_fc1)[0]
        axes = axes or diffusers.get("axes_dims_rope") or ([16, 56, 56] if head_dim == 128 else None)
        if axes is None or sum(axes) != head_dim:
            raise CheckpointError(reader.path, f"cannot tell the rotary axes of a FLUX model with head size "
                                  f"{head_dim}: the metadata entry 'config' (axes_dims_rope) is missing")
        return {
            "image_model": "flux",
            "in_channels": in_features // PATCH**2,
            "out_channels": reader.shape("proj_out.weight")[0] // PATCH**2,
            "vec_in_dim": reader.shape("time_text_embed.text_embedder.linear_1.weight")[1],
            "context_in_dim": reader.shape("context_embedder.weight")[1],
            "hidden_size": hidden,
            "mlp_ratio": mlp_hidden / hidden,
            "num_heads": hidden // head_dim,
            "depth": depth,
            "depth_single_blocks": depth_single,
            "axes_dim": list(axes),
            "theta": 10000,
            "patch_size": PATCH,
            "qkv_bias": depth == 0 or f"{self.double(0, 'qkv_proj')}.bias" in reader,
            "guidance_embed": "time_text_embed.guidance_embedder.linear_1.weight" in reader,
        }

    def fit_config(self, detected: dict, shapes: dict, hint: dict) -> dict:
        """ComfyUI's detected config with every field the tensors decide set from them: v0.3.x fixes FLUX's
        widths (hidden 3072, text 4096, 24 heads), newer versions its head size (128) and MLP ratio. The
        rotary axes come from ``hint`` where the detected ones do not add up to the head size."""
        hidden, in_features = shapes["img_in.weight"].shape
        depth = _count(shapes.__contains__, "double_blocks.{}.img_attn.qkv.weight")
        depth_single = _count(shapes.__contains__, "single_blocks.{}.linear1.weight")
        norm = "double_blocks.0.img_attn.norm.query_norm" if depth else "single_blocks.0.norm.query_norm"
        head = next(shapes[f"{norm}.{leaf}"].shape[0] for leaf in ("scale", "weight") if f"{norm}.{leaf}" in shapes)
        if depth:
            mlp = shapes["double_blocks.0.img_mlp.0.weight"].shape[0]
        else:
            mlp = shapes["single_blocks.0.linear1.weight"].shape[0] - 3 * hidden
        axes = list(detected.get("axes_dim") or [])
        if sum(axes) != head:
            axes = list(hint.get("axes_dim") or [])
        if sum(axes) != head:
            raise SVDQuantError(f"cannot tell the rotary axes of a FLUX model with head size {head}")
        tensors = {
            "in_channels": in_features // PATCH**2,
            "out_channels": shapes["final_layer.linear.weight"].shape[0] // PATCH**2,
            "vec_in_dim": shapes["vector_in.in_layer.weight"].shape[1],
            "context_in_dim": shapes["txt_in.weight"].shape[1],
            "hidden_size": hidden, "mlp_ratio": mlp / hidden, "num_heads": hidden // head, "axes_dim": axes,
            "depth": depth, "depth_single_blocks": depth_single,
            "qkv_bias": depth == 0 or "double_blocks.0.img_attn.qkv.bias" in shapes,
            "guidance_embed": "guidance_in.in_layer.weight" in shapes,
        }
        for key, value in tensors.items():
            if detected.get(key) != value:
                log.debug("SVDQuant: ComfyUI's detection says %s = %r, the tensors %r", key, detected.get(key), value)
                detected[key] = value
        return detected

    def accepts(self, config_class: type) -> bool:
        return issubclass(config_class, comfy.supported_models.Flux)

    def config_class(self, unet_config: dict) -> type:
        if unet_config.get("in_channels") == 96:
            return comfy.supported_models.FluxInpaint
        if unet_config.get("guidance_embed", True):
            return comfy.supported_models.Flux
        return comfy.supported_models.FluxSchnell

    def blocks(self, unet_config: dict) -> list[Block]:
        h = unet_config["hidden_size"]
        m = int(h * unet_config["mlp_ratio"])
        out: list[Block] = []
        for i in range(unet_config["depth"]):

            def w4a4(comfy_name: str, local: str, k: int, n: int, unsigned: bool = False, i: int = i
                     ) -> QuantizedLayer:
                return QuantizedLayer(f"double_blocks.{i}.{comfy_name}",
                                      (Part(self.double(i, local), "w4a4", k, n, unsigned),))

            def modulation(comfy_name: str, local: str, i: int = i) -> QuantizedLayer:
                part = Part(self.double(i, local), "w4a16", h, 6 * h, splits=6, scale_chunks=(1, 4))
                return QuantizedLayer(f"double_blocks.{i}.{comfy_name}", (part,))

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
            c = f"single_blocks.{i}"
            out.append(Block(c, (
                QuantizedLayer(f"{c}.modulation.lin",
                               (Part(self.single(i, "norm.linear"), "w4a16", h, 3 * h, splits=3, scale_chunks=(1,)),)),
                QuantizedLayer(f"{c}.linear1", (Part(self.single(i, "qkv_proj"), "w4a4", h, 3 * h),
                                                Part(self.single(i, "mlp_fc1"), "w4a4", h, m)), combine="concat"),
                QuantizedLayer(f"{c}.linear2", (Part(self.single(i, "out_proj"), "w4a4", h, h),
                                                Part(self.single(i, "mlp_fc2"), "w4a4", m, h, act_unsigned=True)),
                               combine="split_input"),
            )))
        return out

    def dense_key_map(self, unet_config: dict) -> dict[str, str]:
        out = {}
        for file_key, target in comfy.utils.flux_to_diffusers(unet_config).items():
            comfy_key = target if isinstance(target, str) else target[0]
            sliced = not isinstance(target, str) and target[1]
            if comfy_key.startswith(("double_blocks.", "single_blocks.")) or sliced:
                continue  # block tensors are mapped below; sliced entries belong to fused quantized layers
            if file_key.startswith("controlnet_"):
                continue
            out[comfy_key] = file_key
        if not unet_config.get("guidance_embed", True):
            out = {k: v for k, v in out.items() if not k.startswith("guidance_in.")}
        leaf = flux_norm_leaf()
        for i in range(unet_config["depth"]):
            out.update({f"double_blocks.{i}.{k}.{leaf}": f"{self.double(i, v)}.weight"
                        for k, v in _DOUBLE_NORMS.items()})
        for i in range(unet_config["depth_single_blocks"]):
            out.update({f"single_blocks.{i}.{k}.{leaf}": f"{self.single(i, v)}.weight"
                        for k, v in _SINGLE_NORMS.items()})
        return out

    def convert_dense(self, comfy_key: str, tensor: torch.Tensor, to_file: bool) -> torch.Tensor:
        # ComfyUI's final modulation is (shift, scale); the diffusers layout is (scale, shift).
        if comfy_key.startswith("final_layer.adaLN_modulation.1."):
            return comfy.utils.swap_scale_shift(tensor)
        return tensor

    def metadata(self, unet_config: dict, info: QuantizationInfo) -> dict[str, str]:
        h, heads = unet_config["hidden_size"], unet_config["num_heads"]
        channels = PATCH**2
        config = {
            "_class_name": "FluxTransformer2DModel",
            "attention_head_dim": h // heads,
            "axes_dims_rope": list(unet_config["axes_dim"]),
            "guidance_embeds": bool(unet_config.get("guidance_embed", True)),
            "in_channels": unet_config["in_channels"] * channels,
            "joint_attention_dim": unet_config["context_in_dim"],
            "num_attention_heads": heads,
            "num_layers": unet_config["depth"],
            "num_single_layers": unet_config["depth_single_blocks"],
            "out_channels": unet_config.get("out_channels", 16) * channels,
            "patch_size": 1,
            "pooled_projection_dim": unet_config["vec_in_dim"],
        }
        model_class = "Flux" if unet_config.get("guidance_embed", True) else "FluxSchnell"
        # As in ComfyUI-nunchaku's model configs: its loader then builds no 16-bit model to discard.
        model_config = dict(unet_config, disable_unet_model_creation=True)
        return {
            "config": json.dumps(config),
            "comfy_config": json.dumps({"model_class": model_class, "model_config": model_config}),
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


def _is_flux(reader: CheckpointReader) -> bool:
    comfy_config = reader.json("comfy_config", required=False) or {}
    if comfy_config.get("model_class") in ("Flux", "FluxSchnell"):
        return True
    if "Flux" in reader.metadata.get("model_class", ""):
        return True
    return "x_embedder.weight" in reader and any(k.startswith("single_transformer_blocks.") for k in reader.keys)


def _stored(reader: CheckpointReader, prefix: str) -> str | None:
    """The key holding a layer's output rows: its packed ``qweight``, or its ``weight`` where the file keeps it
    16-bit (see :mod:`.dense_layers`)."""
    for key in (f"{prefix}.qweight", f"{prefix}.weight"):
        if key in reader:
            return key
    return None


def _count(present: Callable[[str], bool], pattern: str) -> int:
    """How many blocks 0, 1, … ``pattern.format(n)`` names before the first that is not ``present``."""
    n = 0
    while present(pattern.format(n)):
        n += 1
    return n
