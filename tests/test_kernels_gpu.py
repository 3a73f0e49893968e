"""The fused kernels against the reference layers, on an NVIDIA GPU (skipped, saying why, elsewhere).

Every FLUX.1, SDXL and Z-Image-Turbo linear shape (Qwen-Image's are FLUX.1's: width 3072, MLP 12288, fused
qkv 9216, 6-chunk modulation 18432; Z-Image's and Qwen-Image's also at the published ranks 128 and 256), ranks
grown by LoRAs, M not a multiple of the 256-row tile, bf16 and fp16, INT4 signed and unsigned (and NVFP4 on
sm_120/121): relative error ≤ 1e-2 against ``reference_forward``, never NaN, outputs poisoned with NaN first, and
bitwise identical across runs. Kernel 1's codes and scales are compared bit for bit with the core's quantizer.
"""

from __future__ import annotations

import functools

import pytest
import torch
from test_kernels_emulated import check_kernel1
from test_layers import random_w4a4

from comfyui_svdquant import kernels
from comfyui_svdquant.kernels import backend, build, runtime
from comfyui_svdquant.svdquant.quantizer import quantize_w4a16

if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU: the kernel correctness tests need an NVIDIA GPU", allow_module_level=True)

DEVICE = torch.device("cuda", torch.cuda.current_device())
CAPABILITY = torch.cuda.get_device_capability(DEVICE)
FLUX = [(3072, 9216), (3072, 3072), (3072, 12288), (12288, 3072), (3072, 21504), (15360, 3072)]
SDXL = [(640, 640), (640, 5120), (2560, 640), (2048, 640), (1280, 1280), (1280, 10240), (5120, 1280), (2048, 1280)]
# Z-Image-Turbo (dim 3840): attention.qkv, attention.out, feed_forward.w1 / w3 (each a row slice of the file's
# fused 3840 → 20480 layer), feed_forward.w2
ZIMAGE = [(3840, 11520), (3840, 3840), (3840, 10240), (10240, 3840)]
MODES = ["int4", "uint4", "nvfp4"]
DTYPES = [torch.bfloat16, torch.float16]


@pytest.fixture(scope="module", autouse=True)
def cuda_kernels():
    choice = kernels.enable("auto")
    if not choice.startswith("CUDA kernels"):
        pytest.skip(f"the kernels cannot run here: {choice}")
    yield
    kernels.enable("torch")


def _skip_unsupported(mode: str, dtype: torch.dtype) -> None:
    if mode == "nvfp4" and CAPABILITY[0] != 12:
        pytest.skip("NVFP4 kernels need sm_120/121")
    if dtype == torch.bfloat16 and CAPABILITY < (8, 0):
        pytest.skip("sm_75 has no bf16 tensor cores")


@functools.lru_cache(maxsize=8)
def _layer(k: int, n: int, rank: int, mode: str, dtype: torch.dtype):
    layer = random_w4a4(k, n, rank, "nvfp4" if mode == "nvfp4" else "int4", mode == "uint4", dtype, seed=k + n)
    return layer.to(DEVICE)


def _input(m: int, k: int, mode: str, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    x = torch.randn(m, k, device=DEVICE, generator=g)
    if mode == "uint4":  # a GELU output, as unsigned layers read
        x = torch.nn.functional.gelu(x, approximate="tanh")
    return x.to(dtype)


def _poison_allocator() -> None:
    """Leave NaN bytes in the caching allocator so that workspaces start as garbage."""
    junk = torch.full((64 << 20,), float("nan"), device=DEVICE)
    del junk


def _run(kind: str, layer, x: torch.Tensor) -> torch.Tensor:
    out = torch.full((x.shape[0], layer.out_features), float("nan"), dtype=x.dtype, device=DEVICE)
    _poison_allocator()
    y = (backend.w4a4 if kind == "w4a4" else backend.w4a16)(layer, x, out=out)
    assert y is out, "the kernel declined this call"
    return y


def _check(kind: str, layer, x: torch.Tensor) -> torch.Tensor:
    y = _run(kind, layer, x)
    ref = layer.reference_forward(x)
    assert not torch.isnan(y).any()
    error = float((y.double() - ref.double()).norm() / ref.double().norm())
    assert error <= 1e-2, error
    assert torch.equal(_run(kind, layer, x), y), "not bitwise reproducible"
    return y


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("k,n", FLUX + SDXL + ZIMAGE)
def test_w4a4_matches_reference(k, n, mode, dtype):
    _skip_unsupported(mode, dtype)
    m = 1024 + 13 if (k, n) in SDXL else 4096 + 77
    _check("w4a4", _layer(k, n, 32, mode, dtype), _input(m, k, mode, dtype, seed=m))


@pytest.mark.parametrize("mode", ["int4", "nvfp4"])
@pytest.mark.parametrize("rank", [128, 256])  # the published Z-Image-Turbo and Qwen-Image files' ranks
@pytest.mark.parametrize("k,n", ZIMAGE)
@pytest.mark.parametrize("m", [7, 4096 + 77])
def test_w4a4_published_ranks(k, n, rank, mode, m):
    _skip_unsupported(mode, torch.bfloat16)
    _check("w4a4", _layer(k, n, rank, mode, torch.bfloat16), _input(m, k, mode, torch.bfloat16, seed=rank + m))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rank", [0, 16, 48, 80, 128, 160])  # 32 or 128 (Qwen-Image) grown by LoRAs, and none
@pytest.mark.parametrize("m", [1, 16, 333])
def test_w4a4_any_rank_and_row_count(m, rank, mode):
    _skip_unsupported(mode, torch.bfloat16)
    _check("w4a4", _layer(3072, 3072, rank, mode, torch.bfloat16), _input(m, 3072, mode, torch.bfloat16, seed=rank))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("k,n", [(3000, 3001), (200, 100)])  # padded buffers, odd output width
def test_w4a4_unpadded_features(k, n, mode):
    _skip_unsupported(mode, torch.float16)
    _check("w4a4", _layer(k, n, 16, mode, torch.float16), _input(77, k, mode, torch.float16, seed=1))


def test_w4a4_through_the_dispatcher():
    layer = _layer(3072, 3072, 32, "int4", torch.float16)
    x = _input(2 * 333, 3072, "int4", torch.float16, seed=3).reshape(2, 333, 3072)
    y = layer(x)
    assert y.shape == (2, 333, 3072)
    assert torch.equal(y.reshape(-1, 3072), backend.w4a4(layer, x.reshape(-1, 3072)))


# --- the sm_80/86/89 code path, on Hopper and newer ---


@functools.cache
def _native_s4_gemm():
    """Kernel 2 with the native m16n8k64 4-bit MMA (SVDQ_EMULATED_S4), which sm_90+ emulates."""
    return runtime.probe(DEVICE.index).variant(build.FAMILIES["int4"][1], ["SVDQ_EMULATED_S4"])


@pytest.mark.skipif(CAPABILITY[0] < 9, reason="this GPU runs the native 4-bit MMA path in the tests above")
@pytest.mark.parametrize("mode", ["int4", "uint4"])
@pytest.mark.parametrize("k,n", [(3072, 3072), (15360, 3072), (3000, 3001)])
def test_native_int4_mma_path_gives_the_same_bits(k, n, mode):
    """The RTX 30/40 path (one m16n8k64 per fragment) on this GPU's emulation of that instruction gives
    exactly the bits of the s8 path: its fragment layout checked on hardware, not only in the emulator."""
    layer = _layer(k, n, 32, mode, torch.bfloat16)
    x = _input(333, k, mode, torch.bfloat16, seed=5)
    y, (*kernel1, (gemm, *launch2)) = backend.plan_w4a4(layer, x)  # kernel 1 (and its split-K branch sum)
    device = runtime.probe(DEVICE.index)
    y.fill_(float("nan"))
    for name, *launch1 in kernel1:
        device.launch("int4", name, *launch1)
    device.launch_function(_native_s4_gemm().get_function(gemm), *launch2)
    assert torch.equal(y, _run("w4a4", layer, x))


# --- kernel 1's codes, scales and branch input, bit for bit (decoded as in the emulated tests) ---


@pytest.mark.parametrize("mode", MODES)
def test_quantize_is_bit_exact(mode):
    _skip_unsupported(mode, torch.bfloat16)
    layer = _layer(3072, 3072, 48, mode, torch.bfloat16)
    x = _input(333, 3072, mode, torch.bfloat16, seed=7)
    _, launches = backend.plan_w4a4(layer, x)
    device = runtime.probe(DEVICE.index)
    for name, grid, block, args in launches:
        device.launch(layer.precision, name, grid, block, args)
    check_kernel1(layer, x, launches[0])


# --- W4A16 (modulation) ---


@functools.lru_cache(maxsize=4)
def _w4a16(k: int, n: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(k + n)
    w, b = torch.randn(n, k, generator=g) * 0.02, torch.randn(n, generator=g)
    return quantize_w4a16("mod", w, b, dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=["bf16", "fp16"])
@pytest.mark.parametrize("m", [1, 2, 3, 7, 64])
@pytest.mark.parametrize("k,n", [(3072, 18432), (3072, 9216), (3000, 1000)])
def test_w4a16_matches_reference(k, n, m, dtype):
    _skip_unsupported("int4", dtype)
    layer = _w4a16(k, n, dtype)
    _check("w4a16", layer, _input(m, k, "int4", dtype, seed=m))


# --- CUDA graphs ---


def _flux_double_block_stream(dtype: torch.dtype):
    """One stream of a FLUX.1 double block as its quantized layers run it (modulation, qkv, attention out,
    MLP), at the real widths: the launches a CUDA graph of a FLUX block holds."""
    mod = _w4a16(3072, 18432, dtype)
    qkv, proj, fc1 = (_layer(3072, n, 32, "int4", dtype) for n in (9216, 3072, 12288))
    fc2 = _layer(12288, 3072, 32, "uint4", dtype)

    def forward(x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = mod(vec).chunk(6, dim=-1)[:3]
        h = x * (1 + scale) + shift
        h = x + gate * proj(qkv(h)[:, :3072])
        return h + fc2(torch.nn.functional.gelu(fc1(h), approximate="tanh"))
    return forward


def test_a_flux_block_captured_in_a_cuda_graph_replays_bit_exact():
    """Nothing on the launch path allocates outside the graph's pool or synchronises: a block's layers capture
    into a CUDA graph, and replays on new inputs give exactly the eager results."""
    dtype = torch.bfloat16
    block = _flux_double_block_stream(dtype)
    x, vec = _input(1024, 3072, "int4", dtype, seed=11), _input(1, 3072, "int4", dtype, seed=12)
    block(x, vec)  # plans made and kernels loaded outside the capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        block(x, vec)  # and the capture stream's own warm-up
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = block(x, vec)
    for seed in (13, 14):
        x.copy_(_input(1024, 3072, "int4", dtype, seed=seed))
        vec.copy_(_input(1, 3072, "int4", dtype, seed=seed + 10))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, block(x, vec))


# --- the opt-in wgmma kernel 2 (sm_90a: H100, H200) ---

WGMMA_CASES = [(k, n, m, "int4") for k, n in FLUX for m in (4608, 512)] + [
    (12288, 3072, 4608, "uint4"), (15360, 3072, 4608, "uint4")]  # FLUX's post-GELU inputs: fc2, linear2


@pytest.fixture
def wgmma_dispatch():
    backend.use_wgmma(True)
    yield
    backend.use_wgmma(False)


@pytest.mark.skipif(CAPABILITY != (9, 0), reason="the wgmma kernel 2 is built for sm_90a (H100, H200) only")
@pytest.mark.parametrize("k,n,m,mode", WGMMA_CASES)
def test_wgmma_kernel_at_flux_shapes(wgmma_dispatch, k, n, m, mode):
    """SVDQUANT_WGMMA=1 at every FLUX.1 shape (M = 4608 and 512): within 1e-2 of the reference, bitwise
    repeatable, and bit for bit the mma.sync kernel's output (the same integer sums and FMAs); the direct
    launch of the wgmma function gives the same bits as the dispatcher, so the opt-in path really ran it."""
    layer = _layer(k, n, 32, mode, torch.bfloat16)
    x = _input(m, k, mode, torch.bfloat16, seed=m + k)
    dispatched = _check("w4a4", layer, x)  # through backend.w4a4, whose plan now runs the wgmma kernel
    y, (*kernel1, (gemm, *launch2)) = backend.plan_w4a4(layer, x, wgmma=True)  # kernel 1 (and its branch sum)
    device = runtime.probe(DEVICE.index)
    y.fill_(float("nan"))
    for name, *launch1 in kernel1:
        device.launch("int4", name, *launch1)
    device.launch_function(backend.kernel_function(device, "int4", gemm), *launch2)
    assert torch.equal(y, dispatched)
    backend.use_wgmma(False)
    assert torch.equal(_run("w4a4", layer, x), dispatched)
