//! `tpde.Series`: a training run kept as keyframes and deltas (spec/SERIES.md), with
//! the verbs of `tpde series`. The Python class in `tpde/_series.py` wraps this one.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};

use pyo3::prelude::*;
use tpde::{AddOptions, ApplyOptions, Checkpoint, EncodeOptions, EncodeSettings, Error, Series as RunSeries};

use crate::errors::invalid_argument;
use crate::interrupt::run_interruptible;

/// A series directory, opened. Every method runs with the GIL released and reads
/// the manifest again first. The series is behind a mutex, taken on the worker
/// thread, so that two Python threads using one object take turns (the library's
/// file lock keeps processes apart).
#[pyclass(frozen, module = "tpde._tpde")]
pub struct Series {
    root: PathBuf,
    inner: Mutex<RunSeries>,
}

impl Series {
    /// The series, whatever a panicking call left: every change re-reads the
    /// manifest from disk before it begins (`Series::begin_change`).
    fn lock(&self) -> MutexGuard<'_, RunSeries> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The series, its manifest read again from disk: another process may have
    /// changed it since (as each `tpde series` command reads it afresh).
    fn fresh(&self) -> tpde::Result<MutexGuard<'_, RunSeries>> {
        let mut series = self.lock();
        *series = RunSeries::open(&self.root)?;
        Ok(series)
    }
}

/// `AddOptions` from the keyword arguments of `add` and `prune`.
fn add_options(max_chain: usize, level: i32, chunk_words: u64, temporal: bool, zstd: bool) -> AddOptions {
    let settings = EncodeSettings { level, zstd, ..EncodeSettings::default() };
    AddOptions { max_chain, encode: EncodeOptions { settings, chunk_words }, temporal }
}

fn to_json(value: &serde_json::Value, root: &Path) -> tpde::Result<String> {
    serde_json::to_string(value).map_err(|e| Error::io(root, "cannot serialize the summary", std::io::Error::other(e)))
}

#[pymethods]
impl Series {
    /// Opens the series at `path`; with `create`, creates an empty one where
    /// `path` is missing or an empty directory.
    #[new]
    #[pyo3(signature = (path, *, create))]
    fn new(py: Python<'_>, path: PathBuf, create: bool) -> PyResult<Self> {
        let series = run_interruptible(py, None, |_| {
            if create {
                RunSeries::open_or_create(&path)
            } else {
                RunSeries::open(&path)
            }
        })?;
        Ok(Self { root: path, inner: Mutex::new(series) })
    }

    /// The series directory, as given.
    #[getter]
    fn path(&self) -> PathBuf {
        self.root.clone()
    }

    /// Adds the checkpoint at `checkpoint` as `step`; returns the summary as JSON
    /// text: the manifest's new entry, its chain depth and the sizes measured.
    #[pyo3(signature = (checkpoint, step, *, previous, max_chain, level, chunk_words, temporal, threads, zstd = true))]
    #[allow(clippy::too_many_arguments)] // mirrors the keyword arguments of `Series.add`
    fn add(
        &self,
        py: Python<'_>,
        checkpoint: PathBuf,
        step: u64,
        previous: Option<PathBuf>,
        max_chain: usize,
        level: i32,
        chunk_words: u64,
        temporal: bool,
        threads: Option<usize>,
        zstd: bool,
    ) -> PyResult<String> {
        let options = add_options(max_chain, level, chunk_words, temporal, zstd);
        run_interruptible(py, threads, |interrupt| {
            let checkpoint = Checkpoint::open(&checkpoint)?;
            let previous = previous.as_deref().map(Checkpoint::open).transpose()?;
            let mut series = self.lock();
            let added = match &previous {
                Some(previous) => series.add_after(previous, &checkpoint, step, &options, interrupt)?,
                None => series.add(&checkpoint, step, &options, interrupt)?,
            };
            let candidates: Vec<_> = added
                .candidates
                .iter()
                .map(|c| serde_json::json!({ "reference": c.reference, "bytes": c.bytes }))
                .collect();
            let summary = serde_json::json!({
                "entry": added.entry,
                "depth": added.depth,
                "checkpoint_bytes": added.entry.checkpoint.total_bytes(),
                "candidates": candidates,
            });
            to_json(&summary, series.root())
        })
    }

    /// Rebuilds `step` into `out`, byte for byte the checkpoint that was added.
    #[pyo3(signature = (step, out, *, force, threads))]
    fn get(&self, py: Python<'_>, step: u64, out: PathBuf, force: bool, threads: Option<usize>) -> PyResult<()> {
        run_interruptible(py, threads, |interrupt| {
            let series = self.fresh()?;
            // Before any step of the chain is rebuilt, as `tpde series get` checks.
            series.manifest().entry(step)?;
            tpde::check_free(&out, force)?;
            series.get(step, &out, ApplyOptions { force, sync: false }, interrupt)
        })
    }

    /// The manifest as it is on disk now, as JSON text: what
    /// `tpde series list --json` prints.
    fn manifest_json(&self, py: Python<'_>) -> PyResult<String> {
        run_interruptible(py, None, |_| Ok(self.fresh()?.manifest().to_text()))
    }

    /// Total bytes of the step files.
    #[getter]
    fn stored_bytes(&self, py: Python<'_>) -> PyResult<u64> {
        run_interruptible(py, None, |_| Ok(self.fresh()?.stored_bytes()))
    }

    /// Checks every step file and every rebuilt checkpoint against the digests
    /// the manifest pins; returns the steps rebuilt and the stray files found.
    #[pyo3(signature = (*, threads))]
    fn verify(&self, py: Python<'_>, threads: Option<usize>) -> PyResult<(usize, Vec<PathBuf>)> {
        run_interruptible(py, threads, |interrupt| {
            let checked = self.fresh()?.verify(interrupt)?;
            Ok((checked.steps, checked.stray_files))
        })
    }

    /// Removes the steps not kept; returns `(removed, stored anew, bytes before,
    /// bytes after)`.
    #[pyo3(signature = (*, keep, keep_every, keep_last, max_chain, level, chunk_words, threads))]
    #[allow(clippy::too_many_arguments)] // mirrors the keyword arguments of `Series.prune`
    fn prune(
        &self,
        py: Python<'_>,
        keep: Option<Vec<u64>>,
        keep_every: Option<u64>,
        keep_last: Option<usize>,
        max_chain: usize,
        level: i32,
        chunk_words: u64,
        threads: Option<usize>,
    ) -> PyResult<(Vec<u64>, Vec<u64>, u64, u64)> {
        if keep.is_none() && keep_every.is_none() && keep_last.is_none() {
            return Err(invalid_argument("say which steps to keep: keep, keep_every or keep_last"));
        }
        if keep_every == Some(0) {
            return Err(invalid_argument("keep_every must be at least 1"));
        }
        // Re-encoded deltas are coded as the writer's default.
        let options = add_options(max_chain, level, chunk_words, false, true);
        run_interruptible(py, threads, |interrupt| {
            let mut series = self.fresh()?;
            let steps: Vec<u64> = series.manifest().steps.iter().map(|s| s.step).collect();
            let last: BTreeSet<u64> = steps.iter().rev().take(keep_last.unwrap_or(0)).copied().collect();
            let listed: BTreeSet<u64> = keep.unwrap_or_default().into_iter().collect();
            let keeps =
                |s: u64| listed.contains(&s) || last.contains(&s) || keep_every.is_some_and(|n| s.is_multiple_of(n));
            let pruned = series.prune(keeps, &options, interrupt)?;
            Ok((pruned.removed, pruned.reencoded, pruned.bytes_before, pruned.bytes_after))
        })
    }
}
