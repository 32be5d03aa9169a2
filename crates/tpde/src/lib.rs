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
//! use tpde::{Checkpoint, DeltaFile, pipeline};
//!
//! # fn main() -> tpde::Result<()> {
//! let base = Checkpoint::open(Path::new("base.safetensors"))?;
//! let target = Checkpoint::open(Path::new("target.safetensors"))?;
//! let options = pipeline::encode::EncodeOptions::default();
//! pipeline::encode::encode(Some(&base), &target, Path::new("d.tpde"), options, &pipeline::NoProgress)?;
//! let delta = DeltaFile::open(Path::new("d.tpde"))?;
//! pipeline::apply::apply(&delta, Some(&base), Path::new("rebuilt.safetensors"), Default::default(), &pipeline::NoProgress)?;
//! # Ok(())
//! # }
//! ```

pub mod checkpoint;
pub mod codec;
pub mod container;
pub mod delta;
pub mod digest;
pub mod dtype;
pub mod error;
pub mod limits;
pub mod model;
pub mod output;
pub mod pipeline;
pub mod reader;
pub mod series;
pub mod source;
pub mod writer;

pub use checkpoint::Checkpoint;
pub use error::{Error, ErrorCode, Result};
pub use model::DeltaModel;
pub use reader::DeltaFile;
pub use source::{MemoryTensor, TensorMap, TensorSource};
