//! HF TRL-style raw sparse update: an i32 index and the new value for every
//! changed element, with no entropy coding. One stored stream per tensor.

use anyhow::{ensure, Result};

use super::{changed_positions, Encoded};
use crate::dtype::word_bytes;

/// Encodes one tensor. `base` is already padded/truncated to `target.len()`.
pub fn encode(base: &[u8], target: &[u8], dtype: &str) -> Result<Encoded> {
    let width = word_bytes(dtype);
    let positions = changed_positions(base, target, width);
    let mut out = Vec::with_capacity(positions.len() * (4 + width));
    for &p in &positions {
        out.extend_from_slice(&i32::try_from(p)?.to_le_bytes());
    }
    for &p in &positions {
        let at = usize::try_from(p)? * width;
        out.extend_from_slice(&target[at..at + width]);
    }
    Ok(Encoded {
        changed_words: positions.len(),
        position_bytes: positions.len() * 4,
        value_bytes: positions.len() * width,
        streams: vec![out],
    })
}

/// Decodes one tensor of `target_len` bytes against the padded `base`.
pub fn decode(base: &[u8], streams: &[&[u8]], dtype: &str, target_len: usize) -> Result<Vec<u8>> {
    ensure!(streams.len() == 1, "TRL: expected 1 stream");
    let width = word_bytes(dtype);
    let data = streams[0];
    ensure!(data.len().is_multiple_of(4 + width), "TRL: ragged stream");
    let count = data.len() / (4 + width);
    let (idx, values) = data.split_at(count * 4);
    let mut out = base[..target_len].to_vec();
    for (i, v) in idx.chunks_exact(4).zip(values.chunks_exact(width)) {
        let p = usize::try_from(i32::from_le_bytes(i.try_into()?))?;
        ensure!((p + 1) * width <= target_len, "TRL: index {p} out of range");
        out[p * width..(p + 1) * width].copy_from_slice(v);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_size() {
        let base: Vec<u8> = (0..200u8).collect();
        let mut target = base.clone();
        target[10] ^= 0xFF;
        target[101] ^= 0x01;
        let enc = encode(&base, &target, "BF16").expect("encode");
        assert_eq!(enc.changed_words, 2);
        // 2 × (i32 index + bf16 value)
        assert_eq!(enc.streams[0].len(), 12);
        let streams: Vec<&[u8]> = enc.streams.iter().map(Vec::as_slice).collect();
        assert_eq!(decode(&base, &streams, "BF16", 200).expect("decode"), target);
    }
}
