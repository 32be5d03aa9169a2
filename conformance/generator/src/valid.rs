//! `valid/`: files every reader must accept, with their expected decode.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;
use tpde::{
    format::{Encoding, ValueLayout, ValueOp},
    Checkpoint, EncodeOptions, NoProgress,
};

use crate::forge::{self, settings_1_0, Entry, Force, WRITER};
use crate::model::Model;
use crate::safet::{self, Tensor};
use crate::suite::Suite;

/// The dtypes of spec §7, in its order.
pub const DTYPES: [&str; 20] = [
    "BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "I16", "U16", "F16", "BF16",
    "I32", "U32", "F32", "C64", "F64", "I64", "U64",
];

/// A seeded generator per case, so that each case's bytes depend only on its name.
pub fn rng(name: &str) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(xxhash_rust::xxh3::xxh3_64(name.as_bytes()))
}

/// Random bytes.
pub fn random(rng: &mut ChaCha8Rng, len: u64) -> Vec<u8> {
    (0..len).map(|_| rng.gen()).collect()
}

/// A random tensor.
pub fn random_tensor(rng: &mut ChaCha8Rng, name: &str, dtype: &'static str, shape: &[u64]) -> Tensor {
    Tensor::new(name, dtype, shape, random(rng, safet::byte_len(dtype, shape)))
}

/// `base` with words at `positions` changed in their low bits (small fine-tune steps).
pub fn nudge(base: &Tensor, positions: &[usize]) -> Tensor {
    let wb = safet::word_bytes(base.dtype);
    let mut out = base.clone();
    for &p in positions {
        out.bytes[p * wb] = out.bytes[p * wb].wrapping_add(1 + u8::try_from(p % 3).expect("small"));
    }
    out
}

/// A checkpoint to write: one file (with optional `__metadata__`) or shards.
#[derive(Debug, Clone)]
pub enum Ck {
    /// One `.safetensors` file.
    File(Vec<Tensor>, Option<BTreeMap<String, String>>),
    /// Shards by file name, and the index's `metadata`.
    Sharded(Vec<(String, Vec<Tensor>)>),
}

impl Ck {
    fn tensors(&self) -> Vec<Tensor> {
        match self {
            Ck::File(t, _) => t.clone(),
            Ck::Sharded(shards) => shards.iter().flat_map(|(_, t)| t.clone()).collect(),
        }
    }

    /// Writes the checkpoint at `path` (a file, or a directory for shards).
    pub fn write(&self, path: &Path) {
        match self {
            Ck::File(tensors, meta) => {
                std::fs::create_dir_all(path.parent().expect("a parent")).expect("mkdir");
                std::fs::write(path, safet::file(tensors, meta.as_ref()).0).expect("write");
            }
            Ck::Sharded(shards) => {
                std::fs::create_dir_all(path).expect("mkdir");
                let mut weight_map = BTreeMap::new();
                let mut total = 0u64;
                for (name, tensors) in shards {
                    std::fs::write(path.join(name), safet::file(tensors, None).0).expect("write a shard");
                    for t in tensors {
                        weight_map.insert(t.name.clone(), name.clone());
                        total += t.bytes.len() as u64;
                    }
                }
                let index = json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
                let mut text = serde_json::to_string_pretty(&index).expect("serialises");
                text.push('\n');
                std::fs::write(path.join(tpde::INDEX_FILE), text).expect("write the index");
            }
        }
    }

    fn file_name(&self) -> &'static str {
        match self {
            Ck::File(..) => "base.safetensors",
            Ck::Sharded(_) => "base",
        }
    }
}

/// Rewrites the header's writer field, so that goldens do not change with the
/// crate version.
fn normalise_writer(path: &Path) {
    let mut model = Model::parse(&std::fs::read(path).expect("read"));
    let mut header = model.header();
    header.writer = WRITER.to_owned();
    model.set_header(&header);
    std::fs::write(path, model.to_bytes()).expect("write");
}

/// A case encoded by the library's own encoder from `base` and `target`, as format
/// 1.0 (no lane rANS). The case ships `case_base` (default: `base`), which must hold
/// the same tensors.
#[allow(clippy::too_many_arguments)]
fn natural(
    suite: &mut Suite,
    name: &str,
    spec: &str,
    base: Option<&Ck>,
    case_base: Option<&Ck>,
    target: &Ck,
    chunk_words: u64,
) {
    let options = EncodeOptions { chunk_words, settings: settings_1_0() };
    let provenance = format!("generator valid::{}", name.replace('-', "_"));
    natural_with(suite, name, spec, base, case_base, target, options, &provenance);
}

/// A case encoded by the library's own encoder with `options`.
#[allow(clippy::too_many_arguments)]
pub fn natural_with(
    suite: &mut Suite,
    name: &str,
    spec: &str,
    base: Option<&Ck>,
    case_base: Option<&Ck>,
    target: &Ck,
    options: EncodeOptions,
    provenance: &str,
) {
    let dir = format!("valid/{name}");
    let base_path = base.map(|b| {
        let p = suite.scratch(&format!("{name}-{}", b.file_name()));
        b.write(&p);
        p
    });
    let target_path = suite.scratch(&format!("{name}-target"));
    let target_path = match target {
        Ck::File(..) => target_path.with_extension("safetensors"),
        Ck::Sharded(_) => target_path,
    };
    target.write(&target_path);
    let base_ck = base_path.as_deref().map(|p| Checkpoint::open(p).expect("base opens"));
    let target_ck = Checkpoint::open(&target_path).expect("target opens");
    let delta = format!("{dir}/delta.tpde");
    std::fs::create_dir_all(suite.path(&dir)).expect("mkdir");
    tpde::encode(base_ck.as_ref(), &target_ck, &suite.path(&delta), options, &NoProgress).expect("encodes");
    normalise_writer(&suite.path(&delta));
    let shipped = case_base.or(base).map(|b| {
        let rel = format!("{dir}/{}", b.file_name());
        b.write(&suite.path(&rel));
        rel
    });
    let expected = format!("{dir}/expected.json");
    suite.write_expected(&expected, &delta, &target.tensors());
    suite.accept(name, &delta, shipped.as_deref(), &expected, &target_path, spec, provenance);
}

/// A case whose chunks are built as `entries` say; the base file holds `base`.
pub fn forged(suite: &mut Suite, name: &str, spec: &str, entries: &[Entry], base: &[Tensor]) -> PathBuf {
    forged_as(suite, name, spec, entries, base, &format!("generator valid::{}", name.replace('-', "_")))
}

/// [`forged`] with its provenance.
pub fn forged_as(
    suite: &mut Suite,
    name: &str,
    spec: &str,
    entries: &[Entry],
    base: &[Tensor],
    provenance: &str,
) -> PathBuf {
    let dir = format!("valid/{name}");
    let delta = format!("{dir}/delta.tpde");
    std::fs::create_dir_all(suite.path(&dir)).expect("mkdir");
    let target_file = forge::write_delta(&suite.path(&delta), entries, None);
    let target_path = suite.scratch(&format!("{name}-target.safetensors"));
    std::fs::write(&target_path, target_file).expect("write the target");
    let base_rel = (!base.is_empty()).then(|| {
        let rel = format!("{dir}/base.safetensors");
        suite.write(&rel, &safet::file(base, None).0);
        rel
    });
    let expected = format!("{dir}/expected.json");
    let targets: Vec<Tensor> = entries.iter().map(|e| e.target.clone()).collect();
    suite.write_expected(&expected, &delta, &targets);
    suite.accept(name, &delta, base_rel.as_deref(), &expected, &target_path, spec, provenance);
    target_path
}

/// Every forged entry's base tensors, for the base file.
pub fn bases(entries: &[Entry]) -> Vec<Tensor> {
    entries.iter().filter_map(|e| e.base.clone()).collect()
}

/// The tensors of the case `mixed`, from which every invalid case is derived:
/// a sparse chunk with gaps, an unchanged chunk, a sparse chunk with a bitmap over
/// a word count that is not a multiple of 8, dense chunks with zstd and with sub +
/// rotated planes, and a raw tensor without base.
pub fn mixed_entries() -> Vec<Entry> {
    let mut r = rng("mixed");
    let a_base = random_tensor(&mut r, "a", "BF16", &[2, 16]);
    let a = nudge(&a_base, &[2, 5, 11]);
    let b_base = random_tensor(&mut r, "b", "F32", &[12]);
    let b = nudge(&b_base, &[1, 6, 9]);
    let c_base = random_tensor(&mut r, "c", "F32", &[2, 16]);
    let mut c = random_tensor(&mut r, "c", "F32", &[2, 16]);
    c.bytes[64..].copy_from_slice(&nudge(&c_base, &[16, 17, 20, 23, 24, 25, 26, 30]).bytes[64..]);
    let d = random_tensor(&mut r, "d", "U8", &[20]);
    vec![
        Entry::forced(a, Some(a_base), 16, &[Force::new(Encoding::Sparse).gaps(), Force::new(Encoding::Unchanged)]),
        Entry::forced(b, Some(b_base), 16, &[Force::new(Encoding::Sparse).bitmap().layout(ValueLayout::BytePlanes)]),
        Entry::forced(
            c,
            Some(c_base),
            16,
            &[
                Force::new(Encoding::Dense).layout(ValueLayout::BytePlanes).zstd(),
                Force::new(Encoding::Dense).op(ValueOp::Sub).layout(ValueLayout::RotatedBytePlanes),
            ],
        ),
        Entry::forced(d, None, 16, &[Force::new(Encoding::Raw).zstd()]),
    ]
}

/// Writes every valid case.
#[allow(clippy::too_many_lines)]
pub fn generate(suite: &mut Suite) {
    let enc = "§8.1";

    // The source of every invalid case.
    let mixed = mixed_entries();
    forged(suite, "mixed", "§8", &mixed, &bases(&mixed));

    // One case per encoding and position coding.
    let mut r = rng("encoding-unchanged");
    let base = random_tensor(&mut r, "w", "BF16", &[4, 8]);
    let entries = [Entry::forced(base.clone(), Some(base.clone()), 16, &[Force::new(Encoding::Unchanged)])];
    forged(suite, "encoding-unchanged", enc, &entries, &bases(&entries));

    let mut r = rng("encoding-sparse-gaps-w1");
    let base = random_tensor(&mut r, "w", "U16", &[64]);
    let entries =
        [Entry::forced(nudge(&base, &[0, 1, 9, 40, 63]), Some(base), 32, &[Force::new(Encoding::Sparse).gaps()])];
    forged(suite, "encoding-sparse-gaps-w1", "§8.3", &entries, &bases(&entries));

    let mut r = rng("encoding-sparse-gaps-w2");
    let base = random_tensor(&mut r, "w", "U8", &[600]);
    let entries =
        [Entry::forced(nudge(&base, &[3, 400, 401]), Some(base), 600, &[Force::new(Encoding::Sparse).gaps()])];
    forged(suite, "encoding-sparse-gaps-w2", "§8.3", &entries, &bases(&entries));

    // Gaps past 65535 need a long chunk; the base is short (its missing words are
    // zero), so the files stay small.
    let base = Tensor::new("w", "U8", &[8], vec![0; 8]);
    let mut target = Tensor::new("w", "U8", &[65_600], vec![0; 65_600]);
    target.bytes[2] = 7;
    target.bytes[65_590] = 9;
    let entries = [Entry::forced(target, Some(base), 65_600, &[Force::new(Encoding::Sparse).gaps().zstd()])];
    forged(suite, "encoding-sparse-gaps-w4", "§8.3", &entries, &bases(&entries));

    let mut r = rng("encoding-sparse-gaps-wide");
    let base2 = random_tensor(&mut r, "w2", "I16", &[40]);
    let base4 = random_tensor(&mut r, "w4", "I16", &[40]);
    let entries = [
        Entry::forced(nudge(&base2, &[4, 5, 30]), Some(base2), 40, &[Force::new(Encoding::Sparse).gap_width(2)]),
        Entry::forced(nudge(&base4, &[0, 39]), Some(base4), 40, &[Force::new(Encoding::Sparse).gap_width(4)]),
    ];
    forged(suite, "encoding-sparse-gaps-wider-than-needed", "§8.3", &entries, &bases(&entries));

    let mut r = rng("encoding-sparse-bitmap");
    let base12 = random_tensor(&mut r, "odd", "F32", &[12]);
    let base16 = random_tensor(&mut r, "even", "F16", &[2, 16]);
    let entries = [
        Entry::forced(nudge(&base12, &[0, 11]), Some(base12), 16, &[Force::new(Encoding::Sparse).bitmap()]),
        Entry::forced(
            nudge(&base16, &[1, 2, 3, 4, 5, 6, 7, 8, 20]),
            Some(base16),
            16,
            &[Force::new(Encoding::Sparse).bitmap().zstd()],
        ),
    ];
    forged(suite, "encoding-sparse-bitmap", "§8.3", &entries, &bases(&entries));

    let mut r = rng("encoding-dense");
    let base = random_tensor(&mut r, "w", "F32", &[32]);
    let target = nudge(&base, &(0..32).step_by(2).collect::<Vec<_>>());
    let entries =
        [Entry::forced(target, Some(base), 16, &[Force::new(Encoding::Dense), Force::new(Encoding::Dense).zstd()])];
    forged(suite, "encoding-dense", enc, &entries, &bases(&entries));

    let mut r = rng("encoding-raw");
    let entries = [
        Entry::forced(random_tensor(&mut r, "words", "F32", &[20]), None, 16, &[Force::new(Encoding::Raw)]),
        Entry::forced(
            random_tensor(&mut r, "planes", "BF16", &[20]),
            None,
            16,
            &[Force::new(Encoding::Raw).layout(ValueLayout::BytePlanes).zstd()],
        ),
        Entry::forced(
            random_tensor(&mut r, "rotated", "F64", &[20]),
            None,
            16,
            &[Force::new(Encoding::Raw).layout(ValueLayout::RotatedBytePlanes)],
        ),
    ];
    forged(suite, "encoding-raw", enc, &entries, &[]);

    // Every value op with every layout at every word width, dense and sparse.
    let mut r = rng("value-ops-layouts");
    let mut entries = Vec::new();
    for dtype in ["U8", "U16", "U32", "U64"] {
        for op in [ValueOp::Xor, ValueOp::Sub] {
            for layout in [ValueLayout::Words, ValueLayout::BytePlanes, ValueLayout::RotatedBytePlanes] {
                let name = format!(
                    "{}.{}.{}",
                    dtype.to_lowercase(),
                    format!("{op:?}").to_lowercase(),
                    format!("{layout:?}").to_lowercase()
                );
                let base = random_tensor(&mut r, &name, dtype, &[32]);
                // Both directions of change, so that sub sees negative and positive steps.
                let mut target = nudge(&base, &[0, 3, 17, 18, 31]);
                let wb = safet::word_bytes(dtype);
                target.bytes[5 * wb] = target.bytes[5 * wb].wrapping_sub(1);
                target.bytes[wb * 31 + wb - 1] ^= 0x80;
                let force = Force::new(Encoding::Dense).op(op).layout(layout);
                let sparse = Force::new(Encoding::Sparse).gaps().op(op).layout(layout);
                entries.push(Entry::forced(target, Some(base), 16, &[force, sparse]));
            }
        }
    }
    forged(suite, "value-ops-layouts", "§8.2", &entries, &bases(&entries));

    // Every dtype, as a delta (library encoder) and standalone.
    let mut r = rng("dtypes");
    let mut delta_entries = Vec::new();
    let mut alone = Vec::new();
    for dtype in DTYPES {
        // Sub-byte types need whole bytes: 8 elements per row.
        let base = random_tensor(&mut r, &format!("t.{dtype}"), dtype, &[5, 8]);
        let words = base.bytes.len() / safet::word_bytes(dtype);
        let target = nudge(&base, &[0, words / 2, words - 1]);
        delta_entries.push(Entry::auto(target, Some(base), 8));
        alone.push(Entry::auto(random_tensor(&mut r, &format!("s.{dtype}"), dtype, &[3, 8]), None, 8));
    }
    forged(suite, "dtypes-delta", "§7", &delta_entries, &bases(&delta_entries));
    forged(suite, "dtypes-standalone", "§7", &alone, &[]);

    // Empty tensors and scalars.
    let mut r = rng("empty-and-scalar");
    let scalar = random_tensor(&mut r, "scalar.f32", "F32", &[]);
    let mut scalar_target = scalar.clone();
    scalar_target.bytes[3] ^= 0x40;
    let bool_scalar = Tensor::new("scalar.bool", "BOOL", &[], vec![1]);
    // Empty tensors sit between non-empty ones, so that no two share a data offset.
    let entries = [
        Entry::auto(Tensor::new("empty.alone", "U8", &[0, 5], vec![]), None, 16),
        Entry::auto(scalar_target, Some(scalar), 16),
        Entry::auto(
            Tensor::new("empty.f32", "F32", &[0], vec![]),
            Some(Tensor::new("empty.f32", "F32", &[0], vec![])),
            16,
        ),
        Entry::auto(bool_scalar.clone(), Some(bool_scalar), 16),
        Entry::auto(
            Tensor::new("empty.bf16", "BF16", &[3, 0], vec![]),
            Some(Tensor::new("empty.bf16", "BF16", &[3, 0], vec![])),
            16,
        ),
        Entry::auto(random_tensor(&mut r, "scalar.alone", "I64", &[]), None, 16),
        // An empty target against a non-empty base: nothing to rebuild.
        Entry::auto(
            Tensor::new("emptied", "F16", &[0, 4], vec![]),
            Some(random_tensor(&mut r, "emptied", "F16", &[2, 4])),
            16,
        ),
        Entry::auto(random_tensor(&mut r, "row", "U8", &[3]), None, 16),
    ];
    forged(suite, "empty-and-scalar", "§5.5", &entries, &bases(&entries));

    // Two empty tensors at one data offset: their order in the header is the
    // safetensors header's order by (offsets, name).
    let mut r = rng("empty-tensors-same-offset");
    let entries = [
        Entry::auto(Tensor::new("a.empty", "F32", &[0], vec![]), None, 16),
        Entry::auto(Tensor::new("b.empty", "BF16", &[0, 3], vec![]), None, 16),
        Entry::auto(random_tensor(&mut r, "c", "U8", &[4]), None, 16),
    ];
    forged(suite, "empty-tensors-same-offset", "§5.5", &entries, &[]);

    // Every word changed; no word changed.
    let mut r = rng("all-changed");
    let base = random_tensor(&mut r, "dense", "F32", &[48]);
    let base_sparse = random_tensor(&mut r, "sparse", "U16", &[16]);
    let all: Vec<usize> = (0..48).collect();
    let entries = [
        Entry::auto(nudge(&base, &all), Some(base), 16),
        // Sparse with every position listed: first gap 0, then gaps of 1.
        Entry::forced(nudge(&base_sparse, &all[..16]), Some(base_sparse), 16, &[Force::new(Encoding::Sparse).gaps()]),
    ];
    forged(suite, "all-changed", "§8.3", &entries, &bases(&entries));
    let mut r = rng("none-changed");
    let tensors = vec![random_tensor(&mut r, "x", "BF16", &[4, 16]), random_tensor(&mut r, "y", "I32", &[10])];
    let ck = Ck::File(tensors, None);
    natural(suite, "none-changed", enc, Some(&ck), None, &ck, 16);

    // Values grouped by base key (§8.6), sparse and dense, at every word width.
    let mut r = rng("value-order-grouped");
    let mut entries = Vec::new();
    for dtype in ["U8", "BF16", "F32", "F64"] {
        let base = random_tensor(&mut r, &format!("{}.grouped", dtype.to_lowercase()), dtype, &[32]);
        let target = nudge(&base, &[0, 2, 3, 7, 11, 16, 19, 20, 25, 31]);
        let sparse = Force::new(Encoding::Sparse).gaps().grouped().layout(ValueLayout::BytePlanes);
        let dense = Force::new(Encoding::Dense).grouped().op(ValueOp::Sub);
        entries.push(Entry::forced(target, Some(base), 16, &[sparse, dense]));
    }
    // A base shorter than the chunk: keys of words past its end are those of zero.
    let short = random_tensor(&mut r, "short.grouped", "BF16", &[5]);
    let mut target = random_tensor(&mut r, "short.grouped", "BF16", &[16]);
    target.bytes[..10].copy_from_slice(&nudge(&short, &[1, 3]).bytes);
    entries.push(Entry::forced(target, Some(short), 16, &[Force::new(Encoding::Dense).grouped().zstd()]));
    forged(suite, "value-order-grouped", "§8.6", &entries, &bases(&entries));

    zstd_frame_variants(suite);
    natural_cases(suite);
    header_variants(suite);
    chain_cases(suite);
    base_variants(suite);
}

/// Streams as zstd frames that ordinary compressors rarely write, all within the
/// profile of §8.5: a window descriptor, several raw blocks, an RLE block, a content
/// checksum, a two-byte content size.
fn zstd_frame_variants(suite: &mut Suite) {
    use crate::zframe::{self, FrameShape};
    let mut r = rng("zstd-frame-variants");
    let mut runs = random(&mut r, 64);
    runs[32..48].fill(0x5a);
    let entries = [
        Entry::forced(Tensor::new("w", "U8", &[64], runs), None, 16, &[Force::new(Encoding::Raw).zstd()]),
        Entry::forced(random_tensor(&mut r, "long", "U8", &[300]), None, 300, &[Force::new(Encoding::Raw).zstd()]),
    ];
    let dir = "valid/zstd-frame-variants";
    let path = suite.path(&format!("{dir}/delta.tpde"));
    std::fs::create_dir_all(suite.path(dir)).expect("mkdir");
    let target_file = forge::write_delta(&path, &entries, None);
    let mut model = Model::parse(&std::fs::read(&path).expect("read"));
    let chunk = |k: usize| &entries[0].target.bytes[16 * k..16 * (k + 1)];
    let frames = [
        zframe::frame(chunk(0), FrameShape { window_log: Some(10), ..FrameShape::single(16) }),
        zframe::frame(chunk(1), FrameShape { blocks: 3, checksum: Some(true), ..FrameShape::single(16) }),
        zframe::frame(chunk(2), FrameShape { block_type: 1, ..FrameShape::single(16) }),
        zframe::frame(chunk(3), FrameShape { window_log: Some(17), blocks: 2, ..FrameShape::single(16) }),
        zframe::frame(&entries[1].target.bytes, FrameShape::single(300)),
    ];
    for (part, frame) in model.parts.iter_mut().zip(&frames) {
        part.set_stream_data(0, frame);
    }
    model.relayout();
    std::fs::write(&path, model.to_bytes()).expect("write");
    let target_path = suite.scratch("zstd-frame-variants-target.safetensors");
    std::fs::write(&target_path, target_file).expect("write");
    let expected = format!("{dir}/expected.json");
    let targets: Vec<Tensor> = entries.iter().map(|e| e.target.clone()).collect();
    suite.write_expected(&expected, &format!("{dir}/delta.tpde"), &targets);
    suite.accept(
        "zstd-frame-variants",
        &format!("{dir}/delta.tpde"),
        None,
        &expected,
        &target_path,
        "§8.5",
        "generator valid::zstd_frame_variants",
    );
}

/// Headers that differ from what the library writes but mean the same (§5.1, §5.3):
/// derived from `mixed`, decoded against its base to its expected tensors.
fn header_variants(suite: &mut Suite) {
    let good = suite.read("valid/mixed/delta.tpde");
    type Edit = Box<dyn Fn(String) -> String>;
    let variants: [(&str, &str, Edit); 5] = [
        (
            "header-explicit-nulls",
            "§5.1",
            Box::new(|t: String| {
                t.replacen("\"target\":{", "\"target\":{\"index_json\":null,", 1).replacen(
                    "{\"name\":\"d\",",
                    "{\"name\":\"d\",\"base\":null,",
                    1,
                )
            }),
        ),
        (
            "header-whitespace",
            "§5.1",
            Box::new(|t: String| {
                let value: serde_json::Value = serde_json::from_str(&t).expect("JSON");
                format!("\r\n\t {} \n", serde_json::to_string_pretty(&value).expect("JSON"))
            }),
        ),
        (
            "header-nesting-127",
            "§5.1",
            Box::new(|t: String| {
                t.replacen(
                    '{',
                    &format!("{{\"extensions\":{{\"org.example.deep\":{}{}}},", "[".repeat(125), "]".repeat(125)),
                    1,
                )
            }),
        ),
        // Scalars add no depth: a number inside the 127th array is allowed.
        (
            "header-nesting-127-with-scalar",
            "§5.1",
            Box::new(|t: String| {
                t.replacen(
                    '{',
                    &format!("{{\"extensions\":{{\"org.example.deep\":{}1{}}},", "[".repeat(125), "]".repeat(125)),
                    1,
                )
            }),
        ),
        (
            "embedded-header-extra-member",
            "§5.3",
            Box::new(|t: String| t.replacen("{\\\"dtype\\\":", "{\\\"org.example\\\":[1],\\\"dtype\\\":", 1)),
        ),
    ];
    for (name, spec, edit) in variants {
        let mut model = Model::parse(&good);
        model.header = edit(String::from_utf8(model.header.clone()).expect("UTF-8")).into_bytes();
        let rel = format!("valid/{name}/delta.tpde");
        suite.write(&rel, &model.to_bytes());
        let provenance = format!("generator valid::header_variants {name}");
        suite.accept_decoded(
            name,
            &rel,
            Some("valid/mixed/base.safetensors"),
            "valid/mixed/expected.json",
            spec,
            &provenance,
        );
    }
}

/// Cases made by the library's encoder from realistic checkpoint pairs.
fn natural_cases(suite: &mut Suite) {
    let mut r = rng("finetune");
    let w = random_tensor(&mut r, "model.layers.0.weight", "BF16", &[8, 32]);
    let bias = random_tensor(&mut r, "model.layers.0.bias", "F32", &[32]);
    let changed: Vec<usize> = (0..256).filter(|i| i % 7 == 0).collect();
    let base = Ck::File(vec![w.clone(), bias.clone()], None);
    let target = Ck::File(vec![nudge(&w, &changed), nudge(&bias, &[3])], None);
    natural(suite, "natural-finetune", "§8", Some(&base), None, &target, 64);

    let mut r = rng("multi-chunk");
    let base_t = random_tensor(&mut r, "w", "F32", &[10, 16]);
    let mut target_t = nudge(&base_t, &[50, 90]);
    let fresh = random(&mut r, 4 * 16 * 3);
    target_t.bytes[6 * 64..9 * 64].copy_from_slice(&fresh);
    natural(suite, "multi-chunk", "§6", Some(&Ck::File(vec![base_t], None)), None, &Ck::File(vec![target_t], None), 16);

    let mut r = rng("tensors-added-removed");
    let keep = random_tensor(&mut r, "keep", "F16", &[16]);
    let old = random_tensor(&mut r, "old", "F32", &[8]);
    let new = random_tensor(&mut r, "new", "F32", &[8]);
    natural(
        suite,
        "tensors-added-removed",
        "§5.6",
        Some(&Ck::File(vec![old, keep.clone()], None)),
        None,
        &Ck::File(vec![nudge(&keep, &[2]), new], None),
        16,
    );

    let mut r = rng("reshape-leading-grew");
    let base_t = random_tensor(&mut r, "w", "F32", &[4, 8]);
    let mut target_t = random_tensor(&mut r, "w", "F32", &[6, 8]);
    target_t.bytes[..128].copy_from_slice(&nudge(&base_t, &[1]).bytes);
    natural(
        suite,
        "reshape-leading-dim-grew",
        "§8",
        Some(&Ck::File(vec![base_t], None)),
        None,
        &Ck::File(vec![target_t], None),
        16,
    );

    let mut r = rng("reshape-leading-shrank");
    let base_t = random_tensor(&mut r, "w", "I32", &[6, 8]);
    let target_t = Tensor::new("w", "I32", &[4, 8], nudge(&base_t, &[9]).bytes[..128].to_vec());
    natural(
        suite,
        "reshape-leading-dim-shrank",
        "§8",
        Some(&Ck::File(vec![base_t], None)),
        None,
        &Ck::File(vec![target_t], None),
        16,
    );

    let mut r = rng("reshape-other");
    let base_a = random_tensor(&mut r, "transposed", "F32", &[4, 8]);
    let base_b = random_tensor(&mut r, "rank", "U16", &[32]);
    let target_a = Tensor::new("transposed", "F32", &[8, 4], base_a.bytes.clone());
    let target_b = Tensor::new("rank", "U16", &[4, 8], base_b.bytes.clone());
    natural(
        suite,
        "reshape-other",
        "§5.6",
        Some(&Ck::File(vec![base_a, base_b], None)),
        None,
        &Ck::File(vec![target_a, target_b], None),
        16,
    );

    let mut r = rng("dtype-changed");
    let base_a = random_tensor(&mut r, "cast", "F32", &[16]);
    let same = random_tensor(&mut r, "same", "BF16", &[16]);
    let target_a = random_tensor(&mut r, "cast", "BF16", &[16]);
    natural(
        suite,
        "dtype-changed",
        "§5.6",
        Some(&Ck::File(vec![base_a, same.clone()], None)),
        None,
        &Ck::File(vec![target_a, same], None),
        16,
    );

    let mut r = rng("sharded");
    let shard_tensors: Vec<Tensor> =
        (0..6).map(|i| random_tensor(&mut r, &format!("layer.{i}"), "BF16", &[3, 16])).collect();
    let base = Ck::Sharded(vec![
        ("model-00001-of-00002.safetensors".into(), shard_tensors[..3].to_vec()),
        ("model-00002-of-00002.safetensors".into(), shard_tensors[3..].to_vec()),
    ]);
    let moved: Vec<Tensor> = shard_tensors
        .iter()
        .enumerate()
        .map(|(i, t)| if i % 2 == 0 { nudge(t, &[i, 40]) } else { t.clone() })
        .collect();
    let target = Ck::Sharded(vec![
        ("model-00001-of-00003.safetensors".into(), vec![moved[1].clone(), moved[0].clone()]),
        ("model-00002-of-00003.safetensors".into(), moved[2..4].to_vec()),
        ("model-00003-of-00003.safetensors".into(), moved[4..].to_vec()),
    ]);
    natural(suite, "sharded", "§5.3", Some(&base), None, &target, 16);

    // The base is identified by content: the same tensors resharded are accepted.
    let resharded = Ck::Sharded(vec![
        ("a.safetensors".into(), vec![shard_tensors[5].clone(), shard_tensors[0].clone()]),
        ("b.safetensors".into(), shard_tensors[1..5].to_vec()),
    ]);
    let single = Ck::File(shard_tensors.clone(), None);
    let target_single = Ck::File(moved.clone(), None);
    natural(suite, "base-resharded", "§5.6", Some(&single), Some(&resharded), &target_single, 16);

    let mut r = rng("standalone");
    let tensors = vec![
        random_tensor(&mut r, "embed", "BF16", &[4, 16]),
        random_tensor(&mut r, "norm", "F32", &[16]),
        random_tensor(&mut r, "ids", "I64", &[5]),
    ];
    natural(suite, "standalone", "§8.1", None, None, &Ck::File(tensors, None), 16);

    let mut r = rng("safetensors-metadata");
    let t = random_tensor(&mut r, "w", "F16", &[16]);
    let meta: BTreeMap<String, String> = [("format".into(), "pt".into()), ("step".into(), "1000".into())].into();
    let base_meta: BTreeMap<String, String> = [("format".into(), "pt".into())].into();
    natural(
        suite,
        "safetensors-metadata",
        "§5.3",
        Some(&Ck::File(vec![t.clone()], Some(base_meta))),
        None,
        &Ck::File(vec![nudge(&t, &[7])], Some(meta)),
        16,
    );

    let mut r = rng("unicode-names");
    let names = ["layer.0/ω", "quote\"and\\backslash", "tab\tnewline\n", "emoji.🙂"];
    let tensors: Vec<Tensor> = names.iter().map(|n| random_tensor(&mut r, n, "U8", &[4])).collect();
    let changed: Vec<Tensor> = tensors.iter().map(|t| nudge(t, &[1])).collect();
    natural(suite, "unicode-names", "§5.5", Some(&Ck::File(tensors, None)), None, &Ck::File(changed, None), 16);

    // Every class of character that the canonical decode escapes, or writes as it is
    // (§11.4): the short escapes, other controls as \u00XX, and DEL, the line
    // separators and `/` unescaped.
    let mut r = rng("names-canonical-escapes");
    let names = ["ctl\u{1}\u{1f}\u{0}", "short\u{8}\u{c}\r", "del\u{7f}/slash", "sep\u{2028}\u{2029}\u{85}"];
    let tensors: Vec<Tensor> = names.iter().map(|n| random_tensor(&mut r, n, "U8", &[4])).collect();
    let changed: Vec<Tensor> = tensors.iter().map(|t| nudge(t, &[2])).collect();
    natural(
        suite,
        "names-canonical-escapes",
        "§11.4",
        Some(&Ck::File(tensors, None)),
        None,
        &Ck::File(changed, None),
        16,
    );
}

/// A safetensors file whose tensor objects carry a member that readers ignore
/// (spec §5.3 S2), as another writer may produce.
fn with_extra_member(tensors: &[Tensor]) -> Vec<u8> {
    let (_, header) = safet::file(tensors, None);
    let mut header = header.trim_end().replace("{\"dtype\":", "{\"org.example\":[1],\"dtype\":");
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    for t in tensors {
        out.extend_from_slice(&t.bytes);
    }
    out
}

/// Two deltas in a chain (spec §11.2 B0): the target that the first rebuilds, whose
/// embedded header has a member readers ignore, is the base of the second. The
/// library checks that the first case rebuilds that base byte for byte.
fn chain_cases(suite: &mut Suite) {
    let mut r = rng("chain");
    let w = random_tensor(&mut r, "w", "BF16", &[8, 16]);
    let bias = random_tensor(&mut r, "b", "F32", &[16]);
    let step1 = vec![nudge(&w, &[1, 5, 9]), nudge(&bias, &[2])];
    let step2 = vec![nudge(&step1[0], &[0, 7, 100]), step1[1].clone()];
    let base0 = safet::file(&[w, bias], None).0;
    let target1 = with_extra_member(&step1);
    let target2 = safet::file(&step2, None).0;
    for (name, base, target, tensors) in
        [("chain-step-1", &base0, &target1, &step1), ("chain-step-2", &target1, &target2, &step2)]
    {
        let dir = format!("valid/{name}");
        let base_rel = format!("{dir}/base.safetensors");
        suite.write(&base_rel, base);
        let target_path = suite.scratch(&format!("{name}-target.safetensors"));
        std::fs::write(&target_path, target).expect("write the target");
        let base_ck = Checkpoint::open(&suite.path(&base_rel)).expect("the base opens");
        let target_ck = Checkpoint::open(&target_path).expect("the target opens");
        let delta = format!("{dir}/delta.tpde");
        let options = EncodeOptions { chunk_words: 32, settings: settings_1_0() };
        tpde::encode(Some(&base_ck), &target_ck, &suite.path(&delta), options, &NoProgress).expect("encodes");
        normalise_writer(&suite.path(&delta));
        let expected = format!("{dir}/expected.json");
        suite.write_expected(&expected, &delta, tensors);
        let provenance = format!("generator valid::chain_cases {name}");
        suite.accept(name, &delta, Some(&base_rel), &expected, &target_path, "§11.2", &provenance);
    }
}

/// Bases that spec §11.2 B0 accepts although the library would not write them, for
/// the delta of `mixed`: members out of data order, `__metadata__` null, and a
/// sharded base whose shard name lacks `.safetensors` and whose index has members
/// readers ignore.
fn base_variants(suite: &mut Suite) {
    let base = Checkpoint::open(&suite.path("valid/mixed/base.safetensors")).expect("the base opens");
    let file = &base.files[0];
    let data_start = 8 + file.header_text.len();
    let tensors: Vec<(Tensor, u64)> = file
        .tensors
        .iter()
        .map(|t| {
            let shape: Vec<u64> = t.shape.clone();
            let dtype = DTYPES.iter().find(|d| **d == t.dtype.as_str()).expect("a known dtype");
            (Tensor::new(&t.name, dtype, &shape, file.tensor_bytes(t).to_vec()), (t.range.start - data_start) as u64)
        })
        .collect();
    let data = &file.bytes()[data_start..];
    let members: Vec<String> = tensors.iter().map(|(t, offset)| safet::member(t, *offset, "")).collect();
    let reversed: Vec<String> = members.iter().rev().cloned().collect();
    let variants = [
        ("base-members-not-in-data-order", format!("{{{}}}", reversed.join(","))),
        ("base-metadata-null", format!("{{\"__metadata__\":null,{}}}", members.join(","))),
    ];
    let provenance = "generator valid::base_variants";
    for (name, header) in variants {
        let rel = format!("valid/bases/{name}.safetensors");
        suite.write(&rel, &safet::raw_file(&header, data));
        suite.accept_decoded(
            name,
            "valid/mixed/delta.tpde",
            Some(&rel),
            "valid/mixed/expected.json",
            "§11.2",
            provenance,
        );
    }
    let dir = "valid/bases/base-sharded-lenient-index";
    suite.write(&format!("{dir}/weights-1.st"), &safet::raw_file(&format!("{{{}}}", members.join(",")), data));
    let weight_map: serde_json::Map<String, serde_json::Value> =
        tensors.iter().map(|(t, _)| (t.name.clone(), json!("weights-1.st"))).collect();
    let index = json!({ "metadata": [1, { "x": null }], "org.example": true, "weight_map": weight_map });
    suite.write(&format!("{dir}/{}", tpde::INDEX_FILE), index.to_string().as_bytes());
    suite.accept_decoded(
        "base-sharded-lenient-index",
        "valid/mixed/delta.tpde",
        Some(dir),
        "valid/mixed/expected.json",
        "§11.2",
        provenance,
    );
}
