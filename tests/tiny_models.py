"""Small models with the real architectures (ComfyUI's own classes at small widths), their inputs,
and the real quantizer run over them. Used by the ComfyUI integration tests."""

from __future__ import annotations

import torch

import pack_import  # noqa: F401  (the pack as comfyui_svdquant, also for scripts that use these helpers)

TINY_FLUX = {
    "image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 32, "context_in_dim": 64,
    "hidden_size": 128, "mlp_ratio": 4.0, "num_heads": 2, "depth": 2, "depth_single_blocks": 2,
    "axes_dim": [16, 24, 24], "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": True,
}


def init_weights(module: torch.nn.Module, seed: int) -> None:
    """Deterministic weights of a trained model's scale: ComfyUI's ops leave them uninitialized."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith(("scale", "norm.weight")):  # FLUX's q/k norms ("weight" in newer ComfyUI)
                p.fill_(1.0)
            elif p.ndim >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) * 0.7 / fan_in**0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def flux_shapes(config: dict) -> dict[str, torch.Tensor]:
    """The parameters of a FLUX.1 file in ComfyUI's names (the layout every ComfyUI version loads), shapes
    only, for the dimensions in ``config``."""
    h, heads = config["hidden_size"], config["num_heads"]
    m, head = int(h * config["mlp_ratio"]), h // heads
    shapes = {"img_in": (h, config["in_channels"] * 4), "time_in.in_layer": (h, 256), "time_in.out_layer": (h, h),
              "vector_in.in_layer": (h, config["vec_in_dim"]), "vector_in.out_layer": (h, h),
              "txt_in": (h, config["context_in_dim"]), "final_layer.linear": (config["out_channels"] * 4, h),
              "final_layer.adaLN_modulation.1": (2 * h, h)}
    if config["guidance_embed"]:
        shapes.update({"guidance_in.in_layer": (h, 256), "guidance_in.out_layer": (h, h)})
    for i in range(config["depth"]):
        for s in ("img", "txt"):
            shapes.update({f"double_blocks.{i}.{s}_mod.lin": (6 * h, h), f"double_blocks.{i}.{s}_attn.qkv": (3 * h, h),
                           f"double_blocks.{i}.{s}_attn.proj": (h, h), f"double_blocks.{i}.{s}_mlp.0": (m, h),
                           f"double_blocks.{i}.{s}_mlp.2": (h, m)})
    for i in range(config["depth_single_blocks"]):
        shapes.update({f"single_blocks.{i}.modulation.lin": (3 * h, h), f"single_blocks.{i}.linear1": (3 * h + m, h),
                       f"single_blocks.{i}.linear2": (h, h + m)})
    out = {}
    for name, shape in shapes.items():
        out[f"{name}.weight"] = torch.empty(shape, device="meta")
        if not name.endswith("qkv") or config["qkv_bias"]:
            out[f"{name}.bias"] = torch.empty(shape[0], device="meta")
    norms = [f"double_blocks.{i}.{s}_attn.norm" for i in range(config["depth"]) for s in ("img", "txt")]
    norms += [f"single_blocks.{i}.norm" for i in range(config["depth_single_blocks"])]
    out.update({f"{n}.{q}_norm.scale": torch.empty(head, device="meta") for n in norms for q in ("query", "key")})
    return out


def meta_state_dict(model_class, **config) -> dict[str, torch.Tensor]:
    """The parameters of ComfyUI's ``model_class`` built with ``config`` on the meta device: its names, shapes
    only."""
    import comfy.ops

    return dict(model_class(**config, device="meta", operations=comfy.ops.disable_weight_init).state_dict())


def sdxl_shapes(config: dict) -> dict[str, torch.Tensor]:
    """The parameters of an SDXL-class UNet in ComfyUI's names, shapes only: ComfyUI's own UNetModel built
    on the meta device (its constructor arguments are the same in every supported ComfyUI version)."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    return meta_state_dict(UNetModel, **dict(config, num_heads=-1))


def comfy_model(architecture, shapes: dict, dtype: torch.dtype, seed: int, hint: dict | None = None):
    """A dense ComfyUI BaseModel for ``shapes``, its config derived by ComfyUI's detection as the pack does
    for a file, with deterministic random weights."""
    from comfyui_svdquant.loaders import detection

    model_config = detection.model_config(architecture, shapes, hint)
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({})
    init_weights(model.diffusion_model, seed)
    return model


def gains_near_one(model, seed: int, is_gain) -> None:
    """Set the diffusion model's norm gains (the parameters ``is_gain(name, parameter)`` selects) to 1 + 0.1·N(0, 1), as
    trained ones are: a random gain far from one would make the tiny model's activations unlike a real one's."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.diffusion_model.named_parameters():
            if is_gain(name, p):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))


def tiny_flux(seed: int = 0, dtype: torch.dtype = torch.bfloat16, **overrides):
    """A dense ComfyUI FLUX BaseModel (``comfy.ldm.flux.model.Flux`` inside) at a small width."""
    from comfyui_svdquant.loaders.flux import FluxArchitecture

    config = dict(TINY_FLUX, **overrides)
    return comfy_model(FluxArchitecture(), flux_shapes(config), dtype, seed, hint=config)


def flux_inputs(seed: int, config: dict | None = None, batch: int = 1, size: int = 16, tokens: int = 8,
                dtype: torch.dtype = torch.bfloat16) -> dict:
    config = config or TINY_FLUX
    g = torch.Generator().manual_seed(seed)
    out = {
        "x": torch.randn(batch, config["in_channels"], size, size, generator=g).to(dtype),
        "timestep": torch.rand(batch, generator=g),
        "context": torch.randn(batch, tokens, config["context_in_dim"], generator=g).to(dtype),
        "y": torch.randn(batch, config["vec_in_dim"], generator=g).to(dtype),
    }
    if config.get("guidance_embed", True):
        out["guidance"] = torch.full((batch,), 3.5)
    return out


def quantize(model, calls, config=None):
    """The pack's real quantizer over ``model`` with ``calls`` as calibration forwards: a new SVDQuant
    BaseModel sharing the source's 16-bit tensors."""
    import comfyui_svdquant.loaders.convert as convert
    from comfyui_svdquant.svdquant.quantizer import QuantizeConfig
    from comfyui_svdquant.svdquant.quantizer.model import quantize_blocks

    architecture, unet_config, _ = convert.blocks_of(model.diffusion_model)
    plan = convert.plan(architecture, unet_config)
    config = config or QuantizeConfig(rank=16, smooth_grid=(0.25, 0.5, 0.75), svd_rounds=3)
    modules, _ = quantize_blocks(model.diffusion_model, plan, calls, config, device="cpu")
    return convert.assemble(model, modules)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def mapping_errors(model, expected: dict) -> dict[str, float]:
    """Per quantized ComfyUI Linear of ``model``: the larger relative error of its dense weight and bias
    against ``expected[name] = (weight, bias)``; a bias where none is expected (or none where one is)
    counts as error 1. The quantized Linears must be exactly those of ``expected``."""
    from comfyui_svdquant.loaders.ops import quantized_ops

    ops = dict(quantized_ops(model.diffusion_model))
    assert set(ops) == set(expected)
    out = {}
    for name, op in ops.items():
        weight, bias = op.quantized.to_dense()
        want_weight, want_bias = expected[name]
        if bias is None or want_bias is None:
            bias_error = float((bias is None) != (want_bias is None))
        else:
            bias_error = relative_error(bias, want_bias)
        out[name] = max(relative_error(weight, want_weight), bias_error)
    return out


# An SDXL-class UNet (ComfyUI's supported_models.SDXL, openaimodel.UNetModel) at a small width. Level 1
# is 64 channels wide, so its linears are padded to 128 as SDXL's 320-wide ones would be; SDXL's
# heads are 64 wide at every level. ComfyUI's table of models matches only the real SDXL shape, so the
# config ComfyUI detects builds the SDXL class the pack falls back to (loaders/detection.py).
TINY_SDXL = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "num_classes": "sequential", "adm_in_channels": 32, "in_channels": 4, "model_channels": 32,
    "num_res_blocks": [1, 1, 1], "transformer_depth": [0, 1, 1], "channel_mult": [1, 2, 4],
    "transformer_depth_middle": 1, "use_linear_in_transformer": True, "context_dim": 64, "num_head_channels": 64,
    "transformer_depth_output": [0, 0, 1, 1, 1, 1], "use_temporal_attention": False, "use_temporal_resblock": False,
}


def tiny_sdxl(seed: int = 0, dtype: torch.dtype = torch.bfloat16, **overrides):
    """A dense ComfyUI SDXL BaseModel (``UNetModel`` inside) at a small width."""
    from comfyui_svdquant.loaders.sdxl import SDXLArchitecture

    model = comfy_model(SDXLArchitecture(), sdxl_shapes(dict(TINY_SDXL, **overrides)), dtype, seed)
    norms = {name for name, m in model.diffusion_model.named_modules()
             if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and m.weight is not None}
    gains_near_one(model, seed, lambda name, _: name.endswith(".weight") and name.removesuffix(".weight") in norms)
    return model


def sdxl_inputs(seed: int, config: dict | None = None, batch: int = 1, size: int = 16, tokens: int = 8,
                dtype: torch.dtype = torch.bfloat16) -> dict:
    """Keyword arguments of ``UNetModel.forward``: latent, timesteps, text context and the pooled vector."""
    config = config or TINY_SDXL
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(batch, config["in_channels"], size, size, generator=g).to(dtype),
        "timesteps": torch.randint(0, 1000, (batch,), generator=g).float(),
        "context": torch.randn(batch, tokens, config["context_dim"], generator=g).to(dtype),
        "y": torch.randn(batch, config["adm_in_channels"], generator=g).to(dtype),
    }
