"""Z-Image-Turbo on ComfyUI's ``comfy.ldm.lumina.model.NextDiT`` (``supported_models.ZImage``).

Checkpoint layout (nunchaku's python backend, ``NunchakuZImageTransformer2DModel`` in
``transformer_zimage.py``; ComfyUI-nunchaku's ``nodes/models/zimage.py`` reads the same files): every
tensor under its diffusers ``ZImageTransformer2DModel`` name, python leaf names (``proj_down``,
``proj_up``, ``smooth_factor``, ``smooth_factor_orig``; NVFP4 adds ``wtscale``, ``wcscales``, either of
which may be absent and then means 1). In each block of ``layers``, ``noise_refiner`` and
``context_refiner`` the W4A4 layers are
- ``attention.to_qkv``: q, k and v fused along the output, no bias (ComfyUI's ``attention.qkv``);
- ``attention.to_out.0``: no bias (ComfyUI's ``attention.out``);
- ``feed_forward.net.0.proj``: the SwiGLU input projections fused as w3 ‖ w1 (diffusers' SwiGLU puts the
  value first and the gate second), no bias; ComfyUI keeps ``feed_forward.w1`` / ``w3`` apart, so each is
  a row slice of it;
- ``feed_forward.net.2``: ComfyUI's ``feed_forward.w2``, no bias. It reads silu(w1·x)·w3·x, which has no
  lower bound: signed activations.
The modulation ``adaLN_modulation.0`` (timestep → 4 chunks) stays 16-bit, as do the norms, embedders,
pad tokens and the final layer. Files quantized with ``skip_refiners`` keep the refiners 16-bit in
diffusers' split form; the pack does not read those.
"""

from __future__ import annotations

import functools
import json

import comfy.ops
import comfy.supported_models
import comfy.utils
import torch
from torch import nn

from ..svdquant.checkpoint import CheckpointReader, QuantizationInfo
from ..svdquant.errors import CheckpointError, SVDQuantError
from .architecture import Block, Part, QuantizedLayer, all_layers
from .flux import _count, _stored

MODEL_CLASS = "NunchakuZImageTransformer2DModel"
PATCH = 2
# Z-Image-Turbo's rotary settings (the diffusers config of Tongyi-MAI/Z-Image-Turbo), used where a file's
# metadata does not say and its head is Z-Image's 128 wide.
ROTARY = {"axes_dims": [32, 48, 48], "axes_lens": [1536, 512, 512], "rope_theta": 256.0}
TIME_SCALE = 1000.0
PAD_TOKENS_MULTIPLE = 32
# NextDiT's feed-forward width: multiple_of · ceil(int(multiplier · dim) / multiple_of), Z-Image's values.
FFN_MULTIPLIER, MULTIPLE_OF = 8.0 / 3.0, 256
STACKS = ("context_refiner", "noise_refiner", "layers")  # forward order
_MARKER = "attention.to_qkv"
_NEEDS = "ComfyUI 0.8.0 or newer (its Z-Image classes: supported_models.ZImage, comfy/ldm/lumina)"


def _z_image_class() -> type | None:
    return getattr(comfy.supported_models, "ZImage", None)


def _require_comfy_z_image(what: str) -> None:
    if _z_image_class() is None or not hasattr(comfy.utils, "z_image_to_diffusers"):
        from .compat import version

        found = version()
        this = ".".join(map(str, found)) if found else "this version"
        raise SVDQuantError(f"{what} is a Z-Image model, which needs {_NEEDS}; this ComfyUI is {this}. "
                            "Update ComfyUI (git pull, or the ComfyUI Manager).")


def ffn_fields(dim: int, hidden: int) -> dict:
    """The unet_config fields that make NextDiT's feed-forward ``hidden`` wide: Z-Image's own where they
    give that width, else a multiplier with a rounding that lands on it exactly."""
    if MULTIPLE_OF * -(-int(FFN_MULTIPLIER * dim) // MULTIPLE_OF) == hidden:
        return {"ffn_dim_multiplier": FFN_MULTIPLIER}
    return {"ffn_dim_multiplier": hidden / dim, "multiple_of": hidden}


class ZImageArchitecture:
    name = "zimage"
    label = "Z-Image"
    python_leaf_names = True  # the file's names for a W4A4 layer's tensors (nunchaku's python backend)

    def detect(self, reader: CheckpointReader) -> bool:
        named = reader.metadata.get("model_class") == MODEL_CLASS
        found = _stored(reader, f"layers.0.{_MARKER}") is not None and "cap_embedder.1.weight" in reader
        if named and not found:
            raise CheckpointError(reader.path, "a Z-Image checkpoint without SVDQuant blocks: no "
                                  f"'layers.0.{_MARKER}.qweight' tensor is in it")
        return found

    def unet_config(self, reader: CheckpointReader) -> dict:
        """The config the file's tensors describe (its ``config`` metadata for the rotary settings)."""
        _require_comfy_z_image(f"'{reader.path}'")
        quantization = reader.json("quantization_config", required=False) or {}
        if quantization.get("skip_refiners") or _stored(reader, f"noise_refiner.0.{_MARKER}") is None:
            raise CheckpointError(reader.path, "its refiner blocks are 16-bit (quantized with skip_refiners); this "
                                  "pack loads Z-Image files whose refiners are quantized, as the published ones")
        ffn = _stored(reader, "layers.0.feed_forward.net.0.proj")  # 4-bit, or kept 16-bit (see .dense_layers)
        for key in ("all_x_embedder.2-1.weight", "layers.0.attention.norm_q.weight",
                    ffn or "layers.0.feed_forward.net.0.proj.qweight"):
            if key not in reader:
                raise CheckpointError(reader.path, f"required tensor '{key}' is missing (not a Z-Image checkpoint?)")
        diffusers = reader.json("config", required=False) or {}
        dim, cap_feat_dim = reader.shape("cap_embedder.1.weight")
        head = reader.shape("layers.0.attention.norm_q.weight")[0]
        heads = diffusers.get("n_heads", dim // head)
        kv_heads = diffusers.get("n_kv_heads", heads)  # Z-Image's attention has as many k/v heads as q heads
        hidden = reader.shape(ffn)[0] // 2  # w3 ‖ w1 (4-bit rows are padded to 128: Z-Image's 2 × 10240 are not)
        rotary = {k: diffusers.get(k, v if head == sum(ROTARY["axes_dims"]) else None) for k, v in ROTARY.items()}
        if rotary["axes_dims"] is None or sum(rotary["axes_dims"]) != head:
            raise CheckpointError(reader.path, f"cannot tell the rotary axes of a Z-Image model with head size {head}: "
                                  "the metadata entry 'config' (axes_dims) is missing")
        config = {
            "image_model": "lumina2", "patch_size": PATCH,
            "in_channels": reader.shape("all_x_embedder.2-1.weight")[1] // PATCH**2,
            "dim": dim, "cap_feat_dim": cap_feat_dim,
            "n_layers": _count(lambda p: _stored(reader, p) is not None, "layers.{}." + _MARKER),
            "n_refiner_layers": _count(lambda p: _stored(reader, p) is not None, "noise_refiner.{}." + _MARKER),
            "n_heads": heads, "n_kv_heads": kv_heads, "qk_norm": True, "norm_eps": diffusers.get("norm_eps", 1e-5),
            **ffn_fields(dim, hidden),
            "axes_dims": list(rotary["axes_dims"]), "axes_lens": list(rotary["axes_lens"]),
            "rope_theta": float(rotary["rope_theta"]), "z_image_modulation": True,
            "time_scale": float(diffusers.get("t_scale", TIME_SCALE)),
        }
        if "cap_pad_token" in reader:
            config["pad_tokens_multiple"] = PAD_TOKENS_MULTIPLE
        return config

    def fit_config(self, detected: dict, shapes: dict, hint: dict) -> dict:
        """ComfyUI's detected config with every field the tensors decide set from them: ComfyUI fills in Z-Image's
        widths, heads and rotary settings only for the 3840-wide model; its refiner depth never."""
        dim = shapes["cap_embedder.1.weight"].shape[0]
        head = shapes["layers.0.attention.q_norm.weight"].shape[0]
        hidden = shapes["layers.0.feed_forward.w1.weight"].shape[0]
        heads = dim // head
        tensors = {
            "dim": dim, "cap_feat_dim": shapes["cap_embedder.1.weight"].shape[1],
            "in_channels": shapes["x_embedder.weight"].shape[1] // PATCH**2, "patch_size": PATCH,
            "n_layers": _count(lambda p: p in shapes, "layers.{}.attention.qkv.weight"),
            "n_refiner_layers": _count(lambda p: p in shapes, "noise_refiner.{}.attention.qkv.weight"),
            "n_heads": heads, "n_kv_heads": (shapes["layers.0.attention.qkv.weight"].shape[0] // head - heads) // 2,
            "qk_norm": True, "z_image_modulation": True,
        }
        for key, value in tensors.items():
            detected[key] = value
        if detected.get("ffn_dim_multiplier") is None or _ffn_width(detected) != hidden:
            detected.pop("multiple_of", None)
            detected.update(ffn_fields(dim, hidden))
        for key in ("axes_lens", "rope_theta", "time_scale", "norm_eps"):
            if key not in detected and key in hint:
                detected[key] = hint[key]
        if sum(detected.get("axes_dims") or []) != head:
            axes = hint.get("axes_dims") or (ROTARY["axes_dims"] if head == sum(ROTARY["axes_dims"]) else None)
            if axes is None or sum(axes) != head:
                raise SVDQuantError(f"cannot tell the rotary axes of a Z-Image model with head size {head}")
            detected["axes_dims"] = list(axes)
        detected.setdefault("axes_lens", list(ROTARY["axes_lens"]))
        detected.setdefault("rope_theta", ROTARY["rope_theta"])
        detected.setdefault("time_scale", TIME_SCALE)
        if "cap_pad_token" in shapes:
            detected["pad_tokens_multiple"] = PAD_TOKENS_MULTIPLE
        else:
            detected.pop("pad_tokens_multiple", None)
        return detected

    def accepts(self, config_class: type) -> bool:
        z_image = _z_image_class()
        return z_image is not None and issubclass(config_class, z_image)

    def config_class(self, unet_config: dict) -> type:
        _require_comfy_z_image("this model")
        return _z_image_class()

    def blocks(self, unet_config: dict) -> list[Block]:
        dim, head = unet_config["dim"], unet_config["dim"] // unet_config["n_heads"]
        qkv = (unet_config["n_heads"] + 2 * unet_config.get("n_kv_heads", unet_config["n_heads"])) * head
        hidden = _ffn_width(unet_config)
        out = []
        for stack in STACKS:
            for i in range(unet_config["n_refiner_layers"] if stack != "layers" else unet_config["n_layers"]):
                c = f"{stack}.{i}"

                def layer(comfy_name: str, file_name: str, k: int, n: int, rows: tuple[int, int] | None = None,
                          c: str = c) -> QuantizedLayer:
                    return QuantizedLayer(f"{c}.{comfy_name}",
                                          (Part(f"{c}.{file_name}", "w4a4", k, n, has_bias=False, rows=rows),))

                out.append(Block(c, (
                    layer("attention.qkv", "attention.to_qkv", dim, qkv),
                    layer("attention.out", "attention.to_out.0", head * unet_config["n_heads"], dim),
                    layer("feed_forward.w1", "feed_forward.net.0.proj", dim, 2 * hidden, rows=(hidden, hidden)),
                    layer("feed_forward.w3", "feed_forward.net.0.proj", dim, 2 * hidden, rows=(0, hidden)),
                    layer("feed_forward.w2", "feed_forward.net.2", hidden, dim),
                ), shared_inputs=((f"{c}.feed_forward.w1", f"{c}.feed_forward.w3"),)))
        return out

    def dense_key_map(self, unet_config: dict) -> dict[str, str]:
        _require_comfy_z_image("this model")
        quantized = {layer.module for layer in all_layers(self.blocks(unet_config))}
        parameters = set(_parameter_names(json.dumps(unet_config, sort_keys=True)))
        out = {}
        for file_key, target in comfy.utils.z_image_to_diffusers(unet_config).items():
            if not isinstance(target, str):
                continue  # q / k / v slices of the fused qkv: a quantized layer
            if target in parameters and target.rsplit(".", 1)[0] not in quantized:
                out[target] = file_key
        missing = parameters - set(out) - {f"{m}.{leaf}" for m in quantized for leaf in ("weight", "bias")}
        if missing:
            raise SVDQuantError(f"ComfyUI's Z-Image parameters {sorted(missing)[:5]} have no diffusers name")
        return out

    def convert_dense(self, comfy_key: str, tensor: torch.Tensor, to_file: bool) -> torch.Tensor:
        return tensor

    def metadata(self, unet_config: dict, info: QuantizationInfo) -> dict[str, str]:
        config = {
            "_class_name": "ZImageTransformer2DModel",
            "all_patch_size": [unet_config["patch_size"]], "all_f_patch_size": [1],
            "in_channels": unet_config["in_channels"], "dim": unet_config["dim"],
            "n_layers": unet_config["n_layers"], "n_refiner_layers": unet_config["n_refiner_layers"],
            "n_heads": unet_config["n_heads"], "n_kv_heads": unet_config.get("n_kv_heads", unet_config["n_heads"]),
            "norm_eps": unet_config.get("norm_eps", 1e-5), "qk_norm": True,
            "cap_feat_dim": unet_config["cap_feat_dim"], "rope_theta": unet_config["rope_theta"],
            "t_scale": unet_config["time_scale"], "axes_dims": list(unet_config["axes_dims"]),
            "axes_lens": list(unet_config["axes_lens"]),
        }
        quantization = dict(json.loads(info.to_json()), skip_refiners=False)
        return {"config": json.dumps(config), "model_class": MODEL_CLASS,
                "quantization_config": json.dumps(quantization)}

    def architecture_of(self, diffusion_model: nn.Module) -> dict | None:
        if _z_image_class() is None:
            return None
        import comfy.ldm.lumina.model

        dm = diffusion_model
        if type(dm) is not comfy.ldm.lumina.model.NextDiT or not len(dm.layers) or \
                len(dm.layers[0].adaLN_modulation) != 1 or getattr(dm, "siglip_embedder", None) is not None:
            return None  # Lumina 2 (SiLU before its modulation) and Z-Image Omni are other models
        block = dm.layers[0]
        config = {
            "image_model": "lumina2", "patch_size": dm.patch_size, "in_channels": dm.in_channels, "dim": dm.dim,
            "cap_feat_dim": dm.cap_embedder[1].in_features, "n_layers": len(dm.layers),
            "n_refiner_layers": len(dm.noise_refiner), "n_heads": dm.n_heads,
            "n_kv_heads": block.attention.n_kv_heads, "qk_norm": not isinstance(block.attention.q_norm, nn.Identity),
            "norm_eps": block.attention_norm1.eps, **ffn_fields(dm.dim, block.feed_forward.w1.out_features),
            "axes_dims": list(dm.axes_dims), "axes_lens": list(dm.axes_lens),
            "rope_theta": float(dm.rope_embedder.theta), "z_image_modulation": True,
            "time_scale": float(dm.time_scale),
        }
        if dm.pad_tokens_multiple is not None:
            config["pad_tokens_multiple"] = dm.pad_tokens_multiple
        return config


def _ffn_width(config: dict) -> int:
    multiple = config.get("multiple_of", MULTIPLE_OF)
    return multiple * -(-int(config["ffn_dim_multiplier"] * config["dim"]) // multiple)


@functools.lru_cache(maxsize=4)
def _parameter_names(config_json: str) -> tuple[str, ...]:
    """Every parameter of ComfyUI's NextDiT for this config (built on the meta device: no memory)."""
    from comfy.ldm.lumina.model import NextDiT

    model = NextDiT(**json.loads(config_json), device="meta", operations=comfy.ops.disable_weight_init)
    return tuple(name for name, _ in model.named_parameters())
