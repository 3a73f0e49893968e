"""Load SVDQuant Model as a user meets it: what it lists, the FLUX.1 variant it builds from a file's metadata
or (without ComfyUI's metadata) from the tensor shapes, the choices it refuses when a prompt is validated,
and reloading a file that was replaced on disk."""

from __future__ import annotations

import os

import pytest
import torch

from conftest import validation_errors
from tiny_models import TINY_FLUX, flux_inputs, tiny_flux

VARIANTS = {  # name → (tiny_flux overrides, ComfyUI model config class, latent channels the model reads)
    "dev": ({}, "Flux", 16),
    "schnell": ({"guidance_embed": False}, "FluxSchnell", 16),
    "fill": ({"in_channels": 96}, "FluxInpaint", 96),  # 16 latent + 64 mask + 16 masked image
    "depth-canny": ({"in_channels": 32}, "Flux", 32),  # 16 latent + 16 control image latent
}


@pytest.fixture(scope="module")
def variant_files(comfy, tmp_path_factory):
    """name → (file with ComfyUI's comfy_config metadata, file with only the diffusers config), nunchaku's
    layout, written by the test packer."""
    from nunchaku_fixture import flux_checkpoint

    folder = tmp_path_factory.mktemp("variants")
    files = {}
    for name, (overrides, _, _) in VARIANTS.items():
        model = tiny_flux(seed=7, **overrides)
        files[name] = []
        for comfy_config in (True, False):
            path = folder / f"svdq-int4_r16-{name}-{'meta' if comfy_config else 'shapes'}.safetensors"
            flux_checkpoint(model, path, rank=16, comfy_config=comfy_config)
            files[name].append(path)
    return files


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("source", ["metadata", "shapes"])
def test_flux_variant_is_built_from_the_file(variant_files, model_folders, variant, source):
    from comfyui_svdquant.nodes.loader import SVDQuantModelLoader

    path = variant_files[variant][source == "shapes"]
    os.link(path, model_folders["diffusion_models"] / path.name)
    (patcher,) = SVDQuantModelLoader.execute(path.name, "bfloat16", "torch").args
    overrides, config_class, channels = VARIANTS[variant]
    model = patcher.model
    assert type(model.model_config).__name__ == config_class
    assert model.diffusion_model.img_in.in_features == channels * 4
    assert model.diffusion_model.params.guidance_embed == overrides.get("guidance_embed", True)
    inputs = flux_inputs(0, {**TINY_FLUX, **overrides})
    with torch.no_grad():
        out = model.diffusion_model(**inputs)
    assert out.shape == (1, 16, 16, 16) and torch.isfinite(out).all()


def test_lists_files_and_folder_checkpoints(variant_files, model_folders):
    from comfyui_svdquant.nodes.files import checkpoint_names
    from comfyui_svdquant.nodes.loader import SVDQuantModelLoader

    folder = model_folders["diffusion_models"]
    (folder / "sub").mkdir()
    os.link(variant_files["dev"][0], folder / "sub" / "flux-dev.safetensors")
    old = folder / "old-layout"
    old.mkdir()
    for name in ("transformer_blocks.safetensors", "unquantized_layers.safetensors"):
        (old / name).write_bytes(b"")
    assert checkpoint_names() == ["old-layout/", "sub/flux-dev.safetensors"]
    options = SVDQuantModelLoader.GET_SCHEMA().inputs[0].options
    assert options == ["old-layout/", "sub/flux-dev.safetensors"]


def test_svdquant_files_come_first_and_a_16bit_file_points_elsewhere(variant_files, model_folders):
    """A new loader node starts on an SVDQuant file; picking a 16-bit file says which node loads it."""
    from safetensors.torch import save_file

    from comfyui_svdquant.nodes.files import checkpoint_names
    from comfyui_svdquant.nodes.loader import SVDQuantModelLoader
    from comfyui_svdquant.svdquant.errors import CheckpointError

    folder = model_folders["diffusion_models"]
    save_file(tiny_flux(seed=1).diffusion_model.state_dict(), str(folder / "aaa-flux-16bit.safetensors"))
    os.link(variant_files["dev"][0], folder / "zzz-flux-svdq.safetensors")
    assert checkpoint_names() == ["zzz-flux-svdq.safetensors", "aaa-flux-16bit.safetensors"]
    with pytest.raises(CheckpointError, match=r"aaa-flux-16bit\.safetensors: this is not an SVDQuant checkpoint "
                                              r".*loads with Load Diffusion Model"):
        SVDQuantModelLoader.execute("aaa-flux-16bit.safetensors", "bfloat16", "torch")


@pytest.mark.parametrize("name, value", [("model_name", "missing.safetensors"), ("compute_dtype", "float32"),
                                         ("kernel_backend", "triton")])
def test_validation_refuses_what_is_not_offered(model_folders, name, value):
    """Queued with a value its dropdown does not offer, the node is refused, the value named on its input."""
    (model_folders["diffusion_models"] / "m.safetensors").write_bytes(b"")
    inputs = {"model_name": "m.safetensors", "compute_dtype": "auto", "kernel_backend": "auto", name: value}
    errors = validation_errors("SVDQuantModelLoader", **inputs)
    assert errors and any(e.startswith(f"{name}:") and value in e for e in errors), errors
    offered = {"model_name": "m.safetensors", "compute_dtype": "auto", "kernel_backend": "auto"}
    assert not validation_errors("SVDQuantModelLoader", **offered)


def test_a_replaced_file_is_loaded_again(variant_files, model_folders):
    from comfyui_svdquant.nodes.loader import SVDQuantModelLoader

    target = model_folders["diffusion_models"] / "model.safetensors"
    target.write_bytes(variant_files["dev"][0].read_bytes())
    before = SVDQuantModelLoader.fingerprint_inputs("model.safetensors", "auto", "auto")
    assert SVDQuantModelLoader.fingerprint_inputs("model.safetensors", "auto", "auto") == before
    replacement = target.with_suffix(".new")
    replacement.write_bytes(variant_files["schnell"][0].read_bytes())
    os.replace(replacement, target)  # as the download and save nodes write files
    assert SVDQuantModelLoader.fingerprint_inputs("model.safetensors", "auto", "auto") != before
