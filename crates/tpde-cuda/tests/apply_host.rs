//! The reconstruction kernels of `kernels/tpde_apply.cu`, run on the host:
//! the apply program (`kernels/tpde_xxh3.cu` with
//! `XXH3_DEVICE_FUNCTIONS_ONLY`, then `kernels/tpde_apply.cu`, as
//! `kernels.rs` builds `APPLY_PROGRAM`) is compiled with the system C++
//! compiler over a small emulation of the CUDA built-ins it uses (a block is
//! 256 CPU threads; `__syncthreads`, warp shuffles and matches are barriers
//! over them), so the kernels run as written, lane by lane, with no GPU, in
//! the order `Gpu::launch` gives them: `tile_totals` and `tile_scan` when a
//! batch has gap or bitmap chunks, `group_hist_wN` and `group_scan` when it
//! has chunks of grouped values, `apply_wN` for the positional ones,
//! `apply_grouped_wN` for the grouped ones, then `check_counts`; and for the
//! positions stage `tile_totals`, `tile_scan` and `positions`.
//!
//! For every word width the harness builds batches of every chunk kind
//! (gaps of width 1, 2 and 4, bitmaps of a length that is not a multiple of
//! 8, lists, dense, raw), XOR and SUB, the three value layouts, values in
//! positional order and grouped by base key (stored in the order of a stable
//! sort by key, which the harness does itself), in place and (dense, raw)
//! into a distinct output, with the base, output and value streams aligned
//! for word groups or one word off; of one word, less than a tile and
//! several tiles with a partial last one, changes at the first and last word
//! and tiles without changes. It checks every output word, the changed
//! counts, every tile sum and group row, and the leaf-digest term rows of
//! dense and raw chunks (against `xxh3_block_terms`, folded into the digest
//! of `xxh3_128_host`; rows past the whole blocks stay unwritten). Tile sums
//! and group rows start as garbage, so a value read before it is written
//! shows. Hostile chunks (zero gaps, positions past the chunk, bitmap
//! padding bits, set bits that differ from the changed count, values that
//! leave their word, unknown kinds, ops, layouts, orders and gap widths, term
//! rows where no kernel writes them) must raise their flag bits and write
//! nothing outside their output; guard bytes surround every buffer.
//! `positions`, `copy_ranges` and `fill_streams` are checked the same way.

mod host_cxx;

use std::path::{Path, PathBuf};
use std::process::Command;

const XXH3_SOURCE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../kernels/tpde_xxh3.cu");
const APPLY_SOURCE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../kernels/tpde_apply.cu");

/// The CUDA built-ins that the kernels use, on CPU threads. One block runs
/// at a time, so `__shared__` variables are statics.
const SHIM: &str = r#"
#include <algorithm>
#include <barrier>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <numeric>
#include <string>
#include <thread>
#include <vector>
#define __device__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __grid_constant__
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static
// tpde_xxh3.cu defines it in its device part only, which the host skips.
#define XXH_SECRET_WORDS 24
struct Dim3 { unsigned x, y, z; };
thread_local Dim3 threadIdx, blockIdx;
static Dim3 blockDim, gridDim;
struct alignas(16) uint4 { unsigned x, y, z, w; };
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
static std::barrier<>* g_block;
struct Warp { std::barrier<>* bar; unsigned long long slot[32]; };
static Warp g_warps[8];
inline void __syncthreads() { g_block->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { g_warps[threadIdx.x / 32].bar->arrive_and_wait(); }
template <typename T> T warp_exchange(T v, unsigned src) {
    Warp& w = g_warps[threadIdx.x / 32];
    w.slot[threadIdx.x % 32] = (unsigned long long)v;
    w.bar->arrive_and_wait();
    T r = (T)w.slot[src];
    w.bar->arrive_and_wait();
    return r;
}
template <typename T> T __shfl_xor_sync(unsigned, T v, unsigned m, int = 32) {
    return warp_exchange(v, (threadIdx.x % 32) ^ (m & 31u));
}
template <typename T> T __shfl_up_sync(unsigned, T v, unsigned d) {
    const unsigned lane = threadIdx.x % 32;
    return warp_exchange(v, lane >= d ? lane - d : lane);
}
template <typename T> T __shfl_down_sync(unsigned, T v, unsigned d) {
    const unsigned lane = threadIdx.x % 32;
    return warp_exchange(v, lane + d < 32 ? lane + d : lane);
}
inline unsigned __match_any_sync(unsigned, unsigned v) {
    Warp& w = g_warps[threadIdx.x / 32];
    w.slot[threadIdx.x % 32] = v;
    w.bar->arrive_and_wait();
    unsigned m = 0;
    for (unsigned l = 0; l < 32; l++) m |= (unsigned)(w.slot[l] == v) << l;
    w.bar->arrive_and_wait();
    return m;
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(unsigned x) { return __builtin_ffs((int)x); }
inline unsigned atomicOr(unsigned* a, unsigned v) { return __atomic_fetch_or(a, v, __ATOMIC_SEQ_CST); }
inline unsigned atomicAdd(unsigned* a, unsigned v) { return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST); }
"#;

/// Builds the batches, runs the kernels over them as the loader launches
/// them, checks everything against the CPU, prints each failure and exits
/// nonzero if there was any. argv[1]: `good` or `hostile`.
const HARNESS: &str = r#"
// The block's threads, made once: a launch hands them its kernel and waits
// until they have run every block of the grid, one block at a time.
struct Pool {
    std::barrier<> start{THREADS + 1}, done{THREADS + 1}, block{THREADS};
    std::vector<std::unique_ptr<std::barrier<>>> warps;
    std::vector<std::thread> threads;
    std::function<void()> kernel;
    bool quit = false;
    Pool() {
        g_block = &block;
        for (unsigned w = 0; w < THREADS / 32; w++) {
            warps.emplace_back(new std::barrier<>(32));
            g_warps[w].bar = warps.back().get();
        }
        for (unsigned t = 0; t < THREADS; t++) {
            threads.emplace_back([this, t] {
                threadIdx = {t, 0, 0};
                for (;;) {
                    start.arrive_and_wait();
                    if (quit) return;
                    for (unsigned y = 0; y < gridDim.y; y++) {
                        for (unsigned x = 0; x < gridDim.x; x++) {
                            blockIdx = {x, y, 0};
                            kernel();
                            block.arrive_and_wait();  // the next block starts when this one is done
                        }
                    }
                    done.arrive_and_wait();
                }
            });
        }
    }
    ~Pool() {
        quit = true;
        start.arrive_and_wait();
        for (auto& t : threads) t.join();
    }
};
static Pool* g_pool;

// Runs `kernel` over a grid of gx * gy blocks of THREADS threads.
template <typename K> static void launch(unsigned gx, unsigned gy, K kernel) {
    if (gx == 0 || gy == 0) return;
    blockDim = {THREADS, 1, 1};
    gridDim = {gx, gy, 1};
    g_pool->kernel = kernel;
    g_pool->start.arrive_and_wait();
    g_pool->done.arrive_and_wait();
}

static int g_failures = 0;
static int g_checked = 0;

__attribute__((format(printf, 2, 3))) static void fail(const std::string& where, const char* fmt, ...) {
    g_failures++;
    std::printf("FAIL %s: ", where.c_str());
    va_list ap;
    va_start(ap, fmt);
    std::vprintf(fmt, ap);
    va_end(ap);
    std::printf("\n");
}

// The flag must hold every bit of `need`, and besides them only bits of `allow`.
static void check_flag(const std::string& batch, u32 flag, u32 need, u32 allow) {
    if ((flag & need) != need || (flag & ~(need | allow)) != 0) {
        fail(batch, "flag %#x, want the bits %#x and maybe %#x", flag, need, allow);
    }
}

struct Rng {
    u64 s;
    u64 step() {
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        return s >> 32;
    }
    u64 next() {
        const u64 hi = step();
        return (hi << 32) | step();
    }
    u64 below(u64 k) { return next() % k; }
};

// Bytes around every buffer that the kernels see; nothing may write them.
static const u8 GUARD_BYTE = 0x5A;
static const size_t GUARD = 64;

struct Region {
    std::vector<u8> mem;
    size_t at, len;
    // `len` bytes `skew` bytes past an `align` boundary, filled with `fill`.
    Region(size_t len_, size_t align, size_t skew, u8 fill) : mem(len_ + 2 * GUARD + align + 8, GUARD_BYTE), len(len_) {
        const uintptr_t lo = (uintptr_t)mem.data() + GUARD;
        at = (size_t)((lo + align - 1) / align * align + skew - (uintptr_t)mem.data());
        std::memset(mem.data() + at, fill, len);
    }
    u8* ptr() { return mem.data() + at; }
    u64 addr() { return (u64)(uintptr_t)ptr(); }
    std::vector<u8> bytes() const { return std::vector<u8>(mem.begin() + at, mem.begin() + at + len); }
    bool guards_intact() const {
        for (size_t i = 0; i < mem.size(); i++) {
            if ((i < at || i >= at + len) && mem[i] != GUARD_BYTE) return false;
        }
        return true;
    }
};

struct Arena {
    std::vector<std::unique_ptr<Region>> keep;
    Region* make(size_t len, size_t align, size_t skew, u8 fill) {
        keep.emplace_back(new Region(len, align, skew, fill));
        return keep.back().get();
    }
};

// Tile sums and group rows hold this before the kernels: a value read
// before a kernel wrote it is a huge offset or count, which shows.
static const u8 GARBAGE_BYTE = 0xAB;
static const u64 SUM_GARBAGE = 0xABABABABABABABABull;
static const u32 ROW_GARBAGE = 0xABABABABu;
static const u8 TERM_GARBAGE = 0xA5;  // term rows before the apply
static const u8 OUT_GARBAGE = 0xC3;   // a distinct output before the apply
static const u8 POS_GARBAGE = 0xEE;   // the output of `positions` before it runs
static const u32 POS_GARBAGE_WORD = 0xEEEEEEEEu;
static const u32 BITMAP_TILE_WORDS = 8 * BITMAP_TILE_BYTES;

enum Check {
    EXACT,         // the output is the CPU's (positions past the chunk and values past m left out)
    OUTSIDE_LIST,  // words at no listed position are the base's
    UNTOUCHED,     // nothing of the chunk was written (a rejected descriptor)
};

struct Spec {
    std::string what;
    u32 kind = KIND_SPARSE_GAPS;
    u32 n = 0;
    std::vector<u32> list;  // positions of the sparse kinds, in stored order (bitmap: its set bits)
    u32 op = OP_XOR, layout = LAYOUT_WORDS, order = ORDER_POSITIONAL;
    u32 gap_width = 0;                // 0: the narrowest that holds every gap
    u32 base_skew = 0, out_skew = 0;  // words past a 32-byte boundary
    u32 val_skew = 0;                 // words (planes: bytes) past an aligned boundary
    bool in_place = true;             // base == out
    bool terms = false;               // term rows of the leaf digest
    bool few_keys = false;            // base words drawn from three: long runs of one key
    u32 zero_one_in = 0;              // dense: a value is 0 (its word unchanged) with these odds
    u32 quiet_lo = 0, quiet_hi = 0;   // dense: the values of these words are 0
    long zero_at = -1;                // a value that leaves its word, counted as a change in m
    int m_delta = 0;                  // bitmap: m = set bits + m_delta
    bool pad_bits = false;            // bitmap: the padding bits of the last byte set
    std::function<void(ChunkDesc&)> tamper;  // makes the descriptor one the kernels must refuse
    u32 need = 0, allow = 0;                 // flag bits the chunk must, may raise
    Check check = EXACT;

    Spec grouped() const { Spec s = *this; s.order = ORDER_GROUPED; return s; }
    Spec apart(u32 base, u32 out) const {
        Spec s = *this;
        s.in_place = false;
        s.base_skew = base;
        s.out_skew = out;
        return s;
    }
    Spec skewed() const { Spec s = *this; s.base_skew = s.out_skew = 1; return s; }
    Spec val_off() const { Spec s = *this; s.val_skew = 1; return s; }
    Spec with_terms() const { Spec s = *this; s.terms = true; return s; }
    Spec gap_w(u32 w) const { Spec s = *this; s.gap_width = w; return s; }
    Spec few() const { Spec s = *this; s.few_keys = true; return s; }
    Spec zeros(u32 one_in) const { Spec s = *this; s.zero_one_in = one_in; return s; }
    Spec quiet(u32 lo, u32 hi) const { Spec s = *this; s.quiet_lo = lo; s.quiet_hi = hi; return s; }
    Spec zero(long j) const { Spec s = *this; s.zero_at = j; return s; }
    Spec m_off(int delta) const { Spec s = *this; s.m_delta = delta; return s; }
    Spec padded() const { Spec s = *this; s.pad_bits = true; return s; }
    Spec tampered(std::function<void(ChunkDesc&)> f) const { Spec s = *this; s.tamper = std::move(f); return s; }
    Spec bad(u32 need_, u32 allow_, Check check_) const {
        Spec s = *this;
        s.need = need_;
        s.allow = allow_;
        s.check = check_;
        return s;
    }
};

static Spec chunk(std::string what, u32 kind, u32 n, std::vector<u32> list, u32 op, u32 layout) {
    Spec s;
    s.what = std::move(what);
    s.kind = kind;
    s.n = n;
    s.list = std::move(list);
    s.op = op;
    s.layout = layout;
    return s;
}

template <typename T> static T rd(const std::vector<u8>& b, u64 i) {
    T w;
    std::memcpy(&w, b.data() + i * sizeof(T), sizeof(T));
    return w;
}

template <typename T> static void wr(std::vector<u8>& b, u64 i, T w) { std::memcpy(b.data() + i * sizeof(T), &w, sizeof(T)); }

// The spec's combine, written apart from the kernel's: XOR, or the base plus
// the zigzag-decoded difference.
template <typename T> static T ref_combine(T b, T v, u32 op) {
    if (op == OP_XOR) return (T)(b ^ v);
    const T half = (T)(v >> 1);
    const T d = (v & 1) ? (T)((T)0 - half - (T)1) : half;
    return (T)(b + d);
}

template <typename T> static T rotl1(T v) { return (T)((T)(v << 1) | (T)(v >> (8 * sizeof(T) - 1))); }

// The base key of spec §8.6: the top byte of the word rotated left by one.
template <typename T> static u32 ref_key(T b) { return (u32)(rotl1<T>(b) >> (8 * sizeof(T) - 8)) & 0xFFu; }

static bool is_words(u32 kind) { return kind == KIND_DENSE || kind == KIND_RAW; }

// A chunk as built: its buffers, their contents before the kernels, and
// what the CPU reads back from its stored positions.
struct Built {
    Region* base = nullptr;
    Region* out = nullptr;
    Region* terms = nullptr;
    std::vector<Region*> streams;
    std::vector<u8> base0, out0, terms0;
    u32 kind = 0;            // the kind it was built as (before any tamper)
    std::vector<u64> gaps;   // as stored (gaps)
    std::vector<u64> pos;    // entry j's position (sparse kinds), read back from what is stored
    std::vector<u64> u;      // the value of entry j (sparse) or word j (dense, raw), before any grouping
    u64 rows = 0;            // term rows given
};

// Builds chunk `s` over buffers of its own. For the positions stage, the
// output is m u32 and the base is the output.
template <typename T>
static void build(const Spec& s, Rng& rng, Arena& a, bool positions_stage, ChunkDesc& c, Built& b) {
    const u64 W = sizeof(T);
    const u64 n = s.n;
    std::memset(&c, 0, sizeof c);
    b.kind = s.kind;
    u32 m = (u32)s.list.size();
    if (s.kind == KIND_SPARSE_GAPS) {
        u64 at = 0, largest = 0;
        for (size_t j = 0; j < s.list.size(); j++) {
            if (j && s.list[j] < s.list[j - 1]) {
                std::fprintf(stderr, "%s: gaps go up\n", s.what.c_str());
                std::exit(3);
            }
            const u64 g = j ? (u64)s.list[j] - s.list[j - 1] : (u64)s.list[0];
            b.gaps.push_back(g);
            at += g;
            b.pos.push_back(at);
            largest = std::max(largest, g);
        }
        c.gap_width = s.gap_width ? s.gap_width : largest < 0x100 ? 1 : largest < 0x10000 ? 2 : 4;
        for (u32 k = 0; k < c.gap_width; k++) {
            Region* r = a.make(m, 1, 0, 0);
            for (u32 j = 0; j < m; j++) r->ptr()[j] = (u8)(b.gaps[j] >> (8 * k));  // LSB plane first
            c.pos[k] = r->addr();
            b.streams.push_back(r);
        }
    } else if (s.kind == KIND_SPARSE_BITMAP) {
        const u64 nbytes = (n + 7) / 8;
        Region* r = a.make(nbytes, 1, 0, 0);
        for (u32 p : s.list) r->ptr()[p / 8] |= (u8)(1u << (p % 8));
        if (s.pad_bits) r->ptr()[nbytes - 1] |= (u8)(0xFFu << (n % 8));
        for (u64 p = 0; p < n; p++) {
            if ((r->ptr()[p / 8] >> (p % 8)) & 1) b.pos.push_back(p);
        }
        m = (u32)((long)b.pos.size() + s.m_delta);
        c.pos[0] = r->addr();
        b.streams.push_back(r);
    } else if (s.kind == KIND_SPARSE_LIST) {
        Region* r = a.make((u64)m * 4, 4, 0, 0);
        std::memcpy(r->ptr(), s.list.data(), (u64)m * 4);
        for (u32 p : s.list) b.pos.push_back(p);
        c.pos[0] = r->addr();
        b.streams.push_back(r);
    }
    // values: nonzero, so that each changes its word, but for quiet dense words and zero_at
    const u64 vc = is_words(s.kind) ? n : m;
    b.u.resize(vc);
    for (u64 j = 0; j < vc; j++) {
        T v;
        do v = (T)rng.next();
        while (v == 0);
        if (s.kind == KIND_DENSE && ((j >= s.quiet_lo && j < s.quiet_hi) || (s.zero_one_in && rng.below(s.zero_one_in) == 0))) {
            v = 0;
        }
        b.u[j] = v;
    }
    if (s.kind == KIND_DENSE) m = (u32)std::count_if(b.u.begin(), b.u.end(), [](u64 v) { return v != 0; });
    if (s.kind == KIND_RAW) m = s.n;
    if (s.zero_at >= 0) b.u[s.zero_at] = 0;
    // base and output
    if (positions_stage) {
        b.out = a.make((u64)m * 4, 4, 0, POS_GARBAGE);
        b.base = b.out;
    } else {
        b.base = a.make(n * W, 32, s.base_skew * W, 0);
        const T pool[3] = {(T)rng.next(), (T)rng.next(), (T)rng.next()};
        for (u64 i = 0; i < n; i++) {
            const T w = s.few_keys ? pool[rng.below(3)] : (T)rng.next();
            std::memcpy(b.base->ptr() + i * W, &w, W);
        }
        b.out = s.in_place ? b.base : a.make(n * W, 32, s.out_skew * W, OUT_GARBAGE);
    }
    b.base0 = b.base->bytes();
    // the stored order: grouped values sorted stably by the base key of their word
    std::vector<u64> slot(vc);
    std::iota(slot.begin(), slot.end(), 0);
    if (!positions_stage && s.order == ORDER_GROUPED && s.kind != KIND_RAW) {
        const u64 entries = std::min<u64>(is_words(s.kind) ? n : b.pos.size(), vc);
        std::vector<std::pair<u32, u64>> keyed;  // (key, entry)
        std::vector<bool> placed(vc, false);
        for (u64 j = 0; j < entries; j++) {
            const u64 p = is_words(s.kind) ? j : b.pos[j];
            if (p < n) keyed.push_back({ref_key<T>(rd<T>(b.base0, p)), j});
        }
        std::stable_sort(keyed.begin(), keyed.end(), [](const auto& x, const auto& y) { return x.first < y.first; });
        u64 next = 0;
        for (const auto& kj : keyed) {
            slot[kj.second] = next++;
            placed[kj.second] = true;
        }
        for (u64 j = 0; j < vc; j++) {
            if (!placed[j]) slot[j] = next++;  // entries without a key: after the rest
        }
    }
    std::vector<T> stored(vc);
    for (u64 j = 0; j < vc; j++) stored[slot[j]] = (T)b.u[j];
    if (s.layout == LAYOUT_WORDS) {
        Region* r = a.make(vc * W, 32, s.val_skew * W, 0);
        std::memcpy(r->ptr(), stored.data(), vc * W);
        c.val[0] = r->addr();
        b.streams.push_back(r);
    } else {
        for (u32 k = 0; k < W; k++) {
            Region* r = a.make(vc, 4, s.val_skew, 0);
            for (u64 j = 0; j < vc; j++) {
                const T w = s.layout == LAYOUT_ROTATED_PLANES ? rotl1<T>(stored[j]) : stored[j];
                r->ptr()[j] = (u8)(w >> (8 * k));
            }
            c.val[k] = r->addr();
            b.streams.push_back(r);
        }
    }
    const u64 tiles = s.kind == KIND_SPARSE_BITMAP ? ((n + 7) / 8 + BITMAP_TILE_BYTES - 1) / BITMAP_TILE_BYTES
                      : is_words(s.kind)           ? (n + TILE - 1) / TILE
                                                   : ((u64)m + TILE - 1) / TILE;
    c.n = s.n;
    c.m = m;
    c.tile_count = (u32)tiles;
    c.kind = s.kind;
    c.op = s.op;
    c.layout = s.layout;
    c.order = s.order;
    c.base = b.base->addr();
    c.out = b.out->addr();
    if (s.terms) {
        b.rows = tiles * (TILE * W / XXH_BLOCK);
        b.terms = a.make(b.rows * 64, 8, 0, TERM_GARBAGE);
        c.terms = b.terms->addr();
        b.terms0 = b.terms->bytes();
    }
    if (s.tamper) s.tamper(c);
    b.out0 = b.out->bytes();
}

template <typename T> static const char* width_name() {
    return sizeof(T) == 1 ? "w1" : sizeof(T) == 2 ? "w2" : sizeof(T) == 4 ? "w4" : "w8";
}

template <typename T> static void apply_kernel(ChunkDesc* d, u32 nd, const u64* offs, u32* flag) {
    if constexpr (sizeof(T) == 1) apply_w1(d, nd, offs, flag);
    else if constexpr (sizeof(T) == 2) apply_w2(d, nd, offs, flag);
    else if constexpr (sizeof(T) == 4) apply_w4(d, nd, offs, flag);
    else apply_w8(d, nd, offs, flag);
}

template <typename T> static void hist_kernel(const ChunkDesc* d, u32 nd, const u64* offs, u32* groups, u32* flag) {
    if constexpr (sizeof(T) == 1) group_hist_w1(d, nd, offs, groups, flag);
    else if constexpr (sizeof(T) == 2) group_hist_w2(d, nd, offs, groups, flag);
    else if constexpr (sizeof(T) == 4) group_hist_w4(d, nd, offs, groups, flag);
    else group_hist_w8(d, nd, offs, groups, flag);
}

template <typename T>
static void grouped_kernel(ChunkDesc* d, u32 nd, const u64* offs, const u32* groups, u32* flag) {
    if constexpr (sizeof(T) == 1) apply_grouped_w1(d, nd, offs, groups, flag);
    else if constexpr (sizeof(T) == 2) apply_grouped_w2(d, nd, offs, groups, flag);
    else if constexpr (sizeof(T) == 4) apply_grouped_w4(d, nd, offs, groups, flag);
    else apply_grouped_w8(d, nd, offs, groups, flag);
}

// The leaf digest's term rows and digest of a chunk's output `bytes`, from
// the rows the apply wrote.
static void check_terms(const std::string& where, const std::vector<u8>& bytes, const Region& terms, u64 rows) {
    const u64 len = bytes.size();
    const u64 whole = len > XXH_MID_SIZE_MAX ? xxh3_full_blocks(len) : 0;
    const std::vector<u8> got = terms.bytes();
    for (u64 k = 0; k < rows; k++) {
        xu64 want[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (u32 p = 0; p < 4; p++) {
            if (k < whole) xxh3_block_terms(bytes.data() + k * XXH_BLOCK, p, XXH3_SECRET, want);
        }
        for (u32 lane = 0; lane < 8; lane++) {
            xu64 have;
            std::memcpy(&have, got.data() + 8 * (8 * k + lane), 8);
            if (k < whole && have != want[lane]) {
                fail(where, "term row %llu lane %u: %016llx, want %016llx", (unsigned long long)k, lane,
                     (unsigned long long)have, (unsigned long long)want[lane]);
                return;
            }
            if (k >= whole && have != 0xA5A5A5A5A5A5A5A5ull) {
                fail(where, "term row %llu (of %llu whole blocks) written", (unsigned long long)k,
                     (unsigned long long)whole);
                return;
            }
        }
    }
    if (whole == 0) return;
    // leaf_fold over the given rows, then the finish and merge: the digest
    // of the host form, which xxh3_host.rs checks against the library's
    xu64 acc[8];
    for (u32 lane = 0; lane < 8; lane++) acc[lane] = xxh3_fold_lane((const xu64*)(const void*)got.data(), whole, lane);
    xu64 lo_terms = 0, hi_terms = 0;
    for (u32 p = 0; p < 4; p++) {
        xu64 lo, hi;
        xxh3_finish_pair(bytes.data(), len, p, acc[2 * p], acc[2 * p + 1], &lo, &hi);
        lo_terms += lo;
        hi_terms += hi;
    }
    xu64 lo, hi, want_lo, want_hi;
    xxh3_merge(len, lo_terms, hi_terms, &lo, &hi);
    xxh3_128_host(bytes.data(), len, &want_lo, &want_hi);
    if (lo != want_lo || hi != want_hi) fail(where, "digest from the term rows differs");
}

// The tile sums of a chunk after tile_scan: per tile, the gaps (or set bits)
// of the tiles before it; garbage for every other kind and a rejected chunk.
static void check_sums(const std::string& where, const Spec& s, const ChunkDesc& c, const Built& b, const u64* sums) {
    for (u64 t = 0; t < c.tile_count; t++) {
        u64 want = SUM_GARBAGE;
        if (s.check != UNTOUCHED && c.kind == KIND_SPARSE_GAPS) {
            want = 0;
            for (u64 j = 0; j < t * TILE && j < b.gaps.size(); j++) want += b.gaps[j];
        } else if (s.check != UNTOUCHED && c.kind == KIND_SPARSE_BITMAP) {
            want = (u64)std::count_if(b.pos.begin(), b.pos.end(), [&](u64 p) { return p < t * BITMAP_TILE_WORDS; });
        }
        const u64 have = sums[c.tile_begin + t];
        if (have != want) {
            fail(where, "tile sum %llu: %llx, want %llx", (unsigned long long)t, (unsigned long long)have,
                 (unsigned long long)want);
            return;
        }
    }
}

// The group rows of a grouped chunk after group_scan: row 0 the first slot
// of each key, row 1 + t the slots of each key that tiles before t take.
template <typename T>
static void check_rows(const std::string& where, const Spec& s, const ChunkDesc& c, const Built& b, const u32* groups) {
    const u32* rows = groups + (u64)c.group_begin * KEYS;
    const u64 count = ((u64)c.tile_count + 1) * KEYS;
    std::vector<u32> want(count, ROW_GARBAGE);
    if (s.check != UNTOUCHED) {
        std::vector<u32> hist((u64)c.tile_count * KEYS, 0);
        auto add = [&](u64 tile, u64 p) { hist[tile * KEYS + ref_key<T>(rd<T>(b.base0, p))]++; };
        if (c.kind == KIND_DENSE) {
            for (u64 i = 0; i < c.n; i++) add(i / TILE, i);
        } else if (c.kind == KIND_SPARSE_BITMAP) {
            for (u64 p : b.pos) add(p / BITMAP_TILE_WORDS, p);
        } else {
            for (u64 j = 0; j < c.m && j < b.pos.size(); j++) {
                if (b.pos[j] < c.n) add(j / TILE, b.pos[j]);
            }
        }
        u32 start = 0;
        for (u32 k = 0; k < KEYS; k++) {
            want[k] = start;
            u32 run = 0;
            for (u64 t = 0; t < c.tile_count; t++) {
                want[(1 + t) * KEYS + k] = run;
                run += hist[t * KEYS + k];
            }
            start += run;
        }
    }
    for (u64 i = 0; i < count; i++) {
        if (rows[i] != want[i]) {
            fail(where, "group row %llu key %llu: %x, want %x", (unsigned long long)(i / KEYS),
                 (unsigned long long)(i % KEYS), rows[i], want[i]);
            return;
        }
    }
}

static bool grouped_desc(const ChunkDesc& c) { return c.order == ORDER_GROUPED && c.kind != KIND_RAW; }  // Batch::add

// Builds the chunks of `specs` over buffers of their own, runs one batch of
// them as Gpu::launch does and checks it.
template <typename T> static void run_batch(const std::string& name, const std::vector<Spec>& specs, Rng& rng) {
    const std::string batch = std::string(width_name<T>()) + " " + name;
    Arena a;
    const u32 nd = (u32)specs.size();
    std::vector<ChunkDesc> d(nd);
    std::vector<Built> b(nd);
    u32 tiles = 0, rows = 0, need = 0, allow = 0;
    bool sparse = false, positional = false;
    for (u32 i = 0; i < nd; i++) {
        build<T>(specs[i], rng, a, false, d[i], b[i]);
        d[i].tile_begin = tiles;
        tiles += d[i].tile_count;
        if (grouped_desc(d[i])) {
            d[i].group_begin = rows;
            rows += d[i].tile_count + 1;
        } else {
            positional = true;
        }
        sparse |= d[i].kind == KIND_SPARSE_GAPS || d[i].kind == KIND_SPARSE_BITMAP;
        need |= specs[i].need;
        allow |= specs[i].allow;
    }
    Region* sums_r = a.make((u64)tiles * 8, 8, 0, GARBAGE_BYTE);
    Region* groups_r = a.make((u64)rows * KEYS * 4, 4, 0, GARBAGE_BYTE);
    u64* sums = (u64*)(void*)sums_r->ptr();
    u32* groups = (u32*)(void*)groups_r->ptr();
    u32 flag = 0;
    ChunkDesc* t = d.data();
    if (sparse) {
        launch(tiles, 1, [&] { tile_totals(t, nd, sums, &flag); });
        launch(nd, 1, [&] { tile_scan(t, nd, sums, &flag); });
    }
    if (rows) {
        launch(tiles, 1, [&] { hist_kernel<T>(t, nd, sums, groups, &flag); });
        launch(nd, 1, [&] { group_scan(t, nd, groups, &flag); });
    }
    if (positional) launch(tiles, 1, [&] { apply_kernel<T>(t, nd, sums, &flag); });
    if (rows) launch(tiles, 1, [&] { grouped_kernel<T>(t, nd, sums, groups, &flag); });
    launch((nd + THREADS - 1) / THREADS, 1, [&] { check_counts(t, nd, &flag); });

    check_flag(batch, flag, need, allow);
    if (!sums_r->guards_intact()) fail(batch, "bytes around the tile sums were written");
    if (!groups_r->guards_intact()) fail(batch, "bytes around the group rows were written");
    for (u32 i = 0; i < nd; i++) {
        const Spec& s = specs[i];
        const ChunkDesc& c = d[i];
        const Built& bb = b[i];
        const std::string where = batch + " / " + s.what;
        g_checked++;
        const std::vector<u8>& base0 = bb.base0;
        const std::vector<u8> out = bb.out->bytes();
        const bool words = is_words(bb.kind);
        if (!bb.out->guards_intact()) fail(where, "bytes around the output were written");
        if (!bb.base->guards_intact()) fail(where, "bytes around the base were written");
        for (Region* r : bb.streams) {
            if (!r->guards_intact()) fail(where, "bytes around a stream were written");
        }
        if (!s.in_place && bb.base->bytes() != base0) fail(where, "the base was written");
        // the CPU's output: entry j's value on its word
        std::vector<u8> want = base0;
        if (bb.kind == KIND_RAW) {
            for (u64 k = 0; k < s.n; k++) wr<T>(want, k, (T)bb.u[k]);
        } else {
            const u64 entries = std::min<u64>(words ? s.n : bb.pos.size(), bb.u.size());
            for (u64 j = 0; j < entries; j++) {
                const u64 p = words ? j : bb.pos[j];
                if (p < s.n) wr<T>(want, p, ref_combine<T>(rd<T>(base0, p), (T)bb.u[j], s.op));
            }
        }
        if (s.check == EXACT) {
            u64 wrong = 0, first = 0;
            for (u64 k = 0; k < s.n; k++) {
                if (rd<T>(out, k) != rd<T>(want, k) && wrong++ == 0) first = k;
            }
            if (wrong) {
                fail(where, "%llu of %u words differ, first at %llu: %llx, want %llx (base %llx)",
                     (unsigned long long)wrong, s.n, (unsigned long long)first,
                     (unsigned long long)rd<T>(out, first), (unsigned long long)rd<T>(want, first),
                     (unsigned long long)rd<T>(base0, first));
            }
            u32 changed = 0;  // raw chunks count none
            for (u64 k = 0; k < s.n && bb.kind != KIND_RAW; k++) changed += rd<T>(want, k) != rd<T>(base0, k);
            if (c.changed != changed) fail(where, "changed %u, want %u", c.changed, changed);
        } else if (s.check == OUTSIDE_LIST) {
            std::vector<bool> listed(s.n, false);
            for (u64 p : bb.pos) {
                if (p < s.n) listed[p] = true;
            }
            for (u64 k = 0; k < s.n; k++) {
                if (!listed[k] && rd<T>(out, k) != rd<T>(base0, k)) {
                    fail(where, "word %llu, listed nowhere, is not the base's", (unsigned long long)k);
                    break;
                }
            }
        } else {
            if (out != bb.out0 || bb.base->bytes() != base0) fail(where, "a rejected chunk was written");
            if (c.changed != 0) fail(where, "a rejected chunk counted %u changes", c.changed);
        }
        if (bb.terms) {
            if (!bb.terms->guards_intact()) fail(where, "bytes around the term rows were written");
            if (s.check == EXACT) check_terms(where, out, *bb.terms, bb.rows);
            if (s.check == UNTOUCHED && bb.terms->bytes() != bb.terms0) fail(where, "a rejected chunk wrote term rows");
        }
        check_sums(where, s, c, bb, sums);
        if (grouped_desc(c)) check_rows<T>(where, s, c, bb, groups);
    }
}

// Builds the sparse chunks of `specs`, runs the positions stage over them
// (tile_totals, tile_scan, positions) and checks the u32 positions.
static void run_positions(const std::string& name, const std::vector<Spec>& specs, Rng& rng) {
    const std::string batch = "positions " + name;
    Arena a;
    const u32 nd = (u32)specs.size();
    std::vector<ChunkDesc> d(nd);
    std::vector<Built> b(nd);
    u32 tiles = 0, need = 0, allow = 0;
    bool sparse = false;
    for (u32 i = 0; i < nd; i++) {
        build<u8>(specs[i], rng, a, true, d[i], b[i]);
        d[i].tile_begin = tiles;
        tiles += d[i].tile_count;
        sparse |= d[i].kind == KIND_SPARSE_GAPS || d[i].kind == KIND_SPARSE_BITMAP;
        need |= specs[i].need;
        allow |= specs[i].allow;
    }
    Region* sums_r = a.make((u64)tiles * 8, 8, 0, GARBAGE_BYTE);
    u64* sums = (u64*)(void*)sums_r->ptr();
    u32 flag = 0;
    ChunkDesc* t = d.data();
    if (sparse) {
        launch(tiles, 1, [&] { tile_totals(t, nd, sums, &flag); });
        launch(nd, 1, [&] { tile_scan(t, nd, sums, &flag); });
    }
    launch(tiles, 1, [&] { positions(t, nd, sums, &flag); });
    check_flag(batch, flag, need, allow);
    if (!sums_r->guards_intact()) fail(batch, "bytes around the tile sums were written");
    for (u32 i = 0; i < nd; i++) {
        const Spec& s = specs[i];
        const ChunkDesc& c = d[i];
        const Built& bb = b[i];
        const std::string where = batch + " / " + s.what;
        g_checked++;
        if (!bb.out->guards_intact()) fail(where, "bytes around the output were written");
        for (Region* r : bb.streams) {
            if (!r->guards_intact()) fail(where, "bytes around a stream were written");
        }
        const std::vector<u8> out = bb.out->bytes();
        if (s.check == UNTOUCHED) {
            if (out != bb.out0) fail(where, "a rejected chunk was written");
        } else {
            for (u64 j = 0; j < c.m; j++) {
                const u32 want = j < bb.pos.size() && bb.pos[j] < s.n ? (u32)bb.pos[j] : POS_GARBAGE_WORD;
                if (rd<u32>(out, j) != want) {
                    fail(where, "position %llu: %x, want %x", (unsigned long long)j, rd<u32>(out, j), want);
                    break;
                }
            }
        }
        check_sums(where, s, c, bb, sums);
    }
}

// copy_ranges and fill_streams: every range copied (filled) whole, nothing
// around it written, with the loader's grid and with one block per range.
static void copies(Rng& r) {
    struct Case {
        size_t len, src_skew, dst_skew;
    };
    const Case cases[] = {{1, 0, 0},     {15, 3, 3},     {16, 0, 0},   {17, 1, 1},     {100, 5, 9},
                          {4095, 15, 0}, {4103, 8, 8},   {33, 4, 12},  {40000, 0, 0},  {70001, 7, 7}};
    const u32 n = sizeof cases / sizeof cases[0];
    size_t longest = 0;
    for (const Case& k : cases) longest = std::max(longest, k.len);
    const unsigned loader_blocks = (unsigned)std::clamp<size_t>((longest + THREADS * 16 - 1) / (THREADS * 16), 1, 1024);
    for (unsigned blocks : {loader_blocks, 1u}) {
        const std::string where = "copy_ranges over " + std::to_string(blocks) + " blocks";
        Arena a;
        std::vector<Region*> src, dst;
        CopyRanges ranges;
        std::memset(&ranges, 0, sizeof ranges);
        for (u32 i = 0; i < n; i++) {
            src.push_back(a.make(cases[i].len, 16, cases[i].src_skew, 0));
            for (size_t k = 0; k < cases[i].len; k++) src[i]->ptr()[k] = (u8)r.next();
            dst.push_back(a.make(cases[i].len, 16, cases[i].dst_skew, OUT_GARBAGE));
            ranges.dst[i] = dst[i]->addr();
            ranges.src[i] = src[i]->addr();
            ranges.len[i] = cases[i].len;
        }
        launch(blocks, n, [&] { copy_ranges(ranges, n); });
        for (u32 i = 0; i < n; i++) {
            g_checked++;
            if (dst[i]->bytes() != src[i]->bytes()) fail(where, "range %u (%zu bytes) differs", i, cases[i].len);
            if (!dst[i]->guards_intact() || !src[i]->guards_intact()) fail(where, "bytes around range %u written", i);
        }
    }
    for (unsigned blocks : {(unsigned)((longest + THREADS * 16 - 1) / (THREADS * 16)), 1u}) {
        const std::string where = "fill_streams over " + std::to_string(blocks) + " blocks";
        Arena a;
        std::vector<Region*> dst;
        std::vector<FillDesc> table(n);
        for (u32 i = 0; i < n; i++) {
            dst.push_back(a.make(cases[i].len, 16, cases[i].dst_skew, OUT_GARBAGE));
            table[i] = FillDesc{dst[i]->addr(), (u32)cases[i].len, (u32)(r.next() & 0xFF)};
        }
        launch(blocks, n, [&] { fill_streams(table.data(), n); });
        for (u32 i = 0; i < n; i++) {
            g_checked++;
            if (dst[i]->bytes() != std::vector<u8>(cases[i].len, (u8)table[i].value)) {
                fail(where, "stream %u (%zu bytes) not filled", i, cases[i].len);
            }
            if (!dst[i]->guards_intact()) fail(where, "bytes around stream %u written", i);
        }
    }
}

// ---------------------------------------------------------------------------
// Position lists.

static std::vector<u32> every(u32 n) {
    std::vector<u32> l(n);
    std::iota(l.begin(), l.end(), 0u);
    return l;
}

// Each word of [lo, hi) with probability 1 / one_in.
static std::vector<u32> some(Rng& r, u32 lo, u32 hi, u32 one_in) {
    std::vector<u32> l;
    for (u32 i = lo; i < hi; i++) {
        if (r.below(one_in) == 0) l.push_back(i);
    }
    return l;
}

static std::vector<u32> with(std::vector<u32> l, std::vector<u32> extra) {
    l.insert(l.end(), extra.begin(), extra.end());
    std::sort(l.begin(), l.end());
    l.erase(std::unique(l.begin(), l.end()), l.end());
    return l;
}

static std::vector<u32> without(std::vector<u32> l, u32 lo, u32 hi) {
    l.erase(std::remove_if(l.begin(), l.end(), [&](u32 p) { return p >= lo && p < hi; }), l.end());
    return l;
}

static const u32 GAPS = KIND_SPARSE_GAPS, BITMAP = KIND_SPARSE_BITMAP, LIST = KIND_SPARSE_LIST;
static const u32 DENSE = KIND_DENSE, RAW = KIND_RAW;
static const u32 XOR = OP_XOR, SUB = OP_SUB;
static const u32 WORDS = LAYOUT_WORDS, PLANES = LAYOUT_PLANES, ROTATED = LAYOUT_ROTATED_PLANES;

template <typename T> static void good(Rng& r) {
    const u32 T1 = TILE, B1 = BITMAP_TILE_WORDS;
    run_batch<T>("sparse kinds", {
        chunk("gaps of width 1, 4 tiles", GAPS, 40000, with(some(r, 0, 40000, 3), {0, 39999}), XOR, WORDS),
        chunk("gaps of width 2, a gap over 10000 words", GAPS, 60000, without(some(r, 1, 60000, 9), 10000, 20000),
              SUB, PLANES).val_off(),
        chunk("gaps of width 4", GAPS, 200000, with(some(r, 3, 6000, 4), {150000, 199999}), XOR, ROTATED),
        chunk("small gaps stored 4 wide, 3 tiles", GAPS, 20000, some(r, 0, 20000, 2), SUB, WORDS).gap_w(4).skewed(),
        chunk("small gaps stored 2 wide", GAPS, 3000, some(r, 0, 3000, 5), XOR, PLANES).gap_w(2),
        chunk("bitmap of 3 tiles, the middle one empty", BITMAP, 2 * B1 + 1001,
              with(some(r, 0, B1, 40), with(some(r, 2 * B1, 2 * B1 + 1001, 3), {0, 2 * B1 + 1000})), XOR, ROTATED),
        chunk("bitmap of every word", BITMAP, B1 + 3, every(B1 + 3), SUB, WORDS).skewed(),
        chunk("list", LIST, 9000, with(some(r, 0, 9000, 30), {0, 8999}), SUB, WORDS),
        chunk("list of 3 tiles", LIST, 30000, some(r, 0, 30000, 3), XOR, PLANES).val_off(),
        chunk("one word of gaps", GAPS, 1, {0}, SUB, ROTATED),
        chunk("one word of bitmap", BITMAP, 1, {0}, XOR, PLANES),
        chunk("one word of list", LIST, 1, {0}, SUB, WORDS),
        chunk("last word only of gaps", GAPS, 5000, {4999}, XOR, WORDS).gap_w(2),
    }, r);
    run_batch<T>("word kinds", {
        chunk("dense into out, tile 1 unchanged", DENSE, 2 * T1 + 333, {}, SUB, PLANES).apart(0, 0).with_terms()
            .quiet(T1, 2 * T1).zeros(8),
        chunk("dense in place, values one word off", DENSE, T1 - 1, {}, XOR, ROTATED).val_off().with_terms(),
        chunk("dense into out one word off", DENSE, 1000, {}, XOR, WORDS).apart(0, 1),
        chunk("dense from a base one word off", DENSE, T1 + 77, {}, SUB, WORDS).apart(1, 0).with_terms(),
        chunk("raw into out", RAW, 3 * T1 + 5, {}, XOR, WORDS).apart(0, 0).with_terms(),
        chunk("raw in place one word off", RAW, T1 + 1, {}, XOR, PLANES).skewed().with_terms(),
        chunk("raw, values one word off", RAW, 500, {}, XOR, ROTATED).apart(0, 0).val_off(),
        chunk("one dense word", DENSE, 1, {}, SUB, PLANES).apart(0, 0).with_terms(),
        chunk("one raw word", RAW, 1, {}, XOR, WORDS).apart(0, 1).with_terms(),
        chunk("dense, first and last words only", DENSE, 300, {}, XOR, WORDS).quiet(1, 299),
    }, r);
    {
        std::vector<Spec> specs;
        for (u32 layout : {WORDS, PLANES, ROTATED}) {
            for (u32 op : {XOR, SUB}) {
                const std::string at = " (layout " + std::to_string(layout) + ", op " + std::to_string(op) + ")";
                specs.push_back(chunk("dense aligned" + at, DENSE, 301, {}, op, layout).apart(0, 0));
                specs.push_back(chunk("dense, values one word off" + at, DENSE, 302, {}, op, layout).apart(0, 0).val_off());
                specs.push_back(chunk("dense in place one word off" + at, DENSE, 303, {}, op, layout).skewed());
                specs.push_back(chunk("list" + at, LIST, 777, some(r, 0, 777, 3), op, layout));
                specs.push_back(chunk("bitmap" + at, BITMAP, 779, some(r, 0, 779, 4), op, layout).grouped());
            }
            const std::string at = " (layout " + std::to_string(layout) + ")";
            specs.push_back(chunk("raw aligned" + at, RAW, 301, {}, XOR, layout).apart(0, 0));
            specs.push_back(chunk("raw into out one word off" + at, RAW, 302, {}, XOR, layout).apart(0, 1));
        }
        run_batch<T>("layouts and ops", specs, r);
    }
    run_batch<T>("grouped", {
        chunk("grouped gaps, 2 tiles", GAPS, 20000, some(r, 0, 20000, 3), XOR, PLANES).grouped(),
        chunk("grouped gaps of few keys", GAPS, 9000, with(some(r, 0, 9000, 2), {0}), SUB, WORDS).grouped().few().gap_w(2),
        chunk("grouped gaps of width 4", GAPS, 100000, with(some(r, 5, 3000, 3), {99999}), SUB, ROTATED).grouped(),
        chunk("grouped bitmap, 2 tiles", BITMAP, B1 + 5001, some(r, 0, B1 + 5001, 4), SUB, WORDS).grouped().skewed(),
        chunk("grouped bitmap of every word, few keys", BITMAP, 3001, every(3001), XOR, ROTATED).grouped().few(),
        chunk("grouped list", LIST, 5000, with(some(r, 0, 5000, 6), {4999}), XOR, ROTATED).grouped().val_off(),
        chunk("grouped list of few keys, 2 tiles", LIST, 12000, some(r, 0, 12000, 2), SUB, PLANES).grouped().few(),
        chunk("grouped dense into out", DENSE, 2 * T1 + 100, {}, SUB, WORDS).grouped().apart(0, 0).zeros(5),
        chunk("grouped dense in place of few keys", DENSE, 700, {}, XOR, PLANES).grouped().few().skewed().val_off(),
        chunk("grouped dense, tile 0 unchanged", DENSE, T1 + 50, {}, XOR, WORDS).grouped().quiet(0, T1),
        chunk("one grouped dense word", DENSE, 1, {}, SUB, ROTATED).grouped().apart(0, 1),
        chunk("one grouped word of gaps", GAPS, 1, {0}, XOR, WORDS).grouped(),
        chunk("one grouped word of bitmap", BITMAP, 1, {0}, SUB, PLANES).grouped(),
        chunk("one grouped word of list", LIST, 1, {0}, XOR, ROTATED).grouped(),
        chunk("positional dense among them", DENSE, T1 + 9, {}, SUB, PLANES).apart(0, 0).with_terms(),
        chunk("positional gaps among them", GAPS, 5000, some(r, 0, 5000, 4), XOR, WORDS),
    }, r);
    // random batches
    const u32 one_in[] = {1, 2, 9, 300};
    for (int round = 0; round < 2; round++) {
        std::vector<Spec> specs;
        const u32 count = 4 + (u32)r.below(3);
        for (u32 k = 0; k < count; k++) {
            const u32 kind = 1 + (u32)r.below(5);
            const u32 n = 1 + (u32)r.below(r.below(2) ? 2 * T1 : 600);
            std::vector<u32> list = some(r, 0, n, one_in[r.below(4)]);
            if (list.empty()) list.push_back((u32)r.below(n));
            Spec s = chunk("random " + std::to_string(k), kind, n, is_words(kind) ? std::vector<u32>{} : list,
                           kind == RAW ? XOR : (u32)r.below(2), (u32)r.below(3));
            if (kind != RAW && r.below(3) == 0) s = s.grouped();
            if (is_words(kind) && r.below(2)) s = s.apart((u32)r.below(2), (u32)r.below(2));
            else if (r.below(2)) s = s.skewed();
            if (r.below(2)) s = s.val_off();
            if (is_words(kind) && s.order == ORDER_POSITIONAL && r.below(2)) s = s.with_terms();
            if (kind == DENSE && r.below(2)) s = s.zeros(1 + (u32)r.below(4));
            if (r.below(3) == 0) s = s.few();
            s.what += " (kind " + std::to_string(kind) + ", n " + std::to_string(n) + ", m " + std::to_string(list.size()) +
                      ", op " + std::to_string(s.op) + ", layout " + std::to_string(s.layout) + ", order " +
                      std::to_string(s.order) + ")";
            specs.push_back(s);
        }
        run_batch<T>("random " + std::to_string(round), specs, r);
    }
}

static void good_positions(Rng& r) {
    const u32 B1 = BITMAP_TILE_WORDS;
    run_positions("of every sparse kind", {
        chunk("gaps of width 1, 3 tiles", GAPS, 30000, with(some(r, 0, 30000, 3), {0}), XOR, WORDS),
        chunk("gaps of width 2", GAPS, 60000, with(some(r, 20000, 60000, 5), {59999}), SUB, PLANES),
        chunk("gaps of width 4", GAPS, 300000, with(some(r, 1, 9000, 2), {290000}), XOR, ROTATED),
        chunk("small gaps stored 4 wide", GAPS, 5000, some(r, 0, 5000, 2), XOR, WORDS).gap_w(4),
        chunk("bitmap of 3 tiles, the middle one empty", BITMAP, 2 * B1 + 9,
              with(some(r, 0, B1, 3), {2 * B1, 2 * B1 + 8}), SUB, WORDS),
        chunk("bitmap of every word", BITMAP, B1 + 1, every(B1 + 1), XOR, WORDS),
        chunk("list of 2 tiles", LIST, 20000, some(r, 0, 20000, 3), XOR, PLANES),
        chunk("grouped gaps (order plays no part)", GAPS, 7000, some(r, 0, 7000, 2), XOR, WORDS).grouped(),
        chunk("one word of gaps", GAPS, 1, {0}, XOR, WORDS),
        chunk("one word of bitmap", BITMAP, 1, {0}, XOR, WORDS),
        chunk("one word of list", LIST, 1, {0}, XOR, WORDS),
    }, r);
}

// A hostile chunk between two good ones, in a batch of its own: gaps
// before it (so that the tile scans run), grouped values after it (so that
// the group launches run).
template <typename T> static void alone(Rng& r, Spec bad) {
    Spec before = chunk("good gaps before", GAPS, 3000, some(r, 0, 3000, 20), SUB, PLANES);
    Spec after = chunk("good grouped list after", LIST, 2000, some(r, 0, 2000, 10), XOR, WORDS).grouped();
    run_batch<T>(bad.what, {before, bad, after}, r);
}

template <typename T> static void hostile(Rng& r) {
    const u32 T1 = TILE, B1 = BITMAP_TILE_WORDS;
    const u32 P = ERR_POSITION_RANGE, Z = ERR_ZERO_GAP, PAD = ERR_BITMAP_PADDING, C = ERR_COUNT_MISMATCH,
              D = ERR_BAD_DESCRIPTOR;
    auto repeat = [&](u32 n) {
        std::vector<u32> l = some(r, 0, n, 4);
        l.insert(l.begin() + (long)l.size() / 2, l[l.size() / 2]);
        return l;
    };
    // zero gaps, positions past the chunk
    alone<T>(r, chunk("a zero gap after the first", GAPS, 5000, repeat(5000), XOR, WORDS).bad(Z, C, OUTSIDE_LIST));
    alone<T>(r, chunk("a zero gap, grouped", GAPS, 5000, repeat(5000), SUB, PLANES).grouped().bad(Z, C, OUTSIDE_LIST));
    alone<T>(r, chunk("the last gap past the chunk", GAPS, 6000, with(some(r, 0, 6000, 3), {6000}), SUB, PLANES)
                    .bad(P | C, 0, EXACT));
    alone<T>(r, chunk("a tile of gaps past the chunk", GAPS, 2 * T1, with(every(2 * T1), {2 * T1, 2 * T1 + 70000, 0x7FFFFFFF}),
                      XOR, ROTATED).bad(P | C, 0, EXACT));
    {
        std::vector<u32> l = some(r, 0, 5000, 10);
        l[l.size() / 3] = 0xFFFFFFFFu;
        alone<T>(r, chunk("0xFFFFFFFF amid a list", LIST, 5000, l, XOR, WORDS).bad(P | C, 0, EXACT));
        alone<T>(r, chunk("0xFFFFFFFF amid a grouped list", LIST, 5000, l, SUB, WORDS).grouped().bad(P | C, 0, OUTSIDE_LIST));
    }
    alone<T>(r, chunk("grouped gaps past the chunk", GAPS, 3000, with(some(r, 0, 3000, 5), {3000}), XOR, PLANES).grouped()
                    .bad(P | C, 0, OUTSIDE_LIST));
    // bitmaps
    alone<T>(r, chunk("bitmap padding bits set", BITMAP, 5003, some(r, 0, 5003, 7), XOR, PLANES).padded().bad(PAD, 0, EXACT));
    alone<T>(r, chunk("grouped bitmap padding bits set", BITMAP, 5005, some(r, 0, 5005, 7), SUB, WORDS).padded().grouped()
                    .bad(PAD, 0, EXACT));
    alone<T>(r, chunk("a set bit more than m", BITMAP, B1 + 99, some(r, 0, B1 + 99, 5), SUB, WORDS).m_off(-1).bad(C, 0, EXACT));
    alone<T>(r, chunk("a set bit fewer than m", BITMAP, B1 + 99, some(r, 0, B1 + 99, 5), XOR, ROTATED).m_off(1).bad(C, 0, EXACT));
    alone<T>(r, chunk("grouped, a set bit more than m", BITMAP, 4001, some(r, 0, 4001, 3), XOR, WORDS).grouped().m_off(-1)
                    .bad(C, 0, OUTSIDE_LIST));
    alone<T>(r, chunk("grouped, a set bit fewer than m", BITMAP, 4001, some(r, 0, 4001, 3), SUB, PLANES).grouped().m_off(1)
                    .bad(C, 0, OUTSIDE_LIST));
    // values that leave their word
    alone<T>(r, chunk("a dense value that leaves its word", DENSE, T1 + 5, {}, SUB, PLANES).apart(0, 0).zero(T1 / 2)
                    .bad(C, 0, EXACT));
    alone<T>(r, chunk("a grouped dense value that leaves its word", DENSE, 900, {}, XOR, WORDS).grouped().zero(899)
                    .bad(C, 0, EXACT));
    alone<T>(r, chunk("a listed value that leaves its word", LIST, 3000, some(r, 0, 3000, 5), XOR, ROTATED).zero(0)
                    .bad(C, 0, EXACT));
    alone<T>(r, chunk("a grouped gap value that leaves its word", GAPS, 3000, some(r, 0, 3000, 5), SUB, WORDS).grouped()
                    .zero(7).bad(C, 0, EXACT));
    // descriptors the kernels must refuse
    auto refused = [&](Spec s, std::function<void(ChunkDesc&)> f) { alone<T>(r, s.tampered(std::move(f)).bad(D, C, UNTOUCHED)); };
    refused(chunk("kind 0", DENSE, 700, {}, XOR, WORDS).apart(0, 0), [](ChunkDesc& c) { c.kind = 0; });
    refused(chunk("kind 6", GAPS, 5000, some(r, 0, 5000, 2), XOR, WORDS), [](ChunkDesc& c) { c.kind = 6; });
    refused(chunk("kind 6, grouped", LIST, 3000, some(r, 0, 3000, 4), XOR, WORDS).grouped(), [](ChunkDesc& c) { c.kind = 6; });
    refused(chunk("op 2", GAPS, 3000, some(r, 0, 3000, 4), XOR, WORDS), [](ChunkDesc& c) { c.op = 2; });
    refused(chunk("op 2, grouped", DENSE, 500, {}, SUB, PLANES).grouped(), [](ChunkDesc& c) { c.op = 2; });
    refused(chunk("layout 3", DENSE, 600, {}, XOR, WORDS).apart(0, 0).with_terms(), [](ChunkDesc& c) { c.layout = 3; });
    refused(chunk("layout 3, grouped", BITMAP, 2000, some(r, 0, 2000, 3), XOR, WORDS).grouped(), [](ChunkDesc& c) { c.layout = 3; });
    refused(chunk("order 2", BITMAP, 3000, some(r, 0, 3000, 3), SUB, PLANES), [](ChunkDesc& c) { c.order = 2; });
    refused(chunk("order 2, dense", DENSE, 300, {}, XOR, WORDS).apart(0, 0).with_terms(), [](ChunkDesc& c) { c.order = 2; });
    refused(chunk("gap width 3", GAPS, 3000, some(r, 0, 3000, 3), XOR, WORDS).gap_w(4), [](ChunkDesc& c) { c.gap_width = 3; });
    refused(chunk("gap width 0", GAPS, 3000, some(r, 0, 3000, 3), XOR, WORDS), [](ChunkDesc& c) { c.gap_width = 0; });
    refused(chunk("gap width 8, grouped", GAPS, 3000, some(r, 0, 3000, 3), XOR, WORDS).gap_w(4).grouped(),
            [](ChunkDesc& c) { c.gap_width = 8; });
    refused(chunk("term rows of gaps", GAPS, 3000, some(r, 0, 3000, 3), XOR, WORDS).with_terms(), [](ChunkDesc&) {});
    refused(chunk("term rows of a bitmap", BITMAP, 3000, some(r, 0, 3000, 3), XOR, WORDS).with_terms(), [](ChunkDesc&) {});
    refused(chunk("term rows of a list", LIST, 3000, some(r, 0, 3000, 3), XOR, WORDS).with_terms(), [](ChunkDesc&) {});
    refused(chunk("term rows of grouped dense values", DENSE, 2000, {}, XOR, WORDS).apart(0, 0).grouped().with_terms(),
            [](ChunkDesc&) {});
    refused(chunk("term rows of a raw chunk of order 1", RAW, 2000, {}, XOR, WORDS).apart(0, 0).with_terms(),
            [](ChunkDesc& c) { c.order = ORDER_GROUPED; });
    refused(chunk("a raw chunk of order 1", RAW, 2000, {}, XOR, WORDS).apart(0, 0),
            [](ChunkDesc& c) { c.order = ORDER_GROUPED; });
}

static void hostile_positions(Rng& r) {
    const u32 B1 = BITMAP_TILE_WORDS;
    const u32 P = ERR_POSITION_RANGE, Z = ERR_ZERO_GAP, PAD = ERR_BITMAP_PADDING, C = ERR_COUNT_MISMATCH,
              D = ERR_BAD_DESCRIPTOR;
    auto alone_p = [&](Spec bad) {
        Spec before = chunk("good gaps before", GAPS, 3000, some(r, 0, 3000, 20), SUB, PLANES);
        Spec after = chunk("good bitmap after", BITMAP, 2001, some(r, 0, 2001, 10), XOR, WORDS);
        run_positions(bad.what, {before, bad, after}, r);
    };
    std::vector<u32> l = some(r, 0, 5000, 4);
    l.insert(l.begin() + (long)l.size() / 2, l[l.size() / 2]);
    alone_p(chunk("a zero gap after the first", GAPS, 5000, l, XOR, WORDS).bad(Z, 0, EXACT));
    alone_p(chunk("gaps past the chunk", GAPS, 5000, with(some(r, 0, 5000, 4), {5000, 90000}), XOR, WORDS).bad(P, 0, EXACT));
    {
        std::vector<u32> k = some(r, 0, 5000, 10);
        k[k.size() / 2] = 0xFFFFFFFFu;
        alone_p(chunk("0xFFFFFFFF amid a list", LIST, 5000, k, XOR, WORDS).bad(P, 0, EXACT));
    }
    alone_p(chunk("bitmap padding bits set", BITMAP, 5003, some(r, 0, 5003, 7), XOR, WORDS).padded().bad(PAD, 0, EXACT));
    alone_p(chunk("a set bit more than m", BITMAP, B1 + 99, some(r, 0, B1 + 99, 5), XOR, WORDS).m_off(-1).bad(C, 0, EXACT));
    alone_p(chunk("a set bit fewer than m", BITMAP, 999, some(r, 0, 999, 5), XOR, WORDS).m_off(1).bad(C, 0, EXACT));
    alone_p(chunk("gap width 3", GAPS, 3000, some(r, 0, 3000, 3), XOR, WORDS).gap_w(4)
                .tampered([](ChunkDesc& c) { c.gap_width = 3; }).bad(D, 0, UNTOUCHED));
    alone_p(chunk("kind 6", LIST, 3000, some(r, 0, 3000, 3), XOR, WORDS).tampered([](ChunkDesc& c) { c.kind = 6; })
                .bad(D, 0, UNTOUCHED));
    alone_p(chunk("layout 3", BITMAP, 3000, some(r, 0, 3000, 3), XOR, WORDS).tampered([](ChunkDesc& c) { c.layout = 3; })
                .bad(D, 0, UNTOUCHED));
}

int main(int argc, char** argv) {
    if (argc != 2) return 2;
    const std::string mode = argv[1];
    Pool pool;
    g_pool = &pool;
    Rng r{0x7D3E5A1Full};
    if (mode == "good") {
        good_positions(r);
        copies(r);
    } else if (mode == "hostile") {
        hostile_positions(r);
    } else {
        return 2;
    }
    for (int width : {1, 2, 4, 8}) {
        r.s += (u64)width;
        if (mode == "good") {
            if (width == 1) good<u8>(r);
            if (width == 2) good<u16>(r);
            if (width == 4) good<u32>(r);
            if (width == 8) good<u64>(r);
        } else {
            if (width == 1) hostile<u8>(r);
            if (width == 2) hostile<u16>(r);
            if (width == 4) hostile<u32>(r);
            if (width == 8) hostile<u64>(r);
        }
    }
    std::printf("%d chunks checked, %d failures\n", g_checked, g_failures);
    return g_failures ? 1 : 0;
}
"#;

fn compile(dir: &Path) -> PathBuf {
    let xxh3 = std::fs::canonicalize(XXH3_SOURCE).expect("kernels/tpde_xxh3.cu exists");
    let apply = std::fs::canonicalize(APPLY_SOURCE).expect("kernels/tpde_apply.cu exists");
    // as kernels.rs builds APPLY_PROGRAM
    let program = format!(
        "{SHIM}\n#define XXH3_DEVICE_FUNCTIONS_ONLY\n#include \"{}\"\n#include \"{}\"\n{HARNESS}",
        xxh3.display(),
        apply.display()
    );
    host_cxx::compile(dir, &program, host_cxx::THREADED)
}

/// Compiles the harness and runs it in `mode`; it checks everything itself.
fn run(mode: &str) {
    let dir = tempfile::tempdir().unwrap();
    let exe = compile(dir.path());
    let out = Command::new(&exe).arg(mode).output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "harness ({mode}) failed: {}\n{stdout}\n{stderr}", out.status);
    assert!(stdout.contains(" chunks checked, 0 failures"), "{stdout}\n{stderr}");
}

#[test]
fn every_kind_layout_and_order_applies_as_the_cpu_does() {
    run("good");
}

#[test]
fn hostile_chunks_are_flagged_and_write_only_their_output() {
    run("hostile");
}
