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
// Tiling. CTA tile 256 (rows m) x 128 (columns n), K consumed 64 columns (one INT4 scale group, one
// MMA k) per step. 8 warps as 4 (m) x 2 (n); each warp owns a 64 x 64 output block = 4 row tiles of 16
// (i) x 4 column tiles of 16 (j) x 2 MMA halves of 8 (nh): 32 MMAs per step (the INT4 s8 path walks K
// twice, for two of the column tiles at a time: PASSES below).
//
// No shared memory and no barrier. Kernel 1 and the checkpoint already store every operand in the
// order the MMA wants it per lane (below), so each lane loads its own fragments and scales straight
// from global memory into registers (L1 serves the warps that share a row or column block), and the
// loads of step kt + 1 run under step kt's MMAs: each operand register is reloaded with step kt + 1's
// value right after its last use in step kt. A column tile's B fragments and weight scales are last
// used after its TM row tiles, so their next load has three quarters of a step to land; a row tile's A
// fragments and activation scales are used by every column tile, and their next load (issued during
// the last column tile) was prefetched into L1 at the start of the step. One register set, one step
// per loop iteration: nothing is copied between register sets.
//
// Per step kt, what lane (g, t) = (lane / 4, lane % 4) loads (all loads 8 or 16 bytes, each warp-wide
// load one contiguous block):
//   A   codes[(mtile, kt)][lane], 16 B: its m16n8k64 A fragment of row tile mtile (kernel 1's layout).
//   B   qweight for (n tile, kt): file layout (svdquant/packing.py) [N/128][K/64][8 col tiles][32][16 B]
//       (nt, kt, np, nl, kl, nh, kh, e) = lane 4·nl + kl of column tile np holds words (nh, kh):
//       the B fragments of columns 16·np + 8·nh + nl (two m16n8k64 MMAs, nh = 0, 1).
//   AS  INT4: fp32 [G][Mp], rows g and g + 8 of a row tile at 16·mtile + 2·g (8 B, kernel 1's order)
//       NVFP4: u32 [G][Mp/32][32]: lane's scale-A register of each pair of row tiles.
//   WS  INT4: the file's (K/64, N) wscales are tile-major (svdquant/packing.pack_scales:
//       [N/128][K/64][128]) and within the 128 in packed vector order (n = 16·a + 8·b + 2·c + d at
//       16·a + 4·c + 2·b + d): lane t reads its four columns 2t, 2t+1, 8+2t, 9+2t of column tile a
//       with one 8-byte load.
//       NVFP4: the file's FP8 scales for (n tile, kt), 512 B: lane 4·b + a's word s scales columns
//       32·s + 8·a + b, i.e. 32-column block s, MMA column tile a (thread-id-b = a).
//
// Accumulator element (i, j, nh, e) of lane (g, t) is row 16·i + g + 8·(e >> 1) of the warp block and
// column 16·j + 8·nh + 2t + (e & 1) of its 64 columns.
#include "common.cuh"

namespace {

constexpr int BM = 256, BN = 128, THREADS = 256;
constexpr int TM = 4, TN = 4;                // row / column tiles of 16 per warp
constexpr int WARPS_N = BN / (16 * TN);      // warp w: rows 16·TM·(w / WARPS_N), columns 16·TN·(w % WARPS_N)
static_assert(BM / (16 * TM) * WARPS_N * 32 == THREADS, "the warps tile the CTA");
static_assert(TM % 2 == 0 && TN % 2 == 0, "NVFP4 scale registers: one per pair of row tiles, of column tiles");

template <class T, int MODE> struct Kernel2 {
    static constexpr bool FP4 = MODE == MODE_NVFP4;
    using Mma = Int4Mma<MODE == MODE_INT4_UNSIGNED>;
    // How many times a warp walks K, each time for TJ of its TN column tiles: once where its accumulators
    // and one step's operands fit the 255 registers; twice on the INT4 s8 path, whose A fragments take
    // twice the registers (spread into bytes).
    static constexpr int PASSES = SVDQ_S8_PATH && !FP4 ? 2 : 1, TJ = TN / PASSES;
    using Acc = float[TM][TJ][2][4];

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

    // One step's operands of one lane: A fragments and activation scales per row tile, B fragments and
    // weight scales per column tile.
    struct Operands {
        u32 a[TM][FP4 ? 1 : Mma::A_PARTS][4], b[TJ][4];  // A: as Mma::run takes it
        u32 as[FP4 ? TM / 2 : 2 * TM];  // INT4: fp32 scales of rows g, g + 8 per row tile; NVFP4: scale-A per tile pair
        u32 ws[FP4 ? TJ / 2 : 2 * TJ];  // INT4: four 16-bit scales per column tile; NVFP4: scale-B per 32 columns
    };

    // Where this lane's operands of step 0 are (byte addresses); step kt's are kt steps further. The
    // strides that depend on the shape (row tile to row tile for A, step to step for the activation scales)
    // are read from the arguments where used: kernel parameters, no registers.
    struct Source {
        const u8 *a, *as, *b, *ws;
    };
    static constexpr int A_STEP = 512, B_STEP = BN / 16 * 512, WS_STEP = FP4 ? 512 : 2 * BN;

    // mt: the warp's first row tile (of 16) in the whole matrix; nb: the CTA's column block (of 128) and
    // lt: the warp's first column tile in it.
    static DEVICE Source source(const Args& p, int mt, int nb, int lt, int lane) {
        const int G = p.K / 64;
        Source s;
        s.a = (const u8*)p.codes + ((size_t)mt * G * 32 + lane) * 16;  // [Mp/16][G][32 lanes][16 B]
        // INT4: fp32 [G][Mp] (rows g, g + 8 of tile mt at 16·mt + 2·g); NVFP4: u32 [G][Mp/32][32 lanes].
        s.as = (const u8*)p.ascales + 4 * (16 * mt + (FP4 ? lane : 2 * (lane >> 2)));
        s.b = (const u8*)p.qweight + (size_t)nb * G * B_STEP + (lt * 32 + lane) * 16;  // the 4 KB block (nb, kt)
        // INT4: 16-bit [N/128][G][128], lane t's four of column tile lt at 16·lt + 4·t; NVFP4: 512 B of u32
        // words, 32-column block s of lane l at word 4·l + s.
        s.ws = (const u8*)p.wscales + (size_t)nb * G * WS_STEP +
               (FP4 ? 4 * (4 * lane + lt / 2) : 2 * (16 * lt + 4 * (lane & 3)));
        return s;
    }

    static DEVICE void set4(u32 (&r)[4], uint4 v) {
        r[0] = v.x, r[1] = v.y, r[2] = v.z, r[3] = v.w;
    }

    static DEVICE const u8* a_at(const Args& p, const Source& s, int i, int kt) {
        return s.a + kt * A_STEP + i * (p.K / 64 * A_STEP);  // codes: row tiles K/64 steps apart
    }
    static DEVICE const u8* as_at(const Args& p, const Source& s, int i, int kt) {
        return s.as + kt * (4 * p.Mp) + (FP4 ? 128 * (i / 2) : 64 * i);  // ascales: steps Mp values apart
    }

    static DEVICE void prefetch_row(const Args& p, const Source& s, int i, int kt) {
        prefetch_l1(a_at(p, s, i, kt));
        prefetch_l1(as_at(p, s, i, kt));
    }

    // Row tile i of step kt (NVFP4: with the scale-A of its pair of row tiles, loaded with the second).
    static DEVICE void load_row(Operands& o, const Args& p, const Source& s, int i, int kt) {
        const uint4 a = ldg16(a_at(p, s, i, kt));
        if constexpr (FP4) {
            set4(o.a[i][0], a);
        } else {
            Mma::load_a(o.a[i], a);
        }
        if constexpr (FP4) {
            if (i % 2 == 1) o.as[i / 2] = ldg4(as_at(p, s, i, kt));  // one register per pair of row tiles
        } else {
            const uint2 v = ldg8(as_at(p, s, i, kt));
            o.as[2 * i] = v.x, o.as[2 * i + 1] = v.y;
        }
    }

    // Column tile j of step kt (NVFP4: with the scale-B of its 32 columns, loaded with the second tile).
    static DEVICE void load_col(Operands& o, const Source& s, int j, int kt) {
        set4(o.b[j], ldg16(s.b + kt * B_STEP + 512 * j));
        const u8* ws = s.ws + kt * WS_STEP;
        if constexpr (FP4) {
            if (j % 2 == 1) o.ws[j / 2] = ldg4(ws + 4 * (j / 2));
        } else {
            const uint2 v = ldg8(ws + 32 * j);
            o.ws[2 * j] = v.x, o.ws[2 * j + 1] = v.y;
        }
    }

    // INT4: scales of the columns (nh, e & 1) of a column tile with the psum unit divided out (cs), and
    // -MAGIC·cs. A 16-bit scale has at most 11 significant bits and MAGIC = 1.5·2^23 two, so -MAGIC·cs is
    // exact in fp32 (for any scale below 2^100) and fma(bits, cs, -MAGIC·cs) = round(psum·cs): the
    // int → float conversion costs nothing, each element needs two FFMAs per group.
    struct ColScales {
        float cs[4], magic_cs[4];
    };

    static DEVICE ColScales col_scales(const Operands& o, int j) {
        ColScales c;
#pragma unroll
        for (int e = 0; e < 4; e++) {
            c.cs[e] = to_f32<T>((u16)(o.ws[2 * j + (e >> 1)] >> (16 * (e & 1)))) / Mma::PSUM_UNIT;
            c.magic_cs[e] = -SVDQ_MAGIC_F * c.cs[e];
        }
        return c;
    }

    // Row tile i x column tile j of one 64-column step: 2 MMAs and, for INT4, the per-group dequantisation.
    static DEVICE void compute(const Operands& o, int i, int j, const ColScales& c, Acc& acc) {
#pragma unroll
        for (int nh = 0; nh < 2; nh++) {
            if constexpr (FP4) {
#if __CUDA_ARCH__ >= 1200
                mma_fp4(acc[i][j][nh], o.a[i][0], o.b[j][2 * nh], o.b[j][2 * nh + 1], o.as[i >> 1], (u16)(i & 1),
                        o.ws[j >> 1], (u16)(2 * (j & 1) + nh));
#endif
            } else {
                int psum[4];
                Mma::run(psum, o.a[i], o.b[j][2 * nh], o.b[j][2 * nh + 1], SVDQ_MAGIC_BITS);
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int k = 2 * nh + (e & 1);
                    const float col = fmaf(__int_as_float(psum[e]), c.cs[k], c.magic_cs[k]);
                    acc[i][j][nh][e] = fmaf(col, __uint_as_float(o.as[2 * i + (e >> 1)]), acc[i][j][nh][e]);
                }
            }
        }
    }

    // One 64-column step with `o`, each operand replaced by step kt_next's right after its last use.
    static DEVICE void step(Operands& o, Acc& acc, const Args& p, const Source& s, int kt_next) {
#pragma unroll
        for (int i = 0; i < TM; i++) prefetch_row(p, s, i, kt_next);
#pragma unroll
        for (int j = 0; j < TJ; j++) {
            const ColScales c = FP4 ? ColScales{} : col_scales(o, j);
#pragma unroll
            for (int i = 0; i < TM; i++) {
                compute(o, i, j, c, acc);
                if (j == TJ - 1) load_row(o, p, s, i, kt_next);
            }
            load_col(o, s, j, kt_next);
        }
    }

    // acc += lora_act · proj_upᵀ over the whole rank (m16n8k16, fp32 accumulate). Fragments come
    // straight from global memory (L2): each is one 16-byte load, used by TJ or TM MMA pairs.
    static DEVICE void branch_up(Acc& acc, const Args& p, int mt, int nt, int lane) {
        const int RT = p.R / 16;
        for (int rt = 0; rt < RT; rt++) {
            u32 la[TM][4], up[TJ][4];
#pragma unroll
            for (int i = 0; i < TM; i++)
                set4(la[i], ldg16(p.lora_act + (((size_t)(mt + i) * RT + rt) * 32 + lane) * 4));
#pragma unroll
            for (int j = 0; j < TJ; j++) set4(up[j], ldg16(p.proj_up + (((size_t)(nt + j) * RT + rt) * 32 + lane) * 4));
#pragma unroll
            for (int i = 0; i < TM; i++)
#pragma unroll
                for (int j = 0; j < TJ; j++)
#pragma unroll
                    for (int nh = 0; nh < 2; nh++) mma_16816<T>(acc[i][j][nh], la[i], up[j][2 * nh], up[j][2 * nh + 1]);
        }
    }

    // Four consecutive values of a packed per-channel vector: columns 2t, 2t+1, 8+2t, 9+2t of column
    // tile nt (of 16), in the order (nh, e & 1) of the accumulator.
    static DEVICE void load_vec4(float (&out)[4], const u16* v, int nt, int t) {
        const uint2 raw = ldg8(v + 16 * nt + 4 * t);
        const u32 h[2] = {raw.x, raw.y};
#pragma unroll
        for (int e = 0; e < 4; e++) out[e] = to_f32<T>((u16)(h[e >> 1] >> (16 * (e & 1))));
    }

    // The warp's rows (first row tile mt) times TJ column tiles from nt on (ct: the first of them within the
    // CTA's 128 columns, nb: the CTA's column block): the whole K loop and the epilogue.
    static DEVICE void pass(const Args& p, int mt, int nb, int ct, int lane) {
        const int nt = BN / 16 * nb + ct, steps = p.K / 64;
        Acc acc;
#pragma unroll
        for (int i = 0; i < TM; i++)
#pragma unroll
            for (int j = 0; j < TJ; j++)
#pragma unroll
                for (int e = 0; e < 8; e++) acc[i][j][e >> 2][e & 3] = 0.0f;

        const Source src = source(p, mt, nb, ct, lane);
        Operands o;
#pragma unroll
        for (int i = 0; i < TM; i++) load_row(o, p, src, i, 0);
#pragma unroll
        for (int j = 0; j < TJ; j++) load_col(o, src, j, 0);
        // INT4: the branch is independent of the main sum; run it while the first step loads.
        if constexpr (!FP4) branch_up(acc, p, mt, nt, lane);

        // The last step's loads re-read it rather than run past the end.
        for (int kt = 0; kt < steps; kt++) step(o, acc, p, src, min(kt + 1, steps - 1));

        const int t = lane & 3;
        if constexpr (FP4) {
            // The block-scaled MMA applied the FP8 scales; the per-channel and per-tensor factors remain.
            const float tensor_scale = *p.wtscale;
#pragma unroll
            for (int j = 0; j < TJ; j++) {
                float cs[4];
                load_vec4(cs, p.wcscales, nt + j, t);
#pragma unroll
                for (int i = 0; i < TM; i++)
#pragma unroll
                    for (int e = 0; e < 8; e++) acc[i][j][e >> 2][e & 3] *= cs[2 * (e >> 2) + (e & 1)] * tensor_scale;
            }
            branch_up(acc, p, mt, nt, lane);
        }

        // Epilogue: bias, round to 16 bits, store the rows < M and columns < N_out.
#pragma unroll
        for (int j = 0; j < TJ; j++) {
            float bias[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            if (p.bias) load_vec4(bias, p.bias, nt + j, t);
#pragma unroll
            for (int i = 0; i < TM; i++)
#pragma unroll
                for (int nh = 0; nh < 2; nh++)
#pragma unroll
                    for (int h = 0; h < 2; h++) {
                        const int row = 16 * (mt + i) + 8 * h + (lane >> 2);
                        const int col = 16 * (nt + j) + 8 * nh + 2 * t;
                        const float v0 = acc[i][j][nh][2 * h] + bias[2 * nh];
                        const float v1 = acc[i][j][nh][2 * h + 1] + bias[2 * nh + 1];
                        store_pair<T>(p.y, p.M, p.N_out, row, col, v0, v1);
                    }
        }
    }

    static DEVICE void run(const Args& p) {
        const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
        const int wm = warp / WARPS_N, wn = warp % WARPS_N;
        // consecutive CTAs (blockIdx.x) share the rows of A
#pragma unroll 1
        for (int k = 0; k < PASSES; k++) pass(p, BM / 16 * blockIdx.y + TM * wm, blockIdx.x, TN * wn + TJ * k, lane);
    }
};

}  // namespace

// grid (N / 128, Mp / 256), block 256, no shared memory.
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
