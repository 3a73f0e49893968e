"""The quantized layers as PyTorch custom ops, so ``torch.compile`` sees each 4-bit layer as one op.

Without them the compiler would trace into a layer's forward: the reference path's unpacking (which
it would re-derive on every compile) and, on a GPU, the CuPy launch, which it cannot trace at all, so
it would break the graph at every layer. ``torch.ops.svdquant.w4a4`` / ``w4a16`` take the layer's
tensors and settings (not the module, which an op cannot take); their implementation runs the
layer's usual per-call choice (:mod:`.dispatch`: a fused kernel where one is installed and serves
the call, else the reference path) on a view of those tensors, and their fake implementation gives
the output's shape and dtype without computing it.

The layers call the ops only while compiling (``torch.compiler.is_compiling()``): in eager mode the
dispatcher's round trip would only add per-call overhead to the same computation.
"""

from __future__ import annotations

import torch

from . import dispatch
from .layers import W4A4Reference, W4A16Reference


class _Tensors:
    __slots__ = ()

    def __init__(self, **attributes):
        for name, value in attributes.items():
            setattr(self, name, value)

    @property
    def _buffers(self) -> dict[str, torch.Tensor]:
        """The tensors by name, as a module's buffer table holds them (what the kernels' plan key reads)."""
        return {name: value for name in self.__slots__ if isinstance(value := getattr(self, name, None), torch.Tensor)}


class W4A4Tensors(W4A4Reference, _Tensors):
    """A W4A4 layer as the op sees it: what :func:`dispatch.w4a4`, the kernels and the reference path
    read of a :class:`~.layers.W4A4Linear`."""

    __slots__ = ("in_features", "out_features", "precision", "act_unsigned", "kernel_backend", "name", "qweight",
                 "wscales", "smooth_factor", "proj_down", "proj_up", "bias", "wcscales", "wtscale")


class W4A16Tensors(W4A16Reference, _Tensors):
    """A W4A16 layer as the op sees it (see :class:`W4A4Tensors`)."""

    __slots__ = ("in_features", "out_features", "kernel_backend", "name", "qweight", "wscales", "wzeros", "bias")


@torch.library.custom_op("svdquant::w4a4", mutates_args=())
def w4a4(x: torch.Tensor, qweight: torch.Tensor, wscales: torch.Tensor, smooth_factor: torch.Tensor,
         proj_down: torch.Tensor, proj_up: torch.Tensor, bias: torch.Tensor | None, wcscales: torch.Tensor | None,
         wtscale: torch.Tensor | None, precision: str, act_unsigned: bool, out_features: int,
         kernel_backend: str, name: str) -> torch.Tensor:
    """(M, in_features) → (M, out_features): one W4A4 layer (the buffers of :class:`~.layers.W4A4Linear`)."""
    layer = W4A4Tensors(in_features=x.shape[1], qweight=qweight, wscales=wscales, smooth_factor=smooth_factor,
                        proj_down=proj_down, proj_up=proj_up, bias=bias, wcscales=wcscales, wtscale=wtscale,
                        precision=precision, act_unsigned=act_unsigned, out_features=out_features,
                        kernel_backend=kernel_backend, name=name)
    # The compiler plans memory from the fake output's (contiguous) layout; the reference path slices
    # the padded columns off.
    return dispatch.w4a4(layer, x).contiguous()


@w4a4.register_fake
def _(x, qweight, wscales, smooth_factor, proj_down, proj_up, bias, wcscales, wtscale, precision, act_unsigned,
      out_features, kernel_backend, name):
    return x.new_empty((x.shape[0], out_features))


@torch.library.custom_op("svdquant::w4a16", mutates_args=())
def w4a16(x: torch.Tensor, qweight: torch.Tensor, wscales: torch.Tensor, wzeros: torch.Tensor,
          bias: torch.Tensor | None, out_features: int, kernel_backend: str, name: str) -> torch.Tensor:
    """(M, in_features) → (M, out_features): one W4A16 layer without its LoRA term (which the layer adds
    around the op, in plain PyTorch the compiler sees)."""
    layer = W4A16Tensors(in_features=x.shape[1], qweight=qweight, wscales=wscales, wzeros=wzeros, bias=bias,
                         out_features=out_features, kernel_backend=kernel_backend, name=name)
    return dispatch.w4a16(layer, x).contiguous()


@w4a16.register_fake
def _(x, qweight, wscales, wzeros, bias, out_features, kernel_backend, name):
    return x.new_empty((x.shape[0], out_features))
