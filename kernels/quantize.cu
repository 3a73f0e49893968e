// Kernel 1 of an SVDQuant W4A4 layer: quantize the activations and run the low-rank branch's
// down-projection, reading the 16-bit input once.
//
//   x (M, Kx) 16-bit, rows ldx elements apart: a view into a wider tensor needs no copy (FLUX's linear2
//     reads two column ranges of one input). Columns Kx..K-1 read as zero, so an in_features that is
//     not a multiple of 128 needs no padded copy either (K = the padded in_features, a multiple of 128;
//     Kx and ldx multiples of 8 and x 16-byte aligned, for the 16-byte loads).
//   → codes     4-bit activations, as m16n8k64 A fragments          (what kernel 2 multiplies)
//   → ascales   per token per group scales, in the lanes kernel 2 needs them
//   → lora_act  round16(x · proj_down), as m16n8k16 A fragments    (kernel 2's branch-up input)
//
// Numerics are those of svdquant/int4.py and svdquant/nvfp4.py, one IEEE fp32 operation at a time:
//   INT4 signed:    v = x / smooth;            scale = absmax64(v) / 7;        code = rint(v / scale) in [-8, 7]
//   INT4 unsigned:  v = (x + 0.171875) / smooth; scale = max(max64(v), 0) / 15; code in [0, 15]
//   NVFP4:          v = x / smooth;            scale = e4m3(absmax16(v) / 6);  code = e2m1(v / scale)
// (a zero scale gives zero codes). Every quotient is the IEEE-rounded one, but no element pays a division:
// each divisor's reciprocal is computed once (a smoothing factor once per CTA, a scale once per group
// row) and each quotient is a multiply and two FMAs (common.cuh, Divisor), bit for bit the quotient
// the PyTorch reference divides out. So codes and scales are bit-identical to the reference, except
// below 2^-100 (bf16 activations only; CuPy's RawModule compiles with -ftz=true whatever it is given,
// so fp32 subnormals flush to zero anyway). The branch uses the raw x (not x/smooth: proj_down is
// stored pre-divided), accumulates in fp32 and rounds once to 16 bits.
//
// Work split. A CTA (4 warps) owns one 16-row tile (mt) and one range of K: blockIdx.y of gridDim.y
// equal runs of 256-column chunks. One CTA walking all of K for its rows gave too few CTAs (288 at
// FLUX's 4608 tokens, 32 at 512) to keep an H200's memory busy (0.4 TB/s); the backend picks gridDim.y
// so that about a thousand CTAs share the GPU. A CTA stages its chunks through shared memory with
// cp.async, STAGES in flight. In a chunk, warp w owns the 64-column group 4·chunk + w: it quantizes it
// (CTAs with blockIdx.z = 0 only) and multiplies it with proj_down for up to 4 rank tiles of 16 (rank
// tiles 4·blockIdx.z .. 4·blockIdx.z + 3: ranks above 64, such as a checkpoint's 32 grown by LoRAs, use
// more CTAs along z instead of more registers). The four warps' branch sums are added in shared memory
// in a fixed order (warp 0 + 1 + 2 + 3). With one K range the CTA rounds them into lora_act; with
// several it stores them in fp32 after lora_act (partial, below) and svdq_quantize_branch_sum adds the
// ranges in order 0, 1, 2 ... and rounds: bitwise reproducible either way, and kernel 2 reads lora_act
// only, as it always did.
//
// Output layouts (Mp = M rounded up to kernel 2's rows per CTA, backend.py; G = K / 64). Everything is
// written, the padded rows M..Mp-1 as the quantization of zero input, so kernel 2 reads no uninitialized memory:
//   codes    u32 [Mp/16][G][32 lanes][4]: lane (g, t) of tile (mt, group) holds
//            word 0: row g,     columns 8t..8t+7     word 1: row g + 8, columns 8t..8t+7
//            word 2: row g,     columns 32+8t..+7    word 3: row g + 8, columns 32+8t..+7
//            nibble e of a word = column (8t or 32+8t) + e: exactly the m16n8k64 A fragment.
//   ascales  INT4:  f32 [G][Mp], row r = 16·mt + 8·h + g stored at 16·mt + 2·g + h, so the lane
//            that holds rows g and g + 8 in kernel 2 reads both with one 8-byte load.
//            NVFP4: u32 [G][Mp/32][32 lanes]: the block-scaled MMA's scale-A register. For the pair
//            of row tiles (2p, 2p + 1), lane (g, t) holds the four E4M3 scales (byte q: columns
//            16q..16q+15 of the group) of row 16·(2p + (t >> 1)) + 8·(t & 1) + g.
//   lora_act u32 [Mp/16][R/16][32 lanes][4]: the 16x16 tile (mt, rank tile) as an m16n8k16 A
//            fragment: word 0 = (row g, ranks 2t, 2t+1), word 1 = (row g+8, 2t..), word 2 = (row g,
//            8+2t..), word 3 = (row g+8, 8+2t..), low half = lower rank.
//   partial  f32 [gridDim.y][Mp/16][R/16][32 lanes][8], only when gridDim.y > 1, at lora_act + Mp·R/2
//            words: a K range's branch sums, element e of a lane = accumulator e & 3 of 8-rank half e >> 2.
#include "common.cuh"

namespace {

constexpr int ROWS = 16, WARPS = 4, CHUNK = 256, SEGS = CHUNK / 8;  // SEGS 16-byte segments per row
constexpr int STAGES = 3;  // chunks staged per CTA: a K range is short, and several CTAs share an SM
constexpr int RANK_TILES = 4;                                        // rank tiles per CTA (blockIdx.z)
constexpr float GELU_SHIFT = 0.171875f;

// Shared-memory swizzle of the staged x tile: the 16-byte segment s of row r is stored at
// s ^ swz(r). swz permutes the 8 segments of one 64-column group, and is chosen so that both reads
// are free of bank conflicts: ldmatrix (8 rows, same segment: swz is a bijection on r mod 8) and
// the quantizer's reads (rows 2q and 2q+1, segments t = 0..3: swz differs in bit 2 between them).
DEVICE int swz(int r) {
    return ((r & 1) << 2) | ((r >> 1) & 3);
}

// Position of a packed per-channel vector's element k (svdquant/packing.pack_vector):
// k = 128·blk + 16·a + 8·b + 2·c + d is stored at 128·blk + 16·a + 4·c + 2·b + d. For the 8 columns
// 8j..8j+7 the pairs (d = 0, 1) are adjacent: pair c sits at smooth_pair_pos(8j) + 4·c.
DEVICE int packed_pos(int k) {
    return (k & ~15) | (((k >> 1) & 3) << 2) | (((k >> 3) & 1) << 1) | (k & 1);
}

struct SharedX {
    u16 x[STAGES][ROWS][CHUNK];  // staged input, swizzled per row
    u16 smooth[STAGES][CHUNK];   // the matching slice of the packed smoothing vector
    float2 div[WARPS][64];       // (smooth, 1 / smooth) of the columns of each warp's group, in column order
};
constexpr int RED_FLOATS = (WARPS - 1) * RANK_TILES * 32 * 8;  // partial branch sums of warps 1..3
union Shared {
    SharedX stage;
    float red[RED_FLOATS];
};

// Two m16n8 accumulators (8-rank halves) rounded to 16 bits as one m16n8k16 A fragment.
template <class T> DEVICE uint4 fragment(const float (&lo)[4], const float (&hi)[4]) {
    return make_uint4(pack2<T>(lo[0], lo[1]), pack2<T>(lo[2], lo[3]), pack2<T>(hi[0], hi[1]), pack2<T>(hi[2], hi[3]));
}

template <class T, int MODE> struct Kernel1 {
    // The smoothing divisors of warp w's group (columns 64·w.. of the chunk in buffer `buf`): lane l
    // computes the reciprocals of columns l and l + 32, once for the CTA's 16 rows.
    static DEVICE void divisors(Shared& sm, int buf, int w, int lane) {
#pragma unroll
        for (int i = 0; i < 2; i++) {
            const int c = lane + 32 * i;
            const Divisor d = Divisor::of(to_f32<T>(sm.stage.smooth[buf][packed_pos(64 * w + c)]));
            sm.stage.div[w][c] = make_float2(d.b, d.y);
        }
        __syncwarp();
    }

    // The values of row (g + 8h) at columns [col, col + 8) of the staged chunk (in warp w's group), after
    // the shift and the smoothing division.
    static DEVICE void load8(float (&v)[8], const Shared& sm, int buf, int w, int row, int col) {
        const uint4 raw = *(const uint4*)&sm.stage.x[buf][row][((col >> 3) ^ swz(row)) << 3];
        const u32 words[4] = {raw.x, raw.y, raw.z, raw.w};
        const float4* div = (const float4*)&sm.stage.div[w][col & 63];
#pragma unroll
        for (int c = 0; c < 4; c++) {
            const float4 pair = div[c];  // (b, 1/b) of columns col + 2c and col + 2c + 1
#pragma unroll
            for (int d = 0; d < 2; d++) {
                float xv = to_f32<T>((u16)(words[c] >> (16 * d)));
                if constexpr (MODE == MODE_INT4_UNSIGNED) xv = xv + GELU_SHIFT;
                v[2 * c + d] = d ? Divisor{pair.z, pair.w}(xv) : Divisor{pair.x, pair.y}(xv);
            }
        }
    }

    // Quantize the 16x64 group `grp` (columns 64·w.. of the chunk in buffer `buf`).
    static DEVICE void quantize(Shared& sm, int buf, int w, int lane, int mt, int grp, int G, int Mp, u32* codes,
                                void* ascales) {
        divisors(sm, buf, w, lane);
        const int g = lane >> 2, t = lane & 3;
        u32 word[2][2];  // [h: row g + 8h][half: columns 32·half + 8t .. +7]
        if constexpr (MODE != MODE_NVFP4) {
            float scale[2];
#pragma unroll
            for (int h = 0; h < 2; h++) {  // one row at a time keeps 16 values live, not 32
                float v[2][8];
#pragma unroll
                for (int half = 0; half < 2; half++) load8(v[half], sm, buf, w, g + 8 * h, 64 * w + 32 * half + 8 * t);
                float m = MODE == MODE_INT4 ? 0.0f : v[0][0];
#pragma unroll
                for (int half = 0; half < 2; half++)
#pragma unroll
                    for (int e = 0; e < 8; e++) m = fmaxf(m, MODE == MODE_INT4 ? fabsf(v[half][e]) : v[half][e]);
                // the group's other 48 columns are in the lanes t ^ 1, t ^ 2 of the same row
                m = fmaxf(m, __shfl_xor_sync(0xFFFFFFFFu, m, 1));
                m = fmaxf(m, __shfl_xor_sync(0xFFFFFFFFu, m, 2));
                // / 7 and / 15 as constant Divisors: the reciprocal folds at compile time (no FCHK, no
                // slow path), the quotient is still the IEEE one
                scale[h] = MODE == MODE_INT4 ? Divisor::of(7.0f)(m) : Divisor::of(15.0f)(fmaxf(m, 0.0f));
                const Divisor div = Divisor::or_zero(scale[h]);
#pragma unroll
                for (int half = 0; half < 2; half++) {
                    u32 packed = 0;
#pragma unroll
                    for (int e = 0; e < 8; e++) {
                        // The reference clamps rint(q) to [-8, 7] (unsigned: [0, 15]), but |v| <= m and
                        // scale = RN(m / 7) bound |q| by 7·(1 + 2^-23), so only an unsigned code of a
                        // negative v (input below the GELU shift) is ever clamped (at 0, before rounding:
                        // the bound is an integer).
                        const float q = div(v[half][e]);
                        packed |= nibble_of(MODE == MODE_INT4 ? q : fmaxf(q, 0.0f)) << (4 * e);
                    }
                    word[h][half] = packed;
                }
            }
            if (t == 0) {
                float* out = (float*)ascales + (size_t)grp * Mp + 16 * mt + 2 * g;
                *(float2*)out = make_float2(scale[0], scale[1]);
            }
        } else {
#if __CUDA_ARCH__ >= 1200
            // Each 16-column scale group is split between lanes t and t ^ 1 (8 columns each).
            u32 fp8[2][2];  // [h][half]: E4M3 scale of columns 32·half + 16·(t >> 1) ..
#pragma unroll
            for (int h = 0; h < 2; h++)
#pragma unroll
                for (int half = 0; half < 2; half++) {
                    float v[8];
                    load8(v, sm, buf, w, g + 8 * h, 64 * w + 32 * half + 8 * t);
                    float m = 0.0f;
#pragma unroll
                    for (int e = 0; e < 8; e++) m = fmaxf(m, fabsf(v[e]));
                    m = fmaxf(m, __shfl_xor_sync(0xFFFFFFFFu, m, 1));
                    fp8[h][half] = f32_to_e4m3(Divisor::of(6.0f)(m));  // IEEE m / 6, reciprocal folded
                    const Divisor div = Divisor::or_zero(e4m3_to_f32(fp8[h][half]));
                    u32 packed = 0;
#pragma unroll
                    for (int e = 0; e < 8; e++) packed |= e2m1_code(div(v[e])) << (4 * e);
                    word[h][half] = packed;
                }
            // Row (g + 8h)'s scale register: byte q = group q of the 64 columns. Lane t holds groups
            // t >> 1 (half 0) and 2 + (t >> 1) (half 1); lanes t and t ^ 2 together hold all four.
            u32 reg[2];
#pragma unroll
            for (int h = 0; h < 2; h++) {
                const u32 mine = (fp8[h][0] | (fp8[h][1] << 16)) << (8 * (t >> 1));
                reg[h] = mine | __shfl_xor_sync(0xFFFFFFFFu, mine, 2);
            }
            if (t < 2) {
                u32* out = (u32*)ascales + ((size_t)grp * (Mp / 32) + (mt >> 1)) * 32;
                out[4 * g + 2 * (mt & 1) + t] = t == 0 ? reg[0] : reg[1];  // (reg[t] would go to local memory)
            }
#endif
        }
        const uint4 frag = make_uint4(word[0][0], word[1][0], word[0][1], word[1][1]);
        *(uint4*)&codes[(((size_t)mt * G + grp) * 32 + lane) * 4] = frag;
    }

    // acc[j] += x(16 rows, the group's 64 columns) · proj_down(64, rank tile rt0 + j).
    // proj_down (svdquant/packing.pack_down) is [K/16][R/16][lane][4 words]: word (nh, kh) of lane
    // (g, t) holds ranks 16·rt + 8·nh + g at columns 16·kt + 8·kh + 2t, +1: the B fragments of the
    // two 8-rank halves nh.
    static DEVICE void branch_down(float (&acc)[RANK_TILES][2][4], const Shared& sm, int buf, int w, int lane,
                                   int grp, const u16* down, int RT, int rt0, int nrt) {
#pragma unroll
        for (int kk = 0; kk < 4; kk++) {
            // ldmatrix.x4: lanes 0-15 address rows 0-15 at columns 16kk.., lanes 16-31 the same rows
            // at 16kk+8..: registers come back as the m16n8k16 A fragment (a0..a3).
            const int r = lane & 15, seg = 8 * w + 2 * kk + (lane >> 4);
            u32 a[4];
            ldmatrix_x4(a, &sm.stage.x[buf][r][(seg ^ swz(r)) << 3]);
            const int kt = 4 * grp + kk;
#pragma unroll
            for (int j = 0; j < RANK_TILES; j++) {
                if (j < nrt) {
                    const uint4 b = ldg16(down + (((size_t)kt * RT + rt0 + j) * 32 + lane) * 8);
                    mma_16816<T>(acc[j][0], a, b.x, b.y);
                    mma_16816<T>(acc[j][1], a, b.z, b.w);
                }
            }
        }
    }

    static DEVICE void run(const u16* __restrict__ x, const u16* __restrict__ smooth, const u16* __restrict__ down,
                           u32* __restrict__ codes, void* __restrict__ ascales, u32* __restrict__ lora_act, int M,
                           int ldx, int Kx, int K, int R, int Mp) {
        __shared__ __align__(16) Shared sm;
        const int tid = threadIdx.x, w = tid >> 5, lane = tid & 31;
        const int mt = blockIdx.x, G = K / 64, RT = R / 16;
        const int rt0 = RANK_TILES * blockIdx.z, nrt = min(RANK_TILES, RT - rt0);
        const bool quantizing = blockIdx.z == 0;
        const int chunks = (K + CHUNK - 1) / CHUNK, per = (chunks + (int)gridDim.y - 1) / (int)gridDim.y;
        const int c0 = (int)blockIdx.y * per, c1 = min(chunks, c0 + per);  // this CTA's K range (never empty)

        auto stage = [&](int chunk, int buf) {
            const int k0 = chunk * CHUNK;
#pragma unroll
            for (int i = 0; i < ROWS * SEGS / (WARPS * 32); i++) {
                const int s = tid + i * WARPS * 32, r = s / SEGS, seg = s % SEGS;
                const int row = 16 * mt + r, k = k0 + 8 * seg;
                const bool ok = row < M && k < Kx;
                cp_async16(&sm.stage.x[buf][r][(seg ^ swz(r)) << 3], ok ? x + (size_t)row * ldx + k : x, ok);
            }
            if (tid < SEGS) {
                const bool ok = k0 + 8 * tid < K;
                cp_async16(&sm.stage.smooth[buf][8 * tid], ok ? smooth + k0 + 8 * tid : smooth, ok);
            }
            cp_async_commit();
        };

        float acc[RANK_TILES][2][4];  // [rank tile][8-rank half nh][m16n8 accumulator]
#pragma unroll
        for (int j = 0; j < RANK_TILES; j++)
#pragma unroll
            for (int e = 0; e < 8; e++) acc[j][e >> 2][e & 3] = 0.0f;

        for (int s = 0; s < STAGES - 1; s++) {
            if (c0 + s < c1) stage(c0 + s, s);
            else cp_async_commit();  // empty groups keep the wait count uniform
        }
        for (int chunk = c0; chunk < c1; chunk++) {
            const int buf = (chunk - c0) % STAGES;
            cp_async_wait<STAGES - 2>();
            __syncthreads();  // chunk landed for everyone; the buffer of chunk - 1 is no longer read
            const int next = chunk + STAGES - 1;
            if (next < c1) stage(next, (next - c0) % STAGES);
            else cp_async_commit();
            const int grp = chunk * (CHUNK / 64) + w;
            if (grp < G) {  // the last chunk may hold only 128 columns
                if (quantizing) quantize(sm, buf, w, lane, mt, grp, G, Mp, codes, ascales);
                if (nrt > 0) branch_down(acc, sm, buf, w, lane, grp, down, RT, rt0, nrt);
            }
        }
        if (nrt <= 0) return;
        __syncthreads();  // the reduction below reuses the staging buffers

        // Fixed-order reduction of the four warps' partial sums (shared memory is free again).
        if (w > 0) {
#pragma unroll
            for (int j = 0; j < RANK_TILES; j++) {
                if (j < nrt) {
                    float* dst = &sm.red[(((w - 1) * RANK_TILES + j) * 32 + lane) * 8];
                    *(float4*)dst = make_float4(acc[j][0][0], acc[j][0][1], acc[j][0][2], acc[j][0][3]);
                    *(float4*)(dst + 4) = make_float4(acc[j][1][0], acc[j][1][1], acc[j][1][2], acc[j][1][3]);
                }
            }
        }
        __syncthreads();
        if (w != 0) return;
#pragma unroll
        for (int j = 0; j < RANK_TILES; j++) {
            if (j < nrt) {
#pragma unroll
                for (int src = 0; src < WARPS - 1; src++) {
                    const float* p = &sm.red[((src * RANK_TILES + j) * 32 + lane) * 8];
#pragma unroll
                    for (int e = 0; e < 8; e++) acc[j][e >> 2][e & 3] += p[e];
                }
                const size_t frag = ((size_t)mt * RT + rt0 + j) * 32 + lane;
                if (gridDim.y == 1) {  // the m16n8k16 accumulator (rows g / g+8, ranks 2t, 2t+1 of each
                                       // 8-rank half) is already kernel 2's A fragment: round, store whole
                    *(uint4*)&lora_act[frag * 4] = fragment<T>(acc[j][0], acc[j][1]);
                } else {
                    float* out = (float*)(lora_act + (size_t)Mp * R / 2) +
                                 (blockIdx.y * (size_t)(Mp / 16) * RT * 32 + frag) * 8;
                    *(float4*)out = make_float4(acc[j][0][0], acc[j][0][1], acc[j][0][2], acc[j][0][3]);
                    *(float4*)(out + 4) = make_float4(acc[j][1][0], acc[j][1][1], acc[j][1][2], acc[j][1][3]);
                }
            }
        }
    }
};

// The second stage of a split K: lora_act = round16(partial range 0 + range 1 + ...), one thread per lane
// fragment (Mp/16 · R/16 · 32 of them).
template <class T> DEVICE void branch_sum(u32* __restrict__ lora_act, int R, int Mp, int ranges) {
    const size_t frags = (size_t)(Mp / 16) * (R / 16) * 32, i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= frags) return;
    const float* part = (const float*)(lora_act + (size_t)Mp * R / 2) + i * 8;
    float acc[2][4] = {};
    for (int s = 0; s < ranges; s++) {
        const float4 lo = *(const float4*)(part + s * frags * 8), hi = *(const float4*)(part + s * frags * 8 + 4);
        acc[0][0] += lo.x, acc[0][1] += lo.y, acc[0][2] += lo.z, acc[0][3] += lo.w;
        acc[1][0] += hi.x, acc[1][1] += hi.y, acc[1][2] += hi.z, acc[1][3] += hi.w;
    }
    *(uint4*)&lora_act[i * 4] = fragment<T>(acc[0], acc[1]);
}

}  // namespace

// One entry point per (dtype, mode); grid (Mp / 16, K ranges, max(1, ceil(R / 64))), block 128. CTAS_PER_SM
// CTAs fit on an A100/H100/H200 SM (at most 128 registers, 27.5 KB of shared memory each; 3 on an RTX 30/40):
// with two chunks in flight per CTA, 64 KB of loads per SM, more than an H200 needs to cover its memory
// latency (about 36 KB: 4.8 TB/s for ~1 µs, over 132 SMs).
constexpr int CTAS_PER_SM = 4;
#define SVDQ_QUANTIZE(NAME, T, MODE)                                                                         \
    extern "C" __global__ void __launch_bounds__(128, CTAS_PER_SM) NAME(                                                 \
        const u16* x, const u16* smooth, const u16* down, u32* codes, void* ascales, u32* lora_act, int M,    \
        int ldx, int Kx, int K, int R, int Mp) {                                                             \
        Kernel1<T, MODE>::run(x, smooth, down, codes, ascales, lora_act, M, ldx, Kx, K, R, Mp);              \
    }

// The split-K branch sum: grid ceil(Mp/16 · R/16 · 32 / 128), block 128; `ranges` = kernel 1's gridDim.y.
#define SVDQ_BRANCH_SUM(NAME, T)                                                                             \
    extern "C" __global__ void __launch_bounds__(128) NAME(u32* lora_act, int R, int Mp, int ranges) {       \
        branch_sum<T>(lora_act, R, Mp, ranges);                                                               \
    }

SVDQ_BRANCH_SUM(svdq_quantize_branch_sum_fp16, fp16_t)
#if __CUDA_ARCH__ >= 800
SVDQ_BRANCH_SUM(svdq_quantize_branch_sum_bf16, bf16_t)
#endif

#if defined(SVDQ_FAMILY_INT4)
SVDQ_QUANTIZE(svdq_quantize_int4_fp16, fp16_t, MODE_INT4)
SVDQ_QUANTIZE(svdq_quantize_uint4_fp16, fp16_t, MODE_INT4_UNSIGNED)
#if __CUDA_ARCH__ >= 800
SVDQ_QUANTIZE(svdq_quantize_int4_bf16, bf16_t, MODE_INT4)
SVDQ_QUANTIZE(svdq_quantize_uint4_bf16, bf16_t, MODE_INT4_UNSIGNED)
#endif
#endif

#if defined(SVDQ_FAMILY_NVFP4)
SVDQ_QUANTIZE(svdq_quantize_nvfp4_fp16, fp16_t, MODE_NVFP4)
SVDQ_QUANTIZE(svdq_quantize_nvfp4_bf16, bf16_t, MODE_NVFP4)
#endif
