//! Reimplementations of the field's delta methods, run on whole checkpoints.
//!
//! Each method only defines how one tensor is coded against its base tensor.
//! This module supplies what every method needs around that, identically for
//! all of them: a small container that carries the target's safetensors
//! header bytes and any non-tensor files (the shard index), so the restored
//! checkpoint can be compared byte for byte with the original.
//!
//! Base tensors are matched by name. A target tensor longer than its base
//! (vocabulary growth) or absent from it is coded against zeros past the
//! end of the base, the same convention the tpde format uses.

pub mod bitx;
pub mod pulse;
pub mod trl;

use std::borrow::Cow;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use clap::ValueEnum;
use memmap2::Mmap;
use rayon::prelude::*;
use serde::Serialize;

use crate::checkpoint::{
    checkpoint_files, is_safetensors, parse_header, resolve, SafetensorsFile, TensorEntry, TensorIndex,
};

/// A delta method implemented in this crate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Method {
    /// ZipLLM's BitX: XOR, exponent / sign+mantissa streams, zstd.
    Bitx,
    /// PULSE: narrowed gap-encoded positions plus raw values, zstd.
    Pulse,
    /// HF TRL: int32 index + value, stored.
    Trl,
}

impl Method {
    fn tag(self) -> u8 {
        match self {
            Method::Bitx => 1,
            Method::Pulse => 2,
            Method::Trl => 3,
        }
    }

    /// Whether the method entropy-codes its output (TRL does not).
    fn compresses(self) -> bool {
        self != Method::Trl
    }
}

/// One encoded tensor.
pub struct Encoded {
    /// Streams in the method's order.
    pub streams: Vec<Vec<u8>>,
    /// Words whose bits differ from the base.
    pub changed_words: usize,
    /// Stored bytes spent on positions (0 for dense methods).
    pub position_bytes: usize,
    /// Stored bytes spent on values.
    pub value_bytes: usize,
}

/// Totals over a checkpoint, written beside the delta for the report.
#[derive(Default, Serialize, serde::Deserialize, Clone, Copy, Debug)]
pub struct DeltaStats {
    /// Words in the target.
    pub total_words: u64,
    /// Words whose bits differ from the (zero-padded) base.
    pub changed_words: u64,
    /// Stored bytes of position streams.
    pub position_bytes: u64,
    /// Stored bytes of value streams.
    pub value_bytes: u64,
}

const MAGIC: &[u8; 8] = b"TPDEBXL\x01";
const KIND_RAW: u8 = 0;
const KIND_SAFETENSORS: u8 = 1;

/// Encodes `target` against `base` into the file `out`.
pub fn encode_checkpoint(method: Method, level: i32, base: &Path, target: &Path, out: &Path) -> Result<DeltaStats> {
    let base_index = TensorIndex::open(base)?;
    let files = checkpoint_files(target)?;
    let mut w = BufWriter::new(File::create(out).with_context(|| format!("create {}", out.display()))?);
    w.write_all(MAGIC)?;
    w.write_all(&[method.tag()])?;
    w.write_all(&u32::try_from(files.len())?.to_le_bytes())?;
    let mut stats = DeltaStats::default();
    for rel in &files {
        let path = resolve(target, rel);
        let name = rel.to_string_lossy();
        write_blob(&mut w, name.as_bytes())?;
        if !is_safetensors(&path) {
            let bytes = std::fs::read(&path)?;
            w.write_all(&[KIND_RAW])?;
            write_blob(&mut w, &maybe_compress(method, &bytes, level)?)?;
            continue;
        }
        let file = SafetensorsFile::open(&path)?;
        w.write_all(&[KIND_SAFETENSORS])?;
        write_blob(&mut w, &maybe_compress(method, file.header_bytes(), level)?)?;
        let encoded: Vec<Encoded> = file
            .tensors
            .par_iter()
            .map(|t| encode_tensor(method, level, &base_index, &file, t))
            .collect::<Result<_>>()?;
        for (t, e) in file.tensors.iter().zip(&encoded) {
            stats.total_words += ((t.end - t.start) / crate::dtype::word_bytes(&t.dtype)) as u64;
            stats.changed_words += e.changed_words as u64;
            stats.position_bytes += e.position_bytes as u64;
            stats.value_bytes += e.value_bytes as u64;
            w.write_all(&[u8::try_from(e.streams.len())?])?;
            for s in &e.streams {
                write_blob(&mut w, s)?;
            }
        }
    }
    w.into_inner().map_err(|e| e.into_error())?.sync_all().context("flush delta")?;
    Ok(stats)
}

fn encode_tensor(
    method: Method,
    level: i32,
    base: &TensorIndex,
    file: &SafetensorsFile,
    t: &TensorEntry,
) -> Result<Encoded> {
    let target = file.data(t);
    let base = padded_base(base.get(&t.name), target.len());
    match method {
        Method::Bitx => bitx::encode(&base, target, &t.dtype, level),
        Method::Pulse => pulse::encode(&base, target, &t.dtype, level),
        Method::Trl => trl::encode(&base, target, &t.dtype),
    }
    .with_context(|| format!("encode {}", t.name))
}

/// Restores the target checkpoint from `base` and the delta file into `out`
/// (a file, or a directory for a sharded checkpoint).
pub fn decode_checkpoint(base: &Path, delta: &Path, out: &Path) -> Result<()> {
    let base_index = TensorIndex::open(base)?;
    let file = File::open(delta).with_context(|| format!("open {}", delta.display()))?;
    // SAFETY: the delta is written by this process's parent and not modified
    // while mapped.
    let map = unsafe { Mmap::map(&file) }?;
    let mut r = Reader { buf: &map, pos: 0 };
    ensure!(r.take(8)? == MAGIC, "not a baseline delta file");
    let method = match r.u8()? {
        1 => Method::Bitx,
        2 => Method::Pulse,
        3 => Method::Trl,
        m => bail!("unknown method tag {m}"),
    };
    let file_count = r.u32()?;
    let sharded = file_count > 1 || !r.peek_blob()?.is_empty();
    if sharded {
        std::fs::create_dir_all(out)?;
    }
    for _ in 0..file_count {
        let name = PathBuf::from(std::str::from_utf8(r.blob()?)?);
        ensure!(name.components().count() <= 1 && !name.is_absolute(), "unsafe file name {}", name.display());
        let path = resolve(out, &name);
        let kind = r.u8()?;
        let content = maybe_decompress(method, r.blob()?)?;
        if kind == KIND_RAW {
            std::fs::write(&path, content)?;
            continue;
        }
        ensure!(kind == KIND_SAFETENSORS, "unknown file kind {kind}");
        let header = content;
        let (_, tensors) = parse_header(&header)?;
        let mut jobs = Vec::with_capacity(tensors.len());
        for t in &tensors {
            let n = usize::from(r.u8()?);
            let streams = (0..n).map(|_| r.blob()).collect::<Result<Vec<_>>>()?;
            jobs.push((t, streams));
        }
        let decoded: Vec<Vec<u8>> = jobs
            .par_iter()
            .map(|(t, streams)| {
                let len = t.end - t.start;
                let base = padded_base(base_index.get(&t.name), len);
                match method {
                    Method::Bitx => bitx::decode(&base, streams, &t.dtype, len),
                    Method::Pulse => pulse::decode(&base, streams, &t.dtype, len),
                    Method::Trl => trl::decode(&base, streams, &t.dtype, len),
                }
                .with_context(|| format!("decode {}", t.name))
            })
            .collect::<Result<_>>()?;
        let mut w = BufWriter::new(File::create(&path)?);
        w.write_all(&header)?;
        for (t, d) in tensors.iter().zip(&decoded) {
            ensure!(d.len() == t.end - t.start, "decoded {} has the wrong size", t.name);
            w.write_all(d)?;
        }
        w.flush()?;
    }
    ensure!(r.pos == map.len(), "trailing bytes after the last file");
    Ok(())
}

/// The base tensor cut or zero-extended to the target's length.
fn padded_base(base: Option<&[u8]>, len: usize) -> Cow<'_, [u8]> {
    match base {
        Some(b) if b.len() >= len => Cow::Borrowed(&b[..len]),
        Some(b) => {
            let mut v = b.to_vec();
            v.resize(len, 0);
            Cow::Owned(v)
        }
        None => Cow::Owned(vec![0; len]),
    }
}

/// Pairs of (base word, target word) as byte slices.
fn words_for<'a>(base: &'a [u8], target: &'a [u8], width: usize) -> impl Iterator<Item = (&'a [u8], &'a [u8])> {
    base.chunks_exact(width).zip(target.chunks_exact(width))
}

/// Indices of the words whose bits differ.
fn changed_positions(base: &[u8], target: &[u8], width: usize) -> Vec<u64> {
    words_for(base, target, width).enumerate().filter(|(_, (b, t))| b != t).map(|(i, _)| i as u64).collect()
}

/// zstd at `level`; empty input stays empty (no frame at all).
fn zstd_compress(data: &[u8], level: i32) -> Result<Vec<u8>> {
    if data.is_empty() {
        return Ok(Vec::new());
    }
    zstd::bulk::compress(data, level).context("zstd compress")
}

/// Decompresses and checks the size matches what the header implies.
fn zstd_decompress(data: &[u8], expected: usize) -> Result<Vec<u8>> {
    if expected == 0 {
        ensure!(data.is_empty(), "stream present for an empty field");
        return Ok(Vec::new());
    }
    let out = zstd::bulk::decompress(data, expected).context("zstd decompress")?;
    ensure!(out.len() == expected, "stream decoded to {} bytes, expected {expected}", out.len());
    Ok(out)
}

fn maybe_compress(method: Method, data: &[u8], level: i32) -> Result<Vec<u8>> {
    if method.compresses() {
        zstd_compress(data, level)
    } else {
        Ok(data.to_vec())
    }
}

fn maybe_decompress(method: Method, data: &[u8]) -> Result<Vec<u8>> {
    if !method.compresses() || data.is_empty() {
        return Ok(data.to_vec());
    }
    let mut out = Vec::new();
    zstd::stream::copy_decode(data, &mut out).context("zstd decompress")?;
    Ok(out)
}

fn write_blob(w: &mut impl Write, data: &[u8]) -> Result<()> {
    w.write_all(&(data.len() as u64).to_le_bytes())?;
    w.write_all(data)?;
    Ok(())
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        let end = end.context("delta file truncated")?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into()?))
    }
    fn blob(&mut self) -> Result<&'a [u8]> {
        let n = u64::from_le_bytes(self.take(8)?.try_into()?);
        self.take(usize::try_from(n)?)
    }
    fn peek_blob(&mut self) -> Result<&'a [u8]> {
        let save = self.pos;
        let b = self.blob();
        self.pos = save;
        b
    }
}
