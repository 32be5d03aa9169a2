//! The series manifest (spec/SERIES.md): the committed JSON Schema
//! (`spec/series.schema.json`) is the one the manifest types generate, and every
//! case of `conformance/series` gets the verdict its list states, judged by the
//! library; the valid ones also pass an independent schema validator.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use tpde::series::Manifest;

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
        let text = std::fs::read_to_string(dir.join(&case.file)).expect("a case file");
        let verdict = Manifest::parse(&text).map(|_| ()).map_err(|e| e.code().as_str().to_owned());
        assert_eq!(verdict.err(), case.error, "{} ({})", case.file, case.rule);
        if case.error.is_none() {
            let value: serde_json::Value = serde_json::from_str(&text).expect("JSON");
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
