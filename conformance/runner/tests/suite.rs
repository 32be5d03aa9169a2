//! Runs the `tpde-conformance` binary over every case of the manifest, as a
//! third-party reader would be run by `conformance/run-suite.sh`.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// Cases the library gets wrong today; they mirror the library's conformance test
/// (`crates/tpde/tests/conformance_support/mod.rs`) and are removed with the fix.
const KNOWN_BUGS: &[&str] = &[];

fn suite_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn run_case(case: &Value) -> Result<(), String> {
    let dir = suite_dir();
    let field = |key: &str| case.get(key).and_then(Value::as_str);
    let id = field("id").expect("an id");
    let mut command = Command::new(env!("CARGO_BIN_EXE_tpde-conformance"));
    command.arg("decode").arg(dir.join(field("path").expect("a path")));
    if let Some(base) = field("base") {
        command.arg("--base").arg(dir.join(base));
    }
    for reference in case["references"].as_array().into_iter().flatten().filter_map(Value::as_str) {
        command.arg("--reference").arg(dir.join(reference));
    }
    let output = command.output().map_err(|e| format!("{id}: cannot run the runner: {e}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let (want_status, want_stdout) = if field("expect") == Some("accept") {
        let expected = std::fs::read_to_string(dir.join(field("expected").expect("an expected file")))
            .map_err(|e| format!("{id}: {e}"))?;
        (0, expected)
    } else {
        (1, format!("{{\"error\":\"{}\"}}\n", field("error").expect("an error code")))
    };
    if output.status.code() == Some(want_status) && stdout == want_stdout {
        Ok(())
    } else {
        Err(format!(
            "{id}: wanted exit {want_status} and {want_stdout:?}; got {:?} and {stdout:?}",
            output.status.code()
        ))
    }
}

#[test]
fn the_runner_passes_every_case() {
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(suite_dir().join("manifest.json")).expect("the manifest"))
            .expect("JSON");
    let cases = manifest["cases"].as_array().expect("cases");
    assert!(cases.len() > 100, "the suite has its cases");
    let failures: Vec<String> = cases
        .iter()
        .filter(|c| !KNOWN_BUGS.contains(&c["id"].as_str().unwrap_or_default()))
        .filter_map(|c| run_case(c).err())
        .collect();
    assert!(failures.is_empty(), "{} case(s) failed:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn usage_errors_exit_2() {
    let status = Command::new(env!("CARGO_BIN_EXE_tpde-conformance")).arg("encode").status().expect("runs");
    assert_eq!(status.code(), Some(2));
}
