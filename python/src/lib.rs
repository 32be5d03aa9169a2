//! The `tpde._tpde` extension module: the library's verbs (`encode`, `apply`,
//! `verify`, `inspect`), `DeltaReader`, which rebuilds single tensors, and
//! `Series`, a training run kept as keyframes and deltas, and the CUDA path of
//! `tpde.torch` (`cuda_load`, `cuda_apply_in_place`, `cuda_empty_cache`, `cuda_set_staging`, `DeviceBuffer`,
//! and `cuda_stage`, whose `StagedDelta` applies a delta staged on the GPU). The
//! `tpde` package wraps it in Python (`safe_open`, `tpde.torch`).

mod cuda;
mod errors;
mod host_buffer;
mod interrupt;
mod series;
mod staged;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use pyo3::prelude::*;
use pyo3::types::{PyList, PyTuple};
use tpde::{DeltaModel, Dtype, EncodeOptions, EncodeSettings, MemoryTensor, OwnedSource, TensorMap};
use tpde_store::{open_delta_at, OpenedCheckpoint, OutputAt};

use crate::errors::{invalid_argument, to_py, TpdeError};
use crate::host_buffer::HostBuffer;
use crate::interrupt::run_interruptible;

/// A checkpoint as Python passes it: a path or an object-store URL, or tensors in
/// memory as a list of `(name, dtype, shape, uint8 array)`.
enum SourceArg {
    Path(PathBuf),
    Memory(TensorMap),
}

impl SourceArg {
    /// `file_name` names tensors in memory: in messages, and as the target file's
    /// name in a delta encoded from them.
    fn extract(arg: &Bound<'_, PyAny>, file_name: &str, metadata: Option<BTreeMap<String, String>>) -> PyResult<Self> {
        let Ok(list) = arg.cast::<PyList>() else {
            return Ok(Self::Path(arg.extract()?));
        };
        let mut tensors = Vec::with_capacity(list.len());
        for item in list.iter() {
            let item = item.cast_into::<PyTuple>()?;
            let (name, dtype, shape, array): (String, String, Vec<u64>, Bound<'_, PyAny>) = item.extract()?;
            let dtype = dtype
                .parse::<Dtype>()
                .map_err(|e| to_py(&e.in_file(std::path::Path::new(file_name)).in_tensor(&name)))?;
            let bytes = Box::new(HostBuffer::new(&array, false)?);
            tensors.push(MemoryTensor { name, dtype, shape, bytes });
        }
        TensorMap::new(file_name, tensors, metadata).map(Self::Memory).map_err(|e| to_py(&e))
    }

    fn open(self) -> tpde::Result<OwnedSource> {
        Ok(match self {
            Self::Path(path) => Box::new(OpenedCheckpoint::open(&path)?),
            Self::Memory(map) => Box::new(map),
        })
    }
}

/// Encodes `target` (against `base`, when not None) into the delta file `out`.
#[pyfunction]
#[pyo3(signature = (base, target, out, *, level, min_gain, chunk_words, format_version, force, threads, metadata, zstd = true))]
#[allow(clippy::too_many_arguments)] // mirrors the keyword arguments of `tpde.encode`
fn encode(
    py: Python<'_>,
    base: Option<Bound<'_, PyAny>>,
    target: Bound<'_, PyAny>,
    out: PathBuf,
    level: i32,
    min_gain: f64,
    chunk_words: u64,
    format_version: &str,
    force: bool,
    threads: Option<usize>,
    metadata: Option<BTreeMap<String, String>>,
    zstd: bool,
) -> PyResult<(u64, u64, usize, usize)> {
    // The newest format version the file may need (`tpde encode --format-version`).
    let settings = EncodeSettings { level, min_zstd_gain: min_gain, zstd, ..EncodeSettings::default() }
        .within_format_version(format_version)
        .ok_or_else(|| {
            invalid_argument(format!(
                "format_version {format_version:?} is not one of {}",
                tpde::WRITABLE_FORMAT_VERSIONS.map(|v| format!("{v:?}")).join(", ")
            ))
        })?;
    let base = base.map(|b| SourceArg::extract(&b, "<base tensors>", None)).transpose()?;
    let target = SourceArg::extract(&target, "model.safetensors", metadata)?;
    if !zstd && !settings.rans {
        return Err(invalid_argument("zstd=False needs the lane rANS codec of format 1.1; format 1.0 has zstd alone"));
    }
    let options = EncodeOptions { settings, chunk_words };
    run_interruptible(py, threads, |interrupt| {
        let base = base.map(SourceArg::open).transpose()?;
        let target = target.open()?;
        let out = OutputAt::new(&out, force)?;
        let base = base.as_deref().map(|b| b as _);
        let summary = tpde::encode_sources(base, &*target, out.local(), options, out.force(force), interrupt)?;
        out.finish()?;
        Ok((summary.target_bytes, summary.delta_bytes, summary.delta_tensors, summary.standalone_tensors))
    })
}

/// Rebuilds the target of `delta` into `out`; with `tensors`, only the tensors
/// whose names match one of those patterns, into one file.
#[pyfunction]
#[pyo3(signature = (base, delta, out, *, tensors, force, sync, threads))]
#[allow(clippy::too_many_arguments)] // mirrors the keyword arguments of `tpde.apply`
fn apply(
    py: Python<'_>,
    base: Option<PathBuf>,
    delta: PathBuf,
    out: PathBuf,
    tensors: Option<Vec<String>>,
    force: bool,
    sync: bool,
    threads: Option<usize>,
) -> PyResult<(u64, usize)> {
    let patterns = tensors
        .unwrap_or_default()
        .iter()
        .map(|p| glob::Pattern::new(p).map_err(|e| invalid_argument(format!("tensors: {p:?}: {e}"))))
        .collect::<PyResult<Vec<_>>>()?;
    run_interruptible(py, threads, |interrupt| {
        let out = OutputAt::new(&out, force)?;
        let delta = open_delta_at(&delta)?;
        let base = base.as_deref().map(OpenedCheckpoint::open).transpose()?;
        let options = tpde::ApplyOptions { force: out.force(force), sync };
        let summary = if patterns.is_empty() {
            tpde::apply(&delta, base.as_deref(), out.local(), options, interrupt)?
        } else {
            let select = |name: &str| patterns.iter().any(|p| p.matches(name));
            let (base, _download) = base.map(OpenedCheckpoint::into_parts).unzip();
            tpde::apply_tensors(delta, base, out.local(), &select, options, interrupt)?
        };
        out.finish()?;
        Ok((summary.target_bytes, summary.files))
    })
}

/// Checks every checksum and digest of `delta`, and compares with `target`.
#[pyfunction]
#[pyo3(signature = (base, delta, *, target, threads))]
fn verify(
    py: Python<'_>,
    base: Option<PathBuf>,
    delta: PathBuf,
    target: Option<PathBuf>,
    threads: Option<usize>,
) -> PyResult<()> {
    run_interruptible(py, threads, |interrupt| {
        let delta = open_delta_at(&delta)?;
        let base = base.as_deref().map(OpenedCheckpoint::open).transpose()?;
        let target = target.as_deref().map(OpenedCheckpoint::open).transpose()?;
        tpde::verify(&delta, base.as_deref(), target.as_deref(), interrupt)
    })
}

/// The report of `tpde inspect --json`, as JSON text; without `check_chunks`,
/// from the header and chunk map alone (`--structure-only`).
#[pyfunction]
#[pyo3(signature = (delta, *, check_chunks, threads))]
fn inspect_json(py: Python<'_>, delta: PathBuf, check_chunks: bool, threads: Option<usize>) -> PyResult<String> {
    run_interruptible(py, threads, |_| {
        let delta = open_delta_at(&delta)?;
        let report = if check_chunks { tpde::inspect(&delta)? } else { tpde::inspect_structure(&delta)? };
        serde_json::to_string(&report).map_err(|e| {
            tpde::Error::io(Path::new("<report>"), "cannot serialize the report", std::io::Error::other(e))
        })
    })
}

/// Whether `text` is an object-store URL that the verbs read or write.
#[pyfunction]
fn is_url(text: &str) -> bool {
    tpde_store::is_url(text)
}

/// A delta and its base, checked by names, dtypes and shapes when opened, then
/// read tensor by tensor (each base tensor's digest is checked when first read
/// whole; a partial read checks its chunks' base bytes through their digests).
#[pyclass(frozen, module = "tpde._tpde")]
struct DeltaReader {
    model: DeltaModel,
}

#[pymethods]
impl DeltaReader {
    #[new]
    #[pyo3(signature = (delta, base=None))]
    fn new(py: Python<'_>, delta: PathBuf, base: Option<Bound<'_, PyAny>>) -> PyResult<Self> {
        let base = base.map(|b| SourceArg::extract(&b, "<base tensors>", None)).transpose()?;
        let model = run_interruptible(py, None, |_| {
            let delta = open_delta_at(&delta)?;
            DeltaModel::new(delta, base.map(SourceArg::open).transpose()?)
        })?;
        Ok(Self { model })
    }

    /// The target's tensor names, in the order of its files.
    fn names(&self) -> Vec<String> {
        self.model.tensors().iter().map(|t| t.name.clone()).collect()
    }

    /// `(dtype, shape, byte length, bytes per row or None)` of a target tensor.
    fn info(&self, name: &str) -> PyResult<(String, Vec<u64>, u64, Option<u64>)> {
        let info = || -> tpde::Result<_> {
            let tensor = self.model.tensor(name)?;
            Ok((tensor.dtype_name.clone(), tensor.shape.clone(), tensor.byte_len()?, DeltaModel::row_bytes(tensor)?))
        };
        info().map_err(|e| to_py(&e))
    }

    /// The `__metadata__` of the target's first file that has one, as JSON text.
    fn metadata_json(&self) -> Option<String> {
        self.model.delta().header().target.files.iter().find_map(|file| {
            let header: serde_json::Value = serde_json::from_str(&file.safetensors_header).ok()?;
            header.get("__metadata__").filter(|m| m.is_object()).map(serde_json::Value::to_string)
        })
    }

    /// Whether the delta needs a base.
    #[getter]
    fn needs_base(&self) -> bool {
        self.model.delta().header().needs_base()
    }

    /// Rebuilds tensor `name` into `out`, a writable C-contiguous array of exactly
    /// its bytes.
    fn decode_into(&self, py: Python<'_>, name: &str, out: &Bound<'_, PyAny>) -> PyResult<()> {
        let mut out = HostBuffer::new(out, true)?;
        let tensor = self.model.tensor(name).map_err(|e| to_py(&e))?;
        run_interruptible(py, None, |interrupt| self.model.decode_into(tensor, out.as_mut_slice(), interrupt))
    }

    /// Rebuilds rows `start..stop` of tensor `name` into `out`, decoding only the
    /// chunks that overlap them.
    fn decode_rows_into(
        &self,
        py: Python<'_>,
        name: &str,
        start: u64,
        stop: u64,
        out: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let mut out = HostBuffer::new(out, true)?;
        let tensor = self.model.tensor(name).map_err(|e| to_py(&e))?;
        run_interruptible(py, None, |interrupt| {
            self.model.decode_rows_into(tensor, start..stop, out.as_mut_slice(), interrupt)
        })
    }
}

#[pymodule]
fn _tpde(module: &Bound<'_, PyModule>) -> PyResult<()> {
    module.add("TpdeError", module.py().get_type::<TpdeError>())?;
    module.add("DEFAULT_CHUNK_WORDS", tpde::DEFAULT_CHUNK_WORDS)?;
    module.add_function(wrap_pyfunction!(encode, module)?)?;
    module.add_function(wrap_pyfunction!(apply, module)?)?;
    module.add_function(wrap_pyfunction!(verify, module)?)?;
    module.add_function(wrap_pyfunction!(inspect_json, module)?)?;
    module.add_function(wrap_pyfunction!(is_url, module)?)?;
    module.add_class::<DeltaReader>()?;
    module.add_class::<series::Series>()?;
    module.add_class::<cuda::DeviceBuffer>()?;
    module.add_function(wrap_pyfunction!(cuda::cuda_load, module)?)?;
    module.add_function(wrap_pyfunction!(cuda::cuda_apply_in_place, module)?)?;
    module.add_function(wrap_pyfunction!(cuda::cuda_empty_cache, module)?)?;
    module.add_function(wrap_pyfunction!(cuda::cuda_set_staging, module)?)?;
    module.add_class::<staged::StagedDelta>()?;
    module.add_function(wrap_pyfunction!(staged::cuda_stage, module)?)?;
    Ok(())
}
