// Kernel 2 of an SVDQuant W4A4 layer: the 4-bit GEMM with everything else fused into it.
//
//   y[m, n] = Σ_groups (psum(m, n, grp) · wscale[grp, n]) · ascale[m, grp]   (INT4, 64-column groups)
//           | (Σ_k e2m1 products with block scales) · wcscales[n] · wtscale  (NVFP4, block-scaled MMA)
//           + Σ_r lora_act[m, r] · proj_up[n, r]                           (low-rank branch, fp32 acc)
//           + bias[n]                                                      → 16-bit y (M, N)
//
// Inputs are the buffers of the checkpoint as they are (qweight, wscales, bias, wcscales, proj_up:
// no repacking) plus kernel 1's outputs (see quantize.cu for their layouts). Nothing is reduced
// across CTAs: every output element is produced by one thread in a fixed order (deterministic).
//
// Tiling. CTA tile 128 (rows m) x 128 (columns n), K consumed 64 columns (one INT4 scale group, one
// MMA k) per step through a 4-stage cp.async pipeline. 8 warps as 2 (m) x 4 (n); each warp owns a
// 64 x 32 output block = 4 row tiles of 16 (i) x 2 column tiles of 16 (j) x 2 MMA halves of 8 (nh).
//
// Shared-memory stage (one 64-column step kt, all reads below are 16-byte conflict-free rows):
//   sA  [8 row tiles][32 lanes][16 B]  codes[(mtile, kt)], each lane's m16n8k64 A fragment
//   sB  [8 col tiles][32 lanes][16 B]  qweight for (n tile, kt): file layout (svdquant/packing.py)
//       (nt, kt, np, nl, kl, nh, kh, e) = lane 4·nl + kl of column tile np holds words (nh, kh):
//       the B fragments of columns 16·np + 8·nh + nl (two m16n8k64 MMAs, nh = 0, 1).
//   sAS 512 B   INT4: 128 fp32 row scales (kernel 1's order, 16·i + 2·g + h = row 16·i + 8·h + g)
//               NVFP4: 4 x 32 scale-A registers, one per pair of row tiles
//   sWS 512 B   INT4: 128 16-bit column scales of (n tile, kt). The file's (K/64, N) wscales are
//               tile-major (svdquant/packing.pack_scales: [N/128][K/64][128]) and within the 128 in
//               packed vector order (n = 16·a + 8·b + 2·c + d at 16·a + 4·c + 2·b + d: lane t reads its
//               four columns 2t, 2t+1, 8+2t, 9+2t of column tile a with one 8-byte load)
//               NVFP4: the file's FP8 scales for (n tile, kt): lane 4·b + a's word s scales columns
//               32·s + 8·a + b, i.e. warp column block s, MMA column tile a (thread-id-b = a).
//
// Accumulator element (i, j, nh, e) of lane (g, t) is row 16·i + g + 8·(e >> 1) of the warp block and
// column 16·j + 8·nh + 2t + (e & 1) of its 32 columns.
#include "common.cuh"

namespace {

constexpr int BM = 128, BN = 128, STAGES = 4, THREADS = 256;

struct Stage {
    uint4 a[BM / 16][32];
    uint4 b[BN / 16][32];
    uint4 as[32];  // 512 bytes of activation scales
    uint4 ws[32];  // 512 bytes of weight scales (INT4 uses the first 256)
};

template <class T, int MODE> struct Kernel2 {
    static constexpr bool FP4 = MODE == MODE_NVFP4;
    using Mma = Int4Mma<MODE == MODE_INT4_UNSIGNED>;

    struct Args {
        const u32* codes;     // kernel 1
        const void* ascales;  // kernel 1
        const u32* qweight;   // (N, K/2) int8 in the file = u32 [N/128][K/64][8][32][4]
        const void* wscales;  // INT4: 16-bit (K/64, N), NVFP4: fp8 (K/16, N); both [N/128][K/64][512 B]
        const u32* lora_act;  // kernel 1, [Mp/16][R/16][32][4]
        const u32* proj_up;   // (N, R) 16-bit packed = [N/16][R/16][32 lanes][4 words]
        const u16* bias;      // (N,) packed vector, or null
        const u16* wcscales;  // NVFP4: (N,) packed vector
        const float* wtscale; // NVFP4: [1], fp32 whatever the file stored (bf16 and fp16 values are exact in it)
        u16* y;               // (M, N_out) row-major
        int M, N_out, K, R, Mp;
    };

    // Copy step kt of this CTA's tiles into stage `s` (all 16-byte cp.async, 2 or 3 per thread).
    static DEVICE void load_stage(Stage& s, const Args& p, int mb, int nb, int kt, int tid) {
        const int G = p.K / 64;
        // A: tile (8·mb + tid/32, kt), lane tid%32: kernel 1 wrote [mtile][G][32][4].
        cp_async16(&s.a[0][0] + tid, p.codes + (((size_t)(8 * mb + tid / 32) * G + kt) * 32 + tid % 32) * 4, true);
        // B: the 4 KB block (nb, kt) of qweight is contiguous.
        cp_async16(&s.b[0][0] + tid, p.qweight + (((size_t)nb * G + kt) * 8 * 32 + tid) * 4, true);
        if (tid < 32) {
            // INT4: f32 [G][Mp]; NVFP4: u32 [G][Mp/32][32]. Either way 512 contiguous bytes.
            const u32* src = (const u32*)p.ascales + (size_t)kt * p.Mp + BM * mb;
            cp_async16(&s.as[tid], src + 4 * tid, true);
        } else if (tid < 64) {
            const int i = tid - 32;
            if constexpr (FP4) {
                const u8* src = (const u8*)p.wscales + ((size_t)nb * G + kt) * 512;
                cp_async16(&s.ws[i], src + 16 * i, true);
            } else if (i < 16) {
                // The (K/64, N) tensor is tile-major: 128 values per (n tile, group), contiguous.
                const u16* src = (const u16*)p.wscales + ((size_t)nb * G + kt) * BN;
                cp_async16(&s.ws[i], src + 8 * i, true);
            }
        }
    }

    // One 64-column step: 16 MMAs per warp and, for INT4, the per-group dequantisation.
    static DEVICE void compute(const Stage& s, float (&acc)[4][2][2][4], int wm, int wn, int lane) {
        const int g = lane >> 2, t = lane & 3;
        u32 a[4][4], b[2][4];
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const uint4 v = s.a[4 * wm + i][lane];
            a[i][0] = v.x, a[i][1] = v.y, a[i][2] = v.z, a[i][3] = v.w;
        }
#pragma unroll
        for (int j = 0; j < 2; j++) {
            const uint4 v = s.b[2 * wn + j][lane];
            b[j][0] = v.x, b[j][1] = v.y, b[j][2] = v.z, b[j][3] = v.w;
        }
        if constexpr (FP4) {
#if __CUDA_ARCH__ >= 1200
            const u32* as = (const u32*)s.as;
            const u32 sfa[2] = {as[(2 * wm + 0) * 32 + lane], as[(2 * wm + 1) * 32 + lane]};
            const u32 sfb = ((const u32*)s.ws)[4 * lane + wn];
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int j = 0; j < 2; j++)
#pragma unroll
                    for (int nh = 0; nh < 2; nh++)
                        mma_fp4(acc[i][j][nh], a[i], b[j][2 * nh], b[j][2 * nh + 1], sfa[i >> 1], (u16)(i & 1), sfb,
                                (u16)(2 * j + nh));
#endif
        } else {
            const float* as = (const float*)s.as;
            const u16* ws = (const u16*)s.ws;
            float2 rs[4];  // scales of rows g, g + 8 of each row tile
#pragma unroll
            for (int i = 0; i < 4; i++) rs[i] = *(const float2*)&as[16 * (4 * wm + i) + 2 * g];
            // Scales of columns (nh, e & 1) of each column tile with the psum unit divided out (cs), and
            // -MAGIC·cs. A 16-bit scale has at most 11 significant bits and MAGIC = 1.5·2^23 two, so
            // -MAGIC·cs is exact in fp32 (for any scale below 2^100) and fma(bits, cs, -MAGIC·cs) =
            // round(psum·cs): the int → float conversion costs nothing, each element needs two FFMAs
            // per group.
            float cs[2][4], magic_cs[2][4];
#pragma unroll
            for (int j = 0; j < 2; j++) {
                const uint2 v = *(const uint2*)&ws[16 * (2 * wn + j) + 4 * t];
                const u32 h[2] = {v.x, v.y};
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    cs[j][e] = to_f32<T>((u16)(h[e >> 1] >> (16 * (e & 1)))) / Mma::PSUM_UNIT;
                    magic_cs[j][e] = -SVDQ_MAGIC_F * cs[j][e];
                }
            }
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int j = 0; j < 2; j++)
#pragma unroll
                    for (int nh = 0; nh < 2; nh++) {
                        int psum[4];
                        Mma::run(psum, a[i], b[j][2 * nh], b[j][2 * nh + 1], SVDQ_MAGIC_BITS);
#pragma unroll
                        for (int e = 0; e < 4; e++) {
                            const int c = 2 * nh + (e & 1);
                            const float col = fmaf(__int_as_float(psum[e]), cs[j][c], magic_cs[j][c]);
                            acc[i][j][nh][e] = fmaf(col, (e >> 1) ? rs[i].y : rs[i].x, acc[i][j][nh][e]);
                        }
                    }
        }
    }

    // acc += lora_act · proj_upᵀ over the whole rank (m16n8k16, fp32 accumulate). Fragments come
    // straight from global memory (L2): each is one 16-byte load, used by 4 MMAs.
    static DEVICE void branch_up(float (&acc)[4][2][2][4], const Args& p, int mb, int nb, int wm, int wn, int lane) {
        const int RT = p.R / 16;
        for (int rt = 0; rt < RT; rt++) {
            u32 la[4][4], up[2][4];
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const uint4 v = ldg16(p.lora_act + (((size_t)(8 * mb + 4 * wm + i) * RT + rt) * 32 + lane) * 4);
                la[i][0] = v.x, la[i][1] = v.y, la[i][2] = v.z, la[i][3] = v.w;
            }
#pragma unroll
            for (int j = 0; j < 2; j++) {
                const uint4 v = ldg16(p.proj_up + (((size_t)(8 * nb + 2 * wn + j) * RT + rt) * 32 + lane) * 4);
                up[j][0] = v.x, up[j][1] = v.y, up[j][2] = v.z, up[j][3] = v.w;
            }
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int j = 0; j < 2; j++)
#pragma unroll
                    for (int nh = 0; nh < 2; nh++) mma_16816<T>(acc[i][j][nh], la[i], up[j][2 * nh], up[j][2 * nh + 1]);
        }
    }

    // Four consecutive values of a packed per-channel vector: columns 2t, 2t+1, 8+2t, 9+2t of the
    // warp's column tile j, in the order (nh, e & 1) of the accumulator.
    static DEVICE void load_vec4(float (&out)[4], const u16* v, int nb, int wn, int j, int t) {
        const uint2 raw = ldg8(v + BN * nb + 16 * (2 * wn + j) + 4 * t);
        const u32 h[2] = {raw.x, raw.y};
#pragma unroll
        for (int e = 0; e < 4; e++) out[e] = to_f32<T>((u16)(h[e >> 1] >> (16 * (e & 1))));
    }

    static DEVICE void run(const Args& p) {
        __shared__ __align__(16) Stage stages[STAGES];
        const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
        const int wm = warp >> 2, wn = warp & 3;
        const int nb = blockIdx.x, mb = blockIdx.y;  // consecutive CTAs share the rows of A
        const int steps = p.K / 64;

        float acc[4][2][2][4];
#pragma unroll
        for (int i = 0; i < 4; i++)
#pragma unroll
            for (int j = 0; j < 2; j++)
#pragma unroll
                for (int e = 0; e < 8; e++) acc[i][j][e >> 2][e & 3] = 0.0f;

#pragma unroll
        for (int s = 0; s < STAGES - 1; s++) {
            if (s < steps) load_stage(stages[s], p, mb, nb, s, tid);
            cp_async_commit();  // empty groups keep the wait count uniform
        }
        // INT4: the branch is independent of the main sum; run it while the first stages load.
        if constexpr (!FP4) branch_up(acc, p, mb, nb, wm, wn, lane);

        for (int kt = 0; kt < steps; kt++) {
            cp_async_wait<STAGES - 2>();
            __syncthreads();  // stage kt landed for everyone; stage kt-1 is no longer read
            const int next = kt + STAGES - 1;
            if (next < steps) load_stage(stages[next % STAGES], p, mb, nb, next, tid);
            cp_async_commit();
            compute(stages[kt % STAGES], acc, wm, wn, lane);
        }

        if constexpr (FP4) {
            // The block-scaled MMA applied the FP8 scales; the per-channel and per-tensor factors remain.
            const float tensor_scale = *p.wtscale;
#pragma unroll
            for (int j = 0; j < 2; j++) {
                float cs[4];
                load_vec4(cs, p.wcscales, nb, wn, j, t);
#pragma unroll
                for (int i = 0; i < 4; i++)
#pragma unroll
                    for (int e = 0; e < 8; e++) acc[i][j][e >> 2][e & 3] *= cs[2 * (e >> 2) + (e & 1)] * tensor_scale;
            }
            branch_up(acc, p, mb, nb, wm, wn, lane);
        }

        // Epilogue: bias, round to 16 bits, store the rows < M and columns < N_out.
        const bool pairs = (p.N_out & 1) == 0;  // 4-byte stores need an even row length
#pragma unroll
        for (int j = 0; j < 2; j++) {
            float bias[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            if (p.bias) load_vec4(bias, p.bias, nb, wn, j, t);
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int nh = 0; nh < 2; nh++)
#pragma unroll
                    for (int h = 0; h < 2; h++) {
                        const int row = BM * mb + 64 * wm + 16 * i + 8 * h + g;
                        const int col = BN * nb + 32 * wn + 16 * j + 8 * nh + 2 * t;
                        const float v0 = acc[i][j][nh][2 * h] + bias[2 * nh];
                        const float v1 = acc[i][j][nh][2 * h + 1] + bias[2 * nh + 1];
                        if (row >= p.M || col >= p.N_out) continue;
                        u16* out = p.y + (size_t)row * p.N_out + col;
                        if (pairs) {
                            *(u32*)out = pack2<T>(v0, v1);
                        } else {
                            out[0] = from_f32<T>(v0);
                            if (col + 1 < p.N_out) out[1] = from_f32<T>(v1);
                        }
                    }
        }
    }
};

}  // namespace

// grid (N / 128, Mp / 128), block 256, static shared memory (4 stages x 9 KB).
#define SVDQ_GEMM(NAME, T, MODE)                                                                              \
    extern "C" __global__ void __launch_bounds__(THREADS, 1) NAME(                                           \
        const u32* codes, const void* ascales, const u32* qweight, const void* wscales, const u32* lora_act, \
        const u32* proj_up, const u16* bias, const u16* wcscales, const float* wtscale, u16* y, int M,       \
        int N_out, int K, int R, int Mp) {                                                                   \
        Kernel2<T, MODE>::run({codes, ascales, qweight, wscales, lora_act, proj_up, bias, wcscales, wtscale,  \
                               y, M, N_out, K, R, Mp});                                                      \
    }

#if defined(SVDQ_FAMILY_INT4)
SVDQ_GEMM(svdq_gemm_int4_fp16, fp16_t, MODE_INT4)
SVDQ_GEMM(svdq_gemm_uint4_fp16, fp16_t, MODE_INT4_UNSIGNED)
#if __CUDA_ARCH__ >= 800
SVDQ_GEMM(svdq_gemm_int4_bf16, bf16_t, MODE_INT4)
SVDQ_GEMM(svdq_gemm_uint4_bf16, bf16_t, MODE_INT4_UNSIGNED)
#endif
#endif

#if defined(SVDQ_FAMILY_NVFP4)
SVDQ_GEMM(svdq_gemm_nvfp4_fp16, fp16_t, MODE_NVFP4)
SVDQ_GEMM(svdq_gemm_nvfp4_bf16, bf16_t, MODE_NVFP4)
#endif
