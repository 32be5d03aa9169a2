//! `apply` with a base: the first input byte picks one of two fixed golden bases
//! (the single file of `mixed`, or the two shards and index of `sharded`), the
//! rest is a delta whose checksums are resealed so that mutations reach the checks
//! behind them. The delta is validated in memory, the base resolved against it
//! (spec §11.2), then every file of the target is rebuilt in output order into a
//! sink that hashes and discards, one chunk buffer at a time, as `apply` writes.
//!
//! Any input must give a clean error or a target whose every tensor hashes to its
//! header digest: a panic, an abort or a rebuilt tensor that differs from its
//! digest is a bug.
#![no_main]

mod common;
mod reseal;

use std::path::Path;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tpde::{resolve_base, NoProgress, Checkpoint, DeltaFile, format::{leaf_digest, to_hex, tree_digest}};
use xxhash_rust::xxh3::Xxh3;

static MIXED_BASE: &[u8] = include_bytes!("../../valid/mixed/base.safetensors");
static SHARDED_INDEX: &[u8] = include_bytes!("../../valid/sharded/base/model.safetensors.index.json");
static SHARDED_SHARDS: [(&str, &[u8]); 2] = [
    ("model-00001-of-00002.safetensors", include_bytes!("../../valid/sharded/base/model-00001-of-00002.safetensors")),
    ("model-00002-of-00002.safetensors", include_bytes!("../../valid/sharded/base/model-00002-of-00002.safetensors")),
];

/// The two bases, written once per process and opened as a user's base would be.
fn bases() -> &'static [Checkpoint; 2] {
    static BASES: OnceLock<[Checkpoint; 2]> = OnceLock::new();
    BASES.get_or_init(|| {
        let file = common::scratch().join("base.safetensors");
        std::fs::write(&file, MIXED_BASE).expect("write the base");
        let dir = common::scratch().join("base-sharded");
        std::fs::create_dir_all(&dir).expect("create the sharded base");
        std::fs::write(dir.join(tpde::INDEX_FILE), SHARDED_INDEX).expect("write the index");
        for (name, bytes) in SHARDED_SHARDS {
            std::fs::write(dir.join(name), bytes).expect("write a shard");
        }
        [
            Checkpoint::open(&file).expect("the golden base opens"),
            Checkpoint::open(&dir).expect("the golden sharded base opens"),
        ]
    })
}

/// Rebuilds the target file by file into a hashing sink; `Err` is a clean
/// rejection. Panics if a tensor is accepted whose bytes differ from its digest.
fn apply_into_sink(delta: &DeltaFile, base: &Checkpoint) -> tpde::Result<Vec<u64>> {
    let bases = resolve_base(delta, Some(base), &NoProgress)?;
    let header = delta.header();
    let mut file_hashes = Vec::with_capacity(header.target.files.len());
    let mut chunk = Vec::new();
    for (f, file) in header.target.files.iter().enumerate() {
        let mut sink = Xxh3::new();
        sink.update(&(file.safetensors_header.len() as u64).to_le_bytes());
        sink.update(file.safetensors_header.as_bytes());
        for (tensor, base_bytes) in header.tensors.iter().zip(&bases).filter(|(t, _)| t.file as usize == f) {
            let mut leaves = Vec::new();
            for span in delta.spans(tensor)? {
                chunk.clear();
                delta.decode_chunk(tensor, span, *base_bytes, &mut chunk)?;
                sink.update(&chunk);
                leaves.push(leaf_digest(&chunk));
            }
            // Every chunk digest matched, so the tensor digest must too (spec §10.2).
            assert_eq!(to_hex(&tree_digest(&leaves)), tensor.digest, "tensor {:?} was rebuilt wrong", tensor.name);
        }
        file_hashes.push(sink.digest());
    }
    Ok(file_hashes)
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, delta)) = data.split_first() else { return };
    let base = &bases()[usize::from(selector & 1)];
    let mut delta = delta.to_vec();
    reseal::reseal(&mut delta);
    if let Ok(delta) = DeltaFile::from_bytes(Path::new("fuzz-input.tpde"), delta) {
        let _ = apply_into_sink(&delta, base);
    }
});
