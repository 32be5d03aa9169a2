//! `invalid/`: one fault per file, each derived from the valid case `mixed` by
//! changing one thing and recomputing whatever covers it.
//!
//! Chunks of `mixed`: 0 = `a` sparse gaps (words 2, 5, 11 changed), 1 = `a`
//! unchanged, 2 = `b` sparse bitmap over 12 words (1, 6, 9), 3 = `c` dense with
//! zstd byte planes, 4 = `c` dense sub rotated planes, 5 and 6 = `d` raw (16 and 4
//! words), one zstd stream each.

use serde_json::json;
use tpde::format::Header;

use crate::model::{at, put, reseal, Model};
use crate::safet::{self, Tensor};
use crate::suite::Suite;
use crate::valid::mixed_entries;
use crate::words;
use crate::zframe::{self, FrameShape};

/// The delta every invalid case starts from.
pub const SOURCE: &str = "valid/mixed/delta.tpde";
/// Its base.
pub const BASE: &str = "valid/mixed/base.safetensors";

struct Faults<'a> {
    suite: &'a mut Suite,
    good: Vec<u8>,
}

impl Faults<'_> {
    fn model(&self) -> Model {
        Model::parse(&self.good)
    }

    /// Writes `invalid/<name>.tpde` and its manifest entry.
    fn emit(&mut self, name: &str, bytes: &[u8], error: &str, spec: &str, provenance: &str) {
        let rel = format!("invalid/{name}.tpde");
        self.suite.write(&rel, bytes);
        self.suite.reject(name, &rel, Some(BASE), error, spec, &format!("generator invalid::{provenance}"));
    }

    /// A preamble field patched, and the preamble checksum recomputed.
    fn preamble(&mut self, name: &str, offset: usize, value: &[u8], error: &str, spec: &str) {
        let mut bytes = self.good.clone();
        put(&mut bytes, offset, value);
        reseal(&mut bytes);
        self.emit(name, &bytes, error, spec, "preamble_field");
    }

    /// The header changed through its types.
    fn header(&mut self, name: &str, edit: impl FnOnce(&mut Header), error: &str, spec: &str) {
        let mut model = self.model();
        let mut header = model.header();
        edit(&mut header);
        model.set_header(&header);
        self.emit(name, &model.to_bytes(), error, spec, "header_field");
    }

    /// The header changed as text.
    fn header_text(&mut self, name: &str, edit: impl FnOnce(String) -> Vec<u8>, error: &str, spec: &str) {
        let mut model = self.model();
        model.header = edit(String::from_utf8(model.header.clone()).expect("UTF-8"));
        self.emit(name, &model.to_bytes(), error, spec, "header_text");
    }

    /// The model changed, then serialised with table and preamble checksums.
    fn model_edit(&mut self, name: &str, edit: impl FnOnce(&mut Model), error: &str, spec: &str, provenance: &str) {
        let mut model = self.model();
        edit(&mut model);
        self.emit(name, &model.to_bytes(), error, spec, provenance);
    }

    /// Stream 0 of chunk 5 (`d`, raw, 16 bytes, zstd) replaced by `stored`; the
    /// chunk checksum follows.
    fn zstd_stream(&mut self, name: &str, stored: &[u8], error: &str) {
        self.model_edit(
            name,
            |m| {
                m.parts[5].set_stream_data(0, stored);
                m.relayout();
            },
            error,
            "§8.5",
            "zstd_stream",
        );
    }
}

/// Chunk 0 or 2 rebuilt with crafted positions and values (stored streams, xor);
/// the chunk digest is what a decoder that skipped the faulty check would rebuild,
/// so that only the named check fails.
fn craft_sparse(model: &mut Model, chunk: usize, base: &Tensor, positions: &[u64], values: &[u64], bitmap: bool) {
    let wb = safet::word_bytes(base.dtype);
    let words = 16.min(base.bytes.len() / wb);
    let mut target = words::load(&base.bytes[..words * wb], wb);
    for (&p, &v) in positions.iter().zip(values) {
        if let Some(t) = usize::try_from(p).ok().and_then(|p| target.get_mut(p)) {
            *t ^= v;
        }
    }
    let part = &mut model.parts[chunk];
    let mut streams: Vec<Vec<u8>> = if bitmap {
        let mut map = vec![0u8; words.div_ceil(8)];
        for &p in positions {
            map[usize::try_from(p / 8).expect("small")] |= 1 << (p % 8);
        }
        vec![map]
    } else {
        // Gaps from positions as given, so that a repeated position is a zero gap.
        let mut previous = 0;
        let gaps: Vec<u64> = positions
            .iter()
            .enumerate()
            .map(|(j, &p)| {
                let g = if j == 0 { p } else { p.wrapping_sub(previous) };
                previous = p;
                g
            })
            .collect();
        part.record[24] = 1;
        words::gap_planes(&gaps, 1)
    };
    let layout = tpde::format::ValueLayout::from_u8(part.record[22]).expect("valid");
    streams.extend(words::split(values, layout, wb));
    part.streams = streams
        .iter()
        .map(|s| {
            let mut r = [0u8; 16];
            put(&mut r, 0, &u32::try_from(s.len()).expect("small").to_le_bytes());
            put(&mut r, 4, &u32::try_from(s.len()).expect("small").to_le_bytes());
            r
        })
        .collect();
    part.data = streams.concat();
    put(&mut part.record, 12, &u32::try_from(values.len()).expect("small").to_le_bytes());
    part.set_digest_of(&words::store(&target, wb));
    model.relayout();
    model.fix_tensor_digests();
}

/// The values (xor) of chunk 0 of `a` at words 2, 5 and 11, and of `b` at 1, 6, 9.
fn original_values(entry: &crate::forge::Entry, positions: &[usize]) -> Vec<u64> {
    let wb = safet::word_bytes(entry.target.dtype);
    let t = words::load(&entry.target.bytes, wb);
    let b = words::load(&entry.base.as_ref().expect("a base").bytes, wb);
    positions.iter().map(|&p| t[p] ^ b[p]).collect()
}

/// Writes every invalid case.
#[allow(clippy::too_many_lines)]
pub fn generate(suite: &mut Suite) {
    let good = suite.read(SOURCE);
    let mut f = Faults { suite, good: good.clone() };
    let offsets = f.model().offsets();
    assert_ne!(offsets.data_end % 64, 0, "the source needs padding after its data");
    assert_ne!(offsets.header_end % 64, 0, "the source needs padding after its header");

    // Framing and preamble (§2, §3).
    f.emit("empty-file", &[], "E_BAD_MAGIC", "§2", "empty");
    let mut bytes = good.clone();
    bytes[1] = b'X';
    reseal(&mut bytes);
    f.emit("bad-magic", &bytes, "E_BAD_MAGIC", "§2", "magic");
    f.preamble("unsupported-major-version-0", at::MAJOR, &0u16.to_le_bytes(), "E_UNSUPPORTED_VERSION", "§3");
    f.preamble("unknown-required-feature-bit-0", at::REQUIRED, &1u64.to_le_bytes(), "E_UNKNOWN_REQUIRED_FEATURE", "§3");
    let mut bytes = good.clone();
    bytes[at::PREAMBLE_CHECKSUM] ^= 1;
    f.emit("preamble-checksum-mismatch", &bytes, "E_PREAMBLE_CHECKSUM", "§3", "preamble_checksum");
    f.preamble("reserved-nonzero-preamble-offset-12", at::RESERVED_A, &[1], "E_RESERVED_NONZERO", "§3");
    f.preamble("reserved-nonzero-preamble-offset-100", at::RESERVED_B + 20, &[1], "E_RESERVED_NONZERO", "§3");
    let flip = |v: &[u8], at: usize| {
        let mut x = u64::from_le_bytes(v[at..at + 8].try_into().expect("8"));
        x ^= 1;
        x.to_le_bytes()
    };
    f.preamble(
        "header-checksum-mismatch",
        at::HEADER_CHECKSUM,
        &flip(&good, at::HEADER_CHECKSUM),
        "E_HEADER_CHECKSUM",
        "§5",
    );
    f.preamble(
        "table-checksum-mismatch",
        at::TABLE_CHECKSUM,
        &flip(&good, at::TABLE_CHECKSUM),
        "E_TABLE_CHECKSUM",
        "§6",
    );

    // Limits (§9): absurd sizes are refused before anything is allocated.
    f.preamble("absurd-chunk-count", at::CHUNK_COUNT, &(1u64 << 60).to_le_bytes(), "E_LIMIT_EXCEEDED", "§9");
    f.preamble("absurd-stream-count", at::STREAM_COUNT, &(1u64 << 62).to_le_bytes(), "E_LIMIT_EXCEEDED", "§9");
    f.preamble("absurd-header-len", at::HEADER_LEN, &(1u64 << 62).to_le_bytes(), "E_LIMIT_EXCEEDED", "§9");
    f.preamble("absurd-data-len", at::DATA_LEN, &(u64::MAX - 63).to_le_bytes(), "E_LIMIT_EXCEEDED", "§9");
    let data_len = u64::from_le_bytes(good[at::DATA_LEN..at::DATA_LEN + 8].try_into().expect("8"));
    f.preamble("declared-sizes-past-end", at::DATA_LEN, &(data_len + 64).to_le_bytes(), "E_TRUNCATED", "§2");
    f.header("chunk-words-over-limit", |h| h.tensors[1].chunk_words = (1 << 24) + 1, "E_LIMIT_EXCEEDED", "§9");
    f.header("chunk-words-zero", |h| h.tensors[1].chunk_words = 0, "E_LIMIT_EXCEEDED", "§9");
    f.header(
        "rank-over-limit",
        |h| {
            let mut shape = vec![1u64; 32];
            shape.push(12);
            let file = &mut h.target.files[0].safetensors_header;
            *file = file.replacen(
                "\"shape\":[12]",
                &format!("\"shape\":{}", serde_json::to_string(&shape).expect("json")),
                1,
            );
            h.tensors[1].shape = shape;
        },
        "E_LIMIT_EXCEEDED",
        "§9",
    );

    // Trailer and truncation (§2, §4).
    let mut bytes = good.clone();
    *bytes.last_mut().expect("non-empty") ^= 1;
    f.emit("bad-trailer-end-magic", &bytes, "E_BAD_TRAILER", "§4", "trailer");
    let mut bytes = good.clone();
    let len = bytes.len();
    put(&mut bytes, len - 16, &(len as u64 + 1).to_le_bytes());
    f.emit("bad-trailer-file-len", &bytes, "E_BAD_TRAILER", "§4", "trailer");
    let cuts = [
        ("truncated-inside-magic", 4, "E_BAD_MAGIC"),
        ("truncated-inside-version-field", 9, "E_TRUNCATED"),
        ("truncated-inside-preamble", 64, "E_TRUNCATED"),
        ("truncated-at-end-of-data", offsets.data_end, "E_BAD_TRAILER"),
        ("truncated-inside-header", offsets.header + 20, "E_BAD_TRAILER"),
        ("truncated-inside-chunk-table", offsets.tables + 100, "E_BAD_TRAILER"),
        ("truncated-inside-stream-table", offsets.stream_table + 24, "E_BAD_TRAILER"),
        ("truncated-before-trailer", offsets.trailer, "E_BAD_TRAILER"),
        ("truncated-inside-trailer", offsets.trailer + 8, "E_BAD_TRAILER"),
    ];
    for (name, cut, error) in cuts {
        let spec = if error == "E_BAD_TRAILER" { "§4" } else { "§2" };
        f.emit(name, &good[..cut], error, spec, "truncate");
    }

    // Unaccounted and overlapping bytes (§2).
    let mut bytes = good.clone();
    bytes.splice(offsets.trailer..offsets.trailer, [0u8; 16]);
    let len = bytes.len();
    put(&mut bytes, len - 16, &(len as u64).to_le_bytes());
    f.emit("bytes-before-trailer", &bytes, "E_UNACCOUNTED_BYTES", "§2", "insert_bytes");
    let mut bytes = good.clone();
    bytes[offsets.data_end] = 1;
    f.emit("nonzero-padding-after-data", &bytes, "E_UNACCOUNTED_BYTES", "§2", "padding");
    let mut bytes = good.clone();
    bytes[offsets.header_end] = 1;
    f.emit("nonzero-padding-after-header", &bytes, "E_UNACCOUNTED_BYTES", "§2", "padding");
    f.model_edit(
        "gap-between-chunks",
        |m| {
            m.parts[0].data.extend_from_slice(&[0; 8]);
            for part in &mut m.parts[1..] {
                let offset = u64::from_le_bytes(part.record[0..8].try_into().expect("8")) + 8;
                put(&mut part.record, 0, &offset.to_le_bytes());
            }
        },
        "E_UNACCOUNTED_BYTES",
        "§2",
        "chunk_layout",
    );
    f.model_edit(
        "data-section-tail-bytes",
        |m| m.parts.last_mut().expect("chunks").data.extend_from_slice(&[0; 8]),
        "E_UNACCOUNTED_BYTES",
        "§2",
        "chunk_layout",
    );
    f.model_edit(
        "overlapping-chunk-ranges",
        |m| {
            let offset = u64::from_le_bytes(m.parts[2].record[0..8].try_into().expect("8")) - 4;
            put(&mut m.parts[2].record, 0, &offset.to_le_bytes());
        },
        "E_RANGE_OVERLAP",
        "§2",
        "chunk_layout",
    );

    // Reserved fields of records (§6).
    f.model_edit(
        "reserved-nonzero-chunk-record-offset-27",
        |m| m.parts[0].record[27] = 1,
        "E_RESERVED_NONZERO",
        "§6.1",
        "record_field",
    );
    f.model_edit(
        "reserved-nonzero-chunk-record-offset-56",
        |m| m.parts[0].record[56] = 1,
        "E_RESERVED_NONZERO",
        "§6.1",
        "record_field",
    );
    f.model_edit(
        "reserved-nonzero-stream-record",
        |m| m.parts[0].streams[0][9] = 1,
        "E_RESERVED_NONZERO",
        "§6.2",
        "record_field",
    );

    // Header (§5).
    f.header_text("header-not-json", |_| b"this is not JSON".to_vec(), "E_HEADER_INVALID", "§5.1");
    f.header_text(
        "header-not-utf8",
        |t| {
            let mut b = t.into_bytes();
            let i = b.windows(9).position(|w| w == b"generator").expect("the writer string");
            b[i] = 0xff;
            b
        },
        "E_HEADER_INVALID",
        "§5.1",
    );
    f.header_text(
        "header-unknown-field",
        |t| t.replacen('{', "{\"future_field\":1,", 1).into_bytes(),
        "E_HEADER_INVALID",
        "§5.2",
    );
    f.header_text(
        "header-unknown-field-in-tensor",
        |t| t.replacen("{\"name\":\"a\"", "{\"name\":\"a\",\"future_field\":1", 1).into_bytes(),
        "E_HEADER_INVALID",
        "§5.5",
    );
    f.header_text(
        "duplicate-key-in-header",
        |t| t.replacen("\"writer\":\"", "\"writer\":\"x\",\"writer\":\"", 1).into_bytes(),
        "E_DUPLICATE_KEY",
        "§5.1",
    );
    f.header_text(
        "duplicate-key-in-extensions",
        |t| t.replacen('{', "{\"extensions\":{\"org.example.k\":1,\"org.example.k\":2},", 1).into_bytes(),
        "E_DUPLICATE_KEY",
        "§5.1",
    );
    // Strict JSON and the integer rules (§5.1).
    f.header_text(
        "header-byte-order-mark",
        |t| [b"\xef\xbb\xbf".to_vec(), t.into_bytes()].concat(),
        "E_HEADER_INVALID",
        "§5.1",
    );
    f.header_text(
        "header-lone-surrogate",
        |t| t.replacen("\"writer\":\"", "\"writer\":\"\\ud800", 1).into_bytes(),
        "E_HEADER_INVALID",
        "§5.1",
    );
    f.header_text(
        "duplicate-key-after-unescaping",
        |t| t.replacen("\"writer\":\"", "\"wr\\u0069ter\":\"x\",\"writer\":\"", 1).into_bytes(),
        "E_DUPLICATE_KEY",
        "§5.1",
    );
    // The top-level object is depth 1 and `extensions` depth 2: 126 arrays make 128.
    f.header_text(
        "header-nesting-too-deep",
        |t| {
            t.replacen(
                '{',
                &format!("{{\"extensions\":{{\"org.example.deep\":{}{}}},", "[".repeat(126), "]".repeat(126)),
                1,
            )
            .into_bytes()
        },
        "E_HEADER_INVALID",
        "§5.1",
    );
    // The strict-JSON rules, the double range included, cover embedded headers too.
    f.header(
        "embedded-header-number-out-of-range",
        |h| {
            let file = &mut h.target.files[0].safetensors_header;
            *file = file.replacen("{\"dtype\":\"U8\"", "{\"org.example\":1e999,\"dtype\":\"U8\"", 1);
        },
        "E_HEADER_INVALID",
        "§5.1",
    );
    // The entry's dtype is known (H5.b); the embedded header cannot agree with it.
    f.header(
        "embedded-header-unknown-dtype",
        |h| {
            let file = &mut h.target.files[0].safetensors_header;
            *file = file.replacen("\"dtype\":\"U8\"", "\"dtype\":\"Q4K\"", 1);
        },
        "E_HEADER_INVALID",
        "§5.3",
    );
    f.header_text(
        "header-number-out-of-range",
        |t| t.replacen('{', "{\"extensions\":{\"org.example.big\":1e999},", 1).into_bytes(),
        "E_HEADER_INVALID",
        "§5.1",
    );
    f.header_text(
        "header-integer-above-2-53",
        |t| t.replacen("\"chunk_words\":16,", "\"chunk_words\":9007199254740992,", 1).into_bytes(),
        "E_HEADER_INVALID",
        "§5.1",
    );
    f.header_text(
        "header-integer-as-float",
        |t| t.replacen("\"chunk_words\":16,", "\"chunk_words\":16.0,", 1).into_bytes(),
        "E_HEADER_INVALID",
        "§5.1",
    );
    f.header_text(
        "header-integer-with-exponent",
        |t| t.replacen("\"chunk_words\":16,", "\"chunk_words\":1.6e1,", 1).into_bytes(),
        "E_HEADER_INVALID",
        "§5.1",
    );
    f.header_text(
        "header-integer-negative-zero",
        |t| t.replacen("\"file\":0,", "\"file\":-0,", 1).into_bytes(),
        "E_HEADER_INVALID",
        "§5.1",
    );
    f.header_text(
        "header-tensor-entry-as-array",
        |t| {
            let mut header: serde_json::Value = serde_json::from_str(&t).expect("JSON");
            let entry = header["tensors"][0].take();
            let fields =
                ["name", "dtype", "shape", "file", "chunk_words", "first_chunk", "chunk_count", "digest", "base"];
            let values: Vec<serde_json::Value> = fields.iter().filter_map(|k| entry.get(*k).cloned()).collect();
            header["tensors"][0] = serde_json::Value::Array(values);
            header.to_string().into_bytes()
        },
        "E_HEADER_INVALID",
        "§5.5",
    );
    f.header(
        "embedded-tensor-as-array",
        |h| {
            let file = &mut h.target.files[0].safetensors_header;
            let start = file.find("{\"dtype\":").expect("a tensor object");
            let end = start + file[start..].find('}').expect("its end") + 1;
            let object: serde_json::Value = serde_json::from_str(&file[start..end]).expect("JSON");
            let array = json!([object["dtype"], object["shape"], object["data_offsets"]]).to_string();
            file.replace_range(start..end, &array);
        },
        "E_HEADER_INVALID",
        "§5.3",
    );
    f.header_text(
        "extensions-null",
        |t| t.replacen('{', "{\"extensions\":null,", 1).into_bytes(),
        "E_HEADER_INVALID",
        "§5.1",
    );
    f.header(
        "embedded-metadata-not-string",
        |h| {
            let file = &mut h.target.files[0].safetensors_header;
            *file = file.replacen('{', "{\"__metadata__\":{\"step\":1000},", 1);
        },
        "E_HEADER_INVALID",
        "§5.3",
    );
    f.header(
        "embedded-data-offsets-wrong",
        |h| {
            let file = &mut h.target.files[0].safetensors_header;
            *file = file.replacen("\"data_offsets\":[0,64]", "\"data_offsets\":[0,62]", 1);
        },
        "E_HEADER_INVALID",
        "§5.3",
    );
    f.header(
        "file-name-with-slash",
        |h| h.target.files[0].name = "sub/model.safetensors".into(),
        "E_HEADER_INVALID",
        "§5.3",
    );
    f.header(
        "file-name-with-backslash",
        |h| h.target.files[0].name = "..\\model.safetensors".into(),
        "E_HEADER_INVALID",
        "§5.3",
    );
    f.header("file-kind-with-index", |h| h.target.index_json = Some("{}".into()), "E_HEADER_INVALID", "§5.3");
    f.header(
        "embedded-safetensors-header-disagrees",
        |h| {
            let file = &mut h.target.files[0].safetensors_header;
            *file = file.replacen("\"shape\":[2,16]", "\"shape\":[16,2]", 1);
        },
        "E_HEADER_INVALID",
        "§5.3",
    );
    f.header(
        "embedded-safetensors-header-duplicate-key",
        |h| {
            // A second entry for `b` before the real one: a parser that keeps the last
            // value sees the right header, one that keeps the first sees another.
            let file = &mut h.target.files[0].safetensors_header;
            *file = file.replacen(
                "\"b\":{",
                "\"b\":{\"dtype\":\"F32\",\"shape\":[3,4],\"data_offsets\":[64,112]},\"b\":{",
                1,
            );
        },
        "E_DUPLICATE_KEY",
        "§5.1",
    );
    f.header("tensor-file-index-out-of-range", |h| h.tensors[3].file = 1, "E_HEADER_INVALID", "§5.5");
    f.header("tensor-name-repeated", |h| h.tensors[1].name = "a".into(), "E_HEADER_INVALID", "§5.5");
    f.header(
        "digest-not-lower-hex",
        |h| h.tensors[0].digest = h.tensors[0].digest.to_uppercase(),
        "E_HEADER_INVALID",
        "§5.5",
    );
    f.header(
        "unknown-dtype",
        |h| {
            h.tensors[3].dtype_name = "Q4_K".into();
            let file = &mut h.target.files[0].safetensors_header;
            *file = file.replacen("\"dtype\":\"U8\"", "\"dtype\":\"Q4_K\"", 1);
        },
        "E_UNKNOWN_DTYPE",
        "§7",
    );

    // More strict-JSON and structure rules (§5.1, §5.2).
    f.header_text("header-trailing-comma", |t| t.replacen("}]}", "},]}", 1).into_bytes(), "E_HEADER_INVALID", "§5.1");
    f.header_text("header-comment", |t| format!("/* a comment */{t}").into_bytes(), "E_HEADER_INVALID", "§5.1");
    f.header_text(
        "header-nan",
        |t| t.replacen('{', "{\"extensions\":{\"org.example.x\":NaN},", 1).into_bytes(),
        "E_HEADER_INVALID",
        "§5.1",
    );
    f.header_text(
        "header-control-character-in-string",
        |t| t.replacen("\"writer\":\"", "\"writer\":\"\t", 1).into_bytes(),
        "E_HEADER_INVALID",
        "§5.1",
    );
    f.header_text(
        "header-wrong-member-type",
        |t| t.replacen("\"writer\":\"tpde-conformance-generator\"", "\"writer\":1", 1).into_bytes(),
        "E_HEADER_INVALID",
        "§5.2",
    );
    f.header_text(
        "header-missing-member",
        |t| t.replacen("\"writer\":\"tpde-conformance-generator\",", "", 1).into_bytes(),
        "E_HEADER_INVALID",
        "§5.2",
    );
    // Chunk map (§6).
    f.header("tensor-chunk-count-mismatch", |h| h.tensors[0].chunk_count = 3, "E_CHUNK_MAP_INVALID", "§6");
    f.header("tensor-first-chunk-mismatch", |h| h.tensors[1].first_chunk = 3, "E_CHUNK_MAP_INVALID", "§6");
    f.model_edit(
        "chunk-table-extra-record",
        |m| {
            let mut part = m.parts[1].clone();
            part.record[40..56].copy_from_slice(&xxhash_rust::xxh3::xxh3_128(&[]).to_be_bytes());
            m.parts.push(part);
            m.relayout();
        },
        "E_CHUNK_MAP_INVALID",
        "§6",
        "chunk_table",
    );
    f.model_edit(
        "chunk-stream-count-mismatch",
        |m| {
            m.parts[0].streams.push([0; 16]);
            m.relayout();
        },
        "E_CHUNK_MAP_INVALID",
        "§6.1",
        "chunk_table",
    );
    f.model_edit("streams-left-over", |m| m.extra_streams.push([0; 16]), "E_CHUNK_MAP_INVALID", "§6.2", "chunk_table");
    f.model_edit(
        "chunk-first-stream-mismatch",
        |m| {
            let first = u32::from_le_bytes(m.parts[2].record[16..20].try_into().expect("4")) + 1;
            put(&mut m.parts[2].record, 16, &first.to_le_bytes());
        },
        "E_CHUNK_MAP_INVALID",
        "§6.1",
        "chunk_table",
    );
    f.model_edit(
        "chunk-stored-len-not-sum-of-streams",
        |m| {
            m.parts[0].data.push(0);
            m.relayout();
        },
        "E_CHUNK_MAP_INVALID",
        "§6.1",
        "chunk_table",
    );
    f.model_edit(
        "chunk-streams-past-stream-table",
        |m| {
            let streams = m.parts[6].streams.len();
            m.parts[6].record[25] = u8::try_from(streams + 1).expect("small");
        },
        "E_CHUNK_MAP_INVALID",
        "§6.1",
        "chunk_table",
    );
    f.model_edit(
        "sparse-changed-count-zero",
        |m| put(&mut m.parts[0].record, 12, &0u32.to_le_bytes()),
        "E_CHUNK_MAP_INVALID",
        "§8.1",
        "record_field",
    );
    f.model_edit(
        "dense-changed-count-above-words",
        |m| put(&mut m.parts[3].record, 12, &17u32.to_le_bytes()),
        "E_CHUNK_MAP_INVALID",
        "§8.1",
        "record_field",
    );
    f.model_edit(
        "dense-chunk-with-positions",
        |m| m.parts[3].record[23] = 1,
        "E_CHUNK_MAP_INVALID",
        "§8.1",
        "record_field",
    );
    f.model_edit(
        "unchanged-chunk-with-changed-count",
        |m| put(&mut m.parts[1].record, 12, &1u32.to_le_bytes()),
        "E_CHUNK_MAP_INVALID",
        "§8.1",
        "record_field",
    );
    f.model_edit("raw-chunk-with-sub", |m| m.parts[5].record[21] = 1, "E_CHUNK_MAP_INVALID", "§8.1", "record_field");
    f.model_edit("gap-width-3", |m| m.parts[0].record[24] = 3, "E_CHUNK_MAP_INVALID", "§8.3", "record_field");
    f.model_edit(
        "stream-decoded-len-mismatch",
        |m| {
            let len = u32::from_le_bytes(m.parts[3].streams[0][4..8].try_into().expect("4")) + 1;
            put(&mut m.parts[3].streams[0], 4, &len.to_le_bytes());
        },
        "E_STREAM_LENGTH",
        "§8.5",
        "record_field",
    );
    f.model_edit(
        "stored-stream-len-differs-from-decoded",
        |m| {
            let mut stream = m.parts[4].stream_data(0).to_vec();
            stream.push(0);
            m.parts[4].set_stream_data(0, &stream);
            m.relayout();
        },
        "E_STREAM_LENGTH",
        "§8.5",
        "record_field",
    );

    // Unknown ids (§8): the registry has no such encoding, op, layout, coding, codec.
    f.model_edit("unknown-encoding", |m| m.parts[0].record[20] = 4, "E_UNKNOWN_CODEC", "§8.1", "record_field");
    f.model_edit("unknown-value-op", |m| m.parts[0].record[21] = 2, "E_UNKNOWN_CODEC", "§8.2", "record_field");
    f.model_edit("unknown-value-layout", |m| m.parts[0].record[22] = 3, "E_UNKNOWN_CODEC", "§8.4", "record_field");
    f.model_edit("unknown-position-coding", |m| m.parts[0].record[23] = 4, "E_UNKNOWN_CODEC", "§8.3", "record_field");
    f.model_edit("unknown-value-order", |m| m.parts[0].record[26] = 2, "E_UNKNOWN_CODEC", "§8.6", "record_field");
    f.model_edit(
        "unchanged-chunk-with-value-order",
        |m| m.parts[1].record[26] = 1,
        "E_CHUNK_MAP_INVALID",
        "§8.6",
        "record_field",
    );
    f.model_edit(
        "raw-chunk-with-value-order",
        |m| m.parts[5].record[26] = 1,
        "E_CHUNK_MAP_INVALID",
        "§8.6",
        "record_field",
    );
    f.model_edit("unknown-codec", |m| m.parts[0].streams[0][8] = 2, "E_UNKNOWN_CODEC", "§8.5", "record_field");

    // Positions and values (§8.3, §8).
    let entries = mixed_entries();
    let a_values = original_values(&entries[0], &[2, 5, 11]);
    let b_values = original_values(&entries[1], &[1, 6, 9]);
    let a_base = entries[0].base.clone().expect("a base");
    let b_base = entries[1].base.clone().expect("a base");
    f.model_edit(
        "positions-zero-gap",
        |m| craft_sparse(m, 0, &a_base, &[2, 2, 11], &a_values, false),
        "E_POSITIONS_NOT_INCREASING",
        "§8.3",
        "craft_sparse",
    );
    f.model_edit(
        "positions-gap-past-end",
        |m| craft_sparse(m, 0, &a_base, &[2, 5, 16], &a_values, false),
        "E_POSITIONS_OUT_OF_BOUNDS",
        "§8.3",
        "craft_sparse",
    );
    let mut four = b_values.clone();
    four.push(0x0100);
    f.model_edit(
        "positions-bitmap-padding-bit",
        |m| craft_sparse(m, 2, &b_base, &[1, 6, 9, 12], &four, true),
        "E_POSITIONS_OUT_OF_BOUNDS",
        "§8.3",
        "craft_sparse",
    );
    f.model_edit(
        "bitmap-bits-differ-from-changed-count",
        |m| craft_sparse(m, 2, &b_base, &[1, 6, 9], &b_values[..2], true),
        "E_CHANGED_COUNT",
        "§8.3",
        "craft_sparse",
    );
    f.model_edit(
        "sparse-zero-value",
        |m| craft_sparse(m, 0, &a_base, &[2, 5, 11], &[a_values[0], 0, a_values[2]], false),
        "E_CHANGED_COUNT",
        "§8",
        "craft_sparse",
    );
    f.model_edit(
        "changed-count-mismatch",
        |m| {
            let count = u32::from_le_bytes(m.parts[4].record[12..16].try_into().expect("4")) + 1;
            put(&mut m.parts[4].record, 12, &count.to_le_bytes());
        },
        "E_CHANGED_COUNT",
        "§8",
        "record_field",
    );

    // zstd profile (§8.5), on the 16-byte stream of chunk 5.
    let d = entries[3].target.bytes[..16].to_vec();
    let frame = zframe::compress(&d);
    f.zstd_stream("zstd-two-frames", &[frame.clone(), frame.clone()].concat(), "E_ZSTD_PROFILE");
    f.zstd_stream("zstd-trailing-bytes", &[frame.clone(), vec![0; 4]].concat(), "E_ZSTD_PROFILE");
    f.zstd_stream(
        "zstd-no-content-size",
        &zframe::frame(&d, FrameShape { content_size: None, window_log: Some(17), ..FrameShape::single(16) }),
        "E_ZSTD_PROFILE",
    );
    f.zstd_stream(
        "zstd-window-too-large",
        &zframe::frame(&d, FrameShape { window_log: Some(28), ..FrameShape::single(16) }),
        "E_ZSTD_PROFILE",
    );
    f.zstd_stream(
        "zstd-dictionary-id",
        &zframe::frame(&d, FrameShape { dictionary: true, ..FrameShape::single(16) }),
        "E_ZSTD_PROFILE",
    );
    f.zstd_stream(
        "zstd-reserved-header-bit",
        &zframe::frame(&d, FrameShape { reserved_bit: true, ..FrameShape::single(16) }),
        "E_ZSTD_PROFILE",
    );
    let mut skippable = vec![0x50, 0x2A, 0x4D, 0x18, 4, 0, 0, 0, 0, 0, 0, 0];
    skippable.extend_from_slice(&frame);
    f.zstd_stream("zstd-skippable-frame-first", &skippable, "E_ZSTD_PROFILE");
    f.zstd_stream(
        "zstd-content-checksum-mismatch",
        &zframe::frame(&d, FrameShape { checksum: Some(false), ..FrameShape::single(16) }),
        "E_ZSTD_DECODE",
    );
    f.zstd_stream("zstd-not-a-frame", b"this is not zstd....", "E_ZSTD_PROFILE");
    f.zstd_stream("zstd-truncated-frame", &frame[..frame.len() - 1], "E_ZSTD_PROFILE");
    let mut longer = d.clone();
    longer.push(0);
    f.zstd_stream("zstd-content-size-mismatch", &zframe::compress(&longer), "E_STREAM_LENGTH");
    f.zstd_stream(
        "zstd-reserved-block-type",
        &zframe::frame(&d, FrameShape { block_type: 3, ..FrameShape::single(16) }),
        "E_ZSTD_PROFILE",
    );
    // Well framed, but the compressed block does not decode.
    f.zstd_stream(
        "zstd-corrupt-compressed-block",
        &zframe::frame(&[0xff; 16], FrameShape { block_type: 2, ..FrameShape::single(16) }),
        "E_ZSTD_DECODE",
    );
    f.zstd_stream(
        "zstd-unused-header-bit",
        &zframe::frame(&d, FrameShape { unused_bit: true, ..FrameShape::single(16) }),
        "E_ZSTD_PROFILE",
    );
    // The blocks hold one byte fewer, or one more, than the content size says.
    f.zstd_stream(
        "zstd-blocks-shorter-than-content-size",
        &zframe::frame(&d[..15], FrameShape::single(16)),
        "E_ZSTD_DECODE",
    );
    let mut over = d.clone();
    over.push(0);
    f.zstd_stream(
        "zstd-blocks-longer-than-content-size",
        &zframe::frame(&over, FrameShape::single(16)),
        "E_ZSTD_DECODE",
    );

    // Checksums and digests (§6, §10).
    f.model_edit(
        "chunk-checksum-mismatch",
        |m| *m.parts[0].data.last_mut().expect("data") ^= 1,
        "E_CHUNK_CHECKSUM",
        "§6.1",
        "stored_bytes",
    );
    f.model_edit(
        "chunk-digest-mismatch",
        |m| {
            m.parts[4].record[40] ^= 1;
            m.fix_tensor_digests();
        },
        "E_CHUNK_DIGEST",
        "§10",
        "record_field",
    );
    f.header("tensor-digest-mismatch", |h| h.tensors[2].digest = "0".repeat(32), "E_TENSOR_DIGEST", "§10");

    base_faults(f.suite, &entries);
    other_sources(f.suite);
}

/// Faults that need a sharded or sub-byte source.
fn other_sources(suite: &mut Suite) {
    let p = "generator invalid::other_sources";
    let sharded = Model::parse(&suite.read("valid/sharded/delta.tpde"));
    let emit = |suite: &mut Suite, name: &str, model: &Model, base: Option<&str>, error: &str, spec: &str| {
        let rel = format!("invalid/{name}.tpde");
        suite.write(&rel, &model.to_bytes());
        suite.reject(name, &rel, base, error, spec, p);
    };
    let edit = |model: &Model, change: &dyn Fn(&mut Header)| {
        let mut model = model.clone();
        let mut header = model.header();
        change(&mut header);
        model.set_header(&header);
        model
    };
    let base = Some("valid/sharded/base");
    let m = edit(&sharded, &|h| h.target.files[1].name = h.target.files[0].name.clone());
    emit(suite, "file-name-repeated", &m, base, "E_HEADER_INVALID", "§5.3");
    let m = edit(&sharded, &|h| h.target.index_json = None);
    emit(suite, "sharded-without-index", &m, base, "E_HEADER_INVALID", "§5.3");
    let m = edit(&sharded, &|h| h.target.files.swap(1, 2));
    emit(suite, "target-files-out-of-tensor-order", &m, base, "E_HEADER_INVALID", "§5.3");
    let m = edit(&sharded, &|h| {
        h.target.files.clear();
    });
    emit(suite, "no-target-files", &m, base, "E_HEADER_INVALID", "§5.3");

    // The index written beside the shards must agree with them (§11.1 O23).
    let index = sharded.header().target.index_json.expect("a sharded index");
    let shard1 = "\"model-00001-of-00003.safetensors\"";
    assert!(index.contains(&format!("\"layer.0\": {shard1}")), "the index maps layer.0 to shard 1");
    let index_cases = [
        // A loader of the output that follows the index would read outside it.
        (
            "index-maps-tensor-outside-output",
            index.replacen(shard1, "\"../../../../etc/passwd\"", 1),
            "E_HEADER_INVALID",
        ),
        (
            "index-tensor-in-wrong-shard",
            index.replacen(shard1, "\"model-00002-of-00003.safetensors\"", 1),
            "E_HEADER_INVALID",
        ),
        ("index-missing-tensor", index.replacen(&format!("\n    \"layer.0\": {shard1},"), "", 1), "E_HEADER_INVALID"),
        (
            "index-extra-tensor",
            index.replacen("\"weight_map\": {", &format!("\"weight_map\": {{\n    \"layer.9\": {shard1},"), 1),
            "E_HEADER_INVALID",
        ),
        (
            "index-duplicate-key",
            index.replacen("\"weight_map\": {", &format!("\"weight_map\": {{\n    \"layer.0\": {shard1},"), 1),
            "E_DUPLICATE_KEY",
        ),
        ("index-without-weight-map", index.replacen("\"weight_map\"", "\"weights\"", 1), "E_HEADER_INVALID"),
        ("index-not-json", index.replacen('{', "{,", 1), "E_HEADER_INVALID"),
    ];
    for (name, text, error) in index_cases {
        assert_ne!(text, index, "{name} changes the index");
        let m = edit(&sharded, &|h| h.target.index_json = Some(text.clone()));
        emit(suite, name, &m, base, error, "§11.1");
    }

    // F4 holds two elements per byte: 3 x 7 of them is not whole bytes.
    let standalone = Model::parse(&suite.read("valid/dtypes-standalone/delta.tpde"));
    let m = edit(&standalone, &|h| {
        let t = h.tensors.iter_mut().find(|t| t.dtype_name == "F4").expect("an F4 tensor");
        t.shape = vec![3, 7];
        let file = &mut h.target.files[0].safetensors_header;
        *file = file.replacen("\"dtype\":\"F4\",\"shape\":[3,8]", "\"dtype\":\"F4\",\"shape\":[3,7]", 1);
    });
    emit(suite, "shape-not-whole-bytes", &m, None, "E_HEADER_INVALID", "§7");
}

/// A valid delta against the wrong base (§5.6).
fn base_faults(suite: &mut Suite, entries: &[crate::forge::Entry]) {
    let bases: Vec<Tensor> = entries.iter().filter_map(|e| e.base.clone()).collect();
    let p = "generator invalid::base_faults";
    suite.reject("base-required", SOURCE, None, "E_BASE_REQUIRED", "§11.2", p);
    let mut changed = bases.clone();
    changed[2].bytes[70] ^= 1;
    let mut reshaped = bases.clone();
    reshaped[0].shape = vec![16, 2];
    let mut retyped = bases.clone();
    retyped[1].dtype = "I32";
    let missing: Vec<Tensor> = bases.iter().filter(|t| t.name != "c").cloned().collect();
    let cases = [
        ("base-digest-mismatch", changed, "E_BASE_DIGEST"),
        ("base-shape-mismatch", reshaped, "E_BASE_MISMATCH"),
        ("base-dtype-mismatch", retyped, "E_BASE_MISMATCH"),
        ("base-missing-tensor", missing, "E_BASE_MISSING_TENSOR"),
    ];
    for (name, tensors, error) in cases {
        let rel = format!("invalid/bases/{name}.safetensors");
        suite.write(&rel, &safet::file(&tensors, None).0);
        suite.reject(name, SOURCE, Some(&rel), error, "§11.2", p);
    }
    let dir = "invalid/bases/missing-shard";
    suite.write(&format!("{dir}/model-00001-of-00002.safetensors"), &safet::file(&bases[..2], None).0);
    let weight_map: serde_json::Map<String, serde_json::Value> = bases
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.clone(), json!(format!("model-0000{}-of-00002.safetensors", 1 + i / 2))))
        .collect();
    let index =
        serde_json::to_string_pretty(&json!({ "metadata": {}, "weight_map": weight_map })).expect("json") + "\n";
    suite.write(&format!("{dir}/{}", tpde::INDEX_FILE), index.as_bytes());
    suite.reject("base-missing-shard", SOURCE, Some(dir), "E_MISSING_SHARD", "§11.2", p);
    // A base header that repeats a key (the same entry twice) is not strict JSON.
    let (bytes, header) = safet::file(&bases, None);
    let entry_end = header.find("},").expect("two entries") + 2;
    let mut doubled = format!("{{{}{}", &header[1..entry_end], &header[1..]);
    while doubled.len() % 8 != 0 {
        doubled.push(' ');
    }
    let mut file = (doubled.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(doubled.trim_end().as_bytes());
    file.resize(8 + doubled.len(), b' ');
    file.extend_from_slice(&bytes[8 + header.len()..]);
    let rel = "invalid/bases/duplicate-key.safetensors";
    suite.write(rel, &file);
    suite.reject("base-duplicate-key", SOURCE, Some(rel), "E_INVALID_CHECKPOINT", "§11.2", p);
    let (mut bytes, header) = safet::file(&bases, None);
    let swapped = header.replacen("\"dtype\":\"F32\"", "\"dtype\":\"Q4K\"", 1);
    bytes[8..8 + header.len()].copy_from_slice(swapped.as_bytes());
    let rel = "invalid/bases/unknown-dtype.safetensors";
    suite.write(rel, &bytes);
    suite.reject("base-unknown-dtype", SOURCE, Some(rel), "E_UNKNOWN_DTYPE", "§11.2", p);
    let rel = "invalid/bases/not-safetensors.safetensors";
    suite.write(rel, b"\x10\x00\x00\x00\x00\x00\x00\x00not a json hdr!!");
    suite.reject("base-not-safetensors", SOURCE, Some(rel), "E_INVALID_CHECKPOINT", "§11.2", p);
    b0_faults(suite, &bases);
}

/// Bases that break one rule of spec §11.2 B0, for the valid delta `valid/mixed`.
fn b0_faults(suite: &mut Suite, bases: &[Tensor]) {
    let p = "generator invalid::b0_faults";
    let data: Vec<u8> = bases.iter().flat_map(|t| t.bytes.clone()).collect();
    let members = |edit: &dyn Fn(usize, String) -> String| -> String {
        let mut offset = 0;
        let parts: Vec<String> = bases
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let m = edit(i, safet::member(t, offset, ""));
                offset += t.bytes.len() as u64;
                m
            })
            .collect();
        format!("{{{}}}", parts.join(","))
    };
    // B0.f: a tensor object written as an array of its values.
    let as_array = members(&|i, m| {
        if i > 0 {
            return m;
        }
        let (name, object) = m.split_once(':').expect("a member");
        let value: serde_json::Value = serde_json::from_str(object).expect("JSON");
        format!("{name}:{}", json!([value["dtype"], value["shape"], value["data_offsets"]]))
    });
    // B0.f: `-0` is not an integer.
    let negative_zero =
        members(&|i, m| if i == 0 { m.replacen("\"data_offsets\":[0,", "\"data_offsets\":[-0,", 1) } else { m });
    // B0.e before B0.g: an unknown dtype is reported before the first tensor's offsets.
    let dtype_first = members(&|i, m| match i {
        0 => m.replacen("\"data_offsets\":[0,", "\"data_offsets\":[1,", 1),
        1 => m.replacen("\"dtype\":\"", "\"dtype\":\"Q", 1),
        _ => m,
    });
    let mut trailing = data.clone();
    trailing.push(0);
    let cases = [
        ("base-tensor-as-array", safet::raw_file(&as_array, &data), "E_INVALID_CHECKPOINT"),
        ("base-integer-negative-zero", safet::raw_file(&negative_zero, &data), "E_INVALID_CHECKPOINT"),
        ("base-unknown-dtype-before-offsets", safet::raw_file(&dtype_first, &data), "E_UNKNOWN_DTYPE"),
        ("base-data-trailing-byte", safet::raw_file(&members(&|_, m| m), &trailing), "E_INVALID_CHECKPOINT"),
    ];
    for (name, bytes, error) in cases {
        let rel = format!("invalid/bases/{name}.safetensors");
        suite.write(&rel, &bytes);
        suite.reject(name, SOURCE, Some(&rel), error, "§11.2", p);
    }
    // B0.h: one tensor in two shards, the index agreeing with the first.
    let dir = "invalid/bases/tensor-in-two-shards";
    suite.write(&format!("{dir}/a.safetensors"), &safet::file(bases, None).0);
    let mut weight_map: serde_json::Map<String, serde_json::Value> =
        bases.iter().map(|t| (t.name.clone(), json!("a.safetensors"))).collect();
    let extra = Tensor::new("extra.only.in.b", "U8", &[1], vec![7]);
    suite.write(&format!("{dir}/b.safetensors"), &safet::file(&[bases[0].clone(), extra.clone()], None).0);
    weight_map.insert(extra.name.clone(), json!("b.safetensors"));
    let index = json!({ "weight_map": weight_map }).to_string();
    suite.write(&format!("{dir}/{}", tpde::INDEX_FILE), index.as_bytes());
    suite.reject("base-tensor-in-two-shards", SOURCE, Some(dir), "E_INVALID_CHECKPOINT", "§11.2", p);
    // B0.b before B0.c: a name that is not plain is reported before a missing shard.
    let dir = "invalid/bases/shard-name-not-plain";
    let index = json!({ "weight_map": { "a": "a.safetensors", "b": "../b.safetensors" } }).to_string();
    suite.write(&format!("{dir}/{}", tpde::INDEX_FILE), index.as_bytes());
    suite.reject("base-shard-name-not-plain", SOURCE, Some(dir), "E_INVALID_CHECKPOINT", "§11.2", p);
}
