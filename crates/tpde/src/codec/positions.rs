//! Changed positions of a sparse chunk (spec §8.3): gaps between successive positions
//! as fixed-width integers split into byte planes, a bitmap, or split by a
//! reference set (a bitmap over the reference, gaps between ranks in its
//! complement). Decoding validates as it goes and never builds more than the
//! declared number of positions.

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

/// Positions split by a reference set (spec §8.3, coding 3): a bitmap over
/// `reference` (bit `j` says whether `reference[j]` is a position) and the other
/// positions as their ranks in the complement of `reference` within `[0, words)`.
/// Both inputs are strictly increasing and below `words`.
#[must_use]
pub fn split_by_reference(positions: &[u32], reference: &[u32]) -> (Vec<u8>, Vec<u32>) {
    let mut bitmap = vec![0u8; reference.len().div_ceil(8)];
    let mut ranks = Vec::with_capacity(positions.len());
    // Walk both lists: `r` reference elements lie below the current position.
    let mut r = 0usize;
    for &p in positions {
        while r < reference.len() && reference[r] < p {
            r += 1;
        }
        if r < reference.len() && reference[r] == p {
            bitmap[r / 8] |= 1 << (r % 8);
        } else {
            // p minus the reference elements below it is its rank in the complement.
            #[allow(clippy::cast_possible_truncation)] // r ≤ p < 2^32
            ranks.push(p - r as u32);
        }
    }
    (bitmap, ranks)
}

/// Checks that a reference set given by a caller is strictly increasing and below
/// `words`, as one built from a reference delta always is.
///
/// # Errors
/// `E_INVALID_ARGUMENT` otherwise.
pub fn check_reference(reference: &[u32], words: usize) -> Result<()> {
    let increasing = reference.windows(2).all(|w| w[0] < w[1]);
    if !increasing || reference.last().is_some_and(|&r| r as usize >= words) {
        return fail(ErrorCode::InvalidArgument, "the reference positions are not increasing within the chunk");
    }
    Ok(())
}

/// The number of reference elements that a bitmap over `reference_len` elements
/// marks: the `m'` of spec §8.3, known before the gap planes are read.
///
/// # Errors
/// `E_STREAM_LENGTH` when the bitmap is not `ceil(reference_len / 8)` bytes,
/// `E_POSITIONS_OUT_OF_BOUNDS` for a set padding bit, `E_CHANGED_COUNT` for more
/// than `count` set bits.
pub fn reference_bitmap_count(bitmap: &[u8], reference_len: usize, count: usize) -> Result<usize> {
    if bitmap.len() != reference_len.div_ceil(8) {
        return fail(
            ErrorCode::StreamLength,
            format!("the reference bitmap holds {} bytes, not ceil({reference_len} / 8)", bitmap.len()),
        );
    }
    let tail_bits = reference_len % 8;
    if tail_bits != 0 && bitmap.last().is_some_and(|&b| b >> tail_bits != 0) {
        return fail(ErrorCode::PositionsOutOfBounds, "a padding bit of the reference bitmap is set");
    }
    let set: usize = bitmap.iter().map(|b| b.count_ones() as usize).sum();
    if set > count {
        return fail(ErrorCode::ChangedCount, format!("the reference bitmap marks {set} positions, more than {count}"));
    }
    Ok(set)
}

/// Decodes positions split by a reference set (spec §8.3, coding 3) into `count`
/// increasing positions below `words`: the reference elements that `bitmap` marks,
/// merged with the elements of the complement whose ranks the gap `planes` give.
/// `reference` is strictly increasing and below `words`.
///
/// # Errors
/// `E_STREAM_LENGTH` when the bitmap is not `ceil(|R| / 8)` bytes,
/// `E_POSITIONS_OUT_OF_BOUNDS` for a set padding bit, `E_CHANGED_COUNT` for more
/// than `count` set bits; `E_STREAM_LENGTH` for a gap plane that is not
/// `count` minus the marked reference elements long; `E_POSITIONS_NOT_INCREASING`
/// for a zero gap after the first; `E_POSITIONS_OUT_OF_BOUNDS` for a rank at or past
/// the size of the complement; `E_OUT_OF_MEMORY`.
pub fn decode_split(
    bitmap: &[u8],
    planes: &[&[u8]],
    count: usize,
    words: usize,
    reference: &[u32],
    out: &mut Vec<u32>,
) -> Result<()> {
    out.clear();
    check_reference(reference, words)?;
    let marked = reference_bitmap_count(bitmap, reference.len(), count)?;
    let rest = count - marked;
    if let Some(plane) = planes.iter().find(|p| p.len() != rest) {
        return fail(
            ErrorCode::StreamLength,
            format!("a gap plane holds {} bytes where the chunk needs {rest}", plane.len()),
        );
    }
    // The complement's size: the reference is a set of distinct words below `words`.
    let complement = (words - reference.len()) as u64;
    crate::limits::try_reserve(out, count)?;
    let mut r = 0usize; // next reference element
    let mut push_marked_below = |limit: u64, out: &mut Vec<u32>| {
        while r < reference.len() && u64::from(reference[r]) < limit {
            if bitmap[r / 8] >> (r % 8) & 1 == 1 {
                out.push(reference[r]);
            }
            r += 1;
        }
    };
    let mut rank = 0u64;
    // The complement element of rank `rank` is `rank + |{x in R : x < element}|`:
    // advance over the reference while its elements lie at or below the candidate.
    let mut skipped = 0usize;
    for j in 0..rest {
        let mut gap = 0u64;
        for (k, plane) in planes.iter().enumerate() {
            gap |= u64::from(plane[j]) << (8 * k);
        }
        if j > 0 && gap == 0 {
            return fail(ErrorCode::PositionsNotIncreasing, format!("gap {j} is zero"));
        }
        rank += gap;
        if rank >= complement {
            return fail(
                ErrorCode::PositionsOutOfBounds,
                format!("rank {rank} is outside a complement of {complement} words"),
            );
        }
        while skipped < reference.len() && u64::from(reference[skipped]) <= rank + skipped as u64 {
            skipped += 1;
        }
        let position = rank + skipped as u64;
        push_marked_below(position, out);
        #[allow(clippy::cast_possible_truncation)] // below `words`, itself a u32
        out.push(position as u32);
    }
    push_marked_below(u64::MAX, out);
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

    #[test]
    fn split_by_reference_round_trips() {
        let reference = [1u32, 2, 5, 9];
        let positions = [0u32, 2, 3, 9, 11];
        let (bitmap, ranks) = split_by_reference(&positions, &reference);
        assert_eq!(bitmap, [0b1010]);
        // The complement is 0 3 4 6 7 8 10 11: 0, 3 and 11 have ranks 0, 1 and 7.
        assert_eq!(ranks, [0, 1, 7]);
        let width = gap_width(&ranks);
        let planes = encode_gaps(&ranks, width);
        let refs: Vec<&[u8]> = planes.iter().map(Vec::as_slice).collect();
        let mut out = Vec::new();
        decode_split(&bitmap, &refs, 5, 12, &reference, &mut out).unwrap();
        assert_eq!(out, positions);
        let err = |bitmap: &[u8], planes: &[&[u8]], count| {
            decode_split(bitmap, planes, count, 12, &reference, &mut Vec::new()).unwrap_err().code()
        };
        assert_eq!(err(&[0b1010, 0], &refs, 5), ErrorCode::StreamLength);
        assert_eq!(err(&[0b1_1010], &refs, 5), ErrorCode::PositionsOutOfBounds);
        assert_eq!(err(&[0b1111], &[&[0]], 3), ErrorCode::ChangedCount);
        assert_eq!(err(&[0b1010], &[&[0, 1]], 5), ErrorCode::StreamLength);
        assert_eq!(err(&[0b1010], &[&[0, 0, 1]], 5), ErrorCode::PositionsNotIncreasing);
        assert_eq!(err(&[0b1010], &[&[0, 1, 7]], 5), ErrorCode::PositionsOutOfBounds);
    }
}
