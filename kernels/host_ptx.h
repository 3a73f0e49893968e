// ptx.cuh for the CPU: the PTX instructions the kernels use, and the CUDA built-ins they touch,
// implemented in C++ from the PTX ISA's definitions, so that the kernels' own code (common.cuh and
// the .cu files, unchanged) runs under a host C++ compiler. tests/test_kernels_emulated.py compiles
// the kernels with g++ against this file (as ptx.cuh) and checks them against the reference layers
// without a GPU. NVRTC never sees this file.
//
// Execution model: one CTA at a time; each CUDA thread is a fiber (ucontext) on one OS thread,
// switched only at __syncthreads and at warp-collective instructions (mma, ldmatrix, shfl), whose
// inputs the 32 lanes exchange through a per-warp slot array. Runs are deterministic, and a barrier
// that not every thread reaches is reported instead of hanging. Shared memory (`__shared__` =
// `static`) is reused from CTA to CTA uninitialized, as on a GPU.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstdio>
#include <cstring>
#include <functional>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define DEVICE inline

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

struct uint4 {
    u32 x, y, z, w;
};
struct uint2 {
    u32 x, y;
};
struct float2 {
    float x, y;
};
struct float4 {
    float x, y, z, w;
};
struct uint3 {
    unsigned x, y, z;
};
inline uint4 make_uint4(u32 x, u32 y, u32 z, u32 w) { return {x, y, z, w}; }
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline float __uint_as_float(u32 i) { float f; std::memcpy(&f, &i, 4); return f; }
inline u32 float_bits(float f) { u32 i; std::memcpy(&i, &f, 4); return i; }
inline u32 __float_as_uint(float f) { return float_bits(f); }
using std::min;

// ---- fibers, barriers, warp exchange ---------------------------------------------------------
namespace emu {

struct Barrier {
    int count = 0, arrived = 0;
    unsigned generation = 0;
};

constexpr size_t SLOT = 128, STACK = 256 << 10;

struct Fiber {
    ucontext_t context;
    std::vector<char> stack;
    uint3 thread;
    Barrier* waiting = nullptr;
    unsigned generation = 0;
    bool done = false;
    alignas(16) unsigned char inbox[32 * SLOT];  // this lane's copy of the warp's last exchange
};

struct Cta {
    std::vector<Fiber> fibers;
    Barrier block;
    std::vector<Barrier> warps;
    std::vector<unsigned char> slots;  // [warp][lane][SLOT] bytes
    std::function<void()> body;
};

inline Cta* cta = nullptr;
inline unsigned cta_serial = 0;  // counts the CTAs run: per-CTA state elsewhere is keyed on it
inline Fiber* current = nullptr;
inline ucontext_t scheduler;
inline uint3 block_index, grid_size, block_size;

inline void wait(Barrier& b) {
    if (++b.arrived == b.count) {  // the last one releases the others
        b.arrived = 0;
        b.generation++;
        return;
    }
    current->waiting = &b;
    current->generation = b.generation;
    swapcontext(&current->context, &scheduler);
}

inline void entry() {
    cta->body();
    current->done = true;  // uc_link returns to the scheduler
}

// Run `body` as one CTA of `threads` threads; false if the threads deadlocked at a barrier.
inline bool run_cta(unsigned threads, const std::function<void()>& body) {
    Cta c;
    c.fibers.resize(threads);
    c.block.count = threads;
    c.warps.resize((threads + 31) / 32);
    for (auto& w : c.warps) w.count = 32;
    c.slots.assign(c.warps.size() * 32 * SLOT, 0);
    c.body = body;
    cta = &c;
    cta_serial++;
    for (unsigned i = 0; i < threads; i++) {
        Fiber& f = c.fibers[i];
        f.stack.resize(STACK);
        f.thread = {i, 0, 0};
        getcontext(&f.context);
        f.context.uc_stack.ss_sp = f.stack.data();
        f.context.uc_stack.ss_size = STACK;
        f.context.uc_link = &scheduler;
        makecontext(&f.context, entry, 0);
    }
    for (;;) {
        bool progressed = false, all_done = true;
        for (Fiber& f : c.fibers) {
            if (f.done) continue;
            all_done = false;
            if (f.waiting && f.waiting->generation == f.generation) continue;
            f.waiting = nullptr;
            current = &f;
            swapcontext(&scheduler, &f.context);
            progressed = true;
        }
        if (all_done) return true;
        if (!progressed) {
            std::fprintf(stderr, "emulated CTA (%u, %u, %u): threads wait at a barrier or warp instruction that "
                         "not all of them reach\n", block_index.x, block_index.y, block_index.z);
            return false;
        }
    }
}

// Every lane contributes `mine`; returns the 32 lanes' values (valid until this lane's next call).
template <class T> const T* exchange(const T& mine) {
    static_assert(sizeof(T) <= SLOT && 32 * sizeof(T) <= sizeof(Fiber::inbox), "exchange slot too small");
    const unsigned warp = current->thread.x / 32, lane = current->thread.x % 32;
    unsigned char* slots = &cta->slots[warp * 32 * SLOT];
    std::memcpy(slots + lane * SLOT, &mine, sizeof(T));
    wait(cta->warps[warp]);
    T* out = reinterpret_cast<T*>(current->inbox);
    for (int l = 0; l < 32; l++) std::memcpy(&out[l], slots + l * SLOT, sizeof(T));
    wait(cta->warps[warp]);  // the slots may be reused after everyone has read them
    return out;
}

inline unsigned lane() { return current->thread.x % 32; }

}  // namespace emu

#define threadIdx (emu::current->thread)
#define blockIdx (emu::block_index)
#define gridDim (emu::grid_size)
#define blockDim (emu::block_size)

inline void __syncthreads() { emu::wait(emu::cta->block); }
inline void __syncwarp() { emu::wait(emu::cta->warps[emu::current->thread.x / 32]); }

template <class T> T __shfl_xor_sync(unsigned, T v, int mask) {
    return emu::exchange(v)[emu::lane() ^ mask];
}

// Launch `kernel` over `grid` CTAs of `threads` threads; false on a deadlock.
template <class... P, class... A> bool emu_launch(void (*kernel)(P...), uint3 grid, unsigned threads, A... args) {
    emu::grid_size = grid;
    emu::block_size = {threads, 1, 1};
    for (unsigned z = 0; z < grid.z; z++)
        for (unsigned y = 0; y < grid.y; y++)
            for (unsigned x = 0; x < grid.x; x++) {
                emu::block_index = {x, y, z};
                if (!emu::run_cta(threads, [&] { kernel(args...); })) return false;
            }
    return true;
}

// ---- conversions ----------------------------------------------------------------------------
inline float ptx_f16_to_f32(u16 h) {
    const int e = (h >> 10) & 31, m = h & 1023;
    const float v = e == 0 ? std::ldexp((float)m, -24) : e == 31 ? (m ? NAN : INFINITY) : std::ldexp(1024.0f + m, e - 25);
    return (h & 0x8000) ? -v : v;
}

inline u16 ptx_f32_to_bf16(float f) {  // round to nearest even
    const u32 x = float_bits(f);
    if ((x & 0x7FFFFFFF) > 0x7F800000) return 0x7FC0;
    return (u16)((x + 0x7FFF + ((x >> 16) & 1)) >> 16);
}

inline u16 ptx_f32_to_f16(float f) {  // round to nearest even, overflow to infinity
    const u32 x = float_bits(f), sign = (x >> 16) & 0x8000, a = x & 0x7FFFFFFF;
    if (a > 0x7F800000) return 0x7E00;
    if (a >= 0x477FF000) return sign | 0x7C00;                                   // ≥ 65520: infinity
    if (a < 0x38800000) return sign | (u16)std::rint(std::fabs(f) * 16777216.0f);  // subnormal: units of 2^-24
    u32 h = ((a >> 23) - 112) << 10 | ((a >> 13) & 1023);
    const u32 rest = a & 0x1FFF;
    if (rest > 0x1000 || (rest == 0x1000 && (h & 1))) h++;
    return sign | h;
}

inline u32 ptx_f32_to_e4m3(float f) {  // round to nearest even, saturating at ±448 (satfinite)
    if (std::isnan(f)) return 0x7F;
    const u32 sign = std::signbit(f) ? 0x80 : 0;
    const float a = std::fabs(f);
    if (a < 0.015625f) return sign | (u32)std::rint(a * 512.0f);  // subnormals: units of 2^-9 (8 → 2^-6)
    int e;
    std::frexp(a, &e);  // a = m·2^e, m in [0.5, 1)
    e -= 1;             // a = (1 + f)·2^e
    u32 q = (u32)std::rint((std::ldexp(a, -e) - 1.0f) * 8.0f);
    if (q == 8) q = 0, e++;
    const u32 code = (u32)(e + 7) << 3 | q;
    return sign | std::min(code, 0x7Eu);
}

inline float ptx_e4m3_to_f32(u32 byte) {
    const int e = (byte >> 3) & 15, m = byte & 7;
    const float v = e == 0 ? std::ldexp((float)m, -9) : std::ldexp(1.0f + m / 8.0f, e - 7);
    return (byte & 0x80) ? -v : v;
}

// ---- memory ---------------------------------------------------------------------------------
inline uint4 ptx_ldg16(const void* p) { uint4 v; std::memcpy(&v, p, 16); return v; }
inline uint2 ptx_ldg8(const void* p) { uint2 v; std::memcpy(&v, p, 8); return v; }
inline u32 ptx_ldg4(const void* p) { u32 v; std::memcpy(&v, p, 4); return v; }
inline u16 ptx_ldg2(const void* p) { u16 v; std::memcpy(&v, p, 2); return v; }

inline void ptx_prefetch_l1(const void*) {}  // no cache to warm

inline void ptx_cp_async16(void* smem, const void* gmem, bool pred) {  // completes at once
    if (pred) std::memcpy(smem, gmem, 16); else std::memset(smem, 0, 16);
}
inline void ptx_cp_async_commit() {}
template <int N> void ptx_cp_async_wait() {}

inline void ptx_ldmatrix_x4(u32 (&r)[4], const void* smem) {
    const void* const* rows = emu::exchange(smem);
    const unsigned g = emu::lane() / 4, t = emu::lane() % 4;
    for (int j = 0; j < 4; j++) std::memcpy(&r[j], (const char*)rows[8 * j + g] + 4 * t, 4);
}

// ---- MMAs: fragments → matrices as the PTX ISA defines them, then the product ----------------
namespace emu {

template <class In> struct Operands {
    In a;
    u32 b[2];
};

inline int nibble(u32 word, int e, bool is_signed) {
    const int v = (word >> (4 * e)) & 15;
    return is_signed && v >= 8 ? v - 16 : v;
}

inline int byte_of(u32 word, int i, bool is_signed) {
    const int v = (word >> (8 * i)) & 255;
    return is_signed && v >= 128 ? v - 256 : v;
}

inline float half_of(u32 word, int h, bool bf16) {
    const u16 bits = (u16)(word >> (16 * h));
    return bf16 ? __uint_as_float((u32)bits << 16) : ptx_f16_to_f32(bits);
}

inline float e2m1(u32 word, int e) {
    static const float magnitude[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
    const int v = (word >> (4 * e)) & 15;
    return v & 8 ? -magnitude[v & 7] : magnitude[v & 7];
}

}  // namespace emu

// m16n8k16: A lane (g, t) reg r half h = (row g + 8·(r & 1), col 2t + h + 8·(r >> 1)); B reg r half h =
// (row 2t + h + 8r, col g); C/D element i = (row g + 8·(i >> 1), col 2t + (i & 1)).
template <bool BF16> void ptx_mma_16816(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    struct In { u32 a[4], b[2]; };
    const In* all = emu::exchange(In{{a[0], a[1], a[2], a[3]}, {b0, b1}});
    float A[16][16], B[16][8];
    for (int l = 0; l < 32; l++) {
        const int g = l / 4, t = l % 4;
        for (int r = 0; r < 4; r++)
            for (int h = 0; h < 2; h++) A[g + 8 * (r & 1)][2 * t + h + 8 * (r >> 1)] = emu::half_of(all[l].a[r], h, BF16);
        for (int r = 0; r < 2; r++)
            for (int h = 0; h < 2; h++) B[2 * t + h + 8 * r][g] = emu::half_of(all[l].b[r], h, BF16);
    }
    const int g = emu::lane() / 4, t = emu::lane() % 4;
    for (int i = 0; i < 4; i++)
        for (int k = 0; k < 16; k++) d[i] = std::fma(A[g + 8 * (i >> 1)][k], B[k][2 * t + (i & 1)], d[i]);
}

// m16n8k8 (fp16): A reg r half h = (row g + 8r, col 2t + h); B half h = (row 2t + h, col g).
inline void ptx_mma_1688(float (&d)[4], u32 a0, u32 a1, u32 b0) {
    struct In { u32 a[2], b; };
    const In* all = emu::exchange(In{{a0, a1}, b0});
    float A[16][8], B[8][8];
    for (int l = 0; l < 32; l++) {
        const int g = l / 4, t = l % 4;
        for (int h = 0; h < 2; h++) {
            A[g][2 * t + h] = emu::half_of(all[l].a[0], h, false);
            A[g + 8][2 * t + h] = emu::half_of(all[l].a[1], h, false);
            B[2 * t + h][g] = emu::half_of(all[l].b, h, false);
        }
    }
    const int g = emu::lane() / 4, t = emu::lane() % 4;
    for (int i = 0; i < 4; i++)
        for (int k = 0; k < 8; k++) d[i] = std::fma(A[g + 8 * (i >> 1)][k], B[k][2 * t + (i & 1)], d[i]);
}

// m16n8k64 s4/u4: A reg r nibble e = (row g + 8·(r & 1), col 8t + e + 32·(r >> 1)); B reg r nibble e =
// (row 8t + e + 32r, col g).
template <bool UA> void ptx_mma_16864_s4(int (&d)[4], const u32 (&a)[4], u32 b0, u32 b1, int c) {
    struct In { u32 a[4], b[2]; };
    const In* all = emu::exchange(In{{a[0], a[1], a[2], a[3]}, {b0, b1}});
    int A[16][64], B[64][8];
    for (int l = 0; l < 32; l++) {
        const int g = l / 4, t = l % 4;
        for (int e = 0; e < 8; e++) {
            for (int r = 0; r < 4; r++) A[g + 8 * (r & 1)][8 * t + e + 32 * (r >> 1)] = emu::nibble(all[l].a[r], e, !UA);
            for (int r = 0; r < 2; r++) B[8 * t + e + 32 * r][g] = emu::nibble(all[l].b[r], e, true);
        }
    }
    const int g = emu::lane() / 4, t = emu::lane() % 4;
    for (int i = 0; i < 4; i++) {
        d[i] = c;
        for (int k = 0; k < 64; k++) d[i] += A[g + 8 * (i >> 1)][k] * B[k][2 * t + (i & 1)];
    }
}

// m16n8k32 s8/u8: A reg r byte i = (row g + 8·(r & 1), col 4t + i + 16·(r >> 1)); B reg r byte i =
// (row 4t + i + 16r, col g).
template <bool UA> void ptx_mma_16832_s8(int (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    struct In { u32 a[4], b[2]; };
    const In* all = emu::exchange(In{{a[0], a[1], a[2], a[3]}, {b0, b1}});
    int A[16][32], B[32][8];
    for (int l = 0; l < 32; l++) {
        const int g = l / 4, t = l % 4;
        for (int i = 0; i < 4; i++) {
            for (int r = 0; r < 4; r++) A[g + 8 * (r & 1)][4 * t + i + 16 * (r >> 1)] = emu::byte_of(all[l].a[r], i, !UA);
            for (int r = 0; r < 2; r++) B[4 * t + i + 16 * r][g] = emu::byte_of(all[l].b[r], i, true);
        }
    }
    const int g = emu::lane() / 4, t = emu::lane() % 4;
    for (int i = 0; i < 4; i++)
        for (int k = 0; k < 32; k++) d[i] += A[g + 8 * (i >> 1)][k] * B[k][2 * t + (i & 1)];
}

// m8n8k32 s4/u4: A nibble e = (row g, col 8t + e); B nibble e = (row 8t + e, col g); D i = (row g, col 2t + i).
template <bool UA> void ptx_mma_8832_s4(int (&d)[2], u32 a, u32 b) {
    struct In { u32 a, b; };
    const In* all = emu::exchange(In{a, b});
    int A[8][32], B[32][8];
    for (int l = 0; l < 32; l++) {
        const int g = l / 4, t = l % 4;
        for (int e = 0; e < 8; e++) {
            A[g][8 * t + e] = emu::nibble(all[l].a, e, !UA);
            B[8 * t + e][g] = emu::nibble(all[l].b, e, true);
        }
    }
    const int g = emu::lane() / 4, t = emu::lane() % 4;
    for (int i = 0; i < 2; i++)
        for (int k = 0; k < 32; k++) d[i] += A[g][k] * B[k][2 * t + i];
}

// Block-scaled E2M1 m16n8k64 (mxf4nvf4, scale_vec::4X, ue4m3): fragments as m16n8k64 s4. Row r's
// scales come from lane 4·(r & 7) + 2·ta + (r >> 3), column c's from lane 4c + tb; byte q scales
// k = 16q..16q+15.
inline void ptx_mma_fp4(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1, u32 sfa, u16 ta, u32 sfb, u16 tb) {
    struct In { u32 a[4], b[2], sfa, sfb; };
    const In* all = emu::exchange(In{{a[0], a[1], a[2], a[3]}, {b0, b1}, sfa, sfb});
    float A[16][64], B[64][8];
    for (int l = 0; l < 32; l++) {
        const int g = l / 4, t = l % 4;
        for (int e = 0; e < 8; e++) {
            for (int r = 0; r < 4; r++) A[g + 8 * (r & 1)][8 * t + e + 32 * (r >> 1)] = emu::e2m1(all[l].a[r], e);
            for (int r = 0; r < 2; r++) B[8 * t + e + 32 * r][g] = emu::e2m1(all[l].b[r], e);
        }
    }
    for (int r = 0; r < 16; r++)
        for (int k = 0; k < 64; k++) A[r][k] *= ptx_e4m3_to_f32((all[4 * (r & 7) + 2 * ta + (r >> 3)].sfa >> (8 * (k / 16))) & 255);
    for (int c = 0; c < 8; c++)
        for (int k = 0; k < 64; k++) B[k][c] *= ptx_e4m3_to_f32((all[4 * c + tb].sfb >> (8 * (k / 16))) & 255);
    const int g = emu::lane() / 4, t = emu::lane() % 4;
    for (int i = 0; i < 4; i++)
        for (int k = 0; k < 64; k++) d[i] = std::fma(A[g + 8 * (i >> 1)][k], B[k][2 * t + (i & 1)], d[i]);
}

// ---- warpgroup MMA (sm_90a; the emulated build defines __CUDA_ARCH_FEAT_SM90_ALL) -------------------
// wgmma is asynchronous: an mma_async only records its operands (where the registers are, the shared-
// memory descriptor), and wgmma.wait_group executes the retired groups, reading the A registers, the
// accumulators and shared memory THEN. A kernel that touches them between issue and wait, or overwrites
// the operand in shared memory too early, therefore computes wrong numbers here, as it may on a GPU.
// Executing one MMA is a warpgroup exchange (128 threads, consecutive slots of the warps' slot array):
// the first thread through computes the 64xN product for the group, each thread takes its fragment.
// Only what the kernels use is implemented (m64n128k32, A in registers, B K-major without swizzling);
// anything else aborts naming what it met.
namespace emu {

struct WgmmaOp {
    int* d;         // the thread's 64 accumulators
    const u32* a;   // its 4 A registers
    unsigned long long desc;
    bool unsigned_a;
    unsigned group;  // commit groups issued before this op
};

struct WgmmaThread {
    std::vector<WgmmaOp> ops;
    unsigned committed = 0;
};

struct Warpgroups {
    unsigned owner = 0;  // cta_serial of the CTA this state belongs to
    std::vector<Barrier> barriers;
    std::vector<std::vector<int>> products;  // [warpgroup][64 x 128]
    std::vector<unsigned> tags;              // barrier generation the product was computed for
    std::vector<WgmmaThread> threads;
};

inline Warpgroups warpgroups;

[[noreturn]] inline void wgmma_abort(const char* what) {
    std::fprintf(stderr, "emulated wgmma, CTA (%u, %u, %u) thread %u: %s\n", block_index.x, block_index.y,
                 block_index.z, current->thread.x, what);
    std::abort();
}

inline Warpgroups& warpgroups_of_cta() {
    Warpgroups& w = warpgroups;
    if (w.owner != cta_serial) {
        for (const WgmmaThread& t : w.threads)
            if (!t.ops.empty()) wgmma_abort("the previous CTA ended with wgmma that no wait_group retired");
        const size_t threads = cta->fibers.size();
        if (threads % 128) wgmma_abort("the block is not a whole number of warpgroups");
        w.barriers.assign(threads / 128, Barrier{});
        for (Barrier& b : w.barriers) b.count = 128;
        w.products.assign(threads / 128, std::vector<int>(64 * 128));
        w.tags.assign(threads / 128, ~0u);
        w.threads.assign(threads, WgmmaThread{});
        w.owner = cta_serial;
    }
    return w;
}

// The emulated shared-memory window: descriptors hold 18-bit addresses, so they are taken relative to a
// point 128 KB below the first address a CTA describes (all of a kernel's shared memory lies within
// 128 KB of that). Reset for every CTA: each kernel's `__shared__` variables are statics of their own.
inline uintptr_t shared_window = 0;
inline unsigned shared_window_owner = 0;  // cta_serial

inline const unsigned char* shared_address(unsigned long long field14) {
    return reinterpret_cast<const unsigned char*>(shared_window + (field14 << 4));
}

// D = A·B of one m64n128k32 for the warpgroup of `all` (128 threads' operands).
inline void wgmma_product(const WgmmaOp* const* all, int* product) {
    const unsigned long long desc = all[0]->desc;
    const bool ua = all[0]->unsigned_a;
    static int A[64][32], B[32][128];
    for (int l = 0; l < 128; l++) {
        if (all[l]->desc != desc || all[l]->unsigned_a != ua) wgmma_abort("threads of one warpgroup disagree on an operand");
        const int w = l / 32, g = (l % 32) / 4, t = l % 4;
        for (int r = 0; r < 4; r++)
            for (int i = 0; i < 4; i++) A[16 * w + g + 8 * (r & 1)][4 * t + i + 16 * (r >> 1)] = byte_of(all[l]->a[r], i, !ua);
    }
    if ((desc >> 49) & 7) wgmma_abort("descriptor base offset is not 0");
    if (desc >> 62) wgmma_abort("swizzled shared-memory layouts are not emulated");
    const unsigned char* start = shared_address(desc & 0x3FFF);
    const size_t lbo = ((desc >> 16) & 0x3FFF) << 4, sbo = ((desc >> 32) & 0x3FFF) << 4;
    // K-major, no swizzle: core matrices of 8 rows (n) x 16 bytes (k); LBO steps k by 16, SBO n by 8.
    for (int n = 0; n < 128; n++)
        for (int k = 0; k < 32; k++) B[k][n] = (signed char)start[(n / 8) * sbo + (k / 16) * lbo + (n % 8) * 16 + k % 16];
    for (int m = 0; m < 64; m++)
        for (int n = 0; n < 128; n++) {
            int s = 0;
            for (int k = 0; k < 32; k++) s += A[m][k] * B[k][n];
            product[128 * m + n] = s;
        }
}

inline void wgmma_execute(const WgmmaOp& op) {
    Warpgroups& w = warpgroups_of_cta();
    const unsigned tid = current->thread.x, group = tid / 128, lane = tid % 32, warp = (tid % 128) / 32;
    unsigned char* slots = &cta->slots[(size_t)group * 128 * SLOT];
    const WgmmaOp* mine = &op;
    std::memcpy(slots + (tid % 128) * SLOT, &mine, sizeof mine);
    Barrier& barrier = w.barriers[group];
    wait(barrier);
    if (w.tags[group] != barrier.generation) {
        const WgmmaOp* all[128];
        for (int l = 0; l < 128; l++) std::memcpy(&all[l], slots + l * SLOT, sizeof all[l]);
        wgmma_product(all, w.products[group].data());
        w.tags[group] = barrier.generation;
    }
    const int* product = w.products[group].data();
    const int g = lane / 4, t = lane % 4;
    for (int j = 0; j < 16; j++)
        for (int e = 0; e < 4; e++) {
            const int v = product[128 * (16 * warp + g + 8 * (e >> 1)) + 8 * j + 2 * t + (e & 1)];
            op.d[4 * j + e] = (int)((u32)op.d[4 * j + e] + (u32)v);  // int32 wrap-around, as the hardware
        }
    wait(barrier);  // the slots may be reused after everyone has read them
}

}  // namespace emu

inline unsigned long long ptx_smem_desc(const void* smem, u32 lbo, u32 sbo) {
    const uintptr_t address = reinterpret_cast<uintptr_t>(smem);
    if (emu::shared_window_owner != emu::cta_serial) {
        emu::shared_window = (address & ~uintptr_t(15)) - (128u << 10);
        emu::shared_window_owner = emu::cta_serial;
    }
    const uintptr_t offset = address - emu::shared_window;
    if (address % 16 || offset >= (1u << 18)) emu::wgmma_abort("descriptor address unaligned or outside the window");
    return (unsigned long long)(offset >> 4) | (unsigned long long)((lbo & 0x3FFFF) >> 4) << 16 |
           (unsigned long long)((sbo & 0x3FFFF) >> 4) << 32;
}

inline void ptx_wgmma_fence() {}
inline void ptx_fence_proxy_async() {}
template <int N> void ptx_hold(int (&)[N]) {}

template <bool UA> void ptx_wgmma_m64n128k32_s8(int (&d)[64], const u32 (&a)[4], unsigned long long b) {
    emu::WgmmaThread& me = emu::warpgroups_of_cta().threads[emu::current->thread.x];
    me.ops.push_back({d, a, b, UA, me.committed});
}

inline void ptx_wgmma_commit() {
    emu::warpgroups_of_cta().threads[emu::current->thread.x].committed++;
}

template <int N> void ptx_wgmma_wait() {
    emu::WgmmaThread& me = emu::warpgroups_of_cta().threads[emu::current->thread.x];
    size_t done = 0;
    while (done < me.ops.size() && me.ops[done].group + N < me.committed) done++;
    const std::vector<emu::WgmmaOp> retired(me.ops.begin(), me.ops.begin() + done);
    me.ops.erase(me.ops.begin(), me.ops.begin() + done);
    for (const emu::WgmmaOp& op : retired) emu::wgmma_execute(op);
}
