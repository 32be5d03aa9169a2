//! `tpde.torch` on CUDA: deltas rebuilt on the GPU by the `tpde-cuda` loader, the
//! results handed to torch without a copy.
//!
//! - Results live in [`DeviceBuffer`]s, which own their device memory and expose it
//!   through `__cuda_array_interface__`; `torch.as_tensor` wraps one and keeps it
//!   alive as long as the tensor lives.
//! - Tensors that torch owns (a resident base, a state dict applied in place) are
//!   borrowed as cudarc slices that are never freed ([`Borrowed`]).
//!
//! Both sides use the device's primary context: cudarc's `CudaContext::new`
//! retains it (`cuDevicePrimaryCtxRetain`), and so does torch's runtime API, so a
//! pointer from either is valid in the other. Python synchronizes torch's current
//! stream before a call; every call synchronizes the loader's stream before it
//! returns, so results are ready for any stream (`"stream": None`).

use std::collections::btree_map::{BTreeMap, Entry};
use std::path::PathBuf;
use std::sync::{Arc, LazyLock, Mutex, PoisonError};

use pyo3::prelude::*;
use pyo3::types::PyDict;
use tpde::{DeltaFile, Dtype, Error, ErrorCode};
use tpde_cuda::{
    cudarc::driver::result::ctx,
    cudarc::driver::{CudaSlice, DevicePtr},
    Base, Gpu, GpuError, Loader, LoaderConfig, RebuiltTensor, ResidentTensor, ResidentTensorMut,
};

use crate::errors::{coded, to_py, Fault};
use crate::interrupt::run_interruptible_with;

/// A failure of the CUDA path: the library's (a file, the base) or the loader's.
pub enum CudaFault {
    Library(tpde::Error),
    Gpu(GpuError),
}

impl From<tpde::Error> for CudaFault {
    fn from(e: tpde::Error) -> Self {
        Self::Library(e)
    }
}

impl From<GpuError> for CudaFault {
    fn from(e: GpuError) -> Self {
        match e {
            GpuError::Format(e) => Self::Library(e),
            e => Self::Gpu(e),
        }
    }
}

impl From<tpde_cuda::cudarc::driver::DriverError> for CudaFault {
    fn from(e: tpde_cuda::cudarc::driver::DriverError) -> Self {
        Self::Gpu(GpuError::from(e))
    }
}

impl Fault for CudaFault {
    /// Faults of a file or of the base keep the library's codes (a kernel's flag
    /// too, where the library reports that fault); the loader's own become
    /// `E_GPU_*` from its stable code (`gpu.no_driver` is `E_GPU_NO_DRIVER`).
    fn into_py(self) -> PyErr {
        match self {
            Self::Library(e) => to_py(&e),
            Self::Gpu(e) => match e.format_code() {
                Some(code) => to_py(&Error::new(code, e.to_string())),
                None if matches!(e, GpuError::InvalidArgument(_)) => {
                    to_py(&Error::new(ErrorCode::InvalidArgument, e.to_string()))
                }
                None => coded(&format!("E_{}", e.code().replace('.', "_").to_uppercase()), &e.to_string()),
            },
        }
    }
}

pub(crate) type CudaResult<T> = Result<T, CudaFault>;

pub(crate) fn invalid(message: impl Into<String>) -> CudaFault {
    CudaFault::Library(Error::new(ErrorCode::InvalidArgument, message))
}

/// One loader per device for the life of the process: opening a device compiles
/// the kernels (NVRTC) and the loader holds a page-locked staging ring, both too
/// costly to repeat per call. Calls on one device take turns. The configuration
/// is that of the loaders opened next ([`cuda_set_staging`]).
static LOADERS: LazyLock<Mutex<(LoaderConfig, BTreeMap<usize, Loader>)>> =
    LazyLock::new(|| Mutex::new((LoaderConfig::default(), BTreeMap::new())));

pub(crate) fn with_loader<T>(device: usize, work: impl FnOnce(&mut Loader) -> CudaResult<T>) -> CudaResult<T> {
    // A panic inside the loader leaves it usable: every call starts afresh.
    let mut guard = LOADERS.lock().unwrap_or_else(PoisonError::into_inner);
    let (config, loaders) = &mut *guard;
    let loader = match loaders.entry(device) {
        Entry::Occupied(entry) => entry.into_mut(),
        Entry::Vacant(entry) => entry.insert(Loader::new(Arc::new(Gpu::new(device)?), *config)?),
    };
    let result = work(loader);
    // Whatever happened, nothing of this call is still running on the device when
    // it returns: results are complete, and borrowed memory is no longer in use.
    let synced = loader.gpu().stream().synchronize();
    let value = result?;
    synced?;
    Ok(value)
}

/// Slots and MiB per slot that [`cuda_set_staging`] accepts: a slot holds a
/// chunk's decoded streams, and 16 MiB hold any chunk of the default writer.
const STAGING_SLOTS: std::ops::RangeInclusive<usize> = 1..=64;
const STAGING_SLOT_MIB: std::ops::RangeInclusive<usize> = 16..=1024;

/// Sets the staging memory of the GPU loaders: `slots` page-locked host buffers
/// of `slot_mib` MiB each per device, and as much device memory; either left
/// out keeps [`LoaderConfig::default`]'s. Loaders already open are closed, their
/// memory given back, and open again with it at their next call.
#[pyfunction]
#[pyo3(signature = (*, slots=None, slot_mib=None))]
pub fn cuda_set_staging(py: Python<'_>, slots: Option<usize>, slot_mib: Option<usize>) -> PyResult<()> {
    let default = LoaderConfig::default();
    let slots = slots.unwrap_or(default.slots);
    let slot_mib = slot_mib.unwrap_or(default.slot_bytes >> 20);
    if !STAGING_SLOTS.contains(&slots) || !STAGING_SLOT_MIB.contains(&slot_mib) {
        let message = format!(
            "staging of {slots} slots of {slot_mib} MiB: slots must be {} to {} and slot_mib {} to {}",
            STAGING_SLOTS.start(),
            STAGING_SLOTS.end(),
            STAGING_SLOT_MIB.start(),
            STAGING_SLOT_MIB.end()
        );
        return Err(to_py(&Error::new(ErrorCode::InvalidArgument, message)));
    }
    py.detach(|| {
        let mut guard = LOADERS.lock().unwrap_or_else(PoisonError::into_inner);
        let (config, loaders) = &mut *guard;
        *config = LoaderConfig { slots, slot_bytes: slot_mib << 20, ..default };
        loaders.clear();
    });
    Ok(())
}

/// Gives back to the driver the device memory that the tensors of earlier loads
/// on GPU `device` held and that is now free (the loader keeps it for the next
/// load, as torch's caching allocator does). Nothing happens where no load ran.
#[pyfunction]
#[pyo3(signature = (*, device))]
pub fn cuda_empty_cache(py: Python<'_>, device: usize) -> PyResult<()> {
    py.detach(|| {
        let guard = LOADERS.lock().unwrap_or_else(PoisonError::into_inner);
        match guard.1.get(&device) {
            Some(loader) => loader.gpu().release_cached_memory().map_err(CudaFault::from),
            None => Ok(()),
        }
    })
    .map_err(Fault::into_py)
}

/// Device memory rebuilt by tpde, owned by this object and lent to torch through
/// `__cuda_array_interface__` (`torch.as_tensor(buffer, device=...)`), which keeps
/// the object alive while a tensor uses the memory.
#[pyclass(frozen, module = "tpde._tpde")]
pub struct DeviceBuffer {
    /// Taken when dropped.
    slice: Option<CudaSlice<u8>>,
    /// Bytes of the tensor: the allocation has at least one byte.
    len: usize,
    ptr: u64,
    device: usize,
}

impl DeviceBuffer {
    pub(crate) fn new(slice: CudaSlice<u8>, len: usize, device: usize) -> Self {
        let ptr = {
            let (ptr, _sync) = slice.device_ptr(slice.stream());
            ptr
        };
        Self { slice: Some(slice), len, ptr, device }
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        let Some(slice) = self.slice.take() else { return };
        keeping_current_context(|| {
            // The memory goes back to the pool on the loader's stream, but torch
            // may still have kernels reading it queued on its own streams: wait
            // for the whole device first. Tensors of a loaded model are freed
            // rarely.
            let _ = slice.context().synchronize();
            drop(slice);
        });
    }
}

/// Runs `work`, which binds a context of cudarc's to this thread, then makes
/// current again the context that was: a drop runs on a Python thread, whose
/// current context is torch's (another device's, maybe).
pub(crate) fn keeping_current_context(work: impl FnOnce()) {
    let previous = ctx::get_current();
    work();
    if let Ok(previous) = previous {
        // SAFETY: the context was current on this thread a moment ago, and the
        // primary contexts that torch and cudarc use outlive this call.
        let _ = unsafe { ctx::set_current(previous.unwrap_or(std::ptr::null_mut())) };
    }
}

#[pymethods]
impl DeviceBuffer {
    /// The device address of the first byte.
    #[getter]
    fn ptr(&self) -> u64 {
        self.ptr
    }

    /// Bytes of the tensor.
    #[getter]
    fn nbytes(&self) -> usize {
        self.len
    }

    /// The CUDA device ordinal.
    #[getter]
    fn device(&self) -> usize {
        self.device
    }

    /// The CUDA Array Interface, version 3: a flat array of `nbytes` bytes, ready
    /// for any stream (the loader synchronized before returning it).
    #[getter(__cuda_array_interface__)]
    fn cuda_array_interface<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let interface = PyDict::new(py);
        interface.set_item("shape", (self.len,))?;
        interface.set_item("typestr", "|u1")?;
        interface.set_item("data", (self.ptr, false))?;
        interface.set_item("strides", py.None())?;
        interface.set_item("stream", py.None())?;
        interface.set_item("version", 3)?;
        Ok(interface)
    }

    fn __repr__(&self) -> String {
        format!("DeviceBuffer(ptr={:#x}, nbytes={}, device=cuda:{})", self.ptr, self.len, self.device)
    }
}

/// A tensor that torch owns, as Python passes it: `(name, dtype, shape, device
/// address, bytes)` of a contiguous CUDA tensor on the loader's device.
pub(crate) type ResidentArg = (String, String, Vec<u64>, u64, usize);

/// Device memory that torch owns, seen as cudarc slices for the loader's calls.
/// They are leaked when dropped, never freed: torch frees the memory.
pub(crate) struct Borrowed(Vec<CudaSlice<u8>>);

impl Borrowed {
    /// Borrows `(address, bytes)` of each tensor.
    ///
    /// # Safety
    /// Each address must point to that many bytes of device memory of the
    /// loader's device (its primary context) that stay allocated, and that
    /// nothing else uses, while this value lives.
    unsafe fn new(loader: &Loader, tensors: impl Iterator<Item = (u64, usize)>) -> Self {
        let stream = loader.gpu().stream();
        // SAFETY: as the caller promises; the context has event tracking off
        // (`Gpu::new`), so the slices record no events to wait on.
        Self(tensors.map(|(ptr, len)| unsafe { stream.upgrade_device_ptr::<u8>(ptr, len) }).collect())
    }
}

impl Drop for Borrowed {
    fn drop(&mut self) {
        for slice in self.0.drain(..) {
            // Gives up the slice without freeing the memory, which torch owns.
            let _ = slice.leak();
        }
    }
}

/// The result of one tensor: `(name, dtype, shape, buffer)`, the buffer None for
/// a tensor rebuilt in place.
pub(crate) type Rebuilt = (String, String, Vec<u64>, Option<DeviceBuffer>);

/// Rebuilds every tensor of `delta` on GPU `device` into new device buffers,
/// against `base_path` (a checkpoint, checked by the library before anything is
/// uploaded), or `base_tensors` (resident tensors, matched by name, dtype and
/// shape; every rebuilt chunk is then checked against its digest, and a tensor
/// that fails it has its base checked, to name a wrong base `E_BASE_DIGEST`), or
/// neither for a standalone delta.
#[pyfunction]
#[pyo3(signature = (delta, *, device, base_path, base_tensors))]
pub fn cuda_load(
    py: Python<'_>,
    delta: PathBuf,
    device: usize,
    base_path: Option<PathBuf>,
    base_tensors: Option<Vec<ResidentArg>>,
) -> PyResult<Vec<Rebuilt>> {
    if base_path.is_some() && base_tensors.is_some() {
        return Err(invalid(format!("{} and tensors are two bases", delta.display())).into_py());
    }
    run_interruptible_with(py, None, |_| {
        with_loader(device, |loader| {
            let file = &open_delta(&delta)?;
            let checkpoint = base_path.as_deref().map(tpde_store::OpenedCheckpoint::open).transpose()?;
            let zero = loader.zero_byte();
            let (borrowed, index) = borrow_all(loader, base_tensors.as_deref().unwrap_or_default());
            let resident =
                base_tensors.as_deref().map(|r| resident_tensors(r, &borrowed, &index, &zero)).transpose()?;
            let base = match (checkpoint.as_deref(), &resident) {
                (Some(checkpoint), _) => Base::Checkpoint(checkpoint),
                (None, Some(resident)) => Base::Resident(resident),
                (None, None) => Base::None,
            };
            let outs = loader.load_model(file, base)?;
            Ok(results(file, outs.into_iter().map(|t| Some(t.buffer)), device))
        })
    })
}

/// Opens a delta for the loader: memory-mapped, its stored streams staged
/// through the loader's page-locked ring. A page-locked copy of the whole file
/// (`tpde_cuda::PinnedDelta`) would spare the ring, but allocating and
/// filling it costs more per call than the ring does (H200: 46 ms against
/// 2.4 ms for an 81 MB delta). A delta at a URL is fetched whole first: the
/// loader rebuilds every tensor, so it needs every chunk.
pub(crate) fn open_delta(path: &std::path::Path) -> CudaResult<DeltaFile> {
    let delta = tpde_store::open_delta_at(path)?;
    delta.fetch_all()?;
    Ok(delta)
}

fn results(file: &DeltaFile, outs: impl Iterator<Item = Option<CudaSlice<u8>>>, device: usize) -> Vec<Rebuilt> {
    file.header()
        .tensors
        .iter()
        .zip(outs)
        .map(|(t, out)| {
            let len = out.as_ref().map_or(0, |_| usize::try_from(t.byte_len().unwrap_or(0)).unwrap_or(0));
            (t.name.clone(), t.dtype_name.clone(), t.shape.clone(), out.map(|o| DeviceBuffer::new(o, len, device)))
        })
        .collect()
}

/// Borrows the resident tensors that are not empty (an empty tensor may have no
/// address); returns them and, per resident tensor, its index among them.
pub(crate) fn borrow_all(loader: &Loader, resident: &[ResidentArg]) -> (Borrowed, Vec<Option<usize>>) {
    let mut at = 0;
    let index = resident
        .iter()
        .map(|r| {
            (r.4 > 0).then(|| {
                at += 1;
                at - 1
            })
        })
        .collect();
    // SAFETY: Python passes contiguous CUDA tensors of this device that it keeps
    // alive for the call, after synchronizing torch's current stream; the loader
    // only reads them here.
    let borrowed = unsafe { Borrowed::new(loader, resident.iter().filter(|r| r.4 > 0).map(|r| (r.3, r.4))) };
    (borrowed, index)
}

/// The resident tensors as the loader's model API takes them; an empty one (not
/// borrowed: it may have no address) reads from `zero`.
///
/// # Errors
/// `E_UNKNOWN_DTYPE` for a dtype that is not a safetensors dtype.
pub(crate) fn resident_tensors<'b>(
    resident: &'b [ResidentArg],
    borrowed: &'b Borrowed,
    index: &[Option<usize>],
    zero: &'b CudaSlice<u8>,
) -> tpde::Result<Vec<ResidentTensor<'b>>> {
    resident
        .iter()
        .zip(index)
        .map(|((name, dtype, shape, _, bytes), k)| {
            Ok(ResidentTensor {
                name,
                dtype: dtype.parse::<Dtype>().map_err(|e| e.in_tensor(name))?,
                shape,
                buffer: k.map_or(zero, |k| &borrowed.0[k]),
                bytes: *bytes,
            })
        })
        .collect()
}

/// Rebuilds the target of `delta` inside the resident tensors that hold its base,
/// on GPU `device`, with no second copy of them (`Loader::apply_model_in_place`):
/// a tensor whose target has its dtype and shape is overwritten in place (returned
/// with no buffer); the others are rebuilt into new buffers first, before anything
/// is overwritten. With `check_base`, every base tensor's digest is checked (from
/// a host copy) before anything is written; without, a wrong base is found by the
/// target digests only after the tensors were overwritten.
#[pyfunction]
#[pyo3(signature = (delta, *, device, base_tensors, check_base))]
pub fn cuda_apply_in_place(
    py: Python<'_>,
    delta: PathBuf,
    device: usize,
    base_tensors: Vec<ResidentArg>,
    check_base: bool,
) -> PyResult<Vec<Rebuilt>> {
    run_interruptible_with(py, None, |_| {
        with_loader(device, |loader| {
            let file = &open_delta(&delta)?;
            // An empty tensor may have no address: it gets a byte of its own.
            let mut empty = Vec::new();
            for _ in base_tensors.iter().filter(|r| r.4 == 0) {
                empty.push(loader.gpu().alloc_zeros::<u8>(1)?);
            }
            // SAFETY: Python passes contiguous CUDA tensors of this device that it
            // keeps alive for the call, after synchronizing torch's current
            // stream, and uses none of them until the call returns; tensors that
            // share memory are refused by the loader before anything is written.
            let mut borrowed =
                unsafe { Borrowed::new(loader, base_tensors.iter().filter(|r| r.4 > 0).map(|r| (r.3, r.4))) };
            let (mut filled, mut spare) = (borrowed.0.iter_mut(), empty.iter_mut());
            let mut resident = Vec::with_capacity(base_tensors.len());
            for (name, dtype, shape, _, bytes) in &base_tensors {
                let buffer = if *bytes > 0 { filled.next() } else { spare.next() };
                let buffer = buffer.ok_or_else(|| invalid("fewer buffers than tensors"))?;
                let dtype = dtype.parse::<Dtype>().map_err(|e| e.in_tensor(name))?;
                resident.push(ResidentTensorMut { name, dtype, shape, buffer, bytes: *bytes });
            }
            let rebuilt = loader.apply_model_in_place(file, &mut resident, check_base)?;
            let outs = rebuilt.into_iter().map(|r| match r {
                RebuiltTensor::InPlace(_) => None,
                RebuiltTensor::New(t) => Some(t.buffer),
            });
            Ok(results(file, outs, device))
        })
    })
}
