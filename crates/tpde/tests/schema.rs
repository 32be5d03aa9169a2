//! The committed JSON Schema of the header (`spec/tpde.schema.json`) is the one the
//! header types generate, and the example headers under `spec/examples/headers` are
//! judged alike by this crate's rules (spec §5) and by an independent validator
//! reading the committed schema.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use tpde::{
    format::{parse_strict, Header},
    ErrorCode,
};

/// Each invalid example, named after its fault, and the code the reader gives it.
const INVALID: &[(&str, ErrorCode)] = &[
    ("chunk-words-zero.json", ErrorCode::LimitExceeded),
    ("digest-not-lowercase-hex.json", ErrorCode::HeaderInvalid),
    ("file-name-with-directory.json", ErrorCode::HeaderInvalid),
    ("unknown-field.json", ErrorCode::HeaderInvalid),
];

fn spec_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../spec")
}

fn generated_schema() -> String {
    let schema = schemars::schema_for!(Header);
    let mut text = serde_json::to_string_pretty(&schema).expect("a schema serialises");
    text.push('\n');
    text
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// The names of the `.json` files in `dir`, sorted.
fn examples(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|entry| entry.expect("a directory entry").file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".json"))
        .collect()
}

/// What the reader says about a header on its own: strict parsing, then every rule
/// of `Header::validate`, with the chunk count that the tensors claim.
fn reader_verdict(text: &str) -> Result<(), ErrorCode> {
    let header: Header = parse_strict(text, "header").map_err(|e| e.code())?;
    let chunks = header.tensors.iter().fold(0u64, |sum, t| sum.saturating_add(t.chunk_count));
    header.validate(chunks).map_err(|e| e.code())
}

fn schema_validator() -> jsonschema::Validator {
    let schema: serde_json::Value =
        serde_json::from_str(&read(&spec_dir().join("tpde.schema.json"))).expect("the committed schema is JSON");
    jsonschema::draft7::new(&schema).expect("the committed schema is a valid draft-07 schema")
}

#[test]
fn committed_schema_matches_the_header_types() {
    let path = spec_dir().join("tpde.schema.json");
    let generated = generated_schema();
    if std::env::var_os("TPDE_BLESS").is_some_and(|v| v == "1") {
        std::fs::write(&path, &generated).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "spec/tpde.schema.json differs from the schema the header types generate; \
         if the change to the types is intended, run `TPDE_BLESS=1 cargo test -p tpde --test schema` \
         and commit the regenerated file"
    );
}

#[test]
fn valid_examples_pass_the_reader_and_the_schema() {
    let dir = spec_dir().join("examples/headers/valid");
    let names = examples(&dir);
    assert!(!names.is_empty(), "no valid examples in {}", dir.display());
    let validator = schema_validator();
    for name in names {
        let text = read(&dir.join(&name));
        assert_eq!(reader_verdict(&text), Ok(()), "the reader rejects valid/{name}");
        let instance: serde_json::Value = serde_json::from_str(&text).expect("an example is JSON");
        let errors: Vec<String> = validator.iter_errors(&instance).map(|e| e.to_string()).collect();
        assert!(errors.is_empty(), "the schema rejects valid/{name}: {errors:?}");
    }
}

#[test]
fn invalid_examples_fail_the_reader_and_the_schema() {
    let dir = spec_dir().join("examples/headers/invalid");
    let listed: BTreeSet<String> = INVALID.iter().map(|(name, _)| (*name).to_owned()).collect();
    assert_eq!(examples(&dir), listed, "invalid/ and the INVALID table must name the same files");
    let validator = schema_validator();
    for &(name, code) in INVALID {
        let text = read(&dir.join(name));
        assert_eq!(reader_verdict(&text), Err(code), "the reader's verdict on invalid/{name}");
        let instance: serde_json::Value = serde_json::from_str(&text).expect("an example is JSON");
        assert!(!validator.is_valid(&instance), "the schema accepts invalid/{name}");
    }
}
