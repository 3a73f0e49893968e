"""ComfyUI custom operations for SVDQuant models, in the idiom of ``comfy/ops.py``.

ComfyUI builds its own FLUX / SDXL classes with ``operations.Linear(...)``. Ours starts as an empty
16-bit Linear (on the meta device, so nothing is allocated before the checkpoint's tensors are
assigned) and becomes an SVDQuant layer when the loader hands it a quantized body. Everything else
(convolutions, norms, embeddings) is ComfyUI's own, so model patches, ControlNet, samplers and other
packs see the model they expect.

A quantized op keeps ComfyUI's contract:
- ``weight`` is a Parameter of the layer's logical shape and compute dtype (:class:`.weight.PackedWeight`, a
  view of the packed body), so LoRA key maps, shape checks, model merging and hook LoRAs see a Linear; the
  packed tensors live in ``quantized`` and count in ``state_dict`` (the memory estimates are the packed sizes).
- ``comfy_cast_weights`` (low-VRAM mode) streams the packed tensors to the input's device per call.
- Weight patches extend the low-rank branch (see :mod:`.lora`): the patches ComfyUI attaches to a streamed
  layer, else those the SVDQuant ModelPatcher assigned, plus the hook patches of the current sampling step.
"""

from __future__ import annotations

import logging
import operator

import comfy.ops
import torch
from torch import nn

from ..svdquant.errors import SVDQuantError
from ..svdquant.layers import W4A4Linear
from .compat import lowvram_patch
from .weight import PackedWeight

log = logging.getLogger(__name__)


def _on(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return t if t is None or t.device == device else t.to(device, non_blocking=True)


def _moved(module: nn.Module, device: torch.device, replace: dict[int, dict[str, torch.Tensor]]) -> nn.Module:
    """A shallow copy of ``module`` whose buffers are on ``device`` (and replaced where ``replace``
    says so, keyed by the id of the original leaf); the original module is untouched. It runs per call of a
    LoRA'd or streamed layer, so it copies the instance dict directly (what ``copy.copy`` does, less the
    pickling protocol's cost) and leaves tensors already on ``device`` as they are."""
    state = module.__dict__.copy()
    state["_buffers"] = {k: _on(v, device) for k, v in module._buffers.items()}
    state["_buffers"].update({k: _on(v, device) for k, v in replace.get(id(module), {}).items()})
    state["_modules"] = {k: _moved(v, device, replace) for k, v in module._modules.items()}
    clone = object.__new__(type(module))
    object.__setattr__(clone, "__dict__", state)  # not through Module.__setattr__, whose checks cost more
    return clone


class SVDQuantOps(comfy.ops.disable_weight_init):
    class Linear(comfy.ops.disable_weight_init.Linear):
        # Set per layer by ComfyUI's dynamic VRAM (v0.33+) to stream a layer with its patches; this default
        # spares every other layer call a failed module attribute lookup.
        weight_lowvram_function = None

        def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
            nn.Module.__init__(self)
            self.in_features, self.out_features = in_features, out_features
            self.weight = nn.Parameter(torch.empty((out_features, in_features), device="meta", dtype=dtype),
                                       requires_grad=False)
            self.bias = None
            if bias:
                self.bias = nn.Parameter(torch.empty(out_features, device="meta", dtype=dtype), requires_grad=False)
            self.quantized: nn.Module | None = None
            self._first_buffer: tuple[nn.Module, str] | None = None  # where body_device reads it
            self.lora_patches: list | None = None  # set by SVDQuantModelPatcher.patch_weight_to_device
            self.hook_patches: list | None = None  # set by SVDQuantModelPatcher.patch_hook_weight_to_device
            self._branch_cache: tuple | None = None
            self.lora_adapter_rank = 64

        def set_quantized(self, body: nn.Module) -> None:
            """Turn this op into an SVDQuant layer computed by ``body``."""
            if (body.in_features, body.out_features) != (self.in_features, self.out_features):
                raise SVDQuantError(f"quantized layer is {body.in_features}→{body.out_features}, the model's "
                                    f"Linear is {self.in_features}→{self.out_features}")
            self.quantized = body
            # A module keeps its identity and buffer names when moved (only its tensors are replaced)
            self._first_buffer = next((m, name) for m in body.modules() for name, t in m._buffers.items()
                                      if t is not None)
            self.weight = nn.Parameter(PackedWeight(body, self.weight.dtype, self.body_device()), requires_grad=False)
            self.bias = None
            self.clear_lora()

        def body_device(self) -> torch.device:
            """The device of the quantized body's tensors (read per call: a cheap lookup, not a module walk)."""
            module, name = self._first_buffer
            return module._buffers[name].device

        def set_lora(self, patches: list | None) -> None:
            self.lora_patches = patches
            self._branch_cache = None

        def set_hook_patches(self, patches: list | None) -> None:
            self.hook_patches = patches

        def clear_lora(self) -> None:
            self.set_lora(None)
            self.set_hook_patches(None)

        def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                                  unexpected_keys, error_msgs):
            # 16-bit layers: take the loaded tensors as they are (no copy into a preallocated buffer).
            for name in ("weight", "bias"):
                key = prefix + name
                if key not in state_dict:
                    if getattr(self, name) is not None and self.quantized is None:
                        missing_keys.append(key)
                    continue
                if self.quantized is not None:
                    unexpected_keys.append(key)
                    continue
                value = state_dict[key]
                current = getattr(self, name)
                if current is None or tuple(value.shape) != tuple(current.shape):
                    error_msgs.append(f"{key}: shape {list(value.shape)} does not fit this Linear "
                                      f"({self.in_features}→{self.out_features})")
                    continue
                setattr(self, name, nn.Parameter(value.to(current.dtype), requires_grad=False))

        def _active_patches(self) -> list:
            if not (self.lora_patches or self.hook_patches or self.weight_function or self.weight_lowvram_function):
                return []  # the common call, kept cheap: nothing attached
            streamed = lowvram_patch(self)
            wrappers = [f for f in self.weight_function if f is not streamed]
            if wrappers and not getattr(self, "_warned_wrapper", False):
                self._warned_wrapper = True
                log.warning("SVDQuant: a weight wrapper on a quantized layer cannot change 4-bit weights; ignored")
            patches = streamed.patches[streamed.key] if streamed is not None else self.lora_patches
            return [*(patches or ()), *(self.hook_patches or ())]

        def _branches(self, patches: list) -> dict[int, dict[str, torch.Tensor]]:
            from .lora import branch_buffers  # imported late: only LoRA users need it

            # Keyed by the patch tuples themselves (held, so a freed tuple's id cannot be reused by a
            # new patch) and the adapter rank; dropped with the patches by set_lora / unpatch.
            cached = self._branch_cache
            if (cached is None or cached[1] != self.lora_adapter_rank or len(cached[0]) != len(patches)
                    or not all(map(operator.is_, cached[0], patches))):
                self._branch_cache = (tuple(patches), self.lora_adapter_rank, branch_buffers(self, patches))
            return self._branch_cache[2]

        def prepare_branch(self) -> None:
            """Build the branch for the patches this layer runs with now (what the first forward would)."""
            patches = self._active_patches()
            if patches:
                self._branches(patches)

        def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            if self.quantized is None:
                return super().forward(x, *args, **kwargs)
            body = self.quantized
            patches = self._active_patches()
            replace = self._branches(patches) if patches else {}
            if self.comfy_cast_weights or replace or self.body_device() != x.device:
                body = _moved(body, x.device, replace)
            return body.forward(x)  # the body is this op's inside: hooks belong on the op (this call is per layer)

        def extra_repr(self) -> str:
            kind = "svdquant" if self.quantized is not None else "16-bit"
            return f"in_features={self.in_features}, out_features={self.out_features}, {kind}"


def quantized_ops(model: nn.Module) -> list[tuple[str, SVDQuantOps.Linear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SVDQuantOps.Linear) and m.quantized is not None]


def w4a4_leaves(model: nn.Module) -> list[W4A4Linear]:
    return [m for m in model.modules() if isinstance(m, W4A4Linear)]
