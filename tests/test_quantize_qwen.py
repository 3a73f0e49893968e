"""SVDQuant Quantize Model / Save SVDQuant Model on a tiny Qwen-Image (ComfyUI's own class) in the real in-process
ComfyUI: calibration by ComfyUI's sampler, the real quantizer (fused q/k/v, interleaved W4A16 modulations),
the file saved in the authors' layout (the names, shapes and dtypes the independent fixture writer gives the
same model) and loaded back by the loader node to the same samples."""

from __future__ import annotations

import json

import pytest
import torch
from qwen_fixture import qwen_checkpoint
from safetensors import safe_open
from test_quantize_node import (  # noqa: F401  (one_thread: an autouse fixture)
    assert_close_sample,
    assert_untouched,
    conditioning,
    one_thread,
    patcher_of,
    quantize,
    sample,
    saved_files,
    state_of,
)
from tiny_qwen import TINY_QWEN, tiny_qwen

WIDTH = TINY_QWEN["joint_attention_dim"]


@pytest.fixture(scope="module")
def qwen_run(comfy):
    """(source MODEL, its state before, its sample, quantized MODEL): INT4 rank 16, smoothing on."""
    pytest.importorskip("comfy.ldm.qwen_image.model", reason="this ComfyUI has no Qwen-Image model class")
    source = patcher_of(tiny_qwen(0))
    before = state_of(source)
    dense_sample = sample(source, conditioning(5, width=WIDTH))
    quantized = quantize(source, positive=conditioning(1, width=WIDTH), positive_2=conditioning(2, width=WIDTH),
                         smoothing=True)
    return source, before, dense_sample, quantized


def file_layout(path) -> tuple[dict[str, tuple[tuple[int, ...], torch.dtype]], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        layout = {k: (tuple(f.get_slice(k).get_shape()), f.get_tensor(k).dtype) for k in f.keys()}
        return layout, f.metadata()


def test_qwen_quantize_sample_save_load(qwen_run, model_folders, tmp_path):
    from comfyui_svdquant.loaders.ops import quantized_ops
    from comfyui_svdquant.nodes.loader import SVDQuantModelLoader
    from comfyui_svdquant.nodes.quantize import SVDQuantSaveModel

    source, before, dense_sample, quantized = qwen_run
    assert len(quantized_ops(quantized.model.diffusion_model)) == TINY_QWEN["num_layers"] * 14
    quantized_sample = sample(quantized, conditioning(5, width=WIDTH))
    other = sample(patcher_of(tiny_qwen(1)), conditioning(5, width=WIDTH))
    assert_close_sample(quantized_sample, dense_sample, other, "Qwen-Image (hidden 128, 2 blocks), int4 rank 16")

    SVDQuantSaveModel.execute(quantized, "svdquant/tiny-qwen")
    folder = model_folders["diffusion_models"]
    assert saved_files(folder) == ["svdquant/tiny-qwen_00001_.safetensors"]
    (loaded,) = SVDQuantModelLoader.execute("svdquant/tiny-qwen_00001_.safetensors", "bfloat16", "torch").args
    assert torch.equal(sample(loaded, conditioning(5, width=WIDTH)), quantized_sample)
    assert_untouched(source, before)

    # The authors' layout: the tensors the independent writer gives a file of this model at this rank.
    saved, metadata = file_layout(folder / "svdquant/tiny-qwen_00001_.safetensors")
    qwen_checkpoint(source.model, tmp_path / "fixture.safetensors", rank=16)
    fixture, fixture_metadata = file_layout(tmp_path / "fixture.safetensors")
    assert saved == fixture
    assert metadata["model_class"] == fixture_metadata["model_class"]
    assert json.loads(metadata["config"]) == json.loads(fixture_metadata["config"])
    assert json.loads(metadata["quantization_config"]) == json.loads(fixture_metadata["quantization_config"])


def test_a_loaded_file_saves_back_to_the_same_tensors(qwen_run, model_folders, tmp_path):
    """File (authors' layout, NVFP4 rank 32, from the independent writer) → loader → Save: the same tensors."""
    from comfyui_svdquant.loaders.load import load_checkpoint
    from comfyui_svdquant.loaders.save import checkpoint_tensors

    source = qwen_run[0]
    path = tmp_path / "svdq-fp4_r32-tiny-qwen-image.safetensors"
    qwen_checkpoint(source.model, path, precision="nvfp4")
    tensors, _ = checkpoint_tensors(load_checkpoint(path, "bfloat16", "torch").model.diffusion_model)
    with safe_open(str(path), "pt") as f:
        assert set(tensors) == set(f.keys())
        for key in f.keys():
            want = f.get_tensor(key)
            assert tensors[key].dtype == want.dtype and torch.equal(tensors[key].view(-1).view(torch.uint8),
                                                                    want.view(-1).view(torch.uint8)), key
