//! The JSON header: what the target checkpoint looks like and where each tensor's
//! chunks are (spec §5). The JSON Schema in `spec/tpde.schema.json` is generated from
//! these types.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::container::json;
use crate::dtype::{Dtype, WordWidth};
use crate::error::{fail, Error, ErrorCode, Result};
use crate::limits::{MAX_CHUNK_WORDS, MAX_FILES, MAX_RANK, MAX_TENSORS};

/// The header of a tpde file (spec §5.2): UTF-8 JSON without duplicate keys (spec
/// §5.1). This schema checks each value on its own; the rules that relate values to
/// each other and to the binary parts of the file are in spec §5 and §11.1.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Header {
    /// Name and version of the program that wrote the file; informative only.
    pub writer: String,
    /// The files of the target checkpoint, byte for byte apart from tensor data.
    #[serde(deserialize_with = "json::object")]
    pub target: TargetLayout,
    /// Every tensor of the target, in file order, then in data-offset order.
    #[schemars(length(max = 1048576))]
    #[serde(deserialize_with = "json::objects")]
    pub tensors: Vec<TensorEntry>,
    /// The delta whose chunk positions are the reference sets of position coding 3
    /// (spec §8.3); present iff the file sets required feature bit 2.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "json::optional_object")]
    pub position_reference: Option<PositionPin>,
    /// Extension data under namespaced keys (`org.name`); readers ignore what they
    /// do not know (spec §5.4). May be omitted when empty.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(with = "BTreeMap<String, serde_json::Value>")]
    pub extensions: BTreeMap<String, ExtensionValue>,
}

/// A delta file identified by content: its SHA-256 and length (spec §5.2).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PositionPin {
    /// SHA-256 of the whole file, 64 lower-case hex digits.
    #[schemars(regex(pattern = r"^[0-9a-f]{64}$"))]
    pub sha256: String,
    /// The file's length in bytes.
    #[schemars(range(max = 9_007_199_254_740_991_u64))]
    pub file_len: u64,
}

/// One extension value, kept as its JSON text and never built into a tree: a reader
/// ignores values it does not know (spec §5.4), so a hostile value costs at most its
/// own size in memory.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ExtensionValue(Box<serde_json::value::RawValue>);

impl ExtensionValue {
    /// The value's JSON text, as it appears in the header.
    #[must_use]
    pub fn json(&self) -> &str {
        self.0.get()
    }
}

impl PartialEq for ExtensionValue {
    fn eq(&self, other: &Self) -> bool {
        self.json() == other.json()
    }
}

impl From<serde_json::Value> for ExtensionValue {
    fn from(value: serde_json::Value) -> Self {
        // A `Value` always serialises to valid JSON text.
        Self(serde_json::value::to_raw_value(&value).expect("a JSON value serialises"))
    }
}

/// Whether the target is one safetensors file or a sharded checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LayoutKind {
    /// One `.safetensors` file.
    File,
    /// A directory of shards and `model.safetensors.index.json`.
    Sharded,
}

/// The target checkpoint's files (spec §5.3).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TargetLayout {
    /// One file or sharded.
    pub kind: LayoutKind,
    /// The safetensors files, in the order their tensors appear in `tensors`.
    #[schemars(length(min = 1, max = 65536))]
    #[serde(deserialize_with = "json::objects")]
    pub files: Vec<TargetFile>,
    /// The verbatim text of `model.safetensors.index.json`; present for sharded
    /// targets only (`null` reads as absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index_json: Option<String>,
}

/// One safetensors file of the target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TargetFile {
    /// The file's name: one path component ending in `.safetensors`, without `/`,
    /// `\` or NUL (spec §5.3).
    #[schemars(regex(pattern = r"^[^/\\\x00]*\.safetensors$"))]
    pub name: String,
    /// The verbatim JSON header of the file, padding included; the file starts with
    /// its byte length as a u64 LE, then these bytes, then the tensor data.
    pub safetensors_header: String,
}

/// One tensor of the target (spec §5.5).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TensorEntry {
    /// The tensor's name.
    pub name: String,
    /// The safetensors dtype string (spec §7, table 7.1).
    #[serde(rename = "dtype")]
    pub dtype_name: String,
    /// The shape; at most 32 dimensions, each below 2^53 (spec §5.1).
    #[schemars(length(max = 32), inner(range(max = 9_007_199_254_740_991_u64)))]
    pub shape: Vec<u64>,
    /// Index into `target.files`; never smaller than the previous tensor's.
    #[schemars(range(max = 65535))]
    pub file: u32,
    /// Words per chunk; the last chunk may be shorter.
    #[schemars(range(min = 1, max = 16777216))]
    pub chunk_words: u64,
    /// Global index of the tensor's first chunk record.
    #[schemars(range(max = 268435456))]
    pub first_chunk: u64,
    /// Number of chunks: `ceil(words / chunk_words)`.
    #[schemars(range(max = 268435456))]
    pub chunk_count: u64,
    /// Tree digest of the target bytes (spec §10), 32 lower-case hex digits.
    #[schemars(regex(pattern = r"^[0-9a-f]{32}$"))]
    pub digest: String,
    /// The base tensor this one is a delta against; absent for a standalone tensor.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "json::optional_object")]
    pub base: Option<BaseTensor>,
}

/// The base tensor a delta needs, identified by content (spec §5.6).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BaseTensor {
    /// The base tensor's shape; its dtype is the target's. At most 32 dimensions,
    /// each below 2^53 (spec §5.1).
    #[schemars(length(max = 32), inner(range(max = 9_007_199_254_740_991_u64)))]
    pub shape: Vec<u64>,
    /// Tree digest of the base bytes, with the target's `chunk_words` (spec §10).
    #[schemars(regex(pattern = r"^[0-9a-f]{32}$"))]
    pub digest: String,
}

impl TensorEntry {
    /// The tensor's dtype, read from its name; a validated header names known
    /// dtypes only, so this fails only for an entry built by hand.
    ///
    /// # Errors
    /// `E_UNKNOWN_DTYPE`.
    pub fn dtype(&self) -> Result<Dtype> {
        self.dtype_name.parse()
    }

    /// Width of this tensor's words.
    ///
    /// # Errors
    /// `E_UNKNOWN_DTYPE`.
    pub fn word_width(&self) -> Result<WordWidth> {
        Ok(self.dtype()?.word_width())
    }

    /// Byte length of the tensor (validated by [`Header::validate`]).
    ///
    /// # Errors
    /// `E_UNKNOWN_DTYPE`, or `E_HEADER_INVALID` when the size overflows.
    pub fn byte_len(&self) -> Result<u64> {
        shape_byte_len(&self.dtype_name, &self.shape)
    }

    /// Number of words in the tensor.
    ///
    /// # Errors
    /// As [`TensorEntry::byte_len`].
    pub fn word_count(&self) -> Result<u64> {
        Ok(self.byte_len()? / self.word_width()?.bytes_u64())
    }

    /// The global chunk indices of this tensor.
    #[must_use]
    pub fn chunk_range(&self) -> std::ops::Range<u64> {
        self.first_chunk..self.first_chunk + self.chunk_count
    }

    /// Whether the tensor needs a base to be rebuilt.
    #[must_use]
    pub fn needs_base(&self) -> bool {
        self.base.is_some()
    }
}

/// The largest integer every JSON parser reads exactly.
const MAX_JSON_INTEGER: u64 = (1 << 53) - 1;

/// The rank limit is checked before the dtype (spec §11.1 order).
fn shape_byte_len(dtype_name: &str, shape: &[u64]) -> Result<u64> {
    if shape.len() > MAX_RANK {
        return fail(ErrorCode::LimitExceeded, format!("rank {} exceeds {MAX_RANK}", shape.len()));
    }
    match dtype_name.parse::<Dtype>()?.byte_len(shape) {
        Some(len) if len <= i64::MAX as u64 => Ok(len),
        _ => fail(ErrorCode::HeaderInvalid, "the shape's byte size overflows or is not whole bytes"),
    }
}

fn check_digest_hex(digest: &str) -> Result<()> {
    let ok = digest.len() == 32 && digest.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if !ok {
        return fail(ErrorCode::HeaderInvalid, format!("digest {digest:?} is not 32 lower-case hex digits"));
    }
    Ok(())
}

/// Whether `name` is one plain path component: not empty, not `.` or `..`, without
/// `/`, `\` or NUL (spec §5.3, and §11.2 B0 for a base's shard names), so that a name
/// read from a file cannot reach outside its directory.
#[must_use]
pub fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty() && !name.contains(['/', '\\', '\0']) && name != "." && name != ".."
}

/// A file name that is one plain path component ending in `.safetensors` (spec §5.3).
fn check_file_name(name: &str) -> Result<()> {
    if !(is_plain_file_name(name) && name.ends_with(".safetensors")) {
        return fail(ErrorCode::HeaderInvalid, format!("file name {name:?} is not a plain .safetensors name"));
    }
    Ok(())
}

impl Header {
    /// Checks every rule of spec §5 that needs no other part of the file, and that
    /// the tensors claim exactly `chunk_count` chunks, contiguously and in order.
    ///
    /// # Errors
    /// `E_HEADER_INVALID`, `E_LIMIT_EXCEEDED`, `E_UNKNOWN_DTYPE` or
    /// `E_CHUNK_MAP_INVALID`, naming the tensor.
    pub fn validate(&self, chunk_count: u64) -> Result<()> {
        self.check_json_integers()?;
        let files = &self.target.files;
        if files.is_empty() || files.len() > MAX_FILES {
            return fail(ErrorCode::HeaderInvalid, format!("{} target files (1 to {MAX_FILES} allowed)", files.len()));
        }
        match (self.target.kind, &self.target.index_json) {
            (LayoutKind::File, None) if files.len() == 1 => {}
            (LayoutKind::Sharded, Some(_)) => {}
            _ => {
                return fail(
                    ErrorCode::HeaderInvalid,
                    "a single-file target has one file and no index; a sharded one has an index",
                )
            }
        }
        let mut names = std::collections::HashSet::new();
        for file in files {
            check_file_name(&file.name)?;
            if !names.insert(file.name.as_str()) {
                return fail(ErrorCode::HeaderInvalid, format!("file {:?} is listed twice", file.name));
            }
        }
        if self.tensors.len() > MAX_TENSORS {
            return fail(ErrorCode::LimitExceeded, format!("{} tensors exceed {MAX_TENSORS}", self.tensors.len()));
        }
        let mut next_chunk = 0u64;
        let mut previous_file = 0u32;
        let mut tensor_names = std::collections::HashSet::new();
        for tensor in &self.tensors {
            self.validate_tensor(tensor, &mut next_chunk, &mut previous_file).map_err(|e| e.in_tensor(&tensor.name))?;
            if !tensor_names.insert(tensor.name.as_str()) {
                return Err(
                    Error::new(ErrorCode::HeaderInvalid, "the tensor name appears twice").in_tensor(&tensor.name)
                );
            }
        }
        if next_chunk != chunk_count {
            return fail(
                ErrorCode::ChunkMapInvalid,
                format!("the tensors claim {next_chunk} chunks but the chunk table has {chunk_count}"),
            );
        }
        if let Some(pin) = &self.position_reference {
            // H7 (its presence against feature bit 2 is checked with the preamble).
            let hex = pin.sha256.len() == 64 && pin.sha256.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
            if !hex {
                return fail(ErrorCode::HeaderInvalid, "position_reference.sha256 is not 64 lower-case hex digits");
            }
        }
        Ok(())
    }

    fn validate_tensor(&self, tensor: &TensorEntry, next_chunk: &mut u64, previous_file: &mut u32) -> Result<()> {
        let byte_len = tensor.byte_len()?;
        let word_bytes = tensor.word_width()?.bytes_u64();
        if byte_len % word_bytes != 0 {
            return fail(ErrorCode::HeaderInvalid, "the byte size is not a whole number of words");
        }
        if tensor.file as usize >= self.target.files.len() || tensor.file < *previous_file {
            return fail(
                ErrorCode::HeaderInvalid,
                format!("file index {} is out of range or out of order", tensor.file),
            );
        }
        *previous_file = tensor.file;
        if tensor.chunk_words == 0 || tensor.chunk_words > MAX_CHUNK_WORDS {
            return fail(
                ErrorCode::LimitExceeded,
                format!("chunk_words {} is not in 1..={MAX_CHUNK_WORDS}", tensor.chunk_words),
            );
        }
        let expected = (byte_len / word_bytes).div_ceil(tensor.chunk_words);
        if tensor.chunk_count != expected || tensor.first_chunk != *next_chunk {
            return fail(
                ErrorCode::ChunkMapInvalid,
                format!(
                    "chunks {}+{} do not follow on at chunk {} with {expected} chunks",
                    tensor.first_chunk, tensor.chunk_count, next_chunk
                ),
            );
        }
        *next_chunk = next_chunk
            .checked_add(expected)
            .ok_or_else(|| Error::new(ErrorCode::ChunkMapInvalid, "the chunk count overflows"))?;
        check_digest_hex(&tensor.digest)?;
        if let Some(base) = &tensor.base {
            shape_byte_len(&tensor.dtype_name, &base.shape)?;
            check_digest_hex(&base.digest)?;
        }
        Ok(())
    }

    /// Every integer member is at most 2^53 − 1 (spec §5.1, checked as part of O16,
    /// before the tighter limits of O17).
    fn check_json_integers(&self) -> Result<()> {
        if self.position_reference.as_ref().is_some_and(|pin| pin.file_len > MAX_JSON_INTEGER) {
            return fail(ErrorCode::HeaderInvalid, "position_reference.file_len exceeds 2^53 - 1");
        }
        for tensor in &self.tensors {
            let base_dims = tensor.base.iter().flat_map(|b| b.shape.iter());
            let integers = [tensor.chunk_words, tensor.first_chunk, tensor.chunk_count];
            if integers.iter().chain(&tensor.shape).chain(base_dims).any(|&i| i > MAX_JSON_INTEGER) {
                return Err(Error::new(ErrorCode::HeaderInvalid, "an integer exceeds 2^53 - 1").in_tensor(&tensor.name));
            }
        }
        Ok(())
    }

    /// The tensors of each target file, as index ranges into `tensors`, one per
    /// file in order. Tensors are listed file by file (H5.e), so one pass suffices.
    #[must_use]
    pub fn tensors_by_file(&self) -> Vec<std::ops::Range<usize>> {
        let mut next = 0;
        (0..self.target.files.len())
            .map(|f| {
                let run = self.tensors[next..].iter().take_while(|t| t.file as usize == f).count();
                next += run;
                next - run..next
            })
            .collect()
    }

    /// Whether any tensor needs a base.
    #[must_use]
    pub fn needs_base(&self) -> bool {
        self.tensors.iter().any(TensorEntry::needs_base)
    }
}
