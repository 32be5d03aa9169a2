//! Changed positions of a sparse chunk (spec §8.3): gaps between successive positions
//! as fixed-width integers split into byte planes, or a bitmap. Decoding validates
//! as it goes and never builds more than the declared number of positions.

use crate::error::{fail, ErrorCode, Result};

/// The narrowest of 1, 2 or 4 bytes that holds every gap.
#[must_use]
pub fn gap_width(positions: &[u32]) -> u8 {
    let mut previous = 0u32;
    let mut widest = 0u32;
    for (j, &p) in positions.iter().enumerate() {
        let gap = if j == 0 { p } else { p - previous };
        widest = widest.max(gap);
        previous = p;
    }
    match widest {
        0..=0xff => 1,
        0x100..=0xffff => 2,
        _ => 4,
    }
}

/// Gaps as `width` byte planes, least significant plane first.
#[must_use]
pub fn encode_gaps(positions: &[u32], width: u8) -> Vec<Vec<u8>> {
    let width = usize::from(width);
    let mut planes = vec![Vec::with_capacity(positions.len()); width];
    let mut previous = 0u32;
    for (j, &p) in positions.iter().enumerate() {
        let gap = if j == 0 { p } else { p - previous };
        previous = p;
        let bytes = gap.to_le_bytes();
        for (plane, byte) in planes.iter_mut().zip(bytes) {
            plane.push(byte);
        }
    }
    planes
}

/// One bit per word, least significant bit first; padding bits are zero.
#[must_use]
pub fn encode_bitmap(positions: &[u32], words: usize) -> Vec<u8> {
    let mut bitmap = vec![0u8; words.div_ceil(8)];
    for &p in positions {
        bitmap[p as usize / 8] |= 1 << (p % 8);
    }
    bitmap
}

/// Decodes gap planes into `count` positions below `words`.
///
/// # Errors
/// `E_POSITIONS_NOT_INCREASING` for a zero gap after the first,
/// `E_POSITIONS_OUT_OF_BOUNDS` for a position at or past `words`, `E_OUT_OF_MEMORY`
/// when `out` cannot hold `count` positions.
pub fn decode_gaps(planes: &[&[u8]], count: usize, words: usize, out: &mut Vec<u32>) -> Result<()> {
    out.clear();
    crate::limits::try_reserve(out, count)?;
    let mut position = 0u64;
    for j in 0..count {
        let mut gap = 0u64;
        for (k, plane) in planes.iter().enumerate() {
            gap |= u64::from(plane[j]) << (8 * k);
        }
        if j > 0 && gap == 0 {
            return fail(ErrorCode::PositionsNotIncreasing, format!("gap {j} is zero"));
        }
        position += gap;
        if position >= words as u64 {
            return fail(
                ErrorCode::PositionsOutOfBounds,
                format!("position {position} is outside a chunk of {words} words"),
            );
        }
        #[allow(clippy::cast_possible_truncation)] // below `words`, itself a u32
        out.push(position as u32);
    }
    Ok(())
}

/// Decodes a bitmap of `words` bits that must hold exactly `count` set bits.
///
/// # Errors
/// `E_POSITIONS_OUT_OF_BOUNDS` for a set padding bit, `E_CHANGED_COUNT` when the
/// number of set bits is not `count`, `E_OUT_OF_MEMORY` when `out` cannot hold
/// `count` positions.
pub fn decode_bitmap(bitmap: &[u8], count: usize, words: usize, out: &mut Vec<u32>) -> Result<()> {
    out.clear();
    crate::limits::try_reserve(out, count)?;
    let tail_bits = words % 8;
    if tail_bits != 0 && bitmap.last().is_some_and(|&b| b >> tail_bits != 0) {
        return fail(ErrorCode::PositionsOutOfBounds, "a padding bit of the bitmap is set");
    }
    for (i, &byte) in bitmap.iter().enumerate() {
        let mut bits = byte;
        while bits != 0 {
            if out.len() == count {
                return fail(ErrorCode::ChangedCount, format!("the bitmap has more than {count} positions"));
            }
            #[allow(clippy::cast_possible_truncation)] // i * 8 + 7 < words ≤ u32::MAX
            out.push((i * 8) as u32 + bits.trailing_zeros());
            bits &= bits - 1;
        }
    }
    if out.len() != count {
        return fail(ErrorCode::ChangedCount, format!("the bitmap has {} positions, not {count}", out.len()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_round_trip_at_every_width() {
        for positions in [vec![0u32, 1, 2, 300], vec![5], vec![70_000, 70_001], vec![]] {
            let width = gap_width(&positions);
            let planes = encode_gaps(&positions, width);
            let refs: Vec<&[u8]> = planes.iter().map(Vec::as_slice).collect();
            let mut out = Vec::new();
            decode_gaps(&refs, positions.len(), 80_000, &mut out).unwrap();
            assert_eq!(out, positions);
        }
    }

    #[test]
    fn gaps_are_validated() {
        let mut out = Vec::new();
        let zero_gap: &[&[u8]] = &[&[3, 0]];
        assert_eq!(decode_gaps(zero_gap, 2, 10, &mut out).unwrap_err().code(), ErrorCode::PositionsNotIncreasing);
        let past_end: &[&[u8]] = &[&[3, 7]];
        assert_eq!(decode_gaps(past_end, 2, 10, &mut out).unwrap_err().code(), ErrorCode::PositionsOutOfBounds);
    }

    #[test]
    fn bitmap_round_trip_and_padding() {
        let positions = vec![0u32, 7, 8, 12];
        let bitmap = encode_bitmap(&positions, 13);
        let mut out = Vec::new();
        decode_bitmap(&bitmap, 4, 13, &mut out).unwrap();
        assert_eq!(out, positions);
        assert_eq!(decode_bitmap(&bitmap, 3, 13, &mut out).unwrap_err().code(), ErrorCode::ChangedCount);
        assert_eq!(decode_bitmap(&bitmap, 4, 12, &mut out).unwrap_err().code(), ErrorCode::PositionsOutOfBounds);
    }
}
