//! Encoding from tensors in memory, and reading a delta tensor by tensor or by rows
//! through `DeltaModel`, with the base checked as `apply` checks it.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use tpde::{
    Checkpoint, DeltaFile, DeltaModel, Dtype, EncodeOptions, ErrorCode, MemoryTensor, NoProgress, OwnedSource,
    Progress, TensorMap, TensorSource,
};

/// A row-major BF16 matrix whose bytes follow from `seed`.
fn matrix(name: &str, rows: u64, cols: u64, seed: u8) -> MemoryTensor {
    let bytes: Vec<u8> = (0..rows * cols * 2)
        .map(|i| u8::try_from(i % 256).expect("a byte").wrapping_mul(31).wrapping_add(seed))
        .collect();
    MemoryTensor { name: name.into(), dtype: Dtype::BF16, shape: vec![rows, cols], bytes: Box::new(bytes) }
}

fn map(tensors: Vec<MemoryTensor>) -> TensorMap {
    TensorMap::new("model.safetensors", tensors, None).expect("valid tensors")
}

fn options(chunk_words: u64) -> EncodeOptions {
    EncodeOptions { chunk_words, ..EncodeOptions::default() }
}

/// The file a `TensorMap` stands for, as bytes.
fn file_of(source: &dyn TensorSource) -> Vec<u8> {
    let file = &source.files()[0];
    let mut out = (file.header_text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(file.header_text.as_bytes());
    for tensor in &file.tensors {
        out.extend_from_slice(tensor.bytes);
    }
    out
}

fn base_and_target() -> (TensorMap, TensorMap) {
    let base = map(vec![matrix("a", 40, 24, 1), matrix("b", 8, 8, 2)]);
    let target = map(vec![matrix("a", 40, 24, 9), matrix("b", 8, 8, 2), matrix("c", 3, 5, 4)]);
    (base, target)
}

fn open(path: &Path, base: Option<OwnedSource>) -> tpde::Result<DeltaModel> {
    DeltaModel::new(DeltaFile::open(path)?, base)
}

#[test]
fn tensors_from_memory_encode_as_the_file_they_stand_for() {
    let dir = tempfile::tempdir().unwrap();
    let (base, target) = base_and_target();
    let from_memory = dir.path().join("memory.tpde");
    tpde::encode_sources(Some(&base), &target, &from_memory, options(100), false, &NoProgress).unwrap();
    std::fs::write(dir.path().join("base.safetensors"), file_of(&base)).unwrap();
    std::fs::write(dir.path().join("model.safetensors"), file_of(&target)).unwrap();
    let base_file = Checkpoint::open(&dir.path().join("base.safetensors")).unwrap();
    let target_file = Checkpoint::open(&dir.path().join("model.safetensors")).unwrap();
    let from_files = dir.path().join("files.tpde");
    tpde::encode(Some(&base_file), &target_file, &from_files, options(100), &NoProgress).unwrap();
    assert_eq!(std::fs::read(&from_memory).unwrap(), std::fs::read(&from_files).unwrap());
}

#[test]
fn rows_decode_to_the_bytes_of_the_whole_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let (base, target) = base_and_target();
    let path = dir.path().join("d.tpde");
    tpde::encode_sources(Some(&base), &target, &path, options(100), false, &NoProgress).unwrap();
    let model = open(&path, Some(Box::new(base))).unwrap();
    let a = model.tensor("a").unwrap();
    let mut whole = vec![0; 40 * 24 * 2];
    model.decode_into(a, &mut whole, &NoProgress).unwrap();
    assert_eq!(whole, (*target.tensor("a").unwrap().bytes).to_vec());
    // Chunks of 100 words hold 4 rows and 4 words: most row ranges cut through chunks.
    for (start, end) in [(0, 40), (0, 1), (3, 9), (25, 40), (39, 40), (12, 12)] {
        let row = 24 * 2;
        let mut rows = vec![0; (end - start) * row];
        model.decode_rows_into(a, start as u64..end as u64, &mut rows, &NoProgress).unwrap();
        assert_eq!(rows, whole[start * row..end * row], "{start}..{end}");
    }
    let mut out = vec![0; 48];
    let outside = model.decode_rows_into(a, 39..41, &mut out, &NoProgress).unwrap_err();
    assert_eq!((outside.code(), outside.tensor()), (ErrorCode::InvalidArgument, Some("a")));
    assert_eq!(model.tensor("zz").unwrap_err().code(), ErrorCode::InvalidArgument);
}

#[test]
fn the_base_is_checked_by_shape_when_opened_and_by_digest_when_used() {
    let dir = tempfile::tempdir().unwrap();
    let (base, target) = base_and_target();
    let path = dir.path().join("d.tpde");
    tpde::encode_sources(Some(&base), &target, &path, options(100), false, &NoProgress).unwrap();

    let reshaped = map(vec![matrix("a", 24, 40, 1), matrix("b", 8, 8, 2)]);
    let err = open(&path, Some(Box::new(reshaped))).unwrap_err();
    assert_eq!((err.code(), err.tensor()), (ErrorCode::BaseMismatch, Some("a")));
    let missing = map(vec![matrix("a", 40, 24, 1)]);
    assert_eq!(open(&path, Some(Box::new(missing))).unwrap_err().code(), ErrorCode::BaseMissingTensor);
    assert_eq!(open(&path, None).unwrap_err().code(), ErrorCode::BaseRequired);

    let changed = map(vec![matrix("a", 40, 24, 1), matrix("b", 8, 8, 3)]);
    let model = open(&path, Some(Box::new(changed))).unwrap();
    let mut a = vec![0; 40 * 24 * 2];
    model.decode_into(model.tensor("a").unwrap(), &mut a, &NoProgress).unwrap();
    let mut b = vec![0; 8 * 8 * 2];
    let err = model.decode_into(model.tensor("b").unwrap(), &mut b, &NoProgress).unwrap_err();
    assert_eq!((err.code(), err.tensor()), (ErrorCode::BaseDigest, Some("b")));
}

#[test]
fn a_partial_read_checks_only_the_base_bytes_of_its_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let base_a = matrix("a", 40, 24, 1);
    // A fine-tune: a few words of every chunk changed, so every chunk is built on the base.
    let mut tuned = (*base_a.bytes).as_ref().to_vec();
    for i in (0..tuned.len()).step_by(64) {
        tuned[i] ^= 0x40;
    }
    let target_a = MemoryTensor { bytes: Box::new(tuned), ..matrix("a", 40, 24, 1) };
    let path = dir.path().join("d.tpde");
    tpde::encode_sources(Some(&map(vec![base_a])), &map(vec![target_a]), &path, options(100), false, &NoProgress)
        .unwrap();
    // The base differs from the one the delta was made against in rows 30 to 39 only
    // (words 720 and on: chunks 7 to 9 of 100 words).
    let mut wrong = (*matrix("a", 40, 24, 1).bytes).as_ref().to_vec();
    wrong[30 * 48 + 5] ^= 1;
    let wrong = || map(vec![MemoryTensor { bytes: Box::new(wrong.clone()), ..matrix("a", 40, 24, 1) }]);
    let right = open(&path, Some(Box::new(map(vec![matrix("a", 40, 24, 1)])))).unwrap();
    let mut expected = vec![0; 40 * 48];
    right.decode_into(right.tensor("a").unwrap(), &mut expected, &NoProgress).unwrap();

    let model = open(&path, Some(Box::new(wrong()))).unwrap();
    let a = model.tensor("a").unwrap();
    // Rows whose chunks hold none of the differing bytes rebuild bit-exact...
    let mut rows = vec![0; 8 * 48];
    model.decode_rows_into(a, 0..8, &mut rows, &NoProgress).unwrap();
    assert_eq!(rows, expected[..8 * 48]);
    let mut chunks = vec![0; 200 * 2];
    model.decode_chunks_into(a, 2..4, &mut chunks, &NoProgress).unwrap();
    assert_eq!(chunks, expected[400..800]);
    // ...rows that hold one fail, named as the base's fault...
    let mut rows = vec![0; 10 * 48];
    let err = model.decode_rows_into(a, 30..40, &mut rows, &NoProgress).unwrap_err();
    assert_eq!((err.code(), err.tensor()), (ErrorCode::BaseDigest, Some("a")));
    // ...and the whole tensor is refused before it is rebuilt.
    let model = open(&path, Some(Box::new(wrong()))).unwrap();
    let mut whole = vec![0; 40 * 48];
    let err = model.decode_into(model.tensor("a").unwrap(), &mut whole, &NoProgress).unwrap_err();
    assert_eq!(err.code(), ErrorCode::BaseDigest);
    assert!(whole.iter().all(|&b| b == 0), "nothing is rebuilt before the base is checked");
}

/// Stops the work at its first check.
struct StopAtOnce(AtomicBool);

impl Progress for StopAtOnce {
    fn phase(&self, _: &str, _: u64) {}
    fn advance(&self, _: u64) {}
    fn interrupted(&self) -> bool {
        self.0.store(true, Ordering::Relaxed);
        true
    }
}

#[test]
fn interrupted_work_stops_with_its_code_and_leaves_no_output() {
    let dir = tempfile::tempdir().unwrap();
    let (base, target) = base_and_target();
    let path = dir.path().join("d.tpde");
    let stop = StopAtOnce(AtomicBool::new(false));
    let err = tpde::encode_sources(Some(&base), &target, &path, options(100), false, &stop).unwrap_err();
    assert_eq!(err.code(), ErrorCode::Interrupted);
    assert!(stop.0.load(Ordering::Relaxed));
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "nothing is left behind");

    tpde::encode_sources(Some(&base), &target, &path, options(100), false, &NoProgress).unwrap();
    std::fs::write(dir.path().join("base.safetensors"), file_of(&base)).unwrap();
    let base_file = Checkpoint::open(&dir.path().join("base.safetensors")).unwrap();
    let delta = DeltaFile::open(&path).unwrap();
    let out = dir.path().join("out.safetensors");
    let err = tpde::apply(&delta, Some(&base_file), &out, Default::default(), &stop).unwrap_err();
    assert_eq!(err.code(), ErrorCode::Interrupted);
    assert!(!out.exists());
    let model = open(&path, Some(Box::new(base))).unwrap();
    let mut a = vec![0; 40 * 24 * 2];
    let err = model.decode_into(model.tensor("a").unwrap(), &mut a, &stop).unwrap_err();
    assert_eq!((err.code(), err.tensor()), (ErrorCode::Interrupted, Some("a")));
}
