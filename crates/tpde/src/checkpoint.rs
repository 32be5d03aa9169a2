//! Safetensors checkpoints in and out: one `.safetensors` file, or a directory of
//! shards with `model.safetensors.index.json`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::SafeTensors;
use serde::Deserialize;

use crate::container::header::LayoutKind;
use crate::container::json::parse_strict;
use crate::dtype;
use crate::error::{Error, ErrorCode, Result};

/// The index file of a sharded Hugging Face checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// One tensor of a checkpoint file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorLocation {
    /// The tensor's name.
    pub name: String,
    /// The safetensors dtype string.
    pub dtype: String,
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
    /// Opens a `.safetensors` file, or a directory holding a sharded checkpoint.
    ///
    /// # Errors
    /// `E_IO`, `E_PICKLE_INPUT`, `E_MISSING_SHARD`, `E_INVALID_CHECKPOINT` or
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
            Ok(Self::from_files(path, LayoutKind::File, vec![file], None))
        }
    }

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
        let index_json =
            std::fs::read_to_string(&index_path).map_err(|e| Error::io(&index_path, "cannot read the index", e))?;
        let index: ShardIndex = parse_strict(&index_json, "model.safetensors.index.json")
            .map_err(|e| Error::new(ErrorCode::InvalidCheckpoint, e.message()).in_file(&index_path))?;
        let shard_names: BTreeSet<&str> = index.weight_map.values().map(String::as_str).collect();
        let mut files = Vec::with_capacity(shard_names.len());
        for name in shard_names {
            let shard = dir.join(name);
            let plain = Path::new(name).file_name().is_some_and(|f| f == name);
            if !plain {
                return Err(Error::new(
                    ErrorCode::InvalidCheckpoint,
                    format!("shard name {name:?} is not a plain file name"),
                )
                .in_file(&index_path));
            }
            if !shard.exists() {
                return Err(Error::new(
                    ErrorCode::MissingShard,
                    format!("shard {name} is named by the index but missing"),
                )
                .in_file(&shard));
            }
            files.push(open_file(&shard)?);
        }
        let checkpoint = Self::from_files(dir, LayoutKind::Sharded, files, Some(index_json));
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

    fn from_files(root: &Path, kind: LayoutKind, files: Vec<CheckpointFile>, index_json: Option<String>) -> Self {
        let mut by_name = HashMap::new();
        for (f, file) in files.iter().enumerate() {
            for (t, tensor) in file.tensors.iter().enumerate() {
                by_name.entry(tensor.name.clone()).or_insert((f, t));
            }
        }
        Self { root: root.to_path_buf(), kind, files, index_json, by_name }
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

/// Rejects dtype strings this format does not know, naming the tensor, before the
/// safetensors parser reports them as a generic JSON error.
fn check_dtypes(header_text: &str) -> Result<()> {
    let Ok(serde_json::Value::Object(entries)) = serde_json::from_str(header_text) else {
        return Ok(()); // the safetensors parser reports malformed JSON
    };
    for (name, entry) in entries.iter().filter(|(k, _)| k.as_str() != "__metadata__") {
        if let Some(dtype) = entry.get("dtype").and_then(|d| d.as_str()) {
            dtype::word_bytes(dtype).map_err(|e| e.in_tensor(name))?;
        }
    }
    Ok(())
}

/// Tensor names in data order, ties (empty tensors share an offset) broken by name,
/// so that the order never depends on hashing (spec §5.3).
pub(crate) fn data_order(metadata: &safetensors::tensor::Metadata) -> Vec<String> {
    let infos = metadata.tensors();
    let mut names: Vec<String> = infos.keys().cloned().collect();
    names.sort_by(|a, b| infos[a].data_offsets.cmp(&infos[b].data_offsets).then_with(|| a.cmp(b)));
    names
}

fn open_file(path: &Path) -> Result<CheckpointFile> {
    if is_pickle(path) {
        return Err(Error::new(ErrorCode::PickleInput, "pickle checkpoints are not read").in_file(path));
    }
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
    parse_strict::<serde_json::Value>(&header_text, "the safetensors header")
        .map_err(|e| invalid(e.message().to_owned()))?;
    check_dtypes(&header_text).map_err(|e| e.in_file(path))?;
    let (_, metadata) =
        SafeTensors::read_metadata(&map).map_err(|e| invalid(format!("not a valid safetensors file: {e}")))?;
    let infos = metadata.tensors();
    let mut tensors = Vec::with_capacity(infos.len());
    for name in data_order(&metadata) {
        let info = infos[&name];
        let dtype = serde_json::to_value(info.dtype)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .ok_or_else(|| invalid(format!("tensor {name:?} has a dtype without a name")))?;
        let (start, end) = info.data_offsets;
        tensors.push(TensorLocation {
            name,
            dtype,
            shape: info.shape.iter().map(|&d| d as u64).collect(),
            range: header_end + start..header_end + end,
        });
    }
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| invalid("the file name is not UTF-8".into()))?
        .to_owned();
    Ok(CheckpointFile { path: path.to_path_buf(), name, header_text, tensors, map })
}
