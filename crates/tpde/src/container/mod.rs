//! The container: preamble, header, chunk map and trailer (spec §2–§6).

pub mod chunk_map;
pub mod header;
pub mod json;
pub mod preamble;

/// Every structure after the data section starts on a multiple of this (spec §2).
pub const ALIGNMENT: u64 = 64;

/// Rounds `offset` up to the next multiple of [`ALIGNMENT`], or `None` on overflow.
#[must_use]
pub fn align_up(offset: u64) -> Option<u64> {
    offset.checked_add(ALIGNMENT - 1).map(|o| o & !(ALIGNMENT - 1))
}

/// Where each region of a file lies, derived from the preamble (spec §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Start of the data section (always [`preamble::PREAMBLE_LEN`]).
    pub data_offset: u64,
    /// Length of the data section.
    pub data_len: u64,
    /// Start of the header JSON.
    pub header_offset: u64,
    /// Length of the header JSON.
    pub header_len: u64,
    /// Start of the chunk table; the stream table follows it directly.
    pub table_offset: u64,
    /// Length of the chunk table plus the stream table.
    pub table_len: u64,
    /// Start of the trailer.
    pub trailer_offset: u64,
    /// The length the whole file must have.
    pub file_len: u64,
}

impl Layout {
    /// Derives the layout from the preamble's lengths and counts; `None` on overflow.
    #[must_use]
    pub fn from_counts(data_len: u64, header_len: u64, chunk_count: u64, stream_count: u64) -> Option<Self> {
        let data_offset = preamble::PREAMBLE_LEN as u64;
        let header_offset = align_up(data_offset.checked_add(data_len)?)?;
        let table_offset = align_up(header_offset.checked_add(header_len)?)?;
        let table_len = chunk_count
            .checked_mul(chunk_map::CHUNK_RECORD_LEN as u64)?
            .checked_add(stream_count.checked_mul(chunk_map::STREAM_RECORD_LEN as u64)?)?;
        let trailer_offset = table_offset.checked_add(table_len)?;
        let file_len = trailer_offset.checked_add(preamble::TRAILER_LEN as u64)?;
        Some(Self {
            data_offset,
            data_len,
            header_offset,
            header_len,
            table_offset,
            table_len,
            trailer_offset,
            file_len,
        })
    }
}
