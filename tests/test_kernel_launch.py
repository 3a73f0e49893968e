"""The launch path of kernels/backend.py on a stubbed GPU (tests/stub_gpu.py): plans, arguments, the dtype
rule, and what happens when a launch fails. CPU only: these run in CI."""

from __future__ import annotations

import copy
import logging
import os
import subprocess
import sys
import types

import pytest
import torch
from stub_gpu import DriverError, cuda_looking, stub_gpu
from test_layers import random_w4a4

from comfyui_svdquant.kernels import backend, build, runtime
from comfyui_svdquant.svdquant import dispatch, packing
from comfyui_svdquant.svdquant.errors import SVDQuantError
from comfyui_svdquant.svdquant.layers import SplitInputLinear, compute_dtype_problem, to_compute_dtype

LOGGER = "comfyui_svdquant.kernels.backend"


@pytest.fixture
def gpu(monkeypatch):
    monkeypatch.setattr(backend, "_plans", {})
    monkeypatch.setattr(backend, "_noted", set())
    with stub_gpu() as stub:
        yield stub


def _x(m: int, k: int, dtype=torch.bfloat16, seed: int = 0) -> torch.Tensor:
    return cuda_looking(torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(dtype))


def _pointers(args) -> list[int]:
    return [int(a) for a in args]


def test_the_fast_path_launches_what_the_readable_plan_describes(gpu):
    layer = random_w4a4(256, 384, 32, "nvfp4")
    x = _x(33, 256)
    y = backend.w4a4(layer, x)
    assert y.shape == (33, 384) and len(gpu.launches) == 2
    _, readable = backend.plan_w4a4(layer, x)
    for (name, grid, block, packed), (want_name, want_grid, want_block, args) in zip(gpu.launches, readable,
                                                                                      strict=True):
        assert (name, grid, block) == (want_name, want_grid, want_block)
        for got, want in zip(_pointers(packed), args, strict=True):
            if isinstance(want, torch.Tensor) and any(want is t for t in layer._buffers.values()):
                assert got == want.data_ptr()  # weights: the layer's own tensors, no copies
            elif not isinstance(want, torch.Tensor):
                assert got == (0 if want is None else want)
    assert _pointers(gpu.launches[0][3])[0] == x.data_ptr()
    assert _pointers(gpu.launches[1][3])[9] == y.data_ptr()


def test_a_plan_is_made_once_and_shared_by_a_shallow_copy(gpu, monkeypatch):
    layer = random_w4a4(256, 128, 16, "int4")
    made = []
    make_plan = backend._make_plan
    monkeypatch.setattr(backend, "_make_plan", lambda *a: made.append(1) or make_plan(*a))
    x = _x(5, 256)
    backend.w4a4(layer, x)
    backend.w4a4(layer, x)
    backend.w4a4(copy.copy(layer), x)  # what a LoRA call runs: a shallow copy with the same tensors
    assert len(made) == 1 and len(gpu.launches) == 6
    backend.w4a4(layer, _x(7, 256))  # another input shape: its own plan
    assert len(made) == 2


def test_new_weights_get_a_new_plan_never_the_old_pointers(gpu):
    layer = random_w4a4(256, 128, 16, "int4")
    x = _x(5, 256)
    backend.w4a4(layer, x)
    layer.proj_up = layer.proj_up.clone()  # e.g. a LoRA absorbed, or the layer moved and back
    backend.w4a4(layer, x)
    assert _pointers(gpu.launches[-1][3])[5] == layer.proj_up.data_ptr()
    assert _pointers(gpu.launches[1][3])[5] != layer.proj_up.data_ptr()


def test_flux_linear2_halves_are_read_in_place(gpu):
    """SplitInputLinear hands each part a column view of one input: kernel 1 reads it with its row stride."""
    attn, mlp = random_w4a4(256, 128, 16, "int4", seed=1), random_w4a4(1024, 128, 16, "int4", seed=2)
    x = cuda_looking(torch.randn(9, 1280).bfloat16(), through_ops=True)
    dispatch.install("w4a4", backend.w4a4)
    try:
        SplitInputLinear([attn, mlp])(x)
    finally:
        dispatch.install("w4a4", None)
    quantize = [args for name, _, _, args in gpu.launches
                if name.startswith("svdq_quantize") and "branch_sum" not in name]
    assert len(quantize) == 2
    for args, offset in zip(quantize, (0, 256), strict=True):
        pointers = _pointers(args)
        assert pointers[0] == x.data_ptr() + 2 * offset  # no copy of either half
        assert pointers[7] == 1280  # ldx: the full row


def test_kernel1_splits_a_long_k_into_ranges_summed_before_kernel_2(gpu):
    """FLUX's single-block linear at 1024² (4608 tokens): one CTA per 16 rows would be 288 CTAs walking all of
    K; the plan splits K so that about 1024 CTAs share the GPU, and the branch sums of the ranges are added
    by a second small kernel before kernel 2 reads lora_act."""
    layer = random_w4a4(3072, 128, 32, "int4")
    backend.w4a4(layer, _x(4608, 3072))
    (quantize, grid, _, args), (branch_sum, sum_grid, _, sum_args), (gemm, *_) = gpu.launches
    assert (quantize, branch_sum, gemm) == ("svdq_quantize_int4_bf16", "svdq_quantize_branch_sum_bf16",
                                            "svdq_gemm_int4_bf16")
    assert grid == (288, 4, 1)  # 16-row tiles x K ranges of 3 chunks of 256 columns x rank passes
    assert _pointers(sum_args) == [_pointers(args)[5], 32, 4608, 4]  # kernel 1's lora_act, rank, Mp, ranges
    assert sum_grid == (4608 * 32 // 8 // 128, 1, 1)  # one thread per 16x16 fragment lane


def test_an_input_width_that_is_not_a_multiple_of_128_needs_no_padded_copy(gpu):
    layer = random_w4a4(320, 640, 32, "int4")  # SDXL's narrowest layers
    x = _x(4, 320)
    backend.w4a4(layer, x)
    pointers = _pointers(gpu.launches[0][3])
    assert pointers[0] == x.data_ptr() and pointers[7:10] == [320, 320, 384]  # ldx, columns read, padded K


def test_nvfp4_in_float16_keeps_the_fused_path(gpu, caplog):
    """A bf16 NVFP4 layer put in fp16 (compute_dtype=float16, or an fp16 GPU) stays on the kernels: the
    per-tensor scale is fp32 whatever the file or the compute dtype."""
    layer = random_w4a4(256, 128, 32, "nvfp4")
    to_compute_dtype(layer, torch.float16)
    assert layer.wtscale.dtype == torch.float32 and compute_dtype_problem(layer) is None
    with caplog.at_level(logging.INFO, logger=LOGGER):
        y = backend.w4a4(layer, _x(3, 256, torch.float16))
    assert y is not None and gpu.launches[0][0] == "svdq_quantize_nvfp4_fp16"
    assert not caplog.records


def test_a_layer_outside_the_dtype_rule_is_named_once_at_warning(gpu, caplog):
    layer = random_w4a4(256, 128, 32, "int4")
    layer.name = "double_blocks.3.img_attn.qkv"
    layer.proj_up = layer.proj_up.half()
    other = random_w4a4(256, 128, 32, "int4", seed=3)
    other.bias = other.bias.half()
    x = _x(3, 256)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert backend.w4a4(layer, x) is None
        assert backend.w4a4(layer, x) is None
        assert backend.w4a4(other, x) is None
    warnings = [r for r in caplog.records if r.name == LOGGER]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert "layer 'double_blocks.3.img_attn.qkv': its proj_up is float16, not bfloat16" in warnings[0].getMessage()
    assert not gpu.launches
    dispatch.install("w4a4", backend.w4a4)
    try:
        assert torch.equal(layer(x), layer.reference_forward(x))
    finally:
        dispatch.install("w4a4", None)


def test_a_refused_launch_falls_back_for_that_layer_once(gpu, caplog):
    layer = random_w4a4(256, 128, 16, "int4")
    layer.name = "single_blocks.0.linear1"
    other = random_w4a4(256, 128, 16, "int4", seed=4)
    x = _x(6, 256)
    gpu.fail = DriverError(701)  # CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES: the GPU stays usable
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert backend.w4a4(layer, x) is None
        gpu.fail = None
        assert backend.w4a4(layer, x) is None  # no second try for this layer and shape
        assert not gpu.launches
        assert backend.w4a4(other, x) is not None  # other layers keep their kernels
    warnings = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(warnings) == 1
    assert "single_blocks.0.linear1" in warnings[0] and "(6, 256) bfloat16 input" in warnings[0]
    assert "701" in warnings[0]


def test_a_cuda_error_that_breaks_the_gpu_raises_naming_layer_and_shape(gpu):
    layer = random_w4a4(256, 128, 16, "int4")
    layer.name = "double_blocks.0.img_mlp.0"
    gpu.fail = DriverError(700)  # CUDA_ERROR_ILLEGAL_ADDRESS (perhaps from an earlier kernel): sticky
    with pytest.raises(SVDQuantError, match=r"double_blocks.0.img_mlp.0' with a \(2, 256\) bfloat16 input.*restart"):
        backend.w4a4(layer, _x(2, 256))


def test_a_python_error_is_a_bug_and_raises(gpu):
    gpu.fail = TypeError("an argument the kernel does not take")
    with pytest.raises(TypeError):
        backend.w4a4(random_w4a4(256, 128, 16, "int4"), _x(2, 256))


def test_the_load_summary_counts_each_path(monkeypatch):
    monkeypatch.setattr(backend, "_plans", {})
    layers = [random_w4a4(256, 128, 16, "int4", seed=s) for s in range(3)] + [random_w4a4(256, 128, 16, "nvfp4")]
    layers[1].bias = layers[1].bias.half()
    dispatch.install("w4a4", backend.w4a4)
    try:
        with stub_gpu((8, 9)):  # an RTX 40: no NVFP4
            summary = backend.path_summary(layers, torch.device("cuda", 0))
    finally:
        dispatch.install("w4a4", None)
    assert summary.startswith("2 layers on the CUDA kernels, 2 on the PyTorch reference path (")
    assert "1: its bias is float16, not bfloat16" in summary and "NVFP4 checkpoints need" in summary
    assert backend.path_summary(layers[:1], torch.device("cpu")) == (
        "1 layers on the PyTorch reference path (no CUDA kernels on cpu)")


def test_the_stored_dtype_is_what_the_compute_dtype_rule_gives(gpu):
    """to_compute_dtype keeps codes and FP8 scales, puts every 16-bit tensor in the compute dtype."""
    layer = random_w4a4(256, 128, 16, "nvfp4")
    layer.wtscale = layer.wtscale.bfloat16()  # as a file stores it
    codes, fp8 = layer.qweight.clone(), layer.wscales.clone()
    to_compute_dtype(layer, torch.float16)
    assert layer.wtscale.dtype == torch.float32 and layer.wscales.dtype == torch.float8_e4m3fn
    assert torch.equal(layer.qweight, codes) and torch.equal(layer.wscales.view(torch.uint8), fp8.view(torch.uint8))
    assert {layer.smooth_factor.dtype, layer.proj_down.dtype, layer.proj_up.dtype, layer.bias.dtype,
            layer.wcscales.dtype} == {torch.float16}
    assert packing.unpack_vector(layer.wcscales).isfinite().all()


def test_small_calls_reuse_one_workspace_per_stream(gpu, monkeypatch):
    """Kernel 1's outputs go to a buffer kept per stream; a call that needs more, or one made while a CUDA
    graph is captured (the graph must own what it reads), gets its own from torch's allocator."""
    layer = random_w4a4(256, 128, 16, "int4")
    backend.w4a4(layer, _x(5, 256))
    backend.w4a4(layer, _x(9, 256))
    first, second = (_pointers(args)[3:6] for name, _, _, args in gpu.launches if name.startswith("svdq_quantize"))
    assert first[0] == second[0] == gpu.device._scratch[0].data_ptr()
    assert first[1:] == second[1:]  # the same offsets: both calls fill 128 padded rows

    monkeypatch.setattr(runtime, "SCRATCH_WORDS", 64)  # the workspace of 5 rows is 128·(32+4+8) words
    gpu.launches.clear()
    backend.w4a4(layer, _x(5, 256))
    assert _pointers(gpu.launches[0][3])[3] != gpu.device._scratch[0].data_ptr()

    monkeypatch.setattr(runtime, "SCRATCH_WORDS", 1 << 20)
    monkeypatch.setattr(torch._C, "_cuda_isCurrentStreamCapturing", lambda: True)
    gpu.launches.clear()
    backend.w4a4(layer, _x(5, 256))
    assert _pointers(gpu.launches[0][3])[3] != gpu.device._scratch[0].data_ptr()


def test_a_direct_launch_passes_pointers_nulls_and_int32s(gpu):
    """Device.launch, what the GPU tests and benchmarks call one kernel with: tensors as their addresses, None as
    a null pointer, ints as int32 in the low 4 bytes of their 8-byte slot (-1 reads as 0xFFFFFFFF)."""
    t = torch.zeros(4)
    gpu.device.launch("int4", "svdq_quantize_branch_sum_bf16", (2, 1, 1), 128, [t, 32, -1, None])
    assert gpu.launches == [("svdq_quantize_branch_sum_bf16", (2, 1, 1), 128, (t.data_ptr(), 32, 2**32 - 1, 0))]


def test_a_launch_from_another_current_device_switches_and_restores_it(gpu, monkeypatch):
    """The kernels live in their GPU's context: a thread whose current device is another GPU switches for
    the launch and back."""
    cuda_runtime = sys.modules["cupy"].cuda.runtime
    calls = []
    monkeypatch.setattr(cuda_runtime, "getDevice", lambda: 1)
    monkeypatch.setattr(cuda_runtime, "setDevice", calls.append)
    gpu.device._api = None  # bind the patched calls
    assert backend.w4a4(random_w4a4(256, 128, 16, "int4"), _x(3, 256)) is not None
    assert calls == [0, 1] and len(gpu.launches) == 2


# --- the opt-in wgmma kernel 2 (sm_90) ---


@pytest.fixture
def hopper(monkeypatch):
    """A stubbed H100 whose wgmma module (a variant build of gemm_w4a4_sm90.cu) records its launches too."""
    monkeypatch.setattr(backend, "_plans", {})
    monkeypatch.setattr(backend, "_noted", set())
    monkeypatch.setattr(backend, "_wgmma_modules", {})
    with stub_gpu((9, 0)) as stub:
        built = []
        stub.device.variant = lambda unit, defines: built.append((unit, defines)) or types.SimpleNamespace(
            get_function=lambda name: types.SimpleNamespace(kernel=stub.kernel(name)))
        stub.built = built
        yield stub
    backend.use_wgmma(False)


@pytest.mark.parametrize("on", [False, True])
def test_wgmma_kernel_2_runs_on_sm_90_only_when_asked(hopper, on):
    backend.use_wgmma(on)
    layer, x = random_w4a4(256, 128, 16, "int4"), _x(33, 256)
    backend.w4a4(layer, x)
    backend.w4a4(layer, x)
    names = [name for name, *_ in hopper.launches]
    gemm = "svdq_gemm_wgmma_int4_bf16" if on else "svdq_gemm_int4_bf16"
    assert names == ["svdq_quantize_int4_bf16", gemm] * 2
    assert hopper.built == ([(build.WGMMA, [])] if on else [])  # built once, on the first plan
    assert [launch[1:3] for launch in hopper.launches[:2]] == [launch[1:3] for launch in
                                                               backend.plan_w4a4(layer, x, wgmma=on)[1]]


def test_wgmma_setting_leaves_nvfp4_and_other_gpus_alone(monkeypatch, caplog):
    monkeypatch.setattr(backend, "_plans", {})
    monkeypatch.setattr(backend, "_noted", set())
    backend.use_wgmma(True)
    try:
        with stub_gpu((12, 0)) as rtx, caplog.at_level(logging.INFO, logger=LOGGER):
            for seed in range(2):
                backend.w4a4(random_w4a4(256, 128, 16, "int4", seed=seed), _x(5, 256))
            backend.w4a4(random_w4a4(256, 128, 16, "nvfp4"), _x(5, 256))
    finally:
        backend.use_wgmma(False)
    assert [name for name, *_ in rtx.launches][1::2] == ["svdq_gemm_int4_bf16"] * 2 + ["svdq_gemm_nvfp4_bf16"]
    said = [r.getMessage() for r in caplog.records if backend.WGMMA_SETTING in r.getMessage()]
    assert len(said) == 1 and "sm_90" in said[0] and "Stub GPU" in said[0]


@pytest.mark.parametrize("capability,rows", [((9, 0), 128), ((8, 9), 256), ((12, 0), 256)])
def test_kernel_2_runs_with_its_own_row_tiles(monkeypatch, capability, rows):
    """The wgmma kernel 2's CTAs are 128 rows, the mma.sync kernel's 256: with SVDQUANT_WGMMA=1 each GPU gets the
    kernel it runs, launched over its own row tiles (an sm_90 plan run by the mma.sync kernel would read rows
    past kernel 1's padded output)."""
    monkeypatch.setattr(backend, "_plans", {})
    monkeypatch.setattr(backend, "_noted", set())
    monkeypatch.setattr(backend, "_wgmma_modules", {})
    backend.use_wgmma(True)
    try:
        with stub_gpu(capability) as gpu:
            gpu.device.variant = lambda unit, defines: types.SimpleNamespace(
                get_function=lambda name: types.SimpleNamespace(kernel=gpu.kernel(name)))
            backend.w4a4(random_w4a4(256, 256, 16, "int4"), _x(300, 256))
    finally:
        backend.use_wgmma(False)
    (_, quantize_grid, _), (gemm, gemm_grid, _) = [launch[:3] for launch in gpu.launches]
    assert gemm.startswith(backend._WGMMA_PREFIX) == (capability == (9, 0))
    mp = -(-300 // rows) * rows  # kernel 1's outputs: 300 rows padded to the tile
    assert quantize_grid[0] == mp // 16 and gemm_grid == (2, mp // rows, 1)


@pytest.mark.parametrize("value,on", [(None, False), ("0", False), ("1", True)])
def test_wgmma_setting_is_read_from_the_environment(value, on):
    env = {k: v for k, v in os.environ.items() if k != backend.WGMMA_SETTING}
    if value is not None:
        env[backend.WGMMA_SETTING] = value
    code = "import pack_import; from comfyui_svdquant.kernels import backend; print(backend._wgmma)"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          cwd=os.path.dirname(__file__), check=True)
    assert done.stdout.strip() == str(on)
