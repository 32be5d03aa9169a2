//! Safetensors checkpoints in and out: one `.safetensors` file, or a directory of
//! shards with `model.safetensors.index.json`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use serde::de::{IgnoredAny, Visitor};
use serde::Deserialize;

use crate::container::header::{is_plain_file_name, LayoutKind};
use crate::container::json::{check_unique_keys, parse_strict, ObjectOf};
use crate::dtype::Dtype;
use crate::error::{Error, ErrorCode, Result};

/// The index file of a sharded Hugging Face checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// One tensor of a checkpoint file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorLocation {
    /// The tensor's name.
    pub name: String,
    /// The element type.
    pub dtype: Dtype,
    /// The shape.
    pub shape: Vec<u64>,
    /// Byte range within the file.
    pub range: Range<usize>,
}

/// One memory-mapped safetensors file.
#[derive(Debug)]
pub struct CheckpointFile {
    /// Where it is.
    pub path: PathBuf,
    /// Its file name.
    pub name: String,
    /// The verbatim JSON header, padding included.
    pub header_text: String,
    /// Its tensors in data-offset order.
    pub tensors: Vec<TensorLocation>,
    map: Mmap,
}

impl CheckpointFile {
    /// The whole file.
    #[must_use]
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    /// The bytes of one of its tensors.
    #[must_use]
    pub fn tensor_bytes(&self, tensor: &TensorLocation) -> &[u8] {
        &self.map[tensor.range.clone()]
    }
}

/// A checkpoint opened for reading.
#[derive(Debug)]
pub struct Checkpoint {
    /// The path it was opened from: a file, or the directory of a sharded one.
    pub root: PathBuf,
    /// One file or sharded.
    pub kind: LayoutKind,
    /// Its files; shards in name order.
    pub files: Vec<CheckpointFile>,
    /// The verbatim index file of a sharded checkpoint.
    pub index_json: Option<String>,
    by_name: HashMap<String, (usize, usize)>,
}

fn is_pickle(path: &Path) -> bool {
    matches!(path.extension().and_then(|e| e.to_str()), Some("bin" | "pt" | "pth" | "pkl" | "ckpt"))
}

#[derive(Deserialize)]
struct ShardIndex {
    weight_map: BTreeMap<String, String>,
}

impl Checkpoint {
    /// Opens a `.safetensors` file, or a directory holding a sharded checkpoint, and
    /// checks it as spec §11.2 B0 defines a valid checkpoint.
    ///
    /// # Errors
    /// `E_IO` (also for a path that is neither a regular file nor a directory),
    /// `E_PICKLE_INPUT`, `E_INVALID_CHECKPOINT`, `E_MISSING_SHARD` or
    /// `E_UNKNOWN_DTYPE`, naming the file and tensor.
    pub fn open(path: &Path) -> Result<Self> {
        if is_pickle(path) {
            return Err(Error::new(ErrorCode::PickleInput, "pickle checkpoints are not read").in_file(path));
        }
        let metadata = std::fs::metadata(path).map_err(|e| Error::io(path, "cannot open the checkpoint", e))?;
        if metadata.is_dir() {
            Self::open_sharded(path)
        } else {
            let file = open_file(path)?;
            Self::from_files(path, LayoutKind::File, vec![file], None)
        }
    }

    /// A sharded checkpoint, checked in the order of spec §11.2 B0: the index (B0.a),
    /// every shard name (B0.b), every shard's presence (B0.c), each shard in name
    /// order (B0.d to B0.g), then the tensors across shards and the index's agreement
    /// with them (B0.h).
    fn open_sharded(dir: &Path) -> Result<Self> {
        let index_path = dir.join(INDEX_FILE);
        if !index_path.exists() {
            let has_pickle =
                ["pytorch_model.bin", "pytorch_model.bin.index.json"].iter().any(|name| dir.join(name).exists());
            let (code, message) = if has_pickle {
                (ErrorCode::PickleInput, "the directory holds a pickle checkpoint, which is not read")
            } else {
                (ErrorCode::InvalidCheckpoint, "the directory has no model.safetensors.index.json")
            };
            return Err(Error::new(code, message).in_file(dir));
        }
        require_regular_file(&index_path, "cannot read the index")?;
        let index_json =
            std::fs::read_to_string(&index_path).map_err(|e| Error::io(&index_path, "cannot read the index", e))?;
        let ObjectOf(index): ObjectOf<ShardIndex> = parse_strict(&index_json, "model.safetensors.index.json")
            .map_err(|e| Error::new(ErrorCode::InvalidCheckpoint, e.message()).in_file(&index_path))?;
        // Byte-wise name order (spec §11.2 B0), which is `str`'s order.
        let shard_names: BTreeSet<&str> = index.weight_map.values().map(String::as_str).collect();
        for &name in &shard_names {
            if !is_plain_file_name(name) {
                return Err(Error::new(
                    ErrorCode::InvalidCheckpoint,
                    format!("shard name {name:?} is not a plain file name"),
                )
                .in_file(&index_path));
            }
            if is_pickle(Path::new(name)) {
                return Err(
                    Error::new(ErrorCode::PickleInput, "pickle checkpoints are not read").in_file(&dir.join(name))
                );
            }
        }
        for &name in &shard_names {
            let shard = dir.join(name);
            match std::fs::metadata(&shard) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(Error::new(
                        ErrorCode::MissingShard,
                        format!("shard {name} is named by the index but missing"),
                    )
                    .in_file(&shard));
                }
                Err(e) => return Err(Error::io(&shard, "cannot open the shard", e)),
                Ok(_) => {}
            }
        }
        let files = shard_names.iter().map(|name| open_file(&dir.join(name))).collect::<Result<Vec<_>>>()?;
        let checkpoint = Self::from_files(dir, LayoutKind::Sharded, files, Some(index_json))?;
        for (tensor, shard) in &index.weight_map {
            let found = checkpoint.by_name.get(tensor).map(|&(f, _)| checkpoint.files[f].name.as_str());
            if found != Some(shard.as_str()) {
                return Err(Error::new(
                    ErrorCode::InvalidCheckpoint,
                    format!("the index puts it in {shard}, which lacks it"),
                )
                .in_file(&index_path)
                .in_tensor(tensor));
            }
        }
        if checkpoint.by_name.len() != index.weight_map.len() {
            return Err(Error::new(
                ErrorCode::InvalidCheckpoint,
                "the shards hold tensors that the index does not list",
            )
            .in_file(&index_path));
        }
        Ok(checkpoint)
    }

    /// Indexes the tensors by name; a name held by two files is not a checkpoint
    /// (spec §11.2 B0.h).
    fn from_files(
        root: &Path,
        kind: LayoutKind,
        files: Vec<CheckpointFile>,
        index_json: Option<String>,
    ) -> Result<Self> {
        let mut by_name = HashMap::with_capacity(files.iter().map(|f| f.tensors.len()).sum());
        for (f, file) in files.iter().enumerate() {
            for (t, tensor) in file.tensors.iter().enumerate() {
                if let Some((first, _)) = by_name.insert(tensor.name.clone(), (f, t)) {
                    return Err(Error::new(
                        ErrorCode::InvalidCheckpoint,
                        format!("the tensor is in both {} and {}", files[first].name, file.name),
                    )
                    .in_file(root)
                    .in_tensor(&tensor.name));
                }
            }
        }
        Ok(Self { root: root.to_path_buf(), kind, files, index_json, by_name })
    }

    /// Finds a tensor by name.
    #[must_use]
    pub fn tensor(&self, name: &str) -> Option<(&CheckpointFile, &TensorLocation)> {
        self.by_name.get(name).map(|&(f, t)| (&self.files[f], &self.files[f].tensors[t]))
    }

    /// Total bytes of all files.
    #[must_use]
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.bytes().len() as u64).sum()
    }
}

/// The `dtype` of one member of a safetensors header, if it is an object with a string
/// `dtype`; every other value is skipped without being built.
struct DtypeProbe(Option<String>);

impl<'de> Deserialize<'de> for DtypeProbe {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        deserializer.deserialize_any(DtypeProbeVisitor)
    }
}

struct DtypeProbeVisitor;

impl<'de> serde::de::Visitor<'de> for DtypeProbeVisitor {
    type Value = DtypeProbe;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> std::result::Result<DtypeProbe, A::Error> {
        let mut dtype = None;
        while let Some(key) = map.next_key::<String>()? {
            if key == "dtype" {
                dtype = map.next_value::<StringProbe>()?.0;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(DtypeProbe(dtype))
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<DtypeProbe, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(DtypeProbe(None))
    }

    fn visit_bool<E>(self, _: bool) -> std::result::Result<DtypeProbe, E> {
        Ok(DtypeProbe(None))
    }
    fn visit_i64<E>(self, _: i64) -> std::result::Result<DtypeProbe, E> {
        Ok(DtypeProbe(None))
    }
    fn visit_u64<E>(self, _: u64) -> std::result::Result<DtypeProbe, E> {
        Ok(DtypeProbe(None))
    }
    fn visit_f64<E>(self, _: f64) -> std::result::Result<DtypeProbe, E> {
        Ok(DtypeProbe(None))
    }
    fn visit_str<E>(self, _: &str) -> std::result::Result<DtypeProbe, E> {
        Ok(DtypeProbe(None))
    }
    fn visit_unit<E>(self) -> std::result::Result<DtypeProbe, E> {
        Ok(DtypeProbe(None))
    }
}

/// A string, or `None` for any other value (skipped without being built).
struct StringProbe(Option<String>);

impl<'de> Deserialize<'de> for StringProbe {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        deserializer.deserialize_any(StringProbeVisitor)
    }
}

struct StringProbeVisitor;

impl<'de> serde::de::Visitor<'de> for StringProbeVisitor {
    type Value = StringProbe;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_str<E>(self, text: &str) -> std::result::Result<StringProbe, E> {
        Ok(StringProbe(Some(text.to_owned())))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> std::result::Result<StringProbe, A::Error> {
        Visitor::visit_map(IgnoredAny, map).map(|_| StringProbe(None))
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, seq: A) -> std::result::Result<StringProbe, A::Error> {
        Visitor::visit_seq(IgnoredAny, seq).map(|_| StringProbe(None))
    }
    fn visit_bool<E>(self, _: bool) -> std::result::Result<StringProbe, E> {
        Ok(StringProbe(None))
    }
    fn visit_i64<E>(self, _: i64) -> std::result::Result<StringProbe, E> {
        Ok(StringProbe(None))
    }
    fn visit_u64<E>(self, _: u64) -> std::result::Result<StringProbe, E> {
        Ok(StringProbe(None))
    }
    fn visit_f64<E>(self, _: f64) -> std::result::Result<StringProbe, E> {
        Ok(StringProbe(None))
    }
    fn visit_unit<E>(self) -> std::result::Result<StringProbe, E> {
        Ok(StringProbe(None))
    }
}

/// Spec §11.2 B0.e: once the header is strict JSON, a tensor whose `dtype` is a
/// string outside Table 7.1 is `E_UNKNOWN_DTYPE`, before any other rule of the file.
fn check_dtypes(header_text: &str) -> Result<()> {
    // Not an object: the structural check that follows reports it.
    let Ok(members) = serde_json::from_str::<BTreeMap<String, DtypeProbe>>(header_text) else {
        return Ok(());
    };
    for (name, DtypeProbe(dtype)) in members.iter().filter(|(k, _)| k.as_str() != "__metadata__") {
        if let Some(dtype) = dtype {
            dtype.parse::<Dtype>().map_err(|e| e.in_tensor(name))?;
        }
    }
    Ok(())
}

/// One tensor object of a safetensors header: the members that spec §5.3 S2 and
/// §11.2 B0 define. Other members are skipped without being built.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub(crate) struct SafetensorsTensor {
    /// The dtype string; checked against Table 7.1 by the caller.
    pub dtype: String,
    /// The shape.
    pub shape: Vec<u64>,
    /// Begin and end of the data, relative to the data region.
    pub data_offsets: (u64, u64),
}

/// A safetensors header as spec §5.3 S2 and §11.2 B0 read it: its tensors in header
/// order. `__metadata__` is checked (absent, `null` or an object of strings) and
/// skipped. Unlike the safetensors crate, nothing is buffered: ignored members cost
/// no memory, and there is no cap below the format's own header limit.
#[derive(Debug)]
pub(crate) struct SafetensorsHeader {
    pub tensors: Vec<(String, SafetensorsTensor)>,
}

impl SafetensorsHeader {
    /// Parses a header already checked as strict JSON (spec §5.1).
    pub(crate) fn parse(text: &str) -> std::result::Result<Self, serde_json::Error> {
        serde_json::from_str(text)
    }
}

impl<'de> Deserialize<'de> for SafetensorsHeader {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        deserializer.deserialize_map(SafetensorsHeaderVisitor)
    }
}

struct SafetensorsHeaderVisitor;

impl<'de> Visitor<'de> for SafetensorsHeaderVisitor {
    type Value = SafetensorsHeader;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a safetensors header object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> std::result::Result<Self::Value, A::Error> {
        let mut tensors = Vec::new();
        while let Some(name) = map.next_key::<String>()? {
            if name == "__metadata__" {
                map.next_value::<Option<MetadataStrings>>()?;
            } else {
                tensors.push((name, map.next_value::<ObjectOf<SafetensorsTensor>>()?.0));
            }
        }
        Ok(SafetensorsHeader { tensors })
    }
}

/// `__metadata__`: an object whose values are strings, checked without keeping them.
struct MetadataStrings;

impl<'de> Deserialize<'de> for MetadataStrings {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        deserializer.deserialize_map(MetadataStringsVisitor)
    }
}

struct MetadataStringsVisitor;

impl<'de> Visitor<'de> for MetadataStringsVisitor {
    type Value = MetadataStrings;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an object of strings")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> std::result::Result<Self::Value, A::Error> {
        while map.next_key::<IgnoredAny>()?.is_some() {
            map.next_value::<StringOnly>()?;
        }
        Ok(MetadataStrings)
    }
}

/// A JSON string, checked and dropped.
struct StringOnly;

impl<'de> Deserialize<'de> for StringOnly {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        deserializer.deserialize_str(StringOnlyVisitor)
    }
}

struct StringOnlyVisitor;

impl Visitor<'_> for StringOnlyVisitor {
    type Value = StringOnly;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a string")
    }

    fn visit_str<E>(self, _: &str) -> std::result::Result<StringOnly, E> {
        Ok(StringOnly)
    }
}

/// Refuses anything but a regular file before it is opened: opening a FIFO for
/// reading blocks until a writer appears, and a device never ends.
///
/// # Errors
/// `E_IO`, naming the file.
pub fn require_regular_file(path: &Path, action: &str) -> Result<std::fs::Metadata> {
    let metadata = std::fs::metadata(path).map_err(|e| Error::io(path, action, e))?;
    if !metadata.is_file() {
        return Err(Error::new(ErrorCode::Io, "not a regular file (a FIFO, device, socket or directory)").in_file(path));
    }
    Ok(metadata)
}

fn open_file(path: &Path) -> Result<CheckpointFile> {
    if is_pickle(path) {
        return Err(Error::new(ErrorCode::PickleInput, "pickle checkpoints are not read").in_file(path));
    }
    require_regular_file(path, "cannot open")?;
    let file = File::open(path).map_err(|e| Error::io(path, "cannot open", e))?;
    // SAFETY: the map is read-only and private to this process. Another process
    // changing the file while it is mapped would change what we read; every byte we
    // rely on is checked against digests, and the documented contract is that
    // inputs are not modified while tpde runs.
    let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, "cannot map", e))?;
    let invalid = |message: String| Error::new(ErrorCode::InvalidCheckpoint, message).in_file(path);
    let header_len = map
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("eight bytes")))
        .ok_or_else(|| invalid("the file is too short to be safetensors".into()))?;
    let header_end = usize::try_from(header_len)
        .ok()
        .and_then(|n| n.checked_add(8))
        .filter(|&end| end <= map.len())
        .ok_or_else(|| invalid(format!("the header length {header_len} runs past the end of the file")))?;
    let header_text =
        std::str::from_utf8(&map[8..header_end]).map_err(|_| invalid("the header is not UTF-8".into()))?.to_owned();
    // Duplicate keys would be kept verbatim in the delta, which readers must reject.
    check_unique_keys(&header_text, "the safetensors header").map_err(|e| invalid(e.message().to_owned()))?;
    check_dtypes(&header_text).map_err(|e| e.in_file(path))?;
    // Spec §11.2 B0.f and B0.g: the structure of §5.3 S2, then the data offsets,
    // sorted (data order, whatever the members' order), tile the data region.
    let header =
        SafetensorsHeader::parse(&header_text).map_err(|e| invalid(format!("not a valid safetensors header: {e}")))?;
    let data_len = (map.len() - header_end) as u64;
    let mut tensors = Vec::with_capacity(header.tensors.len());
    for (name, tensor) in header.tensors {
        let (begin, end) = tensor.data_offsets;
        let dtype = tensor.dtype.parse::<Dtype>().map_err(|e| e.in_file(path).in_tensor(&name))?;
        let byte_len = dtype.byte_len(&tensor.shape);
        if begin > end || byte_len != Some(end - begin) || end > data_len {
            return Err(invalid(format!("tensor {name:?} has data offsets [{begin}, {end}] that do not fit its size")));
        }
        // In range: `end` is at most the data length, which fits the map.
        let range = header_end + usize::try_from(begin).expect("in range")
            ..header_end + usize::try_from(end).expect("in range");
        tensors.push(TensorLocation { name, dtype, shape: tensor.shape, range });
    }
    // Data order; tensors of zero bytes, which share an offset, by name, so that the
    // order never depends on the header's member order (spec §5.3, §12 item 4).
    tensors.sort_by(|a, b| (a.range.start, a.range.end, &a.name).cmp(&(b.range.start, b.range.end, &b.name)));
    let mut at = header_end;
    for tensor in &tensors {
        if tensor.range.start != at {
            return Err(invalid(format!("the data has a hole or an overlap before tensor {:?}", tensor.name)));
        }
        at = tensor.range.end;
    }
    if at != map.len() {
        return Err(invalid(format!("{} bytes follow the last tensor's data", map.len() - at)));
    }
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| invalid("the file name is not UTF-8".into()))?
        .to_owned();
    Ok(CheckpointFile { path: path.to_path_buf(), name, header_text, tensors, map })
}
