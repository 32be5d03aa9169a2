//! Values: how a target word is expressed against its base word, and how value words
//! are split into streams (spec §8.2, §8.4). Everything works on bit patterns; no
//! float arithmetic is ever done.

use crate::codec::rans::Histogram;
use crate::container::chunk_map::{ValueLayout, ValueOp, ValueOrder};
use crate::dtype::WordWidth;
use crate::error::Result;

/// An unsigned word of 1, 2, 4 or 8 bytes.
pub(crate) trait Word: Copy + Eq + Default + Send + Sync {
    const BYTES: usize;
    fn load(bytes: &[u8]) -> Self;
    /// `bytes` as little-endian words in place, where they lie aligned and the
    /// machine is little-endian; `None` elsewhere.
    fn view(bytes: &[u8]) -> Option<&[Self]>;
    /// The bytes of `words` in place, in the machine's byte order.
    fn as_bytes(words: &[Self]) -> &[u8];
    fn store(self, bytes: &mut [u8]);
    fn byte(self, k: usize) -> u8;
    fn from_byte(byte: u8, k: usize) -> Self;
    fn or(self, other: Self) -> Self;
    /// `target` expressed against `base` (spec §8.2).
    fn express(target: Self, base: Self, op: ValueOp) -> Self;
    /// The inverse of [`Word::express`].
    fn combine(base: Self, value: Self, op: ValueOp) -> Self;
    fn rotate_left1(self) -> Self;
    fn rotate_right1(self) -> Self;
}

macro_rules! impl_word {
    ($unsigned:ty, $signed:ty) => {
        impl Word for $unsigned {
            const BYTES: usize = std::mem::size_of::<$unsigned>();

            #[inline]
            fn load(bytes: &[u8]) -> Self {
                let mut word = [0u8; std::mem::size_of::<$unsigned>()];
                word.copy_from_slice(bytes);
                <$unsigned>::from_le_bytes(word)
            }

            fn as_bytes(words: &[Self]) -> &[u8] {
                // SAFETY: an unsigned integer has no padding, every byte of it is
                // initialized, and bytes need no alignment; the length is that of
                // the words in bytes, within one allocation.
                unsafe { std::slice::from_raw_parts(words.as_ptr().cast::<u8>(), std::mem::size_of_val(words)) }
            }

            fn view(bytes: &[u8]) -> Option<&[Self]> {
                if cfg!(target_endian = "big") {
                    return None;
                }
                // SAFETY: every bit pattern is a valid unsigned integer.
                let (head, words, tail) = unsafe { bytes.align_to::<$unsigned>() };
                (head.is_empty() && tail.is_empty()).then_some(words)
            }

            #[inline]
            fn store(self, bytes: &mut [u8]) {
                bytes.copy_from_slice(&self.to_le_bytes());
            }

            #[inline]
            #[allow(clippy::cast_possible_truncation)] // taking one byte is the point
            fn byte(self, k: usize) -> u8 {
                (self >> (8 * k)) as u8
            }

            #[inline]
            fn from_byte(byte: u8, k: usize) -> Self {
                <$unsigned>::from(byte) << (8 * k)
            }

            #[inline]
            fn or(self, other: Self) -> Self {
                self | other
            }

            #[inline]
            #[allow(clippy::cast_sign_loss, clippy::cast_possible_wrap)] // zigzag is a bit-level map
            fn express(target: Self, base: Self, op: ValueOp) -> Self {
                match op {
                    ValueOp::Xor => target ^ base,
                    ValueOp::Sub => {
                        let d = target.wrapping_sub(base) as $signed;
                        ((d << 1) ^ (d >> (<$unsigned>::BITS - 1))) as $unsigned
                    }
                }
            }

            #[inline]
            fn combine(base: Self, value: Self, op: ValueOp) -> Self {
                match op {
                    ValueOp::Xor => base ^ value,
                    ValueOp::Sub => base.wrapping_add((value >> 1) ^ (0 as $unsigned).wrapping_sub(value & 1)),
                }
            }

            #[inline]
            fn rotate_left1(self) -> Self {
                self.rotate_left(1)
            }

            #[inline]
            fn rotate_right1(self) -> Self {
                self.rotate_right(1)
            }
        }
    };
}

impl_word!(u8, i8);
impl_word!(u16, i16);
impl_word!(u32, i32);
impl_word!(u64, i64);

/// Calls `$body` with `$W` bound to the word type of a [`WordWidth`](crate::WordWidth).
macro_rules! with_word {
    ($width:expr, $W:ident => $body:expr) => {
        match $width {
            $crate::dtype::WordWidth::W1 => {
                type $W = u8;
                $body
            }
            $crate::dtype::WordWidth::W2 => {
                type $W = u16;
                $body
            }
            $crate::dtype::WordWidth::W4 => {
                type $W = u32;
                $body
            }
            $crate::dtype::WordWidth::W8 => {
                type $W = u64;
                $body
            }
        }
    };
}
pub(crate) use with_word;

/// Number of streams a layout uses for words of `width`.
#[must_use]
pub fn stream_count(layout: ValueLayout, width: WordWidth) -> usize {
    match layout {
        ValueLayout::Words => 1,
        ValueLayout::BytePlanes | ValueLayout::RotatedBytePlanes => width.bytes(),
    }
}

fn layout_word<W: Word>(value: W, layout: ValueLayout) -> W {
    match layout {
        ValueLayout::RotatedBytePlanes => value.rotate_left1(),
        _ => value,
    }
}

/// Splits value words into the streams of `layout`.
pub(crate) fn split<W: Word>(values: &[W], layout: ValueLayout) -> Vec<Vec<u8>> {
    if layout == ValueLayout::Words {
        let mut bytes = vec![0u8; values.len() * W::BYTES];
        for (value, out) in values.iter().zip(bytes.chunks_exact_mut(W::BYTES)) {
            value.store(out);
        }
        return vec![bytes];
    }
    (0..W::BYTES).map(|k| values.iter().map(|&value| layout_word(value, layout).byte(k)).collect()).collect()
}

/// Joins the streams of `layout` back into `count` value words.
///
/// # Errors
/// `E_OUT_OF_MEMORY` when `out` cannot grow to `count` words.
pub(crate) fn join<W: Word>(streams: &[&[u8]], count: usize, layout: ValueLayout, out: &mut Vec<W>) -> Result<()> {
    join_range(streams, 0..count, layout, out)
}

/// [`join`] of the value words `range` only.
#[inline(always)] // into join_apply_positional's vector builds
fn join_range<W: Word>(
    streams: &[&[u8]],
    range: std::ops::Range<usize>,
    layout: ValueLayout,
    out: &mut Vec<W>,
) -> Result<()> {
    out.clear();
    let count = range.len();
    if count == 0 {
        return Ok(());
    }
    crate::limits::try_reserve(out, count)?;
    if layout == ValueLayout::Words {
        let bytes = &streams[0][range.start * W::BYTES..range.end * W::BYTES];
        out.extend(bytes.chunks_exact(W::BYTES).map(W::load));
        return Ok(());
    }
    out.resize(count, W::default());
    // One pass per plane keeps each loop a simple zip that the compiler vectorises.
    for (k, plane) in streams.iter().enumerate() {
        for (word, &byte) in out.iter_mut().zip(&plane[range.clone()]) {
            *word = word.or(W::from_byte(byte, k));
        }
    }
    if layout == ValueLayout::RotatedBytePlanes {
        for word in out.iter_mut() {
            *word = word.rotate_right1();
        }
    }
    Ok(())
}

/// Applies values to `words` (which hold the base): the value of the `j`-th position
/// goes to word `positions[j]`, or to word `j` when `positions` is `None`, and is
/// found in `values` by `order` (spec §8.6). Returns the number of nonzero values.
/// Positions have been checked to lie inside `words`.
#[inline(always)] // into join_apply_positional's vector builds
pub(crate) fn apply<W: Word>(
    words: &mut [u8],
    values: &[W],
    positions: Option<&[u32]>,
    order: ValueOrder,
    op: ValueOp,
) -> usize {
    fn run<W: Word>(
        words: &mut [u8],
        values: &[W],
        positions: Option<&[u32]>,
        order: ValueOrder,
        combine: impl Fn(W, W) -> W,
    ) {
        let slot = |i: usize| i * W::BYTES..(i + 1) * W::BYTES;
        match (order, positions) {
            (ValueOrder::Positional, None) => {
                for (word, &value) in words.chunks_exact_mut(W::BYTES).zip(values) {
                    combine(W::load(word), value).store(word);
                }
            }
            (ValueOrder::Positional, Some(positions)) => {
                for (&i, &value) in positions.iter().zip(values) {
                    let word = &mut words[slot(i as usize)];
                    combine(W::load(word), value).store(word);
                }
            }
            (ValueOrder::GroupedByBase, _) => {
                let index = |j: usize| positions.map_or(j, |p| p[j] as usize);
                let key_at = |j: usize| group_key(W::load(&words[slot(index(j))]));
                GroupCursors::new(values.len(), key_at).walk(|j, cursors| {
                    let word = &mut words[slot(index(j))];
                    let base = W::load(word);
                    let cursor = &mut cursors[usize::from(group_key(base))];
                    combine(base, values[*cursor]).store(word);
                    *cursor += 1;
                });
            }
        }
    }
    match op {
        ValueOp::Xor => run(words, values, positions, order, |b, v| W::combine(b, v, ValueOp::Xor)),
        ValueOp::Sub => run(words, values, positions, order, |b, v| W::combine(b, v, ValueOp::Sub)),
    }
    values.iter().filter(|&&v| v != W::default()).count()
}

/// Values joined and applied per block of this many words: the block stays in the
/// cache, and no buffer the size of the chunk is allocated and faulted in.
const JOIN_BLOCK: usize = 1 << 12;

/// [`join`] then [`apply`] of values in positional order, a block at a time; without
/// `words`, only counts the nonzero values. Returns the number of nonzero values.
///
/// # Errors
/// As [`join`].
pub(crate) fn join_apply_positional<W: Word>(
    streams: &[&[u8]],
    count: usize,
    layout: ValueLayout,
    mut words: Option<&mut [u8]>,
    positions: Option<&[u32]>,
    op: ValueOp,
) -> Result<usize> {
    let mut join_apply =
        || join_apply_positional_inline::<W>(streams, count, layout, words.as_deref_mut(), positions, op);
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2.
        return unsafe { in_avx2_build(join_apply) };
    }
    join_apply()
}

/// Runs `f` compiled for AVX2, into which it is inlined: the loops of
/// [`join_apply_positional`] are simple zips, which the compiler vectorizes twice
/// as wide as with the baseline's SSE2.
///
/// # Safety
/// The CPU must have AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn in_avx2_build<R>(f: impl FnOnce() -> R) -> R {
    f()
}

#[inline(always)]
fn join_apply_positional_inline<W: Word>(
    streams: &[&[u8]],
    count: usize,
    layout: ValueLayout,
    mut words: Option<&mut [u8]>,
    positions: Option<&[u32]>,
    op: ValueOp,
) -> Result<usize> {
    let mut block: Vec<W> = Vec::new();
    let mut nonzero = 0;
    for start in (0..count).step_by(JOIN_BLOCK) {
        let range = start..(start + JOIN_BLOCK).min(count);
        join_range(streams, range.clone(), layout, &mut block)?;
        nonzero += match (words.as_deref_mut(), positions) {
            (None, _) => block.iter().filter(|&&v| v != W::default()).count(),
            (Some(words), None) => {
                let words = &mut words[range.start * W::BYTES..range.end * W::BYTES];
                apply(words, &block, None, ValueOrder::Positional, op)
            }
            (Some(words), Some(positions)) => apply(words, &block, Some(&positions[range]), ValueOrder::Positional, op),
        };
    }
    Ok(nonzero)
}

/// The group of a base word (spec §8.6): the top byte of the word rotated left by
/// one bit. For floats that is the exponent's top bits, which sets how many units
/// in the last place an update spans, so values of one group look alike.
#[inline]
pub(crate) fn group_key<W: Word>(base: W) -> u8 {
    base.rotate_left1().byte(W::BYTES - 1)
}

/// The group key of every word of `base`, as [`group_key`] gives it.
pub(crate) fn group_keys<W: Word>(base: &[W]) -> Vec<u8> {
    let mut keys = vec![0u8; base.len()];
    for (key, &word) in keys.iter_mut().zip(base) {
        *key = group_key(word);
    }
    keys
}

/// Runs walked side by side when grouping: successive equal keys would otherwise
/// chain every step through one counter in memory.
const LANES: usize = 4;

/// The slot in grouped order of every item of a keyed list (spec §8.6): a stable
/// counting sort by key. The list is cut into [`LANES`] runs (plus a remainder)
/// walked side by side, each with cursors of its own, which gives the same slots as
/// a single walk.
struct GroupCursors {
    cursors: [[usize; 256]; LANES + 1],
    lane_len: usize,
    count: usize,
}

impl GroupCursors {
    fn new(count: usize, key_at: impl Fn(usize) -> u8) -> Self {
        let lane_len = count / LANES;
        let mut counts = [[0usize; 256]; LANES + 1];
        for j in 0..lane_len {
            for (lane, lane_counts) in counts[..LANES].iter_mut().enumerate() {
                lane_counts[usize::from(key_at(lane * lane_len + j))] += 1;
            }
        }
        for j in LANES * lane_len..count {
            counts[LANES][usize::from(key_at(j))] += 1;
        }
        // Each key's slots, lane by lane: lane 0's come first, as in a single walk.
        let mut cursors = [[0usize; 256]; LANES + 1];
        let mut next = 0;
        for key in 0..256 {
            for lane in 0..=LANES {
                cursors[lane][key] = next;
                next += counts[lane][key];
            }
        }
        Self { cursors, lane_len, count }
    }

    /// Calls `visit(j, cursors)` once for every item `j`, with the cursors of its
    /// lane: the item's slot is `cursors[key]`, which the visitor then advances.
    fn walk(mut self, mut visit: impl FnMut(usize, &mut [usize; 256])) {
        for j in 0..self.lane_len {
            for (lane, cursors) in self.cursors[..LANES].iter_mut().enumerate() {
                visit(lane * self.lane_len + j, cursors);
            }
        }
        for j in LANES * self.lane_len..self.count {
            visit(j, &mut self.cursors[LANES]);
        }
    }
}

/// Lists `values` (in position order, with the base key of each) in grouped order.
pub(crate) fn group<W: Word>(values: &[W], keys: &[u8]) -> Vec<W> {
    let mut grouped = vec![W::default(); values.len()];
    let count = keys.len().min(values.len());
    let cursors = GroupCursors::new(count, |j| keys[j]);
    // The walk of GroupCursors::walk, lane by lane over slices of their own.
    let lane_len = cursors.lane_len;
    let mut lanes = cursors.cursors;
    let (lane_cursors, rest_cursors) = lanes.split_at_mut(LANES);
    let [c0, c1, c2, c3] = lane_cursors else { unreachable!("LANES is 4") };
    let lane = |l: usize| (&keys[l * lane_len..(l + 1) * lane_len], &values[l * lane_len..(l + 1) * lane_len]);
    let ((k0, v0), (k1, v1), (k2, v2), (k3, v3)) = (lane(0), lane(1), lane(2), lane(3));
    for j in 0..lane_len {
        for (cursors, keys, values) in [(&mut *c0, k0, v0), (&mut *c1, k1, v1), (&mut *c2, k2, v2), (&mut *c3, k3, v3)]
        {
            let cursor = &mut cursors[usize::from(keys[j])];
            grouped[*cursor] = values[j];
            *cursor += 1;
        }
    }
    for j in LANES * lane_len..count {
        let cursor = &mut rest_cursors[0][usize::from(keys[j])];
        grouped[*cursor] = values[j];
        *cursor += 1;
    }
    grouped
}

/// Estimated size in bits of `values` under `layout`, from order-0 byte entropy of
/// each stream. Used only to choose a layout; the writer measures real sizes where
/// the choice is close.
pub(crate) fn estimate_bits<W: Word>(values: &[W], layout: ValueLayout) -> f64 {
    split(values, layout).iter().map(|s| entropy_bits(s)).sum()
}

/// Adds `value` to the byte histograms of the streams that [`split`] makes under
/// `layout`, one histogram a stream: the counts of splitting, without the streams.
pub(crate) fn count_streams<W: Word>(value: W, layout: ValueLayout, histograms: &mut [Histogram]) {
    if layout == ValueLayout::Words {
        for k in 0..W::BYTES {
            histograms[0][usize::from(value.byte(k))] += 1;
        }
        return;
    }
    let word = layout_word(value, layout);
    for (k, histogram) in histograms[..W::BYTES].iter_mut().enumerate() {
        histogram[usize::from(word.byte(k))] += 1;
    }
}

/// The order-0 entropy of streams in bits from their histograms, with the
/// Miller–Madow correction for small samples (`(K - 1) / (2 ln 2)` bits per stream
/// with `K` distinct bytes), so that cutting a sample into many small groups does
/// not look cheaper than it is.
pub(crate) fn corrected_bits(histograms: &[Histogram]) -> f64 {
    histograms
        .iter()
        .map(|histogram| {
            #[allow(clippy::cast_precision_loss)] // an estimate
            let distinct = histogram.iter().filter(|&&n| n > 0).count() as f64;
            crate::codec::rans::entropy_bits(histogram) + (distinct - 1.0).max(0.0) / (2.0 * std::f64::consts::LN_2)
        })
        .sum()
}

/// Order-0 entropy of `bytes`, in bits, summed over all bytes.
#[must_use]
#[allow(clippy::cast_precision_loss)] // an estimate
pub fn entropy_bits(bytes: &[u8]) -> f64 {
    crate::codec::rans::entropy_bits(&crate::codec::rans::histogram(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn express_and_combine_are_inverse_for_every_op() {
        for (t, b) in [(0x3f80u16, 0x3f81u16), (0, 0xffff), (0x8000, 1), (7, 7)] {
            for op in [ValueOp::Xor, ValueOp::Sub] {
                let v = u16::express(t, b, op);
                assert_eq!(u16::combine(b, v, op), t);
            }
        }
        // One ulp up or down is a small zigzag value, which is why Sub exists.
        assert_eq!(u16::express(0x3f81, 0x3f80, ValueOp::Sub), 2);
        assert_eq!(u16::express(0x3f7f, 0x3f80, ValueOp::Sub), 1);
        assert_eq!(u16::express(0x3f80, 0x3f7f, ValueOp::Xor), 0xff);
    }

    #[test]
    fn grouping_is_a_stable_sort_by_base_key() {
        let base: [u16; 4] = [0x3f80, 0x0001, 0xbf80, 0x3f81];
        let keys: Vec<u8> = base.iter().map(|&b| group_key(b)).collect();
        // 0x3f80 and 0xbf80 differ only in sign, which rotates out of the top byte.
        assert_eq!(keys, [0x7f, 0x00, 0x7f, 0x7f]);
        let values = [10u16, 20, 30, 40];
        let grouped = group(&values, &keys);
        assert_eq!(grouped, [20, 10, 30, 40]);
        // Applying grouped values finds each one by its base word's key.
        let mut words: Vec<u8> = base.iter().flat_map(|b| b.to_le_bytes()).collect();
        assert_eq!(apply(&mut words, &grouped, None, ValueOrder::GroupedByBase, ValueOp::Xor), 4);
        let expected: Vec<u8> = base.iter().zip(values).flat_map(|(b, v)| (b ^ v).to_le_bytes()).collect();
        assert_eq!(words, expected);
    }

    #[test]
    fn split_and_gather_round_trip() {
        let values: Vec<u32> = vec![0x8000_0001, 0x1234_5678, 0, u32::MAX];
        for layout in [ValueLayout::Words, ValueLayout::BytePlanes, ValueLayout::RotatedBytePlanes] {
            let streams = split(&values, layout);
            assert_eq!(streams.len(), stream_count(layout, crate::dtype::WordWidth::W4));
            let refs: Vec<&[u8]> = streams.iter().map(Vec::as_slice).collect();
            let mut back: Vec<u32> = Vec::new();
            join(&refs, values.len(), layout, &mut back).unwrap();
            assert_eq!(back, values);
        }
        // Rotation moves the sign bit to the low byte and the exponent to the top.
        let rotated = split(&[0x8000_0001u32], ValueLayout::RotatedBytePlanes);
        assert_eq!(rotated[0], vec![3]);
    }
}
