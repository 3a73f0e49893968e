"""Load SVDQuant Model: an SVDQuant FLUX.1 / SDXL / Qwen-Image / Z-Image checkpoint as a ComfyUI MODEL."""

from __future__ import annotations

import comfy.utils
from comfy_api.latest import io

from ..loaders.compat import checks_v3_dropdowns
from ..loaders.load import load_checkpoint
from ..loaders.patcher import SVDQuantModelPatcher
from ..svdquant.errors import CheckpointError, SVDQuantError
from .files import FOLDER, checkpoint_names, checkpoint_path, fingerprint, unlisted_choice

COMPUTE_DTYPES = ["auto", "bfloat16", "float16"]
KERNEL_BACKENDS = ["auto", "cuda", "torch"]


def dtype_input() -> io.Combo.Input:
    return io.Combo.Input("compute_dtype", options=COMPUTE_DTYPES, default="auto",
                          tooltip="16-bit type of activations, the low-rank branch and every 16-bit layer. auto: "
                                  "the checkpoint's type where the device supports it (bfloat16 needs an Ampere or "
                                  "newer GPU), else float16.")


def backend_input() -> io.Combo.Input:
    return io.Combo.Input("kernel_backend", options=KERNEL_BACKENDS, default="auto",
                          tooltip="auto: the fused CUDA kernels where the GPU supports them, else PyTorch. "
                                  "cuda: fail with a message if the kernels cannot run here. "
                                  "torch: always the PyTorch path (slower, runs anywhere).")


def load_model(path: str, compute_dtype: str, kernel_backend: str) -> SVDQuantModelPatcher:
    """Load a checkpoint with a progress bar in the UI; every failure is an SVDQuantError naming the file."""
    bar = comfy.utils.ProgressBar(1)
    try:
        return load_checkpoint(path, compute_dtype, kernel_backend,
                               progress=lambda done, total: bar.update_absolute(done, total))
    except SVDQuantError:
        raise
    except Exception as exc:  # a library error: say which file, keep the cause attached
        raise CheckpointError(path, f"could not be loaded as an SVDQuant model ({type(exc).__name__}: {exc})") from exc


class SVDQuantModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SVDQuantModelLoader",
            display_name="Load SVDQuant Model",
            category="loaders/SVDQuant",
            description="Loads a 4-bit SVDQuant FLUX.1 (dev, schnell, Krea, Kontext, Fill, Depth, Canny), SDXL, "
                        "Qwen-Image (and Edit) or Z-Image-Turbo checkpoint from models/diffusion_models: this pack's "
                        "files and nunchaku's svdq-int4_r* / svdq-fp4_r* files. The model is ComfyUI's own model "
                        "class for its family, so "
                        "LoRA loaders, ControlNet, model patches and samplers work as with a 16-bit model.",
            inputs=[
                io.Combo.Input("model_name", options=checkpoint_names(),
                               tooltip=f"An SVDQuant checkpoint in models/{FOLDER} (listed first): a .safetensors "
                                       "file, or a folder in the older two-file layout (shown with a trailing /). "
                                       "16-bit and fp8 models load with Load Diffusion Model; SVDQuant Quantize "
                                       "Model makes a 4-bit model from them."),
                dtype_input(),
                backend_input(),
            ],
            outputs=[io.Model.Output(tooltip="The diffusion model, 4-bit layers inside ComfyUI's own model class.")],
        )

    if not checks_v3_dropdowns():  # v0.3.x: the dropdowns are the node's to check (see loaders/compat.py)
        @classmethod
        def validate_inputs(cls, model_name: str | None = None, compute_dtype: str | None = None,
                            kernel_backend: str | None = None) -> bool | str:
            if model_name is not None and model_name not in checkpoint_names():
                return f"SVDQuant checkpoint '{model_name}' is not in the {FOLDER} folder"
            return unlisted_choice(cls, compute_dtype=compute_dtype, kernel_backend=kernel_backend) or True

    @classmethod
    def fingerprint_inputs(cls, model_name: str, compute_dtype: str = "auto", kernel_backend: str = "auto") -> tuple:
        return fingerprint(model_name), compute_dtype, kernel_backend

    @classmethod
    def execute(cls, model_name: str, compute_dtype: str = "auto", kernel_backend: str = "auto") -> io.NodeOutput:
        problem = unlisted_choice(cls, compute_dtype=compute_dtype, kernel_backend=kernel_backend)
        if problem:  # reached only through a link that bypassed validation
            raise SVDQuantError(f"Load SVDQuant Model: {problem}")
        path = checkpoint_path(model_name)
        return io.NodeOutput(load_model(path, compute_dtype, kernel_backend))

