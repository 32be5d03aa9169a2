//! zstd frames built byte by byte (RFC 8878 §3.1.1): valid variants that ordinary
//! compressors rarely write (window descriptors, several blocks, RLE blocks, content
//! checksums) and the zstd-profile faults of spec §8.5.

/// How the frame header is written.
#[derive(Debug, Clone, Copy, Default)]
pub struct FrameShape {
    /// Frame content size to record, if any.
    pub content_size: Option<u64>,
    /// Window log to declare; `None` writes a single-segment frame (which must then
    /// record its content size).
    pub window_log: Option<u8>,
    /// Block type of every block: 0 raw, 1 RLE, 2 compressed, 3 reserved.
    pub block_type: u8,
    /// A one-byte Dictionary_ID field.
    pub dictionary: bool,
    /// The reserved bit of the Frame_Header_Descriptor.
    pub reserved_bit: bool,
    /// The unused bit of the Frame_Header_Descriptor.
    pub unused_bit: bool,
    /// A content checksum: `Some(true)` correct, `Some(false)` wrong.
    pub checksum: Option<bool>,
    /// Blocks to cut the data into (at least 1).
    pub blocks: usize,
}

impl FrameShape {
    /// A single-segment frame of one raw block that records `size`.
    pub fn single(size: usize) -> Self {
        Self { content_size: Some(size as u64), blocks: 1, ..Self::default() }
    }
}

/// One frame holding `data`. An RLE block holds one byte repeated to its size.
pub fn frame(data: &[u8], shape: FrameShape) -> Vec<u8> {
    let mut out = vec![0x28, 0xB5, 0x2F, 0xFD];
    let mut fhd: u8 = 0;
    if shape.reserved_bit {
        fhd |= 1 << 3;
    }
    if shape.unused_bit {
        fhd |= 1 << 4;
    }
    if shape.checksum.is_some() {
        fhd |= 1 << 2;
    }
    if shape.dictionary {
        fhd |= 1;
    }
    let mut tail = Vec::new();
    match (shape.window_log, shape.content_size) {
        (None, Some(size)) => {
            // Single segment: no window descriptor; 1, 2 or 4 bytes of content size.
            fhd |= 1 << 5;
            if size < 256 {
                tail.push(u8::try_from(size).expect("checked"));
            } else if size < 65_536 + 256 {
                fhd |= 1 << 6;
                tail.extend_from_slice(&u16::try_from(size - 256).expect("checked").to_le_bytes());
            } else {
                fhd |= 2 << 6;
                tail.extend_from_slice(&u32::try_from(size).expect("small").to_le_bytes());
            }
        }
        (None, None) => panic!("a single-segment frame records its content size"),
        (Some(log), size) => {
            tail.push((log - 10) << 3);
            if let Some(size) = size {
                fhd |= 2 << 6;
                tail.extend_from_slice(&u32::try_from(size).expect("small").to_le_bytes());
            }
        }
    }
    out.push(fhd);
    if shape.dictionary {
        // The window descriptor (if any) comes before the dictionary id.
        let split = usize::from(shape.window_log.is_some());
        tail.insert(split, 7);
    }
    out.extend_from_slice(&tail);
    let parts = shape.blocks.max(1);
    let step = data.len().div_ceil(parts).max(1);
    let pieces: Vec<&[u8]> = if data.is_empty() { vec![&[][..]] } else { data.chunks(step).collect() };
    for (i, piece) in pieces.iter().enumerate() {
        let last = u32::from(i + 1 == pieces.len());
        let header = (u32::try_from(piece.len()).expect("small") << 3) | (u32::from(shape.block_type) << 1) | last;
        out.extend_from_slice(&header.to_le_bytes()[..3]);
        if shape.block_type == 1 {
            out.push(piece[0]);
        } else {
            out.extend_from_slice(piece);
        }
    }
    if let Some(correct) = shape.checksum {
        let mut checksum = (xxhash_rust::xxh64::xxh64(data, 0) as u32).to_le_bytes();
        if !correct {
            checksum[0] ^= 0xff;
        }
        out.extend_from_slice(&checksum);
    }
    out
}

/// An ordinary zstd frame, with its content size, as the library's writer makes.
pub fn compress(data: &[u8]) -> Vec<u8> {
    zstd::bulk::compress(data, 3).expect("zstd compresses")
}
