//! Element types, and the words that every encoding works on (spec §7).
//!
//! The format never interprets values as numbers: it sees a tensor as a run of
//! little-endian words of 1, 2, 4 or 8 bytes, chosen by the element bit width.

use crate::error::{fail, ErrorCode, Result};

/// One dtype string of safetensors, and its word width in this format.
struct DtypeInfo {
    name: &'static str,
    bits: u32,
    word_bytes: usize,
}

/// Every safetensors dtype (spec §7, table 7.1). Sub-byte types are packed bytes, so
/// their words are bytes. C64 is a pair of F32, so its words are F32.
const DTYPES: &[DtypeInfo] = &[
    DtypeInfo { name: "BOOL", bits: 8, word_bytes: 1 },
    DtypeInfo { name: "F4", bits: 4, word_bytes: 1 },
    DtypeInfo { name: "F6_E2M3", bits: 6, word_bytes: 1 },
    DtypeInfo { name: "F6_E3M2", bits: 6, word_bytes: 1 },
    DtypeInfo { name: "U8", bits: 8, word_bytes: 1 },
    DtypeInfo { name: "I8", bits: 8, word_bytes: 1 },
    DtypeInfo { name: "F8_E5M2", bits: 8, word_bytes: 1 },
    DtypeInfo { name: "F8_E4M3", bits: 8, word_bytes: 1 },
    DtypeInfo { name: "F8_E8M0", bits: 8, word_bytes: 1 },
    DtypeInfo { name: "I16", bits: 16, word_bytes: 2 },
    DtypeInfo { name: "U16", bits: 16, word_bytes: 2 },
    DtypeInfo { name: "F16", bits: 16, word_bytes: 2 },
    DtypeInfo { name: "BF16", bits: 16, word_bytes: 2 },
    DtypeInfo { name: "I32", bits: 32, word_bytes: 4 },
    DtypeInfo { name: "U32", bits: 32, word_bytes: 4 },
    DtypeInfo { name: "F32", bits: 32, word_bytes: 4 },
    DtypeInfo { name: "C64", bits: 64, word_bytes: 4 },
    DtypeInfo { name: "F64", bits: 64, word_bytes: 8 },
    DtypeInfo { name: "I64", bits: 64, word_bytes: 8 },
    DtypeInfo { name: "U64", bits: 64, word_bytes: 8 },
];

fn lookup(name: &str) -> Result<&'static DtypeInfo> {
    match DTYPES.iter().find(|d| d.name == name) {
        Some(info) => Ok(info),
        None => fail(ErrorCode::UnknownDtype, format!("unknown dtype {name:?}")),
    }
}

/// The width in bytes of the words that a tensor of this dtype is cut into.
///
/// # Errors
/// `E_UNKNOWN_DTYPE` for a dtype string that is not in spec §7.
pub fn word_bytes(dtype: &str) -> Result<usize> {
    lookup(dtype).map(|d| d.word_bytes)
}

/// The byte length of a tensor of this dtype and shape, or `None` when the size
/// overflows or the element count does not fill whole bytes.
///
/// # Errors
/// `E_UNKNOWN_DTYPE` for a dtype string that is not in spec §7.
pub fn byte_len(dtype: &str, shape: &[u64]) -> Result<Option<u64>> {
    let bits = u64::from(lookup(dtype)?.bits);
    let elements = shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
    Ok(elements.and_then(|n| n.checked_mul(bits)).filter(|b| b % 8 == 0).map(|b| b / 8))
}

/// Whether a dtype is a floating-point kind whose sign bit is the top bit of a word,
/// which makes the rotated byte-plane layout worth trying.
#[must_use]
pub fn has_leading_sign(dtype: &str) -> bool {
    matches!(dtype, "F16" | "BF16" | "F32" | "F64" | "C64")
}

/// All dtype strings the format knows, in the order of spec §7.
pub fn all() -> impl Iterator<Item = &'static str> {
    DTYPES.iter().map(|d| d.name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn widths_follow_bit_size() {
        assert_eq!(word_bytes("BF16").unwrap(), 2);
        assert_eq!(word_bytes("C64").unwrap(), 4);
        assert_eq!(word_bytes("F4").unwrap(), 1);
        assert_eq!(word_bytes("F8_E4M3").unwrap(), 1);
        assert_eq!(word_bytes("Q4_K").unwrap_err().code(), ErrorCode::UnknownDtype);
    }

    #[test]
    fn byte_len_rejects_partial_bytes_and_overflow() {
        assert_eq!(byte_len("F4", &[3]).unwrap(), None);
        assert_eq!(byte_len("F4", &[4]).unwrap(), Some(2));
        assert_eq!(byte_len("F6_E2M3", &[4]).unwrap(), Some(3));
        assert_eq!(byte_len("F32", &[]).unwrap(), Some(4));
        assert_eq!(byte_len("F64", &[u64::MAX, 2]).unwrap(), None);
    }
}
