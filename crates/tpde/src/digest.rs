//! Checksums and digests (spec §10).
//!
//! Stored bytes are checked with XXH3-64; reconstructed bytes are proven with a
//! two-level XXH3-128 tree: one leaf per chunk, then one hash over the leaves. The
//! tree lets every chunk be hashed in parallel, on the CPU or the GPU.

use rayon::prelude::*;
use twox_hash::{XxHash3_128, XxHash3_64};

use crate::error::{fail, ErrorCode, Result};

/// A 128-bit digest in canonical (big-endian) byte order.
pub type Digest128 = [u8; 16];

/// XXH3-64 with seed 0: the checksum of stored bytes.
#[must_use]
pub fn checksum64(bytes: &[u8]) -> u64 {
    XxHash3_64::oneshot(bytes)
}

/// XXH3-128 with seed 0, in canonical byte order: the digest of one chunk.
#[must_use]
pub fn leaf_digest(bytes: &[u8]) -> Digest128 {
    XxHash3_128::oneshot(bytes).to_be_bytes()
}

/// The tensor digest over its chunk digests, in chunk order.
#[must_use]
pub fn tree_digest(leaves: &[Digest128]) -> Digest128 {
    XxHash3_128::oneshot(leaves.as_flattened()).to_be_bytes()
}

/// The tensor digest of `bytes` cut into chunks of `chunk_bytes`, hashed in parallel.
///
/// # Errors
/// `E_INVALID_ARGUMENT` when `chunk_bytes` is zero.
pub fn tensor_digest(bytes: &[u8], chunk_bytes: usize) -> Result<Digest128> {
    if chunk_bytes == 0 {
        return fail(ErrorCode::InvalidArgument, "a tensor digest needs chunks of at least one byte");
    }
    let leaves: Vec<Digest128> = bytes.par_chunks(chunk_bytes).map(leaf_digest).collect();
    Ok(tree_digest(&leaves))
}

/// Lower-case hex, as digests appear in the header.
#[must_use]
pub fn to_hex(digest: &Digest128) -> String {
    hex::encode(digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Test vectors of spec §10.3, computed independently of this code.
    #[test]
    fn spec_test_vectors() {
        assert_eq!(checksum64(b""), 0x2d06_8005_38d3_94c2);
        assert_eq!(to_hex(&leaf_digest(b"")), "99aa06d3014798d86001c324468d497f");
        // The digest of an empty tensor hashes zero leaves.
        assert_eq!(tensor_digest(&[], 8).unwrap(), leaf_digest(b""));
        let two_chunks = tensor_digest(b"abcdef", 3).unwrap();
        let expected = tree_digest(&[leaf_digest(b"abc"), leaf_digest(b"def")]);
        assert_eq!(two_chunks, expected);
    }

    /// The digests agree with a second XXH3 implementation at every input size class
    /// (0, 1–3, 4–8, 9–16, 17–128, 129–240 bytes, one block, many blocks) and at
    /// every alignment, where the vector paths could differ.
    #[test]
    fn digests_agree_with_a_second_implementation() {
        let data: Vec<u8> = (0..300_008u64).map(|i| (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8).collect();
        for len in [0, 1, 3, 4, 8, 9, 16, 17, 128, 129, 240, 241, 1024, 1025, 4096, 65_536, 299_999] {
            for start in [0, 1, 7] {
                let bytes = &data[start..start + len];
                assert_eq!(checksum64(bytes), xxhash_rust::xxh3::xxh3_64(bytes), "{len} bytes at {start}");
                assert_eq!(
                    leaf_digest(bytes),
                    xxhash_rust::xxh3::xxh3_128(bytes).to_be_bytes(),
                    "{len} bytes at {start}"
                );
            }
        }
    }

    /// A caller's zero chunk size is an error, not a panic.
    #[test]
    fn a_zero_chunk_size_is_refused() {
        assert_eq!(tensor_digest(b"abc", 0).unwrap_err().code(), ErrorCode::InvalidArgument);
    }
}
