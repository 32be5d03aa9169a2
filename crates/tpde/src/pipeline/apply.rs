//! `apply` and `verify`: rebuild the target from a delta (and its base), byte for
//! byte, into files or against a reference checkpoint.

use std::path::Path;

use std::sync::mpsc::{channel, sync_channel, Receiver, SyncSender};

use rayon::prelude::*;

use super::{window, Progress};
use crate::checkpoint::Checkpoint;
use crate::checkpoint::INDEX_FILE;
use crate::container::header::LayoutKind;
use crate::digest::{tensor_digest, to_hex};
use crate::error::{Error, ErrorCode, Result};
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
        if location.dtype != tensor.dtype || location.shape != base_ref.shape {
            return Err(Error::new(
                ErrorCode::BaseMismatch,
                format!(
                    "the base tensor is {} {:?} but the delta expects {} {:?}",
                    location.dtype, location.shape, tensor.dtype, base_ref.shape
                ),
            )
            .in_file(&file.path)
            .in_tensor(&tensor.name));
        }
        to_hash += location.range.len() as u64;
        resolved.push(Some(file.tensor_bytes(location)));
    }
    progress.phase("checking base", to_hash);
    for (tensor, bytes) in tensors.iter().zip(&resolved) {
        let (Some(base_ref), Some(bytes), Some(base)) = (&tensor.base, bytes, base) else { continue };
        let chunk_bytes = usize::try_from(tensor.chunk_words).expect("bounded") * tensor.word_bytes()?;
        if to_hex(&tensor_digest(bytes, chunk_bytes)) != base_ref.digest {
            return Err(Error::new(
                ErrorCode::BaseDigest,
                "the base tensor's content differs from the one the delta was made against",
            )
            .in_file(base.tensor(&tensor.name).map_or(&base.root, |(file, _)| &file.path))
            .in_tensor(&tensor.name));
        }
        progress.advance(bytes.len() as u64);
    }
    Ok(resolved)
}

/// What the decoding threads hand to the thread that writes.
enum SinkMessage {
    Begin(String),
    Bytes(Vec<u8>),
    End,
}

/// Rebuilds every file of the target into `sink`. Chunks are decoded in parallel
/// while a separate thread writes the previous ones, so that writing overlaps
/// decoding; buffers travel back to be reused.
fn rebuild(
    delta: &DeltaFile,
    base: Option<&Checkpoint>,
    sink: &mut dyn TargetSink,
    progress: &dyn Progress,
) -> Result<()> {
    let bases = resolve_base(delta, base, progress)?;
    let header = delta.header();
    let total: u64 = header.tensors.iter().map(|t| t.byte_len().unwrap_or(0)).sum();
    progress.phase("rebuilding", total);
    let (to_writer, from_decoders) = sync_channel::<SinkMessage>(window());
    let (recycle, recycled) = channel::<Vec<u8>>();
    std::thread::scope(|scope| {
        let writer = scope.spawn(move || -> Result<()> {
            for message in from_decoders {
                match message {
                    SinkMessage::Begin(name) => sink.begin_file(&name)?,
                    SinkMessage::Bytes(bytes) => {
                        sink.write(&bytes)?;
                        progress.advance(bytes.len() as u64);
                        let _ = recycle.send(bytes);
                    }
                    SinkMessage::End => sink.end_file()?,
                }
            }
            Ok(())
        });
        let decoded = decode_files(delta, &bases, &to_writer, &recycled);
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

fn decode_files(
    delta: &DeltaFile,
    bases: &[Option<&[u8]>],
    to_writer: &SyncSender<SinkMessage>,
    recycled: &Receiver<Vec<u8>>,
) -> Result<()> {
    let header = delta.header();
    for (f, file) in header.target.files.iter().enumerate() {
        to_writer.send(SinkMessage::Begin(file.name.clone())).map_err(hung_up)?;
        let mut prefix = (file.safetensors_header.len() as u64).to_le_bytes().to_vec();
        prefix.extend_from_slice(file.safetensors_header.as_bytes());
        to_writer.send(SinkMessage::Bytes(prefix)).map_err(hung_up)?;
        for (tensor, base_bytes) in header.tensors.iter().zip(bases).filter(|(t, _)| t.file as usize == f) {
            let spans: Vec<ChunkSpan> = delta.spans(tensor)?.collect();
            for batch in spans.chunks(window()) {
                let mut buffers: Vec<Vec<u8>> = batch.iter().map(|_| recycled.try_recv().unwrap_or_default()).collect();
                batch
                    .par_iter()
                    .zip(buffers.par_iter_mut())
                    .try_for_each(|(&span, out)| delta.decode_chunk(tensor, span, *base_bytes, out))?;
                for out in buffers {
                    to_writer.send(SinkMessage::Bytes(out)).map_err(hung_up)?;
                }
            }
        }
        to_writer.send(SinkMessage::End).map_err(hung_up)?;
    }
    Ok(())
}

/// Writes into a single file or a directory of shards.
struct FileSink<'a> {
    out: &'a Path,
    /// Whether the single output file may replace one at `out`.
    force: bool,
    dir: Option<PendingDir>,
    current: Option<PendingFile>,
}

impl TargetSink for FileSink<'_> {
    fn begin_file(&mut self, name: &str) -> Result<()> {
        self.current = Some(match &self.dir {
            Some(dir) => PendingFile::create(&dir.path_of(name))?,
            None => PendingFile::create_with(self.out, self.force)?,
        });
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

/// Rebuilds the target of `delta` into `out`: a file for a single-file target, a
/// directory for a sharded one. Nothing appears at `out` unless every digest matched.
/// With `force`, a file replaces only a file, and a directory only a directory that
/// holds nothing but a checkpoint (see [`crate::output`]).
///
/// # Errors
/// `E_OUTPUT_EXISTS` without `force` (also when something appears at `out` during
/// the run), `E_INVALID_ARGUMENT` when `out` is, holds or lies inside an input, base
/// errors before anything is written, and any decoding error.
pub fn apply(
    delta: &DeltaFile,
    base: Option<&Checkpoint>,
    out: &Path,
    force: bool,
    progress: &dyn Progress,
) -> Result<ApplySummary> {
    let inputs: Vec<&Path> = std::iter::once(delta.path()).chain(base.map(|b| b.root.as_path())).collect();
    check_not_an_input(out, &inputs)?;
    let sharded = delta.header().target.kind == LayoutKind::Sharded;
    check_output(out, force, if sharded { OutputKind::Directory } else { OutputKind::File })?;
    let dir = if sharded { Some(PendingDir::create_with(out, force)?) } else { None };
    let mut sink = FileSink { out, force, dir, current: None };
    rebuild(delta, base, &mut sink, progress).map_err(|e| e.in_file(delta.path()))?;
    let header = delta.header();
    if let Some(dir) = sink.dir.take() {
        let index = header.target.index_json.as_deref().unwrap_or_default();
        let mut file = PendingFile::create(&dir.path_of(INDEX_FILE))?;
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
    rebuild(delta, base, &mut sink, progress).map_err(|e| e.in_file(delta.path()))
}
