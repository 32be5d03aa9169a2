//! The seeded benchmark corpus: pairs of (base, target) checkpoints shaped
//! like a small Llama (and one like a small BERT sentence encoder), with the
//! kinds of change real training produces.
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

/// The family of tensors a model has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// A decoder: embedding, per layer q/k/v/o (grouped k/v) and
    /// gate/up/down without biases, `RMSNorm` weights, final norm, `lm_head`.
    Llama,
    /// A BERT-style encoder (sentence-embedding models such as MiniLM): word,
    /// position and token-type embeddings with a `LayerNorm`, per layer q/k/v/o,
    /// intermediate and output dense layers, each with its bias, two
    /// `LayerNorm`s (weight and bias), then the pooler's dense layer and bias.
    Bert,
}

/// Position-embedding rows of the BERT shape.
const BERT_POSITIONS: usize = 512;
/// Token-type rows of the BERT shape.
const BERT_TOKEN_TYPES: usize = 2;

/// Shape of the generated model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelShape {
    /// Which tensors the model has.
    pub arch: Arch,
    /// Hidden size d.
    pub hidden: usize,
    /// Rows of the k and v projections (KV heads × head dim) in a Llama.
    pub kv_hidden: usize,
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
        Self {
            arch: Arch::Llama,
            hidden: 512,
            kv_hidden: 256,
            intermediate: 1376,
            layers: scaled(3, scale),
            vocab: scaled(4096, scale),
        }
    }

    /// A tiny model for smoke tests (~1 MB).
    pub fn quick() -> Self {
        Self { arch: Arch::Llama, hidden: 128, kv_hidden: 64, intermediate: 344, layers: 2, vocab: 1024 }
    }

    /// Llama-3-8B: hidden 4096, 32 heads and 8 KV heads of dim 128 (k/v
    /// projections 1024×4096), intermediate 14336, vocabulary 128256, 32
    /// layers; 8,030,261,248 parameters, 16.06 GB in BF16.
    pub fn llama3_8b() -> Self {
        Self { arch: Arch::Llama, hidden: 4096, kv_hidden: 1024, intermediate: 14336, layers: 32, vocab: 128_256 }
    }

    /// [`Self::llama3_8b`] with every width (head dim, intermediate size,
    /// vocabulary) multiplied by `width` and `layers` decoder layers, for
    /// testing at a small size. Head counts stay 32 and 8.
    pub fn llama3_8b_scaled(width: f64, layers: usize) -> Self {
        let head_dim = scaled(128, width);
        Self {
            arch: Arch::Llama,
            hidden: 32 * head_dim,
            kv_hidden: 8 * head_dim,
            intermediate: scaled(14_336, width),
            layers: layers.max(1),
            vocab: scaled(128_256, width),
        }
    }

    /// A sentence-embedding encoder shaped like all-MiniLM-L6-v2: hidden 384,
    /// 6 layers, intermediate 1536, a BERT vocabulary of 30522 words, 512
    /// positions; 22.7M parameters (45 MB in BF16) in 103 tensors, 64 of
    /// them under 4 KiB (biases, `LayerNorm`s, token types).
    pub fn minilm_l6() -> Self {
        Self { arch: Arch::Bert, hidden: 384, kv_hidden: 384, intermediate: 1536, layers: 6, vocab: 30_522 }
    }

    /// The same encoder shrunk for smoke tests (~1 MB).
    pub fn minilm_quick() -> Self {
        Self { arch: Arch::Bert, hidden: 128, kv_hidden: 128, intermediate: 512, layers: 2, vocab: 1024 }
    }

    /// Parameter count.
    pub fn params(&self) -> usize {
        tensor_specs(self).iter().map(|t| t.shape.iter().product::<usize>()).sum()
    }
}

/// `n` times `scale`, rounded, at least 1.
pub fn scaled(n: usize, scale: f64) -> usize {
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
    /// Which tensors the model has. A BERT case has its own real shape
    /// ([`ModelShape::minilm_l6`], or [`ModelShape::minilm_quick`] in a quick
    /// run) whatever the run's scale.
    arch: Arch,
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
        match self.arch {
            Arch::Llama => ModelShape {
                layers: scaled(run.layers, self.size_factor),
                vocab: scaled(run.vocab, self.size_factor),
                ..*run
            },
            Arch::Bert if *run == ModelShape::quick() => ModelShape::minilm_quick(),
            Arch::Bert => ModelShape::minilm_l6(),
        }
    }

    /// Looks a case up by name.
    pub fn named(name: &str) -> Option<&'static Self> {
        CASES.iter().find(|c| c.name == name)
    }
}

/// Relative size of a fine-tune's update: per tensor, log-uniform in this
/// range times the tensor's spread.
pub const FINETUNE_REL: (f32, f32) = (1e-3, 1e-2);

const FINETUNE: Change = Change::Dense { rel_lo: FINETUNE_REL.0, rel_hi: FINETUNE_REL.1, heavy_tail: false };

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
        arch: Arch::Llama,
    },
    CaseSpec {
        name: "finetune-bf16",
        about: "dense fine-tune in BF16 (relative update 1e-3..1e-2 per tensor)",
        change: FINETUNE,
        storage: Storage::Bf16,
        shards: 1,
        size_factor: 1.0,
        arch: Arch::Llama,
    },
    CaseSpec {
        name: "finetune-fp32",
        about: "dense fine-tune in F32 (relative update 1e-3..1e-2 per tensor)",
        change: FINETUNE,
        storage: Storage::F32,
        shards: 1,
        size_factor: 1.0,
        arch: Arch::Llama,
    },
    CaseSpec {
        name: "finetune-fp16",
        about: "dense fine-tune in F16 (relative update 1e-3..1e-2 per tensor)",
        change: FINETUNE,
        storage: Storage::F16,
        shards: 1,
        size_factor: 1.0,
        arch: Arch::Llama,
    },
    CaseSpec {
        name: "finetune-fp8",
        about: "fine-tune re-quantised to F8_E4M3 with fixed per-tensor scales (relative update 1e-3..1e-2); embedding, lm_head and norms in BF16",
        change: FINETUNE,
        storage: Storage::Fp8,
        shards: 1,
        size_factor: 1.0,
        arch: Arch::Llama,
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
        arch: Arch::Llama,
    },
    CaseSpec {
        name: "partial-finetune-bf16",
        about: "frozen model (bit-identical tensors) with rank 8-16 LoRA updates merged into q/v of the upper half of the layers",
        change: Change::PartialLora,
        storage: Storage::Bf16,
        shards: 1,
        size_factor: 1.0,
        arch: Arch::Llama,
    },
    CaseSpec {
        name: "sharded-bf16",
        about: "dense BF16 fine-tune stored as 3 shards plus model.safetensors.index.json",
        change: FINETUNE,
        storage: Storage::Bf16,
        shards: 3,
        size_factor: 1.0,
        arch: Arch::Llama,
    },
    CaseSpec {
        name: "vocab-grow-bf16",
        about: "embedding and lm_head grow by V/16 appended rows; everything lightly fine-tuned (relative 1e-4..1e-3)",
        change: Change::VocabGrow { extra: 16 },
        storage: Storage::Bf16,
        shards: 1,
        size_factor: 1.0,
        arch: Arch::Llama,
    },
    CaseSpec {
        name: "minilm-finetune-bf16",
        about: "dense fine-tune in BF16 (relative update 1e-3..1e-2 per tensor) of a sentence-embedding encoder shaped like all-MiniLM-L6-v2: 103 tensors, 64 of them under 4 KiB (q/k/v/o, dense and pooler biases, LayerNorm weight and bias pairs)",
        change: FINETUNE,
        storage: Storage::Bf16,
        shards: 1,
        size_factor: 1.0,
        arch: Arch::Bert,
    },
    CaseSpec {
        name: "finetune-bf16-4x",
        about: "finetune-bf16 with 4x the layers and vocabulary (memory-flatness probe)",
        change: FINETUNE,
        storage: Storage::Bf16,
        shards: 1,
        size_factor: 4.0,
        arch: Arch::Llama,
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

/// What a tensor is, which decides how it is drawn and changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The token embedding (grows with the vocabulary).
    Embedding,
    /// The output projection (grows with the vocabulary).
    LmHead,
    /// A norm's scale, drawn near 1.
    Norm,
    /// A linear layer's weight matrix.
    Linear {
        /// Its layer.
        layer: usize,
        /// Whether the low-rank update case changes it.
        lora_target: bool,
    },
    /// Any other parameter drawn like a weight (biases, `LayerNorm` biases,
    /// position and token-type embeddings): kept in BF16 by the FP8 case and
    /// never grown.
    Param,
}

/// One tensor of a generated model.
#[derive(Clone, Debug)]
pub struct TensorSpec {
    /// Its name in the checkpoint.
    pub name: String,
    /// Its shape.
    pub shape: Vec<usize>,
    /// What it is.
    pub role: Role,
}

impl TensorSpec {
    /// Elements of the tensor.
    pub fn elements(&self) -> usize {
        self.shape.iter().product()
    }
}

/// The tensors of a model of this shape, in checkpoint order.
pub fn tensor_specs(m: &ModelShape) -> Vec<TensorSpec> {
    match m.arch {
        Arch::Llama => llama_specs(m),
        Arch::Bert => bert_specs(m),
    }
}

fn llama_specs(m: &ModelShape) -> Vec<TensorSpec> {
    let d = m.hidden;
    let kv = m.kv_hidden; // grouped-query attention: fewer k/v heads
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

/// Tensor names and shapes of a Hugging Face `BertModel` as sentence-transformers
/// checkpoints store them (no `bert.` prefix); weights are [out, in].
fn bert_specs(m: &ModelShape) -> Vec<TensorSpec> {
    let d = m.hidden;
    let spec = |name: String, shape: Vec<usize>, role: Role| TensorSpec { name, shape, role };
    let mut specs = vec![
        spec("embeddings.word_embeddings.weight".into(), vec![m.vocab, d], Role::Embedding),
        spec("embeddings.position_embeddings.weight".into(), vec![BERT_POSITIONS, d], Role::Param),
        spec("embeddings.token_type_embeddings.weight".into(), vec![BERT_TOKEN_TYPES, d], Role::Param),
        spec("embeddings.LayerNorm.weight".into(), vec![d], Role::Norm),
        spec("embeddings.LayerNorm.bias".into(), vec![d], Role::Param),
    ];
    for layer in 0..m.layers {
        let p = format!("encoder.layer.{layer}");
        let mut dense = |name: &str, rows: usize, cols: usize| {
            specs.push(spec(
                format!("{p}.{name}.weight"),
                vec![rows, cols],
                Role::Linear { layer, lora_target: name.ends_with("query") || name.ends_with("value") },
            ));
            specs.push(spec(format!("{p}.{name}.bias"), vec![rows], Role::Param));
        };
        dense("attention.self.query", d, d);
        dense("attention.self.key", d, d);
        dense("attention.self.value", d, d);
        dense("attention.output.dense", d, d);
        specs.push(spec(format!("{p}.attention.output.LayerNorm.weight"), vec![d], Role::Norm));
        specs.push(spec(format!("{p}.attention.output.LayerNorm.bias"), vec![d], Role::Param));
        let mut dense = |name: &str, rows: usize, cols: usize| {
            specs.push(spec(
                format!("{p}.{name}.weight"),
                vec![rows, cols],
                Role::Linear { layer, lora_target: false },
            ));
            specs.push(spec(format!("{p}.{name}.bias"), vec![rows], Role::Param));
        };
        dense("intermediate.dense", m.intermediate, d);
        dense("output.dense", d, m.intermediate);
        specs.push(spec(format!("{p}.output.LayerNorm.weight"), vec![d], Role::Norm));
        specs.push(spec(format!("{p}.output.LayerNorm.bias"), vec![d], Role::Param));
    }
    specs.push(spec("pooler.dense.weight".into(), vec![d, d], Role::Linear { layer: m.layers, lora_target: false }));
    specs.push(spec("pooler.dense.bias".into(), vec![d], Role::Param));
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
    let n = spec.elements();

    let std = draw_std(&mut rng);
    let base = draw_base(&mut rng, n, spec.role, std);
    let spread = spread(spec.role, std);

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
        (Storage::Bf16, _) | (Storage::Fp8, Role::Norm | Role::Embedding | Role::LmHead | Role::Param) => {
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

/// A tensor's own scale: weights are N(0, std) with std = 0.02 × a
/// log-uniform factor in [0.5, 2].
pub fn draw_std(rng: &mut ChaCha8Rng) -> f32 {
    0.02 * log_uniform(rng, 0.5, 2.0)
}

/// `n` base values of a tensor: N(1, 0.05) for a norm's scale, N(0, std)
/// for everything else.
pub fn draw_base(rng: &mut ChaCha8Rng, n: usize, role: Role, std: f32) -> Vec<f32> {
    let is_norm = role == Role::Norm;
    (0..n)
        .map(|_| {
            let z: f32 = rng.sample(StandardNormal);
            if is_norm {
                1.0 + 0.05 * z
            } else {
                std * z
            }
        })
        .collect()
}

/// The spread that a tensor's relative update is a fraction of: 0.05 for a
/// norm's scale, its std for everything else.
pub fn spread(role: Role, std: f32) -> f32 {
    if role == Role::Norm {
        0.05
    } else {
        std
    }
}

/// The fine-tuned values: each base value plus `step` × N(0, 1) (one
/// element in 20 moves 5× further with `heavy_tail`), drawn from `rng` in
/// element order.
pub fn dense_update(rng: &mut ChaCha8Rng, base: &[f32], step: f32, heavy_tail: bool) -> Vec<f32> {
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

/// A value log-uniform in [lo, hi].
pub fn log_uniform(rng: &mut ChaCha8Rng, lo: f32, hi: f32) -> f32 {
    let t: f32 = rng.gen();
    (lo.ln() + t * (hi.ln() - lo.ln())).exp()
}

fn to_bf16(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|&x| bf16::from_f32(x).to_le_bytes()).collect()
}

/// Rounds `v` to BF16 (to nearest, ties to even) into `out`, little-endian,
/// two bytes per value; `out` is exactly `2 * v.len()` bytes.
pub fn bf16_into(v: &[f32], out: &mut [u8]) {
    debug_assert_eq!(out.len(), 2 * v.len());
    for (&x, o) in v.iter().zip(out.chunks_exact_mut(2)) {
        o.copy_from_slice(&bf16::from_f32(x).to_le_bytes());
    }
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
pub fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// FNV-1a of `bytes`, to turn a name into a seed.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_is_deterministic() {
        let shape = ModelShape { arch: Arch::Llama, hidden: 16, kv_hidden: 8, intermediate: 40, layers: 2, vocab: 64 };
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
        let shape =
            ModelShape { arch: Arch::Llama, hidden: 256, kv_hidden: 128, intermediate: 512, layers: 1, vocab: 256 };
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

    #[test]
    fn minilm_is_real_shaped() {
        let specs = tensor_specs(&ModelShape::minilm_l6());
        let small = specs.iter().filter(|t| 2 * t.elements() < 4096).count();
        let params: usize = specs.iter().map(TensorSpec::elements).sum();
        eprintln!("{} tensors, {small} under 4 KiB, {params} parameters", specs.len());
        assert_eq!(specs.len(), 103);
        assert_eq!(small, 64);
        assert_eq!(params, 22_713_216);
        let names: std::collections::HashSet<_> = specs.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names.len(), specs.len());
        for name in
            ["encoder.layer.5.attention.self.value.bias", "encoder.layer.0.output.LayerNorm.bias", "pooler.dense.bias"]
        {
            assert!(names.contains(name), "{name}");
        }
        let case = CaseSpec::named("minilm-finetune-bf16").expect("case");
        assert_eq!(case.shape(&ModelShape::default_scaled(1.0)), ModelShape::minilm_l6());
        assert_eq!(case.shape(&ModelShape::quick()), ModelShape::minilm_quick());
        // A fine-tune changes small tensors too.
        let bias = specs.iter().position(|t| t.name.ends_with("query.bias")).expect("bias");
        let p = generate_pair(case, &ModelShape::minilm_l6(), &specs[bias], 9);
        assert_eq!(p.base.len(), 768);
        assert_ne!(p.base, p.target);
    }

    #[test]
    fn minilm_case_is_a_valid_checkpoint_pair() {
        let dir = std::env::temp_dir().join(format!("tpde-bench-minilm-{}", std::process::id()));
        let case = CaseSpec::named("minilm-finetune-bf16").expect("case");
        // The quick run's shape: the same tensors, small enough for a debug test.
        let paths = ensure_case(&dir, case, &ModelShape::quick(), 3).expect("generate");
        let specs = tensor_specs(&ModelShape::minilm_quick());
        for path in [&paths.base, &paths.target] {
            let c = tpde::Checkpoint::open(path).expect("tpde opens the file");
            assert_eq!(c.files[0].tensors.len(), specs.len());
            for s in &specs {
                let (_, loc) = c.tensor(&s.name).expect("tensor");
                assert_eq!(loc.shape, s.shape.iter().map(|&d| d as u64).collect::<Vec<_>>());
            }
        }
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn llama_keeps_its_bytes() {
        // The refactor into shared draw functions must not move a byte of
        // the cached corpus: a fixed digest of one generated tensor.
        let shape = ModelShape::quick();
        let specs = tensor_specs(&shape);
        let case = CaseSpec::named("finetune-bf16").expect("case");
        let linear = generate_pair(case, &shape, &specs[2], 11);
        assert_eq!((fnv1a(&linear.base), fnv1a(&linear.target)), (0x471f_e92b_9515_1ea7, 0xae19_8bf1_91da_3aa3));
        let norm = generate_pair(case, &shape, &specs[1], 11);
        assert_eq!((fnv1a(&norm.base), fnv1a(&norm.target)), (0xc0e8_dda7_ddd7_a675, 0x3b86_8bed_b847_ba36));
    }
}
