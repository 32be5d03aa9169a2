//! Paths that may be URLs: what a command or a binding opens or writes, local or
//! in an object store alike.

use std::path::{Path, PathBuf};

use tpde::{Checkpoint, DeltaFile, LayoutKind, Result, SourceFile, SourceTensor, TensorSource};

use crate::{is_url, LocalCopy, RemoteOutput};

/// The path as an object-store URL, if it is one.
#[must_use]
pub fn url_of(path: &Path) -> Option<&str> {
    path.to_str().filter(|text| is_url(text))
}

/// Opens a delta file, or a delta at a URL for reading by range
/// ([`crate::open_delta`]).
///
/// # Errors
/// As [`DeltaFile::open`] or [`crate::open_delta`].
pub fn open_delta_at(path: &Path) -> Result<DeltaFile> {
    match url_of(path) {
        Some(url) => crate::open_delta(url),
        None => DeltaFile::open(path),
    }
}

/// A checkpoint opened from a path, or from a URL with the local copy it was
/// downloaded to ([`crate::open_checkpoint`]), which lives as long as it.
pub struct OpenedCheckpoint {
    checkpoint: Checkpoint,
    download: Option<LocalCopy>,
}

impl OpenedCheckpoint {
    /// Opens the checkpoint at `path`, a file, a directory or a URL.
    ///
    /// # Errors
    /// As [`Checkpoint::open`] or [`crate::open_checkpoint`].
    pub fn open(path: &Path) -> Result<Self> {
        Ok(match url_of(path) {
            Some(url) => {
                let (checkpoint, dir) = crate::open_checkpoint(url)?.into_parts();
                Self { checkpoint, download: Some(dir) }
            }
            None => Self { checkpoint: Checkpoint::open(path)?, download: None },
        })
    }

    /// The checkpoint, and the local copy that must outlive it, if any.
    #[must_use]
    pub fn into_parts(self) -> (Checkpoint, Option<LocalCopy>) {
        (self.checkpoint, self.download)
    }
}

impl std::ops::Deref for OpenedCheckpoint {
    type Target = Checkpoint;
    fn deref(&self) -> &Checkpoint {
        &self.checkpoint
    }
}

// A base for `DeltaModel` (an `OwnedSource`) must own its local copy.
impl TensorSource for OpenedCheckpoint {
    fn origin(&self) -> &Path {
        TensorSource::origin(&self.checkpoint)
    }
    fn input_path(&self) -> Option<&Path> {
        TensorSource::input_path(&self.checkpoint)
    }
    fn kind(&self) -> LayoutKind {
        TensorSource::kind(&self.checkpoint)
    }
    fn files(&self) -> Vec<SourceFile<'_>> {
        TensorSource::files(&self.checkpoint)
    }
    fn index_json(&self) -> Option<&str> {
        TensorSource::index_json(&self.checkpoint)
    }
    fn tensor(&self, name: &str) -> Option<SourceTensor<'_>> {
        TensorSource::tensor(&self.checkpoint, name)
    }
    fn total_bytes(&self) -> u64 {
        TensorSource::total_bytes(&self.checkpoint)
    }
}

/// Where a verb writes its output: the path itself, or for a URL a local
/// temporary that [`OutputAt::finish`] uploads once it is complete.
pub struct OutputAt {
    local: PathBuf,
    remote: Option<RemoteOutput>,
}

impl OutputAt {
    /// For a URL, checks that nothing is there (unless `force`) and prepares the
    /// local temporary; a path is used as it is, and the verb checks it.
    ///
    /// # Errors
    /// As [`RemoteOutput::new`].
    pub fn new(out: &Path, force: bool) -> Result<Self> {
        Ok(match url_of(out) {
            Some(url) => {
                let remote = RemoteOutput::new(url, force)?;
                Self { local: remote.local_path().to_path_buf(), remote: Some(remote) }
            }
            None => Self { local: out.to_path_buf(), remote: None },
        })
    }

    /// Where the verb writes.
    #[must_use]
    pub fn local(&self) -> &Path {
        &self.local
    }

    /// Whether the verb may replace what is at [`OutputAt::local`]: only the path
    /// itself, under `force`; a temporary is new.
    #[must_use]
    pub fn force(&self, force: bool) -> bool {
        force && self.remote.is_none()
    }

    /// Uploads a remote output; nothing to do for a local one.
    ///
    /// # Errors
    /// As [`RemoteOutput::upload`].
    pub fn finish(self) -> Result<()> {
        if let Some(remote) = self.remote {
            remote.upload()?;
        }
        Ok(())
    }
}
