//! The conformance suite (`conformance/`) as the tests see it: the manifest's cases
//! and the canonical decode of the conformance CLI contract.

#![allow(dead_code)] // each test crate uses a part

use std::path::{Path, PathBuf};

use serde_json::Value;

/// Cases the library gets wrong today, by id, with the bug: the suite-wide tests
/// skip them, and each gets its own `#[ignore = "bug: ..."]` test until it is fixed.
/// (Empty since the fixes for empty tensors sharing an offset, duplicate keys in
/// embedded safetensors headers and oversized zstd windows.)
pub const KNOWN_BUGS: &[(&str, &str)] = &[];

/// The suite's root folder.
pub fn suite_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../conformance")
}

/// One manifest entry.
#[derive(Debug, Clone)]
pub struct Case {
    pub id: String,
    pub path: String,
    pub base: Option<String>,
    /// The delta's chain of reference deltas (spec §11.4), nearest first.
    pub references: Vec<String>,
    pub accept: bool,
    pub expected: Option<String>,
    pub error: Option<String>,
    pub spec: String,
    pub provenance: String,
}

impl Case {
    /// The bug that makes this case fail today, if any.
    pub fn known_bug(&self) -> Option<&'static str> {
        KNOWN_BUGS.iter().find(|(id, _)| *id == self.id).map(|(_, bug)| *bug)
    }

    /// Runs the case through the library: the canonical decode or the error.
    pub fn run(&self) -> tpde::Result<String> {
        let dir = suite_dir();
        let references: Vec<PathBuf> = self.references.iter().map(|r| dir.join(r)).collect();
        decode_with_references(&dir.join(&self.path), self.base.as_ref().map(|b| dir.join(b)).as_deref(), &references)
    }
}

fn text(entry: &Value, key: &str) -> Option<String> {
    entry.get(key).and_then(Value::as_str).map(str::to_owned)
}

/// The manifest, parsed.
pub fn manifest() -> Value {
    let text = std::fs::read_to_string(suite_dir().join("manifest.json")).expect("conformance/manifest.json");
    serde_json::from_str(&text).expect("the manifest is JSON")
}

/// Every case of the manifest.
pub fn cases() -> Vec<Case> {
    manifest()["cases"]
        .as_array()
        .expect("a cases array")
        .iter()
        .map(|e| Case {
            id: text(e, "id").expect("an id"),
            path: text(e, "path").expect("a path"),
            base: text(e, "base"),
            references: e
                .get("references")
                .and_then(Value::as_array)
                .map(|refs| refs.iter().filter_map(Value::as_str).map(str::to_owned).collect())
                .unwrap_or_default(),
            accept: text(e, "expect").as_deref() == Some("accept"),
            expected: text(e, "expected"),
            error: text(e, "error"),
            spec: text(e, "spec").unwrap_or_default(),
            provenance: text(e, "provenance").unwrap_or_default(),
        })
        .collect()
}

/// The canonical decode of the conformance contract, as the runner prints it.
#[allow(unused_imports)] // each test crate uses a part
pub use tpde_conformance::{decode, decode_with_references};
