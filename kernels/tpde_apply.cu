// tpde reconstruction kernels (spec/FORMAT.md, "Chunk semantics").
//
// Compiled at run time through NVRTC, after tpde_xxh3.cu's device functions
// (kernels.rs: APPLY_PROGRAM), so this file includes no headers. The
// host side (crates/tpde-cuda/src/kernels.rs) mirrors every constant and the
// ChunkDesc layout below: the static_asserts after ChunkDesc pin its layout,
// and a host test reads them back and compares them with the Rust side.
//
// One launch covers a batch of chunks of the same word width. The grid is the
// concatenation of every chunk's tiles; a block finds its chunk by binary
// search over ChunkDesc.tile_begin. Sparse chunks need three launches:
//   tile_totals  -> per tile sum of gaps (or popcount of the bitmap)
//   tile_scan    -> per chunk exclusive scan of those sums (+ total checks)
//   apply_wN     -> per tile scan again, add the offset, scatter
// so positions are rebuilt on the GPU and never expanded on the CPU. The one
// exception is position coding 3 (spec §8.3): its positions are decoded on the
// CPU against the reference delta and arrive as a list of u32 (KIND_SPARSE_LIST),
// which needs no scan.
//
// Values grouped by base key (spec §8.6) add two launches, and their chunks
// go to apply_grouped_wN instead of apply_wN:
//   group_hist   -> per tile histogram of the base keys of its positions
//   group_scan   -> per chunk exclusive scan over (key-major, tile-minor):
//                   row 0 of the chunk's rows = start[key], row 1 + t = the
//                   slots of key `key` taken by tiles before t
//   apply_grouped_wN -> per tile stable rank of every position among those of
//                   its key (warp match + per-warp counters), value at
//                   start + earlier tiles + rank
// Keys are read from the base before any word of the chunk is written: by
// group_hist (an earlier launch), and in apply_grouped by the same thread
// that later writes the word.
//
// Kernels never write out of range: a bad position sets a bit in *flag and
// the write is skipped. The host reads the flag after the batch. A
// descriptor with an unknown kind, op, layout or order also raises the flag
// (ERR_BAD_DESCRIPTOR), so nothing is ever read under a wrong meaning.
//
// Every apply kernel counts the words it changes into ChunkDesc.changed;
// check_counts, the last launch of a batch, compares the count with the
// stored changed_count (spec §8.1: E_CHANGED_COUNT, which also catches a
// stored value that leaves its word as it was).

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define THREADS 256
#define ITEMS 16
#define TILE (THREADS * ITEMS)      // gaps or words per tile
#define BITMAP_TILE_BYTES (THREADS * 16)
#define PAD(k) ((k) + ((k) >> 4))   // shared-memory padding against bank conflicts

#define KIND_SPARSE_GAPS 1u
#define KIND_SPARSE_BITMAP 2u
#define KIND_DENSE 3u
#define KIND_RAW 4u
#define KIND_SPARSE_LIST 5u

#define OP_XOR 0u
#define OP_SUB 1u

#define LAYOUT_WORDS 0u
#define LAYOUT_PLANES 1u
#define LAYOUT_ROTATED_PLANES 2u

#define ORDER_POSITIONAL 0u
#define ORDER_GROUPED 1u

#define KEYS 256                    // base keys; == THREADS (one thread per key)
#define WARPS (THREADS / 32)
#define NO_KEY 0x100u               // a lane with no position this round
#define NO_RANK 0xFFFFFFFFu

#define ERR_POSITION_RANGE 1u
#define ERR_ZERO_GAP 2u
#define ERR_BITMAP_PADDING 4u
#define ERR_COUNT_MISMATCH 8u
#define ERR_BAD_DESCRIPTOR 16u

// One device address per stream, so that streams stored as they are can be
// read where they were uploaded, next to streams decoded on the CPU.
struct ChunkDesc {
    u64 pos[4];      // gap planes (gap_width planes of m bytes, LSB plane first), or pos[0] = bitmap,
                     // or pos[0] = m increasing u32 positions (KIND_SPARSE_LIST)
    u64 val[8];      // value planes (LSB plane first), or val[0] = little-endian words
    u64 base;        // base words of the chunk (may equal out)
    u64 out;         // output words of the chunk (or u32 positions for positions_*)
    u32 n;           // words in the chunk
    u32 m;           // stored values (changed_count)
    u32 tile_begin;  // first tile of this chunk in the batch grid
    u32 tile_count;
    u32 kind;
    u32 op;
    u32 layout;
    u32 gap_width;
    u32 order;        // ORDER_*
    u32 group_begin;  // first row (of KEYS u32) of this chunk in the group table
    u32 changed;      // words changed by the apply kernels (0 on upload)
    u32 reserved;     // 0; keeps the size a multiple of 8
    u64 terms;        // 0, or where this chunk's leaf digest term rows go (dense or raw, positional)
};

// The byte layout that kernels.rs writes (ChunkDesc::write_to). The host test
// `chunk_desc_layout_matches_the_kernel_source` parses these lines. The
// offsets need __builtin_offsetof, which NVRTC 13.0 lacks and 13.5 has: older
// compilers check the size only, and the CI's compile (NVRTC from PyPI, with
// REQUIRE_LAYOUT_CHECKS defined) refuses to skip the offsets.
static_assert(sizeof(ChunkDesc) == 168, "ChunkDesc is 168 bytes");
#if defined(__CUDACC_VER_MAJOR__) && (__CUDACC_VER_MAJOR__ * 100 + __CUDACC_VER_MINOR__ >= 1305)
#define OFFSET_OF(T, f) __builtin_offsetof(T, f)
static_assert(OFFSET_OF(ChunkDesc, pos) == 0, "ChunkDesc.pos");
static_assert(OFFSET_OF(ChunkDesc, val) == 32, "ChunkDesc.val");
static_assert(OFFSET_OF(ChunkDesc, base) == 96, "ChunkDesc.base");
static_assert(OFFSET_OF(ChunkDesc, out) == 104, "ChunkDesc.out");
static_assert(OFFSET_OF(ChunkDesc, n) == 112, "ChunkDesc.n");
static_assert(OFFSET_OF(ChunkDesc, m) == 116, "ChunkDesc.m");
static_assert(OFFSET_OF(ChunkDesc, tile_begin) == 120, "ChunkDesc.tile_begin");
static_assert(OFFSET_OF(ChunkDesc, tile_count) == 124, "ChunkDesc.tile_count");
static_assert(OFFSET_OF(ChunkDesc, kind) == 128, "ChunkDesc.kind");
static_assert(OFFSET_OF(ChunkDesc, op) == 132, "ChunkDesc.op");
static_assert(OFFSET_OF(ChunkDesc, layout) == 136, "ChunkDesc.layout");
static_assert(OFFSET_OF(ChunkDesc, gap_width) == 140, "ChunkDesc.gap_width");
static_assert(OFFSET_OF(ChunkDesc, order) == 144, "ChunkDesc.order");
static_assert(OFFSET_OF(ChunkDesc, group_begin) == 148, "ChunkDesc.group_begin");
static_assert(OFFSET_OF(ChunkDesc, changed) == 152, "ChunkDesc.changed");
static_assert(OFFSET_OF(ChunkDesc, reserved) == 156, "ChunkDesc.reserved");
static_assert(OFFSET_OF(ChunkDesc, terms) == 160, "ChunkDesc.terms");
#elif defined(REQUIRE_LAYOUT_CHECKS)
#error "this NVRTC cannot check the ChunkDesc offsets (no __builtin_offsetof)"
#endif
static_assert(sizeof(u64) == 8 && sizeof(u32) == 4 && sizeof(u16) == 2, "integer widths");

// Whether every code of a descriptor is one the kernels implement.
__device__ __forceinline__ bool desc_ok(const ChunkDesc& c) {
    const bool kind = c.kind >= KIND_SPARSE_GAPS && c.kind <= KIND_SPARSE_LIST;
    const bool gaps = c.kind != KIND_SPARSE_GAPS || c.gap_width == 1 || c.gap_width == 2 || c.gap_width == 4;
    // only apply_wN's dense and raw tiles write term rows; no other kernel must be asked to
    const bool whole_tiles = c.kind == KIND_DENSE || c.kind == KIND_RAW;
    const bool terms = c.terms == 0 || (whole_tiles && c.order == ORDER_POSITIONAL);
    // raw chunks are positional (spec §8.6, C4); no kernel would apply one of grouped order
    const bool raw = c.kind != KIND_RAW || c.order == ORDER_POSITIONAL;
    return kind && gaps && terms && raw && c.op <= OP_SUB && c.layout <= LAYOUT_ROTATED_PLANES &&
           c.order <= ORDER_GROUPED;
}

// Raises ERR_BAD_DESCRIPTOR (once per block) for a descriptor with an
// unknown code; the caller then returns. Uniform per block.
__device__ __forceinline__ bool reject_bad_desc(const ChunkDesc& c, u32* flag) {
    if (desc_ok(c)) return false;
    if (threadIdx.x == 0) atomicOr(flag, ERR_BAD_DESCRIPTOR);
    return true;
}

// Adds the words a thread changed to its chunk's count: one atomic per warp.
// Called by all threads of the block.
__device__ __forceinline__ void count_changed(ChunkDesc* d, u32 ci, u32 changed) {
#pragma unroll
    for (u32 o = 16; o > 0; o >>= 1) changed += __shfl_down_sync(0xffffffffu, changed, o);
    if ((threadIdx.x & 31) == 0 && changed) atomicAdd(&d[ci].changed, changed);
}

__device__ __forceinline__ u32 find_chunk(const ChunkDesc* d, u32 nd, u32 tile) {
    u32 lo = 0, hi = nd;  // last i with tile_begin <= tile
    while (hi - lo > 1) {
        u32 mid = (lo + hi) >> 1;
        if (d[mid].tile_begin <= tile) lo = mid; else hi = mid;
    }
    return lo;
}

__device__ __forceinline__ u64 load_gap(const ChunkDesc& c, u64 j) {
    u64 g = ((const u8*)c.pos[0])[j];
    if (c.gap_width > 1) g |= (u64)((const u8*)c.pos[1])[j] << 8;
    if (c.gap_width > 2) {
        g |= (u64)((const u8*)c.pos[2])[j] << 16;
        g |= (u64)((const u8*)c.pos[3])[j] << 24;
    }
    return g;
}

template <typename T>
__device__ __forceinline__ T load_value(const ChunkDesc& c, u64 j) {
    const u32 layout = c.layout;
    if (layout == LAYOUT_WORDS) return ((const T*)c.val[0])[j];
    T w = 0;
#pragma unroll
    for (int k = 0; k < (int)sizeof(T); k++) w |= (T)((T)((const u8*)c.val[k])[j] << (8 * k));
    if (layout == LAYOUT_ROTATED_PLANES) w = (T)((T)(w >> 1) | (T)(w << (8 * sizeof(T) - 1)));
    return w;
}

template <typename T>
__device__ __forceinline__ T combine(T b, T v, u32 op) {
    if (op == OP_XOR) return (T)(b ^ v);
    T d = (T)((T)(v >> 1) ^ (T)((T)0 - (T)(v & (T)1)));  // unzigzag
    return (T)(b + d);
}

// Words that a thread of a dense chunk takes at once, where the chunk's
// addresses allow: each value plane gives their bytes in one 4-byte load,
// and the base and the output take one access for all of them, instead of
// a load per byte and word.
#define DENSE_GROUP 4u

template <typename T>
struct alignas(DENSE_GROUP * sizeof(T)) WordGroup {
    T w[DENSE_GROUP];
};

// Whether a chunk's output, value streams and (`with_base`) base are
// aligned for WordGroup accesses from any multiple of DENSE_GROUP words.
template <typename T>
__device__ __forceinline__ bool groups_fit(const ChunkDesc& c, bool with_base) {
    const u64 wide = DENSE_GROUP * sizeof(T);
    if ((with_base && c.base % wide) || c.out % wide) return false;
    if (c.layout == LAYOUT_WORDS) return c.val[0] % wide == 0;
    bool fit = true;
#pragma unroll
    for (int k = 0; k < (int)sizeof(T); k++) fit = fit && c.val[k] % DENSE_GROUP == 0;
    return fit;
}

// The values of words j .. j + DENSE_GROUP - 1, as load_value gives each.
template <typename T>
__device__ __forceinline__ WordGroup<T> load_value_group(const ChunkDesc& c, u64 j) {
    if (c.layout == LAYOUT_WORDS) return *(const WordGroup<T>*)((const T*)c.val[0] + j);
    WordGroup<T> v;
#pragma unroll
    for (u32 q = 0; q < DENSE_GROUP; q++) v.w[q] = 0;
#pragma unroll
    for (int k = 0; k < (int)sizeof(T); k++) {
        const u32 bytes = *(const u32*)((const u8*)c.val[k] + j);  // byte k of each word
#pragma unroll
        for (u32 q = 0; q < DENSE_GROUP; q++) v.w[q] |= (T)((T)((bytes >> (8 * q)) & 0xFFu) << (8 * k));
    }
    if (c.layout == LAYOUT_ROTATED_PLANES) {
#pragma unroll
        for (u32 q = 0; q < DENSE_GROUP; q++) v.w[q] = (T)((T)(v.w[q] >> 1) | (T)(v.w[q] << (8 * sizeof(T) - 1)));
    }
    return v;
}

// Exclusive scan of one u64 per thread over a 256-thread block. Returns the
// exclusive prefix; *total receives the block sum. Must be called by all threads.
__device__ __forceinline__ u64 block_exclusive_scan(u64 x, u64* warp_sums, u64* total) {
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    u64 inc = x;
#pragma unroll
    for (u32 o = 1; o < 32; o <<= 1) {
        u64 y = __shfl_up_sync(0xffffffffu, inc, o);
        if (lane >= o) inc += y;
    }
    if (lane == 31) warp_sums[warp] = inc;
    __syncthreads();
    if (warp == 0) {
        u64 s = lane < THREADS / 32 ? warp_sums[lane] : 0;
#pragma unroll
        for (u32 o = 1; o < THREADS / 32; o <<= 1) {
            u64 y = __shfl_up_sync(0xffffffffu, s, o);
            if (lane >= o) s += y;
        }
        if (lane < THREADS / 32) warp_sums[lane] = s;
    }
    __syncthreads();
    u64 prefix = warp > 0 ? warp_sums[warp - 1] : 0;
    *total = warp_sums[THREADS / 32 - 1];
    __syncthreads();
    return prefix + inc - x;
}

// Bitmap byte b of a chunk with padding bits masked off (and reported).
__device__ __forceinline__ u32 bitmap_byte(const u8* bm, u32 n, u64 b, u32* flag) {
    u32 byte = bm[b];
    const u64 nbytes = ((u64)n + 7) / 8;
    if (b == nbytes - 1 && (n & 7u)) {
        u32 mask = (1u << (n & 7u)) - 1u;
        if (byte & ~mask) atomicOr(flag, ERR_BITMAP_PADDING);
        byte &= mask;
    }
    return byte;
}

// Phase 1: per tile totals of sparse chunks.
extern "C" __global__ void __launch_bounds__(THREADS)
tile_totals(const ChunkDesc* d, u32 nd, u64* sums, u32* flag) {
    __shared__ u64 ws[THREADS / 32];
    __shared__ u32 ci;
    if (threadIdx.x == 0) ci = find_chunk(d, nd, blockIdx.x);
    __syncthreads();
    const ChunkDesc c = d[ci];
    if (reject_bad_desc(c, flag)) return;
    const u64 t = blockIdx.x - c.tile_begin;
    u64 acc = 0;
    if (c.kind == KIND_SPARSE_GAPS) {
        const u64 j0 = t * TILE;
        for (u32 k = threadIdx.x; k < TILE; k += THREADS) {
            u64 j = j0 + k;
            if (j < c.m) {
                u64 gap = load_gap(c, j);
                if (gap == 0 && j > 0) atomicOr(flag, ERR_ZERO_GAP);
                acc += gap;
            }
        }
    } else if (c.kind == KIND_SPARSE_BITMAP) {
        const u8* bm = (const u8*)c.pos[0];
        const u64 nbytes = ((u64)c.n + 7) / 8;
        const u64 b0 = t * BITMAP_TILE_BYTES;
        for (u32 k = threadIdx.x; k < BITMAP_TILE_BYTES; k += THREADS) {
            u64 b = b0 + k;
            if (b < nbytes) acc += __popc(bitmap_byte(bm, c.n, b, flag));
        }
    } else {
        return;  // uniform per block
    }
    u64 total;
    block_exclusive_scan(acc, ws, &total);
    if (threadIdx.x == 0) sums[blockIdx.x] = total;
}

// Phase 2: one block per chunk; exclusive scan of its tile sums, in place.
extern "C" __global__ void __launch_bounds__(THREADS)
tile_scan(const ChunkDesc* d, u32 nd, u64* sums, u32* flag) {
    __shared__ u64 ws[THREADS / 32];
    if (blockIdx.x >= nd) return;
    const ChunkDesc c = d[blockIdx.x];
    if (reject_bad_desc(c, flag)) return;
    if (c.kind != KIND_SPARSE_GAPS && c.kind != KIND_SPARSE_BITMAP) return;
    u64 carry = 0;
    for (u32 base = 0; base < c.tile_count; base += THREADS) {
        u32 k = base + threadIdx.x;
        u64 x = k < c.tile_count ? sums[c.tile_begin + k] : 0;
        u64 total;
        u64 ex = block_exclusive_scan(x, ws, &total);
        if (k < c.tile_count) sums[c.tile_begin + k] = carry + ex;
        carry += total;
    }
    if (threadIdx.x == 0) {
        // gaps: the sum of all gaps is the last position, which must be < n.
        if (c.kind == KIND_SPARSE_GAPS && c.m > 0 && carry >= c.n) atomicOr(flag, ERR_POSITION_RANGE);
        // bitmap: one value per set bit.
        if (c.kind == KIND_SPARSE_BITMAP && carry != c.m) atomicOr(flag, ERR_COUNT_MISMATCH);
    }
}

// Scans one tile of gaps into absolute positions, written (padded) to pos[].
__device__ __forceinline__ void scan_gap_tile(const ChunkDesc& c, u64 t, const u64* offs, u64* pos,
                                              u64* ws) {
    const u64 j0 = t * TILE;
    for (u32 k = threadIdx.x; k < TILE; k += THREADS) {
        u64 j = j0 + k;
        pos[PAD(k)] = j < c.m ? load_gap(c, j) : 0;
    }
    __syncthreads();
    u64 local[ITEMS];
    u64 sum = 0;
#pragma unroll
    for (int i = 0; i < ITEMS; i++) {
        sum += pos[PAD(threadIdx.x * ITEMS + i)];
        local[i] = sum;
    }
    u64 total;
    u64 ex = block_exclusive_scan(sum, ws, &total) + offs[c.tile_begin + t];
#pragma unroll
    for (int i = 0; i < ITEMS; i++) pos[PAD(threadIdx.x * ITEMS + i)] = ex + local[i];
    __syncthreads();
}

// Loads one tile of a position list (KIND_SPARSE_LIST) into pos[] (padded),
// as scan_gap_tile does for gaps.
__device__ __forceinline__ void load_list_tile(const ChunkDesc& c, u64 t, u64* pos) {
    const u32* list = (const u32*)c.pos[0];
    const u64 j0 = t * TILE;
    for (u32 k = threadIdx.x; k < TILE; k += THREADS) {
        u64 j = j0 + k;
        pos[PAD(k)] = j < c.m ? list[j] : 0;
    }
    __syncthreads();
}

// Pass 1 of the leaf digest (tpde_xxh3.cu) for the whole blocks of a dense
// or raw tile, into the chunk's term rows at c.terms, read back from the output the
// block has just written, while it is still in L2: the digest pass then reads
// none of the chunk but its last block. Each thread sums four stripes of a
// lane pair, and the four threads of a block's pair add theirs up, so that
// every thread of the block shares the work. Called by all threads.
template <typename T>
__device__ __forceinline__ void tile_leaf_terms(const ChunkDesc& c, u64 t, xu64* secret) {
    for (u32 w = threadIdx.x; w < XXH_SECRET_WORDS; w += THREADS) secret[w] = xxh_secret64(8 * w);
    __syncthreads();  // also makes the tile's words visible to the whole block
    const u64 len = (u64)c.n * sizeof(T);
    const u64 whole = len > XXH_MID_SIZE_MAX ? xxh3_full_blocks(len) : 0;
    const u64 per_tile = TILE * sizeof(T) / XXH_BLOCK;
    const u64 first = t * per_tile;
    const u64 end = first + per_tile < whole ? first + per_tile : whole;
    const u64 units = end > first ? 16 * (end - first) : 0;  // (block, quarter, pair)
    xu64* rows = (xu64*)c.terms;
    for (u64 at = 0; at < units; at += THREADS) {  // uniform: every lane shuffles below
        const u64 u = at + threadIdx.x;
        const u64 block = first + (u >> 4);
        const u32 quarter = (u32)(u >> 2) & 3, p = (u32)u & 3;
        xu64 t0 = 0, t1 = 0;
        if (u < units) {
            const xu8* in = (const xu8*)c.out + block * XXH_BLOCK + quarter * 4 * XXH_STRIPE;
            xxh3_stripes_pair(in, 4, (const xu8*)secret, quarter * 4 * 8, p, &t0, &t1);
        }
#pragma unroll
        for (u32 m = 4; m <= 8; m <<= 1) {
            t0 += __shfl_xor_sync(0xffffffffu, t0, m);
            t1 += __shfl_xor_sync(0xffffffffu, t1, m);
        }
        if (u < units && quarter == 0) {
            rows[8 * block + 2 * p] = t0;
            rows[8 * block + 2 * p + 1] = t1;
        }
    }
}

template <typename T>
__device__ __forceinline__ void apply_impl(ChunkDesc* d, u32 nd, const u64* offs, u32* flag) {
    __shared__ u64 pos[PAD(TILE)];
    __shared__ u64 ws[THREADS / 32];
    __shared__ xu64 secret[XXH_SECRET_WORDS];
    __shared__ u32 ci;
    if (threadIdx.x == 0) ci = find_chunk(d, nd, blockIdx.x);
    __syncthreads();
    const ChunkDesc c = d[ci];
    if (reject_bad_desc(c, flag)) return;
    const u64 t = blockIdx.x - c.tile_begin;
    T* out = (T*)c.out;
    const T* base = (const T*)c.base;
    if (c.order != ORDER_POSITIONAL) return;  // apply_grouped_wN; uniform per block
    u32 changed = 0;
    if (c.kind == KIND_RAW) {
        const u64 i0 = t * TILE;
        // whole groups first, where the addresses allow, then word by word
        u32 grouped = 0;
        if (groups_fit<T>(c, false)) {
            const u64 left = c.n > i0 ? c.n - i0 : 0;
            grouped = (u32)(left < TILE ? left : TILE) & ~(DENSE_GROUP - 1);
            for (u32 k = DENSE_GROUP * threadIdx.x; k < grouped; k += DENSE_GROUP * THREADS) {
                *(WordGroup<T>*)(out + i0 + k) = load_value_group<T>(c, i0 + k);
            }
        }
        for (u32 k = grouped + threadIdx.x; k < TILE; k += THREADS) {
            u64 i = i0 + k;
            if (i < c.n) out[i] = load_value<T>(c, i);
        }
        if (c.terms) tile_leaf_terms<T>(c, t, secret);  // uniform per block
    } else if (c.kind == KIND_DENSE) {
        const u64 i0 = t * TILE;
        // whole groups first, where the addresses allow, then word by word
        u32 grouped = 0;
        if (groups_fit<T>(c, true)) {
            const u64 left = c.n > i0 ? c.n - i0 : 0;
            grouped = (u32)(left < TILE ? left : TILE) & ~(DENSE_GROUP - 1);
            for (u32 k = DENSE_GROUP * threadIdx.x; k < grouped; k += DENSE_GROUP * THREADS) {
                const u64 i = i0 + k;
                const WordGroup<T> b = *(const WordGroup<T>*)(base + i);
                const WordGroup<T> v = load_value_group<T>(c, i);
                WordGroup<T> w;
#pragma unroll
                for (u32 q = 0; q < DENSE_GROUP; q++) {
                    w.w[q] = combine<T>(b.w[q], v.w[q], c.op);
                    changed += w.w[q] != b.w[q];
                }
                *(WordGroup<T>*)(out + i) = w;
            }
        }
        for (u32 k = grouped + threadIdx.x; k < TILE; k += THREADS) {
            u64 i = i0 + k;
            if (i < c.n) {
                const T b = base[i];
                const T w = combine<T>(b, load_value<T>(c, i), c.op);
                out[i] = w;
                changed += w != b;
            }
        }
        if (c.terms) tile_leaf_terms<T>(c, t, secret);
    } else if (c.kind == KIND_SPARSE_GAPS || c.kind == KIND_SPARSE_LIST) {
        if (c.kind == KIND_SPARSE_GAPS) scan_gap_tile(c, t, offs, pos, ws);
        else load_list_tile(c, t, pos);
        const u64 j0 = t * TILE;
        for (u32 k = threadIdx.x; k < TILE; k += THREADS) {
            u64 j = j0 + k;
            if (j < c.m) {
                u64 p = pos[PAD(k)];
                if (p >= c.n) {
                    atomicOr(flag, ERR_POSITION_RANGE);
                } else {
                    const T b = base[p];
                    const T w = combine<T>(b, load_value<T>(c, j), c.op);
                    out[p] = w;
                    changed += w != b;
                }
            }
        }
    } else if (c.kind == KIND_SPARSE_BITMAP) {
        const u8* bm = (const u8*)c.pos[0];
        const u64 nbytes = ((u64)c.n + 7) / 8;
        const u64 b0 = t * BITMAP_TILE_BYTES + (u64)threadIdx.x * 16;
        u32 bytes[16];
        u32 cnt = 0;
#pragma unroll
        for (int i = 0; i < 16; i++) {
            u64 b = b0 + i;
            bytes[i] = b < nbytes ? bitmap_byte(bm, c.n, b, flag) : 0;
            cnt += __popc(bytes[i]);
        }
        u64 total;
        u64 rank = block_exclusive_scan(cnt, ws, &total) + offs[c.tile_begin + t];
        for (int i = 0; i < 16; i++) {
            u32 byte = bytes[i];
            while (byte) {
                u32 bit = __ffs(byte) - 1;
                byte &= byte - 1;
                u64 p = (b0 + i) * 8 + bit;
                if (rank >= c.m) {
                    atomicOr(flag, ERR_COUNT_MISMATCH);
                } else {
                    const T b = base[p];
                    const T w = combine<T>(b, load_value<T>(c, rank), c.op);
                    out[p] = w;
                    changed += w != b;
                }
                rank++;
            }
        }
    }
    count_changed(d, ci, changed);
}

extern "C" __global__ void __launch_bounds__(THREADS)
apply_w1(ChunkDesc* d, u32 nd, const u64* offs, u32* flag) { apply_impl<u8>(d, nd, offs, flag); }
extern "C" __global__ void __launch_bounds__(THREADS)
apply_w2(ChunkDesc* d, u32 nd, const u64* offs, u32* flag) { apply_impl<u16>(d, nd, offs, flag); }
extern "C" __global__ void __launch_bounds__(THREADS)
apply_w4(ChunkDesc* d, u32 nd, const u64* offs, u32* flag) { apply_impl<u32>(d, nd, offs, flag); }
extern "C" __global__ void __launch_bounds__(THREADS)
apply_w8(ChunkDesc* d, u32 nd, const u64* offs, u32* flag) { apply_impl<u64>(d, nd, offs, flag); }

// ---------------------------------------------------------------------------
// Values grouped by base key (spec §8.6)

// key(b) = top byte of rotl(b, 1).
template <typename T>
__device__ __forceinline__ u32 group_key(T b) {
    const int bits = 8 * (int)sizeof(T);
    const T r = (T)((T)(b << 1) | (T)(b >> (bits - 1)));
    return (u32)(r >> (bits - 8)) & 0xFFu;
}

// Values stored by a chunk: every word (dense) or m (sparse).
__device__ __forceinline__ u64 value_count(const ChunkDesc& c) {
    return c.kind == KIND_DENSE ? (u64)c.n : (u64)c.m;
}

__device__ __forceinline__ bool grouped_kind(const ChunkDesc& c) {
    return c.order == ORDER_GROUPED && (c.kind == KIND_DENSE || c.kind == KIND_SPARSE_GAPS ||
                                        c.kind == KIND_SPARSE_BITMAP || c.kind == KIND_SPARSE_LIST);
}

// Adds one key per lane (NO_KEY: none) to a shared histogram, one atomic
// per distinct key of the warp. Called by all 32 lanes.
__device__ __forceinline__ void count_key(u32* hist, u32 key) {
    const u32 peers = __match_any_sync(0xffffffffu, key);
    if (key < KEYS && (threadIdx.x & 31) == (u32)(__ffs(peers) - 1)) atomicAdd(&hist[key], (u32)__popc(peers));
}

// Phase G1: per tile histogram of base keys, to row 1 + t of the chunk's rows.
template <typename T>
__device__ __forceinline__ void group_hist_impl(const ChunkDesc* d, u32 nd, const u64* offs, u32* groups, u32* flag) {
    __shared__ u64 pos[PAD(TILE)];
    __shared__ u64 ws[WARPS];
    __shared__ u32 hist[KEYS];
    __shared__ u32 ci;
    if (threadIdx.x == 0) ci = find_chunk(d, nd, blockIdx.x);
    hist[threadIdx.x] = 0;
    __syncthreads();
    const ChunkDesc c = d[ci];
    if (reject_bad_desc(c, flag)) return;
    if (!grouped_kind(c)) return;  // uniform per block
    const u64 t = blockIdx.x - c.tile_begin;
    const T* base = (const T*)c.base;
    if (c.kind == KIND_DENSE) {
        const u64 i0 = t * TILE;
        for (u32 k = threadIdx.x; k < TILE; k += THREADS) {
            const u64 i = i0 + k;
            count_key(hist, i < c.n ? group_key<T>(base[i]) : NO_KEY);
        }
    } else if (c.kind == KIND_SPARSE_GAPS || c.kind == KIND_SPARSE_LIST) {
        if (c.kind == KIND_SPARSE_GAPS) scan_gap_tile(c, t, offs, pos, ws);
        else load_list_tile(c, t, pos);
        const u64 j0 = t * TILE;
        for (u32 k = threadIdx.x; k < TILE; k += THREADS) {
            const u64 j = j0 + k;
            const u64 p = pos[PAD(k)];
            count_key(hist, j < c.m && p < c.n ? group_key<T>(base[p]) : NO_KEY);  // bad p: flagged by apply
        }
    } else {
        const u8* bm = (const u8*)c.pos[0];
        const u64 nbytes = ((u64)c.n + 7) / 8;
        const u64 b0 = t * BITMAP_TILE_BYTES + (u64)threadIdx.x * 16;
        for (int i = 0; i < 16; i++) {
            const u64 b = b0 + i;
            if (b >= nbytes) break;
            u32 byte = bm[b];
            if (b == nbytes - 1 && (c.n & 7u)) byte &= (1u << (c.n & 7u)) - 1u;  // padding: flagged elsewhere
            while (byte) {
                const u32 bit = __ffs(byte) - 1;
                byte &= byte - 1;
                atomicAdd(&hist[group_key<T>(base[b * 8 + bit])], 1u);
            }
        }
    }
    __syncthreads();
    groups[((u64)c.group_begin + 1 + t) * KEYS + threadIdx.x] = hist[threadIdx.x];
}

#define G_HIST(W, T)                                                                       \
    extern "C" __global__ void __launch_bounds__(THREADS)                                  \
    group_hist_##W(const ChunkDesc* d, u32 nd, const u64* offs, u32* groups, u32* flag) { \
        group_hist_impl<T>(d, nd, offs, groups, flag);                                     \
    }
G_HIST(w1, u8)
G_HIST(w2, u16)
G_HIST(w4, u32)
G_HIST(w8, u64)

// Phase G2: one block per chunk, thread k owns key k. Rows 1..=tile_count
// become, in place, the slots of key k taken by earlier tiles; row 0 gets
// start[k] = the values of all smaller keys.
extern "C" __global__ void __launch_bounds__(THREADS)
group_scan(const ChunkDesc* d, u32 nd, u32* groups, u32* flag) {
    __shared__ u64 ws[WARPS];
    if (blockIdx.x >= nd) return;
    const ChunkDesc c = d[blockIdx.x];
    if (reject_bad_desc(c, flag)) return;
    if (!grouped_kind(c)) return;
    u32* rows = groups + (u64)c.group_begin * KEYS + threadIdx.x;
    u64 run = 0;
    u32 t = 0;
    // 16 independent loads in flight per round, not one latency per tile
    for (; t + 16 <= c.tile_count; t += 16) {
        u32 x[16];
#pragma unroll
        for (int i = 0; i < 16; i++) x[i] = rows[(u64)(1 + t + i) * KEYS];
#pragma unroll
        for (int i = 0; i < 16; i++) {
            rows[(u64)(1 + t + i) * KEYS] = (u32)run;
            run += x[i];
        }
    }
    for (; t < c.tile_count; t++) {
        const u32 x = rows[(u64)(1 + t) * KEYS];
        rows[(u64)(1 + t) * KEYS] = (u32)run;
        run += x;
    }
    u64 total;
    const u64 start = block_exclusive_scan(run, ws, &total);
    rows[0] = (u32)start;
    // positions out of range are left out (and flagged by apply)
    if (threadIdx.x == 0 && total != value_count(c)) atomicOr(flag, ERR_COUNT_MISMATCH);
}

// Ranks up to TILE positions of a tile in order (entry e: word pos[PAD(e)],
// or i0 + e when pos is null) among those of the same base key, and applies
// each position's value. run[k] holds the slot of the next value of key k
// (start + earlier tiles + earlier entries of this tile) and is advanced.
// Warp w takes entries [w * TILE / WARPS, (w + 1) * TILE / WARPS) in rounds of
// 32, so that the rank within a warp is a match over its lanes plus the
// warp's counter of that key; a per-key scan over the warps then places
// each warp's run. Must be called by all threads.
template <typename T>
__device__ __forceinline__ void grouped_entries(ChunkDesc* d, u32 ci, const ChunkDesc& c, u32 cnt, const u64* pos,
                                                u64 i0, u32 (*wrun)[KEYS], u32* run, u32* flag) {
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const T* base = (const T*)c.base;
    T* out = (T*)c.out;
    for (u32 k = lane; k < KEYS; k += 32) wrun[warp][k] = 0;
    __syncwarp();
    // Rank among the warp's entries of the same key, or NO_RANK. The base
    // word is read again (by this same thread) when the value is applied,
    // which keeps 16 words out of registers.
    u32 rk[ITEMS];
    const u32 e0 = warp * (TILE / WARPS);
#pragma unroll
    for (int r = 0; r < ITEMS; r++) {
        const u32 e = e0 + r * 32 + lane;
        u32 key = NO_KEY;
        if (e < cnt) {
            const u64 p = pos ? pos[PAD(e)] : i0 + e;
            if (p < c.n) {
                key = group_key<T>(base[p]);
            } else {
                atomicOr(flag, ERR_POSITION_RANGE);
            }
        }
        const u32 peers = __match_any_sync(0xffffffffu, key);
        const u32 before = __popc(peers & ((1u << lane) - 1u));
        const u32 r0 = key < KEYS ? wrun[warp][key] : 0;
        rk[r] = key < KEYS ? r0 + before : NO_RANK;
        __syncwarp();
        if (key < KEYS && lane == (u32)(__ffs(peers) - 1)) wrun[warp][key] = r0 + __popc(peers);
        __syncwarp();
    }
    __syncthreads();
    {
        const u32 k = threadIdx.x;
        u32 s = run[k];
#pragma unroll
        for (int w = 0; w < WARPS; w++) {
            const u32 x = wrun[w][k];
            wrun[w][k] = s;
            s += x;
        }
        run[k] = s;
    }
    __syncthreads();
    const u64 count = value_count(c);
    u32 changed = 0;
#pragma unroll
    for (int r = 0; r < ITEMS; r++) {
        if (rk[r] != NO_RANK) {
            const u32 e = e0 + r * 32 + lane;
            const u64 p = pos ? pos[PAD(e)] : i0 + e;
            const T b = base[p];
            const u64 slot = (u64)wrun[warp][group_key<T>(b)] + rk[r];
            if (slot >= count) {
                atomicOr(flag, ERR_COUNT_MISMATCH);
            } else {
                const T w = combine<T>(b, load_value<T>(c, slot), c.op);
                out[p] = w;
                changed += w != b;
            }
        }
    }
    count_changed(d, ci, changed);
    __syncthreads();  // wrun, run and pos are reused
}

template <typename T>
__device__ __forceinline__ void apply_grouped_impl(ChunkDesc* d, u32 nd, const u64* offs, const u32* groups,
                                                   u32* flag) {
    __shared__ u64 pos[PAD(TILE)];
    __shared__ u64 ws[WARPS];
    __shared__ u32 wrun[WARPS][KEYS];
    __shared__ u32 run[KEYS];
    __shared__ u32 ci;
    if (threadIdx.x == 0) ci = find_chunk(d, nd, blockIdx.x);
    __syncthreads();
    const ChunkDesc c = d[ci];
    if (reject_bad_desc(c, flag)) return;
    if (!grouped_kind(c)) return;  // uniform per block
    const u64 t = blockIdx.x - c.tile_begin;
    const u32* rows = groups + (u64)c.group_begin * KEYS;
    run[threadIdx.x] = rows[threadIdx.x] + rows[(1 + t) * KEYS + threadIdx.x];  // read back by this thread only
    if (c.kind == KIND_DENSE) {
        const u64 i0 = t * TILE;
        const u64 left = (u64)c.n - i0;
        grouped_entries<T>(d, ci, c, left < TILE ? (u32)left : TILE, 0, i0, wrun, run, flag);
    } else if (c.kind == KIND_SPARSE_GAPS || c.kind == KIND_SPARSE_LIST) {
        if (c.kind == KIND_SPARSE_GAPS) scan_gap_tile(c, t, offs, pos, ws);
        else load_list_tile(c, t, pos);
        const u64 left = (u64)c.m - t * TILE;
        grouped_entries<T>(d, ci, c, left < TILE ? (u32)left : TILE, pos, 0, wrun, run, flag);
    } else {
        // Up to 8 * TILE set bits per tile: ranks within the tile, then
        // rounds of TILE positions gathered in order into pos[].
        const u8* bm = (const u8*)c.pos[0];
        const u64 nbytes = ((u64)c.n + 7) / 8;
        const u64 b0 = t * BITMAP_TILE_BYTES + (u64)threadIdx.x * 16;
        u32 bytes[16];
        u32 cnt = 0;
#pragma unroll
        for (int i = 0; i < 16; i++) {
            const u64 b = b0 + i;
            bytes[i] = b < nbytes ? bitmap_byte(bm, c.n, b, flag) : 0;
            cnt += __popc(bytes[i]);
        }
        u64 total;
        const u64 first = block_exclusive_scan(cnt, ws, &total);
        for (u64 lo = 0; lo < total; lo += TILE) {
            u64 rank = first;
            for (int i = 0; i < 16 && rank < lo + TILE; i++) {
                u32 byte = bytes[i];
                while (byte) {
                    const u32 bit = __ffs(byte) - 1;
                    byte &= byte - 1;
                    if (rank >= lo && rank < lo + TILE) pos[PAD(rank - lo)] = (b0 + i) * 8 + bit;
                    rank++;
                }
            }
            __syncthreads();
            const u64 left = total - lo;
            grouped_entries<T>(d, ci, c, left < TILE ? (u32)left : TILE, pos, 0, wrun, run, flag);
        }
    }
}

#define G_APPLY(W, T)                                                                                    \
    extern "C" __global__ void __launch_bounds__(THREADS)                                                \
    apply_grouped_##W(ChunkDesc* d, u32 nd, const u64* offs, const u32* groups, u32* flag) {             \
        apply_grouped_impl<T>(d, nd, offs, groups, flag);                                                \
    }
G_APPLY(w1, u8)
G_APPLY(w2, u16)
G_APPLY(w4, u32)
G_APPLY(w8, u64)

// ---------------------------------------------------------------------------
// Positions only: writes the absolute u32 positions of sparse chunks to out[0..m).
extern "C" __global__ void __launch_bounds__(THREADS)
positions(const ChunkDesc* d, u32 nd, const u64* offs, u32* flag) {
    __shared__ u64 pos[PAD(TILE)];
    __shared__ u64 ws[THREADS / 32];
    __shared__ u32 ci;
    if (threadIdx.x == 0) ci = find_chunk(d, nd, blockIdx.x);
    __syncthreads();
    const ChunkDesc c = d[ci];
    if (reject_bad_desc(c, flag)) return;
    const u64 t = blockIdx.x - c.tile_begin;
    u32* out = (u32*)c.out;
    if (c.kind == KIND_SPARSE_GAPS || c.kind == KIND_SPARSE_LIST) {
        if (c.kind == KIND_SPARSE_GAPS) scan_gap_tile(c, t, offs, pos, ws);
        else load_list_tile(c, t, pos);
        const u64 j0 = t * TILE;
        for (u32 k = threadIdx.x; k < TILE; k += THREADS) {
            u64 j = j0 + k;
            if (j < c.m) {
                u64 p = pos[PAD(k)];
                if (p >= c.n) atomicOr(flag, ERR_POSITION_RANGE);
                else out[j] = (u32)p;
            }
        }
    } else if (c.kind == KIND_SPARSE_BITMAP) {
        const u8* bm = (const u8*)c.pos[0];
        const u64 nbytes = ((u64)c.n + 7) / 8;
        const u64 b0 = t * BITMAP_TILE_BYTES + (u64)threadIdx.x * 16;
        u32 bytes[16];
        u32 cnt = 0;
#pragma unroll
        for (int i = 0; i < 16; i++) {
            u64 b = b0 + i;
            bytes[i] = b < nbytes ? bitmap_byte(bm, c.n, b, flag) : 0;
            cnt += __popc(bytes[i]);
        }
        u64 total;
        u64 rank = block_exclusive_scan(cnt, ws, &total) + offs[c.tile_begin + t];
        for (int i = 0; i < 16; i++) {
            u32 byte = bytes[i];
            while (byte) {
                u32 bit = __ffs(byte) - 1;
                byte &= byte - 1;
                if (rank >= c.m) atomicOr(flag, ERR_COUNT_MISMATCH);
                else out[rank] = (u32)((b0 + i) * 8 + bit);
                rank++;
            }
        }
    }
}

// Last launch of a batch: one thread per descriptor compares the words the
// apply kernels changed with the stored changed_count (raw chunks have none).
extern "C" __global__ void __launch_bounds__(THREADS)
check_counts(const ChunkDesc* d, u32 nd, u32* flag) {
    const u64 i = (u64)blockIdx.x * THREADS + threadIdx.x;
    if (i >= nd) return;
    const ChunkDesc& c = d[i];
    if (c.kind != KIND_RAW && c.changed != c.m) atomicOr(flag, ERR_COUNT_MISMATCH);
}

// The base bytes that a call copies into its outputs before the chunks apply,
// every tensor in one launch: a copy call apiece cost the host and the device a
// few microseconds each, which dominated models of many small tensors. The
// ranges travel in the kernel's parameters (__grid_constant__, read in place),
// so no table is uploaded. blockIdx.y picks the range and the blocks along x
// stride over it: 16-byte loads and stores where source and destination share
// their alignment, the unaligned head and tail and every other range byte by byte.
#define COPY_RANGES 160
struct CopyRanges {
    u64 dst[COPY_RANGES];
    u64 src[COPY_RANGES];
    u64 len[COPY_RANGES];
};
static_assert(sizeof(CopyRanges) == 3840, "CopyRanges layout");

extern "C" __global__ void __launch_bounds__(THREADS)
copy_ranges(const __grid_constant__ CopyRanges r, u32 n) {
    if (blockIdx.y >= n) return;
    const u64 dst = r.dst[blockIdx.y], src = r.src[blockIdx.y], len = r.len[blockIdx.y];
    u8* d = (u8*)dst;
    const u8* s = (const u8*)src;
    const u64 first = (u64)blockIdx.x * THREADS + threadIdx.x;
    const u64 stride = (u64)gridDim.x * THREADS;
    if (((dst ^ src) & 15) != 0) {
        for (u64 i = first; i < len; i += stride) d[i] = s[i];
        return;
    }
    const u64 head = min((u64)((16 - (dst & 15)) & 15), len);
    const u64 words = (len - head) / 16;
    const u64 tail = head + words * 16;
    if (first < head) d[first] = s[first];
    if (first < len - tail) d[tail + first] = s[tail + first];
    const uint4* s4 = (const uint4*)(s + head);
    uint4* d4 = (uint4*)(d + head);
    for (u64 i = first; i < words; i += stride) d4[i] = s4[i];
}

// Constant streams (spec §8.8, codec 3): `len` bytes at `dst`, each `value`.
// They are filled before any kernel reads them, so a constant plane never
// crosses the bus nor waits for the CPU. blockIdx.y picks the descriptor and
// the blocks along x stride over its bytes: the unaligned head and tail byte
// by byte, the rest in 16-byte stores.
struct FillDesc {
    u64 dst;
    u32 len;
    u32 value;
};
static_assert(sizeof(FillDesc) == 16, "FillDesc layout");

extern "C" __global__ void __launch_bounds__(THREADS)
fill_streams(const FillDesc* d, u32 nd) {
    if (blockIdx.y >= nd) return;
    const FillDesc f = d[blockIdx.y];
    u8* p = (u8*)f.dst;
    const u8 v = (u8)f.value;
    const u64 head = min((u64)((16 - (f.dst & 15)) & 15), (u64)f.len);
    const u64 words = ((u64)f.len - head) / 16;
    const u64 tail = head + words * 16;
    const u32 v4 = 0x01010101u * v;
    const uint4 q = make_uint4(v4, v4, v4, v4);
    const u64 first = (u64)blockIdx.x * THREADS + threadIdx.x;
    const u64 stride = (u64)gridDim.x * THREADS;
    if (first < head) p[first] = v;
    if (first < (u64)f.len - tail) p[tail + first] = v;
    uint4* p4 = (uint4*)(p + head);
    for (u64 i = first; i < words; i += stride) p4[i] = q;
}
