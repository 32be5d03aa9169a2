//! The committed suite is exactly what the generator writes: regenerating changes
//! no byte. A failure means the goldens are stale (the library's encoder or the
//! generator changed): rerun `cargo run -p tpde-conformance-generator -- conformance/`
//! and review the diff.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn files(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
    for entry in std::fs::read_dir(dir).expect("read a folder") {
        let path = entry.expect("an entry").path();
        if path.is_dir() {
            files(root, &path, out);
        } else {
            let bytes = std::fs::read(&path).expect("read a file");
            out.insert(path.strip_prefix(root).expect("under the root").to_path_buf(), bytes);
        }
    }
}

fn generated(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    for dir in ["valid", "invalid", "forward-compat"] {
        files(root, &root.join(dir), &mut out);
    }
    out.insert(PathBuf::from("manifest.json"), std::fs::read(root.join("manifest.json")).expect("the manifest"));
    out
}

#[test]
fn regenerating_the_suite_changes_no_byte() {
    let committed = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let scratch = tempfile::tempdir().expect("a temp dir");
    // The manifest's regression entries are carried over from the old manifest.
    std::fs::copy(committed.join("manifest.json"), scratch.path().join("manifest.json")).expect("copy the manifest");
    let status =
        Command::new(env!("CARGO_BIN_EXE_tpde-conformance-generator")).arg(scratch.path()).status().expect("runs");
    assert!(status.success());
    let (old, new) = (generated(&committed), generated(scratch.path()));
    let changed: Vec<_> = old.keys().chain(new.keys()).filter(|k| old.get(*k) != new.get(*k)).collect();
    assert!(changed.is_empty(), "stale goldens (regenerate them): {changed:?}");
}
