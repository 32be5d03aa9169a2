//! Lane rANS streams (spec §8.7), written from the spec independently of the
//! library's codec. A stream is plain data (header fields, tables, tile payloads)
//! until [`Stream::to_bytes`], so that a case can change exactly one field of a
//! valid stream and keep the rest consistent. The encoder is the one that §15.10
//! describes; [`Stream::decode`] is the decoder of §8.7, used to check every stream
//! the generator writes and to find faults that only the final-state check catches.

/// The lower bound of a lane's state, and its final state.
pub const L: u32 = 1 << 16;
/// Lanes per tile.
pub const LANES: usize = 32;

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

/// One frequency table (spec Table 8.7).
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
}

impl Table {
    /// A table of `symbols` with `freqs`.
    pub fn new(symbols: Vec<u8>, freqs: Vec<u32>) -> Self {
        Self { symbols, freqs, long_form: None, extra_bit: None }
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

    /// The table's bytes (spec Table 8.7).
    pub fn write(&self, out: &mut Vec<u8>) {
        let s = self.symbols.len();
        out.push(u8::try_from(s - 1).expect("1 to 256 symbols"));
        if s < 32 {
            out.extend_from_slice(&self.symbols);
        } else {
            let mut bitmap = [0u8; 32];
            for &x in self.symbols.iter().chain(&self.extra_bit) {
                bitmap[usize::from(x / 8)] |= 1 << (x % 8);
            }
            out.extend_from_slice(&bitmap);
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
        };
        stream.reencode(symbols, contexts);
        stream
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
        if let Some(map) = &self.map {
            out.extend_from_slice(map);
        }
        for table in &self.tables {
            table.write(&mut out);
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
            table.write(&mut out);
        }
        4 + self.map.as_ref().map_or(0, Vec::len) + out.len()
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
