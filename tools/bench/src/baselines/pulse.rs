//! The PULSE method: for each tensor, the positions whose bits changed
//! (gap-encoded, the gap integer narrowed to the smallest of u8/u16/u32 that
//! holds the largest gap) and the new values as raw dtype words; both
//! streams zstd-compressed.
//!
//! Streams: \[0\] a small stored prefix (gap width byte, changed count u64),
//! \[1\] zstd(gaps), \[2\] zstd(values).

use anyhow::{bail, ensure, Result};

use super::{changed_positions, zstd_compress, zstd_decompress, Encoded};
use crate::dtype::word_bytes;

/// Encodes one tensor. `base` is already padded/truncated to `target.len()`.
pub fn encode(base: &[u8], target: &[u8], dtype: &str, level: i32) -> Result<Encoded> {
    let width = word_bytes(dtype);
    let positions = changed_positions(base, target, width);
    let mut max_gap = 0u64;
    let mut prev = None;
    let gaps: Vec<u64> = positions
        .iter()
        .map(|&p| {
            let g = match prev {
                None => p,
                Some(q) => p - q,
            };
            prev = Some(p);
            max_gap = max_gap.max(g);
            g
        })
        .collect();
    let gap_width: usize = if max_gap <= u64::from(u8::MAX) {
        1
    } else if max_gap <= u64::from(u16::MAX) {
        2
    } else if max_gap <= u64::from(u32::MAX) {
        4
    } else {
        bail!("PULSE: gap {max_gap} exceeds u32")
    };
    let mut gap_bytes = Vec::with_capacity(gaps.len() * gap_width);
    for g in &gaps {
        gap_bytes.extend_from_slice(&g.to_le_bytes()[..gap_width]);
    }
    let mut values = Vec::with_capacity(positions.len() * width);
    for &p in &positions {
        let at = usize::try_from(p)? * width;
        values.extend_from_slice(&target[at..at + width]);
    }
    let mut prefix = vec![u8::try_from(gap_width)?];
    prefix.extend_from_slice(&(positions.len() as u64).to_le_bytes());
    let gaps_z = zstd_compress(&gap_bytes, level)?;
    let values_z = zstd_compress(&values, level)?;
    Ok(Encoded {
        changed_words: positions.len(),
        position_bytes: gaps_z.len() + prefix.len(),
        value_bytes: values_z.len(),
        streams: vec![prefix, gaps_z, values_z],
    })
}

/// Decodes one tensor of `target_len` bytes against the padded `base`.
pub fn decode(base: &[u8], streams: &[&[u8]], dtype: &str, target_len: usize) -> Result<Vec<u8>> {
    ensure!(streams.len() == 3, "PULSE: expected 3 streams");
    let width = word_bytes(dtype);
    let prefix = streams[0];
    ensure!(prefix.len() == 9, "PULSE: bad prefix");
    let gap_width = usize::from(prefix[0]);
    ensure!(matches!(gap_width, 1 | 2 | 4), "PULSE: bad gap width");
    let count = usize::try_from(u64::from_le_bytes(prefix[1..9].try_into()?))?;
    let gaps = zstd_decompress(streams[1], count * gap_width)?;
    let values = zstd_decompress(streams[2], count * width)?;
    let mut out = base[..target_len].to_vec();
    let words = target_len / width;
    let mut pos: Option<usize> = None;
    for (g, v) in gaps.chunks_exact(gap_width).zip(values.chunks_exact(width)) {
        let mut a = [0u8; 8];
        a[..gap_width].copy_from_slice(g);
        let g = usize::try_from(u64::from_le_bytes(a))?;
        let p = match pos {
            None => g,
            Some(q) => {
                ensure!(g >= 1, "PULSE: zero gap");
                q + g
            }
        };
        ensure!(p < words, "PULSE: position {p} out of range");
        out[p * width..(p + 1) * width].copy_from_slice(v);
        pos = Some(p);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn round_trip(dtype: &str, words: usize, p: f64) -> Encoded {
        let w = word_bytes(dtype);
        let mut rng = ChaCha8Rng::seed_from_u64(words as u64 + 17);
        let base: Vec<u8> = (0..words * w).map(|_| rng.gen()).collect();
        let mut target = base.clone();
        for i in 0..words {
            if rng.gen_bool(p) {
                // Flip the lowest bit so the word certainly changes.
                target[i * w] ^= 1;
            }
        }
        let enc = encode(&base, &target, dtype, 3).expect("encode");
        let streams: Vec<&[u8]> = enc.streams.iter().map(Vec::as_slice).collect();
        let dec = decode(&base, &streams, dtype, target.len()).expect("decode");
        assert_eq!(dec, target, "{dtype} p={p}");
        enc
    }

    #[test]
    fn round_trips() {
        for dtype in ["BF16", "F32", "F8_E4M3"] {
            for p in [0.0, 0.001, 0.3, 1.0] {
                round_trip(dtype, 5000, p);
            }
        }
    }

    #[test]
    fn gap_width_narrows() {
        // Dense changes: every gap is 1, so u8 gaps.
        assert_eq!(round_trip("BF16", 1000, 1.0).streams[0][0], 1);
        // One change far in: the first gap is the position itself.
        let base = vec![0u8; 2 * 70_000];
        let mut target = base.clone();
        target[2 * 69_999] = 1;
        let enc = encode(&base, &target, "BF16", 3).expect("encode");
        assert_eq!(enc.streams[0][0], 4);
        assert_eq!(enc.changed_words, 1);
    }

    #[test]
    fn rejects_out_of_range_position() {
        let base = vec![0u8; 8];
        let mut target = base.clone();
        target[6] = 1;
        let enc = encode(&base, &target, "BF16", 3).expect("encode");
        let streams: Vec<&[u8]> = enc.streams.iter().map(Vec::as_slice).collect();
        // Claim the tensor is shorter than the encoded position.
        assert!(decode(&base, &streams, "BF16", 4).is_err());
    }
}
