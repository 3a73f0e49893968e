"""SVDQuant FLUX on ComfyUI's own Flux class: quantize → save → load through the loader node."""

import pytest
import torch

from conftest import validation_errors
from tiny_models import TINY_FLUX, flux_inputs, quantize, relative_error, tiny_flux


@pytest.fixture(scope="module")
def flux_pair(comfy):
    """(dense tiny FLUX, its SVDQuant version)."""
    dense = tiny_flux(seed=0)
    calls = [lambda s=s: dense.diffusion_model(**flux_inputs(s)) for s in range(3)]
    return dense, quantize(dense, calls)


def dequantized(model):
    """The same SVDQuant model with every quantized layer replaced by its dense equivalent."""
    import copy

    from comfyui_svdquant.loaders.ops import quantized_ops

    clone = copy.deepcopy(model, {id(model.model_config): model.model_config})  # ComfyUI's config is shared, not copied
    for name, op in quantized_ops(clone.diffusion_model):
        weight, bias = op.quantized.to_dense()
        linear = torch.nn.Linear(op.in_features, op.out_features, bias=bias is not None, dtype=torch.bfloat16)
        linear.weight.data.copy_(weight)
        if bias is not None:
            linear.bias.data.copy_(bias)
        clone.diffusion_model.set_submodule(name, linear)
    return clone


def test_quantized_model_is_comfyuis_own_class(flux_pair):
    import comfy.ldm.flux.model

    from comfyui_svdquant.loaders.ops import SVDQuantOps, quantized_ops

    _, model = flux_pair
    assert type(model.diffusion_model) is comfy.ldm.flux.model.Flux
    ops = quantized_ops(model.diffusion_model)
    assert len(ops) == 2 * 10 + 2 * 3  # 10 quantized linears per double block, 3 per single block
    assert all(isinstance(op, SVDQuantOps.Linear) for _, op in ops)
    assert model.diffusion_model.img_in.quantized is None  # embedders stay 16-bit


def test_output_close_to_dequantized_dense(flux_pair):
    dense, model = flux_pair
    inputs = flux_inputs(100)
    with torch.no_grad():
        out = model.diffusion_model(**inputs)
        ref = dequantized(model).diffusion_model(**inputs)
        original = dense.diffusion_model(**inputs)
    # the only difference to the dequantized model is 4-bit activation rounding
    assert relative_error(out, ref) < relative_error(out, original) + 0.05
    assert relative_error(out, original) < 0.5
    assert torch.isfinite(out).all()


def test_save_then_load_through_the_loader_node_is_identical(flux_pair, model_folders):
    from comfyui_svdquant.loaders.save import save_checkpoint
    from comfyui_svdquant.nodes.loader import SVDQuantModelLoader

    _, model = flux_pair
    save_checkpoint(model.diffusion_model, model_folders["diffusion_models"] / "tiny-flux-svdq.safetensors")
    settings = {"compute_dtype": "auto", "kernel_backend": "auto"}
    assert not validation_errors("SVDQuantModelLoader", model_name="tiny-flux-svdq.safetensors", **settings)
    assert "nope.safetensors" in " ".join(validation_errors("SVDQuantModelLoader", model_name="nope.safetensors",
                                                            **settings))
    (patcher,) = SVDQuantModelLoader.execute("tiny-flux-svdq.safetensors", "bfloat16", "torch").args
    inputs = flux_inputs(7)
    with torch.no_grad():
        assert torch.equal(patcher.model.diffusion_model(**inputs), model.diffusion_model(**inputs))


def test_model_size_is_the_packed_size(flux_pair, tmp_path):
    import comfy.model_management

    from comfyui_svdquant.loaders.patcher import SVDQuantModelPatcher
    from comfyui_svdquant.loaders.save import save_checkpoint

    dense, model = flux_pair
    path = tmp_path / "m.safetensors"
    save_checkpoint(model.diffusion_model, path)
    patcher = SVDQuantModelPatcher(model, torch.device("cpu"), torch.device("cpu"))
    size = patcher.model_size()
    file_size = path.stat().st_size
    assert abs(size - file_size) < 0.05 * file_size  # same tensors, give or take the descriptors
    dense_size = comfy.model_management.module_size(dense.diffusion_model)
    assert size < 0.6 * dense_size  # tiny layers pad to 128 and keep a rank-16 branch
    assert TINY_FLUX["hidden_size"] == 128
    with torch.inference_mode():  # built outside inference mode, sized inside it (as ComfyUI samples)
        assert SVDQuantModelPatcher(model, torch.device("cpu"), torch.device("cpu")).model_size() == size
