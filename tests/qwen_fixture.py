"""Qwen-Image checkpoints in the authors' layout, written from a dense ComfyUI Qwen-Image model, for the
loader's tests: an independent writer, as ``nunchaku_fixture.py`` is for FLUX (nothing here imports
``svdquant`` or ``loaders``; the packers and the one-layer quantization are that module's explicit
index arithmetic).

The layout follows nunchaku's ``transformer_qwenimage.py`` (``NunchakuQwenImageTransformer2DModel``,
which builds its blocks with ``scale_shift=0`` and loads the file strictly): diffusers names for every
tensor; ``attn.to_qkv`` / ``attn.add_qkv_proj`` fuse q, k and v; ``img_mod.1`` / ``txt_mod.1`` are AWQ
W4A16 with six interleaved chunks; ``attn.to_out.0``, ``attn.to_add_out`` and the MLPs' ``net.0.proj`` /
``net.2`` are W4A4 (``net.2`` reads a GELU output: unsigned INT4 activations); W4A4 leaves carry the python
names (``proj_down``, ``smooth_factor`` …); W4A16 scales and zeros are (K/64, N) as ``AWQW4A16Linear`` holds
them (the C++ engine's files pad the group count to a multiple of 16; equal at Qwen-Image's width);
everything else is 16-bit under its own name. The metadata is ``config`` (the diffusers config),
``model_class`` and ``quantization_config``.

Returns, for every quantized ComfyUI Linear, the fp32 (weight, bias) the file's tensors reconstruct.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from nunchaku_fixture import FAULTS, PYTHON_LEAVES, Dense, _qkv_swapped, quantization_config, smoothing, w4a4, w4a16

QKV = {"to_qkv": ("to_q", "to_k", "to_v"), "add_qkv_proj": ("add_q_proj", "add_k_proj", "add_v_proj")}
W4A4 = {"attn.to_out.0": False, "attn.to_add_out": False, "img_mlp.net.0.proj": False, "img_mlp.net.2": True,
        "txt_mlp.net.0.proj": False, "txt_mlp.net.2": True}  # local name → reads a GELU output


def qwen_checkpoint(model, path: str | Path, precision: str = "int4", rank: int = 32,
                    faults: set[str] | frozenset[str] = frozenset(), dtype: torch.dtype = torch.bfloat16) -> Dense:
    """Write the SVDQuant checkpoint of a dense ComfyUI Qwen-Image ``model`` (a BaseModel) to ``path``."""
    faults = frozenset(faults)
    assert faults <= FAULTS, faults - FAULTS
    dm = model.diffusion_model
    tensors: dict[str, torch.Tensor] = {}
    expected: Dense = {}
    quantized: set[str] = set()

    def get(name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        layer = dm.get_submodule(name)
        quantized.add(name)
        return layer.weight.detach().float(), None if layer.bias is None else layer.bias.detach().float()

    def put(prefix: str, layer_tensors: dict[str, torch.Tensor]) -> None:
        for leaf, value in layer_tensors.items():
            tensors[f"{prefix}.{PYTHON_LEAVES.get(leaf, leaf)}"] = value.contiguous()

    blocks = len(dm.transformer_blocks)
    for i in range(blocks):
        b = f"transformer_blocks.{i}"
        for local in ("img_mod.1", "txt_mod.1"):
            weight, bias = get(f"{b}.{local}")
            layer_tensors, w, bias = w4a16(weight, bias, 6, dtype, faults)
            for name in ("wscales", "wzeros"):  # AWQW4A16Linear holds (K/64, N): no group padding
                layer_tensors[name] = layer_tensors[name][: weight.shape[1] // 64]
            put(f"{b}.{local}", layer_tensors)
            expected[f"{b}.{local}"] = (w, bias)
        for fused, names in QKV.items():
            pieces = [get(f"{b}.attn.{name}") for name in names]
            weight, bias = torch.cat([w for w, _ in pieces]), torch.cat([x for _, x in pieces])
            width = pieces[0][0].shape[0]
            if "swap_qk" in faults:  # the file holds k ‖ q ‖ v; the layers it stands for are unchanged
                weight, bias = _qkv_swapped(weight, bias, width)
            layer_tensors, w, bias = w4a4(weight, bias, smoothing(weight, dtype), rank, precision, dtype, faults=faults)
            if "swap_qk" in faults:
                w, bias = _qkv_swapped(w, bias, width)
            put(f"{b}.attn.{fused}", layer_tensors)
            for j, name in enumerate(names):
                rows = slice(j * width, (j + 1) * width)
                expected[f"{b}.attn.{name}"] = (w[rows], bias[rows])
        for local, unsigned in W4A4.items():
            weight, bias = get(f"{b}.{local}")
            layer_tensors, w, bias = w4a4(weight, bias, smoothing(weight, dtype), rank, precision, dtype, unsigned,
                                          faults)
            put(f"{b}.{local}", layer_tensors)
            expected[f"{b}.{local}"] = (w, bias)
    for key, value in dm.state_dict().items():
        if key.rsplit(".", 1)[0] not in quantized:
            tensors[key] = value.detach().to(dtype).contiguous()
    attn = dm.transformer_blocks[0].attn
    config = {"_class_name": "QwenImageTransformer2DModel", "attention_head_dim": attn.dim_head,
              "axes_dims_rope": list(dm.pe_embedder.axes_dim), "guidance_embeds": False,
              "in_channels": dm.in_channels, "joint_attention_dim": dm.txt_in.in_features,
              "num_attention_heads": attn.heads, "num_layers": blocks, "out_channels": dm.out_channels,
              "patch_size": dm.patch_size, "pooled_projection_dim": 768}
    metadata = {"config": json.dumps(config), "model_class": "NunchakuQwenImageTransformer2DModel",
                "quantization_config": quantization_config(precision, rank)}
    save_file(tensors, str(path), metadata=metadata)
    return expected
