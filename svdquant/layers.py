"""Quantized linear layers that hold a checkpoint's packed tensors and run them.

A layer's buffers are exactly the tensors of one layer in the file (python-style names, padded
shapes), so loading is a copy and saving is a read. ``forward`` asks :mod:`svdquant.dispatch` for a
fused kernel and otherwise runs the reference path below, which is the definition of what every
kernel computes and the fallback on CPUs and unsupported GPUs. Under ``torch.compile`` the same choice
runs inside one custom op per layer (:mod:`.torch_ops`).

W4A4, for x of shape (M, K) and the padded sizes Kp, Np:
    codes, ascales = quantize_activations(x / smooth)            # + GELU shift when act_unsigned
    y = (codes·ascales) @ (wcodes·wscales)ᵀ                      # fp32
      + round16(x @ proj_down) @ proj_upᵀ                        # branch on the raw 16-bit input
      + bias
"""

from __future__ import annotations

import torch
from torch import nn

from . import dispatch, int4, nvfp4, packing, w4a16
from .errors import ConfigError

PRECISIONS = ("int4", "nvfp4")
SIXTEEN_BIT = (torch.bfloat16, torch.float16)
# The floating-point tensors of a layer's file format, by attribute name (modules and the custom ops' views
# alike). A W4A16 layer's run-time LoRA term is not among them: no kernel reads it.
FLOAT_TENSORS = ("wscales", "wzeros", "smooth_factor", "smooth_factor_orig", "proj_down", "proj_up", "bias",
                 "wcscales", "wtscale")
FP32_TENSORS = ("wtscale",)  # NVFP4's per-tensor scale: one value, kept exact whatever the file stored


def _off_rule(layer: object, dtype: torch.dtype):
    """(name, tensor, the dtype the rule wants) for each tensor of ``layer`` outside the rule."""
    for name in FLOAT_TENSORS:
        value = getattr(layer, name, None)
        want = torch.float32 if name in FP32_TENSORS else dtype
        if value is not None and value.dtype in (*SIXTEEN_BIT, torch.float32) and value.dtype != want:
            yield name, value, want


def to_compute_dtype(layer: nn.Module, dtype: torch.dtype) -> None:
    """The one dtype rule of every tensor a fused kernel reads, for INT4 and NVFP4 whatever the file
    stores: 16-bit tensors (scales, smoothing, branch, bias) in the compute ``dtype``, the NVFP4
    per-tensor scale in float32; packed codes and FP8 scales as they are."""
    for name, value, want in list(_off_rule(layer, dtype)):
        setattr(layer, name, value.to(want))


def compute_dtype_problem(layer: object) -> str | None:
    """Which tensor of ``layer`` breaks :func:`to_compute_dtype`'s rule (so no kernel can read it as it
    is), or None."""
    for name, value, want in _off_rule(layer, layer.compute_dtype):
        return f"its {name} is {str(value.dtype).removeprefix('torch.')}, not {str(want).removeprefix('torch.')}"
    return None


def check_rank(rank: int, where: str = "rank") -> int:
    if rank < 0 or rank % packing.RANK_TILE:
        raise ConfigError(f"{where} = {rank}: the low-rank branch's rank must be a multiple of 16 (0 for none)")
    return rank


class W4A4Reference:
    """The reference path of a W4A4 layer, over the attributes :class:`W4A4Linear` holds (its buffers,
    ``precision``, ``act_unsigned``, ``out_features``): the module runs it, and so does the custom op
    (:mod:`.torch_ops`) on the tensors it is handed."""

    __slots__ = ()

    @property
    def rank(self) -> int:
        return self.proj_down.shape[1]

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.smooth_factor.dtype

    def weight_codes_and_scales(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Unpacked residual codes (Np, Kp) and the fp32 scales (Np, Kp/group) they multiply."""
        signed = self.precision == "int4"
        codes = packing.unpack_qweight(self.qweight, signed=signed)
        if signed:
            return codes, packing.unpack_scales(self.wscales).float()
        scales = nvfp4.effective_weight_scales(
            packing.unpack_fp8_scales(self.wscales), packing.unpack_vector(self.wcscales), self.wtscale
        )
        return codes, scales

    def residual(self) -> torch.Tensor:
        """fp32 (Np, Kp): the dequantized 4-bit residual, in the smoothed input space."""
        codes, scales = self.weight_codes_and_scales()
        if self.precision == "int4":
            return int4.dequantize_weight(codes, scales)
        return nvfp4.dequantize_weight(codes, scales)

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 (M, Kp): what the 4-bit GEMM sees of a padded input."""
        smooth = packing.unpack_vector(self.smooth_factor)
        if self.precision == "int4":
            return int4.dequantize_activations(*int4.quantize_activations(x, smooth, self.act_unsigned))
        return nvfp4.dequantize_activations(*nvfp4.quantize_activations(x, smooth))

    def branch_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Unpacked (down (R, Kp), up (Np, R)) in their stored 16-bit dtype."""
        return packing.unpack_down(self.proj_down), packing.unpack_up(self.proj_up)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """(M, in_features) → (M, out_features), in x's dtype."""
        kp = self.qweight.shape[1] * 2
        xp = packing.pad_to(x, (x.shape[0], kp))
        y = self.quantized_input(xp) @ self.residual().T
        return self.add_branch_and_bias(y, xp)[:, : self.out_features].to(x.dtype)

    def add_branch_and_bias(self, y: torch.Tensor, xp: torch.Tensor) -> torch.Tensor:
        """``y`` (fp32 (M, Np), the 4-bit GEMM's result for the padded input ``xp``) plus the low-rank
        branch and the bias, added in place in that order."""
        if self.rank:
            down, up = self.branch_factors()
            lora_act = (xp.to(down.dtype).float() @ down.float().T).to(up.dtype)
            y += lora_act.float() @ up.float().T
        if self.bias is not None:
            y += packing.unpack_vector(self.bias).float()
        return y


class W4A4Linear(W4A4Reference, nn.Module):
    """SVDQuant W4A4 linear: 4-bit residual, 4-bit activations, 16-bit low-rank branch."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int = 32,
        precision: str = "int4",
        act_unsigned: bool = False,
        bias: bool = True,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        if precision not in PRECISIONS:
            raise ConfigError(f"precision = {precision!r}: expected one of {PRECISIONS}")
        if act_unsigned and precision != "int4":
            raise ConfigError("act_unsigned applies to int4 only: nvfp4 activations are always signed")
        if dtype not in SIXTEEN_BIT:
            raise ConfigError(f"dtype = {dtype}: SVDQuant layers store bfloat16 or float16 tensors")
        check_rank(rank)
        self.in_features, self.out_features = in_features, out_features
        self.precision, self.act_unsigned = precision, act_unsigned
        self.kernel_backend = "auto"  # "auto" | "cuda" | "torch", set by the loader
        self.name = ""  # the model's name of the layer, for messages (set by the loader)
        kp, np_ = packing.round_up(in_features, packing.TILE), packing.round_up(out_features, packing.TILE)
        group = int4.GROUP if precision == "int4" else nvfp4.GROUP
        scale_dtype = dtype if precision == "int4" else torch.float8_e4m3fn

        def buffer(name: str, shape: tuple[int, ...], buffer_dtype: torch.dtype) -> None:
            self.register_buffer(name, torch.empty(shape, dtype=buffer_dtype, device=device))

        buffer("qweight", (np_, kp // 2), torch.int8)
        buffer("wscales", (kp // group, np_), scale_dtype)
        buffer("smooth_factor", (kp,), dtype)
        buffer("smooth_factor_orig", (kp,), dtype)
        buffer("proj_down", (kp, rank), dtype)
        buffer("proj_up", (np_, rank), dtype)
        if bias:
            buffer("bias", (np_,), dtype)
        else:
            self.bias = None
        if precision == "nvfp4":
            buffer("wcscales", (np_,), dtype)
            buffer("wtscale", (1,), torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])
        if torch.compiler.is_compiling():  # one opaque op to the compiler (svdquant/torch_ops.py)
            y = torch.ops.svdquant.w4a4(x, self.qweight, self.wscales, self.smooth_factor, self.proj_down,
                                        self.proj_up, self.bias, getattr(self, "wcscales", None),
                                        getattr(self, "wtscale", None), self.precision, self.act_unsigned,
                                        self.out_features, self.kernel_backend, self.name)
        else:
            y = dispatch.w4a4(self, x)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"precision={self.precision}, act_unsigned={self.act_unsigned}"
        )

    def to_dense(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """fp32 (weight (N, K), bias (N,)) of the dense layer this one stands for (no activation
        quantization). The GELU shift's bias compensation is undone, so the pair is the layer's
        dense equivalent in the raw input space."""
        smooth = packing.unpack_vector(self.smooth_factor).float()
        residual = self.residual() / smooth
        weight = residual.clone()
        if self.rank:
            down, up = self.branch_factors()
            weight += up.float() @ down.float()
        bias = packing.unpack_vector(self.bias).float() if self.bias is not None else None
        if self.act_unsigned:
            shift = int4.GELU_SHIFT * residual.sum(dim=1)
            bias = shift if bias is None else bias + shift
        n, k = self.out_features, self.in_features
        return weight[:n, :k].contiguous(), None if bias is None else bias[:n].contiguous()


class W4A16Reference:
    """The reference path of a W4A16 layer, over the attributes :class:`W4A16Linear` holds (see
    :class:`W4A4Reference`)."""

    __slots__ = ()

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.wscales.dtype

    def dequantized_weight(self) -> torch.Tensor:
        """fp32 (Np, Kp)."""
        codes = packing.unpack_awq_qweight(self.qweight)
        return w4a16.dequantize_weight(codes, self.wscales.T, self.wzeros.T)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        kp = self.qweight.shape[1] * 2
        y = packing.pad_to(x, (x.shape[0], kp)).float() @ self.dequantized_weight().T
        if self.bias is not None:
            y += self.bias.float()
        return y[:, : self.out_features].to(x.dtype)


class W4A16Linear(W4A16Reference, nn.Module):
    """4-bit weights with a zero point, 16-bit activations (AdaLN modulation layers)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        if dtype not in SIXTEEN_BIT:
            raise ConfigError(f"dtype = {dtype}: SVDQuant layers store bfloat16 or float16 tensors")
        self.in_features, self.out_features = in_features, out_features
        self.kernel_backend = "auto"
        self.name = ""
        kp, np_ = packing.round_up(in_features, packing.TILE), packing.round_up(out_features, packing.TILE)
        self.register_buffer("qweight", torch.empty((np_ // 4, kp // 2), dtype=torch.int32, device=device))
        self.register_buffer("wscales", torch.empty((kp // w4a16.GROUP, np_), dtype=dtype, device=device))
        self.register_buffer("wzeros", torch.empty((kp // w4a16.GROUP, np_), dtype=dtype, device=device))
        if bias:
            self.register_buffer("bias", torch.empty((np_,), dtype=dtype, device=device))
        else:
            self.bias = None
        # An optional 16-bit low-rank term (down (r, K), up (N_padded, r)) that LoRA adds at run time;
        # not part of the checkpoint.
        self.register_buffer("lora_down", None)
        self.register_buffer("lora_up", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if torch.compiler.is_compiling():  # see W4A4Linear.forward
            y = torch.ops.svdquant.w4a16(x2, self.qweight, self.wscales, self.wzeros, self.bias, self.out_features,
                                         self.kernel_backend, self.name)
        else:
            y = dispatch.w4a16(self, x2)
        lora_down = self._buffers["lora_down"]  # read from the table: a module's attribute lookup costs per call
        if lora_down is not None:
            y = y + ((x2.to(lora_down.dtype) @ lora_down.T) @ self.lora_up[: self.out_features].T).to(y.dtype)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"

    def to_dense(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        n, k = self.out_features, self.in_features
        bias = None if self.bias is None else self.bias[:n].float()
        return self.dequantized_weight()[:n, :k].contiguous(), bias


class ConcatLinear(nn.Module):
    """Several quantized linears reading the same input; outputs concatenated (FLUX's ``linear1`` =
    qkv ‖ mlp-in, stored as two SVDQuant layers)."""

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.in_features = parts[0].in_features
        self.out_features = sum(p.out_features for p in parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(x) for p in self.parts], dim=-1)

    def to_dense(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        dense = [p.to_dense() for p in self.parts]
        biases = [b if b is not None else torch.zeros(w.shape[0], device=w.device) for w, b in dense]
        return torch.cat([w for w, _ in dense]), torch.cat(biases)


class SplitInputLinear(nn.Module):
    """Quantized linears each reading a slice of the input; outputs summed (FLUX's ``linear2`` =
    attention-out + mlp-out, split along K so each half keeps its own smoothing and signedness)."""

    def __init__(self, parts: list[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.in_features = sum(p.in_features for p in parts)
        self.out_features = parts[0].out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pieces = torch.split(x, [p.in_features for p in self.parts], dim=-1)
        out = self.parts[0](pieces[0])
        for part, piece in zip(self.parts[1:], pieces[1:], strict=True):
            out = out + part(piece)
        return out

    def to_dense(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        dense = [p.to_dense() for p in self.parts]
        biases = [b for _, b in dense if b is not None]
        return torch.cat([w for w, _ in dense], dim=1), (sum(biases) if biases else None)
