"""LoRA on SVDQuant Qwen-Image in the real ComfyUI: ComfyUI's LoraLoaderModelOnly and the pack's LoRA Stack,
with LoRA files in the key styles people publish for Qwen-Image, over every kind of quantized layer (q/k/v
row slices of the fused projections, W4A16 modulations with interleaved outputs, GELU-input MLP layers)
and 16-bit ones.

As in test_lora.py: layer by layer, a LoRA on a quantized layer changes its output exactly as ComfyUI's
dense patch changes the dequantized layer; and the whole model with the LoRA differs from the 16-bit model
with the same LoRA by no more than the 4-bit model differs from the 16-bit model without it.
"""

from __future__ import annotations

import pytest
import torch
from qwen_fixture import qwen_checkpoint
from test_lora import (
    LAYER_TOLERANCE,
    assert_16bit_layers_dense_patched,
    cpu_patchers,
    dequantize,
    layer_errors,
    lora_against_16bit,
    lora_only,
    patched,
    stack,
    write_lora,
)
from tiny_qwen import TINY_QWEN, qwen_inputs, tiny_qwen

H = TINY_QWEN["attention_head_dim"] * TINY_QWEN["num_attention_heads"]
M = 4 * H
TXT = TINY_QWEN["joint_attention_dim"]
IMG = TINY_QWEN["in_channels"]
STRENGTH = 2.0  # a few layers of the model: a strong LoRA, for an effect well above the quantization error

# Each style's (tensor naming in test_lora.LORA_NAMES, alpha, layers): diffusers / PEFT (trainers built on
# diffusers, the Lightning LoRAs' layer names), kohya-style (musubi-tuner, ai-toolkit's ComfyUI export),
# ComfyUI's own names, and LyCORIS as SimpleTuner writes it.
FORMATS = {
    "diffusers": ("peft", None, {
        "transformer.transformer_blocks.0.attn.to_q": (H, H),
        "transformer.transformer_blocks.0.attn.to_k": (H, H),
        "transformer.transformer_blocks.1.attn.add_v_proj": (H, H),
        "transformer.transformer_blocks.0.attn.to_out.0": (H, H),
        "transformer.transformer_blocks.1.img_mlp.net.2": (H, M),
        "transformer.transformer_blocks.1.txt_mod.1": (6 * H, H),
        "transformer.img_in": (H, IMG),
    }),
    "lightning": ("kohya", None, {
        "transformer_blocks.0.attn.add_q_proj": (H, H),
        "transformer_blocks.0.attn.to_v": (H, H),
        "transformer_blocks.0.img_mod.1": (6 * H, H),
        "transformer_blocks.0.img_mlp.net.0.proj": (M, H),
        "transformer_blocks.1.txt_mlp.net.0.proj": (M, H),
    }),
    "kohya": ("kohya", 8.0, {
        "lora_unet_transformer_blocks_0_attn_to_v": (H, H),
        "lora_unet_transformer_blocks_0_attn_add_k_proj": (H, H),
        "lora_unet_transformer_blocks_0_attn_to_add_out": (H, H),
        "lora_unet_transformer_blocks_0_txt_mlp_net_2": (H, M),
        "lora_unet_transformer_blocks_1_img_mod_1": (6 * H, H),
        "lora_unet_txt_in": (H, TXT),
    }),
    "comfyui": ("peft", None, {
        "diffusion_model.transformer_blocks.1.attn.to_q": (H, H),
        "diffusion_model.transformer_blocks.0.img_mlp.net.0.proj": (M, H),
        "diffusion_model.transformer_blocks.0.txt_mod.1": (6 * H, H),
        "diffusion_model.proj_out": (IMG, H),
    }),
    "lycoris": ("kohya", 4.0, {
        "lycoris_transformer_blocks_0_attn_add_v_proj": (H, H),
        "lycoris_transformer_blocks_0_img_mlp_net_2": (H, M),
        "lycoris_transformer_blocks_1_img_mlp_net_2": (H, M),
    }),
}


@pytest.fixture(scope="module")
def models(comfy, tmp_path_factory):
    """(tiny SVDQuant Qwen-Image from a file in the authors' layout, its dequantized fp32 twin, the 16-bit
    model it was made from)."""
    pytest.importorskip("comfy.ldm.qwen_image.model", reason="this ComfyUI has no Qwen-Image model class")
    from comfyui_svdquant.loaders.load import load_checkpoint

    dense = tiny_qwen(seed=0)
    path = tmp_path_factory.mktemp("qwen") / "svdq-int4_r32-tiny-qwen-image.safetensors"
    qwen_checkpoint(dense, path, rank=32)
    model = load_checkpoint(path, "bfloat16", "torch").model
    return model, dequantize(model), dense


@pytest.fixture
def patchers(models):
    """SVDQuant, dequantized fp32 and 16-bit ModelPatchers; everything they patched is undone afterwards."""
    with cpu_patchers(*models) as made:
        yield made


def run(patcher, seed: int, dtype: torch.dtype) -> torch.Tensor:
    inputs = qwen_inputs(seed, edit=seed % 2 == 1, dtype=dtype)
    with torch.no_grad():
        return patcher.model.diffusion_model(**inputs).float()


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_comfy_lora_loader_matches_the_16bit_model_with_the_lora(fmt, patchers, model_folders, caplog):
    style, alpha, layers = FORMATS[fmt]
    name = write_lora(model_folders["loras"], f"{fmt}.safetensors", layers, style, seed=1, alpha=alpha)
    error = lora_against_16bit(patchers, name, STRENGTH, len(layers),
                               lambda p, fp32: run(p, 3, torch.float32 if fp32 else torch.bfloat16), caplog)
    assert error["lora"] > 4 * error["quantization"]  # the LoRA changes the model visibly
    # With the LoRA the 4-bit model stays about as far from the 16-bit one as without it (measured 1.0-1.3×: the
    # LoRA's larger activations meet the 4-bit activation rounding); the branch itself adds no error.
    assert error["with_lora"] < 2 * error["quantization"]
    assert error["dequantized"] < 2.5 * error["dequantized_base"]


def test_stack_node_agrees_with_comfys_loader_and_refuses_a_flux_lora(patchers, model_folders):
    from test_lora import FORMATS as FLUX_FORMATS

    from comfyui_svdquant.svdquant.errors import SVDQuantError

    folder = model_folders["loras"]
    a = write_lora(folder, "a.safetensors", FORMATS["kohya"][2], "kohya", seed=2, alpha=2.0)
    b = write_lora(folder, "b.safetensors", FORMATS["diffusers"][2], "peft", seed=3)
    flux = write_lora(folder, "flux.safetensors", FLUX_FORMATS["kohya"][2], "kohya")
    q, d, _ = patchers
    stacked = stack(q, [(a, 0.7), ("None", 1.0), (b, -1.3)])
    chained = lora_only(lora_only(q, a, 0.7), b, -1.3)
    d_lora = lora_only(lora_only(d, a, 0.7), b, -1.3)
    with patched(chained):
        expected = run(chained, 4, torch.bfloat16)
    with patched(stacked, d_lora):
        assert torch.equal(run(stacked, 4, torch.bfloat16), expected)
        errors = layer_errors(stacked, d_lora)
        sixteen_bit = assert_16bit_layers_dense_patched(stacked, d_lora)
    assert len(errors) + sixteen_bit == len(stacked.patches) and sixteen_bit == 2
    assert max(errors.values()) < LAYER_TOLERANCE, errors
    with pytest.raises(SVDQuantError, match="LoRA 'flux.safetensors' matches no layer of this Qwen-Image model"):
        stack(q, [(flux, 1.0)])
