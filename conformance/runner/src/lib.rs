//! The canonical decode of the tpde conformance contract (`conformance/README.md`,
//! spec §11.4), implemented with the Rust library. The `tpde-conformance` binary
//! prints it; the library's own tests compare it with the golden files.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tpde::{Checkpoint, DeltaFile, NoProgress};

/// Rebuilds every tensor of `delta` and returns the canonical JSON line.
pub fn decode(delta: &Path, base: Option<&Path>) -> tpde::Result<String> {
    decode_with_references(delta, base, &[])
}

/// Opens a delta with its chain of reference deltas (spec §11.2 R0): `references[0]`
/// is the delta's reference, `references[1]` that file's, and so on.
pub fn open_chain(delta: &Path, references: &[PathBuf]) -> tpde::Result<DeltaFile> {
    DeltaFile::open(delta)?.with_reference_chain(references)
}

/// As [`decode`], with the delta's chain of reference deltas (see [`open_chain`]).
pub fn decode_with_references(delta: &Path, base: Option<&Path>, references: &[PathBuf]) -> tpde::Result<String> {
    let delta = open_chain(delta, references)?;
    let base = base.map(Checkpoint::open).transpose()?;
    // Checks the base (names, dtypes, shapes, digests) and every checksum and digest
    // of the delta, in the library's order, before anything is printed.
    tpde::verify(&delta, base.as_ref(), None, &NoProgress)?;
    let mut tensors = Vec::new();
    for tensor in &delta.header().tensors {
        let base_bytes = match (&tensor.base, &base) {
            (Some(_), Some(base)) => base.tensor(&tensor.name).map(|(file, location)| file.tensor_bytes(location)),
            _ => None,
        };
        let bytes = delta.decode_tensor(tensor, base_bytes)?;
        tensors.push(json!({
            "dtype": tensor.dtype_name,
            "name": tensor.name,
            "sha256": hex::encode(Sha256::digest(&bytes)),
            "shape": tensor.shape,
        }));
    }
    Ok(canonical(&json!({ "tensors": tensors })))
}

/// Compact JSON with sorted keys (serde_json's map is ordered) and a newline.
pub fn canonical(value: &Value) -> String {
    let mut text = serde_json::to_string(value).expect("JSON values serialise");
    text.push('\n');
    text
}
