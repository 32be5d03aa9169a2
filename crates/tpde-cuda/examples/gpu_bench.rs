//! GPU benchmark: materialize, whole-delta load and resident apply, each
//! against a baseline measured in the same run on the same card.
//!
//! `cargo build --release --example gpu_bench -p tpde-cuda`, then on a GPU
//! machine: `gpu_bench [--gib N] [--quick]`. Prints a markdown table.
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_precision_loss,
    clippy::cast_sign_loss
)]

use std::sync::Arc;
use std::time::Instant;

use rayon::prelude::*;
use tpde_cuda::cudarc::driver::result as cu;
use tpde_cuda::encode::{EncodeSettings, EncodedTensor};
use tpde_cuda::reference::EncodeChoice;
use tpde_cuda::{DevRange, Gpu, Loader, LoaderConfig, TensorRef, ValueLayout, ValueOp, WordWidth};

type R<T> = Result<T, Box<dyn std::error::Error>>;

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
fn layer(words: usize, p: f64, seed: u64) -> (Vec<u8>, Vec<u8>) {
    let mut base = vec![0u8; words * 4];
    let mut target = vec![0u8; words * 4];
    base.par_chunks_mut(1 << 20)
        .zip(target.par_chunks_mut(1 << 20))
        .enumerate()
        .for_each(|(c, (b, t))| {
            let mut r = Rng(seed ^ (c as u64).wrapping_mul(0x1234_5678_9ABC_DEF1));
            for (bw, tw) in b.chunks_exact_mut(4).zip(t.chunks_exact_mut(4)) {
                let x = r.normal();
                let y = if p >= 1.0 || r.unit() < p {
                    x + 0.01 * r.normal()
                } else {
                    x
                };
                bw.copy_from_slice(&x.to_le_bytes());
                tw.copy_from_slice(&y.to_le_bytes());
            }
        });
    (base, target)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn time<F: FnMut() -> R<()>>(reps: usize, mut f: F) -> R<f64> {
    f()?; // warm-up
    let mut v = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        f()?;
        v.push(t.elapsed().as_secs_f64());
    }
    Ok(median(v))
}

struct Table(Vec<String>);
impl Table {
    fn row(&mut self, what: &str, secs: f64, bytes: usize, note: &str) {
        let line = format!(
            "| {what} | {:.3} ms | {:.1} GB/s | {note} |",
            secs * 1e3,
            bytes as f64 / secs / 1e9
        );
        println!("{line}");
        self.0.push(line);
    }
}

/// Pinned (page-locked, plain) upload of `bytes` host bytes, `reps` median.
fn pinned_upload(gpu: &Gpu, bytes: usize, times: usize, reps: usize) -> R<f64> {
    let ctx = gpu.context();
    // SAFETY: the bytes are written below before any use.
    let mut host = unsafe { ctx.alloc_pinned_with_flags::<u8>(bytes, 0) }?;
    host.as_mut_slice()?
        .par_chunks_mut(1 << 20)
        .for_each(|c| c.fill(0x5A));
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

/// A one-tensor fp32 safetensors file named "w", shape [4096, 4096].
fn write_safetensors(path: &std::path::Path, bytes: &[u8]) -> R<()> {
    let mut header = format!(
        "{{\"w\":{{\"dtype\":\"F32\",\"shape\":[4096,4096],\"data_offsets\":[0,{}]}}}}",
        bytes.len()
    );
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
    let gib: usize = args
        .iter()
        .position(|a| a == "--gib")
        .map_or(if quick { 1 } else { 2 }, |i| {
            args[i + 1].parse().unwrap_or(2)
        });
    let gpu = Arc::new(Gpu::new(0)?);
    println!(
        "device: {}  (cpu threads: {})\n",
        gpu.name(),
        rayon::current_num_threads()
    );
    let mut table = Table(Vec::new());
    println!("| measurement | time (median) | rate (target bytes/s) | note |\n|---|---|---|---|");

    // (1) the seed's layer: 4096x4096 fp32, 5% changed
    let words = 4096 * 4096;
    let (base, target) = layer(words, 0.05, 1);
    let lb = words * 4;
    let dense_up = pinned_upload(&gpu, lb, 1, 20)?;
    table.row(
        "layer: pinned upload of the dense fp32 layer (baseline)",
        dense_up,
        lb,
        "64 MiB, page-locked",
    );
    let dbase = gpu.upload(&base)?;
    for (cw, slot, level) in [
        (1u32 << 18, 1usize << 20, 3),
        (1 << 18, 4 << 20, 3),
        (1 << 20, 8 << 20, 3),
        (1 << 16, 1 << 20, 3),
    ] {
        let s = EncodeSettings {
            choice: EncodeChoice::SparseGaps,
            op: ValueOp::Xor,
            layout: ValueLayout::BytePlanes,
            zstd_level: Some(level),
            chunk_words: cw,
        };
        let t = EncodedTensor::encode("layer", &base, &target, WordWidth::W4, s)?;
        let tr = t.as_ref();
        let mut l = Loader::new(
            gpu.clone(),
            LoaderConfig {
                slots: 4,
                slot_bytes: slot,
                max_chunks: 4096,
            },
        )?;
        let mut out = gpu.alloc_zeros::<u8>(lb)?;
        l.materialize_into(&tr, &dbase, &mut out)?;
        assert!(
            gpu.download(&out)? == target,
            "materialize is not bit-exact"
        );
        let note = format!(
            "chunk {cw} words, slot {} KiB, delta {:.2} MB; ratio to dense upload {:.3}",
            slot >> 10,
            t.stored_bytes() as f64 / 1e6,
            0.0
        );
        let m_into = time(20, || Ok(l.materialize_into(&tr, &dbase, &mut out)?))?;
        table.row(
            "layer: materialize_into (host delta → new buffer)",
            m_into,
            lb,
            &note.replace("0.000", &format!("{:.3}", m_into / dense_up)),
        );
        let mut buf = gpu.upload(&base)?;
        let m_in = time(20, || Ok(l.materialize_in_place(&tr, &mut buf)?))?;
        table.row(
            "layer: materialize_in_place (host delta, resident base copy)",
            m_in,
            lb,
            &note.replace("0.000", &format!("{:.3}", m_in / dense_up)),
        );
        // CPU decode alone, for the breakdown
        let dec = time(20, || {
            tr.chunks
                .par_iter()
                .flat_map(|c| c.streams.par_iter())
                .try_for_each(|st| {
                    let mut v = vec![0u8; st.decoded_len];
                    tpde_cuda::decode_stream(st, &mut v)
                })?;
            Ok(())
        })?;
        table.row(
            "layer:   of which: zstd decode alone (CPU, rayon)",
            dec,
            lb,
            "",
        );
        let staged = l.stage_on_device(std::slice::from_ref(&tr))?;
        let mut outs = vec![gpu.alloc_zeros::<u8>(lb)?];
        let k_into = time(20, || Ok(l.apply_staged(&staged, &[&dbase], &mut outs)?))?;
        table.row(
            "layer:   kernels only (streams resident, into new buffer)",
            k_into,
            lb,
            "",
        );
    }

    // the same layer through a real .tpde file written by the format library
    {
        let dir = std::env::temp_dir().join("tpde-gpu-bench");
        std::fs::create_dir_all(&dir)?;
        write_safetensors(&dir.join("b.safetensors"), &base)?;
        write_safetensors(&dir.join("t.safetensors"), &target)?;
        let bc = tpde::Checkpoint::open(&dir.join("b.safetensors"))?;
        let tc = tpde::Checkpoint::open(&dir.join("t.safetensors"))?;
        for cw in [1u64 << 18, 1 << 20] {
            let path = dir.join(format!("d{cw}.tpde"));
            let opts = tpde::pipeline::encode::EncodeOptions {
                chunk_words: cw,
                ..Default::default()
            };
            tpde::pipeline::encode::encode(
                Some(&bc),
                &tc,
                &path,
                opts,
                &tpde::pipeline::NoProgress,
            )?;
            let file = tpde::DeltaFile::open(&path)?;
            let refs = tpde_cuda::delta::tensor_refs(&file, true)?;
            let mut l = Loader::new(
                gpu.clone(),
                LoaderConfig {
                    slots: 4,
                    slot_bytes: 8 << 20,
                    max_chunks: 4096,
                },
            )?;
            let mut out = gpu.alloc_zeros::<u8>(lb)?;
            l.materialize_into(&refs[0], &dbase, &mut out)?;
            assert!(
                gpu.download(&out)? == target,
                "file materialize is not bit-exact"
            );
            let m = time(20, || Ok(l.materialize_into(&refs[0], &dbase, &mut out)?))?;
            let note = format!(
                "tpde file, chunk {cw} words, {:.2} MB; ratio to dense upload {:.3}",
                file.file_len() as f64 / 1e6,
                m / dense_up
            );
            table.row(
                "layer: materialize_into from a .tpde file (format library writer)",
                m,
                lb,
                &note,
            );
        }
    }

    // (2) whole delta, >= 2 GB target, base resident on the GPU
    let tensor_words = 64 << 20; // 256 MiB of fp32
    let ntensors = gib * 4;
    let mut bases = Vec::new();
    let mut targets = Vec::new();
    let mut enc = Vec::new();
    let t0 = Instant::now();
    for i in 0..ntensors {
        let (b, t) = layer(tensor_words, 0.05, 100 + i as u64);
        let s = EncodeSettings {
            choice: EncodeChoice::SparseGaps,
            op: ValueOp::Xor,
            layout: ValueLayout::BytePlanes,
            zstd_level: Some(1),
            chunk_words: 1 << 20,
        };
        enc.push(EncodedTensor::encode(
            &format!("t{i}"),
            &b,
            &t,
            WordWidth::W4,
            s,
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
    let refs: Vec<TensorRef<'_>> = enc.iter().map(EncodedTensor::as_ref).collect();
    let up = pinned_upload(&gpu, tensor_words * 4, ntensors, 3)?;
    table.row(
        "whole: pinned dense upload of the target bytes (baseline = bus)",
        up,
        total,
        "256 MiB page-locked buffer, copied N times",
    );
    let dbases: Vec<_> = bases
        .iter()
        .map(|b| gpu.upload(b))
        .collect::<Result<_, _>>()?;
    let dref: Vec<_> = dbases.iter().collect();
    let mut l = Loader::new(gpu.clone(), LoaderConfig::default())?;
    let outs = l.load(&refs, &dref)?;
    for (o, t) in outs.iter().zip(&targets).take(2) {
        assert!(gpu.download(o)? == *t, "load is not bit-exact");
    }
    drop(outs);
    let tl = time(3, || {
        l.load(&refs, &dref)?;
        Ok(())
    })?;
    table.row(
        "whole: load (host delta → new buffers, resident base)",
        tl,
        total,
        &format!("ratio to pinned upload rate {:.2}", up / tl),
    );
    let mut bufs: Vec<_> = bases
        .iter()
        .map(|b| gpu.upload(b))
        .collect::<Result<_, _>>()?;
    let ti = time(3, || Ok(l.apply_in_place(&refs, &mut bufs)?))?;
    table.row(
        "whole: apply_in_place (host delta, resident base copy)",
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
    let mut outs: Vec<_> = (0..ntensors)
        .map(|_| gpu.alloc_zeros::<u8>(tensor_words * 4))
        .collect::<Result<_, _>>()?;
    l.apply_staged(&staged, &dref, &mut outs)?;
    assert!(
        gpu.download(&outs[0])? == targets[0],
        "staged apply is not bit-exact"
    );
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
    table.row(
        "resident: cuMemcpyDtoD of the target bytes (baseline)",
        dtod,
        total,
        "",
    );
    let ta = time(5, || Ok(l.apply_staged(&staged, &dref, &mut outs)?))?;
    table.row(
        "resident: apply, sparse 5%, into new buffers (copy + scatter)",
        ta,
        total,
        &format!("{:.0}% of DtoD; decoding excluded", 100.0 * dtod / ta),
    );
    let tai = time(5, || Ok(l.apply_staged_in_place(&staged, &mut bufs)?))?;
    table.row(
        "resident: apply, sparse 5%, in place",
        tai,
        total,
        &format!("{:.0}% of DtoD; decoding excluded", 100.0 * dtod / tai),
    );
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
        let s = EncodeSettings {
            choice: EncodeChoice::Dense,
            op: ValueOp::Xor,
            layout: ValueLayout::BytePlanes,
            zstd_level: Some(1),
            chunk_words: 1 << 20,
        };
        denc.push(EncodedTensor::encode(
            &format!("d{i}"),
            &b,
            &t,
            WordWidth::W4,
            s,
        )?);
        dbs.push(b);
        dts.push(t);
    }
    let dtotal = dn * tensor_words * 4;
    let drefs: Vec<TensorRef<'_>> = denc.iter().map(EncodedTensor::as_ref).collect();
    let dstored: usize = denc.iter().map(EncodedTensor::stored_bytes).sum();
    let ddb: Vec<_> = dbs
        .iter()
        .map(|b| gpu.upload(b))
        .collect::<Result<_, _>>()?;
    let ddr: Vec<_> = ddb.iter().collect();
    let o = l.load(&drefs, &ddr)?;
    assert!(
        gpu.download(&o[0])? == dts[0],
        "dense load is not bit-exact"
    );
    drop(o);
    let dup = pinned_upload(&gpu, tensor_words * 4, dn, 3)?;
    table.row("dense: pinned dense upload (baseline)", dup, dtotal, "");
    let tdl = time(3, || {
        l.load(&drefs, &ddr)?;
        Ok(())
    })?;
    table.row(
        "dense: load (every element changed, host delta)",
        tdl,
        dtotal,
        &format!(
            "delta {:.0} MB; ratio to pinned upload rate {:.2}",
            dstored as f64 / 1e6,
            dup / tdl
        ),
    );
    let dstaged = l.stage_on_device(&drefs)?;
    let mut dbufs: Vec<_> = dbs
        .iter()
        .map(|b| gpu.upload(b))
        .collect::<Result<_, _>>()?;
    let tdi = time(5, || Ok(l.apply_staged_in_place(&dstaged, &mut dbufs)?))?;
    let ddtod = dtod * dtotal as f64 / total as f64;
    table.row(
        "dense: resident apply in place (kernels only)",
        tdi,
        dtotal,
        &format!(
            "{:.0}% of DtoD (scaled from the same run); decoding excluded",
            100.0 * ddtod / tdi
        ),
    );
    if let Ok(path) = std::env::var("BENCH_OUT") {
        std::fs::write(
            path,
            format!("device: {}\n\n{}\n", gpu.name(), table.0.join("\n")),
        )?;
    }
    Ok(())
}
