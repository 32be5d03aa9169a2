//! Maps a `tpde` delta file onto the loader's inputs, without rebuilding
//! anything on the CPU: each chunk record becomes a [`ChunkSpec`] and its
//! stored streams are borrowed straight from the memory-mapped file.

use tpde::container::chunk_map::{ChunkRecord, StreamRecord};
use tpde::container::header::TensorEntry;
use tpde::{Checkpoint, DeltaFile};

use crate::error::{GpuError, Result};
use crate::pipeline::{ChunkRef, Codec, StreamRef, TensorRef};
use crate::spec::{ChunkKind, ChunkSpec, PositionCoding, ValueLayout, ValueOp, WordWidth};

fn format_err(e: &tpde::Error) -> GpuError {
    GpuError::Format(e.to_string())
}

/// The kernel's view of a chunk record (wire ids of `spec/FORMAT.md`, "Chunk record").
pub fn chunk_spec(rec: &ChunkRecord, width: WordWidth, words: u32) -> Result<ChunkSpec> {
    let kind = match (rec.encoding as u8, rec.position_coding as u8) {
        (0, _) => ChunkKind::Unchanged,
        (1, 1) => ChunkKind::Sparse(PositionCoding::Gaps {
            width: rec.gap_width,
        }),
        (1, 2) => ChunkKind::Sparse(PositionCoding::Bitmap),
        (2, _) => ChunkKind::Dense,
        (3, _) => ChunkKind::Raw,
        (e, p) => {
            return Err(GpuError::corrupt(format!(
                "encoding {e} with position coding {p}"
            )))
        }
    };
    let op = if rec.value_op as u8 == 0 {
        ValueOp::Xor
    } else {
        ValueOp::Sub
    };
    let layout = match rec.value_layout as u8 {
        0 => ValueLayout::Words,
        1 => ValueLayout::BytePlanes,
        _ => ValueLayout::RotatedBytePlanes,
    };
    let spec = ChunkSpec {
        kind,
        op,
        layout,
        width,
        words,
        changed: rec.changed_count,
    };
    spec.validate()?;
    Ok(spec)
}

/// Borrowed streams of a chunk, split out of its stored bytes.
fn streams<'a>(records: &[StreamRecord], mut stored: &'a [u8]) -> Result<Vec<StreamRef<'a>>> {
    records
        .iter()
        .map(|r| {
            let n = r.stored_len as usize;
            if n > stored.len() {
                return Err(GpuError::corrupt(
                    "stream lengths exceed the chunk's stored bytes",
                ));
            }
            let (bytes, rest) = stored.split_at(n);
            stored = rest;
            let codec = if r.codec as u8 == 0 {
                Codec::Stored
            } else {
                Codec::Zstd
            };
            Ok(StreamRef {
                codec,
                bytes,
                decoded_len: r.decoded_len as usize,
            })
        })
        .collect()
}

/// The loader's view of one tensor of `file`. With `verify_checksums`, every
/// chunk's stored bytes are checked against its XXH3-64 checksum here, once,
/// so that repeated loads of the same mapping skip it.
pub fn tensor_ref<'f>(
    file: &'f DeltaFile,
    entry: &TensorEntry,
    verify_checksums: bool,
) -> Result<TensorRef<'f>> {
    let width = WordWidth::from_bytes(entry.word_bytes().map_err(|e| format_err(&e))?)?;
    let words = entry.word_count().map_err(|e| format_err(&e))?;
    let chunk_words = u32::try_from(entry.chunk_words)
        .map_err(|_| GpuError::invalid("chunk_words above 2^32 - 1"))?;
    let spans = file.spans(entry).map_err(|e| format_err(&e))?;
    let mut chunks = Vec::new();
    for span in spans {
        let rec = file.chunk(span.index);
        let n = u32::try_from(span.words)
            .map_err(|_| GpuError::invalid("chunk above 2^32 - 1 words"))?;
        let stored = file.stored_bytes(span.index);
        if verify_checksums && tpde::digest::checksum64(stored) != rec.checksum {
            return Err(GpuError::corrupt(format!(
                "{}: chunk {} checksum mismatch",
                entry.name, span.index
            )));
        }
        chunks.push(ChunkRef {
            spec: chunk_spec(rec, width, n)?,
            streams: streams(file.streams(span.index), stored)?,
        });
    }
    let t = TensorRef {
        name: entry.name.clone(),
        width,
        words,
        chunk_words,
        chunks,
    };
    t.validate()?;
    Ok(t)
}

/// Every tensor of `file`, in header order (checksums verified in parallel
/// when asked).
pub fn tensor_refs(file: &DeltaFile, verify_checksums: bool) -> Result<Vec<TensorRef<'_>>> {
    use rayon::prelude::*;
    file.header()
        .tensors
        .par_iter()
        .map(|e| tensor_ref(file, e, verify_checksums))
        .collect()
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
            let (f, loc) = base
                .tensor(&e.name)
                .ok_or_else(|| GpuError::invalid(format!("base lacks tensor {}", e.name)))?;
            Ok(f.tensor_bytes(loc))
        })
        .collect()
}
