//! Codecs: how positions and values become streams, and how streams are stored
//! (spec §8).

pub mod positions;
pub mod rans;
pub mod values;
pub mod zstd_stream;
