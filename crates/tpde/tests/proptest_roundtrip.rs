//! Writer → reader round trips over every dtype (all word widths), shapes with
//! empty dimensions and scalars, change densities from none to all, chunk sizes,
//! and bases that are missing, shorter or longer than the target.
//!
//! `PROPTEST_CASES` sets the number of cases (default 96, sized for a debug build).

use std::path::Path;

use proptest::prelude::*;
use tpde::{Checkpoint, DeltaFile, EncodeOptions, NoProgress};

const DTYPES: [&str; 20] = [
    "BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "I16", "U16", "F16", "BF16",
    "I32", "U32", "F32", "C64", "F64", "I64", "U64",
];

fn bits(dtype: &str) -> u64 {
    match dtype {
        "F4" => 4,
        "F6_E2M3" | "F6_E3M2" => 6,
        "I16" | "U16" | "F16" | "BF16" => 16,
        "I32" | "U32" | "F32" => 32,
        "C64" | "F64" | "I64" | "U64" => 64,
        _ => 8,
    }
}

fn word_bytes(dtype: &str) -> usize {
    match dtype {
        "C64" => 4,
        d => usize::try_from(bits(d).div_ceil(8)).expect("small"),
    }
}

fn byte_len(dtype: &str, shape: &[u64]) -> usize {
    usize::try_from(shape.iter().product::<u64>() * bits(dtype) / 8).expect("small")
}

mod safetensors_support;
use safetensors_support::{safetensors, Tensor};

/// How one tensor of a case is made.
#[derive(Debug, Clone)]
struct TensorPlan {
    dtype: &'static str,
    rank: usize,
    rows: u64,
    cols: u64,
    /// 0: no base tensor; 1: same shape; 2: leading dim shorter; 3: longer.
    base_kind: u8,
    base_delta: u64,
    density: f64,
    seed: u64,
}

fn tensor_plan() -> impl Strategy<Value = TensorPlan> {
    (
        0..DTYPES.len(),
        0usize..=3,
        0u64..6,
        1u64..4,
        0u8..4,
        1u64..4,
        prop_oneof![Just(0.0), Just(1.0), 0.0..=1.0f64],
        any::<u64>(),
    )
        .prop_map(|(d, rank, rows, cols, base_kind, base_delta, density, seed)| TensorPlan {
            dtype: DTYPES[d],
            rank,
            rows,
            cols,
            base_kind,
            base_delta,
            density,
            seed,
        })
}

/// xorshift, so that the bytes follow from the plan's seed.
struct Bits(u64);
impl Bits {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn byte(&mut self) -> u8 {
        self.next().to_le_bytes()[0]
    }
}

fn make(plan: &TensorPlan, name: &str) -> (Tensor, Option<Tensor>) {
    // Sub-byte dtypes need whole bytes: rows of 8 elements keep every shape valid.
    let unit = if bits(plan.dtype) < 8 { 8 } else { 1 };
    let rank = if unit > 1 { plan.rank.max(1) } else { plan.rank };
    let shape_with = |rows: u64| -> Vec<u64> {
        match rank {
            0 => vec![],
            1 => vec![rows * unit],
            2 => vec![rows, plan.cols * unit],
            _ => vec![rows, 2, plan.cols * unit],
        }
    };
    let shape = shape_with(plan.rows);
    let mut bits_rng = Bits(plan.seed | 1);
    let base = (plan.base_kind > 0).then(|| {
        let rows = match (rank, plan.base_kind) {
            (0, _) | (_, 1) => plan.rows,
            (_, 2) => plan.rows.saturating_sub(plan.base_delta),
            _ => plan.rows + plan.base_delta,
        };
        let shape = shape_with(rows);
        let bytes = (0..byte_len(plan.dtype, &shape)).map(|_| bits_rng.byte()).collect();
        Tensor { name: name.to_owned(), dtype: plan.dtype, shape, bytes }
    });
    let len = byte_len(plan.dtype, &shape);
    let wb = word_bytes(plan.dtype);
    let mut bytes: Vec<u8> = (0..len).map(|_| bits_rng.byte()).collect();
    if let Some(base) = &base {
        let shared = len.min(base.bytes.len());
        bytes[..shared].copy_from_slice(&base.bytes[..shared]);
        for word in bytes.chunks_exact_mut(wb) {
            #[allow(clippy::cast_precision_loss)]
            let roll = (bits_rng.next() >> 11) as f64 / (1u64 << 53) as f64;
            if roll < plan.density {
                let k = usize::try_from(bits_rng.next() % wb as u64).expect("small");
                word[k] ^= 1 << (bits_rng.next() % 8);
            }
        }
    }
    (Tensor { name: name.to_owned(), dtype: plan.dtype, shape, bytes }, base)
}

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(96);
    ProptestConfig { cases, ..ProptestConfig::default() }
}

fn encode(base: Option<&Checkpoint>, target: &Checkpoint, out: &Path, chunk_words: u64) {
    let options = EncodeOptions { chunk_words, ..EncodeOptions::default() };
    tpde::encode(base, target, out, options, &NoProgress).expect("encode");
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn encode_then_verify_rebuilds_the_target(plans in prop::collection::vec(tensor_plan(), 1..=3), chunk_words in prop_oneof![1u64..=8, 9u64..=70]) {
        let dir = tempfile::tempdir().expect("a temp dir");
        let mut targets = Vec::new();
        let mut bases = Vec::new();
        for (i, plan) in plans.iter().enumerate() {
            let (target, base) = make(plan, &format!("t{i}"));
            targets.push(target);
            bases.extend(base);
        }
        let target_path = dir.path().join("target.safetensors");
        std::fs::write(&target_path, safetensors(&targets)).expect("write");
        let target = Checkpoint::open(&target_path).expect("the target opens");
        let base = (!bases.is_empty()).then(|| {
            let path = dir.path().join("base.safetensors");
            std::fs::write(&path, safetensors(&bases)).expect("write");
            Checkpoint::open(&path).expect("the base opens")
        });
        let delta_path = dir.path().join("d.tpde");
        encode(base.as_ref(), &target, &delta_path, chunk_words);
        let delta = DeltaFile::open(&delta_path).expect("the delta opens");
        tpde::verify(&delta, base.as_ref(), Some(&target), &NoProgress).expect("rebuilds the target byte for byte");
        for (entry, original) in delta.header().tensors.iter().zip(&targets) {
            let base_bytes = base.as_ref().and_then(|b| b.tensor(&entry.name)).map(|(f, l)| f.tensor_bytes(l));
            let bytes = delta.decode_tensor(entry, entry.base.as_ref().and(base_bytes)).expect("decodes");
            prop_assert_eq!(&bytes, &original.bytes);
        }
        // The same inputs give the same bytes.
        let again = dir.path().join("again.tpde");
        encode(base.as_ref(), &target, &again, chunk_words);
        prop_assert!(std::fs::read(&again).expect("read") == std::fs::read(&delta_path).expect("read"));
    }
}

/// Runs `work` on a pool of `threads` threads.
fn with_threads<T: Send>(threads: usize, work: impl FnOnce() -> T + Send) -> T {
    rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("a thread pool").install(work)
}

#[test]
fn encode_writes_the_same_bytes_whatever_the_thread_count() {
    // BF16 fine-tune-like tensors of one and of several chunks, so that windows of
    // chunks cross tensor boundaries, dense and sparse, grouped or not.
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut bases = Vec::new();
    let mut targets = Vec::new();
    for (i, (words, changed_in_16)) in
        [(300u64, 16u64), (5000, 10), (64, 1), (9000, 15), (2500, 3)].into_iter().enumerate()
    {
        let base: Vec<u16> = (0..words).map(|_| 0x3C00 ^ u16::try_from(next() % 0x0800).expect("small")).collect();
        let target: Vec<u16> = base
            .iter()
            .map(|&b| {
                if next() % 16 < changed_in_16 {
                    b.wrapping_add(u16::try_from(next() % 5).expect("small"))
                } else {
                    b
                }
            })
            .collect();
        let tensor = |words: &[u16]| Tensor {
            name: format!("layer{i}.weight"),
            dtype: "BF16",
            shape: vec![words.len() as u64],
            bytes: words.iter().flat_map(|w| w.to_le_bytes()).collect(),
        };
        bases.push(tensor(&base));
        targets.push(tensor(&target));
    }
    let dir = tempfile::tempdir().expect("a temp dir");
    let write = |name: &str, tensors: &[Tensor]| {
        let path = dir.path().join(name);
        std::fs::write(&path, safetensors(tensors)).expect("write");
        Checkpoint::open(&path).expect("opens")
    };
    let (base, target) = (write("base.safetensors", &bases), write("target.safetensors", &targets));
    let encoded: Vec<Vec<u8>> = [1, 2, 3, 5]
        .into_iter()
        .map(|threads| {
            let out = dir.path().join(format!("{threads}.tpde"));
            with_threads(threads, || encode(Some(&base), &target, &out, 1024));
            std::fs::read(&out).expect("read")
        })
        .collect();
    assert!(encoded.iter().all(|bytes| *bytes == encoded[0]), "the thread count changed the delta");
    for threads in [1, 3] {
        let delta = DeltaFile::open(&dir.path().join("1.tpde")).expect("the delta opens");
        with_threads(threads, || tpde::verify(&delta, Some(&base), Some(&target), &NoProgress))
            .expect("rebuilds the target byte for byte");
        // A caller's pool of one thread runs the chunks it waits for itself.
        let out = dir.path().join(format!("applied-{threads}.safetensors"));
        with_threads(threads, || tpde::apply(&delta, Some(&base), &out, tpde::ApplyOptions::default(), &NoProgress))
            .expect("applies");
        assert!(
            std::fs::read(&out).expect("read") == std::fs::read(dir.path().join("target.safetensors")).expect("read"),
            "apply on a pool of {threads} threads rebuilt other bytes"
        );
    }
}
