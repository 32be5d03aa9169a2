//! Where an encoder and a reader of a delta find tensors: a checkpoint on disk
//! ([`Checkpoint`]), or tensors held in memory ([`TensorMap`]), such as a model's
//! state dict handed over from Python.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use crate::checkpoint::{Checkpoint, CheckpointFile, TensorLocation};
use crate::container::header::LayoutKind;
use crate::dtype::Dtype;
use crate::error::{Error, ErrorCode, Result};

/// One tensor of a source, borrowed from it.
#[derive(Debug, Clone, Copy)]
pub struct SourceTensor<'a> {
    /// The tensor's name.
    pub name: &'a str,
    /// The element type.
    pub dtype: Dtype,
    /// The shape.
    pub shape: &'a [u64],
    /// Its bytes, exactly as a safetensors file stores them.
    pub bytes: &'a [u8],
    /// The file that holds it, for messages (a stand-in name for memory).
    pub file: &'a Path,
}

/// One file of a source, as a target layout records it (spec §5.3).
#[derive(Debug, Clone)]
pub struct SourceFile<'a> {
    /// Its file name.
    pub name: &'a str,
    /// Its verbatim safetensors JSON header, padding included.
    pub header_text: &'a str,
    /// Its tensors in data order.
    pub tensors: Vec<SourceTensor<'a>>,
}

/// Tensors to encode, or to decode against: what `encode` needs of a target and of a
/// base, and what a reader needs of a base.
pub trait TensorSource: Sync {
    /// The path that names this source in messages: a file, a directory, or a
    /// stand-in such as `<memory>`.
    fn origin(&self) -> &Path;
    /// The path of the source on disk, if it is on disk: an output may not be it,
    /// hold it or lie inside it.
    fn input_path(&self) -> Option<&Path>;
    /// One file or sharded.
    fn kind(&self) -> LayoutKind;
    /// Its files, in the order a target layout records them.
    fn files(&self) -> Vec<SourceFile<'_>>;
    /// The verbatim index file of a sharded source.
    fn index_json(&self) -> Option<&str>;
    /// Finds a tensor by name.
    fn tensor(&self, name: &str) -> Option<SourceTensor<'_>>;
    /// Bytes of every file together, headers included.
    fn total_bytes(&self) -> u64;
}

fn located<'a>(file: &'a CheckpointFile, location: &'a TensorLocation) -> SourceTensor<'a> {
    SourceTensor {
        name: &location.name,
        dtype: location.dtype,
        shape: &location.shape,
        bytes: file.tensor_bytes(location),
        file: &file.path,
    }
}

impl TensorSource for Checkpoint {
    fn origin(&self) -> &Path {
        &self.root
    }

    fn input_path(&self) -> Option<&Path> {
        Some(&self.root)
    }

    fn kind(&self) -> LayoutKind {
        self.kind
    }

    fn files(&self) -> Vec<SourceFile<'_>> {
        self.files
            .iter()
            .map(|file| SourceFile {
                name: &file.name,
                header_text: &file.header_text,
                tensors: file.tensors.iter().map(|location| located(file, location)).collect(),
            })
            .collect()
    }

    fn index_json(&self) -> Option<&str> {
        self.index_json.as_deref()
    }

    fn tensor(&self, name: &str) -> Option<SourceTensor<'_>> {
        Checkpoint::tensor(self, name).map(|(file, location)| located(file, location))
    }

    fn total_bytes(&self) -> u64 {
        Checkpoint::total_bytes(self)
    }
}

/// Bytes that a [`TensorMap`] borrows or owns: a `Vec<u8>`, or a buffer that a
/// caller keeps alive, such as an array of another language's runtime.
pub type TensorBytes = Box<dyn AsRef<[u8]> + Send + Sync>;

/// One tensor held in memory.
pub struct MemoryTensor {
    /// The tensor's name.
    pub name: String,
    /// The element type.
    pub dtype: Dtype,
    /// The shape.
    pub shape: Vec<u64>,
    /// Its bytes, little-endian, in row-major order.
    pub bytes: TensorBytes,
}

impl std::fmt::Debug for MemoryTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryTensor")
            .field("name", &self.name)
            .field("dtype", &self.dtype)
            .field("shape", &self.shape)
            .finish_non_exhaustive()
    }
}

/// Tensors in memory, seen as the single safetensors file that the safetensors
/// library would write for them: tensors ordered by dtype alignment, then by name,
/// and the same header bytes. A delta encoded from it therefore rebuilds the file
/// that `safetensors.torch.save_file` writes for the same tensors.
#[derive(Debug)]
pub struct TensorMap {
    origin: PathBuf,
    header_text: String,
    tensors: Vec<MemoryTensor>,
    by_name: HashMap<String, usize>,
}

impl TensorMap {
    /// Checks every tensor (bytes that fit its shape, names unique) and lays them out
    /// as one safetensors file named `file_name`, with `metadata` as its
    /// `__metadata__`.
    ///
    /// # Errors
    /// `E_INVALID_ARGUMENT` for a length that does not fit the shape or a name given
    /// twice, naming the tensor; `E_UNKNOWN_DTYPE` for a dtype the safetensors
    /// library cannot write.
    pub fn new(
        file_name: &str,
        mut tensors: Vec<MemoryTensor>,
        metadata: Option<BTreeMap<String, String>>,
    ) -> Result<Self> {
        let origin = PathBuf::from(file_name);
        let invalid = |name: &str, message: String| {
            Error::new(ErrorCode::InvalidArgument, message).in_file(&origin).in_tensor(name)
        };
        // Before safetensors sees them: its layout assumes names are unique.
        let mut seen = HashSet::with_capacity(tensors.len());
        if let Some(twice) = tensors.iter().find(|t| !seen.insert(t.name.as_str())) {
            return Err(invalid(&twice.name, "two tensors have this name".into()));
        }
        let mut infos = Vec::with_capacity(tensors.len());
        for tensor in &tensors {
            let expected = tensor.dtype.byte_len(&tensor.shape);
            let len = (*tensor.bytes).as_ref().len();
            if expected != Some(len as u64) {
                return Err(invalid(
                    &tensor.name,
                    format!("{} bytes do not hold a {} tensor of shape {:?}", len, tensor.dtype, tensor.shape),
                ));
            }
            let safetensors_dtype: safetensors::Dtype = serde_json::from_value(tensor.dtype.as_str().into())
                .map_err(|e| Error::new(ErrorCode::UnknownDtype, e.to_string()).in_tensor(&tensor.name))?;
            infos.push(safetensors_dtype);
        }
        // safetensors' order: descending dtype alignment, then name.
        let mut order: Vec<usize> = (0..tensors.len()).collect();
        order.sort_by(|&a, &b| infos[b].cmp(&infos[a]).then_with(|| tensors[a].name.cmp(&tensors[b].name)));
        let mut offset = 0usize;
        let mut entries = Vec::with_capacity(tensors.len());
        for &i in &order {
            let tensor = &tensors[i];
            let len = (*tensor.bytes).as_ref().len();
            let shape = tensor
                .shape
                .iter()
                .map(|&d| usize::try_from(d))
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|_| invalid(&tensor.name, "the shape does not fit this machine".into()))?;
            let info = safetensors::tensor::TensorInfo { dtype: infos[i], shape, data_offsets: (offset, offset + len) };
            entries.push((tensor.name.clone(), info));
            offset += len;
        }
        let json_error = |e: serde_json::Error| Error::new(ErrorCode::InvalidArgument, e.to_string()).in_file(&origin);
        let layout = safetensors::tensor::Metadata::new(None, entries)
            .map_err(|e| Error::new(ErrorCode::InvalidArgument, e.to_string()).in_file(&origin))?;
        let mut header_text = serde_json::to_string(&layout).map_err(json_error)?;
        // `__metadata__` first, as safetensors writes it, but with its keys in order:
        // safetensors keeps them in a HashMap, whose order changes from run to run,
        // and the same tensors must give the same delta (reproducible bytes).
        if let Some(metadata) = metadata {
            let entry = format!("\"__metadata__\":{}", serde_json::to_string(&metadata).map_err(json_error)?);
            let separator = if header_text == "{}" { "" } else { "," };
            header_text.replace_range(..1, &format!("{{{entry}{separator}"));
        }
        // Padded with spaces to a multiple of 8 bytes, as safetensors pads it.
        header_text.extend(std::iter::repeat_n(' ', header_text.len().next_multiple_of(8) - header_text.len()));

        let mut slots: Vec<Option<MemoryTensor>> = tensors.drain(..).map(Some).collect();
        let tensors: Vec<MemoryTensor> = order.iter().map(|&i| slots[i].take().expect("each index once")).collect();
        let by_name = tensors.iter().enumerate().map(|(i, tensor)| (tensor.name.clone(), i)).collect();
        Ok(Self { origin, header_text, tensors, by_name })
    }

    fn view<'a>(&'a self, tensor: &'a MemoryTensor) -> SourceTensor<'a> {
        SourceTensor {
            name: &tensor.name,
            dtype: tensor.dtype,
            shape: &tensor.shape,
            bytes: (*tensor.bytes).as_ref(),
            file: &self.origin,
        }
    }

    fn file_name(&self) -> &str {
        self.origin.to_str().expect("built from a str")
    }
}

impl TensorSource for TensorMap {
    fn origin(&self) -> &Path {
        &self.origin
    }

    fn input_path(&self) -> Option<&Path> {
        None
    }

    fn kind(&self) -> LayoutKind {
        LayoutKind::File
    }

    fn files(&self) -> Vec<SourceFile<'_>> {
        let tensors = self.tensors.iter().map(|t| self.view(t)).collect();
        vec![SourceFile { name: self.file_name(), header_text: &self.header_text, tensors }]
    }

    fn index_json(&self) -> Option<&str> {
        None
    }

    fn tensor(&self, name: &str) -> Option<SourceTensor<'_>> {
        self.by_name.get(name).map(|&i| self.view(&self.tensors[i]))
    }

    fn total_bytes(&self) -> u64 {
        let data: u64 = self.tensors.iter().map(|t| (*t.bytes).as_ref().len() as u64).sum();
        8 + self.header_text.len() as u64 + data
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(name: &str, dtype: Dtype, shape: &[u64], bytes: Vec<u8>) -> MemoryTensor {
        MemoryTensor { name: name.into(), dtype, shape: shape.to_vec(), bytes: Box::new(bytes) }
    }

    /// The layout must be safetensors' own, so that a rebuilt target equals the file
    /// that safetensors writes for the same tensors.
    #[test]
    fn a_tensor_map_lays_out_its_file_as_safetensors_does() {
        let tensors = vec![
            tensor("b", Dtype::BF16, &[2], vec![1, 2, 3, 4]),
            tensor("a", Dtype::U8, &[3], vec![5, 6, 7]),
            tensor("c", Dtype::F32, &[1], vec![8, 9, 10, 11]),
        ];
        let map = TensorMap::new("model.safetensors", tensors, None).unwrap();
        let mut expected = std::collections::HashMap::new();
        expected.insert(
            "b".to_owned(),
            safetensors::tensor::TensorView::new(safetensors::Dtype::BF16, vec![2], &[1, 2, 3, 4]).unwrap(),
        );
        expected.insert(
            "a".to_owned(),
            safetensors::tensor::TensorView::new(safetensors::Dtype::U8, vec![3], &[5, 6, 7]).unwrap(),
        );
        expected.insert(
            "c".to_owned(),
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![1], &[8, 9, 10, 11]).unwrap(),
        );
        let file = safetensors::serialize(expected, None).unwrap();
        let mut ours = (map.header_text.len() as u64).to_le_bytes().to_vec();
        ours.extend_from_slice(map.header_text.as_bytes());
        for source in &map.files()[0].tensors {
            ours.extend_from_slice(source.bytes);
        }
        assert_eq!(ours, file);
        assert_eq!(map.total_bytes(), file.len() as u64);
        assert_eq!(map.tensor("a").unwrap().bytes, &[5, 6, 7]);
    }

    #[test]
    fn metadata_comes_first_with_its_keys_in_order() {
        let metadata: BTreeMap<String, String> =
            [("z", "1"), ("a", "2"), ("m", "3")].into_iter().map(|(k, v)| (k.to_owned(), v.to_owned())).collect();
        let map = TensorMap::new("m", vec![tensor("w", Dtype::U8, &[1], vec![0])], Some(metadata.clone())).unwrap();
        assert_eq!(
            map.header_text.trim_end(),
            r#"{"__metadata__":{"a":"2","m":"3","z":"1"},"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#
        );
        let empty = TensorMap::new("m", Vec::new(), Some(metadata)).unwrap();
        assert_eq!(empty.header_text.trim_end(), r#"{"__metadata__":{"a":"2","m":"3","z":"1"}}"#);
    }

    #[test]
    fn a_tensor_map_refuses_bytes_that_do_not_fit_and_twice_used_names() {
        let short = TensorMap::new("m", vec![tensor("w", Dtype::F32, &[2], vec![0; 7])], None).unwrap_err();
        assert_eq!((short.code(), short.tensor()), (ErrorCode::InvalidArgument, Some("w")));
        let twice = vec![tensor("w", Dtype::U8, &[1], vec![0]), tensor("w", Dtype::U8, &[1], vec![1])];
        assert_eq!(TensorMap::new("m", twice, None).unwrap_err().code(), ErrorCode::InvalidArgument);
    }
}
