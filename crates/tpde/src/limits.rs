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

/// Bytes of memory that rebuilding a target may hold at once for decoding, whatever
/// the input and whatever the thread count (spec §9.1, implementation note).
///
/// Derivation: the largest chunk is [`MAX_CHUNK_WORDS`] words of 8 bytes, 128 MiB.
/// Decoding one chunk needs at most its output (128 MiB), its decoded zstd streams
/// (values, 128 MiB, plus four gap planes of one byte per word, 64 MiB), its
/// expanded positions (four bytes per word, 64 MiB) and its joined values (128 MiB):
/// [`MAX_CHUNK_DECODE_BYTES`], 512 MiB. Chunks are admitted for decoding only while
/// the sum of their worst cases, plus the rebuilt chunks waiting to be written,
/// stays within [`DECODE_IN_FLIGHT_BYTES`], so the largest chunk always fits alone.
/// Idle buffers kept between chunks for reuse (scratch, and outputs already
/// written) are capped by [`DECODE_RETAINED_BYTES`]. The total is this constant.
pub const DECODE_MEMORY_BUDGET: u64 = DECODE_IN_FLIGHT_BYTES + DECODE_RETAINED_BYTES;

/// The worst-case working set of decoding one chunk; see [`DECODE_MEMORY_BUDGET`].
pub const MAX_CHUNK_DECODE_BYTES: u64 = MAX_CHUNK_WORDS * (8 + 8 + 4 + 4 + 8);

/// Of [`DECODE_MEMORY_BUDGET`], the bytes that chunks being decoded or waiting to be
/// written may hold.
pub const DECODE_IN_FLIGHT_BYTES: u64 = 512 << 20;

/// Of [`DECODE_MEMORY_BUDGET`], the bytes of idle buffers kept for reuse.
pub const DECODE_RETAINED_BYTES: u64 = 64 << 20;

const _: () = assert!(MAX_CHUNK_DECODE_BYTES <= DECODE_IN_FLIGHT_BYTES, "the largest chunk must fit the budget");

/// Reserves room for exactly `additional` more elements in `vec`, or fails with
/// `E_OUT_OF_MEMORY` instead of aborting the process.
///
/// # Errors
/// `E_OUT_OF_MEMORY` when the allocator refuses.
pub fn try_reserve<T>(vec: &mut Vec<T>, additional: usize) -> crate::Result<()> {
    vec.try_reserve_exact(additional).map_err(|e| {
        crate::Error::new(
            crate::ErrorCode::OutOfMemory,
            format!("cannot allocate {additional} more elements of {} bytes: {e}", std::mem::size_of::<T>()),
        )
    })
}

/// A zeroed buffer of `len` bytes, allocated fallibly.
///
/// # Errors
/// `E_OUT_OF_MEMORY` when the allocator refuses.
pub fn try_zeroed(len: usize) -> crate::Result<Vec<u8>> {
    let mut buffer = Vec::new();
    try_reserve(&mut buffer, len)?;
    buffer.resize(len, 0);
    Ok(buffer)
}
