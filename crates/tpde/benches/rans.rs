//! Lane rANS throughput (codec 2, spec §8.7) on byte planes of three kinds: skewed
//! (90% zeros), mid-entropy (about 4 bits per byte) and near-uniform, against zstd
//! level 3 on the same planes in the same run. Throughput is in symbols (bytes of
//! plane) per second. "decode" uses the vector kernel where the CPU has one,
//! "decode scalar" the portable loop. The stored sizes are printed first. Run with
//! `cargo bench -p tpde --bench rans`.

use criterion::{criterion_main, BenchmarkId, Criterion, Throughput};
use tpde::format::rans::{self, Contexts, TableForm};

const SYMBOLS: usize = 1 << 20;
/// The default writer's table form; decoding past the tables is the same in both.
const FORM: TableForm = TableForm::Packed;

/// Deterministic xorshift noise.
struct Noise(u64);

impl Noise {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// About normal with standard deviation `sigma` (a sum of four uniforms).
    #[allow(clippy::cast_precision_loss)]
    fn normal(&mut self, sigma: f64) -> f64 {
        let sum: f64 = (0..4).map(|_| (self.next() >> 11) as f64 / (1u64 << 53) as f64).sum();
        (sum - 2.0) * sigma * 3f64.sqrt()
    }
}

/// Zigzag of a rounded normal value, as the low plane of sub deltas looks.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
fn zigzag(value: f64) -> u8 {
    let v = value.round() as i64;
    (((v << 1) ^ (v >> 63)) as u64).min(255) as u8
}

/// The planes: name, symbols, and a plane above that conditions them.
#[allow(clippy::type_complexity)]
fn planes() -> Vec<(&'static str, Vec<u8>, Vec<u8>)> {
    let mut noise = Noise(0x9E37_79B9_7F4A_7C15);
    let mut skewed = Vec::with_capacity(SYMBOLS);
    let mut mid = Vec::with_capacity(SYMBOLS);
    let mut uniform = Vec::with_capacity(SYMBOLS);
    let mut above = Vec::with_capacity(SYMBOLS);
    for _ in 0..SYMBOLS {
        let r = noise.next();
        // The plane above: a few exponents; the spread of the byte below grows with it.
        let exponent = [0u8, 1, 1, 2, 2, 2, 3, 3][(r & 7) as usize];
        above.push(exponent);
        let scale = f64::from(1u32 << exponent);
        skewed.push(if (r >> 8).is_multiple_of(10) { zigzag(noise.normal(scale)).max(1) } else { 0 });
        mid.push(zigzag(noise.normal(scale)));
        #[allow(clippy::cast_possible_truncation)]
        uniform.push(((r >> 16) as u8) & if (r >> 24).is_multiple_of(16) { 0x7F } else { 0xFF });
    }
    vec![("skewed", skewed, above.clone()), ("mid", mid, above.clone()), ("uniform", uniform, above)]
}

fn rans_against_zstd(c: &mut Criterion) {
    let mut group = c.benchmark_group("rans");
    group.throughput(Throughput::Bytes(SYMBOLS as u64));
    group.sample_size(20);
    for (name, plane, above) in planes() {
        // BF16 base words whose exponent is the plane above: their base keys carry
        // what the plane above does.
        let base: Vec<u8> = above.iter().enumerate().flat_map(|(i, &a)| [i.to_le_bytes()[0], 0x3C + a]).collect();
        let keys = Contexts::BaseKeys { base: &base, word_bytes: 2, positions: None };
        // The same keys from F32 base words, whose vector kernel reads 32-bit words.
        let base32: Vec<u8> = base.chunks_exact(2).flat_map(|w| [0, 0, w[0], w[1]]).collect();
        let keys32 = Contexts::BaseKeys { base: &base32, word_bytes: 4, positions: None };
        let stored = rans::encode(FORM, &plane, Contexts::None);
        let with_context = rans::encode(FORM, &plane, Contexts::HigherPlane(&above));
        let with_keys = rans::encode(FORM, &plane, keys);
        let zstd3 = zstd::bulk::compress(&plane, 3).expect("zstd compresses");
        eprintln!(
            "{name}: rans {} bytes ({:.3} bits/symbol), with the plane above {} bytes, zstd -3 {} bytes",
            stored.len(),
            bits_per_symbol(stored.len()),
            with_context.len(),
            zstd3.len()
        );
        let mut out = Vec::new();
        group.bench_with_input(BenchmarkId::new("decode", name), &(), |b, ()| {
            b.iter(|| rans::decode_into(FORM, &stored, SYMBOLS, Contexts::None, &mut out).expect("decodes"));
        });
        group.bench_with_input(BenchmarkId::new("decode scalar", name), &(), |b, ()| {
            b.iter(|| rans::decode_into_scalar(FORM, &stored, SYMBOLS, Contexts::None, &mut out).expect("decodes"));
        });
        group.bench_with_input(BenchmarkId::new("decode plane above", name), &(), |b, ()| {
            b.iter(|| {
                rans::decode_into(FORM, &with_context, SYMBOLS, Contexts::HigherPlane(&above), &mut out)
                    .expect("decodes")
            });
        });
        group.bench_with_input(BenchmarkId::new("decode base keys", name), &(), |b, ()| {
            b.iter(|| rans::decode_into(FORM, &with_keys, SYMBOLS, keys, &mut out).expect("decodes"));
        });
        group.bench_with_input(BenchmarkId::new("decode base keys scalar", name), &(), |b, ()| {
            b.iter(|| rans::decode_into_scalar(FORM, &with_keys, SYMBOLS, keys, &mut out).expect("decodes"));
        });
        group.bench_with_input(BenchmarkId::new("decode base keys f32", name), &(), |b, ()| {
            b.iter(|| rans::decode_into(FORM, &with_keys, SYMBOLS, keys32, &mut out).expect("decodes"));
        });
        group.bench_with_input(BenchmarkId::new("zstd-3 decompress", name), &(), |b, ()| {
            b.iter(|| zstd::bulk::decompress(&zstd3, SYMBOLS).expect("decompresses"));
        });
        group.bench_with_input(BenchmarkId::new("encode", name), &(), |b, ()| {
            b.iter(|| rans::encode(FORM, &plane, Contexts::None));
        });
        group.bench_with_input(BenchmarkId::new("encode plane above", name), &(), |b, ()| {
            b.iter(|| rans::encode(FORM, &plane, Contexts::HigherPlane(&above)));
        });
        group.bench_with_input(BenchmarkId::new("zstd-3 compress", name), &(), |b, ()| {
            b.iter(|| zstd::bulk::compress(&plane, 3).expect("compresses"));
        });
    }
    group.finish();
}

#[allow(clippy::cast_precision_loss)]
fn bits_per_symbol(bytes: usize) -> f64 {
    bytes as f64 * 8.0 / SYMBOLS as f64
}

// The macro defines an undocumented public function.
#[allow(missing_docs)]
mod group {
    criterion::criterion_group!(benches, super::rans_against_zstd);
}
criterion_main!(group::benches);
