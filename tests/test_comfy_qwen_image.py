"""Qwen-Image SVDQuant files (t2i, Edit, Edit-2509, Lightning: one network) in the authors' layout load onto
ComfyUI's own ``QwenImageTransformer2DModel`` through the loader node, INT4 and NVFP4, at the ranks the
authors publish (32 and 128).

The files come from tests/qwen_fixture.py, written from a dense tiny Qwen-Image independently of the
pack's writer and packing code, with the dense (weight, bias) every quantized ComfyUI Linear must
reconstruct; its faults write one piece the way a wrong reader would read it.
"""

from __future__ import annotations

import pytest
import torch
from qwen_fixture import qwen_checkpoint
from safetensors import safe_open
from tiny_qwen import REAL_QWEN, TINY_QWEN, qwen_inputs, qwen_shapes, tiny_qwen

from conftest import load_node
from nunchaku_fixture import FAULTS
from tiny_models import mapping_errors, relative_error

H = TINY_QWEN["attention_head_dim"] * TINY_QWEN["num_attention_heads"]
EXACT = 1e-5  # fp32 rounding of the same 16-bit tensors (as for FLUX)
MODEL_TOLERANCE = 0.1  # 4-bit activations (as for FLUX); measured about 0.01


@pytest.fixture(scope="module")
def qwen(comfy):
    pytest.importorskip("comfy.ldm.qwen_image.model", reason="this ComfyUI has no Qwen-Image model class")


@pytest.fixture(scope="module")
def dense(qwen):
    return tiny_qwen(seed=0)


def outputs(model, edit: bool) -> torch.Tensor:
    with torch.no_grad():
        return model.diffusion_model(**qwen_inputs(3, edit=edit))


@pytest.mark.parametrize("rank", [32, 128])
@pytest.mark.parametrize("precision", ["int4", "nvfp4"])
def test_published_file_loads_through_the_loader_node(dense, model_folders, precision, rank):
    import comfy.ldm.qwen_image.model
    import comfy.supported_models

    from comfyui_svdquant.loaders.parts import InterleavedOutput
    from comfyui_svdquant.svdquant.layers import W4A4Linear

    name = f"svdq-{'fp4' if precision == 'nvfp4' else 'int4'}_r{rank}-tiny-qwen-image.safetensors"
    expected = qwen_checkpoint(dense, model_folders["diffusion_models"] / name, precision, rank)
    patcher = load_node(name)
    dm = patcher.model.diffusion_model
    assert type(dm) is comfy.ldm.qwen_image.model.QwenImageTransformer2DModel
    assert isinstance(patcher.model.model_config, comfy.supported_models.QwenImage)
    assert max(mapping_errors(patcher.model, expected).values()) < EXACT
    block = dm.transformer_blocks[1]
    for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):  # row slices of fused qkv
        layer = block.attn.get_submodule(name).quantized
        assert isinstance(layer, W4A4Linear) and layer.out_features == H and layer.rank == rank
    assert isinstance(block.img_mod[1].quantized, InterleavedOutput)
    assert block.img_mlp.net[2].quantized.act_unsigned == (precision == "int4")
    assert not block.img_mlp.net[0].proj.quantized.act_unsigned
    for edit in (False, True):  # text-to-image; Edit reads its input image as reference latents
        assert relative_error(outputs(patcher.model, edit), outputs(dense, edit)) < MODEL_TOLERANCE


# Which ComfyUI Linears each fault touches; every other layer must still be exact.
FAULT_LAYERS = {
    "no_interleave": ("img_mod.1", "txt_mod.1"),
    "no_scale_bias": ("img_mod.1", "txt_mod.1"),
    "no_gelu_shift": ("net.2",),
    "swap_qk": ("to_q", "to_k", "add_q_proj", "add_k_proj"),
    "wcscales_unpacked": ("to_q", "to_k", "to_v", "proj", "to_out.0", "to_add_out", "net.2"),
    "no_wtscale": ("to_q", "to_k", "to_v", "proj", "to_out.0", "to_add_out", "net.2"),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_each_mapped_piece_is_checked(dense, tmp_path, fault):
    from comfyui_svdquant.loaders.load import load_checkpoint

    precision = "nvfp4" if fault in ("wcscales_unpacked", "no_wtscale") else "int4"
    path = tmp_path / "faulty.safetensors"
    expected = qwen_checkpoint(dense, path, precision, faults={fault})
    errors = mapping_errors(load_checkpoint(path, "bfloat16", "torch").model, expected)
    touched = {name for name in errors if name.endswith(FAULT_LAYERS[fault])}
    assert touched and min(errors[name] for name in touched) > 100 * EXACT
    assert max(errors[name] for name in set(errors) - touched) < EXACT


def test_the_published_network_is_told_from_its_tensors(qwen):
    """The real Qwen-Image shapes (on the meta device): ComfyUI's own detection and table give its
    QwenImage config with no correction; the table covers every parameter once, at the real widths."""
    import comfy.supported_models

    from comfyui_svdquant.loaders import detection
    from comfyui_svdquant.loaders.architecture import all_layers
    from comfyui_svdquant.loaders.qwen_image import QwenImageArchitecture

    architecture = QwenImageArchitecture()
    shapes = qwen_shapes(REAL_QWEN)
    model_config = detection.model_config(architecture, shapes)
    assert type(model_config) is comfy.supported_models.QwenImage
    assert {k: model_config.unet_config[k] for k in REAL_QWEN} == REAL_QWEN
    layers = all_layers(architecture.blocks(REAL_QWEN))
    assert len(layers) == 60 * 14
    quantized = {f"{layer.module}.{leaf}" for layer in layers for leaf in ("weight", "bias")}
    dense = set(architecture.dense_key_map(REAL_QWEN))
    assert not quantized & dense and quantized | dense == set(shapes)
    widths = {(p.in_features, p.out_features) for layer in layers for p in layer.parts}
    assert widths == {(3072, 18432), (3072, 9216), (3072, 3072), (3072, 12288), (12288, 3072)}


def test_a_flux_file_and_a_qwen_file_are_told_apart(dense, tmp_path):
    from comfyui_svdquant.loaders.load import detect
    from comfyui_svdquant.svdquant.checkpoint import CheckpointReader
    from nunchaku_fixture import flux_checkpoint
    from tiny_models import tiny_flux

    qwen_checkpoint(dense, tmp_path / "qwen.safetensors")
    flux_checkpoint(tiny_flux(seed=0), tmp_path / "flux.safetensors", naming="python")
    with CheckpointReader(tmp_path / "qwen.safetensors") as reader:
        assert detect(reader).name == "qwen_image"
    with CheckpointReader(tmp_path / "flux.safetensors") as reader:
        assert detect(reader).name == "flux"


def test_a_qwen_file_without_its_blocks_is_named(dense, tmp_path):
    from safetensors.torch import save_file

    from comfyui_svdquant.loaders.load import load_checkpoint
    from comfyui_svdquant.svdquant.errors import CheckpointError

    qwen_checkpoint(dense, tmp_path / "full.safetensors")
    with safe_open(str(tmp_path / "full.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if not k.startswith("transformer_blocks.0.attn.to_qkv.")}
        metadata = f.metadata()
    save_file(tensors, str(tmp_path / "cut.safetensors"), metadata=metadata)
    with pytest.raises(CheckpointError, match="cut.safetensors.*Qwen-Image checkpoint without SVDQuant blocks"):
        load_checkpoint(tmp_path / "cut.safetensors", "bfloat16", "torch")
