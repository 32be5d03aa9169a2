//! The canonical decode of the tpde conformance contract (`conformance/README.md`,
//! spec §11.4), implemented with the Rust library. The `tpde-conformance` binary
//! prints it; the library's own tests compare it with the golden files.

use std::path::Path;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tpde::{Checkpoint, DeltaFile, NoProgress};

/// Rebuilds every tensor of `delta` and returns the canonical JSON line.
pub fn decode(delta: &Path, base: Option<&Path>) -> tpde::Result<String> {
    let delta = DeltaFile::open(delta)?;
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
