// Kernel 2 of an SVDQuant INT4 layer on Hopper's warpgroup MMA (wgmma, sm_90a only): the same function,
// arguments and block as gemm_w4a4.cu's svdq_gemm_int4_*, 128-row CTAs (kernel 1 is shared, its outputs are read
// exactly as there), with the INT4 products on `wgmma.mma_async ... .s8` (SASS IGMMA) instead of mma.sync.
// Opt-in (backend.py, SVDQUANT_WGMMA=1) until it is measured faster on a GPU.
//
//   y[m, n] = Σ_groups (psum(m, n, grp) · wscale[grp, n]) · ascale[m, grp]   (64-column groups)
//           + Σ_r lora_act[m, r] · proj_up[n, r]  + bias[n]                → 16-bit y (M, N)
//
// Same numbers as the mma.sync path: the same integer group sums, dequantised with the same two FMAs in
// the same order (branch first, then the groups in K order), so the output equals it bit for bit (the
// emulated test checks this); against reference_forward only fp32 summation order and the 16-bit
// rounding of the branch input differ.
//
// Why wgmma changes the cost (mma.sync on sm_90: per warp and 64-column step, 32 IMMA.16832 with 76
// instructions spreading nibbles and 128 FFMA): the weights' nibbles are spread into bytes ONCE per CTA
// and step into shared memory (one 16-byte word per thread, amortised over the CTA's 128 rows), where
// wgmma reads them; the activations' nibbles are spread in registers once per warp and step (4 words per
// lane, amortised over 128 columns). What remains per accumulator and group is the dequantisation: the
// wgmma adds its int32 sum to SVDQ_MAGIC_BITS (common.cuh), so fma(bits, cs, -MAGIC·cs) is the exactly
// scaled float with no I2F, one more FFMA applies the row scale, and one MOV re-arms the accumulator:
// 3 instructions per accumulator per group. An exact design cannot drop below that: both scales change
// with the group, so each (m, n, group) needs its own scaled add. Counted (docs/BENCHMARKS.md, section 5):
// 330 instructions per warp and step, 192 of them that floor, against the mma.sync kernel's 329 for the same
// 64 accumulators per lane; both are issue-bound well below the INT8 peak, so this kernel is not expected to
// be much faster until a GPU says otherwise.
//
// Tiling: CTA tile 128 (m) x 128 (n), 256 threads = 2 warpgroups; warpgroup wg owns rows 64·wg.. and all
// 128 columns: per 64-column step two m64n128k32 (the even and the odd nibbles of each byte pair, see
// "k order" below). Warp w of a warpgroup holds rows 16·w.. (row tile 4·wg + w of the CTA).
//
// Pipeline per step kt (one __syncthreads): issue step kt's two wgmma; while they run, spread raw step
// kt+1 into the other operand buffer, load this lane's A fragments of step kt+1 and cp.async raw step
// kt+3; then wait for the wgmma and dequantise (RAW_STAGES = 3 raw buffers, 2 operand buffers, 44.3 KB of
// static shared memory: no launch attribute needed). The dequantisation does not overlap this warpgroup's
// own wgmma (ptxas keeps wgmma asynchronous across it only with a second accumulator set, which at 255
// registers it serialises instead: C7514), but it does the other warpgroup's. Loads are Ampere-style
// cp.async, not TMA: the operand must be rewritten (nibbles → bytes) between global memory and wgmma
// anyway, so the copy engine would only fill the raw buffers; a later version can move that to TMA on
// an mbarrier with producer and consumer warpgroups (setmaxnreg).
//
// k order. Within one 64-column group the order of k is free as long as A and B agree. Step half s
// (0, 1) multiplies the nibbles e with e & 1 = s: logical k = 16·kh + 4·kl + i of half s is column
// 32·kh + 8·kl + 2·i + s of the group. For A that is exactly the m16n8k32 fragment built from kernel 1's
// m16n8k64 fragment by taking every other nibble (as common.cuh's Int4Mma does); for B the producer
// writes the bytes there. Signed nibbles go to the high half of their byte (no sign extension), unsigned
// ones stay low: products come out scaled by PSUM_UNIT = 256 (signed A) or 16 (unsigned A), divided out of
// the column scale.
//
// Shared-memory operand (one buffer per step, B as wgmma reads it: K-major, no swizzle; a core matrix is
// 8 columns n x 16 bytes of k, 128 contiguous bytes):
//   b[s][n / 8][kb / 16][n % 8][16 bytes]   LBO (next 16 bytes of k) = 128 B, SBO (next 8 columns) = 256 B
//   cs[j][t] float4 = (cs, -MAGIC·cs) of columns 8j + 2t and 8j + 2t + 1 (cs = wscale / PSUM_UNIT): the
//   columns of accumulator pair j of lane t; a warp reads 4 distinct float4 (broadcast, no conflict).
//
// Accumulator element 4·j + e of lane (g, t) of warp w (wgmma's m64nN D fragment) is row 16·w + g +
// 8·(e >> 1) of the warpgroup's 64 and column 8·j + 2·t + (e & 1): per 8-column tile j the m16n8 layout,
// so the branch-up runs m16n8k16 mma.sync straight into it.
#include "common.cuh"

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
namespace {

constexpr int BM = 128, BN = 128, THREADS = 256, RAW_STAGES = 3;

struct Raw {                 // one 64-column step as kernel 1 and the checkpoint store it (cp.async copies)
    uint4 a[BM / 16][32];    // codes of the CTA's 8 row tiles, one m16n8k64 A fragment per lane
    uint4 b[BN / 16][32];    // the qweight block (n tile, step): 4 KB, contiguous in the file
    float as[BM];            // row scales in kernel 1's order (16·tile + 2·g + h: row 16·tile + 8·h + g)
    u16 ws[BN];              // column scales, packed vector order (svdquant/packing.pack_scales)
};

struct Operand {             // one step's B as wgmma reads it, and its column scales ready for the FFMAs
    u32 b[2][BN / 8][2][8][4];
    float4 cs[BN / 8][4];
};

struct Smem {
    Raw raw[RAW_STAGES];
    Operand op[2];
};

constexpr u32 LBO = sizeof(u32) * 8 * 4, SBO = 2 * LBO;  // 128 B and 256 B (see the layout above)

template <class T, bool UNSIGNED_A> struct Kernel2Wgmma {
    static constexpr float PSUM_UNIT = UNSIGNED_A ? 16.0f : 256.0f;

    struct Args {  // as gemm_w4a4.cu's Kernel2::Args (wcscales and wtscale are NVFP4's, unused here)
        const u32* codes;
        const float* ascales;
        const u32* qweight;
        const u16* wscales;
        const u32* lora_act;
        const u32* proj_up;
        const u16* bias;
        u16* y;
        int M, N_out, K, R, Mp;
    };

    // What each thread keeps across steps: the int32 accumulators of the running step, A fragments and
    // row scales of two steps (index = step parity: the next step's are loaded while the tensor core still
    // reads the running step's), and the float result.
    struct State {
        int psum[64];
        u32 a[2][2][4];  // [parity][half s][register]
        float2 rs[2];
        float acc[BN / 8][4];
    };

    // Where this thread's cp.async copies of step 0 come from; step kt is kt strides further (one 16-byte
    // copy of A and of B per thread, and the 768 bytes of scales by threads 0..47), as gemm_w4a4.cu's
    // stages. Pointers that advance keep the loop's address arithmetic to one add each.
    struct Source {
        const u32* a;  // codes of row tile 8·mb + tid / 32, lane tid % 32
        const u32* b;  // 16 bytes of the qweight block (nb, step)
        const char* scales;  // threads 0..31: 16 bytes of row scales; 32..47: of column scales
        int scale_stride;    // bytes from one step's scales to the next
    };

    static DEVICE Source source(const Args& p, int mb, int nb, int tid) {
        const int G = p.K / 64;
        Source src{p.codes + ((size_t)(8 * mb + tid / 32) * G * 32 + tid % 32) * 4,
                   p.qweight + ((size_t)nb * G * 8 * 32 + tid) * 4, nullptr, 0};
        if (tid < 32) {
            src.scales = (const char*)(p.ascales + BM * mb + 4 * tid);
            src.scale_stride = p.Mp * (int)sizeof(float);
        } else {
            src.scales = (const char*)(p.wscales + (size_t)nb * G * BN + 8 * (tid - 32));
            src.scale_stride = BN * (int)sizeof(u16);
        }
        return src;
    }

    // cp.async step kt into `r`; zero-fills instead of reading when `valid` is false (past the last step:
    // predicated, so the main loop has no branch around its wgmma).
    static DEVICE void load_raw(Raw& r, const Source& src, int kt, int tid, bool valid) {
        kt = valid ? kt : 0;  // an address inside the tensors all the same
        cp_async16(&r.a[0][0] + tid, src.a + (size_t)kt * 32 * 4, valid);
        cp_async16(&r.b[0][0] + tid, src.b + (size_t)kt * 8 * 32 * 4, valid);
        if (tid < 48) {
            u8* dst = tid < 32 ? (u8*)&r.as[4 * tid] : (u8*)&r.ws[8 * (tid - 32)];
            cp_async16(dst, src.scales + (size_t)kt * src.scale_stride, valid);
        }
    }

    // Nibbles → bytes: half s takes nibbles e with e & 1 = s (see "k order").
    static DEVICE u32 spread_a(u32 w, int s) {
        if constexpr (UNSIGNED_A) return (s ? w >> 4 : w) & 0x0F0F0F0Fu;
        return (s ? w : w << 4) & 0xF0F0F0F0u;
    }

    static DEVICE u32 spread_b(u32 w, int s) {
        return (s ? w : w << 4) & 0xF0F0F0F0u;
    }

    // Raw step → operand buffer: every thread spreads one 16-byte word of qweight (lane 4·nl + kl of
    // column pack np holds words (nh, kh) of column 16·np + 8·nh + nl, columns 32·kh + 8·kl + e of the
    // group), 64 threads turn two column scales each into (cs, -MAGIC·cs).
    static DEVICE void expand(Operand& op, const Raw& r, int tid) {
        const int np = tid >> 5, nl = (tid >> 2) & 7, kl = tid & 3;
        const uint4 v = r.b[np][tid & 31];
        const u32 w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int nh = 0; nh < 2; nh++)
#pragma unroll
            for (int kh = 0; kh < 2; kh++)
#pragma unroll
                for (int s = 0; s < 2; s++) op.b[s][2 * np + nh][kh][nl][kl] = spread_b(w[2 * nh + kh], s);
        if (tid < 64) {
            // packed position 2·tid + d holds column 16·a + 8·b + 2·t + d (tid = 8·a + 2·t + b)
            const u32 pair = *(const u32*)&r.ws[2 * tid];
            const float c0 = to_f32<T>((u16)pair) / PSUM_UNIT, c1 = to_f32<T>((u16)(pair >> 16)) / PSUM_UNIT;
            op.cs[2 * (tid >> 3) + (tid & 1)][(tid >> 1) & 3] =
                make_float4(c0, -SVDQ_MAGIC_F * c0, c1, -SVDQ_MAGIC_F * c1);
        }
    }

    // This lane's A fragments (both halves) and row scales of a raw step.
    template <int P> static DEVICE void load_a(State& st, const Raw& r, int wg, int w, int lane) {
        const uint4 v = r.a[4 * wg + w][lane];
        const u32 words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int s = 0; s < 2; s++)
#pragma unroll
            for (int i = 0; i < 4; i++) st.a[P][s][i] = spread_a(words[i], s);
        st.rs[P] = *(const float2*)&r.as[16 * (4 * wg + w) + 2 * (lane >> 2)];
    }

    // The step's group sums → acc, and the accumulators re-armed with MAGIC_BITS.
    static DEVICE void dequantise(State& st, const Operand& op, float2 rs, int t) {
#pragma unroll
        for (int j = 0; j < BN / 8; j++) {
            const float4 c = op.cs[j][t];
#pragma unroll
            for (int e = 0; e < 4; e++) {
                int& bits = st.psum[4 * j + e];
                const float col = fmaf(__int_as_float(bits), (e & 1) ? c.z : c.x, (e & 1) ? c.w : c.y);
                st.acc[j][e] = fmaf(col, (e >> 1) ? rs.y : rs.x, st.acc[j][e]);
                bits = SVDQ_MAGIC_BITS;
            }
        }
    }

    // One 64-column step kt, P = kt & 1 (see "Pipeline" above).
    // desc0 describes sm.op[0].b[0]; the other three operands are fixed offsets from it (the start address
    // is the descriptor's low field, in 16-byte units, and shared memory ends far below its 256 KB reach).
    // slot = kt % RAW_STAGES, advanced here (a select, not a division).
    template <int P> static DEVICE void step(State& st, Smem& sm, const Source& src, unsigned long long desc0,
                                             int kt, int& slot, int steps, int tid) {
        const int wg = tid >> 7, w = (tid >> 5) & 3, lane = tid & 31;
        ptx_wgmma_fence();
#pragma unroll
        for (int s = 0; s < 2; s++) {
            constexpr unsigned long long operand = sizeof(Operand) / 16, half = sizeof(Operand::b[0]) / 16;
            ptx_wgmma_m64n128k32_s8<UNSIGNED_A>(st.psum, st.a[P][s], desc0 + P * operand + s * half);
        }
        ptx_wgmma_commit();
        // While the tensor core runs: operand and A fragments of step kt+1 (after the last step, of stale data
        // nobody reads: the loop stays free of branches). Operand buffer 1 - P and raw buffer `slot` were last
        // read in step kt-1, before its closing barrier.
        const int next_slot = slot == RAW_STAGES - 1 ? 0 : slot + 1;
        const Raw& next = sm.raw[next_slot];
        expand(sm.op[1 - P], next, tid);
        load_a<1 - P>(st, next, wg, w, lane);
        load_raw(sm.raw[slot], src, kt + RAW_STAGES, tid, kt + RAW_STAGES < steps);
        slot = next_slot;
        cp_async_commit();
        ptx_wgmma_wait<0>();
        ptx_hold(st.psum);
        dequantise(st, sm.op[P], st.rs[P], lane & 3);
        ptx_fence_proxy_async();  // the operand's generic stores before wgmma's async-proxy reads
        cp_async_wait<1>();       // raw step kt+2 landed (step kt+3's copies may still be in flight)
        __syncthreads();          // ... for every thread; operand buffer 1 - P complete
    }

    // acc += lora_act · proj_upᵀ over the whole rank (m16n8k16, fp32): the warp's 16 rows by the CTA's
    // 128 columns; fragments straight from global memory (L2), as gemm_w4a4.cu's branch_up.
    static DEVICE void branch_up(State& st, const Args& p, int mb, int nb, int wg, int w, int lane) {
        const int RT = p.R / 16, mt = 8 * mb + 4 * wg + w;
        for (int rt = 0; rt < RT; rt++) {
            const uint4 v = ldg16(p.lora_act + (((size_t)mt * RT + rt) * 32 + lane) * 4);
            const u32 la[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
            for (int np = 0; np < BN / 16; np++) {
                const uint4 up = ldg16(p.proj_up + (((size_t)(8 * nb + np) * RT + rt) * 32 + lane) * 4);
                mma_16816<T>(st.acc[2 * np], la, up.x, up.y);
                mma_16816<T>(st.acc[2 * np + 1], la, up.z, up.w);
            }
        }
    }

    static DEVICE void run(const Args& p) {
        __shared__ __align__(128) Smem sm;
        const int tid = threadIdx.x, wg = tid >> 7, w = (tid >> 5) & 3, lane = tid & 31, g = lane >> 2, t = lane & 3;
        const int nb = blockIdx.x, mb = blockIdx.y;  // consecutive CTAs share the rows of A
        const int steps = p.K / 64;

        State st;
#pragma unroll
        for (int j = 0; j < BN / 8; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) st.acc[j][e] = 0.0f;
#pragma unroll
        const Source src = source(p, mb, nb, tid);
        for (int s = 0; s < RAW_STAGES; s++) {
            load_raw(sm.raw[s], src, s, tid, s < steps);
            cp_async_commit();
        }
        branch_up(st, p, mb, nb, wg, w, lane);  // independent of the main sum: while the first steps load
#pragma unroll
        for (int i = 0; i < 64; i++) st.psum[i] = SVDQ_MAGIC_BITS;
        cp_async_wait<RAW_STAGES - 1>();
        __syncthreads();
        expand(sm.op[0], sm.raw[0], tid);
        load_a<0>(st, sm.raw[0], wg, w, lane);
        ptx_fence_proxy_async();
        cp_async_wait<RAW_STAGES - 2>();
        __syncthreads();

        const unsigned long long desc0 = ptx_smem_desc(&sm.op[0].b[0], LBO, SBO);
        // K is a multiple of 128 (packing.TILE): an even number of steps, taken in pairs.
        int slot = 0;
        for (int kt = 0; kt < steps; kt += 2) {
            step<0>(st, sm, src, desc0, kt, slot, steps, tid);
            step<1>(st, sm, src, desc0, kt + 1, slot, steps, tid);
        }

        // Epilogue: bias, round to 16 bits, store rows < M and columns < N_out. Bias is a packed vector:
        // columns 8j + 2t + d of tile j = 2a + b sit at 16a + 4t + 2b + d (one 8-byte load per a).
#pragma unroll
        for (int a = 0; a < BN / 16; a++) {
            float bias[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            if (p.bias) {
                const uint2 raw = ldg8(p.bias + BN * nb + 16 * a + 4 * t);
                const u32 h[2] = {raw.x, raw.y};
#pragma unroll
                for (int e = 0; e < 4; e++) bias[e] = to_f32<T>((u16)(h[e >> 1] >> (16 * (e & 1))));
            }
#pragma unroll
            for (int b = 0; b < 2; b++)
#pragma unroll
                for (int h = 0; h < 2; h++) {
                    const int j = 2 * a + b;
                    const int row = BM * mb + 64 * wg + 16 * w + 8 * h + g;
                    const int col = BN * nb + 8 * j + 2 * t;
                    const float v0 = st.acc[j][2 * h] + bias[2 * b];
                    const float v1 = st.acc[j][2 * h + 1] + bias[2 * b + 1];
                    store_pair<T>(p.y, p.M, p.N_out, row, col, v0, v1);
                }
        }
    }
};

}  // namespace

// grid (N / 128, Mp / 128), block 256, static shared memory 44.3 KB: gemm_w4a4.cu's arguments, argument for argument.
#define SVDQ_GEMM_WGMMA(NAME, T, UNSIGNED_A)                                                                  \
    extern "C" __global__ void __launch_bounds__(THREADS, 1) NAME(                                           \
        const u32* codes, const void* ascales, const u32* qweight, const void* wscales, const u32* lora_act, \
        const u32* proj_up, const u16* bias, const u16* wcscales, const float* wtscale, u16* y, int M,       \
        int N_out, int K, int R, int Mp) {                                                                   \
        Kernel2Wgmma<T, UNSIGNED_A>::run({codes, (const float*)ascales, qweight, (const u16*)wscales,         \
                                          lora_act, proj_up, bias, y, M, N_out, K, R, Mp});                   \
    }

#if defined(SVDQ_FAMILY_INT4)
SVDQ_GEMM_WGMMA(svdq_gemm_wgmma_int4_fp16, fp16_t, false)
SVDQ_GEMM_WGMMA(svdq_gemm_wgmma_uint4_fp16, fp16_t, true)
SVDQ_GEMM_WGMMA(svdq_gemm_wgmma_int4_bf16, bf16_t, false)
SVDQ_GEMM_WGMMA(svdq_gemm_wgmma_uint4_bf16, bf16_t, true)
#endif
#endif
