//! The on-disk records, for tools that forge or inspect files: the container's
//! preamble, header and chunk map (spec §2–§6), the stream codecs (§8), the
//! chunk-level encoder and decoder, digests (§10) and limits (§9).
//!
//! A program that encodes, applies or reads deltas needs none of this; the crate
//! root has what it needs. These items follow the spec closely and change with it.

pub use crate::checkpoint::require_regular_file;
pub use crate::container::chunk_map::{
    ChunkRecord, Codec, Encoding, PositionCoding, StreamRecord, ValueLayout, ValueOp, ValueOrder, CHUNK_RECORD_LEN,
    STREAM_RECORD_LEN,
};
pub use crate::container::header::{ExtensionValue, Header, PositionPin, TargetFile, TargetLayout};
pub use crate::container::json::parse_strict;
pub use crate::container::preamble::{
    trailer_bytes, Preamble, FEATURE_CONSTANT_STREAMS, FEATURE_PACKED_RANS, FEATURE_RANS_LANES,
    FEATURE_TEMPORAL_POSITIONS, MINOR_VERSION_CONSTANT_STREAMS, MINOR_VERSION_PACKED_RANS,
    MINOR_VERSION_TEMPORAL_POSITIONS, PREAMBLE_LEN,
};
pub use crate::container::{align_up, Layout, ALIGNMENT};
pub use crate::delta::{
    check_chunk_payload, check_chunk_shape, chunk_positions, decode_chunk, decode_chunk_with, decode_cost,
    encode_chunk, encode_chunk_against, ChunkInput, EncodedChunk,
};
pub use crate::digest::{checksum64, leaf_digest, tensor_digest, to_hex, tree_digest, Digest128};
pub use crate::limits::{
    try_zeroed, DECODE_IN_FLIGHT_BYTES, DECODE_MEMORY_BUDGET, DECODE_RETAINED_BYTES, MAX_CHUNK_DECODE_BYTES,
    MAX_CHUNK_WORDS, MAX_TENSORS,
};
pub use crate::series::{step_file_name, MANIFEST_FILE, STEPS_DIR};
pub use crate::writer::{check_header, DeltaWriter};

/// Gap, bitmap and split-by-reference position streams (spec §8.3).
pub mod positions {
    pub use crate::codec::positions::{
        decode_bitmap, decode_gaps, decode_split, encode_bitmap, encode_gaps, gap_width, split_by_reference,
    };
}

/// Lane rANS streams (codec 2, spec §8.7).
pub mod rans {
    pub use crate::codec::rans::{
        context_kind, decode_into, decode_into_scalar, encode, ContextKind, Contexts, TableForm,
    };
}

/// zstd streams under the format's profile (codec 1, spec §8.5).
pub mod zstd {
    pub use crate::codec::zstd_stream::{compress, decompress_into, Effort};
}
