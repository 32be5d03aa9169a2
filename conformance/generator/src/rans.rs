//! Lane rANS streams (spec §8.7), written from the spec independently of the
//! library's codec. A stream is plain data (header fields, tables, tile payloads)
//! until [`Stream::to_bytes`], so that a case can change exactly one field of a
//! valid stream and keep the rest consistent. The encoder is the one that §15.10
//! describes; [`Stream::decode`] is the decoder of §8.7, used to check every stream
//! the generator writes and to find faults that only the final-state check catches.
//! A stream is written as codec 2, or as codec 4 with its context map and tables
//! packed (spec §8.9); the two differ in nothing else.

/// The lower bound of a lane's state, and its final state.
pub const L: u32 = 1 << 16;
/// Lanes per tile.
pub const LANES: usize = 32;
/// The largest Exp-Golomb order of a packed table (spec Table 8.8).
pub const MAX_ORDER: u8 = 11;

/// The context of a stream (spec §8.7, the `context` byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ctx {
    /// 0: no context, one table.
    None,
    /// 1: the base key of the value's base word.
    BaseKey,
    /// 2: the byte of the next more significant plane.
    HigherPlane,
}

impl Ctx {
    /// The context byte.
    pub const fn id(self) -> u8 {
        match self {
            Ctx::None => 0,
            Ctx::BaseKey => 1,
            Ctx::HigherPlane => 2,
        }
    }
}

/// One frequency table (spec Table 8.7, or Table 8.8 when packed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    /// The symbols, in increasing order (a fault may break the order).
    pub symbols: Vec<u8>,
    /// One frequency per symbol.
    pub freqs: Vec<u32>,
    /// The index of a frequency to write in the two-byte form whatever its value.
    pub long_form: Option<usize>,
    /// A symbol whose bit is set in the bitmap form although it is not listed.
    pub extra_bit: Option<u8>,
    /// The Exp-Golomb order of the packed form, whatever [`Table::best_order`] says.
    pub order: Option<u8>,
    /// The last padding bit of the packed form's frequency codes set.
    pub dirty_padding: bool,
    /// Frequencies that the packed form codes instead of `freqs`; they may lie
    /// outside `[1, 2^k]`.
    pub packed_freqs: Option<Vec<i64>>,
}

/// Bits into bytes, bit `j` in bit `j mod 8` of byte `j / 8`, the last byte padded
/// with zeros (spec §8.9, bit strings).
pub fn pack_bits(bits: &[bool]) -> Vec<u8> {
    bits.chunks(8).map(|byte| byte.iter().rev().fold(0u8, |acc, &bit| (acc << 1) | u8::from(bit))).collect()
}

/// `ceil(log2 tables)`: the bits of an entry of a packed context map (spec §8.9).
pub fn map_entry_bits(tables: usize) -> u32 {
    usize::BITS - (tables - 1).leading_zeros()
}

/// A context map in the packed form (spec §8.9): 256 entries of
/// [`map_entry_bits`] bits, least significant bit first.
pub fn packed_map(map: &[u8], tables: usize) -> Vec<u8> {
    let width = map_entry_bits(tables);
    let bits: Vec<bool> = map
        .iter()
        .flat_map(|&entry| {
            assert!(u32::from(entry) < 1 << width, "entry {entry} does not fit {width} bits");
            (0..width).map(move |b| (entry >> b) & 1 == 1)
        })
        .collect();
    pack_bits(&bits)
}

impl Table {
    /// A table of `symbols` with `freqs`.
    pub fn new(symbols: Vec<u8>, freqs: Vec<u32>) -> Self {
        Self { symbols, freqs, long_form: None, extra_bit: None, order: None, dirty_padding: false, packed_freqs: None }
    }

    /// The table of one symbol, certain: frequency `2^k`.
    pub fn certain(symbol: u8, prob_bits: u8) -> Self {
        Self::new(vec![symbol], vec![1 << prob_bits])
    }

    /// Frequencies summing to `2^k` from symbol counts: each occurring symbol gets
    /// at least 1, the rest in proportion; a table without any symbol is
    /// [`Table::certain`] of 0.
    pub fn quantize(counts: &[u64; 256], prob_bits: u8) -> Self {
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return Self::certain(0, prob_bits);
        }
        let slots = 1u64 << prob_bits;
        let symbols: Vec<u8> = (0..=255u8).filter(|&s| counts[usize::from(s)] > 0).collect();
        assert!(symbols.len() as u64 <= slots, "{} symbols do not fit 2^{prob_bits} slots", symbols.len());
        let mut freqs: Vec<u64> =
            symbols.iter().map(|&s| ((counts[usize::from(s)] * slots + total / 2) / total).max(1)).collect();
        // Give or take slots, largest counts first, never below 1.
        let mut order: Vec<usize> = (0..symbols.len()).collect();
        order.sort_by_key(|&i| (std::cmp::Reverse(counts[usize::from(symbols[i])]), i));
        let mut sum: u64 = freqs.iter().sum();
        while sum < slots {
            freqs[order[0]] += 1;
            sum += 1;
        }
        while sum > slots {
            let i = *order.iter().filter(|&&i| freqs[i] > 1).max_by_key(|&&i| freqs[i]).expect("a frequency above 1");
            freqs[i] -= 1;
            sum -= 1;
        }
        Self::new(symbols, freqs.into_iter().map(|f| u32::try_from(f).expect("at most 2^11")).collect())
    }

    /// The symbol set's bitmap form (Table 8.7).
    fn bitmap(&self) -> [u8; 32] {
        let mut bitmap = [0u8; 32];
        for &x in self.symbols.iter().chain(&self.extra_bit) {
            bitmap[usize::from(x / 8)] |= 1 << (x % 8);
        }
        bitmap
    }

    /// The table's bytes (spec Table 8.7).
    pub fn write(&self, out: &mut Vec<u8>) {
        let s = self.symbols.len();
        out.push(u8::try_from(s - 1).expect("1 to 256 symbols"));
        if s < 32 {
            out.extend_from_slice(&self.symbols);
        } else {
            out.extend_from_slice(&self.bitmap());
        }
        for (i, &f) in self.freqs.iter().enumerate() {
            if f < 128 && self.long_form != Some(i) {
                out.push(u8::try_from(f).expect("checked"));
            } else {
                out.push(0x80 | u8::try_from(f >> 8).expect("at most 2^11"));
                out.push((f & 0xff) as u8);
            }
        }
    }

    /// The code values `zigzag(f_i − f_(i−1))`, with `f_(−1) = 0` (spec §8.9).
    fn code_values(&self) -> Vec<u32> {
        let freqs = self.packed_freqs.clone().unwrap_or_else(|| self.freqs.iter().map(|&f| i64::from(f)).collect());
        let mut previous = 0;
        freqs
            .iter()
            .map(|&f| {
                let difference = f - previous;
                previous = f;
                let value = if difference >= 0 { 2 * difference } else { -2 * difference - 1 };
                u32::try_from(value).expect("a small code value")
            })
            .collect()
    }

    /// The frequency codes as Exp-Golomb codes of order `g` = `order`, before
    /// padding (spec §8.9): with `w = v + 2^g` and `n = floor(log2 w) − g` for each
    /// code value `v`, every prefix (`n` ones, then a zero), then every suffix (the
    /// low `n + g` bits of `w`, least significant first).
    pub fn frequency_code_bits(&self, order: u8) -> Vec<bool> {
        let mut prefixes = Vec::new();
        let mut suffixes = Vec::new();
        for v in self.code_values() {
            let w = v + (1 << order);
            let n = w.ilog2() - u32::from(order);
            prefixes.extend(std::iter::repeat_n(true, n as usize));
            prefixes.push(false);
            suffixes.extend((0..n + u32::from(order)).map(|b| (w >> b) & 1 == 1));
        }
        prefixes.extend(suffixes);
        prefixes
    }

    /// The order whose frequency codes are shortest, the smallest of equals (spec
    /// §15.12: the writer makes each table smallest).
    pub fn best_order(&self) -> u8 {
        (0..=MAX_ORDER).min_by_key(|&order| self.frequency_code_bits(order).len()).expect("twelve orders")
    }

    /// The table's bytes in the packed form (spec §8.9, Table 8.8): no symbol set for
    /// 256 symbols, and the frequencies Exp-Golomb-coded with [`Table::best_order`]
    /// unless [`Table::order`] says otherwise.
    pub fn write_packed(&self, out: &mut Vec<u8>) {
        let s = self.symbols.len();
        out.push(u8::try_from(s - 1).expect("1 to 256 symbols"));
        if s < 32 {
            out.extend_from_slice(&self.symbols);
        } else if s < 256 {
            out.extend_from_slice(&self.bitmap());
        }
        let order = self.order.unwrap_or_else(|| self.best_order());
        out.push(order);
        let bits = self.frequency_code_bits(order);
        let mut codes = pack_bits(&bits);
        if self.dirty_padding {
            assert!(!bits.len().is_multiple_of(8), "the frequency codes have no padding");
            *codes.last_mut().expect("at least one bit") |= 0x80;
        }
        out.extend_from_slice(&codes);
    }

    /// Frequency and cumulative frequency of `symbol`, if listed.
    fn slot(&self, symbol: u8) -> Option<(u32, u32)> {
        let i = self.symbols.iter().position(|&x| x == symbol)?;
        Some((self.freqs[i], self.freqs[..i].iter().sum()))
    }

    /// The symbol, frequency and cumulative frequency of slot `r`.
    fn lookup(&self, r: u32) -> (u8, u32, u32) {
        let mut cum = 0;
        for (&x, &f) in self.symbols.iter().zip(&self.freqs) {
            if r < cum + f {
                return (x, f, cum);
            }
            cum += f;
        }
        panic!("slot {r} past the table")
    }
}

/// How a stream is encoded.
#[derive(Debug, Clone, Copy)]
pub struct Params {
    /// `prob_bits` `k`, 1 to 11.
    pub prob_bits: u8,
    /// `tile_log2`, 8 to 24.
    pub tile_log2: u8,
    /// At most this many tables (2 to 8) for a context other than none.
    pub max_tables: usize,
}

impl Default for Params {
    fn default() -> Self {
        Self { prob_bits: 11, tile_log2: 12, max_tables: 8 }
    }
}

/// Why a stream does not decode (spec §8.7, `E_RANS_DECODE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fail {
    /// An initial state below `L`.
    InitialState,
    /// A word would be read at or past the tile's end.
    Truncated,
    /// Words left over after the tile's last symbol.
    LeftOver,
    /// A final state other than `L`.
    FinalState,
}

/// A lane rANS stream as data.
#[derive(Debug, Clone)]
pub struct Stream {
    /// `prob_bits`.
    pub prob_bits: u8,
    /// The `context` byte.
    pub context: u8,
    /// `tile_log2`.
    pub tile_log2: u8,
    /// The context map (256 entries) when there is more than one table.
    pub map: Option<Vec<u8>>,
    /// The tables, table 0 first.
    pub tables: Vec<Table>,
    /// Each tile's payload: initial states, then renormalisation words.
    pub tiles: Vec<Vec<u8>>,
    /// Codec 4: the context map and tables in the packed form (spec §8.9).
    pub packed: bool,
}

/// A context map that sends every context byte to table 0.
pub fn flat_map() -> Vec<u8> {
    vec![0; 256]
}

/// Context bytes clustered into at most `max_tables` tables, the most frequent
/// bytes first (spec §15.9); at least 2 tables. Returns the map and the count.
pub fn cluster(contexts: &[u8], max_tables: usize) -> (Vec<u8>, usize) {
    let mut counts = [0u64; 256];
    for &c in contexts {
        counts[usize::from(c)] += 1;
    }
    let mut used: Vec<u8> = (0..=255u8).filter(|&c| counts[usize::from(c)] > 0).collect();
    used.sort_by_key(|&c| (std::cmp::Reverse(counts[usize::from(c)]), c));
    let mut map = flat_map();
    let tables = if used.len() <= max_tables {
        for (t, &c) in used.iter().enumerate() {
            map[usize::from(c)] = u8::try_from(t).expect("at most 8");
        }
        used.len().max(2)
    } else {
        for (t, &c) in used.iter().enumerate() {
            map[usize::from(c)] = u8::try_from(t.min(max_tables - 1)).expect("at most 8");
        }
        max_tables
    };
    (map, tables)
}

impl Stream {
    /// Encodes `symbols` under context byte `context`, with `contexts[i]` the
    /// context byte of symbol `i` (ignored for one table). Tables are quantized from
    /// the symbols; with a context other than none, `map` (or a clustering of the
    /// context bytes) picks each symbol's table.
    pub fn encode(symbols: &[u8], context: Ctx, contexts: &[u8], params: Params) -> Self {
        let map = match context {
            Ctx::None => None,
            _ => Some(cluster(contexts, params.max_tables)),
        };
        Self::encode_with_map(symbols, context.id(), contexts, map, params)
    }

    /// Encodes with an explicit context byte, map and table count: `None` is one
    /// table. Faults use it to write a context where it is not allowed, or several
    /// tables for context 0.
    pub fn encode_with_map(
        symbols: &[u8],
        context: u8,
        contexts: &[u8],
        map: Option<(Vec<u8>, usize)>,
        params: Params,
    ) -> Self {
        let table_count = map.as_ref().map_or(1, |(_, t)| *t);
        let table_of = |i: usize| map.as_ref().map_or(0, |(m, _)| usize::from(m[usize::from(contexts[i])]));
        let mut counts = vec![[0u64; 256]; table_count];
        for (i, &s) in symbols.iter().enumerate() {
            counts[table_of(i)][usize::from(s)] += 1;
        }
        let tables = counts.iter().map(|c| Table::quantize(c, params.prob_bits)).collect();
        let mut stream = Self {
            prob_bits: params.prob_bits,
            context,
            tile_log2: params.tile_log2,
            map: map.map(|(m, _)| m),
            tables,
            tiles: Vec::new(),
            packed: false,
        };
        stream.reencode(symbols, contexts);
        stream
    }

    /// The same stream as codec 4, its context map and tables packed (spec §8.9).
    #[must_use]
    pub fn into_packed(mut self) -> Self {
        self.packed = true;
        self
    }

    /// The context map as written: 256 bytes, packed, or nothing for one table.
    fn map_bytes(&self) -> Vec<u8> {
        match &self.map {
            Some(map) if self.packed => packed_map(map, self.tables.len()),
            Some(map) => map.clone(),
            None => Vec::new(),
        }
    }

    /// Table `table` as written, in the stream's form.
    fn write_table(&self, table: &Table, out: &mut Vec<u8>) {
        if self.packed {
            table.write_packed(out);
        } else {
            table.write(out);
        }
    }

    /// The table of symbol `i`.
    fn table(&self, contexts: &[u8], i: usize) -> &Table {
        match &self.map {
            Some(map) => &self.tables[usize::from(map[usize::from(contexts[i])])],
            None => &self.tables[0],
        }
    }

    /// Replaces the tiles with an encoding of `symbols` under the stream's tables,
    /// which must list every symbol in its context (spec §15.10: steps from last to
    /// first, lanes from 31 down to 0, states starting at `L`, words emitted in
    /// reverse).
    #[allow(clippy::many_single_char_names)] // the names of spec §8.7
    pub fn reencode(&mut self, symbols: &[u8], contexts: &[u8]) {
        let k = u32::from(self.prob_bits);
        let tile = 1usize << self.tile_log2;
        self.tiles = (0..symbols.len().div_ceil(tile))
            .map(|t| {
                let start = t * tile;
                let n = tile.min(symbols.len() - start);
                let lanes = LANES.min(n);
                let mut x = vec![u64::from(L); lanes];
                let mut words: Vec<u16> = Vec::new();
                for step in (0..n.div_ceil(LANES)).rev() {
                    for l in (0..lanes).rev() {
                        let j = LANES * step + l;
                        if j >= n {
                            continue;
                        }
                        let i = start + j;
                        let (f, cum) = self.table(contexts, i).slot(symbols[i]).expect("every symbol is in its table");
                        let (f, cum) = (u64::from(f), u64::from(cum));
                        while x[l] >= f << (32 - k) {
                            words.push((x[l] & 0xffff) as u16);
                            x[l] >>= 16;
                        }
                        x[l] = ((x[l] / f) << k) + x[l] % f + cum;
                    }
                }
                words.reverse();
                let mut payload: Vec<u8> =
                    x.iter().flat_map(|&s| u32::try_from(s).expect("below 2^32").to_le_bytes()).collect();
                payload.extend(words.iter().flat_map(|w| w.to_le_bytes()));
                payload
            })
            .collect();
    }

    /// The tile lengths as written.
    pub fn tile_lens(&self) -> Vec<u32> {
        self.tiles.iter().map(|t| u32::try_from(t.len()).expect("small")).collect()
    }

    /// The header: everything before the tile payloads, with these tile lengths.
    pub fn header_bytes(&self, tile_lens: &[u32]) -> Vec<u8> {
        let mut out =
            vec![self.prob_bits, self.context, u8::try_from(self.tables.len()).expect("small"), self.tile_log2];
        out.extend_from_slice(&self.map_bytes());
        for table in &self.tables {
            self.write_table(table, &mut out);
        }
        for len in tile_lens {
            out.extend_from_slice(&len.to_le_bytes());
        }
        out
    }

    /// The stream's bytes (spec Table 8.6).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = self.header_bytes(&self.tile_lens());
        for tile in &self.tiles {
            out.extend_from_slice(tile);
        }
        out
    }

    /// Where tile `t`'s length is written in [`Stream::to_bytes`].
    pub fn tile_len_offset(&self, t: usize) -> usize {
        self.header_bytes(&[]).len() + 4 * t
    }

    /// Where table `t` starts in [`Stream::to_bytes`].
    pub fn table_offset(&self, t: usize) -> usize {
        let mut out = Vec::new();
        for table in &self.tables[..t] {
            self.write_table(table, &mut out);
        }
        4 + self.map_bytes().len() + out.len()
    }

    /// Decodes `n` symbols as spec §8.7 says, from the stream's tables and tiles
    /// (its header is taken as valid).
    #[allow(clippy::many_single_char_names)] // the names of spec §8.7
    pub fn decode(&self, n: usize, contexts: &[u8]) -> Result<Vec<u8>, Fail> {
        let k = u32::from(self.prob_bits);
        let mask = (1u32 << k) - 1;
        let tile = 1usize << self.tile_log2;
        let mut out = vec![0u8; n];
        for (t, payload) in self.tiles.iter().enumerate() {
            let start = t * tile;
            let n_t = tile.min(n - start);
            let lanes = LANES.min(n_t);
            let u32_at = |at: usize| u32::from_le_bytes(payload[at..at + 4].try_into().expect("4 bytes"));
            let mut x: Vec<u32> = (0..lanes).map(|l| u32_at(4 * l)).collect();
            if x.iter().any(|&s| s < L) {
                return Err(Fail::InitialState);
            }
            let mut r = 4 * lanes;
            for step in 0..n_t.div_ceil(LANES) {
                for (l, state) in x.iter_mut().enumerate() {
                    let j = LANES * step + l;
                    if j >= n_t {
                        break;
                    }
                    let i = start + j;
                    let slot = *state & mask;
                    let (sym, f, cum) = self.table(contexts, i).lookup(slot);
                    out[i] = sym;
                    *state = f * (*state >> k) + slot - cum;
                    if *state < L {
                        if r + 2 > payload.len() {
                            return Err(Fail::Truncated);
                        }
                        *state = (*state << 16) | u32::from(u16::from_le_bytes([payload[r], payload[r + 1]]));
                        r += 2;
                    }
                }
            }
            if r != payload.len() {
                return Err(Fail::LeftOver);
            }
            if x.iter().any(|&s| s != L) {
                return Err(Fail::FinalState);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(len: usize, seed: u64) -> Vec<u8> {
        let mut state = seed;
        (0..len)
            .map(|_| {
                state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                (state >> 59) as u8
            })
            .collect()
    }

    #[test]
    fn streams_decode_to_their_symbols() {
        for (len, tile_log2, prob_bits) in [(1, 8, 11), (31, 8, 5), (257, 8, 11), (1000, 8, 8), (5000, 12, 11)] {
            let symbols = bytes(len, 1);
            let contexts = bytes(len, 2);
            for ctx in [Ctx::None, Ctx::BaseKey, Ctx::HigherPlane] {
                for max_tables in [2, 3, 8] {
                    let params = Params { prob_bits, tile_log2, max_tables };
                    let stream = Stream::encode(&symbols, ctx, &contexts, params);
                    assert_eq!(stream.tiles.len(), len.div_ceil(1 << tile_log2));
                    assert_eq!(stream.decode(len, &contexts), Ok(symbols.clone()), "{len} {ctx:?} {max_tables}");
                }
            }
        }
    }

    #[test]
    fn a_certain_symbol_costs_only_the_states() {
        let stream = Stream::encode(&[9; 100], Ctx::None, &[], Params::default());
        assert_eq!(stream.tables, vec![Table::certain(9, 11)]);
        assert_eq!(stream.tile_lens(), vec![4 * 32]);
        assert!(stream.tiles[0].chunks(4).all(|s| s == L.to_le_bytes()));
        // One symbol, frequency 2^11 in the two-byte form.
        assert_eq!(&stream.to_bytes()[..8], &[11, 0, 1, 12, 0, 9, 0x88, 0x00]);
    }

    /// Reads a packed table (spec Table 8.8) at the start of `bytes`, assumed valid:
    /// its symbols, its frequencies and its length.
    fn read_packed(bytes: &[u8]) -> (Vec<u8>, Vec<u32>, usize) {
        let s = usize::from(bytes[0]) + 1;
        let (symbols, mut at): (Vec<u8>, usize) = match s {
            ..32 => (bytes[1..=s].to_vec(), 1 + s),
            32..256 => ((0..=255u8).filter(|&x| bytes[1 + usize::from(x / 8)] >> (x % 8) & 1 == 1).collect(), 33),
            _ => ((0..=255).collect(), 1),
        };
        let order = u32::from(bytes[at]);
        at += 1;
        let bit = |j: usize| u32::from(bytes[at + j / 8] >> (j % 8) & 1);
        let mut j = 0;
        let mut prefixes = Vec::new();
        while prefixes.len() < s {
            let mut n = 0;
            while bit(j) == 1 {
                n += 1;
                j += 1;
            }
            j += 1;
            prefixes.push(n);
        }
        let mut previous = 0i64;
        let freqs = prefixes
            .iter()
            .map(|&n| {
                let suffix: u32 = (0..n + order).map(|b| bit(j + b as usize) << b).sum();
                j += (n + order) as usize;
                let v = i64::from((1 << (n + order)) + suffix - (1 << order));
                previous += if v % 2 == 0 { v / 2 } else { -(v + 1) / 2 };
                u32::try_from(previous).expect("in range")
            })
            .collect();
        (symbols, freqs, at + j.div_ceil(8))
    }

    #[test]
    fn packed_tables_read_back() {
        let every: Vec<u8> = (0..=255).collect();
        let spread: Vec<u32> = (0..32).map(|i| if i % 2 == 0 { 120 } else { 8 }).collect();
        let tables = [
            Table::certain(9, 11),
            Table::new(vec![0x41, 0x42], vec![3, 5]),
            Table::new(every.clone(), vec![8; 256]),
            Table::new(every[..40].to_vec(), (0..40).map(|i| if i < 8 { 156 } else { 25 }).collect()),
            Table::new((0..32).map(|i| i * 8).collect(), spread),
        ];
        for table in tables {
            for order in [None, Some(0), Some(5), Some(MAX_ORDER)] {
                let mut out = Vec::new();
                Table { order, ..table.clone() }.write_packed(&mut out);
                out.push(0xff);
                let expected = (table.symbols.clone(), table.freqs.clone(), out.len() - 1);
                assert_eq!(read_packed(&out), expected, "{order:?}");
            }
        }
    }

    #[test]
    fn the_best_order_is_the_shortest() {
        // One certain symbol: v = 2^12; order 11 gives w = 6144, n = 1: prefix 10,
        // then 12 suffix bits of which only the last is set.
        let certain = Table::certain(9, 11);
        assert_eq!(certain.best_order(), 11);
        let mut out = Vec::new();
        certain.write_packed(&mut out);
        assert_eq!(out, [0, 9, 11, 0b01, 0b10_0000]);
        // Equal frequencies: one code value, then zeros.
        let flat = Table::new((0..=255).collect(), vec![8; 256]);
        assert_eq!(flat.best_order(), 0);
        // k = 3, {A: 3, B: 5}: code values 6 and 4; order 3 gives w = 14 and 12, n = 0.
        let two = Table::new(vec![0x41, 0x42], vec![3, 5]);
        assert_eq!(two.best_order(), 3);
        let mut out = Vec::new();
        two.write_packed(&mut out);
        assert_eq!(out, [1, 0x41, 0x42, 3, 0b1001_1000]);
    }

    #[test]
    fn packed_maps_take_the_bits_their_table_count_needs() {
        let map: Vec<u8> = (0..=255u8).map(|x| x % 5).collect();
        for (tables, width) in [(2, 1), (3, 2), (4, 2), (5, 3), (8, 3)] {
            assert_eq!(map_entry_bits(tables), width);
            let entries: Vec<u8> = map.iter().map(|&e| e % u8::try_from(tables).expect("small")).collect();
            let packed = packed_map(&entries, tables);
            assert_eq!(packed.len(), 32 * width as usize);
            for (x, &e) in entries.iter().enumerate() {
                let read: u32 = (0..width as usize)
                    .map(|b| u32::from(packed[(width as usize * x + b) / 8] >> ((width as usize * x + b) % 8) & 1) << b)
                    .sum();
                assert_eq!(read, u32::from(e), "{tables} tables, context byte {x}");
            }
        }
    }

    #[test]
    fn packed_streams_differ_only_in_their_header() {
        let symbols = bytes(700, 3);
        let contexts = bytes(700, 4);
        let stream =
            Stream::encode(&symbols, Ctx::HigherPlane, &contexts, Params { max_tables: 3, ..Params::default() });
        let packed = stream.clone().into_packed();
        assert_eq!(packed.decode(700, &contexts), Ok(symbols));
        let (plain, small) = (stream.to_bytes(), packed.to_bytes());
        assert!(small.len() < plain.len());
        assert_eq!(
            plain[plain.len() - stream.tiles.iter().map(Vec::len).sum::<usize>()..],
            small[small.len() - packed.tiles.iter().map(Vec::len).sum::<usize>()..]
        );
        assert_eq!(packed.table_offset(0), 4 + 64);
        let mut table0 = Vec::new();
        packed.tables[0].write_packed(&mut table0);
        assert_eq!(small[packed.table_offset(0)..packed.table_offset(1)], table0);
    }

    #[test]
    fn frequencies_take_the_form_their_value_needs() {
        let mut out = Vec::new();
        Table::new(vec![1, 2], vec![127, 1921]).write(&mut out);
        assert_eq!(out, [1, 1, 2, 127, 0x87, 0x81]);
        let mut out = Vec::new();
        let every: Vec<u8> = (0..=255).collect();
        Table::new(every, vec![8; 256]).write(&mut out);
        assert_eq!(out.len(), 1 + 32 + 256);
        assert!(out[1..33].iter().all(|&b| b == 0xff));
    }
}
