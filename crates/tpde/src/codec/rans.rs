//! The lane rANS codec: codec 2 (spec §8.7) and codec 4, the same with packed
//! tables (§8.9).
//!
//! A stream's bytes are cut into tiles of `2^tile_log2` symbols that decode on their
//! own; inside a tile, symbol `j` belongs to lane `j mod 32`, and each lane is an
//! rANS coder with a 32-bit state and 16-bit renormalisation words. Up to eight
//! frequency tables of `2^prob_bits` slots are chosen per symbol by a context byte
//! that the reader knows beforehand: the base key of the value's base word, or the
//! same symbol of the plane above.
//!
//! The decoder checks every rule of §8.7 (header, tables, tile lengths, initial and
//! final states, word counts) and never sizes an allocation by an unchecked field. It
//! is monomorphized per context kind; full steps run in a vector kernel where the
//! CPU has one, and the steps near a tile's end, whose reads are checked, in the
//! scalar loop. The AVX2 kernel is about twice the scalar loop's speed; the AVX-512
//! kernel decodes two tiles side by side, so that one tile's chain of dependent
//! steps fills the other's waits.
//!
//! The encoder picks the tables (clustering the context bytes when there is a
//! context), quantizes frequencies to minimise the coded size, and sizes the tiles so
//! that their states stay near 1% of the payload. [`predicted_len`] gives the size
//! without coding, and [`plan_each`] plans a stream under several contexts, so that a
//! writer can choose between codecs and contexts cheaply and code only its choice.

use std::borrow::Cow;

use crate::container::chunk_map::Codec;
use crate::error::{Error, ErrorCode, Result};

/// Lanes of a tile: a symbol's lane is its index in the tile modulo 32 (spec §8.7).
pub const LANES: usize = 32;
/// The lower bound `L` of a decoder state, and every lane's initial encoder state.
pub const STATE_LOW: u32 = 1 << 16;
/// Largest `prob_bits`: a table has at most `2^11` slots.
pub const MAX_PROB_BITS: u8 = 11;
/// Largest number of frequency tables in one stream.
pub const MAX_TABLES: usize = 8;

/// Bounds of `tile_log2` in a stream (spec §8.7).
const MIN_TILE_LOG2: u8 = 8;
const MAX_TILE_LOG2: u8 = 24;
/// Bounds of `tile_log2` that the encoder chooses from. A GPU warp decodes a
/// tile serially, 32 symbols a step, so the longest tile bounds a decoder
/// launch: 2^16 symbols (2048 steps) keeps that bound 4× below 2^18 for
/// deltas 0.05–1.4% larger on the benchmark corpus (spec §15.10).
const MIN_ENCODER_TILE_LOG2: u32 = 12;
const MAX_ENCODER_TILE_LOG2: u32 = 16;
/// Bytes of `prob_bits`, `context`, `table_count` and `tile_log2`.
const FIXED_HEADER_LEN: usize = 4;
/// The context map: one table index per context byte.
const CONTEXT_MAP_LEN: usize = 256;
/// A table with this many symbols or more lists them as a 32-byte bitmap.
const BITMAP_MIN_SYMBOLS: usize = 32;
/// Frequencies from this value up take the two-byte form.
const TWO_BYTE_FREQUENCY: u32 = 128;
/// Largest Exp-Golomb order of a packed table (spec §8.9).
const MAX_ORDER: u8 = 11;
/// Largest `n + g` of a packed table's code: a code value is at most
/// `zigzag(2^11) = 2^12`, so `v + 2^g` is below `2^13`.
const MAX_CODE_BITS: u32 = 12;

/// How a stream lists its context map and tables: the bytes of codec 2 (spec §8.7,
/// Table 8.7) or the bits of codec 4 (§8.9, Table 8.8). Everything else is shared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableForm {
    /// Codec 2: a byte per context map entry, one or two bytes per frequency.
    Bytes,
    /// Codec 4: a packed context map and Exp-Golomb-coded frequency differences.
    Packed,
}

impl TableForm {
    /// The table form of a lane rANS codec; `None` for any other codec.
    #[must_use]
    pub fn of_codec(codec: Codec) -> Option<Self> {
        match codec {
            Codec::Rans => Some(Self::Bytes),
            Codec::RansPacked => Some(Self::Packed),
            _ => None,
        }
    }

    /// The codec of a stream with this table form.
    #[must_use]
    pub fn codec(self) -> Codec {
        match self {
            Self::Bytes => Codec::Rans,
            Self::Packed => Codec::RansPacked,
        }
    }
}

/// Where a stream's context bytes come from (spec §8.7, the `context` field).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContextKind {
    /// Every symbol has context 0; the stream has one table.
    None = 0,
    /// The base key (§8.6) of the base word the value belongs to.
    BaseKey = 1,
    /// The same byte of the decoded plane above.
    HigherPlane = 2,
}

impl ContextKind {
    fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            0 => Some(Self::None),
            1 => Some(Self::BaseKey),
            2 => Some(Self::HigherPlane),
            _ => None,
        }
    }
}

/// The context byte of every symbol, as the reader derives it (spec §8.7).
#[derive(Debug, Clone, Copy)]
pub enum Contexts<'a> {
    /// No context: every symbol has context byte 0.
    None,
    /// `ctx(i) = plane_above[i]` (`plane_above.len()` is the symbol count).
    HigherPlane(&'a [u8]),
    /// `ctx(i)` is the key (§8.6) of the base word at value `i`'s word: word
    /// `positions[i]` for a sparse chunk (`Some`), word `i` for a dense chunk (`None`);
    /// zero past the end of `base`. `base` holds little-endian words of `word_bytes`
    /// bytes and may be shorter than the chunk.
    BaseKeys {
        /// The chunk's base words, possibly fewer than the chunk has.
        base: &'a [u8],
        /// Bytes per word: 1, 2, 4 or 8.
        word_bytes: usize,
        /// The word of each value of a sparse chunk; `None` for a dense chunk.
        positions: Option<&'a [u32]>,
    },
}

impl Contexts<'_> {
    /// The `context` field that goes with these contexts.
    #[must_use]
    pub fn kind(&self) -> ContextKind {
        match self {
            Self::None => ContextKind::None,
            Self::HigherPlane(_) => ContextKind::HigherPlane,
            Self::BaseKeys { .. } => ContextKind::BaseKey,
        }
    }
}

fn header_error(message: impl std::fmt::Display) -> Error {
    Error::new(ErrorCode::RansHeader, format!("lane rANS stream: {message}"))
}

fn decode_error(tile: usize, message: impl std::fmt::Display) -> Error {
    Error::new(ErrorCode::RansDecode, format!("lane rANS stream, tile {tile}: {message}"))
}

// ---------------------------------------------------------------------------------
// Header (spec §8.7, Table 8.6)
// ---------------------------------------------------------------------------------

/// The four fixed fields of a stream, range-checked.
#[derive(Debug, Clone, Copy)]
struct FixedHeader {
    prob_bits: u32,
    kind: ContextKind,
    table_count: usize,
    tile_log2: u32,
}

/// Reads the fixed fields in layout order. With `expected`, a context other than it
/// is "not allowed in this stream" (§8.7), checked right where the field is read.
fn read_fixed_header(stored: &[u8], expected: Option<ContextKind>) -> Result<FixedHeader> {
    let field = |at: usize, name: &str| {
        stored.get(at).copied().ok_or_else(|| header_error(format!("the stream ends before its {name} field")))
    };
    let prob_bits = field(0, "prob_bits")?;
    if !(1..=MAX_PROB_BITS).contains(&prob_bits) {
        return Err(header_error(format!("prob_bits {prob_bits} is not 1 to {MAX_PROB_BITS}")));
    }
    let context = field(1, "context")?;
    let kind =
        ContextKind::from_byte(context).ok_or_else(|| header_error(format!("context {context} is undefined")))?;
    if let Some(expected) = expected {
        if kind != expected {
            return Err(header_error(format!(
                "context {context} is not allowed in this stream (the reader derives context {})",
                expected as u8
            )));
        }
    }
    let table_count = field(2, "table_count")?;
    let allowed = if kind == ContextKind::None { 1..=1 } else { 2..=MAX_TABLES };
    if !allowed.contains(&usize::from(table_count)) {
        return Err(header_error(format!(
            "table_count {table_count} is not {} to {} for context {context}",
            allowed.start(),
            allowed.end()
        )));
    }
    let tile_log2 = field(3, "tile_log2")?;
    if !(MIN_TILE_LOG2..=MAX_TILE_LOG2).contains(&tile_log2) {
        return Err(header_error(format!("tile_log2 {tile_log2} is not {MIN_TILE_LOG2} to {MAX_TILE_LOG2}")));
    }
    Ok(FixedHeader {
        prob_bits: u32::from(prob_bits),
        kind,
        table_count: usize::from(table_count),
        tile_log2: u32::from(tile_log2),
    })
}

/// The context kind of a stream, from its four fixed header bytes, which are checked
/// (lengths and the ranges of `prob_bits`, `context`, `table_count`, `tile_log2`).
/// A chunk decoder learns from it which context bytes the stream needs.
///
/// # Errors
/// `E_RANS_HEADER` when a fixed field is missing or out of range (spec §8.7).
pub fn context_kind(stored: &[u8]) -> Result<ContextKind> {
    read_fixed_header(stored, None).map(|header| header.kind)
}

/// Reads a stream's bytes field by field; running out is `E_RANS_HEADER`.
struct FieldReader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> FieldReader<'a> {
    fn take(&mut self, len: usize, what: &dyn Fn() -> String) -> Result<&'a [u8]> {
        let field = self
            .at
            .checked_add(len)
            .and_then(|end| self.bytes.get(self.at..end))
            .ok_or_else(|| header_error(format!("the stream ends inside {}", what())))?;
        self.at += len;
        Ok(field)
    }

    fn byte(&mut self, what: &dyn Fn() -> String) -> Result<u8> {
        self.take(1, what).map(|field| field[0])
    }

    fn rest(&self) -> &'a [u8] {
        &self.bytes[self.at..]
    }
}

/// Reads a packed field's bits, least significant bit of each byte first (spec §8.9).
struct BitReader<'a> {
    bytes: &'a [u8],
    /// Bits read so far.
    at: usize,
}

impl BitReader<'_> {
    fn bit(&mut self) -> Option<u32> {
        let byte = self.bytes.get(self.at / 8)?;
        let bit = byte >> (self.at % 8) & 1;
        self.at += 1;
        Some(u32::from(bit))
    }

    /// `count` bits (at most 32) as an unsigned integer, its least significant bit first.
    fn bits(&mut self, count: u32) -> Option<u32> {
        (0..count).try_fold(0u32, |value, shift| Some(value | self.bit()? << shift))
    }

    /// The bytes the bits read so far end in.
    fn bytes_used(&self) -> usize {
        self.at.div_ceil(8)
    }

    /// Whether the unused high bits of the last byte read are 0.
    fn padding_is_zero(&self) -> bool {
        self.at.is_multiple_of(8) || self.bytes[self.at / 8] >> (self.at % 8) == 0
    }
}

/// Bits per entry of a packed context map of `table_count` tables: `ceil(log2 T)`.
fn packed_map_bits(table_count: usize) -> u32 {
    usize::BITS - (table_count - 1).leading_zeros()
}

/// `zigzag(d)` of spec §8.9: 0, −1, 1, −2, … as 0, 1, 2, 3, …
fn zigzag(difference: i64) -> u32 {
    let folded = if difference >= 0 { 2 * difference } else { -2 * difference - 1 };
    u32::try_from(folded).expect("differences of frequencies of at most 2^11")
}

/// Decoding tables: for each slot of each table one packed entry, and per context
/// byte where its table starts.
struct DecodeTables {
    /// Entry of slot `r` of table `t` at `(t << prob_bits) + r`: the symbol in bits 0–7,
    /// its frequency in bits 8–19, `r − cum(symbol)` in bits 20–30 (spec §15.10).
    /// Exactly `table_count << prob_bits` entries, every one written.
    slots: Vec<u32>,
    /// `context_map[c] << prob_bits`: the first slot of context byte `c`'s table.
    context_offsets: [u32; 256],
}

const ENTRY_FREQUENCY_SHIFT: u32 = 8;
const ENTRY_FREQUENCY_MASK: u32 = 0xFFF;
const ENTRY_OFFSET_SHIFT: u32 = 20;

/// One table's symbols and frequencies, as listed (spec Table 8.7).
struct ParsedTable {
    count: usize,
    symbols: [u8; 256],
    frequencies: [u32; 256],
}

fn read_table(reader: &mut FieldReader<'_>, form: TableForm, prob_bits: u32, table: usize) -> Result<ParsedTable> {
    let mut parsed = ParsedTable { count: 0, symbols: [0; 256], frequencies: [0; 256] };
    let count = usize::from(reader.byte(&|| format!("table {table}'s symbol count"))?) + 1;
    parsed.count = count;
    if form == TableForm::Packed && count == 256 {
        // Every byte, in order: the packed form lists nothing.
        for (slot, symbol) in parsed.symbols.iter_mut().zip(0..=255u8) {
            *slot = symbol;
        }
    } else if count < BITMAP_MIN_SYMBOLS {
        let listed = reader.take(count, &|| format!("table {table}'s symbol list"))?;
        if listed.windows(2).any(|pair| pair[0] >= pair[1]) {
            return Err(header_error(format!("table {table}'s symbol list is not strictly increasing")));
        }
        parsed.symbols[..count].copy_from_slice(listed);
    } else {
        let bitmap = reader.take(32, &|| format!("table {table}'s symbol bitmap"))?;
        let set: usize = bitmap.iter().map(|byte| byte.count_ones() as usize).sum();
        if set != count {
            return Err(header_error(format!("table {table}'s bitmap has {set} symbols, not {count}")));
        }
        let present = (0..=255u8).filter(|&symbol| bitmap[usize::from(symbol / 8)] >> (symbol % 8) & 1 == 1);
        for (slot, symbol) in parsed.symbols.iter_mut().zip(present) {
            *slot = symbol;
        }
    }
    if form == TableForm::Packed {
        read_packed_frequencies(reader, prob_bits, table, &mut parsed)?;
        return Ok(parsed);
    }
    let total = 1u32 << prob_bits;
    let mut sum = 0u32;
    for (index, frequency) in parsed.frequencies[..count].iter_mut().enumerate() {
        let what = || format!("table {table}'s frequency {index}");
        let first = reader.byte(&what)?;
        *frequency = if first < 0x80 {
            if first == 0 {
                return Err(header_error(format!("table {table} gives symbol {} frequency 0", parsed.symbols[index])));
            }
            u32::from(first)
        } else {
            let second = reader.byte(&what)?;
            let value = u32::from(first & 0x7F) << 8 | u32::from(second);
            if value < TWO_BYTE_FREQUENCY {
                return Err(header_error(format!(
                    "table {table} writes frequency {value} in two bytes (the two-byte form starts at 128)"
                )));
            }
            value
        };
        // At most 256 frequencies below 2^15: the sum cannot overflow.
        sum += *frequency;
    }
    if sum != total {
        return Err(header_error(format!("table {table}'s frequencies sum to {sum}, not 2^{prob_bits}")));
    }
    Ok(parsed)
}

/// The Exp-Golomb-coded frequency differences of a packed table (spec §8.9,
/// Table 8.8), after its symbol set.
fn read_packed_frequencies(
    reader: &mut FieldReader<'_>,
    prob_bits: u32,
    table: usize,
    parsed: &mut ParsedTable,
) -> Result<()> {
    let order = reader.byte(&|| format!("table {table}'s Exp-Golomb order"))?;
    if order > MAX_ORDER {
        return Err(header_error(format!("table {table}'s Exp-Golomb order {order} is not 0 to {MAX_ORDER}")));
    }
    let order = u32::from(order);
    let count = parsed.count;
    let mut bits = BitReader { bytes: reader.rest(), at: 0 };
    let ends = || header_error(format!("the stream ends inside table {table}'s frequency codes"));
    // The prefixes: each code's suffix length n + g, less g.
    let mut lengths = [0u32; 256];
    for (index, length) in lengths[..count].iter_mut().enumerate() {
        while bits.bit().ok_or_else(ends)? == 1 {
            *length += 1;
            // A longer prefix makes a frequency out of range: stop reading it.
            if *length + order > MAX_CODE_BITS {
                return Err(header_error(format!("table {table}'s frequency {index} is out of range")));
            }
        }
    }
    let total = 1i64 << prob_bits;
    let (mut previous, mut sum) = (0i64, 0i64);
    for (index, &length) in lengths[..count].iter().enumerate() {
        let suffix_bits = length + order;
        let value = (1 << suffix_bits | bits.bits(suffix_bits).ok_or_else(ends)?) - (1 << order);
        let difference = if value % 2 == 0 { i64::from(value / 2) } else { -i64::from(value.div_ceil(2)) };
        let frequency = previous + difference;
        if !(1..=total).contains(&frequency) {
            return Err(header_error(format!(
                "table {table} gives symbol {} frequency {frequency}, not 1 to 2^{prob_bits}",
                parsed.symbols[index]
            )));
        }
        parsed.frequencies[index] = u32::try_from(frequency).expect("in range");
        sum += frequency;
        previous = frequency;
    }
    if !bits.padding_is_zero() {
        return Err(header_error(format!("table {table}'s frequency codes end in nonzero padding")));
    }
    if sum != total {
        return Err(header_error(format!("table {table}'s frequencies sum to {sum}, not 2^{prob_bits}")));
    }
    reader.at += bits.bytes_used();
    Ok(())
}

/// The context map's table index per context byte, in either form.
fn read_context_map(reader: &mut FieldReader<'_>, form: TableForm, table_count: usize) -> Result<[u8; 256]> {
    let mut map = [0u8; 256];
    match form {
        TableForm::Bytes => map.copy_from_slice(reader.take(CONTEXT_MAP_LEN, &|| "the context map".to_owned())?),
        TableForm::Packed => {
            let width = packed_map_bits(table_count);
            let packed = reader.take(32 * width as usize, &|| "the packed context map".to_owned())?;
            let mut bits = BitReader { bytes: packed, at: 0 };
            for entry in &mut map {
                let table = bits.bits(width).expect("the map holds 256 entries");
                *entry = u8::try_from(table).expect("at most 3 bits");
            }
        }
    }
    Ok(map)
}

fn read_tables(reader: &mut FieldReader<'_>, form: TableForm, header: &FixedHeader) -> Result<DecodeTables> {
    let mut context_offsets = [0u32; 256];
    if header.table_count > 1 {
        let map = read_context_map(reader, form, header.table_count)?;
        for (context, (&table, offset)) in map.iter().zip(&mut context_offsets).enumerate() {
            if usize::from(table) >= header.table_count {
                return Err(header_error(format!(
                    "context {context} maps to table {table}, but there are {} tables",
                    header.table_count
                )));
            }
            *offset = u32::from(table) << header.prob_bits;
        }
    }
    // At most 8 · 2^11 entries: table_count and prob_bits are checked.
    let mut slots = Vec::with_capacity(header.table_count << header.prob_bits);
    for table in 0..header.table_count {
        let parsed = read_table(reader, form, header.prob_bits, table)?;
        // The frequencies sum to 2^prob_bits, so the table fills exactly its slots.
        for (&symbol, &frequency) in parsed.symbols.iter().zip(&parsed.frequencies).take(parsed.count) {
            slots.extend(
                (0..frequency).map(|offset| {
                    u32::from(symbol) | frequency << ENTRY_FREQUENCY_SHIFT | offset << ENTRY_OFFSET_SHIFT
                }),
            );
        }
    }
    Ok(DecodeTables { slots, context_offsets })
}

/// A stream whose header, tables and tile lengths have been checked.
struct CheckedStream<'a> {
    prob_bits: u32,
    tile_log2: u32,
    tables: DecodeTables,
    /// One u32 per tile.
    tile_lengths: &'a [u8],
    /// The tile payloads, back to back; their lengths sum to exactly this.
    payloads: &'a [u8],
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

/// Every header check of §8.7 (and §8.9), in layout order, before anything is
/// decoded.
fn check_stream(
    form: TableForm,
    stored: &[u8],
    decoded_len: usize,
    expected: ContextKind,
) -> Result<CheckedStream<'_>> {
    let header = read_fixed_header(stored, Some(expected))?;
    let mut reader = FieldReader { bytes: stored, at: FIXED_HEADER_LEN };
    let tables = read_tables(&mut reader, form, &header)?;
    // The tile count comes from decoded_len; its lengths must be in the stream
    // before they are read.
    let tile_symbols = 1usize << header.tile_log2;
    let tiles = decoded_len.div_ceil(tile_symbols);
    let lengths_len = tiles.checked_mul(4).ok_or_else(|| header_error("the tile lengths overflow"))?;
    let tile_lengths = reader.take(lengths_len, &|| format!("the tile lengths ({tiles} tiles)"))?;
    let payloads = reader.rest();
    let mut sum = 0u64;
    for tile in 0..tiles {
        let symbols = tile_symbols.min(decoded_len - tile * tile_symbols);
        let states_len = 4 * symbols.min(LANES) as u64;
        let length = u64::from(u32_at(tile_lengths, 4 * tile));
        if length < states_len || !(length - states_len).is_multiple_of(2) {
            return Err(header_error(format!(
                "tile {tile} has length {length}: not {states_len} bytes of states plus whole 16-bit words"
            )));
        }
        sum += length;
    }
    if sum != payloads.len() as u64 {
        return Err(header_error(format!("the tile lengths sum to {sum}, but {} bytes follow them", payloads.len())));
    }
    Ok(CheckedStream { prob_bits: header.prob_bits, tile_log2: header.tile_log2, tables, tile_lengths, payloads })
}

// ---------------------------------------------------------------------------------
// Contexts
// ---------------------------------------------------------------------------------

/// The base key (§8.6) of the little-endian word `word` of `WB` bytes:
/// `(rotl(b, 1) >> (w − 8)) & 0xFF`, the top byte shifted up by one with the next
/// bit below it, or for bytes the byte rotated by one.
#[inline]
fn key_of_word<const WB: usize>(word: &[u8]) -> u8 {
    if WB == 1 {
        word[0].rotate_left(1)
    } else {
        word[WB - 1] << 1 | word[WB - 2] >> 7
    }
}

/// The key of base word `index`, or of a zero word past the end of `base`.
#[inline]
fn key_at<const WB: usize>(base: &[u8], index: usize) -> u8 {
    index
        .checked_mul(WB)
        .and_then(|start| base.get(start..)?.first_chunk::<WB>())
        .map_or(0, |word| key_of_word::<WB>(word))
}

/// The context bytes of a stream being decoded, for symbols below its decoded length.
/// One implementation per context kind, so the decoder is monomorphized per kind.
trait ContextSource {
    /// Every symbol uses table 0: the decoder skips the lookups.
    const NONE: bool = false;

    /// The word width of dense base keys, whose keys a vector kernel may compute
    /// from [`ContextSource::dense_words`]; 0 for every other source.
    const DENSE_KEY_BYTES: usize = 0;

    /// The context byte of symbol `i`.
    fn context(&self, i: usize) -> u8;

    /// For dense base keys, the 32 base words of symbols `first .. first + 32`, when
    /// the base holds them all.
    #[inline]
    fn dense_words(&self, _first: usize) -> Option<&[u8]> {
        None
    }

    /// The context bytes of symbols `first .. first + 32`.
    #[inline]
    fn step_contexts(&self, first: usize, out: &mut [u8; LANES]) {
        for (l, context) in out.iter_mut().enumerate() {
            *context = self.context(first + l);
        }
    }
}

struct NoContext;

impl ContextSource for NoContext {
    const NONE: bool = true;

    #[inline]
    fn context(&self, _: usize) -> u8 {
        0
    }
}

struct PlaneAbove<'a>(&'a [u8]);

impl ContextSource for PlaneAbove<'_> {
    #[inline]
    fn context(&self, i: usize) -> u8 {
        self.0[i]
    }

    #[inline]
    fn step_contexts(&self, first: usize, out: &mut [u8; LANES]) {
        out.copy_from_slice(&self.0[first..first + LANES]);
    }
}

struct DenseKeys<'a, const WB: usize>(&'a [u8]);

impl<const WB: usize> ContextSource for DenseKeys<'_, WB> {
    const DENSE_KEY_BYTES: usize = WB;

    #[inline]
    fn context(&self, i: usize) -> u8 {
        key_at::<WB>(self.0, i)
    }

    #[inline]
    fn dense_words(&self, first: usize) -> Option<&[u8]> {
        self.0.get(first * WB..(first + LANES) * WB)
    }

    #[inline]
    fn step_contexts(&self, first: usize, out: &mut [u8; LANES]) {
        match self.0.get(first * WB..(first + LANES) * WB) {
            Some(words) => {
                for (context, word) in out.iter_mut().zip(words.chunks_exact(WB)) {
                    *context = key_of_word::<WB>(word);
                }
            }
            None => {
                for (l, context) in out.iter_mut().enumerate() {
                    *context = self.context(first + l);
                }
            }
        }
    }
}

struct SparseKeys<'a, const WB: usize> {
    base: &'a [u8],
    positions: &'a [u32],
}

impl<const WB: usize> ContextSource for SparseKeys<'_, WB> {
    #[inline]
    fn context(&self, i: usize) -> u8 {
        key_at::<WB>(self.base, self.positions[i] as usize)
    }

    #[inline]
    fn step_contexts(&self, first: usize, out: &mut [u8; LANES]) {
        for (context, &position) in out.iter_mut().zip(&self.positions[first..first + LANES]) {
            *context = key_at::<WB>(self.base, position as usize);
        }
    }
}

// ---------------------------------------------------------------------------------
// Decoder
// ---------------------------------------------------------------------------------

/// Checks everything of a stream that needs no decoding (spec §8.7, the header
/// checks) against the context its place calls for: what a reader checks of a
/// stream whose context it cannot form, such as base keys without the base.
///
/// # Errors
/// `E_RANS_HEADER`.
pub fn check_header(form: TableForm, stored: &[u8], decoded_len: usize, expected: ContextKind) -> Result<()> {
    check_stream(form, stored, decoded_len, expected).map(|_| ())
}

/// Decodes one stream of `decoded_len` symbols into `out` (cleared first), checking
/// everything of spec §8.7.
///
/// `contexts.kind()` must be the stream's context kind: a caller passes
/// [`Contexts::None`] where the stream's place allows no context, so that any other
/// context is "not allowed in this stream". [`context_kind`] tells beforehand which
/// context a stream needs.
///
/// # Errors
/// - `E_RANS_HEADER`: a header field, table, the context or a tile length breaks
///   §8.7, or the stream is too short for a field.
/// - `E_RANS_DECODE`: a tile's initial state is below 2^16, it runs out of words,
///   leaves words over, or ends in a state other than 2^16.
/// - `E_INVALID_ARGUMENT`: the contexts do not fit the stream (a plane above or a
///   position list of another length than `decoded_len`, a word width other than
///   1, 2, 4 or 8).
/// - `E_OUT_OF_MEMORY`: `out` cannot hold `decoded_len` bytes.
pub fn decode_into(
    form: TableForm,
    stored: &[u8],
    decoded_len: usize,
    contexts: Contexts<'_>,
    out: &mut Vec<u8>,
) -> Result<()> {
    decode_with(form, stored, decoded_len, contexts, out, Kernel::detect())
}

/// [`decode_into`] with the portable scalar kernel only, for benchmarks that weigh it
/// against the vector kernel [`decode_into`] picks where the CPU has one.
///
/// # Errors
/// As [`decode_into`].
#[doc(hidden)]
pub fn decode_into_scalar(
    form: TableForm,
    stored: &[u8],
    decoded_len: usize,
    contexts: Contexts<'_>,
    out: &mut Vec<u8>,
) -> Result<()> {
    decode_with(form, stored, decoded_len, contexts, out, Kernel::Scalar)
}

/// How full steps are decoded. Every kernel gives the same symbols and the same
/// errors; the tests hold the vector kernel to the scalar one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernel {
    Scalar,
    /// 8 lanes per vector with gathers, where the CPU has AVX2.
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// 16 lanes per vector, with gathers, mask compares and expands, where the CPU
    /// has AVX-512 F, BW, VL and VBMI.
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Kernel {
    /// Decodes full steps while the next 64 bytes of words are in `input`'s payload.
    fn fast_steps<C: ContextSource>(
        self,
        input: &TileInput<'_>,
        contexts: &C,
        progress: &mut TileProgress,
        out: &mut [u8],
    ) {
        match self {
            Self::Scalar => fast_steps(input, contexts, progress, out),
            // SAFETY: Kernel::Avx2 is only chosen where the CPU has AVX2 and POPCNT.
            #[cfg(target_arch = "x86_64")]
            Self::Avx2 => unsafe { avx2::fast_steps(input, contexts, progress, out) },
            // SAFETY: Kernel::Avx512 is only chosen where the CPU has its features.
            #[cfg(target_arch = "x86_64")]
            Self::Avx512 => unsafe { avx512::fast_steps(input, contexts, progress, out) },
        }
    }

    /// The fastest kernel the CPU has.
    fn detect() -> Self {
        static FASTEST: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
        *FASTEST.get_or_init(|| Self::available().last().copied().unwrap_or(Self::Scalar))
    }

    /// Every kernel the CPU has, slowest first.
    fn available() -> Vec<Self> {
        #[allow(unused_mut)] // other architectures have the scalar kernel only
        let mut kernels = vec![Self::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx2") && has!("popcnt") {
                kernels.push(Self::Avx2);
                if has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("avx512vbmi") {
                    kernels.push(Self::Avx512);
                }
            }
        }
        kernels
    }
}

fn decode_with(
    form: TableForm,
    stored: &[u8],
    decoded_len: usize,
    contexts: Contexts<'_>,
    out: &mut Vec<u8>,
    kernel: Kernel,
) -> Result<()> {
    let checked = check_stream(form, stored, decoded_len, contexts.kind())
        .and_then(|stream| check_contexts(&contexts, decoded_len).map(|()| stream));
    let stream = checked.inspect_err(|_| out.clear())?;
    // Every symbol is decoded over its byte, so a reused buffer's old bytes need no
    // zeroing first: only what it grows by is filled.
    out.truncate(decoded_len);
    crate::limits::try_reserve(out, decoded_len - out.len()).inspect_err(|_| out.clear())?;
    out.resize(decoded_len, 0);
    let decoded = match contexts {
        Contexts::None => decode_tiles(&stream, &NoContext, out, kernel),
        Contexts::HigherPlane(plane) => decode_tiles(&stream, &PlaneAbove(plane), out, kernel),
        Contexts::BaseKeys { base, word_bytes, positions: None } => match word_bytes {
            1 => decode_tiles(&stream, &DenseKeys::<1>(base), out, kernel),
            2 => decode_tiles(&stream, &DenseKeys::<2>(base), out, kernel),
            4 => decode_tiles(&stream, &DenseKeys::<4>(base), out, kernel),
            _ => decode_tiles(&stream, &DenseKeys::<8>(base), out, kernel),
        },
        Contexts::BaseKeys { base, word_bytes, positions: Some(positions) } => match word_bytes {
            1 => decode_tiles(&stream, &SparseKeys::<1> { base, positions }, out, kernel),
            2 => decode_tiles(&stream, &SparseKeys::<2> { base, positions }, out, kernel),
            4 => decode_tiles(&stream, &SparseKeys::<4> { base, positions }, out, kernel),
            _ => decode_tiles(&stream, &SparseKeys::<8> { base, positions }, out, kernel),
        },
    };
    if decoded.is_err() {
        out.clear();
    }
    decoded
}

fn check_contexts(contexts: &Contexts<'_>, decoded_len: usize) -> Result<()> {
    let wrong = |what: String| Err(Error::new(ErrorCode::InvalidArgument, format!("lane rANS contexts: {what}")));
    match *contexts {
        Contexts::None => Ok(()),
        Contexts::HigherPlane(plane) if plane.len() != decoded_len => {
            wrong(format!("the plane above has {} bytes, the stream {decoded_len}", plane.len()))
        }
        Contexts::BaseKeys { word_bytes, .. } if !matches!(word_bytes, 1 | 2 | 4 | 8) => {
            wrong(format!("word width {word_bytes} is not 1, 2, 4 or 8"))
        }
        Contexts::BaseKeys { positions: Some(positions), .. } if positions.len() != decoded_len => {
            wrong(format!("{} positions for {decoded_len} values", positions.len()))
        }
        _ => Ok(()),
    }
}

fn decode_tiles<C: ContextSource>(
    stream: &CheckedStream<'_>,
    contexts: &C,
    out: &mut [u8],
    kernel: Kernel,
) -> Result<()> {
    let tile_symbols = 1usize << stream.tile_log2;
    let mut inputs = TileInputs { stream, tile_symbols, next: 0, payload_start: 0 };
    let mut outs = out.chunks_mut(tile_symbols);
    while let Some(out) = outs.next() {
        let input = inputs.next();
        let mut progress = start_tile(&input, out.len())?;
        #[cfg(target_arch = "x86_64")]
        if kernel == Kernel::Avx512 {
            if let Some(second_out) = outs.next() {
                let second = inputs.next();
                // An error of the second tile's start waits for the first tile's,
                // which every kernel reports first.
                match start_tile(&second, second_out.len()) {
                    Ok(mut second_progress) => finish_two_tiles(
                        [&input, &second],
                        contexts,
                        [&mut progress, &mut second_progress],
                        [out, second_out],
                    )?,
                    Err(error) => {
                        finish_tile(&input, contexts, &mut progress, out, kernel)?;
                        return Err(error);
                    }
                }
                continue;
            }
        }
        finish_tile(&input, contexts, &mut progress, out, kernel)?;
    }
    Ok(())
}

/// The tiles of a checked stream, in order.
struct TileInputs<'a> {
    stream: &'a CheckedStream<'a>,
    tile_symbols: usize,
    next: usize,
    payload_start: usize,
}

impl<'a> TileInputs<'a> {
    fn next(&mut self) -> TileInput<'a> {
        let tile = self.next;
        let length = u32_at(self.stream.tile_lengths, 4 * tile) as usize;
        // check_stream made the lengths sum to the payloads' length; were it not so,
        // the empty payload would fail start_tile.
        let payload = self.stream.payloads.get(self.payload_start..self.payload_start + length).unwrap_or_default();
        self.payload_start += length;
        self.next += 1;
        TileInput { stream: self.stream, tile, first_symbol: tile * self.tile_symbols, payload }
    }
}

/// One tile of a checked stream.
struct TileInput<'a> {
    stream: &'a CheckedStream<'a>,
    tile: usize,
    /// The stream index of the tile's first symbol.
    first_symbol: usize,
    payload: &'a [u8],
}

/// Where the decoding of a tile stands.
#[derive(Debug, Clone, Copy, Default)]
struct TileProgress {
    states: [u32; LANES],
    /// The next word's offset in the payload.
    cursor: usize,
    /// Symbols decoded.
    done: usize,
}

/// Reads a tile's initial states (spec §8.7: each at least 2^16).
fn start_tile(input: &TileInput<'_>, symbols: usize) -> Result<TileProgress> {
    let lanes = symbols.min(LANES);
    let mut states = [0u32; LANES];
    if input.payload.len() < 4 * lanes {
        return Err(decode_error(input.tile, "the tile is shorter than its states"));
    }
    for (lane, state) in states[..lanes].iter_mut().enumerate() {
        *state = u32_at(input.payload, 4 * lane);
        if *state < STATE_LOW {
            return Err(decode_error(input.tile, format!("lane {lane} starts in state {state}, below 2^16")));
        }
    }
    Ok(TileProgress { states, cursor: 4 * lanes, done: 0 })
}

/// Decodes the rest of a tile into `out` and makes the final checks (spec §8.7).
fn finish_tile<C: ContextSource>(
    input: &TileInput<'_>,
    contexts: &C,
    progress: &mut TileProgress,
    out: &mut [u8],
    kernel: Kernel,
) -> Result<()> {
    // Full steps while a step's 32 words are surely in the tile: no read is checked.
    kernel.fast_steps(input, contexts, progress, out);
    if let Some(tail) = PaddedTail::new(input, progress, out.len()) {
        tail.steps(kernel, input, contexts, progress, out);
    }
    check_last_steps(input, contexts, progress, out)
}

/// [`finish_tile`] of two tiles of one stream, their steps side by side; the first
/// tile's error, if any, is reported.
#[cfg(target_arch = "x86_64")]
fn finish_two_tiles<C: ContextSource>(
    inputs: [&TileInput<'_>; 2],
    contexts: &C,
    [first, second]: [&mut TileProgress; 2],
    [first_out, second_out]: [&mut [u8]; 2],
) -> Result<()> {
    let kernel = Kernel::Avx512;
    // SAFETY: Kernel::Avx512 is only chosen where the CPU has its features.
    unsafe { avx512::fast_steps_of_two(inputs, contexts, [first, second], [first_out, second_out]) };
    // One tile may have steps left where the other had none.
    kernel.fast_steps(inputs[0], contexts, first, first_out);
    kernel.fast_steps(inputs[1], contexts, second, second_out);
    let tails =
        [PaddedTail::new(inputs[0], first, first_out.len()), PaddedTail::new(inputs[1], second, second_out.len())];
    if let [Some(first_tail), Some(second_tail)] = &tails {
        let mut in_tails = [first_tail.progress(first), second_tail.progress(second)];
        let tail_inputs = [first_tail.input(inputs[0]), second_tail.input(inputs[1])];
        let [first_in_tail, second_in_tail] = &mut in_tails;
        // SAFETY: as above.
        unsafe {
            avx512::fast_steps_of_two(
                [&tail_inputs[0], &tail_inputs[1]],
                contexts,
                [&mut *first_in_tail, &mut *second_in_tail],
                [&mut *first_out, &mut *second_out],
            );
        }
        kernel.fast_steps(&tail_inputs[0], contexts, first_in_tail, first_out);
        kernel.fast_steps(&tail_inputs[1], contexts, second_in_tail, second_out);
        first_tail.accept(inputs[0], first_in_tail, first);
        second_tail.accept(inputs[1], second_in_tail, second);
    } else {
        if let Some(tail) = &tails[0] {
            tail.steps(kernel, inputs[0], contexts, first, first_out);
        }
        if let Some(tail) = &tails[1] {
            tail.steps(kernel, inputs[1], contexts, second, second_out);
        }
    }
    check_last_steps(inputs[0], contexts, first, first_out)?;
    check_last_steps(inputs[1], contexts, second, second_out)
}

/// The full steps near a tile's end, where fewer than 64 bytes of words are left,
/// run on those words padded with zeros: a tile whose symbols need few bits spends
/// thousands of steps there. A step that read padding ran past the tile's end; then
/// these steps are dropped and redone checked, which reports it.
struct PaddedTail {
    bytes: [u8; 128],
    /// Bytes of words left in the tile.
    left: usize,
}

impl PaddedTail {
    /// The tile's last words padded, where a full step is left but not 64 bytes.
    fn new(input: &TileInput<'_>, progress: &TileProgress, symbols: usize) -> Option<Self> {
        let payload = input.payload;
        let left = payload.len() - progress.cursor.min(payload.len());
        if left >= 64 || symbols - progress.done < LANES {
            return None;
        }
        let mut bytes = [0u8; 128];
        bytes[..left].copy_from_slice(&payload[payload.len() - left..]);
        Some(Self { bytes, left })
    }

    /// The tile with the padded words as its payload.
    fn input<'a>(&'a self, input: &TileInput<'a>) -> TileInput<'a> {
        TileInput { payload: &self.bytes[..self.left + 64], ..*input }
    }

    /// Where the padded words start.
    fn progress(&self, progress: &TileProgress) -> TileProgress {
        TileProgress { cursor: 0, ..*progress }
    }

    /// The steps of one tile on its padded words, kept if they read no padding.
    fn steps<C: ContextSource>(
        &self,
        kernel: Kernel,
        input: &TileInput<'_>,
        contexts: &C,
        progress: &mut TileProgress,
        out: &mut [u8],
    ) {
        let mut in_tail = self.progress(progress);
        kernel.fast_steps(&self.input(input), contexts, &mut in_tail, out);
        self.accept(input, &in_tail, progress);
    }

    /// Keeps the steps made on the padded words if they read none of the padding.
    fn accept(&self, input: &TileInput<'_>, in_tail: &TileProgress, progress: &mut TileProgress) {
        if in_tail.cursor <= self.left {
            *progress = TileProgress { cursor: input.payload.len() - self.left + in_tail.cursor, ..*in_tail };
        }
    }
}

/// The tile's last partial step, every read checked, and the final checks.
fn check_last_steps<C: ContextSource>(
    input: &TileInput<'_>,
    contexts: &C,
    progress: &mut TileProgress,
    out: &mut [u8],
) -> Result<()> {
    let TileInput { stream, tile, first_symbol, payload } = *input;
    let coder = LaneCoder { slots: &stream.tables.slots, prob_bits: stream.prob_bits };
    let mut offsets = [0u32; LANES];
    let mut cursor = progress.cursor;
    for (step, step_out) in out[progress.done..].chunks_mut(LANES).enumerate() {
        if !C::NONE {
            let step_first = first_symbol + progress.done + step * LANES;
            for (l, offset) in offsets[..step_out.len()].iter_mut().enumerate() {
                *offset = stream.tables.context_offsets[usize::from(contexts.context(step_first + l))];
            }
        }
        cursor = coder.checked_step(&mut progress.states, &offsets, payload, cursor, step_out, tile)?;
    }
    if cursor != payload.len() {
        return Err(decode_error(tile, format!("{} bytes of words are left over", payload.len() - cursor)));
    }
    let lanes = out.len().min(LANES);
    if let Some((lane, state)) = progress.states[..lanes].iter().enumerate().find(|(_, &state)| state != STATE_LOW) {
        return Err(decode_error(tile, format!("lane {lane} ends in state {state}, not 2^16")));
    }
    Ok(())
}

/// Decodes full steps of 32 symbols while the next 64 bytes of words are in the
/// tile, so that no read needs a check.
fn fast_steps<C: ContextSource>(input: &TileInput<'_>, contexts: &C, progress: &mut TileProgress, out: &mut [u8]) {
    let tables = &input.stream.tables;
    let coder = LaneCoder { slots: &tables.slots, prob_bits: input.stream.prob_bits };
    let mut offsets = [0u32; LANES];
    let mut step_contexts = [0u8; LANES];
    let (mut cursor, mut done) = (progress.cursor, progress.done);
    let mut states = progress.states;
    let mut rest = &mut out[done..];
    while let Some((step_out, tail)) = std::mem::take(&mut rest).split_first_chunk_mut::<LANES>() {
        let Some(words) = input.payload.get(cursor..).and_then(<[u8]>::first_chunk::<64>) else { break };
        if !C::NONE {
            contexts.step_contexts(input.first_symbol + done, &mut step_contexts);
            for (offset, &context) in offsets.iter_mut().zip(&step_contexts) {
                *offset = tables.context_offsets[usize::from(context)];
            }
        }
        cursor += coder.full_step(&mut states, &offsets, words, step_out);
        done += LANES;
        rest = tail;
    }
    *progress = TileProgress { states, cursor, done };
}

/// One decoding step of a lane, shared by every path (spec §8.7): the slot's entry,
/// the symbol, and the state before renormalisation.
struct LaneCoder<'a> {
    slots: &'a [u32],
    prob_bits: u32,
}

impl LaneCoder<'_> {
    #[inline(always)]
    #[allow(clippy::cast_possible_truncation)] // the entry's low byte is the symbol
    fn decode(&self, state: u32, offset: u32) -> (u8, u32) {
        let mask = (1u32 << self.prob_bits) - 1;
        // offset + slot < table_count · 2^k, the number of slots: the entry exists.
        let entry = self.slots.get((offset + (state & mask)) as usize).copied().unwrap_or_default();
        let frequency = entry >> ENTRY_FREQUENCY_SHIFT & ENTRY_FREQUENCY_MASK;
        // < frequency · 2^(32 − k) ≤ 2^32: no overflow (spec §8.7).
        let next = frequency * (state >> self.prob_bits) + (entry >> ENTRY_OFFSET_SHIFT);
        (entry as u8, next)
    }

    /// A step of all 32 lanes with at least 64 bytes of words left; returns the bytes
    /// of words it read. Every lane reads the next word whether it needs it or not,
    /// and keeps it only when it does, so the lanes' chains overlap without branches.
    #[inline(always)]
    fn full_step(
        &self,
        states: &mut [u32; LANES],
        offsets: &[u32; LANES],
        words: &[u8; 64],
        out: &mut [u8; LANES],
    ) -> usize {
        let mut used = 0usize;
        for ((state, &offset), symbol) in states.iter_mut().zip(offsets).zip(out.iter_mut()) {
            let (decoded, next) = self.decode(*state, offset);
            *symbol = decoded;
            // used ≤ 62 before the last lane: the masks only drop bounds checks.
            let word = u32::from(u16::from_le_bytes([words[used & 63], words[(used + 1) & 63]]));
            // Whether a lane renormalises is data: a select, not a branch, which
            // would be mispredicted about as often as it is taken.
            let renormalise = next < STATE_LOW;
            let keep = u32::from(renormalise).wrapping_neg();
            *state = (next << 16 | word) & keep | next & !keep;
            used += 2 * usize::from(renormalise);
        }
        used
    }

    /// A step of the first `out.len()` lanes, checking every read against the tile's
    /// end; returns the new cursor.
    fn checked_step(
        &self,
        states: &mut [u32; LANES],
        offsets: &[u32; LANES],
        payload: &[u8],
        mut cursor: usize,
        out: &mut [u8],
        tile: usize,
    ) -> Result<usize> {
        for (lane, ((state, &offset), symbol)) in states.iter_mut().zip(offsets).zip(out.iter_mut()).enumerate() {
            let (decoded, mut next) = self.decode(*state, offset);
            *symbol = decoded;
            if next < STATE_LOW {
                let Some(&[low, high]) = payload.get(cursor..cursor + 2).and_then(|w| w.first_chunk::<2>()) else {
                    return Err(decode_error(tile, format!("lane {lane} needs a word past the end of the tile")));
                };
                next = next << 16 | u32::from(u16::from_le_bytes([low, high]));
                cursor += 2;
            }
            *state = next;
        }
        Ok(cursor)
    }
}

/// The AVX2 kernel: the 32 lanes as four vectors of eight, table entries fetched by
/// gathers, and each vector's renormalisation words spread to the lanes that read
/// them by one permutation.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{ContextSource, TileInput, TileProgress, LANES};
    use std::arch::x86_64::{
        __m128i, __m256i, _mm256_add_epi32, _mm256_and_si256, _mm256_blend_epi32, _mm256_blendv_epi8,
        _mm256_broadcastsi128_si256, _mm256_castsi256_ps, _mm256_castsi256_si128, _mm256_cmpeq_epi32,
        _mm256_cmpeq_epi8, _mm256_cvtepu16_epi32, _mm256_cvtepu8_epi32, _mm256_extracti128_si256,
        _mm256_i32gather_epi32, _mm256_loadu_si256, _mm256_movemask_ps, _mm256_mullo_epi32, _mm256_or_si256,
        _mm256_packus_epi16, _mm256_packus_epi32, _mm256_permute4x64_epi64, _mm256_permutevar8x32_epi32,
        _mm256_set1_epi16, _mm256_set1_epi32, _mm256_set1_epi8, _mm256_setr_epi32, _mm256_setr_epi8,
        _mm256_setzero_si256, _mm256_shuffle_epi8, _mm256_sll_epi32, _mm256_slli_epi16, _mm256_slli_epi32,
        _mm256_sllv_epi32, _mm256_srl_epi32, _mm256_srli_epi16, _mm256_srli_epi32, _mm256_storeu_si256,
        _mm_cvtsi32_si128, _mm_loadl_epi64, _mm_loadu_si128, _mm_srli_si128,
    };

    /// For each set of lanes of a vector that read a word (bit `l` for lane `l`), the
    /// index among the vector's words that lane `l` reads: the number of reading lanes
    /// before it, as the order "in increasing lane order" of §8.7 gives.
    static WORD_OF_LANE: [[i32; 8]; 256] = word_of_lane();

    #[allow(clippy::cast_possible_truncation, clippy::cast_possible_wrap)] // counts below 8
    const fn word_of_lane() -> [[i32; 8]; 256] {
        let mut table = [[0i32; 8]; 256];
        let mut lanes = 0;
        while lanes < 256 {
            let mut lane = 0;
            let mut before = 0;
            while lane < 8 {
                table[lanes][lane] = before;
                before += (lanes >> lane & 1) as i32;
                lane += 1;
            }
            lanes += 1;
        }
        table
    }

    /// [`super::fast_steps`] with vectors: the same steps, symbols, states and cursor.
    ///
    /// # Safety
    /// The CPU must have AVX2 and POPCNT.
    #[target_feature(enable = "avx2,popcnt")]
    #[allow(clippy::cast_possible_wrap, clippy::cast_sign_loss)] // prob_bits ≤ 11 and 8-bit lane masks
    pub(super) unsafe fn fast_steps<C: ContextSource>(
        input: &TileInput<'_>,
        contexts: &C,
        progress: &mut TileProgress,
        out: &mut [u8],
    ) {
        let tables = &input.stream.tables;
        let prob_bits = input.stream.prob_bits;
        let (mut cursor, mut done) = (progress.cursor, progress.done);
        // SAFETY: the loads and stores stay inside the arrays and slices they come
        // from: the states are 4 vectors; a step's 32 symbols go to a 32-byte chunk of
        // `out`; each vector's 8 words are read `used ≤ 48` bytes into a 64-byte
        // window of the payload; a context step is 32 bytes. The gathers read
        // `slots[(state & mask) + offset]`, below `table_count << prob_bits`, the
        // number of slots, since an offset is `table << prob_bits` with table below
        // table_count, and `context_offsets[c]` with c a byte, of 256 entries. Dense
        // keys read the 32 words that `dense_words` returned.
        unsafe {
            let zero = _mm256_setzero_si256();
            let slot_mask = _mm256_set1_epi32((1i32 << prob_bits) - 1);
            let shift = _mm_cvtsi32_si128(prob_bits as i32);
            let frequency_mask = _mm256_set1_epi32(super::ENTRY_FREQUENCY_MASK as i32);
            let low_byte = _mm256_set1_epi32(0xFF);
            let sixteen = _mm256_set1_epi32(16);
            // After two packs, the 4-byte groups hold lanes 0-3, 8-11, 16-19, 24-27,
            // 4-7, 12-15, ...: this puts them back in lane order.
            let symbol_order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
            let slots = tables.slots.as_ptr().cast::<i32>();
            let context_offsets = tables.context_offsets.as_ptr().cast::<i32>();
            let maps = TableMaps::new(&tables.context_offsets, prob_bits);
            let states = progress.states.as_mut_ptr().cast::<__m256i>();
            let mut x = [0, 1, 2, 3].map(|v| _mm256_loadu_si256(states.add(v)));
            let mut offsets = [zero; 4];
            let mut step_contexts = [0u8; LANES];
            let mut rest = &mut out[done..];
            while let Some((step_out, tail)) = std::mem::take(&mut rest).split_first_chunk_mut::<LANES>() {
                let Some(window) = input.payload.get(cursor..).and_then(<[u8]>::first_chunk::<64>) else { break };
                let dense =
                    if C::DENSE_KEY_BYTES == 0 { None } else { contexts.dense_words(input.first_symbol + done) };
                if let Some(words) = dense {
                    // The keys straight from the base words: bytes gathered one by one
                    // and reloaded as a vector would stall on store forwarding.
                    if C::DENSE_KEY_BYTES == 8 {
                        for (v, offset) in offsets.iter_mut().enumerate() {
                            let keys = dense_keys::<C>(words.as_ptr(), v);
                            *offset = _mm256_i32gather_epi32::<4>(context_offsets, keys);
                        }
                    } else {
                        offsets = maps.offsets(dense_key_bytes::<C>(words.as_ptr()), shift);
                    }
                } else if !C::NONE {
                    contexts.step_contexts(input.first_symbol + done, &mut step_contexts);
                    offsets = maps.offsets(_mm256_loadu_si256(step_contexts.as_ptr().cast()), shift);
                }
                let words = window.as_ptr();
                let mut used = 0usize;
                let mut entries = [zero; 4];
                for v in 0..4 {
                    let slot = _mm256_add_epi32(_mm256_and_si256(x[v], slot_mask), offsets[v]);
                    let entry = _mm256_i32gather_epi32::<4>(slots, slot);
                    entries[v] = entry;
                    let frequency = _mm256_and_si256(_mm256_srli_epi32::<8>(entry), frequency_mask);
                    let next = _mm256_add_epi32(
                        _mm256_mullo_epi32(frequency, _mm256_srl_epi32(x[v], shift)),
                        _mm256_srli_epi32::<20>(entry),
                    );
                    // Below 2^16: the top 16 bits are zero (an unsigned compare).
                    let renormalise = _mm256_cmpeq_epi32(_mm256_srli_epi32::<16>(next), zero);
                    let lanes = (_mm256_movemask_ps(_mm256_castsi256_ps(renormalise)) & 0xFF) as usize;
                    let vector_words = _mm256_cvtepu16_epi32(_mm_loadu_si128(words.add(used).cast()));
                    let lane_words = _mm256_permutevar8x32_epi32(
                        vector_words,
                        _mm256_loadu_si256(WORD_OF_LANE[lanes].as_ptr().cast()),
                    );
                    // Lanes that read shift by 16 and take their word; the others keep
                    // their state (a shift by 0 and no word).
                    let shifted = _mm256_sllv_epi32(next, _mm256_and_si256(renormalise, sixteen));
                    x[v] = _mm256_or_si256(shifted, _mm256_and_si256(lane_words, renormalise));
                    used += 2 * lanes.count_ones() as usize;
                }
                let low =
                    _mm256_packus_epi32(_mm256_and_si256(entries[0], low_byte), _mm256_and_si256(entries[1], low_byte));
                let high =
                    _mm256_packus_epi32(_mm256_and_si256(entries[2], low_byte), _mm256_and_si256(entries[3], low_byte));
                let symbols = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(low, high), symbol_order);
                _mm256_storeu_si256(step_out.as_mut_ptr().cast(), symbols);
                cursor += used;
                done += LANES;
                rest = tail;
            }
            for (v, vector) in x.iter().enumerate() {
                _mm256_storeu_si256(states.add(v), *vector);
            }
        }
        progress.cursor = cursor;
        progress.done = done;
    }

    /// The table index of each context byte, bit by bit: bit `b` of the index of
    /// context `c` is bit `c mod 8` of byte `c / 8` of the 256-bit map `b`. Two byte
    /// shuffles read a map for 32 contexts at once, in place of four gathers of
    /// eight offsets from `context_offsets`, which are slow on many x86 cores.
    struct TableMaps {
        /// Each map's bytes 0–15 and 16–31, repeated in both 128-bit halves, since a
        /// shuffle reads within its half.
        maps: [(__m256i, __m256i); 3],
        /// The bits of the largest table index (table_count ≤ 8).
        bits: usize,
    }

    impl TableMaps {
        #[target_feature(enable = "avx2")]
        fn new(context_offsets: &[u32; 256], prob_bits: u32) -> Self {
            let mut bytes = [[0u8; 32]; 3];
            let mut largest = 0;
            for (context, &offset) in context_offsets.iter().enumerate() {
                let table = offset >> prob_bits;
                largest = largest.max(table);
                for (bit, map) in bytes.iter_mut().enumerate() {
                    map[context / 8] |= u8::from(table >> bit & 1 == 1) << (context % 8);
                }
            }
            let half = |b: &[u8]| {
                // SAFETY: `b` is 16 bytes.
                unsafe { _mm256_broadcastsi128_si256(_mm_loadu_si128(b.as_ptr().cast())) }
            };
            Self {
                maps: bytes.map(|map| (half(&map[..16]), half(&map[16..]))),
                bits: (u32::BITS - largest.leading_zeros()) as usize,
            }
        }

        /// The first table slot (`table << prob_bits`) of each of 32 context bytes, as
        /// four vectors of eight, in order.
        #[inline]
        #[target_feature(enable = "avx2")]
        fn offsets(&self, contexts: __m256i, shift: __m128i) -> [__m256i; 4] {
            let byte_of = _mm256_and_si256(_mm256_srli_epi16::<3>(contexts), _mm256_set1_epi8(0x1F));
            // Bit 4 of the byte index moved to bit 7, which selects the map's upper half.
            let upper = _mm256_slli_epi16::<3>(byte_of);
            let bit_values = _mm256_setr_epi8(
                1, 2, 4, 8, 16, 32, 64, -128, 0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 4, 8, 16, 32, 64, -128, 0, 0, 0, 0, 0, 0,
                0, 0,
            );
            let bit_of = _mm256_shuffle_epi8(bit_values, _mm256_and_si256(contexts, _mm256_set1_epi8(7)));
            let mut table = _mm256_setzero_si256();
            for (&(low, high), value) in self.maps.iter().zip([1, 2, 4]).take(self.bits) {
                let byte =
                    _mm256_blendv_epi8(_mm256_shuffle_epi8(low, byte_of), _mm256_shuffle_epi8(high, byte_of), upper);
                let set = _mm256_cmpeq_epi8(_mm256_and_si256(byte, bit_of), bit_of);
                table = _mm256_or_si256(table, _mm256_and_si256(set, _mm256_set1_epi8(value)));
            }
            let low = _mm256_castsi256_si128(table);
            let high = _mm256_extracti128_si256::<1>(table);
            [low, _mm_srli_si128::<8>(low), high, _mm_srli_si128::<8>(high)]
                .map(|bytes| _mm256_sll_epi32(_mm256_cvtepu8_epi32(bytes), shift))
        }
    }

    /// The base keys (§8.6) of the 32 words at `words`, `C::DENSE_KEY_BYTES` wide (1,
    /// 2 or 4), as 32 bytes in order.
    ///
    /// # Safety
    /// The CPU must have AVX2; `words` must hold 32 words.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn dense_key_bytes<C: ContextSource>(words: *const u8) -> __m256i {
        // SAFETY: the loads read the 32 words the caller vouches for.
        unsafe {
            match C::DENSE_KEY_BYTES {
                1 => {
                    // rotl(b, 1) per byte: 16-bit shifts, masked to their own byte.
                    let x = _mm256_loadu_si256(words.cast());
                    _mm256_or_si256(
                        _mm256_and_si256(_mm256_slli_epi16::<1>(x), _mm256_set1_epi8(-2)),
                        _mm256_and_si256(_mm256_srli_epi16::<7>(x), _mm256_set1_epi8(1)),
                    )
                }
                2 => {
                    let low_byte = _mm256_set1_epi16(0xFF);
                    let first = _mm256_and_si256(_mm256_srli_epi16::<7>(_mm256_loadu_si256(words.cast())), low_byte);
                    let second =
                        _mm256_and_si256(_mm256_srli_epi16::<7>(_mm256_loadu_si256(words.add(32).cast())), low_byte);
                    // The pack interleaves the halves' quarters: 0, 2, 1, 3 restores them.
                    _mm256_permute4x64_epi64::<0xD8>(_mm256_packus_epi16(first, second))
                }
                _ => {
                    let keys = [0, 1, 2, 3].map(|v| dense_keys::<C>(words, v));
                    let low = _mm256_packus_epi32(keys[0], keys[1]);
                    let high = _mm256_packus_epi32(keys[2], keys[3]);
                    _mm256_permutevar8x32_epi32(
                        _mm256_packus_epi16(low, high),
                        _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7),
                    )
                }
            }
        }
    }

    /// The base keys (§8.6) of words `8v .. 8v + 8` of the 32 at `words`, each
    /// `C::DENSE_KEY_BYTES` wide: the top byte shifted up by one with the next bit
    /// below it, or for bytes the byte rotated by one.
    ///
    /// # Safety
    /// The CPU must have AVX2; `words` must hold 32 words, and `v` be below 4.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn dense_keys<C: ContextSource>(words: *const u8, v: usize) -> __m256i {
        // SAFETY: each load reads words 8v .. 8v + 8 of the 32 the caller vouches for.
        unsafe {
            let low_byte = _mm256_set1_epi32(0xFF);
            match C::DENSE_KEY_BYTES {
                1 => {
                    let x = _mm256_cvtepu8_epi32(_mm_loadl_epi64(words.add(8 * v).cast()));
                    _mm256_and_si256(_mm256_or_si256(_mm256_slli_epi32::<1>(x), _mm256_srli_epi32::<7>(x)), low_byte)
                }
                2 => {
                    let x = _mm256_cvtepu16_epi32(_mm_loadu_si128(words.add(16 * v).cast()));
                    _mm256_and_si256(_mm256_srli_epi32::<7>(x), low_byte)
                }
                4 => {
                    let x = _mm256_loadu_si256(words.add(32 * v).cast());
                    _mm256_and_si256(_mm256_srli_epi32::<23>(x), low_byte)
                }
                _ => {
                    // The high halves of eight 64-bit words, in order.
                    let odd = _mm256_setr_epi32(1, 3, 5, 7, 1, 3, 5, 7);
                    let first = _mm256_permutevar8x32_epi32(_mm256_loadu_si256(words.add(64 * v).cast()), odd);
                    let second = _mm256_permutevar8x32_epi32(_mm256_loadu_si256(words.add(64 * v + 32).cast()), odd);
                    let high = _mm256_blend_epi32::<0xF0>(first, second);
                    _mm256_and_si256(_mm256_srli_epi32::<23>(high), low_byte)
                }
            }
        }
    }
}

/// The AVX-512 kernel: the 32 lanes as two vectors of sixteen. A mask compare picks
/// the lanes that renormalise and an expand hands them their words in lane order,
/// where AVX2 needs a table of permutations; a byte permute looks up 64 contexts'
/// tables at once.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{ContextSource, TileInput, TileProgress, LANES};
    use std::arch::x86_64::{
        __m128i, __m256i, __m512i, _mm256_loadu_si256, _mm256_set_m128i, _mm512_add_epi32, _mm512_and_si512,
        _mm512_castsi256_si512, _mm512_castsi512_si128, _mm512_cmplt_epu32_mask, _mm512_cvtepi16_epi8,
        _mm512_cvtepi32_epi8, _mm512_cvtepi64_epi8, _mm512_cvtepu16_epi32, _mm512_cvtepu8_epi32,
        _mm512_extracti32x4_epi32, _mm512_i32gather_epi32, _mm512_loadu_si512, _mm512_mask_blend_epi8,
        _mm512_mask_mov_epi32, _mm512_maskz_expand_epi32, _mm512_movepi8_mask, _mm512_mullo_epi32, _mm512_or_si512,
        _mm512_permutex2var_epi8, _mm512_set1_epi32, _mm512_sll_epi32, _mm512_slli_epi32, _mm512_srl_epi32,
        _mm512_srli_epi16, _mm512_srli_epi32, _mm512_srli_epi64, _mm512_storeu_si512, _mm_cvtsi32_si128,
        _mm_storeu_si128, _mm_unpacklo_epi64,
    };

    /// [`super::fast_steps`] with vectors: the same steps, symbols, states and cursor.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F, BW, VL and VBMI, AVX2 and POPCNT.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx2,popcnt")]
    pub(super) unsafe fn fast_steps<C: ContextSource>(
        input: &TileInput<'_>,
        contexts: &C,
        progress: &mut TileProgress,
        out: &mut [u8],
    ) {
        // SAFETY: the caller vouches for the CPU.
        unsafe { steps_side_by_side([input], contexts, [progress], [out]) }
    }

    /// [`fast_steps`] of two tiles of one stream, a step of each in turn while both
    /// have one: a step is a chain of dependent operations (gather, multiply,
    /// compare, expand), and the second tile's chains fill the first's waits.
    ///
    /// # Safety
    /// As [`fast_steps`].
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx2,popcnt")]
    pub(super) unsafe fn fast_steps_of_two<C: ContextSource>(
        inputs: [&TileInput<'_>; 2],
        contexts: &C,
        progress: [&mut TileProgress; 2],
        outs: [&mut [u8]; 2],
    ) {
        // SAFETY: the caller vouches for the CPU.
        unsafe { steps_side_by_side(inputs, contexts, progress, outs) }
    }

    /// Full steps of `T` tiles of one stream while every one of them has a step
    /// and the 64 bytes of words after its cursor.
    ///
    /// # Safety
    /// As [`fast_steps`].
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vbmi,avx2,popcnt")]
    #[allow(clippy::cast_possible_wrap)] // prob_bits ≤ 11
    unsafe fn steps_side_by_side<C: ContextSource, const T: usize>(
        inputs: [&TileInput<'_>; T],
        contexts: &C,
        progress: [&mut TileProgress; T],
        outs: [&mut [u8]; T],
    ) {
        let stream = inputs[0].stream;
        let prob_bits = stream.prob_bits;
        let mut cursor = progress.each_ref().map(|p| p.cursor);
        let mut done = progress.each_ref().map(|p| p.done);
        // SAFETY: the loads and stores stay inside the arrays and slices they come
        // from: a tile's states are 2 vectors; a step's 32 symbols go to
        // `out[done..done + 32]`, inside `out` by the loop's condition; each vector's
        // 16 words are read `used ≤ 32` bytes into a 64-byte window of the payload; a
        // context step is 32 bytes, and dense keys read the 32 words that
        // `dense_words` returned. The gathers read `slots[(state & mask) + offset]`,
        // below `table_count << prob_bits`, the number of slots, since an offset is
        // `table << prob_bits` with table below table_count.
        unsafe {
            let slot_mask = _mm512_set1_epi32((1i32 << prob_bits) - 1);
            let shift = _mm_cvtsi32_si128(prob_bits as i32);
            let frequency_mask = _mm512_set1_epi32(super::ENTRY_FREQUENCY_MASK as i32);
            let state_low = _mm512_set1_epi32(super::STATE_LOW as i32);
            let slots = stream.tables.slots.as_ptr().cast::<i32>();
            let table_of = TableOf::new(&stream.tables.context_offsets, prob_bits);
            let mut x = progress.each_ref().map(|p| {
                let states = p.states.as_ptr().cast::<__m512i>();
                [_mm512_loadu_si512(states), _mm512_loadu_si512(states.add(1))]
            });
            let mut offsets = [_mm512_set1_epi32(0); 2];
            let mut step_contexts = [0u8; LANES];
            'steps: loop {
                let mut windows = [std::ptr::null::<u8>(); T];
                for t in 0..T {
                    if outs[t].len() - done[t] < LANES {
                        break 'steps;
                    }
                    let Some(window) = inputs[t].payload.get(cursor[t]..).and_then(<[u8]>::first_chunk::<64>) else {
                        break 'steps;
                    };
                    windows[t] = window.as_ptr();
                }
                for t in 0..T {
                    let first = inputs[t].first_symbol + done[t];
                    let dense = if C::DENSE_KEY_BYTES == 0 { None } else { contexts.dense_words(first) };
                    if let Some(words) = dense {
                        offsets = table_of.offsets(dense_key_bytes::<C>(words.as_ptr()), shift);
                    } else if !C::NONE {
                        contexts.step_contexts(first, &mut step_contexts);
                        offsets = table_of.offsets(_mm256_loadu_si256(step_contexts.as_ptr().cast()), shift);
                    }
                    let step_out = outs[t].as_mut_ptr().add(done[t]);
                    let mut used = 0usize;
                    for (v, state) in x[t].iter_mut().enumerate() {
                        let slot = _mm512_add_epi32(_mm512_and_si512(*state, slot_mask), offsets[v]);
                        let entry = _mm512_i32gather_epi32::<4>(slot, slots);
                        _mm_storeu_si128(step_out.add(16 * v).cast(), _mm512_cvtepi32_epi8(entry));
                        let frequency = _mm512_and_si512(_mm512_srli_epi32::<8>(entry), frequency_mask);
                        let next = _mm512_add_epi32(
                            _mm512_mullo_epi32(frequency, _mm512_srl_epi32(*state, shift)),
                            _mm512_srli_epi32::<20>(entry),
                        );
                        let renormalise = _mm512_cmplt_epu32_mask(next, state_low);
                        let vector_words = _mm512_cvtepu16_epi32(_mm256_loadu_si256(windows[t].add(used).cast()));
                        // The k-th lane that reads takes the k-th word: §8.7's lane order.
                        let lane_words = _mm512_maskz_expand_epi32(renormalise, vector_words);
                        *state = _mm512_mask_mov_epi32(
                            next,
                            renormalise,
                            _mm512_or_si512(_mm512_slli_epi32::<16>(next), lane_words),
                        );
                        used += 2 * renormalise.count_ones() as usize;
                    }
                    cursor[t] += used;
                    done[t] += LANES;
                }
            }
            for (t, p) in progress.into_iter().enumerate() {
                let states = p.states.as_mut_ptr().cast::<__m512i>();
                _mm512_storeu_si512(states, x[t][0]);
                _mm512_storeu_si512(states.add(1), x[t][1]);
                p.cursor = cursor[t];
                p.done = done[t];
            }
        }
    }

    /// The table index of every context byte, as four vectors of 64, for byte
    /// permutes that look up 64 contexts at once.
    struct TableOf([__m512i; 4]);

    impl TableOf {
        #[target_feature(enable = "avx512f")]
        #[allow(clippy::cast_possible_truncation)] // table indices below 8
        fn new(context_offsets: &[u32; 256], prob_bits: u32) -> Self {
            let indices: [u8; 256] = std::array::from_fn(|c| (context_offsets[c] >> prob_bits) as u8);
            // SAFETY: each load reads 64 of the 256 bytes.
            Self(std::array::from_fn(|q| unsafe { _mm512_loadu_si512(indices.as_ptr().add(64 * q).cast()) }))
        }

        /// The first table slot (`table << prob_bits`) of each of the 32 context bytes
        /// in `contexts`, as two vectors of sixteen, in order.
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
        fn offsets(&self, contexts: __m256i, shift: __m128i) -> [__m512i; 2] {
            let contexts = _mm512_castsi256_si512(contexts);
            // Bit 6 of a context picks between a pair's halves, bit 7 between pairs.
            let low = _mm512_permutex2var_epi8(self.0[0], contexts, self.0[1]);
            let high = _mm512_permutex2var_epi8(self.0[2], contexts, self.0[3]);
            let tables = _mm512_mask_blend_epi8(_mm512_movepi8_mask(contexts), low, high);
            [_mm512_castsi512_si128(tables), _mm512_extracti32x4_epi32::<1>(tables)]
                .map(|bytes| _mm512_sll_epi32(_mm512_cvtepu8_epi32(bytes), shift))
        }
    }

    /// The base keys (§8.6) of the 32 words at `words`, `C::DENSE_KEY_BYTES` wide, as
    /// 32 bytes in order: the top byte shifted up by one with the next bit below it,
    /// or for bytes the byte rotated by one.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F and BW and AVX2; `words` must hold 32 words.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx2")]
    unsafe fn dense_key_bytes<C: ContextSource>(words: *const u8) -> __m256i {
        // SAFETY: the loads read the 32 words the caller vouches for.
        unsafe {
            let load = |at: usize| _mm512_loadu_si512(words.add(64 * at).cast());
            match C::DENSE_KEY_BYTES {
                1 => super::avx2::dense_key_bytes::<C>(words),
                2 => _mm512_cvtepi16_epi8(_mm512_srli_epi16::<7>(load(0))),
                4 => {
                    let [low, high] = [0, 1].map(|at| _mm512_cvtepi32_epi8(_mm512_srli_epi32::<23>(load(at))));
                    _mm256_set_m128i(high, low)
                }
                _ => {
                    let keys = [0, 1, 2, 3].map(|at| _mm512_cvtepi64_epi8(_mm512_srli_epi64::<55>(load(at))));
                    _mm256_set_m128i(_mm_unpacklo_epi64(keys[2], keys[3]), _mm_unpacklo_epi64(keys[0], keys[1]))
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------
// Encoder
// ---------------------------------------------------------------------------------

/// The key of base word `index` of a width known only at run time, for the encoder:
/// 0 past the end of `base` (or for a width of 0).
fn key_at_width(base: &[u8], word_bytes: usize, index: usize) -> u8 {
    match word_bytes {
        1 => key_at::<1>(base, index),
        2 => key_at::<2>(base, index),
        4 => key_at::<4>(base, index),
        8 => key_at::<8>(base, index),
        width => index
            .checked_mul(width)
            .and_then(|start| base.get(start..start.checked_add(width)?))
            .and_then(|word| Some(word.last()? << 1 | word.len().checked_sub(2).map_or(0, |at| word[at] >> 7)))
            .unwrap_or(0),
    }
}

/// The context byte of every symbol, or `None` for context none. The encoder reads a
/// plane byte or position that the contexts lack as context 0 (see [`encode`]).
fn context_bytes<'a>(len: usize, contexts: &Contexts<'a>) -> Option<Cow<'a, [u8]>> {
    match *contexts {
        Contexts::None => None,
        Contexts::HigherPlane(plane) if plane.len() >= len => Some(Cow::Borrowed(&plane[..len])),
        Contexts::HigherPlane(plane) => {
            let mut bytes = plane.to_vec();
            bytes.resize(len, 0);
            Some(Cow::Owned(bytes))
        }
        Contexts::BaseKeys { base, word_bytes, positions } => Some(Cow::Owned(match word_bytes {
            1 => base_keys::<1>(base, len, positions),
            2 => base_keys::<2>(base, len, positions),
            4 => base_keys::<4>(base, len, positions),
            8 => base_keys::<8>(base, len, positions),
            width => (0..len)
                .map(|i| match positions {
                    None => key_at_width(base, width, i),
                    Some(positions) => positions.get(i).map_or(0, |&p| key_at_width(base, width, p as usize)),
                })
                .collect(),
        })),
    }
}

/// The base keys of `len` values for words of `WB` bytes.
fn base_keys<const WB: usize>(base: &[u8], len: usize, positions: Option<&[u32]>) -> Vec<u8> {
    match positions {
        None => {
            let mut keys: Vec<u8> = base.chunks_exact(WB).take(len).map(key_of_word::<WB>).collect();
            keys.resize(len, 0);
            keys
        }
        Some(positions) => (0..len).map(|i| positions.get(i).map_or(0, |&p| key_at::<WB>(base, p as usize))).collect(),
    }
}

/// A symbol histogram.
pub(crate) type Histogram = [u64; 256];

pub(crate) fn histogram(symbols: &[u8]) -> Histogram {
    // Four partial counts, so that runs of one symbol do not chain every increment
    // through one counter in memory.
    let mut partial = [[0u64; 256]; 4];
    let mut quads = symbols.chunks_exact(4);
    for quad in &mut quads {
        for (counts, &symbol) in partial.iter_mut().zip(quad) {
            counts[usize::from(symbol)] += 1;
        }
    }
    for &symbol in quads.remainder() {
        partial[0][usize::from(symbol)] += 1;
    }
    let mut counts = [0u64; 256];
    for (s, count) in counts.iter_mut().enumerate() {
        *count = partial.iter().map(|p| p[s]).sum();
    }
    counts
}

/// One histogram per context byte; only the bytes that occur hold one.
struct ContextRows {
    /// Each context byte's place in `rows`, or [`ABSENT_ROW`].
    slot: [u16; 256],
    rows: Vec<Histogram>,
}

const ABSENT_ROW: u16 = u16::MAX;
static EMPTY_ROW: Histogram = [0; 256];

impl std::ops::Index<usize> for ContextRows {
    type Output = Histogram;

    /// The histogram of context byte `context`: empty where it does not occur.
    fn index(&self, context: usize) -> &Histogram {
        match self.slot[context] {
            ABSENT_ROW => &EMPTY_ROW,
            slot => &self.rows[usize::from(slot)],
        }
    }
}

impl ContextRows {
    /// The histograms of the context bytes that occur.
    fn present(&self) -> &[Histogram] {
        &self.rows
    }

    /// The histogram under no context: the sum of the rows.
    fn whole(&self) -> Histogram {
        self.rows.iter().fold([0; 256], |mut sum, row| {
            add_into(&mut sum, row);
            sum
        })
    }
}

/// Streams shorter than this are counted straight into the rows of the contexts
/// that occur, without a table of every pair to clear and convert.
const DIRECT_COUNT_BELOW: usize = 1 << 14;

/// One histogram per context byte.
#[allow(clippy::cast_possible_truncation)] // at most 256 rows
fn context_histograms(symbols: &[u8], contexts: &[u8]) -> ContextRows {
    let symbols = &symbols[..symbols.len().min(contexts.len())];
    let mut slot = [ABSENT_ROW; 256];
    let mut rows: Vec<Histogram> = Vec::new();
    if symbols.len() < DIRECT_COUNT_BELOW {
        for (&symbol, &context) in symbols.iter().zip(contexts) {
            let at = &mut slot[usize::from(context)];
            if *at == ABSENT_ROW {
                *at = rows.len() as u16;
                rows.push([0; 256]);
            }
            rows[usize::from(*at)][usize::from(symbol)] += 1;
        }
        return ContextRows { slot, rows };
    }
    // Counted in 32 bits (a stream holds fewer than 2^32 symbols), so that the table
    // of every (context, symbol) pair stays within the second-level cache. Two
    // tables, for symbols at even and odd places, so that runs of one pair do not
    // chain every increment through one counter in memory. The thread's table is
    // taken, and given back zeroed: a panic on the way drops it.
    let mut pairs = PAIR_COUNTS.with(std::cell::RefCell::take);
    if pairs.len() != 2 * 256 * 256 {
        pairs = vec![0u32; 2 * 256 * 256];
    }
    let (even, odd) = pairs.split_at_mut(256 * 256);
    let even: &mut [u32; 256 * 256] = even.try_into().expect("256 rows of 256");
    let odd: &mut [u32; 256 * 256] = odd.try_into().expect("256 rows of 256");
    // A u16 index: no bounds check.
    let at = |context: u8, symbol: u8| usize::from(u16::from(context) << 8 | u16::from(symbol));
    #[cfg(target_arch = "x86_64")]
    let counted = {
        let mut pairs = [0u16; 16];
        let steps = symbols.chunks_exact(16).zip(contexts.chunks_exact(16));
        for (s, c) in steps {
            pair_indices(s.try_into().expect("16 symbols"), c.try_into().expect("16 contexts"), &mut pairs);
            for pair in pairs.chunks_exact(2) {
                even[usize::from(pair[0])] += 1;
                odd[usize::from(pair[1])] += 1;
            }
        }
        symbols.len() / 16 * 16
    };
    #[cfg(not(target_arch = "x86_64"))]
    let counted = 0;
    let (symbols, contexts) = (&symbols[counted..], &contexts[counted..]);
    for (s, c) in symbols.chunks_exact(2).zip(contexts.chunks_exact(2)) {
        even[at(c[0], s[0])] += 1;
        odd[at(c[1], s[1])] += 1;
    }
    if symbols.len() % 2 == 1 {
        let last = symbols.len() - 1;
        even[at(contexts[last], symbols[last])] += 1;
    }
    for (context, (e, o)) in even.chunks_exact_mut(256).zip(odd.chunks_exact_mut(256)).enumerate() {
        // An OR of the whole row, which vectorizes, rather than a search that
        // stops early: most rows are empty, and the search visited them a word at a time.
        if e.iter().zip(o.iter()).fold(0, |any, (&e, &o)| any | e | o) != 0 {
            slot[context] = rows.len() as u16;
            rows.push(std::array::from_fn(|s| u64::from(e[s]) + u64::from(o[s])));
            e.fill(0);
            o.fill(0);
        }
    }
    PAIR_COUNTS.with(|cell| cell.replace(pairs));
    ContextRows { slot, rows }
}

/// The (context, symbol) pairs of 16 symbols as `context << 8 | symbol`, by two
/// byte interleaves (SSE2, which every x86-64 CPU has): the counting loop then
/// loads one index per symbol rather than two bytes and a shift, which counts a
/// fifth faster.
#[cfg(target_arch = "x86_64")]
fn pair_indices(symbols: &[u8; 16], contexts: &[u8; 16], pairs: &mut [u16; 16]) {
    use std::arch::x86_64::{_mm_loadu_si128, _mm_storeu_si128, _mm_unpackhi_epi8, _mm_unpacklo_epi8};
    // SAFETY: each load reads 16 bytes of a 16-byte array, and each store writes 8
    // of the 16 pairs; SSE2 is part of x86-64.
    unsafe {
        let symbols = _mm_loadu_si128(symbols.as_ptr().cast());
        let contexts = _mm_loadu_si128(contexts.as_ptr().cast());
        // Little-endian: the symbol is the low byte of each pair, the context the high.
        _mm_storeu_si128(pairs.as_mut_ptr().cast(), _mm_unpacklo_epi8(symbols, contexts));
        _mm_storeu_si128(pairs.as_mut_ptr().add(8).cast(), _mm_unpackhi_epi8(symbols, contexts));
    }
}

thread_local! {
    /// Each thread's table of [`context_histograms`], all zero between calls: one
    /// 512 KiB table rather than one allocated, zeroed and faulted in for each
    /// stream and context tried.
    static PAIR_COUNTS: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The order-0 entropy of `symbols` under each of their context bytes, summed, in
/// bits: what tables that followed every context byte would take at least.
pub(crate) fn entropy_under(symbols: &[u8], contexts: &[u8]) -> f64 {
    context_histograms(symbols, contexts).present().iter().map(entropy_bits).sum()
}

/// [`entropy_under`] and the order-0 entropy of the same symbols under no context,
/// from one count: the histogram under no context is the sum of the rows.
pub(crate) fn entropy_under_and_alone(symbols: &[u8], contexts: &[u8]) -> (f64, f64) {
    let rows = context_histograms(symbols, contexts);
    (rows.present().iter().map(entropy_bits).sum(), entropy_bits(&rows.whole()))
}

/// Order-0 code length of a histogram under its own distribution, in bits.
#[allow(clippy::cast_precision_loss)] // an estimate
pub(crate) fn entropy_bits(counts: &Histogram) -> f64 {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return 0.0;
    }
    let total = total as f64;
    // Small counts recur within a histogram (the rows of a context with many
    // bytes): each one's logarithm is taken once, the same number as every time.
    let mut small_lengths = [f64::NAN; 64];
    let length = |c: u64| (total / c as f64).log2();
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let bits = match usize::try_from(c).ok().and_then(|c| small_lengths.get_mut(c)) {
                Some(cached) if cached.is_nan() => {
                    *cached = length(c);
                    *cached
                }
                Some(cached) => *cached,
                None => length(c),
            };
            c as f64 * bits
        })
        .sum()
}

/// Bits of the optimal prefix (Huffman) code of a histogram under its own
/// distribution, without its table: what zstd's literal coder spends at least on
/// these symbols when it finds no matches among them. A symbol alone costs nothing,
/// as zstd stores a run of one byte as that byte. Computed here because neither
/// zstd nor a well-kept crate exposes a code's length without coding the data.
pub(crate) fn prefix_code_bits(counts: &Histogram) -> u64 {
    let mut leaves = [0u64; 256];
    let mut present = 0;
    for &count in counts.iter().filter(|&&c| c > 0) {
        leaves[present] = count;
        present += 1;
    }
    let leaves = &mut leaves[..present];
    leaves.sort_unstable();
    // Two queues: the sorted leaves and the merged nodes, which are made in
    // ascending order, so the two smallest weights are always at their fronts. The
    // code's length is the sum of the weights of every merged node.
    let mut merged = [0u64; 256];
    let (mut next_leaf, mut next_merged, mut merged_len, mut bits) = (0, 0, 0, 0);
    for _ in 1..present {
        let mut smallest = || {
            if next_leaf < leaves.len() && (next_merged == merged_len || leaves[next_leaf] <= merged[next_merged]) {
                next_leaf += 1;
                leaves[next_leaf - 1]
            } else {
                next_merged += 1;
                merged[next_merged - 1]
            }
        };
        let weight = smallest() + smallest();
        merged[merged_len] = weight;
        merged_len += 1;
        bits += weight;
    }
    bits
}

/// Bytes of a table (Table 8.7 or 8.8) of these frequencies, 0 for an absent symbol.
fn table_len(form: TableForm, frequencies: &[u32; 256]) -> usize {
    let present = frequencies.iter().filter(|&&f| f > 0).count();
    match form {
        TableForm::Bytes => {
            let two_byte = frequencies.iter().filter(|&&f| f >= TWO_BYTE_FREQUENCY).count();
            1 + symbol_set_len(form, present) + present + two_byte
        }
        TableForm::Packed => {
            let values = code_values(frequencies);
            2 + symbol_set_len(form, present) + best_order(&values).1.div_ceil(8)
        }
    }
}

/// Bytes that list a table's `present` symbols.
fn symbol_set_len(form: TableForm, present: usize) -> usize {
    match present {
        256 if form == TableForm::Packed => 0,
        n if n < BITMAP_MIN_SYMBOLS => n,
        _ => 32,
    }
}

/// Bytes of a context map of `table_count` tables; none for one table.
fn context_map_len(form: TableForm, table_count: usize) -> usize {
    match (table_count, form) {
        (0 | 1, _) => 0,
        (_, TableForm::Bytes) => CONTEXT_MAP_LEN,
        (_, TableForm::Packed) => 32 * packed_map_bits(table_count) as usize,
    }
}

/// The code values `zigzag(f_i − f_(i−1))` of a packed table's present symbols.
fn code_values(frequencies: &[u32; 256]) -> Vec<u32> {
    let mut previous = 0i64;
    let present = frequencies.iter().filter(|&&f| f > 0);
    present
        .map(|&f| {
            let value = zigzag(i64::from(f) - previous);
            previous = i64::from(f);
            value
        })
        .collect()
}

/// The prefix length `n` of code value `value` under Exp-Golomb order `order`: its
/// suffix takes `n + order` bits.
fn exp_golomb_prefix(value: u32, order: u32) -> u32 {
    (value + (1 << order)).ilog2() - order
}

/// Bits of the Exp-Golomb codes of `values` of order `order`.
///
/// A value takes `2n + 1 + order` bits with `n = log2(value + 2^order) − order`, so
/// the sum is `2·Σ log2(value + 2^order) + count − count·order`. The logarithms are
/// taken with `leading_zeros`, which has no case to check, so that the sum
/// vectorises: the writer weighs every order of every table it considers.
fn exp_golomb_bits(values: &[u32], order: u32) -> usize {
    let logs: u32 = values.iter().map(|&v| u32::BITS - 1 - (v + (1 << order)).leading_zeros()).sum();
    2 * logs as usize + values.len() - values.len() * order as usize
}

/// The Exp-Golomb order that codes `values` in the fewest bits, the smallest of
/// equals, and those bits.
///
/// Orders above the bit length `b` of the largest value are not weighed: there
/// every value is below `2^order`, so each takes `order + 1` bits, which grows with
/// the order from `b` on. A flat table's small differences then weigh a few orders
/// rather than twelve.
fn best_order(values: &[u32]) -> (u32, usize) {
    let largest = values.iter().copied().max().unwrap_or(0);
    let orders = u32::from(MAX_ORDER).min(u32::BITS - largest.leading_zeros());
    (0..=orders).map(|order| (order, exp_golomb_bits(values, order))).min_by_key(|&(_, bits)| bits).unwrap_or((0, 0))
}

/// An estimate of a cluster's cost in bits before quantization: its code length
/// plus its table, with frequencies taken at the largest `prob_bits`.
#[allow(clippy::cast_precision_loss)] // an estimate
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // rounded shares of 2^11
fn cluster_cost_bits(form: TableForm, counts: &Histogram) -> f64 {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return 0.0;
    }
    let slots = f64::from(1u32 << MAX_PROB_BITS);
    let mut frequencies = [0u32; 256];
    for (frequency, &count) in frequencies.iter_mut().zip(counts) {
        if count > 0 {
            *frequency = ((count as f64 * slots / total as f64).round() as u32).clamp(1, 1 << MAX_PROB_BITS);
        }
    }
    entropy_bits(counts) + 8.0 * table_len(form, &frequencies) as f64
}

fn add_into(sum: &mut Histogram, counts: &Histogram) {
    for (s, &c) in sum.iter_mut().zip(counts) {
        *s += c;
    }
}

/// Per cluster index, the sum of the histograms of the contexts assigned to it.
fn cluster_histograms(rows: &ContextRows, present: &[u8], assignment: &[u8; 256]) -> Vec<Histogram> {
    let mut clusters = vec![[0u64; 256]; MAX_TABLES];
    for &context in present {
        add_into(&mut clusters[usize::from(assignment[usize::from(context)])], &rows[usize::from(context)]);
    }
    clusters
}

/// Each cluster's histogram and its estimated cost ([`cluster_cost_bits`]).
struct Clusters {
    counts: Vec<Histogram>,
    costs: [f64; MAX_TABLES],
}

impl Clusters {
    fn of(form: TableForm, rows: &ContextRows, present: &[u8], assignment: &[u8; 256]) -> Self {
        let counts = cluster_histograms(rows, present, assignment);
        let costs = std::array::from_fn(|cluster| cluster_cost_bits(form, &counts[cluster]));
        Self { counts, costs }
    }

    /// The clusters of `assignment`, each cost taken from `self` where the cluster
    /// is the same: a round of refinement moves few contexts, and leaves most
    /// clusters as they were.
    fn reassigned(&self, form: TableForm, rows: &ContextRows, present: &[u8], assignment: &[u8; 256]) -> Self {
        let counts = cluster_histograms(rows, present, assignment);
        let costs = std::array::from_fn(|cluster| {
            if counts[cluster] == self.counts[cluster] {
                self.costs[cluster]
            } else {
                cluster_cost_bits(form, &counts[cluster])
            }
        });
        Self { counts, costs }
    }

    /// The sum of the costs, in cluster order.
    fn total_cost_bits(&self) -> f64 {
        self.costs.iter().sum()
    }
}

/// Code length, in bits, charged for a symbol that a cluster's table lacks when
/// deciding where a context goes: adding it costs a slot and a table entry.
const MISSING_SYMBOL_BITS: f64 = 16.0;

/// Moves each context to the cluster whose distribution codes it shortest, and
/// recomputes the clusters, while that lowers the total estimated cost (k-means on
/// code length, started from `assignment`).
#[allow(clippy::cast_precision_loss)] // an estimate
#[allow(clippy::cast_possible_truncation)] // cluster indices are below 8
fn refine_clusters(
    form: TableForm,
    rows: &ContextRows,
    present: &[u8],
    assignment: &mut [u8; 256],
    clusters: &mut Clusters,
) {
    const ROUNDS: usize = 8;
    // Each context's nonzero counts, so that a round costs what the data holds.
    let sparse: Vec<Vec<(u8, f64)>> = present
        .iter()
        .map(|&context| {
            let row = &rows[usize::from(context)];
            (0..=255u8).filter(|&s| row[usize::from(s)] > 0).map(|s| (s, row[usize::from(s)] as f64)).collect()
        })
        .collect();
    let mut best_cost = clusters.total_cost_bits();
    for _ in 0..ROUNDS {
        // Per symbol, its code length in each cluster, so that a context's costs in
        // all the clusters are one vector product per symbol it holds. Each cost is
        // still summed symbol by symbol, the same number as one cluster at a time.
        let mut lengths = [[MISSING_SYMBOL_BITS; MAX_TABLES]; 256];
        let mut used = [false; MAX_TABLES];
        for (cluster, counts) in clusters.counts.iter().enumerate() {
            let total: u64 = counts.iter().sum();
            used[cluster] = total > 0;
            for (length, &c) in lengths.iter_mut().zip(counts) {
                if c > 0 {
                    length[cluster] = (total as f64 / c as f64).log2();
                }
            }
        }
        let mut next = *assignment;
        for (&context, counts) in present.iter().zip(&sparse) {
            let mut bits = [0.0f64; MAX_TABLES];
            for &(s, c) in counts {
                for (bits, &length) in bits.iter_mut().zip(&lengths[usize::from(s)]) {
                    *bits += c * length;
                }
            }
            let best = (0..MAX_TABLES).filter(|&cluster| used[cluster]).min_by(|&a, &b| bits[a].total_cmp(&bits[b]));
            if let Some(cluster) = best {
                next[usize::from(context)] = cluster as u8;
            }
        }
        if next == *assignment {
            break;
        }
        let next_clusters = clusters.reassigned(form, rows, present, &next);
        let cost = next_clusters.total_cost_bits();
        if cost >= best_cost {
            break;
        }
        best_cost = cost;
        *assignment = next;
        *clusters = next_clusters;
    }
}

/// Merges pairs of clusters while a merge lowers the estimated cost (a table's bytes
/// against the bits that separate statistics save), keeping at least two, and
/// returns the clusters' histograms as merged.
///
/// Each pair's change in cost is computed once, and again only for the pairs of a
/// cluster that a merge changed: the costs are the same numbers, so the merges are
/// those of computing every pair anew each round, at a fraction of the work.
#[allow(clippy::cast_possible_truncation)] // cluster indices are below 8
fn merge_clusters(form: TableForm, present: &[u8], assignment: &mut [u8; 256], clusters: Clusters) -> Vec<Histogram> {
    let Clusters { counts: mut clusters, mut costs } = clusters;
    let mut used: Vec<usize> = (0..MAX_TABLES).filter(|&c| clusters[c].iter().any(|&n| n > 0)).collect();
    let merge_change = |clusters: &[Histogram], costs: &[f64; MAX_TABLES], a: usize, b: usize| {
        let mut merged = clusters[a];
        add_into(&mut merged, &clusters[b]);
        cluster_cost_bits(form, &merged) - costs[a] - costs[b]
    };
    // change[a][b], a < b: what merging b into a changes.
    let mut change = [[f64::INFINITY; MAX_TABLES]; MAX_TABLES];
    for (i, &a) in used.iter().enumerate() {
        for &b in &used[i + 1..] {
            change[a][b] = merge_change(&clusters, &costs, a, b);
        }
    }
    while used.len() > 2 {
        let mut best: Option<(f64, usize, usize)> = None;
        for (i, &a) in used.iter().enumerate() {
            for &b in &used[i + 1..] {
                if best.is_none_or(|(lowest, _, _)| change[a][b] < lowest) {
                    best = Some((change[a][b], a, b));
                }
            }
        }
        let Some((_, a, b)) = best.filter(|(lowest, _, _)| *lowest < 0.0) else { break };
        for &context in present {
            if usize::from(assignment[usize::from(context)]) == b {
                assignment[usize::from(context)] = a as u8;
            }
        }
        let absorbed = std::mem::replace(&mut clusters[b], [0; 256]);
        add_into(&mut clusters[a], &absorbed);
        used.retain(|&c| c != b);
        costs[a] = cluster_cost_bits(form, &clusters[a]);
        for &other in &used {
            if other != a {
                let (x, y) = (other.min(a), other.max(a));
                change[x][y] = merge_change(&clusters, &costs, x, y);
            }
        }
    }
    clusters
}

/// Groups the 256 context bytes into 2 to 8 tables: the map from context byte to
/// table, and each table's histogram. The seven most frequent contexts start with a
/// table each and the rest share the eighth; contexts then move to the table that
/// codes them shortest, and tables merge where a table costs more than it saves.
#[allow(clippy::cast_possible_truncation)] // cluster indices are below 8
fn cluster_contexts(form: TableForm, rows: &ContextRows) -> ([u8; 256], Vec<Histogram>) {
    let totals: Vec<u64> = (0..256).map(|context| rows[context].iter().sum()).collect();
    let mut present: Vec<u8> = (0..=255u8).filter(|&c| totals[usize::from(c)] > 0).collect();
    // Most frequent first; ties by context byte, so the result is deterministic.
    present.sort_by_key(|&c| std::cmp::Reverse(totals[usize::from(c)]));
    let mut assignment = [0u8; 256];
    for (rank, &context) in present.iter().enumerate() {
        assignment[usize::from(context)] = rank.min(MAX_TABLES - 1) as u8;
    }
    let mut clusters = Clusters::of(form, rows, &present, &assignment);
    if present.len() > MAX_TABLES {
        refine_clusters(form, rows, &present, &mut assignment, &mut clusters);
    }
    // The histograms of the tables as merged, each the sum of its contexts' rows.
    let clusters = merge_clusters(form, &present, &mut assignment, clusters);
    // Number the tables that are used 0, 1, ... in order of first use by context byte.
    let mut renumber = [u8::MAX; MAX_TABLES];
    let mut tables: Vec<Histogram> = Vec::new();
    let mut context_map = [0u8; 256];
    for context in 0..256 {
        if totals[context] == 0 {
            continue;
        }
        let cluster = usize::from(assignment[context]);
        if renumber[cluster] == u8::MAX {
            renumber[cluster] = tables.len() as u8;
            tables.push(clusters[cluster]);
        }
        context_map[context] = renumber[cluster];
    }
    // A context stream has at least two tables (§8.7); an unused one is trivial.
    while tables.len() < 2 {
        tables.push([0; 256]);
    }
    (context_map, tables)
}

/// Frequencies summing to `2^prob_bits`, at least 1 for every symbol that occurs,
/// that minimise the code length `Σ count · log2(2^k / freq)`; `None` when more
/// symbols occur than there are slots. An empty histogram gives the one-symbol
/// table of symbol 0.
///
/// The cost is a sum of convex functions of each frequency, so a set of frequencies
/// that no single move of one slot between two symbols improves is optimal: start
/// from proportional rounding, fix the sum greedily, then move slots while a move
/// gains.
#[allow(clippy::cast_precision_loss)] // an estimate
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // rounded shares of 2^11
fn quantize(counts: &Histogram, prob_bits: u32) -> Option<[u32; 256]> {
    let slots = 1u32 << prob_bits;
    let present: Vec<usize> = (0..256).filter(|&s| counts[s] > 0).collect();
    let mut frequencies = [0u32; 256];
    match present.len() {
        0 => {
            frequencies[0] = slots;
            return Some(frequencies);
        }
        1 => {
            frequencies[present[0]] = slots;
            return Some(frequencies);
        }
        n if n > slots as usize => return None,
        _ => {}
    }
    let total: u64 = present.iter().map(|&s| counts[s]).sum();
    let scale = f64::from(slots) / total as f64;
    let weight: Vec<f64> = present.iter().map(|&s| counts[s] as f64).collect();
    let mut freq: Vec<u32> = weight.iter().map(|&c| ((c * scale).round() as u32).clamp(1, slots)).collect();
    // The bits one more slot saves, and the bits one slot fewer costs.
    let logs = slot_logs();
    let gain = |c: f64, f: u32| c * logs.step_up[f as usize];
    let loss = |c: f64, f: u32| if f > 1 { c * logs.step_up[f as usize - 1] } else { f64::INFINITY };
    let mut gains: Vec<f64> = weight.iter().zip(&freq).map(|(&c, &f)| gain(c, f)).collect();
    let mut losses: Vec<f64> = weight.iter().zip(&freq).map(|(&c, &f)| loss(c, f)).collect();
    // The first index of the largest (smallest) value other than `skip`: a scan that
    // replaces its pick only on a strictly larger (smaller) value. Gains and losses
    // are positive or infinite, never NaN or -0, so `>` and `<` order them as
    // `total_cmp` does, at a fraction of its cost in these scans.
    let argmax = |values: &[f64], skip: usize| {
        let mut best: Option<usize> = None;
        for (i, &value) in values.iter().enumerate() {
            if i != skip && best.is_none_or(|b| value > values[b]) {
                best = Some(i);
            }
        }
        best
    };
    let argmin = |values: &[f64], skip: usize| {
        let mut best: Option<usize> = None;
        for (i, &value) in values.iter().enumerate() {
            if i != skip && best.is_none_or(|b| value < values[b]) {
                best = Some(i);
            }
        }
        best
    };
    let mut sum: u32 = freq.iter().sum();
    let step = |freq: &mut Vec<u32>, gains: &mut Vec<f64>, losses: &mut Vec<f64>, i: usize, up: bool| {
        if up {
            freq[i] += 1;
        } else {
            freq[i] -= 1;
        }
        gains[i] = gain(weight[i], freq[i]);
        losses[i] = loss(weight[i], freq[i]);
    };
    while sum > slots {
        let i = argmin(&losses, usize::MAX)?;
        step(&mut freq, &mut gains, &mut losses, i, false);
        sum -= 1;
    }
    while sum < slots {
        let i = argmax(&gains, usize::MAX)?;
        step(&mut freq, &mut gains, &mut losses, i, true);
        sum += 1;
    }
    while let Some(up) = argmax(&gains, usize::MAX) {
        let Some(down) = argmin(&losses, up) else { break };
        // A strict gain (with a margin for rounding) makes every move lower the cost,
        // so the loop ends.
        if gains[up] <= losses[down] * (1.0 + 1e-12) + 1e-9 {
            break;
        }
        step(&mut freq, &mut gains, &mut losses, up, true);
        step(&mut freq, &mut gains, &mut losses, down, false);
    }
    for (&s, &f) in present.iter().zip(&freq) {
        frequencies[s] = f;
    }
    Some(frequencies)
}

/// The code length in bits of `counts` under `frequencies` of `2^prob_bits` slots.
#[allow(clippy::cast_precision_loss)] // an estimate
fn code_bits(counts: &Histogram, frequencies: &[u32; 256], prob_bits: u32) -> f64 {
    counts
        .iter()
        .zip(frequencies)
        .filter(|(&c, _)| c > 0)
        .map(|(&c, &f)| c as f64 * (f64::from(prob_bits) - slot_logs().of[f as usize]))
        .sum()
}

/// Logarithms of slot counts that quantization and code lengths take again and
/// again, computed once with the same expressions, so the same values.
struct SlotLogs {
    /// `log2(f)`.
    of: [f64; SLOT_LOGS],
    /// `log2((f + 1) / f)`, the bits one more slot saves per symbol at `f` slots.
    step_up: [f64; SLOT_LOGS],
}

/// Every frequency of a table lies in `1..=2^MAX_PROB_BITS`.
const SLOT_LOGS: usize = (1 << MAX_PROB_BITS) + 1;

fn slot_logs() -> &'static SlotLogs {
    static LOGS: std::sync::OnceLock<Box<SlotLogs>> = std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        let mut logs = Box::new(SlotLogs { of: [0.0; SLOT_LOGS], step_up: [0.0; SLOT_LOGS] });
        for f in 1..SLOT_LOGS {
            let f32_ = u32::try_from(f).expect("slot counts fit u32");
            logs.of[f] = f64::from(f32_).log2();
            logs.step_up[f] = (f64::from(f32_ + 1) / f64::from(f32_)).log2();
        }
        logs
    })
}

/// The tile size: a tile's 32 states (128 bytes) should be at most about 1% of its
/// payload, so a tile carries about 12 800 bytes (spec §15.10); within [12, 16].
#[allow(clippy::cast_precision_loss)] // an estimate
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // a small positive log
fn tile_log2_for(info_bits: f64, symbols: usize) -> u32 {
    const PAYLOAD_BITS: f64 = 128.0 * 100.0 * 8.0;
    let bits_per_symbol = info_bits / symbols.max(1) as f64;
    if bits_per_symbol <= 0.0 {
        return MAX_ENCODER_TILE_LOG2;
    }
    let wanted = (PAYLOAD_BITS / bits_per_symbol).log2().ceil();
    (wanted.max(0.0) as u32).clamp(MIN_ENCODER_TILE_LOG2, MAX_ENCODER_TILE_LOG2)
}

/// The predicted stored length of a stream of `symbols` coded in `info_bits`, with
/// `tables_len` bytes of context map and tables.
///
/// A lane starts at `L = 2^16` and its final state is written in 32 bits; a lane
/// that codes `I` bits ends on average halfway (in bits) between 2^16 and 2^32, so
/// it takes `I + 24` bits, but never fewer than its 32 bits of state.
#[allow(clippy::cast_precision_loss)] // an estimate
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)] // a positive size
fn predict_len(symbols: usize, tables_len: usize, info_bits: f64, tile_log2: u32) -> usize {
    let tile_symbols = 1usize << tile_log2;
    let tile_bytes = |n: usize| {
        if n == 0 {
            return 0.0;
        }
        let lanes = n.min(LANES) as f64;
        let lane_bits = info_bits * n as f64 / symbols as f64 / lanes;
        4.0 + lanes * (lane_bits + 24.0).max(32.0) / 8.0
    };
    let full = (symbols / tile_symbols) as f64;
    let payload = full * tile_bytes(tile_symbols) + tile_bytes(symbols % tile_symbols);
    FIXED_HEADER_LEN + tables_len + payload.round() as usize
}

/// How a stream is coded: everything the encoder decides before coding.
#[derive(Debug, Clone)]
struct Plan {
    form: TableForm,
    kind: ContextKind,
    prob_bits: u32,
    tile_log2: u32,
    context_map: [u8; 256],
    /// Each table's frequency per symbol, 0 for a symbol it lacks.
    tables: Vec<[u32; 256]>,
    predicted_len: usize,
}

impl Plan {
    fn new(form: TableForm, symbols: &[u8], kind: ContextKind, contexts: Option<&[u8]>) -> Self {
        match contexts {
            None => Self::of_clusters(form, symbols.len(), kind, [0; 256], vec![histogram(symbols)]),
            Some(contexts) => Self::of_context_rows(form, symbols.len(), kind, &context_histograms(symbols, contexts)),
        }
    }

    /// The plan of a stream of `symbols` whose histogram under each context byte is
    /// `rows`.
    fn of_context_rows(form: TableForm, symbols: usize, kind: ContextKind, rows: &ContextRows) -> Self {
        let (context_map, clusters) = cluster_contexts(form, rows);
        Self::of_clusters(form, symbols, kind, context_map, clusters)
    }

    /// The plan of a stream of `symbols` whose context bytes map to tables by
    /// `context_map`, with each table's histogram in `clusters`.
    fn of_clusters(
        form: TableForm,
        symbols: usize,
        kind: ContextKind,
        context_map: [u8; 256],
        clusters: Vec<Histogram>,
    ) -> Self {
        let most_symbols = clusters.iter().map(|c| c.iter().filter(|&&n| n > 0).count()).max().unwrap_or(0);
        let fewest_bits = most_symbols.max(2).next_power_of_two().trailing_zeros();
        let mut best: Option<Self> = None;
        // Fewer slots make a smaller table (frequencies below 128 take one byte) but
        // code less precisely: take the smallest total, from 2^11 down.
        for prob_bits in (fewest_bits..=u32::from(MAX_PROB_BITS)).rev() {
            let Some(plan) = Self::with_prob_bits(form, symbols, kind, context_map, &clusters, prob_bits) else {
                continue;
            };
            match &best {
                Some(best) if plan.predicted_len > best.predicted_len => break,
                Some(best) if plan.predicted_len == best.predicted_len => {}
                _ => best = Some(plan),
            }
        }
        // 2^11 slots hold any 256 symbols, so there is always a plan.
        best.unwrap_or_else(|| Self {
            form,
            kind,
            prob_bits: u32::from(MAX_PROB_BITS),
            tile_log2: MAX_ENCODER_TILE_LOG2,
            context_map,
            tables: Vec::new(),
            predicted_len: 0,
        })
    }

    fn with_prob_bits(
        form: TableForm,
        symbols: usize,
        kind: ContextKind,
        context_map: [u8; 256],
        clusters: &[Histogram],
        prob_bits: u32,
    ) -> Option<Self> {
        let tables: Vec<[u32; 256]> =
            clusters.iter().map(|counts| quantize(counts, prob_bits)).collect::<Option<_>>()?;
        let info_bits: f64 = clusters.iter().zip(&tables).map(|(c, t)| code_bits(c, t, prob_bits)).sum();
        let tables_len =
            context_map_len(form, tables.len()) + tables.iter().map(|table| table_len(form, table)).sum::<usize>();
        let tile_log2 = tile_log2_for(info_bits, symbols);
        let predicted_len = predict_len(symbols, tables_len, info_bits, tile_log2);
        Some(Self { form, kind, prob_bits, tile_log2, context_map, tables, predicted_len })
    }
}

/// Per symbol of a table, what coding it needs, with the division by its frequency
/// done as a multiplication: with `m = ceil(2^43 / f)`, `floor(x · m / 2^43)` is
/// `floor(x / f)` for every 32-bit `x` (Granlund–Montgomery, since `f ≤ 2^11`).
#[derive(Debug, Clone, Copy, Default)]
struct SymbolCoder {
    /// A state above this is renormalised first: `f · 2^(32−k) − 1`.
    renorm_above: u32,
    cum: u32,
    /// `2^k − f`.
    complement: u32,
    reciprocal: u64,
}

/// The shift of [`SymbolCoder::reciprocal`]: 32 bits of state plus 11 of frequency.
const RECIPROCAL_SHIFT: u32 = 32 + MAX_PROB_BITS as u32;

#[allow(clippy::cast_possible_truncation)] // f · 2^(32−k) − 1 < 2^32
fn symbol_coders(frequencies: &[u32; 256], prob_bits: u32) -> [SymbolCoder; 256] {
    let mut coders = [SymbolCoder::default(); 256];
    let mut cum = 0u32;
    for (coder, &frequency) in coders.iter_mut().zip(frequencies) {
        if frequency == 0 {
            continue;
        }
        *coder = SymbolCoder {
            renorm_above: ((u64::from(frequency) << (32 - prob_bits)) - 1) as u32,
            cum,
            complement: (1 << prob_bits) - frequency,
            reciprocal: (1u64 << RECIPROCAL_SHIFT).div_ceil(u64::from(frequency)),
        };
        cum += frequency;
    }
    coders
}

impl SymbolCoder {
    /// `cum | (2^k − f) << 16`: what a vector coder gathers per table row, with the
    /// reciprocal beside it.
    fn packed_fields(&self) -> u32 {
        self.cum | self.complement << 16
    }

    /// Codes the symbol into `state`, first emitting its low word into `room[*len]`
    /// if the state is too large (spec §15.10). One shift brings any state below
    /// 2^16, under every threshold, so a symbol emits at most one word. The word is
    /// written before it is known to be kept, so that keeping it is arithmetic
    /// rather than a mispredicted branch; `room` holds one word per symbol of the
    /// tile, so `*len` stays within it.
    #[inline(always)]
    #[allow(clippy::cast_possible_truncation)] // the low 16 bits are the word
    fn encode(&self, state: u32, room: &mut [u16], len: &mut usize) -> u32 {
        let renormalise = state > self.renorm_above;
        room[*len] = state as u16;
        *len += usize::from(renormalise);
        // Selects rather than branches, which would be mispredicted about as often as
        // they are taken.
        let keep = u32::from(renormalise).wrapping_neg();
        let state = (state >> 16) & keep | state & !keep;
        let quotient = ((u128::from(state) * u128::from(self.reciprocal)) >> RECIPROCAL_SHIFT) as u32;
        // = (state / f) · 2^k + state mod f + cum < 2^32.
        state + self.cum + quotient * self.complement
    }
}

/// Buffers a tile's coding reuses from tile to tile.
#[derive(Default)]
struct TileScratch {
    /// The renormalisation words, in order of emission.
    room: Vec<u16>,
    /// For a vector kernel, each symbol's row in its tables.
    indices: Vec<u16>,
}

/// The symbol coders of a stream's tables laid out for a vector kernel, where the
/// CPU has one: `None` elsewhere.
struct VectorCoders {
    #[cfg(target_arch = "x86_64")]
    tables: VectorTables,
    /// Whether the CPU looks up 64 context bytes' tables at once (AVX-512 VBMI).
    #[cfg(target_arch = "x86_64")]
    byte_lookup: bool,
}

/// The widest tile encoder the CPU runs, with its tables.
#[cfg(target_arch = "x86_64")]
enum VectorTables {
    Avx2(encode_avx2::Tables),
    Avx512(encode_avx512::Tables),
}

impl VectorCoders {
    #[allow(clippy::unnecessary_wraps)] // None where no vector kernel is built
    fn new(coders: &[[SymbolCoder; 256]], prob_bits: u32) -> Option<Self> {
        #[cfg(target_arch = "x86_64")]
        {
            let tables = match widest_encoder() {
                EncoderKernel::Avx512 => VectorTables::Avx512(encode_avx512::Tables::new(coders, prob_bits)),
                EncoderKernel::Avx2 => VectorTables::Avx2(encode_avx2::Tables::new(coders, prob_bits)),
                EncoderKernel::Scalar => return None,
            };
            Some(Self { tables, byte_lookup: table_rows_avx512::available() })
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (coders, prob_bits);
            None
        }
    }

    /// Codes whole steps of `indices` (rows of the tables) into `states`, appending
    /// words to `room` from `*len`. `room` must hold `*len` plus a word per index
    /// plus [`LANES`].
    #[cfg(target_arch = "x86_64")]
    fn encode_steps(&self, indices: &[u16], states: &mut [u32; LANES], room: &mut [u16], len: &mut usize) {
        assert!(indices.len().is_multiple_of(LANES) && *len + indices.len() + LANES <= room.len());
        debug_assert!(indices.iter().all(|&row| usize::from(row) < self.rows()));
        // SAFETY: each kernel's tables exist only where the CPU has its features;
        // `room` is checked above, and every index is a row of the tables, as the
        // caller builds them from the same plan.
        unsafe {
            match &self.tables {
                VectorTables::Avx2(tables) => encode_avx2::encode_steps(indices, tables, states, room, len),
                VectorTables::Avx512(tables) => encode_avx512::encode_steps(indices, tables, states, room, len),
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    fn rows(&self) -> usize {
        match &self.tables {
            VectorTables::Avx2(tables) => tables.rows(),
            VectorTables::Avx512(tables) => tables.rows(),
        }
    }
}

/// Each symbol's row in a vector kernel's tables: its context's table · 256 plus
/// the symbol, into `rows`.
fn table_rows(symbols: &[u8], contexts: &[u8], map: &[u8; 256], byte_lookup: bool, rows: &mut Vec<u16>) {
    rows.clear();
    #[cfg(target_arch = "x86_64")]
    if byte_lookup {
        // SAFETY: `byte_lookup` is set only where `table_rows_avx512::available()`.
        unsafe { table_rows_avx512::table_rows(symbols, contexts, map, rows) };
        return;
    }
    let _ = byte_lookup;
    rows.extend(symbols.iter().zip(contexts).map(|(&s, &c)| u16::from(map[usize::from(c)]) << 8 | u16::from(s)));
}

/// [`table_rows`] 64 symbols at a time: a context byte's table is looked up in
/// the 256-byte map held in four registers, where the scalar loop reads the map
/// once per symbol, which took a twelfth of an encode.
#[cfg(target_arch = "x86_64")]
mod table_rows_avx512 {
    use std::arch::x86_64::*;

    pub(super) fn available() -> bool {
        use std::arch::is_x86_feature_detected as has;
        has!("avx512f")
            && has!("avx512bw")
            && has!("avx512vbmi")
            && super::widest_encoder() >= super::EncoderKernel::Avx512
    }

    /// # Safety
    /// The CPU must have AVX-512 F, BW and VBMI ([`available`]).
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
    pub(super) unsafe fn table_rows(symbols: &[u8], contexts: &[u8], map: &[u8; 256], rows: &mut Vec<u16>) {
        let len = symbols.len().min(contexts.len());
        rows.reserve(len);
        // SAFETY: every load reads 64 bytes within `map`, `symbols` or `contexts`
        // (`at + 64 <= len`), and every store writes 32 rows within the `len`
        // reserved past `rows.len()`, which is 0; `set_len` follows the writes of
        // every row below `len`.
        unsafe {
            let quarter = |q: usize| _mm512_loadu_si512(map.as_ptr().add(64 * q).cast());
            let (q0, q1, q2, q3) = (quarter(0), quarter(1), quarter(2), quarter(3));
            let out = rows.as_mut_ptr();
            let mut at = 0;
            while at + 64 <= len {
                let context = _mm512_loadu_si512(contexts.as_ptr().add(at).cast());
                // Bits 0-6 pick one of 128 map bytes; bit 7 picks the half.
                let low = _mm512_permutex2var_epi8(q0, context, q1);
                let high = _mm512_permutex2var_epi8(q2, context, q3);
                let table = _mm512_mask_blend_epi8(_mm512_movepi8_mask(context), low, high);
                let symbol = _mm512_loadu_si512(symbols.as_ptr().add(at).cast());
                for half in 0..2 {
                    let (s, t) = if half == 0 {
                        (_mm512_castsi512_si256(symbol), _mm512_castsi512_si256(table))
                    } else {
                        (_mm512_extracti64x4_epi64::<1>(symbol), _mm512_extracti64x4_epi64::<1>(table))
                    };
                    let row = _mm512_or_si512(_mm512_cvtepu8_epi16(s), _mm512_slli_epi16::<8>(_mm512_cvtepu8_epi16(t)));
                    _mm512_storeu_si512(out.add(at + 32 * half).cast(), row);
                }
                at += 64;
            }
            for j in at..len {
                *out.add(j) = u16::from(map[usize::from(contexts[j])]) << 8 | u16::from(symbols[j]);
            }
            rows.set_len(len);
        }
    }
}

/// The tile encoders, narrowest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum EncoderKernel {
    Scalar,
    Avx2,
    Avx512,
}

#[cfg(test)]
thread_local! {
    /// Tests hold each vector encoder to the scalar one by capping the widest.
    static WIDEST_ENCODER_ALLOWED: std::cell::Cell<EncoderKernel> =
        const { std::cell::Cell::new(EncoderKernel::Avx512) };
}

/// The widest tile encoder this CPU runs (and, in tests, that the test allows).
fn widest_encoder() -> EncoderKernel {
    #[cfg(target_arch = "x86_64")]
    let widest = {
        use std::arch::is_x86_feature_detected as has;
        static WIDEST: std::sync::OnceLock<EncoderKernel> = std::sync::OnceLock::new();
        *WIDEST.get_or_init(|| {
            if encode_avx512::available() {
                EncoderKernel::Avx512
            } else if has!("avx2") && has!("popcnt") {
                EncoderKernel::Avx2
            } else {
                EncoderKernel::Scalar
            }
        })
    };
    #[cfg(not(target_arch = "x86_64"))]
    let widest = EncoderKernel::Scalar;
    #[cfg(test)]
    return widest.min(WIDEST_ENCODER_ALLOWED.with(std::cell::Cell::get));
    #[cfg(not(test))]
    widest
}

/// The tile encoder on 8 lanes per AVX2 vector: the same states and words as the
/// scalar one, lane for lane.
#[cfg(target_arch = "x86_64")]
mod encode_avx2 {
    use std::arch::x86_64::*;

    use super::{SymbolCoder, LANES};

    /// Per table row (table · 256 + symbol): `cum | (2^k − f) << 16`, and the low and
    /// high 32 bits of the reciprocal.
    pub(super) struct Tables {
        packed: Vec<u32>,
        reciprocal_low: Vec<u32>,
        reciprocal_high: Vec<u32>,
        prob_bits: u32,
    }

    impl Tables {
        #[allow(clippy::cast_possible_truncation)] // the halves of a 64-bit reciprocal
        pub(super) fn new(coders: &[[SymbolCoder; 256]], prob_bits: u32) -> Self {
            let rows = coders.iter().flatten();
            Self {
                packed: rows.clone().map(SymbolCoder::packed_fields).collect(),
                reciprocal_low: rows.clone().map(|c| c.reciprocal as u32).collect(),
                reciprocal_high: rows.map(|c| (c.reciprocal >> 32) as u32).collect(),
                prob_bits,
            }
        }

        pub(super) fn rows(&self) -> usize {
            self.packed.len()
        }
    }

    /// Per mask of the lanes that emit a word, a byte shuffle that packs the low
    /// words of those lanes, highest lane first, at the front of a vector.
    fn pack_shuffles() -> &'static [[u8; 16]; 256] {
        static SHUFFLES: std::sync::OnceLock<Box<[[u8; 16]; 256]>> = std::sync::OnceLock::new();
        SHUFFLES.get_or_init(|| {
            let mut shuffles = Box::new([[0x80u8; 16]; 256]);
            for (mask, shuffle) in shuffles.iter_mut().enumerate() {
                let mut at = 0;
                for lane in (0..8u8).rev() {
                    if mask >> lane & 1 == 1 {
                        shuffle[at] = 2 * lane;
                        shuffle[at + 1] = 2 * lane + 1;
                        at += 2;
                    }
                }
            }
            shuffles
        })
    }

    /// Codes whole steps (`indices.len()` a multiple of [`LANES`]), from the last to
    /// the first, lanes from 31 down to 0, as the scalar encoder does; words are
    /// appended to `room` from `*len`.
    ///
    /// # Safety
    /// The CPU must have AVX2 and POPCNT; `room` must hold `*len` plus one word per
    /// index plus 8; every index must be a row of `tables`.
    #[target_feature(enable = "avx2,popcnt")]
    #[allow(clippy::cast_possible_wrap, clippy::cast_sign_loss)] // bit patterns
    pub(super) unsafe fn encode_steps(
        indices: &[u16],
        tables: &Tables,
        states: &mut [u32; LANES],
        room: &mut [u16],
        len: &mut usize,
    ) {
        debug_assert!(indices.len().is_multiple_of(LANES));
        debug_assert!(*len + indices.len() + 8 <= room.len());
        let shuffles = pack_shuffles();
        let k = tables.prob_bits;
        // SAFETY (whole body): loads and stores stay within `indices`, `states` and
        // `room` as the caller guarantees; gathers read rows of the tables.
        unsafe {
            let mut lanes: [__m256i; 4] =
                std::array::from_fn(|v| _mm256_loadu_si256(states.as_ptr().add(8 * v).cast()));
            let slots = _mm256_set1_epi32(1 << k);
            let one = _mm256_set1_epi32(1);
            let sign = _mm256_set1_epi32(i32::MIN);
            let low_mask = _mm256_set1_epi32(0xFFFF);
            let shift = _mm_cvtsi32_si128((32 - k) as i32);
            // The low 16 bits of each 32-bit lane, packed in the low 8 bytes of each half.
            let low_halves = _mm256_setr_epi8(
                0, 1, 4, 5, 8, 9, 12, 13, -1, -1, -1, -1, -1, -1, -1, -1, 0, 1, 4, 5, 8, 9, 12, 13, -1, -1, -1, -1, -1,
                -1, -1, -1,
            );
            let packed = tables.packed.as_ptr().cast::<i32>();
            let reciprocal_low = tables.reciprocal_low.as_ptr().cast::<i32>();
            let reciprocal_high = tables.reciprocal_high.as_ptr().cast::<i32>();
            let words = room.as_mut_ptr();
            let mut at = *len;
            for step in (0..indices.len() / LANES).rev() {
                for v in (0..4).rev() {
                    let rows =
                        _mm256_cvtepu16_epi32(_mm_loadu_si128(indices.as_ptr().add(step * LANES + 8 * v).cast()));
                    let fields = _mm256_i32gather_epi32::<4>(packed, rows);
                    let cum = _mm256_and_si256(fields, low_mask);
                    let complement = _mm256_srli_epi32::<16>(fields);
                    // f · 2^(32−k) − 1, wrapping to 2^32 − 1 for f = 2^k.
                    let frequency = _mm256_sub_epi32(slots, complement);
                    let renorm_above = _mm256_sub_epi32(_mm256_sll_epi32(frequency, shift), one);
                    let state = lanes[v];
                    let renormalise =
                        _mm256_cmpgt_epi32(_mm256_xor_si256(state, sign), _mm256_xor_si256(renorm_above, sign));
                    let mask = _mm256_movemask_ps(_mm256_castsi256_ps(renormalise)) as usize;
                    let low = _mm256_permute4x64_epi64::<0b1000>(_mm256_shuffle_epi8(state, low_halves));
                    let shuffle = _mm_loadu_si128(shuffles[mask].as_ptr().cast());
                    _mm_storeu_si128(words.add(at).cast(), _mm_shuffle_epi8(_mm256_castsi256_si128(low), shuffle));
                    at += mask.count_ones() as usize;
                    let state = _mm256_blendv_epi8(state, _mm256_srli_epi32::<16>(state), renormalise);
                    // quotient = (state · r) >> 43 = ((state · r_low >> 32) + state · r_high) >> 11.
                    let r_low = _mm256_i32gather_epi32::<4>(reciprocal_low, rows);
                    let r_high = _mm256_i32gather_epi32::<4>(reciprocal_high, rows);
                    let state_odd = _mm256_srli_epi64::<32>(state);
                    let even = _mm256_add_epi64(
                        _mm256_srli_epi64::<32>(_mm256_mul_epu32(state, r_low)),
                        _mm256_mul_epu32(state, r_high),
                    );
                    let odd = _mm256_add_epi64(
                        _mm256_srli_epi64::<32>(_mm256_mul_epu32(state_odd, _mm256_srli_epi64::<32>(r_low))),
                        _mm256_mul_epu32(state_odd, _mm256_srli_epi64::<32>(r_high)),
                    );
                    let quotient =
                        _mm256_blend_epi32::<0b1010_1010>(_mm256_srli_epi64::<11>(even), _mm256_slli_epi64::<21>(odd));
                    lanes[v] = _mm256_add_epi32(_mm256_add_epi32(state, cum), _mm256_mullo_epi32(quotient, complement));
                }
            }
            for (v, lane) in lanes.iter().enumerate() {
                _mm256_storeu_si256(states.as_mut_ptr().add(8 * v).cast(), *lane);
            }
            *len = at;
        }
    }
}

/// The tile encoder on 16 lanes per AVX-512 vector: the same states and words as
/// the scalar one, lane for lane. The quotient `state / f` is the scalar
/// encoder's `(state · reciprocal) >> 43`, taken as the high half of one 52-bit
/// multiply (IFMA) of `state · 2^9` by the reciprocal, and a step's words are packed
/// with one compress (VBMI2), where AVX2 takes four multiplies and a shuffle table.
#[cfg(target_arch = "x86_64")]
mod encode_avx512 {
    use std::arch::x86_64::*;

    use super::{SymbolCoder, LANES, RECIPROCAL_SHIFT};

    pub(super) fn available() -> bool {
        use std::arch::is_x86_feature_detected as has;
        has!("avx512f")
            && has!("avx512bw")
            && has!("avx512vl")
            && has!("avx512ifma")
            && has!("avx512vbmi2")
            && has!("popcnt")
    }

    /// Per table row (table · 256 + symbol): `cum | (2^k − f) << 16`, and the
    /// reciprocal.
    pub(super) struct Tables {
        packed: Vec<u32>,
        reciprocal: Vec<u64>,
        prob_bits: u32,
    }

    impl Tables {
        pub(super) fn new(coders: &[[SymbolCoder; 256]], prob_bits: u32) -> Self {
            let rows = coders.iter().flatten();
            Self {
                packed: rows.clone().map(SymbolCoder::packed_fields).collect(),
                reciprocal: rows.map(|c| c.reciprocal).collect(),
                prob_bits,
            }
        }

        pub(super) fn rows(&self) -> usize {
            self.packed.len()
        }
    }

    /// `state · 2^UP` is below 2^52 and `(state · 2^UP · r) >> 52` is the scalar
    /// encoder's `(state · r) >> 43`.
    const UP: u32 = 52 - RECIPROCAL_SHIFT;
    const _: () = assert!(32 + UP <= 52 && RECIPROCAL_SHIFT < 52, "IFMA multiplies 52-bit operands");

    /// Codes whole steps (`indices.len()` a multiple of [`LANES`]), from the last to
    /// the first, lanes from 31 down to 0, as the scalar encoder does; words are
    /// appended to `room` from `*len`. A vector holds its 16 lanes highest first, so
    /// that a compress, which packs from the lowest element up, emits them in the
    /// scalar encoder's order.
    ///
    /// # Safety
    /// The CPU must have the features of [`available`]; `room` must hold `*len`
    /// plus one word per index plus 16; every index must be a row of `tables`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512ifma,avx512vbmi2,popcnt")]
    #[allow(clippy::cast_possible_wrap)] // bit patterns and k ≤ 11
    pub(super) unsafe fn encode_steps(
        indices: &[u16],
        tables: &Tables,
        states: &mut [u32; LANES],
        room: &mut [u16],
        len: &mut usize,
    ) {
        debug_assert!(indices.len().is_multiple_of(LANES));
        debug_assert!(*len + indices.len() + 16 <= room.len());
        let k = tables.prob_bits;
        // SAFETY (whole body): loads and stores stay within `indices`, `states` and
        // `room` as the caller guarantees; gathers read rows of the tables.
        unsafe {
            let reverse16 = _mm256_setr_epi16(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
            let reverse32 = _mm512_setr_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
            // The low halves of the 64-bit quotients: of the first vector, then the second.
            let low_halves = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
            let load_lanes = |half: usize| {
                _mm512_permutexvar_epi32(reverse32, _mm512_loadu_si512(states.as_ptr().add(16 * half).cast()))
            };
            let mut lanes = [load_lanes(0), load_lanes(1)];
            let slots = _mm512_set1_epi32(1 << k);
            let one = _mm512_set1_epi32(1);
            let low_mask = _mm512_set1_epi32(0xFFFF);
            let shift = _mm_cvtsi32_si128((32 - k) as i32);
            let zero = _mm512_setzero_si512();
            let packed = tables.packed.as_ptr().cast::<i32>();
            let reciprocal = tables.reciprocal.as_ptr().cast::<i64>();
            let words = room.as_mut_ptr();
            let mut at = *len;
            for step in (0..indices.len() / LANES).rev() {
                for half in (0..2).rev() {
                    let loaded = _mm256_loadu_si256(indices.as_ptr().add(step * LANES + 16 * half).cast());
                    let rows = _mm512_cvtepu16_epi32(_mm256_permutexvar_epi16(reverse16, loaded));
                    let fields = _mm512_i32gather_epi32::<4>(rows, packed);
                    let cum = _mm512_and_si512(fields, low_mask);
                    let complement = _mm512_srli_epi32::<16>(fields);
                    // f · 2^(32−k) − 1, wrapping to 2^32 − 1 for f = 2^k.
                    let renorm_above =
                        _mm512_sub_epi32(_mm512_sll_epi32(_mm512_sub_epi32(slots, complement), shift), one);
                    let state = lanes[half];
                    let renormalise = _mm512_cmpgt_epu32_mask(state, renorm_above);
                    let low = _mm512_cvtepi32_epi16(state);
                    _mm256_storeu_si256(words.add(at).cast(), _mm256_maskz_compress_epi16(renormalise, low));
                    at += renormalise.count_ones() as usize;
                    let state = _mm512_mask_srli_epi32::<16>(state, renormalise, state);
                    let r_low = _mm512_i32gather_epi64::<8>(_mm512_castsi512_si256(rows), reciprocal);
                    let r_high = _mm512_i32gather_epi64::<8>(_mm512_extracti64x4_epi64::<1>(rows), reciprocal);
                    let up = |x: __m256i| _mm512_slli_epi64::<{ UP }>(_mm512_cvtepu32_epi64(x));
                    let q_low = _mm512_madd52hi_epu64(zero, up(_mm512_castsi512_si256(state)), r_low);
                    let q_high = _mm512_madd52hi_epu64(zero, up(_mm512_extracti64x4_epi64::<1>(state)), r_high);
                    let quotient = _mm512_permutex2var_epi32(q_low, low_halves, q_high);
                    lanes[half] =
                        _mm512_add_epi32(_mm512_add_epi32(state, cum), _mm512_mullo_epi32(quotient, complement));
                }
            }
            for (half, lane) in lanes.iter().enumerate() {
                _mm512_storeu_si512(
                    states.as_mut_ptr().add(16 * half).cast(),
                    _mm512_permutexvar_epi32(reverse32, *lane),
                );
            }
            *len = at;
        }
    }
}

/// Codes one tile, appending its payload to `out`: the lanes walk their symbols
/// backwards (steps from last to first, lanes from 31 down to 0), so that the decoder
/// reads them forwards; the words go out in reverse order of emission.
fn encode_tile(
    symbols: &[u8],
    tables_of: Option<(&[u8], &[u8; 256])>,
    coders: &[[SymbolCoder; 256]],
    vector: Option<&VectorCoders>,
    scratch: &mut TileScratch,
    out: &mut Vec<u8>,
) {
    let lanes = symbols.len().min(LANES);
    let mut states = [STATE_LOW; LANES];
    let room = &mut scratch.room;
    // One word per symbol, and room for a vector kernel's whole-vector stores. Only
    // the words written for this tile are read, so earlier contents may stay.
    if room.len() < symbols.len() + LANES {
        room.resize(symbols.len() + LANES, 0);
    }
    // A local length, so that it lives in a register.
    let mut len = 0;
    // Whole steps of LANES symbols, and the last, partial step, which is coded first.
    let whole = symbols.len() / LANES * LANES;
    #[cfg(target_arch = "x86_64")]
    if let Some(vector) = vector.filter(|_| whole > 0) {
        let coder_at = |symbol: u8, context: u8| match tables_of {
            None => &coders[0][usize::from(symbol)],
            Some((_, map)) => &coders[usize::from(map[usize::from(context)])][usize::from(symbol)],
        };
        let context_at = |j: usize| tables_of.map_or(0, |(contexts, _)| contexts[j]);
        for j in (whole..symbols.len()).rev() {
            let lane = j - whole;
            states[lane] = coder_at(symbols[j], context_at(j)).encode(states[lane], room, &mut len);
        }
        // Each symbol's row in the vector tables: its table's first row plus the symbol.
        let indices = &mut scratch.indices;
        match tables_of {
            None => {
                indices.clear();
                indices.extend(symbols[..whole].iter().map(|&s| u16::from(s)));
            }
            Some((contexts, map)) => table_rows(&symbols[..whole], contexts, map, vector.byte_lookup, indices),
        }
        vector.encode_steps(indices, &mut states, room, &mut len);
        for state in &states[..lanes] {
            out.extend_from_slice(&state.to_le_bytes());
        }
        out.extend(room[..len].iter().rev().flat_map(|word| word.to_le_bytes()));
        return;
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = vector;
    match tables_of {
        None => {
            let coders = &coders[0];
            for (lane, &symbol) in symbols[whole..].iter().enumerate().rev() {
                states[lane] = coders[usize::from(symbol)].encode(states[lane], room, &mut len);
            }
            for step in symbols[..whole].chunks_exact(LANES).rev() {
                for (state, &symbol) in states.iter_mut().zip(step).rev() {
                    *state = coders[usize::from(symbol)].encode(*state, room, &mut len);
                }
            }
        }
        Some((contexts, map)) => {
            // The table of every context byte, looked up once per symbol.
            let by_context: [&[SymbolCoder; 256]; 256] = std::array::from_fn(|c| &coders[usize::from(map[c])]);
            let tail = symbols[whole..].iter().zip(&contexts[whole..]);
            for (lane, (&symbol, &context)) in tail.enumerate().rev() {
                let coder = &by_context[usize::from(context)][usize::from(symbol)];
                states[lane] = coder.encode(states[lane], room, &mut len);
            }
            let steps = symbols[..whole].chunks_exact(LANES).zip(contexts[..whole].chunks_exact(LANES));
            for (step, step_contexts) in steps.rev() {
                for ((state, &symbol), &context) in states.iter_mut().zip(step).zip(step_contexts).rev() {
                    *state = by_context[usize::from(context)][usize::from(symbol)].encode(*state, room, &mut len);
                }
            }
        }
    }
    for state in &states[..lanes] {
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.extend(room[..len].iter().rev().flat_map(|word| word.to_le_bytes()));
}

/// Appends bits to a packed field, least significant bit of each byte first (spec
/// §8.9); the last byte's unused bits stay 0, the padding.
struct BitWriter<'a> {
    out: &'a mut Vec<u8>,
    /// Bits written since the field started.
    at: usize,
}

impl BitWriter<'_> {
    fn bit(&mut self, bit: bool) {
        if self.at.is_multiple_of(8) {
            self.out.push(0);
        }
        let last = self.out.len() - 1;
        self.out[last] |= u8::from(bit) << (self.at % 8);
        self.at += 1;
    }

    /// The low `count` bits of `value` (`count` at most 32), least significant first.
    fn bits(&mut self, value: u32, count: u32) {
        for shift in 0..count {
            self.bit(value >> shift & 1 == 1);
        }
    }

    /// `ones` one-bits, then a zero-bit.
    fn unary(&mut self, ones: u32) {
        for _ in 0..ones {
            self.bit(true);
        }
        self.bit(false);
    }
}

#[allow(clippy::cast_possible_truncation)] // counts and symbols of a table fit a byte, frequencies 12 bits
fn write_table(out: &mut Vec<u8>, form: TableForm, frequencies: &[u32; 256]) {
    let present: Vec<u8> = (0..=255u8).filter(|&s| frequencies[usize::from(s)] > 0).collect();
    out.push((present.len() - 1) as u8);
    match symbol_set_len(form, present.len()) {
        0 => {}
        32 if present.len() >= BITMAP_MIN_SYMBOLS => {
            let mut bitmap = [0u8; 32];
            for &symbol in &present {
                bitmap[usize::from(symbol / 8)] |= 1 << (symbol % 8);
            }
            out.extend_from_slice(&bitmap);
        }
        _ => out.extend_from_slice(&present),
    }
    if form == TableForm::Packed {
        let values = code_values(frequencies);
        let (order, _) = best_order(&values);
        out.push(order as u8);
        let mut bits = BitWriter { out, at: 0 };
        for &value in &values {
            bits.unary(exp_golomb_prefix(value, order));
        }
        for &value in &values {
            // The suffix: all but the leading one of value + 2^order.
            bits.bits(value + (1 << order), exp_golomb_prefix(value, order) + order);
        }
        return;
    }
    for &symbol in &present {
        let frequency = frequencies[usize::from(symbol)];
        if frequency < TWO_BYTE_FREQUENCY {
            out.push(frequency as u8);
        } else {
            out.extend_from_slice(&[0x80 | (frequency >> 8) as u8, frequency as u8]);
        }
    }
}

#[allow(clippy::cast_possible_truncation)] // header fields are range-bound; a tile is at most 2^18 symbols
fn write_stream(plan: &Plan, symbols: &[u8], contexts: Option<&[u8]>) -> Vec<u8> {
    let mut out = Vec::with_capacity(plan.predicted_len + plan.predicted_len / 64 + 64);
    out.extend_from_slice(&[plan.prob_bits as u8, plan.kind as u8, plan.tables.len() as u8, plan.tile_log2 as u8]);
    match plan.form {
        _ if plan.tables.len() <= 1 => {}
        TableForm::Bytes => out.extend_from_slice(&plan.context_map),
        TableForm::Packed => {
            let width = packed_map_bits(plan.tables.len());
            let mut bits = BitWriter { out: &mut out, at: 0 };
            for &table in &plan.context_map {
                bits.bits(u32::from(table), width);
            }
        }
    }
    for table in &plan.tables {
        write_table(&mut out, plan.form, table);
    }
    let tile_symbols = 1usize << plan.tile_log2;
    let lengths_at = out.len();
    out.resize(lengths_at + 4 * symbols.len().div_ceil(tile_symbols), 0);
    let coders: Vec<[SymbolCoder; 256]> = plan.tables.iter().map(|t| symbol_coders(t, plan.prob_bits)).collect();
    let vector = VectorCoders::new(&coders, plan.prob_bits);
    let mut scratch = TileScratch::default();
    for (tile, tile_symbols_of) in symbols.chunks(tile_symbols).enumerate() {
        let first = tile * tile_symbols;
        let tables_of = contexts.map(|c| (&c[first..first + tile_symbols_of.len()], &plan.context_map));
        let start = out.len();
        encode_tile(tile_symbols_of, tables_of, &coders, vector.as_ref(), &mut scratch, &mut out);
        let length = (out.len() - start) as u32;
        out[lengths_at + 4 * tile..lengths_at + 4 * tile + 4].copy_from_slice(&length.to_le_bytes());
    }
    out
}

/// Encodes `symbols` with exactly the context kind of `contexts`, its tables in
/// `form` (spec §8.7, §8.9).
///
/// With no context the stream has one table. With a context, the context bytes are
/// grouped into 2 to 8 tables; frequencies are quantized to `2^k` slots (`k = 11`,
/// or smaller where the smaller tables win) to minimise the coded size; tiles are
/// sized so that their states are about 1% of their payload, from 2^12 to 2^18
/// symbols. The result decodes with [`decode_into`] given the same form and contexts.
///
/// Contexts are expected to cover every symbol, as the decoder requires; where they
/// do not, a missing plane byte or position gives context 0. An empty `symbols`
/// (which a stream of the format never has) gives a stream of no tiles, which
/// decodes to nothing.
#[must_use]
pub fn encode(form: TableForm, symbols: &[u8], contexts: Contexts<'_>) -> Vec<u8> {
    let context_bytes = context_bytes(symbols.len(), &contexts);
    let plan = Plan::new(form, symbols, contexts.kind(), context_bytes.as_deref());
    write_stream(&plan, symbols, context_bytes.as_deref())
}

/// A stream's coding under one context kind, chosen but not yet run (see
/// [`plan_each`]). It depends only on the stream's histograms under its context,
/// so it also codes any permutation of the symbols that moves each context byte
/// with its symbol.
#[derive(Debug, Clone)]
pub struct StreamPlan {
    plan: Plan,
    /// The symbols' order-0 entropy under each context byte, summed: what tables
    /// that followed every context byte would take at least, in bits.
    context_entropy_bits: f64,
    /// Under base keys, each base key's prefix code length ([`prefix_code_bits`]),
    /// summed, in bits.
    context_prefix_code_bits: Option<u64>,
}

impl StreamPlan {
    /// The symbols' entropy under the plan's context, in bits: each context byte's
    /// order-0 entropy, as if it had a table of its own. No coding of the stream that
    /// sees no other context takes much less.
    #[must_use]
    pub fn context_entropy_bits(&self) -> f64 {
        self.context_entropy_bits
    }

    /// Under base keys, the bits of a prefix code of its own for each base key,
    /// summed: what zstd's literal coder takes at least on the symbols grouped by
    /// base key (spec §8.6), where it finds no matches. `None` under other contexts.
    #[must_use]
    pub fn context_prefix_code_bits(&self) -> Option<u64> {
        self.context_prefix_code_bits
    }

    /// The context kind it was planned under.
    #[must_use]
    pub fn kind(&self) -> ContextKind {
        self.plan.kind
    }

    /// The stored length [`StreamPlan::encode`] will produce, as [`predicted_len`].
    #[must_use]
    pub fn predicted_len(&self) -> usize {
        self.plan.predicted_len
    }

    /// The codec of the stream it codes: its table form's.
    #[must_use]
    pub fn codec(&self) -> Codec {
        self.plan.form.codec()
    }

    /// Encodes `symbols` as planned, with `contexts` of the kind it was planned
    /// under; the result is what [`encode`] gives when it plans the same way.
    ///
    /// # Panics
    /// When `contexts` is of another kind than the plan.
    #[cfg(test)]
    #[must_use]
    pub fn encode(&self, symbols: &[u8], contexts: Contexts<'_>) -> Vec<u8> {
        assert_eq!(contexts.kind(), self.plan.kind, "a stream is encoded under the context it was planned for");
        write_stream(&self.plan, symbols, context_bytes(symbols.len(), &contexts).as_deref())
    }

    /// [`StreamPlan::encode`] with the context bytes already derived, one per symbol,
    /// `None` for a plan under no context.
    ///
    /// # Panics
    /// When the bytes do not match the plan's kind, or are fewer than the symbols.
    #[must_use]
    pub fn encode_bytes(&self, symbols: &[u8], context_bytes: Option<&[u8]>) -> Vec<u8> {
        assert_eq!(
            context_bytes.is_some(),
            self.plan.kind != ContextKind::None,
            "a stream is encoded under the context it was planned for"
        );
        write_stream(&self.plan, symbols, context_bytes.map(|bytes| &bytes[..symbols.len()]))
    }
}

/// Plans `symbols` under no context and under each of `candidates`, in that order:
/// what a writer weighs per stream before it codes the smallest.
#[cfg(test)]
#[must_use]
pub fn plan_each(form: TableForm, symbols: &[u8], candidates: &[Contexts<'_>]) -> Vec<StreamPlan> {
    let bytes: Vec<(ContextKind, Option<Cow<'_, [u8]>>)> =
        candidates.iter().map(|contexts| (contexts.kind(), context_bytes(symbols.len(), contexts))).collect();
    let candidates: Vec<(ContextKind, Option<&[u8]>)> =
        bytes.iter().map(|(kind, bytes)| (*kind, bytes.as_deref())).collect();
    plan_each_of_bytes(form, symbols, &candidates)
}

/// `plan_each` with the context bytes of each candidate already derived, one per
/// symbol (a candidate of kind none has none): for a writer that plans several
/// streams under the same base keys and codes them with [`StreamPlan::encode_bytes`].
///
/// # Panics
/// When a candidate's bytes are fewer than the symbols.
#[must_use]
pub fn plan_each_of_bytes(
    form: TableForm,
    symbols: &[u8],
    candidates: &[(ContextKind, Option<&[u8]>)],
) -> Vec<StreamPlan> {
    let rows: Vec<Option<ContextRows>> = candidates
        .iter()
        .map(|(_, bytes)| bytes.map(|bytes| context_histograms(symbols, &bytes[..symbols.len()])))
        .collect();
    // Under no context, the sum of any context's rows: no second pass over the data.
    let whole = rows.iter().flatten().next().map_or_else(|| histogram(symbols), ContextRows::whole);
    let whole_bits = entropy_bits(&whole);
    let no_context = StreamPlan {
        plan: Plan::of_clusters(form, symbols.len(), ContextKind::None, [0; 256], vec![whole]),
        context_entropy_bits: whole_bits,
        context_prefix_code_bits: None,
    };
    let with_contexts = candidates.iter().zip(&rows).map(|((kind, _), rows)| match rows {
        Some(rows) => StreamPlan {
            plan: Plan::of_context_rows(form, symbols.len(), *kind, rows),
            context_entropy_bits: rows.present().iter().map(entropy_bits).sum(),
            context_prefix_code_bits: (*kind == ContextKind::BaseKey)
                .then(|| rows.present().iter().map(prefix_code_bits).sum()),
        },
        None => no_context.clone(),
    });
    let plans: Vec<StreamPlan> = with_contexts.collect();
    std::iter::once(no_context).chain(plans).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    thread_local! {
        /// The table form the helpers and tests code and decode with: codec 2's
        /// unless a test runs under [`for_each_form`].
        static FORM: Cell<TableForm> = const { Cell::new(TableForm::Bytes) };
    }

    fn form() -> TableForm {
        FORM.with(Cell::get)
    }

    /// Runs `test` once with each table form: everything after the tables is shared,
    /// so each round-trip test holds for both codecs.
    fn for_each_form(test: impl Fn()) {
        for each in [TableForm::Bytes, TableForm::Packed] {
            FORM.with(|form| form.set(each));
            test();
        }
        FORM.with(|form| form.set(TableForm::Bytes));
    }

    /// The stored length that [`encode`] would produce, predicted from the
    /// histograms and the quantized tables without coding: within about 0.5% plus a
    /// few bytes per tile.
    fn predicted_len(symbols: &[u8], contexts: Contexts<'_>) -> usize {
        let context_bytes = context_bytes(symbols.len(), &contexts);
        Plan::new(form(), symbols, contexts.kind(), context_bytes.as_deref()).predicted_len
    }
    use crate::codec::values::{group_key, Word};
    use proptest::prelude::*;

    /// Deterministic xorshift noise.
    struct Noise(u64);

    impl Noise {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        /// A byte from a two-sided geometric distribution around 0: mostly small.
        #[allow(clippy::cast_possible_truncation)]
        fn skewed(&mut self, zero_in_256: u64) -> u8 {
            let r = self.next();
            if r & 0xFF < zero_in_256 {
                return 0;
            }
            let magnitude = ((r >> 8) & 0xFFFF).trailing_zeros().min(7) as u8 + 1;
            if r >> 63 == 0 {
                magnitude
            } else {
                0u8.wrapping_sub(magnitude)
            }
        }

        #[allow(clippy::cast_possible_truncation)]
        fn bytes(&mut self, len: usize) -> Vec<u8> {
            (0..len).map(|_| self.next() as u8).collect()
        }
    }

    fn encode_with_tile_log2(symbols: &[u8], contexts: Contexts<'_>, tile_log2: u32) -> Vec<u8> {
        let context_bytes = context_bytes(symbols.len(), &contexts);
        let mut plan = Plan::new(form(), symbols, contexts.kind(), context_bytes.as_deref());
        plan.tile_log2 = tile_log2;
        write_stream(&plan, symbols, context_bytes.as_deref())
    }

    fn decode(stored: &[u8], len: usize, contexts: Contexts<'_>) -> Result<Vec<u8>> {
        let mut out = vec![0xAA; 3];
        decode_into(form(), stored, len, contexts, &mut out).map(|()| out)
    }

    fn code(result: Result<Vec<u8>>) -> ErrorCode {
        result.expect_err("the stream is rejected").code()
    }

    #[track_caller]
    fn assert_round_trip(symbols: &[u8], contexts: Contexts<'_>) -> Vec<u8> {
        let stored = encode(form(), symbols, contexts);
        assert_eq!(context_kind(&stored).unwrap(), contexts.kind());
        assert_eq!(decode(&stored, symbols.len(), contexts).unwrap(), symbols);
        stored
    }

    #[track_caller]
    fn assert_round_trip_tiles(symbols: &[u8], contexts: Contexts<'_>, tile_log2: u32) {
        let stored = encode_with_tile_log2(symbols, contexts, tile_log2);
        assert_eq!(u32::from(stored[3]), tile_log2);
        assert_eq!(decode(&stored, symbols.len(), contexts).unwrap(), symbols);
    }

    /// A plan's context entropy is the symbols' entropy under its context bytes.
    #[test]
    fn context_entropy_is_the_entropy_under_the_context() {
        // Symbols that the context byte decides, each of four equally often.
        let contexts: Vec<u8> = (0..4096u32).map(|i| (i % 4) as u8).collect();
        let symbols: Vec<u8> = contexts.iter().map(|c| c * 16).collect();
        let plans = plan_each_of_bytes(TableForm::Packed, &symbols, &[(ContextKind::HigherPlane, Some(&contexts))]);
        assert!((plans[0].context_entropy_bits() - 2.0 * 4096.0).abs() < 1e-6, "no context: 2 bits a symbol");
        assert!(plans[1].context_entropy_bits().abs() < 1e-9, "under the context: nothing left");
    }

    /// The order weighed among the few that can win is the one, and the bits, that
    /// weighing all twelve finds (the smallest of equals).
    #[test]
    fn best_order_is_that_of_every_order_weighed() {
        let mut noise = Noise(0x0DE5_7A11_0B5E_55ED);
        for largest in [0u64, 1, 2, 7, 8, 100, 2047, 4096] {
            for len in [0usize, 1, 5, 256] {
                let values: Vec<u32> =
                    (0..len).map(|_| u32::try_from(noise.next() % (largest + 1)).expect("small")).collect();
                let every = (0..=u32::from(MAX_ORDER))
                    .map(|order| (order, exp_golomb_bits(&values, order)))
                    .min_by_key(|&(_, bits)| bits)
                    .expect("twelve orders");
                assert_eq!(best_order(&values), every, "{len} values up to {largest}");
            }
        }
    }

    /// The entropy, with each small count's logarithm taken once, is the very
    /// number that the sum taken term by term gives.
    #[test]
    #[allow(clippy::cast_precision_loss)]
    fn entropy_bits_is_the_sum_term_by_term() {
        let mut noise = Noise(0x5EED_0FE1_7201_u64);
        for spread in [2u64, 3, 40, 63, 64, 65, 1000, 1 << 20] {
            let counts: Histogram = std::array::from_fn(|s| if s % 7 == 3 { 0 } else { noise.next() % spread });
            let total = counts.iter().sum::<u64>() as f64;
            let direct: f64 = counts.iter().filter(|&&c| c > 0).map(|&c| c as f64 * (total / c as f64).log2()).sum();
            assert_eq!(entropy_bits(&counts).to_bits(), direct.to_bits(), "counts below {spread}");
        }
        assert_eq!(entropy_bits(&[0; 256]), 0.0);
    }

    /// Refinement reuses the costs of clusters that a round leaves as they were and
    /// weighs a context against every cluster at once; its moves and costs are
    /// those of weighing each cluster alone and costing every cluster anew.
    #[test]
    #[allow(clippy::cast_precision_loss, clippy::cast_possible_truncation)]
    fn refinement_is_that_of_costing_every_cluster_anew() {
        // The refinement as first written: one cluster at a time, every cost anew.
        let reference = |rows: &ContextRows, present: &[u8], assignment: &mut [u8; 256]| {
            let total_cost = |clusters: &[Histogram]| -> f64 {
                clusters.iter().map(|c| cluster_cost_bits(TableForm::Packed, c)).sum()
            };
            let mut clusters = cluster_histograms(rows, present, assignment);
            let mut best_cost = total_cost(&clusters);
            for _ in 0..8 {
                let lengths: Vec<Option<[f64; 256]>> = clusters
                    .iter()
                    .map(|counts| {
                        let total: u64 = counts.iter().sum();
                        (total > 0).then(|| {
                            std::array::from_fn(|s| {
                                if counts[s] > 0 {
                                    (total as f64 / counts[s] as f64).log2()
                                } else {
                                    MISSING_SYMBOL_BITS
                                }
                            })
                        })
                    })
                    .collect();
                let mut next = *assignment;
                for &context in present {
                    let row = &rows[usize::from(context)];
                    let cost = |length: &[f64; 256]| {
                        (0..256).filter(|&s| row[s] > 0).map(|s| row[s] as f64 * length[s]).sum::<f64>()
                    };
                    let best = lengths
                        .iter()
                        .enumerate()
                        .filter_map(|(cluster, length)| length.as_ref().map(|length| (cluster, cost(length))))
                        .min_by(|a, b| a.1.total_cmp(&b.1));
                    next[usize::from(context)] = best.expect("a cluster with counts").0 as u8;
                }
                if next == *assignment {
                    break;
                }
                let next_clusters = cluster_histograms(rows, present, &next);
                let cost = total_cost(&next_clusters);
                if cost >= best_cost {
                    break;
                }
                best_cost = cost;
                *assignment = next;
                clusters = next_clusters;
            }
            best_cost
        };
        let mut noise = Noise(0xC1A5_7E25_u64);
        for contexts_used in [9usize, 40, 256] {
            // Symbols whose spread follows the context, as under the plane above.
            let contexts: Vec<u8> = (0..1 << 16).map(|_| (noise.next() % contexts_used as u64) as u8).collect();
            let symbols: Vec<u8> =
                contexts.iter().map(|&c| (noise.next() % (u64::from(c) / 8 + 2)) as u8 ^ (c & 0xF0)).collect();
            let rows = context_histograms(&symbols, &contexts);
            let mut present: Vec<u8> = (0..=255u8).filter(|&c| rows[usize::from(c)].iter().any(|&n| n > 0)).collect();
            present.sort_by_key(|&c| std::cmp::Reverse(rows[usize::from(c)].iter().sum::<u64>()));
            let mut assignment = [0u8; 256];
            for (rank, &context) in present.iter().enumerate() {
                assignment[usize::from(context)] = rank.min(MAX_TABLES - 1) as u8;
            }
            let mut expected = assignment;
            let expected_cost = reference(&rows, &present, &mut expected);
            let mut clusters = Clusters::of(TableForm::Packed, &rows, &present, &assignment);
            refine_clusters(TableForm::Packed, &rows, &present, &mut assignment, &mut clusters);
            assert_eq!(assignment, expected, "{contexts_used} contexts");
            assert_eq!(clusters.total_cost_bits().to_bits(), expected_cost.to_bits(), "{contexts_used} contexts");
            // Moving one context changes two clusters; the others keep their costs.
            let context = present[present.len() / 2];
            let mut moved = assignment;
            moved[usize::from(context)] = (assignment[usize::from(context)] + 1) % MAX_TABLES as u8;
            let reassigned = clusters.reassigned(TableForm::Packed, &rows, &present, &moved);
            let anew = Clusters::of(TableForm::Packed, &rows, &present, &moved);
            assert_eq!(reassigned.costs.map(f64::to_bits), anew.costs.map(f64::to_bits), "{contexts_used} contexts");
        }
    }

    /// The prefix code length is the Huffman code's: merging the two lightest
    /// weights of a heap until one is left, each merge adding its weight.
    #[test]
    fn prefix_code_bits_are_the_huffman_code_length() {
        let huffman = |counts: &Histogram| {
            let mut heap: std::collections::BinaryHeap<std::cmp::Reverse<u64>> =
                counts.iter().filter(|&&c| c > 0).map(|&c| std::cmp::Reverse(c)).collect();
            let mut bits = 0;
            while let (Some(a), Some(b)) = (heap.pop(), heap.pop()) {
                bits += a.0 + b.0;
                heap.push(std::cmp::Reverse(a.0 + b.0));
            }
            bits
        };
        let mut counts = [0; 256];
        assert_eq!(prefix_code_bits(&counts), 0, "no symbols");
        counts[7] = 1000;
        assert_eq!(prefix_code_bits(&counts), 0, "one symbol is a run");
        counts[9] = 500;
        counts[200] = 500;
        assert_eq!(prefix_code_bits(&counts), 1000 + 2 * 500 * 2, "1, 2 and 2 bits");
        assert_eq!(prefix_code_bits(&[3; 256]), 3 * 256 * 8, "uniform: 8 bits each");
        let mut noise = Noise(0x5eed);
        for zeros in [0u64, 128, 230, 250, 255] {
            let mut counts = [0; 256];
            for _ in 0..20_000 {
                counts[usize::from(noise.skewed(zeros))] += noise.next() % 3;
            }
            assert_eq!(prefix_code_bits(&counts), huffman(&counts));
            #[allow(clippy::cast_precision_loss)] // a bound
            let bits = prefix_code_bits(&counts) as f64;
            assert!(bits >= entropy_bits(&counts) - 1e-6, "no prefix code beats the entropy");
        }
    }

    /// Base-key plans carry each base key's prefix code length; other plans none.
    #[test]
    fn base_key_plans_carry_prefix_code_bits() {
        let keys: Vec<u8> = (0..8192u32).map(|i| (i % 3) as u8).collect();
        let symbols: Vec<u8> = keys.iter().enumerate().map(|(i, &key)| key * 40 + [0, 1, 2, 3][(i / 3) % 4]).collect();
        let plans = plan_each_of_bytes(
            TableForm::Packed,
            &symbols,
            &[(ContextKind::HigherPlane, Some(&keys)), (ContextKind::BaseKey, Some(&keys))],
        );
        assert_eq!(plans[0].context_prefix_code_bits(), None);
        assert_eq!(plans[1].context_prefix_code_bits(), None);
        // Under each key, four symbols equally often: 2 bits each.
        assert_eq!(plans[2].context_prefix_code_bits(), Some(2 * 8192));
        assert_eq!(plans[2].kind(), ContextKind::BaseKey);
    }

    /// Each symbol's table row is its context's table · 256 plus the symbol, on the
    /// vector path and the scalar one, at every length around 64.
    #[test]
    fn table_rows_follow_the_map_at_every_length() {
        let mut noise = Noise(77);
        let tables = noise.bytes(256);
        let map: [u8; 256] = std::array::from_fn(|c| tables[c] & 7);
        #[cfg(target_arch = "x86_64")]
        let byte_lookup = table_rows_avx512::available();
        #[cfg(not(target_arch = "x86_64"))]
        let byte_lookup = false;
        if !byte_lookup {
            eprintln!("no AVX-512 VBMI on this CPU: only the scalar table rows are checked");
        }
        for len in [0usize, 1, 63, 64, 65, 127, 128, 129, 1000, 4096] {
            let symbols = noise.bytes(len);
            let contexts = noise.bytes(len + 3);
            let expected: Vec<u16> =
                (0..len).map(|j| u16::from(map[usize::from(contexts[j])]) << 8 | u16::from(symbols[j])).collect();
            for vector in [false, byte_lookup] {
                let mut rows = vec![0xDEAD; 5];
                table_rows(&symbols, &contexts, &map, vector, &mut rows);
                assert_eq!(rows, expected, "{len} symbols, vector {vector}");
            }
        }
    }

    /// Codes with the tile encoders up to `widest` only.
    fn with_widest_encoder<T>(widest: EncoderKernel, code: impl FnOnce() -> T) -> T {
        WIDEST_ENCODER_ALLOWED.with(|allowed| allowed.set(widest));
        let coded = code();
        WIDEST_ENCODER_ALLOWED.with(|allowed| allowed.set(EncoderKernel::Avx512));
        coded
    }

    /// The vector tile encoders this CPU runs, narrowest first.
    fn vector_encoders() -> Vec<EncoderKernel> {
        let widest = widest_encoder();
        if widest < EncoderKernel::Avx512 {
            eprintln!("this CPU runs the tile encoders up to {widest:?} only: the wider are not checked");
        }
        [EncoderKernel::Avx2, EncoderKernel::Avx512].into_iter().filter(|&kernel| kernel <= widest).collect()
    }

    /// Each vector tile encoder gives the scalar one's bytes, for every context,
    /// table count, precision and tile size, on steps whole and partial.
    #[test]
    fn the_vector_encoders_match_the_scalar_one() {
        let kernels = vector_encoders();
        for_each_form(|| {
            let mut noise = Noise(0x1234_5678_9ABC_DEF1);
            for (len, zero_in_256) in
                [(1usize, 0u64), (31, 40), (32, 200), (95, 0), (4096, 128), (70_001, 250), (200_000, 10)]
            {
                let mut symbols: Vec<u8> = (0..len).map(|_| noise.skewed(zero_in_256)).collect();
                if len == 95 {
                    symbols = noise.bytes(len);
                }
                each_context(&symbols, &mut |contexts| {
                    for tile_log2 in [12, 16] {
                        let scalar = with_widest_encoder(EncoderKernel::Scalar, || {
                            encode_with_tile_log2(&symbols, contexts, tile_log2)
                        });
                        for &kernel in &kernels {
                            let vector =
                                with_widest_encoder(kernel, || encode_with_tile_log2(&symbols, contexts, tile_log2));
                            assert_eq!(
                                vector,
                                scalar,
                                "{kernel:?}, {len} symbols, {:?}, tiles of 2^{tile_log2}",
                                contexts.kind()
                            );
                        }
                    }
                });
            }
            // A one-symbol table, whose state never renormalises.
            let same = vec![7u8; 1000];
            let scalar = with_widest_encoder(EncoderKernel::Scalar, || encode(form(), &same, Contexts::None));
            for &kernel in &kernels {
                assert_eq!(with_widest_encoder(kernel, || encode(form(), &same, Contexts::None)), scalar, "{kernel:?}");
            }
        });
    }

    /// Every kind of context over `symbols`, with a plane above and a base that are
    /// derived from the symbols so that the contexts say something.
    fn each_context(symbols: &[u8], check: &mut dyn FnMut(Contexts<'_>)) {
        let plane_above: Vec<u8> = symbols.iter().map(|&s| s.wrapping_mul(7) >> 5).collect();
        check(Contexts::None);
        check(Contexts::HigherPlane(&plane_above));
        for word_bytes in [1usize, 2, 4, 8] {
            // A base of half as many words as the chunk, so keys past it are 0.
            let base: Vec<u8> = symbols[..symbols.len() / 2]
                .iter()
                .flat_map(|&s| {
                    let mut word = vec![0x5Au8; word_bytes];
                    word[word_bytes - 1] = s.rotate_right(1) ^ 0x3C;
                    word
                })
                .collect();
            check(Contexts::BaseKeys { base: &base, word_bytes, positions: None });
            let positions: Vec<u32> = (0..symbols.len()).map(|i| u32::try_from(i * 3 / 2).unwrap()).collect();
            check(Contexts::BaseKeys { base: &base, word_bytes, positions: Some(&positions) });
        }
    }

    #[test]
    fn round_trips_every_length_and_context() {
        for_each_form(|| {
            let mut noise = Noise(0x1234_5678_9ABC_DEF1);
            for len in [1usize, 2, 31, 32, 33, 63, 64, 65, 1000] {
                let symbols: Vec<u8> = (0..len).map(|_| noise.skewed(128)).collect();
                each_context(&symbols, &mut |contexts| {
                    assert_round_trip(&symbols, contexts);
                });
            }
        });
    }

    #[test]
    fn round_trips_across_tile_boundaries() {
        for_each_form(|| {
            let mut noise = Noise(77);
            let tile = 1usize << MIN_TILE_LOG2;
            for len in
                [tile - 1, tile, tile + 1, 2 * tile - 1, 2 * tile + 31, 2 * tile + 32, 2 * tile + 33, 7 * tile + 5]
            {
                let symbols: Vec<u8> = (0..len).map(|_| noise.skewed(100)).collect();
                each_context(&symbols, &mut |contexts| {
                    assert_round_trip_tiles(&symbols, contexts, u32::from(MIN_TILE_LOG2));
                    assert_round_trip_tiles(&symbols, contexts, 9);
                });
            }
            // Several tiles of the size the encoder picks.
            let symbols = noise.bytes(70_000);
            let stored = assert_round_trip(&symbols, Contexts::None);
            assert!(symbols.len() > 1 << stored[3], "several tiles");
        });
    }

    #[test]
    fn round_trips_the_empty_stream() {
        for_each_form(|| {
            each_context(&[], &mut |contexts| {
                let stored = assert_round_trip(&[], contexts);
                assert_eq!(stored.len(), predicted_len(&[], contexts));
            });
        });
    }

    #[test]
    fn one_symbol_costs_nothing_but_the_states() {
        for_each_form(|| {
            for len in [1usize, 5, 32, 100_000] {
                let symbols = vec![0x42u8; len];
                let stored = assert_round_trip(&symbols, Contexts::None);
                // prob_bits as small as a one-byte table allows, one table of one symbol:
                // frequency 64 in a byte, or frequency 32 (code value 64) as an
                // Exp-Golomb code of order 5: prefix 1 (bits 1, 0), then the low 6 bits
                // of 64 + 2^5.
                let (prob_bits, table): (u8, &[u8]) = match form() {
                    TableForm::Bytes => (6, &[0, 0x42, 64]),
                    TableForm::Packed => (5, &[0, 0x42, 5, 0b1000_0001]),
                };
                assert_eq!(stored[..4], [prob_bits, 0, 1, u8::try_from(MAX_ENCODER_TILE_LOG2).unwrap()]);
                assert_eq!(stored[4..4 + table.len()], *table);
                let tiles = len.div_ceil(1 << MAX_ENCODER_TILE_LOG2);
                assert_eq!(stored.len(), 4 + table.len() + 4 * tiles + 4 * len.min(LANES) * tiles);
                assert_eq!(stored.len(), predicted_len(&symbols, Contexts::None));
            }
        });
    }

    #[test]
    fn round_trips_every_symbol_count_and_the_bitmap() {
        for_each_form(|| {
            let mut noise = Noise(5);
            for distinct in [2usize, 31, 32, 33, 255, 256] {
                #[allow(clippy::cast_possible_truncation)]
                let mut symbols: Vec<u8> = (0..4000).map(|i| ((i * 7) % distinct) as u8).collect();
                // Uneven counts, some symbols rare.
                symbols.extend((0..2000).map(|_| 0u8));
                symbols.truncate(4000 + usize::try_from(noise.next() % 500).unwrap());
                let stored = assert_round_trip(&symbols, Contexts::None);
                assert_eq!(usize::from(stored[4]) + 1, distinct);
                let plane: Vec<u8> = symbols.iter().map(|&s| s / 64).collect();
                assert_round_trip(&symbols, Contexts::HigherPlane(&plane));
            }
            // Uniform bytes: 256 symbols, about 8 bits each.
            let symbols = noise.bytes(100_000);
            let stored = assert_round_trip(&symbols, Contexts::None);
            assert!(stored.len() < 100_000 + 1000, "{}", stored.len());
        });
    }

    #[test]
    fn base_keys_follow_the_rule_of_the_value_order() {
        fn check<W: Word + Into<u64>>(words: &[W]) {
            let bytes: Vec<u8> = words
                .iter()
                .flat_map(|&w| {
                    let mut b = vec![0u8; W::BYTES];
                    w.store(&mut b);
                    b
                })
                .collect();
            for (i, &w) in words.iter().enumerate() {
                assert_eq!(key_at_width(&bytes, W::BYTES, i), group_key(w));
            }
            assert_eq!(key_at_width(&bytes, W::BYTES, words.len()), 0, "zero past the end");
            assert_eq!(key_at_width(&bytes, W::BYTES, usize::MAX), 0, "no overflow");
        }
        let mut noise = Noise(99);
        #[allow(clippy::cast_possible_truncation)]
        {
            let raw: Vec<u64> = (0..500).map(|_| noise.next()).chain([0, u64::MAX, 1 << 63, 1]).collect();
            check(&raw.iter().map(|&r| r as u8).collect::<Vec<_>>());
            check(&raw.iter().map(|&r| r as u16).collect::<Vec<_>>());
            check(&raw.iter().map(|&r| r as u32).collect::<Vec<_>>());
            check(&raw);
        }
        // bf16 1.0 and -1.0 share their key, the top of the exponent.
        assert_eq!(key_at_width(&[0x80, 0x3F, 0x80, 0xBF], 2, 0), 0x7F);
        assert_eq!(key_at_width(&[0x80, 0x3F, 0x80, 0xBF], 2, 1), 0x7F);
    }

    #[test]
    fn contexts_pay_where_the_statistics_differ() {
        for_each_form(|| {
            // Low byte spread set by the high byte: with the plane above as context the
            // stream is much smaller than without.
            let mut noise = Noise(3);
            let high: Vec<u8> = (0..50_000).map(|_| u8::try_from(noise.next() % 8).unwrap()).collect();
            let low: Vec<u8> =
                high.iter().map(|&h| u8::try_from(noise.next() % (1u64 << h)).unwrap().wrapping_add(h * 30)).collect();
            let plain = assert_round_trip(&low, Contexts::None).len();
            let with_context = assert_round_trip(&low, Contexts::HigherPlane(&high)).len();
            assert!(with_context * 10 < plain * 8, "{with_context} vs {plain}");
        });
    }

    #[test]
    fn reciprocal_division_is_exact() {
        let mut noise = Noise(11);
        for frequency in 1..=(1u32 << MAX_PROB_BITS) {
            let mut frequencies = [0u32; 256];
            frequencies[0] = frequency;
            frequencies[1] = (1 << MAX_PROB_BITS) - frequency;
            let coder = symbol_coders(&frequencies, u32::from(MAX_PROB_BITS))[0];
            let limit = coder.renorm_above;
            #[allow(clippy::cast_possible_truncation)]
            let samples =
                [0, 1, frequency - 1, frequency, frequency + 1, limit, limit - 1, limit / 2, u32::MAX, u32::MAX - 1]
                    .into_iter()
                    .chain((0..64).map(|_| noise.next() as u32));
            for x in samples {
                let quotient = (u128::from(x) * u128::from(coder.reciprocal)) >> RECIPROCAL_SHIFT;
                assert_eq!(quotient, u128::from(x / frequency), "{x} / {frequency}");
            }
        }
    }

    /// No move of one slot from a symbol to another lowers the code length.
    #[test]
    fn quantization_is_optimal_and_beats_rounding() {
        let mut noise = Noise(21);
        for case in 0..40u64 {
            let mut counts = [0u64; 256];
            let symbols = 2 + usize::try_from(case * 6).unwrap().min(254);
            for (s, count) in counts.iter_mut().enumerate().take(symbols) {
                *count = 1 + (noise.next() % 1000) * u64::from(s < 3) * 100 + noise.next() % 7;
            }
            for prob_bits in [8u32, 9, 11] {
                let Some(frequencies) = quantize(&counts, prob_bits) else {
                    assert!(symbols > 1 << prob_bits);
                    continue;
                };
                assert_eq!(frequencies.iter().sum::<u32>(), 1 << prob_bits);
                assert!(counts.iter().zip(&frequencies).all(|(&c, &f)| (c > 0) == (f > 0)));
                let bits = code_bits(&counts, &frequencies, prob_bits);
                for up in 0..symbols {
                    for down in 0..symbols {
                        if up != down && frequencies[down] > 1 {
                            let mut moved = frequencies;
                            moved[up] += 1;
                            moved[down] -= 1;
                            assert!(code_bits(&counts, &moved, prob_bits) >= bits - 1e-6);
                        }
                    }
                }
                // Rounding each share, then taking the difference from the largest,
                // never codes shorter.
                if let Some(rounded) = naive_rounding(&counts, prob_bits) {
                    assert!(bits <= code_bits(&counts, &rounded, prob_bits) + 1e-6);
                }
            }
        }
        // Rare symbols pull slots from common ones: naive rounding gives each its
        // share of at least 1 and the remainder to the largest, which here costs more.
        let mut counts = [0u64; 256];
        counts[0] = 1_000_000;
        counts[1] = 300_000;
        counts[2..40].fill(40);
        let optimal = code_bits(&counts, &quantize(&counts, 8).unwrap(), 8);
        assert!(optimal < code_bits(&counts, &naive_rounding(&counts, 8).unwrap(), 8) - 100.0);
    }

    #[allow(clippy::cast_precision_loss, clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    fn naive_rounding(counts: &Histogram, prob_bits: u32) -> Option<[u32; 256]> {
        let total: u64 = counts.iter().sum();
        let slots = 1u32 << prob_bits;
        let mut frequencies = [0u32; 256];
        for (f, &c) in frequencies.iter_mut().zip(counts) {
            if c > 0 {
                *f = ((c as f64 * f64::from(slots) / total as f64).round() as u32).max(1);
            }
        }
        let largest = (0..256).max_by_key(|&s| counts[s]).unwrap();
        let others: u32 = frequencies.iter().sum::<u32>() - frequencies[largest];
        frequencies[largest] = slots.checked_sub(others).filter(|&f| f > 0)?;
        Some(frequencies)
    }

    #[allow(clippy::cast_precision_loss)]
    #[track_caller]
    fn assert_prediction_close(symbols: &[u8], contexts: Contexts<'_>) {
        let predicted = predicted_len(symbols, contexts);
        let actual = encode(form(), symbols, contexts).len();
        let tiles = symbols.len().div_ceil(1 << 12) as f64;
        let allowed = actual as f64 * 0.005 + 8.0 + 4.0 * tiles;
        assert!((predicted as f64 - actual as f64).abs() <= allowed, "predicted {predicted}, actual {actual}");
    }

    #[test]
    fn predicted_length_is_close() {
        for_each_form(|| {
            let mut noise = Noise(8);
            for zeros in [0u64, 128, 230, 250, 255] {
                for len in [100usize, 5000, 200_000] {
                    let symbols: Vec<u8> = (0..len).map(|_| noise.skewed(zeros)).collect();
                    assert_prediction_close(&symbols, Contexts::None);
                    let plane: Vec<u8> = symbols.iter().map(|&s| s >> 4).collect();
                    assert_prediction_close(&symbols, Contexts::HigherPlane(&plane));
                }
            }
            assert_prediction_close(&noise.bytes(300_000), Contexts::None);
        });
    }

    #[test]
    fn each_plan_codes_as_encode_does() {
        for_each_form(|| {
            let mut noise = Noise(12);
            let base = noise.bytes(2 * 20_000);
            for zeros in [0u64, 200, 255] {
                let symbols: Vec<u8> = (0..20_000).map(|_| noise.skewed(zeros)).collect();
                let above: Vec<u8> = symbols.iter().map(|&s| s >> 5).collect();
                let keys = Contexts::BaseKeys { base: &base, word_bytes: 2, positions: None };
                let candidates = [Contexts::HigherPlane(&above), keys];
                let plans = plan_each(form(), &symbols, &candidates);
                assert_eq!(plans.len(), 3);
                for (plan, contexts) in plans.iter().zip([Contexts::None, candidates[0], candidates[1]]) {
                    let encoded = plan.encode(&symbols, contexts);
                    assert_eq!(encoded, encode(form(), &symbols, contexts));
                    assert_eq!(plan.predicted_len(), predicted_len(&symbols, contexts));
                }
            }
        });
    }

    #[test]
    fn a_plan_codes_a_permutation_that_moves_contexts_with_symbols() {
        for_each_form(|| {
            // Regrouping values permutes each plane and the plane above it alike: the
            // plan of the original order codes the permutation as planning it anew does.
            let mut noise = Noise(13);
            let above: Vec<u8> = (0..30_000).map(|_| noise.skewed(180)).collect();
            let symbols: Vec<u8> = above.iter().map(|&a| noise.skewed(200) ^ a).collect();
            let mut order: Vec<usize> = (0..symbols.len()).collect();
            order.sort_by_key(|&i| (above[i] >> 3, i));
            let permuted: Vec<u8> = order.iter().map(|&i| symbols[i]).collect();
            let permuted_above: Vec<u8> = order.iter().map(|&i| above[i]).collect();
            let plans = plan_each(form(), &symbols, &[Contexts::HigherPlane(&above)]);
            assert_eq!(plans[0].encode(&permuted, Contexts::None), encode(form(), &permuted, Contexts::None));
            let with_above = Contexts::HigherPlane(&permuted_above);
            assert_eq!(plans[1].encode(&permuted, with_above), encode(form(), &permuted, with_above));
        });
    }

    // ----- hand-built streams and the errors of §8.7 -----

    /// A stream from its parts: the four fixed bytes, the context map (for more than
    /// one table), the tables as bytes, the tile lengths and the payloads.
    fn build(fixed: [u8; 4], map: Option<&[u8; 256]>, tables: &[&[u8]], lengths: &[u32], payload: &[u8]) -> Vec<u8> {
        let mut out = fixed.to_vec();
        if let Some(map) = map {
            out.extend_from_slice(map);
        }
        for table in tables {
            out.extend_from_slice(table);
        }
        for length in lengths {
            out.extend_from_slice(&length.to_le_bytes());
        }
        out.extend_from_slice(payload);
        out
    }

    /// prob_bits 1, no context: symbols 0 and 1 at frequency 1 each. Read as a packed
    /// table it says the same: Exp-Golomb order 1, code values 2 and 0 (prefixes
    /// 1, 0 and 0, then suffixes 00 and 0).
    const HALVES: &[u8] = &[1, 0, 1, 1, 1];

    /// One symbol coded by hand: symbol 1 from state 2^16 is state 2·2^16 + 1.
    fn one_symbol_stream() -> Vec<u8> {
        build([1, 0, 1, 8], None, &[HALVES], &[4], &131_073u32.to_le_bytes())
    }

    #[test]
    fn decodes_a_stream_built_by_hand() {
        assert_eq!(decode(&one_symbol_stream(), 1, Contexts::None).unwrap(), [1]);
        // 34 symbols: two steps, lanes 0 and 1 in the second. Coded here step by step
        // as §15.10 describes, independently of the encoder's plan.
        let mut frequencies = [0u32; 256];
        frequencies[..2].copy_from_slice(&[1, 1]);
        let coders = symbol_coders(&frequencies, 1);
        let symbols =
            [0u8, 1, 1, 0, 0, 1, 1, 1, 0, 1, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 1, 0, 1, 1, 0, 0, 1, 0, 1, 1, 0, 1, 1];
        let mut states = [STATE_LOW; LANES];
        let mut words = Vec::new();
        let mut room = vec![0u16; symbols.len()];
        let mut len = 0;
        for (j, &s) in symbols.iter().enumerate().rev() {
            let x = states[j % LANES];
            // x > 2^31 − 1 renormalises; then x = (x / 1) · 2 + cum.
            let x = if x > (1 << 31) - 1 {
                words.push(u16::try_from(x & 0xFFFF).unwrap());
                x >> 16
            } else {
                x
            };
            let expected = 2 * x + u32::from(s);
            states[j % LANES] = coders[usize::from(s)].encode(states[j % LANES], &mut room, &mut len);
            assert_eq!(states[j % LANES], expected);
        }
        let mut payload: Vec<u8> = states.iter().flat_map(|s| s.to_le_bytes()).collect();
        payload.extend(words.iter().rev().flat_map(|w| w.to_le_bytes()));
        let stream = build([1, 0, 1, 8], None, &[HALVES], &[u32::try_from(payload.len()).unwrap()], &payload);
        assert_eq!(decode(&stream, symbols.len(), Contexts::None).unwrap(), symbols);
    }

    #[test]
    fn fixed_header_errors() {
        let valid = one_symbol_stream();
        let with = |at: usize, value: u8| {
            let mut s = valid.clone();
            s[at] = value;
            s
        };
        for bad in [with(0, 0), with(0, 12), with(1, 3), with(2, 0), with(2, 2), with(3, 7), with(3, 25)] {
            assert_eq!(code(decode(&bad, 1, Contexts::None)), ErrorCode::RansHeader);
            assert_eq!(context_kind(&bad).unwrap_err().code(), ErrorCode::RansHeader);
        }
        // Context 1 or 2 needs 2 to 8 tables.
        let mut map_stream = build([1, 1, 2, 8], Some(&[0; 256]), &[HALVES, HALVES], &[4], &131_073u32.to_le_bytes());
        let positions = [0u32];
        let keys = Contexts::BaseKeys { base: &[], word_bytes: 2, positions: Some(&positions) };
        assert_eq!(decode(&map_stream, 1, keys).unwrap(), [1]);
        for table_count in [1u8, 9, 255] {
            map_stream[2] = table_count;
            assert_eq!(context_kind(&map_stream).unwrap_err().code(), ErrorCode::RansHeader);
            assert_eq!(code(decode(&map_stream, 1, keys)), ErrorCode::RansHeader);
        }
        // A short stream: every prefix of the fixed header.
        for len in 0..4 {
            assert_eq!(context_kind(&valid[..len]).unwrap_err().code(), ErrorCode::RansHeader);
        }
        assert_eq!(context_kind(&valid).unwrap(), ContextKind::None);
    }

    #[test]
    fn a_context_the_stream_does_not_allow_is_a_header_error() {
        // The stream has no context, the reader would derive the plane above.
        assert_eq!(code(decode(&one_symbol_stream(), 1, Contexts::HigherPlane(&[0]))), ErrorCode::RansHeader);
        // The stream asks for the plane above where the reader allows no context.
        let stream = build([1, 2, 2, 8], Some(&[0; 256]), &[HALVES, HALVES], &[4], &131_073u32.to_le_bytes());
        assert_eq!(context_kind(&stream).unwrap(), ContextKind::HigherPlane);
        assert_eq!(code(decode(&stream, 1, Contexts::None)), ErrorCode::RansHeader);
        assert_eq!(decode(&stream, 1, Contexts::HigherPlane(&[9])).unwrap(), [1]);
        let keys = Contexts::BaseKeys { base: &[], word_bytes: 1, positions: None };
        assert_eq!(code(decode(&stream, 1, keys)), ErrorCode::RansHeader);
    }

    #[test]
    fn context_map_and_table_errors() {
        let payload = 131_073u32.to_le_bytes();
        let plane = [0u8];
        let check = |stream: Vec<u8>, what: &str| {
            assert_eq!(code(decode(&stream, 1, Contexts::HigherPlane(&plane))), ErrorCode::RansHeader, "{what}");
        };
        let mut map = [0u8; 256];
        map[200] = 2;
        check(build([1, 2, 2, 8], Some(&map), &[HALVES, HALVES], &[4], &payload), "map entry >= T");
        let table = |bytes: &[u8]| build([1, 2, 2, 8], Some(&[0; 256]), &[HALVES, bytes], &[4], &payload);
        check(table(&[1, 1, 1, 1, 1]), "a repeated symbol");
        check(table(&[1, 1, 0, 1, 1]), "decreasing symbols");
        check(table(&[1, 0, 1, 0, 2]), "frequency 0");
        check(table(&[1, 0, 1, 2, 0]), "frequency 0 last");
        check(table(&[1, 0, 1, 1, 2]), "sum above 2^k");
        check(table(&[0, 0, 1]), "sum below 2^k");
        check(
            build([8, 2, 2, 8], Some(&[0; 256]), &[&[0, 0, 0x81, 0x00], &[0, 5, 0x80, 0x7F]], &[4], &payload),
            "two-byte 127",
        );
        // A valid two-byte frequency, for contrast: 2^8 as 0x81 0x00.
        let valid =
            build([8, 2, 2, 8], Some(&[0; 256]), &[&[0, 0, 0x81, 0x00], &[0, 5, 0x81, 0x00]], &[4], &[0, 0, 1, 0]);
        assert_eq!(decode(&valid, 1, Contexts::HigherPlane(&plane)).unwrap(), [0]);
        // A bitmap: 32 symbols listed by 31 bits, and by 33.
        let bitmap_table = |bits: &[u8]| {
            let mut t = vec![31u8];
            let mut bitmap = [0u8; 32];
            for &b in bits {
                bitmap[usize::from(b / 8)] |= 1 << (b % 8);
            }
            t.extend_from_slice(&bitmap);
            t.extend(std::iter::repeat_n(8u8, 32));
            t
        };
        let thirty_two: Vec<u8> = (0..32).map(|i| i * 5).collect();
        let good = bitmap_table(&thirty_two);
        let fixed = [8, 2, 2, 8];
        // Table 1 holds symbols 0, 5, 10, ... at frequency 8: symbol 5 (cum 8) coded
        // from 2^16 is (2^16 / 8) · 2^8 + 8 = 2^21 + 8.
        let ok = build(fixed, Some(&[1; 256]), &[&[0, 0, 0x81, 0x00], &good], &[4], &((1u32 << 21) + 8).to_le_bytes());
        assert_eq!(decode(&ok, 1, Contexts::HigherPlane(&plane)).unwrap(), [5]);
        check(
            build(fixed, Some(&[1; 256]), &[&[0, 0, 0x81, 0x00], &bitmap_table(&thirty_two[..31])], &[4], &payload),
            "31 bits",
        );
        let mut thirty_three = thirty_two.clone();
        thirty_three.push(255);
        check(
            build(fixed, Some(&[1; 256]), &[&[0, 0, 0x81, 0x00], &bitmap_table(&thirty_three)], &[4], &payload),
            "33 bits",
        );
    }

    /// A packed table (Table 8.8) from its symbol set, Exp-Golomb order and
    /// frequencies, coded as the spec says, independently of the writer.
    fn packed_table(symbol_set: &[u8], order: u8, frequencies: &[i64]) -> Vec<u8> {
        let mut table = vec![u8::try_from(frequencies.len() - 1).unwrap()];
        table.extend_from_slice(symbol_set);
        table.push(order);
        let order = u32::from(order);
        let prefix = |v: u32| (v + (1 << order)).ilog2() - order;
        let mut previous = 0;
        let values: Vec<u32> = frequencies
            .iter()
            .map(|&f| {
                let d = f - previous;
                previous = f;
                u32::try_from(if d >= 0 { 2 * d } else { -2 * d - 1 }).unwrap()
            })
            .collect();
        let mut bits = BitWriter { out: &mut table, at: 0 };
        for &v in &values {
            bits.unary(prefix(v));
        }
        for &v in &values {
            bits.bits(v + (1 << order), prefix(v) + order);
        }
        table
    }

    /// A stream of one symbol built by hand in the packed form: a map of 2 bits per
    /// entry (three tables), tables of 1, 2 and 256 symbols, and the state that codes
    /// the symbol.
    #[test]
    fn decodes_a_packed_stream_built_by_hand() {
        let mut map = [0u8; 64];
        // Context 0 takes table 2: entry 0 is the low two bits of byte 0.
        map[0] = 0b10;
        let every: Vec<i64> = (0..256).map(|x| if x == 7 { 1 + 1792 } else { 1 }).collect();
        let tables =
            [packed_table(&[9], 0, &[2048]), packed_table(&[3, 4], 3, &[1000, 1048]), packed_table(&[], 4, &every)];
        // Symbol 7 of table 2 (cum 7, frequency 1793) from 2^16: (2^16 / 1793) · 2^11 + 7 + r
        // with r = 2^16 mod 1793.
        let state = (STATE_LOW / 1793) * 2048 + 7 + STATE_LOW % 1793;
        let tables: Vec<&[u8]> = tables.iter().map(Vec::as_slice).collect();
        let mut stream = [11u8, 2, 3, 8].to_vec();
        stream.extend_from_slice(&map);
        stream.extend(build([0; 4], None, &tables, &[4], &state.to_le_bytes())[4..].iter());
        let mut out = Vec::new();
        decode_into(TableForm::Packed, &stream, 1, Contexts::HigherPlane(&[0]), &mut out).unwrap();
        assert_eq!(out, [7]);
        // The same bytes read as codec 2 are another stream, which fails.
        assert!(decode_into(TableForm::Bytes, &stream, 1, Contexts::HigherPlane(&[0]), &mut out).is_err());
    }

    #[test]
    fn packed_map_and_table_errors() {
        let payload = 131_073u32.to_le_bytes();
        let plane = [0u8];
        let halves = packed_table(&[0, 1], 1, &[1, 1]);
        assert_eq!(halves, HALVES);
        let stream = |table_count: u8, map: &[u8], second: &[u8]| {
            let mut stream = vec![1u8, 2, table_count, 8];
            stream.extend_from_slice(map);
            let tables: Vec<&[u8]> =
                std::iter::once(HALVES).chain(std::iter::repeat_n(second, usize::from(table_count) - 1)).collect();
            stream.extend(build([0; 4], None, &tables, &[4], &payload)[4..].iter());
            stream
        };
        let decode =
            |stream: &[u8]| decode_into(TableForm::Packed, stream, 1, Contexts::HigherPlane(&plane), &mut Vec::new());
        decode(&stream(2, &[0; 32], HALVES)).expect("the reference stream decodes");
        let check = |stream: Vec<u8>, what: &str| {
            assert_eq!(decode(&stream).map_err(|e| e.code()), Err(ErrorCode::RansHeader), "{what}");
        };
        // Three tables take 2 bits an entry; entry 255 (the top two bits) reads 3.
        let mut map = [0u8; 64];
        map[63] = 0b1100_0000;
        check(stream(3, &map, HALVES), "a packed map entry >= T");
        check(stream(3, &[0; 32], HALVES), "a map of 1 bit an entry for three tables");
        let table = |bytes: Vec<u8>| stream(2, &[0; 32], &bytes);
        let mut order_12 = halves.clone();
        order_12[3] = 12;
        check(table(order_12), "Exp-Golomb order 12");
        check(table(packed_table(&[0, 1], 1, &[2, 0])), "frequency 0");
        check(table(packed_table(&[0, 1], 0, &[3, -1])), "a negative frequency");
        check(table(packed_table(&[0], 2, &[4])), "frequency above 2^k");
        check(table(packed_table(&[0, 1], 1, &[1, 2])), "sum above 2^k");
        check(table(packed_table(&[0], 1, &[1])), "sum below 2^k");
        check(table(packed_table(&[1, 0], 1, &[1, 1])), "decreasing symbols");
        let mut padded = halves.clone();
        padded[4] |= 0x80;
        check(table(padded), "nonzero padding");
        // A prefix that never ends: the stream runs out inside the codes, or the
        // prefix outgrows any frequency first.
        let endless = |ones: usize| [1u8, 0, 1, 0].into_iter().chain(std::iter::repeat_n(0xFF, ones / 8));
        let mut cut = vec![1u8, 2, 2, 8];
        cut.extend_from_slice(&[0; 32]);
        cut.extend(HALVES.iter().copied().chain(endless(8)));
        check(cut, "a prefix past the end of the stream");
        check(table(endless(64).collect()), "a prefix longer than any frequency");
        // The full table of 256 symbols lists none; a bitmap there is other bytes.
        let flat = vec![8i64; 256];
        let full = packed_table(&[], 3, &flat);
        let mut full_stream = vec![11u8, 0, 1, 8];
        full_stream
            .extend(build([0; 4], None, &[&full], &[4], &((STATE_LOW / 8) * 2048 + 8 * 42).to_le_bytes())[4..].iter());
        let mut out = Vec::new();
        decode_into(TableForm::Packed, &full_stream, 1, Contexts::None, &mut out).unwrap();
        assert_eq!(out, [42]);
    }

    #[test]
    fn tile_length_errors() {
        let state = 131_073u32.to_le_bytes();
        let check = |lengths: &[u32], payload: &[u8], len: usize, what: &str| {
            let stream = build([1, 0, 1, 8], None, &[HALVES], lengths, payload);
            assert_eq!(code(decode(&stream, len, Contexts::None)), ErrorCode::RansHeader, "{what}");
        };
        check(&[3], &state[..3], 1, "shorter than its states");
        check(&[5], &[state.as_slice(), &[0]].concat(), 1, "an odd word part");
        check(&[4], &[state.as_slice(), &[0]].concat(), 1, "a byte after the tiles");
        check(&[6], &state, 1, "lengths past the end");
        check(&[4, 4], &[state, state].concat(), 1, "a tile too many, read as payload");
        // Two tiles of 256 symbols need two lengths: with one, the stream is too short.
        check(&[4], &state, 300, "too few lengths");
        // A decoded length that would need more lengths than the stream could hold is
        // refused before anything is allocated.
        check(&[4], &state, usize::MAX, "an absurd length");
        check(&[4], &state, 1 << 40, "a huge length");
    }

    #[test]
    fn every_truncation_of_the_header_is_a_header_error() {
        for_each_form(|| {
            let mut noise = Noise(17);
            let symbols: Vec<u8> = (0..3000).map(|_| noise.skewed(60)).collect();
            let plane: Vec<u8> = symbols.iter().map(|&s| s >> 6).collect();
            let stored = encode_with_tile_log2(&symbols, Contexts::HigherPlane(&plane), 10);
            let tiles = symbols.len().div_ceil(1 << 10);
            let first_payload = {
                let stream = check_stream(form(), &stored, symbols.len(), ContextKind::HigherPlane).unwrap();
                stored.len() - stream.payloads.len()
            };
            assert!(first_payload > 4 + context_map_len(form(), 2) + 4 * tiles);
            for len in 0..stored.len() {
                let err = decode(&stored[..len], symbols.len(), Contexts::HigherPlane(&plane)).unwrap_err();
                assert_eq!(err.code(), ErrorCode::RansHeader, "cut at {len}: {err}");
            }
        });
    }

    #[test]
    fn tile_decoding_errors() {
        for_each_form(|| {
            let check = |payload: &[u8], what: &str| {
                let length = u32::try_from(payload.len()).unwrap();
                let stream = build([1, 0, 1, 8], None, &[HALVES], &[length], payload);
                assert_eq!(code(decode(&stream, 1, Contexts::None)), ErrorCode::RansDecode, "{what}");
            };
            check(&(STATE_LOW - 1).to_le_bytes(), "initial state below 2^16");
            check(&0u32.to_le_bytes(), "initial state 0");
            // Symbol 0 from 2^16: state 2^15 needs a word the tile lacks.
            check(&STATE_LOW.to_le_bytes(), "a truncated tile");
            check(&[131_073u32.to_le_bytes().as_slice(), &[0, 0]].concat(), "a word left over");
            check(&131_075u32.to_le_bytes(), "final state 2^16 + 1");
            // The same with the word read: symbol 0 from 2^16 reads 0x0000, state 2^31,
            // which is not 2^16 at the end.
            check(&[STATE_LOW.to_le_bytes().as_slice(), &[0, 0]].concat(), "final state 2^31");
            // A later tile and a later lane are checked as well.
            let mut noise = Noise(4);
            let symbols: Vec<u8> = (0..600).map(|_| noise.skewed(128)).collect();
            let stored = encode_with_tile_log2(&symbols, Contexts::None, 8);
            let payload_at =
                stored.len() - check_stream(form(), &stored, 600, ContextKind::None).unwrap().payloads.len();
            let third_tile =
                payload_at + (0..2).map(|t| u32_at(&stored[payload_at - 12..], 4 * t) as usize).sum::<usize>();
            let mut bad = stored.clone();
            bad[third_tile + 4 * 5 + 2] = 0;
            bad[third_tile + 4 * 5 + 3] = 0;
            assert_eq!(code(decode(&bad, 600, Contexts::None)), ErrorCode::RansDecode);
        });
    }

    /// Kernels that decode tiles side by side report the first bad tile, as the
    /// scalar kernel does, whichever of the two tiles fails and however.
    #[test]
    fn every_kernel_reports_the_first_bad_tile() {
        for_each_form(|| {
            let mut noise = Noise(9);
            let symbols: Vec<u8> = (0..4 * 4096).map(|_| noise.skewed(100)).collect();
            let stored = encode_with_tile_log2(&symbols, Contexts::None, 12);
            let payload_at =
                stored.len() - check_stream(form(), &stored, symbols.len(), ContextKind::None).unwrap().payloads.len();
            let tile_at = |tile: usize| {
                payload_at + (0..tile).map(|t| u32_at(&stored[payload_at - 16..], 4 * t) as usize).sum::<usize>()
            };
            // A state below 2^16 fails a tile's start; a flipped word its decoding.
            let spoil = |bad: &mut [u8], tile: usize, start: bool| {
                if start {
                    bad[tile_at(tile) + 4 * 7 + 2..][..2].fill(0);
                } else {
                    bad[tile_at(tile) + 4 * 32 + 40] ^= 0x5A;
                }
            };
            for (first, second) in [(0, 1), (1, 2), (0, 3)] {
                for (first_start, second_start) in [(true, true), (false, true), (true, false), (false, false)] {
                    let mut bad = stored.clone();
                    spoil(&mut bad, first, first_start);
                    spoil(&mut bad, second, second_start);
                    let expected =
                        decode_with(form(), &bad, symbols.len(), Contexts::None, &mut Vec::new(), Kernel::Scalar)
                            .unwrap_err()
                            .to_string();
                    assert!(expected.contains(&format!("tile {first}")), "{expected}");
                    for kernel in Kernel::available() {
                        let got = decode_with(form(), &bad, symbols.len(), Contexts::None, &mut Vec::new(), kernel);
                        assert_eq!(got.unwrap_err().to_string(), expected, "{kernel:?}");
                    }
                }
            }
        });
    }

    #[test]
    fn contexts_that_do_not_fit_the_stream_are_refused() {
        let stream = build([1, 2, 2, 8], Some(&[0; 256]), &[HALVES, HALVES], &[4], &131_073u32.to_le_bytes());
        assert_eq!(code(decode(&stream, 1, Contexts::HigherPlane(&[0, 0]))), ErrorCode::InvalidArgument);
        let keyed = build([1, 1, 2, 8], Some(&[0; 256]), &[HALVES, HALVES], &[4], &131_073u32.to_le_bytes());
        for (word_bytes, positions) in [(3usize, None), (0, None), (2, Some(&[][..])), (2, Some(&[0u32, 1][..]))] {
            let contexts = Contexts::BaseKeys { base: &[1, 2, 3], word_bytes, positions };
            assert_eq!(code(decode(&keyed, 1, contexts)), ErrorCode::InvalidArgument);
        }
        // The encoder never fails: missing contexts read as 0.
        let symbols = [1u8, 2, 3, 1, 2, 3];
        let short = [7u8, 7];
        let stored = encode(form(), &symbols, Contexts::HigherPlane(&short));
        assert_eq!(decode(&stored, 6, Contexts::HigherPlane(&[7, 7, 0, 0, 0, 0])).unwrap(), symbols);
        let odd = encode(
            form(),
            &symbols,
            Contexts::BaseKeys { base: &[1, 2, 3, 4, 5, 6, 7], word_bytes: 3, positions: None },
        );
        assert_eq!(context_kind(&odd).unwrap(), ContextKind::BaseKey);
    }

    #[test]
    fn corrupt_payload_bytes_are_detected() {
        for_each_form(|| {
            let mut noise = Noise(31);
            let mut flips = 0usize;
            let mut detected = 0usize;
            for (zeros, contexts_on) in [(230u64, false), (100, true), (0, false)] {
                let symbols: Vec<u8> = (0..3000).map(|_| noise.skewed(zeros)).collect();
                let plane: Vec<u8> = symbols.iter().map(|&s| s >> 5).collect();
                let contexts = if contexts_on { Contexts::HigherPlane(&plane) } else { Contexts::None };
                let stored = encode_with_tile_log2(&symbols, contexts, 10);
                let payload_at = stored.len()
                    - check_stream(form(), &stored, symbols.len(), contexts.kind()).unwrap().payloads.len();
                for at in 0..stored.len() {
                    let mut bad = stored.clone();
                    #[allow(clippy::cast_possible_truncation)]
                    let flip = (noise.next() as u8).max(1);
                    bad[at] ^= flip;
                    // Never a panic, wherever the byte is.
                    let result = decode(&bad, symbols.len(), contexts);
                    if at >= payload_at {
                        flips += 1;
                        detected += usize::from(result.is_err());
                    }
                }
            }
            assert!(detected * 100 > flips * 99, "{detected} of {flips} payload flips detected");
        });
    }

    /// Every vector kernel the CPU has decodes every stream as the scalar one does:
    /// the same symbols, or the same error, corrupt streams included.
    #[test]
    fn vector_kernels_agree_with_scalar() {
        let kernels = Kernel::available();
        println!("vector kernels on this CPU: {:?}", &kernels[1..]);
        for kernel in kernels.into_iter().skip(1) {
            for_each_form(|| vector_kernel_agrees_with_scalar(kernel));
        }
    }

    fn vector_kernel_agrees_with_scalar(kernel: Kernel) {
        {
            let mut noise = Noise(0xC0FFEE);
            for case in 0..84u64 {
                let len = usize::try_from(noise.next() % 20_000).unwrap() + 1;
                let zeros = noise.next() % 256;
                let symbols: Vec<u8> = (0..len).map(|_| noise.skewed(zeros)).collect();
                let plane: Vec<u8> =
                    symbols.iter().map(|&s| s.wrapping_add(u8::try_from(noise.next() % 3).unwrap()) >> 3).collect();
                let base = noise.bytes(len);
                let positions: Vec<u32> = (0..len).map(|i| u32::try_from(i).unwrap() / 2).collect();
                // Dense keys of every width, with a base that ends before the stream.
                let contexts = match case % 7 {
                    0 => Contexts::None,
                    1 => Contexts::HigherPlane(&plane),
                    2 => Contexts::BaseKeys { base: &base, word_bytes: 2, positions: None },
                    3 => Contexts::BaseKeys { base: &base, word_bytes: 1, positions: None },
                    4 => Contexts::BaseKeys { base: &base, word_bytes: 4, positions: None },
                    5 => Contexts::BaseKeys { base: &base, word_bytes: 8, positions: None },
                    _ => Contexts::BaseKeys { base: &base, word_bytes: 1, positions: Some(&positions) },
                };
                let tile_log2 = 8 + u32::try_from(noise.next() % 7).unwrap();
                let stored = encode_with_tile_log2(&symbols, contexts, tile_log2);
                let mut bad = stored.clone();
                for _ in 0..1 + noise.next() % 3 {
                    let at = usize::try_from(noise.next()).unwrap() % bad.len();
                    bad[at] ^= u8::try_from(noise.next() % 255).unwrap() + 1;
                }
                for stream in [&stored, &bad] {
                    let (mut scalar, mut vector) = (Vec::new(), Vec::new());
                    let expected = decode_with(form(), stream, len, contexts, &mut scalar, Kernel::Scalar)
                        .map_err(|e| e.to_string());
                    let got =
                        decode_with(form(), stream, len, contexts, &mut vector, kernel).map_err(|e| e.to_string());
                    assert_eq!(got, expected, "case {case}");
                    assert_eq!(vector, scalar, "case {case}");
                }
                // A reused buffer, longer than the stream and full of other bytes.
                let mut decoded = vec![0xA5; len + 7];
                decode_with(form(), &stored, len, contexts, &mut decoded, kernel).unwrap();
                assert_eq!(decoded, symbols);
            }
        }
    }

    fn contexts_strategy() -> impl Strategy<Value = (Vec<u8>, u8, Vec<u8>, usize, u32)> {
        (
            prop::collection::vec(prop_oneof![3 => Just(0u8), 1 => any::<u8>(), 2 => 0u8..4], 0..2500),
            0u8..4,
            prop::collection::vec(any::<u8>(), 0..3000),
            prop::sample::select(vec![1usize, 2, 4, 8]),
            8u32..12,
        )
    }

    proptest! {
        #[test]
        fn round_trips_random_streams(
            (symbols, kind, base, word_bytes, tile_log2) in contexts_strategy(),
            packed in any::<bool>(),
        ) {
            FORM.with(|form| form.set(if packed { TableForm::Packed } else { TableForm::Bytes }));
            let plane: Vec<u8> =
                symbols.iter().enumerate().map(|(i, &s)| (s >> 1) ^ (base.get(i).copied().unwrap_or(0) & 3)).collect();
            let positions: Vec<u32> = (0..symbols.len())
                .map(|i| u32::try_from(i * 2 + usize::from(base.get(i).copied().unwrap_or(0) & 1)).unwrap())
                .collect();
            let contexts = match kind {
                0 => Contexts::None,
                1 => Contexts::HigherPlane(&plane),
                2 => Contexts::BaseKeys { base: &base, word_bytes, positions: None },
                _ => Contexts::BaseKeys { base: &base, word_bytes, positions: Some(&positions) },
            };
            let stored = encode(form(), &symbols, contexts);
            prop_assert_eq!(decode(&stored, symbols.len(), contexts).unwrap(), symbols.clone());
            let tiled = encode_with_tile_log2(&symbols, contexts, tile_log2);
            prop_assert_eq!(decode(&tiled, symbols.len(), contexts).unwrap(), symbols);
        }

        /// Any bytes after a valid fixed header decode or fail, and never panic.
        #[test]
        fn arbitrary_streams_never_panic(
            prob_bits in 1u8..=11,
            tile_log2 in 8u8..=10,
            table_count in 1u8..=3,
            rest in prop::collection::vec(any::<u8>(), 0..600),
            len in 0usize..2000,
            packed in any::<bool>(),
        ) {
            FORM.with(|form| form.set(if packed { TableForm::Packed } else { TableForm::Bytes }));
            let kind = if table_count == 1 { 0 } else { 2 };
            let stream: Vec<u8> = [prob_bits, kind, table_count, tile_log2].into_iter().chain(rest).collect();
            let plane = vec![7u8; len];
            let contexts = if kind == 0 { Contexts::None } else { Contexts::HigherPlane(&plane) };
            let mut out = Vec::new();
            for kernel in Kernel::available() {
                let _ = decode_with(form(), &stream, len, contexts, &mut out, kernel);
            }
        }
    }
}
