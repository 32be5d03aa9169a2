//! The model-level API: a delta and its base in, the target's tensors out, by
//! name, on the device. The base is a checkpoint on disk (checked by the format
//! library, then uploaded) or tensors already in device memory (matched by name,
//! dtype and shape before anything is written).
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

use cudarc::driver::CudaSlice;
use tpde::{
    format::{tensor_digest, to_hex},
    Checkpoint, DeltaFile, Dtype, Error, ErrorCode, TensorEntry,
};

use crate::delta::{host_bases, tensor_refs_checked_on_upload};
use crate::error::{GpuError, Result};
use crate::pipeline::Loader;

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
        // Chunk checksums are checked batch by batch as the loader uploads:
        // every output is a new buffer, dropped if one fails.
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
