//! Maps a `tpde` delta file onto the loader's inputs, without rebuilding
//! anything on the CPU: each chunk keeps the library's own records, and its
//! stored bytes are borrowed from the memory-mapped file or from a copy of
//! the file in page-locked memory ([`PinnedDelta`]).

use std::io::Read;
use std::path::Path;

use cudarc::driver::PinnedHostSlice;
use tpde::container::header::TensorEntry;
use tpde::{Checkpoint, DeltaFile};

use crate::error::{GpuError, Result};
use crate::gpu::Gpu;
use crate::pipeline::{ChunkRef, TensorRef};
use crate::width::WordWidth;

/// The loader's view of one tensor of `file`, with stored bytes taken from
/// `bytes` (the whole file: its map or a copy). With `verify_checksums`,
/// every chunk's stored bytes are checked against its XXH3-64 checksum here,
/// once, so that repeated loads of the same bytes skip it.
fn tensor_in<'f>(
    file: &'f DeltaFile,
    bytes: Option<&'f [u8]>,
    entry: &TensorEntry,
    verify_checksums: bool,
) -> Result<TensorRef<'f>> {
    let width = WordWidth::from_bytes(entry.word_bytes()?)?;
    let words = entry.word_count()?;
    let chunk_words = u32::try_from(entry.chunk_words).map_err(|_| GpuError::invalid("chunk_words above 2^32 - 1"))?;
    let mut chunks = Vec::new();
    for span in file.spans(entry)? {
        let record = *file.chunk(span.index);
        let words = u32::try_from(span.words).map_err(|_| GpuError::invalid("chunk above 2^32 - 1 words"))?;
        let stored = match bytes {
            None => file.stored_bytes(span.index),
            Some(b) => {
                let start = usize::try_from(record.data_offset).unwrap_or(usize::MAX);
                b.get(start..start.saturating_add(record.stored_len as usize))
                    .ok_or_else(|| GpuError::corrupt("a chunk lies past the end of the file"))?
            }
        };
        if verify_checksums && tpde::digest::checksum64(stored) != record.checksum {
            return Err(GpuError::corrupt(format!("{}: chunk {} checksum mismatch", entry.name, span.index)));
        }
        chunks.push(ChunkRef { record, streams: file.streams(span.index), stored, words });
    }
    let t = TensorRef { name: entry.name.clone(), width, words, chunk_words, chunks, host: bytes };
    t.validate()?;
    Ok(t)
}

/// The loader's view of one tensor of `file`, its stored bytes borrowed from
/// the file's map. See [`PinnedDelta`] for the faster page-locked copy.
pub fn tensor_ref<'f>(file: &'f DeltaFile, entry: &TensorEntry, verify_checksums: bool) -> Result<TensorRef<'f>> {
    tensor_in(file, None, entry, verify_checksums)
}

/// Every tensor of `file`, in header order (checksums verified in parallel
/// when asked).
pub fn tensor_refs(file: &DeltaFile, verify_checksums: bool) -> Result<Vec<TensorRef<'_>>> {
    use rayon::prelude::*;
    file.header().tensors.par_iter().map(|e| tensor_ref(file, e, verify_checksums)).collect()
}

/// A delta file held in page-locked host memory: the serving case of a
/// host-resident delta. Streams stored as they are go from it to the device
/// by DMA, with no CPU copy; only zstd streams are decoded on the CPU.
pub struct PinnedDelta {
    file: DeltaFile,
    bytes: PinnedHostSlice<u8>,
}

impl std::fmt::Debug for PinnedDelta {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PinnedDelta").field("path", &self.file.path()).field("bytes", &self.bytes.len()).finish()
    }
}

impl PinnedDelta {
    /// Opens and validates `path` with the format library, then reads the
    /// whole file into page-locked memory of `gpu`'s context.
    pub fn open(gpu: &Gpu, path: &Path) -> Result<Self> {
        let file = DeltaFile::open(path)?;
        let len =
            usize::try_from(file.file_len()).map_err(|_| GpuError::invalid("delta larger than the address space"))?;
        // SAFETY: uninitialized bytes, every one written by `read_exact`
        // below before any use; `u8` has no invalid bit patterns.
        let mut bytes = unsafe { gpu.context().alloc_pinned_with_flags::<u8>(len.max(1), 0) }?;
        let dst = &mut bytes.as_mut_slice()?[..len];
        std::fs::File::open(path)
            .and_then(|mut f| f.read_exact(dst))
            .map_err(|e| GpuError::invalid(format!("cannot read {}: {e}", path.display())))?;
        Ok(Self { file, bytes })
    }

    /// The validated file (header, records).
    #[must_use]
    pub fn file(&self) -> &DeltaFile {
        &self.file
    }

    /// The loader's view of one tensor, its stored bytes in page-locked
    /// memory ([`TensorRef::host`] set). Checksums are verified when asked,
    /// against the bytes actually read.
    pub fn tensor_ref(&self, entry: &TensorEntry, verify_checksums: bool) -> Result<TensorRef<'_>> {
        let len = usize::try_from(self.file.file_len()).unwrap_or(usize::MAX);
        let bytes = &self.bytes.as_slice()?[..len];
        tensor_in(&self.file, Some(bytes), entry, verify_checksums)
    }

    /// Every tensor, in header order.
    pub fn tensor_refs(&self, verify_checksums: bool) -> Result<Vec<TensorRef<'_>>> {
        self.file.header().tensors.iter().map(|e| self.tensor_ref(e, verify_checksums)).collect()
    }
}

/// The base bytes of every tensor of `file` from a host checkpoint, in header
/// order; standalone tensors (no base) get an empty slice, read as zeros.
/// A missing base tensor is reported by name.
pub fn host_bases<'c>(file: &DeltaFile, base: &'c Checkpoint) -> Result<Vec<&'c [u8]>> {
    file.header()
        .tensors
        .iter()
        .map(|e| {
            if !e.needs_base() {
                return Ok(&[][..]);
            }
            let (f, loc) =
                base.tensor(&e.name).ok_or_else(|| GpuError::invalid(format!("base lacks tensor {}", e.name)))?;
            Ok(f.tensor_bytes(loc))
        })
        .collect()
}
