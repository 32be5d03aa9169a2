//! Lane rANS (codec 4, spec §8.9, as the writer emits it; codec 2, §8.7,
//! with `--codec2`) on the GPU, each figure against a baseline measured in
//! the same run on the same card:
//!
//! 1. decoding alone, in decoded bytes per second, over a large batch of
//!    streams: a delta staged on the device whose streams all decode at each
//!    apply (every plane's context is the base key), timed against the same
//!    chunks with their planes stored; the difference is the decoding;
//! 2. `materialize_into` of the seed's layer (4096 × 4096 fp32, 5% changed)
//!    from a page-locked delta whose streams are lane rANS, against a pinned
//!    upload of the same dense layer.
//!
//! `cargo build --release --example rans_bench -p tpde-cuda`, then on a GPU
//! machine: `rans_bench [--quick] [--codec2]`. Prints a markdown table.
#![allow(clippy::cast_possible_truncation, clippy::cast_precision_loss, clippy::cast_sign_loss)]

use std::sync::Arc;
use std::time::Instant;

use rayon::prelude::*;
use tpde::format::{
    positions,
    rans::{encode, Contexts, TableForm},
    ChunkRecord, Codec, EncodedChunk, Encoding, PositionCoding, StreamRecord, ValueLayout, ValueOp, ValueOrder,
};
use tpde_cuda::{cudarc::driver::result as cu, DevRange, EncodedTensor, Gpu, Loader, LoaderConfig, WordWidth};

mod common;
use common::{hosted, layer, pin_all, time, R};

/// How the streams of a chunk are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Streams {
    /// As they are (codec 0).
    Stored,
    /// Lane rANS; every value plane's context is the base key.
    BaseKeys,
    /// Lane rANS; the top value plane's context is the base key, each lower
    /// plane's the plane above; gap planes chained the same way.
    Chained,
}

/// One fp32 chunk, sparse with gaps (`sparse`) or dense, xor values in
/// rotated byte planes, its streams stored as `how` says, lane rANS tables
/// in `form`.
fn chunk(base: &[u8], target: &[u8], sparse: bool, how: Streams, form: TableForm) -> EncodedChunk {
    let n = target.len() / 4;
    let word = |b: &[u8], i: usize| u32::from_le_bytes(b[4 * i..4 * i + 4].try_into().unwrap());
    let changed: Vec<u32> = (0..n).filter(|&i| word(base, i) != word(target, i)).map(|i| i as u32).collect();
    let at: Vec<usize> = if sparse { changed.iter().map(|&i| i as usize).collect() } else { (0..n).collect() };
    let values: Vec<u32> = at.iter().map(|&i| (word(base, i) ^ word(target, i)).rotate_left(1)).collect();
    let gw = if sparse { positions::gap_width(&changed) } else { 0 };
    let mut raw = if sparse { positions::encode_gaps(&changed, gw) } else { Vec::new() };
    let np = raw.len();
    raw.extend((0..4).map(|k| values.iter().map(|v| v.to_le_bytes()[k]).collect::<Vec<u8>>()));
    let keyed = (sparse).then_some(changed.as_slice());
    let mut streams = Vec::new();
    let mut data = Vec::new();
    for (q, s) in raw.iter().enumerate() {
        let top = q + 1 == np || q + 1 == raw.len();
        let contexts = match how {
            Streams::Stored => None,
            _ if q < np => Some(if top { Contexts::None } else { Contexts::HigherPlane(&raw[q + 1]) }),
            Streams::BaseKeys => Some(Contexts::BaseKeys { base, word_bytes: 4, positions: keyed }),
            Streams::Chained if top => Some(Contexts::BaseKeys { base, word_bytes: 4, positions: keyed }),
            Streams::Chained => Some(Contexts::HigherPlane(&raw[q + 1])),
        };
        let (codec, bytes) = match contexts {
            Some(c) => (form.codec(), encode(form, s, c)),
            None => (Codec::Stored, s.clone()),
        };
        streams.push(StreamRecord { stored_len: bytes.len() as u32, decoded_len: s.len() as u32, codec });
        data.extend_from_slice(&bytes);
    }
    let record = ChunkRecord {
        data_offset: 0,
        stored_len: data.len() as u32,
        changed_count: changed.len() as u32,
        first_stream: 0,
        encoding: if sparse { Encoding::Sparse } else { Encoding::Dense },
        value_op: ValueOp::Xor,
        value_layout: ValueLayout::RotatedBytePlanes,
        position_coding: if sparse { PositionCoding::Gaps } else { PositionCoding::None },
        gap_width: gw,
        stream_count: streams.len() as u8,
        value_order: ValueOrder::Positional,
        checksum: tpde::format::checksum64(&data),
        digest: tpde::format::leaf_digest(target),
    };
    EncodedChunk { record, streams, data }
}

/// The options of a run that shape its tensors.
#[derive(Clone, Copy)]
struct Coding {
    sparse: bool,
    how: Streams,
    form: TableForm,
}

fn tensor(name: &str, base: &[u8], target: &[u8], chunk_words: usize, coding: Coding) -> EncodedTensor {
    let cb = chunk_words * 4;
    let Coding { sparse, how, form } = coding;
    let chunks = base.par_chunks(cb).zip(target.par_chunks(cb)).map(|(b, t)| chunk(b, t, sparse, how, form)).collect();
    EncodedTensor {
        name: name.into(),
        width: WordWidth::W4,
        words: (target.len() / 4) as u64,
        chunk_words: chunk_words as u32,
        chunks,
    }
}

fn row(what: &str, secs: f64, bytes: usize, note: &str) {
    println!("| {what} | {:.3} ms | {:.1} GB/s | {note} |", secs * 1e3, bytes as f64 / secs / 1e9);
}

/// Decoded bytes of the lane rANS streams of `t`.
fn rans_decoded_bytes(t: &EncodedTensor) -> usize {
    t.chunks.iter().flat_map(|c| &c.streams).filter(|s| s.codec.is_rans()).map(|s| s.decoded_len as usize).sum()
}

fn main() -> R<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let form = if std::env::args().any(|a| a == "--codec2") { TableForm::Bytes } else { TableForm::Packed };
    let coded = |sparse, how| Coding { sparse, how, form };
    let gpu = Arc::new(Gpu::new(0)?);
    println!("device: {}  (cpu threads: {})\n", gpu.name(), rayon::current_num_threads());
    for (k, regs, blocks) in gpu.kernel_occupancy()? {
        println!("kernel {k}: {regs} registers, {blocks} blocks per SM (no dynamic shared memory)");
    }
    println!("\n| measurement | time (median) | rate | note |\n|---|---|---|---|");
    let cfg = LoaderConfig { slots: 4, slot_bytes: 32 << 20, max_chunks: 4096, ..LoaderConfig::default() };

    // (1) decoding alone: dense fp32 tensors, 2^20 words per chunk, every
    // plane decoded at each staged apply (context 1), against stored planes.
    let (tensors, words) = if quick { (2, 16 << 20) } else { (4, 64 << 20) };
    let mut rans = Vec::new();
    let mut stored = Vec::new();
    let mut bases = Vec::new();
    let mut targets = Vec::new();
    let t0 = Instant::now();
    for i in 0..tensors {
        let (b, t) = layer(words, 1.0, 900 + i as u64);
        rans.push(tensor(&format!("r{i}"), &b, &t, 1 << 20, coded(false, Streams::BaseKeys)));
        stored.push(tensor(&format!("s{i}"), &b, &t, 1 << 20, coded(false, Streams::Stored)));
        bases.push(b);
        targets.push(t);
    }
    let decoded: usize = rans.iter().map(rans_decoded_bytes).sum();
    let rans_stored: usize = rans.iter().map(EncodedTensor::stored_bytes).sum();
    println!(
        "\n({tensors} dense fp32 tensors of {} Mi words: {:.1} MB of planes in {:.1} MB of lane rANS ({form:?} tables), encoded in {:.1} s)\n",
        words >> 20,
        decoded as f64 / 1e6,
        rans_stored as f64 / 1e6,
        t0.elapsed().as_secs_f64()
    );
    let mut l = Loader::new(gpu.clone(), cfg)?;
    let dbases: Vec<_> = bases.iter().map(|b| gpu.upload(b)).collect::<Result<_, _>>()?;
    let dref: Vec<_> = dbases.iter().collect();
    let mut outs: Vec<_> = targets.iter().map(|t| gpu.alloc_zeros::<u8>(t.len())).collect::<Result<_, _>>()?;
    let total: usize = targets.iter().map(Vec::len).sum();
    let staged_rans = l.stage_on_device(&rans.iter().map(EncodedTensor::as_ref).collect::<Vec<_>>())?;
    let staged_stored = l.stage_on_device(&stored.iter().map(EncodedTensor::as_ref).collect::<Vec<_>>())?;
    l.apply_staged(&staged_rans, &dref, &mut outs)?;
    assert!(gpu.download(&outs[0])? == targets[0], "lane rANS staged apply is not bit-exact");
    let with = time(10, || Ok(l.apply_staged(&staged_rans, &dref, &mut outs)?))?;
    let without = time(10, || Ok(l.apply_staged(&staged_stored, &dref, &mut outs)?))?;
    row("decode: staged apply, every plane lane rANS (decoded each apply)", with, total, "target bytes/s");
    row("decode: staged apply, the same planes stored (baseline)", without, total, "target bytes/s");
    let decode = (with - without).max(1e-9);
    row(
        "decode: lane rANS decoding alone (difference)",
        decode,
        decoded,
        &format!(
            "decoded bytes/s; parse + decode launches; {} streams",
            rans.iter().map(|t| t.chunks.len() * 4).sum::<usize>()
        ),
    );
    drop((staged_rans, staged_stored, outs, dbases));

    // (2) the seed's layer: 4096 x 4096 fp32, 5% changed
    let words = 4096 * 4096;
    let (base, target) = layer(words, 0.05, 1);
    let lb = words * 4;
    {
        let ctx = gpu.context();
        // SAFETY: written below before any use.
        let mut host = unsafe { ctx.alloc_pinned_with_flags::<u8>(lb, 0) }?;
        host.as_mut_slice()?.copy_from_slice(&target);
        let dev = gpu.alloc_zeros::<u8>(lb)?;
        let s = gpu.stream().clone();
        let d = DevRange::all(&dev, &s)?;
        let src = host.as_slice()?;
        let up = time(20, || {
            // SAFETY: `d` is the whole device buffer and `src` as long; the
            // host buffer is not written while the copy runs (we wait).
            unsafe { cu::memcpy_htod_async(d.ptr(), src, s.cu_stream()) }?;
            s.synchronize()?;
            Ok(())
        })?;
        row("layer: pinned upload of the dense fp32 layer (baseline)", up, lb, "64 MiB, page-locked");
        let dbase = gpu.upload(&base)?;
        let mut out = gpu.alloc_zeros::<u8>(lb)?;
        for (how, cw) in [(Streams::Chained, 1 << 18), (Streams::Chained, 1 << 20), (Streams::BaseKeys, 1 << 20)] {
            let t = tensor("w", &base, &target, cw, coded(true, how));
            let enc = [t];
            let pinned = pin_all(&gpu, &enc)?;
            let refs = hosted(&enc, pinned.as_slice()?);
            let mut l = Loader::new(gpu.clone(), cfg)?;
            l.materialize_into(&refs[0], &dbase, &mut out)?;
            assert!(gpu.download(&out)? == target, "materialize is not bit-exact");
            let m = time(20, || Ok(l.materialize_into(&refs[0], &dbase, &mut out)?))?;
            let note = format!(
                "{how:?}, chunk {} Ki words, delta {:.2} MB; ratio to dense upload {:.3}",
                cw >> 10,
                enc[0].stored_bytes() as f64 / 1e6,
                m / up
            );
            row("layer: materialize_into, lane rANS streams (pinned host delta)", m, lb, &note);
        }
    }
    Ok(())
}
