//! A delta read by range (`DeltaFile::from_ranges`), as from an object store: the
//! same verdict as a file on every conformance case, the requests it makes, and a
//! source that fails.

mod conformance_support;

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use conformance_support::{cases, suite_dir};
use tpde::{Checkpoint, DeltaFile, Error, ErrorCode, NoProgress, RangeSink, RangeSource};

/// An object held in memory, read by range, which counts what it serves.
struct MemorySource {
    bytes: Vec<u8>,
    requests: AtomicU64,
    served: AtomicU64,
    ranges: Mutex<Vec<Range<u64>>>,
    failing: AtomicBool,
}

impl MemorySource {
    fn new(bytes: Vec<u8>) -> Arc<Self> {
        Arc::new(Self {
            bytes,
            requests: AtomicU64::new(0),
            served: AtomicU64::new(0),
            ranges: Mutex::new(Vec::new()),
            failing: AtomicBool::new(false),
        })
    }
}

impl RangeSource for MemorySource {
    fn len(&self) -> u64 {
        self.bytes.len() as u64
    }

    fn read_ranges(&self, ranges: &[Range<u64>], sink: &RangeSink<'_>) -> tpde::Result<()> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(Error::new(ErrorCode::RemoteRetries, "injected"));
        }
        for range in ranges {
            assert!(range.start < range.end && range.end <= self.len(), "{range:?}");
            self.requests.fetch_add(1, Ordering::SeqCst);
            self.served.fetch_add(range.end - range.start, Ordering::SeqCst);
            self.ranges.lock().unwrap().push(range.clone());
            // In pieces of at most 1000 bytes, as a body arrives from a socket.
            let mut at = range.start;
            while at < range.end {
                let end = (at + 1000).min(range.end);
                let bytes = &self.bytes[usize::try_from(at).unwrap()..usize::try_from(end).unwrap()];
                sink(at..end, bytes)?;
                at = end;
            }
        }
        Ok(())
    }
}

/// Opens, verifies and decodes every tensor: the verdict of the conformance
/// runner, without its output.
fn verdict(open: impl FnOnce() -> tpde::Result<DeltaFile>, base: Option<&Path>, refs: &[PathBuf]) -> tpde::Result<()> {
    let delta = open()?.with_reference_chain(refs)?;
    let base = base.map(Checkpoint::open).transpose()?;
    tpde::verify(&delta, base.as_ref(), None, &NoProgress)?;
    for tensor in &delta.header().tensors {
        let bytes = match (&tensor.base, &base) {
            (Some(_), Some(base)) => base.tensor(&tensor.name).map(|(file, at)| file.tensor_bytes(at)),
            _ => None,
        };
        delta.decode_tensor(tensor, bytes)?;
    }
    Ok(())
}

#[test]
fn every_conformance_case_reads_by_range_as_from_a_file() {
    let dir = suite_dir();
    let mut checked = 0;
    for case in cases() {
        let path = dir.join(&case.path);
        let base = case.base.as_ref().map(|b| dir.join(b));
        let refs: Vec<PathBuf> = case.references.iter().map(|r| dir.join(r)).collect();
        let code = |r: tpde::Result<()>| r.err().map(|e| e.code());
        let from_file = code(verdict(|| DeltaFile::open(&path), base.as_deref(), &refs));
        let Ok(bytes) = std::fs::read(&path) else { continue };
        let source = MemorySource::new(bytes);
        let by_range = code(verdict(|| DeltaFile::from_ranges(&path, source.clone()), base.as_deref(), &refs));
        assert_eq!(by_range, from_file, "case {}", case.id);
        checked += 1;
    }
    assert!(checked > 50, "{checked} cases");
}

/// The delta of the golden `mixed` case, and its base.
fn mixed() -> (Vec<u8>, Checkpoint) {
    let dir = suite_dir().join("valid/mixed");
    let bytes = std::fs::read(dir.join("delta.tpde")).expect("a golden delta");
    (bytes, Checkpoint::open(&dir.join("base.safetensors")).expect("a golden base"))
}

#[test]
fn open_reads_only_the_metadata_and_decoding_each_chunk_once() {
    let (bytes, base) = mixed();
    let whole = DeltaFile::from_bytes(Path::new("mixed"), bytes.clone()).expect("opens");
    let chunks: u64 = (0..whole.preamble().chunk_count).map(|i| u64::from(whole.chunk(i).stored_len)).sum();
    let source = MemorySource::new(bytes.clone());
    let delta = DeltaFile::from_ranges(Path::new("mixed"), source.clone()).expect("opens");
    assert_eq!(source.requests.load(Ordering::SeqCst), 2);
    assert_eq!(source.served.load(Ordering::SeqCst), bytes.len() as u64 - chunks);
    assert_eq!(delta.resident_chunk_bytes(), 0);
    let nonempty = (0..delta.preamble().chunk_count).find(|&i| delta.chunk(i).stored_len > 0).expect("a chunk");
    assert!(delta.stored_bytes(nonempty).is_empty(), "not fetched yet");
    tpde::verify(&delta, Some(&base), None, &NoProgress).expect("verifies");
    assert_eq!(source.served.load(Ordering::SeqCst), bytes.len() as u64, "each byte once");
    // Every fetch after open is of whole chunks, adjacent ones merged.
    let ranges = source.ranges.lock().unwrap().clone();
    assert!(ranges.len() - 2 < usize::try_from(delta.preamble().chunk_count).unwrap(), "{ranges:?}");
    // Fetched chunks are the file's bytes.
    for i in 0..delta.preamble().chunk_count {
        assert_eq!(delta.stored_bytes(i), whole.stored_bytes(i));
    }
    // Once fetched, nothing more is read.
    tpde::verify(&delta, Some(&base), None, &NoProgress).expect("verifies");
    assert_eq!(source.served.load(Ordering::SeqCst), bytes.len() as u64);
    assert_eq!(delta.bytes(), &bytes[..]);
}

#[test]
fn a_failing_source_fails_with_its_code_and_a_later_read_succeeds() {
    let (bytes, base) = mixed();
    let source = MemorySource::new(bytes);
    let delta = DeltaFile::from_ranges(Path::new("mixed"), source.clone()).expect("opens");
    source.failing.store(true, Ordering::SeqCst);
    let err = tpde::verify(&delta, Some(&base), None, &NoProgress).expect_err("the source fails");
    assert_eq!(err.code(), ErrorCode::RemoteRetries, "{err}");
    assert_eq!(err.file(), Some(Path::new("mixed")));
    assert_eq!(delta.resident_chunk_bytes(), 0);
    source.failing.store(false, Ordering::SeqCst);
    tpde::verify(&delta, Some(&base), None, &NoProgress).expect("verifies once the source recovers");
}

#[test]
fn a_source_that_serves_other_bytes_is_caught_by_the_checksums() {
    let (mut bytes, base) = mixed();
    let whole = DeltaFile::from_bytes(Path::new("mixed"), bytes.clone()).expect("opens");
    let chunk = (0..whole.preamble().chunk_count).find(|&i| whole.chunk(i).stored_len > 0).expect("a chunk");
    let at = usize::try_from(whole.chunk(chunk).data_offset).unwrap();
    bytes[at] ^= 1;
    let delta = DeltaFile::from_ranges(Path::new("mixed"), MemorySource::new(bytes)).expect("opens");
    let err = tpde::verify(&delta, Some(&base), None, &NoProgress).expect_err("a changed chunk");
    assert_eq!(err.code(), ErrorCode::ChunkChecksum);
    assert_eq!(err.chunk(), Some(chunk));
}
