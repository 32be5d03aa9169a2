//! The conformance CLI contract of tpde, implemented with the Rust library.
//!
//! ```text
//! tpde-conformance decode DELTA [--base BASE] [--reference REF]...
//! ```
//!
//! The first `--reference` is the delta's reference delta (spec §8.3, coding 3),
//! the next one that file's, and so on.
//!
//! On success it prints the canonical decode and exits 0:
//! `{"tensors":[{"dtype":"BF16","name":"x","sha256":"<hex>","shape":[2,3]},...]}`,
//! keys sorted, no whitespace, one trailing newline, tensors in header order; each
//! SHA-256 is computed from the rebuilt bytes. On a format or base error it prints
//! `{"error":"E_..."}` and exits 1. A usage error exits 2. See
//! `conformance/README.md`.

use std::path::PathBuf;
use std::process::ExitCode;

use serde_json::json;
use tpde_conformance::{canonical, decode_with_references};

const USAGE: &str = "usage: tpde-conformance decode DELTA [--base BASE] [--reference REF]...";

type Args = (PathBuf, Option<PathBuf>, Vec<PathBuf>);

fn parse_args(args: &[String]) -> Option<Args> {
    let [command, rest @ ..] = args else { return None };
    if command != "decode" {
        return None;
    }
    let mut delta = None;
    let mut base = None;
    let mut references = Vec::new();
    let mut it = rest.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--base" => base = Some(PathBuf::from(it.next()?)),
            "--reference" => references.push(PathBuf::from(it.next()?)),
            flag if flag.starts_with("--") => return None,
            path if delta.is_none() => delta = Some(PathBuf::from(path)),
            _ => return None,
        }
    }
    Some((delta?, base, references))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((delta, base, references)) = parse_args(&args) else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    match decode_with_references(&delta, base.as_deref(), &references) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            print!("{}", canonical(&json!({ "error": err.code().as_str() })));
            eprintln!("tpde-conformance: {err}");
            ExitCode::from(1)
        }
    }
}
