//! CPU reference of the kernels, as plain functions over byte slices.
//!
//! Positions come from the format library's own decoders
//! ([`tpde::format::positions`]), with its errors mapped onto the bits of the
//! device error flag. Joining value streams into words and combining them
//! with the base are the apply kernels' word arithmetic; the library keeps
//! its versions private, so they are restated here, and the tests check them
//! (and the GPU) against the library's [`tpde::format::decode_chunk`]. Words
//! are little-endian (`spec/FORMAT.md` §8). Values grouped by base key
//! (§8.6) are found by the stable counting sort that the spec states
//! ([`grouped_slots`]); the kernels compute the same slots tile by tile.
//!
//! This is the crate's low-level module, for tests and tools that check the
//! kernels: it also holds the bits of the device error flag ([`flag`]).

use tpde::format::rans::{decode_into, Contexts, TableForm};
use tpde::format::{positions, Encoding, PositionCoding, ValueLayout, ValueOp, ValueOrder};
use tpde::{ErrorCode, WordWidth};

pub use crate::error::flag;
use crate::error::{GpuError, Result};
use crate::pipeline::{decode_stream, ChunkRef};
use crate::rans::{allowed_contexts, context, Header};

/// `unzigzag(v) = (v >> 1) ^ -(v & 1)`, at the word width (§8.2).
#[must_use]
pub fn unzigzag(v: u64, width: WordWidth) -> u64 {
    ((v >> 1) ^ 0u64.wrapping_sub(v & 1)) & width.mask()
}

/// `combine(b, v)` of §8.2: what `apply_wN` writes for base word `b` and
/// value `v`.
#[must_use]
pub fn combine(b: u64, v: u64, op: ValueOp, width: WordWidth) -> u64 {
    match op {
        ValueOp::Xor => b ^ v,
        ValueOp::Sub => b.wrapping_add(unzigzag(v, width)) & width.mask(),
    }
}

/// Value `j` of `count` values laid out in `streams` (§8.4): one stream of
/// little-endian words, or byte planes (least significant first), rotated
/// right by one bit for rotated planes. The kernels' `load_value`.
#[must_use]
pub fn load_value(streams: &[&[u8]], layout: ValueLayout, width: WordWidth, j: usize) -> u64 {
    let w = width.bytes();
    let mut v = 0u64;
    match layout {
        ValueLayout::Words => {
            for (k, b) in streams[0][j * w..(j + 1) * w].iter().enumerate() {
                v |= u64::from(*b) << (8 * k);
            }
        }
        ValueLayout::BytePlanes | ValueLayout::RotatedBytePlanes => {
            for (k, plane) in streams[..w].iter().enumerate() {
                v |= u64::from(plane[j]) << (8 * k);
            }
            if layout == ValueLayout::RotatedBytePlanes {
                v = ((v >> 1) | (v << (width.bits() - 1))) & width.mask();
            }
        }
    }
    v
}

/// The base key of a base word (§8.6): the top byte of `rotl(b, 1)` at the
/// word width. The kernels' `group_key`.
#[must_use]
pub fn group_key(b: u64, width: WordWidth) -> u8 {
    let bits = width.bits();
    let b = b & width.mask();
    let r = ((b << 1) | (b >> (bits - 1))) & width.mask();
    // the top byte of a `bits`-bit word
    u8::try_from(r >> (bits - 8)).unwrap_or(0)
}

/// For values grouped by base key (§8.6): the list index of the value of
/// each position, given the base key of each position in positional order.
/// `slot(i) = start[k_i] + |{ i' < i : k_i' = k_i }|`.
#[must_use]
pub fn grouped_slots(keys: &[u8]) -> Vec<usize> {
    let mut next = [0usize; 256];
    for &k in keys {
        next[usize::from(k)] += 1;
    }
    let mut start = 0;
    for n in &mut next {
        let count = *n;
        *n = start;
        start += count;
    }
    keys.iter()
        .map(|&k| {
            let slot = next[usize::from(k)];
            next[usize::from(k)] += 1;
            slot
        })
        .collect()
}

/// Every stream of a validated chunk, decoded; a lane rANS stream whose
/// context is the base key needs the base ([`decode_streams_with_base`]).
pub fn decode_streams(c: &ChunkRef<'_>) -> Result<Vec<Vec<u8>>> {
    decode_streams_with_base(c, None)
}

/// Every stream of a validated chunk of `base`'s word width, decoded in the
/// order their contexts need (§11.2 D3): each set of planes from the most
/// significant down, the positions before the values, lane rANS streams by
/// the library's decoder with their contexts (the plane above, or the base
/// key of each value's base word in `base`: the chunk's base words, zeros
/// past a shorter base). What the device decoder must give.
pub fn decode_streams_with_base(c: &ChunkRef<'_>, base: Option<(&[u8], WordWidth)>) -> Result<Vec<Vec<u8>>> {
    let n = c.streams.len();
    let np = c.position_stream_count();
    let stored: Vec<&[u8]> = c.stored_streams().collect();
    let mut out: Vec<Vec<u8>> = vec![Vec::new(); n];
    let mut positions: Option<Vec<u32>> = None;
    for set in [0..np, np..n] {
        for q in set.rev() {
            let (r, bytes) = (&c.streams[q], stored[q]);
            let len = r.decoded_len as usize;
            let Some(form) = TableForm::of_codec(r.codec) else {
                out[q] = vec![0u8; len];
                decode_stream(r, bytes, &mut out[q])?;
                continue;
            };
            // the contexts §8.7 allows here (the kernels check the same); in a
            // validated chunk in byte planes, the value planes are the word's bytes
            let width = base.map_or_else(|| WordWidth::try_from(n - np).unwrap_or(WordWidth::W1), |(_, w)| w);
            let header = Header::read(form, bytes, allowed_contexts(c, q, width))?;
            let sparse = c.record.encoding == Encoding::Sparse;
            if header.context == context::BASE_KEY && sparse && positions.is_none() {
                positions = Some(chunk_positions(c, &out)?);
            }
            let contexts = match (header.context, base) {
                (context::NONE, _) => Contexts::None,
                (context::HIGHER_PLANE, _) => Contexts::HigherPlane(&out[q + 1]),
                (_, Some((words, _))) => {
                    Contexts::BaseKeys { base: words, word_bytes: width.bytes(), positions: positions.as_deref() }
                }
                (_, None) => return Err(GpuError::invalid("a base-key context needs the base")),
            };
            let mut decoded = Vec::new();
            decode_into(form, bytes, len, contexts, &mut decoded)?;
            out[q] = decoded;
        }
    }
    Ok(out)
}

/// The device flag bit that a kernel raises where the format library's
/// position decoder fails with `code` (§8.3).
#[must_use]
pub fn flag_of(code: ErrorCode, coding: PositionCoding) -> Option<u32> {
    match (code, coding) {
        (ErrorCode::PositionsNotIncreasing, _) => Some(flag::ZERO_GAP),
        (ErrorCode::PositionsOutOfBounds, PositionCoding::Bitmap) => Some(flag::BITMAP_PADDING),
        (ErrorCode::PositionsOutOfBounds, _) => Some(flag::POSITION_RANGE),
        (ErrorCode::ChangedCount, _) => Some(flag::COUNT_MISMATCH),
        _ => None,
    }
}

/// Absolute positions of a sparse chunk from its decoded streams, by the
/// format library's decoders (what the `positions` kernel writes). A bad
/// stream is [`GpuError::DeviceFlag`] with the bit the kernels raise.
pub fn chunk_positions(c: &ChunkRef<'_>, decoded: &[Vec<u8>]) -> Result<Vec<u32>> {
    let (m, n) = (c.record.changed_count as usize, c.words as usize);
    let mut out = Vec::new();
    let coding = c.record.position_coding;
    let r = match (c.record.encoding, coding) {
        (Encoding::Sparse, PositionCoding::Gaps) => {
            let planes: Vec<&[u8]> = decoded[..c.position_stream_count()].iter().map(Vec::as_slice).collect();
            positions::decode_gaps(&planes, m, n, &mut out)
        }
        (Encoding::Sparse, PositionCoding::Bitmap) => positions::decode_bitmap(&decoded[0], m, n, &mut out),
        _ => return Err(GpuError::invalid("only sparse chunks have positions")),
    };
    match r {
        Ok(()) => Ok(out),
        Err(e) => Err(flag_of(e.code(), coding).map_or(GpuError::Format(e), GpuError::DeviceFlag)),
    }
}

/// Rebuilds a validated chunk in place: `buf` holds its base words (zeros
/// past a shorter base) and receives the target words, as the apply kernels
/// do.
pub fn apply_chunk_in_place(c: &ChunkRef<'_>, width: WordWidth, buf: &mut [u8]) -> Result<()> {
    c.validate(width)?;
    let w = width.bytes();
    if buf.len() != c.words as usize * w {
        return Err(GpuError::invalid("buffer must hold the chunk's words"));
    }
    let decoded = decode_streams_with_base(c, Some((buf, width)))?;
    let np = c.position_stream_count();
    let vals: Vec<&[u8]> = decoded[np..].iter().map(Vec::as_slice).collect();
    let (op, layout) = (c.record.value_op, c.record.value_layout);
    let word = |buf: &[u8], i: usize| {
        let mut b = [0u8; 8];
        b[..w].copy_from_slice(&buf[i * w..(i + 1) * w]);
        u64::from_le_bytes(b)
    };
    // the word of each value position, in positional order
    let words: Vec<usize> = match c.record.encoding {
        Encoding::Unchanged => return Ok(()),
        Encoding::Dense | Encoding::Raw => (0..c.words as usize).collect(),
        Encoding::Sparse => chunk_positions(c, &decoded)?.into_iter().map(|p| p as usize).collect(),
    };
    // keys come from the base words, all read before any word is written
    let slots: Vec<usize> = match c.record.value_order {
        ValueOrder::Positional => (0..words.len()).collect(),
        ValueOrder::GroupedByBase => {
            let keys: Vec<u8> = words.iter().map(|&i| group_key(word(buf, i), width)).collect();
            grouped_slots(&keys)
        }
    };
    let raw = c.record.encoding == Encoding::Raw;
    for (&i, &j) in words.iter().zip(&slots) {
        let v = load_value(&vals, layout, width, j);
        let t = if raw { v } else { combine(word(buf, i), v, op, width) };
        buf[i * w..(i + 1) * w].copy_from_slice(&t.to_le_bytes()[..w]);
    }
    Ok(())
}
