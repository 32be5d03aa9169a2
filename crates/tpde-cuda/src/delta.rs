//! Maps a `tpde` delta file onto the loader's inputs, without rebuilding
//! anything on the CPU: each chunk keeps the library's own records, and its
//! stored bytes are borrowed from the bytes that the format library
//! validated, its memory map or a copy of the file in page-locked memory
//! ([`PinnedDelta`]), never from a second read.
//!
//! The base is checked by the library's own [`resolve_base`] (names, dtypes,
//! shapes, then every digest, spec §11.2) before any byte of it is used, so
//! a wrong base is an error before anything reaches the device.

use std::io::Read;
use std::path::Path;

use cudarc::driver::PinnedHostSlice;
use rayon::prelude::*;
use tpde::{resolve_base, Checkpoint, DeltaFile, ErrorCode, NoProgress, TensorEntry};

use crate::error::{GpuError, Result};
use crate::gpu::Gpu;
use crate::pipeline::{Checksums, ChunkRef, TensorRef};

/// The loader's view of one tensor of `file`, its stored bytes borrowed from
/// the file's validated bytes; `host` is set when those bytes are
/// page-locked. With `verify_checksums`, every chunk's stored bytes are
/// checked against its XXH3-64 checksum here (spec §10), once, so that
/// repeated loads of the same bytes skip it.
fn tensor_in<'f>(
    file: &'f DeltaFile,
    entry: &TensorEntry,
    verify_checksums: bool,
    host: Option<&'f [u8]>,
) -> Result<TensorRef<'f>> {
    let width = entry.word_width()?;
    let words = entry.word_count()?;
    let chunk_words = u32::try_from(entry.chunk_words).map_err(|_| GpuError::invalid("chunk_words above 2^32 - 1"))?;
    let spans: Vec<_> = file.spans(entry)?.collect();
    let chunks = spans
        .into_par_iter()
        .map(|span| {
            let record = *file.chunk(span.index);
            let words = u32::try_from(span.words).map_err(|_| GpuError::invalid("chunk above 2^32 - 1 words"))?;
            let stored = file.stored_bytes(span.index);
            if verify_checksums && tpde::format::checksum64(stored) != record.checksum {
                let e =
                    tpde::Error::new(ErrorCode::ChunkChecksum, "the chunk's stored bytes do not match its checksum");
                return Err(GpuError::Format(e.in_file(file.path()).in_tensor(&entry.name).in_chunk(span.index)));
            }
            let mut chunk =
                ChunkRef { record, streams: file.streams(span.index), stored, words, resolved_positions: None };
            if chunk.has_split_positions() {
                // Position coding 3: decoded here against the reference delta.
                let positions = file.chunk_positions(entry, span)?;
                chunk.resolved_positions = Some(positions.iter().flat_map(|p| p.to_le_bytes()).collect());
            }
            Ok(chunk)
        })
        .collect::<Vec<Result<ChunkRef<'f>>>>()
        .into_iter()
        // the first bad chunk in file order, whatever the threads' order
        .collect::<Result<Vec<_>>>()?;
    let t = TensorRef {
        name: entry.name.clone(),
        width,
        words,
        chunk_words,
        first_chunk: entry.first_chunk,
        chunks,
        host,
        checksums: Checksums::Checked,
    };
    t.validate()?;
    Ok(t)
}

/// The loader's view of one tensor of `file`, its stored bytes borrowed from
/// the file's map. See [`PinnedDelta`] for the faster page-locked copy.
pub fn tensor_ref<'f>(file: &'f DeltaFile, entry: &TensorEntry, verify_checksums: bool) -> Result<TensorRef<'f>> {
    tensor_in(file, entry, verify_checksums, None)
}

/// Every tensor of `file`, in header order (checksums verified in parallel
/// when asked).
pub fn tensor_refs(file: &DeltaFile, verify_checksums: bool) -> Result<Vec<TensorRef<'_>>> {
    file.header().tensors.par_iter().map(|e| tensor_ref(file, e, verify_checksums)).collect()
}

/// Every tensor of `file`, as [`tensor_refs`] gives them, with their chunk
/// checksums left to the loader ([`Checksums::OnUpload`]): it checks them
/// in one parallel pass before its first upload, which also brings the
/// file's pages in on every thread at once. A corrupt chunk is still refused
/// before any of its bytes is used.
pub fn tensor_refs_checked_on_upload(file: &DeltaFile) -> Result<Vec<TensorRef<'_>>> {
    let mut refs = tensor_refs(file, false)?;
    for t in &mut refs {
        t.checksums = Checksums::OnUpload;
    }
    Ok(refs)
}

/// A whole delta file in page-locked memory, owned by the [`DeltaFile`] that
/// validated it.
struct PinnedBytes {
    /// Keeps the allocation alive; never written after the file is read.
    _slice: PinnedHostSlice<u8>,
    ptr: *const u8,
    len: usize,
}

// SAFETY: the bytes are only read once `PinnedBytes` exists (the file was
// read into them before), and `PinnedHostSlice` itself is `Send + Sync`.
unsafe impl Send for PinnedBytes {}
// SAFETY: as above: shared access is read-only.
unsafe impl Sync for PinnedBytes {}

impl AsRef<[u8]> for PinnedBytes {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `ptr` and `len` come from `as_slice` of `_slice`, whose
        // page-locked allocation lives as long as `self` and is never
        // written again (no device copy targets it).
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

/// A delta file held in page-locked host memory: the serving case of a
/// host-resident delta. Streams stored as they are go from it to the device
/// by DMA, with no CPU copy; only zstd streams are decoded on the CPU. The
/// format library validates these very bytes ([`DeltaFile::from_bytes`]),
/// so what the GPU reads is what was checked.
pub struct PinnedDelta {
    file: DeltaFile,
}

impl std::fmt::Debug for PinnedDelta {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PinnedDelta").field("path", &self.file.path()).field("bytes", &self.file.file_len()).finish()
    }
}

impl PinnedDelta {
    /// Reads the whole of `path` into page-locked memory of `gpu`'s context,
    /// then validates those bytes with the format library.
    ///
    /// Allocating page-locked memory is slow (33 ms for 81 MB on an H200, more
    /// than the load it serves): for a delta loaded once, a memory-mapped
    /// [`DeltaFile`] through [`tensor_refs`], which the loader stages through
    /// its own ring, is faster. This pays off for a delta kept and applied again,
    /// or one that arrives in memory.
    ///
    /// # Errors
    /// The library's codes for a malformed file ([`GpuError::Format`]), `E_IO`
    /// when it cannot be read or is not a regular file.
    pub fn open(gpu: &Gpu, path: &Path) -> Result<Self> {
        let io = |action: &str, e: std::io::Error| GpuError::Format(tpde::Error::io(path, action, e));
        // Checked before opening: opening a FIFO would block.
        let meta = tpde::format::require_regular_file(path, "cannot open the delta")?;
        let mut f = std::fs::File::open(path).map_err(|e| io("cannot open the delta", e))?;
        let len = usize::try_from(meta.len()).map_err(|_| GpuError::invalid("delta larger than the address space"))?;
        // SAFETY: uninitialized bytes, every one written by `read_exact`
        // below before any use; `u8` has no invalid bit patterns.
        let mut slice = unsafe { gpu.context().alloc_pinned_with_flags::<u8>(len.max(1), 0) }?;
        f.read_exact(&mut slice.as_mut_slice()?[..len]).map_err(|e| io("cannot read the delta", e))?;
        let ptr = slice.as_slice()?.as_ptr();
        let bytes = PinnedBytes { _slice: slice, ptr, len };
        Ok(Self { file: DeltaFile::from_bytes(path, bytes)? })
    }

    /// The validated file (header, records, and its bytes in page-locked
    /// memory).
    #[must_use]
    pub fn file(&self) -> &DeltaFile {
        &self.file
    }

    /// Attaches the delta's position reference
    /// ([`DeltaFile::with_position_reference`]), for a delta with chunks of
    /// position coding 3.
    ///
    /// # Errors
    /// `E_REFERENCE_MISMATCH` when `reference` is not the file the delta pins.
    pub fn with_position_reference(self, reference: std::sync::Arc<DeltaFile>) -> Result<Self> {
        Ok(Self { file: self.file.with_position_reference(reference)? })
    }

    /// The loader's view of one tensor, its stored bytes in page-locked
    /// memory ([`TensorRef::host`] set). Checksums are verified when asked.
    pub fn tensor_ref(&self, entry: &TensorEntry, verify_checksums: bool) -> Result<TensorRef<'_>> {
        tensor_in(&self.file, entry, verify_checksums, Some(self.file.bytes()))
    }

    /// Every tensor, in header order.
    pub fn tensor_refs(&self, verify_checksums: bool) -> Result<Vec<TensorRef<'_>>> {
        self.file.header().tensors.iter().map(|e| self.tensor_ref(e, verify_checksums)).collect()
    }
}

/// The base bytes of every tensor of `file` from a host checkpoint, in header
/// order; standalone tensors (no base) get an empty slice, read as zeros.
///
/// The base is the one the delta was made against, checked by the format
/// library's [`resolve_base`]: names, dtypes and shapes, then every base
/// digest (spec §11.2). Call it before anything is written to the device.
///
/// # Errors
/// `E_BASE_REQUIRED`, `E_BASE_MISSING_TENSOR`, `E_BASE_MISMATCH` or
/// `E_BASE_DIGEST` ([`GpuError::Format`]), naming the base file and tensor.
pub fn host_bases<'c>(file: &DeltaFile, base: Option<&'c Checkpoint>) -> Result<Vec<&'c [u8]>> {
    Ok(resolve_base(file, base, &NoProgress)?.into_iter().map(Option::unwrap_or_default).collect())
}
