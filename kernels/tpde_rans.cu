// tpde lane rANS decoding (spec/FORMAT.md §8.7, codec 2, and §8.9, codec 4:
// the same with a packed context map and packed tables), on the device.
//
// Compiled at run time through NVRTC, so this file includes no headers. The
// host side (crates/tpde-cuda/src/kernels.rs and rans.rs) mirrors every
// constant and the RansDesc layout below: the static_asserts after RansDesc
// pin its layout, and a host test reads them back and compares them with the
// Rust side.
//
// A launch covers a table of stream descriptors (RansDesc). The host reads
// and checks only the 4 fixed header bytes of each stream (prob_bits,
// context, table_count, tile_log2) to size the launches and the scratch;
// everything else is parsed and checked here, from the stored bytes that
// were copied to the device as they are:
//
//   rans_parse   one block per stream: checks the header (§8.7, "Header
//                checks", in layout order; §8.9, "Checks", for the packed
//                forms), turns its tables into sorted (symbol, frequency,
//                cum) entries and its tile lengths into payload offsets, in
//                the stream's scratch; then marks the scratch valid. Both
//                table forms give the same entries, so everything after the
//                parse is shared.
//   rans_decode  a block takes a run of tiles of one stream: its threads
//                read the context map (either form) from the stored bytes
//                and spread the stream's tables over 2^prob_bits slots each
//                in shared memory, then each of its warps (1 to 8, chosen by
//                the host per launch) decodes one tile at a time,
//                one rANS state per lane; a step's renormalisation words go
//                to the lanes that need one in increasing lane order (ballot
//                and prefix count), as §8.7 reads them. A step is a chain of
//                dependent operations on the states, so nothing it waits for
//                may come from device memory: the tile's words arrive through
//                a shared-memory ring filled a half ahead, and context words
//                are loaded a segment of 16 steps ahead.
//
// A stream whose context is the plane above (2) is decoded by a later launch
// than that plane; one whose context is the base key (1) reads the base words
// of its chunk, at its positions for a sparse chunk (u32, materialized before
// by the `positions` kernel of tpde_apply.cu). The host orders the launches.
//
// Faults raise bits in flag[0] (ERR_RANS_HEADER, ERR_RANS_DECODE) and record
// the lowest job (chunk) index that showed each, in flag[1] (header) and
// flag[2] (decode), so the host names the chunk. A stream whose header is
// faulty is not decoded; no kernel reads or writes outside its descriptor's
// ranges, whatever the stored bytes say.

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

// A host build (crates/tpde-cuda/tests/rans_host.rs) runs these kernels on
// CPU threads: it defines the CUDA built-ins used here, DYNAMIC_SHARED_U32,
// dynamic_smem_bytes and the shared-address helpers below.
#if defined(__CUDACC__)
#define DYNAMIC_SHARED_U32(name) extern __shared__ u32 name[]
__device__ __forceinline__ u32 dynamic_smem_bytes() {
    u32 bytes;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(bytes));
    return bytes;
}
// A shared-memory address, and loads from one. The decoder reads a table
// slot at table start + 4 * slot, and its word at the lane's place in the
// ring + the step's position, each computed as written: left to the
// compiler, those sums are re-associated into more operations a step.
typedef u32 SharedAddr;
__device__ __forceinline__ SharedAddr shared_addr(const void* p) {
    u64 a;
    asm("cvta.to.shared.u64 %0, %1;" : "=l"(a) : "l"(p));
    return (u32)a;
}
__device__ __forceinline__ u32 load_shared_u32(SharedAddr a) {
    u32 v;
    asm volatile("ld.shared.u32 %0, [%1];" : "=r"(v) : "r"(a));
    return v;
}
// The little-endian u16 at a, which is even.
__device__ __forceinline__ u32 load_shared_u16(SharedAddr a) {
    u16 v;
    asm volatile("ld.shared.u16 %0, [%1];" : "=h"(v) : "r"(a));
    return v;
}
// Asks for the line at p in L2, with no register to wait on.
__device__ __forceinline__ void prefetch_l2(const void* p) { asm volatile("prefetch.L2 [%0];" ::"l"(p)); }
#endif

#define RANS_THREADS 256
#define RANS_WARPS (RANS_THREADS / 32)
#define RANS_L 65536u              // lower bound of a normalised state, 2^16
#define RANS_MAX_PROB_BITS 11
#define RANS_MAX_TABLES 8
#define RANS_MIN_TILE_LOG2 8
#define RANS_MAX_TILE_LOG2 24
// How a stream lists its context map and tables (RansDesc.table_form):
// codec 2's bytes (Table 8.7) or codec 4's packed bits (§8.9, Table 8.8).
#define RANS_FORM_BYTES 0u
#define RANS_FORM_PACKED 1u
#define RANS_MAX_ORDER 11       // of a packed table's Exp-Golomb codes
#define RANS_MAX_CODE_BITS 12   // n_i + g of a code value of at most 2^12
// Bytes of a valid packed table's bit string at most (§8.9, "Checks"), and
// of the whole table: count, bitmap, order, bit string.
#define RANS_PACKED_BITS_MAX 386
#define RANS_PACKED_TABLE_MAX (1 + 32 + 1 + RANS_PACKED_BITS_MAX)
// The longest valid header before the tile lengths, in either form: fixed
// bytes, context map and eight tables of 256 symbols, with two-byte
// frequencies (codec 2, the longer) or the longest bit strings (codec 4). A
// header that runs past it is invalid, and its parse stops at its end.
#define RANS_HEADER_MAX_BYTES (4 + 256 + RANS_MAX_TABLES * (1 + 32 + 2 * 256))
#define RANS_HEADER_MAX_PACKED (4 + 32 * 3 + RANS_MAX_TABLES * RANS_PACKED_TABLE_MAX)
#define RANS_HEADER_MAX \
    (RANS_HEADER_MAX_BYTES > RANS_HEADER_MAX_PACKED ? RANS_HEADER_MAX_BYTES : RANS_HEADER_MAX_PACKED)
// Scratch of a stream, in u32 words: a header of RANS_SCRATCH_HEAD words,
// RANS_TABLE_STRIDE entries per table, then tiles + 1 payload offsets.
#define RANS_SCRATCH_HEAD 16
#define RANS_TABLE_STRIDE 256
#define RANS_SCRATCH_VALID 0x52414E53u  // scratch word 0 once the header checked out

#define CTX_NONE 0u
#define CTX_BASE_KEY 1u
#define CTX_HIGHER_PLANE 2u

#define ERR_BAD_DESCRIPTOR 16u
#define ERR_RANS_HEADER 32u
#define ERR_RANS_DECODE 64u

// One stream to decode. Addresses are device addresses checked by the host
// against live buffers; lengths are the stream record's.
struct RansDesc {
    u64 stored;         // the stored bytes (stored_len)
    u64 decoded;        // the output (decoded_len bytes)
    u64 context;        // context 2: the decoded plane above (decoded_len bytes);
                        // context 1: the chunk's base words (base_words words); else 0
    u64 positions;      // context 1 in a sparse chunk: decoded_len u32 positions; else 0
    u64 scratch;        // parse results (rans_scratch_words u32)
    u32 stored_len;
    u32 decoded_len;    // N
    u32 base_words;     // context 1: words readable at `context`; words past them are 0
    u32 word_bytes;     // context 1: 1, 2, 4 or 8
    u32 allowed;        // bit c set: context c is allowed in this stream (§8.7)
    u32 prob_bits;      // the four fixed header bytes, as the host read them
    u32 ctx_kind;
    u32 table_count;
    u32 tile_log2;
    u32 tiles;          // ceil(N / 2^tile_log2)
    u32 block_begin;    // first block of this stream in a rans_decode grid
    u32 tiles_per_block;
    u32 job;            // the chunk's index in the host's job list (fault reports)
    u32 table_form;     // RANS_FORM_BYTES (codec 2) or RANS_FORM_PACKED (codec 4)
};

// The byte layout that rans.rs writes (RansDesc::write_to). The host test
// `rans_desc_layout_matches_the_kernel_source` parses these lines; as in
// tpde_apply.cu, the offsets need __builtin_offsetof (NVRTC 13.5), and the
// CI's compile defines REQUIRE_LAYOUT_CHECKS so that they are never skipped.
static_assert(sizeof(RansDesc) == 96, "RansDesc is 96 bytes");
#if defined(__CUDACC_VER_MAJOR__) && (__CUDACC_VER_MAJOR__ * 100 + __CUDACC_VER_MINOR__ >= 1305)
#define OFFSET_OF(T, f) __builtin_offsetof(T, f)
static_assert(OFFSET_OF(RansDesc, stored) == 0, "RansDesc.stored");
static_assert(OFFSET_OF(RansDesc, decoded) == 8, "RansDesc.decoded");
static_assert(OFFSET_OF(RansDesc, context) == 16, "RansDesc.context");
static_assert(OFFSET_OF(RansDesc, positions) == 24, "RansDesc.positions");
static_assert(OFFSET_OF(RansDesc, scratch) == 32, "RansDesc.scratch");
static_assert(OFFSET_OF(RansDesc, stored_len) == 40, "RansDesc.stored_len");
static_assert(OFFSET_OF(RansDesc, decoded_len) == 44, "RansDesc.decoded_len");
static_assert(OFFSET_OF(RansDesc, base_words) == 48, "RansDesc.base_words");
static_assert(OFFSET_OF(RansDesc, word_bytes) == 52, "RansDesc.word_bytes");
static_assert(OFFSET_OF(RansDesc, allowed) == 56, "RansDesc.allowed");
static_assert(OFFSET_OF(RansDesc, prob_bits) == 60, "RansDesc.prob_bits");
static_assert(OFFSET_OF(RansDesc, ctx_kind) == 64, "RansDesc.ctx_kind");
static_assert(OFFSET_OF(RansDesc, table_count) == 68, "RansDesc.table_count");
static_assert(OFFSET_OF(RansDesc, tile_log2) == 72, "RansDesc.tile_log2");
static_assert(OFFSET_OF(RansDesc, tiles) == 76, "RansDesc.tiles");
static_assert(OFFSET_OF(RansDesc, block_begin) == 80, "RansDesc.block_begin");
static_assert(OFFSET_OF(RansDesc, tiles_per_block) == 84, "RansDesc.tiles_per_block");
static_assert(OFFSET_OF(RansDesc, job) == 88, "RansDesc.job");
static_assert(OFFSET_OF(RansDesc, table_form) == 92, "RansDesc.table_form");
#elif defined(REQUIRE_LAYOUT_CHECKS)
#error "this NVRTC cannot check the RansDesc offsets (no __builtin_offsetof)"
#endif
static_assert(sizeof(u64) == 8 && sizeof(u32) == 4 && sizeof(u16) == 2, "integer widths");
static_assert(RANS_HEADER_MAX % 4 == 0, "the header buffer is loaded in words");
// rans_parse reads a packed table's bit string in one pass of 8 bytes a thread.
#define RANS_PACKED_WINDOW (8 * RANS_THREADS)
static_assert(RANS_PACKED_WINDOW >= RANS_PACKED_BITS_MAX, "a valid bit string lies within one pass");

// u32 words of a stream's scratch (the host computes the same).
__device__ __forceinline__ u64 rans_scratch_words(u32 table_count, u32 tiles) {
    return RANS_SCRATCH_HEAD + (u64)table_count * RANS_TABLE_STRIDE + (u64)tiles + 1;
}

// Symbols of tile t of a stream of n symbols.
__device__ __forceinline__ u32 tile_symbols(u64 n, u32 tile_log2, u64 t) {
    const u64 lo = t << tile_log2;
    const u64 left = n - lo;
    const u64 full = 1ull << tile_log2;
    return (u32)(left < full ? left : full);
}

// Records a fault of stream `c`: its bit, and the lowest chunk index that
// showed that kind of fault (flag[1] for headers, flag[2] for decoding).
__device__ __forceinline__ void rans_fault(u32* flag, u32 bit, u32 job) {
    atomicOr(flag, bit);
    atomicMin(flag + (bit == ERR_RANS_HEADER ? 1 : 2), job);
}

// ---------------------------------------------------------------------------
// Block-wide scans (256 threads). All threads must call them.

__device__ __forceinline__ u64 scan_u64(u64 x, u64* ws, u64* total) {
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    u64 inc = x;
#pragma unroll
    for (u32 o = 1; o < 32; o <<= 1) {
        const u64 y = __shfl_up_sync(0xffffffffu, inc, o);
        if (lane >= o) inc += y;
    }
    if (lane == 31) ws[warp] = inc;
    __syncthreads();
    if (warp == 0) {
        u64 s = lane < RANS_WARPS ? ws[lane] : 0;
#pragma unroll
        for (u32 o = 1; o < RANS_WARPS; o <<= 1) {
            const u64 y = __shfl_up_sync(0xffffffffu, s, o);
            if (lane >= o) s += y;
        }
        if (lane < RANS_WARPS) ws[lane] = s;
    }
    __syncthreads();
    const u64 prefix = warp > 0 ? ws[warp - 1] : 0;
    *total = ws[RANS_WARPS - 1];
    __syncthreads();
    return prefix + inc - x;
}

// A function {0,1} -> {0,1} as two bits: bit s is its value at s.
#define FN_IDENTITY 2u
__device__ __forceinline__ u32 fn_at(u32 f, u32 s) { return (f >> s) & 1u; }
// `later` applied after `earlier`.
__device__ __forceinline__ u32 fn_then(u32 earlier, u32 later) {
    return fn_at(later, fn_at(earlier, 0)) | (fn_at(later, fn_at(earlier, 1)) << 1);
}

// Exclusive scan of functions under composition: thread t gets
// f_{t-1} o ... o f_0 (the identity for thread 0).
__device__ __forceinline__ u32 scan_fn(u32 f, u32* ws) {
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    u32 inc = f;
#pragma unroll
    for (u32 o = 1; o < 32; o <<= 1) {
        const u32 y = __shfl_up_sync(0xffffffffu, inc, o);
        if (lane >= o) inc = fn_then(y, inc);
    }
    if (lane == 31) ws[warp] = inc;
    __syncthreads();
    if (warp == 0) {
        u32 s = lane < RANS_WARPS ? ws[lane] : FN_IDENTITY;
#pragma unroll
        for (u32 o = 1; o < RANS_WARPS; o <<= 1) {
            const u32 y = __shfl_up_sync(0xffffffffu, s, o);
            if (lane >= o) s = fn_then(y, s);
        }
        if (lane < RANS_WARPS) ws[lane] = s;
    }
    __syncthreads();
    u32 ex = __shfl_up_sync(0xffffffffu, inc, 1);
    if (lane == 0) ex = FN_IDENTITY;
    const u32 prefix = warp > 0 ? ws[warp - 1] : FN_IDENTITY;
    __syncthreads();
    return fn_then(prefix, ex);
}

__device__ __forceinline__ u32 load_u32_le(const u8* p) {
    return (u32)p[0] | ((u32)p[1] << 8) | ((u32)p[2] << 16) | ((u32)p[3] << 24);
}

// `count` bits (at most 24) of the bit string at `p` from its bit `bit`, as
// an unsigned integer, least significant bit first (§8.9, "Bit strings");
// reads only the bytes that hold them.
__device__ __forceinline__ u32 bits_at(const u8* p, u32 bit, u32 count) {
    if (count == 0) return 0;
    const u32 first = bit >> 3, last = (bit + count - 1) >> 3;
    u32 v = 0;
    for (u32 b = first; b <= last; b++) v |= (u32)p[b] << (8 * (b - first));
    return (v >> (bit & 7)) & ((1u << count) - 1u);
}

// Bits per entry of the context map of `tc` tables: ceil(log2 tc) when it
// is packed (§8.9), 0 for codec 2's map of a byte per entry.
__device__ __forceinline__ u32 map_entry_bits(u32 table_form, u32 tc) {
    if (table_form != RANS_FORM_PACKED) return 0;
    return tc <= 2 ? 1u : tc <= 4 ? 2u : 3u;
}

// Bytes of the context map (of more than one table).
__device__ __forceinline__ u32 map_bytes(u32 entry_bits) { return entry_bits ? 32 * entry_bits : 256; }

// The table of context byte x in the context map at `map`.
__device__ __forceinline__ u32 map_entry(const u8* map, u32 entry_bits, u32 x) {
    return entry_bits ? bits_at(map, entry_bits * x, entry_bits) : (u32)map[x];
}

// ---------------------------------------------------------------------------
// rans_parse: one block per stream.

struct ParseShared {
    u8 head[RANS_HEADER_MAX];  // the stream's first bytes (up to its length)
    u32 sym[256];              // symbols of the table being parsed, in order
    u32 freq[256];             // their frequencies
    u16 zero_at[256];          // packed table: bit of the i-th zero of the prefixes
    u64 ws[RANS_WARPS];
    u32 wf[RANS_WARPS];
    u32 at;                    // parse cursor
    u32 bad;
};
// Static shared memory is at most 48 KiB a block; the parse keeps well inside.
static_assert(sizeof(ParseShared) <= 16 * 1024, "rans_parse's shared memory stays small");

// The frequencies of a table of codec 2 (Table 8.7) at byte p into sh.freq;
// moves the cursor past them. Ends with a barrier.
__device__ void parse_byte_frequencies(ParseShared& sh, u32 avail, u32 p, u32 s, u32 prob_bits) {
    const u32 tid = threadIdx.x;
    // s tokens of one byte (< 0x80) or two (0x80 | f >> 8, f & 0xFF). Byte
    // b + 1 starts a token iff byte b does not, or byte b starts a one-byte
    // token: a function of "b starts a token", composed over the 2s bytes
    // (two per thread) by a scan.
    const u32 b0 = p + 2 * tid, b1 = b0 + 1;
    const u32 lo0 = b0 < avail ? (u32)(sh.head[b0] < 0x80) : 1u;
    const u32 lo1 = b1 < avail ? (u32)(sh.head[b1] < 0x80) : 1u;
    const u32 g0 = 1u | (lo0 << 1), g1 = 1u | (lo1 << 1);  // next(0) = 1, next(1) = lo
    const u32 before = scan_fn(fn_then(g0, g1), sh.wf);
    const u32 lead0 = fn_at(before, 1);  // byte p starts a token
    const u32 lead1 = fn_at(g0, lead0);
    u64 total;
    const u64 rank0 = scan_u64(lead0 + lead1, sh.ws, &total);
    const u32 ranks[2] = {(u32)rank0, (u32)rank0 + lead0};
    const u32 leads[2] = {lead0, lead1};
    const u32 bytes[2] = {b0, b1};
#pragma unroll
    for (int q = 0; q < 2; q++) {
        const u32 j = ranks[q];
        if (!leads[q] || j >= s) continue;
        const u32 b = bytes[q];
        const u32 one = q == 0 ? lo0 : lo1;
        const u32 size = one ? 1u : 2u;
        if (b + size > avail) {
            sh.bad = 1;  // fewer bytes than the field needs
            continue;
        }
        const u32 f = one ? (u32)sh.head[b] : (((u32)sh.head[b] & 0x7Fu) << 8) | sh.head[b + 1];
        // a zero frequency, a two-byte form below 128, or above 2^k (the sum
        // would exceed 2^k anyway; checked here so that it packs)
        if (f == 0 || (!one && f < 128) || f > (1u << prob_bits)) sh.bad = 1;
        sh.freq[j] = f;
        if (j == s - 1) sh.at = b + size;
    }
    __syncthreads();
}

// The frequencies of a packed table (§8.9, Table 8.8) into sh.freq: the
// Exp-Golomb order g at byte p, then the bit string of s prefixes (n_i
// one-bits and a zero-bit) and s suffixes (n_i + g bits each); moves the
// cursor past its padding. Ends with a barrier.
//
// The codes are located from the prefixes' zero bits alone: each thread
// counts the zeros of 64 bits of the string, a scan numbers them, and the
// i-th zero's bit is recorded. Then n_i is the gap between zeros i - 1 and
// i, and suffix i starts after zero s - 1 plus the suffixes before it,
// n_j + g bits each, the n_j summing to the ones before prefix i. A scan of
// the signed differences then gives the frequencies. A valid bit string
// (at most RANS_PACKED_BITS_MAX bytes) lies within the bytes that one pass
// of the threads covers; what does not is invalid.
__device__ void parse_packed_frequencies(ParseShared& sh, u32 avail, u32 p, u32 s, u32 prob_bits) {
    const u32 tid = threadIdx.x;
    const u32 g = p < avail ? (u32)sh.head[p] : RANS_MAX_ORDER + 1;
    if (g > RANS_MAX_ORDER) {  // uniform: the byte is missing or out of range
        if (tid == 0) sh.bad = 1;
        __syncthreads();
        return;
    }
    const u32 start = p + 1;  // <= avail
    const u32 window = avail - start < RANS_PACKED_WINDOW ? avail - start : RANS_PACKED_WINDOW;
    const u8* bits = sh.head + start;
    u64 word = 0, real = 0;  // this thread's bits of the window, and which are there
    for (u32 q = 0; q < 8; q++) {
        const u32 at = 8 * tid + q;
        if (at < window) {
            word |= (u64)bits[at] << (8 * q);
            real |= 0xFFull << (8 * q);
        }
    }
    const u64 zeros = ~word & real;
    const u32 count = (u32)__popc((u32)zeros) + (u32)__popc((u32)(zeros >> 32));
    u64 total;
    const u64 rank0 = scan_u64(count, sh.ws, &total);
    if (total < s) {  // uniform: the prefixes run past the bytes (or are too long)
        if (tid == 0) sh.bad = 1;
        __syncthreads();
        return;
    }
    u64 rank = rank0;
    for (u32 b = 0; b < 64 && rank < s; b++) {
        if ((zeros >> b) & 1) sh.zero_at[rank++] = (u16)(64 * tid + b);
    }
    __syncthreads();
    const u32 suffixes = (u32)sh.zero_at[s - 1] + 1;  // the bit after the last prefix
    // the prefixes took sum(n_i) + s bits; the suffixes take sum(n_i) + s * g
    const u32 end = suffixes + (suffixes - s) + s * g;
    if (end > 8 * window) {  // uniform: the suffixes run past the bytes
        if (tid == 0) sh.bad = 1;
        __syncthreads();
        return;
    }
    long long d = 0;  // f_i - f_(i-1)
    if (tid < s) {
        const u32 first = tid > 0 ? (u32)sh.zero_at[tid - 1] + 1 : 0u;  // prefix i's first bit
        const u32 n = (u32)sh.zero_at[tid] - first;
        // a longer code has a value of 2^13 or more: a frequency out of range
        if (n + g > RANS_MAX_CODE_BITS) {
            sh.bad = 1;
        } else {
            const u32 at = suffixes + (first - tid) + tid * g;  // first - tid ones before prefix i
            const u32 v = (1u << (n + g)) + bits_at(bits, at, n + g) - (1u << g);
            d = v & 1u ? -(long long)((v + 1) >> 1) : (long long)(v >> 1);
        }
    }
    if (tid == 0) {
        if ((end & 7) && (bits[end >> 3] >> (end & 7)) != 0) sh.bad = 1;  // nonzero padding
        sh.at = start + (end + 7) / 8;
    }
    u64 unused;
    const long long f = (long long)(scan_u64((u64)d, sh.ws, &unused) + (u64)d);  // two's complement sums
    if (tid < s) {
        if (f < 1 || f > (1ll << prob_bits)) sh.bad = 1;
        sh.freq[tid] = (u32)f;
    }
    __syncthreads();
}

// Parses table `t` at sh.at (§8.7, Table 8.7, or §8.9, Table 8.8 when
// `packed`) into scratch entries; moves the cursor past it. `avail` bytes of
// the header buffer are the stream's.
__device__ void parse_table(ParseShared& sh, u32 avail, u32 t, u32 prob_bits, bool packed, u32* scratch) {
    const u32 tid = threadIdx.x;
    const u32 p0 = sh.at;
    __syncthreads();
    if (p0 >= avail) {
        if (tid == 0) sh.bad = 1;
        __syncthreads();
        return;
    }
    const u32 s = (u32)sh.head[p0] + 1;
    u32 p = p0 + 1;
    // the symbol set
    if (packed && s == 256) {
        sh.sym[tid] = tid;  // every byte, listed by no byte
    } else if (s < 32) {
        if (p + s > avail) {
            if (tid == 0) sh.bad = 1;
        } else if (tid < s) {
            const u32 x = sh.head[p + tid];
            sh.sym[tid] = x;
            if (tid > 0 && sh.head[p + tid - 1] >= x) sh.bad = 1;  // strictly increasing
        }
        p += s;
    } else {
        u32 bit = 0;
        if (p + 32 <= avail) bit = (sh.head[p + (tid >> 3)] >> (tid & 7)) & 1u;
        u64 total;
        const u64 rank = scan_u64(bit, sh.ws, &total);
        if (p + 32 > avail || total != s) {
            if (tid == 0) sh.bad = 1;
        } else if (bit) {
            sh.sym[rank] = tid;
        }
        p += 32;
    }
    // `sh.bad` is read between two barriers, so that no thread reads it
    // after another set it (the packed parse may set it before its first)
    __syncthreads();
    bool bad = sh.bad;
    __syncthreads();
    if (bad) return;
    if (packed) {
        parse_packed_frequencies(sh, avail, p, s, prob_bits);
    } else {
        parse_byte_frequencies(sh, avail, p, s, prob_bits);
    }
    bad = sh.bad;  // both end with a barrier
    __syncthreads();
    if (bad) return;
    u64 total;
    const u32 f = tid < s ? sh.freq[tid] : 0;
    const u64 cum = scan_u64(f, sh.ws, &total);
    if (total != (1ull << prob_bits)) {
        if (tid == 0) sh.bad = 1;
    } else if (tid < s) {
        // symbol 8 bits, frequency 12 bits, cum 11 bits (cum < 2^k <= 2^11)
        scratch[RANS_SCRATCH_HEAD + t * RANS_TABLE_STRIDE + tid] = sh.sym[tid] | (f << 8) | ((u32)cum << 20);
    }
    if (tid == 0) scratch[4 + t] = s;
    __syncthreads();
}

extern "C" __global__ void __launch_bounds__(RANS_THREADS)
rans_parse(const RansDesc* d, u32 nd, u32* flag) {
    __shared__ ParseShared sh;
    if (blockIdx.x >= nd) return;
    const RansDesc c = d[blockIdx.x];
    const u32 tid = threadIdx.x;
    const u8* stored = (const u8*)c.stored;
    u32* scratch = (u32*)c.scratch;
    const u32 avail = c.stored_len < RANS_HEADER_MAX ? c.stored_len : RANS_HEADER_MAX;
    if (tid == 0) {
        scratch[0] = 0;  // invalid until every check passed
        sh.at = 4;
        sh.bad = 0;
    }
    for (u32 i = tid; i < avail; i += RANS_THREADS) sh.head[i] = stored[i];
    __syncthreads();
    // The descriptor must describe what the stored bytes say, and what the
    // scratch and shared memory were sized for.
    if (tid == 0) {
        const u32 n = c.decoded_len;
        const bool sane = c.prob_bits >= 1 && c.prob_bits <= RANS_MAX_PROB_BITS && c.table_count >= 1 &&
                          c.table_count <= RANS_MAX_TABLES && c.tile_log2 >= RANS_MIN_TILE_LOG2 &&
                          c.tile_log2 <= RANS_MAX_TILE_LOG2 && n > 0 &&
                          (u64)c.tiles == (((u64)n + (1ull << c.tile_log2) - 1) >> c.tile_log2) &&
                          c.table_form <= RANS_FORM_PACKED;
        if (!sane) {
            atomicOr(flag, ERR_BAD_DESCRIPTOR);
            sh.bad = 2;
        }
    }
    __syncthreads();
    if (sh.bad == 2) return;
    // §8.7 header checks, in layout order. The fixed bytes: the host read
    // them and refused what it could; these are the same checks.
    if (tid == 0) {
        if (avail < 4) {
            sh.bad = 1;
        } else {
            const u32 k = sh.head[0], ctx = sh.head[1], tc = sh.head[2], tl = sh.head[3];
            const bool ok = k >= 1 && k <= RANS_MAX_PROB_BITS && ctx <= CTX_HIGHER_PLANE &&
                            ((c.allowed >> ctx) & 1u) && (ctx == CTX_NONE ? tc == 1 : tc >= 2 && tc <= 8) &&
                            tl >= RANS_MIN_TILE_LOG2 && tl <= RANS_MAX_TILE_LOG2;
            const bool same = k == c.prob_bits && ctx == c.ctx_kind && tc == c.table_count && tl == c.tile_log2;
            if (!ok || !same) sh.bad = 1;
        }
    }
    __syncthreads();
    const u32 tc = c.table_count;
    // `sh.bad` is read into a register between two barriers wherever the
    // threads branch on it, so that none reads it after another set it.
    bool ok = !sh.bad;
    __syncthreads();
    // the context map: an entry per thread
    const u32 entry_bits = map_entry_bits(c.table_form, tc);
    if (ok && tc > 1) {
        const u32 len = map_bytes(entry_bits);
        if (avail < 4 + len) {
            if (tid == 0) sh.bad = 1;
        } else if (map_entry(sh.head + 4, entry_bits, tid) >= tc) {
            sh.bad = 1;
        }
        if (tid == 0) sh.at = 4 + len;
    }
    __syncthreads();
    const bool packed = c.table_form == RANS_FORM_PACKED;
    for (u32 t = 0; t < tc && !sh.bad; t++) parse_table(sh, avail, t, c.prob_bits, packed, scratch);
    __syncthreads();
    // the tile lengths, then the payloads back to back to the end
    const u64 lengths = sh.at;
    const u64 payload = lengths + 4ull * c.tiles;
    if (tid == 0 && payload > c.stored_len) sh.bad = 1;
    __syncthreads();
    ok = !sh.bad;
    __syncthreads();
    if (ok) {
        const u64 rest = c.stored_len - payload;
        u32* offsets = scratch + RANS_SCRATCH_HEAD + tc * RANS_TABLE_STRIDE;
        u64 carry = 0;
        for (u32 base = 0; base < c.tiles; base += RANS_THREADS) {
            const u32 t = base + tid;
            u64 len = 0;
            if (t < c.tiles) {
                len = load_u32_le(stored + lengths + 4ull * t);
                const u32 n_t = tile_symbols(c.decoded_len, c.tile_log2, t);
                const u64 states = 4ull * (n_t < 32 ? n_t : 32);
                if (len < states || ((len - states) & 1)) sh.bad = 1;  // a tile length of the wrong form
            }
            u64 total;
            const u64 ex = carry + scan_u64(len, sh.ws, &total);
            if (t < c.tiles) {
                if (ex + len > rest) sh.bad = 1;  // past the end of the stream
                else offsets[t] = (u32)ex;
            }
            carry += total;
        }
        __syncthreads();
        if (tid == 0) {
            if (carry != rest) sh.bad = 1;  // the lengths must account for every byte
            offsets[c.tiles] = (u32)rest;
            scratch[1] = (u32)payload;
        }
    }
    __syncthreads();
    if (tid == 0) {
        if (sh.bad) {
            rans_fault(flag, ERR_RANS_HEADER, c.job);
        } else {
            __threadfence();
            scratch[0] = RANS_SCRATCH_VALID;
        }
    }
}

// ---------------------------------------------------------------------------
// rans_decode: a run of tiles of one stream per block.

__device__ __forceinline__ u32 find_desc(const RansDesc* d, u32 nd, u32 block) {
    u32 lo = 0, hi = nd;  // last i with block_begin <= block
    while (hi - lo > 1) {
        const u32 mid = (lo + hi) >> 1;
        if (d[mid].block_begin <= block) lo = mid; else hi = mid;
    }
    return lo;
}

// What a read that must give 0 reads instead: the address is chosen, and
// the load always made, so that no instruction waits on the load to choose
// its value.
__device__ const u64 rans_zero = 0;

// Bytes of what a context reads per symbol: the byte of the plane above
// (context 2), or the base word (context 1).
template <u32 CTX, typename T>
__device__ __forceinline__ constexpr u32 context_size() {
    return CTX == CTX_HIGHER_PLANE ? 1u : (u32)sizeof(T);
}

// Where a context's read of word w begins: of a 64-bit word, its upper
// half, which holds the key (context_key).
template <u32 CTX, typename T>
__device__ __forceinline__ const u8* context_at(const u8* context, u64 w) {
    constexpr u32 size = context_size<CTX, T>();
    return context + size * w + (size == 8 ? 4 : 0);
}

// The 32 bits at a context's read (context_at), that context_key turns
// into the context byte.
template <u32 CTX, typename T>
__device__ __forceinline__ u32 context_read(const u8* at) {
    constexpr u32 size = context_size<CTX, T>();
    if (size == 1) return *at;
    if (size == 2) return *(const u16*)at;
    return *(const u32*)at;
}

// The context read of word w, or 0 where `valid` is false (a word past the
// base reads 0, §8.7): rans_zero is read instead.
template <u32 CTX, typename T>
__device__ __forceinline__ u32 context_raw(const u8* context, u64 w, bool valid) {
    return context_read<CTX, T>(valid ? context_at<CTX, T>(context, w) : (const u8*)&rans_zero);
}

// The context byte of what context_read read: the byte itself (context 2),
// or key(b) = top byte of rotl(b, 1) (§8.6), which for words of 16 bits or
// more is bits n - 9 to n - 2 of a word of n bits.
template <u32 CTX, typename T>
__device__ __forceinline__ u32 context_key(u32 raw) {
    if (CTX != CTX_BASE_KEY) return raw;
    if (sizeof(T) == 1) return ((raw << 1) | (raw >> 7)) & 0xFFu;
    if (sizeof(T) == 2) return (raw >> 7) & 0xFFu;
    return (raw >> 23) & 0xFFu;  // a 32-bit word, or the upper half of a 64-bit one
}

// A warp reads its tile's words through a ring of two halves in shared
// memory: while it reads half h, half h + 1 is already there and half h + 2
// is on its way from device memory, so that no step waits on a device load.
// Lane l reads its word of a step at 2l bytes past the step's position,
// and keeps that place itself; the ring is aligned to its size, so that a
// place's address is the ring's OR the place's low bits. A tile's words
// start at an even or an odd address; at an odd one the ring holds each
// byte one place later than device memory does, so that every word lies at
// an even place and a step reads it in one load.
#define RANS_RING_HALF 512u                   // bytes
#define RANS_RING_BYTES (2 * RANS_RING_HALF)  // a power of two
#define RANS_RING_WORDS (RANS_RING_BYTES / 8)  // u64 words of a ring
static_assert(RANS_WARPS * RANS_RING_WORDS * 2 >= RANS_MAX_TABLES * RANS_TABLE_STRIDE,
              "the rings hold every table entry while the tables are spread");

// 16 bytes of a stream, as two little-endian u64.
struct Bytes16 {
    u64 lo, hi;
};

// The 16 bytes at a (16-aligned); bytes outside the stream's stored bytes
// [lo, hi) read as 0 and are not loaded. Kept out of line (returning by
// value, in registers): only a tile's first and last halves take the byte
// path, and the decoding loop stays small enough for the instruction cache.
__device__ __noinline__ Bytes16 load16_edge(const u8* a, const u8* lo, const u8* hi) {
    u64 v[2] = {0, 0};
    for (u32 b = 0; b < 16; b++) {
        if (a + b >= lo && a + b < hi) v[b >> 3] |= (u64)a[b] << (8 * (b & 7));
    }
    return Bytes16{v[0], v[1]};
}

__device__ __forceinline__ Bytes16 load16(const u8* a, const u8* lo, const u8* hi) {
    if (a >= lo && a + 16 <= hi) return Bytes16{((const u64*)a)[0], ((const u64*)a)[1]};
    return load16_edge(a, lo, hi);
}

// The warp's 32 chunks of 16 bytes of one half, moved one byte later:
// lane l's chunk takes the last byte of lane l - 1's, and lane 0's the last
// byte of the half before (`carry`, which then becomes this half's).
__device__ __forceinline__ Bytes16 shift_one_byte(Bytes16 v, u32& carry) {
    const u32 lane = threadIdx.x & 31;
    const u32 last = (u32)(v.hi >> 56);
    const u32 below = __shfl_up_sync(0xffffffffu, last, 1);
    const u64 in = lane == 0 ? carry : below;
    carry = __shfl_sync(0xffffffffu, last, 31);
    return Bytes16{(v.lo << 8) | in, (v.hi << 8) | (v.lo >> 56)};
}

// Stores this lane's 16 bytes of half `which` (0 or 1) of a ring, one byte
// later where `shift` (uniform).
__device__ __forceinline__ void store16(u64* ring, u32 which, Bytes16 v, bool shift, u32& carry) {
    const u32 lane = threadIdx.x & 31;
    if (shift) v = shift_one_byte(v, carry);
    u64* half = ring + which * (RANS_RING_WORDS / 2);
    half[2 * lane] = v.lo;
    half[2 * lane + 1] = v.hi;
}

// The state of one warp decoding one tile. Places in the tile count from
// a0 (+ 1 in a shifted ring), so that a place in the ring is its low bits.
// A lane keeps the places of its own word: the warp's position + 2 * lane.
struct TileCursor {
    u32 x;             // this lane's rANS state
    u32 at;            // its word of the next step: skew + shift + bytes read (states, then words) + 2 * lane
    u32 end;           // the tile's end: skew + shift + its length + 2 * lane
    SharedAddr ring_at; // the warp's ring, aligned to RANS_RING_BYTES
    u64* ring;         // the warp's ring
    const u8* a0;      // the tile's payload start, rounded down to 16 bytes
    u32 half;          // the half that holds the warp's position
    Bytes16 next;      // this lane's 16 bytes of half h + 2
    u32 carry;         // shifted ring: the last byte of the half stored last
    bool shift;        // the ring holds each byte one place later (an odd skew)
};

// Steps between two checks of the ring. A step reads at most 64 bytes, so
// from a check on, RANS_REFILL_STEPS steps read within the two halves in
// the ring, and full steps need not check after each.
#define RANS_REFILL_STEPS 8
static_assert(RANS_REFILL_STEPS * 64 <= RANS_RING_HALF, "the steps between checks stay within two halves");

// Once the reads entered half h + 1, half h's place takes half h + 2 and
// half h + 3 goes on its way; loads stay within the stream's stored bytes.
__device__ __forceinline__ void refill(const RansDesc& c, TileCursor& cur) {
    const u32 lane = threadIdx.x & 31;
    if ((cur.at - 2 * lane) / RANS_RING_HALF != cur.half) {  // uniform
        __syncwarp();
        store16(cur.ring, cur.half & 1, cur.next, cur.shift, cur.carry);
        cur.half++;
        const u8* lo = (const u8*)c.stored;
        cur.next = load16(cur.a0 + (u64)(cur.half + 2) * RANS_RING_HALF + 16 * lane, lo, lo + c.stored_len);
        __syncwarp();
    }
}

// A spread table slot (rans_decode): frequency in bits 0-11, symbol in bits
// 12-19, slot - cum in bits 20-31, so that a step takes the frequency with
// one mask and the bias with one shift, both at once.
__device__ __forceinline__ u32 slot_entry(u32 symbol, u32 freq, u32 bias) {
    return freq | (symbol << 12) | (bias << 20);
}

// Lane l decodes symbol j of the tile from its context's table, which
// starts at `table`, and writes it to out[j]; then the lanes whose state
// fell below L take the step's words in lane order (§8.7). FULL: every lane
// has a symbol this step (all but a tile's last step). `check_ring`: the
// ring is checked after the step (a constant where the steps are unrolled).
template <bool FULL>
__device__ __forceinline__ void decode_step(const RansDesc& c, TileCursor& cur, SharedAddr table, u32 k, u32 j,
                                            u32 n_t, u8* out, bool check_ring) {
    const u32 lane = threadIdx.x & 31;
    const bool active = FULL || j < n_t;
    // Lane l reads the step's l-th word before the state is known; a lane
    // that needs one takes it with a shuffle.
    const u32 mine = load_shared_u16(cur.ring_at | (cur.at & (RANS_RING_BYTES - 1)));
    u32 x = cur.x;
    const u32 e = load_shared_u32(table + ((x & ((1u << k) - 1u)) << 2));
    if (active) {
        out[j] = (u8)(e >> 12);
        x = (e & 0xFFFu) * (x >> k) + (e >> 20);
    }
    const bool need = active && x < RANS_L;
    const u32 m = __ballot_sync(0xffffffffu, need);
    const u32 rank = __popc(m & ((1u << lane) - 1u));  // words taken by lower lanes this step
    const u32 word = __shfl_sync(0xffffffffu, mine, rank);
    // A truncated tile (a word at or past its end) is not checked here: its
    // reads run on past the end, within the stream's bytes, and end past it,
    // which the tile's last check refuses.
    cur.x = need ? x * RANS_L + word : x;  // (x << 16) | word, in one multiply-add
    cur.at += 2 * __popc(m);
    if (check_ring) refill(c, cur);
}

// Steps of a segment. A step's context is read a segment ahead of its
// decoding, so that those reads (base words, or the plane above, in device
// memory) take a segment of decoding to arrive instead of stalling a step;
// a sparse chunk's positions, which the base word reads depend on, are read
// a segment earlier still. Each step reads the context of the same step of
// the next segment, so that this work spreads evenly between the steps'
// dependent operations, and finds the next step's table, so that the table
// lookup stays off the chain of states.
#define RANS_SEGMENT 16
static_assert(RANS_SEGMENT % RANS_REFILL_STEPS == 0, "a segment ends with a check of the ring");

// Decodes tile t with one warp (§8.7, "Decoding"). Returns false on a fault.
// `tmap[x]` is the table of context byte x; `tables` the first table.
// SPARSE: the stream's context is the base word at each symbol's position.
template <u32 CTX, typename T, bool SPARSE>
__device__ __forceinline__ bool decode_tile(const RansDesc& c, SharedAddr tables, const SharedAddr* tmap,
                                            const u8* payload, const u32* offsets, u32 t, u64* ring) {
    const u32 lane = threadIdx.x & 31;
    const u32 k = c.prob_bits;
    const u32 i0 = t << c.tile_log2;  // below decoded_len, a u32
    const u32 n_t = tile_symbols(c.decoded_len, c.tile_log2, t);
    const u32 lanes = n_t < 32 ? n_t : 32;
    const u32 off = offsets[t];
    const u8* p = payload + off;
    u8* out = (u8*)c.decoded + i0;
    TileCursor cur;
    cur.x = lane < lanes ? load_u32_le(p + 4 * lane) : RANS_L;
    if (__any_sync(0xffffffffu, cur.x < RANS_L)) return false;  // a start state below L
    cur.a0 = (const u8*)((u64)p & ~(u64)15);
    const u32 skew = (u32)(p - cur.a0);
    cur.shift = skew & 1;  // states and words take 4 and 2 bytes: every word has the skew's parity
    cur.carry = 0;         // the byte before a0, which no word holds
    cur.at = skew + cur.shift + 4 * lanes + 2 * lane;
    cur.end = skew + cur.shift + (offsets[t + 1] - off) + 2 * lane;
    cur.ring = ring;
    cur.ring_at = shared_addr(ring);
    cur.half = 0;
    const u8* lo = (const u8*)c.stored;
    const u8* hi = lo + c.stored_len;
    __syncwarp();  // the previous tile's reads are done
    store16(ring, 0, load16(cur.a0 + 16 * lane, lo, hi), cur.shift, cur.carry);
    store16(ring, 1, load16(cur.a0 + RANS_RING_HALF + 16 * lane, lo, hi), cur.shift, cur.carry);
    cur.next = load16(cur.a0 + 2 * RANS_RING_HALF + 16 * lane, lo, hi);
    __syncwarp();

    // The context, held in registers: the shared descriptor would be read
    // again after each __syncwarp.
    constexpr u32 size = context_size<CTX, T>();
    constexpr u32 SEG = RANS_SEGMENT;
    const u8* context = (const u8*)c.context;
    const u32* positions = (const u32*)c.positions;
    constexpr bool sparse = CTX == CTX_BASE_KEY && SPARSE;
    const u32 bound = CTX == CTX_BASE_KEY ? c.base_words : c.decoded_len;  // words the context may read
    const auto table_of = [&](u32 raw) { return CTX == CTX_NONE ? tables : tmap[context_key<CTX, T>(raw)]; };

    // Whole segments of full steps. Each reads the next one's contexts
    // unchecked, so they stop where a word would lie past the base: in a
    // dense chunk, at the first segment with one; in a sparse one, whose
    // positions increase, at the first whose last position lies past it
    // (positions are clamped to the base, so that no read strays whatever
    // they are; positions that do not increase are flagged by the positions
    // kernel). The steps after the last such segment read their contexts
    // one by one.
    u32 segments = n_t / (32 * SEG);
    if (CTX == CTX_BASE_KEY) {
        const u32 within = bound > i0 ? (bound - i0) / (32 * SEG) : 0;
        if (!sparse && within < segments) segments = within;
        if (bound == 0) segments = 0;
    }
    // raw[q]: the context of step q of the segment, then, once that step's
    // table is found, of step q of the next; ahead[q]: the position of step
    // q of the next segment (sparse).
    u32 raw[SEG], ahead[SEG];
    if (CTX != CTX_NONE && segments > 0) {
#pragma unroll
        for (u32 q = 0; q < SEG; q++) {
            const u32 i = i0 + q * 32 + lane;
            if (sparse) {
                const u32 w = positions[i];
                raw[q] = context_raw<CTX, T>(context, w, w < bound);  // checked: the first segment was not
                ahead[q] = segments > 1 ? positions[i + 32 * SEG] : 0;
            } else {
                raw[q] = context_read<CTX, T>(context_at<CTX, T>(context, i));
            }
        }
    }
    SharedAddr table_next = table_of(CTX != CTX_NONE && segments > 0 ? raw[0] : 0);
    u32 g = 0;
    while (g < segments) {
        const u32 step0 = g * SEG;
        bool more = g + 1 < segments;
        if (sparse && more) more = __shfl_sync(0xffffffffu, ahead[SEG - 1], 31) < bound;  // uniform
        // Where the next segment's contexts (and, sparse, the positions of
        // the one after) are read: this segment's again where there is none,
        // unused but readable.
        const u8* ctx_next = context_at<CTX, T>(context, i0 + (more ? step0 + SEG : step0) * 32 + lane);
        const u8* ctx_far = context_at<CTX, T>(context, i0 + (g + 2 < segments ? step0 + 2 * SEG : step0) * 32 + lane);
        const u32* pos_next = sparse ? positions + i0 + (g + 2 < segments ? step0 + 2 * SEG : step0) * 32 + lane : 0;
#pragma unroll
        for (u32 q = 0; q < SEG; q++) {
            const SharedAddr table = table_next;
            if (CTX != CTX_NONE) {
                if (sparse) {
                    raw[q] = context_read<CTX, T>(context_at<CTX, T>(context, ahead[q] < bound ? ahead[q] : bound - 1));
                    ahead[q] = pos_next[q * 32];
                } else {
                    raw[q] = context_read<CTX, T>(ctx_next + q * 32 * size);
                    prefetch_l2(ctx_far + q * 32 * size);
                }
                // the next step's: of this segment, or (raw[0] now holds it) of the next
                table_next = table_of(raw[(q + 1) % SEG]);
            }
            decode_step<true>(c, cur, table, k, (step0 + q) * 32 + lane, n_t, out, (q + 1) % RANS_REFILL_STEPS == 0);
        }
        if (cur.at > cur.end) return false;  // uniform: a truncated tile
        g++;
        if (!more) break;
    }
    // The rest, each step reading its context as it goes, the last maybe partial.
    const u32 steps = (n_t + 31) / 32;
    for (u32 step = g * SEG; step < steps; step++) {
        const u32 j = step * 32 + lane;
        u32 raw_j = 0;
        if (CTX != CTX_NONE) {
            const u32 w = sparse && j < n_t ? positions[i0 + j] : i0 + j;
            raw_j = context_raw<CTX, T>(context, w, j < n_t && w < bound);
        }
        decode_step<false>(c, cur, table_of(raw_j), k, j, n_t, out, true);
    }
    // words left over or missing (a truncated tile), or a final state other than L
    const bool bad = cur.at != cur.end || (lane < lanes && cur.x != RANS_L);
    return !__any_sync(0xffffffffu, bad);
}

template <u32 CTX, typename T, bool SPARSE>
__device__ __forceinline__ void decode_run(const RansDesc& c, SharedAddr tables, const SharedAddr* tmap,
                                           const u8* payload, const u32* offsets, u32 first, u32 last, u64* rings,
                                           u32* flag) {
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    u64* ring = rings + warp * RANS_RING_WORDS;
    for (u32 t = first + warp; t < last; t += blockDim.x >> 5) {
        if (!decode_tile<CTX, T, SPARSE>(c, tables, tmap, payload, offsets, t, ring) && lane == 0) {
            rans_fault(flag, ERR_RANS_DECODE, c.job);
        }
    }
}

// Two blocks of RANS_THREADS per SM: at one (182 registers a thread), a
// launch of short tiles ran in 8 waves of one block each, 2.7% of the warps
// active (ncu). A launch whose streams have a tile or two each runs blocks
// of fewer warps, so that the registers of idle warps are not held.
#define RANS_DECODE_BLOCKS_PER_SM 2
extern "C" __global__ void __launch_bounds__(RANS_THREADS, RANS_DECODE_BLOCKS_PER_SM)
rans_decode(const RansDesc* d, u32 nd, u32* flag) {
    DYNAMIC_SHARED_U32(smem);
    // The block's stream, read where it is used: held in registers, its
    // fields would take room that the decoding needs.
    __shared__ RansDesc c;
    __shared__ SharedAddr tmap[256];  // the table of each context byte
    alignas(RANS_RING_BYTES) __shared__ u64 rings[RANS_WARPS * RANS_RING_WORDS];
    if (threadIdx.x == 0) c = d[find_desc(d, nd, blockIdx.x)];
    __syncthreads();
    const u32* scratch = (const u32*)c.scratch;
    // a stream whose header is faulty was reported by rans_parse
    if (scratch[0] != RANS_SCRATCH_VALID) return;  // uniform
    const u32 k = c.prob_bits, tc = c.table_count;
    const u32 dyn = dynamic_smem_bytes();
    const u32 first = (blockIdx.x - c.block_begin) * c.tiles_per_block;
    const u32 threads = blockDim.x;  // a multiple of 32, at most RANS_THREADS
    // The launch as the kernel was built for it, and the rings aligned as
    // declared: a place in a ring is addressed by an OR.
    if (threads % 32 != 0 || threads > RANS_THREADS || k > RANS_MAX_PROB_BITS || tc > RANS_MAX_TABLES ||
        (shared_addr(rings) & (RANS_RING_BYTES - 1)) != 0 ||
        (u64)(tc << k) * 4 > dyn || first >= c.tiles || c.ctx_kind > CTX_HIGHER_PLANE ||
        c.table_form > RANS_FORM_PACKED ||
        (c.ctx_kind == CTX_BASE_KEY && c.word_bytes != 1 && c.word_bytes != 2 && c.word_bytes != 4 &&
         c.word_bytes != 8)) {
        if (threadIdx.x == 0) atomicOr(flag, ERR_BAD_DESCRIPTOR);
        return;
    }
    const u32 slots = 1u << k;
    // the context map, which rans_parse checked (its bytes are there, each entry < tc)
    const u32 entry_bits = map_entry_bits(c.table_form, tc);
    for (u32 i = threadIdx.x; i < 256; i += threads) {
        const u32 table = tc > 1 ? map_entry((const u8*)c.stored + 4, entry_bits, i) : 0;
        tmap[i] = shared_addr(smem + (table << k));
    }
    // Spread the tables over their slots. A thread takes a run of slots of
    // each table, finds the entry of its first slot by a binary search over
    // the entries' cums (ordered, and covering every slot: rans_parse checked
    // them) and walks on. The entries are staged in the rings, unused yet.
    u32* entries = (u32*)rings;
    for (u32 i = threadIdx.x; i < tc * RANS_TABLE_STRIDE; i += threads) {
        entries[i] = scratch[RANS_SCRATCH_HEAD + i];
    }
    __syncthreads();
    const u32 per = slots > threads ? slots / threads : 1;  // both powers of two
    const u32 first_slot = threadIdx.x * per;
    for (u32 t = 0; t < tc && first_slot < slots; t++) {
        const u32 s = scratch[4 + t];
        if (s == 0 || s > RANS_TABLE_STRIDE) continue;
        const u32* te = entries + t * RANS_TABLE_STRIDE;
        u32* table = smem + t * slots;
        u32 lo = 0, hi = s;  // the last entry whose cum <= first_slot
        while (hi - lo > 1) {
            const u32 mid = (lo + hi) >> 1;
            if ((te[mid] >> 20) <= first_slot) lo = mid; else hi = mid;
        }
        for (u32 q = 0; q < per; q++) {
            const u32 slot = first_slot + q;
            while (lo + 1 < s && (te[lo + 1] >> 20) <= slot) lo++;
            const u32 entry = te[lo];  // symbol, frequency and cum, as rans_parse wrote them
            table[slot] = slot_entry(entry & 0xFFu, (entry >> 8) & 0xFFFu, slot - (entry >> 20));
        }
    }
    __syncthreads();
    const SharedAddr tables = shared_addr(smem);
    const u8* payload = (const u8*)c.stored + scratch[1];
    const u32* offsets = scratch + RANS_SCRATCH_HEAD + tc * RANS_TABLE_STRIDE;
    const u32 last = first + c.tiles_per_block < c.tiles ? first + c.tiles_per_block : c.tiles;
    const bool sparse = c.positions != 0;
#define RANS_RUN(CTX, T, SPARSE) decode_run<CTX, T, SPARSE>(c, tables, tmap, payload, offsets, first, last, rings, flag)
    switch (c.ctx_kind) {
        case CTX_NONE: RANS_RUN(CTX_NONE, u8, false); break;
        case CTX_HIGHER_PLANE: RANS_RUN(CTX_HIGHER_PLANE, u8, false); break;
        default:
            switch (c.word_bytes) {
                case 1: sparse ? RANS_RUN(CTX_BASE_KEY, u8, true) : RANS_RUN(CTX_BASE_KEY, u8, false); break;
                case 2: sparse ? RANS_RUN(CTX_BASE_KEY, u16, true) : RANS_RUN(CTX_BASE_KEY, u16, false); break;
                case 4: sparse ? RANS_RUN(CTX_BASE_KEY, u32, true) : RANS_RUN(CTX_BASE_KEY, u32, false); break;
                default: sparse ? RANS_RUN(CTX_BASE_KEY, u64, true) : RANS_RUN(CTX_BASE_KEY, u64, false); break;
            }
    }
#undef RANS_RUN
}
