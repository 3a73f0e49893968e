"""The SVDQuant FLUX checkpoints users already have (nunchaku's layout) load through the loader node in
the real ComfyUI, and the files our writer produces have the layout that ecosystem's loaders expect.

The nunchaku-layout files come from tests/nunchaku_fixture.py, which writes them from a dense tiny
FLUX following the published layout, independently of our writer and packing code. Each file comes
with the dense (weight, bias) every quantized ComfyUI Linear must reconstruct; the fixture's faults
write one piece the way a wrong reader would read it, to show that the checks here notice.
"""

import json
import logging

import pytest
import torch
from safetensors import safe_open

import nunchaku_fixture
from comfyui_svdquant.svdquant.layers import W4A4Linear, W4A16Linear
from conftest import load_node
from nunchaku_fixture import FAULTS, flux_checkpoint
from tiny_models import TINY_FLUX, flux_inputs, mapping_errors, quantize, relative_error, tiny_flux

H, M, RANK = TINY_FLUX["hidden_size"], int(TINY_FLUX["hidden_size"] * TINY_FLUX["mlp_ratio"]), 32
EXACT = 1e-5  # fp32 rounding of the same 16-bit tensors
MODEL_TOLERANCE = 0.1  # 4-bit activations; measured about 0.03


@pytest.fixture(scope="module")
def dense(comfy):
    return tiny_flux(seed=0)


@pytest.fixture(scope="module")
def reference(dense):
    inputs = flux_inputs(3)
    with torch.no_grad():
        return inputs, dense.diffusion_model(**inputs)


def output(patcher, inputs):
    with torch.no_grad():
        return patcher.model.diffusion_model(**inputs)


def test_fixture_and_core_pack_alike():
    """Two independent implementations of the published layout (the fixture's index arithmetic, the
    core's reshape/permute) agree bit for bit, padding sizes included."""
    from comfyui_svdquant.svdquant import packing

    g = torch.Generator().manual_seed(0)
    codes = torch.randint(-8, 8, (256, 384), generator=g)
    assert torch.equal(nunchaku_fixture.pack_qweight(codes), packing.pack_qweight(codes))
    scales = torch.randn(256, 6, generator=g).bfloat16()
    assert torch.equal(nunchaku_fixture.pack_scales(scales), packing.pack_scales(scales))
    assert torch.equal(nunchaku_fixture.pack_vector(scales[:, 0]), packing.pack_vector(scales[:, 0]))
    fp8 = torch.rand(256, 24, generator=g).to(torch.float8_e4m3fn)
    assert torch.equal(nunchaku_fixture.pack_fp8_scales(fp8).view(torch.uint8),
                       packing.pack_fp8_scales(fp8).view(torch.uint8))
    down, up = torch.randn(32, 384, generator=g).bfloat16(), torch.randn(256, 32, generator=g).bfloat16()
    assert torch.equal(nunchaku_fixture.pack_down(down), packing.pack_down(down))
    assert torch.equal(nunchaku_fixture.pack_up(up), packing.pack_up(up))
    awq = torch.randint(0, 16, (256, 384), generator=g)
    assert torch.equal(nunchaku_fixture.pack_awq(awq), packing.pack_awq_qweight(awq.to(torch.uint8)))


@pytest.mark.parametrize("precision", ["int4", "nvfp4"])
def test_row_slices_of_a_fused_layer_join_back_exactly(precision):
    """SDXL's q / k / v: cut out of one fused layer (64 rows each: not a multiple of the 128-row tile)
    and joined back, without requantizing."""
    from comfyui_svdquant.loaders.parts import join_rows, slice_rows
    from comfyui_svdquant.svdquant.layers import W4A4Linear

    g = torch.Generator().manual_seed(1)
    weight = torch.randn(192, 64, generator=g) / 8
    tensors, _, _ = nunchaku_fixture.w4a4(weight, None, nunchaku_fixture.smoothing(weight, torch.bfloat16), 16,
                                          precision, torch.bfloat16)
    names = dict(nunchaku_fixture.PYTHON_LEAVES)
    state = {names.get(k, k): v for k, v in tensors.items()}
    fused = W4A4Linear(64, 192, 16, precision, bias=False, device="meta")
    fused.load_state_dict(state, assign=True)
    full_weight, _ = fused.to_dense()
    pieces = [slice_rows(fused, start, 64) for start in (0, 64, 128)]
    for j, piece in enumerate(pieces):
        assert torch.equal(piece.to_dense()[0], full_weight[64 * j:64 * (j + 1)])
    joined = join_rows("to_qkv", pieces)
    for key, value in fused.state_dict().items():
        assert torch.equal(joined.state_dict()[key].view(torch.uint8), value.view(torch.uint8)), key


def test_published_file_loads_through_the_loader_node(dense, reference, model_folders):
    import comfy.ldm.flux.model

    from comfyui_svdquant.svdquant.layers import ConcatLinear, SplitInputLinear

    expected = flux_checkpoint(dense, model_folders["diffusion_models"] / "svdq-int4_r32-tiny.safetensors")
    patcher = load_node("svdq-int4_r32-tiny.safetensors")
    dm = patcher.model.diffusion_model
    assert type(dm) is comfy.ldm.flux.model.Flux
    assert max(mapping_errors(patcher.model, expected).values()) < EXACT
    linear1, linear2 = dm.single_blocks[0].linear1.quantized, dm.single_blocks[0].linear2.quantized
    assert isinstance(linear1, ConcatLinear) and [p.out_features for p in linear1.parts] == [3 * H, M]
    assert isinstance(linear2, SplitInputLinear) and [p.in_features for p in linear2.parts] == [H, M]
    # each half of linear2 keeps its own activation signedness: the MLP half reads a GELU output
    assert [p.act_unsigned for p in linear2.parts] == [False, True]
    inputs, want = reference
    assert relative_error(output(patcher, inputs), want) < MODEL_TOLERANCE


@pytest.mark.parametrize("variant", [
    {"naming": "python"},
    {"layout": "folder"},
    {"layout": "folder", "comfy_config": False},  # the oldest folders: config.json only
    {"linear2_bias": "attention"},
])
def test_other_layouts_load_the_same_model(dense, reference, model_folders, variant):
    folder = model_folders["diffusion_models"]
    expected = flux_checkpoint(dense, folder / "published.safetensors")
    name = "variant/" if variant.get("layout") == "folder" else "variant.safetensors"
    variant_expected = flux_checkpoint(dense, folder / name.rstrip("/"), **variant)
    published, other = load_node("published.safetensors"), load_node(name)
    assert max(mapping_errors(other.model, variant_expected).values()) < EXACT
    inputs, _ = reference
    if "linear2_bias" in variant:  # the real bias on the other half: only the summed bias matters
        assert max(mapping_errors(other.model, expected).values()) < 0.02  # 16-bit rounding of the two sums
        assert relative_error(output(other, inputs), output(published, inputs)) < 0.01
    else:  # the same tensors under other names or in other files
        assert torch.equal(output(other, inputs), output(published, inputs))


@pytest.mark.parametrize("overrides, model_class", [
    ({"in_channels": 96}, "FluxInpaint"),  # FLUX.1 Fill: image + mask channels
    ({"in_channels": 32}, "Flux"),  # FLUX.1 Depth / Canny: image + control channels
    ({"guidance_embed": False}, "FluxSchnell"),  # schnell: no guidance embedder
])
def test_model_variants_are_told_from_the_file(comfy, tmp_path, caplog, overrides, model_class):
    from comfyui_svdquant.loaders.load import architecture_of, load_checkpoint

    config = dict(TINY_FLUX, **overrides)
    variant = tiny_flux(seed=1, **overrides)
    path = tmp_path / "variant.safetensors"
    expected = flux_checkpoint(variant, path)
    if "in_channels" in overrides:  # some variant files carry the dev model's comfy_config
        with safe_open(str(path), "pt") as f:
            comfy_config = json.loads(f.metadata()["comfy_config"])
        comfy_config["model_config"]["in_channels"] = 16
        rewrite(path, path, metadata={"comfy_config": json.dumps(comfy_config)})
    with caplog.at_level(logging.WARNING, logger="comfyui_svdquant"):
        patcher = load_checkpoint(path, "bfloat16", "torch")
    assert type(patcher.model.model_config).__name__ == model_class
    assert architecture_of(patcher.model.diffusion_model)[1] == config
    assert ("in_channels" in overrides) == any("in_channels" in r.getMessage() for r in caplog.records)
    assert max(mapping_errors(patcher.model, expected).values()) < EXACT
    inputs = flux_inputs(3, config)
    with torch.no_grad():
        want = variant.diffusion_model(**inputs)
    assert relative_error(output(patcher, inputs), want) < MODEL_TOLERANCE


def test_nvfp4_file_loads_and_runs_on_the_reference_path(dense, reference, model_folders, caplog):
    """No FP4 here (a CPU): the file loads, runs on the reference path, and the log says so at load time,
    not per layer or per call."""
    expected = flux_checkpoint(dense, model_folders["diffusion_models"] / "svdq-fp4_r32-tiny.safetensors",
                               precision="nvfp4")
    with caplog.at_level(logging.INFO, logger="comfyui_svdquant"):
        patcher = load_node("svdq-fp4_r32-tiny.safetensors", kernel_backend="auto")
        at_load = [r.getMessage() for r in caplog.records]
        caplog.clear()
        inputs, want = reference
        out = output(patcher, inputs)
        output(patcher, inputs)
    assert any("reference path" in m for m in at_load) and any("nvfp4" in m for m in at_load)
    loaded = next(m for m in at_load if m.startswith("SVDQuant: loaded svdq-fp4_r32-tiny.safetensors"))
    leaves = sum(isinstance(m, (W4A4Linear, W4A16Linear)) for m in patcher.model.modules())
    assert f"; {leaves} layers on the PyTorch reference path (no CUDA kernels on cpu))" in loaded
    assert not [r for r in caplog.records if "reference path" in r.getMessage()]
    assert max(mapping_errors(patcher.model, expected).values()) < EXACT
    assert relative_error(out, want) < MODEL_TOLERANCE


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_files_16_bit_dtype_is_read_from_its_layers_for_nvfp4_too(dense, tmp_path, dtype):
    """NVFP4 weight scales are FP8: the file's 16-bit dtype (which decides the compute dtype on a GPU) comes
    from the smoothing factors, so an fp16 NVFP4 file is not taken for a bf16 one."""
    from comfyui_svdquant.loaders.architecture import all_layers
    from comfyui_svdquant.loaders.load import detect, stored_dtype
    from comfyui_svdquant.svdquant.checkpoint import CheckpointReader

    path = tmp_path / "svdq-fp4_r32-tiny.safetensors"
    flux_checkpoint(dense, path, precision="nvfp4", dtype=dtype)
    with CheckpointReader(path) as reader:
        architecture = detect(reader)
        layers = all_layers(architecture.blocks(architecture.unet_config(reader)))
        assert stored_dtype(reader, layers) == dtype


# Which ComfyUI Linears each fault touches (their file pieces are written the way a wrong mapping
# would read them); every other layer must still be exact.
FAULT_LAYERS = {
    "no_interleave": ("img_mod.lin", "txt_mod.lin", "modulation.lin"),
    "no_scale_bias": ("img_mod.lin", "txt_mod.lin", "modulation.lin"),
    "no_gelu_shift": ("img_mlp.2", "txt_mlp.2", "linear2"),
    "swap_qk": ("img_attn.qkv", "txt_attn.qkv", "linear1"),
    "wcscales_unpacked": ("qkv", "proj", "mlp.0", "mlp.2", "linear1", "linear2"),
    "no_wtscale": ("qkv", "proj", "mlp.0", "mlp.2", "linear1", "linear2"),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_each_mapped_piece_is_checked(dense, reference, tmp_path, fault):
    from comfyui_svdquant.loaders.load import load_checkpoint

    precision = "nvfp4" if fault in ("wcscales_unpacked", "no_wtscale") else "int4"
    expected = flux_checkpoint(dense, tmp_path / "faulty.safetensors", precision=precision, faults={fault})
    errors = mapping_errors(load_checkpoint(tmp_path / "faulty.safetensors", "bfloat16", "torch").model, expected)
    touched = {name for name in errors if name.endswith(FAULT_LAYERS[fault])}
    assert touched and min(errors[name] for name in touched) > 100 * EXACT
    assert max(errors[name] for name in set(errors) - touched) < EXACT


def test_split_linear2_needs_both_halves_and_their_biases(dense, tmp_path):
    """deepcompressor's split puts the real bias on the MLP half (zeros on the attention half); a reader
    that dropped that bias, or read the MLP half signed (its stored bias then lacks the GELU-shift term
    the runtime adds back), would compute another layer."""
    from comfyui_svdquant.loaders.load import load_checkpoint

    expected = flux_checkpoint(dense, tmp_path / "m.safetensors")
    body = load_checkpoint(tmp_path / "m.safetensors", "bfloat16", "torch").model.diffusion_model \
        .single_blocks[1].linear2.quantized
    want_weight, want_bias = expected["single_blocks.1.linear2"]

    def error() -> float:
        weight, bias = body.to_dense()
        return max(relative_error(weight, want_weight), relative_error(bias, want_bias))

    attention, mlp = body.parts
    assert error() < EXACT
    assert not attention.bias.any() and mlp.bias.any()
    mlp.bias, stored = None, mlp.bias
    assert error() > 0.5
    mlp.bias, mlp.act_unsigned = stored, False
    assert error() > 0.1


# --- what our writer produces ------------------------------------------------------------------
# The tensors of one checkpoint layer, as nunchaku's C++ engine registers them (src/Linear.cpp:
# GEMM_W4A4 registerParams qweight, wscales, bias, lora_down, lora_up, smooth, wtscale, wcscales;
# GEMV_AWQ qweight, wscales, wzeros, bias) plus smooth_orig, which deepcompressor's convert.py writes
# and the python backend (linear.py SVDQW4A4Linear.smooth_factor_orig) loads strictly.
W4A4_LEAVES = ("qweight", "wscales", "bias", "lora_down", "lora_up", "smooth", "smooth_orig")
NVFP4_LEAVES = ("wcscales", "wtscale")
W4A16_LEAVES = ("qweight", "wscales", "wzeros", "bias")
# Per block, from src/FluxModel.cpp (JointTransformerBlock / FluxSingleTransformerBlock registerChildren)
DOUBLE_W4A4 = {"qkv_proj": (H, 3 * H), "qkv_proj_context": (H, 3 * H), "out_proj": (H, H), "out_proj_context": (H, H),
               "mlp_fc1": (H, M), "mlp_fc2": (M, H), "mlp_context_fc1": (H, M), "mlp_context_fc2": (M, H)}
DOUBLE_W4A16 = {"norm1.linear": (H, 6 * H), "norm1_context.linear": (H, 6 * H)}
DOUBLE_NORMS = ("norm_q", "norm_k", "norm_added_q", "norm_added_k")
SINGLE_W4A4 = {"qkv_proj": (H, 3 * H), "out_proj": (H, H), "mlp_fc1": (H, M), "mlp_fc2": (M, H)}
SINGLE_W4A16 = {"norm.linear": (H, 3 * H)}
SINGLE_NORMS = ("norm_q", "norm_k")
# Outside the blocks: diffusers FluxTransformer2DModel names (transformer_flux.py loads them with
# load_state_dict into the diffusers model).
TOP = ("x_embedder", "context_embedder", "time_text_embed.timestep_embedder.linear_1",
       "time_text_embed.timestep_embedder.linear_2", "time_text_embed.guidance_embedder.linear_1",
       "time_text_embed.guidance_embedder.linear_2", "time_text_embed.text_embedder.linear_1",
       "time_text_embed.text_embedder.linear_2", "norm_out.linear", "proj_out")


def expected_layout(precision: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """key → (shape, safetensors dtype) of a tiny FLUX checkpoint (N, K padded to 128; rank 32)."""
    group, scale = (64, "BF16") if precision == "int4" else (16, "F8_E4M3")
    out = {}

    def w4a4(prefix, k, n):
        kp, np_ = -(-k // 128) * 128, -(-n // 128) * 128
        out.update({f"{prefix}.qweight": ((np_, kp // 2), "I8"), f"{prefix}.wscales": ((kp // group, np_), scale),
                    f"{prefix}.bias": ((np_,), "BF16"), f"{prefix}.lora_down": ((kp, RANK), "BF16"),
                    f"{prefix}.lora_up": ((np_, RANK), "BF16"), f"{prefix}.smooth": ((kp,), "BF16"),
                    f"{prefix}.smooth_orig": ((kp,), "BF16")})
        if precision == "nvfp4":
            out.update({f"{prefix}.wcscales": ((np_,), "BF16"), f"{prefix}.wtscale": ((1,), "BF16")})

    def w4a16(prefix, k, n):  # C++ GEMV_AWQ: qweight (N/4, K/2) int32, wscales / wzeros (K/64, N)
        out.update({f"{prefix}.qweight": ((n // 4, k // 2), "I32"), f"{prefix}.wscales": ((k // 64, n), "BF16"),
                    f"{prefix}.wzeros": ((k // 64, n), "BF16"), f"{prefix}.bias": ((n,), "BF16")})

    for i in range(TINY_FLUX["depth"]):
        for name, (k, n) in DOUBLE_W4A4.items():
            w4a4(f"transformer_blocks.{i}.{name}", k, n)
        for name, (k, n) in DOUBLE_W4A16.items():
            w4a16(f"transformer_blocks.{i}.{name}", k, n)
        out.update({f"transformer_blocks.{i}.{name}.weight": ((H // TINY_FLUX["num_heads"],), "BF16")
                    for name in DOUBLE_NORMS})
    for i in range(TINY_FLUX["depth_single_blocks"]):
        for name, (k, n) in SINGLE_W4A4.items():
            w4a4(f"single_transformer_blocks.{i}.{name}", k, n)
        for name, (k, n) in SINGLE_W4A16.items():
            w4a16(f"single_transformer_blocks.{i}.{name}", k, n)
        out.update({f"single_transformer_blocks.{i}.{name}.weight": ((H // TINY_FLUX["num_heads"],), "BF16")
                    for name in SINGLE_NORMS})
    c, v, ctx = TINY_FLUX["in_channels"] * 4, TINY_FLUX["vec_in_dim"], TINY_FLUX["context_in_dim"]
    shapes = {"x_embedder": (H, c), "context_embedder": (H, ctx),
              "time_text_embed.timestep_embedder.linear_1": (H, 256),
              "time_text_embed.timestep_embedder.linear_2": (H, H),
              "time_text_embed.guidance_embedder.linear_1": (H, 256),
              "time_text_embed.guidance_embedder.linear_2": (H, H), "time_text_embed.text_embedder.linear_1": (H, v),
              "time_text_embed.text_embedder.linear_2": (H, H), "norm_out.linear": (2 * H, H),
              "proj_out": (TINY_FLUX["out_channels"] * 4, H)}
    for name in TOP:
        out[f"{name}.weight"] = (shapes[name], "BF16")
        out[f"{name}.bias"] = ((shapes[name][0],), "BF16")
    return out


def file_layout(path) -> tuple[dict[str, tuple[tuple[int, ...], str]], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return ({k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()},
                f.metadata())


def check_metadata(metadata: dict[str, str], precision: str) -> None:
    """The entries nunchaku's loaders read (transformer_flux.py _build_model: config;
    quantization_config; ComfyUI-nunchaku nodes/models/flux.py: comfy_config), in merge_safetensors.py's format."""
    assert metadata["model_class"] == "NunchakuFluxTransformer2dModel"
    fp4 = precision == "nvfp4"
    fmt = "fp4_e2m1_all" if fp4 else "int4"
    assert json.loads(metadata["quantization_config"]) == {
        "method": "svdquant", "rank": RANK,
        "weight": {"dtype": fmt, "scale_dtype": [None, "fp8_e4m3_nan"] if fp4 else None,
                   "group_size": 16 if fp4 else 64},
        "activation": {"dtype": fmt, "scale_dtype": "fp8_e4m3_nan" if fp4 else None, "group_size": 16 if fp4 else 64}}
    config = json.loads(metadata["config"])
    assert config["_class_name"] == "FluxTransformer2DModel"
    assert {k: config[k] for k in ("in_channels", "num_layers", "num_single_layers", "attention_head_dim",
                                   "num_attention_heads", "joint_attention_dim", "pooled_projection_dim",
                                   "guidance_embeds", "axes_dims_rope", "patch_size")} == {
        "in_channels": 64, "num_layers": 2, "num_single_layers": 2, "attention_head_dim": 64, "num_attention_heads": 2,
        "joint_attention_dim": 64, "pooled_projection_dim": 32, "guidance_embeds": True, "axes_dims_rope": [16, 24, 24],
        "patch_size": 1}
    comfy_config = json.loads(metadata["comfy_config"])
    assert comfy_config["model_class"] == "Flux"
    model_config = comfy_config["model_config"]
    assert model_config.pop("disable_unet_model_creation") is True
    assert model_config == TINY_FLUX


@pytest.mark.parametrize("precision", ["int4", "nvfp4"])
def test_saved_loaded_file_has_the_published_layout(dense, reference, tmp_path, precision):
    from comfyui_svdquant.loaders.load import load_checkpoint
    from comfyui_svdquant.loaders.save import save_checkpoint

    flux_checkpoint(dense, tmp_path / "published.safetensors", precision=precision)
    model = load_checkpoint(tmp_path / "published.safetensors", "bfloat16", "torch").model
    save_checkpoint(model.diffusion_model, tmp_path / "ours.safetensors")
    layout, metadata = file_layout(tmp_path / "ours.safetensors")
    assert layout == expected_layout(precision)
    check_metadata(metadata, precision)
    inputs, _ = reference
    again = load_checkpoint(tmp_path / "ours.safetensors", "bfloat16", "torch").model
    with torch.no_grad():
        assert torch.equal(again.diffusion_model(**inputs), model.diffusion_model(**inputs))
    # every tensor but the modulation layers' padded group rows is the published file's, byte for byte
    with safe_open(str(tmp_path / "published.safetensors"), "pt") as theirs, \
            safe_open(str(tmp_path / "ours.safetensors"), "pt") as ours:
        for key in ours.keys():
            a, b = theirs.get_tensor(key), ours.get_tensor(key)
            if key.endswith((".wscales", ".wzeros")) and a.shape != b.shape:
                a = a[: b.shape[0]]
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), key


def test_quantized_model_saves_in_the_published_layout(dense, tmp_path):
    """Our own quantizer's output, not only a re-saved published file (NVFP4: the MLP half of linear2
    has no bias of its own in the model, yet the file must hold one)."""
    from comfyui_svdquant.loaders.save import save_checkpoint
    from comfyui_svdquant.svdquant.quantizer import QuantizeConfig

    calls = [lambda: dense.diffusion_model(**flux_inputs(0))]
    for precision in ("int4", "nvfp4"):
        config = QuantizeConfig(precision=precision, rank=RANK, smooth_grid=(0.5,), svd_rounds=1)
        model = quantize(dense, calls, config)
        save_checkpoint(model.diffusion_model, tmp_path / f"{precision}.safetensors")
        layout, metadata = file_layout(tmp_path / f"{precision}.safetensors")
        want = expected_layout(precision)
        if precision == "nvfp4":  # our quantizer keeps the per-tensor scale in 16 bits; the engine also takes F32
            assert all(layout[k][1] in ("BF16", "F32") for k in layout if k.endswith(".wtscale"))
            layout = {k: (v[0], "BF16") if k.endswith(".wtscale") else v for k, v in layout.items()}
        assert layout == want
        check_metadata(metadata, precision)


# --- bad input ----------------------------------------------------------------------------------

def rewrite(src, dst, drop=(), metadata=None):
    """A copy of checkpoint ``src`` without the keys ``drop`` and with ``metadata`` entries replaced."""
    from safetensors.torch import save_file

    with safe_open(str(src), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k not in drop}
        meta = dict(f.metadata(), **(metadata or {}))
    save_file(tensors, str(dst), metadata=meta)


@pytest.fixture(scope="module")
def published(dense, tmp_path_factory):
    path = tmp_path_factory.mktemp("published") / "svdq-int4_r32-tiny.safetensors"
    flux_checkpoint(dense, path)
    return path


@pytest.mark.parametrize("problem, change, message", [
    ("unknown model_class", {"metadata": {"model_class": "NunchakuSanaTransformer2DModel", "comfy_config": "{}"},
                             "drop": ("x_embedder.weight",)},
     "model_class 'NunchakuSanaTransformer2DModel' is not a model this pack loads"),
    ("missing tensor", {"drop": ("single_transformer_blocks.1.mlp_fc2.wscales",)},
     "'single_transformer_blocks.1.mlp_fc2.wscales' is missing"),
    ("missing 16-bit tensor", {"drop": ("norm_out.linear.weight",)}, "'norm_out.linear.weight'"),
    ("rank contradicted", {"metadata": {"quantization_config": json.dumps(
        {"method": "svdquant", "weight": {"dtype": "int4", "group_size": 64}, "rank": 16})}},
     "has rank 32, but the metadata's 'quantization_config' says rank 16"),
    ("group size contradicted", {"metadata": {"quantization_config": json.dumps(
        {"method": "svdquant", "weight": {"dtype": "int4", "group_size": 128}, "rank": 32})}},
     "group size 128"),
    ("precision contradicted", {"metadata": {"quantization_config": json.dumps(
        {"method": "svdquant", "weight": {"dtype": "fp4_e2m1_all", "group_size": 16}, "rank": 32})}},
     "but the metadata says the checkpoint is nvfp4"),
])
def test_bad_file_is_refused_naming_file_and_problem(published, model_folders, problem, change, message):
    import comfy.model_management

    from comfyui_svdquant.nodes.loader import SVDQuantModelLoader
    from comfyui_svdquant.svdquant.errors import CheckpointError

    path = model_folders["diffusion_models"] / "bad.safetensors"
    rewrite(published, path, **change)
    loaded = len(comfy.model_management.current_loaded_models)
    with pytest.raises(CheckpointError) as info:
        SVDQuantModelLoader.execute("bad.safetensors", "bfloat16", "torch")
    assert str(path) in str(info.value) and message in str(info.value), (problem, str(info.value))
    assert len(comfy.model_management.current_loaded_models) == loaded  # nothing half-loaded
    path.unlink()  # no handle left open on the file


@pytest.mark.parametrize("damage", ["truncated", "garbage", "header"])
def test_corrupt_file_is_refused(published, model_folders, damage):
    from comfyui_svdquant.nodes.loader import SVDQuantModelLoader
    from comfyui_svdquant.svdquant.errors import CheckpointError

    data = published.read_bytes()
    data = {"truncated": data[: len(data) // 2], "garbage": b"\x00\x13junk" * 100,
            "header": data[:8] + b"{not json" + data[17:]}[damage]
    path = model_folders["diffusion_models"] / "corrupt.safetensors"
    path.write_bytes(data)
    with pytest.raises(CheckpointError) as info:
        SVDQuantModelLoader.execute("corrupt.safetensors", "bfloat16", "torch")
    assert str(path) in str(info.value)
    path.unlink()
