//! Host side of the device decoder of lane rANS streams (codec 2,
//! `spec/FORMAT.md` §8.7, and codec 4, the same with packed tables, §8.9):
//! the four fixed header bytes, read and checked on the CPU to size the
//! launches and their scratch; which contexts each stream of a chunk may
//! use; and the order in which a chunk's streams decode (their dependency
//! levels, §11.2 D3). Everything past the fixed bytes (context map, tables,
//! tile lengths, tiles) is parsed and checked by the kernels of
//! `kernels/tpde_rans.cu`, told the table form by the descriptor.

use tpde::{
    format::{rans::TableForm, ChunkRecord, Codec, Encoding, ValueLayout, ValueOrder},
    ErrorCode, Result as FormatResult, WordWidth,
};

use cudarc::driver::CudaStream;

use crate::error::Result;
use crate::gpu::{Batch, DevRange, FillBatch, Gpu, RansBatch, Stage};
use crate::kernels::{
    ChunkDesc, FillDesc, RansDesc, RANS_MAX_PROB_BITS, RANS_MAX_TABLES, RANS_SCRATCH_HEAD, RANS_TABLE_STRIDE,
};
use crate::pipeline::ChunkRef;

/// Whether a stream is lane rANS (codec 2 or 4), which the GPU decodes.
#[must_use]
pub(crate) fn is_rans(codec: Codec) -> bool {
    codec.is_rans()
}

/// Context kinds (§8.7, "Contexts"), as the header byte and the kernels
/// (`CTX_*`) number them.
pub(crate) mod context {
    /// No context: one table.
    pub const NONE: u32 = 0;
    /// The base key of the value's base word (§8.6).
    pub const BASE_KEY: u32 = 1;
    /// The byte at the same index of the next more significant plane.
    pub const HIGHER_PLANE: u32 = 2;
}

/// Smallest and largest `tile_log2` (§8.7, Table 8.6).
const TILE_LOG2: std::ops::RangeInclusive<u32> = 8..=24;

/// The four fixed bytes of a lane rANS stream (§8.7, Table 8.6), checked,
/// and the form of its context map and tables, which its codec gives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Header {
    /// Codec 2's bytes or codec 4's packed bits (§8.9).
    pub form: TableForm,
    /// `k`: frequencies sum to `2^k`.
    pub prob_bits: u32,
    /// One of [`context`].
    pub context: u32,
    /// `T`, 1 to 8.
    pub table_count: u32,
    /// A tile holds `2^tile_log2` symbols.
    pub tile_log2: u32,
}

impl Header {
    /// Reads the fixed bytes of `stored`, a stream whose tables are in
    /// `form`, and makes the header checks of §8.7 that concern them, with
    /// `allowed` the contexts that the stream's place in its chunk allows
    /// (bit `c` for context `c`, [`allowed_contexts`]). `E_RANS_HEADER` on
    /// a failure.
    pub fn read(form: TableForm, stored: &[u8], allowed: u32) -> FormatResult<Self> {
        let fail = |what: &str| Err(tpde::Error::new(ErrorCode::RansHeader, what.to_owned()));
        let [k, ctx, tables, tile_log2, ..] = *stored else {
            return fail("a lane rANS stream is shorter than its fixed header");
        };
        let h = Self {
            form,
            prob_bits: u32::from(k),
            context: u32::from(ctx),
            table_count: u32::from(tables),
            tile_log2: u32::from(tile_log2),
        };
        if !(1..=RANS_MAX_PROB_BITS).contains(&h.prob_bits) {
            return fail("prob_bits is not 1 to 11");
        }
        if h.context > context::HIGHER_PLANE || allowed & (1 << h.context) == 0 {
            return fail("the context is undefined or not allowed in this stream");
        }
        let tables_ok = if h.context == context::NONE {
            h.table_count == 1
        } else {
            (2..=RANS_MAX_TABLES).contains(&h.table_count)
        };
        if !tables_ok {
            return fail("table_count does not fit the context");
        }
        if !TILE_LOG2.contains(&h.tile_log2) {
            return fail("tile_log2 is not 8 to 24");
        }
        Ok(h)
    }

    /// Tiles of a stream of `decoded_len` symbols.
    #[must_use]
    pub fn tiles(&self, decoded_len: u32) -> u32 {
        // < 2^32 / 2^8
        u32::try_from(u64::from(decoded_len).div_ceil(1 << self.tile_log2)).unwrap_or(u32::MAX)
    }

    /// Bytes of the stream's scratch (`rans_scratch_words` of the source):
    /// a header, one entry per symbol of each table, and one payload
    /// offset per tile and one past the last, rounded up to 16 bytes.
    #[must_use]
    pub fn scratch_bytes(&self, decoded_len: u32) -> usize {
        let words =
            RANS_SCRATCH_HEAD + self.table_count as usize * RANS_TABLE_STRIDE + self.tiles(decoded_len) as usize + 1;
        (4 * words).next_multiple_of(16)
    }

    /// Dynamic shared memory of the decoder's tables: `2^k` `u32` slots per
    /// table.
    #[must_use]
    pub fn table_bytes(&self) -> usize {
        (self.table_count as usize) << self.prob_bits << 2
    }
}

/// Tiles of `2^tile_log2` symbols that a decoder warp takes: one, or more
/// when tiles are short, so that each warp decodes at least 2^12 symbols for
/// the tables its block spreads.
#[must_use]
pub fn tiles_per_warp(tile_log2: u32) -> u32 {
    1 << 12u32.saturating_sub(tile_log2)
}

/// The contexts §8.7 allows in stream `q` of a chunk (bit `c` for context
/// `c`): context 0 everywhere; context 1 in the value streams of a sparse or
/// dense chunk in a byte planes layout with positional values; context 2 in a
/// gap or value plane that has a more significant plane.
#[must_use]
pub(crate) fn allowed_contexts(chunk: &ChunkRef<'_>, q: usize, width: WordWidth) -> u32 {
    let r: &ChunkRecord = &chunk.record;
    let np = chunk.position_stream_count();
    let mut allowed = 1 << context::NONE;
    let planes = !matches!(r.value_layout, ValueLayout::Words);
    if q < np {
        // gap planes 0 to g - 2 (a bitmap is one stream: np = 1)
        if r.encoding == Encoding::Sparse && q + 1 < usize::from(r.gap_width) {
            allowed |= 1 << context::HIGHER_PLANE;
        }
        return allowed;
    }
    let plane = q - np;
    if planes && matches!(r.encoding, Encoding::Sparse | Encoding::Dense) && r.value_order == ValueOrder::Positional {
        allowed |= 1 << context::BASE_KEY;
    }
    if planes && plane + 1 < width.bytes() {
        allowed |= 1 << context::HIGHER_PLANE;
    }
    allowed
}

/// The lane rANS streams of one chunk, with the order they decode in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ChunkPlan {
    /// Per stream of the chunk: its header and decode level, for lane rANS
    /// streams. A stream of level `l` is decoded by the `l`-th decoder launch
    /// of its batch: after every stream its context needs.
    pub streams: Vec<Option<(Header, u32)>>,
    /// A sparse chunk with a context 1 stream: the positions are rebuilt
    /// (as `u32`, by the `positions` kernel) before decoder launch `l`, once
    /// every lane rANS position stream is decoded.
    pub positions_before: Option<u32>,
    /// Per stream: whether its decoding needs the base (context 1, or
    /// context 2 under a plane that needs it).
    pub needs_base: Vec<bool>,
}

impl ChunkPlan {
    /// The plan of a chunk whose records are checked, or `None` when it has
    /// no lane rANS stream. Reads the fixed header bytes of each lane rANS
    /// stream ([`Header::read`]).
    pub fn new(chunk: &ChunkRef<'_>, width: WordWidth) -> FormatResult<Option<Self>> {
        if !chunk.streams.iter().any(|s| is_rans(s.codec)) {
            return Ok(None);
        }
        let n = chunk.streams.len();
        let mut headers = Vec::with_capacity(n);
        // Position streams of coding 3 are decoded on the CPU, against the
        // reference (ChunkRef::resolved_positions).
        for (q, (s, stored)) in chunk.streams.iter().zip(chunk.stored_streams()).enumerate() {
            headers.push(match TableForm::of_codec(s.codec) {
                Some(form) if !chunk.is_resolved_stream(q) => {
                    Some(Header::read(form, stored, allowed_contexts(chunk, q, width))?)
                }
                _ => None,
            });
        }
        let np = chunk.position_stream_count();
        // Levels, most significant plane first; -1 for a stream decoded on
        // the CPU or stored (ready before any launch).
        let mut level = vec![-1i64; n];
        let mut needs_base = vec![false; n];
        let mut plane_set = |range: std::ops::Range<usize>, ctx1_level: i64, level: &mut [i64]| {
            for q in range.rev() {
                let Some(h) = headers[q] else { continue };
                level[q] = match h.context {
                    context::HIGHER_PLANE => {
                        // context 2 is never allowed in the top plane
                        needs_base[q] = needs_base[q + 1];
                        level[q + 1] + 1
                    }
                    context::BASE_KEY => {
                        needs_base[q] = true;
                        ctx1_level
                    }
                    _ => 0,
                };
            }
        };
        plane_set(0..np, 0, &mut level);
        let positions_ready = level[..np].iter().copied().max().unwrap_or(-1) + 1;
        let sparse = chunk.record.encoding == Encoding::Sparse;
        plane_set(np..n, if sparse { positions_ready } else { 0 }, &mut level);
        let uses_key = headers.iter().any(|h| h.is_some_and(|h| h.context == context::BASE_KEY));
        let level_of = |l: i64| u32::try_from(l).unwrap_or(0);
        Ok(Some(Self {
            streams: headers.iter().zip(&level).map(|(h, l)| h.map(|h| (h, level_of(*l)))).collect(),
            positions_before: (sparse && uses_key).then(|| level_of(positions_ready)),
            needs_base,
        }))
    }
}

const fn align64(x: usize) -> usize {
    x.next_multiple_of(64)
}

/// The decoding work of one batch of chunks on the device: its lane rANS
/// streams, the positions that context 1 reads in sparse chunks, rebuilt as
/// `u32` by the `positions` kernel before the first decoder level that needs
/// them, and its constant streams (codec 3).
///
/// Its tables go to the device as `[streams (64-aligned) | positions
/// tables (64-aligned) | fills]`, and [`RansWork::launch`] runs, on one
/// stream: the fill launch, the parse launch, then each decoder level, each
/// preceded by the positions launches it needs.
#[derive(Debug, Default)]
pub(crate) struct RansWork {
    pub streams: RansBatch,
    /// Positions batches, by the decoder level they come before, in
    /// increasing order.
    positions: Vec<(u32, Batch)>,
    /// Constant streams, filled before anything reads them.
    pub fills: FillBatch,
}

impl RansWork {
    /// Bytes of the tables of `streams` lane rANS descriptors, `positions`
    /// position descriptors and `fills` constant streams, as
    /// [`RansWork::write_tables`] lays them out (for planning a slot before
    /// the work is built).
    #[must_use]
    pub fn table_bytes_for(streams: usize, positions: usize, fills: usize) -> usize {
        align64(streams * RansDesc::BYTES) + align64(positions * ChunkDesc::BYTES) + fills * FillDesc::BYTES
    }

    /// Bytes of this work's tables.
    #[must_use]
    pub fn table_bytes(&self) -> usize {
        align64(self.streams.table_bytes()) + align64(self.positions_table_bytes()) + self.fills.table_bytes()
    }

    fn positions_table_bytes(&self) -> usize {
        self.positions.iter().map(|(_, b)| b.table_bytes()).sum()
    }

    /// Whether there is nothing to launch.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.streams.is_empty() && self.positions.is_empty() && self.fills.is_empty()
    }

    /// Adds a sparse chunk whose positions context 1 reads: its streams'
    /// decoded ranges and `out`, room for its `u32` positions, rebuilt
    /// before decoder level `before`.
    pub fn push_positions(
        &mut self,
        before: u32,
        chunk: &ChunkRef<'_>,
        streams: &[DevRange],
        out: DevRange,
        width: WordWidth,
    ) -> Result<()> {
        let at = match self.positions.binary_search_by_key(&before, |(l, _)| *l) {
            Ok(i) => i,
            Err(i) => {
                self.positions.insert(i, (before, Batch::new(width)));
                i
            }
        };
        self.positions[at].1.push_positions(chunk, streams, out)
    }

    /// Seals the streams (no stream can be added after), sizing decoder
    /// blocks for a device that holds `resident` decoder warps at once.
    pub fn seal(&mut self, resident: u64) -> Result<()> {
        if self.streams.is_empty() {
            return Ok(());
        }
        self.streams.seal(resident)
    }

    /// Writes the tables into `out` ([`RansWork::table_bytes`] long), after
    /// [`RansWork::seal`].
    pub fn write_tables(&self, out: &mut [u8]) {
        let n = self.streams.table_bytes();
        self.streams.write_table(&mut out[..n]);
        let mut at = align64(n);
        for (_, b) in &self.positions {
            b.write_table(&mut out[at..at + b.table_bytes()]);
            at += b.table_bytes();
        }
        let at = align64(n) + align64(self.positions_table_bytes());
        self.fills.write_table(&mut out[at..at + self.fills.table_bytes()]);
    }

    /// The launches of the work, in order: the fill launch, the parse launch, then each
    /// decoder level, each preceded by the positions batches it needs (and
    /// any positions batch left after the last level).
    #[must_use]
    pub fn schedule(&self) -> Vec<Launch> {
        let mut steps = Vec::new();
        if !self.fills.is_empty() {
            steps.push(Launch::Fill);
        }
        let mut next = 0;
        let mut positions_before = |level: u32, steps: &mut Vec<Launch>| {
            while next < self.positions.len() && self.positions[next].0 <= level {
                steps.push(Launch::Positions(next));
                next += 1;
            }
        };
        if !self.streams.is_empty() {
            steps.push(Launch::Parse);
            for (i, level) in self.streams.levels().iter().enumerate() {
                positions_before(level.level, &mut steps);
                steps.push(Launch::Decode(i));
            }
        }
        positions_before(u32::MAX, &mut steps);
        steps
    }

    /// Launches the work on `stream` in the order of
    /// [`RansWork::schedule`]: `tables` holds what [`RansWork::write_tables`]
    /// wrote (copied there on `stream`); `sums`, `groups` and `flag` are the
    /// slot's tile sums, group table and the flag words, as for
    /// [`Gpu::launch`].
    pub fn launch(
        &self,
        gpu: &Gpu,
        stream: &CudaStream,
        tables: DevRange,
        sums: DevRange,
        groups: DevRange,
        flag: DevRange,
    ) -> Result<()> {
        let n = self.streams.table_bytes();
        let rans_table = tables.sub(0, n)?;
        // the positions tables follow one another in order
        let mut at = align64(n);
        let mut table_of = Vec::with_capacity(self.positions.len());
        for (_, b) in &self.positions {
            table_of.push(tables.sub(at, b.table_bytes())?);
            at += b.table_bytes();
        }
        let fills_at = align64(n) + align64(self.positions_table_bytes());
        for step in self.schedule() {
            match step {
                Launch::Fill => {
                    gpu.launch_fill(stream, &self.fills, tables.sub(fills_at, self.fills.table_bytes())?)?
                }
                Launch::Parse => gpu.launch_rans_parse(stream, &self.streams, rans_table, flag)?,
                Launch::Decode(i) => {
                    gpu.launch_rans_decode(stream, &self.streams, &self.streams.levels()[i], rans_table, flag)?;
                }
                Launch::Positions(i) => {
                    gpu.launch(stream, &self.positions[i].1, Stage::Positions, table_of[i], sums, groups, flag)?;
                }
            }
        }
        Ok(())
    }
}

/// One launch of a [`RansWork`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Launch {
    /// `fill_streams` over every constant stream.
    Fill,
    /// `rans_parse` over every stream.
    Parse,
    /// `rans_decode` over the streams of the `i`-th level.
    Decode(usize),
    /// The positions kernels over the `i`-th positions batch.
    Positions(usize),
}

#[cfg(test)]
mod tests {
    use super::*;
    use tpde::format::{PositionCoding, StreamRecord, ValueOp};

    fn record(encoding: Encoding, coding: PositionCoding, gap_width: u8, layout: ValueLayout) -> ChunkRecord {
        ChunkRecord {
            data_offset: 0,
            stored_len: 0,
            changed_count: 10,
            first_stream: 0,
            encoding,
            value_op: ValueOp::Xor,
            value_layout: layout,
            position_coding: coding,
            gap_width,
            stream_count: 0,
            value_order: ValueOrder::Positional,
            checksum: 0,
            digest: [0; 16],
        }
    }

    /// Streams of the given codecs, each the given stored bytes.
    fn chunk<'a>(record: ChunkRecord, streams: &'a [StreamRecord], stored: &'a [u8]) -> ChunkRef<'a> {
        ChunkRef { record, streams, stored, words: 100, resolved_positions: None }
    }

    /// Both table forms share the fixed bytes and their checks; the header
    /// keeps the form for the kernels.
    #[test]
    fn the_fixed_bytes_are_checked_in_layout_order() {
        for form in [TableForm::Bytes, TableForm::Packed] {
            fixed_bytes_are_checked(form);
        }
    }

    fn fixed_bytes_are_checked(form: TableForm) {
        let all = 0b111;
        assert_eq!(
            Header::read(form, &[11, 2, 8, 24, 0], all).unwrap(),
            Header { form, prob_bits: 11, context: 2, table_count: 8, tile_log2: 24 }
        );
        assert!(Header::read(form, &[1, 0, 1, 8], 1).is_ok());
        for bad in [
            &[1u8, 0, 1][..],
            &[0, 0, 1, 8],
            &[12, 0, 1, 8],
            &[1, 3, 2, 8],
            &[1, 0, 2, 8],
            &[1, 1, 1, 8],
            &[1, 1, 9, 8],
            &[1, 0, 1, 7],
            &[1, 0, 1, 25],
        ] {
            let e = Header::read(form, bad, all).unwrap_err();
            assert_eq!(e.code(), ErrorCode::RansHeader, "{bad:?}");
        }
        // a context that the stream's place does not allow
        assert_eq!(Header::read(form, &[4, 1, 2, 8], 0b101).unwrap_err().code(), ErrorCode::RansHeader);
        assert_eq!(Header::read(form, &[4, 2, 2, 8], 0b011).unwrap_err().code(), ErrorCode::RansHeader);
    }

    #[test]
    fn sizes_follow_the_header() {
        let h = Header { form: TableForm::Packed, prob_bits: 11, context: 2, table_count: 8, tile_log2: 12 };
        assert_eq!(h.tiles(1), 1);
        assert_eq!(h.tiles(4096), 1);
        assert_eq!(h.tiles(4097), 2);
        assert_eq!(h.table_bytes(), 64 << 10);
        assert_eq!(h.scratch_bytes(4097), (4 * (16 + 8 * 256 + 3usize)).next_multiple_of(16));
        assert_eq!(tiles_per_warp(h.tile_log2), 1);
        assert_eq!(tiles_per_warp(8), 16);
        assert_eq!(tiles_per_warp(16), 1);
    }

    #[test]
    fn contexts_are_allowed_where_the_spec_allows_them() {
        let s = |n: usize| vec![StreamRecord { stored_len: 0, decoded_len: 0, codec: Codec::Stored }; n];
        // sparse, 2-byte gaps, 4-byte words in byte planes
        let streams = s(6);
        let c = chunk(record(Encoding::Sparse, PositionCoding::Gaps, 2, ValueLayout::BytePlanes), &streams, &[]);
        let allowed: Vec<u32> = (0..6).map(|q| allowed_contexts(&c, q, WordWidth::W4)).collect();
        assert_eq!(allowed, [0b101, 0b001, 0b111, 0b111, 0b111, 0b011]);
        // a bitmap, words layout: context 0 only
        let streams = s(2);
        let c = chunk(record(Encoding::Sparse, PositionCoding::Bitmap, 0, ValueLayout::Words), &streams, &[]);
        assert_eq!((0..2).map(|q| allowed_contexts(&c, q, WordWidth::W4)).collect::<Vec<_>>(), [1, 1]);
        // raw rotated planes: no base key; grouped dense: no base key
        let streams = s(2);
        let c = chunk(record(Encoding::Raw, PositionCoding::None, 0, ValueLayout::RotatedBytePlanes), &streams, &[]);
        assert_eq!((0..2).map(|q| allowed_contexts(&c, q, WordWidth::W2)).collect::<Vec<_>>(), [0b101, 0b001]);
        let mut r = record(Encoding::Dense, PositionCoding::None, 0, ValueLayout::BytePlanes);
        r.value_order = ValueOrder::GroupedByBase;
        let c = chunk(r, &streams, &[]);
        assert_eq!((0..2).map(|q| allowed_contexts(&c, q, WordWidth::W2)).collect::<Vec<_>>(), [0b101, 0b001]);
        // one-byte words in planes: one plane, no plane above
        let streams = s(1);
        let c = chunk(record(Encoding::Dense, PositionCoding::None, 0, ValueLayout::BytePlanes), &streams, &[]);
        assert_eq!(allowed_contexts(&c, 0, WordWidth::W1), 0b011);
    }

    #[test]
    fn levels_follow_the_dependencies() {
        // sparse, 2-byte gaps (plane 1 none, plane 0 higher plane), 4-byte
        // words in planes: plane 3 base key, plane 2 stored, planes 1 and 0
        // higher plane. Codecs 2 and 4 alternate: the form only follows the
        // stream to its descriptor.
        let headers: [Option<[u8; 4]>; 6] =
            [Some([4, 2, 2, 8]), Some([4, 0, 1, 8]), Some([4, 2, 2, 8]), Some([4, 2, 2, 8]), None, Some([4, 1, 2, 8])];
        let mut stored = Vec::new();
        let mut streams = Vec::new();
        for (q, h) in headers.into_iter().enumerate() {
            let bytes = h.map_or(vec![9; 4], |h| h.to_vec());
            let rans = if q % 2 == 0 { Codec::RansPacked } else { Codec::Rans };
            let codec = if h.is_some() { rans } else { Codec::Stored };
            streams.push(StreamRecord { stored_len: 4, decoded_len: 4, codec });
            stored.extend_from_slice(&bytes);
        }
        let c = chunk(record(Encoding::Sparse, PositionCoding::Gaps, 2, ValueLayout::BytePlanes), &streams, &stored);
        let plan = ChunkPlan::new(&c, WordWidth::W4).unwrap().unwrap();
        let forms: Vec<Option<TableForm>> = plan.streams.iter().map(|s| s.map(|(h, _)| h.form)).collect();
        let (b, p) = (Some(TableForm::Bytes), Some(TableForm::Packed));
        assert_eq!(forms, [p, b, p, b, None, b]);
        let levels: Vec<Option<u32>> = plan.streams.iter().map(|s| s.map(|(_, l)| l)).collect();
        // gap plane 1: 0; gap plane 0: 1; positions before 2; value plane 3:
        // 2, plane 2 stored, plane 1: 0 (above a stored plane), plane 0: 1
        assert_eq!(levels, [Some(1), Some(0), Some(1), Some(0), None, Some(2)]);
        assert_eq!(plan.positions_before, Some(2));
        assert_eq!(plan.needs_base, [false, false, false, false, false, true]);

        // the same values in a dense chunk: the base key needs no positions
        let c = chunk(
            record(Encoding::Dense, PositionCoding::None, 0, ValueLayout::BytePlanes),
            &streams[2..],
            &stored[8..],
        );
        let plan = ChunkPlan::new(&c, WordWidth::W4).unwrap().unwrap();
        let levels: Vec<Option<u32>> = plan.streams.iter().map(|s| s.map(|(_, l)| l)).collect();
        assert_eq!(levels, [Some(1), Some(0), None, Some(0)]);
        assert_eq!(plan.positions_before, None);

        // a chain under the base key needs the base all the way down
        let headers = [[4u8, 2, 2, 8], [4, 2, 2, 8], [4, 1, 2, 8]];
        let stored: Vec<u8> = headers.concat();
        let streams = vec![StreamRecord { stored_len: 4, decoded_len: 4, codec: Codec::RansPacked }; 3];
        let mut r = record(Encoding::Dense, PositionCoding::None, 0, ValueLayout::BytePlanes);
        r.changed_count = 0;
        let c = ChunkRef { record: r, streams: &streams, stored: &stored, words: 4, resolved_positions: None };
        // three planes of 4-byte words is not a valid chunk shape, but the
        // plan reads only the records it is given
        let plan = ChunkPlan::new(&c, WordWidth::W4).unwrap().unwrap();
        assert_eq!(plan.needs_base, [true, true, true]);
        assert_eq!(plan.streams.iter().map(|s| s.unwrap().1).collect::<Vec<_>>(), [2, 1, 0]);
        // a context that the place forbids is the header's fault
        let streams = vec![StreamRecord { stored_len: 4, decoded_len: 4, codec: Codec::RansPacked }; 1];
        let c = ChunkRef { record: r, streams: &streams, stored: &stored[..4], words: 4, resolved_positions: None };
        assert_eq!(ChunkPlan::new(&c, WordWidth::W1).unwrap_err().code(), ErrorCode::RansHeader);
    }

    /// The work launches the parse, then each level in order, each after the
    /// positions that its base-key streams read (rebuilt once the position
    /// streams of lower levels are decoded).
    #[test]
    fn positions_are_rebuilt_before_the_level_that_reads_them() {
        use crate::gpu::{DevRange, RansContext, RansStream};
        let h = Header { form: TableForm::Packed, prob_bits: 4, context: 0, table_count: 1, tile_log2: 12 };
        let mut work = RansWork::default();
        for (k, level) in [3u32, 0, 1, 3].into_iter().enumerate() {
            let at = 0x100_0000 * (k as u64 + 1);
            let s = RansStream {
                stored: DevRange::unchecked(at, 100),
                decoded: DevRange::unchecked(at + 0x1_0000, 5000),
                scratch: DevRange::unchecked(at + 0x10_0000, h.scratch_bytes(5000)),
                context: RansContext::None,
                header: h,
                allowed: 1,
                level,
                job: 0,
            };
            work.streams.push(&s, 100, 5000).unwrap();
        }
        // positions before levels 3 and 1 (one chunk each), inserted out of order
        for before in [3, 1] {
            let at = work.positions.binary_search_by_key(&before, |(l, _)| *l).unwrap_or_else(|i| i);
            work.positions.insert(at, (before, Batch::new(WordWidth::W4)));
        }
        work.seal(0).unwrap();
        assert_eq!(
            work.schedule(),
            [
                Launch::Parse,
                Launch::Decode(0),
                Launch::Positions(0),
                Launch::Decode(1),
                Launch::Positions(1),
                Launch::Decode(2),
            ]
        );
        assert_eq!(work.streams.levels().iter().map(|l| l.level).collect::<Vec<_>>(), [0, 1, 3]);
        // the tables: streams (64-aligned), then the positions tables
        assert_eq!(work.table_bytes(), 4 * RansDesc::BYTES);
        assert_eq!(
            RansWork::table_bytes_for(4, 2, 3),
            (4 * RansDesc::BYTES).next_multiple_of(64)
                + (2 * ChunkDesc::BYTES).next_multiple_of(64)
                + 3 * FillDesc::BYTES
        );
        // constant streams are filled before anything else runs
        work.fills.push(DevRange::unchecked(0x9000_0000, 7), 0xAB).unwrap();
        assert_eq!(work.schedule()[..2], [Launch::Fill, Launch::Parse]);
        assert_eq!(work.table_bytes(), 4 * RansDesc::BYTES + FillDesc::BYTES);
        let mut tables = vec![0u8; work.table_bytes()];
        work.write_tables(&mut tables);
        assert_eq!(&tables[4 * RansDesc::BYTES..][..12], [0, 0, 0, 0x90, 0, 0, 0, 0, 7, 0, 0, 0]);
        assert_eq!(tables[4 * RansDesc::BYTES + 12], 0xAB);
    }
}
