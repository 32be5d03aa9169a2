//! A seeded Llama-3-8B-shaped BF16 checkpoint pair: a base and a dense
//! fine-tune of it, about 16 GB each, for the GPU loading benchmark
//! (`tools/bench/gpu-llama.sh`).
//!
//! The tensors are Llama-3-8B's ([`ModelShape::llama3_8b`]), named as Hugging
//! Face names them, and the change is the corpus's `finetune-bf16` pattern,
//! drawn with the corpus's own functions: per tensor a std and a relative
//! update size ([`FINETUNE_REL`]), base values N(0, std) (norms near 1), the
//! target as base + step · N(0, 1) on f32 master values, both rounded to
//! BF16. Each tensor is cut into blocks of [`BLOCK`] elements with their own
//! `ChaCha8` stream derived from (seed, tensor index, block index), so blocks
//! are drawn on every core and the bytes depend on neither the thread count
//! nor the shard size.
//!
//! Memory stays bounded: tensors are drawn one at a time and handed to a
//! writer thread through a channel of one, so at most three tensor pairs
//! are held (the largest, the embedding and `lm_head`, are 1.05 GB per side at
//! full size: about 6.3 GB in all). Headers are known in advance (every
//! shape and offset follows from the model's shape), so each file's header
//! is written first and its tensors are appended in order.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::corpus::{
    bf16_into, dense_update, draw_base, draw_std, fnv1a, log_uniform, mix, spread, tensor_specs, ModelShape,
    TensorSpec, FINETUNE_REL,
};

/// Elements per independent random stream within a tensor.
pub const BLOCK: usize = 1 << 20;

/// Hugging Face's default `max_shard_size` ("5GB").
pub const DEFAULT_SHARD_BYTES: u64 = 5_000_000_000;

/// What to generate and where.
#[derive(Clone, Debug)]
pub struct Options {
    /// Directory that receives `base` and `target` (directories of shards),
    /// or `base.safetensors` and `target.safetensors` with `single_file`.
    pub out: PathBuf,
    /// Seed of the pair.
    pub seed: u64,
    /// The model's shape.
    pub shape: ModelShape,
    /// Largest shard, in tensor bytes (a larger tensor gets a shard alone).
    pub shard_bytes: u64,
    /// One `.safetensors` file per checkpoint instead of shards.
    pub single_file: bool,
    /// Replace existing outputs.
    pub force: bool,
}

/// Where the pair was written.
#[derive(Clone, Debug)]
pub struct Written {
    /// The base checkpoint (file or directory).
    pub base: PathBuf,
    /// The fine-tuned checkpoint (file or directory).
    pub target: PathBuf,
    /// Tensor bytes of each checkpoint.
    pub tensor_bytes: u64,
    /// Files per checkpoint (without the index).
    pub files: usize,
}

/// A tensor's place: its file and its byte range in that file's data.
struct Placed {
    spec: TensorSpec,
    file: usize,
    start: u64,
    end: u64,
}

/// Assigns tensors to files in model order, as Hugging Face's
/// `save_pretrained` does: a new shard starts when the next tensor would push
/// the current one past `shard_bytes`.
fn place(specs: Vec<TensorSpec>, shard_bytes: u64, single_file: bool) -> (Vec<Placed>, usize) {
    let mut placed = Vec::with_capacity(specs.len());
    let (mut file, mut used) = (0usize, 0u64);
    for spec in specs {
        let bytes = 2 * spec.elements() as u64;
        if !single_file && used > 0 && used + bytes > shard_bytes {
            file += 1;
            used = 0;
        }
        placed.push(Placed { spec, file, start: used, end: used + bytes });
        used += bytes;
    }
    let files = placed.last().map_or(1, |p| p.file + 1);
    (placed, files)
}

/// The header region of a safetensors file (little-endian length, then the
/// JSON padded with spaces to a multiple of 8 bytes, as the safetensors
/// library pads it) for BF16 tensors at the given data ranges.
fn header(tensors: &[&Placed]) -> Result<Vec<u8>> {
    let mut json = String::from("{\"__metadata__\":{\"format\":\"pt\"}");
    for p in tensors {
        json.push(',');
        json.push_str(&serde_json::to_string(&p.spec.name)?);
        write!(
            json,
            ":{{\"dtype\":\"BF16\",\"shape\":{},\"data_offsets\":[{},{}]}}",
            serde_json::to_string(&p.spec.shape)?,
            p.start,
            p.end
        )?;
    }
    json.push('}');
    while json.len() % 8 != 0 {
        json.push(' ');
    }
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(json.as_bytes());
    Ok(out)
}

/// Bytes in GB, for progress lines.
#[allow(clippy::cast_precision_loss)] // sizes far below 2^52 bytes
fn gb(bytes: u64) -> f64 {
    bytes as f64 / 1e9
}

/// Draws one tensor of the pair: (base bytes, target bytes), BF16.
pub fn generate_tensor(spec: &TensorSpec, tensor_seed: u64) -> (Vec<u8>, Vec<u8>) {
    let mut rng = ChaCha8Rng::seed_from_u64(mix(tensor_seed, 0));
    let std = draw_std(&mut rng);
    let step = spread(spec.role, std) * log_uniform(&mut rng, FINETUNE_REL.0, FINETUNE_REL.1);
    let n = spec.elements();
    let mut base = vec![0u8; 2 * n];
    let mut target = vec![0u8; 2 * n];
    base.par_chunks_mut(2 * BLOCK).zip(target.par_chunks_mut(2 * BLOCK)).enumerate().for_each(|(k, (b, t))| {
        let mut r = ChaCha8Rng::seed_from_u64(mix(tensor_seed, k as u64 + 1));
        let w = draw_base(&mut r, b.len() / 2, spec.role, std);
        let f = dense_update(&mut r, &w, step, false);
        bf16_into(&w, b);
        bf16_into(&f, t);
    });
    (base, target)
}

/// Output paths, removed first with `force`, refused otherwise.
fn prepare(opts: &Options) -> Result<(PathBuf, PathBuf)> {
    let (base, target) = if opts.single_file {
        (opts.out.join("base.safetensors"), opts.out.join("target.safetensors"))
    } else {
        (opts.out.join("base"), opts.out.join("target"))
    };
    for p in [&base, &target] {
        if p.symlink_metadata().is_ok() {
            ensure!(opts.force, "{} exists (pass --force to replace it)", p.display());
            if p.is_dir() { std::fs::remove_dir_all(p) } else { std::fs::remove_file(p) }
                .with_context(|| format!("remove {}", p.display()))?;
        }
    }
    std::fs::create_dir_all(&opts.out).with_context(|| format!("create {}", opts.out.display()))?;
    if !opts.single_file {
        std::fs::create_dir(&base).with_context(|| format!("create {}", base.display()))?;
        std::fs::create_dir(&target).with_context(|| format!("create {}", target.display()))?;
    }
    Ok((base, target))
}

/// Generates the pair under `opts.out`, tensor by tensor, on the current
/// rayon pool.
pub fn generate(opts: &Options) -> Result<Written> {
    let started = Instant::now();
    if opts.shard_bytes == 0 {
        bail!("--shard-bytes must be positive");
    }
    let (base_root, target_root) = prepare(opts)?;
    let (placed, files) = place(tensor_specs(&opts.shape), opts.shard_bytes, opts.single_file);
    let file_name = |f: usize| {
        if opts.single_file {
            String::new()
        } else {
            format!("model-{:05}-of-{files:05}.safetensors", f + 1)
        }
    };
    let path_in = |root: &Path, f: usize| if opts.single_file { root.to_path_buf() } else { root.join(file_name(f)) };

    // Every file, its header written, ready for its tensors in order.
    let mut writers = Vec::with_capacity(files);
    for f in 0..files {
        let in_file: Vec<&Placed> = placed.iter().filter(|p| p.file == f).collect();
        let head = header(&in_file)?;
        let mut pair = Vec::with_capacity(2);
        for root in [&base_root, &target_root] {
            let path = path_in(root, f);
            let mut file = File::create(&path).with_context(|| format!("create {}", path.display()))?;
            file.write_all(&head).with_context(|| format!("write {}", path.display()))?;
            pair.push((path, file));
        }
        writers.push(pair);
    }
    let total: u64 = placed.iter().map(|p| p.end - p.start).sum();
    eprintln!(
        "generating {} tensors, {} parameters, {:.2} GB per checkpoint in {files} file(s), on {} threads",
        placed.len(),
        total / 2,
        gb(total),
        rayon::current_num_threads()
    );

    let pair_seed = mix(opts.seed, fnv1a(b"llama3-8b-finetune-bf16"));
    let (tx, rx) = std::sync::mpsc::sync_channel::<(usize, Vec<u8>, Vec<u8>)>(1);
    let placed_ref = &placed;
    let written = std::thread::scope(|s| -> Result<u64> {
        let writer = s.spawn(move || -> Result<u64> {
            let mut done = 0u64;
            let mut next_report = 0.0;
            for (i, base, target) in rx {
                let p = &placed_ref[i];
                for ((path, file), bytes) in writers[p.file].iter_mut().zip([&base, &target]) {
                    file.write_all(bytes).with_context(|| format!("write {}", path.display()))?;
                }
                done += p.end - p.start;
                let frac = gb(done) / gb(total.max(1));
                if frac >= next_report {
                    let secs = started.elapsed().as_secs_f64();
                    eprintln!(
                        "[{secs:>6.1}s] {:>5.1}%: {:.2} of {:.2} GB per checkpoint ({:.2} GB/s written)",
                        100.0 * frac,
                        gb(done),
                        gb(total),
                        2.0 * gb(done) / secs.max(1e-9)
                    );
                    next_report = frac + 0.1;
                }
            }
            for (path, file) in writers.into_iter().flatten() {
                file.sync_all().with_context(|| format!("sync {}", path.display()))?;
            }
            Ok(done)
        });
        for (i, p) in placed_ref.iter().enumerate() {
            let (base, target) = generate_tensor(&p.spec, mix(pair_seed, i as u64));
            if tx.send((i, base, target)).is_err() {
                break; // the writer stopped; its error is reported below
            }
        }
        drop(tx);
        writer.join().map_err(|_| anyhow::anyhow!("the writer thread panicked"))?
    })?;
    ensure!(written == total, "wrote {written} of {total} tensor bytes");

    if !opts.single_file {
        let weight_map: BTreeMap<&str, String> =
            placed.iter().map(|p| (p.spec.name.as_str(), file_name(p.file))).collect();
        let index = serde_json::json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
        let mut text = serde_json::to_string_pretty(&index)?;
        text.push('\n');
        for root in [&base_root, &target_root] {
            std::fs::write(root.join("model.safetensors.index.json"), &text)
                .with_context(|| format!("write the index in {}", root.display()))?;
        }
    }
    eprintln!("done in {:.1}s", started.elapsed().as_secs_f64());
    Ok(Written { base: base_root, target: target_root, tensor_bytes: total, files })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::{checkpoint_files, resolve, SafetensorsFile};

    fn tiny() -> ModelShape {
        ModelShape::llama3_8b_scaled(1.0 / 64.0, 2)
    }

    fn run(out: &Path, threads: usize, shard_bytes: u64, single_file: bool) -> Written {
        let opts = Options { out: out.to_path_buf(), seed: 5, shape: tiny(), shard_bytes, single_file, force: true };
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("pool");
        pool.install(|| generate(&opts)).expect("generate")
    }

    fn read_all(root: &Path) -> Vec<(PathBuf, Vec<u8>)> {
        checkpoint_files(root)
            .expect("files")
            .into_iter()
            .map(|rel| {
                let bytes = std::fs::read(resolve(root, &rel)).expect("read");
                (rel, bytes)
            })
            .collect()
    }

    #[test]
    fn full_shape_is_llama3_8b() {
        let specs = tensor_specs(&ModelShape::llama3_8b());
        let params: usize = specs.iter().map(TensorSpec::elements).sum();
        assert_eq!(params, 8_030_261_248);
        assert_eq!(specs.len(), 2 + 32 * 9 + 1);
        let (placed, files) = place(specs, DEFAULT_SHARD_BYTES, false);
        assert_eq!(files, 4);
        assert!(placed.iter().all(|p| p.end - p.start <= DEFAULT_SHARD_BYTES));
    }

    #[test]
    fn deterministic_whatever_the_threads_and_valid() {
        let dir = std::env::temp_dir().join(format!("tpde-bench-llama8b-{}", std::process::id()));
        let a = run(&dir.join("a"), 1, 1 << 17, false);
        let b = run(&dir.join("b"), 3, 1 << 17, false);
        assert!(a.files > 2, "{} files", a.files);
        assert_eq!(read_all(&a.base), read_all(&b.base));
        assert_eq!(read_all(&a.target), read_all(&b.target));
        assert_ne!(read_all(&a.base), read_all(&a.target));
        // The format library reads both as sharded checkpoints, every tensor
        // where the index puts it.
        let specs = tensor_specs(&tiny());
        for root in [&a.base, &a.target] {
            let c = tpde::Checkpoint::open(root).expect("tpde opens the checkpoint");
            assert_eq!(c.files.len(), a.files);
            assert!(c.index_json.is_some());
            for s in &specs {
                let (_, loc) = c.tensor(&s.name).expect("tensor");
                assert_eq!(loc.dtype, tpde::Dtype::BF16);
                assert_eq!(loc.shape, s.shape.iter().map(|&d| d as u64).collect::<Vec<_>>());
            }
        }
        // The tensors' bytes do not depend on the sharding.
        let one = run(&dir.join("one"), 2, 1 << 20, true);
        let single = SafetensorsFile::open(&one.target).expect("single file");
        assert_eq!(tpde::Checkpoint::open(&one.base).expect("tpde opens the file").files.len(), 1);
        for (rel, _) in read_all(&a.target) {
            let path = resolve(&a.target, &rel);
            if !crate::checkpoint::is_safetensors(&path) {
                continue;
            }
            let shard = SafetensorsFile::open(&path).expect("shard");
            for t in &shard.tensors {
                let u = single.tensors.iter().find(|u| u.name == t.name).expect("tensor");
                assert_eq!(shard.data(t), single.data(u), "{}", t.name);
            }
        }
        std::fs::remove_dir_all(&dir).ok();
    }
}
