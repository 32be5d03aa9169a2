// XXH3-128 with seed 0 and the default secret: the chunk leaf digests of
// spec/FORMAT.md §10, computed on the device from the rebuilt bytes.
//
// Everything above the kernels is plain C++ as well, so the host compiler
// builds it too: crates/tpde-cuda/tests/xxh3_host.rs compiles this file with
// `c++` and checks xxh3_128_host() against xxhash-rust on many lengths and
// alignments. That proves the arithmetic of the kernel without a GPU.
//
// Parallel form of the long path (> 240 bytes), in two passes. Within a
// block of 16 stripes (1024 bytes) the accumulators only add per-stripe
// terms, so acc_{k+1} = scramble(acc_k + S_k), where S_k (8 lanes) sums
// block k's stripe terms and does not depend on acc; lanes 2p and 2p + 1
// share their input words (acc[i ^ 1] += data[i]).
//  1. leaf_terms: S_k of every whole block of every range, with the whole
//     device (four threads per block, one per lane pair), into a scratch
//     table of 8 u64 per block.
//  2. leaf_fold: per range, eight threads fold acc = scramble(acc + S_k)
//     block after block (the S_k loads run ahead of the fold), then add the
//     last partial block and the last stripe and merge.

#if defined(__CUDACC__)
#define XXH_FN __device__ __forceinline__
#define XXH_SECRET_SPACE __constant__
#else
#define XXH_FN static inline
#define XXH_SECRET_SPACE static const
#endif

typedef unsigned char xu8;
typedef unsigned int xu32;
typedef unsigned long long xu64;

#define XXH_P32_1 0x9E3779B1u
#define XXH_P32_2 0x85EBCA77u
#define XXH_P32_3 0xC2B2AE3Du
#define XXH_P64_1 0x9E3779B185EBCA87ull
#define XXH_P64_2 0xC2B2AE3D27D4EB4Full
#define XXH_P64_3 0x165667B19E3779F9ull
#define XXH_P64_4 0x85EBCA77C2B2AE63ull
#define XXH_P64_5 0x27D4EB2F165667C5ull

#define XXH_STRIPE 64
#define XXH_BLOCK 1024                 // 16 stripes of the 192-byte secret
#define XXH_STRIPES_PER_BLOCK 16
#define XXH_SCRAMBLE_AT 128            // secret offset of the scramble keys
#define XXH_LAST_STRIPE_AT 121         // 192 - 64 - 7
#define XXH_MERGE_LO_AT 11
#define XXH_MERGE_HI_AT 117            // 192 - 64 - 11
#define XXH_MID_SIZE_MAX 240

XXH_SECRET_SPACE xu8 XXH3_SECRET[192] = {
    0xb8, 0xfe, 0x6c, 0x39, 0x23, 0xa4, 0x4b, 0xbe, 0x7c, 0x01, 0x81, 0x2c, 0xf7, 0x21, 0xad, 0x1c,
    0xde, 0xd4, 0x6d, 0xe9, 0x83, 0x90, 0x97, 0xdb, 0x72, 0x40, 0xa4, 0xa4, 0xb7, 0xb3, 0x67, 0x1f,
    0xcb, 0x79, 0xe6, 0x4e, 0xcc, 0xc0, 0xe5, 0x78, 0x82, 0x5a, 0xd0, 0x7d, 0xcc, 0xff, 0x72, 0x21,
    0xb8, 0x08, 0x46, 0x74, 0xf7, 0x43, 0x24, 0x8e, 0xe0, 0x35, 0x90, 0xe6, 0x81, 0x3a, 0x26, 0x4c,
    0x3c, 0x28, 0x52, 0xbb, 0x91, 0xc3, 0x00, 0xcb, 0x88, 0xd0, 0x65, 0x8b, 0x1b, 0x53, 0x2e, 0xa3,
    0x71, 0x64, 0x48, 0x97, 0xa2, 0x0d, 0xf9, 0x4e, 0x38, 0x19, 0xef, 0x46, 0xa9, 0xde, 0xac, 0xd8,
    0xa8, 0xfa, 0x76, 0x3f, 0xe3, 0x9c, 0x34, 0x3f, 0xf9, 0xdc, 0xbb, 0xc7, 0xc7, 0x0b, 0x4f, 0x1d,
    0x8a, 0x51, 0xe0, 0x4b, 0xcd, 0xb4, 0x59, 0x31, 0xc8, 0x9f, 0x7e, 0xc9, 0xd9, 0x78, 0x73, 0x64,
    0xea, 0xc5, 0xac, 0x83, 0x34, 0xd3, 0xeb, 0xc3, 0xc5, 0x81, 0xa0, 0xff, 0xfa, 0x13, 0x63, 0xeb,
    0x17, 0x0d, 0xdd, 0x51, 0xb7, 0xf0, 0xda, 0x49, 0xd3, 0x16, 0x55, 0x26, 0x29, 0xd4, 0x68, 0x9e,
    0x2b, 0x16, 0xbe, 0x58, 0x7d, 0x47, 0xa1, 0xfc, 0x8f, 0xf8, 0xb8, 0xd1, 0x7a, 0xd0, 0x31, 0xce,
    0x45, 0xcb, 0x3a, 0x8f, 0x95, 0x16, 0x04, 0x28, 0xaf, 0xd7, 0xfb, 0xca, 0xbb, 0x4b, 0x40, 0x7e,
};

// Initial accumulators, lane by lane.
XXH_FN xu64 xxh3_initial_acc(xu32 lane) {
    switch (lane) {
        case 0: return XXH_P32_3;
        case 1: return XXH_P64_1;
        case 2: return XXH_P64_2;
        case 3: return XXH_P64_3;
        case 4: return XXH_P64_4;
        case 5: return XXH_P32_2;
        case 6: return XXH_P64_5;
        default: return XXH_P32_1;
    }
}

// Little-endian loads at any alignment.
XXH_FN xu64 xxh_read64(const xu8* p) {
#if defined(__CUDACC__)
    if (((unsigned long long)p & 7ull) == 0) return *(const xu64*)p;
#endif
    xu64 v = 0;
    for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

XXH_FN xu32 xxh_read32(const xu8* p) {
    return (xu32)p[0] | ((xu32)p[1] << 8) | ((xu32)p[2] << 16) | ((xu32)p[3] << 24);
}

XXH_FN xu64 xxh_secret64(xu32 offset) { return xxh_read64(XXH3_SECRET + offset); }

XXH_FN xu64 xxh_swap64(xu64 x) {
    x = ((x << 8) & 0xFF00FF00FF00FF00ull) | ((x >> 8) & 0x00FF00FF00FF00FFull);
    x = ((x << 16) & 0xFFFF0000FFFF0000ull) | ((x >> 16) & 0x0000FFFF0000FFFFull);
    return (x << 32) | (x >> 32);
}

XXH_FN xu32 xxh_swap32(xu32 x) {
    return (x << 24) | ((x << 8) & 0x00FF0000u) | ((x >> 8) & 0x0000FF00u) | (x >> 24);
}

XXH_FN xu32 xxh_rotl32(xu32 x, int r) { return (x << r) | (x >> (32 - r)); }

XXH_FN void xxh_mul128(xu64 a, xu64 b, xu64* lo, xu64* hi) {
#if defined(__CUDACC__)
    *lo = a * b;
    *hi = __umul64hi(a, b);
#else
    unsigned __int128 p = (unsigned __int128)a * b;
    *lo = (xu64)p;
    *hi = (xu64)(p >> 64);
#endif
}

XXH_FN xu64 xxh_fold64(xu64 a, xu64 b) {
    xu64 lo, hi;
    xxh_mul128(a, b, &lo, &hi);
    return lo ^ hi;
}

XXH_FN xu64 xxh_mul32to64(xu64 a, xu64 b) { return (a & 0xFFFFFFFFull) * (b & 0xFFFFFFFFull); }

XXH_FN xu64 xxh3_avalanche(xu64 h) {
    h ^= h >> 37;
    h *= 0x165667919E3779F9ull;
    return h ^ (h >> 32);
}

XXH_FN xu64 xxh64_avalanche(xu64 h) {
    h ^= h >> 33;
    h *= XXH_P64_2;
    h ^= h >> 29;
    h *= XXH_P64_3;
    return h ^ (h >> 32);
}

XXH_FN xu64 xxh_mix16(const xu8* in, xu32 secret) {
    return xxh_fold64(xxh_read64(in) ^ xxh_secret64(secret), xxh_read64(in + 8) ^ xxh_secret64(secret + 8));
}

XXH_FN void xxh_mix32(xu64* lo, xu64* hi, const xu8* a, const xu8* b, xu32 secret) {
    *lo += xxh_mix16(a, secret);
    *lo ^= xxh_read64(b) + xxh_read64(b + 8);
    *hi += xxh_mix16(b, secret + 16);
    *hi ^= xxh_read64(a) + xxh_read64(a + 8);
}

// Inputs of at most 240 bytes: one thread.
XXH_FN void xxh3_128_short(const xu8* in, xu64 len, xu64* out_lo, xu64* out_hi) {
    if (len == 0) {
        *out_lo = xxh64_avalanche(xxh_secret64(64) ^ xxh_secret64(72));
        *out_hi = xxh64_avalanche(xxh_secret64(80) ^ xxh_secret64(88));
    } else if (len <= 3) {
        const xu32 c1 = in[0], c2 = in[len >> 1], c3 = in[len - 1];
        const xu32 lo = (c1 << 16) | (c2 << 24) | c3 | ((xu32)len << 8);
        const xu32 hi = xxh_rotl32(xxh_swap32(lo), 13);
        const xu64 flip_lo = (xu64)(xxh_read32(XXH3_SECRET) ^ xxh_read32(XXH3_SECRET + 4));
        const xu64 flip_hi = (xu64)(xxh_read32(XXH3_SECRET + 8) ^ xxh_read32(XXH3_SECRET + 12));
        *out_lo = xxh64_avalanche((xu64)lo ^ flip_lo);
        *out_hi = xxh64_avalanche((xu64)hi ^ flip_hi);
    } else if (len <= 8) {
        const xu64 input = (xu64)xxh_read32(in) + ((xu64)xxh_read32(in + len - 4) << 32);
        const xu64 keyed = input ^ (xxh_secret64(16) ^ xxh_secret64(24));
        xu64 lo, hi;
        xxh_mul128(keyed, XXH_P64_1 + (len << 2), &lo, &hi);
        hi += lo << 1;
        lo ^= hi >> 3;
        lo ^= lo >> 35;
        lo *= 0x9FB21C651E98DF25ull;
        lo ^= lo >> 28;
        *out_lo = lo;
        *out_hi = xxh3_avalanche(hi);
    } else if (len <= 16) {
        const xu64 flip_lo = xxh_secret64(32) ^ xxh_secret64(40);
        const xu64 flip_hi = xxh_secret64(48) ^ xxh_secret64(56);
        const xu64 in_lo = xxh_read64(in);
        xu64 in_hi = xxh_read64(in + len - 8);
        xu64 mul_lo, mul_hi;
        xxh_mul128(in_lo ^ in_hi ^ flip_lo, XXH_P64_1, &mul_lo, &mul_hi);
        mul_lo += (len - 1) << 54;
        in_hi ^= flip_hi;
        mul_hi += in_hi + xxh_mul32to64(in_hi, XXH_P32_2 - 1);
        mul_lo ^= xxh_swap64(mul_hi);
        xu64 r_lo, r_hi;
        xxh_mul128(mul_lo, XXH_P64_2, &r_lo, &r_hi);
        r_hi += mul_hi * XXH_P64_2;
        *out_lo = xxh3_avalanche(r_lo);
        *out_hi = xxh3_avalanche(r_hi);
    } else {
        xu64 lo = len * XXH_P64_1, hi = 0;
        if (len <= 128) {
            if (len > 32) {
                if (len > 64) {
                    if (len > 96) xxh_mix32(&lo, &hi, in + 48, in + len - 64, 96);
                    xxh_mix32(&lo, &hi, in + 32, in + len - 48, 64);
                }
                xxh_mix32(&lo, &hi, in + 16, in + len - 32, 32);
            }
            xxh_mix32(&lo, &hi, in, in + len - 16, 0);
        } else {
            const xu64 rounds = len / 32;
            for (xu32 i = 0; i < 4; i++) xxh_mix32(&lo, &hi, in + 32 * i, in + 32 * i + 16, 32 * i);
            lo = xxh3_avalanche(lo);
            hi = xxh3_avalanche(hi);
            for (xu32 i = 4; i < rounds; i++) xxh_mix32(&lo, &hi, in + 32 * i, in + 32 * i + 16, 3 + 32 * (i - 4));
            xxh_mix32(&lo, &hi, in + len - 16, in + len - 32, 136 - 17 - 16);
        }
        *out_lo = xxh3_avalanche(lo + hi);
        *out_hi = 0ull - xxh3_avalanche(lo * XXH_P64_1 + hi * XXH_P64_4 + len * XXH_P64_2);
    }
}

// Adds the terms of `stripes` stripes at `in` to lanes 2p and 2p + 1, the
// secret advancing 8 bytes per stripe from `secret + at` (`secret` is
// XXH3_SECRET or a copy of it).
XXH_FN void xxh3_stripes_pair(const xu8* in, xu32 stripes, const xu8* secret, xu32 at, xu32 p, xu64* a0, xu64* a1) {
    for (xu32 s = 0; s < stripes; s++) {
        const xu8* data = in + (xu64)s * XXH_STRIPE + 16 * p;
        const xu64 d0 = xxh_read64(data), d1 = xxh_read64(data + 8);
        const xu64 k0 = d0 ^ xxh_read64(secret + at + 8 * s + 16 * p);
        const xu64 k1 = d1 ^ xxh_read64(secret + at + 8 * s + 16 * p + 8);
        *a0 += d1 + xxh_mul32to64(k0, k0 >> 32);
        *a1 += d0 + xxh_mul32to64(k1, k1 >> 32);
    }
}

// The per-block scramble of one lane, with that lane's key
// xxh_secret64(XXH_SCRAMBLE_AT + 8 * lane).
XXH_FN xu64 xxh3_scramble(xu64 acc, xu64 key) {
    acc ^= acc >> 47;
    acc ^= key;
    return acc * XXH_P32_1;
}

// Pass 1: S_k of the whole block at `block` for lanes 2p and 2p + 1, stored
// in row `row` of the term table (8 u64 per block, lane order).
XXH_FN void xxh3_block_terms(const xu8* block, xu32 p, const xu8* secret, xu64* row) {
    xu64 t0 = 0, t1 = 0;
    xxh3_stripes_pair(block, XXH_STRIPES_PER_BLOCK, secret, 0, p, &t0, &t1);
    row[2 * p] = t0;
    row[2 * p + 1] = t1;
}

#define XXH_FOLD_AHEAD 32  // term loads issued ahead of the fold, into registers
#define XXH_FOLD_L2_AHEAD 256  // term rows asked of L2 ahead of those loads

// Pass 2: lane `lane`'s accumulator after the `blocks` whole blocks whose
// terms are rows 0 .. blocks - 1 of `terms`. The loads do not depend on the
// accumulator, so the next XXH_FOLD_AHEAD are in flight while these fold;
// a group of steps is shorter than a load from memory, so the rows further
// ahead are asked of L2 first (a prefetch holds no register). The key is
// read once, outside the dependency chain.
XXH_FN xu64 xxh3_fold_lane(const xu64* terms, xu64 blocks, xu32 lane) {
    const xu64 key = xxh_secret64(XXH_SCRAMBLE_AT + 8 * lane);
    const xu64 whole = blocks - blocks % XXH_FOLD_AHEAD;
    xu64 acc = xxh3_initial_acc(lane);
    xu64 cur[XXH_FOLD_AHEAD];
#if defined(__CUDACC__)
    for (xu64 b = lane; b < XXH_FOLD_L2_AHEAD && b < whole; b += 8) {
        asm volatile("prefetch.global.L2 [%0];" ::"l"(terms + 8 * b));
    }
#endif
    for (xu32 j = 0; j < XXH_FOLD_AHEAD; j++) cur[j] = j < whole ? terms[8 * (xu64)j + lane] : 0;
    for (xu64 k = 0; k < whole; k += XXH_FOLD_AHEAD) {
#if defined(__CUDACC__)
        for (xu32 j = lane; j < XXH_FOLD_AHEAD; j += 8) {  // the eight lanes share a group's rows
            const xu64 b = k + XXH_FOLD_L2_AHEAD + j;
            if (b < whole) asm volatile("prefetch.global.L2 [%0];" ::"l"(terms + 8 * b));
        }
#endif
        xu64 next[XXH_FOLD_AHEAD];
        for (xu32 j = 0; j < XXH_FOLD_AHEAD; j++) {
            const xu64 b = k + XXH_FOLD_AHEAD + j;
            next[j] = b < whole ? terms[8 * b + lane] : 0;
        }
        for (xu32 j = 0; j < XXH_FOLD_AHEAD; j++) acc = xxh3_scramble(acc + cur[j], key);
        for (xu32 j = 0; j < XXH_FOLD_AHEAD; j++) cur[j] = next[j];
    }
    for (xu64 k = whole; k < blocks; k++) acc = xxh3_scramble(acc + terms[8 * k + lane], key);
    return acc;
}

// Whole blocks of a long input (every one is scrambled).
XXH_FN xu64 xxh3_full_blocks(xu64 len) { return (len - 1) / XXH_BLOCK; }

// After the whole blocks: the last partial block and the last stripe, added
// to lanes 2p and 2p + 1; then their two terms of the final merge.
XXH_FN void xxh3_finish_pair(const xu8* in, xu64 len, xu32 p, xu64 a0, xu64 a1, xu64* lo_term, xu64* hi_term) {
    const xu64 blocks = xxh3_full_blocks(len);
    const xu32 stripes = (xu32)(((len - 1) - XXH_BLOCK * blocks) / XXH_STRIPE);
    xxh3_stripes_pair(in + blocks * XXH_BLOCK, stripes, XXH3_SECRET, 0, p, &a0, &a1);
    xxh3_stripes_pair(in + len - XXH_STRIPE, 1, XXH3_SECRET, XXH_LAST_STRIPE_AT, p, &a0, &a1);
    *lo_term = xxh_fold64(a0 ^ xxh_secret64(XXH_MERGE_LO_AT + 16 * p), a1 ^ xxh_secret64(XXH_MERGE_LO_AT + 16 * p + 8));
    *hi_term = xxh_fold64(a0 ^ xxh_secret64(XXH_MERGE_HI_AT + 16 * p), a1 ^ xxh_secret64(XXH_MERGE_HI_AT + 16 * p + 8));
}

// The digest from the sums of the four pairs' merge terms.
XXH_FN void xxh3_merge(xu64 len, xu64 lo_terms, xu64 hi_terms, xu64* out_lo, xu64* out_hi) {
    *out_lo = xxh3_avalanche(len * XXH_P64_1 + lo_terms);
    *out_hi = xxh3_avalanche(~(len * XXH_P64_2) + hi_terms);
}

#if !defined(__CUDACC__)
#include <stdlib.h>

// The host form, serial but built from the same pieces as the kernels (pass
// 1 for every block and lane pair into a term table, pass 2 per lane, then
// the finish and merge): the XXH3-128 of `len` bytes as (low, high) halves.
static void xxh3_128_host(const xu8* in, xu64 len, xu64* out_lo, xu64* out_hi) {
    if (len <= XXH_MID_SIZE_MAX) {
        xxh3_128_short(in, len, out_lo, out_hi);
        return;
    }
    const xu64 blocks = xxh3_full_blocks(len);
    xu64* terms = (xu64*)malloc(sizeof(xu64) * 8 * (blocks + 1));
    if (!terms) abort();
    for (xu64 k = 0; k < blocks; k++) {
        for (xu32 p = 0; p < 4; p++) xxh3_block_terms(in + k * XXH_BLOCK, p, XXH3_SECRET, terms + 8 * k);
    }
    xu64 acc[8];
    for (xu32 lane = 0; lane < 8; lane++) acc[lane] = xxh3_fold_lane(terms, blocks, lane);
    free(terms);
    xu64 lo_terms = 0, hi_terms = 0;
    for (xu32 p = 0; p < 4; p++) {
        xu64 lo_term, hi_term;
        xxh3_finish_pair(in, len, p, acc[2 * p], acc[2 * p + 1], &lo_term, &hi_term);
        lo_terms += lo_term;
        hi_terms += hi_term;
    }
    xxh3_merge(len, lo_terms, hi_terms, out_lo, out_hi);
}
#else

#define TERM_THREADS 256  // leaf_terms: four threads per block of input
#define FOLD_THREADS 64   // leaf_fold: eight threads per range
#define XXH_SECRET_WORDS 24  // 192 bytes

// One range to hash: `len` bytes at device address `ptr`; its whole blocks'
// terms are rows `terms`, `terms + 1`, ... of the term table.
struct LeafDesc {
    xu64 ptr;
    xu64 len;
    xu64 terms;
    xu64 flags;  // LEAF_TERMS_GIVEN or 0
};
// The apply kernel that rebuilt the range wrote its term rows (tpde_apply.cu,
// tile_leaf_terms): pass 1 leaves them alone.
#define LEAF_TERMS_GIVEN 1ull
// The byte layout that kernels.rs writes (LeafBatch::write_table).
static_assert(sizeof(LeafDesc) == 32, "LeafDesc is 32 bytes (kernels.rs: LEAF_DESC_BYTES)");
#if defined(__CUDACC_VER_MAJOR__) && (__CUDACC_VER_MAJOR__ * 100 + __CUDACC_VER_MINOR__ >= 1305)
static_assert(__builtin_offsetof(LeafDesc, ptr) == 0, "LeafDesc.ptr");
static_assert(__builtin_offsetof(LeafDesc, len) == 8, "LeafDesc.len");
static_assert(__builtin_offsetof(LeafDesc, terms) == 16, "LeafDesc.terms");
static_assert(__builtin_offsetof(LeafDesc, flags) == 24, "LeafDesc.flags");
#elif defined(REQUIRE_LAYOUT_CHECKS)
#error "the LeafDesc offsets need __builtin_offsetof (NVRTC 13.5 or later)"
#endif

// Pass 1 over `blocks` whole blocks, numbered across all `n` ranges by their
// term rows: four threads per block. d[].terms ascends (ranges of no whole
// block share the next range's row), so a block's range is the last one
// whose first row is at or before it.
// A 16-byte aligned pair of words, loaded in one instruction.
struct alignas(16) xu64x2 {
    xu64 lo, hi;
};

// xxh3_block_terms for a block at a 16-byte boundary (every block of a
// rebuilt chunk): the 16 stripes' words are all loaded before any is used,
// so a thread keeps 256 bytes in flight instead of 16.
__device__ __forceinline__ void xxh3_block_terms_aligned(const xu8* block, xu32 p, const xu8* secret, xu64* row) {
    const xu64x2* src = (const xu64x2*)(block + 16 * p);
    xu64x2 w[XXH_STRIPES_PER_BLOCK];
#pragma unroll
    for (int s = 0; s < XXH_STRIPES_PER_BLOCK; s++) w[s] = src[4 * s];  // a stripe is 4 pairs
    xu64 t0 = 0, t1 = 0;
#pragma unroll
    for (int s = 0; s < XXH_STRIPES_PER_BLOCK; s++) {
        const xu64 k0 = w[s].lo ^ *(const xu64*)(secret + 8 * s + 16 * p);
        const xu64 k1 = w[s].hi ^ *(const xu64*)(secret + 8 * s + 16 * p + 8);
        t0 += w[s].hi + xxh_mul32to64(k0, k0 >> 32);
        t1 += w[s].lo + xxh_mul32to64(k1, k1 >> 32);
    }
    row[2 * p] = t0;
    row[2 * p + 1] = t1;
}

#if !defined(XXH3_DEVICE_FUNCTIONS_ONLY)
extern "C" __global__ void __launch_bounds__(TERM_THREADS)
leaf_terms(const LeafDesc* __restrict__ d, xu32 n, xu64 blocks, xu64* __restrict__ terms) {
    // The secret in shared memory: the four lane pairs of a warp read four
    // different words per stripe, which the constant cache would serialize.
    __shared__ xu64 secret[XXH_SECRET_WORDS];
    for (xu32 w = threadIdx.x; w < XXH_SECRET_WORDS; w += TERM_THREADS) secret[w] = xxh_secret64(8 * w);
    __syncthreads();
    const xu64 t = (xu64)blockIdx.x * TERM_THREADS + threadIdx.x;
    const xu64 row = t >> 2;
    const xu32 p = (xu32)(t & 3);
    if (row >= blocks) return;
    xu32 lo = 0, hi = n - 1;
    while (lo < hi) {
        const xu32 mid = lo + (hi - lo + 1) / 2;
        if (d[mid].terms <= row) lo = mid; else hi = mid - 1;
    }
    if (d[lo].flags & LEAF_TERMS_GIVEN) return;
    const xu8* block = (const xu8*)d[lo].ptr + (row - d[lo].terms) * XXH_BLOCK;
    if (((unsigned long long)block & 15ull) == 0) {
        xxh3_block_terms_aligned(block, p, (const xu8*)secret, terms + 8 * row);
    } else {
        xxh3_block_terms(block, p, (const xu8*)secret, terms + 8 * row);
    }
}

// Pass 2: eight threads per range; out[2i], out[2i + 1] get the low and high
// halves of range i's XXH3-128.
extern "C" __global__ void __launch_bounds__(FOLD_THREADS)
leaf_fold(const LeafDesc* __restrict__ d, xu32 n, const xu64* __restrict__ terms, xu64* __restrict__ out) {
    const xu64 t = (xu64)blockIdx.x * FOLD_THREADS + threadIdx.x;
    const xu64 i = t >> 3;
    const xu32 lane = (xu32)(t & 7);
    if (i >= n) return;  // uniform per group of eight
    const xu8* in = (const xu8*)d[i].ptr;
    const xu64 len = d[i].len;
    if (len <= XXH_MID_SIZE_MAX) {
        if (lane == 0) xxh3_128_short(in, len, &out[2 * i], &out[2 * i + 1]);
        return;
    }
    // the eight threads of this range, for the shuffles
    const unsigned group = 0xFFu << (threadIdx.x & 24);
    const xu64 acc = xxh3_fold_lane(terms + 8 * d[i].terms, xxh3_full_blocks(len), lane);
    const xu64 partner = __shfl_xor_sync(group, acc, 1, 8);
    xu64 lo_term = 0, hi_term = 0;
    if ((lane & 1) == 0) xxh3_finish_pair(in, len, lane >> 1, acc, partner, &lo_term, &hi_term);
    for (int m = 2; m < 8; m <<= 1) {
        lo_term += __shfl_xor_sync(group, lo_term, m, 8);
        hi_term += __shfl_xor_sync(group, hi_term, m, 8);
    }
    if (lane == 0) xxh3_merge(len, lo_term, hi_term, &out[2 * i], &out[2 * i + 1]);
}
#endif  // XXH3_DEVICE_FUNCTIONS_ONLY
#endif
