//! `valid/packed-rans*` and `invalid/packed-rans-*`: files of format 1.4 whose lane
//! rANS streams use codec 4, with packed context maps and tables (spec §8.9), each
//! stream built by [`crate::rans`] from the spec. The faults change one stream (or
//! the feature bits) of `packed-rans` and recompute every checksum that covers it.

use std::collections::BTreeSet;

use rand::seq::SliceRandom;
use rand::Rng;
use tpde::format::{Encoding, ValueLayout, ValueOp};

use crate::constant::features;
use crate::forge::{Entry, Force, Planned, Store};
use crate::model::{at, put, reseal, Model};
use crate::rans::{self, Ctx, Fail};
use crate::safet::{self, Tensor};
use crate::suite::Suite;
use crate::valid::{bases, forged_as, nudge, random_tensor, rng};
use crate::valid_rans::changed;

const SPEC: &str = "§8.9";
const HEADER: &str = "E_RANS_HEADER";

/// The valid case whose bytes the faults change.
const SOURCE: &str = "valid/packed-rans/delta.tpde";
/// Its base.
const BASE: &str = "valid/packed-rans/base.safetensors";
/// Chunk 0 of `packed-rans`: 300 bytes, raw, one stream of two tiles with one
/// table of a bitmap's symbols.
const TWO_TILES: usize = 0;
/// Chunk 1: dense byte planes on the base key, three tables each.
const THREE_TABLES: usize = 1;

fn forged(suite: &mut Suite, name: &str, entries: &[Entry]) {
    let provenance = format!("generator packed_rans::{}", name.replace('-', "_"));
    forged_as(suite, name, SPEC, entries, &bases(entries), &provenance);
}

/// Tensors without a base, raw, each one stream on no context: tables of every
/// symbol set and orders from 0 to 11.
///
/// - `s256.flat`: each byte 8 times, all 256 symbols (no symbol set) of frequency
///   8, so one code value of 16 and zeros: order 0;
/// - `s31.list`: 31 symbols (the longest list);
/// - `s32.bitmap`: 32 symbols (the shortest bitmap), one of them frequent;
/// - `certain`: one symbol of frequency `2^11`, code value `2^12`: order 11;
/// - `k5`: 12 symbols at `prob_bits` 5.
fn table_form_entries() -> Vec<Entry> {
    let mut r = rng("packed-rans-table-forms");
    let every: Vec<u8> = (0..=255).collect();
    let mut flat: Vec<u8> = every.iter().flat_map(|&x| [x; 8]).collect();
    flat.shuffle(&mut r);
    let list_symbols: Vec<u8> = (0..31).map(|i| 250 - i * 8).collect();
    let mut list: Vec<u8> = list_symbols.iter().enumerate().flat_map(|(i, &x)| vec![x; 1 + 3 * i]).collect();
    list.shuffle(&mut r);
    let mut bitmap: Vec<u8> = (0..32u8).flat_map(|x| vec![x * 7; if x == 5 { 600 } else { 10 }]).collect();
    bitmap.shuffle(&mut r);
    let k5: Vec<u8> = (0..200u8).map(|i| i % 12).collect();
    let raw = Force::new(Encoding::Raw).packed_rans(Ctx::None, Ctx::None);
    let u8s = |name: &str, bytes: Vec<u8>| {
        let len = bytes.len() as u64;
        (Tensor::new(name, "U8", &[len], bytes), len)
    };
    let mut entries = Vec::new();
    for (name, bytes, force) in [
        ("s256.flat", flat, raw.tile_log2(24)),
        ("s31.list", list, raw),
        ("s32.bitmap", bitmap, raw.tile_log2(8)),
        ("certain", vec![7; 40], raw),
        ("k5", k5, raw.prob_bits(5)),
    ] {
        let (tensor, words) = u8s(name, bytes);
        entries.push(Entry::forced(tensor, None, words, &[force]));
    }
    entries
}

/// Chunks:
///
/// - 0: `bytes.two.tiles`, 300 random bytes, raw, tiles of `2^8` (the table and
///   payload faults);
/// - 1: `three.tables` (`BF16`) dense byte planes on the base key, 3 tables each
///   (the map faults);
/// - 2 to 17: a tensor of each word width 1, 2, 4 and 8, four chunks each:
///   sparse with gaps of width 2 in byte planes (gap plane 0 on the plane above,
///   values on the base key, up to 8 tables), dense byte planes on the plane above
///   (few bytes above, so 2 tables), dense byte planes on the base key (up to 4
///   tables), dense sub rotated planes on the plane above;
/// - 18: `eight.tables` (`BF16`) dense byte planes on the base key: 8 tables of
///   many symbols each for the low plane;
/// - 19: `codecs.3.and.4` (`BF16`) dense byte planes: plane 1 constant, plane 0
///   codec 4 on it;
/// - 20: `codecs.1.2.and.4` (`F32`) dense byte planes: plane 3 codec 2 on the base
///   key, plane 1 zstd, planes 0 and 2 codec 4 on the plane above (zstd and
///   codec 2);
/// - 21 to 25: [`table_form_entries`].
fn entries() -> Vec<Entry> {
    let mut r = rng("packed-rans");
    let two_tiles = random_tensor(&mut r, "bytes.two.tiles", "U8", &[300]);
    let three_base = random_tensor(&mut r, "three.tables", "BF16", &[16]);
    let planes = Force::new(Encoding::Dense).layout(ValueLayout::BytePlanes);
    let mut entries = vec![
        Entry::forced(
            two_tiles,
            None,
            300,
            &[Force::new(Encoding::Raw).packed_rans(Ctx::None, Ctx::None).tile_log2(8)],
        ),
        Entry::forced(
            changed(&three_base),
            Some(three_base),
            16,
            &[planes.packed_rans(Ctx::None, Ctx::BaseKey).max_tables(3)],
        ),
    ];
    for dtype in ["U8", "BF16", "F32", "F64"] {
        let base = random_tensor(&mut r, &format!("{}.contexts", dtype.to_lowercase()), dtype, &[64]);
        let plans = [
            Force::new(Encoding::Sparse)
                .gap_width(2)
                .layout(ValueLayout::BytePlanes)
                .packed_rans(Ctx::HigherPlane, Ctx::BaseKey),
            planes.packed_rans(Ctx::None, Ctx::HigherPlane),
            planes.packed_rans(Ctx::None, Ctx::BaseKey).max_tables(4),
            Force::new(Encoding::Dense)
                .op(ValueOp::Sub)
                .layout(ValueLayout::RotatedBytePlanes)
                .packed_rans(Ctx::None, Ctx::HigherPlane),
        ];
        entries.push(Entry::forced(changed(&base), Some(base), 16, &plans));
    }
    // Low bytes moved by up to 15 under keys of every kind: many symbols per table.
    let keyed_base = random_tensor(&mut r, "eight.tables", "BF16", &[512]);
    let mut keyed = keyed_base.clone();
    for low in keyed.bytes.iter_mut().step_by(2) {
        *low ^= r.gen_range(1..16u8);
    }
    entries.push(Entry::forced(keyed, Some(keyed_base), 512, &[planes.packed_rans(Ctx::None, Ctx::BaseKey)]));
    // Only low bytes change, so plane 1 is all zero.
    let low_base = random_tensor(&mut r, "codecs.3.and.4", "BF16", &[32]);
    let low = nudge(&low_base, &(0..32).step_by(2).collect::<Vec<_>>());
    entries.push(Entry::forced(
        low,
        Some(low_base),
        32,
        &[planes.packed_rans(Ctx::None, Ctx::HigherPlane).stream(1, Store::Constant)],
    ));
    let f32_base = random_tensor(&mut r, "codecs.1.2.and.4", "F32", &[16]);
    entries.push(Entry::forced(
        changed(&f32_base),
        Some(f32_base),
        16,
        &[planes.packed_rans(Ctx::None, Ctx::HigherPlane).stream(1, Store::Zstd).stream(3, Store::Rans(Ctx::BaseKey))],
    ));
    entries.extend(table_form_entries());
    entries
}

/// What the codec 4 streams of `entries` hold: each stream's context and word
/// width, table count (also of streams whose every table has several symbols) and
/// each table's symbols and best order.
#[derive(Debug, Default)]
struct Coverage {
    contexts: BTreeSet<(u8, usize)>,
    table_counts: BTreeSet<usize>,
    uncertain_table_counts: BTreeSet<usize>,
    symbol_counts: BTreeSet<usize>,
    orders: BTreeSet<u8>,
}

fn coverage(entries: &[Entry]) -> Coverage {
    let mut seen = Coverage::default();
    for entry in entries {
        let wb = safet::word_bytes(entry.target.dtype);
        for k in 0..entry.chunks().len() {
            let plan = entry.plan(k);
            for q in 0..plan.raw.len() {
                let Store::RansPacked(ctx) = plan.store_of(q) else { continue };
                let stream = plan.rans(q, ctx);
                seen.contexts.insert((stream.context, wb));
                seen.table_counts.insert(stream.tables.len());
                if stream.tables.iter().all(|t| t.symbols.len() > 1) {
                    seen.uncertain_table_counts.insert(stream.tables.len());
                }
                for table in &stream.tables {
                    seen.symbol_counts.insert(table.symbols.len());
                    seen.orders.insert(table.best_order());
                }
            }
        }
    }
    seen
}

/// Writes the valid packed lane rANS cases, then the faults.
pub fn generate(suite: &mut Suite) {
    let all = entries();
    let seen = coverage(&all);
    for ctx in [Ctx::None, Ctx::BaseKey, Ctx::HigherPlane] {
        for wb in [1, 2, 4, 8] {
            // One-byte words have no value plane above another.
            let expected = !(ctx == Ctx::HigherPlane && wb == 1);
            assert!(!expected || seen.contexts.contains(&(ctx.id(), wb)), "context {ctx:?} on {wb}-byte words");
        }
    }
    for tables in [[2, 2], [3, 4], [5, 8]] {
        assert!(seen.table_counts.iter().any(|t| (tables[0]..=tables[1]).contains(t)), "{tables:?} tables");
    }
    assert!(seen.uncertain_table_counts.iter().any(|&t| t >= 5), "{:?}", seen.uncertain_table_counts);
    for symbols in [[1, 31], [32, 255], [256, 256]] {
        assert!(seen.symbol_counts.iter().any(|s| (symbols[0]..=symbols[1]).contains(s)), "{symbols:?} symbols");
    }
    assert!(seen.orders.contains(&0) && seen.orders.contains(&rans::MAX_ORDER), "orders {:?}", seen.orders);
    forged(suite, "packed-rans", &all);
    assert_eq!(features(suite, SOURCE), (0b1_1010, 4), "packed-rans: bits 1, 3 and 4, format 1.4");
    // Bit 4 needs no other bit: only codec 4 streams here.
    forged(suite, "packed-rans-alone", &table_form_entries());
    assert_eq!(features(suite, "valid/packed-rans-alone/delta.tpde"), (0b1_0000, 4), "bit 4 alone");
    faults(suite, &all);
}

struct Faults<'a> {
    suite: &'a mut Suite,
    good: Vec<u8>,
    plans: Vec<Planned>,
}

impl Faults<'_> {
    fn emit(&mut self, name: &str, bytes: &[u8], error: &str, spec: &str, provenance: &str) {
        let rel = format!("invalid/{name}.tpde");
        self.suite.write(&rel, bytes);
        self.suite.reject(name, &rel, Some(BASE), error, spec, &format!("generator packed_rans::{provenance}"));
    }

    /// Stream `q` of chunk `c` as the valid file stores it, as data.
    fn stream(&self, c: usize, q: usize) -> rans::Stream {
        let plan = &self.plans[c];
        let Store::RansPacked(ctx) = plan.store_of(q) else { panic!("stream {q} of chunk {c} is not codec 4") };
        let stream = plan.rans(q, ctx).into_packed();
        assert_eq!(Model::parse(&self.good).parts[c].stream_data(q), stream.to_bytes(), "chunk {c} stream {q}");
        stream
    }

    /// Stream `q` of chunk `c` replaced by `bytes`.
    #[allow(clippy::too_many_arguments)]
    fn replace(&mut self, name: &str, c: usize, q: usize, bytes: &[u8], error: &str, spec: &str, provenance: &str) {
        let mut model = Model::parse(&self.good);
        model.parts[c].set_stream_data(q, bytes);
        model.relayout();
        self.emit(name, &model.to_bytes(), error, spec, provenance);
    }

    /// Stream `q` of chunk `c` rebuilt with one field changed.
    fn edit(&mut self, name: &str, c: usize, q: usize, edit: impl FnOnce(&mut rans::Stream)) {
        let mut stream = self.stream(c, q);
        edit(&mut stream);
        self.replace(name, c, q, &stream.to_bytes(), HEADER, SPEC, "stream_fields");
    }

    /// The two-tile stream replaced by `stream`, whose tiles do not decode (§8.7).
    fn tile_fault(&mut self, name: &str, stream: &rans::Stream) {
        self.replace(name, TWO_TILES, 0, &stream.to_bytes(), "E_RANS_DECODE", "§8.7", "tile_payload");
    }

    /// Stream `q` of chunk `c` cut to its first `len` bytes.
    fn truncate(&mut self, name: &str, c: usize, q: usize, len: usize) {
        let bytes = self.stream(c, q).to_bytes();
        self.replace(name, c, q, &bytes[..len], HEADER, SPEC, "stream_bytes");
    }
}

#[allow(clippy::too_many_lines)]
fn faults(suite: &mut Suite, entries: &[Entry]) {
    let good = suite.read(SOURCE);
    let plans = vec![entries[0].plan(0), entries[1].plan(0)];
    let mut f = Faults { suite, good: good.clone(), plans };

    // The feature bit (§3, §11.1 O20): codec 4 in a file without bit 4.
    let mut bytes = good.clone();
    put(&mut bytes, at::REQUIRED, &0b1010u64.to_le_bytes());
    reseal(&mut bytes);
    f.emit("packed-rans-codec-without-feature-bit", &bytes, "E_UNKNOWN_CODEC", "§11.1", "preamble_field");

    // The packed context map: T = 3 takes 2 bits an entry, so 3 fits but is no table.
    let mapped = f.stream(THREE_TABLES, 0);
    assert_eq!(mapped.tables.len(), 3, "three tables");
    assert_eq!(mapped.table_offset(0), 4 + 64, "a map of 2-bit entries");
    let used = f.plans[THREE_TABLES].keys[0];
    f.edit("packed-rans-map-entry-out-of-range", THREE_TABLES, 0, |s| {
        s.map.as_mut().expect("a context map")[usize::from(used)] = 3;
    });
    f.truncate("packed-rans-stream-ends-in-packed-map", THREE_TABLES, 0, 4 + 40);

    // The packed table (Table 8.8) of the two-tile stream: a bitmap of its symbols.
    let d = f.stream(TWO_TILES, 0);
    let table = &d.tables[0];
    assert!((32..256).contains(&table.symbols.len()), "a bitmap");
    let k = u32::from(d.prob_bits);
    f.edit("packed-rans-order-12", TWO_TILES, 0, |s| s.tables[0].order = Some(12));
    // Frequencies below 1 that keep the sum at 2^k, so that only the range check
    // catches them: 0 after a step down, and -1.
    f.edit("packed-rans-frequency-0", TWO_TILES, 0, |s| {
        let t = &mut s.tables[0];
        t.freqs[0] += t.freqs[1];
        t.freqs[1] = 0;
    });
    f.edit("packed-rans-frequency-negative", TWO_TILES, 0, |s| {
        let t = &mut s.tables[0];
        let mut freqs: Vec<i64> = t.freqs.iter().map(|&f| i64::from(f)).collect();
        freqs[0] += freqs[1] + 1;
        freqs[1] = -1;
        t.packed_freqs = Some(freqs);
    });
    // A code value of 2^14 takes n + g = 14 bits, past the 12 that any frequency in
    // range needs: a reader stops at the prefix.
    f.edit("packed-rans-prefix-too-long", TWO_TILES, 0, |s| {
        let t = &mut s.tables[0];
        let mut freqs: Vec<i64> = t.freqs.iter().map(|&f| i64::from(f)).collect();
        freqs[0] = 1 << 13;
        t.packed_freqs = Some(freqs);
    });
    f.edit("packed-rans-frequency-above-2-k", TWO_TILES, 0, |s| s.tables[0].freqs[0] = (1 << k) + 1);
    f.edit("packed-rans-frequency-sum-not-2-k", TWO_TILES, 0, |s| s.tables[0].freqs[0] += 1);
    // Frequency codes that do not fill their last byte leave padding to set.
    assert!(!table.frequency_code_bits(table.best_order()).len().is_multiple_of(8), "the table has padding");
    f.edit("packed-rans-nonzero-padding", TWO_TILES, 0, |s| s.tables[0].dirty_padding = true);
    let codes = d.table_offset(0) + 1 + 32 + 1;
    let code_bytes = table.frequency_code_bits(table.best_order()).len().div_ceil(8);
    assert!(code_bytes > 2, "frequency codes of {code_bytes} bytes");
    f.truncate("packed-rans-stream-ends-in-frequency-codes", TWO_TILES, 0, codes + code_bytes / 2);
    // The tile lengths (§8.7) follow the packed tables.
    let mut longer = d.to_bytes();
    longer.extend_from_slice(&[0, 0]);
    f.replace("packed-rans-tile-lengths-short-of-stream", TWO_TILES, 0, &longer, HEADER, "§8.7", "stream_bytes");

    // Decoding (§8.7) is codec 2's: a well-formed stream whose tiles do not decode.
    let symbols = f.plans[TWO_TILES].raw[0].clone();
    let contexts = vec![0; symbols.len()];
    let n = symbols.len();
    assert_eq!(d.tiles.len(), 2, "two tiles");
    let check = |s: &rans::Stream, fail: Fail| assert_eq!(s.decode(n, &contexts), Err(fail), "{fail:?}");
    let mut s = d.clone();
    s.tiles[1][..4].copy_from_slice(&(rans::L - 1).to_le_bytes());
    check(&s, Fail::InitialState);
    f.tile_fault("packed-rans-initial-state-below-2-16", &s);
    let mut s = d.clone();
    let len = s.tiles[0].len();
    s.tiles[0].truncate(len - 2);
    check(&s, Fail::Truncated);
    f.tile_fault("packed-rans-tile-truncated", &s);
    let mut s = d.clone();
    s.tiles[1].extend_from_slice(&[0, 0]);
    check(&s, Fail::LeftOver);
    f.tile_fault("packed-rans-words-left-over", &s);
    // A flipped renormalisation word that only the final-state check catches.
    let lanes = rans::LANES;
    let words = (d.tiles[0].len() - 4 * lanes) / 2;
    let flipped = (0..words)
        .rev()
        .flat_map(|w| (0..16).map(move |bit| (w, bit)))
        .map(|(w, bit)| {
            let mut s = d.clone();
            s.tiles[0][4 * lanes + 2 * w + bit / 8] ^= 1 << (bit % 8);
            s
        })
        .find(|s| s.decode(n, &contexts) == Err(Fail::FinalState))
        .expect("a flip that only the final state catches");
    f.tile_fault("packed-rans-final-state-wrong", &flipped);
    // A valid stream of one other byte: the chunk digest (§10) catches it.
    let mut wrong = symbols;
    wrong[100] = *table.symbols.iter().find(|&&x| x != wrong[100]).expect("another symbol");
    let mut s = d.clone();
    s.reencode(&wrong, &contexts);
    assert_eq!(s.decode(n, &contexts), Ok(wrong), "a valid stream of other bytes");
    f.replace(
        "packed-rans-decodes-to-other-bytes",
        TWO_TILES,
        0,
        &s.to_bytes(),
        "E_CHUNK_DIGEST",
        "§10",
        "stream_fields",
    );
}
