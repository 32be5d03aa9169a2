//! `tpde.torch.stage`: a delta uploaded once and decoded on the GPU
//! (`Loader::stage_on_device`, or `Loader::stage_for_base` against a resident
//! base), then applied with kernels only, in place or into new buffers.
//!
//! A [`StagedDelta`] owns its device memory through the `DeviceDelta`, whose
//! buffer holds its stream and the device's primary context, not the loader:
//! it stays valid when `cuda_set_staging` closes the loaders, and the loader
//! opened next on that device applies it (both use the primary context).

use std::collections::HashMap;
use std::mem::ManuallyDrop;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use pyo3::prelude::*;
use tpde::{DeltaFile, Error, ErrorCode, TensorEntry};
use tpde_cuda::{
    check_resident_base,
    cudarc::driver::{CudaContext, CudaSlice},
    tensor_refs, DeviceDelta, GpuError, Loader, ResidentTensor,
};

use crate::cuda::{
    borrow_all, invalid, keeping_current_context, open_delta, resident_tensors, with_loader, CudaResult, DeviceBuffer,
    Rebuilt, ResidentArg,
};
use crate::errors::Fault;
use crate::interrupt::run_interruptible_with;

/// A delta staged in the memory of GPU `device`: its streams decoded there
/// (those coded against the base too, where it was staged for one), ready to
/// be applied again and again.
#[pyclass(frozen, module = "tpde._tpde")]
pub struct StagedDelta {
    /// Dropped by `Drop`, with the device's context bound.
    delta: ManuallyDrop<DeviceDelta>,
    context: Arc<CudaContext>,
    device: usize,
    /// The delta file, named in errors.
    path: PathBuf,
    /// The target's tensors, in the delta's order: what a base must match.
    tensors: Vec<TensorEntry>,
    for_base: bool,
}

impl Drop for StagedDelta {
    fn drop(&mut self) {
        keeping_current_context(|| {
            let _ = self.context.bind_to_thread();
            // SAFETY: taken once, here; the field is never used after.
            drop(unsafe { ManuallyDrop::take(&mut self.delta) });
        });
    }
}

/// Stages the delta at `delta` on GPU `device`: with `base_tensors` (resident
/// tensors holding its base, matched by name, dtype and shape, and with
/// `check_base` checked against their digests first), for that base.
#[pyfunction]
#[pyo3(signature = (delta, *, device, base_tensors, check_base))]
pub fn cuda_stage(
    py: Python<'_>,
    delta: PathBuf,
    device: usize,
    base_tensors: Option<Vec<ResidentArg>>,
    check_base: bool,
) -> PyResult<StagedDelta> {
    run_interruptible_with(py, None, |_| {
        with_loader(device, |loader| {
            let file = &open_delta(&delta)?;
            let path = file.path().to_path_buf();
            let tensors = file.header().tensors.clone();
            let staged = match &base_tensors {
                None => stage_alone(loader, file),
                Some(resident) => stage_for_base(loader, file, &tensors, resident, check_base),
            }
            .map_err(|e| in_file(e, &path))?;
            let context = loader.gpu().stream().context().clone();
            let for_base = base_tensors.is_some();
            Ok(StagedDelta { delta: ManuallyDrop::new(staged), context, device, path, tensors, for_base })
        })
    })
}

/// The file's chunk checksums are checked here, once: applies read only the
/// staged streams.
fn stage_alone(loader: &mut Loader, file: &DeltaFile) -> Result<DeviceDelta, GpuError> {
    loader.stage_on_device(&tensor_refs(file, true)?)
}

fn stage_for_base(
    loader: &mut Loader,
    file: &DeltaFile,
    tensors: &[TensorEntry],
    resident: &[ResidentArg],
    check_base: bool,
) -> Result<DeviceDelta, GpuError> {
    let refs = tensor_refs(file, true)?;
    let matched = match_base(tensors, resident, file.path())?;
    let zero = loader.zero_byte();
    let (borrowed, index) = borrow_all(loader, resident);
    let views = resident_tensors(resident, &borrowed, &index, &zero)?;
    if check_base {
        for (entry, m) in tensors.iter().zip(&matched) {
            if let Some(i) = m {
                check_resident_base(loader, file, entry, &views[*i])?;
            }
        }
    }
    // `stage_for_base` takes a base as long as its target at least. A shorter
    // or missing one is given as the words an apply rebuilds the tensor
    // against: the base's whole words, then zeros.
    let mut padded = Vec::with_capacity(tensors.len());
    for (entry, m) in tensors.iter().zip(&matched) {
        let bytes = byte_len(entry)?;
        let base = m.map(|i| &views[i]);
        let short = base.is_none_or(|b| b.bytes < bytes);
        padded.push(if short { Some(padded_base(loader, base, bytes, word_bytes(entry)?)?) } else { None });
    }
    let bases: Vec<&CudaSlice<u8>> =
        matched.iter().zip(&padded).map(|(m, p)| p.as_ref().or(m.map(|i| views[i].buffer)).unwrap_or(&*zero)).collect();
    loader.stage_for_base(&refs, &bases)
}

/// A buffer of `len` bytes holding what an apply rebuilds a tensor against
/// where its base is shorter than its target or absent (as `apply_staged`
/// prepares it): the base's whole words, then zeros. At least one byte.
fn padded_base(
    loader: &Loader,
    base: Option<&ResidentTensor<'_>>,
    len: usize,
    word_bytes: usize,
) -> Result<CudaSlice<u8>, GpuError> {
    let stream = loader.gpu().stream();
    let mut out = stream.alloc_zeros::<u8>(len.max(1))?;
    let words = base.map_or(0, |b| b.bytes.min(len) / word_bytes * word_bytes);
    if let Some(b) = base.filter(|_| words > 0) {
        // Ordered before the loader's kernels, which wait for its main stream.
        stream.memcpy_dtod(&b.buffer.slice(..words), &mut out.slice_mut(..words))?;
    }
    Ok(out)
}

fn byte_len(entry: &TensorEntry) -> tpde::Result<usize> {
    let bytes = entry.byte_len()?;
    usize::try_from(bytes)
        .map_err(|_| Error::new(ErrorCode::InvalidArgument, "the tensor is too large").in_tensor(&entry.name))
}

fn word_bytes(entry: &TensorEntry) -> tpde::Result<usize> {
    Ok(entry.word_width()?.bytes())
}

/// For each tensor of the target, the index of the resident tensor that is its
/// base (`None` for a tensor without one), by name, dtype and shape, with the
/// codes of `tpde_cuda::match_resident`.
fn match_base(tensors: &[TensorEntry], resident: &[ResidentArg], path: &Path) -> tpde::Result<Vec<Option<usize>>> {
    if resident.is_empty() && tensors.iter().any(TensorEntry::needs_base) {
        return Err(Error::new(ErrorCode::BaseRequired, "this delta needs a base").in_file(path));
    }
    let by_name: HashMap<&str, usize> = resident.iter().enumerate().map(|(i, r)| (r.0.as_str(), i)).collect();
    tensors
        .iter()
        .map(|t| {
            let Some(base) = &t.base else { return Ok(None) };
            let fault = |code, message: String| Err(Error::new(code, message).in_file(path).in_tensor(&t.name));
            let Some(&i) = by_name.get(t.name.as_str()) else {
                return fault(ErrorCode::BaseMissingTensor, "the base has no tensor of this name".into());
            };
            let (_, dtype, shape, _, _) = &resident[i];
            if *dtype != t.dtype_name || *shape != base.shape {
                let message = format!(
                    "the base tensor is {dtype} {shape:?} but the delta expects {} {:?}",
                    t.dtype_name, base.shape
                );
                return fault(ErrorCode::BaseMismatch, message);
            }
            Ok(Some(i))
        })
        .collect()
}

/// A format error of the loader's named in `path`, as the model API names it.
fn in_file(e: GpuError, path: &Path) -> GpuError {
    match e {
        GpuError::Format(e) => GpuError::Format(e.in_file(path)),
        e => e,
    }
}

/// How the in-place apply rebuilds one tensor of the target.
enum Target {
    /// Inside torch's tensor of that name, borrowed.
    InPlace,
    /// Into a new buffer of the loader's, first holding the words it is
    /// rebuilt against.
    New,
    /// It has no bytes: the call gets a borrowed slice of none, and the result
    /// is this empty buffer.
    Empty(CudaSlice<u8>),
}

/// One buffer per tensor of a staged delta, in its order, as
/// `Loader::apply_staged_in_place` takes them: torch's tensors, borrowed and
/// never freed, and new buffers for the tensors that cannot be rebuilt in
/// place (no base, or one of another shape).
struct InPlaceTargets {
    slices: Vec<CudaSlice<u8>>,
    targets: Vec<Target>,
}

impl Drop for InPlaceTargets {
    fn drop(&mut self) {
        for (slice, target) in self.slices.drain(..).zip(&self.targets) {
            if !matches!(target, Target::New) {
                // Gives up the slice without freeing the memory, which torch owns.
                let _ = slice.leak();
            }
        }
    }
}

impl InPlaceTargets {
    /// The buffers of `tensors`, over the resident tensors `resident` (seen as
    /// `views`), of which `matched[k]` is the base of tensor `k`. Every new
    /// buffer is allocated and filled here, before anything is written in
    /// place.
    ///
    /// # Errors
    /// `E_INVALID_ARGUMENT` for tensors to rebuild in place that share memory
    /// (tied weights: each would be rebuilt on top of the other).
    ///
    /// # Safety
    /// Each resident tensor's address must point to its bytes of device memory
    /// of the loader's device, which stay allocated, and which nothing else
    /// uses, while the result lives.
    unsafe fn new(
        loader: &Loader,
        tensors: &[TensorEntry],
        resident: &[ResidentArg],
        views: &[ResidentTensor<'_>],
        matched: &[Option<usize>],
    ) -> CudaResult<Self> {
        let stream = loader.gpu().stream();
        let mut this = Self { slices: Vec::with_capacity(tensors.len()), targets: Vec::with_capacity(tensors.len()) };
        let mut in_place = Vec::new();
        for (entry, m) in tensors.iter().zip(matched) {
            let bytes = byte_len(entry)?;
            // A matched base has the target's dtype; of its shape too, it holds
            // the target's bytes.
            if let Some(i) = m.filter(|&i| views[i].shape == entry.shape.as_slice()) {
                let ptr = resident[i].3;
                // SAFETY: as the caller promises; a slice of no bytes (whose
                // tensor may have no address) is never read or written.
                this.slices.push(unsafe { stream.upgrade_device_ptr::<u8>(ptr, bytes) });
                this.targets.push(Target::InPlace);
                if bytes > 0 {
                    in_place.push((ptr, ptr.saturating_add(bytes as u64), views[i].name));
                }
            } else if bytes == 0 {
                // SAFETY: a slice of no bytes is never read or written, and it
                // is leaked, never freed.
                this.slices.push(unsafe { stream.upgrade_device_ptr::<u8>(0, 0) });
                this.targets.push(Target::Empty(stream.alloc_zeros::<u8>(1)?));
            } else {
                let base = m.map(|i| &views[i]);
                this.slices.push(padded_base(loader, base, bytes, word_bytes(entry)?)?);
                this.targets.push(Target::New);
            }
        }
        in_place.sort_unstable();
        for pair in in_place.windows(2) {
            if pair[1].0 < pair[0].1 {
                return Err(invalid(format!(
                    "tensors {:?} and {:?} share memory (tied weights?): rebuild them with load",
                    pair[0].2, pair[1].2
                )));
            }
        }
        Ok(this)
    }

    /// Per tensor, the new buffer of its result (of its `bytes`, in order), or
    /// `None` where it was rebuilt in place.
    fn into_results(mut self, bytes: &[usize], device: usize) -> Vec<Option<DeviceBuffer>> {
        let slices = std::mem::take(&mut self.slices);
        let targets = std::mem::take(&mut self.targets);
        slices
            .into_iter()
            .zip(targets)
            .zip(bytes)
            .map(|((slice, target), &len)| match target {
                Target::New => Some(DeviceBuffer::new(slice, len, device)),
                Target::InPlace => {
                    let _ = slice.leak();
                    None
                }
                Target::Empty(buffer) => {
                    let _ = slice.leak();
                    Some(DeviceBuffer::new(buffer, 0, device))
                }
            })
            .collect()
    }
}

impl StagedDelta {
    /// Runs `work` on the loader of the delta's device with the resident
    /// tensors `base` matched to the target's tensors and borrowed: the index
    /// of each tensor's base among `base` (`None` for none), and `base` as the
    /// loader sees them (an empty tensor reads from a zero byte).
    fn with_base<T: Send>(
        &self,
        py: Python<'_>,
        base: &[ResidentArg],
        work: impl FnOnce(&mut Loader, &[Option<usize>], &[ResidentTensor<'_>]) -> CudaResult<T> + Send,
    ) -> PyResult<T> {
        run_interruptible_with(py, None, |_| {
            with_loader(self.device, |loader| {
                let matched = match_base(&self.tensors, base, &self.path)?;
                let zero = loader.zero_byte();
                let (borrowed, index) = borrow_all(loader, base);
                let views = resident_tensors(base, &borrowed, &index, &zero)?;
                work(loader, &matched, &views)
            })
        })
    }

    fn bytes(&self) -> CudaResult<Vec<usize>> {
        Ok(self.tensors.iter().map(byte_len).collect::<tpde::Result<_>>()?)
    }

    fn results(&self, buffers: impl Iterator<Item = Option<DeviceBuffer>>) -> Vec<Rebuilt> {
        self.tensors
            .iter()
            .zip(buffers)
            .map(|(t, buffer)| (t.name.clone(), t.dtype_name.clone(), t.shape.clone(), buffer))
            .collect()
    }
}

#[pymethods]
impl StagedDelta {
    /// The CUDA device ordinal.
    #[getter]
    fn device(&self) -> usize {
        self.device
    }

    /// Device bytes that the staged streams take.
    #[getter]
    fn device_bytes(&self) -> usize {
        self.delta.device_bytes()
    }

    /// Bytes of all the target's tensors.
    #[getter]
    fn target_bytes(&self) -> usize {
        self.delta.target_bytes()
    }

    /// Whether some stream is decoded at each apply, against that apply's
    /// base: a lane rANS stream coded against the base, staged without one.
    #[getter]
    fn decodes_at_apply(&self) -> bool {
        self.delta.decodes_at_apply()
    }

    /// Whether it was staged for a base (`Loader::stage_for_base`).
    #[getter]
    fn for_base(&self) -> bool {
        self.for_base
    }

    /// `(name, dtype, shape)` of each tensor of the target, in the delta's order.
    #[getter]
    fn tensors(&self) -> Vec<(String, String, Vec<u64>)> {
        self.tensors.iter().map(|t| (t.name.clone(), t.dtype_name.clone(), t.shape.clone())).collect()
    }

    /// Rebuilds the target inside `base_tensors` (`Loader::apply_staged_in_place`):
    /// a tensor whose base has the target's shape is overwritten in place
    /// (returned with no buffer); the others are rebuilt into new buffers,
    /// allocated before anything is written. With digests, a base that does not
    /// hold the words the delta was staged with or made against fails with
    /// `E_CHUNK_DIGEST` after the tensors were overwritten.
    fn apply_in_place(&self, py: Python<'_>, base_tensors: Vec<ResidentArg>) -> PyResult<Vec<Rebuilt>> {
        let bytes = self.bytes().map_err(Fault::into_py)?;
        self.with_base(py, &base_tensors, |loader, matched, views| {
            // SAFETY: Python passes contiguous CUDA tensors of this device that
            // it keeps alive for the call, after synchronizing torch's current
            // stream, and uses none of them until the call returns; tensors that
            // share memory are refused before anything is written.
            let mut targets = unsafe { InPlaceTargets::new(loader, &self.tensors, &base_tensors, views, matched) }?;
            loader.apply_staged_in_place(&self.delta, &mut targets.slices).map_err(|e| in_file(e, &self.path))?;
            Ok(self.results(targets.into_results(&bytes, self.device).into_iter()))
        })
    }

    /// Rebuilds the target from `base_tensors` into new buffers
    /// (`Loader::apply_staged`), the base only read.
    fn load(&self, py: Python<'_>, base_tensors: Vec<ResidentArg>) -> PyResult<Vec<Rebuilt>> {
        let bytes = self.bytes().map_err(Fault::into_py)?;
        self.with_base(py, &base_tensors, |loader, matched, views| {
            let zero = loader.zero_byte();
            let bases: Vec<&CudaSlice<u8>> = matched.iter().map(|m| m.map_or(&*zero, |i| views[i].buffer)).collect();
            let stream = loader.gpu().stream();
            let mut outs = Vec::with_capacity(bytes.len());
            for &len in &bytes {
                // SAFETY: every byte of a target is written by the apply (the
                // base's copy, the zero fill past a shorter base, or dense
                // chunks covering it), as for `Loader::load`, and the digests
                // read them all before the buffers are returned.
                outs.push(unsafe { stream.alloc::<u8>(len.max(1)) }?);
            }
            loader.apply_staged(&self.delta, &bases, &mut outs).map_err(|e| in_file(e, &self.path))?;
            let buffers = outs.into_iter().zip(&bytes).map(|(o, &len)| Some(DeviceBuffer::new(o, len, self.device)));
            Ok(self.results(buffers))
        })
    }

    fn __repr__(&self) -> String {
        format!(
            "StagedDelta({:?}, device=cuda:{}, tensors={}, device_bytes={}, for_base={})",
            self.path.display().to_string(),
            self.device,
            self.tensors.len(),
            self.delta.device_bytes(),
            if self.for_base { "True" } else { "False" }
        )
    }
}
