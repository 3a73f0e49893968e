"""LoRA on SVDQuant Z-Image in the real ComfyUI: ComfyUI's LoraLoaderModelOnly and the pack's LoRA stack,
in the key styles Z-Image LoRAs are published in, against the same LoRA on the dequantized model (layer by
layer: exact to bf16 rounding) and on the original 16-bit model (whole model: no further from it than the
4-bit model without the LoRA). The 4-bit model is the authors' layout (tests/zimage_fixture.py) read by
the loader: w1 / w3 are row slices of one fused layer, q / k / v one fused layer LoRAs address in thirds."""

from __future__ import annotations

import pytest
import torch
from test_lora import (
    cpu_patchers,
    dequantize,
    lora_against_16bit,
    lora_only,
    patched,
    run,
    stack,
    write_lora,
)

from tiny_zimage import TINY_ZIMAGE, tiny_zimage, zimage_inputs
from zimage_fixture import zimage_checkpoint

D = TINY_ZIMAGE["dim"]
F = 768  # the feed-forward width NextDiT gives 256 · 8/3
IMG = TINY_ZIMAGE["in_channels"] * 4

# ComfyUI's Z-Image key map (comfy/lora.py: z_image_to_diffusers for Lumina2 models, and the generic names):
# the diffusers names of ai-toolkit / diffusers PEFT files, under either prefix; kohya-style names; the
# ComfyUI names; LyCORIS names. q / k / v address thirds of the fused qkv, w1 / w3 row slices of the file's
# fused feed-forward, x_embedder and the modulation are 16-bit.
FORMATS = {
    "diffusers": ("peft", None, {
        "diffusion_model.layers.0.attention.to_q": (D, D),
        "diffusion_model.layers.0.attention.to_v": (D, D),
        "diffusion_model.layers.1.attention.to_k": (D, D),
        "diffusion_model.layers.1.attention.to_out.0": (D, D),
        "diffusion_model.layers.0.feed_forward.w1": (F, D),
        "diffusion_model.layers.1.feed_forward.w3": (F, D),
        "diffusion_model.layers.1.feed_forward.w2": (D, F),
        "diffusion_model.noise_refiner.0.attention.to_k": (D, D),
        "diffusion_model.layers.1.adaLN_modulation.0": (4 * D, 256),
    }),
    "diffusers-transformer": ("peft", None, {
        "transformer.layers.1.attention.to_q": (D, D),
        "transformer.context_refiner.1.feed_forward.w2": (D, F),
        "transformer.context_refiner.0.attention.to_out.0": (D, D),
        "transformer.layers.0.feed_forward.w3": (F, D),
    }),
    "kohya": ("kohya", 2.0, {
        "lora_unet_layers_0_attention_qkv": (3 * D, D),
        "lora_unet_layers_1_attention_out": (D, D),
        "lora_unet_layers_1_feed_forward_w1": (F, D),
        "lora_unet_noise_refiner_1_feed_forward_w2": (D, F),
        "lora_unet_x_embedder": (D, IMG),
    }),
    "comfyui": ("peft", None, {
        "diffusion_model.layers.1.attention.qkv": (3 * D, D),
        "diffusion_model.context_refiner.0.feed_forward.w3": (F, D),
        "diffusion_model.layers.0.attention.out": (D, D),
        "diffusion_model.noise_refiner.1.feed_forward.w1": (F, D),
    }),
    "lycoris": ("kohya", 4.0, {
        "lycoris_layers_1_attention_to_v": (D, D),
        "lycoris_layers_0_feed_forward_w2": (D, F),
        "lycoris_noise_refiner_0_feed_forward_w3": (F, D),
    }),
}


@pytest.fixture(scope="module")
def models(comfy, tmp_path_factory):
    """(4-bit model from the authors' layout, its dequantized fp32 twin, the original 16-bit model in fp32)."""
    import comfy.supported_models

    from comfyui_svdquant.loaders.load import load_checkpoint

    if not hasattr(comfy.supported_models, "ZImage"):
        pytest.skip("this ComfyUI has no Z-Image (supported_models.ZImage: ComfyUI 0.8.0 and newer)")
    dense = tiny_zimage(seed=0)
    path = tmp_path_factory.mktemp("zimage") / "svdq-int4_r32-tiny-z-image.safetensors"
    zimage_checkpoint(dense, path, rank=32)
    model = load_checkpoint(path, "bfloat16", "torch").model
    return model, dequantize(model), dense


@pytest.fixture
def patchers(models):
    """(SVDQuant ModelPatcher, dequantized ModelPatcher, 16-bit ModelPatcher); their patches undone afterwards."""
    with cpu_patchers(*models) as made:
        yield made


def inputs(seed: int) -> tuple[dict, dict]:
    bf16 = zimage_inputs(seed)
    return bf16, {k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in bf16.items()}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_lora_on_the_4bit_model_is_as_close_as_quantization_alone(fmt, patchers, model_folders, caplog):
    style, alpha, layers = FORMATS[fmt]
    name = write_lora(model_folders["loras"], f"{fmt}.safetensors", layers, style, seed=1, alpha=alpha)
    bf16, fp32 = inputs(3)
    error = lora_against_16bit(patchers, name, 3.0, len(layers), lambda p, precise: run(p, fp32 if precise else bf16),
                               caplog)
    assert error["lora"] > 2 * error["quantization"]  # the LoRA changes the image visibly
    assert error["with_lora"] < 1.25 * error["quantization"]  # and adds no error of its own
    assert error["dequantized"] < 2.5 * error["dequantized_base"]


def test_stack_node_matches_comfys_loader_and_refuses_a_flux_lora(patchers, model_folders):
    from test_lora import FORMATS as FLUX_FORMATS

    from comfyui_svdquant.svdquant.errors import SVDQuantError

    folder = model_folders["loras"]
    a = write_lora(folder, "a.safetensors", FORMATS["kohya"][2], "kohya", seed=11, alpha=2.0)
    b = write_lora(folder, "b.safetensors", FORMATS["diffusers"][2], "peft", seed=12)
    flux = write_lora(folder, "flux.safetensors", FLUX_FORMATS["kohya"][2], "kohya")
    q, _, _ = patchers
    stacked = stack(q, [(a, 0.6), ("None", 1.0), (b, -0.8)])
    chained = lora_only(lora_only(q, a, 0.6), b, -0.8)
    bf16, _ = inputs(12)
    with patched(chained):
        expected = run(chained, bf16)
    with patched(stacked):
        assert torch.equal(run(stacked, bf16), expected)
    with pytest.raises(SVDQuantError, match="LoRA 'flux.safetensors' .*this Z-Image model.*for another model"):
        stack(q, [(flux, 1.0)])
