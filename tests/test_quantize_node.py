"""SVDQuant Quantize Model / Save SVDQuant Model in the real in-process ComfyUI, on small FLUX and SDXL models
(ComfyUI's own classes): calibration by ComfyUI's own sampler, the real quantizer, the saved file loaded by
the loader node, sampling end to end, and the bad inputs failing with the pack's own message while leaving
the source MODEL as it was and nothing in diffusion_models."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import prompt_executor
from tiny_models import init_weights, tiny_flux, tiny_sdxl

SIZE, STEPS = 64, 3
# ComfyUI's SDXL conditions on the pooled text vector followed by six 256-wide size embeddings
POOLED_SDXL = 32
SDXL_ADM = POOLED_SDXL + 6 * 256


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The quantizer's many small SVDs run far faster on one thread than on two contended ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def patcher_of(model):
    import comfy.model_patcher

    return comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))


def conditioning(seed: int, width: int = 64, pooled: int = 32, tokens: int = 8) -> list:
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, tokens, width, generator=g), {"pooled_output": torch.randn(1, pooled, generator=g)}]]


def small_flux(seed: int = 0):
    return patcher_of(tiny_flux(seed, depth=1, depth_single_blocks=1))


def node_inputs(**changes) -> dict:
    inputs = dict(positive=conditioning(1), positive_2=conditioning(2), precision="int4", rank=16, smoothing=False,
                  gptq=False, keep_16bit="", steps=STEPS, width=SIZE, height=SIZE, seed=0, cfg=1.0, guidance=3.5,
                  sampler_name="euler", scheduler="simple")
    inputs.update(changes)
    return inputs


def quantize(model, **changes):
    from comfyui_svdquant.nodes.quantize import SVDQuantQuantizeModel

    return SVDQuantQuantizeModel.execute(model, **node_inputs(**changes)).args[0]


def sample(model, positive, negative=None, cfg: float = 1.0, seed: int = 7) -> torch.Tensor:
    import comfy.sample
    import node_helpers

    latent = comfy.sample.fix_empty_latent_channels(model, torch.zeros(1, 4, SIZE // 8, SIZE // 8))
    positive = node_helpers.conditioning_set_values(positive, {"guidance": 3.5})
    negative = negative or [[torch.zeros_like(positive[0][0]), {"pooled_output": torch.zeros_like(
        positive[0][1]["pooled_output"])}]]
    return comfy.sample.sample(model, comfy.sample.prepare_noise(latent, seed), 4, cfg, "euler", "simple", positive,
                               negative, latent, seed=seed, disable_pbar=True)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR (dB) of ``a`` against ``b``, peak = the reference's range."""
    mse = float((a.float() - b.float()).square().mean())
    peak = float(b.max() - b.min())
    return 10 * math.log10(peak * peak / mse)


def state_of(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}


def assert_untouched(model, before: dict[str, torch.Tensor]) -> None:
    after = model.model.diffusion_model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert "model_function_wrapper" not in model.model_options
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.model.diffusion_model.modules())


def saved_files(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def flux_run(comfy):
    """(source MODEL, its state before, its sample, quantized MODEL) for the default-sized FLUX, smoothing on."""
    source = patcher_of(tiny_flux(0))
    before = state_of(source)
    dense_sample = sample(source, conditioning(5))
    quantized = quantize(source, smoothing=True)
    return source, before, dense_sample, quantized


def assert_close_sample(quantized_sample: torch.Tensor, dense_sample: torch.Tensor, other_sample: torch.Tensor,
                        what: str) -> None:
    """The quantized model samples far closer to its 16-bit model than another model of the same shape does."""
    quality, baseline = psnr(quantized_sample, dense_sample), psnr(other_sample, dense_sample)
    print(f"\n{what}: sampled latent PSNR vs 16-bit = {quality:.1f} dB (another model of the same shape: "
          f"{baseline:.1f} dB)")
    assert quality > baseline + 10


def test_flux_quantize_sample_save_load(flux_run, model_folders):
    from comfyui_svdquant.loaders.ops import quantized_ops
    from comfyui_svdquant.nodes.loader import SVDQuantModelLoader
    from comfyui_svdquant.nodes.quantize import SVDQuantSaveModel

    source, before, dense_sample, quantized = flux_run
    assert len(quantized_ops(quantized.model.diffusion_model)) == 2 * 10 + 2 * 3
    quantized_sample = sample(quantized, conditioning(5))
    assert_close_sample(quantized_sample, dense_sample, sample(patcher_of(tiny_flux(1)), conditioning(5)),
                        "FLUX (hidden 128, 2+2 blocks), int4 rank 16")

    out = SVDQuantSaveModel.execute(quantized, "svdquant/tiny-flux")
    folder = model_folders["diffusion_models"]
    assert saved_files(folder) == ["svdquant/tiny-flux_00001_.safetensors"]
    assert "svdquant/tiny-flux_00001_.safetensors" in out.ui.as_dict()["text"][0]
    SVDQuantSaveModel.execute(quantized, "svdquant/tiny-flux")  # the counter goes up
    assert saved_files(folder)[-1] == "svdquant/tiny-flux_00002_.safetensors"

    (loaded,) = SVDQuantModelLoader.execute("svdquant/tiny-flux_00001_.safetensors", "bfloat16", "torch").args
    assert torch.equal(sample(loaded, conditioning(5)), quantized_sample)
    # the source MODEL is as it was, and samples as before
    assert_untouched(source, before)
    assert torch.equal(sample(source, conditioning(5)), dense_sample)


def test_save_writes_the_model_as_its_graph_defines_it(flux_run, model_folders):
    """A clone of the same model sampled with a LoRA first (ComfyUI patched the shared 16-bit weights for it):
    the save of the model without the LoRA writes the model's own weights, not the clone's."""
    import comfy.model_management
    import comfy.sd
    from safetensors import safe_open

    from comfyui_svdquant.nodes.quantize import SVDQuantSaveModel

    _, _, _, quantized = flux_run
    original = quantized.model.diffusion_model.img_in.weight.detach().clone()
    g = torch.Generator().manual_seed(9)
    n, k = original.shape
    lora = {"diffusion_model.img_in.lora_up.weight": torch.randn(n, 4, generator=g),
            "diffusion_model.img_in.lora_down.weight": torch.randn(4, k, generator=g)}
    with_lora, _ = comfy.sd.load_lora_for_models(quantized, None, lora, 1.0, 0.0)
    sample(with_lora, conditioning(5))  # as a KSampler on the clone does
    comfy.model_management.load_models_gpu([with_lora])
    assert not torch.equal(quantized.model.diffusion_model.img_in.weight, original)  # the shared weight is patched
    SVDQuantSaveModel.execute(quantized, "own-weights")
    with safe_open(str(model_folders["diffusion_models"] / "own-weights_00001_.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("x_embedder.weight"), original)


def test_saved_file_records_how_it_was_made(flux_run, model_folders):
    import json

    from safetensors import safe_open

    from comfyui_svdquant.nodes.quantize import SVDQuantSaveModel

    SVDQuantSaveModel.execute(flux_run[3], "made")
    with safe_open(str(model_folders["diffusion_models"] / "made_00001_.safetensors"), "pt") as f:
        metadata = f.metadata()
    made = json.loads(metadata["svdquant_quantizer"])
    assert (made["precision"], made["rank"], made["smoothing"]) == ("int4", 16, True)
    assert made["calibration"]["prompts"] == 2 and made["calibration"]["steps"] == STEPS
    assert json.loads(metadata["quantization_config"])["rank"] == 16


def test_weight_patches_on_the_model_are_baked_in(comfy):
    """A LoRA on the source MODEL is in the quantized weights (not applied a second time)."""
    from comfy.weight_adapter.lora import LoRAAdapter

    source = small_flux(3)
    key = "diffusion_model.double_blocks.0.img_mlp.0.weight"
    weight = source.model.get_parameter(key)
    g = torch.Generator().manual_seed(0)
    up, down = torch.randn(weight.shape[0], 4, generator=g) * 0.3, torch.randn(4, weight.shape[1], generator=g) * 0.3
    patched = source.clone()
    patched.add_patches({key: LoRAAdapter(set(), (up, down, None, None, None, None))}, 1.0)

    quantized = quantize(patched)
    op = quantized.model.diffusion_model.get_submodule("double_blocks.0.img_mlp.0")
    dense, _ = op.quantized.to_dense()
    merged = weight.float() + up @ down
    assert (dense - merged).norm() < 0.5 * (dense - weight.float()).norm()
    assert not source.patches  # the unpatched MODEL is still unpatched
    assert not quantized.patches


def scaled_fp8_flux(dense) -> tuple:
    """``dense`` written as a scaled-fp8 FLUX file (fp8 Linear weights × a per-layer ``scale_weight``, the
    ``scaled_fp8`` marker) and loaded by ComfyUI's own loader, as UNETLoader does: ComfyUI v0.3.x runs it
    with its scaled-fp8 operations, newer versions convert it to their mixed-precision QuantizedTensor.
    Returns the loaded MODEL and the weights it stores, dequantized, by layer name."""
    import comfy.sd

    from tiny_pipeline import install_size_inference

    sd, true_weights = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}, {}
    for name, p in dense.diffusion_model.state_dict().items():
        if name.endswith(".weight") and p.ndim == 2 and "_blocks." in name:
            scale = p.float().abs().max() / 448 * 4  # coarse on purpose: a missed scale is 4× off or worse
            sd[name] = (p.float() / scale).to(torch.float8_e4m3fn)
            sd[name.replace(".weight", ".scale_weight")] = scale
            true_weights[name[: -len(".weight")]] = sd[name].float() * scale
        else:
            sd[name] = p
    undo = install_size_inference()  # v0.3.x sizes FLUX from fixed widths
    try:
        model = comfy.sd.load_diffusion_model_state_dict(sd)
    finally:
        undo()
    return model, true_weights


def test_runtime_weight_reads_scaled_fp8_and_low_vram_patches(comfy):
    import comfy.model_patcher
    import comfy.ops

    from comfyui_svdquant.loaders.quantize import runtime_weight
    from tiny_pipeline import dense_flux

    fp8, true_weights = scaled_fp8_flux(dense_flux(3, depth=1, depth_single_blocks=1))
    g = torch.Generator().manual_seed(0)
    for name in ("double_blocks.0.img_attn.qkv", "single_blocks.0.linear2"):
        linear = fp8.model.diffusion_model.get_submodule(name)
        weight, bias = runtime_weight(linear, torch.device("cpu"))
        assert torch.equal(weight, true_weights[name]), name
        x = torch.randn(3, linear.in_features, generator=g).bfloat16()
        assert torch.allclose(x.float() @ weight.T + bias, linear(x).float(), rtol=0.02, atol=0.02)

    # low-VRAM mode: the LoRA patch is applied at run time through weight_function
    plain = comfy.ops.manual_cast.Linear(32, 16, bias=False, dtype=torch.bfloat16)
    plain.weight = torch.nn.Parameter(torch.randn(16, 32, generator=g).bfloat16(), requires_grad=False)
    diff = torch.randn(16, 32, generator=g)
    patches = {"w": [(1.0, ("diff", (diff,)), 1.0, None, None)]}
    plain.weight_function = [comfy.model_patcher.LowVramPatch("w", patches)]
    weight, _ = runtime_weight(plain, torch.device("cpu"))
    assert torch.allclose(weight, plain.weight.float() + diff, atol=1e-5)


def test_fp8_scaled_model_quantizes_to_its_true_weights(comfy):
    """A scaled-fp8 FLUX (fp8 weight × scale_weight, as ComfyUI loads it) quantizes to a model close to what
    the fp8 model computes, i.e. the scales are honoured."""
    from tiny_models import relative_error
    from tiny_pipeline import dense_flux

    source, _ = scaled_fp8_flux(dense_flux(4, depth=1, depth_single_blocks=1))
    quantized = quantize(source)
    reference = sample(source, conditioning(5))
    assert relative_error(sample(quantized, conditioning(5)), reference) < 0.1


def test_kept_layers_stay_16bit_and_survive_saving(comfy, model_folders):
    from safetensors import safe_open

    from comfyui_svdquant.loaders.ops import quantized_ops
    from comfyui_svdquant.nodes.loader import SVDQuantModelLoader
    from comfyui_svdquant.nodes.quantize import SVDQuantSaveModel

    source = small_flux(5)
    quantized = quantize(source, keep_16bit="single_blocks.0.linear*,\ntransformer_blocks.0.norm1.linear")
    model = quantized.model.diffusion_model
    kept = {"single_blocks.0.linear1", "single_blocks.0.linear2", "double_blocks.0.img_mod.lin"}
    assert kept.isdisjoint(name for name, _ in quantized_ops(model))
    for name in kept:
        assert torch.equal(model.get_submodule(name).weight, source.model.diffusion_model.get_submodule(name).weight)

    SVDQuantSaveModel.execute(quantized, "kept")
    path = model_folders["diffusion_models"] / "kept_00001_.safetensors"
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    assert {"single_transformer_blocks.0.qkv_proj.weight", "single_transformer_blocks.0.mlp_fc1.weight",
            "single_transformer_blocks.0.out_proj.weight", "transformer_blocks.0.norm1.linear.weight"} <= keys
    assert "transformer_blocks.0.norm1.linear.qweight" not in keys
    (loaded,) = SVDQuantModelLoader.execute("kept_00001_.safetensors", "bfloat16", "torch").args
    assert torch.equal(sample(loaded, conditioning(6)), sample(quantized, conditioning(6)))


def test_sdxl_quantize_with_negative_and_cfg(comfy, model_folders):
    from comfyui_svdquant.loaders.convert import blocks_of
    from comfyui_svdquant.loaders.ops import quantized_ops
    from comfyui_svdquant.nodes.loader import SVDQuantModelLoader
    from comfyui_svdquant.nodes.quantize import SVDQuantSaveModel

    source = patcher_of(tiny_sdxl(0, adm_in_channels=SDXL_ADM))
    before = state_of(source)
    prompt = lambda seed: conditioning(seed, pooled=POOLED_SDXL)  # noqa: E731
    negative = conditioning(99, pooled=POOLED_SDXL)
    dense_sample = sample(source, prompt(5), negative, cfg=5.0)
    quantized = quantize(source, positive=prompt(1), positive_2=prompt(2), negative=negative, cfg=5.0,
                         scheduler="normal", smoothing=True)
    transformer_blocks = len(blocks_of(source.model.diffusion_model)[2])
    assert transformer_blocks == 7
    assert len(quantized_ops(quantized.model.diffusion_model)) == 8 * transformer_blocks
    quantized_sample = sample(quantized, prompt(5), negative, cfg=5.0)
    other = patcher_of(tiny_sdxl(1, adm_in_channels=SDXL_ADM))
    assert_close_sample(quantized_sample, dense_sample, sample(other, prompt(5), negative, cfg=5.0),
                        "SDXL (32 channels, 7 transformer blocks), int4 rank 16, cfg 5")

    SVDQuantSaveModel.execute(quantized, "sdxl/tiny")
    (loaded,) = SVDQuantModelLoader.execute("sdxl/tiny_00001_.safetensors", "bfloat16", "torch").args
    assert torch.equal(sample(loaded, prompt(5), negative, cfg=5.0), quantized_sample)
    assert_untouched(source, before)


# --- bad input ------------------------------------------------------------------------------------------------


@pytest.fixture
def progress_events(comfy):
    """Every (value, total) the nodes report to ComfyUI's progress hook."""
    import comfy.utils

    events: list[tuple[int, int]] = []
    previous = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(lambda value, total, *_, **__: events.append((value, total)))
    yield events
    comfy.utils.set_progress_bar_global_hook(previous)


def expect_refusal(model, match: str, progress_events, **changes) -> None:
    """The node raises the pack's error matching ``match`` before any sampling or quantization work."""
    from comfyui_svdquant.svdquant.errors import SVDQuantError

    before = state_of(model)
    with pytest.raises(SVDQuantError, match=match):
        quantize(model, **changes)
    assert progress_events == []
    assert_untouched(model, before)


def test_unsupported_architecture_is_refused(comfy, progress_events):
    import comfy.supported_models

    config = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
              "legacy": False, "in_channels": 4, "model_channels": 32, "num_res_blocks": [1, 1],
              "transformer_depth": [1, 1], "channel_mult": [1, 2], "transformer_depth_middle": 1,
              "use_linear_in_transformer": False, "context_dim": 64, "adm_in_channels": None,
              "transformer_depth_output": [1, 1, 1, 1], "use_temporal_attention": False,
              "use_temporal_resblock": False}
    model_config = comfy.supported_models.SD15(config)
    model_config.set_inference_dtype(torch.bfloat16, None)
    model = model_config.get_model({})
    init_weights(model.diffusion_model, 0)
    sd15 = patcher_of(model)
    expect_refusal(sd15, "UNetModel is not a model this pack can quantize \\(flux, sdxl", progress_events)


def test_empty_conditioning_is_refused(comfy, progress_events):
    from comfyui_svdquant.loaders.calibration import calibration_prompts
    from comfyui_svdquant.svdquant.errors import CalibrationError

    expect_refusal(small_flux(), "no calibration prompts", progress_events, positive=[], positive_2=None)
    with pytest.raises(CalibrationError, match="not ComfyUI CONDITIONING"):
        calibration_prompts([[torch.zeros(1, 8, 64)]])


def test_rank_too_large_is_refused_before_sampling(comfy, progress_events):
    from comfyui_svdquant.nodes.quantize import SVDQuantQuantizeModel

    expect_refusal(small_flux(), r"rank = 256 is larger than this 128→384 layer allows \(at most 128\)",
                   progress_events, rank=256)
    assert "multiple of 16" in SVDQuantQuantizeModel.validate_inputs(rank=24)
    assert SVDQuantQuantizeModel.validate_inputs(rank=32) is True


def test_keep_pattern_that_matches_nothing_is_refused(comfy, progress_events):
    expect_refusal(small_flux(), "'double_blocks.9.\\*' matches no quantized layer", progress_events,
                   keep_16bit="double_blocks.9.*")


def test_nans_during_calibration_stop_with_a_message(comfy, model_folders):
    from comfyui_svdquant.svdquant.errors import CalibrationError

    source = small_flux()
    before = state_of(source)
    poisoned = conditioning(1)
    poisoned[0][0][0, 3, 5] = float("nan")
    with pytest.raises(CalibrationError, match="NaN or Inf in the layer's input during calibration"):
        quantize(source, positive=poisoned)
    assert_untouched(source, before)
    assert saved_files(model_folders["diffusion_models"]) == []
    sample(source, conditioning(5))  # still usable


def test_cancel_in_the_middle_stops_cleanly(comfy, model_folders, progress_events):
    """The Cancel button sets ComfyUI's interrupt flag; the node stops at the next step or layer."""
    import comfy.model_management
    import comfy.utils

    source = small_flux()
    before = state_of(source)
    reference = sample(source, conditioning(5))
    calibration_steps = 2 * STEPS

    def cancel_during_quantization(value, total, *_, **__):
        progress_events.append((value, total))
        if value == calibration_steps + 3:  # a few layers into the quantization
            comfy.model_management.interrupt_current_processing()

    comfy.utils.set_progress_bar_global_hook(cancel_during_quantization)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        quantize(source)
    assert progress_events[-1][0] == calibration_steps + 3 < progress_events[-1][1]
    assert not comfy.model_management.processing_interrupted()
    assert_untouched(source, before)
    assert torch.equal(sample(source, conditioning(5)), reference)
    assert saved_files(model_folders["diffusion_models"]) == []


def test_save_refuses_what_it_cannot_store(flux_run, model_folders):
    from comfyui_svdquant.nodes.quantize import SVDQuantSaveModel
    from comfyui_svdquant.svdquant.errors import SVDQuantError

    source, _, _, quantized = flux_run
    with pytest.raises(SVDQuantError, match="no SVDQuant layers"):
        SVDQuantSaveModel.execute(source, "dense")
    with pytest.raises(SVDQuantError, match="must be a relative path inside models/diffusion_models"):
        SVDQuantSaveModel.execute(quantized, "../outside")
    with_lora = quantized.clone()
    with_lora.add_patches({"diffusion_model.double_blocks.0.img_attn.qkv.weight": ("diff", (torch.zeros(1),))}, 1.0)
    with pytest.raises(SVDQuantError, match="weight patches"):
        SVDQuantSaveModel.execute(with_lora, "lora")
    assert saved_files(model_folders["diffusion_models"]) == []


# --- command line -----------------------------------------------------------------------------------------


def test_command_line_converts_a_model_file(comfy, tmp_path):
    """scripts/quantize_cli.py on the pipeline's 16-bit FLUX file and text encoders (ComfyUI's own loaders)."""
    import importlib.util
    import json
    from pathlib import Path

    from safetensors import safe_open

    from comfyui_svdquant.loaders.load import load_checkpoint
    from tiny_pipeline import install_size_inference, populate

    models = populate(tmp_path / "models")
    script = Path(__file__).resolve().parents[1] / "scripts" / "quantize_cli.py"
    spec = importlib.util.spec_from_file_location("quantize_cli", script)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    output = tmp_path / "out" / "flux-svdq.safetensors"
    undo = install_size_inference()
    try:
        code = cli.main(["--model", str(models / "diffusion_models" / "flux1-dev.safetensors"),
                         "--text-encoder", str(models / "text_encoders" / "clip_l.safetensors"),
                         "--text-encoder", str(models / "text_encoders" / "t5xxl_fp16.safetensors"),
                         "--prompt", "a red fox in the snow", "--prompt", "a city at night",
                         "--steps", "2", "--width", "64", "--height", "64", "--rank", "16", "--no-smoothing",
                         "--keep", "single_blocks.1.*", "--output", str(output)])
        assert code == 0
        assert cli.main(["--model", str(models / "diffusion_models" / "flux1-dev.safetensors"),
                         "--text-encoder", str(models / "text_encoders" / "clip_l.safetensors"),
                         "--text-encoder", str(models / "text_encoders" / "t5xxl_fp16.safetensors"),
                         "--prompt", "x", "--rank", "256", "--output", str(tmp_path / "bad.safetensors")]) == 2
    finally:
        undo()
    assert not (tmp_path / "bad.safetensors").exists()
    with safe_open(str(output), "pt") as f:
        made = json.loads(f.metadata()["svdquant_quantizer"])
    assert made["calibration"]["prompts"] == 2 and made["kept_16bit"] == ["single_blocks.1.linear1",
                                                                          "single_blocks.1.linear2",
                                                                          "single_blocks.1.modulation.lin"]
    loaded = load_checkpoint(output, "bfloat16", "torch")
    latent = sample(loaded, conditioning(5))
    assert torch.isfinite(latent).all()


# --- through ComfyUI's executor, with ComfyUI's own loaders --------------------------------------------------


class _Server:
    client_id, last_node_id, last_prompt_id = None, None, None

    def send_sync(self, *args, **kwargs):
        pass


@pytest.fixture
def pipeline(comfy, tmp_path):
    """The pipeline's stand-in files (16-bit FLUX, text encoders) in ComfyUI's model folders."""
    import folder_paths

    from tiny_pipeline import install_size_inference, populate

    models = populate(tmp_path / "models")
    names = ("diffusion_models", "text_encoders")
    saved = {name: folder_paths.folder_names_and_paths[name] for name in names}
    for name in names:
        folder_paths.folder_names_and_paths[name] = ([str(models / name)], saved[name][1])
    folder_paths.filename_list_cache.clear()
    undo_sizes = install_size_inference()
    yield models
    undo_sizes()
    folder_paths.folder_names_and_paths.update(saved)
    folder_paths.filename_list_cache.clear()


def execute(prompt: dict):
    import asyncio

    import execution

    valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt("p", prompt, None))
    assert valid, (error, node_errors)
    executor = prompt_executor(_Server())
    executor.execute(prompt, "p", {}, outputs)
    return executor


def quantize_prompt(prefix: str) -> dict:
    encode = lambda text: {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": text}}  # noqa: E731
    quantize = {"model": ["1", 0], "positive": ["3", 0], "positive_2": ["4", 0]}
    quantize.update({k: v for k, v in node_inputs(smoothing=True).items() if not k.startswith("positive")})
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "flux1-dev.safetensors", "weight_dtype": "default"}},
        "2": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": "clip_l.safetensors",
                                                         "clip_name2": "t5xxl_fp16.safetensors", "type": "flux"}},
        "3": encode("a red fox in the snow"),
        "4": encode("a lighthouse on a cliff at dusk"),
        "5": {"class_type": "SVDQuantQuantizeModel", "inputs": quantize},
        "6": {"class_type": "SVDQuantSaveModel", "inputs": {"model": ["5", 0], "filename_prefix": prefix}},
    }


def test_workflow_quantize_save_then_load_and_sample(pipeline):
    """Through ComfyUI's executor: UNETLoader + DualCLIPLoader + CLIPTextEncode → Quantize → Save; then the
    loader node loads the file in a second prompt and KSampler samples it."""
    executor = execute(quantize_prompt("svdquant/flux1-dev-svdq"))
    assert executor.success, executor.status_messages
    assert saved_files(pipeline / "diffusion_models")[-1] == "svdquant/flux1-dev-svdq_00001_.safetensors"
    saved = "svdquant/flux1-dev-svdq_00001_.safetensors"
    sampled = execute({
        "1": {"class_type": "SVDQuantModelLoader", "inputs": {"model_name": saved, "compute_dtype": "auto",
                                                              "kernel_backend": "torch"}},
        "2": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": "clip_l.safetensors",
                                                         "clip_name2": "t5xxl_fp16.safetensors", "type": "flux"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": "a boat on a lake"}},
        "4": {"class_type": "EmptySD3LatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["3", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0], "seed": 1, "steps": 2, "cfg": 1.0,
                                                   "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
        "6": {"class_type": "PreviewAny", "inputs": {"source": ["5", 0]}},
    })
    assert sampled.success, sampled.status_messages


def test_cancel_through_the_executor_leaves_no_file(pipeline, monkeypatch):
    import comfy.model_management
    import comfy.utils

    update = comfy.utils.ProgressBar.update_absolute

    def cancel(bar, value, total=None, *args, **kwargs):  # what ComfyUI's /interrupt does, half-way through
        update(bar, value, total, *args, **kwargs)
        if total and value == total // 2:
            comfy.model_management.interrupt_current_processing()

    # (the progress bar itself: from v0.33 on the executor installs its own global progress hook)
    monkeypatch.setattr(comfy.utils.ProgressBar, "update_absolute", cancel)
    executor = execute(quantize_prompt("cancelled"))
    events = [event for event, _ in executor.status_messages]
    assert "execution_interrupted" in events and "execution_error" not in events
    assert not any("cancelled" in name for name in saved_files(pipeline / "diffusion_models"))
