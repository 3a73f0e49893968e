"""The pack's ComfyUI nodes (V3 API)."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .download import SVDQuantDownloadModel
from .loader import SVDQuantModelLoader
from .lora import SVDQuantLoraStack
from .quantize import SVDQuantQuantizeModel, SVDQuantSaveModel


class SVDQuantExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [SVDQuantModelLoader, SVDQuantDownloadModel, SVDQuantLoraStack, SVDQuantQuantizeModel, SVDQuantSaveModel]
