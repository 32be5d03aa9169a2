//! The text of one real error of every code, from the golden files where a golden
//! case has that code, else from the smallest input that produces it. Messages are
//! for people and may change; this snapshot shows each change in review. Tests never
//! match on this text: they match on codes.

mod conformance_support;

use std::collections::BTreeMap;
use std::path::Path;

use conformance_support::{cases, decode, suite_dir};
use tpde::{Checkpoint, DeltaFile, EncodeOptions, ErrorCode, NoProgress};

/// A caller that stops the work at once.
struct Stop;

impl tpde::Progress for Stop {
    fn phase(&self, _: &str, _: u64) {}
    fn advance(&self, _: u64) {}
    fn interrupted(&self) -> bool {
        true
    }
}

/// Codes that no golden case produces, each from an input built here.
fn errors_outside_the_suite(dir: &Path, scratch: &tempfile::TempDir) -> Vec<tpde::Error> {
    let suite = suite_dir();
    let mixed = |rel: &str| suite.join("valid/mixed").join(rel);
    let mut out = Vec::new();
    out.extend(DeltaFile::open(&dir.join("no-such-file.tpde")).err());
    out.extend(Checkpoint::open(&dir.join("pytorch_model.bin")).err());
    out.extend(tpde::check_free(&mixed("delta.tpde"), false).err());
    let delta = DeltaFile::open(&mixed("delta.tpde")).expect("a golden opens");
    let base = Checkpoint::open(&mixed("base.safetensors")).expect("a golden base opens");
    // The base as the target to compare with: not what the delta rebuilds.
    out.extend(tpde::verify(&delta, Some(&base), Some(&base), &NoProgress).err());
    let options = EncodeOptions { chunk_words: 0, ..EncodeOptions::default() };
    out.extend(tpde::encode(None, &base, &scratch.path().join("x.tpde"), options, &NoProgress).err());
    out.extend(tpde::encode(None, &base, &scratch.path().join("x.tpde"), EncodeOptions::default(), &Stop).err());
    // More memory than any machine has: refused, not aborted.
    out.extend(tpde::format::try_zeroed(usize::MAX).err());
    out.extend(series_errors(scratch.path(), &mixed("base.safetensors")));
    out
}

/// The series codes (spec/SERIES.md §7), from a series of one golden checkpoint.
fn series_errors(dir: &Path, checkpoint: &Path) -> Vec<tpde::Error> {
    use tpde::{AddOptions, Manifest, Series};
    let mut out = Vec::new();
    let cases = suite_dir().join("series");
    let text = std::fs::read_to_string(cases.join("invalid/major-version-2.json")).expect("a series case");
    out.extend(Manifest::parse(&text).err());
    let run = dir.join("run");
    let mut series = Series::open_or_create(&run).expect("a new series");
    let ckpt = Checkpoint::open(checkpoint).expect("a golden checkpoint opens");
    series.add(&ckpt, 10, &AddOptions::default(), &NoProgress).expect("a step is added");
    out.extend(series.get(5, &dir.join("x.safetensors"), Default::default(), &NoProgress).err());
    #[cfg(unix)]
    {
        use std::os::fd::AsRawFd;
        let lock = std::fs::File::create(run.join(".lock")).expect("the lock file");
        // SAFETY: flock on a valid, open descriptor.
        assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) }, 0);
        out.extend(series.add(&ckpt, 20, &AddOptions::default(), &NoProgress).err());
    }
    let file = run.join(series.manifest().steps[0].file.as_deref().expect("a stored step"));
    let mut bytes = std::fs::read(&file).expect("the step file");
    bytes[100] ^= 1;
    std::fs::write(&file, bytes).expect("write");
    out.extend(series.get(10, &dir.join("y.safetensors"), Default::default(), &NoProgress).err());
    out
}

#[test]
fn one_error_message_per_code() {
    let suite = suite_dir();
    let prefix = suite.to_string_lossy().into_owned();
    let mut examples: BTreeMap<&'static str, String> = BTreeMap::new();
    for case in cases() {
        let Some(code) = case.error.as_deref() else { continue };
        if examples.keys().any(|k| *k == code) || case.known_bug().is_some() {
            continue;
        }
        let err = case.run().expect_err("a rejected case fails");
        let code = ErrorCode::ALL.iter().find(|c| c.as_str() == code).expect("a known code").as_str();
        examples.insert(code, format!("[{}] {err}", case.id));
    }
    let scratch = tempfile::tempdir().expect("a temp dir");
    for err in errors_outside_the_suite(&suite, &scratch) {
        examples.entry(err.code().as_str()).or_insert_with(|| format!("[built in this test] {err}"));
    }
    // The object-store codes come from tpde-store, whose tests
    // (tools/tpde/tests/remote.rs) produce each against a real S3 server.
    let remote = |c: &&str| c.starts_with("E_REMOTE_");
    let missing: Vec<&str> =
        ErrorCode::ALL.iter().map(|c| c.as_str()).filter(|c| !examples.contains_key(c) && !remote(c)).collect();
    assert!(missing.is_empty(), "no example for {missing:?}");
    let text: String = ErrorCode::ALL
        .iter()
        .filter(|c| !remote(&c.as_str()))
        .map(|c| {
            let example = examples[c.as_str()].replace(&prefix, "conformance");
            format!("{}\n    {}\n", c.as_str(), example.replace(&*scratch.path().to_string_lossy(), "<scratch>"))
        })
        .collect();
    insta::assert_snapshot!("error_messages", text);
    // The decode helper agrees: a missing file is E_IO.
    assert_eq!(decode(&suite.join("missing.tpde"), None).unwrap_err().code(), ErrorCode::Io);
}
