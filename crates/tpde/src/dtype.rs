//! Element types, and the words that every encoding works on (spec §7).
//!
//! The format never interprets values as numbers: it sees a tensor as a run of
//! little-endian words of 1, 2, 4 or 8 bytes, chosen by the element bit width.

use std::fmt;
use std::str::FromStr;

use crate::error::{Error, ErrorCode, Result};

/// Width of one word in bytes (spec §7, "Words").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WordWidth {
    /// 1-byte words (BOOL, U8, I8, F8_*, packed F4/F6).
    W1,
    /// 2-byte words (F16, BF16, I16, U16).
    W2,
    /// 4-byte words (F32, I32, U32, C64).
    W4,
    /// 8-byte words (F64, I64, U64).
    W8,
}

impl WordWidth {
    /// All widths, narrowest first.
    pub const ALL: [WordWidth; 4] = [Self::W1, Self::W2, Self::W4, Self::W8];

    /// The width in bytes.
    #[must_use]
    pub const fn bytes(self) -> usize {
        match self {
            Self::W1 => 1,
            Self::W2 => 2,
            Self::W4 => 4,
            Self::W8 => 8,
        }
    }

    /// The width in bits.
    #[must_use]
    pub const fn bits(self) -> u32 {
        match self {
            Self::W1 => 8,
            Self::W2 => 16,
            Self::W4 => 32,
            Self::W8 => 64,
        }
    }

    /// Mask of the word's bits in a `u64`, for code that holds words of any
    /// width in one.
    #[must_use]
    pub const fn mask(self) -> u64 {
        match self {
            Self::W8 => u64::MAX,
            w => (1u64 << w.bits()) - 1,
        }
    }

    /// The width in bytes, as a `u64`, for sizes counted in the format's integers.
    #[must_use]
    pub const fn bytes_u64(self) -> u64 {
        self.bytes() as u64
    }

    /// The width for a number of bytes.
    ///
    /// # Errors
    /// `E_INVALID_ARGUMENT` unless `bytes` is 1, 2, 4 or 8.
    pub fn from_bytes(bytes: usize) -> Result<Self> {
        Self::try_from(bytes)
    }
}

impl TryFrom<usize> for WordWidth {
    type Error = Error;

    fn try_from(bytes: usize) -> Result<Self> {
        match bytes {
            1 => Ok(Self::W1),
            2 => Ok(Self::W2),
            4 => Ok(Self::W4),
            8 => Ok(Self::W8),
            _ => {
                Err(Error::new(ErrorCode::InvalidArgument, format!("a word of {bytes} bytes (1, 2, 4 or 8 expected)")))
            }
        }
    }
}

impl fmt::Display for WordWidth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-byte words", self.bytes())
    }
}

/// A safetensors element type (spec §7, table 7.1).
///
/// Parsing a name outside the table fails with `E_UNKNOWN_DTYPE`; [`Dtype::as_str`]
/// and `Display` give the safetensors spelling back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[allow(non_camel_case_types)] // the safetensors spelling
pub enum Dtype {
    /// Boolean, one byte.
    BOOL,
    /// 4-bit float (E2M1), two to a byte.
    F4,
    /// 6-bit float with 2 exponent bits, packed.
    F6_E2M3,
    /// 6-bit float with 3 exponent bits, packed.
    F6_E3M2,
    /// Unsigned 8-bit integer.
    U8,
    /// Signed 8-bit integer.
    I8,
    /// 8-bit float with 5 exponent bits.
    F8_E5M2,
    /// 8-bit float with 4 exponent bits.
    F8_E4M3,
    /// 8-bit exponent-only scale.
    F8_E8M0,
    /// Signed 16-bit integer.
    I16,
    /// Unsigned 16-bit integer.
    U16,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    BF16,
    /// Signed 32-bit integer.
    I32,
    /// Unsigned 32-bit integer.
    U32,
    /// IEEE single precision.
    F32,
    /// Complex of two F32.
    C64,
    /// IEEE double precision.
    F64,
    /// Signed 64-bit integer.
    I64,
    /// Unsigned 64-bit integer.
    U64,
}

impl Dtype {
    /// Every dtype the format knows, in the order of spec §7.
    pub const ALL: [Dtype; 20] = [
        Self::BOOL,
        Self::F4,
        Self::F6_E2M3,
        Self::F6_E3M2,
        Self::U8,
        Self::I8,
        Self::F8_E5M2,
        Self::F8_E4M3,
        Self::F8_E8M0,
        Self::I16,
        Self::U16,
        Self::F16,
        Self::BF16,
        Self::I32,
        Self::U32,
        Self::F32,
        Self::C64,
        Self::F64,
        Self::I64,
        Self::U64,
    ];

    /// The safetensors spelling.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::BOOL => "BOOL",
            Self::F4 => "F4",
            Self::F6_E2M3 => "F6_E2M3",
            Self::F6_E3M2 => "F6_E3M2",
            Self::U8 => "U8",
            Self::I8 => "I8",
            Self::F8_E5M2 => "F8_E5M2",
            Self::F8_E4M3 => "F8_E4M3",
            Self::F8_E8M0 => "F8_E8M0",
            Self::I16 => "I16",
            Self::U16 => "U16",
            Self::F16 => "F16",
            Self::BF16 => "BF16",
            Self::I32 => "I32",
            Self::U32 => "U32",
            Self::F32 => "F32",
            Self::C64 => "C64",
            Self::F64 => "F64",
            Self::I64 => "I64",
            Self::U64 => "U64",
        }
    }

    /// Bits per element.
    #[must_use]
    pub const fn bits(self) -> u32 {
        match self {
            Self::F4 => 4,
            Self::F6_E2M3 | Self::F6_E3M2 => 6,
            Self::BOOL | Self::U8 | Self::I8 | Self::F8_E5M2 | Self::F8_E4M3 | Self::F8_E8M0 => 8,
            Self::I16 | Self::U16 | Self::F16 | Self::BF16 => 16,
            Self::I32 | Self::U32 | Self::F32 => 32,
            Self::C64 | Self::F64 | Self::I64 | Self::U64 => 64,
        }
    }

    /// The width of the words a tensor of this dtype is cut into. Sub-byte types
    /// are packed bytes, so their words are bytes; C64 is a pair of F32, so its
    /// words are F32.
    #[must_use]
    pub const fn word_width(self) -> WordWidth {
        match self {
            Self::BOOL
            | Self::F4
            | Self::F6_E2M3
            | Self::F6_E3M2
            | Self::U8
            | Self::I8
            | Self::F8_E5M2
            | Self::F8_E4M3
            | Self::F8_E8M0 => WordWidth::W1,
            Self::I16 | Self::U16 | Self::F16 | Self::BF16 => WordWidth::W2,
            Self::I32 | Self::U32 | Self::F32 | Self::C64 => WordWidth::W4,
            Self::F64 | Self::I64 | Self::U64 => WordWidth::W8,
        }
    }

    /// The byte length of a tensor of this dtype and shape, or `None` when the size
    /// overflows or the element count does not fill whole bytes.
    #[must_use]
    pub fn byte_len(self, shape: &[u64]) -> Option<u64> {
        let elements = shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
        elements.and_then(|n| n.checked_mul(u64::from(self.bits()))).filter(|b| b % 8 == 0).map(|b| b / 8)
    }

    /// Whether this is a floating-point kind whose sign bit is the top bit of a
    /// word, which makes the rotated byte-plane layout worth trying.
    #[must_use]
    pub const fn has_leading_sign(self) -> bool {
        matches!(self, Self::F16 | Self::BF16 | Self::F32 | Self::F64 | Self::C64)
    }
}

impl FromStr for Dtype {
    type Err = Error;

    /// # Errors
    /// `E_UNKNOWN_DTYPE` for a name that is not in spec §7.
    fn from_str(name: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|d| d.as_str() == name)
            .ok_or_else(|| Error::new(ErrorCode::UnknownDtype, format!("unknown dtype {name:?}")))
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn width(name: &str) -> Result<usize> {
        name.parse::<Dtype>().map(|d| d.word_width().bytes())
    }

    #[test]
    fn widths_follow_bit_size() {
        assert_eq!(width("BF16").unwrap(), 2);
        assert_eq!(width("C64").unwrap(), 4);
        assert_eq!(width("F4").unwrap(), 1);
        assert_eq!(width("F8_E4M3").unwrap(), 1);
        assert_eq!(width("F64").unwrap(), 8);
        assert_eq!(width("Q4_K").unwrap_err().code(), ErrorCode::UnknownDtype);
    }

    #[test]
    fn names_round_trip() {
        for dtype in Dtype::ALL {
            assert_eq!(dtype.as_str().parse::<Dtype>().unwrap(), dtype);
            assert_eq!(dtype.to_string(), dtype.as_str());
        }
        assert_eq!("bf16".parse::<Dtype>().unwrap_err().code(), ErrorCode::UnknownDtype);
    }

    #[test]
    fn byte_len_rejects_partial_bytes_and_overflow() {
        assert_eq!(Dtype::F4.byte_len(&[3]), None);
        assert_eq!(Dtype::F4.byte_len(&[4]), Some(2));
        assert_eq!(Dtype::F6_E2M3.byte_len(&[4]), Some(3));
        assert_eq!(Dtype::F32.byte_len(&[]), Some(4));
        assert_eq!(Dtype::F64.byte_len(&[u64::MAX, 2]), None);
    }

    #[test]
    fn word_widths_convert_from_bytes() {
        for width in WordWidth::ALL {
            assert_eq!(WordWidth::try_from(width.bytes()).unwrap(), width);
        }
        for bytes in [0, 3, 5, 16] {
            assert_eq!(WordWidth::try_from(bytes).unwrap_err().code(), ErrorCode::InvalidArgument);
        }
    }
}
