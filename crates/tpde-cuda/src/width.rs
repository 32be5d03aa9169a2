//! The word width, which picks the apply kernel (`apply_w1` … `apply_w8`).
//!
//! Everything else about a chunk is the format library's own record
//! ([`tpde::container::chunk_map::ChunkRecord`]).

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
            _ => Err(GpuError::invalid(format!("word width {bytes} is not 1, 2, 4 or 8"))),
        }
    }

    /// The width in bytes, as a `u32`.
    #[must_use]
    pub const fn bytes_u32(self) -> u32 {
        self.bits() / 8
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
