//! Position coding 3 (spec §8.3): positions split by the positions of a reference
//! delta. Every chunk that uses it rebuilds bit-exact, through the codec and
//! through whole files chained by their reference pins.

use std::path::Path;
use std::sync::Arc;

use proptest::prelude::*;
use tpde::format::positions::{decode_split, encode_gaps, gap_width, split_by_reference};
use tpde::format::{PositionCoding, FEATURE_CONSTANT_STREAMS, FEATURE_PACKED_RANS, FEATURE_TEMPORAL_POSITIONS};
use tpde::{
    encode_sources, encode_sources_against, DeltaFile, Dtype, EncodeOptions, ErrorCode, MemoryTensor, NoProgress,
};
use tpde::{TensorMap, TensorSource};

/// A strictly increasing subset of `[0, n)` from one bit per word.
fn subset(n: usize) -> impl Strategy<Value = Vec<u32>> {
    proptest::collection::vec(any::<bool>(), n)
        .prop_map(|bits| bits.iter().enumerate().filter(|(_, &b)| b).map(|(i, _)| u32::try_from(i).unwrap()).collect())
}

proptest! {
    #[test]
    fn split_positions_round_trip((n, reference, positions) in (1usize..600).prop_flat_map(|n| (Just(n), subset(n), subset(n)))) {
        prop_assume!(!positions.is_empty());
        let (bitmap, ranks) = split_by_reference(&positions, &reference);
        let width = gap_width(&ranks);
        let planes = encode_gaps(&ranks, width);
        let refs: Vec<&[u8]> = planes.iter().map(Vec::as_slice).collect();
        let mut out = Vec::new();
        decode_split(&bitmap, &refs, positions.len(), n, &reference, &mut out).unwrap();
        prop_assert_eq!(out, positions);
    }

}

proptest! {
    // Each case encodes three files: fewer cases than the codec test.
    #![proptest_config(ProptestConfig::with_cases(16))]

    #[test]
    fn chunks_coded_against_a_reference_rebuild_bit_exact(
        seed in any::<u64>(),
        words in 64usize..3000,
        chunk_words in prop_oneof![Just(64u64), Just(256), Just(1u64 << 20)],
        density in 0.005f64..0.3,
        keep in 0.0f64..1.0,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let steps = series(seed, words, density, keep, 4);
        let options = EncodeOptions { chunk_words, ..EncodeOptions::default() };
        let mut previous: Option<Arc<DeltaFile>> = None;
        for (i, pair) in steps.windows(2).enumerate() {
            let path = dir.path().join(format!("{i}.tpde"));
            encode_sources_against(Some(&pair[0]), &pair[1], &path, options, false, previous.as_deref(), &NoProgress)
                .unwrap();
            let mut delta = DeltaFile::open(&path).unwrap();
            if let Some(reference) = &previous {
                delta = delta.with_position_reference(Arc::clone(reference)).unwrap();
            }
            for (tensor, base) in delta.header().tensors.iter().zip(tensors_of(&pair[0])) {
                let rebuilt = delta.decode_tensor(tensor, Some(&base)).unwrap();
                prop_assert_eq!(&rebuilt, &tensors_of(&pair[1])[0]);
            }
            previous = Some(Arc::new(delta));
        }
    }
}

/// Bytes of each tensor of a map, in its order.
fn tensors_of(map: &TensorMap) -> Vec<Vec<u8>> {
    map.files()[0].tensors.iter().map(|t| t.bytes.to_vec()).collect()
}

/// A little pseudo-random generator, so that a case replays from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    #[allow(clippy::cast_precision_loss)]
    fn chance(&mut self, p: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
}

#[allow(clippy::cast_possible_truncation)] // random words
/// `count` checkpoints of one BF16 tensor in which the words that change in one
/// step change again in the next with probability `keep`, others with `density`.
fn series(seed: u64, words: usize, density: f64, keep: f64, count: usize) -> Vec<TensorMap> {
    let mut rng = Rng(seed | 1);
    let mut words_now: Vec<u16> = (0..words).map(|_| rng.next() as u16).collect();
    let mut changed = vec![false; words];
    let mut out = Vec::new();
    for _ in 0..count {
        let bytes: Vec<u8> = words_now.iter().flat_map(|w| w.to_le_bytes()).collect();
        let tensor =
            MemoryTensor { name: "w".into(), dtype: Dtype::BF16, shape: vec![words as u64], bytes: Box::new(bytes) };
        out.push(TensorMap::new("model.safetensors", vec![tensor], None).unwrap());
        for (word, was) in words_now.iter_mut().zip(changed.iter_mut()) {
            let now = rng.chance(if *was { keep } else { density });
            if now {
                // both bytes change, so that no plane of a dense chunk is constant
                let r = rng.next();
                *word ^= (1 + (r % 7) as u16) | (1 + ((r >> 8) % 7) as u16) << 8;
            }
            *was = now;
        }
    }
    out
}

#[test]
fn a_delta_against_a_reference_names_it_and_needs_it() {
    let dir = tempfile::tempdir().unwrap();
    let steps = series(7, 50_000, 0.05, 0.9, 3);
    let d1 = dir.path().join("1.tpde");
    let d2 = dir.path().join("2.tpde");
    let plain = dir.path().join("2-plain.tpde");
    encode_sources(Some(&steps[0]), &steps[1], &d1, EncodeOptions::default(), false, &NoProgress).unwrap();
    let reference = Arc::new(DeltaFile::open(&d1).unwrap());
    encode_sources_against(
        Some(&steps[1]),
        &steps[2],
        &d2,
        EncodeOptions::default(),
        false,
        Some(&reference),
        &NoProgress,
    )
    .unwrap();
    encode_sources(Some(&steps[1]), &steps[2], &plain, EncodeOptions::default(), false, &NoProgress).unwrap();

    let delta = DeltaFile::open(&d2).unwrap();
    assert_ne!(delta.preamble().required_features & FEATURE_TEMPORAL_POSITIONS, 0);
    // 1.2 defines coding 3; 1.3 and 1.4 define constant streams and packed tables,
    // which the delta may also use.
    let features = delta.preamble().required_features;
    let newest = if features & FEATURE_PACKED_RANS != 0 {
        4
    } else if features & FEATURE_CONSTANT_STREAMS != 0 {
        3
    } else {
        2
    };
    assert_eq!(delta.preamble().minor_version, newest);
    let tensor = delta.header().tensors[0].clone();
    assert_eq!(delta.chunk(tensor.first_chunk).position_coding, PositionCoding::SplitByReference);
    assert!(len(&d2) < len(&plain), "coding 3 stores {} bytes, gaps and bitmaps {}", len(&d2), len(&plain));

    let base = tensors_of(&steps[1]).remove(0);
    let err = delta.decode_tensor(&tensor, Some(&base)).unwrap_err();
    assert_eq!(err.code(), ErrorCode::ReferenceRequired);
    let wrong = Arc::new(DeltaFile::open(&plain).unwrap());
    let err = DeltaFile::open(&d2).unwrap().with_position_reference(wrong).unwrap_err();
    assert_eq!(err.code(), ErrorCode::ReferenceMismatch);
    let delta = delta.with_position_reference(reference).unwrap();
    assert_eq!(delta.decode_tensor(&tensor, Some(&base)).unwrap(), tensors_of(&steps[2])[0]);
}

#[test]
fn without_a_reference_the_writer_is_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let steps = series(11, 20_000, 0.05, 0.0, 2);
    let (a, b) = (dir.path().join("a.tpde"), dir.path().join("b.tpde"));
    encode_sources(Some(&steps[0]), &steps[1], &a, EncodeOptions::default(), false, &NoProgress).unwrap();
    encode_sources_against(Some(&steps[0]), &steps[1], &b, EncodeOptions::default(), false, None, &NoProgress).unwrap();
    assert_eq!(std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
}

fn len(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().len()
}
