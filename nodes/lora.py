"""SVDQuant LoRA Stack: several LoRAs on a diffusion model in one node.

Each LoRA is applied exactly as ComfyUI's LoraLoaderModelOnly applies it (ComfyUI's key maps and
patch format), so this node and ComfyUI's own LoRA nodes are interchangeable on any model. What it
adds: a LoRA that matches no layer of the model, or whose tensors do not fit the layers it names, is
an error naming the file instead of a warning in the log; and it sets the rank with which adapters
other than LoRA pairs (LoHa, LoKr, full diffs, DoRA) are absorbed into 4-bit layers.
"""

from __future__ import annotations

import logging
import math

import comfy.lora
import comfy.lora_convert
import comfy.utils
import folder_paths
from comfy.weight_adapter import LoRAAdapter
from comfy_api.latest import io

from ..loaders.compat import checks_v3_dropdowns
from ..loaders.load import architecture_of
from ..loaders.lora import ADAPTER_RANK_OPTION, DEFAULT_ADAPTER_RANK
from ..loaders.ops import SVDQuantOps
from ..svdquant.errors import SVDQuantError
from .files import unlisted_choice

log = logging.getLogger(__name__)

SLOTS = 4  # validate_inputs names each slot
NONE = "None"


class SVDQuantLoraStack(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        names = [NONE] + folder_paths.get_filename_list("loras")
        slots = []
        for i in range(1, SLOTS + 1):
            slots += [
                io.Combo.Input(f"lora_{i}", options=names, default=NONE,
                               tooltip="A LoRA from models/loras (None: slot unused)."),
                io.Float.Input(f"strength_{i}", default=1.0, min=-100.0, max=100.0, step=0.01,
                               tooltip="How strongly the LoRA changes the model; may be negative."),
            ]
        return io.Schema(
            node_id="SVDQuantLoraStack",
            display_name="SVDQuant LoRA Stack",
            category="loaders/SVDQuant",
            description="Applies up to four LoRAs to a diffusion model, as ComfyUI's LoraLoaderModelOnly does. "
                        "On SVDQuant 4-bit layers LoRA pairs extend the low-rank branch exactly; LoHa, LoKr, "
                        "full-diff and DoRA patches are absorbed by a truncated SVD.",
            inputs=[io.Model.Input("model"), *slots,
                    io.Int.Input("adapter_svd_rank", default=DEFAULT_ADAPTER_RANK, min=1, max=1024, step=1,
                                 tooltip="Rank of the SVD that absorbs LoHa / LoKr / full-diff / DoRA patches on "
                                         "4-bit layers (LoRA pairs are exact at any setting). Higher is closer, "
                                         "slower to prepare and uses more memory.")],
            outputs=[io.Model.Output()],
        )

    if not checks_v3_dropdowns():  # v0.3.x: the dropdowns are the node's to check (see loaders/compat.py)
        @classmethod
        def validate_inputs(cls, lora_1: str | None = None, lora_2: str | None = None, lora_3: str | None = None,
                            lora_4: str | None = None) -> bool | str:
            # Names only the dropdowns, so ComfyUI still range-checks the strengths and the rank.
            return unlisted_choice(cls, lora_1=lora_1, lora_2=lora_2, lora_3=lora_3, lora_4=lora_4) or True

    @classmethod
    def execute(cls, model, adapter_svd_rank: int = DEFAULT_ADAPTER_RANK, **slots) -> io.NodeOutput:
        patched = model.clone()
        patched.model_options[ADAPTER_RANK_OPTION] = adapter_svd_rank
        for i in range(1, SLOTS + 1):
            name, strength = slots.get(f"lora_{i}", NONE), slots.get(f"strength_{i}", 1.0)
            if name != NONE and strength != 0:
                add_lora(patched, name, strength)
        return io.NodeOutput(patched)


def add_lora(model, name: str, strength: float) -> None:
    """Add the LoRA file ``name`` (in the loras folder) to ``model``'s patches with ``strength``."""
    path = folder_paths.get_full_path("loras", name)
    if path is None:
        folders = ", ".join(folder_paths.get_folder_paths("loras"))
        raise SVDQuantError(f"LoRA '{name}' is not in the loras folder(s): {folders}")
    try:
        tensors = comfy.utils.load_torch_file(path, safe_load=True)
    except Exception as exc:  # a library error: say which file, keep the cause attached
        raise SVDQuantError(f"LoRA '{name}' cannot be read ({type(exc).__name__}: {exc})") from exc
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    patches = comfy.lora.load_lora(comfy.lora_convert.convert_lora(tensors), key_map)
    if not patches:
        example = next(iter(tensors), "none")
        raise SVDQuantError(f"LoRA '{name}' matches no layer of this {_model_name(model)} model (its first key is "
                            f"'{example}'): it is a LoRA for another model, or not a LoRA")
    for target, patch in patches.items():
        _check_fit(model, name, target, patch)
    applied = set(model.add_patches(patches, strength))
    dropped = [k if isinstance(k, str) else k[0] for k in patches if k not in applied]
    if dropped:
        log.warning("SVDQuant: LoRA '%s': %d changes have no target in the model and are not applied (e.g. %s)",
                    name, len(dropped), dropped[0])


def _model_name(model) -> str:
    found = architecture_of(model.model.diffusion_model)
    return found[0].label if found else type(model.model).__name__


def _check_fit(model, name: str, target, patch) -> None:
    """Raise if a LoRA pair or diff does not fit the weight it targets (ComfyUI only logs it)."""
    key, offset = (target, None) if isinstance(target, str) else (target[0], target[1])
    module_name, _, param = key.rpartition(".")
    try:
        module = comfy.utils.get_attr(model.model, module_name)
    except AttributeError:
        return  # no such layer: add_patches leaves it out
    if isinstance(module, SVDQuantOps.Linear) and module.quantized is not None and param == "weight":
        shape = [module.out_features, module.in_features]
    else:
        tensor = getattr(module, param, None)
        if tensor is None:
            return
        shape = list(tensor.shape)
    if offset is not None:
        shape[offset[0]] = offset[2]
    if isinstance(patch, LoRAAdapter):
        up, down, _, mid, _, reshape = patch.weights
        if mid is not None or reshape is not None:
            return  # conv-style or padding LoRAs: ComfyUI's own checks apply
        fits = up.shape[0] == shape[0] and up[0].numel() == down.shape[0] and down[0].numel() == math.prod(shape[1:])
        given = f"up {list(up.shape)}, down {list(down.shape)}"
    elif isinstance(patch, tuple) and len(patch) == 2 and patch[0] == "diff":
        fits = list(patch[1][0].shape) == shape
        given = f"a difference of shape {list(patch[1][0].shape)}"
    else:
        return
    if not fits:
        layer = module_name.removeprefix("diffusion_model.")
        raise SVDQuantError(f"LoRA '{name}' does not fit this {_model_name(model)} model: it changes '{layer}' "
                            f"({'×'.join(map(str, shape))}) with {given}; it is a LoRA for another model")
