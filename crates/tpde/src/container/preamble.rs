//! The fixed preamble at the start of a file and the trailer at its end (spec §3, §4).

use crate::digest::checksum64;
use crate::error::{fail, ErrorCode, Result};

/// First eight bytes of every file. The high first byte catches 7-bit transfers and
/// the CR LF pair catches line-ending conversion, as in PNG.
pub const MAGIC: [u8; 8] = *b"\x89TPDE\r\n\x1a";
/// Last eight bytes of every file, so that truncation is seen at once.
pub const END_MAGIC: [u8; 8] = *b"\x89TPDEEND";
/// Length of the preamble.
pub const PREAMBLE_LEN: usize = 128;
/// Length of the trailer.
pub const TRAILER_LEN: usize = 16;
/// End of the major version field: a file is read up to here before its major
/// version decides how the rest is read (spec §11.1 O2, O3).
const VERSION_END: usize = 10;
/// The major version this library reads and writes.
pub const MAJOR_VERSION: u16 = 1;
/// The minor version of a file that sets no feature bit: a 1.0 file.
pub const MINOR_VERSION: u16 = 0;
/// Required feature bit `rans-lanes`: streams may use the lane rANS codec (spec §3,
/// §8.7). Bit 0 is never assigned.
pub const FEATURE_RANS_LANES: u64 = 1 << 1;
/// The minor version that defines [`FEATURE_RANS_LANES`].
pub const MINOR_VERSION_RANS_LANES: u16 = 1;
/// Required feature bit `temporal-positions`: sparse chunks may code their
/// positions against those of a reference delta (spec §3, §8.3 coding 3), which the
/// header pins (`position_reference`, spec §5.2).
pub const FEATURE_TEMPORAL_POSITIONS: u64 = 1 << 2;
/// The minor version that defines [`FEATURE_TEMPORAL_POSITIONS`].
pub const MINOR_VERSION_TEMPORAL_POSITIONS: u16 = 2;
/// Required feature bit `constant-streams`: streams may use the constant codec
/// (spec §3, §8.8).
pub const FEATURE_CONSTANT_STREAMS: u64 = 1 << 3;
/// The minor version that defines [`FEATURE_CONSTANT_STREAMS`].
pub const MINOR_VERSION_CONSTANT_STREAMS: u16 = 3;
/// Required feature bit `packed-rans`: streams may use lane rANS with packed tables
/// (spec §3, §8.9).
pub const FEATURE_PACKED_RANS: u64 = 1 << 4;
/// The minor version that defines [`FEATURE_PACKED_RANS`].
pub const MINOR_VERSION_PACKED_RANS: u16 = 4;
/// Required feature bits this library understands.
pub const KNOWN_REQUIRED_FEATURES: u64 =
    FEATURE_RANS_LANES | FEATURE_TEMPORAL_POSITIONS | FEATURE_CONSTANT_STREAMS | FEATURE_PACKED_RANS;

/// The decoded preamble (spec §3, table 3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Preamble {
    /// Minor version; a reader accepts any minor of its major.
    pub minor_version: u16,
    /// Feature bits a reader must understand to read the file.
    pub required_features: u64,
    /// Feature bits a reader may ignore.
    pub optional_features: u64,
    /// Length of the data section.
    pub data_len: u64,
    /// Length of the header JSON.
    pub header_len: u64,
    /// Number of chunk records.
    pub chunk_count: u64,
    /// Number of stream records.
    pub stream_count: u64,
    /// XXH3-64 of the header JSON.
    pub header_checksum: u64,
    /// XXH3-64 of the chunk table followed by the stream table.
    pub table_checksum: u64,
}

fn u16_at(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([bytes[at], bytes[at + 1]])
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(word)
}

impl Preamble {
    /// Parses and checks a preamble (spec §3, §11.1 O1-O6). The checks run in the
    /// order of the spec, so that a file from a newer major version is reported as
    /// such rather than as corrupt or truncated.
    ///
    /// # Errors
    /// `E_TRUNCATED`, `E_BAD_MAGIC`, `E_UNSUPPORTED_VERSION`, `E_PREAMBLE_CHECKSUM`,
    /// `E_RESERVED_NONZERO`, `E_UNKNOWN_REQUIRED_FEATURE`.
    pub fn parse(bytes: &[u8]) -> Result<Self> {
        if bytes.len() < MAGIC.len() || bytes[..8] != MAGIC {
            return fail(ErrorCode::BadMagic, "the file does not start with the tpde magic");
        }
        // O2-O4: the major version is read as soon as its two bytes are there, so
        // that a file of another major version, whose preamble may be shorter, is
        // reported as such and not as truncated.
        if bytes.len() < VERSION_END {
            return fail(ErrorCode::Truncated, "the file ends inside its version field");
        }
        let major = u16_at(bytes, 8);
        if major != MAJOR_VERSION {
            return fail(
                ErrorCode::UnsupportedVersion,
                format!("format version {major}.x is not supported (this reader reads 1.x)"),
            );
        }
        if bytes.len() < PREAMBLE_LEN {
            return fail(ErrorCode::Truncated, "the file is shorter than its preamble");
        }
        let bytes = &bytes[..PREAMBLE_LEN];
        if checksum64(&bytes[..120]) != u64_at(bytes, 120) {
            return fail(ErrorCode::PreambleChecksum, "the preamble checksum does not match");
        }
        if bytes[12..16].iter().chain(&bytes[80..120]).any(|&b| b != 0) {
            return fail(ErrorCode::ReservedNonZero, "a reserved preamble field is not zero");
        }
        let preamble = Self {
            minor_version: u16_at(bytes, 10),
            required_features: u64_at(bytes, 16),
            optional_features: u64_at(bytes, 24),
            data_len: u64_at(bytes, 32),
            header_len: u64_at(bytes, 40),
            chunk_count: u64_at(bytes, 48),
            stream_count: u64_at(bytes, 56),
            header_checksum: u64_at(bytes, 64),
            table_checksum: u64_at(bytes, 72),
        };
        let unknown = preamble.required_features & !KNOWN_REQUIRED_FEATURES;
        if unknown != 0 {
            return fail(ErrorCode::UnknownRequiredFeature, format!("unknown required feature bits {unknown:#x}"));
        }
        Ok(preamble)
    }

    /// Serialises the preamble, with its checksum (spec §3).
    #[must_use]
    pub fn to_bytes(&self) -> [u8; PREAMBLE_LEN] {
        let mut out = [0u8; PREAMBLE_LEN];
        out[..8].copy_from_slice(&MAGIC);
        out[8..10].copy_from_slice(&MAJOR_VERSION.to_le_bytes());
        out[10..12].copy_from_slice(&self.minor_version.to_le_bytes());
        let fields = [
            self.required_features,
            self.optional_features,
            self.data_len,
            self.header_len,
            self.chunk_count,
            self.stream_count,
            self.header_checksum,
            self.table_checksum,
        ];
        for (i, field) in fields.iter().enumerate() {
            out[16 + 8 * i..24 + 8 * i].copy_from_slice(&field.to_le_bytes());
        }
        let checksum = checksum64(&out[..120]);
        out[120..].copy_from_slice(&checksum.to_le_bytes());
        out
    }
}

/// Serialises the trailer for a file of `file_len` bytes (spec §4).
#[must_use]
pub fn trailer_bytes(file_len: u64) -> [u8; TRAILER_LEN] {
    let mut out = [0u8; TRAILER_LEN];
    out[..8].copy_from_slice(&file_len.to_le_bytes());
    out[8..].copy_from_slice(&END_MAGIC);
    out
}

/// Checks the trailer of a whole file (spec §4).
///
/// # Errors
/// `E_BAD_TRAILER` when the end magic is missing or the recorded length differs.
pub fn check_trailer(file: &[u8]) -> Result<()> {
    let len = file.len();
    if len < PREAMBLE_LEN + TRAILER_LEN || file[len - 8..] != END_MAGIC {
        return fail(ErrorCode::BadTrailer, "the end magic is missing: the file is truncated");
    }
    let recorded = u64_at(file, len - TRAILER_LEN);
    if recorded != len as u64 {
        return fail(ErrorCode::BadTrailer, format!("the trailer records {recorded} bytes but the file has {len}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let p = Preamble { data_len: 5, header_len: 7, chunk_count: 2, ..Preamble::default() };
        assert_eq!(Preamble::parse(&p.to_bytes()).unwrap(), p);
    }

    #[test]
    fn each_fault_has_its_code() {
        let good = Preamble::default().to_bytes();
        let mut bad_magic = good;
        bad_magic[1] = b'X';
        assert_eq!(Preamble::parse(&bad_magic).unwrap_err().code(), ErrorCode::BadMagic);
        assert_eq!(Preamble::parse(&good[..64]).unwrap_err().code(), ErrorCode::Truncated);
        let mut flipped = good;
        flipped[40] ^= 1;
        assert_eq!(Preamble::parse(&flipped).unwrap_err().code(), ErrorCode::PreambleChecksum);
        let mut major = good;
        major[8] = 2;
        assert_eq!(Preamble::parse(&major).unwrap_err().code(), ErrorCode::UnsupportedVersion);
        let future = Preamble { required_features: 1 << 40, ..Preamble::default() };
        assert_eq!(Preamble::parse(&future.to_bytes()).unwrap_err().code(), ErrorCode::UnknownRequiredFeature);
        let optional = Preamble { optional_features: 1 << 40, ..Preamble::default() };
        assert!(Preamble::parse(&optional.to_bytes()).is_ok());
    }

    /// A file of another major version is reported as such even when it is shorter
    /// than this version's preamble (spec §11.1 O3 before O4).
    #[test]
    fn short_file_of_another_major_version_is_unsupported_not_truncated() {
        let mut future = Preamble::default().to_bytes();
        future[8] = 2;
        assert_eq!(Preamble::parse(&future[..64]).unwrap_err().code(), ErrorCode::UnsupportedVersion);
        assert_eq!(Preamble::parse(&future[..10]).unwrap_err().code(), ErrorCode::UnsupportedVersion);
        assert_eq!(Preamble::parse(&future[..9]).unwrap_err().code(), ErrorCode::Truncated);
        let current = Preamble::default().to_bytes();
        assert_eq!(Preamble::parse(&current[..64]).unwrap_err().code(), ErrorCode::Truncated);
    }
}
