//! The GPU loader checks the base with the format library before anything
//! reaches the device: [`tpde_cuda::host_bases`] is the library's
//! `resolve_base` (names, dtypes, shapes, then every digest, spec §11.2).
//! No GPU is needed: the check runs on the host, before any upload.

use std::path::{Path, PathBuf};

use tpde::{Checkpoint, DeltaFile, ErrorCode};
use tpde_cuda::host_bases;

fn suite(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../conformance").join(path)
}

/// A base that differs from the one the delta was made against was matched
/// by tensor name only, and gave wrong weights on the GPU with no error.
#[test]
fn a_wrong_base_is_refused_with_the_library_code() {
    let delta = DeltaFile::open(&suite("valid/mixed/delta.tpde")).unwrap();
    let right = Checkpoint::open(&suite("valid/mixed/base.safetensors")).unwrap();
    assert_eq!(host_bases(&delta, Some(&right)).unwrap().len(), delta.header().tensors.len());
    for (base, code) in [
        ("invalid/bases/base-digest-mismatch.safetensors", ErrorCode::BaseDigest),
        ("invalid/bases/base-shape-mismatch.safetensors", ErrorCode::BaseMismatch),
        ("invalid/bases/base-dtype-mismatch.safetensors", ErrorCode::BaseMismatch),
        ("invalid/bases/base-missing-tensor.safetensors", ErrorCode::BaseMissingTensor),
    ] {
        let wrong = Checkpoint::open(&suite(base)).unwrap();
        let e = host_bases(&delta, Some(&wrong)).expect_err(base);
        assert_eq!(e.format_code(), Some(code), "{base}: {e}");
    }
    let e = host_bases(&delta, None).expect_err("no base");
    assert_eq!(e.format_code(), Some(ErrorCode::BaseRequired));
}
