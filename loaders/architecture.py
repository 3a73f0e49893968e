"""How a model family's SVDQuant checkpoint maps onto ComfyUI's own model class.

An architecture lists, for one model config, every ComfyUI Linear that is quantized and the
checkpoint layers it is made of (its *parts*), and it converts the 16-bit tensor names. The same
table drives loading (file → modules), saving (modules → file) and quantizing (which layers, which
share an input, which read a GELU output).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from ..svdquant.checkpoint import CheckpointReader, QuantizationInfo


@dataclass(frozen=True)
class Part:
    """One quantized layer as the checkpoint stores it."""

    prefix: str  # name in the file, e.g. "single_transformer_blocks.3.qkv_proj"
    kind: str  # "w4a4" or "w4a16"
    in_features: int
    out_features: int
    act_unsigned: bool = False  # reads a GELU output: unsigned INT4 activations with the +0.171875 shift
    # W4A16 modulation layers: the file interleaves their output channels (channel s·D + d is stored at
    # d·splits + s) and pre-adds 1 to the bias of the listed "scale" chunks.
    splits: int = 1
    scale_chunks: tuple[int, ...] = ()
    # Whether the file holds a bias for this layer. If so, a Linear without one writes zeros: the
    # ecosystem's engines allocate one and its python loaders load strictly. If not (SDXL's q/k/v),
    # the Linear must have none.
    has_bias: bool = True
    # A layer the file fuses but ComfyUI keeps apart (SDXL's q/k/v): this Linear is output rows
    # [start, start + length) of the checkpoint layer ``prefix``.
    rows: tuple[int, int] | None = None

    @property
    def width(self) -> int:
        """Output channels this part gives the ComfyUI Linear."""
        return self.rows[1] if self.rows else self.out_features


@dataclass(frozen=True)
class QuantizedLayer:
    """A ComfyUI Linear built from one or more checkpoint layers."""

    module: str  # path in the diffusion model, e.g. "single_blocks.3.linear1"
    parts: tuple[Part, ...]
    combine: str = "single"  # "single" | "concat" (outputs concatenated) | "split_input" (input split along K)

    @property
    def in_features(self) -> int:
        if self.combine == "split_input":
            return sum(p.in_features for p in self.parts)
        return self.parts[0].in_features

    @property
    def out_features(self) -> int:
        if self.combine == "concat":
            return sum(p.width for p in self.parts)
        return self.parts[0].width


@dataclass(frozen=True)
class Block:
    """A transformer block: the unit the quantizer calibrates and converts at a time."""

    module: str
    layers: tuple[QuantizedLayer, ...]
    # Sets of quantized ComfyUI Linears that read the same input tensor and therefore share one
    # smoothing factor (each set is quantized together).
    shared_inputs: tuple[tuple[str, ...], ...] = field(default=())


class Architecture(Protocol):
    """What the loader, the saver and the quantizer need to know about a model family."""

    name: str  # in file metadata and settings: "flux", "qwen_image" …
    label: str  # in messages: "FLUX.1", "Qwen-Image" …
    # Whether the files spell the W4A4 leaves as nunchaku's python modules do (``proj_down``, ``smooth_factor``
    # …; families its python backend loads strictly) rather than as its C++ engine does (``lora_down``, ``smooth``).
    python_leaf_names: bool

    def detect(self, reader: CheckpointReader) -> bool:
        """True if the checkpoint holds this family."""

    def unet_config(self, reader: CheckpointReader) -> dict:
        """The config the checkpoint describes (from its tensors, its metadata where they cannot tell):
        enough to name and shape its tensors in ComfyUI's terms, and a hint to :meth:`fit_config`."""

    def fit_config(self, detected: dict, shapes: dict, hint: dict) -> dict:
        """ComfyUI's detected unet_config with the fields that ``shapes`` (ComfyUI key → meta tensor) decide
        and this ComfyUI version's detection does not read set from them."""

    def accepts(self, config_class: type) -> bool:
        """Whether a ComfyUI ``supported_models`` class that matched is of this family."""

    def config_class(self, unet_config: dict) -> type:
        """The ``supported_models`` class for a config ComfyUI's table does not match (small models)."""

    def blocks(self, unet_config: dict) -> list[Block]:
        """Every quantized layer, grouped by block, in forward order."""

    def dense_key_map(self, unet_config: dict) -> dict[str, str]:
        """ComfyUI key → checkpoint key for every 16-bit tensor of the diffusion model."""

    def convert_dense(self, comfy_key: str, tensor: torch.Tensor, to_file: bool) -> torch.Tensor:
        """Adjust a 16-bit tensor whose layout differs between ComfyUI and the checkpoint."""

    def metadata(self, unet_config: dict, info: QuantizationInfo) -> dict[str, str]:
        """The checkpoint metadata for a model of this family."""

    def architecture_of(self, diffusion_model: nn.Module) -> dict | None:
        """ComfyUI's unet_config if ``diffusion_model`` is of this family, else None."""


def all_layers(blocks: list[Block]) -> list[QuantizedLayer]:
    return [layer for block in blocks for layer in block.layers]
