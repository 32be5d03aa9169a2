//! What the GPU benchmarks share: encoded tensors whose stored bytes sit in
//! page-locked memory, as a host-resident delta does; the seeded fp32 layer; and
//! median timings. Each example uses a part of it.
// Each example uses a part of this module; the samplers convert with `as` by design.
#![allow(dead_code, clippy::cast_possible_truncation, clippy::cast_precision_loss)]

use std::time::Instant;

use rayon::prelude::*;

use tpde_cuda::{cudarc::driver::PinnedHostSlice, EncodedTensor, Gpu, TensorRef};

/// The examples' error type.
pub type R<T> = Result<T, Box<dyn std::error::Error>>;

/// Every chunk's stored bytes of `enc`, back to back in page-locked memory.
pub fn pin_all(gpu: &Gpu, enc: &[EncodedTensor]) -> R<PinnedHostSlice<u8>> {
    let total: usize = enc.iter().map(EncodedTensor::stored_bytes).sum();
    // SAFETY: every byte is written below before any use.
    let mut host = unsafe { gpu.context().alloc_pinned_with_flags::<u8>(total.max(1), 0) }?;
    let dst = host.as_mut_slice()?;
    let mut at = 0;
    for c in enc.iter().flat_map(|t| &t.chunks) {
        dst[at..at + c.data.len()].copy_from_slice(&c.data);
        at += c.data.len();
    }
    Ok(host)
}

/// Views of `enc` whose stored bytes are read from `host` ([`pin_all`]).
pub fn hosted<'a>(enc: &'a [EncodedTensor], host: &'a [u8]) -> Vec<TensorRef<'a>> {
    let mut at = 0;
    enc.iter()
        .map(|t| {
            let mut r = t.as_ref();
            for c in &mut r.chunks {
                c.stored = &host[at..at + c.stored.len()];
                at += c.stored.len();
            }
            r.host = Some(host);
            r
        })
        .collect()
}

/// splitmix64: a seeded generator, one stream per chunk.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f32 {
        let (u, v) = (self.unit().max(1e-300), self.unit());
        ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
    }
}

/// fp32 base ~ N(0,1); target = base + 0.01 N(0,1) at a fraction `p` of the
/// elements (all when p >= 1), like the seed's synthetic layer.
pub fn layer(words: usize, p: f64, seed: u64) -> (Vec<u8>, Vec<u8>) {
    let mut base = vec![0u8; words * 4];
    let mut target = vec![0u8; words * 4];
    base.par_chunks_mut(1 << 20).zip(target.par_chunks_mut(1 << 20)).enumerate().for_each(|(c, (b, t))| {
        let mut r = Rng(seed ^ (c as u64).wrapping_mul(0x1234_5678_9ABC_DEF1));
        for (bw, tw) in b.chunks_exact_mut(4).zip(t.chunks_exact_mut(4)) {
            let x = r.normal();
            let y = if p >= 1.0 || r.unit() < p { x + 0.01 * r.normal() } else { x };
            bw.copy_from_slice(&x.to_le_bytes());
            tw.copy_from_slice(&y.to_le_bytes());
        }
    });
    (base, target)
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn time<F: FnMut() -> R<()>>(reps: usize, mut f: F) -> R<f64> {
    f()?; // warm-up
    let mut v = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        f()?;
        v.push(t.elapsed().as_secs_f64());
    }
    Ok(median(v))
}

/// As [`time`], with `reset` run untimed before every run: work done in place
/// needs its base back, since a delta applies to its base only (lane rANS
/// contexts read the base words).
pub fn time_after<G: FnMut() -> R<()>, F: FnMut() -> R<()>>(reps: usize, mut reset: G, mut f: F) -> R<f64> {
    reset()?;
    f()?; // warm-up
    let mut v = Vec::with_capacity(reps);
    for _ in 0..reps {
        reset()?;
        let t = Instant::now();
        f()?;
        v.push(t.elapsed().as_secs_f64());
    }
    Ok(median(v))
}
