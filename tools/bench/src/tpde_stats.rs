//! What a tpde delta spends on positions, read from its chunk and stream
//! tables as spec/FORMAT.md lays them out. Only the tables are read, not the
//! data. If the file does not parse (the draft format moved on), the report
//! says so instead of printing a number.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use anyhow::{ensure, Context, Result};

/// Position cost of the sparse chunks of a tpde delta.
#[derive(Clone, Copy, Debug, Default)]
pub struct PositionCost {
    /// Changed words in sparse chunks.
    pub sparse_changed: u64,
    /// Stored bytes of their position streams.
    pub position_bytes: u64,
    /// Changed words over all chunks.
    pub changed: u64,
}

const MAGIC: &[u8; 8] = b"\x89TPDE\r\n\x1a";
const ENCODING_SPARSE: u8 = 1;

/// Reads the position cost of the delta at `path`.
pub fn position_cost(path: &Path) -> Result<PositionCost> {
    let mut f = File::open(path).with_context(|| format!("open {}", path.display()))?;
    let mut pre = [0u8; 128];
    f.read_exact(&mut pre).context("preamble")?;
    ensure!(&pre[..8] == MAGIC, "not a tpde file (magic)");
    let field = |off: usize| u64::from_le_bytes(pre[off..off + 8].try_into().unwrap_or([0; 8]));
    let (data_len, header_len) = (field(32), field(40));
    let (chunk_count, stream_count) = (field(48), field(56));
    let header_offset = align64(128 + data_len);
    let table_offset = align64(header_offset + header_len);
    let table_len = usize::try_from(64 * chunk_count + 16 * stream_count)?;
    ensure!(table_offset + table_len as u64 + 16 == f.metadata()?.len(), "table layout does not match the file length");
    f.seek(SeekFrom::Start(table_offset))?;
    let mut tables = vec![0u8; table_len];
    f.read_exact(&mut tables)?;
    let (chunks, streams) = tables.split_at(usize::try_from(64 * chunk_count)?);

    let mut cost = PositionCost::default();
    for c in chunks.chunks_exact(64) {
        let changed = u64::from(u32::from_le_bytes(c[12..16].try_into()?));
        cost.changed += changed;
        if c[20] != ENCODING_SPARSE {
            continue;
        }
        let first = usize::try_from(u32::from_le_bytes(c[16..20].try_into()?))?;
        let position_streams = match c[23] {
            1 => usize::from(c[24]), // gaps: one byte plane per gap byte
            2 => 1,                  // bitmap
            _ => 0,
        };
        cost.sparse_changed += changed;
        for s in first..first + position_streams {
            let rec = streams.get(s * 16..s * 16 + 16).context("stream index out of range")?;
            cost.position_bytes += u64::from(u32::from_le_bytes(rec[0..4].try_into()?));
        }
    }
    Ok(cost)
}

fn align64(x: u64) -> u64 {
    x.div_ceil(64) * 64
}
