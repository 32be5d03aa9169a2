//! `tpde inspect` over every conformance case: it checks each chunk as far as it can
//! without a base (spec §11.2 D1, D3, D4, D6), so it rejects every faulty delta that
//! a reader rejects, with the same code, except where the fault is only visible with
//! the base.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Output;

use serde_json::Value;

mod common;
use common::{code_of, run};

/// Codes that need the base or the rebuilt bytes, which `inspect` does not have:
/// the rebuilt chunk's digest (D7).
const NEEDS_REBUILT_BYTES: &[&str] = &["E_CHUNK_DIGEST"];

fn suite_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../conformance")
}

fn cases() -> Vec<Value> {
    let text = std::fs::read_to_string(suite_dir().join("manifest.json")).expect("conformance/manifest.json");
    let manifest: Value = serde_json::from_str(&text).expect("the manifest is JSON");
    manifest["cases"].as_array().expect("a cases array").clone()
}

fn inspect(delta: &Path, json: bool) -> Output {
    let mut args = vec![Path::new("inspect"), delta];
    if json {
        args.push(Path::new("--json"));
    }
    run(&args)
}

#[test]
fn inspect_rejects_every_faulty_delta_with_the_readers_code() {
    let cases = cases();
    let field = |case: &Value, key: &str| case[key].as_str().unwrap_or_default().to_owned();
    // A delta that some case accepts is sound; the cases that reject it fault its base.
    let sound: BTreeSet<String> =
        cases.iter().filter(|c| field(c, "expect") == "accept").map(|c| field(c, "path")).collect();
    let mut failures = Vec::new();
    for case in &cases {
        let path = field(case, "path");
        let output = inspect(&suite_dir().join(&path), false);
        let expected = match field(case, "error") {
            code if field(case, "expect") == "reject" && !sound.contains(&path) => code,
            _ => String::new(),
        };
        let expected = if NEEDS_REBUILT_BYTES.contains(&expected.as_str()) { String::new() } else { expected };
        // Without its reference delta, inspect leaves a chunk of position coding 3
        // at its streams (spec §15.7): faults of its positions need the reference.
        let needs_reference = case["references"].as_array().is_some_and(|r| !r.is_empty())
            && !["E_HEADER_INVALID", "E_CHUNK_MAP_INVALID"].contains(&expected.as_str());
        let expected = if needs_reference { String::new() } else { expected };
        let got = if output.status.success() { String::new() } else { code_of(&output) };
        if got != expected || (!got.is_empty() && output.status.code() != Some(1)) {
            failures.push(format!("{}: expected {expected:?}, got {got:?} ({:?})", field(case, "id"), output.status));
        }
    }
    assert!(failures.is_empty(), "{} case(s):\n{}", failures.len(), failures.join("\n"));
}

/// The regression of the report: the payload of this file is corrupt and `inspect`
/// exited 0 and printed its changed fractions.
#[test]
fn a_corrupt_chunk_fails_inspect() {
    let output = inspect(&suite_dir().join("invalid/chunk-checksum-mismatch.tpde"), true);
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(code_of(&output), "E_CHUNK_CHECKSUM");
    assert!(output.stdout.is_empty(), "no report for a corrupt file");
}

/// The report says what was checked, and that the rebuilt bytes were not.
#[test]
fn the_report_says_what_was_checked() {
    let output = inspect(&suite_dir().join("valid/mixed/delta.tpde"), true);
    assert!(output.status.success());
    let report: Value = serde_json::from_slice(&output.stdout).expect("JSON");
    let checked = &report["checked"];
    for key in ["structure", "chunk_checksums", "chunk_payloads"] {
        assert_eq!(checked[key], Value::Bool(true), "{key}");
    }
    assert_eq!(checked["rebuilt_digests"], Value::Bool(false));
}
