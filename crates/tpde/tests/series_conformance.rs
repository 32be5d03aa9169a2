//! Series conformance (spec/SERIES.md): the committed JSON Schema
//! (`spec/series.schema.json`) is the one the manifest types generate, and every
//! case of `conformance/series` gets the verdict its list states, judged by the
//! library; the valid ones also pass an independent schema validator.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use tpde::Manifest;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn generated_schema() -> String {
    let mut text = serde_json::to_string_pretty(&schemars::schema_for!(Manifest)).expect("a schema serialises");
    text.push('\n');
    text
}

#[test]
fn committed_schema_matches_the_manifest_types() {
    let path = repo().join("spec/series.schema.json");
    if std::env::var_os("TPDE_WRITE_SCHEMA").is_some() {
        std::fs::write(&path, generated_schema()).expect("write the schema");
    }
    let committed = std::fs::read_to_string(&path).expect("the committed schema");
    assert!(
        committed == generated_schema(),
        "spec/series.schema.json is stale: rerun with TPDE_WRITE_SCHEMA=1 and review the diff"
    );
}

#[derive(Deserialize)]
struct Case {
    file: String,
    error: Option<String>,
    rule: String,
}

#[derive(Deserialize)]
struct Cases {
    cases: Vec<Case>,
}

#[test]
fn every_series_case_gets_its_verdict() {
    let dir = repo().join("conformance/series");
    let list: Cases =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).expect("the case list")).expect("JSON");
    let schema: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(repo().join("spec/series.schema.json")).expect("the schema"))
            .expect("the schema is JSON");
    let validator = jsonschema::draft7::new(&schema).expect("a valid draft-07 schema");
    let mut listed = BTreeSet::new();
    for case in &list.cases {
        let bytes = std::fs::read(dir.join(&case.file)).expect("a case file");
        let verdict = Manifest::parse_bytes(&bytes).map(|_| ()).map_err(|e| e.code().as_str().to_owned());
        assert_eq!(verdict.err(), case.error, "{} ({})", case.file, case.rule);
        if case.error.is_none() {
            let value: serde_json::Value = serde_json::from_slice(&bytes).expect("JSON");
            assert!(validator.is_valid(&value), "{}: the schema refuses a valid manifest", case.file);
        }
        listed.insert(case.file.clone());
    }
    // the list and the files agree in both directions
    let mut on_disk = BTreeSet::new();
    for sub in ["valid", "invalid"] {
        for entry in std::fs::read_dir(dir.join(sub)).expect("a case folder") {
            on_disk.insert(format!("{sub}/{}", entry.expect("an entry").file_name().to_string_lossy()));
        }
    }
    assert_eq!(listed, on_disk);
}

/// The golden run (`conformance/series/run`, every kind of step and a chain of
/// two deltas) rebuilds each step to the checkpoint digests its manifest pins,
/// read from a copy whose directories are made read-only (binding for a
/// user other than root), as an archive of runs may be.
#[cfg(unix)]
#[test]
fn the_golden_run_rebuilds_every_step_read_only() {
    use std::os::unix::fs::PermissionsExt;
    use tpde::NoProgress;
    use tpde::{CheckpointDigest, Series, StepKind};
    let scratch = tempfile::tempdir().expect("a temp dir");
    let run = scratch.path().join("run");
    std::fs::create_dir_all(run.join("steps")).expect("mkdir");
    let golden = repo().join("conformance/series/run");
    std::fs::copy(golden.join("series.json"), run.join("series.json")).expect("copy");
    for entry in std::fs::read_dir(golden.join("steps")).expect("the steps") {
        let entry = entry.expect("an entry");
        std::fs::copy(entry.path(), run.join("steps").join(entry.file_name())).expect("copy");
    }
    for dir in [run.join("steps"), run.clone()] {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o555)).expect("chmod");
    }
    let series = Series::open(&run).expect("the golden run opens");
    let kinds: BTreeSet<StepKind> = series.manifest().steps.iter().map(|s| s.kind).collect();
    assert_eq!(kinds.len(), 3);
    let out_dir = scratch.path().join("out");
    std::fs::create_dir_all(&out_dir).expect("mkdir");
    for s in &series.manifest().steps {
        let out = out_dir.join(format!("{}.safetensors", s.step));
        series.get(s.step, &out, Default::default(), &NoProgress).expect("a golden step rebuilds");
        let rebuilt = tpde::Checkpoint::open(&out).expect("opens");
        assert!(CheckpointDigest::of(&rebuilt).expect("digests").same_bytes(&s.checkpoint), "step {}", s.step);
    }
    assert_eq!(series.verify(&NoProgress).expect("verifies").steps, 4);
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}
