"""Without CuPy, without a GPU, with an old driver or GPU, or with a compile failure, the pack loads,
runs every layer on the reference path and says why, once. CPU only: these run in CI.

The GPU cases are simulated by replacing torch.cuda's answers, CuPy and the compiler.
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from stub_gpu import cuda_looking
from test_layers import random_w4a4

from comfyui_svdquant import kernels
from comfyui_svdquant.kernels import backend, build, runtime
from comfyui_svdquant.svdquant import dispatch
from comfyui_svdquant.svdquant.errors import SVDQuantError

TESTS = Path(__file__).resolve().parent
LOGGER = "comfyui_svdquant.kernels.backend"


@pytest.fixture(autouse=True)
def fresh_state(monkeypatch):
    """Each test starts with no device state, nothing logged and no kernel installed."""
    monkeypatch.setattr(backend, "_last_choice", None)
    monkeypatch.setattr(backend, "_noted", set())
    monkeypatch.setattr(backend, "_plans", {})
    runtime.reset()
    yield
    runtime.reset()
    dispatch.install("w4a4", None)
    dispatch.install("w4a16", None)


def _fake_cupy(driver: int = 13000) -> types.ModuleType:
    cupy = types.ModuleType("cupy")
    cupy.cuda = types.SimpleNamespace(Device=lambda index: contextlib.nullcontext(),
                                      runtime=types.SimpleNamespace(driverGetVersion=lambda: driver))
    return cupy


class _FakeNvrtc:  # CuPy's NVRTC binding, as much as the probe reads of it
    def getVersion(self) -> tuple[int, int]:
        return 13, 0

    def getSupportedArchs(self) -> tuple[int, ...]:
        return 75, 80, 86, 87, 89, 90, 100, 120


def _fake_compiler() -> _FakeNvrtc:
    return _FakeNvrtc()


_fake_compiler.cache_clear = lambda: None


def _pretend_gpu(monkeypatch, capability=(8, 9), cupy: types.ModuleType | None = None, cuda="13.0") -> None:
    """torch says it has CUDA and a GPU of ``capability``; ``cupy`` is what ``import cupy`` gives (None:
    not installed)."""
    monkeypatch.setattr(torch.version, "cuda", cuda)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=0: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "Fake GPU")
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setattr(runtime, "compiler", _fake_compiler)


def _choice_logged_once(caplog, expected: str) -> str:
    with caplog.at_level(logging.INFO, logger=LOGGER):
        first = kernels.enable("auto")
        assert kernels.enable("auto") == first  # a second model load says nothing new
    lines = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert lines == [f"SVDQuant: {first}"]
    assert first.startswith("PyTorch reference path (") and expected in first, first
    assert dispatch.installed("w4a4") is None and dispatch.installed("w4a16") is None
    with pytest.raises(SVDQuantError, match="kernel backend 'cuda' requested"):
        kernels.enable("cuda")
    return first


def _layer_still_runs() -> None:
    layer = random_w4a4(256, 128, 16, "int4")
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(0)).bfloat16()
    assert torch.equal(layer(x), layer.reference_forward(x))


def test_importing_the_pack_needs_no_cupy_gpu_or_compiler():
    code = (f"import sys; sys.path.insert(0, {str(TESTS)!r}); import conftest, comfyui_svdquant.kernels; "
            "assert 'cupy' not in sys.modules and 'cupy_backends' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_without_cuda(caplog, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    _choice_logged_once(caplog, "this PyTorch build has no CUDA")
    _layer_still_runs()


def test_without_a_gpu(caplog, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _choice_logged_once(caplog, "no CUDA GPU is visible")
    _layer_still_runs()


def test_without_cupy(caplog, monkeypatch):
    _pretend_gpu(monkeypatch, cupy=None)
    _choice_logged_once(caplog, "CuPy cannot be imported")
    _layer_still_runs()


def test_old_driver(caplog, monkeypatch):
    _pretend_gpu(monkeypatch, cupy=_fake_cupy(driver=12020))
    _choice_logged_once(caplog, "the NVIDIA driver supports CUDA 12.2, older than PyTorch's CUDA 13.0")


def test_old_gpu(caplog, monkeypatch):
    _pretend_gpu(monkeypatch, capability=(7, 0), cupy=_fake_cupy())
    _choice_logged_once(caplog, "sm_70 is older than sm_75")


def test_compile_failure(caplog, monkeypatch):
    _pretend_gpu(monkeypatch, cupy=_fake_cupy())

    def broken(family, arch):
        raise build.CompileError("gemm_w4a4.cu(12): error: something the compiler did not like")

    monkeypatch.setattr(build, "build_family", broken)
    choice = _choice_logged_once(caplog, "compile failure for sm_89: gemm_w4a4.cu(12): error")
    assert "sm_89" in choice
    _layer_still_runs()


def test_per_layer_reason_is_logged_once(caplog, monkeypatch):
    # int4 and w4a16 run, nvfp4 does not (an RTX 40): an NVFP4 layer on the GPU falls back, saying so once.
    _pretend_gpu(monkeypatch, cupy=_fake_cupy())
    monkeypatch.setattr(runtime.Device, "load", lambda self, family: None)
    choice = kernels.enable("auto")
    assert choice.startswith("CUDA kernels on Fake GPU (sm_89): int4, w4a16; nvfp4: reference path (NVFP4")
    assert dispatch.installed("w4a4") is backend.w4a4
    layer = random_w4a4(128, 128, 16, "nvfp4")
    x = cuda_looking(torch.randn(2, 128).bfloat16())
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert backend.w4a4(layer, x) is None
        assert backend.w4a4(layer, x) is None
    notes = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(notes) == 1 and "nvfp4 W4A4 layers on Fake GPU: NVFP4 checkpoints need" in notes[0]
    layer.kernel_backend = "cuda"
    with pytest.raises(SVDQuantError, match="cannot run nvfp4 W4A4 layers"):
        backend.w4a4(layer, x)
    cpu = torch.randn(3, 128, generator=torch.Generator().manual_seed(1)).bfloat16()
    assert torch.equal(layer(cpu), layer.reference_forward(cpu))  # CPU tensors: the reference path, silently


def test_unknown_backend_is_refused():
    with pytest.raises(SVDQuantError, match="expected one of auto, cuda, torch"):
        kernels.enable("triton")
    assert kernels.enable("torch") == "PyTorch reference path (kernel backend 'torch' chosen)"
