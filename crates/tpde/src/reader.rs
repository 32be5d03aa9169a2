//! Reader: maps a delta file, validates every structure before allocating anything
//! sized by it, and decodes single chunks or whole tensors on demand (spec §11).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use memmap2::Mmap;
use rayon::prelude::*;

use crate::checkpoint::{SafetensorsHeader, SafetensorsTensor};
use crate::container::chunk_map::{ChunkRecord, Codec, StreamRecord, CHUNK_RECORD_LEN, STREAM_RECORD_LEN};
use crate::container::chunk_map::{Encoding, PositionCoding};
use crate::container::header::PositionPin;
use crate::container::header::{Header, LayoutKind, TensorEntry};
use crate::container::json::{check_unique_keys, parse_strict, ObjectOf};
use crate::container::preamble::{
    check_trailer, Preamble, FEATURE_CONSTANT_STREAMS, FEATURE_PACKED_RANS, FEATURE_RANS_LANES,
    FEATURE_TEMPORAL_POSITIONS, MAGIC, PREAMBLE_LEN, TRAILER_LEN,
};
use crate::container::Layout;
use crate::delta::{
    check_chunk_payload, check_chunk_shape, check_unchanged, chunk_positions, decode_chunk_into, decode_chunk_with,
    decode_cost, ChunkInput, DecodeCost, DecodeScratch,
};
use crate::digest::{checksum64, to_hex, tree_digest, Digest128};
use crate::dtype::WordWidth;
use crate::error::{fail, Error, ErrorCode, Result};
use crate::limits::{try_zeroed, DECODE_IN_FLIGHT_BYTES, MAX_CHUNKS, MAX_HEADER_LEN};
use crate::ranged::{RangeSource, SparseBytes};

/// Where a chunk sits in its tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkSpan {
    /// Global chunk index.
    pub index: u64,
    /// First word of the chunk within the tensor.
    pub first_word: u64,
    /// Number of words in the chunk.
    pub words: u64,
}

/// The part of a sharded target's `model.safetensors.index.json` that spec §11.1
/// O23 checks; other members (`metadata`) are parsed strictly but not read.
#[derive(serde::Deserialize)]
struct ShardIndex {
    weight_map: BTreeMap<String, String>,
}

/// The bytes of a delta: a memory map, or any buffer a caller owns.
type DeltaBytes = Box<dyn AsRef<[u8]> + Send + Sync>;

/// Where a delta's bytes are: all in memory (a memory map, a caller's buffer), or
/// read by range into a sparse buffer as they are needed.
enum Storage {
    Whole(DeltaBytes),
    Ranged(Arc<SparseBytes>),
}

/// Stored bytes of chunks fetched ahead of decoding, for a delta read by range:
/// enough to keep many requests in flight while a batch decodes.
const FETCH_AHEAD_BYTES: u64 = 64 << 20;

/// An open, validated delta file.
pub struct DeltaFile {
    path: PathBuf,
    map: Storage,
    preamble: Preamble,
    header: Header,
    chunks: Vec<ChunkRecord>,
    streams: Vec<StreamRecord>,
    /// The delta whose positions are the reference sets of coding 3 (spec §8.3),
    /// checked against the header's pin.
    reference: Option<Arc<DeltaFile>>,
    /// Tensor index by name, built when the file first serves as a reference.
    names: OnceLock<HashMap<String, usize>>,
    /// Chunk positions decoded while this file serves as a reference, by
    /// (tensor index, chunk index), each kept until it is read once more: a
    /// walk along a chain of references decodes each file's positions once, and
    /// holds no more than about one step's worth of them.
    positions_memo: Mutex<HashMap<(usize, u64), Vec<u32>>>,
}

impl std::fmt::Debug for DeltaFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeltaFile")
            .field("path", &self.path)
            .field("len", &self.file_len())
            .field("tensors", &self.header.tensors.len())
            .finish_non_exhaustive()
    }
}

impl DeltaFile {
    /// Opens and validates `path` (spec §11.1): everything but the stored bytes of
    /// chunks is checked here.
    ///
    /// # Errors
    /// Any structural error code, naming the file and, where it applies, the tensor.
    pub fn open(path: &Path) -> Result<Self> {
        crate::checkpoint::require_regular_file(path, "cannot open the delta")?;
        let file = File::open(path).map_err(|e| Error::io(path, "cannot open the delta", e))?;
        let len = file.metadata().map_err(|e| Error::io(path, "cannot read the delta's size", e))?.len();
        if len == 0 {
            return Err(Error::new(ErrorCode::BadMagic, "the file is empty").in_file(path));
        }
        // SAFETY: read-only private map. If another process modifies the file while
        // it is mapped, reads may change under us; every byte used is validated or
        // checksummed before use, and inputs must not be modified while tpde runs.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, "cannot map the delta", e))?;
        Self::from_owned(path, Storage::Whole(Box::new(map))).map_err(|e| e.in_file(path))
    }

    /// Validates a delta held in memory, exactly as [`DeltaFile::open`] validates a
    /// file; `name` stands for the file in error messages. The bytes are used as
    /// they are, never copied, so every later read sees the bytes that were checked.
    ///
    /// # Errors
    /// As [`DeltaFile::open`].
    pub fn from_bytes(name: &Path, bytes: impl AsRef<[u8]> + Send + Sync + 'static) -> Result<Self> {
        if bytes.as_ref().is_empty() {
            return Err(Error::new(ErrorCode::BadMagic, "the file is empty").in_file(name));
        }
        Self::from_owned(name, Storage::Whole(Box::new(bytes))).map_err(|e| e.in_file(name))
    }

    /// Opens a delta read by range from `source` (an object in an object store,
    /// say), validated exactly as [`DeltaFile::open`] validates a file: two reads
    /// fetch the preamble, then everything after the chunks (header, chunk map,
    /// trailer). The chunks' stored bytes are read when a chunk is first decoded,
    /// or ahead of that by [`DeltaFile::fetch_chunks`], which the pipelines call
    /// for each batch of chunks they decode. `name` stands for the file in error
    /// messages. Fetched chunks stay in memory while the `DeltaFile` lives.
    ///
    /// # Errors
    /// As [`DeltaFile::open`], and the source's errors.
    pub fn from_ranges(name: &Path, source: Arc<dyn RangeSource>) -> Result<Self> {
        let len = source.len();
        if len == 0 {
            return Err(Error::new(ErrorCode::BadMagic, "the file is empty").in_file(name));
        }
        let mut sparse = SparseBytes::new(source).map_err(|e| e.in_file(name))?;
        let head = len.min(PREAMBLE_LEN as u64);
        sparse.read_metadata(0..head).map_err(|e| e.in_file(name))?;
        let tail = metadata_start(sparse.metadata_view(), len).max(head);
        if tail < len {
            sparse.read_metadata(tail..len).map_err(|e| e.in_file(name))?;
        }
        Self::from_owned(name, Storage::Ranged(Arc::new(sparse))).map_err(|e| e.in_file(name))
    }

    fn from_owned(path: &Path, mut map: Storage) -> Result<Self> {
        let bytes: &[u8] = match &mut map {
            Storage::Whole(bytes) => (**bytes).as_ref(),
            // Not shared before the delta is built.
            Storage::Ranged(sparse) => Arc::get_mut(sparse).expect("an unshared buffer").metadata_view(),
        };
        if bytes.len() < MAGIC.len() || bytes[..MAGIC.len()] != MAGIC {
            return fail(ErrorCode::BadMagic, "the file does not start with the tpde magic");
        }
        let preamble = Preamble::parse(bytes)?;
        check_trailer(bytes)?;
        if preamble.header_len > MAX_HEADER_LEN {
            return fail(ErrorCode::LimitExceeded, format!("the header claims {} bytes", preamble.header_len));
        }
        if preamble.chunk_count > MAX_CHUNKS || preamble.stream_count > preamble.chunk_count.saturating_mul(12) {
            return fail(
                ErrorCode::LimitExceeded,
                format!("the header claims {} chunks and {} streams", preamble.chunk_count, preamble.stream_count),
            );
        }
        let layout =
            Layout::from_counts(preamble.data_len, preamble.header_len, preamble.chunk_count, preamble.stream_count)
                .ok_or_else(|| Error::new(ErrorCode::LimitExceeded, "the declared sizes overflow"))?;
        let actual = bytes.len() as u64;
        if layout.file_len > actual {
            return fail(
                ErrorCode::Truncated,
                format!("the structures need {} bytes but the file has {actual}", layout.file_len),
            );
        }
        if layout.file_len < actual {
            return fail(
                ErrorCode::UnaccountedBytes,
                format!("{} bytes follow the declared structures", actual - layout.file_len),
            );
        }
        let at = |offset: u64, len: u64| -> &[u8] {
            // In range: every region lies below `file_len`, checked above.
            &bytes[usize::try_from(offset).expect("in range")..usize::try_from(offset + len).expect("in range")]
        };
        let data_end = layout.data_offset + layout.data_len;
        let header_end = layout.header_offset + layout.header_len;
        let padding = at(data_end, layout.header_offset - data_end)
            .iter()
            .chain(at(header_end, layout.table_offset - header_end));
        if padding.into_iter().any(|&b| b != 0) {
            return fail(ErrorCode::UnaccountedBytes, "padding bytes are not zero");
        }

        let header_bytes = at(layout.header_offset, layout.header_len);
        if checksum64(header_bytes) != preamble.header_checksum {
            return fail(ErrorCode::HeaderChecksum, "the header checksum does not match");
        }
        let header_text = std::str::from_utf8(header_bytes)
            .map_err(|_| Error::new(ErrorCode::HeaderInvalid, "the header is not UTF-8"))?;
        let ObjectOf(header): ObjectOf<Header> = parse_strict(header_text, "header")?;
        header.validate(preamble.chunk_count)?;
        let temporal = preamble.required_features & FEATURE_TEMPORAL_POSITIONS != 0;
        if temporal != header.position_reference.is_some() {
            // H7: the pin and feature bit 2 come together.
            return fail(ErrorCode::HeaderInvalid, "position_reference is present iff required feature bit 2 is set");
        }

        let tables = at(layout.table_offset, layout.table_len);
        if checksum64(tables) != preamble.table_checksum {
            return fail(ErrorCode::TableChecksum, "the chunk map checksum does not match");
        }
        let (chunk_table, stream_table) =
            tables.split_at(usize::try_from(preamble.chunk_count).expect("bounded") * CHUNK_RECORD_LEN);
        let chunks = chunk_table
            .chunks_exact(CHUNK_RECORD_LEN)
            .enumerate()
            .map(|(i, r)| ChunkRecord::parse(r).map_err(|e| e.in_chunk(i as u64)))
            .collect::<Result<Vec<_>>>()?;
        let rans_allowed = preamble.required_features & FEATURE_RANS_LANES != 0;
        let constant_allowed = preamble.required_features & FEATURE_CONSTANT_STREAMS != 0;
        let packed_rans_allowed = preamble.required_features & FEATURE_PACKED_RANS != 0;
        let streams = stream_table
            .chunks_exact(STREAM_RECORD_LEN)
            .map(|r| match StreamRecord::parse(r)? {
                // O20: codecs 2 to 4 exist only in files that declare them.
                StreamRecord { codec: Codec::Rans, .. } if !rans_allowed => {
                    fail(ErrorCode::UnknownCodec, "codec 2 (lane rANS) in a file without feature bit 1")
                }
                StreamRecord { codec: Codec::Constant, .. } if !constant_allowed => {
                    fail(ErrorCode::UnknownCodec, "codec 3 (constant) in a file without feature bit 3")
                }
                StreamRecord { codec: Codec::RansPacked, .. } if !packed_rans_allowed => {
                    fail(ErrorCode::UnknownCodec, "codec 4 (packed lane rANS) in a file without feature bit 4")
                }
                record => Ok(record),
            })
            .collect::<Result<Vec<_>>>()?;

        let mut delta = Self {
            path: path.to_path_buf(),
            map,
            preamble,
            header,
            chunks,
            streams,
            reference: None,
            names: OnceLock::new(),
            positions_memo: Mutex::new(HashMap::new()),
        };
        delta.validate_chunk_map(layout)?;
        delta.validate_target_files()?;
        delta.validate_index()?;
        let ranges: Vec<Range<u64>> =
            delta.chunks.iter().map(|c| c.data_offset..c.data_offset + u64::from(c.stored_len)).collect();
        if let Storage::Ranged(sparse) = &mut delta.map {
            Arc::get_mut(sparse).expect("an unshared buffer").set_chunks(ranges);
        }
        Ok(delta)
    }

    /// Checks that chunks tile the data section in order, that each chunk's streams
    /// fit its encoding, and that tensor digests match their chunk digests.
    fn validate_chunk_map(&self, layout: Layout) -> Result<()> {
        let mut offset = layout.data_offset;
        let mut next_stream = 0u64;
        for tensor in &self.header.tensors {
            let width = tensor.word_width()?;
            let mut leaves: Vec<Digest128> = Vec::new();
            for span in self.spans(tensor)? {
                let chunk = &self.chunks[usize::try_from(span.index).expect("bounded")];
                let located = |e: Error| e.in_tensor(&tensor.name).in_chunk(span.index);
                if chunk.data_offset != offset {
                    let code =
                        if chunk.data_offset < offset { ErrorCode::RangeOverlap } else { ErrorCode::UnaccountedBytes };
                    return Err(located(Error::new(
                        code,
                        format!("the chunk starts at {} where {offset} was expected", chunk.data_offset),
                    )));
                }
                if u64::from(chunk.first_stream) != next_stream {
                    return Err(located(Error::new(
                        ErrorCode::ChunkMapInvalid,
                        "the chunk's streams do not follow on",
                    )));
                }
                let end = next_stream + u64::from(chunk.stream_count);
                if end > self.streams.len() as u64 {
                    return Err(located(Error::new(
                        ErrorCode::ChunkMapInvalid,
                        "the chunk's streams run past the stream table",
                    )));
                }
                let streams = &self.streams
                    [usize::try_from(next_stream).expect("bounded")..usize::try_from(end).expect("bounded")];
                let temporal = self.preamble.required_features & FEATURE_TEMPORAL_POSITIONS != 0;
                if chunk.position_coding == PositionCoding::SplitByReference && !temporal {
                    return Err(located(Error::new(
                        ErrorCode::ChunkMapInvalid,
                        "position coding 3 in a file without required feature bit 2",
                    )));
                }
                check_chunk_shape(chunk, streams, span.words, width).map_err(located)?;
                offset += u64::from(chunk.stored_len);
                next_stream = end;
                leaves.push(chunk.digest);
            }
            if to_hex(&tree_digest(&leaves)) != tensor.digest {
                return Err(Error::new(ErrorCode::TensorDigest, "the tensor digest does not match its chunk digests")
                    .in_tensor(&tensor.name));
            }
        }
        if offset != layout.data_offset + layout.data_len {
            return fail(ErrorCode::UnaccountedBytes, "the chunks do not fill the data section");
        }
        if next_stream != self.streams.len() as u64 {
            return fail(ErrorCode::ChunkMapInvalid, "streams are left over after the last chunk");
        }
        Ok(())
    }

    fn validate_target_files(&self) -> Result<()> {
        validate_target_files(&self.header)
    }

    /// Checks that a sharded target's index, which is written out verbatim, agrees
    /// with the shards written beside it (spec §11.1 O23): strict JSON whose
    /// `weight_map` maps exactly the delta's tensors, each to the name of its file.
    /// So a hostile index cannot send a loader of the output to another path.
    fn validate_index(&self) -> Result<()> {
        let target = &self.header.target;
        let (LayoutKind::Sharded, Some(index_json)) = (target.kind, &target.index_json) else {
            return Ok(());
        };
        let ObjectOf(index): ObjectOf<ShardIndex> =
            parse_strict(index_json, "the target's model.safetensors.index.json")?;
        if index.weight_map.len() != self.header.tensors.len() {
            return fail(
                ErrorCode::HeaderInvalid,
                format!(
                    "the target's index maps {} tensors but the delta holds {}",
                    index.weight_map.len(),
                    self.header.tensors.len()
                ),
            );
        }
        for tensor in &self.header.tensors {
            // `file` was checked against the file count at H5.e.
            let file = &target.files[tensor.file as usize].name;
            if index.weight_map.get(&tensor.name) != Some(file) {
                return Err(Error::new(
                    ErrorCode::HeaderInvalid,
                    format!("the target's index does not map the tensor to {file}, the file that holds it"),
                )
                .in_tensor(&tensor.name));
            }
        }
        Ok(())
    }

    /// The file's path.
    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The preamble.
    #[must_use]
    pub fn preamble(&self) -> &Preamble {
        &self.preamble
    }

    /// The header.
    #[must_use]
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The whole file's length.
    #[must_use]
    pub fn file_len(&self) -> u64 {
        match &self.map {
            Storage::Whole(bytes) => (**bytes).as_ref().len() as u64,
            Storage::Ranged(sparse) => sparse.len() as u64,
        }
    }

    /// The whole file, exactly the bytes that were validated. For a delta read by
    /// range ([`DeltaFile::from_ranges`]), every chunk not yet fetched is fetched
    /// first, and none after: call [`DeltaFile::fetch_all`] first to see whether
    /// that failed, since chunks that could not be fetched read as zeros (and fail
    /// their checksums).
    #[must_use]
    pub fn bytes(&self) -> &[u8] {
        match &self.map {
            Storage::Whole(bytes) => (**bytes).as_ref(),
            Storage::Ranged(sparse) => {
                // A failure shows as the chunks' checksums failing; see the docs.
                let _ = sparse.fetch_all();
                sparse.freeze()
            }
        }
    }

    /// Whether the delta is read by range ([`DeltaFile::from_ranges`]) rather than
    /// held whole.
    #[must_use]
    pub fn is_ranged(&self) -> bool {
        matches!(self.map, Storage::Ranged(_))
    }

    /// Bytes of chunks held in memory: every chunk's for a delta held whole, those
    /// fetched so far for one read by range.
    #[must_use]
    pub fn resident_chunk_bytes(&self) -> u64 {
        match &self.map {
            Storage::Whole(_) => self.chunks.iter().map(|c| u64::from(c.stored_len)).sum(),
            Storage::Ranged(sparse) => sparse.resident_bytes(),
        }
    }

    /// Fetches the stored bytes of the chunks `indices` (global chunk indices) that
    /// are not in memory yet, for a delta read by range: adjacent chunks in one
    /// request, many requests in flight. Does nothing for a delta held whole.
    ///
    /// # Errors
    /// The source's errors (`E_REMOTE_*`), naming the file.
    pub fn fetch_chunks(&self, indices: &[u64]) -> Result<()> {
        match &self.map {
            Storage::Whole(_) => Ok(()),
            Storage::Ranged(sparse) => sparse.fetch(indices).map_err(|e| e.in_file(&self.path)),
        }
    }

    /// Fetches every chunk not in memory yet; see [`DeltaFile::fetch_chunks`].
    ///
    /// # Errors
    /// As [`DeltaFile::fetch_chunks`].
    pub fn fetch_all(&self) -> Result<()> {
        match &self.map {
            Storage::Whole(_) => Ok(()),
            Storage::Ranged(sparse) => sparse.fetch_all().map_err(|e| e.in_file(&self.path)),
        }
    }

    /// For a delta read by range, the chunks of the batches after batch `k`, up to
    /// [`FETCH_AHEAD_BYTES`] of them, to fetch while batch `k` is decoded;
    /// `index_of` maps a position in the batches to a global chunk index. Empty
    /// for a delta held whole.
    pub(crate) fn chunks_ahead(&self, batches: &[Range<usize>], k: usize, index_of: impl Fn(usize) -> u64) -> Vec<u64> {
        let mut ahead = Vec::new();
        if !self.is_ranged() {
            return ahead;
        }
        let mut bytes = 0u64;
        for batch in batches.iter().skip(k + 1) {
            if bytes >= FETCH_AHEAD_BYTES {
                break;
            }
            for i in batch.clone() {
                let index = index_of(i);
                bytes += u64::from(self.chunk(index).stored_len);
                ahead.push(index);
            }
        }
        ahead
    }

    /// For a delta read by range, starts fetching its first chunks (in file order,
    /// the order in which its target is rebuilt) in the background, up to
    /// [`FETCH_AHEAD_BYTES`]: to overlap the first requests with work that comes
    /// before decoding, such as checking the base. Does nothing for a delta held
    /// whole.
    pub(crate) fn start_read_ahead(&self) {
        let Storage::Ranged(sparse) = &self.map else { return };
        let mut bytes = 0u64;
        let first: Vec<u64> = (0..self.chunks.len() as u64)
            .take_while(|&index| {
                let fits = bytes < FETCH_AHEAD_BYTES;
                bytes += u64::from(self.chunk(index).stored_len);
                fits
            })
            .collect();
        sparse.prefetch(&first);
    }

    /// Runs `work` on a batch of chunks after fetching them (for a delta read by
    /// range), once the chunks of the batches after it are being fetched in the
    /// background, so that fetching overlaps decoding. A failure to fetch those
    /// is left for their own batch to report.
    pub(crate) fn with_chunks_fetched<R>(&self, now: &[u64], next: &[u64], work: impl FnOnce() -> R) -> Result<R> {
        self.fetch_batch(now, next)?;
        Ok(work())
    }

    /// For a delta read by range, fetches the chunks `now` once the chunks `next`
    /// are being fetched in the background; the work on `now` follows. A failure
    /// to fetch `next` is left for their own batch to report.
    pub(crate) fn fetch_batch(&self, now: &[u64], next: &[u64]) -> Result<()> {
        if let Storage::Ranged(sparse) = &self.map {
            sparse.prefetch(next);
        }
        self.fetch_chunks(now)
    }

    /// Finds a tensor by name.
    #[must_use]
    pub fn tensor(&self, name: &str) -> Option<&TensorEntry> {
        self.header.tensors.iter().find(|t| t.name == name)
    }

    /// The record of chunk `index`.
    #[must_use]
    pub fn chunk(&self, index: u64) -> &ChunkRecord {
        &self.chunks[usize::try_from(index).expect("a validated chunk index")]
    }

    /// The stream records of chunk `index`.
    #[must_use]
    pub fn streams(&self, index: u64) -> &[StreamRecord] {
        let chunk = self.chunk(index);
        let first = chunk.first_stream as usize;
        &self.streams[first..first + usize::from(chunk.stream_count)]
    }

    /// The stored bytes of chunk `index`, all its streams back to back. For a delta
    /// read by range, empty until the chunk is fetched ([`DeltaFile::fetch_chunks`]);
    /// decoding fetches the chunks it needs itself.
    #[must_use]
    pub fn stored_bytes(&self, index: u64) -> &[u8] {
        let chunk = self.chunk(index);
        match &self.map {
            Storage::Whole(bytes) => {
                let start = usize::try_from(chunk.data_offset).expect("validated");
                &(**bytes).as_ref()[start..start + chunk.stored_len as usize]
            }
            Storage::Ranged(sparse) => {
                sparse.chunk(usize::try_from(index).expect("a validated chunk index")).unwrap_or(&[])
            }
        }
    }

    /// The stored bytes of chunk `index`, fetched first if the delta is read by
    /// range and they are not in memory yet.
    fn stored(&self, index: u64) -> Result<&[u8]> {
        let Storage::Ranged(sparse) = &self.map else { return Ok(self.stored_bytes(index)) };
        let at = usize::try_from(index).expect("a validated chunk index");
        if let Some(bytes) = sparse.chunk(at) {
            return Ok(bytes);
        }
        sparse.fetch(&[index])?;
        sparse.chunk(at).ok_or_else(|| Error::new(ErrorCode::Io, "the chunk could not be fetched").in_chunk(index))
    }

    /// The chunks of a tensor, with their word ranges.
    ///
    /// # Errors
    /// `E_UNKNOWN_DTYPE` (excluded once the file is open).
    pub fn spans(&self, tensor: &TensorEntry) -> Result<impl Iterator<Item = ChunkSpan> + '_> {
        let words = tensor.word_count()?;
        let chunk_words = tensor.chunk_words;
        Ok(tensor.chunk_range().enumerate().map(move |(k, index)| {
            let first_word = k as u64 * chunk_words;
            ChunkSpan { index, first_word, words: chunk_words.min(words - first_word) }
        }))
    }

    /// Chunk `k` (counted within the tensor) of `tensor`; `None` past its last.
    ///
    /// # Errors
    /// `E_UNKNOWN_DTYPE` (excluded once the file is open).
    pub fn span(&self, tensor: &TensorEntry, k: u64) -> Result<Option<ChunkSpan>> {
        let words = tensor.word_count()?;
        if k >= tensor.chunk_count {
            return Ok(None);
        }
        let first_word = k * tensor.chunk_words;
        Ok(Some(ChunkSpan {
            index: tensor.first_chunk + k,
            first_word,
            words: tensor.chunk_words.min(words - first_word),
        }))
    }

    /// What the chunk decoders of [`crate::delta`] need for one chunk: its records,
    /// its stored bytes, and the base bytes at its place (`None` without base,
    /// possibly shorter than the chunk, or empty, where the base tensor is shorter).
    fn chunk_input<'s>(
        &'s self,
        tensor: &TensorEntry,
        span: ChunkSpan,
        base: Option<&'s [u8]>,
    ) -> Result<ChunkInput<'s>> {
        let base = Self::chunk_base(span, tensor.word_width()?, base);
        self.chunk_input_at(tensor, span, base)
    }

    /// As [`DeltaFile::chunk_input`], given the base bytes at the chunk's place.
    fn chunk_input_at<'s>(
        &'s self,
        tensor: &TensorEntry,
        span: ChunkSpan,
        base: Option<&'s [u8]>,
    ) -> Result<ChunkInput<'s>> {
        let width = tensor.word_width()?;
        let words = usize::try_from(span.words).expect("bounded by MAX_CHUNK_WORDS");
        let stored = self.stored(span.index).map_err(|e| self.locate(e, tensor, span))?;
        let (record, streams) = (self.chunk(span.index), self.streams(span.index));
        Ok(ChunkInput { record, streams, stored, base, words, width, reference: None })
    }

    /// The base bytes at a chunk's place, cut from the whole base tensor's.
    pub(crate) fn chunk_base(span: ChunkSpan, width: WordWidth, base: Option<&[u8]>) -> Option<&[u8]> {
        let word_bytes = width.bytes();
        base.map(|b| {
            let start = usize::try_from(span.first_word).unwrap_or(usize::MAX).saturating_mul(word_bytes).min(b.len());
            let end = start
                .saturating_add(usize::try_from(span.words).unwrap_or(usize::MAX).saturating_mul(word_bytes))
                .min(b.len());
            &b[start..end]
        })
    }

    /// Rebuilds one chunk into `out`, given the whole base tensor's bytes (or `None`
    /// for a tensor without base).
    ///
    /// # Errors
    /// Decoding, checksum and digest errors, naming the tensor and chunk;
    /// `E_OUT_OF_MEMORY` when a buffer cannot be allocated.
    pub fn decode_chunk(
        &self,
        tensor: &TensorEntry,
        span: ChunkSpan,
        base: Option<&[u8]>,
        out: &mut Vec<u8>,
    ) -> Result<()> {
        self.decode_chunk_with(tensor, span, base, out, &mut DecodeScratch::default())
    }

    /// As [`DeltaFile::decode_chunk`], with scratch buffers kept by the caller.
    pub(crate) fn decode_chunk_with(
        &self,
        tensor: &TensorEntry,
        span: ChunkSpan,
        base: Option<&[u8]>,
        out: &mut Vec<u8>,
        scratch: &mut DecodeScratch,
    ) -> Result<()> {
        let reference = self.reference_positions(tensor, span)?;
        let chunk = ChunkInput { reference: reference.as_deref(), ..self.chunk_input(tensor, span, base)? };
        decode_chunk_with(&chunk, out, scratch).map_err(|e| self.locate(e, tensor, span))
    }

    /// As [`DeltaFile::decode_chunk_with`], given the base bytes at the chunk's
    /// place rather than the whole base tensor's: a chunk rebuilt on a base that
    /// is itself rebuilt chunk by chunk.
    pub(crate) fn decode_chunk_at(
        &self,
        tensor: &TensorEntry,
        span: ChunkSpan,
        chunk_base: Option<&[u8]>,
        out: &mut Vec<u8>,
        scratch: &mut DecodeScratch,
    ) -> Result<()> {
        let reference = self.reference_positions(tensor, span)?;
        let chunk = ChunkInput { reference: reference.as_deref(), ..self.chunk_input_at(tensor, span, chunk_base)? };
        decode_chunk_with(&chunk, out, scratch).map_err(|e| self.locate(e, tensor, span))
    }

    /// As [`DeltaFile::decode_chunk`], into `out`, exactly the chunk's length.
    fn decode_chunk_into(
        &self,
        tensor: &TensorEntry,
        span: ChunkSpan,
        base: Option<&[u8]>,
        out: &mut [u8],
        scratch: &mut DecodeScratch,
    ) -> Result<()> {
        let reference = self.reference_positions(tensor, span)?;
        let chunk = ChunkInput { reference: reference.as_deref(), ..self.chunk_input(tensor, span, base)? };
        decode_chunk_into(&chunk, out, scratch).map_err(|e| self.locate(e, tensor, span))
    }

    /// For an unchanged chunk that its base covers in full: checks it (record,
    /// checksum, digest) and returns the base bytes, which are the rebuilt chunk,
    /// without copying them. `None`, having checked nothing, for any other chunk.
    pub(crate) fn unchanged_chunk<'b>(
        &self,
        tensor: &TensorEntry,
        span: ChunkSpan,
        base: Option<&'b [u8]>,
    ) -> Result<Option<&'b [u8]>> {
        let unchanged = check_unchanged(&self.chunk_input(tensor, span, base)?);
        let base = Self::chunk_base(span, tensor.word_width()?, base);
        Ok(if unchanged.map_err(|e| self.locate(e, tensor, span))? { base } else { None })
    }

    /// Checks everything of a chunk that needs no base: checksum, streams, positions
    /// and changed count (spec §11.2 D1, D3, D4, D6); see
    /// [`crate::delta::check_chunk_payload`].
    ///
    /// # Errors
    /// As [`DeltaFile::decode_chunk`], except `E_CHUNK_DIGEST`.
    pub fn check_chunk_payload(
        &self,
        tensor: &TensorEntry,
        span: ChunkSpan,
        scratch: &mut DecodeScratch,
    ) -> Result<()> {
        let reference = self.reference_positions(tensor, span)?;
        let chunk = ChunkInput { reference: reference.as_deref(), ..self.chunk_input(tensor, span, None)? };
        check_chunk_payload(&chunk, scratch).map_err(|e| self.locate(e, tensor, span))
    }

    /// What decoding a chunk allocates at most, from its validated record.
    ///
    /// # Errors
    /// `E_UNKNOWN_DTYPE` (excluded once the file is open).
    pub fn decode_cost(&self, tensor: &TensorEntry, span: ChunkSpan) -> Result<DecodeCost> {
        Ok(decode_cost(self.chunk(span.index), self.streams(span.index), span.words, tensor.word_width()?))
    }

    /// Attaches a chain of reference deltas read from files (spec §11.2 R0):
    /// `references[0]` is this file's reference, `references[1]` that file's, and
    /// so on. An empty chain leaves the file as it is.
    ///
    /// # Errors
    /// As [`DeltaFile::open`] for each reference, and as
    /// [`DeltaFile::with_position_reference`] for each link.
    pub fn with_reference_chain(self, references: &[impl AsRef<Path>]) -> Result<Self> {
        let mut reference: Option<Arc<DeltaFile>> = None;
        for path in references.iter().rev() {
            let mut file = DeltaFile::open(path.as_ref())?;
            if let Some(own) = reference.take() {
                file = file.with_position_reference(own)?;
            }
            reference = Some(Arc::new(file));
        }
        match reference {
            Some(reference) => self.with_position_reference(reference),
            None => Ok(self),
        }
    }

    /// Attaches the reference delta whose chunk positions the chunks of position
    /// coding 3 are coded against (spec §8.3). `reference` may carry its own
    /// reference (a chain of them); it is checked against the pin of this file's
    /// header (spec §5.2). A file without a pin ignores it.
    ///
    /// # Errors
    /// `E_REFERENCE_MISMATCH` when the reference's SHA-256 or length differs from
    /// the pin.
    pub fn with_position_reference(mut self, reference: Arc<DeltaFile>) -> Result<Self> {
        let Some(pin) = &self.header.position_reference else { return Ok(self) };
        reference.fetch_all()?;
        if pin_of(&reference) != *pin {
            return Err(Error::new(
                ErrorCode::ReferenceMismatch,
                format!(
                    "the reference delta {} is not the file this delta was written against",
                    reference.path.display()
                ),
            )
            .in_file(&self.path));
        }
        self.reference = Some(reference);
        Ok(self)
    }

    /// Checks, before anything is decoded, that a file with chunks of position
    /// coding 3 has its reference delta attached (spec §11.2 R0), naming the first
    /// such chunk.
    ///
    /// # Errors
    /// `E_REFERENCE_REQUIRED`.
    pub fn require_position_reference(&self) -> Result<()> {
        if self.reference.is_some() || self.header.position_reference.is_none() {
            return Ok(());
        }
        for tensor in &self.header.tensors {
            for index in tensor.chunk_range() {
                let record = self.chunk(index);
                if record.encoding == Encoding::Sparse && record.position_coding == PositionCoding::SplitByReference {
                    return Err(Error::new(
                        ErrorCode::ReferenceRequired,
                        "the chunk codes its positions against a reference delta, which was not given",
                    )
                    .in_file(&self.path)
                    .in_tensor(&tensor.name)
                    .in_chunk(index));
                }
            }
        }
        Ok(())
    }

    /// The reference delta attached with [`DeltaFile::with_position_reference`].
    #[must_use]
    pub fn position_reference(&self) -> Option<&Arc<DeltaFile>> {
        self.reference.as_ref()
    }

    /// The reference set R of a chunk of position coding 3 (spec §8.3), `None` for
    /// any other chunk, or when no reference is attached (the chunk then fails with
    /// `E_REFERENCE_REQUIRED`).
    fn reference_positions(&self, tensor: &TensorEntry, span: ChunkSpan) -> Result<Option<Vec<u32>>> {
        let record = self.chunk(span.index);
        if record.encoding != Encoding::Sparse || record.position_coding != PositionCoding::SplitByReference {
            return Ok(None);
        }
        let Some(reference) = &self.reference else { return Ok(None) };
        let k = usize::try_from(span.first_word / tensor.chunk_words.max(1)).expect("bounded by MAX_CHUNKS");
        let words = usize::try_from(span.words).expect("bounded by MAX_CHUNK_WORDS");
        reference.positions_as_reference(&tensor.name, tensor.chunk_words, k, words).map(Some)
    }

    /// The positions of chunk `k` of tensor `name` as a reference set for a chunk of
    /// `words` words and `chunk_words` words per chunk (spec §8.3): empty without
    /// such a tensor or chunk, or with other `chunk_words`; cut to those below
    /// `words`.
    pub(crate) fn positions_as_reference(
        &self,
        name: &str,
        chunk_words: u64,
        k: usize,
        words: usize,
    ) -> Result<Vec<u32>> {
        let names = self
            .names
            .get_or_init(|| self.header.tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect());
        let Some(&index) = names.get(name) else { return Ok(Vec::new()) };
        let tensor = &self.header.tensors[index];
        if tensor.chunk_words != chunk_words {
            return Ok(Vec::new());
        }
        let Some(span) = self.span(tensor, k as u64)? else { return Ok(Vec::new()) };
        let remembered = self.positions_memo.lock().map_or(None, |mut memo| memo.remove(&(index, span.index)));
        let mut out = match remembered {
            Some(positions) => positions,
            None => self.positions_remembered(index, tensor, span)?,
        };
        out.truncate(out.partition_point(|&p| (p as usize) < words));
        Ok(out)
    }

    /// The positions of one chunk of this file (spec §8.3), decoded against its
    /// reference for position coding 3: every word of a dense or raw chunk, none
    /// of an unchanged one. The chunk's stored bytes are checked against its
    /// checksum first. A loader whose kernels do not decode coding 3 gives them
    /// these instead; the positions are also kept for the file that uses this
    /// one as its reference, which reads them next.
    ///
    /// # Errors
    /// `E_REFERENCE_REQUIRED` for a chunk of coding 3 without the reference
    /// delta attached, `E_CHUNK_CHECKSUM`, and the errors of the position
    /// streams (§8.3), naming the file, the tensor and the chunk.
    pub fn chunk_positions(&self, tensor: &TensorEntry, span: ChunkSpan) -> Result<Vec<u32>> {
        let names = self
            .names
            .get_or_init(|| self.header.tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect());
        let index = names.get(&tensor.name).copied().unwrap_or(usize::MAX);
        self.positions_remembered(index, tensor, span)
    }

    /// Decodes a chunk's positions and keeps a copy in the memo, for the file
    /// that reads this one as its reference.
    fn positions_remembered(&self, index: usize, tensor: &TensorEntry, span: ChunkSpan) -> Result<Vec<u32>> {
        let own = self.reference_positions(tensor, span)?;
        let record = self.chunk(span.index);
        if own.is_none()
            && record.encoding == Encoding::Sparse
            && record.position_coding == PositionCoding::SplitByReference
        {
            let e = Error::new(
                ErrorCode::ReferenceRequired,
                "the chunk codes its positions against a reference delta, which was not given",
            );
            return Err(self.locate(e, tensor, span));
        }
        let chunk = ChunkInput { reference: own.as_deref(), ..self.chunk_input_at(tensor, span, None)? };
        let mut out = Vec::new();
        chunk_positions(&chunk, &mut out, &mut DecodeScratch::default()).map_err(|e| self.locate(e, tensor, span))?;
        // Positions of a file without a reference of its own decode without a
        // chain walk: cheaper to decode again than to keep.
        if index != usize::MAX && self.reference.is_some() {
            if let Ok(mut memo) = self.positions_memo.lock() {
                memo.insert((index, span.index), out.clone());
            }
        }
        Ok(out)
    }

    fn locate(&self, e: Error, tensor: &TensorEntry, span: ChunkSpan) -> Error {
        e.in_file(&self.path).in_tensor(&tensor.name).in_chunk(span.index)
    }

    /// Rebuilds a whole tensor, decoding its chunks in parallel. The tensor is
    /// allocated once; chunks are decoded in batches whose scratch memory stays
    /// within [`crate::limits::DECODE_IN_FLIGHT_BYTES`].
    ///
    /// # Errors
    /// As [`DeltaFile::decode_chunk`], `E_BASE_REQUIRED` when a base is needed, and
    /// `E_OUT_OF_MEMORY` when the tensor cannot be allocated.
    pub fn decode_tensor(&self, tensor: &TensorEntry, base: Option<&[u8]>) -> Result<Vec<u8>> {
        require_base(tensor, base)?;
        let len = usize::try_from(tensor.byte_len()?)
            .map_err(|_| Error::new(ErrorCode::OutOfMemory, "the tensor does not fit this machine's memory"))?;
        let mut out = try_zeroed(len).map_err(|e| e.in_file(&self.path).in_tensor(&tensor.name))?;
        let chunks = usize::try_from(tensor.chunk_count).expect("bounded by MAX_CHUNKS");
        self.decode_chunks_into(tensor, base, 0..chunks, &mut out, &crate::pipeline::NoProgress)?;
        Ok(out)
    }

    /// Rebuilds chunks `chunks` of a tensor (counted within the tensor) into `out`,
    /// which holds exactly their bytes, decoding them in parallel in batches whose
    /// scratch memory stays within [`crate::limits::DECODE_IN_FLIGHT_BYTES`].
    /// `progress` advances by each batch's bytes and may stop the work between them.
    ///
    /// # Errors
    /// As [`DeltaFile::decode_chunk`], `E_BASE_REQUIRED` when a base is needed,
    /// `E_INVALID_ARGUMENT` when `chunks` lies outside the tensor or `out` does not
    /// fit them, and `E_INTERRUPTED`.
    pub fn decode_chunks_into(
        &self,
        tensor: &TensorEntry,
        base: Option<&[u8]>,
        chunks: std::ops::Range<usize>,
        out: &mut [u8],
        progress: &dyn crate::pipeline::Progress,
    ) -> Result<()> {
        require_base(tensor, base)?;
        let spans: Vec<ChunkSpan> = self.spans(tensor)?.skip(chunks.start).take(chunks.len()).collect();
        let word_bytes = tensor.word_width()?.bytes();
        let needed: u64 = spans.iter().map(|s| s.words * word_bytes as u64).sum();
        if spans.len() != chunks.len() || needed != out.len() as u64 {
            return Err(Error::new(
                ErrorCode::InvalidArgument,
                format!("chunks {chunks:?} and {} output bytes do not fit the tensor", out.len()),
            )
            .in_tensor(&tensor.name));
        }
        let costs =
            spans.iter().map(|&span| self.decode_cost(tensor, span).map(|c| c.scratch)).collect::<Result<Vec<_>>>()?;
        // One piece per chunk, so that a chunk of no words (an empty tensor) is checked too.
        let mut pieces: Vec<&mut [u8]> = Vec::with_capacity(spans.len());
        let mut rest = out;
        for span in &spans {
            let (piece, tail) = rest.split_at_mut(usize::try_from(span.words).expect("bounded") * word_bytes);
            pieces.push(piece);
            rest = tail;
        }
        let batches = crate::pipeline::batches(&costs, DECODE_IN_FLIGHT_BYTES);
        for (k, batch) in batches.iter().enumerate() {
            progress.check_interrupted().map_err(|e| e.in_tensor(&tensor.name))?;
            let bytes: usize = pieces[batch.clone()].iter().map(|p| p.len()).sum();
            let pieces = &mut pieces[batch.clone()];
            let now: Vec<u64> = spans[batch.clone()].iter().map(|s| s.index).collect();
            let ahead = self.chunks_ahead(&batches, k, |i| spans[i].index);
            self.with_chunks_fetched(&now, &ahead, || {
                spans[batch.clone()].par_iter().zip(pieces.par_iter_mut()).try_for_each(|(&span, piece)| {
                    self.decode_chunk_into(tensor, span, base, piece, &mut DecodeScratch::default())
                })
            })
            .map_err(|e| e.in_tensor(&tensor.name))??;
            progress.advance(bytes as u64);
        }
        Ok(())
    }
}

/// Where the bytes after a delta's chunks begin (header, chunk map, trailer), from
/// its preamble, for a delta read by range; the trailer alone when the preamble is
/// invalid or does not describe a file of `len` bytes, so that the checks of
/// [`DeltaFile::from_bytes`] report what is wrong, having fetched little.
fn metadata_start(file: &[u8], len: u64) -> u64 {
    let trailer = len.saturating_sub(TRAILER_LEN as u64);
    let Ok(preamble) = Preamble::parse(file) else { return trailer };
    if preamble.header_len > MAX_HEADER_LEN
        || preamble.chunk_count > MAX_CHUNKS
        || preamble.stream_count > preamble.chunk_count.saturating_mul(12)
    {
        return trailer;
    }
    match Layout::from_counts(preamble.data_len, preamble.header_len, preamble.chunk_count, preamble.stream_count) {
        Some(layout) if layout.file_len == len => layout.data_offset + layout.data_len,
        _ => trailer,
    }
}

/// The pin of a delta file (spec §5.2): its SHA-256 and length.
#[must_use]
pub fn pin_of(delta: &DeltaFile) -> PositionPin {
    use sha2::Digest as _;
    PositionPin { sha256: hex::encode(sha2::Sha256::digest(delta.bytes())), file_len: delta.file_len() }
}

fn require_base(tensor: &TensorEntry, base: Option<&[u8]>) -> Result<()> {
    if tensor.needs_base() && base.is_none() {
        return Err(
            Error::new(ErrorCode::BaseRequired, "the tensor is a delta and no base was given").in_tensor(&tensor.name)
        );
    }
    Ok(())
}

/// Checks that each embedded safetensors header lists exactly the tensors that the
/// header holds for its file, in data order (spec §5.3 S1 to S4). The writer runs it
/// too, before it writes a byte, so that it never writes a file readers refuse. Linear
/// in files plus tensors: the entries of a file are one run, since `file` never
/// decreases (H5.e, checked by [`Header::validate`] first).
///
/// # Errors
/// `E_HEADER_INVALID` or `E_DUPLICATE_KEY`, naming the tensor.
pub fn validate_target_files(header: &Header) -> Result<()> {
    for (file, tensors) in header.target.files.iter().zip(header.tensors_by_file()) {
        let listed = &header.tensors[tensors];
        let what = format!("the safetensors header of {}", file.name);
        check_unique_keys(&file.safetensors_header, &what)?; // S1
        let embedded = SafetensorsHeader::parse(&file.safetensors_header)
            .map_err(|e| Error::new(ErrorCode::HeaderInvalid, format!("{what}: {e}")))?; // S2
        if embedded.tensors.len() != listed.len() {
            return fail(
                ErrorCode::HeaderInvalid,
                format!("{} lists {} tensors but the delta has {}", file.name, embedded.tensors.len(), listed.len()),
            ); // S3
        }
        let by_name: HashMap<&str, &SafetensorsTensor> =
            embedded.tensors.iter().map(|(name, tensor)| (name.as_str(), tensor)).collect();
        let mut offset = 0u64;
        for entry in listed {
            // S4: the entries, in header order, tile the file's data.
            let len = entry.byte_len()?;
            let end = offset.checked_add(len);
            let same = by_name.get(entry.name.as_str()).is_some_and(|t| {
                t.dtype == entry.dtype_name
                    && t.shape == entry.shape
                    && Some(t.data_offsets) == end.map(|end| (offset, end))
            });
            if !same {
                return Err(Error::new(
                    ErrorCode::HeaderInvalid,
                    format!("the tensor differs from {}'s header", file.name),
                )
                .in_tensor(&entry.name));
            }
            offset = end.expect("checked by `same`");
        }
    }
    Ok(())
}
