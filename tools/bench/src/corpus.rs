//! The seeded benchmark corpus: pairs of (base, target) checkpoints shaped
//! like a small Llama, with the kinds of change real training produces.
//!
//! Every tensor has its own ChaCha stream derived from (seed, case, tensor
//! index), so tensors are generated in parallel and the bytes do not depend
//! on the thread count. Weights are drawn and updated in f32 (the "master"
//! copy a trainer keeps) and rounded to the storage dtype at the end, which
//! is what makes small updates round away in BF16.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use half::{bf16, f16};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use rayon::prelude::*;
use safetensors::tensor::{Dtype, TensorView};

use crate::dtype::f32_to_e4m3;

/// Bumped whenever generation changes, so stale corpora are regenerated.
const GENERATOR_VERSION: u32 = 1;

/// Shape of the generated model.
#[derive(Clone, Copy, Debug)]
pub struct ModelShape {
    /// Hidden size d.
    pub hidden: usize,
    /// MLP intermediate size.
    pub intermediate: usize,
    /// Decoder layers.
    pub layers: usize,
    /// Vocabulary rows of the embedding and lm_head.
    pub vocab: usize,
}

impl ModelShape {
    /// The default size (~13M parameters, ~26 MB in BF16), grown by `scale`
    /// in layers and vocabulary. Small enough that the zstd -19 and
    /// --patch-from rows finish the whole run in about 20 minutes on 2 cores.
    pub fn default_scaled(scale: f64) -> Self {
        Self { hidden: 512, intermediate: 1376, layers: scaled(3, scale), vocab: scaled(4096, scale) }
    }

    /// A tiny model for smoke tests (~1 MB).
    pub fn quick() -> Self {
        Self { hidden: 128, intermediate: 344, layers: 2, vocab: 1024 }
    }

    /// Parameter count.
    pub fn params(&self) -> usize {
        tensor_specs(self).iter().map(|t| t.shape.iter().product::<usize>()).sum()
    }
}

fn scaled(n: usize, scale: f64) -> usize {
    let n = f64::from(u32::try_from(n).unwrap_or(u32::MAX)) * scale;
    // Sizes are small positive numbers; the rounded value fits easily.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let n = n.round().max(1.0) as usize;
    n
}

/// How the target differs from the base.
#[derive(Clone, Copy, Debug)]
enum Change {
    /// Consecutive RL steps: an Adam-like step of absolute size ~`lr` on the
    /// f32 master weights; most of it rounds away in BF16.
    RlStep { lr: f32 },
    /// Dense change of relative size drawn log-uniformly per tensor.
    Dense { rel_lo: f32, rel_hi: f32, heavy_tail: bool },
    /// Frozen model except a LoRA update merged into some q/v matrices.
    PartialLora,
    /// Light fine-tune plus `extra` new vocabulary rows.
    VocabGrow { extra: usize },
}

/// Storage layout of a case.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Storage {
    Bf16,
    F16,
    F32,
    /// Linear layers in F8_E4M3 with a per-tensor F32 scale; embedding,
    /// lm_head and norms in BF16, as FP8 releases ship them.
    Fp8,
}

/// One corpus case.
#[derive(Clone, Copy, Debug)]
pub struct CaseSpec {
    /// Case name, e.g. "rl-step-bf16".
    pub name: &'static str,
    /// One-line description for the report.
    pub about: &'static str,
    change: Change,
    storage: Storage,
    /// Number of shards; 1 writes a single file.
    shards: usize,
    /// Model size multiplier on top of the run's shape (layers and vocab).
    size_factor: f64,
}

impl CaseSpec {
    /// Whether this case is written as a sharded directory.
    pub fn sharded(&self) -> bool {
        self.shards > 1
    }

    /// Whether this case is the large half of the memory-flatness pair.
    pub fn is_memory_probe(&self) -> bool {
        self.size_factor > 1.0
    }

    /// The model shape used for this case.
    pub fn shape(&self, run: &ModelShape) -> ModelShape {
        ModelShape { layers: scaled(run.layers, self.size_factor), vocab: scaled(run.vocab, self.size_factor), ..*run }
    }
}

const FINETUNE: Change = Change::Dense { rel_lo: 1e-3, rel_hi: 1e-2, heavy_tail: false };

/// All cases, in report order. The last one is the 4× model for the
/// memory-flatness check; it is measured for tpde and a reference only.
pub const CASES: &[CaseSpec] = &[
    CaseSpec {
        name: "rl-step-bf16",
        about: "two consecutive RL steps in BF16 (Adam-like step of ~3e-7 on f32 master weights, rounded to BF16)",
        change: Change::RlStep { lr: 3e-7 },
        storage: Storage::Bf16,
        shards: 1,
        size_factor: 1.0,
    },
    CaseSpec {
        name: "finetune-bf16",
        about: "dense fine-tune in BF16 (relative update 1e-3..1e-2 per tensor)",
        change: FINETUNE,
        storage: Storage::Bf16,
        shards: 1,
        size_factor: 1.0,
    },
    CaseSpec {
        name: "finetune-fp32",
        about: "dense fine-tune in F32 (relative update 1e-3..1e-2 per tensor)",
        change: FINETUNE,
        storage: Storage::F32,
        shards: 1,
        size_factor: 1.0,
    },
    CaseSpec {
        name: "finetune-fp16",
        about: "dense fine-tune in F16 (relative update 1e-3..1e-2 per tensor)",
        change: FINETUNE,
        storage: Storage::F16,
        shards: 1,
        size_factor: 1.0,
    },
    CaseSpec {
        name: "finetune-fp8",
        about: "fine-tune re-quantised to F8_E4M3 with fixed per-tensor scales (relative update 1e-3..1e-2); embedding, lm_head and norms in BF16",
        change: FINETUNE,
        storage: Storage::Fp8,
        shards: 1,
        size_factor: 1.0,
    },
    CaseSpec {
        name: "pretrain-bf16",
        about: "pretraining-rate checkpoints in BF16 (relative update 1e-2..5e-2, heavy-tailed)",
        change: Change::Dense {
            rel_lo: 1e-2,
            rel_hi: 5e-2,
            heavy_tail: true,
        },
        storage: Storage::Bf16,
        shards: 1,
        size_factor: 1.0,
    },
    CaseSpec {
        name: "partial-finetune-bf16",
        about: "frozen model (bit-identical tensors) with rank 8-16 LoRA updates merged into q/v of the upper half of the layers",
        change: Change::PartialLora,
        storage: Storage::Bf16,
        shards: 1,
        size_factor: 1.0,
    },
    CaseSpec {
        name: "sharded-bf16",
        about: "dense BF16 fine-tune stored as 3 shards plus model.safetensors.index.json",
        change: FINETUNE,
        storage: Storage::Bf16,
        shards: 3,
        size_factor: 1.0,
    },
    CaseSpec {
        name: "vocab-grow-bf16",
        about: "embedding and lm_head grow by V/16 appended rows; everything lightly fine-tuned (relative 1e-4..1e-3)",
        change: Change::VocabGrow { extra: 16 },
        storage: Storage::Bf16,
        shards: 1,
        size_factor: 1.0,
    },
    CaseSpec {
        name: "finetune-bf16-4x",
        about: "finetune-bf16 with 4x the layers and vocabulary (memory-flatness probe)",
        change: FINETUNE,
        storage: Storage::Bf16,
        shards: 1,
        size_factor: 4.0,
    },
];

/// Where a generated case lives on disk.
#[derive(Clone, Debug)]
pub struct CasePaths {
    /// Base checkpoint (file or directory).
    pub base: PathBuf,
    /// Target checkpoint (file or directory).
    pub target: PathBuf,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Embedding,
    LmHead,
    Norm,
    Linear { layer: usize, lora_target: bool },
}

struct TensorSpec {
    name: String,
    shape: Vec<usize>,
    role: Role,
}

fn tensor_specs(m: &ModelShape) -> Vec<TensorSpec> {
    let d = m.hidden;
    let kv = d / 2; // grouped-query attention: half as many k/v heads
    let mut specs =
        vec![TensorSpec { name: "model.embed_tokens.weight".into(), shape: vec![m.vocab, d], role: Role::Embedding }];
    for layer in 0..m.layers {
        let p = format!("model.layers.{layer}");
        let linear = |name: &str, rows: usize, cols: usize, lora: bool| TensorSpec {
            name: format!("{p}.{name}.weight"),
            shape: vec![rows, cols],
            role: Role::Linear { layer, lora_target: lora },
        };
        specs.push(TensorSpec { name: format!("{p}.input_layernorm.weight"), shape: vec![d], role: Role::Norm });
        specs.push(linear("self_attn.q_proj", d, d, true));
        specs.push(linear("self_attn.k_proj", kv, d, false));
        specs.push(linear("self_attn.v_proj", kv, d, true));
        specs.push(linear("self_attn.o_proj", d, d, false));
        specs.push(TensorSpec {
            name: format!("{p}.post_attention_layernorm.weight"),
            shape: vec![d],
            role: Role::Norm,
        });
        specs.push(linear("mlp.gate_proj", m.intermediate, d, false));
        specs.push(linear("mlp.up_proj", m.intermediate, d, false));
        specs.push(linear("mlp.down_proj", d, m.intermediate, false));
    }
    specs.push(TensorSpec { name: "model.norm.weight".into(), shape: vec![d], role: Role::Norm });
    specs.push(TensorSpec { name: "lm_head.weight".into(), shape: vec![m.vocab, d], role: Role::LmHead });
    specs
}

/// A generated tensor pair, already in storage bytes.
struct TensorPair {
    name: String,
    dtype: Dtype,
    base_shape: Vec<usize>,
    target_shape: Vec<usize>,
    base: Vec<u8>,
    target: Vec<u8>,
}

/// Generates `case` under `dir` unless an identical corpus is already there.
pub fn ensure_case(dir: &Path, case: &CaseSpec, run_shape: &ModelShape, seed: u64) -> Result<CasePaths> {
    let paths = if case.sharded() {
        CasePaths { base: dir.join("base"), target: dir.join("target") }
    } else {
        CasePaths { base: dir.join("base.safetensors"), target: dir.join("target.safetensors") }
    };
    let shape = case.shape(run_shape);
    let stamp = format!("generator {GENERATOR_VERSION} case {} seed {seed} shape {shape:?}\n", case.name);
    let stamp_path = dir.join("corpus.stamp");
    if std::fs::read_to_string(&stamp_path).is_ok_and(|s| s == stamp) && paths.base.exists() && paths.target.exists() {
        return Ok(paths);
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("clear {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir)?;

    let case_seed = mix(seed, fnv1a(case.name.as_bytes()));
    let specs = tensor_specs(&shape);
    let pairs: Vec<TensorPair> = specs
        .par_iter()
        .enumerate()
        .map(|(i, spec)| generate_pair(case, &shape, spec, mix(case_seed, i as u64)))
        .collect();

    if case.sharded() {
        write_sharded(&paths.base, &pairs, case.shards, Side::Base)?;
        write_sharded(&paths.target, &pairs, case.shards, Side::Target)?;
    } else {
        write_file(&paths.base, pairs.iter().map(|p| p.view(Side::Base)))?;
        write_file(&paths.target, pairs.iter().map(|p| p.view(Side::Target)))?;
    }
    std::fs::write(&stamp_path, stamp)?;
    Ok(paths)
}

#[derive(Clone, Copy)]
enum Side {
    Base,
    Target,
}

impl TensorPair {
    fn view(&self, side: Side) -> Result<(String, TensorView<'_>)> {
        let (shape, data) = match side {
            Side::Base => (&self.base_shape, &self.base),
            Side::Target => (&self.target_shape, &self.target),
        };
        let view =
            TensorView::new(self.dtype, shape.clone(), data).with_context(|| format!("tensor view {}", self.name))?;
        Ok((self.name.clone(), view))
    }
}

fn write_file<'a>(path: &Path, views: impl Iterator<Item = Result<(String, TensorView<'a>)>>) -> Result<()> {
    let views = views.collect::<Result<Vec<_>>>()?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::tensor::serialize_to_file(views, Some(meta), path).with_context(|| format!("write {}", path.display()))
}

/// Writes an HF-style sharded checkpoint: tensors in model order, split
/// into `shards` files of roughly equal size, plus the index JSON.
fn write_sharded(dir: &Path, pairs: &[TensorPair], shards: usize, side: Side) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let sizes: Vec<usize> = pairs
        .iter()
        .map(|p| match side {
            Side::Base => p.base.len(),
            Side::Target => p.target.len(),
        })
        .collect();
    let total: usize = sizes.iter().sum();
    // Assign by the target's sizes so base and target shard alike.
    let target_total: usize = pairs.iter().map(|p| p.target.len()).sum();
    let mut weight_map = BTreeMap::new();
    let mut groups: Vec<Vec<&TensorPair>> = vec![Vec::new(); shards];
    let mut acc = 0usize;
    for p in pairs {
        let shard = (acc * shards / target_total.max(1)).min(shards - 1);
        acc += p.target.len();
        groups[shard].push(p);
    }
    for (i, group) in groups.iter().enumerate() {
        let file = format!("model-{:05}-of-{:05}.safetensors", i + 1, shards);
        for p in group {
            weight_map.insert(p.name.clone(), file.clone());
        }
        write_file(&dir.join(&file), group.iter().map(|p| p.view(side)))?;
    }
    let index = serde_json::json!({
        "metadata": { "total_size": total },
        "weight_map": weight_map,
    });
    let mut text = serde_json::to_string_pretty(&index)?;
    text.push('\n');
    std::fs::write(dir.join("model.safetensors.index.json"), text)?;
    Ok(())
}

fn generate_pair(case: &CaseSpec, shape: &ModelShape, spec: &TensorSpec, seed: u64) -> TensorPair {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n: usize = spec.shape.iter().product();

    // Per-tensor scale: linear layers ~N(0, 0.02 * [0.5, 2]), norms near 1.
    let std = 0.02 * log_uniform(&mut rng, 0.5, 2.0);
    let is_norm = spec.role == Role::Norm;
    let base: Vec<f32> = (0..n)
        .map(|_| {
            let z: f32 = rng.sample(StandardNormal);
            if is_norm {
                1.0 + 0.05 * z
            } else {
                std * z
            }
        })
        .collect();
    let spread = if is_norm { 0.05 } else { std };

    let mut target_shape = spec.shape.clone();
    let target: Vec<f32> = match case.change {
        Change::RlStep { lr } => {
            let lr = lr * log_uniform(&mut rng, 0.5, 2.0);
            base.iter()
                .map(|&w| {
                    // Adam's normalised step m/(sqrt(v)+eps) sits mostly
                    // near ±1; tanh of a wide normal mimics that.
                    let z: f32 = rng.sample(StandardNormal);
                    w - lr * (2.0 * z).tanh()
                })
                .collect()
        }
        Change::Dense { rel_lo, rel_hi, heavy_tail } => {
            let step = spread * log_uniform(&mut rng, rel_lo, rel_hi);
            dense_update(&mut rng, &base, step, heavy_tail)
        }
        Change::PartialLora => match spec.role {
            Role::Linear { layer, lora_target: true } if layer >= shape.layers / 2 => {
                lora_merge(&mut rng, &base, &spec.shape, std)
            }
            _ => base.clone(),
        },
        Change::VocabGrow { extra } => {
            let step = spread * log_uniform(&mut rng, 1e-4, 1e-3);
            let mut t = dense_update(&mut rng, &base, step, false);
            if matches!(spec.role, Role::Embedding | Role::LmHead) {
                // New rows start near the mean embedding, as resize_token_embeddings
                // users commonly initialise them.
                let d = spec.shape[1];
                let rows = shape.vocab / extra.max(1);
                let mean = column_means(&base, d);
                for _ in 0..rows {
                    for m in &mean {
                        let z: f32 = rng.sample(StandardNormal);
                        t.push(m + std * z);
                    }
                }
                target_shape[0] += rows;
            }
            t
        }
    };

    let (dtype, base_bytes, target_bytes) = match (case.storage, spec.role) {
        (Storage::Bf16, _) | (Storage::Fp8, Role::Norm | Role::Embedding | Role::LmHead) => {
            (Dtype::BF16, to_bf16(&base), to_bf16(&target))
        }
        (Storage::F16, _) => (Dtype::F16, to_f16(&base), to_f16(&target)),
        (Storage::F32, _) => (Dtype::F32, to_f32(&base), to_f32(&target)),
        (Storage::Fp8, Role::Linear { .. }) => {
            // The scale is fixed from the base, so unchanged weights keep
            // their codes and the delta shows only what moved.
            let amax = base.iter().fold(0f32, |a, &w| a.max(w.abs()));
            let inv = 448.0 / amax.max(f32::MIN_POSITIVE);
            (Dtype::F8_E4M3, to_e4m3(&base, inv), to_e4m3(&target, inv))
        }
    };
    TensorPair {
        name: spec.name.clone(),
        dtype,
        base_shape: spec.shape.clone(),
        target_shape,
        base: base_bytes,
        target: target_bytes,
    }
}

fn dense_update(rng: &mut ChaCha8Rng, base: &[f32], step: f32, heavy_tail: bool) -> Vec<f32> {
    base.iter()
        .map(|&w| {
            let z: f32 = rng.sample(StandardNormal);
            // Heavy tail: one element in 20 moves 5x further.
            let k = if heavy_tail && rng.gen_ratio(1, 20) { 5.0 } else { 1.0 };
            w + step * k * z
        })
        .collect()
}

/// W + B·A with B ∈ R^{rows×r}, A ∈ R^{r×cols}, rank r in 8..=16, scaled so
/// the merged update is 0.3%..3% of the weight's spread.
fn lora_merge(rng: &mut ChaCha8Rng, base: &[f32], shape: &[usize], std: f32) -> Vec<f32> {
    let (rows, cols) = (shape[0], shape[1]);
    let rank = rng.gen_range(8..=16usize);
    let target_std = std * log_uniform(rng, 3e-3, 3e-2);
    // Entries of B·A have std sqrt(r) * sb * sa.
    let rank_f = f32::from(u16::try_from(rank).unwrap_or(16));
    let sa = 1.0 / f32::from(u16::try_from(cols.min(65535)).unwrap_or(u16::MAX)).sqrt();
    let sb = target_std / (rank_f.sqrt() * sa);
    let a: Vec<f32> = (0..rank * cols).map(|_| sa * rng.sample::<f32, _>(StandardNormal)).collect();
    let b: Vec<f32> = (0..rows * rank).map(|_| sb * rng.sample::<f32, _>(StandardNormal)).collect();
    let mut out = base.to_vec();
    for i in 0..rows {
        let row = &mut out[i * cols..(i + 1) * cols];
        for k in 0..rank {
            let bik = b[i * rank + k];
            for (o, &akj) in row.iter_mut().zip(&a[k * cols..(k + 1) * cols]) {
                *o += bik * akj;
            }
        }
    }
    out
}

fn column_means(m: &[f32], cols: usize) -> Vec<f32> {
    let rows = m.len() / cols;
    let mut mean = vec![0f32; cols];
    for row in m.chunks_exact(cols) {
        for (acc, &x) in mean.iter_mut().zip(row) {
            *acc += x;
        }
    }
    let inv = 1.0 / f32::from(u16::try_from(rows.min(65535)).unwrap_or(u16::MAX));
    mean.iter_mut().for_each(|x| *x *= inv);
    mean
}

fn log_uniform(rng: &mut ChaCha8Rng, lo: f32, hi: f32) -> f32 {
    let t: f32 = rng.gen();
    (lo.ln() + t * (hi.ln() - lo.ln())).exp()
}

fn to_bf16(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|&x| bf16::from_f32(x).to_le_bytes()).collect()
}

fn to_f16(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|&x| f16::from_f32(x).to_le_bytes()).collect()
}

fn to_f32(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|&x| x.to_le_bytes()).collect()
}

fn to_e4m3(v: &[f32], inv_scale: f32) -> Vec<u8> {
    v.iter().map(|&x| f32_to_e4m3(x * inv_scale)).collect()
}

/// SplitMix64-style mixing of two seeds.
fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_is_deterministic() {
        let shape = ModelShape { hidden: 16, intermediate: 40, layers: 2, vocab: 64 };
        let specs = tensor_specs(&shape);
        for case in CASES {
            let a = generate_pair(case, &shape, &specs[1], 7);
            let b = generate_pair(case, &shape, &specs[1], 7);
            assert_eq!(a.base, b.base, "{}", case.name);
            assert_eq!(a.target, b.target, "{}", case.name);
        }
    }

    #[test]
    fn rl_step_is_mostly_unchanged() {
        let shape = ModelShape { hidden: 256, intermediate: 512, layers: 1, vocab: 256 };
        let specs = tensor_specs(&shape);
        let case = CASES.iter().find(|c| c.name == "rl-step-bf16").expect("case");
        // specs[2] is layer 0's q_proj; specs[1] is a norm, which near 1.0 never moves.
        let p = generate_pair(case, &shape, &specs[2], 1);
        let changed = p.base.chunks_exact(2).zip(p.target.chunks_exact(2)).filter(|(a, b)| a != b).count();
        let frac = changed as f64 / (p.base.len() / 2) as f64;
        assert!(frac > 0.001 && frac < 0.05, "changed fraction {frac}");
    }

    #[test]
    fn vocab_grows() {
        let shape = ModelShape::quick();
        let specs = tensor_specs(&shape);
        let case = CASES.iter().find(|c| c.name == "vocab-grow-bf16").expect("case");
        let p = generate_pair(case, &shape, &specs[0], 3);
        assert_eq!(p.target_shape[0], shape.vocab + shape.vocab / 16);
        assert_eq!(p.target.len(), p.target_shape.iter().product::<usize>() * 2);
    }
}
