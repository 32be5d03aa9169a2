//! The cost of checking target digests on the device (spec §10, on by
//! default, `LoaderConfig::verify_digests`): each API timed with the check on
//! and off, alternating, in the same run on the same card.
//!
//! `cargo build --release --example digest_cost -p tpde-cuda`, then on a GPU
//! machine: `digest_cost [--tensors N]`. Prints a markdown table.
#![allow(clippy::cast_possible_truncation, clippy::cast_precision_loss)]

use std::sync::Arc;
use std::time::Instant;

use rayon::prelude::*;
use tpde::EncodeSettings;
use tpde_cuda::{EncodedTensor, Gpu, Loader, LoaderConfig, TensorRef, WordWidth};

mod common;
use common::{hosted, pin_all, R};

/// One 4096 x 4096 F32 layer: base words from a seeded xorshift, the target
/// changed in a fraction `p` of the words (all when `p >= 1`) by a small
/// mantissa step, as a fine-tune changes weights.
fn layer(p: f64, seed: u64) -> (Vec<u8>, Vec<u8>) {
    let words = 4096 * 4096;
    let mut base = vec![0u8; words * 4];
    let mut target = vec![0u8; words * 4];
    base.par_chunks_mut(1 << 20).zip(target.par_chunks_mut(1 << 20)).enumerate().for_each(|(c, (b, t))| {
        let mut x = seed ^ (c as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        for (bw, tw) in b.chunks_exact_mut(4).zip(t.chunks_exact_mut(4)) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // a float in [-2, 2) with a random mantissa
            let v = f32::from_bits(0x3F80_0000 | (x as u32 & 0x007F_FFFF)) * if x >> 63 == 1 { -1.0 } else { 1.0 };
            let changed = p >= 1.0 || ((x >> 32) as u32 as f64) < p * f64::from(u32::MAX);
            let y = if changed { f32::from_bits(v.to_bits() ^ (1 + ((x >> 40) as u32 & 0xFF))) } else { v };
            bw.copy_from_slice(&v.to_le_bytes());
            tw.copy_from_slice(&y.to_le_bytes());
        }
    });
    (base, target)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Medians of `reps` alternating runs of `on` and `off` (after a warm-up).
fn paired(reps: usize, mut on: impl FnMut() -> R<()>, mut off: impl FnMut() -> R<()>) -> R<(f64, f64)> {
    on()?;
    off()?;
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        let t = Instant::now();
        on()?;
        a.push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        off()?;
        b.push(t.elapsed().as_secs_f64());
    }
    Ok((median(a), median(b)))
}

fn row(what: &str, on: f64, off: f64, bytes: usize) {
    println!(
        "| {what} | {:.3} ms | {:.3} ms | {:.2}x | {:.0} GB/s |",
        on * 1e3,
        off * 1e3,
        on / off,
        bytes as f64 / (on - off).max(1e-9) / 1e9
    );
}

fn main() -> R<()> {
    let args: Vec<String> = std::env::args().collect();
    let tensors: usize = args.iter().position(|a| a == "--tensors").map_or(16, |i| args[i + 1].parse().unwrap());
    let gpu = Arc::new(Gpu::new(0)?);
    println!("device: {}  (cpu threads: {})\n", gpu.name(), rayon::current_num_threads());
    let cfg = |verify_digests| LoaderConfig { verify_digests, ..LoaderConfig::default() };
    let mut on = Loader::new(gpu.clone(), cfg(true))?;
    let mut off = Loader::new(gpu.clone(), cfg(false))?;
    println!("| measurement | digests on | digests off | on / off | hashing rate |\n|---|---|---|---|---|");
    for (what, p) in [("sparse 10%", 0.1), ("dense", 1.0)] {
        let (base, target) = layer(p, 7);
        let enc =
            EncodedTensor::encode("w", Some(&base), &target, WordWidth::W4, 1 << 20, true, EncodeSettings::default())?;
        let pinned = pin_all(&gpu, std::slice::from_ref(&enc))?;
        let refs = hosted(std::slice::from_ref(&enc), pinned.as_slice()?);
        let t = &refs[0];
        let dbase = gpu.upload(&base)?;
        let mut out = gpu.alloc_zeros::<u8>(t.bytes())?;
        let mut out2 = gpu.alloc_zeros::<u8>(t.bytes())?;
        let (a, b) = paired(
            20,
            || Ok(on.materialize_into(t, &dbase, &mut out)?),
            || Ok(off.materialize_into(t, &dbase, &mut out2)?),
        )?;
        assert!(gpu.download(&out)? == target && gpu.download(&out2)? == target);
        row(&format!("materialize_into, 64 MiB F32 layer, {what}"), a, b, t.bytes());
        let staged = on.stage_on_device(&refs)?;
        let mut outs = vec![gpu.alloc_zeros::<u8>(t.bytes())?];
        let mut outs2 = vec![gpu.alloc_zeros::<u8>(t.bytes())?];
        let (a, b) = paired(
            20,
            || Ok(on.apply_staged(&staged, &[&dbase], &mut outs)?),
            || Ok(off.apply_staged(&staged, &[&dbase], &mut outs2)?),
        )?;
        row(&format!("apply_staged (kernels only), {what}"), a, b, t.bytes());
    }
    // A whole delta: `tensors` layers, 10% of words changed, bases resident.
    let layers: Vec<(Vec<u8>, Vec<u8>)> = (0..tensors).map(|i| layer(0.1, 100 + i as u64)).collect();
    let enc = layers
        .iter()
        .enumerate()
        .map(|(i, (b, t))| {
            EncodedTensor::encode(&format!("w{i}"), Some(b), t, WordWidth::W4, 1 << 20, true, EncodeSettings::default())
        })
        .collect::<Result<Vec<_>, _>>()?;
    let pinned = pin_all(&gpu, &enc)?;
    let refs = hosted(&enc, pinned.as_slice()?);
    let dbases = layers.iter().map(|(b, _)| gpu.upload(b)).collect::<Result<Vec<_>, _>>()?;
    let dref: Vec<_> = dbases.iter().collect();
    let total: usize = refs.iter().map(TensorRef::bytes).sum();
    let (a, b) = paired(5, || Ok(on.load(&refs, &dref).map(drop)?), || Ok(off.load(&refs, &dref).map(drop)?))?;
    row(&format!("load, {tensors} layers ({} MiB), sparse 10%", total >> 20), a, b, total);
    Ok(())
}
