//! A delta read as the model it rebuilds: the target's tensors by name, each rebuilt
//! on demand, whole or by rows, against a base checked as `apply` checks it (spec
//! §11.2 B1 to B3). Names, dtypes and shapes of the base are checked when the model
//! is opened; a base tensor's digest when a tensor built on it is first rebuilt
//! whole. A partial read (some rows or chunks) touches only the base bytes of its
//! chunks, which their chunk digests check (§11.2, partial reads).

use std::collections::HashMap;
use std::ops::Range;
use std::sync::OnceLock;

use crate::container::header::TensorEntry;
use crate::digest::{tensor_digest, to_hex};
use crate::error::{Error, ErrorCode, Result};
use crate::limits::try_zeroed;
use crate::pipeline::Progress;
use crate::reader::DeltaFile;
use crate::source::TensorSource;

/// A tensor source held by value: a checkpoint on disk or tensors in memory.
pub type OwnedSource = Box<dyn TensorSource + Send>;

/// An open delta and its base, read tensor by tensor.
pub struct DeltaModel {
    delta: DeltaFile,
    base: Option<OwnedSource>,
    by_name: HashMap<String, usize>,
    /// Per tensor, in header order: set once its base tensor's digest matched.
    base_checked: Vec<OnceLock<()>>,
}

impl std::fmt::Debug for DeltaModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeltaModel")
            .field("delta", &self.delta)
            .field("base", &self.base.as_ref().map(|b| b.origin()))
            .finish_non_exhaustive()
    }
}

impl DeltaModel {
    /// Pairs `delta` with its base, checking the base's names, dtypes and shapes
    /// against every tensor built on it.
    ///
    /// # Errors
    /// `E_BASE_REQUIRED`, `E_BASE_MISSING_TENSOR` or `E_BASE_MISMATCH`, naming the
    /// file and the tensor.
    pub fn new(delta: DeltaFile, base: Option<OwnedSource>) -> Result<Self> {
        let header = delta.header();
        if header.needs_base() && base.is_none() {
            return Err(Error::new(ErrorCode::BaseRequired, "this delta needs a base checkpoint").in_file(delta.path()));
        }
        for tensor in &header.tensors {
            let (Some(base_ref), Some(base)) = (&tensor.base, &base) else { continue };
            let Some(found) = base.tensor(&tensor.name) else {
                return Err(Error::new(ErrorCode::BaseMissingTensor, "the base has no tensor of this name")
                    .in_file(base.origin())
                    .in_tensor(&tensor.name));
            };
            if found.dtype.as_str() != tensor.dtype_name || found.shape != base_ref.shape {
                return Err(Error::new(
                    ErrorCode::BaseMismatch,
                    format!(
                        "the base tensor is {} {:?} but the delta expects {} {:?}",
                        found.dtype, found.shape, tensor.dtype_name, base_ref.shape
                    ),
                )
                .in_file(found.file)
                .in_tensor(&tensor.name));
            }
        }
        let by_name = header.tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
        let base_checked = header.tensors.iter().map(|_| OnceLock::new()).collect();
        Ok(Self { delta, base, by_name, base_checked })
    }

    /// The delta.
    #[must_use]
    pub fn delta(&self) -> &DeltaFile {
        &self.delta
    }

    /// The target's tensors, in the order of its files.
    #[must_use]
    pub fn tensors(&self) -> &[TensorEntry] {
        &self.delta.header().tensors
    }

    /// Finds a target tensor by name.
    ///
    /// # Errors
    /// `E_INVALID_ARGUMENT` when the target has no tensor of this name.
    pub fn tensor(&self, name: &str) -> Result<&TensorEntry> {
        self.by_name.get(name).map(|&i| &self.tensors()[i]).ok_or_else(|| {
            Error::new(ErrorCode::InvalidArgument, "the target has no tensor of this name")
                .in_file(self.delta.path())
                .in_tensor(name)
        })
    }

    /// The bytes of one row (the first dimension), or `None` for a scalar or a row
    /// that does not fill whole bytes (sub-byte dtypes).
    ///
    /// # Errors
    /// `E_UNKNOWN_DTYPE` (excluded once the delta is open).
    pub fn row_bytes(tensor: &TensorEntry) -> Result<Option<u64>> {
        match tensor.shape.split_first() {
            Some((_, row)) => Ok(tensor.dtype()?.byte_len(row)),
            None => Ok(None),
        }
    }

    /// The base bytes of `tensor`. A read of the whole tensor checks their digest
    /// first (spec §11.2 B3). A read of some of its chunks (a partial read) does
    /// not, so that it touches only the base bytes of those chunks: each rebuilt
    /// chunk is checked against its own digest, which a base byte that differs
    /// within the chunk fails, and [`DeltaModel::decode_chunks_into`] then checks the
    /// base digest to name the cause.
    fn base_bytes(&self, tensor: &TensorEntry, whole: bool) -> Result<Option<&[u8]>> {
        let (Some(_), Some(base)) = (&tensor.base, &self.base) else { return Ok(None) };
        if whole {
            self.check_base(tensor)?;
        }
        Ok(Some(base.tensor(&tensor.name).expect("checked when the model was opened").bytes))
    }

    /// Checks the base digest of `tensor` (spec §11.2 B3), once: for a reader
    /// that rebuilds a whole tensor through partial reads, before it writes any.
    ///
    /// # Errors
    /// `E_BASE_DIGEST`, naming the base file and the tensor.
    pub fn check_base(&self, tensor: &TensorEntry) -> Result<()> {
        let (Some(base_ref), Some(base)) = (&tensor.base, &self.base) else { return Ok(()) };
        let index = self.by_name[&tensor.name];
        if self.base_checked[index].get().is_some() {
            return Ok(());
        }
        let found = base.tensor(&tensor.name).expect("checked when the model was opened");
        let chunk_bytes = usize::try_from(tensor.chunk_words).expect("bounded") * tensor.word_width()?.bytes();
        if to_hex(&tensor_digest(found.bytes, chunk_bytes)?) != base_ref.digest {
            return Err(Error::new(
                ErrorCode::BaseDigest,
                "the base tensor's content differs from the one the delta was made against",
            )
            .in_file(found.file)
            .in_tensor(&tensor.name));
        }
        let _ = self.base_checked[index].set(());
        Ok(())
    }

    /// Rebuilds a whole tensor into `out`, which holds exactly its bytes. Every chunk
    /// is checked against its digest.
    ///
    /// # Errors
    /// `E_INVALID_ARGUMENT` when `out` has another length, `E_BASE_DIGEST`, any
    /// decoding error naming the chunk, and `E_INTERRUPTED` when `progress` says so.
    pub fn decode_into(&self, tensor: &TensorEntry, out: &mut [u8], progress: &dyn Progress) -> Result<()> {
        let chunks = usize::try_from(tensor.chunk_count).expect("bounded by MAX_CHUNKS");
        self.decode_chunks_into(tensor, 0..chunks, out, progress)
    }

    /// Rebuilds chunks `chunks` of a tensor (counted within the tensor) into `out`,
    /// which holds exactly their bytes: a large tensor a piece at a time.
    ///
    /// Rebuilding only some of the tensor's chunks reads only their base bytes: the
    /// base tensor's digest is not checked first, as it is for the whole tensor,
    /// but each rebuilt chunk is checked against its own digest, and a chunk that
    /// fails it is `E_BASE_DIGEST` when the base tensor's digest does not match
    /// either, `E_CHUNK_DIGEST` when it does (spec §11.2, partial reads).
    ///
    /// # Errors
    /// As [`DeltaModel::decode_into`], and `E_INVALID_ARGUMENT` when `chunks`
    /// lies outside the tensor or `out` does not fit them.
    pub fn decode_chunks_into(
        &self,
        tensor: &TensorEntry,
        chunks: Range<usize>,
        out: &mut [u8],
        progress: &dyn Progress,
    ) -> Result<()> {
        let whole = chunks.start == 0 && chunks.end as u64 == tensor.chunk_count;
        let base = self.base_bytes(tensor, whole)?;
        match self.delta.decode_chunks_into(tensor, base, chunks, out, progress) {
            Err(e) if e.code() == ErrorCode::ChunkDigest && base.is_some() => {
                self.check_base(tensor)?;
                Err(e)
            }
            done => done,
        }
    }

    /// Rebuilds rows `rows` (of the first dimension) of a tensor into `out`, which
    /// holds exactly their bytes, decoding only the chunks that overlap them.
    ///
    /// # Errors
    /// As [`DeltaModel::decode_into`], and `E_INVALID_ARGUMENT` for rows outside
    /// the tensor or a tensor without whole-byte rows ([`DeltaModel::row_bytes`]).
    pub fn decode_rows_into(
        &self,
        tensor: &TensorEntry,
        rows: Range<u64>,
        out: &mut [u8],
        progress: &dyn Progress,
    ) -> Result<()> {
        let invalid = |message: String| {
            Error::new(ErrorCode::InvalidArgument, message).in_file(self.delta.path()).in_tensor(&tensor.name)
        };
        let row_count = tensor.shape.first().copied().unwrap_or(0);
        let Some(row_bytes) = Self::row_bytes(tensor)? else {
            return Err(invalid("the tensor has no rows of whole bytes".into()));
        };
        if rows.start > rows.end || rows.end > row_count {
            return Err(invalid(format!("rows {rows:?} lie outside the tensor's {row_count} rows")));
        }
        let (start, end) = (rows.start * row_bytes, rows.end * row_bytes);
        if end - start != out.len() as u64 {
            return Err(invalid(format!("rows {rows:?} need {} bytes, not {}", end - start, out.len())));
        }
        if start == end {
            return Ok(());
        }
        let chunk_bytes = tensor.chunk_words * tensor.word_width()?.bytes_u64();
        let total = tensor.byte_len()?;
        let first = start / chunk_bytes;
        let last = end.div_ceil(chunk_bytes);
        let chunks = usize::try_from(first).expect("bounded")..usize::try_from(last).expect("bounded");
        if start % chunk_bytes == 0 && (end % chunk_bytes == 0 || end == total) {
            return self.decode_chunks_into(tensor, chunks, out, progress);
        }
        // The rows start or end inside a chunk: rebuild the chunks whole, keep the rows.
        let spanned = (last * chunk_bytes).min(total) - first * chunk_bytes;
        let mut whole = try_zeroed(usize::try_from(spanned).expect("at most the tensor"))
            .map_err(|e| e.in_file(self.delta.path()).in_tensor(&tensor.name))?;
        self.decode_chunks_into(tensor, chunks, &mut whole, progress)?;
        let skip = usize::try_from(start - first * chunk_bytes).expect("within a chunk");
        out.copy_from_slice(&whole[skip..skip + out.len()]);
        Ok(())
    }
}
/// The rows that rank `rank` of `ranks` holds of a tensor of `shape` split evenly
/// by its first dimension, as tensor-parallel row shards are: `None` where the
/// tensor is held whole by every rank (no rows, fewer rows than ranks), or where
/// `rank` is not below `ranks`. The ranks' rows put together are every row, each
/// once; pass them to [`DeltaModel::decode_rows_into`].
#[must_use]
pub fn even_row_shard(shape: &[u64], rank: u64, ranks: u64) -> Option<Range<u64>> {
    let rows = *shape.first().filter(|_| shape.len() >= 2)?;
    if rank >= ranks || rows < ranks {
        return None;
    }
    // rows < 2^64 / ranks is not guaranteed: widen for the products.
    let at = |r: u64| u64::try_from(u128::from(r) * u128::from(rows) / u128::from(ranks)).unwrap_or(rows);
    Some(at(rank)..at(rank + 1))
}

#[cfg(test)]
mod tests {
    use super::even_row_shard;

    #[test]
    fn even_row_shards_cover_every_row_once() {
        for (rows, ranks) in [(10u64, 3u64), (4096, 8), (7, 7)] {
            let shards: Vec<_> = (0..ranks).map(|r| even_row_shard(&[rows, 16], r, ranks).unwrap()).collect();
            assert_eq!(shards.first().unwrap().start, 0);
            assert_eq!(shards.last().unwrap().end, rows);
            assert!(shards.windows(2).all(|w| w[0].end == w[1].start && !w[0].is_empty()));
        }
        // held whole: one dimension, fewer rows than ranks, a rank out of range
        assert_eq!(even_row_shard(&[4096], 0, 2), None);
        assert_eq!(even_row_shard(&[3, 8], 0, 4), None);
        assert_eq!(even_row_shard(&[8, 8], 4, 4), None);
        assert_eq!(even_row_shard(&[u64::MAX, 1], 1, 2), Some(u64::MAX / 2..u64::MAX));
    }
}
