"""One layer's tensors in a checkpoint ↔ a quantized layer module, with the checks that make a bad
file fail with a message naming the file, the tensor and what is wrong, before anything is built."""

from __future__ import annotations

import torch

from . import int4, nvfp4, packing, w4a16
from .checkpoint import CPP_NAMES, CheckpointReader, QuantizationInfo, layer_names
from .errors import CheckpointError
from .layers import SIXTEEN_BIT, W4A4Linear, W4A16Linear


def _expect(reader: CheckpointReader, key: str, shape: tuple[int, ...], dtypes: tuple[torch.dtype, ...],
            what: str) -> None:
    got_shape, got_dtype = reader.shape(key), reader.dtype(key)
    if got_shape != shape:
        raise CheckpointError(reader.path, f"tensor '{key}' has shape {list(got_shape)}, but {what} needs "
                              f"{list(shape)}")
    if got_dtype not in dtypes:
        names = " or ".join(str(d).replace("torch.", "") for d in dtypes)
        got = str(got_dtype).replace("torch.", "")
        raise CheckpointError(reader.path, f"tensor '{key}' is {got}, expected {names}")


def is_w4a4(reader: CheckpointReader, prefix: str) -> bool:
    names = layer_names(prefix, reader.keys)
    return "qweight" in names and "wzeros" not in names


def read_w4a4(reader: CheckpointReader, prefix: str, in_features: int, out_features: int,
              info: QuantizationInfo, act_unsigned: bool = False) -> W4A4Linear:
    """Build the W4A4 layer stored under ``prefix`` (a layer reading ``in_features`` and writing
    ``out_features``), after checking every tensor against the layer and the file's metadata."""
    names = layer_names(prefix, reader.keys)
    kp, np_ = packing.round_up(in_features, packing.TILE), packing.round_up(out_features, packing.TILE)
    what = f"a {in_features}→{out_features} SVDQuant layer"
    for required in ("qweight", "wscales", "smooth_factor"):
        if required not in names:
            raise CheckpointError(reader.path, f"required tensor '{prefix}.{CPP_NAMES.get(required, required)}' "
                                  "is missing")
    _expect(reader, names["qweight"], (np_, kp // 2), (torch.int8, torch.uint8), what)
    scale_dtype = reader.dtype(names["wscales"])
    file_precision = "nvfp4" if scale_dtype == torch.float8_e4m3fn else "int4"
    if file_precision != info.precision:
        raise CheckpointError(reader.path, f"tensor '{names['wscales']}' is {scale_dtype} ({file_precision} scales) "
                              f"but the metadata says the checkpoint is {info.precision}")
    group = int4.GROUP if info.precision == "int4" else nvfp4.GROUP
    scale_dtypes = SIXTEEN_BIT if info.precision == "int4" else (torch.float8_e4m3fn,)
    _expect(reader, names["wscales"], (kp // group, np_), scale_dtypes,
            f"{what} with group size {group} ({info.precision})")
    dtype = reader.dtype(names["smooth_factor"])
    _expect(reader, names["smooth_factor"], (kp,), SIXTEEN_BIT, what)
    has_down, has_up = "proj_down" in names, "proj_up" in names
    if has_down != has_up:
        present, missing = ("lora_down", "lora_up") if has_down else ("lora_up", "lora_down")
        raise CheckpointError(reader.path, f"'{prefix}.{present}' is present but '{prefix}.{missing}' is missing")
    rank = reader.shape(names["proj_down"])[1] if has_down else 0
    if has_down:
        if rank != info.rank:
            raise CheckpointError(reader.path, f"tensor '{names['proj_down']}' has rank {rank}, but the metadata's "
                                  f"'quantization_config' says rank {info.rank}")
        _expect(reader, names["proj_down"], (kp, rank), SIXTEEN_BIT, what)
        _expect(reader, names["proj_up"], (np_, rank), SIXTEEN_BIT, what)
    if "bias" in names:
        _expect(reader, names["bias"], (np_,), SIXTEEN_BIT, what)

    layer = W4A4Linear(in_features, out_features, rank, info.precision, act_unsigned and info.precision == "int4",
                       bias="bias" in names, dtype=dtype, device="meta")
    state = {"qweight": reader.get(names["qweight"]).view(torch.int8), "wscales": reader.get(names["wscales"]),
             "smooth_factor": reader.get(names["smooth_factor"])}
    state["smooth_factor_orig"] = reader.get(names["smooth_factor_orig"]) if "smooth_factor_orig" in names \
        else state["smooth_factor"].clone()
    if has_down:
        state["proj_down"], state["proj_up"] = reader.get(names["proj_down"]), reader.get(names["proj_up"])
    else:
        state["proj_down"], state["proj_up"] = torch.zeros((kp, 0), dtype=dtype), torch.zeros((np_, 0), dtype=dtype)
    if "bias" in names:
        state["bias"] = reader.get(names["bias"])
    if info.precision == "nvfp4":
        if "wcscales" in names:
            _expect(reader, names["wcscales"], (np_,), SIXTEEN_BIT, what)
            state["wcscales"] = reader.get(names["wcscales"])
        else:
            state["wcscales"] = torch.ones(np_, dtype=dtype)
        if "wtscale" in names:
            _expect(reader, names["wtscale"], (1,), SIXTEEN_BIT + (torch.float32,), what)
            state["wtscale"] = reader.get(names["wtscale"]).float()
        else:
            state["wtscale"] = torch.ones(1)
    for key, value in state.items():
        if value.is_floating_point() and value.dtype != torch.float8_e4m3fn and not torch.isfinite(value).all():
            raise CheckpointError(reader.path, f"tensor '{prefix}.{CPP_NAMES.get(key, key)}' contains NaN or Inf")
    layer.load_state_dict(state, assign=True)
    return layer


def read_w4a16(reader: CheckpointReader, prefix: str, in_features: int, out_features: int) -> W4A16Linear:
    names = layer_names(prefix, reader.keys)
    kp, np_ = packing.round_up(in_features, packing.TILE), packing.round_up(out_features, packing.TILE)
    what = f"a {in_features}→{out_features} W4A16 layer"
    for required in ("qweight", "wscales", "wzeros"):
        if required not in names:
            raise CheckpointError(reader.path, f"required tensor '{prefix}.{required}' is missing")
    _expect(reader, names["qweight"], (np_ // 4, kp // 2), (torch.int32,), what)
    groups = kp // w4a16.GROUP
    dtype = reader.dtype(names["wscales"])
    for key in ("wscales", "wzeros"):
        # The reference exporter pads the group count of narrow layers; only the first groups are used.
        shape = reader.shape(names[key])
        if len(shape) != 2 or shape[1] != np_ or shape[0] < groups:
            raise CheckpointError(reader.path, f"tensor '{names[key]}' has shape {list(shape)}, but {what} needs "
                                  f"[{groups}, {np_}]")
    if "bias" in names:
        _expect(reader, names["bias"], (np_,), SIXTEEN_BIT, what)
    layer = W4A16Linear(in_features, out_features, bias="bias" in names, dtype=dtype, device="meta")
    state = {"qweight": reader.get(names["qweight"]),
             "wscales": reader.get(names["wscales"])[:groups].contiguous(),
             "wzeros": reader.get(names["wzeros"])[:groups].contiguous().to(dtype)}
    if "bias" in names:
        state["bias"] = reader.get(names["bias"]).to(dtype)
    layer.load_state_dict(state, assign=True)
    return layer


def layer_state(layer: W4A4Linear | W4A16Linear, prefix: str) -> dict[str, torch.Tensor]:
    """The tensors of ``layer`` under the names the checkpoint format uses (C++-style spelling)."""
    out = {}
    for name, value in layer.state_dict().items():
        if isinstance(layer, W4A4Linear) and name in ("proj_down", "proj_up") and layer.rank == 0:
            continue  # a layer with no branch stores none; readers treat a missing pair as rank 0
        if name == "wtscale" and torch.equal(value.to(layer.compute_dtype).float(), value):
            value = value.to(layer.compute_dtype)  # the published files store it 16-bit; exact here
        out[f"{prefix}.{CPP_NAMES.get(name, name)}"] = value
    return out
