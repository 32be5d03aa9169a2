//! The BitX method (ZipLLM): XOR the base and target words, then split each
//! XOR word into an exponent stream and a sign+mantissa stream and compress
//! each with zstd. Unchanged exponents XOR to zero, so the exponent stream
//! collapses; the sign+mantissa stream carries the real entropy.
//!
//! ZipLLM defines it for BF16 (exponent = bits 14..7, sign+mantissa = bit 15
//! and bits 6..0, one byte each). Other float dtypes use the same split at
//! their own field widths. Byte-wide dtypes and integers have nothing to
//! split and are one XOR stream.

use anyhow::{ensure, Result};

use super::{words_for, zstd_compress, zstd_decompress, Encoded};
use crate::dtype::{float_layout, word_bytes, FloatLayout};

/// Encodes one tensor. `base` is already padded/truncated to `target.len()`.
pub fn encode(base: &[u8], target: &[u8], dtype: &str, level: i32) -> Result<Encoded> {
    let width = word_bytes(dtype);
    let changed = words_for(base, target, width).filter(|(b, t)| b != t).count();
    let streams = match split_layout(dtype) {
        Some(layout) => {
            let (exp, sm) = match width {
                2 => split::<2>(base, target, layout),
                4 => split::<4>(base, target, layout),
                _ => split::<8>(base, target, layout),
            };
            vec![zstd_compress(&exp, level)?, zstd_compress(&sm, level)?]
        }
        None => {
            let xor: Vec<u8> = base.iter().zip(target).map(|(b, t)| b ^ t).collect();
            vec![zstd_compress(&xor, level)?]
        }
    };
    Ok(Encoded { value_bytes: streams.iter().map(Vec::len).sum(), streams, changed_words: changed, position_bytes: 0 })
}

/// Decodes one tensor of `target_len` bytes against the padded `base`.
pub fn decode(base: &[u8], streams: &[&[u8]], dtype: &str, target_len: usize) -> Result<Vec<u8>> {
    let width = word_bytes(dtype);
    let words = target_len / width;
    match split_layout(dtype) {
        Some(layout) => {
            ensure!(streams.len() == 2, "BitX: expected 2 streams");
            let (eb, sb) = field_bytes(layout);
            let exp = zstd_decompress(streams[0], words * eb)?;
            let sm = zstd_decompress(streams[1], words * sb)?;
            Ok(match width {
                2 => join::<2>(base, &exp, &sm, layout),
                4 => join::<4>(base, &exp, &sm, layout),
                _ => join::<8>(base, &exp, &sm, layout),
            })
        }
        None => {
            ensure!(streams.len() == 1, "BitX: expected 1 stream");
            let xor = zstd_decompress(streams[0], target_len)?;
            Ok(base.iter().zip(&xor).map(|(b, x)| b ^ x).collect())
        }
    }
}

/// The float layout to split by, or `None` when there is nothing to split.
fn split_layout(dtype: &str) -> Option<FloatLayout> {
    float_layout(dtype).filter(|_| word_bytes(dtype) > 1)
}

/// Bytes per element in the exponent and sign+mantissa streams.
fn field_bytes(l: FloatLayout) -> (usize, usize) {
    let eb = l.exp_bits.div_ceil(8);
    let sb = (l.mant_bits + 1).div_ceil(8);
    (eb as usize, sb as usize)
}

fn split<const W: usize>(base: &[u8], target: &[u8], l: FloatLayout) -> (Vec<u8>, Vec<u8>) {
    let (eb, sb) = field_bytes(l);
    let words = target.len() / W;
    let mut exp = Vec::with_capacity(words * eb);
    let mut sm = Vec::with_capacity(words * sb);
    let exp_mask = (1u64 << l.exp_bits) - 1;
    let mant_mask = (1u64 << l.mant_bits) - 1;
    let sign_shift = sign_shift::<W>();
    for (b, t) in base.chunks_exact(W).zip(target.chunks_exact(W)) {
        let x = load::<W>(b) ^ load::<W>(t);
        let e = (x >> l.mant_bits) & exp_mask;
        let s = ((x >> sign_shift) << l.mant_bits) | (x & mant_mask);
        exp.extend_from_slice(&e.to_le_bytes()[..eb]);
        sm.extend_from_slice(&s.to_le_bytes()[..sb]);
    }
    (exp, sm)
}

fn join<const W: usize>(base: &[u8], exp: &[u8], sm: &[u8], l: FloatLayout) -> Vec<u8> {
    let (eb, sb) = field_bytes(l);
    let mant_mask = (1u64 << l.mant_bits) - 1;
    let sign_shift = sign_shift::<W>();
    let mut out = Vec::with_capacity(base.len());
    for ((b, e), s) in base.chunks_exact(W).zip(exp.chunks_exact(eb)).zip(sm.chunks_exact(sb)) {
        let e = load_n(e);
        let s = load_n(s);
        let x = ((s >> l.mant_bits) << sign_shift) | (e << l.mant_bits) | (s & mant_mask);
        out.extend_from_slice(&(load::<W>(b) ^ x).to_le_bytes()[..W]);
    }
    out
}

/// Bit position of the sign in a W-byte word.
fn sign_shift<const W: usize>() -> u32 {
    // W is 2, 4 or 8, so this never falls back.
    u32::try_from(W * 8 - 1).unwrap_or(63)
}

fn load<const W: usize>(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a[..W].copy_from_slice(&b[..W]);
    u64::from_le_bytes(a)
}

fn load_n(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a[..b.len()].copy_from_slice(b);
    u64::from_le_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn round_trip(dtype: &str, len: usize, flip_prob: f64) {
        let mut rng = ChaCha8Rng::seed_from_u64(len as u64);
        let base: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
        let target: Vec<u8> = base.iter().map(|&b| if rng.gen_bool(flip_prob) { rng.gen() } else { b }).collect();
        let enc = encode(&base, &target, dtype, 3).expect("encode");
        let streams: Vec<&[u8]> = enc.streams.iter().map(Vec::as_slice).collect();
        let dec = decode(&base, &streams, dtype, target.len()).expect("decode");
        assert_eq!(dec, target, "{dtype}");
    }

    #[test]
    fn round_trips_all_widths() {
        for dtype in ["BF16", "F16", "F32", "F64", "F8_E4M3", "I32", "U8"] {
            round_trip(dtype, 4096, 0.1);
            round_trip(dtype, 4096, 1.0);
            round_trip(dtype, 0, 0.5);
        }
    }

    #[test]
    fn bf16_split_matches_zipllm() {
        // Sign 1, exponent 0x5A, mantissa 0x33 in the XOR word.
        let x: u16 = 0x8000 | (0x5A << 7) | 0x33;
        let base = [0u8, 0];
        let target = x.to_le_bytes();
        let l = float_layout("BF16").expect("bf16");
        let (exp, sm) = split::<2>(&base, &target, l);
        assert_eq!(exp, vec![0x5A]);
        assert_eq!(sm, vec![0x80 | 0x33]);
    }

    #[test]
    fn identical_tensor_compresses_to_almost_nothing() {
        let data = vec![0x3Fu8; 1 << 16];
        let enc = encode(&data, &data, "BF16", 3).expect("encode");
        assert_eq!(enc.changed_words, 0);
        assert!(enc.value_bytes < 200, "{}", enc.value_bytes);
    }
}
