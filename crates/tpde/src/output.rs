//! Outputs that appear whole or not at all: everything is written beside the final
//! path under a temporary name and renamed into place once complete and checked.
//! Temporary paths are registered so that a signal handler can remove them.

use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::error::{Error, ErrorCode, Result};

static PENDING: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn register(path: &Path) {
    PENDING.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(path.to_path_buf());
}

fn unregister(path: &Path) {
    PENDING.lock().unwrap_or_else(std::sync::PoisonError::into_inner).retain(|p| p != path);
}

/// Removes every temporary output still in progress. For signal handlers: the
/// process is about to exit without unwinding.
pub fn remove_pending_outputs() {
    let pending = std::mem::take(&mut *PENDING.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
    for path in pending {
        let _ = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
    }
}

/// Fails with `E_OUTPUT_EXISTS` unless `path` is free or `force` is set.
///
/// # Errors
/// `E_OUTPUT_EXISTS`.
pub fn check_free(path: &Path, force: bool) -> Result<()> {
    if !force && path.symlink_metadata().is_ok() {
        return Err(Error::new(ErrorCode::OutputExists, "the output already exists").in_file(path));
    }
    Ok(())
}

fn temp_name(path: &Path) -> Result<PathBuf> {
    let name = path
        .file_name()
        .ok_or_else(|| Error::new(ErrorCode::InvalidArgument, "the output has no file name").in_file(path))?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut temp = std::ffi::OsString::from(".");
    temp.push(name);
    temp.push(format!(".tpde-tmp-{}", std::process::id()));
    Ok(parent.join(temp))
}

/// A file being written under a temporary name.
#[derive(Debug)]
pub struct PendingFile {
    temp: PathBuf,
    target: PathBuf,
    writer: Option<BufWriter<File>>,
    committed: bool,
}

impl PendingFile {
    /// Starts writing what will become `target`.
    ///
    /// # Errors
    /// `E_IO` when the temporary file cannot be created.
    pub fn create(target: &Path) -> Result<Self> {
        let temp = temp_name(target)?;
        let file = File::create(&temp).map_err(|e| Error::io(&temp, "cannot create the output", e))?;
        register(&temp);
        Ok(Self {
            temp,
            target: target.to_path_buf(),
            writer: Some(BufWriter::with_capacity(1 << 20, file)),
            committed: false,
        })
    }

    fn writer(&mut self) -> &mut BufWriter<File> {
        self.writer.as_mut().expect("present until finished")
    }

    /// Appends bytes.
    ///
    /// # Errors
    /// `E_IO`, for example when the disk is full.
    pub fn write_all(&mut self, bytes: &[u8]) -> Result<()> {
        let temp = self.temp.clone();
        self.writer().write_all(bytes).map_err(|e| Error::io(&temp, "cannot write the output", e))
    }

    /// Overwrites bytes at `offset` and returns to the end.
    ///
    /// # Errors
    /// `E_IO`.
    pub fn write_at(&mut self, offset: u64, bytes: &[u8]) -> Result<()> {
        let temp = self.temp.clone();
        let io = |e| Error::io(&temp, "cannot write the output", e);
        let writer = self.writer();
        writer.seek(SeekFrom::Start(offset)).map_err(io)?;
        writer.write_all(bytes).map_err(io)?;
        writer.seek(SeekFrom::End(0)).map_err(io)?;
        Ok(())
    }

    /// Flushes and syncs the file, then renames it into place (replacing what is
    /// there, which the caller allowed with `force`).
    ///
    /// # Errors
    /// `E_IO`.
    pub fn commit(mut self) -> Result<()> {
        let temp = self.temp.clone();
        let io = |e| Error::io(&temp, "cannot finish the output", e);
        let file = self.writer.take().expect("present until finished").into_inner().map_err(|e| io(e.into_error()))?;
        file.sync_all().map_err(io)?;
        drop(file);
        std::fs::rename(&self.temp, &self.target)
            .map_err(|e| Error::io(&self.target, "cannot rename the output into place", e))?;
        unregister(&self.temp);
        self.committed = true;
        Ok(())
    }

    /// The final path.
    #[must_use]
    pub fn target(&self) -> &Path {
        &self.target
    }
}

impl Drop for PendingFile {
    fn drop(&mut self) {
        if !self.committed {
            // Dropping the writer first closes the file; a failed flush is moot.
            self.writer = None;
            let _ = std::fs::remove_file(&self.temp);
            unregister(&self.temp);
        }
    }
}

/// A directory being filled under a temporary name.
#[derive(Debug)]
pub struct PendingDir {
    temp: PathBuf,
    target: PathBuf,
    done: bool,
}

impl PendingDir {
    /// Starts filling what will become the directory `target`.
    ///
    /// # Errors
    /// `E_IO`.
    pub fn create(target: &Path) -> Result<Self> {
        let temp = temp_name(target)?;
        if temp.exists() {
            std::fs::remove_dir_all(&temp)
                .map_err(|e| Error::io(&temp, "cannot clear a stale temporary directory", e))?;
        }
        std::fs::create_dir(&temp).map_err(|e| Error::io(&temp, "cannot create the output directory", e))?;
        register(&temp);
        Ok(Self { temp, target: target.to_path_buf(), done: false })
    }

    /// Where a file of the directory is written while it is pending.
    #[must_use]
    pub fn path_of(&self, name: &str) -> PathBuf {
        self.temp.join(name)
    }

    /// Renames the directory into place, replacing an existing one.
    ///
    /// # Errors
    /// `E_IO`.
    pub fn commit(mut self) -> Result<()> {
        if self.target.symlink_metadata().is_ok() {
            let old = if self.target.is_dir() {
                std::fs::remove_dir_all(&self.target)
            } else {
                std::fs::remove_file(&self.target)
            };
            old.map_err(|e| Error::io(&self.target, "cannot replace the existing output", e))?;
        }
        std::fs::rename(&self.temp, &self.target)
            .map_err(|e| Error::io(&self.target, "cannot rename the output into place", e))?;
        unregister(&self.temp);
        self.done = true;
        Ok(())
    }
}

impl Drop for PendingDir {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_dir_all(&self.temp);
            unregister(&self.temp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the command's Ctrl-C handler calls: every output still being written
    /// disappears, files and directories alike.
    #[test]
    fn pending_outputs_are_removed_on_demand() {
        let dir = tempfile::tempdir().unwrap();
        let mut file = PendingFile::create(&dir.path().join("out.safetensors")).unwrap();
        file.write_all(b"partial").unwrap();
        let shards = PendingDir::create(&dir.path().join("out-dir")).unwrap();
        std::fs::write(shards.path_of("model-00001-of-00002.safetensors"), b"partial").unwrap();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
        remove_pending_outputs();
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "nothing is left behind");
        drop((file, shards));
    }
}
