//! Format-neutral description of one chunk, as the kernels see it.
//!
//! These mirror the chunk record of `spec/FORMAT.md` ("Chunk record", "Chunk
//! semantics"): the loader maps the format library's records onto them, and
//! the tests and benchmarks build them directly.

use crate::error::{GpuError, Result};

/// Width of one word in bytes (`spec/FORMAT.md`, "Words").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
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

    /// The width for a number of bytes, if it is 1, 2, 4 or 8.
    pub fn from_bytes(bytes: usize) -> Result<Self> {
        match bytes {
            1 => Ok(Self::W1),
            2 => Ok(Self::W2),
            4 => Ok(Self::W4),
            8 => Ok(Self::W8),
            _ => Err(GpuError::invalid(format!(
                "word width {bytes} is not 1, 2, 4 or 8"
            ))),
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

    /// Mask of the word's bits in a `u64`.
    #[must_use]
    pub const fn mask(self) -> u64 {
        match self {
            Self::W8 => u64::MAX,
            w => (1u64 << (8 * w.bytes())) - 1,
        }
    }
}

/// How a stored value combines with the base word (`combine` in the spec).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ValueOp {
    /// `t = b ^ v`.
    Xor,
    /// `t = b + unzigzag(v)`, wrapping at the word width.
    Sub,
}

/// How the value stream(s) lay out the words.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ValueLayout {
    /// One stream of little-endian words.
    Words,
    /// One stream per byte of the word, least significant plane first.
    BytePlanes,
    /// Byte planes of the word rotated left by 1 bit.
    RotatedBytePlanes,
}

/// How a sparse chunk codes its positions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PositionCoding {
    /// Gaps between successive positions, `width` bytes each (1, 2 or 4),
    /// as `width` byte planes, least significant plane first.
    Gaps {
        /// Bytes per gap: 1, 2 or 4.
        width: u8,
    },
    /// One bit per word, LSB-first within each byte.
    Bitmap,
}

/// The encoding of a chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ChunkKind {
    /// `t = b`; no streams.
    Unchanged,
    /// Only the listed positions change.
    Sparse(PositionCoding),
    /// Every word has a stored value.
    Dense,
    /// The stored values are the target words.
    Raw,
}

/// Everything a kernel needs to know about one chunk besides its bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ChunkSpec {
    /// Encoding of the chunk.
    pub kind: ChunkKind,
    /// Value combine operation (must be [`ValueOp::Xor`] for raw chunks).
    pub op: ValueOp,
    /// Layout of the values.
    pub layout: ValueLayout,
    /// Word width.
    pub width: WordWidth,
    /// Words in the chunk (`n`).
    pub words: u32,
    /// Values stored for a sparse chunk (`m`, the changed count). Ignored for
    /// dense and raw chunks, which store `words` values.
    pub changed: u32,
}

impl ChunkSpec {
    /// Number of values stored in the value streams.
    #[must_use]
    pub fn value_count(&self) -> usize {
        match self.kind {
            ChunkKind::Unchanged => 0,
            ChunkKind::Sparse(_) => self.changed as usize,
            ChunkKind::Dense | ChunkKind::Raw => self.words as usize,
        }
    }

    /// Decoded bytes of all position streams together.
    #[must_use]
    pub fn position_bytes(&self) -> usize {
        match self.kind {
            ChunkKind::Sparse(PositionCoding::Gaps { width }) => {
                usize::from(width) * self.changed as usize
            }
            ChunkKind::Sparse(PositionCoding::Bitmap) => (self.words as usize).div_ceil(8),
            _ => 0,
        }
    }

    /// Decoded bytes of all value streams together.
    #[must_use]
    pub fn value_bytes(&self) -> usize {
        self.value_count() * self.width.bytes()
    }

    /// Decoded length of each stream, in stream order (positions, then values).
    #[must_use]
    pub fn stream_lens(&self) -> Vec<usize> {
        let mut lens = Vec::new();
        match self.kind {
            ChunkKind::Sparse(PositionCoding::Gaps { width }) => {
                lens.extend(std::iter::repeat_n(self.changed as usize, usize::from(width)));
            }
            ChunkKind::Sparse(PositionCoding::Bitmap) => lens.push(self.position_bytes()),
            _ => {}
        }
        if self.kind != ChunkKind::Unchanged {
            match self.layout {
                ValueLayout::Words => lens.push(self.value_bytes()),
                ValueLayout::BytePlanes | ValueLayout::RotatedBytePlanes => {
                    lens.extend(std::iter::repeat_n(self.value_count(), self.width.bytes()));
                }
            }
        }
        lens
    }

    /// Number of position streams (they come first).
    #[must_use]
    pub fn position_stream_count(&self) -> usize {
        match self.kind {
            ChunkKind::Sparse(PositionCoding::Gaps { width }) => usize::from(width),
            ChunkKind::Sparse(PositionCoding::Bitmap) => 1,
            _ => 0,
        }
    }

    /// Checks the combination of fields (`spec/FORMAT.md`, "Chunk record").
    pub fn validate(&self) -> Result<()> {
        if self.words == 0 {
            return Err(GpuError::corrupt("chunk of 0 words"));
        }
        match self.kind {
            ChunkKind::Sparse(PositionCoding::Gaps { width }) if ![1, 2, 4].contains(&width) => {
                return Err(GpuError::corrupt(format!(
                    "gap width {width} is not 1, 2 or 4"
                )));
            }
            ChunkKind::Sparse(_) if self.changed > self.words => {
                return Err(GpuError::corrupt(format!(
                    "changed count {} exceeds chunk words {}",
                    self.changed, self.words
                )));
            }
            ChunkKind::Raw if self.op != ValueOp::Xor => {
                return Err(GpuError::corrupt("raw chunk with value_op other than xor"));
            }
            _ => {}
        }
        Ok(())
    }
}
