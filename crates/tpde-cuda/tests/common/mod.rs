//! Test support: a forced-choice chunk encoder, so that every encoding, value
//! op, layout and position coding is covered whatever the library's writer
//! would pick, and seeded data. Production encoding is the library's.
#![allow(dead_code, clippy::cast_possible_truncation)]

use tpde::format::{
    positions,
    rans::{Contexts, TableForm},
    ChunkRecord, Codec, EncodedChunk, Encoding, PositionCoding, StreamRecord, ValueLayout, ValueOp, ValueOrder,
};
use tpde_cuda::{EncodedTensor, WordWidth};

/// The encoding to force.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Choice {
    SparseGaps,
    SparseBitmap,
    Dense,
    Raw,
}

pub const CHOICES: [Choice; 4] = [Choice::SparseGaps, Choice::SparseBitmap, Choice::Dense, Choice::Raw];
pub const OPS: [ValueOp; 2] = [ValueOp::Xor, ValueOp::Sub];
pub const LAYOUTS: [ValueLayout; 3] = [ValueLayout::Words, ValueLayout::BytePlanes, ValueLayout::RotatedBytePlanes];

pub fn lcg(seed: u64) -> impl FnMut() -> u64 {
    let mut s = seed;
    move || {
        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        s >> 11
    }
}

pub fn read_word(bytes: &[u8], w: WordWidth, i: usize) -> u64 {
    let mut b = [0u8; 8];
    b[..w.bytes()].copy_from_slice(&bytes[i * w.bytes()..(i + 1) * w.bytes()]);
    u64::from_le_bytes(b)
}

pub fn write_word(bytes: &mut [u8], w: WordWidth, i: usize, v: u64) {
    bytes[i * w.bytes()..(i + 1) * w.bytes()].copy_from_slice(&v.to_le_bytes()[..w.bytes()]);
}

/// A base and a target with every `every`-th word changed.
pub fn pair(w: WordWidth, n: usize, every: usize, seed: u64) -> (Vec<u8>, Vec<u8>) {
    let mut r = lcg(seed);
    let base: Vec<u8> = (0..n * w.bytes()).map(|_| r() as u8).collect();
    let mut target = base.clone();
    for i in (0..n).step_by(every) {
        let mut v = r() & w.mask();
        if v == read_word(&base, w, i) {
            v ^= 1;
        }
        write_word(&mut target, w, i, v);
    }
    (base, target)
}

fn zigzag(d: u64, w: WordWidth) -> u64 {
    let sign = (d >> (w.bits() - 1)) & 1;
    ((d << 1) ^ 0u64.wrapping_sub(sign)) & w.mask()
}

/// The stored value that turns `b` into `t` (§8.2).
pub fn express(b: u64, t: u64, op: ValueOp, w: WordWidth) -> u64 {
    match op {
        ValueOp::Xor => b ^ t,
        ValueOp::Sub => zigzag(t.wrapping_sub(b) & w.mask(), w),
    }
}

fn split(values: &[u64], layout: ValueLayout, w: WordWidth) -> Vec<Vec<u8>> {
    let wb = w.bytes();
    match layout {
        ValueLayout::Words => vec![values.iter().flat_map(|v| v.to_le_bytes()[..wb].to_vec()).collect()],
        _ => (0..wb)
            .map(|k| {
                values
                    .iter()
                    .map(|&v| {
                        let v = if layout == ValueLayout::RotatedBytePlanes {
                            ((v << 1) | (v >> (w.bits() - 1))) & w.mask()
                        } else {
                            v
                        };
                        v.to_le_bytes()[k]
                    })
                    .collect()
            })
            .collect(),
    }
}

/// The chunk that turns `base` into `target` (same length) with the forced
/// encoding; an unchanged chunk when they are equal. Streams are zstd at
/// `level` where that is smaller, else stored. Values in positional order.
pub fn forced_chunk(
    base: &[u8],
    target: &[u8],
    w: WordWidth,
    choice: Choice,
    op: ValueOp,
    layout: ValueLayout,
    level: Option<i32>,
) -> EncodedChunk {
    forced_chunk_in(base, target, w, choice, op, layout, level, false)
}

/// Value orders to force: positional, grouped by base key.
pub const GROUPED: [bool; 2] = [false, true];

/// `values` (of the words `at`, in positional order) listed grouped by the
/// base key of each (spec §8.6): a stable sort by key.
pub fn group(values: &[u64], at: &[usize], base: &[u8], w: WordWidth) -> Vec<u64> {
    let keys: Vec<u8> = at.iter().map(|&i| tpde_cuda::reference::group_key(read_word(base, w, i), w)).collect();
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by_key(|&j| keys[j]); // stable
    order.iter().map(|&j| values[j]).collect()
}

/// [`forced_chunk`] with the values grouped by base key when `grouped`
/// (sparse and dense chunks; raw chunks stay positional).
#[allow(clippy::too_many_arguments)]
pub fn forced_chunk_in(
    base: &[u8],
    target: &[u8],
    w: WordWidth,
    choice: Choice,
    op: ValueOp,
    layout: ValueLayout,
    level: Option<i32>,
    grouped: bool,
) -> EncodedChunk {
    forced_chunk_coded(base, target, w, choice, op, layout, grouped, Codecs::Zstd(level))
}

/// How [`forced_chunk_coded`] stores each stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Codecs {
    /// zstd at this level where that is smaller, else stored.
    Zstd(Option<i32>),
    /// Lane rANS in every stream, with the contexts of the mix, its tables
    /// in the form given: codec 2 (spec §8.7) or codec 4 (§8.9).
    Rans(RansMix, TableForm),
    /// Lane rANS with tables in the form given, zstd and stored in turn
    /// (stream `q` takes `q mod 3`), with the richest contexts a lane rANS
    /// stream may use there.
    Mixed(TableForm),
}

/// Which contexts lane rANS streams use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RansMix {
    /// Context 0 everywhere.
    None,
    /// The top gap plane context 0, the others the plane above; the top
    /// value plane the base key where allowed, the others the plane above.
    Chained,
    /// Every value plane the base key where allowed, else as `Chained`.
    BaseKeys,
}

pub const RANS_MIXES: [RansMix; 3] = [RansMix::None, RansMix::Chained, RansMix::BaseKeys];

/// Both forms of lane rANS tables: codec 2's bytes and codec 4's packed bits.
pub const TABLE_FORMS: [TableForm; 2] = [TableForm::Bytes, TableForm::Packed];

/// Every context mix and the mix next to zstd and stored streams, in
/// `form`.
pub fn rans_codecs(form: TableForm) -> [Codecs; 4] {
    [
        Codecs::Rans(RansMix::None, form),
        Codecs::Rans(RansMix::Chained, form),
        Codecs::Rans(RansMix::BaseKeys, form),
        Codecs::Mixed(form),
    ]
}

/// The context that stream `q` of a chunk takes under `mix`: 0 none, 1 base
/// key, 2 plane above (spec §8.7 says where each is allowed).
fn context_for(mix: RansMix, record: &ChunkRecord, np: usize, q: usize, streams: usize) -> u8 {
    let planes = record.value_layout != ValueLayout::Words;
    let top = q + 1 == if q < np { np } else { streams };
    let key_ok = q >= np
        && planes
        && matches!(record.encoding, Encoding::Sparse | Encoding::Dense)
        && record.value_order == ValueOrder::Positional;
    let above_ok = !top && (q < np && record.position_coding == PositionCoding::Gaps || q >= np && planes);
    match mix {
        RansMix::None => 0,
        RansMix::BaseKeys if key_ok => 1,
        RansMix::Chained if key_ok && top => 1,
        _ if above_ok => 2,
        _ => 0,
    }
}

/// The chunk of [`forced_chunk_in`] with its streams stored by `codecs`.
#[allow(clippy::too_many_arguments)]
pub fn forced_chunk_coded(
    base: &[u8],
    target: &[u8],
    w: WordWidth,
    choice: Choice,
    op: ValueOp,
    layout: ValueLayout,
    grouped: bool,
    codecs: Codecs,
) -> EncodedChunk {
    let n = target.len() / w.bytes();
    let op = if choice == Choice::Raw { ValueOp::Xor } else { op };
    let changed: Vec<u32> =
        (0..n).filter(|&i| read_word(base, w, i) != read_word(target, w, i)).map(|i| i as u32).collect();
    let mut record = ChunkRecord {
        data_offset: 0,
        stored_len: 0,
        changed_count: changed.len() as u32,
        first_stream: 0,
        encoding: Encoding::Unchanged,
        value_op: ValueOp::Xor,
        value_layout: ValueLayout::Words,
        value_order: ValueOrder::Positional,
        position_coding: PositionCoding::None,
        gap_width: 0,
        stream_count: 0,
        checksum: tpde::format::checksum64(&[]),
        digest: tpde::format::leaf_digest(target),
    };
    if changed.is_empty() && choice != Choice::Raw {
        return EncodedChunk { record, streams: Vec::new(), data: Vec::new() };
    }
    record.value_op = op;
    record.value_layout = layout;
    let value_of = |i: usize| express(read_word(base, w, i), read_word(target, w, i), op, w);
    let (mut raw, values): (Vec<Vec<u8>>, Vec<u64>) = match choice {
        Choice::SparseGaps => {
            let gw = positions::gap_width(&changed);
            record.encoding = Encoding::Sparse;
            record.position_coding = PositionCoding::Gaps;
            record.gap_width = gw;
            let v = changed.iter().map(|&i| value_of(i as usize)).collect();
            (positions::encode_gaps(&changed, gw), v)
        }
        Choice::SparseBitmap => {
            record.encoding = Encoding::Sparse;
            record.position_coding = PositionCoding::Bitmap;
            let v = changed.iter().map(|&i| value_of(i as usize)).collect();
            (vec![positions::encode_bitmap(&changed, n)], v)
        }
        Choice::Dense => {
            record.encoding = Encoding::Dense;
            (Vec::new(), (0..n).map(value_of).collect())
        }
        Choice::Raw => {
            record.encoding = Encoding::Raw;
            record.changed_count = n as u32;
            (Vec::new(), (0..n).map(|i| read_word(target, w, i)).collect())
        }
    };
    let values = if grouped && choice != Choice::Raw {
        record.value_order = ValueOrder::GroupedByBase;
        let at: Vec<usize> = match choice {
            Choice::Dense => (0..n).collect(),
            _ => changed.iter().map(|&i| i as usize).collect(),
        };
        group(&values, &at, base, w)
    } else {
        values
    };
    let np = raw.len();
    raw.extend(split(&values, layout, w));
    let mut streams = Vec::new();
    let mut data = Vec::new();
    let positions = (record.encoding == Encoding::Sparse).then_some(changed.as_slice());
    for (q, s) in raw.iter().enumerate() {
        let zstd = |level: Option<i32>| {
            let z = level.map(|l| tpde::format::zstd::compress(s, tpde::format::zstd::Effort::Level(l)).unwrap());
            match z {
                Some(z) if z.len() < s.len() => (Codec::Zstd, z),
                _ => (Codec::Stored, s.clone()),
            }
        };
        let rans = |mix: RansMix, form: TableForm| {
            let contexts = match context_for(mix, &record, np, q, raw.len()) {
                1 => Contexts::BaseKeys { base, word_bytes: w.bytes(), positions },
                2 => Contexts::HigherPlane(&raw[q + 1]),
                _ => Contexts::None,
            };
            (form.codec(), tpde::format::rans::encode(form, s, contexts))
        };
        let (codec, bytes) = match codecs {
            Codecs::Zstd(level) => zstd(level),
            Codecs::Rans(mix, form) => rans(mix, form),
            Codecs::Mixed(form) => match q % 3 {
                0 => rans(RansMix::Chained, form),
                1 => zstd(Some(1)),
                _ => zstd(None),
            },
        };
        streams.push(StreamRecord { stored_len: bytes.len() as u32, decoded_len: s.len() as u32, codec });
        data.extend_from_slice(&bytes);
    }
    record.stream_count = streams.len() as u8;
    record.stored_len = data.len() as u32;
    record.checksum = tpde::format::checksum64(&data);
    EncodedChunk { record, streams, data }
}

/// A whole tensor of forced chunks of `chunk_words` words.
#[allow(clippy::too_many_arguments)]
pub fn forced_tensor(
    base: &[u8],
    target: &[u8],
    w: WordWidth,
    chunk_words: usize,
    choice: Choice,
    op: ValueOp,
    layout: ValueLayout,
    level: Option<i32>,
) -> EncodedTensor {
    forced_tensor_in(base, target, w, chunk_words, choice, op, layout, level, false)
}

/// [`forced_tensor`] with the values grouped by base key when `grouped`.
#[allow(clippy::too_many_arguments)]
pub fn forced_tensor_in(
    base: &[u8],
    target: &[u8],
    w: WordWidth,
    chunk_words: usize,
    choice: Choice,
    op: ValueOp,
    layout: ValueLayout,
    level: Option<i32>,
    grouped: bool,
) -> EncodedTensor {
    tensor_of_chunks(base, target, w, chunk_words, |b, t| forced_chunk_in(b, t, w, choice, op, layout, level, grouped))
}

/// Tensor "t" of `target`, cut into chunks of `chunk_words` words, each encoded
/// by `chunk` from its base and target bytes.
fn tensor_of_chunks(
    base: &[u8],
    target: &[u8],
    w: WordWidth,
    chunk_words: usize,
    chunk: impl Fn(&[u8], &[u8]) -> EncodedChunk,
) -> EncodedTensor {
    let cb = chunk_words * w.bytes();
    let chunks = base.chunks(cb).zip(target.chunks(cb)).map(|(b, t)| chunk(b, t)).collect();
    EncodedTensor {
        name: "t".into(),
        width: w,
        words: (target.len() / w.bytes()) as u64,
        chunk_words: chunk_words as u32,
        chunks,
    }
}

/// A whole tensor of [`forced_chunk_coded`] chunks of `chunk_words` words.
#[allow(clippy::too_many_arguments)]
pub fn forced_tensor_coded(
    base: &[u8],
    target: &[u8],
    w: WordWidth,
    chunk_words: usize,
    choice: Choice,
    op: ValueOp,
    layout: ValueLayout,
    grouped: bool,
    codecs: Codecs,
) -> EncodedTensor {
    tensor_of_chunks(base, target, w, chunk_words, |b, t| {
        forced_chunk_coded(b, t, w, choice, op, layout, grouped, codecs)
    })
}

/// The library's decoder of one chunk (checksum and digest checked).
pub fn library_decode(c: &EncodedChunk, base: &[u8], words: usize, w: WordWidth) -> Vec<u8> {
    let mut out = Vec::new();
    let input = tpde::format::ChunkInput {
        record: &c.record,
        streams: &c.streams,
        stored: &c.data,
        base: Some(base),
        words,
        width: w,
        reference: None,
    };
    tpde::format::decode_chunk(&input, &mut out).expect("the library decodes the chunk");
    out
}

/// A sparse chunk record with xor values in one words stream, over hand-built
/// streams: for tests that feed the GPU positions the library would reject.
pub fn sparse_record(changed: u32, coding: PositionCoding, gap_width: u8, streams: &[StreamRecord]) -> ChunkRecord {
    ChunkRecord {
        data_offset: 0,
        stored_len: streams.iter().map(|s| s.stored_len).sum(),
        changed_count: changed,
        first_stream: 0,
        encoding: Encoding::Sparse,
        value_op: ValueOp::Xor,
        value_layout: ValueLayout::Words,
        value_order: ValueOrder::Positional,
        position_coding: coding,
        gap_width,
        stream_count: streams.len() as u8,
        checksum: 0,
        digest: [0; 16],
    }
}

/// fp32 words like a layer's weights: the base near N(0, 1), the target the
/// base plus a small step at a fraction `p` of the words (all for `p >= 1`),
/// as a fine-tune changes them.
pub fn float_pair(words: usize, p: f64, seed: u64) -> (Vec<u8>, Vec<u8>) {
    let mut r = lcg(seed);
    let mut unit = move || (r() >> 11) as f64 / (1u64 << 42) as f64;
    let mut base = Vec::with_capacity(words * 4);
    let mut target = Vec::with_capacity(words * 4);
    for _ in 0..words {
        // a sum of uniforms, close enough to a normal for the exponent's spread
        let x = ((0..4).map(|_| unit()).sum::<f64>() - 2.0) as f32;
        let y = if p >= 1.0 || unit() < p { x + 0.01 * (unit() as f32 - 0.5) } else { x };
        base.extend_from_slice(&x.to_le_bytes());
        target.extend_from_slice(&y.to_le_bytes());
    }
    (base, target)
}

/// Writes a safetensors file of BF16 tensors, given as `u16` words, in order.
pub fn write_bf16_safetensors(path: &std::path::Path, tensors: &[(&str, &[u16])]) {
    let mut header = String::from("{");
    let mut at = 0;
    for (i, (name, words)) in tensors.iter().enumerate() {
        let end = at + 2 * words.len();
        let comma = if i > 0 { "," } else { "" };
        header += &format!(
            "{comma}\"{name}\":{{\"dtype\":\"BF16\",\"shape\":[{}],\"data_offsets\":[{at},{end}]}}",
            words.len()
        );
        at = end;
    }
    header.push('}');
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    for (_, words) in tensors {
        out.extend(words.iter().flat_map(|w| w.to_le_bytes()));
    }
    std::fs::write(path, out).expect("write a checkpoint");
}
