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
// Work split: one warp per row quad nq (4 output rows), 4 warps per CTA. Lane l: sub = l & 7 picks row
// r = sub >> 1 and run = sub & 1 (one 16-byte load: 8 int16 = the 32 columns of the run), kb = l >> 3
// picks the 64-column steps kt ≡ kb (mod 4): a warp reads 512 contiguous bytes per step. K is walked in
// slabs of 2048 columns. Per slab a lane first issues all its loads (8 x 16 bytes of weights, with their
// scales and zeros: 4 KB per warp in flight, with no dependence between them), then the CTA stages the
// slab of x once in shared memory as fp32 with the sum of each 32-column run (a run's Σ x serves all N
// rows), then the lane multiplies. Bytes in flight: the modulation shapes (N = 9216 .. 18432, K = 3072)
// give 576 to 1152 CTAs, 4+ per SM on 132 SMs, so ≥ 64 KB of weight loads in flight per SM, more than
// the ~36 KB an H200 needs to cover its latency at full bandwidth (4.8 TB/s x ~1 µs / 132 SMs): the
// kernel streams the weights (a quarter of bf16's bytes) at the memory's rate, so it cannot be slower
// than bf16 F.linear. The lanes of a row are combined with a fixed butterfly (xor 1, 8, 16):
// deterministic. wscales and wzeros are plain (K/64, N) 16-bit matrices; bias is a plain (N,) vector.
#include "common.cuh"

namespace {

constexpr int WARPS = 4;
constexpr int SLAB = 2048;                   // columns of x staged at a time
constexpr int STEPS_PER_LANE = SLAB / 64 / 4;  // 64-column steps of a slab per lane (4 lanes share a row run)
constexpr int RUN_PAD = 4;                    // floats after every 32-column run: the 8 runs a warp reads at
                                              // once start in different banks

DEVICE int xpos(int c) {  // position of slab column c in the padded fp32 row
    return c + (c >> 5) * RUN_PAD;
}

template <int MB> struct GemvShared {
    float x[MB][SLAB + SLAB / 32 * RUN_PAD];
    float sum[MB][SLAB / 32];  // Σ x over each 32-column run
};

template <class T, int MB> struct GemvW4A16 {
    // The code of each column of a 16-byte run, scaled: nibble q of a 16-bit word ends up as code · 16^q,
    // exact in fp32 with one AND-OR and one subtraction (no shift). d[m][q] collects the products of
    // nibble q (columns 8q..8q+7 of the run) and is scaled back by 16^-q once per run.
    static DEVICE void dot(float (&d)[MB][4], const uint4& wv, const GemvShared<MB>& sm, int c0) {
        const u32 words[4] = {wv.x, wv.y, wv.z, wv.w};
#pragma unroll
        for (int q = 0; q < 4; q++) {
            float xs[MB][8];  // columns 8q .. 8q + 7 of the run: two 16-byte shared loads per row
#pragma unroll
            for (int m = 0; m < MB; m++) {
                const float4* src = (const float4*)&sm.x[m][xpos(c0) + 8 * q];
                const float4 lo = src[0], hi = src[1];
                xs[m][0] = lo.x, xs[m][1] = lo.y, xs[m][2] = lo.z, xs[m][3] = lo.w;
                xs[m][4] = hi.x, xs[m][5] = hi.y, xs[m][6] = hi.z, xs[m][7] = hi.w;
            }
#pragma unroll
            for (int j = 0; j < 8; j++) {  // int16 j of the run (word j >> 1, half j & 1): column 8q + j
                const u32 half = j & 1 ? words[j >> 1] >> 16 : words[j >> 1];
                const float code = __uint_as_float((half & (0xFu << (4 * q))) | 0x4B000000u) - 8388608.0f;
#pragma unroll
                for (int m = 0; m < MB; m++) d[m][q] = fmaf(xs[m][j], code, d[m][q]);
            }
        }
    }

    static DEVICE void run(const uint4* __restrict__ qweight, const u16* __restrict__ wscales,
                           const u16* __restrict__ wzeros, const u16* __restrict__ bias, const u16* __restrict__ x,
                           u16* __restrict__ y, int M, int N_out, int K, int Np) {
        __shared__ __align__(16) GemvShared<MB> sm;
        const int tid = threadIdx.x, lane = tid & 31, nq = blockIdx.x * WARPS + (tid >> 5);
        const int sub = lane & 7, r = sub >> 1, run = sub & 1, kb = lane >> 3;
        const int n = 4 * nq + r, m0 = blockIdx.y * MB, steps = K / 64;
        const bool active = 4 * nq < Np;  // no early return: the CTA meets at barriers

        float acc[MB];
#pragma unroll
        for (int m = 0; m < MB; m++) acc[m] = 0.0f;

        // 16-byte units: a row quad is K/8 units; step kt of row r, run `run` is unit 8·kt + 2·r + run.
        const uint4* wq = qweight + (size_t)nq * (K / 8) + 2 * r + run;
        for (int k0 = 0; k0 < K; k0 += SLAB) {
            uint4 wv[STEPS_PER_LANE];
            u16 sv[STEPS_PER_LANE], zv[STEPS_PER_LANE];
#pragma unroll
            for (int i = 0; i < STEPS_PER_LANE; i++) {
                const int kt = k0 / 64 + kb + 4 * i;
                const bool ok = active && kt < steps;
                wv[i] = ok ? ldg16(wq + (size_t)8 * kt) : make_uint4(0, 0, 0, 0);
                sv[i] = ok ? ldg2(wscales + (size_t)kt * Np + n) : (u16)0;
                zv[i] = ok ? ldg2(wzeros + (size_t)kt * Np + n) : (u16)0;
            }

            __syncthreads();  // the previous slab's x is no longer read
            for (int c = tid; c < MB * (SLAB / 8); c += WARPS * 32) {
                const int m = c / (SLAB / 8), col = 8 * (c % (SLAB / 8));
                const bool ok = m0 + m < M && k0 + col < K;
                // a plain load (not ldg16's non-coherent one): CI tells the weight loads apart by it
                const uint4 raw = ok ? *(const uint4*)(x + (size_t)(m0 + m) * K + k0 + col) : make_uint4(0, 0, 0, 0);
                const u32 w[4] = {raw.x, raw.y, raw.z, raw.w};
                float* dst = &sm.x[m][xpos(col)];
#pragma unroll
                for (int e = 0; e < 8; e++) dst[e] = to_f32<T>((u16)(w[e >> 1] >> (16 * (e & 1))));
            }
            __syncthreads();
            for (int c = tid; c < MB * (SLAB / 32); c += WARPS * 32) {
                const int m = c / (SLAB / 32), j = c % (SLAB / 32);
                float s = 0.0f;
#pragma unroll
                for (int e = 0; e < 32; e++) s += sm.x[m][xpos(32 * j) + e];
                sm.sum[m][j] = s;
            }
            __syncthreads();

#pragma unroll
            for (int i = 0; i < STEPS_PER_LANE; i++) {
                const int c0 = 64 * (kb + 4 * i) + 32 * run;  // the run's first column in the slab
                if (k0 + c0 >= K) break;
                float d[MB][4];
#pragma unroll
                for (int m = 0; m < MB; m++)
#pragma unroll
                    for (int q = 0; q < 4; q++) d[m][q] = 0.0f;
                dot(d, wv[i], sm, c0);
                const float s = to_f32<T>(sv[i]), z = to_f32<T>(zv[i]);
#pragma unroll
                for (int m = 0; m < MB; m++) {
                    const float prod =
                        fmaf(d[m][3], 1.0f / 4096, fmaf(d[m][2], 1.0f / 256, fmaf(d[m][1], 1.0f / 16, d[m][0])));
                    acc[m] = fmaf(s, prod, fmaf(z, sm.sum[m][c0 / 32], acc[m]));
                }
            }
        }
#pragma unroll
        for (int m = 0; m < MB; m++) {
            float v = acc[m];
            v += __shfl_xor_sync(0xFFFFFFFFu, v, 1);
            v += __shfl_xor_sync(0xFFFFFFFFu, v, 8);
            v += __shfl_xor_sync(0xFFFFFFFFu, v, 16);
            if (active && run == 0 && kb == 0 && m0 + m < M && n < N_out) {
                if (bias) v += to_f32<T>(bias[n]);
                y[(size_t)(m0 + m) * N_out + n] = from_f32<T>(v);
            }
        }
    }
};

}  // namespace

// grid (Np / 16, ceil(M / MB)), block 128 (4 warps, one row quad each). At least 4 CTAs per SM for one or
// two rows (at most 128 registers): 64 KB of weight loads in flight per SM; 2 for four rows.
#define SVDQ_GEMV(NAME, T, MB)                                                                              \
    extern "C" __global__ void __launch_bounds__(WARPS * 32, MB < 4 ? 4 : 2) NAME(                         \
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
