//! The model-level API: a delta and its base in, the target's tensors out, by
//! name, on the device. The base is a checkpoint on disk (checked by the format
//! library, then uploaded) or tensors already in device memory (matched by name,
//! dtype and shape before anything is written). [`Loader::apply_model_in_place`]
//! rebuilds the target inside resident tensors instead, with no second copy of
//! them: the RL weight-sync case.
//!
//! ```no_run
//! use std::path::Path;
//! use std::sync::Arc;
//! use tpde::{Checkpoint, DeltaFile};
//! use tpde_cuda::{Base, Gpu, Loader, LoaderConfig};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let mut loader = Loader::new(Arc::new(Gpu::new(0)?), LoaderConfig::default())?;
//! let base = Checkpoint::open(Path::new("base.safetensors"))?;
//! let delta = DeltaFile::open(Path::new("fine-tune.tpde"))?;
//! for tensor in loader.load_model(&delta, Base::Checkpoint(&base))? {
//!     println!("{} {} {:?}: {} bytes on the device", tensor.name, tensor.dtype, tensor.shape, tensor.buffer.len());
//! }
//! # Ok(())
//! # }
//! ```

use std::collections::HashMap;

use cudarc::driver::{CudaSlice, CudaStream};
use tpde::{
    format::{tensor_digest, to_hex},
    Checkpoint, DeltaFile, Dtype, Error, ErrorCode, TensorEntry,
};

use crate::delta::{host_bases, tensor_refs, tensor_refs_checked_on_upload};
use crate::error::{GpuError, Result};
use crate::gpu::DevRange;
use crate::pipeline::{Loader, TensorRef};

/// A tensor of a base already in device memory. `buffer` holds at least
/// `bytes` bytes (an allocation may be larger than its tensor).
#[derive(Debug, Clone, Copy)]
pub struct ResidentTensor<'b> {
    /// Its name in the checkpoint.
    pub name: &'b str,
    /// Its element type.
    pub dtype: Dtype,
    /// Its shape.
    pub shape: &'b [u64],
    /// Its bytes on the loader's device.
    pub buffer: &'b CudaSlice<u8>,
    /// Its length in bytes.
    pub bytes: usize,
}

/// Where a delta's base is.
#[derive(Debug, Clone, Copy)]
pub enum Base<'b> {
    /// A standalone delta: it has none.
    None,
    /// A checkpoint on disk, checked (names, dtypes, shapes, digests) before
    /// anything is uploaded.
    Checkpoint(&'b Checkpoint),
    /// Tensors already on the device, matched by name, dtype and shape before
    /// anything is written; their bytes are proven by the rebuilt chunks'
    /// digests, and a tensor that fails them has its base hashed, so that a
    /// wrong base reads `E_BASE_DIGEST`.
    Resident(&'b [ResidentTensor<'b>]),
}

/// One rebuilt tensor of the target, in device memory of its own.
#[derive(Debug)]
pub struct DeviceTensor {
    /// Its name in the target.
    pub name: String,
    /// Its element type.
    pub dtype: Dtype,
    /// Its shape.
    pub shape: Vec<u64>,
    /// Its bytes (at least one byte is allocated, also for an empty tensor).
    pub buffer: CudaSlice<u8>,
}

impl Loader {
    /// Rebuilds every tensor of `delta`'s target on the device, against `base`,
    /// into new device buffers, with every rebuilt chunk checked against its
    /// digest unless [`crate::LoaderConfig::verify_digests`] is off.
    ///
    /// # Errors
    /// `E_BASE_REQUIRED`, `E_BASE_MISSING_TENSOR`, `E_BASE_MISMATCH` and
    /// `E_BASE_DIGEST` for a base that does not fit (before anything is written,
    /// except a resident base's digest, found after the rebuild, whose outputs
    /// are then dropped), any format error of the delta, and the loader's errors.
    pub fn load_model(&mut self, delta: &DeltaFile, base: Base<'_>) -> Result<Vec<DeviceTensor>> {
        self.rebuild_model(delta, base).map_err(|e| match e {
            GpuError::Format(e) => GpuError::Format(e.in_file(delta.path())),
            e => e,
        })
    }

    fn rebuild_model(&mut self, delta: &DeltaFile, base: Base<'_>) -> Result<Vec<DeviceTensor>> {
        // Chunk checksums are checked by the loader, in one parallel pass
        // before its first upload, which also brings the mapped file's pages
        // in on every thread at once.
        let refs = tensor_refs_checked_on_upload(delta)?;
        let buffers = match base {
            Base::None => self.load_host_base(&refs, &host_bases(delta, None)?)?,
            Base::Checkpoint(checkpoint) => self.load_host_base(&refs, &host_bases(delta, Some(checkpoint))?)?,
            Base::Resident(resident) => {
                let matched = match_resident(delta, resident)?;
                // A tensor without a base (or with an empty one) reads from a
                // zeroed byte, which the loader reads as zero words.
                let zero = self.zero_byte();
                let bases: Vec<&CudaSlice<u8>> =
                    matched.iter().map(|m| m.map_or(&*zero, |i| resident[i].buffer)).collect();
                match self.load(&refs, &bases) {
                    Err(GpuError::Format(e)) if e.code() == ErrorCode::ChunkDigest => {
                        // Stored bytes whose checksums matched rebuilt a wrong chunk:
                        // the base is the likely fault. Say so where its digest differs.
                        let named = delta
                            .header()
                            .tensors
                            .iter()
                            .zip(&matched)
                            .find(|(t, _)| Some(t.name.as_str()) == e.tensor());
                        if let Some((entry, Some(i))) = named {
                            check_resident_base(self, delta, entry, &resident[*i])?;
                        }
                        return Err(GpuError::Format(e));
                    }
                    loaded => loaded?,
                }
            }
        };
        let tensors = delta.header().tensors.iter().zip(buffers).map(|(t, buffer)| {
            Ok(DeviceTensor { name: t.name.clone(), dtype: t.dtype()?, shape: t.shape.clone(), buffer })
        });
        tensors.collect()
    }
}

/// A tensor of a base in device memory that [`Loader::apply_model_in_place`]
/// may overwrite with its target. `buffer` holds at least `bytes` bytes.
#[derive(Debug)]
pub struct ResidentTensorMut<'b> {
    /// Its name in the checkpoint.
    pub name: &'b str,
    /// Its element type.
    pub dtype: Dtype,
    /// Its shape.
    pub shape: &'b [u64],
    /// Its bytes on the loader's device.
    pub buffer: &'b mut CudaSlice<u8>,
    /// Its length in bytes.
    pub bytes: usize,
}

impl ResidentTensorMut<'_> {
    /// The same tensor, read only.
    #[must_use]
    pub fn view(&self) -> ResidentTensor<'_> {
        ResidentTensor { name: self.name, dtype: self.dtype, shape: self.shape, buffer: self.buffer, bytes: self.bytes }
    }
}

/// What [`Loader::apply_model_in_place`] made of one tensor of the target.
#[derive(Debug)]
pub enum RebuiltTensor {
    /// Rebuilt inside the resident tensor at this index of the call's slice.
    InPlace(usize),
    /// Rebuilt into memory of its own: it has no resident tensor, or one of
    /// another dtype or shape.
    New(DeviceTensor),
}

impl Loader {
    /// Turns resident tensors that hold `delta`'s base into its target with no
    /// second copy of them: the RL weight-sync case. Returns one result per
    /// tensor of the target, in the delta's order.
    ///
    /// - A tensor whose resident tensor (found by name) has the target's dtype
    ///   and shape is rebuilt inside it; the others are rebuilt into new
    ///   buffers first, before anything is overwritten. Resident tensors that
    ///   the target lacks are left as they are.
    /// - Every chunk's checksum is checked before the first write.
    /// - With `check_base`, every base tensor's digest is checked too, from a
    ///   copy on the host, so that a wrong base is `E_BASE_DIGEST` with nothing
    ///   written. Without it, a wrong base is found by the rebuilt chunks'
    ///   digests (`E_CHUNK_DIGEST`) only after the tensors were overwritten:
    ///   that is for resident tensors known to hold the base, such as the result
    ///   of an earlier call.
    ///
    /// # Errors
    /// `E_BASE_REQUIRED`, `E_BASE_MISSING_TENSOR`, `E_BASE_MISMATCH` and
    /// `E_BASE_DIGEST` for a base that does not fit, `E_INVALID_ARGUMENT` for
    /// tensors to rebuild in place that share memory (tied weights: each would
    /// be rebuilt on top of the other), any format error of the delta, and the
    /// loader's errors.
    pub fn apply_model_in_place(
        &mut self,
        delta: &DeltaFile,
        resident: &mut [ResidentTensorMut<'_>],
        check_base: bool,
    ) -> Result<Vec<RebuiltTensor>> {
        self.rebuild_in_place(delta, resident, check_base).map_err(|e| match e {
            GpuError::Format(e) => GpuError::Format(e.in_file(delta.path())),
            e => e,
        })
    }

    fn rebuild_in_place(
        &mut self,
        delta: &DeltaFile,
        resident: &mut [ResidentTensorMut<'_>],
        check_base: bool,
    ) -> Result<Vec<RebuiltTensor>> {
        let refs = tensor_refs(delta, true)?;
        let entries = &delta.header().tensors;
        // Every base is read (checked, or rebuilt into a new buffer) before any
        // tensor is overwritten.
        let (matched, in_place, new) = {
            let views: Vec<ResidentTensor<'_>> = resident.iter().map(ResidentTensorMut::view).collect();
            let matched = match_resident(delta, &views)?;
            let mut in_place = Vec::with_capacity(entries.len());
            for (t, m) in entries.iter().zip(&matched) {
                let dtype = t.dtype()?;
                in_place.push(m.is_some_and(|i| {
                    let r = &views[i];
                    r.dtype == dtype && r.shape == t.shape.as_slice() && r.bytes > 0
                }));
            }
            check_disjoint(self.gpu().stream(), &views, &matched, &in_place)?;
            if check_base {
                for (entry, m) in entries.iter().zip(&matched) {
                    if let Some(i) = m {
                        check_resident_base(self, delta, entry, &views[*i])?;
                    }
                }
            }
            let zero = self.zero_byte();
            let (new_refs, new_bases): (Vec<TensorRef<'_>>, Vec<&CudaSlice<u8>>) = refs
                .iter()
                .zip(&matched)
                .zip(&in_place)
                .filter(|(_, &inside)| !inside)
                .map(|((t, m), _)| (t.clone(), m.map_or(&*zero, |i| views[i].buffer)))
                .unzip();
            let new = self.load(&new_refs, &new_bases)?;
            (matched, in_place, new)
        };
        let main = self.gpu().stream().clone();
        let mut in_refs = Vec::new();
        let mut ranges = Vec::new();
        for ((t, m), &inside) in refs.iter().zip(&matched).zip(&in_place) {
            if let (true, Some(i)) = (inside, m) {
                in_refs.push(t.clone());
                ranges.push(DevRange::of(&*resident[*i].buffer, &main, 0, t.bytes())?);
            }
        }
        // The exclusive borrow of `resident` covers the writes.
        self.apply_in_place_ranges(&in_refs, &ranges)?;
        let mut new = new.into_iter();
        entries
            .iter()
            .zip(matched.iter().zip(&in_place))
            .map(|(t, (m, &inside))| match (inside, m) {
                (true, Some(i)) => Ok(RebuiltTensor::InPlace(*i)),
                _ => {
                    let buffer = new.next().ok_or_else(|| GpuError::invalid("fewer rebuilt tensors than planned"))?;
                    let (name, shape) = (t.name.clone(), t.shape.clone());
                    Ok(RebuiltTensor::New(DeviceTensor { name, dtype: t.dtype()?, shape, buffer }))
                }
            })
            .collect()
    }
}

/// Refuses tensors to rebuild in place that share memory (tied weights): each
/// would be rebuilt on top of the other.
fn check_disjoint(
    stream: &CudaStream,
    resident: &[ResidentTensor<'_>],
    matched: &[Option<usize>],
    in_place: &[bool],
) -> Result<()> {
    let mut ranges = Vec::new();
    for (m, &inside) in matched.iter().zip(in_place) {
        if let (true, Some(i)) = (inside, m) {
            let r = &resident[*i];
            let range = DevRange::of(r.buffer, stream, 0, r.bytes)?;
            ranges.push((range.ptr(), range.ptr().saturating_add(r.bytes as u64), r.name));
        }
    }
    ranges.sort_unstable();
    for pair in ranges.windows(2) {
        if pair[1].0 < pair[0].1 {
            return Err(GpuError::invalid(format!(
                "tensors {:?} and {:?} share memory (tied weights?): rebuild them out of place",
                pair[0].2, pair[1].2
            )));
        }
    }
    Ok(())
}

/// For each tensor of `delta`, the index of the resident tensor that is its
/// base (`None` for a tensor without one): the checks of the library's
/// `resolve_base` that need no bytes (spec §11.2), with its codes.
///
/// # Errors
/// `E_BASE_REQUIRED`, `E_BASE_MISSING_TENSOR` or `E_BASE_MISMATCH`, naming the
/// delta and the tensor.
pub fn match_resident(delta: &DeltaFile, resident: &[ResidentTensor<'_>]) -> tpde::Result<Vec<Option<usize>>> {
    let by_name: HashMap<&str, usize> = resident.iter().enumerate().map(|(i, r)| (r.name, i)).collect();
    if delta.header().needs_base() && resident.is_empty() {
        return Err(Error::new(ErrorCode::BaseRequired, "this delta needs a base").in_file(delta.path()));
    }
    delta
        .header()
        .tensors
        .iter()
        .map(|t| {
            let Some(base) = &t.base else { return Ok(None) };
            let fault = |code, message: String| Err(Error::new(code, message).in_file(delta.path()).in_tensor(&t.name));
            let Some(&i) = by_name.get(t.name.as_str()) else {
                return fault(ErrorCode::BaseMissingTensor, "the base has no tensor of this name".into());
            };
            let r = &resident[i];
            if r.dtype.as_str() != t.dtype_name || r.shape != base.shape.as_slice() {
                let message = format!(
                    "the base tensor is {} {:?} but the delta expects {} {:?}",
                    r.dtype, r.shape, t.dtype_name, base.shape
                );
                return fault(ErrorCode::BaseMismatch, message);
            }
            if r.buffer.len() < r.bytes {
                return fault(
                    ErrorCode::InvalidArgument,
                    format!("the base buffer holds fewer than its {} bytes", r.bytes),
                );
            }
            Ok(Some(i))
        })
        .collect()
}

/// Checks a resident base tensor's bytes against the digest `entry` pins, from
/// a copy on the host (`E_BASE_DIGEST` where they differ).
///
/// # Errors
/// `E_BASE_DIGEST`, and the device's errors while copying.
pub fn check_resident_base(
    loader: &Loader,
    delta: &DeltaFile,
    entry: &TensorEntry,
    base: &ResidentTensor<'_>,
) -> Result<()> {
    let Some(pinned) = &entry.base else { return Ok(()) };
    let mut bytes = vec![0u8; base.bytes];
    if base.bytes > 0 {
        let stream = loader.gpu().stream();
        stream.memcpy_dtoh(&base.buffer.slice(..base.bytes), bytes.as_mut_slice())?;
        stream.synchronize()?;
    }
    let chunk_bytes = usize::try_from(entry.chunk_words)
        .ok()
        .and_then(|w| w.checked_mul(entry.word_width().ok()?.bytes()))
        .ok_or_else(|| GpuError::invalid("the chunk size overflows"))?;
    if to_hex(&tensor_digest(&bytes, chunk_bytes)?) != pinned.digest {
        let message = "the base tensor's content differs from the one the delta was made against";
        return Err(Error::new(ErrorCode::BaseDigest, message).in_file(delta.path()).in_tensor(&entry.name).into());
    }
    Ok(())
}
