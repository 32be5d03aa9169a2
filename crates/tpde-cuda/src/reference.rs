//! CPU reference of every kernel, as plain functions over byte slices.
//!
//! The GPU results must be bit-exact with these. They also serve as the
//! reference encoder that the tests and benchmarks use to build chunks.
//! Words are little-endian (`spec/FORMAT.md`, "Words").

use crate::error::{flag, GpuError, Result};
use crate::spec::{ChunkKind, ChunkSpec, PositionCoding, ValueLayout, ValueOp, WordWidth};

/// Reads word `i` of a little-endian word buffer.
#[must_use]
pub fn read_word(bytes: &[u8], width: WordWidth, i: usize) -> u64 {
    let w = width.bytes();
    let mut buf = [0u8; 8];
    buf[..w].copy_from_slice(&bytes[i * w..(i + 1) * w]);
    u64::from_le_bytes(buf)
}

/// Writes word `i` of a little-endian word buffer.
pub fn write_word(bytes: &mut [u8], width: WordWidth, i: usize, v: u64) {
    let w = width.bytes();
    bytes[i * w..(i + 1) * w].copy_from_slice(&v.to_le_bytes()[..w]);
}

/// `zigzag(d) = (d << 1) ^ (d >> (bits - 1))` (arithmetic shift), at the word width.
#[must_use]
pub fn zigzag(d: u64, width: WordWidth) -> u64 {
    let bits = width.bits();
    let sign = (d >> (bits - 1)) & 1;
    ((d << 1) ^ 0u64.wrapping_sub(sign)) & width.mask()
}

/// `unzigzag(v) = (v >> 1) ^ -(v & 1)`, at the word width.
#[must_use]
pub fn unzigzag(v: u64, width: WordWidth) -> u64 {
    ((v >> 1) ^ 0u64.wrapping_sub(v & 1)) & width.mask()
}

/// `combine(b, v)` of the spec.
#[must_use]
pub fn combine(b: u64, v: u64, op: ValueOp, width: WordWidth) -> u64 {
    match op {
        ValueOp::Xor => b ^ v,
        ValueOp::Sub => b.wrapping_add(unzigzag(v, width)) & width.mask(),
    }
}

/// The stored value that turns `b` into `t` (inverse of [`combine`]).
#[must_use]
pub fn difference(b: u64, t: u64, op: ValueOp, width: WordWidth) -> u64 {
    match op {
        ValueOp::Xor => b ^ t,
        ValueOp::Sub => zigzag(t.wrapping_sub(b) & width.mask(), width),
    }
}

fn rotl1(w: u64, width: WordWidth) -> u64 {
    let bits = width.bits();
    ((w << 1) | (w >> (bits - 1))) & width.mask()
}

fn rotr1(w: u64, width: WordWidth) -> u64 {
    let bits = width.bits();
    ((w >> 1) | (w << (bits - 1))) & width.mask()
}

/// Splits little-endian words into byte planes (plane k holds byte k of each
/// word), rotating each word left by 1 bit first when `rotated`.
#[must_use]
pub fn split_planes(words: &[u8], width: WordWidth, rotated: bool) -> Vec<u8> {
    let w = width.bytes();
    let count = words.len() / w;
    let mut planes = vec![0u8; count * w];
    for i in 0..count {
        let mut v = read_word(words, width, i);
        if rotated {
            v = rotl1(v, width);
        }
        for (k, byte) in v.to_le_bytes()[..w].iter().enumerate() {
            planes[k * count + i] = *byte;
        }
    }
    planes
}

/// Joins byte planes back into little-endian words (inverse of [`split_planes`]).
#[must_use]
pub fn join_planes(planes: &[u8], width: WordWidth, rotated: bool) -> Vec<u8> {
    let w = width.bytes();
    let count = planes.len() / w;
    let mut words = vec![0u8; count * w];
    for i in 0..count {
        let mut v = 0u64;
        for k in 0..w {
            v |= u64::from(planes[k * count + i]) << (8 * k);
        }
        if rotated {
            v = rotr1(v, width);
        }
        write_word(&mut words, width, i, v);
    }
    words
}

/// Values as little-endian words, whatever their layout.
#[must_use]
pub fn values_as_words(values: &[u8], layout: ValueLayout, width: WordWidth) -> Vec<u8> {
    match layout {
        ValueLayout::Words => values.to_vec(),
        ValueLayout::BytePlanes => join_planes(values, width, false),
        ValueLayout::RotatedBytePlanes => join_planes(values, width, true),
    }
}

/// Values laid out from little-endian words.
#[must_use]
pub fn words_to_layout(words: &[u8], layout: ValueLayout, width: WordWidth) -> Vec<u8> {
    match layout {
        ValueLayout::Words => words.to_vec(),
        ValueLayout::BytePlanes => split_planes(words, width, false),
        ValueLayout::RotatedBytePlanes => split_planes(words, width, true),
    }
}

/// Gap byte planes (LSB plane first) → absolute positions, with the checks
/// the kernels make: a non-first gap of 0, or a position `>= n`, is an error
/// carrying the same flag bits as the device error flag.
pub fn gaps_to_positions(planes: &[u8], gap_width: u8, m: usize, n: usize) -> Result<Vec<u32>> {
    let gw = usize::from(gap_width);
    if planes.len() != gw * m {
        return Err(GpuError::corrupt("gap planes length is not gap_width * m"));
    }
    let mut out = Vec::with_capacity(m);
    let mut p: u64 = 0;
    let mut bits = 0;
    for j in 0..m {
        let mut g = 0u64;
        for k in 0..gw {
            g |= u64::from(planes[k * m + j]) << (8 * k);
        }
        if g == 0 && j > 0 {
            bits |= flag::ZERO_GAP;
        }
        p += g;
        if p >= n as u64 {
            bits |= flag::POSITION_RANGE;
        }
        out.push(u32::try_from(p).unwrap_or(u32::MAX));
    }
    if bits != 0 {
        return Err(GpuError::DeviceFlag(bits));
    }
    Ok(out)
}

/// Absolute positions → gap byte planes (the encoder side).
#[must_use]
pub fn positions_to_gaps(positions: &[u32], gap_width: u8) -> Vec<u8> {
    let gw = usize::from(gap_width);
    let m = positions.len();
    let mut planes = vec![0u8; gw * m];
    let mut prev = 0u32;
    for (j, &p) in positions.iter().enumerate() {
        let g = if j == 0 { p } else { p - prev };
        prev = p;
        for k in 0..gw {
            planes[k * m + j] = g.to_le_bytes()[k];
        }
    }
    planes
}

/// Smallest gap width (1, 2 or 4) that holds every gap.
#[must_use]
pub fn gap_width_for(positions: &[u32]) -> u8 {
    let mut max = 0u32;
    let mut prev = 0u32;
    for (j, &p) in positions.iter().enumerate() {
        max = max.max(if j == 0 { p } else { p - prev });
        prev = p;
    }
    match max {
        0..=0xff => 1,
        0x100..=0xffff => 2,
        _ => 4,
    }
}

/// Bitmap (LSB-first) → positions, checking padding bits and the count `m`.
pub fn bitmap_to_positions(bitmap: &[u8], n: usize, m: usize) -> Result<Vec<u32>> {
    if bitmap.len() != n.div_ceil(8) {
        return Err(GpuError::corrupt("bitmap length is not ceil(n / 8)"));
    }
    let mut out = Vec::with_capacity(m);
    let mut bits = 0;
    for (b, &byte) in bitmap.iter().enumerate() {
        for bit in 0..8 {
            if byte >> bit & 1 == 1 {
                let i = b * 8 + bit;
                if i >= n {
                    bits |= flag::BITMAP_PADDING;
                } else {
                    out.push(u32::try_from(i).unwrap_or(u32::MAX));
                }
            }
        }
    }
    if out.len() != m {
        bits |= flag::COUNT_MISMATCH;
    }
    if bits != 0 {
        return Err(GpuError::DeviceFlag(bits));
    }
    Ok(out)
}

/// Positions → bitmap of `n` bits.
#[must_use]
pub fn positions_to_bitmap(positions: &[u32], n: usize) -> Vec<u8> {
    let mut bm = vec![0u8; n.div_ceil(8)];
    for &p in positions {
        bm[p as usize / 8] |= 1 << (p % 8);
    }
    bm
}

/// Decoded positions of a sparse chunk.
pub fn chunk_positions(spec: &ChunkSpec, positions: &[u8]) -> Result<Vec<u32>> {
    let n = spec.words as usize;
    let m = spec.changed as usize;
    match spec.kind {
        ChunkKind::Sparse(PositionCoding::Gaps { width }) => {
            gaps_to_positions(positions, width, m, n)
        }
        ChunkKind::Sparse(PositionCoding::Bitmap) => bitmap_to_positions(positions, n, m),
        _ => Err(GpuError::invalid("chunk has no positions")),
    }
}

/// Rebuilds the chunk's target words into `out` from `base` (both `n` words).
/// `positions` and `values` are the concatenated decoded streams.
pub fn apply_chunk(
    spec: &ChunkSpec,
    positions: &[u8],
    values: &[u8],
    base: &[u8],
    out: &mut [u8],
) -> Result<()> {
    let nb = spec.words as usize * spec.width.bytes();
    if base.len() != nb || out.len() != nb {
        return Err(GpuError::invalid(
            "base and out must hold the chunk's words",
        ));
    }
    out.copy_from_slice(base);
    apply_chunk_in_place(spec, positions, values, out)
}

/// Rebuilds the chunk's target words in place over its base words.
pub fn apply_chunk_in_place(
    spec: &ChunkSpec,
    positions: &[u8],
    values: &[u8],
    buf: &mut [u8],
) -> Result<()> {
    spec.validate()?;
    let w = spec.width;
    if buf.len() != spec.words as usize * w.bytes() {
        return Err(GpuError::invalid("buffer must hold the chunk's words"));
    }
    if positions.len() != spec.position_bytes() || values.len() != spec.value_bytes() {
        return Err(GpuError::corrupt("stream lengths do not match the chunk"));
    }
    let vals = values_as_words(values, spec.layout, w);
    match spec.kind {
        ChunkKind::Unchanged => {}
        ChunkKind::Raw => buf.copy_from_slice(&vals),
        ChunkKind::Dense => {
            for i in 0..spec.words as usize {
                let t = combine(read_word(buf, w, i), read_word(&vals, w, i), spec.op, w);
                write_word(buf, w, i, t);
            }
        }
        ChunkKind::Sparse(_) => {
            let pos = chunk_positions(spec, positions)?;
            for (j, &p) in pos.iter().enumerate() {
                let p = p as usize;
                let t = combine(read_word(buf, w, p), read_word(&vals, w, j), spec.op, w);
                write_word(buf, w, p, t);
            }
        }
    }
    Ok(())
}

/// Decoded streams of one encoded chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncodedChunkStreams {
    /// The chunk's description.
    pub spec: ChunkSpec,
    /// Every stream's decoded bytes, in format order (positions, then values).
    pub streams: Vec<Vec<u8>>,
}

/// Which encoding the reference encoder should use for a chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EncodeChoice {
    /// Sparse with gaps of the smallest width that fits.
    SparseGaps,
    /// Sparse with a bitmap.
    SparseBitmap,
    /// Dense.
    Dense,
    /// Raw.
    Raw,
}

/// Reference encoder: the chunk that turns `base` into `target` (both `n`
/// words). Returns an unchanged chunk when the words are equal.
pub fn encode_chunk(
    base: &[u8],
    target: &[u8],
    width: WordWidth,
    choice: EncodeChoice,
    op: ValueOp,
    layout: ValueLayout,
) -> Result<EncodedChunkStreams> {
    if base.len() != target.len() || base.len() % width.bytes() != 0 {
        return Err(GpuError::invalid(
            "base and target must be the same whole words",
        ));
    }
    let n = base.len() / width.bytes();
    let words = u32::try_from(n).map_err(|_| GpuError::invalid("chunk too large"))?;
    let op = if choice == EncodeChoice::Raw {
        ValueOp::Xor
    } else {
        op
    };
    let mut positions = Vec::new();
    let mut dense_vals = vec![
        0u8;
        if matches!(choice, EncodeChoice::Dense) {
            base.len()
        } else {
            0
        }
    ];
    let mut sparse_vals = Vec::new();
    for i in 0..n {
        let (b, t) = (read_word(base, width, i), read_word(target, width, i));
        let v = difference(b, t, op, width);
        if b != t {
            positions.push(u32::try_from(i).unwrap_or(u32::MAX));
            sparse_vals.extend_from_slice(&v.to_le_bytes()[..width.bytes()]);
        }
        if choice == EncodeChoice::Dense {
            write_word(&mut dense_vals, width, i, v);
        }
    }
    let changed = u32::try_from(positions.len()).unwrap_or(u32::MAX);
    let mut spec = ChunkSpec {
        kind: ChunkKind::Unchanged,
        op,
        layout,
        width,
        words,
        changed,
    };
    if changed == 0 {
        return Ok(EncodedChunkStreams {
            spec,
            streams: Vec::new(),
        });
    }
    let mut streams = Vec::new();
    let value_words = match choice {
        EncodeChoice::SparseGaps => {
            let gw = gap_width_for(&positions);
            spec.kind = ChunkKind::Sparse(PositionCoding::Gaps { width: gw });
            let planes = positions_to_gaps(&positions, gw);
            streams.extend(planes.chunks(positions.len()).map(<[u8]>::to_vec));
            sparse_vals
        }
        EncodeChoice::SparseBitmap => {
            spec.kind = ChunkKind::Sparse(PositionCoding::Bitmap);
            streams.push(positions_to_bitmap(&positions, n));
            sparse_vals
        }
        EncodeChoice::Dense => {
            spec.kind = ChunkKind::Dense;
            dense_vals
        }
        EncodeChoice::Raw => {
            spec.kind = ChunkKind::Raw;
            target.to_vec()
        }
    };
    let laid = words_to_layout(&value_words, layout, width);
    match layout {
        ValueLayout::Words => streams.push(laid),
        _ => {
            let count = value_words.len() / width.bytes();
            streams.extend(laid.chunks(count.max(1)).map(<[u8]>::to_vec));
        }
    }
    Ok(EncodedChunkStreams { spec, streams })
}

impl EncodedChunkStreams {
    /// Position streams concatenated (the layout the kernels read).
    #[must_use]
    pub fn positions(&self) -> Vec<u8> {
        self.streams[..self.spec.position_stream_count()].concat()
    }

    /// Value streams concatenated (the layout the kernels read).
    #[must_use]
    pub fn values(&self) -> Vec<u8> {
        if self.streams.is_empty() {
            return Vec::new();
        }
        self.streams[self.spec.position_stream_count()..].concat()
    }
}
