"""LoRA on SVDQuant models in the real ComfyUI: ComfyUI's own LoRA nodes and the pack's LoRA stack,
against the same LoRA files applied by ComfyUI to the dense dequantized model.

The dense reference is the SVDQuant model with every quantized layer replaced by its dequantized
fp32 weight (``to_dense()``), so the 4-bit weight error is common to both sides. A LoRA pair on a
quantized layer is exact: the change it makes to that layer's output matches the dense layer's
change to bf16 rounding (the precise comparison, done layer by layer). The whole model's output
also carries the 4-bit *activation* rounding, which the dense model does not have and which a
changed input re-rounds differently; so whole-model outputs match the dense model to the model's own
quantization error, and match each other (stack vs ComfyUI's loader, low-VRAM vs normal, one branch
vs the other) bit for bit.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging

import pytest
import safetensors.torch
import torch

from conftest import prompt_executor
from tiny_models import TINY_FLUX, TINY_SDXL, flux_inputs, quantize, relative_error, sdxl_inputs, tiny_flux, tiny_sdxl

H = TINY_FLUX["hidden_size"]
M = int(H * TINY_FLUX["mlp_ratio"])
IMG = TINY_FLUX["in_channels"] * 4  # img_in reads 2×2 patches
LAYER_TOLERANCE = 1e-2  # bf16 rounding of the LoRA factors and of the branch's intermediate activation
FAMILIES = {"flux": (tiny_flux, flux_inputs), "sdxl": (tiny_sdxl, sdxl_inputs)}


@pytest.fixture(scope="module")
def models(comfy, tmp_path_factory):
    """family → (tiny SVDQuant model, its dequantized fp32 twin); built once. FLUX comes from the pack's
    real quantizer; SDXL (whose fused q/k/v the quantizer does not make yet) from a checkpoint in
    nunchaku's SDXL layout read by the pack's loader."""
    from comfyui_svdquant.loaders.load import load_checkpoint
    from comfyui_svdquant.svdquant.quantizer import QuantizeConfig
    from nunchaku_fixture import sdxl_checkpoint

    built = {}

    def get(family: str):
        if family not in built:
            make, inputs = FAMILIES[family]
            dense = make(seed=0)
            if family == "flux":
                calls = [lambda s=s: dense.diffusion_model(**inputs(s)) for s in range(2)]
                model = quantize(dense, calls, QuantizeConfig(rank=16, smooth_grid=(0.5,), svd_rounds=2))
            else:
                path = tmp_path_factory.mktemp("sdxl") / "tiny-sdxl-svdq.safetensors"
                sdxl_checkpoint(dense, path, TINY_SDXL, rank=16)
                model = load_checkpoint(path, "bfloat16", "torch").model
            built[family] = model, dequantize(model)
        return built[family]

    return get


def dequantize(model):
    """The same model in fp32 with each quantized layer replaced by its dense equivalent."""
    from comfyui_svdquant.loaders.ops import quantized_ops

    model = copy.deepcopy(model, {id(model.model_config): model.model_config})  # ComfyUI's config is shared, not copied
    for name, op in quantized_ops(model.diffusion_model):
        weight, bias = op.quantized.to_dense()
        linear = torch.nn.Linear(op.in_features, op.out_features, bias=bias is not None)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if bias is not None:
                linear.bias.copy_(bias)
        model.diffusion_model.set_submodule(name, linear)
    return model.float()


@pytest.fixture
def patchers(request, models):
    """(SVDQuant ModelPatcher, dense ModelPatcher) of the FLUX model (or of the family given by
    indirect parametrization); everything they patched is undone afterwards."""
    with cpu_patchers(*models(getattr(request, "param", "flux"))) as pair:
        yield pair


@contextlib.contextmanager
def cpu_patchers(quantized, *dense):
    """An SVDQuantModelPatcher of ``quantized`` and ComfyUI's ModelPatcher of each of ``dense``, on the CPU;
    everything they patched is undone afterwards."""
    import comfy.model_management
    import comfy.model_patcher

    from comfyui_svdquant.loaders.patcher import SVDQuantModelPatcher

    cpu = torch.device("cpu")
    made = (SVDQuantModelPatcher(quantized, cpu, cpu), *(comfy.model_patcher.ModelPatcher(m, cpu, cpu) for m in dense))
    try:
        yield made
    finally:
        comfy.model_management.unload_all_models()
        for patcher in made:
            patcher.unpatch_model()


# --- LoRA files -----------------------------------------------------------------------------------

def lora_pair(n: int, k: int, seed: int, rank: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) in bf16, large enough to change the model visibly."""
    g = torch.Generator().manual_seed(seed)
    up = torch.randn(n, rank, generator=g) * 0.6 / rank**0.5
    down = torch.randn(rank, k, generator=g) / k**0.5
    return up.bfloat16(), down.bfloat16()


LORA_NAMES = {"peft": ("{}.lora_B.weight", "{}.lora_A.weight"), "kohya": ("{}.lora_up.weight", "{}.lora_down.weight"),
              "diffusers": ("{}_lora.up.weight", "{}_lora.down.weight")}  # (up, down) tensor names


def write_lora(folder, name: str, layers: dict[str, tuple[int, int]], style: str, seed: int = 0,
               alpha: float | None = None) -> str:
    """A LoRA file whose tensors are named in ``style`` (see LORA_NAMES), with an alpha if given."""
    tensors = {}
    for i, (prefix, (n, k)) in enumerate(layers.items()):
        up, down = lora_pair(n, k, seed * 1000 + i)
        up_name, down_name = LORA_NAMES[style]
        tensors.update({up_name.format(prefix): up, down_name.format(prefix): down})
        if alpha is not None:
            tensors[f"{prefix}.alpha"] = torch.tensor(alpha)
    safetensors.torch.save_file(tensors, str(folder / name))
    return name


# Every FLUX LoRA naming ComfyUI maps (comfy/lora.py model_lora_keys_unet, comfy/utils.flux_to_diffusers),
# over every kind of quantized layer: fused qkv slices, W4A16 modulation (interleaved outputs), the
# single block's linear1 (qkv ‖ mlp: slices in either part, or both) and linear2 (input split in two),
# GELU-input layers, and 16-bit layers (img_in, final layer).
FORMATS = {
    "diffusers": ("peft", None, {
        "transformer.transformer_blocks.0.attn.to_q": (H, H),
        "transformer.transformer_blocks.0.attn.to_k": (H, H),
        "transformer.transformer_blocks.0.attn.add_v_proj": (H, H),
        "transformer.transformer_blocks.0.attn.to_out.0": (H, H),
        "transformer.transformer_blocks.0.attn.to_add_out": (H, H),
        "transformer.transformer_blocks.1.ff.net.0.proj": (M, H),
        "transformer.transformer_blocks.1.ff_context.net.2": (H, M),
        "transformer.transformer_blocks.1.norm1_context.linear": (6 * H, H),
        "transformer.single_transformer_blocks.0.attn.to_v": (H, H),
        "transformer.single_transformer_blocks.0.proj_mlp": (M, H),
        "transformer.single_transformer_blocks.1.proj_out": (H, H + M),
        "transformer.single_transformer_blocks.1.norm.linear": (3 * H, H),
        "transformer.x_embedder": (H, IMG),
    }),
    "kohya": ("kohya", 2.0, {
        "lora_unet_double_blocks_0_img_attn_qkv": (3 * H, H),
        "lora_unet_double_blocks_1_txt_mlp_2": (H, M),
        "lora_unet_double_blocks_0_img_mod_lin": (6 * H, H),
        "lora_unet_single_blocks_0_linear1": (3 * H + M, H),
        "lora_unet_single_blocks_1_linear2": (H, H + M),
        "lora_unet_single_blocks_0_modulation_lin": (3 * H, H),
        "lora_unet_final_layer_linear": (IMG, H),
    }),
    "bfl": ("peft", None, {
        "diffusion_model.double_blocks.1.img_attn.proj": (H, H),
        "diffusion_model.double_blocks.0.txt_attn.qkv": (3 * H, H),
        "diffusion_model.double_blocks.1.txt_mod.lin": (6 * H, H),
        "diffusion_model.single_blocks.0.linear1_qkv": (3 * H, H),
        "diffusion_model.single_blocks.1.linear1": (3 * H + M, H),
        "diffusion_model.single_blocks.0.linear2": (H, H + M),
        "diffusion_model.img_in": (H, IMG),
    }),
    "onetrainer-lycoris": ("kohya", 8.0, {
        "lora_transformer_single_transformer_blocks_1_proj_mlp": (M, H),
        "lora_transformer_single_transformer_blocks_1_attn_to_q": (H, H),
        "lora_transformer_transformer_blocks_1_attn_to_k": (H, H),
        "lycoris_transformer_blocks_0_attn_add_q_proj": (H, H),
        "lycoris_transformer_blocks_1_ff_net_2": (H, M),
    }),
}


# --- helpers --------------------------------------------------------------------------------------

def inputs_pair(seed: int, family: str = "flux") -> tuple[dict, dict]:
    """The same inputs for the bf16 SVDQuant model and the fp32 dense one."""
    bf16 = FAMILIES[family][1](seed)
    return bf16, {k: v.float() if v.is_floating_point() else v for k, v in bf16.items()}


def run(patcher, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return patcher.model.diffusion_model(**inputs)


@contextlib.contextmanager
def patched(*patchers, **kwargs):
    for p in patchers:
        p.patch_model(**kwargs)
    try:
        yield
    finally:
        for p in patchers:
            p.unpatch_model()


def lora_only(patcher, name: str, strength: float):
    import nodes

    return nodes.LoraLoaderModelOnly().load_lora_model_only(patcher, name, strength)[0]


def stack(patcher, loras: list[tuple[str, float]], rank: int = 64):
    from comfyui_svdquant.nodes.lora import SVDQuantLoraStack

    slots = {}
    for i, (name, strength) in enumerate(loras, 1):
        slots.update({f"lora_{i}": name, f"strength_{i}": strength})
    return SVDQuantLoraStack.execute(patcher, adapter_svd_rank=rank, **slots).args[0]


def layer_errors(q_lora, d_lora) -> dict[str, float]:
    """For every quantized layer the (patched) LoRAs touch: the relative difference between the
    change of its output and the change of the dense layer's output (ComfyUI's dense patch)."""
    out = {}
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for key in d_lora.patches:
            name = key[len("diffusion_model."):-len(".weight")]
            op = q_lora.model.diffusion_model.get_submodule(name)
            if getattr(op, "quantized", None) is None:
                continue
            dense_change = d_lora.model.diffusion_model.get_submodule(name).weight - d_lora.backup[key].weight
            x = torch.randn(16, op.in_features, generator=g)
            out[name] = relative_error(op(x) - op.quantized(x), x @ dense_change.T)
    return out


def assert_16bit_layers_dense_patched(q_lora, d_lora) -> int:
    """16-bit layers carry ComfyUI's ordinary merged weight: the dense patch, rounded to bf16."""
    count = 0
    for key in d_lora.patches:
        op = q_lora.model.diffusion_model.get_submodule(key[len("diffusion_model."):-len(".weight")])
        if getattr(op, "quantized", None) is None:
            dense = d_lora.model.diffusion_model.get_submodule(key[len("diffusion_model."):-len(".weight")]).weight
            assert torch.equal(op.weight, dense.to(op.weight.dtype)), key
            count += 1
    return count


def patch_count(patcher) -> int:
    return sum(len(v) for v in patcher.patches.values())


def lora_against_16bit(patchers, name: str, strength: float, entries: int, run_model, caplog) -> dict[str, float]:
    """LoRA ``name`` through ComfyUI's LoraLoaderModelOnly on (4-bit, its dequantized fp32 twin, the 16-bit
    model it was made from): checks that each of the LoRA's ``entries`` found its layer, that every quantized
    layer's change is ComfyUI's dense patch to bf16 rounding and every 16-bit layer's is ComfyUI's own, and that
    the unpatched model is untouched; returns the whole-model relative errors the tests bound (the tolerances
    are each model's own): ``quantization`` (4-bit vs 16-bit), ``lora`` (16-bit with vs without the LoRA),
    ``with_lora`` (4-bit vs 16-bit, both with it), ``dequantized`` / ``dequantized_base`` (4-bit vs its
    dequantized twin, with and without it). ``run_model(patcher, fp32)``: the model's output on fixed inputs."""
    q, d, sixteen = patchers
    q_base, d_base, s_base = run_model(q, False), run_model(d, True), run_model(sixteen, False)
    with caplog.at_level(logging.WARNING):
        q_lora, d_lora, s_lora = (lora_only(p, name, strength) for p in patchers)
    assert "lora key not loaded" not in caplog.text and "NOT LOADED" not in caplog.text
    assert patch_count(q_lora) == patch_count(d_lora) == patch_count(s_lora) == entries
    with patched(q_lora, d_lora, s_lora):
        q_out, d_out, s_out = run_model(q_lora, False), run_model(d_lora, True), run_model(s_lora, False)
        errors = layer_errors(q_lora, d_lora)
        sixteen_bit = assert_16bit_layers_dense_patched(q_lora, d_lora)
    assert len(errors) + sixteen_bit == len(q_lora.patches)
    assert max(errors.values()) < LAYER_TOLERANCE, errors  # exact per layer, to bf16 rounding
    assert torch.equal(run_model(q, False), q_base)  # unpatched: the base model is untouched
    return {"quantization": relative_error(q_base, s_base), "lora": relative_error(s_out, s_base),
            "with_lora": relative_error(q_out, s_out), "dequantized": relative_error(q_out, d_out),
            "dequantized_base": relative_error(q_base, d_base)}


# --- tests ----------------------------------------------------------------------------------------

def assert_comfy_lora_loader_matches_dense_lora(patchers, folder, fmt: str, spec: tuple, family: str, caplog,
                                                strength: float = 1.0) -> None:
    style, alpha, layers = spec
    name = write_lora(folder, f"{fmt}.safetensors", layers, style, seed=1, alpha=alpha)
    q, d = patchers
    bf16, fp32 = inputs_pair(3, family)
    q_base, d_base = run(q, bf16), run(d, fp32)
    with caplog.at_level(logging.WARNING):
        q_lora, d_lora = lora_only(q, name, strength), lora_only(d, name, strength)
    assert "lora key not loaded" not in caplog.text and "NOT LOADED" not in caplog.text
    assert patch_count(q_lora) == patch_count(d_lora) == len(layers)  # every LoRA entry found its layer
    with patched(q_lora, d_lora):
        q_out, d_out = run(q_lora, bf16), run(d_lora, fp32)
        errors = layer_errors(q_lora, d_lora)
        sixteen_bit = assert_16bit_layers_dense_patched(q_lora, d_lora)
    assert len(errors) + sixteen_bit == len(q_lora.patches)
    assert max(errors.values()) < LAYER_TOLERANCE, errors
    # Whole model: the LoRA's effect is many times the quantization error, and what is left after
    # applying it is the quantization error again.
    quantization_error = relative_error(q_base, d_base)
    assert relative_error(d_out, d_base) > 4 * quantization_error
    assert relative_error(q_out, d_out) < 2.5 * quantization_error
    assert torch.equal(run(q, bf16), q_base)  # unpatched: the base model is untouched


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_comfy_lora_loader_matches_dense_lora(fmt, patchers, model_folders, caplog):
    assert_comfy_lora_loader_matches_dense_lora(patchers, model_folders["loras"], fmt, FORMATS[fmt], "flux", caplog)


def test_lora_loader_with_clip_input_and_stack_node_agree(patchers, model_folders):
    """ComfyUI's LoraLoader, LoraLoaderModelOnly and the stack node are interchangeable: same
    patches, same output, for several LoRAs with negative strengths."""
    import nodes

    folder = model_folders["loras"]
    a = write_lora(folder, "a.safetensors", FORMATS["kohya"][2], "kohya", seed=2, alpha=2.0)
    b = write_lora(folder, "b.safetensors", FORMATS["diffusers"][2], "peft", seed=3)
    q, d = patchers
    chained = lora_only(lora_only(q, a, 0.7), b, -1.3)
    model_clip, _ = nodes.LoraLoader().load_lora(q, None, a, 0.7, 0.0)
    model_clip, _ = nodes.LoraLoader().load_lora(model_clip, None, b, -1.3, 0.0)
    stacked = stack(q, [(a, 0.7), (b, -1.3)])
    d_lora = lora_only(lora_only(d, a, 0.7), b, -1.3)

    def described(patcher):  # per weight: (strength, LoRA up shape, offset) of each patch, in order
        return {k: [(strength, adapter.weights[0].shape, offset) for strength, adapter, _, offset, _ in v]
                for k, v in patcher.patches.items()}

    assert described(stacked) == described(chained) == described(model_clip)
    bf16, fp32 = inputs_pair(4)
    outputs = []
    for patcher in (chained, model_clip, stacked):
        with patched(patcher):
            outputs.append(run(patcher, bf16))
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])
    with patched(stacked, d_lora):
        errors = layer_errors(stacked, d_lora)
        assert_16bit_layers_dense_patched(stacked, d_lora)
        d_out = run(d_lora, fp32)
    assert max(errors.values()) < LAYER_TOLERANCE, errors
    assert relative_error(outputs[2], d_out) < 2 * relative_error(run(q, bf16), run(d, fp32))


def test_changing_the_strength_does_not_reload_or_modify_the_base_model(patchers, model_folders):
    from comfyui_svdquant.loaders.ops import quantized_ops

    name = write_lora(model_folders["loras"], "s.safetensors", FORMATS["bfl"][2], "peft", seed=4)
    q, d = patchers
    body_tensors = {n: {k: (t.data_ptr(), t.clone()) for k, t in op.quantized.state_dict().items()}
                    for n, op in quantized_ops(q.model.diffusion_model)}
    bf16, _ = inputs_pair(5)
    base = run(q, bf16)
    changes = {}
    for strength in (1.0, 0.25, -0.5):
        q_lora, d_lora = lora_only(q, name, strength), lora_only(d, name, strength)
        with patched(q_lora, d_lora):
            changes[strength] = run(q_lora, bf16) - base
            errors = layer_errors(q_lora, d_lora)
        assert max(errors.values()) < LAYER_TOLERANCE, (strength, errors)
    assert relative_error(changes[0.25], changes[1.0]) > 0.5  # the strength took effect
    for n, op in quantized_ops(q.model.diffusion_model):
        for k, t in op.quantized.state_dict().items():
            assert t.data_ptr() == body_tensors[n][k][0] and torch.equal(t, body_tensors[n][k][1]), (n, k)
    assert torch.equal(run(q, bf16), base)


def test_two_branches_with_different_loras_alternate(patchers, model_folders):
    import comfy.model_management

    folder = model_folders["loras"]
    a = write_lora(folder, "a.safetensors", FORMATS["kohya"][2], "kohya", seed=5, alpha=2.0)
    b = write_lora(folder, "b.safetensors", FORMATS["onetrainer-lycoris"][2], "kohya", seed=6, alpha=8.0)
    q, _ = patchers
    bf16, _ = inputs_pair(6)
    base = run(q, bf16)
    alone = {}
    for name in (a, b):
        branch = lora_only(q, name, 0.8)
        with patched(branch):
            alone[name] = run(branch, bf16)
    branches = {a: lora_only(q, a, 0.8), b: stack(q, [(b, 0.8)])}
    for name in (a, b, a, b, a):  # as ComfyUI runs two samplers of one graph
        comfy.model_management.load_models_gpu([branches[name]])
        assert torch.equal(run(branches[name], bf16), alone[name]), name
    comfy.model_management.unload_all_models()
    for name in (b, a, b):
        with patched(branches[name]):
            assert torch.equal(run(branches[name], bf16), alone[name]), name
    assert not torch.equal(alone[a], alone[b])
    assert torch.equal(run(q, bf16), base)


def test_low_vram_mode_gives_the_same_result(patchers, model_folders):
    import comfy.model_patcher

    from comfyui_svdquant.loaders.ops import quantized_ops

    folder = model_folders["loras"]
    quantized_only = {k: v for k, v in FORMATS["diffusers"][2].items() if "x_embedder" not in k}
    name = write_lora(folder, "q.safetensors", quantized_only, "peft", seed=7)
    q, _ = patchers
    branch = lora_only(q, name, 1.0)
    bf16, _ = inputs_pair(7)
    with patched(branch):
        full = run(branch, bf16)
    with patched(branch, device_to=torch.device("cpu"), lowvram_model_memory=1):  # every layer streamed
        ops = [op for _, op in quantized_ops(branch.model.diffusion_model)]
        assert all(op.comfy_cast_weights for op in ops)
        assert any(isinstance(f, comfy.model_patcher.LowVramPatch) for op in ops for f in op.weight_function)
        assert all(op.lora_patches is None for op in ops)  # the patches come from weight_function
        assert torch.equal(run(branch, bf16), full)
    # Loaded normally, then unloaded (ComfyUI picks which layers, by a cost that differs between versions):
    # the unloaded layers switch to weight_function patches.
    with patched(branch):
        branch.partially_unload(torch.device("cpu"), memory_to_free=1 << 60)
        assert any(op.weight_function for _, op in quantized_ops(branch.model.diffusion_model))
        assert torch.equal(run(branch, bf16), full)


def test_low_vram_mode_with_16bit_layers(patchers, model_folders):
    name = write_lora(model_folders["loras"], "k.safetensors", FORMATS["kohya"][2], "kohya", seed=8, alpha=2.0)
    q, d = patchers
    branch, d_lora = lora_only(q, name, 1.0), lora_only(d, name, 1.0)
    bf16, fp32 = inputs_pair(8)
    with patched(branch):
        full = run(branch, bf16)
    with patched(branch, device_to=torch.device("cpu"), lowvram_model_memory=1):
        low = run(branch, bf16)
    with patched(d_lora):
        d_out = run(d_lora, fp32)
    # ComfyUI merges 16-bit layers in fp32 when loading them and in their own dtype when streaming
    # them, so the final layer differs by bf16 rounding; the quantized layers are identical.
    assert relative_error(low, full) < 0.2 * relative_error(full, d_out)


def test_lora_pairs_extend_the_branch_without_dequantizing(patchers, model_folders, monkeypatch):
    """A LoRA pair is appended to the stored branch (rank padded to 16, the original factors kept bit
    for bit); no layer is dequantized on the way."""
    from comfyui_svdquant.loaders.ops import quantized_ops
    from comfyui_svdquant.loaders.parts import InterleavedOutput
    from comfyui_svdquant.svdquant import layers, packing

    def refuse(self):
        raise AssertionError(f"{type(self).__name__} was dequantized for a LoRA pair")

    for cls in (layers.W4A4Linear, layers.W4A16Linear, layers.ConcatLinear, layers.SplitInputLinear, InterleavedOutput):
        monkeypatch.setattr(cls, "to_dense", refuse)
    name = write_lora(model_folders["loras"], "k.safetensors", FORMATS["kohya"][2], "kohya", seed=13, alpha=2.0)
    q, _ = patchers
    branch = lora_only(q, name, 1.0)
    with patched(branch):
        run(branch, inputs_pair(13)[0])
        ops = dict(quantized_ops(branch.model.diffusion_model))
        linear1 = ops["single_blocks.0.linear1"]  # qkv ‖ mlp: the LoRA covers both parts
        replaced = linear1._branch_cache[2]
        for part in linear1.quantized.parts:
            down = packing.unpack_down(replaced[id(part)]["proj_down"])
            up = packing.unpack_up(replaced[id(part)]["proj_up"])
            assert down.shape[0] == packing.round_up(part.rank + 4, 16)
            assert torch.equal(down[:part.rank], part.branch_factors()[0])
            assert torch.equal(up[:, :part.rank], part.branch_factors()[1])
            assert part.proj_down.shape[1] == part.rank  # the model's own layer is unchanged
        img_mod = ops["double_blocks.0.img_mod.lin"]
        modulation = img_mod.quantized.inner  # W4A16: the pair becomes a separate 16-bit term
        assert img_mod._branch_cache[2][id(modulation)]["lora_down"].shape == (4, H)
        assert modulation.lora_down is None


@pytest.mark.parametrize("kind", ["loha", "lokr", "diff", "dora"])
def test_other_adapters_are_absorbed_by_a_truncated_svd(kind, patchers, model_folders, caplog, monkeypatch):
    import comfyui_svdquant.loaders.lora as lora_module

    layers = {"diffusion_model.double_blocks.0.img_attn.qkv": (3 * H, H),
              "diffusion_model.double_blocks.1.img_mod.lin": (6 * H, H),
              "diffusion_model.single_blocks.0.linear1": (3 * H + M, H),
              "diffusion_model.single_blocks.1.linear2": (H, H + M)}
    tensors = {}
    g = torch.Generator().manual_seed(9)
    for prefix, (n, k) in layers.items():
        if kind == "loha":
            for w in ("w1", "w2"):
                tensors[f"{prefix}.hada_{w}_a"] = torch.randn(n, 8, generator=g) * 0.3
                tensors[f"{prefix}.hada_{w}_b"] = torch.randn(8, k, generator=g) / k**0.5
        elif kind == "lokr":
            tensors[f"{prefix}.lokr_w1"] = torch.randn(4, 4, generator=g)
            tensors[f"{prefix}.lokr_w2"] = torch.randn(n // 4, k // 4, generator=g) * 0.3 / k**0.5
        elif kind == "diff":
            tensors[f"{prefix}.diff"] = torch.randn(n, k, generator=g) * 0.3 / k**0.5
        else:
            up, down = lora_pair(n, k, seed=len(tensors))
            tensors.update({f"{prefix}.lora_up.weight": up, f"{prefix}.lora_down.weight": down,
                            f"{prefix}.dora_scale": 1.0 + 0.1 * torch.rand(n, 1, generator=g)})
    safetensors.torch.save_file(tensors, str(model_folders["loras"] / f"{kind}.safetensors"))
    q, d = patchers
    d_lora = lora_only(d, f"{kind}.safetensors", 0.9)
    monkeypatch.setattr(lora_module, "_approximations_logged", set())
    worst = {}
    with caplog.at_level(logging.INFO, logger=lora_module.__name__):
        for rank in (4, 32, H):
            q_lora = stack(q, [(f"{kind}.safetensors", 0.9)], rank=rank)
            with patched(q_lora, d_lora):
                worst[rank] = max(layer_errors(q_lora, d_lora).values())
    assert worst[4] > worst[32] > worst[H], worst
    assert worst[H] < LAYER_TOLERANCE, worst  # rank = the layers' width: nothing is truncated
    messages = [r for r in caplog.records if "approximation" in r.getMessage()]
    assert len(messages) == 1, [r.getMessage() for r in messages]  # once, not once per layer


def test_16bit_layers_take_comfyuis_dense_patch(patchers, model_folders):
    layers = {"lora_unet_img_in": (H, IMG), "lora_unet_final_layer_linear": (IMG, H),
              "lora_unet_time_in_in_layer": (H, 256), "lora_unet_txt_in": (H, TINY_FLUX["context_in_dim"])}
    name = write_lora(model_folders["loras"], "dense.safetensors", layers, "kohya", seed=10)
    q, d = patchers
    q_lora, d_lora = lora_only(q, name, 1.5), lora_only(d, name, 1.5)
    original = q.model.diffusion_model.img_in.weight.clone()
    bf16, fp32 = inputs_pair(10)
    with patched(q_lora, d_lora):
        assert assert_16bit_layers_dense_patched(q_lora, d_lora) == len(layers)
        assert not torch.equal(q.model.diffusion_model.img_in.weight, original)
        assert relative_error(run(q_lora, bf16), run(d_lora, fp32)) < 2 * relative_error(run(q, bf16), run(d, fp32))
    assert torch.equal(q.model.diffusion_model.img_in.weight, original)


# --- the stack node's own checks -----------------------------------------------------------------

def test_stack_node_is_registered_and_lists_the_loras(comfy, model_folders):
    import nodes

    write_lora(model_folders["loras"], "listed.safetensors", FORMATS["bfl"][2], "peft")
    cls = nodes.NODE_CLASS_MAPPINGS["SVDQuantLoraStack"]
    schema = cls.GET_SCHEMA()
    options = {i.id: i for i in schema.inputs}
    assert options["lora_1"].options == ["None", "listed.safetensors"]
    assert options["adapter_svd_rank"].default == 64


def test_stack_node_with_no_loras_returns_the_model_unchanged(patchers):
    q, _ = patchers
    out = stack(q, [("None", 1.0), ("None", 0.5)])
    assert out.patches == {} and out.is_clone(q)


@pytest.mark.parametrize("case", ["sdxl-kohya", "sdxl-diffusers", "text-encoder-only"])
def test_stack_node_rejects_a_lora_for_another_model(case, patchers, model_folders):
    from comfyui_svdquant.svdquant.errors import SVDQuantError

    layers = {
        "sdxl-kohya": {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": (640, 640),
                       "lora_unet_output_blocks_2_1_proj_in": (1280, 1280)},
        "sdxl-diffusers": {"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": (640, 640)},
        "text-encoder-only": {"lora_te1_text_model_encoder_layers_0_mlp_fc1": (3072, 768)},
    }[case]
    name = write_lora(model_folders["loras"], f"{case}.safetensors", layers, "kohya")
    q, _ = patchers
    with pytest.raises(SVDQuantError, match=f"LoRA '{case}.safetensors' matches no layer of this FLUX.1 model"):
        stack(q, [(name, 1.0)])
    assert q.patches == {}


def test_stack_node_rejects_a_lora_of_other_shapes(patchers, model_folders):
    from comfyui_svdquant.svdquant.errors import SVDQuantError

    big = {"lora_unet_double_blocks_0_img_attn_qkv": (3 * 3072, 3072)}  # FLUX.1-dev's width
    name = write_lora(model_folders["loras"], "flux-dev.safetensors", big, "kohya")
    q, _ = patchers
    with pytest.raises(SVDQuantError, match=r"LoRA 'flux-dev.safetensors' does not fit this FLUX.1 model: it changes "
                                            r"'double_blocks.0.img_attn.qkv' \(384×128\)"):
        stack(q, [(name, 1.0)])


def test_stack_node_rejects_an_unreadable_file(patchers, model_folders):
    from comfyui_svdquant.svdquant.errors import SVDQuantError

    (model_folders["loras"] / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    q, _ = patchers
    with pytest.raises(SVDQuantError, match="LoRA 'broken.safetensors' cannot be read"):
        stack(q, [("broken.safetensors", 1.0)])


def test_a_foreign_lora_fails_the_prompt_with_the_packs_message(patchers, model_folders):
    """Through ComfyUI's executor: the prompt fails at the stack node, naming the file; a LoRA name
    that is not in the folder is rejected when the prompt is validated."""
    import execution

    from comfyui_svdquant.loaders.save import save_checkpoint

    q, _ = patchers
    save_checkpoint(q.model.diffusion_model, model_folders["diffusion_models"] / "tiny.safetensors")
    name = write_lora(model_folders["loras"], "sdxl.safetensors",
                      {"lora_unet_input_blocks_4_1_proj_in": (640, 640)}, "kohya")

    def prompt(lora: str) -> dict:
        slots = {f"lora_{i}": "None" for i in range(2, 5)} | {f"strength_{i}": 1.0 for i in range(1, 5)}
        return {
            "1": {"class_type": "SVDQuantModelLoader",
                  "inputs": {"model_name": "tiny.safetensors", "compute_dtype": "bfloat16", "kernel_backend": "torch"}},
            "2": {"class_type": "SVDQuantLoraStack",
                  "inputs": {"model": ["1", 0], "lora_1": lora, "adapter_svd_rank": 64, **slots}},
            "3": {"class_type": "ModelSave", "inputs": {"model": ["2", 0], "filename_prefix": "unused"}},
        }

    valid, _, _, node_errors = asyncio.run(execution.validate_prompt("v", prompt("missing.safetensors"), None))
    assert not valid and "missing.safetensors" in str(node_errors["2"])
    too_strong = prompt(name)
    too_strong["2"]["inputs"]["strength_3"] = 1000.0
    valid, _, _, node_errors = asyncio.run(execution.validate_prompt("v", too_strong, None))
    assert not valid and node_errors["2"]["errors"][0]["type"] == "value_bigger_than_max"
    valid, error, outputs, _ = asyncio.run(execution.validate_prompt("p", prompt(name), None))
    assert valid, error

    class Server:
        client_id, last_node_id, last_prompt_id = None, None, None

        def send_sync(self, *args, **kwargs):
            pass

    executor = prompt_executor(Server())
    executor.execute(prompt(name), "p", {}, outputs)
    assert not executor.success
    failure = [data for event, data in executor.status_messages if event == "execution_error"][0]
    assert failure["node_type"] == "SVDQuantLoraStack" and failure["exception_type"].endswith("SVDQuantError")
    assert "LoRA 'sdxl.safetensors' matches no layer of this FLUX.1 model" in failure["exception_message"]


# --- SDXL -----------------------------------------------------------------------------------------

SDXL_FORMATS = {  # tiny SDXL: transformers at widths 64 (input 3, output 2-3) and 128 (input 5, middle, output 0-1)
    "kohya": ("kohya", 2.0, {
        "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q": (64, 64),
        "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_k": (64, 64),
        "lora_unet_input_blocks_5_1_transformer_blocks_0_attn1_to_v": (128, 128),
        "lora_unet_middle_block_1_transformer_blocks_0_attn1_to_out_0": (128, 128),
        "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_q": (128, 128),
        "lora_unet_output_blocks_0_1_transformer_blocks_0_ff_net_0_proj": (1024, 128),
        "lora_unet_output_blocks_3_1_transformer_blocks_0_ff_net_2": (64, 256),
        "lora_unet_input_blocks_5_1_transformer_blocks_0_attn2_to_k": (128, TINY_SDXL["context_dim"]),  # 16-bit
        "lora_unet_input_blocks_3_1_proj_in": (64, 64),  # 16-bit
    }),
    "kohya-diffusers-names": ("kohya", None, {
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_v": (64, 64),
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0": (128, 128),
        "lora_unet_up_blocks_0_attentions_1_transformer_blocks_0_ff_net_2": (128, 512),
    }),
    "diffusers-attn-procs": ("diffusers", None, {
        "unet.down_blocks.2.attentions.0.transformer_blocks.0.attn1.processor.to_q": (128, 128),
        "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_out": (64, 64),
        "unet.up_blocks.1.attentions.1.transformer_blocks.0.attn2.processor.to_q": (64, 64),
        "unet.mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_v": (128, 128),
        "up_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_k": (128, 128),
    }),
    "diffusers-peft": ("peft", None, {
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj": (512, 64),
        "down_blocks.2.attentions.0.transformer_blocks.0.ff.net.2": (128, 512),
    }),
    "lycoris": ("kohya", 4.0, {
        "lycoris_mid_block_attentions_0_transformer_blocks_0_attn1_to_k": (128, 128),
        "lycoris_up_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj": (1024, 128),
        "lycoris_down_blocks_2_attentions_0_transformer_blocks_0_attn2_to_q": (128, 128),
    }),
    "generic": ("peft", None, {
        "diffusion_model.output_blocks.2.1.transformer_blocks.0.attn1.to_v": (64, 64),
        "diffusion_model.input_blocks.5.1.transformer_blocks.0.attn2.to_out.0": (128, 128),
        "diffusion_model.middle_block.1.transformer_blocks.0.ff.net.2": (128, 512),
    }),
}


@pytest.mark.parametrize("patchers", ["sdxl"], indirect=True)
@pytest.mark.parametrize("fmt", sorted(SDXL_FORMATS))
def test_comfy_lora_loader_matches_dense_lora_sdxl(fmt, patchers, model_folders, caplog):
    # A few layers of a UNet: a stronger LoRA, for an effect well above the quantization error
    assert_comfy_lora_loader_matches_dense_lora(patchers, model_folders["loras"], fmt, SDXL_FORMATS[fmt], "sdxl",
                                                caplog, strength=5.0)


@pytest.mark.parametrize("patchers", ["sdxl"], indirect=True)
def test_stack_node_on_sdxl(patchers, model_folders):
    """Several SDXL LoRAs (one negative) through the stack node; a FLUX LoRA is refused by name."""
    from comfyui_svdquant.svdquant.errors import SVDQuantError

    folder = model_folders["loras"]
    a = write_lora(folder, "a.safetensors", SDXL_FORMATS["kohya"][2], "kohya", seed=11, alpha=2.0)
    b = write_lora(folder, "b.safetensors", SDXL_FORMATS["diffusers-attn-procs"][2], "diffusers", seed=12)
    flux = write_lora(folder, "flux.safetensors", FORMATS["kohya"][2], "kohya")
    q, d = patchers
    stacked = stack(q, [(a, 0.6), ("None", 1.0), (b, -0.8)])
    chained = lora_only(lora_only(q, a, 0.6), b, -0.8)
    d_lora = lora_only(lora_only(d, a, 0.6), b, -0.8)
    bf16, fp32 = inputs_pair(12, "sdxl")
    with patched(chained):
        expected = run(chained, bf16)
    with patched(stacked, d_lora):
        assert torch.equal(run(stacked, bf16), expected)
        errors = layer_errors(stacked, d_lora)
        sixteen_bit = assert_16bit_layers_dense_patched(stacked, d_lora)
    assert len(errors) + sixteen_bit == len(stacked.patches) and sixteen_bit == 2
    assert max(errors.values()) < LAYER_TOLERANCE, errors
    with pytest.raises(SVDQuantError, match="LoRA 'flux.safetensors' matches no layer of this SDXL model"):
        stack(q, [(flux, 1.0)])


def test_each_missing_lora_is_named(model_folders):
    """A shared LoRA workflow opened without its files: every missing file is named, on its own slot."""
    from conftest import validation_errors

    slots = {"lora_1": "first-missing.safetensors", "lora_2": "second-missing.safetensors", "lora_3": "None",
             "lora_4": "None", **{f"strength_{i}": 1.0 for i in range(1, 5)}, "adapter_svd_rank": 64}
    errors = [e for e in validation_errors("SVDQuantLoraStack", **slots) if not e.startswith("model:")]
    for slot in ("lora_1", "lora_2"):
        assert any(e.startswith(f"{slot}:") and slots[slot] in e for e in errors), errors


def test_adapters_are_absorbed_once_at_load_with_progress(patchers, model_folders, monkeypatch):
    """LoHa on streamed (low-VRAM) layers: each layer's SVD runs once, when the model is loaded, with a progress
    bar; the sampling steps reuse it."""
    import comfy.utils

    import comfyui_svdquant.loaders.lora as lora_module

    layers = {"diffusion_model.double_blocks.0.img_attn.qkv": (3 * H, H),
              "diffusion_model.double_blocks.1.img_mod.lin": (6 * H, H),
              "diffusion_model.single_blocks.0.linear1": (3 * H + M, H)}
    g = torch.Generator().manual_seed(12)
    tensors = {f"{prefix}.hada_{w}_{s}": torch.randn((n, 8) if s == "a" else (8, k), generator=g) * 0.1
               for prefix, (n, k) in layers.items() for w in ("w1", "w2") for s in ("a", "b")}
    safetensors.torch.save_file(tensors, str(model_folders["loras"] / "loha.safetensors"))
    q, _ = patchers
    q_lora = stack(q, [("loha.safetensors", 0.9)], rank=16)
    absorbed, events = [], []
    original = lora_module._absorbed
    monkeypatch.setattr(lora_module, "_absorbed", lambda *a, **k: absorbed.append(1) or original(*a, **k))
    previous = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(lambda value, total, *args, **kwargs: events.append((value, total)))
    bf16, _ = inputs_pair(12)
    try:
        with patched(q_lora, device_to=torch.device("cpu"), lowvram_model_memory=1):  # every layer streamed
            assert len(absorbed) == len(layers) and events[-1] == (len(layers), len(layers))
            run(q_lora, bf16)
            run(q_lora, bf16)
            assert len(absorbed) == len(layers)  # not again in the sampling steps
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)
