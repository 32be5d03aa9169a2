//! CPU reference of every kernel (runs in CI, no GPU needed).
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_precision_loss,
    clippy::cast_sign_loss
)]

use proptest::prelude::*;
use tpde_cuda::error::flag;
use tpde_cuda::reference::*;
use tpde_cuda::{ChunkKind, ChunkSpec, GpuError, PositionCoding, ValueLayout, ValueOp, WordWidth};

fn lcg(seed: u64) -> impl FnMut() -> u64 {
    let mut s = seed;
    move || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        s >> 11
    }
}

#[test]
fn zigzag_round_trips_at_every_width() {
    for w in WordWidth::ALL {
        let mut r = lcg(1);
        for _ in 0..1000 {
            let (b, t) = (r() & w.mask(), r() & w.mask());
            let v = difference(b, t, ValueOp::Sub, w);
            assert_eq!(combine(b, v, ValueOp::Sub, w), t);
            assert_eq!(unzigzag(zigzag(t, w), w), t);
            assert_eq!(
                combine(b, difference(b, t, ValueOp::Xor, w), ValueOp::Xor, w),
                t
            );
        }
    }
    // small differences give small values: -1 -> 1, 1 -> 2
    assert_eq!(zigzag(u64::from(u16::MAX), WordWidth::W2), 1);
    assert_eq!(zigzag(1, WordWidth::W2), 2);
}

#[test]
fn planes_round_trip_and_rotate() {
    let words: Vec<u8> = (0u8..64).collect();
    for w in WordWidth::ALL {
        for rot in [false, true] {
            assert_eq!(join_planes(&split_planes(&words, w, rot), w, rot), words);
        }
    }
    // 0x8000_0001 rotated left by one is 0x0000_0003: planes [03],[00],[00],[00]
    let planes = split_planes(&0x8000_0001u32.to_le_bytes(), WordWidth::W4, true);
    assert_eq!(planes, vec![3, 0, 0, 0]);
}

#[test]
fn gaps_give_positions_and_reject_zero_gaps_and_overflow() {
    let pos = vec![0u32, 5, 300, 70_000];
    let planes = positions_to_gaps(&pos, 4);
    assert_eq!(gaps_to_positions(&planes, 4, 4, 70_001).unwrap(), pos);
    assert!(
        matches!(gaps_to_positions(&planes, 4, 4, 70_000), Err(GpuError::DeviceFlag(f)) if f == flag::POSITION_RANGE)
    );
    assert_eq!(gap_width_for(&pos), 4);
    assert_eq!(gap_width_for(&[3, 300]), 2);
    assert_eq!(gap_width_for(&[3, 255]), 1);
    // a first gap of 0 is position 0; a later gap of 0 repeats a position
    assert_eq!(gaps_to_positions(&[0, 1], 1, 2, 4).unwrap(), vec![0, 1]);
    assert!(
        matches!(gaps_to_positions(&[1, 0], 1, 2, 4), Err(GpuError::DeviceFlag(f)) if f == flag::ZERO_GAP)
    );
}

#[test]
fn bitmap_checks_padding_and_count() {
    let pos = vec![1u32, 7, 8, 9];
    let bm = positions_to_bitmap(&pos, 10);
    assert_eq!(bitmap_to_positions(&bm, 10, 4).unwrap(), pos);
    assert!(
        matches!(bitmap_to_positions(&bm, 10, 3), Err(GpuError::DeviceFlag(f)) if f == flag::COUNT_MISMATCH)
    );
    let mut bad = bm.clone();
    bad[1] |= 0x80;
    assert!(
        matches!(bitmap_to_positions(&bad, 10, 4), Err(GpuError::DeviceFlag(f)) if f & flag::BITMAP_PADDING != 0)
    );
}

#[test]
fn stream_lengths_follow_the_format_order() {
    let spec = ChunkSpec {
        kind: ChunkKind::Sparse(PositionCoding::Gaps { width: 2 }),
        op: ValueOp::Xor,
        layout: ValueLayout::BytePlanes,
        width: WordWidth::W4,
        words: 100,
        changed: 7,
    };
    assert_eq!(spec.stream_lens(), vec![7, 7, 7, 7, 7, 7]);
    let raw_sub = ChunkSpec {
        kind: ChunkKind::Raw,
        op: ValueOp::Sub,
        ..spec
    };
    assert!(raw_sub.validate().is_err());
}

const CHOICES: [EncodeChoice; 4] = [
    EncodeChoice::SparseGaps,
    EncodeChoice::SparseBitmap,
    EncodeChoice::Dense,
    EncodeChoice::Raw,
];
const LAYOUTS: [ValueLayout; 3] = [
    ValueLayout::Words,
    ValueLayout::BytePlanes,
    ValueLayout::RotatedBytePlanes,
];

#[test]
fn every_encoding_round_trips_at_every_width() {
    let mut r = lcg(7);
    for w in WordWidth::ALL {
        let n = 1000;
        let base: Vec<u8> = (0..n * w.bytes()).map(|_| r() as u8).collect();
        let mut target = base.clone();
        for i in (0..n).step_by(3) {
            write_word(&mut target, w, i, r() & w.mask());
        }
        for choice in CHOICES {
            for op in [ValueOp::Xor, ValueOp::Sub] {
                for layout in LAYOUTS {
                    let c = encode_chunk(&base, &target, w, choice, op, layout).unwrap();
                    let mut out = vec![0; base.len()];
                    apply_chunk(&c.spec, &c.positions(), &c.values(), &base, &mut out).unwrap();
                    assert_eq!(out, target, "{w:?} {choice:?} {op:?} {layout:?}");
                }
            }
        }
    }
}

proptest! {
    #[test]
    fn sparse_round_trip(seed in any::<u64>(), n in 1usize..3000, every in 1usize..50, wi in 0usize..4) {
        let w = WordWidth::ALL[wi];
        let mut r = lcg(seed);
        let base: Vec<u8> = (0..n * w.bytes()).map(|_| r() as u8).collect();
        let mut target = base.clone();
        for i in (0..n).step_by(every) {
            write_word(&mut target, w, i, r() & w.mask());
        }
        for choice in CHOICES {
            let c = encode_chunk(&base, &target, w, choice, ValueOp::Sub, ValueLayout::RotatedBytePlanes).unwrap();
            let mut buf = base.clone();
            apply_chunk_in_place(&c.spec, &c.positions(), &c.values(), &mut buf).unwrap();
            prop_assert_eq!(&buf, &target);
        }
    }
}
