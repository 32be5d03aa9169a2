//! `invalid/rans-*`: one lane rANS fault per file (spec §8.7), each derived from
//! the valid case `rans-mixed` by changing one stream (or one record or preamble
//! field) and recomputing every checksum and digest that covers it. A stream is
//! rebuilt by [`crate::rans`] from the chunk's decoded streams, changed in one
//! field, and written back; its chunk's checksum and stored length follow.
//!
//! Chunks of `rans-mixed` are listed in [`crate::valid_rans::rans_mixed_entries`].
//! A context that a stream may not use is written with a context map that sends
//! every context byte to table 0 (table 1 unused), so that the stream decodes to
//! its true bytes whatever a reader takes the context bytes to be: only the
//! "not allowed" check fails.

use crate::forge::{Planned, Store};
use crate::model::{at, put, reseal, Model};
use crate::rans::{self, Ctx, Fail};
use crate::suite::Suite;
use crate::valid_rans::{rans_mixed_entries, BASE, SOURCE};

const SPEC: &str = "§8.7";
const HEADER: &str = "E_RANS_HEADER";
const DECODE: &str = "E_RANS_DECODE";

/// Chunk `c` of `rans-mixed` as (entry, chunk of the entry).
const CHUNKS: [(usize, usize); 9] = [(0, 0), (0, 1), (1, 0), (2, 0), (2, 1), (3, 0), (4, 0), (5, 0), (5, 1)];

struct Faults<'a> {
    suite: &'a mut Suite,
    good: Vec<u8>,
    plans: Vec<Planned>,
}

impl Faults<'_> {
    fn emit(&mut self, name: &str, bytes: &[u8], error: &str, spec: &str, provenance: &str) {
        let rel = format!("invalid/{name}.tpde");
        self.suite.write(&rel, bytes);
        self.suite.reject(name, &rel, Some(BASE), error, spec, &format!("generator invalid_rans::{provenance}"));
    }

    /// Stream `q` of chunk `c` as the valid file stores it, as data.
    fn stream(&self, c: usize, q: usize) -> rans::Stream {
        let plan = &self.plans[c];
        let Store::Rans(ctx) = plan.store_of(q) else { panic!("stream {q} of chunk {c} is not lane rANS") };
        let stream = plan.rans(q, ctx);
        assert_eq!(Model::parse(&self.good).parts[c].stream_data(q), stream.to_bytes(), "chunk {c} stream {q}");
        stream
    }

    /// The decoded bytes and context bytes of stream `q` of chunk `c`.
    fn symbols(&self, c: usize, q: usize) -> (Vec<u8>, Vec<u8>) {
        let plan = &self.plans[c];
        let Store::Rans(ctx) = plan.store_of(q) else { panic!("not lane rANS") };
        (plan.raw[q].clone(), plan.contexts(q, ctx))
    }

    /// Stream `q` of chunk `c` replaced by `bytes`.
    fn replace(&mut self, name: &str, c: usize, q: usize, bytes: &[u8], error: &str, provenance: &str) {
        let spec = if error == "E_CHUNK_DIGEST" { "§10" } else { SPEC };
        let mut model = Model::parse(&self.good);
        model.parts[c].set_stream_data(q, bytes);
        model.relayout();
        self.emit(name, &model.to_bytes(), error, spec, provenance);
    }

    /// Stream `q` of chunk `c` with its bytes edited.
    fn patch(&mut self, name: &str, c: usize, q: usize, edit: impl FnOnce(&mut Vec<u8>), error: &str) {
        let mut bytes = Model::parse(&self.good).parts[c].stream_data(q).to_vec();
        edit(&mut bytes);
        self.replace(name, c, q, &bytes, error, "stream_bytes");
    }

    /// Stream `q` of chunk `c` rebuilt with one field changed.
    fn edit(&mut self, name: &str, c: usize, q: usize, edit: impl FnOnce(&mut rans::Stream), error: &str) {
        let mut stream = self.stream(c, q);
        edit(&mut stream);
        self.replace(name, c, q, &stream.to_bytes(), error, "stream_fields");
    }

    /// Stream `q` of chunk `c` written with context byte `context`, where it is
    /// not allowed, and two tables of which only table 0 is used.
    fn context(&mut self, name: &str, c: usize, q: usize, context: u8) {
        let (symbols, _) = self.symbols(c, q);
        let zeros = vec![0; symbols.len()];
        let params = self.plans[c].force.params;
        let stream = rans::Stream::encode_with_map(&symbols, context, &zeros, Some((rans::flat_map(), 2)), params);
        assert_eq!(stream.decode(symbols.len(), &zeros), Ok(symbols), "{name}: the stream decodes");
        self.replace(name, c, q, &stream.to_bytes(), HEADER, "context_not_allowed");
    }
}

/// Writes every lane rANS fault.
#[allow(clippy::too_many_lines)]
pub fn generate(suite: &mut Suite) {
    let good = suite.read(SOURCE);
    let entries = rans_mixed_entries();
    let plans = CHUNKS.iter().map(|&(e, k)| entries[e].plan(k)).collect();
    let mut f = Faults { suite, good: good.clone(), plans };

    // The feature bit and the codec registry (§3, §8.5, §11.1 O20).
    let mut bytes = good.clone();
    put(&mut bytes, at::REQUIRED, &0u64.to_le_bytes());
    reseal(&mut bytes);
    f.emit("rans-codec-without-feature-bit", &bytes, "E_UNKNOWN_CODEC", "§11.1", "preamble_field");
    let mut model = Model::parse(&good);
    model.parts[0].streams[0][8] = 5;
    f.emit("rans-unknown-codec-5", &model.to_bytes(), "E_UNKNOWN_CODEC", "§8.5", "record_field");

    // Header fields out of range (Table 8.6). Chunk 4: c dense sub rotated planes;
    // stream 0 on the plane above, 1 on the base key.
    f.patch("rans-prob-bits-0", 4, 0, |b| b[0] = 0, HEADER);
    f.patch("rans-prob-bits-12", 4, 0, |b| b[0] = 12, HEADER);
    f.patch("rans-context-3", 4, 1, |b| b[1] = 3, HEADER);
    f.patch("rans-table-count-0", 4, 1, |b| b[2] = 0, HEADER);
    f.patch("rans-table-count-9", 4, 1, |b| b[2] = 9, HEADER);
    f.patch("rans-table-count-1-with-context-2", 4, 0, |b| b[2] = 1, HEADER);
    f.patch("rans-tile-log2-7", 4, 2, |b| b[3] = 7, HEADER);
    f.patch("rans-tile-log2-25", 4, 2, |b| b[3] = 25, HEADER);
    // Chunk 6: e raw byte planes; stream 1, the top plane, has no context.
    let (symbols, zeros) = f.symbols(6, 1);
    let params = f.plans[6].force.params;
    let two = rans::Stream::encode_with_map(&symbols, 0, &zeros, Some((rans::flat_map(), 2)), params);
    assert_eq!(two.decode(symbols.len(), &zeros), Ok(symbols));
    f.replace("rans-table-count-2-with-context-0", 6, 1, &two.to_bytes(), HEADER, "stream_fields");
    let key = f.plans[4].keys[0];
    f.edit(
        "rans-context-map-entry-out-of-range",
        4,
        1,
        |s| {
            let tables = u8::try_from(s.tables.len()).expect("small");
            s.map.as_mut().expect("a context map")[usize::from(key)] = tables;
        },
        HEADER,
    );

    // Contexts where §8.7 does not allow them.
    f.context("rans-base-key-in-raw-chunk", 6, 1, Ctx::BaseKey.id());
    f.context("rans-base-key-in-words-layout", 2, 1, Ctx::BaseKey.id());
    f.context("rans-base-key-with-grouped-order", 3, 0, Ctx::BaseKey.id());
    f.context("rans-base-key-in-gap-plane", 0, 0, Ctx::BaseKey.id());
    f.context("rans-base-key-in-bitmap", 2, 0, Ctx::BaseKey.id());
    f.context("rans-higher-plane-on-top-value-plane", 4, 3, Ctx::HigherPlane.id());
    f.context("rans-higher-plane-on-top-gap-plane", 0, 1, Ctx::HigherPlane.id());
    f.context("rans-higher-plane-in-bitmap", 2, 0, Ctx::HigherPlane.id());
    f.context("rans-higher-plane-in-words-layout", 2, 1, Ctx::HigherPlane.id());

    // Tables (Table 8.7). Chunk 4 stream 0 has lists; chunk 5 (d raw, 300 random
    // bytes, two tiles) one table in the bitmap form.
    let listed = f.stream(4, 0).tables.iter().position(|t| (2..32).contains(&t.symbols.len())).expect("a list");
    f.edit("rans-symbols-not-increasing", 4, 0, |s| s.tables[listed].symbols.swap(0, 1), HEADER);
    f.edit(
        "rans-symbol-repeated",
        4,
        0,
        |s| {
            let first = s.tables[listed].symbols[0];
            s.tables[listed].symbols[1] = first;
        },
        HEADER,
    );
    let d = f.stream(5, 0);
    assert!(d.tables[0].symbols.len() >= 32 && d.tables[0].symbols.len() < 256, "a bitmap with a clear bit");
    let absent = (0..=255u8).find(|x| !d.tables[0].symbols.contains(x)).expect("a symbol that does not occur");
    f.edit("rans-bitmap-popcount-not-s", 5, 0, |s| s.tables[0].extra_bit = Some(absent), HEADER);
    f.edit(
        "rans-frequency-0",
        5,
        0,
        |s| {
            let t = &mut s.tables[0];
            t.freqs[1] += t.freqs[0];
            t.freqs[0] = 0;
        },
        HEADER,
    );
    let small = d.tables[0].freqs.iter().position(|&f| f < 128).expect("a frequency below 128");
    f.edit("rans-two-byte-frequency-below-128", 5, 0, |s| s.tables[0].long_form = Some(small), HEADER);
    f.edit("rans-frequency-sum-not-2-k", 5, 0, |s| s.tables[0].freqs[0] += 1, HEADER);

    // Tile lengths and the stream's length.
    assert_eq!(d.tiles.len(), 2, "chunk 5 has two tiles");
    f.edit("rans-tile-length-odd", 5, 0, |s| s.tiles[1].push(0), HEADER);
    let e0 = f.stream(6, 0);
    assert_eq!(e0.tiles.len(), 1, "chunk 6 has one tile");
    assert!(e0.tiles[0].len() > 62, "16 lanes");
    f.edit("rans-tile-shorter-than-states", 6, 0, |s| s.tiles[0].truncate(4 * 16 - 2), HEADER);
    f.patch("rans-tile-lengths-short-of-stream", 5, 0, |b| b.extend_from_slice(&[0, 0]), HEADER);
    f.patch("rans-tile-lengths-past-stream", 5, 0, |b| b.truncate(b.len() - 2), HEADER);
    let inside_table = f.stream(4, 1).table_offset(1) + 1;
    f.patch("rans-stream-shorter-than-header", 4, 1, |b| b.truncate(inside_table), HEADER);
    let inside_lengths = d.tile_len_offset(1) + 2;
    f.patch("rans-stream-ends-in-tile-lengths", 5, 0, |b| b.truncate(inside_lengths), HEADER);

    // Decoding (§8.7): a well-formed stream whose tiles do not decode.
    let (d_symbols, d_contexts) = f.symbols(5, 0);
    let n = d_symbols.len();
    let check = |s: &rans::Stream, fail: Fail| assert_eq!(s.decode(n, &d_contexts), Err(fail), "{fail:?}");
    let mut s = d.clone();
    s.tiles[1][..4].copy_from_slice(&(rans::L - 1).to_le_bytes());
    check(&s, Fail::InitialState);
    f.replace("rans-initial-state-below-2-16", 5, 0, &s.to_bytes(), DECODE, "tile_payload");
    let mut s = d.clone();
    let len = s.tiles[0].len();
    s.tiles[0].truncate(len - 2);
    check(&s, Fail::Truncated);
    f.replace("rans-tile-truncated", 5, 0, &s.to_bytes(), DECODE, "tile_payload");
    let mut s = d.clone();
    s.tiles[1].extend_from_slice(&[0, 0]);
    check(&s, Fail::LeftOver);
    f.replace("rans-words-left-over", 5, 0, &s.to_bytes(), DECODE, "tile_payload");
    // A flipped renormalisation word that leaves the stream well-formed: the
    // words run out neither early nor late, but a final state is not L.
    let lanes = 32;
    let words = (d.tiles[0].len() - 4 * lanes) / 2;
    let flipped = (0..words)
        .rev()
        .flat_map(|w| (0..16).map(move |bit| (w, bit)))
        .map(|(w, bit)| {
            let mut s = d.clone();
            let at = 4 * lanes + 2 * w + bit / 8;
            s.tiles[0][at] ^= 1 << (bit % 8);
            s
        })
        .find(|s| s.decode(n, &d_contexts) == Err(Fail::FinalState))
        .expect("a flip that only the final state catches");
    f.replace("rans-final-state-wrong", 5, 0, &flipped.to_bytes(), DECODE, "tile_payload");

    // A stream that decodes cleanly to one wrong byte: the chunk digest (§10)
    // catches what the final state cannot. Chunk 5 is raw, so no count changes.
    let mut wrong = d_symbols.clone();
    let table = &d.tables[0].symbols;
    wrong[100] = *table.iter().find(|&&x| x != wrong[100]).expect("another symbol");
    let mut s = d.clone();
    s.reencode(&wrong, &d_contexts);
    assert_eq!(s.decode(n, &d_contexts), Ok(wrong), "a valid stream of other bytes");
    f.replace("rans-decodes-to-other-bytes", 5, 0, &s.to_bytes(), "E_CHUNK_DIGEST", "stream_fields");
}
