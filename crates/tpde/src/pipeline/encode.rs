//! `encode`: a target checkpoint, optionally against a base, into one delta file.

use std::path::Path;

use rayon::prelude::*;

use super::{window, Progress};
use crate::checkpoint::{Checkpoint, TensorLocation};
use crate::container::header::{BaseTensor, Header, TargetFile, TargetLayout, TensorEntry};
use crate::delta::{encode_chunk, EncodeSettings, EncodedChunk};
use crate::digest::{tensor_digest, to_hex, tree_digest};
use crate::dtype;
use crate::error::{Error, ErrorCode, Result};
use crate::limits::MAX_CHUNK_WORDS;
use crate::output::{check_not_an_input, check_output, OutputKind};
use crate::writer::DeltaWriter;

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
fn counterpart<'a>(base: Option<&'a Checkpoint>, tensor: &TensorLocation) -> Option<(&'a [u8], &'a TensorLocation)> {
    let (file, location) = base?.tensor(&tensor.name)?;
    let rows_line_up = location.dtype == tensor.dtype
        && location.shape.len() == tensor.shape.len()
        && location.shape.get(1..) == tensor.shape.get(1..);
    rows_line_up.then(|| (file.tensor_bytes(location), location))
}

/// Encodes `target` (against `base`, when given) into the delta file `out`, which
/// appears only once complete, replacing a file there.
///
/// # Errors
/// Input errors of either checkpoint, `E_INVALID_ARGUMENT` for a bad chunk size,
/// `E_IO` on write failure.
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
    let inputs: Vec<&Path> = base.iter().chain([&target]).map(|c| c.root.as_path()).collect();
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
    progress.phase("encoding", target.total_bytes());
    let mut writer = DeltaWriter::create_with(out, force)?;
    let mut tensors = Vec::new();
    let mut summary =
        EncodeSummary { target_bytes: target.total_bytes(), delta_bytes: 0, delta_tensors: 0, standalone_tensors: 0 };
    for (file_index, file) in target.files.iter().enumerate() {
        for location in &file.tensors {
            let bytes = file.tensor_bytes(location);
            let word_bytes =
                dtype::word_bytes(&location.dtype).map_err(|e| e.in_file(&file.path).in_tensor(&location.name))?;
            let chunk_bytes = usize::try_from(options.chunk_words).expect("bounded") * word_bytes;
            let base_match = counterpart(base, location);
            let first_chunk = writer.chunk_count();
            let leading_sign = dtype::has_leading_sign(&location.dtype);
            let mut leaves = Vec::new();
            let chunk_starts: Vec<usize> = (0..bytes.len()).step_by(chunk_bytes).collect();
            for batch in chunk_starts.chunks(window()) {
                let encoded = batch
                    .par_iter()
                    .map(|&start| {
                        let end = (start + chunk_bytes).min(bytes.len());
                        let base_bytes = base_match.map(|(b, _)| &b[start.min(b.len())..end.min(b.len())]);
                        encode_chunk(&bytes[start..end], base_bytes, word_bytes, leading_sign, options.settings)
                    })
                    .collect::<Result<Vec<EncodedChunk>>>()?;
                for chunk in encoded {
                    leaves.push(chunk.record.digest);
                    writer.push_chunk(chunk)?;
                }
                let done: usize = batch.iter().map(|&s| (bytes.len() - s).min(chunk_bytes)).sum();
                progress.advance(done as u64);
            }
            let base_ref = base_match.map(|(base_bytes, base_location)| BaseTensor {
                shape: base_location.shape.clone(),
                digest: to_hex(&tensor_digest(base_bytes, chunk_bytes)),
            });
            if base_ref.is_some() {
                summary.delta_tensors += 1;
            } else {
                summary.standalone_tensors += 1;
            }
            tensors.push(TensorEntry {
                name: location.name.clone(),
                dtype: location.dtype.clone(),
                shape: location.shape.clone(),
                file: u32::try_from(file_index).expect("bounded by MAX_FILES"),
                chunk_words: options.chunk_words,
                first_chunk,
                chunk_count: writer.chunk_count() - first_chunk,
                digest: to_hex(&tree_digest(&leaves)),
                base: base_ref,
            });
        }
    }
    let header = Header {
        writer: format!("tpde {}", env!("CARGO_PKG_VERSION")),
        target: TargetLayout {
            kind: target.kind,
            files: target
                .files
                .iter()
                .map(|f| TargetFile { name: f.name.clone(), safetensors_header: f.header_text.clone() })
                .collect(),
            index_json: target.index_json.clone(),
        },
        tensors,
        extensions: std::collections::BTreeMap::new(),
    };
    writer.finish(&header)?;
    summary.delta_bytes = std::fs::metadata(out).map_err(|e| Error::io(out, "cannot stat the delta", e))?.len();
    Ok(summary)
}
