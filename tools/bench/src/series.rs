//! The series benchmark: seeded training runs added step by step with `tpde series
//! add`, against one keyframe plus the sum of consecutive deltas (no random-access
//! bound), and against TRL's anchor-every-N scheme and PULSE-style per-step patches
//! at the same random-access bound (an anchor every `max_chain + 1` steps).
//!
//! `tpde-bench series --tpde target/release/tpde --out report.md`

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use half::bf16;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use safetensors::tensor::TensorView;
use safetensors::Dtype;

use crate::baselines::{self, Method};
use crate::corpus::{self, draw_base, draw_std, log_uniform, mix, spread, tensor_specs, ModelShape, TensorSpec};
use crate::measure;

/// How the checkpoints of a run follow one another.
#[derive(Clone, Copy, Debug)]
enum Run {
    /// Consecutive RL steps: an Adam-like step of `lr` on f32 master weights,
    /// each step saved in the storage dtype.
    Rl { steps: usize, lr: f32 },
    /// A fine-tune saved every so often: each checkpoint moves every weight by a
    /// small step (relative 1e-4..1e-3 of its spread).
    Finetune { checkpoints: usize },
    /// Independent fine-tunes of one base (relative 1e-3..1e-2): step 0 is the
    /// base, steps 1..=n the fine-tunes.
    Sweep { finetunes: usize },
}

struct SeriesCase {
    name: &'static str,
    about: &'static str,
    run: Run,
    dtype: Dtype,
}

const CASES: &[SeriesCase] = &[
    SeriesCase {
        name: "rl-50-bf16",
        about: "50 consecutive RL steps in BF16 (Adam-like step of ~3e-7 on f32 master weights)",
        run: Run::Rl { steps: 50, lr: 3e-7 },
        dtype: Dtype::BF16,
    },
    SeriesCase {
        name: "finetune-10-bf16",
        about: "10 checkpoints of a fine-tune in BF16",
        run: Run::Finetune { checkpoints: 10 },
        dtype: Dtype::BF16,
    },
    SeriesCase {
        name: "finetune-10-fp32",
        about: "10 checkpoints of a fine-tune in F32",
        run: Run::Finetune { checkpoints: 10 },
        dtype: Dtype::F32,
    },
    SeriesCase {
        name: "sweep-5-bf16",
        about: "a base and 5 independent fine-tunes of it in BF16",
        run: Run::Sweep { finetunes: 5 },
        dtype: Dtype::BF16,
    },
];

/// Options of the series benchmark.
pub struct Options {
    pub tpde: PathBuf,
    pub work: PathBuf,
    pub out: PathBuf,
    pub scale: f64,
    pub seed: u64,
    pub max_chain: usize,
    pub cases: Vec<String>,
}

fn write_checkpoint(path: &Path, names: &[TensorSpec], tensors: &[Vec<u8>], dtype: Dtype) -> Result<()> {
    let views: Vec<(String, TensorView<'_>)> = names
        .iter()
        .zip(tensors)
        .map(|(s, bytes)| Ok((s.name.clone(), TensorView::new(dtype, s.shape.clone(), bytes)?)))
        .collect::<Result<_>>()?;
    safetensors::tensor::serialize_to_file(views, None, path).with_context(|| format!("write {}", path.display()))
}

fn store(values: &[f32], dtype: Dtype) -> Vec<u8> {
    match dtype {
        Dtype::BF16 => values.iter().flat_map(|&x| bf16::from_f32(x).to_le_bytes()).collect(),
        _ => values.iter().flat_map(|&x| x.to_le_bytes()).collect(),
    }
}

/// Writes the checkpoints of `case` into `dir`, returning their paths by step.
fn generate(case: &SeriesCase, dir: &Path, shape: &ModelShape, seed: u64) -> Result<Vec<(u64, PathBuf)>> {
    std::fs::create_dir_all(dir)?;
    let specs = tensor_specs(shape);
    let mut rngs: Vec<ChaCha8Rng> = (0..specs.len()).map(|i| ChaCha8Rng::seed_from_u64(mix(seed, i as u64))).collect();
    let mut scales = Vec::new();
    let mut weights: Vec<Vec<f32>> = specs
        .iter()
        .zip(&mut rngs)
        .map(|(s, rng)| {
            let std = draw_std(rng);
            scales.push(spread(s.role, std));
            draw_base(rng, s.elements(), s.role, std)
        })
        .collect();
    let base = weights.clone();
    let count = match case.run {
        Run::Rl { steps, .. } => steps,
        Run::Finetune { checkpoints } => checkpoints,
        Run::Sweep { finetunes } => finetunes + 1,
    };
    let mut out = Vec::new();
    for k in 0..count {
        if k > 0 {
            for ((w, rng), (b, &scale)) in weights.iter_mut().zip(&mut rngs).zip(base.iter().zip(&scales)) {
                match case.run {
                    Run::Rl { lr, .. } => {
                        for x in w.iter_mut() {
                            let z: f32 = StandardNormal.sample(rng);
                            *x -= lr * (2.0 * z).tanh();
                        }
                    }
                    Run::Finetune { .. } => {
                        let step = scale * log_uniform(rng, 1e-4, 1e-3);
                        *w = corpus::dense_update(rng, w, step, false);
                    }
                    Run::Sweep { .. } => {
                        let step = scale * log_uniform(rng, 1e-3, 1e-2);
                        *w = corpus::dense_update(rng, b, step, false);
                    }
                }
            }
        }
        let path = dir.join(format!("step-{k:04}.safetensors"));
        let stored: Vec<Vec<u8>> = weights.iter().map(|w| store(w, case.dtype)).collect();
        write_checkpoint(&path, &specs, &stored, case.dtype)?;
        out.push((k as u64, path));
    }
    Ok(out)
}

fn tpde(tpde: &Path, args: &[&dyn AsRef<std::ffi::OsStr>]) -> Result<()> {
    let mut cmd = Command::new(tpde);
    for a in args {
        cmd.arg(a);
    }
    let out = cmd.output().with_context(|| format!("run {}", tpde.display()))?;
    ensure!(out.status.success(), "tpde failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

fn size(path: &Path) -> Result<u64> {
    Ok(std::fs::metadata(path).with_context(|| format!("stat {}", path.display()))?.len())
}

fn dir_size(path: &Path) -> Result<u64> {
    let mut total = 0;
    for e in std::fs::read_dir(path)? {
        total += e?.metadata()?.len();
    }
    Ok(total)
}

fn zstd_size(path: &Path, level: i32) -> Result<u64> {
    let data = std::fs::read(path)?;
    let mut enc = zstd::bulk::Compressor::new(level)?;
    enc.long_distance_matching(level >= 19)?;
    Ok(enc.compress(&data)?.len() as u64)
}

/// Bytes of an anchor-every-N scheme: a full checkpoint (raw, or compressed at
/// `anchor_level`) every `period` steps, and `method`'s patch against the step
/// before in between.
fn anchored(
    steps: &[(u64, PathBuf)],
    period: usize,
    method: Method,
    level: i32,
    anchor_level: Option<i32>,
    scratch: &Path,
) -> Result<u64> {
    let mut total = 0;
    for (i, (_, path)) in steps.iter().enumerate() {
        total += if i % period == 0 {
            match anchor_level {
                Some(l) => zstd_size(path, l)?,
                None => size(path)?,
            }
        } else {
            let out = scratch.join("patch.bin");
            baselines::encode_checkpoint(method, level, &steps[i - 1].1, path, &out)?;
            size(&out)?
        };
    }
    Ok(total)
}

/// Counts over consecutive step pairs (k, k + 1) of words that changed in step k
/// (against k - 1) and in step k + 1: `[[neither, only k + 1], [only k, both]]`.
fn transitions(steps: &[(u64, PathBuf)], width: usize) -> Result<[[u64; 2]; 2]> {
    let data = |p: &Path| -> Result<Vec<u8>> {
        let bytes = std::fs::read(p)?;
        let n = usize::try_from(u64::from_le_bytes(bytes[..8].try_into()?))?;
        Ok(bytes[8 + n..].to_vec())
    };
    let mut counts = [[0u64; 2]; 2];
    let mut window: Vec<Vec<u8>> = Vec::new();
    for (_, path) in steps {
        window.push(data(path)?);
        if window.len() == 4 {
            window.remove(0);
        }
        if let [a, b, c] = window.as_slice() {
            for ((wa, wb), wc) in a.chunks_exact(width).zip(b.chunks_exact(width)).zip(c.chunks_exact(width)) {
                counts[usize::from(wa != wb)][usize::from(wb != wc)] += 1;
            }
        }
    }
    Ok(counts)
}

/// Bits per word of "did this word change?", coded without context and with the
/// previous step's answer as context: the most a temporal position model saves.
#[allow(clippy::cast_precision_loss)]
fn change_entropy(counts: [[u64; 2]; 2]) -> (f64, f64) {
    let h = |p: f64| if p <= 0.0 || p >= 1.0 { 0.0 } else { -(p * p.log2() + (1.0 - p) * (1.0 - p).log2()) };
    let total = counts.iter().flatten().sum::<u64>().max(1) as f64;
    let changed = (counts[0][1] + counts[1][1]) as f64;
    let plain = h(changed / total);
    let conditional: f64 = counts
        .iter()
        .map(|row| {
            let n = (row[0] + row[1]) as f64;
            if n == 0.0 {
                0.0
            } else {
                n / total * h(row[1] as f64 / n)
            }
        })
        .sum();
    (plain, conditional)
}

#[allow(clippy::cast_precision_loss)]
fn ratio(a: u64, b: u64) -> f64 {
    a as f64 / b.max(1) as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs the benchmark and writes its markdown report to `opts.out`.
#[allow(clippy::too_many_lines, clippy::cast_precision_loss)]
pub fn run(opts: &Options) -> Result<()> {
    let shape = ModelShape::default_scaled(opts.scale);
    let period = opts.max_chain + 1;
    let mut report = format!(
        "## Series\n\nEach run is added step by step with `tpde series add --max-chain {k}`. \"Consecutive\" is \
         one standalone tpde keyframe plus a tpde delta between every pair of consecutive steps: the smallest \
         storage with no bound on how many deltas a step needs. TRL and PULSE store a full checkpoint every {period} \
         steps (TRL raw, PULSE compressed with zstd at the patch's level, `--long` at 19) and a patch against the \
         step before in between, so that, like the series, no step needs more than {k} patches. \"vs best\" is how \
         much smaller the series is than the smallest of them. Model: {} parameters per checkpoint.\n\n\
         | run | steps | checkpoints | tpde series | × consecutive | TRL (anchor + raw patches) | PULSE -3 | PULSE -19 | \
         series vs best | deepest chain | get of it / one apply | same step |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|\n",
        shape.params(),
        k = opts.max_chain,
    );
    let mut notes = String::new();
    for case in CASES.iter().filter(|c| opts.cases.is_empty() || opts.cases.iter().any(|n| n == c.name)) {
        let dir = opts.work.join(case.name);
        let _ = std::fs::remove_dir_all(&dir);
        eprintln!("series: generating {}", case.name);
        let steps = generate(case, &dir.join("ckpt"), &shape, mix(opts.seed, corpus::fnv1a(case.name.as_bytes())))?;
        let checkpoints: u64 = steps.iter().map(|(_, p)| size(p)).sum::<Result<u64>>()?;
        let run_dir = dir.join("run");
        let max_chain = opts.max_chain.to_string();
        let mut add_secs = Vec::new();
        eprintln!("series: adding {} steps", steps.len());
        for (step, path) in &steps {
            let t = Instant::now();
            let step = step.to_string();
            tpde(&opts.tpde, &[&"series", &"add", &run_dir, path, &"--step", &step, &"--max-chain", &max_chain])?;
            add_secs.push(t.elapsed().as_secs_f64());
        }
        let series_bytes = dir_size(&run_dir.join("steps"))? + size(&run_dir.join("series.json"))?;
        // The same run with temporal positions (`series add --temporal`), whose
        // deepest step must rebuild byte for byte.
        eprintln!("series: adding {} steps with temporal positions", steps.len());
        let temporal_dir = dir.join("run-temporal");
        for (step, path) in &steps {
            let step = step.to_string();
            let args: [&dyn AsRef<std::ffi::OsStr>; 8] =
                [&"series", &"add", &temporal_dir, path, &"--step", &step, &"--max-chain", &max_chain];
            let mut command = Command::new(&opts.tpde);
            command.args(args.iter().map(|a| a.as_ref())).arg("--temporal");
            let status = command.status()?;
            ensure!(status.success(), "tpde series add --temporal failed");
        }
        let temporal_bytes = dir_size(&temporal_dir.join("steps"))? + size(&temporal_dir.join("series.json"))?;
        let (last_step, last_path) = steps.last().context("a run has steps")?;
        let rebuilt = dir.join("temporal-last.safetensors");
        let status = Command::new(&opts.tpde)
            .args(["series", "get"])
            .arg(&temporal_dir)
            .args(["--step", &last_step.to_string(), "-o"])
            .arg(&rebuilt)
            .status()?;
        ensure!(status.success(), "tpde series get of the temporal run failed");
        ensure!(std::fs::read(&rebuilt)? == std::fs::read(last_path)?, "the temporal run rebuilds other bytes");
        // one keyframe plus consecutive deltas
        let scratch = dir.join("scratch");
        std::fs::create_dir_all(&scratch)?;
        let key = scratch.join("k.tpde");
        tpde(&opts.tpde, &[&"encode", &steps[0].1, &"-o", &key, &"--force"])?;
        let mut consecutive = size(&key)?;
        for w in steps.windows(2) {
            let d = scratch.join("d.tpde");
            tpde(&opts.tpde, &[&"encode", &w[0].1, &w[1].1, &"-o", &d, &"--force"])?;
            consecutive += size(&d)?;
        }
        eprintln!("series: baselines");
        let trl = anchored(&steps, period, Method::Trl, 0, None, &scratch)?;
        let pulse3 = anchored(&steps, period, Method::Pulse, 3, Some(3), &scratch)?;
        let pulse19 = anchored(&steps, period, Method::Pulse, 19, Some(19), &scratch)?;
        let best = trl.min(pulse3).min(pulse19);
        let width = if case.dtype == Dtype::F32 { 4 } else { 2 };
        let counts = transitions(&steps, width)?;
        let (plain, conditional) = change_entropy(counts);
        let words = counts.iter().flatten().sum::<u64>() as f64 / (steps.len().saturating_sub(2).max(1)) as f64;
        let deltas = (consecutive - size(&key)?) as f64 / (steps.len() - 1).max(1) as f64;
        let temporal = (plain - conditional) * words / 8.0;
        // `get` of the deepest step against one `apply` of its own delta
        let list = Command::new(&opts.tpde).args(["series", "list"]).arg(&run_dir).arg("--json").output()?;
        let manifest: serde_json::Value = serde_json::from_slice(&list.stdout)?;
        let entries = manifest["steps"].as_array().cloned().unwrap_or_default();
        let depth_of = |step: u64| -> usize {
            let mut d = 0;
            let mut at = step;
            loop {
                let Some(e) = entries.iter().find(|e| e["step"] == at) else { return d };
                match (e["kind"].as_str(), e["reference"].as_u64()) {
                    (Some("delta"), Some(r)) => {
                        d += 1;
                        at = r;
                    }
                    (Some("same"), Some(r)) => at = r,
                    _ => return d,
                }
            }
        };
        let (deep, depth) =
            steps.iter().map(|(s, _)| (*s, depth_of(*s))).max_by_key(|(s, d)| (*d, *s)).unwrap_or((0, 0));
        let entry = entries.iter().find(|e| e["step"] == deep).cloned().unwrap_or_default();
        let step_file = run_dir.join(entry["file"].as_str().unwrap_or_default());
        let reference = entry["reference"].as_u64();
        let got = scratch.join("got.safetensors");
        let log = scratch.join("log.txt");
        let mut get_runs = Vec::new();
        let mut apply_runs = Vec::new();
        for _ in 0..3 {
            let _ = std::fs::remove_file(&got);
            let mut c = Command::new(&opts.tpde);
            c.args(["series", "get"]).arg(&run_dir).args(["--step", &deep.to_string(), "-o"]).arg(&got);
            get_runs.push(measure::run(&mut c, None, &log)?);
            ensure!(
                std::fs::read(&got)? == std::fs::read(&steps[usize::try_from(deep)?].1)?,
                "{}: step {deep} is not byte-identical",
                case.name
            );
            let _ = std::fs::remove_file(&got);
            let mut c = Command::new(&opts.tpde);
            c.arg("apply");
            if let Some(r) = reference {
                c.arg(&steps[usize::try_from(r)?].1);
            }
            c.arg(&step_file).arg("-o").arg(&got);
            apply_runs.push(measure::run(&mut c, None, &log)?);
        }
        let get_s = median(get_runs.iter().map(|m| m.wall.as_secs_f64()).collect());
        let apply_s = median(apply_runs.iter().map(|m| m.wall.as_secs_f64()).collect());
        let get_anon = get_runs.iter().map(|m| m.peak_anon).max().unwrap_or(0);
        let apply_anon = apply_runs.iter().map(|m| m.peak_anon).max().unwrap_or(0);
        // an identical step: its cost is its manifest entry
        let manifest_before = size(&run_dir.join("series.json"))?;
        let last = steps.last().map(|(s, p)| (*s, p.clone())).unwrap_or_default();
        let same_step = (last.0 + 1).to_string();
        tpde(&opts.tpde, &[&"series", &"add", &run_dir, &last.1, &"--step", &same_step])?;
        let same_bytes = size(&run_dir.join("series.json"))? - manifest_before;
        tpde(&opts.tpde, &[&"series", &"verify", &run_dir])?;
        report.push_str(&format!(
            "| {} | {} | {:.1} MB | {:.2} MB | {:.3} | {:.2} MB | {:.2} MB | {:.2} MB | {:+.1}% | {depth} (step {deep}) | \
             {:.2} (bound {}) | {same_bytes} B |\n",
            case.name,
            steps.len(),
            checkpoints as f64 / 1e6,
            series_bytes as f64 / 1e6,
            ratio(series_bytes, consecutive),
            trl as f64 / 1e6,
            pulse3 as f64 / 1e6,
            pulse19 as f64 / 1e6,
            100.0 * (1.0 - ratio(series_bytes, best)),
            get_s / apply_s,
            depth + 1,
        ));
        notes.push_str(&format!(
            "- **{}**: {}. Adding a step took {:.2} s (median; {} steps, on every core). Peak anonymous memory: \
             `series get` {:.1} MiB, one `apply` {:.1} MiB. Temporal model: whether a word changed costs \
             {plain:.4} bits without context and {conditional:.4} bits given whether it changed the step before, \
             at most {temporal:.0} bytes a step, {:.2}% of a consecutive delta. With temporal positions \
             (`series add --temporal`) the series takes {temporal_bytes} bytes instead of {series_bytes}: \
             {:.2}% smaller.\n",
            case.name,
            case.about,
            median(add_secs.clone()),
            steps.len(),
            get_anon as f64 / (1 << 20) as f64,
            apply_anon as f64 / (1 << 20) as f64,
            100.0 * temporal / deltas.max(1.0),
            100.0 * (1.0 - ratio(temporal_bytes, series_bytes)),
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
    report.push('\n');
    report.push_str(&notes);
    std::fs::write(&opts.out, report)?;
    Ok(())
}
