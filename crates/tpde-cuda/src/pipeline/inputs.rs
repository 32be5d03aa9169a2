//! The loader's inputs: a delta's chunks and tensors as the format library
//! stores them, with the checks of their shapes.

use std::sync::Arc;

use rayon::prelude::*;
use tpde::{
    format::{ChunkRecord, Codec, Encoding, PositionCoding, StreamRecord},
    ErrorCode, WordWidth,
};

use crate::error::{GpuError, Result};

/// One chunk of a delta, as the format library stores it: its record, its
/// stream records and its stored bytes (every stream back to back).
#[derive(Clone, Debug)]
pub struct ChunkRef<'a> {
    /// The chunk record (`spec/FORMAT.md` §6.1).
    pub record: ChunkRecord,
    /// One record per stream, positions first (§6.2).
    pub streams: &'a [StreamRecord],
    /// The stored bytes of all streams.
    pub stored: &'a [u8],
    /// Words in the chunk.
    pub words: u32,
    /// For a chunk of position coding 3 (temporal positions, §8.3): its
    /// positions, decoded on the CPU against the reference delta
    /// ([`tpde::DeltaFile::chunk_positions`]), as `changed_count` little-endian
    /// `u32`. The kernels read them in place of the position streams. `None`
    /// for every other chunk.
    pub resolved_positions: Option<Arc<[u8]>>,
}

impl<'a> ChunkRef<'a> {
    /// Checks the records against each other and the chunk size with the
    /// format library's [`tpde::format::check_chunk_shape`] (§8.1–§8.4).
    /// Both value orders (§8.6) are read by the kernels.
    /// A chunk of position coding 3 (temporal positions, §8.3) needs its
    /// [`ChunkRef::resolved_positions`], one per changed word: else it is
    /// refused here, before anything is written.
    pub fn check_shape(&self, width: WordWidth) -> Result<()> {
        tpde::format::check_chunk_shape(&self.record, self.streams, u64::from(self.words), width)?;
        if self.has_split_positions() {
            let Some(positions) = &self.resolved_positions else {
                return Err(GpuError::Format(tpde::Error::new(
                    ErrorCode::ReferenceRequired,
                    "the chunk codes its positions against a reference delta, which was not given; open the \
                     delta with its position reference (tpde::DeltaFile::with_position_reference)",
                )));
            };
            if positions.len() != 4 * self.record.changed_count as usize {
                return Err(GpuError::invalid("the resolved positions differ in number from the changed words"));
            }
        }
        Ok(())
    }

    /// Whether the chunk is sparse with positions of coding 3, which the
    /// kernels read from [`ChunkRef::resolved_positions`].
    #[must_use]
    pub fn has_split_positions(&self) -> bool {
        self.record.encoding == Encoding::Sparse && self.record.position_coding == PositionCoding::SplitByReference
    }

    /// [`ChunkRef::check_shape`], and that the stored bytes are as long as
    /// the record says.
    pub fn validate(&self, width: WordWidth) -> Result<()> {
        self.check_shape(width)?;
        if self.stored.len() != self.record.stored_len as usize {
            return Err(GpuError::corrupt("the chunk's stored bytes differ from its stored length"));
        }
        Ok(())
    }

    /// Number of position streams (they come first).
    #[must_use]
    pub fn position_stream_count(&self) -> usize {
        match (self.record.encoding, self.record.position_coding) {
            (Encoding::Sparse, PositionCoding::Gaps) => usize::from(self.record.gap_width),
            (Encoding::Sparse, PositionCoding::Bitmap) => 1,
            (Encoding::Sparse, PositionCoding::SplitByReference) => 1 + usize::from(self.record.gap_width),
            _ => 0,
        }
    }

    /// Whether stream `q` is a position stream of coding 3, which the kernels
    /// read from [`ChunkRef::resolved_positions`] instead.
    #[must_use]
    pub fn is_resolved_stream(&self, q: usize) -> bool {
        self.has_split_positions() && q < self.position_stream_count()
    }

    /// The resolved positions as a stored stream for the host's copy into a
    /// staging slot: a record of their length and their bytes.
    pub(super) fn resolved_positions_stream(&self) -> Result<Option<(StreamRecord, &[u8])>> {
        let Some(list) = self.resolved_positions.as_deref() else { return Ok(None) };
        let len = u32::try_from(list.len()).map_err(|_| GpuError::invalid("positions above 2^32 bytes"))?;
        Ok(Some((StreamRecord { stored_len: len, decoded_len: len, codec: Codec::Stored }, list)))
    }

    /// Bytes the kernels read at stream `q`'s place on the device: its decoded
    /// length, except in a chunk of position coding 3, whose positions they
    /// read as `u32` at stream 0's place and whose other position streams
    /// they do not read.
    #[must_use]
    pub fn device_stream_len(&self, q: usize) -> usize {
        if self.is_resolved_stream(q) {
            return if q == 0 { 4 * self.record.changed_count as usize } else { 0 };
        }
        self.streams.get(q).map_or(0, |r| r.decoded_len as usize)
    }

    /// The stored bytes of each stream, in order (the chunk is validated).
    pub fn stored_streams(&self) -> impl Iterator<Item = &'a [u8]> + 'a {
        let stored = self.stored;
        self.streams.iter().scan(0usize, move |at, r| {
            let start = *at;
            *at += r.stored_len as usize;
            stored.get(start..*at)
        })
    }

    /// Checks the stored bytes against the record's checksum (spec §10);
    /// `label` names the tensor and the chunk's index in the file.
    pub(super) fn check_checksum(&self, label: Option<(&str, u64)>) -> Result<()> {
        if tpde::format::checksum64(self.stored) == self.record.checksum {
            return Ok(());
        }
        let e = tpde::Error::new(ErrorCode::ChunkChecksum, "the chunk's stored bytes do not match its checksum");
        Err(GpuError::Format(match label {
            Some((tensor, index)) => e.in_tensor(tensor).in_chunk(index),
            None => e,
        }))
    }

    /// Whether the kernels read the base words of the whole chunk range from
    /// the output (unchanged and sparse chunks leave words untouched).
    fn reads_out(&self) -> bool {
        !matches!(self.record.encoding, Encoding::Dense | Encoding::Raw)
    }
}

/// Whether the loader still has to check a tensor's chunk checksums (spec §10).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Checksums {
    /// Checked already, or the bytes are trusted.
    #[default]
    Checked,
    /// The loader checks every chunk on the CPU, in one parallel pass before
    /// its first upload and before anything is written. For a delta mapped
    /// from a file, that pass also brings its pages in on every thread at
    /// once.
    OnUpload,
}

/// One tensor of a delta.
#[derive(Clone, Debug)]
pub struct TensorRef<'a> {
    /// Tensor name.
    pub name: String,
    /// Word width of its dtype.
    pub width: WordWidth,
    /// Words of the target tensor.
    pub words: u64,
    /// Words per chunk (the last chunk may be shorter).
    pub chunk_words: u32,
    /// Index of its first chunk in the delta file's chunk table, which
    /// errors name with the chunk's position (0 for tensors not from a file).
    pub first_chunk: u64,
    /// Its chunks, in order.
    pub chunks: Vec<ChunkRef<'a>>,
    /// A page-locked host buffer that holds the chunks' stored bytes (for
    /// example a whole delta file read into pinned memory,
    /// [`crate::delta::PinnedDelta`]). Streams stored as they are then go to
    /// the device by asynchronous copies straight from it, with no CPU copy.
    /// `None`: stored streams are copied through the staging ring. Pageable
    /// memory here is correct but slow.
    pub host: Option<&'a [u8]>,
    /// Whether the chunks' checksums are still to be checked.
    pub checksums: Checksums,
}

impl TensorRef<'_> {
    /// Bytes of the target tensor.
    #[must_use]
    pub fn bytes(&self) -> usize {
        usize::try_from(self.words).unwrap_or(usize::MAX) * self.width.bytes()
    }

    /// Checks every chunk and that the chunks tile the tensor.
    pub fn validate(&self) -> Result<()> {
        let mut words = 0u64;
        for (i, c) in self.chunks.iter().enumerate() {
            c.validate(self.width)?;
            let last = i + 1 == self.chunks.len();
            if (!last && c.words != self.chunk_words) || c.words > self.chunk_words || c.words == 0 {
                return Err(GpuError::corrupt(format!("{}: chunk {i} has a wrong size", self.name)));
            }
            words += u64::from(c.words);
        }
        if words != self.words {
            return Err(GpuError::corrupt(format!("{}: chunks do not cover the tensor", self.name)));
        }
        Ok(())
    }

    /// Checks every chunk's stored bytes against its checksum, in parallel,
    /// when they are still to be checked.
    ///
    /// # Errors
    /// `E_CHUNK_CHECKSUM`, naming the tensor and the chunk's index in the file.
    pub fn check_checksums(&self) -> Result<()> {
        if self.checksums == Checksums::Checked {
            return Ok(());
        }
        self.chunks
            .par_iter()
            .enumerate()
            .try_for_each(|(k, c)| c.check_checksum(Some((&self.name, self.first_chunk + k as u64))))
    }

    pub(super) fn needs_base_words(&self) -> bool {
        self.chunks.iter().any(ChunkRef::reads_out)
    }
}

#[cfg(test)]
mod tests {
    use tpde::format::{Codec, Digest128, ValueLayout, ValueOp, ValueOrder};

    use super::*;

    /// A sparse chunk of 16 words whose positions are coded against a reference
    /// (coding 3): 2 of the 3 words of R, one more at rank 5. Without its
    /// positions resolved against the reference it is refused before any
    /// kernel; with them it passes.
    #[test]
    fn a_chunk_of_position_coding_3_needs_its_resolved_positions() {
        let stored = [0b011u8, 5, 1, 1, 1];
        let stream = |len: u32| StreamRecord { stored_len: len, decoded_len: len, codec: Codec::Stored };
        let streams = [stream(1), stream(1), stream(3)];
        let record = ChunkRecord {
            data_offset: 128,
            stored_len: 5,
            changed_count: 3,
            first_stream: 0,
            encoding: Encoding::Sparse,
            value_op: ValueOp::Xor,
            value_layout: ValueLayout::BytePlanes,
            position_coding: PositionCoding::SplitByReference,
            gap_width: 1,
            stream_count: 3,
            value_order: ValueOrder::Positional,
            checksum: tpde::format::checksum64(&stored),
            digest: Digest128::default(),
        };
        let mut chunk = ChunkRef { record, streams: &streams, stored: &stored, words: 16, resolved_positions: None };
        let err = chunk.validate(WordWidth::W1).unwrap_err();
        assert_eq!(err.format_code(), Some(ErrorCode::ReferenceRequired));
        chunk.resolved_positions = Some([1u32, 4, 9].iter().flat_map(|p| p.to_le_bytes()).collect());
        chunk.validate(WordWidth::W1).expect("a chunk with its positions resolved");
        assert_eq!(chunk.position_stream_count(), 2);
        chunk.resolved_positions = Some([1u32, 4].iter().flat_map(|p| p.to_le_bytes()).collect());
        assert!(chunk.validate(WordWidth::W1).is_err(), "one position short");
    }
}
