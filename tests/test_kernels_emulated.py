"""The CUDA kernels' own source, run on the CPU: the .cu files and common.cuh compiled with g++ against
kernels/host_ptx.h (the PTX instructions implemented from the ISA's definitions) in place of ptx.cuh,
once per code path (__CUDA_ARCH__ 750: m8n8k32 + m16n8k8 and synchronous copies; 800: native
m16n8k64; 900: INT4 through two s8 MMAs; 1200: the block-scaled NVFP4 MMA). The launches are the
ones kernels.backend plans for a GPU (same workspaces, grids, arguments), executed by the emulator.

Checks: kernel 1's codes and scales bit for bit against the core's quantizer, its branch-down
output, and the layer output against ``reference_forward``. What this cannot show: timing, races
between real threads, and whether the hardware MMAs behave as the ISA says (the GPU tests do).
Needs g++ (C++17) on Linux; skips, saying so, elsewhere.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_layers import random_w4a4

from comfyui_svdquant.kernels import backend
from comfyui_svdquant.svdquant import int4, nvfp4, packing
from comfyui_svdquant.svdquant.quantizer import quantize_w4a16

KERNELS = Path(backend.__file__).resolve().parent
CXX = shutil.which("g++") or shutil.which("c++")

HARNESS = r"""
#include "ptx.cuh"
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#define Q(name) extern "C" void name(const u16*, const u16*, const u16*, u32*, void*, u32*, int, int, int, int, int, \
    int) __attribute__((weak));
#define G(name) extern "C" void name(const u32*, const void*, const u32*, const void*, const u32*, const u32*,      \
    const u16*, const u16*, const float*, u16*, int, int, int, int, int) __attribute__((weak));
#define V(name) extern "C" void name(const uint4*, const u16*, const u16*, const u16*, const u16*, u16*, int, int, \
    int, int) __attribute__((weak));
#define KERNELS(X, Y, Z)                                                                                  \
    X(svdq_quantize_int4_bf16) X(svdq_quantize_int4_fp16) X(svdq_quantize_uint4_bf16)                     \
    X(svdq_quantize_uint4_fp16) X(svdq_quantize_nvfp4_bf16) X(svdq_quantize_nvfp4_fp16)                   \
    Y(svdq_gemm_int4_bf16) Y(svdq_gemm_int4_fp16) Y(svdq_gemm_uint4_bf16) Y(svdq_gemm_uint4_fp16)        \
    Y(svdq_gemm_nvfp4_bf16) Y(svdq_gemm_nvfp4_fp16)                                                      \
    Z(svdq_gemv_w4a16_bf16_m1) Z(svdq_gemv_w4a16_bf16_m2) Z(svdq_gemv_w4a16_bf16_m4)                     \
    Z(svdq_gemv_w4a16_fp16_m1) Z(svdq_gemv_w4a16_fp16_m2) Z(svdq_gemv_w4a16_fp16_m4)
KERNELS(Q, G, V)

template <class P> P arg(uint64_t v) {
    if constexpr (std::is_pointer_v<P>) return reinterpret_cast<P>(v); else return (P)(int64_t)v;
}

template <class... P, size_t... I>
int call(void (*fn)(P...), uint3 grid, unsigned block, const uint64_t* a, std::index_sequence<I...>) {
    return emu_launch(fn, grid, block, arg<P>(a[I])...) ? 0 : 1;
}

template <class... P> int run(void (*fn)(P...), uint3 grid, unsigned block, const uint64_t* a, int n) {
    if (!fn) return 2;                      // not built for this architecture
    if (n != (int)sizeof...(P)) return 3;   // the plan and the kernel disagree on the arguments
    return call(fn, grid, block, a, std::index_sequence_for<P...>{});
}

#define RUN(name) if (!std::strcmp(kernel, #name)) return run(name, grid, block, args, n);

extern "C" int emu_run(const char* kernel, unsigned gx, unsigned gy, unsigned gz, unsigned block,
                       const uint64_t* args, int n) {
    const uint3 grid = {gx, gy, gz};
    KERNELS(RUN, RUN, RUN)
    return 4;  // unknown name
}
"""

PATHS = {750: "sm_75: m8n8k32 / m16n8k8", 800: "sm_80: m16n8k64", 900: "sm_90: s8 MMAs", 1200: "sm_120: NVFP4"}


@pytest.fixture(scope="module")
def emulators(tmp_path_factory):
    """__CUDA_ARCH__ → the emulated kernels as a shared library (built on first use)."""
    if CXX is None or not sys.platform.startswith("linux"):
        pytest.skip("the kernel emulation needs g++ (C++17) and Linux (ucontext)")
    root = tmp_path_factory.mktemp("emulated_kernels")
    for name in ("quantize.cu", "gemm_w4a4.cu", "gemv_w4a16.cu", "common.cuh"):
        shutil.copy(KERNELS / name, root / name)
    (root / "ptx.cuh").write_text(f'#include "{KERNELS / "host_ptx.h"}"\n')
    (root / "harness.cpp").write_text(HARNESS)
    built: dict[int, ctypes.CDLL] = {}

    def get(arch: int) -> ctypes.CDLL:
        if arch not in built:
            lib = root / f"emulated_{arch}.so"
            families = ["-DSVDQ_FAMILY_INT4"] + (["-DSVDQ_FAMILY_NVFP4"] if arch >= 1200 else [])
            cmd = [CXX, "-std=c++17", "-O1", "-fPIC", "-shared", "-pthread", "-fno-strict-aliasing",
                   "-Wno-unknown-pragmas", f"-D__CUDA_ARCH__={arch}", *families, "-x", "c++",
                   *[str(root / f) for f in ("quantize.cu", "gemm_w4a4.cu", "gemv_w4a16.cu", "harness.cpp")],
                   "-o", str(lib)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            assert done.returncode == 0, done.stderr[-4000:]
            built[arch] = ctypes.CDLL(str(lib))
            built[arch].emu_run.argtypes = [ctypes.c_char_p] + [ctypes.c_uint] * 4 + [
                ctypes.POINTER(ctypes.c_uint64), ctypes.c_int]
        return built[arch]

    return get


def execute(lib: ctypes.CDLL, launches: list) -> None:
    for name, grid, block, args in launches:
        values = [a.data_ptr() if isinstance(a, torch.Tensor) else 0 if a is None else a & (2**64 - 1)
                  for a in args]
        array = (ctypes.c_uint64 * len(values))(*values)
        status = lib.emu_run(name.encode(), *grid, block, array, len(values))
        assert status == 0, f"{name}: " + {1: "deadlock", 2: "not built", 3: "argument count", 4: "unknown"}[status]


def decode_kernel1(launch, precision: str, m: int):
    """Kernel 1's outputs (the quantize launch's codes, scales, branch input) in the core's shapes:
    codes (M, K) as 4-bit values, scales (M, K/64) fp32 or (M, K/16) fp8, branch input (M, R)."""
    _, _, _, (x, _, _, codes, scales, lora, _, _, _, k, rank, mp) = launch
    g = k // 64
    nib = torch.stack([(codes >> (4 * e)) & 0xF for e in range(8)], -1)  # [mt][grp][g][t][half][h][e]
    nib = nib.reshape(mp // 16, g, 8, 4, 2, 2, 8).permute(0, 5, 2, 1, 4, 3, 6).reshape(mp, k)[:m]
    if precision == "nvfp4":  # u32 [G][Mp/32][lane = (g, tile parity, h)] bytes q
        sc = scales.view(torch.uint8).reshape(g, mp // 32, 8, 2, 2, 4).permute(1, 3, 4, 2, 0, 5).reshape(mp, g * 4)
        sc = sc[:m].view(torch.float8_e4m3fn)
    else:  # f32 [G][Mp], row 16mt + 8h + g at 16mt + 2g + h
        sc = scales.view(torch.float32).reshape(g, mp // 16, 8, 2).permute(1, 3, 2, 0).reshape(mp, g)[:m]
    act = lora.view(torch.int16)[: mp * rank].view(x.dtype)  # [mt][rt][g][t][nh][h][e]
    act = act.reshape(mp // 16, rank // 16, 8, 4, 2, 2, 2).permute(0, 5, 2, 1, 4, 3, 6).reshape(mp, rank)[:m]
    return nib, sc, act


def check_kernel1(layer, x: torch.Tensor, launch) -> None:
    codes, scales, act = decode_kernel1(launch, layer.precision, x.shape[0])
    kp = layer.qweight.shape[1] * 2
    xp = packing.pad_to(x, (x.shape[0], kp))
    smooth = packing.unpack_vector(layer.smooth_factor)
    if layer.precision == "nvfp4":
        ref_codes, ref_scales = nvfp4.quantize_activations(xp, smooth)
        assert torch.equal(scales.view(torch.uint8), ref_scales.view(torch.uint8))
    else:
        ref_codes, ref_scales = int4.quantize_activations(xp, smooth, layer.act_unsigned)
        assert torch.equal(scales, ref_scales)
    assert torch.equal(codes.to(torch.int32), ref_codes.to(torch.int32) & 0xF)
    if layer.rank:
        ref_act = (xp.float() @ packing.unpack_down(layer.proj_down).float().T).to(x.dtype)
        torch.testing.assert_close(act, ref_act, rtol=1e-2, atol=1e-3)  # fp32 sums in another order


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref.double()).norm() / ref.double().norm())


CASES = [  # (arch, precision, unsigned, dtype, k, n, rank, m)
    (800, "int4", False, torch.bfloat16, 384, 256, 32, 33),   # a 128-column tail chunk in kernel 1
    (800, "int4", True, torch.bfloat16, 256, 128, 80, 1),     # rank 80: two rank passes; one row
    (800, "int4", True, torch.bfloat16, 256, 128, 128, 2),    # Qwen-Image's rank 128, two rows
    (800, "int4", False, torch.float16, 200, 129, 16, 20),    # padded K, odd output width
    (800, "int4", False, torch.bfloat16, 256, 128, 0, 17),    # no branch
    (800, "int4", False, torch.bfloat16, 3072, 128, 32, 17),  # FLUX's K: 12 chunks, 48 pipelined steps
    (900, "int4", False, torch.bfloat16, 256, 256, 32, 33),
    (900, "int4", True, torch.float16, 256, 128, 48, 9),
    (750, "int4", False, torch.float16, 256, 128, 32, 21),
    (750, "int4", True, torch.float16, 128, 128, 16, 5),
    (1200, "nvfp4", False, torch.bfloat16, 384, 256, 32, 33),
    (1200, "nvfp4", False, torch.float16, 200, 130, 16, 3),
    (1200, "int4", True, torch.bfloat16, 256, 128, 32, 7),
]


@pytest.mark.parametrize("arch,precision,unsigned,dtype,k,n,rank,m", CASES)
def test_w4a4_kernels_match_the_reference(emulators, arch, precision, unsigned, dtype, k, n, rank, m):
    layer = random_w4a4(k, n, rank, precision, unsigned, dtype, seed=k + n + rank)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    x = (torch.nn.functional.gelu(x, approximate="tanh") if unsigned else x).to(dtype)
    out = torch.full((m, n), float("nan"), dtype=dtype)
    y, launches = backend.plan_w4a4(layer, x, out)
    execute(emulators(arch), launches)
    check_kernel1(layer, x, launches[0])
    assert not torch.isnan(y).any()
    assert relative_error(y, layer.reference_forward(x)) < 1e-3  # only 16-bit rounding differs


@pytest.mark.parametrize("arch,dtype,m,k,n", [(800, torch.bfloat16, 1, 384, 256), (800, torch.bfloat16, 3, 256, 130),
                                              (750, torch.float16, 2, 200, 128), (900, torch.float16, 7, 256, 128)])
def test_w4a16_kernel_matches_the_reference(emulators, arch, dtype, m, k, n):
    g = torch.Generator().manual_seed(k + n)
    layer = quantize_w4a16("mod", torch.randn(n, k, generator=g) * 0.02, torch.randn(n, generator=g), dtype)
    x = torch.randn(m, k, generator=g).to(dtype)
    y, launches = backend.plan_w4a16(layer, x, torch.full((m, n), float("nan"), dtype=dtype))
    execute(emulators(arch), launches)
    assert not torch.isnan(y).any()
    assert relative_error(y, layer.reference_forward(x)) < 1e-3


@pytest.mark.parametrize("arch,precision", [(800, "int4"), (1200, "nvfp4")])
def test_w4a4_kernels_read_a_column_view_in_place(emulators, arch, precision):
    """FLUX's linear2 gives each half a column view of one input: kernel 1 reads it with the row stride."""
    layer = random_w4a4(384, 256, 32, precision, seed=5)
    wide = torch.randn(19, 640, generator=torch.Generator().manual_seed(5)).bfloat16()
    x = wide[:, 128:512]
    y, launches = backend.plan_w4a4(layer, x)
    assert launches[0][3][0] is x and launches[0][3][7] == 640  # the view itself and its row stride
    execute(emulators(arch), launches)
    assert relative_error(y, layer.reference_forward(x.contiguous())) < 1e-3
