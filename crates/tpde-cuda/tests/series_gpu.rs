//! A checkpoint series stepped through on the GPU: weights that hold one step in
//! device memory reach later steps by applying the chain's deltas in place, bit
//! for bit the checkpoints that were added. They need a CUDA GPU, so CI reports
//! them as ignored; run them with `--include-ignored` on a GPU machine.
#![allow(clippy::cast_possible_truncation)] // small test values

use std::sync::Arc;

use tpde::{AddOptions, Checkpoint, DeltaFile, EncodeOptions, ErrorCode, NoProgress, Series};
use tpde_cuda::{step_in_place, Gpu, GpuError, Loader, LoaderConfig};

mod common;
use common::write_bf16_safetensors;

#[test]
#[ignore = "needs a CUDA GPU"]
fn weights_on_the_gpu_step_through_a_series_bit_for_bit() {
    let pinned = step_through(false);
    assert_eq!(pinned, 0, "no step file without temporal positions has a position reference");
}

/// The same with temporal positions (format 1.2, position coding 3): most of
/// the words that move, move again the next step, so the writer codes their
/// positions against the previous step's file, and the loader decodes them
/// against it.
#[test]
#[ignore = "needs a CUDA GPU"]
fn weights_on_the_gpu_step_through_a_temporal_series_bit_for_bit() {
    let pinned = step_through(true);
    assert!(pinned >= 2, "{pinned} step files code positions against a reference");
}

/// Adds six steps of two BF16 tensors to a new series and steps a device copy
/// of step 0 forward through them, checking every step bit for bit. Returns
/// the number of step files with a position reference.
fn step_through(temporal: bool) -> usize {
    let dir = tempfile::tempdir().expect("a temp dir");
    let mut series = Series::open_or_create(&dir.path().join("run")).expect("a new series");
    let options =
        AddOptions { max_chain: 10, encode: EncodeOptions { chunk_words: 4096, ..EncodeOptions::default() }, temporal };
    let mut a: Vec<u16> = (0..200_000u32).map(|i| 0x3C00 | (i.wrapping_mul(2_654_435_761) >> 22) as u16).collect();
    let mut b: Vec<u16> = (0..3_000u32).map(|i| 0x3F80 | (i % 97) as u16).collect();
    let mut steps = Vec::new();
    for k in 0..6u64 {
        // about one word in 37 moves every step, and one in 500 more at
        // positions drawn anew each step
        for (i, w) in a.iter_mut().enumerate() {
            let fixed = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(17);
            let mix = ((i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ k.wrapping_mul(0xBF58_476D_1CE4_E5B9))
                .rotate_left(17);
            if fixed.is_multiple_of(37) || mix.is_multiple_of(500) {
                *w = w.wrapping_add(1 + (i % 2) as u16);
            }
        }
        let at = (k as usize * 11) % b.len();
        b[at] ^= 1;
        let path = dir.path().join(format!("step-{k}.safetensors"));
        write_bf16_safetensors(&path, &[("a", &a), ("b", &b)]);
        let ckpt = Checkpoint::open(&path).expect("opens");
        series.add(&ckpt, 10 * k, &options, &NoProgress).expect("a step is added");
        steps.push((10 * k, a.clone(), b.clone()));
    }
    let gpu = Arc::new(Gpu::new(0).expect("a CUDA GPU"));
    let mut loader = Loader::new(gpu.clone(), LoaderConfig::default()).expect("a loader");
    let bytes = |w: &[u16]| w.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let (_, a0, b0) = &steps[0];
    let mut bufs = vec![gpu.upload(&bytes(a0)).expect("upload"), gpu.upload(&bytes(b0)).expect("upload")];
    // Forward along the chains the series chose: from the step the device holds
    // to each later step whose chain passes through it.
    let manifest = series.manifest();
    let mut at = 0;
    let mut moved = 0;
    for (step, a, b) in &steps[1..] {
        let chain = manifest.chain(*step).expect("a chain");
        let Some(from) = chain.iter().position(|e| e.step == at) else { continue };
        let applied = step_in_place(&mut loader, &series, at, *step, &mut bufs).expect("a step applies");
        assert_eq!(applied, chain.len() - 1 - from);
        assert_eq!(gpu.download(&bufs[0]).expect("download"), bytes(a), "tensor a at step {step}");
        assert_eq!(gpu.download(&bufs[1]).expect("download"), bytes(b), "tensor b at step {step}");
        at = *step;
        moved += 1;
    }
    assert!(moved >= 2, "the device followed {moved} steps of the run");
    // backwards is on no chain
    let err = step_in_place(&mut loader, &series, at, 0, &mut bufs).unwrap_err();
    assert!(matches!(&err, GpuError::Format(e) if e.code() == ErrorCode::SeriesStep), "{err}");
    manifest
        .steps
        .iter()
        .filter_map(|e| e.file.as_deref())
        .filter(|f| {
            let file = DeltaFile::open(&series.root().join(f)).expect("a step file opens");
            file.header().position_reference.is_some()
        })
        .count()
}
