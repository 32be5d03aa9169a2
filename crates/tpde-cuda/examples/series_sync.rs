//! RL-style weight sync on the GPU through a checkpoint series: a worker holds
//! step 0 in device memory and reaches each next step by applying that step's
//! delta in place. Against, in the same run on the same card: a full pinned
//! upload of the model at every step, and TRL's scheme, a full upload every
//! `--anchor` steps and an int32 index + BF16 value patch in between (its
//! transfer only, a lower bound of its cost).
//!
//! The run is generated here, seeded: BF16 weights in four shards, each step
//! moving about 1.3% of the words by one or two units in the last place, as an
//! RL step rounded to BF16 does, added with `Series::add_after`.
//!
//! `cargo build --release --example series_sync -p tpde-cuda`, then on a GPU
//! machine: `series_sync [--params N] [--steps S] [--anchor N] [--dir DIR] [--temporal] [--no-zstd]`
//! (`--temporal`: the series codes positions against the previous step, §8.3;
//! `--no-zstd`: every stream lane rANS, constant or stored, so the CPU decodes nothing).
#![allow(clippy::cast_possible_truncation, clippy::cast_precision_loss, clippy::cast_sign_loss)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use rayon::prelude::*;
use tpde::{AddOptions, Checkpoint, EncodeOptions, EncodeSettings, NoProgress, Series};
use tpde_cuda::{cudarc::driver::result as cu, step_in_place, DevRange, Gpu, Loader, LoaderConfig, PinnedDelta};

mod common;
use common::{median, R};

const SHARDS: usize = 4;
const TENSORS_PER_SHARD: usize = 4;

/// A small xorshift generator per tensor: the run is seeded and reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform in (0, 1].
    fn unit(&mut self) -> f64 {
        ((self.next() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }
}

fn name(t: usize) -> String {
    format!("model.layers.{t}.mlp.weight")
}

fn shard_name(s: usize) -> String {
    format!("model-{:05}-of-{SHARDS:05}.safetensors", s + 1)
}

/// Writes the weights as a sharded checkpoint in `dir` (replacing it).
fn write_checkpoint(dir: &Path, weights: &[Vec<u16>]) -> R<()> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let mut map = serde_json::Map::new();
    (0..SHARDS).into_par_iter().try_for_each(|s| -> std::io::Result<()> {
        let tensors = &weights[s * TENSORS_PER_SHARD..(s + 1) * TENSORS_PER_SHARD];
        let mut header = String::from("{");
        let mut at = 0usize;
        for (i, w) in tensors.iter().enumerate() {
            let end = at + 2 * w.len();
            let comma = if i > 0 { "," } else { "" };
            let n = name(s * TENSORS_PER_SHARD + i);
            header +=
                &format!("{comma}\"{n}\":{{\"dtype\":\"BF16\",\"shape\":[{}],\"data_offsets\":[{at},{end}]}}", w.len());
            at = end;
        }
        header.push('}');
        while header.len() % 8 != 0 {
            header.push(' ');
        }
        let mut out = Vec::with_capacity(8 + header.len() + at);
        out.extend_from_slice(&(header.len() as u64).to_le_bytes());
        out.extend_from_slice(header.as_bytes());
        for w in tensors {
            out.extend(w.iter().flat_map(|x| x.to_le_bytes()));
        }
        std::fs::write(dir.join(shard_name(s)), out)
    })?;
    for t in 0..weights.len() {
        map.insert(name(t), serde_json::Value::String(shard_name(t / TENSORS_PER_SHARD)));
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": map });
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string())?;
    Ok(())
}

/// One RL step: about `p` of the words move by one or two units in the last
/// place (positions drawn by geometric gaps). Returns the words changed.
fn rl_step(weights: &mut [Vec<u16>], rngs: &mut [Rng], p: f64) -> usize {
    let log_q = (1.0 - p).ln();
    weights
        .par_iter_mut()
        .zip(rngs.par_iter_mut())
        .map(|(w, rng)| {
            let mut changed = 0;
            let mut i = (rng.unit().ln() / log_q) as usize;
            while i < w.len() {
                let by = 1 + (rng.next() & 1) as u16;
                w[i] = if rng.next() & 2 == 0 { w[i].wrapping_add(by) } else { w[i].wrapping_sub(by) };
                changed += 1;
                i += 1 + (rng.unit().ln() / log_q) as usize;
            }
            changed
        })
        .sum()
}

/// Median seconds of a pinned upload of `bytes` bytes.
fn pinned_upload(gpu: &Gpu, bytes: usize, reps: usize) -> R<f64> {
    // SAFETY: the bytes are written below before any use.
    let mut host = unsafe { gpu.context().alloc_pinned_with_flags::<u8>(bytes.max(1), 0) }?;
    host.as_mut_slice()?.par_chunks_mut(1 << 20).for_each(|c| c.fill(0x5A));
    let dev = gpu.alloc_zeros::<u8>(bytes.max(1))?;
    let stream = gpu.stream().clone();
    let d = DevRange::all(&dev, &stream)?;
    let src = host.as_slice()?;
    let mut samples = Vec::with_capacity(reps);
    for _ in 0..=reps {
        let t = Instant::now();
        // SAFETY: `d` is a live device buffer of `bytes` bytes and `src`
        // page-locked memory that nothing writes while the copy runs.
        unsafe { cu::memcpy_htod_async(d.ptr(), src, stream.cu_stream()) }?;
        stream.synchronize()?;
        samples.push(t.elapsed().as_secs_f64());
    }
    samples.remove(0);
    Ok(median(samples))
}

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() -> R<()> {
    let params = arg("--params", 1 << 29);
    let steps = arg("--steps", 50);
    let anchor = arg("--anchor", 10);
    let args: Vec<String> = std::env::args().collect();
    let dir = args
        .iter()
        .position(|a| a == "--dir")
        .and_then(|i| args.get(i + 1))
        .map_or_else(|| PathBuf::from("/tmp/tpde-series-sync"), PathBuf::from);
    let gpu = match Gpu::new(0) {
        Ok(g) => Arc::new(g),
        Err(e) => {
            println!("skipped: no GPU ({e})");
            return Ok(());
        }
    };
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let tensors = SHARDS * TENSORS_PER_SHARD;
    let per = params / tensors;
    let mut rngs: Vec<Rng> =
        (0..tensors).map(|t| Rng(0x9E37_79B9_7F4A_7C15 ^ ((t as u64 + 1) * 0xBF58_476D))).collect();
    let mut weights: Vec<Vec<u16>> =
        rngs.par_iter_mut().map(|rng| (0..per).map(|_| 0x3C00 | (rng.next() & 0x3FF) as u16).collect()).collect();

    // The run, added step by step; step 0 also goes to the device.
    let t0 = Instant::now();
    let mut series = Series::open_or_create(&dir.join("run"))?;
    let temporal = args.iter().any(|a| a == "--temporal");
    let zstd = !args.iter().any(|a| a == "--no-zstd");
    let encode =
        EncodeOptions { settings: EncodeSettings { zstd, ..EncodeSettings::default() }, ..EncodeOptions::default() };
    let options = AddOptions { max_chain: steps, encode, temporal };
    let ckpt_dir = |k: usize| dir.join(format!("ckpt-{}", k % 2));
    write_checkpoint(&ckpt_dir(0), &weights)?;
    let first = Checkpoint::open(&ckpt_dir(0))?;
    series.add(&first, 0, &options, &NoProgress)?;
    let order: Vec<String> = {
        let file = series.open_step_file(&series.manifest().steps[0])?;
        file.header().tensors.iter().map(|t| t.name.clone()).collect()
    };
    let step0: Vec<_> = order
        .iter()
        .map(|n| {
            let t: usize = n.split('.').nth(2).and_then(|x| x.parse().ok()).unwrap_or(0);
            gpu.upload(&weights[t].iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>())
        })
        .collect::<Result<_, _>>()?;
    drop(first);
    let mut changed = Vec::new();
    for k in 1..steps {
        changed.push(rl_step(&mut weights, &mut rngs, 0.013));
        write_checkpoint(&ckpt_dir(k), &weights)?;
        let previous = Checkpoint::open(&ckpt_dir(k - 1))?;
        let current = Checkpoint::open(&ckpt_dir(k))?;
        series.add_after(&previous, &current, k as u64, &options, &NoProgress)?;
    }
    let model_bytes = 2 * per * tensors;
    let stored: Vec<u64> = series.manifest().steps.iter().map(|s| s.file_bytes).collect();
    eprintln!("generated and added {steps} steps in {:.0} s", t0.elapsed().as_secs_f64());

    // (a) the API end to end: step files read from the series (digest-checked,
    // staged through the loader's ring), applied in place.
    let mut loader = Loader::new(gpu.clone(), LoaderConfig::default())?;
    let mut bufs = step0.iter().map(|b| gpu.stream().clone_dtod(b)).collect::<Result<Vec<_>, _>>()?;
    let mut api = Vec::new();
    for k in 1..steps {
        let t = Instant::now();
        step_in_place(&mut loader, &series, k as u64 - 1, k as u64, &mut bufs)?;
        api.push(t.elapsed().as_secs_f64());
    }
    // the last step, bit for bit
    let last = Checkpoint::open(&ckpt_dir(steps - 1))?;
    for (n, b) in order.iter().zip(&bufs) {
        let (f, loc) = last.tensor(n).ok_or("a tensor of the run is missing")?;
        if gpu.download(b)? != f.tensor_bytes(loc) {
            return Err(format!("tensor {n} differs from the last step after the sync").into());
        }
    }
    // (b) each step's delta already in page-locked memory, as it arrives from a
    // trainer: the apply alone.
    let pinned: Vec<PinnedDelta> = series.manifest().steps[1..]
        .iter()
        .map(|s| PinnedDelta::open(&gpu, &series.root().join(s.file.as_deref().unwrap_or_default())))
        .collect::<Result<_, _>>()?;
    let mut bufs = step0.iter().map(|b| gpu.stream().clone_dtod(b)).collect::<Result<Vec<_>, _>>()?;
    let mut applied = Vec::new();
    for p in &pinned {
        let refs = p.tensor_refs(true)?;
        let t = Instant::now();
        loader.apply_in_place(&refs, &mut bufs)?;
        applied.push(t.elapsed().as_secs_f64());
    }
    // (c) as (b) with the rebuilt chunks' digests unchecked: what the check costs.
    let mut trusting = Loader::new(gpu.clone(), LoaderConfig { verify_digests: false, ..LoaderConfig::default() })?;
    let mut bufs = step0.iter().map(|b| gpu.stream().clone_dtod(b)).collect::<Result<Vec<_>, _>>()?;
    let mut unchecked = Vec::new();
    for p in &pinned {
        let refs = p.tensor_refs(true)?;
        let t = Instant::now();
        trusting.apply_in_place(&refs, &mut bufs)?;
        unchecked.push(t.elapsed().as_secs_f64());
    }
    let full = pinned_upload(&gpu, model_bytes, 5)?;
    let patch_bytes = 6 * changed.iter().sum::<usize>() / changed.len().max(1);
    let patch = pinned_upload(&gpu, patch_bytes, 5)?;
    let trl = (full + (anchor - 1) as f64 * patch) / anchor as f64;
    let delta_mean = stored[1..].iter().sum::<u64>() as f64 / (steps - 1) as f64;

    println!("series_sync on {} ({} CPU threads)\n", gpu.name(), rayon::current_num_threads());
    println!(
        "{steps} steps of a {:.2} GB BF16 model ({tensors} tensors in {SHARDS} shards); {:.2}% of the words change a \
         step; a step's delta {:.2} MB ({:.3}% of the model), {}; bit-exact after the sync: yes\n",
        model_bytes as f64 / 1e9,
        100.0 * changed.iter().sum::<usize>() as f64 / changed.len().max(1) as f64 / (per * tensors) as f64,
        delta_mean / 1e6,
        100.0 * delta_mean / model_bytes as f64,
        if zstd { "zstd where it stores smaller" } else { "no zstd (`--no-zstd`)" },
    );
    println!("| per step (median of {}) | time | × full pinned upload |\n|---|---|---|", steps - 1);
    let row = |what: &str, secs: f64| println!("| {what} | {:.3} ms | {:.3} |", secs * 1e3, secs / full);
    row("full pinned upload of the model (baseline)", full);
    row(&format!("TRL: full upload every {anchor} steps, int32 + BF16 patches between (transfer only)"), trl);
    row("tpde: `step_in_place` from the series files (digests checked)", median(api));
    row("tpde: `apply_in_place` of a delta already in pinned memory (digests checked)", median(applied));
    row("tpde: as above, rebuilt chunks' digests not checked", median(unchecked));
    Ok(())
}
