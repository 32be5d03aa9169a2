//! Whole tensors encoded in memory by the format library's chunk encoder
//! ([`tpde::format::encode_chunk`]), for callers that hold a base and a
//! target rather than a delta file (the benchmarks, tests, and weight sync
//! where both sides are in memory).

use rayon::prelude::*;
use tpde::{format::EncodedChunk, EncodeSettings, WordWidth};

use crate::error::{GpuError, Result};
use crate::pipeline::{Checksums, ChunkRef, TensorRef};

/// One tensor as a list of the library's encoded chunks.
#[derive(Clone, Debug)]
pub struct EncodedTensor {
    /// Tensor name.
    pub name: String,
    /// Word width.
    pub width: WordWidth,
    /// Target words.
    pub words: u64,
    /// Words per chunk (the last chunk may be shorter).
    pub chunk_words: u32,
    /// The chunks, in order.
    pub chunks: Vec<EncodedChunk>,
}

impl EncodedTensor {
    /// Encodes `target` against `base` with the format library, chunk by
    /// chunk in parallel. `base` may be shorter than `target` (its missing
    /// words are zero) and `None` stores every chunk raw. `leading_sign`
    /// says whether the dtype has a sign bit on top (floats), which lets the
    /// writer consider rotated byte planes.
    pub fn encode(
        name: &str,
        base: Option<&[u8]>,
        target: &[u8],
        width: WordWidth,
        chunk_words: u32,
        leading_sign: bool,
        settings: EncodeSettings,
    ) -> Result<Self> {
        let w = width.bytes();
        if !target.len().is_multiple_of(w) || chunk_words == 0 {
            return Err(GpuError::invalid("the target must be whole words and chunks non-empty"));
        }
        let chunk_bytes = chunk_words as usize * w;
        let chunks = target
            .par_chunks(chunk_bytes)
            .enumerate()
            .map(|(i, t)| {
                let b = base.map(|b| {
                    let start = (i * chunk_bytes).min(b.len());
                    &b[start..(start + t.len()).min(b.len())]
                });
                Ok(tpde::format::encode_chunk(t, b, width, leading_sign, settings)?)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { name: name.to_string(), width, words: (target.len() / w) as u64, chunk_words, chunks })
    }

    /// Borrowed view for the loader (stored bytes in pageable memory).
    #[must_use]
    pub fn as_ref(&self) -> TensorRef<'_> {
        let mut left = self.words;
        let chunks = self
            .chunks
            .iter()
            .map(|c| {
                let words = left.min(u64::from(self.chunk_words));
                left -= words;
                ChunkRef {
                    record: c.record,
                    streams: &c.streams,
                    stored: &c.data,
                    // at most chunk_words, a u32
                    words: u32::try_from(words).unwrap_or(u32::MAX),
                    resolved_positions: None,
                }
            })
            .collect();
        TensorRef {
            name: self.name.clone(),
            width: self.width,
            words: self.words,
            chunk_words: self.chunk_words,
            first_chunk: 0,
            chunks,
            host: None,
            checksums: Checksums::Checked,
        }
    }

    /// Stored bytes of all streams.
    #[must_use]
    pub fn stored_bytes(&self) -> usize {
        self.chunks.iter().map(|c| c.data.len()).sum()
    }
}
