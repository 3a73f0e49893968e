"""Fused CUDA kernels for the SVDQuant layers, compiled and launched through CuPy (RawModule, NVRTC).

Importing this package needs neither a GPU, nor CuPy, nor a compiler: CuPy is imported, and the
kernels compiled (or taken from CuPy's kernel cache, which install.py fills), when :func:`enable` is called
or a quantized layer first meets a CUDA tensor. See ``kernels/*.cu`` for what each kernel computes.
"""

from .backend import enable

__all__ = ["enable"]
