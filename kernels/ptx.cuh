// Every PTX instruction the SVDQuant kernels use, one inline-asm function each, and nothing else.
//
// Keeping the hardware behind this small interface lets the kernels' own logic (common.cuh and the
// .cu files) also be compiled for the CPU against host_ptx.h, which implements the same functions
// from the PTX ISA's definitions (tests/test_kernels_emulated.py). Which instruction a kernel may
// use on which architecture is decided in common.cuh.
#pragma once

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

#define DEVICE __device__ __forceinline__

// ---- conversions ----------------------------------------------------------------------------
DEVICE float ptx_f16_to_f32(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

DEVICE u16 ptx_f32_to_bf16(float f) {  // round to nearest even
    u16 h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

DEVICE u16 ptx_f32_to_f16(float f) {  // round to nearest even
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

#if __CUDA_ARCH__ >= 1200
DEVICE u32 ptx_f32_to_e4m3(float f) {  // round to nearest even, saturating at ±448
    u16 two;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(two) : "f"(0.0f), "f"(f));
    return two & 0xFF;
}

DEVICE float ptx_e4m3_to_f32(u32 byte) {  // exact (via fp16)
    u32 halves;
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(halves) : "h"((u16)byte));
    return ptx_f16_to_f32((u16)(halves & 0xFFFF));
}
#endif

// ---- memory ---------------------------------------------------------------------------------
DEVICE uint4 ptx_ldg16(const void* p) {  // read-only (non-coherent) global loads
    uint4 v;
    asm volatile("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}

DEVICE uint2 ptx_ldg8(const void* p) {
    uint2 v;
    asm volatile("ld.global.nc.v2.u32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p));
    return v;
}

DEVICE u32 ptx_ldg4(const void* p) {
    u32 v;
    asm volatile("ld.global.nc.u32 %0, [%1];" : "=r"(v) : "l"(p));
    return v;
}

DEVICE u16 ptx_ldg2(const void* p) {
    u16 v;
    asm volatile("ld.global.nc.u16 %0, [%1];" : "=h"(v) : "l"(p));
    return v;
}

DEVICE void ptx_prefetch_l1(const void* p) {  // the line holding p into L1, no register written
    asm volatile("prefetch.global.L1 [%0];" ::"l"(p));
}

#if __CUDA_ARCH__ >= 800
// 16-byte global → shared copy, zero-filled when `pred` is false (src-size 0).
DEVICE void ptx_cp_async16(void* smem, const void* gmem, bool pred) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;"
                 ::"r"((u32)__cvta_generic_to_shared(smem)), "l"(gmem), "r"(pred ? 16 : 0));
}

DEVICE void ptx_cp_async_commit() {
    asm volatile("cp.async.commit_group;");
}

template <int N> DEVICE void ptx_cp_async_wait() {  // at most N committed groups still in flight
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");  // shared reads stay after the wait
}
#endif

// Four 8x8 16-bit matrices from shared memory; lane i gives the address of row i % 8 of matrix i / 8,
// and register j of lane (g, t) receives row g, columns 2t, 2t + 1 of matrix j.
DEVICE void ptx_ldmatrix_x4(u32 (&r)[4], const void* smem) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"((u32)__cvta_generic_to_shared(smem)));
}

// ---- tensor-core MMAs (fragment layouts: PTX ISA, "Matrix fragments for mma.m16n8k*") --------

#if __CUDA_ARCH__ >= 800
// d += A·B, 16x16 by 16x8 16-bit values, fp32 accumulate.
template <bool BF16> DEVICE void ptx_mma_16816(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    if constexpr (BF16) {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                     "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    } else {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                     "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
}

// d = A·B + c: 16x64 by 64x8 4-bit integers (A signed, or unsigned when UA), int32.
template <bool UA> DEVICE void ptx_mma_16864_s4(int (&d)[4], const u32 (&a)[4], u32 b0, u32 b1, int c) {
    if constexpr (UA) {
        asm volatile("mma.sync.aligned.m16n8k64.row.col.s32.u4.s4.s32 "
                     "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %10, %10, %10};"
                     : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "r"(c));
    } else {
        asm volatile("mma.sync.aligned.m16n8k64.row.col.s32.s4.s4.s32 "
                     "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %10, %10, %10};"
                     : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "r"(c));
    }
}

// d += A·B: 16x32 by 32x8 bytes (A signed, or unsigned when UA), int32.
template <bool UA> DEVICE void ptx_mma_16832_s8(int (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    if constexpr (UA) {
        asm volatile("mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32 "
                     "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
                     : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    } else {
        asm volatile("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 "
                     "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
                     : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
}
#endif

// d += A·B: 16x8 by 8x8 fp16, fp32 accumulate (sm_75's half-size MMA).
DEVICE void ptx_mma_1688(float (&d)[4], u32 a0, u32 a1, u32 b0) {
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 "
                 "{%0, %1, %2, %3}, {%4, %5}, {%6}, {%0, %1, %2, %3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a0), "r"(a1), "r"(b0));
}

// d += A·B: 8x32 by 32x8 4-bit integers, int32 (sm_75's 4-bit MMA).
template <bool UA> DEVICE void ptx_mma_8832_s4(int (&d)[2], u32 a, u32 b) {
    if constexpr (UA) {
        asm volatile("mma.sync.aligned.m8n8k32.row.col.s32.u4.s4.s32 {%0, %1}, {%2}, {%3}, {%0, %1};"
                     : "+r"(d[0]), "+r"(d[1])
                     : "r"(a), "r"(b));
    } else {
        asm volatile("mma.sync.aligned.m8n8k32.row.col.s32.s4.s4.s32 {%0, %1}, {%2}, {%3}, {%0, %1};"
                     : "+r"(d[0]), "+r"(d[1])
                     : "r"(a), "r"(b));
    }
}

#if __CUDA_ARCH__ >= 1200
// d += (A·sfa)·(B·sfb): 16x64 by 64x8 E2M1 values, UE4M3 scales per 16 columns of k (byte q of a
// scale register covers k = 16q..16q+15). Scale-A of row g comes from lane (g, 2·ta), of row g + 8
// from lane (g, 2·ta + 1); scale-B of column g from lane (g, tb).
DEVICE void ptx_mma_fp4(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1, u32 sfa, u16 ta, u32 sfb, u16 tb) {
    asm volatile(
        "mma.sync.aligned.m16n8k64.row.col.kind::mxf4nvf4.block_scale.scale_vec::4X.f32.e2m1.e2m1.f32.ue4m3 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3}, {%10}, {%11, %12}, {%13}, {%14, %15};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1),
          "r"(sfa), "h"((u16)0), "h"(ta), "r"(sfb), "h"((u16)0), "h"(tb));
}
#endif

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// ---- warpgroup MMA (sm_90a only: the arch-specific target defines __CUDA_ARCH_FEAT_SM90_ALL) --------

// Shared-memory matrix descriptor (PTX ISA, "Matrix Descriptor Format"), no swizzling: start address,
// leading-dimension (K) and stride-dimension (M/N) byte offsets between 8x16-byte core matrices, each
// encoded as (x & 0x3FFFF) >> 4; base offset and swizzle mode 0.
DEVICE unsigned long long ptx_smem_desc(const void* smem, u32 lbo, u32 sbo) {
    const u32 start = (u32)__cvta_generic_to_shared(smem);
    return (unsigned long long)((start & 0x3FFFF) >> 4) | (unsigned long long)((lbo & 0x3FFFF) >> 4) << 16 |
           (unsigned long long)((sbo & 0x3FFFF) >> 4) << 32;
}

// Orders this thread's register writes before the wgmma that reads them (accumulators, A fragments).
DEVICE void ptx_wgmma_fence() {
    asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
}

DEVICE void ptx_wgmma_commit() {
    asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
}

// Until at most N committed wgmma groups of this warpgroup are in flight.
template <int N> DEVICE void ptx_wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}

// Shared memory written by ordinary stores and read next by wgmma (the async proxy).
DEVICE void ptx_fence_proxy_async() {
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}

// Pins registers: the compiler may not move their uses above this point (after a wgmma wait the
// accumulators hold their values only from here on).
template <int N> DEVICE void ptx_hold(int (&r)[N]) {
#pragma unroll
    for (int i = 0; i < N; i++) asm volatile("" : "+r"(r[i])::"memory");
}

// One wgmma with the A type spelled in the instruction (u8 or s8); the 64 accumulators and 4 A registers.
#define SVDQ_WGMMA_M64N128K32(ATYPE)                                                                           \
asm volatile("wgmma.mma_async.sync.aligned.m64n128k32.s32." ATYPE ".s8 {"                                      \
             "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, " \
             "%21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, " \
             "%40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, " \
             "%59, %60, %61, %62, %63"                                                                         \
             "}, {%64, %65, %66, %67}, %68, 1;"                                                                \
             : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]), \
               "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]),        \
               "+r"(d[15]), "+r"(d[16]), "+r"(d[17]), "+r"(d[18]), "+r"(d[19]), "+r"(d[20]), "+r"(d[21]),      \
               "+r"(d[22]), "+r"(d[23]), "+r"(d[24]), "+r"(d[25]), "+r"(d[26]), "+r"(d[27]), "+r"(d[28]),      \
               "+r"(d[29]), "+r"(d[30]), "+r"(d[31]), "+r"(d[32]), "+r"(d[33]), "+r"(d[34]), "+r"(d[35]),      \
               "+r"(d[36]), "+r"(d[37]), "+r"(d[38]), "+r"(d[39]), "+r"(d[40]), "+r"(d[41]), "+r"(d[42]),      \
               "+r"(d[43]), "+r"(d[44]), "+r"(d[45]), "+r"(d[46]), "+r"(d[47]), "+r"(d[48]), "+r"(d[49]),      \
               "+r"(d[50]), "+r"(d[51]), "+r"(d[52]), "+r"(d[53]), "+r"(d[54]), "+r"(d[55]), "+r"(d[56]),      \
               "+r"(d[57]), "+r"(d[58]), "+r"(d[59]), "+r"(d[60]), "+r"(d[61]), "+r"(d[62]), "+r"(d[63])       \
             : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b))

// d += A·B: 64x32 (A: s8, or u8 when UA; registers, each warp the m16n8k32 A fragment of its 16 rows) by
// 32x128 (B: s8 in shared memory, K-major, described by `b`), int32. Asynchronous: d and a belong to the
// tensor core until ptx_wgmma_wait retires the group.
template <bool UA> DEVICE void ptx_wgmma_m64n128k32_s8(int (&d)[64], const u32 (&a)[4], unsigned long long b) {
    if constexpr (UA) {
        SVDQ_WGMMA_M64N128K32("u8");
    } else {
        SVDQ_WGMMA_M64N128K32("s8");
    }
}
#undef SVDQ_WGMMA_M64N128K32
#endif
