"""The ``weight`` of an SVDQuant layer as ComfyUI's own code sees it: a tensor of the layer's logical
shape (out, in) and compute dtype, whose values are the dequantized layer.

ComfyUI reasons about a Linear through its ``weight``: LoRA key maps and ``calculate_shape`` read its
shape, model merging (``get_key_patches``) hands it to another model's patches, hook LoRAs start from a
float copy of it, memory estimates add up ``nbytes``. The 4-bit layer keeps its packed tensors in its
body (``op.quantized``, registered buffers, moved and counted with the module); this tensor is a view of
that body, in the idiom of ComfyUI's own ``QuantizedTensor`` (comfy-kitchen): a wrapper subclass with the
logical shape that owns no storage of its own.

What it does under each operation:
- metadata-only operations (``detach``, ``.to(device)``, a same-dtype copy) give another view;
- any computation, and a cast to another dtype, dequantizes the whole layer once (``to_dense``) and runs
  on that dense tensor, so merging ``0.5·a + 0.5·b`` or ``weight.to(torch.float32)`` are exact;
- writing into it in place raises: a 4-bit layer changes through its low-rank branch (the model patcher
  routes patches there), never by overwriting its weight.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from ..svdquant.errors import SVDQuantError

aten = torch.ops.aten
_VIEWS = (aten.detach.default, aten.alias.default)


class PackedWeight(torch.Tensor):
    """The logical (out, in) weight of the quantized body ``body`` (a view; see the module docstring)."""

    @staticmethod
    def __new__(cls, body: nn.Module, dtype: torch.dtype, device: torch.device | str):
        return torch.Tensor._make_wrapper_subclass(cls, (body.out_features, body.in_features), dtype=dtype,
                                                   device=torch.device(device), requires_grad=False)

    def __init__(self, body: nn.Module, dtype: torch.dtype, device: torch.device | str):
        self.body = body

    def dequantize(self) -> torch.Tensor:
        """The dense weight this view stands for, on its device and in its dtype."""
        return self.body.to_dense()[0].to(self.device, self.dtype)

    # The packed bytes are the body's buffers, which the module's state dict counts already. ComfyUI sums
    # ``nbytes`` (v0.8+) or ``nelement() * element_size()`` (before) over the state dict.
    @property
    def nbytes(self) -> int:
        return 0

    def element_size(self) -> int:
        return 0

    def __deepcopy__(self, memo: dict) -> PackedWeight:
        # A deep-copied layer gets a view of its own copied body (``memo`` makes the two copies one).
        return PackedWeight(copy.deepcopy(self.body, memo), self.dtype, self.device)

    def __repr__(self) -> str:
        return f"PackedWeight(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        view = args[0] if args and isinstance(args[0], PackedWeight) else None
        if view is not None and func in _VIEWS:
            # As inference-mode as its input: autograd gives a view of a normal tensor its input's version
            # counter, which an inference tensor cannot take (a model built outside inference mode, as scripts
            # build them, then has its state dict read inside it, as ComfyUI samples).
            with torch.inference_mode(view.is_inference()):
                return PackedWeight(view.body, view.dtype, view.device)
        if view is not None and func is aten._to_copy.default:
            device = kwargs.get("device") or view.device
            if kwargs.get("dtype", view.dtype) == view.dtype:
                return PackedWeight(view.body, view.dtype, device)
            # straight to the wanted dtype: an fp32 copy is exact, not rounded through the compute dtype
            return view.body.to_dense()[0].to(device, kwargs["dtype"])
        if func._schema.is_mutable and any(isinstance(a, PackedWeight) for a in tree_flatten(args)[0]):
            raise SVDQuantError(f"{func.__name__} would write into the weight of a 4-bit SVDQuant layer; its "
                                "weight changes only through the low-rank branch (LoRA, merges and hooks go there)")

        def dense(value):
            return value.dequantize() if isinstance(value, PackedWeight) else value

        return func(*tree_map(dense, args), **tree_map(dense, kwargs))
