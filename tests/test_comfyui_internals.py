"""The ComfyUI internals the pack relies on, in the running ComfyUI version (every supported tree runs this
file): model detection, the weight ComfyUI sees, model merging, hook LoRAs, the memory estimate, and the
patches of streamed layers under dynamic VRAM. Each behaviour is compared with the 16-bit model the 4-bit
one came from."""

from __future__ import annotations

import pytest
import torch

from tiny_models import TINY_FLUX, flux_inputs, quantize, relative_error, tiny_flux

LAYER = "double_blocks.0.img_attn.qkv"


@pytest.fixture(scope="module")
def pair(comfy):
    """(SVDQuant ModelPatcher, the 16-bit ModelPatcher it was quantized from)."""
    import comfy.model_patcher

    from comfyui_svdquant.loaders.patcher import SVDQuantModelPatcher

    dense = tiny_flux(seed=11, depth=1, depth_single_blocks=1)
    calls = [lambda s=s: dense.diffusion_model(**flux_inputs(s, dense.model_config.unet_config)) for s in range(2)]
    cpu = torch.device("cpu")
    return SVDQuantModelPatcher(quantize(dense, calls), cpu, cpu), comfy.model_patcher.ModelPatcher(dense, cpu, cpu)


def run(patcher, seed: int = 3) -> torch.Tensor:
    """One forward of the patched diffusion model (patches applied as ComfyUI applies them, then undone)."""
    patcher.patch_model()
    try:
        return patcher.model.diffusion_model(**flux_inputs(seed, patcher.model.model_config.unet_config)).float()
    finally:
        patcher.unpatch_model()


def lora_file(patcher, rank: int = 4, seed: int = 5) -> dict[str, torch.Tensor]:
    """A LoRA in ComfyUI's key style on every Linear of the first double block's image attention and MLP."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in (LAYER, "double_blocks.0.img_mlp.0", "double_blocks.0.img_attn.proj"):
        n, k = patcher.model.diffusion_model.get_submodule(name).weight.shape
        out[f"diffusion_model.{name}.lora_up.weight"] = (torch.randn(n, rank, generator=g) * 0.2).bfloat16()
        out[f"diffusion_model.{name}.lora_down.weight"] = (torch.randn(rank, k, generator=g) * 0.2).bfloat16()
    return out


def with_lora(patcher, lora: dict, strength: float = 1.0):
    import comfy.sd

    model, _ = comfy.sd.load_lora_for_models(patcher, None, lora, strength, 0.0)
    return model


# --- model detection -----------------------------------------------------------------------------------------


def test_detection_gives_comfyuis_own_config_for_real_flux_and_sdxl(comfy):
    """At the published sizes the pack's config is ComfyUI's own, field for field (nothing corrected)."""
    import comfy.model_detection
    import comfy.supported_models

    from comfyui_svdquant.loaders import detection
    from comfyui_svdquant.loaders.flux import FluxArchitecture
    from comfyui_svdquant.loaders.sdxl import SDXLArchitecture
    from tiny_models import flux_shapes, sdxl_shapes

    flux_dev = dict(TINY_FLUX, hidden_size=3072, num_heads=24, depth=19, depth_single_blocks=38, vec_in_dim=768,
                    context_in_dim=4096, axes_dim=[16, 56, 56])
    shapes = flux_shapes(flux_dev)
    config = detection.model_config(FluxArchitecture(), shapes)
    assert type(config) is comfy.supported_models.Flux
    assert config.unet_config == comfy.model_detection.model_config_from_unet(shapes, "").unet_config

    sdxl = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
            "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
            "model_channels": 320, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
            "channel_mult": [1, 2, 4], "transformer_depth_middle": 10, "use_linear_in_transformer": True,
            "context_dim": 2048, "num_head_channels": 64, "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
            "use_temporal_attention": False, "use_temporal_resblock": False}
    shapes = sdxl_shapes(sdxl)
    config = detection.model_config(SDXLArchitecture(), shapes)
    assert type(config) is comfy.supported_models.SDXL
    assert config.unet_config == comfy.model_detection.model_config_from_unet(shapes, "").unet_config


def test_a_comfyui_older_than_supported_is_named(comfy, monkeypatch):
    from comfyui_svdquant.loaders import compat
    from comfyui_svdquant.svdquant.errors import SVDQuantError

    compat.check_version()  # the running tree is supported
    monkeypatch.setattr(compat, "version", lambda: (0, 3, 40))
    with pytest.raises(SVDQuantError, match=r"needs ComfyUI 0\.3\.64 or newer; this is 0\.3\.40"):
        compat.check_version()


# --- the weight ComfyUI sees ---------------------------------------------------------------------------------


def test_weight_has_the_logical_shape_and_no_bytes_of_its_own(pair):
    import comfy.model_management

    q, d = pair
    op = q.model.diffusion_model.get_submodule(LAYER)
    dense = d.model.diffusion_model.get_submodule(LAYER).weight.detach()
    assert op.weight.shape == dense.shape and op.weight.dtype == dense.dtype
    assert torch.equal(op.weight.to(torch.float32), op.quantized.to_dense()[0])  # exact, not via bf16
    assert relative_error(op.weight.to(torch.float32), dense) < 0.1  # the 4-bit layer's weight, dequantized
    packed = sum(b.nbytes for b in op.quantized.buffers())
    assert comfy.model_management.module_size(op) == packed
    with pytest.raises(Exception, match="low-rank branch"):
        op.weight.copy_(dense)


# --- model merging -------------------------------------------------------------------------------------------


def merge(model1, model2, ratio: float):
    from comfy_extras.nodes_model_merging import ModelMergeSimple

    return ModelMergeSimple().merge(model1, model2, ratio)[0]  # a tuple (V1 node) or NodeOutput (V3, v0.38)


def test_self_merge_leaves_the_output_unchanged(pair):
    q, d = pair
    assert torch.equal(run(merge(q, q, 0.5)), run(q))
    assert torch.equal(run(merge(d, d, 0.5)), run(d))  # what the 16-bit model does


def test_merging_with_the_16bit_model_moves_towards_it(pair):
    """0.5 · 4-bit + 0.5 · 16-bit: half the 16-bit model's difference is absorbed into the branch (a truncated
    SVD of the adapter rank, 64 here, of a layer only 128 wide), so the output moves towards the 16-bit
    model's: halfway at most, less what the truncation leaves out."""
    q, d = pair
    reference = run(d)
    error = relative_error(run(q), reference)
    merged = relative_error(run(merge(q, d, 0.5)), reference)
    assert 0.45 * error < merged < 0.9 * error, (merged, error)  # measured: 0.81


# --- hook LoRAs ----------------------------------------------------------------------------------------------


def run_hooked(patcher, lora: dict, strength: float) -> torch.Tensor:
    """One forward with ``lora`` as a hook LoRA (Create Hook LoRA → conditioning hooks), as the sampler
    applies it: registered on a clone, patched for the step, unpatched after."""
    import comfy.hooks

    hooks = comfy.hooks.create_hook_lora(lora, strength_model=strength, strength_clip=0.0)
    hooked = patcher.clone()
    hooked.register_all_hook_patches(hooks, comfy.hooks.create_target_dict(comfy.hooks.EnumWeightTarget.Model))
    hooked.patch_hooks(hooks)
    try:
        return hooked.model.diffusion_model(**flux_inputs(3, hooked.model.model_config.unet_config)).float()
    finally:
        hooked.unpatch_hooks()


def test_hook_lora_acts_on_the_4bit_layers_as_a_lora_does(pair):
    from comfyui_svdquant.loaders.ops import quantized_ops

    q, d = pair
    lora = lora_file(q)
    for strength in (1.0, 0.5):
        hooked, plain = run_hooked(q, lora, strength), run(with_lora(q, lora, strength))
        assert relative_error(hooked, plain) < 1e-3, strength
        assert relative_error(hooked, run(q)) > 0.02 * strength  # the LoRA does change the output
        # against the 16-bit model with the same hook: within the quantization error alone
        dense_hooked = run_hooked(d, lora, strength)
        assert relative_error(hooked, dense_hooked) < 2 * relative_error(run(q), run(d)) + 1e-3
    assert all(op.hook_patches is None for _, op in quantized_ops(q.model.diffusion_model))  # unpatched after


# --- memory estimate -----------------------------------------------------------------------------------------


def test_lora_branch_is_in_the_memory_estimate(pair):
    from comfyui_svdquant.loaders.ops import quantized_ops

    q, d = pair
    lora = lora_file(q, rank=8)
    q_lora, d_lora = with_lora(q, lora), with_lora(d, lora)
    assert d_lora.model_size() == d.model_size()  # a 16-bit model merges a LoRA into weights it has
    estimate = q_lora.model_size() - q.model_size()
    q_lora.patch_model()
    try:
        before = {name: sum(b.nbytes for n, b in op.quantized.named_buffers() if "proj" in n or "lora" in n)
                  for name, op in quantized_ops(q_lora.model.diffusion_model)}
        q_lora.model.diffusion_model(**flux_inputs(3, q_lora.model.model_config.unet_config))
        grown = 0
        for name, op in quantized_ops(q_lora.model.diffusion_model):
            if op._branch_cache is not None:
                grown += sum(t.nbytes for leaf in op._branch_cache[2].values() for t in leaf.values()) - before[name]
    finally:
        q_lora.unpatch_model()
    assert grown > 0 and estimate == grown


# --- dynamic VRAM (v0.33+) -----------------------------------------------------------------------------------


def test_patches_of_streamed_layers_under_dynamic_vram_are_applied(pair):
    """ModelPatcherDynamic attaches a streamed layer's patches as ``weight_lowvram_function`` (v0.33+; it
    needs a GPU to run, so its setup is reproduced here): the layer applies them as the LoRA they are."""
    import comfy.model_patcher

    from comfyui_svdquant.loaders.ops import quantized_ops

    q, _ = pair
    lora_model = with_lora(q, lora_file(q))
    expected = run(lora_model)
    ops = dict(quantized_ops(lora_model.model.diffusion_model))
    try:
        for name, op in ops.items():
            key = f"diffusion_model.{name}.weight"
            op.weight_lowvram_function = comfy.model_patcher.LowVramPatch(key, lora_model.patches) \
                if key in lora_model.patches else None
        streamed = lora_model.model.diffusion_model(**flux_inputs(3, lora_model.model.model_config.unet_config))
    finally:
        for op in ops.values():
            op.weight_lowvram_function = None
    assert torch.equal(streamed.float(), expected)
