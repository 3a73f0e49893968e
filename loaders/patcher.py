"""A ModelPatcher that routes weight patches of SVDQuant layers to their low-rank branch.

ComfyUI's own ModelPatcher merges a patch into a dense weight. A quantized layer has no dense weight to
merge into: its patches are handed to the layer, which extends its 16-bit low-rank branch at forward time
(see :mod:`.lora`). That holds for the three ways ComfyUI patches weights: LoRA and merge patches at load
(``patch_weight_to_device``), patches of streamed layers in low-VRAM mode (read by the layer itself), and
hook patches with scheduled strengths during sampling (``patch_hook_weight_to_device``). Everything else
(16-bit layers, low-VRAM bookkeeping, clones, model options) is ComfyUI's own code. ``clone()`` keeps this
class, so ComfyUI's LoRA loaders, which clone the model, keep the behaviour.

The base is ComfyUI's classic ModelPatcher in every version. Under dynamic VRAM (v0.33+, on by default on
NVIDIA GPUs) ComfyUI's other models use ``ModelPatcherDynamic``, which stages each weight in a virtual
buffer sized by its logical 16-bit shape and casts it per call through ``comfy.ops``; an SVDQuant layer
runs its packed tensors through its own kernels, so it stays with the patcher that loads modules whole
(or streams them in low-VRAM mode), which ComfyUI supports beside dynamic ones.
"""

from __future__ import annotations

import collections

import comfy.hooks
import comfy.model_management
import comfy.model_patcher
import comfy.utils
from tqdm import tqdm

from .lora import ADAPTER_RANK_OPTION, DEFAULT_ADAPTER_RANK, branch_bytes, branch_rank, needs_absorption
from .ops import SVDQuantOps, quantized_ops

_Backup = collections.namedtuple("Dimension", ["weight", "inplace_update"])


def _quantized_op(model, key: str) -> SVDQuantOps.Linear | None:
    module_name, _, leaf = key.rpartition(".")
    if leaf != "weight":
        return None
    try:
        op = comfy.utils.get_attr(model, module_name)
    except AttributeError:
        return None
    return op if isinstance(op, SVDQuantOps.Linear) and op.quantized is not None else None


class SVDQuantModelPatcher(comfy.model_patcher.ModelPatcher):
    _packed_size: int | None = None

    def load(self, *args, **kwargs):
        # The layers are shared by every clone: the adapter rank of the clone being loaded wins.
        for _, op in quantized_ops(self.model):
            op.lora_adapter_rank = self._adapter_rank()
        out = super().load(*args, **kwargs)
        self._absorb_adapters()
        return out

    def _absorb_adapters(self) -> None:
        """Adapters other than LoRA pairs (LoHa, LoKr, DoRA, merges) become branch ranks through an SVD of each
        layer's change: done here, once per patch set, with a progress bar, rather than inside the first
        sampling step (where a streamed layer would otherwise do it)."""
        layers = [op for key, op in ((k, _quantized_op(self.model, k)) for k in self.patches)
                  if op is not None and needs_absorption(self.patches[key])]
        if not layers:
            return
        bar = comfy.utils.ProgressBar(len(layers))
        for done, op in enumerate(tqdm(layers, desc="SVDQuant: absorbing adapters", unit="layer"), start=1):
            comfy.model_management.throw_exception_if_processing_interrupted()
            op.prepare_branch()
            bar.update_absolute(done, len(layers))

    def _adapter_rank(self) -> int:
        return self.model_options.get(ADAPTER_RANK_OPTION, DEFAULT_ADAPTER_RANK)

    def model_size(self):
        """The packed model plus the low-rank branch its patches add (what stays on the device while the
        model is loaded; a 16-bit model merges its LoRAs into the weights it has anyway)."""
        if self._packed_size is None:  # ComfyUI passes model_size() to clones; recomputed from the model here
            self._packed_size = comfy.model_management.module_size(self.model)
        extra = 0
        for key, patches in self.patches.items():
            op = _quantized_op(self.model, key)
            if op is not None:
                extra += branch_bytes(op, branch_rank(patches, self._adapter_rank()))
        return self._packed_size + extra

    def patch_weight_to_device(self, key, device_to=None, *args, **kwargs):
        op = _quantized_op(self.model, key)
        if op is None:
            return super().patch_weight_to_device(key, device_to, *args, **kwargs)
        if key in self.patches:
            # The "backup" only marks the key as patched; restoring it puts back the same weight view.
            if key not in self.backup:
                self.backup[key] = _Backup(op.weight, False)
            op.set_lora(self.patches[key])
        return op.weight if kwargs.get("return_weight") else None

    def unpatch_model(self, device_to=None, unpatch_weights=True):
        if unpatch_weights:
            for _, op in quantized_ops(self.model):
                op.set_lora(None)
        return super().unpatch_model(device_to, unpatch_weights)

    def partially_unload(self, device_to, memory_to_free=0, *args, **kwargs):
        freed = super().partially_unload(device_to, memory_to_free, *args, **kwargs)
        # Layers moved to low-VRAM mode now carry their patches in weight_function.
        for _, op in quantized_ops(self.model):
            if op.weight_function:
                op.set_lora(None)
        return freed

    # Hook patches (Create Hook LoRA, scheduled strengths): ComfyUI writes a patched dense weight and keeps
    # a backup; for a 4-bit layer the step's patches go to the branch and the backup marks the key.
    def patch_hook_weight_to_device(self, hooks, combined_patches, key, original_weights, memory_counter):
        op = _quantized_op(self.model, key)
        if op is None:
            return super().patch_hook_weight_to_device(hooks, combined_patches, key, original_weights, memory_counter)
        if key not in combined_patches:
            return
        self._set_hook_patches(key, op, combined_patches[key])
        if original_weights is not None:
            original_weights.pop(key, None)
        if self.hook_mode == comfy.hooks.EnumHookMode.MaxSpeed:
            self.cached_hook_patches.setdefault(hooks, {})[key] = (combined_patches[key], op.weight.device)

    def patch_cached_hook_weights(self, cached_weights, key, memory_counter):
        op = _quantized_op(self.model, key)
        if op is None:
            return super().patch_cached_hook_weights(cached_weights, key, memory_counter)
        self._set_hook_patches(key, op, cached_weights[key][0])

    def _set_hook_patches(self, key, op, patches) -> None:
        self.hook_backup.setdefault(key, (op.weight, op.weight.device))
        op.set_hook_patches(patches)

    def unpatch_hooks(self, whitelist_keys_set=None):
        for key in list(self.hook_backup):
            op = _quantized_op(self.model, key)
            if op is not None and (not whitelist_keys_set or key in whitelist_keys_set):
                op.set_hook_patches(None)
                del self.hook_backup[key]
        return super().unpatch_hooks(whitelist_keys_set)
