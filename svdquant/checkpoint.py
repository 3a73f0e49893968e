"""SVDQuant checkpoint files: one ``.safetensors`` file (or the older folder layout) whose tensor
names, packing and metadata are those of the SVDQuant checkpoints users already have.

Reading is lazy and memory-mapped: tensors are read one at a time, so a loader copies each straight
into its module and never holds the whole file twice. Nothing is unpickled. Writing streams one
tensor at a time into a temporary file beside the target and renames it into place only when
complete, so an interrupted or failed write leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .errors import CheckpointError

# Layer tensor names. Files from the C++ engine use the first spelling, newer python-backend files
# the second; we read both and write the first, which every loader of that ecosystem accepts.
PYTHON_NAMES = {"smooth": "smooth_factor", "smooth_orig": "smooth_factor_orig", "lora_down": "proj_down",
                "lora_up": "proj_up"}
CPP_NAMES = {v: k for k, v in PYTHON_NAMES.items()}

FOLDER_FILES = ("transformer_blocks.safetensors", "unquantized_layers.safetensors")

_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.int64: "I64", torch.int32: "I32",
    torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}


@dataclass(frozen=True)
class QuantizationInfo:
    """The ``quantization_config`` metadata entry."""

    precision: str  # "int4" | "nvfp4"
    rank: int

    @property
    def group_size(self) -> int:
        return 64 if self.precision == "int4" else 16

    def to_json(self) -> str:
        fp4 = self.precision == "nvfp4"
        weight = {
            "dtype": "fp4_e2m1_all" if fp4 else "int4",
            "scale_dtype": [None, "fp8_e4m3_nan"] if fp4 else None,
            "group_size": self.group_size,
        }
        activation = dict(weight, scale_dtype="fp8_e4m3_nan" if fp4 else None)
        return json.dumps({"method": "svdquant", "weight": weight, "activation": activation, "rank": self.rank})

    @classmethod
    def from_json(cls, path: object, text: str) -> QuantizationInfo:
        try:
            config = json.loads(text)
            dtype = config["weight"]["dtype"]
            group = int(config["weight"]["group_size"])
            rank = int(config.get("rank", 32))
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(path, f"metadata 'quantization_config' is not valid SVDQuant JSON ({exc})") from None
        if config.get("method", "svdquant") != "svdquant":
            raise CheckpointError(path, f"quantization method {config.get('method')!r} is not svdquant")
        precision = {"int4": "int4", "fp4_e2m1_all": "nvfp4"}.get(dtype)
        if precision is None:
            raise CheckpointError(path, f"weight dtype {dtype!r} in 'quantization_config' is not int4 or fp4_e2m1_all")
        info = cls(precision, rank)
        if group != info.group_size:
            raise CheckpointError(
                path, f"'quantization_config' gives group size {group} for {dtype}; SVDQuant {precision} uses "
                f"{info.group_size}")
        if rank < 0 or rank % 16:
            raise CheckpointError(path, f"'quantization_config' gives rank {rank}, which is not a multiple of 16")
        return info


# safetensors' own limit: a header is read whole before anything is checked, so a crafted length could ask
# for a read as large as the file
MAX_HEADER_BYTES = 100_000_000


def _sniff(path: Path) -> None:
    """Refuse the files that are not safetensors with a message that says what they are."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(9)
        header_length = struct.unpack("<Q", head[:8])[0] if len(head) == 9 else 0
        if len(head) == 9 and head[8:9] == b"{" and header_length > MAX_HEADER_BYTES:
            raise CheckpointError(path, f"the .safetensors header claims {header_length} bytes, more than the "
                                  f"{MAX_HEADER_BYTES} safetensors allows (a corrupt or crafted file)")
        if len(head) == 9 and head[8:9] == b"{" and header_length <= size - 8:
            _check_length(path, size, header_length, b"{" + f.read(header_length - 1))
            return
    if head.startswith(b"PK\x03\x04") or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
        raise CheckpointError(
            path, "this is a pickle-based PyTorch checkpoint (.ckpt/.pt/.bin); SVDQuant loads only "
            ".safetensors files, because unpickling a file can run arbitrary code")
    if head.startswith(b"GGUF"):
        raise CheckpointError(path, "this is a GGUF file; load it with a GGUF loader, not the SVDQuant loader")
    raise CheckpointError(path, "the file is truncated or not a .safetensors file (its header does not fit)")


def _check_length(path: Path, size: int, header_length: int, header: bytes) -> None:
    """A download cut short keeps a valid header; say so with the byte counts."""
    try:
        entries = json.loads(header)
        end = max((v["data_offsets"][1] for k, v in entries.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError):
        raise CheckpointError(path, "the .safetensors header is not valid JSON (the file is corrupt)") from None
    expected = 8 + header_length + end
    if size < expected:
        raise CheckpointError(path, f"the file is truncated: its header describes {expected} bytes but only {size} "
                              "are present (an interrupted download or copy?)")


class CheckpointReader:
    """Lazy access to the tensors and metadata of a single file or of the older folder layout."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._handles: list = []
        self._where: dict[str, object] = {}
        self.metadata: dict[str, str] = {}
        if not self.path.exists():
            raise CheckpointError(self.path, "no such file or folder")
        files = [self.path / name for name in FOLDER_FILES] if self.path.is_dir() else [self.path]
        if self.path.is_dir():
            missing = [f.name for f in files if not f.exists()]
            if missing:
                raise CheckpointError(self.path, f"a folder checkpoint needs {' and '.join(FOLDER_FILES)}; "
                                      f"missing {', '.join(missing)}")
        try:
            for file in files:
                _sniff(file)
                handle = safe_open(str(file), framework="pt")
                self._handles.append(handle)
                for key in handle.keys():
                    self._where[key] = handle
                self.metadata.update(handle.metadata() or {})
        except SafetensorError as exc:
            self.close()
            raise CheckpointError(self.path, f"not a readable .safetensors file ({exc})") from None
        except CheckpointError:
            self.close()
            raise
        if self.path.is_dir():
            self._read_folder_metadata()

    def _read_folder_metadata(self) -> None:
        for name, key in (("config.json", "config"), ("comfy_config.json", "comfy_config")):
            file = self.path / name
            if file.exists() and key not in self.metadata:
                self.metadata[key] = file.read_text()
        if "quantization_config" not in self.metadata:
            # The folder layout predates the metadata entry; the tensors say what the entry would.
            fp4 = any(self.dtype(k) == torch.float8_e4m3fn for k in self.keys if k.endswith(".wscales"))
            ranks = [self.shape(k)[1] for k in self.keys if k.endswith((".lora_down", ".proj_down"))]
            info = QuantizationInfo("nvfp4" if fp4 else "int4", ranks[0] if ranks else 0)
            self.metadata["quantization_config"] = info.to_json()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._handles.clear()
        self._where.clear()

    @property
    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def _handle(self, key: str):
        try:
            return self._where[key]
        except KeyError:
            raise CheckpointError(self.path, f"required tensor '{key}' is missing") from None

    def get(self, key: str) -> torch.Tensor:
        try:
            return self._handle(key).get_tensor(key)
        except SafetensorError as exc:
            raise CheckpointError(self.path, f"tensor '{key}' cannot be read ({exc})") from None

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handle(key).get_slice(key).get_shape())

    def dtype(self, key: str) -> torch.dtype:
        name = self._handle(key).get_slice(key).get_dtype()
        for dtype, code in _DTYPES.items():
            if code == name:
                return dtype
        raise CheckpointError(self.path, f"tensor '{key}' has dtype {name}, which SVDQuant does not use")

    def json(self, key: str, required: bool = True) -> dict | None:
        text = self.metadata.get(key)
        if text is None:
            if required:
                raise CheckpointError(self.path, f"metadata entry '{key}' is missing; is this an SVDQuant checkpoint?")
            return None
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise CheckpointError(self.path, f"metadata entry '{key}' is not valid JSON ({exc})") from None
        if not isinstance(value, dict):
            raise CheckpointError(self.path, f"metadata entry '{key}' is not a JSON object")
        return value

    def quantization(self) -> QuantizationInfo:
        text = self.metadata.get("quantization_config")
        if text is None:
            raise CheckpointError(self.path, "metadata entry 'quantization_config' is missing; this is not an "
                                  "SVDQuant checkpoint (or it was saved without its metadata)")
        return QuantizationInfo.from_json(self.path, text)


def holds_svdquant(metadata: Mapping[str, str], keys: Iterable[str]) -> bool:
    """Whether a file with this header is an SVDQuant checkpoint at all (its metadata or its packed layers)."""
    return "quantization_config" in metadata or any(k.endswith(".qweight") for k in keys)


def layer_names(prefix: str, keys: list[str] | set[str]) -> dict[str, str]:
    """Map the python-style names of one layer's tensors to the keys the file uses under ``prefix``."""
    out = {}
    for key in keys:
        if key.startswith(prefix + ".") and "." not in key[len(prefix) + 1:]:
            leaf = key[len(prefix) + 1:]
            out[PYTHON_NAMES.get(leaf, leaf)] = key
    return out


def write_checkpoint(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                     metadata: Mapping[str, str]) -> None:
    """Stream ``tensors`` (any device) into a .safetensors file at ``path``, atomically."""
    path = Path(path)
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    offset = 0
    for key, tensor in tensors.items():
        if tensor.dtype not in _DTYPES:
            raise CheckpointError(path, f"tensor '{key}' has dtype {tensor.dtype}, which safetensors cannot store")
        size = tensor.numel() * tensor.element_size()
        header[key] = {"dtype": _DTYPES[tensor.dtype], "shape": list(tensor.shape),
                       "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for tensor in tensors.values():
                data = tensor.detach().to("cpu").contiguous().reshape(-1)
                if data.numel():
                    f.write(memoryview(data.view(torch.uint8).numpy()))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def iter_prefixes(keys: list[str], leaf: str) -> Iterator[str]:
    """Prefixes of every ``<prefix>.<leaf>`` key, in file order."""
    suffix = "." + leaf
    for key in keys:
        if key.endswith(suffix):
            yield key[: -len(suffix)]
