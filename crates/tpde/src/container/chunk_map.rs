//! The chunk map: fixed-width binary records that locate and describe every chunk and
//! stream (spec §6). It is read with one range read and parsed without a decompressor.

use crate::digest::Digest128;
use crate::error::{fail, ErrorCode, Result};

/// Length of one chunk record.
pub const CHUNK_RECORD_LEN: usize = 64;
/// Length of one stream record.
pub const STREAM_RECORD_LEN: usize = 16;

macro_rules! wire_enum {
    ($(#[$meta:meta])* $name:ident, $what:literal { $($(#[$vmeta:meta])* $variant:ident = $value:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u8)]
        pub enum $name {
            $($(#[$vmeta])* $variant = $value),+
        }

        impl $name {
            /// Decodes the wire value.
            ///
            /// # Errors
            /// `E_UNKNOWN_CODEC` for a value that spec §8 does not define.
            pub fn from_u8(value: u8) -> Result<Self> {
                match value {
                    $($value => Ok(Self::$variant),)+
                    other => fail(ErrorCode::UnknownCodec, format!("unknown {} id {other}", $what)),
                }
            }
        }
    };
}

wire_enum!(
    /// How a chunk is stored (spec §8.1).
    Encoding, "encoding" {
        /// Target equals base; no bytes.
        Unchanged = 0,
        /// Changed positions plus values at them.
        Sparse = 1,
        /// One value per word, combined with the base.
        Dense = 2,
        /// The target words themselves; no base.
        Raw = 3,
    }
);

wire_enum!(
    /// How a value combines with its base word (spec §8.2).
    ValueOp, "value op" {
        /// `target = base ^ value`.
        Xor = 0,
        /// `target = base + unzigzag(value)`, wrapping at the word width.
        Sub = 1,
    }
);

wire_enum!(
    /// How the value words are laid out across streams (spec §8.4).
    ValueLayout, "value layout" {
        /// One stream of whole little-endian words.
        Words = 0,
        /// One stream per byte of the word, least significant first.
        BytePlanes = 1,
        /// Each word rotated left by one bit, then split into byte planes.
        RotatedBytePlanes = 2,
    }
);

wire_enum!(
    /// In which order values are listed (spec §8.6).
    ValueOrder, "value order" {
        /// One value per position, in position order.
        Positional = 0,
        /// Grouped by the key of their base word, position order within a group.
        GroupedByBase = 1,
    }
);

wire_enum!(
    /// How the changed positions of a sparse chunk are stored (spec §8.3).
    PositionCoding, "position coding" {
        /// No positions (every encoding but sparse).
        None = 0,
        /// Gaps between successive positions, as byte planes of fixed-width integers.
        Gaps = 1,
        /// One bit per word.
        Bitmap = 2,
        /// A bitmap over the reference positions, then gaps between ranks in their
        /// complement (spec §8.3); only in a file with [`FEATURE_TEMPORAL_POSITIONS`].
        ///
        /// [`FEATURE_TEMPORAL_POSITIONS`]: crate::container::preamble::FEATURE_TEMPORAL_POSITIONS
        SplitByReference = 3,
    }
);

wire_enum!(
    /// How one stream's bytes are stored (spec §8.5, the codec registry).
    Codec, "codec" {
        /// The bytes as they are.
        Stored = 0,
        /// One zstd frame.
        Zstd = 1,
        /// Lane rANS (spec §8.7); only in a file with [`FEATURE_RANS_LANES`].
        ///
        /// [`FEATURE_RANS_LANES`]: crate::container::preamble::FEATURE_RANS_LANES
        Rans = 2,
        /// One byte, repeated `decoded_len` times (spec §8.8); only in a file with
        /// [`FEATURE_CONSTANT_STREAMS`].
        ///
        /// [`FEATURE_CONSTANT_STREAMS`]: crate::container::preamble::FEATURE_CONSTANT_STREAMS
        Constant = 3,
        /// Lane rANS with packed tables (spec §8.9); only in a file with
        /// [`FEATURE_PACKED_RANS`].
        ///
        /// [`FEATURE_PACKED_RANS`]: crate::container::preamble::FEATURE_PACKED_RANS
        RansPacked = 4,
    }
);

impl Codec {
    /// Whether the stream is lane rANS, in either table form (codecs 2 and 4).
    #[must_use]
    pub fn is_rans(self) -> bool {
        matches!(self, Self::Rans | Self::RansPacked)
    }
}

/// One chunk record (spec §6.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRecord {
    /// Absolute offset of the chunk's first stream.
    pub data_offset: u64,
    /// Sum of the stored lengths of its streams.
    pub stored_len: u32,
    /// Number of words whose target differs from the base.
    pub changed_count: u32,
    /// Index of its first stream record.
    pub first_stream: u32,
    /// How the chunk is stored.
    pub encoding: Encoding,
    /// How values combine with the base.
    pub value_op: ValueOp,
    /// How values are laid out.
    pub value_layout: ValueLayout,
    /// How positions are stored.
    pub position_coding: PositionCoding,
    /// Width of one gap in bytes (1, 2 or 4) for gap coding, else 0.
    pub gap_width: u8,
    /// Number of streams.
    pub stream_count: u8,
    /// In which order values are listed.
    pub value_order: ValueOrder,
    /// XXH3-64 of the stored bytes.
    pub checksum: u64,
    /// XXH3-128 of the reconstructed target bytes.
    pub digest: Digest128,
}

/// One stream record (spec §6.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamRecord {
    /// Bytes in the file.
    pub stored_len: u32,
    /// Bytes after decoding.
    pub decoded_len: u32,
    /// How the bytes are stored.
    pub codec: Codec,
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

fn check_record_len(bytes: &[u8], len: usize) -> Result<()> {
    if bytes.len() != len {
        return fail(ErrorCode::InvalidArgument, format!("a record is {len} bytes, not {}", bytes.len()));
    }
    Ok(())
}

fn reserved_zero(bytes: &[u8]) -> Result<()> {
    if bytes.iter().any(|&b| b != 0) {
        return fail(ErrorCode::ReservedNonZero, "a reserved field of a record is not zero");
    }
    Ok(())
}

impl ChunkRecord {
    /// Parses one record from exactly [`CHUNK_RECORD_LEN`] bytes.
    ///
    /// # Errors
    /// `E_UNKNOWN_CODEC` or `E_RESERVED_NONZERO`; `E_INVALID_ARGUMENT` when `bytes`
    /// has another length.
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        check_record_len(bytes, CHUNK_RECORD_LEN)?;
        reserved_zero(&bytes[27..32])?;
        reserved_zero(&bytes[56..64])?;
        let mut digest = [0u8; 16];
        digest.copy_from_slice(&bytes[40..56]);
        Ok(Self {
            data_offset: le_u64(bytes, 0),
            stored_len: le_u32(bytes, 8),
            changed_count: le_u32(bytes, 12),
            first_stream: le_u32(bytes, 16),
            encoding: Encoding::from_u8(bytes[20])?,
            value_op: ValueOp::from_u8(bytes[21])?,
            value_layout: ValueLayout::from_u8(bytes[22])?,
            position_coding: PositionCoding::from_u8(bytes[23])?,
            gap_width: bytes[24],
            stream_count: bytes[25],
            value_order: ValueOrder::from_u8(bytes[26])?,
            checksum: le_u64(bytes, 32),
            digest,
        })
    }

    /// Serialises the record.
    #[must_use]
    pub fn to_bytes(&self) -> [u8; CHUNK_RECORD_LEN] {
        let mut out = [0u8; CHUNK_RECORD_LEN];
        out[0..8].copy_from_slice(&self.data_offset.to_le_bytes());
        out[8..12].copy_from_slice(&self.stored_len.to_le_bytes());
        out[12..16].copy_from_slice(&self.changed_count.to_le_bytes());
        out[16..20].copy_from_slice(&self.first_stream.to_le_bytes());
        out[20] = self.encoding as u8;
        out[21] = self.value_op as u8;
        out[22] = self.value_layout as u8;
        out[23] = self.position_coding as u8;
        out[24] = self.gap_width;
        out[25] = self.stream_count;
        out[26] = self.value_order as u8;
        out[32..40].copy_from_slice(&self.checksum.to_le_bytes());
        out[40..56].copy_from_slice(&self.digest);
        out
    }
}

impl StreamRecord {
    /// Parses one record from exactly [`STREAM_RECORD_LEN`] bytes.
    ///
    /// # Errors
    /// `E_UNKNOWN_CODEC` or `E_RESERVED_NONZERO`; `E_INVALID_ARGUMENT` when `bytes`
    /// has another length.
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        check_record_len(bytes, STREAM_RECORD_LEN)?;
        reserved_zero(&bytes[9..16])?;
        Ok(Self { stored_len: le_u32(bytes, 0), decoded_len: le_u32(bytes, 4), codec: Codec::from_u8(bytes[8])? })
    }

    /// Serialises the record.
    #[must_use]
    pub fn to_bytes(&self) -> [u8; STREAM_RECORD_LEN] {
        let mut out = [0u8; STREAM_RECORD_LEN];
        out[0..4].copy_from_slice(&self.stored_len.to_le_bytes());
        out[4..8].copy_from_slice(&self.decoded_len.to_le_bytes());
        out[8] = self.codec as u8;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A slice of the wrong length is the caller's error, not a panic.
    #[test]
    fn records_of_the_wrong_length_are_refused() {
        for len in [0, 10, CHUNK_RECORD_LEN - 1, CHUNK_RECORD_LEN + 1] {
            let err = ChunkRecord::parse(&vec![0u8; len]).unwrap_err();
            assert_eq!(err.code(), ErrorCode::InvalidArgument, "{len} bytes");
        }
        assert_eq!(StreamRecord::parse(&[0u8; 3]).unwrap_err().code(), ErrorCode::InvalidArgument);
        let record = StreamRecord { stored_len: 5, decoded_len: 7, codec: Codec::Zstd };
        assert_eq!(StreamRecord::parse(&record.to_bytes()).unwrap(), record);
    }
}
