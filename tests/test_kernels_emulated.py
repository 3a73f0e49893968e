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
#define S(name) extern "C" void name(u32*, int, int, int) __attribute__((weak));
#define KERNELS(X, W, Y, Z)                                                                                \
    X(svdq_quantize_int4_bf16) X(svdq_quantize_int4_fp16) X(svdq_quantize_uint4_bf16)                     \
    X(svdq_quantize_uint4_fp16) X(svdq_quantize_nvfp4_bf16) X(svdq_quantize_nvfp4_fp16)                   \
    W(svdq_quantize_branch_sum_bf16) W(svdq_quantize_branch_sum_fp16)                                     \
    Y(svdq_gemm_int4_bf16) Y(svdq_gemm_int4_fp16) Y(svdq_gemm_uint4_bf16) Y(svdq_gemm_uint4_fp16)        \
    Y(svdq_gemm_nvfp4_bf16) Y(svdq_gemm_nvfp4_fp16)                                                      \
    Y(svdq_gemm_wgmma_int4_bf16) Y(svdq_gemm_wgmma_int4_fp16) Y(svdq_gemm_wgmma_uint4_bf16)              \
    Y(svdq_gemm_wgmma_uint4_fp16)                                                                        \
    Z(svdq_gemv_w4a16_bf16_m1) Z(svdq_gemv_w4a16_bf16_m2) Z(svdq_gemv_w4a16_bf16_m4)                     \
    Z(svdq_gemv_w4a16_fp16_m1) Z(svdq_gemv_w4a16_fp16_m2) Z(svdq_gemv_w4a16_fp16_m4)
KERNELS(Q, S, G, V)

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

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// One wgmma m64n128k32 on operands laid out by the caller (tests of the emulated instruction itself): A's
// registers [thread][4], B's bytes copied to shared memory as they are, described with `lbo` / `sbo`,
// accumulators [thread][64] in and out; `early` [thread][64] is what the accumulators held between the
// issue and the wait.
extern "C" void emu_wgmma_probe(const u32* a, const unsigned char* b, int bytes, int* d, int* early, int ua,
                                int lbo, int sbo) {
    __shared__ __align__(128) unsigned char smem[16384];
    const unsigned tid = threadIdx.x;
    for (int i = tid; i < bytes; i += 128) smem[i] = b[i];
    __syncthreads();
    u32 regs[4];
    int acc[64];
    for (int i = 0; i < 4; i++) regs[i] = a[4 * tid + i];
    for (int i = 0; i < 64; i++) acc[i] = d[64 * tid + i];
    const unsigned long long desc = ptx_smem_desc(smem, lbo, sbo);
    ptx_wgmma_fence();
    if (ua) ptx_wgmma_m64n128k32_s8<true>(acc, regs, desc); else ptx_wgmma_m64n128k32_s8<false>(acc, regs, desc);
    ptx_wgmma_commit();
    for (int i = 0; i < 64; i++) early[64 * tid + i] = acc[i];
    ptx_wgmma_wait<0>();
    for (int i = 0; i < 64; i++) d[64 * tid + i] = acc[i];
}
#define PROBE if (!std::strcmp(kernel, "emu_wgmma_probe")) return run(emu_wgmma_probe, grid, block, args, n);
#else
#define PROBE
#endif

#define RUN(name) if (!std::strcmp(kernel, #name)) return run(name, grid, block, args, n);

extern "C" int emu_run(const char* kernel, unsigned gx, unsigned gy, unsigned gz, unsigned block,
                       const uint64_t* args, int n) {
    const uint3 grid = {gx, gy, gz};
    KERNELS(RUN, RUN, RUN, RUN)
    PROBE
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
    for name in ("quantize.cu", "gemm_w4a4.cu", "gemm_w4a4_sm90.cu", "gemv_w4a16.cu", "common.cuh"):
        shutil.copy(KERNELS / name, root / name)
    (root / "ptx.cuh").write_text(f'#include "{KERNELS / "host_ptx.h"}"\n')
    (root / "harness.cpp").write_text(HARNESS)
    built: dict[int, ctypes.CDLL] = {}

    def get(arch: int) -> ctypes.CDLL:
        if arch not in built:
            lib = root / f"emulated_{arch}.so"
            families = ["-DSVDQ_FAMILY_INT4"] + (["-DSVDQ_FAMILY_NVFP4"] if arch >= 1200 else [])
            if arch == 900:  # CI builds sm_90a: the arch-specific target's wgmma kernel is there too
                families.append("-D__CUDA_ARCH_FEAT_SM90_ALL")
            cmd = [CXX, "-std=c++17", "-O1", "-fPIC", "-shared", "-pthread", "-fno-strict-aliasing",
                   "-Wno-unknown-pragmas", f"-D__CUDA_ARCH__={arch}", *families, "-x", "c++",
                   *[str(root / f) for f in ("quantize.cu", "gemm_w4a4.cu", "gemm_w4a4_sm90.cu", "gemv_w4a16.cu",
                                             "harness.cpp")],
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
    (800, "int4", False, torch.bfloat16, 3072, 128, 32, 17),  # FLUX's K: 6 K ranges of 2 chunks, summed
    (800, "int4", True, torch.bfloat16, 1024, 128, 80, 5),    # 2 K ranges x 2 rank passes
    (900, "int4", False, torch.bfloat16, 1280, 128, 32, 33),  # 2 K ranges of 3 and 2 chunks
    (750, "int4", False, torch.float16, 1024, 128, 32, 3),    # split K with synchronous copies
    (1200, "nvfp4", False, torch.bfloat16, 1536, 128, 32, 9),  # 3 K ranges
    (800, "int4", False, torch.bfloat16, 256, 128, 256, 3),   # rank 256 (Z-Image-Turbo r256): 4 CTAs along z
    (1200, "nvfp4", False, torch.bfloat16, 256, 128, 128, 5),  # rank 128 (the published r128 files)
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
                                              (750, torch.float16, 2, 200, 128), (900, torch.float16, 7, 256, 128),
                                              (900, torch.bfloat16, 2, 3072, 128),  # FLUX's K: 1.5 slabs of x
                                              (800, torch.float16, 1, 4160, 128)])  # 3 slabs, the last 1 step
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


DIVISOR_CHECK = r"""
#include "common.cuh"
#include <cstdio>

// Divisor (one reciprocal per divisor, a multiply and two FMAs per quotient) against IEEE division, over
// every finite 16-bit x and every positive normal 16-bit divisor in range, with and without the GELU shift.
static float xs[0x10000];

static long check(bool bf16, bool shift) {
    long wrong = 0;
    for (u32 hx = 0; hx < 0x10000; hx++) {
        xs[hx] = bf16 ? __uint_as_float(hx << 16) : ptx_f16_to_f32((u16)hx);
        if (shift) xs[hx] = xs[hx] + 0.171875f;
    }
    for (u32 hb = 1; hb < 0x7F80; hb++) {
        const float b = bf16 ? __uint_as_float(hb << 16) : ptx_f16_to_f32((u16)hb);
        if (!(b >= 0x1p-125f && b <= 0x1p125f) || (!bf16 && hb >= 0x7C00)) continue;
        const Divisor d = Divisor::of(b);
        for (u32 hx = 0; hx < 0x10000; hx++) {
            const float x = xs[hx], want = x / b, got = d(x);
            if (!std::isfinite(x) || std::fabs(want) > 0x1p126f) continue;
            if ((x != 0 && std::fabs(x) < 0x1p-100f) || (want != 0 && std::fabs(want) < 0x1p-100f)) continue;
            if (float_bits(got) != float_bits(want) && !(got == 0 && want == 0)) {
                if (wrong++ < 3) std::printf("%a / %a: %a, IEEE %a\n", x, b, got, want);
            }
        }
    }
    return wrong;
}

// The constant divisors of the scales (absmax / 7, max / 15, absmax / 6) over every fp32 significand: the
// quotient's bits do not depend on the exponent inside the range.
static long check_constant(float b) {
    long wrong = 0;
    const Divisor d = Divisor::of(b);
    for (u32 bits = 0x3F800000; bits < 0x40000000; bits++) {
        const float x = __uint_as_float(bits);
        if (float_bits(d(x)) != float_bits(x / b) && wrong++ < 3) std::printf("%a / %a: %a\n", x, b, d(x));
    }
    return wrong;
}

int main() {
    long wrong = check_constant(7.0f) + check_constant(15.0f) + check_constant(6.0f);
    for (int bf16 = 0; bf16 < 2; bf16++)
        for (int shift = 0; shift < 2; shift++) wrong += check(bf16, shift);
    std::printf("%ld wrong\n", wrong);
    return wrong != 0;
}
"""


def test_one_reciprocal_per_divisor_gives_the_ieee_quotients(tmp_path):
    """Kernel 1 divides by a smoothing factor or a scale with common.cuh's Divisor (a reciprocal computed once,
    then x·y and one exact-residual correction per element) where the reference divides: every quotient
    of a 16-bit input by a 16-bit divisor, and of every fp32 by the scales' constant divisors, must be the
    IEEE one, bit for bit (+0 for -0 aside)."""
    if CXX is None:
        pytest.skip("needs g++ (C++17)")
    shutil.copy(KERNELS / "common.cuh", tmp_path / "common.cuh")
    (tmp_path / "ptx.cuh").write_text(f'#include "{KERNELS / "host_ptx.h"}"\n')
    (tmp_path / "check.cpp").write_text(DIVISOR_CHECK)
    exe = tmp_path / "check"
    # -march=native: the CPU's own FMA instruction where it has one (libm's software fmaf is 10x slower)
    built = subprocess.run([CXX, "-std=c++17", "-O2", "-march=native", "-ffp-contract=off",
                            str(tmp_path / "check.cpp"), "-o", str(exe)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-4000:]
    done = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:]


WGMMA_CASES = [  # (precision dtype, unsigned, k, n, rank, m): FLUX-like slices with small M, then the edges
    (torch.bfloat16, False, 3072, 256, 32, 256),  # FLUX's K and rank: 48 steps, 2 x 2 CTAs
    (torch.float16, True, 3072, 128, 32, 128),    # unsigned activations (after a GELU): the u8 x s8 wgmma
    (torch.bfloat16, False, 256, 129, 16, 33),    # padded rows and an odd output width
    (torch.float16, False, 128, 128, 0, 5),       # one step pair, no branch
]


@pytest.mark.parametrize("dtype,unsigned,k,n,rank,m", WGMMA_CASES)
def test_wgmma_kernel_matches_the_reference_and_the_mma_kernel(emulators, dtype, unsigned, k, n, rank, m):
    """gemm_w4a4_sm90.cu (sm_90a, wgmma), emulated with asynchronous wgmma semantics: the reference's numbers,
    and bit for bit those of the mma.sync kernel it replaces (same group sums, same FMAs in the same order)."""
    layer = random_w4a4(k, n, rank, "int4", unsigned, dtype, seed=k + n + rank)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    x = (torch.nn.functional.gelu(x, approximate="tanh") if unsigned else x).to(dtype)
    outputs = []
    for wgmma in (True, True, False):
        out = torch.full((m, n), float("nan"), dtype=dtype)
        y, launches = backend.plan_w4a4(layer, x, out, wgmma=wgmma)
        assert launches[-1][0].startswith("svdq_gemm_wgmma_") == wgmma  # after kernel 1 (and its branch sum)
        execute(emulators(900), launches)
        outputs.append(y)
    assert not torch.isnan(outputs[0]).any()
    assert relative_error(outputs[0], layer.reference_forward(x)) < 1e-3
    assert torch.equal(outputs[0].view(torch.int16), outputs[1].view(torch.int16))  # repeatable
    assert torch.equal(outputs[0].view(torch.int16), outputs[2].view(torch.int16))  # = the mma.sync kernel


@pytest.mark.parametrize("unsigned_a,lbo,sbo", [(False, 128, 256), (True, 2048, 128)])
def test_emulated_wgmma_follows_the_isa_layouts(emulators, unsigned_a, lbo, sbo):
    """The emulated instruction against the layouts written out here independently: A's register fragment
    (CUTLASS's ALayout_64x32: row 16·warp + g + 8·(reg & 1), k 4t + byte + 16·(reg >> 1)), B through a no-swizzle
    K-major descriptor (core matrices of 8 rows x 16 bytes, LBO steps k by 16, SBO steps n by 8; two layouts),
    the accumulators (row 16·warp + g + 8·((i >> 1) & 1), column 8·(i >> 2) + 2t + (i & 1)), and the
    asynchrony: between issue and wait the accumulators still hold their old values."""
    g = torch.Generator().manual_seed(lbo + sbo)
    lo, hi = (0, 256) if unsigned_a else (-128, 128)
    a = torch.randint(lo, hi, (64, 32), generator=g)
    b = torch.randint(-128, 128, (32, 128), generator=g)
    d0 = torch.randint(-(2**20), 2**20, (64, 128), generator=g)
    thread = torch.arange(128)
    warp, grp, t = thread // 32, thread % 32 // 4, thread % 4
    regs = torch.zeros(128, 4, dtype=torch.int64)
    for r in range(4):
        for byte in range(4):
            rows, ks = 16 * warp + grp + 8 * (r & 1), 4 * t + byte + 16 * (r >> 1)
            regs[:, r] |= (a[rows, ks] & 0xFF) << (8 * byte)
    size = max(15 * sbo + lbo, 16 * sbo) + 128
    smem = torch.zeros(size, dtype=torch.uint8)
    for n in range(128):
        for k in range(32):
            smem[(n // 8) * sbo + (k // 16) * lbo + (n % 8) * 16 + k % 16] = int(b[k, n]) & 0xFF
    i = torch.arange(64)
    rows = 16 * warp[:, None] + grp[:, None] + 8 * ((i >> 1) & 1)
    cols = 8 * (i >> 2) + 2 * t[:, None] + (i & 1)
    d = d0[rows, cols].to(torch.int32).contiguous()
    early = torch.zeros_like(d)
    before = d.clone()
    a_words = regs.to(torch.int32).contiguous()  # the low 32 bits, two's complement
    execute(emulators(900), [("emu_wgmma_probe", (1, 1, 1), 128,
                              [a_words, smem, size, d, early, int(unsigned_a), lbo, sbo])])
    assert torch.equal(early, before)
    assert torch.equal(d, (d0 + a @ b)[rows, cols].to(torch.int32))
