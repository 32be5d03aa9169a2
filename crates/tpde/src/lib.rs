//! Lossless checkpoint deltas.
//!
//! A target checkpoint is stored as a base checkpoint plus a delta file: per tensor,
//! independent checksummed chunks that are unchanged, sparse (changed positions as
//! gaps, plus values), dense (every word against its base) or raw. Reconstruction is
//! defined on bit patterns and proven by digests, so it is bit-exact. The format is
//! specified in `spec/FORMAT.md`.

pub mod codec;
pub mod container;
pub mod delta;
pub mod digest;
pub mod dtype;
pub mod error;
pub mod limits;

pub use error::{Error, ErrorCode, Result};
