//! `tpde apply` of a delta whose positions are coded against a reference delta
//! (position coding 3): without the reference it is refused with a clear
//! `E_REFERENCE_REQUIRED`, and nothing is written.

use std::path::{Path, PathBuf};

mod common;
use common::{code_of, run};

fn case(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../conformance/valid/temporal-positions").join(name)
}

#[test]
fn apply_without_the_reference_says_to_use_series_get() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let out = dir.path().join("out.safetensors");
    let (base, delta) = (case("step-1.safetensors"), case("delta-2.tpde"));
    let output = run(&[Path::new("apply"), &base, &delta, Path::new("-o"), &out]);
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(code_of(&output), "E_REFERENCE_REQUIRED");
    assert!(String::from_utf8_lossy(&output.stderr).contains("tpde series get"));
    assert!(!out.exists(), "nothing is written");
}
