//! Reference encoder of whole tensors into owned chunk streams, for the
//! tests and the benchmarks (the format library is the real writer).

use rayon::prelude::*;

use crate::error::Result;
use crate::pipeline::{ChunkRef, Codec, StreamRef, TensorRef};
use crate::reference::{encode_chunk, EncodeChoice};
use crate::spec::{ChunkSpec, ValueLayout, ValueOp, WordWidth};

/// One stored stream, owned.
#[derive(Clone, Debug)]
pub struct OwnedStream {
    /// Codec of `bytes`.
    pub codec: Codec,
    /// Stored bytes.
    pub bytes: Vec<u8>,
    /// Decoded length.
    pub decoded_len: usize,
}

/// One encoded tensor, owned.
#[derive(Clone, Debug)]
pub struct EncodedTensor {
    /// Tensor name.
    pub name: String,
    /// Word width.
    pub width: WordWidth,
    /// Target words.
    pub words: u64,
    /// Words per chunk.
    pub chunk_words: u32,
    /// Chunks with their streams.
    pub chunks: Vec<(ChunkSpec, Vec<OwnedStream>)>,
}

/// Settings of the reference encoder.
#[derive(Clone, Copy, Debug)]
pub struct EncodeSettings {
    /// Encoding of changed chunks.
    pub choice: EncodeChoice,
    /// Value operation.
    pub op: ValueOp,
    /// Value layout.
    pub layout: ValueLayout,
    /// zstd level, or `None` to store streams uncompressed.
    pub zstd_level: Option<i32>,
    /// Words per chunk.
    pub chunk_words: u32,
}

impl EncodedTensor {
    /// Encodes `target` against `base` (same length, whole words).
    pub fn encode(
        name: &str,
        base: &[u8],
        target: &[u8],
        width: WordWidth,
        s: EncodeSettings,
    ) -> Result<Self> {
        let cb = s.chunk_words as usize * width.bytes();
        let chunks = base
            .par_chunks(cb)
            .zip(target.par_chunks(cb))
            .map(|(b, t)| {
                let c = encode_chunk(b, t, width, s.choice, s.op, s.layout)?;
                let streams = c
                    .streams
                    .into_iter()
                    .map(|bytes| {
                        let decoded_len = bytes.len();
                        match s.zstd_level {
                            Some(level) => {
                                let z = zstd::bulk::compress(&bytes, level)
                                    .map_err(|e| crate::GpuError::invalid(e.to_string()))?;
                                // zstd only where it saves at least 2%: a stored
                                // stream decodes at memcpy speed.
                                if z.len() * 50 < decoded_len * 49 {
                                    Ok(OwnedStream {
                                        codec: Codec::Zstd,
                                        bytes: z,
                                        decoded_len,
                                    })
                                } else {
                                    Ok(OwnedStream {
                                        codec: Codec::Stored,
                                        bytes,
                                        decoded_len,
                                    })
                                }
                            }
                            None => Ok(OwnedStream {
                                codec: Codec::Stored,
                                bytes,
                                decoded_len,
                            }),
                        }
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok((c.spec, streams))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            name: name.to_string(),
            width,
            words: (target.len() / width.bytes()) as u64,
            chunk_words: s.chunk_words,
            chunks,
        })
    }

    /// Borrowed view for the loader.
    #[must_use]
    pub fn as_ref(&self) -> TensorRef<'_> {
        TensorRef {
            name: self.name.clone(),
            width: self.width,
            words: self.words,
            chunk_words: self.chunk_words,
            chunks: self
                .chunks
                .iter()
                .map(|(spec, st)| ChunkRef {
                    spec: *spec,
                    streams: st
                        .iter()
                        .map(|s| StreamRef {
                            codec: s.codec,
                            bytes: &s.bytes,
                            decoded_len: s.decoded_len,
                        })
                        .collect(),
                })
                .collect(),
        }
    }

    /// Stored bytes of all streams.
    #[must_use]
    pub fn stored_bytes(&self) -> usize {
        self.chunks
            .iter()
            .flat_map(|(_, s)| s)
            .map(|s| s.bytes.len())
            .sum()
    }
}
