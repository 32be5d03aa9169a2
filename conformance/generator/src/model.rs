//! A valid delta file taken apart into its structures, so that one thing can be
//! changed and everything that covers it (checksums, digests, offsets) recomputed:
//! then the reader reaches exactly the check a case aims at (spec §2–§6).

use tpde::format::Header;
use xxhash_rust::xxh3::{xxh3_128, xxh3_64};

/// Offsets of preamble fields (spec §3).
pub mod at {
    /// Major version, u16.
    pub const MAJOR: usize = 8;
    /// Minor version, u16.
    pub const MINOR: usize = 10;
    /// Reserved, 4 bytes.
    pub const RESERVED_A: usize = 12;
    /// Required feature bits, u64.
    pub const REQUIRED: usize = 16;
    /// Optional feature bits, u64.
    pub const OPTIONAL: usize = 24;
    /// Data length, u64.
    pub const DATA_LEN: usize = 32;
    /// Header length, u64.
    pub const HEADER_LEN: usize = 40;
    /// Chunk count, u64.
    pub const CHUNK_COUNT: usize = 48;
    /// Stream count, u64.
    pub const STREAM_COUNT: usize = 56;
    /// Header checksum, u64.
    pub const HEADER_CHECKSUM: usize = 64;
    /// Table checksum, u64.
    pub const TABLE_CHECKSUM: usize = 72;
    /// Reserved, 40 bytes.
    pub const RESERVED_B: usize = 80;
    /// Preamble checksum, u64.
    pub const PREAMBLE_CHECKSUM: usize = 120;
}

/// One chunk: its record, its stream records and its stored bytes.
#[derive(Debug, Clone)]
pub struct Part {
    /// The 64-byte chunk record.
    pub record: [u8; 64],
    /// The 16-byte stream records.
    pub streams: Vec<[u8; 16]>,
    /// The stored bytes, all streams back to back (plus anything a fault adds).
    pub data: Vec<u8>,
}

impl Part {
    /// The stored bytes of stream `k`, by the stream records.
    pub fn stream_data(&self, k: usize) -> &[u8] {
        let start: usize = self.streams[..k].iter().map(stream_stored_len).sum();
        &self.data[start..start + stream_stored_len(&self.streams[k])]
    }

    /// Replaces the stored bytes of stream `k` (record's `stored_len` follows).
    pub fn set_stream_data(&mut self, k: usize, bytes: &[u8]) {
        let start: usize = self.streams[..k].iter().map(stream_stored_len).sum();
        let end = start + stream_stored_len(&self.streams[k]);
        self.data.splice(start..end, bytes.iter().copied());
        self.streams[k][0..4].copy_from_slice(&u32::try_from(bytes.len()).expect("small").to_le_bytes());
    }

    /// Sets the record's chunk digest from the chunk's target bytes.
    pub fn set_digest_of(&mut self, target: &[u8]) {
        self.record[40..56].copy_from_slice(&xxh3_128(target).to_be_bytes());
    }
}

fn stream_stored_len(record: &[u8; 16]) -> usize {
    u32::from_le_bytes(record[0..4].try_into().expect("4 bytes")) as usize
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

/// Writes `value` at `at`.
pub fn put(bytes: &mut [u8], at: usize, value: &[u8]) {
    bytes[at..at + value.len()].copy_from_slice(value);
}

/// Recomputes the preamble checksum after a preamble field was patched.
pub fn reseal(bytes: &mut [u8]) {
    let checksum = xxh3_64(&bytes[..120]);
    put(bytes, at::PREAMBLE_CHECKSUM, &checksum.to_le_bytes());
}

/// A file taken apart.
#[derive(Debug, Clone)]
pub struct Model {
    /// The first 128 bytes, as read (lengths, counts and checksums are rewritten by
    /// [`Model::to_bytes`]).
    pub preamble: [u8; 128],
    /// The chunks.
    pub parts: Vec<Part>,
    /// The header JSON bytes.
    pub header: Vec<u8>,
    /// Stream records after the last chunk's, if a fault adds some.
    pub extra_streams: Vec<[u8; 16]>,
}

impl Model {
    /// Takes a valid file apart.
    pub fn parse(bytes: &[u8]) -> Self {
        let mut preamble = [0u8; 128];
        preamble.copy_from_slice(&bytes[..128]);
        let data_len = u64_at(bytes, at::DATA_LEN) as usize;
        let header_len = u64_at(bytes, at::HEADER_LEN) as usize;
        let chunk_count = u64_at(bytes, at::CHUNK_COUNT) as usize;
        let header_offset = (128 + data_len).next_multiple_of(64);
        let table_offset = (header_offset + header_len).next_multiple_of(64);
        let header = bytes[header_offset..header_offset + header_len].to_vec();
        let stream_table = table_offset + 64 * chunk_count;
        let mut parts = Vec::new();
        for c in 0..chunk_count {
            let record: [u8; 64] = bytes[table_offset + 64 * c..table_offset + 64 * (c + 1)].try_into().expect("64");
            let offset = u64_at(&record, 0) as usize;
            let stored_len = u32::from_le_bytes(record[8..12].try_into().expect("4")) as usize;
            let first = u32::from_le_bytes(record[16..20].try_into().expect("4")) as usize;
            let count = usize::from(record[25]);
            let streams = (first..first + count)
                .map(|s| bytes[stream_table + 16 * s..stream_table + 16 * (s + 1)].try_into().expect("16"))
                .collect();
            parts.push(Part { record, streams, data: bytes[offset..offset + stored_len].to_vec() });
        }
        Self { preamble, parts, header, extra_streams: Vec::new() }
    }

    /// The header, parsed.
    pub fn header(&self) -> Header {
        serde_json::from_slice(&self.header).expect("a valid header")
    }

    /// Replaces the header, serialised as the library's writer does.
    pub fn set_header(&mut self, header: &Header) {
        self.header = serde_json::to_vec(header).expect("serialises");
    }

    /// Rewrites every record's offset, stream index, stream count, stored length and
    /// checksum from the parts as they are now.
    pub fn relayout(&mut self) {
        let mut offset = 128u64;
        let mut stream = 0u32;
        for part in &mut self.parts {
            put(&mut part.record, 0, &offset.to_le_bytes());
            put(&mut part.record, 8, &u32::try_from(part.data.len()).expect("small").to_le_bytes());
            put(&mut part.record, 16, &stream.to_le_bytes());
            part.record[25] = u8::try_from(part.streams.len()).expect("small");
            put(&mut part.record, 32, &xxh3_64(&part.data).to_le_bytes());
            offset += part.data.len() as u64;
            stream += u32::try_from(part.streams.len()).expect("small");
        }
    }

    /// Recomputes every tensor digest in the header from the chunk records' digests.
    pub fn fix_tensor_digests(&mut self) {
        let mut header = self.header();
        for tensor in &mut header.tensors {
            let range = tensor.chunk_range();
            let leaves: Vec<u8> = self.parts[range.start as usize..range.end as usize]
                .iter()
                .flat_map(|p| p.record[40..56].to_vec())
                .collect();
            tensor.digest = hex::encode(xxh3_128(&leaves).to_be_bytes());
        }
        self.set_header(&header);
    }

    /// The bytes of the file, with lengths, counts, checksums, padding and trailer
    /// computed from the structures (records are written as they are).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = self.preamble.to_vec();
        for part in &self.parts {
            out.extend_from_slice(&part.data);
        }
        let data_len = out.len() as u64 - 128;
        out.resize(out.len().next_multiple_of(64), 0);
        out.extend_from_slice(&self.header);
        out.resize(out.len().next_multiple_of(64), 0);
        let mut tables = Vec::new();
        for part in &self.parts {
            tables.extend_from_slice(&part.record);
        }
        let mut streams = 0u64;
        for record in self.parts.iter().flat_map(|p| &p.streams).chain(&self.extra_streams) {
            tables.extend_from_slice(record);
            streams += 1;
        }
        out.extend_from_slice(&tables);
        let file_len = out.len() as u64 + 16;
        out.extend_from_slice(&file_len.to_le_bytes());
        out.extend_from_slice(b"\x89TPDEEND");
        put(&mut out, at::DATA_LEN, &data_len.to_le_bytes());
        put(&mut out, at::HEADER_LEN, &(self.header.len() as u64).to_le_bytes());
        put(&mut out, at::CHUNK_COUNT, &(self.parts.len() as u64).to_le_bytes());
        put(&mut out, at::STREAM_COUNT, &streams.to_le_bytes());
        put(&mut out, at::HEADER_CHECKSUM, &xxh3_64(&self.header).to_le_bytes());
        put(&mut out, at::TABLE_CHECKSUM, &xxh3_64(&tables).to_le_bytes());
        reseal(&mut out);
        out
    }

    /// Where the data section ends, the header starts, the tables start and the
    /// trailer starts in [`Model::to_bytes`]'s output.
    pub fn offsets(&self) -> Offsets {
        let data_end = 128 + self.parts.iter().map(|p| p.data.len()).sum::<usize>();
        let header = data_end.next_multiple_of(64);
        let header_end = header + self.header.len();
        let tables = header_end.next_multiple_of(64);
        let stream_table = tables + 64 * self.parts.len();
        let streams = self.parts.iter().map(|p| p.streams.len()).sum::<usize>() + self.extra_streams.len();
        let trailer = stream_table + 16 * streams;
        Offsets { data_end, header, header_end, tables, stream_table, trailer }
    }
}

/// Region boundaries of a serialised model.
#[derive(Debug, Clone, Copy)]
pub struct Offsets {
    /// End of the data section.
    pub data_end: usize,
    /// Start of the header.
    pub header: usize,
    /// End of the header.
    pub header_end: usize,
    /// Start of the chunk table.
    pub tables: usize,
    /// Start of the stream table.
    pub stream_table: usize,
    /// Start of the trailer.
    pub trailer: usize,
}
