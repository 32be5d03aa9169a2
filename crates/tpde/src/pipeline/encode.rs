//! `encode`: a target checkpoint, optionally against a base, into one delta file.

use std::path::Path;

use rayon::prelude::*;

use super::{window, Progress};
use crate::checkpoint::Checkpoint;
use crate::container::chunk_map::PositionCoding;
use crate::container::header::{
    is_plain_file_name, BaseTensor, Header, LayoutKind, TargetFile, TargetLayout, TensorEntry,
};
use crate::delta::{encode_chunk_against, EncodeSettings, EncodedChunk};
use crate::digest::{leaf_digest, to_hex, tree_digest, Digest128};
use crate::dtype::WordWidth;
use crate::error::{Error, ErrorCode, Result};
use crate::limits::MAX_CHUNK_WORDS;
use crate::output::{check_not_an_input, check_output, OutputKind};
use crate::reader::{pin_of, DeltaFile};
use crate::source::{SourceTensor, TensorSource};
use crate::writer::{check_header, DeltaWriter};

/// Settings of `encode`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EncodeOptions {
    /// Codec settings.
    pub settings: EncodeSettings,
    /// Words per chunk.
    pub chunk_words: u64,
}

impl Default for EncodeOptions {
    fn default() -> Self {
        Self { settings: EncodeSettings::default(), chunk_words: crate::limits::DEFAULT_CHUNK_WORDS }
    }
}

/// What `encode` wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncodeSummary {
    /// Bytes of the target checkpoint.
    pub target_bytes: u64,
    /// Bytes of the delta file.
    pub delta_bytes: u64,
    /// Tensors encoded against a base.
    pub delta_tensors: usize,
    /// Tensors stored without a base.
    pub standalone_tensors: usize,
}

/// The base tensor a target tensor is encoded against: same name and dtype, and the
/// same shape apart from the leading dimension, so that rows line up (spec §8).
fn counterpart<'a>(base: Option<&'a dyn TensorSource>, tensor: &SourceTensor) -> Option<SourceTensor<'a>> {
    let location = base?.tensor(tensor.name)?;
    let rows_line_up = location.dtype == tensor.dtype
        && location.shape.len() == tensor.shape.len()
        && location.shape.get(1..) == tensor.shape.get(1..);
    rows_line_up.then_some(location)
}

/// One target tensor to encode, chunk by chunk, against its base counterpart.
struct TensorJob<'a> {
    name: &'a str,
    chunk_words: u64,
    bytes: &'a [u8],
    width: WordWidth,
    chunk_bytes: usize,
    base: Option<&'a [u8]>,
    leading_sign: bool,
}

impl TensorJob<'_> {
    fn chunk_end(&self, start: usize) -> usize {
        (start + self.chunk_bytes).min(self.bytes.len())
    }

    /// The base's chunk at the same place, as the base's tensor digest cuts it
    /// (spec §10): `None` past the base's end.
    fn base_chunk(&self, start: usize) -> Option<&[u8]> {
        let base = self.base?;
        (start < base.len()).then(|| &base[start..(start + self.chunk_bytes).min(base.len())])
    }

    /// Encodes the chunk at `start`, and hashes the base's chunk at the same place
    /// for the base's tensor digest: here, where the encoding reads it, rather than
    /// in a second pass over the whole base.
    fn encode_chunk(&self, start: usize, settings: EncodeSettings, reference: Option<&DeltaFile>) -> Result<Encoded> {
        let base_leaf = self.base_chunk(start).map(leaf_digest);
        Ok(Encoded { chunk: self.encode_target_chunk(start, settings, reference)?, base_leaf })
    }

    fn encode_target_chunk(
        &self,
        start: usize,
        settings: EncodeSettings,
        reference: Option<&DeltaFile>,
    ) -> Result<EncodedChunk> {
        let end = self.chunk_end(start);
        let base = self.base.map(|b| &b[start.min(b.len())..end.min(b.len())]);
        // Only a chunk against a base can be sparse, and so use a reference set.
        let positions = match (reference, base) {
            (Some(reference), Some(_)) => Some(reference.positions_as_reference(
                self.name,
                self.chunk_words,
                start / self.chunk_bytes,
                (end - start) / self.width.bytes(),
            )?),
            _ => None,
        };
        encode_chunk_against(
            &self.bytes[start..end],
            base,
            self.width,
            self.leading_sign,
            settings,
            positions.as_deref(),
        )
    }
}

/// A chunk as [`TensorJob::encode_chunk`] gives it.
struct Encoded {
    chunk: EncodedChunk,
    /// The digest of the base's chunk at the same place, if the base reaches it.
    base_leaf: Option<Digest128>,
}

/// Encodes `chunks` on the thread pool and hands each to `write`, on this thread, in
/// the order of `chunks`. At most [`window`] chunks are encoded or waiting to be
/// written at once, so memory stays bounded; a new chunk starts as soon as one is
/// written, so that no thread waits for the slowest chunk of a batch, and writing
/// overlaps encoding.
fn encode_in_order(
    jobs: &[TensorJob<'_>],
    chunks: &[(usize, usize)],
    settings: EncodeSettings,
    reference: Option<&DeltaFile>,
    progress: &dyn Progress,
    mut write: impl FnMut(usize, usize, Encoded) -> Result<()>,
) -> Result<()> {
    let window = window();
    if rayon::current_thread_index().is_some() {
        // On a thread of a pool (a caller's `install`), waiting for chunks that this
        // thread may have to run itself would never end: encode a window at a time
        // with the pool's own joins instead.
        for batch in chunks.chunks(window) {
            progress.check_interrupted()?;
            let encoded = batch
                .par_iter()
                .map(|&(tensor, start)| jobs[tensor].encode_chunk(start, settings, reference))
                .collect::<Result<Vec<_>>>()?;
            for (&(tensor, start), chunk) in batch.iter().zip(encoded) {
                write(tensor, start, chunk)?;
            }
        }
        return Ok(());
    }
    type Outcome = std::thread::Result<Result<Encoded>>;
    let (done, finished) = std::sync::mpsc::channel::<(usize, Outcome)>();
    rayon::in_place_scope(|scope| {
        let mut waiting: std::collections::VecDeque<Option<Encoded>> = std::collections::VecDeque::new();
        let mut started = 0;
        let mut written = 0;
        while written < chunks.len() {
            progress.check_interrupted()?;
            while started < chunks.len() && started < written + window {
                let (tensor, start) = chunks[started];
                let (done, at) = (done.clone(), started);
                scope.spawn(move |_| {
                    // A panic is reported too, so that the receiver never waits for a
                    // chunk that will not come; it is resumed on this thread.
                    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        jobs[tensor].encode_chunk(start, settings, reference)
                    }));
                    // The receiver outlives the scope, so the send cannot fail.
                    let _ = done.send((at, outcome));
                });
                waiting.push_back(None);
                started += 1;
            }
            let (at, outcome) = finished.recv().expect("a chunk in flight always reports");
            let chunk = outcome.unwrap_or_else(|panic| std::panic::resume_unwind(panic))?;
            waiting[at - written] = Some(chunk);
            while let Some(Some(_)) = waiting.front() {
                let chunk = waiting.pop_front().flatten().expect("checked above");
                let (tensor, start) = chunks[written];
                write(tensor, start, chunk)?;
                written += 1;
            }
        }
        Ok(())
    })
}

/// Stands for a digest until it is computed; as long as a real one.
const PLACEHOLDER_DIGEST: &str = "00000000000000000000000000000000";

/// The name a target file is recorded under. A single file's name is informative
/// (spec §11.3), so one the format cannot hold (`model.st`) is recorded as
/// `model.safetensors`; a shard's name is kept and checked like every other.
fn stored_file_name(kind: LayoutKind, name: &str) -> String {
    let representable = is_plain_file_name(name) && name.ends_with(".safetensors");
    if kind == LayoutKind::File && !representable {
        "model.safetensors".to_owned()
    } else {
        name.to_owned()
    }
}

/// A target that breaks a rule of the format is the input's fault, not a header's:
/// `E_INVALID_CHECKPOINT`, keeping the codes that already name an input problem.
fn unstorable(error: Error, target: &dyn TensorSource) -> Error {
    let code = match error.code() {
        ErrorCode::LimitExceeded | ErrorCode::UnknownDtype => error.code(),
        _ => ErrorCode::InvalidCheckpoint,
    };
    let mut stored = Error::new(code, format!("the target cannot be stored in format 1.0: {}", error.message()));
    if let Some(tensor) = error.tensor() {
        stored = stored.in_tensor(tensor);
    }
    stored.in_file(target.origin())
}

/// Encodes `target` (against `base`, when given) into the delta file `out`, which
/// appears only once complete, replacing a file there.
///
/// # Errors
/// Input errors of either checkpoint, `E_INVALID_ARGUMENT` for a bad chunk size,
/// `E_INVALID_CHECKPOINT`, `E_LIMIT_EXCEEDED` or `E_UNKNOWN_DTYPE` for a target the
/// format cannot hold (checked before anything is written), `E_IO` on write failure.
pub fn encode(
    base: Option<&Checkpoint>,
    target: &Checkpoint,
    out: &Path,
    options: EncodeOptions,
    progress: &dyn Progress,
) -> Result<EncodeSummary> {
    encode_to(base, target, out, options, true, progress)
}

/// Like [`encode`]; without `force`, fails with `E_OUTPUT_EXISTS` if anything is at
/// `out`, when it starts or when the delta is renamed into place. With `force`, only
/// a file is replaced. An `out` that is an input, or inside one, is refused.
///
/// # Errors
/// As [`encode`], and `E_OUTPUT_EXISTS` or `E_INVALID_ARGUMENT` for `out`.
pub fn encode_to(
    base: Option<&Checkpoint>,
    target: &Checkpoint,
    out: &Path,
    options: EncodeOptions,
    force: bool,
    progress: &dyn Progress,
) -> Result<EncodeSummary> {
    encode_sources(base.map(|b| b as &dyn TensorSource), target, out, options, force, progress)
}

/// Like [`encode_to`], from any [`TensorSource`]: tensors in memory as well as
/// checkpoints on disk.
///
/// # Errors
/// As [`encode_to`], and `E_INTERRUPTED` when `progress` asks to stop.
pub fn encode_sources(
    base: Option<&dyn TensorSource>,
    target: &dyn TensorSource,
    out: &Path,
    options: EncodeOptions,
    force: bool,
    progress: &dyn Progress,
) -> Result<EncodeSummary> {
    encode_sources_against(base, target, out, options, force, None, progress)
}

/// Like [`encode_sources`], coding the positions of sparse chunks against those of
/// `reference` (spec §8.3, position coding 3) where that stores smaller. The
/// reference carries its own reference, if it has one
/// ([`DeltaFile::with_position_reference`]). A delta that uses coding 3 pins the
/// reference in its header and is a format 1.2 file; one that does not is written
/// exactly as [`encode_sources`] writes it.
///
/// # Errors
/// As [`encode_sources`], and the reference's decoding errors.
pub fn encode_sources_against(
    base: Option<&dyn TensorSource>,
    target: &dyn TensorSource,
    out: &Path,
    options: EncodeOptions,
    force: bool,
    reference: Option<&DeltaFile>,
    progress: &dyn Progress,
) -> Result<EncodeSummary> {
    let inputs: Vec<&Path> = base.iter().chain([&target]).filter_map(|c| c.input_path()).collect();
    check_not_an_input(out, &inputs)?;
    check_output(out, force, OutputKind::File)?;
    let settings = options.settings;
    if options.chunk_words == 0
        || options.chunk_words > MAX_CHUNK_WORDS
        || !(1..=22).contains(&settings.level)
        || !(0.0..=1.0).contains(&settings.min_zstd_gain)
    {
        return Err(Error::new(
            ErrorCode::InvalidArgument,
            format!("chunk words must be 1..={MAX_CHUNK_WORDS}, the level 1..=22 and the zstd gain 0..=1"),
        ));
    }
    // Every entry with its chunk count, and placeholder digests of the final length,
    // so that the reader's checks run on a header of the final size before a byte
    // of the delta is written (spec §12 item 3).
    let files = target.files();
    let mut tensors = Vec::new();
    let mut next_chunk = 0u64;
    for (file_index, file) in files.iter().enumerate() {
        for location in &file.tensors {
            let mut entry = TensorEntry {
                name: location.name.to_owned(),
                dtype_name: location.dtype.as_str().to_owned(),
                shape: location.shape.to_vec(),
                file: u32::try_from(file_index).unwrap_or(u32::MAX),
                chunk_words: options.chunk_words,
                first_chunk: next_chunk,
                chunk_count: 0,
                digest: PLACEHOLDER_DIGEST.to_owned(),
                base: counterpart(base, location).map(|base_location| BaseTensor {
                    shape: base_location.shape.to_vec(),
                    digest: PLACEHOLDER_DIGEST.to_owned(),
                }),
            };
            // A shape the format cannot hold is reported by the checks below.
            entry.chunk_count = entry.word_count().map_or(0, |words| words.div_ceil(options.chunk_words));
            next_chunk = next_chunk.saturating_add(entry.chunk_count);
            tensors.push(entry);
        }
    }
    let mut header = Header {
        writer: format!("tpde {}", env!("CARGO_PKG_VERSION")),
        target: TargetLayout {
            kind: target.kind(),
            files: files
                .iter()
                .map(|f| TargetFile {
                    name: stored_file_name(target.kind(), f.name),
                    safetensors_header: f.header_text.to_owned(),
                })
                .collect(),
            index_json: target.index_json().map(str::to_owned),
        },
        tensors,
        position_reference: None,
        extensions: std::collections::BTreeMap::new(),
    };
    check_header(&header, next_chunk).map_err(|e| unstorable(e, target))?;

    progress.phase("encoding", target.total_bytes());
    let mut writer = DeltaWriter::create_with(out, force)?;
    let mut summary =
        EncodeSummary { target_bytes: target.total_bytes(), delta_bytes: 0, delta_tensors: 0, standalone_tensors: 0 };
    let jobs = files
        .iter()
        .flat_map(|file| file.tensors.iter())
        .map(|location| {
            let width = location.dtype.word_width();
            TensorJob {
                name: location.name,
                chunk_words: options.chunk_words,
                bytes: location.bytes,
                width,
                chunk_bytes: usize::try_from(options.chunk_words).expect("bounded") * width.bytes(),
                base: counterpart(base, location).map(|b| b.bytes),
                leading_sign: location.dtype.has_leading_sign(),
            }
        })
        .collect::<Vec<TensorJob>>();
    // Chunks of every tensor in file order, encoded a window at a time across tensor
    // boundaries: most tensors hold one chunk, so windows within a tensor would leave
    // threads idle. The order of the chunks, and so the file, is the same whatever
    // the thread count.
    let chunks: Vec<(usize, usize)> = jobs
        .iter()
        .enumerate()
        .flat_map(|(tensor, job)| (0..job.bytes.len()).step_by(job.chunk_bytes).map(move |start| (tensor, start)))
        .collect();
    let mut leaves: Vec<Vec<Digest128>> = vec![Vec::new(); jobs.len()];
    let mut base_leaves: Vec<Vec<Digest128>> = vec![Vec::new(); jobs.len()];
    let mut uses_reference = false;
    encode_in_order(
        &jobs,
        &chunks,
        options.settings,
        reference,
        progress,
        |tensor, start, Encoded { chunk, base_leaf }| {
            uses_reference |= chunk.record.position_coding == PositionCoding::SplitByReference;
            leaves[tensor].push(chunk.record.digest);
            base_leaves[tensor].extend(base_leaf);
            writer.push_chunk(chunk)?;
            progress.advance((jobs[tensor].chunk_end(start) - start) as u64);
            Ok(())
        },
    )?;
    // A base longer than its target has chunks that no chunk of the target reaches.
    let base_digests: Vec<Option<Digest128>> = jobs
        .par_iter()
        .zip(&mut base_leaves)
        .map(|(job, leaves)| {
            let base = job.base?;
            let reached = job.bytes.len().div_ceil(job.chunk_bytes) * job.chunk_bytes;
            leaves.extend(
                (reached..base.len())
                    .step_by(job.chunk_bytes)
                    .filter_map(|start| job.base_chunk(start))
                    .map(leaf_digest),
            );
            Some(tree_digest(leaves))
        })
        .collect();
    for ((entry, leaves), base_digest) in header.tensors.iter_mut().zip(&leaves).zip(base_digests) {
        entry.digest = to_hex(&tree_digest(leaves));
        match (&mut entry.base, base_digest) {
            (Some(base_ref), Some(digest)) => {
                base_ref.digest = to_hex(&digest);
                summary.delta_tensors += 1;
            }
            _ => summary.standalone_tensors += 1,
        }
    }
    // The pin only where a chunk needs it: otherwise the file is what
    // `encode_sources` writes, readable by 1.0 and 1.1 readers.
    header.position_reference = reference.filter(|_| uses_reference).map(pin_of);
    writer.finish(&header)?;
    summary.delta_bytes = std::fs::metadata(out).map_err(|e| Error::io(out, "cannot stat the delta", e))?.len();
    Ok(summary)
}
