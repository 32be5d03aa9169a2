//! Object stores for tpde: deltas and checkpoints read from, and outputs written to,
//! `s3://`, `gs://`, `az://` (and `abfs://`) and `http(s)://` URLs, through the
//! [`object_store`] crate and each store's standard credential chain (for S3,
//! `AmazonS3Builder::from_env`: `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
//! `AWS_SESSION_TOKEN`, `AWS_REGION`, `AWS_ENDPOINT_URL`, `AWS_ALLOW_HTTP`, web
//! identity, container and instance credentials).
//!
//! - A delta is read by range ([`open_delta`]): its preamble, header and chunk map
//!   at open, and each chunk's stored bytes before it is decoded, adjacent chunks
//!   in one request and many requests in flight. Every read after the first
//!   carries the object's ETag (`If-Match`) and version, so an object replaced
//!   meanwhile is `E_REMOTE_CHANGED`; the checksums catch what slips through.
//! - A checkpoint is downloaded whole, by parallel ranges, into a temporary
//!   directory ([`open_checkpoint`]): it is memory-mapped like a local one.
//! - An output is written to a local temporary, then uploaded ([`RemoteOutput`]):
//!   by multipart upload above one part, which is aborted on any failure or when
//!   [`abort_uploads`] is called (the command calls it on Ctrl-C), so nothing
//!   appears at the key unless the whole object was written.
//! - Requests are retried with exponential backoff (object_store's `RetryConfig`:
//!   10 retries within 3 minutes by default; `TPDE_REMOTE_RETRIES` sets the count).
//!
//! Errors keep tpde's stable codes: `E_REMOTE_CREDENTIALS`, `E_REMOTE_DENIED`,
//! `E_REMOTE_NOT_FOUND`, `E_REMOTE_CHANGED` and `E_REMOTE_RETRIES`, each naming
//! the URL.
#![deny(missing_docs)]

mod errors;
mod location;
mod paths;
mod read;
mod write;

pub use location::{is_url, Location};
pub use paths::{open_delta_at, url_of, OpenedCheckpoint, OutputAt};
pub use read::{open_checkpoint, open_delta, stats, RemoteCheckpoint, Stats};
pub use write::{abort_uploads, RemoteOutput};

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

/// Local directories of downloads and of outputs before their upload, while they
/// exist: a process ended by a signal runs no destructor, so its handler removes
/// them ([`remove_local_copies`]).
static LOCAL_COPIES: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// A temporary directory under `TMPDIR` for local copies, registered for
/// [`remove_local_copies`].
fn local_copy_dir(prefix: &str) -> tpde::Result<LocalCopy> {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .map_err(|e| tpde::Error::io(&std::env::temp_dir(), "cannot create a temporary directory", e))?;
    LOCAL_COPIES.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(dir.path().to_path_buf());
    Ok(LocalCopy(Some(dir)))
}

/// A temporary directory of local copies, removed on drop.
pub struct LocalCopy(Option<tempfile::TempDir>);

impl LocalCopy {
    /// The directory.
    #[must_use]
    pub fn path(&self) -> &Path {
        self.0.as_ref().map_or(Path::new(""), tempfile::TempDir::path)
    }
}

impl Drop for LocalCopy {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            let path = dir.path().to_path_buf();
            let _ = dir.close();
            LOCAL_COPIES.lock().unwrap_or_else(std::sync::PoisonError::into_inner).retain(|p| *p != path);
        }
    }
}

/// Removes the local copies of downloaded checkpoints and of outputs not yet
/// uploaded: for a signal handler, before the process ends (after
/// [`abort_uploads`]).
pub fn remove_local_copies() {
    let dirs = std::mem::take(&mut *LOCAL_COPIES.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
    for dir in dirs {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// The runtime that drives every request. Its threads only wait on sockets; the
/// work stays on the caller's threads (rayon's, for decoding).
fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("tpde-store")
            .enable_all()
            .build()
            // Fails only when the OS refuses threads or an event queue at start.
            .expect("the object store runtime starts")
    })
}
