"""Checkpoints in the nunchaku layout, written from known dense weights, for the loader's tests.

The layout is followed from its public description, independently of the pack's own writer and
packing code (nothing here imports ``svdquant`` or ``loaders``): names from nunchaku's C++
``FluxModel.cpp`` / ``Linear.cpp`` and deepcompressor's ``backend/nunchaku/convert.py``; the
python backend's names from ``transformer_flux_v2.py`` (``convert_flux_state_dict``); SDXL names from
``unet_sdxl.py``; every packed position computed from the layout formulas of deepcompressor's
``backend/nunchaku/utils.py`` (NunchakuWeightPacker) and ``backend/tinychat/utils.py`` with explicit
index arithmetic.

Each writer returns what the file stands for: for every quantized ComfyUI Linear, the fp32
(weight, bias) of the dense layer the file's tensors reconstruct (no activation quantization). A
correct reader reproduces these to rounding; ``faults`` write a piece the way a wrong reader would
read it, so tests can show that their checks notice.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

GELU_SHIFT = 0.171875  # nunchaku gemm_w4a4_launch_impl.cuh: SHIFT_GELU
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
FAULTS = {
    "no_interleave",  # modulation rows in plain chunk order instead of interleaved
    "no_scale_bias",  # modulation "scale" biases without the pre-added +1
    "no_gelu_shift",  # fc2 biases without the compensation of the +0.171875 input shift
    "swap_qk",  # q and k rows exchanged inside fused qkv layers
    "wcscales_unpacked",  # NVFP4 per-channel scales stored in plain order
    "no_wtscale",  # NVFP4 per-tensor scale left out
}

Dense = dict[str, tuple[torch.Tensor, torch.Tensor | None]]


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def _pad(t: torch.Tensor, rows: int, cols: int | None = None, value: float = 0.0) -> torch.Tensor:
    out = torch.full((rows,) + ((cols,) if cols is not None else t.shape[1:]), value, dtype=t.dtype)
    out[tuple(slice(0, s) for s in t.shape)] = t
    return out


def _to_int(words: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """int64 holding unsigned ``bits``-bit words → the signed integer dtype of that width (wrapped)."""
    words = words & ((1 << bits) - 1)
    return torch.where(words >= 1 << (bits - 1), words - (1 << bits), words).to(dtype)


# --- packers: position of every element from the layout formulas -----------------------------

def pack_qweight(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes (N, K) → int8 (N, K/2). n = 128·nt + 16·np + 8·nh + nl, k = 64·kt + 32·kh + 8·kl + e;
    int32 word (((nt·K/64 + kt)·8 + np)·32 + 4·nl + kl)·4 + 2·nh + kh holds nibble e."""
    n_size, k_size = codes.shape
    n = torch.arange(n_size).view(-1, 1)
    k = torch.arange(k_size).view(1, -1)
    nt, np_, nh, nl = n // 128, n % 128 // 16, n % 16 // 8, n % 8
    kt, kh, kl, e = k // 64, k % 64 // 32, k % 32 // 8, k % 8
    word = (((nt * (k_size // 64) + kt) * 8 + np_) * 32 + 4 * nl + kl) * 4 + 2 * nh + kh
    words = torch.zeros(n_size * k_size // 8, dtype=torch.int64)
    words.index_add_(0, word.flatten(), ((codes.to(torch.int64) & 0xF) << (4 * e)).flatten())
    return _to_int(words, 32, torch.int32).view(torch.int8).view(n_size, k_size // 2)


def pack_scales(scales: torch.Tensor) -> torch.Tensor:
    """16-bit (N, G) → (G, N): n = 128·t + 16·a + 8·b + 2·c + d at ((((t·G + g)·8 + a)·4 + c)·2 + b)·2 + d."""
    n_size, g_size = scales.shape
    n = torch.arange(n_size).view(-1, 1)
    g = torch.arange(g_size).view(1, -1)
    t, a, b, c, d = n // 128, n % 128 // 16, n % 16 // 8, n % 8 // 2, n % 2
    pos = ((((t * g_size + g) * 8 + a) * 4 + c) * 2 + b) * 2 + d
    out = torch.empty(n_size * g_size, dtype=scales.dtype)
    out[pos.flatten()] = scales.flatten()
    return out.view(g_size, n_size)


def pack_vector(v: torch.Tensor) -> torch.Tensor:
    return pack_scales(v.view(-1, 1)).view(-1)


def pack_fp8_scales(scales: torch.Tensor) -> torch.Tensor:
    """float8 (N, K/16) → (K/16, N): n = 128·t + 32·s + 8·a + b, group = 4·kk + q at
    ((((t·G/4 + kk)·8 + b)·4 + a)·4 + s)·4 + q."""
    n_size, g_size = scales.shape
    n = torch.arange(n_size).view(-1, 1)
    g = torch.arange(g_size).view(1, -1)
    t, s, a, b = n // 128, n % 128 // 32, n % 32 // 8, n % 8
    kk, q = g // 4, g % 4
    pos = ((((t * (g_size // 4) + kk) * 8 + b) * 4 + a) * 4 + s) * 4 + q
    out = torch.empty(n_size * g_size, dtype=torch.uint8)
    out[pos.flatten()] = scales.view(torch.uint8).flatten()
    return out.view(torch.float8_e4m3fn).view(g_size, n_size)


def pack_down(down: torch.Tensor) -> torch.Tensor:
    """Logical (R, K) → stored (K, R): r = 16·rt + 8·nh + nl, k = 16·kt + 8·kh + 2·kl + e at
    ((((kt·R/16 + rt)·32 + 4·nl + kl)·2 + nh)·2 + kh)·2 + e."""
    r_size, k_size = down.shape
    r = torch.arange(r_size).view(-1, 1)
    k = torch.arange(k_size).view(1, -1)
    rt, nh, nl = r // 16, r % 16 // 8, r % 8
    kt, kh, kl, e = k // 16, k % 16 // 8, k % 8 // 2, k % 2
    pos = ((((kt * (r_size // 16) + rt) * 32 + 4 * nl + kl) * 2 + nh) * 2 + kh) * 2 + e
    out = torch.empty(r_size * k_size, dtype=down.dtype)
    out[pos.flatten()] = down.flatten()
    return out.view(k_size, r_size)


def pack_up(up: torch.Tensor) -> torch.Tensor:
    """(N, R): n = 16·nt + 8·nh + nl, r = 16·rt + 8·kh + 2·kl + e at
    ((((nt·R/16 + rt)·32 + 4·nl + kl)·2 + nh)·2 + kh)·2 + e."""
    n_size, r_size = up.shape
    n = torch.arange(n_size).view(-1, 1)
    r = torch.arange(r_size).view(1, -1)
    nt, nh, nl = n // 16, n % 16 // 8, n % 8
    rt, kh, kl, e = r // 16, r % 16 // 8, r % 8 // 2, r % 2
    pos = ((((nt * (r_size // 16) + rt) * 32 + 4 * nl + kl) * 2 + nh) * 2 + kh) * 2 + e
    out = torch.empty(n_size * r_size, dtype=up.dtype)
    out[pos.flatten()] = up.flatten()
    return out.view(n_size, r_size)


def pack_awq(codes: torch.Tensor) -> torch.Tensor:
    """Unsigned codes (N, K) → int32 (N/4, K/2) (TinyChat GEMV): n = 4·R + i; k = 64·c + 32·h + 8·a + j;
    int16 ((R·K/64 + c)·4 + i)·16 + 8·h + j holds nibble a."""
    n_size, k_size = codes.shape
    n = torch.arange(n_size).view(-1, 1)
    k = torch.arange(k_size).view(1, -1)
    big, i = n // 4, n % 4
    c, h, a, j = k // 64, k % 64 // 32, k % 32 // 8, k % 8
    pos = ((big * (k_size // 64) + c) * 4 + i) * 16 + 8 * h + j
    halves = torch.zeros(n_size * k_size // 4, dtype=torch.int64)
    halves.index_add_(0, pos.flatten(), (codes.to(torch.int64) << (4 * a)).flatten())
    return _to_int(halves, 16, torch.int16).view(torch.int32).view(n_size // 4, k_size // 2)


# --- quantization of one layer (the SVDQuant recipe, simplified) ------------------------------

def smoothing(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A per-input-channel divisor of the kind the recipe finds (here from the weight alone)."""
    col = weight.abs().amax(dim=0).clamp_min(1e-6)
    return (col / col.mean()).clamp_min(1e-2).sqrt().to(dtype)


def w4a4(weight: torch.Tensor, bias: torch.Tensor | None, smooth: torch.Tensor, rank: int, precision: str,
         dtype: torch.dtype, unsigned: bool = False, faults: frozenset[str] = frozenset()
         ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor | None]:
    """C++-named tensors of one W4A4 layer for dense (weight (N, K), bias), and the (weight, bias) they
    reconstruct. ``bias`` None: the layer stores none (SDXL's q/k/v)."""
    n, k = weight.shape
    np_, kp = _round_up(n, 128), _round_up(k, 128)
    w = weight.double()
    lam = smooth.double()
    u, s, vh = torch.linalg.svd(w * lam, full_matrices=False)
    up = (u[:, :rank] * s[:rank]).to(dtype)
    down = (vh[:rank] / lam).to(dtype)  # the branch reads the raw input: down is divided by the smoothing
    low_rank = up.double() @ down.double()
    residual = (w - low_rank) * lam  # what the 4-bit weight holds, in the smoothed input space
    tensors: dict[str, torch.Tensor] = {}
    if precision == "int4":
        groups = residual.view(n, k // 64, 64)
        scales = (groups.abs().amax(dim=-1) / 7).to(dtype)
        safe = torch.where(scales > 0, scales.double(), torch.ones_like(scales.double()))
        codes = torch.round(groups / safe.unsqueeze(-1)).clamp(-8, 7)
        dequant = (codes * scales.double().unsqueeze(-1)).view(n, k)
        tensors["wscales"] = pack_scales(_pad(scales, np_, kp // 64, value=1.0))
        codes = codes.view(n, k).to(torch.int64)
    else:
        absmax = residual.abs().max()
        wtscale = (absmax / (6 * 448)).to(dtype)
        wcscales = (residual.abs().amax(dim=1) / absmax).to(dtype)
        row = wcscales.double() * wtscale.double()
        groups = residual.view(n, k // 16, 16)
        fp8 = (groups.abs().amax(dim=-1) / 6 / row.unsqueeze(1)).clamp(max=448).float().to(torch.float8_e4m3fn)
        effective = fp8.double() * row.unsqueeze(1)
        safe = torch.where(effective > 0, effective, torch.ones_like(effective))
        values = groups / safe.unsqueeze(-1)
        index = (values.abs().unsqueeze(-1) - E2M1.double()).abs().argmin(dim=-1)
        codes = (index | ((values < 0).to(torch.int64) << 3)).view(n, k)
        dequant = (E2M1.double()[index] * torch.where(values < 0, -1.0, 1.0) * effective.unsqueeze(-1)).view(n, k)
        one = torch.tensor(1.0).to(torch.float8_e4m3fn).view(torch.uint8)
        padded = torch.full((np_, kp // 16), int(one), dtype=torch.uint8)
        padded[:n, : k // 16] = fp8.view(torch.uint8)
        tensors["wscales"] = pack_fp8_scales(padded.view(torch.float8_e4m3fn))
        wc = _pad(wcscales, np_, value=1.0)
        tensors["wcscales"] = wc if "wcscales_unpacked" in faults else pack_vector(wc)
        if "no_wtscale" not in faults:
            tensors["wtscale"] = wtscale.view(1)
    tensors["qweight"] = pack_qweight(_pad(codes, np_, kp))
    smooth_padded = _pad(smooth, kp, value=1.0)
    tensors["smooth"] = pack_vector(smooth_padded)
    tensors["smooth_orig"] = pack_vector(smooth_padded)
    tensors["lora_down"] = pack_down(_pad(down, _round_up(rank, 16), kp))
    tensors["lora_up"] = pack_up(_pad(up, np_, _round_up(rank, 16)))
    dense_weight = (dequant / lam + low_rank).float()
    dense_bias = None
    if bias is not None:
        shifted = unsigned and precision == "int4"
        # deepcompressor ShiftedLinear + convert.py: bias − W·shift, then + up·down·shift
        stored = (bias.double() - GELU_SHIFT * (w - low_rank).sum(dim=1) if shifted else bias.double()).to(dtype)
        written = bias.to(dtype) if shifted and "no_gelu_shift" in faults else stored
        tensors["bias"] = pack_vector(_pad(written, np_, value=1.0))
        dense_bias = stored.double()
        if shifted:  # what the runtime's shifted input adds back
            dense_bias = dense_bias + GELU_SHIFT * (dequant / lam).sum(dim=1)
        dense_bias = dense_bias.float()
    return tensors, dense_weight, dense_bias


def w4a16(weight: torch.Tensor, bias: torch.Tensor, splits: int, dtype: torch.dtype,
          faults: frozenset[str] = frozenset()) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """An AdaLN modulation layer (AWQ W4A16, zero point 7): output channel s·D + d stored at row
    d·splits + s, +1 pre-added to the bias of the "scale" chunks (1 and splits − 2)."""
    n, k = weight.shape
    d = n // splits
    order = torch.arange(n).view(splits, d).T.reshape(-1)  # stored row → logical row
    if "no_interleave" in faults:
        order = torch.arange(n)
    stored_w = weight.double()[order]
    delta = torch.zeros(splits, dtype=torch.float64)
    if "no_scale_bias" not in faults:
        delta[1] = delta[-2] = 1.0
    stored_b = (bias.double() + delta.repeat_interleave(d))[order].to(dtype)
    groups = stored_w.view(n, k // 64, 64)
    scales = (groups.abs().amax(dim=-1) / 7).to(dtype)
    safe = torch.where(scales > 0, scales.double(), torch.ones_like(scales.double()))
    codes = (torch.round(groups / safe.unsqueeze(-1)) + 7).clamp(0, 15)
    zeros = (-7 * scales.double()).to(dtype)
    dequant = (codes * scales.double().unsqueeze(-1) + zeros.double().unsqueeze(-1)).view(n, k)
    # tinychat ceil_num_groups: the group count is padded to a multiple of 16 (zeros)
    groups_padded = _round_up(k // 64, 16)
    tensors = {
        "qweight": pack_awq(codes.view(n, k).to(torch.int64)),
        "wscales": _pad(scales.T.contiguous(), groups_padded),
        "wzeros": _pad(zeros.T.contiguous(), groups_padded),
        "bias": stored_b,
    }
    logical = torch.empty_like(order)
    logical[order] = torch.arange(n)
    delta_logical = delta.repeat_interleave(d)
    dense_bias = (stored_b.double()[logical] - delta_logical).float()
    return tensors, dequant[logical].float(), dense_bias


def _qkv_swapped(weight: torch.Tensor, bias: torch.Tensor | None, width: int):
    order = torch.cat([torch.arange(width, 2 * width), torch.arange(width), torch.arange(2 * width, 3 * width)])
    return weight[order], None if bias is None else bias[order]


def quantization_config(precision: str, rank: int) -> str:
    """The metadata entry, as nunchaku's merge_safetensors.py writes it."""
    fp4 = precision == "nvfp4"
    weight = {"dtype": "fp4_e2m1_all" if fp4 else "int4", "scale_dtype": [None, "fp8_e4m3_nan"] if fp4 else None,
              "group_size": 16 if fp4 else 64}
    activation = {"dtype": weight["dtype"], "scale_dtype": "fp8_e4m3_nan" if fp4 else None,
                  "group_size": weight["group_size"]}
    return json.dumps({"method": "svdquant", "weight": weight, "activation": activation, "rank": rank})


# --- FLUX ---------------------------------------------------------------------------------------

# python backend names (transformer_flux_v2.py: convert_flux_state_dict)
PYTHON_DOUBLE = {"qkv_proj": "attn.to_qkv", "qkv_proj_context": "attn.add_qkv_proj", "out_proj": "attn.to_out.0",
                 "out_proj_context": "attn.to_add_out", "mlp_fc1": "ff.net.0.proj", "mlp_fc2": "ff.net.2",
                 "mlp_context_fc1": "ff_context.net.0.proj", "mlp_context_fc2": "ff_context.net.2",
                 "norm_q": "attn.norm_q", "norm_k": "attn.norm_k", "norm_added_q": "attn.norm_added_q",
                 "norm_added_k": "attn.norm_added_k"}
PYTHON_SINGLE = {"qkv_proj": "attn.to_qkv", "out_proj": "attn.to_out", "norm_q": "attn.norm_q", "norm_k": "attn.norm_k"}
PYTHON_LEAVES = {"lora_down": "proj_down", "lora_up": "proj_up", "smooth": "smooth_factor",
                 "smooth_orig": "smooth_factor_orig"}

FLUX_DENSE = {  # diffusers name → BFL/ComfyUI name, for everything outside the blocks
    "x_embedder": "img_in", "context_embedder": "txt_in",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "norm_out.linear": "final_layer.adaLN_modulation.1", "proj_out": "final_layer.linear",
}


def flux_checkpoint(model, path: str | Path, precision: str = "int4", rank: int = 32, naming: str = "cpp",
                    layout: str = "file", faults: set[str] | frozenset[str] = frozenset(),
                    linear2_bias: str = "mlp", comfy_config: bool = True, dtype: torch.dtype = torch.bfloat16) -> Dense:
    """Write the SVDQuant checkpoint of a dense ComfyUI FLUX ``model`` (a BaseModel) to ``path``.

    naming: "cpp" (the published files) or "python" (the python backend's names). layout: "file" (one
    .safetensors with metadata) or "folder" (transformer_blocks / unquantized_layers .safetensors +
    config.json [+ comfy_config.json]). linear2_bias: which half of the single block's linear2 keeps
    the real bias ("mlp" as deepcompressor does — its ConcatLinear gives the bias to the last part —
    or "attention"); the other stores zeros."""
    faults = frozenset(faults)
    assert faults <= FAULTS, faults - FAULTS
    dm = model.diffusion_model
    p = dm.params
    h = p.hidden_size
    blocks: dict[str, torch.Tensor] = {}
    dense: dict[str, torch.Tensor] = {}
    expected: Dense = {}

    def get(name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        layer = dm.get_submodule(name)
        return layer.weight.detach().float(), None if layer.bias is None else layer.bias.detach().float()

    def name(block: str, i: int, local: str) -> str:
        table = (PYTHON_SINGLE if block == "single_transformer_blocks" else PYTHON_DOUBLE) if naming == "python" else {}
        return f"{block}.{i}.{table.get(local, local)}"

    def put(prefix: str, tensors: dict[str, torch.Tensor]) -> None:
        for leaf, value in tensors.items():
            leaf = PYTHON_LEAVES.get(leaf, leaf) if naming == "python" else leaf
            blocks[f"{prefix}.{leaf}"] = value.contiguous()

    def linear(prefix: str, weight, bias, smooth=None, unsigned=False):
        smooth = smoothing(weight, dtype) if smooth is None else smooth
        tensors, w, b = w4a4(weight, bias, smooth, rank, precision, dtype, unsigned, faults)
        put(prefix, tensors)
        return w, b

    def modulation(prefix: str, comfy_name: str, splits: int) -> None:
        weight, bias = get(comfy_name)
        tensors, w, b = w4a16(weight, bias, splits, dtype, faults)
        put(prefix, tensors)
        expected[comfy_name] = (w, b)

    for i in range(p.depth):
        c = f"double_blocks.{i}"
        modulation(name("transformer_blocks", i, "norm1.linear"), f"{c}.img_mod.lin", 6)
        modulation(name("transformer_blocks", i, "norm1_context.linear"), f"{c}.txt_mod.lin", 6)
        for stream, suffix in (("img", ""), ("txt", "_context")):
            layer = f"{c}.{stream}"
            weight, bias = get(f"{layer}_attn.qkv")
            qkv = name("transformer_blocks", i, f"qkv_proj{suffix}")
            if "swap_qk" in faults:  # the file holds k ‖ q ‖ v; the layer it stands for is unchanged
                w, b = linear(qkv, *_qkv_swapped(weight, bias, h))
                expected[f"{layer}_attn.qkv"] = _qkv_swapped(w, b, h)
            else:
                expected[f"{layer}_attn.qkv"] = linear(qkv, weight, bias)
            weight, bias = get(f"{layer}_attn.proj")
            # deepcompressor fuses this smoothing into the attention's v rows: the file stores ones
            ones = torch.ones(h, dtype=dtype)
            proj = name("transformer_blocks", i, f"out_proj{suffix}")
            expected[f"{layer}_attn.proj"] = linear(proj, weight, bias, ones)
            mlp = "mlp_context" if suffix else "mlp"
            expected[f"{layer}_mlp.0"] = linear(name("transformer_blocks", i, f"{mlp}_fc1"), *get(f"{layer}_mlp.0"))
            expected[f"{layer}_mlp.2"] = linear(name("transformer_blocks", i, f"{mlp}_fc2"), *get(f"{layer}_mlp.2"),
                                                unsigned=True)
        for comfy_name, local in (("img_attn.norm.query_norm", "norm_q"),
                                  ("img_attn.norm.key_norm", "norm_k"),
                                  ("txt_attn.norm.query_norm", "norm_added_q"),
                                  ("txt_attn.norm.key_norm", "norm_added_k")):
            scale = _norm_scale(dm, f"{c}.{comfy_name}").to(dtype)
            blocks[f"{name('transformer_blocks', i, local)}.weight"] = scale
    for i in range(p.depth_single_blocks):
        c = f"single_blocks.{i}"
        modulation(name("single_transformer_blocks", i, "norm.linear"), f"{c}.modulation.lin", 3)
        weight, bias = get(f"{c}.linear1")
        qkv_w, qkv_b = weight[: 3 * h], bias[: 3 * h]
        if "swap_qk" in faults:
            qkv_w, qkv_b = _qkv_swapped(qkv_w, qkv_b, h)
        shared = smoothing(weight, dtype)  # qkv and mlp-in read one input: one smoothing (convert.py smooth_name_map)
        w1, b1 = linear(name("single_transformer_blocks", i, "qkv_proj"), qkv_w, qkv_b, shared)
        if "swap_qk" in faults:
            w1, b1 = _qkv_swapped(w1, b1, h)
        w2, b2 = linear(name("single_transformer_blocks", i, "mlp_fc1"), weight[3 * h:], bias[3 * h:], shared)
        expected[f"{c}.linear1"] = (torch.cat([w1, w2]), torch.cat([b1, b2]))
        weight, bias = get(f"{c}.linear2")
        zeros = torch.zeros_like(bias)
        attn_bias, mlp_bias = (zeros, bias) if linear2_bias == "mlp" else (bias, zeros)
        wa, ba = linear(name("single_transformer_blocks", i, "out_proj"), weight[:, :h], attn_bias,
                        torch.ones(h, dtype=dtype))
        wm, bm = linear(name("single_transformer_blocks", i, "mlp_fc2"), weight[:, h:], mlp_bias, unsigned=True)
        expected[f"{c}.linear2"] = (torch.cat([wa, wm], dim=1), ba + bm)
        for comfy_name, local in (("norm.query_norm", "norm_q"), ("norm.key_norm", "norm_k")):
            scale = _norm_scale(dm, f"{c}.{comfy_name}").to(dtype)
            blocks[f"{name('single_transformer_blocks', i, local)}.weight"] = scale
    for file_name, comfy_name in FLUX_DENSE.items():
        if comfy_name.startswith("guidance_in") and not p.guidance_embed:
            continue
        for leaf in ("weight", "bias"):
            value = dm.get_parameter(f"{comfy_name}.{leaf}").detach().to(dtype)
            if comfy_name == "final_layer.adaLN_modulation.1":  # diffusers AdaLayerNormContinuous: (scale, shift)
                shift, scale = value.chunk(2)
                value = torch.cat([scale, shift])
            dense[f"{file_name}.{leaf}"] = value.contiguous()

    config = {"_class_name": "FluxTransformer2DModel", "attention_head_dim": h // p.num_heads,
              "axes_dims_rope": list(p.axes_dim), "guidance_embeds": bool(p.guidance_embed),
              "in_channels": p.in_channels * 4, "joint_attention_dim": p.context_in_dim,
              "num_attention_heads": p.num_heads, "num_layers": p.depth, "num_single_layers": p.depth_single_blocks,
              "out_channels": p.out_channels * 4, "patch_size": 1, "pooled_projection_dim": p.vec_in_dim}
    model_config = {"axes_dim": list(p.axes_dim), "context_in_dim": p.context_in_dim, "depth": p.depth,
                    "depth_single_blocks": p.depth_single_blocks, "disable_unet_model_creation": True,
                    "guidance_embed": bool(p.guidance_embed), "hidden_size": h, "image_model": "flux",
                    "in_channels": p.in_channels, "mlp_ratio": p.mlp_ratio, "num_heads": p.num_heads,
                    "out_channels": p.out_channels, "patch_size": 2, "qkv_bias": bool(p.qkv_bias),
                    "theta": p.theta, "vec_in_dim": p.vec_in_dim}
    comfy = {"model_class": "Flux" if p.guidance_embed else "FluxSchnell", "model_config": model_config}
    path = Path(path)
    if layout == "folder":
        path.mkdir(parents=True, exist_ok=True)
        save_file(blocks, str(path / "transformer_blocks.safetensors"))
        save_file(dense, str(path / "unquantized_layers.safetensors"))
        (path / "config.json").write_text(json.dumps(config))
        if comfy_config:
            (path / "comfy_config.json").write_text(json.dumps(comfy))
    else:
        metadata = {"config": json.dumps(config), "model_class": "NunchakuFluxTransformer2dModel",
                    "quantization_config": quantization_config(precision, rank)}
        if comfy_config:
            metadata["comfy_config"] = json.dumps(comfy)
        save_file({**dense, **blocks}, str(path), metadata=metadata)
    return expected


# --- SDXL ---------------------------------------------------------------------------------------

def sdxl_diffusers_config(unet_config: dict) -> dict:
    """The diffusers UNet2DConditionModel config of an SDXL-class ComfyUI unet_config (written out
    field by field, as the SDXL checkpoints' ``config`` metadata holds it)."""
    mc = unet_config["model_channels"]
    channels = [mc * x for x in unet_config["channel_mult"]]
    per_level = unet_config["num_res_blocks"][0]
    depth = unet_config["transformer_depth"][::per_level]
    return {"_class_name": "UNet2DConditionModel", "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
            "attention_head_dim": [max(1, c // 64) for c in channels], "block_out_channels": channels,
            "cross_attention_dim": unet_config["context_dim"],
            "down_block_types": ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depth],
            "in_channels": unet_config["in_channels"], "layers_per_block": per_level,
            "out_channels": unet_config["out_channels"],
            "projection_class_embeddings_input_dim": unet_config["adm_in_channels"],
            "transformer_layers_per_block": [max(1, d) for d in depth],
            "up_block_types": ["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(depth)],
            "use_linear_projection": True}


def sdxl_checkpoint(model, path: str | Path, unet_config: dict, precision: str = "int4", rank: int = 32,
                    faults: set[str] | frozenset[str] = frozenset(), dtype: torch.dtype = torch.bfloat16) -> Dense:
    """Write the SVDQuant checkpoint of a dense ComfyUI SDXL-class ``model`` (unet_sdxl.py layout)."""
    import comfy.utils
    from comfy.ldm.modules.attention import BasicTransformerBlock

    faults = frozenset(faults)
    assert faults <= FAULTS, faults - FAULTS
    dm = model.diffusion_model
    to_file = {c: f for f, c in comfy.utils.unet_to_diffusers(unet_config).items()
               if not f.startswith("class_embedding.")}
    tensors: dict[str, torch.Tensor] = {}
    expected: Dense = {}
    quantized: set[str] = set()

    def put(prefix: str, layer_tensors: dict[str, torch.Tensor]) -> None:
        tensors.update({f"{prefix}.{leaf}": value.contiguous() for leaf, value in layer_tensors.items()})

    for comfy_block, block in dm.named_modules():
        if not isinstance(block, BasicTransformerBlock):
            continue
        file_block = to_file[f"{comfy_block}.attn1.to_q.weight"][: -len(".attn1.to_q.weight")]
        d = block.attn1.to_q.out_features
        weights = [getattr(block.attn1, f"to_{x}").weight.detach().float() for x in "qkv"]
        fused = torch.cat(weights)
        if "swap_qk" in faults:
            fused = _qkv_swapped(fused, None, d)[0]
        layer_tensors, w, _ = w4a4(fused, None, smoothing(fused, dtype), rank, precision, dtype, faults=faults)
        if "swap_qk" in faults:
            w = _qkv_swapped(w, None, d)[0]
        put(f"{file_block}.attn1.to_qkv", layer_tensors)
        for j, x in enumerate("qkv"):
            expected[f"{comfy_block}.attn1.to_{x}"] = (w[j * d:(j + 1) * d], None)
        for local in ("attn1.to_out.0", "attn2.to_q", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2"):
            layer = block.get_submodule(local)
            bias = None if layer.bias is None else layer.bias.detach().float()
            weight = layer.weight.detach().float()
            layer_tensors, w, b = w4a4(weight, bias, smoothing(weight, dtype), rank, precision, dtype, faults=faults)
            put(f"{file_block}.{local}", layer_tensors)
            expected[f"{comfy_block}.{local}"] = (w, b)
        quantized.update(f"{comfy_block}.attn1.to_{x}." for x in "qkv")
        quantized.update(f"{comfy_block}.{local}." for local in ("attn1.to_out.0", "attn2.to_q", "attn2.to_out.0",
                                                                   "ff.net.0.proj", "ff.net.2"))
    for comfy_key, value in dm.state_dict().items():
        if comfy_key.rsplit(".", 1)[0] + "." not in quantized:
            tensors[to_file[comfy_key]] = value.detach().to(dtype).contiguous()
    metadata = {"config": json.dumps(sdxl_diffusers_config(unet_config)),
                "model_class": "NunchakuSDXLUNet2DConditionModel",
                "quantization_config": quantization_config(precision, rank)}
    save_file(tensors, str(path), metadata=metadata)
    return expected


def _norm_scale(dm, path: str) -> torch.Tensor:
    """A FLUX q/k RMSNorm's scale: ``scale`` in ComfyUI up to v0.3.x, ``weight`` (torch's RMSNorm) later."""
    norm = dm.get_submodule(path)
    return (norm.scale if hasattr(norm, "scale") else norm.weight).detach()
