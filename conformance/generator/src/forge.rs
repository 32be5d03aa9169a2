//! Delta files whose chunks use exactly the encoding, value op, layout, position
//! coding and codec that a case asks for. The library's encoder picks these by
//! measured size; here each chunk is built from the spec and handed to the
//! library's `DeltaWriter`, so the container framing is the library's own.

use std::collections::BTreeMap;
use std::path::Path;

use tpde::{
    format::{
        encode_chunk, ChunkRecord, Codec, DeltaWriter, EncodedChunk, Encoding, Header, PositionCoding, StreamRecord,
        TargetFile, TargetLayout, ValueLayout, ValueOp, ValueOrder,
    },
    BaseTensor, EncodeSettings, LayoutKind, TensorEntry, WordWidth,
};
use xxhash_rust::xxh3::{xxh3_128, xxh3_64};

use crate::rans::{self, Ctx};
use crate::safet::{self, Tensor};
use crate::words;

/// The settings of the library's encoder for every case that existed before format
/// 1.1: without lane rANS or constant streams, so that regenerating them changes
/// no byte.
pub fn settings_1_0() -> EncodeSettings {
    EncodeSettings { rans: false, constant: false, packed_tables: false, ..EncodeSettings::default() }
}

/// The writer string of every generated file, so that goldens do not change with
/// the crate version.
pub const WRITER: &str = "tpde-conformance-generator";

/// How one stream is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Store {
    /// Codec 0.
    Stored,
    /// Codec 1.
    Zstd,
    /// Codec 2 with this context (spec §8.7). The plane above is written as no
    /// context on a stream that has no plane above.
    Rans(Ctx),
    /// Codec 3 (spec §8.8); the stream's bytes must all be equal.
    Constant,
    /// Codec 4 with this context: codec 2 with its context map and tables packed
    /// (spec §8.9).
    RansPacked(Ctx),
}

/// Exactly how one chunk is stored.
#[derive(Debug, Clone, Copy)]
pub struct Force {
    /// The encoding.
    pub encoding: Encoding,
    /// The value op (xor for raw and unchanged).
    pub op: ValueOp,
    /// The value layout.
    pub layout: ValueLayout,
    /// The position coding (sparse only).
    pub coding: PositionCoding,
    /// A gap width wider than needed, or `None` for the narrowest.
    pub gap_width: Option<u8>,
    /// The codec of every stream (stored or zstd) that neither `rans` nor
    /// `overrides` names.
    pub codec: Codec,
    /// Values grouped by base key (§8.6) rather than positional.
    pub grouped: bool,
    /// Lane rANS for every stream: the context of the position streams and of the
    /// value streams.
    pub rans: Option<(Ctx, Ctx)>,
    /// Those lane rANS streams as codec 4 rather than codec 2.
    pub packed: bool,
    /// How stream `q` is stored, whatever `codec` and `rans` say.
    pub overrides: [Option<Store>; 12],
    /// How lane rANS streams are encoded.
    pub params: rans::Params,
}

impl Force {
    /// A forced chunk with xor, words, no positions, stored streams.
    pub const fn new(encoding: Encoding) -> Self {
        Self {
            encoding,
            op: ValueOp::Xor,
            layout: ValueLayout::Words,
            coding: PositionCoding::None,
            gap_width: None,
            codec: Codec::Stored,
            grouped: false,
            rans: None,
            packed: false,
            overrides: [None; 12],
            params: rans::Params { prob_bits: 11, tile_log2: 12, max_tables: 8 },
        }
    }
    /// With a value op.
    pub const fn op(mut self, op: ValueOp) -> Self {
        self.op = op;
        self
    }
    /// With a value layout.
    pub const fn layout(mut self, layout: ValueLayout) -> Self {
        self.layout = layout;
        self
    }
    /// Sparse with gaps of the narrowest width.
    pub const fn gaps(mut self) -> Self {
        self.coding = PositionCoding::Gaps;
        self
    }
    /// Sparse with gaps of this width.
    pub const fn gap_width(mut self, width: u8) -> Self {
        self.coding = PositionCoding::Gaps;
        self.gap_width = Some(width);
        self
    }
    /// Sparse with a bitmap.
    pub const fn bitmap(mut self) -> Self {
        self.coding = PositionCoding::Bitmap;
        self
    }
    /// With zstd streams.
    pub const fn zstd(mut self) -> Self {
        self.codec = Codec::Zstd;
        self
    }
    /// With values grouped by base key.
    pub const fn grouped(mut self) -> Self {
        self.grouped = true;
        self
    }
    /// With lane rANS streams: `positions` is the context of the position streams,
    /// `values` that of the value streams.
    pub const fn rans(mut self, positions: Ctx, values: Ctx) -> Self {
        self.rans = Some((positions, values));
        self
    }
    /// With packed lane rANS streams (codec 4): `positions` is the context of the
    /// position streams, `values` that of the value streams.
    pub const fn packed_rans(mut self, positions: Ctx, values: Ctx) -> Self {
        self.rans = Some((positions, values));
        self.packed = true;
        self
    }
    /// Stream `q` (position streams first) stored as `store`.
    pub const fn stream(mut self, q: usize, store: Store) -> Self {
        self.overrides[q] = Some(store);
        self
    }
    /// Lane rANS tiles of `2^log2` symbols.
    pub const fn tile_log2(mut self, log2: u8) -> Self {
        self.params.tile_log2 = log2;
        self
    }
    /// Lane rANS frequencies summing to `2^bits`.
    pub const fn prob_bits(mut self, bits: u8) -> Self {
        self.params.prob_bits = bits;
        self
    }
    /// At most this many lane rANS tables per stream.
    pub const fn max_tables(mut self, tables: usize) -> Self {
        self.params.max_tables = tables;
        self
    }
}

/// How a chunk is encoded: by the library's encoder, or forced.
#[derive(Debug, Clone, Copy)]
pub enum Plan {
    /// The library's choice.
    Auto,
    /// Exactly this.
    Forced(Force),
}

/// One chunk's target bytes, base bytes (`None` without a base) and plan.
pub type ChunkInput<'a> = (&'a [u8], Option<&'a [u8]>, Plan);

/// One tensor of a delta: its target, the base tensor it is encoded against (if
/// any), the chunk size and a plan per chunk (the last plan repeats).
#[derive(Debug, Clone)]
pub struct Entry {
    /// The target tensor.
    pub target: Tensor,
    /// The base counterpart.
    pub base: Option<Tensor>,
    /// Words per chunk.
    pub chunk_words: u64,
    /// Plans per chunk; empty means `Auto` throughout.
    pub plans: Vec<Plan>,
}

impl Entry {
    /// A tensor encoded by the library's choice.
    pub fn auto(target: Tensor, base: Option<Tensor>, chunk_words: u64) -> Self {
        Self { target, base, chunk_words, plans: Vec::new() }
    }
    /// A tensor whose every chunk is forced.
    pub fn forced(target: Tensor, base: Option<Tensor>, chunk_words: u64, plans: &[Force]) -> Self {
        Self { target, base, chunk_words, plans: plans.iter().map(|&f| Plan::Forced(f)).collect() }
    }

    /// Each chunk's target bytes, base bytes (possibly shorter, `None` without a
    /// base) and plan.
    pub fn chunks(&self) -> Vec<ChunkInput<'_>> {
        let bytes = &self.target.bytes;
        let chunk_bytes = usize::try_from(self.chunk_words).expect("small") * safet::word_bytes(self.target.dtype);
        (0..bytes.len())
            .step_by(chunk_bytes)
            .enumerate()
            .map(|(k, start)| {
                let end = (start + chunk_bytes).min(bytes.len());
                let base = self.base.as_ref().map(|b| &b.bytes[start.min(b.bytes.len())..end.min(b.bytes.len())]);
                let plan = self.plans.get(k).or(self.plans.last()).copied().unwrap_or(Plan::Auto);
                (&bytes[start..end], base, plan)
            })
            .collect()
    }

    /// Chunk `k` planned; it must be forced.
    pub fn plan(&self, k: usize) -> Planned {
        let (target, base, plan) = self.chunks()[k];
        let Plan::Forced(force) = plan else { panic!("chunk {k} of {} is not forced", self.target.name) };
        plan_chunk(target, base, safet::word_bytes(self.target.dtype), force)
    }
}

/// Stored bytes of one stream under `codec`.
fn store(raw: &[u8], codec: Codec, stored: Vec<u8>) -> (StreamRecord, Vec<u8>) {
    let record = StreamRecord {
        stored_len: u32::try_from(stored.len()).expect("small"),
        decoded_len: u32::try_from(raw.len()).expect("small"),
        codec,
    };
    (record, stored)
}

/// A chunk before its streams are stored: what `force` makes of the target and
/// base words.
#[derive(Debug, Clone)]
pub struct Planned {
    /// The force it follows.
    pub force: Force,
    /// The decoded bytes of every stream, position streams first.
    pub raw: Vec<Vec<u8>>,
    /// How many of them are position streams.
    pub position_streams: usize,
    /// The base key (§8.6) of each value's base word, in positional order, for
    /// sparse and dense chunks.
    pub keys: Vec<u8>,
    /// The chunk record's `changed_count`.
    pub changed_count: usize,
    /// The chunk record's `gap_width`.
    pub gap_width: u8,
    /// Values grouped by base key.
    pub grouped: bool,
}

impl Planned {
    /// The streams of the set (positions or values) that stream `q` belongs to, if
    /// they are byte planes; `None` for a bitmap or the words layout.
    fn plane_set(&self, q: usize) -> Option<std::ops::Range<usize>> {
        if q < self.position_streams {
            (self.force.coding == PositionCoding::Gaps).then_some(0..self.position_streams)
        } else {
            (self.force.layout != ValueLayout::Words).then_some(self.position_streams..self.raw.len())
        }
    }

    /// Whether context 1 is allowed in stream `q` (spec §8.7).
    pub fn base_key_allowed(&self, q: usize) -> bool {
        q >= self.position_streams
            && self.force.layout != ValueLayout::Words
            && matches!(self.force.encoding, Encoding::Sparse | Encoding::Dense)
            && !self.grouped
    }

    /// The context that stream `q` is coded with for `ctx`: the plane above only
    /// where there is one, else none.
    pub fn effective(&self, q: usize, ctx: Ctx) -> Ctx {
        match ctx {
            Ctx::HigherPlane if self.plane_set(q).is_some_and(|set| q + 1 < set.end) => Ctx::HigherPlane,
            Ctx::HigherPlane => Ctx::None,
            other => other,
        }
    }

    /// The context byte of each symbol of stream `q` under `ctx` (zeros for none).
    pub fn contexts(&self, q: usize, ctx: Ctx) -> Vec<u8> {
        match self.effective(q, ctx) {
            Ctx::None => vec![0; self.raw[q].len()],
            Ctx::HigherPlane => self.raw[q + 1].clone(),
            Ctx::BaseKey => {
                assert!(self.base_key_allowed(q), "context 1 is not allowed in stream {q}");
                assert_eq!(self.keys.len(), self.raw[q].len(), "one key per value");
                self.keys.clone()
            }
        }
    }

    /// Stream `q` as lane rANS under `ctx`; checked by decoding it back.
    pub fn rans(&self, q: usize, ctx: Ctx) -> rans::Stream {
        let contexts = self.contexts(q, ctx);
        let stream = rans::Stream::encode(&self.raw[q], self.effective(q, ctx), &contexts, self.force.params);
        assert_eq!(stream.decode(self.raw[q].len(), &contexts).as_deref(), Ok(&self.raw[q][..]), "rANS round trip");
        stream
    }

    /// How stream `q` is stored.
    pub fn store_of(&self, q: usize) -> Store {
        let rans = |ctx| if self.force.packed { Store::RansPacked(ctx) } else { Store::Rans(ctx) };
        self.force.overrides[q].unwrap_or(match (self.force.rans, self.force.codec) {
            (Some((positions, _)), _) if q < self.position_streams => rans(positions),
            (Some((_, values)), _) => rans(values),
            (None, Codec::Zstd) => Store::Zstd,
            (None, _) => Store::Stored,
        })
    }
}

/// Plans one chunk exactly as `force` says. `base` holds the base bytes at the
/// chunk's place, possibly shorter than the chunk; `None` for a tensor without base.
pub fn plan_chunk(target: &[u8], base: Option<&[u8]>, word_bytes: usize, force: Force) -> Planned {
    let t = words::load(target, word_bytes);
    let n = t.len();
    let mut b = words::load(base.unwrap_or_default(), word_bytes);
    b.resize(n, 0);
    let changed: Vec<u64> = (0..n).filter(|&i| t[i] != b[i]).map(|i| i as u64).collect();
    let express = |i: usize| words::express(t[i], b[i], force.op, word_bytes);
    let mut raw_streams: Vec<Vec<u8>> = Vec::new();
    let mut gap_width = 0;
    let (changed_count, values): (usize, Vec<u64>) = match force.encoding {
        Encoding::Unchanged => {
            assert!(changed.is_empty(), "an unchanged chunk changes nothing");
            (0, Vec::new())
        }
        Encoding::Sparse => {
            assert!(!changed.is_empty(), "a sparse chunk changes something");
            match force.coding {
                PositionCoding::Gaps => {
                    let gaps = words::gaps_of(&changed);
                    gap_width = force.gap_width.unwrap_or_else(|| words::gap_width(&gaps));
                    raw_streams.extend(words::gap_planes(&gaps, gap_width));
                }
                PositionCoding::Bitmap => raw_streams.push(words::bitmap(&changed, n)),
                PositionCoding::None => panic!("a sparse chunk needs a position coding"),
                // Coding 3 needs a reference delta: its cases come from the library's writer.
                PositionCoding::SplitByReference => panic!("coding 3 is not forged"),
            }
            (changed.len(), changed.iter().map(|&i| express(usize::try_from(i).expect("small"))).collect())
        }
        Encoding::Dense => (changed.len(), (0..n).map(express).collect()),
        Encoding::Raw => {
            assert!(matches!(force.op, ValueOp::Xor), "raw chunks use xor");
            (n, t.clone())
        }
    };
    let position_streams = raw_streams.len();
    let grouped = force.grouped && matches!(force.encoding, Encoding::Sparse | Encoding::Dense);
    let word_of =
        |l: usize| if force.encoding == Encoding::Sparse { usize::try_from(changed[l]).expect("small") } else { l };
    let keys: Vec<u8> = match force.encoding {
        Encoding::Sparse | Encoding::Dense => {
            (0..values.len()).map(|l| words::base_key(b[word_of(l)], word_bytes)).collect()
        }
        _ => Vec::new(),
    };
    let values = if grouped {
        // A stable sort of the positional list by the base key of each value's word.
        let mut order: Vec<usize> = (0..values.len()).collect();
        order.sort_by_key(|&l| keys[l]);
        order.iter().map(|&l| values[l]).collect()
    } else {
        values
    };
    if force.encoding != Encoding::Unchanged {
        raw_streams.extend(words::split(&values, force.layout, word_bytes));
    }
    Planned { force, raw: raw_streams, position_streams, keys, changed_count, gap_width, grouped }
}

/// Builds one chunk exactly as `force` says. `base` holds the base bytes at the
/// chunk's place, possibly shorter than the chunk; `None` for a tensor without base.
pub fn forced_chunk(target: &[u8], base: Option<&[u8]>, word_bytes: usize, force: Force) -> EncodedChunk {
    let planned = plan_chunk(target, base, word_bytes, force);
    let mut streams = Vec::new();
    let mut data = Vec::new();
    for (q, raw) in planned.raw.iter().enumerate() {
        let (record, stored) = match planned.store_of(q) {
            Store::Stored => store(raw, Codec::Stored, raw.clone()),
            Store::Zstd => store(raw, Codec::Zstd, crate::zframe::compress(raw)),
            Store::Rans(ctx) => store(raw, Codec::Rans, planned.rans(q, ctx).to_bytes()),
            Store::RansPacked(ctx) => store(raw, Codec::RansPacked, planned.rans(q, ctx).into_packed().to_bytes()),
            Store::Constant => {
                assert!(raw.iter().all(|&b| b == raw[0]), "stream {q} is not constant");
                store(raw, Codec::Constant, raw[..1].to_vec())
            }
        };
        streams.push(record);
        data.extend_from_slice(&stored);
    }
    let unchanged = force.encoding == Encoding::Unchanged;
    let record = ChunkRecord {
        data_offset: 0,
        stored_len: u32::try_from(data.len()).expect("small"),
        changed_count: u32::try_from(planned.changed_count).expect("small"),
        first_stream: 0,
        encoding: force.encoding,
        value_op: if unchanged { ValueOp::Xor } else { force.op },
        value_layout: if unchanged { ValueLayout::Words } else { force.layout },
        position_coding: if force.encoding == Encoding::Sparse { force.coding } else { PositionCoding::None },
        gap_width: planned.gap_width,
        stream_count: u8::try_from(streams.len()).expect("small"),
        value_order: if planned.grouped { ValueOrder::GroupedByBase } else { ValueOrder::Positional },
        checksum: xxh3_64(&data),
        digest: xxh3_128(target).to_be_bytes(),
    };
    EncodedChunk { record, streams, data }
}

/// The tree digest (spec §10) of `bytes` in chunks of `chunk_bytes`, in hex.
pub fn tree_hex(bytes: &[u8], chunk_bytes: usize) -> String {
    let leaves: Vec<u8> = bytes.chunks(chunk_bytes).flat_map(|c| xxh3_128(c).to_be_bytes()).collect();
    hex::encode(xxh3_128(&leaves).to_be_bytes())
}

/// Writes a single-file delta of `entries` to `path`; returns the target
/// safetensors file.
pub fn write_delta(path: &Path, entries: &[Entry], metadata: Option<&BTreeMap<String, String>>) -> Vec<u8> {
    let targets: Vec<Tensor> = entries.iter().map(|e| e.target.clone()).collect();
    let (target_file, target_header) = safet::file(&targets, metadata);
    let mut writer = DeltaWriter::create(path).expect("create the delta");
    let mut tensors = Vec::new();
    for entry in entries {
        let t = &entry.target;
        let wb = safet::word_bytes(t.dtype);
        let chunk_bytes = usize::try_from(entry.chunk_words).expect("small") * wb;
        let first_chunk = writer.chunk_count();
        let leading_sign = matches!(t.dtype, "F16" | "BF16" | "F32" | "F64" | "C64");
        for (target, base, plan) in entry.chunks() {
            let chunk = match plan {
                Plan::Auto => {
                    let width = WordWidth::try_from(wb).expect("a word width");
                    encode_chunk(target, base, width, leading_sign, settings_1_0()).expect("encodes")
                }
                Plan::Forced(force) => forced_chunk(target, base, wb, force),
            };
            writer.push_chunk(chunk).expect("write a chunk");
        }
        tensors.push(TensorEntry {
            name: t.name.clone(),
            dtype_name: t.dtype.to_owned(),
            shape: t.shape.clone(),
            file: 0,
            chunk_words: entry.chunk_words,
            first_chunk,
            chunk_count: writer.chunk_count() - first_chunk,
            digest: tree_hex(&t.bytes, chunk_bytes),
            base: entry
                .base
                .as_ref()
                .map(|b| BaseTensor { shape: b.shape.clone(), digest: tree_hex(&b.bytes, chunk_bytes) }),
        });
    }
    let header = Header {
        writer: WRITER.to_owned(),
        target: TargetLayout {
            kind: LayoutKind::File,
            files: vec![TargetFile { name: "model.safetensors".to_owned(), safetensors_header: target_header }],
            index_json: None,
        },
        tensors,
        position_reference: None,
        extensions: BTreeMap::new(),
    };
    writer.finish(&header).expect("finish the delta");
    target_file
}
