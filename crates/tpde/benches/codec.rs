//! Chunk codec throughput: encoding and decoding one chunk of BF16 words against its
//! base, for a sparse (RL-step) and a dense (fine-tune) change, in bytes of target
//! per second. Run with `cargo bench -p tpde --bench codec`.

use criterion::{criterion_main, BenchmarkId, Criterion, Throughput};
use tpde::{
    format::{decode_chunk, encode_chunk, ChunkInput},
    EncodeSettings, WordWidth,
};

const WORDS: usize = 1 << 20;

/// BF16 weights around 0.02 and a target that moves `every`-th word by a few units
/// in the last place (xorshift noise; deterministic).
fn pair(every: usize) -> (Vec<u8>, Vec<u8>) {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut base = Vec::with_capacity(WORDS * 2);
    let mut target = Vec::with_capacity(WORDS * 2);
    for i in 0..WORDS {
        let r = next();
        // Exponents near 0.02 (0x3c..0x3d), random sign and mantissa.
        let word = 0x3c00u16 | ((r & 0x1ff) as u16) | (((r >> 9) & 1) as u16) << 15;
        let step = if i % every == 0 { ((r >> 16) % 7) as u16 + 1 } else { 0 };
        base.extend_from_slice(&word.to_le_bytes());
        target.extend_from_slice(&word.wrapping_add(step).to_le_bytes());
    }
    (base, target)
}

fn codec(c: &mut Criterion) {
    let mut group = c.benchmark_group("bf16 chunk");
    group.throughput(Throughput::Bytes((WORDS * 2) as u64));
    for (name, every) in [("sparse 1%", 100), ("dense", 1)] {
        let (base, target) = pair(every);
        let settings = EncodeSettings::default();
        group.bench_with_input(BenchmarkId::new("encode", name), &(), |b, ()| {
            b.iter(|| encode_chunk(&target, Some(&base), WordWidth::W2, true, settings).expect("encodes"));
        });
        let chunk = encode_chunk(&target, Some(&base), WordWidth::W2, true, settings).expect("encodes");
        let mut out = Vec::new();
        group.bench_with_input(BenchmarkId::new("decode", name), &(), |b, ()| {
            b.iter(|| {
                let input = ChunkInput {
                    record: &chunk.record,
                    streams: &chunk.streams,
                    stored: &chunk.data,
                    base: Some(&base),
                    words: WORDS,
                    width: WordWidth::W2,
                    reference: None,
                };
                decode_chunk(&input, &mut out).expect("decodes");
            });
        });
    }
    group.finish();
}

// The macro defines an undocumented public function.
#[allow(missing_docs)]
mod group {
    criterion::criterion_group!(benches, super::codec);
}
criterion_main!(group::benches);
