//! Delta semantics of one chunk (spec §8): how the writer chooses an encoding by
//! measured size, and how a reader rebuilds the target words from the base words.

use std::borrow::Cow;

use crate::changed::changed_words;
use crate::codec::positions;
use crate::codec::rans::{self, ContextKind, Contexts, Histogram};
use crate::codec::values::{self, with_word, Word};
use crate::codec::zstd_stream::{self, Effort};
use crate::container::chunk_map::{
    ChunkRecord, Codec, Encoding, PositionCoding, StreamRecord, ValueLayout, ValueOp, ValueOrder,
};
use crate::digest::{checksum64, leaf_digest};
use crate::dtype::WordWidth;
use crate::error::{fail, ErrorCode, Result};
use crate::limits::try_reserve;

/// Density below which a chunk is always sparse, and above which always dense; in
/// between, both sizes are predicted from samples, and both encodings built only
/// when the prediction is close (spec §15.9).
const ALWAYS_SPARSE_BELOW: f64 = 0.02;
const ALWAYS_DENSE_ABOVE: f64 = 0.5;
/// Values sampled to choose a value op and layout.
const SAMPLE_VALUES: usize = 8192;

/// Settings that change the bytes a writer produces.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EncodeSettings {
    /// Effort, 1 to 22. Level 1 tries zstd's literal coder against lane rANS; a
    /// higher level also tries zstd at that level; from level 10 on, the writer
    /// measures alternative encodings instead of predicting them.
    pub level: i32,
    /// A stream is stored compressed only when compression saves at least this
    /// fraction of it (and, in format 1.0, values are grouped by base key only when
    /// that is predicted to save as much). Above zero, decoding becomes mostly
    /// copying.
    pub min_zstd_gain: f64,
    /// Whether streams may use the lane rANS codec (spec §8.7), which a GPU decodes.
    /// Without it the file is a format 1.0 file that older readers read.
    pub rans: bool,
    /// Whether streams may use zstd (codec 1). Without it every stream is lane
    /// rANS, constant or stored, so that a GPU loader decodes the whole delta
    /// itself and the CPU decodes nothing; the delta grows where zstd would have
    /// won, on repetitive planes and on small planes, whose lane rANS tables
    /// cost more than zstd's (and, without [`EncodeSettings::constant`], on
    /// constant planes: a tile's 128 bytes of states instead of about 20).
    pub zstd: bool,
    /// Whether streams may use the constant codec (codec 3, spec §8.8): a stream of
    /// one byte repeated, stored as that byte. Without it the file needs no reader
    /// newer than format 1.1 (1.0 without lane rANS either).
    pub constant: bool,
    /// Whether lane rANS streams pack their tables (codec 4, spec §8.9), which makes
    /// them smaller; without it they are codec 2 and the file needs no reader newer
    /// than format 1.3.
    pub packed_tables: bool,
    /// Where lane rANS is allowed, the bytes by which zstd must beat the best coding
    /// that a GPU decodes (lane rANS, constant or stored) to be kept, besides
    /// beating it by 2%. A single zstd stream sends a GPU load through the CPU,
    /// which cost a load on an H200 0.5–1 ms (the transfer time of 25 MB or more)
    /// whatever the stream's size; 0 weighs bytes alone, as format 1.3's writer
    /// did.
    pub zstd_min_saving: usize,
}

impl Default for EncodeSettings {
    fn default() -> Self {
        Self {
            level: 1,
            min_zstd_gain: 0.0,
            rans: true,
            zstd: true,
            constant: true,
            packed_tables: true,
            zstd_min_saving: ZSTD_MIN_SAVING,
        }
    }
}

/// The format versions a writer can be asked to stay within, newest first: each is
/// the first that a codec the writer uses needs (spec §3).
pub const WRITABLE_FORMAT_VERSIONS: [&str; 4] = ["1.4", "1.3", "1.1", "1.0"];

impl EncodeSettings {
    /// These settings, with the codecs that a reader of `version` (one of
    /// [`WRITABLE_FORMAT_VERSIONS`]) lacks turned off; `None` for another version.
    /// A file records the lowest version its contents need, which may be lower.
    #[must_use]
    pub fn within_format_version(self, version: &str) -> Option<Self> {
        let minor = match version {
            "1.4" => 4,
            "1.3" => 3,
            "1.1" => 1,
            "1.0" => 0,
            _ => return None,
        };
        // Older versions keep their writers' bytes: zstd wherever it is smaller.
        let zstd_min_saving = if minor >= 4 { self.zstd_min_saving } else { 0 };
        Some(Self { rans: minor >= 1, constant: minor >= 3, packed_tables: minor >= 4, zstd_min_saving, ..self })
    }

    /// The table form of the lane rANS streams written.
    fn table_form(self) -> rans::TableForm {
        if self.packed_tables {
            rans::TableForm::Packed
        } else {
            rans::TableForm::Bytes
        }
    }
}

/// One encoded chunk: its record (without its place in the file) and stored bytes.
#[derive(Debug, Clone)]
pub struct EncodedChunk {
    /// The record; `data_offset` and `first_stream` are set by the writer.
    pub record: ChunkRecord,
    /// One record per stream, in order.
    pub streams: Vec<StreamRecord>,
    /// The streams' stored bytes, back to back.
    pub data: Vec<u8>,
}

/// How a stream is stored, chosen from predicted sizes.
#[derive(Debug, Clone, Copy)]
enum Choice {
    Stored,
    /// Every byte is the first (codec 3).
    Constant,
    Zstd,
    /// Lane rANS under plan `i`: 0 for no context, then the stream's contexts in order.
    Rans(usize),
}

/// A context a writer may code a stream under, with its context bytes derived: one
/// per symbol.
#[derive(Debug, Clone, Copy)]
enum StreamContext<'a> {
    /// The plane above (spec §8.7).
    HigherPlane(&'a [u8]),
    /// The base keys of the chunk's values, derived once per chunk.
    BaseKeys(&'a [u8]),
}

impl<'a> StreamContext<'a> {
    fn kind(self) -> ContextKind {
        match self {
            Self::HigherPlane(_) => ContextKind::HigherPlane,
            Self::BaseKeys(_) => ContextKind::BaseKey,
        }
    }

    fn bytes(self) -> &'a [u8] {
        match self {
            Self::HigherPlane(bytes) | Self::BaseKeys(bytes) => bytes,
        }
    }
}

/// One stream, its coding chosen; lane rANS runs only when the stream is kept.
struct PendingStream<'a> {
    raw: &'a [u8],
    /// The contexts it may be coded under besides none.
    contexts: Vec<StreamContext<'a>>,
    /// Plans under no context and under each of `contexts`; empty without lane rANS.
    plans: Vec<rans::StreamPlan>,
    zstd: Option<Vec<u8>>,
    /// The coding kept: zstd only where it saves enough to pay a GPU load's trip
    /// through the CPU.
    choice: Choice,
    /// The coding kept where the stream's set keeps a zstd stream anyway, so that
    /// the trip is paid: zstd wherever it saves [`ZSTD_OVER_RANS_GAIN`].
    smallest: Choice,
}

impl<'a> PendingStream<'a> {
    /// Chooses the smallest of the stream's bytes, lane rANS under the best plan and
    /// zstd. zstd is kept only where it saves more than [`ZSTD_OVER_RANS_GAIN`] and
    /// [`EncodeSettings::zstd_min_saving`] bytes over the best coding that a GPU
    /// decodes, because a zstd stream costs a GPU load a trip through the CPU.
    fn new(
        raw: &'a [u8],
        contexts: Vec<StreamContext<'a>>,
        plans: Vec<rans::StreamPlan>,
        zstd: Option<Vec<u8>>,
        settings: EncodeSettings,
    ) -> Self {
        if is_constant(raw, settings) {
            return Self { raw, contexts, plans, zstd, choice: Choice::Constant, smallest: Choice::Constant };
        }
        // Without lane rANS the file is for readers older than any GPU loader.
        let min_saving = if settings.rans { settings.zstd_min_saving } else { 0 };
        let choice = Self::choose(raw, &plans, zstd.as_deref(), settings, min_saving);
        let smallest = Self::choose(raw, &plans, zstd.as_deref(), settings, 0);
        Self { raw, contexts, plans, zstd, choice, smallest }
    }

    /// Lane rANS under the best plan, unless zstd saves [`ZSTD_OVER_RANS_GAIN`] and
    /// `min_saving` bytes over it; stored where neither is worth it.
    #[allow(clippy::cast_precision_loss)] // thresholds
    fn choose(
        raw: &[u8],
        plans: &[rans::StreamPlan],
        zstd: Option<&[u8]>,
        settings: EncodeSettings,
        min_saving: usize,
    ) -> Choice {
        let zstd_len = zstd.map_or(usize::MAX, <[u8]>::len);
        let zstd_saves_over = |gpu_len: usize| zstd_len.saturating_add(min_saving) <= gpu_len;
        // The first of equals, as a writer that tries the contexts in order keeps.
        let best = plans.iter().enumerate().min_by_key(|(_, plan)| plan.predicted_len());
        let rans = best.filter(|(_, plan)| {
            let len = plan.predicted_len();
            len < raw.len() && ((zstd_len as f64) >= (1.0 - ZSTD_OVER_RANS_GAIN) * len as f64 || !zstd_saves_over(len))
        });
        match (rans, zstd) {
            (Some((index, _)), _) => Choice::Rans(index),
            (None, Some(zstd)) if worth_storing(zstd.len(), raw.len(), settings) && zstd_saves_over(raw.len()) => {
                Choice::Zstd
            }
            _ => Choice::Stored,
        }
    }

    /// The coding kept, given whether the stream's set keeps a zstd stream anyway.
    fn kept(&self, set_keeps_zstd: bool) -> Choice {
        if set_keeps_zstd {
            self.smallest
        } else {
            self.choice
        }
    }

    /// The stored length of `choice`, predicted for lane rANS.
    fn len(&self, choice: Choice, settings: EncodeSettings) -> usize {
        match choice {
            Choice::Rans(index) => Some(self.plans[index].predicted_len())
                .filter(|&len| worth_storing(len, self.raw.len(), settings))
                .unwrap_or(self.raw.len()),
            Choice::Zstd => self.zstd.as_ref().map_or(self.raw.len(), Vec::len),
            Choice::Constant => 1,
            Choice::Stored => self.raw.len(),
        }
    }

    /// Codes the stream as `choice`, into `out`. Lane rANS that does not save enough
    /// once coded is stored instead.
    fn finish(self, choice: Choice, settings: EncodeSettings, out: &mut CodedStreams) {
        let coded = match (choice, self.zstd) {
            (Choice::Rans(index), _) => {
                let contexts = index.checked_sub(1).map(|at| self.contexts[at].bytes());
                let plan = &self.plans[index];
                Some((plan.codec(), plan.encode_bytes(self.raw, contexts)))
            }
            (Choice::Zstd, Some(zstd)) => Some((Codec::Zstd, zstd)),
            (Choice::Constant, _) => Some((Codec::Constant, self.raw[..1].to_vec())),
            _ => None,
        };
        match coded.filter(|(_, bytes)| worth_storing(bytes.len(), self.raw.len(), settings)) {
            Some((codec, bytes)) => out.push(self.raw.len(), codec, &bytes),
            None => out.push(self.raw.len(), Codec::Stored, self.raw),
        }
    }
}

/// Whether `raw` is one byte repeated and may be stored as that byte (codec 3):
/// nothing else stores it smaller, and a GPU fills it without decoding anything.
fn is_constant(raw: &[u8], settings: EncodeSettings) -> bool {
    settings.constant
        && raw.split_first().is_some_and(|(first, rest)| rest.iter().all(|b| b == first))
        && worth_storing(1, raw.len(), settings)
}

/// Whether `len` stored bytes save enough of `raw_len` to be kept compressed.
#[allow(clippy::cast_precision_loss)] // a threshold
fn worth_storing(len: usize, raw_len: usize, settings: EncodeSettings) -> bool {
    len < raw_len && (len as f64) <= raw_len as f64 * (1.0 - settings.min_zstd_gain)
}

/// Streams with their codings chosen, before any lane rANS coding runs: a writer
/// weighs alternative sets by their predicted sizes and codes only the one it keeps.
struct StreamSet<'a> {
    streams: Vec<PendingStream<'a>>,
    settings: EncodeSettings,
    /// The streams are changes of weights in positional order, whose planes hold
    /// no runs for zstd's matches, with or without the base keys as their context.
    weight_changes: bool,
}

impl<'a> StreamSet<'a> {
    fn new(settings: EncodeSettings) -> Self {
        Self { streams: Vec::new(), settings, weight_changes: false }
    }

    /// Adds one stream, weighing lane rANS under `contexts` (and none) and zstd.
    fn push(&mut self, raw: &'a [u8], contexts: Vec<StreamContext<'a>>) -> Result<()> {
        if raw.is_empty() {
            // Only position coding 3 has empty streams; nothing stores them smaller.
            self.streams.push(PendingStream::new(raw, Vec::new(), Vec::new(), None, self.settings));
            return Ok(());
        }
        if !self.settings.rans || is_constant(raw, self.settings) {
            return self.push_planned(raw, contexts, Vec::new());
        }
        let form = self.settings.table_form();
        if raw.len() >= SAMPLE_ABOVE_FROM && !contexts.is_empty() && stored_under_any_context(raw, &contexts) {
            // Planned under no context only: its histogram serves zstd's prediction.
            let plans = rans::plan_each_of_bytes(form, raw, &[]);
            return self.push_planned(raw, Vec::new(), plans);
        }
        let (above, keys) = match contexts[..] {
            [StreamContext::HigherPlane(above), StreamContext::BaseKeys(keys)] if raw.len() >= SAMPLE_ABOVE_FROM => {
                (above, keys)
            }
            _ => {
                let candidates: Vec<(ContextKind, Option<&[u8]>)> =
                    contexts.iter().map(|c| (c.kind(), Some(c.bytes()))).collect();
                let plans = rans::plan_each_of_bytes(form, raw, &candidates);
                return self.push_planned(raw, contexts, plans);
            }
        };
        // Under the base keys first: where a sample says the plane above leaves more
        // entropy than the base keys' whole coding takes, no plan under it can win,
        // and it is neither counted nor planned.
        let mut plans = rans::plan_each_of_bytes(form, raw, &[(ContextKind::BaseKey, Some(keys))]);
        #[allow(clippy::cast_precision_loss)] // an estimate
        let keyed_len = plans[1].predicted_len() as f64;
        if sampled_entropy_under(raw, above) / 8.0 > keyed_len {
            return self.push_planned(raw, vec![StreamContext::BaseKeys(keys)], plans);
        }
        let under_above = rans::plan_each_of_bytes(form, raw, &[(ContextKind::HigherPlane, Some(above))]);
        plans.insert(1, under_above.into_iter().nth(1).expect("a plan per candidate after the one under none"));
        self.push_planned(raw, contexts, plans)
    }

    /// Adds one stream with its lane rANS plans made.
    fn push_planned(
        &mut self,
        raw: &'a [u8],
        contexts: Vec<StreamContext<'a>>,
        plans: Vec<rans::StreamPlan>,
    ) -> Result<()> {
        let zstd = if self.settings.zstd && !is_constant(raw, self.settings) {
            // On changes of weights, lane rANS beats zstd by 20-60% against the base
            // keys, so zstd's size is predicted first there (`compress_stream`).
            let weights = self.weight_changes || contexts.iter().any(|c| matches!(c, StreamContext::BaseKeys(_)));
            let gpu_len =
                plans.iter().map(rans::StreamPlan::predicted_len).min().filter(|&len| weights && len < raw.len());
            // The plan under no context comes first, and holds the whole histogram.
            let order0_bits = plans.first().map(rans::StreamPlan::context_entropy_bits);
            compress_stream(raw, self.settings.level, gpu_len, order0_bits)?
        } else {
            None
        };
        self.streams.push(PendingStream::new(raw, contexts, plans, zstd, self.settings));
        Ok(())
    }

    /// One set of streams without contexts between them.
    fn of(streams: &'a [Vec<u8>], settings: EncodeSettings) -> Result<Self> {
        Self::of_planes(streams, false, None, settings)
    }

    /// One set of byte planes, least significant first: each plane may be coded
    /// against the plane above it (`plane_contexts`) and against the base keys.
    fn of_planes(
        planes: &'a [Vec<u8>],
        plane_contexts: bool,
        base_keys: Option<&'a [u8]>,
        settings: EncodeSettings,
    ) -> Result<Self> {
        Self::new(settings).with_planes(planes, plane_contexts, base_keys)
    }

    /// Adds byte planes as [`StreamSet::of_planes`] makes them.
    fn with_planes(mut self, planes: &'a [Vec<u8>], plane_contexts: bool, base_keys: Option<&'a [u8]>) -> Result<Self> {
        // Planes are all as long, and the base keys hold one key per value.
        for (q, plane) in planes.iter().enumerate() {
            let above = planes.get(q + 1).filter(|_| plane_contexts).map(|p| StreamContext::HigherPlane(p));
            self.push(plane, above.into_iter().chain(base_keys.map(StreamContext::BaseKeys)).collect())?;
        }
        Ok(self)
    }

    /// The same planes regrouped by base key (spec §8.6), without the base-key
    /// context: a permutation of whole values has the same histograms under no
    /// context and under the plane above, so this set's plans serve unchanged and
    /// only zstd runs anew.
    fn regrouped(&self, grouped: &'a [Vec<u8>]) -> Result<StreamSet<'a>> {
        let mut set = Self::new(self.settings);
        for (q, (stream, plane)) in self.streams.iter().zip(grouped).enumerate() {
            let mut contexts = Vec::new();
            let mut plans = stream.plans.first().cloned().into_iter().collect::<Vec<_>>();
            for (at, contexts_of) in stream.contexts.iter().enumerate() {
                if let (StreamContext::HigherPlane(_), Some(above)) = (contexts_of, grouped.get(q + 1)) {
                    contexts.push(StreamContext::HigherPlane(above));
                    plans.extend(stream.plans.get(at + 1).cloned());
                }
            }
            set.push_planned(plane, contexts, plans)?;
        }
        Ok(set)
    }

    /// A floor on what these planes, grouped by base key (spec §8.6), store in,
    /// predicted from their plans. A grouped plane keeps the positional plans under
    /// no context and under the plane above ([`StreamSet::regrouped`]), so lane rANS
    /// stores it as they predict. zstd's literal coder, which is what grouping adds,
    /// follows the statistics from group to group, so it takes at least each base
    /// key's prefix code where a plane carries a bit a symbol or more (measured:
    /// 0.99 of it at least, on the benchmark corpus); below that, runs are common
    /// and zstd's matches beat any prefix code, so the plane's entropy under the
    /// base key or the plane above is its floor (0.7% more at least). A stream
    /// without plans counts at the length it is kept at.
    #[allow(clippy::cast_precision_loss)] // an estimate
    fn grouping_floor(&self) -> f64 {
        let keeps_zstd = self.keeps_zstd();
        self.streams
            .iter()
            .map(|stream| {
                let kept = stream.len(stream.kept(keeps_zstd), self.settings) as f64;
                if stream.plans.is_empty() {
                    return kept;
                }
                let entropy = stream.plans.iter().map(rans::StreamPlan::context_entropy_bits).fold(f64::MAX, f64::min);
                let prefix_code = stream.plans.iter().find_map(rans::StreamPlan::context_prefix_code_bits);
                let literals = match prefix_code {
                    Some(bits) if entropy >= stream.raw.len() as f64 => bits as f64,
                    _ => entropy,
                } / 8.0;
                let rans = stream.plans.iter().filter(|plan| plan.kind() != ContextKind::BaseKey);
                rans.map(|plan| plan.predicted_len() as f64).fold(literals.min(stream.raw.len() as f64), f64::min)
            })
            .sum()
    }

    /// Whether a stream keeps zstd even where a GPU-decoded coding is preferred: then
    /// a GPU load of the set goes through the CPU anyway, and every stream of it
    /// takes the smaller coding.
    fn keeps_zstd(&self) -> bool {
        self.streams.iter().any(|stream| matches!(stream.choice, Choice::Zstd))
    }

    /// The stored length, predicted for lane rANS streams.
    fn len(&self) -> usize {
        let keeps_zstd = self.keeps_zstd();
        self.streams.iter().map(|stream| stream.len(stream.kept(keeps_zstd), self.settings)).sum()
    }

    /// Codes every stream as chosen.
    fn finish(self) -> CodedStreams {
        let keeps_zstd = self.keeps_zstd();
        let mut out = CodedStreams { records: Vec::new(), data: Vec::new() };
        for stream in self.streams {
            let choice = stream.kept(keeps_zstd);
            stream.finish(choice, self.settings, &mut out);
        }
        out
    }
}

/// Streams as they are stored.
struct CodedStreams {
    records: Vec<StreamRecord>,
    data: Vec<u8>,
}

impl CodedStreams {
    fn push(&mut self, decoded_len: usize, codec: Codec, stored: &[u8]) {
        self.records.push(StreamRecord { stored_len: u32_len(stored.len()), decoded_len: u32_len(decoded_len), codec });
        self.data.extend_from_slice(stored);
    }

    fn append(&mut self, other: CodedStreams) {
        self.records.extend(other.records);
        self.data.extend(other.data);
    }
}

/// The share of a set's predicted size within which two predictions are too close
/// to call, plus [`TOO_CLOSE_BYTES`]: lane rANS predictions are within about 0.5%
/// plus a few bytes per tile.
const TOO_CLOSE_SHARE: f64 = 0.01;
const TOO_CLOSE_BYTES: f64 = 256.0;

/// Keeps `first` if it stores `gain` smaller than `second`, else `second`; returns
/// whether `first` was kept, and the kept set coded. Sets are weighed by their
/// predicted sizes, and coded both and measured only where the two are too close
/// to call, so the choice is the one that measuring both would make.
#[allow(clippy::cast_precision_loss)] // thresholds
fn smaller_of(first: StreamSet<'_>, second: StreamSet<'_>, gain: f64) -> (bool, CodedStreams) {
    let bar = (1.0 - gain) * second.len() as f64;
    let first_len = first.len() as f64;
    if (first_len - bar).abs() > TOO_CLOSE_SHARE * bar + TOO_CLOSE_BYTES {
        return if first_len < bar { (true, first.finish()) } else { (false, second.finish()) };
    }
    let (first, second) = (first.finish(), second.finish());
    if (first.data.len() as f64) < (1.0 - gain) * second.data.len() as f64 {
        (true, first)
    } else {
        (false, second)
    }
}

/// The fraction by which zstd must beat lane rANS on a stream to be kept: below it,
/// a stream that a GPU decodes is worth more than the bytes.
const ZSTD_OVER_RANS_GAIN: f64 = 0.02;
/// The default [`EncodeSettings::zstd_min_saving`]. On the benchmark corpus it
/// leaves zstd only where zstd's long-distance matches save 10% of large planes, and
/// costs the other deltas at most 1.5% (the nearly constant planes of an RL step).
pub const ZSTD_MIN_SAVING: usize = 4096;
/// The fraction by which a bitmap must beat gaps to be kept. A bitmap codes one
/// symbol per 8 words, gaps one per changed word and plane: below about 6%
/// changed words that is many times the symbols, and a GPU warp decodes a lane
/// rANS tile one step of 32 symbols after the other (§15.10). Where the two store
/// within this share of each other, the shorter streams are worth more.
const BITMAP_OVER_GAPS_GAIN: f64 = 0.01;
/// How far above the size at which zstd could be kept a sampled prediction of it
/// must lie for zstd not to be run ([`compress_stream`]).
const ZSTD_PREDICTION_SLACK: f64 = 0.10;
/// Bytes sampled to judge a stream's entropy.
const SAMPLE_BYTES: usize = 1 << 16;
/// Above this many bits per byte, zstd cannot win: the stream is stored as it is.
const INCOMPRESSIBLE_BITS: f64 = 7.9;
/// From this level on, the writer measures rather than predicts.
const MEASURE_FROM_LEVEL: i32 = 10;

/// From this many bytes on, a plane's entropy under the plane above is sampled
/// before it is planned under it ([`StreamSet::push`]).
const SAMPLE_ABOVE_FROM: usize = 1 << 16;
/// Items (words or symbols) in a block of the writer's sampled predictions.
const SAMPLE_BLOCK: usize = 4096;
/// The sampled predictions take one block in this many.
const SAMPLE_EVERY: usize = 8;

/// The blocks that the sampled predictions ([`keyed_bits`], [`sampled_entropy_under`])
/// take of `len` items: one block of [`SAMPLE_BLOCK`] in [`SAMPLE_EVERY`], from the
/// first.
fn sample_blocks(len: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
    (0..len).step_by(SAMPLE_BLOCK * SAMPLE_EVERY).map(move |start| start..len.min(start + SAMPLE_BLOCK))
}

/// The entropy of `symbols` under `contexts` in bits, estimated from
/// [`sample_blocks`]. Counted from a sample, each context's histogram misses rare
/// symbols, so the estimate lies below the entropy of the whole more often than
/// above it.
#[allow(clippy::cast_precision_loss)] // an estimate
fn sampled_entropy_under(symbols: &[u8], contexts: &[u8]) -> f64 {
    let mut sample = (Vec::new(), Vec::new());
    for block in sample_blocks(symbols.len()) {
        sample.0.extend_from_slice(&symbols[block.clone()]);
        sample.1.extend_from_slice(&contexts[block]);
    }
    rans::entropy_under(&sample.0, &sample.1) * symbols.len() as f64 / sample.0.len() as f64
}

/// Bits a symbol from which a sample of a plane says it is stored as it is: lane
/// rANS adds its states (about 0.6% at 8 bits a symbol) and its tables to the
/// entropy.
const STORED_FROM_BITS: f64 = 7.97;
/// The most information about a plane that a sample may see in a context (bits a
/// symbol) for the plane to be stored whatever its tables under that context:
/// below it, they save less than the states and tables cost (spec §15.10).
const CONTEXT_PAYS_FROM_BITS: f64 = 0.08;
/// Blocks of [`SAMPLE_BLOCK`] symbols, evenly spread, that the pre-test of
/// [`stored_under_any_context`] takes: enough that a sample of random bytes
/// measures 7.99 bits a symbol, against 7.96 for one block.
const PRETEST_BLOCKS: usize = 4;

/// Whether `raw` (at least [`SAMPLE_ABOVE_FROM`] symbols) would be stored as it is
/// under any of `contexts`: the low mantissa bytes of dense changes of weights,
/// which look random. A sample of blocks puts its entropy under no context at
/// [`STORED_FROM_BITS`] or more, and shows less than [`CONTEXT_PAYS_FROM_BITS`] of
/// information in each context: its entropy under the context against its entropy
/// under the same context bytes one sampled block away, which have the same counts
/// and so the same bias from the sample's size, but no alignment with the symbols.
/// Planning under the contexts would count every symbol for tables that are not
/// kept.
#[allow(clippy::cast_precision_loss)] // estimates
fn stored_under_any_context(raw: &[u8], contexts: &[StreamContext<'_>]) -> bool {
    let stride = (raw.len() / PRETEST_BLOCKS).max(SAMPLE_BLOCK);
    let mut pretest = [0u64; 256];
    for start in (0..raw.len()).step_by(stride) {
        let block = rans::histogram(&raw[start..raw.len().min(start + SAMPLE_BLOCK)]);
        pretest.iter_mut().zip(block).for_each(|(count, n)| *count += n);
    }
    if rans::entropy_bits(&pretest) < STORED_FROM_BITS * pretest.iter().sum::<u64>() as f64 {
        return false;
    }
    let blocks: Vec<std::ops::Range<usize>> =
        sample_blocks(raw.len()).filter(|block| block.len() == SAMPLE_BLOCK).collect();
    if blocks.len() < 2 {
        return false;
    }
    let symbols: Vec<u8> = blocks.iter().flat_map(|block| &raw[block.clone()]).copied().collect();
    contexts.iter().all(|context| {
        let bytes = context.bytes();
        let Some(aligned) = blocks.iter().map(|block| bytes.get(block.clone())).collect::<Option<Vec<_>>>() else {
            return false;
        };
        let aligned = aligned.concat();
        let mut moved = aligned.clone();
        moved.rotate_left(SAMPLE_BLOCK);
        let seen = rans::entropy_under(&symbols, &moved) - rans::entropy_under(&symbols, &aligned);
        seen < CONTEXT_PAYS_FROM_BITS * symbols.len() as f64
    })
}

/// A strided sample of at most [`SAMPLE_BYTES`] bytes, and the stride.
fn sample_bytes(raw: &[u8]) -> (Vec<u8>, usize) {
    let step = raw.len().div_ceil(SAMPLE_BYTES).max(1);
    (raw.iter().step_by(step).copied().collect(), step)
}

/// Estimated stored bits of a stream, from the order-0 entropy of a sample.
#[allow(clippy::cast_precision_loss)] // an estimate
fn sampled_bits(raw: &[u8]) -> f64 {
    let (sample, step) = sample_bytes(raw);
    values::entropy_bits(&sample) * step as f64
}

/// Compresses a stream, or returns `None` when its entropy says it is
/// incompressible. Level 1 codes literals only ([`Effort::Literals`]); a higher level
/// also tries zstd at that level and keeps the smaller, so raising the level never
/// costs size. At level 1, zstd is not run where it could not be kept over
/// `gpu_len`, a lane rANS length the stream is known to reach: where the stream's
/// order-0 entropy (`order0_bits`, known from its histogram) says so, or else a
/// prediction from a sample of its blocks, either [`ZSTD_PREDICTION_SLACK`] above
/// the size at which zstd could be kept. Without `order0_bits`, its entropy is
/// sampled.
#[allow(clippy::cast_precision_loss)] // estimates and thresholds
fn compress_stream(
    raw: &[u8],
    level: i32,
    gpu_len: Option<usize>,
    order0_bits: Option<f64>,
) -> Result<Option<Vec<u8>>> {
    let bits_per_byte = match order0_bits {
        Some(bits) => bits / raw.len().max(1) as f64,
        None => {
            let (sample, _) = sample_bytes(raw);
            values::entropy_bits(&sample) / sample.len().max(1) as f64
        }
    };
    if bits_per_byte > INCOMPRESSIBLE_BITS {
        return Ok(None);
    }
    if let (true, Some(gpu_len)) = (level <= 1, gpu_len) {
        let bar = (1.0 + ZSTD_PREDICTION_SLACK) * (1.0 - ZSTD_OVER_RANS_GAIN) * gpu_len as f64;
        // zstd codes literals with order-0 prefix codes, so on a stream without
        // runs (a bit a symbol or more) it takes at least about its order-0
        // entropy: 1.004 times it at least, on every such stream of the benchmark
        // corpus. Below a bit a symbol, its matches may beat it.
        if bits_per_byte >= 1.0 && order0_bits.is_some_and(|bits| bits / 8.0 >= bar) {
            return Ok(None);
        }
        if zstd_stream::predict_literals_len(raw)?.is_some_and(|predicted| predicted as f64 >= bar) {
            return Ok(None);
        }
    }
    let literals = zstd_stream::compress(raw, Effort::Literals)?;
    if level <= 1 {
        return Ok(Some(literals));
    }
    let matched = zstd_stream::compress(raw, Effort::Level(level))?;
    Ok(Some(if matched.len() < literals.len() { matched } else { literals }))
}

/// Every stream length is bounded by `MAX_CHUNK_WORDS * 8` < 2^32.
fn u32_len(len: usize) -> u32 {
    u32::try_from(len).expect("stream lengths are bounded by the chunk size limit")
}

/// Encodes one chunk of `target` words against the matching `base` words. `base` may
/// be shorter than `target` (or empty): missing base words are zero (spec §8).
/// `None` means the tensor has no base, and the chunk is stored raw.
///
/// # Errors
/// `E_INVALID_ARGUMENT` for a target that is not whole words; `E_LIMIT_EXCEEDED` for more than `MAX_CHUNK_WORDS` words;
/// otherwise only if zstd fails.
pub fn encode_chunk(
    target: &[u8],
    base: Option<&[u8]>,
    width: WordWidth,
    leading_sign: bool,
    settings: EncodeSettings,
) -> Result<EncodedChunk> {
    if !target.len().is_multiple_of(width.bytes()) {
        return fail(ErrorCode::InvalidArgument, "the target is not a whole number of words");
    }
    if (target.len() / width.bytes()) as u64 > crate::limits::MAX_CHUNK_WORDS {
        return fail(ErrorCode::LimitExceeded, "a chunk holds at most MAX_CHUNK_WORDS words (spec §9)");
    }
    encode_chunk_against(target, base, width, leading_sign, settings, None)
}

/// As [`encode_chunk`], with the positions `reference` of the reference delta's
/// chunk at this place (spec §8.3, the set R: strictly increasing, below the
/// chunk's word count). A sparse chunk then uses position coding 3 where that
/// stores smaller than gaps and the bitmap; without `reference` the output is
/// that of [`encode_chunk`].
///
/// # Errors
/// As [`encode_chunk`], and `E_INVALID_ARGUMENT` for a reference that is not
/// strictly increasing below the chunk's word count.
pub fn encode_chunk_against(
    target: &[u8],
    base: Option<&[u8]>,
    width: WordWidth,
    leading_sign: bool,
    settings: EncodeSettings,
    reference: Option<&[u32]>,
) -> Result<EncodedChunk> {
    if !target.len().is_multiple_of(width.bytes()) {
        return fail(ErrorCode::InvalidArgument, "the target is not a whole number of words");
    }
    if (target.len() / width.bytes()) as u64 > crate::limits::MAX_CHUNK_WORDS {
        return fail(ErrorCode::LimitExceeded, "a chunk holds at most MAX_CHUNK_WORDS words (spec §9)");
    }
    if let Some(reference) = reference {
        positions::check_reference(reference, target.len() / width.bytes())?;
    }
    with_word!(width, W => encode_words::<W>(target, base, leading_sign, settings, reference))
}

fn load_words<W: Word>(bytes: &[u8]) -> Vec<W> {
    bytes.chunks_exact(W::BYTES).map(W::load).collect()
}

/// The `len` words of a chunk, read where they lie (a memory-mapped checkpoint's
/// tensors usually lie aligned): a copy of megabytes per chunk costs more than
/// its reads, and fresh heap pages are the costliest memory to touch. Missing
/// words (a base shorter than the chunk) read as zero.
fn chunk_words<W: Word>(bytes: &[u8], len: usize) -> Cow<'_, [W]> {
    match W::view(bytes) {
        Some(words) if words.len() == len => Cow::Borrowed(words),
        _ => {
            let mut words = load_words(bytes);
            words.resize(len, W::default());
            Cow::Owned(words)
        }
    }
}

fn layouts<W: Word>(leading_sign: bool) -> &'static [ValueLayout] {
    match (W::BYTES, leading_sign) {
        (1, _) => &[ValueLayout::Words],
        (_, true) => &[ValueLayout::BytePlanes, ValueLayout::RotatedBytePlanes],
        (_, false) => &[ValueLayout::BytePlanes],
    }
}

/// Picks the op and layout whose sampled values have the lowest entropy.
fn choose_transform<W: Word>(
    pairs: impl Fn(usize) -> (W, W),
    count: usize,
    ops: &[ValueOp],
    leading_sign: bool,
) -> (ValueOp, ValueLayout) {
    let step = count.div_ceil(SAMPLE_VALUES).max(1);
    let sample: Vec<(W, W)> = (0..count).step_by(step).map(&pairs).collect();
    let mut best = (f64::INFINITY, ValueOp::Xor, ValueLayout::BytePlanes);
    for &op in ops {
        let values: Vec<W> = sample.iter().map(|&(t, b)| W::express(t, b, op)).collect();
        for &layout in layouts::<W>(leading_sign) {
            let bits = values::estimate_bits(&values, layout);
            if bits < best.0 {
                best = (bits, op, layout);
            }
        }
    }
    (best.1, best.2)
}

/// Value streams of values split into `planes`; `base_keys` is the context of spec
/// §8.7 for positional values against a base.
fn value_streams<'a>(
    planes: &'a [Vec<u8>],
    layout: ValueLayout,
    base_keys: Option<&'a [u8]>,
    settings: EncodeSettings,
) -> Result<StreamSet<'a>> {
    let byte_planes = layout != ValueLayout::Words;
    let set = StreamSet { weight_changes: base_keys.is_some(), ..StreamSet::new(settings) };
    set.with_planes(planes, byte_planes, base_keys.filter(|_| byte_planes))
}

/// Whether grouping values by base key (spec §8.6) is predicted to store at least
/// `min_gain` smaller, from the entropy of a sample taken whole and taken group
/// by group. For floats the exponent sets how many units in the last place an update
/// spans, so values of one group look alike; where they do not, positional order is
/// kept, which also keeps GPU decoding on its fastest path.
fn grouping_pays<W: Word>(values: &[W], keys: &[u8], layout: ValueLayout, min_gain: f64) -> bool {
    let (grouped, whole) = grouping_bits(values, keys, layout);
    grouped < (1.0 - min_gain) * whole
}

/// The estimates that [`grouping_pays`] weighs: a sample's bits taken group by group
/// and taken whole.
fn grouping_bits<W: Word>(values: &[W], keys: &[u8], layout: ValueLayout) -> (f64, f64) {
    let step = values.len().div_ceil(SAMPLE_VALUES).max(1);
    let streams = if layout == ValueLayout::Words { 1 } else { W::BYTES };
    // Each group's streams counted where its values are met, rather than gathered
    // and split: the same histograms, and so the same estimate.
    let mut first_row = [usize::MAX; 256];
    let mut rows: Vec<Histogram> = Vec::new();
    for j in (0..values.len()).step_by(step) {
        let key = usize::from(keys[j]);
        if first_row[key] == usize::MAX {
            first_row[key] = rows.len();
            rows.resize(rows.len() + streams, [0; 256]);
        }
        values::count_streams(values[j], layout, &mut rows[first_row[key]..first_row[key] + streams]);
    }
    let mut whole = vec![[0u64; 256]; streams];
    for (k, row) in rows.iter().enumerate() {
        for (total, &count) in whole[k % streams].iter_mut().zip(row) {
            *total += count;
        }
    }
    // By key, as the groups were weighed when they were gathered.
    let grouped: f64 = first_row
        .iter()
        .filter(|&&first| first != usize::MAX)
        .map(|&first| values::corrected_bits(&rows[first..first + streams]))
        .sum();
    (grouped, values::corrected_bits(&whole))
}

/// The predicted gain below which values stay in positional order; a writer asked
/// for cheap decoding (`min_zstd_gain`) asks the same of grouping.
const GROUPING_GAIN: f64 = 0.02;

/// Value streams against a base, in the order that stores smaller. With lane rANS,
/// positional, coded against the base keys (spec §8.7), unless grouping is
/// predicted to pay ([`grouping_pays`]) and then stores [`GROUPING_GAIN`] smaller. Otherwise grouped
/// by base key where [`grouping_pays`] predicts it, positional otherwise; measured
/// from [`MEASURE_FROM_LEVEL`] on.
fn ordered_value_streams<W: Word>(
    values: &[W],
    keys: impl Fn() -> Vec<u8>,
    layout: ValueLayout,
    leading_sign: bool,
    settings: EncodeSettings,
) -> Result<(ValueOrder, CodedStreams)> {
    let multi_byte = W::BYTES > 1;
    let positional_planes = values::split(values, layout);
    if settings.rans {
        // The base keys serve both as the context of byte planes and to group by.
        let byte_planes = layout != ValueLayout::Words;
        let grouping = leading_sign && multi_byte;
        let keys = if byte_planes || grouping { keys() } else { Vec::new() };
        let positional = value_streams(&positional_planes, layout, Some(&keys), settings)?;
        // Where grouping is predicted to pay, it may still beat the base-key
        // context (F16 fine-tunes); grouping, which costs a GPU a regrouping pass,
        // is kept only when it stores GROUPING_GAIN smaller.
        if !grouping
            || keys.is_empty()
            || !grouping_pays(values, &keys, layout, GROUPING_GAIN.max(settings.min_zstd_gain))
            || positional.grouping_floor() >= (1.0 - GROUPING_GAIN) * positional.len() as f64
        {
            return Ok((ValueOrder::Positional, positional.finish()));
        }
        let grouped_planes = values::split(&values::group(values, &keys), layout);
        let grouped = positional.regrouped(&grouped_planes)?;
        let (grouping_wins, streams) = smaller_of(grouped, positional, GROUPING_GAIN);
        let order = if grouping_wins { ValueOrder::GroupedByBase } else { ValueOrder::Positional };
        return Ok((order, streams));
    }
    let measure = settings.level >= MEASURE_FROM_LEVEL && multi_byte;
    let keys = if measure || (leading_sign && multi_byte) { keys() } else { Vec::new() };
    let min_gain = GROUPING_GAIN.max(settings.min_zstd_gain);
    if !measure && (keys.is_empty() || !grouping_pays(values, &keys, layout, min_gain)) {
        return Ok((ValueOrder::Positional, value_streams(&positional_planes, layout, None, settings)?.finish()));
    }
    let grouped_planes = values::split(&values::group(values, &keys), layout);
    let grouped = value_streams(&grouped_planes, layout, None, settings)?;
    if !measure {
        return Ok((ValueOrder::GroupedByBase, grouped.finish()));
    }
    let positional = value_streams(&positional_planes, layout, None, settings)?;
    let (grouping_wins, streams) = smaller_of(grouped, positional, 0.0);
    Ok((if grouping_wins { ValueOrder::GroupedByBase } else { ValueOrder::Positional }, streams))
}

/// Position streams: gaps or a bitmap, or, given a reference, coding 3 where it
/// measures smaller than the better of the two.
fn position_streams(
    changed: &[u32],
    words: usize,
    settings: EncodeSettings,
    reference: Option<&[u32]>,
) -> Result<(PositionCoding, u8, CodedStreams)> {
    let chosen = gap_or_bitmap_streams(changed, words, settings)?;
    let Some(reference) = reference else { return Ok(chosen) };
    // Coding 3 is measured, never predicted, and kept only where it is smaller.
    let (bitmap, ranks) = positions::split_by_reference(changed, reference);
    let width = positions::gap_width(&ranks);
    let mut streams = vec![bitmap];
    streams.extend(positions::encode_gaps(&ranks, width));
    let mut set = StreamSet::of(&streams[..1], settings)?;
    for stream in StreamSet::of_planes(&streams[1..], true, None, settings)?.streams {
        set.streams.push(stream);
    }
    let split = set.finish();
    Ok(if split.data.len() < chosen.2.data.len() { (PositionCoding::SplitByReference, width, split) } else { chosen })
}

/// Gaps or a bitmap, whichever is predicted (or, at high levels, measured, with
/// lane rANS streams predicted from their plans) to store smaller.
fn gap_or_bitmap_streams(
    changed: &[u32],
    words: usize,
    settings: EncodeSettings,
) -> Result<(PositionCoding, u8, CodedStreams)> {
    let width = positions::gap_width(changed);
    let gap_planes = positions::encode_gaps(changed, width);
    let bitmap = [positions::encode_bitmap(changed, words)];
    let bitmap_gain = if bitmap[0].len() > changed.len() * gap_planes.len() { BITMAP_OVER_GAPS_GAIN } else { 0.0 };
    let gaps_win = if settings.level >= MEASURE_FROM_LEVEL {
        None
    } else {
        let gap_bits: f64 = gap_planes.iter().map(|p| sampled_bits(p)).sum();
        let bitmap_bits = sampled_bits(&bitmap[0]);
        let close = (gap_bits - bitmap_bits).abs() < 0.1 * gap_bits.min(bitmap_bits);
        (!close).then_some(gap_bits <= bitmap_bits)
    };
    let gaps = match gaps_win {
        Some(false) => None,
        _ => Some(StreamSet::of_planes(&gap_planes, true, None, settings)?),
    };
    let bitmap = match gaps_win {
        Some(true) => None,
        _ => Some(StreamSet::of(&bitmap, settings)?),
    };
    Ok(match (gaps, bitmap) {
        (Some(g), Some(b)) => match smaller_of(b, g, bitmap_gain) {
            (true, b) => (PositionCoding::Bitmap, 0, b),
            (false, g) => (PositionCoding::Gaps, width, g),
        },
        (Some(g), None) => (PositionCoding::Gaps, width, g.finish()),
        (None, Some(b)) => (PositionCoding::Bitmap, 0, b.finish()),
        (None, None) => unreachable!("at least one coding is built"),
    })
}

/// Ideal cost of the changed positions of a chunk: `words * H(density)` bits.
#[allow(clippy::cast_precision_loss)] // an estimate
fn positions_bits(density: f64, words: usize) -> f64 {
    let h = -density * density.log2() - (1.0 - density) * (1.0 - density).log2();
    h * words as f64
}

/// Sampled bits per value, over the changed words or over all words.
#[allow(clippy::cast_precision_loss)] // an estimate
fn bits_per_value<W: Word>(target: &[W], base: &[W], changed: Option<&[u32]>, op: ValueOp, layout: ValueLayout) -> f64 {
    let count = changed.map_or(target.len(), <[u32]>::len);
    let step = count.div_ceil(SAMPLE_VALUES).max(1);
    let sample: Vec<W> = (0..count)
        .step_by(step)
        .map(|j| {
            let i = changed.map_or(j, |c| c[j] as usize);
            W::express(target[i], base[i], op)
        })
        .collect();
    values::estimate_bits(&sample, layout) / sample.len().max(1) as f64
}

/// How far apart two predictions of [`keyed_bits`] must be for the smaller to be
/// built alone: on the benchmark corpus, sparse and dense chunks near the line
/// store more than 3% apart in 46 of 49 cases.
const KEYED_DECISIVE_SHARE: f64 = 0.04;
/// Chunks below this many words are built both ways where it is close: their
/// tables, which [`keyed_bits`] does not count, weigh as much as their entropy.
const KEYED_MIN_WORDS: usize = 1 << 16;

/// Predicted bits of a chunk, sparse and dense, from [`sample_blocks`]: the
/// positions' `n · H(m / n)`, and each value plane's entropy under the base key or
/// the plane above (or none), whichever is lowest, as lane rANS codes them
/// (spec §8.7). Unlike [`bits_per_value`], it sees the contexts, which is what
/// decides chunks whose order-0 predictions are close.
#[allow(clippy::cast_precision_loss)] // estimates
fn keyed_bits<W: Word>(target: &[W], base: &[W], op: ValueOp, layout: ValueLayout) -> (f64, f64) {
    let sampled: usize = sample_blocks(target.len()).map(|block| block.len()).sum();
    let mut all = (Vec::with_capacity(sampled), Vec::with_capacity(sampled));
    let mut changed = (vec![W::default(); sampled], vec![0u8; sampled]);
    let mut kept = 0;
    for block in sample_blocks(target.len()) {
        for i in block {
            let (value, key) = (W::express(target[i], base[i], op), values::group_key(base[i]));
            all.0.push(value);
            all.1.push(key);
            // Without a branch: a word is kept by moving past it. Chunks come here
            // when about as many words change as not, and a branch missed half the time.
            changed.0[kept] = value;
            changed.1[kept] = key;
            kept += usize::from(target[i] != base[i]);
        }
    }
    changed.0.truncate(kept);
    changed.1.truncate(kept);
    let value_bits = |(values, keys): &(Vec<W>, Vec<u8>)| -> f64 {
        let planes = values::split(values, layout);
        let byte_planes = layout != ValueLayout::Words;
        (0..planes.len())
            .map(|q| {
                if !byte_planes {
                    return values::entropy_bits(&planes[q]);
                }
                let (under_keys, alone) = rans::entropy_under_and_alone(&planes[q], keys);
                let under_above = planes.get(q + 1).map_or(f64::MAX, |above| rans::entropy_under(&planes[q], above));
                alone.min(under_keys).min(under_above)
            })
            .sum()
    };
    let (n, m) = (all.0.len(), changed.0.len());
    let positions = if m == 0 || m == n { 0.0 } else { positions_bits(m as f64 / n as f64, n) };
    (positions + value_bits(&changed), value_bits(&all))
}

#[allow(clippy::cast_precision_loss)] // densities are estimates
fn encode_words<W: Word>(
    target_bytes: &[u8],
    base_bytes: Option<&[u8]>,
    leading_sign: bool,
    settings: EncodeSettings,
    reference: Option<&[u32]>,
) -> Result<EncodedChunk> {
    let words = target_bytes.len() / W::BYTES;
    let target_words = chunk_words::<W>(target_bytes, words);
    let target: &[W] = &target_words;
    let mut record = ChunkRecord {
        data_offset: 0,
        stored_len: 0,
        changed_count: 0,
        first_stream: 0,
        encoding: Encoding::Unchanged,
        value_op: ValueOp::Xor,
        value_layout: ValueLayout::Words,
        position_coding: PositionCoding::None,
        gap_width: 0,
        stream_count: 0,
        value_order: ValueOrder::Positional,
        checksum: 0,
        digest: leaf_digest(target_bytes),
    };

    let streams = match base_bytes.filter(|b| !b.is_empty()) {
        None => {
            let (_, layout) = choose_transform(|i| (target[i], W::default()), words, &[ValueOp::Xor], leading_sign);
            record.encoding = Encoding::Raw;
            record.changed_count = u32_len(words);
            record.value_layout = layout;
            value_streams(&values::split(target, layout), layout, None, settings)?.finish()
        }
        Some(base_bytes) => {
            let base_words = chunk_words::<W>(base_bytes, words);
            let base: &[W] = &base_words;
            let changed = changed_words(target, base);
            if changed.is_empty() {
                record.checksum = checksum64(&[]);
                return Ok(EncodedChunk { record, streams: Vec::new(), data: Vec::new() });
            }
            record.changed_count = u32_len(changed.len());
            let (op, layout) = choose_transform(
                |j| {
                    let i = changed[j] as usize;
                    (target[i], base[i])
                },
                changed.len(),
                &[ValueOp::Xor, ValueOp::Sub],
                leading_sign,
            );
            record.value_op = op;
            record.value_layout = layout;
            let density = changed.len() as f64 / words as f64;
            let (build_sparse, build_dense) = if density < ALWAYS_SPARSE_BELOW {
                (true, false)
            } else if density > ALWAYS_DENSE_ABOVE {
                (false, true)
            } else if settings.level >= MEASURE_FROM_LEVEL {
                (true, true)
            } else {
                // Predict both sizes from samples; build both only when it is close.
                let sparse_bits = positions_bits(density, words)
                    + bits_per_value(target, base, Some(&changed), op, layout) * changed.len() as f64;
                let dense_bits = bits_per_value(target, base, None, op, layout) * words as f64;
                let close = (sparse_bits - dense_bits).abs() < 0.1 * sparse_bits.min(dense_bits);
                let (sparse_bits, dense_bits, close) = if close && settings.rans && words >= KEYED_MIN_WORDS {
                    // Where order-0 cannot tell, lane rANS contexts often can.
                    let (sparse, dense) = keyed_bits(target, base, op, layout);
                    (sparse, dense, (sparse - dense).abs() < KEYED_DECISIVE_SHARE * sparse.min(dense))
                } else {
                    (sparse_bits, dense_bits, close)
                };
                (close || sparse_bits < dense_bits, close || dense_bits <= sparse_bits)
            };

            let sparse = if build_sparse {
                let values: Vec<W> =
                    changed.iter().map(|&i| W::express(target[i as usize], base[i as usize], op)).collect();
                let keys = || changed.iter().map(|&i| values::group_key(base[i as usize])).collect();
                let (order, value_set) = ordered_value_streams(&values, keys, layout, leading_sign, settings)?;
                let (coding, width, mut set) = position_streams(&changed, words, settings, reference)?;
                set.append(value_set);
                Some((coding, width, order, set))
            } else {
                None
            };
            let dense = if build_dense {
                let values: Vec<W> = target.iter().zip(base).map(|(&t, &b)| W::express(t, b, op)).collect();
                let keys = || values::group_keys(base);
                Some(ordered_value_streams(&values, keys, layout, leading_sign, settings)?)
            } else {
                None
            };
            match (sparse, dense) {
                (Some((coding, width, order, set)), dense)
                    if dense.as_ref().is_none_or(|(_, d)| set.data.len() < d.data.len()) =>
                {
                    record.encoding = Encoding::Sparse;
                    record.position_coding = coding;
                    record.gap_width = width;
                    record.value_order = order;
                    set
                }
                (_, Some((order, set))) => {
                    record.encoding = Encoding::Dense;
                    record.value_order = order;
                    set
                }
                (None, None) => unreachable!("one of the two is always built"),
                (Some(_), None) => unreachable!("handled by the first arm"),
            }
        }
    };
    record.stored_len = u32_len(streams.data.len());
    record.stream_count = u8::try_from(streams.records.len()).expect("at most 12 streams");
    record.checksum = checksum64(&streams.data);
    Ok(EncodedChunk { record, streams: streams.records, data: streams.data })
}

/// Checks that a chunk record and its stream records are consistent with a chunk of
/// `words` words of `width` (spec §8.1–§8.4). Needs no stored bytes.
///
/// # Errors
/// `E_CHUNK_MAP_INVALID` or `E_STREAM_LENGTH`.
pub fn check_chunk_shape(record: &ChunkRecord, streams: &[StreamRecord], words: u64, width: WordWidth) -> Result<()> {
    if words > crate::limits::MAX_CHUNK_WORDS {
        // A reader's spans never exceed it (H5); a caller of this public function may.
        return fail(ErrorCode::LimitExceeded, "a chunk holds at most MAX_CHUNK_WORDS words (spec §9)");
    }
    let m = u64::from(record.changed_count);
    let w = width.bytes_u64();
    let invalid = |what: &str| fail(ErrorCode::ChunkMapInvalid, what.to_owned());
    let (value_count, position_lens): (u64, Vec<u64>) = match record.encoding {
        Encoding::Unchanged => {
            let canonical = m == 0
                && record.value_order == ValueOrder::Positional
                && record.value_op == ValueOp::Xor
                && record.value_layout == ValueLayout::Words
                && record.position_coding == PositionCoding::None
                && record.gap_width == 0
                && record.stored_len == 0;
            if !canonical {
                return invalid("an unchanged chunk has fields that are not zero");
            }
            (0, Vec::new())
        }
        Encoding::Sparse => {
            if m == 0 || m > words {
                return invalid("a sparse chunk's changed count is outside 1..=words");
            }
            let lens = match (record.position_coding, record.gap_width) {
                (PositionCoding::Gaps, 1 | 2 | 4) => vec![m; usize::from(record.gap_width)],
                (PositionCoding::Bitmap, 0) => vec![words.div_ceil(8)],
                // Upper bounds: the exact lengths need the reference set (§8.3, D4).
                (PositionCoding::SplitByReference, 1 | 2 | 4) => std::iter::once(words.div_ceil(8))
                    .chain(std::iter::repeat_n(m, usize::from(record.gap_width)))
                    .collect(),
                _ => return invalid("a sparse chunk has no valid position coding and gap width"),
            };
            (m, lens)
        }
        Encoding::Dense | Encoding::Raw => {
            if record.position_coding != PositionCoding::None || record.gap_width != 0 {
                return invalid("only sparse chunks have positions");
            }
            let raw_fields_ok =
                m == words && record.value_op == ValueOp::Xor && record.value_order == ValueOrder::Positional;
            if m > words || (record.encoding == Encoding::Raw && !raw_fields_ok) {
                return invalid("the changed count, value op or value order does not fit the encoding");
            }
            (words, Vec::new())
        }
    };
    let value_streams =
        if record.encoding == Encoding::Unchanged { 0 } else { values::stream_count(record.value_layout, width) };
    if streams.len() != usize::from(record.stream_count) || streams.len() != position_lens.len() + value_streams {
        return invalid("the stream count does not fit the encoding");
    }
    let value_lens = match record.value_layout {
        ValueLayout::Words => value_count * w,
        _ => value_count,
    };
    let expected = position_lens.iter().copied().chain(std::iter::repeat(value_lens));
    let split = record.position_coding == PositionCoding::SplitByReference;
    let mut stored_total = 0u64;
    for (q, (stream, expected_len)) in streams.iter().zip(expected).enumerate() {
        let declared = u64::from(stream.decoded_len);
        let fits = if split && q < position_lens.len() {
            // Every gap plane is as long as the first (§8.3, coding 3).
            declared <= expected_len && (q < 2 || stream.decoded_len == streams[1].decoded_len)
        } else {
            declared == expected_len
        };
        if !fits {
            return fail(
                ErrorCode::StreamLength,
                format!("a stream declares {} decoded bytes where the chunk needs {expected_len}", stream.decoded_len),
            );
        }
        if stream.codec == Codec::Stored && stream.stored_len != stream.decoded_len {
            return fail(ErrorCode::StreamLength, "a stored stream's length differs from its decoded length");
        }
        if stream.codec == Codec::Constant && stream.stored_len != 1 {
            return fail(ErrorCode::StreamLength, "a constant stream stores other than one byte");
        }
        stored_total += u64::from(stream.stored_len);
    }
    if stored_total != u64::from(record.stored_len) {
        return invalid("the chunk's stored length is not the sum of its streams");
    }
    Ok(())
}

/// One stored chunk and what decoding it needs: its records, its stored bytes (all
/// streams back to back), the base bytes at its place (possibly shorter than the
/// chunk, or empty; `None` for a tensor without base), and its size in words.
#[derive(Debug, Clone, Copy)]
pub struct ChunkInput<'a> {
    /// The chunk record.
    pub record: &'a ChunkRecord,
    /// Its stream records, in order.
    pub streams: &'a [StreamRecord],
    /// Its stored bytes.
    pub stored: &'a [u8],
    /// The base bytes at the chunk's place.
    pub base: Option<&'a [u8]>,
    /// Words in the chunk.
    pub words: usize,
    /// The width of its words.
    pub width: WordWidth,
    /// The reference positions of a chunk with position coding 3 (spec §8.3): the
    /// set R, strictly increasing and below `words`; `None` when not given, which
    /// such a chunk refuses with `E_REFERENCE_REQUIRED`. Other chunks ignore it.
    pub reference: Option<&'a [u32]>,
}

impl ChunkInput<'_> {
    /// What every decoder checks first: the records against the chunk's size
    /// (spec §8.1–§8.4), then the stored bytes against their length and checksum
    /// (§6). Returns the chunk's length in bytes, computed only once the size is
    /// known to be bounded.
    fn check(&self) -> Result<usize> {
        check_chunk_shape(self.record, self.streams, self.words as u64, self.width)?;
        if self.stored.len() != self.record.stored_len as usize {
            return fail(ErrorCode::Truncated, "the chunk's stored bytes are cut short");
        }
        if checksum64(self.stored) != self.record.checksum {
            return fail(ErrorCode::ChunkChecksum, "the chunk's stored bytes do not match its checksum");
        }
        Ok(self.words * self.width.bytes())
    }

    /// The base words the chunk starts from (spec §11.2 D2): none for a raw chunk.
    fn base_words(&self) -> &[u8] {
        if self.record.encoding == Encoding::Raw {
            &[]
        } else {
            self.base.unwrap_or_default()
        }
    }

    /// Decodes the streams onto `out`, which holds the base words.
    fn rebuild(&self, out: Option<&mut [u8]>, scratch: &mut DecodeScratch) -> Result<()> {
        rebuild(self, out, scratch)
    }
}

/// Rebuilds one chunk into `out` (cleared first; `words` words after).
/// The stored bytes' checksum and the result's digest are both checked. Scratch
/// memory is allocated for this call and freed before it returns;
/// [`decode_chunk_with`] reuses it across calls.
///
/// # Errors
/// Any decoding error of spec §8, `E_CHUNK_CHECKSUM`, `E_CHUNK_DIGEST`, and
/// `E_OUT_OF_MEMORY` when a buffer cannot be allocated.
pub fn decode_chunk(chunk: &ChunkInput<'_>, out: &mut Vec<u8>) -> Result<()> {
    decode_chunk_with(chunk, out, &mut DecodeScratch::default())
}

/// As [`decode_chunk`], with scratch buffers that the caller keeps between chunks.
///
/// # Errors
/// As [`decode_chunk`].
pub fn decode_chunk_with(chunk: &ChunkInput<'_>, out: &mut Vec<u8>, scratch: &mut DecodeScratch) -> Result<()> {
    let len = chunk.check()?;
    let base = chunk.base_words();
    out.clear();
    try_reserve(out, len)?;
    // Written once: the base, then zeros past its end (spec §11.2 D2).
    out.extend_from_slice(&base[..base.len().min(len)]);
    out.resize(len, 0);
    chunk.rebuild(Some(out), scratch)
}

/// As [`decode_chunk_with`], into `out`, which must be exactly `words` words
/// long; its content on entry does not matter.
///
/// # Errors
/// As [`decode_chunk`], and `E_INVALID_ARGUMENT` when `out` has the wrong length.
pub fn decode_chunk_into(chunk: &ChunkInput<'_>, out: &mut [u8], scratch: &mut DecodeScratch) -> Result<()> {
    let len = chunk.check()?;
    if out.len() != len {
        return fail(ErrorCode::InvalidArgument, format!("the output holds {} bytes, not {len}", out.len()));
    }
    let base = chunk.base_words();
    let copied = base.len().min(len);
    out[..copied].copy_from_slice(&base[..copied]);
    out[copied..].fill(0);
    chunk.rebuild(Some(out), scratch)
}

/// Checks everything of a chunk that needs no base (spec §11.2 D1, D3, D4, D6): its
/// stored bytes against their checksum, its streams under the zstd profile, its
/// positions, and that its values change exactly `changed_count` words. Only the
/// rebuilt chunk's digest (D7) is left, which needs the base; `chunk.base` is not
/// read. Allocates scratch only, no output ([`DecodeCost::scratch`]).
///
/// # Errors
/// As [`decode_chunk`], except `E_CHUNK_DIGEST`.
pub fn check_chunk_payload(chunk: &ChunkInput<'_>, scratch: &mut DecodeScratch) -> Result<()> {
    chunk.check()?;
    chunk.rebuild(None, scratch)
}

/// Checks an unchanged chunk whose base covers it in full, without copying: the
/// rebuilt chunk is the base itself, so only its record, checksum and digest are
/// checked. Returns `false`, having checked nothing, for any other chunk.
///
/// # Errors
/// As [`decode_chunk`].
pub fn check_unchanged(chunk: &ChunkInput<'_>) -> Result<bool> {
    if chunk.record.encoding != Encoding::Unchanged {
        return Ok(false);
    }
    let Some(base) = chunk.base.filter(|b| chunk.words.checked_mul(chunk.width.bytes()) == Some(b.len())) else {
        return Ok(false);
    };
    chunk.check()?;
    if leaf_digest(base) != chunk.record.digest {
        return fail(ErrorCode::ChunkDigest, "the rebuilt chunk does not match its digest");
    }
    Ok(true)
}

/// The most bytes that decoding one chunk allocates, output included, from its
/// validated record: the output, the decoded zstd and rANS streams, the expanded positions
/// and the joined values (see [`crate::limits::DECODE_MEMORY_BUDGET`]). Call it
/// only on a record that [`check_chunk_shape`] accepted.
#[must_use]
pub fn decode_cost(record: &ChunkRecord, streams: &[StreamRecord], words: u64, width: WordWidth) -> DecodeCost {
    let w = width.bytes_u64();
    let decoded: u64 = streams.iter().filter(|s| s.codec != Codec::Stored).map(|s| u64::from(s.decoded_len)).sum();
    let m = u64::from(record.changed_count);
    let (positions, values) = match record.encoding {
        Encoding::Unchanged => (0, 0),
        // Coding 3 also holds its reference set, at most one entry per word.
        Encoding::Sparse if record.position_coding == PositionCoding::SplitByReference => (4 * m + 4 * words, m * w),
        Encoding::Sparse => (4 * m, m * w),
        Encoding::Dense | Encoding::Raw => (0, words * w),
    };
    DecodeCost { output: words * w, scratch: decoded + positions + values }
}

/// The bytes that decoding one chunk allocates; see [`decode_cost`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DecodeCost {
    /// The rebuilt chunk.
    pub output: u64,
    /// Buffers that live only while the chunk is decoded.
    pub scratch: u64,
}

/// Buffers reused from chunk to chunk: decoded zstd streams and expanded
/// positions. A caller that keeps one bounds what it keeps with
/// [`DecodeScratch::retained_bytes`].
#[derive(Debug, Default)]
pub struct DecodeScratch {
    streams: Vec<Vec<u8>>,
    positions: Vec<u32>,
}

impl DecodeScratch {
    /// Bytes this scratch holds allocated.
    #[must_use]
    pub fn retained_bytes(&self) -> u64 {
        let streams: usize = self.streams.iter().map(Vec::capacity).sum();
        (streams + self.positions.capacity() * 4) as u64
    }
}

/// Where a stream's decoded bytes are while a chunk is rebuilt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StreamState {
    /// A stored stream: its stored bytes.
    Stored,
    /// Decoded into its scratch buffer.
    Decoded,
    /// A lane rANS stream whose context needs other streams or the base first
    /// (spec §11.2 D3), with its table form.
    Waiting(rans::TableForm, ContextKind),
    /// A lane rANS stream whose context needs the base, which is not given: only
    /// its header is checked (spec §15.7).
    HeaderOnly,
}

/// The base-key context of a chunk's value streams (spec §8.7).
#[derive(Debug, Clone, Copy)]
enum BaseKeys<'a> {
    /// The chunk's place allows no base keys.
    NotAllowed,
    /// Allowed, but the base is not given.
    Absent,
    /// Allowed and given.
    Given(Contexts<'a>),
}

/// A chunk's streams as they are decoded: stored streams are read in place, the
/// others decoded into scratch buffers, one per stream.
struct ChunkStreams<'a, 's> {
    stored: &'a [u8],
    ranges: Vec<std::ops::Range<usize>>,
    records: &'a [StreamRecord],
    states: Vec<StreamState>,
    buffers: &'s mut [Vec<u8>],
}

impl ChunkStreams<'_, '_> {
    /// The decoded bytes of stream `q`, which must not be waiting.
    fn bytes(&self, q: usize) -> &[u8] {
        match self.states[q] {
            StreamState::Stored => &self.stored[self.ranges[q].clone()],
            _ => &self.buffers[q],
        }
    }

    /// Decodes waiting stream `q` with the context its place allows: the plane
    /// above (`q + 1`, when `plane_above` holds) or the base keys. A context the
    /// place does not allow is passed as none, which the codec refuses as
    /// `E_RANS_HEADER` (spec §8.7). A context that needs an absent base, directly
    /// or through the plane above, leaves only the header to check.
    fn decode_waiting(&mut self, q: usize, plane_above: bool, base_keys: BaseKeys<'_>) -> Result<()> {
        let StreamState::Waiting(form, kind) = self.states[q] else { return Ok(()) };
        let len = self.records[q].decoded_len as usize;
        let stored = &self.stored[self.ranges[q].clone()];
        let needs_absent_base = match kind {
            ContextKind::BaseKey => matches!(base_keys, BaseKeys::Absent),
            ContextKind::HigherPlane => plane_above && self.states[q + 1] == StreamState::HeaderOnly,
            ContextKind::None => false,
        };
        if needs_absent_base {
            rans::check_header(form, stored, len, kind)?;
            self.states[q] = StreamState::HeaderOnly;
            return Ok(());
        }
        let (below, above) = self.buffers.split_at_mut(q + 1);
        let contexts = match kind {
            ContextKind::HigherPlane if plane_above => Contexts::HigherPlane(match self.states[q + 1] {
                StreamState::Stored => &self.stored[self.ranges[q + 1].clone()],
                _ => &above[0],
            }),
            ContextKind::BaseKey => match base_keys {
                BaseKeys::Given(contexts) => contexts,
                _ => Contexts::None,
            },
            _ => Contexts::None,
        };
        rans::decode_into(form, stored, len, contexts, &mut below[q])?;
        self.states[q] = StreamState::Decoded;
        Ok(())
    }

    /// Decodes the waiting streams of one set of planes, most significant first, so
    /// that each plane's context is there before it is needed.
    fn decode_planes(
        &mut self,
        planes: std::ops::Range<usize>,
        planes_layout: bool,
        base_keys: BaseKeys<'_>,
    ) -> Result<()> {
        for q in planes.clone().rev() {
            self.decode_waiting(q, planes_layout && q + 1 < planes.end, base_keys)?;
        }
        Ok(())
    }

    fn any_header_only(&self, planes: std::ops::Range<usize>) -> bool {
        self.states[planes].contains(&StreamState::HeaderOnly)
    }
}

/// Joins the value streams and applies them to `out`; without `out`, only counts.
/// Returns the number of nonzero values.
fn apply_values<W: Word>(
    record: &ChunkRecord,
    streams: &[&[u8]],
    count: usize,
    out: Option<&mut [u8]>,
    positions: Option<&[u32]>,
) -> Result<usize> {
    if record.value_order == ValueOrder::Positional {
        return values::join_apply_positional::<W>(
            streams,
            count,
            record.value_layout,
            out,
            positions,
            record.value_op,
        );
    }
    let mut joined: Vec<W> = Vec::new();
    values::join(streams, count, record.value_layout, &mut joined)?;
    Ok(match out {
        Some(out) => values::apply::<W>(out, &joined, positions, record.value_order, record.value_op),
        // D6 counts values, whatever the base and the order they are applied in.
        None => joined.iter().filter(|&&v| v != W::default()).count(),
    })
}

/// Decodes a chunk's streams that need nothing else (stored, zstd, constant, lane rANS without
/// context) into `scratch`; the others wait for their context (spec §11.2 D3).
fn open_streams<'a, 's>(
    streams: &'a [StreamRecord],
    stored: &'a [u8],
    scratch: &'s mut DecodeScratch,
) -> Result<ChunkStreams<'a, 's>> {
    let mut ranges = Vec::with_capacity(streams.len());
    let mut at = 0usize;
    for stream in streams {
        ranges.push(at..at + stream.stored_len as usize);
        at += stream.stored_len as usize;
    }
    scratch.streams.resize_with(streams.len().max(scratch.streams.len()), Vec::new);
    let mut states = Vec::with_capacity(streams.len());
    for ((stream, range), buffer) in streams.iter().zip(&ranges).zip(&mut scratch.streams) {
        let bytes = &stored[range.clone()];
        states.push(match stream.codec {
            Codec::Stored => StreamState::Stored,
            Codec::Zstd => {
                buffer.clear();
                zstd_stream::decompress_into(bytes, stream.decoded_len as usize, buffer)?;
                StreamState::Decoded
            }
            Codec::Constant => {
                let [byte] = *bytes else {
                    return fail(ErrorCode::StreamLength, "a constant stream stores other than one byte");
                };
                buffer.clear();
                crate::limits::try_reserve(buffer, stream.decoded_len as usize)?;
                buffer.resize(stream.decoded_len as usize, byte);
                StreamState::Decoded
            }
            Codec::Rans | Codec::RansPacked => {
                let form = rans::TableForm::of_codec(stream.codec).expect("a lane rANS codec");
                match rans::context_kind(bytes)? {
                    ContextKind::None => {
                        rans::decode_into(form, bytes, stream.decoded_len as usize, Contexts::None, buffer)?;
                        StreamState::Decoded
                    }
                    kind => StreamState::Waiting(form, kind),
                }
            }
        });
    }
    Ok(ChunkStreams { stored, ranges, records: streams, states, buffers: &mut scratch.streams[..streams.len()] })
}

/// The number of position streams of a chunk (spec §8.5, Table 8.4).
fn position_stream_count(record: &ChunkRecord) -> usize {
    match (record.encoding, record.position_coding) {
        (Encoding::Sparse, PositionCoding::Gaps) => usize::from(record.gap_width),
        (Encoding::Sparse, PositionCoding::SplitByReference) => 1 + usize::from(record.gap_width),
        (Encoding::Sparse, _) => 1,
        _ => 0,
    }
}

/// Decodes and validates a sparse chunk's positions into `changed` (spec §11.2 D4).
fn decode_positions_into(
    record: &ChunkRecord,
    decoded: &mut ChunkStreams<'_, '_>,
    words: usize,
    reference: Option<&[u32]>,
    changed: &mut Vec<u32>,
) -> Result<()> {
    let m = record.changed_count as usize;
    let count = position_stream_count(record);
    match record.position_coding {
        PositionCoding::Gaps => {
            decoded.decode_planes(0..count, true, BaseKeys::NotAllowed)?;
            let planes: Vec<&[u8]> = (0..count).map(|q| decoded.bytes(q)).collect();
            positions::decode_gaps(&planes, m, words, changed)
        }
        PositionCoding::SplitByReference => {
            let Some(reference) = reference else {
                return fail(
                    ErrorCode::ReferenceRequired,
                    "the chunk codes its positions against a reference delta, which was not given",
                );
            };
            decoded.decode_planes(0..1, false, BaseKeys::NotAllowed)?;
            decoded.decode_planes(1..count, true, BaseKeys::NotAllowed)?;
            let planes: Vec<&[u8]> = (1..count).map(|q| decoded.bytes(q)).collect();
            positions::decode_split(decoded.bytes(0), &planes, m, words, reference, changed)
        }
        _ => {
            decoded.decode_planes(0..count, false, BaseKeys::NotAllowed)?;
            positions::decode_bitmap(decoded.bytes(0), m, words, changed)
        }
    }
}

/// The positions of one chunk as a reference set (spec §8.3): every word of a dense
/// or raw chunk, none of an unchanged one, the positions of a sparse one (checked
/// against the chunk's checksum, and decoded against `chunk.reference` for coding
/// 3). Only the position streams are decoded; values are not read.
///
/// # Errors
/// As [`decode_chunk`], for the records, the checksum and the position streams.
pub fn chunk_positions(chunk: &ChunkInput<'_>, out: &mut Vec<u32>, scratch: &mut DecodeScratch) -> Result<()> {
    chunk.check()?;
    out.clear();
    match chunk.record.encoding {
        Encoding::Unchanged => Ok(()),
        Encoding::Dense | Encoding::Raw => {
            try_reserve(out, chunk.words)?;
            #[allow(clippy::cast_possible_truncation)] // words ≤ MAX_CHUNK_WORDS
            out.extend(0..chunk.words as u32);
            Ok(())
        }
        Encoding::Sparse => {
            let mut decoded = open_streams(chunk.streams, chunk.stored, scratch)?;
            let mut positions = Vec::new();
            decode_positions_into(chunk.record, &mut decoded, chunk.words, chunk.reference, &mut positions)?;
            *out = positions;
            Ok(())
        }
    }
}

/// Decodes the streams and applies them to `out`, which holds the base words, then
/// checks the digest. Without `out`, checks the streams and counts the changed
/// words only; values coded against the base keys cannot be decoded without the
/// base, so then only their chunk's positions are checked (spec §15.7).
fn rebuild(chunk: &ChunkInput<'_>, mut out: Option<&mut [u8]>, scratch: &mut DecodeScratch) -> Result<()> {
    let (record, streams, words, width) = (chunk.record, chunk.streams, chunk.words, chunk.width);
    let m = record.changed_count as usize;
    let mut changed = std::mem::take(&mut scratch.positions);
    let mut decoded = open_streams(streams, chunk.stored, scratch)?;
    let position_count = position_stream_count(record);
    if out.is_none() && chunk.reference.is_none() && record.position_coding == PositionCoding::SplitByReference {
        // Positions against a reference delta that is not given: only the
        // position streams are checked (spec §15.7), as for values coded against
        // an absent base.
        decoded.decode_planes(0..1, false, BaseKeys::NotAllowed)?;
        decoded.decode_planes(1..position_count, true, BaseKeys::NotAllowed)?;
        return Ok(());
    }
    let value_count = match record.encoding {
        Encoding::Unchanged => 0,
        Encoding::Sparse => {
            decode_positions_into(record, &mut decoded, words, chunk.reference, &mut changed)?;
            m
        }
        Encoding::Dense | Encoding::Raw => words,
    };
    let positions = (record.encoding == Encoding::Sparse).then_some(changed.as_slice());

    let value_planes = position_count..streams.len();
    let planes_layout = record.value_layout != ValueLayout::Words;
    // §8.7: base keys only for positional values in byte planes against a base.
    let keys_allowed = planes_layout
        && matches!(record.encoding, Encoding::Sparse | Encoding::Dense)
        && record.value_order == ValueOrder::Positional;
    let base_keys = match out.as_deref() {
        _ if !keys_allowed => BaseKeys::NotAllowed,
        None => BaseKeys::Absent,
        Some(base) => BaseKeys::Given(Contexts::BaseKeys { base, word_bytes: width.bytes(), positions }),
    };
    decoded.decode_planes(value_planes.clone(), planes_layout, base_keys)?;
    if decoded.any_header_only(value_planes.clone()) {
        // Values coded against the base keys wait for the base (spec §15.7).
        return Ok(());
    }

    let value_streams: Vec<&[u8]> = value_planes.map(|q| decoded.bytes(q)).collect();
    let nonzero =
        with_word!(width, W => apply_values::<W>(record, &value_streams, value_count, out.as_deref_mut(), positions)?);
    if record.encoding != Encoding::Raw && nonzero != m {
        return fail(
            ErrorCode::ChangedCount,
            format!("the chunk declares {m} changed words but its values change {nonzero}"),
        );
    }
    if out.is_some_and(|out| leaf_digest(out) != record.digest) {
        return fail(ErrorCode::ChunkDigest, "the rebuilt chunk does not match its digest");
    }
    scratch.positions = changed;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input<'a>(chunk: &'a EncodedChunk, base: Option<&'a [u8]>, words: usize, width: WordWidth) -> ChunkInput<'a> {
        ChunkInput {
            record: &chunk.record,
            streams: &chunk.streams,
            stored: &chunk.data,
            base,
            words,
            width,
            reference: None,
        }
    }

    fn round_trip(target: &[u8], base: Option<&[u8]>, width: WordWidth) -> Encoding {
        let chunk = encode_chunk(target, base, width, true, EncodeSettings::default()).unwrap();
        let words = target.len() / width.bytes();
        let mut out = Vec::new();
        decode_chunk(&input(&chunk, base, words, width), &mut out).unwrap();
        assert_eq!(out, target);
        chunk.record.encoding
    }

    fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x.to_le_bytes()[3]
            })
            .collect()
    }

    /// A long plane is planned under the plane above only where a sample says it
    /// could store smaller than under the base keys; where it is, it wins.
    #[test]
    fn the_plane_above_is_planned_only_where_it_could_win() {
        let len = 4 * SAMPLE_ABOVE_FROM;
        let keys: Vec<u8> = pseudo_random(len, 1).iter().map(|k| k % 16).collect();
        let above = pseudo_random(len, 2);
        let noise = pseudo_random(len, 3);
        let contexts_of = |set: &StreamSet<'_>| -> Vec<ContextKind> {
            set.streams[0].contexts.iter().map(|context| context.kind()).collect()
        };

        let by_key: Vec<u8> = keys.iter().zip(&noise).map(|(k, n)| k * 3 + n % 2).collect();
        let planes = [by_key, above.clone()];
        let set = StreamSet::of_planes(&planes, true, Some(&keys), EncodeSettings::default()).unwrap();
        assert_eq!(contexts_of(&set), [ContextKind::BaseKey]);
        assert!(matches!(set.streams[0].choice, Choice::Rans(1)), "coded under the base keys");

        let by_above: Vec<u8> = above.iter().zip(&noise).map(|(a, n)| a / 16 + n % 2).collect();
        let planes = [by_above, above];
        let set = StreamSet::of_planes(&planes, true, Some(&keys), EncodeSettings::default()).unwrap();
        assert_eq!(contexts_of(&set), [ContextKind::HigherPlane, ContextKind::BaseKey]);
        assert!(matches!(set.streams[0].choice, Choice::Rans(1)), "coded under the plane above");
        assert_eq!(set.streams[0].plans.len(), 3, "planned under none and both contexts");
    }

    /// A plane that looks random under every context it may take is stored and
    /// planned under no context; one that its plane above or its base keys
    /// predict, or whose bytes are not random, is planned under them as before.
    #[test]
    fn a_plane_random_under_its_contexts_is_stored_unplanned() {
        let len = 4 * SAMPLE_ABOVE_FROM;
        let keys: Vec<u8> = pseudo_random(len, 1).iter().map(|k| k % 16).collect();
        let above = pseudo_random(len, 2);
        let noise = pseudo_random(len, 6);
        let planned = |plane: Vec<u8>| {
            let planes = [plane, above.clone()];
            let set = StreamSet::of_planes(&planes, true, Some(&keys), EncodeSettings::default()).unwrap();
            let contexts = set.streams[0].contexts.len();
            (contexts, matches!(set.streams[0].choice, Choice::Stored))
        };
        assert_eq!(planned(noise.clone()), (0, true), "random: stored, planned under no context");
        // Random alone, but a byte of the plane above gives away 2 of its bits.
        let by_above: Vec<u8> = above.iter().zip(&noise).map(|(a, n)| (a & 0xC0) | (n & 0x3F)).collect();
        assert_eq!(planned(by_above).0, 2, "planned under both contexts");
        // Random alone, but a base key gives away 2 of its bits: planned under the
        // base keys, which a sample says the plane above cannot beat.
        let by_key: Vec<u8> = keys.iter().zip(&noise).map(|(k, n)| (k << 6) | (n & 0x3F)).collect();
        assert_eq!(planned(by_key), (1, false), "planned under the base keys");
        // 7 bits a symbol: not random enough to be stored.
        assert_ne!(planned(noise.iter().map(|n| n & 0x7F).collect()).0, 0, "planned under a context");
    }

    /// Changes of weights in one stream of whole words (FP8 values, which take no
    /// context) are ruled out for zstd by their entropy as keyed planes are; any
    /// other stream without base keys still has zstd run on it.
    #[test]
    fn changes_of_weights_are_ruled_out_for_zstd_by_their_entropy() {
        // Bytes of a bit or more each, most of them one value: zstd's prefix code
        // spends a whole bit on it where lane rANS spends half of one.
        let plane: Vec<u8> =
            pseudo_random(1 << 20, 5).iter().map(|&b| if b % 4 == 0 { b % 9 + 1 } else { 0 }).collect();
        let planes = [plane];
        let keys = vec![0u8; planes[0].len()];
        let weights = value_streams(&planes, ValueLayout::Words, Some(&keys), EncodeSettings::default()).unwrap();
        assert!(weights.weight_changes);
        assert!(weights.streams[0].zstd.is_none(), "zstd is not run on changes of weights");
        let other = StreamSet::of(&planes, EncodeSettings::default()).unwrap();
        assert!(other.streams[0].zstd.is_some(), "zstd is run where matches may be");
    }

    /// The changed words are found at every density, block boundary and tail.
    #[test]
    fn every_encoding_is_chosen_and_round_trips() {
        let base = pseudo_random(8000, 1);
        assert_eq!(round_trip(&base, Some(&base), WordWidth::W2), Encoding::Unchanged);
        let mut sparse = base.clone();
        sparse[100] ^= 1;
        sparse[5000] ^= 0x80;
        assert_eq!(round_trip(&sparse, Some(&base), WordWidth::W2), Encoding::Sparse);
        let dense = pseudo_random(8000, 2);
        assert_eq!(round_trip(&dense, Some(&base), WordWidth::W4), Encoding::Dense);
        assert_eq!(round_trip(&dense, None, WordWidth::W8), Encoding::Raw);
        // A base shorter than the chunk reads as zeros past its end.
        assert_eq!(round_trip(&dense, Some(&base[..96]), WordWidth::W1), Encoding::Dense);
    }

    /// At 1.3% changed words a bitmap stores a little smaller than gaps, and
    /// codes ten times the symbols: the writer keeps gaps (§15.9).
    #[test]
    #[allow(clippy::cast_precision_loss, clippy::cast_possible_truncation, clippy::cast_sign_loss)] // test data
    fn gaps_are_kept_where_a_bitmap_saves_under_one_percent() {
        let words = 1 << 20;
        let base = pseudo_random(2 * words, 7);
        let coding = |seed: u64| {
            let mut target = base.clone();
            let mut x = seed;
            let mut unit = || {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ((x >> 11) + 1) as f64 / (1u64 << 53) as f64
            };
            // geometric gaps: each word changes with probability 1.3%
            let log_q = (1.0f64 - 0.013).ln();
            let mut i = (unit().ln() / log_q) as usize;
            while i < words {
                target[2 * i] ^= 1;
                i += 1 + (unit().ln() / log_q) as usize;
            }
            let chunk = encode_chunk(&target, Some(&base), WordWidth::W2, true, EncodeSettings::default()).unwrap();
            let mut out = Vec::new();
            decode_chunk(&input(&chunk, Some(&base), words, WordWidth::W2), &mut out).unwrap();
            assert_eq!(out, target);
            (chunk.record.encoding, chunk.record.position_coding)
        };
        // A seed whose bitmap stores a little smaller than its gaps: without
        // the 1% preference the writer keeps the bitmap.
        assert_eq!(coding(14u64.wrapping_mul(0x9E37_79B9_7F4A_7C15)), (Encoding::Sparse, PositionCoding::Gaps));
    }

    /// A plane of one repeated byte is stored as that byte (codec 3) when the
    /// settings allow it, and the chunk round-trips; without them, or where no
    /// compression is wanted, it is coded as before. A one-byte stream is never
    /// constant: its one byte stored saves nothing.
    #[test]
    fn a_plane_of_one_byte_repeated_is_a_constant_stream() {
        let base = pseudo_random(2 * 20_000, 3);
        let mut target = base.clone();
        for word in target.chunks_exact_mut(2) {
            word[0] ^= 0x5A; // every low byte changes alike; no high byte changes
        }
        let codecs = |settings: EncodeSettings| {
            let chunk = encode_chunk(&target, Some(&base), WordWidth::W2, true, settings).unwrap();
            let mut out = Vec::new();
            decode_chunk(&input(&chunk, Some(&base), 20_000, WordWidth::W2), &mut out).unwrap();
            assert_eq!(out, target);
            // the stored bytes of each constant stream
            let constant: Vec<Vec<u8>> = (0..chunk.streams.len())
                .filter(|&q| chunk.streams[q].codec == Codec::Constant)
                .map(|q| {
                    let at: usize = chunk.streams[..q].iter().map(|s| s.stored_len as usize).sum();
                    chunk.data[at..at + chunk.streams[q].stored_len as usize].to_vec()
                })
                .collect();
            (chunk.record.encoding, constant)
        };
        assert_eq!(codecs(EncodeSettings::default()), (Encoding::Dense, vec![vec![0x5A], vec![0]]));
        let without = EncodeSettings { constant: false, ..EncodeSettings::default() };
        assert!(codecs(without).1.is_empty());
        let uncompressed = EncodeSettings { min_zstd_gain: 1.0, ..EncodeSettings::default() };
        assert!(codecs(uncompressed).1.is_empty());
        assert!(!is_constant(&[7], EncodeSettings::default()) && !is_constant(&[], EncodeSettings::default()));
        assert!(is_constant(&[7, 7], EncodeSettings::default()) && !is_constant(&[7, 8], EncodeSettings::default()));
    }

    /// zstd is kept only where it saves `zstd_min_saving` bytes over lane rANS, unless
    /// the stream's set keeps zstd anyway; without lane rANS, or at 0, bytes alone
    /// decide.
    #[test]
    fn zstd_is_kept_where_it_saves_kilobytes_or_the_set_keeps_it_anyway() {
        // A pattern of 64 random bytes repeated: zstd stores any length of it in
        // about 100 bytes, lane rANS in about 6 bits a byte.
        let pattern = pseudo_random(64, 5);
        let repeating = |len: usize| -> Vec<u8> { pattern.iter().copied().cycle().take(len).collect() };
        let (small_gain, large_gain) = (repeating(2048), repeating(200_000));
        let codecs = |streams: &[Vec<u8>], settings: EncodeSettings| -> Vec<Codec> {
            let coded = StreamSet::of(streams, settings).unwrap().finish();
            coded.records.iter().map(|r| r.codec).collect()
        };
        let default = EncodeSettings::default();
        let bytes_alone = EncodeSettings { zstd_min_saving: 0, ..default };
        assert_eq!(codecs(std::slice::from_ref(&small_gain), default), [Codec::RansPacked]);
        assert_eq!(codecs(std::slice::from_ref(&small_gain), bytes_alone), [Codec::Zstd]);
        assert_eq!(codecs(&[large_gain.clone(), small_gain.clone()], default), [Codec::Zstd, Codec::Zstd]);
        let zstd_only = EncodeSettings { rans: false, constant: false, packed_tables: false, ..default };
        assert_eq!(codecs(&[small_gain], zstd_only), [Codec::Zstd]);
        assert_eq!(default.within_format_version("1.3").map(|s| s.zstd_min_saving), Some(0));
    }

    /// At level 1, where a length under the base keys is known, zstd is not run
    /// where the stream's order-0 entropy or a sample of its blocks says it could
    /// not be kept; it still runs, and is kept, where its matches win.
    #[test]
    fn zstd_is_not_run_where_its_entropy_or_a_sample_says_it_cannot_be_kept() {
        // Skewed bytes, about 2 bits each.
        let skewed: Vec<u8> =
            pseudo_random(1 << 19, 9).iter().map(|b| u8::try_from(b.trailing_zeros()).expect("at most 8")).collect();
        let bits = values::entropy_bits(&skewed);
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let half = (bits / 16.0) as usize;
        assert_eq!(
            compress_stream(&skewed, 1, Some(half), None).unwrap(),
            None,
            "half the entropy: zstd cannot be kept"
        );
        assert!(compress_stream(&skewed, 1, None, None).unwrap().is_some(), "nothing known: zstd runs");
        assert!(compress_stream(&skewed, 3, Some(half), None).unwrap().is_some(), "a higher level always runs zstd");

        // Too short for a sample of blocks: only the order-0 entropy can tell, and
        // does where the stream carries a bit a symbol or more.
        let short: Vec<u8> = pseudo_random(4096, 13).iter().map(|b| b & 0x0F).collect();
        let order0 = values::entropy_bits(&short);
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let below = (order0 / 8.0 / 1.2) as usize;
        assert!(compress_stream(&short, 1, Some(below), None).unwrap().is_some(), "no sample: zstd runs");
        assert_eq!(compress_stream(&short, 1, Some(below), Some(order0)).unwrap(), None, "the entropy rules it out");
        let runs: Vec<u8> = (0..4096).map(|i| u8::from(i % 37 == 0)).collect();
        let runs_bits = values::entropy_bits(&runs);
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let runs_below = (runs_bits / 8.0 / 1.2) as usize;
        assert!(runs_bits < 4096.0, "under a bit a symbol");
        assert!(
            compress_stream(&runs, 1, Some(runs_below), Some(runs_bits)).unwrap().is_some(),
            "under a bit a symbol, matches may beat the entropy: zstd runs"
        );

        // A repeated pattern under random base keys: the sample sees zstd's matches.
        let pattern = pseudo_random(64, 5);
        let repeating: Vec<u8> = pattern.iter().copied().cycle().take(1 << 19).collect();
        let keys = pseudo_random(1 << 19, 11);
        let planes = [repeating];
        let coded = StreamSet::of_planes(&planes, true, Some(&keys), EncodeSettings::default()).unwrap().finish();
        assert_eq!(coded.records[0].codec, Codec::Zstd);
    }

    /// Grouping by base key is weighed only where the positional planes' entropy
    /// under the base key leaves room for it: values unrelated to their keys are not
    /// regrouped, and values that follow more keys than eight tables can tell apart
    /// still are.
    #[test]
    fn grouping_is_weighed_where_the_base_key_context_leaves_room() {
        let words = 1 << 19;
        let noise = pseudo_random(3 * words, 17);
        // base words of 32 keys, shuffled along the chunk (spec §8.6: the key is the
        // top byte of the word rotated left by one bit)
        let key = |i: usize| noise[i] % 32;
        let base: Vec<u16> =
            (0..words).map(|i| (u16::from(key(i)) << 8 | u16::from(noise[words + i])).rotate_right(1)).collect();
        let chunk_of = |values: &dyn Fn(usize) -> u16| {
            let target: Vec<u8> = (0..words).flat_map(|i| (base[i] ^ values(i)).to_le_bytes()).collect();
            let base: Vec<u8> = base.iter().flat_map(|w| w.to_le_bytes()).collect();
            let chunk = encode_chunk(&target, Some(&base), WordWidth::W2, true, EncodeSettings::default()).unwrap();
            let mut out = Vec::new();
            decode_chunk(&input(&chunk, Some(&base), words, WordWidth::W2), &mut out).unwrap();
            assert_eq!(out, target);
            chunk.record.value_order
        };
        // The top byte takes one of two values per key: 32 keys in 8 tables leave
        // 3 bits a value that grouping saves.
        let keyed = |i: usize| (u16::from(key(i)) * 2 + u16::from(noise[2 * words + i] & 1)) << 8 | 0x80;
        assert_eq!(chunk_of(&keyed), ValueOrder::GroupedByBase);

        let unrelated = |i: usize| u16::from(noise[2 * words + i] & 0x0f) << 8 | 0x80;
        let planes = values::split(&(0..words).map(unrelated).collect::<Vec<u16>>(), ValueLayout::BytePlanes);
        let keys: Vec<u8> = (0..words).map(key).collect();
        let set = StreamSet::of_planes(&planes, true, Some(&keys), EncodeSettings::default()).unwrap();
        #[allow(clippy::cast_precision_loss)]
        let len = set.len() as f64;
        assert!(set.grouping_floor() >= (1.0 - GROUPING_GAIN) * len, "{} of {len}", set.grouping_floor());
        assert_eq!(chunk_of(&unrelated), ValueOrder::Positional);
    }

    /// The grouping estimate counts each group's streams where it meets the values;
    /// its numbers are those of gathering each group and splitting it into streams,
    /// bit for bit, for every layout and width.
    #[test]
    #[allow(clippy::cast_possible_truncation)]
    fn grouping_bits_are_those_of_gathered_and_split_groups() {
        fn reference<W: Word>(values: &[W], keys: &[u8], layout: ValueLayout) -> (f64, f64) {
            let corrected = |values: &[W]| -> f64 {
                values::split(values, layout)
                    .iter()
                    .map(|stream| {
                        let mut seen = [false; 256];
                        stream.iter().for_each(|&b| seen[usize::from(b)] = true);
                        let distinct = seen.iter().filter(|&&s| s).count() as f64;
                        values::entropy_bits(stream) + (distinct - 1.0).max(0.0) / (2.0 * std::f64::consts::LN_2)
                    })
                    .sum()
            };
            let step = values.len().div_ceil(SAMPLE_VALUES).max(1);
            let mut groups: Vec<Vec<W>> = vec![Vec::new(); 256];
            let mut whole = Vec::new();
            for j in (0..values.len()).step_by(step) {
                whole.push(values[j]);
                groups[usize::from(keys[j])].push(values[j]);
            }
            (groups.iter().filter(|g| !g.is_empty()).map(|g| corrected(g)).sum(), corrected(&whole))
        }
        fn check<W: Word>(make: impl Fn(u64) -> W) {
            for len in [0usize, 1, 100, 5000, 3 * SAMPLE_VALUES + 7] {
                let keys: Vec<u8> = pseudo_random(len, 7).iter().map(|&b| b % 37 * 7).collect();
                let noise = pseudo_random(len, 8);
                let values: Vec<W> = keys
                    .iter()
                    .zip(&noise)
                    .map(|(&k, &n)| make((u64::from(n) % (u64::from(k) + 2)) << (n % 3)))
                    .collect();
                for layout in [ValueLayout::BytePlanes, ValueLayout::RotatedBytePlanes, ValueLayout::Words] {
                    let (grouped, whole) = grouping_bits(&values, &keys, layout);
                    let (expected_grouped, expected_whole) = reference(&values, &keys, layout);
                    assert_eq!(grouped.to_bits(), expected_grouped.to_bits(), "{len} values, {layout:?}");
                    assert_eq!(whole.to_bits(), expected_whole.to_bits(), "{len} values, {layout:?}");
                }
            }
        }
        check(|x| x as u8);
        check(|x| (x as u16).rotate_left(9));
        check(|x| (x as u32).rotate_left(23));
        check(|x| x.rotate_left(52));
    }

    /// Where the base keys say which words change, a dense chunk codes the changes
    /// for nothing and a sparse one pays for every position: [`keyed_bits`] sees
    /// it, where order-0 predictions see two equal costs. Random changes at random
    /// places it predicts sparse.
    #[test]
    fn keyed_predictions_see_what_the_base_keys_say() {
        let words = 1 << 17;
        let noise = pseudo_random(3 * words, 23);
        // Keys 0 to 255 (spec §8.6), words of keys below 115 (45%) changed.
        let base: Vec<u16> = (0..words).map(|i| (u16::from(noise[i]) << 8 | 0x40).rotate_right(1)).collect();
        let follows_keys: Vec<u16> = base.iter().map(|&b| if values::group_key(b) < 115 { b ^ 1 } else { b }).collect();
        let (sparse, dense) = keyed_bits(&follows_keys, &base, ValueOp::Xor, ValueLayout::BytePlanes);
        assert!(dense < 0.5 * sparse, "dense {dense}, sparse {sparse}");
        let bytes = |w: &[u16]| -> Vec<u8> { w.iter().flat_map(|x| x.to_le_bytes()).collect() };
        assert_eq!(round_trip(&bytes(&follows_keys), Some(&bytes(&base)), WordWidth::W2), Encoding::Dense);

        let random: Vec<u16> = base
            .iter()
            .enumerate()
            .map(|(i, &b)| {
                let changes = noise[words + i] < 26; // about 10% of the words
                if changes {
                    b ^ u16::from_le_bytes([noise[2 * words + i], 1])
                } else {
                    b
                }
            })
            .collect();
        let (sparse, dense) = keyed_bits(&random, &base, ValueOp::Xor, ValueLayout::BytePlanes);
        assert!(sparse < (1.0 - KEYED_DECISIVE_SHARE) * dense, "dense {dense}, sparse {sparse}");
        assert_eq!(round_trip(&bytes(&random), Some(&bytes(&base)), WordWidth::W2), Encoding::Sparse);
    }

    /// A word width that no dtype has cannot be asked for; bad sizes are errors.
    #[test]
    fn bad_chunk_sizes_are_errors() {
        let bytes = [0u8; 12];
        assert!(WordWidth::try_from(3).is_err());
        let chunk = encode_chunk(&bytes, Some(&bytes), WordWidth::W4, false, EncodeSettings::default()).unwrap();
        let err = encode_chunk(&bytes[..10], None, WordWidth::W4, false, EncodeSettings::default()).unwrap_err();
        assert_eq!(err.code(), ErrorCode::InvalidArgument, "not whole words");
        let err = decode_chunk(&input(&chunk, None, usize::MAX / 2, WordWidth::W4), &mut Vec::new()).unwrap_err();
        assert_eq!(err.code(), ErrorCode::LimitExceeded, "a chunk size that would overflow");
    }

    #[test]
    fn corruption_is_caught() {
        let base = pseudo_random(4096, 3);
        let mut target = base.clone();
        target[10] ^= 4;
        let chunk = encode_chunk(&target, Some(&base), WordWidth::W2, true, EncodeSettings::default()).unwrap();
        let mut data = chunk.data.clone();
        data[0] ^= 1;
        let err = decode_chunk(
            &ChunkInput { stored: &data, ..input(&chunk, Some(&base), 2048, WordWidth::W2) },
            &mut Vec::new(),
        )
        .unwrap_err();
        assert_eq!(err.code(), ErrorCode::ChunkChecksum);
        let mut other_base = base.clone();
        other_base[0] ^= 1;
        let err = decode_chunk(&input(&chunk, Some(&other_base), 2048, WordWidth::W2), &mut Vec::new()).unwrap_err();
        assert_eq!(err.code(), ErrorCode::ChunkDigest);
    }

    /// Words are read in place where they lie aligned and copied where they do
    /// not; either way a chunk encodes to the same bytes, a base shorter than
    /// the target included.
    #[test]
    fn misaligned_words_encode_as_aligned_ones() {
        for (width, bytes) in [(WordWidth::W2, 2), (WordWidth::W4, 4), (WordWidth::W8, 8)] {
            let words = 3000;
            let base = pseudo_random(words * bytes, 5);
            let mut target = base.clone();
            for (i, byte) in target.iter_mut().enumerate().step_by(7 * bytes) {
                *byte ^= u8::try_from(i % 251).unwrap() | 1;
            }
            let short_base = &base[..(words - 100) * bytes];
            // the same bytes one place past the start of an allocation, which is
            // aligned to at least 8 bytes
            let shifted = |bytes: &[u8]| {
                let mut v = vec![0u8; bytes.len() + 1];
                v[1..].copy_from_slice(bytes);
                v
            };
            for base in [&base[..], short_base] {
                let aligned = encode_chunk(&target, Some(base), width, true, EncodeSettings::default()).unwrap();
                let (t, b) = (shifted(&target), shifted(base));
                assert_ne!(t[1..].as_ptr() as usize % bytes, 0, "the copy is misaligned");
                let misaligned = encode_chunk(&t[1..], Some(&b[1..]), width, true, EncodeSettings::default()).unwrap();
                assert_eq!(format!("{:?}", aligned.record), format!("{:?}", misaligned.record));
                assert_eq!(aligned.data, misaligned.data);
                let mut out = Vec::new();
                decode_chunk(&input(&aligned, Some(base), words, width), &mut out).unwrap();
                assert_eq!(out, target);
            }
        }
    }
}
