//! Reading checkpoints as the baselines see them: a single `.safetensors`
//! file, or a directory of shards plus `model.safetensors.index.json`.
//!
//! The header is parsed by hand (it is a small JSON object) so the exact
//! header bytes can be carried through the baselines untouched: a restored
//! file must match the original byte for byte, header included.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use memmap2::Mmap;
use serde::Deserialize;

/// One tensor of a safetensors file.
#[derive(Clone, Debug)]
pub struct TensorEntry {
    /// Tensor name.
    pub name: String,
    /// safetensors dtype string, e.g. "BF16".
    pub dtype: String,
    /// Byte range inside the data section.
    pub start: usize,
    /// End of the byte range (exclusive).
    pub end: usize,
}

/// A parsed safetensors file held in a memory map.
pub struct SafetensorsFile {
    map: Mmap,
    header_len: usize,
    /// Tensors in data-offset order.
    pub tensors: Vec<TensorEntry>,
}

#[derive(Deserialize)]
struct RawInfo {
    dtype: String,
    data_offsets: (usize, usize),
}

impl SafetensorsFile {
    /// Maps and parses `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).with_context(|| format!("open {}", path.display()))?;
        // SAFETY: the corpus files are written once by this harness and never
        // modified while mapped.
        let map = unsafe { Mmap::map(&file) }.with_context(|| format!("mmap {}", path.display()))?;
        let (header_len, tensors) = parse_header(&map).with_context(|| format!("parse {}", path.display()))?;
        let data_len = tensors.last().map_or(0, |t| t.end);
        ensure!(
            8 + header_len + data_len == map.len(),
            "{}: data section is {} bytes but tensors cover {data_len}",
            path.display(),
            map.len() - 8 - header_len
        );
        Ok(Self { map, header_len, tensors })
    }

    /// The header region: the 8-byte length followed by the JSON.
    pub fn header_bytes(&self) -> &[u8] {
        &self.map[..8 + self.header_len]
    }

    /// The raw bytes of one tensor.
    pub fn data(&self, t: &TensorEntry) -> &[u8] {
        let base = 8 + self.header_len;
        &self.map[base + t.start..base + t.end]
    }
}

/// Parses a header (`u64` length + JSON; any data after it is ignored) and
/// checks that the tensors tile the data section without gaps, which is what
/// lets the baselines rebuild a file from the header plus its tensors.
pub fn parse_header(bytes: &[u8]) -> Result<(usize, Vec<TensorEntry>)> {
    ensure!(bytes.len() >= 8, "file shorter than the header length field");
    let mut len8 = [0u8; 8];
    len8.copy_from_slice(&bytes[..8]);
    let header_len = usize::try_from(u64::from_le_bytes(len8)).context("header length")?;
    ensure!(bytes.len() >= 8 + header_len, "header length {header_len} past end of file");
    let json: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + header_len]).context("header JSON")?;
    let mut tensors = Vec::with_capacity(json.len());
    for (name, value) in json {
        if name == "__metadata__" {
            continue;
        }
        let info: RawInfo = serde_json::from_value(value).with_context(|| format!("tensor {name}"))?;
        tensors.push(TensorEntry { name, dtype: info.dtype, start: info.data_offsets.0, end: info.data_offsets.1 });
    }
    tensors.sort_by_key(|t| t.start);
    let mut pos = 0;
    for t in &tensors {
        if t.start != pos || t.end < t.start {
            bail!("tensor {} does not follow the previous one contiguously", t.name);
        }
        pos = t.end;
    }
    Ok((header_len, tensors))
}

/// The files that make up a checkpoint, as paths relative to its root.
///
/// A file checkpoint is the single entry `""` (its own path); a directory is
/// every regular file in it, sorted, so the order is stable across runs.
pub fn checkpoint_files(root: &Path) -> Result<Vec<PathBuf>> {
    if root.is_file() {
        return Ok(vec![PathBuf::new()]);
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(root).with_context(|| format!("read {}", root.display()))? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            files.push(PathBuf::from(entry.file_name()));
        }
    }
    files.sort();
    Ok(files)
}

/// Joins a root and a relative entry from [`checkpoint_files`].
pub fn resolve(root: &Path, rel: &Path) -> PathBuf {
    if rel.as_os_str().is_empty() {
        root.to_path_buf()
    } else {
        root.join(rel)
    }
}

/// Total bytes of a checkpoint (every file, index included).
pub fn checkpoint_size(root: &Path) -> Result<u64> {
    let mut total = 0;
    for rel in checkpoint_files(root)? {
        total += std::fs::metadata(resolve(root, &rel))?.len();
    }
    Ok(total)
}

/// All safetensors files of a base checkpoint, for lookup by tensor name.
/// Tensors are found by name, not by file, so a base sharded differently
/// from the target still works.
pub struct TensorIndex {
    files: Vec<SafetensorsFile>,
    by_name: BTreeMap<String, (usize, usize)>,
}

impl TensorIndex {
    /// Opens every `.safetensors` file of `root`.
    pub fn open(root: &Path) -> Result<Self> {
        let mut files = Vec::new();
        let mut by_name = BTreeMap::new();
        for rel in checkpoint_files(root)? {
            let path = resolve(root, &rel);
            if !is_safetensors(&path) {
                continue;
            }
            let f = SafetensorsFile::open(&path)?;
            for (i, t) in f.tensors.iter().enumerate() {
                by_name.insert(t.name.clone(), (files.len(), i));
            }
            files.push(f);
        }
        Ok(Self { files, by_name })
    }

    /// The bytes of a tensor by name, if present.
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        let &(f, i) = self.by_name.get(name)?;
        let file = &self.files[f];
        Some(file.data(&file.tensors[i]))
    }
}

/// Whether a path names a safetensors file (by extension).
pub fn is_safetensors(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "safetensors")
}

/// Compares two checkpoints byte for byte (every file of a directory).
/// Returns a description of the first difference, or `None` if identical.
pub fn first_difference(expected: &Path, actual: &Path) -> Result<Option<String>> {
    let want = checkpoint_files(expected)?;
    if expected.is_dir() != actual.is_dir() {
        return Ok(Some("one is a directory, the other a file".into()));
    }
    let got = checkpoint_files(actual)?;
    if want != got {
        return Ok(Some(format!("file lists differ: {want:?} vs {got:?}")));
    }
    for rel in want {
        let a = resolve(expected, &rel);
        let b = resolve(actual, &rel);
        if !files_equal(&a, &b)? {
            return Ok(Some(format!("{} differs", b.display())));
        }
    }
    Ok(None)
}

fn files_equal(a: &Path, b: &Path) -> Result<bool> {
    use std::io::Read;
    let (fa, fb) = (File::open(a)?, File::open(b)?);
    if fa.metadata()?.len() != fb.metadata()?.len() {
        return Ok(false);
    }
    let (mut ra, mut rb) =
        (std::io::BufReader::with_capacity(1 << 20, fa), std::io::BufReader::with_capacity(1 << 20, fb));
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = read_full(&mut ra, &mut ba)?;
        let m = read_full(&mut rb, &mut bb)?;
        if n != m || ba[..n] != bb[..m] {
            return Ok(false);
        }
        if n == 0 {
            return Ok(true);
        }
    }

    fn read_full(r: &mut impl Read, buf: &mut [u8]) -> Result<usize> {
        let mut n = 0;
        while n < buf.len() {
            let k = r.read(&mut buf[n..])?;
            if k == 0 {
                break;
            }
            n += k;
        }
        Ok(n)
    }
}
