//! Recomputes every checksum of a (mutated) delta file that its counts allow: chunk
//! checksums, header and table checksums, the trailer's length and the preamble
//! checksum. Random mutations then get past the checksums and reach the checks
//! behind them. Shared by the `decode` fuzz target and the mutation property test.

use xxhash_rust::xxh3::xxh3_64;

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

/// Reseals `bytes` in place; does nothing to files shorter than preamble + trailer.
pub fn reseal(bytes: &mut [u8]) {
    if bytes.len() < 144 {
        return;
    }
    let (data_len, header_len, chunks, streams) =
        (u64_at(bytes, 32), u64_at(bytes, 40), u64_at(bytes, 48), u64_at(bytes, 56));
    let layout = tpde::format::Layout::from_counts(data_len, header_len, chunks, streams)
        .filter(|layout| layout.file_len == bytes.len() as u64);
    if let Some(layout) = layout {
        // Every region lies inside the file: its length matched.
        let index = |v: u64| usize::try_from(v).expect("inside the file");
        let table = index(layout.table_offset);
        for c in 0..index(chunks) {
            let record = table + 64 * c;
            let offset = u64_at(bytes, record);
            let len = u64::from(u32::from_le_bytes(bytes[record + 8..record + 12].try_into().expect("4 bytes")));
            if offset.checked_add(len).is_some_and(|end| end <= layout.header_offset) {
                let checksum = xxh3_64(&bytes[index(offset)..index(offset + len)]);
                bytes[record + 32..record + 40].copy_from_slice(&checksum.to_le_bytes());
            }
        }
        let header = index(layout.header_offset);
        let header_checksum = xxh3_64(&bytes[header..header + index(header_len)]);
        let table_checksum = xxh3_64(&bytes[table..table + index(layout.table_len)]);
        bytes[64..72].copy_from_slice(&header_checksum.to_le_bytes());
        bytes[72..80].copy_from_slice(&table_checksum.to_le_bytes());
    }
    let len = bytes.len();
    bytes[len - 16..len - 8].copy_from_slice(&(len as u64).to_le_bytes());
    let checksum = xxh3_64(&bytes[..120]);
    bytes[120..128].copy_from_slice(&checksum.to_le_bytes());
}
