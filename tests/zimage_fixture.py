"""Z-Image checkpoints in the authors' layout, written from a dense ComfyUI NextDiT, for the loader's tests.

Independent of the pack's own writer (nothing here imports ``svdquant`` or ``loaders``): the packing and
the per-layer quantization are those of tests/nunchaku_fixture.py (explicit index arithmetic from the
published layout); the names follow nunchaku's ``transformer_zimage.py`` (diffusers
``ZImageTransformer2DModel`` names, ``to_qkv`` fused from to_q / to_k / to_v, the SwiGLU feed-forward as
diffusers' ``FeedForward``: ``net.0.proj`` = w3 ‖ w1, ``net.2`` = w2, all without bias; python leaf
names ``proj_down`` / ``proj_up`` / ``smooth_factor`` / ``smooth_factor_orig``) and ComfyUI-nunchaku's
Z-Image loader, which splits ``net.0.proj`` back into (x3, x1) = chunk(2).

Returns, per quantized ComfyUI Linear, the fp32 (weight, bias) the file's tensors reconstruct.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from nunchaku_fixture import PYTHON_LEAVES, Dense, quantization_config, smoothing, w4a4

FAULTS = {"swap_w13"}  # the feed-forward's fused projection stored w1 ‖ w3 (gate first)
STACKS = ("context_refiner", "noise_refiner", "layers")

# ComfyUI name → diffusers name, outside the blocks and inside each block (16-bit tensors)
TOP = {"x_embedder": "all_x_embedder.2-1", "final_layer.linear": "all_final_layer.2-1.linear",
       "final_layer.adaLN_modulation.1": "all_final_layer.2-1.adaLN_modulation.1", "cap_embedder.0": "cap_embedder.0",
       "cap_embedder.1": "cap_embedder.1", "t_embedder.mlp.0": "t_embedder.mlp.0",
       "t_embedder.mlp.2": "t_embedder.mlp.2"}
BLOCK = {"attention.q_norm": "attention.norm_q", "attention.k_norm": "attention.norm_k",
         "attention_norm1": "attention_norm1", "attention_norm2": "attention_norm2", "ffn_norm1": "ffn_norm1",
         "ffn_norm2": "ffn_norm2", "adaLN_modulation.0": "adaLN_modulation.0"}


def zimage_checkpoint(model, path: str | Path, precision: str = "int4", rank: int = 32,
                      faults: set[str] | frozenset[str] = frozenset(), dtype: torch.dtype = torch.bfloat16) -> Dense:
    """Write the SVDQuant checkpoint of a dense ComfyUI Z-Image ``model`` (a BaseModel) to ``path``."""
    assert set(faults) <= FAULTS, set(faults) - FAULTS
    dm = model.diffusion_model
    tensors: dict[str, torch.Tensor] = {}
    expected: Dense = {}

    def quantized(prefix: str, weight: torch.Tensor) -> torch.Tensor:
        layer, dense_weight, _ = w4a4(weight, None, smoothing(weight, dtype), rank, precision, dtype)
        tensors.update({f"{prefix}.{PYTHON_LEAVES.get(leaf, leaf)}": v.contiguous() for leaf, v in layer.items()})
        return dense_weight

    def plain(module: torch.nn.Module, name: str) -> None:
        for leaf, value in module.named_parameters(recurse=False):
            tensors[f"{name}.{leaf}"] = value.detach().to(dtype).contiguous()

    for stack in STACKS:
        for i, block in enumerate(getattr(dm, stack)):
            c = f"{stack}.{i}"
            weight = {n: block.get_submodule(n).weight.detach().float()
                      for n in ("attention.qkv", "attention.out", "feed_forward.w1", "feed_forward.w2",
                                "feed_forward.w3")}
            expected[f"{c}.attention.qkv"] = (quantized(f"{c}.attention.to_qkv", weight["attention.qkv"]), None)
            expected[f"{c}.attention.out"] = (quantized(f"{c}.attention.to_out.0", weight["attention.out"]), None)
            hidden = weight["feed_forward.w1"].shape[0]
            first, second = ("w1", "w3") if "swap_w13" in faults else ("w3", "w1")
            fused = quantized(f"{c}.feed_forward.net.0.proj",
                              torch.cat([weight[f"feed_forward.{first}"], weight[f"feed_forward.{second}"]]))
            # what the file stands for: the halves as written (a fault's file puts the gate first)
            expected[f"{c}.feed_forward.{first}"] = (fused[:hidden], None)
            expected[f"{c}.feed_forward.{second}"] = (fused[hidden:], None)
            expected[f"{c}.feed_forward.w2"] = (quantized(f"{c}.feed_forward.net.2", weight["feed_forward.w2"]), None)
            for comfy_name, file_name in BLOCK.items():
                if stack != "context_refiner" or not comfy_name.startswith("adaLN"):  # no modulation there
                    plain(block.get_submodule(comfy_name), f"{c}.{file_name}")
    for comfy_name, file_name in TOP.items():
        plain(dm.get_submodule(comfy_name), file_name)
    for token in ("x_pad_token", "cap_pad_token"):
        if hasattr(dm, token):
            tensors[token] = getattr(dm, token).detach().to(dtype).contiguous()

    head = dm.dim // dm.n_heads
    config = {"_class_name": "ZImageTransformer2DModel", "all_patch_size": [dm.patch_size], "all_f_patch_size": [1],
              "in_channels": dm.in_channels, "dim": dm.dim, "n_layers": len(dm.layers),
              "n_refiner_layers": len(dm.noise_refiner), "n_heads": dm.n_heads,
              "n_kv_heads": dm.layers[0].attention.n_kv_heads, "norm_eps": dm.layers[0].attention_norm1.eps,
              "qk_norm": True, "cap_feat_dim": dm.cap_embedder[1].in_features, "rope_theta": dm.rope_embedder.theta,
              "t_scale": dm.time_scale, "axes_dims": list(dm.axes_dims), "axes_lens": list(dm.axes_lens)}
    assert sum(config["axes_dims"]) == head
    quantization = dict(json.loads(quantization_config(precision, rank)), skip_refiners=False)
    metadata = {"config": json.dumps(config), "model_class": "NunchakuZImageTransformer2DModel",
                "quantization_config": json.dumps(quantization)}
    save_file(tensors, str(path), metadata=metadata)
    return expected
