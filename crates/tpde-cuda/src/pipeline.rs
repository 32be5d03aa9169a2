//! The loading pipeline: a ring of page-locked staging slots, each with its
//! own stream. For every batch of chunks, streams stored as they are and the
//! stored bytes of lane rANS streams go to the device in one asynchronous
//! copy straight from the host delta when it sits in page-locked memory
//! ([`TensorRef::host`]); only zstd streams are decoded on the CPU (rayon)
//! into the slot, which follows in a second copy; then the batch's kernels
//! run on the same stream: the lane rANS parse launch, its decoder launches
//! by dependency level (each after the positions its base-key contexts read,
//! rebuilt by the `positions` kernel), then the apply kernels, which read a
//! decoded lane rANS stream from the slot's device part as they read any
//! other stream. So the copy of batch k+1 overlaps the kernels of batch k,
//! and the raw copy of a batch overlaps its own CPU decoding. One
//! synchronization at the end, and the device error flag words are read
//! once.

use std::cell::RefCell;
use std::sync::Arc;

use cudarc::driver::{result as cu, CudaEvent, CudaSlice, CudaStream, PinnedHostSlice};
use rayon::prelude::*;
use tpde::container::chunk_map::{ChunkRecord, Codec, Encoding, PositionCoding, StreamRecord, ValueLayout};
use tpde::digest::Digest128;
use tpde::{ErrorCode, Result as FormatResult};

use crate::error::{flag, GpuError, Result};
use crate::gpu::{Batch, DevRange, Gpu, LeafBatch, RansContext, RansStream, Stage};
use crate::kernels::{ChunkDesc, KEYS, LEAF_TERM_BYTES_PER_BLOCK};
use crate::rans::{self, allowed_contexts, is_rans, ChunkPlan, Header, RansWork};
use crate::width::WordWidth;

/// One chunk of a delta, as the format library stores it: its record, its
/// stream records and its stored bytes (every stream back to back).
#[derive(Clone, Copy, Debug)]
pub struct ChunkRef<'a> {
    /// The chunk record (`spec/FORMAT.md` §6.1).
    pub record: ChunkRecord,
    /// One record per stream, positions first (§6.2).
    pub streams: &'a [StreamRecord],
    /// The stored bytes of all streams.
    pub stored: &'a [u8],
    /// Words in the chunk.
    pub words: u32,
}

impl<'a> ChunkRef<'a> {
    /// Checks the records against each other and the chunk size with the
    /// format library's [`tpde::delta::check_chunk_shape`] (§8.1–§8.4).
    /// Both value orders (§8.6) are read by the kernels.
    pub fn check_shape(&self, width: WordWidth) -> Result<()> {
        tpde::delta::check_chunk_shape(&self.record, self.streams, u64::from(self.words), width.bytes())?;
        Ok(())
    }

    /// [`ChunkRef::check_shape`], and that the stored bytes are as long as
    /// the record says.
    pub fn validate(&self, width: WordWidth) -> Result<()> {
        self.check_shape(width)?;
        if self.stored.len() != self.record.stored_len as usize {
            return Err(GpuError::corrupt("the chunk's stored bytes differ from its stored length"));
        }
        Ok(())
    }

    /// Number of position streams (they come first).
    #[must_use]
    pub fn position_stream_count(&self) -> usize {
        match (self.record.encoding, self.record.position_coding) {
            (Encoding::Sparse, PositionCoding::Gaps) => usize::from(self.record.gap_width),
            (Encoding::Sparse, PositionCoding::Bitmap) => 1,
            _ => 0,
        }
    }

    /// The stored bytes of each stream, in order (the chunk is validated).
    pub fn stored_streams(&self) -> impl Iterator<Item = &'a [u8]> + 'a {
        let stored = self.stored;
        self.streams.iter().scan(0usize, move |at, r| {
            let start = *at;
            *at += r.stored_len as usize;
            stored.get(start..*at)
        })
    }

    /// Whether the kernels read the base words of the whole chunk range from
    /// the output (unchanged and sparse chunks leave words untouched).
    fn reads_out(&self) -> bool {
        !matches!(self.record.encoding, Encoding::Dense | Encoding::Raw)
    }
}

/// One tensor of a delta.
#[derive(Clone, Debug)]
pub struct TensorRef<'a> {
    /// Tensor name.
    pub name: String,
    /// Word width of its dtype.
    pub width: WordWidth,
    /// Words of the target tensor.
    pub words: u64,
    /// Words per chunk (the last chunk may be shorter).
    pub chunk_words: u32,
    /// Index of its first chunk in the delta file's chunk table, which
    /// errors name with the chunk's position (0 for tensors not from a file).
    pub first_chunk: u64,
    /// Its chunks, in order.
    pub chunks: Vec<ChunkRef<'a>>,
    /// A page-locked host buffer that holds the chunks' stored bytes (for
    /// example a whole delta file read into pinned memory,
    /// [`crate::delta::PinnedDelta`]). Streams stored as they are then go to
    /// the device by asynchronous copies straight from it, with no CPU copy.
    /// `None`: stored streams are copied through the staging ring. Pageable
    /// memory here is correct but slow.
    pub host: Option<&'a [u8]>,
}

impl TensorRef<'_> {
    /// Bytes of the target tensor.
    #[must_use]
    pub fn bytes(&self) -> usize {
        usize::try_from(self.words).unwrap_or(usize::MAX) * self.width.bytes()
    }

    /// Checks every chunk and that the chunks tile the tensor.
    pub fn validate(&self) -> Result<()> {
        let mut words = 0u64;
        for (i, c) in self.chunks.iter().enumerate() {
            c.validate(self.width)?;
            let last = i + 1 == self.chunks.len();
            if (!last && c.words != self.chunk_words) || c.words > self.chunk_words || c.words == 0 {
                return Err(GpuError::corrupt(format!("{}: chunk {i} has a wrong size", self.name)));
            }
            words += u64::from(c.words);
        }
        if words != self.words {
            return Err(GpuError::corrupt(format!("{}: chunks do not cover the tensor", self.name)));
        }
        Ok(())
    }

    fn needs_base_words(&self) -> bool {
        self.chunks.iter().any(ChunkRef::reads_out)
    }
}

/// Sizes of the staging ring.
#[derive(Clone, Copy, Debug)]
pub struct LoaderConfig {
    /// Staging slots (each with its own stream). At least 2 to overlap.
    pub slots: usize,
    /// Bytes of each slot, host and device. A chunk's decoded streams must
    /// fit, with, for lane rANS streams, their stored bytes (unless they are
    /// read from a page-locked delta), their scratch (about 1 KiB per table
    /// and 4 bytes per tile) and, for a base-key context in a sparse chunk,
    /// 4 bytes per position.
    pub slot_bytes: usize,
    /// Most chunks in one batch (one descriptor table).
    pub max_chunks: usize,
    /// Whether every rebuilt chunk's digest is checked on the device against
    /// its record (spec §10), as the library does on the CPU. On by default;
    /// turn it off only for deltas from a trusted source whose stored
    /// checksums are still verified (see `BENCHMARKS-GPU.md` for its cost).
    /// When on, the loader holds 64 MiB of device scratch for the check.
    pub verify_digests: bool,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        Self { slots: 4, slot_bytes: 32 << 20, max_chunks: 4096, verify_digests: true }
    }
}

/// A rebuilt chunk whose leaf digest is checked: its bytes on the device,
/// the digest its record states, and the names an error gives.
struct LeafCheck<'t> {
    out: DevRange,
    digest: Digest128,
    tensor: &'t str,
    chunk: u64,
}

/// The leaf checks of every chunk of a tensor rebuilt into `out`.
fn leaf_checks<'t>(t: &'t TensorRef<'_>, out: DevRange, checks: &mut Vec<LeafCheck<'t>>) -> Result<()> {
    let w = t.width.bytes();
    let mut off = 0usize;
    for (k, c) in t.chunks.iter().enumerate() {
        let n = c.words as usize * w;
        let chunk = t.first_chunk + k as u64;
        checks.push(LeafCheck { out: out.sub(off, n)?, digest: c.record.digest, tensor: &t.name, chunk });
        off += n;
    }
    Ok(())
}

/// Term rows (1 KiB blocks of input) of the leaf digest scratch: 1 GiB of
/// rebuilt bytes per pair of launches, 64 MiB of device memory. Each pair
/// costs a whole chunk's sequential fold whatever it holds, so fewer, larger
/// pairs check a large model faster. The largest chunk, 2^27 bytes (spec §11,
/// `chunk_words` ≤ 2^24 of ≤ 8 bytes), takes 2^17 rows, so every chunk fits
/// alone.
const LEAF_SCRATCH_BLOCKS: u64 = 1 << 20;

/// Device buffers of the leaf digest check, allocated with the loader (the
/// term scratch) or on first need and only ever grown (table and digests),
/// then reused by every call.
struct LeafScratch {
    /// Pass 1's block terms: [`LEAF_SCRATCH_BLOCKS`] rows of 8 `u64`.
    terms: CudaSlice<u64>,
    /// `LeafDesc` tables of every batch of a call, one after the other.
    table: CudaSlice<u8>,
    /// Two `u64` per checked chunk.
    digests: CudaSlice<u64>,
}

struct Slot {
    host: PinnedHostSlice<u8>,
    dev: CudaSlice<u8>,
    sums: CudaSlice<u64>,
    /// The group table of grouped value order: rows of [`KEYS`] `u32`.
    groups: CudaSlice<u32>,
    stream: Arc<CudaStream>,
    uploaded: CudaEvent,
    done: CudaEvent,
    in_use: bool,
}

/// Rebuilds target tensors on the GPU from host-resident deltas.
pub struct Loader {
    gpu: Arc<Gpu>,
    cfg: LoaderConfig,
    slots: Vec<Slot>,
    next: usize,
    flag: CudaSlice<u32>,
    flag_host: PinnedHostSlice<u32>,
    start: CudaEvent,
    /// `None` when digests are not checked.
    leaf: Option<LeafScratch>,
}

impl std::fmt::Debug for Loader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loader").field("gpu", &self.gpu.name()).field("cfg", &self.cfg).finish()
    }
}

/// A chunk to rebuild and where: `base` and `out` are its words in device
/// memory; `host` is its tensor's [`TensorRef::host`]; `label` its tensor's
/// name and its index in the file, which errors name.
struct Job<'c, 'a> {
    chunk: &'c ChunkRef<'a>,
    width: WordWidth,
    host: Option<&'a [u8]>,
    base: DevRange,
    out: DevRange,
    label: Option<(&'c str, u64)>,
}

/// A stream to decode or copy into a host slot: its offset there, its
/// record, its stored bytes, and which chunk of the batch it belongs to.
type StreamTask<'a> = (usize, StreamRecord, &'a [u8], usize);

const fn align(x: usize, a: usize) -> usize {
    x.div_ceil(a) * a
}

/// Where a stream's bytes lie in a slot: in the part uploaded from the
/// host slot, in the part only the device writes (lane rANS output and
/// scratch), or in the raw span copied straight from the page-locked host
/// delta (at that offset of the delta). Offsets are relative to their part.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Place {
    Upload(usize),
    Device(usize),
    Host(usize),
}

/// A lane rANS stream of a batch: its checked header, its decoder level,
/// the contexts its place allows, where its stored bytes lie, and where its
/// scratch lies in the device part.
#[derive(Clone, Copy, Debug)]
struct RansPlace {
    header: Header,
    level: u32,
    allowed: u32,
    stored: Place,
    scratch: usize,
}

/// The streams of one job of a batch.
#[derive(Clone, Debug, Default)]
struct JobPlace {
    /// Per stream, the decoded bytes that the apply kernels read.
    streams: Vec<Place>,
    /// Per stream, lane rANS only.
    rans: Vec<Option<RansPlace>>,
    /// Context 1 in a sparse chunk: the decoder level before which its
    /// positions are rebuilt, and their offset in the device part.
    positions: Option<(u32, usize)>,
}

/// Where the streams of one batch go in a slot. Device layout:
/// `[tables | upload part | device part | raw copy of the host delta]`,
/// the tables being the apply descriptors, then the lane rANS work's
/// ([`RansWork::write_tables`]); the host slot holds the tables and the
/// upload part, uploaded in one copy.
struct Plan<'a> {
    /// Jobs in the batch.
    count: usize,
    /// Bytes of the apply descriptor table (aligned).
    table: usize,
    /// Bytes of the lane rANS tables (aligned), after the apply table.
    rans_tables: usize,
    /// End of the upload part (tables included).
    decoded_end: usize,
    /// Start of the device part.
    device_start: usize,
    /// The host range copied as it is, and where it lands in the slot.
    raw: Option<(&'a [u8], usize)>,
    /// The offset of that range in the host delta.
    raw_lo: usize,
    /// Every stream of every job.
    places: Vec<JobPlace>,
    /// Streams to decode or copy into the host slot.
    tasks: Vec<StreamTask<'a>>,
}

impl Plan<'_> {
    /// The slot offset of a place.
    fn offset(&self, place: Place) -> usize {
        match (place, self.raw) {
            (Place::Upload(o), _) => self.table + self.rans_tables + o,
            (Place::Device(o), _) => self.device_start + o,
            (Place::Host(o), Some((_, at))) => at + o - self.raw_lo,
            // a host place implies a raw span
            (Place::Host(_), None) => usize::MAX,
        }
    }
}

impl Loader {
    /// Allocates the staging ring: `slots` page-locked host buffers (plain,
    /// not write-combined, since the decoder reads back its own output) and
    /// as many device buffers.
    pub fn new(gpu: Arc<Gpu>, cfg: LoaderConfig) -> Result<Self> {
        if cfg.slots == 0 || cfg.slot_bytes < 4096 || cfg.max_chunks == 0 {
            return Err(GpuError::invalid("loader needs ≥ 1 slot of ≥ 4096 bytes"));
        }
        let ctx = gpu.context().clone();
        let max_tiles = cfg.slot_bytes / 64 + cfg.max_chunks + 1;
        let group_rows = Self::max_group_rows(&cfg);
        let mut slots = Vec::with_capacity(cfg.slots);
        for _ in 0..cfg.slots {
            // SAFETY: the memory is uninitialized bytes; every byte is written
            // (decoded or copied) before it is uploaded, and `u8` has no
            // invalid bit patterns.
            let host = unsafe { ctx.alloc_pinned_with_flags::<u8>(cfg.slot_bytes, 0) }?;
            let stream = gpu.new_stream()?;
            let dev = gpu.alloc_zeros::<u8>(cfg.slot_bytes)?;
            let sums = gpu.alloc_zeros::<u64>(max_tiles)?;
            let groups = gpu.alloc_zeros::<u32>(group_rows * KEYS)?;
            let uploaded = ctx.new_event(None)?;
            let done = ctx.new_event(None)?;
            slots.push(Slot { host, dev, sums, groups, stream, uploaded, done, in_use: false });
        }
        let flag = gpu.alloc_zeros::<u32>(flag::WORDS)?;
        // SAFETY: only ever read after a device-to-host copy fills it.
        let flag_host = unsafe { ctx.alloc_pinned_with_flags::<u32>(flag::WORDS, 0) }?;
        let start = ctx.new_event(None)?;
        let leaf = if cfg.verify_digests {
            let rows = usize::try_from(LEAF_SCRATCH_BLOCKS).unwrap_or(usize::MAX);
            Some(LeafScratch {
                terms: gpu.alloc_zeros::<u64>(rows * LEAF_TERM_BYTES_PER_BLOCK / 8)?,
                table: gpu.alloc_zeros::<u8>(1)?,
                digests: gpu.alloc_zeros::<u64>(1)?,
            })
        } else {
            None
        };
        Ok(Self { gpu, cfg, slots, next: 0, flag, flag_host, start, leaf })
    }

    /// Rows of the group table per slot. A chunk that fits a slot has at
    /// most `slot_bytes / 4096 + 1` tiles (each tile covers at least 4096
    /// bytes of decoded streams) and takes one row more; batches of many
    /// small grouped chunks are cut at this bound.
    fn max_group_rows(cfg: &LoaderConfig) -> usize {
        cfg.slot_bytes / 4096 + 2 * cfg.max_chunks.min(512) + 2
    }

    /// The device.
    #[must_use]
    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    /// The configuration.
    #[must_use]
    pub fn config(&self) -> LoaderConfig {
        self.cfg
    }

    /// API (a): rebuilds every tensor of `delta` against device-resident base
    /// tensors (one per delta tensor, in order) into new device buffers.
    ///
    /// Device-resident bases are taken as the ones the delta was made
    /// against: check their host copies with [`crate::delta::host_bases`]
    /// before uploading them. With digests on, a wrong base still fails
    /// (`E_CHUNK_DIGEST`), but only after the outputs were written.
    pub fn load(&mut self, delta: &[TensorRef<'_>], base: &[&CudaSlice<u8>]) -> Result<Vec<CudaSlice<u8>>> {
        if base.len() != delta.len() {
            return Err(GpuError::invalid("one base tensor per delta tensor"));
        }
        let mut outs = Vec::with_capacity(delta.len());
        for t in delta {
            t.validate()?;
            // SAFETY: every byte is written before use: by the base copy or
            // zero fill in `prepare`, or by dense/raw chunks covering it all.
            outs.push(unsafe { self.gpu.stream().alloc::<u8>(t.bytes().max(1)) }?);
        }
        let mut jobs = Vec::new();
        let mut checks = Vec::new();
        for ((t, b), o) in delta.iter().zip(base).zip(&outs) {
            let main = self.gpu.stream().clone();
            let b = DevRange::all(*b, &main)?;
            let o = DevRange::of(o, &main, 0, t.bytes())?;
            self.plan_tensor(t, b, o, &mut jobs)?;
            leaf_checks(t, o, &mut checks)?;
        }
        self.run(&jobs, Stage::Apply).map_err(|e| locate_device_fault(delta, e))?;
        self.check_leaves(&checks)?;
        Ok(outs)
    }

    /// API (a), in place: `bufs` hold the base tensors (each exactly the
    /// target's size) and are overwritten with the target.
    pub fn apply_in_place(&mut self, delta: &[TensorRef<'_>], bufs: &mut [CudaSlice<u8>]) -> Result<()> {
        if bufs.len() != delta.len() {
            return Err(GpuError::invalid("one buffer per delta tensor"));
        }
        let mut jobs = Vec::new();
        let mut checks = Vec::new();
        let main = self.gpu.stream().clone();
        for (t, b) in delta.iter().zip(bufs.iter()) {
            t.validate()?;
            if b.num_bytes() != t.bytes() {
                return Err(GpuError::invalid(format!("{}: in-place buffer size differs from the target's", t.name)));
            }
            let r = DevRange::all(b, &main)?;
            self.plan_chunks(t, r, r, &mut jobs)?;
            leaf_checks(t, r, &mut checks)?;
        }
        self.run(&jobs, Stage::Apply).map_err(|e| locate_device_fault(delta, e))?;
        self.check_leaves(&checks)
    }

    /// API (a) with a host-resident base: uploads each base tensor through the
    /// pinned ring, then rebuilds in place.
    pub fn load_host_base(&mut self, delta: &[TensorRef<'_>], base: &[&[u8]]) -> Result<Vec<CudaSlice<u8>>> {
        if base.len() != delta.len() {
            return Err(GpuError::invalid("one base tensor per delta tensor"));
        }
        let mut outs = Vec::with_capacity(delta.len());
        for (t, b) in delta.iter().zip(base) {
            t.validate()?;
            let mut out = self.gpu.alloc_zeros::<u8>(t.bytes())?;
            let n = b.len().min(t.bytes());
            self.upload_staged(&b[..n], &mut out)?;
            outs.push(out);
        }
        self.apply_in_place(delta, &mut outs)?;
        Ok(outs)
    }

    /// API (b): rebuilds one tensor into `out` from its resident `base`.
    pub fn materialize_into(&mut self, t: &TensorRef<'_>, base: &CudaSlice<u8>, out: &mut CudaSlice<u8>) -> Result<()> {
        t.validate()?;
        if out.num_bytes() < t.bytes() {
            return Err(GpuError::invalid(format!("{}: output buffer too small", t.name)));
        }
        let main = self.gpu.stream().clone();
        let b = DevRange::all(base, &main)?;
        let o = DevRange::of(out, &main, 0, t.bytes())?;
        let mut jobs = Vec::new();
        self.plan_tensor(t, b, o, &mut jobs)?;
        let mut checks = Vec::new();
        leaf_checks(t, o, &mut checks)?;
        self.run(&jobs, Stage::Apply).map_err(|e| locate_device_fault(std::slice::from_ref(t), e))?;
        self.check_leaves(&checks)
    }

    /// API (b), in place: `buf` holds the base and is overwritten with the target.
    pub fn materialize_in_place(&mut self, t: &TensorRef<'_>, buf: &mut CudaSlice<u8>) -> Result<()> {
        self.apply_in_place(std::slice::from_ref(t), std::slice::from_mut(buf))
    }

    /// Absolute positions of a sparse chunk, rebuilt on the GPU (prefix sum of
    /// the gaps, or ranks of the bitmap), copied back.
    pub fn positions(&mut self, chunk: &ChunkRef<'_>, width: WordWidth) -> Result<Vec<u32>> {
        chunk.validate(width)?;
        let m = chunk.record.changed_count as usize;
        let out = self.gpu.alloc_zeros::<u32>(m.max(1))?;
        let r = DevRange::of(&out, self.gpu.stream(), 0, m * 4)?;
        self.run(&[Job { chunk, width, host: None, base: r, out: r, label: None }], Stage::Positions)?;
        let mut v = self.gpu.download(&out)?;
        v.truncate(m);
        Ok(v)
    }

    /// Copies host bytes into the start of `dst` through the pinned ring
    /// (no pageable copy), and waits.
    pub fn upload_staged(&mut self, src: &[u8], dst: &mut CudaSlice<u8>) -> Result<()> {
        if src.len() > dst.num_bytes() {
            return Err(GpuError::invalid("upload larger than the destination"));
        }
        let mut off = 0;
        while off < src.len() {
            let n = (src.len() - off).min(self.cfg.slot_bytes);
            let slot = self.take_slot()?;
            let s = &mut self.slots[slot];
            let host = s.host.as_mut_slice()?;
            host[..n]
                .par_chunks_mut(1 << 20)
                .zip(src[off..off + n].par_chunks(1 << 20))
                .for_each(|(d, s)| d.copy_from_slice(s));
            let d = DevRange::of(dst, &s.stream, off, n)?;
            // SAFETY: `d` is inside `dst`; the host bytes are page-locked and
            // are not written again before `uploaded` completes (take_slot).
            unsafe { cu::memcpy_htod_async(d.ptr(), &host[..n], s.stream.cu_stream()) }?;
            s.uploaded.record(&s.stream)?;
            s.in_use = true;
            off += n;
        }
        for s in &self.slots {
            s.stream.synchronize()?;
        }
        Ok(())
    }

    /// Prepares `out` for a tensor and appends its chunks to `jobs`.
    fn plan_tensor<'c, 'a>(
        &mut self,
        t: &'c TensorRef<'a>,
        base: DevRange,
        out: DevRange,
        jobs: &mut Vec<Job<'c, 'a>>,
    ) -> Result<()> {
        if self.prepare_out(base, out, t.bytes(), t.width, t.needs_base_words())? {
            self.plan_chunks(t, out, out, jobs)
        } else {
            self.plan_chunks(t, base, out, jobs)
        }
    }

    /// Copies the base words into `out` on the main stream where the chunks
    /// need them (sparse or unchanged chunks, or a base shorter than the
    /// target, whose missing words read as 0 per spec "Words"). Returns
    /// whether the chunks then apply in place on `out`.
    fn prepare_out(
        &mut self,
        base: DevRange,
        out: DevRange,
        tb: usize,
        width: WordWidth,
        needs_base: bool,
    ) -> Result<bool> {
        if base.len() == tb && !needs_base {
            return Ok(false);
        }
        let main = self.gpu.stream().clone();
        let n = base.len().min(tb) / width.bytes() * width.bytes();
        if base.ptr() < out.ptr() + tb as u64 && out.ptr() < base.ptr() + n as u64 {
            return Err(GpuError::invalid("base and output overlap"));
        }
        if n > 0 {
            // SAFETY: both ranges lie inside live buffers (DevRange) and do
            // not overlap (checked above).
            unsafe { cu::memcpy_dtod_async(out.ptr(), base.ptr(), n, main.cu_stream()) }?;
        }
        if n < tb {
            // SAFETY: `out.ptr() + n .. + tb` is inside `out`.
            unsafe { cu::memset_d8_async(out.ptr() + n as u64, 0, tb - n, main.cu_stream()) }?;
        }
        Ok(true)
    }

    fn plan_chunks<'c, 'a>(
        &self,
        t: &'c TensorRef<'a>,
        base: DevRange,
        out: DevRange,
        jobs: &mut Vec<Job<'c, 'a>>,
    ) -> Result<()> {
        let w = t.width.bytes();
        let mut off = 0usize;
        for (k, c) in t.chunks.iter().enumerate() {
            let n = c.words as usize * w;
            if c.record.encoding != Encoding::Unchanged {
                jobs.push(Job {
                    chunk: c,
                    width: t.width,
                    host: t.host,
                    base: base.sub(off, n)?,
                    out: out.sub(off, n)?,
                    label: Some((&t.name, t.first_chunk + k as u64)),
                });
            }
            off += n;
        }
        Ok(())
    }

    fn take_slot(&mut self) -> Result<usize> {
        let i = self.next;
        self.next = (self.next + 1) % self.slots.len();
        let s = &mut self.slots[i];
        if s.in_use {
            s.uploaded.synchronize()?;
            s.in_use = false;
        }
        Ok(i)
    }

    /// Resets the device flag words on the main stream and records
    /// `start`, which kernels wait for (the flag reset and the base copy
    /// into the output); uploads do not.
    fn begin(&mut self) -> Result<()> {
        let main = self.gpu.stream().clone();
        let flag = DevRange::all(&self.flag, &main)?;
        // SAFETY: the flag buffer is live and `flag::WORDS` u32 long: the
        // bits to 0, the fault job words to u32::MAX (none).
        unsafe {
            cu::memset_d8_async(flag.ptr(), 0, 4, main.cu_stream())?;
            cu::memset_d8_async(flag.ptr() + 4, 0xFF, 4 * (flag::WORDS - 1), main.cu_stream())?;
        }
        self.start.record(&main)?;
        Ok(())
    }

    /// Runs jobs: batches them into slots, uploads, decodes, launches; then
    /// waits once and checks the device error flag. Then, unless the caller
    /// opted out ([`LoaderConfig::verify_digests`]), the leaf digest of every
    /// rebuilt chunk is computed on the device and compared with the chunk's
    /// record (spec §10); a mismatch is the library's `E_CHUNK_DIGEST`.
    fn run(&mut self, jobs: &[Job<'_, '_>], stage: Stage) -> Result<()> {
        self.begin()?;
        let mut i = 0;
        while i < jobs.len() {
            let plan = self.plan_batch(&jobs[i..], stage)?;
            self.flush(&jobs[i..i + plan.count], &plan, stage, i)?;
            i += plan.count;
        }
        self.finish(|job| jobs.get(job as usize).and_then(|j| j.label))
    }

    /// Chooses the next batch (a prefix of `jobs` of one word width that fits
    /// a slot) and places its streams: stored streams and the stored bytes
    /// of lane rANS streams are read where they land when they lie in the
    /// page-locked host delta, else copied into the upload part; zstd
    /// streams are decoded there by the CPU; lane rANS streams decode on the
    /// device into the device part, with their scratch and, for context 1
    /// in sparse chunks, their positions.
    fn plan_batch<'a>(&self, jobs: &[Job<'_, 'a>], stage: Stage) -> Result<Plan<'a>> {
        let width = jobs[0].width;
        let max_tiles = self.slots[0].sums.len();
        let max_rows = self.slots[0].groups.len() / KEYS;
        let host = jobs[0].host;
        let mut places: Vec<JobPlace> = Vec::new();
        let (mut upload, mut device) = (0usize, 0usize);
        let mut raw: Option<(usize, usize)> = None;
        let (mut tiles, mut rows, mut rans_count, mut positions_count) = (0usize, 0usize, 0usize, 0usize);
        for job in jobs.iter().take(self.cfg.max_chunks) {
            let c = job.chunk;
            if job.width != width {
                break;
            }
            c.validate(width)?;
            let plan = ChunkPlan::new(c, width).map_err(|e| label_error(e, job.label))?;
            let np = c.position_stream_count();
            let (mut up, mut dev, mut span) = (upload, device, raw);
            let mut place = JobPlace::default();
            let mut rc = 0;
            for (k, (r, bytes)) in c.streams.iter().zip(c.stored_streams()).enumerate() {
                let rans = plan.as_ref().and_then(|p| p.streams[k]);
                // Bytes copied as they are (a stored stream, or a lane rANS
                // stream's stored bytes) are read where they land, if they lie
                // in the page-locked host buffer; a stored stream of words
                // keeps its word alignment.
                let at = host
                    .filter(|_| job.host.map(<[u8]>::as_ptr) == host.map(<[u8]>::as_ptr))
                    .and_then(|h| offset_in(h, bytes))
                    .filter(|&o| {
                        rans.is_some()
                            || (r.codec == Codec::Stored
                                && (k < np || c.record.value_layout != ValueLayout::Words || o % width.bytes() == 0))
                    });
                let at = at.filter(|_| rans.is_none() || stage == Stage::Apply || k < np);
                if let Some(o) = at {
                    let end = o + bytes.len();
                    span = Some(span.map_or((o, end), |(lo, hi)| (lo.min(o), hi.max(end))));
                }
                let decoded = stage == Stage::Apply || k < np;
                match rans {
                    Some(_) if !decoded => {
                        // not needed by the positions stage: room only
                        place.rans.push(None);
                        place.streams.push(Place::Device(dev));
                        dev = align(dev + r.decoded_len as usize, 16);
                    }
                    Some((header, level)) => {
                        let stored = at.map_or_else(
                            || {
                                let o = up;
                                up = align(up + r.stored_len as usize, 16);
                                Place::Upload(o)
                            },
                            Place::Host,
                        );
                        place.streams.push(Place::Device(dev));
                        dev = align(dev + r.decoded_len as usize, 16);
                        let scratch = dev;
                        dev += header.scratch_bytes(r.decoded_len);
                        let allowed = allowed_contexts(c, k, width);
                        place.rans.push(Some(RansPlace { header, level, allowed, stored, scratch }));
                        rc += 1;
                    }
                    None => {
                        place.rans.push(None);
                        place.streams.push(at.map_or_else(
                            || {
                                let o = up;
                                up = align(up + r.decoded_len as usize, 16);
                                Place::Upload(o)
                            },
                            Place::Host,
                        ));
                    }
                }
            }
            let mut pc = 0;
            if let (Some(before), Stage::Apply) = (plan.as_ref().and_then(|p| p.positions_before), stage) {
                place.positions = Some((before, dev));
                dev = align(dev + 4 * c.record.changed_count as usize, 16);
                pc = 1;
            }
            let t = Batch::tiles_of(&c.record, c.words) as usize;
            let g = Batch::group_rows_of(&c.record, c.words) as usize;
            let tables = align((places.len() + 1) * ChunkDesc::BYTES, 64)
                + RansWork::table_bytes_for(rans_count + rc, positions_count + pc);
            let raw_len = span.map_or(0, |(lo, hi)| hi - lo + 16);
            if tables + up + 16 + dev + 16 + raw_len > self.cfg.slot_bytes
                || tiles + t > max_tiles
                || rows + g > max_rows
            {
                if places.is_empty() {
                    return Err(GpuError::invalid(
                        "a chunk does not fit a staging slot; raise LoaderConfig::slot_bytes",
                    ));
                }
                break;
            }
            (upload, device, raw) = (up, dev, span);
            tiles += t;
            rows += g;
            rans_count += rc;
            positions_count += pc;
            places.push(place);
        }
        let count = places.len();
        let table = align(count * ChunkDesc::BYTES, 64);
        let rans_tables = RansWork::table_bytes_for(rans_count, positions_count);
        let decoded_end = table + rans_tables + upload;
        let device_start = align(decoded_end, 16);
        let raw_lo = raw.map_or(0, |(lo, _)| lo);
        let raw = match (raw, host) {
            // Same offset modulo 16 on both sides keeps every stream's alignment.
            (Some((lo, hi)), Some(h)) => Some((&h[lo..hi], align(device_start + device, 16) + lo % 16)),
            _ => None,
        };
        let mut tasks = Vec::new();
        for (j, (job, place)) in jobs.iter().zip(&places).enumerate() {
            for (k, (r, bytes)) in job.chunk.streams.iter().zip(job.chunk.stored_streams()).enumerate() {
                match (place.rans[k], place.streams[k]) {
                    (Some(RansPlace { stored: Place::Upload(o), .. }), _) | (None, Place::Upload(o)) => {
                        tasks.push((table + rans_tables + o, *r, bytes, j));
                    }
                    _ => {}
                }
            }
        }
        Ok(Plan { count, table, rans_tables, decoded_end, device_start, raw, raw_lo, places, tasks })
    }

    /// Uploads one batch into a slot (the raw span first, straight from the
    /// page-locked host delta, while the CPU decodes the rest) and launches
    /// its kernels: the lane rANS work, then the apply (or positions)
    /// kernels. `first_job` is the index of the batch's first job in the run,
    /// which faults report.
    fn flush(&mut self, jobs: &[Job<'_, '_>], plan: &Plan<'_>, stage: Stage, first_job: usize) -> Result<()> {
        let slot = self.take_slot()?;
        let s = &mut self.slots[slot];
        let dev = DevRange::all(&s.dev, &s.stream)?;
        if let Some((span, at)) = plan.raw {
            let d = dev.sub(at, span.len())?;
            // SAFETY: `d` lies inside the slot's device buffer; `span` is
            // borrowed for the whole call, which synchronizes before it returns.
            unsafe { cu::memcpy_htod_async(d.ptr(), span, s.stream.cu_stream()) }?;
        }
        let host = s.host.as_mut_slice()?;
        decode_tasks(&mut host[..plan.decoded_end], &plan.tasks, |j| jobs[j].label)?;
        let mut batch = Batch::new(jobs[0].width);
        let mut work = RansWork::default();
        for (jj, (j, place)) in jobs.iter().zip(&plan.places).enumerate() {
            let c = j.chunk;
            let streams = place
                .streams
                .iter()
                .zip(c.streams)
                .map(|(&p, r)| dev.sub(plan.offset(p), r.decoded_len as usize))
                .collect::<Result<Vec<_>>>()?;
            match stage {
                Stage::Apply => batch.push(c, &streams, j.base, j.out)?,
                Stage::Positions => batch.push_positions(c, &streams, j.out)?,
            }
            let positions = match place.positions {
                Some((before, o)) => {
                    let p = dev.sub(plan.device_start + o, 4 * c.record.changed_count as usize)?;
                    work.push_positions(before, c, &streams, p, j.width)?;
                    Some(p)
                }
                None => None,
            };
            let job = u32::try_from(first_job + jj).map_err(|_| GpuError::invalid("too many chunks"))?;
            for (q, rp) in place.rans.iter().enumerate() {
                let Some(rp) = rp else { continue };
                let r = &c.streams[q];
                let context = match rp.header.context {
                    rans::context::NONE => RansContext::None,
                    rans::context::HIGHER_PLANE => RansContext::HigherPlane(streams[q + 1]),
                    _ => RansContext::BaseKey { base: j.base, width: j.width, positions },
                };
                let stream = RansStream {
                    stored: dev.sub(plan.offset(rp.stored), r.stored_len as usize)?,
                    decoded: streams[q],
                    scratch: dev.sub(plan.device_start + rp.scratch, rp.header.scratch_bytes(r.decoded_len))?,
                    context,
                    header: rp.header,
                    allowed: rp.allowed,
                    level: rp.level,
                    job,
                };
                work.streams.push(&stream, r.stored_len, r.decoded_len)?;
            }
        }
        work.seal()?;
        if batch.table_bytes() > plan.table || work.table_bytes() > plan.rans_tables {
            return Err(GpuError::invalid("descriptor tables larger than planned"));
        }
        batch.write_table(&mut host[..batch.table_bytes()]);
        let tables = plan.table..plan.table + plan.rans_tables;
        work.write_tables(&mut host[tables.clone()]);
        // SAFETY: the prefix fits the device slot (same size as the host
        // slot); the page-locked host bytes stay untouched until `uploaded`
        // completes (take_slot waits for it before reuse).
        unsafe { cu::memcpy_htod_async(dev.ptr(), host_prefix(&s.host, plan.decoded_end)?, s.stream.cu_stream()) }?;
        s.uploaded.record(&s.stream)?;
        s.in_use = true;
        s.stream.wait(&self.start)?;
        let sums = DevRange::all(&s.sums, &s.stream)?;
        let groups = DevRange::all(&s.groups, &s.stream)?;
        let flag = DevRange::all(&self.flag, &s.stream)?;
        work.launch(&self.gpu, &s.stream, dev.sub(tables.start, tables.len())?, sums, groups, flag)?;
        self.gpu.launch(&s.stream, &batch, stage, dev.sub(0, plan.table)?, sums, groups, flag)
    }

    /// Decodes every stream of `delta` once into one device buffer, so that
    /// later applies launch kernels only (weights sync of many fine-tunes of
    /// one base, or repeated just-in-time materialization). zstd streams are
    /// decoded by the CPU, lane rANS streams by the GPU; a lane rANS stream
    /// whose context needs the base (context 1, or the planes decoded under
    /// one) is kept as its stored bytes and decoded at each apply, against
    /// the base that apply is given.
    pub fn stage_on_device(&mut self, delta: &[TensorRef<'_>]) -> Result<DeviceDelta> {
        // The data: [host part: streams decoded by the CPU or stored, and the
        // stored bytes of deferred streams | device part: lane rANS streams
        // decoded here]. Device part offsets are made absolute at the end.
        let mut tensors = Vec::with_capacity(delta.len());
        let (mut host_total, mut device_total) = (0usize, 0usize);
        let mut device_part: Vec<(usize, usize, usize)> = Vec::new();
        let mut order: Vec<StagePending<'_, '_>> = Vec::new();
        for (ti, t) in delta.iter().enumerate() {
            t.validate()?;
            let mut chunks = Vec::new();
            let mut word = 0u64;
            for (k, c) in t.chunks.iter().enumerate() {
                let index = t.first_chunk + k as u64;
                if c.record.encoding != Encoding::Unchanged {
                    let plan = ChunkPlan::new(c, t.width).map_err(|e| label_error(e, Some((&t.name, index))))?;
                    let host_start = host_total;
                    let mut at = Vec::with_capacity(c.streams.len());
                    for (q, r) in c.streams.iter().enumerate() {
                        let needs_base = plan.as_ref().and_then(|p| p.streams[q].map(|_| p.needs_base[q]));
                        match needs_base {
                            Some(false) => {
                                device_part.push((ti, chunks.len(), q));
                                at.push(Staged::Decoded(device_total));
                                device_total = align(device_total + r.decoded_len as usize, 16);
                            }
                            Some(true) => {
                                at.push(Staged::Deferred(host_total));
                                host_total = align(host_total + r.stored_len as usize, 16);
                            }
                            None => {
                                at.push(Staged::Decoded(host_total));
                                host_total = align(host_total + r.decoded_len as usize, 16);
                            }
                        }
                    }
                    order.push(StagePending {
                        chunk: c,
                        name: &t.name,
                        index,
                        width: t.width,
                        host: host_start..host_total,
                        at: (ti, chunks.len()),
                        plan: plan.clone(),
                    });
                    let deferred = at.iter().any(|a| matches!(a, Staged::Deferred(_)));
                    chunks.push(StagedChunk {
                        record: c.record,
                        streams: c.streams.to_vec(),
                        words: c.words,
                        at,
                        plan: plan.filter(|_| deferred),
                        word,
                        index,
                    });
                }
                word += u64::from(c.words);
            }
            tensors.push(StagedTensor {
                name: t.name.clone(),
                width: t.width,
                words: t.words,
                needs_base: t.needs_base_words(),
                chunks,
                first_chunk: t.first_chunk,
                leaves: t.chunks.iter().map(|c| (c.record.digest, c.words)).collect(),
            });
        }
        for (ti, ci, q) in device_part {
            if let Staged::Decoded(o) = &mut tensors[ti].chunks[ci].at[q] {
                *o += host_total;
            }
        }
        let total = host_total + device_total;
        // SAFETY: every byte of a stream range is written by the uploads or
        // the decoder below before any kernel reads it; padding bytes are
        // never read.
        let data = unsafe { self.gpu.stream().alloc::<u8>(total.max(1)) }?;
        self.begin()?;
        let mut i = 0;
        while i < order.len() {
            let end = self.stage_batch(&order[i..], &tensors, &data, i)?;
            i += end;
        }
        self.finish(|job| order.get(job as usize).map(|p| (p.name, p.index)))?;
        Ok(DeviceDelta { data, tensors })
    }

    /// Stages a prefix of `order` that fits a slot (job indices from
    /// `first_job`): copies their host parts into the data through the slot
    /// and decodes their base-free lane rANS streams into the device part.
    /// Returns the number of chunks staged.
    fn stage_batch(
        &mut self,
        order: &[StagePending<'_, '_>],
        tensors: &[StagedTensor],
        data: &CudaSlice<u8>,
        first_job: usize,
    ) -> Result<usize> {
        // Host slot: [lane rANS table | their stored bytes | host part];
        // device slot: [lane rANS table | their stored bytes | scratch].
        let staged = |p: &StagePending<'_, '_>| &tensors[p.at.0].chunks[p.at.1];
        let on_device = |p: &StagePending<'_, '_>, q: usize| {
            p.plan.as_ref().and_then(|plan| plan.streams[q]).filter(|_| matches!(staged(p).at[q], Staged::Decoded(_)))
        };
        let first = order[0].host.start;
        let (mut end, mut count, mut stored, mut scratch) = (0, 0usize, 0usize, 0usize);
        while end < order.len() {
            let p = &order[end];
            let (mut c, mut st, mut sc) = (count, stored, scratch);
            for (q, r) in p.chunk.streams.iter().enumerate() {
                if let Some((h, _)) = on_device(p, q) {
                    c += 1;
                    st = align(st + r.stored_len as usize, 16);
                    sc += h.scratch_bytes(r.decoded_len);
                }
            }
            let used = p.host.end - first;
            if RansWork::table_bytes_for(c, 0) + st + used.max(sc + 16) > self.cfg.slot_bytes {
                break;
            }
            (count, stored, scratch) = (c, st, sc);
            end += 1;
        }
        if end == 0 {
            return Err(GpuError::invalid("a chunk does not fit a staging slot; raise LoaderConfig::slot_bytes"));
        }
        let tables = RansWork::table_bytes_for(count, 0);
        let hp = tables + stored;
        let used = order[end - 1].host.end - first;
        let mut tasks = Vec::new();
        let mut rans_at = Vec::new();
        let mut at = tables;
        for (k, p) in order[..end].iter().enumerate() {
            let sc = staged(p);
            for (q, (r, bytes)) in p.chunk.streams.iter().zip(p.chunk.stored_streams()).enumerate() {
                if on_device(p, q).is_some() {
                    tasks.push((at, *r, bytes, k));
                    rans_at.push(at);
                    at = align(at + r.stored_len as usize, 16);
                } else {
                    let (Staged::Decoded(o) | Staged::Deferred(o)) = sc.at[q];
                    tasks.push((hp + o - first, *r, bytes, k));
                }
            }
        }
        // decode_tasks takes the streams in increasing offsets
        tasks.sort_by_key(|t| t.0);
        let slot = self.take_slot()?;
        let s = &mut self.slots[slot];
        let host = s.host.as_mut_slice()?;
        let batch = &order[..end];
        decode_tasks(&mut host[..hp + used], &tasks, |k| Some((batch[k].name, batch[k].index)))?;
        let dev = DevRange::all(&s.dev, &s.stream)?;
        let all = DevRange::all(data, &s.stream)?;
        let mut work = RansWork::default();
        let mut rans_at = rans_at.into_iter();
        let mut scratch_at = align(hp, 16);
        for (k, p) in batch.iter().enumerate() {
            let sc = staged(p);
            let job = u32::try_from(first_job + k).map_err(|_| GpuError::invalid("too many chunks"))?;
            for (q, r) in p.chunk.streams.iter().enumerate() {
                let Some((header, level)) = on_device(p, q) else { continue };
                let context = match header.context {
                    rans::context::HIGHER_PLANE => {
                        let Staged::Decoded(above) = sc.at[q + 1] else {
                            return Err(GpuError::invalid("a base-free plane under a deferred one"));
                        };
                        RansContext::HigherPlane(all.sub(above, sc.streams[q + 1].decoded_len as usize)?)
                    }
                    _ => RansContext::None,
                };
                let Staged::Decoded(out) = sc.at[q] else { continue };
                let stream = RansStream {
                    stored: dev.sub(rans_at.next().unwrap_or(0), r.stored_len as usize)?,
                    decoded: all.sub(out, r.decoded_len as usize)?,
                    scratch: dev.sub(scratch_at, header.scratch_bytes(r.decoded_len))?,
                    context,
                    header,
                    allowed: allowed_contexts(p.chunk, q, p.width),
                    level,
                    job,
                };
                scratch_at += header.scratch_bytes(r.decoded_len);
                work.streams.push(&stream, r.stored_len, r.decoded_len)?;
            }
        }
        work.seal()?;
        work.write_tables(&mut host[..tables]);
        let part = all.sub(first, used)?;
        // SAFETY: the table and stored bytes fit the device slot (checked
        // above), `part` lies inside the data; the page-locked host bytes
        // stay untouched until `uploaded` completes.
        unsafe {
            if hp > 0 {
                cu::memcpy_htod_async(dev.ptr(), host_prefix(&s.host, hp)?, s.stream.cu_stream())?;
            }
            if used > 0 {
                cu::memcpy_htod_async(part.ptr(), &host_prefix(&s.host, hp + used)?[hp..], s.stream.cu_stream())?;
            }
        }
        s.uploaded.record(&s.stream)?;
        s.in_use = true;
        s.stream.wait(&self.start)?;
        if !work.is_empty() {
            let sums = DevRange::all(&s.sums, &s.stream)?;
            let groups = DevRange::all(&s.groups, &s.stream)?;
            let flag = DevRange::all(&self.flag, &s.stream)?;
            work.launch(&self.gpu, &s.stream, dev.sub(0, tables)?, sums, groups, flag)?;
        }
        Ok(end)
    }

    /// Rebuilds a device-resident delta in place over `bufs`, which hold the
    /// base tensors (each exactly the target's size). Kernels only: the
    /// streams are already decoded on the device.
    pub fn apply_staged_in_place(&mut self, delta: &DeviceDelta, bufs: &mut [CudaSlice<u8>]) -> Result<()> {
        if bufs.len() != delta.tensors.len() {
            return Err(GpuError::invalid("one buffer per delta tensor"));
        }
        let main = self.gpu.stream().clone();
        let outs = bufs
            .iter()
            .zip(&delta.tensors)
            .map(|(b, t)| {
                if b.num_bytes() != t.bytes() {
                    return Err(GpuError::invalid(format!("{}: in-place buffer size differs", t.name)));
                }
                DevRange::all(b, &main)
            })
            .collect::<Result<Vec<_>>>()?;
        self.run_staged(delta, &outs.clone(), &outs)
    }

    /// Rebuilds a device-resident delta from resident `base` tensors into
    /// `outs` (each at least the target's size).
    pub fn apply_staged(
        &mut self,
        delta: &DeviceDelta,
        base: &[&CudaSlice<u8>],
        outs: &mut [CudaSlice<u8>],
    ) -> Result<()> {
        if base.len() != delta.tensors.len() || outs.len() != delta.tensors.len() {
            return Err(GpuError::invalid("one base and one output per delta tensor"));
        }
        let main = self.gpu.stream().clone();
        let mut bases = Vec::new();
        let mut os = Vec::new();
        for ((t, b), o) in delta.tensors.iter().zip(base).zip(outs.iter()) {
            let tb = t.bytes();
            if o.num_bytes() < tb {
                return Err(GpuError::invalid(format!("{}: output buffer too small", t.name)));
            }
            let b = DevRange::all(*b, &main)?;
            let o = DevRange::of(o, &main, 0, tb)?;
            let in_place = self.prepare_out(b, o, tb, t.width, t.needs_base)?;
            bases.push(if in_place { o } else { b });
            os.push(o);
        }
        self.run_staged(delta, &bases, &os)
    }

    fn run_staged(&mut self, delta: &DeviceDelta, bases: &[DevRange], outs: &[DevRange]) -> Result<()> {
        self.launch_staged(delta, bases, outs)?;
        let mut checks = Vec::new();
        for (t, o) in delta.tensors.iter().zip(outs) {
            let w = t.width.bytes();
            let mut off = 0usize;
            for (k, (digest, words)) in t.leaves.iter().enumerate() {
                let n = *words as usize * w;
                let chunk = t.first_chunk + k as u64;
                checks.push(LeafCheck { out: o.sub(off, n)?, digest: *digest, tensor: &t.name, chunk });
                off += n;
            }
        }
        self.check_leaves(&checks)
    }

    fn launch_staged(&mut self, delta: &DeviceDelta, bases: &[DevRange], outs: &[DevRange]) -> Result<()> {
        self.begin()?;
        let max_tiles = self.slots[0].sums.len();
        let max_rows = self.slots[0].groups.len() / KEYS;
        let table_cap = self.cfg.slot_bytes / ChunkDesc::BYTES;
        let mut first_job = 0usize;
        for ((t, b), o) in delta.tensors.iter().zip(bases).zip(outs) {
            let w = t.width.bytes() as u64;
            let mut pending: Vec<(usize, DevRange, DevRange)> = Vec::new();
            let (mut tiles, mut rows, mut rans_count, mut positions_count, mut device) = (0, 0, 0, 0, 0);
            for (ci, c) in t.chunks.iter().enumerate() {
                let nb = c.words as usize * t.width.bytes();
                let off = usize::try_from(c.word * w).map_err(|_| GpuError::invalid("tensor too large"))?;
                let r = Batch::group_rows_of(&c.record, c.words) as usize;
                if r > max_rows {
                    return Err(GpuError::invalid("a chunk has too many tiles; raise LoaderConfig::slot_bytes"));
                }
                let (rc, pc, dv) = c.deferred_needs();
                let tl = Batch::tiles_of(&c.record, c.words) as usize;
                let cap = self.cfg.max_chunks.min(table_cap);
                // whether the batch, with this chunk added, fits a slot
                let fits = |count: usize, tiles: usize, rows: usize, rans: usize, positions: usize, device: usize| {
                    count < cap
                        && tiles + tl <= max_tiles
                        && rows + r <= max_rows
                        && align((count + 1) * ChunkDesc::BYTES, 64)
                            + RansWork::table_bytes_for(rans + rc, positions + pc)
                            + 16
                            + device
                            + dv
                            <= self.cfg.slot_bytes
                };
                if !fits(pending.len(), tiles, rows, rans_count, positions_count, device) {
                    if pending.is_empty() || !fits(0, 0, 0, 0, 0, 0) {
                        return Err(GpuError::invalid(
                            "a chunk does not fit a staging slot; raise LoaderConfig::slot_bytes",
                        ));
                    }
                    self.flush_staged(delta, t, &pending, first_job)?;
                    pending.clear();
                    (tiles, rows, rans_count, positions_count, device) = (0, 0, 0, 0, 0);
                }
                pending.push((ci, b.sub(off, nb)?, o.sub(off, nb)?));
                (tiles, rows) = (tiles + tl, rows + r);
                (rans_count, positions_count, device) = (rans_count + rc, positions_count + pc, device + dv);
            }
            self.flush_staged(delta, t, &pending, first_job)?;
            first_job += t.chunks.len();
        }
        let labels: Vec<(&str, u64)> =
            delta.tensors.iter().flat_map(|t| t.chunks.iter().map(|c| (t.name.as_str(), c.index))).collect();
        self.finish(|job| labels.get(job as usize).copied())
    }

    /// Launches the chunks `pending` of tensor `t` of a device-resident
    /// delta (each with its base and output words) through a slot: uploads
    /// their descriptor tables, decodes the lane rANS streams that were
    /// deferred to the apply (into the slot), then applies. Chunk `ci` of
    /// the tensor is job `first_job + ci`, which faults report.
    fn flush_staged(
        &mut self,
        delta: &DeviceDelta,
        t: &StagedTensor,
        pending: &[(usize, DevRange, DevRange)],
        first_job: usize,
    ) -> Result<()> {
        if pending.is_empty() {
            return Ok(());
        }
        let (rans_count, positions_count) = pending.iter().fold((0, 0), |(r, p), (ci, _, _)| {
            let (rc, pc, _) = t.chunks[*ci].deferred_needs();
            (r + rc, p + pc)
        });
        let table = align(pending.len() * ChunkDesc::BYTES, 64);
        let rans_tables = RansWork::table_bytes_for(rans_count, positions_count);
        let slot = self.take_slot()?;
        let s = &mut self.slots[slot];
        let dev = DevRange::all(&s.dev, &s.stream)?;
        let data = DevRange::all(&delta.data, &s.stream)?;
        let mut at = align(table + rans_tables, 16);
        let mut take = |len: usize| {
            let r = dev.sub(at, len);
            at = align(at + len, 16);
            r
        };
        let mut batch = Batch::new(t.width);
        let mut work = RansWork::default();
        for &(ci, base, out) in pending {
            let c = &t.chunks[ci];
            let chunk = ChunkRef { record: c.record, streams: &c.streams, stored: &[], words: c.words };
            let streams =
                c.at.iter()
                    .zip(&c.streams)
                    .map(|(a, r)| match a {
                        Staged::Decoded(o) => data.sub(*o, r.decoded_len as usize),
                        Staged::Deferred(_) => take(r.decoded_len as usize),
                    })
                    .collect::<Result<Vec<_>>>()?;
            batch.push(&chunk, &streams, base, out)?;
            let Some(plan) = &c.plan else { continue };
            let positions = match plan.positions_before {
                Some(before) => {
                    let p = take(4 * c.record.changed_count as usize)?;
                    work.push_positions(before, &chunk, &streams, p, t.width)?;
                    Some(p)
                }
                None => None,
            };
            let job = u32::try_from(first_job + ci).map_err(|_| GpuError::invalid("too many chunks"))?;
            for (q, r) in c.streams.iter().enumerate() {
                let (Staged::Deferred(stored), Some((header, level))) = (c.at[q], plan.streams[q]) else { continue };
                let context = match header.context {
                    rans::context::NONE => RansContext::None,
                    rans::context::HIGHER_PLANE => RansContext::HigherPlane(streams[q + 1]),
                    _ => RansContext::BaseKey { base, width: t.width, positions },
                };
                let stream = RansStream {
                    stored: data.sub(stored, r.stored_len as usize)?,
                    decoded: streams[q],
                    scratch: take(header.scratch_bytes(r.decoded_len))?,
                    context,
                    header,
                    allowed: allowed_contexts(&chunk, q, t.width),
                    level,
                    job,
                };
                work.streams.push(&stream, r.stored_len, r.decoded_len)?;
            }
        }
        work.seal()?;
        if batch.table_bytes() > table || work.table_bytes() > rans_tables {
            return Err(GpuError::invalid("descriptor tables larger than planned"));
        }
        let host = s.host.as_mut_slice()?;
        batch.write_table(&mut host[..batch.table_bytes()]);
        work.write_tables(&mut host[table..table + rans_tables]);
        let n = table + rans_tables;
        // SAFETY: the tables fit the slot (the caller checked the batch
        // against `slot_bytes`); host bytes untouched until `uploaded`
        // completes.
        unsafe { cu::memcpy_htod_async(dev.ptr(), host_prefix(&s.host, n)?, s.stream.cu_stream()) }?;
        s.uploaded.record(&s.stream)?;
        s.in_use = true;
        s.stream.wait(&self.start)?;
        let sums = DevRange::all(&s.sums, &s.stream)?;
        let groups = DevRange::all(&s.groups, &s.stream)?;
        let flag = DevRange::all(&self.flag, &s.stream)?;
        work.launch(&self.gpu, &s.stream, dev.sub(table, rans_tables)?, sums, groups, flag)?;
        self.gpu.launch(&s.stream, &batch, Stage::Apply, dev.sub(0, batch.table_bytes())?, sums, groups, flag)
    }

    /// Joins every slot stream into the main stream, copies the device error
    /// flag words back (page-locked), waits once and checks them. A lane
    /// rANS fault names its chunk: `label` gives the tensor and chunk index
    /// of the job that the kernels recorded.
    fn finish<'n>(&mut self, label: impl Fn(u32) -> Option<(&'n str, u64)>) -> Result<()> {
        let main = self.gpu.stream().clone();
        for s in &self.slots {
            s.done.record(&s.stream)?;
            main.wait(&s.done)?;
        }
        let flag = DevRange::all(&self.flag, &main)?;
        let host = self.flag_host.as_mut_slice()?;
        // SAFETY: the flag words from the live flag buffer into page-locked
        // memory of the same length that nothing else touches until the
        // synchronize below.
        unsafe { cu::memcpy_dtoh_async(&mut host[..flag::WORDS], flag.ptr(), main.cu_stream()) }?;
        main.synchronize()?;
        let words = self.flag_host.as_slice()?;
        if words[0] != 0 {
            return Err(device_error(words, label));
        }
        Ok(())
    }

    /// Computes the leaf digest of every checked chunk on the device and
    /// compares it with the chunk's record. The chunks go in batches of at
    /// most [`LEAF_SCRATCH_BLOCKS`] blocks, two launches each, all on the
    /// main stream, reusing the loader's scratch. Skipped when the caller
    /// opted out.
    fn check_leaves(&mut self, checks: &[LeafCheck<'_>]) -> Result<()> {
        let Some(leaf) = self.leaf.as_mut().filter(|_| self.cfg.verify_digests && !checks.is_empty()) else {
            return Ok(());
        };
        let mut batches = vec![LeafBatch::default()];
        for c in checks {
            let blocks = LeafBatch::blocks_of(c.out.len());
            if blocks > LEAF_SCRATCH_BLOCKS {
                return Err(GpuError::invalid("chunk larger than the leaf digest scratch"));
            }
            if batches.last().is_some_and(|b| b.blocks() + blocks > LEAF_SCRATCH_BLOCKS) {
                batches.push(LeafBatch::default());
            }
            if let Some(b) = batches.last_mut() {
                b.push(c.out);
            }
        }
        let table_bytes: usize = batches.iter().map(LeafBatch::table_bytes).sum();
        let mut table = vec![0u8; table_bytes];
        let mut at = 0;
        for b in &batches {
            b.write_table(&mut table[at..at + b.table_bytes()]);
            at += b.table_bytes();
        }
        // Grown only, to the next power of two; nothing on the device uses
        // the old buffers any more (every call synchronizes before it returns).
        if leaf.table.num_bytes() < table_bytes {
            leaf.table = self.gpu.alloc_zeros::<u8>(table_bytes.next_power_of_two())?;
        }
        if leaf.digests.len() < 2 * checks.len() {
            leaf.digests = self.gpu.alloc_zeros::<u64>((2 * checks.len()).next_power_of_two())?;
        }
        let main = self.gpu.stream().clone();
        main.memcpy_htod(&table, &mut leaf.table.slice_mut(..table_bytes))?;
        let (table_all, terms, digests_all) = (
            DevRange::all(&leaf.table, &main)?,
            DevRange::all(&leaf.terms, &main)?,
            DevRange::all(&leaf.digests, &main)?,
        );
        let (mut table_at, mut first) = (0, 0);
        for b in &batches {
            let t = table_all.sub(table_at, b.table_bytes())?;
            let o = digests_all.sub(16 * first, 16 * b.len())?;
            self.gpu.launch_leaves(&main, b, t, terms, o)?;
            table_at += b.table_bytes();
            first += b.len();
        }
        let leaves = main.clone_dtoh(&leaf.digests.slice(..2 * checks.len()))?;
        for (c, halves) in checks.iter().zip(leaves.chunks_exact(2)) {
            let leaf = ((u128::from(halves[1]) << 64) | u128::from(halves[0])).to_be_bytes();
            if leaf != c.digest {
                return Err(GpuError::Format(
                    tpde::Error::new(ErrorCode::ChunkDigest, "the rebuilt chunk does not match its digest")
                        .in_tensor(c.tensor)
                        .in_chunk(c.chunk),
                ));
            }
        }
        Ok(())
    }
}

/// Where a stream of a [`DeviceDelta`] lies in its data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Staged {
    /// Its decoded bytes, at this offset.
    Decoded(usize),
    /// A lane rANS stream whose context needs the base: its stored bytes,
    /// at this offset, decoded at each apply.
    Deferred(usize),
}

/// A chunk of a [`DeviceDelta`]: where each stream lies, and the lane rANS
/// plan where some stream is deferred; its first word is `word` of the
/// tensor, and `index` its index in the file.
#[derive(Clone, Debug)]
struct StagedChunk {
    record: ChunkRecord,
    streams: Vec<StreamRecord>,
    words: u32,
    at: Vec<Staged>,
    plan: Option<ChunkPlan>,
    word: u64,
    index: u64,
}

impl StagedChunk {
    /// What applying the chunk needs beyond its descriptor: lane rANS
    /// descriptors, position descriptors, and slot bytes for the deferred
    /// streams' output, scratch and positions.
    fn deferred_needs(&self) -> (usize, usize, usize) {
        let Some(plan) = &self.plan else { return (0, 0, 0) };
        let (mut count, mut bytes) = (0, 0);
        for ((a, r), p) in self.at.iter().zip(&self.streams).zip(&plan.streams) {
            if let (Staged::Deferred(_), Some((h, _))) = (a, p) {
                count += 1;
                bytes += align(r.decoded_len as usize, 16) + align(h.scratch_bytes(r.decoded_len), 16);
            }
        }
        let positions = usize::from(plan.positions_before.is_some());
        bytes += positions * align(4 * self.record.changed_count as usize, 16);
        (count, positions, bytes)
    }
}

/// A chunk that [`Loader::stage_on_device`] stages: its stored bytes, names
/// for errors, the range of the data's host part it takes, and where its
/// [`StagedChunk`] is (tensor, chunk).
struct StagePending<'c, 'a> {
    chunk: &'c ChunkRef<'a>,
    name: &'c str,
    index: u64,
    width: WordWidth,
    host: std::ops::Range<usize>,
    at: (usize, usize),
    plan: Option<ChunkPlan>,
}

#[derive(Clone, Debug)]
struct StagedTensor {
    name: String,
    width: WordWidth,
    words: u64,
    needs_base: bool,
    chunks: Vec<StagedChunk>,
    /// As [`TensorRef::first_chunk`].
    first_chunk: u64,
    /// The digest and words of every chunk (unchanged ones too), in order.
    leaves: Vec<(Digest128, u32)>,
}

impl StagedTensor {
    fn bytes(&self) -> usize {
        usize::try_from(self.words).unwrap_or(usize::MAX) * self.width.bytes()
    }
}

/// A delta whose streams are decoded and resident in device memory
/// ([`Loader::stage_on_device`]). Lane rANS streams whose contexts need the
/// base (context 1, and the planes decoded under such a plane) are resident
/// as their stored bytes and decoded at each apply, into the loader's slots.
#[derive(Debug)]
pub struct DeviceDelta {
    data: CudaSlice<u8>,
    tensors: Vec<StagedTensor>,
}

impl DeviceDelta {
    /// Device bytes the decoded streams take.
    #[must_use]
    pub fn device_bytes(&self) -> usize {
        self.data.num_bytes()
    }

    /// Bytes of all target tensors.
    #[must_use]
    pub fn target_bytes(&self) -> usize {
        self.tensors.iter().map(StagedTensor::bytes).sum()
    }
}

/// The error of the device flag `words` ([`flag::WORDS`] of them). A lane
/// rANS fault comes with the job index of a chunk that showed it, which
/// `label` turns into its tensor and chunk index.
fn device_error<'n>(words: &[u32], label: impl Fn(u32) -> Option<(&'n str, u64)>) -> GpuError {
    let e = GpuError::from_flag(words[0]);
    let GpuError::Format(f) = e else { return e };
    let bit = match f.code() {
        ErrorCode::RansHeader => flag::RANS_HEADER,
        ErrorCode::RansDecode => flag::RANS_DECODE,
        _ => return GpuError::Format(f),
    };
    let job = flag::job_word(bit).and_then(|w| words.get(w)).copied().unwrap_or(u32::MAX);
    GpuError::Format(label_error(f, label(job)))
}

/// `e`, naming the tensor and chunk of `label` when there is one.
fn label_error(e: tpde::Error, label: Option<(&str, u64)>) -> tpde::Error {
    match label {
        Some((tensor, chunk)) => e.in_tensor(tensor).in_chunk(chunk),
        None => e,
    }
}

/// A kernel's error flag says what is wrong with a delta but not where. The faults
/// it reports (positions, changed counts) need no base, so the format library's own
/// check of each chunk ([`tpde::delta::check_chunk_payload`]) finds the first chunk
/// with the same fault, and the error names its tensor and chunk. A lane rANS fault
/// comes named by the device (the kernels record the chunk); the library's decoder
/// ([`tpde::codec::rans::decode_into`]) then decodes that chunk's lane rANS streams
/// whose contexts need no base (§15.7), and where it finds the same fault, its error
/// (and message) is the one returned. This runs only on the error path; where no
/// chunk shows the fault on the CPU, `err` is returned as it is.
fn locate_device_fault(delta: &[TensorRef<'_>], err: GpuError) -> GpuError {
    let (code, named) = match &err {
        GpuError::Format(e) => (e.code(), e.tensor().zip(e.chunk())),
        _ => return err,
    };
    if matches!(code, ErrorCode::RansHeader | ErrorCode::RansDecode) {
        for t in delta {
            for (k, c) in t.chunks.iter().enumerate() {
                let index = t.first_chunk + k as u64;
                if named.is_some_and(|(name, chunk)| name != t.name || chunk != index) {
                    continue;
                }
                if let Some(found) = library_rans_fault(c, t.width).filter(|f| f.code() == code) {
                    return GpuError::Format(found.in_tensor(&t.name).in_chunk(index));
                }
            }
        }
        return err;
    }
    if named.is_some() {
        return err;
    }
    let mut scratch = tpde::delta::DecodeScratch::default();
    for t in delta {
        for (k, c) in t.chunks.iter().enumerate() {
            let input = tpde::delta::ChunkInput {
                record: &c.record,
                streams: c.streams,
                stored: c.stored,
                base: None,
                words: c.words as usize,
                word_bytes: t.width.bytes(),
            };
            match tpde::delta::check_chunk_payload(&input, &mut scratch) {
                Err(found) if found.code() == code => {
                    return GpuError::Format(found.in_tensor(&t.name).in_chunk(t.first_chunk + k as u64));
                }
                _ => {}
            }
        }
    }
    err
}

/// The format library's fault in a chunk's lane rANS streams, among those it can
/// decode without the base: context 0, and context 2 under a plane it decoded
/// (planes from the most significant down). `None` when it finds none.
fn library_rans_fault(c: &ChunkRef<'_>, width: WordWidth) -> Option<tpde::Error> {
    let n = c.streams.len();
    let stored: Vec<&[u8]> = c.stored_streams().collect();
    let mut decoded: Vec<Option<Vec<u8>>> = vec![None; n];
    for q in (0..n).rev() {
        let (r, bytes) = (&c.streams[q], *stored.get(q)?);
        let len = r.decoded_len as usize;
        if !is_rans(r.codec) {
            let mut out = vec![0u8; len];
            decoded[q] = decode_stream(r, bytes, &mut out).ok().map(|()| out);
            continue;
        }
        let header = match Header::read(bytes, allowed_contexts(c, q, width)) {
            Ok(h) => h,
            Err(e) => return Some(e),
        };
        let contexts = match header.context {
            rans::context::NONE => tpde::codec::rans::Contexts::None,
            rans::context::HIGHER_PLANE => match decoded.get(q + 1).and_then(Option::as_deref) {
                Some(above) => tpde::codec::rans::Contexts::HigherPlane(above),
                None => continue,
            },
            // needs the base
            _ => continue,
        };
        let mut out = Vec::new();
        if let Err(e) = tpde::codec::rans::decode_into(bytes, len, contexts, &mut out) {
            return Some(e);
        }
        decoded[q] = Some(out);
    }
    None
}

/// Decodes (zstd) or copies (stored) streams into `host` at their offsets,
/// in parallel. Offsets increase and the streams do not overlap. A format
/// error names the tensor and chunk that `label` gives for the task's chunk.
fn decode_tasks<'n>(
    host: &mut [u8],
    tasks: &[StreamTask<'_>],
    label: impl Fn(usize) -> Option<(&'n str, u64)> + Sync,
) -> Result<()> {
    let mut rest = host;
    let mut at = 0usize;
    let mut work = Vec::with_capacity(tasks.len());
    for (off, r, bytes, chunk) in tasks {
        // the stored bytes of a lane rANS stream go to the device as they are
        let len = if is_rans(r.codec) { r.stored_len } else { r.decoded_len } as usize;
        if *off < at || off + len - at > rest.len() {
            return Err(GpuError::invalid("streams exceed the staging slot"));
        }
        let (_, tail) = std::mem::take(&mut rest).split_at_mut(off - at);
        let (dst, tail) = tail.split_at_mut(len);
        rest = tail;
        at = off + len;
        work.push((dst, r, *bytes, *chunk));
    }
    work.into_par_iter().try_for_each(|(dst, r, bytes, chunk)| {
        if is_rans(r.codec) {
            dst.copy_from_slice(bytes);
            return Ok(());
        }
        decode_stream(r, bytes, dst).map_err(|e| match (e, label(chunk)) {
            (GpuError::Format(e), Some((tensor, index))) => GpuError::Format(e.in_tensor(tensor).in_chunk(index)),
            (e, _) => e,
        })
    })
}

/// Offset of `part` in `whole`, if `part` lies inside it.
fn offset_in(whole: &[u8], part: &[u8]) -> Option<usize> {
    let (w, p) = (whole.as_ptr() as usize, part.as_ptr() as usize);
    (p >= w && p + part.len() <= w + whole.len()).then(|| p - w)
}

fn host_prefix(host: &PinnedHostSlice<u8>, n: usize) -> Result<&[u8]> {
    Ok(&host.as_slice()?[..n])
}

thread_local! {
    /// Decoded bytes of one zstd stream, reused from stream to stream: the
    /// library's decoder appends to a `Vec`, and the result is copied into
    /// the page-locked slot.
    static DECODED: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Decodes one stream into `dst` (exactly its decoded length) with the
/// format library's own decoder, which enforces the zstd profile of
/// `spec/FORMAT.md` §8.5 (one frame with its content size, no trailing
/// bytes, a bounded window) and the rules of lane rANS (§8.7), and reports
/// the library's codes. A lane rANS stream must have context 0 here (the
/// plane above or the base that another context reads is not given);
/// the loader decodes every lane rANS stream on the device.
pub fn decode_stream(record: &StreamRecord, stored: &[u8], dst: &mut [u8]) -> Result<()> {
    let len = record.decoded_len as usize;
    if dst.len() != len || stored.len() != record.stored_len as usize {
        return Err(GpuError::invalid("stream lengths differ from the stream record"));
    }
    match record.codec {
        Codec::Stored => {
            if stored.len() != len {
                let e = tpde::Error::new(
                    ErrorCode::StreamLength,
                    "a stored stream's length differs from its decoded length",
                );
                return Err(GpuError::Format(e));
            }
            dst.copy_from_slice(stored);
            Ok(())
        }
        Codec::Zstd => DECODED
            .with(|cell| -> FormatResult<()> {
                let mut decoded = cell.borrow_mut();
                decoded.clear();
                tpde::codec::zstd_stream::decompress_into(stored, len, &mut decoded)?;
                dst.copy_from_slice(&decoded);
                Ok(())
            })
            .map_err(GpuError::Format),
        // Context 0 only: the plane above or the base that another context
        // reads is not at hand here; the loader decodes those on the device.
        Codec::Rans => {
            if tpde::codec::rans::context_kind(stored)? != tpde::codec::rans::ContextKind::None {
                return Err(GpuError::invalid("a lane rANS stream with a context needs its context to decode"));
            }
            DECODED
                .with(|cell| -> FormatResult<()> {
                    let mut decoded = cell.borrow_mut();
                    tpde::codec::rans::decode_into(stored, len, tpde::codec::rans::Contexts::None, &mut decoded)?;
                    dst.copy_from_slice(&decoded);
                    Ok(())
                })
                .map_err(GpuError::Format)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream the library's decoder refuses is reported with its code,
    /// naming the tensor and the chunk's index in the file.
    #[test]
    fn a_bad_stream_names_its_tensor_and_chunk() {
        let good = tpde::codec::zstd_stream::compress(&[3u8; 64], tpde::codec::zstd_stream::Effort::Level(1)).unwrap();
        let mut trailing = good.clone();
        trailing.push(0);
        let record = |stored: &[u8]| StreamRecord {
            stored_len: u32::try_from(stored.len()).unwrap(),
            decoded_len: 64,
            codec: Codec::Zstd,
        };
        let tasks = [(0, record(&good), good.as_slice(), 0), (64, record(&trailing), trailing.as_slice(), 1)];
        let mut host = vec![0u8; 128];
        let labels = [("a", 3u64), ("b", 7)];
        let e = decode_tasks(&mut host, &tasks, |k| Some(labels[k])).unwrap_err();
        let GpuError::Format(e) = e else { panic!("{e}") };
        assert_eq!((e.code(), e.tensor(), e.chunk()), (ErrorCode::ZstdProfile, Some("b"), Some(7)));
    }

    /// A kernel's flag names no chunk; the library's check of each chunk finds
    /// the one with the same fault, and only that one.
    #[test]
    fn a_device_fault_is_located_by_the_library_check() {
        // Every word changed: a dense chunk, whose streams do not depend on the count.
        let base = vec![0u8; 4096];
        let target: Vec<u8> = (0..4096).map(|i| u8::try_from(i % 251 + 1).unwrap()).collect();
        let settings = tpde::delta::EncodeSettings::default();
        let good = tpde::delta::encode_chunk(&target, Some(&base), 4, false, settings).unwrap();
        assert_eq!(good.record.encoding, tpde::container::chunk_map::Encoding::Dense);
        let mut bad = good.clone();
        bad.record.changed_count -= 1;
        fn chunk(c: &tpde::delta::EncodedChunk) -> ChunkRef<'_> {
            ChunkRef { record: c.record, streams: &c.streams, stored: &c.data, words: 1024 }
        }
        let t = TensorRef {
            name: "w".into(),
            width: WordWidth::W4,
            words: 2048,
            chunk_words: 1024,
            first_chunk: 5,
            chunks: vec![chunk(&good), chunk(&bad)],
            host: None,
        };
        let flagged = GpuError::from_flag(crate::error::flag::COUNT_MISMATCH);
        let GpuError::Format(e) = locate_device_fault(std::slice::from_ref(&t), flagged) else { panic!() };
        assert_eq!((e.code(), e.tensor(), e.chunk()), (ErrorCode::ChangedCount, Some("w"), Some(6)));
        // A fault that no chunk shows on the CPU stays as the kernel reported it.
        let flagged = GpuError::from_flag(crate::error::flag::ZERO_GAP);
        let GpuError::Format(e) = locate_device_fault(std::slice::from_ref(&t), flagged) else { panic!() };
        assert_eq!((e.code(), e.chunk()), (ErrorCode::PositionsNotIncreasing, None));
    }
    /// A lane rANS fault comes named by the device (the job index the
    /// kernels recorded); the library's decoder finds the same fault in that
    /// chunk, and its error is the one returned. Unnamed, every chunk is
    /// searched. A chunk that the library finds sound leaves the device's
    /// error as it was.
    #[test]
    fn a_lane_rans_fault_is_named_by_the_device_and_confirmed_by_the_library() {
        use tpde::codec::rans::{decode_into, encode, Contexts};
        let symbols: Vec<u8> = (0..5000u32).map(|i| u8::try_from(i % 7 + i % 3).unwrap()).collect();
        let good = encode(&symbols, Contexts::None);
        let decodes = |b: &[u8]| decode_into(b, symbols.len(), Contexts::None, &mut Vec::new()).map_err(|e| e.code());
        let bad = (4..good.len())
            .rev()
            .map(|at| {
                let mut b = good.clone();
                b[at] ^= 0x21;
                b
            })
            .find(|b| decodes(b) == Err(ErrorCode::RansDecode))
            .unwrap();
        let stream = |b: &[u8]| StreamRecord {
            stored_len: u32::try_from(b.len()).unwrap(),
            decoded_len: 5000,
            codec: Codec::Rans,
        };
        let record = |b: &[u8]| ChunkRecord {
            data_offset: 0,
            stored_len: u32::try_from(b.len()).unwrap(),
            changed_count: 5000,
            first_stream: 0,
            encoding: Encoding::Raw,
            value_op: tpde::container::chunk_map::ValueOp::Xor,
            value_layout: ValueLayout::Words,
            position_coding: PositionCoding::None,
            gap_width: 0,
            stream_count: 1,
            value_order: tpde::container::chunk_map::ValueOrder::Positional,
            checksum: 0,
            digest: [0; 16],
        };
        let (gs, bs) = ([stream(&good)], [stream(&bad)]);
        let chunk = |streams, b: &'static [u8]| ChunkRef { record: record(b), streams, stored: b, words: 5000 };
        let (good, bad): (&'static [u8], &'static [u8]) = (good.leak(), bad.leak());
        let t = TensorRef {
            name: "w".into(),
            width: WordWidth::W1,
            words: 15_000,
            chunk_words: 5000,
            first_chunk: 5,
            chunks: vec![chunk(&gs, good), chunk(&bs, bad), chunk(&gs, good)],
            host: None,
        };
        t.validate().unwrap();
        let labels = [("w", 5u64), ("w", 6), ("w", 7)];
        let words = [flag::RANS_DECODE, u32::MAX, 1, 0];
        let named = device_error(&words, |job| labels.get(job as usize).copied());
        let GpuError::Format(e) = &named else { panic!("{named}") };
        assert_eq!((e.code(), e.tensor(), e.chunk()), (ErrorCode::RansDecode, Some("w"), Some(6)));
        for flagged in [named, GpuError::from_flag(flag::RANS_DECODE)] {
            let GpuError::Format(e) = locate_device_fault(std::slice::from_ref(&t), flagged) else { panic!() };
            assert_eq!((e.code(), e.tensor(), e.chunk()), (ErrorCode::RansDecode, Some("w"), Some(6)));
            // the library's own error, not the kernel's
            assert!(!e.to_string().contains("GPU kernel"), "{e}");
        }
        // named at a chunk the library finds sound: the device's error stays
        let words = [flag::RANS_DECODE, u32::MAX, 2, 0];
        let GpuError::Format(e) = locate_device_fault(
            std::slice::from_ref(&t),
            device_error(&words, |job| labels.get(job as usize).copied()),
        ) else {
            panic!()
        };
        assert_eq!((e.code(), e.chunk()), (ErrorCode::RansDecode, Some(7)));
        // decode_stream decodes a context 0 stream with the library
        let mut out = vec![0u8; 5000];
        decode_stream(&gs[0], good, &mut out).unwrap();
        assert_eq!(out, symbols);
    }
}
