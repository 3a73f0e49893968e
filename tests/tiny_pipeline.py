"""Every file an example workflow loads, at a size that runs on a CPU in seconds: text encoders, VAEs,
16-bit and SVDQuant diffusion models, under the names the workflows use.

What ComfyUI's own loaders need, and the one thing they are taught here:
- Text encoders are ComfyUI's own classes (``comfy.clip_model.CLIPTextModel``, ``comfy.text_encoders.t5.T5``,
  ``comfy.text_encoders.llama.Qwen3_4B``)
  with random weights at a small width, saved with the key names of the published files, and loaded by
  ComfyUI's ``DualCLIPLoader`` / ``CLIPLoader`` with ComfyUI's tokenizers. ComfyUI v0.3.x builds them at the
  published sizes from fixed configs (CLIP-L 123M, CLIP-G 695M, T5-XXL 4.7B parameters) and reads only the
  position-embedding length from the file (``comfy.text_encoders.long_clipl.model_options_long_clip``, which
  sets the per-encoder ``<name>_model_config`` option). :func:`install_size_inference` extends that function to
  read every size from the file's tensor shapes, so the small files load at their own size.
- 16-bit FLUX files load through ComfyUI's ``UNETLoader``. v0.3.x detects FLUX with a fixed width (hidden 3072,
  24 heads, text width 4096); newer ComfyUI reads the width from ``img_in`` and takes heads = width / 128,
  which :func:`install_size_inference` does for v0.3.x. The small FLUX therefore keeps FLUX.1's head size 128.
- VAEs are TAESD-architecture files (ComfyUI's own ``comfy.taesd``), which ``VAELoader`` detects by their keys
  and sizes by their latent channels. Their decoder is built, not random: it shows latent channels 0-2 as
  red/green/blue, upsampled 8x, so the decoded image is a picture of the sampled latent.
- SVDQuant FLUX files are made by the pack's real quantizer from the 16-bit FLUX. The SDXL file stands in for
  nunchaku's published ``svdq-int4_r32-sdxl.safetensors`` and is written in nunchaku's layout by the test
  fixture that packs like nunchaku (``nunchaku_fixture.sdxl_checkpoint``): quantizing SDXL takes minutes here.
  The Z-Image-Turbo file is the authors' layout too (``zimage_fixture``); it and its Qwen3 text encoder are
  written only where ComfyUI has Z-Image, and ComfyUI tells Qwen3-4B by its width, which
  :func:`install_size_inference` extends to the small one.
- Qwen-Image's files (its Qwen2.5-VL text encoder, Wan VAE, SVDQuant files and the Edit workflow's picture)
  and the sizes ComfyUI is taught for them: see tiny_qwen_pipeline.py.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import tiny_qwen_pipeline
import torch

from tiny_models import TINY_FLUX, TINY_SDXL, flux_inputs
from tiny_zimage import write_qwen3, write_svdquant_zimage

# FLUX.1's layout at width 128: one head of FLUX.1's size (128 = 16 + 56 + 56 rotary axes), the text width
# of the small T5 below and the pooled width of the small CLIP-L.
PIPELINE_FLUX = dict(TINY_FLUX, num_heads=1, axes_dim=[16, 56, 56], context_in_dim=64, vec_in_dim=32)
CLIP_L = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "projection_dim": 32}
# ComfyUI tells CLIP-G from CLIP-L by a 31st layer (text_model.encoder.layers.30): a narrow but deep CLIP-G.
CLIP_G = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 32, "projection_dim": 32}
T5 = {"d_model": 64, "d_ff": 128, "num_layers": 2}
# SDXL's text context is CLIP-L ‖ CLIP-G; its class vector the pooled CLIP-G plus six 256-wide size embeddings.
PIPELINE_SDXL = dict(TINY_SDXL, context_dim=CLIP_L["hidden_size"] + CLIP_G["hidden_size"],
                     adm_in_channels=CLIP_G["projection_dim"] + 6 * 256)
HEAD_SIZE = 64  # text encoders: heads of the published models' size (CLIP and T5 alike); narrower: one head
FLUX_HEAD_SIZE = 128


# --- teaching ComfyUI v0.3.x to size models from their tensors --------------------------------------------


def text_encoder_config(sd: dict[str, torch.Tensor]) -> tuple[str, dict] | None:
    """(model name, config entries) of a CLIP, Qwen3 or T5 text encoder, read from its tensor shapes."""
    if "text_model.encoder.layers.0.mlp.fc1.weight" in sd:
        layers = _count(sd, "text_model.encoder.layers.{}.mlp.fc1.weight")
        hidden = sd["text_model.embeddings.token_embedding.weight"].shape[1]
        config = {"hidden_size": hidden, "num_hidden_layers": layers,
                  "num_attention_heads": max(1, hidden // HEAD_SIZE),
                  "intermediate_size": sd["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]}
        if "text_projection.weight" in sd:
            config["projection_dim"] = sd["text_projection.weight"].shape[0]
        return ("clip_g" if layers > 30 else "clip_l"), config
    if "model.layers.0.self_attn.q_norm.weight" in sd and "model.layers.0.post_feedforward_layernorm.weight" not in sd:
        head = sd["model.layers.0.self_attn.q_norm.weight"].shape[0]  # Qwen3 (Gemma 3 has post-feed-forward norms)
        return "qwen3_4b", {"vocab_size": sd["model.embed_tokens.weight"].shape[0],
                            "hidden_size": sd["model.embed_tokens.weight"].shape[1],
                            "num_hidden_layers": _count(sd, "model.layers.{}.self_attn.q_norm.weight"),
                            "num_attention_heads": sd["model.layers.0.self_attn.q_proj.weight"].shape[0] // head,
                            "num_key_value_heads": sd["model.layers.0.self_attn.k_proj.weight"].shape[0] // head,
                            "intermediate_size": sd["model.layers.0.mlp.gate_proj.weight"].shape[0]}
    if "encoder.block.0.layer.0.SelfAttention.q.weight" in sd:
        inner, d_model = sd["encoder.block.0.layer.0.SelfAttention.q.weight"].shape
        heads = max(1, inner // HEAD_SIZE)
        layers = _count(sd, "encoder.block.{}.layer.0.SelfAttention.q.weight")
        return "t5xxl", {"d_model": d_model, "num_layers": layers, "num_heads": heads, "d_kv": inner // heads,
                         "d_ff": sd["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"].shape[0]}
    return None


def flux_config_from_shapes(config: dict, sd: dict, prefix: str) -> dict:
    """What newer ComfyUI reads from a FLUX state dict and v0.3.x fixes at FLUX.1's size."""
    hidden = sd[prefix + "img_in.weight"].shape[0]
    return dict(config, hidden_size=hidden, num_heads=hidden // FLUX_HEAD_SIZE,
                context_in_dim=sd[prefix + "txt_in.weight"].shape[1],
                mlp_ratio=sd[prefix + "double_blocks.0.img_mlp.0.weight"].shape[0] / hidden)


def install_size_inference() -> Callable[[], None]:
    """Wrap ComfyUI's two sizing hooks (see the module docstring); returns the function that undoes it."""
    import comfy.model_detection
    import comfy.sd
    import comfy.text_encoders.long_clipl as long_clipl

    original_options, original_detect = long_clipl.model_options_long_clip, comfy.model_detection.detect_unet_config
    original_te = comfy.sd.detect_te_model

    @functools.wraps(original_options)
    def model_options(sd, tokenizer_data, model_options):
        tokenizer_data, model_options = original_options(sd, tokenizer_data, model_options)
        found = text_encoder_config(sd)
        if found is not None:
            name, config = found
            model_options = dict(model_options)
            model_options[f"{name}_model_config"] = {**model_options.get(f"{name}_model_config", {}), **config}
        return tokenizer_data, model_options

    @functools.wraps(original_detect)
    def detect(state_dict, key_prefix, *args, **kwargs):
        config = original_detect(state_dict, key_prefix, *args, **kwargs)
        if config is not None and config.get("image_model") == "flux" and key_prefix + "img_in.weight" in state_dict:
            config = flux_config_from_shapes(config, state_dict, key_prefix)
        return config

    @functools.wraps(original_te)
    def detect_te(sd):  # ComfyUI tells Qwen3-4B by its 2560 width
        found = text_encoder_config(sd)
        if found is not None and found[0] == "qwen3_4b" and hasattr(comfy.sd.TEModel, "QWEN3_4B"):
            return comfy.sd.TEModel.QWEN3_4B
        return original_te(sd)

    long_clipl.model_options_long_clip, comfy.model_detection.detect_unet_config = model_options, detect
    comfy.sd.detect_te_model = detect_te
    undo_qwen = tiny_qwen_pipeline.install_sizing()  # Qwen-Image's text encoder and VAE

    def undo() -> None:
        long_clipl.model_options_long_clip, comfy.model_detection.detect_unet_config = original_options, original_detect
        comfy.sd.detect_te_model = original_te
        undo_qwen()

    return undo


def _count(sd: dict, pattern: str) -> int:
    n = 0
    while pattern.format(n) in sd:
        n += 1
    return n


# --- text encoders and VAEs ---------------------------------------------------------------------------------


def _init_encoder(module: torch.nn.Module, seed: int) -> None:
    """Random weights that keep activations of order one: unit norms, small embeddings, scaled matrices."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            elif "embedding" in name or name.startswith("shared") or name.endswith("relative_attention_bias.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def _save(sd: dict[str, torch.Tensor], path: Path) -> Path:
    import comfy.utils

    path.parent.mkdir(parents=True, exist_ok=True)
    comfy.utils.save_torch_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def write_clip(path: Path, sizes: dict = CLIP_L, seed: int = 1) -> Path:
    """A CLIP text encoder (CLIP-L or, with 31+ layers, CLIP-G) as ``clip_l.safetensors`` files store it."""
    import json

    import comfy.clip_model
    import comfy.ops

    base = "clip_config_bigg.json" if sizes["num_hidden_layers"] > 30 else "sd1_clip_config.json"
    with open(Path(comfy.clip_model.__file__).parent / base) as f:
        config = dict(json.load(f), **sizes, num_attention_heads=max(1, sizes["hidden_size"] // HEAD_SIZE))
    model = comfy.clip_model.CLIPTextModel(config, torch.float32, "cpu", comfy.ops.manual_cast)
    _init_encoder(model, seed)
    return _save({k: v.to(torch.float16) for k, v in model.state_dict().items()}, path)


def write_t5(path: Path, sizes: dict = T5, seed: int = 2) -> Path:
    """A T5 v1.1 encoder (gated GELU, relative attention) as ``t5xxl_fp16.safetensors`` stores it."""
    import json

    import comfy.ops
    import comfy.text_encoders.t5

    with open(Path(comfy.text_encoders.t5.__file__).parent / "t5_config_xxl.json") as f:
        config = dict(json.load(f), **sizes)
    config["num_heads"] = max(1, sizes["d_model"] // HEAD_SIZE)
    config["d_kv"] = sizes["d_model"] // config["num_heads"]
    model = comfy.text_encoders.t5.T5(config, torch.float32, "cpu", comfy.ops.manual_cast)
    _init_encoder(model, seed)
    return _save({k: v.to(torch.float16) for k, v in model.state_dict().items()}, path)


def write_taesd(path: Path, latent_channels: int = 16, seed: int = 3) -> Path:
    """A TAESD-architecture VAE whose decoder shows latent channels 0-2 as RGB (see the module docstring)."""
    import comfy.taesd.taesd

    vae = comfy.taesd.taesd.TAESD(latent_channels=latent_channels)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in vae.taesd_encoder.parameters():  # the encoder is unused by text-to-image: plain random
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        for p in vae.taesd_decoder.parameters():
            p.zero_()
        decoder = list(vae.taesd_decoder)
        first, last = decoder[1], decoder[-1]
        for c in range(3):  # ReLU passes only positives: carry +x and -x, recombine at the end
            first.weight[2 * c, c, 1, 1], first.weight[2 * c + 1, c, 1, 1] = 1.0, -1.0
            last.weight[c, 2 * c, 1, 1], last.weight[c, 2 * c + 1, 1, 1] = 0.15, -0.15  # ±3 after Clamp → 0.05..0.95
            last.bias[c] = 0.5
        for layer in decoder:  # the upsampling convolutions pass each channel through
            if isinstance(layer, torch.nn.Conv2d) and layer is not first and layer is not last:
                for i in range(layer.out_channels):
                    layer.weight[i, i, 1, 1] = 1.0
        sd = {k: v.clone() for k, v in vae.state_dict().items()}
        # back from the VAE's latent space to the model's, as ComfyUI's taef1 / taesdxl do
        scale, shift = (0.3611, 0.1159) if latent_channels == 16 else (0.13025, 0.0)
        sd["vae_scale"], sd["vae_shift"] = torch.tensor(scale), torch.tensor(shift)
    return _save(sd, path)


# --- diffusion models ---------------------------------------------------------------------------------------


def dense_flux(seed: int = 0, guidance: bool = True, **overrides):
    """The 16-bit FLUX of the pipeline (ComfyUI's own ``Flux`` class), FLUX.1-dev or -schnell layout."""
    from tiny_models import tiny_flux

    return tiny_flux(seed, **dict(PIPELINE_FLUX, guidance_embed=guidance, **overrides))


def calibration_calls(model, n: int = 2) -> list:
    config = model.model_config.unet_config
    return [lambda s=s: model.diffusion_model(**flux_inputs(s, config)) for s in range(n)]


def fast_quantize_config():
    """The real quantizer with a short search: enough for pipeline files, where quality is not measured."""
    from comfyui_svdquant.svdquant.quantizer import QuantizeConfig

    return QuantizeConfig(rank=16, smooth_grid=(0.5,), svd_rounds=2)


def write_dense_flux(model, path: Path) -> Path:
    """A 16-bit FLUX file in ComfyUI's own layout (what UNETLoader loads)."""
    return _save(model.diffusion_model.state_dict(), path)


def write_svdquant_flux(model, path: Path, config=None) -> Path:
    """The real quantizer over ``model`` (calibrated on a few random inputs), saved as an SVDQuant file."""
    from comfyui_svdquant.loaders.save import save_checkpoint
    from tiny_models import quantize

    quantized = quantize(model, calibration_calls(model), config or fast_quantize_config())
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(quantized.diffusion_model, path)
    return path


def write_svdquant_sdxl(path: Path, seed: int = 2) -> Path:
    from nunchaku_fixture import sdxl_checkpoint
    from tiny_models import tiny_sdxl

    path.parent.mkdir(parents=True, exist_ok=True)
    sdxl_checkpoint(tiny_sdxl(seed, **PIPELINE_SDXL), path, PIPELINE_SDXL, rank=16)
    return path


def _flux_files(models: Path, seed: int, guidance: bool, dense_name: str, svdq_name: str) -> None:
    model = dense_flux(seed, guidance)
    write_dense_flux(model, models / "diffusion_models" / dense_name)
    write_svdquant_flux(model, models / "diffusion_models" / svdq_name)


def write_flux_lora(path: Path, config: dict = PIPELINE_FLUX, style: str = "kohya", rank: int = 4,
                    seed: int = 5) -> Path:
    """A LoRA for the pipeline FLUX in one of the two key styles FLUX LoRAs are published in: kohya
    (``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`` + ``alpha``, BFL's fused layers) or diffusers
    (``transformer.transformer_blocks.0.attn.to_q.lora_A.weight``: separate q/k/v that ComfyUI maps into the
    fused layer). Both touch 4-bit layers and 16-bit ones."""
    h, m = config["hidden_size"], int(config["hidden_size"] * config["mlp_ratio"])
    if style == "kohya":
        layers = {"lora_unet_double_blocks_0_img_attn_qkv": (h, 3 * h), "lora_unet_double_blocks_1_txt_mlp_0": (h, m),
                  "lora_unet_single_blocks_0_linear1": (h, 3 * h + m), "lora_unet_single_blocks_1_linear2": (h + m, h),
                  "lora_unet_final_layer_linear": (h, 4 * config["out_channels"])}
        names = ("lora_down.weight", "lora_up.weight")
    else:
        layers = {f"transformer.transformer_blocks.0.attn.{n}": (h, h) for n in ("to_q", "to_k", "to_v")}
        layers |= {"transformer.transformer_blocks.1.ff.net.2": (m, h),
                   "transformer.single_transformer_blocks.1.proj_mlp": (h, m),
                   "transformer.context_embedder": (config["context_in_dim"], h)}
        names = ("lora_A.weight", "lora_B.weight")
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, (k, n) in layers.items():
        sd[f"{name}.{names[0]}"] = (torch.randn(rank, k, generator=g) / k**0.5).to(torch.bfloat16)
        sd[f"{name}.{names[1]}"] = (torch.randn(n, rank, generator=g) * 0.2 / rank**0.5).to(torch.bfloat16)
        if style == "kohya":
            sd[f"{name}.alpha"] = torch.tensor(float(rank))
    return _save(sd, path)


# Every file the example workflows name, and how to make its small stand-in. Engineers adding a workflow
# that loads another file add its stand-in here.
STAND_INS: dict[str, Callable[[Path], None]] = {
    "text_encoders/clip_l.safetensors": lambda m: write_clip(m / "text_encoders" / "clip_l.safetensors", CLIP_L),
    "text_encoders/clip_g.safetensors": lambda m: write_clip(m / "text_encoders" / "clip_g.safetensors", CLIP_G),
    "text_encoders/t5xxl_fp16.safetensors": lambda m: write_t5(m / "text_encoders" / "t5xxl_fp16.safetensors"),
    "vae/ae.safetensors": lambda m: write_taesd(m / "vae" / "ae.safetensors", 16),
    "vae/sdxl_vae.safetensors": lambda m: write_taesd(m / "vae" / "sdxl_vae.safetensors", 4),
    "loras/flux.1-turbo-alpha.safetensors":
        lambda m: write_flux_lora(m / "loras" / "flux.1-turbo-alpha.safetensors", style="diffusers"),
    "loras/flux.1-dev-ghibsky.safetensors": lambda m: write_flux_lora(m / "loras" / "flux.1-dev-ghibsky.safetensors"),
    "diffusion_models/flux1-dev.safetensors + svdq-int4_r32-flux.1-dev.safetensors":
        lambda m: _flux_files(m, 0, True, "flux1-dev.safetensors", "svdq-int4_r32-flux.1-dev.safetensors"),
    "diffusion_models/flux1-schnell.safetensors + svdq-int4_r32-flux.1-schnell.safetensors":
        lambda m: _flux_files(m, 1, False, "flux1-schnell.safetensors", "svdq-int4_r32-flux.1-schnell.safetensors"),
    "diffusion_models/svdq-int4_r32-sdxl.safetensors":
        lambda m: write_svdquant_sdxl(m / "diffusion_models" / "svdq-int4_r32-sdxl.safetensors"),
    "text_encoders/qwen_3_4b.safetensors":
        lambda m: write_qwen3(m / "text_encoders" / "qwen_3_4b.safetensors", _save, _init_encoder),
    "diffusion_models/svdq-int4_r128-z-image-turbo.safetensors":
        lambda m: write_svdquant_zimage(m / "diffusion_models" / "svdq-int4_r128-z-image-turbo.safetensors"),
    "text_encoders/qwen_2.5_vl_7b_fp8_scaled.safetensors":
        lambda m: tiny_qwen_pipeline.write_qwen_vl(m / "text_encoders" / "qwen_2.5_vl_7b_fp8_scaled.safetensors"),
    "vae/qwen_image_vae.safetensors":
        lambda m: tiny_qwen_pipeline.write_wan_vae(m / "vae" / "qwen_image_vae.safetensors"),
    "diffusion_models/svdq-int4_r128-qwen-image.safetensors":
        lambda m: tiny_qwen_pipeline.write_svdquant_qwen(
            m / "diffusion_models" / "svdq-int4_r128-qwen-image.safetensors", 3),
    "diffusion_models/svdq-int4_r128-qwen-image-edit.safetensors":
        lambda m: tiny_qwen_pipeline.write_svdquant_qwen(
            m / "diffusion_models" / "svdq-int4_r128-qwen-image-edit.safetensors", 4),
}
# Every picture the example workflows load (LoadImage), written into ComfyUI's input folder beside ``models``.
INPUTS: dict[str, Callable[[Path], None]] = {
    tiny_qwen_pipeline.EDIT_INPUT: tiny_qwen_pipeline.write_edit_input,
}


_built: Path | None = None  # the stand-ins this process has made, copied into every folder that asks


def populate(models: Path) -> Path:
    """Write every stand-in under ``models`` (a ComfyUI ``models`` folder) and every input picture into the
    ``input`` folder beside it; returns ``models``. They are made once per process (quantizing takes a while)
    and copied from then on."""
    global _built
    if _built is None:
        _built = Path(tempfile.mkdtemp(prefix="svdquant-stand-ins-"))
        atexit.register(shutil.rmtree, _built, ignore_errors=True)
        for build in STAND_INS.values():
            build(_built)
    for folder in ("diffusion_models", "text_encoders", "vae", "loras"):
        (_built / folder).mkdir(parents=True, exist_ok=True)
    shutil.copytree(_built, models, dirs_exist_ok=True)
    for name, write in INPUTS.items():
        write(models.parent / "input" / name)
    return models
