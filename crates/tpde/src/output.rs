//! Outputs that appear whole or not at all: everything is written beside the final
//! path under a temporary name and renamed into place once complete and checked
//! (spec §11.3).
//!
//! - Temporaries are created exclusively (`O_CREAT | O_EXCL`, so a planted symlink is
//!   never followed) under an unpredictable name, `.tpde-tmp-PID-RANDOM`, that does
//!   not grow with the output's name. The PID lets a later run tell a dead process's
//!   leftover from a live one's ([`remove_stale_temporaries`]).
//! - The final rename never replaces what appeared at the output meanwhile unless
//!   replacing was asked for (`--force`).
//! - With `--force`, an existing directory is replaced only when it holds nothing but
//!   a checkpoint: the index file `model.safetensors.index.json`, the shard files
//!   its `weight_map` names, and tpde temporaries, all regular files. Anything else
//!   (a subdirectory, a symlink, another file) makes it `E_OUTPUT_EXISTS`, so that
//!   replacing an output never removes a file that tpde did not write.
//! - Temporary paths are registered so that a signal handler can remove them.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use tempfile::{TempDir, TempPath};

use crate::checkpoint::INDEX_FILE;
use crate::error::{Error, ErrorCode, Result};

/// The start of every temporary name; the writing process's ID and a random part
/// follow.
pub const TEMP_PREFIX: &str = ".tpde-tmp-";

/// Temporaries still being written. Creations and commits hold the lock, so a
/// signal handler sees each output either complete in place or still temporary.
struct Registry {
    paths: Vec<PathBuf>,
    /// Set by [`remove_pending_outputs`]: the process is exiting, and nothing more
    /// is created or committed.
    closed: bool,
}

static PENDING: Mutex<Registry> = Mutex::new(Registry { paths: Vec::new(), closed: false });

fn pending() -> MutexGuard<'static, Registry> {
    PENDING.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The registry, unless the process is exiting.
fn open_registry(target: &Path) -> Result<MutexGuard<'static, Registry>> {
    let registry = pending();
    if registry.closed {
        return Err(Error::new(ErrorCode::Io, "interrupted: no output is written any more").in_file(target));
    }
    Ok(registry)
}

fn unregister(registry: &mut Registry, path: &Path) {
    registry.paths.retain(|p| p != path);
}

/// Removes every temporary output still in progress, and makes every later creation
/// or commit of an output fail. For signal handlers: the process is about to exit
/// without unwinding.
pub fn remove_pending_outputs() {
    let mut registry = pending();
    registry.closed = true;
    // Newest first: a file inside a pending directory goes before the directory.
    for path in registry.paths.drain(..).rev() {
        let _ = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
    }
}

/// What an output is: a single file, or a directory of shards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputKind {
    /// A single file.
    File,
    /// A directory holding a sharded checkpoint.
    Directory,
}

fn exists_error(path: &Path, message: &str) -> Error {
    Error::new(ErrorCode::OutputExists, message).in_file(path)
}

/// Fails with `E_OUTPUT_EXISTS` unless `path` is free, or `force` is set and what is
/// there may be replaced: a file, or a directory holding nothing but a checkpoint.
///
/// # Errors
/// `E_OUTPUT_EXISTS`, or `E_IO` when a directory at `path` cannot be read.
pub fn check_free(path: &Path, force: bool) -> Result<()> {
    check_replaceable(path, force, None)
}

/// Like [`check_free`], for an output of a known kind: a file replaces only a file,
/// a directory only a directory.
///
/// # Errors
/// `E_OUTPUT_EXISTS`, or `E_IO` when a directory at `path` cannot be read.
pub fn check_output(path: &Path, force: bool, kind: OutputKind) -> Result<()> {
    check_replaceable(path, force, Some(kind))
}

fn check_replaceable(path: &Path, force: bool, kind: Option<OutputKind>) -> Result<()> {
    let Ok(metadata) = path.symlink_metadata() else { return Ok(()) };
    if !force {
        return Err(exists_error(path, "the output already exists"));
    }
    if metadata.is_dir() {
        if kind == Some(OutputKind::File) {
            return Err(exists_error(path, "the output is a directory; --force replaces only a file with a file"));
        }
        if !holds_only_checkpoint_files(path)? {
            return Err(exists_error(
                path,
                "the output directory holds files that tpde does not write; --force replaces only a directory \
                 holding nothing but a checkpoint (its index and the shards the index names)",
            ));
        }
    } else if kind == Some(OutputKind::Directory) {
        return Err(exists_error(path, "the output is not a directory; a sharded target replaces only a directory"));
    }
    Ok(())
}

/// The shard files that the index file of `dir` names in its `weight_map`; none
/// when there is no index, or one that does not parse.
fn shards_named_by_index(dir: &Path) -> HashSet<String> {
    let Ok(text) = std::fs::read(dir.join(INDEX_FILE)) else { return HashSet::new() };
    let Ok(index) = serde_json::from_slice::<serde_json::Value>(&text) else { return HashSet::new() };
    let Some(weight_map) = index.get("weight_map").and_then(serde_json::Value::as_object) else {
        return HashSet::new();
    };
    weight_map.values().filter_map(serde_json::Value::as_str).map(str::to_owned).collect()
}

/// Whether `name` is a file that tpde writes into a checkpoint directory: the index,
/// a tpde temporary, or a `*.safetensors` shard (with `shards`, one named there).
fn is_written_by_tpde(name: &std::ffi::OsStr, shards: Option<&HashSet<String>>) -> bool {
    name.to_str().is_some_and(|name| {
        name == INDEX_FILE
            || temp_owner_pid(std::ffi::OsStr::new(name)).is_some()
            || (name.ends_with(".safetensors") && shards.is_none_or(|shards| shards.contains(name)))
    })
}

/// Whether `dir` holds nothing but a checkpoint: regular files only, each the
/// index, a shard that the index names, or a tpde temporary. Symlinks,
/// subdirectories and any other file make it something else.
fn holds_only_checkpoint_files(dir: &Path) -> Result<bool> {
    let io = |e| Error::io(dir, "cannot read the output directory", e);
    let shards = shards_named_by_index(dir);
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        if !entry.file_type().map_err(io)?.is_file() || !is_written_by_tpde(&entry.file_name(), Some(&shards)) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Removes the checkpoint files of `dir`, then `dir` if nothing else is left in it.
/// Returns whether `dir` is gone. Anything tpde did not write stays where it is.
/// With `indexed_only`, a shard must be named by the index to count as written by
/// tpde; without, any `*.safetensors` file does (for a directory tpde created).
fn remove_checkpoint_dir(dir: &Path, indexed_only: bool) -> std::io::Result<bool> {
    let shards = indexed_only.then(|| shards_named_by_index(dir));
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_file() && is_written_by_tpde(&entry.file_name(), shards.as_ref()) {
            std::fs::remove_file(entry.path())?;
        }
    }
    match std::fs::remove_dir(dir) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::DirectoryNotEmpty => Ok(false),
        Err(e) => Err(e),
    }
}

/// The directory an output is created in, checking that it has a file name.
fn parent_of(path: &Path) -> Result<&Path> {
    if path.file_name().is_none() {
        return Err(Error::new(ErrorCode::InvalidArgument, "the output has no file name").in_file(path));
    }
    Ok(match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    })
}

/// `.tpde-tmp-PID-`: a fixed length, whatever the output's name, so that an output
/// name of up to 255 bytes still has a temporary name that fits.
fn temp_builder_prefix() -> String {
    format!("{TEMP_PREFIX}{}-", std::process::id())
}

/// Creates temporaries named `.tpde-tmp-PID-RANDOM`. `tempfile` creates them
/// exclusively (`O_CREAT | O_EXCL`, exclusive `mkdir`), retrying on a clash. The
/// mode is what `File::create` and `create_dir` give (0666 and 0777 less the umask),
/// since the temporary becomes the output.
fn temp_builder(prefix: &str, mode: u32) -> tempfile::Builder<'_, 'static> {
    let mut builder = tempfile::Builder::new();
    builder.prefix(prefix).rand_bytes(12);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        builder.permissions(std::fs::Permissions::from_mode(mode));
    }
    #[cfg(not(unix))]
    let _ = mode;
    builder
}

/// A file being written under a temporary name.
#[derive(Debug)]
pub struct PendingFile {
    /// `None` once committed.
    temp: Option<TempPath>,
    target: PathBuf,
    replace: bool,
    sync: bool,
    writer: Option<BufWriter<File>>,
}

impl PendingFile {
    /// Starts writing what will become `target`, which must not exist when
    /// [`PendingFile::commit`] renames the file into place.
    ///
    /// # Errors
    /// `E_IO` when the temporary file cannot be created.
    pub fn create(target: &Path) -> Result<Self> {
        Self::create_with(target, false)
    }

    /// Like [`PendingFile::create`]; with `replace`, the commit replaces a file at
    /// `target` (never a directory).
    ///
    /// # Errors
    /// `E_IO` when the temporary file cannot be created.
    pub fn create_with(target: &Path, replace: bool) -> Result<Self> {
        let parent = parent_of(target)?;
        let prefix = temp_builder_prefix();
        let mut registry = open_registry(target)?;
        let file = temp_builder(&prefix, 0o666)
            .tempfile_in(parent)
            .map_err(|e| Error::io(target, "cannot create the output", e))?;
        let (file, temp) = file.into_parts();
        registry.paths.push(temp.to_path_buf());
        Ok(Self {
            temp: Some(temp),
            target: target.to_path_buf(),
            replace,
            sync: true,
            writer: Some(BufWriter::with_capacity(1 << 20, file)),
        })
    }

    /// Whether [`PendingFile::commit`] syncs the file to storage before renaming it
    /// (the default). Without it, a crash soon after may leave an empty or partial
    /// file at the target on some file systems; the rename is still atomic.
    #[must_use]
    pub fn synced(mut self, sync: bool) -> Self {
        self.sync = sync;
        self
    }

    fn writer(&mut self) -> &mut BufWriter<File> {
        self.writer.as_mut().expect("present until finished")
    }

    /// Appends bytes.
    ///
    /// # Errors
    /// `E_IO`, for example when the disk is full.
    pub fn write_all(&mut self, bytes: &[u8]) -> Result<()> {
        let target = self.target.clone();
        self.writer().write_all(bytes).map_err(|e| Error::io(&target, "cannot write the output", e))
    }

    /// Overwrites bytes at `offset` and returns to the end.
    ///
    /// # Errors
    /// `E_IO`.
    pub fn write_at(&mut self, offset: u64, bytes: &[u8]) -> Result<()> {
        let target = self.target.clone();
        let io = |e| Error::io(&target, "cannot write the output", e);
        let writer = self.writer();
        writer.seek(SeekFrom::Start(offset)).map_err(io)?;
        writer.write_all(bytes).map_err(io)?;
        writer.seek(SeekFrom::End(0)).map_err(io)?;
        Ok(())
    }

    /// Flushes and syncs the file, then renames it into place. Without `replace`,
    /// the rename fails if anything appeared at the target meanwhile.
    ///
    /// # Errors
    /// `E_OUTPUT_EXISTS` when something is in the way, `E_IO`.
    pub fn commit(mut self) -> Result<()> {
        let io = |e| Error::io(&self.target, "cannot finish the output", e);
        let file = self.writer.take().expect("present until finished").into_inner().map_err(|e| io(e.into_error()))?;
        if self.sync {
            file.sync_all().map_err(io)?;
        }
        drop(file);
        let temp = self.temp.take().expect("present until committed");
        let temp_path = temp.to_path_buf();
        let persisted = {
            let mut registry = open_registry(&self.target)?;
            // `persist_noclobber` uses renameat2(RENAME_NOREPLACE) where the system has
            // it and link-then-unlink elsewhere; either fails if the target exists.
            let persisted =
                if self.replace { replace_file(temp, &self.target) } else { temp.persist_noclobber(&self.target) };
            unregister(&mut registry, &temp_path);
            persisted
        };
        persisted.map_err(|e| {
            // Dropping the returned path removes the temporary.
            let err = e.error;
            if err.kind() == std::io::ErrorKind::AlreadyExists || self.target.is_dir() {
                exists_error(&self.target, "something appeared at the output while it was being written")
            } else {
                Error::io(&self.target, "cannot rename the output into place", err)
            }
        })
    }
}

impl Drop for PendingFile {
    fn drop(&mut self) {
        // Close the file first; dropping `TempPath` then removes it.
        self.writer = None;
        if let Some(temp) = self.temp.take() {
            let path = temp.to_path_buf();
            drop(temp);
            unregister(&mut pending(), &path);
        }
    }
}

/// Puts the file `temp` in place of `target`, whatever is there. A regular file
/// there is swapped out in one atomic exchange and then removed, rather than
/// renamed over: ext4 writes back every page of a file renamed over another before
/// the rename returns (`auto_da_alloc`), 0.2 s for a 512 MB output that was not
/// asked to sync, and readers still see the old file or the new one, never neither.
fn replace_file(temp: TempPath, target: &Path) -> std::result::Result<(), tempfile::PathPersistError> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if target.symlink_metadata().is_ok_and(|m| m.file_type().is_file()) {
        use rustix::fs::{renameat_with, RenameFlags, CWD};
        use rustix::io::Errno;
        match renameat_with(CWD, &*temp, CWD, target, RenameFlags::EXCHANGE) {
            // `temp` now names the old file, and dropping it removes that.
            Ok(()) => return Ok(()),
            // The file went meanwhile, or the file system cannot exchange: a rename.
            Err(Errno::NOENT | Errno::INVAL | Errno::NOSYS | Errno::OPNOTSUPP) => {}
            Err(e) => return Err(tempfile::PathPersistError { error: e.into(), path: temp }),
        }
    }
    temp.persist(target)
}

/// A directory being filled under a temporary name.
#[derive(Debug)]
pub struct PendingDir {
    temp: Option<TempDir>,
    target: PathBuf,
    replace: bool,
}

impl PendingDir {
    /// Starts filling what will become the directory `target`; with `replace`, the
    /// commit replaces a directory at `target` that holds nothing but a checkpoint,
    /// and without it `target` must not exist when [`PendingDir::commit`] renames
    /// the directory into place.
    ///
    /// # Errors
    /// `E_IO`.
    pub fn create_with(target: &Path, replace: bool) -> Result<Self> {
        let parent = parent_of(target)?;
        let prefix = temp_builder_prefix();
        let mut registry = open_registry(target)?;
        let temp = temp_builder(&prefix, 0o777)
            .tempdir_in(parent)
            .map_err(|e| Error::io(target, "cannot create the output directory", e))?;
        registry.paths.push(temp.path().to_path_buf());
        Ok(Self { temp: Some(temp), target: target.to_path_buf(), replace })
    }

    fn temp(&self) -> &Path {
        self.temp.as_ref().expect("present until committed").path()
    }

    /// Where a file of the directory is written while it is pending.
    #[must_use]
    pub fn path_of(&self, name: &str) -> PathBuf {
        self.temp().join(name)
    }

    /// Renames the directory into place. Without `replace`, fails if anything
    /// appeared at the target meanwhile; with it, replaces a directory that holds
    /// nothing but a checkpoint.
    ///
    /// # Errors
    /// `E_OUTPUT_EXISTS` when something is in the way, `E_IO`.
    pub fn commit(mut self) -> Result<()> {
        let temp = self.temp().to_path_buf();
        let mut registry = open_registry(&self.target)?;
        let renamed = if self.replace && self.target.symlink_metadata().is_ok() {
            // Checked again now: the directory may have changed since the run began.
            check_output(&self.target, true, OutputKind::Directory)?;
            replace_dir(&temp, &self.target)
        } else {
            rename_dir_noreplace(&temp, &self.target)
        };
        renamed?;
        unregister(&mut registry, &temp);
        // Renamed away: nothing is left at the temporary path to remove.
        let _ = self.temp.take().map(TempDir::keep);
        Ok(())
    }
}

impl Drop for PendingDir {
    fn drop(&mut self) {
        if let Some(temp) = self.temp.take() {
            let path = temp.path().to_path_buf();
            // `TempDir` removes the directory and everything this run wrote into it.
            drop(temp);
            unregister(&mut pending(), &path);
        }
    }
}

/// Renames the directory `from` to `to`, failing with `E_OUTPUT_EXISTS` if anything
/// is at `to`. `tempfile` persists files only, so directories are renamed here.
fn rename_dir_noreplace(from: &Path, to: &Path) -> Result<()> {
    let io = |e| Error::io(to, "cannot rename the output into place", e);
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        use rustix::fs::{renameat_with, RenameFlags, CWD};
        match renameat_with(CWD, from, CWD, to, RenameFlags::NOREPLACE) {
            Ok(()) => return Ok(()),
            Err(rustix::io::Errno::EXIST) => {
                return Err(exists_error(to, "something appeared at the output while it was being written"))
            }
            // A file system without RENAME_NOREPLACE: the portable way below.
            Err(rustix::io::Errno::INVAL | rustix::io::Errno::NOSYS | rustix::io::Errno::OPNOTSUPP) => {}
            Err(e) => return Err(io(e.into())),
        }
    }
    rename_dir_noreplace_portable(from, to)
}

/// Where renameat2 is missing: `mkdir` claims the name exclusively, and `rename`
/// then replaces only that empty directory; if anyone put something into it
/// meanwhile, the rename fails instead of removing it.
fn rename_dir_noreplace_portable(from: &Path, to: &Path) -> Result<()> {
    let io = |e| Error::io(to, "cannot rename the output into place", e);
    std::fs::create_dir(to).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            exists_error(to, "something appeared at the output while it was being written")
        } else {
            io(e)
        }
    })?;
    std::fs::rename(from, to).map_err(|e| {
        let _ = std::fs::remove_dir(to);
        if to.exists() {
            exists_error(to, "something appeared at the output while it was being written")
        } else {
            io(e)
        }
    })
}

/// Puts the directory `from` in place of the checkpoint directory `to`, then removes
/// the old checkpoint's files. A file that tpde does not write is never removed: if
/// one is found in the old directory, the old directory is kept under a temporary
/// name that [`remove_stale_temporaries`] reports.
fn replace_dir(from: &Path, to: &Path) -> Result<()> {
    let io = |e| Error::io(to, "cannot replace the existing output", e);
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        use rustix::fs::{renameat_with, RenameFlags, CWD};
        // One atomic swap: readers see the old checkpoint or the new one, never
        // neither. The old one is then at `from`.
        match renameat_with(CWD, from, CWD, to, RenameFlags::EXCHANGE) {
            Ok(()) => {
                remove_checkpoint_dir(from, true).map_err(io)?;
                return Ok(());
            }
            Err(rustix::io::Errno::INVAL | rustix::io::Errno::NOSYS | rustix::io::Errno::OPNOTSUPP) => {}
            Err(e) => return Err(io(e.into())),
        }
    }
    replace_dir_portable(from, to)
}

/// Where renameat2 is missing: moves the old directory aside under a fresh
/// temporary name, puts the new one in place, then removes the old one.
fn replace_dir_portable(from: &Path, to: &Path) -> Result<()> {
    let io = |e| Error::io(to, "cannot replace the existing output", e);
    let parent = parent_of(to)?;
    let aside = temp_builder(&temp_builder_prefix(), 0o777).tempdir_in(parent).map_err(io)?;
    let aside = aside.keep();
    // `aside` is an empty directory; rename replaces it.
    std::fs::rename(to, &aside).map_err(|e| {
        let _ = std::fs::remove_dir(&aside);
        io(e)
    })?;
    if let Err(e) = rename_dir_noreplace(from, to) {
        let _ = std::fs::rename(&aside, to);
        return Err(e);
    }
    remove_checkpoint_dir(&aside, true).map_err(io)?;
    Ok(())
}

/// A temporary left beside an output by a process that no longer runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leftover {
    /// Where it is.
    pub path: PathBuf,
    /// The process that created it.
    pub pid: u32,
    /// Whether it was removed. A leftover directory that holds files tpde does not
    /// write is kept.
    pub removed: bool,
}

/// The process ID in a temporary name: `.tpde-tmp-PID-RANDOM`, or `.NAME.tpde-tmp-PID`
/// as earlier releases named them.
fn temp_owner_pid(name: &std::ffi::OsStr) -> Option<u32> {
    let name = name.to_str()?;
    let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let pid = if let Some(rest) = name.strip_prefix(TEMP_PREFIX) {
        let (pid, random) = rest.split_once('-')?;
        let random_ok = !random.is_empty() && random.bytes().all(|b| b.is_ascii_alphanumeric());
        (random_ok && all_digits(pid)).then_some(pid)?
    } else {
        let (_, pid) = name.strip_prefix('.')?.rsplit_once(".tpde-tmp-")?;
        all_digits(pid).then_some(pid)?
    };
    pid.parse().ok()
}

/// Whether process `pid` may still be running. A process of another user counts as
/// running, and so does any doubt.
#[cfg(unix)]
fn process_is_gone(pid: u32) -> bool {
    let Some(pid) = i32::try_from(pid).ok().and_then(rustix::process::Pid::from_raw) else { return false };
    rustix::process::test_kill_process(pid) == Err(rustix::io::Errno::SRCH)
}

/// Removes the temporaries that dead tpde processes left in `dir` (killed with
/// SIGKILL, say, or by a power cut) and says which it removed or kept. Only the
/// current user's temporaries are touched, and only when the process named in their
/// name is gone; a leftover directory loses only the files tpde writes.
#[must_use]
pub fn remove_stale_temporaries(dir: &Path) -> Vec<Leftover> {
    let mut found = Vec::new();
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let Ok(entries) = std::fs::read_dir(dir) else { return found };
        let uid = rustix::process::getuid().as_raw();
        for entry in entries.flatten() {
            let Some(pid) = temp_owner_pid(&entry.file_name()) else { continue };
            let Ok(metadata) = entry.path().symlink_metadata() else { continue };
            if metadata.uid() != uid || !process_is_gone(pid) {
                continue;
            }
            let path = entry.path();
            let removed = if metadata.is_dir() {
                remove_checkpoint_dir(&path, false).unwrap_or(false)
            } else if metadata.is_file() {
                std::fs::remove_file(&path).is_ok()
            } else {
                false
            };
            found.push(Leftover { path, pid, removed });
        }
    }
    #[cfg(not(unix))]
    let _ = dir;
    found
}

/// Fails with `E_INVALID_ARGUMENT` when the output is one of the inputs, lies inside
/// one, or contains one: inputs are never modified.
///
/// # Errors
/// `E_INVALID_ARGUMENT`.
pub fn check_not_an_input(output: &Path, inputs: &[&Path]) -> Result<()> {
    // An output that does not exist yet is where its parent directory resolves to.
    let resolved = output.canonicalize().ok().or_else(|| {
        let parent = parent_of(output).ok()?.canonicalize().ok()?;
        Some(parent.join(output.file_name()?))
    });
    let Some(output) = resolved else { return Ok(()) };
    for input in inputs {
        let Ok(input) = input.canonicalize() else { continue };
        if input.starts_with(&output) || output.starts_with(&input) {
            return Err(Error::new(
                ErrorCode::InvalidArgument,
                if input == output {
                    "the output is an input"
                } else if input.starts_with(&output) {
                    "the output contains an input"
                } else {
                    "the output lies inside an input"
                },
            )
            .in_file(&output));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        names
    }

    #[test]
    fn a_committed_file_and_directory_appear_and_nothing_else_is_left() {
        let dir = tempfile::tempdir().unwrap();
        let mut file = PendingFile::create(&dir.path().join("out.safetensors")).unwrap();
        file.write_all(b"whole").unwrap();
        file.commit().unwrap();
        let shards = PendingDir::create_with(&dir.path().join("out-dir"), false).unwrap();
        let mut shard = PendingFile::create(&shards.path_of("a.safetensors")).unwrap();
        shard.write_all(b"shard").unwrap();
        shard.commit().unwrap();
        shards.commit().unwrap();
        assert_eq!(names(dir.path()), ["out-dir", "out.safetensors"]);
        assert_eq!(names(&dir.path().join("out-dir")), ["a.safetensors"]);
        assert_eq!(std::fs::read(dir.path().join("out.safetensors")).unwrap(), b"whole");
    }

    /// A replaced file is swapped out whole and removed: the new bytes are at the
    /// output, nothing else is left, and a reader that had the old file open still
    /// reads the old bytes. A symlink at the output is replaced, never followed.
    #[test]
    fn a_replaced_file_is_swapped_out_whole_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out.safetensors");
        std::fs::write(&out, b"old bytes").unwrap();
        let mut reader = File::open(&out).unwrap();
        let mut file = PendingFile::create_with(&out, true).unwrap();
        file.write_all(b"new").unwrap();
        file.commit().unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), b"new");
        assert_eq!(names(dir.path()), ["out.safetensors"]);
        let mut old = Vec::new();
        std::io::Read::read_to_end(&mut reader, &mut old).unwrap();
        assert_eq!(old, b"old bytes");

        #[cfg(unix)]
        {
            let victim = dir.path().join("victim");
            std::fs::write(&victim, b"precious").unwrap();
            let link = dir.path().join("link");
            std::os::unix::fs::symlink(&victim, &link).unwrap();
            let mut file = PendingFile::create_with(&link, true).unwrap();
            file.write_all(b"output").unwrap();
            file.commit().unwrap();
            assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
            assert!(link.symlink_metadata().unwrap().is_file());
            assert_eq!(names(dir.path()), ["link", "out.safetensors", "victim"]);
        }
    }

    /// Regression: the temporary had a predictable name and followed a planted
    /// symlink, overwriting its victim.
    #[cfg(unix)]
    #[test]
    fn a_planted_symlink_is_never_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        // Every name the old scheme could pick, and the new prefix with this PID.
        for name in [format!(".out.tpde-tmp-{}", std::process::id()), format!("{}x", temp_builder_prefix())] {
            std::os::unix::fs::symlink(&victim, dir.path().join(name)).unwrap();
        }
        let mut file = PendingFile::create(&dir.path().join("out")).unwrap();
        file.write_all(b"output").unwrap();
        file.commit().unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert_eq!(std::fs::read(dir.path().join("out")).unwrap(), b"output");
    }

    /// Regression: names of 236 to 255 bytes failed because the temporary's name was
    /// the output's name plus a suffix.
    #[test]
    fn an_output_name_of_255_bytes_works() {
        let dir = tempfile::tempdir().unwrap();
        let name = format!("{}.safetensors", "n".repeat(255 - ".safetensors".len()));
        let mut file = PendingFile::create(&dir.path().join(&name)).unwrap();
        file.write_all(b"x").unwrap();
        file.commit().unwrap();
        let shards = PendingDir::create_with(&dir.path().join(&name[..255]), false).unwrap_or_else(|e| panic!("{e}"));
        drop(shards);
        assert_eq!(names(dir.path()), [name]);
    }

    /// Regression: a file or directory created at the output during a run was
    /// replaced (or deleted) by the final rename.
    #[test]
    fn what_appears_at_the_output_meanwhile_is_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let file = PendingFile::create(&out).unwrap();
        std::fs::write(&out, b"theirs").unwrap();
        assert_eq!(file.commit().unwrap_err().code(), ErrorCode::OutputExists);
        assert_eq!(std::fs::read(&out).unwrap(), b"theirs");

        let out_dir = dir.path().join("out-dir");
        let shards = PendingDir::create_with(&out_dir, false).unwrap();
        std::fs::write(shards.path_of("a.safetensors"), b"ours").unwrap();
        std::fs::create_dir(&out_dir).unwrap();
        std::fs::write(out_dir.join("theirs"), b"theirs").unwrap();
        assert_eq!(shards.commit().unwrap_err().code(), ErrorCode::OutputExists);
        assert_eq!(std::fs::read(out_dir.join("theirs")).unwrap(), b"theirs");
        // An empty directory is something too.
        let empty = dir.path().join("empty");
        let shards = PendingDir::create_with(&empty, false).unwrap();
        std::fs::create_dir(&empty).unwrap();
        assert_eq!(shards.commit().unwrap_err().code(), ErrorCode::OutputExists);
        assert_eq!(names(dir.path()), ["empty", "out", "out-dir"], "no temporary is left");
    }

    #[test]
    fn a_directory_rename_never_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let (from, to) = (dir.path().join("from"), dir.path().join("to"));
        std::fs::create_dir(&from).unwrap();
        std::fs::create_dir(&to).unwrap();
        std::fs::write(to.join("theirs"), b"").unwrap();
        for rename in [rename_dir_noreplace, rename_dir_noreplace_portable] {
            assert_eq!(rename(&from, &to).unwrap_err().code(), ErrorCode::OutputExists);
            assert!(to.join("theirs").exists());
        }
        std::fs::remove_file(to.join("theirs")).unwrap();
        assert_eq!(rename_dir_noreplace_portable(&from, &to).unwrap_err().code(), ErrorCode::OutputExists);
        std::fs::remove_dir(&to).unwrap();
        rename_dir_noreplace_portable(&from, &to).unwrap();
        assert!(!from.exists() && to.is_dir());
    }

    /// Regression: `--force` removed a whole directory, inputs and unrelated files
    /// included.
    #[test]
    fn force_replaces_only_a_directory_of_checkpoint_files() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        std::fs::write(out.join("old-00001-of-00001.safetensors"), b"old").unwrap();
        std::fs::write(out.join("extra.safetensors"), b"not in the index").unwrap();
        let index = r#"{"metadata": {}, "weight_map": {"w": "old-00001-of-00001.safetensors"}}"#;
        std::fs::write(out.join(INDEX_FILE), index).unwrap();
        assert_eq!(check_output(&out, true, OutputKind::Directory).unwrap_err().code(), ErrorCode::OutputExists);
        std::fs::remove_file(out.join("extra.safetensors")).unwrap();
        check_output(&out, true, OutputKind::Directory).unwrap();
        assert_eq!(check_output(&out, true, OutputKind::File).unwrap_err().code(), ErrorCode::OutputExists);
        assert_eq!(check_output(&out, false, OutputKind::Directory).unwrap_err().code(), ErrorCode::OutputExists);

        let shards = PendingDir::create_with(&out, true).unwrap();
        std::fs::write(shards.path_of("new.safetensors"), b"new").unwrap();
        shards.commit().unwrap();
        assert_eq!(names(&out), ["new.safetensors"]);
        assert_eq!(names(dir.path()), ["out"], "the old checkpoint is gone");

        for intruder in ["notes.txt", "sub/"] {
            let keep = out.join(intruder.trim_end_matches('/'));
            if intruder.ends_with('/') {
                std::fs::create_dir(&keep).unwrap();
            } else {
                std::fs::write(&keep, b"keep").unwrap();
            }
            assert_eq!(check_output(&out, true, OutputKind::Directory).unwrap_err().code(), ErrorCode::OutputExists);
            // Also when it appears after the run began.
            let shards = PendingDir::create_with(&out, true).unwrap();
            assert_eq!(shards.commit().unwrap_err().code(), ErrorCode::OutputExists);
            assert!(keep.exists());
            assert!(out.join("new.safetensors").exists());
            let _ = std::fs::remove_file(&keep).or_else(|_| std::fs::remove_dir(&keep));
        }
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(dir.path(), out.join("link.safetensors")).unwrap();
            assert_eq!(check_output(&out, true, OutputKind::Directory).unwrap_err().code(), ErrorCode::OutputExists);
        }
    }

    #[test]
    fn a_directory_replacement_keeps_what_tpde_did_not_write() {
        for replace in [replace_dir, replace_dir_portable] {
            let dir = tempfile::tempdir().unwrap();
            let (from, to) = (dir.path().join("from"), dir.path().join("to"));
            std::fs::create_dir(&from).unwrap();
            std::fs::write(from.join("new.safetensors"), b"new").unwrap();
            std::fs::create_dir(&to).unwrap();
            std::fs::write(to.join("old.safetensors"), b"old").unwrap();
            std::fs::write(to.join(INDEX_FILE), r#"{"weight_map": {"w": "old.safetensors"}}"#).unwrap();
            std::fs::write(to.join("theirs"), b"theirs").unwrap();
            replace(&from, &to).unwrap();
            assert_eq!(names(&to), ["new.safetensors"]);
            let kept: Vec<String> = names(dir.path()).into_iter().filter(|n| n != "to").collect();
            assert_eq!(kept.len(), 1, "the old directory is kept, as it holds a file tpde did not write");
            assert_eq!(names(&dir.path().join(&kept[0])), ["theirs"]);
        }
    }

    #[test]
    fn outputs_that_hold_or_are_inputs_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let models = dir.path().join("models");
        let base = models.join("base");
        std::fs::create_dir_all(&base).unwrap();
        let delta = models.join("step.tpde");
        std::fs::write(&delta, b"").unwrap();
        for out in [&models, &base, &delta, &base.join("x.safetensors")] {
            let err = check_not_an_input(out, &[&base, &delta]);
            assert_eq!(err.map_err(|e| e.code()), Err(ErrorCode::InvalidArgument), "{out:?}");
        }
        check_not_an_input(&dir.path().join("elsewhere"), &[&base, &delta]).unwrap();
        check_not_an_input(&models.join("out"), &[&base, &delta]).unwrap();
    }

    #[test]
    fn temporary_names_carry_the_process_id() {
        let prefix = temp_builder_prefix();
        assert_eq!(temp_owner_pid(std::ffi::OsStr::new(&format!("{prefix}aB3dE6"))), Some(std::process::id()));
        assert_eq!(temp_owner_pid(std::ffi::OsStr::new(".out.safetensors.tpde-tmp-123")), Some(123), "older names");
        for other in
            [".tpde-tmp-", ".tpde-tmp-12", ".tpde-tmp-12-", ".tpde-tmp-x-abc", "out.tpde-tmp-1-abc", ".tpde-tmp-1-a.b"]
        {
            assert_eq!(temp_owner_pid(std::ffi::OsStr::new(other)), None, "{other}");
        }
    }

    /// A dead process's leftovers are removed; a live one's stay.
    #[cfg(unix)]
    #[test]
    fn stale_temporaries_of_dead_processes_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        // No process has this ID: IDs are at most 2^22 on Linux, and positive i32s.
        let dead = i32::MAX.unsigned_abs();
        let dead_file = dir.path().join(format!("{TEMP_PREFIX}{dead}-abc123"));
        std::fs::write(&dead_file, b"partial").unwrap();
        let dead_dir = dir.path().join(format!("{TEMP_PREFIX}{dead}-def456"));
        std::fs::create_dir(&dead_dir).unwrap();
        std::fs::write(dead_dir.join("a.safetensors"), b"partial").unwrap();
        let dead_dir_with_other_files = dir.path().join(format!("{TEMP_PREFIX}{dead}-ghi789"));
        std::fs::create_dir(&dead_dir_with_other_files).unwrap();
        std::fs::write(dead_dir_with_other_files.join("notes.txt"), b"keep").unwrap();
        let live = dir.path().join(format!("{}live00", temp_builder_prefix()));
        std::fs::write(&live, b"in progress").unwrap();

        let mut leftovers = remove_stale_temporaries(dir.path());
        leftovers.sort_by(|a, b| a.path.cmp(&b.path));
        let expected = [(&dead_file, true), (&dead_dir, true), (&dead_dir_with_other_files, false)];
        assert_eq!(leftovers.len(), expected.len(), "{leftovers:?}");
        for (leftover, (path, removed)) in leftovers.iter().zip(expected) {
            assert_eq!((&leftover.path, leftover.removed, leftover.pid), (path, removed, dead));
        }
        assert!(!dead_file.exists() && !dead_dir.exists());
        assert!(dead_dir_with_other_files.join("notes.txt").exists());
        assert!(live.exists(), "a running process's temporary stays");
    }
}
