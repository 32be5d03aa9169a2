//! `apply` and `verify`: rebuild the target from a delta (and its base), byte for
//! byte, into files or against a reference checkpoint.

use std::path::Path;

use std::sync::mpsc::{sync_channel, SyncSender};

use rayon::prelude::*;

use super::{batches, window, MemoryBudget, Progress};
use crate::checkpoint::Checkpoint;
use crate::checkpoint::INDEX_FILE;
use crate::container::chunk_map::Encoding;
use crate::container::header::{LayoutKind, TensorEntry};
use crate::delta::DecodeScratch;
use crate::digest::{tensor_digest, to_hex};
use crate::error::{Error, ErrorCode, Result};
use crate::limits::{DECODE_IN_FLIGHT_BYTES, DECODE_RETAINED_BYTES};
use crate::output::{check_not_an_input, check_output, OutputKind, PendingDir, PendingFile};
use crate::reader::{ChunkSpan, DeltaFile};

/// Receives the rebuilt target, file by file, in order, on its own thread.
trait TargetSink: Send {
    fn begin_file(&mut self, name: &str) -> Result<()>;
    fn write(&mut self, bytes: &[u8]) -> Result<()>;
    fn end_file(&mut self) -> Result<()>;
}

/// The base bytes of each tensor, in header order (`None` for a standalone tensor),
/// after checking that the base is the one the delta was made against: names, dtypes
/// and shapes first (cheap), then every digest (spec §11.2). Every consumer of a
/// delta, on the CPU or the GPU, calls this before it writes anything.
///
/// # Errors
/// `E_BASE_REQUIRED`, `E_BASE_MISSING_TENSOR`, `E_BASE_MISMATCH` or `E_BASE_DIGEST`,
/// naming the base file and the tensor.
pub fn resolve_base<'a>(
    delta: &DeltaFile,
    base: Option<&'a Checkpoint>,
    progress: &dyn Progress,
) -> Result<Vec<Option<&'a [u8]>>> {
    let tensors = &delta.header().tensors;
    if delta.header().needs_base() && base.is_none() {
        return Err(Error::new(ErrorCode::BaseRequired, "this delta needs a base checkpoint").in_file(delta.path()));
    }
    let mut resolved = Vec::with_capacity(tensors.len());
    let mut to_hash = 0u64;
    for tensor in tensors {
        let Some(base_ref) = &tensor.base else {
            resolved.push(None);
            continue;
        };
        let base = base.expect("checked above");
        let Some((file, location)) = base.tensor(&tensor.name) else {
            return Err(Error::new(ErrorCode::BaseMissingTensor, "the base has no tensor of this name")
                .in_file(&base.root)
                .in_tensor(&tensor.name));
        };
        if location.dtype.as_str() != tensor.dtype_name || location.shape != base_ref.shape {
            return Err(Error::new(
                ErrorCode::BaseMismatch,
                format!(
                    "the base tensor is {} {:?} but the delta expects {} {:?}",
                    location.dtype, location.shape, tensor.dtype_name, base_ref.shape
                ),
            )
            .in_file(&file.path)
            .in_tensor(&tensor.name));
        }
        to_hash += location.range.len() as u64;
        resolved.push(Some(file.tensor_bytes(location)));
    }
    progress.phase("checking base", to_hash);
    // Tensor by tensor in parallel, since most tensors are one chunk, which
    // `tensor_digest` alone would hash on one thread; the first mismatch in header
    // order is reported.
    let matches: Vec<Result<bool>> = tensors
        .par_iter()
        .zip(&resolved)
        .map(|(tensor, bytes)| {
            let (Some(base_ref), Some(bytes)) = (&tensor.base, bytes) else { return Ok(true) };
            let chunk_bytes = usize::try_from(tensor.chunk_words).expect("bounded") * tensor.word_width()?.bytes();
            let matches = to_hex(&tensor_digest(bytes, chunk_bytes)?) == base_ref.digest;
            progress.advance(bytes.len() as u64);
            Ok(matches)
        })
        .collect();
    for (tensor, matches) in tensors.iter().zip(matches) {
        if let (false, Some(base)) = (matches?, base) {
            return Err(Error::new(
                ErrorCode::BaseDigest,
                "the base tensor's content differs from the one the delta was made against",
            )
            .in_file(base.tensor(&tensor.name).map_or(&base.root, |(file, _)| &file.path))
            .in_tensor(&tensor.name));
        }
    }
    Ok(resolved)
}

/// Where the base bytes of one of the rebuilt delta's tensors come from.
enum TensorBase<'a> {
    /// It has no base.
    Standalone,
    /// A checkpoint's bytes, memory-mapped.
    Mapped(&'a [u8]),
    /// The target of the chain's earlier deltas, rebuilt chunk by chunk.
    Chained(ChainedTensor<'a>),
}

/// One tensor through the earlier deltas of a chain: the deltas that rebuild it,
/// first to last, starting where it is standalone or where the first delta's base
/// (a checkpoint) holds it.
struct ChainedTensor<'a> {
    links: Vec<(&'a DeltaFile, &'a TensorEntry)>,
    /// The first link's base bytes, from the checkpoint, if it has one.
    root: Option<&'a [u8]>,
}

impl ChainedTensor<'_> {
    /// Rebuilds chunk `index` (counted within the tensor) of the last link's
    /// target: each link's chunk is rebuilt on the one before, so at most two
    /// chunks are held at once, whatever the chain's length. A link whose target
    /// is too short to have that chunk leaves nothing, the empty base of a tensor
    /// that grew.
    fn chunk(&self, index: u64, scratch: &mut DecodeScratch) -> Result<Vec<u8>> {
        let mut rebuilt: Option<Vec<u8>> = None;
        for &(delta, tensor) in &self.links {
            let Some(span) = delta.span(tensor, index)? else {
                rebuilt = Some(Vec::new());
                continue;
            };
            let chunk_base = match (&rebuilt, &tensor.base) {
                (_, None) => None,
                (Some(below), Some(_)) => Some(below.as_slice()),
                (None, Some(_)) => DeltaFile::chunk_base(span, tensor.word_width()?, self.root),
            };
            let mut out = Vec::new();
            delta.decode_chunk_at(tensor, span, chunk_base, &mut out, scratch)?;
            rebuilt = Some(out);
        }
        Ok(rebuilt.unwrap_or_default())
    }

    /// The decode memory one chunk holds at once: the most any link needs for
    /// its chunk, plus the chunk it is rebuilt on.
    fn chunk_cost(&self, index: u64) -> Result<u64> {
        let mut most = 0;
        for &(delta, tensor) in &self.links {
            let Some(span) = delta.span(tensor, index)? else { continue };
            let cost = delta.decode_cost(tensor, span)?;
            most = most.max(cost.output.saturating_mul(2).saturating_add(cost.scratch));
        }
        Ok(most)
    }
}

/// The base of every tensor of the chain's last delta, in header order. The first
/// delta's base is checked as [`resolve_base`] checks it. Each later delta's base
/// is the target of the one before: its tensors' names, dtypes, shapes, chunking
/// and digests must match that target's as recorded in its header, which its
/// chunk digests then prove chunk by chunk as they are rebuilt.
///
/// # Errors
/// As [`resolve_base`], naming the earlier delta's file where a link does not fit.
fn resolve_chain<'a>(
    chain: &'a [DeltaFile],
    base: Option<&'a Checkpoint>,
    progress: &dyn Progress,
) -> Result<Vec<TensorBase<'a>>> {
    let (first, _) = chain.split_first().ok_or_else(|| Error::new(ErrorCode::InvalidArgument, "no delta to apply"))?;
    let roots = resolve_base(first, base, progress)?;
    for delta in chain {
        // §11.2 R0: refused before anything is written.
        delta.require_position_reference()?;
    }
    if chain.len() == 1 {
        return Ok(roots.into_iter().map(|b| b.map_or(TensorBase::Standalone, TensorBase::Mapped)).collect());
    }
    for pair in chain.windows(2) {
        check_link(&pair[0], &pair[1])?;
    }
    let last = chain.len() - 1;
    let by_name: Vec<std::collections::HashMap<&str, &TensorEntry>> =
        chain.iter().map(|d| d.header().tensors.iter().map(|t| (t.name.as_str(), t)).collect()).collect();
    let first_index: std::collections::HashMap<&str, usize> =
        first.header().tensors.iter().enumerate().map(|(i, t)| (t.name.as_str(), i)).collect();
    let mut bases = Vec::with_capacity(chain[last].header().tensors.len());
    for tensor in &chain[last].header().tensors {
        if tensor.base.is_none() {
            bases.push(TensorBase::Standalone);
            continue;
        }
        // Walk back while each link is based on the one before.
        let mut links = Vec::new();
        let mut level = last;
        let mut entry = tensor;
        while entry.base.is_some() && level > 0 {
            level -= 1;
            entry = by_name[level].get(entry.name.as_str()).copied().ok_or_else(|| {
                Error::new(ErrorCode::BaseMissingTensor, "the earlier delta's target has no tensor of this name")
                    .in_file(chain[level].path())
                    .in_tensor(&tensor.name)
            })?;
            links.push((&chain[level], entry));
        }
        links.reverse();
        let root = match (level, &entry.base) {
            (0, Some(_)) => first_index.get(entry.name.as_str()).and_then(|&i| roots[i]),
            _ => None,
        };
        bases.push(TensorBase::Chained(ChainedTensor { links, root }));
    }
    Ok(bases)
}

/// Checks that `next` is a delta against the target of `earlier`, from their
/// headers alone: names, dtypes, shapes and chunking of every tensor first, then
/// every digest. A consumer that holds `earlier`'s target, rebuilt and checked
/// chunk by chunk, thereby checks `next`'s base without hashing it again.
///
/// # Errors
/// `E_BASE_MISSING_TENSOR`, `E_BASE_MISMATCH` (also for tensors cut into chunks
/// of other sizes, whose digests do not compare) or `E_BASE_DIGEST`, naming
/// `earlier`'s file and the tensor.
pub fn check_link(earlier: &DeltaFile, next: &DeltaFile) -> Result<()> {
    let targets: std::collections::HashMap<&str, &TensorEntry> =
        earlier.header().tensors.iter().map(|t| (t.name.as_str(), t)).collect();
    let fault = |code, message: String, tensor: &TensorEntry| {
        Err(Error::new(code, message).in_file(earlier.path()).in_tensor(&tensor.name))
    };
    let mut pairs = Vec::new();
    for tensor in &next.header().tensors {
        let Some(base_ref) = &tensor.base else { continue };
        let Some(&target) = targets.get(tensor.name.as_str()) else {
            return fault(
                ErrorCode::BaseMissingTensor,
                "the earlier delta's target has no tensor of this name".into(),
                tensor,
            );
        };
        if target.dtype_name != tensor.dtype_name || target.shape != base_ref.shape {
            let message = format!(
                "the earlier delta's target is {} {:?} but the next delta expects {} {:?}",
                target.dtype_name, target.shape, tensor.dtype_name, base_ref.shape
            );
            return fault(ErrorCode::BaseMismatch, message, tensor);
        }
        if target.chunk_words != tensor.chunk_words {
            // The digests are over chunks of these sizes, so they compare only
            // when the sizes agree.
            let message = format!(
                "the earlier delta cuts this tensor into chunks of {} words, the next one into chunks of {}; \
                 rebuild the earlier target and apply the next delta to it",
                target.chunk_words, tensor.chunk_words
            );
            return fault(ErrorCode::BaseMismatch, message, tensor);
        }
        pairs.push((tensor, target, base_ref));
    }
    for (tensor, target, base_ref) in pairs {
        if target.digest != base_ref.digest {
            let message = "the earlier delta's target differs from the base the next delta was made against";
            return fault(ErrorCode::BaseDigest, message.into(), tensor);
        }
    }
    Ok(())
}

/// Whether each delta of `chain` cuts the tensors it bases on the one before into
/// chunks of the sizes that one does, so that [`apply_chain`] can rebuild the end
/// of the chain chunk by chunk. Where they do not (deltas written with other
/// chunk sizes), apply the deltas one by one. Tensors the earlier delta lacks
/// count as cut alike: [`apply_chain`] reports them.
#[must_use]
pub fn chain_cut_alike(chain: &[DeltaFile]) -> bool {
    chain.windows(2).all(|pair| {
        let earlier: std::collections::HashMap<&str, u64> =
            pair[0].header().tensors.iter().map(|t| (t.name.as_str(), t.chunk_words)).collect();
        pair[1]
            .header()
            .tensors
            .iter()
            .filter(|t| t.base.is_some())
            .all(|t| earlier.get(t.name.as_str()).is_none_or(|&chunk_words| chunk_words == t.chunk_words))
    })
}

/// What the decoding threads hand to the thread that writes.
enum SinkMessage<'a> {
    Begin(String),
    /// Rebuilt bytes, and the bytes of the decode budget they hold until written.
    Owned(Vec<u8>, u64),
    /// Bytes of an input, written as they are: an unchanged chunk's base.
    Borrowed(&'a [u8]),
    End,
}

/// Of [`DECODE_RETAINED_BYTES`], the output buffers kept for reuse once written.
const SPARE_OUTPUT_BYTES: u64 = DECODE_RETAINED_BYTES / 2;

/// Output buffers that the writer is done with, for the decoders to fill again.
/// Memory freed and allocated again by the megabyte costs a page fault per page,
/// and in a virtual machine that hands free pages back to its host, a fault on the
/// host too.
struct SpareBuffers {
    limit: u64,
    held: std::sync::Mutex<(Vec<Vec<u8>>, u64)>,
}

impl SpareBuffers {
    /// Buffers smaller than this are not worth keeping.
    const SMALLEST: usize = 64 << 10;

    fn new(limit: u64) -> Self {
        Self { limit, held: std::sync::Mutex::default() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (Vec<Vec<u8>>, u64)> {
        // A list and its sum stay consistent even if a holder panicked.
        self.held.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A spare buffer, or a new, empty one.
    fn take(&self) -> Vec<u8> {
        let mut held = self.lock();
        let buffer = held.0.pop().unwrap_or_default();
        held.1 -= buffer.capacity() as u64;
        buffer
    }

    /// Keeps `buffer` for reuse if it is large enough and fits the limit.
    fn give(&self, buffer: Vec<u8>) {
        let bytes = buffer.capacity() as u64;
        let mut held = self.lock();
        if buffer.capacity() >= Self::SMALLEST && held.1 + bytes <= self.limit {
            held.0.push(buffer);
            held.1 += bytes;
        }
    }
}

/// Rebuilds every file of the target into `sink`. Chunks are decoded in parallel
/// while a separate thread writes the previous ones, so that writing overlaps
/// decoding. Every buffer that decoding allocates is counted against
/// [`DECODE_IN_FLIGHT_BYTES`] from before it is allocated until it is written,
/// whatever the thread count (spec §9.1).
fn rebuild(
    chain: &[DeltaFile],
    base: Option<&Checkpoint>,
    sink: &mut dyn TargetSink,
    progress: &dyn Progress,
) -> Result<()> {
    // A delta read by range starts fetching its first chunks while the base is checked.
    for delta in chain {
        delta.start_read_ahead();
    }
    let bases = resolve_chain(chain, base, progress)?;
    let delta = chain.last().expect("resolve_chain refuses an empty chain");
    let header = delta.header();
    let total: u64 = header.tensors.iter().map(|t| t.byte_len().unwrap_or(0)).sum();
    progress.phase("rebuilding", total);
    let budget = MemoryBudget::new(DECODE_IN_FLIGHT_BYTES);
    let spares = SpareBuffers::new(SPARE_OUTPUT_BYTES);
    let (to_writer, from_decoders) = sync_channel::<SinkMessage>(window());
    std::thread::scope(|scope| {
        let (budget, spares) = (&budget, &spares);
        let writer = scope.spawn(move || -> Result<()> {
            /// Decoders waiting for memory must wake once nothing frees it any more.
            struct CloseOnExit<'b>(&'b MemoryBudget);
            impl Drop for CloseOnExit<'_> {
                fn drop(&mut self) {
                    self.0.close();
                }
            }
            let _close = CloseOnExit(budget);
            for message in from_decoders {
                match message {
                    SinkMessage::Begin(name) => sink.begin_file(&name)?,
                    SinkMessage::Owned(bytes, charge) => {
                        let written = sink.write(&bytes);
                        progress.advance(bytes.len() as u64);
                        spares.give(bytes);
                        budget.release(charge);
                        written?;
                    }
                    SinkMessage::Borrowed(bytes) => {
                        sink.write(bytes)?;
                        progress.advance(bytes.len() as u64);
                    }
                    SinkMessage::End => sink.end_file()?,
                }
            }
            Ok(())
        });
        let decoded = decode_files(delta, &bases, &to_writer, budget, spares, progress);
        drop(to_writer);
        // A write failure also stops the decoders; report it rather than theirs.
        writer.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))?;
        decoded
    })
}

/// The writer hung up, which it does only after failing; its error is reported.
fn hung_up<T>(_: T) -> Error {
    Error::new(ErrorCode::Io, "the output writer stopped")
}

/// A chunk as rebuilt for the writer.
enum Rebuilt<'a> {
    Owned(Vec<u8>),
    Borrowed(&'a [u8]),
}

/// The budget a chunk holds while it is decoded, and the part of it (its output)
/// that it still holds until written. An unchanged chunk that its base covers is
/// the base itself, and costs nothing.
fn chunk_charge(delta: &DeltaFile, tensor: &TensorEntry, span: ChunkSpan, base: &TensorBase) -> Result<(u64, u64)> {
    let cost = delta.decode_cost(tensor, span)?;
    let end = (span.first_word + span.words) * tensor.word_width()?.bytes_u64();
    let below = match base {
        TensorBase::Mapped(b) if end <= b.len() as u64 && delta.chunk(span.index).encoding == Encoding::Unchanged => {
            return Ok((0, 0));
        }
        TensorBase::Standalone | TensorBase::Mapped(_) => 0,
        TensorBase::Chained(chained) => chained.chunk_cost(span.index - tensor.first_chunk)?,
    };
    Ok((cost.output + cost.scratch + below, cost.output))
}

/// Rebuilds one chunk on its base.
fn rebuild_chunk<'a>(
    delta: &DeltaFile,
    tensor: &TensorEntry,
    span: ChunkSpan,
    base: &'a TensorBase<'a>,
    mut out: Vec<u8>,
    scratch: &mut DecodeScratch,
) -> Result<Rebuilt<'a>> {
    match base {
        TensorBase::Standalone => delta.decode_chunk_with(tensor, span, None, &mut out, scratch)?,
        TensorBase::Mapped(bytes) => {
            if let Some(unchanged) = delta.unchanged_chunk(tensor, span, Some(bytes))? {
                return Ok(Rebuilt::Borrowed(unchanged));
            }
            delta.decode_chunk_with(tensor, span, Some(bytes), &mut out, scratch)?;
        }
        TensorBase::Chained(chained) => {
            let below = chained.chunk(span.index - tensor.first_chunk, scratch)?;
            delta.decode_chunk_at(tensor, span, Some(&below), &mut out, scratch)?;
        }
    }
    Ok(Rebuilt::Owned(out))
}

/// A chunk's decoding as it comes back from the pool: its place in the file's
/// chunks, its result (or panic), and the scratch it used.
type ChunkOutcome<'a> = (usize, std::thread::Result<Result<Rebuilt<'a>>>, DecodeScratch);

/// A chunk started and not yet handed to the writer.
struct InFlight<'a> {
    /// What it holds of the memory budget.
    charged: u64,
    /// What of that its output holds until written.
    output: u64,
    /// Its result, once decoded.
    rebuilt: Option<Rebuilt<'a>>,
}

/// The next chunk to finish. On a thread of a pool (a caller's `install`), this
/// thread runs waiting chunks itself until one is done, since the chunks may be
/// queued on it; elsewhere, and once it has nothing left to run, it waits.
fn next_outcome<'a>(finished: &std::sync::mpsc::Receiver<ChunkOutcome<'a>>) -> ChunkOutcome<'a> {
    loop {
        if let Ok(outcome) = finished.try_recv() {
            return outcome;
        }
        if rayon::yield_now() != Some(rayon::Yield::Executed) {
            return finished.recv().expect("a chunk in flight always reports");
        }
    }
}

/// Decodes every chunk of every file on the thread pool and hands them to the
/// writer in order. A chunk starts as soon as the memory budget and the window of
/// chunks in flight allow, so that no thread waits for the slowest chunk of a
/// batch. A delta read by range fetches chunks batch by batch, ahead of decoding.
fn decode_files<'a>(
    delta: &DeltaFile,
    bases: &'a [TensorBase<'a>],
    to_writer: &SyncSender<SinkMessage<'a>>,
    budget: &MemoryBudget,
    spares: &SpareBuffers,
    progress: &dyn Progress,
) -> Result<()> {
    let header = delta.header();
    let window = window();
    // Idle scratch kept for the next chunks; with the spare outputs, at most
    // DECODE_RETAINED_BYTES.
    let mut pool: Vec<DecodeScratch> = Vec::new();
    for (file, tensors) in header.target.files.iter().zip(header.tensors_by_file()) {
        to_writer.send(SinkMessage::Begin(file.name.clone())).map_err(hung_up)?;
        let mut prefix = (file.safetensors_header.len() as u64).to_le_bytes().to_vec();
        prefix.extend_from_slice(file.safetensors_header.as_bytes());
        to_writer.send(SinkMessage::Owned(prefix, 0)).map_err(hung_up)?;
        // The chunks of every tensor of the file, across tensor boundaries: most
        // tensors hold one chunk.
        let mut chunks: Vec<(&TensorEntry, ChunkSpan, &'a TensorBase<'a>)> = Vec::new();
        for (tensor, base) in header.tensors[tensors.clone()].iter().zip(&bases[tensors]) {
            chunks.extend(delta.spans(tensor)?.map(|span| (tensor, span, base)));
        }
        let charges = chunks
            .iter()
            .map(|&(tensor, span, base)| chunk_charge(delta, tensor, span, base))
            .collect::<Result<Vec<_>>>()?;
        let totals: Vec<u64> = charges.iter().map(|c| c.0).collect();
        // The batches in which a delta read by range fetches its chunks.
        let cut = batches(&totals, DECODE_IN_FLIGHT_BYTES);
        let (done, finished) = std::sync::mpsc::channel::<ChunkOutcome<'a>>();
        let mut waiting: std::collections::VecDeque<InFlight<'a>> = std::collections::VecDeque::new();
        let mut written = 0;
        // Takes one finished chunk, then hands the writer every chunk done in order.
        let mut take_one =
            |waiting: &mut std::collections::VecDeque<InFlight<'a>>, pool: &mut Vec<DecodeScratch>| -> Result<()> {
                let (at, outcome, scratch) = next_outcome(&finished);
                let kept: u64 = pool.iter().map(DecodeScratch::retained_bytes).sum();
                if kept + scratch.retained_bytes() <= DECODE_RETAINED_BYTES - SPARE_OUTPUT_BYTES {
                    pool.push(scratch);
                }
                let rebuilt = outcome.unwrap_or_else(|panic| std::panic::resume_unwind(panic))?;
                waiting[at - written].rebuilt = Some(rebuilt);
                while waiting.front().is_some_and(|chunk| chunk.rebuilt.is_some()) {
                    let InFlight { charged, output, rebuilt } = waiting.pop_front().expect("checked above");
                    // Scratch is free again; an output stays counted until written.
                    let message = match rebuilt.expect("checked above") {
                        Rebuilt::Owned(bytes) => {
                            budget.release(charged - output);
                            SinkMessage::Owned(bytes, output)
                        }
                        Rebuilt::Borrowed(bytes) => {
                            budget.release(charged);
                            SinkMessage::Borrowed(bytes)
                        }
                    };
                    to_writer.send(message).map_err(hung_up)?;
                    written += 1;
                }
                Ok(())
            };
        rayon::in_place_scope(|scope| -> Result<()> {
            let mut started = 0;
            for (k, batch) in cut.iter().cloned().enumerate() {
                progress.check_interrupted()?;
                // A delta read by range: this batch's chunks first, the next ones'
                // fetched while this one decodes.
                let now: Vec<u64> = chunks[batch.clone()].iter().map(|c| c.1.index).collect();
                let ahead = delta.chunks_ahead(&cut, k, |i| chunks[i].1.index);
                delta.fetch_batch(&now, &ahead)?;
                for i in batch {
                    let mut scratch = pool.pop().unwrap_or_default();
                    let out = if charges[i].1 > 0 { spares.take() } else { Vec::new() };
                    // Reused buffers may hold more than the chunk needs: count them too.
                    let output = charges[i].1 + out.capacity() as u64;
                    let charged = totals[i] + scratch.retained_bytes() + out.capacity() as u64;
                    while waiting.len() >= window || !budget.try_acquire(charged) {
                        if waiting.is_empty() {
                            // Only written outputs free memory now.
                            if !budget.acquire(charged) {
                                return Err(hung_up(()));
                            }
                            break;
                        }
                        take_one(&mut waiting, &mut pool)?;
                    }
                    waiting.push_back(InFlight { charged, output, rebuilt: None });
                    let (tensor, span, base) = chunks[i];
                    let done = done.clone();
                    scope.spawn(move |_| {
                        // A panic is reported too, so that nothing waits for a chunk
                        // that will not come; it is resumed on the waiting thread.
                        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            rebuild_chunk(delta, tensor, span, base, out, &mut scratch)
                        }));
                        // The receiver outlives the scope, so the send cannot fail.
                        let _ = done.send((started, outcome, scratch));
                    });
                    started += 1;
                }
            }
            while !waiting.is_empty() {
                take_one(&mut waiting, &mut pool)?;
            }
            Ok(())
        })?;
        to_writer.send(SinkMessage::End).map_err(hung_up)?;
    }
    Ok(())
}

/// Writes into a single file or a directory of shards.
struct FileSink<'a> {
    out: &'a Path,
    /// Whether the single output file may replace one at `out`.
    force: bool,
    /// Whether each file is synced before its rename.
    sync: bool,
    dir: Option<PendingDir>,
    current: Option<PendingFile>,
}

impl TargetSink for FileSink<'_> {
    fn begin_file(&mut self, name: &str) -> Result<()> {
        let file = match &self.dir {
            Some(dir) => PendingFile::create(&dir.path_of(name))?,
            None => PendingFile::create_with(self.out, self.force)?,
        };
        self.current = Some(file.synced(self.sync));
        Ok(())
    }

    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.current.as_mut().expect("a file is open").write_all(bytes)
    }

    fn end_file(&mut self) -> Result<()> {
        let file = self.current.take().expect("a file is open");
        if self.dir.is_some() {
            file.commit()
        } else {
            // A single output is renamed into place only after everything succeeded.
            self.current = Some(file);
            Ok(())
        }
    }
}

/// What `apply` produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApplySummary {
    /// Bytes written.
    pub target_bytes: u64,
    /// Files written.
    pub files: usize,
}

/// How [`apply`] writes its output.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApplyOptions {
    /// Replace an existing output: a file replaces only a file, and a directory only
    /// a directory that holds nothing but a checkpoint.
    pub force: bool,
    /// Sync every output file to storage before renaming it into place. Off by
    /// default: a rebuilt target can be rebuilt again from its delta, and on small
    /// checkpoints the sync costs as much as the decoding. (`encode` always syncs: a
    /// delta may become the only copy of its target.)
    pub sync: bool,
}

/// Rebuilds the target of `delta` into `out`: a file for a single-file target, a
/// directory for a sharded one. Nothing appears at `out` unless every digest matched;
/// the rename into place is atomic whether or not the output is synced.
///
/// # Errors
/// `E_OUTPUT_EXISTS` without `force` (also when something appears at `out` during
/// the run), `E_INVALID_ARGUMENT` when `out` is, holds or lies inside an input, base
/// errors before anything is written, any decoding error, and `E_INTERRUPTED` when
/// `progress` asks to stop.
pub fn apply(
    delta: &DeltaFile,
    base: Option<&Checkpoint>,
    out: &Path,
    options: ApplyOptions,
    progress: &dyn Progress,
) -> Result<ApplySummary> {
    apply_chain(std::slice::from_ref(delta), base, out, options, progress)
}

/// Rebuilds the target of the last delta of `chain` into `out`, where the first
/// delta is applied to `base` and each later one to the target of the one before,
/// as [`apply`] would one by one, but without writing or rereading the targets in
/// between: each chunk is rebuilt through the chain in memory, so memory stays
/// bounded as in [`apply`] and the time is about one `apply` plus the decoding of
/// the earlier deltas' chunks. Each link is checked before anything is written:
/// the later delta's base names, dtypes, shapes and digests against the earlier
/// delta's target as its header records them.
///
/// # Errors
/// As [`apply`]; for a chain whose deltas do not follow one another, the base
/// errors of [`apply`] naming the earlier delta's file, and `E_BASE_MISMATCH` for
/// deltas that cut a tensor into chunks of different sizes (see
/// [`chain_cut_alike`]); `E_INVALID_ARGUMENT` for an empty chain.
pub fn apply_chain(
    chain: &[DeltaFile],
    base: Option<&Checkpoint>,
    out: &Path,
    options: ApplyOptions,
    progress: &dyn Progress,
) -> Result<ApplySummary> {
    let Some(delta) = chain.last() else {
        return Err(Error::new(ErrorCode::InvalidArgument, "no delta to apply"));
    };
    let ApplyOptions { force, sync } = options;
    let inputs: Vec<&Path> = chain.iter().map(DeltaFile::path).chain(base.map(|b| b.root.as_path())).collect();
    check_not_an_input(out, &inputs)?;
    let sharded = delta.header().target.kind == LayoutKind::Sharded;
    check_output(out, force, if sharded { OutputKind::Directory } else { OutputKind::File })?;
    let dir = if sharded { Some(PendingDir::create_with(out, force)?) } else { None };
    let mut sink = FileSink { out, force, sync, dir, current: None };
    rebuild(chain, base, &mut sink, progress).map_err(|e| e.in_file(delta.path()))?;
    let header = delta.header();
    if let Some(dir) = sink.dir.take() {
        let index = header.target.index_json.as_deref().unwrap_or_default();
        let mut file = PendingFile::create(&dir.path_of(INDEX_FILE))?.synced(sync);
        file.write_all(index.as_bytes())?;
        file.commit()?;
        dir.commit()?;
    } else if let Some(file) = sink.current.take() {
        file.commit()?;
    }
    let target_bytes = header.target.files.iter().map(|f| 8 + f.safetensors_header.len() as u64).sum::<u64>()
        + header.tensors.iter().map(|t| t.byte_len().unwrap_or(0)).sum::<u64>();
    Ok(ApplySummary { target_bytes, files: header.target.files.len() })
}

/// Compares the rebuilt target with a reference checkpoint, or discards it.
struct CompareSink<'a> {
    reference: Option<&'a Checkpoint>,
    file: Option<&'a [u8]>,
    name: String,
    at: usize,
}

impl TargetSink for CompareSink<'_> {
    fn begin_file(&mut self, name: &str) -> Result<()> {
        self.name = name.to_owned();
        self.at = 0;
        if let Some(reference) = self.reference {
            let file = match reference.kind {
                LayoutKind::File => reference.files.first(),
                LayoutKind::Sharded => reference.files.iter().find(|f| f.name == name),
            };
            let file =
                file.ok_or_else(|| Error::new(ErrorCode::TargetMismatch, format!("the target has no file {name}")))?;
            self.file = Some(file.bytes());
        }
        Ok(())
    }

    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        if let Some(file) = self.file {
            let end = self.at + bytes.len();
            if file.get(self.at..end) != Some(bytes) {
                return Err(Error::new(
                    ErrorCode::TargetMismatch,
                    format!("{} differs within bytes {}..{end}", self.name, self.at),
                ));
            }
        }
        self.at += bytes.len();
        Ok(())
    }

    fn end_file(&mut self) -> Result<()> {
        if let Some(file) = self.file {
            if file.len() != self.at {
                return Err(Error::new(
                    ErrorCode::TargetMismatch,
                    format!("{} has {} bytes, the rebuilt file {}", self.name, file.len(), self.at),
                ));
            }
        }
        Ok(())
    }
}

/// Checks every checksum and digest of `delta` by rebuilding its target in memory,
/// chunk by chunk; with `target`, also compares the result with it byte for byte.
///
/// # Errors
/// The first failure found, with its code.
pub fn verify(
    delta: &DeltaFile,
    base: Option<&Checkpoint>,
    target: Option<&Checkpoint>,
    progress: &dyn Progress,
) -> Result<()> {
    if let Some(target) = target {
        let expected = delta.header().target.files.len();
        if target.files.len() != expected || target.kind != delta.header().target.kind {
            return Err(Error::new(
                ErrorCode::TargetMismatch,
                format!("the target has {} files, the delta {expected}", target.files.len()),
            ));
        }
        if target.index_json != delta.header().target.index_json {
            return Err(Error::new(ErrorCode::TargetMismatch, "the index file differs"));
        }
    }
    let mut sink = CompareSink { reference: target, file: None, name: String::new(), at: 0 };
    rebuild(std::slice::from_ref(delta), base, &mut sink, progress).map_err(|e| e.in_file(delta.path()))
}
