"""SVDQuant Quantize Model and Save SVDQuant Model: convert a FLUX.1 / SDXL / Qwen-Image / Z-Image MODEL loaded by
ComfyUI's own loaders to 4 bits inside a workflow, and write it to diffusion_models for the loader node."""

from __future__ import annotations

import ntpath
import os

import comfy.model_management
import comfy.samplers
import comfy.utils
import folder_paths
from comfy_api.latest import io, ui

from ..loaders.calibration import SamplingSettings, calibration_prompts
from ..loaders.compat import checks_v3_dropdowns
from ..loaders.quantize import Conversion, parse_patterns, quantize_model
from ..loaders.save import save_checkpoint
from ..svdquant.errors import SVDQuantError
from ..svdquant.layers import PRECISIONS
from ..svdquant.quantizer import QuantizeConfig
from .files import FOLDER, save_folder, unlisted_choice

PROMPT_INPUTS = ("positive", "positive_2", "positive_3", "positive_4")
RANK_MAX = 1024


class SVDQuantQuantizeModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        prompts = [io.Conditioning.Input(name, optional=index > 0,
                                         tooltip="A calibration prompt (from CLIP Text Encode or any prompt node). "
                                                 "Each connected prompt is sampled once; a conditioning holding "
                                                 "several entries (Conditioning (Combine)) counts as that many "
                                                 "prompts.")
                   for index, name in enumerate(PROMPT_INPUTS)]
        return io.Schema(
            node_id="SVDQuantQuantizeModel",
            display_name="SVDQuant Quantize Model",
            category="advanced/SVDQuant",
            description="Quantizes a FLUX.1, SDXL, Qwen-Image or Z-Image model to SVDQuant 4-bit (W4A4 with a 16-bit "
                        "low-rank branch). "
                        "It samples the calibration prompts with the model's own sampler, records what every "
                        "layer sees, and quantizes one block at a time on the model's device. LoRAs and other "
                        "weight patches already applied to the MODEL are baked in. The input MODEL is not changed.",
            inputs=[
                io.Model.Input("model", tooltip="A 16-bit or fp8 FLUX.1 / SDXL / Qwen-Image / Z-Image model from "
                                                "ComfyUI's loaders."),
                *prompts,
                io.Conditioning.Input("negative", optional=True,
                                      tooltip="Negative prompt for the calibration sampling when cfg > 1 (SDXL). "
                                              "Left empty: a zeroed prompt."),
                io.Combo.Input("precision", options=list(PRECISIONS), default="int4",
                               tooltip="int4: RTX 20/30/40-class GPUs (and the PyTorch path anywhere). nvfp4: RTX 50."),
                io.Int.Input("rank", default=32, min=0, max=RANK_MAX, step=16,
                             tooltip="Rank of the 16-bit low-rank branch (multiple of 16; 0: none). Higher: closer "
                                     "to the 16-bit model, larger and slower."),
                io.Boolean.Input("smoothing", default=True,
                                 tooltip="Search the smoothing factor (moves activation outliers into the weights) "
                                         "per layer input. Off: no smoothing; faster, less accurate."),
                io.Boolean.Input("gptq", default=True,
                                 tooltip="Round the 4-bit residual with GPTQ (kept only where it lowers the layer's "
                                         "output error). Off: a little faster, K² less memory per layer input."),
                io.String.Input("keep_16bit", default="", multiline=True,
                                tooltip="Layers to keep 16-bit besides the embedders, final layer and norms: names "
                                        "or patterns (* ?), separated by commas or lines, in ComfyUI's naming "
                                        "(double_blocks.0.img_mlp.*, single_blocks.37.*) or the checkpoint's "
                                        "(transformer_blocks.0.mlp_fc2). Files that keep layers load with this "
                                        "pack only."),
                io.Int.Input("steps", default=20, min=1, max=200, tooltip="Calibration sampling steps per prompt."),
                io.Int.Input("width", default=1024, min=64, max=4096, step=8, tooltip="Calibration image width."),
                io.Int.Input("height", default=1024, min=64, max=4096, step=8, tooltip="Calibration image height."),
                # No "control after generate" (the frontend gives every INT named seed one, set to randomize):
                # a new seed would quantize again and write a new file on every Run.
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=False,
                             tooltip="Noise seed of the first prompt (prompt i uses seed + i). Fixed: the same "
                                     "seed gives the same calibration and the same file."),
                io.Float.Input("cfg", default=1.0, min=0.0, max=30.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance of the calibration sampling. FLUX: 1.0 (guidance "
                                       "below). SDXL: your usual value, e.g. 6.0, with a negative prompt."),
                io.Float.Input("guidance", default=3.5, min=0.0, max=100.0, step=0.1,
                               tooltip="FLUX guidance embedding for the calibration prompts (as FluxGuidance; "
                                       "replaces theirs). Ignored by SDXL and FLUX.1-schnell."),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="euler"),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="simple"),
            ],
            outputs=[io.Model.Output(tooltip="The SVDQuant model, ready to sample or to save.")],
        )

    # validate_inputs names only what ComfyUI cannot check itself (rank's multiple of 16; in v0.3.x the
    # dropdowns), so that it still checks every other input; None: the value comes through a link.
    if checks_v3_dropdowns():
        @classmethod
        def validate_inputs(cls, rank: int | None = None) -> bool | str:
            return rank_problem(rank)
    else:
        @classmethod
        def validate_inputs(cls, rank: int | None = None, precision: str | None = None,
                            sampler_name: str | None = None, scheduler: str | None = None) -> bool | str:
            problem = rank_problem(rank)
            if problem is not True:
                return problem
            return unlisted_choice(cls, precision=precision, sampler_name=sampler_name, scheduler=scheduler) or True

    @classmethod
    def execute(cls, model, positive, precision: str, rank: int, smoothing: bool, gptq: bool, keep_16bit: str,
                steps: int, width: int, height: int, seed: int, cfg: float, guidance: float, sampler_name: str,
                scheduler: str, positive_2=None, positive_3=None, positive_4=None, negative=None) -> io.NodeOutput:
        prompts = calibration_prompts([positive, positive_2, positive_3, positive_4])
        conversion = Conversion(
            QuantizeConfig(precision=precision, rank=rank, smooth=smoothing, gptq=gptq),
            SamplingSettings(steps, width, height, seed, cfg, guidance, sampler_name, scheduler),
            keep=parse_patterns(keep_16bit),
        )
        bar = comfy.utils.ProgressBar(1)
        quantized = quantize_model(model, prompts, negative, conversion,
                                   progress=lambda done, total: bar.update_absolute(done, total))
        return io.NodeOutput(quantized)


def rank_problem(rank: int | None) -> bool | str:
    if rank is not None and (rank < 0 or rank > RANK_MAX or rank % 16):
        return f"rank = {rank}: the low-rank branch's rank must be a multiple of 16 from 0 to {RANK_MAX}"
    return True


def prefix_problem(prefix: str) -> bool | str:
    """True for a save prefix that stays inside diffusion_models on every OS, else what is wrong with it."""
    parts = prefix.replace("\\", "/").split("/")
    if not prefix.strip() or prefix.startswith(("/", "\\")) or ntpath.isabs(prefix) or ntpath.splitdrive(prefix)[0] \
            or ".." in parts:
        return f"filename prefix '{prefix}' must be a relative path inside models/{FOLDER}"
    return True


class SVDQuantSaveModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SVDQuantSaveModel",
            display_name="Save SVDQuant Model",
            category="advanced/SVDQuant",
            description="Writes an SVDQuant MODEL to models/diffusion_models as <prefix>_00001_.safetensors (the "
                        "counter goes up), in the format the Load SVDQuant Model node and nunchaku read.",
            inputs=[
                io.Model.Input("model", tooltip="An SVDQuant model (from SVDQuant Quantize Model or the loader)."),
                io.String.Input("filename_prefix", default="svdquant/model-svdq",
                                tooltip="Path under models/diffusion_models; a counter and .safetensors are "
                                        "appended."),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, filename_prefix: str | None = None) -> bool | str:
        # at queue time, before a Quantize node upstream spends its minutes
        return prefix_problem(filename_prefix) if filename_prefix is not None else True

    @classmethod
    def execute(cls, model, filename_prefix: str) -> io.NodeOutput:
        if model.patches:
            raise SVDQuantError(f"the MODEL carries {len(model.patches)} weight patches (LoRA) that the checkpoint "
                                "cannot hold; save the model before applying LoRAs")
        problem = prefix_problem(filename_prefix)
        if problem is not True:
            raise SVDQuantError(problem)
        root = os.path.abspath(save_folder())
        folder, name, counter, _, _ = folder_paths.get_save_image_path(filename_prefix, root)
        path = os.path.join(folder, f"{name}_{counter:05}_.safetensors")
        comfy.model_management.throw_exception_if_processing_interrupted()
        # As ComfyUI's own save nodes: load this MODEL with its own patches, so that the 16-bit weights it
        # shares with its clones are not those a clone (a LoRA sampled earlier) left patched in place.
        comfy.model_management.load_models_gpu([model], force_patch_weights=True)
        save_checkpoint(model.model.diffusion_model, path, getattr(model.model, "svdquant_metadata", None))
        listed = os.path.relpath(path, root).replace(os.sep, "/")
        return io.NodeOutput(ui=ui.PreviewText(f"saved {FOLDER}/{listed}"))
