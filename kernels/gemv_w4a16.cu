// W4A16 GEMV / small-batch GEMM for the AdaLN modulation layers (M = batch, usually 1 or 2).
//
//   y[m, n] = Σ_k x[m, k] · (code[n, k] · wscale[k/64, n] + wzero[k/64, n]) + bias[n]
//
// computed per (row n, 32-column run) as  wscale · Σ x·code  +  wzero · Σ x  (fp32), which is the
// same sum as svdquant/layers.W4A16Linear.reference_forward, reassociated.
//
// Weight layout (svdquant/packing.pack_awq_qweight, the AWQ/TinyChat GEMV layout): qweight int32
// (N/4, K/2) is, for output rows n = 4·nq + r, [N/4 (nq)][K/64 (kt)][4 (r)][16 int16]. int16 j of
// the 16 holds, for the run of 32 columns 64·kt + 32·(j >> 3), columns 8q + (j & 7) in its nibbles
// q = 0..3 (unsigned codes 0..15). So one row quad's weights for all K are K·2 contiguous bytes and
// each (kt, r) is 32 bytes = two 16-byte runs.
//
// Work split: one warp per row quad nq (4 output rows). Lane l: sub = l & 7 picks row r = sub >> 1
// and run = sub & 1 (one 16-byte load: 8 int16 = the 32 columns of the run), kb = l >> 3 picks the
// 64-column step kt ≡ kb (mod 4). A warp therefore reads 512 contiguous bytes per iteration. The
// lanes of a row are combined with a fixed butterfly (xor 1, 8, 16): deterministic. wscales and
// wzeros are plain (K/64, N) 16-bit matrices; bias is a plain (N,) vector.
#include "common.cuh"

namespace {

constexpr int WARPS = 4;

template <class T, int MB> struct GemvW4A16 {
    static DEVICE void run(const uint4* __restrict__ qweight, const u16* __restrict__ wscales,
                           const u16* __restrict__ wzeros, const u16* __restrict__ bias, const u16* __restrict__ x,
                           u16* __restrict__ y, int M, int N_out, int K, int Np) {
        const int lane = threadIdx.x & 31, nq = blockIdx.x * WARPS + (threadIdx.x >> 5);
        const int sub = lane & 7, r = sub >> 1, run = sub & 1, kb = lane >> 3;
        const int n = 4 * nq + r, m0 = blockIdx.y * MB, steps = K / 64;
        if (4 * nq >= Np) return;

        float acc[MB];
#pragma unroll
        for (int m = 0; m < MB; m++) acc[m] = 0.0f;

        // 16-byte units: a row quad is K/8 units; step kt of row r, run `run` is unit 8·kt + 2·r + run.
        const uint4* wq = qweight + (size_t)nq * (K / 8) + 2 * r + run;
#pragma unroll 4
        for (int kt = kb; kt < steps; kt += 4) {
            const uint4 wv = wq[(size_t)8 * kt];
            const float s = to_f32<T>(wscales[(size_t)kt * Np + n]);
            const float z = to_f32<T>(wzeros[(size_t)kt * Np + n]);
            const u32 words[4] = {wv.x, wv.y, wv.z, wv.w};
            float code[4][8];  // [q][j]: column 8q + j of the run
#pragma unroll
            for (int j = 0; j < 8; j++) {
                const u32 half = words[j >> 1] >> (16 * (j & 1));
#pragma unroll
                for (int q = 0; q < 4; q++)  // exact int → float: 2^23 + c has c in its mantissa
                    code[q][j] = __uint_as_float(0x4B000000u | ((half >> (4 * q)) & 0xFu)) - 8388608.0f;
            }
#pragma unroll
            for (int m = 0; m < MB; m++) {
                if (m0 + m < M) {
                    const u16* xr = x + (size_t)(m0 + m) * K + 64 * kt + 32 * run;
                    float dot = 0.0f, sum = 0.0f;
#pragma unroll
                    for (int q = 0; q < 4; q++) {
                        const uint4 xv = ldg16(xr + 8 * q);
                        const u32 xw[4] = {xv.x, xv.y, xv.z, xv.w};
#pragma unroll
                        for (int j = 0; j < 8; j++) {
                            const float xf = to_f32<T>((u16)(xw[j >> 1] >> (16 * (j & 1))));
                            dot = fmaf(xf, code[q][j], dot);
                            sum += xf;
                        }
                    }
                    acc[m] = fmaf(s, dot, fmaf(z, sum, acc[m]));
                }
            }
        }
#pragma unroll
        for (int m = 0; m < MB; m++) {
            float v = acc[m];
            v += __shfl_xor_sync(0xFFFFFFFFu, v, 1);
            v += __shfl_xor_sync(0xFFFFFFFFu, v, 8);
            v += __shfl_xor_sync(0xFFFFFFFFu, v, 16);
            if (run == 0 && kb == 0 && m0 + m < M && n < N_out) {
                if (bias) v += to_f32<T>(bias[n]);
                y[(size_t)(m0 + m) * N_out + n] = from_f32<T>(v);
            }
        }
    }
};

}  // namespace

// grid (Np / 16, ceil(M / MB)), block 128 (4 warps, one row quad each).
#define SVDQ_GEMV(NAME, T, MB)                                                                              \
    extern "C" __global__ void __launch_bounds__(WARPS * 32) NAME(                                         \
        const uint4* qweight, const u16* wscales, const u16* wzeros, const u16* bias, const u16* x, u16* y, \
        int M, int N_out, int K, int Np) {                                                                  \
        GemvW4A16<T, MB>::run(qweight, wscales, wzeros, bias, x, y, M, N_out, K, Np);                       \
    }

SVDQ_GEMV(svdq_gemv_w4a16_fp16_m1, fp16_t, 1)
SVDQ_GEMV(svdq_gemv_w4a16_fp16_m2, fp16_t, 2)
SVDQ_GEMV(svdq_gemv_w4a16_fp16_m4, fp16_t, 4)
#if __CUDA_ARCH__ >= 800
SVDQ_GEMV(svdq_gemv_w4a16_bf16_m1, bf16_t, 1)
SVDQ_GEMV(svdq_gemv_w4a16_bf16_m2, bf16_t, 2)
SVDQ_GEMV(svdq_gemv_w4a16_bf16_m4, bf16_t, 4)
#endif
