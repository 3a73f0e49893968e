"""The Qwen-Image workflows' files at a size that runs on a CPU in seconds (see tiny_pipeline.py, which lists
them among its stand-ins): the Qwen2.5-VL text encoder, the Wan 2.1 VAE, the SVDQuant Qwen-Image and
Qwen-Image-Edit files and the Edit workflow's input image.

- The text encoder is ComfyUI's own ``comfy.text_encoders.llama.Qwen25_7BVLI`` (language model and vision
  tower) at a small width, saved with the key names of the published ``qwen_2.5_vl_7b`` files. ComfyUI tells a
  Qwen2.5-VL 7B from its other Llama-family encoders by the k projection's bias width (4 key/value heads of
  128), so the stand-in keeps those; every other size ComfyUI fixes (hidden 3584, 28 layers; a 1280-wide,
  32-layer vision tower) is read from the file by :func:`install_sizing`, which passes them as ComfyUI's own
  ``qwen25_7b_model_config`` option and as the vision tower's constructor arguments.
- The VAE is ComfyUI's own Wan 2.1 VAE (``comfy.ldm.wan.vae.WanVAE``) at base width 8. ComfyUI v0.8 and later
  read the width from the file; v0.3.x fixes it at 96, which :func:`install_sizing` reads from the file too.
- The SVDQuant files are written in the authors' layout by the independent fixture writer (``qwen_fixture``)
  from a small Qwen-Image of ComfyUI's own class, at rank 128, the rank the authors publish beside 32.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import torch
from tiny_qwen import TINY_QWEN

# Qwen2.5-VL: 4 query and 4 key/value heads of 128 (the 7B's k bias width, 512), a 64-wide residual stream
# (= the diffusion model's text width) and ComfyUI's full vocabulary (the prompt templates' token ids).
QWEN_VL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 4}
VISION = {"hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 1}
VISION_HEAD_SIZE = 80  # the published vision tower: 16 heads of 80 (1280 wide)
LLM_HEAD_SIZE = 128
WAN_DIM = 8
PIPELINE_QWEN = dict(TINY_QWEN, joint_attention_dim=QWEN_VL["hidden_size"])
EDIT_INPUT = "qwen-image-edit-input.png"


def _count(sd: dict, pattern: str) -> int:
    n = 0
    while pattern.format(n) in sd:
        n += 1
    return n


def qwen_vl_sizes(sd: dict[str, torch.Tensor]) -> tuple[dict, dict] | None:
    """(language model config entries, vision tower arguments) of a Qwen2.5-VL file, from its tensor shapes;
    None for other files."""
    if "model.embed_tokens.weight" not in sd or "visual.patch_embed.proj.weight" not in sd:
        return None
    vocab, hidden = sd["model.embed_tokens.weight"].shape
    language = {"vocab_size": vocab, "hidden_size": hidden,
                "intermediate_size": sd["model.layers.0.mlp.gate_proj.weight"].shape[0],
                "num_hidden_layers": _count(sd, "model.layers.{}.mlp.gate_proj.weight"),
                "num_attention_heads": sd["model.layers.0.self_attn.q_proj.weight"].shape[0] // LLM_HEAD_SIZE,
                "num_key_value_heads": sd["model.layers.0.self_attn.k_proj.weight"].shape[0] // LLM_HEAD_SIZE}
    width = sd["visual.patch_embed.proj.weight"].shape[0]
    vision = {"hidden_size": width, "intermediate_size": sd["visual.blocks.0.mlp.gate_proj.weight"].shape[0],
              "num_layers": _count(sd, "visual.blocks.{}.mlp.gate_proj.weight"),
              "num_heads": max(1, width // VISION_HEAD_SIZE)}
    return language, vision


def _sized(cls: type, sizes: Callable[[], dict]) -> type:
    """``cls`` whose constructor takes the arguments ``sizes()`` gives over those its caller passes."""
    class Sized(cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, **sizes()})

    Sized.__name__ = Sized.__qualname__ = cls.__name__
    return Sized


def install_sizing() -> Callable[[], None]:
    """Teach ComfyUI to size the Qwen2.5-VL encoder and (v0.3.x) the Wan VAE from their files (see the module
    docstring); returns the function that undoes it."""
    import comfy.ldm.wan.vae as wan_vae
    import comfy.sd
    import comfy.text_encoders.qwen_vl as qwen_vl

    original_load, original_vision = comfy.sd.load_text_encoder_state_dicts, qwen_vl.Qwen2VLVisionTransformer
    original_vae_init, original_wan = comfy.sd.VAE.__init__, wan_vae.WanVAE
    pending: dict[str, dict] = {}  # sizes read from the file being loaded, for the constructors it calls

    @functools.wraps(original_load)
    def load_text_encoders(state_dicts=(), *args, **kwargs):
        found = next((s for s in map(qwen_vl_sizes, state_dicts) if s is not None), None)
        if found is None:
            return original_load(state_dicts, *args, **kwargs)
        language, pending["vision"] = found
        options = dict(kwargs.get("model_options") or {})
        options["qwen25_7b_model_config"] = {**options.get("qwen25_7b_model_config", {}), **language}
        kwargs["model_options"] = options
        try:
            return original_load(state_dicts, *args, **kwargs)
        finally:
            pending.pop("vision", None)

    @functools.wraps(original_vae_init)
    def vae_init(self, sd=None, *args, **kwargs):
        if sd is not None and "decoder.head.0.gamma" in sd:
            pending["wan"] = {"dim": sd["decoder.head.0.gamma"].shape[0]}
        try:
            original_vae_init(self, sd, *args, **kwargs)
        finally:
            pending.pop("wan", None)

    comfy.sd.load_text_encoder_state_dicts = load_text_encoders
    qwen_vl.Qwen2VLVisionTransformer = _sized(original_vision, lambda: pending.get("vision", {}))
    comfy.sd.VAE.__init__, wan_vae.WanVAE = vae_init, _sized(original_wan, lambda: pending.get("wan", {}))

    def undo() -> None:
        comfy.sd.load_text_encoder_state_dicts, qwen_vl.Qwen2VLVisionTransformer = original_load, original_vision
        comfy.sd.VAE.__init__, wan_vae.WanVAE = original_vae_init, original_wan

    return undo


def write_qwen_vl(path: Path, seed: int = 6) -> Path:
    """A Qwen2.5-VL text encoder (ComfyUI's class, small) as ``qwen_2.5_vl_7b_fp8_scaled.safetensors`` names its
    tensors, in bf16."""
    import comfy.ops
    import comfy.text_encoders.llama
    import comfy.text_encoders.qwen_vl as qwen_vl

    from tiny_pipeline import _init_encoder, _save

    original = qwen_vl.Qwen2VLVisionTransformer
    qwen_vl.Qwen2VLVisionTransformer = _sized(original, lambda: VISION)  # Qwen25_7BVLI fixes it at 1280 wide
    try:
        model = comfy.text_encoders.llama.Qwen25_7BVLI(QWEN_VL, torch.float32, "cpu", comfy.ops.manual_cast)
    finally:
        qwen_vl.Qwen2VLVisionTransformer = original
    _init_encoder(model, seed)
    return _save({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}, path)


def write_wan_vae(path: Path, seed: int = 7) -> Path:
    """A Wan 2.1 VAE (ComfyUI's class) at base width ``WAN_DIM``, with random weights of a moderate scale."""
    import comfy.ldm.wan.vae

    from tiny_pipeline import _save

    vae = comfy.ldm.wan.vae.WanVAE(dim=WAN_DIM, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                                   temperal_downsample=[False, True, True], dropout=0.0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("gamma"):
                p.fill_(1.0)
            elif p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            else:
                p.zero_()
    return _save({k: v.to(torch.float16) for k, v in vae.state_dict().items()}, path)


def write_svdquant_qwen(path: Path, seed: int) -> Path:
    """An SVDQuant Qwen-Image file in the authors' layout (INT4, rank 128) of a small Qwen-Image."""
    from qwen_fixture import qwen_checkpoint
    from tiny_qwen import tiny_qwen

    path.parent.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in PIPELINE_QWEN.items() if k not in TINY_QWEN or TINY_QWEN[k] != v}
    qwen_checkpoint(tiny_qwen(seed, **config), path, rank=128)
    return path


def write_edit_input(path: Path) -> Path:
    """The Edit workflow's input picture: colour gradients, 96×64."""
    from PIL import Image

    y, x = torch.meshgrid(torch.linspace(0, 1, 64), torch.linspace(0, 1, 96), indexing="ij")
    rgb = torch.stack([x, y, (x + y) / 2], dim=-1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((rgb * 255).round().to(torch.uint8).numpy()).save(path)
    return path
