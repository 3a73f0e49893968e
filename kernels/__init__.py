"""Fused CUDA kernels for the SVDQuant layers, compiled with NVRTC and launched through CuPy.

Importing this package needs neither a GPU, nor CuPy, nor a compiler: CuPy is imported, and the
kernels compiled (or taken from the disk cache filled by install.py), when :func:`enable` is called
or a quantized layer first meets a CUDA tensor. See ``kernels/*.cu`` for what each kernel computes.
"""

from .backend import enable

__all__ = ["enable"]
