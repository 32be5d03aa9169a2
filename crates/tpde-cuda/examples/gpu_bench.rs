//! GPU benchmark: materialize, whole-delta load and resident apply, each
//! against a baseline measured in the same run on the same card.
//!
//! `cargo build --release --example gpu_bench -p tpde-cuda`, then on a GPU
//! machine: `gpu_bench [--gib N] [--quick] [--profile]`. Prints a markdown
//! table. With `--profile`, one more call each of the whole load, the sparse
//! resident apply in place and the dense one runs between `cuProfilerStart`
//! and `cuProfilerStop`, for `ncu --profile-from-start off`.
#![allow(clippy::cast_possible_truncation, clippy::cast_precision_loss, clippy::cast_sign_loss)]

use std::sync::Arc;
use std::time::Instant;

use rayon::prelude::*;
use tpde::EncodeSettings;
use tpde_cuda::{
    cudarc::driver::{profiler_start, profiler_stop, result as cu},
    DevRange, EncodedTensor, Gpu, Loader, LoaderConfig, PinnedDelta, TensorRef, WordWidth,
};

mod common;
use common::{hosted, layer, pin_all, time, time_after, R};

struct Table(Vec<String>);
impl Table {
    fn row(&mut self, what: &str, secs: f64, bytes: usize, note: &str) {
        let line = format!("| {what} | {:.3} ms | {:.1} GB/s | {note} |", secs * 1e3, bytes as f64 / secs / 1e9);
        println!("{line}");
        self.0.push(line);
    }
}

/// Pinned (page-locked, plain) upload of `bytes` host bytes, `reps` median.
fn pinned_upload(gpu: &Gpu, bytes: usize, times: usize, reps: usize) -> R<f64> {
    let ctx = gpu.context();
    // SAFETY: the bytes are written below before any use.
    let mut host = unsafe { ctx.alloc_pinned_with_flags::<u8>(bytes, 0) }?;
    host.as_mut_slice()?.par_chunks_mut(1 << 20).for_each(|c| c.fill(0x5A));
    let dev = gpu.alloc_zeros::<u8>(bytes)?;
    let s = gpu.stream().clone();
    let d = DevRange::all(&dev, &s)?;
    let src = host.as_slice()?;
    time(reps, || {
        for _ in 0..times {
            // SAFETY: `d` is the whole device buffer and `src` as long; the
            // host buffer is not written while the copy runs (we wait).
            unsafe { cu::memcpy_htod_async(d.ptr(), src, s.cu_stream()) }?;
        }
        s.synchronize()?;
        Ok(())
    })
}

/// A one-tensor safetensors file named "w", shape [4096, 4096], holding the
/// fp32 layer (F32: the library's writer lists its values grouped by base
/// key, spec §8.6).
fn write_safetensors(path: &std::path::Path, bytes: &[u8]) -> R<()> {
    let mut header =
        format!("{{\"w\":{{\"dtype\":\"F32\",\"shape\":[4096,4096],\"data_offsets\":[0,{}]}}}}", bytes.len());
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(bytes);
    std::fs::write(path, out)?;
    Ok(())
}

fn main() -> R<()> {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let profile = args.iter().any(|a| a == "--profile");
    // One more call of `f`, inside the profiler's range.
    let profiled = |f: &mut dyn FnMut() -> R<()>| -> R<()> {
        if profile {
            profiler_start()?;
            f()?;
            profiler_stop()?;
        }
        Ok(())
    };
    let gib: usize =
        args.iter().position(|a| a == "--gib").map_or(if quick { 1 } else { 2 }, |i| args[i + 1].parse().unwrap_or(2));
    let gpu = Arc::new(Gpu::new(0)?);
    println!("device: {}  (cpu threads: {})\n", gpu.name(), rayon::current_num_threads());
    for (k, regs, blocks) in gpu.kernel_occupancy()? {
        println!("kernel {k}: {regs} registers, {blocks} blocks of 256 per SM");
    }
    let mut table = Table(Vec::new());
    println!("| measurement | time (median) | rate (target bytes/s) | note |\n|---|---|---|---|");

    // (1) the seed's layer: 4096x4096 fp32, 5% changed
    let words = 4096 * 4096;
    let (base, target) = layer(words, 0.05, 1);
    let lb = words * 4;
    let dense_up = pinned_upload(&gpu, lb, 1, 20)?;
    table.row("layer: pinned upload of the dense fp32 layer (baseline)", dense_up, lb, "64 MiB, page-locked");
    let dbase = gpu.upload(&base)?;
    // Deltas written by the format library (its CLI's path), read into
    // page-locked memory once: the serving case of a host-resident delta.
    let dir = std::env::temp_dir().join("tpde-gpu-bench");
    std::fs::create_dir_all(&dir)?;
    write_safetensors(&dir.join("b.safetensors"), &base)?;
    write_safetensors(&dir.join("t.safetensors"), &target)?;
    let bc = tpde::Checkpoint::open(&dir.join("b.safetensors"))?;
    let tc = tpde::Checkpoint::open(&dir.join("t.safetensors"))?;
    let mut best = (f64::INFINITY, String::new());
    for cw in [1u64 << 18, 1 << 20] {
        for gain in [0.0, 0.25, 0.5, 0.75, 1.0] {
            let path = dir.join(format!("d{cw}-{gain}.tpde"));
            let opts = tpde::EncodeOptions {
                chunk_words: cw,
                settings: EncodeSettings { min_zstd_gain: gain, ..EncodeSettings::default() },
            };
            tpde::encode(Some(&bc), &tc, &path, opts, &tpde::NoProgress)?;
            let pinned = PinnedDelta::open(&gpu, &path)?;
            let refs = pinned.tensor_refs(true)?;
            let tr = &refs[0];
            let share = |of_codec: fn(&tpde::format::Codec) -> bool| {
                tr.chunks
                    .iter()
                    .flat_map(|c| c.streams)
                    .filter(|s| of_codec(&s.codec))
                    .map(|s| s.decoded_len as usize)
                    .sum::<usize>() as f64
                    / tr.chunks.iter().flat_map(|c| c.streams).map(|s| s.decoded_len as usize).sum::<usize>().max(1)
                        as f64
            };
            let zstd_share = share(|c| *c == tpde::format::Codec::Zstd);
            // codec 2 or 4
            let rans_share = share(|c| c.is_rans());
            let grouped =
                tr.chunks.iter().filter(|c| c.record.value_order == tpde::format::ValueOrder::GroupedByBase).count();
            let what = format!(
                "chunk {}Ki words, min_zstd_gain {gain}: delta {:.2} MB, {:.0}% of stream bytes zstd, {:.0}% lane rANS, {grouped}/{} chunks grouped",
                cw >> 10,
                pinned.file().file_len() as f64 / 1e6,
                100.0 * zstd_share,
                100.0 * rans_share,
                tr.chunks.len()
            );
            println!("\n{what}");
            for (slots, slot) in [(4usize, 4usize << 20), (2, 16 << 20)] {
                let mut l = Loader::new(
                    gpu.clone(),
                    LoaderConfig { slots, slot_bytes: slot, max_chunks: 4096, ..LoaderConfig::default() },
                )?;
                let mut out = gpu.alloc_zeros::<u8>(lb)?;
                l.materialize_into(tr, &dbase, &mut out)?;
                assert!(gpu.download(&out)? == target, "materialize is not bit-exact");
                let m_into = time(20, || Ok(l.materialize_into(tr, &dbase, &mut out)?))?;
                let note = |t: f64| {
                    format!("{what}; {slots} slots of {} KiB; ratio to dense upload {:.3}", slot >> 10, t / dense_up)
                };
                table.row("layer: materialize_into (pinned host delta → new buffer)", m_into, lb, &note(m_into));
                let buf = std::cell::RefCell::new(gpu.upload(&base)?);
                let m_in = time_after(
                    20,
                    || {
                        gpu.stream().memcpy_dtod(&dbase, &mut *buf.borrow_mut())?;
                        Ok(gpu.stream().synchronize()?)
                    },
                    || Ok(l.materialize_in_place(tr, &mut buf.borrow_mut())?),
                )?;
                table.row("layer: materialize_in_place (pinned host delta, resident base copy)", m_in, lb, &note(m_in));
                for (t, how) in [(m_into, "materialize_into"), (m_in, "materialize_in_place")] {
                    if t < best.0 {
                        best = (t, format!("{how}, {}", note(t)));
                    }
                }
            }
            // the same file through its memory map (pageable)
            let file = tpde::DeltaFile::open(&path)?;
            let mrefs = tpde_cuda::tensor_refs(&file, true)?;
            let mut l = Loader::new(
                gpu.clone(),
                LoaderConfig { slots: 4, slot_bytes: 4 << 20, max_chunks: 4096, ..LoaderConfig::default() },
            )?;
            let mut out = gpu.alloc_zeros::<u8>(lb)?;
            l.materialize_into(&mrefs[0], &dbase, &mut out)?;
            assert!(gpu.download(&out)? == target, "mapped materialize is not bit-exact");
            let m_map = time(20, || Ok(l.materialize_into(&mrefs[0], &dbase, &mut out)?))?;
            table.row(
                "layer: materialize_into (memory-mapped delta, staged through the ring)",
                m_map,
                lb,
                &format!("{what}; ratio to dense upload {:.3}", m_map / dense_up),
            );
            // CPU decode of the zstd streams alone, for the breakdown
            let dec = time(20, || {
                tr.chunks
                    .par_iter()
                    .flat_map(|c| c.streams.par_iter().zip(c.stored_streams().collect::<Vec<_>>()))
                    .filter(|(r, _)| r.codec == tpde::format::Codec::Zstd)
                    .try_for_each(|(r, b)| {
                        let mut v = vec![0u8; r.decoded_len as usize];
                        tpde_cuda::decode_stream(r, b, &mut v)
                    })?;
                Ok(())
            })?;
            table.row("layer:   of which: zstd decode alone (CPU, rayon)", dec, lb, &what);
            let staged = l.stage_on_device(std::slice::from_ref(tr))?;
            let mut outs = vec![gpu.alloc_zeros::<u8>(lb)?];
            let k_into = time(20, || Ok(l.apply_staged(&staged, &[&dbase], &mut outs)?))?;
            table.row("layer:   kernels only (streams resident, into new buffer)", k_into, lb, &what);
            // each run starts from the base again: the base-key contexts read it
            let bufs = std::cell::RefCell::new(vec![gpu.upload(&base)?]);
            let k_in = time_after(
                20,
                || {
                    gpu.stream().memcpy_dtod(&dbase, &mut bufs.borrow_mut()[0])?;
                    Ok(gpu.stream().synchronize()?)
                },
                || Ok(l.apply_staged_in_place(&staged, &mut bufs.borrow_mut())?),
            )?;
            table.row("layer:   kernels only (streams resident, in place)", k_in, lb, &what);
        }
    }
    println!("\nbest materialize: {:.3} ms ({})\n", best.0 * 1e3, best.1);

    // (2) whole delta, >= 2 GB target, base resident on the GPU
    let tensor_words = 64 << 20; // 256 MiB of fp32
    let ntensors = gib * 4;
    let mut bases = Vec::new();
    let mut targets = Vec::new();
    let mut enc = Vec::new();
    let t0 = Instant::now();
    for i in 0..ntensors {
        let (b, t) = layer(tensor_words, 0.05, 100 + i as u64);
        enc.push(EncodedTensor::encode(
            &format!("t{i}"),
            Some(&b),
            &t,
            WordWidth::W4,
            1 << 20,
            true, // fp32: values grouped by base key, as the writer does for floats
            EncodeSettings::default(),
        )?);
        bases.push(b);
        targets.push(t);
    }
    let total = ntensors * tensor_words * 4;
    let stored: usize = enc.iter().map(EncodedTensor::stored_bytes).sum();
    println!(
        "\n(generated {ntensors} x 256 MiB fp32 tensors, 5% changed, delta {:.1} MB, in {:.1} s)\n",
        stored as f64 / 1e6,
        t0.elapsed().as_secs_f64()
    );
    // the host-resident delta, held in page-locked memory (as PinnedDelta
    // holds a file)
    let pinned = pin_all(&gpu, &enc)?;
    let refs = hosted(&enc, pinned.as_slice()?);
    let mapped: Vec<TensorRef<'_>> = enc.iter().map(EncodedTensor::as_ref).collect();
    let up = pinned_upload(&gpu, tensor_words * 4, ntensors, 3)?;
    table.row(
        "whole: pinned dense upload of the target bytes (baseline = bus)",
        up,
        total,
        "256 MiB page-locked buffer, copied N times",
    );
    let dbases: Vec<_> = bases.iter().map(|b| gpu.upload(b)).collect::<Result<_, _>>()?;
    let dref: Vec<_> = dbases.iter().collect();
    let mut l = Loader::new(gpu.clone(), LoaderConfig::default())?;
    let outs = l.load(&refs, &dref)?;
    for (o, t) in outs.iter().zip(&targets).take(2) {
        assert!(gpu.download(o)? == *t, "load is not bit-exact");
    }
    drop(outs);
    // The default ring, then the earlier default, for the trade-off of slot sizes.
    let earlier = LoaderConfig { slots: 8, slot_bytes: 32 << 20, ..LoaderConfig::default() };
    let mut small_slots = Loader::new(gpu.clone(), earlier)?;
    for (loader, what) in [
        (&mut l, "whole: load (pinned host delta → new buffers, resident base)"),
        (&mut small_slots, "whole: the same load, 8 slots of 32 MiB"),
    ] {
        let t = time(7, || {
            loader.load(&refs, &dref)?;
            Ok(())
        })?;
        table.row(what, t, total, &format!("ratio to pinned upload rate {:.2}", up / t));
    }
    drop(small_slots);
    profiled(&mut || {
        l.load(&refs, &dref)?;
        Ok(())
    })?;
    let tm = time(3, || {
        l.load(&mapped, &dref)?;
        Ok(())
    })?;
    table.row(
        "whole: load (pageable host delta, staged through the ring)",
        tm,
        total,
        &format!("ratio to pinned upload rate {:.2}", up / tm),
    );
    {
        // the same tensors written with min_zstd_gain 0.75: mostly stored streams
        let s = EncodeSettings { min_zstd_gain: 0.75, ..EncodeSettings::default() };
        let enc75 = bases
            .iter()
            .zip(&targets)
            .enumerate()
            .map(|(i, (b, t))| EncodedTensor::encode(&format!("t{i}"), Some(b), t, WordWidth::W4, 1 << 20, true, s))
            .collect::<Result<Vec<_>, _>>()?;
        let pinned75 = pin_all(&gpu, &enc75)?;
        let refs75 = hosted(&enc75, pinned75.as_slice()?);
        let outs = l.load(&refs75, &dref)?;
        assert!(gpu.download(&outs[0])? == targets[0], "load is not bit-exact");
        drop(outs);
        let t75 = time(3, || {
            l.load(&refs75, &dref)?;
            Ok(())
        })?;
        let stored75: usize = enc75.iter().map(EncodedTensor::stored_bytes).sum();
        table.row(
            "whole: load (pinned host delta written with min_zstd_gain 0.75)",
            t75,
            total,
            &format!("delta {:.1} MB; ratio to pinned upload rate {:.2}", stored75 as f64 / 1e6, up / t75),
        );
    }
    let bufs: Vec<_> = bases.iter().map(|b| gpu.upload(b)).collect::<Result<_, _>>()?;
    let restore = |bufs: &mut Vec<_>| -> R<()> {
        for (buf, base) in bufs.iter_mut().zip(&dbases) {
            gpu.stream().memcpy_dtod(base, buf)?;
        }
        Ok(gpu.stream().synchronize()?)
    };
    let bufs = std::cell::RefCell::new(bufs);
    let ti =
        time_after(3, || restore(&mut bufs.borrow_mut()), || Ok(l.apply_in_place(&refs, &mut bufs.borrow_mut())?))?;
    table.row(
        "whole: apply_in_place (pinned host delta, resident base copy)",
        ti,
        total,
        &format!("ratio to pinned upload rate {:.2}", up / ti),
    );
    let host_bases: Vec<&[u8]> = bases.iter().map(Vec::as_slice).collect();
    let th = time(2, || {
        l.load_host_base(&refs, &host_bases)?;
        Ok(())
    })?;
    table.row(
        "whole: load with a host-resident base (reported separately)",
        th,
        total,
        &format!("ratio to pinned upload rate {:.2}", up / th),
    );

    // (3) resident apply (streams decoded on the device) vs cuMemcpyDtoD
    let staged = l.stage_on_device(&refs)?;
    let mut outs: Vec<_> = (0..ntensors).map(|_| gpu.alloc_zeros::<u8>(tensor_words * 4)).collect::<Result<_, _>>()?;
    l.apply_staged(&staged, &dref, &mut outs)?;
    assert!(gpu.download(&outs[0])? == targets[0], "staged apply is not bit-exact");
    let s = gpu.stream().clone();
    let dtod = time(5, || {
        for (b, o) in dbases.iter().zip(&outs) {
            let (b, o) = (DevRange::all(b, &s)?, DevRange::all(o, &s)?);
            // SAFETY: distinct live buffers of the same size.
            unsafe { cu::memcpy_dtod_async(o.ptr(), b.ptr(), b.len(), s.cu_stream()) }?;
        }
        s.synchronize()?;
        Ok(())
    })?;
    table.row("resident: cuMemcpyDtoD of the target bytes (baseline)", dtod, total, "");
    let ta = time(5, || Ok(l.apply_staged(&staged, &dref, &mut outs)?))?;
    table.row(
        "resident: apply, sparse 5%, into new buffers (copy + scatter)",
        ta,
        total,
        &format!("{:.0}% of DtoD; streams coded against the base decoded at each apply", 100.0 * dtod / ta),
    );
    let tai = time_after(
        5,
        || restore(&mut bufs.borrow_mut()),
        || Ok(l.apply_staged_in_place(&staged, &mut bufs.borrow_mut())?),
    )?;
    profiled(&mut || {
        restore(&mut bufs.borrow_mut())?;
        Ok(l.apply_staged_in_place(&staged, &mut bufs.borrow_mut())?)
    })?;
    table.row(
        "resident: apply, sparse 5%, in place",
        tai,
        total,
        &format!("{:.0}% of DtoD; streams coded against the base decoded at each apply", 100.0 * dtod / tai),
    );
    let bound = l.stage_for_base(&refs, &dref)?;
    let tbi = time_after(
        5,
        || restore(&mut bufs.borrow_mut()),
        || Ok(l.apply_staged_in_place(&bound, &mut bufs.borrow_mut())?),
    )?;
    assert!(gpu.download(&bufs.borrow()[0])? == targets[0], "apply of a delta staged for its base is not bit-exact");
    table.row(
        "resident: apply, sparse 5%, in place, staged for its base",
        tbi,
        total,
        &format!("{:.0}% of DtoD; every stream decoded once", 100.0 * dtod / tbi),
    );
    drop(bound);
    drop((staged, outs, bufs));
    drop(refs);
    drop((dbases, enc));

    // dense deltas (every element changed, a fine-tune): 1/2 of the size
    let dn = (ntensors / 2).max(1);
    let mut dbs = Vec::new();
    let mut dts = Vec::new();
    let mut denc = Vec::new();
    for i in 0..dn {
        let (b, t) = layer(tensor_words, 1.0, 500 + i as u64);
        denc.push(EncodedTensor::encode(
            &format!("d{i}"),
            Some(&b),
            &t,
            WordWidth::W4,
            1 << 20,
            true, // fp32: values grouped by base key, as the writer does for floats
            EncodeSettings::default(),
        )?);
        dbs.push(b);
        dts.push(t);
    }
    let dtotal = dn * tensor_words * 4;
    let dpinned = pin_all(&gpu, &denc)?;
    let drefs = hosted(&denc, dpinned.as_slice()?);
    let dstored: usize = denc.iter().map(EncodedTensor::stored_bytes).sum();
    let ddb: Vec<_> = dbs.iter().map(|b| gpu.upload(b)).collect::<Result<_, _>>()?;
    let ddr: Vec<_> = ddb.iter().collect();
    let o = l.load(&drefs, &ddr)?;
    assert!(gpu.download(&o[0])? == dts[0], "dense load is not bit-exact");
    drop(o);
    let dup = pinned_upload(&gpu, tensor_words * 4, dn, 3)?;
    table.row("dense: pinned dense upload (baseline)", dup, dtotal, "");
    let tdl = time(3, || {
        l.load(&drefs, &ddr)?;
        Ok(())
    })?;
    table.row(
        "dense: load (every element changed, pinned host delta)",
        tdl,
        dtotal,
        &format!("delta {:.0} MB; ratio to pinned upload rate {:.2}", dstored as f64 / 1e6, dup / tdl),
    );
    let dstaged = l.stage_on_device(&drefs)?;
    let dbufs = std::cell::RefCell::new(dbs.iter().map(|b| gpu.upload(b)).collect::<Result<Vec<_>, _>>()?);
    let restore_dense = || -> R<()> {
        for (b, d) in ddb.iter().zip(dbufs.borrow_mut().iter_mut()) {
            gpu.stream().memcpy_dtod(b, d)?;
        }
        Ok(gpu.stream().synchronize()?)
    };
    let tdi = time_after(5, restore_dense, || Ok(l.apply_staged_in_place(&dstaged, &mut dbufs.borrow_mut())?))?;
    // Each timed run leaves the target in the buffers: the base again first.
    profiled(&mut || {
        restore_dense()?;
        Ok(l.apply_staged_in_place(&dstaged, &mut dbufs.borrow_mut())?)
    })?;
    let ddtod = dtod * dtotal as f64 / total as f64;
    table.row(
        "dense: resident apply in place (kernels only)",
        tdi,
        dtotal,
        &format!(
            "{:.0}% of DtoD (scaled from the same run); streams coded against the base decoded at each apply",
            100.0 * ddtod / tdi
        ),
    );
    let dbound = l.stage_for_base(&drefs, &ddr)?;
    let tdb = time_after(5, restore_dense, || Ok(l.apply_staged_in_place(&dbound, &mut dbufs.borrow_mut())?))?;
    assert!(gpu.download(&dbufs.borrow()[0])? == dts[0], "dense apply of a delta staged for its base is not bit-exact");
    table.row(
        "dense: resident apply in place, staged for its base (kernels only)",
        tdb,
        dtotal,
        &format!("{:.0}% of DtoD (scaled from the same run); every stream decoded once", 100.0 * ddtod / tdb),
    );
    if let Ok(path) = std::env::var("BENCH_OUT") {
        std::fs::write(path, format!("device: {}\n\n{}\n", gpu.name(), table.0.join("\n")))?;
    }
    Ok(())
}
