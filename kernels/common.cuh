// Device helpers shared by the SVDQuant kernels, built on the PTX primitives of ptx.cuh.
//
// Compiled by NVRTC with no CUDA header at all: 16-bit floats travel as raw bits (u16) and are
// converted with PTX, so building needs nothing but libnvrtc (no cuda_fp16.h / cuda_bf16.h, no
// include path to find on the user's machine).
//
// Notation used in every comment of the kernel files (PTX ISA, "Matrix fragments for mma"):
//   lane = 4·g + t       g = groupID (lane >> 2, 0..7), t = threadID_in_group (lane & 3, 0..3)
//   A fragment rows are g and g + 8; B fragment columns are g; accumulator columns are 2t, 2t + 1.
#pragma once

#include "ptx.cuh"

// What a W4A4 kernel quantizes to: signed INT4, unsigned INT4 (inputs after a GELU, shifted by
// 0.171875), or NVFP4.
enum Mode { MODE_INT4, MODE_INT4_UNSIGNED, MODE_NVFP4 };

// ---- 16-bit floating point types ------------------------------------------------------------
// Tag types select the conversions and the mma instruction at compile time.
struct bf16_t {
    static constexpr bool IS_BF16 = true;
};
struct fp16_t {
    static constexpr bool IS_BF16 = false;
};

template <class T> DEVICE float to_f32(u16 h) {
    if constexpr (T::IS_BF16) {
        return __uint_as_float((u32)h << 16);  // bf16 is the upper half of an fp32
    } else {
        return ptx_f16_to_f32(h);
    }
}

// Round to nearest even, like torch's .to(bfloat16 / float16).
template <class T> DEVICE u16 from_f32(float f) {
    if constexpr (T::IS_BF16) {
        return ptx_f32_to_bf16(f);
    } else {
        return ptx_f32_to_f16(f);
    }
}

// Two values in one 32-bit register, `lo` in the low half (the element with the lower index).
template <class T> DEVICE u32 pack2(float lo, float hi) {
    return (u32)from_f32<T>(lo) | ((u32)from_f32<T>(hi) << 16);
}

// Outputs (row, col) and (row, col + 1) of a row-major 16-bit M x N matrix (col even), rounded from fp32: one
// 4-byte store where N is even (the pair is then 4-byte aligned); nothing outside the matrix is written.
template <class T> DEVICE void store_pair(u16* y, int M, int N, int row, int col, float v0, float v1) {
    if (row >= M || col >= N) return;
    u16* out = y + (size_t)row * N + col;
    if ((N & 1) == 0) {
        *(u32*)out = pack2<T>(v0, v1);
    } else {
        out[0] = from_f32<T>(v0);
        if (col + 1 < N) out[1] = from_f32<T>(v1);
    }
}

// ---- memory ---------------------------------------------------------------------------------
DEVICE uint4 ldg16(const void* p) {
    return ptx_ldg16(p);
}

DEVICE uint2 ldg8(const void* p) {
    return ptx_ldg8(p);
}

DEVICE void prefetch_l1(const void* p) {
    ptx_prefetch_l1(p);
}

DEVICE u32 ldg4(const void* p) {
    return ptx_ldg4(p);
}

DEVICE u16 ldg2(const void* p) {
    return ptx_ldg2(p);
}

// 16-byte global → shared copy; when `pred` is false the destination is zero-filled instead.
// sm_80+ copies asynchronously (cp.async, waited for with cp_async_wait); sm_75 has no cp.async and
// copies synchronously, which keeps every kernel correct there, only without the overlap.
DEVICE void cp_async16(void* smem, const void* gmem, bool pred) {
#if __CUDA_ARCH__ >= 800
    ptx_cp_async16(smem, gmem, pred);
#else
    *(uint4*)smem = pred ? ptx_ldg16(gmem) : make_uint4(0, 0, 0, 0);
#endif
}

DEVICE void cp_async_commit() {
#if __CUDA_ARCH__ >= 800
    ptx_cp_async_commit();
#endif
}

template <int N> DEVICE void cp_async_wait() {
#if __CUDA_ARCH__ >= 800
    ptx_cp_async_wait<N>();
#endif
}

DEVICE void ldmatrix_x4(u32 (&r)[4], const void* smem) {
    ptx_ldmatrix_x4(r, smem);
}

// ---- tensor-core instructions ---------------------------------------------------------------

// d += A·B for a 16x16 (A, row) by 16x8 (B, col) product of 16-bit values, fp32 accumulate.
// sm_75 has no m16n8k16 and no bf16 mma: it runs fp16 as two m16n8k8 (k 0..7 from a0/a1 and b0,
// k 8..15 from a2/a3 and b1); the sm_75 build instantiates fp16 kernels only.
template <class T> DEVICE void mma_16816(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
#if __CUDA_ARCH__ >= 800
    ptx_mma_16816<T::IS_BF16>(d, a, b0, b1);
#else
    static_assert(!T::IS_BF16, "sm_75 has no bf16 tensor-core instruction");
    ptx_mma_1688(d, a[0], a[1], b0);
    ptx_mma_1688(d, a[2], a[3], b1);
#endif
}

// INT4 products: d = A·B + c for a 16x64 (A, 4 registers of 8 nibbles) by 64x8 (B, 2 registers)
// block, int32 results. A is signed (s4) or, for activations after a GELU, unsigned (u4); B is s4.
//
// Fragment of m16n8k64 (.s4/.u4): lane (g, t) holds A rows g (regs 0, 2) and g + 8 (regs 1, 3),
// columns 8t..8t+7 (regs 0, 1) and 32+8t..32+8t+7 (regs 2, 3), nibble e = column 8t + e; B column
// g, rows 8t..8t+7 (reg 0) and 32+8t.. (reg 1). The same registers serve three instruction sets:
//   sm_80/86/89: one native m16n8k64 (SASS IMMA.16864).
//   sm_75: four m8n8k32 (a0·b0 + a2·b1 gives rows g, a1·b0 + a3·b1 rows g + 8): same fragments.
//   sm_90 and newer have no native 4-bit integer MMA (the PTX instruction is emulated with ~190
//   integer operations); there the nibbles are spread into bytes and fed to two m16n8k32 s8 MMAs:
//   even nibbles (columns 8t + 2j) to the first, odd ones to the second. A and B are spread the
//   same way, so the k order inside each MMA agrees on both sides and the dot product is unchanged.
//   Signed nibbles are moved to the high half of each byte (byte = 16·code, so no sign extension is
//   needed); unsigned ones stay in the low half. Products therefore come out scaled by
//   PSUM_UNIT = 256 (signed A) or 16 (unsigned A), an exact power of two divided out with the scales.
//   SVDQ_EMULATED_S4 keeps the native 4-bit MMA on sm_90 too: only the GPU tests and the speed benchmark
//   define it, to check that path on hardware and to show what the emulation costs.
#if __CUDA_ARCH__ >= 900 && !defined(SVDQ_EMULATED_S4)
#define SVDQ_S8_PATH 1
#else
#define SVDQ_S8_PATH 0
#endif

template <bool UNSIGNED_A> struct Int4Mma {
    static constexpr float PSUM_UNIT = SVDQ_S8_PATH ? (UNSIGNED_A ? 16.0f : 256.0f) : 1.0f;
    // An A fragment in the registers run() takes: the four words as loaded, or on the s8 path their even
    // and odd nibbles already spread into bytes (a[0], a[1]), once per fragment rather than once per MMA.
    static constexpr int A_PARTS = SVDQ_S8_PATH ? 2 : 1;

    static DEVICE void load_a(u32 (&a)[A_PARTS][4], uint4 v) {
        const u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int i = 0; i < 4; i++) {
#if SVDQ_S8_PATH
            const u32 mask = UNSIGNED_A ? 0x0F0F0F0Fu : 0xF0F0F0F0u;
            a[0][i] = UNSIGNED_A ? (w[i] & mask) : ((w[i] << 4) & mask);
            a[1][i] = UNSIGNED_A ? ((w[i] >> 4) & mask) : (w[i] & mask);
#else
            a[0][i] = w[i];
#endif
        }
    }

    static DEVICE void run(int (&d)[4], const u32 (&a)[A_PARTS][4], u32 b0, u32 b1, int c) {
#if SVDQ_S8_PATH
        d[0] = d[1] = d[2] = d[3] = c;
        ptx_mma_16832_s8<UNSIGNED_A>(d, a[0], (b0 << 4) & 0xF0F0F0F0u, (b1 << 4) & 0xF0F0F0F0u);
        ptx_mma_16832_s8<UNSIGNED_A>(d, a[1], b0 & 0xF0F0F0F0u, b1 & 0xF0F0F0F0u);
#elif __CUDA_ARCH__ >= 800
        ptx_mma_16864_s4<UNSIGNED_A>(d, a[0], b0, b1, c);
#else
        int lo[2] = {c, c}, hi[2] = {c, c};
        ptx_mma_8832_s4<UNSIGNED_A>(lo, a[0][0], b0);
        ptx_mma_8832_s4<UNSIGNED_A>(lo, a[0][2], b1);
        ptx_mma_8832_s4<UNSIGNED_A>(hi, a[0][1], b0);
        ptx_mma_8832_s4<UNSIGNED_A>(hi, a[0][3], b1);
        d[0] = lo[0], d[1] = lo[1], d[2] = hi[0], d[3] = hi[1];
#endif
    }
};

#if __CUDA_ARCH__ >= 1200
// NVFP4 products with hardware block scaling (sm_120a): d += (A·sfa)·(B·sfb), fp32.
// A/B fragments are laid out like the s4 ones above (8 E2M1 codes per register). Each row of A and
// each column of B carries four UE4M3 scales, one per 16 columns (byte q of a 32-bit register scales
// columns 16q..16q+15). Which lane supplies a row's / column's register is chosen by the thread-id
// selectors: for A, lanes with t = 2·TA (row g) and t = 2·TA + 1 (row g + 8); for B, lane t = TB
// (column g). So one register per lane carries the scales of two 16-row tiles (TA = 0, 1) and of
// four 8-column tiles (TB = 0..3).
DEVICE void mma_fp4(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1, u32 sfa, u16 ta, u32 sfb, u16 tb) {
    ptx_mma_fp4(d, a, b0, b1, sfa, ta, sfb, tb);
}

DEVICE u32 f32_to_e4m3(float f) {
    return ptx_f32_to_e4m3(f);
}

DEVICE float e4m3_to_f32(u32 byte) {
    return ptx_e4m3_to_f32(byte);
}
#endif

// ---- numerics shared with the core package (svdquant/int4.py, svdquant/nvfp4.py) -------------

// Integer MMA results as floats without I2F (a quarter of the FP32 rate on sm_80..89): the MMA adds
// its int32 sum x to MAGIC_BITS, and for |x| < 2^22 those bits are exactly the fp32 number
// MAGIC_F + x = 1.5·2^23 + x.
#define SVDQ_MAGIC_BITS 0x4B400000
#define SVDQ_MAGIC_F 12582912.0f

// IEEE-rounded quotients x / b for many x that share the divisor b: the correctly rounded reciprocal
// y = 1/b is computed once (the one division), and each quotient costs a multiply and two FMAs: q = x·y,
// corrected once by the exact residual x - b·q (Markstein's theorem: q + (x - b·q)·y rounds to the IEEE
// quotient when y is the correctly rounded reciprocal and q is within an ulp). Bit for bit x / b, -ftz
// included, for b in [2^-125, 2^125] and x, x / b of magnitude in [2^-100, 2^126] or x = 0 (-0 gives +0);
// checked on the CPU for every fp16 x over every normal fp16 b and every bf16 x over every normal bf16 b
// (with and without the GELU shift) and for 2e9 random v / (max|v| / 7). Outside that range (bf16
// activations under 2^-100) a quotient may be an ulp off, like the subnormals that -ftz flushes.
struct Divisor {
    float b, y;

    static DEVICE Divisor of(float b) {
        return {b, 1.0f / b};
    }

    // A divisor that is not positive (a scale of an all-zero group) gives 0 for every finite x: the
    // quantizers' zero-scale rule, decided once per divisor instead of once per element.
    static DEVICE Divisor or_zero(float b) {
        return b > 0.0f ? Divisor{b, 1.0f / b} : Divisor{1.0f, 0.0f};
    }

    DEVICE float operator()(float x) const {
        const float q = x * y;
        return fmaf(fmaf(-b, q, x), y, q);
    }
};

// rint(q) as 4-bit two's complement, for q already clamped to [-8, 15]: adding 1.5·2^23 rounds to the
// nearest integer, ties to even (like rintf), and leaves it in the low mantissa bits.
DEVICE u32 nibble_of(float q) {
    return __float_as_uint(q + SVDQ_MAGIC_F) & 0xFu;
}

// E2M1 code of v (already divided by its scale): round to nearest, ties to the even code, saturate
// at 6; code = sign << 3 | magnitude index. The comparisons are those of nvfp4.encode_e2m1.
DEVICE u32 e2m1_code(float v) {
    const float m = fabsf(v);
    const u32 index = (m > 0.25f) + (m >= 0.75f) + (m > 1.25f) + (m >= 1.75f) + (m > 2.5f) + (m >= 3.5f) +
                      (m > 5.0f);
    return (v < 0.0f ? 8u : 0u) | index;
}
