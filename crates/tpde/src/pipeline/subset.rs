//! Partial apply: some tensors of a target, rebuilt into one safetensors file,
//! without decoding, reading or hashing the others (a rank of a sharded job, or
//! one layer out of a large model).

use std::path::Path;

use serde_json::{Map, Value};

use crate::checkpoint::Checkpoint;
use crate::container::header::{LayoutKind, TensorEntry};
use crate::model::DeltaModel;
use crate::output::{check_not_an_input, check_output, OutputKind, PendingFile};
use crate::pipeline::apply::{ApplyOptions, ApplySummary};
use crate::pipeline::Progress;
use crate::reader::DeltaFile;
use crate::{Error, ErrorCode, Result};

/// Most bytes of a tensor decoded at once: whole chunks up to this many (or one
/// chunk, if larger), so that memory stays flat whatever the tensor's size.
const PIECE_BYTES: u64 = 64 << 20;

/// Rebuilds the tensors of `delta`'s target whose names `select` accepts into
/// one safetensors file at `out`, in the target's order. Every rebuilt chunk is
/// checked against its digest, and the base tensor of each selected tensor
/// against the digest the delta records, before its bytes are used; tensors not
/// selected are neither decoded nor read. The file's `__metadata__` is the
/// target's, for a single-file target; selecting every tensor of a single-file
/// target gives the target itself, byte for byte. Nothing appears at `out`
/// unless every check passed.
///
/// # Errors
/// `E_INVALID_ARGUMENT` when no tensor is selected, or `out` is, holds or lies
/// inside an input; `E_OUTPUT_EXISTS` without `force`; the base errors of
/// [`DeltaModel::new`] and [`DeltaModel::decode_into`]; `E_REFERENCE_REQUIRED`
/// for a delta whose positions need a reference delta; any decoding error; and
/// `E_INTERRUPTED` when `progress` asks to stop.
pub fn apply_tensors(
    delta: DeltaFile,
    base: Option<Checkpoint>,
    out: &Path,
    select: &dyn Fn(&str) -> bool,
    options: ApplyOptions,
    progress: &dyn Progress,
) -> Result<ApplySummary> {
    let delta_path = delta.path().to_path_buf();
    let inputs: Vec<&Path> =
        std::iter::once(delta_path.as_path()).chain(base.as_ref().map(|b| b.root.as_path())).collect();
    check_not_an_input(out, &inputs)?;
    check_output(out, options.force, OutputKind::File)?;
    let selected: Vec<TensorEntry> = delta.header().tensors.iter().filter(|t| select(&t.name)).cloned().collect();
    if selected.is_empty() {
        return Err(Error::new(
            ErrorCode::InvalidArgument,
            "no tensor of the target matches; `tpde inspect` lists the tensor names",
        )
        .in_file(&delta_path));
    }
    if selected.len() == delta.header().tensors.len() && delta.header().target.kind == LayoutKind::File {
        // Everything of a single file: the target itself, byte for byte.
        return crate::pipeline::apply::apply(&delta, base.as_ref(), out, options, progress);
    }
    delta.require_position_reference()?;
    let metadata = match delta.header().target.kind {
        LayoutKind::File => target_metadata(&delta)?,
        LayoutKind::Sharded => None,
    };
    let header = subset_header(&selected, metadata)?;
    let model = DeltaModel::new(delta, base.map(|b| Box::new(b) as _))?;
    // The tensors are rebuilt whole, a piece at a time: their bases are checked
    // before anything is written, as `apply` checks them.
    for tensor in &selected {
        model.check_base(tensor)?;
    }
    let total: u64 = selected.iter().map(|t| t.byte_len().unwrap_or(0)).sum();
    progress.phase("rebuilding", total);
    let mut file = PendingFile::create_with(out, options.force)?.synced(options.sync);
    file.write_all(&(header.len() as u64).to_le_bytes())?;
    file.write_all(header.as_bytes())?;
    let mut piece = Vec::new();
    for tensor in &selected {
        let chunk_bytes = tensor.chunk_words * tensor.word_width()?.bytes_u64();
        let tensor_bytes = tensor.byte_len()?;
        let chunks = usize::try_from(tensor.chunk_count).expect("bounded by MAX_CHUNKS");
        let per_piece = usize::try_from((PIECE_BYTES / chunk_bytes.max(1)).max(1)).unwrap_or(usize::MAX);
        let mut first = 0;
        // A tensor of no chunks (no words) still goes through once, for its checks.
        while first < chunks || (chunks == 0 && first == 0) {
            let last = (first + per_piece).min(chunks);
            let end = (last as u64 * chunk_bytes).min(tensor_bytes);
            let len = usize::try_from(end - first as u64 * chunk_bytes).expect("at most PIECE_BYTES or one chunk");
            piece.clear();
            crate::limits::try_reserve(&mut piece, len)?;
            piece.resize(len, 0);
            model.decode_chunks_into(tensor, first..last, &mut piece, progress)?;
            file.write_all(&piece)?;
            first = last.max(first + 1);
        }
    }
    file.commit()?;
    Ok(ApplySummary { target_bytes: 8 + header.len() as u64 + total, files: 1 })
}

/// The `__metadata__` of a single-file target's safetensors header, if any.
fn target_metadata(delta: &DeltaFile) -> Result<Option<Map<String, Value>>> {
    let Some(file) = delta.header().target.files.first() else { return Ok(None) };
    let header: Map<String, Value> = serde_json::from_str(&file.safetensors_header).map_err(|e| {
        Error::new(ErrorCode::HeaderInvalid, format!("the target's safetensors header: {e}")).in_file(delta.path())
    })?;
    Ok(header.get("__metadata__").and_then(Value::as_object).cloned())
}

/// The safetensors header of `tensors`, back to back in this order, with
/// `metadata` first; padded with spaces to a multiple of 8 bytes, as
/// safetensors pads it.
fn subset_header(tensors: &[TensorEntry], metadata: Option<Map<String, Value>>) -> Result<String> {
    let mut header = Map::new();
    if let Some(metadata) = metadata {
        header.insert("__metadata__".into(), Value::Object(metadata));
    }
    let mut offset = 0u64;
    for tensor in tensors {
        let len = tensor.byte_len()?;
        let entry = serde_json::json!({
            "dtype": tensor.dtype_name,
            "shape": tensor.shape,
            "data_offsets": [offset, offset + len],
        });
        header.insert(tensor.name.clone(), entry);
        offset += len;
    }
    let mut text = serde_json::to_string(&header)
        .map_err(|e| Error::new(ErrorCode::InvalidArgument, format!("cannot write the header: {e}")))?;
    text.extend(std::iter::repeat_n(' ', text.len().next_multiple_of(8) - text.len()));
    Ok(text)
}
