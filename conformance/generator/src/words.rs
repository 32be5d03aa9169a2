//! Words, values and positions, written from the spec independently of the library
//! (spec §7, §8), so that forced golden chunks do not depend on the code they test.

use tpde::format::{ValueLayout, ValueOp};

/// Little-endian words of `word_bytes` bytes.
pub fn load(bytes: &[u8], word_bytes: usize) -> Vec<u64> {
    bytes
        .chunks_exact(word_bytes)
        .map(|w| {
            let mut buf = [0u8; 8];
            buf[..word_bytes].copy_from_slice(w);
            u64::from_le_bytes(buf)
        })
        .collect()
}

/// Words back to little-endian bytes.
pub fn store(words: &[u64], word_bytes: usize) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()[..word_bytes].to_vec()).collect()
}

fn mask(word_bytes: usize) -> u64 {
    if word_bytes == 8 {
        u64::MAX
    } else {
        (1u64 << (8 * word_bytes)) - 1
    }
}

/// Sign-extends a `word_bytes`-wide value to i64.
#[allow(clippy::cast_possible_wrap)]
fn signed(value: u64, word_bytes: usize) -> i64 {
    let shift = 64 - 8 * word_bytes as u32;
    ((value << shift) as i64) >> shift
}

/// `target` expressed against `base` (spec §8.2).
#[allow(clippy::cast_sign_loss)]
pub fn express(target: u64, base: u64, op: ValueOp, word_bytes: usize) -> u64 {
    let m = mask(word_bytes);
    match op {
        ValueOp::Xor => target ^ base,
        ValueOp::Sub => {
            let d = signed(target.wrapping_sub(base) & m, word_bytes);
            (((d << 1) ^ (d >> 63)) as u64) & m
        }
    }
}

/// Value words split into the streams of `layout` (spec §8.4).
pub fn split(values: &[u64], layout: ValueLayout, word_bytes: usize) -> Vec<Vec<u8>> {
    let bits = 8 * word_bytes as u32;
    let m = mask(word_bytes);
    match layout {
        ValueLayout::Words => vec![store(values, word_bytes)],
        ValueLayout::BytePlanes | ValueLayout::RotatedBytePlanes => (0..word_bytes)
            .map(|k| {
                values
                    .iter()
                    .map(|&v| {
                        let v = if layout == ValueLayout::RotatedBytePlanes {
                            ((v << 1) | (v >> (bits - 1))) & m
                        } else {
                            v
                        };
                        v.to_le_bytes()[k]
                    })
                    .collect()
            })
            .collect(),
    }
}

/// Gaps (first position, then differences) as `width` byte planes, least
/// significant first (spec §8.3). `gaps` may hold any values: faults are crafted here.
pub fn gap_planes(gaps: &[u64], width: u8) -> Vec<Vec<u8>> {
    (0..usize::from(width)).map(|k| gaps.iter().map(|g| g.to_le_bytes()[k]).collect()).collect()
}

/// Gaps of strictly increasing positions.
pub fn gaps_of(positions: &[u64]) -> Vec<u64> {
    let mut previous = 0;
    positions
        .iter()
        .enumerate()
        .map(|(j, &p)| {
            let gap = if j == 0 { p } else { p - previous };
            previous = p;
            gap
        })
        .collect()
}

/// The narrowest gap width of 1, 2 or 4 bytes.
pub fn gap_width(gaps: &[u64]) -> u8 {
    match gaps.iter().copied().max().unwrap_or(0) {
        0..=0xff => 1,
        0x100..=0xffff => 2,
        _ => 4,
    }
}

/// A bitmap of `words` bits; positions at or past `words` set padding bits.
pub fn bitmap(positions: &[u64], words: usize) -> Vec<u8> {
    let mut out = vec![0u8; words.div_ceil(8)];
    for &p in positions {
        let p = usize::try_from(p).expect("small");
        out[p / 8] |= 1 << (p % 8);
    }
    out
}

/// The base key of §8.6: the top byte of the base word rotated left by one bit.
pub fn base_key(base: u64, word_bytes: usize) -> u8 {
    let bits = 8 * word_bytes as u32;
    let m = mask(word_bytes);
    let rotated = ((base << 1) | (base >> (bits - 1))) & m;
    (rotated >> (bits - 8)) as u8
}
