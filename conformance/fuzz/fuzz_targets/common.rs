//! Shared by the fuzz targets: `DeltaFile::open` takes a path, so each input is
//! written to one file per process in a memory-backed directory first.

use std::path::PathBuf;
use std::sync::OnceLock;

/// A per-process scratch directory, on tmpfs where there is one.
pub fn scratch() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let shm = PathBuf::from("/dev/shm");
        let root = if shm.is_dir() { shm } else { std::env::temp_dir() };
        let dir = root.join(format!("tpde-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the scratch directory");
        dir
    })
}

/// Writes `data` as the delta file to open.
#[allow(dead_code)] // `apply` validates its input in memory
pub fn delta_path(data: &[u8]) -> PathBuf {
    let path = scratch().join("input.tpde");
    std::fs::write(&path, data).expect("write the input");
    path
}
