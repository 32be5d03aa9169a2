//! `valid/rans-*` and `valid/natural-finetune-rans`: files of format 1.1 whose
//! streams use the lane rANS codec (spec §8.7). Every stream is built by
//! [`crate::rans`] from the spec, with the context a case asks for, except in
//! `natural-finetune-rans`, which the library's default writer encodes.

use rand::seq::SliceRandom;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use tpde::{
    format::{Encoding, ValueLayout, ValueOp},
    EncodeOptions, EncodeSettings,
};

use crate::forge::{Entry, Force, Store};
use crate::model::{at, Model};
use crate::rans::Ctx;
use crate::safet::{self, Tensor};
use crate::suite::Suite;
use crate::valid::{bases, forged_as, mixed_entries, natural_with, nudge, random, random_tensor, rng, Ck};

const SPEC: &str = "§8.7";

/// The valid case whose bytes the lane rANS faults of `invalid/rans-*` change.
pub const SOURCE: &str = "valid/rans-mixed/delta.tpde";
/// Its base: the base of `valid/mixed`, byte for byte.
pub const BASE: &str = "valid/rans-mixed/base.safetensors";

fn forged(suite: &mut Suite, name: &str, entries: &[Entry]) {
    let provenance = format!("generator valid_rans::{}", name.replace('-', "_"));
    forged_as(suite, name, SPEC, entries, &bases(entries), &provenance);
}

/// Words per row of the tensors below: every word width, and for each the
/// 1-byte float and integer kinds (spec §7).
const WIDTHS: [&str; 7] = ["U8", "F8_E4M3", "BF16", "F16", "F32", "F64", "I64"];

/// The tensors of `valid/mixed` (same bases, same targets for `a`, `b`, `c`), with
/// three more tensors without a base, every chunk forced so that one file holds
/// every kind of stream the lane rANS faults need. Chunks:
///
/// - 0: `a` sparse, gaps of width 2, rotated planes; gap plane 0 and value plane 0
///   on the plane above, gap plane 1 none, value plane 1 on the base key;
/// - 1: `a` unchanged;
/// - 2: `b` sparse, bitmap (none), words layout (none);
/// - 3: `c` dense, byte planes grouped by base key: plane 0 on the plane above
///   (stored), plane 1 stored, plane 2 on the plane above (zstd), plane 3 zstd;
/// - 4: `c` dense, sub, rotated planes: planes 0 and 2 on the plane above, 1 and
///   3 on the base key;
/// - 5: `d` raw `U8`, 300 words, two tiles of `2^8` (none; a bitmap-form table);
/// - 6: `e` raw `BF16`, byte planes: plane 0 on the plane above, plane 1 none;
/// - 7, 8: `f` raw `U8`, zstd and stored.
#[allow(clippy::many_single_char_names)] // the tensors' names
pub fn rans_mixed_entries() -> Vec<Entry> {
    let mixed = mixed_entries();
    let (a, b, c) = (&mixed[0], &mixed[1], &mixed[2]);
    let mut r = rng("rans-mixed");
    let d = random_tensor(&mut r, "d", "U8", &[300]);
    let e = random_tensor(&mut r, "e", "BF16", &[16]);
    let f = random_tensor(&mut r, "f", "U8", &[20]);
    vec![
        Entry::forced(
            a.target.clone(),
            a.base.clone(),
            16,
            &[
                Force::new(Encoding::Sparse)
                    .gap_width(2)
                    .layout(ValueLayout::RotatedBytePlanes)
                    .rans(Ctx::HigherPlane, Ctx::HigherPlane)
                    .stream(3, Store::Rans(Ctx::BaseKey)),
                Force::new(Encoding::Unchanged),
            ],
        ),
        Entry::forced(
            b.target.clone(),
            b.base.clone(),
            16,
            &[Force::new(Encoding::Sparse).bitmap().rans(Ctx::None, Ctx::None)],
        ),
        Entry::forced(
            c.target.clone(),
            c.base.clone(),
            16,
            &[
                Force::new(Encoding::Dense)
                    .layout(ValueLayout::BytePlanes)
                    .grouped()
                    .rans(Ctx::None, Ctx::HigherPlane)
                    .stream(1, Store::Stored)
                    .stream(3, Store::Zstd),
                Force::new(Encoding::Dense)
                    .op(ValueOp::Sub)
                    .layout(ValueLayout::RotatedBytePlanes)
                    .rans(Ctx::None, Ctx::HigherPlane)
                    .stream(1, Store::Rans(Ctx::BaseKey))
                    .stream(3, Store::Rans(Ctx::BaseKey)),
            ],
        ),
        Entry::forced(d, None, 300, &[Force::new(Encoding::Raw).rans(Ctx::None, Ctx::None).tile_log2(8)]),
        Entry::forced(
            e,
            None,
            16,
            &[Force::new(Encoding::Raw).layout(ValueLayout::BytePlanes).rans(Ctx::None, Ctx::HigherPlane)],
        ),
        Entry::forced(f, None, 16, &[Force::new(Encoding::Raw).zstd(), Force::new(Encoding::Raw)]),
    ]
}

/// Writes every valid lane rANS case.
pub fn generate(suite: &mut Suite) {
    let entries = rans_mixed_entries();
    forged(suite, "rans-mixed", &entries);
    assert_eq!(suite.read(BASE), suite.read(crate::invalid::BASE), "rans-mixed has the base of mixed");
    contexts(suite);
    sparse_and_dense(suite);
    raw_and_rotated(suite);
    multi_tile(suite);
    table_forms(suite);
    natural_finetune(suite);
}

/// A target that differs from `base` in the low byte of every third word and in
/// the high byte of every seventh, so that every plane carries something.
pub fn changed(base: &Tensor) -> Tensor {
    let wb = safet::word_bytes(base.dtype);
    let words = base.bytes.len() / wb;
    let mut out = nudge(base, &(0..words).step_by(3).collect::<Vec<_>>());
    for w in (5..words).step_by(7) {
        out.bytes[w * wb + wb - 1] ^= 0x01;
    }
    out
}

/// Every context kind on every word width: one case per context, each with a
/// tensor per width (sparse with gaps, dense in byte planes, dense sub in rotated
/// planes). Values on the base key also come from a base shorter than the tensor
/// (keys of zero words past its end) and from a tensor without base (every key
/// that of zero, so one of the two tables is unused).
fn contexts(suite: &mut Suite) {
    for (name, ctx) in [
        ("rans-context-none", Ctx::None),
        ("rans-context-base-key", Ctx::BaseKey),
        ("rans-context-higher-plane", Ctx::HigherPlane),
    ] {
        let mut r = rng(name);
        let mut entries = Vec::new();
        for dtype in WIDTHS {
            let base = random_tensor(&mut r, &format!("{}.w", dtype.to_lowercase()), dtype, &[48]);
            let target = changed(&base);
            // The plane above exists for gaps only from width 2.
            let sparse = if ctx == Ctx::HigherPlane {
                Force::new(Encoding::Sparse).gap_width(2)
            } else {
                Force::new(Encoding::Sparse).gaps()
            };
            let positions = if ctx == Ctx::BaseKey { Ctx::None } else { ctx };
            let plans = [
                sparse.layout(ValueLayout::BytePlanes).rans(positions, ctx),
                Force::new(Encoding::Dense).layout(ValueLayout::BytePlanes).rans(positions, ctx),
                Force::new(Encoding::Dense)
                    .op(ValueOp::Sub)
                    .layout(ValueLayout::RotatedBytePlanes)
                    .rans(positions, ctx),
            ];
            entries.push(Entry::forced(target, Some(base), 16, &plans));
        }
        if ctx == Ctx::BaseKey {
            let short = random_tensor(&mut r, "short.base", "BF16", &[5]);
            let mut target = random_tensor(&mut r, "short.base", "BF16", &[16]);
            target.bytes[..10].copy_from_slice(&nudge(&short, &[1, 3]).bytes);
            let dense = Force::new(Encoding::Dense).layout(ValueLayout::BytePlanes).rans(Ctx::None, Ctx::BaseKey);
            entries.push(Entry::forced(target, Some(short), 16, &[dense]));
            let mut alone = Tensor::new("no.base", "BF16", &[16], vec![0; 32]);
            for (w, v) in [(2, 0x3f80u16), (9, 0xbf80), (13, 0x4000)] {
                alone.bytes[2 * w..2 * w + 2].copy_from_slice(&v.to_le_bytes());
            }
            let sparse =
                Force::new(Encoding::Sparse).gaps().layout(ValueLayout::BytePlanes).rans(Ctx::None, Ctx::BaseKey);
            entries.push(Entry::forced(alone, None, 16, &[sparse]));
        }
        forged(suite, name, &entries);
    }
}

/// Sparse chunks with gaps of width 1, 2 and 4 (the plane above on gap planes)
/// and with a bitmap; dense chunks in every layout.
fn sparse_and_dense(suite: &mut Suite) {
    let mut r = rng("rans-sparse-gaps");
    let w1 = random_tensor(&mut r, "w1", "U16", &[64]);
    let w2 = random_tensor(&mut r, "w2", "BF16", &[600]);
    let wide = random_tensor(&mut r, "w4.wide", "I16", &[40]);
    // Gaps past 65535 need a long chunk; the short base keeps the files small.
    let w4_base = Tensor::new("w4", "U8", &[8], vec![0; 8]);
    let mut w4 = Tensor::new("w4", "U8", &[65_600], vec![0; 65_600]);
    w4.bytes[2] = 7;
    w4.bytes[65_590] = 9;
    let planes = Force::new(Encoding::Sparse).gaps().layout(ValueLayout::BytePlanes);
    let entries = [
        Entry::forced(nudge(&w1, &[0, 1, 9, 40, 63]), Some(w1), 64, &[planes.rans(Ctx::None, Ctx::BaseKey)]),
        Entry::forced(
            nudge(&w2, &[3, 400, 401, 599]),
            Some(w2),
            600,
            &[planes.rans(Ctx::HigherPlane, Ctx::HigherPlane)],
        ),
        Entry::forced(w4, Some(w4_base), 65_600, &[planes.rans(Ctx::HigherPlane, Ctx::None)]),
        Entry::forced(
            nudge(&wide, &[0, 39]),
            Some(wide),
            40,
            &[Force::new(Encoding::Sparse).gap_width(4).rans(Ctx::HigherPlane, Ctx::None)],
        ),
    ];
    forged(suite, "rans-sparse-gaps", &entries);

    let mut r = rng("rans-sparse-bitmap");
    let odd = random_tensor(&mut r, "odd", "F32", &[12]);
    let even = random_tensor(&mut r, "even", "F16", &[2, 16]);
    let words = random_tensor(&mut r, "words", "U16", &[16]);
    let bitmap = Force::new(Encoding::Sparse).bitmap();
    let entries = [
        Entry::forced(
            nudge(&odd, &[0, 11]),
            Some(odd),
            16,
            &[bitmap.layout(ValueLayout::BytePlanes).rans(Ctx::None, Ctx::BaseKey)],
        ),
        Entry::forced(
            nudge(&even, &[1, 2, 3, 4, 5, 6, 7, 8, 20]),
            Some(even),
            16,
            &[bitmap.layout(ValueLayout::RotatedBytePlanes).op(ValueOp::Sub).rans(Ctx::None, Ctx::HigherPlane)],
        ),
        Entry::forced(nudge(&words, &[0, 5, 15]), Some(words), 16, &[bitmap.rans(Ctx::None, Ctx::None)]),
    ];
    forged(suite, "rans-sparse-bitmap", &entries);

    let mut r = rng("rans-dense");
    let f32s = random_tensor(&mut r, "f32", "F32", &[32]);
    let bf16 = random_tensor(&mut r, "bf16.words", "BF16", &[32]);
    let i64s = random_tensor(&mut r, "i64", "I64", &[16]);
    let dense = Force::new(Encoding::Dense);
    let entries = [
        Entry::forced(
            changed(&f32s),
            Some(f32s),
            16,
            &[
                dense.layout(ValueLayout::BytePlanes).rans(Ctx::None, Ctx::BaseKey).max_tables(3),
                dense.layout(ValueLayout::BytePlanes).op(ValueOp::Sub).rans(Ctx::None, Ctx::HigherPlane),
            ],
        ),
        Entry::forced(changed(&bf16), Some(bf16), 32, &[dense.rans(Ctx::None, Ctx::None)]),
        // Planes on the plane above, the top one on the base key.
        Entry::forced(
            changed(&i64s),
            Some(i64s),
            16,
            &[dense
                .layout(ValueLayout::BytePlanes)
                .rans(Ctx::None, Ctx::HigherPlane)
                .stream(7, Store::Rans(Ctx::BaseKey))],
        ),
    ];
    forged(suite, "rans-dense", &entries);
}

/// Raw chunks (none and the plane above only) and rotated planes.
fn raw_and_rotated(suite: &mut Suite) {
    let mut r = rng("rans-raw");
    let raw = Force::new(Encoding::Raw);
    let entries = [
        Entry::forced(random_tensor(&mut r, "words", "F32", &[20]), None, 16, &[raw.rans(Ctx::None, Ctx::None)]),
        Entry::forced(
            random_tensor(&mut r, "planes", "BF16", &[20]),
            None,
            16,
            &[raw.layout(ValueLayout::BytePlanes).rans(Ctx::None, Ctx::HigherPlane)],
        ),
        Entry::forced(
            random_tensor(&mut r, "rotated", "F64", &[20]),
            None,
            16,
            &[raw.layout(ValueLayout::RotatedBytePlanes).rans(Ctx::None, Ctx::HigherPlane)],
        ),
        Entry::forced(
            random_tensor(&mut r, "u8", "U8", &[20]),
            None,
            16,
            &[raw.layout(ValueLayout::BytePlanes).rans(Ctx::None, Ctx::None)],
        ),
    ];
    forged(suite, "rans-raw", &entries);

    let mut r = rng("rans-rotated-planes");
    let mut entries = Vec::new();
    for dtype in ["BF16", "F32", "F64"] {
        let base = random_tensor(&mut r, &format!("{}.rotated", dtype.to_lowercase()), dtype, &[32]);
        let rotated = ValueLayout::RotatedBytePlanes;
        let plans = [
            Force::new(Encoding::Sparse).gaps().op(ValueOp::Sub).layout(rotated).rans(Ctx::None, Ctx::BaseKey),
            Force::new(Encoding::Dense).op(ValueOp::Sub).layout(rotated).rans(Ctx::None, Ctx::HigherPlane),
        ];
        let mut target = changed(&base);
        // Sign flips: the rotation moves the sign to bit 0 of the low plane.
        let wb = safet::word_bytes(dtype);
        for w in [18, 27] {
            target.bytes[w * wb + wb - 1] ^= 0x80;
        }
        entries.push(Entry::forced(target, Some(base), 16, &plans));
    }
    forged(suite, "rans-rotated-planes", &entries);
}

/// Streams of several tiles (`tile_log2` 8): tiles of 256 symbols and a last
/// tile of fewer than 32, so fewer lanes; contexts that cross tiles.
fn multi_tile(suite: &mut Suite) {
    let mut r = rng("rans-multi-tile");
    let long = random_tensor(&mut r, "u8.long", "U8", &[1000]);
    let mut skewed = random_tensor(&mut r, "u8.short.last.tile", "U8", &[519]);
    for byte in &mut skewed.bytes {
        *byte &= 0x0f;
    }
    let bf16 = random_tensor(&mut r, "bf16.dense", "BF16", &[600]);
    let u16s = random_tensor(&mut r, "u16.sparse", "U16", &[2000]);
    let mut positions: Vec<usize> = (0..2000).collect();
    positions.shuffle(&mut r);
    positions.truncate(300);
    positions.sort_unstable();
    let raw = Force::new(Encoding::Raw).rans(Ctx::None, Ctx::None).tile_log2(8);
    let entries = [
        Entry::forced(long, None, 1000, &[raw]),
        Entry::forced(skewed, None, 519, &[raw]),
        Entry::forced(
            changed(&bf16),
            Some(bf16),
            600,
            &[Force::new(Encoding::Dense)
                .layout(ValueLayout::BytePlanes)
                .rans(Ctx::None, Ctx::HigherPlane)
                .stream(1, Store::Rans(Ctx::BaseKey))
                .tile_log2(8)],
        ),
        Entry::forced(
            nudge(&u16s, &positions),
            Some(u16s),
            2000,
            &[Force::new(Encoding::Sparse)
                .gap_width(2)
                .layout(ValueLayout::BytePlanes)
                .rans(Ctx::HigherPlane, Ctx::BaseKey)
                .tile_log2(8)],
        ),
    ];
    forged(suite, "rans-multi-tile", &entries);
}

/// `n` bytes holding each of `symbols` exactly `counts[i]` times, shuffled.
fn with_counts(r: &mut ChaCha8Rng, symbols: &[u8], counts: &[usize]) -> Vec<u8> {
    let mut out: Vec<u8> = symbols.iter().zip(counts).flat_map(|(&s, &c)| std::iter::repeat_n(s, c)).collect();
    out.shuffle(r);
    out
}

/// Tables of every form: one symbol of frequency `2^k` (with `k` = 11, 7 and 1,
/// so written in two bytes, two bytes at 128, one byte), per-context tables that
/// are each one certain symbol, 31 symbols (the longest list), 32 (the shortest
/// bitmap), 256 (a full bitmap), frequencies 127 and 128 (the two forms' edge),
/// `prob_bits` 5 and 1, and `tile_log2` 24.
fn table_forms(suite: &mut Suite) {
    let mut r = rng("rans-one-symbol-table");
    let base = random_tensor(&mut r, "low.byte.only", "U16", &[64]);
    let all: Vec<usize> = (0..64).collect();
    // Per-context certain symbols: the low plane is a function of the high one.
    let ctx_base = random_tensor(&mut r, "one.per.context", "BF16", &[32]);
    let mut ctx_target = ctx_base.clone();
    for w in 0..32 {
        let hi = u8::try_from(w % 3).expect("small");
        let lo = [0x11, 0x22, 0x33][usize::from(hi)];
        ctx_target.bytes[2 * w] ^= lo;
        ctx_target.bytes[2 * w + 1] ^= hi;
    }
    let raw = Force::new(Encoding::Raw).rans(Ctx::None, Ctx::None);
    let mut two = vec![0x10u8; 40];
    for (i, byte) in two.iter_mut().enumerate() {
        if r.gen::<bool>() || i == 0 {
            *byte = 0x20;
        }
    }
    let entries = [
        Entry::forced(
            nudge(&base, &all),
            Some(base),
            64,
            &[Force::new(Encoding::Dense).layout(ValueLayout::BytePlanes).rans(Ctx::None, Ctx::None)],
        ),
        Entry::forced(
            ctx_target,
            Some(ctx_base),
            32,
            &[Force::new(Encoding::Dense).layout(ValueLayout::BytePlanes).rans(Ctx::None, Ctx::HigherPlane)],
        ),
        Entry::forced(Tensor::new("k7", "U8", &[40], vec![7; 40]), None, 40, &[raw.prob_bits(7)]),
        Entry::forced(Tensor::new("k1.one", "U8", &[40], vec![0x42; 40]), None, 40, &[raw.prob_bits(1)]),
        Entry::forced(Tensor::new("k1.two", "U8", &[40], two), None, 40, &[raw.prob_bits(1)]),
    ];
    forged(suite, "rans-one-symbol-table", &entries);

    let mut r = rng("rans-table-forms");
    let every: Vec<u8> = (0..=255).collect();
    let s256 = with_counts(&mut r, &every, &[8; 256]);
    let s32_symbols: Vec<u8> = (0..32).map(|i| i * 8 + 3).collect();
    let mut s32_counts = vec![59; 32];
    s32_counts[0] = 128;
    s32_counts[1] = 127;
    s32_counts[2] = 82;
    let s32 = with_counts(&mut r, &s32_symbols, &s32_counts);
    let s31_symbols: Vec<u8> = (0..31).map(|i| 255 - i * 7).collect();
    let mut s31_counts = vec![64; 31];
    s31_counts[30] = 128;
    let s31 = with_counts(&mut r, &s31_symbols, &s31_counts);
    for (bytes, counts) in [(&s256, 256), (&s32, 32), (&s31, 31)] {
        assert_eq!(bytes.len(), 2048, "{counts} symbols: the counts are the frequencies at k = 11");
    }
    let raw = Force::new(Encoding::Raw).rans(Ctx::None, Ctx::None);
    let entries = [
        Entry::forced(Tensor::new("s256", "U8", &[2048], s256), None, 2048, &[raw.tile_log2(24)]),
        Entry::forced(Tensor::new("s32", "U8", &[2048], s32), None, 2048, &[raw]),
        Entry::forced(Tensor::new("s31", "U8", &[2048], s31.clone()), None, 2048, &[raw.tile_log2(8)]),
        Entry::forced(Tensor::new("s31.k5", "U8", &[2048], s31), None, 2048, &[raw.prob_bits(5)]),
        Entry::forced(
            Tensor::new("random", "U8", &[64], random(&mut r, 64)),
            None,
            64,
            &[raw.prob_bits(8).tile_log2(8)],
        ),
    ];
    forged(suite, "rans-table-forms", &entries);
}

/// A normal sample (Box–Muller).
fn normal(r: &mut ChaCha8Rng, sigma: f64) -> f64 {
    let u1 = 1.0 - r.gen::<f64>();
    let u2 = r.gen::<f64>();
    sigma * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// The bfloat16 nearest to `x` (ties to even).
#[allow(clippy::cast_possible_truncation)]
fn bf16(x: f64) -> u16 {
    let bits = (x as f32).to_bits();
    ((bits + 0x7fff + ((bits >> 16) & 1)) >> 16) as u16
}

fn bf16_tensor(name: &str, shape: &[u64], values: &[f64]) -> Tensor {
    Tensor::new(name, "BF16", shape, values.iter().flat_map(|&v| bf16(v).to_le_bytes()).collect())
}

/// A small BF16 fine-tune, as a trainer leaves it: weights drawn like an
/// initialised transformer layer, each moved by a small update (most by a few
/// units in the last place, many not at all), an embedding whose rows mostly stay,
/// encoded by the library's default writer (lane rANS) and decoded back.
fn natural_finetune(suite: &mut Suite) {
    let mut r = rng("natural-finetune-rans");
    let specs: [(&str, &[u64], f64, f64); 4] = [
        ("model.embed_tokens.weight", &[128, 64], 0.0, 0.02),
        ("model.layers.0.input_layernorm.weight", &[64], 1.0, 0.05),
        ("model.layers.0.self_attn.q_proj.weight", &[64, 128], 0.0, 0.02),
        ("model.layers.0.mlp.down_proj.weight", &[128, 128], 0.0, 0.02),
    ];
    let mut base = Vec::new();
    let mut target = Vec::new();
    for (name, shape, mean, sigma) in specs {
        let count = usize::try_from(shape.iter().product::<u64>()).expect("small");
        let weights: Vec<f64> = (0..count).map(|_| mean + normal(&mut r, sigma)).collect();
        let embedding = name.contains("embed");
        let updated: Vec<f64> = weights
            .iter()
            .enumerate()
            .map(|(i, &w)| {
                // An embedding row changes only for tokens seen in training.
                if embedding && (i / 64) % 5 != 0 {
                    return w;
                }
                // The bf16 copy is what the trainer saved.
                f64::from(f32::from_bits(u32::from(bf16(w)) << 16)) + normal(&mut r, 2e-4)
            })
            .collect();
        base.push(bf16_tensor(name, shape, &weights));
        target.push(bf16_tensor(name, shape, &updated));
    }
    // Format 1.1: lane rANS without the constant streams of 1.3 or the packed
    // tables of 1.4, and zstd wherever it is smaller, as that version's writer.
    let settings = EncodeSettings::default().within_format_version("1.1").expect("a writable version");
    let options = EncodeOptions { chunk_words: 8192, settings };
    assert!(options.settings.rans, "the library's default writer uses lane rANS");
    let name = "natural-finetune-rans";
    natural_with(
        suite,
        name,
        SPEC,
        Some(&Ck::File(base, None)),
        None,
        &Ck::File(target, None),
        options,
        "generator valid_rans::natural_finetune",
    );
    let model = Model::parse(&suite.read(&format!("valid/{name}/delta.tpde")));
    let required = u64::from_le_bytes(model.preamble[at::REQUIRED..at::REQUIRED + 8].try_into().expect("8"));
    let rans_streams = model.parts.iter().flat_map(|p| &p.streams).filter(|s| s[8] == 2).count();
    assert!(required == 2 && rans_streams > 0, "{name}: the writer used lane rANS ({rans_streams} streams)");
}
