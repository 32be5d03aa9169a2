//! The zstd profile of spec §8.5: exactly one frame per stream, its content size
//! present and equal to the declared decoded length, no trailing bytes, and a window
//! of at most 2^27 bytes.

use std::cell::RefCell;

use zstd::bulk::{Compressor, Decompressor};
use zstd::zstd_safe::{self, CParameter, DParameter, Strategy};

use crate::error::{fail, Error, ErrorCode, Result};
use crate::limits::MAX_ZSTD_WINDOW_LOG;

/// How hard zstd searches for matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effort {
    /// A zstd compression level.
    Level(i32),
    /// Mostly entropy coding: the fast strategy with the longest minimum match and
    /// tiny match tables. On byte planes of weights, which have runs but few real
    /// matches, this is both faster and smaller than any level, because spurious
    /// short matches cost more than the literals they replace.
    Literals,
}

thread_local! {
    // Contexts are reused per thread, one per effort in use: creating one costs
    // more than compressing a small stream.
    static COMPRESSORS: RefCell<Vec<(Effort, Compressor<'static>)>> = const { RefCell::new(Vec::new()) };
    static DECOMPRESSOR: RefCell<Option<Decompressor<'static>>> = const { RefCell::new(None) };
}

/// Block size of the literal-only effort.
const LITERAL_BLOCK_SIZE: u32 = 16 << 10;

fn new_compressor(effort: Effort) -> std::io::Result<Compressor<'static>> {
    match effort {
        Effort::Level(level) => Compressor::new(level),
        Effort::Literals => {
            let mut compressor = Compressor::new(1)?;
            for parameter in [
                CParameter::Strategy(Strategy::ZSTD_fast),
                CParameter::MinMatch(7),
                CParameter::HashLog(6),
                CParameter::ChainLog(6),
                CParameter::SearchLog(1),
                CParameter::WindowLog(20),
                // Smaller blocks let the Huffman tables follow the statistics as they
                // change along a plane, as they do from one group of values to the
                // next (spec §8.6). 16 KiB measured best on weight planes.
                CParameter::MaxBlockSize(LITERAL_BLOCK_SIZE),
            ] {
                compressor.set_parameter(parameter)?;
            }
            Ok(compressor)
        }
    }
}

/// Compresses `bytes` into one frame that records its content size.
///
/// # Errors
/// `E_IO` if zstd fails (it does not on valid levels).
pub fn compress(bytes: &[u8], effort: Effort) -> Result<Vec<u8>> {
    let zstd_error = |e: std::io::Error| Error::new(ErrorCode::Io, format!("zstd: {e}"));
    COMPRESSORS.with(|cell| {
        let mut compressors = cell.borrow_mut();
        let at = match compressors.iter().position(|(e, _)| *e == effort) {
            Some(at) => at,
            None => {
                compressors.push((effort, new_compressor(effort).map_err(zstd_error)?));
                compressors.len() - 1
            }
        };
        compressors[at].1.compress(bytes).map_err(zstd_error)
    })
}

/// One block in this many is compressed to predict [`Effort::Literals`]' size.
const SAMPLE_EVERY: usize = 8;

/// The bytes [`Effort::Literals`] is predicted to store `bytes` in, from one block in
/// [`SAMPLE_EVERY`] compressed together; `None` for a stream of fewer than
/// `2 * SAMPLE_EVERY` blocks, which costs little to compress whole. Its blocks are
/// coded with their own Huffman tables and matches found by a table of 64
/// entries, so a block's size depends little on the blocks around it.
///
/// # Errors
/// As [`compress`].
#[allow(clippy::cast_precision_loss, clippy::cast_possible_truncation, clippy::cast_sign_loss)] // an estimate
pub fn predict_literals_len(bytes: &[u8]) -> Result<Option<usize>> {
    let block = LITERAL_BLOCK_SIZE as usize;
    if bytes.len() < 2 * SAMPLE_EVERY * block {
        return Ok(None);
    }
    let mut sample = Vec::with_capacity(bytes.len() / SAMPLE_EVERY + block);
    for sampled in bytes.chunks(block).step_by(SAMPLE_EVERY) {
        sample.extend_from_slice(sampled);
    }
    let compressed = compress(&sample, Effort::Literals)?.len();
    Ok(Some((compressed as f64 * bytes.len() as f64 / sample.len() as f64) as usize))
}

const ZSTD_MAGIC: u32 = 0xFD2F_B528;

/// Checks the frame header fields of RFC 8878 §3.1.1.1 that the profile restricts:
/// a standard frame (not skippable), the unused and reserved descriptor bits clear,
/// no dictionary, and a window of at most 2^[`MAX_ZSTD_WINDOW_LOG`] bytes. Written by hand because zstd exposes its header
/// parser only through an unstable feature, and `WindowLogMax` does not bind the
/// one-shot decoder.
fn check_frame_header(stored: &[u8]) -> Result<()> {
    let magic = stored.get(..4).map(|m| u32::from_le_bytes([m[0], m[1], m[2], m[3]]));
    if magic != Some(ZSTD_MAGIC) {
        return fail(ErrorCode::ZstdProfile, "the stream does not start with a zstd frame");
    }
    let Some(&descriptor) = stored.get(4) else {
        return fail(ErrorCode::ZstdProfile, "the zstd frame header is incomplete");
    };
    // Spec §8.5 step 1: zstd ignores the unused bit 4, so a set bit would give one
    // stream a second accepted byte form; the reserved bit 3 is an error in zstd too.
    if descriptor & 0b1_1000 != 0 {
        return fail(ErrorCode::ZstdProfile, "an unused or reserved bit of the zstd frame header is set");
    }
    if descriptor & 0b11 != 0 {
        return fail(ErrorCode::ZstdProfile, "the zstd frame names a dictionary");
    }
    let single_segment = descriptor & 0b10_0000 != 0;
    if !single_segment {
        // Window_Descriptor: exponent in the high five bits, mantissa in the low three.
        let Some(&window) = stored.get(5) else {
            return fail(ErrorCode::ZstdProfile, "the zstd frame header is incomplete");
        };
        let log = 10 + u32::from(window >> 3);
        if log > MAX_ZSTD_WINDOW_LOG || (log == MAX_ZSTD_WINDOW_LOG && window & 0b111 != 0) {
            return fail(ErrorCode::ZstdProfile, format!("the zstd window exceeds 2^{MAX_ZSTD_WINDOW_LOG} bytes"));
        }
    }
    // A single-segment frame's window is its content size, checked against the
    // declared length next.
    Ok(())
}

/// Decodes one stream that must hold exactly one frame of `decoded_len` bytes,
/// appending to `out`. Nothing is allocated beyond `decoded_len`, which the caller
/// has checked against the format limits.
///
/// # Errors
/// `E_ZSTD_PROFILE` when the frame breaks the profile, `E_STREAM_LENGTH` when its
/// content size differs from `decoded_len`, `E_ZSTD_DECODE` when decoding fails,
/// `E_OUT_OF_MEMORY` when `out` cannot grow by `decoded_len`.
pub fn decompress_into(stored: &[u8], decoded_len: usize, out: &mut Vec<u8>) -> Result<()> {
    check_frame_header(stored)?;
    match zstd_safe::get_frame_content_size(stored) {
        Ok(Some(size)) if size == decoded_len as u64 => {}
        Ok(Some(size)) => {
            return fail(
                ErrorCode::StreamLength,
                format!("the zstd frame holds {size} bytes but {decoded_len} are declared"),
            )
        }
        Ok(None) => return fail(ErrorCode::ZstdProfile, "the zstd frame does not record its content size"),
        Err(_) => return fail(ErrorCode::ZstdProfile, "the stream is not a zstd frame"),
    }
    match zstd_safe::find_frame_compressed_size(stored) {
        Ok(len) if len == stored.len() => {}
        Ok(_) => return fail(ErrorCode::ZstdProfile, "bytes follow the zstd frame"),
        Err(_) => return fail(ErrorCode::ZstdProfile, "the zstd frame is incomplete"),
    }
    DECOMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            let mut decompressor = Decompressor::new().map_err(|e| Error::new(ErrorCode::Io, format!("zstd: {e}")))?;
            decompressor
                .set_parameter(DParameter::WindowLogMax(MAX_ZSTD_WINDOW_LOG))
                .map_err(|e| Error::new(ErrorCode::Io, format!("zstd: {e}")))?;
            *slot = Some(decompressor);
        }
        let decompressor = slot.as_mut().expect("set above");
        let start = out.len();
        crate::limits::try_reserve(out, decoded_len)?;
        // Blocks that decode to more or fewer bytes than the content size, which
        // equals `decoded_len` by now, are a corrupt frame (spec §8.5 step 4): zstd
        // itself reports them as corruption, and the length check below agrees.
        let written = decompressor
            .decompress_to_buffer(stored, out)
            .map_err(|e| Error::new(ErrorCode::ZstdDecode, format!("zstd: {e}")))?;
        if written != decoded_len || out.len() != start + decoded_len {
            return fail(
                ErrorCode::ZstdDecode,
                format!("the zstd frame's blocks decoded to {written} bytes, not its content size {decoded_len}"),
            );
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The prediction follows a stationary stream closely, and is not made for a
    /// short one.
    #[test]
    #[allow(clippy::cast_precision_loss)]
    fn literals_are_predicted_from_a_sample_of_blocks() {
        let mut x = 0x9e37_79b9_7f4a_7c15_u64;
        let skewed: Vec<u8> = (0..1 << 20)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                u8::try_from((x >> 40).trailing_zeros()).expect("at most 24")
            })
            .collect();
        let whole = compress(&skewed, Effort::Literals).unwrap().len() as f64;
        let predicted = predict_literals_len(&skewed).unwrap().expect("long enough to sample") as f64;
        assert!((predicted / whole - 1.0).abs() < 0.05, "predicted {predicted}, whole {whole}");
        let short = 2 * SAMPLE_EVERY * LITERAL_BLOCK_SIZE as usize - 1;
        assert_eq!(predict_literals_len(&skewed[..short]).unwrap(), None);
    }

    #[test]
    fn profile_rules() {
        let frame = compress(b"hello hello hello", Effort::Level(3)).unwrap();
        let mut out = Vec::new();
        decompress_into(&frame, 17, &mut out).unwrap();
        assert_eq!(out, b"hello hello hello");

        let code = |stored: &[u8], len| decompress_into(stored, len, &mut Vec::new()).unwrap_err().code();
        assert_eq!(code(&frame, 16), ErrorCode::StreamLength);
        let mut two = frame.clone();
        two.extend_from_slice(&frame);
        assert_eq!(code(&two, 17), ErrorCode::ZstdProfile);
        let mut trailing = frame.clone();
        trailing.push(0);
        assert_eq!(code(&trailing, 17), ErrorCode::ZstdProfile);
        assert_eq!(code(&frame[..frame.len() - 1], 17), ErrorCode::ZstdProfile);
        assert_eq!(code(b"not zstd", 8), ErrorCode::ZstdProfile);
        // A skippable frame, and a frame that names a dictionary.
        assert_eq!(code(&[0x50, 0x2a, 0x4d, 0x18, 0, 0, 0, 0], 0), ErrorCode::ZstdProfile);
        let mut with_dictionary = frame.clone();
        with_dictionary[4] |= 1;
        assert_eq!(code(&with_dictionary, 17), ErrorCode::ZstdProfile);
        // A window of 2^28 bytes: exponent 18 in the window descriptor.
        let mut wide = frame.clone();
        wide[4] &= !0b10_0000;
        wide.insert(5, 18 << 3);
        assert_eq!(code(&wide, 17), ErrorCode::ZstdProfile);
    }

    /// One raw block of `block` bytes in a single-segment frame that records
    /// `content_size`, with extra descriptor bits `fhd_bits`.
    fn raw_frame(block: &[u8], content_size: u8, fhd_bits: u8) -> Vec<u8> {
        let mut frame = vec![0x28, 0xB5, 0x2F, 0xFD, 0b10_0000 | fhd_bits, content_size];
        let header = (u32::try_from(block.len()).unwrap() << 3) | 1;
        frame.extend_from_slice(&header.to_le_bytes()[..3]);
        frame.extend_from_slice(block);
        frame
    }

    /// Spec §8.5 step 1: the unused descriptor bit gives a second byte form.
    #[test]
    fn unused_descriptor_bit_is_a_profile_error() {
        let mut out = Vec::new();
        decompress_into(&raw_frame(&[7; 16], 16, 0), 16, &mut out).unwrap();
        let err = decompress_into(&raw_frame(&[7; 16], 16, 1 << 4), 16, &mut Vec::new()).unwrap_err();
        assert_eq!(err.code(), ErrorCode::ZstdProfile);
    }

    /// Spec §8.5 step 4: blocks that decode to another length than the content
    /// size are a decoding error, whichever way they differ.
    #[test]
    fn blocks_that_disagree_with_the_content_size_are_a_decode_error() {
        let short = decompress_into(&raw_frame(&[7; 15], 16, 0), 16, &mut Vec::new()).unwrap_err();
        assert_eq!(short.code(), ErrorCode::ZstdDecode);
        let long = decompress_into(&raw_frame(&[7; 17], 16, 0), 16, &mut Vec::new()).unwrap_err();
        assert_eq!(long.code(), ErrorCode::ZstdDecode);
    }
}
