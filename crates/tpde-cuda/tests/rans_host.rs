//! The lane rANS kernels of `kernels/tpde_rans.cu`, run on the host: the
//! source is compiled with the system C++ compiler over a small emulation of
//! the CUDA built-ins it uses (a block is 256 CPU threads; `__syncthreads`,
//! warp shuffles, ballots and votes are barriers over them), so `rans_parse`
//! and `rans_decode` execute as written, lane by lane, with no GPU. Streams
//! come from an encoder written here from `spec/FORMAT.md` §8.7, §8.9 and
//! §15.10, in both table forms (codec 2's bytes, codec 4's packed bits); the
//! decoded bytes must be the symbols, and every header and decode fault of
//! §8.7 and §8.9 must raise its flag bit and name its stream's job.
#![allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]

mod host_cxx;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

const SOURCE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../kernels/tpde_rans.cu");

const ERR_BAD_DESCRIPTOR: u32 = 16;
const ERR_RANS_HEADER: u32 = 32;
const ERR_RANS_DECODE: u32 = 64;

/// The CUDA built-ins that the kernels use, on CPU threads. One block runs
/// at a time, so `__shared__` variables are statics.
const SHIM: &str = r#"
#include <barrier>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>
#define __device__
#define __global__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __shared__ static
struct Dim3 { unsigned x, y, z; };
thread_local Dim3 threadIdx, blockIdx;
static Dim3 blockDim;
static std::barrier<>* g_block;
struct Warp { std::barrier<>* bar; unsigned long long slot[32]; };
static Warp g_warps[8];
static unsigned g_dynamic_bytes;
static std::vector<unsigned> g_dynamic;
#define DYNAMIC_SHARED_U32(name) unsigned* name = g_dynamic.data()
inline unsigned dynamic_smem_bytes() { return g_dynamic_bytes; }
typedef unsigned long SharedAddr;
inline SharedAddr shared_addr(const void* p) { return (SharedAddr)p; }
inline unsigned load_shared_u32(SharedAddr a) { return *(const unsigned*)a; }
inline unsigned load_shared_u16(SharedAddr a) {
    if (a & 1) std::abort();  // a misaligned load faults on the device
    return *(const unsigned short*)a;
}
inline void prefetch_l2(const void*) {}
inline void __syncthreads() { g_block->arrive_and_wait(); }
inline void __threadfence() {}
template <typename T> T warp_exchange(T v, unsigned src) {
    Warp& w = g_warps[threadIdx.x / 32];
    w.slot[threadIdx.x % 32] = (unsigned long long)v;
    w.bar->arrive_and_wait();
    T r = (T)w.slot[src];
    w.bar->arrive_and_wait();
    return r;
}
template <typename T> T __shfl_sync(unsigned, T v, int src) { return warp_exchange(v, (unsigned)src & 31u); }
template <typename T> T __shfl_up_sync(unsigned, T v, unsigned d) {
    const unsigned lane = threadIdx.x % 32;
    return warp_exchange(v, lane >= d ? lane - d : lane);
}
inline unsigned __ballot_sync(unsigned, int p) {
    Warp& w = g_warps[threadIdx.x / 32];
    w.slot[threadIdx.x % 32] = p != 0;
    w.bar->arrive_and_wait();
    unsigned m = 0;
    for (unsigned l = 0; l < 32; l++) m |= (unsigned)w.slot[l] << l;
    w.bar->arrive_and_wait();
    return m;
}
inline int __any_sync(unsigned mask, int p) { return __ballot_sync(mask, p) != 0; }
inline void __syncwarp(unsigned = 0xffffffffu) { g_warps[threadIdx.x / 32].bar->arrive_and_wait(); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline unsigned atomicOr(unsigned* a, unsigned v) { return __atomic_fetch_or(a, v, __ATOMIC_SEQ_CST); }
inline unsigned atomicMin(unsigned* a, unsigned v) {
    unsigned old = __atomic_load_n(a, __ATOMIC_SEQ_CST);
    while (v < old && !__atomic_compare_exchange_n(a, &old, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {}
    return old;
}
"#;

/// Runs each stream of the input file alone: parse, then decode, as the
/// loader launches them (the descriptor from the four fixed bytes and the
/// table form), and writes the flag words and the output.
const HARNESS: &str = r#"
template <typename K> static void launch(unsigned blocks, unsigned dynamic, unsigned warp_count, K kernel) {
    g_dynamic_bytes = dynamic;
    blockDim = {32 * warp_count, 1, 1};
    for (unsigned b = 0; b < blocks; b++) {
        g_dynamic.assign(dynamic / 4 + 1, 0xCDCDCDCDu);  // garbage: every slot must be written
        std::barrier<> block(blockDim.x);
        g_block = &block;
        std::vector<std::unique_ptr<std::barrier<>>> warps;
        for (unsigned w = 0; w < warp_count; w++) {
            warps.emplace_back(new std::barrier<>(32));
            g_warps[w].bar = warps.back().get();
        }
        std::vector<std::thread> threads;
        for (unsigned t = 0; t < blockDim.x; t++) {
            threads.emplace_back([=] {
                threadIdx = {t, 0, 0};
                blockIdx = {b, 0, 0};
                kernel();
            });
        }
        for (auto& t : threads) t.join();
    }
}

static unsigned rd(FILE* f) {
    unsigned v;
    if (std::fread(&v, 4, 1, f) != 1) std::exit(3);
    return v;
}

static std::vector<u8> bytes(FILE* f, size_t n) {
    std::vector<u8> v(n + 1);
    if (n && std::fread(v.data(), 1, n, f) != n) std::exit(3);
    return v;
}

// argv: input, output, and the warps of a decoder block (1 to 8).
int main(int argc, char** argv) {
    if (argc != 4) return 2;
    const unsigned warp_count = (unsigned)std::atoi(argv[3]);
    if (warp_count < 1 || warp_count > 8) return 2;
    FILE* in = std::fopen(argv[1], "rb");
    FILE* out = std::fopen(argv[2], "wb");
    if (!in || !out) return 2;
    const unsigned count = rd(in);
    for (unsigned i = 0; i < count; i++) {
        RansDesc d;
        std::memset(&d, 0, sizeof d);
        d.stored_len = rd(in);
        d.decoded_len = rd(in);
        d.allowed = rd(in);
        d.word_bytes = rd(in);
        d.base_words = rd(in);
        const unsigned has_positions = rd(in);
        const unsigned context_len = rd(in);
        d.table_form = rd(in);
        std::vector<u8> stored = bytes(in, d.stored_len);
        std::vector<u8> context = bytes(in, context_len);
        std::vector<u8> positions = bytes(in, has_positions ? 4ull * d.decoded_len : 0);
        d.prob_bits = stored[0];
        d.ctx_kind = stored[1];
        d.table_count = stored[2];
        d.tile_log2 = stored[3];
        d.tiles = (unsigned)(((unsigned long long)d.decoded_len + (1ull << d.tile_log2) - 1) >> d.tile_log2);
        d.tiles_per_block = warp_count << (d.tile_log2 < 12 ? 12 - d.tile_log2 : 0);
        d.job = 100 + i;
        std::vector<u32> scratch(rans_scratch_words(d.table_count, d.tiles), 0xABABABABu);
        std::vector<u8> decoded(d.decoded_len, 0xEE);
        // Streams start at every offset from a 16-byte boundary, as they do in
        // the loader's staging buffers.
        std::vector<u8> placed(d.stored_len + 16);
        const unsigned skew = i % 16;
        std::memcpy(placed.data() + skew, stored.data(), d.stored_len);
        d.stored = (u64)(placed.data() + skew);
        d.decoded = (u64)decoded.data();
        d.scratch = (u64)scratch.data();
        d.context = context_len ? (u64)context.data() : 0;
        d.positions = has_positions ? (u64)positions.data() : 0;
        u32 flag[4] = {0, 0xFFFFFFFFu, 0xFFFFFFFFu, 0};
        launch(1, 0, 8, [&] { rans_parse(&d, 1, flag); });
        const unsigned blocks = (d.tiles + d.tiles_per_block - 1) / d.tiles_per_block;
        launch(blocks, (d.table_count << d.prob_bits) * 4, warp_count, [&] { rans_decode(&d, 1, flag); });
        std::fwrite(flag, 4, 3, out);
        std::fwrite(decoded.data(), 1, decoded.size(), out);
    }
    std::fclose(out);
    return 0;
}
"#;

fn compile(dir: &Path) -> PathBuf {
    let source = std::fs::canonicalize(SOURCE).expect("kernels/tpde_rans.cu exists");
    host_cxx::compile(dir, &format!("{SHIM}\n#include \"{}\"\n{HARNESS}", source.display()), host_cxx::THREADED)
}

/// One stream for the harness: its stored bytes and what its context reads.
#[derive(Clone, Debug, Default)]
struct Case {
    stored: Vec<u8>,
    decoded_len: u32,
    allowed: u32,
    word_bytes: u32,
    base_words: u32,
    context: Vec<u8>,
    positions: Option<Vec<u32>>,
    /// Codec 4's packed context map and tables, else codec 2's.
    packed: bool,
}

/// What the kernels gave for a stream: flag bits, the header and decode
/// fault jobs, the output.
#[derive(Debug)]
struct Outcome {
    bits: u32,
    header_job: u32,
    decode_job: u32,
    decoded: Vec<u8>,
}

fn run(exe: &Path, dir: &Path, cases: &[Case]) -> Vec<Outcome> {
    let mut input = Vec::new();
    input.extend_from_slice(&(cases.len() as u32).to_le_bytes());
    for c in cases {
        let fields = [
            c.stored.len() as u32,
            c.decoded_len,
            c.allowed,
            c.word_bytes,
            c.base_words,
            u32::from(c.positions.is_some()),
            c.context.len() as u32,
            u32::from(c.packed),
        ];
        for f in fields {
            input.extend_from_slice(&f.to_le_bytes());
        }
        input.extend_from_slice(&c.stored);
        input.extend_from_slice(&c.context);
        for p in c.positions.iter().flatten() {
            input.extend_from_slice(&p.to_le_bytes());
        }
    }
    let inp = dir.join("in.bin");
    std::fs::File::create(&inp).unwrap().write_all(&input).unwrap();
    // Decoder blocks of eight warps, as long streams get, and of one, as
    // streams of a tile or two get: the same flags and bytes either way.
    let [out, one_warp] = ["8", "1"].map(|warps| {
        let outp = dir.join(format!("out-{warps}.bin"));
        let status = Command::new(exe).arg(&inp).arg(&outp).arg(warps).status().unwrap();
        assert!(status.success(), "harness failed: {status}");
        std::fs::read(&outp).unwrap()
    });
    assert!(out == one_warp, "blocks of one warp decode differently from blocks of eight");
    let mut at = 0;
    let word = |at: &mut usize| {
        let v = u32::from_le_bytes(out[*at..*at + 4].try_into().unwrap());
        *at += 4;
        v
    };
    let mut outcomes = Vec::new();
    for c in cases {
        let (bits, header_job, decode_job) = (word(&mut at), word(&mut at), word(&mut at));
        let n = c.decoded_len as usize;
        outcomes.push(Outcome { bits, header_job, decode_job, decoded: out[at..at + n].to_vec() });
        at += n;
    }
    outcomes
}

// ---------------------------------------------------------------------------
// An encoder from the spec (§8.7 layout, §8.9 packed forms, §15.10 procedure).

const L: u32 = 1 << 16;

/// A table: frequencies of the 256 symbols (0 for absent), summing to 2^k.
type Freqs = [u32; 256];

/// Frequencies proportional to `counts`, each present symbol at least 1,
/// summing to `2^k`.
fn normalize(counts: &[u64; 256], k: u32) -> Freqs {
    let total: u64 = counts.iter().sum();
    assert!(counts.iter().filter(|&&c| c > 0).count() <= 1 << k, "more symbols than slots");
    let mut f = [0u32; 256];
    if total == 0 {
        f[0] = 1 << k;
        return f;
    }
    for (x, &c) in counts.iter().enumerate() {
        if c > 0 {
            f[x] = ((c << k) / total).max(1) as u32;
        }
    }
    let sum: i64 = f.iter().map(|&v| i64::from(v)).sum();
    let mut diff = (1i64 << k) - sum;
    while diff != 0 {
        // take from or give to the largest
        let x = (0..256).max_by_key(|&x| f[x]).unwrap();
        if diff > 0 {
            f[x] += diff as u32;
            diff = 0;
        } else {
            let take = (-diff).min(i64::from(f[x]) - 1);
            f[x] -= take as u32;
            diff += take;
        }
    }
    f
}

/// How the encoder lists the context map and tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Form {
    /// Codec 2: Table 8.7, a byte per map entry.
    Bytes,
    /// Codec 4 (§8.9): Table 8.8 with Exp-Golomb codes of this order in
    /// every table, or of each table's best; a packed map.
    Packed(Option<u32>),
}

impl Form {
    fn packed(self) -> bool {
        self != Form::Bytes
    }
}

/// The symbol count and symbol set of a table (Tables 8.7 and 8.8): the
/// symbols when fewer than 32, else a bitmap; nothing for all 256 when
/// `packed`.
fn write_symbol_set(out: &mut Vec<u8>, symbols: &[u8], packed: bool) {
    let s = symbols.len();
    out.push((s - 1) as u8);
    if s < 32 {
        out.extend_from_slice(symbols);
    } else if !(packed && s == 256) {
        let mut bitmap = [0u8; 32];
        for &x in symbols {
            bitmap[usize::from(x / 8)] |= 1 << (x % 8);
        }
        out.extend_from_slice(&bitmap);
    }
}

/// Appends a bit string (§8.9): bit `j` is bit `j mod 8` of byte `j / 8`;
/// the last byte's unused bits stay 0.
struct Bits<'a> {
    out: &'a mut Vec<u8>,
    at: usize,
}

impl Bits<'_> {
    fn push(&mut self, bit: bool) {
        if self.at.is_multiple_of(8) {
            self.out.push(0);
        }
        *self.out.last_mut().unwrap() |= u8::from(bit) << (self.at % 8);
        self.at += 1;
    }

    /// The low `count` bits of `v`, least significant first.
    fn int(&mut self, v: u32, count: u32) {
        for b in 0..count {
            self.push((v >> b) & 1 == 1);
        }
    }
}

/// `v_i = zigzag(f_i - f_(i-1))`, `f_(-1) = 0` (§8.9).
fn code_values(freqs: &[i64]) -> Vec<u32> {
    let mut previous = 0;
    freqs
        .iter()
        .map(|&f| {
            let d = f - previous;
            previous = f;
            (if d >= 0 { 2 * d } else { -2 * d - 1 }) as u32
        })
        .collect()
}

/// `n`, the prefix length of `v`'s Exp-Golomb code of order `g`: its
/// suffix takes `n + g` bits (§8.9).
fn prefix_len(v: u32, g: u32) -> u32 {
    (v + (1 << g)).ilog2() - g
}

/// Bits of the prefixes and of the suffixes of `values` at order `g`.
fn code_bits(values: &[u32], g: u32) -> (usize, usize) {
    let ones: usize = values.iter().map(|&v| prefix_len(v, g) as usize).sum();
    (ones + values.len(), ones + values.len() * g as usize)
}

/// A packed table (Table 8.8) of `symbols` with frequencies `freqs` (taken
/// as they are, so that a test can write a faulty one), with Exp-Golomb
/// codes of order `order`, or of the order that makes the table smallest.
fn write_packed_table(out: &mut Vec<u8>, symbols: &[u8], freqs: &[i64], order: Option<u32>) {
    write_symbol_set(out, symbols, true);
    let values = code_values(freqs);
    let total = |g: u32| {
        let (prefixes, suffixes) = code_bits(&values, g);
        prefixes + suffixes
    };
    let g = order.unwrap_or_else(|| (0..=11).min_by_key(|&g| total(g)).unwrap());
    out.push(g as u8);
    let mut bits = Bits { out, at: 0 };
    for &v in &values {
        for _ in 0..prefix_len(v, g) {
            bits.push(true);
        }
        bits.push(false);
    }
    for &v in &values {
        // all but the leading one of v + 2^g
        bits.int(v + (1 << g), prefix_len(v, g) + g);
    }
}

/// Bytes of the table of `f` in `form`.
fn table_len(f: &Freqs, form: Form) -> usize {
    let mut t = Vec::new();
    write_table(&mut t, f, form);
    t.len()
}

/// A table of the present symbols of `f` in `form`.
fn write_table(out: &mut Vec<u8>, f: &Freqs, form: Form) {
    let symbols: Vec<u8> = (0..=255u8).filter(|&x| f[usize::from(x)] > 0).collect();
    if let Form::Packed(order) = form {
        let freqs: Vec<i64> = symbols.iter().map(|&x| i64::from(f[usize::from(x)])).collect();
        write_packed_table(out, &symbols, &freqs, order);
        return;
    }
    write_symbol_set(out, &symbols, false);
    for &x in &symbols {
        let x = usize::from(x);
        let v = f[x];
        if v < 128 {
            out.push(v as u8);
        } else {
            out.push(0x80 | (v >> 8) as u8);
            out.push(v as u8);
        }
    }
}

/// Encodes `symbols` with table `ctx_table[i]` for symbol `i` (an index
/// into `tables`), the context byte of symbol `i` being `ctx_byte[i]` (the
/// context map sends it to its table).
struct Spec {
    k: u32,
    context: u8,
    tile_log2: u32,
    /// 256 entries when there are several tables.
    map: Option<Vec<u8>>,
    tables: Vec<Freqs>,
    form: Form,
}

/// Bits per entry of a packed context map of `count` tables (§8.9).
fn map_bits(count: usize) -> u32 {
    usize::BITS - (count - 1).leading_zeros()
}

fn encode(symbols: &[u8], ctx: &[u8], spec: &Spec) -> Vec<u8> {
    let mut out = vec![spec.k as u8, spec.context, spec.tables.len() as u8, spec.tile_log2 as u8];
    match &spec.map {
        Some(m) if spec.form.packed() => {
            let w = map_bits(spec.tables.len());
            let mut bits = Bits { out: &mut out, at: 0 };
            for &t in m {
                bits.int(u32::from(t), w);
            }
        }
        Some(m) => out.extend_from_slice(m),
        None => {}
    }
    let cums: Vec<[u32; 256]> = spec
        .tables
        .iter()
        .map(|f| {
            let mut c = [0u32; 256];
            let mut run = 0;
            for x in 0..256 {
                c[x] = run;
                run += f[x];
            }
            c
        })
        .collect();
    for t in &spec.tables {
        write_table(&mut out, t, spec.form);
    }
    let table_of = |i: usize| spec.map.as_ref().map_or(0, |m| usize::from(m[usize::from(ctx[i])]));
    let tile = 1usize << spec.tile_log2;
    let mut payloads = Vec::new();
    for t0 in (0..symbols.len()).step_by(tile) {
        let n = tile.min(symbols.len() - t0);
        let lanes = n.min(32);
        let mut x = vec![L; lanes];
        let mut words: Vec<u16> = Vec::new();
        for step in (0..n.div_ceil(32)).rev() {
            for l in (0..32).rev() {
                let j = 32 * step + l;
                if j >= n {
                    continue;
                }
                let i = t0 + j;
                let tb = table_of(i);
                let s = usize::from(symbols[i]);
                let f = spec.tables[tb][s];
                assert!(f > 0, "symbol {s} not in table {tb}");
                let bound = u64::from(f) << (32 - spec.k);
                while u64::from(x[l]) >= bound {
                    words.push(x[l] as u16);
                    x[l] >>= 16;
                }
                x[l] = ((x[l] / f) << spec.k) + (x[l] % f) + cums[tb][s];
            }
        }
        let mut p = Vec::new();
        for s in &x {
            p.extend_from_slice(&s.to_le_bytes());
        }
        for w in words.iter().rev() {
            p.extend_from_slice(&w.to_le_bytes());
        }
        payloads.push(p);
    }
    for p in &payloads {
        out.extend_from_slice(&(p.len() as u32).to_le_bytes());
    }
    for p in &payloads {
        out.extend_from_slice(p);
    }
    out
}

/// A seeded generator.
fn lcg(seed: u64) -> impl FnMut() -> u64 {
    let mut s = seed;
    move || {
        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        s >> 33
    }
}

/// Skewed symbols: mostly small values, a tail of any byte.
fn symbols(n: usize, seed: u64) -> Vec<u8> {
    let mut r = lcg(seed);
    (0..n)
        .map(|_| {
            let v = r();
            if v.is_multiple_of(8) {
                (v >> 8) as u8
            } else {
                (v % 5) as u8
            }
        })
        .collect()
}

/// The tables of `symbols` under context bytes `ctx` and `map` (one table
/// when `map` is `None`).
fn tables_for(symbols: &[u8], ctx: &[u8], map: Option<&[u8]>, count: usize, k: u32) -> Vec<Freqs> {
    let mut counts = vec![[0u64; 256]; count];
    for (i, &s) in symbols.iter().enumerate() {
        let t = map.map_or(0, |m| usize::from(m[usize::from(ctx[i])]));
        counts[t][usize::from(s)] += 1;
    }
    counts.iter().map(|c| normalize(c, k)).collect()
}

fn key(b: u64, wb: usize) -> u8 {
    let bits = 8 * wb as u32;
    let mask = if bits == 64 { u64::MAX } else { (1u64 << bits) - 1 };
    let b = b & mask;
    let r = ((b << 1) | (b >> (bits - 1))) & mask;
    (r >> (bits - 8)) as u8
}

/// A context-0 stream of `n` symbols.
fn plain(n: usize, k: u32, tile_log2: u32, seed: u64, form: Form) -> (Case, Vec<u8>) {
    // at most 2^k distinct symbols
    let s: Vec<u8> = symbols(n, seed).iter().map(|&v| if k < 8 { v % (1 << k) } else { v }).collect();
    let spec = Spec { k, context: 0, tile_log2, map: None, tables: tables_for(&s, &s, None, 1, k), form };
    let stored = encode(&s, &s, &spec);
    (Case { stored, decoded_len: n as u32, allowed: 1, packed: form.packed(), ..Case::default() }, s)
}

fn mixed_map(count: usize) -> Vec<u8> {
    (0..256).map(|x| (x * 7 % count) as u8).collect()
}

/// Streams of every context in `form`, with their symbols: context 0 (one
/// symbol, partial warps, several tiles and blocks, every k), a certain
/// symbol, context 2 with 2 to 8 tables (every width of a packed map
/// entry), context 1 of every word width, dense and sparse.
fn every_context_cases(form: Form) -> Vec<(Case, Vec<u8>)> {
    let packed = form.packed();
    let mut cases = Vec::new();
    // context 0: one symbol, partial warps, several tiles and blocks, every k
    for (n, k, tl) in [(1, 1, 8), (31, 3, 8), (32, 11, 8), (33, 5, 8), (4100, 11, 8), (70_000, 9, 10), (5000, 4, 12)] {
        cases.push(plain(n, k, tl, n as u64 + u64::from(k), form));
    }
    // a certain symbol (frequency 2^k): its states never move
    {
        let s = vec![7u8; 300];
        let mut f = [0u32; 256];
        f[7] = 1 << 6;
        let spec = Spec { k: 6, context: 0, tile_log2: 8, map: None, tables: vec![f], form };
        let c = Case { stored: encode(&s, &s, &spec), decoded_len: 300, allowed: 1, packed, ..Case::default() };
        cases.push((c, s));
    }
    // context 2: the plane above, two to eight tables, in tiles of one
    // segment of the decoder, or (the last) of four
    for (n, count) in [(3000usize, 8usize), (100, 2), (2000, 3), (1500, 4), (1000, 5), (7000, 3)] {
        let above = symbols(n, 77);
        let s: Vec<u8> = above.iter().zip(symbols(n, 78)).map(|(a, b)| a.wrapping_add(b) % 9).collect();
        let map = mixed_map(count);
        let spec = Spec {
            k: 10,
            context: 2,
            tile_log2: if n > 5000 { 11 } else { 9 },
            tables: tables_for(&s, &above, Some(&map), count, 10),
            map: Some(map),
            form,
        };
        let stored = encode(&s, &above, &spec);
        let c = Case { stored, decoded_len: n as u32, allowed: 0b101, context: above, packed, ..Case::default() };
        cases.push((c, s));
    }
    // context 1: the base key of every word width, dense (word i) and sparse
    // (word p_i), with a base shorter than the chunk (its words past it are
    // 0): in tiles shorter than a segment of the decoder, and in tiles of
    // four segments that the base ends within
    for (wb, words, base_words, tile_log2) in
        [1usize, 2, 4, 8].into_iter().flat_map(|wb| [(wb, 2000usize, 1500usize, 8u32), (wb, 9000, 6100, 11)])
    {
        let mut r = lcg(wb as u64);
        let base: Vec<u8> = (0..base_words * wb).map(|_| r() as u8).collect();
        let word = |i: usize| -> u64 {
            if i >= base_words {
                return 0;
            }
            let mut b = [0u8; 8];
            b[..wb].copy_from_slice(&base[i * wb..(i + 1) * wb]);
            u64::from_le_bytes(b)
        };
        let map = mixed_map(5);
        for sparse in [false, true] {
            let at: Vec<u32> =
                if sparse { (0..words as u32).filter(|i| i % 3 == 1).collect() } else { (0..words as u32).collect() };
            let keys: Vec<u8> = at.iter().map(|&p| key(word(p as usize), wb)).collect();
            let s: Vec<u8> = keys.iter().zip(symbols(at.len(), 5)).map(|(k, v)| (k % 4).wrapping_mul(v)).collect();
            let spec = Spec {
                k: 8,
                context: 1,
                tile_log2,
                tables: tables_for(&s, &keys, Some(&map), 5, 8),
                map: Some(map.clone()),
                form,
            };
            let stored = encode(&s, &keys, &spec);
            let c = Case {
                stored,
                decoded_len: at.len() as u32,
                allowed: 0b011,
                word_bytes: wb as u32,
                base_words: base_words as u32,
                context: base.clone(),
                positions: sparse.then(|| at.clone()),
                packed,
            };
            cases.push((c, s));
        }
    }
    cases
}

/// Runs `cases` and checks that each decodes to its symbols with no flag.
fn assert_decode_to_their_symbols(cases: Vec<(Case, Vec<u8>)>) {
    let dir = tempfile::tempdir().unwrap();
    let exe = compile(dir.path());
    let (cases, expect): (Vec<Case>, Vec<Vec<u8>>) = cases.into_iter().unzip();
    let outcomes = run(&exe, dir.path(), &cases);
    for (i, ((o, e), c)) in outcomes.iter().zip(&expect).zip(&cases).enumerate() {
        let what = format!("case {i} ({} symbols, header {:?}, packed {})", c.decoded_len, &c.stored[..4], c.packed);
        assert_eq!(o.bits, 0, "{what}: flag");
        assert!(o.decoded == *e, "{what}: decoded bytes differ");
    }
}

#[test]
fn streams_of_every_context_decode_to_their_symbols() {
    let mut cases = every_context_cases(Form::Bytes);
    cases.extend(every_context_cases(Form::Packed(None)));
    assert_decode_to_their_symbols(cases);
}

/// Packed tables (§8.9) at every Exp-Golomb order, with each kind of symbol
/// set (a list, a bitmap, none for all 256 symbols) and the longest code
/// allowed (a certain symbol at k = 11: code value 2^12, n + g = 12 at
/// every order); and eight tables of 256 symbols with the longest bit
/// strings of orders 0 and 11. The kernels give the symbols, as the
/// library's decoder does.
#[test]
fn packed_tables_of_every_order_and_symbol_set_decode() {
    let mut cases = Vec::new();
    for order in 0..=11u32 {
        let form = Form::Packed(Some(order));
        for (alphabet, k) in [(1usize, 11u32), (1, 3), (6, 5), (40, 9), (256, 11)] {
            let mut r = lcg(u64::from(order) * 10 + alphabet as u64);
            // every symbol of the alphabet occurs, spread over the bytes
            let n = 700 + alphabet;
            let s: Vec<u8> = (0..n)
                .map(|i| {
                    let j = if i < alphabet { i } else { r() as usize % alphabet };
                    (j * 256 / alphabet) as u8
                })
                .collect();
            let spec = Spec { k, context: 0, tile_log2: 8, map: None, tables: tables_for(&s, &s, None, 1, k), form };
            let stored = encode(&s, &s, &spec);
            assert_eq!(stored[4], (alphabet - 1) as u8);
            let c = Case { stored, decoded_len: n as u32, allowed: 1, packed: true, ..Case::default() };
            cases.push((c, s));
        }
    }
    // eight tables of all 256 symbols: frequencies 1 and 15 in turn (code
    // values 27 and 28, five bits of prefix at order 0), each table from
    // another first symbol; at order 11 every code takes 12 bits
    let n = 5000;
    let above = symbols(n, 91);
    let s = symbols(n, 92);
    let tables: Vec<Freqs> = (0..8).map(|t| std::array::from_fn(|x| if (x + t) % 2 == 0 { 1 } else { 15 })).collect();
    for order in [0, 11] {
        let form = Form::Packed(Some(order));
        let spec = Spec { k: 11, context: 2, tile_log2: 10, map: Some(mixed_map(8)), tables: tables.clone(), form };
        let longest = spec.tables.iter().map(|f| table_len(f, form)).max().unwrap();
        assert!(longest > 280, "order {order}: tables of {longest} bytes");
        let stored = encode(&s, &above, &spec);
        let c = Case {
            stored,
            decoded_len: n as u32,
            allowed: 0b101,
            context: above.clone(),
            packed: true,
            ..Case::default()
        };
        cases.push((c, s.clone()));
    }
    for (c, s) in &cases {
        assert_eq!(library_decode(c).as_deref(), Ok(s.as_slice()), "the library, header {:?}", &c.stored[..4]);
    }
    assert_decode_to_their_symbols(cases);
}

/// Rewrites the tile lengths and payloads of an encoded stream whose tile
/// lengths start at byte `lengths_at`: `edit` gets each tile's payload and
/// may change it.
fn edit_tiles(
    stored: &[u8],
    lengths_at: usize,
    n: usize,
    tile_log2: u32,
    edit: impl Fn(usize, &mut Vec<u8>),
) -> Vec<u8> {
    let tiles = n.div_ceil(1 << tile_log2);
    let at = lengths_at;
    let mut payloads = Vec::new();
    let mut p = at + 4 * tiles;
    for t in 0..tiles {
        let len = u32::from_le_bytes(stored[at + 4 * t..at + 4 * t + 4].try_into().unwrap()) as usize;
        let mut v = stored[p..p + len].to_vec();
        edit(t, &mut v);
        payloads.push(v);
        p += len;
    }
    assert_eq!(p, stored.len(), "the tile lengths account for the stream");
    let mut out = stored[..at].to_vec();
    for v in &payloads {
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for v in &payloads {
        out.extend_from_slice(v);
    }
    out
}

/// A fault case: what it is, the stream, the flag bit it must raise (0 for
/// a good stream).
type Fault = (String, Case, u32);

/// Faults that do not depend on the table form, in a context-0 stream of
/// `form`: cuts, a byte past the payloads, a tile length of the wrong form,
/// and every decode fault.
fn stream_faults(form: Form) -> Vec<Fault> {
    let (n, tl) = (3000usize, 8u32);
    let (good, s) = plain(n, 11, tl, 9, form);
    // context 0: the fixed bytes, the one table, the tile lengths
    let lengths_at = 4 + table_len(&tables_for(&s, &s, None, 1, 11)[0], form);
    let with = |stored: Vec<u8>| Case { stored, ..good.clone() };
    let mut cases: Vec<(&str, Case, u32)> = Vec::new();
    // header faults (E_RANS_HEADER)
    let g = &good.stored;
    cases.push(("cut in the table", with(g[..6].to_vec()), ERR_RANS_HEADER));
    cases.push(("cut in the tile lengths", with(g[..g.len() - 1].to_vec()), ERR_RANS_HEADER));
    let mut t = g.clone();
    t.push(0);
    cases.push(("a byte past the payloads", with(t), ERR_RANS_HEADER));
    // a tile length of the wrong form: an odd number of word bytes
    let t = edit_tiles(g, lengths_at, n, tl, |t, p| {
        if t == 2 {
            p.push(0);
        }
    });
    cases.push(("an odd tile length", with(t), ERR_RANS_HEADER));
    // decode faults (E_RANS_DECODE)
    let t = edit_tiles(g, lengths_at, n, tl, |t, p| {
        if t == 1 {
            p[4 * 5..4 * 6].copy_from_slice(&0xFFFFu32.to_le_bytes());
        }
    });
    cases.push(("an initial state below 2^16", with(t), ERR_RANS_DECODE));
    let t = edit_tiles(g, lengths_at, n, tl, |t, p| {
        if t == 3 {
            p.truncate(p.len() - 2);
        }
    });
    cases.push(("a truncated tile", with(t), ERR_RANS_DECODE));
    let t = edit_tiles(g, lengths_at, n, tl, |t, p| {
        if t == 0 {
            p.extend_from_slice(&[1, 2]);
        }
    });
    cases.push(("a word left over", with(t), ERR_RANS_DECODE));
    let t = edit_tiles(g, lengths_at, n, tl, |t, p| {
        if t == 4 {
            p[0] ^= 1; // lane 0's initial state: its final state is not 2^16
        }
    });
    cases.push(("a wrong final state", with(t), ERR_RANS_DECODE));
    cases.push(("the good stream", good.clone(), 0));
    cases.into_iter().map(|(what, c, bit)| (format!("{form:?}: {what}"), c, bit)).collect()
}

/// The table and context map faults of codec 2 (§8.7, "Header checks").
fn byte_table_faults() -> Vec<Fault> {
    let mut cases: Vec<(&str, Case, u32)> = Vec::new();
    // a symbol list (5 symbols) with one-byte frequencies (k = 6)
    {
        let s5: Vec<u8> = symbols(600, 11).iter().map(|v| v % 5).collect();
        let spec = Spec {
            k: 6,
            context: 0,
            tile_log2: 8,
            map: None,
            tables: tables_for(&s5, &s5, None, 1, 6),
            form: Form::Bytes,
        };
        let small = Case { stored: encode(&s5, &s5, &spec), decoded_len: 600, allowed: 1, ..Case::default() };
        assert_eq!(&small.stored[4..10], &[4, 0, 1, 2, 3, 4]);
        let edit = |at: usize, v: u8| {
            let mut t = small.stored.clone();
            t[at] = v;
            Case { stored: t, ..small.clone() }
        };
        cases.push(("symbols not increasing", edit(6, 2), ERR_RANS_HEADER));
        cases.push(("a zero frequency", edit(10, 0), ERR_RANS_HEADER));
        cases.push(("frequencies not summing to 2^k", edit(10, small.stored[10] + 1), ERR_RANS_HEADER));
        cases.push(("the good symbol list", small, 0));
    }
    // a two-byte frequency below 128, and a bitmap with a bit too many
    {
        let s8 = vec![1u8, 2, 2, 2];
        let mut f = [0u32; 256];
        f[1] = 100;
        f[2] = 156;
        let spec = Spec { k: 8, context: 0, tile_log2: 8, map: None, tables: vec![f], form: Form::Bytes };
        let mut t = encode(&s8, &s8, &spec);
        // table: [1] [1, 2] [100] [0x80, 156]: re-encode 100 as two bytes
        assert_eq!(&t[4..9], &[1, 1, 2, 100, 0x80]);
        t.splice(7..8, [0x80, 100]);
        // the cursor moved: tile lengths follow one byte later, unchanged
        let c = Case { stored: t, decoded_len: 4, allowed: 1, ..Case::default() };
        cases.push(("a two-byte frequency below 128", c, ERR_RANS_HEADER));
        let s40: Vec<u8> = (0..40).collect();
        let mut counts = [0u64; 256];
        for &x in &s40 {
            counts[usize::from(x)] += 1;
        }
        let spec =
            Spec { k: 8, context: 0, tile_log2: 8, map: None, tables: vec![normalize(&counts, 8)], form: Form::Bytes };
        let mut t = encode(&s40, &s40, &spec);
        t[5 + 31] |= 0x80; // symbol 255 too
        let c = Case { stored: t, decoded_len: 40, allowed: 1, ..Case::default() };
        cases.push(("a bitmap with a bit too many", c, ERR_RANS_HEADER));
    }
    // a context map entry past the tables; a context the stream forbids
    {
        let above = symbols(500, 3);
        let s2 = symbols(500, 4);
        let map = mixed_map(3);
        let spec = Spec {
            k: 9,
            context: 2,
            tile_log2: 8,
            tables: tables_for(&s2, &above, Some(&map), 3, 9),
            map: Some(map),
            form: Form::Bytes,
        };
        let base = Case {
            stored: encode(&s2, &above, &spec),
            decoded_len: 500,
            allowed: 0b101,
            context: above,
            ..Case::default()
        };
        let mut t = base.stored.clone();
        t[4 + 200] = 3;
        cases.push(("a context map entry past the tables", Case { stored: t, ..base.clone() }, ERR_RANS_HEADER));
        cases.push(("a forbidden context", Case { allowed: 0b001, ..base.clone() }, ERR_RANS_HEADER));
        cases.push(("the good context 2 stream", base, 0));
    }
    cases.into_iter().map(|(what, c, bit)| (format!("Bytes: {what}"), c, bit)).collect()
}

/// The packed context map and table faults of codec 4 (§8.9, "Checks"):
/// bytes that run out in each field, a map entry past the tables, a bad
/// symbol set, an order above 11, a prefix too long, a frequency out of
/// range, nonzero padding, frequencies that do not sum to 2^k; and the good
/// streams next to them.
fn packed_table_faults() -> Vec<Fault> {
    let mut cases: Vec<(String, Case, u32)> = Vec::new();
    let mut push = |what: &str, c: Case, bit: u32| cases.push((format!("Packed: {what}"), c, bit));
    // five symbols in a list (k = 6): the stream with its table at order g,
    // and the table's length
    let s5: Vec<u8> = symbols(600, 11).iter().map(|v| v % 5).collect();
    let f = tables_for(&s5, &s5, None, 1, 6)[0];
    let listed: Vec<u8> = (0..5).collect();
    let freqs: Vec<i64> = listed.iter().map(|&x| i64::from(f[usize::from(x)])).collect();
    let values = code_values(&freqs);
    let stream = |g: u32| {
        let spec = Spec { k: 6, context: 0, tile_log2: 8, map: None, tables: vec![f], form: Form::Packed(Some(g)) };
        let c = Case { stored: encode(&s5, &s5, &spec), decoded_len: 600, allowed: 1, packed: true, ..Case::default() };
        (c, table_len(&f, Form::Packed(Some(g))))
    };
    let (good, len) = stream(0);
    assert_eq!(&good.stored[4..10], &[4, 0, 1, 2, 3, 4]);
    let order_at = 4 + 1 + 5;
    let bits_at = order_at + 1;
    let cut = |c: &Case, at: usize| Case { stored: c.stored[..at].to_vec(), ..c.clone() };
    // `good` with its table replaced
    let with_table =
        |table: &[u8]| Case { stored: [&good.stored[..4], table, &good.stored[4 + len..]].concat(), ..good.clone() };
    let table_of = |symbols: &[u8], freqs: &[i64], g: u32| {
        let mut t = Vec::new();
        write_packed_table(&mut t, symbols, freqs, Some(g));
        with_table(&t)
    };
    push("cut in the symbol list", cut(&good, 4 + 3), ERR_RANS_HEADER);
    push("cut before the order", cut(&good, order_at), ERR_RANS_HEADER);
    // code values 2, 118, 117, 0, 0: prefixes of 1, 6, 6, 0, 0 ones at
    // order 0, 18 bits, cut after 8
    let spiked = [1, 60, 1, 1, 1];
    assert_eq!(code_bits(&code_values(&spiked), 0).0, 18);
    push("cut in the prefixes", cut(&table_of(&listed, &spiked, 0), bits_at + 1), ERR_RANS_HEADER);
    // order 3: suffixes of at least 3 bits each after the prefixes; the
    // byte of the last prefix is there, not the rest of the suffixes
    let (good3, _) = stream(3);
    let (prefix_bits, suffix_bits) = code_bits(&values, 3);
    assert!(suffix_bits >= 15);
    push("cut in the suffixes", cut(&good3, bits_at + prefix_bits / 8 + 1), ERR_RANS_HEADER);
    for g in [12u8, 255] {
        let mut t = good.stored.clone();
        t[order_at] = g;
        push(&format!("order {g}"), Case { stored: t, ..good.clone() }, ERR_RANS_HEADER);
    }
    push("symbols not increasing", table_of(&[0, 2, 1, 3, 4], &freqs, 2), ERR_RANS_HEADER);
    push("a frequency of 0", table_of(&listed, &[16, 0, 16, 16, 16], 2), ERR_RANS_HEADER);
    push("a frequency above 2^k", table_of(&listed, &[65, -1, 0, 0, 0], 2), ERR_RANS_HEADER);
    push("frequencies not summing to 2^k", table_of(&listed, &[16, 16, 16, 16, 15], 2), ERR_RANS_HEADER);
    // a code of n + g = 12 is allowed (code value 4098: f_0 = 2049, out of
    // range); 13 is not: code value 8191 at order 0 (w = 2^13), 8064 at
    // order 7
    push("a code of 12 bits out of range", table_of(&listed, &[2049, -1985, 0, 0, 0], 0), ERR_RANS_HEADER);
    push("a prefix of n + g = 13, order 0", table_of(&listed, &[-4096, 4160, 0, 0, 0], 0), ERR_RANS_HEADER);
    push("a prefix of n + g = 13, order 7", table_of(&listed, &[4032, -3968, 0, 0, 0], 7), ERR_RANS_HEADER);
    // a run of ones: zeros after 1100 bytes (a prefix far too long), and
    // none in the bytes a valid bit string could take, in a stream that goes
    // on after them
    for ones in [1100usize, 2100] {
        let mut t = vec![4u8, 0, 1, 2, 3, 4, 0];
        t.extend(vec![0xFF; ones]);
        t.extend([0; 8]);
        push(&format!("a run of {ones} bytes of ones"), with_table(&t), ERR_RANS_HEADER);
    }
    // nonzero padding: a string whose last byte has unused bits
    let g = (0..=11)
        .find(|&g| {
            let (prefixes, suffixes) = code_bits(&values, g);
            (prefixes + suffixes) % 8 != 0
        })
        .expect("a string that ends inside a byte");
    let (padded, len) = stream(g);
    let mut t = padded.stored.clone();
    t[4 + len - 1] |= 0x80;
    push("nonzero padding", Case { stored: t, ..padded.clone() }, ERR_RANS_HEADER);
    push("the good stream with padding", padded, 0);
    push("the good stream at order 0", good.clone(), 0);
    push("the good stream at order 3", good3, 0);
    // a bitmap with a bit too many
    let s40: Vec<u8> = (0..40).collect();
    let mut counts = [0u64; 256];
    for &x in &s40 {
        counts[usize::from(x)] += 1;
    }
    let tables = vec![normalize(&counts, 8)];
    let spec = Spec { k: 8, context: 0, tile_log2: 8, map: None, tables, form: Form::Packed(None) };
    let mut t = encode(&s40, &s40, &spec);
    t[5 + 31] |= 0x80; // symbol 255 too
    push(
        "a bitmap with a bit too many",
        Case { stored: t, decoded_len: 40, allowed: 1, packed: true, ..Case::default() },
        ERR_RANS_HEADER,
    );
    // packed maps of 2 and 3 bits an entry: an entry past the tables (entry
    // 2 of a 3-bit map straddles two bytes), a cut in the map, a context the
    // stream forbids
    for count in [3usize, 5] {
        let above = symbols(500, 3);
        let s2 = symbols(500, 4);
        let map = mixed_map(count);
        let spec = Spec {
            k: 9,
            context: 2,
            tile_log2: 8,
            tables: tables_for(&s2, &above, Some(&map), count, 9),
            map: Some(map),
            form: Form::Packed(None),
        };
        let stored = encode(&s2, &above, &spec);
        let base = Case { stored, decoded_len: 500, allowed: 0b101, context: above, packed: true, ..Case::default() };
        let w = map_bits(count) as usize;
        for x in [2usize, 200] {
            let mut t = base.stored.clone();
            for b in w * x..w * x + w {
                t[4 + b / 8] |= 1 << (b % 8); // entry 2^w - 1 >= count
            }
            push(&format!("map entry {x} past {count} tables"), Case { stored: t, ..base.clone() }, ERR_RANS_HEADER);
        }
        push(&format!("cut in the map of {count} tables"), cut(&base, 4 + 32 * w - 1), ERR_RANS_HEADER);
        push(&format!("a forbidden context, {count} tables"), Case { allowed: 0b001, ..base.clone() }, ERR_RANS_HEADER);
        push(&format!("the good map of {count} tables"), base, 0);
    }
    cases
}

#[test]
fn every_fault_of_the_spec_is_flagged_and_names_its_job() {
    let dir = tempfile::tempdir().unwrap();
    let exe = compile(dir.path());
    let mut cases = stream_faults(Form::Bytes);
    cases.extend(stream_faults(Form::Packed(None)));
    cases.extend(byte_table_faults());
    cases.extend(packed_table_faults());
    let only: Vec<Case> = cases.iter().map(|(_, c, _)| c.clone()).collect();
    let outcomes = run(&exe, dir.path(), &only);
    for (i, ((what, c, bit), o)) in cases.iter().zip(&outcomes).enumerate() {
        // the library's decoder judges the stream the same way
        let library = match library_decode(c) {
            Ok(_) => 0,
            Err(ErrorCode::RansHeader) => ERR_RANS_HEADER,
            Err(ErrorCode::RansDecode) => ERR_RANS_DECODE,
            Err(code) => panic!("{what}: the library gave {code:?}"),
        };
        assert_eq!(library, *bit, "{what}: the library");
        assert_eq!(o.bits, *bit, "{what}: flag {:#x}", o.bits);
        let job = 100 + i as u32;
        match *bit {
            ERR_RANS_HEADER => assert_eq!((o.header_job, o.decode_job), (job, u32::MAX), "{what}"),
            ERR_RANS_DECODE => assert_eq!((o.header_job, o.decode_job), (u32::MAX, job), "{what}"),
            _ => assert_eq!((o.header_job, o.decode_job), (u32::MAX, u32::MAX), "{what}"),
        }
        assert_ne!(o.bits & ERR_BAD_DESCRIPTOR, ERR_BAD_DESCRIPTOR, "{what}");
    }
}

// ---------------------------------------------------------------------------
// Against the format library's codec: its encoder's streams, its decoder's
// bytes and codes.

use tpde::format::rans::{self as library, decode_into, Contexts, TableForm};
use tpde::ErrorCode;

/// A stream of the library's encoder, with the contexts it was made with.
struct LibraryCase {
    what: String,
    case: Case,
    symbols: Vec<u8>,
}

fn contexts_of<'a>(c: &'a Case, positions: Option<&'a [u32]>) -> Contexts<'a> {
    match c.allowed {
        0b101 => Contexts::HigherPlane(&c.context),
        0b011 => Contexts::BaseKeys { base: &c.context, word_bytes: c.word_bytes as usize, positions },
        _ => Contexts::None,
    }
}

/// Streams of the library's encoder in `form`, of every context.
fn library_cases(form: TableForm) -> Vec<LibraryCase> {
    let packed = form == TableForm::Packed;
    let mut out = Vec::new();
    for (n, seed) in [(1usize, 1u64), (33, 2), (5000, 3), (150_000, 4)] {
        let s = symbols(n, seed);
        let stored = library::encode(form, &s, Contexts::None);
        let case = Case { stored, decoded_len: n as u32, allowed: 1, packed, ..Case::default() };
        out.push(LibraryCase { what: format!("{form:?}: context 0, {n} symbols"), case, symbols: s });
    }
    // a plane that is almost all zeros, and one of a single symbol
    let mut r = lcg(9);
    let zeros: Vec<u8> = (0..70_000).map(|_| u8::from(r().is_multiple_of(200))).collect();
    for s in [zeros, vec![42u8; 5000]] {
        let n = s.len();
        let stored = library::encode(form, &s, Contexts::None);
        out.push(LibraryCase {
            what: format!("{form:?}: context 0, skewed {n}"),
            case: Case { stored, decoded_len: n as u32, allowed: 1, packed, ..Case::default() },
            symbols: s,
        });
    }
    // the plane above
    let above = symbols(40_000, 11);
    let s: Vec<u8> = above.iter().zip(symbols(40_000, 12)).map(|(a, b)| (a / 3).wrapping_add(b % 3)).collect();
    let stored = library::encode(form, &s, Contexts::HigherPlane(&above));
    let case = Case { stored, decoded_len: 40_000, allowed: 0b101, context: above, packed, ..Case::default() };
    out.push(LibraryCase { what: format!("{form:?}: context 2"), case, symbols: s });
    // the base key, every word width, dense and sparse, a base shorter than the chunk
    for wb in [1usize, 2, 4, 8] {
        let (words, base_words) = (30_000usize, 25_000usize);
        let mut r = lcg(wb as u64 + 20);
        let base: Vec<u8> = (0..base_words * wb).map(|_| r() as u8).collect();
        let word = |i: usize| -> u64 {
            if i >= base_words {
                return 0;
            }
            let mut b = [0u8; 8];
            b[..wb].copy_from_slice(&base[i * wb..(i + 1) * wb]);
            u64::from_le_bytes(b)
        };
        for sparse in [false, true] {
            let at: Vec<u32> =
                if sparse { (0..words as u32).filter(|i| i % 7 < 2).collect() } else { (0..words as u32).collect() };
            let s: Vec<u8> = at
                .iter()
                .zip(symbols(at.len(), 30))
                .map(|(&p, v)| (key(word(p as usize), wb) >> 5).wrapping_add(v % 4))
                .collect();
            let positions = sparse.then_some(at.as_slice());
            let stored = library::encode(form, &s, Contexts::BaseKeys { base: &base, word_bytes: wb, positions });
            let case = Case {
                stored,
                decoded_len: at.len() as u32,
                allowed: 0b011,
                word_bytes: wb as u32,
                base_words: base_words as u32,
                context: base.clone(),
                positions: sparse.then(|| at.clone()),
                packed,
            };
            let what = format!("{form:?}: context 1, {wb}-byte words, sparse {sparse}");
            out.push(LibraryCase { what, case, symbols: s });
        }
    }
    out
}

/// The library's result for a case: its decoded bytes or its code.
fn library_decode(c: &Case) -> Result<Vec<u8>, ErrorCode> {
    let mut out = Vec::new();
    let form = if c.packed { TableForm::Packed } else { TableForm::Bytes };
    decode_into(form, &c.stored, c.decoded_len as usize, contexts_of(c, c.positions.as_deref()), &mut out)
        .map(|()| out)
        .map_err(|e| e.code())
}

#[test]
fn the_kernels_decode_the_library_encoder_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let exe = compile(dir.path());
    let cases: Vec<LibraryCase> = [TableForm::Bytes, TableForm::Packed].into_iter().flat_map(library_cases).collect();
    let only: Vec<Case> = cases.iter().map(|c| c.case.clone()).collect();
    for (c, o) in cases.iter().zip(run(&exe, dir.path(), &only)) {
        assert_eq!(library_decode(&c.case).as_deref(), Ok(c.symbols.as_slice()), "{}: the library", c.what);
        assert_eq!(o.bits, 0, "{}: flag", c.what);
        assert!(o.decoded == c.symbols, "{}: decoded bytes differ", c.what);
    }
}

/// Corrupted streams (bytes flipped past the fixed header, cut, extended;
/// half of the flips among the first bytes, where the context map and
/// tables lie), in both table forms: the kernels raise the bit of the
/// library's code, or none and give its bytes where the library accepts the
/// stream.
#[test]
fn corrupted_streams_give_the_library_code() {
    let dir = tempfile::tempdir().unwrap();
    let exe = compile(dir.path());
    let mut r = lcg(77);
    let mut cases = Vec::new();
    let library = [TableForm::Bytes, TableForm::Packed].into_iter().flat_map(library_cases);
    for base in library.filter(|c| c.case.stored.len() > 8 && c.case.decoded_len < 50_000) {
        let len = base.case.stored.len();
        // Flips anywhere mostly reach the tiles, whose decoding is the slow part of
        // this test; flips in the first 300 bytes reach the tables of either form.
        for k in 0..8 {
            let mut stored = base.case.stored.clone();
            match k {
                0 => stored.truncate(len - 1),
                1 => stored.truncate(4 + (r() as usize) % (len - 4)),
                2 => stored.push(r() as u8),
                5.. => {
                    let at = 4 + (r() as usize) % (len - 4).min(300);
                    stored[at] ^= 1 << (r() % 8);
                }
                _ => {
                    let at = 4 + (r() as usize) % (len - 4);
                    stored[at] ^= 1 << (r() % 8);
                }
            }
            cases.push((format!("{} corruption {k}", base.what), Case { stored, ..base.case.clone() }));
        }
    }
    let only: Vec<Case> = cases.iter().map(|(_, c)| c.clone()).collect();
    let mut seen = [0usize; 3];
    for ((what, c), o) in cases.iter().zip(run(&exe, dir.path(), &only)) {
        match library_decode(c) {
            Ok(bytes) => {
                seen[0] += 1;
                assert_eq!(o.bits, 0, "{what}: the library accepts it");
                assert!(o.decoded == bytes, "{what}: decoded bytes differ from the library's");
            }
            Err(ErrorCode::RansHeader) => {
                seen[1] += 1;
                assert_eq!(o.bits, ERR_RANS_HEADER, "{what}");
            }
            Err(ErrorCode::RansDecode) => {
                seen[2] += 1;
                assert_eq!(o.bits, ERR_RANS_DECODE, "{what}");
            }
            Err(code) => panic!("{what}: the library gave {code:?}"),
        }
    }
    assert!(seen[1] > 0 && seen[2] > 0, "both kinds of fault are exercised: {seen:?}");
}
