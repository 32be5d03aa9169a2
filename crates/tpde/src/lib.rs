//! Lossless checkpoint deltas.
//!
//! A target checkpoint is stored as a base checkpoint plus a delta file: per tensor,
//! independent checksummed chunks that are unchanged, sparse (changed positions as
//! gaps, plus values), dense (every word against its base) or raw. Reconstruction is
//! defined on bit patterns and proven by digests, so it is bit-exact. The format is
//! specified in `spec/FORMAT.md`.
//!
//! ```no_run
//! use std::path::Path;
//! use tpde::{Checkpoint, DeltaFile, EncodeOptions, NoProgress};
//!
//! # fn main() -> tpde::Result<()> {
//! let base = Checkpoint::open(Path::new("base.safetensors"))?;
//! let target = Checkpoint::open(Path::new("target.safetensors"))?;
//! tpde::encode(Some(&base), &target, Path::new("d.tpde"), EncodeOptions::default(), &NoProgress)?;
//! let delta = DeltaFile::open(Path::new("d.tpde"))?;
//! tpde::apply(&delta, Some(&base), Path::new("rebuilt.safetensors"), Default::default(), &NoProgress)?;
//! # Ok(())
//! # }
//! ```
//!
//! Everything a program needs is at the crate root: checkpoints and tensor
//! sources ([`Checkpoint`], [`TensorMap`]), element types ([`Dtype`], whose
//! [`WordWidth`] is the width of the words the format works on), the whole-file
//! operations ([`encode`], [`apply`], [`verify`], [`inspect`]), random access
//! ([`DeltaFile`], [`DeltaModel`]) and series ([`Series`]). The on-disk records,
//! codecs and chunk-level functions, for tools that forge or inspect files, are in
//! [`format`](mod@format).
#![deny(missing_docs)]

mod changed;
mod checkpoint;
mod codec;
mod container;
mod delta;
mod digest;
mod dtype;
mod error;
pub mod format;
mod limits;
mod model;
mod output;
mod pipeline;
mod ranged;
mod reader;
mod series;
mod source;
mod writer;

pub use checkpoint::{Checkpoint, CheckpointFile, TensorLocation, INDEX_FILE};
pub use container::header::{BaseTensor, LayoutKind, TensorEntry};
pub use delta::{DecodeCost, DecodeScratch, EncodeSettings, WRITABLE_FORMAT_VERSIONS, ZSTD_MIN_SAVING};
pub use dtype::{Dtype, WordWidth};
pub use error::{escape_for_terminal, Error, ErrorCode, Result};
pub use limits::DEFAULT_CHUNK_WORDS;
pub use model::{even_row_shard, DeltaModel, OwnedSource};
pub use output::{check_free, check_not_an_input, remove_pending_outputs, remove_stale_temporaries, Leftover};
pub use pipeline::apply::{
    apply, apply_chain, chain_cut_alike, check_link, resolve_base, verify, ApplyOptions, ApplySummary,
};
pub use pipeline::encode::{encode, encode_sources, encode_sources_against, encode_to, EncodeOptions, EncodeSummary};
pub use pipeline::inspect::{inspect, inspect_structure, Checked, EncodingMix, Report, TensorReport};
pub use pipeline::subset::apply_tensors;
pub use pipeline::{NoProgress, Progress};
pub use ranged::{RangeSink, RangeSource};
pub use reader::{ChunkSpan, DeltaFile};
pub use series::{
    content_step, AddOptions, AddSummary, Candidate, CheckpointDigest, FileDigest, Manifest, PruneSummary, Series,
    StepEntry, StepKind, VerifySummary,
};
pub use source::{MemoryTensor, SourceFile, SourceTensor, TensorBytes, TensorMap, TensorSource};
