//! Streaming writer: chunks go to disk as they are encoded; the header and chunk map,
//! which are small, are written after the data and the preamble is patched last
//! (spec §2). Memory holds only the records.

use std::path::Path;

use crate::container::chunk_map::{ChunkRecord, Codec, PositionCoding, StreamRecord};
use crate::container::header::Header;
use crate::container::preamble::{
    trailer_bytes, Preamble, FEATURE_CONSTANT_STREAMS, FEATURE_PACKED_RANS, FEATURE_RANS_LANES,
    FEATURE_TEMPORAL_POSITIONS, MINOR_VERSION, MINOR_VERSION_CONSTANT_STREAMS, MINOR_VERSION_PACKED_RANS,
    MINOR_VERSION_RANS_LANES, MINOR_VERSION_TEMPORAL_POSITIONS, PREAMBLE_LEN,
};
use crate::container::{align_up, Layout};
use crate::delta::EncodedChunk;
use crate::digest::checksum64;
use crate::error::{Error, ErrorCode, Result};
use crate::limits::{MAX_CHUNKS, MAX_HEADER_LEN};
use crate::output::PendingFile;
use crate::reader::validate_target_files;

/// Checks `header` with the reader's own open-time rules (spec §11.1 O8, O9 and O16
/// to O22: the header's length, the chunk count, the header rules and the embedded
/// safetensors headers) and returns its JSON text. The writer runs it before it
/// writes the first byte of a file (spec §12 item 3), so that it never writes a
/// file that a reader refuses.
///
/// # Errors
/// The reader's code for the first rule the header breaks.
pub fn check_header(header: &Header, chunk_count: u64) -> Result<Vec<u8>> {
    if chunk_count > MAX_CHUNKS {
        return Err(Error::new(ErrorCode::LimitExceeded, format!("{chunk_count} chunks exceed {MAX_CHUNKS}")));
    }
    header.validate(chunk_count)?;
    validate_target_files(header)?;
    let header_json = serde_json::to_vec(header).map_err(|e| Error::new(ErrorCode::HeaderInvalid, e.to_string()))?;
    if header_json.len() as u64 > MAX_HEADER_LEN {
        return Err(Error::new(
            ErrorCode::LimitExceeded,
            format!("the header would take {} bytes, above {MAX_HEADER_LEN}", header_json.len()),
        ));
    }
    Ok(header_json)
}

/// Writes one delta file.
#[derive(Debug)]
pub struct DeltaWriter {
    out: PendingFile,
    chunks: Vec<ChunkRecord>,
    streams: Vec<StreamRecord>,
    offset: u64,
}

fn zeros(count: u64) -> Vec<u8> {
    vec![0u8; usize::try_from(count).expect("padding is under 64 bytes")]
}

impl DeltaWriter {
    /// Starts a delta that becomes `path` when [`DeltaWriter::finish`] succeeds,
    /// replacing a file there.
    ///
    /// # Errors
    /// `E_IO`.
    pub fn create(path: &Path) -> Result<Self> {
        Self::create_with(path, true)
    }

    /// Like [`DeltaWriter::create`]; without `replace`, [`DeltaWriter::finish`] fails
    /// with `E_OUTPUT_EXISTS` if anything is at `path` by then.
    ///
    /// # Errors
    /// `E_IO`.
    pub fn create_with(path: &Path, replace: bool) -> Result<Self> {
        let mut out = PendingFile::create_with(path, replace)?;
        out.write_all(&[0u8; PREAMBLE_LEN])?;
        Ok(Self { out, chunks: Vec::new(), streams: Vec::new(), offset: PREAMBLE_LEN as u64 })
    }

    /// Number of chunks written so far: the global index of the next one.
    #[must_use]
    pub fn chunk_count(&self) -> u64 {
        self.chunks.len() as u64
    }

    /// Appends one chunk.
    ///
    /// # Errors
    /// `E_IO`, or `E_LIMIT_EXCEEDED` past 2^32 streams.
    pub fn push_chunk(&mut self, chunk: EncodedChunk) -> Result<()> {
        let mut record = chunk.record;
        record.data_offset = self.offset;
        record.first_stream = u32::try_from(self.streams.len())
            .map_err(|_| Error::new(ErrorCode::LimitExceeded, "more than 2^32 streams"))?;
        self.out.write_all(&chunk.data)?;
        self.offset += chunk.data.len() as u64;
        self.chunks.push(record);
        self.streams.extend(chunk.streams);
        Ok(())
    }

    /// Writes the header, chunk map and trailer, patches the preamble and renames the
    /// file into place.
    ///
    /// # Errors
    /// `E_IO`, `E_OUTPUT_EXISTS` when something that may not be replaced is in the
    /// way, or the code of [`check_header`] (the output then never appears).
    pub fn finish(mut self, header: &Header) -> Result<()> {
        let header_json = check_header(header, self.chunk_count())?;
        let split = self.chunks.iter().any(|c| c.position_coding == PositionCoding::SplitByReference);
        if split && header.position_reference.is_none() {
            return Err(Error::new(
                ErrorCode::InvalidArgument,
                "a chunk uses position coding 3 and the header pins no position reference",
            ));
        }
        let data_len = self.offset - PREAMBLE_LEN as u64;
        let layout =
            Layout::from_counts(data_len, header_json.len() as u64, self.chunk_count(), self.streams.len() as u64)
                .ok_or_else(|| Error::new(ErrorCode::LimitExceeded, "the file would exceed 2^64 bytes"))?;
        self.out.write_all(&zeros(layout.header_offset - self.offset))?;
        self.out.write_all(&header_json)?;
        let header_end = layout.header_offset + layout.header_len;
        self.out.write_all(&zeros(align_up(header_end).expect("checked by the layout") - header_end))?;
        let mut tables = Vec::with_capacity(usize::try_from(layout.table_len).unwrap_or(0));
        for chunk in &self.chunks {
            tables.extend_from_slice(&chunk.to_bytes());
        }
        for stream in &self.streams {
            tables.extend_from_slice(&stream.to_bytes());
        }
        self.out.write_all(&tables)?;
        self.out.write_all(&trailer_bytes(layout.file_len))?;
        // §12 item 8: each feature bit is set only when the file uses it, and the minor
        // version is the lowest that defines them all, so that a file without lane
        // rANS, constant streams or a position reference stays a 1.0 file.
        let uses = |codec| self.streams.iter().any(|s| s.codec == codec);
        let features = [
            (uses(Codec::Rans), FEATURE_RANS_LANES, MINOR_VERSION_RANS_LANES),
            (header.position_reference.is_some(), FEATURE_TEMPORAL_POSITIONS, MINOR_VERSION_TEMPORAL_POSITIONS),
            (uses(Codec::Constant), FEATURE_CONSTANT_STREAMS, MINOR_VERSION_CONSTANT_STREAMS),
            (uses(Codec::RansPacked), FEATURE_PACKED_RANS, MINOR_VERSION_PACKED_RANS),
        ];
        let (required_features, minor_version) = features
            .iter()
            .filter(|(used, ..)| *used)
            .fold((0, MINOR_VERSION), |(bits, minor), &(_, bit, since)| (bits | bit, minor.max(since)));
        let preamble = Preamble {
            minor_version,
            required_features,
            data_len,
            header_len: layout.header_len,
            chunk_count: self.chunk_count(),
            stream_count: self.streams.len() as u64,
            header_checksum: checksum64(&header_json),
            table_checksum: checksum64(&tables),
            ..Preamble::default()
        };
        self.out.write_at(0, &preamble.to_bytes())?;
        self.out.commit()
    }
}
