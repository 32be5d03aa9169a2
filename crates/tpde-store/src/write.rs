//! Writing: an output is written locally as usual (to a temporary directory), then
//! uploaded; nothing appears at the URL until the whole object is there.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::stream::FuturesUnordered;
use futures::StreamExt;
use object_store::{PutMode, PutOptions, PutPayload};
use tpde::{Error, ErrorCode, Result};

use crate::errors::remote_error;
use crate::{runtime, Location};

/// Parts of a multipart upload; objects up to this size go in one PUT.
const PART: u64 = 16 << 20;
/// Parts in flight at once, so at most this many parts are held in memory.
const PARTS_IN_FLIGHT: usize = 8;
/// S3 allows 10,000 parts; larger objects get larger parts.
const MAX_PARTS: u64 = 9_000;

/// Set by [`abort_uploads`]: every upload stops and aborts.
static CANCEL: AtomicBool = AtomicBool::new(false);
/// Uploads running now.
static ACTIVE: AtomicUsize = AtomicUsize::new(0);

/// Stops every upload in progress, aborting its multipart upload so that the
/// store keeps no parts and nothing appears at its key, and waits (at most 30 s)
/// until they have. For a signal handler, before the process ends; uploads
/// started afterwards fail at once with `E_INTERRUPTED`. A process killed
/// outright (SIGKILL) cannot abort: its parts stay until the bucket's lifecycle
/// rule for incomplete multipart uploads removes them, and still nothing appears
/// at the key.
pub fn abort_uploads() {
    CANCEL.store(true, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(30);
    while ACTIVE.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Counts an upload as running while it lives.
struct Active;

impl Active {
    fn start() -> Self {
        ACTIVE.fetch_add(1, Ordering::SeqCst);
        Self
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        ACTIVE.fetch_sub(1, Ordering::SeqCst);
    }
}

fn interrupted(at: &Location) -> Error {
    Error::new(ErrorCode::Interrupted, "the upload was stopped and aborted; nothing was written at the URL")
        .in_file(&at.as_path())
}

/// Resolves once [`abort_uploads`] is called.
async fn cancelled() {
    while !CANCEL.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// An output bound for an object store: written to [`RemoteOutput::local_path`]
/// (a file, or a directory for a sharded target) by the usual atomic writers, then
/// uploaded by [`RemoteOutput::upload`]. The local copy is removed on drop.
pub struct RemoteOutput {
    at: Location,
    local: PathBuf,
    _dir: crate::LocalCopy,
}

impl std::fmt::Debug for RemoteOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteOutput").field("url", &self.at.url()).field("local", &self.local).finish()
    }
}

impl RemoteOutput {
    /// Prepares an output at `url`, refusing one that exists (an object at the key,
    /// or a sharded checkpoint's index under it) unless `force` is given. The check
    /// is made now, so a run fails before its work; an object that appears at the
    /// key meanwhile is replaced, as object stores have no rename.
    ///
    /// # Errors
    /// `E_OUTPUT_EXISTS`, `E_INVALID_ARGUMENT` for a URL without an object name,
    /// `E_REMOTE_*`, and `E_IO` for the local temporary directory.
    pub fn new(url: &str, force: bool) -> Result<Self> {
        let at = Location::parse(url)?;
        let Some(name) = at.file_name() else {
            return Err(Error::new(ErrorCode::InvalidArgument, "the output URL names no object").in_file(&at.as_path()));
        };
        if !force {
            for candidate in [at.clone(), at.child(tpde::INDEX_FILE)?] {
                match runtime().block_on(candidate.store.head(&candidate.path)) {
                    Ok(_) => {
                        return Err(Error::new(ErrorCode::OutputExists, "an object exists at the output URL")
                            .in_file(&candidate.as_path()))
                    }
                    Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => return Err(remote_error(&candidate, "cannot check the output", &e)),
                }
            }
        }
        let dir = crate::local_copy_dir(".tpde-upload-")?;
        let local = dir.path().join(name);
        Ok(Self { at, local, _dir: dir })
    }

    /// Where the output is to be written before [`RemoteOutput::upload`].
    #[must_use]
    pub fn local_path(&self) -> &Path {
        &self.local
    }

    /// The URL.
    #[must_use]
    pub fn url(&self) -> &str {
        self.at.url()
    }

    /// Uploads what was written at [`RemoteOutput::local_path`]: a file to the URL,
    /// or a directory's files under it as a prefix, the shards before
    /// `model.safetensors.index.json` (so the index appears last). Each object is
    /// one PUT up to 16 MiB, else a multipart upload that is aborted on any failure
    /// or on [`abort_uploads`]. Returns the bytes uploaded.
    ///
    /// # Errors
    /// `E_REMOTE_*`, `E_INTERRUPTED`, `E_IO` reading the local copy.
    pub fn upload(self) -> Result<u64> {
        let _active = Active::start();
        let meta = std::fs::metadata(&self.local).map_err(|e| Error::io(&self.local, "cannot read the output", e))?;
        let mut files: Vec<(PathBuf, Location)> = Vec::new();
        if meta.is_dir() {
            let mut names: Vec<String> = std::fs::read_dir(&self.local)
                .map_err(|e| Error::io(&self.local, "cannot list the output", e))?
                .map(|entry| {
                    entry
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .map_err(|e| Error::io(&self.local, "cannot list the output", e))
                })
                .collect::<Result<_>>()?;
            // The index last: a reader that finds it finds every shard.
            names.sort_by_key(|n| (n == tpde::INDEX_FILE, n.clone()));
            for name in names {
                files.push((self.local.join(&name), self.at.child(&name)?));
            }
        } else {
            files.push((self.local.clone(), self.at.clone()));
        }
        let mut total = 0;
        for (local, at) in &files {
            total += runtime().block_on(upload_file(local, at))?;
        }
        Ok(total)
    }
}

/// Uploads one file to `at`: one PUT, or a multipart upload aborted on failure.
async fn upload_file(local: &Path, at: &Location) -> Result<u64> {
    use std::os::unix::fs::FileExt as _;
    if CANCEL.load(Ordering::SeqCst) {
        return Err(interrupted(at));
    }
    let file = std::fs::File::open(local).map_err(|e| Error::io(local, "cannot open the output", e))?;
    let len = file.metadata().map_err(|e| Error::io(local, "cannot read the output", e))?.len();
    let read = |offset: u64, n: u64| -> Result<PutPayload> {
        let mut buf = vec![0u8; usize::try_from(n).expect("a part fits memory")];
        file.read_exact_at(&mut buf, offset).map_err(|e| Error::io(local, "cannot read the output", e))?;
        Ok(buf.into())
    };
    if len <= PART {
        let payload = read(0, len)?;
        let options = PutOptions { mode: PutMode::Overwrite, ..PutOptions::default() };
        tokio::select! {
            put = at.store.put_opts(&at.path, payload, options) => {
                put.map_err(|e| remote_error(at, "cannot upload", &e))?;
            }
            () = cancelled() => return Err(interrupted(at)),
        }
        return Ok(len);
    }
    let part = PART.max(len.div_ceil(MAX_PARTS));
    let mut upload =
        at.store.put_multipart(&at.path).await.map_err(|e| remote_error(at, "cannot start the upload", &e))?;
    let parts = async {
        let mut in_flight = FuturesUnordered::new();
        let mut offset = 0;
        while offset < len || !in_flight.is_empty() {
            if offset < len && in_flight.len() < PARTS_IN_FLIGHT {
                let n = part.min(len - offset);
                in_flight.push(upload.put_part(read(offset, n)?));
                offset += n;
                continue;
            }
            tokio::select! {
                done = in_flight.next() => {
                    if let Some(done) = done {
                        done.map_err(|e| remote_error(at, "cannot upload a part", &e))?;
                    }
                }
                () = cancelled() => return Err(interrupted(at)),
            }
        }
        Ok(())
    }
    .await;
    let completed = match parts {
        Ok(()) => tokio::select! {
            done = upload.complete() => done.map(|_| ()).map_err(|e| remote_error(at, "cannot complete the upload", &e)),
            () = cancelled() => Err(interrupted(at)),
        },
        Err(e) => Err(e),
    };
    if let Err(e) = completed {
        // The parts go; the key never saw the object. A failed abort leaves parts
        // for the bucket's lifecycle rule, which is all that can be done.
        let _ = upload.abort().await;
        return Err(e);
    }
    Ok(len)
}
