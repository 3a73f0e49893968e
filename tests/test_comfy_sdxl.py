"""SVDQuant SDXL on ComfyUI's own UNetModel: nunchaku's SDXL checkpoints (written by
tests/nunchaku_fixture.py from a dense SDXL-class UNet, independently of our writer) through the loader
node, and back out through our writer."""

import json

import pytest
import torch
from safetensors import safe_open

from conftest import load_node
from nunchaku_fixture import sdxl_checkpoint
from tiny_models import TINY_SDXL, mapping_errors, quantize, relative_error, sdxl_inputs, tiny_sdxl

RANK = 32
EXACT = 1e-5
MODEL_TOLERANCE = 0.2  # 4-bit activations through 7 transformer blocks; measured about 0.08


@pytest.fixture(scope="module")
def dense(comfy):
    return tiny_sdxl(seed=0)


@pytest.fixture(scope="module")
def reference(dense):
    inputs = sdxl_inputs(3)
    with torch.no_grad():
        return inputs, dense.diffusion_model(**inputs)


@pytest.mark.parametrize("precision", ["int4", "nvfp4"])
def test_published_file_loads_through_the_loader_node(dense, reference, model_folders, precision):
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    from comfyui_svdquant.loaders.load import architecture_of

    name = f"svdq-{precision}_r32-tiny-sdxl.safetensors"
    expected = sdxl_checkpoint(dense, model_folders["diffusion_models"] / name, TINY_SDXL, precision=precision)
    patcher = load_node(name)
    dm = patcher.model.diffusion_model
    assert type(dm) is UNetModel and type(patcher.model) is type(dense)
    assert architecture_of(dm)[1] == TINY_SDXL  # the shape came from the file's diffusers config
    assert max(mapping_errors(patcher.model, expected).values()) < EXACT
    # ComfyUI's separate q / k / v are row slices of the file's fused to_qkv: one input side
    attn1 = dm.input_blocks[3][1].transformer_blocks[0].attn1
    q, k, v = (getattr(attn1, f"to_{x}").quantized for x in "qkv")
    for other in (k, v):
        assert torch.equal(other.smooth_factor, q.smooth_factor) and torch.equal(other.proj_down, q.proj_down)
    assert q.out_features == 64 and q.qweight.shape == (128, 64)  # 64 wide: padded to 128, as SDXL's 320 would be
    inputs, want = reference
    with torch.no_grad():
        assert relative_error(dm(**inputs), want) < MODEL_TOLERANCE


def test_qkv_slices_are_checked(dense, tmp_path):
    """A file whose fused layer holds k ‖ q ‖ v: to_q and to_k no longer match, to_v still does."""
    from comfyui_svdquant.loaders.load import load_checkpoint

    expected = sdxl_checkpoint(dense, tmp_path / "swapped.safetensors", TINY_SDXL, faults={"swap_qk"})
    errors = mapping_errors(load_checkpoint(tmp_path / "swapped.safetensors", "bfloat16", "torch").model, expected)
    for name, error in errors.items():
        assert (error > 0.1) if name.endswith(("attn1.to_q", "attn1.to_k")) else (error < EXACT), name


# Per transformer block, the tensors of nunchaku's SDXL file (models/unets/unet_sdxl.py:
# NunchakuSDXLTransformerBlock: attn1.to_qkv fused from bias-free to_q/to_k/to_v, attn2.to_q quantized,
# attn2.to_k / to_v kept, to_out.0 and ff.net.0.proj / ff.net.2 quantized; convert_sdxl_state_dict maps
# the C++ spellings lora_down / lora_up / smooth / smooth_orig on disk to the python names).
W4A4 = ("qweight", "wscales", "lora_down", "lora_up", "smooth", "smooth_orig")
BLOCK = {f"attn1.to_qkv.{leaf}" for leaf in W4A4} | {f"attn2.to_q.{leaf}" for leaf in W4A4} | {
    f"{layer}.{leaf}" for layer in ("attn1.to_out.0", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")
    for leaf in W4A4 + ("bias",)} | {"attn2.to_k.weight", "attn2.to_v.weight"} | {
    f"norm{i}.{leaf}" for i in (1, 2, 3) for leaf in ("weight", "bias")}
BLOCKS = ["down_blocks.1.attentions.0", "down_blocks.2.attentions.0", "mid_block.attentions.0",
          "up_blocks.0.attentions.0", "up_blocks.0.attentions.1", "up_blocks.1.attentions.0",
          "up_blocks.1.attentions.1"]
SOME_DENSE = ("conv_in.weight", "time_embedding.linear_1.weight", "add_embedding.linear_2.bias",
              "down_blocks.0.resnets.0.conv1.weight", "down_blocks.1.attentions.0.proj_in.weight",
              "mid_block.resnets.1.time_emb_proj.weight", "up_blocks.2.resnets.1.conv_shortcut.weight",
              "conv_norm_out.weight", "conv_out.bias")


def test_saved_file_is_the_published_file(dense, reference, tmp_path):
    from comfyui_svdquant.loaders.load import load_checkpoint
    from comfyui_svdquant.loaders.save import save_checkpoint

    sdxl_checkpoint(dense, tmp_path / "published.safetensors", TINY_SDXL)
    model = load_checkpoint(tmp_path / "published.safetensors", "bfloat16", "torch").model
    save_checkpoint(model.diffusion_model, tmp_path / "ours.safetensors")
    with safe_open(str(tmp_path / "published.safetensors"), "pt") as theirs, \
            safe_open(str(tmp_path / "ours.safetensors"), "pt") as ours:
        keys = set(ours.keys())
        assert keys == set(theirs.keys())
        for block in BLOCKS:
            found = {k[len(block) + len(".transformer_blocks.0."):] for k in keys
                     if k.startswith(f"{block}.transformer_blocks.0.")}
            assert found == BLOCK, block
        assert set(SOME_DENSE) <= keys
        for key in keys:  # q / k / v joined back into the fused layer, byte for byte
            a, b = theirs.get_tensor(key), ours.get_tensor(key)
            assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8)), key
        metadata = ours.metadata()
    assert metadata["model_class"] == "NunchakuSDXLUNet2DConditionModel"
    assert json.loads(metadata["quantization_config"])["rank"] == RANK
    config = json.loads(metadata["config"])  # what unet_sdxl.py builds UNet2DConditionModel from
    assert {k: config[k] for k in ("block_out_channels", "layers_per_block", "transformer_layers_per_block",
                                   "cross_attention_dim", "projection_class_embeddings_input_dim",
                                   "down_block_types", "up_block_types", "use_linear_projection")} == {
        "block_out_channels": [32, 64, 128], "layers_per_block": 1, "transformer_layers_per_block": [1, 1, 1],
        "cross_attention_dim": 64, "projection_class_embeddings_input_dim": 32,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "use_linear_projection": True}
    inputs, _ = reference
    again = load_checkpoint(tmp_path / "ours.safetensors", "bfloat16", "torch").model
    with torch.no_grad():
        assert torch.equal(again.diffusion_model(**inputs), model.diffusion_model(**inputs))


def test_quantized_model_saves_in_the_published_layout(dense, reference, model_folders):
    """Our quantizer's SDXL: q / k / v quantized as the one fused layer the format stores (one
    smoothing, one branch), saved as nunchaku's layout and loaded back through the node unchanged."""
    from comfyui_svdquant.loaders.save import save_checkpoint
    from comfyui_svdquant.svdquant.quantizer import QuantizeConfig

    calls = [lambda s=s: dense.diffusion_model(**sdxl_inputs(s)) for s in range(2)]
    model = quantize(dense, calls, QuantizeConfig(rank=RANK, smooth_grid=(0.5,), svd_rounds=1))
    save_checkpoint(model.diffusion_model, model_folders["diffusion_models"] / "ours.safetensors")
    with safe_open(str(model_folders["diffusion_models"] / "ours.safetensors"), "pt") as f:
        keys = set(f.keys())
    for block in BLOCKS:
        assert {k[len(block) + len(".transformer_blocks.0."):] for k in keys
                if k.startswith(f"{block}.transformer_blocks.0.")} == BLOCK, block
    inputs, want = reference
    with torch.no_grad():
        out = model.diffusion_model(**inputs)
        assert torch.equal(load_node("ours.safetensors").model.diffusion_model(**inputs), out)
    assert relative_error(out, want) < MODEL_TOLERANCE
