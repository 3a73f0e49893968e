"""SVDQuant Z-Image-Turbo on ComfyUI's own NextDiT (``supported_models.ZImage``): the authors' files
(written by tests/zimage_fixture.py from a dense tiny Z-Image, independently of our writer) through the
loader node, and back out through our writer. ComfyUI versions without Z-Image skip, saying so."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import load_node
from nunchaku_fixture import quantization_config
from tiny_models import mapping_errors, quantize, relative_error
from tiny_zimage import TINY_ZIMAGE, tiny_zimage, zimage_inputs, zimage_shapes
from zimage_fixture import zimage_checkpoint

EXACT = 1e-5  # fp32 rounding of the same 16-bit tensors, as for FLUX
MODEL_TOLERANCE = 0.25  # 4-bit activations through 6 blocks of a 256-wide model; measured 0.13 (INT4, rank 32)


@pytest.fixture(scope="module")
def zimage_comfy(comfy):
    import comfy.supported_models

    if not hasattr(comfy.supported_models, "ZImage"):
        from comfyui_svdquant.loaders.compat import version

        pytest.skip(f"ComfyUI {'.'.join(map(str, version() or ()))} has no Z-Image (supported_models.ZImage, "
                    "comfy/ldm/lumina with z_image_modulation: ComfyUI 0.8.0 and newer)")
    return comfy


@pytest.fixture(scope="module")
def dense(zimage_comfy):
    return tiny_zimage(seed=0)


@pytest.fixture(scope="module")
def reference(dense):
    inputs = zimage_inputs(3)
    with torch.no_grad():
        return inputs, dense.diffusion_model(**inputs)


@pytest.mark.parametrize("precision", ["int4", "nvfp4"])
@pytest.mark.parametrize("rank", [128, 256])
def test_published_file_loads_through_the_loader_node(dense, reference, model_folders, precision, rank):
    import comfy.supported_models
    from comfy.ldm.lumina.model import NextDiT

    from comfyui_svdquant.loaders.load import architecture_of

    name = f"svdq-{'fp4' if precision == 'nvfp4' else precision}_r{rank}-tiny-z-image-turbo.safetensors"
    expected = zimage_checkpoint(dense, model_folders["diffusion_models"] / name, precision=precision, rank=rank)
    patcher = load_node(name)
    dm = patcher.model.diffusion_model
    assert type(dm) is NextDiT and type(patcher.model.model_config) is comfy.supported_models.ZImage
    assert architecture_of(dm)[1] == TINY_ZIMAGE  # the shape came from the file's tensors and config
    assert max(mapping_errors(patcher.model, expected).values()) < EXACT
    # ComfyUI's separate w1 / w3 are row slices of the file's fused net.0.proj: one input side, one branch
    ff = dm.layers[1].feed_forward
    w1, w3 = ff.w1.quantized, ff.w3.quantized
    assert torch.equal(w1.smooth_factor, w3.smooth_factor) and torch.equal(w1.proj_down, w3.proj_down)
    assert w1.rank == rank and w1.precision == precision and w1.bias is None
    inputs, want = reference
    with torch.no_grad():
        assert relative_error(dm(**inputs), want) < MODEL_TOLERANCE


def test_gate_and_value_halves_are_checked(dense, tmp_path):
    """A file whose fused feed-forward holds w1 ‖ w3 (gate first): w1 and w3 no longer match, the rest does."""
    from comfyui_svdquant.loaders.load import load_checkpoint

    expected = zimage_checkpoint(dense, tmp_path / "swapped.safetensors", faults={"swap_w13"})
    errors = mapping_errors(load_checkpoint(tmp_path / "swapped.safetensors", "bfloat16", "torch").model, expected)
    for name, error in errors.items():
        assert (error > 0.1) if name.endswith(("feed_forward.w1", "feed_forward.w3")) else (error < EXACT), name


def test_file_with_16_bit_refiners_is_refused_naming_it(dense, tmp_path):
    from comfyui_svdquant.loaders.load import load_checkpoint
    from comfyui_svdquant.svdquant.errors import CheckpointError

    path = tmp_path / "skip.safetensors"
    zimage_checkpoint(dense, path)
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if "refiner" not in k or ".attention.to_qkv." not in k}
        metadata = f.metadata()
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(CheckpointError, match="skip.safetensors.*refiner blocks are 16-bit"):
        load_checkpoint(path, "bfloat16", "torch")


def test_old_comfyui_gets_a_message_naming_the_version_needed(comfy, tmp_path):
    import comfy.supported_models

    from comfyui_svdquant.loaders.load import load_checkpoint
    from comfyui_svdquant.svdquant.errors import SVDQuantError

    if hasattr(comfy.supported_models, "ZImage"):
        pytest.skip("this ComfyUI has Z-Image: the message is for versions without it (v0.3.64)")
    path = tmp_path / "svdq-int4_r32-z-image-turbo.safetensors"
    save_file({"layers.0.attention.to_qkv.qweight": torch.zeros(384, 64, dtype=torch.int8),
               "cap_embedder.1.weight": torch.zeros(256, 64, dtype=torch.bfloat16)}, str(path),
              metadata={"model_class": "NunchakuZImageTransformer2DModel",
                        "quantization_config": quantization_config("int4", 32)})
    with pytest.raises(SVDQuantError, match="Z-Image model, which needs ComfyUI 0.8.0 or newer"):
        load_checkpoint(path, "bfloat16", "torch")


def published_keys(path) -> set[str]:
    with safe_open(str(path), "pt") as f:
        return set(f.keys())


@pytest.mark.parametrize("precision", ["int4", "nvfp4"])
def test_saved_file_is_the_published_file(dense, reference, tmp_path, precision):
    """Load the authors' file, save it with our writer: the same tensors, byte for byte (w1 / w3 joined back
    into the fused net.0.proj), python leaf names, and metadata the authors' loaders read."""
    from comfyui_svdquant.loaders.load import load_checkpoint
    from comfyui_svdquant.loaders.save import save_checkpoint

    zimage_checkpoint(dense, tmp_path / "published.safetensors", precision=precision, rank=128)
    model = load_checkpoint(tmp_path / "published.safetensors", "bfloat16", "torch").model
    save_checkpoint(model.diffusion_model, tmp_path / "ours.safetensors")
    with safe_open(str(tmp_path / "published.safetensors"), "pt") as theirs, \
            safe_open(str(tmp_path / "ours.safetensors"), "pt") as ours:
        assert set(ours.keys()) == set(theirs.keys())
        assert "layers.0.feed_forward.net.0.proj.proj_down" in ours.keys()
        for key in ours.keys():
            a, b = theirs.get_tensor(key), ours.get_tensor(key)
            assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8)), key
        metadata, published = ours.metadata(), theirs.metadata()
    assert metadata["model_class"] == "NunchakuZImageTransformer2DModel"
    assert json.loads(metadata["quantization_config"]) == json.loads(published["quantization_config"])
    assert json.loads(metadata["config"]) == json.loads(published["config"])  # the diffusers config
    inputs, _ = reference
    again = load_checkpoint(tmp_path / "ours.safetensors", "bfloat16", "torch").model
    with torch.no_grad():
        assert torch.equal(again.diffusion_model(**inputs), model.diffusion_model(**inputs))


def test_quantized_model_saves_in_the_published_layout(dense, reference, model_folders):
    """Our quantizer's Z-Image: w1 / w3 quantized as the one fused layer the format stores (one smoothing,
    one branch), saved as the authors' layout and loaded back through the node unchanged."""
    from comfyui_svdquant.loaders.save import save_checkpoint
    from comfyui_svdquant.svdquant.quantizer import QuantizeConfig

    calls = [lambda s=s: dense.diffusion_model(**zimage_inputs(s)) for s in range(2)]
    model = quantize(dense, calls, QuantizeConfig(rank=32, smooth_grid=(0.5,), svd_rounds=1))
    ours = model_folders["diffusion_models"] / "ours.safetensors"
    save_checkpoint(model.diffusion_model, ours)
    published = model_folders["diffusion_models"] / "published.safetensors"
    zimage_checkpoint(dense, published, rank=32)
    assert published_keys(ours) == published_keys(published)
    inputs, want = reference
    with torch.no_grad():
        out = model.diffusion_model(**inputs)
        assert torch.equal(load_node("ours.safetensors").model.diffusion_model(**inputs), out)
    assert relative_error(out, want) < MODEL_TOLERANCE


def test_feed_forward_kept_16_bit_loads_as_its_two_linears(dense, reference, tmp_path):
    """The pack's extension of the format (loaders/dense_layers.py): a layer kept 16-bit is stored as a plain
    ``weight``; the fused net.0.proj of the first main block then gives ComfyUI's w3 and w1 their rows."""
    from comfyui_svdquant.loaders.load import load_checkpoint

    path = tmp_path / "kept.safetensors"
    zimage_checkpoint(dense, path)
    prefix = "layers.0.feed_forward.net.0.proj"
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if not k.startswith(prefix + ".")}
        metadata = f.metadata()
    ff = dense.diffusion_model.layers[0].feed_forward
    tensors[f"{prefix}.weight"] = torch.cat([ff.w3.weight, ff.w1.weight]).detach().bfloat16()
    save_file(tensors, str(path), metadata=metadata)
    dm = load_checkpoint(path, "bfloat16", "torch").model.diffusion_model
    for name in ("w1", "w3"):
        linear = getattr(dm.layers[0].feed_forward, name)
        assert linear.quantized is None and torch.equal(linear.weight, getattr(ff, name).weight), name
    assert dm.layers[0].feed_forward.w2.quantized is not None and dm.layers[1].feed_forward.w1.quantized is not None
    inputs, want = reference
    with torch.no_grad():
        assert relative_error(dm(**inputs), want) < MODEL_TOLERANCE


def test_real_z_image_turbo_shapes_give_comfyuis_own_config(zimage_comfy):
    """Z-Image-Turbo's own shapes (dim 3840, 30 heads, 30 blocks, Qwen3-4B's 2560-wide text): ComfyUI's table
    matches them itself, and the layer table has the published widths."""
    import comfy.model_detection
    import comfy.supported_models

    from comfyui_svdquant.loaders import detection
    from comfyui_svdquant.loaders.architecture import all_layers
    from comfyui_svdquant.loaders.zimage import ZImageArchitecture

    real = dict(TINY_ZIMAGE, dim=3840, cap_feat_dim=2560, n_layers=30, n_heads=30, n_kv_heads=30)
    shapes = zimage_shapes(real)
    config = detection.model_config(ZImageArchitecture(), shapes)
    assert type(config) is comfy.supported_models.ZImage
    comfys_own = comfy.model_detection.detect_unet_config(shapes, "")
    assert {k: config.unet_config[k] for k in comfys_own} == comfys_own  # nothing of ComfyUI's is overridden
    assert config.unet_config["n_refiner_layers"] == 2
    widths = {layer.module.split(".", 2)[2]: (layer.in_features, layer.out_features)
              for layer in all_layers(ZImageArchitecture().blocks(config.unet_config))}
    assert widths == {"attention.qkv": (3840, 11520), "attention.out": (3840, 3840), "feed_forward.w1": (3840, 10240),
                      "feed_forward.w3": (3840, 10240), "feed_forward.w2": (10240, 3840)}
