//! `inspect`: what a delta holds and what each tensor costs. Before it reports,
//! every chunk is checked as far as it can be without a base (spec §11.2 D1, D3,
//! D4, D6), so that the counts it shows are ones the payload was checked against.

use rayon::prelude::*;
use serde::Serialize;

use crate::container::chunk_map::{Codec, Encoding};
use crate::delta::DecodeScratch;
use crate::error::Result;
use crate::limits::DECODE_IN_FLIGHT_BYTES;
use crate::reader::{ChunkSpan, DeltaFile};

/// What `inspect` checked before it reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Checked {
    /// The preamble, header and chunk map (spec §11.1).
    pub structure: bool,
    /// Every chunk's stored bytes against its checksum (spec §11.2 D1).
    pub chunk_checksums: bool,
    /// Every chunk's streams and positions, and that its values change exactly the
    /// words it declares (D3, D4, D6): the changed counts shown are checked.
    pub chunk_payloads: bool,
    /// The rebuilt bytes against their digests (D7, B3). Never by `inspect`, which
    /// has no base; `verify` is what proves the rebuilt bytes.
    pub rebuilt_digests: bool,
}

/// What [`inspect`] checks.
pub const CHECKED: Checked =
    Checked { structure: true, chunk_checksums: true, chunk_payloads: true, rebuilt_digests: false };

/// What [`inspect_structure`] checks.
pub const CHECKED_STRUCTURE: Checked =
    Checked { structure: true, chunk_checksums: false, chunk_payloads: false, rebuilt_digests: false };

/// Chunk counts by encoding.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct EncodingMix {
    /// Unchanged chunks.
    pub unchanged: u64,
    /// Sparse chunks.
    pub sparse: u64,
    /// Dense chunks.
    pub dense: u64,
    /// Raw chunks.
    pub raw: u64,
}

impl EncodingMix {
    fn add(&mut self, other: &Self) {
        self.unchanged += other.unchanged;
        self.sparse += other.sparse;
        self.dense += other.dense;
        self.raw += other.raw;
    }
}

/// The cost of one tensor, or of all of them.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct TensorReport {
    /// Tensor name (`"total"` for the totals).
    pub name: String,
    /// Dtype (empty for the totals).
    pub dtype: String,
    /// Shape (empty for the totals).
    pub shape: Vec<u64>,
    /// Whether it is stored against a base.
    pub delta: bool,
    /// Chunks by encoding.
    pub chunks: EncodingMix,
    /// Bytes of the target tensor.
    pub target_bytes: u64,
    /// Bytes stored for it.
    pub stored_bytes: u64,
    /// Of those, bytes of position streams.
    pub position_bytes: u64,
    /// Of those, bytes of zstd streams: the only ones a GPU loader leaves to the
    /// CPU (lane rANS and stored streams decode on the GPU).
    pub cpu_only_bytes: u64,
    /// Stored bytes over target bytes.
    pub ratio: f64,
    /// Words whose bits changed.
    pub changed_words: u64,
    /// Words in the tensor.
    pub words: u64,
    /// Changed words over words.
    pub changed_fraction: f64,
}

/// A whole delta's report. It borrows the writer's name from the delta: a hostile
/// file may make it as long as the header, and it is not copied (spec §5.4).
#[derive(Debug, Clone, Serialize)]
pub struct Report<'a> {
    /// What was checked before reporting.
    pub checked: Checked,
    /// Format version, `major.minor`.
    pub format_version: String,
    /// The program that wrote the file.
    pub writer: &'a str,
    /// Whether a base is needed.
    pub needs_base: bool,
    /// Number of target files.
    pub target_files: usize,
    /// Bytes of the delta file.
    pub file_bytes: u64,
    /// Per tensor.
    pub tensors: Vec<TensorReport>,
    /// Sums over all tensors.
    pub total: TensorReport,
}

#[allow(clippy::cast_precision_loss)] // ratios for display
fn ratio(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

/// Checks every chunk of `delta` as far as it can be without a base (spec §11.2
/// D1, D3, D4, D6), in parallel, in batches whose scratch memory stays within
/// [`DECODE_IN_FLIGHT_BYTES`].
fn check_payloads(delta: &DeltaFile) -> Result<()> {
    let mut chunks = Vec::new();
    for tensor in &delta.header().tensors {
        for span in delta.spans(tensor)? {
            chunks.push((tensor, span));
        }
    }
    let costs = chunks
        .iter()
        .map(|&(tensor, span)| delta.decode_cost(tensor, span).map(|c| c.scratch))
        .collect::<Result<Vec<_>>>()?;
    let cut = super::batches(&costs, DECODE_IN_FLIGHT_BYTES);
    for (k, batch) in cut.iter().enumerate() {
        let now: Vec<u64> = chunks[batch.clone()].iter().map(|c| c.1.index).collect();
        let ahead = delta.chunks_ahead(&cut, k, |i| chunks[i].1.index);
        delta.with_chunks_fetched(&now, &ahead, || {
            chunks[batch.clone()]
                .par_iter()
                .try_for_each_init(DecodeScratch::default, |scratch, &(tensor, span): &(_, ChunkSpan)| {
                    delta.check_chunk_payload(tensor, span, scratch)
                })
        })??;
    }
    Ok(())
}

/// Builds the report, after checking every chunk as far as it can be without a
/// base (spec §11.2 D1, D3, D4, D6).
///
/// # Errors
/// The first failure found (`E_CHUNK_CHECKSUM`, `E_ZSTD_PROFILE`, ...), naming the
/// file, tensor and chunk.
pub fn inspect(delta: &DeltaFile) -> Result<Report<'_>> {
    check_payloads(delta)?;
    report(delta, CHECKED)
}

/// Builds the report from the structure alone (preamble, header, chunk map, all
/// checked when the delta was opened), reading no chunk: for a delta in an object
/// store, it fetches a few requests' worth, whatever the delta's size. The counts
/// it shows are the chunk map's, not checked against the chunks' payloads.
///
/// # Errors
/// `E_UNKNOWN_DTYPE` (excluded once the file is open).
pub fn inspect_structure(delta: &DeltaFile) -> Result<Report<'_>> {
    report(delta, CHECKED_STRUCTURE)
}

fn report(delta: &DeltaFile, checked: Checked) -> Result<Report<'_>> {
    let mut tensors = Vec::new();
    let mut total = TensorReport { name: "total".into(), ..TensorReport::default() };
    for tensor in &delta.header().tensors {
        let mut report = TensorReport {
            name: tensor.name.clone(),
            dtype: tensor.dtype_name.clone(),
            shape: tensor.shape.clone(),
            delta: tensor.needs_base(),
            target_bytes: tensor.byte_len()?,
            words: tensor.word_count()?,
            ..TensorReport::default()
        };
        for span in delta.spans(tensor)? {
            let chunk = delta.chunk(span.index);
            match chunk.encoding {
                Encoding::Unchanged => report.chunks.unchanged += 1,
                Encoding::Sparse => report.chunks.sparse += 1,
                Encoding::Dense => report.chunks.dense += 1,
                Encoding::Raw => report.chunks.raw += 1,
            }
            report.stored_bytes += u64::from(chunk.stored_len);
            report.changed_words += u64::from(chunk.changed_count);
            let position_streams = match chunk.position_coding {
                crate::container::chunk_map::PositionCoding::None => 0,
                crate::container::chunk_map::PositionCoding::Bitmap => 1,
                crate::container::chunk_map::PositionCoding::Gaps => usize::from(chunk.gap_width),
                crate::container::chunk_map::PositionCoding::SplitByReference => 1 + usize::from(chunk.gap_width),
            };
            let streams = delta.streams(span.index);
            report.position_bytes += streams[..position_streams].iter().map(|s| u64::from(s.stored_len)).sum::<u64>();
            report.cpu_only_bytes +=
                streams.iter().filter(|s| s.codec == Codec::Zstd).map(|s| u64::from(s.stored_len)).sum::<u64>();
        }
        report.ratio = ratio(report.stored_bytes, report.target_bytes);
        report.changed_fraction = ratio(report.changed_words, report.words);
        total.chunks.add(&report.chunks);
        total.target_bytes += report.target_bytes;
        total.stored_bytes += report.stored_bytes;
        total.position_bytes += report.position_bytes;
        total.cpu_only_bytes += report.cpu_only_bytes;
        total.changed_words += report.changed_words;
        total.words += report.words;
        total.delta |= report.delta;
        tensors.push(report);
    }
    total.ratio = ratio(delta.file_len(), total.target_bytes);
    total.changed_fraction = ratio(total.changed_words, total.words);
    let preamble = delta.preamble();
    Ok(Report {
        checked,
        format_version: format!("{}.{}", crate::container::preamble::MAJOR_VERSION, preamble.minor_version),
        writer: &delta.header().writer,
        needs_base: delta.header().needs_base(),
        target_files: delta.header().target.files.len(),
        file_bytes: delta.file_len(),
        tensors,
        total,
    })
}
