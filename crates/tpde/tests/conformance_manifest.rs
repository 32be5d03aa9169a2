//! The conformance suite against the library: the manifest matches the files on
//! disk in both directions, and every case gives its expected decode or error code.

mod conformance_support;

use std::collections::BTreeSet;
use std::path::Path;

use conformance_support::{cases, suite_dir, Case};
use tpde::ErrorCode;

/// Every file under `dir`, relative to the suite root.
fn files_under(root: &Path, dir: &Path, out: &mut BTreeSet<String>) {
    for entry in std::fs::read_dir(dir).expect("read a suite folder") {
        let path = entry.expect("a folder entry").path();
        if path.is_dir() {
            files_under(root, &path, out);
        } else {
            out.insert(path.strip_prefix(root).expect("under the root").to_string_lossy().replace('\\', "/"));
        }
    }
}

#[test]
fn manifest_and_files_on_disk_agree() {
    let root = suite_dir();
    let mut on_disk = BTreeSet::new();
    for dir in ["valid", "invalid", "forward-compat", "regression"] {
        files_under(&root, &root.join(dir), &mut on_disk);
    }
    on_disk.remove("regression/README.md");

    let mut referenced = BTreeSet::new();
    let mut ids = BTreeSet::new();
    for case in cases() {
        assert!(ids.insert(case.id.clone()), "case id {} appears twice", case.id);
        let files = [Some(&case.path), case.base.as_ref(), case.expected.as_ref()].into_iter().flatten();
        for rel in files.chain(&case.references) {
            let path = root.join(rel);
            assert!(path.exists(), "{}: {rel} does not exist", case.id);
            if path.is_dir() {
                files_under(&root, &path, &mut referenced);
            } else {
                referenced.insert(rel.clone());
            }
        }
        assert!(case.spec.starts_with('§'), "{}: spec section {:?}", case.id, case.spec);
        assert!(!case.provenance.is_empty(), "{}: no provenance", case.id);
        if case.accept {
            assert!(
                case.expected.is_some() && case.error.is_none(),
                "{}: an accept has expected and no error",
                case.id
            );
        } else {
            let error = case.error.as_deref().unwrap_or_else(|| panic!("{}: a reject has an error code", case.id));
            assert!(ErrorCode::ALL.iter().any(|c| c.as_str() == error), "{}: unknown code {error}", case.id);
        }
    }
    let unlisted: Vec<_> = on_disk.difference(&referenced).collect();
    assert!(unlisted.is_empty(), "files that no manifest entry names: {unlisted:?}");
}

fn check(case: &Case) -> Result<(), String> {
    let result = case.run();
    if case.accept {
        let expected = std::fs::read_to_string(suite_dir().join(case.expected.as_ref().expect("checked")))
            .map_err(|e| format!("{}: {e}", case.id))?;
        match result {
            Ok(got) if got == expected => Ok(()),
            Ok(got) => Err(format!("{}: decoded to {got}, expected {expected}", case.id)),
            Err(e) => Err(format!("{}: rejected with {e}", case.id)),
        }
    } else {
        let want = case.error.as_deref().expect("checked");
        match result {
            Err(e) if e.code().as_str() == want => Ok(()),
            Err(e) => Err(format!("{}: expected {want}, got {}", case.id, e.code())),
            Ok(_) => Err(format!("{}: expected {want}, but it was accepted", case.id)),
        }
    }
}

#[test]
fn every_case_gives_its_expected_result() {
    let failures: Vec<String> =
        cases().iter().filter(|c| c.known_bug().is_none()).filter_map(|c| check(c).err()).collect();
    assert!(failures.is_empty(), "{} case(s) failed:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn every_error_code_of_the_format_has_a_case() {
    let covered: BTreeSet<String> = cases().into_iter().filter_map(|c| c.error).collect();
    // Codes that only the command line or an encoder can produce, and running out of
    // memory, which depends on the machine rather than the file.
    let not_from_reading = [
        ErrorCode::Io,
        ErrorCode::PickleInput,
        ErrorCode::OutputExists,
        ErrorCode::TargetMismatch,
        ErrorCode::InvalidArgument,
        ErrorCode::OutOfMemory,
        ErrorCode::Interrupted,
        // series manifests (spec/SERIES.md), not delta files
        ErrorCode::SeriesInvalid,
        ErrorCode::SeriesStep,
        ErrorCode::SeriesDigest,
        ErrorCode::SeriesBusy,
        // object stores (tpde-store), whose codes its tests produce against a server
        ErrorCode::RemoteCredentials,
        ErrorCode::RemoteDenied,
        ErrorCode::RemoteNotFound,
        ErrorCode::RemoteChanged,
        ErrorCode::RemoteRetries,
    ];
    let missing: Vec<&str> = ErrorCode::ALL
        .iter()
        .filter(|c| !not_from_reading.contains(c))
        .map(|c| c.as_str())
        .filter(|c| !covered.contains(*c))
        .collect();
    assert!(missing.is_empty(), "codes without a conformance case: {missing:?}");
}
