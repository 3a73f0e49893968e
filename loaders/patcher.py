"""A ModelPatcher that routes LoRA patches of SVDQuant layers to their low-rank branch.

ComfyUI's own ModelPatcher merges a patch into a dense weight. For a quantized layer there is no
dense weight to merge into: the patches are handed to the layer, which extends its 16-bit low-rank
branch at forward time (see :mod:`.lora`). Everything else (16-bit layers, low-VRAM bookkeeping,
clones, model options) is ComfyUI's own code. ``clone()`` keeps this class, so ComfyUI's LoRA
loaders, which clone the model, keep the behaviour.
"""

from __future__ import annotations

import collections

import comfy.model_patcher
import comfy.utils

from .lora import ADAPTER_RANK_OPTION, DEFAULT_ADAPTER_RANK
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
    def load(self, *args, **kwargs):
        # The layers are shared by every clone: the adapter rank of the clone being loaded wins.
        rank = self.model_options.get(ADAPTER_RANK_OPTION, DEFAULT_ADAPTER_RANK)
        for _, op in quantized_ops(self.model):
            op.lora_adapter_rank = rank
        return super().load(*args, **kwargs)

    def patch_weight_to_device(self, key, device_to=None, inplace_update=False):
        op = _quantized_op(self.model, key)
        if op is None:
            return super().patch_weight_to_device(key, device_to, inplace_update)
        if key not in self.patches:
            return
        # The "backup" only marks the key as patched; restoring it puts back the same descriptor.
        if key not in self.backup:
            self.backup[key] = _Backup(op.weight, False)
        op.set_lora(self.patches[key])

    def unpatch_model(self, device_to=None, unpatch_weights=True):
        if unpatch_weights:
            for _, op in quantized_ops(self.model):
                op.clear_lora()
        return super().unpatch_model(device_to, unpatch_weights)

    def partially_unload(self, device_to, memory_to_free=0):
        freed = super().partially_unload(device_to, memory_to_free)
        # Layers moved to low-VRAM mode now carry their patches in weight_function.
        for _, op in quantized_ops(self.model):
            if op.weight_function:
                op.set_lora(None)
        return freed
