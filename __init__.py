"""comfyui-svdquant: SVDQuant 4-bit diffusion models in ComfyUI.

ComfyUI imports this package and awaits :func:`comfy_entrypoint`. Importing it needs neither a GPU,
nor CuPy, nor a compiler, nor ComfyUI itself: the nodes are imported only when ComfyUI asks.
"""

# The frontend extension (web/svdquant.js): Save SVDQuant Model shows the path it wrote.
WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes import SVDQuantExtension

    return SVDQuantExtension()
