//! CPU reference of the kernels against the format library (runs in CI, no
//! GPU needed).
#![allow(clippy::cast_possible_truncation)]

mod common;

use common::*;
use proptest::prelude::*;
use tpde::{
    format::{Codec, EncodedChunk, PositionCoding, StreamRecord, ValueLayout, ValueOp, ValueOrder},
    EncodeSettings,
};
use tpde_cuda::{
    reference::{apply_chunk_in_place, chunk_positions, combine, decode_streams, flag, group_key, grouped_slots},
    ChunkRef, GpuError, WordWidth,
};

fn chunk_ref(c: &EncodedChunk, words: usize) -> ChunkRef<'_> {
    ChunkRef { record: c.record, streams: &c.streams, stored: &c.data, words: words as u32, resolved_positions: None }
}

/// The reference rebuild of a chunk must equal the library's decoder.
fn check(c: &EncodedChunk, base: &[u8], target: &[u8], w: WordWidth, ctx: &str) {
    let words = target.len() / w.bytes();
    assert!(library_decode(c, base, words, w) == target, "library {ctx}");
    let mut buf = base.to_vec();
    apply_chunk_in_place(&chunk_ref(c, words), w, &mut buf).unwrap();
    assert!(buf == target, "reference {ctx}");
}

#[test]
fn combine_inverts_the_stored_value_at_every_width() {
    for w in WordWidth::ALL {
        let mut r = lcg(1);
        for _ in 0..1000 {
            let (b, t) = (r() & w.mask(), r() & w.mask());
            for op in OPS {
                assert_eq!(combine(b, express(b, t, op, w), op, w), t);
            }
        }
    }
}

#[test]
fn every_encoding_op_and_layout_matches_the_library_at_every_width() {
    for w in WordWidth::ALL {
        let (base, target) = pair(w, 1000, 3, 7);
        for choice in CHOICES {
            for op in OPS {
                for layout in LAYOUTS {
                    for (level, grouped) in [None, Some(1)].into_iter().zip(GROUPED).chain([(None, true)]) {
                        let c = forced_chunk_in(&base, &target, w, choice, op, layout, level, grouped);
                        let ctx = format!("{w:?} {choice:?} {op:?} {layout:?} grouped {grouped}");
                        check(&c, &base, &target, w, &ctx);
                    }
                }
            }
        }
    }
}

/// Chunks whose streams are lane rANS (codec 2, and codec 4 with packed
/// tables) with every context the spec allows where they are (the plane
/// above, the base key at the positions or at every word), or lane rANS next
/// to zstd and stored streams: the library's decoder and the reference
/// (which decodes the streams in the order their contexts need) rebuild the
/// target.
#[test]
fn lane_rans_chunks_match_the_library_at_every_width() {
    let codecs: Vec<Codecs> = TABLE_FORMS.into_iter().flat_map(rans_codecs).collect();
    for w in WordWidth::ALL {
        // gaps of 300: two gap planes
        let (base, target) = pair(w, 30_000, 300, 7);
        let (dense_base, dense_target) = pair(w, 3000, 2, 8);
        for choice in CHOICES {
            for layout in LAYOUTS {
                for grouped in GROUPED {
                    for &codec in &codecs {
                        let rans = match codec {
                            Codecs::Rans(_, form) | Codecs::Mixed(form) => form.codec(),
                            Codecs::Zstd(_) => unreachable!(),
                        };
                        for (b, t) in [(&base, &target), (&dense_base, &dense_target)] {
                            let c = forced_chunk_coded(b, t, w, choice, ValueOp::Sub, layout, grouped, codec);
                            assert!(c.streams.iter().any(|s| s.codec == rans) || c.streams.is_empty());
                            let ctx = format!("{w:?} {choice:?} {layout:?} grouped {grouped} {codec:?}");
                            check(&c, b, t, w, &ctx);
                        }
                    }
                }
            }
        }
    }
}

/// Chunks of the library's own writer, in whichever value order it predicts
/// (§8.6), and chunks forced into grouped order; sparse and dense, with a base
/// shorter than the target (missing words read as zero, keys included).
#[test]
fn chunks_written_by_the_library_match_including_a_shorter_base() {
    for (i, w) in WordWidth::ALL.into_iter().enumerate() {
        for every in [1, 4, 40, 5000] {
            let (base, target) = pair(w, 20_000, every, 30 + i as u64);
            for leading_sign in [true, false] {
                for min_zstd_gain in [0.0, 0.5] {
                    let s = EncodeSettings { min_zstd_gain, ..EncodeSettings::default() };
                    let c = tpde::format::encode_chunk(&target, Some(&base), w, leading_sign, s).unwrap();
                    check(&c, &base, &target, w, &format!("{w:?} every {every} sign {leading_sign}"));
                    // vocab growth: the base's missing words read as zero
                    let short = &base[..base.len() / 3 / w.bytes() * w.bytes()];
                    let mut padded = short.to_vec();
                    padded.resize(base.len(), 0);
                    let c = tpde::format::encode_chunk(&target, Some(short), w, leading_sign, s).unwrap();
                    check(&c, &padded, &target, w, &format!("{w:?} short base sign {leading_sign}"));
                }
            }
        }
    }
    // Grouped sparse and dense chunks at every width, whatever the writer predicts.
    for (i, w) in WordWidth::ALL.into_iter().enumerate() {
        let (base, target) = pair(w, 20_000, 3, 70 + i as u64);
        for choice in [Choice::SparseGaps, Choice::Dense] {
            let c = forced_chunk_in(&base, &target, w, choice, ValueOp::Sub, ValueLayout::BytePlanes, Some(1), true);
            assert_eq!(c.record.value_order, ValueOrder::GroupedByBase);
            check(&c, &base, &target, w, &format!("{w:?} forced grouped {choice:?}"));
        }
    }
}

/// The slots of grouped order are the stable counting sort of the spec.
#[test]
fn grouped_slots_are_a_stable_counting_sort() {
    let keys = [3u8, 1, 3, 0, 1, 3, 255, 0];
    // start: key 0 -> 0, 1 -> 2, 3 -> 4, 255 -> 7
    assert_eq!(grouped_slots(&keys), vec![4, 2, 5, 0, 3, 6, 7, 1]);
    assert_eq!(group_key(0x8000_0000, WordWidth::W4), 0); // the sign rotates out
    assert_eq!(group_key(0x3F80_0000, WordWidth::W4), 0x7F); // 1.0f32: its exponent
    assert_eq!(group_key(0x3F80, WordWidth::W2), 0x7F); // 1.0 bf16
    assert_eq!(group_key(0x3FF0_0000_0000_0000, WordWidth::W8), 0x7F);
    assert_eq!(group_key(0x81, WordWidth::W1), 0x03);
}

fn bad_sparse(coding: PositionCoding, gap_width: u8, planes: &[&[u8]], m: u32, n: u32) -> GpuError {
    let mut streams: Vec<StreamRecord> = planes
        .iter()
        .map(|p| StreamRecord { stored_len: p.len() as u32, decoded_len: p.len() as u32, codec: Codec::Stored })
        .collect();
    let values = vec![1u8; m as usize];
    streams.push(StreamRecord { stored_len: m, decoded_len: m, codec: Codec::Stored });
    let mut data: Vec<u8> = planes.concat();
    data.extend_from_slice(&values);
    let record = sparse_record(m, coding, gap_width, &streams);
    let c = ChunkRef { record, streams: &streams, stored: &data, words: n, resolved_positions: None };
    c.validate(WordWidth::W1).unwrap();
    chunk_positions(&c, &decode_streams(&c).unwrap()).expect_err("bad positions")
}

#[test]
fn bad_positions_map_to_the_device_flag_bits() {
    let is = |e: GpuError, bit: u32| matches!(e, GpuError::DeviceFlag(f) if f & bit != 0);
    // position 10 in a chunk of 10 words; a zero gap after the first
    assert!(is(bad_sparse(PositionCoding::Gaps, 1, &[&[3, 7]], 2, 10), flag::POSITION_RANGE));
    assert!(is(bad_sparse(PositionCoding::Gaps, 1, &[&[3, 0]], 2, 10), flag::ZERO_GAP));
    // a huge 4-byte gap that would wrap a 32-bit sum
    let e = bad_sparse(PositionCoding::Gaps, 4, &[&[1, 0xff], &[0, 0xff], &[0, 0xff], &[0, 0xff]], 2, 10);
    assert!(is(e, flag::POSITION_RANGE));
    // bitmap padding bit, and a count mismatch
    assert!(is(bad_sparse(PositionCoding::Bitmap, 0, &[&[1, 0x80]], 1, 10), flag::BITMAP_PADDING));
    assert!(is(bad_sparse(PositionCoding::Bitmap, 0, &[&[0b101, 0]], 1, 10), flag::COUNT_MISMATCH));
}

#[test]
fn a_zstd_stream_with_a_trailing_frame_is_rejected() {
    let z = tpde::format::zstd::compress(&[7u8; 64], tpde::format::zstd::Effort::Level(1)).unwrap();
    let two = [z.clone(), z].concat();
    let r = StreamRecord { stored_len: two.len() as u32, decoded_len: 64, codec: Codec::Zstd };
    let e = tpde_cuda::decode_stream(&r, &two, &mut [0u8; 64]).expect_err("two frames");
    assert_eq!(e.format_code(), Some(tpde::ErrorCode::ZstdProfile), "{e}");
}

/// The GPU path decodes zstd streams with the library's decoder, so it
/// enforces the whole profile of spec §8.5: a frame without its content
/// size, or with a window above 2^27 bytes, is refused as the CLI refuses it
/// (both were accepted by a decoder of the crate's own).
#[test]
fn zstd_streams_outside_the_profile_get_the_library_codes() {
    let plain = [7u8; 64];
    let decode = |stored: &[u8]| {
        let r = StreamRecord { stored_len: stored.len() as u32, decoded_len: 64, codec: Codec::Zstd };
        tpde_cuda::decode_stream(&r, stored, &mut [0u8; 64]).map_err(|e| e.format_code())
    };
    let mut c = zstd::bulk::Compressor::new(3).unwrap();
    c.include_contentsize(false).unwrap();
    let no_size = c.compress(&plain).unwrap();
    assert_eq!(decode(&no_size), Err(Some(tpde::ErrorCode::ZstdProfile)));

    let frame = tpde::format::zstd::compress(&plain, tpde::format::zstd::Effort::Level(3)).unwrap();
    assert_eq!(decode(&frame), Ok(()));
    // the same frame with a window descriptor of 2^28 bytes (exponent 18)
    let mut wide = frame.clone();
    wide[4] &= !0b10_0000;
    wide.insert(5, 18 << 3);
    assert_eq!(decode(&wide), Err(Some(tpde::ErrorCode::ZstdProfile)));
    // a content size that differs from the declared length
    let short = tpde::format::zstd::compress(&plain[..63], tpde::format::zstd::Effort::Level(3)).unwrap();
    assert_eq!(decode(&short), Err(Some(tpde::ErrorCode::StreamLength)));
}

proptest! {
    #[test]
    fn forced_chunks_match_the_library(seed in any::<u64>(), n in 1usize..3000, every in 1usize..50, wi in 0usize..4) {
        let w = WordWidth::ALL[wi];
        let (base, target) = pair(w, n, every, seed);
        for (choice, grouped) in CHOICES.into_iter().flat_map(|c| GROUPED.map(|g| (c, g))) {
            let c = forced_chunk_in(&base, &target, w, choice, ValueOp::Sub, ValueLayout::RotatedBytePlanes, None, grouped);
            let mut buf = base.clone();
            apply_chunk_in_place(&chunk_ref(&c, n), w, &mut buf).unwrap();
            prop_assert!(buf == target);
            prop_assert!(library_decode(&c, &base, n, w) == target);
        }
    }
}
