//! A checkpoint series: a training run kept in one directory as keyframes and
//! deltas against earlier steps, any step rebuilt byte for byte on demand
//! (spec/SERIES.md).
//!
//! ```text
//! RUN/series.json                                 the manifest, replaced atomically
//! RUN/steps/00000000000000000100-<sha256:16>.tpde  one file per stored step
//! ```
//!
//! ```no_run
//! use std::path::Path;
//! use tpde::{AddOptions, Checkpoint, NoProgress, Series};
//!
//! # fn main() -> tpde::Result<()> {
//! let mut run = Series::open_or_create(Path::new("run"))?;
//! let ckpt = Checkpoint::open(Path::new("step-100.safetensors"))?;
//! run.add(&ckpt, 100, &AddOptions::default(), &NoProgress)?;
//! run.get(100, Path::new("rebuilt.safetensors"), Default::default(), &NoProgress)?;
//! # Ok(())
//! # }
//! ```

pub mod manifest;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::checkpoint::Checkpoint;
use crate::container::header::LayoutKind;
use crate::output::{check_not_an_input, PendingFile};
use crate::pipeline::apply::{apply, apply_chain, chain_cut_alike, ApplyOptions};
use crate::pipeline::encode::{encode_sources_against, encode_to, EncodeOptions};
use crate::pipeline::Progress;
use crate::reader::DeltaFile;
use crate::{Error, ErrorCode, Result};

pub use manifest::{
    step_file_name, CheckpointDigest, FileDigest, Manifest, StepEntry, StepKind, MANIFEST_FILE, STEPS_DIR,
};

/// How [`Series::add`] stores a step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AddOptions {
    /// Most deltas applied after a keyframe to rebuild any step.
    pub max_chain: usize,
    /// How each candidate file is encoded.
    pub encode: EncodeOptions,
    /// Whether a delta against the previous step, itself stored as a delta, codes
    /// its sparse positions against that step's file (format 1.2, position
    /// coding 3) where that stores smaller. Off by default: the GPU loader
    /// decodes such positions on the CPU, against the previous step's file.
    pub temporal: bool,
}

impl Default for AddOptions {
    fn default() -> Self {
        Self { max_chain: 10, encode: EncodeOptions::default(), temporal: false }
    }
}

/// A way to store a step that [`Series::add`] measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    /// The step it is a delta against; `None` for a keyframe.
    pub reference: Option<u64>,
    /// Bytes of its file.
    pub bytes: u64,
}

/// What [`Series::add`] stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddSummary {
    /// The new entry of the manifest.
    pub entry: StepEntry,
    /// Deltas applied after its keyframe to rebuild it.
    pub depth: usize,
    /// Every way of storing it that was measured; the smallest was kept.
    pub candidates: Vec<Candidate>,
}

/// What [`Series::verify`] checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifySummary {
    /// Steps rebuilt and compared with their pinned checkpoint digests.
    pub steps: usize,
    /// Files of the steps folder that the manifest does not name (left by an
    /// interrupted write; removed by the next `add` or `prune`).
    pub stray_files: Vec<PathBuf>,
}

/// What [`Series::prune`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PruneSummary {
    /// Steps removed.
    pub removed: Vec<u64>,
    /// Kept steps stored anew because their reference was removed.
    pub reencoded: Vec<u64>,
    /// Bytes of step files before and after.
    pub bytes_before: u64,
    /// Bytes of step files after.
    pub bytes_after: u64,
}

/// A series directory, opened.
#[derive(Debug)]
pub struct Series {
    root: PathBuf,
    manifest: Manifest,
}

/// The lock a process holds on a series while it reads (shared) or changes it
/// (exclusive), on `RUN/.lock`; released when the file closes.
struct SeriesLock {
    _file: std::fs::File,
}

impl SeriesLock {
    /// Takes the lock. A reader of a series it cannot write to (a read-only
    /// mount) reads without one: no writer can change that series either.
    fn take(root: &Path, exclusive: bool) -> Result<Option<Self>> {
        let path = root.join(".lock");
        let opened = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path);
        let file = match opened {
            Ok(file) => file,
            Err(_) if !exclusive => match std::fs::File::open(&path) {
                Ok(file) => file,
                Err(_) => return Ok(None),
            },
            Err(e) => return Err(Error::io(&path, "cannot open the series lock", e)),
        };
        #[cfg(unix)]
        {
            use rustix::fs::{flock, FlockOperation};
            let op = if exclusive {
                FlockOperation::NonBlockingLockExclusive
            } else {
                FlockOperation::NonBlockingLockShared
            };
            flock(&file, op).map_err(|_| {
                Error::new(ErrorCode::SeriesBusy, "another process is changing this series").in_file(root)
            })?;
        }
        #[cfg(not(unix))]
        let _ = exclusive;
        Ok(Some(Self { _file: file }))
    }
}

/// A rebuilt checkpoint in a scratch directory.
struct Rebuilt {
    checkpoint: Checkpoint,
    path: PathBuf,
}

impl Drop for Rebuilt {
    fn drop(&mut self) {
        // best effort: the scratch directory goes when its TempDir drops
        let _ = if self.path.is_dir() { std::fs::remove_dir_all(&self.path) } else { std::fs::remove_file(&self.path) };
    }
}

impl Series {
    /// Opens the series at `root`.
    ///
    /// # Errors
    /// `E_IO` when its manifest cannot be read, `E_SERIES_INVALID` when it is not
    /// a valid manifest.
    pub fn open(root: &Path) -> Result<Self> {
        Ok(Self { root: root.to_path_buf(), manifest: Manifest::read(root)? })
    }

    /// Opens the series at `root`, or creates an empty one where `root` is
    /// missing or an empty directory.
    ///
    /// # Errors
    /// As [`Series::open`]; `E_OUTPUT_EXISTS` for a directory that holds other
    /// files but no manifest; `E_IO` when it cannot be created.
    pub fn open_or_create(root: &Path) -> Result<Self> {
        if root.join(MANIFEST_FILE).exists() {
            return Self::open(root);
        }
        std::fs::create_dir_all(root).map_err(|e| Error::io(root, "cannot create the series directory", e))?;
        let empty = std::fs::read_dir(root)
            .map_err(|e| Error::io(root, "cannot list the series directory", e))?
            .next()
            .is_none();
        if !empty {
            return Err(
                Error::new(ErrorCode::OutputExists, "the directory holds files but no series manifest").in_file(root)
            );
        }
        let series = Self { root: root.to_path_buf(), manifest: Manifest::default() };
        std::fs::create_dir_all(series.root.join(STEPS_DIR))
            .map_err(|e| Error::io(root, "cannot create the steps folder", e))?;
        series.write_manifest(&series.manifest)?;
        Ok(series)
    }

    /// The series directory.
    #[must_use]
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The manifest as read or last written.
    #[must_use]
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Total bytes of the step files.
    #[must_use]
    pub fn stored_bytes(&self) -> u64 {
        self.manifest.steps.iter().map(|s| s.file_bytes).sum()
    }

    fn write_manifest(&self, manifest: &Manifest) -> Result<()> {
        let mut file = PendingFile::create_with(&self.root.join(MANIFEST_FILE), true)?.synced(true);
        file.write_all(manifest.to_text().as_bytes())?;
        file.commit()
    }

    /// A scratch directory inside the series, so that a chosen file is renamed
    /// into the steps folder on the same file system.
    fn scratch(&self) -> Result<tempfile::TempDir> {
        scratch_in(&self.root)
    }

    /// Opens a stored step's file once its bytes check out against the digest
    /// the manifest pins (hashed as a stream first: a changed file is named as
    /// such, before any of it is decoded).
    ///
    /// # Errors
    /// `E_SERIES_DIGEST` for a file that changed, `E_SERIES_STEP` for a `same`
    /// step (it has no file), and any error of opening the file.
    pub fn open_step_file(&self, entry: &StepEntry) -> Result<DeltaFile> {
        if entry.kind == StepKind::Same {
            return Err(Error::new(ErrorCode::SeriesStep, format!("step {} is stored as no file", entry.step)));
        }
        let path = self.root.join(entry.file.as_deref().unwrap_or_default());
        let (digest, len) = sha256_of_file(&path)?;
        if Some(&digest) != entry.file_sha256.as_ref() || len != entry.file_bytes {
            return Err(Error::new(
                ErrorCode::SeriesDigest,
                format!("step {}: the file's SHA-256 is {digest}, the manifest pins another", entry.step),
            )
            .in_file(&path));
        }
        DeltaFile::open(&path)
    }

    /// Opens a step's file with its position reference attached: the file of its
    /// reference step, itself opened so, for a delta that codes positions against
    /// it (spec/SERIES.md §4). Both files are pinned by the manifest.
    ///
    /// # Errors
    /// As [`Series::open_step_file`], and `E_REFERENCE_MISMATCH` when the
    /// reference step's file is not the one the delta was written against.
    pub fn open_step_with_reference(&self, entry: &StepEntry) -> Result<DeltaFile> {
        let file = self.open_step_file(entry)?;
        if file.header().position_reference.is_none() {
            return Ok(file);
        }
        let Some(reference) = entry.reference.filter(|_| entry.kind == StepKind::Delta) else {
            return Ok(file); // refused when a chunk needs it: E_REFERENCE_REQUIRED
        };
        let reference = self.open_step_with_reference(self.manifest.entry(reference)?)?;
        file.with_position_reference(std::sync::Arc::new(reference))
    }

    /// Rebuilds one stored step into `out` against `base` (its reference's
    /// checkpoint, for a delta).
    fn apply_step(
        &self,
        entry: &StepEntry,
        base: Option<&Checkpoint>,
        out: &Path,
        options: ApplyOptions,
        progress: &dyn Progress,
    ) -> Result<()> {
        let delta = self.open_step_with_reference(entry)?;
        apply(&delta, base, out, options, progress)?;
        Ok(())
    }

    /// Rebuilds `step` into `out`. Its chain's files are rebuilt chunk by chunk
    /// in memory ([`apply_chain`], which checks every link before writing),
    /// unless steps were added with other chunk sizes; then each earlier step is
    /// rebuilt in turn into a scratch directory made in `scratch_parent`.
    fn rebuild_to(
        &self,
        step: u64,
        out: &Path,
        options: ApplyOptions,
        scratch_parent: &Path,
        progress: &dyn Progress,
    ) -> Result<()> {
        let chain = self.manifest.chain(step)?;
        // Each delta's position reference, if it has one, is the file before it.
        let mut files: Vec<DeltaFile> = Vec::with_capacity(chain.len());
        let mut reference: Option<std::sync::Arc<DeltaFile>> = None;
        for entry in &chain {
            let mut file = self.open_step_file(entry)?;
            let mut as_reference = self.open_step_file(entry)?;
            if let Some(previous) = reference.take().filter(|_| file.header().position_reference.is_some()) {
                file = file.with_position_reference(std::sync::Arc::clone(&previous))?;
                as_reference = as_reference.with_position_reference(previous)?;
            }
            reference = Some(std::sync::Arc::new(as_reference));
            files.push(file);
        }
        if chain_cut_alike(&files) {
            apply_chain(&files, None, out, options, progress)?;
            return Ok(());
        }
        let Some((last, before)) = files.split_last() else {
            return Err(Error::new(ErrorCode::SeriesStep, format!("step {step} has nothing to rebuild")));
        };
        let scratch_dir = scratch_in(scratch_parent)?;
        let scratch = scratch_dir.path();
        let mut base: Option<Rebuilt> = None;
        for (file, entry) in before.iter().zip(&chain) {
            let path = scratch.join(scratch_name(entry.step, entry.checkpoint.kind));
            apply(file, base.as_ref().map(|b| &b.checkpoint), &path, ApplyOptions::default(), progress)?;
            base = Some(Rebuilt { checkpoint: Checkpoint::open(&path)?, path });
        }
        apply(last, base.as_ref().map(|b| &b.checkpoint), out, options, progress)?;
        Ok(())
    }

    /// Rebuilds `step` into the scratch directory `dir`.
    fn rebuild_in(&self, step: u64, dir: &Path, progress: &dyn Progress) -> Result<Rebuilt> {
        let kind = self.manifest.entry(step)?.checkpoint.kind;
        let path = dir.join(scratch_name(step, kind));
        self.rebuild_to(step, &path, ApplyOptions::default(), dir, progress)?;
        Ok(Rebuilt { checkpoint: Checkpoint::open(&path)?, path })
    }

    /// Rebuilds `step` into `out`, byte for byte the checkpoint that was added:
    /// a file, or a directory for a sharded checkpoint. Memory stays bounded
    /// whatever the chain's length, and the time is about one `apply` plus
    /// decoding the chain's earlier deltas.
    ///
    /// # Errors
    /// `E_SERIES_STEP` for a step the series does not hold, `E_SERIES_DIGEST` for
    /// a step file that changed, `E_SERIES_BUSY` while another process changes
    /// the series, and any error of `apply`. Nothing appears at `out` on failure.
    pub fn get(&self, step: u64, out: &Path, options: ApplyOptions, progress: &dyn Progress) -> Result<()> {
        let _lock = SeriesLock::take(&self.root, false)?;
        check_not_an_input(out, &[&self.root])?;
        self.manifest.entry(step)?;
        // any scratch goes beside the output, which is writable, while the
        // series may not be
        let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        self.rebuild_to(step, out, options, parent, progress)
    }

    /// Adds `checkpoint` as `step`, later than every step the series holds. It is
    /// stored as whichever is smallest of a keyframe, a delta against the
    /// previous step (if that keeps its chain within `max_chain`) and a delta
    /// against the latest keyframe, each encoded against the exact bytes of its
    /// reference; a checkpoint identical to the previous step's takes no file.
    /// The manifest is replaced only once the step's file is in place, so a
    /// failure leaves the series as it was.
    ///
    /// # Errors
    /// `E_SERIES_STEP` for a step that is not later than the last one,
    /// `E_SERIES_BUSY` while another process changes the series, and any error
    /// of `encode` or of rebuilding the references.
    pub fn add(
        &mut self,
        checkpoint: &Checkpoint,
        step: u64,
        options: &AddOptions,
        progress: &dyn Progress,
    ) -> Result<AddSummary> {
        self.add_with(checkpoint, step, None, options, progress)
    }

    /// Like [`Series::add`], with the previous step's checkpoint at hand (a
    /// training loop usually still has it): once its digests match the ones the
    /// manifest pins for the last step, it serves as that reference instead of
    /// being rebuilt from its chain.
    ///
    /// # Errors
    /// As [`Series::add`], and `E_SERIES_DIGEST` when `previous` is not the last
    /// step's checkpoint.
    pub fn add_after(
        &mut self,
        previous: &Checkpoint,
        checkpoint: &Checkpoint,
        step: u64,
        options: &AddOptions,
        progress: &dyn Progress,
    ) -> Result<AddSummary> {
        self.add_with(checkpoint, step, Some(previous), options, progress)
    }

    fn add_with(
        &mut self,
        checkpoint: &Checkpoint,
        step: u64,
        previous: Option<&Checkpoint>,
        options: &AddOptions,
        progress: &dyn Progress,
    ) -> Result<AddSummary> {
        let _lock = self.begin_change()?;
        if let Some(last) = self.manifest.steps.last().filter(|l| l.step >= step) {
            return Err(Error::new(
                ErrorCode::SeriesStep,
                format!("step {step} is not later than the series' last step {}", last.step),
            ));
        }
        let inputs: Vec<&Path> = [Some(checkpoint), previous].into_iter().flatten().map(|c| c.root.as_path()).collect();
        check_not_an_input(&self.root, &inputs)?;
        let known = match (previous, self.manifest.steps.last()) {
            (Some(previous), Some(last)) => {
                let step = content_step(last);
                if !CheckpointDigest::of(previous)?.same_bytes(&self.manifest.entry(step)?.checkpoint) {
                    return Err(Error::new(
                        ErrorCode::SeriesDigest,
                        format!("the previous checkpoint given is not the series' step {step}"),
                    )
                    .in_file(&previous.root));
                }
                Some((step, previous))
            }
            _ => None,
        };
        let scratch = self.scratch()?;
        let digest = CheckpointDigest::of(checkpoint)?;
        let stored = self.store(&self.manifest, checkpoint, digest, step, known, options, scratch.path(), progress)?;
        let mut next = self.manifest.clone();
        next.steps.push(stored.entry.clone());
        self.commit(next)?;
        Ok(stored)
    }

    /// Stores `checkpoint`, whose digests are `digest`, as `step` after every
    /// step of `manifest`: measures the ways `add` chooses from, moves the
    /// smallest file into the steps folder and returns its entry. References
    /// are rebuilt from this series' manifest, which holds the same checkpoints
    /// for every step of `manifest` (the same manifest, or one being pruned);
    /// `known` is a step's checkpoint at hand, used instead of rebuilding it.
    #[allow(clippy::too_many_arguments)]
    fn store(
        &self,
        manifest: &Manifest,
        checkpoint: &Checkpoint,
        digest: CheckpointDigest,
        step: u64,
        known: Option<(u64, &Checkpoint)>,
        options: &AddOptions,
        scratch: &Path,
        progress: &dyn Progress,
    ) -> Result<AddSummary> {
        let previous = manifest.steps.last().map(content_step);
        if let Some(prev) = previous {
            let prev_entry = manifest.entry(prev)?;
            if prev_entry.checkpoint.same_bytes(&digest) {
                let entry = StepEntry {
                    step,
                    kind: StepKind::Same,
                    reference: Some(prev),
                    file: None,
                    file_bytes: 0,
                    file_sha256: None,
                    checkpoint: prev_entry.checkpoint.clone(),
                };
                return Ok(AddSummary { entry, depth: manifest.depth(prev)?, candidates: Vec::new() });
            }
        }
        let mut references = Vec::new();
        if options.max_chain > 0 {
            if let Some(prev) = previous.filter(|&p| manifest.depth(p).is_ok_and(|d| d < options.max_chain)) {
                references.push(prev);
            }
            let keyframe = manifest.steps.iter().rev().find(|s| s.kind == StepKind::Keyframe).map(|s| s.step);
            if let Some(k) = keyframe.filter(|k| !references.contains(k)) {
                references.push(k);
            }
        }
        // (reference, file, bytes); the keyframe first, so that it wins ties
        let mut measured: Vec<(Option<u64>, PathBuf, u64)> = Vec::new();
        let keyframe_path = scratch.join(format!("{step}-keyframe.tpde"));
        let summary = encode_to(None, checkpoint, &keyframe_path, options.encode, true, progress)?;
        measured.push((None, keyframe_path, summary.delta_bytes));
        for reference in references {
            let rebuilt;
            let base = match known {
                Some((known_step, known)) if known_step == reference => known,
                _ => {
                    rebuilt = self.rebuild_in(reference, scratch, progress)?;
                    &rebuilt.checkpoint
                }
            };
            let path = scratch.join(format!("{step}-against-{reference}.tpde"));
            // Temporal positions: against the previous step's file, when it is a delta.
            let position_reference = match manifest.entry(reference)? {
                entry if options.temporal && Some(reference) == previous && entry.kind == StepKind::Delta => {
                    Some(self.open_step_with_reference(entry)?)
                }
                _ => None,
            };
            let summary = encode_sources_against(
                Some(base),
                checkpoint,
                &path,
                options.encode,
                true,
                position_reference.as_ref(),
                progress,
            )?;
            measured.push((Some(reference), path, summary.delta_bytes));
        }
        let candidates: Vec<Candidate> =
            measured.iter().map(|(reference, _, bytes)| Candidate { reference: *reference, bytes: *bytes }).collect();
        let depth_after = |reference: Option<u64>| reference.map_or(Ok(0), |r| manifest.depth(r).map(|d| d + 1));
        let (reference, chosen, _) = measured
            .into_iter()
            .min_by_key(|(reference, _, bytes)| (*bytes, depth_after(*reference).unwrap_or(usize::MAX)))
            .ok_or_else(|| Error::new(ErrorCode::InvalidArgument, "no way to store the step"))?;
        let (sha256, file_bytes) = sha256_of_file(&chosen)?;
        let name = step_file_name(step, &sha256);
        let dest = self.root.join(&name);
        std::fs::rename(&chosen, &dest).map_err(|e| Error::io(&dest, "cannot move the step file into place", e))?;
        let entry = StepEntry {
            step,
            kind: if reference.is_some() { StepKind::Delta } else { StepKind::Keyframe },
            reference,
            file: Some(name),
            file_bytes,
            file_sha256: Some(sha256),
            checkpoint: digest,
        };
        Ok(AddSummary { entry, depth: depth_after(reference)?, candidates })
    }

    /// Removes the steps for which `keep` is false. A kept step whose reference
    /// goes is stored anew, as `add` would store it after the kept steps before
    /// it, from the exact checkpoint it rebuilds today; every kept step rebuilds
    /// byte for byte as before. The new manifest replaces the old one once
    /// every new file is in place; the files it no longer names go after.
    ///
    /// # Errors
    /// `E_INVALID_ARGUMENT` when no step would be kept, `E_SERIES_BUSY` while
    /// another process changes the series, and any error of rebuilding or
    /// encoding a step.
    pub fn prune(
        &mut self,
        keep: impl Fn(u64) -> bool,
        options: &AddOptions,
        progress: &dyn Progress,
    ) -> Result<PruneSummary> {
        let _lock = self.begin_change()?;
        if !self.manifest.steps.iter().any(|s| keep(s.step)) {
            return Err(Error::new(ErrorCode::InvalidArgument, "prune would remove every step of the series"));
        }
        let bytes_before = self.stored_bytes();
        let scratch = self.scratch()?;
        let mut next = Manifest { series_version: manifest::SERIES_VERSION.to_owned(), steps: Vec::new() };
        let (mut removed, mut reencoded) = (Vec::new(), Vec::new());
        for entry in &self.manifest.steps {
            if !keep(entry.step) {
                removed.push(entry.step);
                continue;
            }
            let reference_kept = entry.reference.is_none_or(|r| next.entry(r).is_ok());
            // A delta whose positions are coded against its reference's file is
            // stored anew when that file is (spec/SERIES.md §4).
            let position_reference_kept = entry.kind != StepKind::Delta
                || entry.reference.is_none_or(|r| !reencoded.contains(&r))
                || self.open_step_file(entry)?.header().position_reference.is_none();
            if reference_kept && position_reference_kept {
                next.steps.push(entry.clone());
                continue;
            }
            let target = self.rebuild_in(entry.step, scratch.path(), progress)?;
            let stored = self.store(
                &next,
                &target.checkpoint,
                entry.checkpoint.clone(),
                entry.step,
                None,
                options,
                scratch.path(),
                progress,
            )?;
            next.steps.push(stored.entry);
            reencoded.push(entry.step);
        }
        self.commit(next)?;
        Ok(PruneSummary { removed, reencoded, bytes_before, bytes_after: self.stored_bytes() })
    }

    /// Takes the writer's lock, clears what a killed writer left, and reads the
    /// manifest again: another process may have changed it since this one opened
    /// the series.
    fn begin_change(&mut self) -> Result<Option<SeriesLock>> {
        let lock = SeriesLock::take(&self.root, true)?;
        self.remove_stale_scratch();
        self.manifest = Manifest::read(&self.root)?;
        Ok(lock)
    }

    /// Replaces the manifest with `next` on disk, then removes the files that
    /// it no longer names.
    fn commit(&mut self, next: Manifest) -> Result<()> {
        next.validate()?;
        self.write_manifest(&next)?;
        self.manifest = next;
        self.remove_stray_files();
        Ok(())
    }

    /// Files of the steps folder that the manifest does not name.
    fn stray_files(&self) -> Vec<PathBuf> {
        let named: std::collections::HashSet<&str> =
            self.manifest.steps.iter().filter_map(|s| s.file.as_deref()).collect();
        let Ok(dir) = std::fs::read_dir(self.root.join(STEPS_DIR)) else { return Vec::new() };
        dir.filter_map(|e| e.ok())
            .filter(|e| {
                let name = format!("{STEPS_DIR}/{}", e.file_name().to_string_lossy());
                !named.contains(name.as_str())
            })
            .map(|e| e.path())
            .collect()
    }

    /// Removes the scratch directories that a killed writer left in the series.
    /// Only writers put scratch there, and this one holds the exclusive lock.
    fn remove_stale_scratch(&self) {
        let Ok(dir) = std::fs::read_dir(&self.root) else { return };
        for entry in dir.filter_map(std::result::Result::ok) {
            let is_scratch = entry.file_name().to_string_lossy().starts_with(".tmp-");
            if is_scratch && entry.file_type().is_ok_and(|t| t.is_dir()) {
                // best effort: what is left now goes with the next change
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }

    fn remove_stray_files(&self) {
        for path in self.stray_files() {
            // best effort: a file left now is removed by the next change
            let _ = std::fs::remove_file(path);
        }
    }

    /// Checks every step: its file against the pinned digest, and the
    /// checkpoint it rebuilds (applying the chains, each step once) against the
    /// pinned checkpoint digests.
    ///
    /// # Errors
    /// The first failure: `E_SERIES_DIGEST` for a changed file or a rebuilt
    /// checkpoint that differs, and any error of the files themselves.
    pub fn verify(&self, progress: &dyn Progress) -> Result<VerifySummary> {
        let _lock = SeriesLock::take(&self.root, false)?;
        // the system's temporary directory: the series may be read-only
        let scratch = tempfile::tempdir().map_err(|e| Error::io(&self.root, "cannot create a scratch directory", e))?;
        // rebuilt checkpoints that a later step still refers to
        let mut uses: BTreeMap<u64, usize> = BTreeMap::new();
        for s in &self.manifest.steps {
            if let (Some(r), StepKind::Delta) = (s.reference, s.kind) {
                *uses.entry(r).or_default() += 1;
            }
        }
        let mut rebuilt: BTreeMap<u64, Rebuilt> = BTreeMap::new();
        let mut steps = 0;
        for entry in &self.manifest.steps {
            if entry.kind == StepKind::Same {
                continue; // its checkpoint equals its reference's (Manifest::validate)
            }
            let base = match (entry.kind, entry.reference) {
                (StepKind::Delta, Some(r)) => rebuilt.get(&r).map(|b| &b.checkpoint),
                _ => None,
            };
            let path = scratch.path().join(scratch_name(entry.step, entry.checkpoint.kind));
            self.apply_step(entry, base, &path, ApplyOptions::default(), progress)?;
            let checkpoint = Checkpoint::open(&path)?;
            if !CheckpointDigest::of(&checkpoint)?.same_bytes(&entry.checkpoint) {
                return Err(Error::new(
                    ErrorCode::SeriesDigest,
                    format!("step {} rebuilds a checkpoint other than the one the manifest pins", entry.step),
                )
                .in_file(&self.root));
            }
            steps += 1;
            if let (Some(r), StepKind::Delta) = (entry.reference, entry.kind) {
                if let Some(n) = uses.get_mut(&r) {
                    *n -= 1;
                    if *n == 0 {
                        rebuilt.remove(&r);
                    }
                }
            }
            let rebuilt_now = Rebuilt { checkpoint, path };
            if uses.get(&entry.step).is_some_and(|&n| n > 0) {
                rebuilt.insert(entry.step, rebuilt_now);
            }
        }
        Ok(VerifySummary { steps, stray_files: self.stray_files() })
    }
}

/// SHA-256 (lowercase hex) and length of a file, read as a stream so that memory
/// stays bounded whatever its size.
fn sha256_of_file(path: &Path) -> Result<(String, u64)> {
    use sha2::Digest;
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, "cannot open a step file", e))?;
    let mut hasher = sha2::Sha256::new();
    let len = std::io::copy(&mut file, &mut hasher).map_err(|e| Error::io(path, "cannot read a step file", e))?;
    Ok((hex::encode(hasher.finalize()), len))
}

/// A scratch directory in `dir`, removed when dropped.
fn scratch_in(dir: &Path) -> Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix(".tmp-")
        .tempdir_in(dir)
        .map_err(|e| Error::io(dir, "cannot create a scratch directory", e))
}

/// The step whose checkpoint `entry` has: its reference for a `same` step.
#[must_use]
pub fn content_step(entry: &StepEntry) -> u64 {
    match (entry.kind, entry.reference) {
        (StepKind::Same, Some(r)) => r,
        _ => entry.step,
    }
}

/// Where a rebuilt step goes in a scratch directory.
fn scratch_name(step: u64, kind: LayoutKind) -> String {
    match kind {
        LayoutKind::File => format!("step-{step}.safetensors"),
        LayoutKind::Sharded => format!("step-{step}"),
    }
}
