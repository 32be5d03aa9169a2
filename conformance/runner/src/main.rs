//! The conformance CLI contract of tpde, implemented with the Rust library.
//!
//! ```text
//! tpde-conformance decode DELTA [--base BASE]
//! ```
//!
//! On success it prints the canonical decode and exits 0:
//! `{"tensors":[{"dtype":"BF16","name":"x","sha256":"<hex>","shape":[2,3]},...]}`,
//! keys sorted, no whitespace, one trailing newline, tensors in header order; each
//! SHA-256 is computed from the rebuilt bytes. On a format or base error it prints
//! `{"error":"E_..."}` and exits 1. A usage error exits 2. See
//! `conformance/README.md`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tpde::pipeline::{self, NoProgress};
use tpde::{Checkpoint, DeltaFile};

const USAGE: &str = "usage: tpde-conformance decode DELTA [--base BASE]";

/// Rebuilds every tensor of `delta` and returns the canonical JSON line.
fn decode(delta: &Path, base: Option<&Path>) -> tpde::Result<String> {
    let delta = DeltaFile::open(delta)?;
    let base = base.map(Checkpoint::open).transpose()?;
    // Checks the base (names, dtypes, shapes, digests) and every checksum and digest
    // of the delta, in the library's order, before anything is printed.
    pipeline::apply::verify(&delta, base.as_ref(), None, &NoProgress)?;
    let mut tensors = Vec::new();
    for tensor in &delta.header().tensors {
        let base_bytes = match (&tensor.base, &base) {
            (Some(_), Some(base)) => base.tensor(&tensor.name).map(|(file, location)| file.tensor_bytes(location)),
            _ => None,
        };
        let bytes = delta.decode_tensor(tensor, base_bytes)?;
        tensors.push(json!({
            "dtype": tensor.dtype,
            "name": tensor.name,
            "sha256": hex::encode(Sha256::digest(&bytes)),
            "shape": tensor.shape,
        }));
    }
    Ok(canonical(&json!({ "tensors": tensors })))
}

/// Compact JSON with sorted keys (serde_json's map is ordered) and a newline.
fn canonical(value: &Value) -> String {
    let mut text = serde_json::to_string(value).expect("JSON values serialise");
    text.push('\n');
    text
}

fn parse_args(args: &[String]) -> Option<(PathBuf, Option<PathBuf>)> {
    let [command, rest @ ..] = args else { return None };
    if command != "decode" {
        return None;
    }
    let mut delta = None;
    let mut base = None;
    let mut it = rest.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--base" => base = Some(PathBuf::from(it.next()?)),
            flag if flag.starts_with("--") => return None,
            path if delta.is_none() => delta = Some(PathBuf::from(path)),
            _ => return None,
        }
    }
    Some((delta?, base))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((delta, base)) = parse_args(&args) else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    match decode(&delta, base.as_deref()) {
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
