//! Hard limits of format 1.0 (spec §9). Every size and count read from a file is
//! checked against these before anything is allocated from it.

/// Largest header JSON, in bytes.
pub const MAX_HEADER_LEN: u64 = 256 << 20;
/// Largest number of tensors in one delta.
pub const MAX_TENSORS: usize = 1 << 20;
/// Largest number of chunks in one delta.
pub const MAX_CHUNKS: u64 = 1 << 28;
/// Largest tensor rank.
pub const MAX_RANK: usize = 32;
/// Largest number of target files (shards).
pub const MAX_FILES: usize = 1 << 16;
/// Largest `chunk_words`.
pub const MAX_CHUNK_WORDS: u64 = 1 << 24;
/// Largest window a zstd stream may ask for: 2^27 bytes (spec §8.5).
pub const MAX_ZSTD_WINDOW_LOG: u32 = 27;
/// Default number of words per chunk.
pub const DEFAULT_CHUNK_WORDS: u64 = 1 << 20;
